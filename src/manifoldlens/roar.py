"""RemOve And Retrain (ROAR): how much of a classifier's accuracy the top-ranked features of
an attribution carry, and the tangent space's own feature importance.

References
----------
S. Hooker, D. Erhan, P.-J. Kindermans, B. Kim. "A Benchmark for Interpretability Methods in
Deep Neural Networks." NeurIPS 2019. arXiv:1806.10758.

S. Bordt, U. Upadhyay, Z. Akata, U. von Luxburg. "The Manifold Hypothesis for Gradient-Based
Explanations." CVPR Workshops 2023. arXiv:2206.07387. §4.4, Figure 5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._utils import progress_bar
from .training import evaluate, train_classifier

__all__ = ["remove_features", "roar", "tangent_importance"]


def tangent_importance(tangent) -> torch.Tensor:
    """The tangent space's own feature importance (Bordt et al., §4.4): ‖P_T e_i‖ per pixel, the
    norm of the i-th column of the orthonormal basis, shaped (n, *input_shape)."""
    b = tangent.basis
    return b.pow(2).sum(1).sqrt().reshape(b.shape[0], *tangent.input_shape)


def remove_features(x: torch.Tensor, scores: torch.Tensor, fraction: float, *,
                    remove: str = "top", fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Replace the ``fraction`` of each image's features ranked highest (``remove="top"``) or
    lowest (``"bottom"``) by ``scores`` with ``fill`` (ROAR, Hooker et al. 2019)."""
    if remove not in ("top", "bottom"):
        raise ValueError(f"remove must be 'top' or 'bottom', got {remove!r}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if scores.shape != x.shape:
        raise ValueError(f"scores must be shaped like x {tuple(x.shape)}, got "
                         f"{tuple(scores.shape)}")
    n = x.shape[0]
    flat = scores.reshape(n, -1)
    k = int(round(fraction * flat.shape[1]))
    out = x.clone().reshape(n, -1)
    if k == 0:
        return out.reshape(x.shape)
    idx = flat.topk(k, dim=1, largest=remove == "top").indices
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    fill_flat = fill_t.expand(x.shape[1:]).reshape(-1) if fill_t.ndim else fill_t.expand(
        flat.shape[1])
    out.scatter_(1, idx, fill_flat[idx] if fill_flat.ndim else fill_flat.expand_as(idx))
    return out.reshape(x.shape)


def roar(
    make_model: Callable[[], nn.Module],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]],
    fractions: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    *,
    remove: str = "top",
    train_options: dict[str, Any] | None = None,
    rank_by: str = "abs",
    fill: str = "zero",
    progress: bool = True,
    done: dict[str, dict[float, float]] | None = None,
    on_result: Callable[[str, float, float], None] | None = None,
) -> dict[str, list[float]]:
    """RemOve And Retrain (Hooker et al. 2019; Bordt et al., Figure 5).

    For every ranking in ``scores`` (name → (train scores, test scores), shaped like the
    images — attributions of each method, the tangent space's :func:`tangent_importance`,
    random noise as the baseline) and every fraction q: replace the top (or bottom) q of each
    image's pixels by 0 (``fill="zero"``, as Bordt et al.'s code, ``removed_pixel_value = 0``) or
    by the training set's per-pixel mean (``"mean"``, as Hooker et al.), train a fresh
    ``make_model()`` on the
    modified training set and record its accuracy on the modified test set. A better feature
    ranking makes accuracy fall faster when the top features go. ``rank_by="abs"`` ranks by
    |score| (signed attributions), ``"signed"`` by the score itself.
    Returns name → accuracies, one per fraction (plus ``"fractions"``).

    Resumable: ``done`` (name → {q: accuracy}) holds cells measured earlier, which are not
    retrained; ``on_result(name, q, accuracy)`` is called after every new cell, so a caller
    can store it at once. Each cell is trained from ``make_model()`` alone, so the order in
    which cells run does not change their results.
    """
    if rank_by not in ("abs", "signed"):
        raise ValueError(f"rank_by must be 'abs' or 'signed', got {rank_by!r}")
    (xtr, ytr), (xte, yte) = train, test
    if fill not in ("zero", "mean"):
        raise ValueError(f"fill must be 'zero' or 'mean', got {fill!r}")
    fill_value = torch.zeros_like(xtr[0]) if fill == "zero" else xtr.mean(0)
    opts = {"optimizer": "adam", "lr": 1e-3, "epochs": 3, "batch_size": 64, "progress": False,
            **(train_options or {})}
    out: dict[str, list[float]] = {"fractions": [float(q) for q in fractions]}
    bar = progress_bar(enabled=progress, total=len(scores) * len(fractions), desc="roar",
                       unit="model")
    try:
        for name, (s_tr, s_te) in scores.items():
            accs = []
            key_tr = s_tr.abs() if rank_by == "abs" else s_tr
            key_te = s_te.abs() if rank_by == "abs" else s_te
            previous = (done or {}).get(name, {})
            for q in fractions:
                if float(q) in previous:
                    accs.append(float(previous[float(q)]))
                else:
                    mtr = remove_features(xtr, key_tr, q, remove=remove, fill=fill_value)
                    mte = remove_features(xte, key_te, q, remove=remove, fill=fill_value)
                    model = make_model()
                    train_classifier(model, (mtr, ytr), **opts)
                    accs.append(evaluate(model, (mte, yte))["accuracy"])
                    if on_result is not None:
                        on_result(name, float(q), accs[-1])
                if bar is not None:
                    bar.update(1)
            out[name] = accs
    finally:
        if bar is not None:
            bar.close()
    return out
