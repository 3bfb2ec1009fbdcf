"""Input validation shared by every public function: clear errors that name the problem."""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["check_batch", "check_finite", "check_independent_samples"]


def check_finite(t: torch.Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` naming the first samples of ``t`` that hold NaN or Inf."""
    bad = ~torch.isfinite(t)
    if bad.any():
        rows = bad.reshape(t.shape[0], -1).any(dim=1).nonzero().flatten() if t.ndim else []
        idx = [int(i) for i in rows[:10]]
        kind = "NaN" if torch.isnan(t).any() else "Inf"
        raise ValueError(
            f"{name} contains {kind} values (samples {idx}{'...' if len(rows) > 10 else ''}); "
            "clean or drop those samples first"
        )


def check_batch(x: torch.Tensor, name: str = "x", min_ndim: int = 2) -> torch.Tensor:
    """Check that ``x`` is a finite floating tensor batched on the first axis."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must be batched on the first axis with at least {min_ndim} dims "
            f"(n, ...), got shape {tuple(x.shape)}; add a batch axis with {name}[None]"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    check_finite(x, name)
    return x


_BATCH_COUPLED = (nn.modules.batchnorm._BatchNorm,)


def check_independent_samples(model: nn.Module) -> None:
    """Refuse models whose outputs couple the samples of a batch.

    A model in train mode with BatchNorm mixes the batch: per-sample Jacobians are then
    wrong. We raise instead of silently switching modes (the caller owns the mode).
    Dropout in train mode keeps samples independent but makes the Jacobian random: warn.
    """
    for name, module in model.named_modules():
        if module.training and isinstance(module, _BATCH_COUPLED):
            raise ValueError(
                f"model is in train mode and its module '{name or type(module).__name__}' "
                f"({type(module).__name__}) couples the samples of a batch, so per-sample "
                "Jacobians would be wrong; call model.eval() first"
            )
    for name, module in model.named_modules():
        if module.training and isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            warnings.warn(
                f"model is in train mode with active dropout ('{name}'): Jacobians are "
                "random; call model.eval() for deterministic results",
                stacklevel=3,
            )
            break
