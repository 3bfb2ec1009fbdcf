"""The seed-001 study options of ``manifoldlens leaf``: the paper's optimiser and input
normalisation in ``leaf train``, the trace criterion for the checkpoint, pair kinds for
horizontal paths. Toy sizes (the embedded 8×8 digits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from manifoldlens.cli import main
from manifoldlens.commands.leaf import (
    NormalizedSeed001CNN,
    _pick_pairs,
    trace_criterion_step,
)
from manifoldlens.data import load_dataset
from manifoldlens.models import Seed001CNN, load_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("leaf") / "train"
    assert main(["leaf", "train", "--data", "digits", "--steps", "12", "--trace-every", "3",
                 "--normalize", "0.1307", "0.3081", "--keep-every", "6", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def test_leaf_train_is_the_papers_optimiser_with_their_normalisation(trained):
    for step in (6, 12):  # --keep-every keeps every one
        ck = json.loads((trained / f"checkpoints/step-{step:08d}.json").read_text())
        cfg = ck["metadata"]["train_config"]
        assert (cfg["optimizer"], cfg["lr"], cfg["batch_size"], cfg["momentum"]) == (
            "sgd", 0.01, 60, 0.0)  # plain SGD, as their mnist_training.py
        assert ck["spec"]["arch"] == "seed001_cnn_normalized"
        assert (ck["spec"]["mean"], ck["spec"]["std"]) == (0.1307, 0.3081)
    doc = json.loads((trained / "run.json").read_text())
    assert "trace_criterion_step" in doc["metrics"]
    model, _ = load_checkpoint(trained / "checkpoints/step-00000012.json")
    assert isinstance(model, NormalizedSeed001CNN)


def test_leaf_train_without_normalize_keeps_the_plain_cnn(tmp_path):
    out = tmp_path / "plain"
    assert main(["leaf", "train", "--data", "digits", "--steps", "4", "--trace-every", "2",
                 "--out", str(out), "--no-progress"]) == 0
    ck = json.loads((out / "checkpoints/step-00000004.json").read_text())  # the latest
    assert ck["spec"]["arch"] == "seed001_cnn"
    assert ck["metadata"]["train_config"]["momentum"] == 0.0


def test_normalized_cnn_is_the_plain_cnn_on_normalised_input():
    torch.manual_seed(0)
    net = NormalizedSeed001CNN((1, 8, 8), 10, mean=0.2, std=0.5).double()
    plain = Seed001CNN((1, 8, 8), 10).double()
    plain.load_state_dict(net.state_dict())
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(net(x), plain((x - 0.2) / 0.5))
    with pytest.raises(ValueError, match="std > 0"):
        NormalizedSeed001CNN((1, 8, 8), 10, std=0.0)


def _records(emas):
    return [{"step": 10 * i, "ema_trace": e} for i, e in enumerate(emas)]


def test_trace_criterion_step():
    # rises from 1 to 5, back within 10 % of the rise (≤ 1.4) at step 50
    assert trace_criterion_step(_records([1, 3, 5, 4, 2, 1.3, 1.0])) == 50
    assert trace_criterion_step(_records([1, 3, 5, 4, 2, 1.3]), within=0.5) == 40
    assert trace_criterion_step(_records([1, 3, 5, 4.5])) is None  # never back
    assert trace_criterion_step(_records([2, 1.5, 1])) is None  # never rose
    assert trace_criterion_step([]) is None


@pytest.mark.parametrize("kind", ["different-class", "same-class", "any", "nearest"])
def test_pair_kinds(kind):
    ds = load_dataset("digits", "test")
    si, ti = _pick_pairs(ds, 12, 0, kind)
    assert len(si) == len(ti) == 12 and bool((si != ti).all())
    same = ds.labels[si] == ds.labels[ti]
    if kind == "different-class":
        assert not same.any()
    if kind == "same-class":
        assert same.all()
    if kind == "nearest":
        flat = ds.images.reshape(len(ds), -1)
        d = torch.cdist(flat[si], flat)
        d[torch.arange(12), si] = float("inf")
        torch.testing.assert_close(d[torch.arange(12), ti], d.min(1).values)
    assert torch.equal(_pick_pairs(ds, 12, 0, kind)[1], ti)  # seeded
    with pytest.raises(ValueError, match="pair kind"):
        _pick_pairs(ds, 2, 0, "random")


def test_horizontal_cli_pair_kind(trained, tmp_path):
    out = tmp_path / "h"
    assert main(["leaf", "horizontal", str(trained / "checkpoints/step-00000012.json"),
                 "--n", "3", "--steps", "5", "--pair-kind", "same-class", "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["pair_kind"] == "same-class" and 0 <= res["reached"] <= 3
    pairs = dict(np.load(out / "horizontal.npz"))
    ds = load_dataset("digits", "test")
    assert bool((ds.labels[pairs["sources"]] == ds.labels[pairs["targets"]]).all())
