"""The manifolds a flow gives: k-dimensional slices of its latent space and their tangent spaces.

A flow's decoder ``g = f⁻¹: ℝ^D → ℝ^D`` is a bijection: ``TangentSpace.from_decoder(flow.decode,
z)`` is all of ℝ^D. A k-dimensional data manifold through x is a slice of the latent space
through its own code ``z₀ = f(x)``, along k orthonormal latent directions V (k × D):

    g_V(t) = g(z₀ + (t − t₀) V),   t ∈ ℝ^k,   t₀ = V z₀,

the component of z₀ in span V replaced by t, the rest held at z₀; ``g_V(t₀) = x`` and the
tangent space there is ``T_x = col(J Vᵀ)``, J = ∂g/∂z at z₀ (:class:`LatentSlice`).

Which directions (:func:`tangent_space`):

* by default the **principal** ones, the top-k right singular vectors of ``J = U S Vᵀ``
  (:func:`principal_directions`). Linearised at z₀ the flow maps its base (i.i.d. coordinates
  of one variance σ²: normal or logistic) to a distribution around x with covariance
  ``σ² J Jᵀ = σ² U S² Uᵀ``; ``T_x = span(U_k)`` is its top-k eigenspace — the k directions in
  which the model spreads its mass most around x (a local PCA of the model's density);
* or given: latent coordinates (indices, or a slice such as the coarsest scale's,
  ``flow.latent_scales()[-1]``), or orthonormal rows (k, D) or (n, k, D).
"""

from __future__ import annotations

import math

import torch

from .._checks import check_batch, check_finite, check_positive_int
from .._utils import chunks, eval_mode
from ..tangent import TangentSpace
from .models import Flow

__all__ = ["LatentSlice", "principal_directions", "tangent_space"]

#: Latent directions: coordinates (an index tensor or list (k,), a slice) or orthonormal rows.
Directions = torch.Tensor | slice | list | tuple


def _check_flow(flow: Flow) -> None:
    if not isinstance(flow, Flow):
        raise TypeError(f"flow must be a manifoldlens.flows.Flow, got {type(flow).__name__}")


def _check_codes(z: torch.Tensor, flow: Flow, name: str = "z") -> None:
    check_batch(z, name)
    if z.ndim != 2 or z.shape[1] != flow.dim:
        raise ValueError(f"{name} must be latent codes shaped (n, {flow.dim}) for this flow, "
                         f"got {tuple(z.shape)}")


def _check_k(k: int, dim: int) -> None:
    check_positive_int(k, "k")
    if k > dim:
        raise ValueError(f"k must be in [1, D] = [1, {dim}], got {k}")


def _direction_rows(directions: Directions, n: int, dim: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """Directions as orthonormal rows (n, k, D): latent coordinates become unit vectors; rows
    (k, D) are shared by the n points; (n, k, D) are one set per point."""
    if isinstance(directions, slice):
        directions = torch.arange(dim)[directions]
    if not isinstance(directions, torch.Tensor):
        directions = torch.as_tensor(directions)
    if not directions.is_floating_point():
        if directions.dtype == torch.bool or directions.is_complex() or directions.ndim != 1:
            raise ValueError(f"latent coordinates must be an integer index tensor (k,), got "
                             f"{directions.dtype} shaped {tuple(directions.shape)}")
        idx = directions.long()
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= dim or (
                idx.unique().numel() != idx.numel()):
            raise ValueError(f"latent coordinates must be at least one distinct index in "
                             f"[0, {dim}), got {idx.tolist()}")
        rows = torch.nn.functional.one_hot(idx, dim).to(dtype=dtype, device=device)
        return rows.expand(n, -1, -1)
    if directions.ndim == 2:
        directions = directions.expand(n, -1, -1)
    if directions.ndim != 3 or directions.shape[0] != n or directions.shape[2] != dim or (
            directions.shape[1] == 0):
        raise ValueError(f"latent directions must be rows shaped (k, {dim}) or ({n}, k, {dim}), "
                         f"got {tuple(directions.shape)}")
    check_finite(directions, "directions")
    tol = 10 * math.sqrt(torch.finfo(directions.dtype).eps)
    gram = directions @ directions.mT
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    err = float((gram - eye).abs().amax())
    if err > tol:
        raise ValueError(f"latent directions must be orthonormal rows (V Vᵀ = I); "
                         f"max |V Vᵀ − I| = {err:.3g} > {tol:.3g}")
    return directions.to(dtype=dtype, device=device)


class LatentSlice:
    """The decoder of a k-dimensional slice of a flow's latent space through each of n codes:
    ``t (n, k) ↦ flow.decode(z₀ + (t − t₀) V)`` with ``t₀ = V z₀`` (:attr:`origin`), so
    ``slice(slice.origin) = flow.decode(z₀)``.

    ``directions``: latent coordinates (an index tensor or list (k,), or a ``slice``) or
    orthonormal rows (k, D) shared by the points or (n, k, D) one set per point. A decoder for
    :meth:`TangentSpace.from_decoder` at :attr:`origin`: ``T = col(J Vᵀ)``, J = ∂decode/∂z at
    z₀ — it holds its n points, so it decodes exactly n codes (no ``chunk_size`` there;
    :func:`tangent_space` chunks). Pure tensor operations: it runs under ``torch.func``.

    Examples
    --------
    >>> import torch
    >>> from manifoldlens.flows import NICE
    >>> flow = NICE((4,), couplings=2, hidden=8, depth=1).double()
    >>> z0 = torch.randn(3, 4, dtype=torch.float64)
    >>> dec = LatentSlice(flow, z0, [0, 2])  # move latent coordinates 0 and 2
    >>> dec.origin.shape, torch.allclose(dec(dec.origin), flow.decode(z0))
    (torch.Size([3, 2]), True)
    >>> TangentSpace.from_decoder(dec, dec.origin).dim.tolist()
    [2, 2, 2]
    """

    def __init__(self, flow: Flow, z0: torch.Tensor, directions: Directions):
        _check_flow(flow)
        _check_codes(z0, flow, "z0")
        self.flow = flow
        self.z0 = z0.detach()
        #: orthonormal latent directions as rows (n, k, D)
        self.directions = _direction_rows(directions, z0.shape[0], flow.dim, z0.dtype,
                                          z0.device)
        #: the coordinates t₀ = V z₀ (n, k) of the points themselves
        self.origin = torch.einsum("nkd,nd->nk", self.directions, self.z0)

    def __len__(self) -> int:
        return self.z0.shape[0]

    @property
    def dim(self) -> int:
        """k, the dimension of the slice."""
        return self.directions.shape[1]

    def __repr__(self) -> str:
        return f"LatentSlice(n={len(self)}, k={self.dim}, D={self.flow.dim})"

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(self.origin.shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"a LatentSlice of {len(self)} points decodes t shaped "
                             f"{tuple(self.origin.shape)} (one row per point), got {got}")
        move = torch.einsum("nk,nkd->nd", t - self.origin.to(t), self.directions.to(t))
        return self.flow.decode(self.z0.to(t) + move)


def _decoder_jacobian(flow: Flow, z: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """∂decode/∂z at each code (n, d, D), d = D: D JVPs per point (``torch.func.jvp`` under
    ``vmap``), at most ``chunk_size`` decodes (points × tangents) at once."""
    n, dim = z.shape
    eye = torch.eye(dim, dtype=z.dtype, device=z.device)
    out = []
    for sl in chunks(n, max(1, chunk_size // dim)):
        zc = z[sl].detach()
        m = zc.shape[0]

        def column(t: torch.Tensor, zc: torch.Tensor = zc) -> torch.Tensor:
            return torch.func.jvp(flow.decode, (zc,), (t,))[1]

        with torch.no_grad():
            cols = torch.func.vmap(column, chunk_size=max(1, chunk_size // m))(
                eye.unsqueeze(1).expand(dim, m, dim))
        out.append(cols.reshape(dim, m, -1).permute(1, 2, 0))
    jac = torch.cat(out)
    check_finite(jac.reshape(n, -1), "decoder Jacobian")
    return jac


def _principal(flow: Flow, z: torch.Tensor, k: int, chunk_size: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(J, V_k, s_k)``: the Jacobian (n, D, D), the top-k right singular vectors as rows
    (n, k, D), each signed so that its largest entry is positive, and their singular values."""
    jac = _decoder_jacobian(flow, z, chunk_size)
    work = jac if jac.dtype in (torch.float32, torch.float64) else jac.float()
    _, s, vh = torch.linalg.svd(work, full_matrices=False)
    v = vh[:, :k]
    sign = torch.sign(v.gather(-1, v.abs().argmax(-1, keepdim=True)))
    v = v * torch.where(sign == 0, torch.ones_like(sign), sign)
    return jac, v.to(z.dtype), s[:, :k].to(z.dtype)


def principal_directions(flow: Flow, z: torch.Tensor, k: int, *, chunk_size: int = 1024
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k latent directions along which the decoded image moves fastest, at codes z (n, D):
    the top-k right singular vectors of ``J = ∂decode/∂z = U S Vᵀ`` as rows (n, k, D), signed
    so that each one's largest entry is positive, and their singular values (n, k), descending.

    ``span(J V_kᵀ) = span(U_k)`` is the top-k eigenspace of ``J Jᵀ``, the covariance (up to
    the base's variance) the flow puts around ``decode(z)``. Costs D JVPs per point (the full
    Jacobian, forward mode), at most ``chunk_size`` decodes (points × tangents) at once.

    >>> import torch
    >>> from manifoldlens.flows import NICE
    >>> flow = NICE((3,), couplings=2, hidden=8, depth=1).double()  # starts as a scaling
    >>> _ = flow.steps[-1].log_scale.data.copy_(torch.tensor([0.0, -2.0, -1.0]))
    >>> v, s = principal_directions(flow, torch.zeros(1, 3, dtype=torch.float64), 2)
    >>> v, s  # decode(z) = z ⊙ exp(−log_scale): coordinates 1 and 2 move most
    (tensor([[[0., 1., 0.],
             [0., 0., 1.]]], dtype=torch.float64), tensor([[7.3891, 2.7183]], dtype=torch.float64))
    """
    _check_flow(flow)
    _check_codes(z, flow)
    _check_k(k, flow.dim)
    check_positive_int(chunk_size, "chunk_size")
    _, v, s = _principal(flow, z, k, chunk_size)
    return v, s


def tangent_space(flow: Flow, x: torch.Tensor, k: int | None = None, *,
                  directions: Directions | None = None, chunk_size: int = 1024,
                  rtol: float | None = None) -> TangentSpace:
    """Tangent spaces at x (n, *shape) of a k-dimensional manifold a flow gives: the slice of
    its latent space through ``z₀ = encode(x)`` along latent directions V,
    ``T_x = col(J Vᵀ)`` with J = ∂decode/∂z at z₀ (:class:`LatentSlice`).

    ``directions=None`` (default): the principal directions (:func:`principal_directions`,
    needs ``k``; D JVPs per point): ``T_x`` is the top-k eigenspace of ``J Jᵀ``, where the flow
    spreads its mass most around x. Otherwise latent coordinates (indices, a ``slice`` such as
    ``flow.latent_scales()[-1]``, the coarsest scale) or orthonormal rows (k, D) or (n, k, D)
    (``k``, if given, must match; k JVPs per point through :meth:`TangentSpace.from_decoder`).
    ``chunk_size`` bounds the decodes (points × directions) at once; ``rtol`` as in
    :meth:`TangentSpace.from_basis`. The flow runs in eval mode; its modes are restored.

    Examples
    --------
    >>> import torch
    >>> from manifoldlens.flows import Glow
    >>> flow = Glow((1, 8, 8), levels=2, depth=1, hidden_channels=8).double()
    >>> x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    >>> tangent_space(flow, x, k=4)
    TangentSpace(n=3, k=4, d=64, input_shape=(1, 8, 8), dtype=torch.float64, device=cpu)
    >>> tangent_space(flow, x, directions=flow.latent_scales()[-1]).dim.tolist()  # coarsest
    [32, 32, 32]
    """
    _check_flow(flow)
    check_positive_int(chunk_size, "chunk_size")
    check_batch(x, "x")
    if directions is None:
        if k is None:
            raise ValueError("k, the manifold's dimension, is needed for the principal "
                             "directions (or pass directions=)")
        _check_k(k, flow.dim)
    else:
        rows = _direction_rows(directions, x.shape[0], flow.dim, x.dtype, x.device)
        if k is not None and k != rows.shape[1]:
            raise ValueError(f"k = {k} does not match the {rows.shape[1]} directions given")
    with eval_mode(flow):
        with torch.no_grad():
            z = flow.encode(x)
        if directions is None:
            jac, v, _ = _principal(flow, z, k, chunk_size)
            return TangentSpace.from_basis(jac @ v.mT, flow.shape, columns=True, rtol=rtol)
        bases, masks = [], []
        for sl in chunks(x.shape[0], max(1, chunk_size // rows.shape[1])):
            dec = LatentSlice(flow, z[sl], rows[sl])
            t = TangentSpace.from_decoder(dec, dec.origin, rtol=rtol)
            bases.append(t.basis)
            masks.append(t.mask)
    return TangentSpace(torch.cat(bases), torch.cat(masks), flow.shape)
