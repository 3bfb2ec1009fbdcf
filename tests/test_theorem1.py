"""Bordt et al., Theorem 1 (Appendix C, Figure 8): the curve, its exact tangent spaces, the
maximum-margin network of the proof, and the simulation with a trained two-layer ReLU net."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manifoldlens.attribution import explain
from manifoldlens.cli import main
from manifoldlens.theorem1 import (
    ACROSS,
    ALONG,
    curve_vertices,
    max_margin_network,
    sample_curve,
    simulate,
)


def _segments(d):
    v = curve_vertices(d)
    return v, v[1:] - v[:-1]


@pytest.mark.parametrize("d", range(2, 10))
def test_curve_is_closed_half_along_e1_half_orthogonal_and_spans_the_space(d):
    v, seg = _segments(d)
    assert v.dtype == torch.float64 and torch.equal(v[0], v[-1])
    assert v[0].tolist() == [-0.5] + [0.0] * (d - 1)
    along = seg[:, 1:].abs().amax(1) == 0  # only x₁ changes
    across = seg[:, 0] == 0  # x₁ fixed: orthogonal to e₁
    assert bool((along ^ across).all())  # every segment is one kind or the other
    length = torch.linalg.vector_norm(seg, dim=1)
    target = d - 1 + math.sqrt(d - 1)  # each kind's total length
    assert math.isclose(float(length[along].sum()), target, rel_tol=1e-12)
    assert math.isclose(float(length[across].sum()), target, rel_tol=1e-12)
    assert int(torch.linalg.matrix_rank(v)) == d  # in no proper subspace
    assert len({tuple(p) for p in v[:-1].tolist()}) == len(v) - 1  # no corner visited twice


def _expected_share(d, eps):
    """Share of 𝒟ₓ on e₁-segments: each segment's length with |x₁| < eps cut out."""
    v, seg = _segments(d)
    lo = torch.minimum(v[:-1, 0], v[1:, 0])
    hi = torch.maximum(v[:-1, 0], v[1:, 0])
    cut = (torch.minimum(hi, torch.tensor(eps)) - torch.maximum(lo, torch.tensor(-eps))).clamp(0)
    along = seg[:, 1:].abs().amax(1) == 0
    length = torch.linalg.vector_norm(seg, dim=1)
    kept = torch.where(along, length - cut, length)
    return float(kept[along].sum() / kept.sum())


@pytest.mark.parametrize("d", [2, 5, 10])
def test_samples_lie_on_the_curve_with_their_tangents_and_labels(d):
    s = sample_curve(20_000, d, eps=0.05, seed=1, dtype=torch.float64)
    assert s.x.shape == (20_000, d) and len(s) == 20_000
    assert bool((s.x[:, 0].abs() >= 0.05).all())
    assert torch.equal(s.labels, (s.x[:, 0] > 0).long())
    torch.testing.assert_close(torch.linalg.vector_norm(s.tangent, dim=1),
                               torch.ones(20_000, dtype=torch.float64))
    assert bool((s.tangent[s.along_first, 0].abs() == 1).all())
    assert bool((s.tangent[~s.along_first, 0] == 0).all())
    v, seg = _segments(d)  # each point is on a segment: x − v_i ∥ seg_i, within it
    rel = s.x[:, None, :] - v[None, :-1]
    t = (rel * seg).sum(-1) / (seg * seg).sum(-1)
    dist = torch.linalg.vector_norm(rel - t[..., None] * seg, dim=-1)
    dist = torch.where((t >= -1e-12) & (t <= 1 + 1e-12), dist, torch.full_like(dist, math.inf))
    assert float(dist.amin(1).max()) < 1e-12
    p = _expected_share(d, 0.05)
    share = float(s.along_first.double().mean())
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / 20_000)


def test_theorem_share_exceeds_049_for_small_eps():
    for d in range(2, 30):
        assert _expected_share(d, 1e-3) > 0.49


@pytest.mark.parametrize("d", [2, 3, 8])
def test_max_margin_network_has_a_constant_gradient_along_e1(d):
    eps = 0.05
    net = max_margin_network(d, eps)
    s = sample_curve(500, d, eps=eps, seed=2, dtype=torch.float64)
    g = explain(net, s.x, "gradient", target=1)  # ∂(f/2)/∂x
    expected = torch.zeros(d, dtype=torch.float64)
    expected[0] = 1 / (4 * math.sqrt(1 + eps**2))
    torch.testing.assert_close(2 * g, expected.expand(500, d), rtol=1e-12, atol=1e-15)
    frac = s.tangent_space().fraction(g)
    assert torch.equal(frac, s.along_first.double())  # exactly 1 on e₁-segments, 0 elsewhere
    f = net.decision(s.x)
    y = 2 * s.labels.double() - 1
    margin = eps / (2 * math.sqrt(1 + eps**2))
    assert bool((y * f >= margin - 1e-15).all())  # zero test error, margin attained at ±ε
    edge = torch.zeros(2, d, dtype=torch.float64)
    edge[:, 0] = torch.tensor([eps, -eps], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor([1.0, -1.0], dtype=torch.float64) * net.decision(edge),
                               torch.full((2,), margin, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 8), eps=st.floats(0.01, 0.3), seed=st.integers(0, 2**16))
def test_max_margin_neurons_maximise_the_support_vector_objective(d, eps, seed):
    """Eq. (13): over (w, a, b) on the unit sphere, E_{p*}[y w φ(⟨a, x⟩ + b)] with p* = ½δ at
    (±ε, 0, …, 0) labelled ±1 is at most that of θ₀ (and θ₁): brute force over random θ."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(20_000, d + 2, generator=g, dtype=torch.float64)
    theta = theta / torch.linalg.vector_norm(theta, dim=1, keepdim=True)
    w, a1, b = theta[:, 0], theta[:, 1], theta[:, -1]
    value = w / 2 * (torch.relu(a1 * eps + b) - torch.relu(-a1 * eps + b))
    best = eps / (2 * math.sqrt(1 + eps**2))
    net = max_margin_network(d, eps)
    for j in range(2):  # θ₀ and θ₁ attain it (out weights are ½w of the measure ½δ + ½δ)
        w_j = 2 * float(net.out.weight[0, j].detach())
        a_j, b_j = float(net.hidden.weight[j, 0].detach()), float(net.hidden.bias[j].detach())
        assert math.isclose(w_j**2 + a_j**2 + b_j**2, 1.0, rel_tol=1e-12)
        v_j = w_j / 2 * (max(a_j * eps + b_j, 0) - max(-a_j * eps + b_j, 0))
        assert math.isclose(v_j, best, rel_tol=1e-12)
    assert float(value.max()) <= best + 1e-12


def test_validation_names_the_option():
    with pytest.raises(ValueError, match="d must be an integer >= 2"):
        curve_vertices(1)
    with pytest.raises(ValueError, match=r"eps must be in \[0, 0.5\)"):
        sample_curve(10, 3, eps=0.5)
    with pytest.raises(ValueError, match="width must be >= 1"):
        simulate(width=0)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        simulate(threshold=1.0)


def test_simulation_generalises_while_half_the_gradients_leave_the_tangent_space():
    res = simulate(d=4, n_train=300, n_test=300, width=64, steps=300, lr=1e-2,
                   fraction_every=100, seed=0)
    m = res.metrics
    assert m["test_accuracy"] == 1.0 and m["max_margin_accuracy"] == 1.0
    assert abs(m["share_in_tangent"] - m["share_along_first"]) <= 0.02
    assert 0.4 < m["share_along_first"] < 0.6
    assert m["mean_fraction_along_first"] > 0.9 and m["mean_fraction_orthogonal_segments"] < 0.2
    assert m["max_margin_share_in_tangent"] == m["share_along_first"]
    assert set(res.records) == {ALONG, ACROSS}
    for kind, records in res.records.items():
        assert [r["step"] for r in records] == [0, 100, 200, 300]
        assert (records[-1]["mean"] > 0.9) == (kind == ALONG)


def test_cli_theorem1(tmp_path, capsys):
    out = tmp_path / "t1"
    assert main(["manifold", "theorem1", "--d", "3", "--n-train", "200", "--n-test", "150",
                 "--width", "32", "--steps", "60", "--lr", "0.01", "--fraction-every", "30",
                 "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "run.json").read_text())
    m = doc["metrics"]
    assert sum(m["histogram"]["counts"]) == 150 and m["d"] == 3
    assert 0 <= m["share_in_tangent"] <= 1 and m["test_accuracy"] > 0.9
    assert {"theorem1.png", "fraction_over_training.png"} <= {p.name for p in out.glob("*.png")}
    arrays = np.load(out / "theorem1.npz")
    assert arrays["fractions"].shape == (150,) and arrays["tangent"].shape == (150, 3)
    with pytest.raises(SystemExit):  # argparse refuses d < 2 before anything runs
        main(["manifold", "theorem1", "--d", "1", "--out", str(tmp_path / "bad")])
    assert "--d: must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
