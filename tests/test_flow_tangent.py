"""Tangent spaces a flow gives: its decoder under torch.func, latent slices, principal
directions — against brute-force Jacobians (float64) and a linear NICE solved by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manifoldlens import flows
from manifoldlens.flows import layers as L
from manifoldlens.tangent import TangentSpace

DT = torch.float64
SHAPE = (1, 8, 8)  # the digits' shape
MAKE = {
    "nice": lambda: flows.NICE(SHAPE, couplings=4, hidden=16, depth=2),
    "realnvp": lambda: flows.RealNVP(SHAPE, scales=2, hidden_channels=8, blocks=1),
    "glow": lambda: flows.Glow(SHAPE, levels=2, depth=2, hidden_channels=8),
}


def _flow(name: str, dtype: torch.dtype = DT, n: int = 3):
    """A flow away from its identity-like initialisation (ActNorm initialised, every parameter
    perturbed), in eval mode, and n images in (0, 1)."""
    torch.manual_seed(0)
    flow = MAKE[name]().to(dtype)
    x = 0.1 + 0.8 * torch.rand(n, *SHAPE, dtype=dtype, generator=torch.Generator().manual_seed(1))
    flows.initialize(flow, x)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow.eval(), x


def _dense_jacobian(flow: flows.Flow, z: torch.Tensor) -> torch.Tensor:
    """∂decode/∂z (n, D, D) by reverse mode, one point at a time (the brute force)."""
    return torch.stack([
        torch.autograd.functional.jacobian(lambda v: flow.decode(v[None]).reshape(-1), zi)
        for zi in z])


def _projector_of_columns(cols: torch.Tensor) -> torch.Tensor:
    q = torch.linalg.qr(cols).Q
    return q @ q.mT


def _projector(t: TangentSpace) -> torch.Tensor:
    return t.basis.mT @ t.basis


@pytest.mark.parametrize("name", MAKE)
def test_a_flow_decoder_runs_under_forward_mode_vmap_in_channels_last_layout(name):
    flow, x = _flow(name, torch.float32)  # the default dtype and layout: the reported failure
    z = flow.encode(x)
    t = TangentSpace.from_decoder(flow.decode, z)  # a bijection: all of R^D
    assert t.dim.tolist() == [flow.dim] * len(x) and t.input_shape == SHAPE
    torch.testing.assert_close(flow.decode(z), x, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MAKE)
def test_slice_tangent_space_is_the_column_space_of_the_dense_jacobian(name):
    flow, x = _flow(name)
    z = flow.encode(x)
    torch.testing.assert_close(flow.decode(z), x, atol=1e-10, rtol=0)  # the round trip
    jac = _dense_jacobian(flow, z)
    g = torch.Generator().manual_seed(3)
    dims = torch.randperm(flow.dim, generator=g)[:5]
    rows = torch.linalg.qr(torch.randn(len(x), flow.dim, 4, dtype=DT, generator=g)).Q.mT
    for directions, v in [(dims, torch.eye(flow.dim, dtype=DT)[dims].expand(len(x), -1, -1)),
                          (rows, rows)]:
        dec = flows.LatentSlice(flow, z, directions)
        torch.testing.assert_close(dec(dec.origin), x, atol=1e-10, rtol=0)
        t = flows.tangent_space(flow, x, directions=directions)
        assert t.dim.tolist() == [v.shape[1]] * len(x) and t.input_shape == SHAPE
        torch.testing.assert_close(_projector(t), _projector_of_columns(jac @ v.mT),
                                   atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", MAKE)
def test_principal_directions_are_the_top_singular_vectors_of_the_dense_jacobian(name):
    flow, x = _flow(name, n=2)
    k = 4
    jac = _dense_jacobian(flow, flow.encode(x))
    u, s, vh = torch.linalg.svd(jac)
    assert bool((s[:, k - 1] > 1.01 * s[:, k]).all())  # a gap: the subspace is well defined
    v, sv = flows.principal_directions(flow, flow.encode(x), k)
    torch.testing.assert_close(sv, s[:, :k], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(v.mT @ v, vh[:, :k].mT @ vh[:, :k], atol=1e-8, rtol=0)
    t = flows.tangent_space(flow, x, k)
    torch.testing.assert_close(_projector(t), u[..., :k] @ u[..., :k].mT, atol=1e-8, rtol=0)


def _linear_nice(log_scale: torch.Tensor, seed: int = 0):
    """A NICE flow on R^4 whose coupling is linear: y_b = x_b + W x_a + c (W = W₂W₁), then
    ``z = y ⊙ exp(s)``; ``decode(z) = M (z ⊙ exp(−s)) − …`` with ``M = [[I, 0], [−W, I]]`` in
    (a = even, b = odd) coordinates."""
    torch.manual_seed(seed)
    net = L.mlp(2, 2, 3, 1, activation=nn.Identity, zero_init=False)
    flow = flows.Flow((4,), [L.AdditiveCoupling(net, split="alternating", parity=0),
                             L.DiagonalScaling((4,))], base="logistic").to(DT).eval()
    flow.steps[1].log_scale.data.copy_(log_scale)
    w = (net[2].weight @ net[0].weight).detach().to(DT)
    jac = torch.eye(4, dtype=DT)
    jac[1::2, 0::2] = -w  # x_b = y_b − W y_a
    return flow, jac @ torch.diag(torch.exp(-log_scale))


@settings(max_examples=20, deadline=None)
@given(st.sets(st.integers(0, 3), min_size=1, max_size=4), st.integers(0, 10))
def test_linear_nice_slices_have_the_analytic_tangent_space(dims, seed):
    flow, jac = _linear_nice(torch.tensor([0.3, -0.5, 1.0, 0.0], dtype=DT), seed)
    x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(seed))
    dims = sorted(dims)
    t = flows.tangent_space(flow, x, directions=dims)
    expected = _projector_of_columns(jac[:, dims]).expand(3, 4, 4)
    torch.testing.assert_close(_projector(t), expected, atol=1e-12, rtol=0)


def test_principal_directions_of_a_scaling_are_its_largest_scales():
    log_scale = torch.tensor([0.3, -0.5, 1.0, -2.0], dtype=DT)  # decode: z ⊙ exp(−s)
    flow = flows.NICE((4,), couplings=2, hidden=4, depth=1).to(DT).eval()  # couplings start at 0
    flow.steps[-1].log_scale.data.copy_(log_scale)
    x = torch.randn(2, 4, dtype=DT)
    v, s = flows.principal_directions(flow, flow.encode(x), 2)
    e = torch.eye(4, dtype=DT)
    torch.testing.assert_close(v, e[[3, 1]].expand(2, 2, 4))  # s = −2, then −0.5
    torch.testing.assert_close(s, torch.exp(torch.tensor([2.0, 0.5], dtype=DT)).expand(2, 2))
    t = flows.tangent_space(flow, x, 2)
    torch.testing.assert_close(_projector(t), torch.diag(torch.tensor([0., 1, 0, 1], dtype=DT))
                               .expand(2, 4, 4), atol=1e-12, rtol=0)


def test_chunks_give_the_same_spaces_and_the_flow_is_left_as_it_was():
    torch.manual_seed(0)
    flow = flows.Glow(SHAPE, levels=2, depth=1, hidden_channels=4).to(DT)  # train mode, fresh
    x = torch.rand(5, *SHAPE, dtype=DT)
    coarse = flow.latent_scales()[-1]
    whole = flows.tangent_space(flow, x, directions=coarse, chunk_size=10_000)
    for chunk in (1, 40):  # one point, one direction at a time; one point with 40 of 64
        part = flows.tangent_space(flow, x, directions=coarse, chunk_size=chunk)
        torch.testing.assert_close(_projector(part), _projector(whole), atol=1e-10, rtol=0)
    torch.testing.assert_close(_projector(flows.tangent_space(flow, x, 3, chunk_size=40)),
                               _projector(flows.tangent_space(flow, x, 3)), atol=1e-10, rtol=0)
    assert flow.training  # the mode is restored; ActNorm was not initialised from x
    assert not any(bool(m.initialized) for m in flow.modules() if isinstance(m, L.ActNorm))


def test_latent_scales_tile_the_latent_finest_first():
    glow = flows.Glow(SHAPE, levels=2, depth=1, hidden_channels=4)
    assert glow.latent_scales() == [slice(0, 32), slice(32, 64)]
    nvp = flows.RealNVP(SHAPE, scales=3, hidden_channels=4, blocks=1)
    assert nvp.latent_scales() == [slice(0, 32), slice(32, 48), slice(48, 64)]
    assert flows.NICE(SHAPE, hidden=4, depth=1).latent_scales() == [slice(0, 64)]


def test_bad_arguments_are_named_before_any_work():
    flow, x = _flow("nice", n=2)
    z = flow.encode(x)
    d = flow.dim
    with pytest.raises(ValueError, match=r"k, the manifold's dimension"):
        flows.tangent_space(flow, x)
    with pytest.raises(ValueError, match=rf"k must be in \[1, D\] = \[1, {d}\]"):
        flows.tangent_space(flow, x, d + 1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        flows.principal_directions(flow, z, 0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        flows.tangent_space(flow, x, 2, chunk_size=0)
    with pytest.raises(ValueError, match="k = 3 does not match the 2 directions"):
        flows.tangent_space(flow, x, 3, directions=[0, 1])
    with pytest.raises(ValueError, match="distinct index"):
        flows.LatentSlice(flow, z, [1, 1])
    with pytest.raises(ValueError, match=rf"distinct index in \[0, {d}\)"):
        flows.LatentSlice(flow, z, [d])
    with pytest.raises(ValueError, match="orthonormal rows"):
        flows.LatentSlice(flow, z, 2 * torch.eye(d, dtype=DT)[:2])
    with pytest.raises(ValueError, match=rf"rows shaped \(k, {d}\)"):
        flows.LatentSlice(flow, z, torch.eye(3, dtype=DT))
    with pytest.raises(ValueError, match=rf"z0 must be latent codes shaped \(n, {d}\)"):
        flows.LatentSlice(flow, z[:, :3], [0])
    with pytest.raises(TypeError, match="flow must be a manifoldlens.flows.Flow"):
        flows.tangent_space(nn.Linear(2, 2), x, 1)
    dec = flows.LatentSlice(flow, z, [0, 5])
    with pytest.raises(ValueError, match=r"decodes t shaped \(2, 2\)"):
        dec(dec.origin[:1])


def test_bits_per_dim_is_an_evaluation_unless_asked_for_gradients():
    import warnings

    torch.manual_seed(0)
    flow = flows.Glow((1, 4, 4), levels=2, depth=1, hidden_channels=8)
    x = torch.randint(0, 17, (32, 1, 4, 4), generator=torch.Generator().manual_seed(0)) / 16
    flows.initialize(flow, flows.dequantize(x, 17))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bpd = flows.bits_per_dim(flow, x, 17)
        assert not bpd.requires_grad and math.isfinite(float(bpd.mean()))
    with pytest.raises(ValueError, match="differentiable must be True or False"):
        flows.bits_per_dim(flow, x, 17, differentiable=1)
    with pytest.raises(ValueError, match="n_bins must be an integer >= 2"):
        flows.bits_per_dim(flow, x, 1, dequantize_input=False)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    y = flows.dequantize(x, 17, generator=g)
    before = float(flows.bits_per_dim(flow, y, 17, dequantize_input=False).mean())
    for _ in range(30):
        loss = flows.bits_per_dim(flow, y, 17, dequantize_input=False, differentiable=True)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    after = float(flows.bits_per_dim(flow, y, 17, dequantize_input=False).mean())
    assert after < before - 0.3
