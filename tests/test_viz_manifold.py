"""Tests for the seed 004 figures in manifoldlens.viz (attributions and the data manifold)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from manifoldlens.viz import (
    GREY,
    PURPLE,
    plot_attribution_decomposition,
    plot_fraction_by_method,
    plot_fraction_over_training,
    plot_principal_angles,
    plot_roar,
)


def _parts(n: int, c: int, side: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for scale, name in [(1.0, "gradient"), (1e-3, "smoothgrad")]:  # very different magnitudes
        t = scale * torch.randn(n, c, side, side, generator=g, dtype=torch.float64)
        o = scale * torch.randn(n, c, side, side, generator=g, dtype=torch.float64)
        out[name] = {"attribution": t + o, "tangent": t, "orthogonal": o}
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_decomposition_layout_and_data(figs, channels):
    n = 4
    images = torch.rand(n, channels, 6, 6)
    parts = _parts(n, channels)
    parts["smoothgrad"] = {k: v.numpy() for k, v in parts["smoothgrad"].items()}  # numpy too
    fig = plot_attribution_decomposition(images, parts, labels=[f"class {i}" for i in range(n)],
                                         title="decomposition")
    figs.append(fig)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == (1 + 3 * 2) * n
    axes = np.asarray(fig.axes).reshape(7, n)
    assert [ax.get_title() for ax in axes[0]] == [f"class {i}" for i in range(n)]
    rows = ["image", "gradient", "gradient: tangent", "gradient: orthogonal",
            "smoothgrad", "smoothgrad: tangent", "smoothgrad: orthogonal"]
    assert fig.row_labels == rows
    assert [ax.get_ylabel().replace(":\n", ": ") for ax in axes[:, 0]] == rows
    assert fig.get_suptitle() == "decomposition"
    # the image row shows the images (gray_r, 0..1), grayscale as (H, W), RGB as (H, W, 3)
    img = np.asarray(axes[0, 2].images[0].get_array())
    expected = images[2, 0] if channels == 1 else images[2].permute(1, 2, 0)
    np.testing.assert_allclose(img, expected.numpy(), rtol=1e-6)
    if channels == 1:
        assert axes[0, 2].images[0].cmap.name == "gray_r"
    assert axes[0, 2].images[0].get_clim() == (0, 1)
    # the signed rows show the channel sums, each panel on its own symmetric scale
    for m, name in enumerate(["gradient", "smoothgrad"]):
        for r, key in enumerate(["attribution", "tangent", "orthogonal"]):
            for j in range(n):
                im = axes[1 + 3 * m + r, j].images[0]
                want = np.asarray(parts[name][key][j]).sum(0)
                np.testing.assert_allclose(np.asarray(im.get_array()), want, rtol=1e-12)
                vmin, vmax = im.get_clim()
                assert vmin == pytest.approx(-vmax)
                assert vmax == pytest.approx(np.abs(want).max())
                assert im.cmap.name == "RdBu_r"
    # the tangent panels report the fraction ‖tangent‖ / ‖attribution‖
    t, a = parts["gradient"]["tangent"][1], parts["gradient"]["attribution"][1]
    assert f"frac {float(t.norm() / a.norm()):.2f}" in axes[2, 1].get_xlabel()


def test_decomposition_all_zero_map_and_errors(figs):
    images = np.random.default_rng(0).random((2, 1, 5, 5))
    z = np.zeros((2, 1, 5, 5))
    fig = plot_attribution_decomposition(images, {"g": {"attribution": z, "tangent": z,
                                                        "orthogonal": z}})
    figs.append(fig)
    assert len(fig.axes) == 4 * 2
    assert fig.axes[2].images[0].get_clim() == (-1.0, 1.0)  # zero map: a valid scale
    with pytest.raises(ValueError, match="lacks"):
        plot_attribution_decomposition(images, {"g": {"attribution": z, "tangent": z}})
    with pytest.raises(ValueError, match="shape"):
        plot_attribution_decomposition(images, {"g": {"attribution": z[:1], "tangent": z,
                                                      "orthogonal": z}})
    with pytest.raises(ValueError, match="labels"):
        plot_attribution_decomposition(images, {}, labels=["only one"])


def test_fraction_by_method(figs):
    rng = np.random.default_rng(0)
    fr = {"gradient": rng.beta(2, 5, 50), "input × gradient": torch.tensor(rng.beta(5, 5, 40)),
          "smoothgrad": rng.beta(4, 5, 60).tolist()}
    fig = plot_fraction_by_method(fr, baseline=0.1)
    figs.append(fig)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_ylim() == (0, 1)
    assert ax.get_ylabel() == "fraction in tangent space"
    assert [t.get_text() for t in ax.get_xticklabels()] == list(fr)
    means = [float(np.mean(np.asarray(v, dtype=float))) for v in fr.values()]
    assert [t.get_text() for t in ax.texts] == [f"{m:.2f}" for m in means]
    np.testing.assert_allclose(ax.collections[0].get_offsets()[:, 1], means)  # mean markers
    (base,) = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    np.testing.assert_allclose(base.get_ydata(), 0.1)
    assert base.get_label() == "random √(k/d) ≈ 0.100"
    two = plot_fraction_by_method({"a (standard)": [0.2, 0.3], "a (robust)": [0.7, 0.9]},
                                  ylabel="share", title="models")
    figs.append(two)
    assert two.axes[0].get_ylabel() == "share" and two.axes[0].get_title() == "models"
    assert not [ln for ln in two.axes[0].lines if ln.get_linestyle() == "--"]  # no baseline


@pytest.mark.parametrize("bad, match", [
    ([0.2, 1.2], r"\[0, 1\]"), ([-0.1, 0.5], r"\[0, 1\]"), ([0.2, float("nan")], "NaN"),
    (torch.tensor([0.5, float("inf")]), "NaN or infinite"), ([], "empty"),
])
def test_fraction_by_method_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        plot_fraction_by_method({"ok": [0.1, 0.9], "bad": bad})
    assert "'bad'" in str(err.value)


def _records(peak: float, n: int = 6, median: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        m = 0.1 + peak * i / (n - 1)
        r = {"step": 100 * i, "mean": m, "q05": m - 0.05, "q95": m + 0.05}
        if median:
            r["median"] = m + 0.01
        out.append(r)
    return out


def test_fraction_over_training(figs):
    recs = _records(0.4)
    fig = plot_fraction_over_training(recs, baseline=0.1)
    figs.append(fig)
    (ax,) = fig.axes
    mean = next(ln for ln in ax.lines if ln.get_label() == "mean")
    np.testing.assert_allclose(mean.get_xdata(), [r["step"] for r in recs])
    np.testing.assert_allclose(mean.get_ydata(), [r["mean"] for r in recs])
    assert any(ln.get_label() == "median" for ln in ax.lines)
    (band,) = ax.collections
    verts = band.get_paths()[0].vertices
    assert verts[:, 1].min() == pytest.approx(recs[0]["q05"])
    assert verts[:, 1].max() == pytest.approx(recs[-1]["q95"])
    assert any(ln.get_label().startswith("random √(k/d) ≈ 0.1") for ln in ax.lines)
    assert ax.get_ylim() == (0, 1)
    two = plot_fraction_over_training({"standard": _records(0.3),
                                       "adversarial": _records(0.6, median=False)})
    figs.append(two)
    (ax2,) = two.axes
    assert len(ax2.collections) == 2  # one band per name
    labels = [t.get_text() for t in ax2.get_legend().get_texts()]
    assert labels == ["standard", "adversarial"]
    with pytest.raises(ValueError, match="q95"):
        plot_fraction_over_training([{"step": 0, "mean": 0.2, "q05": 0.1}])


def test_roar(figs):
    res = {"fractions": [0.1, 0.5, 0.9], "gradient": [0.9, 0.7, 0.3],
           "tangent space": [0.8, 0.5, 0.2], "random": [0.95, 0.9, 0.8]}
    fig = plot_roar(res, title="roar")
    figs.append(fig)
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ln in ax.lines}
    assert set(lines) == {"gradient", "tangent space", "random"}
    np.testing.assert_allclose(lines["gradient"].get_xdata(), [10, 50, 90])
    np.testing.assert_allclose(lines["random"].get_ydata(), [0.95, 0.9, 0.8])
    assert lines["random"].get_color() == GREY and lines["random"].get_linestyle() == "--"
    assert lines["tangent space"].get_color() == PURPLE
    assert lines["gradient"].get_marker() not in (None, "None", "")
    assert "most important" in ax.get_xlabel() and "%" in ax.get_xlabel()
    bottom = plot_roar(res, remove="bottom")
    figs.append(bottom)
    assert "least important" in bottom.axes[0].get_xlabel()


def test_roar_rejects_bad_input():
    with pytest.raises(ValueError, match="2 accuracies but there are 3 fractions"):
        plot_roar({"fractions": [0.1, 0.5, 0.9], "gradient": [0.9, 0.7]})
    with pytest.raises(ValueError, match="fractions"):
        plot_roar({"gradient": [0.9, 0.7]})
    with pytest.raises(ValueError, match="remove"):
        plot_roar({"fractions": [0.1], "gradient": [0.9]}, remove="middle")


@pytest.mark.parametrize("to", [torch.tensor, np.asarray])
def test_principal_angles_torch_and_numpy(figs, to):
    a = np.array([[0.0, np.pi / 2], [np.pi / 6, np.pi / 3], [np.pi / 4, np.nan]])
    fig = plot_principal_angles(to(a), labels="D_x vs T_x")
    figs.append(fig)
    assert isinstance(fig, Figure)
    smallest, mean = fig.axes
    heights = [sum(p.get_height() for p in ax.patches) for ax in (smallest, mean)]
    assert heights == [3, 3]  # one count per point, NaN (undefined) angles skipped
    for ax in (smallest, mean):
        (ninety,) = [ln for ln in ax.lines if ln.get_label() == "90°: orthogonal"]
        np.testing.assert_allclose(ninety.get_xdata(), 90)
    assert "smallest" in smallest.get_xlabel() and "mean" in mean.get_xlabel()
    texts = [t.get_text() for t in smallest.get_legend().get_texts()]
    assert texts[0] == "D_x vs T_x (median 30.0°)"  # smallest angles 0°, 30°, 45°


def test_principal_angles_dict_and_errors(figs):
    g = torch.Generator().manual_seed(0)
    d = {"trained": torch.rand(20, 3, generator=g), "init": np.full((10, 3), 1.2)}
    fig = plot_principal_angles(d, title="angles")
    figs.append(fig)
    assert len(fig.axes) == 2 and fig.get_suptitle() == "angles"
    texts = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert texts[0].startswith("trained") and texts[1].startswith("init")
    with pytest.raises(ValueError, match="degrees"):
        plot_principal_angles(np.full((4, 2), 45.0))
    with pytest.raises(ValueError, match="dict"):
        plot_principal_angles(d, labels=["a", "b"])
