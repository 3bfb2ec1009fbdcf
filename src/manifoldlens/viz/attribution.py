"""Figures of attributions and the data manifold (Bordt et al. 2023, "The Manifold Hypothesis
for Gradient-Based Explanations"): attributions split into tangent and orthogonal parts,
fractions in tangent space by method and over training, ROAR and principal angles. Inputs
are numpy arrays or torch tensors; fractions in tangent space are ‖P_T a‖ / ‖a‖ in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .style import (
    BLUE,
    GREY,
    PURPLE,
    RED,
    as_image,
    image_batch,
    point_style,
    row_label,
    style_axes,
    suptitle,
    to_numpy,
    wrap,
)

__all__ = [
    "decomposition_rows",
    "decomposition_caption",
    "plot_attribution_decomposition",
    "plot_fraction_by_method",
    "plot_fraction_over_training",
    "plot_roar",
    "plot_principal_angles",
]

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


def decomposition_rows(methods: Sequence[str]) -> list[str]:
    """The row labels of :func:`plot_attribution_decomposition` in the drawn order, top to
    bottom: "image", then per method its name (the attribution), "name: tangent" and
    "name: orthogonal" (drawn with a line break after the colon).

    >>> decomposition_rows(["gradient"])
    ['image', 'gradient', 'gradient: tangent', 'gradient: orthogonal']
    """
    return ["image"] + [name if k == "attribution" else f"{name}: {k}"
                        for name in map(str, methods) for k in _PARTS]


def decomposition_caption(methods: Sequence[str], images: str = "the images") -> str:
    """A caption naming the rows of :func:`plot_attribution_decomposition` for ``methods``
    (in the order of its ``parts``), numbered from 1 at the top.

    >>> decomposition_caption(["gradient", "smoothgrad"])  # doctest: +NORMALIZE_WHITESPACE
    'Row 1: the images. Rows 2–4: gradient; rows 5–7: smoothgrad: in each group the
    attribution, its part in the tangent space and its part orthogonal to it.'
    """
    groups = "; ".join(f"rows {2 + 3 * m}–{4 + 3 * m}: {name}"
                       for m, name in enumerate(map(str, methods)))
    if not groups:
        return f"Row 1: {images}."
    return (f"Row 1: {images}. {groups[0].upper()}{groups[1:]}: in each group the "
            "attribution, its part in the tangent space and its part orthogonal to it.")


def plot_attribution_decomposition(images, parts: dict, *, labels: Sequence[str] | None = None,
                                   title: str | None = None) -> Figure:
    """Bordt et al. 2023, Fig. 2: one column per image; the image (first row), then for each
    method in ``parts`` (name → {"attribution", "tangent", "orthogonal"}, each (n, C, H, W))
    three rows: the attribution, its part in the tangent space and its part orthogonal to it.
    Signed maps (channels summed) on "RdBu_r" (red > 0, blue < 0, white 0), each panel on its
    own symmetric scale ±max|value|, written under it; under the tangent part also its
    fraction ‖tangent‖ / ‖attribution‖. ``labels``: one per image, above the image row. Row
    labels (:func:`decomposition_rows`) stand horizontally left of their rows; the figure
    keeps them as ``fig.row_labels``."""
    imgs = image_batch(images)
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
            a = to_numpy(p[k]).astype(float)
            if a.size != imgs.size:
                raise ValueError(f"parts[{name!r}][{k!r}] has shape {a.shape}, "
                                 f"the images {imgs.shape}")
            maps[name][k] = a.reshape(imgs.shape)
    names = decomposition_rows(list(maps))
    rows = len(names)
    width = max(len(line) for name in names for line in name.split(": "))  # label characters
    fig = Figure(figsize=(max(1.15 * n + 0.6 + 0.06 * width, 4.0), 1.2 * rows + 0.6),
                 layout="constrained")
    axes = np.asarray(fig.subplots(rows, n, squeeze=False))
    for ax, name in zip(axes[:, 0], names, strict=True):
        row_label(ax, name.replace(": ", ":\n"))
    for j in range(n):
        ax = axes[0, j]
        ax.imshow(as_image(imgs[j]), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        if labels is not None:
            ax.set_title(labels[j], fontsize=7)
    for m, p in enumerate(maps.values()):
        for r, k in enumerate(_PARTS):
            row = 1 + 3 * m + r
            for j in range(n):
                ax = axes[row, j]
                v, lim = _signed_map(p[k][j])
                ax.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
                note = f"±{lim:.2g}"
                if k == "tangent":
                    full = float(np.linalg.norm(p["attribution"][j]))
                    if full > 0 and np.isfinite(full):
                        note += f"\nfrac {np.linalg.norm(p[k][j]) / full:.2f}"
                ax.set_xlabel(note, fontsize=6, labelpad=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    suptitle(fig, title or "Attributions and their parts in and orthogonal to the tangent "
             "space\n(red > 0, blue < 0; each panel on its own scale ±max|value|)", fontsize=9)
    fig.row_labels = names
    return fig


def _fractions(name, values) -> np.ndarray:
    f = to_numpy(values).astype(float).ravel()
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
    """Bordt et al. 2023, Figs. 3 and 7: box plots of per-sample fractions in tangent space,
    one per name in ``fractions`` (a method, or "method (model)": boxes are coloured by the
    model in parentheses, else by name), the mean marked (red diamond) and written above each
    box; ``baseline`` (the random √(k/d)) dashed. Values must lie in [0, 1] and be finite."""
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
    ax.set_xlabel("method (model)" if groups != [str(s) for s in names] else "method")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=8, loc="best")
    style_axes(ax)
    sizes = {d.size for d in data}
    count = f"n = {sizes.pop()} per box" if len(sizes) == 1 else "n varies"
    ax.set_title(wrap(title or f"Fraction in tangent space ({count}; mean above each box)",
                      fig.get_figwidth() - 0.3, 10), fontsize=10, pad=14)
    return fig


def plot_fraction_over_training(records, *, baseline: float | None = None,
                                title: str | None = None) -> Figure:
    """Bordt et al. 2023, Fig. 6: the mean fraction in tangent space over training steps with a
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
        few = point_style(len(steps))
        if few:  # a band over one step has no area: the 5–95 % range as error bars too
            ax.errorbar(steps, col["mean"], yerr=[col["mean"] - col["q05"],
                                                  col["q95"] - col["mean"]],
                        fmt="none", ecolor=color, alpha=0.6, capsize=4)
        ax.plot(steps, col["mean"], color=color, lw=1.8, label="mean" if one else str(name),
                **few)
        if all("median" in r for r in recs):
            med = np.array([float(r["median"]) for r in recs])[order]
            ax.plot(steps, med, color=color, lw=1.0, ls=":", label="median" if one else None,
                    **point_style(len(steps), "x"))
    _baseline_line(ax, baseline)
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("fraction in tangent space")
    key = None if None in series else "line: mean, dotted: median, band: 5–95 %"
    ax.legend(frameon=False, fontsize=8, title=key, title_fontsize=7)
    style_axes(ax)
    ax.set_title(title or "Fraction of the gradient in tangent space during training",
                 fontsize=11)
    return fig


def plot_roar(results: dict, *, title: str | None = None, remove: str = "top") -> Figure:
    """Bordt et al. 2023, Fig. 5: RemOve And Retrain, as returned by
    :func:`~manifoldlens.attribution.roar`: ``results["fractions"]`` (q per point) and
    name → test accuracies, one per q. One line with markers per name over the share of
    pixels removed (%); "random" grey dashed, "tangent space" purple. ``remove``: "top" (the
    most important pixels went first: the faster accuracy falls, the better the ranking)
    or "bottom"."""
    if remove not in ("top", "bottom"):
        raise ValueError(f"remove must be 'top' or 'bottom', got {remove!r}")
    if "fractions" not in results:
        raise ValueError("results needs 'fractions' (the shares of pixels removed)")
    q = 100.0 * to_numpy(results["fractions"]).astype(float).ravel()
    curves = {k: v for k, v in results.items() if k != "fractions"}
    if not curves:
        raise ValueError("results holds no accuracies besides 'fractions'")
    for name, acc in curves.items():
        if len(to_numpy(acc).ravel()) != len(q):
            raise ValueError(f"results[{name!r}] has {len(to_numpy(acc).ravel())} accuracies but "
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
        ax.plot(q, to_numpy(acc).astype(float).ravel(), ms=4, label=str(name), **style)
    which = "most" if remove == "top" else "least"
    ax.set_xticks(q, [f"{v:g}" for v in q])
    ax.set_xlabel(f"pixels removed, {which} important first (%)")
    ax.set_ylabel("test accuracy after retraining")
    ax.legend(frameon=False, fontsize=8)
    style_axes(ax)
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
        a = to_numpy(a).astype(float)
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
        style_axes(ax)
    axes[0].set_ylabel("points")
    fig.suptitle(title or "Principal angles between the two subspaces at each point",
                 fontsize=11)
    return fig
