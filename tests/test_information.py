"""The local data matrix G(x) and local Fisher F(x, w) against dense brute force (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manifoldlens import jacobian
from manifoldlens.information import local_data_matrix, local_fisher_matrix

from helpers import TinyCNN, TinyMLP, make

F64 = torch.float64


def dense_g(model, x):
    """G = Σ_c p_c ∇log p_c ∇log p_cᵀ straight from the definition (seed 001 eq. 6)."""
    j = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda z: torch.log_softmax(model(z[None])[0], -1), xi
            ).reshape(-1, xi.numel())
            for xi in x
        ]
    )
    p = torch.softmax(model(x), -1)
    return torch.einsum("nc,ncd,nce->nde", p, j, j), j, p


@pytest.fixture(params=["relu_mlp", "tanh_mlp", "cnn"])
def model_and_x(request):
    g = torch.Generator().manual_seed(7)
    if request.param == "cnn":
        return make(TinyCNN()), torch.randn(4, 1, 6, 6, dtype=F64, generator=g)
    act = nn.ReLU if request.param == "relu_mlp" else nn.Tanh
    return make(TinyMLP(act=act)), torch.randn(4, 12, dtype=F64, generator=g)


def test_matches_definition_psd_rank_trace(model_and_x):
    model, x = model_and_x
    G = local_data_matrix(model, x)
    dense, j, p = dense_g(model, x)
    torch.testing.assert_close(G.dense(), dense)
    ev_dense = torch.linalg.eigvalsh(dense)
    assert (ev_dense > -1e-12 * ev_dense[:, -1:]).all()  # PSD
    c = G.num_classes
    torch.testing.assert_close(G.eigenvalues, ev_dense.flip(-1)[:, :c], atol=1e-12, rtol=1e-9)
    assert (G.rank() == c - 1).all()  # rank ≤ C − 1, attained for a generic model
    assert G.eigenvalues[:, -1].abs().max() < 1e-12 * G.eigenvalues[:, 0].min()
    # trace identity (eq. 11): Tr G = E_{y~p} ‖∇log p_y‖²
    trace_expect = (p * (j**2).sum(-1)).sum(-1)
    torch.testing.assert_close(G.trace, trace_expect)
    torch.testing.assert_close(G.trace, dense.diagonal(dim1=1, dim2=2).sum(-1))


def test_eigenpairs(model_and_x):
    model, x = model_and_x
    G = local_data_matrix(model, x)
    dense = G.dense()
    v = G.eigenvectors.reshape(len(x), G.num_classes, -1)
    torch.testing.assert_close(v @ v.mT, torch.eye(G.num_classes, dtype=F64).expand_as(v @ v.mT))
    gv = torch.einsum("nde,nce->ncd", dense, v)
    torch.testing.assert_close(gv, G.eigenvalues[..., None] * v, atol=1e-10, rtol=1e-8)
    # the range projector equals dense eigh's: on the well-separated top eigenvalues, where
    # dense eigh itself is accurate (its subspace error is ≈ eps·λ_max / gap)
    evals, evecs = torch.linalg.eigh(dense)
    for i in range(len(x)):
        r = int((G.eigenvalues[i] > 1e-6 * G.eigenvalues[i, 0]).sum())
        top = evecs[i, :, -r:]
        torch.testing.assert_close(v[i, :r].mT @ v[i, :r], top @ top.mT, atol=1e-8, rtol=0)
    q, mask = G.basis()
    assert (mask.sum(-1) == G.num_classes - 1).all()
    torch.testing.assert_close(q.mT @ q @ q.mT, q.mT)  # orthonormal basis


def test_projections(model_and_x):
    model, x = model_and_x
    G = local_data_matrix(model, x)
    v = torch.randn_like(x)
    pv, kv = G.project(v), G.project_kernel(v)
    assert pv.shape == v.shape
    torch.testing.assert_close(G.project(pv), pv)  # idempotent
    torch.testing.assert_close(G.project_kernel(kv), kv)
    torch.testing.assert_close(pv + kv, v)  # complementary
    inner = (pv.reshape(len(x), -1) * kv.reshape(len(x), -1)).sum(-1)
    torch.testing.assert_close(inner, torch.zeros(len(x), dtype=F64), atol=1e-12, rtol=0)
    # G vanishes on the kernel and pv carries the whole quadratic form
    scale = G.eigenvalues[:, 0] * v.reshape(len(x), -1).norm(dim=1) ** 2
    assert (G.quadratic_form(kv) < 1e-12 * scale).all()
    torch.testing.assert_close(G.quadratic_form(pv), G.quadratic_form(v))


def test_proposition_2_1_kernel(model_and_x):
    """ker G = (span{∇log p_c})^⊥ and Σ_c p_c ∇log p_c = 0."""
    model, x = model_and_x
    G = local_data_matrix(model, x)
    j = jacobian(model, x, output="log_softmax").reshape(len(x), G.num_classes, -1)
    torch.testing.assert_close(
        torch.einsum("nc,ncd->nd", G.probs, j), torch.zeros(len(x), j.shape[-1], dtype=F64)
    )
    kv = G.project_kernel(torch.randn_like(x)).reshape(len(x), -1)
    dots = torch.einsum("ncd,nd->nc", j, kv)
    assert dots.abs().max() < 1e-10
    # conversely, a vector orthogonal to every ∇log p_c is in ker G
    q, _ = torch.linalg.qr(j.mT)
    w = torch.randn(len(x), j.shape[-1], dtype=F64)
    w = w - (q @ (q.mT @ w[..., None]))[..., 0]
    assert G.quadratic_form(w.reshape(x.shape)).abs().max() < 1e-20
    torch.testing.assert_close(G.project(w.reshape(x.shape)).reshape(len(x), -1),
                               torch.zeros_like(w), atol=1e-10, rtol=0)


def test_kl_second_order():
    """KL(p(x+εv) ‖ p(x)) / (½ ε² vᵀGv) → 1 as ε → 0, with error O(ε)."""
    model = make(TinyMLP(act=nn.Tanh))
    x = torch.randn(3, 12, dtype=F64)
    v = torch.randn_like(x)
    G = local_data_matrix(model, x)
    logp = torch.log_softmax(model(x), -1)
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        logq = torch.log_softmax(model(x + eps * v), -1)
        kl = (logq.exp() * (logq - logp)).sum(-1)
        ratio = kl / (0.5 * eps**2 * G.quadratic_form(v))
        errors.append((ratio - 1).abs().max().item())
    assert errors[-1] < 5e-3
    assert errors[2] < errors[1] < errors[0]


def test_linear_model_distribution_is_constant(linear):
    """For s = Wx + b, D_x = span{W_i − W_j} at every x."""
    x = torch.randn(5, 12, dtype=F64) * 3
    G = local_data_matrix(linear, x)
    w = linear[1].weight.detach()
    diffs = (w[1:] - w[0]).T  # d × (C−1)
    q, _ = torch.linalg.qr(diffs)
    ref = q @ q.T
    basis, _ = G.basis()
    torch.testing.assert_close(basis.mT @ basis, ref.expand(5, 12, 12), atol=1e-10, rtol=1e-8)


def test_dense_limit_and_bad_vectors(relu_mlp):
    x = torch.randn(2, 12, dtype=F64)
    G = local_data_matrix(relu_mlp, x)
    with pytest.raises(ValueError, match="max_dim.*project"):
        G.dense(max_dim=10)
    with pytest.raises(ValueError, match="shaped like x"):
        G.project(torch.randn(3, 12, dtype=F64))


def test_large_input_never_dense():
    """d = 3·64·64 with C = 10: the factored route never forms d × d."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 10)).eval()
    x = torch.randn(2, 3, 64, 64)
    G = local_data_matrix(model, x)
    assert G.eigenvectors.shape == (2, 10, 3 * 64 * 64)
    assert (G.rank() == 9).all()
    v = torch.randn_like(x)
    torch.testing.assert_close(G.project(G.project(v)), G.project(v), atol=1e-4, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(2, 6), d=st.integers(2, 9))
def test_rank_bound_any_shape(n, c, d):
    torch.manual_seed(n * 100 + c * 10 + d)
    model = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, c)).double()
    G = local_data_matrix(model, torch.randn(n, d, dtype=F64))
    assert G.eigenvalues.shape == (n, c)
    assert (G.rank() <= min(c - 1, d)).all()
    assert (G.eigenvalues[:, :-1] >= G.eigenvalues[:, 1:]).all()


def test_local_fisher_matches_brute_force():
    model = make(TinyMLP(d=5, c=3, hidden=4, act=nn.Tanh))
    x = torch.randn(3, 5, dtype=F64)
    F = local_fisher_matrix(model, x, chunk_size=2, keep_factor=True)
    params = list(model.parameters())
    for i in range(len(x)):
        logp = torch.log_softmax(model(x[i : i + 1])[0], -1)
        rows = []
        for c in range(3):
            g = torch.autograd.grad(logp[c], params, retain_graph=True)
            rows.append(torch.cat([t.flatten() for t in g]))
        j = torch.stack(rows)
        p = logp.exp().detach()
        dense = torch.einsum("c,cd,ce->de", p, j, j)
        ev = torch.linalg.eigvalsh(dense).flip(0)[:3]
        torch.testing.assert_close(F.eigenvalues[i], ev, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(F.trace[i], dense.trace())
        dw = torch.randn(j.shape[1], dtype=F64)
        torch.testing.assert_close(F.quadratic_form(dw[None].expand(3, -1))[i], dw @ dense @ dw)
    assert (F.rank() <= 2).all()
    F2 = local_fisher_matrix(model, x)
    torch.testing.assert_close(F2.eigenvalues, F.eigenvalues)
    with pytest.raises(RuntimeError, match="keep_factor"):
        F2.quadratic_form(torch.zeros(3, 10))


def test_basis_keeps_improbable_classes_in_float32():
    """D_x = span{∇log p_c} for every class, however small p_c (G weighs them by p_c)."""
    torch.manual_seed(0)
    model = nn.Linear(20, 10)
    with torch.no_grad():
        model.weight.mul_(12)
    x = torch.randn(3, 20)
    G = local_data_matrix(model, x)
    assert G.probs.min() < 1e-6  # some classes are improbable
    _, mask = G.basis()
    assert (mask.sum(-1) == 9).all()
    j = jacobian(model, x)  # (n, C, d) rows ∇log p_c
    for c in range(10):
        rows = j[:, c]
        rel = G.project_kernel(rows).norm(dim=1) / rows.norm(dim=1)
        assert rel.max() < 1e-4, (c, rel)


def test_top_eigenvectors_are_the_first_rows_of_the_eigenvectors():
    model = make(TinyMLP(d=12, c=6))
    G = local_data_matrix(model, torch.randn(3, 12, dtype=torch.float64))
    top = G.top_eigenvectors(3)
    assert top.shape == (3, 3, 12)
    assert torch.allclose(top, G.eigenvectors[:, :3], atol=1e-12)
    assert G.top_eigenvectors(50).shape == (3, 6, 12)  # at most the C rows there are
    with pytest.raises(ValueError, match="m"):
        G.top_eigenvectors(0)
