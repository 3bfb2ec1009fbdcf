"""The local data matrix G(x) and the local Fisher matrix F(x, w), factored.

Grementieri & Fioresi, §2: ``G(x) = Σ_c p_c ∇_x log p_c ∇_x log p_cᵀ = AᵀA`` with
``A = diag(√p) J_logp`` (C × d), eq. (6). Everything is computed from A and its C × C Gram
``AAᵀ``: eigenpairs at O(C²d), never O(d³), and no d × d matrix unless
:meth:`LocalDataMatrix.dense` is asked for.

Properties (Proposition 2.1): G is PSD, ``ker G = (span{∇log p_c})^⊥`` and
``rank G ≤ C − 1`` because ``Σ_c p_c ∇log p_c = 0``. ``Tr G = ‖A‖_F² = E_{y∼p} ‖∇log p_y‖²``
(eq. 11). ``KL(p(x+δ) ‖ p(x)) = ½ δᵀG δ + O(‖δ‖³)``.

References
----------
L. Grementieri, R. Fioresi. "Model-centric Data Manifold: the Data Through the Eyes of the
Model." SIAM Journal on Imaging Sciences 15(3), 2022. arXiv:2104.13289.
§2, eqs. 6 and 11, Proposition 2.1.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import nn

from ._checks import (
    MODEL_OUTPUTS,
    check_batch,
    check_choice,
    check_independent_samples,
    check_model_output,
)
from ._utils import chunks, progress_bar, to_scores
from .jacobian import ModelOutput, Strategy, score_jacobian, transform_jacobian

__all__ = [
    "LocalDataMatrix",
    "LocalFisherMatrix",
    "data_matrix_statistics",
    "local_data_matrix",
    "local_fisher_matrix",
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
        if rtol is None:
            rtol = default_rtol(self.num_classes, self.eigenvalues.dtype)
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


def _orthonormalize(v: torch.Tensor, evals: torch.Tensor) -> torch.Tensor:
    """Rows (n, C, D) of ``v / √λ`` (v: (n, D, C)) made orthonormal by a thin QR, signs kept."""
    scale = torch.where(evals > 0, evals.rsqrt(), torch.zeros_like(evals))
    q, r = torch.linalg.qr(v * scale.unsqueeze(-2))
    sign = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q * sign.unsqueeze(-2)).mT


class LocalDataMatrix(_FactoredPSD):
    """The local data matrix G(x) of a batch, kept factored as ``G = AᵀA``.

    Attributes
    ----------
    probs : Tensor (n, C)
        The model's class probabilities p(y | x).
    factor : Tensor (n, C, d)
        ``A = diag(√p) J_logp``.
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

    def __init__(self, jac_logp: torch.Tensor, probs: torch.Tensor):
        n, c = probs.shape
        if jac_logp.dtype in _HALF:  # eigh and QR need float32: half inputs, float32 algebra
            jac_logp, probs = jac_logp.float(), probs.float()
        self.jac_logp = jac_logp.reshape(n, c, -1)
        self.input_shape = tuple(jac_logp.shape[2:]) or (self.jac_logp.shape[-1],)
        super().__init__(probs)

    @classmethod
    def from_jacobian(cls, jac_logp: torch.Tensor, probs: torch.Tensor) -> LocalDataMatrix:
        """Build from ``J_logp`` (n, C, *shape) and p (n, C)."""
        return cls(jac_logp, probs)

    @cached_property
    def factor(self) -> torch.Tensor:  # type: ignore[override]
        """``A = diag(√p) J_logp`` (n, C, d), formed on first use."""
        return self.probs.sqrt().unsqueeze(-1) * self.jac_logp

    @cached_property
    def gram(self) -> torch.Tensor:
        """``AAᵀ = (J Jᵀ) ⊙ √p√pᵀ`` (n, C, C), without forming A (no copy of J)."""
        sp = self.probs.sqrt()
        return (self.jac_logp @ self.jac_logp.mT) * (sp.unsqueeze(-1) * sp.unsqueeze(-2))

    @property
    def dim(self) -> int:
        return self.jac_logp.shape[-1]

    def _right(self, u: torch.Tensor) -> torch.Tensor:
        """``Aᵀ U = J_logpᵀ (√p ⊙ U)`` without forming A."""
        return self.jac_logp.mT @ (self.probs.sqrt().unsqueeze(-1) * u)

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
        ``rtol`` (default ``10·C·eps``) of the largest are kept, at most C − 1 of them.
        """
        evals, vecs = self._row_space
        if rtol is None:
            rtol = default_rtol(self.num_classes, evals.dtype)
        mask = (evals > rtol * evals[:, :1]) & (evals > 0)
        mask[:, self.num_classes - 1 :] = False  # Σ_c p_c ∇log p_c = 0: rank ≤ C − 1
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
        return (self.probs * jv**2).sum(-1)

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
        return LocalDataMatrix(
            self.jac_logp.to(*args, **kwargs).reshape(len(self), self.num_classes,
                                                      *self.input_shape),
            self.probs.to(*args, **kwargs),
        )


def local_data_matrix(
    model: nn.Module,
    x: torch.Tensor,
    *,
    model_output: ModelOutput = "logits",
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
) -> LocalDataMatrix:
    """The local data matrix ``G(x) = Σ_c p_c ∇log p_c ∇log p_cᵀ``, batched.

    Defined in Grementieri & Fioresi, eq. 6. One set of C − 1 vector–Jacobian products per
    batch (see :func:`manifoldlens.jacobian`); the result is factored
    (:class:`LocalDataMatrix`).
    """
    jac_s, scores = score_jacobian(
        model, x, model_output=model_output, strategy=strategy, chunk_size=chunk_size,
        relative=True,
    )
    jac_logp = transform_jacobian(jac_s, scores, "log_softmax")
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
) -> dict[str, torch.Tensor]:
    """G(x) statistics over a dataset, batch by batch: nothing of size n · C · d is kept.

    Returns ``trace`` (n,), ``eigenvalues`` (n, C), ``rank`` (n,) and ``probs`` (n, C).
    """
    check_batch(x)
    out: dict[str, list[torch.Tensor]] = {"trace": [], "eigenvalues": [], "rank": [], "probs": []}
    slices = progress_bar(list(chunks(x.shape[0], batch_size)), enabled=progress, desc="G(x)",
                          unit="batch", leave=False)
    device = next(iter(model.parameters()), torch.empty(0)).device
    for sl in slices:
        G = local_data_matrix(model, x[sl].to(device), model_output=model_output)
        out["trace"].append(G.trace.cpu())
        out["eigenvalues"].append(G.eigenvalues.cpu())
        out["rank"].append(G.rank(rtol).cpu())
        out["probs"].append(G.probs.cpu())
    return {k: torch.cat(v) for k, v in out.items()}
