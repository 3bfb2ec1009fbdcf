"""What the command modules share: options whose defaults are read from the ``run_*``
function they feed, the options every command has, list parsers, the dataset of a
checkpoint, and the choice of test images and pairs used by ``leaf`` and ``demo``.

Defaults live in one place, the signature of the function a command calls. :func:`option`
adds an argparse option whose default is that of a parameter of the function (read with
:func:`inspect.signature`), and :class:`HelpFormatter` writes every option's default into its
help, so ``--help`` and the function cannot disagree.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .._checks import check_positive_int
from .._utils import predict_probs, tensor_sha256
from ..data import DATASETS, ImageDataset, load_dataset, locate_dataset

__all__ = [
    "DATA_HELP",
    "DEVICE",
    "ROOT_HELP",
    "SEED",
    "HelpFormatter",
    "add_checkpoint_data",
    "add_command",
    "add_common",
    "add_data",
    "add_length",
    "add_resume",
    "allow_change",
    "checked",
    "checkpoint_data",
    "data_directory",
    "data_root",
    "dataset_for",
    "default_of",
    "floats",
    "ints",
    "interpolation",
    "names",
    "out_dir",
    "option",
    "pick",
    "pick_pairs",
    "split_sha256",
    "verify_split",
    "progress",
]

#: ``--device`` and ``--seed`` of a command whose function takes no such parameter.
DEVICE = "cpu"
SEED = 0

Handler = Callable[[argparse.Namespace, Any], Any]


# ---------------------------------------------------------------------------------------------
# argparse: defaults from signatures, shown in the help
# ---------------------------------------------------------------------------------------------


def _shown(value: Any, nargs: Any = None) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        if not value:
            return "none"
        return (" " if isinstance(nargs, int) else ",").join(_shown(v) for v in value)
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Writes ``(default: …)`` after the help of every option whose help does not speak of
    its default already; tuples are shown as they are typed (``0.5,0.7`` or ``0 1``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is argparse.SUPPRESS
                or "default" in text):
            return text
        shown = _shown(action.default, action.nargs).replace("%", "%%")
        return f"{text} (default: {shown})".lstrip()


def default_of(fn: Callable[..., Any], param: str) -> Any:
    """The default of ``fn``'s parameter ``param``; a ``ValueError`` if it has none."""
    p = inspect.signature(fn).parameters.get(param)
    if p is None or p.default is inspect.Parameter.empty:
        raise ValueError(f"{fn.__qualname__} has no parameter {param!r} with a default")
    return p.default


_DEFAULT_LOW = object()


def checked(kind: Callable[[str], Any], low: Any = _DEFAULT_LOW,
            high: float | None = None) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int, float, ints or floats) whose numbers must be finite and
    in range — ints ≥ 1 and floats > 0 unless ``low`` says otherwise (an inclusive lower
    bound, or None for any finite number); ``high`` an inclusive upper bound. A value out of
    range is a usage error (argparse names the option) giving the range, before anything
    runs."""
    integer = kind in (int, ints)
    if low is _DEFAULT_LOW:
        low, strict = (1, False) if integer else (0.0, True)
    else:
        strict = False

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"takes {'integers' if integer else 'numbers'}, got {text!r}") from None
        for v in value if isinstance(value, tuple) else (value,):
            bad = not math.isfinite(v) or (low is not None and (v <= low if strict else v < low))
            if bad or (high is not None and v > high):
                lo = "" if low is None else (f"> {low}" if strict else f">= {low}")
                hi = "" if high is None else f"<= {high}"
                limits = " and ".join(t for t in (lo, hi) if t) or "finite"
                raise argparse.ArgumentTypeError(f"must be {limits}, got {text!r}")
        return value

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in errors
    return parse


def option(parser: Any, flag: str, fn: Callable[..., Any], param: str | None = None, *,
           low: Any = _DEFAULT_LOW, high: float | None = None, aliases: tuple[str, ...] = (),
           **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(flag, *aliases, …)`` with the default of ``fn``'s parameter
    ``param`` (default: the flag's name, ``--batch-size`` → ``batch_size``). ``parser`` may be
    a mutually exclusive group. The option keeps its own ``dest`` (the flag's name). Numeric
    types are range-checked (:func:`checked`; ``low``/``high``)."""
    param = param or flag.lstrip("-").replace("-", "_")
    default = default_of(fn, param)
    if kwargs.get("action") == "append":
        default = list(default)  # argparse appends to the default in place
    if kwargs.get("type") in (int, float, ints, floats):
        kwargs["type"] = checked(kwargs["type"], low, high)
    return parser.add_argument(flag, *aliases, default=default, **kwargs)


def add_command(subparsers: Any, name: str, handler: Handler, help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments are handled by ``handler(args, run)``."""
    p = subparsers.add_parser(name, help=help, description=description or help,
                              formatter_class=HelpFormatter)
    p.set_defaults(handler=handler)
    return p


def _first_default(fns: Iterable[Callable[..., Any]], param: str, fallback: Any) -> Any:
    for fn in fns:
        p = inspect.signature(fn).parameters.get(param)
        if p is not None and p.default is not inspect.Parameter.empty:
            return p.default
    return fallback


def out_dir(text: str) -> Path:
    """An argparse type for ``--out``: a non-empty path (an unset shell variable must not turn
    the current directory into a run directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; name a run directory")
    return Path(text)


def add_common(p: argparse.ArgumentParser, *fns: Callable[..., Any],
               seed_help: str = "random seed") -> None:
    """``--out``, ``--device``, ``--seed``, ``--no-progress``; ``--device`` and ``--seed``
    default to the first of ``fns`` that has such a parameter, else :data:`DEVICE` and
    :data:`SEED`."""
    p.add_argument("--out", type=out_dir, help="run directory (default: runs/<command>-<time>)")
    p.add_argument("--device", default=_first_default(fns, "device", DEVICE),
                   help="torch device (cpu, cuda, cuda:1 ...)")
    p.add_argument("--seed", type=int, default=_first_default(fns, "seed", SEED),
                   help=seed_help)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_length(p: argparse.ArgumentParser, fn: Callable[..., Any], *,
               epochs: str = "", steps: str = "") -> None:
    """``--epochs`` or ``--steps`` (one of them), with their defaults from ``fn``; ``epochs`` /
    ``steps``: what the help says happens when neither is given."""
    length = p.add_mutually_exclusive_group()
    option(length, "--epochs", fn, type=float, low=0.0,
           help="training length in epochs" + (f" (default: {epochs})" if epochs else ""))
    option(length, "--steps", fn, type=int, low=0,
           help="training length in steps" + (f" (default: {steps})" if steps else ""))


def add_resume(p: argparse.ArgumentParser, fn: Callable[..., Any] | None = None) -> None:
    """``--resume``: continue the run in ``--out`` (the default of ``fn``'s ``resume``); and
    ``--allow-change`` where ``fn`` takes ``allow_changes``."""
    p.add_argument("--resume", action="store_true",
                   default=default_of(fn, "resume") if fn is not None else False,
                   help="continue the run in --out")
    if fn is not None and "allow_changes" in inspect.signature(fn).parameters:
        p.add_argument("--allow-change", action="append", default=[], metavar="SETTING",
                       help="with --resume: a training setting that may differ from the "
                            "interrupted run, e.g. lr (repeatable; recorded in the run)")


def allow_change(args: argparse.Namespace) -> tuple[str, ...]:
    """The settings ``--allow-change`` names, as ``allow_changes=``."""
    return tuple(getattr(args, "allow_change", None) or ())


DATA_HELP = f"{', '.join(DATASETS)} or an IDX directory"
ROOT_HELP = ("directory holding the dataset's IDX files (default: $MANIFOLDLENS_DATA, else "
             "/usr/share/datasets/<name>)")


def add_data(p: argparse.ArgumentParser, fn: Callable[..., Any], help: str = DATA_HELP) -> None:
    """``--data`` and ``--root`` with the defaults of ``fn``'s ``data`` and ``root``."""
    option(p, "--data", fn, help=help)
    option(p, "--root", fn, help=ROOT_HELP)


def progress(args: argparse.Namespace) -> bool:
    """Whether to show progress bars (``--no-progress`` not given)."""
    return not args.no_progress


def _split(text: str, unique: bool = False) -> list[str]:
    """The comma-separated items of an option: at least one (and none twice, with
    ``unique``: names of methods or classifiers)."""
    items = [t for t in (s.strip() for s in text.split(",")) if t]
    if not items:
        raise argparse.ArgumentTypeError("is empty; give a comma-separated list")
    if unique and len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"lists an item twice: {text!r}")
    return items


def ints(text: str) -> tuple[int, ...]:
    """``"128,128"`` → ``(128, 128)``."""
    return tuple(int(t) for t in _split(text))


def floats(text: str) -> tuple[float, ...]:
    """``"0.5,0.7"`` → ``(0.5, 0.7)``."""
    return tuple(float(t) for t in _split(text))


def names(text: str) -> tuple[str, ...]:
    """``"gradient,smoothgrad"`` → ``("gradient", "smoothgrad")``."""
    return tuple(_split(text, unique=True))


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def dataset_for(meta: dict[str, Any], data: str | None = None, split: str = "test",
                root: str | None = None, limit: int | None = None,
                seed: int = 0) -> ImageDataset:
    """The split of the dataset a checkpoint was trained on (or ``data``), optionally a
    stratified subset of ``limit`` points."""
    name = data or meta.get("data")
    if name is None:
        raise ValueError("the checkpoint does not record its dataset: pass --data")
    ds = load_dataset(name, split, root)
    if data is None:
        verify_split(meta, ds, split, "pass --root to that data, or --data to evaluate on "
                     "other data on purpose")
    if limit is not None and limit > len(ds):
        raise ValueError(f"limit={limit} exceeds the {len(ds)} images of the {split} split "
                         f"of {name!r}")
    return ds.subset(limit, seed=seed) if limit is not None and limit < len(ds) else ds


def data_directory(name: str, root: str | None = None) -> str | None:
    """The absolute directory :func:`load_dataset` reads ``name``'s IDX files from (given
    ``root``, ``$MANIFOLDLENS_DATA``, …), for a checkpoint to record; None for the datasets
    that ship with a package (digits, mnist-5k), which have none."""
    try:
        images, _ = locate_dataset(name, "train", root)
    except ValueError:  # embedded: no IDX files (a missing directory raises FileNotFoundError)
        return None
    return str(images.parent.resolve())


def data_root(meta: dict[str, Any], root: str | None, checkpoint: str) -> str | None:
    """``root`` when given, else the data directory a checkpoint records (``data_dir`` of
    ``manifold vae``; None in older checkpoints and for embedded datasets). The recorded
    ``data_sha256`` still guards against other data found there (:func:`verify_split`)."""
    if root is not None:
        return root
    recorded = meta.get("data_dir")
    if recorded is not None and not isinstance(recorded, str):
        raise ValueError(f"{checkpoint}: its metadata field 'data_dir' should be a path "
                         f"string, got {type(recorded).__name__}")
    return recorded


def verify_split(meta: dict[str, Any], ds: ImageDataset, split: str, hint: str) -> None:
    """Refuse a split whose sha256 differs from the one a checkpoint's ``data_sha256``
    records (a dataset rewritten under the same name); checkpoints that record none pass."""
    recorded = (meta.get("data_sha256") or {}).get(split)
    if recorded is not None and recorded != split_sha256(ds):
        raise ValueError(f"the {split} split found for {ds.name!r} is not the data the model "
                         f"was trained with (its sha256 differs): {hint}")


def split_sha256(ds: ImageDataset) -> str:
    """The identity of a data split: sha256 of its images and labels."""
    return tensor_sha256(ds.images, ds.labels)


def add_checkpoint_data(p: argparse.ArgumentParser, fn: Callable[..., Any],
                        limit: bool = False) -> None:
    """``--data``, ``--root``, ``--split`` (and ``--limit``) of :func:`dataset_for`, and
    ``--model-output`` of ``fn``: the arguments of :func:`checkpoint_data`."""
    add_data(p, dataset_for, help=f"{DATA_HELP} (default: the dataset the checkpoint records)")
    option(p, "--split", dataset_for, choices=["train", "test"], help="the dataset's split")
    if limit is not None:
        option(p, "--limit", dataset_for, type=int,
               help="a stratified subset of this many points")
    option(p, "--model-output", fn, choices=["logits", "log_probs", "probs"],
           help="what the model returns")


def checkpoint_data(args: argparse.Namespace) -> tuple[nn.Module, ImageDataset]:
    """The model of ``args.checkpoint`` on ``args.device`` and the split of its dataset
    chosen by ``--data``/``--root``/``--split``/``--limit``/``--seed``."""
    from ..models import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint, map_location=args.device)
    ds = dataset_for(meta, args.data, args.split, args.root, getattr(args, "limit", None),
                     args.seed)
    return model, ds.to(args.device)


# ---------------------------------------------------------------------------------------------
# test images and pairs (leaf, demo)
# ---------------------------------------------------------------------------------------------


def pick(dataset: ImageDataset, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct indices of ``dataset``, drawn with ``seed``."""
    check_positive_int(n, "n")
    if n > len(dataset):
        raise ValueError(f"n = {n} is more than the {len(dataset)} points of the split")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(len(dataset), generator=g)[:n]


def pick_pairs(dataset: ImageDataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (source, target) index pairs with different labels."""
    check_positive_int(n, "the number of pairs")
    if len(set(dataset.labels.tolist())) < 2:
        raise ValueError("pairs with different labels need at least two classes in the split")
    g = torch.Generator().manual_seed(seed)
    src, tgt = [], []
    while len(src) < n:
        i, j = torch.randint(len(dataset), (2,), generator=g).tolist()
        if dataset.labels[i] != dataset.labels[j]:
            src.append(i)
            tgt.append(j)
    return torch.tensor(src), torch.tensor(tgt)


def interpolation(model: nn.Module, src: torch.Tensor, tgt: torch.Tensor, steps: int,
                  model_output: str) -> SimpleNamespace:
    """Straight segments between the endpoints, as a path-like record (``points``,
    ``probs``, ``record_steps``)."""
    t = torch.linspace(0, 1, steps).to(src)
    pts = src[None] + t.view(-1, *[1] * src.ndim) * (tgt - src)[None]
    probs = torch.stack([predict_probs(model, p, model_output) for p in pts])
    return SimpleNamespace(points=pts, probs=probs, record_steps=torch.arange(steps))
