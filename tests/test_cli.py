"""The command line end to end on small settings: run directories, figures, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from manifoldlens.cli import main


def _doc(path):
    return json.loads((path / "run.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "train"
    rc = main(["train", "--data", "digits", "--arch", "mlp", "--hidden", "32", "--steps", "40",
               "--lr", "0.1", "--limit", "300", "--trace-every", "10", "--probe-size", "20",
               "--checkpoint-every", "20", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_train_writes_run_directory(trained):
    doc = _doc(trained)
    assert doc["status"] == "ok" and doc["command"] == "train"
    assert doc["config"]["lr"] == 0.1 and doc["seed"] == 0
    assert {"torch", "numpy", "python", "device"} <= set(doc["environment"])
    assert doc["wall_time_s"] > 0 and "test_accuracy" in doc["metrics"]
    for name in ("trace_of_g.png", "training.png", "model.json", "model.safetensors",
                 "metrics.jsonl", "checkpoints/step-00000040.json"):
        assert (trained / name).exists(), name
    ckpt = json.loads((trained / "checkpoints/step-00000040.json").read_text())
    assert ckpt["metadata"]["data"] == "digits" and len(ckpt["metadata"]["classes"]) == 10


def test_resume_a_finished_run_extends_it(trained, tmp_path):
    import shutil

    out = tmp_path / "r"
    shutil.copytree(trained, out)
    rc = main(["train", "--data", "digits", "--arch", "mlp", "--hidden", "32", "--steps", "60",
               "--lr", "0.1", "--limit", "300", "--trace-every", "10", "--probe-size", "20",
               "--checkpoint-every", "20", "--out", str(out), "--resume", "--no-progress"])
    assert rc == 0
    assert _doc(out)["metrics"]["steps"] == 60
    records = json.loads((out / "trace_of_g.json").read_text())
    assert [r["step"] for r in records] == [0, 10, 20, 30, 40, 50, 60]


def test_spectrum_and_gram(trained, tmp_path):
    out = tmp_path / "spec"
    assert main(["spectrum", str(trained / "model.json"), "--limit", "50", "--out", str(out),
                 "--no-progress"]) == 0
    m = _doc(out)["metrics"]["spectrum"]
    assert m["n"] == 50 and m["rank_max"] <= 9
    arr = np.load(out / "spectrum.npz")
    assert arr["eigenvalues"].shape == (50, 10) and arr["trace"].shape == (50,)
    for name in ("trace_histogram.png", "spectra.png", "rank_counts.png", "eigenvectors.png"):
        assert (out / name).exists()
    out = tmp_path / "gram"
    assert main(["gram", str(trained / "model"), "--limit", "60", "--normalize",
                 "--low-memory", "--batch-size", "16", "--out", str(out), "--no-progress"]) == 0
    g = np.load(out / "gram.npy")
    assert g.shape == (60, 60)
    np.testing.assert_allclose(np.diag(g), 1.0, rtol=1e-5)
    m = _doc(out)["metrics"]["gram"]
    assert -1 <= m["kernel_target_alignment"] <= 1


def test_errors_are_clear(tmp_path, capsys):
    assert main(["spectrum", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and "error" in err
    assert _doc(tmp_path / "o")["status"] == "failed"
    assert main(["train", "--data", "nosuchset", "--root", str(tmp_path),
                 "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "looked" in capsys.readouterr().err.lower()


def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "30", "--out", str(out), "--no-progress"]) == 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 8
    doc = _doc(out)
    assert doc["status"] == "ok" and "spectrum" in doc["metrics"] and "gram" in doc["metrics"]


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "manifoldlens.cli", "--help"],
                          capture_output=True, text=True, check=True)
    for cmd in ("train", "spectrum", "gram", "demo"):
        assert cmd in proc.stdout


@pytest.mark.parametrize("experiment,extra", [
    ("across", ["--steps", "6", "--record-every", "2"]),
    ("horizontal", ["--n", "3", "--steps", "6", "--record-every", "3"]),
    ("mirror", ["--n", "2", "--steps", "4", "--clamp", "0", "1"]),
    ("noisy", ["--n", "2", "--noise-steps", "3", "--steps", "4"]),
    ("involutivity", ["--n", "2"]),
])
def test_leaf_experiments(trained, tmp_path, experiment, extra):
    out = tmp_path / experiment
    ckpt = trained / "checkpoints/step-00000040.json"  # records its dataset
    rc = main(["leaf", experiment, str(ckpt), *extra, "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert _doc(out)["status"] == "ok" and _doc(out)["command"] == f"leaf-{experiment}"
    assert len(list(out.glob("*.png"))) >= 1
    if experiment == "involutivity":
        assert res["max"] < 1e-8  # ReLU MLP: Theorem 3.1
    if experiment in ("horizontal", "mirror"):
        assert 0 <= res["reached_share"] <= 1


def test_leaf_train_preset(tmp_path):
    out = tmp_path / "lt"
    assert main(["leaf", "train", "--data", "digits", "--steps", "12", "--trace-every", "6",
                 "--out", str(out), "--no-progress"]) == 0
    doc = _doc(out)
    assert doc["command"] == "leaf-train" and doc["metrics"]["steps"] == 12
    ckpt = json.loads((out / "checkpoints" / "step-00000012.json").read_text())
    assert ckpt["spec"]["arch"] == "seed001_cnn"
    assert ckpt["metadata"]["train_config"]["lr"] == 0.01
    assert ckpt["metadata"]["train_config"]["batch_size"] == 60


def _leaves(parser, prefix=()):
    """``(command words, parser)`` of every subcommand that runs something."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a.choices, dict) and a.choices
            and all(isinstance(p, argparse.ArgumentParser) for p in a.choices.values())]
    if not subs:
        yield prefix, parser
        return
    for action in subs:
        for name, p in action.choices.items():
            yield from _leaves(p, (*prefix, name))


def test_every_subcommand_has_help_with_every_default(capsys):
    from manifoldlens.cli import build_parser
    from manifoldlens.commands.common import HelpFormatter

    leaves = list(_leaves(build_parser()))
    assert len(leaves) == 22  # + manifold theorem1, manifold sanity, ood
    for words, parser in leaves:
        with pytest.raises(SystemExit) as e:
            main([*words, "--help"])
        assert e.value.code == 0 and "usage: manifoldlens " + " ".join(words) in \
            capsys.readouterr().out
        fmt = HelpFormatter(parser.prog)
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in fmt._get_help_string(action), (words, action.dest)


def test_defaults_are_the_run_functions_defaults(capsys):
    import inspect

    from manifoldlens.cli import build_parser
    from manifoldlens.commands import flow, leaf

    parser = build_parser()

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    args = parser.parse_args(["leaf", "horizontal", "ck.json"])
    assert (args.steps, args.record_every, args.n) == (10000, 50, 20)
    d = defaults(leaf.run_leaf_horizontal)
    assert (d["steps"], d["record_every"], d["pairs"], d["clamp"]) == (10000, 50, 20, (0.0, 1.0))
    args = parser.parse_args(["leaf", "across", "ck.json"])
    assert (args.steps, args.record_every, args.n) == (1000, 10, 8)
    assert parser.parse_args(["leaf", "mirror", "ck.json"]).n == defaults(
        leaf.run_leaf_mirror)["pairs"] == 8
    assert parser.parse_args(["flow", "eval", "ck.json"]).seed is None
    args = parser.parse_args(["flow", "train"])
    d = defaults(flow.run_flow_train)
    assert (args.warmup, args.clip, args.lr) == (d["warmup_steps"], d["clip_grad_norm"], d["lr"])
    with pytest.raises(SystemExit):
        main(["leaf", "horizontal", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("(default: 10000)", "(default: 50)", "(default: 20)", "(default: 0.0 1.0)"):
        assert text in out
