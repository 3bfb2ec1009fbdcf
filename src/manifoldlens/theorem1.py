"""Bordt et al., Theorem 1 (§5.2, Appendix C, Figure 8): generalisation does not imply that
gradients align with the data manifold.

The manifold is a closed curve 𝓜 ⊂ ℝ^d that walks along the edges of a shifted hypercube,
alternating between the first coordinate and the others (Appendix C, eq. 11), closed by a few
straight segments so that exactly half of its length runs along e₁ and half orthogonal to
it. Points are uniform on 𝓜 by arc length, those with |x₁| < ε removed; the label is
sign x₁. The maximum-margin two-layer ReLU network (eq. 2)

    f(ν*, x) = ½ · (1/√2) [φ((x₁ + ε)/√(2(1 + ε²))) − φ((ε − x₁)/√(2(1 + ε²)))]

classifies every point correctly and its gradient ∇ₓf = e₁ / (4√(1 + ε²)) is the same
everywhere: in the tangent space on the e₁-segments (fraction 1), orthogonal to it on the
others (fraction 0). :func:`simulate` trains a finite two-layer ReLU network on samples of
𝓜 (Figure 8) and measures the fraction of its gradient in each point's tangent space.

Appendix C's ``t_max = 4(d − 2)`` (even d) and ``4(d − 1)`` (odd d) do not match its own
parametrisation, where one step along e₁ and one along another axis take two units of t; the
walk described (ending at (−½, 1, …, 1, 0) for even d and (−½, 1, …, 1) for odd d) has
``t_max = 2(d − 2)`` and ``2(d − 1)``, which is what :func:`curve_vertices` builds.

References
----------
S. Bordt, U. Upadhyay, Z. Akata, U. von Luxburg. "The Manifold Hypothesis for Gradient-Based
Explanations." CVPR Workshops 2023. arXiv:2206.07387. Theorem 1, Appendix C, Figure 8.

L. Chizat, F. Bach. "Implicit Bias of Gradient Descent for Wide Two-layer Neural Networks
Trained with the Logistic Loss." COLT 2020. (ν* is the limit of gradient flow.)
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .attribution import explain
from .callbacks import TangentFractionDuringTraining
from .tangent import TangentSpace
from .training import RunOptions, evaluate, train_classifier

__all__ = [
    "ACROSS",
    "ALONG",
    "CurveSample",
    "Theorem1Result",
    "TwoLayerReLU",
    "curve_vertices",
    "max_margin_network",
    "sample_curve",
    "simulate",
]


#: The two kinds of segment of 𝓜, as :attr:`Theorem1Result.records` names them.
ALONG, ACROSS = "points on segments along e₁", "points on segments ⊥ e₁"


def _check_dimension(d: Any) -> int:
    try:
        d = operator.index(d)
    except TypeError:
        raise ValueError(f"d must be an integer >= 2, got {d!r}") from None
    if d < 2:
        raise ValueError(f"d must be an integer >= 2, got {d}")
    return d


def curve_vertices(d: int) -> torch.Tensor:
    """The corners of the closed polygonal curve 𝓜 ⊂ ℝ^d of Appendix C, (m + 1, d) float64,
    the last row equal to the first (−½, 0, …, 0).

    The walk (eq. 11) flips x₁ between −½ and ½, then raises the next coordinate from 0 to 1,
    d − 2 times (even d) or d − 1 times (odd d). It is closed through (√(d−1)/2, 1, …, 1, 0),
    (√(d−1)/2, 1, …, 1), (−½, 1, …, 1) for even d, and through (−½, ⅔, …, ⅔),
    (−½ + √(d−1)/2, ⅔, …, ⅔), (−½ + √(d−1)/2, ⅓, …, ⅓), (−½, ⅓, …, ⅓) for odd d. Every
    segment runs along e₁ or orthogonal to it, each kind of total length d − 1 + √(d − 1).

    >>> curve_vertices(2).tolist()
    [[-0.5, 0.0], [0.5, 0.0], [0.5, 1.0], [-0.5, 1.0], [-0.5, 0.0]]
    """
    d = _check_dimension(d)
    start = torch.zeros(d, dtype=torch.float64)
    start[0] = -0.5
    corners = [start]
    cur = start
    for m in range(d - 2 if d % 2 == 0 else d - 1):
        cur = cur.clone()
        cur[0] = -cur[0]  # along e₁
        corners.append(cur)
        cur = cur.clone()
        cur[m + 1] = 1.0  # along e_{m+2}, orthogonal to e₁
        corners.append(cur)
    r = math.sqrt(d - 1) / 2
    if d % 2 == 0:
        a = cur.clone()
        a[0] = r
        b = a.clone()
        b[-1] = 1.0
        c = b.clone()
        c[0] = -0.5
        corners += [a, b, c]
    else:
        for level, x1 in ((2 / 3, -0.5), (2 / 3, -0.5 + r), (1 / 3, -0.5 + r), (1 / 3, -0.5)):
            p = torch.full((d,), level, dtype=torch.float64)
            p[0] = x1
            corners.append(p)
    corners.append(start)
    return torch.stack(corners)


@dataclass
class CurveSample:
    """Points of 𝓜 with their labels and tangent spaces.

    ``x`` (n, d); ``labels`` (n,) int64, 1 where x₁ > 0 (y = sign x₁, class 0 is y = −1);
    ``tangent`` (n, d) the unit direction of each point's segment (T_x = span of it);
    ``along_first`` (n,) bool, whether that segment runs along e₁.
    """

    x: torch.Tensor
    labels: torch.Tensor
    tangent: torch.Tensor
    along_first: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def tangent_space(self) -> TangentSpace:
        """The 1-dimensional tangent spaces T_x = span(tangent) as a :class:`TangentSpace`."""
        return TangentSpace(self.tangent.unsqueeze(1))


def sample_curve(n: int, d: int, *, eps: float = 0.05, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> CurveSample:
    """``n`` points uniform by arc length on 𝓜 (:func:`curve_vertices`) with |x₁| ≥ ``eps``:
    the distribution 𝒟ₓ of the proof (U_𝓜 conditioned off the slab |x₁| < ε), labelled by
    sign x₁. Corners have measure zero; the theorem's smoothing of them is not needed."""
    d = _check_dimension(d)
    if operator.index(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    v = curve_vertices(d)
    seg = v[1:] - v[:-1]
    length = torch.linalg.vector_norm(seg, dim=1)
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), length.cumsum(0)])
    g = torch.Generator().manual_seed(seed)
    xs, idx = [], []
    while sum(len(i) for i in idx) < n:
        s = torch.rand(2 * n, generator=g, dtype=torch.float64) * cum[-1]
        i = (torch.searchsorted(cum, s, right=True) - 1).clamp(0, len(length) - 1)
        x = v[i] + ((s - cum[i]) / length[i]).unsqueeze(1) * seg[i]
        keep = x[:, 0].abs() >= eps
        xs.append(x[keep])
        idx.append(i[keep])
    x, i = torch.cat(xs)[:n], torch.cat(idx)[:n]
    u = seg[i] / length[i].unsqueeze(1)
    return CurveSample(x.to(dtype), (x[:, 0] > 0).long(), u.to(dtype), u[:, 0].abs() > 0.5)


class TwoLayerReLU(nn.Module):
    """``f(x) = Σⱼ wⱼ φ(⟨aⱼ, x⟩ + bⱼ)``, φ = ReLU (eq. 2 with ν the empirical measure of the
    neurons, scaled into w), returned as the two logits ``(−f/2, f/2)``: cross-entropy on them
    is the logistic loss log(1 + e^{−y f}), and the gradient of either logit is ±∇f/2, so the
    fraction of an attribution in tangent space is that of ∇f."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        d = _check_dimension(d)
        if operator.index(width) < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.hidden = nn.Linear(d, width)
        self.out = nn.Linear(width, 1, bias=False)

    def decision(self, x: torch.Tensor) -> torch.Tensor:
        """f(x), shaped (n,)."""
        return self.out(torch.relu(self.hidden(x))).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.decision(x).unsqueeze(-1)
        return torch.cat([-f / 2, f / 2], -1)


def max_margin_network(d: int, eps: float = 0.05, dtype: torch.dtype = torch.float64
                       ) -> TwoLayerReLU:
    """The maximum-margin classifier of the proof, ν* = ½δ_θ₀ + ½δ_θ₁ on the sphere 𝕊^{d+1}:
    θ₀ = (1/√2, 1/√(2(1+ε²)) e₁, ε/√(2(1+ε²))), θ₁ = (−1/√2, −1/√(2(1+ε²)) e₁, ε/√(2(1+ε²)))
    as (w, a, b), a width-2 :class:`TwoLayerReLU` with output weights ½w. On the data its
    gradient is e₁/(4√(1 + ε²)) and its margin min y f = ε/(2√(1 + ε²)), at x₁ = ±ε."""
    d = _check_dimension(d)
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    net = TwoLayerReLU(d, 2).to(dtype)
    c = 1 / math.sqrt(2 * (1 + eps**2))
    with torch.no_grad():
        net.hidden.weight.zero_()
        net.hidden.weight[0, 0], net.hidden.weight[1, 0] = c, -c
        net.hidden.bias.fill_(eps * c)
        net.out.weight.copy_(torch.tensor([[0.5, -0.5]], dtype=dtype) / math.sqrt(2))
    return net


@dataclass
class Theorem1Result:
    """What :func:`simulate` measured: the trained ``model``, the ``test`` sample, the
    fraction of the gradient in each test point's tangent space (``fractions``), the same
    for ν* (``max_margin_fractions``), test accuracies and the fraction over training,
    ``records[kind]`` for the test points on segments along e₁ (:data:`ALONG`) and
    orthogonal to it (:data:`ACROSS`)."""

    model: TwoLayerReLU
    test: CurveSample
    fractions: torch.Tensor
    max_margin_fractions: torch.Tensor
    metrics: dict[str, Any]
    records: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def simulate(*, d: int = 10, n_train: int = 2000, n_test: int = 2000, eps: float = 0.05,
             width: int = 256, steps: int = 1000, lr: float = 1e-2, fraction_every: int = 50,
             threshold: float = 0.5, seed: int = 0, run: Any = None, progress: bool = False,
             device: str = "cpu") -> Theorem1Result:
    """Figure 8: train a two-layer ReLU network (``width`` neurons) on ``n_train`` points of
    𝓜 ⊂ ℝ^d with full-batch Adam on the logistic loss for ``steps`` steps, then measure on
    ``n_test`` fresh points the test accuracy and the fraction ‖P_T ∇f‖/‖∇f‖ of its gradient
    in tangent space. Theorem 1: accuracy 1 while about half the points have fraction ≈ 1
    (those on e₁-segments) and half ≈ 0; ``threshold`` splits the two modes in the metrics.
    ``run``: a :class:`~manifoldlens.runs.Run` or :class:`RunOptions` the training logs to."""
    d = _check_dimension(d)
    for name, value in (("n_train", n_train), ("n_test", n_test), ("width", width),
                        ("steps", steps), ("fraction_every", fraction_every)):
        if operator.index(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    train = sample_curve(n_train, d, eps=eps, seed=seed)
    test = sample_curve(n_test, d, eps=eps, seed=seed + 1)
    torch.manual_seed(seed)
    model = TwoLayerReLU(d, width)
    kinds = {ALONG: ("along_e1", test.along_first), ACROSS: ("across_e1", ~test.along_first)}
    cbs = {k: TangentFractionDuringTraining(test.x[m], TangentSpace(test.tangent[m, None]),
                                            every=fraction_every, key=f"tangent_fraction_{key}")
           for k, (key, m) in kinds.items() if m.any()}
    res = train_classifier(model, (train.x, train.labels), test_data=(test.x, test.labels),
                           optimizer="adam", lr=lr, batch_size=n_train, steps=steps, seed=seed,
                           callbacks=list(cbs.values()), run=RunOptions.of(run),
                           progress=progress, device=device)
    model.eval()
    ts = test.tangent_space()
    frac = ts.fraction(explain(model, test.x.to(device), "gradient").cpu()).double()
    star = max_margin_network(d, eps)
    frac_star = ts.to(torch.float64).fraction(explain(star, test.x.double(), "gradient"))
    along = test.along_first
    fit = evaluate(model, (train.x.to(device), train.labels.to(device)))
    metrics = {
        "test_accuracy": res.metrics["test_accuracy"],
        "train_accuracy": fit["accuracy"],
        "train_loss": fit["loss"],
        "share_along_first": float(along.double().mean()),
        "share_in_tangent": float((frac > threshold).double().mean()),
        "share_orthogonal": float((frac <= threshold).double().mean()),
        "mean_fraction_along_first": float(frac[along].mean()) if along.any() else math.nan,
        "mean_fraction_orthogonal_segments": (float(frac[~along].mean()) if (~along).any()
                                              else math.nan),
        "max_margin_accuracy": float(((star.decision(test.x.double()) > 0).long()
                                      == test.labels).double().mean()),
        "max_margin_share_in_tangent": float((frac_star > threshold).double().mean()),
    }
    return Theorem1Result(model, test, frac, frac_star, metrics,
                          {k: cb.records for k, cb in cbs.items()})
