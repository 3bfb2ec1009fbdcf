"""What a third pass found, pinned: sizes beyond the data that were clipped while ``run.json``
recorded the size asked for, options that were ignored (``--eps`` without ``--adversarial``),
manifold checkpoints that did not say which data made them, and hostile training metadata."""

from __future__ import annotations

import json

import pytest
import torch

from manifoldlens.cli import main
from manifoldlens.commands.classifier import run_gram
from manifoldlens.commands.common import split_sha256, verify_split
from manifoldlens.data import load_dataset
from manifoldlens.runs import Run
from manifoldlens.training import RunOptions, check_schedule, train_classifier

from helpers import digits_mlp


def test_a_batch_larger_than_the_data_is_refused(digits):
    with pytest.raises(ValueError, match=r"batch_size=500 exceeds the 120 training points"):
        check_schedule(120, 500, None, 10)
    model = digits_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="batch_size"):
        train_classifier(model, digits, steps=3, batch_size=121, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("argv, message", [
    (["train", "--arch", "mlp", "--steps", "2", "--probe-size", "5000"],
     "probe_size=5000 exceeds the"),
    (["train", "--arch", "mlp", "--steps", "2", "--batch-size", "100000"],
     "batch_size=100000 exceeds the"),
    (["manifold", "train", "nowhere", "--eps", "2"], "eps and pgd_steps set the adversarial"),
    (["manifold", "train", "nowhere", "--pgd-steps", "7"], "eps and pgd_steps"),
])
def test_sizes_and_ignored_options_are_refused(argv, message, tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*argv, "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if argv[0] == "manifold":  # a check across options: refused before the run exists
        assert not out.exists()


def test_flow_interpolate_refuses_bad_sizes_and_steps(tmp_path, capsys):
    # --steps 1: a usage error from the parser, nothing created
    with pytest.raises(SystemExit) as e:
        main(["flow", "interpolate", "ck.json", "--steps", "1", "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and not (tmp_path / "a").exists()
    capsys.readouterr()
    ck = tmp_path / "flow"
    assert main(["flow", "train", "--data", "digits", "--model", "nice", "--steps", "2",
                 "--batch-size", "16", "--no-progress", "--out", str(ck)]) == 0
    assert main(["flow", "interpolate", str(ck / "model.json"), "--pairs", "1000",
                 "--no-progress", "--out", str(tmp_path / "b")]) == 2
    assert "pairs=1000 needs 2000 test images" in capsys.readouterr().err


def test_a_limit_beyond_the_split_is_refused(tmp_path, capsys):
    ck = tmp_path / "clf"
    assert main(["train", "--arch", "mlp", "--steps", "2", "--no-progress", "--out",
                 str(ck)]) == 0
    assert main(["spectrum", str(ck / "model.json"), "--limit", "100000", "--no-progress",
                 "--out", str(tmp_path / "s")]) == 2
    assert "limit=100000 exceeds the 360 images" in capsys.readouterr().err
    six = load_dataset("digits", "test").subset(6, seed=0)
    with Run(tmp_path / "g", "gram") as run, \
            pytest.raises(ValueError, match="neighbors=6 needs more than 6 images"):
        run_gram(run, digits_mlp(), six, neighbors=6, progress=False)
    assert not (tmp_path / "g" / "gram.npy").exists()


def test_verify_split_refuses_data_rewritten_under_the_same_name(digits):
    meta = {"data_sha256": {"train": split_sha256(digits)}}
    verify_split(meta, digits, "train", "hint")  # the same data passes
    verify_split({}, digits, "train", "hint")  # an older checkpoint records none: passes
    flipped = load_dataset("digits", "train").subset(120, seed=0)
    flipped.images = flipped.images.flip(-1)
    with pytest.raises(ValueError, match="sha256 differs.*hint"):
        verify_split(meta, flipped, "train", "hint")


@pytest.mark.parametrize("field, value, message", [
    ("train_config", "sgd", "'train_config' should be a dict"),
    ("resumes", {"a": 1}, "'resumes' should be a list"),
    ("resumes", [1, 2], "'resumes' should hold objects"),
    ("history", "x", "'history' should be a list"),
    ("step", "7", "'step' should be a int"),
    ("step", -4, "step is negative"),
    ("rng_state", [300] * 5, "rng_state is not a CPU generator state"),
    ("metrics", [1], "'metrics' should be a dict"),
])
def test_hostile_training_metadata_is_refused_by_name(digits, tmp_path, field, value, message):
    with Run(tmp_path / "r", "train") as run:
        train_classifier(digits_mlp(), digits, steps=4, batch_size=30, progress=False,
                         run=RunOptions(run, checkpoint_every=2))
    for manifest in (tmp_path / "r" / "checkpoints").glob("*.json"):
        doc = json.loads(manifest.read_text())
        doc["metadata"][field] = value
        manifest.write_text(json.dumps(doc))
    model = digits_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with Run(tmp_path / "r", "train", resume=True) as run, \
            pytest.raises(ValueError, match=message):
        train_classifier(model, digits, steps=8, batch_size=30, progress=False,
                         run=RunOptions(run, checkpoint_every=2, resume=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_barely_trained_model_is_flagged(tmp_path, capsys):
    from manifoldlens.commands.classifier import untrained_warning
    assert untrained_warning(0.97, 10, 1500) is None
    assert "barely trained: test accuracy 20.0% after 300 steps (chance 10.0%)" in \
        untrained_warning(0.2, 10, 300)
    assert untrained_warning(0.76, 2, 10) is None
    assert untrained_warning(0.70, 2, 10) is not None  # below (1 + 1/2)/2 = 0.75
    out = tmp_path / "r"
    assert main(["train", "--arch", "linear", "--steps", "1", "--momentum", "0", "--lr",
                 "1e-4", "--no-progress", "--out", str(out)]) == 0
    assert "warning: the model is barely trained" in capsys.readouterr().err
    assert "barely trained" in json.loads((out / "run.json").read_text())["metrics"]["warning"]
