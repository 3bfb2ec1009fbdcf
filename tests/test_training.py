"""Training: determinism, resume, NaN handling, the trace-of-G callback, run directories."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from manifoldlens import viz
from manifoldlens.callbacks import TraceOfG
from manifoldlens.data import load_dataset
from manifoldlens.models import create_model, load_weights
from manifoldlens.runs import Run
from manifoldlens.training import RunOptions, evaluate, train_classifier


@pytest.fixture(scope="module")
def digits():
    train = load_dataset("digits", "train").subset(240, seed=0)
    test = load_dataset("digits", "test").subset(100, seed=0)
    return train, test


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("mlp", (1, 8, 8), 10, hidden=(32,))


def test_training_learns_and_is_deterministic(digits):
    train, test = digits
    a = train_classifier(_model(), train, test_data=test, steps=120, lr=0.1, progress=False)
    b = train_classifier(_model(), train, test_data=test, steps=120, lr=0.1, progress=False)
    assert a.metrics["test_accuracy"] > 0.6
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert evaluate(a.model, test)["accuracy"] == a.metrics["test_accuracy"]


def test_resume_matches_uninterrupted(digits, tmp_path):
    train, _ = digits
    full = train_classifier(_model(), train, steps=25, batch_size=32, lr=0.1, momentum=0.9,
                            progress=False)
    with Run(tmp_path / "r", "train") as run:
        train_classifier(_model(), train, steps=10, batch_size=32, lr=0.1, momentum=0.9,
                         run=RunOptions(run, checkpoint_every=5), progress=False)
    # a fresh process would rebuild the model from scratch and resume from step 10
    with Run(tmp_path / "r", "train", resume=True) as run:
        resumed = train_classifier(_model(seed=123), train, steps=25, batch_size=32, lr=0.1,
                                   momentum=0.9, progress=False,
                                   run=RunOptions(run, checkpoint_every=5, resume=True))
    assert resumed.step == 25
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("*.json"))
    assert ckpts == ["step-00000025.json"]  # only the latest is kept


class _Breaks(nn.Module):
    """An MLP whose output turns NaN from its ``at``-th training forward pass on."""

    def __init__(self, at: int):
        super().__init__()
        self.net = _model()
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += self.training
        out = self.net(x)
        return out * float("nan") if self.training and self.calls >= self.at else out


def test_nan_loss_stops_and_keeps_checkpoint(digits, tmp_path):
    train, _ = digits
    model = _Breaks(at=6)
    with pytest.raises(FloatingPointError, match="step 6.*last good checkpoint.*step-00000004"):
        with Run(tmp_path / "r", "train") as run:
            train_classifier(model, train, steps=50, run=RunOptions(run, checkpoint_every=2),
                             progress=False)
    doc = json.loads((tmp_path / "r" / "run.json").read_text())
    assert doc["status"] == "failed" and "FloatingPointError" in doc["error"]
    fresh = _Breaks(at=10**9)
    meta = load_weights(tmp_path / "r" / "checkpoints" / "step-00000004.json", fresh)
    assert meta["step"] == 4
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_nan_training_data_refused(digits):
    train, _ = digits
    x = train.images.clone()
    x[7, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"train_data.*NaN.*\[7\]"):
        train_classifier(_model(), (x, train.labels), steps=1, progress=False)


def test_trace_of_g_callback(digits, tmp_path):
    train, test = digits
    cb = TraceOfG(test.images[:20], every=10, beta=0.5)
    with Run(tmp_path / "r", "train") as run:
        train_classifier(_model(), train, steps=30, lr=0.1, callbacks=[cb], run=run,
                         progress=False)
        run.save_figure("trace_of_g", viz.plot_trace_of_g(cb.records))  # commands draw
    assert [r["step"] for r in cb.records] == [0, 10, 20, 30]
    r0, r1 = cb.records[:2]
    assert r1["ema_trace"] == pytest.approx(0.5 * r0["ema_trace"] + 0.5 * r1["mean_trace"])
    assert all(0 <= r["mean_rank"] <= 9 for r in cb.records)
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    assert sum("trace_of_g" in r for r in logged) == 4
    assert (tmp_path / "r" / "trace_of_g.png").stat().st_size > 10_000


def test_batchnorm_model_trains_and_probe_uses_eval(digits):
    train, test = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, 10))
    cb = TraceOfG(test.images[:10], every=5)
    train_classifier(model, train, steps=5, callbacks=[cb], progress=False)
    assert len(cb.records) == 2 and not model.training


def test_bad_arguments(digits, tmp_path):
    train, _ = digits
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        train_classifier(_model(), train, progress=False)
    with pytest.raises(ValueError, match="run directory"):
        train_classifier(_model(), train, steps=1, run=RunOptions(checkpoint_every=1),
                         progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        train_classifier(_model(), train, steps=1, optimizer="lbfgs", progress=False)
    Run(tmp_path / "x", "train").finish()
    with pytest.raises(FileExistsError, match="resume"):
        Run(tmp_path / "x", "train")


def test_resume_after_crash_keeps_logs_consistent(digits, tmp_path):
    train, test = digits
    model = _Breaks(at=14)  # NaN from the 14th training step: stops with last checkpoint 10
    cb = TraceOfG(test.images[:8], every=2)
    with pytest.raises(FloatingPointError), Run(tmp_path / "r", "train") as run:
        train_classifier(model, train, steps=20, callbacks=[cb], progress=False,
                         run=RunOptions(run, checkpoint_every=5))
    model.at = 10**9
    cb = TraceOfG(test.images[:8], every=2)
    with Run(tmp_path / "r", "train", resume=True) as run:
        train_classifier(model, train, steps=20, callbacks=[cb],
                         run=RunOptions(run, checkpoint_every=5, resume=True), progress=False)
        records = run.read_log("trace_of_g")
    steps = [r["trace_of_g"]["step"] for r in records]
    assert steps == list(range(0, 21, 2))
    assert [r["step"] for r in cb.records] == steps
    with pytest.raises(ValueError, match="other settings.*batch_size"):
        with Run(tmp_path / "r", "train", resume=True) as run:
            train_classifier(model, train, steps=30, batch_size=17, progress=False,
                             run=RunOptions(run, checkpoint_every=5, resume=True))


def test_a_single_leftover_point_joins_the_last_batch_of_a_batch_norm_model():
    """BatchNorm in train mode cannot normalise one point: with n = 2·batch + 1 the epoch has
    two steps, the second of batch + 1 points; without BatchNorm it has three."""
    from manifoldlens.training import fit

    x, y = torch.randn(9, 3), torch.randint(0, 2, (9,))
    sizes = []

    def loss(model):
        def step_loss(xb, yb, step):
            sizes.append(len(xb))
            return F.cross_entropy(model(xb), yb)
        return step_loss

    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    fit(bn, x, y, loss(bn), torch.optim.SGD(bn.parameters(), lr=0.1), batch_size=4, epochs=2,
        progress=False)
    assert sizes == [4, 5, 4, 5]
    sizes.clear()
    plain = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    fit(plain, x, y, loss(plain), torch.optim.SGD(plain.parameters(), lr=0.1), batch_size=4,
        epochs=1, progress=False)
    assert sizes == [4, 4, 1]
