"""Benchmark of G(x) restricted to the top-k classes on a ResNet-18 at ImageNet size (issue 12).

Usage::

    .venv/bin/python bench/topk.py [--batch 8] [--side 224] [--classes 1000] [--width 64]
        [--target-confidence 0.698] [--scales 0.5,2] [--threads 2] [--device cpu]

Prints ONE JSON object on stdout; progress goes to stderr.

Model: the registered ``resnet18`` (:mod:`manifoldlens.resnet`, torchvision's layout) at
3 × side × side, ``--classes`` outputs, ``--width`` channels in the first stage, random weights
(seed 0), eval mode, float32. Inputs: ``--batch`` smooth random images (3 × 7 × 7 Gaussian
noise, bilinearly upsampled to side × side, squashed to [0, 1] by a sigmoid), normalised with
the ImageNet mean and std.

Logit scale: a random ResNet spreads its probability over all classes, unlike a trained one.
A scalar s is folded into the last layer (``fc.weight`` and ``fc.bias`` times s), found by
bisection on the logits of one forward pass so that the mean max-probability over the batch
equals ``--target-confidence`` (default 0.698: torchvision's ResNet-18 top-1 accuracy on
ImageNet, as a trained ResNet is roughly calibrated, confidence ≈ accuracy; Guo et al. 2017).

Methods, each run once and timed to its end (``sync``), eigenvalues and trace included:

* ``exact``: ``local_data_matrix(model, x, strategy="vjp")``, all C classes (C − 1 backward
  passes);
* ``top_k_10`` / ``top_k_50``: ``local_data_matrix(model, x, top_k=K)`` (K passes);
* ``trace_estimate``: ``trace_estimate(model, x, top_k=10, samples=16, seed=0)`` (26 passes).

For each: wall time (and per image), the peak RSS increase over the RSS before it (VmHWM reset
before each; on CUDA also the allocator's peak), and, against the exact G per image (then the
median and max over the batch): the relative error of Tr G, the largest relative error of the
top-10 eigenvalues, the angle between the top eigenvectors, the largest principal angle
between the top-5 eigenspaces and the dropped mass. Eigenvectors come from the C × C Gram
(``v = Aᵀu / √λ``, the top few only: the ``eigenvectors`` property would form all C of them).
The goals of the issue are judged per method: Tr G within 2 % (median), the top-10
eigenvalues within 2 % (median over images of the largest of the 10 errors), and at least
20 times less time than exact.

``--scales f1,f2``: the accuracy part again with the logit scale multiplied by each factor,
without recomputing the exact Jacobian: with p' the probabilities at scale s',
``∇log p'_c = (s'/s) (∇log p_c − Σ_c' p'_c' ∇log p_c')`` (the logit Jacobian does not
depend on the scale, and ``(I − 1p'ᵀ)(I − 1pᵀ) = I − 1p'ᵀ``), applied in place to the stored
exact J_logp (which then stays in memory through the other methods: C × d floats per image).

The meta-device memory probes that each method's first call makes (cached per model and
input shape) are run before the timings; their time is ``probe_s``. The eigenvectors are
computed after each method's timing.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import _common as common
from _common import make_logger, print_json, run_metadata, sync
from manifoldlens import local_data_matrix, trace_estimate
from manifoldlens.information import LocalDataMatrix
from manifoldlens.jacobian import jacobian_chunk_size
from manifoldlens.models import count_parameters, create_model

SEED = 0
EIGS = 10  #: eigenvalues compared
SPACE = 5  #: dimension of the eigenspaces compared
SAMPLES = 16  #: tail classes drawn by trace_estimate
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
log = make_logger("topk")


def _g(x: float) -> float:
    """Three significant digits, as a plain float."""
    return float(f"{x:.3g}")


def summary(values: torch.Tensor) -> dict[str, float]:
    """Median and max over the batch, three significant digits."""
    v = values.double().flatten()
    return {"median": _g(float(v.median())), "max": _g(float(v.max()))}


# --------------------------------------------------------------------------------------
# Set-up: model, inputs, logit scale
# --------------------------------------------------------------------------------------


def smooth_images(n: int, side: int, device: torch.device) -> torch.Tensor:
    """3 × 7 × 7 Gaussian noise upsampled to side × side, in [0, 1], ImageNet-normalised."""
    g = torch.Generator().manual_seed(SEED + 1)
    noise = torch.randn(n, 3, 7, 7, generator=g)
    x = torch.sigmoid(2 * F.interpolate(noise, size=(side, side), mode="bilinear",
                                        align_corners=False))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).to(device)


def mean_max_prob(logits: torch.Tensor, s: float) -> float:
    return float(torch.softmax(s * logits.double(), dim=1).amax(1).mean())


def calibrate(logits: torch.Tensor, target: float, steps: int = 200) -> float:
    """The scale s with mean max-probability ``target`` over the batch (bisection on log s:
    the max-probability of softmax(s z) grows with s)."""
    c = logits.shape[1]
    if not 1.0 / c < target < 1.0:
        raise SystemExit(f"--target-confidence must lie in (1/C, 1) = ({1 / c:.3g}, 1)")
    lo, hi = -12.0, 12.0
    if not mean_max_prob(logits, math.exp(lo)) < target < mean_max_prob(logits, math.exp(hi)):
        raise SystemExit(f"no logit scale in [e^-12, e^12] gives confidence {target}")
    for _ in range(steps):
        mid = (lo + hi) / 2
        if mean_max_prob(logits, math.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return math.exp((lo + hi) / 2)


def fold_scale(model: torch.nn.Module, factor: float) -> None:
    """Multiply the logits by ``factor`` (the last layer's weight and bias)."""
    with torch.no_grad():
        model.fc.weight.mul_(factor)
        model.fc.bias.mul_(factor)


def scale_report(logits: torch.Tensor, s: float) -> dict[str, float]:
    p = torch.softmax(s * logits.double(), dim=1)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
    return {"logit_scale": _g(s), "mean_max_prob": round(float(p.amax(1).mean()), 4),
            "mean_entropy_nats": _g(float(entropy.mean())),
            "max_entropy_nats": _g(math.log(logits.shape[1]))}


# --------------------------------------------------------------------------------------
# Quantities of a G, and their errors
# --------------------------------------------------------------------------------------


def spectrum(G: LocalDataMatrix) -> LocalDataMatrix:
    """G with its eigenvalues and trace computed (what each method's timing includes)."""
    _ = (G.eigenvalues, G.trace)
    return G


def quantities(G: LocalDataMatrix) -> dict[str, torch.Tensor]:
    """What the comparisons need, small: trace, top eigenvalues and eigenvectors, dropped
    mass."""
    m = min(SPACE, G.eigenvalues.shape[1])
    return {"trace": G.trace.double().cpu(), "eigenvalues": G.eigenvalues[:, :EIGS].double().cpu(),
            "vectors": G.top_eigenvectors(m).cpu(), "dropped_mass": G.dropped_mass.double().cpu()}


def _orthonormal(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(v.double().mT).Q.mT


def accuracy(exact: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, object]:
    """Errors of ``got`` against ``exact``, per image, then median and max over the batch."""
    out: dict[str, object] = {}
    trace_err = (got["trace"] - exact["trace"]).abs() / exact["trace"]
    out["trace_rel_err"] = summary(trace_err)
    if "stderr" in got:
        err = got["stderr"]
        out["stderr_over_exact"] = summary(err / exact["trace"])
        within = (got["trace"] - exact["trace"]).abs() <= 3 * err
        out["within_3_stderr"] = [bool(b) for b in within]
        out["within_3_stderr_fraction"] = round(float(within.double().mean()), 3)
        return out
    k = min(EIGS, got["eigenvalues"].shape[1], exact["eigenvalues"].shape[1])
    rel = ((got["eigenvalues"][:, :k] - exact["eigenvalues"][:, :k]).abs()
           / exact["eigenvalues"][:, :k])
    ev_err = rel.amax(1)
    out["top10_eigenvalues_max_rel_err"] = summary(ev_err)
    out["eigenvalue_rel_err_median_by_index"] = [_g(float(v)) for v in rel.median(0).values]
    ve, vg = exact["vectors"].double(), got["vectors"].double()
    # angles from sines and chords, not from cosines (which lose small angles to rounding)
    sign = torch.sign((ve[:, 0] * vg[:, 0]).sum(-1)).unsqueeze(-1)
    chord = torch.linalg.vector_norm(ve[:, 0] - sign * vg[:, 0], dim=-1)
    out["top_eigenvector_angle_deg"] = summary(torch.rad2deg(2 * torch.asin(chord / 2)))
    m = min(ve.shape[1], vg.shape[1])
    qe, qg = _orthonormal(ve[:, :m]), _orthonormal(vg[:, :m])
    residual = qg - (qg @ qe.mT) @ qe  # the part of span(qg) outside span(qe)
    sin_max = torch.linalg.matrix_norm(residual, ord=2).clamp(max=1)
    out[f"top{m}_eigenspace_max_principal_angle_deg"] = summary(
        torch.rad2deg(torch.asin(sin_max)))
    out["dropped_mass"] = summary(got["dropped_mass"])
    out["_medians"] = (float(trace_err.median()), float(ev_err.median()))
    return out


# --------------------------------------------------------------------------------------
# Timing and memory of one method
# --------------------------------------------------------------------------------------


def measured(fn: Callable[[], object], device: torch.device) -> tuple[object, dict]:
    """``fn()`` timed to its end, with the peak RSS increase (and CUDA's allocator peak)."""
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        alloc0 = torch.cuda.memory_allocated(device)
    common.reset_peak_rss()
    rss0 = common.current_rss_mb() or 0.0
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    wall = time.perf_counter() - t0
    info: dict[str, object] = {"time_s": round(wall, 3)}
    peak = common.vm_hwm_mb()
    if peak is not None:
        info["peak_rss_increase_mb"] = round(peak - rss0)
    if cuda:
        info["cuda_peak_increase_mb"] = round(
            (torch.cuda.max_memory_allocated(device) - alloc0) / 2**20)
    return result, info


def run_methods(model: torch.nn.Module, x: torch.Tensor, classes: int,
                exact: dict[str, torch.Tensor], device: torch.device,
                time_exact: float | None) -> dict[str, dict]:
    """top_k = 10, 50 (those < C) and trace_estimate: timed, and held against ``exact``."""
    n = x.shape[0]
    out: dict[str, dict] = {}

    def top(k: int) -> Callable[[], LocalDataMatrix]:
        return lambda: spectrum(local_data_matrix(model, x, top_k=k))

    def estimate() -> dict:
        est, err = trace_estimate(model, x, top_k=min(10, classes), samples=SAMPLES, seed=SEED)
        return {"trace": est.double().cpu(), "stderr": err.double().cpu()}

    methods = {f"top_k_{k}": top(k) for k in (10, 50) if k < classes}
    methods["trace_estimate"] = estimate
    for name, fn in methods.items():
        log(f"{name} ...")
        got, info = measured(fn, device)
        if isinstance(got, LocalDataMatrix):  # its eigenvectors, outside the timing
            got = quantities(got)
        info["time_per_image_s"] = round(info["time_s"] / n, 4)
        acc = accuracy(exact, got)
        medians = acc.pop("_medians", None)
        info["accuracy"] = acc
        trace_ok = acc["trace_rel_err"]["median"] <= 0.02
        goals = {"trace_within_2pct_median": bool(trace_ok),
                 "top10_eigenvalues_within_2pct": None if medians is None else
                 bool(medians[1] <= 0.02)}
        if time_exact is not None:
            speedup = time_exact / max(info["time_s"], 1e-9)
            info["exact_time_over_this"] = round(speedup, 1)
            goals["at_least_20x_less_time"] = bool(speedup >= 20)
        info["goals"] = goals
        out[name] = info
        log(f"{name}: {info['time_s']} s, trace err median {acc['trace_rel_err']['median']}")
        del got
    return out


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def warm_probes(model: torch.nn.Module, x: torch.Tensor, classes: int) -> float:
    """Run, outside the timings, the meta-device memory probes that each method's first call
    makes (cached per model and input shape); returns their time."""
    t0 = time.perf_counter()
    common_args = {"output": "log_softmax", "strategy": "vjp", "relative": True}
    jacobian_chunk_size(model, x, **common_args)
    for k in (10, 50):
        if k < classes:
            jacobian_chunk_size(model, x, top_k=k, **common_args)
    jacobian_chunk_size(model, x, top_k=min(10, classes), stacked=False, **common_args)
    return round(time.perf_counter() - t0, 2)


def _factors(text: str) -> list[float]:
    """``--scales``: comma-separated finite factors > 0."""
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"factors must be finite and > 0, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pos = common.positive_int
    p.add_argument("--batch", type=pos, default=8, help="images (default 8)")
    p.add_argument("--side", type=pos, default=224, help="image side (default 224)")
    p.add_argument("--classes", type=pos, default=1000, help="C (default 1000)")
    p.add_argument("--width", type=pos, default=64, help="channels of the first stage (64)")
    p.add_argument("--target-confidence", type=float, default=0.698,
                   help="mean max-probability the logit scale is set to (default 0.698)")
    p.add_argument("--scales", type=_factors,
                   default=[], help="comma-separated factors of the logit scale at which "
                   "the accuracy is measured again (exact G derived, not recomputed)")
    p.add_argument("--threads", type=pos, default=2, help="torch threads (default 2)")
    common.add_device(p)
    return p.parse_args(argv)


def rescale_exact(jac: torch.Tensor, p_new: torch.Tensor, factor: float) -> None:
    """In place: J_logp at scale s → at scale factor·s, given the new probabilities."""
    mean = torch.einsum("nc,ncd->nd", p_new.to(jac.dtype), jac)
    jac.sub_(mean.unsqueeze(1)).mul_(factor)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    meta = {**run_metadata("bench/topk.py"), "device": str(device), "seed": SEED,
            "loadavg_at_start": common.loadavg()}
    n, c, side = args.batch, args.classes, args.side
    d = 3 * side * side
    torch.manual_seed(SEED)
    model = create_model("resnet18", (3, side, side), c, width=args.width).to(device).eval()
    x = smooth_images(n, side, device)
    with torch.no_grad():
        logits = model(x).cpu()
    s = calibrate(logits, args.target_confidence)
    fold_scale(model, s)
    calibration = scale_report(logits, s)
    log(f"resnet18 at 3x{side}x{side}, C = {c}, batch {n}: {calibration}")
    out: dict[str, object] = {"meta": meta, "config": {
        "model": f"resnet18 (width {args.width}), random init (seed {SEED}), eval, float32",
        "parameters": count_parameters(model), "in_shape": [3, side, side], "d": d,
        "classes": c, "batch": n, "target_confidence": args.target_confidence,
        "backward_passes": {"exact": c - 1, "top_k_10": 10, "top_k_50": 50,
                            "trace_estimate": f"10 + {SAMPLES}"},
        "exact_jacobian_gb": round(n * c * d * 4 / 1e9, 2)}, "calibration": calibration,
        "notes": [
            "errors per image against the exact G, then median and max over the batch",
            "top10_eigenvalues_max_rel_err: the largest relative error of the top 10 "
            "eigenvalues of an image; eigenvalue_rel_err_median_by_index: each one's median",
            "top_k = 10 cannot meet the eigenvalue goal: sum_c p_c grad log p_c = 0 over all "
            "classes, so over the top 10 (nearly all the mass) it is nearly 0 and G_10 has "
            "nearly rank 9; its 10th eigenvalue is close to 0",
            "time: one run of each method, eigenvalues and trace included; the memory probes "
            "of the first calls are run before (probe_s); eigenvectors are computed after",
        ]}

    local_data_matrix(model, x[:1], top_k=1)  # warm-up: one forward and backward pass
    out["probe_s"] = warm_probes(model, x, c)
    log(f"exact: {c - 1} backward passes ...")

    G, info = measured(lambda: spectrum(local_data_matrix(model, x, strategy="vjp")), device)
    info["time_per_image_s"] = round(info["time_s"] / n, 3)
    log(f"exact: {info['time_s']} s")
    exact = quantities(G)
    jac = G.jac_logp if args.scales else None  # kept for --scales only
    del G
    methods = {"exact": info, **run_methods(model, x, c, exact, device, info["time_s"])}
    out["methods"] = methods

    if args.scales:
        out["scales"] = []
        current = 1.0
        for factor in args.scales:
            log(f"logit scale x{factor}: exact G derived from the stored one")
            p_new = torch.softmax(factor * s * logits.to(device), dim=1)
            rescale_exact(jac, p_new, factor / current)
            fold_scale(model, factor / current)
            current = factor
            exact_s = quantities(LocalDataMatrix(jac, p_new))
            entry = {"factor": factor, **scale_report(logits, factor * s),
                     "methods": run_methods(model, x, c, exact_s, device, None)}
            for m in entry["methods"].values():
                m.pop("goals", None)
            out["scales"].append(entry)
        del jac

    out["summary"] = {name: {"time_per_image_s": m["time_per_image_s"],
                             "exact_time_over_this": m.get("exact_time_over_this"),
                             **m.get("goals", {})}
                      for name, m in methods.items() if name != "exact"}
    print_json(out, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
