"""``manifoldlens demo``: the whole story on scikit-learn's 8×8 digits, with an HTML report.

A classifier trained while following the trace of its local data matrix G (Grementieri &
Fioresi 2022), G's spectra and the Jacobian correlation matrix of Shin over the test split,
paths along and across the leaves, a RealNVP flow on two moons (Dinh et al. 2017), and the
classifier's attributions against an autoencoder's manifold of the digits (Bordt et al. 2023).

References
----------
Grementieri, L. & Fioresi, R. (2022). Model-centric data manifold: the data through the eyes
of the model. arXiv:2104.13289.
Shin. Correlation of the Jacobian and Probability Flow.
Dinh, L., Sohl-Dickstein, J. & Bengio, S. (2017). Density estimation using Real NVP.
arXiv:1605.08803.
Bordt, S., Upadhyay, U., Akata, Z. & von Luxburg, U. (2023). The Manifold Hypothesis for
Gradient-Based Explanations. arXiv:2206.07387.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import nn

from .. import viz
from ..attribution import METHODS, explain
from ..data import ImageDataset, load_dataset, make_toy_2d
from ..flows.models import RealNVP
from ..flows.training import train_flow
from ..foliation import horizontal_path, involutivity_residual, leaf_crossing_path
from ..generative import AutoEncoder, reconstructive_dataset, train_generative
from ..models import load_checkpoint
from ..report import Section, write_report
from ..runs import Run
from ..tangent import TangentSpace, principal_angles, random_fraction_baseline
from .classifier import run_gram, run_spectrum, run_train
from .common import add_command, add_common, interpolation, option, pick, pick_pairs, progress

__all__ = ["add_arguments", "run_demo"]


def run_demo(run: Run, *, steps: int = 1500, progress: bool = True) -> dict[str, Any]:
    """The whole story on the embedded digits: train (the optimiser settings of Grementieri &
    Fioresi) while following Tr G, then G's spectra over the test split, then the Jacobian
    correlation matrix, paths along and across the leaves, a flow and the data manifold,
    and an HTML report."""
    train_metrics = run_train(
        run, data="digits", arch="small_cnn", steps=steps, batch_size=60, lr=0.01,
        optimizer="sgd", momentum=0.9, trace_every=25, eval_every=100,
        checkpoint_every=500, progress=progress,
    )
    model, meta = load_checkpoint(run.path / "model.json")
    test = load_dataset("digits", "test")
    spec = run_spectrum(run, model, test, progress=progress)
    gram = run_gram(run, model, test, progress=progress)
    run.metrics.update({"train": {k: v for k, v in train_metrics.items()
                                  if k not in ("spectrum", "gram")}})
    leaf = _demo_leaf(run, model, test, progress)
    run.metrics["leaf"] = leaf
    run.checkpoint_state()
    flow = _demo_flow(run, progress)
    run.metrics["flow"] = flow
    run.checkpoint_state()
    manifold = _demo_manifold(run, model, progress)
    run.metrics["manifold"] = manifold
    run.checkpoint_state()
    write_report(
        run.path,
        "manifoldlens demo — digits through the eyes of a classifier",
        intro=_INTRO,
        sections=[
            _training_section(meta, train_metrics),
            _spectrum_section(spec),
            _leaf_section(leaf),
            _gram_section(gram),
            _flow_section(flow),
            _manifold_section(manifold),
        ],
    )
    return run.metrics


# ---------------------------------------------------------------------------------------------
# the experiments
# ---------------------------------------------------------------------------------------------


def _demo_leaf(run: Run, model: nn.Module, test: ImageDataset, progress: bool) -> dict:
    """Horizontal paths, leaf crossings and the involutivity check on the demo model."""
    si, ti = pick_pairs(test, 3, seed=1)
    src, tgt = test.images[si], test.images[ti]
    hp = horizontal_path(model, src, tgt, step_size=0.05, max_steps=600, tol=0.5,
                         record_every=5, clamp=(0.0, 1.0), progress=progress)
    lin = interpolation(model, src, tgt, 33, "logits")
    rows = [r for i in range(3) for r in ((hp, i, f"path {i}"), (lin, i, f"line {i}"))]
    run.save_figure("demo_horizontal", viz.plot_path_grid(
        rows, frames=9, classes=test.classes, title="Horizontal paths vs straight lines"))
    idx = pick(test, 4, seed=2)
    lc = leaf_crossing_path(model, test.images[idx], steps=300, step_size=0.05, seed=0,
                            record_every=5, progress=progress)
    run.save_figure("demo_across", viz.plot_path_grid(
        [(lc, i, f"test #{int(idx[i])}") for i in range(4)], frames=9, classes=test.classes,
        title="Across the leaves (on ker G)"))
    run.save_figure("demo_across_curves", viz.plot_curves(lc.record_steps, {
        "distance from start": lc.distances,
        "max probability": lc.probs.max(-1).values}))
    inv = involutivity_residual(model.double(), test.images[idx].double())
    model.float()
    r = inv.residual[torch.isfinite(inv.residual)]
    return {
        "horizontal_status": hp.status,
        "horizontal_reached": int(hp.reached.sum()),
        "horizontal_final_distance_median": float(hp.distances[-1].median()),
        "horizontal_start_distance_median": float(hp.distances[0].median()),
        "across_prediction_kept": float(
            (lc.probs[-1].argmax(-1) == lc.probs[0].argmax(-1)).double().mean()),
        "across_final_distance_mean": float(lc.distances[-1].mean()),
        "involutivity_median": float(r.median()),
        "involutivity_max": float(r.max()),
    }


def _demo_flow(run: Run, progress: bool, steps: int = 1000) -> dict[str, Any]:
    """A RealNVP on two moons: the density, its integral, the volume change and samples."""
    torch.manual_seed(0)
    x = make_toy_2d("two-moons", 8000, seed=0)
    test = make_toy_2d("two-moons", 4000, seed=1)
    model = RealNVP((2,), couplings=6, hidden=64)
    res = train_flow(model, x, test_data=test, n_bins=None, steps=steps, batch_size=256,
                     lr=2e-3, warmup_steps=50, progress=progress)
    samples = model.sample(4000, generator=torch.Generator().manual_seed(0))
    fig = viz.flow_density_2d(model, test, samples=samples)
    run.save_figure("flow_density", fig)
    run.save_figure("flow_volume_change", viz.flow_volume_change(model, test))
    lo, hi = test.min(0).values - 0.5, test.max(0).values + 0.5
    box = lo + (hi - lo) * torch.rand(4000, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        on_data, in_box = model(test)[1].mean(), model(box)[1].mean()
    return {"steps": res.step, "test_nll": res.metrics["test_nll"],
            "density_integral": float(fig.density_integral),
            "logdet_on_data": float(on_data), "logdet_box": float(in_box)}


def _demo_manifold(run: Run, model: nn.Module, progress: bool) -> dict[str, Any]:
    """Bordt et al. (2023) in small: an autoencoder's manifold of the digits, the
    classifier's attributions on it split into tangent and orthogonal parts."""
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    ae = AutoEncoder((1, 8, 8), latent_dim=6, network="mlp", hidden=128)
    train_generative(ae, train.images, steps=800, batch_size=64, lr=2e-3, progress=progress)
    ds = reconstructive_dataset(ae.eval(), test.images, test.labels, classes=test.classes)
    ts = ds.tangent_space()
    options = {"integrated_gradients": {"multiply_by_inputs": True},
               "smoothgrad": {"samples": 25, "seed": 0}}
    parts, fractions = {}, {}
    for method in METHODS:
        a = explain(model, ds.images, method, **options.get(method, {}))
        fractions[method] = ts.fraction(a)
        if method in ("gradient", "input_x_gradient"):
            parts[method] = {"attribution": a[:8], "tangent": ts.project(a)[:8],
                             "orthogonal": ts.orthogonal(a)[:8]}
    base = random_fraction_baseline(6, 64)
    run.save_figure("demo_decomposition", viz.plot_attribution_decomposition(
        ds.images[:8], parts, labels=[test.classes[int(c)] for c in ds.labels[:8]]))
    run.save_figure("demo_fraction", viz.plot_fraction_by_method(
        {m: f.numpy() for m, f in fractions.items()}, baseline=base))
    angles = principal_angles(TangentSpace.from_model(model, ds.images), ts)
    run.save_figure("demo_angles", viz.plot_principal_angles(angles))
    return {"latent_dim": 6, "random_baseline": base,
            "mean_fraction": {m: float(f.mean()) for m, f in fractions.items()},
            "median_smallest_angle_deg": float(angles[:, 0].rad2deg().median()),
            "reconstruction_mse": float(((ds.images - test.images) ** 2).mean())}


# ---------------------------------------------------------------------------------------------
# the report, one function a section (the text is HTML)
# ---------------------------------------------------------------------------------------------

_INTRO = (
    "A small CNN is trained on scikit-learn's 8×8 digits (1437 train / 360 test) with "
    "SGD, batch 60, learning rate 0.01 (momentum 0.9). The local data matrix "
    "G(x) = Σ_c p_c ∇log p_c ∇log p_cᵀ (Grementieri &amp; Fioresi, eq. 6) and the "
    "Jacobian correlation matrix M = 𝒥𝒥ᵀ (Shin, eq. 6) are computed for the test split."
)


def trace_story(m: dict[str, Any]) -> str:
    """What this run's trace curve did, in words computed from its numbers."""
    start, peak, end = m.get("trace_start"), m.get("trace_peak_ema"), m.get("trace_end_ema")
    if not all(isinstance(v, float) and math.isfinite(v) for v in (start, peak, end)):
        return "The trace was not recorded."
    rise = (f"The smoothed trace went from {start:.2g} to a peak of {peak:.2g} at step "
            f"{m.get('trace_peak_step')}")
    if end < 0.9 * peak:
        return (f"{rise}, then fell to {end:.2g} by step {m.get('trace_last_step')} "
                f"({100 * (1 - end / peak):.0f} % below its peak): the rise and fall of the "
                "paper's curve.")
    return (f"{rise} and had not fallen by step {m.get('trace_last_step')} (it ends at "
            f"{end:.2g}, {100 * end / peak:.0f} % of the peak): this run does not reach the "
            "drop of the paper's curve.")


def volume_story(flow: dict[str, Any]) -> str:
    """Where the flow expands and contracts volume, from this run's log-determinants."""
    on, box = flow["logdet_on_data"], flow["logdet_box"]
    where = "on the data" if on > box else "away from the data"
    return (f"The mean log|det ∂z/∂x| is {on:+.2f} on the test points and {box:+.2f} over "
            f"the whole box: the map from data to latent space stretches volume most "
            f"{where} (|det ∂z/∂x| is the factor by which p(x) = p_Z(z)·|det ∂z/∂x| scales the "
            "base density at each point).")


def _training_section(meta: dict[str, Any], train_metrics: dict[str, Any]) -> Section:
    return Section(
        "Training and the trace of G",
        f"Test accuracy {meta['metrics'].get('test_accuracy', float('nan')):.3f} after "
        f"{meta['step']} steps. The mean trace of G on a probe batch of 60 test images "
        "(blue) and its moving average (red), as in Grementieri &amp; Fioresi (2022), "
        f"Figure 2. {trace_story(train_metrics)}",
        [("trace_of_g.png", "Mean trace (soft rank) and numerical rank of G during "
          "training."), ("training.png", "Test loss and accuracy.")],
        {k: v for k, v in train_metrics.items() if isinstance(v, (int, float))},
    )


def _spectrum_section(spec: dict[str, Any]) -> Section:
    c = spec["num_classes"]
    return Section(
        "The local data matrix over the test split",
        f"rank G ≤ C − 1 = {c - 1} (Proposition 2.1). Share of test points at full "
        f"rank {c - 1}: {spec['full_rank_fraction']:.3f}.",
        [("trace_histogram.png", "Tr G(x) over the test split, by true class."),
         ("spectra.png", "Normalised eigenvalues of G(x): median and 10–90 % band."),
         ("rank_counts.png", "Numerical rank of G(x)."),
         ("eigenvectors.png", "Test images and the top eigenvectors of G(x): "
          "the directions that change the prediction fastest.")],
        spec,
    )


def _leaf_section(leaf: dict[str, Any]) -> Section:
    return Section(
        "Along and across the leaves",
        "Horizontal paths (Grementieri &amp; Fioresi 2022, Algorithm 1) move a test digit "
        "towards another while staying on its leaf (every step in D_x); beside each, the "
        "straight line between the same endpoints. A path that cannot reach its target ends "
        "hovering, within one step, around the point of its leaf nearest the target "
        f"({leaf['horizontal_reached']} of 3 reached tol = 0.5 here). Leaf crossings "
        "move along a fixed random "
        "direction projected on ker G: the prediction stays put while noise grows. "
        f"Involutivity residual of this ReLU network (Theorem 3.1): median "
        f"{leaf['involutivity_median']:.1e}, max {leaf['involutivity_max']:.1e} "
        "(float64).",
        [("demo_horizontal.png", "Horizontal paths (rows 'path') and straight lines "
          "(rows 'line'); predicted class and probability under each frame."),
         ("demo_across.png", "Across the leaves: noise grows, the prediction holds."),
         ("demo_across_curves.png", "Distance from the start and confidence while "
          "crossing leaves.")],
        leaf,
    )


def _gram_section(gram: dict[str, Any]) -> Section:
    return Section(
        "The Jacobian correlation matrix",
        "M_ij = Σ_c ⟨∇p_c(x_i), ∇p_c(x_j)⟩ for the test split, ordered by class. "
        "Block structure means that the model's input sensitivities cluster by class.",
        [("gram.png", "M ordered by class, and its class-block means."),
         ("gram_cosine.png", "The same as cosines of the Jacobians."),
         ("gram_spectrum.png", "Spectrum of M.")],
        gram,
    )


def _flow_section(flow: dict[str, Any]) -> Section:
    return Section(
        "The data's own density: a normalizing flow",
        "A RealNVP flow (affine couplings, Dinh et al. 2017) trained by maximum likelihood "
        f"on two moons ({flow['steps']} steps). Its density is exact: "
        "log p(x) = log p_Z(f(x)) + log|det ∂f/∂x|, and integrates to "
        f"{flow['density_integral']:.3f} over the plotted box. {volume_story(flow)}",
        [("flow_density.png", "Training data, the learned density and samples."),
         ("flow_volume_change.png", "A latent grid mapped to data space, and "
          "log|det ∂z/∂x|.")],
        flow,
    )


def _manifold_section(manifold: dict[str, Any]) -> Section:
    return Section(
        "Explanations against the data manifold",
        "An autoencoder with a k = 6 dimensional code learns the digits' manifold; the "
        "test digits are replaced by their reconstructions, which lie on it exactly, "
        "with the tangent space spanned by the decoder's Jacobian (Bordt et al., the "
        "reconstructive approach). Each attribution of the classifier splits into its "
        "part in the tangent space and the rest. Mean fraction in the tangent space: "
        + ", ".join(f"{m} {v:.2f}" for m, v in manifold["mean_fraction"].items())
        + f"; a random direction gets {manifold['random_baseline']:.2f} "
        "(≈ √(k/d), d = 64). The classifier's own D_x (rank ≤ 9, from G) against the "
        f"data's tangent space: median smallest principal angle "
        f"{manifold['median_smallest_angle_deg']:.0f}°.",
        [("demo_decomposition.png", "Attributions (rows 1, 4), their parts in the "
          "tangent space and orthogonal to it."),
         ("demo_fraction.png", "Fraction of each attribution in the tangent space."),
         ("demo_angles.png", "Principal angles between D_x and the tangent space.")],
        manifold,
    )


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace, run: Run) -> None:
    run_demo(run, steps=args.steps, progress=progress(args))


def add_arguments(sub: Any) -> None:
    """Register ``demo`` on the top-level ``sub``-parsers."""
    p = add_command(sub, "demo", _demo, "the whole story on the embedded digits, with a report")
    add_common(p, run_demo)
    option(p, "--steps", run_demo, type=int, help="training steps of the classifier")
