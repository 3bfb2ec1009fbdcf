"""G restricted to each sample's most probable classes, and the sampled trace (float64).

Checked against the definition by brute force: ``G_K = Σ_{c∈K} p_c g_c g_cᵀ`` with
``g_c = ∇log p_c`` from ``torch.autograd.functional.jacobian`` of ``log_softmax``.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manifoldlens import TangentSpace, local_data_matrix, trace_estimate
from manifoldlens.foliation import horizontal_path, leaf_crossing_path

from helpers import TinyCNN, TinyMLP, make

F64 = torch.float64


def brute(model, x):
    """``(J_logp (n, C, d), p (n, C), classes by decreasing p (n, C))`` by the definition."""
    j = torch.stack([
        torch.autograd.functional.jacobian(
            lambda z: torch.log_softmax(model(z[None])[0], -1), xi
        ).reshape(-1, xi.numel())
        for xi in x
    ])
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    return j, p, p.argsort(dim=1, descending=True, stable=True)


def brute_g(model, x, k):
    """Dense ``G_K`` (n, d, d), the kept rows (n, K, d) and the dropped mass (n,)."""
    j, p, order = brute(model, x)
    top = order[:, :k]
    jk = j.gather(1, top.unsqueeze(-1).expand(-1, -1, j.shape[-1]))
    pk = p.gather(1, top)
    return torch.einsum("nc,ncd,nce->nde", pk, jk, jk), jk, 1 - pk.sum(1)


def exact_trace(model, x):
    j, p, _ = brute(model, x)
    return (p * (j**2).sum(-1)).sum(-1)


@pytest.fixture(params=["relu_mlp", "tanh_mlp", "cnn"])
def model_and_x(request):
    g = torch.Generator().manual_seed(3)
    if request.param == "cnn":
        return make(TinyCNN(c=7)), torch.randn(3, 1, 6, 6, dtype=F64, generator=g)
    act = nn.ReLU if request.param == "relu_mlp" else nn.Tanh
    return make(TinyMLP(d=8, c=10, act=act)), torch.randn(3, 8, dtype=F64, generator=g)


def _tail_model(c=12):
    """A smooth MLP whose probabilities are spread: the tail beyond 2 classes matters."""
    return make(TinyMLP(d=6, c=c, act=nn.Tanh), seed=5)


# --------------------------------------------------------------------------------------
# top-k G
# --------------------------------------------------------------------------------------


def test_all_classes_equal_the_full_g(model_and_x):
    model, x = model_and_x
    full = local_data_matrix(model, x)
    c = full.num_classes
    G = local_data_matrix(model, x, top_k=c)
    torch.testing.assert_close(G.dense(), full.dense())
    torch.testing.assert_close(G.eigenvalues, full.eigenvalues, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(G.trace, full.trace)
    assert (G.rank() == full.rank()).all()
    assert not G.restricted and (G.dropped_mass == 0).all()
    v = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(G.project(v), full.project(v))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_equals_the_restricted_sum(model_and_x, k):
    model, x = model_and_x
    dense, jk, dropped = brute_g(model, x, k)
    G = local_data_matrix(model, x, top_k=k)
    j, p, order = brute(model, x)
    assert G.classes.tolist() == order[:, :k].tolist()
    assert G.jac_logp.shape == (len(x), k, jk.shape[-1]) and G.eigenvalues.shape == (len(x), k)
    torch.testing.assert_close(G.jac_logp, jk)
    torch.testing.assert_close(G.dense(), dense)
    torch.testing.assert_close(G.dropped_mass, dropped)
    torch.testing.assert_close(G.dropped_mass, 1 - p.gather(1, order[:, :k]).sum(1))
    torch.testing.assert_close(G.probs, p)  # all C probabilities are kept
    ev = torch.linalg.eigvalsh(dense).flip(-1)[:, :k]
    torch.testing.assert_close(G.eigenvalues, ev, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(G.trace, dense.diagonal(dim1=1, dim2=2).sum(-1))
    v = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    flat = v.reshape(len(x), -1)
    torch.testing.assert_close(G.quadratic_form(v), torch.einsum("nd,nde,ne->n", flat, dense, flat))
    # K < C gradients need not sum to 0: the restricted distribution is their span (no C − 1
    # cap; K dimensions unless the network makes them dependent), holding every kept gradient
    vecs, mask = G.basis()
    gram_rank = torch.linalg.matrix_rank(jk @ jk.mT, rtol=10 * k * 2.0**-52, hermitian=True)
    assert mask.sum(1).tolist() == gram_rank.tolist()
    for c in range(k):
        g = jk[:, c].reshape(x.shape)
        torch.testing.assert_close(G.project(g), g)


@pytest.mark.parametrize("strategy", ["vjp", "vmap", "forward", "auto"])
def test_strategies_and_chunks_agree(strategy):
    model = make(TinyMLP(d=8, c=10, act=nn.Tanh))
    x = torch.randn(5, 8, dtype=F64, generator=torch.Generator().manual_seed(4))
    dense, *_ = brute_g(model, x, 3)
    G = local_data_matrix(model, x, top_k=3, strategy=strategy, chunk_size=2)
    torch.testing.assert_close(G.dense(), dense)


class _Wrapped(nn.Module):
    def __init__(self, net, output):
        super().__init__()
        self.net, self.output = net, output

    def forward(self, x):
        s = self.net(x)
        return torch.log_softmax(s, -1) if self.output == "log_probs" else torch.softmax(s, -1)


@pytest.mark.parametrize("output", ["log_probs", "probs"])
@pytest.mark.parametrize("k", [3, 10])
def test_model_outputs_give_the_same_g(output, k):
    net = make(TinyMLP(d=8, c=10, act=nn.Tanh))
    x = torch.randn(4, 8, dtype=F64, generator=torch.Generator().manual_seed(5))
    ref = local_data_matrix(net, x, top_k=k)
    G = local_data_matrix(_Wrapped(net, output), x, top_k=k, model_output=output)
    assert G.classes.tolist() == ref.classes.tolist()
    torch.testing.assert_close(G.dense(), ref.dense())
    torch.testing.assert_close(G.dropped_mass, ref.dropped_mass)


def test_to_keeps_the_classes():
    model = make(TinyMLP(d=8, c=10))
    G = local_data_matrix(model, torch.randn(2, 8, dtype=F64), top_k=3)
    H = G.to(torch.float32)
    assert H.classes.tolist() == G.classes.tolist() and H.jac_logp.dtype == torch.float32
    torch.testing.assert_close(H.trace.double(), G.trace, rtol=1e-5, atol=0)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(2, 9), d=st.integers(1, 7), data=st.data())
def test_shapes_and_values_for_any_sizes(n, c, d, data):
    k = data.draw(st.integers(1, c))
    torch.manual_seed(n * 100 + c * 10 + d)
    model = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, c)).double().eval()
    x = torch.randn(n, d, dtype=F64)
    G = local_data_matrix(model, x, top_k=k)
    dense, _, dropped = brute_g(model, x, k)
    assert G.eigenvalues.shape == (n, k) and G.dropped_mass.shape == (n,)
    torch.testing.assert_close(G.dense(), dense)
    torch.testing.assert_close(G.dropped_mass, dropped.clamp_min(0), atol=1e-15, rtol=1e-12)
    est, err = trace_estimate(model, x, top_k=k, samples=3, seed=data.draw(st.integers(0, 99)))
    assert est.shape == err.shape == (n,) and (est >= 0).all() and (err >= 0).all()
    if k == c:
        torch.testing.assert_close(est, exact_trace(model, x))


# --------------------------------------------------------------------------------------
# the sampled trace
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 12])
def test_trace_with_every_class_is_exact(top_k):
    model = _tail_model()
    x = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(6))
    est, err = trace_estimate(model, x, top_k=top_k, samples=5)
    torch.testing.assert_close(est, exact_trace(model, x))
    torch.testing.assert_close(est, local_data_matrix(model, x).trace)
    assert (err == 0).all()


def test_trace_estimate_is_unbiased_and_its_stderr_honest():
    model = _tail_model()
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(7))
    exact = exact_trace(model, x)
    top2 = local_data_matrix(model, x, top_k=2)
    assert (top2.dropped_mass > 0.2).all()  # the tail matters
    runs = [trace_estimate(model, x, top_k=2, samples=4, seed=s) for s in range(200)]
    est = torch.stack([r.estimate for r in runs])  # (seeds, n)
    err = torch.stack([r.stderr for r in runs])
    se_mean = est.std(0) / 200**0.5
    assert ((est.mean(0) - exact).abs() < 4 * se_mean).all()
    assert ((est - top2.trace) >= 0).all()  # the exact part is G_K's trace, the rest ≥ 0
    # the reported stderr matches the spread of the estimates over seeds
    ratio = err.pow(2).mean(0).sqrt() / est.std(0)
    assert ((ratio > 0.6) & (ratio < 1.5)).all(), ratio


def test_trace_error_shrinks_like_one_over_root_samples():
    model = _tail_model()
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(8))
    exact = exact_trace(model, x)

    def run(samples):
        rs = [trace_estimate(model, x, top_k=2, samples=samples, seed=s) for s in range(40)]
        est = torch.stack([r.estimate for r in rs])
        return torch.stack([r.stderr for r in rs]).mean(0), (est - exact).pow(2).mean(0).sqrt()

    err_few, rmse_few = run(4)
    err_many, rmse_many = run(64)
    ratio = err_few / err_many  # √(64 / 4) = 4
    assert ((ratio > 3) & (ratio < 5.3)).all(), ratio
    assert (rmse_many < rmse_few / 2).all()


def test_trace_draws_follow_the_seed_not_the_chunks():
    model = _tail_model()
    x = torch.randn(5, 6, dtype=F64, generator=torch.Generator().manual_seed(9))
    a = trace_estimate(model, x, top_k=3, samples=6, seed=11)
    b = trace_estimate(model, x, top_k=3, samples=6, seed=11, chunk_size=2)
    torch.testing.assert_close(a.estimate, b.estimate)
    torch.testing.assert_close(a.stderr, b.stderr)
    c = trace_estimate(model, x, top_k=3, samples=6, seed=12)
    assert not torch.equal(a.estimate, c.estimate)


def test_trace_with_one_sample_has_no_stderr():
    model = _tail_model()
    x = torch.randn(2, 6, dtype=F64)
    est, err = trace_estimate(model, x, top_k=2, samples=1)
    assert torch.isfinite(est).all() and torch.isnan(err).all()


# --------------------------------------------------------------------------------------
# paths and tangent spaces
# --------------------------------------------------------------------------------------


def test_paths_with_every_class_equal_the_full_paths():
    model = make(TinyMLP(d=8, c=6, act=nn.Tanh))
    g = torch.Generator().manual_seed(10)
    src, tgt = torch.randn(2, 8, dtype=F64, generator=g), torch.randn(2, 8, dtype=F64, generator=g)
    kw = dict(step_size=0.05, max_steps=8, tol=1e-3)
    torch.testing.assert_close(horizontal_path(model, src, tgt, top_k=6, **kw).points,
                               horizontal_path(model, src, tgt, **kw).points)
    torch.testing.assert_close(leaf_crossing_path(model, src, steps=8, top_k=6).points,
                               leaf_crossing_path(model, src, steps=8).points)


def test_restricted_path_steps_along_the_top_k_gradients():
    model = make(TinyMLP(d=8, c=10, act=nn.Tanh))
    g = torch.Generator().manual_seed(11)
    src, tgt = torch.randn(3, 8, dtype=F64, generator=g), torch.randn(3, 8, dtype=F64, generator=g)
    _, jk, _ = brute_g(model, src, 3)
    q, _ = torch.linalg.qr(jk.mT)  # (n, d, 3): an orthonormal basis of the top-3 gradients
    v = torch.einsum("ndk,nk->nd", q, torch.einsum("ndk,nd->nk", q, tgt - src))
    res = horizontal_path(model, src, tgt, step_size=0.01, max_steps=1, tol=1e-6, top_k=3)
    torch.testing.assert_close(res.final - src, 0.01 * v / v.norm(dim=1, keepdim=True))
    across = leaf_crossing_path(model, src, direction=tgt, steps=1, step_size=0.01, top_k=3)
    w = tgt - torch.einsum("ndk,nk->nd", q, torch.einsum("ndk,nd->nk", q, tgt))
    torch.testing.assert_close(across.final - src, 0.01 * w / w.norm(dim=1, keepdim=True))


def test_path_state_records_top_k(tmp_path):
    model = make(TinyMLP(d=8, c=6, act=nn.Tanh))
    src, tgt = torch.randn(2, 8, dtype=F64), torch.randn(2, 8, dtype=F64)
    kw = dict(step_size=0.05, max_steps=3, tol=1e-4, checkpoint_dir=tmp_path)
    horizontal_path(model, src, tgt, **kw)
    assert "top_k" not in json.loads((tmp_path / "state.json").read_text())["config"]
    with pytest.raises(ValueError, match="differing: top_k"):
        horizontal_path(model, src, tgt, top_k=2, **kw)
    other = tmp_path / "k2"
    horizontal_path(model, src, tgt, top_k=2, **{**kw, "checkpoint_dir": other})
    assert json.loads((other / "state.json").read_text())["config"]["top_k"] == 2
    horizontal_path(model, src, tgt, top_k=2, **{**kw, "checkpoint_dir": other})  # resumes


def test_tangent_space_from_the_top_k_classes():
    model = make(TinyMLP(d=12, c=10, act=nn.Tanh))
    x = torch.randn(3, 12, dtype=F64, generator=torch.Generator().manual_seed(12))
    T = TangentSpace.from_model(model, x, top_k=4)
    _, jk, _ = brute_g(model, x, 4)
    assert (T.dim == 4).all()
    torch.testing.assert_close(T.project(jk[:, 2]), jk[:, 2])
    assert (TangentSpace.from_model(model, x, top_k=10).dim == 9).all()


# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 11, -1, True, 2.5, "3"])
def test_bad_top_k_is_refused_everywhere(bad):
    model = make(TinyMLP(d=8, c=10))
    x = torch.randn(2, 8, dtype=F64)
    calls = [
        lambda: local_data_matrix(model, x, top_k=bad),
        lambda: trace_estimate(model, x, top_k=bad),
        lambda: horizontal_path(model, x, x + 1, top_k=bad),
        lambda: leaf_crossing_path(model, x, top_k=bad),
        lambda: TangentSpace.from_model(model, x, top_k=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="top_k"):
            call()


@pytest.mark.parametrize("option,bad", [("samples", 0), ("samples", True), ("samples", 1.5),
                                        ("seed", -1), ("seed", "a"), ("chunk_size", 0)])
def test_bad_trace_options_are_refused(option, bad):
    model = make(TinyMLP(d=8, c=10))
    with pytest.raises(ValueError, match=option):
        trace_estimate(model, torch.randn(2, 8, dtype=F64), top_k=2, **{option: bad})


@pytest.mark.parametrize("top_k", [None, 6, 3])
def test_more_classes_than_input_dimensions(top_k):
    """d < C (a 2-D toy with many classes): at most d directions, the basis padded with zero
    rows, and the projection onto a full-rank distribution is the identity."""
    model = make(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 6)))
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(13))
    G = local_data_matrix(model, x, top_k=top_k)
    vecs, mask = G.basis()
    rows = 6 if top_k is None else top_k
    assert vecs.shape == (4, rows, 2) and (mask.sum(1) == 2).all() and not mask[:, 2:].any()
    v = torch.randn(4, 2, dtype=F64)
    torch.testing.assert_close(G.project(v), v)
    assert G.eigenvectors.shape == (4, rows, 2)
