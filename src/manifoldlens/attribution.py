"""Gradient-based attributions and their fraction in the tangent space of the data manifold.

Bordt et al. (§3.2) compare four explanations E ∈ ℝ^d of the class c a classifier predicts,
all computed from the score s_c *before* the softmax:

* ``"gradient"``: ``E = ∂s_c/∂x``
* ``"input_x_gradient"``: ``E = x ⊙ ∂s_c/∂x``
* ``"integrated_gradients"``: ``E = ∫₀¹ ∂s_c/∂x (x' + α(x − x')) dα`` from a baseline x'
  (0 by default), optionally multiplied by ``x − x'``
* ``"smoothgrad"``: ``E = E_ε[∂s_c/∂x (x + ε)]``, ε ~ N(0, σ²I)

and measures how well each lies in the tangent space T_x of the data manifold with the
fraction ``‖P_T E‖ / ‖E‖`` (Bordt et al., eq. 1; a random vector scores ≈ √(k/d)):
:class:`TangentFraction`.

Every attribution is signed (no absolute values) and has the shape, dtype and device of x.

References
----------
S. Bordt, U. Upadhyay, Z. Akata, U. von Luxburg. "The Manifold Hypothesis for Gradient-Based
Explanations." CVPR Workshops 2023. arXiv:2206.07387. §3.2, eq. 1.

A. Shrikumar, P. Greenside, A. Shcherbina, A. Kundaje. "Not Just a Black Box: Learning
Important Features Through Propagating Activation Differences." Preprint, 2016.
arXiv:1605.01713.

M. Sundararajan, A. Taly, Q. Yan. "Axiomatic Attribution for Deep Networks." ICML 2017.
arXiv:1703.01365.

D. Smilkov, N. Thorat, B. Kim, F. Viégas, M. Wattenberg. "SmoothGrad: removing noise by adding
noise." Preprint, 2017. arXiv:1706.03825.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ._checks import (
    MODEL_OUTPUTS,
    check_batch,
    check_choice,
    check_finite,
    check_independent_samples,
    check_model_output,
    check_output_type,
    check_positive_int,
)
from ._utils import chunks, scores_with_graph, to_scores
from .memory import (
    MemoryCost,
    cached_cost,
    check_max_memory,
    measure_cost,
    plan_chunk_size,
    resolve_max_memory,
)

__all__ = [
    "ATTRIBUTIONS",
    "METHODS",
    "QUADRATURES",
    "Method",
    "TangentFraction",
    "explain",
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "method_options",
    "smoothgrad",
]

QUADRATURES = (
    "gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
)

# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_ig_options(baseline: Any, steps: Any, multiply_by_inputs: Any, quadrature: Any,
                      internal_batch_size: Any) -> None:
    check_choice(quadrature, QUADRATURES, "quadrature")
    check_positive_int(steps, "steps")
    if quadrature != "gausslegendre" and steps < 2:
        raise ValueError(f"quadrature {quadrature!r} needs steps >= 2, got {steps}")
    check_positive_int(internal_batch_size, "internal_batch_size", allow_none=True)
    if not isinstance(multiply_by_inputs, bool):
        raise TypeError("multiply_by_inputs must be a bool, got "
                        f"{type(multiply_by_inputs).__name__}")
    if isinstance(baseline, bool) or not isinstance(
            baseline, (numbers.Real, torch.Tensor, np.ndarray)):
        raise TypeError(f"baseline must be a float or a tensor, got {type(baseline).__name__}")
    if isinstance(baseline, numbers.Real) and not math.isfinite(baseline):
        raise ValueError(f"baseline must be finite, got {baseline}")


def _check_smoothgrad_options(noise_level: Any, samples: Any, samples_batch_size: Any,
                              seed: Any, index_offset: Any = 0) -> None:
    if isinstance(noise_level, bool) or not isinstance(noise_level, numbers.Real) or not (
        math.isfinite(noise_level) and noise_level >= 0
    ):
        raise ValueError(f"noise_level must be a finite float >= 0, got {noise_level!r}")
    check_positive_int(samples, "samples")
    check_positive_int(samples_batch_size, "samples_batch_size", allow_none=True)
    if seed is not None and not isinstance(seed, torch.Generator) and not (
        _is_int(seed) and seed >= 0
    ):
        raise TypeError(f"seed must be a non-negative int, a torch.Generator or None, "
                        f"got {seed!r}")
    if not (_is_int(index_offset) and index_offset >= 0):
        raise ValueError(f"index_offset must be a non-negative int (the index of x[0] in the "
                         f"whole dataset), got {index_offset!r}")


def _check_call(model: Any, x: torch.Tensor, target: Any, model_output: str,
                batch_size: Any, max_memory: Any = None) -> torch.Tensor | None:
    """The checks every method makes before any work (and before any random draw)."""
    check_choice(model_output, MODEL_OUTPUTS, "model_output")
    check_batch(x)
    check_positive_int(batch_size, "batch_size", allow_none=True)
    check_max_memory(max_memory)
    t = _prepare_target(target, x.shape[0], x.device)
    if isinstance(model, nn.Module):
        check_independent_samples(model, x)
    return t


def _in_chunks(x: torch.Tensor, t_all: torch.Tensor | None, batch_size: int | None,
               attribute: Callable[[torch.Tensor, torch.Tensor | None, slice], torch.Tensor]
               ) -> torch.Tensor:
    """``attribute(x_chunk, target_chunk, rows)`` over chunks of ``batch_size`` samples,
    concatenated, detached, in the dtype and device of x; ``t_all`` is the target prepared by
    :func:`_check_call`."""
    n = x.shape[0]
    x = x.detach()
    parts = [attribute(x[sl], None if t_all is None else t_all[sl], sl).detach()
             for sl in chunks(n, batch_size or n)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.to(dtype=x.dtype, device=x.device)


def _prepare_target(target: Any, n: int, device: torch.device) -> torch.Tensor | None:
    """``None`` or a LongTensor (n,) of class indices; the range is checked later."""
    if target is None:
        return None
    if _is_int(target):
        return torch.full((n,), int(target), dtype=torch.long, device=device)
    if isinstance(target, (np.ndarray, list, tuple)):
        target = torch.as_tensor(np.asarray(target))
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be None, an int or an integer tensor shaped (n,), "
                        f"got {type(target).__name__}")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.ndim == 0:
        target = target.expand(n)
    if tuple(target.shape) != (n,):
        raise ValueError(f"target must be an int or shaped (n,) = ({n},), "
                         f"got shape {tuple(target.shape)}")
    return target.to(device=device, dtype=torch.long)


def _resolve_target(t: torch.Tensor | None, scores: torch.Tensor, offset: int) -> torch.Tensor:
    """The predicted class when ``t`` is None; otherwise ``t`` checked against C."""
    c = scores.shape[1]
    if t is None:
        return scores.detach().argmax(1)
    bad = ((t < 0) | (t >= c)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"target must be a class index in [0, {c}), got {int(t[i])} for "
                         f"sample {offset + i}")
    return t


def _prepare_baseline(b: Any, x: torch.Tensor) -> torch.Tensor:
    """A baseline broadcast to ``x.shape``: a float, one input (shape[1:]) or one per sample."""
    if isinstance(b, numbers.Real):
        return x.new_full((), float(b)).expand_as(x)
    b = torch.as_tensor(b).to(device=x.device, dtype=x.dtype)
    if b.shape == x.shape or b.shape == x.shape[1:] or b.ndim == 0:
        check_finite(b.reshape(1, -1) if b.ndim < x.ndim else b, "baseline")
        return b.expand_as(x)
    raise ValueError(f"baseline must be a float, shaped like one input {tuple(x.shape[1:])} or "
                     f"like x {tuple(x.shape)}; got shape {tuple(b.shape)}")


# --------------------------------------------------------------------------------------
# Pieces shared by the methods
# --------------------------------------------------------------------------------------


def _gradient(
    model: Callable, x: torch.Tensor, target: torch.Tensor | None, model_output: str,
    offset: int = 0, check: bool = True,
) -> torch.Tensor:
    """∂s_t/∂x for every sample from one forward and one backward pass.

    Samples are independent, so the gradient of Σ_i s_{t_i}(x_i) w.r.t. x_i is ∂s_{t_i}/∂x_i.
    """
    with torch.enable_grad():
        xr, s = scores_with_graph(model, x, model_output, check)
        t = _resolve_target(target, s, offset)
        selected = s.gather(1, t[:, None]).sum()
        if not selected.requires_grad:  # the scores do not depend on x
            return torch.zeros_like(x)
        (g,) = torch.autograd.grad(selected, xr)
    return g


def _gradient_probe(model: Callable, x: torch.Tensor, model_output: str) -> torch.Tensor | None:
    """What :func:`_gradient` allocates, for :func:`~manifoldlens.memory.measure_cost`: the
    values are not checked (a ``meta`` run has none), the type of the output is."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        s = to_scores(check_output_type(model(xr)), model_output)
        selected = s.gather(1, s.detach().argmax(1, keepdim=True)).sum()
        if not selected.requires_grad:
            return None
        (g,) = torch.autograd.grad(selected, xr)
    return g


def _predicted(
    model: Callable, x: torch.Tensor, target: torch.Tensor | None, model_output: str, offset: int
) -> torch.Tensor:
    """Check the model's output on x and resolve the target (one forward pass, no graph)."""
    with torch.no_grad():
        out = model(x)
    check_model_output(out, model_output, x.shape[0])
    return _resolve_target(target, to_scores(out, model_output), offset)


def _inputs_per_pass(model: Any, x: torch.Tensor, model_output: str, max_memory: Any,
                     cap: int, extra: int, what: str) -> int:
    """How many inputs (≤ ``cap``) one forward and backward pass may take within
    ``max_memory`` bytes (None: half the memory available), the n attributions held besides;
    ``extra`` more bytes per input (copies the method makes). Measured on ``meta``
    (:mod:`manifoldlens.memory`); raises ``ValueError`` if one input does not fit."""
    budget = resolve_max_memory(max_memory, x.device)
    key = ("gradient", model_output, tuple(x.shape[1:]), x.dtype, x.device.type)
    cost = cached_cost(model, key, lambda: measure_cost(
        model, x, lambda m, xb: _gradient_probe(m, xb, model_output)))
    cost = MemoryCost(cost.fixed, cost.per_sample + extra, cost.exact)
    return plan_chunk_size(cap, cost, budget, held=x[0].numel() * x.element_size() * len(x),
                           what=what, shape=tuple(x.shape[1:]))


_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def _sample_seed(base: int, i: int) -> int:
    """SplitMix64 of (base, i): independent, well-spread seeds for each sample."""
    z = (base + (i + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


def _base_seed(seed: int | torch.Generator | None) -> int:
    if _is_int(seed):
        return int(seed)
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=seed, device=seed.device))
    return int(torch.randint(0, 2**62, (1,)))  # the global RNG: torch.manual_seed applies


# --------------------------------------------------------------------------------------
# The methods: one function each
# --------------------------------------------------------------------------------------

#: A classifier: maps inputs (n, *shape) to class scores (n, C).
Model = Callable[[torch.Tensor], torch.Tensor]
#: The class to explain: one for all samples, one per sample (n,), or None (the predicted).
Target = int | torch.Tensor | None


def gradient(model: Model, x: torch.Tensor, target: Target = None, *,
             model_output: str = "logits", batch_size: int | None = None,
             max_memory: float | None = None) -> torch.Tensor:
    """``E = ∂s_c/∂x``, signed, for the class c of ``target`` (None: the predicted class).

    One forward and one backward pass per chunk of ``batch_size`` samples (default: as many
    as ``max_memory`` bytes allow; None: half the memory available). For a linear model
    s = Wx + b the gradient of class c is the row W_c:

    >>> import torch
    >>> linear = torch.nn.Linear(3, 2).double()
    >>> g = gradient(linear, torch.randn(4, 3, dtype=torch.float64), target=1)
    >>> torch.allclose(g, linear.weight[1].expand(4, 3))
    True
    """
    t_all = _check_call(model, x, target, model_output, batch_size, max_memory)
    m = _inputs_per_pass(model, x, model_output, max_memory, len(x), 0, "gradient")
    batch_size = batch_size or m
    return _in_chunks(x, t_all, batch_size, lambda xc, tc, sl: _gradient(
        model, xc, tc, model_output, sl.start))


def input_x_gradient(model: Model, x: torch.Tensor, target: Target = None, *,
                     model_output: str = "logits", batch_size: int | None = None,
                     max_memory: float | None = None) -> torch.Tensor:
    """``E = x ⊙ ∂s_c/∂x`` (Shrikumar et al. 2016): the gradient weighted by the input.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x = torch.rand(2, 5)
    >>> torch.equal(input_x_gradient(net, x), x * gradient(net, x))
    True
    """
    t_all = _check_call(model, x, target, model_output, batch_size, max_memory)
    m = _inputs_per_pass(model, x, model_output, max_memory, len(x),
                         x[0].numel() * x.element_size(), "input_x_gradient")
    batch_size = batch_size or m
    return _in_chunks(x, t_all, batch_size, lambda xc, tc, sl: xc * _gradient(
        model, xc, tc, model_output, sl.start))


def integrated_gradients(
    model: Model,
    x: torch.Tensor,
    target: Target = None,
    *,
    baseline: float | torch.Tensor = 0.0,
    steps: int = 50,
    multiply_by_inputs: bool = False,
    quadrature: str = "gausslegendre",
    internal_batch_size: int | None = None,
    model_output: str = "logits",
    batch_size: int | None = None,
    max_memory: float | None = None,
) -> torch.Tensor:
    """``E = ∫₀¹ ∂s_c/∂x (x' + α(x − x')) dα`` from the baseline x' (Sundararajan et al. 2017),
    times ``(x − x')`` when ``multiply_by_inputs`` (the attributions then sum to
    ``s_c(x) − s_c(x')``: completeness). Captum's ``IntegratedGradients`` underneath.

    ``baseline``: a float, one input shaped ``x.shape[1:]`` or one per sample. ``quadrature``:
    ``"gausslegendre"`` or ``"riemann_left|right|middle|trapezoid"`` with ``steps`` nodes.
    ``internal_batch_size``: at most this many interpolated inputs per forward pass, so a
    large ``steps`` never runs out of memory. Unset, ``batch_size`` and then
    ``internal_batch_size`` are chosen to fit ``max_memory`` bytes (None: half the memory
    available; a split of the steps changes the sum's rounding only). The default
    ``multiply_by_inputs=False`` is what
    Bordt et al.'s code computed (``IntegratedGradients(model, multiply_by_inputs=False)``
    with Captum's defaults: zero baseline, 50 Gauss–Legendre steps;
    tml-tuebingen/explanations-manifold, ``replicate-paper/mnist/util.py``).

    >>> import torch
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> torch.allclose(integrated_gradients(model, x, 1, multiply_by_inputs=True),
    ...                x * model.weight[1])
    True
    """
    _check_ig_options(baseline, steps, multiply_by_inputs, quadrature, internal_batch_size)
    t_all = _check_call(model, x, target, model_output, batch_size, max_memory)
    # per interpolated input, Captum's copies: inputs, baselines, scaled inputs, gradients
    m = _inputs_per_pass(model, x, model_output, max_memory, len(x) * steps,
                         4 * x[0].numel() * x.element_size(), "integrated_gradients")
    if internal_batch_size is None:
        if m < steps or (batch_size is not None and batch_size * steps > m):
            internal_batch_size = m  # an explicit batch_size is kept; its passes are split
        elif m < len(x) * steps:
            batch_size = batch_size or m // steps
    from captum.attr import IntegratedGradients  # lazy: captum takes ~1 s to import

    base = _prepare_baseline(baseline, x.detach())
    if internal_batch_size is not None:  # Captum needs one interpolated input per sample
        batch_size = min(batch_size or x.shape[0], internal_batch_size)

    def scores(z: torch.Tensor) -> torch.Tensor:
        return to_scores(model(z), model_output)

    ig = IntegratedGradients(scores, multiply_by_inputs=multiply_by_inputs)

    def attribute(xc: torch.Tensor, tc: torch.Tensor | None, sl: slice) -> torch.Tensor:
        t = _predicted(model, xc, tc, model_output, sl.start)
        with torch.enable_grad():
            return ig.attribute(xc, baselines=base[sl], target=t, n_steps=steps,
                                method=quadrature, internal_batch_size=internal_batch_size)

    return _in_chunks(x, t_all, batch_size, attribute)


def smoothgrad(
    model: Model,
    x: torch.Tensor,
    target: Target = None,
    *,
    noise_level: float = 0.02,
    samples: int = 25,
    samples_batch_size: int | None = None,
    seed: int | torch.Generator | None = None,
    index_offset: int = 0,
    model_output: str = "logits",
    batch_size: int | None = None,
    max_memory: float | None = None,
) -> torch.Tensor:
    """``E = (1/N) Σ_j ∂s_c/∂x (x + ε_j)``, ``ε_j ~ N(0, σ²I)`` (Smilkov et al. 2017), signed
    (no absolute values), c the class predicted at x itself.

    ``σ = noise_level · (max x − min x)`` per sample (the SmoothGrad paper's noise level; for
    images spanning [0, 1] it equals Captum's absolute ``stdevs``). The defaults are Bordt et
    al.'s: Captum ``NoiseTunnel(Saliency)`` with ``stdevs=0.02``, 25 samples, ``abs=False`` on
    images in [0, 1] (``replicate-paper/mnist/mnist-32-compute.ipynb``; the paper does not
    state them). ``samples_batch_size``: noisy copies of each input per forward pass (the noise
    of a chunk, ``batch_size · samples · d`` numbers, is drawn at once). ``seed``: an int or a
    ``torch.Generator`` (None: the global RNG; a generator or the global RNG gives one base
    seed per call). Each sample's noise comes from its own generator seeded by (seed,
    ``index_offset`` + i) for sample i of x: results do not depend on ``batch_size`` or
    ``samples_batch_size`` (beyond the rounding of the sum), and a shard ``x[a:b]`` of a
    dataset explained with ``index_offset=a`` (and the same int seed) gets rows a:b of the
    whole dataset's attributions: how the processes of a ``torch.distributed`` run
    (:func:`~manifoldlens.distributed.shard`) draw the noise one process would. Unset,
    ``batch_size`` and ``samples_batch_size`` are chosen to fit ``max_memory`` bytes (None:
    half the memory available).

    >>> import torch
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> torch.allclose(smoothgrad(model, x, 1, samples=8, seed=0), model.weight[1].expand(4, 3))
    True
    """
    _check_smoothgrad_options(noise_level, samples, samples_batch_size, seed, index_offset)
    t_all = _check_call(model, x, target, model_output, batch_size, max_memory)
    # per noisy input: its noise and the noisy copy
    m = _inputs_per_pass(model, x, model_output, max_memory, len(x) * samples,
                         2 * x[0].numel() * x.element_size(), "smoothgrad")
    if samples_batch_size is None:
        if batch_size is not None and batch_size * samples > m:
            samples_batch_size = max(1, m // batch_size)  # keep the explicit batch_size
        elif m < samples:
            samples_batch_size, batch_size = m, batch_size or 1
        elif m < len(x) * samples:
            batch_size = batch_size or m // samples
    base_seed, offset = _base_seed(seed), int(index_offset)  # a Python int: no overflow

    def attribute(xc: torch.Tensor, tc: torch.Tensor | None, sl: slice) -> torch.Tensor:
        t = _predicted(model, xc, tc, model_output, sl.start)  # the class predicted at x
        n, shape = xc.shape[0], xc.shape[1:]
        flat = xc.reshape(n, -1)
        sigma = (noise_level * (flat.amax(1) - flat.amin(1))).reshape(n, 1, *([1] * len(shape)))
        noise = torch.zeros((n, samples, *shape), dtype=xc.dtype, device=xc.device)
        if noise_level > 0:
            gen = torch.Generator(device=xc.device)
            for i in range(n):
                gen.manual_seed(_sample_seed(base_seed, offset + sl.start + i))
                noise[i] = torch.randn((samples, *shape), generator=gen, dtype=xc.dtype,
                                       device=xc.device)
        total = torch.zeros_like(xc)
        for part in chunks(samples, samples_batch_size):
            k = part.stop - part.start
            noisy = (xc.unsqueeze(1) + sigma * noise[:, part]).reshape(n * k, *shape)
            g = _gradient(model, noisy, t.repeat_interleave(k), model_output, check=False)
            total += g.reshape(n, k, *shape).sum(1)
        return total / samples

    return _in_chunks(x, t_all, batch_size, attribute)


#: The attribution methods :func:`explain` dispatches to, by name.
Method = Literal["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"]
ATTRIBUTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gradient": gradient,
    "input_x_gradient": input_x_gradient,
    "integrated_gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
}
METHODS = tuple(ATTRIBUTIONS)
_COMMON = ("model_output", "batch_size", "max_memory")


def method_options(method: str) -> dict[str, Any]:
    """The options of ``method`` beyond ``model_output``, ``batch_size`` and ``max_memory``,
    with defaults."""
    if method not in ATTRIBUTIONS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    params = inspect.signature(ATTRIBUTIONS[method]).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.name not in _COMMON}


def _check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of ``method`` validated, defaults filled in (before any work)."""
    defaults = method_options(method)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {method!r}; valid options: "
                        f"{tuple(defaults) or 'none'}")
    opts = {**defaults, **options}
    if method == "integrated_gradients":
        _check_ig_options(**opts)
    elif method == "smoothgrad":
        _check_smoothgrad_options(**opts)
    return opts


def explain(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    method: Method,
    target: int | torch.Tensor | None = None,
    *,
    model_output: str = "logits",
    batch_size: int | None = None,
    max_memory: float | None = None,
    **options: Any,
) -> torch.Tensor:
    """Attributions of the target class score by ``method``, shaped like ``x``.

    Dispatches to :func:`gradient`, :func:`input_x_gradient`, :func:`integrated_gradients` or
    :func:`smoothgrad` (table :data:`ATTRIBUTIONS`); ``options`` are that function's keyword
    options (unknown ones raise ``TypeError``). The score is ``s_c``, the logit of class c,
    as in Bordt et al. §3.2 ("before the softmax"); for models declared
    ``model_output="log_probs"`` or ``"probs"`` the logits cannot be recovered and the score is
    ``log p_c`` (its gradient is ``∇s_c − E_p[∇s]``).

    Parameters
    ----------
    model : callable
        Maps ``(n, *shape)`` to ``(n, C)``. Samples must be independent: a model in train
        mode with BatchNorm raises ``ValueError`` (call ``model.eval()``).
    x : Tensor ``(n, *shape)``
        Finite inputs, any floating dtype and device.
    method : {"gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"}
    target : int or LongTensor ``(n,)``, optional
        The class to explain; None: the class each sample's model predicts.
    model_output : {"logits", "log_probs", "probs"}
        What the model returns; outputs that contradict it raise ``ValueError``.
    batch_size : int, optional
        Samples per chunk; bounds peak memory.
    max_memory : float, optional
        Budget in bytes that unset chunk sizes are chosen to fit (default half the memory
        available on x's device); one input that does not fit raises ``ValueError`` first.

    Returns
    -------
    Tensor shaped like ``x``, same dtype and device, detached.

    Examples
    --------
    For a linear model s = Wx + b every method has a closed form: the gradient is ``W_c``.

    >>> import torch
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> g = explain(model, x, "gradient", target=1)
    >>> torch.allclose(g, model.weight[1].expand(4, 3))
    True
    >>> ig = explain(model, x, "integrated_gradients", 1, multiply_by_inputs=True)
    >>> torch.allclose(ig, x * model.weight[1])
    True
    """
    opts = _check_options(method, options)
    return ATTRIBUTIONS[method](model, x, target, model_output=model_output,
                                batch_size=batch_size, max_memory=max_memory, **opts)



# --------------------------------------------------------------------------------------
# Alignment with the data manifold (Bordt et al., eq. 1)
# --------------------------------------------------------------------------------------


def _model_dtype_device(model: Any) -> tuple[torch.dtype | None, torch.device | None]:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype, p.device
    return None, None


class TangentFraction:
    """Fraction of each attribution in the tangent space: ``‖P_T a‖ / ‖a‖`` (Bordt et al., eq. 1).

    A Quantus-style metric: ``metric(model, x_batch, y_batch, a_batch)`` returns a numpy
    array ``(n,)`` with values in [0, 1] (1: the attribution lies in T_x; a random vector
    scores ≈ √(k/d)).

    Parameters
    ----------
    tangent_fn : callable, optional
        ``tangent_fn(model, x, y)`` (x a tensor, y a LongTensor ``(n,)`` or None) → an
        object with ``.fraction(v)`` returning the ``(n,)``
        fractions ``‖P_T v‖/‖v‖`` of ``v`` shaped like x (``TangentSpace`` has it). Not
        needed when every call passes ``tangent=``.
    method : str
        The attribution computed by :func:`explain` when ``a_batch`` is None.
    model_output, batch_size, max_memory, **options
        Passed to :func:`explain`.

    Call
    ----
    ``metric(model, x_batch, y_batch=None, a_batch=None, *, tangent=None, device=None)``:
    tensors or numpy arrays (Quantus passes numpy). Numpy inputs become tensors with the
    dtype and device of the model's parameters (or ``device``). ``y_batch``: the classes
    explained (None: the predicted ones). ``a_batch`` must hold d = ``x_batch[0].numel()``
    numbers per sample (attributions in input space, not channel-reduced maps).

    Examples
    --------
    >>> import torch
    >>> class Span:  # tangent space of every sample: span of the first two coordinates
    ...     def fraction(self, v):
    ...         v = v.reshape(len(v), -1)
    ...         return v[:, :2].norm(dim=1) / v.norm(dim=1)
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> a = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0], [3.0, 0.0, 4.0], [0.0, 5.0, 0.0]])
    >>> TangentFraction()(model, x, None, a.double(), tangent=Span())
    array([1. , 0. , 0.6, 1. ])
    """

    def __init__(
        self,
        tangent_fn: Callable[[Any, torch.Tensor, torch.Tensor | None], Any] | None = None,
        *,
        method: str = "gradient",
        model_output: str = "logits",
        batch_size: int | None = None,
        max_memory: float | None = None,
        **options: Any,
    ) -> None:
        self.options = _check_options(method, options)
        check_choice(model_output, MODEL_OUTPUTS, "model_output")
        check_positive_int(batch_size, "batch_size", allow_none=True)
        check_max_memory(max_memory)
        self.max_memory = max_memory
        if tangent_fn is not None and not callable(tangent_fn):
            raise TypeError(f"tangent_fn must be callable, got {type(tangent_fn).__name__}")
        self.tangent_fn = tangent_fn
        self.method = method
        self.model_output = model_output
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return (f"TangentFraction(method={self.method!r}, model_output={self.model_output!r}, "
                f"options={self.options})")

    def __call__(
        self,
        model: Any,
        x_batch: torch.Tensor | np.ndarray,
        y_batch: torch.Tensor | np.ndarray | None = None,
        a_batch: torch.Tensor | np.ndarray | None = None,
        *,
        tangent: Any = None,
        device: str | torch.device | None = None,
    ) -> np.ndarray:
        if tangent is None and self.tangent_fn is None:
            raise ValueError("no tangent spaces: pass tangent_fn to TangentFraction(...) or "
                             "tangent= to the call")
        dtype, mdevice = _model_dtype_device(model)
        device = torch.device(device) if device is not None else mdevice
        if isinstance(x_batch, np.ndarray):
            x_batch = torch.as_tensor(x_batch, dtype=dtype, device=device)
        elif isinstance(x_batch, torch.Tensor) and device is not None:
            x_batch = x_batch.to(device)
        check_batch(x_batch, "x_batch")
        n = x_batch.shape[0]
        y = None if y_batch is None else _prepare_target(y_batch, n, x_batch.device)
        if a_batch is None:
            a = explain(model, x_batch, self.method, y, model_output=self.model_output,
                        batch_size=self.batch_size, max_memory=self.max_memory, **self.options)
        else:
            a = torch.as_tensor(a_batch).to(device=x_batch.device, dtype=x_batch.dtype)
            if a.ndim < 1 or a.shape[0] != n or a[0].numel() != x_batch[0].numel():
                raise ValueError(
                    f"a_batch must hold one attribution of {x_batch[0].numel()} numbers per "
                    f"sample of x_batch {tuple(x_batch.shape)}, got shape {tuple(a.shape)}; "
                    "attributions must live in input space (not channel-reduced)"
                )
            a = a.reshape(x_batch.shape)
            check_finite(a, "a_batch")
        if tangent is None:
            tangent = self.tangent_fn(model, x_batch, y)
        frac = tangent.fraction(a)
        frac = frac.detach().cpu().numpy() if isinstance(frac, torch.Tensor) else frac
        frac = np.asarray(frac, dtype=np.float64)
        if frac.shape != (n,):
            raise ValueError(f"tangent.fraction returned shape {frac.shape}, expected ({n},)")
        return frac
