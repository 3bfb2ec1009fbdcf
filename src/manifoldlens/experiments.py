"""The commands' work, as library functions over a :class:`~manifoldlens.runs.Run`.

Each function takes a run directory, a model and data, computes, writes figures, arrays and
metrics into the run, and returns the metrics. The CLI only parses arguments and calls these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import viz
from .data import ImageDataset, load_dataset
from .information import data_matrix_statistics, local_data_matrix
from .jacobian import (
    class_correlation,
    gram_spectrum,
    jacobian_gram,
    jacobian_neighbors,
    kernel_target_alignment,
)
from .models import create_model, load_checkpoint
from .report import Section, write_report
from .runs import Run
from .training import TraceOfG, train_classifier

__all__ = ["run_demo", "run_gram", "run_spectrum", "run_train"]


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
    result = train_classifier(
        model, train, test_data=test, callbacks=[cb], run=run, resume=resume,
        progress=progress, **train_options,
    )
    if result.history:
        run.save_figure("training", viz.plot_training(result.history))
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


def _dataset_for(meta: dict[str, Any], data: str | None, split: str, root: str | None,
                 limit: int | None, seed: int = 0) -> ImageDataset:
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
    cos = m if normalize else _cosine(m)
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


def _cosine(m: torch.Tensor) -> torch.Tensor:
    d = m.diagonal().clamp_min(0)
    inv = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))
    return m * inv[:, None] * inv[None, :]


def load_model(checkpoint: str, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    model, meta = load_checkpoint(checkpoint, map_location=device)
    return model.eval(), meta


def run_demo(run: Run, *, steps: int = 1500, progress: bool = True) -> dict[str, Any]:
    """The whole story on the embedded digits: train (seed-001 optimiser settings) while
    following Tr G, then G's spectra over the test split, then the Jacobian correlation
    matrix, and an HTML report."""
    train_metrics = run_train(
        run, data="digits", arch="small_cnn", steps=steps, batch_size=60, lr=0.01,
        optimizer="sgd", momentum=0.9, trace_every=25, eval_every=100,
        checkpoint_every=500, progress=progress,
    )
    model, meta = load_model(str(run.path / "model.json"))
    test = load_dataset("digits", "test")
    spec = run_spectrum(run, model, test, progress=progress)
    gram = run_gram(run, model, test, progress=progress)
    run.metrics.update({"train": {k: v for k, v in train_metrics.items()
                                  if k not in ("spectrum", "gram")}})
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
                "The Jacobian correlation matrix",
                "M_ij = Σ_c ⟨∇p_c(x_i), ∇p_c(x_j)⟩ for the test split, ordered by class. "
                "Block structure means that the model's input sensitivities cluster by class.",
                [("gram.png", "M ordered by class, and its class-block means."),
                 ("gram_cosine.png", "The same as cosines of the Jacobians."),
                 ("gram_spectrum.png", "Spectrum of M.")],
                gram,
            ),
        ],
    )
    return run.metrics
