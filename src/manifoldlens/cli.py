"""The ``manifoldlens`` command line: a thin shell over :mod:`manifoldlens.commands`.

It builds the parser from each command module's ``add_arguments``, opens the run directory
(``--out``, default ``runs/<command>-<timestamp>``), calls the subcommand's handler and turns
an error into one line (``manifoldlens <command>: error: …``): exit status 2 for what the user
asked for (bad options, missing files), 1 for failures while running; ``--debug`` shows the
traceback instead.

Under ``torchrun --nproc_per_node N -m manifoldlens …`` the commands that shard their samples
(``gram``, ``spectrum``, ``leaf across|horizontal|mirror``, ``manifold fraction``; their
parsers set ``distributed``) run in N processes: each validates the options, the process
group is made from torchrun's environment (gloo on the CPU, NCCL on CUDA), rank 0 alone
opens the run directory, writes and prints, and the others compute their shares; other
commands refuse to run so.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__

__all__ = ["build_parser", "main"]

#: Errors in what the user asked for: one line, exit status 2 (as argparse's usage errors).
USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError)
#: Failures while running: one line, exit status 1. Anything else is a bug: one line too,
#: exit status 1, and the traceback with ``--debug``.
RUNTIME_ERRORS = (FloatingPointError, OSError, RuntimeError, MemoryError)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command module registers its own subcommands."""
    from .commands import classifier, demo, flow, leaf, manifold, ood
    from .commands.common import HelpFormatter

    modules = (classifier, leaf, flow, manifold, ood, demo)  # the order of ``--help``

    parser = argparse.ArgumentParser(
        prog="manifoldlens",
        description="The geometry a trained classifier sees in its data.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")
    parser.add_argument("--version", action="version", version=f"manifoldlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in modules:
        module.add_arguments(sub)
    return parser


def _check_device(device: str) -> None:
    """Refuse a device torch does not know or this machine does not have, before a run
    directory exists."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: manifoldlens runs on cpu, cuda or mps")


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be a directory (a file, or under one)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"--out {out}: {p} is a file, not a directory")
            return


class _Mirrored(Exception):
    """Rank 0's error, raised again on the other ranks of a launch (rank 0 reports it)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _launch_rank() -> int:
    """This process's rank in a torchrun launch (or in a group the caller made), else 0."""
    from . import distributed

    if distributed.is_initialized():
        return distributed.rank()
    try:
        return int(os.environ.get("RANK", "0")) if distributed.launched() else 0
    except ValueError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs it on its
    share of the samples and only rank 0 owns the run directory, writes and prints (usage
    errors too; a failure on another rank is printed by that rank)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    experiment = getattr(args, "experiment", None)
    prog = f"manifoldlens {args.command}" + (f" {experiment}" if experiment else "")
    rank = _launch_rank()
    where = f" (rank {rank})" if rank else ""
    try:
        return _run(args)
    except _Mirrored as e:
        return 2 if isinstance(e.error, USAGE_ERRORS) else 1
    except USAGE_ERRORS as e:
        if args.debug:
            raise
        if not rank or getattr(args, "started", False):  # checks fail alike on every rank
            print(f"{prog}{where}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RUNTIME_ERRORS as e:
        if args.debug:
            raise
        print(f"{prog}{where}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, the traceback on request
        if args.debug:
            raise
        print(f"{prog}{where}: internal error ({type(e).__name__}): {_one_line(e)}; rerun "
              "with --debug for the traceback and report it", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:2000]


def _run(args: argparse.Namespace) -> int:
    import torch

    from . import distributed
    from .runs import RunFollower, default_run_dir

    _check_device(args.device)
    if distributed.local_device(args.device) != args.device:  # cuda:<LOCAL_RANK> of torchrun
        _check_device(distributed.local_device(args.device))
    experiment = getattr(args, "experiment", None)
    name = args.command + (f"-{experiment}" if experiment else "")
    several = distributed.launched() or distributed.world_size() > 1
    if several and not getattr(args, "distributed", False):
        raise ValueError(f"manifoldlens {name.replace('-', ' ')} runs in one process; start it "
                         "without torchrun (under torchrun: gram, spectrum, leaf across, leaf "
                         "horizontal, leaf mirror, manifold fraction)")
    if getattr(args, "check", None) is not None:
        args.check(args)  # a command's checks across options, before anything is created
    if args.out:
        _check_out(Path(args.out))
    # every rank has validated the same options: errors so far need no collective
    with distributed.process_group(args.device):
        args.device = distributed.local_device(args.device)
        out = Path(args.out) if args.out else distributed.broadcast_object(
            default_run_dir(name) if distributed.is_main() else None)
        _check_out(out)  # the same path on every rank: the same answer
        torch.manual_seed(args.seed if args.seed is not None else 0)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("handler", "check", "debug", "distributed")}
        if distributed.world_size() > 1:
            config["world_size"] = distributed.world_size()
        if distributed.is_main():
            return _lead(args, out, name, config)
        error = distributed.broadcast_object(None)  # rank 0 opened the run directory, or not
        if error is not None:
            raise _Mirrored(error)
        args.started = True
        args.handler(args, RunFollower(out, name, config))
        return 0


def _lead(args: argparse.Namespace, out: Path, name: str, config: dict) -> int:
    """Rank 0 (the only process without torchrun): owns the run directory, writes, prints."""
    from . import distributed
    from .runs import Run

    try:
        run = Run(out, name, config, seed=args.seed, device=args.device,
                  resume=getattr(args, "resume", False))
    except Exception as e:
        distributed.broadcast_object(e)
        raise
    distributed.broadcast_object(None)
    with run:
        print(f"run directory: {run.path}", file=sys.stderr)
        args.handler(args, run)
        summary = summarize(run.metrics)
        run.log(summary=summary)  # every command leaves its key numbers in metrics.jsonl
    report = out / "report.html"
    print(f"{name}: " + ("; ".join(f"{k} {_shown(v)}" for k, v in list(summary.items())[:10])
                         or "done"))
    print(f"done: {out}/run.json" + (f", {report}" if args.command == "demo" else ""),
          file=sys.stderr)
    return 0


def summarize(metrics: dict, prefix: str = "") -> dict:
    """The scalar numbers of a run's metrics, nested dicts flattened as ``a.b`` (lists and
    arrays left out): what a command prints and logs when it ends."""
    out: dict = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(summarize(v, key + "."))
        elif isinstance(v, (bool, int, float, str)) and not (isinstance(v, str) and len(v) > 60):
            out[key] = v
    return out


def _shown(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
