"""Tests for the normalizing-flow figures in manifoldlens.viz, with small stand-in flows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from manifoldlens.viz import (
    BLUE,
    RED,
    flow_density_2d,
    flow_volume_change,
    interpolation_strips,
    sample_grid,
)

LOG_2PI = math.log(2 * math.pi)


class _Recorder:
    """Remembers the largest batch, the dtypes and the train flags each flow saw."""

    def reset(self):
        for k in ("max_batch", "points", "dtypes", "modes"):
            self.__dict__.pop(k, None)
        return self

    def _seen(self, x: torch.Tensor) -> None:
        self.max_batch = max(getattr(self, "max_batch", 0), len(x))
        self.points = getattr(self, "points", 0) + len(x)
        self.dtypes = getattr(self, "dtypes", set()) | {x.dtype}
        self.modes = getattr(self, "modes", set()) | {self.training}


class AffineFlow(_Recorder, nn.Module):
    """z = (x − b) · exp(−s): x ~ N(b, diag(exp(2s))), log|det ∂z/∂x| = −Σ s."""

    def __init__(self, b=(0.5, -1.0), s=(0.3, -0.2)):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(b))
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self, x):
        self._seen(x)
        return (x - self.b) * torch.exp(-self.s), (-self.s.sum()).expand(len(x))

    def decode(self, z):
        self._seen(z)
        return z * torch.exp(self.s) + self.b

    def log_prob(self, x):
        z, ld = self(x)
        return -0.5 * (z**2).sum(1) - LOG_2PI + ld


class AsinhFlow(_Recorder, nn.Module):
    """z = c · asinh(x), no parameters: log|det ∂z/∂x| = Σ log(c / √(1 + x²)), positive near
    the origin (the generator x = sinh(z / c) contracts there), negative far out."""

    def __init__(self, c: float = 2.0):
        super().__init__()
        self.c = c

    def forward(self, x):
        self._seen(x)
        ld = (math.log(self.c) - 0.5 * torch.log1p(x**2)).sum(1)
        return self.c * torch.asinh(x), ld

    def decode(self, z):
        self._seen(z)
        return torch.sinh(z / self.c)

    def log_prob(self, x):
        z, ld = self(x)
        return -0.5 * (z**2).sum(1) - LOG_2PI + ld


def _data(flow, n: int = 500, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = next(flow.parameters()).dtype
    with torch.no_grad():
        return flow.decode(torch.randn(n, 2, generator=g, dtype=dtype))


def _panels(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _colorbars(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _box_6sigma(flow: AffineFlow):
    b, sd = flow.b.detach().double(), flow.s.detach().double().exp()
    return (float(b[0] - 6 * sd[0]), float(b[0] + 6 * sd[0]),
            float(b[1] - 6 * sd[1]), float(b[1] + 6 * sd[1]))


def test_density_panels_share_limits_and_default_box(figs):
    flow = AffineFlow()
    data = _data(flow)
    fig = flow_density_2d(flow, data, grid=40, samples=_data(flow, 300, seed=1))
    figs.append(fig)
    assert isinstance(fig, Figure)
    panels = _panels(fig)
    assert len(panels) == 3 and len(_colorbars(fig)) == 1
    assert len(panels[1].images) == 1
    lo, hi = data.double().min(0).values.numpy(), data.double().max(0).values.numpy()
    pad = 0.1 * (hi - lo)
    for ax in panels:
        np.testing.assert_allclose(ax.get_xlim(), (lo[0] - pad[0], hi[0] + pad[0]), rtol=1e-6)
        np.testing.assert_allclose(ax.get_ylim(), (lo[1] - pad[1], hi[1] + pad[1]), rtol=1e-6)
        assert ax.get_aspect() == 1.0
    two = flow_density_2d(flow, data.numpy(), grid=20, title="no samples")
    figs.append(two)
    assert len(_panels(two)) == 2
    assert two.get_suptitle() == "no samples"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_density_integral_near_one_over_6_sigma(figs, dtype):
    flow = AffineFlow().to(dtype)
    fig = flow_density_2d(flow, _data(flow), bounds=_box_6sigma(flow), grid=200)
    figs.append(fig)
    assert isinstance(fig.density_integral, float)
    assert abs(fig.density_integral - 1.0) < 0.02
    assert f"∫p ≈ {fig.density_integral:.3f}" in _panels(fig)[1].get_title()
    assert flow.dtypes == {dtype}


def test_density_integral_detects_a_box_missing_mass(figs):
    flow = AffineFlow(b=(0.0, 0.0), s=(0.0, 0.0))
    fig = flow_density_2d(flow, _data(flow), bounds=(0, 6, -6, 6), grid=100)
    figs.append(fig)
    assert fig.density_integral == pytest.approx(0.5, abs=0.01)  # half the Gaussian


def test_density_image_is_exp_log_prob_at_cell_centres(figs):
    flow = AffineFlow(b=(1.0, -0.5), s=(0.4, -0.3)).double()
    box, grid = (-2.0, 4.0, -3.0, 1.0), 30
    fig = flow_density_2d(flow, _data(flow), bounds=box, grid=grid)
    figs.append(fig)
    img = np.asarray(_panels(fig)[1].images[0].get_array())
    assert img.shape == (grid, grid)
    dx, dy = (box[1] - box[0]) / grid, (box[3] - box[2]) / grid
    for i, j in [(0, 0), (3, 17), (grid - 1, 5), (20, grid - 1)]:  # row i is y, column j is x
        x = torch.tensor([[box[0] + (j + 0.5) * dx, box[2] + (i + 0.5) * dy]], dtype=torch.float64)
        with torch.no_grad():
            expected = float(flow.log_prob(x).exp())
        assert img[i, j] == pytest.approx(expected, rel=1e-9)


def test_large_grids_are_chunked(figs):
    flow = AffineFlow()
    data = _data(flow)
    fig = flow_density_2d(flow.reset(), data, grid=300)
    figs.append(fig)
    assert flow.max_batch <= 4096
    assert flow.points == 300 * 300
    flow2 = AsinhFlow()
    figs.append(flow_volume_change(flow2, bounds=(-3, 3, -3, 3), grid=300, lines=25))
    assert flow2.max_batch <= 4096
    assert flow2.points == 300 * 300 + 2 * 25 * 200


def test_parameter_free_flow_runs_in_float32_and_integrates(figs):
    flow = AsinhFlow()  # heavy tails: z = ±6 is x = ±sinh(3) ≈ ±10
    fig = flow_density_2d(flow, torch.randn(200, 2), bounds=(-10.1, 10.1, -10.1, 10.1), grid=300)
    figs.append(fig)
    assert flow.dtypes == {torch.float32}
    assert abs(fig.density_integral - 1.0) < 0.02


def test_flows_are_evaluated_in_eval_mode_and_modes_restored(figs):
    flow = AffineFlow()
    data = _data(flow)
    flow.reset().train()
    figs.append(flow_density_2d(flow, data, grid=10))
    figs.append(flow_volume_change(flow, grid=10, lines=5))
    assert flow.modes == {False}
    assert flow.training


def test_volume_change_affine(figs):
    flow = AffineFlow(b=(0.5, -1.0), s=(0.3, -0.2)).double()
    lines = 7
    fig = flow_volume_change(flow, _data(flow), grid=50, lines=lines)
    figs.append(fig)
    ax, ax2 = _panels(fig)
    assert len(_colorbars(fig)) == 1
    assert len(ax.lines) == 2 * lines
    assert len(ax2.images) == 1
    # the latent axis z₂ = 0 (blue, drawn thick) is the horizontal line x₂ = b₂
    mid = ax.lines[lines // 2]
    np.testing.assert_allclose(mid.get_ydata(), -1.0, atol=1e-12)
    assert mid.get_color() == BLUE and ax.lines[lines + lines // 2].get_color() == RED
    assert mid.get_linewidth() > ax.lines[0].get_linewidth()
    img = np.asarray(ax2.images[0].get_array())
    np.testing.assert_allclose(img, -float(flow.s.detach().sum()), rtol=1e-12)
    vmin, vmax = ax2.images[0].get_clim()
    assert vmin == pytest.approx(-vmax)
    assert "contracts" in _colorbars(fig)[0].get_ylabel()


def test_volume_change_sign_convention(figs):
    flow = AsinhFlow(c=2.0)
    fig = flow_volume_change(flow, bounds=(-4, 4, -4, 4), grid=41, lines=9)
    figs.append(fig)
    ax2 = _panels(fig)[1]
    img = np.asarray(ax2.images[0].get_array())
    assert img[20, 20] == pytest.approx(2 * math.log(2.0), rel=1e-5)  # centre: contracts, > 0
    assert img[0, 0] < 0 and img[-1, -1] < 0  # corners: the generator expands volume
    assert ax2.collections  # the zero contour is drawn where the sign changes
    assert np.isclose(*(abs(v) for v in ax2.images[0].get_clim()))


def test_volume_change_without_data_uses_the_mapped_lines(figs):
    flow = AffineFlow(b=(10.0, 10.0), s=(0.0, 0.0))
    fig = flow_volume_change(flow, grid=20, lines=5)
    figs.append(fig)
    for ax in _panels(fig):
        x0, x1 = ax.get_xlim()
        assert x0 < 7 and x1 > 13 and x0 > 6 and x1 < 14  # [7, 13] padded by 10 %


def test_sample_grid_single_batch(figs):
    imgs = torch.rand(20, 1, 8, 8) * 1.4 - 0.2  # out of range: clipped
    fig = sample_grid(imgs, nrow=5, title="samples")
    figs.append(fig)
    (ax,) = fig.axes
    arr = np.asarray(ax.images[0].get_array(), dtype=float)
    assert arr.ndim == 2 and arr.shape == (4 * 10 + 2, 5 * 10 + 2)  # 4 rows of 5, 2 px gaps
    assert np.nanmin(arr) >= 0 and np.nanmax(arr) <= 1
    assert fig.get_suptitle() == "samples"


def test_sample_grid_temperature_blocks(figs):
    d = {1.0: torch.rand(8, 1, 6, 6), 0.5: torch.rand(8, 1, 6, 6), 0.7: torch.rand(8, 1, 6, 6)}
    fig = sample_grid(d)
    figs.append(fig)
    assert [ax.get_ylabel() for ax in fig.axes] == ["T = 0.5", "T = 0.7", "T = 1"]
    fig2 = sample_grid(d, temperatures=[1.0, 0.7])
    figs.append(fig2)
    assert [ax.get_ylabel() for ax in fig2.axes] == ["T = 1", "T = 0.7"]
    fig3 = sample_grid(torch.rand(2, 4, 3, 5, 5), temperatures=[0.6, 0.9])  # (T, n, C, H, W)
    figs.append(fig3)
    assert [ax.get_ylabel() for ax in fig3.axes] == ["T = 0.6", "T = 0.9"]


def test_sample_grid_rgb(figs):
    fig = sample_grid(torch.rand(6, 3, 5, 5, dtype=torch.float64), nrow=3)
    figs.append(fig)
    arr = np.asarray(fig.axes[0].images[0].get_array())
    assert arr.shape == (2 * 7 + 2, 3 * 7 + 2, 3)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        sample_grid(torch.rand(2, 2, 5, 5))


@pytest.mark.parametrize("channels", [1, 3])
def test_interpolation_strips(figs, channels):
    frames = torch.rand(3, 6, channels, 7, 7)
    fig = interpolation_strips(frames, labels=["a", "b", "c"], title="interp")
    figs.append(fig)
    axes = np.asarray(fig.axes).reshape(3, 6)
    assert all(len(ax.images) == 1 for ax in axes.flat)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["a", "b", "c"]
    assert axes[0, 0].get_title() == "start" and axes[0, -1].get_title() == "end"
    assert axes[0, 2].get_title() == "t = 0.40"
    for ax in axes[:, [0, -1]].flat:
        assert ax.spines["left"].get_linewidth() > axes[0, 1].spines["left"].get_linewidth()
    shape = (7, 7) if channels == 1 else (7, 7, 3)
    assert np.asarray(axes[1, 2].images[0].get_array()).shape == shape
    with pytest.raises(ValueError, match="labels"):
        interpolation_strips(frames, labels=["only one"])
