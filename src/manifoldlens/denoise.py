"""Projection onto the data leaf, and denoising by it (Grementieri & Fioresi, §1 and §6).

Seed 001 leaves it to future work: "we could project a noisy point on the data leaf to perform
denoising". Here the projection of a point x is found with the paper's own tool, horizontal
paths (Algorithm 1): from each of x's ``neighbours`` nearest clean reference images r_j (ℓ2 in
pixel space; they lie on the data leaf), a path moves along the leaf of r_j towards x,

    y_t = y_{t−1} + min(α, ‖v‖) v/‖v‖,   v = P_{D_{y_{t−1}}}(x − y_{t−1}),

and stops where ``P_D(x − y)`` vanishes (relative to ``‖x − y‖``): y is then a point of r_j's
leaf nearest x, locally. Of the ``neighbours`` end points the one nearest x is kept. Its
distance ``‖x − y‖`` is the part of x that stays off the leaf
(:func:`manifoldlens.ood.leaf_distance`), and y itself is the denoised image
(:func:`denoise_leaf`). A reference image is its own nearest neighbour, so its projection is
itself (distance 0).

The baselines: a VAE's reconstruction ``dec(μ(x))`` (:func:`denoise_vae`) and a flow's
temperature-shrunk projection ``dec(T · enc(x))`` (:func:`denoise_flow`); :func:`psnr` scores
them against the clean images.

References
----------
L. Grementieri, R. Fioresi. "Model-centric Data Manifold: the Data Through the Eyes of the
Model." SIAM Journal on Imaging Sciences 15(3), 2022. arXiv:2104.13289. Algorithm 1, §1, §6.
D. P. Kingma, P. Dhariwal. "Glow: Generative Flow with Invertible 1x1 Convolutions."
NeurIPS 2018 (sampling at reduced temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._checks import MODEL_OUTPUTS, check_batch, check_choice, check_number, check_positive_int
from ._utils import chunks, eval_mode, progress_bar
from .foliation import horizontal_path

__all__ = [
    "LeafProjection",
    "denoise_flow",
    "denoise_leaf",
    "denoise_vae",
    "leaf_projection",
    "nearest_neighbours",
    "psnr",
]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def nearest_neighbours(x: torch.Tensor, reference: torch.Tensor, k: int = 1, *,
                       batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest reference points of each x in ℓ2: ``(distances (n, k), indices (n, k))``,
    nearest first, computed ``batch_size`` rows of x at a time (never an n × m matrix whole)."""
    check_batch(x, "x")
    check_batch(reference, "reference")
    check_positive_int(k, "k")
    check_positive_int(batch_size, "batch_size")
    if x.shape[1:] != reference.shape[1:]:
        raise ValueError(f"x and reference must hold points of one shape, got "
                         f"{tuple(x.shape[1:])} and {tuple(reference.shape[1:])}")
    if k > reference.shape[0]:
        raise ValueError(f"k = {k} exceeds the {reference.shape[0]} reference points")
    ref = _flat(reference).to(x)
    dists, idx = [], []
    for sl in chunks(x.shape[0], batch_size):
        d = torch.cdist(_flat(x[sl]), ref)
        top = d.topk(k, dim=1, largest=False)
        dists.append(top.values)
        idx.append(top.indices)
    return torch.cat(dists), torch.cat(idx)


@dataclass
class LeafProjection:
    """Where horizontal paths from clean neighbours end, nearest x first kept.

    Attributes
    ----------
    point : Tensor (n, *shape)
        The leaf point found nearest x (the denoised image, unclamped).
    distance : Tensor (n,)
        ``‖x − point‖``: the part of x off the data leaf.
    start_distance : Tensor (n,)
        ``‖x − r‖`` for the neighbour r whose path gave ``point`` (the pixel-space gap before
        moving along the leaf).
    source : Tensor (n,) long
        Index of that neighbour in the reference set.
    steps : Tensor (n,) long
        Steps its path took.
    status : list[str]
        How its path stopped (``reached``, ``stalled``: P_D(x − y) vanished, ``max_steps``,
        ``nonfinite``).
    """

    point: torch.Tensor
    distance: torch.Tensor
    start_distance: torch.Tensor
    source: torch.Tensor
    steps: torch.Tensor
    status: list[str]


def leaf_projection(
    model: nn.Module,
    x: torch.Tensor,
    reference: torch.Tensor,
    *,
    neighbours: int = 1,
    max_steps: int = 100,
    step_size: float = 0.1,
    stall_rtol: float = 1e-2,
    tol: float = 1e-3,
    batch_size: int = 64,
    model_output: str = "logits",
    progress: bool = False,
) -> LeafProjection:
    """Project each x onto the data leaf through capped horizontal paths from its
    ``neighbours`` nearest ``reference`` images (see the module docstring).

    The paths run ``batch_size`` at a time, each at most ``max_steps`` steps of at most
    ``step_size`` (the budget: ``n · neighbours · max_steps`` Jacobians of C − 1 products);
    a path stops when ``‖P_D(x − y)‖ ≤ stall_rtol · ‖x − y‖`` (the residual left is the
    off-leaf part) or when ``‖x − y‖ < tol``. Points are not clamped: the foliation is one of
    all of ℝ^d.

    Examples
    --------
    A linear softmax model's leaves are the parallel planes ``r + span{W_i − W_j}``; the
    distance of x from the leaf of r is ``‖P_ker (x − r)‖``:

    >>> import torch
    >>> model = torch.nn.Linear(5, 3).double()
    >>> r, x = torch.zeros(1, 5, dtype=torch.float64), torch.ones(1, 5, dtype=torch.float64)
    >>> proj = leaf_projection(model, x, r, max_steps=200, step_size=0.5, stall_rtol=1e-8)
    >>> W = model.weight.detach()
    >>> Q = torch.linalg.qr((W[1:] - W[0]).T).Q  # an orthonormal basis of D
    >>> exact = (x[0] - Q @ (Q.T @ x[0])).norm()
    >>> bool(torch.isclose(proj.distance[0], exact, atol=1e-6))
    True
    """
    check_batch(x, "x")
    check_batch(reference, "reference")
    check_positive_int(neighbours, "neighbours")
    check_positive_int(max_steps, "max_steps", minimum=0)
    check_number(step_size, "step_size", low=0.0, strict=True)
    check_number(stall_rtol, "stall_rtol", low=0.0)
    check_number(tol, "tol", low=0.0)
    check_positive_int(batch_size, "batch_size")
    check_choice(model_output, MODEL_OUTPUTS, "model_output")
    n, k = x.shape[0], neighbours
    reference = reference.to(x)
    _, idx = nearest_neighbours(x, reference, k)
    src = reference[idx.reshape(-1)]  # (n·k, *shape), neighbour j of x_i at row i·k + j
    tgt = x.repeat_interleave(k, dim=0)
    ends, steps, status = [], [], []
    slices = list(chunks(n * k, batch_size))
    for sl in progress_bar(slices, enabled=progress, desc="leaf projection", unit="batch",
                           leave=False):
        res = horizontal_path(model, src[sl], tgt[sl], step_size=step_size, max_steps=max_steps,
                              tol=tol, capped=True, stall_rtol=stall_rtol,
                              record_every=max(max_steps, 1), model_output=model_output)
        ends.append(res.final.to(x))
        steps.append(res.steps)
        status += res.status
    end = torch.cat(ends)
    dist = _flat(tgt - end).norm(dim=1).reshape(n, k)
    best = dist.argmin(dim=1)
    rows = torch.arange(n, device=best.device) * k + best
    start = _flat(tgt - src).norm(dim=1)[rows]
    return LeafProjection(
        point=end[rows], distance=dist.gather(1, best[:, None])[:, 0], start_distance=start,
        source=idx.gather(1, best[:, None].to(idx.device))[:, 0],
        steps=torch.cat(steps)[rows.cpu()], status=[status[i] for i in rows.tolist()],
    )


def denoise_leaf(model: nn.Module, x: torch.Tensor, reference: torch.Tensor,
                 clamp: tuple[float, float] | None = (0.0, 1.0), **options) -> torch.Tensor:
    """The data-leaf projection of x (:func:`leaf_projection`, ``options`` passed on),
    clamped to the data domain ``clamp``."""
    point = leaf_projection(model, x, reference, **options).point
    return point.clamp(*clamp) if clamp is not None else point


@torch.no_grad()
def denoise_vae(vae: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """A VAE's (or autoencoder's) reconstruction through the posterior mean: ``dec(μ(x))``."""
    check_batch(x, "x")
    check_positive_int(batch_size, "batch_size")
    with eval_mode(vae):
        return torch.cat([vae(x[sl]) for sl in chunks(x.shape[0], batch_size)])


@torch.no_grad()
def denoise_flow(flow: nn.Module, x: torch.Tensor, *, temperature: float = 0.7,
                 clamp: tuple[float, float] | None = (0.0, 1.0),
                 batch_size: int = 256) -> torch.Tensor:
    """A flow's temperature-shrunk projection ``dec(T · enc(x))`` (T < 1 pulls the latent
    towards the mode, as sampling at reduced temperature does), clamped to ``clamp``. The
    inverse of an affine coupling divides by its scale, which may vanish away from the data:
    such rows come back NaN rather than silently replaced."""
    check_batch(x, "x")
    check_number(temperature, "temperature", low=0.0, high=1.0, strict=True)
    check_positive_int(batch_size, "batch_size")
    out = []
    with eval_mode(flow):
        for sl in chunks(x.shape[0], batch_size):
            out.append(flow.decode(temperature * flow.encode(x[sl])))
    y = torch.cat(out)
    return y.clamp(*clamp) if clamp is not None else y


def psnr(x: torch.Tensor, clean: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image (n,), in dB: ``10 log₁₀(peak² / MSE)`` (+inf for
    an exact copy).

    >>> import torch
    >>> float(psnr(torch.full((1, 4), 0.1), torch.zeros(1, 4)))  # MSE 0.01 → 20 dB
    20.0
    """
    check_batch(x, "x")
    check_batch(clean, "clean")
    if x.shape != clean.shape:
        raise ValueError(f"x and clean must have one shape, got {tuple(x.shape)} and "
                         f"{tuple(clean.shape)}")
    check_number(peak, "peak", low=0.0, strict=True)
    mse = _flat(x.double() - clean.double()).pow(2).mean(dim=1)
    return (10 * torch.log10(peak**2 / mse)).to(torch.promote_types(x.dtype, torch.float32))
