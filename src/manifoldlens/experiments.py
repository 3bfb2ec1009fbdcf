"""The commands' work, as library functions over a :class:`~manifoldlens.runs.Run`.

Each function takes a run directory, a model and data, computes, writes figures, arrays and
metrics into the run, and returns the metrics. The CLI only parses arguments and calls these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import viz
from .callbacks import TraceOfG
from .data import ImageDataset, load_dataset
from .information import data_matrix_statistics, local_data_matrix
from .jacobian import (
    class_correlation,
    cosine_gram,
    gram_spectrum,
    jacobian_gram,
    jacobian_neighbors,
    kernel_target_alignment,
)
from .models import create_model, load_checkpoint
from .report import Section, write_report
from .runs import Run
from .training import RunOptions, train_classifier

__all__ = [
    "dataset_for",
    "run_demo",
    "run_gram",
    "run_leaf_across",
    "run_leaf_horizontal",
    "run_leaf_involutivity",
    "run_leaf_noisy",
    "run_spectrum",
    "run_train",
]


def run_train(
    run: Run,
    *,
    data: str = "digits",
    root: str | None = None,
    arch: str = "small_cnn",
    arch_options: dict[str, Any] | None = None,
    limit: int | None = None,
    trace_every: int = 50,
    probe_size: int = 60,
    resume: bool = False,
    progress: bool = True,
    **train_options: Any,
) -> dict[str, Any]:
    """Train a classifier on a dataset with the trace-of-G callback (seed 001 Figure 2).

    ``train_options`` go to :func:`~manifoldlens.training.train_classifier`. The probe batch
    is the first ``probe_size`` test images. Writes ``trace_of_g.png``, ``training.png``,
    checkpoints under ``checkpoints/`` and ``model.safetensors``/``model.json``.
    """
    from .models import save_checkpoint

    train = load_dataset(data, "train", root)
    test = load_dataset(data, "test", root)
    if limit:
        train = train.subset(limit, seed=train_options.get("seed", 0))
    seed = train_options.get("seed", 0)
    torch.manual_seed(seed)
    model = create_model(arch, train.shape, train.num_classes, **(arch_options or {}))
    cb = TraceOfG(test.images[:probe_size], every=trace_every)
    options = RunOptions(run, checkpoint_every=train_options.pop("checkpoint_every", None),
                         keep_checkpoints=train_options.pop("keep_checkpoints", ()),
                         resume=resume,
                         metadata={"data": train.name, "classes": train.classes})
    result = train_classifier(model, train, test_data=test, callbacks=[cb], run=options,
                              progress=progress, **train_options)
    if result.history:
        run.save_figure("training", viz.plot_training(result.history))
    if cb.records:
        run.save_figure("trace_of_g", viz.plot_trace_of_g(cb.records))
    save_checkpoint(run.path / "model", result.model, metadata={
        "data": train.name, "classes": train.classes, "step": result.step,
        "metrics": result.metrics,
    })
    start = cb.records[0]["ema_trace"] if cb.records else float("nan")
    run.metrics.update({
        "trace_start": start,
        "trace_end_ema": cb.records[-1]["ema_trace"] if cb.records else float("nan"),
        "trace_peak_ema": max((r["ema_trace"] for r in cb.records), default=float("nan")),
    })
    return run.metrics


def dataset_for(meta: dict[str, Any], data: str | None, split: str, root: str | None,
                limit: int | None, seed: int = 0) -> ImageDataset:
    """The split of the dataset a checkpoint was trained on (or ``data``), optionally a
    stratified subset of ``limit`` points."""
    name = data or meta.get("data")
    if name is None:
        raise ValueError("the checkpoint does not record its dataset: pass --data")
    ds = load_dataset(name, split, root)
    return ds.subset(limit, seed=seed) if limit and limit < len(ds) else ds


def run_spectrum(
    run: Run,
    model: nn.Module,
    dataset: ImageDataset,
    *,
    model_output: str = "logits",
    batch_size: int = 256,
    n_examples: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Statistics of G(x) over a split: trace histogram, spectra, rank counts, examples."""
    x, y = dataset.images, dataset.labels
    stats = data_matrix_statistics(model, x, model_output=model_output, batch_size=batch_size,
                                   progress=progress)
    c = stats["probs"].shape[1]
    rank = stats["rank"]
    run.save_arrays("spectrum", labels=y, **stats)
    run.save_figure("trace_histogram",
                    viz.plot_trace_histogram(stats["trace"], y, dataset.classes))
    run.save_figure("spectra", viz.plot_spectra(stats["eigenvalues"]))
    run.save_figure("rank_counts", viz.plot_rank_counts(rank, c))
    ex = torch.linspace(0, len(x) - 1, n_examples).long()
    G = local_data_matrix(model, x[ex], model_output=model_output)
    run.save_figure("eigenvectors", viz.plot_eigenvectors(
        x[ex], G.eigenvalues, G.eigenvectors, G.probs, dataset.classes))
    counts = torch.bincount(rank, minlength=c + 1).tolist()
    metrics = {
        "n": len(x),
        "num_classes": c,
        "accuracy": float((stats["probs"].argmax(1) == y).double().mean()),
        "trace_mean": float(stats["trace"].mean()),
        "trace_median": float(stats["trace"].median()),
        "rank_counts": {str(k): v for k, v in enumerate(counts) if v},
        "full_rank_fraction": float((rank == c - 1).double().mean()),
        "rank_max": int(rank.max()),
    }
    run.metrics.update({"spectrum": metrics})
    return metrics


def run_gram(
    run: Run,
    model: nn.Module,
    dataset: ImageDataset,
    *,
    output: str = "softmax",
    model_output: str = "logits",
    normalize: bool = False,
    batch_size: int = 256,
    low_memory: bool | None = None,
    neighbors: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """The Jacobian correlation matrix of seed 000 over a split, with its class structure."""
    x, y = dataset.images, dataset.labels
    out = run.file("gram.npy")
    m = jacobian_gram(model, x, output=output, model_output=model_output, normalize=normalize,
                      batch_size=batch_size, low_memory=low_memory, out=out, progress=progress)
    ev = gram_spectrum(m)
    cc = class_correlation(m, y)
    nb = jacobian_neighbors(m, k=min(neighbors, len(x) - 1), labels=y, normalized=normalize)
    cos = m if normalize else cosine_gram(m)
    cc_cos = class_correlation(cos, y)
    run.save_arrays("gram_analysis", eigenvalues=ev, labels=y, block_means=cc.block_means,
                    neighbors=nb.indices)
    kind = "cosine" if normalize else "M = JJ^T"
    run.save_figure("gram", viz.plot_gram(m, y, dataset.classes,
                                          title=f"Jacobian correlation ({output}, {kind})"))
    if not normalize:
        run.save_figure("gram_cosine", viz.plot_gram(cos, y, dataset.classes,
                                                     title=f"cosine of Jacobians ({output})"))
    run.save_figure("gram_spectrum", viz.plot_gram_spectrum(ev))
    total = float(ev.clamp_min(0).sum())
    metrics = {
        "n": len(x),
        "output": output,
        "normalize": normalize,
        "within_class_mean": cc.within,
        "between_class_mean": cc.between,
        "within_class_cosine": cc_cos.within,
        "between_class_cosine": cc_cos.between,
        "kernel_target_alignment": kernel_target_alignment(m, y),
        "neighbor_label_agreement": nb.label_agreement,
        "top10_eigen_share": float(ev[:10].clamp_min(0).sum()) / total if total else 0.0,
    }
    run.metrics.update({"gram": metrics})
    return metrics


def _demo_leaf(run: Run, model: nn.Module, test: ImageDataset, progress: bool) -> dict:
    """Horizontal paths, leaf crossings and the involutivity check on the demo model."""
    from .foliation import horizontal_path, involutivity_residual, leaf_crossing_path

    si, ti = _pairs(test, 3, seed=1)
    src, tgt = test.images[si], test.images[ti]
    hp = horizontal_path(model, src, tgt, step_size=0.05, max_steps=600, tol=0.5,
                         record_every=5, clamp=(0.0, 1.0), progress=progress)
    lin = _interpolation(model, src, tgt, 33, "logits")
    rows = [r for i in range(3) for r in ((hp, i, f"path {i}"), (lin, i, f"line {i}"))]
    run.save_figure("demo_horizontal", viz.plot_path_grid(
        rows, frames=9, classes=test.classes, title="Horizontal paths vs straight lines"))
    idx = _pick(test, 4, seed=2)
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


def run_demo(run: Run, *, steps: int = 1500, progress: bool = True) -> dict[str, Any]:
    """The whole story on the embedded digits: train (seed-001 optimiser settings) while
    following Tr G, then G's spectra over the test split, then the Jacobian correlation
    matrix, and an HTML report."""
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
    c = spec["num_classes"]
    write_report(
        run.path,
        "manifoldlens demo — digits through the eyes of a classifier",
        intro=(
            "A small CNN is trained on scikit-learn's 8×8 digits (1437 train / 360 test) with "
            "SGD, batch 60, learning rate 0.01 (momentum 0.9). The local data matrix "
            "G(x) = Σ_c p_c ∇log p_c ∇log p_cᵀ (Grementieri &amp; Fioresi, eq. 6) and the "
            "Jacobian correlation matrix M = 𝒥𝒥ᵀ (Shin, eq. 6) are computed for the test split."
        ),
        sections=[
            Section(
                "Training and the trace of G",
                f"Test accuracy {meta['metrics'].get('test_accuracy', float('nan')):.3f} after "
                f"{meta['step']} steps. The mean trace of G on a probe batch of 60 test images "
                "(blue) and its moving average (red), as in seed 001 Figure 2: the trace first "
                "rises while the model learns, then drops as predictions saturate.",
                [("trace_of_g.png", "Mean trace (soft rank) and numerical rank of G during "
                  "training."), ("training.png", "Test loss and accuracy.")],
                {k: v for k, v in train_metrics.items() if isinstance(v, (int, float))},
            ),
            Section(
                "The local data matrix over the test split",
                f"rank G ≤ C − 1 = {c - 1} (Proposition 2.1). Share of test points at full "
                f"rank {c - 1}: {spec['full_rank_fraction']:.3f}.",
                [("trace_histogram.png", "Tr G(x) over the test split, by true class."),
                 ("spectra.png", "Normalised eigenvalues of G(x): median and 10–90 % band."),
                 ("rank_counts.png", "Numerical rank of G(x)."),
                 ("eigenvectors.png", "Test images and the top eigenvectors of G(x): "
                  "the directions that change the prediction fastest.")],
                spec,
            ),
            Section(
                "Along and across the leaves",
                "Horizontal paths (seed 001 Algorithm 1) move a test digit towards another "
                "while staying on its leaf (every step in D_x); beside each, the straight "
                "line between the same endpoints. A path that cannot reach its target ends "
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
            ),
            Section(
                "The Jacobian correlation matrix",
                "M_ij = Σ_c ⟨∇p_c(x_i), ∇p_c(x_j)⟩ for the test split, ordered by class. "
                "Block structure means that the model's input sensitivities cluster by class.",
                [("gram.png", "M ordered by class, and its class-block means."),
                 ("gram_cosine.png", "The same as cosines of the Jacobians."),
                 ("gram_spectrum.png", "Spectrum of M.")],
                gram,
            ),
            Section(
                "The data's own density: a normalizing flow",
                "A RealNVP flow (affine couplings, seeds 002–003) trained by maximum likelihood "
                f"on two moons ({flow['steps']} steps). Its density is exact: "
                "log p(x) = log p_Z(f(x)) + log|det ∂f/∂x|, and integrates to "
                f"{flow['density_integral']:.3f} over the plotted box. The volume-change map "
                "shows where the flow contracts space (density piles up on the moons) and "
                "where it expands it.",
                [("flow_density.png", "Training data, the learned density and samples."),
                 ("flow_volume_change.png", "A latent grid mapped to data space, and "
                  "log|det ∂z/∂x|.")],
                flow,
            ),
            Section(
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
            ),
        ],
    )
    return run.metrics


def _demo_flow(run: Run, progress: bool, steps: int = 1000) -> dict[str, Any]:
    """A RealNVP on two moons: the density, its integral, the volume change and samples."""
    from .data import make_toy_2d
    from .flows import RealNVP
    from .flows.training import train_flow

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
    return {"steps": res.step, "test_nll": res.metrics["test_nll"],
            "density_integral": float(fig.density_integral)}


def _demo_manifold(run: Run, model: nn.Module, progress: bool) -> dict[str, Any]:
    """Seed 004 in small: an autoencoder's manifold of the digits, the classifier's
    attributions on it split into tangent and orthogonal parts."""
    from .attribution import METHODS, explain
    from .generative import AutoEncoder, reconstructive_dataset, train_generative
    from .tangent import TangentSpace, principal_angles, random_fraction_baseline

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
# Seed 001 §4.2–4.3: the leaf experiments
# ---------------------------------------------------------------------------------------------


def _pick(dataset: ImageDataset, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(len(dataset), generator=g)[:n]


def _pairs(dataset: ImageDataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n (source, target) index pairs with different labels."""
    g = torch.Generator().manual_seed(seed)
    src, tgt = [], []
    while len(src) < n:
        i, j = torch.randint(len(dataset), (2,), generator=g).tolist()
        if dataset.labels[i] != dataset.labels[j]:
            src.append(i)
            tgt.append(j)
    return torch.tensor(src), torch.tensor(tgt)


def _path_metrics(res, start_class: torch.Tensor) -> dict[str, Any]:
    pred = res.probs.argmax(-1)
    return {
        "record_steps": res.record_steps,
        "mean_distance": res.distances.mean(1),
        "agreement_with_start": (pred == start_class).double().mean(1),
        "mean_max_prob": res.probs.max(-1).values.mean(1),
    }


def _interpolation(model, src, tgt, steps: int, model_output: str):
    """Straight segments between the endpoints, as a path-like record."""
    from types import SimpleNamespace

    from ._utils import predict_probs

    t = torch.linspace(0, 1, steps).to(src)
    pts = src[None] + t.view(-1, *[1] * src.ndim) * (tgt - src)[None]
    probs = torch.stack([predict_probs(model, p, model_output) for p in pts])
    return SimpleNamespace(points=pts, probs=probs, record_steps=torch.arange(steps))


def _class_changes(probs: torch.Tensor) -> torch.Tensor:
    pred = probs.argmax(-1)  # (T, n)
    return (pred[1:] != pred[:-1]).sum(0)


def run_leaf_across(
    run: Run, model: nn.Module, dataset: ImageDataset, *, n: int = 8, steps: int = 1000,
    step_size: float = 0.1, seed: int = 0, record_every: int = 10, clamp=None,
    model_output: str = "logits", progress: bool = True,
) -> dict[str, Any]:
    """Seed 001 Figure 3: from test images, ``steps`` steps across the leaves (on ker G)."""
    from .foliation import leaf_crossing_path

    idx = _pick(dataset, n, seed)
    x = dataset.images[idx]
    res = leaf_crossing_path(model, x, steps=steps, step_size=step_size, seed=seed,
                             record_every=record_every, clamp=clamp, model_output=model_output,
                             checkpoint_dir=run.path / "state", progress=progress)
    start = res.probs[0].argmax(-1)
    m = _path_metrics(res, start)
    run.save_arrays("across", indices=idx, points=res.points, probs=res.probs,
                    distances=res.distances, record_steps=res.record_steps)
    run.save_figure("across_strips", viz.plot_path_grid(
        [(res, i, f"test #{int(idx[i])}") for i in range(min(n, 6))], frames=9,
        classes=dataset.classes, title="Across the leaves (seed 001 Fig. 3)"))
    run.save_figure("across_curves", viz.plot_curves(res.record_steps, {
        "distance from start": res.distances, "prediction = start class": m[
            "agreement_with_start"], "max probability": res.probs.max(-1).values}))
    out = {
        "n": n, "steps": steps, "step_size": step_size,
        "final_mean_distance": float(res.distances[-1].mean()),
        "final_agreement_with_start": float(m["agreement_with_start"][-1]),
        "min_agreement_with_start": float(m["agreement_with_start"].min()),
        "final_mean_max_prob": float(m["mean_max_prob"][-1]),
        "start_mean_max_prob": float(m["mean_max_prob"][0]),
        "status": res.status,
        "curve": {k: v.tolist() for k, v in m.items()},
    }
    run.save_json("results", out)
    run.metrics["across"] = {k: v for k, v in out.items() if k != "curve"}
    return out


def run_leaf_horizontal(
    run: Run, model: nn.Module, dataset: ImageDataset, *, pairs: int = 20,
    steps: int = 10000, step_size: float = 0.1, tol: float = 1.0, seed: int = 0,
    record_every: int = 50, clamp=None, mirror: bool = False, model_output: str = "logits",
    progress: bool = True, name: str = "horizontal", capped: bool = False,
) -> dict[str, Any]:
    """Seed 001 Figure 4 (and Figure 5 with ``mirror=True``: targets flipped left–right):
    horizontal paths between test images beside the straight line between them."""
    from .foliation import horizontal_path

    si, ti = _pairs(dataset, pairs, seed)
    src, tgt = dataset.images[si], dataset.images[ti]
    if mirror:
        tgt = tgt.flip(-1)
    res = horizontal_path(model, src, tgt, step_size=step_size, max_steps=steps, tol=tol,
                          record_every=record_every, clamp=clamp, model_output=model_output,
                          checkpoint_dir=run.path / "state", progress=progress, capped=capped)
    lin = _interpolation(model, src, tgt, 33, model_output)
    straight = (tgt - src).reshape(pairs, -1).norm(dim=1)
    reached = res.reached
    run.save_arrays(name, sources=si, targets=ti, points=res.points, probs=res.probs,
                    distances=res.distances, steps=res.steps, reached=reached,
                    length=res.length, record_steps=res.record_steps)
    rows = []
    for i in range(min(pairs, 4)):
        rows.append((res, i, f"path {i}"))
        rows.append((lin, i, f"line {i}"))
    label = "mirrored targets (seed 001 Fig. 5)" if mirror else "seed 001 Fig. 4"
    run.save_figure(f"{name}_strips", viz.plot_path_grid(
        rows, frames=9, classes=dataset.classes,
        title=f"Horizontal paths vs straight lines, {label}"))
    run.save_figure(f"{name}_distance", viz.plot_curves(
        res.record_steps, {"distance to target": res.distances}, logy=("distance to target",)))
    steps_reached = res.steps[reached].double()
    out = {
        "pairs": pairs, "max_steps": steps, "step_size": step_size, "tol": tol,
        "mirror": mirror, "capped": capped, "clamp": clamp,
        "reached_share": float(reached.double().mean()),
        "steps_to_reach_median": float(steps_reached.median()) if reached.any() else None,
        "steps_to_reach_max": int(steps_reached.max()) if reached.any() else None,
        "final_distance_median": float(res.distances[-1].median()),
        "start_distance_median": float(res.distances[0].median()),
        "path_length_over_straight_median": float((res.length / straight.double()).median()),
        "class_changes_path_mean": float(_class_changes(res.probs).double().mean()),
        "class_changes_line_mean": float(_class_changes(lin.probs).double().mean()),
        "min_max_prob_path_mean": float(res.probs.max(-1).values.min(0).values.mean()),
        "min_max_prob_line_mean": float(lin.probs.max(-1).values.min(0).values.mean()),
        "status_counts": {s: res.status.count(s) for s in set(res.status)},
    }
    run.save_json("results", out)
    run.metrics[name] = out
    return out


def run_leaf_noisy(
    run: Run, model: nn.Module, dataset: ImageDataset, *, n: int = 8, noise_steps: int = 250,
    steps: int = 10000, step_size: float = 0.1, tol: float = 1.0, seed: int = 0,
    record_every: int = 50, clamp=None, model_output: str = "logits", progress: bool = True,
    capped: bool = False,
) -> dict[str, Any]:
    """Seed 001 Figure 6: move a valid image ``noise_steps`` across the leaves, then try to
    reach another valid image by a horizontal path; the noise persists."""
    from .foliation import horizontal_path, leaf_crossing_path

    si, ti = _pairs(dataset, n, seed)
    x0, tgt = dataset.images[si], dataset.images[ti]
    noisy = leaf_crossing_path(model, x0, steps=noise_steps, step_size=step_size, seed=seed,
                               record_every=noise_steps, model_output=model_output, clamp=clamp,
                               checkpoint_dir=run.path / "state_noise", progress=progress).final
    res = horizontal_path(model, noisy, tgt, step_size=step_size, max_steps=steps, tol=tol,
                          record_every=record_every, model_output=model_output, clamp=clamp,
                          checkpoint_dir=run.path / "state", progress=progress, capped=capped)
    noise = (noisy - x0).reshape(n, -1)
    residual = (res.final - tgt).reshape(n, -1)
    cos = torch.nn.functional.cosine_similarity(noise, residual, dim=1)
    run.save_arrays("noisy", sources=si, targets=ti, noisy=noisy, points=res.points,
                    probs=res.probs, distances=res.distances, record_steps=res.record_steps)
    run.save_figure("noisy_strips", viz.plot_path_grid(
        [(res, i, f"pair {i}") for i in range(min(n, 6))], frames=9, classes=dataset.classes,
        title="Noisy start → valid image (seed 001 Fig. 6)"))
    run.save_figure("noisy_distance", viz.plot_curves(
        res.record_steps, {"distance to target": res.distances}, logy=("distance to target",)))
    out = {
        "n": n, "noise_steps": noise_steps, "steps": steps, "tol": tol, "capped": capped,
        "clamp": clamp,
        "noise_norm_median": float(noise.norm(dim=1).median()),
        "final_distance_median": float(residual.norm(dim=1).median()),
        "reached_share": float(res.reached.double().mean()),
        "residual_noise_cosine_median": float(cos.median()),
        "status_counts": {s: res.status.count(s) for s in set(res.status)},
    }
    run.save_json("results", out)
    run.metrics["noisy"] = out
    return out


def run_leaf_involutivity(
    run: Run, model: nn.Module, dataset: ImageDataset, *, n: int = 16, seed: int = 0,
    model_output: str = "logits",
) -> dict[str, Any]:
    """Theorem 3.1 checked numerically: Lie-bracket residuals outside D_x on test images."""
    from .foliation import involutivity_residual

    idx = _pick(dataset, n, seed)
    x = dataset.images[idx].double()
    res = involutivity_residual(model.double(), x, model_output=model_output)
    model.float()
    run.save_arrays("involutivity", indices=idx, residual=res.residual,
                    bracket_norm=res.bracket_norm, pairs=torch.tensor(res.pairs))
    run.save_figure("involutivity", viz.plot_residual_histogram(res.residual))
    r = res.residual[torch.isfinite(res.residual)]
    out = {"n": n, "pairs": len(res.pairs), "median": float(r.median()), "max": float(r.max()),
           "dtype": "float64"}
    run.save_json("results", out)
    run.metrics["involutivity"] = out
    return out
