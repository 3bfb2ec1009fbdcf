"""One run owns its directory: a second run on it — another process, or another run in this
one — is refused at once, naming the holder's pid, and changes nothing there; the lock goes
with the run (finished, failed or killed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from manifoldlens.cli import main
from manifoldlens.runs import Run, RunDirectoryInUse

HOLD = """
import sys, time
from manifoldlens.runs import Run
run = Run(sys.argv[1], "holder", {"who": "first"})
print("holding", flush=True)
time.sleep(60)
"""


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "r")
    try:
        before = (tmp_path / "r" / "run.json").read_text()
        with pytest.raises(RunDirectoryInUse, match=rf"in use by another run \(pid {proc.pid}\)"):
            Run(tmp_path / "r", "holder", {"who": "second"}, resume=True)
        assert (tmp_path / "r" / "run.json").read_text() == before  # untouched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the killed holder's lock died with it: the directory can be resumed now
    with Run(tmp_path / "r", "holder", resume=True) as run:
        run.metrics["ok"] = 1
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "ok"


def test_a_second_run_in_the_same_process_is_refused_until_the_first_ends(tmp_path):
    first = Run(tmp_path / "r", "train")
    with pytest.raises(RunDirectoryInUse, match=f"pid {os.getpid()}"):
        Run(tmp_path / "r", "train", resume=True)
    first.finish("ok")
    Run(tmp_path / "r", "train", resume=True).finish("ok")


def test_a_refused_run_releases_what_it_took(tmp_path):
    Run(tmp_path / "r", "train").finish("ok")
    with pytest.raises(FileExistsError, match="cannot be used for a new run"):
        Run(tmp_path / "r", "train")  # refused: not a resume
    Run(tmp_path / "r", "train", resume=True).finish("ok")  # the refusal left no lock behind
    with pytest.raises(FileExistsError, match="holds a run of train, not of spectrum"):
        Run(tmp_path / "r", "spectrum", resume=True)


def test_cli_second_run_fails_at_once_in_one_line(tmp_path, capsys):
    proc = _holder(tmp_path / "r")
    try:
        start = time.perf_counter()
        code = main(["train", "--out", str(tmp_path / "r"), "--steps", "1", "--resume",
                     "--no-progress"])
        elapsed = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and elapsed < 30
    assert f"in use by another run (pid {proc.pid})" in err[-1]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
