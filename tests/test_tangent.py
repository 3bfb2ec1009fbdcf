"""Tangent spaces against closed forms and autograd, in float64 where exactness matters."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manifoldlens.tangent import TangentSpace, principal_angles, random_fraction_baseline

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(k: int, d: int, seed: int = 0) -> torch.Tensor:
    """k orthonormal rows in ℝ^d."""
    q, _ = torch.linalg.qr(torch.randn(d, k, dtype=F64, generator=gen(seed)))
    return q.T


def assert_orthonormal_rows(T: TangentSpace, atol: float = 1e-12) -> None:
    gram = T.basis @ T.basis.mT
    eye = torch.diag_embed(T.mask.to(T.basis.dtype))
    torch.testing.assert_close(gram, eye, rtol=0, atol=atol)


class LinearDecoder(nn.Module):
    """z ↦ W z + b, reshaped to (3, 4) images."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, z):
        return (z @ self.w.T + self.b).reshape(-1, 3, 4)


def tanh_decoder(k: int = 4, d: int = 20) -> nn.Module:
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(k, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, d))
    return dec.double().eval()


# ------------------------------------------------------------------------ from_decoder


def test_linear_decoder_spans_column_space():
    w = torch.randn(12, 3, dtype=F64, generator=gen(0))
    dec = LinearDecoder(w, torch.randn(12, dtype=F64, generator=gen(1)))
    z = torch.randn(5, 3, dtype=F64, generator=gen(2))
    T = TangentSpace.from_decoder(dec, z)
    assert T.basis.shape == (5, 3, 12) and T.input_shape == (3, 4) and len(T) == 5
    assert T.dim.tolist() == [3] * 5
    assert_orthonormal_rows(T)
    for j in range(3):  # P_T W = W, column by column
        col = w[:, j].reshape(1, 3, 4).expand(5, 3, 4)
        torch.testing.assert_close(T.project(col), col, rtol=0, atol=1e-12)
        torch.testing.assert_close(T.fraction(col), torch.ones(5, dtype=F64))
    r = torch.randn(5, 12, dtype=F64, generator=gen(3))
    perp = r - r @ w @ torch.linalg.solve(w.T @ w, w.T)  # orthogonal to col(W)
    assert T.project(perp).abs().max() < 1e-12
    torch.testing.assert_close(T.orthogonal(perp), perp, rtol=0, atol=1e-12)
    assert T.fraction(perp).max() < 1e-12
    chunked = TangentSpace.from_decoder(dec, z, chunk_size=2)
    torch.testing.assert_close(chunked.basis, T.basis, rtol=0, atol=1e-13)


def test_nonlinear_decoder_spans_autograd_jacobian():
    dec = tanh_decoder()
    z = torch.randn(6, 4, dtype=F64, generator=gen(4))
    T = TangentSpace.from_decoder(dec, z, chunk_size=4)
    assert T.dim.tolist() == [4] * 6
    assert_orthonormal_rows(T)
    for i in range(6):
        jac = torch.autograd.functional.jacobian(lambda zi: dec(zi[None])[0], z[i])  # (d, k)
        cols = jac.T  # (k, d)
        proj = TangentSpace(T.basis[i : i + 1].expand(4, 4, 20)).project(cols)
        assert (proj - cols).norm(dim=1).max() < 1e-10


def test_decoder_dtype_and_device_follow_z():
    dec = tanh_decoder().float()
    T = TangentSpace.from_decoder(dec, torch.randn(3, 4))
    assert T.basis.dtype == torch.float32 and T.basis.device.type == "cpu"
    assert_orthonormal_rows(T, atol=1e-5)
    T64 = T.to(F64)
    assert T64.basis.dtype == F64 and T64.mask.dtype == torch.bool
    assert T64.input_shape == T.input_shape


def test_decoder_batchnorm_train_mode_refused():
    dec = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Linear(8, 5))
    with pytest.raises(ValueError, match="BatchNorm1d.*eval"):
        TangentSpace.from_decoder(dec, torch.randn(4, 2))
    assert TangentSpace.from_decoder(dec.eval(), torch.randn(4, 2)).dim.tolist() == [2] * 4


def test_decoder_bad_inputs():
    dec = tanh_decoder()
    with pytest.raises(ValueError, match=r"z must be latent codes shaped \(n, k\)"):
        TangentSpace.from_decoder(dec, torch.randn(2, 1, 4, dtype=F64))
    z = torch.randn(3, 4, dtype=F64)
    z[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*\[1\]"):
        TangentSpace.from_decoder(dec, z)
    with pytest.raises(ValueError, match="decoder must map"):
        TangentSpace.from_decoder(lambda z: z.sum(), torch.randn(3, 4, dtype=F64))


# ---------------------------------------------------------------------------- fraction


def test_fraction_closed_forms():
    basis = orthonormal(2, 5).expand(4, 2, 5)
    T = TangentSpace(basis)
    t = 3 * basis[:, 0]  # in T
    o = torch.randn(4, 5, dtype=F64, generator=gen(5))
    o = T.orthogonal(o)
    o = 4 * o / o.norm(dim=1, keepdim=True)  # ⟂ T, norm 4
    torch.testing.assert_close(T.fraction(t), torch.ones(4, dtype=F64))
    assert T.fraction(o).max() < 1e-14
    torch.testing.assert_close(T.fraction(t + o), torch.full((4,), 0.6, dtype=F64))
    v = torch.zeros(4, 5, dtype=F64)
    v[1] = t[1]
    frac = T.fraction(v)  # zero vectors: 0, not NaN
    assert frac.tolist() == [0.0, 1.0, 0.0, 0.0]
    tiny = 1e-300 * (t + o)  # no underflow: scaled by the largest entry first
    torch.testing.assert_close(T.fraction(tiny), torch.full((4,), 0.6, dtype=F64))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    d=st.integers(1, 9),
    k=st.integers(1, 9),
    log_scale=st.sampled_from([-40, -12, 0, 12, 30]),
    dtype=st.sampled_from([torch.float32, F64]),
    zero_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fraction_in_unit_interval(n, d, k, log_scale, dtype, zero_row, seed):
    g = gen(seed)
    T = TangentSpace.from_basis(torch.randn(n, k, d, generator=g, dtype=F64).to(dtype))
    v = (torch.randn(n, d, generator=g, dtype=F64) * 10.0**log_scale).to(dtype)
    if zero_row:
        v[0] = 0
    frac = T.fraction(v)
    assert frac.shape == (n,) and frac.dtype == dtype
    assert torch.isfinite(frac).all() and (frac >= 0).all() and (frac <= 1).all()
    if zero_row:
        assert frac[0] == 0
    # project + orthogonal = v, and the two parts are orthogonal
    p, o = T.project(v), T.orthogonal(v)
    # up to rounding relative to the row's norm (an entry of v may be far below ‖v‖)
    eps = torch.finfo(dtype).eps
    assert ((p + o - v).norm(dim=1) <= 16 * eps * v.norm(dim=1)).all()


def test_random_vectors_match_baseline():
    k, d = 10, 1024
    g = gen(6)
    basis = orthonormal(k, d, seed=7)
    fracs = []
    for _ in range(8):  # 4000 Gaussian vectors, 500 at a time (the basis is a view)
        T = TangentSpace(basis.expand(500, k, d))
        fracs.append(T.fraction(torch.randn(500, d, dtype=F64, generator=g)))
    mean = float(torch.cat(fracs).mean())
    base = random_fraction_baseline(k, d)
    assert abs(mean / base - 1) < 0.03
    beta = torch.distributions.Beta(torch.tensor(k / 2, dtype=F64), torch.tensor((d - k) / 2))
    torch.manual_seed(8)
    mc = float(beta.sample((200_000,)).sqrt().mean())  # E √Beta(k/2, (d−k)/2)
    assert abs(mc / base - 1) < 0.005
    # ≈ √(k/d): 2.4 % below at this size (Jensen), ≈ √(k/d)(1 − 1/(4k)) to 0.1 %
    assert abs(base / math.sqrt(k / d) - 1) < 0.03
    assert abs(base / (math.sqrt(k / d) * (1 - 1 / (4 * k))) - 1) < 0.001


def test_baseline_closed_forms():
    assert random_fraction_baseline(1, 2) == pytest.approx(2 / math.pi)  # E|cos θ|, circle
    assert random_fraction_baseline(1, 3) == pytest.approx(0.5)  # E|z| on the 2-sphere
    assert random_fraction_baseline(2, 3) == pytest.approx(math.pi / 4)  # E √(1 − z²)
    assert random_fraction_baseline(7, 7) == 1.0 and random_fraction_baseline(0, 5) == 0.0
    with pytest.raises(ValueError, match="0 <= k <= d"):
        random_fraction_baseline(5, 3)
    with pytest.raises(TypeError):
        random_fraction_baseline(2.5, 10)


# -------------------------------------------------------------------------- from_basis


def test_from_basis_rank_revealing():
    g = gen(9)
    a = torch.randn(2, 6, dtype=F64, generator=g)
    # one point in ℝ⁶; columns 0, a₀, 2a₀, a₁: the zero first column defeats the diagonal of
    # an unpivoted R, the SVD of R does not
    cols = torch.stack([torch.zeros(6, dtype=F64), a[0], 2 * a[0], a[1]], dim=1)[None]
    T = TangentSpace.from_basis(cols, columns=True)
    assert T.dim.tolist() == [2] and T.basis.shape == (1, 4, 6)
    assert_orthonormal_rows(T)
    torch.testing.assert_close(T.project(a[:1]), a[:1], rtol=0, atol=1e-12)
    torch.testing.assert_close(T.project(a[1:]), a[1:], rtol=0, atol=1e-12)
    assert T.basis[0, 2:].abs().max() == 0  # masked rows are zero
    assert TangentSpace(T.basis).dim.tolist() == [2]  # without a mask: the nonzero rows
    rows = TangentSpace.from_basis(cols.mT)
    torch.testing.assert_close(rows.basis, T.basis)  # deterministic: same input, same basis
    loose = TangentSpace.from_basis(cols + 1e-9 * torch.randn(1, 6, 4, generator=g, dtype=F64),
                                    columns=True, rtol=1e-6)
    assert loose.dim.tolist() == [2]


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 4),
    d=st.integers(1, 8),
    k=st.integers(1, 6),
    rank=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_from_basis_spans_the_input(n, d, k, rank, seed):
    g = gen(seed)
    rank = min(rank, k, d)
    vectors = torch.randn(n, k, rank, dtype=F64, generator=g) @ torch.randn(
        n, rank, d, dtype=F64, generator=g
    )
    T = TangentSpace.from_basis(vectors.reshape(n, k, d, 1))
    assert T.input_shape == (d, 1) and T.basis.shape == (n, min(k, d), d)
    assert T.dim.tolist() == [rank] * n
    assert_orthonormal_rows(T, atol=1e-12)
    for j in range(k):
        torch.testing.assert_close(T.project(vectors[:, j]), vectors[:, j], rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- local PCA


def test_local_pca_recovers_noisy_subspace():
    k, d, num = 3, 20, 400
    g = gen(10)
    truth = orthonormal(k, d, seed=11)
    points = torch.randn(num, k, dtype=F64, generator=g) @ truth
    points = points + 0.01 * torch.randn(num, d, dtype=F64, generator=g)
    est = TangentSpace.local_pca(points, k, n_neighbors=30)
    assert est.basis.shape == (num, k, d) and est.dim.tolist() == [k] * num
    assert_orthonormal_rows(est)
    angles = principal_angles(est, TangentSpace(truth.expand(num, k, d)))
    assert angles.max() < 0.1
    at = torch.randn(5, k, dtype=F64, generator=g) @ truth  # queries not among the points
    est_at = TangentSpace.local_pca(points, k, n_neighbors=30, at=at, chunk_size=2)
    assert len(est_at) == 5
    assert principal_angles(est_at, TangentSpace(truth.expand(5, k, d))).max() < 0.1


def test_local_pca_images_and_bad_inputs():
    pts = torch.randn(40, 2, 3, dtype=F64, generator=gen(12))
    T = TangentSpace.local_pca(pts, 2)
    assert T.input_shape == (2, 3) and T.basis.shape == (40, 2, 6)
    with pytest.raises(ValueError, match=r"n_neighbors must be in \[k \+ 1"):
        TangentSpace.local_pca(pts, 2, n_neighbors=2)
    with pytest.raises(ValueError, match=r"k must be in \[1, d\]"):
        TangentSpace.local_pca(pts, 7)
    with pytest.raises(ValueError, match=r"at must be shaped \(m, \*point_shape\)"):
        TangentSpace.local_pca(pts, 2, at=torch.randn(3, 6, dtype=F64))


# ------------------------------------------------------------------------ principal angles


def test_principal_angles_identity_and_orthogonal():
    basis = orthonormal(5, 9)
    a = TangentSpace(basis[:3].expand(2, 3, 9))
    b = TangentSpace.from_basis(torch.randn(2, 3, 3, dtype=F64, generator=gen(13)) @ basis[:3])
    assert principal_angles(a, b).abs().max() < 1e-12  # same span, other basis
    c = TangentSpace(basis[3:].expand(2, 2, 9))
    torch.testing.assert_close(principal_angles(a, c), torch.full((2, 2), math.pi / 2,
                                                                  dtype=F64))
    # small angles are accurate (arcsin of the residual, not arccos ≈ √(2ε))
    rot = basis[:3].clone()
    rot[0] = math.cos(1e-9) * basis[0] + math.sin(1e-9) * basis[4]
    ang = principal_angles(TangentSpace(rot[None]), TangentSpace(basis[None, :3]))
    torch.testing.assert_close(ang[0], torch.tensor([0, 0, 1e-9], dtype=F64), rtol=1e-6,
                               atol=1e-15)


def test_principal_angles_match_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    g = gen(14)
    va, vb = torch.randn(4, 3, 8, dtype=F64, generator=g), torch.randn(4, 5, 8, dtype=F64,
                                                                       generator=g)
    got = principal_angles(TangentSpace.from_basis(va), TangentSpace.from_basis(vb))
    assert got.shape == (4, 3)
    assert (got.diff(dim=1) >= 0).all()  # ascending
    for i in range(4):
        ref = sorted(linalg.subspace_angles(va[i].T.numpy(), vb[i].T.numpy()))
        torch.testing.assert_close(got[i], torch.tensor(ref, dtype=F64), rtol=1e-10, atol=1e-12)
    # masks: a rank-2 set in 3 rows has 2 angles, the third is NaN
    va2 = va.clone()
    va2[:, 2] = va2[:, 0] + va2[:, 1]
    masked = principal_angles(TangentSpace.from_basis(va2), TangentSpace.from_basis(vb))
    assert torch.isnan(masked[:, 2]).all()
    for i in range(4):
        ref = sorted(linalg.subspace_angles(va2[i, :2].T.numpy(), vb[i].T.numpy()))
        torch.testing.assert_close(masked[i, :2], torch.tensor(ref, dtype=F64), rtol=1e-10,
                                   atol=1e-12)
    swapped = principal_angles(TangentSpace.from_basis(vb), TangentSpace.from_basis(va2))
    torch.testing.assert_close(swapped, masked, equal_nan=True, rtol=1e-10, atol=1e-12)


def test_principal_angles_bad_inputs():
    a = TangentSpace(orthonormal(2, 5).expand(3, 2, 5))
    with pytest.raises(ValueError, match=r"\(n, d\) = \(3, 5\) vs \(2, 5\)"):
        principal_angles(a, TangentSpace(orthonormal(2, 5).expand(2, 2, 5)))
    with pytest.raises(TypeError):
        principal_angles(a, a.basis)


# ---------------------------------------------------------------------------- from_model


def test_from_model_linear_softmax():
    torch.manual_seed(0)
    d, c = 7, 4
    model = nn.Linear(d, c).double().eval()
    x = torch.randn(5, d, dtype=F64, generator=gen(15))
    T = TangentSpace.from_model(model, x)
    assert T.dim.tolist() == [c - 1] * 5 and T.input_shape == (d,)
    assert_orthonormal_rows(T)
    w = model.weight.detach()
    for i in range(c):
        for j in range(i + 1, c):
            diff = (w[i] - w[j]).expand(5, d)
            torch.testing.assert_close(T.project(diff), diff, rtol=0, atol=1e-12)
    perp = torch.randn(5, d, dtype=F64, generator=gen(16))
    perp = perp - T.project(perp)
    assert (perp @ (w[0] - w[1])).abs().max() < 1e-12


# --------------------------------------------------------------------------- bad inputs


def test_constructor_and_vector_checks():
    T = TangentSpace.from_basis(torch.randn(2, 2, 3, 4, dtype=F64, generator=gen(17)))
    assert T.input_shape == (3, 4) and "TangentSpace(n=2, k=2, d=12" in repr(T)
    with pytest.raises(ValueError, match=r"\(n, \*input_shape\) = \(2, 3, 4\)"):
        T.project(torch.randn(2, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"\(n, \*input_shape\) = \(2, 3, 4\)"):
        T.fraction(torch.randn(3, 12, dtype=F64))
    assert T.project(torch.randn(2, 12, dtype=F64)).shape == (2, 12)  # flat accepted
    v = torch.randn(2, 3, 4, dtype=F64)
    v[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"v contains NaN values \(samples \[1\]\)"):
        T.fraction(v)
    v[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"Inf values \(samples \[1\]\)"):
        T.project(v)
    with pytest.raises(ValueError, match=r"basis must be shaped \(n, k, d\)"):
        TangentSpace(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor shaped \(n, k\)"):
        TangentSpace(torch.randn(2, 2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="input_shape"):
        TangentSpace(torch.randn(2, 2, 6), input_shape=(2, 2))
    with pytest.raises(ValueError, match="batched on the first axis"):
        TangentSpace.from_basis(torch.randn(2, 3))


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    n=st.integers(1, 3),
)
def test_wrong_vector_shapes_raise(shape, n):
    T = TangentSpace(orthonormal(1, 6).expand(2, 1, 6), input_shape=(2, 3))
    v = torch.randn(n, *shape, dtype=F64)
    ok = n == 2 and tuple(shape) in ((2, 3), (6,))
    if ok:
        assert T.fraction(v).shape == (2,)
    else:
        with pytest.raises(ValueError, match=r"\(2, 2, 3\) \(or flat \(2, 6\)\)"):
            T.project(v)
