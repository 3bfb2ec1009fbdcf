"""The demo report says what its run showed: each sentence about a result follows the run's
numbers, and every table shows rounded numbers with units, never raw JSON."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.figure import Figure

from manifoldlens.commands.demo import report_sections
from manifoldlens.report import Section, percent, quantity, write_report

# the numbers of a real `manifoldlens demo` run (1500 steps, 2-core CPU)
RUN = {
    "train": {"test_loss": 0.0626852830251058, "test_accuracy": 0.9722222222222222,
              "steps": 1500, "trace_start": 0.000843765796162188,
              "trace_end_ema": 3.664513241545436, "trace_peak_ema": 3.664513241545436,
              "trace_peak_step": 1500, "trace_last_step": 1500},
    "spectrum": {"n": 360, "num_classes": 10, "accuracy": 0.9722222222222222,
                 "trace_mean": 6.1819987297058105, "trace_median": 0.006809334270656109,
                 "rank_counts": {"1": 3, "2": 15, "3": 45, "4": 90, "5": 108, "6": 58,
                                 "7": 28, "8": 11, "9": 2},
                 "full_rank_fraction": 0.005555555555555556, "rank_max": 9},
    "gram": {"n": 360, "output": "softmax", "normalize": False,
             "within_class_mean": 0.04933269093426747, "between_class_mean": 0.0111226768855,
             "within_class_cosine": 0.46385220355053586,
             "between_class_cosine": 0.07137913010309237,
             "kernel_target_alignment": 0.04306294468835823,
             "neighbor_label_agreement": 0.6044444444444445,
             "top10_eigen_share": 0.9025706533599474},
    "leaf": {"horizontal_status": ["max_steps", "max_steps", "max_steps"],
             "horizontal_tol": 0.5, "horizontal_reached": 0,
             "horizontal_final_distance_median": 1.7615901231765747,
             "horizontal_start_distance_median": 3.3006865978240967, "across_points": 4,
             "across_prediction_kept": 1.0, "across_final_distance_mean": 14.874937057495117,
             "involutivity_median": 2.5951998268439205e-14,
             "involutivity_max": 1.0521266261621542e-11},
    "flow": {"steps": 1000, "test_nll": 1.8348345184326171,
             "density_integral": 0.9999205743190792, "logdet_on_data": 0.8859022855758667,
             "logdet_box": 1.6537599563598633},
    "manifold": {"latent_dim": 6, "random_baseline": 0.2948951414590087,
                 "mean_fraction": {"gradient": 0.5459414720535278,
                                   "input_x_gradient": 0.5487961769104004,
                                   "integrated_gradients": 0.5451833009719849,
                                   "smoothgrad": 0.5482118129730225},
                 "median_smallest_angle_deg": 35.0863151550293,
                 "reconstruction_mse": 0.017762867733836174},
}


def _text(**changes: dict) -> str:
    """All the report's sentences and captions, with some of the run's numbers changed."""
    metrics = copy.deepcopy(RUN)
    for part, values in changes.items():
        metrics[part].update(values)
    secs = report_sections(metrics)
    return " ".join([s.text for s in secs] + [c for s in secs for _, c in s.figures])


def test_accuracy_high_and_low_read_differently():
    high = _text()
    assert "Test accuracy 97.2 % after 1500 steps (chance: 10 %)." in high
    low = _text(train={"test_accuracy": 0.4, "steps": 20})
    assert "Test accuracy only 40.0 % after 20 steps" in low and "weak model" in low
    assert "weak model" not in high


def test_the_trace_rising_and_falling_read_differently():
    assert "had not fallen by step 1500" in _text()
    fell = _text(train={"trace_end_ema": 1.0, "trace_peak_step": 400})
    assert "peak of 3.7 at step 400, then fell to 1 by step 1500 (73 % below its peak)" in fell


def test_the_rank_sentence_follows_the_counts():
    at = _text()
    assert "largest numerical rank of G(x) over the 360 test points is 9, at the bound" in at
    assert "most common rank is 5 (108 points); 0.6 % of the points" in at
    below = _text(spectrum={"rank_max": 6, "rank_counts": {"5": 300, "6": 60},
                            "full_rank_fraction": 0.0})
    assert "is 6, below the bound" in below and "most common rank is 5 (300 points)" in below
    assert "above the bound" in _text(spectrum={"rank_max": 10})


def test_a_skewed_trace_and_an_even_one_read_differently():
    assert "a few points" in _text() and "carry most of the trace" in _text()
    even = _text(spectrum={"trace_mean": 2.1, "trace_median": 1.9})
    assert "median 1.90 and mean 2.10" in even and "a few points" not in even


def test_paths_and_crossings_are_described_from_their_numbers():
    none = _text()
    assert "0 of 3 paths came within tol = 0.5" in none
    assert "fell from 3.30 to 1.76, 47 % of the way" in none
    assert "they stopped: 3 at the step limit" in none
    assert "kept the prediction of all 4 points" in none
    assert "the prediction held for 4 of 4 points" in none  # the figure's caption too
    mixed = _text(leaf={"horizontal_status": ["reached", "stalled", "reached", "max_steps"],
                        "horizontal_reached": 2, "horizontal_final_distance_median": 3.5,
                        "across_prediction_kept": 0.5})
    assert "2 of 4 paths came within" in mixed
    assert "2 at the target, 1 stalled, 1 at the step limit" in mixed
    assert "did not shrink (3.30 → 3.50)" in mixed
    assert "kept the prediction of only 2 of 4 points" in mixed
    assert "the prediction held for 2 of 4 points" in mixed


def test_involutivity_zero_and_not_read_differently():
    assert "zero up to float64 rounding" in _text()
    smooth = _text(leaf={"involutivity_median": 0.02, "involutivity_max": 0.3})
    assert "median 0.0200, max 0.300, not zero" in smooth


def test_class_structure_of_m_follows_its_cosines():
    assert "mean cosine 0.46, two of different classes 0.07: the model's input " \
           "sensitivities cluster by class" in _text()
    flat = _text(gram={"within_class_cosine": 0.2, "between_class_cosine": 0.18,
                       "neighbor_label_agreement": 0.12})
    assert "show no clear class structure" in flat and "its label 12 % of the time" in flat


def test_the_density_integral_is_judged_by_its_value():
    assert "integrates to 1.000 over the plotted box, as a density should" in _text()
    assert "so 20.0 % of its mass lies outside the box" in _text(flow={"density_integral": 0.8})
    assert "the grid is too coarse" in _text(flow={"density_integral": 1.3})
    assert "stretches volume most on the data" in _text(flow={"logdet_on_data": 2.0})


def test_the_tangent_fractions_are_held_against_the_baseline():
    above = _text()
    assert "every method lies above it (1.8–1.9× the baseline)" in above
    assert "principal angle 35°" in above and "reconstruction error 0.0178 per pixel" in above
    low = {"gradient": 0.2, "input_x_gradient": 0.25, "integrated_gradients": 0.1,
           "smoothgrad": 0.28}
    assert "no method lies above it" in _text(manifold={"mean_fraction": low})
    one = _text(manifold={"mean_fraction": {**low, "smoothgrad": 0.6}, "latent_dim": 4})
    assert "only SmoothGrad lies above it" in one and "k = 4 dimensional" in one
    assert "as few as" not in above
    thin = _text(manifold={"tangent_dim_min": 4})
    assert "the decoder spans as few as 4 directions at some images" in thin


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self._in = False

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self._in = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in = False

    def handle_data(self, data):
        if self._in:
            self.cells[-1] += data


def test_tables_show_rounded_numbers_never_raw_json(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({
        "argv": ["manifoldlens", "demo"], "started": "2026-01-01T00:00:00+00:00",
        "wall_time_s": 111.39812, "seed": 0,
        "config": {"command": "demo", "steps": 1500, "keep_checkpoints": [500, 1000],
                   "arch_options": {"hidden": [128, 128]}, "lr": 0.0123456789},
        "environment": {"python": "3.11.7", "threads": 2}}))
    out = write_report(tmp_path, "t", report_sections(copy.deepcopy(RUN)))
    parser = _Cells()
    parser.feed(out.read_text())
    assert len(parser.cells) > 60
    for cell in parser.cells:
        assert "{" not in cell and "[" not in cell, cell
        assert not re.search(r"\d\.0*[1-9]\d{3,}", cell), cell  # rounded: ≤ 3 figures
    cells = dict(zip(parser.cells[::2], parser.cells[1::2], strict=False))
    assert cells["test accuracy"] == "97.2 %"
    assert cells["test loss (cross-entropy)"] == "0.0627 nats"
    assert cells["wall time (until the report)"] == "111 s"
    assert cells["keep checkpoints"] == "500, 1000"
    assert cells["arch options"] == "hidden: 128, 128"
    assert cells["lr"] == "0.0123"
    assert cells["points by numerical rank"].startswith("rank 1: 3 · rank 2: 15")
    assert cells["test negative log-likelihood"] == "1.83 nats per point"
    assert cells["median smallest principal angle, D_x vs tangent space"] == "35°"


def test_figures_are_embedded_and_missing_ones_left_out(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 16
    (tmp_path / "a.png").write_bytes(png)
    out = write_report(tmp_path, "t", [Section("s", "x", [("a.png", "A"), ("b.png", "B")])])
    html = out.read_text()
    assert html.count("<img") == 1 and "data:image/png;base64," in html and ">B" not in html


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
       st.integers(2, 5))
def test_quantity_rounds_to_significant_figures(v, digits):
    text = quantity(v, digits=digits)
    back = float(text)
    assert back == pytest.approx(v, rel=0.51 * 10.0 ** (1 - digits), abs=1e-300)
    mantissa = re.sub(r"e.*", "", text).lstrip("-").replace(".", "").lstrip("0")
    assert len(mantissa) <= max(digits, len(str(int(abs(v)))))


def test_quantity_and_percent_carry_units():
    assert quantity(2.0, "nats") == "2.00 nats" and quantity(12.3, "°", 2) == "12°"
    assert quantity(None, "s") == "—" and quantity(3, "steps") == "3 steps"
    assert quantity(math.inf) == "inf" and percent(0.5) == "50.0 %"


def _load_checker():
    path = Path(__file__).resolve().parents[1] / "scripts" / "check_report.py"
    spec = importlib.util.spec_from_file_location("check_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_the_report_opens_offline_in_a_real_browser(tmp_path):
    """scripts/check_report.py renders the report in headless Chromium, network cut off: every
    image loads and nothing outside the file is requested; a broken image and a remote one
    are caught."""
    script, checker = _load_checker()
    if checker.find_browser() is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    for name, colour in (("a", "tab:blue"), ("b", "tab:red")):
        fig = Figure(figsize=(2, 1.5))
        fig.subplots().plot([0, 1], [0, 1], color=colour)
        fig.savefig(tmp_path / f"{name}.png", dpi=50)
    sections = [Section("one", "text", [("a.png", "A"), ("b.png", "B")], {"x": 1.5})]
    report = write_report(tmp_path, "tiny", sections)
    proc = subprocess.run([sys.executable, str(script), str(report), "--min-images", "2"],
                          capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout)
    assert proc.returncode == 0 and result["ok"], result
    assert result["images"] == 2 and result["requests_outside_the_file"] == []

    html = report.read_text().replace(
        "</body>", "<img src='http://example.com/x.png'><img src='data:image/png;base64,AA'>"
        "</body>")
    bad = tmp_path / "bad.html"
    bad.write_text(html)
    result = checker.check_report(bad, min_images=2)
    assert not result["ok"] and result["requests_outside_the_file"] == ["http://example.com/x.png"]
    assert len(result["broken_images"]) == 2
