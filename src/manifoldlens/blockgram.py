"""Gram matrices ``M = 𝒥𝒥ᵀ`` of rows computed block by block, for n up to what the disk holds:
in memory, through a scratch file, or into a resumable ``.npy`` file; sharded over the
processes of a ``torch.distributed`` group when there is one.

:func:`blocked_gram` computes the rows of 𝒥 in blocks of ``batch_size`` (phase 1), then M in
tiles of ``block_size`` × ``block_size`` rows, the lower triangle and its mirror (phase 2).
Each process takes a contiguous share of the blocks of each phase
(:func:`manifoldlens.distributed.shard`); what it computed reaches the others through a
shared file or an all-gather. The grid depends on ``batch_size`` and ``block_size`` alone,
never on the number of processes, so every process count computes every block the same way
and gets the same M, bit for bit.

:class:`NpyMatrix` reads and writes rows and tiles of a 2-D C-order ``.npy`` file through
positioned reads and writes: no memory map is held, so what a process reads is a copy of
the size it asked for and what it writes goes to the page cache, neither staying in its
resident memory. Several processes may write disjoint blocks of one file at once.

:class:`BlockRecord` keeps, in a directory beside the output, ``state.json`` (the settings
that produced it and whether it is complete) and one ``rank-<r>.json`` per process (bit
sets of the finished blocks of each kind, replaced atomically after every block). A record
made with other settings is refused, naming the settings that differ.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ._utils import chunks, differing, json_text, progress_bar, write_atomic
from .distributed import barrier, broadcast_object, gather, is_main, rank, shares, world_size
from .memory import MemoryBudgetError, format_bytes

__all__ = ["BlockRecord", "GramPlan", "NpyMatrix", "blocked_gram", "gram_tile", "plan_gram",
           "recorded_settings", "tile_rows"]


class NpyMatrix:
    """A 2-D ``.npy`` file of ``shape`` and ``dtype``, created (``create=True``: a sparse file
    of that size, its contents undefined until written) or opened and checked."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int], dtype: Any, *,
                 create: bool = False) -> None:
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        if create:
            m = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype,
                                          shape=self.shape)
        else:
            try:
                m = np.load(self.path, mmap_mode="r")
            except (ValueError, OSError) as e:
                raise ValueError(f"{self.path} is not a readable .npy file ({e})") from None
            if (m.shape != self.shape or m.dtype != self.dtype or not m.flags.c_contiguous):
                raise ValueError(f"{self.path} holds a {m.dtype} array of shape {m.shape}, not "
                                 f"{self.dtype} {self.shape}")
        self.offset = int(m.offset)
        del m
        self.fd = os.open(self.path, os.O_RDWR)

    def _at(self, row: int, col: int = 0) -> int:
        return self.offset + (row * self.shape[1] + col) * self.dtype.itemsize

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new array."""
        out = np.empty((stop - start, self.shape[1]), dtype=self.dtype)
        buf = memoryview(out).cast("B")
        done = 0
        while done < len(buf):
            k = os.preadv(self.fd, [buf[done:]], self._at(start) + done)
            if k <= 0:
                raise OSError(f"{self.path} ends early (truncated?)")
            done += k
        return out

    def _write(self, data: np.ndarray, offset: int) -> None:
        buf = memoryview(np.ascontiguousarray(data, dtype=self.dtype)).cast("B")
        done = 0
        while done < len(buf):
            done += os.pwrite(self.fd, buf[done:], offset + done)

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        """Rows ``start : start + len(rows)``, all columns."""
        self._write(rows, self._at(start))

    def write_tile(self, rows: slice, cols: slice, tile: np.ndarray) -> None:
        """The tile ``[rows, cols]``, one positioned write per row."""
        tile = np.ascontiguousarray(tile, dtype=self.dtype)
        for k, i in enumerate(range(rows.start, rows.stop)):
            self._write(tile[k], self._at(i, cols.start))

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def _bits(items: Iterable[int]) -> str:
    value = 0
    for i in items:
        value |= 1 << i
    return format(value, "x")


def _items(text: str) -> set[int]:
    value, out = int(text, 16), set()
    while value:
        low = value & -value
        out.add(low.bit_length() - 1)
        value ^= low
    return out


class BlockRecord:
    """The record of a blocked computation in ``directory``, for ``settings`` (a JSON-able
    dict: whatever decides the result, fingerprints of model and data included).

    ``done[kind]`` is the set of finished blocks of each kind, the union of what every
    process recorded. :meth:`load` finds an existing record (refusing one of other
    settings); :meth:`start` begins a new one; :meth:`add` records a block (this rank's file,
    atomically); :meth:`finish` marks the record complete.
    """

    STATE = "state.json"

    def __init__(self, directory: str | os.PathLike, settings: dict[str, Any],
                 kinds: Iterable[str], rank: int = 0) -> None:
        self.directory = Path(directory)
        self.settings = json.loads(json_text(settings))  # as it reads back from the file
        self.kinds = tuple(kinds)
        self.rank = rank
        self.done: dict[str, set[int]] = {k: set() for k in self.kinds}
        self.complete = False

    def load(self, what: str) -> bool:
        """Read the record; False if there is none. A ValueError, naming ``what`` and the
        settings that differ, if it was made with other settings."""
        state = self.directory / self.STATE
        if not state.exists():
            return False
        try:
            doc = json.loads(state.read_text())
            saved = doc["settings"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{state} is not a valid block record ({e}); delete "
                             f"{self.directory} to start over") from None
        if saved != self.settings:
            fields = differing(saved, self.settings) if isinstance(saved, dict) else ["all"]
            raise ValueError(f"{what} was made with other settings (differing: "
                             f"{', '.join(fields)}); delete it and {self.directory}, or choose "
                             "another output")
        self.complete = bool(doc.get("complete"))
        for part in sorted(self.directory.glob("rank-*.json")):
            try:
                rec = json.loads(part.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # cannot happen with atomic writes; its blocks are redone
            for kind in self.kinds:
                if isinstance(rec.get(kind), str):
                    self.done[kind] |= _items(rec[kind])
        return True

    LOCK = ".lock"

    def acquire(self, what: str) -> None:
        """An exclusive lock on the record (``flock`` on ``.lock`` in its directory, released
        by :meth:`release` or when the process dies): a second computation of the same
        output is refused at once, naming the holder's pid. (Workers of a ``torchrun``
        launch killed with SIGKILL keep running: they hold it until they end.)"""
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(f"{what} is being computed by another process (pid "
                                  f"{holder}); wait for it to end or stop it") from None
        except OSError:  # a file system without locks: nothing to hold
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    def release(self) -> None:
        fd, self._lock = getattr(self, "_lock", None), None
        if fd is not None:
            os.close(fd)

    def start(self) -> None:
        """An empty directory for a new record (what an old one held removed, the lock kept).
        :meth:`write_state` follows once the files the record describes exist."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for p in self.directory.iterdir():
            if p.name != self.LOCK:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.done = {k: set() for k in self.kinds}
        self.complete = False

    def write_state(self, complete: bool = False) -> None:
        text = json_text({"settings": self.settings, "complete": complete}, indent=1) + "\n"
        write_atomic(self.directory / self.STATE, lambda tmp: tmp.write_text(text))
        self.complete = complete

    def add(self, kind: str, index: int) -> None:
        """Record block ``index`` of ``kind`` as finished (after its data are written)."""
        self.done[kind].add(index)
        path = self.directory / f"rank-{self.rank}.json"
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # no writer shares a scratch
        tmp.write_text(json_text({k: _bits(v) for k, v in self.done.items()}))
        os.replace(tmp, path)

    def finish(self, remove: Iterable[str] = ()) -> None:
        """Mark the record complete, then delete the per-rank files and the scratch files
        ``remove`` (names inside the directory)."""
        self.write_state(complete=True)
        for part in self.directory.glob("rank-*.json"):
            part.unlink(missing_ok=True)
        for name in remove:
            (self.directory / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# the blocked Gram matrix
# ---------------------------------------------------------------------------------------------

#: The largest default tile (rows of M per block): big enough for efficient products, small
#: enough that the tiles of a large n spread over many processes.
MAX_TILE = 2048


#: Rows of 𝒥 per batch when none is given (fewer when the budget says so).
DEFAULT_BATCH = 256


def tile_rows(width: int, itemsize: int, max_memory: int) -> int:
    """Rows per tile such that the two row blocks a tile needs take at most half of
    ``max_memory`` bytes, at most :data:`MAX_TILE` (a rule of thumb: :func:`plan_gram` sizes
    the tiles of :func:`~manifoldlens.jacobian.jacobian_gram`)."""
    return max(1, min(MAX_TILE, max_memory // (4 * width * itemsize)))


class GramPlan(NamedTuple):
    """How :func:`blocked_gram` runs within a budget of ``budget`` bytes (:func:`plan_gram`)."""

    batch_size: int  #: rows of 𝒥 computed per batch (phase 1)
    block_size: int  #: rows of M per tile (phase 2)
    low_memory: bool  #: whether 𝒥 goes through a scratch file (always with ``out``)
    held: int  #: bytes held throughout: M (unless written to ``out``) and 𝒥 (in memory)
    peak: int  #: the bound on the call's bytes: ``held`` + the larger phase
    budget: int  #: max_memory, in bytes


def _largest(cap: int, cost: Callable[[int], int], room: int) -> int:
    """The largest k in [1, cap] with ``cost(k) <= room`` (cost increasing), 0 if none."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_gram(
    n: int, width: int, itemsize: int, budget: int, *, batch_bytes: Callable[[int], int],
    batch_size: int | None = None, block_size: int | None = None,
    low_memory: bool | None = None, to_file: bool = False, processes: int = 1,
    device: Any = "cpu", prefer: tuple[Any, Any] = (None, None),
    shape: tuple[int, ...] = (), what: str = "jacobian_gram",
) -> GramPlan:
    """Batch and tile sizes that keep :func:`blocked_gram` within ``budget`` bytes, all its
    memory together, wherever it lives (M on the CPU, 𝒥 and the work on ``device``):

    * held throughout: M (n² numbers of ``itemsize`` bytes) unless ``to_file`` (``out=``),
      and 𝒥 (n · ``width``) when it stays in memory;
    * phase 1, one batch of b rows: ``batch_bytes(b)`` (the caller's work to compute them,
      its result and the model's activations included), the rows in M's dtype, and under
      a process group of W > 1 with 𝒥 in memory the all-gather's (2W + 1) copies;
    * phase 2, one tile of t rows: two row blocks (three when read from a file onto another
      device than the CPU) and 5 t × t tiles (the product, the normalisation, the exactly
      symmetric diagonal tile, the mirror written to a file), plus (2W + 1) for the
      all-gather when M is in memory under a group.

    ``batch_size`` / ``block_size`` None: the largest that fit, at most :data:`DEFAULT_BATCH`
    and :data:`MAX_TILE` (``prefer``: sizes to take instead when they fit, e.g. those of a
    record being resumed); given ones are used as given (as an explicit ``chunk_size`` is
    elsewhere). ``low_memory`` None: 𝒥 stays in memory when it takes at most half of what M
    leaves of the budget and the plan fits, else it goes through a scratch file. Raises
    :class:`~manifoldlens.memory.MemoryBudgetError` (naming what one sample needs, what is
    held and the way out) when not even a batch of one row and a tile of one row fit.
    """
    w = max(int(processes), 1)
    prefer = tuple(v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
                   for v in prefer)  # e.g. read from a record: anything else is ignored
    device_type = getattr(device, "type", str(device).split(":")[0])
    m_held = 0 if to_file else n * n * itemsize
    rows_held = n * width * itemsize
    row = width * itemsize

    def attempt(low: bool) -> tuple[GramPlan | None, int, int]:
        held = m_held + (0 if low else rows_held)
        room = budget - held
        gather1 = 2 * w + 1 if (w > 1 and not low) else 0
        gather2 = 2 * w + 1 if (w > 1 and not to_file) else 0
        blocks = 3 if (low and device_type != "cpu") else 2

        def phase1(b: int) -> int:
            return batch_bytes(b) + b * row * (1 + gather1)

        def phase2(t: int) -> int:
            return t * row * blocks + t * t * itemsize * (5 + gather2)

        one = max(phase1(1), phase2(1))
        if one > room:
            return None, held, one
        b, t = batch_size, block_size
        if b is None:
            b = prefer[0] if prefer[0] and phase1(min(prefer[0], n)) <= room else _largest(
                min(DEFAULT_BATCH, n), phase1, room)
        if t is None:
            t = prefer[1] if prefer[1] and phase2(min(prefer[1], n)) <= room else _largest(
                min(MAX_TILE, n), phase2, room)
        peak = held + max(phase1(min(b, n)), phase2(min(t, n)))
        return GramPlan(b, t, low, held, peak, budget), held, one

    if to_file:
        candidates = [True]
    elif low_memory is None:
        in_memory = rows_held <= (budget - m_held) / 2
        candidates = [False, True] if in_memory else [True]
    else:
        candidates = [bool(low_memory)]
    for low in candidates:
        plan, held, one = attempt(low)
        if plan is not None:
            return plan
    parts = []
    if m_held:
        parts.append(f"{format_bytes(m_held)} for M ({n} × {n}) in memory")
    if held > m_held:
        parts.append(f"{format_bytes(rows_held)} for 𝒥 ({n} × {width}) in memory")
    held_s = f" plus {' and '.join(parts)}" if parts else ""
    ways = (["pass out= (M into a .npy file)"] if m_held else []) + (
        ["low_memory=True (𝒥 through a scratch file)"] if held > m_held else []) + [
        "raise max_memory"]
    raise MemoryBudgetError(
        f"{what} needs ~{format_bytes(one)} for one sample of {tuple(shape)} (a batch and a "
        f"tile of one row){held_s}; max_memory is {format_bytes(budget)}; "
        f"{', or '.join(ways)}")


def recorded_settings(out: str | os.PathLike) -> dict[str, Any] | None:
    """The settings of the record beside the ``.npy`` file ``out`` (``<out>.progress/``),
    read on rank 0 and sent to every rank; None when there is none that reads."""
    def read() -> dict[str, Any] | None:
        path = Path(out)
        state = path.with_name(path.name + ".progress") / BlockRecord.STATE
        try:
            settings = json.loads(state.read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return settings if isinstance(settings, dict) else None

    return broadcast_object(read() if is_main() else None)


def gram_tile(a: torch.Tensor, b: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The tile ``a bᵀ`` of M (on the CPU); with ``normalize``, the cosines ``⟨a_i, b_j⟩ /
    (‖a_i‖ ‖b_j‖)`` (0 for rows of zero norm)."""
    blk = a @ b.T
    if normalize:
        def inv(t: torch.Tensor) -> torch.Tensor:
            norm = torch.linalg.vector_norm(t, dim=1)
            return torch.where(norm > 0, 1 / norm.clamp_min(torch.finfo(t.dtype).tiny), 0.0)

        blk = blk * inv(a)[:, None] * inv(b)[None, :]
    return blk.cpu()


class _Rows:
    """Where the rows of 𝒥 live: a tensor on the compute device, or a shared ``.npy``
    file."""

    def __init__(self, n: int, width: int, dtype: torch.dtype, device: torch.device,
                 file: NpyMatrix | None = None) -> None:
        self.file, self.device = file, device
        self.data = None if file is not None else torch.empty((n, width), dtype=dtype,
                                                              device=device)

    def put(self, sl: slice, value: torch.Tensor) -> None:
        if self.file is None:
            self.data[sl] = value
        else:
            self.file.write_rows(sl.start, value.detach().cpu().numpy())

    def get(self, sl: slice) -> torch.Tensor:
        if self.file is None:
            return self.data[sl]
        return torch.from_numpy(self.file.read_rows(sl.start, sl.stop)).to(self.device)


class _Tiles:
    """Where M lives: a CPU tensor, or a shared ``.npy`` file. A tile is written with its
    mirror."""

    def __init__(self, n: int, dtype: torch.dtype, file: NpyMatrix | None = None) -> None:
        self.file = file
        self.data = None if file is not None else torch.empty((n, n), dtype=dtype)

    def put(self, rows: slice, cols: slice, tile: torch.Tensor) -> None:
        if rows == cols:  # exactly symmetric, whatever the product's rounding did
            tile = torch.tril(tile) + torch.tril(tile, -1).T
        if self.file is None:
            self.data[rows, cols] = tile
            if rows != cols:
                self.data[cols, rows] = tile.T
        else:
            t = tile.numpy()
            self.file.write_tile(rows, cols, t)
            if rows != cols:
                self.file.write_tile(cols, rows, t.T)


def _phase(todo: list[Any], compute: Callable[[Any], torch.Tensor],
           put: Callable[[Any, torch.Tensor], None], shape_of: Callable[[Any], tuple[int, ...]],
           *, shared: bool, record: Callable[[Any], None] | None, desc: str, progress: bool,
           empty: torch.Tensor) -> None:
    """Compute this rank's contiguous share of ``todo`` and ``put`` each result, and make
    every rank see every result: through the shared file (a barrier at the end), or by one
    all-gather per round, round k bringing every rank's k-th result (``empty``: a tensor of
    their dtype and device, for a rank that has none left), so that no more than one
    result per rank is in flight."""
    w, r = world_size(), rank()
    parts = [todo[sl] for sl in shares(len(todo))]
    mine = parts[r]
    exchange = not shared and w > 1
    bar = progress_bar(total=len(mine), enabled=progress and is_main(), desc=desc,
                       unit="block", leave=False)
    for k in range(max(map(len, parts)) if exchange else len(mine)):
        value = None
        if k < len(mine):
            value = compute(mine[k])
            put(mine[k], value)
            if record is not None:
                record(mine[k])
            if bar is not None:
                bar.update(1)
        if exchange:
            flat = gather(value.reshape(-1) if value is not None else empty)
            start = 0
            for q, share in enumerate(parts):
                if k < len(share):
                    shape = shape_of(share[k])
                    if q != r:
                        put(share[k], flat[start:start + math.prod(shape)].reshape(shape))
                    start += math.prod(shape)
    if bar is not None:
        bar.close()
    if shared and w > 1:
        barrier()


def _run(rows_fn: Callable[[slice], torch.Tensor], jac: _Rows, gram: _Tiles, *,
         blocks: list[slice], tiles: list[slice], todo_blocks: list[int],
         todo_pairs: list[int], normalize: bool, record: BlockRecord | None,
         progress: bool, dtype: torch.dtype, width: int) -> None:
    """Phase 1 (the rows of 𝒥 of ``todo_blocks``) and phase 2 (the tiles of ``todo_pairs``,
    indices into the lower triangle of the tile grid in row-major order)."""
    pairs = [(i, j) for i in range(len(tiles)) for j in range(i + 1)]
    _phase(todo_blocks, lambda b: rows_fn(blocks[b]), lambda b, v: jac.put(blocks[b], v),
           lambda b: (blocks[b].stop - blocks[b].start, width), shared=jac.file is not None,
           record=(lambda b: record.add("jacobians", b)) if record else None,
           desc="jacobians", progress=progress,
           empty=torch.empty(0, dtype=dtype, device=jac.device))
    cached: dict[int, torch.Tensor] = {}

    def tile(p: int) -> torch.Tensor:
        i, j = pairs[p]
        if i not in cached:  # consecutive pairs share their row block
            cached.clear()
            cached[i] = jac.get(tiles[i])
        a = cached[i]
        return gram_tile(a, a if i == j else jac.get(tiles[j]), normalize)

    def size(t: int) -> int:
        return tiles[t].stop - tiles[t].start

    _phase(todo_pairs, tile, lambda p, v: gram.put(tiles[pairs[p][0]], tiles[pairs[p][1]], v),
           lambda p: (size(pairs[p][0]), size(pairs[p][1])), shared=gram.file is not None,
           record=(lambda p: record.add("tiles", p)) if record else None,
           desc="gram tiles", progress=progress, empty=torch.empty(0, dtype=dtype))


def blocked_gram(
    rows_fn: Callable[[slice], torch.Tensor], n: int, width: int, dtype: torch.dtype, *,
    device: torch.device, batch_size: int, block_size: int, normalize: bool = False,
    low_memory: bool = False, out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None, settings: dict[str, Any] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``M = 𝒥𝒥ᵀ`` (n × n, ``dtype``) of the rows ``rows_fn(slice)`` ((k, width) tensors on
    ``device``), computed in blocks of ``batch_size`` rows and tiles of ``block_size``.

    Where the rows of 𝒥 are kept: in memory on ``device``, or (``low_memory``, or ``out``
    given) in a ``.npy`` file. ``out``: M goes into that ``.npy`` file, each finished block
    recorded in ``<out>.progress/`` under ``settings``; a call that finds a record of the
    same settings computes only the blocks missing from it (a record of other settings is
    refused), and the returned tensor is a memory map of the file. Under a process group
    every rank must call this with the same arguments (``out`` on a file system they share);
    each returns the whole M.
    """
    np_dtype = np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
    blocks, tiles = list(chunks(n, batch_size)), list(chunks(n, block_size))
    all_blocks = list(range(len(blocks)))
    all_pairs = list(range(len(tiles) * (len(tiles) + 1) // 2))
    options = {"blocks": blocks, "tiles": tiles, "normalize": normalize, "progress": progress,
               "dtype": dtype, "width": width}
    if out is not None:
        return _into_file(rows_fn, Path(out), n, width, np_dtype, device, settings or {},
                          options)
    if not low_memory:
        jac, gram = _Rows(n, width, dtype, device), _Tiles(n, dtype)
        _run(rows_fn, jac, gram, todo_blocks=all_blocks, todo_pairs=all_pairs, record=None,
             **options)
        return gram.data
    def make_scratch() -> str:
        made = tempfile.mkdtemp(dir=cache_dir, prefix="manifoldlens-jac-")
        NpyMatrix(Path(made) / "jacobians.npy", (n, width), np_dtype, create=True).close()
        return made

    scratch = _decided(make_scratch)
    path = Path(scratch) / "jacobians.npy"
    try:
        file = NpyMatrix(path, (n, width), np_dtype)
        gram = _Tiles(n, dtype)
        try:
            _run(rows_fn, _Rows(n, width, dtype, device, file), gram, todo_blocks=all_blocks,
                 todo_pairs=all_pairs, record=None, **options)
        finally:
            file.close()
    finally:  # after the last all-gather: no rank reads the scratch file any more
        if is_main():
            shutil.rmtree(scratch, ignore_errors=True)
    return gram.data


def _decided(decide: Callable[[], Any]) -> Any:
    """``decide()`` on rank 0 (files made, records read), its result on every rank; its
    error raised on every rank, so that no rank waits for a decision that never comes."""
    result: Any = None
    if is_main():
        try:
            result = decide()
        except (ValueError, OSError) as e:
            result = e
    result = broadcast_object(result)
    if isinstance(result, BaseException):
        raise result
    return result


def _readable(path: Path, shape: tuple[int, int], dtype: np.dtype) -> bool:
    try:
        NpyMatrix(path, shape, dtype).close()
    except (ValueError, OSError):
        return False
    return True


def _into_file(rows_fn: Callable[[slice], torch.Tensor], out: Path, n: int, width: int,
               np_dtype: np.dtype, device: torch.device, settings: dict[str, Any],
               options: dict[str, Any]) -> torch.Tensor:
    """:func:`blocked_gram` into the ``.npy`` file ``out``, resumable. Rank 0 reads the
    record and decides (start, resume, or refuse: the same error on every rank)."""
    directory = out.with_name(out.name + ".progress")
    jac_path = directory / "jacobians.npy"
    record = BlockRecord(directory, settings, ("jacobians", "tiles"), rank())

    def decide() -> tuple[dict[str, set[int]], bool]:
        record.acquire(str(out))  # rank 0 holds it to the end
        found = record.load(what=str(out)) and _readable(out, (n, n), np_dtype)
        if not found:  # nothing usable: a new record, the files it describes first
            record.start()
            NpyMatrix(out, (n, n), np_dtype, create=True).close()
            NpyMatrix(jac_path, (n, width), np_dtype, create=True).close()
            record.write_state()
        elif not record.complete and not _readable(jac_path, (n, width), np_dtype):
            record.done["jacobians"] = set()
            NpyMatrix(jac_path, (n, width), np_dtype, create=True).close()
        return record.done, record.complete

    try:
        record.done, record.complete = _decided(decide)
        if not record.complete:
            _resume(rows_fn, record, out, jac_path, n, width, np_dtype, device, options)
    finally:
        record.release()
    return torch.from_numpy(np.load(out, mmap_mode="r+"))


def _resume(rows_fn: Callable[[slice], torch.Tensor], record: BlockRecord, out: Path,
            jac_path: Path, n: int, width: int, np_dtype: np.dtype, device: torch.device,
            options: dict[str, Any]) -> None:
    """The blocks ``record`` lacks: the tiles of M, and the rows of 𝒥 that they read."""
    blocks, tiles = options["blocks"], options["tiles"]
    pairs = [(i, j) for i in range(len(tiles)) for j in range(i + 1)]
    todo_pairs = [p for p in range(len(pairs)) if p not in record.done["tiles"]]
    needed = np.zeros(n, dtype=bool)  # rows of 𝒥 that the missing tiles read
    for p in todo_pairs:
        needed[tiles[pairs[p][0]]] = needed[tiles[pairs[p][1]]] = True
    todo_blocks = [b for b, sl in enumerate(blocks)
                   if b not in record.done["jacobians"] and needed[sl].any()]
    m_file = NpyMatrix(out, (n, n), np_dtype)
    j_file = NpyMatrix(jac_path, (n, width), np_dtype)
    try:
        _run(rows_fn, _Rows(n, width, options["dtype"], device, j_file),
             _Tiles(n, options["dtype"], m_file), todo_blocks=todo_blocks,
             todo_pairs=todo_pairs, record=record, **options)
    finally:
        m_file.close()
        j_file.close()
    if is_main():
        record.finish(remove=[jac_path.name])
    barrier()
