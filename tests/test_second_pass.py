"""What a second adversarial pass found, pinned: a resume of another command's run, a refused
resume that rewrote the old record, settings a fingerprint did not cover (adversarial
training off → on, the trace probe), a resume past its steps, an empty --out, two classifiers
under one name, float64 inputs to a float32 model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import manifoldlens as ml
from manifoldlens.callbacks import TraceOfG
from manifoldlens.cli import main
from manifoldlens.data import load_dataset
from manifoldlens.runs import Run
from manifoldlens.training import RunOptions, train_classifier

from helpers import digits_mlp

TRAIN = ["train", "--arch", "mlp", "--hidden", "16", "--limit", "200", "--steps", "20",
         "--checkpoint-every", "10", "--trace-every", "10", "--probe-size", "10",
         "--no-progress"]


def test_a_resume_of_another_commands_run_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*TRAIN, "--out", str(out)]) == 0
    before = (out / "run.json").read_text()
    log = (out / "metrics.jsonl").read_text()
    code = main(["flow", "train", "--data", "digits", "--steps", "2", "--out", str(out),
                 "--resume", "--no-progress"])
    assert code == 2 and "holds a run of train, not of flow-train" in capsys.readouterr().err
    assert (out / "run.json").read_text() == before
    assert (out / "metrics.jsonl").read_text() == log


def test_a_refused_resume_leaves_the_runs_record_as_it_was(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*TRAIN, "--out", str(out)]) == 0
    before = (out / "run.json").read_text()
    code = main([*TRAIN, "--out", str(out), "--resume", "--activation", "tanh"])
    assert code == 2 and "other settings (model)" in capsys.readouterr().err
    assert (out / "run.json").read_text() == before  # still "ok", still the relu config


def test_adversarial_training_cannot_be_switched_on_at_a_resume(digits, tmp_path):
    with Run(tmp_path / "r", "train") as run:
        train_classifier(digits_mlp(), digits, steps=4, batch_size=30, progress=False,
                         run=RunOptions(run, checkpoint_every=2))
    with Run(tmp_path / "r", "train", resume=True) as run, \
            pytest.raises(ValueError, match=r"other settings \(adversarial\)"):
        train_classifier(digits_mlp(), digits, steps=8, batch_size=30, progress=False,
                         adversarial={"eps": (1.0,), "steps": 2},
                         run=RunOptions(run, checkpoint_every=2, resume=True))


def test_the_trace_probe_is_part_of_the_fingerprint(digits, tmp_path):
    test = load_dataset("digits", "test")
    with Run(tmp_path / "r", "train") as run:
        train_classifier(digits_mlp(), digits, steps=4, batch_size=30, progress=False,
                         callbacks=[TraceOfG(test.images[:10], every=2)],
                         run=RunOptions(run, checkpoint_every=2))
    with Run(tmp_path / "r", "train", resume=True) as run, \
            pytest.raises(ValueError, match=r"other settings \(callbacks\)"):
        train_classifier(digits_mlp(), digits, steps=8, batch_size=30, progress=False,
                         callbacks=[TraceOfG(test.images[:20], every=2)],
                         run=RunOptions(run, checkpoint_every=2, resume=True))
    with pytest.raises(ValueError, match="cannot include"):
        RunOptions(Run(tmp_path / "x", "train"), resume=True, allow_changes=("callbacks",))


def test_a_resume_past_its_steps_and_unknown_allowed_changes_are_refused(digits, tmp_path):
    with Run(tmp_path / "r", "train") as run:
        train_classifier(digits_mlp(), digits, steps=4, batch_size=30, progress=False,
                         run=RunOptions(run, checkpoint_every=2))
    model = digits_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with Run(tmp_path / "r", "train", resume=True) as run, \
            pytest.raises(ValueError, match="at step 4, past the 2 steps"):
        train_classifier(model, digits, steps=2, batch_size=30, progress=False,
                         run=RunOptions(run, checkpoint_every=2, resume=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with Run(tmp_path / "r", "train", resume=True) as run, \
            pytest.raises(ValueError, match=r"unknown settings \['bogus'\]"):
        train_classifier(model, digits, steps=8, batch_size=30, progress=False,
                         run=RunOptions(run, checkpoint_every=2, resume=True,
                                        allow_changes=("bogus",)))


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    with pytest.warns(UserWarning, match="nothing to resume"):
        Run(tmp_path / "new", "train", resume=True).finish("ok")


def test_an_empty_out_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", "", "--steps", "1"])
    assert e.value.code == 2 and "--out: is empty" in capsys.readouterr().err
    assert not (tmp_path / "run.json").exists()


def test_two_classifiers_under_one_name_are_refused(tmp_path):
    from manifoldlens.commands.manifold import run_manifold_fraction

    with Run(tmp_path / "f", "manifold-fraction") as run, \
            pytest.raises(ValueError, match="not distinct"):
        run_manifold_fraction(run, ["a/run/model.json", "b/run/model.json"], str(tmp_path))


def test_inputs_of_another_dtype_than_the_model_are_named():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(2, 4, dtype=torch.float64)
    for call in (lambda: ml.jacobian(model, x), lambda: ml.local_data_matrix(model, x),
                 lambda: ml.explain(model, x, "gradient"), lambda: ml.jacobian_gram(model, x),
                 lambda: ml.leaf_crossing_path(model, x, steps=1)):
        with pytest.raises(ValueError, match=r"inputs are torch.float64 but the model's "
                                             r"parameters are torch.float32"):
            call()


def test_summary_record_is_logged(tmp_path):
    out = tmp_path / "r"
    assert main([*TRAIN, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "summary" in rows[-1] and rows[-1]["summary"]["steps"] == 20


def _idx_set(root, seed):
    from manifoldlens.idx import write_idx

    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 60), ("t10k", 30)):
        images = (torch.rand(n, 8, 8, generator=g) * 255).to(torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        write_idx(root / f"{split}-images-idx3-ubyte", images)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels)


def test_evaluation_on_other_data_under_the_same_name_is_refused(tmp_path, capsys):
    data = tmp_path / "mine"
    _idx_set(data, seed=0)
    out = tmp_path / "r"
    assert main(["train", "--data", str(data), "--arch", "mlp", "--hidden", "8", "--steps", "3",
                 "--probe-size", "10", "--out", str(out), "--no-progress"]) == 0
    assert main(["spectrum", str(out / "model.json"), "--data", str(data),
                 "--out", str(tmp_path / "s1")]) == 0  # the same data, named: fine
    _idx_set(data, seed=1)  # other images under the same name and place
    capsys.readouterr()
    code = main(["spectrum", str(out / "model.json"), "--root", str(data),
                 "--out", str(tmp_path / "s2")])
    assert code == 2 and "not the data the model was trained with" in capsys.readouterr().err


def test_review_findings_equal_widths_inf_buffers_and_final_saves(tmp_path, capsys):
    # an MLP of equal widths is a legitimate --hidden
    assert main([*TRAIN, "--hidden", "16,16", "--out", str(tmp_path / "w")]) == 0
    # a -inf buffer (a mask) is not a broken weight: the checkpoint loads and resumes

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.register_buffer("floor", torch.tensor(-float("inf")))  # a -inf clamp bound

        def forward(self, x):
            return torch.maximum(self.fc(x.flatten(1)), self.floor)

    digits = load_dataset("digits", "train").subset(60, seed=0)
    with Run(tmp_path / "m", "train") as run:
        train_classifier(Masked(), digits, steps=2, batch_size=30, progress=False,
                         run=RunOptions(run, checkpoint_every=2))
    with Run(tmp_path / "m", "train", resume=True) as run:
        res = train_classifier(Masked(), digits, steps=4, batch_size=30, progress=False,
                               run=RunOptions(run, checkpoint_every=2, resume=True))
    assert res.step == 4
    # a path whose last step is a checkpoint step saves twice at that step: two files
    from helpers import TinyMLP, make

    model = make(TinyMLP())
    x = torch.randn(2, 12, dtype=torch.float64)
    ml.leaf_crossing_path(model, x, steps=4, checkpoint_dir=tmp_path / "p", checkpoint_every=2)
    pointer = json.loads((tmp_path / "p" / "state.json").read_text())
    assert (tmp_path / "p" / pointer["tensors"]).is_file()
    ml.leaf_crossing_path(model, x, steps=4, checkpoint_dir=tmp_path / "q", checkpoint_every=0)


def test_flow_evaluation_on_other_data_under_the_same_name_is_refused(tmp_path, capsys):
    data = tmp_path / "mine"
    _idx_set(data, seed=0)
    out = tmp_path / "f"
    assert main(["flow", "train", "--data", str(data), "--model", "realnvp", "--steps", "2",
                 "--batch-size", "30", "--out", str(out), "--no-progress"]) == 0
    assert main(["flow", "eval", str(out / "model.json"), "--root", str(data),
                 "--out", str(tmp_path / "e1")]) == 0
    _idx_set(data, seed=1)
    capsys.readouterr()
    code = main(["flow", "eval", str(out / "model.json"), "--root", str(data),
                 "--out", str(tmp_path / "e2")])
    assert code == 2 and "not the data the flow was trained with" in capsys.readouterr().err


def test_report_sentences_follow_the_runs_numbers():
    from manifoldlens.commands.demo import trace_story, volume_story

    rising = {"trace_start": 0.001, "trace_peak_ema": 3.7, "trace_end_ema": 3.7,
              "trace_peak_step": 1500, "trace_last_step": 1500}
    assert "had not fallen by step 1500" in trace_story(rising)
    falling = {**rising, "trace_end_ema": 1.0, "trace_peak_step": 400}
    assert "then fell to 1 by step 1500 (73 % below its peak)" in trace_story(falling)
    assert "most away from the data" in volume_story({"logdet_on_data": 0.9, "logdet_box": 1.6})
    assert "most on the data" in volume_story({"logdet_on_data": 2.0, "logdet_box": 1.6})
