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
from ..report import Section, percent, quantity, write_report
from ..runs import Run
from ..tangent import TangentSpace, principal_angles
from .classifier import run_gram, run_spectrum, run_train
from .common import add_command, add_common, interpolation, option, pick, pick_pairs, progress

__all__ = ["add_arguments", "report_sections", "run_demo"]

#: the classifier's training settings (Grementieri & Fioresi's optimiser, with momentum)
_TRAINING: dict[str, Any] = {"arch": "small_cnn", "batch_size": 60, "lr": 0.01,
                             "optimizer": "sgd", "momentum": 0.9}


def run_demo(run: Run, *, steps: int = 1500, progress: bool = True) -> dict[str, Any]:
    """The whole story on the embedded digits: train (the optimiser settings of Grementieri &
    Fioresi) while following Tr G, then G's spectra over the test split, then the Jacobian
    correlation matrix, paths along and across the leaves, a flow and the data manifold,
    and an HTML report."""
    train_metrics = run_train(
        run, data="digits", steps=steps, trace_every=25, eval_every=100,
        checkpoint_every=500, progress=progress, **_TRAINING,
    )
    model, _ = load_checkpoint(run.path / "model.json")
    test = load_dataset("digits", "test")
    run_spectrum(run, model, test, progress=progress)
    run_gram(run, model, test, progress=progress)
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
    n_train = len(load_dataset("digits", "train"))
    write_report(run.path, _TITLE, report_sections(run.metrics), intro=_intro(n_train, len(test)))
    return run.metrics


# ---------------------------------------------------------------------------------------------
# the experiments
# ---------------------------------------------------------------------------------------------


def _demo_leaf(run: Run, model: nn.Module, test: ImageDataset, progress: bool) -> dict:
    """Horizontal paths, leaf crossings and the involutivity check on the demo model."""
    si, ti = pick_pairs(test, 3, seed=1)
    src, tgt = test.images[si], test.images[ti]
    tol = 0.5
    hp = horizontal_path(model, src, tgt, step_size=0.05, max_steps=600, tol=tol,
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
        "horizontal_tol": tol,
        "horizontal_reached": int(hp.reached.sum()),
        "horizontal_final_distance_median": float(hp.distances[-1].median()),
        "horizontal_start_distance_median": float(hp.distances[0].median()),
        "across_points": len(idx),
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
    base = ts.random_baseline()  # from each image's tangent dimension (6 unless thinner)
    run.save_figure("demo_decomposition", viz.plot_attribution_decomposition(
        ds.images[:8], parts, labels=[test.classes[int(c)] for c in ds.labels[:8]]))
    run.save_figure("demo_fraction", viz.plot_fraction_by_method(
        {m: f.numpy() for m, f in fractions.items()}, baseline=base))
    angles = principal_angles(TangentSpace.from_model(model, ds.images), ts)
    run.save_figure("demo_angles", viz.plot_principal_angles(angles))
    return {"latent_dim": 6, "tangent_dim_min": int(ts.dim.min()), "random_baseline": base,
            "mean_fraction": {m: float(f.mean()) for m, f in fractions.items()},
            "median_smallest_angle_deg": float(angles[:, 0].rad2deg().median()),
            "reconstruction_mse": float(((ds.images - test.images) ** 2).mean())}


# ---------------------------------------------------------------------------------------------
# the report, one function a section (the text is HTML)
# ---------------------------------------------------------------------------------------------

_TITLE = "manifoldlens demo — digits through the eyes of a classifier"
_METHOD_NAMES = {"gradient": "gradient", "input_x_gradient": "Input × Gradient",
                 "integrated_gradients": "Integrated Gradients", "smoothgrad": "SmoothGrad"}
_STOPS = {"max_steps": "at the step limit", "stalled": "stalled",
          "nonfinite": "on a non-finite value", "reached": "at the target"}


def _intro(n_train: int, n_test: int) -> str:
    t = _TRAINING
    return (
        f"A small CNN is trained on scikit-learn's 8×8 digits ({n_train} train / {n_test} "
        f"test) with {t['optimizer'].upper()}, batch {t['batch_size']}, learning rate "
        f"{t['lr']} (momentum {t['momentum']}). The local data matrix "
        "G(x) = Σ_c p_c ∇log p_c ∇log p_cᵀ (Grementieri &amp; Fioresi, eq. 6) and the "
        "Jacobian correlation matrix M = 𝒥𝒥ᵀ (Shin, eq. 6) are computed for the test split. "
        "Every number and every statement about a result below comes from this run."
    )


def report_sections(metrics: dict[str, Any]) -> list[Section]:
    """The demo report's sections from a demo run's metrics (``run.json``'s ``metrics``):
    each sentence about a result is computed from them, each table rounded, with units."""
    c = metrics["spectrum"]["num_classes"]
    return [_training_section(metrics["train"], c), _spectrum_section(metrics["spectrum"]),
            _leaf_section(metrics["leaf"]), _gram_section(metrics["gram"]),
            _flow_section(metrics["flow"]), _manifold_section(metrics["manifold"])]


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


def _training_section(train: dict[str, Any], num_classes: int) -> Section:
    acc, steps = train["test_accuracy"], train["steps"]
    chance = percent(1 / num_classes, 0)
    verdict = f"Test accuracy {percent(acc)} after {steps} steps (chance: {chance})."
    if acc < 0.9:
        verdict = (f"Test accuracy only {percent(acc)} after {steps} steps (chance: {chance}): "
                   "the classifier has not learned the digits well, and what follows is the "
                   "geometry of a weak model.")
    return Section(
        "Training and the trace of G",
        f"{verdict} The mean trace of G on a probe batch of test images (blue) and its "
        "moving average (red), as in Grementieri &amp; Fioresi (2022), Figure 2. "
        f"{trace_story(train)}",
        [("trace_of_g.png", "Mean trace (soft rank) and numerical rank of G during "
          "training."), ("training.png", "Test loss and accuracy.")],
        {"test accuracy": percent(acc),
         "test loss (cross-entropy)": quantity(train.get("test_loss"), "nats"),
         "training steps": steps,
         "Tr G at the first probe (smoothed)": quantity(train.get("trace_start")),
         "Tr G at its peak (smoothed)": f"{quantity(train.get('trace_peak_ema'))} at step "
                                        f"{train.get('trace_peak_step')}",
         "Tr G at the last probe (smoothed)": f"{quantity(train.get('trace_end_ema'))} at step "
                                              f"{train.get('trace_last_step')}"},
    )


def _spectrum_section(spec: dict[str, Any]) -> Section:
    c, n, top = spec["num_classes"], spec["n"], spec["rank_max"]
    counts = {int(k): v for k, v in spec["rank_counts"].items()}
    mode = max(counts, key=lambda r: counts[r])
    bound = (f"at the bound rank G ≤ C − 1 = {c - 1}" if top == c - 1 else
             f"below the bound rank G ≤ C − 1 = {c - 1}" if top < c - 1 else
             f"above the bound rank G ≤ C − 1 = {c - 1}: the rank tolerance is too loose")
    mean, median = spec["trace_mean"], spec["trace_median"]
    if mean > 10 * median:
        spread = (f"Half the points have Tr G(x) below {quantity(median)} while the mean is "
                  f"{quantity(mean)}: a few points, where the prediction reacts most to small "
                  "changes of the input, carry most of the trace.")
    else:
        spread = (f"Tr G(x) has median {quantity(median)} and mean {quantity(mean)}: the "
                  "prediction's sensitivity is spread fairly evenly over the split.")
    return Section(
        "The local data matrix over the test split",
        f"The largest numerical rank of G(x) over the {n} test points is {top}, {bound} "
        f"(Proposition 2.1). The most common rank is {mode} ({counts[mode]} points); "
        f"{percent(spec['full_rank_fraction'])} of the points reach the full rank {c - 1}. "
        + spread,
        [("trace_histogram.png", "Tr G(x) over the test split, by true class."),
         ("spectra.png", "Normalised eigenvalues of G(x): median and 10–90 % band."),
         ("rank_counts.png", "Numerical rank of G(x)."),
         ("eigenvectors.png", "Test images and the top eigenvectors of G(x): "
          "the directions that change the prediction fastest.")],
        {"test points": n, "classes C": c, "accuracy on these points": percent(spec["accuracy"]),
         "Tr G(x), mean": quantity(mean), "Tr G(x), median": quantity(median),
         "points by numerical rank": " · ".join(f"rank {r}: {counts[r]}" for r in sorted(counts)),
         f"points at full rank {c - 1}": percent(spec["full_rank_fraction"]),
         "largest rank": top},
    )


def _leaf_section(leaf: dict[str, Any]) -> Section:
    status = list(leaf["horizontal_status"])
    n, reached, tol = len(status), leaf["horizontal_reached"], leaf.get("horizontal_tol", 0.5)
    d0, d1 = leaf["horizontal_start_distance_median"], leaf["horizontal_final_distance_median"]
    stops = ", ".join(f"{status.count(s)} {_STOPS.get(s, s)}" for s in dict.fromkeys(status))
    closer = (f"the median distance to the target fell from {d0:.2f} to {d1:.2f}, "
              f"{percent(1 - d1 / d0, 0)} of the way" if d1 < d0 else
              f"the median distance to the target did not shrink ({d0:.2f} → {d1:.2f})")
    m = leaf.get("across_points", 4)
    kept = round(leaf["across_prediction_kept"] * m)
    across = (f"kept the prediction of all {m} points" if kept == m else
              f"kept the prediction of only {kept} of {m} points")
    lo, hi = leaf["involutivity_median"], leaf["involutivity_max"]
    frobenius = ("zero up to float64 rounding, as Theorem 3.1 says for a ReLU network"
                 if hi < 1e-6 else "not zero: the distribution is not involutive at these "
                 "points, or the network is not piecewise linear")
    return Section(
        "Along and across the leaves",
        "Horizontal paths (Grementieri &amp; Fioresi 2022, Algorithm 1) move a test digit "
        "towards another while staying on its leaf (every step in D_x); beside each, the "
        f"straight line between the same endpoints. {reached} of {n} paths came within "
        f"tol = {tol} of their target (Euclidean distance, pixels in [0, 1]); {closer}; "
        f"they stopped: {stops}. Leaf crossings, along a fixed random direction projected on "
        f"ker G, {across} while moving them {leaf['across_final_distance_mean']:.1f} from "
        f"where they started (mean Euclidean distance). Involutivity residual (Theorem 3.1, "
        "float64): "
        f"median {quantity(lo)}, max {quantity(hi)}, {frobenius}.",
        [("demo_horizontal.png", "Horizontal paths (rows 'path') and straight lines "
          "(rows 'line'); predicted class and probability under each frame."),
         ("demo_across.png", f"Across the leaves, on ker G: the prediction held for {kept} "
          f"of {m} points."),
         ("demo_across_curves.png", "Distance from the start and confidence while "
          "crossing leaves.")],
        {"horizontal paths within tol of the target": f"{reached} of {n} (tol = {tol})",
         "how the paths stopped": stops,
         "median distance to the target, start → end": f"{d0:.2f} → {d1:.2f}",
         "leaf crossings keeping their prediction": f"{kept} of {m}",
         "mean distance travelled across the leaves": quantity(
             leaf["across_final_distance_mean"]),
         "involutivity residual, median / max": f"{quantity(lo)} / {quantity(hi)}"},
    )


def _gram_section(gram: dict[str, Any]) -> Section:
    wc, bc = gram["within_class_cosine"], gram["between_class_cosine"]
    if wc > 2 * max(bc, 0.0) and wc > 0.1:
        cluster = "the model's input sensitivities cluster by class (blocks on the diagonal)"
    else:
        cluster = "the model's input sensitivities show no clear class structure"
    return Section(
        "The Jacobian correlation matrix",
        "M_ij = Σ_c ⟨∇p_c(x_i), ∇p_c(x_j)⟩ for the test split, ordered by class. Two test "
        f"points of the same class have Jacobians with mean cosine {wc:.2f}, two of different "
        f"classes {bc:.2f}: {cluster}. A point's nearest neighbours under M share its label "
        f"{percent(gram['neighbor_label_agreement'], 0)} of the time, and the 10 largest "
        f"eigenvalues hold {percent(gram['top10_eigen_share'], 0)} of M's trace.",
        [("gram.png", "M ordered by class, and its class-block means."),
         ("gram_cosine.png", "The same as cosines of the Jacobians."),
         ("gram_spectrum.png", "Spectrum of M.")],
        {"test points": gram["n"], "Jacobians of": f"{gram['output']} outputs",
         "mean of M, within / between classes": f"{quantity(gram['within_class_mean'])} / "
                                                f"{quantity(gram['between_class_mean'])}",
         "mean cosine, within / between classes": f"{wc:.2f} / {bc:.2f}",
         "kernel–target alignment": quantity(gram["kernel_target_alignment"]),
         "nearest neighbours with the same label": percent(gram["neighbor_label_agreement"]),
         "share of M's trace in its 10 largest eigenvalues": percent(gram["top10_eigen_share"])},
    )


def _flow_section(flow: dict[str, Any]) -> Section:
    integral = flow["density_integral"]
    if abs(integral - 1) <= 0.02:
        mass = "as a density should"
    elif integral < 1:
        mass = f"so {percent(1 - integral)} of its mass lies outside the box"
    else:
        mass = "more than 1: the grid is too coarse to integrate this density"
    return Section(
        "The data's own density: a normalizing flow",
        "A RealNVP flow (affine couplings, Dinh et al. 2017) trained by maximum likelihood "
        f"on two moons for {flow['steps']} steps reaches a test negative log-likelihood of "
        f"{flow['test_nll']:.2f} nats per point. Its density is exact: "
        "log p(x) = log p_Z(f(x)) + log|det ∂f/∂x|, and integrates to "
        f"{integral:.3f} over the plotted box, {mass}. {volume_story(flow)}",
        [("flow_density.png", "Training data, the learned density and samples."),
         ("flow_volume_change.png", "A latent grid mapped to data space, and "
          "log|det ∂z/∂x|.")],
        {"training steps": flow["steps"],
         "test negative log-likelihood": quantity(flow["test_nll"], "nats per point"),
         "density integral over the plotted box": f"{integral:.3f}",
         "mean log|det ∂z/∂x| on the test points": quantity(flow["logdet_on_data"], "nats"),
         "mean log|det ∂z/∂x| over the box": quantity(flow["logdet_box"], "nats")},
    )


def _manifold_section(manifold: dict[str, Any]) -> Section:
    k, base = manifold["latent_dim"], manifold["random_baseline"]
    fractions = {_METHOD_NAMES.get(m, m): v for m, v in manifold["mean_fraction"].items()}
    above = [m for m, v in fractions.items() if v > base]
    ratios = [v / base for v in fractions.values()]
    if len(above) == len(fractions):
        lean = (f"and every method lies above it ({min(ratios):.1f}–{max(ratios):.1f}× the "
                "baseline): the attributions lean towards the data manifold")
    elif not above:
        lean = ("and no method lies above it: the attributions are no closer to the manifold "
                "than noise")
    else:
        lean = f"and only {', '.join(above)} {'lies' if len(above) == 1 else 'lie'} above it"
    angle = manifold["median_smallest_angle_deg"]
    low = manifold.get("tangent_dim_min", k)
    thin = (f"; the decoder spans as few as {low} directions at some images, and the baseline "
            "counts each image's own" if low < k else "")
    return Section(
        "Explanations against the data manifold",
        f"An autoencoder with a k = {k} dimensional code learns the digits' manifold (mean "
        f"squared reconstruction error {quantity(manifold['reconstruction_mse'])} per pixel, "
        "pixels in [0, 1]); the test digits are replaced by their reconstructions, which lie "
        "on it exactly, with the tangent space spanned by the decoder's Jacobian (Bordt et "
        "al., the reconstructive approach). Each attribution of the classifier splits into "
        "its part in the tangent space and the rest. Mean fraction in the tangent space: "
        + ", ".join(f"{m} {v:.2f}" for m, v in fractions.items())
        + f"; a random direction gets {base:.2f} (≈ √(k/d), d = 64{thin}), {lean}. The "
        "classifier's own D_x (from G, rank ≤ C − 1) against the data's tangent space: "
        f"median smallest principal angle {angle:.0f}° (0° would mean they share a "
        "direction, 90° that they are orthogonal).",
        [("demo_decomposition.png", viz.decomposition_caption(  # the order of parts drawn
            ("gradient", "input_x_gradient"), "test digits replaced by their reconstructions")),
         ("demo_fraction.png", "Fraction of each attribution in the tangent space."),
         ("demo_angles.png", "Principal angles between D_x and the tangent space.")],
        {"code dimension k": k,
         "reconstruction error (mean squared, per pixel)": quantity(
             manifold["reconstruction_mse"]),
         **{f"mean fraction in the tangent space: {m}": f"{v:.2f} ({v / base:.1f}× "
            "random)" for m, v in fractions.items()},
         "random direction, ≈ √(k/d)": f"{base:.2f}",
         "median smallest principal angle, D_x vs tangent space": quantity(angle, "°", 2)},
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
