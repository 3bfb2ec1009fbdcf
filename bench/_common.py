"""Helpers shared by the benchmark scripts in ``bench/``.

The scripts are run as ``python bench/<name>.py``, which puts this folder on ``sys.path``, so
they import these helpers with ``from _common import ...``. Shared here: the ``meta`` block of
the JSON output (versions, machine, threads, date, command line, load averages), progress
logging on stderr, round-robin timing with the order rotated every round, median / min
summaries and the ``of_medians`` / ``of_mins`` / ``median_of_paired_rounds`` ratios, peak-RSS
probes for the child processes that measure memory, and the JSON printing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")
Log = Callable[[str], None]


# --------------------------------------------------------------------------------------
# Logging and metadata
# --------------------------------------------------------------------------------------


def make_logger(tag: str) -> Log:
    """A ``log(msg)`` that prints ``[tag] msg`` on stderr (stdout carries only the JSON)."""

    def log(msg: str) -> None:
        print(f"[{tag}] {msg}", file=sys.stderr, flush=True)

    return log


log = make_logger("bench")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 0.01."""
    return [round(v, 2) for v in os.getloadavg()]


def run_metadata(
    benchmark: str, *, versions: Mapping[str, str] | None = None, machine: bool = True
) -> dict[str, object]:
    """The common head of a benchmark's ``meta`` block.

    Keys, in order: ``benchmark``, ``command``, ``date`` (UTC), ``torch``, then ``versions``
    (other libraries), ``python``, with ``machine`` also ``platform``, ``cpu_model`` and
    ``cpu_count``, and last ``threads`` (torch's, so set them first). Callers append their own
    keys (``quick``, ``repeats``, ``seed``, ``loadavg_at_start`` ...).
    """
    meta: dict[str, object] = {
        "benchmark": benchmark,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        **(versions or {}),
        "python": platform.python_version(),
    }
    if machine:
        meta["platform"] = platform.platform()
        meta["cpu_model"] = cpu_model()
        meta["cpu_count"] = os.cpu_count()
    meta["threads"] = torch.get_num_threads()
    return meta


def run_section(sections: dict[str, dict[str, object]], name: str, fn: Callable[[], T]) -> T:
    """``fn()``, recording its wall time and the load average at its end in ``sections``."""
    t0 = time.perf_counter()
    result = fn()
    sections[name] = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "loadavg_at_end": loadavg(),
    }
    return result


def print_json(out: dict[str, object], t_start: float | None = None) -> None:
    """Print ``out`` as indented JSON on stdout; with ``t_start`` (a ``time.perf_counter()``
    value), first add ``loadavg_at_end`` and ``wall_s`` to ``out["meta"]``."""
    if t_start is not None:
        meta = out["meta"]
        assert isinstance(meta, dict)
        meta["loadavg_at_end"] = loadavg()
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=2))


# --------------------------------------------------------------------------------------
# Timing and summaries
# --------------------------------------------------------------------------------------


def round_robin(
    methods: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    *,
    inner: Mapping[str, int] | None = None,
    label: str = "",
    log: Log = log,
) -> dict[str, list[float]]:
    """Time every method once per round, ``warmup + repeats`` rounds, order rotated per round,
    so that a noisy, shared machine slows them alike.

    ``inner[name]`` calls are made back to back per timing (for sub-millisecond methods); the
    value recorded is ms per call. Warm-up rounds are not recorded.
    """
    names = list(methods)
    inner = inner or {}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, m = methods[name], inner.get(name, 1)
            sync()
            t0 = time.perf_counter()
            for _ in range(m):
                fn()
            sync()  # GPU work is asynchronous: time it to its end
            ms = (time.perf_counter() - t0) * 1e3 / m
            if r >= warmup:
                times[name].append(ms)
        tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{repeats}"
        done = ", ".join(f"{n}={times[n][-1]:.1f}ms" if r >= warmup else n for n in names)
        log(f"{label} {tag}: {done}".lstrip())
    return times


def sync() -> None:
    """Wait for the CUDA device's queued work (nothing on a machine without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def positive_int(text: str) -> int:
    """An argparse type: an int ≥ 1, else a one-line usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def add_device(p: object, default: str = "cpu") -> None:
    """``--device`` of a benchmark (cpu, cuda, cuda:1 ...): every script takes it."""
    p.add_argument("--device", default=default,  # type: ignore[attr-defined]
                   help=f"torch device to run on (default {default})")


def stats(values: Sequence[float], digits: int = 4) -> dict[str, float]:
    """Median, min and max of ``values``, rounded to ``digits`` decimals."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def ratio(
    num: Sequence[float], den: Sequence[float], target: str | None = None, digits: int = 3
) -> dict[str, object]:
    """Ratios ``num / den`` of paired timings: of medians, of mins, and the median of the
    per-round ratios (which pairs measurements taken close together in time).

    With ``target`` (``">= 2"`` or ``"<= 1.15"``), also ``target`` and ``met``, judged on the
    ratio of medians.
    """
    out: dict[str, object] = {
        "of_medians": round(statistics.median(num) / statistics.median(den), digits),
        "of_mins": round(min(num) / min(den), digits),
        "median_of_paired_rounds": round(
            statistics.median(a / b for a, b in zip(num, den, strict=True)), digits
        ),
    }
    if target is not None:
        op, value = target.split()
        med = out["of_medians"]
        assert isinstance(med, float)
        out["target"] = target
        out["met"] = bool(med >= float(value)) if op == ">=" else bool(med <= float(value))
    return out


# --------------------------------------------------------------------------------------
# Memory (Linux /proc, with fallbacks) and child processes
# --------------------------------------------------------------------------------------


def current_rss_mb() -> float | None:
    """Resident set size now, from /proc/self/statm (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def ru_maxrss_mb() -> float:
    """Peak RSS of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS).

    On Linux it carries over the parent's high-water mark across fork + exec, so a child's
    value is only meaningful above the parent's RSS at spawn time.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def vm_hwm_mb() -> float | None:
    """Peak RSS of this address space (VmHWM in /proc/self/status, Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """Peak RSS: VmHWM where available (resettable, not inherited), else ``ru_maxrss``."""
    hwm = vm_hwm_mb()
    return hwm if hwm is not None else ru_maxrss_mb()


def rss_snapshot() -> tuple[float | None, float, float]:
    """``(current_rss_mb(), peak_rss_mb(), ru_maxrss_mb())``, taken now."""
    return current_rss_mb(), peak_rss_mb(), ru_maxrss_mb()


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return vm_hwm_mb() is not None
    except OSError:
        return False


def run_json_child(script: str, args: Sequence[str]) -> dict[str, object]:
    """Run ``script`` with ``args`` in a fresh interpreter and parse the JSON it prints; on
    failure, ``{"error": "child process exited with <code>"}``."""
    cmd = [sys.executable, os.path.abspath(script), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        return {"error": f"child process exited with {proc.returncode}"}
    return json.loads(proc.stdout)
