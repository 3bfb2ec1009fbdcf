"""What the figure modules of :mod:`manifoldlens.viz` share: the colours, tensors to numpy,
the axes style, legends, row labels, titles that fit and images ready for ``imshow``."""

from __future__ import annotations

import textwrap

import numpy as np
import torch

__all__ = [
    "BLUE",
    "FEW",
    "GREY",
    "PURPLE",
    "RED",
    "as_image",
    "image_batch",
    "legend",
    "point_style",
    "row_label",
    "style_axes",
    "suptitle",
    "to_numpy",
    "wrap",
]

BLUE, RED, GREY = "#1f5fa8", "#c8372d", "#7f7f7f"
PURPLE = "#7b3294"
FEW = 3  # a series of at most this many points gets markers: one point as a line draws nothing


def to_numpy(t) -> np.ndarray:
    """A tensor as a float64 numpy array (detached, on the CPU); anything else via
    ``np.asarray``.

    >>> to_numpy(torch.ones(2, dtype=torch.float32)).dtype
    dtype('float64')
    """
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def style_axes(ax) -> None:
    """The house style: no top or right spine, a light grid."""
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25, linewidth=0.6)


def point_style(n: int, marker: str = "o", size: float = 5.0) -> dict:
    """``plot`` keywords for a series of ``n`` points: a marker when n ≤ :data:`FEW`, else
    none (a line of one point is invisible).

    >>> point_style(1), point_style(50)
    ({'marker': 'o', 'ms': 5.0}, {})
    """
    return {"marker": marker, "ms": size} if n <= FEW else {}


def legend(ax, *twins, **kw) -> None:
    """One legend for the labelled artists of ``ax`` and its ``twins`` (``twinx`` axes):
    with twins, under the figure (a twin's lines would cross any place inside the axes, and
    "best" sees only one axes' lines), else on ``ax`` (``kw``: for ``legend``); nothing when
    none is labelled."""
    handles, names = [], []
    for a in (ax, *twins):
        h, n = a.get_legend_handles_labels()
        handles += h
        names += n
    if not handles:
        return
    kw = {"frameon": False, "fontsize": 8, **kw}
    if twins:  # ``loc`` is for the legend inside the axes
        kw.pop("loc", None)
        ax.get_figure().legend(handles, names, loc="outside lower center",
                               ncol=min(len(handles), 3), **kw)
    else:
        ax.legend(handles, names, **kw)


def row_label(ax, text: str, fontsize: float = 7) -> None:
    """``text`` as the label of the row that starts with ``ax``: horizontal, right-aligned
    left of it, so that labels longer than the row is tall cannot run into their neighbours
    (constrained layout makes room for them)."""
    ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=fontsize, labelpad=4)


def wrap(text: str, width: float, fontsize: float) -> str:
    """``text`` with each line wrapped to ``width`` inches at ``fontsize`` points (about
    0.6 em a character).

    >>> wrap("a title much too long for one inch", 1.0, 10)
    'a title much\\ntoo long for\\none inch'
    """
    chars = max(12, int(width * 72 / (0.6 * fontsize)) - 2)
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def suptitle(fig, text: str, fontsize: float = 10) -> None:
    """``text`` as the figure's title, wrapped to the figure's width, so that a narrow
    figure (one image, one frame) does not cut it off."""
    fig.suptitle(wrap(text, fig.get_figwidth(), fontsize), fontsize=fontsize)


def as_image(t: np.ndarray) -> np.ndarray:
    """One image for ``imshow``: (1, H, W) → (H, W), (3, H, W) → (H, W, 3), a flat vector of
    square length → (side, side), any other vector → one row.

    >>> as_image(np.zeros(16)).shape, as_image(np.zeros((3, 4, 5))).shape
    ((4, 4), (4, 5, 3))
    """
    img = np.asarray(t)
    if img.ndim == 3:
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    elif img.ndim == 1:
        side = int(round(np.sqrt(img.size)))
        img = img.reshape(side, side) if side * side == img.size else img[None, :]
    return img


def image_batch(t) -> np.ndarray:
    """Images (n, C, H, W) with C = 1 or 3 as numpy, clipped to [0, 1]; ValueError otherwise."""
    imgs = np.clip(to_numpy(t), 0.0, 1.0)
    if imgs.ndim != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(f"expected images (n, C, H, W) with C = 1 or 3, got {imgs.shape}")
    return imgs
