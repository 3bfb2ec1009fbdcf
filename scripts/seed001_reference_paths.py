"""Horizontal paths with the seed-001 reference code's projection, on a manifoldlens checkpoint.

The reference code (lucagrementieri/model-manifold, ``model_manifold/inspect.py``, ``path`` with
``project_tangent``) builds each step's direction as a least-squares fit of ``target − x`` by
the columns of the float32 Jacobian of log p, each column scaled to unit length, and then steps
``α v/‖v‖``, clamps to the data domain and stops below the threshold. In exact arithmetic that
is the projection onto D_x = span{∇log p_c}, which has dimension at most C − 1 because
Σ_c p_c ∇log p_c = 0. In float32 the C columns are not exactly dependent: where one class has
p close to 1, its column (tiny, then scaled to unit length) is mostly rounding error, and the
least-squares fit may use all C columns — a C-dimensional space, D_x plus one direction of
ker G. This script walks the same pairs as ``manifoldlens leaf horizontal`` (same seed, same
pair kind) with that projection, and measures how much of each step leaves D_x (measured
against manifoldlens's basis of D_x from the same Jacobian).

``--driver gelsy`` is what ``torch.linalg.lstsq`` uses on a CPU (rank decided by a pivoted QR
with rcond = eps·max(d, C)); ``--driver gels`` is the only driver on a GPU (assumes full rank:
always all C columns). The reference's networks run on the GPU when there is one.

    python scripts/seed001_reference_paths.py CHECKPOINT [--n 8] [--steps 1500]
        [--step-size 0.03081] [--tol 0.3081] [--driver gelsy|gels] [--pair-kind KIND]
        [--seed 0] [--out DIR]

Writes ``reference_paths.json`` (and prints it): reached pairs, steps, distances, the number of
columns the fit used (gelsy reports it), the part of the steps outside D_x; with ``--out`` also
the recorded points (``reference_paths.npz``) and each path as a strip beside the straight line
(``reference_strips.png``, as the paper's Figure 4).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from manifoldlens import viz
from manifoldlens.commands.common import dataset_for, interpolation
from manifoldlens.commands.leaf import PAIR_KINDS, _pick_pairs  # registers the normalised CNN
from manifoldlens.information import LocalDataMatrix
from manifoldlens.models import load_checkpoint


def log_prob_jacobian(model, x):
    """Rows ∇_x log p_c (n, C, d), one backward pass of e_c through log-softmax per class,
    float32, as ``torch.autograd.functional.jacobian`` of a log-softmax network computes them."""
    x = x.detach().requires_grad_(True)
    logp = torch.log_softmax(model(x), dim=1)
    rows = [torch.autograd.grad(logp[:, c].sum(), x, retain_graph=c < logp.shape[1] - 1)[0]
            for c in range(logp.shape[1])]
    return torch.stack(rows, 1).reshape(len(x), logp.shape[1], -1), logp.detach().exp()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--step-size", type=float, default=0.1 * 0.3081)
    p.add_argument("--tol", type=float, default=0.3081)
    p.add_argument("--driver", choices=["gelsy", "gels"], default="gelsy")
    p.add_argument("--pair-kind", choices=list(PAIR_KINDS), default="different-class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record-every", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t0 = time.time()
    model, meta = load_checkpoint(args.checkpoint)
    model.eval()
    ds = dataset_for(meta, None, "test")
    si, ti = _pick_pairs(ds, args.n, args.seed, args.pair_kind)
    x, tgt = ds.images[si].clone(), ds.images[ti]
    n = len(si)
    dist0 = (tgt - x).reshape(n, -1).norm(dim=1)
    running = dist0 >= args.tol
    steps = torch.zeros(n, dtype=torch.long)
    length = torch.zeros(n, dtype=torch.float64)
    off_disp = torch.zeros(n, dtype=torch.float64)  # Σ ‖P_ker Δ‖ over the steps
    cols, offs, curve = [], [], []
    with torch.no_grad():
        p0 = torch.softmax(model(x), 1)
    rec_steps, rec_points, rec_probs = [0], [x.clone()], [p0]
    for t in range(args.steps):
        idx = running.nonzero()[:, 0]
        if len(idx) == 0:
            break
        xa = x[idx]
        jac, probs = log_prob_jacobian(model, xa)
        with torch.no_grad():
            a = jac / jac.norm(dim=2, keepdim=True).clamp_min(1e-30)  # unit columns
            a = a.mT  # (n, d, C)
            b = (tgt[idx] - xa).reshape(len(idx), -1, 1)
            fit = torch.linalg.lstsq(a, b, driver=args.driver)
            v = (a @ fit.solution)[..., 0]
            if args.driver == "gelsy":
                cols.append(fit.rank.double().mean().item())
            exact = LocalDataMatrix(jac.double(), probs.double())  # D_x from the same rows
            vd = v.double().reshape(len(idx), *x.shape[1:])
            off = exact.project_kernel(vd).reshape(len(idx), -1).norm(dim=1) / \
                v.double().norm(dim=1)
            offs.append(off.mean().item())
            new = (xa + args.step_size * (v / v.norm(dim=1, keepdim=True)).reshape(xa.shape))
            new = new.clamp(0.0, 1.0)
            delta = (new - xa).double()
            length[idx] += delta.reshape(len(idx), -1).norm(dim=1)
            off_disp[idx] += exact.project_kernel(delta).reshape(len(idx), -1).norm(dim=1)
            x[idx] = new
            steps[idx] += 1
            d = (tgt - x).reshape(n, -1).norm(dim=1)
            running &= d >= args.tol
            if (t + 1) % args.record_every == 0 or not running.any() or t + 1 == args.steps:
                rec_steps.append(t + 1)
                rec_points.append(x.clone())
                rec_probs.append(torch.softmax(model(x), 1))
            if t % args.record_every == 0:
                curve.append({"step": t + 1, "median_distance": d.median().item(),
                              "mean_off_fraction": off.mean().item()})
    d = (tgt - x).reshape(n, -1).norm(dim=1)
    reached = d < args.tol
    out = {
        "checkpoint": args.checkpoint, "driver": args.driver, "pairs": n,
        "pair_kind": args.pair_kind, "seed": args.seed, "step_size": args.step_size,
        "tol": args.tol, "max_steps": args.steps, "sources": si.tolist(),
        "targets": ti.tolist(), "reached": int(reached.sum()),
        "steps": steps.tolist(),
        "steps_to_reach_median": (steps[reached].double().median().item()
                                  if reached.any() else None),
        "start_distance_median": dist0.median().item(),
        "final_distance_median": d.median().item(), "final_distance": d.tolist(),
        "mean_columns_used": (sum(cols) / len(cols)) if cols else None,
        "columns_used_first_step": cols[0] if cols else None,
        "mean_off_leaf_fraction_of_v": sum(offs) / len(offs) if offs else None,
        "off_leaf_fraction_of_v_first_step": offs[0] if offs else None,
        "off_leaf_share_of_path": (off_disp / length.clamp_min(1e-300)).tolist(),
        "path_length": length.tolist(), "curve": curve,
        "wall_time_s": round(time.time() - t0, 1),
    }
    text = json.dumps(out, indent=1)
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "reference_paths.json").write_text(text + "\n")
        res = SimpleNamespace(points=torch.stack(rec_points), probs=torch.stack(rec_probs),
                              record_steps=torch.tensor(rec_steps))
        np.savez_compressed(out_dir / "reference_paths.npz", sources=si.numpy(),
                            targets=ti.numpy(), points=res.points.numpy(),
                            probs=res.probs.numpy(), record_steps=res.record_steps.numpy())
        lin = interpolation(model, ds.images[si], tgt, 33, "logits")
        rows = []
        for i in range(min(n, 4)):
            rows += [(res, i, f"path {i} ({args.driver})"), (lin, i, f"line {i}")]
        viz.plot_path_grid(rows, frames=9, classes=ds.classes,
                           title=f"Reference-code horizontal paths ({args.driver})"
                           ).savefig(out_dir / "reference_strips.png", dpi=100)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
