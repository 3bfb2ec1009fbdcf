"""Horizontal paths, leaf crossings and the involutivity residual (seed 001 §3–4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from manifoldlens import local_data_matrix, viz
from manifoldlens.foliation import horizontal_path, involutivity_residual, leaf_crossing_path

from helpers import TinyCNN, TinyMLP, make

F64 = torch.float64


def _linear(d=12, c=4, seed=0):
    return make(nn.Sequential(nn.Flatten(), nn.Linear(d, c)), seed)


def test_linear_model_converges_to_projection_on_source_leaf():
    """Leaves of a linear softmax model are the planes x0 + span{W_i − W_j}: the path ends at
    the projection of the target onto the source's leaf."""
    model = _linear()
    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 12, dtype=F64, generator=g)
    tgt = torch.randn(3, 12, dtype=F64, generator=g) * 2
    w = model[1].weight.detach()
    q, _ = torch.linalg.qr((w[1:] - w[0]).T)
    expected = src + (tgt - src) @ q @ q.T
    res = horizontal_path(model, src, tgt, step_size=0.05, max_steps=2000, tol=1e-9,
                          capped=True)
    torch.testing.assert_close(res.final, expected, atol=1e-9, rtol=0)
    assert res.status == ["stalled"] * 3 and not res.reached.any()
    # the path stays on the leaf: every point differs from the source by a vector in D
    off = (res.points - src) - (res.points - src) @ q @ q.T
    assert off.abs().max() < 1e-10
    # the distance to the target only decreases, down to ‖(I − P_D)(target − source)‖
    assert (res.distances.diff(dim=0) <= 1e-12).all()


def test_published_fixed_step_oscillates_within_alpha_of_the_projection():
    """Algorithm 1 as published (always a step of α): on a flat leaf the path ends within α
    of the target's projection, moving on, never stalling."""
    model = _linear()
    src = torch.randn(2, 12, dtype=F64)
    tgt = torch.randn(2, 12, dtype=F64) * 2
    w = model[1].weight.detach()
    q, _ = torch.linalg.qr((w[1:] - w[0]).T)
    expected = src + (tgt - src) @ q @ q.T
    res = horizontal_path(model, src, tgt, step_size=0.05, max_steps=600, tol=1e-9)
    assert res.status == ["max_steps"] * 2 and (res.steps == 600).all()
    assert ((res.final - expected).norm(dim=1) <= 0.05 + 1e-9).all()
    torch.testing.assert_close(res.length, torch.full((2,), 600 * 0.05, dtype=F64))


def test_target_on_the_leaf_is_reached():
    model = _linear()
    src = torch.randn(2, 12, dtype=F64)
    w = model[1].weight.detach()
    tgt = src + 3.0 * (w[2] - w[0]) - 1.5 * (w[3] - w[1])
    res = horizontal_path(model, src, tgt, step_size=0.1, max_steps=5000, tol=1e-6,
                          capped=True)
    assert res.reached.all() and res.status == ["reached", "reached"]
    assert (res.distances[-1] < 1e-6).all()
    torch.testing.assert_close(res.length, (tgt - src).norm(dim=1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("build,shape", [(lambda: make(TinyMLP(act=nn.Tanh)), (12,)),
                                         (lambda: make(TinyCNN()), (1, 6, 6))])
def test_every_step_lies_in_the_distribution(build, shape):
    """Measured independently: Δx_t lies in D_{x_t} (horizontal) and in ker G (crossing)."""
    model = build()
    g = torch.Generator().manual_seed(1)
    src = torch.randn(3, *shape, dtype=F64, generator=g)
    tgt = torch.randn(3, *shape, dtype=F64, generator=g)
    res = horizontal_path(model, src, tgt, step_size=0.05, max_steps=15, tol=1e-3)
    cross = leaf_crossing_path(model, src, steps=15, step_size=0.05, seed=3)
    for path, want in ((res, "D"), (cross, "ker")):
        assert (path.steps == 15).all()
        for t in range(15):
            x, dx = path.points[t], path.points[t + 1] - path.points[t]
            G = local_data_matrix(model, x)
            wrong = G.project_kernel(dx) if want == "D" else G.project(dx)
            ratio = wrong.reshape(3, -1).norm(dim=1) / dx.reshape(3, -1).norm(dim=1)
            assert ratio.max() < 1e-9, (want, t, ratio)
        assert path.residuals.abs().max() < 1e-9
    # crossing leaves keeps the prediction to second order: KL per step is O(α³) where the
    # model is smooth (the ReLU CNN's kinks break this at isolated steps)
    p = cross.probs
    kl = (p[1:] * (p[1:].log() - p[:-1].log())).sum(-1)
    assert kl.abs().median() < 1e-3 * 0.05**2
    if len(shape) == 1:  # tanh MLP
        assert kl.abs().max() < 1e-3 * 0.05**2
    torch.testing.assert_close(cross.length, torch.full((3,), 15 * 0.05, dtype=F64))


def test_batched_equals_one_at_a_time():
    model = make(TinyMLP(act=nn.ReLU))
    g = torch.Generator().manual_seed(2)
    src = torch.randn(4, 12, dtype=F64, generator=g)
    tgt = torch.randn(4, 12, dtype=F64, generator=g)
    tgt[1] = src[1] + 1e-3  # reached after one step: stops on its own
    batch = horizontal_path(model, src, tgt, step_size=0.1, max_steps=30, tol=0.05)
    assert batch.steps[1] <= 1 and batch.status[1] == "reached"
    for i in range(4):
        one = horizontal_path(model, src[i : i + 1], tgt[i : i + 1], step_size=0.1,
                              max_steps=30, tol=0.05)
        torch.testing.assert_close(one.final[0], batch.final[i])
        assert one.steps[0] == batch.steps[i] and one.status[0] == batch.status[i]


def test_clamp_and_record_every():
    model = make(TinyMLP(act=nn.ReLU))
    src = torch.rand(2, 12, dtype=F64)
    res = leaf_crossing_path(model, src, steps=40, step_size=0.2, clamp=(0.0, 1.0),
                             record_every=10)
    assert res.record_steps.tolist() == [0, 10, 20, 30, 40]
    assert res.points.shape == (5, 2, 12) and res.probs.shape == (5, 2, 4)
    assert res.points.min() >= 0 and res.points.max() <= 1


class _NanBeyond(nn.Module):
    """ReLU MLP that returns NaN where the first input coordinate exceeds 1."""

    def __init__(self, nan_gradients: bool = False):
        super().__init__()
        self.net = make(TinyMLP(act=nn.ReLU))
        self.nan_gradients = nan_gradients

    def forward(self, x):
        out = self.net(x)
        if self.nan_gradients:  # where() backpropagates 0·NaN = NaN to every sample
            return torch.where(x[:, :1] > 1.0, out * float("nan"), out)
        nan = torch.where(x[:, :1] > 1.0, float("nan"), 0.0)
        return out + nan.to(out)


def test_nonfinite_stops_that_path_only():
    model = _NanBeyond().eval()
    src = torch.zeros(2, 12, dtype=F64)
    direction = torch.zeros(2, 12, dtype=F64)
    direction[0, 0] = 1.0  # x0 grows by α‖P_ker e0‖ > 0 each step: path 0 runs into NaN
    direction[1, 1] = 1.0
    res = leaf_crossing_path(model, src, direction=direction, steps=200, step_size=0.1)
    assert res.status == ["nonfinite", "max_steps"]
    assert res.steps[1] == 200 and 0 < res.steps[0] < 200
    assert torch.isfinite(res.points).all() and torch.isfinite(res.probs).all()
    assert 0.9 < res.final[0, 0] <= 1.0
    with pytest.raises(ValueError, match="NaN"):
        leaf_crossing_path(model, src + 2.0, steps=1)
    # NaN Jacobians (not outputs) stop the paths too, with the points kept
    broken = _NanBeyond(nan_gradients=True).eval()
    res = leaf_crossing_path(broken, src, direction=direction, steps=5, step_size=0.1)
    assert res.status == ["nonfinite", "nonfinite"] and torch.equal(res.final, src)


def _interrupt_after(model, calls):
    """A forward hook that interrupts the model's ``calls + 1``-th forward pass (the model
    itself, and so its fingerprint, stays the same)."""
    count = {"n": 0}

    def hook(module, args):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt

    return model.register_forward_pre_hook(hook)


def test_resume_after_interruption(tmp_path):
    model = make(TinyMLP(act=nn.Tanh))
    g = torch.Generator().manual_seed(4)
    src = torch.randn(2, 12, dtype=F64, generator=g)
    tgt = torch.randn(2, 12, dtype=F64, generator=g)
    kw = dict(step_size=0.05, max_steps=40, tol=1e-4, record_every=5)
    full = horizontal_path(model, src, tgt, **kw)
    handle = _interrupt_after(model, 25)
    with pytest.raises(KeyboardInterrupt):
        horizontal_path(model, src, tgt, checkpoint_dir=tmp_path, checkpoint_every=10, **kw)
    handle.remove()
    resumed = horizontal_path(model, src, tgt, checkpoint_dir=tmp_path, checkpoint_every=10,
                              **kw)
    torch.testing.assert_close(resumed.points, full.points)
    assert resumed.record_steps.tolist() == full.record_steps.tolist()
    with pytest.raises(ValueError, match="different"):
        horizontal_path(model, src, tgt + 1, checkpoint_dir=tmp_path, **kw)


def test_bad_inputs():
    model = _linear()
    with pytest.raises(ValueError, match="same shape"):
        horizontal_path(model, torch.zeros(2, 12), torch.zeros(3, 12))
    with pytest.raises(ValueError, match="step_size"):
        leaf_crossing_path(model, torch.zeros(2, 12), step_size=0)
    with pytest.raises(ValueError, match="clamp"):
        leaf_crossing_path(model, torch.zeros(2, 12), clamp=(1, 0))


@pytest.mark.parametrize("build,shape", [(lambda: make(TinyMLP(act=nn.ReLU)), (12,)),
                                         (lambda: make(TinyCNN()), (1, 6, 6))])
def test_involutive_for_relu_networks(build, shape):
    model = build()
    x = torch.randn(4, *shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    res = involutivity_residual(model, x)
    assert res.residual.shape == (4, len(res.pairs))
    finite = res.residual[torch.isfinite(res.residual)]
    assert finite.numel() > 0 and finite.max() < 1e-8


@pytest.mark.parametrize("act", [nn.Tanh, nn.Softplus])
def test_not_involutive_for_smooth_networks(act):
    model = make(TinyMLP(act=act))
    x = torch.randn(4, 12, dtype=F64, generator=torch.Generator().manual_seed(6))
    res = involutivity_residual(model, x, pairs=[(0, 1), (1, 2), (0, 3)])
    assert res.residual.median() > 1e-3
    assert (res.max > 1e-2).all()


def test_involutivity_bracket_against_autograd_hessians():
    """[X_i, X_j] = H_j X_i − H_i X_j checked with dense Hessians on a tiny tanh network."""
    model = make(TinyMLP(d=5, c=3, hidden=6, act=nn.Tanh))
    x = torch.randn(1, 5, dtype=F64)
    res = involutivity_residual(model, x, pairs=[(0, 2)])
    f = [lambda z, k=k: torch.log_softmax(model(z[None])[0], -1)[k] for k in range(3)]
    grads = [torch.autograd.functional.jacobian(fk, x[0]) for fk in f]
    hess = [torch.autograd.functional.hessian(fk, x[0]) for fk in f]
    bracket = hess[2] @ grads[0] - hess[0] @ grads[2]
    torch.testing.assert_close(res.bracket_norm[0, 0], bracket.norm())
    G = local_data_matrix(model, x)
    ref = G.project_kernel(bracket[None]).norm() / bracket.norm()
    torch.testing.assert_close(res.residual[0, 0], ref)


def test_records_hold_the_model_at_the_recorded_points():
    model = make(TinyMLP(act=nn.Tanh))
    g = torch.Generator().manual_seed(8)
    src = torch.randn(3, 12, dtype=F64, generator=g)
    tgt = torch.randn(3, 12, dtype=F64, generator=g)
    q, _ = local_data_matrix(model, src[:1]).basis()
    tgt[0] = src[0] + 0.2 * q[0, 0]  # along its leaf: stops early, its records stay current
    res = horizontal_path(model, src, tgt, step_size=0.05, max_steps=23, tol=0.02,
                          record_every=4)
    assert res.status[0] == "reached" and 3 <= res.steps[0] < 8
    assert res.record_steps.tolist() == [0, 4, 8, 12, 16, 20, 23]
    with torch.no_grad():
        ref = torch.softmax(model(res.points.reshape(-1, 12)), -1).reshape(res.probs.shape)
    torch.testing.assert_close(res.probs, ref)
    torch.testing.assert_close(res.distances, (tgt - res.points).norm(dim=-1))


def test_clamp_that_cancels_the_step_stalls():
    model = nn.Linear(2, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        model.bias.zero_()
    src = torch.ones(1, 2, dtype=F64)
    res = horizontal_path(model, src, torch.full((1, 2), 5.0, dtype=F64), clamp=(0.0, 1.0),
                          max_steps=50, tol=1e-3)
    assert res.status == ["stalled"] and res.steps[0] == 0 and res.length[0] == 0


def test_strip_and_gif(tmp_path):
    model = make(TinyCNN())
    x = torch.rand(2, 1, 6, 6, dtype=F64)
    res = leaf_crossing_path(model, x, steps=6, step_size=0.05, record_every=2)
    fig = viz.plot_path_strip(res, 1, frames=4, classes=list("abcde"), title="t")
    assert len(fig.axes) == 4
    assert "step 6" in fig.axes[-1].get_title()
    gif = viz.save_path_gif(res, tmp_path / "p.gif", i=0, frames=4, fps=4)
    assert gif.read_bytes()[:6] in (b"GIF89a", b"GIF87a")
