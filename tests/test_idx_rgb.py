"""Colour IDX data: channels-last 4-D image files ``(n, H, W, C)``, C = 1 or 3, load as
``(n, C, H, W)`` and go through ``manifold vae`` and ``manifold dataset --approach
reconstructive`` (seed 004's CIFAR-10 and retinopathy are RGB)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from manifoldlens.cli import main
from manifoldlens.commands.manifold import resize_images
from manifoldlens.data import load_dataset
from manifoldlens.generative import AutoEncoder, BetaTCVAE, ManifoldDataset
from manifoldlens.idx import write_idx

_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _rgb_dir(path, n_train=40, n_test=20, size=8, channels=3, classes=3, gz=False):
    """A tiny channels-last uint8 IDX directory whose class k is bright in channel k."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % classes).astype(np.uint8)
        images = rng.integers(0, 60, (n, size, size, channels)).astype(np.uint8)
        for k in range(classes):
            images[labels == k, :, :, k % channels] += 180
        img, lab = _STEMS[split]
        write_idx(path / f"{img}{suffix}", images)
        write_idx(path / f"{lab}{suffix}", labels)
    return path


def _raw_idx(shape, payload: bytes) -> bytes:
    """IDX bytes written by hand: magic 00 00, dtype 0x08 (uint8), ndim, sizes, data."""
    return (bytes([0, 0, 0x08, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes()
            + payload)


@pytest.mark.parametrize("gz", [False, True])
def test_rgb_round_trip_is_channels_first_in_unit_range(tmp_path, gz):
    d = _rgb_dir(tmp_path / "rgb", gz=gz)
    img, _ = _STEMS["train"]
    raw = np.random.default_rng(1).integers(0, 256, (40, 8, 8, 3)).astype(np.uint8)
    raw[0, 1, 2] = (10, 20, 30)  # image 0, row 1, column 2: R, G, B
    raw[3, 7, 0] = (255, 0, 128)
    data = _raw_idx(raw.shape, raw.tobytes())  # written by hand, not by write_idx
    if gz:
        data = gzip.compress(data)
    (d / f"{img}{'.gz' if gz else ''}").write_bytes(data)
    ds = load_dataset(d)
    assert ds.images.shape == (40, 3, 8, 8) and ds.shape == (3, 8, 8)
    assert ds.images.dtype == torch.float32
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0
    torch.testing.assert_close(ds.images[0, :, 1, 2], torch.tensor([10.0, 20.0, 30.0]) / 255)
    torch.testing.assert_close(ds.images[3, :, 7, 0], torch.tensor([255.0, 0.0, 128.0]) / 255)
    expected = torch.from_numpy(raw.astype(np.float32) / 255).permute(0, 3, 1, 2)
    torch.testing.assert_close(ds.images, expected, rtol=0, atol=0)
    assert ds.images.is_contiguous()
    assert load_dataset(d, "test").images.shape == (20, 3, 8, 8)


def test_single_channel_4d_is_grey(tmp_path):
    d = _rgb_dir(tmp_path / "grey4d", channels=1, classes=2)
    ds = load_dataset(d)
    assert ds.images.shape == (40, 1, 8, 8)


def test_float_rgb_must_lie_in_unit_range(tmp_path):
    d = _rgb_dir(tmp_path / "rgb")
    bad = write_idx(d / _STEMS["train"][0], np.full((40, 8, 8, 3), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]") as info:
        load_dataset(d)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("channels", [2, 4])
def test_other_channel_counts_are_refused(tmp_path, channels):
    d = _rgb_dir(tmp_path / "rgb")
    bad = write_idx(d / _STEMS["train"][0], np.zeros((40, 8, 8, channels), dtype=np.uint8))
    with pytest.raises(ValueError, match=f"C = {channels} channels") as info:
        load_dataset(d)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message
    assert "1 (grey) or 3 (RGB)" in message


def test_channels_first_gets_a_hint(tmp_path):
    d = _rgb_dir(tmp_path / "rgb")
    write_idx(d / _STEMS["train"][0], np.zeros((40, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"channels-first.*transpose\(0, 2, 3, 1\)"):
        load_dataset(d)


def test_five_dimensional_images_are_refused(tmp_path):
    d = _rgb_dir(tmp_path / "rgb")
    write_idx(d / _STEMS["train"][0], np.zeros((40, 2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="5-D"):
        load_dataset(d)


@pytest.mark.parametrize("cut", [1, 100, 40 * 8 * 8 * 3])
def test_truncated_rgb_file_is_refused(tmp_path, cut):
    d = _rgb_dir(tmp_path / "rgb")
    path = d / _STEMS["train"][0]
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(ValueError, match="truncated IDX data") as info:
        load_dataset(d)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_gzip_rgb_file_is_refused(tmp_path):
    d = _rgb_dir(tmp_path / "rgb", gz=True)
    path = d / f"{_STEMS['train'][0]}.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError) as info:
        load_dataset(d)
    assert str(path) in str(info.value)


def test_hostile_4d_header_is_refused_before_allocating(tmp_path):
    d = _rgb_dir(tmp_path / "rgb")
    path = d / _STEMS["train"][0]
    # 4 billion 65536 × 65536 RGB images declared, 10 bytes given
    path.write_bytes(_raw_idx((2**32 - 1, 2**16, 2**16, 3), b"\x00" * 10))
    with pytest.raises(ValueError, match="more than the limit") as info:
        load_dataset(d)
    assert str(path) in str(info.value)
    path.write_bytes(_raw_idx((40, 2**10, 2**10, 3), b"\x00" * 10))  # under the limit
    with pytest.raises(ValueError, match="truncated IDX data"):
        load_dataset(d)


def test_rgb_vae_and_reconstructive_dataset_cli(tmp_path):
    """`manifold vae` (autoencoder, --size 8: the MLP network) then `manifold dataset
    --approach reconstructive` on a tiny RGB IDX directory: (n, 3, 8, 8) images."""
    d = _rgb_dir(tmp_path / "rgbtoy")
    vae, ds = tmp_path / "vae", tmp_path / "ds"
    assert main(["manifold", "vae", "--data", str(d), "--model", "autoencoder", "--size", "8",
                 "--latent", "4", "--steps", "5", "--batch-size", "16", "--out", str(vae),
                 "--no-progress"]) == 0
    doc = json.loads((vae / "run.json").read_text())
    assert doc["metrics"]["shape"] == [3, 8, 8]
    assert main(["manifold", "dataset", str(vae / "model.json"), "--approach",
                 "reconstructive", "--root", str(d), "--n-train", "30", "--n-test", "20",
                 "--out", str(ds), "--no-progress"]) == 0
    metrics = json.loads((ds / "run.json").read_text())["metrics"]
    assert metrics["k"] == 4 and metrics["d"] == 3 * 8 * 8
    for split, n in (("train", 30), ("test", 20)):
        part = ManifoldDataset.load(ds / split)
        assert part.images.shape == (n, 3, 8, 8) and part.tangent.shape == (n, 4, 192)
        assert 0 <= float(part.images.min()) and float(part.images.max()) <= 1
    assert (ds / "samples.png").is_file()


def test_resize_and_conv_models_take_three_channels():
    x = torch.rand(2, 3, 8, 8)
    big = resize_images(x, 16)
    assert big.shape == (2, 3, 16, 16)
    for c in range(3):  # each channel resized on its own
        torch.testing.assert_close(big[:, c:c + 1], resize_images(x[:, c:c + 1], 16))
    torch.manual_seed(0)
    for model in (AutoEncoder((3, 16, 16), 4, network="conv"),
                  BetaTCVAE((3, 16, 16), 4, network="conv")):
        assert model(big).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("shape", [(40, 8, 8), (40, 8, 8, 3)])
def test_float_images_are_fresh_copies(tmp_path, shape):
    d = _rgb_dir(tmp_path / "rgb")
    img = np.linspace(0, 1, np.prod(shape), dtype=np.float32).reshape(shape)
    write_idx(d / _STEMS["train"][0], img)
    first = load_dataset(d)
    first.images.zero_()  # must not reach the cache or a later load
    again = load_dataset(d).images
    expected = torch.from_numpy(img if len(shape) == 3 else img.transpose(0, 3, 1, 2))
    torch.testing.assert_close(again.reshape(expected.shape), expected, rtol=0, atol=0)
