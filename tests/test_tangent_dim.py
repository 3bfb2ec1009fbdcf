"""A decoder of lower rank spans fewer than k tangent directions: the datasets record each
image's dimension, warn, and take the random baseline from it (not from k); and ``manifold
dataset`` finds the IDX directory ``manifold vae`` was trained on without ``--root``."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from manifoldlens.cli import main
from manifoldlens.generative import (
    AutoEncoder,
    ManifoldDataset,
    reconstructive_dataset,
    tangent_dim_summary,
)
from manifoldlens.idx import write_idx
from manifoldlens.models import load_checkpoint, save_checkpoint
from manifoldlens.tangent import (
    TangentSpace,
    mean_random_fraction_baseline,
    random_fraction_baseline,
)

_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
D = 64  # 1 × 8 × 8


def _idx_dir(path, seed=0, n_train=40, n_test=20, classes=3):
    """A tiny grey IDX directory whose class c is bright in row band c."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % classes).astype(np.uint8)
        images = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
        for c in range(classes):
            images[labels == c, 2 * c:2 * c + 2] += 180
        img, lab = _STEMS[split]
        write_idx(path / img, images)
        write_idx(path / lab, labels)
    return path


def _ignoring_first_latent(model):
    """The decoder made blind to z₁: its first layer's column of z₁ is zero."""
    with torch.no_grad():
        model.decoder.net[0].weight[:, 0] = 0
    return model


def _metrics(out):
    return json.loads((out / "run.json").read_text())["metrics"]


# ------------------------------------------------------------------------------ library


def test_mean_baseline_is_exact_for_equal_dims_and_averages_otherwise():
    for k in (1, 4, 10):
        assert mean_random_fraction_baseline(torch.full((7,), k), 1024) == \
            random_fraction_baseline(k, 1024)
    mixed = mean_random_fraction_baseline(torch.tensor([3, 3, 4]), D)
    assert math.isclose(mixed, (2 * random_fraction_baseline(3, D)
                                + random_fraction_baseline(4, D)) / 3, rel_tol=1e-15)
    with pytest.raises(ValueError, match="empty"):
        mean_random_fraction_baseline(torch.zeros(0), D)


@pytest.mark.parametrize("kind", ["zero column", "relu bottleneck"])
def test_a_decoder_of_rank_k_minus_1_spans_k_minus_1_directions(kind):
    torch.manual_seed(0)
    k, d, n = 4, 12, 5
    W = torch.randn(d, k, dtype=torch.float64)
    if kind == "zero column":
        W[:, 2] = 0

        def dec(z):
            return z @ W.T
    else:  # z → ReLU(A z + b) through k − 1 always-active units → W' h
        A = torch.randn(k - 1, k, dtype=torch.float64)
        Wp = torch.randn(d, k - 1, dtype=torch.float64)

        def dec(z):
            return torch.relu(z @ A.T + 100.0) @ Wp.T
    ts = TangentSpace.from_decoder(dec, torch.randn(n, k, dtype=torch.float64))
    assert ts.dim.tolist() == [k - 1] * n and ts.basis.shape == (n, k, d)
    assert ts.random_baseline() == random_fraction_baseline(k - 1, d)
    assert ts.random_baseline() < random_fraction_baseline(k, d)
    full = TangentSpace.from_decoder(lambda z: z @ torch.randn(d, k, dtype=torch.float64).T,
                                     torch.randn(n, k, dtype=torch.float64))
    assert full.dim.tolist() == [k] * n
    assert full.random_baseline() == random_fraction_baseline(k, d)


def test_reconstructive_dataset_records_the_dimension_and_warns():
    torch.manual_seed(0)
    model = _ignoring_first_latent(AutoEncoder((1, 8, 8), 4, network="mlp", hidden=32)).double()
    x = torch.rand(10, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(10) % 2
    with pytest.warns(UserWarning, match=r"fewer than k = 4 directions at 10 of 10 dataset "
                                         r"images \(dimension 3–3, median 3\)"):
        ds = reconstructive_dataset(model, x, y)
    assert ds.info["tangent_dim"] == {"min": 3, "median": 3, "max": 3, "below_k": 10}
    assert ds.tangent_dims().tolist() == [3] * 10
    assert ds.tangent_space().random_baseline() == random_fraction_baseline(3, D)
    part = ds.subset(slice(0, 4))
    assert part.info["tangent_dim"]["below_k"] == 4 and ds.info["tangent_dim"]["below_k"] == 10
    full = AutoEncoder((1, 8, 8), 4, network="mlp", hidden=32).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when every image has k directions
        ok = reconstructive_dataset(full, x, y)
    assert ok.info["tangent_dim"] == {"min": 4, "median": 4, "max": 4, "below_k": 0}


def test_dimension_summary_round_trips_and_mixed_medians():
    assert tangent_dim_summary(torch.tensor([2, 3, 4, 4]), 4) == {
        "min": 2, "median": 3.5, "max": 4, "below_k": 2}
    assert tangent_dim_summary(torch.zeros(0, dtype=torch.long), 4)["below_k"] == 0


# ------------------------------------------------------------------------------ commands


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """`manifold vae` on a synthetic IDX directory (autoencoder, 8 × 8: the MLP network)."""
    root = tmp_path_factory.mktemp("tangent_dim")
    data = _idx_dir(root / "idxtoy")
    out = root / "vae"
    assert main(["manifold", "vae", "--data", str(data), "--model", "autoencoder", "--size",
                 "8", "--latent", "4", "--steps", "5", "--batch-size", "16", "--out", str(out),
                 "--no-progress"]) == 0
    return root, data, out / "model.json"


def _resaved(checkpoint, where, change=None, **meta_changes):
    """A copy of the checkpoint with its metadata changed (None removes a field)."""
    model, meta = load_checkpoint(checkpoint)
    for key, value in meta_changes.items():
        meta.pop(key, None) if value is None else meta.__setitem__(key, value)
    if change is not None:
        change(model)
    return save_checkpoint(where / "model", model, metadata=meta)


def test_vae_records_its_data_directory(vae):
    _, data, ckpt = vae
    assert json.loads(ckpt.read_text())["metadata"]["data_dir"] == str(data.resolve())


def test_embedded_data_record_no_directory():
    from manifoldlens.commands.common import data_directory

    assert data_directory("digits") is None


@pytest.mark.parametrize("approach", ["reconstructive", "generative"])
def test_dataset_finds_the_recorded_data_without_root(vae, tmp_path, monkeypatch, approach):
    monkeypatch.delenv("MANIFOLDLENS_DATA", raising=False)
    _, _, ckpt = vae
    out = tmp_path / "ds"
    assert main(["manifold", "dataset", str(ckpt), "--approach", approach, "--n-train", "30",
                 "--n-test", "10", "--labeller-steps", "5", "--out", str(out),
                 "--no-progress"]) == 0
    m = _metrics(out)
    assert m["k"] == 4 and m["d"] == D and "warning" not in m
    assert m["random_baseline"] == random_fraction_baseline(4, D)  # unchanged numbers
    assert m["sqrt_k_over_d"] == math.sqrt(4 / D)
    four = {"min": 4, "median": 4, "max": 4, "below_k": 0}
    assert m["tangent_dim"] == {"train": four, "test": four}
    assert ManifoldDataset.load(out / "test").info["tangent_dim"] == four


def test_old_checkpoints_need_root_and_root_wins(vae, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MANIFOLDLENS_DATA", raising=False)
    root, data, ckpt = vae
    old = _resaved(ckpt, tmp_path / "old", data_dir=None)  # written before data_dir existed
    assert "data_dir" not in json.loads(old.read_text())["metadata"]
    argv = ["manifold", "dataset", str(old), "--approach", "reconstructive", "--n-train", "30",
            "--n-test", "10", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) != 0
    assert "not found" in capsys.readouterr().err
    assert main([*argv, "--root", str(data), "--out", str(tmp_path / "b")]) == 0
    other = _idx_dir(tmp_path / "other" / "idxtoy", seed=1)  # same name, other images
    argv[2] = str(ckpt)  # the new checkpoint: an explicit --root wins over the recorded one
    assert main([*argv, "--root", str(other), "--out", str(tmp_path / "c")]) != 0
    assert "not the data the model was trained with" in capsys.readouterr().err
    moved = _resaved(ckpt, tmp_path / "moved", data_dir=str(other))  # other data recorded
    argv[2] = str(moved)
    assert main([*argv, "--out", str(tmp_path / "d")]) != 0
    assert "not the data the model was trained with" in capsys.readouterr().err
    bad = _resaved(ckpt, tmp_path / "bad", data_dir=3)
    argv[2] = str(bad)
    assert main([*argv, "--out", str(tmp_path / "e")]) != 0
    assert "'data_dir' should be a path" in capsys.readouterr().err


def test_thin_tangent_space_is_reported_and_its_baseline_used(vae, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.delenv("MANIFOLDLENS_DATA", raising=False)
    _, _, ckpt = vae
    blind = _resaved(ckpt, tmp_path / "blind", change=_ignoring_first_latent)
    ds = tmp_path / "ds"
    assert main(["manifold", "dataset", str(blind), "--approach", "reconstructive",
                 "--n-train", "30", "--n-test", "10", "--out", str(ds), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: the decoder's tangent space has fewer than k = 4 directions at 30 of 30 " \
        "train images (dimension 3–3, median 3); 10 of 10 test images" in err
    m = _metrics(ds)
    three = {"min": 3, "median": 3, "max": 3, "below_k": None}
    assert m["k"] == 4 and m["tangent_dim"] == {
        "train": {**three, "below_k": 30}, "test": {**three, "below_k": 10}}
    assert m["random_baseline"] == random_fraction_baseline(3, D)
    assert m["sqrt_k_over_d"] == math.sqrt(3 / D)
    assert "fewer than k = 4" in m["warning"]
    log = [json.loads(line) for line in (ds / "metrics.jsonl").read_text().splitlines()]
    assert any("fewer than k = 4" in r.get("warning", "") for r in log)
    test = ManifoldDataset.load(ds / "test")
    assert test.info["tangent_dim"]["max"] == 3 and test.tangent.shape == (10, 4, D)
    assert test.tangent_dims().tolist() == [3] * 10

    clf = tmp_path / "clf"
    assert main(["manifold", "train", str(ds), "--arch", "mlp", "--epochs", "1",
                 "--batch-size", "10", "--fraction-every", "100", "--out", str(clf),
                 "--no-progress"]) == 0
    assert _metrics(clf)["random_baseline"] == random_fraction_baseline(3, D)
    assert _metrics(clf)["tangent_dim"]["max"] == 3
    frac = tmp_path / "frac"
    assert main(["manifold", "fraction", str(ds), str(clf / "model.json"), "--methods",
                 "gradient", "--n", "10", "--out", str(frac), "--no-progress"]) == 0
    results = json.loads((frac / "results.json").read_text())
    assert results["random_baseline"] == random_fraction_baseline(3, D)
    assert results["tangent_dim"] == {**three, "below_k": 10} and results["k"] == 4
    san = tmp_path / "sanity"
    assert main(["manifold", "sanity", str(ds), str(clf / "model.json"), "--methods",
                 "gradient", "--n", "6", "--figure-images", "1", "--out", str(san),
                 "--no-progress"]) == 0
    results = json.loads((san / "results.json").read_text())
    assert results["random_baseline"] == random_fraction_baseline(3, D)
    assert results["tangent_dim"] == {**three, "below_k": 6}
    rt = results["methods"]["random_tangent"]["fraction"][0]["mean"]
    assert rt == pytest.approx(1.0)  # drawn in the 3 directions spanned: still inside


def test_nonzero_rows_in_chunks_are_the_mask_of_the_tangent_space():
    from manifoldlens.tangent import TangentSpace, nonzero_rows

    basis = torch.linalg.qr(torch.randn(7, 12, 4, dtype=torch.float64)).Q.mT.contiguous()
    basis[2, 1] = 0
    basis[5, :3] = 0
    rows = nonzero_rows(basis, chunk_size=3)
    assert torch.equal(rows, TangentSpace(basis).mask)
    assert rows.sum(-1).tolist() == [4, 4, 3, 4, 4, 1, 4]
    assert nonzero_rows(basis[:0]).shape == (0, 4)
