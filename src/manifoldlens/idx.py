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
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_idx", "read_idx_cached", "read_idx_shared", "write_idx"]

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


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a native-byte-order array.

    Parameters
    ----------
    path : str or PathLike
        The file. Gzip is detected from the content, not the suffix.

    Returns
    -------
    numpy.ndarray
        A fresh, writeable array with the file's shape and dtype (uint8, int8, int16, int32,
        float32 or float64).

    Raises
    ------
    ValueError
        Naming the file and the problem: empty file, bad magic, unknown type code, zero
        dimensions, truncated header or data, trailing bytes, corrupt gzip.
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from None
    elif path.suffix == ".gz" and data:
        raise ValueError(
            f"{path}: corrupt gzip data (name ends in .gz but the file does not start with the "
            f"gzip magic 1f 8b; first bytes: {data[:4].hex(' ')})"
        )
    return _parse_idx(data, path)


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    if len(data) == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not an IDX file")
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX header: {len(data)} bytes, need at least 4")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic {data[:4].hex(' ')} (the first two bytes must be zero); "
            "not an IDX file"
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions; need at least 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, "
            f"file has {len(data)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    got = len(data) - header
    if got < expected:
        raise ValueError(
            f"{path}: truncated IDX data: shape {shape} of {dtype.newbyteorder('=')} needs "
            f"{expected} bytes after the header, got {got}"
        )
    if got > expected:
        raise ValueError(
            f"{path}: {got - expected} trailing bytes after the IDX data (shape {shape} of "
            f"{dtype.newbyteorder('=')} needs {expected} bytes, got {got})"
        )
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header)
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


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
def read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    # Keyed on mtime and size too, so a rewritten file is re-read.
    arr = read_idx(path)
    arr.flags.writeable = False
    return arr


def read_idx_shared(path: Path) -> np.ndarray:
    """:func:`read_idx` through a small in-process cache keyed on path, mtime and size
    (read-only arrays)."""
    st = path.stat()
    return read_idx_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)
