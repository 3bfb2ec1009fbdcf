"""A resumable state records what produced it — the model (spec, or class and parameter
shapes; for paths, its weights too), the data (size, shape, sha256) and every setting — and
refuses a resume that differs, naming the fields, before touching the model. Settings that may
legitimately change are allowed explicitly, applied, and recorded in the run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from manifoldlens.cli import main
from manifoldlens.flows import RealNVP
from manifoldlens.flows.training import train_flow
from manifoldlens.foliation import horizontal_path, leaf_crossing_path
from manifoldlens.models import load_weights
from manifoldlens.runs import Run
from manifoldlens.training import RunOptions, train_classifier

from helpers import TinyMLP, digits_mlp, make


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_resume_with_another_model_is_refused_and_leaves_it_untouched(digits, tmp_path):
    with Run(tmp_path / "r", "train") as run:
        train_classifier(digits_mlp(), digits, steps=4, batch_size=30, progress=False,
                         run=RunOptions(run, checkpoint_every=2))
    other = digits_mlp("tanh", seed=3)
    before = _state(other)
    with Run(tmp_path / "r", "train", resume=True) as run, \
            pytest.raises(ValueError, match=r"other settings \(model\)"):
        train_classifier(other, digits, steps=8, batch_size=30, progress=False,
                         run=RunOptions(run, checkpoint_every=2, resume=True))
    after = _state(other)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_resume_on_other_data_is_refused(digits, tmp_path):
    with Run(tmp_path / "r", "train") as run:
        train_classifier(digits_mlp(), digits, steps=4, batch_size=30, progress=False,
                         run=RunOptions(run, checkpoint_every=2))
    shifted = (digits.images.flip(-1), digits.labels)  # same size and shape, other images
    with Run(tmp_path / "r", "train", resume=True) as run, \
            pytest.raises(ValueError, match=r"other settings \(data\)"):
        train_classifier(digits_mlp(), shifted, steps=8, batch_size=30, progress=False,
                         run=RunOptions(run, checkpoint_every=2, resume=True))


def test_flow_resume_on_other_data_is_refused(tmp_path):
    torch.manual_seed(0)
    a, b = torch.randn(256, 2), torch.randn(256, 2) + 3
    with Run(tmp_path / "r", "flow") as run:
        train_flow(RealNVP((2,), couplings=2, hidden=8), a, n_bins=None, steps=2,
                   progress=False, run=RunOptions(run, checkpoint_every=2))
    with Run(tmp_path / "r", "flow", resume=True) as run, \
            pytest.raises(ValueError, match=r"other settings \(data\)"):
        train_flow(RealNVP((2,), couplings=2, hidden=8), b, n_bins=None, steps=4,
                   progress=False, run=RunOptions(run, checkpoint_every=2, resume=True))


def test_an_allowed_change_is_applied_and_recorded(digits, tmp_path):
    with Run(tmp_path / "r", "train") as run:
        train_classifier(digits_mlp(), digits, steps=4, batch_size=30, lr=0.1, progress=False,
                         run=RunOptions(run, checkpoint_every=2))
    with Run(tmp_path / "r", "train", resume=True) as run, \
            pytest.raises(ValueError, match=r"other settings \(lr\)"):
        train_classifier(digits_mlp(), digits, steps=8, batch_size=30, lr=0.01, progress=False,
                         run=RunOptions(run, checkpoint_every=2, resume=True))
    model = digits_mlp()
    with Run(tmp_path / "r", "train", resume=True) as run:
        res = train_classifier(model, digits, steps=8, batch_size=30, lr=0.01, progress=False,
                               run=RunOptions(run, checkpoint_every=2, resume=True,
                                              allow_changes=("lr",)))
        records = run.read_log("resume")
    assert res.step == 8
    assert records == [{"resume": {"step": 4, "changed": {"lr": [0.1, 0.01]}}}]
    manifest = json.loads(res.checkpoint.read_text())["metadata"]
    assert manifest["resumes"] == [{"step": 4, "changed": {"lr": [0.1, 0.01]}}]
    assert manifest["train_config"]["lr"] == 0.01
    with pytest.raises(ValueError, match="cannot include"):
        RunOptions(Run(tmp_path / "x", "train"), resume=True, allow_changes=("data",))


def test_the_resumed_optimizer_uses_the_new_learning_rate(digits, tmp_path):
    """After an allowed lr change the optimizer steps with the new lr, not the checkpoint's."""
    x, y = digits.images, digits.labels
    with Run(tmp_path / "r", "train") as run:
        train_classifier(digits_mlp(), (x, y), steps=2, batch_size=30, lr=0.1, progress=False,
                         run=RunOptions(run, checkpoint_every=2))
    resumed = digits_mlp()
    with Run(tmp_path / "r", "train", resume=True) as run:
        train_classifier(resumed, (x, y), steps=3, batch_size=30, lr=0.0, progress=False,
                         run=RunOptions(run, checkpoint_every=1, resume=True,
                                        allow_changes=("lr",)))
    step2 = digits_mlp()
    load_weights(tmp_path / "r" / "checkpoints" / "step-00000003.json", resumed)
    with Run(tmp_path / "s", "train") as run:
        train_classifier(step2, (x, y), steps=2, batch_size=30, lr=0.1, progress=False,
                         run=RunOptions(run, checkpoint_every=2))
    # lr = 0 on the resumed step: the weights stay those of step 2
    for a, b in zip(resumed.parameters(), step2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_path_state_resumed_with_another_model_is_refused(tmp_path):
    g = torch.Generator().manual_seed(4)
    src = torch.randn(2, 12, dtype=torch.float64, generator=g)
    tgt = torch.randn(2, 12, dtype=torch.float64, generator=g)
    kw = dict(step_size=0.05, max_steps=10, tol=1e-4, checkpoint_dir=tmp_path / "p")
    horizontal_path(make(TinyMLP(act=nn.Tanh), seed=0), src, tgt, **kw)
    with pytest.raises(ValueError, match=r"different horizontal path \(differing: model\)"):
        horizontal_path(make(TinyMLP(act=nn.Tanh), seed=1), src, tgt, **kw)
    kw = dict(steps=5, checkpoint_dir=tmp_path / "c")
    leaf_crossing_path(make(TinyMLP(act=nn.Tanh), seed=0), src, **kw)
    with pytest.raises(ValueError, match=r"differing: model, x"):
        leaf_crossing_path(make(TinyMLP(act=nn.Tanh), seed=1), src + 1, **kw)


def test_cli_train_resume_with_another_activation_is_refused(tmp_path, capsys):
    out = str(tmp_path / "r")
    common = ["--out", out, "--arch", "mlp", "--hidden", "16", "--steps", "4",
              "--checkpoint-every", "2", "--no-progress"]
    assert main(["train", *common, "--activation", "relu"]) == 0
    code = main(["train", *common, "--activation", "tanh", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "other settings (model)" in err[-1]
    assert main(["train", *common, "--activation", "relu", "--resume", "--lr", "0.005",
                 "--allow-change", "lr"]) == 0
