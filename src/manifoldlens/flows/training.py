"""Maximum-likelihood training of flows: warm-up, gradient clipping, checkpoints, resume.

Images are dequantized afresh at every step (uniform noise in each of the ``n_bins`` bins) and
the loss is their mean bits per dimension; continuous data (2-D toys) minimise the mean
negative log-likelihood in nats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_batch, check_positive_int
from .._utils import eval_mode
from ..runs import Run
from ..training import Callback, RunOptions, TrainResult, check_schedule, fit
from .bpd import bits_per_dim, dequantize
from .models import initialize

__all__ = ["train_flow", "evaluate_flow", "n_bins_for"]


def _images(data: Any) -> torch.Tensor:
    if hasattr(data, "images"):
        return data.images
    if isinstance(data, torch.Tensor):
        return data
    raise TypeError(f"data must be an ImageDataset or a tensor, got {type(data).__name__}")


def n_bins_for(name: str | None) -> int:
    """Quantisation levels of a dataset: 17 for the 8×8 digits (pixels 0..16), else 256."""
    return 17 if name == "digits" else 256


def _noise(seed: int, step: int) -> torch.Generator:
    """The dequantization noise of one step: a function of (seed, step), so resuming a run
    draws the noise the uninterrupted run would have drawn."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 1)


@torch.no_grad()
def evaluate_flow(model: nn.Module, data: Any, *, n_bins: int | None = 256,
                  batch_size: int = 500, seed: int = 12345,
                  device: str | torch.device | None = None) -> dict[str, float]:
    """Mean test bits/dim (``n_bins`` given: dequantized with a fixed seed) or mean negative
    log-likelihood in nats (``n_bins=None``, continuous data), in eval mode."""
    x = _images(data)
    p = next(model.parameters())
    device = device or p.device
    total, n = 0.0, x.shape[0]
    with eval_mode(model):
        for i in range(0, n, batch_size):
            xb = x[i: i + batch_size].to(device=device, dtype=p.dtype)
            if n_bins is None:
                total += float(-model.log_prob(xb).sum())
            else:
                g = _noise(seed, i)
                total += float(bits_per_dim(model, xb, n_bins, generator=g).sum())
    return {"test_nll" if n_bins is None else "test_bpd": total / n}


def train_flow(
    model: nn.Module,
    train_data: Any,
    *,
    test_data: Any = None,
    n_bins: int | None = 256,
    lr: float = 1e-3,
    batch_size: int = 64,
    epochs: float | None = None,
    steps: int | None = None,
    warmup_steps: int = 200,
    clip_grad_norm: float | None = 100.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    init_batch_size: int = 512,
    eval_every: int | None = None,
    callbacks: Sequence[Callback] = (),
    run: Run | RunOptions | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Train a flow by maximum likelihood with Adam.

    ActNorm layers are initialised from the first ``init_batch_size`` training points
    (dequantized) before the first step; a resumed run keeps the initialisation stored in its
    checkpoint. ``n_bins=None`` for continuous data. A NaN/Inf loss or gradient stops with
    ``FloatingPointError`` naming the last good checkpoint (:func:`manifoldlens.training.fit`).
    ``run``: a :class:`~manifoldlens.runs.Run` or :class:`~manifoldlens.training.RunOptions`
    (checkpoints, resume, metadata).
    """
    x = _images(train_data)
    check_batch(x, "train_data")  # everything checked before ActNorm initialises the model
    check_schedule(x.shape[0], batch_size, epochs, steps, warmup_steps=warmup_steps,
                   clip_grad_norm=clip_grad_norm)
    if n_bins is not None:
        check_positive_int(n_bins, "n_bins", minimum=2)
    train_config = {"optimizer": "adam", "lr": lr, "batch_size": batch_size, "seed": seed,
                    "n_bins": n_bins, "warmup_steps": warmup_steps,
                    "clip_grad_norm": clip_grad_norm, "weight_decay": weight_decay,
                    "n_train": x.shape[0]}
    torch.manual_seed(seed)
    model.to(device)
    dtype = next(model.parameters()).dtype
    first = x[:init_batch_size].to(device=device, dtype=dtype)
    if n_bins is not None:
        first = dequantize(first, n_bins, _noise(seed, -1))
    initialize(model, first)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step_loss(xb, _, step):
        xb = xb.to(dtype)
        if n_bins is None:
            return -model.log_prob(xb).mean()
        y = dequantize(xb, n_bins, _noise(seed, step))
        return bits_per_dim(model, y, n_bins, dequantize_input=False,
                            differentiable=True).mean()

    def run_eval():
        return evaluate_flow(model, test_data, n_bins=n_bins, device=device)

    return fit(model, x, None, step_loss, opt, batch_size=batch_size, epochs=epochs,
               steps=steps, seed=seed, callbacks=callbacks,
               evaluate_fn=run_eval if test_data is not None else None, eval_every=eval_every,
               run=run, device=device, progress=progress, train_config=train_config,
               warmup_steps=warmup_steps, clip_grad_norm=clip_grad_norm, desc="flow")

