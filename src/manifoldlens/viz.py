"""Figures. Every function returns a :class:`matplotlib.figure.Figure` built without pyplot,
so no GUI backend is touched; save it with ``fig.savefig`` or :meth:`Run.save_figure`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

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
    "flow_density_2d",
    "flow_volume_change",
    "sample_grid",
    "interpolation_strips",
    "plot_attribution_decomposition",
    "plot_fraction_by_method",
    "plot_fraction_over_training",
    "plot_roar",
    "plot_principal_angles",
]

BLUE, RED, GREY = "#1f5fa8", "#c8372d", "#7f7f7f"


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25, linewidth=0.6)


def plot_trace_of_g(records: Sequence[dict]) -> Figure:
    """Seed 001 Figure 2: mean trace of G on a probe batch during training (blue) and its
    exponential moving average (red); below, the mean numerical rank and the share of
    probe points at full rank C − 1."""
    steps = np.array([r["step"] for r in records])
    fig = Figure(figsize=(7, 5.2), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 1])
    ax.plot(steps, [r["mean_trace"] for r in records], color=BLUE, lw=1.0, alpha=0.8,
            label="mean trace of G(x, w)")
    ax.plot(steps, [r["ema_trace"] for r in records], color=RED, lw=2.0,
            label="exponential moving average")
    ax.axhline(records[0]["ema_trace"], color=GREY, ls="--", lw=0.8, label="value at step 0")
    ax.set_yscale("log")
    ax.set_ylabel("Tr G  (soft rank)")
    ax.legend(frameon=False, fontsize=8)
    _style(ax)
    ax2.plot(steps, [r["mean_rank"] for r in records], color=BLUE, lw=1.2, label="mean rank")
    ax2.set_ylabel("numerical rank")
    ax2.set_xlabel("training step")
    ax3 = ax2.twinx()
    ax3.plot(steps, [r["full_rank_fraction"] for r in records], color=RED, lw=1.0, ls=":",
             label="share at rank C − 1")
    ax3.set_ylim(-0.05, 1.05)
    ax3.set_ylabel("share at C − 1", color=RED)
    _style(ax2)
    ax.set_title("Trace of the local data matrix during training", fontsize=11)
    return fig


def plot_trace_histogram(
    trace, labels=None, classes: Sequence[str] | None = None, bins: int = 40
) -> Figure:
    """Histogram of Tr G(x) over a split (log scale), stacked by true class when given."""
    tr = _np(trace)
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    pos = tr[tr > 0]
    edges = np.logspace(np.log10(pos.min()), np.log10(pos.max()), bins + 1) if pos.size else bins
    if labels is not None:
        lab = _np(labels).astype(int)
        ks = np.unique(lab)
        names = [classes[k] if classes else str(k) for k in ks]
        cmap = _class_colors(len(ks))
        ax.hist([tr[lab == k] for k in ks], bins=edges, stacked=True, color=cmap, label=names)
        ax.legend(frameon=False, fontsize=7, ncol=2, title="true class", title_fontsize=7,
                  loc="upper left")
    else:
        ax.hist(tr, bins=edges, color=BLUE)
    ax.set_xscale("log")
    ax.set_xlabel("Tr G(x) = E_{y~p} ||grad log p_y||^2")
    ax.set_ylabel("count")
    ax.set_title(f"Trace of G over {tr.size} points (median {np.median(tr):.3g})", fontsize=11)
    _style(ax)
    return fig


def _class_colors(k: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def plot_spectra(eigenvalues, *, normalize: bool = True) -> Figure:
    """Eigenvalue spectra of G over a split: median and 10–90 % band of λ_k (optionally
    λ_k / λ_1) for k = 1..C, log scale. The last eigenvalue is 0 (rank ≤ C − 1)."""
    ev = _np(eigenvalues)
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
    _style(ax)
    return fig


def plot_rank_counts(ranks, num_classes: int) -> Figure:
    """How many points have each numerical rank of G (bound: C − 1)."""
    r = _np(ranks).astype(int)
    counts = np.bincount(r, minlength=num_classes + 1)[: num_classes + 1]
    fig = Figure(figsize=(5.5, 3.4), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(np.arange(num_classes + 1), counts, color=BLUE)
    bars[num_classes - 1].set_color(RED)
    ax.set_xticks(np.arange(num_classes + 1))
    ax.set_xlabel("numerical rank of G(x)   (red: the bound C − 1)")
    ax.set_ylabel("points")
    ax.set_title("Rank of the local data matrix", fontsize=11)
    _style(ax)
    return fig


def plot_gram(
    gram, labels, classes: Sequence[str] | None = None, *, title: str | None = None
) -> Figure:
    """The Jacobian correlation matrix M ordered by class, with class boundaries, beside the
    C × C matrix of class-block means (diagonal: within-class, self-pairs excluded)."""
    from .jacobian import class_correlation

    m = _np(gram)
    lab = _np(labels).astype(int)
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
    ax.set_title(title or f"Jacobian correlation matrix M ({m.shape[0]} points)", fontsize=10)
    ticks = [s * lim * 10.0**-k for s in (-1, 1) for k in (0, 2, 4)] + [0] if logscale else None
    cb = fig.colorbar(im, ax=ax, shrink=0.8, ticks=ticks)
    if logscale:
        cb.ax.set_yticklabels([f"{t:.1e}" if t else "0" for t in ticks], fontsize=7)
    cc = class_correlation(torch.as_tensor(m), torch.as_tensor(lab))
    bm = _np(cc.block_means)
    lim2 = np.nanmax(np.abs(bm)) or 1.0
    im2 = ax2.imshow(bm, cmap="RdBu_r", vmin=-lim2, vmax=lim2)
    ax2.set_xticks(range(len(ks)), names, rotation=90, fontsize=7)
    ax2.set_yticks(range(len(ks)), names, fontsize=7)
    ax2.set_title(
        f"class-block means: within {cc.within:.3g}, between {cc.between:.3g}", fontsize=10
    )
    fig.colorbar(im2, ax=ax2, shrink=0.8)
    return fig


def plot_gram_spectrum(eigenvalues, k: int = 100) -> Figure:
    """Top eigenvalues of M (log scale) and their cumulative share of the trace."""
    ev = np.clip(_np(eigenvalues), 0, None)
    top = ev[:k]
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.semilogy(np.arange(1, top.size + 1), np.maximum(top, 1e-30), "o-", ms=3, color=BLUE)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue of M")
    ax2 = ax.twinx()
    ax2.plot(np.arange(1, top.size + 1), np.cumsum(top) / max(ev.sum(), 1e-300), color=RED)
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative share of trace", color=RED)
    ax.set_title("Spectrum of the Jacobian correlation matrix", fontsize=11)
    _style(ax)
    return fig


def plot_eigenvectors(
    images, eigenvalues, eigenvectors, probs=None, classes: Sequence[str] | None = None,
    k: int = 5,
) -> Figure:
    """For each image (row), the image and the top-k eigenvectors of G(x) as images, with
    their eigenvalues: the directions along which the prediction changes fastest."""
    imgs = _np(images)
    ev = _np(eigenvalues)
    vecs = _np(eigenvectors)
    n = imgs.shape[0]
    k = min(k, vecs.shape[1])
    fig = Figure(figsize=(1.5 * (k + 1), 1.6 * n), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, k + 1))
    for i in range(n):
        img = imgs[i].reshape(imgs.shape[1:]).squeeze()
        if img.ndim == 3:
            img = np.moveaxis(img, 0, -1)
        axes[i, 0].imshow(img, cmap="gray_r", vmin=0, vmax=1)
        if probs is not None:
            p = _np(probs)[i]
            c = int(p.argmax())
            axes[i, 0].set_title(f"{classes[c] if classes else c}: {p[c]:.2f}", fontsize=7)
        for j in range(k):
            v = vecs[i, j].reshape(imgs.shape[1:]).squeeze()
            if v.ndim == 3:
                v = v.mean(0)
            lim = np.abs(v).max() or 1.0
            axes[i, j + 1].imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[i, j + 1].set_title(f"λ{j + 1} = {ev[i, j]:.2g}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Inputs and the top eigenvectors of G(x)", fontsize=10)
    return fig


def plot_training(history: Sequence[dict]) -> Figure:
    """Test loss and accuracy over training."""
    steps = [h["step"] for h in history]
    fig = Figure(figsize=(6.5, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, [h["test_loss"] for h in history], "o-", ms=3, color=BLUE, label="test loss")
    ax.set_xlabel("training step")
    ax.set_ylabel("test cross-entropy", color=BLUE)
    ax2 = ax.twinx()
    ax2.plot(steps, [h["test_accuracy"] for h in history], "s-", ms=3, color=RED)
    ax2.set_ylabel("test accuracy", color=RED)
    ax2.set_ylim(0, 1.02)
    _style(ax)
    ax.set_title("Evaluation during training", fontsize=11)
    return fig


def _as_image(t: np.ndarray) -> np.ndarray:
    img = np.asarray(t)
    if img.ndim == 3:
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    elif img.ndim == 1:
        side = int(round(np.sqrt(img.size)))
        img = img.reshape(side, side) if side * side == img.size else img[None, :]
    return img


def _frame_indices(steps: int, frames: int) -> np.ndarray:
    return np.unique(np.linspace(0, steps - 1, min(frames, steps)).round().astype(int))


def plot_path_strip(result, i: int = 0, *, frames: int = 8, classes=None,
                    title: str | None = None) -> Figure:
    """Images along path ``i`` of a :class:`~manifoldlens.foliation.PathResult`, with the
    predicted class and its probability under each and the step above (seed 001 Fig. 3–6)."""
    return plot_path_grid([(result, i, None)], frames=frames, classes=classes, title=title,
                          step_prefix="step ")


def save_path_gif(result, path, i: int = 0, *, frames: int = 40, classes=None,
                  fps: int = 8):
    """Animated GIF of path ``i`` with the prediction in the title (Pillow writer)."""
    from pathlib import Path

    from matplotlib.animation import FuncAnimation, PillowWriter

    pts = _np(result.points[:, i])
    probs = _np(result.probs[:, i])
    steps = _np(result.record_steps).astype(int)
    idx = _frame_indices(len(steps), frames)
    fig = Figure(figsize=(2.4, 2.6), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(_as_image(pts[idx[0]]), cmap="gray_r", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])

    def update(k):
        im.set_data(_as_image(pts[k]))
        c = int(probs[k].argmax())
        name = classes[c] if classes is not None else str(c)
        ax.set_title(f"step {steps[k]} — {name}: {probs[k, c]:.2f}", fontsize=8)
        return (im,)

    anim = FuncAnimation(fig, update, frames=list(idx), blit=False)
    path = Path(path)
    anim.save(str(path), writer=PillowWriter(fps=fps))
    return path


def plot_path_grid(rows, *, frames: int = 8, classes=None, title: str | None = None,
                   step_prefix: str = "") -> Figure:
    """Several paths as rows of image strips. ``rows``: ``(result, index, label)`` tuples,
    where ``result`` has ``points`` (T, n, ...), ``probs`` (T, n, C), ``record_steps`` (T,).
    Each row shows up to ``frames`` evenly spaced records, with the predicted class and its
    probability under each image and the step above."""
    picks = [_frame_indices(len(res.record_steps), frames) for res, _, _ in rows]
    k = max(len(p) for p in picks)
    fig = Figure(figsize=(1.25 * k + 1.2, 1.55 * len(rows)), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), k, squeeze=False))
    for r, ((res, i, label), idx) in enumerate(zip(rows, picks, strict=True)):
        pts = _np(res.points[:, i])
        probs = _np(res.probs[:, i])
        steps = _np(res.record_steps).astype(int)
        for j in range(k):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(idx):
                ax.axis("off")
                continue
            t = idx[j]
            ax.imshow(_as_image(pts[t]), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            c = int(probs[t].argmax())
            name = classes[c] if classes is not None else str(c)
            ax.set_xlabel(f"{name}: {probs[t, c]:.2f}", fontsize=6)
            ax.set_title(f"{step_prefix}{steps[t]}", fontsize=6)
        if label:
            axes[r, 0].set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_curves(x, curves: dict, *, xlabel: str = "step", title: str | None = None,
                logy: Sequence[str] = ()) -> Figure:
    """One panel per named curve; each value is (T,) or (T, n) (mean ± std band over n)."""
    names = list(curves)
    fig = Figure(figsize=(3.3 * len(names), 2.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    xs = _np(x)
    for ax, name in zip(axes, names, strict=True):
        y = _np(curves[name])
        if y.ndim == 2:
            m, s = np.nanmean(y, 1), np.nanstd(y, 1)
            ax.plot(xs, y, color=BLUE, alpha=0.15, lw=0.6)
            ax.plot(xs, m, color=RED, lw=1.6)
            ax.fill_between(xs, m - s, m + s, color=RED, alpha=0.15)
        else:
            ax.plot(xs, y, color=BLUE, lw=1.4)
        if name in logy:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        _style(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_residual_histogram(residuals, *, title: str | None = None) -> Figure:
    """log10 of involutivity residuals ‖P_ker [X_i, X_j]‖ / ‖[X_i, X_j]‖."""
    r = _np(residuals).ravel()
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
    ax.set_title(title or f"Involutivity residuals (median {np.median(r):.2g})", fontsize=10)
    _style(ax)
    return fig


# ---------------------------------------------------------------------------------------------
# Normalizing flows. The functions take any flow with ``model(x) -> (z, log|det ∂z/∂x|)``,
# ``model.decode(z) -> x`` and ``model.log_prob(x)``, batched on the first axis; grids are
# evaluated under ``torch.no_grad()`` in chunks, in the dtype and on the device of the
# flow's parameters (float32 on the CPU when it has none).

_CHUNK = 4096


def _flow_dtype(model) -> tuple[torch.dtype, torch.device]:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))


class _evaluating:
    """Puts every submodule of an ``nn.Module`` in eval mode and restores each one's mode."""

    def __init__(self, model):
        self.modes = ([(m, m.training) for m in model.modules()]
                      if isinstance(model, torch.nn.Module) else [])

    def __enter__(self):
        for m, _ in self.modes:
            m.training = False

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


def _chunked(fn, model, pts: np.ndarray, chunk: int = _CHUNK) -> np.ndarray:
    """``fn(x)`` on the rows of ``pts`` (float64 numpy), ``chunk`` rows at a time, as numpy."""
    dtype, device = _flow_dtype(model)
    out = []
    with torch.no_grad(), _evaluating(model):
        for i in range(0, len(pts), chunk):
            x = torch.as_tensor(pts[i:i + chunk], dtype=dtype, device=device)
            out.append(_np(fn(x)))
    return np.concatenate(out) if out else np.zeros((0,))


def _points_2d(data) -> np.ndarray:
    pts = _np(data).reshape(len(data), -1) if data is not None else np.zeros((0, 2))
    if pts.shape[1] != 2:
        raise ValueError(f"expected 2-D points of shape (N, 2), got {tuple(pts.shape)}")
    return pts[np.isfinite(pts).all(1)]


def _box(pts: np.ndarray, bounds=None, pad: float = 0.1) -> tuple[float, float, float, float]:
    """``bounds`` as floats, or the range of ``pts`` padded by ``pad`` of its width per side."""
    if bounds is not None:
        x0, x1, y0, y1 = (float(b) for b in bounds)
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"bounds must be (xmin, xmax, ymin, ymax) with min < max: {bounds}")
        return x0, x1, y0, y1
    if len(pts) == 0:
        return -3.0, 3.0, -3.0, 3.0
    lo, hi = pts.min(0), pts.max(0)
    w = np.where(hi > lo, hi - lo, 1.0)
    return (float(lo[0] - pad * w[0]), float(hi[0] + pad * w[0]),
            float(lo[1] - pad * w[1]), float(hi[1] + pad * w[1]))


def _cell_centres(box, grid: int) -> tuple[np.ndarray, float]:
    """Centres (grid², 2) of a grid × grid mesh of cells over ``box``, row-major from the
    bottom (ready for ``imshow(..., origin="lower")``), and the area of one cell."""
    x0, x1, y0, y1 = box
    dx, dy = (x1 - x0) / grid, (y1 - y0) / grid
    xs = x0 + dx * (np.arange(grid) + 0.5)
    ys = y0 + dy * (np.arange(grid) + 0.5)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], 1), dx * dy


def _scatter_or_hist(ax, pts: np.ndarray, box, bins: int, color: str) -> None:
    """Points as a scatter when there are few, as a 2-D histogram (density) when many."""
    if len(pts) <= 5000:
        ax.scatter(pts[:, 0], pts[:, 1], s=3, color=color, alpha=0.5, lw=0, rasterized=True)
        ax.set_facecolor("white")
    else:
        ax.hist2d(pts[:, 0], pts[:, 1], bins=bins, range=[box[:2], box[2:]], density=True,
                  cmap="viridis", rasterized=True)


def _square_panel(ax, box) -> None:
    ax.set_xlim(box[0], box[1])
    ax.set_ylim(box[2], box[3])
    ax.set_aspect("equal")
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")


def flow_density_2d(model, data, *, bounds=None, grid: int = 200, samples=None,
                    title: str | None = None) -> Figure:
    """The training data, the flow's density exp(log_prob) on a ``grid`` × ``grid`` mesh of
    cells over ``bounds`` = (xmin, xmax, ymin, ymax) (default: the data's range padded by
    10 %), and, when given, samples from the flow, side by side on equal axes. The panel
    title of the density gives its integral over the box (midpoint rule: Σ p × cell area),
    also stored as ``fig.density_integral``: near 1 when the box holds the mass."""
    pts = _points_2d(data)
    box = _box(pts, bounds)
    centres, area = _cell_centres(box, grid)
    p = np.exp(_chunked(model.log_prob, model, centres).reshape(grid, grid))
    bad = int((~np.isfinite(p)).sum())
    p = np.where(np.isfinite(p), p, 0.0)
    integral = float(p.sum() * area)
    n = 2 if samples is None else 3
    fig = Figure(figsize=(3.6 * n + 0.8, 3.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    bins = int(np.clip(np.sqrt(len(pts) / 4), 20, grid))
    _scatter_or_hist(axes[0], pts, box, bins, BLUE)
    axes[0].set_title(f"training data ({len(pts)} points)", fontsize=10)
    im = axes[1].imshow(p, origin="lower", extent=box, cmap="viridis", interpolation="nearest",
                        aspect="auto")
    fig.colorbar(im, ax=axes[1], shrink=0.8, label="p(x)")
    note = f", {bad} non-finite cells as 0" if bad else ""
    axes[1].set_title(f"flow density: ∫p ≈ {integral:.3f} over the box{note}", fontsize=10)
    if samples is not None:
        sp = _points_2d(samples)
        _scatter_or_hist(axes[2], sp, box, int(np.clip(np.sqrt(len(sp) / 4), 20, grid)), RED)
        axes[2].set_title(f"flow samples ({len(sp)})", fontsize=10)
    for ax in axes:
        _square_panel(ax, box)
    fig.suptitle(title or "Normalizing flow: data and learned density", fontsize=11)
    fig.density_integral = integral
    return fig


def flow_volume_change(model, data=None, *, bounds=None, grid: int = 200, lines: int = 21,
                       title: str | None = None, span: float = 3.0) -> Figure:
    """How a 2-D flow bends space. Left: ``lines`` horizontal and ``lines`` vertical lines of
    the latent square [-span, span]² (z₁ = 0 and z₂ = 0 drawn thicker) mapped to data space by
    ``model.decode``, over the data in light grey. Right: log|det ∂z/∂x| (the second output
    of ``model(x)``) on a ``grid`` × ``grid`` mesh over ``bounds`` (default: the data's range,
    else the mapped lines' range, padded by 10 %), on a diverging scale centred at 0.

    Sign convention: log|det ∂z/∂x| > 0 (red) where the encoder x → z expands volume, i.e.
    the generator z → x contracts it and squeezes latent mass into a small region of data
    space (density concentrated there); < 0 (blue) where the generator expands volume and
    spreads the mass thin. p(x) = p_z(z(x)) · |det ∂z/∂x|."""
    pts = _points_2d(data)
    t = np.linspace(-span, span, 200)
    levels = np.linspace(-span, span, lines)
    z = np.concatenate([np.stack([t, np.full_like(t, c)], 1) for c in levels]
                       + [np.stack([np.full_like(t, c), t], 1) for c in levels])
    x = _chunked(model.decode, model, z).reshape(2, lines, len(t), -1)
    finite = x.reshape(-1, x.shape[-1])
    finite = finite[np.isfinite(finite).all(1)]
    box = _box(pts if len(pts) else finite, bounds)
    centres, _ = _cell_centres(box, grid)
    ld = _chunked(lambda v: model(v)[1], model, centres).reshape(grid, grid)
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    if len(pts):
        ax.scatter(pts[:, 0], pts[:, 1], s=3, color=GREY, alpha=0.35, lw=0, rasterized=True)
    axis = np.isclose(levels, 0.0, atol=1e-9 * span)
    for k, color in enumerate((BLUE, RED)):
        for i in range(lines):
            ax.plot(x[k, i, :, 0], x[k, i, :, 1], color=color, lw=1.4 if axis[i] else 0.6,
                    alpha=0.9)
    ax.set_title(f"latent grid [−{span:g}, {span:g}]² mapped by decode\n"
                 "blue: z₂ = const, red: z₁ = const", fontsize=9)
    fin = ld[np.isfinite(ld)]
    lim = float(np.abs(fin).max()) if fin.size else 1.0
    lim = lim or 1.0
    im = ax2.imshow(ld, origin="lower", extent=box, cmap="RdBu_r", vmin=-lim, vmax=lim,
                    interpolation="nearest", aspect="auto")
    straddles = bool(fin.size) and fin.min() < 0 < fin.max()
    if straddles:
        ax2.contour(centres[:, 0].reshape(grid, grid), centres[:, 1].reshape(grid, grid), ld,
                    levels=[0.0], colors="k", linewidths=0.6)
    cb = fig.colorbar(im, ax=ax2, shrink=0.85)
    cb.set_label("log|det ∂z/∂x|\n> 0: generator contracts volume (density concentrated)\n"
                 "< 0: generator expands volume (density spread)", fontsize=8)
    ax2.set_title("volume change log|det ∂z/∂x|" + ("\nblack line: 0" if straddles else ""),
                  fontsize=9)
    for a in (ax, ax2):
        _square_panel(a, box)
    fig.suptitle(title or "How the flow deforms space", fontsize=11)
    return fig


def _mosaic(imgs: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """Tiles (n, C, H, W) in [0, 1] into one image, ``nrow`` per row, separated by ``pad``
    pixels of NaN (grayscale) or light grey (RGB)."""
    n, c, h, w = imgs.shape
    rows = -(-n // nrow)
    fill = np.nan if c == 1 else 0.82
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill)
    for i in range(n):
        r, q = divmod(i, nrow)
        out[pad + r * (h + pad):pad + r * (h + pad) + h,
            pad + q * (w + pad):pad + q * (w + pad) + w] = np.moveaxis(imgs[i], 0, -1)
    return out[..., 0] if c == 1 else out


def _image_batch(t) -> np.ndarray:
    imgs = np.clip(_np(t), 0.0, 1.0)
    if imgs.ndim != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(f"expected images (n, C, H, W) with C = 1 or 3, got {imgs.shape}")
    return imgs


def sample_grid(samples, *, temperatures=None, nrow: int | None = None,
                title: str | None = None) -> Figure:
    """Image samples tiled ``nrow`` to a row (default: up to 8). ``samples``: a tensor
    (n, C, H, W), or a dict {temperature: (n, C, H, W)} for one labelled block ("T = 0.7")
    per temperature, in ``temperatures``' order when given (else sorted), or a list / 5-D
    tensor of such batches labelled by ``temperatures``. Values clipped to [0, 1]; C = 1 is
    drawn in gray (ink dark, as elsewhere in this module), C = 3 as RGB."""
    from matplotlib import colormaps

    if isinstance(samples, dict):
        keys = list(temperatures) if temperatures is not None else sorted(samples)
        blocks = [(f"T = {k:g}" if isinstance(k, int | float) else f"T = {k}", samples[k])
                  for k in keys]
    elif isinstance(samples, list | tuple) or getattr(samples, "ndim", 0) == 5:
        temps = list(temperatures) if temperatures is not None else [None] * len(samples)
        if len(temps) != len(samples):
            raise ValueError(f"{len(samples)} sample batches but {len(temps)} temperatures")
        blocks = [(None if k is None else f"T = {k:g}", s)
                  for k, s in zip(temps, samples, strict=True)]
    else:
        blocks = [(None if temperatures is None else f"T = {float(temperatures):g}", samples)]
    batches = [(label, _image_batch(s)) for label, s in blocks]
    n_max = max(len(b) for _, b in batches)
    cols = max(1, min(nrow or min(n_max, 8), n_max))
    h, w = batches[0][1].shape[2:]
    rows = [-(-len(b) // cols) for _, b in batches]
    tile = min(1.0, 10.0 / cols)  # inches per image: about 1, at most 10 in. per row
    fig = Figure(figsize=(max(2.5, cols * tile + 0.6),
                          max(1.5, sum(r * tile * h / w + 0.3 for r in rows) + 0.4)),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(batches), 1, height_ratios=rows))
    gray = colormaps["gray_r"].with_extremes(bad="#d4d4d4")
    for ax, (label, imgs) in zip(axes, batches, strict=True):
        ax.imshow(_mosaic(imgs, cols), cmap=gray, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        if label:
            ax.set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def interpolation_strips(frames, *, title: str | None = None,
                         labels: Sequence[str] | None = None) -> Figure:
    """Latent interpolations: ``frames`` (pairs, steps, C, H, W), one row per pair and one
    column per step; the endpoints (first and last column) are framed in red and titled
    "start" / "end", the steps between with their fraction t. ``labels``: one per row."""
    f = np.clip(_np(frames), 0.0, 1.0)
    if f.ndim != 5:
        raise ValueError(f"expected frames (pairs, steps, C, H, W), got shape {f.shape}")
    pairs, steps = f.shape[:2]
    if labels is not None and len(labels) != pairs:
        raise ValueError(f"{pairs} rows but {len(labels)} labels")
    fig = Figure(figsize=(1.05 * steps + 0.8, 1.15 * pairs + 0.5), layout="constrained")
    axes = np.asarray(fig.subplots(pairs, steps, squeeze=False))
    for r in range(pairs):
        for j in range(steps):
            ax = axes[r, j]
            ax.imshow(_as_image(f[r, j]), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            end = j in (0, steps - 1)
            for s in ax.spines.values():
                s.set_color(RED if end else GREY)
                s.set_linewidth(2.0 if end else 0.5)
            if r == 0:
                t = j / max(steps - 1, 1)
                name = "start" if j == 0 else "end" if j == steps - 1 else f"t = {t:.2f}"
                ax.set_title(name, fontsize=7, color=RED if end else "k")
        if labels is not None:
            axes[r, 0].set_ylabel(labels[r], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# Attributions and the data manifold (seed 004, Bordt et al.). Inputs are numpy arrays or
# torch tensors; fractions in tangent space are ‖P_T a‖ / ‖a‖ in [0, 1].

PURPLE = "#7b3294"
_PALETTE = (BLUE, RED, "#2ca02c", "#ff7f0e", "#8c564b", "#17becf", "#bcbd22", "#e377c2")
_PARTS = ("attribution", "tangent", "orthogonal")


def _series_colors(k: int) -> list:
    return [_PALETTE[i % len(_PALETTE)] for i in range(k)]


def _signed_map(a: np.ndarray) -> tuple[np.ndarray, float]:
    """A (C, H, W) attribution as one (H, W) map (channels summed) and its limit max|value|
    (1 when it is all zero or not finite)."""
    m = a.sum(0)
    fin = np.abs(m[np.isfinite(m)])
    lim = float(fin.max()) if fin.size else 0.0
    return m, lim or 1.0


def plot_attribution_decomposition(images, parts: dict, *, labels: Sequence[str] | None = None,
                                   title: str | None = None) -> Figure:
    """Seed 004 Figure 2: one column per image; the image (first row), then for each method
    in ``parts`` (name → {"attribution", "tangent", "orthogonal"}, each (n, C, H, W)) three
    rows: the attribution, its part in the tangent space and its part orthogonal to it.
    Signed maps (channels summed) on "RdBu_r" (red > 0, blue < 0, white 0), each panel on its
    own symmetric scale ±max|value|, written under it; under the tangent part also its
    fraction ‖tangent‖ / ‖attribution‖. ``labels``: one per image, above the image row."""
    imgs = _image_batch(images)
    n = imgs.shape[0]
    if labels is not None and len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    maps: dict[str, dict[str, np.ndarray]] = {}
    for name, p in parts.items():
        missing = [k for k in _PARTS if k not in p]
        if missing:
            raise ValueError(f"parts[{name!r}] lacks {missing}; needs keys {list(_PARTS)}")
        maps[name] = {}
        for k in _PARTS:
            a = _np(p[k]).astype(float)
            if a.size != imgs.size:
                raise ValueError(f"parts[{name!r}][{k!r}] has shape {a.shape}, "
                                 f"the images {imgs.shape}")
            maps[name][k] = a.reshape(imgs.shape)
    rows = 1 + 3 * len(maps)
    fig = Figure(figsize=(1.15 * n + 1.4, 1.2 * rows + 0.5), layout="constrained")
    axes = np.asarray(fig.subplots(rows, n, squeeze=False))
    for j in range(n):
        ax = axes[0, j]
        ax.imshow(_as_image(imgs[j]), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        if labels is not None:
            ax.set_title(labels[j], fontsize=7)
    axes[0, 0].set_ylabel("image", fontsize=7)
    for m, (name, p) in enumerate(maps.items()):
        for r, k in enumerate(_PARTS):
            row = 1 + 3 * m + r
            axes[row, 0].set_ylabel(name if k == "attribution" else f"{name}: {k}", fontsize=7)
            for j in range(n):
                ax = axes[row, j]
                v, lim = _signed_map(p[k][j])
                ax.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
                note = f"±{lim:.2g}"
                if k == "tangent":
                    full = float(np.linalg.norm(p["attribution"][j]))
                    if full > 0 and np.isfinite(full):
                        note += f" · frac {np.linalg.norm(p[k][j]) / full:.2f}"
                ax.set_xlabel(note, fontsize=6, labelpad=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or "Attributions and their parts in and orthogonal to the tangent space"
                 "\n(red > 0, blue < 0; each panel on its own scale ±max|value|)", fontsize=9)
    return fig


def _fractions(name, values) -> np.ndarray:
    f = _np(values).astype(float).ravel()
    if f.size == 0:
        raise ValueError(f"fractions[{name!r}] is empty")
    bad = int((~np.isfinite(f)).sum())
    if bad:
        raise ValueError(f"fractions[{name!r}] has {bad} NaN or infinite values")
    if f.min() < -1e-6 or f.max() > 1 + 1e-6:  # float rounding of ‖P a‖ / ‖a‖ tolerated
        raise ValueError(f"fractions[{name!r}] must lie in [0, 1], got values in "
                         f"[{f.min():.3g}, {f.max():.3g}]")
    return np.clip(f, 0.0, 1.0)


def _baseline_line(ax, baseline: float | None) -> None:
    if baseline is not None:
        ax.axhline(float(baseline), color=GREY, ls="--", lw=1.0,
                   label=f"random √(k/d) ≈ {float(baseline):.3f}")


def plot_fraction_by_method(fractions: dict, *, baseline: float | None = None,
                            title: str | None = None,
                            ylabel: str = "fraction in tangent space") -> Figure:
    """Seed 004 Figures 3 and 7: box plots of per-sample fractions in tangent space, one per
    name in ``fractions`` (a method, or "method (model)": boxes are coloured by the model in
    parentheses, else by name), the mean marked (red diamond) and written above each box;
    ``baseline`` (the random √(k/d)) dashed. Values must lie in [0, 1] and be finite."""
    names = list(fractions)
    if not names:
        raise ValueError("fractions is empty")
    data = [_fractions(name, fractions[name]) for name in names]
    groups = [s[s.rfind("(") + 1:-1] if s.endswith(")") and "(" in s else s
              for s in map(str, names)]
    keys = list(dict.fromkeys(groups))
    colors = dict(zip(keys, _series_colors(len(keys)), strict=True))
    pos = np.arange(1, len(names) + 1)
    fig = Figure(figsize=(max(4.0, 0.95 * len(names) + 1.6), 4.0), layout="constrained")
    ax = fig.subplots()
    bp = ax.boxplot(data, positions=pos, widths=0.55, patch_artist=True,
                    medianprops={"color": "k", "lw": 1.2},
                    flierprops={"marker": ".", "ms": 3, "alpha": 0.5})
    for box, g in zip(bp["boxes"], groups, strict=True):
        box.set_facecolor(colors[g])
        box.set_alpha(0.45)
    means = [float(d.mean()) for d in data]
    ax.scatter(pos, means, marker="D", s=22, color=RED, zorder=3, label="mean")
    top = ax.get_xaxis_transform()  # x in data, y in axes coordinates
    for x, m in zip(pos, means, strict=True):
        ax.text(x, 1.01, f"{m:.2f}", transform=top, ha="center", va="bottom", fontsize=8,
                color=RED)
    _baseline_line(ax, baseline)
    long = len(names) > 5 or max(len(str(s)) for s in names) > 12
    ax.set_xticks(pos, [str(s) for s in names], rotation=25 if long else 0,
                  ha="right" if long else "center", fontsize=8)
    ax.set_xlim(0.4, len(names) + 0.6)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=8, loc="best")
    _style(ax)
    sizes = {d.size for d in data}
    count = f"n = {sizes.pop()} per box" if len(sizes) == 1 else "n varies"
    ax.set_title(title or f"Fraction in tangent space ({count}; mean above each box)",
                 fontsize=10, pad=14)
    return fig


def plot_fraction_over_training(records, *, baseline: float | None = None,
                                title: str | None = None) -> Figure:
    """Seed 004 Figure 6: the mean fraction in tangent space over training steps with a
    shaded 5–95 % band (``records``: dicts with "step", "mean", "q05", "q95", optionally
    "median", drawn dotted), as logged by
    :class:`~manifoldlens.training.TangentFractionDuringTraining`. A dict name → records
    draws one line and band per name (e.g. "standard", "adversarial")."""
    series = dict(records) if isinstance(records, dict) else {None: records}
    if not series:
        raise ValueError("records is empty")
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for (name, recs), color in zip(series.items(), _series_colors(len(series)), strict=True):
        recs = list(recs)
        if not recs:
            raise ValueError(f"no records for {name!r}" if name else "records is empty")
        if any(not {"step", "mean", "q05", "q95"} <= set(r) for r in recs):
            where = f" (series {name!r})" if name is not None else ""
            raise ValueError(f"every record needs 'step', 'mean', 'q05' and 'q95'{where}")
        steps = np.array([r["step"] for r in recs], dtype=float)
        order = np.argsort(steps, kind="stable")
        col = {k: np.array([float(r[k]) for r in recs])[order] for k in ("mean", "q05", "q95")}
        steps = steps[order]
        one = name is None  # one series: every element in the legend; several: their names
        ax.fill_between(steps, col["q05"], col["q95"], color=color, alpha=0.18, lw=0,
                        label="5–95 % of points" if one else None)
        ax.plot(steps, col["mean"], color=color, lw=1.8, label="mean" if one else str(name))
        if all("median" in r for r in recs):
            med = np.array([float(r["median"]) for r in recs])[order]
            ax.plot(steps, med, color=color, lw=1.0, ls=":", label="median" if one else None)
    _baseline_line(ax, baseline)
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction in tangent space")
    key = None if None in series else "line: mean, dotted: median, band: 5–95 %"
    ax.legend(frameon=False, fontsize=8, title=key, title_fontsize=7)
    _style(ax)
    ax.set_title(title or "Fraction of the gradient in tangent space during training",
                 fontsize=11)
    return fig


def plot_roar(results: dict, *, title: str | None = None, remove: str = "top") -> Figure:
    """Seed 004 Figure 5: RemOve And Retrain, as returned by
    :func:`~manifoldlens.attribution.roar`: ``results["fractions"]`` (q per point) and
    name → test accuracies, one per q. One line with markers per name over the share of
    pixels removed (%); "random" grey dashed, "tangent space" purple. ``remove``: "top" (the
    most important pixels went first: the faster accuracy falls, the better the ranking)
    or "bottom"."""
    if remove not in ("top", "bottom"):
        raise ValueError(f"remove must be 'top' or 'bottom', got {remove!r}")
    if "fractions" not in results:
        raise ValueError("results needs 'fractions' (the shares of pixels removed)")
    q = 100.0 * _np(results["fractions"]).astype(float).ravel()
    curves = {k: v for k, v in results.items() if k != "fractions"}
    if not curves:
        raise ValueError("results holds no accuracies besides 'fractions'")
    for name, acc in curves.items():
        if len(_np(acc).ravel()) != len(q):
            raise ValueError(f"results[{name!r}] has {len(_np(acc).ravel())} accuracies but "
                             f"there are {len(q)} fractions")
    fig = Figure(figsize=(6.2, 4.0), layout="constrained")
    ax = fig.subplots()
    others = iter(_series_colors(len(curves)))
    for name, acc in curves.items():
        key = str(name).lower()
        if key == "random":
            style = {"color": GREY, "ls": "--", "marker": "o", "lw": 1.4}
        elif key in ("tangent space", "tangent"):
            style = {"color": PURPLE, "ls": "-", "marker": "s", "lw": 2.0}
        else:
            style = {"color": next(others), "ls": "-", "marker": "o", "lw": 1.4}
        ax.plot(q, _np(acc).astype(float).ravel(), ms=4, label=str(name), **style)
    which = "most" if remove == "top" else "least"
    ax.set_xticks(q, [f"{v:g}" for v in q])
    ax.set_xlabel(f"pixels removed, {which} important first (%)")
    ax.set_ylabel("test accuracy after retraining")
    ax.legend(frameon=False, fontsize=8)
    _style(ax)
    ax.set_title(title or f"ROAR: remove the {which} important pixels and retrain",
                 fontsize=11)
    return fig


def plot_principal_angles(angles, *, title: str | None = None,
                          labels: str | Sequence[str] | None = None) -> Figure:
    """Principal angles (radians, in [0, π/2]) between two subspaces per point, e.g. the
    span of the classifier's gradients D_x and the data's tangent space: histograms of each
    point's smallest angle and of its mean angle, in degrees, with 90° (orthogonal) marked.
    ``angles``: (n, m) (NaN entries, undefined angles, are skipped), a dict name → (n, m),
    or a list of (n, m) named by ``labels`` (one name for a single array)."""
    if isinstance(angles, dict):
        if labels is not None:
            raise ValueError("labels name arrays or lists; a dict is named by its keys")
        series = dict(angles)
    elif isinstance(angles, list | tuple) and angles and all(np.ndim(a) == 2 for a in angles):
        names = list(labels) if labels is not None else [None] * len(angles)
        if len(names) != len(angles):
            raise ValueError(f"{len(angles)} arrays of angles but {len(names)} labels")
        series = dict(zip(names, angles, strict=True))
    else:
        name = labels if isinstance(labels, str) or labels is None else labels[0]
        series = {name: angles}
    if not series:
        raise ValueError("angles is empty")
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    edges = np.linspace(0, 90, 46)
    for (name, a), color in zip(series.items(), _series_colors(len(series)), strict=True):
        a = _np(a).astype(float)
        a = a[:, None] if a.ndim == 1 else a
        if a.ndim != 2:
            raise ValueError(f"expected angles (n, m), got shape {a.shape}")
        a = a[~np.isnan(a).all(1)]
        vals = a[~np.isnan(a)]
        if vals.size == 0:
            raise ValueError(f"no defined angles{f' for {name!r}' if name else ''}")
        if not np.isfinite(vals).all() or vals.min() < -1e-6 or vals.max() > np.pi / 2 + 1e-6:
            raise ValueError(f"angles must be finite radians in [0, π/2], got values in "
                             f"[{vals.min():.3g}, {vals.max():.3g}] (degrees?)")
        deg = np.degrees(np.clip(a, 0, np.pi / 2))
        for ax, v in zip(axes, (np.nanmin(deg, 1), np.nanmean(deg, 1)), strict=True):
            med = f"median {np.median(v):.1f}°"
            ax.hist(v, bins=edges, color=color, alpha=0.4 if len(series) > 1 else 0.85,
                    label=f"{name} ({med})" if name is not None else med)
    for ax, what in zip(axes, ("smallest", "mean"), strict=True):
        ax.axvline(90, color=GREY, ls="--", lw=1.0, label="90°: orthogonal")
        ax.set_xlim(0, 95)
        ax.set_xticks(np.arange(0, 91, 15))
        ax.set_xlabel(f"{what} principal angle (degrees)")
        ax.legend(frameon=False, fontsize=8, loc="best")
        _style(ax)
    axes[0].set_ylabel("points")
    fig.suptitle(title or "Principal angles between the two subspaces at each point",
                 fontsize=11)
    return fig
