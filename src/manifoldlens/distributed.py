"""Scale-out over processes with ``torch.distributed``: which share of the samples is this
process's, and how the shares come back together.

Launched by ``torchrun --nproc_per_node N`` (gloo on the CPU, NCCL on CUDA), every process
runs the same program on the same inputs; dataset-wide work gives each process a contiguous
shard of the samples (:func:`shard`) and gathers the results in order (:func:`gather`), so
that they equal the single-process result. Every function here is a no-op (rank 0 of a
world of one) when no process group is initialised: library code calls them
unconditionally. Nothing here is home-made cluster code: process groups, rendezvous and
collectives are torch's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "backend_for",
    "barrier",
    "broadcast_object",
    "gather",
    "gather_objects",
    "is_initialized",
    "is_main",
    "launched",
    "local_device",
    "process_group",
    "rank",
    "shard",
    "shares",
    "world_size",
]


def is_initialized() -> bool:
    """Whether a default process group exists (``torch.distributed`` is initialised)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes in the default group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0, the process that writes files and prints."""
    return rank() == 0


def shares(n: int, align: int = 1) -> list[slice]:
    """Every rank's contiguous share of ``range(n)``, in rank order: rank r of W gets
    ``[r·n // W, (r+1)·n // W)``, together covering ``range(n)`` (some may be empty when
    n < W). With ``align``, shares are made of whole groups of ``align`` items (the last
    group may be shorter): a routine that works in batches of ``align`` then sees the same
    batches as one process does."""
    w, groups = world_size(), -(-n // align)
    return [slice(min(r * groups // w * align, n), min((r + 1) * groups // w * align, n))
            for r in range(w)]


def shard(n: int, align: int = 1) -> slice:
    """This rank's share of ``range(n)`` (:func:`shares`)."""
    return shares(n, align)[rank()]


def barrier() -> None:
    """Wait until every process of the group gets here."""
    if is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives of the default group need their tensors: the current CUDA device
    for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along the first axis in rank order, on every rank
    (an all-gather of shards of different lengths; the other axes must agree). Returned on
    the device and with the dtype of ``tensor``; without a process group, ``tensor`` itself.
    """
    if not is_initialized() or world_size() == 1:
        return tensor
    dev, dtype = _comm_device(), tensor.dtype
    t = tensor.detach()
    if dtype == torch.bool:  # gloo has no bool collectives
        t = t.to(torch.uint8)
    t = t.to(dev).contiguous()
    size = torch.tensor([t.shape[0]], device=dev, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    lengths = [int(s) for s in sizes]
    longest = max(lengths)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:k] for p, k in zip(parts, lengths, strict=True)])
    return out.to(device=tensor.device, dtype=dtype)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` without a
    process group)."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself without a group): how
    one rank's decision (a run directory, a refusal) reaches the others."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------------------
# launching: the process group of torchrun's environment
# ---------------------------------------------------------------------------------------------


def launched() -> bool:
    """Whether this process was started as one of several (``WORLD_SIZE`` > 1, as torchrun
    sets it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def backend_for(device: str | torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device(device: str) -> str:
    """The device of this process: ``cuda`` without an index becomes ``cuda:<LOCAL_RANK>``
    (one GPU per process, as torchrun numbers them); anything else is kept."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@contextlib.contextmanager
def process_group(device: str = "cpu", timeout_s: float = 1800.0) -> Iterator[bool]:
    """Inside the block, the default process group of torchrun's environment (``env://``;
    gloo on the CPU, NCCL on CUDA) when this process is one of several and none exists yet;
    destroyed after the block, also on errors. Yields whether a group is in use. A group the
    caller initialised is used and left alone."""
    if is_initialized() or not launched():
        yield is_initialized()
        return
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(local_device(device)))
    dist.init_process_group(backend_for(device), init_method="env://",
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield True
    finally:
        dist.destroy_process_group()
