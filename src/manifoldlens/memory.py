"""Memory budgets: how many bytes a batched routine needs per sample, and the chunk size that
fits a budget of ``max_memory`` bytes.

* **Budget.** ``max_memory=None`` means :data:`DEFAULT_FRACTION` of the memory available
  where the work runs (:func:`available_memory`): ``MemAvailable`` of ``/proc/meminfo`` on the
  CPU (``os.sysconf`` elsewhere), free plus cached-but-unused memory on a CUDA device
  (``torch.cuda.mem_get_info``).
* **Cost.** A routine's memory is measured, not guessed: its own code runs on one and on two
  samples of the ``meta`` device (shapes and dtypes only: nothing is allocated, nothing
  computed, the model's parameters are replaced by meta copies through
  ``torch.func.functional_call``) while :class:`MemoryMeter` follows every tensor the
  operators create and free, as an allocator's counter would (``max_memory_allocated`` on
  CUDA; on the CPU it matches the allocator's own counts in ``torch.profiler`` to the byte for
  operator outputs). Two runs give ``bytes(n) = fixed + n · per_sample``. A model that cannot
  run on ``meta`` (data-dependent control flow, tensors held outside its parameters) is
  measured on real samples instead, by a cheap stand-in the caller names (one forward and
  one backward pass) scaled by a factor that errs high.
* **Safety.** Buffers that kernels allocate without returning them (im2col columns of CPU
  convolutions, cuDNN workspaces) are invisible to the meter: :data:`SAFETY` = 1.5 covers
  them (``tests/test_memory.py`` holds the estimate within 0.5–3× of the CPU allocator's
  measured peak).
* **Chunks.** ``chunk = ⌊(max_memory − n · result_per_sample) / (SAFETY · per_sample) −
  fixed / per_sample⌋``, the ``n`` results of the call held in full. An explicit
  ``chunk_size`` wins; a budget too small for one sample raises :class:`MemoryBudgetError`
  before any real forward pass.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ._checks import check_number

__all__ = [
    "DEFAULT_FRACTION",
    "SAFETY",
    "MemoryBudgetError",
    "MemoryCost",
    "MemoryMeter",
    "allocator_peak",
    "available_memory",
    "cached_cost",
    "check_max_memory",
    "format_bytes",
    "measure_cost",
    "measured_costs",
    "meta_callable",
    "meta_forward",
    "plan_chunk_size",
    "resolve_max_memory",
]

#: Share of the available memory a call may use when ``max_memory`` is None.
DEFAULT_FRACTION = 0.5
#: Multiplier on measured bytes for kernel workspaces the meter cannot see.
SAFETY = 1.5
_FALLBACK_AVAILABLE = 4 * 2**30  # when the platform says nothing


class MemoryBudgetError(ValueError, MemoryError):
    """A routine cannot fit even one sample into ``max_memory`` (raised before any work)."""


# --------------------------------------------------------------------------------------
# The budget
# --------------------------------------------------------------------------------------


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes available for new tensors on ``device`` (default the CPU).

    CUDA: ``torch.cuda.mem_get_info`` free bytes plus what torch's caching allocator holds
    unused (reserved − allocated). Other devices: the host's ``MemAvailable``
    (``/proc/meminfo``; ``os.sysconf`` fallback; 4 GiB if the platform says nothing).
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    found = _meminfo_available()
    return int(found) if found and found > 0 else _FALLBACK_AVAILABLE


def check_max_memory(max_memory: Any) -> None:
    """Raise ``ValueError`` unless ``max_memory`` is None or a finite number of bytes > 0."""
    check_number(max_memory, "max_memory (bytes)", low=0.0, strict=True, allow_none=True)


def resolve_max_memory(max_memory: Any, device: torch.device | str | None = None) -> int:
    """``max_memory`` checked, in whole bytes; None: ``DEFAULT_FRACTION`` of
    :func:`available_memory` on ``device``."""
    check_max_memory(max_memory)
    if max_memory is None:
        return max(int(DEFAULT_FRACTION * available_memory(device)), 1)
    return max(int(max_memory), 1)


def format_bytes(n: float) -> str:
    """``"3.2 GiB"``, ``"512 MiB"``, ``"12 KiB"``: two significant figures or more."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            v = n / size
            return f"{v:.2g} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------------------
# Measuring: a dispatch mode that counts live bytes
# --------------------------------------------------------------------------------------


def _alias_source(func: Any, args: tuple, kwargs: dict, ret: Any) -> torch.Tensor | None:
    """The input argument whose storage the output described by schema return ``ret``
    shares (views, in-place and ``out=`` results), or None."""
    sets = ret.alias_info.before_set
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not (a.alias_info.before_set & sets):
            continue
        v = args[i] if i < len(args) else kwargs.get(a.name)
        if isinstance(v, torch.Tensor):
            return v
    return None


class MemoryMeter(TorchDispatchMode):
    """Inside the block, the bytes of the storages that operators create and that are still
    referenced (:attr:`live`) and their maximum (:attr:`peak`).

    A storage is counted once when an operator returns it new, kept while any tensor viewing
    it lives, and released when the last one is freed (weak references): the accounting of an
    allocator, also on the ``meta`` device, where nothing is allocated. Tensors that existed
    before the block (parameters, inputs) are not counted.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # nothing here is compiled: do not import dynamo
        return False

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._lock = threading.RLock()  # a weakref callback may run inside
        self._key: dict[int, int] = {}  # id(tensor) -> storage key
        self._store: dict[int, list[int]] = {}  # key -> [bytes, live tensors]
        self._refs: dict[int, weakref.ref] = {}
        self._next = 0

    def _hold(self, t: torch.Tensor, key: int) -> None:
        tid = id(t)
        if tid in self._key:
            return
        self._store[key][1] += 1
        self._key[tid] = key
        self._refs[tid] = weakref.ref(t, lambda _r, tid=tid: self._release(tid))

    def _release(self, tid: int) -> None:
        with self._lock:
            key = self._key.pop(tid, None)
            self._refs.pop(tid, None)
            if key is None:
                return
            entry = self._store[key]
            entry[1] -= 1
            if entry[1] == 0:
                self.live -= entry[0]
                del self._store[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        rets = func._schema.returns
        with self._lock:
            for i, o in enumerate(outs):
                if not isinstance(o, torch.Tensor):
                    continue
                ret = rets[i] if i < len(rets) else rets[-1] if len(rets) == 1 else None
                if ret is not None and ret.alias_info is not None:
                    src = _alias_source(func, args, kwargs, ret)
                    key = None if src is None else self._key.get(id(src))
                    if key is not None:
                        self._hold(o, key)
                    continue
                key, self._next = self._next, self._next + 1
                size = o.untyped_storage().nbytes()
                self._store[key] = [size, 0]
                self.live += size
                self.peak = max(self.peak, self.live)
                self._hold(o, key)
        return out

    def __exit__(self, *exc: Any) -> Any:
        result = super().__exit__(*exc)
        with self._lock:  # stop following what outlives the block
            self._refs.clear()
            self._key.clear()
        return result


def meta_callable(model: Any) -> Callable[[torch.Tensor], Any] | None:
    """``model`` with its parameters and buffers replaced by ``meta`` copies (same shapes,
    dtypes and ``requires_grad``), through ``torch.func.functional_call``; None for callables
    that are not modules. The model itself is not touched."""
    if not isinstance(model, nn.Module):
        return None
    state = {k: torch.empty_like(v, device="meta").requires_grad_(v.requires_grad)
             for k, v in model.named_parameters(remove_duplicate=False)}
    state.update({k: torch.empty_like(v, device="meta")
                  for k, v in model.named_buffers(remove_duplicate=False)})

    def run(z: torch.Tensor) -> Any:
        return torch.func.functional_call(model, state, (z,), strict=False)

    return run


def _meta_batch(x: torch.Tensor, b: int) -> torch.Tensor:
    return torch.empty((b, *x.shape[1:]), dtype=x.dtype, device="meta")


def meta_forward(model: Any, x: torch.Tensor) -> Any | None:
    """The model's output for one sample shaped like ``x[0]``, on ``meta`` and without grad
    (what it returns, not values), or None if the model cannot run there."""
    fn = meta_callable(model)
    if fn is None:
        return None
    try:
        with torch.no_grad():
            return fn(_meta_batch(x, 1))
    except Exception:  # noqa: BLE001 — any failure means: measure on real data instead
        return None


@dataclass(frozen=True)
class MemoryCost:
    """``bytes(n) = SAFETY · (fixed + n · per_sample)``: the working memory of a routine on a
    chunk of n samples. ``exact`` is False when it was scaled from a stand-in."""

    fixed: int
    per_sample: int
    exact: bool = True

    def bytes(self, n: int) -> int:
        return math.ceil(SAFETY * (self.fixed + n * self.per_sample))


def _peak(run: Callable[[], Any]) -> int:
    meter = MemoryMeter()
    with meter:
        result = run()
        del result
    return meter.peak


def _fit(run: Callable[[int], Any]) -> MemoryCost:
    p1, p2 = _peak(lambda: run(1)), _peak(lambda: run(2))
    per = p2 - p1 if p2 > p1 else max(p1, 1)
    return MemoryCost(max(p1 - per, 0), per)


def measure_cost(
    model: Any,
    x: torch.Tensor,
    run: Callable[[Any, torch.Tensor], Any],
    *,
    fallback: Callable[[Any, torch.Tensor], Any] | None = None,
    factor: float = 1.0,
    extra: int = 0,
) -> MemoryCost:
    """The memory of ``run(model_fn, x_b)`` (the routine's own code on a model callable and b
    samples shaped like ``x[0]``) as :class:`MemoryCost`, from b = 1 and b = 2.

    On ``meta`` first (:func:`meta_callable`). Where the model cannot run there, on two real
    samples of x: ``fallback`` (a cheaper stand-in, e.g. one forward and backward pass) with
    its bytes times ``factor`` plus ``extra`` bytes per sample (the routine's outputs), or
    ``run`` itself when no stand-in is given.
    """
    fn = meta_callable(model)
    if fn is not None:
        try:
            return _fit(lambda b: run(fn, _meta_batch(x, b)))
        except Exception:  # noqa: BLE001 — the model does not run on meta: measure for real
            pass
    rows = torch.zeros(2, dtype=torch.long, device=x.device)
    sample = x.detach()[rows]
    if fallback is None:
        return _fit(lambda b: run(model, sample[:b]))
    cost = _fit(lambda b: fallback(model, sample[:b]))
    return MemoryCost(math.ceil(cost.fixed * factor),
                      math.ceil(cost.per_sample * factor + extra), exact=False)


_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_cost(model: Any, key: tuple, compute: Callable[[], MemoryCost]) -> MemoryCost:
    """``compute()``, remembered per model and ``key`` (the shapes, dtype and settings it
    depends on) for as long as the model lives."""
    try:
        table = _COSTS.setdefault(model, {})
    except TypeError:  # not weak-referenceable: measure every time
        return compute()
    if key not in table:
        table[key] = compute()
    return table[key]


def measured_costs(model: Any) -> dict[tuple, MemoryCost]:
    """The costs measured for ``model`` so far, by key: ``(routine, its settings…, input shape,
    dtype, device type)``; e.g. ``("jacobian", "vjp", "logits", True, "log_softmax", (3, 64,
    64), torch.float32, "cpu")``."""
    try:
        return dict(_COSTS.get(model, {}))
    except TypeError:
        return {}


def plan_chunk_size(
    n: int,
    cost: MemoryCost,
    max_memory: int,
    *,
    chunk_size: int | None = None,
    result_per_sample: int = 0,
    held: int = 0,
    what: str,
    shape: tuple[int, ...],
    hint: str = "raise max_memory",
) -> int:
    """The number of samples (at most n) per chunk that keeps ``cost`` plus the ``n`` results
    (``result_per_sample`` bytes each) and ``held`` other bytes within ``max_memory`` bytes;
    an explicit ``chunk_size`` wins. Raises :class:`MemoryBudgetError` (naming ``what``, one
    sample's ``shape``, the bytes needed and ``hint``) when not even one sample fits."""
    results = n * result_per_sample + held
    one = cost.bytes(1)
    if one + results > max_memory:
        held_s = f" plus {format_bytes(results)} for the results" if results else ""
        approx = "" if cost.exact else " (a coarse estimate: the model does not run on meta)"
        raise MemoryBudgetError(
            f"{what} needs ~{format_bytes(one)} for one sample of {tuple(shape)}{held_s}"
            f"{approx}; max_memory is {format_bytes(max_memory)}; {hint}"
        )
    if chunk_size is not None:
        return min(chunk_size, n)
    room = (max_memory - results) / SAFETY - cost.fixed
    return max(1, min(n, int(room // max(cost.per_sample, 1))))


def allocator_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes the CPU allocator held during ``fn()``, from its own allocation and free
    events (``torch.profiler`` with ``profile_memory``): what :func:`measure_cost`'s
    estimates are checked against."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, b in events:
        live += b
        peak = max(peak, live)
    return peak
