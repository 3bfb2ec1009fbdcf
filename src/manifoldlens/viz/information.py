"""Figures of the local data matrix G(x) and its foliation: the trace of G during training
and over a split, spectra and ranks, eigenvectors, the Jacobian correlation matrix, training
curves, paths along leaves (strips, grids, GIFs) and involutivity residuals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .style import (
    BLUE,
    GREY,
    RED,
    as_image,
    legend,
    point_style,
    row_label,
    style_axes,
    suptitle,
    to_numpy,
)

__all__ = [
    "plot_trace_of_g",
    "plot_trace_histogram",
    "plot_spectra",
    "plot_rank_counts",
    "plot_gram",
    "plot_gram_spectrum",
    "plot_eigenvectors",
    "plot_training",
    "plot_path_strip",
    "save_path_gif",
    "plot_path_grid",
    "plot_curves",
    "plot_residual_histogram",
]


def plot_trace_of_g(records: Sequence[dict]) -> Figure:
    """Grementieri & Fioresi 2022, Fig. 2: mean trace of G on a probe batch during training
    (blue) and its exponential moving average (red); below, the mean numerical rank and the
    share of probe points at full rank C − 1."""
    if not records:
        raise ValueError("records is empty: no trace of G was recorded")
    steps = np.array([r["step"] for r in records])
    few = point_style(len(steps))
    fig = Figure(figsize=(7, 5.2), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 1])
    ax.plot(steps, [r["mean_trace"] for r in records], color=BLUE, lw=1.0, alpha=0.8,
            label="mean trace of G(x, w)", **few)
    ax.plot(steps, [r["ema_trace"] for r in records], color=RED, lw=2.0,
            label="exponential moving average", **point_style(len(steps), "s", 4.0))
    ax.axhline(records[0]["ema_trace"], color=GREY, ls="--", lw=0.8, label="value at step 0")
    ax.set_yscale("log")
    ax.set_ylabel("Tr G  (soft rank)")
    ax.legend(frameon=False, fontsize=8)
    style_axes(ax)
    ax2.plot(steps, [r["mean_rank"] for r in records], color=BLUE, lw=1.2, label="mean rank",
             **few)
    ax2.set_ylabel("numerical rank")
    ax2.set_xlabel("training step")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax3 = ax2.twinx()
    ax3.plot(steps, [r["full_rank_fraction"] for r in records], color=RED, lw=1.0, ls=":",
             label="share of points at rank C − 1", **point_style(len(steps), "s", 4.0))
    ax3.set_ylim(-0.05, 1.05)
    ax3.set_ylabel("share at C − 1", color=RED)
    style_axes(ax2)
    legend(ax2, ax3, fontsize=7)
    ax.set_title("Trace of the local data matrix during training", fontsize=11)
    return fig


def plot_trace_histogram(
    trace, labels=None, classes: Sequence[str] | None = None, bins: int = 40
) -> Figure:
    """Histogram of Tr G(x) over a split (log scale), stacked by true class when given."""
    tr = to_numpy(trace).ravel()
    if tr.size == 0:
        raise ValueError("trace is empty")
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    pos = tr[tr > 0]
    logx = pos.size == tr.size  # log bins need positive values; a zero trace gets linear ones
    if logx:  # one distinct value: a decade around it, so the bar has a width
        lo, hi = np.log10(pos.min()), np.log10(pos.max())
        lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
        edges = np.logspace(lo, hi, bins + 1)
    else:
        edges = bins
    if labels is not None:
        lab = to_numpy(labels).astype(int)
        ks = np.unique(lab)
        names = [classes[k] if classes else str(k) for k in ks]
        cmap = _class_colors(len(ks))
        ax.hist([tr[lab == k] for k in ks], bins=edges, stacked=True, color=cmap, label=names)
        ax.legend(frameon=False, fontsize=7, ncol=2, title="true class", title_fontsize=7,
                  loc="upper left")
    else:
        ax.hist(tr, bins=edges, color=BLUE)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel("Tr G(x) = E_{y∼p} ‖∇ₓ log p_y‖²")
    ax.set_ylabel("points")
    ax.set_title(f"Trace of G over {tr.size} points (median {np.median(tr):.3g})", fontsize=11)
    style_axes(ax)
    return fig


def _class_colors(k: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def plot_spectra(eigenvalues, *, normalize: bool = True) -> Figure:
    """Eigenvalue spectra of G over a split: median and 10–90 % band of λ_k (optionally
    λ_k / λ_1) for k = 1..C, log scale. The last eigenvalue is 0 (rank ≤ C − 1)."""
    ev = to_numpy(eigenvalues)
    c = ev.shape[1]
    vals = ev / np.maximum(ev[:, :1], np.finfo(float).tiny) if normalize else ev
    floor = 1e-12 * (1.0 if normalize else max(float(ev.max()), np.finfo(float).tiny))
    vals = np.maximum(vals, floor)  # numerically zero eigenvalues drawn at the floor
    k = np.arange(1, c + 1)
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    lo, med, hi = np.percentile(vals, [10, 50, 90], axis=0)
    ax.fill_between(k, lo, hi, color=BLUE, alpha=0.2, label="10–90 % of points")
    ax.plot(k, med, "o-", color=BLUE, label="median")
    ax.set_yscale("log")
    ax.set_xticks(k)
    ax.set_xlabel("eigenvalue index k")
    ax.set_ylabel("λ_k / λ_1" if normalize else "λ_k")
    ax.axhline(floor, color=GREY, ls=":", lw=0.8, label="floor: numerically 0")
    ax.set_title(f"Spectrum of G(x) over {ev.shape[0]} points (C = {c})", fontsize=11)
    ax.legend(frameon=False, fontsize=8)
    style_axes(ax)
    return fig


def plot_rank_counts(ranks, num_classes: int) -> Figure:
    """How many points have each numerical rank of G (bound: C − 1)."""
    r = to_numpy(ranks).astype(int)
    counts = np.bincount(r, minlength=num_classes + 1)[: num_classes + 1]
    fig = Figure(figsize=(5.5, 3.4), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(np.arange(num_classes + 1), counts, color=BLUE)
    bars[num_classes - 1].set_color(RED)
    ax.set_xticks(np.arange(num_classes + 1))
    ax.set_xlabel("numerical rank of G(x)   (red: the bound C − 1)")
    ax.set_ylabel("points")
    ax.set_title("Rank of the local data matrix", fontsize=11)
    style_axes(ax)
    return fig


def plot_gram(
    gram, labels, classes: Sequence[str] | None = None, *, title: str | None = None,
    value: str | None = None,
) -> Figure:
    """The Jacobian correlation matrix M ordered by class, with class boundaries, beside the
    C × C matrix of class-block means (diagonal: within-class, self-pairs excluded).
    ``value``: what an entry is, for the colour bars (default "M_ij = ⟨J(x_i), J(x_j)⟩")."""
    value = value or "M_ij = ⟨J(x_i), J(x_j)⟩"
    from ..jacobian import class_correlation

    m = to_numpy(gram)
    lab = to_numpy(labels).astype(int)
    order = np.argsort(lab, kind="stable")
    ms = m[np.ix_(order, order)]
    ls = lab[order]
    ks, starts, counts = np.unique(ls, return_index=True, return_counts=True)
    names = [classes[k] if classes else str(k) for k in ks]
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1.35, 1])
    from matplotlib.colors import Normalize, SymLogNorm

    absm = np.abs(ms)
    lim = float(absm.max()) or 1.0
    small = float(np.percentile(absm[absm > 0], 50)) if (absm > 0).any() else lim
    # values spanning many decades (raw M: confident points have tiny Jacobians): symlog over
    # the top five decades
    logscale = lim / small > 100
    norm = (SymLogNorm(linthresh=lim * 1e-5, vmin=-lim, vmax=lim) if logscale
            else Normalize(-lim, lim))
    im = ax.imshow(ms, cmap="RdBu_r", norm=norm, interpolation="nearest")
    for s in starts[1:]:
        ax.axhline(s - 0.5, color="k", lw=0.5)
        ax.axvline(s - 0.5, color="k", lw=0.5)
    centres = starts + counts / 2 - 0.5
    ax.set_xticks(centres, names, rotation=90, fontsize=7)
    ax.set_yticks(centres, names, fontsize=7)
    ax.set_xlabel("point j (sorted by true class)", fontsize=8)
    ax.set_ylabel("point i (sorted by true class)", fontsize=8)
    ax.set_title(title or f"Jacobian correlation matrix M ({m.shape[0]} points)", fontsize=10)
    ticks = [s * lim * 10.0**-k for s in (-1, 1) for k in (0, 2, 4)] + [0] if logscale else None
    cb = fig.colorbar(im, ax=ax, shrink=0.8, ticks=ticks)
    cb.set_label(value + ("  (symmetric log scale)" if logscale else ""), fontsize=8)
    if logscale:
        cb.ax.set_yticklabels([f"{t:.1e}" if t else "0" for t in ticks], fontsize=7)
    cc = class_correlation(torch.as_tensor(m), torch.as_tensor(lab))
    bm = to_numpy(cc.block_means)
    fin2 = np.abs(bm[np.isfinite(bm)])  # a class of one point has no pair: NaN
    lim2 = float(fin2.max()) if fin2.size else 0.0
    lim2 = lim2 or 1.0
    im2 = ax2.imshow(bm, cmap="RdBu_r", vmin=-lim2, vmax=lim2)
    ax2.set_xticks(range(len(ks)), names, rotation=90, fontsize=7)
    ax2.set_yticks(range(len(ks)), names, fontsize=7)
    ax2.set_xlabel("class of point j", fontsize=8)
    ax2.set_ylabel("class of point i", fontsize=8)
    ax2.set_title(
        f"class-block means: within {cc.within:.3g}, between {cc.between:.3g}", fontsize=10
    )
    cb2 = fig.colorbar(im2, ax=ax2, shrink=0.8)
    cb2.set_label("mean over the class block (i ≠ j)", fontsize=8)
    return fig


def plot_gram_spectrum(eigenvalues, k: int = 100) -> Figure:
    """Top eigenvalues of M (log scale) and their cumulative share of the trace."""
    ev = np.clip(to_numpy(eigenvalues).ravel(), 0, None)
    if ev.size == 0:
        raise ValueError("eigenvalues is empty")
    top = ev[:k]
    idx = np.arange(1, top.size + 1)
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.semilogy(idx, np.maximum(top, 1e-30), "o-", ms=5 if top.size <= 3 else 3, color=BLUE,
                label="eigenvalue λ_k (left)")
    ax.set_xlabel("index k (decreasing eigenvalues)")
    ax.set_ylabel("eigenvalue λ_k of M", color=BLUE)
    ax2 = ax.twinx()
    ax2.plot(idx, np.cumsum(top) / max(ev.sum(), 1e-300), color=RED,
             label="cumulative share Σ_{j ≤ k} λ_j / Tr M (right)",
             **point_style(top.size, "s", 4.0))
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative share of trace", color=RED)
    legend(ax, ax2, fontsize=7)
    ax.set_title(f"Spectrum of the Jacobian correlation matrix (top {top.size} of {ev.size})",
                 fontsize=11)
    style_axes(ax)
    return fig


def plot_eigenvectors(
    images, eigenvalues, eigenvectors, probs=None, classes: Sequence[str] | None = None,
    k: int = 5,
) -> Figure:
    """For each image (row), the image and the top-k eigenvectors of G(x) as images, with
    their eigenvalues: the directions along which the prediction changes fastest."""
    imgs = to_numpy(images)
    ev = to_numpy(eigenvalues)
    vecs = to_numpy(eigenvectors)
    n = imgs.shape[0]
    k = min(k, vecs.shape[1])
    fig = Figure(figsize=(1.5 * (k + 1), 1.6 * n), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, k + 1))
    for i in range(n):
        axes[i, 0].imshow(as_image(imgs[i]), cmap="gray_r", vmin=0, vmax=1)
        if probs is not None:
            p = to_numpy(probs)[i]
            c = int(p.argmax())
            axes[i, 0].set_title(f"{classes[c] if classes else c}: {p[c]:.2f}", fontsize=7)
        else:
            axes[i, 0].set_title("input", fontsize=7)
        for j in range(k):
            v = vecs[i, j].reshape(imgs.shape[1:])
            v = v.mean(0) if v.ndim == 3 else as_image(v)  # colour channels summed (mean)
            lim = np.abs(v).max() or 1.0
            axes[i, j + 1].imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[i, j + 1].set_title(f"λ{j + 1} = {ev[i, j]:.2g}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    suptitle(fig, "Inputs and the top eigenvectors of G(x)\n(red > 0, blue < 0, each on its "
             "own scale)", fontsize=9)
    return fig


def _loss_points(records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) of the records holding a finite "step" and "loss", by step."""
    pts = sorted((float(r["step"]), float(r["loss"])) for r in records
                 if r.get("step") is not None and isinstance(r.get("loss"), int | float)
                 and np.isfinite(r["loss"]))
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def plot_training(history: Sequence[dict], losses: Sequence[dict] = ()) -> Figure:
    """Loss and accuracy over training: the minibatch training loss (``losses``: the
    ``{"step", "loss"}`` records of ``metrics.jsonl``; others are skipped), and the test loss
    and accuracy of the evaluations (``history``: dicts with "step", "test_loss",
    "test_accuracy"), each evaluation a marker."""
    history = [h for h in history if "test_loss" in h or "test_accuracy" in h]
    ts, tl = _loss_points(losses)
    if not history and not ts.size:
        raise ValueError("nothing to draw: history has no evaluations and losses no "
                         "training loss")
    steps = np.array([h["step"] for h in history], dtype=float)
    fig = Figure(figsize=(6.5, 3.4), layout="constrained")
    ax = fig.subplots()
    if ts.size:
        ax.plot(ts, tl, color=GREY, lw=0.9, alpha=0.9, label="training loss (minibatch)",
                **point_style(ts.size, "o", 4.0))
    if history:
        ax.plot(steps, [h.get("test_loss", np.nan) for h in history], "o-", ms=5, color=BLUE,
                label="test loss")
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cross-entropy (nats)")
    twins = []
    if history:
        twins.append(ax.twinx())
        twins[0].plot(steps, [h.get("test_accuracy", np.nan) for h in history], "s--", ms=5,
                      lw=1.0, color=RED, label="test accuracy (right)")
        twins[0].set_ylabel("test accuracy", color=RED)
        twins[0].set_ylim(0, 1.02)
    style_axes(ax)
    legend(ax, *twins, loc="best")
    n = len(history)
    ax.set_title(f"Training loss and {n} evaluation{'s' if n != 1 else ''}", fontsize=11)
    return fig


def _frame_indices(steps: int, frames: int) -> np.ndarray:
    return np.unique(np.linspace(0, steps - 1, min(frames, steps)).round().astype(int))


def plot_path_strip(result, i: int = 0, *, frames: int = 8, classes=None,
                    title: str | None = None) -> Figure:
    """Images along path ``i`` of a :class:`~manifoldlens.foliation.PathResult`, with the
    predicted class and its probability under each and the step above (Grementieri & Fioresi
    2022, Figs. 3–6)."""
    return plot_path_grid([(result, i, None)], frames=frames, classes=classes, title=title,
                          step_prefix="step ")


def save_path_gif(result, path, i: int = 0, *, frames: int = 40, classes=None,
                  fps: int = 8):
    """Animated GIF of path ``i`` with the prediction in the title (Pillow writer)."""
    from pathlib import Path

    from matplotlib.animation import FuncAnimation, PillowWriter

    pts = to_numpy(result.points[:, i])
    probs = to_numpy(result.probs[:, i])
    steps = to_numpy(result.record_steps).astype(int)
    idx = _frame_indices(len(steps), frames)
    fig = Figure(figsize=(2.4, 2.6), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(as_image(pts[idx[0]]), cmap="gray_r", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])

    def update(k):
        im.set_data(as_image(pts[k]))
        c = int(probs[k].argmax())
        name = classes[c] if classes is not None else str(c)
        ax.set_title(f"step {steps[k]} — {name}: {probs[k, c]:.2f}", fontsize=8)
        return (im,)

    anim = FuncAnimation(fig, update, frames=list(idx), blit=False)
    path = Path(path)
    anim.save(str(path), writer=PillowWriter(fps=fps))
    return path


def plot_path_grid(rows, *, frames: int = 8, classes=None, title: str | None = None,
                   step_prefix: str = "step ") -> Figure:
    """Several paths as rows of image strips. ``rows``: ``(result, index, label)`` tuples,
    where ``result`` has ``points`` (T, n, ...), ``probs`` (T, n, C), ``record_steps`` (T,).
    Each row shows up to ``frames`` evenly spaced records, with the predicted class and its
    probability under each image and the step above."""
    picks = [_frame_indices(len(res.record_steps), frames) for res, _, _ in rows]
    k = max(len(p) for p in picks)
    fig = Figure(figsize=(1.25 * k + 1.2, 1.55 * len(rows)), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), k, squeeze=False))
    for r, ((res, i, label), idx) in enumerate(zip(rows, picks, strict=True)):
        pts = to_numpy(res.points[:, i])
        probs = to_numpy(res.probs[:, i])
        steps = to_numpy(res.record_steps).astype(int)
        for j in range(k):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(idx):
                ax.axis("off")
                continue
            t = idx[j]
            ax.imshow(as_image(pts[t]), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            c = int(probs[t].argmax())
            name = classes[c] if classes is not None else str(c)
            ax.set_xlabel(f"{name}: {probs[t, c]:.2f}", fontsize=6)
            ax.set_title(f"{step_prefix}{steps[t]}", fontsize=6)
        if label:
            row_label(axes[r, 0], label)
    if title:
        suptitle(fig, title, fontsize=9)
    return fig


def plot_curves(x, curves: dict, *, xlabel: str = "step", title: str | None = None,
                logy: Sequence[str] = ()) -> Figure:
    """One panel per named curve, the name on its y axis; each value is (T,) or (T, n): the
    n series thin, their mean ± std (over n) thick with a band, in a legend."""
    names = list(curves)
    if not names:
        raise ValueError("curves is empty")
    fig = Figure(figsize=(3.3 * len(names), 2.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    xs = to_numpy(x).ravel()
    few = point_style(xs.size)
    for ax, name in zip(axes, names, strict=True):
        y = to_numpy(curves[name])
        if y.ndim == 2:
            m, s = np.nanmean(y, 1), np.nanstd(y, 1)
            series = ax.plot(xs, y, color=BLUE, alpha=0.15, lw=0.6, **few)
            series[0].set_label(f"each of {y.shape[1]}")
            ax.plot(xs, m, color=RED, lw=1.6, label="mean ± std", **few)
            ax.fill_between(xs, m - s, m + s, color=RED, alpha=0.15)
            ax.legend(frameon=False, fontsize=7, loc="best")
        else:
            ax.plot(xs, y, color=BLUE, lw=1.4, **few)
        if name in logy:
            ax.set_yscale("log")
        ax.set_ylabel(name, fontsize=9)
        ax.set_xlabel(xlabel)
        style_axes(ax)
    if title:
        suptitle(fig, title, fontsize=10)
    return fig


def plot_residual_histogram(residuals, *, title: str | None = None) -> Figure:
    """log10 of involutivity residuals ‖P_ker [X_i, X_j]‖ / ‖[X_i, X_j]‖."""
    r = to_numpy(residuals).ravel()
    r = r[np.isfinite(r)]
    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.subplots()
    vals = np.log10(np.maximum(r, 1e-18))
    ax.hist(vals, bins=40, color=BLUE)
    ax.axvline(np.log10(np.finfo(np.float32).eps), color=GREY, ls="--", lw=0.8,
               label="float32 eps")
    ax.set_xlabel("log10 residual  ||P_ker [X_i, X_j]|| / ||[X_i, X_j]||")
    ax.set_ylabel("point × class-pair count")
    ax.legend(frameon=False, fontsize=8)
    med = f"median {np.median(r):.2g}" if r.size else "no finite residuals"
    ax.set_title(title or f"Involutivity residuals ({med})", fontsize=10)
    style_axes(ax)
    return fig
