"""The ``manifoldlens`` command line: a thin shell over :mod:`manifoldlens.commands`.

It builds the parser from each command module's ``add_arguments``, opens the run directory
(``--out``, default ``runs/<command>-<timestamp>``), calls the subcommand's handler and turns
an error into one line (``manifoldlens <command>: error: …``, exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

#: The errors reported as one line with exit status 2 (anything else is a bug: a traceback).
ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, TypeError)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command module registers its own subcommands."""
    from .commands import classifier, demo, flow, leaf, manifold
    from .commands.common import HelpFormatter

    modules = (classifier, leaf, flow, manifold, demo)  # the order of ``--help``

    parser = argparse.ArgumentParser(
        prog="manifoldlens",
        description="The geometry a trained classifier sees in its data.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in modules:
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .runs import Run, default_run_dir

    torch.manual_seed(args.seed if args.seed is not None else 0)
    experiment = getattr(args, "experiment", None)
    name = args.command + (f"-{experiment}" if experiment else "")
    out = args.out or default_run_dir(name)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k != "handler"}
    try:
        with Run(out, name, config, seed=args.seed, device=args.device,
                 resume=getattr(args, "resume", False)) as run:
            print(f"run directory: {run.path}", file=sys.stderr)
            args.handler(args, run)
    except ERRORS as e:
        print(f"manifoldlens {args.command}: error: {e}", file=sys.stderr)
        return 2
    report = Path(out) / "report.html"
    print(f"done: {out}/run.json" + (f", {report}" if args.command == "demo" else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
