"""Figures of normalizing flows: 2-D densities, volume change, sample grids, interpolations.

The functions take any flow with ``model(x) -> (z, log|det ∂z/∂x|)``, ``model.decode(z) -> x``
and ``model.log_prob(x)``, batched on the first axis (NICE, Dinh et al. 2014; RealNVP, Dinh et
al. 2017; Glow, Kingma & Dhariwal 2018); grids are evaluated under ``torch.no_grad()`` with
every submodule in eval mode, in chunks, in the dtype and on the device of the flow's
parameters (float32 on the CPU when it has none)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from .._utils import eval_mode
from .style import BLUE, GREY, RED, as_image, image_batch, row_label, suptitle, to_numpy

__all__ = [
    "flow_density_2d",
    "flow_volume_change",
    "sample_grid",
    "interpolation_strips",
]

_CHUNK = 4096


def _flow_dtype(model) -> tuple[torch.dtype, torch.device]:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))


def _chunked(fn, model, pts: np.ndarray, chunk: int = _CHUNK) -> np.ndarray:
    """``fn(x)`` on the rows of ``pts`` (float64 numpy), ``chunk`` rows at a time, as numpy."""
    dtype, device = _flow_dtype(model)
    out = []
    with torch.no_grad(), eval_mode(model):
        for i in range(0, len(pts), chunk):
            x = torch.as_tensor(pts[i:i + chunk], dtype=dtype, device=device)
            out.append(to_numpy(fn(x)))
    return np.concatenate(out) if out else np.zeros((0,))


def _points_2d(data) -> np.ndarray:
    pts = to_numpy(data).reshape(len(data), -1) if data is not None else np.zeros((0, 2))
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
        ax.scatter(pts[:, 0], pts[:, 1], s=3, color=GREY, alpha=0.35, lw=0, rasterized=True,
                   label="data")
    axis = np.isclose(levels, 0.0, atol=1e-9 * span)
    for k, (color, name) in enumerate(((BLUE, "z₂ = const"), (RED, "z₁ = const"))):
        for i in range(lines):
            ax.plot(x[k, i, :, 0], x[k, i, :, 1], color=color, lw=1.4 if axis[i] else 0.6,
                    alpha=0.9, label=name if i == 0 else None)
    ax.legend(frameon=True, framealpha=0.8, fontsize=7, loc="upper right", markerscale=3)
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


def sample_grid(samples, *, temperatures=None, nrow: int | None = None,
                title: str | None = None) -> Figure:
    """Image samples tiled ``nrow`` to a row (default: up to 8). ``samples``: a tensor
    (n, C, H, W), or a dict {temperature: (n, C, H, W)} for one labelled block ("T = 0.7")
    per temperature, in ``temperatures``' order when given (else sorted), or a list / 5-D
    tensor of such batches labelled by ``temperatures``. Values clipped to [0, 1]; C = 1 is
    drawn in gray (ink dark, as elsewhere in this module), C = 3 as RGB. ``title``: default
    "n samples"."""
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
    batches = [(label, image_batch(s)) for label, s in blocks]
    n_max = max(len(b) for _, b in batches)
    cols = max(1, min(nrow or min(n_max, 8), n_max))
    h, w = batches[0][1].shape[2:]
    rows = [-(-len(b) // cols) for _, b in batches]
    tile = min(1.0, 10.0 / cols)  # inches per image: about 1, at most 10 in. per row
    margin = 0.6 + 0.5 * any(label for label, _ in batches)  # room for "T = 0.7"
    fig = Figure(figsize=(max(2.5, cols * tile + margin),
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
    total = sum(len(b) for _, b in batches)
    suptitle(fig, title or f"{total} sample{'s' if total != 1 else ''}", fontsize=10)
    return fig


def interpolation_strips(frames, *, title: str | None = None,
                         labels: Sequence[str] | None = None) -> Figure:
    """Latent interpolations: ``frames`` (pairs, steps, C, H, W), one row per pair and one
    column per step; the endpoints (first and last column) are framed in red and titled
    "start" / "end", the steps between with their fraction t. ``labels``: one per row."""
    f = np.clip(to_numpy(frames), 0.0, 1.0)
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
            ax.imshow(as_image(f[r, j]), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
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
            row_label(axes[r, 0], labels[r])
    if title:
        suptitle(fig, title, fontsize=9)
    return fig
