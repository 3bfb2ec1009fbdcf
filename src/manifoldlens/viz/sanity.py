"""Figures of Bordt et al. §5 (2023, "The Manifold Hypothesis for Gradient-Based
Explanations"): the simulation of Theorem 1 (Figure 8) and the sanity checks of §5.3 in the
style of Adebayo et al. (2018, "Sanity Checks for Saliency Maps", Figures 2 and 4), with the
fraction in tangent space beside them. Inputs are numpy arrays or torch tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from .style import BLUE, GREY, PURPLE, RED, as_image, image_batch, style_axes, suptitle, to_numpy

__all__ = [
    "plot_cascading_randomization",
    "plot_necessary_not_sufficient",
    "plot_randomization_maps",
    "plot_theorem1",
]

_PALETTE = (BLUE, RED, "#2ca02c", "#ff7f0e", "#8c564b", "#17becf", "#bcbd22", "#e377c2")
#: The y-axis labels of the measures of :func:`plot_cascading_randomization`.
MEASURES = {
    "spearman_abs": "Spearman ρ of |attribution|\n(vs. the trained model)",
    "spearman": "Spearman ρ of the signed attribution\n(vs. the trained model)",
    "ssim": "SSIM of |attribution| / max\n(vs. the trained model)",
    "fraction": "fraction in tangent space\n‖P_T a‖ / ‖a‖",
}
#: Attributions that ignore the model, drawn dashed.
CONTROLS = ("random_tangent", "random")


def _colors(names: Sequence[str]) -> dict[str, str]:
    out, i = {}, 0
    for name in names:
        if name == "random_tangent":
            out[name] = PURPLE
        elif name == "random":
            out[name] = GREY
        else:
            out[name] = _PALETTE[i % len(_PALETTE)]
            i += 1
    return out


def plot_theorem1(x, fractions, along_first, *, accuracy: float | None = None,
                  threshold: float = 0.5, title: str | None = None) -> Figure:
    """Bordt et al. 2023, Fig. 8: (left) the test points of the curve 𝓜 ⊂ ℝ^d seen in the
    plane (x₁, x₂ + … + x_d), coloured by the fraction of the trained network's gradient in
    their tangent space; (right) the histogram of those fractions, stacked by the kind of
    segment a point lies on (along e₁, or orthogonal to it). ``x`` (n, d), ``fractions`` (n,)
    in [0, 1], ``along_first`` (n,) bool; ``accuracy`` goes into the title; ``threshold``
    (dotted) splits the two modes."""
    pts = to_numpy(x).astype(float)
    f = to_numpy(fractions).astype(float).ravel()
    along = np.asarray(to_numpy(along_first)).astype(bool).ravel()
    if pts.ndim != 2 or pts.shape[0] != f.size or along.size != f.size or pts.shape[1] < 2:
        raise ValueError(f"x must be (n, d >= 2) with n fractions and n flags, got x "
                         f"{pts.shape}, {f.size} fractions, {along.size} flags")
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    ax, hx = fig.subplots(1, 2, width_ratios=[1.15, 1])
    sc = ax.scatter(pts[:, 0], pts[:, 1:].sum(1), c=f, cmap="viridis", vmin=0, vmax=1, s=6,
                    lw=0)
    fig.colorbar(sc, ax=ax, label="fraction of ∇f in tangent space")
    ax.set_xlabel("x₁ (the label is sign x₁)")
    ax.set_ylabel("x₂ + … + x_d")
    ax.set_title("test points on the manifold", fontsize=9)
    style_axes(ax)
    bins = np.linspace(0, 1, 41)
    hx.hist([f[along], f[~along]], bins=bins, stacked=True, color=[BLUE, RED],
            label=[f"on segments along e₁ ({along.mean():.1%})",
                   f"on segments ⊥ e₁ ({1 - along.mean():.1%})"])
    hx.axvline(threshold, color=GREY, ls=":", lw=1.0, label=f"threshold {threshold:g}")
    inside = float((f > threshold).mean())
    hx.set_xlabel("fraction of the gradient in tangent space ‖P_T ∇f‖ / ‖∇f‖")
    hx.set_ylabel("test points")
    hx.set_xlim(0, 1)
    hx.set_title(f"{inside:.1%} above the threshold, {1 - inside:.1%} below", fontsize=9)
    hx.legend(frameon=False, fontsize=8, loc="upper center")
    style_axes(hx)
    acc = f"test accuracy {accuracy:.1%}; " if accuracy is not None else ""
    suptitle(fig, title or f"Theorem 1, simulated: a two-layer ReLU network ({acc}d = "
             f"{pts.shape[1]}) whose gradient lies in or orthogonal to the tangent space")
    return fig


def _band(values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-stage nan-mean and 5 / 95 % quantiles of (stages, n) values."""
    v = to_numpy(values).astype(float)
    if v.ndim == 1:
        v = v[:, None]
    with np.errstate(all="ignore"):
        ok = np.isfinite(v).any(1)
        mean = np.full(v.shape[0], np.nan)
        lo, hi = mean.copy(), mean.copy()
        mean[ok] = np.nanmean(v[ok], 1)
        lo[ok], hi[ok] = np.nanquantile(v[ok], [0.05, 0.95], axis=1)
    return mean, lo, hi


def plot_cascading_randomization(stages: Sequence[str], curves: dict, *,
                                 measures: Sequence[str] = tuple(MEASURES),
                                 baseline: float | None = None, mode: str = "cascading",
                                 title: str | None = None) -> Figure:
    """Adebayo et al. 2018, Fig. 4, beside Bordt et al.'s fraction: one panel per measure
    (default: Spearman ρ of |a|, of a, SSIM, fraction in tangent space), x the stages (the
    trained model, then the layers randomised from the top), one line per method of
    ``curves`` (name → measure → (stages, n) values) with its mean and a 5–95 % band;
    attributions that ignore the model (``random_tangent``, ``random``) dashed. ``baseline``:
    the random fraction √(k/d), dashed in the fraction panel."""
    if not curves:
        raise ValueError("curves is empty")
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"unknown measure(s) {unknown}; known: {list(MEASURES)}")
    names = list(curves)
    colors = _colors(names)
    xs = np.arange(len(stages))
    fig = Figure(figsize=(3.3 * len(measures) + 1.8, 3.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(measures)))
    for ax, measure in zip(axes, measures, strict=True):
        bottom = 0.0 if measure == "fraction" else -0.1
        for name in names:
            if measure not in curves[name]:
                raise ValueError(f"curves[{name!r}] lacks {measure!r}")
            mean, lo, hi = _band(curves[name][measure])
            if mean.size != len(stages):
                raise ValueError(f"curves[{name!r}][{measure!r}] has {mean.size} stages, "
                                 f"expected {len(stages)}")
            ls = "--" if name in CONTROLS else "-"
            ax.fill_between(xs, lo, hi, color=colors[name], alpha=0.12, lw=0)
            ax.plot(xs, mean, ls, color=colors[name], marker="o", ms=3.5, lw=1.6, label=name)
            if np.isfinite(lo).any():
                bottom = min(bottom, float(np.nanmin(lo)) - 0.05)
        if measure == "fraction" and baseline is not None:
            ax.axhline(baseline, color="k", ls=":", lw=1.0, label=f"random √(k/d) ≈ {baseline:.2f}")
        ax.set_xticks(xs, list(stages), rotation=40, ha="right", fontsize=8)
        ax.set_xlabel(f"layers randomised ({mode}, top first)")
        ax.set_ylabel(MEASURES[measure], fontsize=8)
        ax.set_ylim(max(bottom, -1.05), 1.05)  # every band whole
        ax.axhline(0, color="k", lw=0.5)
        style_axes(ax)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False, fontsize=8,
               title="attribution", title_fontsize=8)
    suptitle(fig, title or "Model-parameter randomisation test (Adebayo et al. 2018) and the "
             "fraction in tangent space: mean and 5–95 % of the test points")
    return fig


def plot_randomization_maps(image, maps: dict, stages: Sequence[str], *,
                            label: str | None = None, mode: str = "cascading",
                            title: str | None = None) -> Figure:
    """Adebayo et al. 2018, Fig. 2: for one image, one row per method of ``maps`` (name →
    (stages, C, H, W) attributions) and one column per stage of the randomisation, each map
    drawn as |a| / max|a| (channels summed first) in grey on one colour bar; the image left
    of each row. ``label``: the image's class, above it; ``mode``: how the stages randomise
    (``"cascading"``: the layer named and all above it; ``"independent"``: it alone)."""
    img = image_batch(np.asarray(to_numpy(image))[None])[0]
    names = list(maps)
    if not names:
        raise ValueError("maps is empty")
    rows, cols = len(names), len(stages) + 1
    fig = Figure(figsize=(1.05 * cols + 1.6, max(2.8, 1.1 * rows + 1.0)), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    im = None
    for r, name in enumerate(names):
        m = to_numpy(maps[name]).astype(float)
        if m.shape[0] != len(stages) or m[0].size != img.size:
            raise ValueError(f"maps[{name!r}] must be (stages = {len(stages)}, *image shape "
                             f"{img.shape}), got {m.shape}")
        axes[r, 0].imshow(as_image(img), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        for s in range(len(stages)):
            a = np.abs(m[s].reshape(img.shape).sum(0))
            top = a.max()
            im = axes[r, s + 1].imshow(a / top if top > 0 else a, cmap="gray", vmin=0, vmax=1,
                                       interpolation="nearest")
    axes[0, 0].set_title(label if label is not None else "image", fontsize=8)
    for s, stage in enumerate(stages):
        axes[0, s + 1].set_title(stage, fontsize=8, rotation=30)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[:, -1].tolist(), label="|attribution| / max |attribution|",
                 shrink=0.8)
    how = ("that layer and all above it randomised" if mode == "cascading"
           else "that layer alone randomised")
    suptitle(fig, title or f"Attributions as the layers are randomised, top first (columns: "
             f"the trained model, then {how})", fontsize=9)
    return fig


def plot_necessary_not_sufficient(fraction: dict, similarity: dict, *,
                                  baseline: float | None = None,
                                  measure: str = "Spearman ρ of |attribution|",
                                  fails_above: float | None = 0.75,
                                  title: str | None = None) -> Figure:
    """Bordt et al. §5.3 in one picture: for each attribution, x its fraction in tangent space
    (trained model; ``fraction``: name → (n,) values) and y its similarity to the attribution
    of the fully randomised model (``similarity``: name → (n,) values, ``measure`` names it),
    the mean with 5–95 % error bars. An explanation belongs at the bottom right: on the data
    manifold (right of the random baseline, dotted) and changed by the model's weights (low).
    The random attribution drawn in the tangent space sits at the top right: aligned with the
    manifold, blind to the model. Alignment is necessary, not sufficient. ``fails_above``
    shades the similarities above it as failing the test: a visual guide (neither paper sets
    a threshold); None draws no band."""
    names = [n for n in fraction if n in similarity]
    if not names:
        raise ValueError("fraction and similarity share no attribution")
    colors = _colors(names)
    fig = Figure(figsize=(6.8, 5.0), layout="constrained")
    ax = fig.subplots()
    if fails_above is not None:
        ax.axhspan(fails_above, 1.08, color=RED, alpha=0.06, lw=0)
        ax.text(0.01, 1.06, f"> {fails_above:g}: fails the randomisation test, barely changed "
                "by the model's weights (a guide)", fontsize=7.5, color=RED, va="top")
    if baseline is not None:
        ax.axvline(baseline, color="k", ls=":", lw=1.0,
                   label=f"random direction √(k/d) ≈ {baseline:.2f}")
    for name in names:
        fm, flo, fhi = _band(np.asarray(to_numpy(fraction[name]), dtype=float)[None])
        sm, slo, shi = _band(np.asarray(to_numpy(similarity[name]), dtype=float)[None])
        ax.errorbar(fm, sm, xerr=[fm - flo, fhi - fm], yerr=[sm - slo, shi - sm],
                    fmt="s" if name in CONTROLS else "o", ms=7, color=colors[name],
                    capsize=3, lw=1.2, label=name)
    ax.annotate("explanation:\non the manifold and\ndependent on the model", xy=(0.98, -0.3),
                ha="right", va="bottom", fontsize=7.5, color="#2ca02c")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.35, 1.08)
    ax.set_xlabel("fraction in tangent space ‖P_T a‖ / ‖a‖ (trained model)")
    ax.set_ylabel(f"{measure}\ntrained vs. fully randomised model")
    ax.legend(frameon=False, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5),
              title="attribution", title_fontsize=8)
    style_axes(ax)
    suptitle(fig, title or "Aligned with the data manifold is necessary, not sufficient: a "
             "random attribution inside the tangent space has fraction 1 and fails the "
             "sanity check", fontsize=9)
    return fig
