"""Tangent spaces of the data manifold (Bordt et al., §3.3), batched: projections, the fraction
of a vector in tangent space, principal angles, and the random baseline.

A :class:`TangentSpace` holds, for each of n points, an orthonormal basis of a k-dimensional
subspace T ⊂ ℝ^d as ROWS (n, k, d) — the convention of :meth:`LocalDataMatrix.basis` — and a
mask (n, k) for per-point dimensions. Never a d × d projector: ``P_T v = Bᵀ(B v)`` costs O(kd).

* ``fraction(E) = ‖P_T E‖ / ‖E‖ ∈ [0, 1]`` (Bordt et al., eq. 1).
* A random direction has fraction ``E[√Beta(k/2, (d−k)/2)] ≈ √(k/d)``
  (:func:`random_fraction_baseline`); over points whose subspaces have different dimensions,
  its mean over the points (:func:`mean_random_fraction_baseline`,
  :meth:`TangentSpace.random_baseline`): a decoder whose Jacobian has rank below k spans
  fewer than k directions, and √(k/d) would overstate the baseline.
* Tangent spaces come from a decoder (span of ∂dec/∂z, forward mode: k JVPs, k ≪ d), from the
  classifier itself (``D_x = (ker G)^⊥``, Grementieri & Fioresi) or from data (local PCA).

References
----------
S. Bordt, U. Upadhyay, Z. Akata, U. von Luxburg. "The Manifold Hypothesis for Gradient-Based
Explanations." CVPR Workshops 2023. arXiv:2206.07387. §3.3, eq. 1.

L. Grementieri, R. Fioresi. "Model-centric Data Manifold: the Data Through the Eyes of the
Model." SIAM Journal on Imaging Sciences 15(3), 2022. arXiv:2104.13289. §2.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import nn

from ._checks import check_batch, check_finite, check_independent_samples, check_positive_int
from ._utils import chunks
from .information import local_data_matrix
from .jacobian import ModelOutput
from .memory import (
    cached_cost,
    check_max_memory,
    measure_cost,
    plan_chunk_size,
    resolve_max_memory,
)

__all__ = [
    "TangentSpace",
    "default_rank_rtol",
    "mean_random_fraction_baseline",
    "nonzero_rows",
    "principal_angles",
    "random_fraction_baseline",
]


def _linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    """LAPACK works in float32/float64 only: half precisions are factorised in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def default_rank_rtol(d: int, k: int, dtype: torch.dtype) -> float:
    """The relative tolerance below which a direction of k vectors in ℝ^d is dropped,
    ``max(d, k) · eps`` in the dtype the factorisation runs in (as numpy's ``matrix_rank``)."""
    return max(d, k) * torch.finfo(_linalg_dtype(dtype)).eps


def nonzero_rows(basis: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """Which rows of the bases ``basis`` (n, k, d) are not zero, (n, k) bool: the directions
    they span (a zero row spans nothing). Read ``chunk_size`` points at a time, so a large
    basis is never copied whole."""
    n, k = basis.shape[:2]
    if n == 0:
        return torch.zeros((0, k), dtype=torch.bool, device=basis.device)
    return torch.cat([basis[i:i + chunk_size].abs().amax(-1) > 0
                      for i in range(0, n, chunk_size)])


def _deterministic_signs(rows: torch.Tensor) -> torch.Tensor:
    """Flip each row (…, r, d) so that its entry of largest magnitude is positive."""
    idx = rows.abs().argmax(-1, keepdim=True)
    sign = torch.sign(rows.gather(-1, idx))
    return rows * torch.where(sign == 0, torch.ones_like(sign), sign)


def _orthonormal_rows(
    cols: torch.Tensor, rtol: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the column space of ``cols`` (n, d, k) as rows (n, r, d),
    ``r = min(d, k)``, and its mask (n, r).

    Thin Householder QR ``A = QR`` (O(dk²)), then the SVD of the small r × k factor
    ``R = UΣVᵀ``: ``A = (QU) Σ Vᵀ`` is the thin SVD of A, so the directions kept (``σ > rtol ·
    σ_max``, default ``rtol = max(d, k) · eps``) span col(A) even when its columns are
    dependent in any order (the diagonal of an unpivoted R does not reveal rank). Rows are
    sorted by decreasing σ; the mask is a prefix.
    """
    dtype = cols.dtype
    d, k = cols.shape[-2:]
    work = cols.to(_linalg_dtype(dtype))
    q, r = torch.linalg.qr(work)
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    rows = _deterministic_signs((q @ u).mT)
    if rtol is None:
        rtol = default_rank_rtol(d, k, dtype)
    mask = (s > rtol * s[:, :1]) & (s > 0)
    return (rows * mask.unsqueeze(-1).to(rows.dtype)).to(dtype), mask


def _decoder_chunk(decoder: Callable[[torch.Tensor], torch.Tensor], zc: torch.Tensor,
                   rtol: float | None, check: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Orthonormal rows (m, r, d), mask (m, r) and image shape of ``col(∂dec/∂z)`` at the codes
    ``zc`` (m, k): k JVPs batched by ``vmap`` over the unit tangents."""
    m, k = zc.shape
    eye = torch.eye(k, dtype=zc.dtype, device=zc.device)
    tangents = eye.unsqueeze(1).expand(k, m, k)

    def push(t: torch.Tensor):
        return torch.func.jvp(decoder, (zc,), (t,))

    with torch.no_grad():
        out, jac = torch.func.vmap(push, out_dims=(None, 0), randomness="same")(tangents)
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != m:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the decoder must map z (n, k) to images (n, *image_shape) with "
                         f"n = {m}, got {got}")
    if check:
        check_finite(out, "decoder output")
        check_finite(jac.movedim(0, 1), "decoder Jacobian")
    cols = jac.reshape(k, m, -1).permute(1, 2, 0)  # (m, d, k)
    rows, mask = _orthonormal_rows(cols, rtol)
    return rows, mask, tuple(out.shape[1:])


class TangentSpace:
    """A batch of subspaces ``T_i ⊂ ℝ^d`` held through orthonormal bases.

    Attributes
    ----------
    basis : Tensor (n, k, d)
        Orthonormal rows; rows whose ``mask`` is false are zero and ignored.
    mask : Tensor (n, k) bool
        Which rows span ``T_i``; ``dim`` is its row sum. Built without one, the nonzero rows
        (a zero row belongs to no orthonormal basis), so a stored ``basis`` alone round-trips.
    input_shape : tuple
        Shape of one point; vectors passed to the methods are shaped ``(n, *input_shape)``
        (or flat, ``(n, d)``) and results come back shaped like them.

    The constructor trusts that the rows are orthonormal; build from any spanning set with
    :meth:`from_basis`.

    Examples
    --------
    The plane z = 0 in ℝ³ at two points:

    >>> import torch
    >>> T = TangentSpace.from_basis(torch.tensor([[[1.0, 0, 0], [1, 1, 0]]]).expand(2, 2, 3))
    >>> T.dim.tolist()
    [2, 2]
    >>> v = torch.tensor([[3.0, 4, 0], [0, 3, 4]])
    >>> T.project(v)
    tensor([[3., 4., 0.],
            [0., 3., 0.]])
    >>> T.fraction(v)  # ‖P_T v‖ / ‖v‖
    tensor([1.0000, 0.6000])
    """

    def __init__(
        self,
        basis: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        if not isinstance(basis, torch.Tensor) or not basis.is_floating_point():
            raise TypeError("basis must be a floating-point torch.Tensor (n, k, d)")
        if basis.ndim != 3:
            raise ValueError(
                f"basis must be shaped (n, k, d) with orthonormal rows, got {tuple(basis.shape)}"
            )
        check_finite(basis, "basis")
        n, k, d = basis.shape
        if mask is None:
            mask = nonzero_rows(basis)
        elif mask.shape != (n, k) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor shaped (n, k) = ({n}, {k}), got "
                f"{tuple(mask.shape)} {mask.dtype}"
            )
        input_shape = (d,) if input_shape is None else tuple(int(s) for s in input_shape)
        if math.prod(input_shape) != d:
            raise ValueError(f"input_shape {input_shape} does not hold d = {d} numbers")
        self.mask = mask.to(basis.device)
        if not bool(self.mask.all()):  # zero the ignored rows; an expanded basis stays a view
            basis = torch.where(self.mask.unsqueeze(-1), basis, torch.zeros_like(basis))
        self.basis = basis
        self.input_shape = input_shape

    # ---------------------------------------------------------------------------- views

    def __len__(self) -> int:
        return self.basis.shape[0]

    def __repr__(self) -> str:
        n, k, d = self.basis.shape
        return (
            f"TangentSpace(n={n}, k={k}, d={d}, input_shape={self.input_shape}, "
            f"dtype={self.basis.dtype}, device={self.basis.device})"
        )

    @property
    def dim(self) -> torch.Tensor:
        """Dimension of each subspace (n,): the number of rows kept by ``mask``."""
        return self.mask.sum(-1)

    @property
    def ambient_dim(self) -> int:
        """d, the number of coordinates of one point."""
        return self.basis.shape[-1]

    def random_baseline(self) -> float:
        """The fraction a random direction has, on average over the points, each from its
        own ``dim`` (:func:`mean_random_fraction_baseline`): ``random_fraction_baseline(k,
        d)`` exactly when every point has k directions."""
        return mean_random_fraction_baseline(self.dim, self.ambient_dim)

    def to(self, *args, **kwargs) -> TangentSpace:
        """Move / cast the basis like ``Tensor.to``; the mask follows the device, stays bool."""
        basis = self.basis.to(*args, **kwargs)
        return TangentSpace(basis, self.mask.to(basis.device), self.input_shape)

    # ------------------------------------------------------------------------- algebra

    def _flat(self, v: torch.Tensor, name: str = "v") -> torch.Tensor:
        n, d = len(self), self.ambient_dim
        if not isinstance(v, torch.Tensor) or v.ndim < 2 or v.shape[0] != n or (
            tuple(v.shape[1:]) not in (self.input_shape, (d,))
        ):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"{name} must be shaped (n, *input_shape) = "
                f"{(n, *self.input_shape)} (or flat ({n}, {d})), got {got}"
            )
        check_batch(v, name)
        return v.reshape(n, d)

    def _coefficients(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coordinates ``B v`` (n, k) and the basis, both in the promoted dtype."""
        dtype = torch.promote_types(flat.dtype, self.basis.dtype)
        basis = self.basis.to(device=flat.device, dtype=dtype)
        return torch.einsum("nkd,nd->nk", basis, flat.to(dtype)), basis

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection ``P_T v = Bᵀ(B v)``, shaped like v."""
        flat = self._flat(v)
        coef, basis = self._coefficients(flat)
        return torch.einsum("nk,nkd->nd", coef, basis).reshape(v.shape)

    def orthogonal(self, v: torch.Tensor) -> torch.Tensor:
        """The part of v orthogonal to T: ``v − P_T v``, shaped like v."""
        return v - self.project(v)

    def fraction(self, v: torch.Tensor) -> torch.Tensor:
        """Fraction in tangent space ``‖P_T v‖ / ‖v‖ ∈ [0, 1]`` (n,), Bordt et al., eq. (1).

        ``‖P_T v‖ = ‖B v‖`` (orthonormal rows). Each v is first scaled by its largest entry, so
        tiny or huge vectors neither underflow nor overflow. A zero vector has no direction:
        its fraction is defined as 0 (never NaN). NaN/Inf in v raise ``ValueError`` naming
        the samples.
        """
        flat = self._flat(v)
        scale = flat.abs().amax(-1, keepdim=True)
        zero = scale == 0
        unit = flat / torch.where(zero, torch.ones_like(scale), scale)
        coef, _ = self._coefficients(unit)
        norm = torch.linalg.vector_norm(unit.to(coef.dtype), dim=-1)
        frac = torch.linalg.vector_norm(coef, dim=-1) / torch.where(
            zero[:, 0], torch.ones_like(norm), norm
        )
        return torch.where(zero[:, 0], torch.zeros_like(frac), frac.clamp(0, 1))

    # ---------------------------------------------------------------------- constructors

    @classmethod
    def from_basis(
        cls,
        vectors: torch.Tensor,
        input_shape: tuple[int, ...] | None = None,
        *,
        columns: bool = False,
        rtol: float | None = None,
    ) -> TangentSpace:
        """The spans of arbitrary spanning sets, orthonormalised.

        ``vectors`` holds k vectors per point as rows (n, k, d) — or (n, k, *input_shape) —
        or, with ``columns=True``, as columns (n, d, k). Thin QR followed by the SVD of the
        small R factor (rank-revealing): directions whose singular value is at most ``rtol``
        (default ``max(d, k) · eps``) times the largest are dropped (``mask`` false). The
        rows come sorted by decreasing singular value, each signed so that its largest entry
        is positive (deterministic).
        """
        check_batch(vectors, "vectors", min_ndim=3)
        if columns:
            if vectors.ndim != 3:
                raise ValueError(
                    f"with columns=True, vectors must be shaped (n, d, k), got "
                    f"{tuple(vectors.shape)}"
                )
            cols = vectors
        else:
            if input_shape is None and vectors.ndim > 3:
                input_shape = tuple(vectors.shape[2:])
            cols = vectors.reshape(vectors.shape[0], vectors.shape[1], -1).mT
        rows, mask = _orthonormal_rows(cols, rtol)
        return cls(rows, mask, input_shape)

    @classmethod
    def from_decoder(
        cls,
        decoder: nn.Module | Callable[[torch.Tensor], torch.Tensor],
        z: torch.Tensor,
        *,
        chunk_size: int | None = None,
        rtol: float | None = None,
        max_memory: float | None = None,
    ) -> TangentSpace:
        """Tangent spaces of a decoder's image ``{dec(z)}``: ``T = col(∂dec/∂z)`` at z (n, k).

        The decoder maps (n, k) to (n, *image_shape). Its d × k Jacobian is computed in
        forward mode — k JVPs, batched over the samples and (``torch.func.vmap``) over the k
        unit tangents, since k ≪ d — ``chunk_size`` samples at a time (default: as many as
        ``max_memory`` bytes allow, None: half the memory available; measured on the ``meta``
        device, :mod:`manifoldlens.memory`), then orthonormalised as in :meth:`from_basis`
        (``rtol``). A decoder that decodes only its own n codes (a flow's ``LatentSlice``) is
        not measured: it runs in one chunk. A decoder in train mode with BatchNorm couples
        the samples and raises ``ValueError`` (call ``decoder.eval()``). A flow's ``decode``
        works too, but a flow is a bijection, so its tangent space is all of ℝ^D:
        :func:`manifoldlens.flows.tangent_space` gives its k-dimensional latent slices.

        Examples
        --------
        A linear decoder ``z ↦ Wz + b`` has the same tangent space col(W) everywhere:

        >>> import torch
        >>> dec = torch.nn.Linear(2, 5).double()
        >>> T = TangentSpace.from_decoder(dec, torch.randn(3, 2, dtype=torch.float64))
        >>> T.dim.tolist(), T.input_shape
        ([2, 2, 2], (5,))
        >>> W = dec.weight.detach().T.expand(3, 2, 5)  # rows: the columns of W
        >>> torch.allclose(T.project(W[:, 0]), W[:, 0])
        True
        """
        if isinstance(decoder, nn.Module):
            check_independent_samples(decoder)
        check_batch(z, "z")
        if z.ndim != 2:
            raise ValueError(f"z must be latent codes shaped (n, k), got {tuple(z.shape)}")
        check_positive_int(chunk_size, "chunk_size", allow_none=True)
        budget = resolve_max_memory(max_memory, z.device)
        n, k = z.shape
        try:
            cost = cached_cost(decoder, ("decoder", k, z.dtype, z.device.type), lambda: (
                measure_cost(decoder, z, lambda d, zb: _decoder_chunk(d, zb, rtol, False))))
        except Exception:  # noqa: BLE001 — it decodes only its own n codes (a LatentSlice)
            cost = None
        step = chunk_size if cost is None else plan_chunk_size(
            n, cost, budget, chunk_size=chunk_size, what="from_decoder", shape=(k,),
            hint="raise max_memory")
        rows, masks, image_shape = [], [], ()
        for sl in chunks(n, step):
            r, m, image_shape = _decoder_chunk(decoder, z[sl].detach(), rtol)
            rows.append(r)
            masks.append(m)
        return cls(torch.cat(rows), torch.cat(masks), image_shape)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        x: torch.Tensor,
        *,
        model_output: ModelOutput = "logits",
        rtol: float | None = None,
        chunk_size: int | None = None,
        top_k: int | None = None,
        max_memory: float | None = None,
    ) -> TangentSpace:
        """The classifier's own distribution ``D_x = (ker G)^⊥ = span{∇_x log p_c}``.

        From :func:`manifoldlens.information.local_data_matrix` and
        :meth:`LocalDataMatrix.basis` (``rtol``): at most C − 1 dimensions (Grementieri &
        Fioresi, §2). ``top_k=K``: the span of the K most probable classes' gradients only
        (K backward passes; at most K dimensions, a subspace of D_x). ``chunk_size`` defaults
        to what ``max_memory`` bytes allow (None: half the memory available).
        """
        check_max_memory(max_memory)
        G = local_data_matrix(model, x, model_output=model_output, chunk_size=chunk_size,
                              top_k=top_k, max_memory=max_memory)
        vecs, mask = G.basis(rtol)
        return cls(vecs, mask, G.input_shape)

    @classmethod
    def local_pca(
        cls,
        points: torch.Tensor,
        k: int,
        *,
        n_neighbors: int | None = None,
        at: torch.Tensor | None = None,
        chunk_size: int = 256,
        rtol: float | None = None,
    ) -> TangentSpace:
        """Tangent spaces estimated from data by local PCA.

        For each query point (``at``, default ``points``) its ``n_neighbors`` nearest points
        (Euclidean, ``torch.cdist`` over ``chunk_size`` queries at a time; a query that is one
        of the points counts as its own neighbour; default ``min(N, max(4k, k + 1))``) are
        centred on their mean; the top-k right singular vectors span the estimate. Directions
        with singular value at most ``rtol`` (default ``max(n_neighbors, d) · eps``) times the
        largest are masked out (e.g. duplicated points).
        """
        check_batch(points, "points")
        num, shape = points.shape[0], tuple(points.shape[1:])
        d = math.prod(shape)
        if at is None:
            at = points
        else:
            check_batch(at, "at")
            if tuple(at.shape[1:]) != shape:
                raise ValueError(
                    f"at must be shaped (m, *point_shape) = (m, {', '.join(map(str, shape))}), "
                    f"got {tuple(at.shape)}"
                )
        if n_neighbors is None:
            n_neighbors = min(num, max(4 * k, k + 1))
        if not 1 <= k <= d:
            raise ValueError(f"k must be in [1, d] = [1, {d}], got {k}")
        if not k + 1 <= n_neighbors <= num:
            raise ValueError(
                f"n_neighbors must be in [k + 1, number of points] = [{k + 1}, {num}], got "
                f"{n_neighbors} (k centred neighbours span at most k − 1 directions)"
            )
        pts = points.reshape(num, d)
        queries = at.reshape(at.shape[0], d).to(pts.dtype)
        work = _linalg_dtype(pts.dtype)
        rows, masks = [], []
        for sl in chunks(queries.shape[0], chunk_size):
            dist = torch.cdist(queries[sl], pts)
            idx = dist.topk(n_neighbors, dim=1, largest=False).indices
            nb = pts[idx].to(work)  # (m, n_neighbors, d)
            nb = nb - nb.mean(1, keepdim=True)
            _, s, vh = torch.linalg.svd(nb, full_matrices=False)
            tol = rtol if rtol is not None else max(n_neighbors, d) * torch.finfo(work).eps
            mask = (s[:, :k] > tol * s[:, :1]) & (s[:, :k] > 0)
            r = _deterministic_signs(vh[:, :k]) * mask.unsqueeze(-1).to(work)
            rows.append(r.to(pts.dtype))
            masks.append(mask)
        return cls(torch.cat(rows), torch.cat(masks), shape)


def principal_angles(a: TangentSpace, b: TangentSpace) -> torch.Tensor:
    """Principal angles between ``a_i`` and ``b_i`` (n, min(k_a, k_b)), radians, ascending.

    ``cos θ_j = σ_j(A Bᵀ)`` (clamped to [0, 1]) for angles above π/4; below, where arccos
    loses precision (``arccos(1 − ε) ≈ √(2ε)``), ``sin θ_j`` from the singular values of the
    residual ``A − (A Bᵀ) B`` (Knyazev & Argentati 2002, as ``scipy.linalg.subspace_angles``).
    Masks are respected: sample i has ``min(dim a_i, dim b_i)`` angles, the entries after them
    are NaN (undefined).

    Examples
    --------
    >>> import torch
    >>> e = torch.eye(3).expand(1, 3, 3)
    >>> principal_angles(TangentSpace(e[:, :2]), TangentSpace(e[:, 1:]))  # share the y-axis
    tensor([[0.0000, 1.5708]])
    """
    if not isinstance(a, TangentSpace) or not isinstance(b, TangentSpace):
        raise TypeError("principal_angles takes two TangentSpace objects")
    if len(a) != len(b) or a.ambient_dim != b.ambient_dim:
        raise ValueError(
            f"a and b must hold as many points in the same space: (n, d) = "
            f"({len(a)}, {a.ambient_dim}) vs ({len(b)}, {b.ambient_dim})"
        )
    dtype = _linalg_dtype(torch.promote_types(a.basis.dtype, b.basis.dtype))
    A = a.basis.to(dtype)
    B = b.basis.to(device=A.device, dtype=dtype)
    m = min(A.shape[1], B.shape[1])
    cross = A @ B.mT  # (n, k_a, k_b)
    cos = torch.linalg.svdvals(cross)[:, :m].clamp(0, 1)  # descending
    # A(I − P_B) has singular values [1]*(dim_a − dim_b)⁺, sin θ descending, then zeros: the
    # sine paired with the j-th largest cosine sits at index dim_a − 1 − j.
    sines = torch.linalg.svdvals(A - cross @ B)
    dim_a = a.dim.to(A.device)
    dims = torch.minimum(dim_a, b.dim.to(A.device))
    j = torch.arange(m, device=A.device)
    idx = (dim_a.unsqueeze(1) - 1 - j).clamp(0, sines.shape[1] - 1)
    sin = sines.gather(1, idx).clamp(0, 1)
    theta = torch.where(cos**2 >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    return torch.where(j < dims.unsqueeze(1), theta, torch.full_like(theta, float("nan")))


def random_fraction_baseline(k: int, d: int) -> float:
    """Expected fraction in tangent space of a random direction, for a k-dim subspace of ℝ^d.

    For v uniform on the sphere (equivalently Gaussian), ``‖P v‖² / ‖v‖² ~ Beta(k/2, (d−k)/2)``
    and, exactly,

    ``E[‖P v‖ / ‖v‖] = E[√Beta(k/2, (d−k)/2)] = Γ((k+1)/2) Γ(d/2) / (Γ(k/2) Γ((d+1)/2))``

    (through ``math.lgamma``). Bordt et al. (§3.3) quote ≈ √(k/d), the root of the mean
    ``E‖P v‖²/‖v‖² = k/d``; by Jensen the exact mean is below it, ≈ √(k/d) (1 − 1/(4k)) for
    k ≪ d (2.4 % below at k = 10, d = 1024). An explanation is related to the manifold only
    if its mean fraction is clearly above this baseline.

    Examples
    --------
    >>> round(random_fraction_baseline(10, 1024), 4), round((10 / 1024) ** 0.5, 4)
    (0.0964, 0.0988)
    >>> random_fraction_baseline(1, 2)  # E|cos θ| on the circle: 2/π
    0.6366...
    >>> random_fraction_baseline(3, 3)
    1.0
    """
    k, d = operator.index(k), operator.index(d)
    if not 0 <= k <= d or d < 1:
        raise ValueError(f"need 0 <= k <= d and d >= 1, got k = {k}, d = {d}")
    if k == 0:
        return 0.0
    if k == d:
        return 1.0
    log = (
        math.lgamma((k + 1) / 2) + math.lgamma(d / 2)
        - math.lgamma(k / 2) - math.lgamma((d + 1) / 2)
    )
    return math.exp(log)


def mean_random_fraction_baseline(dims: torch.Tensor | list[int], d: int) -> float:
    """:func:`random_fraction_baseline` averaged over points whose subspaces of ℝ^d have the
    dimensions ``dims`` (e.g. :attr:`TangentSpace.dim`): the expected fraction of a random
    direction at a point drawn from them. Equal dimensions m give ``random_fraction_baseline
    (m, d)`` exactly (no averaging round-off).

    Examples
    --------
    >>> mean_random_fraction_baseline([3, 3], 3), mean_random_fraction_baseline([0, 3], 3)
    (1.0, 0.5)
    """
    values, counts = torch.as_tensor(dims).flatten().long().unique(return_counts=True)
    if values.numel() == 0:
        raise ValueError("dims is empty: no point to average over")
    if values.numel() == 1:
        return random_fraction_baseline(int(values[0]), d)
    total = sum(int(c) * random_fraction_baseline(int(m), d)
                for m, c in zip(values.tolist(), counts.tolist(), strict=True))
    return total / int(counts.sum())
