"""Flow training: determinism, resume, NaN handling, warm-up, and the ``flow`` commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from manifoldlens import flows
from manifoldlens.cli import main
from manifoldlens.data import load_dataset, make_toy_2d
from manifoldlens.flows.training import evaluate_flow, train_flow
from manifoldlens.models import load_checkpoint
from manifoldlens.runs import Run
from manifoldlens.training import RunOptions, fit


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train").subset(128, seed=0).images


def _glow(seed=0):
    torch.manual_seed(seed)
    return flows.Glow((1, 8, 8), levels=2, depth=2, hidden_channels=8)


def test_flow_training_lowers_bpd_and_is_deterministic(digits):
    test = load_dataset("digits", "test").subset(64, seed=0).images
    before = evaluate_flow(_glow(), test, n_bins=17)["test_bpd"]  # ActNorm not yet initialised
    a = train_flow(_glow(), digits, test_data=test, n_bins=17, steps=40, batch_size=32,
                   lr=3e-3, warmup_steps=5, progress=False)
    b = train_flow(_glow(), digits, test_data=test, n_bins=17, steps=40, batch_size=32,
                   lr=3e-3, warmup_steps=5, progress=False)
    assert a.metrics["test_bpd"] < before - 0.5
    assert a.metrics["test_bpd"] < math.log2(17)  # better than uniform over the 17 levels
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_flow_resume_matches_uninterrupted(digits, tmp_path):
    kw = {"n_bins": 17, "batch_size": 32, "lr": 1e-3, "warmup_steps": 4, "progress": False}
    full = train_flow(_glow(), digits, steps=12, **kw)
    with Run(tmp_path / "r", "flow") as run:
        train_flow(_glow(), digits, steps=6, run=RunOptions(run, checkpoint_every=3), **kw)
    with Run(tmp_path / "r", "flow", resume=True) as run:  # a new process: fresh model
        resumed = train_flow(_glow(seed=7), digits, steps=12,
                             run=RunOptions(run, checkpoint_every=3, resume=True), **kw)
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    for (name, ba), (_, bb) in zip(full.model.named_buffers(), resumed.model.named_buffers(),
                                   strict=True):
        assert torch.equal(ba, bb), name  # ActNorm's "initialized" came from the checkpoint


def test_resume_restores_metrics_mid_warmup(digits, tmp_path):
    test = load_dataset("digits", "test").subset(32, seed=0).images
    kw = {"n_bins": 17, "batch_size": 32, "lr": 1e-3, "warmup_steps": 10, "progress": False,
          "test_data": test, "eval_every": 3}
    full = train_flow(_glow(), digits, steps=6, **kw)
    with Run(tmp_path / "r", "flow") as run:
        train_flow(_glow(), digits, steps=3, run=RunOptions(run, checkpoint_every=3), **kw)
    with Run(tmp_path / "r", "flow", resume=True) as run:
        resumed = train_flow(_glow(seed=7), digits, steps=6,
                             run=RunOptions(run, checkpoint_every=3, resume=True), **kw)
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)  # warm-up resumed mid-ramp
    assert resumed.metrics == full.metrics and "test_bpd" in resumed.metrics
    with Run(tmp_path / "r", "flow", resume=True) as run:  # nothing left to do
        again = train_flow(_glow(seed=7), digits, steps=6,
                           run=RunOptions(run, checkpoint_every=3, resume=True), **kw)
    assert again.metrics == full.metrics


def test_nan_gradient_with_a_finite_loss_never_reaches_the_weights(tmp_path):
    from manifoldlens.models import load_weights

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step_loss(xb, yb, step):
        out = model(xb)
        if step == 1:  # finite loss, infinite gradient: d sqrt(|u|)/du at u = 0
            return (out - out.detach()).abs().sqrt().sum()
        return out.pow(2).mean()

    with Run(tmp_path / "r", "fit") as run, pytest.raises(FloatingPointError) as err:
        fit(model, x, None, step_loss, opt, batch_size=8, steps=4,
            run=RunOptions(run, checkpoint_every=1), progress=False)
    assert "gradient norm" in str(err.value) and "step-00000001.json" in str(err.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = torch.nn.Linear(3, 1)
    load_weights(tmp_path / "r" / "checkpoints" / "step-00000001.json", saved)
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_warmup_ramps_the_learning_rate(digits):
    seen = []

    class Spy(torch.optim.Adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    model = _glow()
    opt = Spy(model.parameters(), lr=1e-3)

    fit(model, digits, None, lambda xb, yb, s: -model.log_prob(xb).mean(), opt, batch_size=32,
        steps=6, warmup_steps=4, progress=False)
    np.testing.assert_allclose(seen, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    x = make_toy_2d("8gaussians", 512, seed=0)
    model = flows.RealNVP((2,), couplings=2, hidden=8)
    calls = {"n": 0}
    original = model.log_prob

    def breaking(v):  # the loss turns NaN at the 8th step
        calls["n"] += 1
        out = original(v)
        return out * float("nan") if calls["n"] >= 8 else out

    model.log_prob = breaking
    with Run(tmp_path / "r", "flow") as run, pytest.raises(FloatingPointError) as err:
        train_flow(model, x, n_bins=None, steps=20, batch_size=64, progress=False,
                   run=RunOptions(run, checkpoint_every=5))
    assert "step 8" in str(err.value) and "step-00000005.json" in str(err.value)
    assert (tmp_path / "r" / "checkpoints" / "step-00000005.json").is_file()


def _doc(out):
    return json.loads((out / "run.json").read_text())


def test_flow_commands_on_a_toy(tmp_path):
    out = tmp_path / "moons"
    assert main(["flow", "train", "--data", "two-moons", "--steps", "40", "--limit", "512",
                 "--test-limit", "256", "--hidden", "16", "--couplings", "4", "--out", str(out),
                 "--no-progress"]) == 0
    doc = _doc(out)
    assert doc["command"] == "flow-train" and doc["status"] == "ok"
    assert np.isfinite(doc["metrics"]["test_nll"])
    assert {"density.png", "volume_change.png"} <= {p.name for p in out.glob("*.png")}
    model, meta = load_checkpoint(out / "model.json")
    assert isinstance(model, flows.RealNVP) and meta["n_bins"] is None
    assert main(["flow", "sample", str(out / "model.json"), "--n", "50", "--out",
                 str(tmp_path / "s"), "--no-progress"]) == 0
    arrays = np.load(tmp_path / "s" / "samples.npz")
    assert arrays["T1.0"].shape == (50, 2)


@pytest.mark.parametrize("kind", ["glow", "realnvp", "nice"])
def test_flow_commands_on_digits(tmp_path, kind):
    out = tmp_path / kind
    small = {"glow": ["--depth", "1", "--hidden-channels", "4"],
             "realnvp": ["--hidden-channels", "4", "--blocks", "1"],
             "nice": ["--hidden", "16", "--depth", "1"]}[kind]
    assert main(["flow", "train", "--data", "digits", "--model", kind, *small, "--steps", "6",
                 "--limit", "100", "--test-limit", "40", "--out", str(out),
                 "--no-progress"]) == 0
    bpd = _doc(out)["metrics"]["test_bpd"]
    assert np.isfinite(bpd) and bpd > 0
    assert {"samples.png", "interpolation.png"} <= {p.name for p in out.glob("*.png")}
    ev = tmp_path / "eval"
    assert main(["flow", "eval", str(out / "model.json"), "--limit", "40", "--out", str(ev),
                 "--no-progress"]) == 0
    assert _doc(ev)["metrics"]["n"] == 40
    it = tmp_path / "interp"
    assert main(["flow", "interpolate", str(out / "model.json"), "--pairs", "2", "--steps", "4",
                 "--out", str(it), "--no-progress"]) == 0
    assert np.load(it / "interpolation.npz")["frames"].shape == (2, 4, 1, 8, 8)


def test_flow_command_errors_are_clear(tmp_path, capsys):
    rc = main(["flow", "train", "--data", "two-moons", "--model", "glow", "--steps", "1",
               "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "Glow is a flow for images" in capsys.readouterr().err
    rc = main(["flow", "train", "--data", "fashion-mnist", "--model", "glow", "--levels", "3",
               "--steps", "1", "--limit", "20", "--out", str(tmp_path / "y"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and ("divisible" in err or "not found" in err.lower())
