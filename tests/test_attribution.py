"""Attributions against closed forms, autograd and Captum, in float64; the tangent fraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manifoldlens.attribution import METHODS, TangentFraction, explain

from helpers import Counting, TinyCNN, TinyMLP, make

F64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


class StandInTangent:
    """Tangent spaces from orthonormal rows ``basis`` (n, k, d): fraction = ‖B v‖ / ‖v‖."""

    def __init__(self, basis: torch.Tensor):
        self.basis = basis

    def fraction(self, v):
        v = torch.as_tensor(v).reshape(len(v), -1).to(self.basis.dtype)
        inside = torch.einsum("nkd,nd->nk", self.basis, v).norm(dim=1)
        norm = v.norm(dim=1)
        return torch.where(norm > 0, inside / norm.clamp_min(1e-300), torch.zeros_like(norm))


def orthonormal_rows(n, k, d, seed=0):
    q, _ = torch.linalg.qr(randn(n, d, k, seed=seed))
    return q.transpose(1, 2)  # (n, k, d)


@pytest.fixture
def image_linear():
    """An image model s = W flatten(x) + b: inputs (n, 1, 3, 4), 4 classes."""
    return make(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))


@pytest.fixture
def tanh():
    return make(TinyMLP(act=nn.Tanh))


# ------------------------------------------------------------------ closed forms (linear)


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("target", [2, "tensor", None])
def test_linear_closed_forms(image_linear, flat, target):
    shape = (12,) if flat else (1, 3, 4)
    x = randn(6, *shape)
    if target == "tensor":
        target = torch.tensor([0, 1, 2, 3, 3, 1])
    t = image_linear(x).argmax(1) if target is None else torch.as_tensor(target).expand(6)
    w = image_linear[1].weight[t].reshape(6, *shape)  # W_c per sample

    def run(method, **kw):
        return explain(image_linear, x, method, target, **kw)

    torch.testing.assert_close(run("gradient"), w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(run("input_x_gradient"), x * w, rtol=1e-12, atol=1e-14)
    # Captum casts its quadrature weights to float32: sums of weights are 1 to ~1e-9
    ig = run("integrated_gradients", multiply_by_inputs=True)
    torch.testing.assert_close(ig, x * w, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(run("integrated_gradients"), w, rtol=1e-7, atol=1e-9)
    # noise does not change a linear model's gradient
    sg = run("smoothgrad", noise_level=0.5, samples=7, seed=3)
    torch.testing.assert_close(sg, w, rtol=1e-12, atol=1e-14)


def test_signed_and_matches_captum(tanh):
    from captum.attr import InputXGradient, Saliency

    x = randn(5, 12, seed=1)
    t = torch.tensor([0, 1, 2, 3, 0])
    g = explain(tanh, x, "gradient", t)
    assert (g < 0).any()  # signed, not absolute values
    xr = x.clone().requires_grad_(True)
    torch.testing.assert_close(g, Saliency(tanh).attribute(xr, target=t, abs=False))
    torch.testing.assert_close(explain(tanh, x, "input_x_gradient", t),
                               InputXGradient(tanh).attribute(xr, target=t).detach())


# ------------------------------------------------------------------ nonlinear models


def test_gradient_is_autograd_of_target_logit(tanh):
    x = randn(5, 12, seed=2)
    t = torch.tensor([3, 0, 1, 2, 2])
    got = explain(tanh, x, "gradient", t)
    for i in range(5):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(tanh(xi)[0, t[i]], xi)
        torch.testing.assert_close(got[i], ref[0], rtol=1e-12, atol=1e-14)


def test_target_none_is_argmax(tanh):
    x = randn(7, 12, seed=3)
    pred = tanh(x).argmax(1)
    for method in METHODS:
        kw = {"seed": 0, "samples": 4} if method == "smoothgrad" else {}
        torch.testing.assert_close(explain(tanh, x, method, **kw),
                                   explain(tanh, x, method, pred, **kw))


@pytest.mark.parametrize("baseline", [0.0, "tensor"])
def test_integrated_gradients_completeness(tanh, baseline):
    x = randn(4, 12, seed=4)
    b = torch.zeros(12, dtype=F64) if baseline == 0.0 else 0.3 * randn(12, seed=5)
    t = torch.tensor([0, 1, 2, 3])
    a = explain(tanh, x, "integrated_gradients", t, steps=200, multiply_by_inputs=True,
                baseline=b if baseline == "tensor" else baseline)
    rows = torch.arange(4)
    gap = tanh(x)[rows, t] - tanh(b.expand(4, 12))[rows, t]
    torch.testing.assert_close(a.sum(1), gap.detach(), rtol=1e-3, atol=1e-6)
    # without the factor (x − x') the attribution is the path-averaged gradient
    avg = explain(tanh, x, "integrated_gradients", t, steps=200, baseline=b)
    torch.testing.assert_close(avg * (x - b), a, rtol=1e-10, atol=1e-12)


def test_smoothgrad_without_noise_is_gradient(tanh):
    x = randn(5, 12, seed=6)
    torch.testing.assert_close(explain(tanh, x, "smoothgrad", samples=1, noise_level=0.0),
                               explain(tanh, x, "gradient"), rtol=0, atol=0)


class HalfSquaredNorm(nn.Module):
    """s_0 = ½‖x‖², s_1 = 0: ∇s_0(x + ε) = x + ε shows the noise SmoothGrad draws."""

    def forward(self, x):
        return torch.stack([0.5 * x.pow(2).flatten(1).sum(1), torch.zeros(len(x), dtype=x.dtype)],
                           1)


def test_smoothgrad_noise_scale_is_fraction_of_range():
    x = randn(3, 400, seed=7) * torch.tensor([[1.0], [3.0], [0.2]], dtype=F64)
    samples, level = 100, 0.3
    sg = explain(HalfSquaredNorm(), x, "smoothgrad", 0, noise_level=level, samples=samples,
                 seed=1)
    sigma = level * (x.amax(1) - x.amin(1))
    # sg − x = mean of `samples` draws of N(0, σ²): coordinates spread as σ/√samples
    ratio = (sg - x).std(1) / (sigma / samples**0.5)
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), ratio
    # and centred: the mean over 400 coordinates has standard deviation σ/√(400·samples)
    assert ((sg - x).mean(1).abs() < 5 * sigma / (400 * samples) ** 0.5).all()


def test_smoothgrad_seeds(tanh):
    x = randn(4, 12, seed=8)
    kw = {"noise_level": 0.2, "samples": 5}
    a = explain(tanh, x, "smoothgrad", seed=11, **kw)
    torch.testing.assert_close(explain(tanh, x, "smoothgrad", seed=11, **kw), a, rtol=0, atol=0)
    assert not torch.allclose(explain(tanh, x, "smoothgrad", seed=12, **kw), a)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    torch.testing.assert_close(explain(tanh, x, "smoothgrad", seed=gen(), **kw),
                               explain(tanh, x, "smoothgrad", seed=gen(), **kw), rtol=0, atol=0)
    torch.manual_seed(0)
    b = explain(tanh, x, "smoothgrad", **kw)
    torch.manual_seed(0)
    torch.testing.assert_close(explain(tanh, x, "smoothgrad", **kw), b, rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 6),
    batch_size=st.one_of(st.none(), st.integers(1, 7)),
    inner=st.integers(1, 12),
    method=st.sampled_from(METHODS),
)
def test_chunking_does_not_change_results(n, batch_size, inner, method):
    model = make(TinyMLP(act=nn.Tanh))
    x = randn(n, 3, 4, seed=n)
    model.net[0] = nn.Flatten()
    opts, chunk = {}, {}
    if method == "integrated_gradients":
        opts, chunk = {"steps": 9}, {"internal_batch_size": inner}
    elif method == "smoothgrad":
        opts, chunk = {"samples": 5, "noise_level": 0.3, "seed": 4}, {"samples_batch_size": inner}
    full = explain(model, x, method, **opts)
    got = explain(model, x, method, batch_size=batch_size, **opts, **chunk)
    assert got.shape == x.shape and got.dtype == F64 and not got.requires_grad
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "declared,head", [("log_probs", nn.LogSoftmax(1)), ("probs", nn.Softmax(1))]
)
def test_log_probs_models_explain_log_p(tanh, declared, head):
    wrapped = nn.Sequential(tanh, head).eval()
    x = randn(5, 12, seed=9)
    t = torch.tensor([1, 1, 0, 3, 2])
    got = explain(wrapped, x, "gradient", t, model_output=declared)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(torch.log_softmax(tanh(xr), 1)[torch.arange(5), t].sum(), xr)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match=f"model_output='{declared}'"):
        explain(wrapped, x, "gradient", t)  # declared logits


@pytest.mark.parametrize("method", METHODS)
def test_float32_in_float32_out(method):
    model = TinyMLP().eval()
    x = torch.randn(3, 12)
    kw = {"samples": 2} if method == "smoothgrad" else {"steps": 4} if "integ" in method else {}
    a = explain(model, x, method, **kw)
    assert a.dtype == torch.float32 and a.shape == x.shape and torch.isfinite(a).all()


# ------------------------------------------------------------------ tangent fraction


def test_tangent_fraction_inside_and_orthogonal():
    n, k, d = 5, 3, 12
    basis = orthonormal_rows(n, k, d)
    tangent = StandInTangent(basis)
    model = make(nn.Linear(d, 4))
    x = randn(n, d, seed=10)
    inside = torch.einsum("nk,nkd->nd", randn(n, k, seed=11), basis)
    outside = randn(n, d, seed=12)
    outside = outside - torch.einsum("nkd,nd->nk", basis, outside).unsqueeze(-1).mul(basis).sum(1)
    metric = TangentFraction()
    np.testing.assert_allclose(metric(model, x, None, inside, tangent=tangent), 1.0, atol=1e-12)
    np.testing.assert_allclose(metric(model, x, None, outside, tangent=tangent), 0.0, atol=1e-12)
    zero = metric(model, x, None, torch.zeros(n, d, dtype=F64), tangent=tangent)
    np.testing.assert_array_equal(zero, 0.0)
    # numpy in (as Quantus passes it), numpy out
    got = metric(model, x.numpy(), np.zeros(n, dtype=np.int64), inside.numpy(), tangent=tangent)
    assert isinstance(got, np.ndarray) and got.shape == (n,) and got.dtype == np.float64
    np.testing.assert_allclose(got, 1.0, atol=1e-12)


def test_tangent_fraction_computes_attributions():
    """a_batch=None: the gradient of a linear model is W_c; put W_c in or out of T."""
    n, d = 4, 12
    model = make(nn.Linear(d, 3))
    x = randn(n, d, seed=13)
    y = np.array([0, 2, 1, 2])
    w = model.weight[torch.as_tensor(y)].detach()
    seen = {}

    def tangent_fn(m, xb, yb):
        seen["y"] = yb
        rows = torch.stack([w, randn(n, d, seed=14)], 1)  # span{W_c, random}
        q, _ = torch.linalg.qr(rows.transpose(1, 2))
        return StandInTangent(q.transpose(1, 2))

    metric = TangentFraction(tangent_fn)
    np.testing.assert_allclose(metric(model, x.numpy(), y), 1.0, atol=1e-12)
    torch.testing.assert_close(seen["y"], torch.as_tensor(y))
    ig = TangentFraction(tangent_fn, method="integrated_gradients", steps=8)
    np.testing.assert_allclose(ig(model, x, torch.as_tensor(y)), 1.0, atol=1e-9)
    # input × gradient = x ⊙ W_c is not in span{W_c, r}
    assert (TangentFraction(tangent_fn, method="input_x_gradient")(model, x, y) < 0.99).all()


def test_tangent_fraction_random_baseline():
    """A random vector's fraction in a k-dim subspace of ℝ^d is ≈ √(k/d) (seed 004 §3.3)."""
    n, k, d = 200, 4, 100
    tangent = StandInTangent(orthonormal_rows(n, k, d, seed=15))
    frac = TangentFraction()(None, randn(n, d), None, randn(n, d, seed=16), tangent=tangent)
    assert abs(frac.mean() - (k / d) ** 0.5) < 0.03


def test_tangent_fraction_bad_inputs():
    model = make(nn.Linear(6, 3))
    x = randn(2, 6)
    tangent = StandInTangent(orthonormal_rows(2, 2, 6))
    with pytest.raises(ValueError, match="tangent_fn"):
        TangentFraction()(model, x)
    with pytest.raises(ValueError, match="input space"):
        TangentFraction()(model, x, None, torch.ones(2, 5, dtype=F64), tangent=tangent)
    with pytest.raises(ValueError, match="a_batch contains NaN"):
        TangentFraction()(model, x, None, torch.full((2, 6), float("nan")), tangent=tangent)
    with pytest.raises(ValueError, match="method must be one of"):
        TangentFraction(method="saliency")
    with pytest.raises(TypeError, match="unknown option"):
        TangentFraction(method="gradient", steps=3)


# ------------------------------------------------------------------ bad inputs


def test_unknown_method_lists_valid_ones(tanh):
    with pytest.raises(ValueError, match="method must be one of.*'gradient'.*'smoothgrad'"):
        explain(tanh, randn(2, 12), "saliency")


def test_bad_inputs(tanh):
    x = randn(4, 12)
    bad = x.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*\[2\]"):
        explain(tanh, bad, "gradient")
    with pytest.raises(ValueError, match=r"\[0, 4\), got 4 for sample 0"):
        explain(tanh, x, "gradient", 4)
    with pytest.raises(ValueError, match=r"got -1 for sample 3"):
        explain(tanh, x, "integrated_gradients", torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match=r"got 9 for sample 1"):
        explain(tanh, x, "smoothgrad", torch.tensor([0, 9, 2, 1]), batch_size=3)
    with pytest.raises(TypeError, match="integer class indices"):
        explain(tanh, x, "gradient", torch.zeros(4))
    with pytest.raises(TypeError, match="unknown option.*'steps'"):
        explain(tanh, x, "smoothgrad", steps=3)
    with pytest.raises(TypeError, match="valid options: none"):
        explain(tanh, x, "gradient", samples=3)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        explain(tanh, x, "integrated_gradients", steps=0)
    with pytest.raises(ValueError, match="quadrature must be one of"):
        explain(tanh, x, "integrated_gradients", quadrature="simpson")
    with pytest.raises(ValueError, match="noise_level"):
        explain(tanh, x, "smoothgrad", noise_level=-0.1)
    with pytest.raises(ValueError, match="baseline must be"):
        explain(tanh, x, "integrated_gradients", baseline=torch.zeros(3))
    with pytest.raises(ValueError, match="batch_size"):
        explain(tanh, x, "gradient", batch_size=0)
    with pytest.raises(ValueError, match="model_output must be one of"):
        explain(tanh, x, "gradient", model_output="softmax")


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple))
def test_wrong_target_shape(shape):
    model = make(TinyMLP())
    x = randn(3, 12)
    if shape == (3,):
        shape = (3, 1)
    with pytest.raises(ValueError, match=r"shaped \(n,\) = \(3,\)"):
        explain(model, x, "gradient", torch.zeros(shape, dtype=torch.long))


def test_batchnorm_train_mode_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="BatchNorm1d.*model.eval"):
        explain(model, x, "gradient")
    model.eval()
    assert explain(model, x, "gradient").shape == (5, 4)


# ----------------------------------------------------------------------------- ROAR


def test_remove_features_replaces_the_ranked_pixels():
    from manifoldlens.roar import remove_features

    x = torch.arange(12, dtype=torch.float64).reshape(2, 1, 2, 3)
    scores = torch.tensor([[[[5, 1, 3], [0, 4, 2]]], [[[0, 1, 2], [3, 4, 5]]]],
                          dtype=torch.float64)
    fill = torch.full((1, 2, 3), -1.0, dtype=torch.float64)
    top = remove_features(x, scores, 0.5, remove="top", fill=fill)
    assert top[0].flatten().tolist() == [-1, 1, -1, 3, -1, 5]
    assert top[1].flatten().tolist() == [6, 7, 8, -1, -1, -1]
    bottom = remove_features(x, scores, 1 / 3, remove="bottom", fill=0.0)
    assert bottom[0].flatten().tolist() == [0, 0, 2, 0, 4, 5]
    assert torch.equal(remove_features(x, scores, 0.0), x)
    with pytest.raises(ValueError, match="top"):
        remove_features(x, scores, 0.5, remove="middle")


def test_roar_accuracy_falls_when_informative_pixels_go():
    from manifoldlens.roar import roar

    g = torch.Generator().manual_seed(0)
    n, d = 400, 20
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    x[:, :4] = y.unsqueeze(1).double() + 0.1 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    informative = torch.zeros(n, d, dtype=torch.float64)
    informative[:, :4] = 1
    noise = torch.rand(n, d, generator=g, dtype=torch.float64)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(d, 2)).double()

    res = roar(make, (x[:300], y[:300]), (x[300:], y[300:]),
               {"oracle": (informative[:300], informative[300:]),
                "random": (noise[:300], noise[300:])},
               fractions=(0.0, 0.25), train_options={"epochs": 20, "lr": 0.05},
               progress=False)
    assert res["fractions"] == [0.0, 0.25]
    assert res["oracle"][0] > 0.9 and res["random"][0] > 0.9
    assert res["oracle"][1] < 0.7 < res["random"][1]


def test_roar_resumes_after_an_interruption_with_the_same_results():
    from manifoldlens.roar import roar

    g = torch.Generator().manual_seed(1)
    n, d = 200, 12
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, d, generator=g, dtype=torch.float64) + y.unsqueeze(1).double()
    scores = {"a": (torch.rand(150, d, generator=g), torch.rand(50, d, generator=g)),
              "b": (torch.rand(150, d, generator=g), torch.rand(50, d, generator=g))}
    built = []

    def make():
        built.append(1)
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(d, 2)).double()

    args = (make, (x[:150], y[:150]), (x[150:], y[150:]), scores, (0.2, 0.6))
    opts = {"train_options": {"epochs": 3, "lr": 0.05}, "progress": False}
    full = roar(*args, **opts)
    done: dict[str, dict[float, float]] = {}

    def interrupted(name, q, acc):
        done.setdefault(name, {})[q] = acc
        if len(done) == 2:  # the first cell of the second ranking: stop
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        roar(*args, on_result=interrupted, **opts)
    assert done == {"a": {0.2: full["a"][0], 0.6: full["a"][1]}, "b": {0.2: full["b"][0]}}
    built.clear()
    resumed = roar(*args, done=done, **opts)
    assert resumed == full and len(built) == 1  # only the missing cell is retrained


@pytest.mark.parametrize("method,many", [("integrated_gradients", "steps"),
                                         ("smoothgrad", "samples")])
def test_an_explicit_batch_size_stays_within_the_memory_budget(method, many):
    """An explicit batch_size is kept, but its passes are split so that no forward pass takes
    more inputs than the budget allows; the values do not change."""
    x = torch.rand(12, 1, 6, 6, dtype=torch.float64)
    opts = {many: 20, **({"seed": 0} if method == "smoothgrad" else {})}
    free = Counting(make(TinyCNN()))
    ref = explain(free, x, method, batch_size=6, **opts)
    assert free.largest == 6 * 20  # a generous budget: one pass per batch
    tight = Counting(make(TinyCNN()))
    out = explain(tight, x, method, batch_size=6, max_memory=3e5, **opts)
    assert 1 <= tight.largest < 6 * 20
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
