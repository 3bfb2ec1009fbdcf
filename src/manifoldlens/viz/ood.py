"""Figures of out-of-distribution detection and denoising (:mod:`manifoldlens.ood`,
:mod:`manifoldlens.denoise`): ROC curves, score histograms, the AUROC table and rows of
denoised images."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from .style import GREY, as_image, image_batch, legend, row_label, style_axes, suptitle, to_numpy

__all__ = ["plot_auroc_table", "plot_denoising", "plot_roc_curves", "plot_score_histograms"]

#: colours of the OOD sets, in order (the in-distribution set is drawn grey)
_COLOURS = ("#1f5fa8", "#c8372d", "#e08a1e", "#7b3294", "#2a9d8f", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22", "#393b79")


def _grid(n: int, cols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    if n < 1:
        raise ValueError("nothing to draw")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def plot_roc_curves(curves: Mapping[str, Mapping[str, tuple]], *,
                    aurocs: Mapping[str, Mapping[str, float]] | None = None, cols: int = 5,
                    title: str | None = None) -> Figure:
    """One panel per score, one ROC curve per OOD set: ``curves[score][set] = (fpr, tpr)``
    (OOD positive); ``aurocs[score][set]`` goes into the legend."""
    fig, axes = _grid(len(curves), cols, (2.7, 2.6))
    for ax, (score, by_set) in zip(axes, curves.items(), strict=False):
        for i, (name, (fpr, tpr)) in enumerate(by_set.items()):
            a = (aurocs or {}).get(score, {}).get(name)
            label = name if a is None else f"{name} {a:.2f}"
            ax.plot(to_numpy(fpr), to_numpy(tpr), color=_COLOURS[i % len(_COLOURS)], lw=1.1,
                    label=label)
        ax.plot([0, 1], [0, 1], color=GREY, ls="--", lw=0.7)
        ax.set_title(score, fontsize=9)
        ax.set_xlabel("false positive rate (in-dist. flagged)", fontsize=7)
        ax.set_ylabel("true positive rate (OOD flagged)", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        style_axes(ax)
        legend(ax, fontsize=5.5, loc="lower right", title="set, AUROC", title_fontsize=6)
    if title:
        suptitle(fig, title)
    return fig


def plot_score_histograms(scores: Mapping[str, Mapping[str, object]], *, in_name: str,
                          cols: int = 5, bins: int = 40, title: str | None = None) -> Figure:
    """One panel per score: the distribution of the score on each set (``scores[score][set]``,
    arrays), the in-distribution set ``in_name`` filled grey, the others as outlines; the
    x axis spans the 1st–99th percentiles of all sets together."""
    fig, axes = _grid(len(scores), cols, (2.7, 2.3))
    for ax, (score, by_set) in zip(axes, scores.items(), strict=False):
        vals = {k: to_numpy(v).ravel() for k, v in by_set.items()}
        vals = {k: v[np.isfinite(v)] for k, v in vals.items()}
        allv = np.concatenate([v for v in vals.values() if v.size] or [np.zeros(1)])
        lo, hi = np.percentile(allv, [1, 99])
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        i = 0
        for name, v in vals.items():
            v = np.clip(v, lo, hi)
            if name == in_name:
                ax.hist(v, edges, density=True, color=GREY, alpha=0.45, label=name)
            else:
                ax.hist(v, edges, density=True, histtype="step", lw=1.0,
                        color=_COLOURS[i % len(_COLOURS)], label=name)
                i += 1
        ax.set_xlabel(score, fontsize=8)
        ax.set_ylabel("density", fontsize=7)
        style_axes(ax)
    handles, names = axes[0].get_legend_handles_labels()  # every panel draws the same sets
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 6),
               frameon=False, fontsize=7)
    if title:
        suptitle(fig, title)
    return fig


def plot_auroc_table(table: Mapping[str, Mapping[str, float]], *,
                     title: str | None = None) -> Figure:
    """AUROC of each score (rows) on each OOD set (columns), ``table[score][set]``, as a
    diverging colour map centred on ½ with the numbers written in."""
    rows = list(table)
    cols = list(dict.fromkeys(c for r in rows for c in table[r]))
    m = np.array([[table[r].get(c, np.nan) for c in cols] for r in rows], dtype=float)
    fig = Figure(figsize=(max(3.6, 2.2 + 0.75 * len(cols)), max(2.6, 1.6 + 0.3 * len(rows))),
                 layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(m, cmap="RdBu_r", vmin=0, vmax=1, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6.5,
                        color="white" if abs(m[i, j] - 0.5) > 0.35 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("OOD set")
    ax.set_ylabel("score (higher = more OOD)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="AUROC (½: no separation)")
    if title:
        suptitle(fig, title)
    return fig


def plot_denoising(rows: Mapping[str, object], *, labels: Sequence[str] | None = None,
                   n: int = 8, title: str | None = None) -> Figure:
    """Images side by side: one row per named batch (n, C, H, W) — e.g. clean, noisy and each
    denoiser — the first ``n`` columns; ``labels`` (one per row) annotate the rows."""
    batches = {k: image_batch(v) for k, v in rows.items()}
    if not batches:
        raise ValueError("rows is empty")
    cols = min(n, min(len(b) for b in batches.values()))
    fig = Figure(figsize=(0.8 * cols + 1.4, 0.8 * len(batches) + 0.4), layout="constrained")
    axes = fig.subplots(len(batches), cols, squeeze=False)
    for r, (name, imgs) in enumerate(batches.items()):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(as_image(imgs[c]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        row_label(axes[r, 0], labels[r] if labels is not None else name)
    if title:
        suptitle(fig, title)
    return fig
