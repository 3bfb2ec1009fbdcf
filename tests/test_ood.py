"""OOD scores and metrics against known answers (manifoldlens.ood)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from manifoldlens import ood
from manifoldlens.flows import Glow, bits_per_dim
from manifoldlens.information import local_data_matrix

from helpers import TinyMLP, make


def _normal(n: int, shift: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, n)


# ------------------------------------------------------------------------------ metrics


def test_identical_distributions_give_auroc_one_half():
    a, b = _normal(3000, 0.0, 1), _normal(3000, 0.0, 2)
    m = ood.ood_metrics(a, b, bootstrap=200)
    assert abs(m["auroc"] - 0.5) < 0.03
    assert m["auroc_ci"][0] < 0.5 < m["auroc_ci"][1]
    assert abs(m["aupr"] - 0.5) < 0.03  # the OOD share
    assert abs(m["fpr95"] - 0.95) < 0.02


def test_gaussian_shift_matches_closed_forms():
    d = 1.0
    a, b = _normal(6000, 0.0, 3), _normal(6000, d, 4)
    assert ood.auroc(a, b) == pytest.approx(norm.cdf(d / math.sqrt(2)), abs=0.015)
    # accept s ≤ Φ⁻¹(0.95): the OOD share accepted is Φ(Φ⁻¹(0.95) − d)
    assert ood.fpr_at_tpr(a, b) == pytest.approx(norm.cdf(norm.ppf(0.95) - d), abs=0.02)


def test_metrics_match_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 300).astype(float), rng.integers(2, 8, 200).astype(float)
    y, s = np.r_[np.zeros(300), np.ones(200)], np.r_[a, b]
    assert ood.auroc(a, b) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert ood.aupr(a, b) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_fpr_at_tpr_known_answers():
    assert ood.fpr_at_tpr([0, 1, 2], [5, 6]) == 0.0  # disjoint: nothing OOD accepted
    assert ood.fpr_at_tpr([5, 6], [0, 1, 2]) == 1.0
    assert ood.fpr_at_tpr(list(range(100)), [94.0, 95.0]) == 0.5  # t = 94
    assert ood.auroc([0.0], [1.0]) == 1.0 and ood.auroc([1.0], [0.0]) == 0.0


def test_bootstrap_interval_holds_the_estimate_and_shrinks():
    small = ood.ood_metrics(_normal(60, 0, 5), _normal(60, 1, 6), bootstrap=300, seed=1)
    large = ood.ood_metrics(_normal(2000, 0, 5), _normal(2000, 1, 6), bootstrap=300, seed=1)
    for m in (small, large):
        for k in ("auroc", "aupr", "fpr95"):
            lo, hi = m[f"{k}_ci"]
            assert lo <= m[k] <= hi
    width = lambda m: m["auroc_ci"][1] - m["auroc_ci"][0]  # noqa: E731
    assert width(large) < width(small) / 3
    assert ood.ood_metrics([0, 1], [2, 3], bootstrap=0)["auroc_ci"] is None
    again = ood.ood_metrics(_normal(60, 0, 5), _normal(60, 1, 6), bootstrap=300, seed=1)
    assert again == small  # seeded


def test_metrics_refuse_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        ood.auroc([0.0, float("nan")], [1.0])
    with pytest.raises(ValueError, match="empty"):
        ood.auroc([], [1.0])
    with pytest.raises(ValueError, match="bootstrap"):
        ood.ood_metrics([0.0], [1.0], bootstrap=-1)
    with pytest.raises(ValueError, match="tpr"):
        ood.fpr_at_tpr([0.0], [1.0], tpr=1.5)


def test_roc_curve_ends_at_corners():
    fpr, tpr = ood.roc_curve([0, 1, 2], [1.5, 3])
    assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)


# ----------------------------------------------------------------------------- data sets


def test_noise_sets_are_8_bit_and_seeded():
    x = torch.rand(4, 1, 6, 6)
    g = ood.gaussian_noise(x, 0.1, seed=3)
    assert torch.equal(g, ood.gaussian_noise(x, 0.1, seed=3))
    assert torch.allclose(g * 255, torch.round(g * 255)) and g.min() >= 0 and g.max() <= 1
    u = ood.uniform_noise(5, (1, 6, 6), seed=0)
    assert u.shape == (5, 1, 6, 6) and torch.allclose(u * 255, torch.round(u * 255))
    q = ood.quantize(torch.tensor([[-0.2, 0.5, 1.7]], dtype=torch.float64))
    assert q[0].tolist() == pytest.approx([0.0, 128 / 255, 1.0])


def test_perturb_replaces_the_given_share():
    x = torch.full((20, 1, 10, 10), 0.5)
    assert torch.equal(ood.perturb(x, 0.0), x)
    y = ood.perturb(x, 0.3, seed=1)
    changed = (y != x).double().mean()
    assert abs(float(changed) - 0.3) < 0.05
    new = y[y != x] * 255
    assert torch.allclose(new, torch.round(new))  # replaced by 8-bit grey levels
    with pytest.raises(ValueError, match="rate"):
        ood.perturb(x, 1.5)


def test_leaf_crossing_noise_moves_on_ker_g_and_keeps_the_prediction():
    model = make(TinyMLP(d=12, c=4))
    x = torch.rand(3, 12, dtype=torch.float64)
    sets = ood.leaf_crossing_noise(model, x, (2, 6), step_size=0.01, clamp=None)
    assert set(sets) == {2, 6}
    d2, d6 = ((sets[s] - x).norm(dim=1) for s in (2, 6))
    assert torch.allclose(d2, torch.full_like(d2, 0.02), atol=1e-6)  # straight-ish, 2 steps
    assert bool((d6 > d2).all())
    assert torch.equal(model(sets[6]).argmax(1), model(x).argmax(1))
    with pytest.raises(ValueError, match="steps"):
        ood.leaf_crossing_noise(model, x, (0,))


# ------------------------------------------------------------------- the density


def _glow():
    torch.manual_seed(0)
    return Glow((1, 4, 4), levels=2, depth=1, hidden_channels=4).double().eval()


def test_flow_bits_per_dim_is_bits_per_dim_with_a_seeded_generator():
    flow, x = _glow(), torch.rand(5, 1, 4, 4, dtype=torch.float64)
    got = ood.flow_bits_per_dim(flow, x, seed=7, batch_size=2)
    g = torch.Generator().manual_seed(7)
    want = torch.cat([bits_per_dim(flow, x[i:i + 2], 256, generator=g) for i in (0, 2, 4)])
    assert torch.allclose(got, want)


def test_flow_score_is_the_gradient_of_log_p():
    flow, x = _glow(), torch.rand(2, 1, 4, 4, dtype=torch.float64)
    s = ood.flow_score(flow, x, batch_size=1)
    e = torch.zeros_like(x)
    e[0, 0, 1, 2] = 1e-6
    with torch.no_grad():
        fd = (flow.log_prob(x + e) - flow.log_prob(x - e))[0] / 2e-6
    assert float(s[0, 0, 1, 2]) == pytest.approx(float(fd), rel=1e-5)


def test_density_scores_known_answers():
    bpd = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    assert ood.typicality(bpd, torch.tensor([2.0, 4.0])).tolist() == [2.0, 0.0, 2.0]
    assert ood.likelihood_ratio(bpd, torch.ones(3, dtype=torch.float64)).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="shape"):
        ood.likelihood_ratio(bpd, torch.ones(2))
    flat = torch.zeros(1, 1, 8, 8)
    noise = ood.uniform_noise(1, (1, 8, 8), seed=0)
    x = torch.cat([flat, noise])
    L = ood.compressed_bits(x, codec="zlib")
    raw = (x * 255).round().to(torch.uint8).numpy()
    assert L.tolist() == [8 * len(zlib.compress(r.tobytes(), 9)) for r in raw]
    png = ood.compressed_bits(x)
    assert png[0] < png[1]  # a flat image is simple
    s = ood.complexity_corrected(torch.tensor([4.0, 4.0]), x)
    assert torch.allclose(s, 4.0 - png / 64)


# ------------------------------------------------------------------ the classifier


def test_energy_and_max_softmax_closed_forms():
    model = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    s = model(x).detach()
    assert torch.allclose(ood.energy(model, x), -torch.logsumexp(s, 1))
    assert torch.allclose(ood.energy(model, x, temperature=2.0),
                          -2 * torch.logsumexp(s / 2, 1))
    assert torch.allclose(ood.max_softmax(model, x), 1 - torch.softmax(s, 1).max(1).values)
    flat = nn.Linear(3, 4).double()
    nn.init.zeros_(flat.weight)
    nn.init.zeros_(flat.bias)
    assert torch.allclose(ood.max_softmax(flat, x), torch.full((5,), 0.75, dtype=torch.float64))
    assert torch.allclose(ood.energy(flat, x), torch.full((5,), -math.log(4), dtype=torch.float64))


def test_penultimate_features_are_the_input_of_the_last_linear():
    model = make(TinyMLP())
    x = torch.rand(6, 12, dtype=torch.float64)
    f = ood.penultimate_features(model, x, batch_size=4)
    assert torch.allclose(f, model.net[:-1](x))


def test_mahalanobis_against_the_closed_form():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 3)) @ np.array([[2.0, 0, 0], [0.5, 1, 0], [0, 0, 0.3]])
    y = rng.integers(0, 3, 200)
    f[y == 1] += 4
    g = ood.fit_class_gaussian(torch.tensor(f), torch.tensor(y))
    mu = np.stack([f[y == c].mean(0) for c in range(3)])
    cov = sum((f[y == c] - mu[c]).T @ (f[y == c] - mu[c]) for c in range(3)) / 200
    assert np.allclose(g.means.numpy(), mu) and np.allclose(g.precision.numpy(),
                                                            np.linalg.inv(cov))
    q = rng.normal(size=(7, 3))
    want = np.min([np.einsum("nf,fg,ng->n", q - mu[c], np.linalg.inv(cov), q - mu[c])
                   for c in range(3)], axis=0)
    assert np.allclose(ood.mahalanobis(torch.tensor(q), g).numpy(), want)
    assert float(ood.mahalanobis(g.means[1:2], g)[0]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no features"):
        ood.fit_class_gaussian(torch.tensor(f), torch.tensor(y), num_classes=4)


# -------------------------------------------------------------------- the geometry


def test_spectrum_scores_known_answers():
    s = ood.spectrum_scores(torch.tensor([[1.0, 1, 1, 0], [3.0, 0, 0, 0], [0.0, 0, 0, 0]]))
    assert s["trace"].tolist() == [3.0, 3.0, 0.0]
    assert s["effective_rank"][:2].tolist() == pytest.approx([3.0, 1.0])
    assert s["spectral_entropy"][:2].tolist() == pytest.approx([math.log(3), 0.0])
    assert s["stable_rank"].tolist() == pytest.approx([3.0, 1.0, 0.0])
    assert s["effective_rank"][2] == 0 and s["spectral_entropy"][2] == 0


def test_data_matrix_scores_use_g():
    model, x = make(TinyMLP()), torch.rand(5, 12, dtype=torch.float64)
    s = ood.data_matrix_scores(model, x, batch_size=2)
    G = local_data_matrix(model, x)
    assert torch.allclose(s["trace"], G.trace)
    assert bool((s["effective_rank"] <= 3 + 1e-9).all())  # rank G ≤ C − 1 = 3


def _linear_model(d: int = 6, c: int = 3) -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(d, c).double().eval()


def _kernel_projector(model: nn.Module) -> torch.Tensor:
    W = model.weight.detach()
    Q = torch.linalg.qr((W[1:] - W[0]).T).Q
    return torch.eye(W.shape[1], dtype=W.dtype) - Q @ Q.T


def test_leaf_distance_of_a_training_image_is_zero(cnn):
    ref = torch.rand(6, 1, 6, 6, dtype=torch.float64)
    d = ood.leaf_distance(cnn, ref[:4], ref, max_steps=20)
    assert torch.equal(d, torch.zeros(4, dtype=torch.float64))


def test_leaf_distance_is_the_kernel_part_for_a_linear_model():
    model = _linear_model()
    P = _kernel_projector(model)
    r = torch.randn(1, 6, dtype=torch.float64)
    delta = torch.randn(3, 6, dtype=torch.float64)
    x = r + delta
    d = ood.leaf_distance(model, x, r, max_steps=400, step_size=0.2, stall_rtol=1e-9)
    assert torch.allclose(d, (delta @ P).norm(dim=1), atol=1e-6)
    assert bool((d <= ood.nearest_distance(x, r) + 1e-12).all())
    on_leaf = r + delta @ (torch.eye(6, dtype=torch.float64) - P)  # moved within the leaf
    d0 = ood.leaf_distance(model, on_leaf, r, max_steps=400, step_size=0.2, stall_rtol=1e-9)
    assert float(d0.max()) < 1e-6


class _Gaussian(nn.Module):
    """A stand-in density: log p(x) = −½‖x − a‖², score a − x."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a)

    def log_prob(self, x):
        return -0.5 * (x - self.a).pow(2).reshape(x.shape[0], -1).sum(1)


def test_score_fraction_in_leaf_of_a_linear_classifier():
    model = _linear_model()
    P = _kernel_projector(model)
    a = torch.randn(6, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    frac = ood.score_fraction_in_leaf(model, _Gaussian(a), x, batch_size=3)
    v = a - x
    want = (v - v @ P).norm(dim=1) / v.norm(dim=1)
    assert torch.allclose(frac, want, atol=1e-10)


class _LinearVAE(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.enc, self.dec = nn.Linear(6, 2).double(), nn.Linear(2, 6).double()

    def encode(self, x):
        mu = self.enc(x)
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return self.dec(z)

    def forward(self, x):
        return self.decode(self.encode(x)[0])


def test_score_fraction_in_tangent_and_reconstruction_error():
    vae = _LinearVAE()
    a = torch.randn(6, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    frac = ood.score_fraction_in_tangent(vae, _Gaussian(a), x)
    Q = torch.linalg.qr(vae.dec.weight.detach()).Q  # the tangent space: col(W_dec)
    v = a - x
    assert torch.allclose(frac, (v @ Q).norm(dim=1) / v.norm(dim=1), atol=1e-10)
    err = ood.reconstruction_error(vae, x)
    assert torch.allclose(err, (vae(x) - x).pow(2).mean(1).detach())


# ----------------------------------------------------------------- figures and command


def test_ood_figures_have_labels(figs):
    from manifoldlens import viz

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 50), rng.normal(1, 1, 40)
    curves = {"s": {"set": ood.roc_curve(a, b)}}
    fig = viz.plot_roc_curves(curves, aurocs={"s": {"set": ood.auroc(a, b)}})
    figs.append(fig)
    ax = fig.axes[0]
    assert "false positive" in ax.get_xlabel() and ax.get_legend() is not None
    figs.append(fig := viz.plot_score_histograms({"s": {"in": a, "set": b}}, in_name="in"))
    assert fig.axes[0].get_xlabel() == "s" and fig.legends
    figs.append(fig := viz.plot_auroc_table({"s": {"set": 0.7, "other": 0.4}}))
    assert fig.axes[0].get_ylabel().startswith("score")
    imgs = torch.rand(3, 1, 5, 5)
    figs.append(viz.plot_denoising({"clean": imgs, "noisy": imgs}, n=2))


def test_ood_command_refuses_bad_options_before_creating_the_run(tmp_path, capsys):
    from manifoldlens.cli import main

    out = tmp_path / "run"
    assert main(["ood", "--out", str(out), "--n-noise", "8", "--leaf-n", "9"]) == 2
    assert "leaf_n" in capsys.readouterr().err and not out.exists()
    assert main(["ood", "--out", str(out), "--temperature", "0"]) == 2
    assert "temperature" in capsys.readouterr().err and not out.exists()
    assert main(["ood", "--out", str(out), "--flow-size", "2,4"]) == 2
    assert "flow_size" in capsys.readouterr().err and not out.exists()
