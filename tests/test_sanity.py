"""Sanity checks for attributions (Adebayo et al. 2018) beside the fraction in tangent space
(Bordt et al. §5.3): Spearman and SSIM against references, cascading randomisation, the random
attribution in the tangent space; the ``manifold sanity`` and ``manifold train
--random-labels`` commands at toy size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import spearmanr

from manifoldlens.cli import main
from manifoldlens.generative import ManifoldDataset
from manifoldlens.models import create_model
from manifoldlens.sanity import (
    absolute_map,
    random_tangent_attribution,
    randomizable_layers,
    randomized_models,
    rank_correlation,
    sanity_check,
    ssim,
)
from manifoldlens.tangent import TangentSpace

# ------------------------------------------------------------------------------------ SSIM


def _gauss(size, sigma=1.5):
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-t**2 / (2 * sigma**2))
    w = np.outer(g, g)
    return w / w.sum()


def test_ssim_of_an_image_with_itself_is_one_and_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 16, 16, generator=g, dtype=torch.float64)
    b = torch.rand(4, 3, 16, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ssim(a, a), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(ssim(a, b), ssim(b, a))
    assert bool((ssim(a, b) < 0.5).all())  # independent noise is dissimilar


def test_ssim_by_hand_one_window():
    """3 × 3 images, one 3 × 3 Gaussian window: a = a delta at the centre, b = s a + t, so
    μ_a = σ_a² + μ_a² = w_c, μ_b = s w_c + t, σ_b² = s² σ_a², σ_ab = s σ_a²."""
    s, t, c1, c2 = 0.5, 0.2, 0.01**2, 0.03**2
    wc = _gauss(3)[1, 1]
    a = torch.zeros(1, 3, 3, dtype=torch.float64)
    a[0, 1, 1] = 1.0
    b = s * a + t
    mu_a, mu_b, var_a = wc, s * wc + t, wc - wc**2
    expected = ((2 * mu_a * mu_b + c1) * (2 * s * var_a + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + s**2 * var_a + c2))
    assert math.isclose(float(ssim(a, b, window=3)), expected, rel_tol=1e-12)
    assert math.isclose(float(ssim(a, b)), expected, rel_tol=1e-12)  # 11 shrinks to 3


def test_ssim_of_constant_images_and_the_pointwise_window():
    a = torch.full((1, 1, 5, 5), 0.2, dtype=torch.float64)
    b = torch.full((1, 1, 5, 5), 0.6, dtype=torch.float64)
    c1 = 0.01**2
    assert math.isclose(float(ssim(a, b)), (2 * 0.12 + c1) / (0.04 + 0.36 + c1), rel_tol=1e-12)
    x = torch.tensor([[[0.1, 0.9], [0.5, 0.0]]], dtype=torch.float64)  # 2 × 2: window 1
    y = torch.tensor([[[0.3, 0.9], [0.1, 0.4]]], dtype=torch.float64)
    pointwise = ((2 * x * y + c1) / (x**2 + y**2 + c1)).mean()  # σ = 0 at every pixel
    assert math.isclose(float(ssim(x, y)), float(pointwise), rel_tol=1e-12)


def test_ssim_validates_its_inputs():
    with pytest.raises(ValueError, match="same shape|shaped"):
        ssim(torch.zeros(1, 4, 4), torch.zeros(1, 5, 5))
    with pytest.raises(ValueError, match="data_range"):
        ssim(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), data_range=0)


# ------------------------------------------------------------------------------- Spearman


@settings(max_examples=60, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(3, 30)),
              elements=st.integers(-4, 4)),
       arrays(np.int64, 30 * 4, elements=st.integers(-4, 4)))
def test_rank_correlation_is_scipys_spearman_with_ties(a, other):
    b = other[:a.size].reshape(a.shape)
    ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    for absolute in (True, False):
        got = rank_correlation(ta, tb, absolute=absolute).numpy()
        for i in range(a.shape[0]):
            x, y = (np.abs(a[i]), np.abs(b[i])) if absolute else (a[i], b[i])
            if np.ptp(x) == 0 or np.ptp(y) == 0:
                assert np.isnan(got[i])  # a constant map has no ranking
            else:
                assert math.isclose(got[i], spearmanr(x, y).statistic, abs_tol=1e-12)


def test_rank_correlation_sees_only_the_order():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 50, generator=g, dtype=torch.float64)
    torch.testing.assert_close(rank_correlation(a, a.abs() ** 3, absolute=True),
                               torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(rank_correlation(a, -a, absolute=False),
                               -torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(rank_correlation(a, -a, absolute=True),  # |−a| = |a|
                               torch.ones(3, dtype=torch.float64))
    m = absolute_map(torch.tensor([[-2.0, 1.0], [0.0, 0.0]]))
    assert m.tolist() == [[1.0, 0.5], [0.0, 0.0]]


# ------------------------------------------------------------------- randomising a model


def test_layers_are_randomised_top_first_cascading_or_one_at_a_time():
    torch.manual_seed(0)
    model = create_model("mlp", (1, 4, 4), 3, hidden=(8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = randomizable_layers(model)
    assert layers == ["net.5", "net.3", "net.1"]
    cascade = [(n, {k: v.clone() for k, v in m.state_dict().items()})
               for n, m in randomized_models(model)]
    single = [(n, {k: v.clone() for k, v in m.state_dict().items()})
              for n, m in randomized_models(model, mode="independent")]
    assert [n for n, _ in cascade] == [n for n, _ in single] == layers
    for i, ((_, casc), (_, one)) in enumerate(zip(cascade, single, strict=True)):
        for k, v in before.items():
            layer = k.rsplit(".", 1)[0]
            changed_c, changed_1 = not torch.equal(casc[k], v), not torch.equal(one[k], v)
            assert changed_c == (layer in layers[:i + 1])  # this one and those above it
            assert changed_1 == (layer == layers[i])  # this one only
            if layer == layers[i]:  # the same random weights in both modes
                assert torch.equal(casc[k], one[k])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    again = [m.state_dict() for _, m in randomized_models(model)]  # deterministic
    assert all(torch.equal(again[-1][k], cascade[-1][1][k]) for k in before)
    with pytest.raises(ValueError, match="unknown layer"):
        next(randomized_models(model, layers=["nope"]))


def test_random_tangent_attribution_lies_in_the_tangent_space_and_ignores_models():
    g = torch.Generator().manual_seed(3)
    ts = TangentSpace.from_basis(torch.randn(6, 3, 16, generator=g, dtype=torch.float64),
                                 input_shape=(1, 4, 4))
    a = random_tangent_attribution(ts, seed=5)
    assert a.shape == (6, 1, 4, 4)
    torch.testing.assert_close(ts.fraction(a), torch.ones(6, dtype=torch.float64))
    assert torch.equal(a, random_tangent_attribution(ts, seed=5))
    first = TangentSpace(ts.basis[:2], input_shape=(1, 4, 4))
    assert torch.equal(random_tangent_attribution(first, seed=5), a[:2])  # seeded per point
    assert not torch.equal(a, random_tangent_attribution(ts, seed=6))


def test_sanity_check_on_a_toy_classifier():
    torch.manual_seed(0)
    model = create_model("mlp", (1, 4, 4), 3, hidden=(16,)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 4, 4, generator=g)
    ts = TangentSpace.from_basis(torch.randn(12, 2, 16, generator=g), input_shape=(1, 4, 4))
    res = sanity_check(model, x, ts, methods=("gradient", "smoothgrad"),
                       labels=torch.zeros(12, dtype=torch.long), keep=2,
                       options={"smoothgrad": {"samples": 4}})
    assert res.stages == ["trained", "net.3", "net.1"] and len(res.accuracy) == 3
    assert set(res.similarity) == {"gradient", "smoothgrad", "random_tangent", "random"}
    for m, sims in res.similarity.items():
        for v in sims.values():
            assert v.shape == (3, 12)
            torch.testing.assert_close(v[0], torch.ones(12, dtype=torch.float64))  # itself
            if m in ("random_tangent", "random"):  # blind to the model: never changes
                torch.testing.assert_close(v, torch.ones(3, 12, dtype=torch.float64))
    torch.testing.assert_close(res.fraction["random_tangent"], torch.ones(3, 12,
                                                                          dtype=torch.float64))
    assert float(res.similarity["gradient"]["spearman_abs"][-1].mean()) < 0.6
    assert res.maps["gradient"].shape == (3, 2, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(res.targets, model(x).argmax(1))


# -------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    """A tiny manifold dataset: noisy class templates on 6 × 6 pixels, 3 classes, tangent
    spaces spanned by random directions (the commands' mechanics, not the geometry)."""
    root = tmp_path_factory.mktemp("sanity")
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(3, 1, 6, 6, generator=g)
    for split, n in (("train", 90), ("test", 30)):
        labels = torch.arange(n) % 3
        images = (templates[labels] + 0.1 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
        basis = torch.linalg.qr(torch.randn(n, 36, 3, generator=g))[0].mT.contiguous()
        ManifoldDataset(images, labels, torch.randn(n, 3, generator=g), basis,
                        ["a", "b", "c"], {}).save(root / "ds" / split)
    assert main(["manifold", "train", str(root / "ds"), "--arch", "mlp", "--epochs", "2",
                 "--fraction-every", "2", "--out", str(root / "std"), "--no-progress"]) == 0
    return root


def test_cli_random_labels_beside_true_labels(toy_dataset, tmp_path):
    out = tmp_path / "rnd"
    assert main(["manifold", "train", str(toy_dataset / "ds"), "--arch", "mlp", "--epochs",
                 "2", "--fraction-every", "2", "--random-labels", "--beside",
                 str(toy_dataset / "std"), "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "run.json").read_text())["metrics"]
    assert m["random_labels"] is True and 0 <= m["fraction_end"] <= 1
    meta = json.loads((out / "model.json").read_text())["metadata"]
    assert meta["random_labels"] is True
    std = json.loads((toy_dataset / "std" / "run.json").read_text())["metrics"]
    assert std["random_labels"] is False
    assert (out / "fraction_over_training.png").is_file()
    assert main(["manifold", "train", str(toy_dataset / "ds"), "--beside", str(tmp_path),
                 "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert not (tmp_path / "bad").exists()  # refused before the run directory


def test_cli_sanity(toy_dataset, tmp_path, capsys):
    out = tmp_path / "sanity"
    assert main(["manifold", "sanity", str(toy_dataset / "ds"),
                 str(toy_dataset / "std" / "model.json"), "--methods",
                 "gradient,input_x_gradient", "--n", "20", "--figure-images", "2", "--out",
                 str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["stages"] == ["trained", "net.5", "net.3", "net.1"]
    assert set(res["methods"]) == {"gradient", "input_x_gradient", "random_tangent", "random"}
    rt = res["methods"]["random_tangent"]
    assert [s["mean"] for s in rt["fraction"]] == pytest.approx([1.0] * 4)
    assert [s["mean"] for s in rt["spearman_abs"]] == pytest.approx([1.0] * 4)
    assert res["methods"]["gradient"]["ssim"][0]["mean"] == pytest.approx(1.0)
    assert {"cascading_randomization.png", "necessary_not_sufficient.png",
            "randomization_maps_0.png", "randomization_maps_1.png",
            "random_tangent_examples.png"} <= {p.name for p in out.glob("*.png")}
    capsys.readouterr()
    assert main(["manifold", "sanity", str(toy_dataset / "ds"),
                 str(toy_dataset / "std" / "model.json"), "--methods", "nope", "--out",
                 str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
    assert main(["manifold", "sanity", str(toy_dataset / "ds"),
                 str(toy_dataset / "std" / "model.json"), "--layers", "net.9", "--n", "5",
                 "--figure-images", "1", "--out", str(tmp_path / "bad2"),
                 "--no-progress"]) == 2
    assert "top first, are ['net.5', 'net.3', 'net.1']" in capsys.readouterr().err


def test_the_figures_label_axes_legends_and_colour_bars():
    from manifoldlens import viz

    g = torch.Generator().manual_seed(0)
    stages = ["trained", "fc2", "fc1"]
    curves = {m: {s: torch.rand(3, 5, generator=g) for s in
                  ("spearman_abs", "spearman", "ssim", "fraction")}
              for m in ("gradient", "random_tangent")}
    fig = viz.plot_cascading_randomization(stages, curves, baseline=0.1)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes) and fig.legends
    fig = viz.plot_necessary_not_sufficient({m: c["fraction"][0] for m, c in curves.items()},
                                            {m: c["spearman_abs"][-1] for m, c in
                                             curves.items()}, baseline=0.1)
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
    fig = viz.plot_randomization_maps(torch.rand(1, 4, 4, generator=g),
                                      {"gradient": torch.randn(3, 1, 4, 4, generator=g)}, stages)
    assert any(a.get_ylabel() == "|attribution| / max |attribution|" for a in fig.axes)
    s = torch.rand(50, 3, generator=g)
    fig = viz.plot_theorem1(s, torch.rand(50, generator=g), torch.arange(50) % 2 == 0,
                            accuracy=1.0)
    bar = [a for a in fig.axes if a.get_ylabel() == "fraction of ∇f in tangent space"]
    panels = [a for a in fig.axes if a not in bar]
    assert len(bar) == 1 and len(panels) == 2  # the colour bar, labelled
    assert all(a.get_xlabel() and a.get_ylabel() for a in panels)
    assert any(a.get_legend() is not None for a in panels)
