"""Input validation shared by every public function: clear errors that name the problem."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODEL_OUTPUTS",
    "check_batch",
    "check_choice",
    "check_finite",
    "check_independent_samples",
    "check_model_output",
    "check_output_type",
    "check_number",
    "check_positive_int",
]

#: What a classifier may return: scores (logits), log-probabilities or probabilities.
MODEL_OUTPUTS = ("logits", "log_probs", "probs")


def check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``, naming the option."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(value: Any, name: str, *, allow_none: bool = False,
                       minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ≥ ``minimum`` (None too, with
    ``allow_none``); booleans are not integers here."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}, "
                         f"got {value!r}")


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 strict: bool = False, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number in range: ≥ ``low`` (>
    with ``strict``) and ≤ ``high``."""
    if value is None and allow_none:
        return
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(value) and (low is None or (value > low if strict else value >= low))
          and (high is None or value <= high))
    if not ok:
        lo = "" if low is None else (f"> {low}" if strict else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        limits = " and ".join(t for t in (lo, hi) if t)
        raise ValueError(f"{name} must be a finite number{' ' + limits if limits else ''}"
                         f"{' or None' if allow_none else ''}, got {value!r}")


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


def has_batch_norm(model: nn.Module) -> bool:
    """Whether a module of ``model`` normalises over the batch (BatchNorm) in train mode."""
    return any(isinstance(m, _BATCH_COUPLED) for m in model.modules())


def check_independent_samples(model: nn.Module, x: torch.Tensor | None = None) -> None:
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
    if x is not None:
        p = next((t for t in model.parameters() if t.is_floating_point()), None)
        if p is not None and x.is_floating_point() and p.dtype != x.dtype:
            raise ValueError(f"the inputs are {x.dtype} but the model's parameters are {p.dtype}; "
                             f"convert one of them (x.to({p.dtype}) or model.to({x.dtype}))")
        if p is not None and p.device != x.device:
            raise ValueError(f"the inputs are on {x.device} but the model is on {p.device}; "
                             "move one of them")

def check_output_type(out: Any) -> torch.Tensor:
    """Refuse a model output that is not one tensor of class scores (a tuple, a dict, a
    Hugging Face ``ModelOutput`` …), saying what to return instead."""
    if isinstance(out, torch.Tensor):
        return out
    kind = type(out).__name__
    hint = ("e.g. an nn.Module whose forward returns model(x)[0]"
            if isinstance(out, (tuple, list)) else
            "e.g. an nn.Module whose forward returns model(x)['logits'] or model(x).logits")
    raise TypeError(f"the model must return one tensor of class scores shaped (n, C), but it "
                    f"returned a {kind}; pass a callable that returns the scores ({hint})")


def check_model_output(out: torch.Tensor, model_output: str, n: int) -> None:
    """Check the model's raw output against what the caller declared it to be.

    Raises ``ValueError`` for a wrong shape, NaN/Inf, and for outputs that contradict the
    declaration: a model that already returns log-probabilities (every row's logsumexp is 0)
    or probabilities while ``model_output="logits"`` is declared, and the converse.
    """
    check_output_type(out)
    if out.ndim != 2 or out.shape[0] != n:
        raise ValueError(
            f"the model must return scores shaped (n, C) = ({n}, C), got {tuple(out.shape)}"
        )
    if out.shape[1] < 2:
        raise ValueError(f"the model must return at least 2 class scores, got {out.shape[1]}")
    if not torch.isfinite(out).all():
        rows = (~torch.isfinite(out)).any(1).nonzero().flatten()[:10].tolist()
        raise ValueError(f"the model returned NaN/Inf for samples {rows}")
    o = out.detach().double()
    tol = 1e-3 if out.dtype in (torch.float16, torch.bfloat16) else 1e-4
    lse = torch.logsumexp(o, dim=1)
    rows_sum = o.sum(dim=1)
    looks_log_probs = bool((lse.abs() < tol).all() and (o <= tol).all())
    looks_probs = bool(((o >= 0) & (o <= 1)).all() and ((rows_sum - 1).abs() < tol).all())
    if model_output == "logits":
        if looks_log_probs:
            raise ValueError(
                "model_output='logits' was declared but the model already returns "
                "log-probabilities (every row's logsumexp is 0, e.g. a final LogSoftmax); "
                "pass model_output='log_probs'"
            )
        if looks_probs:
            raise ValueError(
                "model_output='logits' was declared but the model returns probabilities "
                "(rows in [0, 1] summing to 1, e.g. a final Softmax); pass model_output='probs'"
            )
    elif model_output == "log_probs" and not looks_log_probs:
        worst = float((lse.abs()).max())
        raise ValueError(
            "model_output='log_probs' was declared but the model's rows are not normalised "
            f"log-probabilities (max |logsumexp| = {worst:.3g}); pass model_output='logits'"
        )
    elif model_output == "probs" and not looks_probs:
        raise ValueError(
            "model_output='probs' was declared but the model's rows are not probability "
            "vectors (non-negative, summing to 1); pass model_output='logits' or 'log_probs'"
        )
