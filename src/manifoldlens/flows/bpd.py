"""Dequantization and bits per dimension [1]_.

Discrete data x ∈ {0, …, B − 1}^D scaled to [0, 1] are made continuous by uniform noise,
``y = (k + u) / B`` with ``u ~ U[0, 1)^D``; then ``log P(x) ≥ E_u log p(y) − D log B`` and

    bits/dim = (−log p(y) + D · log B) / (D · ln 2).

References
----------
.. [1] L. Theis, A. van den Oord, M. Bethge, "A note on the evaluation of generative models",
   ICLR 2016. arXiv:1511.01844
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_batch, check_positive_int

__all__ = ["dequantize", "bits_per_dim"]


def dequantize(x: torch.Tensor, n_bins: int = 256,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``(k + u) / n_bins`` for x = k / (n_bins − 1) in [0, 1], u uniform in [0, 1).

    >>> import torch
    >>> y = dequantize(torch.tensor([[0.0, 1.0]]), n_bins=256)
    >>> bool((y[0, 0] < 1 / 256) and (y[0, 1] >= 255 / 256))
    True
    """
    check_batch(x, "x")
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(
            f"x must be scaled to [0, 1] before dequantization, got values in "
            f"[{float(x.min()):.4g}, {float(x.max()):.4g}]"
        )
    k = torch.round(x * (n_bins - 1))
    u = torch.rand(x.shape, dtype=x.dtype, generator=generator).to(x.device)
    return (k + u) / n_bins


def bits_per_dim(model: nn.Module, x: torch.Tensor, n_bins: int = 256, *,
                 dequantize_input: bool = True, generator: torch.Generator | None = None,
                 differentiable: bool = False) -> torch.Tensor:
    """Bits per dimension of x (n,) under ``model.log_prob``:
    ``(−log p(y) + D log n_bins) / (D ln 2)``, y the dequantized x (or x itself with
    ``dequantize_input=False``, for inputs already dequantized).

    An evaluation by default: computed without an autograd graph (no memory kept for a
    backward pass; ``float()`` of it raises no warning). ``differentiable=True`` keeps the
    graph, for a training loss.

    >>> import torch
    >>> from manifoldlens.flows import NICE
    >>> flow = NICE((4,), couplings=2, hidden=8, depth=1)
    >>> x = torch.rand(8, 4)
    >>> bits_per_dim(flow, x, 17).requires_grad, bits_per_dim(flow, x, 17).shape
    (False, torch.Size([8]))
    >>> bits_per_dim(flow, x, 17, differentiable=True).mean().requires_grad
    True
    """
    if not isinstance(differentiable, bool):
        raise ValueError(f"differentiable must be True or False, got {differentiable!r}")
    check_positive_int(n_bins, "n_bins", minimum=2)
    y = dequantize(x, n_bins, generator) if dequantize_input else x
    d = x[0].numel()
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        return (-model.log_prob(y) + d * math.log(n_bins)) / (d * math.log(2))
