"""Horizontal-path and leaf-crossing steps: batched manifoldlens vs the seed-001 reference method.

The reference method (lucagrementieri/model-manifold, ``model_manifold/inspect.py``) advances
one point at a time: every step it computes the Jacobian of log p with
``torch.autograd.functional.jacobian``, projects onto D_x by least squares (horizontal step) or
onto ker G through a complete d × d QR and least squares on its d − C + 1 kernel columns
(kernel step), clamps to the data domain and evaluates the model once more for the record.
Ours advances ``--pairs`` points together through :func:`manifoldlens.horizontal_path` and
:func:`manifoldlens.leaf_crossing_path`, also clamping and recording every step. Same model
(the seed-001 CNN), same inputs, on ``--device`` (default CPU).
Methods are timed round-robin; the JSON reports ms per pair-step and the ratios.

    python bench/paths.py [--pairs 32] [--steps 5] [--ref-pairs 4] [--repeats 3] [--threads 2]
                          [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys

import torch

from _common import make_logger, print_json, ratio, round_robin, run_metadata, stats
from manifoldlens import horizontal_path, leaf_crossing_path
from manifoldlens.models import Seed001CNN


def _reference_walk(model, x, direction_of, projection, steps, alpha=0.1, clamp=(0.0, 1.0)):
    """One point at a time, as the reference code does each step: the Jacobian of log p
    (``torch.autograd.functional.jacobian``), columns normalised, a projection, a normalised
    step, the domain clamp, and one more forward pass for the recorded probabilities."""
    net = torch.nn.Sequential(model, torch.nn.LogSoftmax(dim=1))  # reference nets end so
    points, probs = [x], []
    for _ in range(steps):
        j = torch.autograd.functional.jacobian(net, x.unsqueeze(0)).squeeze(0)
        with torch.no_grad():
            j = torch.nn.functional.normalize(j.reshape(j.shape[0], -1).T, dim=0)  # (d, C)
            v = projection(j, direction_of(x).flatten())
            v = torch.nn.functional.normalize(v, dim=-1).reshape(x.shape)
            x = (x + alpha * v).clamp(*clamp)
            points.append(x)
            probs.append(torch.exp(net(x.unsqueeze(0))))
    return x


def project_tangent(jac, direction):
    """Reference: least squares onto the columns of the Jacobian (the row space of J)."""
    coef = torch.linalg.lstsq(jac, direction.unsqueeze(1)).solution
    return (jac @ coef)[:, 0]


def project_kernel(jac, direction):
    """Reference: a complete d × d QR, then least squares onto its last d − C + 1 columns."""
    basis = torch.linalg.qr(jac, mode="complete").Q[:, jac.shape[1] - 1 :]
    coef = torch.linalg.lstsq(basis, direction.unsqueeze(1)).solution
    return (basis @ coef)[:, 0]


def reference_horizontal(model, src, tgt, steps):
    return _reference_walk(model, src, lambda x: tgt - x, project_tangent, steps)


def reference_kernel(model, x0, r, steps):
    return _reference_walk(model, x0, lambda x: r, project_kernel, steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--ref-pairs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda ...)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = Seed001CNN((1, 28, 28), 10).eval().to(dev)
    g = torch.Generator().manual_seed(1)
    src = torch.rand(args.pairs, 1, 28, 28, generator=g).to(dev)
    tgt = torch.rand(args.pairs, 1, 28, 28, generator=g).to(dev)
    r = torch.randn(args.pairs, 1, 28, 28, generator=g).to(dev)
    s, k = args.steps, args.ref_pairs

    methods = {
        "ours_horizontal": (lambda: horizontal_path(model, src, tgt, max_steps=s, tol=0.0,
                                                    clamp=(0.0, 1.0)), args.pairs * s),
        "ref_horizontal": (lambda: [reference_horizontal(model, src[i], tgt[i], s)
                                    for i in range(k)], k * s),
        "ours_kernel": (lambda: leaf_crossing_path(model, src, direction=r, steps=s,
                                                   clamp=(0.0, 1.0)), args.pairs * s),
        "ref_kernel": (lambda: [reference_kernel(model, src[i], r[i], s) for i in range(k)],
                       k * s),
    }
    calls = round_robin({name: fn for name, (fn, _) in methods.items()}, args.repeats,
                        warmup=1, log=make_logger("paths"))
    times = {name: [t / methods[name][1] for t in ts] for name, ts in calls.items()}

    def summary(v: list[float]) -> dict[str, object]:
        st = stats(v, 3)
        return {"median": st["median"], "min": st["min"], "raw": [round(t, 3) for t in v]}

    out = {
        "meta": {
            **run_metadata("bench/paths.py", machine=False), "device": args.device,
            "model": "Seed001CNN (1x28x28, C=10), random init, eval, float32",
            "pairs": args.pairs, "steps_per_round": s, "ref_pairs": k, "repeats": args.repeats,
        },
        "ms_per_pair_step": {n: summary(v) for n, v in times.items()},
        "ratios": {
            "horizontal_ref_over_ours": {
                **ratio(times["ref_horizontal"], times["ours_horizontal"]), "target": ">= 2.5"},
            "kernel_ref_over_ours": {
                **ratio(times["ref_kernel"], times["ours_kernel"]), "target": ">= 4"},
        },
    }
    print_json(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
