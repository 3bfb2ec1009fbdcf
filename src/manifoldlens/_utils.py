"""Internal utilities shared by the package's modules: model outputs to scores, chunks,
progress bars, eval mode, atomic writes, checkpoint look-up.

The module is private to the package (users import nothing from it), but its names carry no
underscore: every module of manifoldlens may use them. Nothing here imports another
manifoldlens module except :mod:`manifoldlens._checks`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checks import check_model_output

__all__ = [
    "chunks",
    "differing",
    "eval_mode",
    "latest_checkpoint",
    "model_fingerprint",
    "predict_probs",
    "progress_bar",
    "scores_with_graph",
    "sha256_file",
    "tensor_sha256",
    "to_scores",
    "write_atomic",
]


def to_scores(out: torch.Tensor, model_output: str) -> torch.Tensor:
    """Map what the model returns to scores s with softmax(s) = p.

    Log-probabilities are valid scores already (softmax(log p) = p). Probabilities are mapped
    through log, clamped at the smallest normal number of the dtype.
    """
    if model_output == "probs":
        return torch.log(out.clamp_min(torch.finfo(out.dtype).tiny))
    return out


def scores_with_graph(model: nn.Module, x: torch.Tensor, model_output: str,
                      check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_r, s)``: a leaf copy of x that requires grad and the scores computed from it (call
    under ``torch.enable_grad()``); the model's raw output is checked when ``check``."""
    xr = x.detach().requires_grad_(True)
    out = model(xr)
    if check:
        check_model_output(out, model_output, x.shape[0])
    return xr, to_scores(out, model_output)


def predict_probs(model: nn.Module, x: torch.Tensor, model_output: str) -> torch.Tensor:
    """p(x) = softmax(s(x)) without a graph, the model's output checked first."""
    with torch.no_grad():
        out = model(x)
    check_model_output(out, model_output, x.shape[0])
    return torch.softmax(to_scores(out, model_output), dim=1)


def chunks(n: int, chunk_size: int | None) -> Iterator[slice]:
    """Slices covering ``range(n)`` in pieces of ``chunk_size`` (all at once if None or ≤ 0)."""
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True,
                 **options: Any) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``), or None / the iterable
    itself when ``enabled`` is False. tqdm is imported only when a bar is shown."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **options)


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Every submodule of ``model`` in eval mode inside the block (through ``model.eval()``,
    so modules that override ``train()`` hear of it); each one's own mode is restored after
    it — by ``model.train(mode)`` when all shared one mode, else module by module. Objects
    that are not modules pass."""
    if not isinstance(model, nn.Module):
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        if len({mode for _, mode in modes}) == 1:
            model.train(modes[0][1])
        else:
            for m, mode in modes:
                m.training = mode


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``: a reader
    (or a resumed run) never sees a file cut short by an interruption."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks of ``chunk`` bytes (bounded memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(*tensors: torch.Tensor | None) -> str:
    """sha256 over the dtype, shape and bytes of each tensor (on the CPU, without a copy of
    contiguous CPU tensors): a fingerprint of data or weights."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            flat = t.reshape(-1)
            if flat.dtype == torch.bfloat16:
                flat = flat.view(torch.int16)
            h.update(memoryview(flat.cpu().contiguous().numpy()))
    return h.hexdigest()


def model_fingerprint(model: nn.Module, weights: bool = True) -> dict[str, Any]:
    """What identifies a model: its manifoldlens ``spec`` (or class and parameter shapes) and,
    with ``weights``, the sha256 of its parameters and buffers."""
    spec = getattr(model, "spec", None)
    out: dict[str, Any] = ({"spec": spec} if isinstance(spec, dict) else
                           {"class": f"{type(model).__module__}.{type(model).__qualname__}"})
    state = model.state_dict()
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    out["structure_sha256"] = hashlib.sha256(shapes.encode()).hexdigest()
    if weights:
        out["weights_sha256"] = tensor_sha256(*state.values())
    return out


def differing(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two settings dicts (missing counts as None)."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest ``step-*.json`` checkpoint manifest in ``directory``, or None."""
    found = sorted(Path(directory).glob("step-*.json"))
    return found[-1] if found else None
