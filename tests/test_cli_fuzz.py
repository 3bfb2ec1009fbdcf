"""The CLI's option space, fuzzed: whatever values a user types for a training run's options,
the command either runs or stops with a one-line error (exit 2 for usage) — never a traceback,
an internal error, or a run that silently did something other than what ``run.json`` says."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manifoldlens.cli import main

numbers = st.one_of(
    st.integers(-3, 400).map(str),
    st.sampled_from(["0", "-0", "nan", "inf", "-inf", "1e309", "0.5", "1e-3", "", "x", "2,3",
                     "True", "99999999999"]),
)
OPTIONS = {  # option: strategy of its text
    "--lr": numbers, "--momentum": numbers, "--weight-decay": numbers,
    "--batch-size": numbers, "--steps": numbers, "--limit": numbers,
    "--trace-every": numbers, "--probe-size": numbers, "--eval-every": numbers,
    "--checkpoint-every": numbers, "--hidden": st.sampled_from(["8", "8,8", "0", "-1", "a"]),
    "--activation": st.sampled_from(["relu", "tanh", "gelu", ""]),
}


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.just(None), max_size=4).flatmap(
    lambda d: st.fixed_dictionaries({k: OPTIONS[k] for k in d})))
def test_train_options_run_or_stop_with_one_line(capsys, options):
    tmp = Path(tempfile.mkdtemp())
    try:
        argv = ["train", "--arch", "mlp", "--no-progress", "--out", str(tmp / "r")]
        options.setdefault("--steps", "2")
        for k, v in options.items():
            argv += [k, v] if not v.startswith("-") else [f"{k}={v}"]
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: a usage error, one line after the usage text
            rc = e.code
            assert rc == 2
            assert not (tmp / "r").exists()
        err = capsys.readouterr().err
        assert "Traceback" not in err and "internal error" not in err, (argv, err)
        assert rc in (0, 2), (argv, err)
        if rc == 0:  # what ran is what the record says
            doc = json.loads((tmp / "r" / "run.json").read_text())
            steps = int(options["--steps"])
            assert doc["metrics"]["steps"] == steps
        else:
            errors = [line for line in err.splitlines() if "error:" in line]
            assert len(errors) == 1, err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("argv", [
    ["flow", "train", "--data", "two-moons", "--model", "realnvp", "--steps", "2", "--lr", "nan"],
    ["leaf", "horizontal", "x.json", "--step-size", "nan"],
    ["spectrum", "x.json", "--limit", "0"],
])
def test_nonsense_numbers_are_usage_errors_before_anything_exists(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and not (tmp_path / "r").exists()
    assert "Traceback" not in capsys.readouterr().err
