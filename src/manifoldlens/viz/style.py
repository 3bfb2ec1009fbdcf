"""What the figure modules of :mod:`manifoldlens.viz` share: the colours, tensors to numpy,
the axes style and images ready for ``imshow``."""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "BLUE",
    "GREY",
    "PURPLE",
    "RED",
    "as_image",
    "image_batch",
    "style_axes",
    "to_numpy",
]

BLUE, RED, GREY = "#1f5fa8", "#c8372d", "#7f7f7f"
PURPLE = "#7b3294"


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
