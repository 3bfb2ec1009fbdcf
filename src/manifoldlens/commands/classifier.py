"""``manifoldlens train``, ``spectrum`` and ``gram``: a classifier trained while following the
trace of its local data matrix G, the statistics of G over a split, and the Jacobian
correlation matrix M over a split.

Each ``run_*`` function takes a :class:`~manifoldlens.runs.Run`, computes, writes figures,
arrays and metrics into it and returns the metrics; its signature holds the command's
defaults.

References
----------
Grementieri, L. & Fioresi, R. (2022). Model-centric data manifold: the data through the eyes
of the model. arXiv:2104.13289.
Shin. Correlation of the Jacobian and Probability Flow.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import nn

from .. import viz
from ..callbacks import TraceOfG
from ..data import ImageDataset, load_dataset
from ..distributed import gather, is_main, shard
from ..information import check_top_k, data_matrix_statistics, local_data_matrix
from ..jacobian import (
    class_correlation,
    cosine_gram,
    count_classes,
    gram_spectrum,
    jacobian_gram,
    jacobian_neighbors,
    kernel_target_alignment,
)
from ..models import create_model, save_checkpoint
from ..runs import Run
from ..training import RunOptions, train_classifier
from .common import (
    add_checkpoint_data,
    add_command,
    add_common,
    add_data,
    add_length,
    add_resume,
    allow_change,
    checked,
    checkpoint_data,
    dataset_for,
    ints,
    option,
    progress,
    split_sha256,
)

__all__ = ["add_arguments", "run_gram", "run_spectrum", "run_train"]


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
    optimizer: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 60,
    steps: int | None = None,
    epochs: float | None = None,
    seed: int = 0,
    eval_every: int | None = None,
    checkpoint_every: int | None = 500,
    keep_checkpoints: tuple[int, ...] = (),
    resume: bool = False,
    allow_changes: tuple[str, ...] = (),
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train a classifier on a dataset with the trace-of-G callback (Grementieri & Fioresi
    2022, Figure 2): SGD, batch 60, learning rate 0.01 as theirs, with momentum 0.9 (theirs is
    0: ``momentum=0``; without it 10 epochs of the 8×8 digits end near 20 % test accuracy).
    A run whose test accuracy is closer to chance than to 1 is flagged in its metrics
    (``warning``) and on stderr as barely trained.

    Training length: ``steps`` or ``epochs``; 10 epochs when neither is given. The probe
    batch is the first ``probe_size`` test images. Writes ``trace_of_g.png``,
    ``training.png``, checkpoints under ``checkpoints/`` (every ``checkpoint_every`` steps,
    the latest and ``keep_checkpoints`` kept) and ``model.safetensors``/``model.json``.
    """
    if steps is None and epochs is None:
        epochs = 10.0
    train = load_dataset(data, "train", root)
    test = load_dataset(data, "test", root)
    if probe_size > len(test):
        raise ValueError(f"probe_size={probe_size} exceeds the {len(test)} test images of "
                         f"{train.name!r}")
    splits = {"train": split_sha256(train), "test": split_sha256(test)}  # the data's identity
    if limit is not None:
        train = train.subset(limit, seed=seed)
    torch.manual_seed(seed)
    model = create_model(arch, train.shape, train.num_classes, **(arch_options or {}))
    cb = TraceOfG(test.images[:probe_size], every=trace_every)
    options = RunOptions(run, checkpoint_every=checkpoint_every,
                         keep_checkpoints=keep_checkpoints, resume=resume,
                         allow_changes=allow_changes,
                         metadata={"data": train.name, "classes": train.classes})
    result = train_classifier(
        model, train, test_data=test, callbacks=[cb], run=options, progress=progress,
        optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
        batch_size=batch_size, steps=steps, epochs=epochs, seed=seed, eval_every=eval_every,
        device=device,
    )
    if result.history:
        run.save_figure("training", viz.plot_training(result.history, run.read_log("loss")))
    if cb.records:
        run.save_figure("trace_of_g", viz.plot_trace_of_g(cb.records))
    save_checkpoint(run.path / "model", result.model, metadata={
        "data": train.name, "classes": train.classes, "step": result.step,
        "metrics": result.metrics, "data_sha256": splits,
    })
    start = cb.records[0]["ema_trace"] if cb.records else float("nan")
    run.metrics.update({
        "trace_start": start,
        "trace_end_ema": cb.records[-1]["ema_trace"] if cb.records else float("nan"),
        "trace_peak_ema": max((r["ema_trace"] for r in cb.records), default=float("nan")),
        "trace_peak_step": max(cb.records, key=lambda r: r["ema_trace"])["step"]
        if cb.records else None,
        "trace_last_step": cb.records[-1]["step"] if cb.records else None,
    })
    warning = untrained_warning(result.metrics.get("test_accuracy"), train.num_classes,
                                result.step)
    if warning:
        run.metrics["warning"] = warning
        print(f"warning: {warning}", file=sys.stderr)
    return run.metrics


def untrained_warning(accuracy: float | None, num_classes: int, steps: int) -> str | None:
    """A sentence when the test ``accuracy`` is below (1 + chance)/2: the model is barely
    trained, and its G, paths and attributions describe an untrained network."""
    chance = 1.0 / num_classes
    if accuracy is None or accuracy >= (1 + chance) / 2:
        return None
    return (f"the model is barely trained: test accuracy {accuracy:.1%} after {steps} steps "
            f"(chance {chance:.1%}); train longer (--epochs, --steps) or with other settings")


def run_spectrum(
    run: Run,
    model: nn.Module,
    dataset: ImageDataset,
    *,
    model_output: str = "logits",
    batch_size: int = 256,
    top_k: int | None = None,
    n_examples: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Statistics of G(x) over a split: trace histogram, spectra, rank counts, examples.

    ``top_k=K``: G over each sample's K most probable classes (K backward passes instead of
    C − 1; the probability left out is reported). Under ``torch.distributed`` each process
    takes a share of whole batches and rank 0 writes everything (the others return ``{}``).
    """
    x, y = dataset.images, dataset.labels
    if top_k is not None:
        check_top_k(top_k, count_classes(model, x))
    part = shard(len(x), align=batch_size)  # whole batches: the same as in one process
    stats = data_matrix_statistics(model, x[part], model_output=model_output,
                                   batch_size=batch_size, progress=progress and is_main(),
                                   top_k=top_k)
    stats = {k: gather(v) for k, v in stats.items()}
    if not is_main():
        return {}
    c = stats["probs"].shape[1]
    rank = stats["rank"]
    run.save_arrays("spectrum", labels=y, **stats)
    run.save_figure("trace_histogram",
                    viz.plot_trace_histogram(stats["trace"], y, dataset.classes))
    run.save_figure("spectra", viz.plot_spectra(stats["eigenvalues"]))
    run.save_figure("rank_counts", viz.plot_rank_counts(rank, c))
    ex = torch.linspace(0, len(x) - 1, n_examples).long()
    G = local_data_matrix(model, x[ex], model_output=model_output, top_k=top_k)
    run.save_figure("eigenvectors", viz.plot_eigenvectors(
        x[ex], G.eigenvalues, G.eigenvectors, G.probs, dataset.classes))
    counts = torch.bincount(rank, minlength=c + 1).tolist()
    full = c - 1 if top_k is None or top_k >= c else top_k  # the rank of a generic G
    metrics = {
        "n": len(x),
        "num_classes": c,
        "accuracy": float((stats["probs"].argmax(1) == y).double().mean()),
        "trace_mean": float(stats["trace"].mean()),
        "trace_median": float(stats["trace"].median()),
        "rank_counts": {str(k): v for k, v in enumerate(counts) if v},
        "full_rank_fraction": float((rank == full).double().mean()),
        "rank_max": int(rank.max()),
    }
    if top_k is not None:
        metrics.update({"top_k": top_k,
                        "dropped_mass_mean": float(stats["dropped_mass"].mean()),
                        "dropped_mass_max": float(stats["dropped_mass"].max())})
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
    block_size: int | None = None,
    low_memory: bool | None = None,
    neighbors: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """The Jacobian correlation matrix M = 𝒥𝒥ᵀ of Shin (Correlation of the Jacobian and
    Probability Flow) over a split, with its class structure.

    M is written tile by tile into ``gram.npy`` (:func:`~manifoldlens.jacobian.jacobian_gram`
    with ``out=``): a run resumed after a kill computes only the missing tiles. Under
    ``torch.distributed`` every process computes its share of the tiles and rank 0 alone
    analyses M (the others return ``{}``); the analysis holds M in memory."""
    x, y = dataset.images, dataset.labels
    if neighbors >= len(x):  # before hours of Jacobians
        raise ValueError(f"neighbors={neighbors} needs more than {neighbors} images; the split "
                         f"has {len(x)}")
    out = run.file("gram.npy")
    m = jacobian_gram(model, x, output=output, model_output=model_output, normalize=normalize,
                      batch_size=batch_size, block_size=block_size, low_memory=low_memory,
                      out=out, progress=progress)
    if not is_main():
        return {}
    ev = gram_spectrum(m)
    cc = class_correlation(m, y)
    nb = jacobian_neighbors(m, k=neighbors, labels=y, normalized=normalize)
    cos = m if normalize else cosine_gram(m)
    cc_cos = class_correlation(cos, y)
    run.save_arrays("gram_analysis", eigenvalues=ev, labels=y, block_means=cc.block_means,
                    neighbors=nb.indices)
    kind = "cosine" if normalize else "M = JJ^T"
    run.save_figure("gram", viz.plot_gram(m, y, dataset.classes,
                                          title=f"Jacobian correlation ({output}, {kind})",
                                          value="cosine of J(x_i), J(x_j)" if normalize else None))
    if not normalize:
        run.save_figure("gram_cosine", viz.plot_gram(cos, y, dataset.classes,
                                                     title=f"cosine of Jacobians ({output})",
                                                     value="cosine of J(x_i), J(x_j)"))
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


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def _train(args: argparse.Namespace, run: Run) -> None:
    arch_options = {k: v for k, v in (("activation", args.activation),
                                      ("hidden", args.hidden)) if v is not None}
    run_train(
        run, data=args.data, root=args.root, arch=args.arch, arch_options=arch_options,
        limit=args.limit, trace_every=args.trace_every, probe_size=args.probe_size,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, batch_size=args.batch_size, steps=args.steps,
        epochs=args.epochs, seed=args.seed, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=tuple(args.keep_checkpoint),
        resume=args.resume, allow_changes=allow_change(args), progress=progress(args),
        device=args.device,
    )


def _spectrum(args: argparse.Namespace, run: Run) -> None:
    model, ds = checkpoint_data(args)
    run_spectrum(run, model, ds, model_output=args.model_output, batch_size=args.batch_size,
                 top_k=args.top_k, progress=progress(args))


def _gram(args: argparse.Namespace, run: Run) -> None:
    model, ds = checkpoint_data(args)
    run_gram(run, model, ds, output=args.output, model_output=args.model_output,
             normalize=args.normalize, batch_size=args.batch_size, block_size=args.block_size,
             low_memory=True if args.low_memory else None, progress=progress(args))


def _add_train(sub: Any) -> None:
    p = add_command(sub, "train", _train, "train a classifier, following the trace of G")
    add_common(p, run_train)
    add_data(p, run_train)
    option(p, "--arch", run_train, choices=["small_cnn", "seed001_cnn", "mlp", "linear"],
           help="architecture (seed001_cnn: the CNN of Grementieri & Fioresi)")
    p.add_argument("--activation", help="relu, tanh or softplus (mlp, small_cnn; default: "
                   "the architecture's own)")
    p.add_argument("--hidden", type=checked(ints),
                   help="hidden widths of an mlp, e.g. 128,128 (default: the architecture's own)")
    option(p, "--optimizer", run_train, choices=["sgd", "adam"], help="optimiser")
    option(p, "--lr", run_train, type=float, help="learning rate")
    option(p, "--momentum", run_train, type=float, low=0.0, high=1.0, help="SGD momentum")
    option(p, "--weight-decay", run_train, type=float, low=0.0, help="weight decay")
    option(p, "--batch-size", run_train, type=int, help="batch size")
    add_length(p, run_train, epochs="10 when --steps is not given")
    option(p, "--limit", run_train, type=int, help="train on a stratified subset of this size")
    option(p, "--trace-every", run_train, type=int, help="steps between Tr G probes")
    option(p, "--probe-size", run_train, type=int, help="test images in the Tr G probe")
    option(p, "--eval-every", run_train, type=int,
           help="steps between test evaluations (default: only at the end)")
    option(p, "--checkpoint-every", run_train, type=int, low=0,
           help="steps between checkpoints (0: none)")
    option(p, "--keep-checkpoint", run_train, "keep_checkpoints", type=int, action="append",
           help="also keep the checkpoint of this step (repeatable)")
    add_resume(p, run_train)


def _add_analysis(sub: Any, name: str, handler: Any, fn: Any,
                  help: str) -> argparse.ArgumentParser:
    p = add_command(sub, name, handler, help)
    p.add_argument("checkpoint", help="model checkpoint (.json, .safetensors or stem)")
    add_common(p, fn, dataset_for)
    add_checkpoint_data(p, fn, limit=True)
    option(p, "--batch-size", fn, type=int, help="points per batch")
    p.set_defaults(distributed=True)  # shards its samples under torchrun
    return p


def add_arguments(sub: Any) -> None:
    """Register ``train``, ``spectrum`` and ``gram`` on the top-level ``sub``-parsers."""
    _add_train(sub)
    p = _add_analysis(sub, "spectrum", _spectrum, run_spectrum,
                      "statistics of G(x) over a split")
    option(p, "--top-k", run_spectrum, type=int,
           help="G over each sample's K most probable classes (default: all C)")
    p = _add_analysis(sub, "gram", _gram, run_gram,
                      "the Jacobian correlation matrix M over a split")
    option(p, "--output", run_gram, choices=["softmax", "log_softmax", "logits"],
           help="the outputs whose Jacobians are correlated")
    option(p, "--normalize", run_gram, action="store_true", help="cosine of Jacobians")
    option(p, "--block-size", run_gram, type=int,
           help="rows of M per tile (default: up to 2048, as memory allows)")
    p.add_argument("--low-memory", action="store_true",
                   help="kept for old scripts: the Jacobians always go through a scratch file "
                        "beside gram.npy, which M is written into tile by tile (default: off)")
    add_resume(p)
