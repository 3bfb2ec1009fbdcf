"""Options that make no sense are refused at the boundary — the library's signature and the
CLI's parser — with one clear error naming the option and its range, before any work, before
a model is touched and before a run directory exists. A refused call leaves the model as it
was; half-precision models and models that return tuples get an answer, not a crash."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import manifoldlens as ml
from manifoldlens import flows
from manifoldlens.cli import main
from manifoldlens.data import load_dataset
from manifoldlens.flows.training import train_flow
from manifoldlens.models import create_model
from manifoldlens.training import RunOptions, train_classifier

from helpers import TinyMLP, make

BAD_FLOATS = st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 0.0])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train").subset(60, seed=0)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ training options


@settings(max_examples=12, deadline=None)
@given(clip=BAD_FLOATS, warmup=st.integers(-5, -1))
def test_flow_training_refuses_bad_options_before_touching_the_model(clip, warmup):
    x = torch.rand(64, 1, 8, 8)
    model = flows.Glow((1, 8, 8), levels=1, depth=1, hidden_channels=4)
    before = _state(model)  # ActNorm is not initialised yet: a refused call must keep it so
    with pytest.raises(ValueError, match="clip_grad_norm"):
        train_flow(model, x, steps=1, clip_grad_norm=clip, progress=False)
    with pytest.raises(ValueError, match="warmup_steps"):
        train_flow(model, x, steps=1, warmup_steps=warmup, progress=False)
    with pytest.raises(ValueError, match="n_bins"):
        train_flow(model, x, steps=1, n_bins=1, progress=False)
    assert _same(before, _state(model))


def test_classifier_training_refuses_bad_schedules(digits):
    model = create_model("mlp", (1, 8, 8), 10, hidden=(8,))
    before = _state(model)
    for kw, what in (({"steps": -1}, "steps"), ({"epochs": float("nan")}, "epochs"),
                     ({"steps": 1, "batch_size": 0}, "batch_size"),
                     ({"steps": 1, "batch_size": True}, "batch_size")):
        with pytest.raises(ValueError, match=what):
            train_classifier(model, digits, progress=False, **kw)
    with pytest.raises(ValueError, match="checkpoint_every"):
        RunOptions(checkpoint_every=-1)
    assert RunOptions(checkpoint_every=0).checkpoint_every is None  # 0: no checkpoints
    assert _same(before, _state(model))


# ------------------------------------------------------------------ paths, flows, chunks


@settings(max_examples=10, deadline=None)
@given(bad=BAD_FLOATS)
def test_path_options_are_checked(bad):
    model = make(TinyMLP())
    x = torch.randn(2, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="step_size"):
        ml.horizontal_path(model, x, x + 1, step_size=bad, max_steps=1)
    if not (math.isfinite(bad) and bad >= 0):
        with pytest.raises(ValueError, match="tol"):
            ml.horizontal_path(model, x, x + 1, tol=bad, max_steps=1)
    with pytest.raises(ValueError, match="record_every"):
        ml.leaf_crossing_path(model, x, steps=1, record_every=0)
    with pytest.raises(ValueError, match="clamp"):
        ml.leaf_crossing_path(model, x, steps=1, clamp=(0.0, bad) if bad <= 0 else (bad, 0.0))


@pytest.mark.parametrize("build,what", [
    (lambda: flows.Glow((1, 8, 8), levels=0), "levels"),
    (lambda: flows.Glow((1, 8, 8), depth=-1), "depth"),
    (lambda: flows.RealNVP((2,), couplings=0), "couplings"),
    (lambda: flows.NICE((4,), couplings=0), "couplings"),
    (lambda: flows.NICE((4,), hidden=True), "hidden"),
])
def test_flow_sizes_are_checked(build, what):
    with pytest.raises(ValueError, match=what):
        build()


@pytest.mark.parametrize("t", [float("nan"), 0.0, -1.0, float("inf")])
def test_sampling_temperature_is_checked(t):
    with pytest.raises(ValueError, match="temperature"):
        flows.RealNVP((2,), couplings=2, hidden=4).sample(3, temperature=t)


@pytest.mark.parametrize("chunk", [0, -2, True, 1.5])
def test_chunk_sizes_are_checked(chunk):
    model = make(TinyMLP())
    with pytest.raises(ValueError, match="chunk_size"):
        ml.jacobian(model, torch.randn(3, 12, dtype=torch.float64), chunk_size=chunk)


# ------------------------------------------------------------------ checks before forward


def test_a_refused_gram_leaves_batchnorm_statistics_untouched():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))  # train mode
    before = _state(model)
    with pytest.raises(ValueError, match="BatchNorm1d.*model.eval"):
        ml.jacobian_gram(model, torch.randn(5, 6))
    with pytest.raises(ValueError, match="model.eval"):
        ml.local_data_matrix(model, torch.randn(5, 6))
    assert _same(before, _state(model))  # running_mean, num_batches_tracked unchanged


# ------------------------------------------------------------------ dtypes, output types


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_get_G_in_float32(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    exact = ml.local_data_matrix(model, x)
    G = ml.local_data_matrix(model.to(dtype), x.to(dtype))
    assert G.eigenvalues.dtype == torch.float32 and G.rank().tolist() == exact.rank().tolist()
    scale = float(exact.eigenvalues.max())
    tol = 0.05 if dtype == torch.float16 else 0.2  # the Jacobian itself is half precision
    assert torch.allclose(G.eigenvalues.double(), exact.eigenvalues, atol=tol * scale)
    v = torch.randn(5, 6, dtype=torch.float64)
    err = (G.project(v.to(dtype)).double() - exact.project(v)).norm() / v.norm()
    assert err < tol


class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), x


class _Dict(_Tuple):
    def forward(self, x):
        return {"logits": self.fc(x)}


@pytest.mark.parametrize("model,kind", [(_Tuple(), "tuple"), (_Dict(), "dict")])
@pytest.mark.parametrize("call", [
    lambda m, x: ml.jacobian(m, x), lambda m, x: ml.local_data_matrix(m, x),
    lambda m, x: ml.jacobian_gram(m, x), lambda m, x: ml.explain(m, x, "gradient"),
    lambda m, x: ml.leaf_crossing_path(m, x, steps=1),
])
def test_models_returning_tuples_or_dicts_are_told_what_to_return(model, kind, call):
    with pytest.raises(TypeError, match=f"returned a {kind}.*callable that returns the scores"):
        call(model, torch.randn(2, 4))


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize("argv", [
    ["leaf", "horizontal", "x.json", "--step-size", "nan"],
    ["leaf", "across", "x.json", "--record-every", "0"],
    ["leaf", "horizontal", "x.json", "--tol", "-1"],
    ["leaf", "across", "x.json", "--n", "-1"],
    ["flow", "train", "--levels", "0"],
    ["flow", "train", "--clip", "-1"],
    ["flow", "train", "--warmup", "-3"],
    ["flow", "sample", "x.json", "--temperatures", "0.5,nan"],
    ["train", "--limit", "0"],
    ["train", "--checkpoint-every", "-1"],
    ["train", "--lr", "inf"],
    ["train", "--hidden", "16,0"],
    ["manifold", "roar", "d", "c.json", "--fractions", "0.5,1.5"],
])
def test_cli_refuses_nonsense_before_creating_anything(argv, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("manifoldlens") and "must be" in err[-1]
    assert not out.exists()


@pytest.mark.parametrize("device,why", [("bogus", "unknown device"),
                                         ("cuda:7", "CUDA|CUDA device"),
                                         ("tpu", "unknown device|runs on")])
def test_cli_bad_device_is_one_line_and_creates_nothing(device, why, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    code = main(["train", "--device", device, "--out", str(tmp_path / "r"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert __import__("re").search(why, err[0])
    assert not (tmp_path / "r").exists()


def test_cli_out_under_a_file_or_unwritable(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code = main(["train", "--out", str(tmp_path / "f" / "r"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is a file" in err[0]
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        target = locked / "r"
        if os.access(locked, os.W_OK):  # root writes anywhere: /sys refuses even root
            if not os.path.isdir("/sys/kernel"):
                pytest.skip("no directory this user cannot write to")
            target = Path("/sys/manifoldlens-test/r")
        code = main(["train", "--out", str(target), "--steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1
        assert "not permitted" in err[0] or "ermission" in err[0]
        assert not target.exists()
    finally:
        locked.chmod(0o700)


def test_a_failed_run_directory_is_reused_by_the_same_command(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", "--data", "nosuchset", "--out", out, "--steps", "1",
                 "--no-progress"]) == 2
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"
    capsys.readouterr()
    assert main(["train", "--arch", "mlp", "--hidden", "8", "--out", out, "--steps", "2",
                 "--checkpoint-every", "0", "--no-progress"]) == 0
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "ok"
    # a finished run is not taken over
    assert main(["train", "--out", out, "--steps", "1", "--no-progress"]) == 2
    assert "cannot be used for a new run" in capsys.readouterr().err


def test_cli_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "spectrum", str(tmp_path / "missing.json"),
              "--out", str(tmp_path / "o")])
