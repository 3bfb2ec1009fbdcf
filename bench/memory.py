"""Benchmark of the memory budgets (``max_memory=``): a ResNet-18 at 3 × 64 × 64, C = 1000.

Usage::

    .venv/bin/python bench/memory.py [--quick] [--threads N] [--n N]

Prints ONE JSON object on stdout; progress goes to stderr. Every case runs in a fresh child
process (``--case NAME``), so that its peak RSS (VmHWM of ``/proc/self/status``, reset after
the set-up) is its own; the set-up (torch, the model, the inputs, one meta-device probe of a
tiny model so that the probe's imports are not counted) comes before the reset.

Model: a torchvision-free ResNet-18 (BasicBlocks [2, 2, 2, 2], 64–512 channels, BatchNorm in
eval mode, 11.7 M parameters, random init, float32, CPU), 1000 classes,
``output="log_softmax"`` as ``local_data_matrix`` uses it.

Cases, all under the default budget (``max_memory=None``: half of MemAvailable) unless said:

* ``vjp``: ``jacobian(strategy="vjp")`` on n images at 3 × 64 × 64 (C backward passes).
* ``vjp_budget``: the same under ``max_memory = --budget-gib`` (chunks of fewer samples);
  the sha256 of its result must equal ``vjp``'s (chunking does not change values).
* ``forward``: ``strategy="forward"`` at 3 × 64 × 64 (d = 12 288 tangents): today's code
  refuses before the first forward pass, with the estimate; before, the process asked for
  ~12 GB and was OOM-killed.
* ``forward_chunk1``: the same with ``chunk_size=1`` (before: asked for 3.2 GB and died).
* ``forward_small`` / ``vmap_small``: the strategies that do run, at 3 × 16 × 16 (d = 768),
  to hold the estimate against the measured peak RSS.

For each: the budget, the chunk size chosen, the estimated bytes of the work
(``SAFETY · (fixed + chunk · per_sample)`` plus the results), the measured peak RSS increase,
``within_budget`` (increase ≤ budget), the wall time, and the estimate / measured ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import torch
from torch import nn

import _common as common
from _common import make_logger, print_json, run_metadata
from manifoldlens import jacobian
from manifoldlens.jacobian import jacobian_chunk_size
from manifoldlens.memory import MemoryBudgetError, cached_cost, resolve_max_memory

SEED = 0
CLASSES = 1000
log = make_logger("memory")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18 as torchvision builds it (He et al. 2016), without torchvision."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1)
        return self.fc(torch.flatten(h, 1))


CASES = {  # name: (strategy, side, chunk_size, use --budget-gib)
    "vjp": ("vjp", 64, None, False),
    "vjp_budget": ("vjp", 64, None, True),
    "forward": ("forward", 64, None, False),
    "forward_chunk1": ("forward", 64, 1, False),
    "forward_small": ("forward", 16, None, False),
    "vmap_small": ("vmap", 16, None, False),
}


def run_case(name: str, n: int, budget_gib: float) -> dict:
    strategy, side, chunk, use_budget = CASES[name]
    torch.manual_seed(SEED)
    model = ResNet18().eval()
    x = torch.rand(n, 3, side, side)
    max_memory = budget_gib * 2**30 if use_budget else None
    jacobian(nn.Linear(3, 2), torch.zeros(1, 3), strategy="vmap")  # the probe's imports
    budget = resolve_max_memory(max_memory)
    common.reset_peak_rss()
    rss0 = common.current_rss_mb() or 0.0
    out: dict = {"strategy": strategy, "input": [n, 3, side, side], "chunk_size_arg": chunk,
                 "budget_mb": round(budget / 2**20), "rss_before_mb": round(rss0)}
    t0 = time.perf_counter()
    try:
        step = jacobian_chunk_size(model, x, output="log_softmax", strategy=strategy,
                                   relative=True, chunk_size=chunk, max_memory=max_memory)
        out["probe_s"] = round(time.perf_counter() - t0, 2)
        j = jacobian(model, x, strategy=strategy, chunk_size=chunk, max_memory=max_memory)
        out["outcome"] = "ran"
        out["chunk"] = step
        out["sha256"] = hashlib.sha256(j.numpy().tobytes()).hexdigest()[:16]
    except MemoryBudgetError as e:
        out["outcome"] = "refused before the first forward pass"
        out["message"] = str(e)
        step = n
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    key = ("jacobian", strategy, "logits", True, "log_softmax", (3, side, side), x.dtype, "cpu")
    cost = cached_cost(model, key, lambda: None)  # measured above
    result = n * CLASSES * 3 * side * side * x.element_size()
    out["estimate_one_sample_mb"] = round(cost.bytes(1) / 2**20)
    out["estimate_all_at_once_mb"] = round((cost.bytes(n) + result) / 2**20)
    out["estimate_mb"] = round((cost.bytes(step) + (result if step < n else 0)) / 2**20)
    peak = common.vm_hwm_mb()
    if peak is not None:
        out["peak_rss_mb"] = round(peak)
        out["peak_increase_mb"] = round(peak - rss0)
        out["within_budget"] = bool(peak - rss0 <= budget / 2**20)
        if out["outcome"] == "ran":
            out["estimate_over_measured"] = round(out["estimate_mb"] / max(peak - rss0, 1), 2)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 images instead of --n")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=8, help="images per call")
    p.add_argument("--budget-gib", type=float, default=0.5,
                   help="max_memory of the vjp_budget case, GiB")
    p.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 2 if args.quick else args.n
    if args.case:
        print(json.dumps(run_case(args.case, n, args.budget_gib)))
        return 0
    t_start = time.perf_counter()
    out: dict = {"meta": {**run_metadata("memory"), "n": n, "classes": CLASSES,
                          "loadavg_at_start": common.loadavg()}}
    for name in CASES:
        log(f"case {name}")
        child = ["--case", name, "--threads", str(args.threads), "--n", str(n),
                 "--budget-gib", str(args.budget_gib)]
        out[name] = common.run_json_child(__file__, child)
        log(json.dumps(out[name]))
    a, b = out["vjp"].get("sha256"), out["vjp_budget"].get("sha256")
    out["vjp_budget"]["same_result_as_vjp"] = a is not None and a == b
    print_json(out, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
