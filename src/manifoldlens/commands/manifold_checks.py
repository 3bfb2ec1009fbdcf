"""``manifoldlens manifold theorem1|sanity``: the consequences Bordt et al. (2023) draw in §5,
and what the ``manifold`` commands share about manifold datasets.

1. ``theorem1`` (§5.2, Theorem 1, Figure 8): a two-layer ReLU network with 100 % test accuracy
   on a curve whose tangent space is e₁ on half of it and orthogonal to e₁ on the other half;
   its gradient lies in the tangent space on one half and orthogonal to it on the other;
2. ``sanity`` (§5.3, Adebayo et al. 2018): cascading randomisation of a classifier's layers,
   the rank correlation and SSIM of the attributions of the trained and the randomised model,
   beside their fraction in tangent space; the random attribution drawn inside the tangent
   space (Figure 13) has fraction 1 and fails the test.

References
----------
Bordt, S., Upadhyay, U., Akata, Z. & von Luxburg, U. (2023). The Manifold Hypothesis for
Gradient-Based Explanations. arXiv:2206.07387.

Adebayo, J., Gilmer, J., Muelly, M., Goodfellow, I., Hardt, M. & Kim, B. (2018). Sanity Checks
for Saliency Maps. NeurIPS. arXiv:1810.03292.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from .. import viz
from .._utils import tensor_sha256
from ..attribution import METHODS
from ..generative import ManifoldDataset, tangent_dim_summary, thin_tangent_message
from ..models import load_checkpoint
from ..runs import Run
from ..sanity import MODES, SIMILARITIES, randomizable_layers, sanity_check
from ..tangent import TangentSpace, mean_random_fraction_baseline, random_fraction_baseline
from ..theorem1 import simulate
from .common import add_command, add_common, names, option, progress

__all__ = [
    "add_subcommands",
    "load_manifold_dataset",
    "manifold_split_sha256",
    "run_manifold_sanity",
    "run_manifold_theorem1",
    "dim_label",
    "split_dims",
    "summary",
    "tangent_baseline",
    "verify_manifold_split",
]



def summary(f: torch.Tensor) -> dict[str, float]:
    """Mean, median, standard deviation and 5 / 95 % quantiles of ``f``; NaNs (undefined
    values) are left out and counted under ``"nan"`` when there are any."""
    f = f.double().flatten()
    bad = int(torch.isnan(f).sum())
    f = f[~torch.isnan(f)]  # e.g. undefined principal angles, rank correlations of flat maps
    if f.numel() == 0:
        return {"mean": math.nan, "median": math.nan, "std": math.nan, "q05": math.nan,
                "q95": math.nan, "nan": bad}
    out = {"mean": float(f.mean()), "median": float(f.median()),
           "std": float(f.std()) if f.numel() > 1 else 0.0,
           "q05": float(torch.quantile(f, 0.05)), "q95": float(torch.quantile(f, 0.95))}
    return {**out, "nan": bad} if bad else out


def dim_label(k: int, dims: dict[str, Any]) -> str:
    """How a figure names the tangent dimension: ``k = 4``, or with the dimensions the
    images' tangent spaces really have (``dims``: :func:`tangent_dim_summary`) when thinner:
    ``k = 4, tangent dim 2–3``."""
    lo, hi = dims["min"], dims["max"]
    if lo is None or (lo == k and hi == k):
        return f"k = {k}"
    return f"k = {k}, tangent dim {lo}" + (f"–{hi}" if hi != lo else "")


def tangent_baseline(ts: TangentSpace) -> tuple[float, dict[str, Any], str]:
    """The random baseline of tangent spaces ``ts`` from each point's own dimension, not from
    the k rows of their bases (a decoder of lower rank spans fewer), the dimensions'
    summary and their label in figures (:func:`dim_label`)."""
    k = ts.basis.shape[1]
    dims = tangent_dim_summary(ts.dim.cpu(), k)
    return ts.random_baseline(), dims, dim_label(k, dims)


def split_dims(run: Run, splits: dict[str, ManifoldDataset], k: int
               ) -> tuple[dict[str, Any], float, float, str]:
    """What ``manifold dataset`` reports of its splits' tangent dimensions: each split's
    summary (as its ``info["tangent_dim"]``), over all their images the random baseline and
    √(m/d) from each image's own dimension m (those of k when every image has k
    directions), and the figures' label. Warns — on stderr, in the run log and as the run's
    ``warning`` — when some images have fewer than k directions."""
    each = {name: ds.tangent_dims() for name, ds in splits.items()}
    both = torch.cat(list(each.values()))
    d = math.prod(next(iter(splits.values())).shape)
    dims: dict[str, Any] = {name: tangent_dim_summary(m, k) for name, m in each.items()}
    warning = thin_tangent_message(dims, {name: len(ds) for name, ds in splits.items()}, k)
    if warning:
        run.metrics["warning"] = warning
        run.log(warning=warning)
        print(f"warning: {warning}", file=sys.stderr)
    return (dims, mean_random_fraction_baseline(both, d),
            math.sqrt(float(both.double().mean()) / d), dim_label(k, tangent_dim_summary(both, k)))


def load_manifold_dataset(directory: str | Path, split: str) -> ManifoldDataset:
    """``<directory>/<split>.json`` written by ``manifold dataset``."""
    return ManifoldDataset.load(Path(directory) / split)


def manifold_split_sha256(ds: ManifoldDataset) -> str:
    """The identity of a manifold dataset's split: sha256 of images, labels, tangent bases."""
    return tensor_sha256(ds.images, ds.labels, ds.tangent)


def verify_manifold_split(checkpoint: str, meta: dict[str, Any], ds: ManifoldDataset,
                          split: str, dataset_dir: str) -> None:
    """Refuse a classifier trained on another manifold dataset than ``dataset_dir`` (e.g. one
    regenerated in the same directory): its tangent spaces would not be the model's data's."""
    recorded = (meta.get("dataset_sha256") or {}).get(split)
    if recorded is not None and recorded != manifold_split_sha256(ds):
        raise ValueError(f"{checkpoint} was trained on another manifold dataset than "
                         f"{dataset_dir} (the {split} split's sha256 differs); give the "
                         "dataset it was trained on")


# ---------------------------------------------------------------------------------------------
# Theorem 1
# ---------------------------------------------------------------------------------------------


def run_manifold_theorem1(run: Run, *, d: int = 10, n_train: int = 2000, n_test: int = 2000,
                          eps: float = 0.01, width: int = 256, steps: int = 1000,
                          lr: float = 1e-2, fraction_every: int = 50, threshold: float = 0.5,
                          progress: bool = True, device: str = "cpu", seed: int = 0
                          ) -> dict[str, Any]:
    """Theorem 1, simulated (Figure 8): a two-layer ReLU network of ``width`` neurons trained
    with full-batch Adam on the logistic loss for ``steps`` steps on ``n_train`` points of the
    curve 𝓜 ⊂ ℝ^d of Appendix C (|x₁| ≥ ``eps``, label sign x₁); on ``n_test`` fresh points:
    test accuracy, the fraction of its gradient in tangent space, its histogram, and the
    same for the maximum-margin network ν* of the proof (fractions exactly 0 and 1)."""
    res = simulate(d=d, n_train=n_train, n_test=n_test, eps=eps, width=width, steps=steps,
                   lr=lr, fraction_every=fraction_every, threshold=threshold, seed=seed,
                   run=run, progress=progress, device=device)
    test = res.test
    run.save_figure("theorem1", viz.plot_theorem1(
        test.x, res.fractions, test.along_first, accuracy=res.metrics["test_accuracy"],
        threshold=threshold))
    base = random_fraction_baseline(1, d)
    run.save_figure("fraction_over_training", viz.plot_fraction_over_training(
        res.records, baseline=base, title="Theorem 1: fraction of the gradient in tangent "
        "space during training, test points by the kind of segment (mean, 5–95 %)"))
    run.save_json("fraction_over_training", res.records)
    run.save_arrays("theorem1", x=test.x, labels=test.labels, tangent=test.tangent,
                    along_first=test.along_first, fractions=res.fractions,
                    max_margin_fractions=res.max_margin_fractions)
    counts, edges = torch.histogram(res.fractions.double().cpu(), bins=10, range=(0.0, 1.0))
    along = test.along_first
    run.metrics.update({**res.metrics, "d": d, "eps": eps, "width": width, "steps": steps,
                        "random_baseline": base,
                        "fraction_along_first": summary(res.fractions[along]),
                        "fraction_orthogonal_segments": summary(res.fractions[~along]),
                        "histogram": {"edges": edges.tolist(),
                                      "counts": [int(c) for c in counts]}})
    return run.metrics


# ---------------------------------------------------------------------------------------------
# sanity checks
# ---------------------------------------------------------------------------------------------


def _check_sanity(methods: tuple[str, ...], n: int, mode: str, figure_images: int) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; methods: {list(METHODS)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 1 <= figure_images <= n:
        raise ValueError(f"figure_images must be in [1, n = {n}], got {figure_images}")


def run_manifold_sanity(run: Run, dataset_dir: str, checkpoint: str, *,
                        methods: tuple[str, ...] = METHODS, n: int = 200,
                        mode: str = "cascading", layers: tuple[str, ...] | None = None,
                        figure_images: int = 4, batch_size: int = 64, device: str = "cpu",
                        seed: int = 0) -> dict[str, Any]:
    """Adebayo et al.'s model-parameter randomisation test on ``n`` test images (drawn with
    ``seed``) of a manifold dataset for the classifier ``checkpoint``, beside Bordt et al.'s
    fraction in tangent space (§5.3). The layers (default: every layer with parameters) are
    re-initialised top first, ``cascading`` (each stage keeps the previous ones random) or
    ``independent`` (one layer at a time); at every stage each method explains the class the
    trained model predicts, compared with the trained model's attribution by Spearman's ρ of
    |a| (Adebayo et al.'s "ABS" rank correlation), of the signed a, and SSIM of |a|/max|a|.
    Controls that ignore the model: ``random_tangent`` (a random vector of each tangent
    space, Figure 13) and ``random`` (isotropic). Writes ``results.json`` and four figures."""
    _check_sanity(tuple(methods), n, mode, figure_images)
    full = load_manifold_dataset(dataset_dir, "test")
    if n > len(full):
        raise ValueError(f"n={n} exceeds the {len(full)} test images of {dataset_dir}")
    model, meta = load_checkpoint(checkpoint, map_location=device)
    verify_manifold_split(checkpoint, meta, full, "test", dataset_dir)
    known = randomizable_layers(model)
    if layers is not None and [name for name in layers if name not in known]:
        raise ValueError(f"layers {list(layers)}: the model's layers with parameters, top "
                         f"first, are {known}")
    model.eval()
    pick = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))[:n]
    te = full.subset(pick.sort().values)  # n test images drawn with the seed, in their order
    ts = te.tangent_space()
    res = sanity_check(model, te.images, ts, methods=methods, labels=te.labels, layers=layers,
                       mode=mode,
                       keep=figure_images, batch_size=batch_size, seed=seed)
    k, d = te.tangent.shape[1], math.prod(te.shape)
    base, dims, _ = tangent_baseline(ts)
    curves = {m: {**res.similarity[m], "fraction": res.fraction[m]} for m in res.fraction}
    results = {"k": k, "d": d, "tangent_dim": dims, "random_baseline": base, "n": n,
               "mode": mode,
               "test_indices": pick.sort().values.tolist(),
               "stages": res.stages, "accuracy": res.accuracy,
               "similarity_of": "the trained model's attribution; spearman_abs ranks |a|, "
                                "spearman the signed a, ssim compares |a|/max|a| (L = 1)",
               "methods": {m: {s: [summary(v) for v in c[s]] for s in (*SIMILARITIES,
                                                                       "fraction")}
                           for m, c in curves.items()}}
    run.save_json("results", results)
    run.save_figure("cascading_randomization", viz.plot_cascading_randomization(
        res.stages, curves, baseline=base, mode=mode))
    labels = [te.classes[int(c)] for c in te.labels[:figure_images]]
    for i in range(figure_images):
        run.save_figure(f"randomization_maps_{i}", viz.plot_randomization_maps(
            te.images[i], {m: v[:, i] for m, v in res.maps.items()}, res.stages,
            label=f"class {labels[i]}", mode=mode))
    run.save_figure("necessary_not_sufficient", viz.plot_necessary_not_sufficient(
        {m: f[0] for m, f in res.fraction.items()},
        {m: c["spearman_abs"][-1] for m, c in res.similarity.items()}, baseline=base,
        measure="Spearman ρ of |attribution|"))
    shown = [m for m in ("random_tangent", "gradient") if m in res.maps]
    few = te.subset(slice(0, figure_images)).tangent_space()
    parts = {m: {"attribution": res.maps[m][0], "tangent": few.project(res.maps[m][0]),
                 "orthogonal": few.orthogonal(res.maps[m][0])} for m in shown}
    run.save_figure("random_tangent_examples", viz.plot_attribution_decomposition(
        te.images[:figure_images], parts, labels=labels, title="A random attribution drawn in "
        "the tangent space (Bordt et al. §5.3, Figure 13) beside the gradient: perceptually "
        "aligned, yet unrelated to the model"))
    run.metrics.update({"k": k, "d": d, "random_baseline": base, "stages": res.stages,
                        "accuracy_trained": res.accuracy[0] if res.accuracy else None,
                        "accuracy_randomised": res.accuracy[-1] if res.accuracy else None,
                        "final": {m: {"fraction_trained": results["methods"][m]["fraction"][0]
                                      ["mean"],
                                      **{s: results["methods"][m][s][-1]["mean"]
                                         for s in SIMILARITIES}}
                                  for m in curves}, "tangent_dim": dims})
    return run.metrics


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def _theorem1(args: argparse.Namespace, run: Run) -> None:
    run_manifold_theorem1(run, d=args.d, n_train=args.n_train, n_test=args.n_test,
                          eps=args.eps, width=args.width, steps=args.steps, lr=args.lr,
                          fraction_every=args.fraction_every, threshold=args.threshold,
                          progress=progress(args), device=args.device, seed=args.seed)


def _sanity(args: argparse.Namespace, run: Run) -> None:
    run_manifold_sanity(run, args.dataset, args.checkpoint, methods=args.methods, n=args.n,
                        mode=args.mode, layers=args.layers, figure_images=args.figure_images,
                        batch_size=args.batch_size, device=args.device, seed=args.seed)


def _add_theorem1(sub: Any) -> None:
    fn = run_manifold_theorem1
    p = add_command(sub, "theorem1", _theorem1, "Theorem 1 simulated: perfect accuracy, "
                    "gradients in or orthogonal to the tangent space (Figure 8)")
    add_common(p, fn)
    option(p, "--d", fn, type=int, low=2, help="dimension of the ambient space")
    option(p, "--n-train", fn, type=int, help="training points on the curve")
    option(p, "--n-test", fn, type=int, help="test points on the curve")
    option(p, "--eps", fn, type=float, high=0.49,
           help="half-width of the empty slab |x₁| < eps around the decision boundary")
    option(p, "--width", fn, type=int, help="neurons of the two-layer ReLU network")
    option(p, "--steps", fn, type=int, help="full-batch Adam steps")
    option(p, "--lr", fn, type=float, help="Adam learning rate")
    option(p, "--fraction-every", fn, type=int,
           help="steps between measurements of the fraction in tangent space")
    option(p, "--threshold", fn, type=float, high=0.99,
           help="fraction above which a gradient counts as in the tangent space")


def _add_sanity(sub: Any) -> None:
    fn = run_manifold_sanity
    p = add_command(sub, "sanity", _sanity, "randomisation sanity checks beside the fraction "
                    "in tangent space (§5.3)")
    p.add_argument("dataset", help="run directory of `manifold dataset`")
    p.add_argument("checkpoint", help="the classifier (<run>/model.json of `manifold train`)")
    add_common(p, fn)
    option(p, "--methods", fn, type=names, help="comma-separated attribution methods")
    option(p, "--n", fn, type=int, help="test images")
    option(p, "--mode", fn, choices=list(MODES),
           help="randomise the layers cumulatively from the top, or one at a time")
    option(p, "--layers", fn, type=names, help="comma-separated layers to randomise, top "
           "first (default: every layer with parameters)")
    option(p, "--figure-images", fn, type=int, help="images drawn in the figures")
    option(p, "--batch-size", fn, type=int, help="images per attribution pass")
    p.set_defaults(check=lambda a: _check_sanity(tuple(a.methods), a.n, a.mode,
                                                 a.figure_images))


def add_subcommands(msub: Any) -> None:
    """Register ``theorem1`` and ``sanity`` on the ``manifold`` group's subparsers."""
    _add_theorem1(msub)
    _add_sanity(msub)
