"""Run directories: every command records what it did, how, and what it measured.

A run directory holds ``run.json`` (command, config, seed, package versions, device, wall
time, status, metrics), ``metrics.jsonl`` (one JSON object a line, for curves), figures as
PNG, arrays as ``.npz`` and checkpoints under ``checkpoints/``. ``run.json`` is written when
the run starts and rewritten when it ends, also when it fails, so nothing computed is lost.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ._utils import json_text, write_atomic
from ._version import __version__

__all__ = [
    "Run",
    "RunDirectoryInUse",
    "RunFollower",
    "default_run_dir",
    "environment",
    "read_records",
    "write_atomic",
]


class RunDirectoryInUse(FileExistsError):
    """Another live process holds the run directory."""


LOCK_FILE = ".lock"


def _lock_directory(path: Path) -> int | None:
    """An exclusive ``flock`` on ``<path>/.lock``, held until its descriptor closes (also when
    the process dies); the holder's pid is written into the file. A second run on the same
    directory raises :class:`RunDirectoryInUse` naming that pid, at once."""
    import fcntl

    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirectoryInUse(
            f"{path} is in use by another run (pid {holder}); wait for it to end or choose "
            "another directory (--out)"
        ) from None
    except OSError as e:  # a file system without locks (some network mounts)
        os.close(fd)
        warnings.warn(f"cannot lock {path} ({e.strerror}): nothing stops a second run from "
                      "using the same directory", stacklevel=3)
        return None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away to start over") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} does not hold a run record")
    return doc


def default_run_dir(command: str, root: str | os.PathLike = "runs") -> Path:
    """``runs/<command>-<UTC timestamp>``, made unique if it exists already."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{command}-{stamp}"
    k = 1
    while path.exists():
        k += 1
        path = Path(root) / f"{command}-{stamp}-{k}"
    return path


def environment(device: Any = None) -> dict[str, Any]:
    """Package versions and the machine, for ``run.json``."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "manifoldlens": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
    }
    for mod in ("sklearn", "matplotlib", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional in some environments
            pass
    if device is not None:
        dev = torch.device(device)
        info["device"] = str(dev)
        if dev.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(dev)
    return info


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` for each record of the JSON-lines file ``path``. A last line that is
    not a JSON object (a write cut short by a kill) is dropped with a warning naming the file;
    such a line anywhere else is a ValueError naming the file and the line number."""
    lines = [(i, line) for i, line in enumerate(path.read_bytes().split(b"\n"), 1)
             if line.strip()]
    out = []
    for k, (number, line) in enumerate(lines):
        try:
            text = line.decode()
            rec = json.loads(text)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if k < len(lines) - 1:
                raise ValueError(f"{path}: line {number} is not a valid record ({e}); the file "
                                 "is corrupt: fix or remove that line") from None
            warnings.warn(f"{path}: dropped its last line ({number}), which is not a valid "
                          f"record ({e}): a write cut short, e.g. by a kill", stacklevel=3)
            break
        out.append((text, rec))
    return out


def _seal(path: Path) -> None:
    """Before appending to ``path``: a last line cut short by a kill (no final newline) is
    completed if it holds a whole record, else removed with a warning."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0 or os.pread(fh.fileno(), 1, size - 1) == b"\n":
            return
        start = size
        while start > 0:  # back to the last newline, a block at a time
            step = min(start, 1 << 16)
            cut = os.pread(fh.fileno(), step, start - step).rfind(b"\n")
            start -= step
            if cut >= 0:
                start += cut + 1
                break
        tail = os.pread(fh.fileno(), size - start, start)
        try:
            whole = isinstance(json.loads(tail), dict)
        except ValueError:
            whole = False
        if whole:
            fh.write(b"\n")
            return
        fh.truncate(start)
    warnings.warn(f"{path}: removed its last line ({size - start} bytes, not a valid record): "
                  "a write cut short, e.g. by a kill", stacklevel=3)


class Run:
    """A run directory.

    Parameters
    ----------
    path : path
        The directory; created if missing. An existing ``run.json`` is kept and extended
        when ``resume=True`` (its metrics are reloaded), refused otherwise.
    command : str
        The command's name (``"train"``, ``"demo"`` …).
    config : dict
        Everything that defines the run; written to ``run.json``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d, Run(d + "/r", "example", {"lr": 0.1}) as run:
    ...     run.log(step=1, loss=0.5)
    ...     run.metrics["accuracy"] = 0.9
    >>> # run.json now holds status "ok", the config, versions and wall time
    """

    def __init__(
        self,
        path: str | os.PathLike,
        command: str,
        config: dict[str, Any] | None = None,
        *,
        seed: int | None = None,
        device: Any = None,
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        self.command = command
        self.config = dict(config or {})
        self.seed = seed
        self.device = device
        self.metrics: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._previous_wall = 0.0
        self._untouched = False  # a resumed run that has not written anything yet
        meta = self.path / "run.json"
        if meta.exists() and not resume:  # refused before the directory is touched
            self._refuse_or_reuse(meta)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_directory(self.path)  # one run owns its directory, for its life
        try:
            if meta.exists() and not resume:  # another run may have written it meanwhile
                self._refuse_or_reuse(meta, reuse=True)
            elif meta.exists():
                old = _read_json(meta)
                if old.get("command") not in (None, command):
                    raise FileExistsError(
                        f"cannot resume {self.path}: it holds a run of {old.get('command')}, "
                        f"not of {command}; choose another directory"
                    )
                self.metrics = old.get("metrics", {}) or {}
                self._previous_wall = float(old.get("wall_time_s", 0.0) or 0.0)
                # the old record stays as it is until the resumed run does something: a
                # resume refused by the command (other settings, model or data) leaves it
                self._untouched = True
            elif resume:
                warnings.warn(f"nothing to resume in {self.path}: starting a new run there",
                              stacklevel=2)
            self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            if not self._untouched:
                self._write("running")
        except BaseException:
            self._release()
            raise

    _BOOKKEEPING = frozenset({"run.json", "metrics.jsonl", LOCK_FILE, "run.json.tmp"})

    def _refuse_or_reuse(self, meta: Path, reuse: bool = False) -> None:
        """An existing run is continued only with ``resume``; but the directory of a run of
        the same command that failed before producing anything (no checkpoint, figure or
        array) is taken over, so that rerunning a command after fixing its input works."""
        old = _read_json(meta)
        produced = sorted(p.name for p in self.path.iterdir() if p.name not in self._BOOKKEEPING)
        if old.get("status") == "failed" and old.get("command") == self.command and not produced:
            log = self.path / "metrics.jsonl"
            if reuse and log.exists():
                if log.stat().st_size:
                    warnings.warn(f"{log} of the failed run is replaced by the new run's",
                                  stacklevel=3)
                log.unlink()
            return
        why = (f"it holds what a run of "
               f"{old.get('command', 'another command')} produced ({', '.join(produced[:4])}"
               f"{' …' if len(produced) > 4 else ''})" if produced else "it holds a run")
        raise FileExistsError(
            f"{self.path} cannot be used for a new run: {why}; pass resume=True (CLI: "
            "--resume) to continue it, or choose another directory"
        )

    # -- files ----------------------------------------------------------------------------

    def _touch(self) -> None:
        """The run starts changing its directory: from now on ``run.json`` is its own."""
        if self._untouched:
            self._untouched = False
            self._write("running")

    def file(self, name: str) -> Path:
        """Path of a file inside the run directory (parent folders created)."""
        self._touch()
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def log(self, **record: Any) -> None:
        """Append one record to ``metrics.jsonl`` (flushed at once; standard JSON, NaN as
        null, infinities as "inf" / "-inf"). A last line cut short by an earlier kill is
        completed or removed first, so the new record starts a line of its own."""
        path = self.file("metrics.jsonl")
        line = json_text(record) + "\n"
        if path.exists():
            _seal(path)
        with open(path, "a") as fh:
            fh.write(line)

    def read_log(self, key: str | None = None) -> list[dict[str, Any]]:
        """Records of ``metrics.jsonl`` (those holding ``key`` if given). A last line that is
        not valid JSON (a write cut short) is skipped with a warning; an invalid line
        elsewhere is a ValueError naming the file and the line."""
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        return [r for _, r in read_records(p) if key is None or key in r]

    def truncate_log(self, step: int) -> None:
        """Drop the ``metrics.jsonl`` records of steps after ``step`` (before a resume redoes
        them). A record's step is its ``"step"`` or that of its single nested record. A last
        line cut short by a kill is dropped (with a warning), so the run can resume."""
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return
        self._touch()

        def step_of(rec: dict[str, Any]) -> Any:
            if "step" in rec:
                return rec["step"]
            inner = [v for v in rec.values() if isinstance(v, dict) and "step" in v]
            return inner[0]["step"] if len(inner) == 1 else None

        keep = [line for line, rec in read_records(p)
                if (s := step_of(rec)) is None or s <= step]  # a cut-short last line goes
        write_atomic(p, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))

    def save_figure(self, name: str, fig: Any, dpi: int = 150) -> Path:
        """Save a matplotlib figure as ``<name>.png`` (closed after if pyplot manages it)."""
        path = self.file(name if name.endswith(".png") else name + ".png")
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        plt = sys.modules.get("matplotlib.pyplot")  # loaded already if pyplot made the figure
        if plt is not None and getattr(fig.canvas, "manager", None) is not None:
            plt.close(fig)
        return path

    def save_arrays(self, name: str, **arrays: Any) -> Path:
        """Save arrays (tensors or numpy) to ``<name>.npz``."""
        path = self.file(name if name.endswith(".npz") else name + ".npz")
        np.savez_compressed(
            path,
            **{k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
               for k, v in arrays.items()},
        )
        return path

    def save_json(self, name: str, obj: Any) -> Path:
        path = self.file(name if name.endswith(".json") else name + ".json")
        text = json_text(obj, indent=2) + "\n"
        return write_atomic(path, lambda tmp: tmp.write_text(text))

    # -- life cycle -----------------------------------------------------------------------

    @property
    def wall_time(self) -> float:
        return self._previous_wall + time.perf_counter() - self._start

    def _write(self, status: str, error: str | None = None) -> None:
        doc = {
            "command": self.command,
            "argv": sys.argv,
            "config": self.config,
            "seed": self.seed,
            "status": status,
            "started": self.started,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(self.wall_time, 3),
            "environment": environment(self.device),
            "metrics": self.metrics,
        }
        if error:
            doc["error"] = error
        text = json_text(doc, indent=2) + "\n"
        write_atomic(self.path / "run.json", lambda tmp: tmp.write_text(text))

    def checkpoint_state(self) -> None:
        """Rewrite ``run.json`` with the metrics so far (status stays "running")."""
        self._untouched = False
        self._write("running")

    def finish(self, status: str = "ok", error: str | None = None) -> None:
        """Write the final ``run.json`` and release the directory. A resumed run that failed
        before writing anything leaves the record of the run it was to resume as it was."""
        try:
            if not (self._untouched and status != "ok"):
                self._write(status, error)
        finally:
            self._release()

    def _release(self) -> None:
        fd, self._lock = getattr(self, "_lock", None), None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock

    def __del__(self) -> None:
        self._release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("ok")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("interrupted", "interrupted by the user; resume with --resume")
        else:
            self.finish("failed", f"{exc_type.__name__}: {exc}")


class RunFollower:
    """What a process other than rank 0 of a ``torchrun`` launch holds of the run: the path of
    the directory rank 0 owns (files that every process writes into through the library,
    such as an out-of-core Gram matrix or a path state of its share, go there), the
    settings, and writers that do nothing: only rank 0 writes the run's records, figures
    and arrays, and only it prints."""

    def __init__(self, path: str | os.PathLike, command: str,
                 config: dict[str, Any] | None = None, **_: Any) -> None:
        self.path = Path(path)
        self.command = command
        self.config = dict(config or {})
        self.metrics: dict[str, Any] = {}
        self._start = time.perf_counter()

    @property
    def wall_time(self) -> float:
        return time.perf_counter() - self._start

    def file(self, name: str) -> Path:
        return self.path / name

    def _named(self, name: str, suffix: str) -> Path:
        return self.path / (name if name.endswith(suffix) else name + suffix)

    def save_figure(self, name: str, fig: Any, dpi: int = 150) -> Path:
        return self._named(name, ".png")

    def save_arrays(self, name: str, **arrays: Any) -> Path:
        return self._named(name, ".npz")

    def save_json(self, name: str, obj: Any) -> Path:
        return self._named(name, ".json")

    def log(self, **record: Any) -> None:
        pass

    def read_log(self, key: str | None = None) -> list[dict[str, Any]]:
        return []

    def truncate_log(self, step: int) -> None:
        pass

    def checkpoint_state(self) -> None:
        pass

    def finish(self, status: str = "ok", error: str | None = None) -> None:
        pass
