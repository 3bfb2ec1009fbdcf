"""Benchmark of the memory budgets (``max_memory=``): a ResNet-18 at 3 × 64 × 64, C = 1000.

Usage::

    .venv/bin/python bench/memory.py [--quick] [--threads N] [--n N] [--classes C] [--device D]

Prints ONE JSON object on stdout; progress goes to stderr. Every case runs in a fresh child
process (``--case NAME``), so that its peak RSS (VmHWM of ``/proc/self/status``, reset after
the set-up) is its own; the set-up (torch, the model, the inputs, one meta-device probe of a
tiny model so that the probe's imports are not counted) comes before the reset.

Model: the registered ``resnet18`` (:mod:`manifoldlens.resnet`: torchvision's layout without
torchvision, BasicBlocks [2, 2, 2, 2], 64–512 channels, BatchNorm in eval mode, 11.7 M
parameters, random init, float32), 1000 classes, ``output="log_softmax"`` as
``local_data_matrix`` uses it.

Device: ``--device`` (default ``cpu``). On CUDA the budget is half of the GPU's free memory,
and the measured peak is the CUDA allocator's (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, over what was allocated before); on the CPU it is the peak RSS.

Cases, all under the default budget (``max_memory=None``: half of MemAvailable) unless said:

* ``forward``: ``strategy="forward"`` on n images at 3 × 64 × 64 (d = 12 288 tangents):
  refused before the first forward pass, with the estimate; before this budget, the process
  asked for ~12 GB and was OOM-killed.
* ``forward_chunk1``: the same with ``chunk_size=1`` (before: asked for 3.2 GB and died).
* ``vjp``: ``jacobian(strategy="vjp")`` on one image at 3 × 64 × 64 (C backward passes: the
  strategy to use there).
* ``forward_small`` / ``forward_small_budget``: ``"forward"`` on n images at 3 × 16 × 16
  (d = 768), under the default budget and under one that fits a single sample
  (``max_memory`` = the estimate of one sample plus the n results: chunks of 1). The budget
  case then computes the unchunked Jacobian too (after its RSS is read) and reports the
  largest difference, relative to max |J| (float32 convolutions round differently for other
  batch sizes; float64 and linear layers agree bit for bit, see ``tests/test_memory.py``).
* ``vmap_small``: ``"vmap"`` on 2 images at 3 × 16 × 16.
* ``allocator``: the estimate for 3 samples of three small models (an MLP, a CNN with
  max-pooling, a residual block with BatchNorm; 3 × 16 × 16, C = 10) against the peak bytes
  the allocator itself reports (CPU: ``torch.profiler`` with ``profile_memory``, its
  allocation and free events; CUDA: ``max_memory_allocated``), for each strategy.
* ``overhead``: what the measurement costs, in a fresh process: the first call (imports of
  torch's meta kernels), a second model (its probe), the same call again (cached), on the
  seed-001 CNN (1 × 28 × 28, C = 10, batch 16), against the Jacobian itself; and the probe of
  the ResNet-18 at 3 × 64 × 64.

RSS includes what is not a tensor (the probe's Python objects, allocator arenas, thread
stacks): 10–30 MB here, visible in the refused cases.

For each: the budget, the chunk size chosen, the estimated bytes of the work
(``SAFETY · (fixed + chunk · per_sample)`` plus the results), the measured peak RSS increase,
``within_budget`` (increase ≤ budget), the wall time, and the estimate / measured ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import _common as common
from _common import make_logger, print_json, run_metadata
from manifoldlens import jacobian
from manifoldlens.jacobian import jacobian_chunk_size
from manifoldlens.memory import (
    MemoryBudgetError,
    allocator_peak,
    measured_costs,
    resolve_max_memory,
)
from manifoldlens.models import create_model

SEED = 0
CLASSES = 1000
#: Where every case runs (``--device``).
DEVICE = torch.device("cpu")
log = make_logger("memory")


def resnet18(side: int, classes: int = CLASSES) -> nn.Module:
    """The registered ResNet-18 at 3 × side × side, in eval mode on :data:`DEVICE`."""
    return create_model("resnet18", (3, side, side), classes).to(DEVICE).eval()


class _Peak:
    """The peak memory over a block, above what was in use at its start: the CUDA
    allocator's on a CUDA device, else the peak RSS (VmHWM, reset at the start; None where
    /proc is missing)."""

    def __init__(self) -> None:
        self.cuda = DEVICE.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(DEVICE)
            torch.cuda.reset_peak_memory_stats(DEVICE)
            self.before_mb = torch.cuda.memory_allocated(DEVICE) / 2**20
        else:
            common.reset_peak_rss()
            self.before_mb = common.current_rss_mb() or 0.0

    def peak_mb(self) -> float | None:
        if self.cuda:
            torch.cuda.synchronize(DEVICE)
            return torch.cuda.max_memory_allocated(DEVICE) / 2**20
        return common.vm_hwm_mb()


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes the allocator held during ``fn()``: the CPU profiler's allocation and free
    events, or CUDA's ``max_memory_allocated`` over what was allocated before."""
    if DEVICE.type != "cuda":
        return allocator_peak(fn)
    torch.cuda.synchronize(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    fn()
    torch.cuda.synchronize(DEVICE)
    return torch.cuda.max_memory_allocated(DEVICE) - before


CASES = {  # name: (strategy, side, images (None: --n), chunk_size, budget of one sample)
    "forward": ("forward", 64, None, None, False),
    "forward_chunk1": ("forward", 64, None, 1, False),
    "vjp": ("vjp", 64, 1, None, False),
    "forward_small": ("forward", 16, None, None, False),
    "forward_small_budget": ("forward", 16, None, None, True),
    "vmap_small": ("vmap", 16, 2, None, False),
}


def _key(strategy: str, side: int, x: torch.Tensor) -> tuple:
    return ("jacobian", strategy, "logits", True, "log_softmax", (3, side, side), x.dtype,
            x.device.type)


def run_case(name: str, n: int, classes: int) -> dict:
    strategy, side, images, chunk, one_sample = CASES[name]
    n = images or n
    torch.manual_seed(SEED)
    model = resnet18(side, classes)
    x = torch.rand(n, 3, side, side).to(DEVICE)
    result = n * classes * 3 * side * side * x.element_size()
    # the probe's imports (and, on CUDA, the context and its kernels' first use)
    jacobian(nn.Linear(3, 2).to(DEVICE), torch.zeros(1, 3, device=DEVICE), strategy="vmap")
    max_memory = None
    if one_sample:  # a budget that fits one sample: measured first, outside the timing
        jacobian_chunk_size(model, x, output="log_softmax", strategy=strategy, relative=True)
        max_memory = measured_costs(model)[_key(strategy, side, x)].bytes(1) + result
    budget = resolve_max_memory(max_memory, DEVICE)
    probe = _Peak()
    out: dict = {"strategy": strategy, "input": [n, 3, side, side], "chunk_size_arg": chunk,
                 "device": str(DEVICE), "budget_mb": round(budget / 2**20, 1),
                 "peak_of": "CUDA allocator" if probe.cuda else "RSS (VmHWM)",
                 "before_mb": round(probe.before_mb)}
    j = None
    t0 = time.perf_counter()
    try:
        step = jacobian_chunk_size(model, x, output="log_softmax", strategy=strategy,
                                   relative=True, chunk_size=chunk, max_memory=max_memory)
        out["probe_s"] = round(time.perf_counter() - t0, 2)
        j = jacobian(model, x, strategy=strategy, chunk_size=chunk, max_memory=max_memory)
        out["outcome"] = "ran"
        out["chunk"] = step
    except MemoryBudgetError as e:
        out["outcome"] = "refused before the first forward pass"
        out["message"] = str(e)
        step = n
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    cost = measured_costs(model)[_key(strategy, side, x)]  # measured above
    out["estimate_one_sample_mb"] = round(cost.bytes(1) / 2**20, 1)
    out["estimate_all_at_once_mb"] = round((cost.bytes(n) + result) / 2**20)
    out["estimate_mb"] = round((cost.bytes(step) + (result if step < n else 0)) / 2**20, 1)
    peak = probe.peak_mb()
    if peak is not None:
        rise = peak - probe.before_mb
        out["peak_mb"] = round(peak)
        out["peak_increase_mb"] = round(rise)
        out["within_budget"] = bool(rise <= budget / 2**20)
        if out["outcome"] == "ran":
            out["estimate_over_measured"] = round(out["estimate_mb"] / max(rise, 1), 2)
    if j is not None and one_sample:  # against the unchunked result (after the RSS reading)
        t1 = time.perf_counter()
        ref = jacobian(model, x, strategy=strategy)
        out["unchunked_wall_s"] = round(time.perf_counter() - t1, 2)
        out["bitwise_equal_to_unchunked"] = bool(torch.equal(j, ref))
        out["max_diff_over_max_abs"] = float((j - ref).abs().max() / ref.abs().max())
    return out


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.a, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.b(torch.relu(self.bn(self.a(h)))))
        return self.fc(h.mean((2, 3)))



def run_allocator() -> dict:
    torch.manual_seed(SEED)
    models = {
        "mlp": nn.Sequential(nn.Flatten(), nn.Linear(768, 64), nn.Tanh(), nn.Linear(64, 10)),
        "cnn": nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(512, 10)),
        "residual": _Residual(),
    }
    x = torch.randn(3, 3, 16, 16).to(DEVICE)
    out: dict = {}
    for name, model in models.items():
        model.to(DEVICE).eval()
        for strategy in ("vjp", "vmap", "forward"):
            jacobian_chunk_size(model, x, output="log_softmax", strategy=strategy,
                                relative=True)
            key = ("jacobian", strategy, "logits", True, "log_softmax", (3, 16, 16),
                   x.dtype, DEVICE.type)
            est = measured_costs(model)[key].bytes(3)
            got = peak_bytes(lambda m=model, s=strategy: jacobian(m, x, strategy=s))
            out[f"{name}/{strategy}"] = {"estimate_kb": round(est / 1024),
                                         "allocator_peak_kb": round(got / 1024),
                                         "ratio": round(est / max(got, 1), 2)}
    return out


def run_overhead() -> dict:
    from manifoldlens.models import Seed001CNN

    def cnn() -> nn.Module:
        torch.manual_seed(SEED)
        return Seed001CNN(in_shape=(1, 28, 28), num_classes=10).to(DEVICE).eval()

    x = torch.rand(16, 1, 28, 28).to(DEVICE)
    out: dict = {}
    for label, model in (("first_call_s", cnn()), ("new_model_s", cnn()), ("cached_s", None)):
        model = model or out.pop("_model")
        t0 = time.perf_counter()
        jacobian_chunk_size(model, x, output="log_softmax", relative=True)
        out[label] = round(time.perf_counter() - t0, 3)
        out["_model"] = model
    model = out.pop("_model")
    t0 = time.perf_counter()
    jacobian(model, x)
    out["jacobian_s"] = round(time.perf_counter() - t0, 3)
    big = resnet18(64)
    for strategy in ("vjp", "vmap", "forward"):
        t0 = time.perf_counter()
        try:
            jacobian_chunk_size(big, torch.rand(4, 3, 64, 64).to(DEVICE), strategy=strategy,
                                output="log_softmax", relative=True)
        except MemoryBudgetError:
            pass
        out[f"resnet18_probe_{strategy}_s"] = round(time.perf_counter() - t0, 2)
    return out


EXTRA = {"allocator": run_allocator, "overhead": run_overhead}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 images and 10 classes (smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=4, help="images per call")
    p.add_argument("--classes", type=int, default=CLASSES, help="C, the model's outputs")
    common.add_device(p)
    p.add_argument("--case", choices=[*sorted(CASES), *EXTRA], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    args = parse_args(argv)
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    n, classes = (2, 10) if args.quick else (args.n, args.classes)
    if args.case:
        result = (EXTRA[args.case]() if args.case in EXTRA else
                  run_case(args.case, n, classes))
        print(json.dumps(result))
        return 0
    t_start = time.perf_counter()
    out: dict = {"meta": {**run_metadata("memory"), "n": n, "classes": classes,
                          "device": str(DEVICE), "loadavg_at_start": common.loadavg()}}
    for name in [*CASES, *EXTRA]:
        log(f"case {name}")
        child = ["--case", name, "--threads", str(args.threads), "--n", str(n),
                 "--classes", str(classes), "--device", str(DEVICE)]
        out[name] = common.run_json_child(__file__, child)
        log(json.dumps(out[name]))
    print_json(out, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
