"""Every figure of manifoldlens.viz, at a realistic size and at a degenerate one (one point,
one sample), drawn and saved as PNG: its data axes are labelled (or, for image grids, its
panels titled), its colour bars labelled, its artists hold data, several labelled series get
a legend, a series of 1–3 points gets markers, and no two texts overlap."""

from __future__ import annotations

import itertools
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.lines import Line2D
from matplotlib.text import Text
from torch import nn

from manifoldlens import viz

SIZES = ["realistic", "degenerate"]


# ---------------------------------------------------------------------------------------------
# what every figure must satisfy
# ---------------------------------------------------------------------------------------------


def _is_colorbar(ax) -> bool:
    return ax.get_label() == "<colorbar>"


def _is_image_panel(ax) -> bool:
    """An image tile of a grid: images, no ticks (its text is titles and row labels)."""
    return bool(ax.images) and not len(ax.get_xticks()) and not len(ax.get_yticks())


def _line_has_data(line: Line2D) -> bool:
    x, y = (np.asarray(v, dtype=float) for v in line.get_data())
    return x.size > 0 and bool(np.isfinite(x).any() and np.isfinite(y).any())


def _has_data(ax) -> bool:
    lines = any(_line_has_data(ln) for ln in ax.lines)
    colls = any(len(c.get_paths()) or len(c.get_offsets()) for c in ax.collections)
    patches = any(p.get_height() > 0 if hasattr(p, "get_height") else True for p in ax.patches)
    return lines or colls or patches or bool(ax.images)


def _shared(ax, which: str) -> list:
    group = ax.get_shared_x_axes() if which == "x" else ax.get_shared_y_axes()
    return group.get_siblings(ax)


def _label_of(ax, which: str) -> str:
    """The axis label of ``ax`` or of an axes sharing that axis with it (shared panels and
    twins label the axis once)."""
    get = "get_xlabel" if which == "x" else "get_ylabel"
    return next((t for a in _shared(ax, which) if (t := getattr(a, get)().strip())), "")


def _data_series(ax) -> list[Line2D]:
    """Lines drawn in data coordinates (not ``axhline`` / ``axvline`` references)."""
    return [ln for ln in ax.lines if ln.get_transform() == ax.transData]


def _tick_labels(axis) -> list[Text]:
    """The labels of the major ticks inside the view (those drawn)."""
    lo, hi = sorted(axis.get_view_interval())
    eps = 1e-9 * max(abs(lo), abs(hi), 1.0)
    return [t for tick in axis.get_major_ticks() if lo - eps <= tick.get_loc() <= hi + eps
            for t in (tick.label1, tick.label2)]


def _texts(fig: Figure) -> list[Text]:
    """The visible, non-empty texts of the figure: suptitle, titles, axis labels, tick labels,
    legend texts and texts placed in the axes."""
    out = [fig._suptitle] if fig._suptitle is not None else []  # no public Text getter
    for ax in fig.axes:
        out += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        out += _tick_labels(ax.xaxis) + _tick_labels(ax.yaxis)
        if (leg := ax.get_legend()) is not None:
            out += [leg.get_title(), *leg.get_texts()]
    for leg in fig.legends:
        out += [leg.get_title(), *leg.get_texts()]
    return [t for t in out if t.get_visible() and t.get_text().strip()]


def _overlaps(texts: list[Text], renderer, slack: float = 1.0) -> list[tuple[str, str]]:
    boxes = [(t.get_text(), t.get_window_extent(renderer).padded(-slack)) for t in texts]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def check_figure(fig: Figure, path, *, markers: bool = True) -> None:
    """Draw ``fig``, save it as PNG at ``path`` and check it (see the module docstring)."""
    assert isinstance(fig, Figure)
    FigureCanvasAgg(fig)
    fig.set_dpi(60)  # small and fast
    fig.canvas.draw()  # drawn once: saved from this buffer, the text boxes measured in it
    imsave(path, np.asarray(fig.canvas.buffer_rgba()))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert axes, "no visible axes"
    panels = [ax for ax in axes if _is_image_panel(ax)]
    data = [ax for ax in axes if not _is_colorbar(ax) and ax not in panels]
    for cb in filter(_is_colorbar, axes):
        assert (cb.get_ylabel() or cb.get_xlabel()).strip(), "a colour bar without a label"
    for ax in data:
        assert _label_of(ax, "x"), f"no x label on the axes titled {ax.get_title()!r}"
        assert _label_of(ax, "y"), f"no y label on the axes titled {ax.get_title()!r}"
        assert _has_data(ax) or any(_has_data(a) for a in _shared(ax, "x") if a is not ax), \
            f"an empty axes titled {ax.get_title()!r}"
    # twins share x: their labelled series count together, and one legend serves them
    for group in {tuple(sorted(_shared(ax, "x"), key=id)) for ax in data}:
        names = [lab for a in group for lab in a.get_legend_handles_labels()[1]]
        if len(names) > 1:
            assert any(a.get_legend() is not None for a in group) or fig.legends, \
                f"series {names} but no legend"
    if markers:
        for ax in data:
            for ln in _data_series(ax):
                if 1 <= len(ln.get_xdata()) <= 3:
                    assert ln.get_marker() not in (None, "None", "", " "), \
                        f"a series of {len(ln.get_xdata())} points without markers"
    if panels:
        assert fig.get_suptitle() or any(ax.get_title() or ax.get_ylabel() for ax in panels)
        assert all(ax.images and ax.images[0].get_array().size for ax in panels)
    renderer = fig.canvas.get_renderer()
    texts = _texts(fig)
    clashes = _overlaps(texts, renderer)
    assert not clashes, f"overlapping texts: {clashes[:5]}"
    page = fig.bbox.padded(1.0)
    cut = [t.get_text() for t in texts if not page.contains(*t.get_window_extent(renderer).p0)
           or not page.contains(*t.get_window_extent(renderer).p1)]
    assert not cut, f"texts cut off by the figure's edge: {cut[:5]}"


@pytest.fixture
def check(figs, tmp_path):
    """``check(fig, **kw)``: :func:`check_figure`, the figure closed after the test."""
    count = itertools.count()

    def run(fig: Figure, **kw) -> Figure:
        figs.append(fig)
        check_figure(fig, tmp_path / f"figure{next(count)}.png", **kw)
        return fig

    return run


def _n(size: str, realistic: int) -> int:
    return realistic if size == "realistic" else 1


# ---------------------------------------------------------------------------------------------
# the local data matrix G and the Jacobian correlation matrix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_trace_of_g(check, size):
    n = _n(size, 60)
    recs = [{"step": 25 * i, "mean_trace": 1.0 + math.sin(i / 9) ** 2,
             "ema_trace": 1.0 + 0.5 * math.sin(i / 9) ** 2, "mean_rank": min(9, i),
             "full_rank_fraction": min(1.0, i / 40)} for i in range(n)]
    fig = check(viz.plot_trace_of_g(recs))
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [r["mean_trace"] for r in recs])
    with pytest.raises(ValueError, match="records is empty"):
        viz.plot_trace_of_g([])


@pytest.mark.parametrize("size", SIZES)
def test_trace_histogram(check, size):
    n = _n(size, 300)
    rng = np.random.default_rng(0)
    trace = torch.as_tensor(rng.lognormal(0.0, 1.5, n))
    labels = torch.as_tensor(rng.integers(0, 10, n))
    fig = check(viz.plot_trace_histogram(trace, labels, [f"digit {k}" for k in range(10)]))
    (ax,) = fig.axes
    assert sum(p.get_height() for p in ax.patches) == pytest.approx(n)  # every point counted
    assert ax.get_legend() is not None
    if size == "degenerate":
        one = check(viz.plot_trace_histogram(trace))  # not stacked by class
        assert sum(p.get_height() for p in one.axes[0].patches) == pytest.approx(n)


def test_trace_histogram_constant_and_zero_traces(check):
    same = check(viz.plot_trace_histogram(torch.full((5,), 0.3)))  # one distinct value
    ax = same.axes[0]
    assert sum(p.get_height() for p in ax.patches) == 5
    assert max(p.get_width() for p in ax.patches) > 0  # a bar with a width
    zero = check(viz.plot_trace_histogram(torch.zeros(4)))  # no log scale for zeros
    assert zero.axes[0].get_xscale() == "linear"
    with pytest.raises(ValueError, match="empty"):
        viz.plot_trace_histogram(torch.zeros(0))


@pytest.mark.parametrize("size", SIZES)
def test_spectra(check, size):
    n, c = _n(size, 200), 10
    ev = torch.rand(n, c).sort(1, descending=True).values
    ev[:, -1] = 0.0
    fig = check(viz.plot_spectra(ev))
    assert fig.axes[0].get_legend() is not None


@pytest.mark.parametrize("size", SIZES)
def test_rank_counts(check, size):
    ranks = torch.randint(5, 10, (_n(size, 200),))
    fig = check(viz.plot_rank_counts(ranks, 10))
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == torch.bincount(ranks, minlength=11).tolist()


def _gram(n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    j = torch.randn(n, 6, generator=g, dtype=torch.float64) + 3 * torch.eye(6)[labels % 6]
    return j @ j.T, labels


@pytest.mark.parametrize("size", SIZES)
def test_gram(check, size):
    m, y = _gram(_n(size, 80), 10)
    fig = check(viz.plot_gram(m, y, [f"class {k}" for k in range(10)]))
    bars = [ax for ax in fig.axes if _is_colorbar(ax)]
    assert len(bars) == 2 and "M_ij" in bars[0].get_ylabel()
    if size == "degenerate":
        return
    cos = check(viz.plot_gram(m / m.diagonal().sqrt().outer(m.diagonal().sqrt()), y,
                              value="cosine of J(x_i), J(x_j)"))
    assert "cosine" in [ax for ax in cos.axes if _is_colorbar(ax)][0].get_ylabel()


def test_gram_many_decades_uses_a_labelled_log_scale(check):
    m, y = _gram(40, 4)
    m[:20] *= 1e-6
    m[:, :20] *= 1e-6
    fig = check(viz.plot_gram(m, y))
    assert "log" in [ax for ax in fig.axes if _is_colorbar(ax)][0].get_ylabel()


@pytest.mark.parametrize("size", SIZES)
def test_gram_spectrum(check, size):
    n = _n(size, 150)
    ev = torch.logspace(2, -6, n)
    fig = check(viz.plot_gram_spectrum(ev, k=100))
    ax, ax2 = fig.axes
    assert len(ax.lines[0].get_xdata()) == min(n, 100)
    np.testing.assert_allclose(ax2.lines[0].get_ydata()[-1], ev[:100].sum() / ev.sum())


@pytest.mark.parametrize("size", SIZES)
def test_eigenvectors(check, size):
    n, c = _n(size, 3), 10
    k = 4 if size == "realistic" else 1
    vecs = torch.linalg.qr(torch.randn(n, 64, c)).Q.mT  # (n, C, D)
    ev = torch.rand(n, c).sort(1, descending=True).values
    probs = torch.softmax(torch.randn(n, c), 1)
    fig = check(viz.plot_eigenvectors(torch.rand(n, 1, 8, 8), ev, vecs, probs,
                                      [str(i) for i in range(c)], k=k))
    assert len(fig.axes) == n * (k + 1)
    assert fig.axes[1].get_title() == f"λ1 = {float(ev[0, 0]):.2g}"
    bare = check(viz.plot_eigenvectors(torch.rand(n, 64), ev, vecs, k=k))  # flat inputs
    assert bare.axes[0].get_title() == "input"


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def _history(steps) -> list[dict]:
    return [{"step": s, "epoch": s / 24, "test_loss": 2.3 / (1 + s / 200),
             "test_accuracy": 1 - 0.9 / (1 + s / 200)} for s in steps]


@pytest.mark.parametrize("size", SIZES)
def test_training(check, size):
    last = 1500 if size == "realistic" else 2
    history = _history(range(100, last + 1, 100) if size == "realistic" else [last])
    losses = [{"step": s, "loss": 2.3 * math.exp(-s / 400)} for s in range(2, last + 1, 2)]
    log = [{"eval": history[0]}, *losses, {"resume": {"step": 0}}, {"step": 9, "loss": None}]
    fig = check(viz.plot_training(history, log))  # records without a loss are skipped
    ax, ax2 = fig.axes
    train, test = ax.lines
    np.testing.assert_allclose(train.get_xdata(), [r["step"] for r in losses])
    np.testing.assert_allclose(train.get_ydata(), [r["loss"] for r in losses])
    np.testing.assert_allclose(test.get_ydata(), [h["test_loss"] for h in history])
    for line in (test, ax2.lines[0]):  # every evaluation is a marker
        assert line.get_marker() not in (None, "None", "") and line.get_markersize() >= 4
    (leg,) = fig.legends  # under the figure: a twin's line would cross it inside the axes
    labels = [t.get_text() for t in leg.get_texts()]
    assert labels == ["training loss (minibatch)", "test loss", "test accuracy (right)"]


def test_training_without_loss_records_or_evaluations(check):
    only_eval = check(viz.plot_training(_history([5])))
    assert len(only_eval.axes[0].lines) == 1
    only_loss = check(viz.plot_training([], [{"step": 1, "loss": 2.0}]))
    assert len(only_loss.axes) == 1  # no accuracy axis without evaluations
    with pytest.raises(ValueError, match="nothing to draw"):
        viz.plot_training([], [{"eval": {}}])


def test_train_command_draws_the_loss_it_logged(tmp_path, monkeypatch, figs):
    """A short ``run_train`` (5 steps, one evaluation) draws the training loss of its
    metrics.jsonl and the evaluation as markers."""
    from manifoldlens.commands.classifier import run_train
    from manifoldlens.runs import Run

    saved = {}
    monkeypatch.setattr(Run, "save_figure", lambda self, name, fig, dpi=150: saved.update(
        {name: fig}))
    with Run(tmp_path / "run", "train") as run:
        run_train(run, data="digits", limit=100, steps=5, batch_size=20, trace_every=5,
                  probe_size=10, checkpoint_every=None, progress=False)
        logged = run.read_log("loss")
    figs.extend(saved.values())
    assert 1 <= len(logged) <= 5
    fig = saved["training"]
    check_figure(fig, tmp_path / "training.png")
    train, test = fig.axes[0].lines
    np.testing.assert_allclose(train.get_ydata(), [r["loss"] for r in logged])
    assert len(test.get_xdata()) == 1 and test.get_marker() == "o"


@pytest.mark.parametrize("size", SIZES)
def test_curves(check, size):
    t = _n(size, 40)
    x = torch.arange(t) * 5
    curves = {"distance from start": torch.rand(t, 6).cumsum(0),
              "max probability": torch.rand(t)}
    fig = check(viz.plot_curves(x, curves, logy=("distance from start",)))
    assert [ax.get_ylabel() for ax in fig.axes] == list(curves)
    assert fig.axes[0].get_legend() is not None  # (T, n): each series and the mean
    with pytest.raises(ValueError, match="empty"):
        viz.plot_curves(x, {})


@pytest.mark.parametrize("size", SIZES)
def test_fraction_over_training(check, size):
    n = _n(size, 12)
    recs = [{"step": 50 * i, "mean": 0.2 + 0.02 * i, "q05": 0.1, "q95": 0.5 + 0.02 * i,
             "median": 0.21 + 0.02 * i} for i in range(n)]
    fig = check(viz.plot_fraction_over_training(recs, baseline=0.3))
    check(viz.plot_fraction_over_training({"standard": recs, "adversarial": recs[:1]}))
    if n == 1:  # the band of one step has no width: error bars show the 5–95 % range
        bars = [c for c in fig.axes[0].collections if hasattr(c, "get_segments")]
        assert bars and np.allclose(bars[0].get_segments()[0][:, 1], [0.1, 0.5])


# ---------------------------------------------------------------------------------------------
# paths along and across the leaves, involutivity
# ---------------------------------------------------------------------------------------------


def _path(t: int, n: int, c: int = 10) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(points=torch.rand(t, n, 1, 8, 8, generator=g),
                           probs=torch.softmax(torch.randn(t, n, c, generator=g), -1),
                           record_steps=torch.arange(t) * 5)


@pytest.mark.parametrize("size", SIZES)
def test_path_strip(check, size):
    res = _path(_n(size, 30), 2)
    fig = check(viz.plot_path_strip(res, 1, frames=8, classes=[f"c{k}" for k in range(10)],
                                    title="path"))
    assert len(fig.axes) == min(8, len(res.record_steps))
    assert all(ax.get_title().startswith("step ") and ax.get_xlabel() for ax in fig.axes)


@pytest.mark.parametrize("size", SIZES)
def test_path_grid(check, size):
    t, n = _n(size, 60), _n(size, 2)
    path, line = _path(t, n), _path(t, n)
    rows = [r for i in range(n) for r in ((path, i, f"horizontal path {i}"),
                                          (line, i, f"straight line {i}"))]
    fig = check(viz.plot_path_grid(rows, frames=9, title="paths"))
    k = min(9, t)
    axes = np.asarray(fig.axes).reshape(2 * n, k)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == [label for _, _, label in rows]


@pytest.mark.parametrize("size", SIZES)
def test_residual_histogram(check, size):
    n = _n(size, 500)
    r = torch.as_tensor(10 ** np.random.default_rng(0).uniform(-9, -3, n))
    fig = check(viz.plot_residual_histogram(r))
    assert sum(p.get_height() for p in fig.axes[0].patches) == n
    empty = viz.plot_residual_histogram(torch.tensor([float("nan")]))
    assert "no finite residuals" in empty.axes[0].get_title()


# ---------------------------------------------------------------------------------------------
# normalizing flows
# ---------------------------------------------------------------------------------------------


class _Gaussian(nn.Module):
    """z = (x − 1) / 2 in 2-D: log|det ∂z/∂x| = −2 log 2."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return (x - self.b) / 2, torch.full((len(x),), -2 * math.log(2.0))

    def decode(self, z):
        return 2 * z + self.b

    def log_prob(self, x):
        z, ld = self(x)
        return -0.5 * (z**2).sum(1) - math.log(2 * math.pi) + ld


@pytest.mark.parametrize("size", SIZES)
def test_flow_density_2d(check, size):
    flow = _Gaussian()
    data = 1 + 2 * torch.randn(_n(size, 400), 2)
    samples = 1 + 2 * torch.randn(_n(size, 300), 2)
    fig = check(viz.flow_density_2d(flow, data, grid=30, samples=samples))
    assert [ax.get_ylabel() for ax in fig.axes if _is_colorbar(ax)] == ["p(x)"]


@pytest.mark.parametrize("size", SIZES)
def test_flow_volume_change(check, size):
    data = 1 + 2 * torch.randn(_n(size, 400), 2)
    fig = check(viz.flow_volume_change(_Gaussian(), data, grid=30, lines=7))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["data", "z₂ = const", "z₁ = const"]


@pytest.mark.parametrize("size", SIZES)
def test_sample_grid(check, size):
    n = _n(size, 32)
    fig = check(viz.sample_grid(torch.rand(n, 1, 8, 8)))
    assert fig.get_suptitle() == f"{n} sample{'s' if n > 1 else ''}"
    blocks = check(viz.sample_grid({t: torch.rand(n, 3, 8, 8) for t in (0.5, 1.0)}))
    assert [ax.get_ylabel() for ax in blocks.axes] == ["T = 0.5", "T = 1"]


@pytest.mark.parametrize("size", SIZES)
def test_interpolation_strips(check, size):
    pairs, steps = _n(size, 4), _n(size, 7)
    labels = ["automobile → automobile"] * pairs  # longer than a row is tall
    fig = check(viz.interpolation_strips(torch.rand(pairs, steps, 1, 8, 8), labels=labels))
    axes = np.asarray(fig.axes).reshape(pairs, steps)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == labels
    assert axes[0, 0].get_title() == "start"


# ---------------------------------------------------------------------------------------------
# attributions and the data manifold
# ---------------------------------------------------------------------------------------------


METHODS = ("gradient", "input_x_gradient", "integrated_gradients")


def _parts(n: int, methods=METHODS) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for m in methods:
        t = torch.randn(n, 1, 8, 8, generator=g)
        o = 1e-5 * torch.randn(n, 1, 8, 8, generator=g)  # long tick-free notes: ±2.4e-05
        out[m] = {"attribution": t + o, "tangent": t, "orthogonal": o}
    return out


@pytest.mark.parametrize("size", SIZES)
def test_attribution_decomposition(check, size):
    n = _n(size, 4)
    fig = check(viz.plot_attribution_decomposition(
        torch.rand(n, 1, 8, 8), _parts(n), labels=[f"digit {i}" for i in range(n)]))
    rows = 1 + 3 * len(METHODS)
    axes = np.asarray(fig.axes).reshape(rows, n)
    # the row labels, drawn in this order, are the labels decomposition_rows names
    assert fig.row_labels == viz.decomposition_rows(METHODS)
    drawn = [ax.yaxis.label for ax in axes[:, 0]]
    assert [t.get_text().replace(":\n", ": ") for t in drawn] == fig.row_labels
    # ... they do not overlap one another and run top to bottom
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in drawn]
    assert not _overlaps(drawn, renderer, slack=0.0)
    assert all(a.y0 > b.y1 for a, b in itertools.pairwise(boxes))
    # ... and each sits beside its row
    for ax, box in zip(axes[:, 0], boxes, strict=True):
        panel = ax.get_window_extent(renderer)
        assert box.x1 <= panel.x0 and panel.y0 <= (box.y0 + box.y1) / 2 <= panel.y1


def _caption_rows(caption: str) -> dict[int, str]:
    """Row number → what the caption says is there, from "Row 1: x." and "rows a–b: name"."""
    out = {1: re.match(r"Row 1: ([^.]+)\.", caption).group(1)}
    for a, b, name in re.findall(r"[Rr]ows (\d+)–(\d+): ([\w ]+?)[;:]", caption):
        assert int(b) == int(a) + 2
        out[int(a)] = name
    return out


@pytest.mark.parametrize("methods", [METHODS, ("smoothgrad",)])
def test_decomposition_caption_numbers_the_drawn_rows(figs, methods):
    fig = viz.plot_attribution_decomposition(torch.rand(1, 1, 8, 8), _parts(1, methods))
    figs.append(fig)
    caption = viz.decomposition_caption(methods)
    said = _caption_rows(caption)
    assert said[1] == "the images" and fig.row_labels[0] == "image"
    assert len(said) == 1 + len(methods)
    for row, name in said.items():
        if row > 1:  # a group: the attribution, its tangent and its orthogonal part
            assert fig.row_labels[row - 1: row + 2] == [name, f"{name}: tangent",
                                                        f"{name}: orthogonal"]


def test_demo_caption_names_the_demo_rows():
    """The demo report's caption of demo_decomposition.png numbers the rows it draws: the
    digits, then gradient and input × gradient (the order of METHODS)."""
    from manifoldlens.attribution import METHODS as ALL
    from manifoldlens.commands import demo

    class Metrics(dict):  # any number the section asks for
        def __missing__(self, key):
            return 0.5

    section = demo._manifold_section(Metrics(mean_fraction={"gradient": 0.5}))
    caption = dict(section.figures)["demo_decomposition.png"]
    drawn = [m for m in ALL if m in ("gradient", "input_x_gradient")]  # as _demo_manifold
    said = _caption_rows(caption)
    rows = viz.decomposition_rows(drawn)
    assert said[1].startswith("test digits") and rows[0] == "image"
    assert {r: rows[r - 1] for r in said if r > 1} == {r: n for r, n in said.items() if r > 1}
    assert sorted(said) == [1, 2, 5]


@pytest.mark.parametrize("size", SIZES)
def test_fraction_by_method(check, size):
    n = _n(size, 60)
    rng = np.random.default_rng(0)
    fr = {m: rng.beta(2, 5, n) for m in (*METHODS, "smoothgrad")}
    fig = check(viz.plot_fraction_by_method(fr, baseline=0.2), markers=False)  # box plots
    assert fig.axes[0].get_xlabel() == "method"
    two = check(viz.plot_fraction_by_method({"gradient (standard)": rng.beta(2, 5, n),
                                             "gradient (robust)": rng.beta(5, 2, n)}),
                markers=False)
    assert two.axes[0].get_xlabel() == "method (model)"


@pytest.mark.parametrize("size", SIZES)
def test_roar(check, size):
    q = [0.1, 0.3, 0.5, 0.7, 0.9][: _n(size, 5)]
    res = {"fractions": q, "gradient": [0.9 - 0.5 * v for v in q],
           "tangent space": [0.9 - 0.7 * v for v in q], "random": [0.95 - 0.1 * v for v in q]}
    fig = check(viz.plot_roar(res))
    assert len(fig.axes[0].get_legend().get_texts()) == 3


@pytest.mark.parametrize("size", SIZES)
def test_principal_angles(check, size):
    n = _n(size, 200)
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(n, 6, generator=g) * math.pi / 2).sort(1).values
    if size == "degenerate":
        check(viz.plot_principal_angles(a))  # one unnamed series
        return
    fig = check(viz.plot_principal_angles({"trained": a, "initial": a.flip(0)}))
    assert all(ax.get_legend() is not None for ax in fig.axes)


# ---------------------------------------------------------------------------------------------
# seed 004 §5: Theorem 1 and the sanity checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_theorem1(check, size):
    n = _n(size, 200)
    g = torch.Generator().manual_seed(0)
    along = torch.arange(n) % 2 == 0
    frac = torch.where(along, 0.99, 0.02) + 0.01 * torch.rand(n, generator=g)
    check(viz.plot_theorem1(torch.randn(n, 6, generator=g), frac.clamp(0, 1), along,
                            accuracy=1.0))


def _stages(k: int) -> list[str]:
    return ["trained", *[f"layer {i}" for i in range(k)]][: k + 1]


@pytest.mark.parametrize("size", SIZES)
def test_cascading_randomization(check, size):
    stages, n = _stages(_n(size, 4)), _n(size, 20)
    g = torch.Generator().manual_seed(1)
    curves = {m: {meas: torch.rand(len(stages), n, generator=g).numpy()
                  for meas in ("spearman_abs", "spearman", "ssim", "fraction")}
              for m in ("gradient", "random_tangent")}
    check(viz.plot_cascading_randomization(stages, curves, baseline=0.1), markers=False)


@pytest.mark.parametrize("size", SIZES)
def test_randomization_maps(check, size):
    stages = _stages(_n(size, 3))
    g = torch.Generator().manual_seed(2)
    maps = {m: torch.randn(len(stages), 1, 8, 8, generator=g)
            for m in ("gradient", "smoothgrad")[: _n(size, 2)]}
    check(viz.plot_randomization_maps(torch.rand(1, 8, 8, generator=g), maps, stages,
                                      label="3"))


@pytest.mark.parametrize("size", SIZES)
def test_necessary_not_sufficient(check, size):
    n = _n(size, 30)
    g = torch.Generator().manual_seed(3)
    names = ("gradient", "random_tangent")
    check(viz.plot_necessary_not_sufficient(
        {m: torch.rand(n, generator=g).numpy() for m in names},
        {m: torch.rand(n, generator=g).numpy() for m in names}, baseline=0.1))


# ---------------------------------------------------------------------------------------------
# out-of-distribution scores and denoising
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_roc_curves(check, size):
    k = _n(size, 3)
    curves = {f"score {i}": {f"set {j}": (np.linspace(0, 1, 11), np.linspace(0, 1, 11) ** 0.5)
                             for j in range(k)} for i in range(k)}
    aurocs = {s: {t: 0.7 for t in d} for s, d in curves.items()}
    check(viz.plot_roc_curves(curves, aurocs=aurocs), markers=False)


@pytest.mark.parametrize("size", SIZES)
def test_score_histograms(check, size):
    k, n = _n(size, 3), _n(size, 200)
    g = torch.Generator().manual_seed(4)
    scores = {f"score {i}": {"fashion": torch.randn(n, generator=g).numpy(),
                             "mnist": (torch.randn(n, generator=g) + 1).numpy()}
              for i in range(k)}
    check(viz.plot_score_histograms(scores, in_name="fashion"))


@pytest.mark.parametrize("size", SIZES)
def test_auroc_table(check, size):
    k = _n(size, 4)
    table = {f"score {i}": {f"set {j}": (i + j) / (2 * k) for j in range(k)} for i in range(k)}
    check(viz.plot_auroc_table(table))


@pytest.mark.parametrize("size", SIZES)
def test_denoising(check, size):
    n = _n(size, 6)
    g = torch.Generator().manual_seed(5)
    rows = {r: torch.rand(n, 1, 8, 8, generator=g) for r in ("clean", "noisy", "leaf")}
    check(viz.plot_denoising(rows, labels=["clean", "noisy 12 dB", "leaf 18 dB"]))
