"""Internal utilities shared by the package's modules: model outputs to scores, chunks,
progress bars, eval mode, atomic writes, checkpoint look-up.

The module is private to the package (users import nothing from it), but its names carry no
underscore: every module of manifoldlens may use them. Nothing here imports another
manifoldlens module except :mod:`manifoldlens._checks`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
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
    "BuildTooLarge",
    "build_budget",
    "eval_mode",
    "first_nonfinite",
    "json_text",
    "jsonable",
    "latest_checkpoint",
    "model_fingerprint",
    "predict_probs",
    "progress_bar",
    "safetensors_header",
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


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values, the one convention of every JSON file manifoldlens writes
    (run.json, metrics.jsonl, checkpoint manifests): dict keys become strings, tuples lists,
    paths strings, numpy / torch scalars and arrays Python numbers and lists; a NaN becomes
    ``null`` and an infinity the string ``"inf"`` or ``"-inf"`` (``float()`` reads them back),
    so the files are standard JSON that any reader accepts. Other objects are returned as
    they are (:func:`json_text` refuses them)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())  # numpy / torch scalars and arrays
    return obj


def _not_serialisable(obj: Any) -> Any:
    raise TypeError(f"a value of type {type(obj).__name__} is not JSON-serialisable")


def json_text(obj: Any, *, indent: int | None = None) -> str:
    """``json.dumps`` of :func:`jsonable` ``(obj)``: standard JSON (never ``NaN`` or
    ``Infinity``); a value JSON cannot hold raises ``TypeError`` naming its type."""
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False, default=_not_serialisable)


class BuildTooLarge(Exception):
    """Raised inside a :func:`build_budget` block when the model being built outgrows it."""


@contextlib.contextmanager
def build_budget(*, tensors: int, elements: int, modules: int) -> Iterator[dict[str, int]]:
    """Inside the block, registering more than ``tensors`` parameters and buffers, ``elements``
    elements in them, or ``modules`` submodules (in all modules, counted by torch's global
    registration hooks) raises :class:`BuildTooLarge` at once: a constructor given absurd
    sizes stops early, also on the ``meta`` device where nothing else would stop it."""
    from torch.nn.modules import module as _m

    counts = {"tensors": 0, "elements": 0, "modules": 0}
    limits = {"tensors": tensors, "elements": elements, "modules": modules}

    def count(kind: str, n: int) -> None:
        counts[kind] += n
        if counts[kind] > limits[kind]:
            raise BuildTooLarge(f"more than {limits[kind]} {kind}")

    def on_tensor(module: nn.Module, name: str, t: torch.Tensor | None) -> None:
        if t is not None:
            count("tensors", 1)
            count("elements", t.numel())

    handles = [_m.register_module_parameter_registration_hook(on_tensor),
               _m.register_module_buffer_registration_hook(on_tensor),
               _m.register_module_module_registration_hook(lambda *_: count("modules", 1))]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def first_nonfinite(state: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """``(name, count of NaN/Inf, numel)`` of the first floating tensor of ``state`` holding
    NaN or Inf, or None."""
    for name, t in state.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return name, bad, t.numel()
    return None


#: safetensors dtype names → torch dtypes (those a manifoldlens checkpoint can hold).
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                      "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8,
                      "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                      "BOOL": torch.bool}


def safetensors_header(path: str | os.PathLike
                       ) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """``({name: (dtype, shape)}, metadata)`` of a safetensors file, from its header alone
    (no tensor data read); a ValueError names the file if it is unreadable or holds a dtype
    outside :data:`SAFETENSORS_DTYPES`."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            raw = {k: (s.get_dtype(), tuple(s.get_shape())) for k, s in slices.items()}
            metadata = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    unknown = sorted({dt for dt, _ in raw.values()} - set(SAFETENSORS_DTYPES))
    if unknown:
        raise ValueError(f"{path} holds tensors of dtypes {unknown}; known: "
                         f"{sorted(SAFETENSORS_DTYPES)}")
    return {k: (SAFETENSORS_DTYPES[dt], shape) for k, (dt, shape) in raw.items()}, metadata
