"""The local data matrix G(x) and the local Fisher matrix F(x, w), factored.

Grementieri & Fioresi, §2: ``G(x) = Σ_c p_c ∇_x log p_c ∇_x log p_cᵀ = AᵀA`` with
``A = diag(√p) J_logp`` (C × d), eq. (6). Everything is computed from A and its C × C Gram
``AAᵀ``: eigenpairs at O(C²d), never O(d³), and no d × d matrix unless
:meth:`LocalDataMatrix.dense` is asked for.

Properties (Proposition 2.1): G is PSD, ``ker G = (span{∇log p_c})^⊥`` and
``rank G ≤ C − 1`` because ``Σ_c p_c ∇log p_c = 0``. ``Tr G = ‖A‖_F² = E_{y∼p} ‖∇log p_y‖²``
(eq. 11). ``KL(p(x+δ) ‖ p(x)) = ½ δᵀG δ + O(‖δ‖³)``.

Few classes where few matter: ``G_K = Σ_{c∈K} p_c ∇log p_c ∇log p_cᵀ`` over each sample's K
most probable classes is exact for those terms and leaves out ``Σ_{c∉K} p_c`` of the mass.
With r the top class and ``u = Σ_j p_j ∇s_j − ∇s_r`` (one vector–Jacobian product with
``p − e_r``), ``∇log p_c = ∇(s_c − s_r) − u``: |K| backward passes instead of C − 1
(:func:`top_k_jacobian`); :func:`trace_estimate` adds an importance-sampled tail to Tr G.

References
----------
L. Grementieri, R. Fioresi. "Model-centric Data Manifold: the Data Through the Eyes of the
Model." SIAM Journal on Imaging Sciences 15(3), 2022. arXiv:2104.13289.
§2, eqs. 6 and 11, Proposition 2.1.
"""

from __future__ import annotations

import math
import numbers
from functools import cached_property
from typing import NamedTuple

import torch
from torch import nn

from ._checks import (
    MODEL_OUTPUTS,
    check_batch,
    check_choice,
    check_independent_samples,
    check_model_output,
    check_positive_int,
)
from ._utils import chunks, progress_bar, scores_with_graph, to_scores
from .jacobian import (
    STRATEGIES,
    ModelOutput,
    Strategy,
    count_classes,
    jacobian_chunk_size,
    score_jacobian,
)
from .memory import check_max_memory

__all__ = [
    "LocalDataMatrix",
    "LocalFisherMatrix",
    "TraceEstimate",
    "data_matrix_statistics",
    "local_data_matrix",
    "local_fisher_matrix",
    "top_k_jacobian",
    "trace_estimate",
]


def default_rtol(num_classes: int, dtype: torch.dtype) -> float:
    """Relative eigenvalue tolerance ``10 · C · eps``: the C × C Gram route resolves
    eigenvalues to about ``C · eps · λ_max``; anything below that is rounding noise."""
    return 10.0 * num_classes * torch.finfo(dtype).eps


_HALF = (torch.float16, torch.bfloat16)


class _FactoredPSD:
    """A batch of PSD matrices ``BᵀB`` held through the factor B (n, C, D) or its Gram."""

    factor: torch.Tensor | None = None

    def __init__(
        self,
        probs: torch.Tensor,
        factor: torch.Tensor | None = None,
        gram: torch.Tensor | None = None,
    ) -> None:
        if probs.dtype in _HALF:  # the C × C algebra runs in float32 for half inputs
            probs = probs.float()
            factor = factor.float() if factor is not None else None
            gram = gram.float() if gram is not None else None
        self.probs = probs
        if factor is not None:
            self.factor = factor
        if gram is not None:
            self.__dict__["gram"] = gram

    def __len__(self) -> int:
        return self.probs.shape[0]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[1]

    def _need_factor(self, what: str) -> torch.Tensor:
        if self.factor is None:
            raise RuntimeError(f"{what} needs the factor; rebuild with keep_factor=True")
        return self.factor

    @cached_property
    def gram(self) -> torch.Tensor:
        """The C × C Gram ``AAᵀ`` (n, C, C); same nonzero spectrum as G."""
        a = self.factor
        return a @ a.mT

    @cached_property
    def _eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        evals, evecs = torch.linalg.eigh(self.gram)
        return evals.flip(-1).clamp_min(0), evecs.flip(-1)

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues (n, C), descending; the remaining D − C are zero."""
        return self._eigh[0]

    @cached_property
    def trace(self) -> torch.Tensor:
        """``Tr = ‖A‖_F²`` (n,), the soft rank (Grementieri & Fioresi, eq. 11)."""
        return self.gram.diagonal(dim1=-2, dim2=-1).sum(-1)

    def _tol(self, rtol: float | None) -> torch.Tensor:
        if rtol is None:  # the size of the Gram: C, or top_k for a restricted G
            rtol = default_rtol(self.eigenvalues.shape[-1], self.eigenvalues.dtype)
        return rtol * self.eigenvalues[:, :1]

    def rank(self, rtol: float | None = None) -> torch.Tensor:
        """Numerical rank (n,): eigenvalues above ``rtol · λ_max`` (default ``10·C·eps``)."""
        ev = self.eigenvalues
        return ((ev > self._tol(rtol)) & (ev > 0)).sum(-1)

    def quadratic_form(self, v: torch.Tensor) -> torch.Tensor:
        """``vᵀ G v = ‖A v‖²`` (n,), exact, through the factor."""
        a = self._need_factor("quadratic_form")
        av = torch.einsum("ncd,nd->nc", a, v.reshape(len(self), -1).to(a.dtype))
        return (av**2).sum(-1)

    def _right(self, u: torch.Tensor) -> torch.Tensor:
        """``Aᵀ U`` (n, D, C)."""
        return self._need_factor("eigenvectors").mT @ u

    @cached_property
    def eigenvectors(self) -> torch.Tensor:
        """Orthonormal eigenvectors (n, C, D) for :attr:`eigenvalues`: ``v_k = Aᵀu_k / √λ_k``
        with ``AAᵀ = UΛUᵀ`` (D = d for G, #params for F; a row of G's reshapes to an input).

        Re-orthonormalised by a thin Householder QR (O(C²D)) in order of decreasing λ, so
        vectors of (numerically) zero eigenvalues are completed to unit vectors orthogonal
        to the range, i.e. lying in the kernel.
        """
        evals, u = self._eigh
        return _orthonormalize(self._right(u), evals)

    def top_eigenvectors(self, m: int) -> torch.Tensor:
        """The first ``m`` rows of :attr:`eigenvectors` (n, m, D), without forming the other
        C − m (at C = 1000, d = 150 528 all of them take 0.6 GB per sample in float32)."""
        check_positive_int(m, "m")
        evals, u = self._eigh
        m = min(m, evals.shape[-1])
        return _orthonormalize(self._right(u[..., :m]), evals[..., :m])


def _orthonormalize(v: torch.Tensor, evals: torch.Tensor) -> torch.Tensor:
    """Rows (n, C, D) of ``v / √λ`` (v: (n, D, C)) made orthonormal by a thin QR, signs kept;
    when D < C only D rows can be, and the last C − D are zero."""
    scale = torch.where(evals > 0, evals.rsqrt(), torch.zeros_like(evals))
    q, r = torch.linalg.qr(v * scale.unsqueeze(-2))
    sign = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    rows = (q * sign.unsqueeze(-2)).mT
    n, d, c = v.shape
    if d < c:
        rows = torch.cat([rows, rows.new_zeros(n, c - d, d)], dim=-2)
    return rows


class LocalDataMatrix(_FactoredPSD):
    """The local data matrix G(x) of a batch, kept factored as ``G = AᵀA``.

    Restricted to each sample's K most probable classes (``local_data_matrix(...,
    top_k=K)``), it holds ``G_K = Σ_{c∈K} p_c ∇log p_c ∇log p_cᵀ`` exactly: K rows instead of
    C, K eigenvalues, and :attr:`basis` spans ``span{∇log p_c : c ∈ K} ⊆ D_x``.

    Attributes
    ----------
    probs : Tensor (n, C)
        The model's class probabilities p(y | x), all C of them.
    classes : Tensor (n, K) long or None
        The classes of the rows held, by decreasing p (None: all C, in class order).
    jac_logp : Tensor (n, K, d)
        ``∇log p_c`` of those classes (K = C when unrestricted).
    factor : Tensor (n, K, d)
        ``A = diag(√p_K) J_logp``.
    input_shape : tuple
        Shape of one input; vectors passed to the methods are shaped ``(n, *input_shape)``.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(6, 4).double()
    >>> G = local_data_matrix(model, torch.randn(3, 6, dtype=torch.float64))
    >>> G.rank().tolist()  # rank ≤ C − 1
    [3, 3, 3]
    >>> bool(torch.allclose(G.trace, G.dense().diagonal(dim1=1, dim2=2).sum(1)))
    True
    """

    def __init__(self, jac_logp: torch.Tensor, probs: torch.Tensor,
                 classes: torch.Tensor | None = None):
        n, c = probs.shape
        rows = c if classes is None else classes.shape[1]
        if jac_logp.dtype in _HALF:  # eigh and QR need float32: half inputs, float32 algebra
            jac_logp, probs = jac_logp.float(), probs.float()
        if jac_logp.shape[:2] != (n, rows):
            raise ValueError(f"jac_logp must be shaped (n, {rows}, *shape) for probs {(n, c)}"
                             f"{'' if classes is None else ' and top-k classes'}, got "
                             f"{tuple(jac_logp.shape)}")
        self.jac_logp = jac_logp.reshape(n, rows, -1)
        self.input_shape = tuple(jac_logp.shape[2:]) or (self.jac_logp.shape[-1],)
        self.classes = classes
        super().__init__(probs)

    @classmethod
    def from_jacobian(cls, jac_logp: torch.Tensor, probs: torch.Tensor,
                      classes: torch.Tensor | None = None) -> LocalDataMatrix:
        """Build from ``J_logp`` (n, C, *shape) and p (n, C), or from the rows (n, K, *shape)
        of the classes ``classes`` (n, K) alone."""
        return cls(jac_logp, probs, classes)

    @property
    def restricted(self) -> bool:
        """Whether rows of some classes are left out (``top_k < C``)."""
        return self.jac_logp.shape[1] < self.num_classes

    @cached_property
    def weights(self) -> torch.Tensor:
        """The probabilities of the rows held (n, K): p, or ``p_c`` of :attr:`classes`."""
        return self.probs if self.classes is None else self.probs.gather(1, self.classes)

    @cached_property
    def dropped_mass(self) -> torch.Tensor:
        """``Σ_{c∉K} p_c`` (n,): the probability of the classes left out (0 when all kept),
        summed over those classes (no cancellation in ``1 − Σ_{c∈K} p_c``)."""
        if not self.restricted:
            return torch.zeros_like(self.probs[:, 0])
        kept = torch.zeros_like(self.probs, dtype=torch.bool).scatter_(1, self.classes, True)
        return torch.where(kept, 0, self.probs).sum(1)

    @cached_property
    def factor(self) -> torch.Tensor:  # type: ignore[override]
        """``A = diag(√p) J_logp`` (n, K, d), formed on first use."""
        return self.weights.sqrt().unsqueeze(-1) * self.jac_logp

    @cached_property
    def gram(self) -> torch.Tensor:
        """``AAᵀ = (J Jᵀ) ⊙ √p√pᵀ`` (n, K, K), without forming A (no copy of J)."""
        sp = self.weights.sqrt()
        return (self.jac_logp @ self.jac_logp.mT) * (sp.unsqueeze(-1) * sp.unsqueeze(-2))

    @cached_property
    def trace(self) -> torch.Tensor:
        """``Tr G = Σ_c p_c ‖∇log p_c‖²`` (n,) from the rows, O(Cd): no C × C Gram."""
        sq = torch.linalg.vector_norm(self.jac_logp, dim=-1) ** 2
        return (self.weights * sq).sum(-1)

    @property
    def dim(self) -> int:
        return self.jac_logp.shape[-1]

    def _right(self, u: torch.Tensor) -> torch.Tensor:
        """``Aᵀ U = J_logpᵀ (√p ⊙ U)`` without forming A."""
        return self.jac_logp.mT @ (self.weights.sqrt().unsqueeze(-1) * u)

    @cached_property
    def _row_space(self) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.jac_logp
        evals, u = torch.linalg.eigh(j @ j.mT)
        evals, u = evals.flip(-1).clamp_min(0), u.flip(-1)
        return evals, _orthonormalize(j.mT @ u, evals)

    def basis(self, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthonormal basis of ``D_x = (ker G)^⊥ = span{∇log p_c}``, the row space of J_logp.

        Built from the C × C Gram ``J_logp J_logpᵀ``, so it does not depend on p: the
        gradients of improbable classes, which G weighs by p_c (and float32 loses when p_c
        underflows), are kept, as in Proposition 2.1. Returns ``(vectors (n, C, d), mask (n, C)
        bool)``: the rows with ``mask`` true span D_x, the others are zero. Directions above
        ``rtol`` (default ``10·C·eps``) of the largest are kept, at most C − 1 of them. Restricted
        to K < C classes, the span of their K gradients (a subspace of D_x), at most K.
        """
        evals, vecs = self._row_space
        rows = evals.shape[-1]
        if rtol is None:
            rtol = default_rtol(rows, evals.dtype)
        mask = (evals > rtol * evals[:, :1]) & (evals > 0)
        if not self.restricted:  # Σ_c p_c ∇log p_c = 0: rank ≤ C − 1
            mask[:, rows - 1 :] = False
        mask[:, self.dim :] = False  # and rank ≤ d
        return vecs * mask.unsqueeze(-1).to(vecs.dtype), mask

    def _flat(self, v: torch.Tensor) -> torch.Tensor:
        n = len(self)
        if v.shape[0] != n or math.prod(v.shape[1:]) != self.dim:
            raise ValueError(
                f"v must be shaped like x, (n, *input_shape) = ({n}, "
                f"{', '.join(map(str, self.input_shape))}), got {tuple(v.shape)}"
            )
        return v.reshape(n, -1).to(self.jac_logp.dtype)

    def project(self, v: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
        """Orthogonal projection of v onto ``D_x = (ker G)^⊥`` (shaped like v)."""
        q, _ = self.basis(rtol)
        flat = self._flat(v)
        coef = torch.einsum("ncd,nd->nc", q, flat)
        return torch.einsum("nc,ncd->nd", coef, q).reshape(v.shape)

    def project_kernel(self, v: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
        """Orthogonal projection of v onto ``ker G``: ``v − P_D v``."""
        return v - self.project(v, rtol)

    def quadratic_form(self, v: torch.Tensor) -> torch.Tensor:
        """``vᵀ G(x) v = Σ_c p_c ⟨∇log p_c, v⟩²`` (n,): the second-order KL,
        ``KL(p(x+v)‖p(x)) ≈ ½ vᵀGv``."""
        jv = torch.einsum("ncd,nd->nc", self.jac_logp, self._flat(v))
        return (self.weights * jv**2).sum(-1)

    def dense(self, max_dim: int = 4096) -> torch.Tensor:
        """G as dense (n, d, d) matrices — only for small d (``d ≤ max_dim``)."""
        if self.dim > max_dim:
            raise ValueError(
                f"dense G would be {len(self)} × {self.dim} × {self.dim}; d = {self.dim} exceeds "
                f"max_dim = {max_dim}. Use the factored methods (eigenvalues, eigenvectors, "
                "project, project_kernel, quadratic_form) or raise max_dim"
            )
        return self.factor.mT @ self.factor

    def to(self, *args, **kwargs) -> LocalDataMatrix:
        jac = self.jac_logp.to(*args, **kwargs)
        classes = None if self.classes is None else self.classes.to(jac.device)
        return LocalDataMatrix(jac.reshape(*jac.shape[:2], *self.input_shape),
                               self.probs.to(*args, **kwargs), classes)


def check_top_k(top_k: object, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``top_k`` is None or an integer in [1, C]."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or not 1 <= top_k <= num_classes):
        raise ValueError(f"top_k must be an integer in [1, C] = [1, {num_classes}] or None, "
                         f"got {top_k!r}")


class _ClassRows:
    """``∇_x log p_c`` (n, *shape) of one class per sample, one summed vector–Jacobian product
    each, from one forward pass (samples are independent).

    With r the top class and ``u = Σ_j p_j ∇s_j − ∇s_r`` (one product with ``p − e_r``):
    ``∇log p_c = ∇(s_c − s_r) − u``, and ``−u`` for c = r at no extra cost. The same formula
    holds for every ``model_output`` (scores s with softmax(s) = p; for log-probabilities and
    probabilities ``Σ_j p_j ∇s_j`` vanishes, and the top class's row pays for computing it).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, model_output: str, check: bool,
                 top_k: int) -> None:
        with torch.enable_grad():
            self.xr, self.s = scores_with_graph(model, x, model_output, check)
        self.scores = self.s.detach()
        self.probs = torch.softmax(self.scores, dim=1)
        #: the ``top_k`` most probable classes (n, K), by decreasing p (topk: O(C), no sort)
        self.head = torch.topk(self.probs, top_k, dim=1).indices
        self.ref = self.head[:, 0]
        self._n = torch.arange(x.shape[0], device=self.s.device)
        self._u: torch.Tensor | None = None

    def _vjp(self, v: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(self.s, self.xr, v, retain_graph=True)
        return g

    def row(self, cls: torch.Tensor) -> torch.Tensor:
        """``∇log p_{cls_i}(x_i)`` for classes ``cls`` (n,)."""
        if self._u is None:
            v = self.probs.clone()
            v[self._n, self.ref] -= 1
            self._u = self._vjp(v)
        if bool((cls == self.ref).all()):
            return -self._u
        v = torch.zeros_like(self.scores)
        v[self._n, cls] = 1
        v[self._n, self.ref] -= 1  # the rows with cls = r are zero
        return self._vjp(v) - self._u


def top_k_jacobian(
    model: nn.Module,
    x: torch.Tensor,
    top_k: int,
    *,
    model_output: ModelOutput = "logits",
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
    check_output: bool = True,
    max_memory: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``∇log p_c`` of each sample's ``top_k`` most probable classes: ``(J (n, K, *shape),
    classes (n, K) by decreasing p, scores (n, C))``.

    ``"vjp"``: K summed vector–Jacobian products per chunk (see :class:`_ClassRows`);
    ``"vmap"`` / ``"forward"``: the full Jacobian, then its K rows; ``"auto"``: forward mode
    when ``d < K``, else ``"vjp"``. ``check_output=False`` as in :func:`score_jacobian`.
    Memory: chunks sized to ``max_memory`` bytes (:func:`~manifoldlens.jacobian_chunk_size`).
    """
    check_choice(model_output, MODEL_OUTPUTS, "model_output")
    check_choice(strategy, STRATEGIES, "strategy")
    check_positive_int(top_k, "top_k")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_max_memory(max_memory)
    if check_output:
        check_batch(x)
        check_independent_samples(model, x)
    check_top_k(top_k, count_classes(model, x))
    if strategy == "auto":
        strategy = "forward" if math.prod(x.shape[1:]) < top_k else "vjp"
    if strategy != "vjp":
        jac, scores = score_jacobian(model, x, model_output=model_output, strategy=strategy,
                                     chunk_size=chunk_size, check_output=check_output,
                                     relative=True, output="log_softmax", max_memory=max_memory)
        classes = torch.topk(torch.softmax(scores, dim=1), top_k, dim=1).indices
        index = classes.reshape(*classes.shape, *[1] * (x.ndim - 1))
        return jac.gather(1, index.expand(-1, -1, *x.shape[1:])), classes, scores
    n = x.shape[0]
    step = jacobian_chunk_size(model, x, output="log_softmax", model_output=model_output,
                               strategy="vjp", relative=True, top_k=top_k,
                               chunk_size=chunk_size, max_memory=max_memory)
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for sl in chunks(n, step):
        rows = _ClassRows(model, x[sl], model_output, check_output, top_k)
        jac = torch.stack([rows.row(rows.head[:, j]) for j in range(top_k)], dim=1)
        if sl.stop - sl.start == n:
            return jac, rows.head, rows.scores
        if out is None:  # the results, written chunk by chunk (no cat)
            out = (jac.new_empty((n, *jac.shape[1:])), rows.head.new_empty((n, top_k)),
                   rows.scores.new_empty((n, rows.scores.shape[1])))
        out[0][sl], out[1][sl], out[2][sl] = jac, rows.head, rows.scores
        del rows, jac
    assert out is not None
    return out


def local_data_matrix(
    model: nn.Module,
    x: torch.Tensor,
    *,
    model_output: ModelOutput = "logits",
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
    top_k: int | None = None,
    max_memory: float | None = None,
) -> LocalDataMatrix:
    """The local data matrix ``G(x) = Σ_c p_c ∇log p_c ∇log p_cᵀ``, batched.

    Defined in Grementieri & Fioresi, eq. 6. One set of C − 1 vector–Jacobian products per
    batch (see :func:`manifoldlens.jacobian`); the result is factored
    (:class:`LocalDataMatrix`). ``top_k=K`` keeps each sample's K most probable classes:
    ``G_K = Σ_{c∈K} p_c ∇log p_c ∇log p_cᵀ`` exactly, from K products
    (:func:`top_k_jacobian`), with the probability left out in
    :attr:`LocalDataMatrix.dropped_mass`. Memory: chunks of samples sized to ``max_memory``
    bytes (None: half the memory available on x's device; :func:`jacobian_chunk_size`);
    an explicit ``chunk_size`` wins; chunking does not change the values.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(6, 20).double()
    >>> G = local_data_matrix(model, torch.randn(3, 6, dtype=torch.float64), top_k=4)
    >>> G.eigenvalues.shape, G.classes.shape, bool((G.dropped_mass > 0).all())
    (torch.Size([3, 4]), torch.Size([3, 4]), True)
    """
    check_positive_int(top_k, "top_k", allow_none=True)
    if top_k is not None:
        jac, classes, scores = top_k_jacobian(model, x, top_k, model_output=model_output,
                                              strategy=strategy, chunk_size=chunk_size,
                                              max_memory=max_memory)
        return LocalDataMatrix(jac, torch.softmax(scores, dim=1), classes)
    jac_logp, scores = score_jacobian(
        model, x, model_output=model_output, strategy=strategy, chunk_size=chunk_size,
        relative=True, output="log_softmax", max_memory=max_memory,
    )
    return LocalDataMatrix(jac_logp, torch.softmax(scores, dim=1))


class LocalFisherMatrix(_FactoredPSD):
    """The local Fisher matrix ``F(x, w) = Σ_c p_c ∇_w log p_c ∇_w log p_cᵀ``.

    Defined in Grementieri & Fioresi, §2. Held through its C × C Gram (n, C, C) — same
    nonzero spectrum — and, when built with ``keep_factor=True``, the factor
    ``B = diag(√p) J_w log p`` (n, C, #params) for :meth:`quadratic_form` and the
    eigenvectors in parameter space.
    """


def local_fisher_matrix(
    model: nn.Module,
    x: torch.Tensor,
    *,
    model_output: ModelOutput = "logits",
    chunk_size: int = 8,
    keep_factor: bool = False,
) -> LocalFisherMatrix:
    """The local Fisher matrix F(x, w) in parameter space, factored (Grementieri & Fioresi, §2).

    Per-sample parameter Jacobians come from ``torch.func.vmap(jacrev)`` over
    ``functional_call``, ``chunk_size`` samples at a time; only the C × C Grams are kept unless
    ``keep_factor=True`` (memory n · C · #params).
    """
    check_choice(model_output, MODEL_OUTPUTS, "model_output")
    check_batch(x)
    check_independent_samples(model, x)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters")
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def log_probs(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        s = to_scores(out, model_output)[0]
        return torch.log_softmax(s, dim=0), out[0]

    jac_fn = torch.func.vmap(torch.func.jacrev(log_probs, has_aux=True), in_dims=(None, 0))
    grams, probs, factors = [], [], []
    for sl in chunks(x.shape[0], chunk_size):
        jac, out = jac_fn(params, x[sl].detach())
        check_model_output(out, model_output, out.shape[0])
        flat = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=-1)
        p = torch.softmax(to_scores(out, model_output), dim=1)
        b = p.sqrt().unsqueeze(-1) * flat
        grams.append(b @ b.mT)
        probs.append(p)
        if keep_factor:
            factors.append(b)
    return LocalFisherMatrix(
        torch.cat(probs),
        factor=torch.cat(factors) if keep_factor else None,
        gram=torch.cat(grams),
    )


def data_matrix_statistics(
    model: nn.Module,
    x: torch.Tensor,
    *,
    model_output: ModelOutput = "logits",
    batch_size: int = 256,
    rtol: float | None = None,
    progress: bool = False,
    top_k: int | None = None,
) -> dict[str, torch.Tensor]:
    """G(x) statistics over a dataset, batch by batch: nothing of size n · C · d is kept.

    Returns ``trace`` (n,), ``eigenvalues`` (n, C), ``rank`` (n,) and ``probs`` (n, C);
    with ``top_k=K`` (G over each sample's K most probable classes, :func:`local_data_matrix`)
    ``eigenvalues`` is (n, K) and ``dropped_mass`` (n,) the probability left out.
    """
    check_batch(x)
    out: dict[str, list[torch.Tensor]] = {"trace": [], "eigenvalues": [], "rank": [], "probs": []}
    if top_k is not None:
        out["dropped_mass"] = []
    slices = progress_bar(list(chunks(x.shape[0], batch_size)), enabled=progress, desc="G(x)",
                          unit="batch", leave=False)
    device = next(iter(model.parameters()), torch.empty(0)).device
    for sl in slices:
        G = local_data_matrix(model, x[sl].to(device), model_output=model_output, top_k=top_k)
        out["trace"].append(G.trace.cpu())
        out["eigenvalues"].append(G.eigenvalues.cpu())
        out["rank"].append(G.rank(rtol).cpu())
        out["probs"].append(G.probs.cpu())
        if top_k is not None:
            out["dropped_mass"].append(G.dropped_mass.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


class TraceEstimate(NamedTuple):
    """``Tr G`` per sample and the standard error of its sampled part."""

    estimate: torch.Tensor  #: (n,)
    stderr: torch.Tensor  #: (n,); 0 where nothing was sampled, NaN for one sample of a tail


def _sq_norm(row: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(row.reshape(row.shape[0], -1), dim=1,
                                    dtype=torch.float64) ** 2


def _draw_tail(probs: torch.Tensor, head: torch.Tensor,
               uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes (n, m) drawn ∝ p_c outside each sample's ``head`` (n, K), by inverse CDF of the
    uniforms (n, m), and the tail mass q (n,). Classes of zero probability, the head's among
    them, are never drawn (a draw past the end is clamped to the last positive class)."""
    tp = probs.double().scatter(1, head, 0.0)
    cdf = tp.cumsum(1)
    q = cdf[:, -1]
    pos = torch.searchsorted(cdf, uniforms * q.unsqueeze(1), right=True)
    classes = torch.arange(tp.shape[1], device=tp.device)
    last = torch.where(tp > 0, classes, -1).amax(1).clamp_min(0)
    return torch.minimum(pos, last.unsqueeze(1)), q


def trace_estimate(
    model: nn.Module,
    x: torch.Tensor,
    *,
    top_k: int | None = None,
    samples: int = 16,
    seed: int = 0,
    model_output: ModelOutput = "logits",
    chunk_size: int | None = None,
    max_memory: float | None = None,
) -> TraceEstimate:
    """``Tr G = Σ_c p_c ‖∇log p_c‖²`` (the soft rank, Grementieri & Fioresi eq. 11) from
    ``top_k + samples`` backward passes instead of C − 1.

    Exact over each sample's ``top_k`` most probable classes K; the tail T (mass
    ``q = Σ_{c∈T} p_c``) by importance sampling: ``samples`` classes drawn i.i.d. ∝ p_c from T,
    ``q · mean ‖∇log p_c‖²``, unbiased, with standard error ``q · std / √samples`` (sample
    std; NaN when ``samples = 1``). ``top_k=None`` (all C): exact, stderr 0. Draws are
    seeded by ``seed`` (a ``torch.Generator`` on x's device) and do not depend on
    ``chunk_size`` (default: what ``max_memory`` allows, :func:`jacobian_chunk_size`).
    Returns :class:`TraceEstimate` ``(estimate (n,), stderr (n,))``.

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(6, 50).double()
    >>> x = torch.randn(4, 6, dtype=torch.float64)
    >>> est, err = trace_estimate(model, x, top_k=5, samples=32, seed=0)
    >>> exact = local_data_matrix(model, x).trace
    >>> bool(((est - exact).abs() < 6 * err).all())
    True
    """
    check_choice(model_output, MODEL_OUTPUTS, "model_output")
    check_positive_int(top_k, "top_k", allow_none=True)
    check_positive_int(samples, "samples")
    check_positive_int(seed, "seed", minimum=0)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_max_memory(max_memory)
    check_batch(x)
    check_independent_samples(model, x)
    c = count_classes(model, x)
    check_top_k(top_k, c)
    k = c if top_k is None else top_k
    m = samples if k < c else 0
    step = jacobian_chunk_size(model, x, output="log_softmax", model_output=model_output,
                               strategy="vjp", relative=True, top_k=k, stacked=False,
                               chunk_size=chunk_size, max_memory=max_memory)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    uniforms = torch.rand((x.shape[0], m), generator=gen, device=x.device, dtype=torch.float64)
    estimate, stderr = [], []
    for sl in chunks(x.shape[0], step):
        rows = _ClassRows(model, x[sl], model_output, True, k)
        head = rows.head
        p_head = rows.probs.double().gather(1, head)
        exact = sum(p_head[:, j] * _sq_norm(rows.row(head[:, j])) for j in range(k))
        err = torch.zeros_like(exact)
        if m:
            drawn, q = _draw_tail(rows.probs, head, uniforms[sl])
            vals = torch.stack([_sq_norm(rows.row(drawn[:, j])) for j in range(m)], dim=1)
            exact = exact + q * vals.mean(1)
            if m > 1:
                err = q * (vals.var(1) / m).sqrt()
            else:
                err = torch.where(q > 0, float("nan"), 0.0).double()
        estimate.append(exact)
        stderr.append(err)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return TraceEstimate(torch.cat(estimate).to(dtype), torch.cat(stderr).to(dtype))
