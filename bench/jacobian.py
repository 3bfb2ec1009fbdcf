"""Benchmark of the Jacobian engine and of the C × C route to the spectrum of G(x).

Usage::

    .venv/bin/python bench/jacobian.py [--quick] [--threads N] [--repeats R] [--device D]

Every section runs on ``--device`` (default ``cpu``; ``cuda`` on a GPU), the reference
methods too.

Prints ONE JSON object on stdout; progress goes to stderr. Three sections:

1. ``jacobian_engine``: ms per Jacobian batch of ``Seed001CNN`` (MNIST, 1×28×28, batch 128,
   CPU, float32, ``output="log_softmax"``) for every strategy, ``"auto"``, the seed-001
   reference (``torch.autograd.functional.jacobian`` one sample at a time) and the bound
   (C summed VJPs written inline). ``"forward"`` is timed on a sub-batch and scaled per
   sample (d = 784 JVPs per sample against C = 10 VJPs: it is hopeless here).
2. ``spectrum_d784``: spectrum of G at d = 784, C = 10 through the C × C Gram
   (``LocalDataMatrix.eigenvalues``) against dense ``torch.linalg.eigvalsh`` of the d × d G,
   float32 and float64, with the agreement of the two spectra (min(repeats, 3) rounds: a
   dense call takes seconds).
3. ``spectrum_d150528``: the C × C route at d = 3·224·224, C = 1000 (ImageNet sized), one
   sample, with its peak RSS; run first, in a fresh child process, so that its peak RSS
   (VmHWM, and ``ru_maxrss``) is its own. Dense is impossible there (d² floats ≈ 90 GB).
4. ``top_k_c1000``: G at C = 1000 on an MLP (d = 1024): the full G (C − 1 backward passes)
   against ``top_k=5`` (5 passes) and ``trace_estimate(top_k=5, samples=16)`` (21 passes),
   with the dropped mass and the estimator's error against the exact trace. ``--only top_k``
   runs this section alone.

Methods are timed round-robin (one repeat of each, then the next round, with the order
rotated every round) so that a noisy, shared machine slows them alike; every section reports
median and min ms and ratios (ratio of medians, ratio of mins and the median of the per-round
ratios, which pairs measurements taken close together in time).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import _common as common
from _common import log, ratio, round_robin, stats
from manifoldlens import jacobian, local_data_matrix, trace_estimate
from manifoldlens.information import LocalDataMatrix
from manifoldlens.jacobian import select_strategy
from manifoldlens.models import Seed001CNN

SEED = 0
#: Where every section runs (``--device``; the reference methods too).
DEVICE = torch.device("cpu")


# --------------------------------------------------------------------------------------
# Helpers (shared ones in bench/_common.py)
# --------------------------------------------------------------------------------------


def projected_jacobian(n: int, c: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    """Random ``J_logp`` (n, C, d) with ``Σ_c p_c J_c = 0`` (as a real J_logp), and p (n, C)."""
    probs = torch.softmax(2.0 * torch.randn(n, c, generator=gen, dtype=torch.float64), dim=1)
    probs = probs.to(dtype)
    jac = torch.randn(n, c, d, generator=gen, dtype=dtype)
    mean = torch.einsum("nc,ncd->nd", probs, jac)  # p-weighted mean row, (n, d)
    jac.sub_(mean.unsqueeze(1))  # in place: no second (n, C, d) buffer
    return jac.to(DEVICE), probs.to(DEVICE)


# --------------------------------------------------------------------------------------
# 1. Jacobian engine
# --------------------------------------------------------------------------------------


def bench_jacobian_engine(repeats: int, warmup: int, batch: int, fwd_batch: int) -> dict:
    torch.manual_seed(SEED)
    model = Seed001CNN(in_shape=(1, 28, 28), num_classes=10).eval().to(DEVICE)
    x = torch.randn(batch, 1, 28, 28).to(DEVICE)
    x_fwd = x[:fwd_batch]
    num_classes = 10

    def reference() -> torch.Tensor:
        # seed 001: torch.autograd.functional.jacobian, one sample at a time
        def f(z: torch.Tensor) -> torch.Tensor:
            return F.log_softmax(model(z[None]), dim=1)[0]

        return torch.stack([torch.autograd.functional.jacobian(f, x[i]) for i in range(batch)])

    def bound() -> torch.Tensor:
        # the floor for the VJP route: one forward, then C backward passes, nothing else
        xr = x.detach().requires_grad_(True)
        logp = F.log_softmax(model(xr), dim=1)
        out = x.new_empty((batch, num_classes, *x.shape[1:]))
        for k in range(num_classes):
            (g,) = torch.autograd.grad(logp[:, k].sum(), xr, retain_graph=k < num_classes - 1)
            out[:, k] = g
        return out

    methods: dict[str, Callable[[], torch.Tensor]] = {
        "vjp": lambda: jacobian(model, x, output="log_softmax", strategy="vjp"),
        "vmap": lambda: jacobian(model, x, output="log_softmax", strategy="vmap"),
        "forward": lambda: jacobian(model, x_fwd, output="log_softmax", strategy="forward"),
        "auto": lambda: jacobian(model, x, output="log_softmax", strategy="auto"),
        "reference": reference,
        "bound": bound,
    }
    samples = {name: batch for name in methods}
    samples["forward"] = fwd_batch

    # correctness: every method against the seed-001 reference
    log("section 1: correctness check against the per-sample reference")
    ref = reference()
    check = {}
    for name, fn in methods.items():
        if name == "reference":
            continue
        out = fn().detach()
        r = ref[: out.shape[0]].flatten(1)
        per = (out.flatten(1) - r).abs().amax(1) / r.abs().amax(1)
        check[name] = {
            "max_rel_err": float(f"{float(per.max()):.3g}"),
            "median_rel_err": float(f"{float(per.median()):.3g}"),
            "samples_over_1e-4": int((per > 1e-4).sum()),
            "samples": int(per.numel()),
        }

    times = round_robin(methods, repeats, warmup, label="section 1")
    per_sample = {n: [t / samples[n] for t in ts] for n, ts in times.items()}
    per_batch = {n: [t * batch for t in ts] for n, ts in per_sample.items()}

    results = {}
    for name in methods:
        results[name] = {
            "ms_per_batch": stats(per_batch[name]),
            "ms_per_sample": stats(per_sample[name]),
            "samples_timed": samples[name],
            "scaled_from_sub_batch": samples[name] != batch,
            "raw_ms": [round(t, 2) for t in times[name]],
        }
    strategies = ("vjp", "vmap", "forward")
    best = min(strategies, key=lambda s: statistics.median(per_sample[s]))
    chosen = select_strategy(model, x)
    ratios = {
        "reference_over_auto": ratio(per_sample["reference"], per_sample["auto"], ">= 2"),
        "auto_over_best_strategy": {
            "best_strategy": best,
            **ratio(per_sample["auto"], per_sample[best], "<= 1.15"),
        },
        "vmap_over_vjp": ratio(per_sample["vmap"], per_sample["vjp"]),
        "forward_over_vjp": ratio(per_sample["forward"], per_sample["vjp"]),
        "auto_over_bound": ratio(per_sample["auto"], per_sample["bound"]),
        "reference_over_bound": ratio(per_sample["reference"], per_sample["bound"]),
    }
    return {
        "config": {
            "model": "Seed001CNN(in_shape=(1, 28, 28), num_classes=10), eval, random init",
            "input": "torch.randn(batch, 1, 28, 28)",
            "batch": batch,
            "d": 784,
            "C": num_classes,
            "dtype": "float32",
            "device": str(DEVICE),
            "output": "log_softmax",
            "repeats": repeats,
            "warmup_rounds": warmup,
            "forward_sub_batch": fwd_batch,
        },
        "notes": [
            f"'forward' (vmap(jacfwd), d = 784 JVPs per sample) is timed on the first "
            f"{fwd_batch} samples only and scaled per sample to the batch of {batch}",
            "'reference' = torch.autograd.functional.jacobian on "
            "lambda z: log_softmax(model(z[None]))[0], one sample at a time (seed 001)",
            "'bound' = one forward of log_softmax(model(x)), then C torch.autograd.grad "
            "calls with retain_graph, written inline (no checks, no chain rule)",
            "ratios: per-sample ms; 'met' is judged on the ratio of medians",
            "correctness: per-sample max |J - J_ref| / max |J_ref|; a sample can differ at "
            "the 1e-3..1e-1 level when a max-pool window holds a near-tie (gap ~1e-9) that "
            "float32 rounding of the batched vs the single-sample conv breaks differently "
            "(a kink of the network, not an engine error)",
        ],
        "auto_strategy": chosen,
        "best_strategy": best,
        "results": results,
        "ratios": ratios,
        "max_rel_err_vs_reference": check,
    }


# --------------------------------------------------------------------------------------
# 2. Spectrum of G at d = 784: C × C route against dense eigvalsh
# --------------------------------------------------------------------------------------


def bench_spectrum_small(repeats: int, warmup: int, n: int, c: int, d: int) -> dict:
    gen = torch.Generator().manual_seed(SEED + 1)
    per_dtype = {}
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        jac, probs = projected_jacobian(n, c, d, dtype, gen)
        g_dense = LocalDataMatrix.from_jacobian(jac, probs).dense(max_dim=d)

        def ccroute(jac=jac, probs=probs) -> torch.Tensor:
            return LocalDataMatrix.from_jacobian(jac, probs).eigenvalues

        def dense_with_forming(jac=jac, probs=probs) -> torch.Tensor:
            g = LocalDataMatrix.from_jacobian(jac, probs).dense(max_dim=d)
            return torch.linalg.eigvalsh(g)

        def dense_eigvalsh_only(g=g_dense) -> torch.Tensor:
            return torch.linalg.eigvalsh(g)

        methods = {
            "ccroute": ccroute,
            "dense_with_forming": dense_with_forming,
            "dense_eigvalsh_only": dense_eigvalsh_only,
        }
        # warm-up calls on 2 samples (LAPACK/MKL initialisation); no full warm-up round
        two = LocalDataMatrix.from_jacobian(jac[:2], probs[:2])
        two.eigenvalues  # noqa: B018
        torch.linalg.eigvalsh(two.dense(max_dim=d))
        # sub-millisecond C × C route: call it back to back until a timing lasts ≳ 20 ms
        t0 = time.perf_counter()
        for _ in range(5):
            ccroute()
        single = (time.perf_counter() - t0) / 5
        inner = {"ccroute": max(1, math.ceil(0.02 / max(single, 1e-7)))}
        times = round_robin(methods, repeats, warmup, inner=inner, label=f"section 2 {name}")

        # agreement of the two spectra
        ev_cc = ccroute()  # (n, C) descending
        ev_dense = torch.linalg.eigvalsh(g_dense).flip(-1)  # (n, d) descending
        top_cc, top_dense = ev_cc[:, : c - 1], ev_dense[:, : c - 1]
        rel_each = ((top_cc - top_dense).abs() / top_dense.abs()).max()
        lam_max = ev_dense[:, :1].abs()
        rel_to_max = ((top_cc - top_dense).abs() / lam_max).max()
        tail_dense = (ev_dense[:, c - 1 :].abs() / lam_max).max()
        tail_cc = (ev_cc[:, c - 1 :].abs() / lam_max).max()
        per_dtype[name] = {
            "ms_per_batch": {k: stats(v) for k, v in times.items()},
            "ms_per_sample_median": {
                k: round(statistics.median(v) / n, 5) for k, v in times.items()
            },
            "ccroute_calls_per_timing": inner["ccroute"],
            "ratios": {
                "dense_with_forming_over_ccroute": ratio(
                    times["dense_with_forming"], times["ccroute"], ">= 100"
                ),
                "dense_eigvalsh_only_over_ccroute": ratio(
                    times["dense_eigvalsh_only"], times["ccroute"], ">= 100"
                ),
            },
            "agreement": {
                "max_rel_err_top_C_minus_1": float(f"{float(rel_each):.3g}"),
                "max_abs_err_top_C_minus_1_over_lambda_max": float(f"{float(rel_to_max):.3g}"),
                "dense_max_rest_over_lambda_max": float(f"{float(tail_dense):.3g}"),
                "ccroute_Cth_over_lambda_max": float(f"{float(tail_cc):.3g}"),
            },
        }
    return {
        "config": {
            "n": n,
            "C": c,
            "d": d,
            "repeats": repeats,
            "warmup_rounds": warmup,
            "input": "random J_logp (n, C, d) with sum_c p_c J_c = 0 (p-weighted mean row "
            "subtracted), p = softmax(2*randn)",
        },
        "notes": [
            "ccroute = LocalDataMatrix.from_jacobian(J, p).eigenvalues (A = diag(sqrt p) J, "
            "C x C Gram A A^T, eigh), built afresh every call",
            "dense_with_forming = eigvalsh(LocalDataMatrix.from_jacobian(J, p).dense()); "
            "dense_eigvalsh_only = eigvalsh of the pre-formed (n, d, d) G",
            "agreement: top C-1 eigenvalues of the two routes, same dtype; the rest of the "
            "spectrum should vanish (rank G <= C - 1)",
            "repeats here are min(--repeats, 3) (a dense call takes seconds); no warm-up "
            "round, only a warm-up call of each method on 2 samples",
        ],
        "by_dtype": per_dtype,
    }


# --------------------------------------------------------------------------------------
# 3. Spectrum of G at d = 150528, C = 1000 (child process, for a clean ru_maxrss)
# --------------------------------------------------------------------------------------


def spectrum_large_child(repeats: int, c: int, d: int) -> dict:
    """Runs in a fresh interpreter: times ``.eigenvalues`` and measures its peak RSS."""
    gen = torch.Generator().manual_seed(SEED + 2)
    rss0, peak0, maxrss0 = common.rss_snapshot()
    t0 = time.perf_counter()
    jac, probs = projected_jacobian(1, c, d, torch.float32, gen)
    make_s = time.perf_counter() - t0
    rss_j, peak_j, maxrss_j = common.rss_snapshot()
    log(f"section 3: J (1, {c}, {d}) float32 made in {make_s:.1f}s")

    # the first call is timed too, but is also where the peak RSS of the route is measured
    was_reset = common.reset_peak_rss()
    t0 = time.perf_counter()
    g = LocalDataMatrix.from_jacobian(jac, probs)
    ev = g.eigenvalues
    first_ms = (time.perf_counter() - t0) * 1e3
    peak_1, maxrss_1 = common.peak_rss_mb(), common.ru_maxrss_mb()
    rank = int(g.rank()[0])
    del g
    log(f"section 3: first call {first_ms:.0f} ms")
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        LocalDataMatrix.from_jacobian(jac, probs).eigenvalues  # noqa: B018
        times.append((time.perf_counter() - t0) * 1e3)
        log(f"section 3: repeat {r + 1}/{repeats}: {times[-1]:.0f} ms")

    common.sync()
    row_sq = torch.linalg.vector_norm(jac[0], dim=1, dtype=torch.float64) ** 2  # (C,)
    trace = float((probs[0].double() * row_sq).sum())  # Tr G = sum_c p_c |J_c|^2
    j_mb = jac.numel() * jac.element_size() / 2**20
    if was_reset and rss_j is not None:
        base = rss_j
    else:
        base = max(v for v in (rss_j, peak_j) if v is not None)
    return {
        "config": {
            "n": 1,
            "C": c,
            "d": d,
            "dtype": "float32",
            "repeats": repeats,
            "input": "random J_logp (1, C, d) with sum_c p_c J_c = 0, p = softmax(2*randn)",
        },
        "ms_eigenvalues": stats(times),
        "ms_first_call": round(first_ms, 1),
        "J_MiB": round(j_mb, 1),
        "rss_MiB": {
            "peak_source": "VmHWM (/proc/self/status)"
            if common.vm_hwm_mb() is not None
            else "ru_maxrss",
            "peak_reset_before_call": was_reset,
            "before_J": None if rss0 is None else round(rss0, 1),
            "peak_before_J": round(peak0, 1),
            "after_J": None if rss_j is None else round(rss_j, 1),
            "peak_after_J": round(peak_j, 1),
            "peak_after_eigenvalues": round(peak_1, 1),
            "ru_maxrss_before_J": round(maxrss0, 1),
            "ru_maxrss_after_J": round(maxrss_j, 1),
            "ru_maxrss_after_eigenvalues": round(maxrss_1, 1),
        },
        "peak_rss_increase_MiB": {
            "eigenvalues_call_beyond_holding_J": round(peak_1 - base, 1),
            "total_J_plus_eigenvalues": round(peak_1 - (rss0 if rss0 is not None else peak0), 1),
        },
        "checks": {
            "num_eigenvalues": int(ev.shape[-1]),
            "numerical_rank_default_rtol": rank,
            "default_rtol": float(f"{10 * c * torch.finfo(torch.float32).eps:.3g}"),
            "lambda_C_minus_1_over_lambda_max": float(f"{float(ev[0, c - 2] / ev[0, 0]):.3g}"),
            "exact_rank": c - 1,
            "rank_note": "rank(G) = C-1 exactly for this J; the numerical rank at the library's "
            "default rtol (10*C*eps, relative to lambda_max) is lower because the "
            "eigenvalues scale with p_c, and p = softmax(2*randn) over 1000 "
            "classes spans several decades",
            "lambda_C_over_lambda_max": float(f"{float(ev[0, -1] / ev[0, 0]):.3g}"),
            "rel_err_sum_eigenvalues_vs_trace": float(
                f"{abs(float(ev.double().sum()) - trace) / trace:.3g}"
            ),
        },
        "dense": {
            "possible": False,
            "why": f"dense G is d x d = {d}^2 floats = {d * d * 4 / 1e9:.1f} GB in float32 "
            f"({d * d * 4 / 2**30:.1f} GiB), and eigh would cost O(d^3) ~ "
            f"{d**3:.1e} flops",
        },
    }


def bench_spectrum_large(threads: int, repeats: int, c: int, d: int) -> dict:
    args = ["--_child-large", "--threads", str(threads), "--repeats", str(repeats),
            "--_large-c", str(c), "--_large-d", str(d), "--device", str(DEVICE)]
    result = common.run_json_child(__file__, args)
    if "error" in result:
        return {**result, "command": [sys.executable, os.path.abspath(__file__), *args]}
    result["notes"] = [
        "run in a fresh child process (same threads) so that ru_maxrss measures this section only",
        "ms_eigenvalues = LocalDataMatrix.from_jacobian(J, p).eigenvalues built afresh per "
        "call: A = diag(sqrt p) J (a second C x d buffer), C x C Gram A A^T, eigh",
        "peak RSS from VmHWM in /proc/self/status, reset to the current RSS just before the "
        "measured call (echo 5 > /proc/self/clear_refs); resource.getrusage ru_maxrss is "
        "reported too (on Linux it inherits the parent's high-water mark across fork+exec, "
        "which is why this section runs first, while the parent is still small); current "
        "RSS from /proc/self/statm",
    ]
    return result


# --------------------------------------------------------------------------------------
# 4. G at C = 1000: all classes against the top 5, and the sampled trace
# --------------------------------------------------------------------------------------


def _mlp_c1000(d: int, c: int, logit_scale: float) -> torch.nn.Module:
    """A random MLP d–256–256–C (ReLU); the last layer × ``logit_scale`` makes p peaked."""
    torch.manual_seed(SEED + 3)
    model = torch.nn.Sequential(
        torch.nn.Linear(d, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, c),
    ).eval().to(DEVICE)
    with torch.no_grad():
        model[-1].weight.mul_(logit_scale)
    return model


def _top_k_accuracy(model: torch.nn.Module, x: torch.Tensor, k: int, samples: int) -> dict:
    """Dropped mass and trace errors against the exact trace (medians over the batch)."""
    exact = local_data_matrix(model, x).trace.double()
    top = local_data_matrix(model, x, top_k=k)
    est, err = trace_estimate(model, x, top_k=k, samples=samples, seed=SEED)

    def med(t: torch.Tensor) -> float:
        return float(f"{float(t.double().median()):.3g}")

    return {
        "dropped_mass_median": med(top.dropped_mass),
        "dropped_mass_max": float(f"{float(top.dropped_mass.max()):.3g}"),
        "top_k_trace_over_exact_median": med(top.trace.double() / exact),
        "estimate_rel_err_median": med((est.double() - exact).abs() / exact),
        "stderr_over_exact_median": med(err.double() / exact),
        "within_3_stderr_fraction": round(
            float(((est.double() - exact).abs() <= 3 * err.double()).double().mean()), 3),
    }


def bench_top_k(repeats: int, warmup: int, n: int, d: int, c: int, k: int,
                samples: int) -> dict:
    peaked = _mlp_c1000(d, c, logit_scale=50.0)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(SEED + 4)).to(DEVICE)
    methods = {
        "full": lambda: local_data_matrix(peaked, x).trace,
        "top_k": lambda: local_data_matrix(peaked, x, top_k=k).trace,
        "trace_estimate": lambda: trace_estimate(peaked, x, top_k=k, samples=samples),
    }
    times = round_robin(methods, repeats, warmup, label="top_k")
    return {
        "config": {
            "model": f"MLP {d}-256-256-{c} (ReLU), random init, eval, float32, {DEVICE}",
            "batch": n, "d": d, "C": c, "top_k": k, "samples": samples,
            "full_strategy": select_strategy(peaked, x),
            "backward_passes": {"full": c - 1, "top_k": k, "trace_estimate": k + samples},
            "repeats": repeats, "warmup_rounds": warmup,
        },
        "notes": [
            "full = local_data_matrix(model, x).trace (strategy auto: C - 1 VJPs, d >= C); "
            "top_k = the same with top_k=5; "
            "trace_estimate = exact over the top 5 plus 16 classes drawn from the tail",
            "timings on the 'peaked' model (last layer x50); the passes, hence the times, do "
            "not depend on the scale",
            "accuracy: 'diffuse' = random init (p spread over 1000 classes, the worst case), "
            "'peaked' = last layer x50 (most mass on a few classes, as after training)",
        ],
        "ms_per_batch": {name: stats(t) for name, t in times.items()},
        "ratios": {
            "full_over_top_k": ratio(times["full"], times["top_k"]),
            "full_over_trace_estimate": ratio(times["full"], times["trace_estimate"]),
        },
        "accuracy": {
            "peaked": _top_k_accuracy(peaked, x, k, samples),
            "diffuse": _top_k_accuracy(_mlp_c1000(d, c, logit_scale=1.0), x, k, samples),
        },
    }


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats, forward on 2 samples, section 3 shrunk to d = 3·64·64",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per section (default 5, --quick 2; section 3: ≤ 3)",
    )
    p.add_argument("--only", choices=("all", "top_k"), default="all",
                   help="run every section (default) or section 4 (top_k) alone")
    common.add_device(p)
    p.add_argument("--_child-large", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_large-c", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--_large-d", type=int, default=3 * 224 * 224, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    args = parse_args(argv)
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    large_repeats = min(repeats, 3)

    if args._child_large:
        print(json.dumps(spectrum_large_child(large_repeats, args._large_c, args._large_d)))
        return 0

    t_start = time.perf_counter()
    meta = {
        **common.run_metadata("bench/jacobian.py"),
        "quick": args.quick,
        "repeats": repeats,
        "seed": SEED,
        "device": str(DEVICE),
        "loadavg_at_start": common.loadavg(),
    }
    log(f"torch {torch.__version__}, {meta['threads']} threads, {meta['cpu_model']}")

    out: dict[str, object] = {"meta": meta}
    sections: dict[str, dict[str, object]] = {}
    meta["sections"] = sections
    run = functools.partial(common.run_section, sections)
    top_k_args = dict(n=64, d=1024, c=1000, k=5, samples=16)
    if args.only == "top_k":
        log("section 4: G at C = 1000, all classes against the top 5")
        out["top_k_c1000"] = run("top_k_c1000", lambda: bench_top_k(repeats, 1, **top_k_args))
        common.print_json(out, t_start)
        return 0

    # section 3 first, in a child spawned while this process is small (clean ru_maxrss)
    large_d = 3 * 64 * 64 if args.quick else 3 * 224 * 224
    log(f"section 3: spectrum of G at d = {large_d}, C = 1000 (child process, run first)")
    large = run(
        "spectrum_d150528",
        lambda: bench_spectrum_large(args.threads, large_repeats, c=1000, d=large_d),
    )
    log("section 1: Jacobian engine (Seed001CNN, batch 128)")
    out["jacobian_engine"] = run(
        "jacobian_engine",
        lambda: bench_jacobian_engine(repeats, 1, batch=128, fwd_batch=2 if args.quick else 8),
    )
    log("section 2: spectrum of G at d = 784")
    out["spectrum_d784"] = run(
        "spectrum_d784", lambda: bench_spectrum_small(min(repeats, 3), 0, n=32, c=10, d=784)
    )
    if args.quick:
        large["shrunk"] = f"--quick: d = 3*64*64 = {large_d} instead of 3*224*224 = 150528"
    out["spectrum_d150528"] = large
    log("section 4: G at C = 1000, all classes against the top 5")
    out["top_k_c1000"] = run("top_k_c1000", lambda: bench_top_k(repeats, 1, **top_k_args))

    eng, spec = out["jacobian_engine"], out["spectrum_d784"]
    out["summary"] = {
        "auto_strategy": eng["auto_strategy"],
        "reference_over_auto": eng["ratios"]["reference_over_auto"]["of_medians"],
        "auto_over_best_strategy": eng["ratios"]["auto_over_best_strategy"]["of_medians"],
        "vmap_over_vjp": eng["ratios"]["vmap_over_vjp"]["of_medians"],
        "dense_over_ccroute_d784": {
            k: v["ratios"]["dense_with_forming_over_ccroute"]["of_medians"]
            for k, v in spec["by_dtype"].items()
        },
        "large_eigenvalues_ms_median": large.get("ms_eigenvalues", {}).get("median"),
        "full_over_top_k_c1000": out["top_k_c1000"]["ratios"]["full_over_top_k"]["of_medians"],
        "targets_met": {
            "reference_over_auto >= 2": eng["ratios"]["reference_over_auto"]["met"],
            "auto_over_best_strategy <= 1.15": eng["ratios"]["auto_over_best_strategy"]["met"],
            "dense_over_ccroute >= 100 (float32, float64)": all(
                v["ratios"]["dense_with_forming_over_ccroute"]["met"]
                for v in spec["by_dtype"].values()
            ),
            "ccroute runs at large d": "ms_eigenvalues" in large,
        },
    }
    common.print_json(out, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
