"""The IDX file format (LeCun's MNIST format): big-endian header, then the array.

``read_idx`` accepts plain and gzip-compressed files and refuses malformed ones with a
``ValueError`` naming the problem, reading no more than the header promises; ``write_idx``
writes any array IDX can hold.

>>> import numpy as np, tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as d:
...     p = write_idx(pathlib.Path(d) / "a-idx", np.arange(6, dtype=np.uint8).reshape(2, 3))
...     read_idx(p).tolist()
[[0, 1, 2], [3, 4, 5]]
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

__all__ = [
    "GZIP_MAX_RATIO",
    "MAX_IDX_BYTES",
    "file_key",
    "read_idx",
    "read_idx_cached",
    "read_idx_shared",
    "write_idx",
]

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}


#: Largest IDX payload :func:`read_idx` accepts by default (16 GiB): a header declaring more
#: is refused before anything is allocated.
MAX_IDX_BYTES = 2**34

#: Deflate cannot expand data by more than 1032:1, so a gzip file of ``m`` bytes holds at most
#: about ``1032 m`` bytes; a header declaring more than ``GZIP_MAX_RATIO * m`` is refused
#: before anything is allocated.
GZIP_MAX_RATIO = 1100

#: How much decompressed data past the declared payload is examined to report trailing data.
_PROBE = 4096
_CHUNK = 1 << 20


def read_idx(path: str | os.PathLike, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a native-byte-order array.

    Memory is bounded by what the header declares, never by what the file would decompress
    to: the header is read first, the payload it declares is checked against ``max_bytes``
    and (for gzip) against :data:`GZIP_MAX_RATIO` times the compressed size, then exactly that
    many bytes are read, in chunks, and at most a few KiB beyond them to detect trailing data.

    Parameters
    ----------
    path : str or PathLike
        The file. Gzip is detected from the content, not the suffix.
    max_bytes : int
        Largest payload accepted (default :data:`MAX_IDX_BYTES`, 16 GiB).

    Returns
    -------
    numpy.ndarray
        A fresh, writeable array with the file's shape and dtype (uint8, int8, int16, int32,
        float32 or float64).

    Raises
    ------
    ValueError
        Naming the file and the problem: empty file, bad magic, unknown type code, zero
        dimensions, truncated header or data, trailing bytes, corrupt gzip, a declared size
        above ``max_bytes`` or beyond what the compressed file can hold.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(2)
        f.seek(0)
        if magic == b"\x1f\x8b":
            try:
                with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                    return _read_stream(gz, path, max_bytes,
                                        limit=GZIP_MAX_RATIO * size, compressed=size)
            except (OSError, EOFError, zlib.error) as exc:
                raise ValueError(f"{path}: corrupt gzip data ({exc})") from None
        if path.suffix == ".gz" and size:
            raise ValueError(
                f"{path}: corrupt gzip data (name ends in .gz but the file does not start with "
                f"the gzip magic 1f 8b; first bytes: {f.read(4).hex(' ')})"
            )
        return _read_stream(f, path, max_bytes, limit=size, compressed=None)


def _read_header(f: BinaryIO, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, header length)`` from the start of ``f``, or a ValueError."""
    head = f.read(4)
    if len(head) == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not an IDX file")
    if len(head) < 4:
        raise ValueError(f"{path}: truncated IDX header: {len(head)} bytes, need at least 4")
    if head[0] != 0 or head[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic {head.hex(' ')} (the first two bytes must be zero); "
            "not an IDX file"
        )
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions; need at least 1")
    header = 4 + 4 * ndim
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, "
            f"file has {4 + len(dims)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    return _IDX_DTYPES[code], shape, header


def _read_stream(f: BinaryIO, path: Path, max_bytes: int, *, limit: int,
                 compressed: int | None) -> np.ndarray:
    """Parse the IDX stream ``f`` (a file, or a decompressing reader over one); ``limit``
    bounds the decompressed size (header included) that the source can hold."""
    dtype, shape, header = _read_header(f, path)
    native = dtype.newbyteorder("=")
    count = math.prod(shape)
    expected = count * dtype.itemsize
    what = f"shape {shape} of {native} needs {expected} bytes after the header"
    if expected > max_bytes:
        raise ValueError(f"{path}: IDX header declares {expected} bytes of data ({what}), more "
                         f"than the limit of {max_bytes} bytes (read_idx(max_bytes=...))")
    if compressed is None:  # a plain file: its size says everything, before any data is read
        got = limit - header
        if got < expected:
            raise ValueError(f"{path}: truncated IDX data: {what}, got {got}")
        if got > expected:
            raise ValueError(f"{path}: {got - expected} trailing bytes after the IDX data "
                             f"({what}, got {got})")
    elif header + expected > limit:
        raise ValueError(
            f"{path}: IDX header declares {expected} bytes of data ({what}), more than a gzip "
            f"file of {compressed} bytes can hold (deflate expands at most ~1032:1); the file "
            "is truncated or forged"
        )
    buf = np.empty(expected, dtype=np.uint8)
    view = memoryview(buf)
    got = 0
    while got < expected:
        block = f.read(min(_CHUNK, expected - got))
        if not block:
            raise ValueError(f"{path}: truncated IDX data: {what}, got {got}")
        view[got:got + len(block)] = block
        got += len(block)
    if compressed is not None:
        extra = len(f.read(_PROBE + 1))
        if extra:
            amount = f"{extra}" if extra <= _PROBE else f"more than {_PROBE}"
            raise ValueError(f"{path}: {amount} trailing bytes after the IDX data ({what}; "
                             "the rest was not decompressed)")
    if not dtype.isnative:  # big-endian on disk: swap in place, no second copy
        buf.view(dtype).byteswap(inplace=True)
    return buf.view(native).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray | torch.Tensor) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends with ``.gz``.

    Parameters
    ----------
    path : str or PathLike
        Destination; parent directories must exist.
    array : numpy.ndarray or torch.Tensor
        At least 1-D, dtype uint8, int8, int16, int32, float32 or float64.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_idx(Path(d) / "x-idx1-ubyte.gz", np.arange(5, dtype=np.uint8))
    ...     read_idx(p).tolist()
    [0, 1, 2, 3, 4]
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        names = ", ".join(str(d) for d in _IDX_CODES)
        raise TypeError(f"IDX cannot store dtype {array.dtype}; use one of {names}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got array of shape {array.shape}")
    if any(d >= 2**32 for d in array.shape):
        raise ValueError(f"IDX dimensions must be < 2**32, got shape {array.shape}")
    code = _IDX_CODES[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


@functools.lru_cache(maxsize=8)
def read_idx_cached(path: str, key: tuple[int | str, ...]) -> np.ndarray:
    """:func:`read_idx` of ``path``, cached on ``key`` (:func:`file_key`): a rewritten file
    is re-read. The array is read-only."""
    arr = read_idx(path)
    arr.flags.writeable = False
    return arr


_KEY_BLOCK = 1 << 16


def file_key(path: str | os.PathLike) -> tuple[int | str, ...]:
    """What identifies a file's content cheaply: device, inode, size, mtime and ctime (ns),
    and the sha256 of its first and last 64 KiB.

    A file rewritten in place with the same size and a forged mtime still changes its ctime
    (unless within one tick of the clock) and, almost always, its first or last block: the
    last 8 bytes of a gzip file are the CRC-32 and size of all its uncompressed content.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        h = hashlib.sha256(f.read(_KEY_BLOCK))
        if st.st_size > _KEY_BLOCK:
            f.seek(max(_KEY_BLOCK, st.st_size - _KEY_BLOCK))
            h.update(f.read(_KEY_BLOCK))
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, h.hexdigest())


def read_idx_shared(path: Path) -> np.ndarray:
    """:func:`read_idx` through a small in-process cache keyed on the resolved path and
    :func:`file_key` (read-only arrays)."""
    return read_idx_cached(str(Path(path).resolve()), file_key(path))
