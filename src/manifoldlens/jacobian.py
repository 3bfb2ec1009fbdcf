"""Input Jacobians of a classifier, batched, and the dataset Jacobian correlation matrix.

Notation: scores s(x) ∈ ℝ^C, p = softmax(s), x ∈ ℝ^d.

* ``J_s = ∂s/∂x`` (C × d) — ``output="logits"``
* ``J_logp = (I − 1pᵀ) J_s`` — ``output="log_softmax"``
* ``J_p = diag(p) J_logp`` — ``output="softmax"``

One set of C vector–Jacobian products through the network gives ``J_s``; the chain rule
above gives the other two at O(C·d) cost per sample.

Shin's dataset Jacobian matrix stacks ``flatten(J(x_i))`` as rows of 𝒥 (n × C·d); its
correlation matrix is ``M = 𝒥𝒥ᵀ`` (Shin, eq. 6), computed block by block.

References
----------
J. Y. Shin. "Correlation of the Jacobian and Probability Flow." Technical note, New York
University. Eq. 6.

L. Grementieri, R. Fioresi. "Model-centric Data Manifold: the Data Through the Eyes of the
Model." SIAM Journal on Imaging Sciences 15(3), 2022. arXiv:2104.13289.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import nn

from ._checks import (
    MODEL_OUTPUTS,
    check_batch,
    check_choice,
    check_independent_samples,
    check_model_output,
    check_output_type,
    check_positive_int,
)
from ._utils import chunks, model_fingerprint, scores_with_graph, tensor_sha256, to_scores
from .blockgram import GramPlan, blocked_gram, plan_gram, recorded_settings
from .distributed import gather_objects, world_size
from .memory import (
    MemoryCost,
    cached_cost,
    check_max_memory,
    measure_cost,
    meta_forward,
    plan_chunk_size,
    resolve_max_memory,
)

__all__ = [
    "OUTPUTS",
    "MODEL_OUTPUTS",
    "STRATEGIES",
    "jacobian",
    "score_jacobian",
    "transform_jacobian",
    "select_strategy",
    "count_classes",
    "jacobian_chunk_size",
    "jacobian_gram",
    "jacobian_gram_plan",
    "gram_spectrum",
    "class_correlation",
    "cosine_gram",
    "kernel_target_alignment",
    "jacobian_neighbors",
    "ClassCorrelation",
    "Neighbors",
]

Output = Literal["logits", "softmax", "log_softmax"]
ModelOutput = Literal["logits", "log_probs", "probs"]
Strategy = Literal["auto", "vjp", "vmap", "forward"]

OUTPUTS = ("logits", "softmax", "log_softmax")
STRATEGIES = ("auto", "vjp", "vmap", "forward")


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------


def _jac_vjp(
    model: nn.Module, x: torch.Tensor, model_output: str, check: bool = True,
    relative: bool = False, passes: int | None = None,
):
    """C summed vector–Jacobian products over the batch.

    Samples are independent, so ∂(Σ_i s_c(x_i))/∂x_i = ∂s_c(x_i)/∂x_i: one backward pass per
    class yields the class-c row of every sample's Jacobian. ``relative=True`` returns the
    rows ∇(s_c − s_r) instead, r the top class of each sample (row r is zero), from C − 1
    passes: enough for ``J_logp`` and everything built on it, which do not change when one
    vector is added to every row of ``J_s``. ``passes`` stops after that many passes (to
    measure the memory of the loop, :func:`jacobian_chunk_size`).
    """
    with torch.enable_grad():
        xr, s = scores_with_graph(model, x, model_output, check)
        n, c = s.shape
        if not relative:
            jac = x.new_empty((n, c, *x.shape[1:]))
            stop = c if passes is None else min(c, passes)
            for k in range(stop):
                (g,) = torch.autograd.grad(s[:, k].sum(), xr, retain_graph=k < stop - 1)
                jac[:, k] = g
            return jac, s.detach()
        jac = x.new_zeros((n, c, *x.shape[1:]))
        ref = s.detach().argmax(1)
        rows = torch.arange(n, device=x.device)
        stop = c - 1 if passes is None else min(c - 1, passes)
        for k in range(stop):
            cls = k + (k >= ref).long()  # the k-th class other than r
            grad = torch.zeros_like(s)
            grad[rows, cls] = 1
            grad[rows, ref] = -1
            (g,) = torch.autograd.grad(s, xr, grad, retain_graph=k < stop - 1)
            jac[rows, cls] = g
    return jac, s.detach()


def _functional(model: nn.Module, model_output: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(xi: torch.Tensor) -> torch.Tensor:
        s = to_scores(model(xi.unsqueeze(0)), model_output)[0]
        return s, s

    return f


def _jac_func(
    model: nn.Module, x: torch.Tensor, model_output: str, mode: str, check: bool = True
):
    """``torch.func.vmap`` of ``jacrev`` (reverse mode) or ``jacfwd`` (forward mode)."""
    tr = torch.func.jacrev if mode == "vmap" else torch.func.jacfwd
    jac, s = torch.func.vmap(tr(_functional(model, model_output), has_aux=True))(x.detach())
    if check:
        check_model_output(s if model_output != "probs" else s.exp(), model_output, x.shape[0])
    return jac.detach(), s.detach()


_STRATEGY_FNS = {
    "vjp": _jac_vjp,
    "vmap": lambda m, x, mo, check=True, **_: _jac_func(m, x, mo, "vmap", check),
    "forward": lambda m, x, mo, check=True, **_: _jac_func(m, x, mo, "forward", check),
}

_NUM_CLASSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def select_strategy(model: nn.Module, x: torch.Tensor, num_classes: int | None = None) -> str:
    """The strategy ``"auto"`` picks.

    Rule (measured in ``bench/jacobian.py``, see ``docs/benchmarks.md``): forward mode when the
    input has fewer dimensions than the model has outputs (d < C: d JVPs beat C VJPs);
    otherwise C summed VJPs over the batch, which reuse one batched forward pass and run
    batched kernels: on Grementieri & Fioresi's CNN (2-core CPU) they are 2.1× faster than
    ``vmap(jacrev)`` and within 1 % of a hand-written loop of C ``autograd.grad`` calls. GPUs
    have not been measured yet; pass ``strategy=`` explicitly to override.
    """
    d = math.prod(x.shape[1:])
    if num_classes is None:
        num_classes = count_classes(model, x)
    return "forward" if d < num_classes else "vjp"


def count_classes(model: nn.Module, x: torch.Tensor) -> int:
    """C, the model's number of outputs, remembered per model: from one sample on the ``meta``
    device (:func:`~manifoldlens.memory.meta_forward`, no work), else one no-grad forward
    pass of ``x[:1]``."""
    c = _NUM_CLASSES.get(model)
    if c is None:
        out = meta_forward(model, x)
        if out is None:
            with torch.no_grad():
                out = model(x[:1])
        c = check_output_type(out).shape[-1]
        _NUM_CLASSES[model] = c
    return c


_HINTS = {
    "vjp": "raise max_memory, or pass fewer samples (local_data_matrix(top_k=K) keeps K rows "
           "instead of C)",
    "vmap": "use strategy='vjp' or raise max_memory",
    "forward": "use strategy='vjp' or raise max_memory",
}


def _forward_backward(model: nn.Module, x: torch.Tensor, model_output: str) -> torch.Tensor:
    """One forward and one backward pass: the stand-in measured for models that do not run on
    ``meta``."""
    with torch.enable_grad():
        xr, s = scores_with_graph(model, x, model_output, False)
        if not s.requires_grad:  # scores that do not depend on x
            return s
        (g,) = torch.autograd.grad(s.sum(), xr, allow_unused=True)
    return g


def _class_rows(model: nn.Module, x: torch.Tensor, model_output: str, held: int):
    """What the loop of :func:`~manifoldlens.information.top_k_jacobian` holds at its peak:
    the graph, one vector–Jacobian product u, two class rows, ``held`` rows and their stack
    (copies: the same bytes). No data-dependent branch, so it runs on ``meta``."""
    with torch.enable_grad():
        xr, s = scores_with_graph(model, x, model_output, False)
        v = torch.softmax(s.detach(), dim=1)
        (u,) = torch.autograd.grad(s, xr, v, retain_graph=True)
        (g,) = torch.autograd.grad(s, xr, v - 1, retain_graph=True)
        parts = [-u, g - u] + [(g - u) for _ in range(held - 2)]
        return torch.stack(parts[:held], dim=1)


def jacobian_chunk_size(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: Output = "logits",
    model_output: ModelOutput = "logits",
    strategy: Strategy = "auto",
    relative: bool = False,
    chunk_size: int | None = None,
    max_memory: float | None = None,
    top_k: int | None = None,
    stacked: bool = True,
) -> int:
    """Samples per chunk that keep :func:`score_jacobian` within ``max_memory`` bytes (None:
    :data:`~manifoldlens.memory.DEFAULT_FRACTION` of the memory available on x's device).

    The strategy's own code is measured once per model and input shape on one and two
    samples of the ``meta`` device (:func:`~manifoldlens.memory.measure_cost`): the vjp
    loop's graph, buffer and two backward passes; ``vmap(jacrev)``'s C batched cotangents;
    ``vmap(jacfwd)``'s d batched tangents. The n results (n · C · d numbers) are held
    besides; the chain rule to ``output`` runs on them in place. ``top_k=K`` with
    ``strategy="vjp"``: the K rows of :func:`~manifoldlens.information.top_k_jacobian`
    (``stacked=False``: rows reduced one at a time, as
    :func:`~manifoldlens.information.trace_estimate` does). An explicit ``chunk_size`` wins.
    Raises :class:`~manifoldlens.memory.MemoryBudgetError` (a ``ValueError``) before any
    forward pass when one sample does not fit.
    """
    check_choice(output, OUTPUTS, "output")
    check_choice(model_output, MODEL_OUTPUTS, "model_output")
    check_choice(strategy, STRATEGIES, "strategy")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_positive_int(top_k, "top_k", allow_none=True)
    budget = resolve_max_memory(max_memory, x.device)
    c, d = count_classes(model, x), math.prod(x.shape[1:])
    if strategy == "auto":
        strategy = (select_strategy(model, x, c) if top_k is None else
                    "forward" if d < top_k else "vjp")
    shape, n, item = tuple(x.shape[1:]), x.shape[0], x.element_size()
    if top_k is not None and strategy == "vjp":
        held = max(top_k, 2) if stacked else 2
        key = ("top_k", model_output, held, shape, x.dtype, x.device.type)
        cost = cached_cost(model, key, lambda: measure_cost(
            model, x, lambda m, xb: _class_rows(m, xb, model_output, held)))
        return plan_chunk_size(n, cost, budget, chunk_size=chunk_size,
                               result_per_sample=(top_k if stacked else 1) * d * item,
                               what=f"G over the top {top_k} classes", shape=shape,
                               hint="raise max_memory or lower top_k")
    cost = _jacobian_cost(model, x, strategy, model_output, relative, output, c)
    return plan_chunk_size(n, cost, budget, chunk_size=chunk_size, result_per_sample=c * d * item,
                           what=f"strategy {strategy!r}", shape=shape, hint=_HINTS[strategy])


def _jacobian_cost(model: nn.Module, x: torch.Tensor, strategy: str, model_output: str,
                   relative: bool, output: str, c: int) -> MemoryCost:
    """The measured memory of one chunk of ``strategy`` (a resolved one), its result
    included (:func:`jacobian_chunk_size`)."""
    fn = _STRATEGY_FNS[strategy]

    def run(m: nn.Module, xb: torch.Tensor):  # the chain rule runs in place, on all n
        return fn(m, xb, model_output, check=False, relative=relative, passes=2)

    shape, d = tuple(x.shape[1:]), math.prod(x.shape[1:])
    out = c * d * x.element_size()
    factor = {"vjp": 1, "vmap": c, "forward": d}[strategy]
    key = ("jacobian", strategy, model_output, relative, output, shape, x.dtype, x.device.type)
    return cached_cost(model, key, lambda: measure_cost(
        model, x, run, fallback=lambda m, xb: _forward_backward(m, xb, model_output),
        factor=factor, extra=3 * out))


def score_jacobian(
    model: nn.Module,
    x: torch.Tensor,
    *,
    model_output: ModelOutput = "logits",
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
    check_output: bool = True,
    relative: bool = False,
    output: Output = "logits",
    max_memory: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobian of the scores and the scores themselves: ``(J_s (n, C, *x.shape[1:]), s (n, C))``.

    Scores are the logits, or log p for models that return log-probabilities or
    probabilities, so that ``softmax(s) = p`` always. This is the primitive the other
    Jacobians, the local data matrix and the Gram matrix are built on.
    ``check_output=False`` skips the checks of the inputs and the model's outputs (for inner
    loops that validated them once and handle NaN rows themselves).
    ``relative=True`` allows the ``"vjp"`` strategy to return ``J_s − 1 ∇s_r`` (r the top
    class) from C − 1 backward passes instead of C: the Jacobians of log p and p, and G, are
    the same for both (:func:`transform_jacobian` subtracts ``pᵀJ_s`` from every row).
    ``output="log_softmax"`` or ``"softmax"`` returns that Jacobian instead of ``J_s``
    (:func:`transform_jacobian`, applied in place to all n at the end).

    Memory: chunks of samples sized to ``max_memory`` bytes (None: half the memory available
    on x's device) by :func:`jacobian_chunk_size`; an explicit ``chunk_size`` wins. A budget
    too small for one sample raises ``ValueError`` before any forward pass. When all samples
    fit, the computation is the one of a single chunk; other chunk sizes give the same
    values up to the rounding of batched kernels (BLAS and convolutions may sum in another
    order for another batch size).
    """
    check_choice(model_output, MODEL_OUTPUTS, "model_output")
    check_choice(strategy, STRATEGIES, "strategy")
    check_choice(output, OUTPUTS, "output")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_max_memory(max_memory)
    if check_output:
        check_batch(x)
        check_independent_samples(model, x)
    if strategy == "auto":
        strategy = select_strategy(model, x)
    step = jacobian_chunk_size(model, x, output=output, model_output=model_output,
                               strategy=strategy, relative=relative, chunk_size=chunk_size,
                               max_memory=max_memory)
    fn = _STRATEGY_FNS[strategy]
    n = x.shape[0]
    jac = scores = None
    for sl in chunks(n, step):
        j, s = fn(model, x[sl], model_output, check=check_output, relative=relative)
        if sl.stop - sl.start == n:
            jac, scores = j, s
            break
        if jac is None or scores is None:  # the results, written chunk by chunk (no cat)
            jac, scores = j.new_empty((n, *j.shape[1:])), s.new_empty((n, *s.shape[1:]))
        jac[sl], scores[sl] = j, s
    assert jac is not None and scores is not None
    return _transform_in_place(jac, scores, output), scores


def transform_jacobian(jac_s: torch.Tensor, scores: torch.Tensor, output: Output) -> torch.Tensor:
    """Chain rule from ``J_s`` to the Jacobian of ``output``, with ``p = softmax(s)``.

    ``J_logp = J_s − 1 (pᵀ J_s)`` and ``J_p = diag(p) J_logp``.
    """
    check_choice(output, OUTPUTS, "output")
    if output == "logits":
        return jac_s
    p = torch.softmax(scores, dim=1)
    flat = jac_s.reshape(jac_s.shape[0], jac_s.shape[1], -1)
    mean = torch.einsum("nc,ncd->nd", p, flat)  # E_p[∇s]
    j_logp = flat - mean.unsqueeze(1)
    if output == "softmax":
        j_logp = p.unsqueeze(-1) * j_logp
    return j_logp.reshape(jac_s.shape)


def _transform_in_place(jac_s: torch.Tensor, scores: torch.Tensor, output: str) -> torch.Tensor:
    """:func:`transform_jacobian` on a buffer of ours, overwritten (the same operations, so the
    same values, without two more copies of n · C · d numbers)."""
    if output == "logits":
        return jac_s
    p = torch.softmax(scores, dim=1)
    flat = jac_s.reshape(jac_s.shape[0], jac_s.shape[1], -1)
    flat.sub_(torch.einsum("nc,ncd->nd", p, flat).unsqueeze(1))  # J_logp = J_s − 1 E_p[∇s]
    if output == "softmax":
        flat.mul_(p.unsqueeze(-1))
    return flat.reshape(jac_s.shape)


def jacobian(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: Output = "log_softmax",
    model_output: ModelOutput = "logits",
    strategy: Strategy = "auto",
    chunk_size: int | None = None,
    max_memory: float | None = None,
) -> torch.Tensor:
    """Input Jacobians of a classifier, batched over the first axis.

    Parameters
    ----------
    model : nn.Module
        Maps ``(n, *shape)`` to ``(n, C)``. Samples must be independent: a model in train
        mode with BatchNorm raises ``ValueError`` (call ``model.eval()``).
    x : Tensor ``(n, *shape)``
        Inputs; any floating dtype and device.
    output : {"logits", "softmax", "log_softmax"}
        Which function of x to differentiate.
    model_output : {"logits", "log_probs", "probs"}
        What the model returns (Grementieri & Fioresi's CNN ends in ``LogSoftmax``:
        ``"log_probs"``).
        Outputs that contradict the declaration raise ``ValueError``. For models returning
        log-probabilities or probabilities, ``output="logits"`` differentiates log p.
    strategy : {"auto", "vjp", "vmap", "forward"}
        ``"vjp"``: C summed vector–Jacobian products over the batch; ``"vmap"``:
        ``torch.func.vmap(jacrev)``; ``"forward"``: ``vmap(jacfwd)``; ``"auto"``: see
        :func:`select_strategy`.
    chunk_size : int, optional
        Samples per chunk; bounds peak memory to O(chunk · (activations + C·d)). Default:
        as many as ``max_memory`` allows (:func:`jacobian_chunk_size`).
    max_memory : float, optional
        Budget in bytes for the work and the result; default half the memory available on
        x's device (:data:`manifoldlens.memory.DEFAULT_FRACTION`). A strategy that cannot
        fit one sample raises ``ValueError`` before any forward pass.

    Returns
    -------
    Tensor ``(n, C, *shape)``

    Examples
    --------
    For a linear softmax model s = Wx + b, ``J_s = W`` and ``J_logp = W − 1 pᵀW``:

    >>> import torch
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> J = jacobian(model, x, output="logits")
    >>> J.shape
    torch.Size([4, 2, 3])
    >>> torch.allclose(J, model.weight.expand(4, 2, 3))
    True
    """
    check_choice(output, OUTPUTS, "output")
    jac, _ = score_jacobian(
        model, x, model_output=model_output, strategy=strategy, chunk_size=chunk_size,
        relative=output != "logits", output=output, max_memory=max_memory,
    )
    return jac


# --------------------------------------------------------------------------------------
# Dataset Jacobian matrix and its correlation matrix (Shin)
# --------------------------------------------------------------------------------------


def _gram_plan(
    model: nn.Module, x: torch.Tensor, output: str, model_output: str, strategy: str,
    batch_size: int | None, block_size: int | None, low_memory: bool | None,
    max_memory: float | None, out: str | os.PathLike | None,
) -> tuple[GramPlan, int, torch.dtype]:
    """:func:`jacobian_gram_plan`, and C · d and M's dtype; every argument checked first."""
    check_batch(x)  # every check before the first forward pass: a refused call changes
    check_choice(output, OUTPUTS, "output")  # nothing (e.g. BatchNorm running statistics)
    check_choice(model_output, MODEL_OUTPUTS, "model_output")
    check_choice(strategy, STRATEGIES, "strategy")
    check_positive_int(batch_size, "batch_size", allow_none=True)
    check_positive_int(block_size, "block_size", allow_none=True)
    check_max_memory(max_memory)
    if out is not None and not os.fspath(out).endswith(".npy"):
        raise ValueError(f"out must be a path ending in .npy, got {os.fspath(out)!r}")
    check_independent_samples(model, x)
    c, d = count_classes(model, x), math.prod(x.shape[1:])
    if strategy == "auto":
        strategy = select_strategy(model, x, c)
    # half-precision inputs accumulate M in float32 (products overflow float16)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    budget = resolve_max_memory(max_memory, x.device)
    if world_size() > 1:  # one plan for every process: the smallest of their budgets
        budget = min(gather_objects(budget))
    cost = _jacobian_cost(model, x, strategy, model_output, output != "logits", output, c)
    rec = None  # resuming: the record's sizes, if they fit
    if out is not None and (batch_size is None or block_size is None):
        rec = recorded_settings(out)
    prefer = (rec.get("batch_size"), rec.get("block_size")) if rec else (None, None)
    plan = plan_gram(x.shape[0], c * d, dtype.itemsize, budget, batch_bytes=cost.bytes,
                     batch_size=batch_size, block_size=block_size, low_memory=low_memory,
                     to_file=out is not None, processes=world_size(), device=x.device,
                     prefer=prefer, shape=tuple(x.shape[1:]))
    return plan, c * d, dtype


def jacobian_gram_plan(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: Output = "softmax",
    model_output: ModelOutput = "logits",
    batch_size: int | None = None,
    block_size: int | None = None,
    strategy: Strategy = "auto",
    low_memory: bool | None = None,
    max_memory: float | None = None,
    out: str | os.PathLike | None = None,
) -> GramPlan:
    """How :func:`jacobian_gram` with these arguments runs within ``max_memory`` bytes, without
    running it (:class:`~manifoldlens.blockgram.GramPlan` from
    :func:`~manifoldlens.blockgram.plan_gram`: batch and tile sizes, whether 𝒥 goes through
    a scratch file, the bytes held and the bound on the peak); raises
    :class:`~manifoldlens.memory.MemoryBudgetError` when one sample does not fit. Under
    ``torch.distributed`` every process must call it (the budget is their smallest)."""
    return _gram_plan(model, x, output, model_output, strategy, batch_size, block_size,
                      low_memory, max_memory, out)[0]


def jacobian_gram(
    model: nn.Module,
    x: torch.Tensor,
    *,
    output: Output = "softmax",
    model_output: ModelOutput = "logits",
    normalize: bool = False,
    batch_size: int | None = None,
    block_size: int | None = None,
    strategy: Strategy = "auto",
    low_memory: bool | None = None,
    max_memory: float | None = None,
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Correlation matrix of the dataset Jacobian matrix, ``M = 𝒥𝒥ᵀ`` (Shin, eq. 6).

    ``M_ij = Σ_c ⟨∇f_c(x_i), ∇f_c(x_j)⟩`` with f the chosen ``output`` (softmax by default,
    as Shin does). With ``normalize=True`` the cosine ``M_ij / √(M_ii M_jj)`` (0 for
    samples whose Jacobian vanishes).

    Blocks (:func:`manifoldlens.blockgram.blocked_gram`): the Jacobians of ``batch_size``
    samples are computed at a time (phase 1), then M in tiles of ``block_size`` rows
    (phase 2). 𝒥 (n · C · d numbers) stays in memory or, with ``low_memory=True``, goes
    to a scratch file (in ``cache_dir`` or the system temp dir).

    Memory: ``max_memory`` is, as for every batched routine, the budget in bytes of the
    whole call (None: :data:`~manifoldlens.memory.DEFAULT_FRACTION` of the memory available
    on x's device; under ``torch.distributed`` the smallest over the processes): M when
    it is returned in memory (n² numbers, on the CPU), 𝒥 when it stays in memory, and the
    larger of one batch's Jacobians (the model's activations and backward passes, measured
    on the ``meta`` device as :func:`jacobian_chunk_size` does) and one tile's two row
    blocks and products, all counted together wherever they live
    (:func:`~manifoldlens.blockgram.plan_gram`; :func:`jacobian_gram_plan` shows the plan
    without running it). Unset, ``batch_size`` is the largest that fits, at most 256, and
    ``block_size`` the largest that fits, at most 2048 (resuming ``out``: the record's, if
    they fit); given ones are used as given, as an explicit ``chunk_size`` is elsewhere.
    ``low_memory`` unset: 𝒥 stays in memory when it takes at most half of what M leaves
    of the budget, else it goes to a scratch file. A budget too small for a batch and a
    tile of one row (besides M and 𝒥 held) raises
    :class:`~manifoldlens.memory.MemoryBudgetError` (a ``ValueError``) naming the bytes
    needed, before any forward pass. For given ``batch_size`` and ``block_size`` the result
    does not depend on the budget (nor on ``low_memory``).

    ``out`` names a ``.npy`` file for M, written tile by tile (M and 𝒥 are not held in
    memory, n is limited by the disk); the returned tensor is a memory map of it. The run is
    resumable: finished blocks are recorded in ``<out>.progress/`` with the fingerprints of
    the model's weights and of x and these settings, and a later call with the same ones
    computes only the missing blocks (one with others is refused; delete both to start
    over). Under ``torch.distributed`` (e.g. ``torchrun``) every process calls this with the
    same arguments and computes its share of the blocks; all get the same M, equal to the
    single-process one bit for bit (``out`` must then lie on a file system they share).

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(5, 3)
    >>> M = jacobian_gram(model, torch.randn(10, 5), normalize=True)
    >>> M.shape, bool(torch.allclose(M.diagonal(), torch.ones(10)))
    (torch.Size([10, 10]), True)
    """
    plan, width, dtype = _gram_plan(model, x, output, model_output, strategy, batch_size,
                                    block_size, low_memory, max_memory, out)
    n, batch_size, block_size = x.shape[0], plan.batch_size, plan.block_size
    # the bytes one batch's Jacobians may take: what the plan leaves them, or (a batch_size
    # given beyond the budget) what they need; the same on every process
    grant = max(plan.budget - plan.held, plan.peak - plan.held)
    settings = None
    if out is not None:  # what decides M, for the record a resumed call is checked against
        settings = {"n": n, "input_shape": list(x.shape[1:]), "input_dtype": str(x.dtype),
                    "output": output, "model_output": model_output, "normalize": normalize,
                    "batch_size": batch_size, "block_size": block_size, "strategy": strategy,
                    "model": model_fingerprint(model), "data_sha256": tensor_sha256(x)}

    def rows(sl: slice) -> torch.Tensor:  # one batch exactly: the same on every process
        j = jacobian(model, x[sl], output=output, model_output=model_output, strategy=strategy,
                     chunk_size=batch_size, max_memory=grant)
        return j.reshape(j.shape[0], width).to(dtype)

    return blocked_gram(rows, n, width, dtype, device=x.device, batch_size=batch_size,
                        block_size=block_size, normalize=normalize, low_memory=plan.low_memory,
                        out=out, cache_dir=cache_dir, settings=settings, progress=progress)


def cosine_gram(
    gram: torch.Tensor, *, inplace: bool = False, batch_size: int = 4096
) -> torch.Tensor:
    """``M_ij / √(M_ii M_jj)``, 0 for rows whose diagonal is not positive. Scales ``batch_size``
    rows at a time, so ``inplace=True`` works on memory-mapped matrices without a copy."""
    out = gram if inplace else gram.clone()
    diag = gram.diagonal().clone()
    inv = torch.where(diag > 0, diag.rsqrt(), torch.zeros_like(diag))
    for sl in chunks(out.shape[0], batch_size):
        out[sl] *= inv[sl, None] * inv[None, :]
    return out


class ClassCorrelation(NamedTuple):
    """Class structure of a Gram matrix."""

    block_means: torch.Tensor  #: (K, K) mean of M over each pair of class blocks (i ≠ j)
    within: float  #: mean of M_ij over same-class pairs, i ≠ j
    between: float  #: mean of M_ij over different-class pairs
    classes: torch.Tensor  #: (K,) the class labels in block order


def class_correlation(gram: torch.Tensor, labels: torch.Tensor) -> ClassCorrelation:
    """Within-class vs between-class mean of a Gram or correlation matrix.

    Self-pairs (the diagonal) are excluded from every mean.
    """
    labels = torch.as_tensor(labels).flatten().to(gram.device)
    n = gram.shape[0]
    if gram.shape != (n, n) or labels.numel() != n:
        raise ValueError(
            f"gram must be (n, n) and labels (n,), got {tuple(gram.shape)} and "
            f"{tuple(labels.shape)}"
        )
    classes, inv = torch.unique(labels, return_inverse=True)
    k = classes.numel()
    onehot = torch.nn.functional.one_hot(inv, k).to(torch.float64)
    g = gram.to(torch.float64)
    off = g - torch.diag_embed(g.diagonal())
    sums = onehot.T @ off @ onehot
    counts = onehot.sum(0)
    pairs = counts[:, None] * counts[None, :] - torch.diag(counts)
    block = torch.where(pairs > 0, sums / pairs.clamp_min(1), torch.full_like(sums, float("nan")))
    within_pairs = pairs.diagonal().sum()
    within = float(sums.diagonal().sum() / within_pairs) if within_pairs > 0 else float("nan")
    between_pairs = pairs.sum() - within_pairs
    between_sum = sums.sum() - sums.diagonal().sum()
    between = float(between_sum / between_pairs) if between_pairs > 0 else float("nan")
    return ClassCorrelation(block.to(gram.dtype), within, between, classes)


def kernel_target_alignment(
    gram: torch.Tensor, labels: torch.Tensor, *, centered: bool = True
) -> float:
    """Kernel–target alignment ``⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F)`` with Y one-hot labels.

    ``centered=True`` uses the centred alignment of Cortes, Mohri & Rostamizadeh (2012):
    both matrices are centred by ``H = I − 11ᵀ/n`` first.
    """
    labels = torch.as_tensor(labels).flatten()
    _, inv = torch.unique(labels, return_inverse=True)
    y = torch.nn.functional.one_hot(inv).to(torch.float64).to(gram.device)
    k = gram.to(torch.float64)
    t = y @ y.T
    if centered:
        k = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
        t = t - t.mean(0, keepdim=True) - t.mean(1, keepdim=True) + t.mean()
    denom = torch.linalg.norm(k) * torch.linalg.norm(t)
    return float((k * t).sum() / denom) if denom > 0 else float("nan")


def gram_spectrum(gram: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Eigenvalues of a symmetric Gram matrix in descending order (the top ``k`` if given)."""
    ev = torch.linalg.eigvalsh(gram.to(torch.float64)).flip(0).to(gram.dtype)
    return ev if k is None else ev[:k]


class Neighbors(NamedTuple):
    indices: torch.Tensor  #: (n, k) nearest neighbours in Jacobian space, self excluded
    distances: torch.Tensor  #: (n, k) Euclidean distances between flattened Jacobians
    label_agreement: float | None  #: share of neighbours with the same label


def jacobian_neighbors(
    gram: torch.Tensor, k: int = 5, labels: torch.Tensor | None = None, *, normalized: bool = False
) -> Neighbors:
    """Nearest neighbours in Jacobian space from the Gram matrix alone.

    ``‖𝒥_i − 𝒥_j‖² = M_ii + M_jj − 2 M_ij``; for a cosine matrix (``normalized=True``) the
    distance between unit vectors, ``√(2 − 2 M_ij)``.
    """
    n = gram.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, n-1] = [1, {n - 1}], got {k}")
    g = gram.to(torch.float64)
    diag = torch.ones(n, dtype=g.dtype, device=g.device) if normalized else g.diagonal()
    d2 = (diag[:, None] + diag[None, :] - 2 * g).clamp_min(0)
    d2.fill_diagonal_(float("inf"))
    dist, idx = torch.topk(d2, k, dim=1, largest=False)
    agree = None
    if labels is not None:
        labels = torch.as_tensor(labels).flatten().to(idx.device)
        agree = float((labels[idx] == labels[:, None]).double().mean())
    return Neighbors(idx, dist.sqrt().to(gram.dtype), agree)
