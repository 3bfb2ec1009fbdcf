"""Projection onto the data leaf and denoising (manifoldlens.denoise) against known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from manifoldlens.denoise import (
    denoise_flow,
    denoise_leaf,
    denoise_vae,
    leaf_projection,
    nearest_neighbours,
    psnr,
)
from manifoldlens.flows import Glow


def test_psnr_known_values():
    clean = torch.zeros(2, 1, 2, 2)
    noisy = torch.stack([torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), 0.01)])
    assert psnr(noisy, clean).tolist() == pytest.approx([20.0, 40.0])
    assert math.isinf(float(psnr(clean, clean)[0]))
    assert float(psnr(noisy[:1], clean[:1], peak=255.0)) == pytest.approx(20 + 20 * math.log10(255))
    with pytest.raises(ValueError, match="shape"):
        psnr(noisy, clean[:1])


def test_nearest_neighbours_against_brute_force():
    x, ref = torch.randn(7, 3, 2), torch.randn(11, 3, 2)
    d, i = nearest_neighbours(x, ref, 3, batch_size=2)
    full = torch.cdist(x.reshape(7, -1), ref.reshape(11, -1))
    want = full.sort(dim=1)
    assert torch.equal(i, want.indices[:, :3]) and torch.allclose(d, want.values[:, :3])
    with pytest.raises(ValueError, match="exceeds"):
        nearest_neighbours(x, ref, 12)
    with pytest.raises(ValueError, match="shape"):
        nearest_neighbours(x, torch.randn(4, 6))


def _linear(d: int = 6, c: int = 3) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(3)
    model = nn.Linear(d, c).double().eval()
    W = model.weight.detach()
    Q = torch.linalg.qr((W[1:] - W[0]).T).Q  # orthonormal basis of D = span{W_i − W_0}
    return model, Q @ Q.T


def test_projection_of_a_linear_model_is_the_affine_projection():
    # leaves r + D are parallel planes: the projection of x on r's leaf is r + P_D(x − r)
    model, P = _linear()
    r = torch.randn(1, 6, dtype=torch.float64)
    x = r + torch.randn(4, 6, dtype=torch.float64)
    proj = leaf_projection(model, x, r, max_steps=400, step_size=0.2, stall_rtol=1e-9)
    want = r + (x - r) @ P
    assert torch.allclose(proj.point, want, atol=1e-6)
    assert torch.allclose(proj.distance, (x - want).norm(dim=1), atol=1e-6)
    assert torch.allclose(proj.start_distance, (x - r).norm(dim=1))
    assert set(proj.status) == {"stalled"} and proj.source.tolist() == [0] * 4


def test_kernel_noise_is_removed_exactly_for_a_linear_model():
    # seed 001's noise: a move on ker G; from the clean image, the projection undoes it
    model, P = _linear()
    clean = torch.eye(6, dtype=torch.float64)[:3] * 10  # far apart: each its noisy copy's
    noisy = clean + 0.5 * torch.randn(3, 6, dtype=torch.float64) @ (torch.eye(6) - P)
    ref = torch.cat([clean, clean + 5.0])  # nearest reference
    out = denoise_leaf(model, noisy, ref, clamp=None, max_steps=300, step_size=0.2,
                       stall_rtol=1e-9)
    assert torch.allclose(out, clean, atol=1e-6)
    assert bool((psnr(out, clean) > psnr(noisy, clean) + 60).all())


def test_the_nearest_of_several_neighbours_is_kept():
    model, P = _linear()
    x = torch.zeros(1, 6, dtype=torch.float64)
    off = torch.randn(6, dtype=torch.float64) @ (torch.eye(6) - P)  # a pure kernel direction
    off = off / off.norm()
    ref = torch.stack([0.5 * off, 0.3 * off + 0.1, 0.4 * off])  # nearest in pixels: row 1
    proj = leaf_projection(model, x, ref, neighbours=3, max_steps=300, step_size=0.1,
                           stall_rtol=1e-9)
    ends = [float(leaf_projection(model, x, ref[i:i + 1], max_steps=300, step_size=0.1,
                                  stall_rtol=1e-9).distance) for i in range(3)]
    assert float(proj.distance) == pytest.approx(min(ends), abs=1e-9)
    assert int(proj.source) == min(range(3), key=ends.__getitem__)


def test_reference_points_project_to_themselves(cnn):
    ref = torch.rand(5, 1, 6, 6, dtype=torch.float64)
    proj = leaf_projection(cnn, ref[1:4], ref, neighbours=2, max_steps=10)
    assert torch.equal(proj.point, ref[1:4]) and proj.source.tolist() == [1, 2, 3]
    assert proj.distance.tolist() == [0, 0, 0] and set(proj.status) == {"reached"}


def test_projection_validates_its_options(cnn):
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="neighbours"):
        leaf_projection(cnn, x, x, neighbours=0)
    with pytest.raises(ValueError, match="step_size"):
        leaf_projection(cnn, x, x, step_size=0.0)
    with pytest.raises(ValueError, match="neighbours|exceeds"):
        leaf_projection(cnn, x, x[:1], neighbours=2)


def test_flow_projection_round_trips_at_temperature_one_and_shrinks_below():
    torch.manual_seed(0)
    flow = Glow((1, 4, 4), levels=2, depth=1, hidden_channels=4).double().eval()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(denoise_flow(flow, x, temperature=1.0, clamp=None), x, atol=1e-8)
    mode = flow.decode(torch.zeros(1, 16, dtype=torch.float64)).detach()
    tiny = denoise_flow(flow, x, temperature=1e-6, clamp=None)
    assert torch.allclose(tiny, mode.expand_as(x), atol=1e-4)
    assert float(denoise_flow(flow, 5 * x).max()) <= 1.0
    with pytest.raises(ValueError, match="temperature"):
        denoise_flow(flow, x, temperature=1.5)


def test_vae_denoising_is_the_reconstruction():
    class AE(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.sigmoid(self.lin(x))

    ae, x = AE(), torch.rand(5, 4)
    assert torch.allclose(denoise_vae(ae, x, batch_size=2), ae(x).detach())
