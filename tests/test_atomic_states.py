"""Multi-file states never tear: a path state is a tensor file named by its step plus one
pointer (``state.json``, replaced atomically) naming that file and its sha256, so a kill at
any moment — between the two writes included — leaves a state that resumes to the result of
an uninterrupted run; altered or foreign files are refused, naming them. A checkpoint
manifest names files beside it only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from manifoldlens import foliation
from manifoldlens.foliation import horizontal_path
from manifoldlens.models import Linear, load_checkpoint, save_checkpoint

from helpers import TinyMLP, make

F64 = torch.float64
KW = dict(step_size=0.05, max_steps=40, tol=1e-4, record_every=5)


def _pair():
    g = torch.Generator().manual_seed(4)
    return (torch.randn(2, 12, dtype=F64, generator=g),
            torch.randn(2, 12, dtype=F64, generator=g))


def test_a_kill_between_the_two_writes_resumes_exactly(tmp_path, monkeypatch):
    model = make(TinyMLP(act=nn.Tanh))
    src, tgt = _pair()
    full = horizontal_path(model, src, tgt, **KW)
    real = foliation.write_atomic
    pointer_writes = {"n": 0}

    def dies_before_the_second_pointer(path, write):
        if path.name == "state.json":
            pointer_writes["n"] += 1
            if pointer_writes["n"] == 2:  # the step-20 tensors are on disk, the pointer is not
                raise KeyboardInterrupt
        return real(path, write)

    monkeypatch.setattr(foliation, "write_atomic", dies_before_the_second_pointer)
    with pytest.raises(KeyboardInterrupt):
        horizontal_path(model, src, tgt, checkpoint_dir=tmp_path, checkpoint_every=10, **KW)
    monkeypatch.setattr(foliation, "write_atomic", real)
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 10  # the old pointer
    resumed = horizontal_path(model, src, tgt, checkpoint_dir=tmp_path, checkpoint_every=10,
                              **KW)
    torch.testing.assert_close(resumed.points, full.points, rtol=0, atol=0)
    assert resumed.record_steps.tolist() == full.record_steps.tolist()
    assert resumed.steps.tolist() == full.steps.tolist() and max(resumed.steps) <= 40
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("state-00000040-") and files[1] == "state.json"


def test_altered_or_foreign_state_files_are_refused(tmp_path):
    model = make(TinyMLP(act=nn.Tanh))
    src, tgt = _pair()
    horizontal_path(model, src, tgt, checkpoint_dir=tmp_path, checkpoint_every=10,
                    **{**KW, "max_steps": 10})
    (tensors,) = tmp_path.glob("state-*.safetensors")
    blob = bytearray(tensors.read_bytes())
    blob[-1] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=f"{tensors.name} does not match the sha256"):
        horizontal_path(model, src, tgt, checkpoint_dir=tmp_path, **{**KW, "max_steps": 10})
    meta = json.loads((tmp_path / "state.json").read_text())
    for bad in ("../elsewhere.safetensors", "/etc/passwd", ".."):
        (tmp_path / "state.json").write_text(json.dumps({**meta, "tensors": bad}))
        with pytest.raises(ValueError, match="invalid tensor file"):
            horizontal_path(model, src, tgt, checkpoint_dir=tmp_path, **{**KW, "max_steps": 10})
    (tmp_path / "state.json").write_text('{"config": ')  # cut short
    with pytest.raises(ValueError, match=r"state\.json is not a valid path state"):
        horizontal_path(model, src, tgt, checkpoint_dir=tmp_path, **{**KW, "max_steps": 10})


WALK = """
import sys, torch
from torch import nn
sys.path.insert(0, sys.argv[2])
from helpers import TinyMLP, make
from manifoldlens.foliation import horizontal_path
g = torch.Generator().manual_seed(4)
src = torch.randn(2, 12, dtype=torch.float64, generator=g)
tgt = torch.randn(2, 12, dtype=torch.float64, generator=g)
res = horizontal_path(make(TinyMLP(act=nn.Tanh)), src, tgt, step_size=0.004, max_steps=1500,
                      tol=1e-4, record_every=7, checkpoint_dir=sys.argv[1], checkpoint_every=1)
torch.save({"points": res.points, "steps": res.steps, "record_steps": res.record_steps},
           sys.argv[1] + ".result")
"""


def _kill_until_done(argv_of, progress, done, *, attempts, seed, pause, finish):
    """Start ``argv_of(attempt)``, wait until it makes progress (``progress()`` grows), let it
    run a random moment of up to ``pause`` s, SIGKILL it; until ``done()``. Returns the number
    of kills that landed mid-run; ``finish`` runs the command to its end if attempts ran out."""
    delays = torch.Generator().manual_seed(seed)
    kills = 0
    for attempt in range(attempts):
        before = progress()
        proc = subprocess.Popen(argv_of(attempt), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while progress() <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(pause * float(torch.rand((), generator=delays)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if done():
            return kills
    finish()
    return kills


def _saved_step(state) -> int:
    try:
        return json.loads((state / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def test_killed_at_random_moments_then_resumed_equals_uninterrupted(tmp_path):
    """SIGKILL a path run (a checkpoint every step, so kills land inside writes too) at
    random moments, resume each time; the final result is bit-identical."""
    tests_dir = os.path.dirname(__file__)
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", WALK, str(ref), tests_dir], check=True)
    expected = torch.load(str(ref) + ".result")
    state = tmp_path / "killed"
    walk = [sys.executable, "-c", WALK, str(state), tests_dir]
    kills = _kill_until_done(
        lambda attempt: walk, lambda: _saved_step(state),
        lambda: os.path.exists(str(state) + ".result"), attempts=8, seed=0, pause=1.2,
        finish=lambda: subprocess.run(walk, check=True))
    got = torch.load(str(state) + ".result")
    assert kills >= 2
    for k in ("points", "steps", "record_steps"):
        assert torch.equal(got[k], expected[k]), k


def test_checkpoint_manifest_names_files_beside_it_only(tmp_path):
    save_checkpoint(tmp_path / "m", Linear(4, 3))
    manifest = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "elsewhere.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes())
    sub = tmp_path / "sub"
    sub.mkdir()
    for bad in ("../elsewhere.safetensors", str(tmp_path / "m.safetensors")):
        (sub / "m.json").write_text(json.dumps({**manifest, "weights": bad}))
        with pytest.raises(ValueError, match="outside its directory"):
            load_checkpoint(sub / "m.json")


TRAIN = [sys.executable, "-m", "manifoldlens.cli", "train", "--arch", "mlp", "--hidden", "32",
         "--steps", "60", "--batch-size", "8", "--checkpoint-every", "1", "--trace-every",
         "20", "--probe-size", "8", "--no-progress"]


def _latest_step(out) -> int:
    found = sorted((out / "checkpoints").glob("step-*.json")) if out.exists() else []
    return int(found[-1].name[5:13]) if found else -1


def test_training_killed_at_random_moments_resumes_to_the_same_weights(tmp_path):
    """SIGKILL ``manifoldlens train`` (a checkpoint every step, so kills land inside
    checkpoint writes too) and resume it until done: the weights and the logged curve equal
    those of an uninterrupted run."""
    from safetensors.torch import load_file

    ref = tmp_path / "ref"
    subprocess.run([*TRAIN, "--out", str(ref)], check=True, capture_output=True)
    out = tmp_path / "killed"
    kills = _kill_until_done(
        lambda attempt: [*TRAIN, "--out", str(out)] + (["--resume"] if attempt else []),
        lambda: _latest_step(out),
        lambda: json.loads((out / "run.json").read_text())["status"] == "ok",
        attempts=4, seed=1, pause=0.4,
        finish=lambda: subprocess.run([*TRAIN, "--out", str(out), "--resume"], check=True,
                                      capture_output=True))
    assert kills >= 2
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def curve(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "loss" in r or "trace_of_g" in r]

    assert curve(out) == curve(ref)
