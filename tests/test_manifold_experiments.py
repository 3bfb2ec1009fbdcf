"""Seed 004's pipeline end to end on the embedded digits, at toy size: VAE → dataset on a
known manifold → standard and adversarial classifiers → fractions in tangent space → ROAR."""

from __future__ import annotations

import json
import math

import pytest
import torch

from manifoldlens.cli import main
from manifoldlens.generative import ManifoldDataset
from manifoldlens.tangent import random_fraction_baseline


def _doc(out):
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifold")
    common = ["--no-progress"]
    assert main(["manifold", "vae", "--data", "digits", "--size", "16", "--latent", "4",
                 "--steps", "40", "--limit", "300", "--out", str(root / "vae"), *common]) == 0
    assert main(["manifold", "dataset", str(root / "vae" / "model.json"), "--n-train", "120",
                 "--n-test", "40", "--labeller-steps", "30", "--out", str(root / "ds"),
                 *common]) == 0
    assert main(["manifold", "train", str(root / "ds"), "--arch", "mlp", "--epochs", "2",
                 "--fraction-every", "2", "--out", str(root / "std"), *common]) == 0
    assert main(["manifold", "train", str(root / "ds"), "--arch", "mlp", "--epochs", "1",
                 "--adversarial", "--eps", "0.5,1", "--pgd-steps", "2", "--fraction-every",
                 "2", "--out", str(root / "adv"), *common]) == 0
    return root


def test_vae_and_dataset(pipeline):
    vae = _doc(pipeline / "vae")
    assert vae["command"] == "manifold-vae" and vae["metrics"]["shape"] == [1, 16, 16]
    assert {"reconstructions.png", "traversals.png"} <= {p.name for p in
                                                         (pipeline / "vae").glob("*.png")}
    ds = _doc(pipeline / "ds")["metrics"]
    assert ds["n_train"] == 120 and ds["k"] == 4 and ds["d"] == 256
    assert 0 < ds["acceptance_rate"] <= 1 and 0 <= ds["labeller_heldout_accuracy"] <= 1
    assert math.isclose(ds["random_baseline"], random_fraction_baseline(4, 256))
    four = {"min": 4, "median": 4, "max": 4, "below_k": 0}  # every image has k directions
    assert ds["tangent_dim"] == {"train": four, "test": four} and "warning" not in ds
    test = ManifoldDataset.load(pipeline / "ds" / "test")
    assert test.images.shape == (40, 1, 16, 16) and test.tangent.shape == (40, 4, 256)
    gram = test.tangent @ test.tangent.mT  # orthonormal tangent bases
    torch.testing.assert_close(gram, torch.eye(4).expand(40, 4, 4), atol=1e-5, rtol=0)


def test_training_records_the_fraction(pipeline):
    for run in ("std", "adv"):
        doc = _doc(pipeline / run)
        assert 0 <= doc["metrics"]["fraction_end"] <= 1
        assert (pipeline / run / "fraction_over_training.png").is_file()
    assert _doc(pipeline / "adv")["metrics"]["adversarial"]["eps"] == [0.5, 1.0]


def test_fraction_and_roar(pipeline, tmp_path):
    out = tmp_path / "frac"
    assert main(["manifold", "fraction", str(pipeline / "ds"), str(pipeline / "std/model.json"),
                 str(pipeline / "adv/model.json"), "--names", "standard,robust", "--methods",
                 "gradient,input_x_gradient,smoothgrad", "--n", "20", "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"standard", "robust"}
    for entry in res["models"].values():
        for m in ("gradient", "input_x_gradient", "smoothgrad"):
            assert 0 <= entry["methods"][m]["tangent"]["mean"] <= 1
        assert 0 <= entry["smallest_angle_deg"]["mean"] <= 90
    assert abs(res["random_vectors"]["mean"] - res["random_baseline"]) < 0.04
    assert res["random_baseline"] == random_fraction_baseline(4, 256)
    assert res["tangent_dim"] == {"min": 4, "median": 4, "max": 4, "below_k": 0}
    assert (out / "fraction_by_method.png").is_file()
    out = tmp_path / "roar"
    assert main(["manifold", "roar", str(pipeline / "ds"), str(pipeline / "std/model.json"),
                 "--methods", "gradient", "--fractions", "0.5", "--epochs", "1", "--arch", "mlp",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"fractions", "gradient", "tangent space", "random"}
    assert all(0 <= acc <= 1 for name in ("gradient", "tangent space", "random")
               for acc in res[name]) and len(res["gradient"]) == 1


def test_roar_resume_retrains_only_missing_cells(pipeline, tmp_path, capsys):
    out = tmp_path / "roar"
    argv = ["manifold", "roar", str(pipeline / "ds"), str(pipeline / "std/model.json"),
            "--methods", "gradient", "--fractions", "0.3,0.6", "--epochs", "1", "--arch", "mlp",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    full = json.loads((out / "results.json").read_text())
    state = json.loads((out / "roar_progress.json").read_text())
    assert state["cells"]["random"] == {"0.3": full["random"][0], "0.6": full["random"][1]}
    del state["cells"]["random"]["0.6"]  # as if stopped before the last cell
    state["cells"]["gradient"]["0.3"] = -1.0  # a stored cell is reused, not retrained
    (out / "roar_progress.json").write_text(json.dumps(state))
    assert main([*argv, "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["random"] == full["random"]
    assert resumed["gradient"] == [-1.0, full["gradient"][1]]
    assert main([*argv[:7], "0.3", *argv[8:], "--resume"]) == 2
    assert "settings changed (fractions) since roar_progress.json" in capsys.readouterr().err
    (out / "roar_progress.json").unlink()  # as if stopped during the first cell
    assert main([*argv[:5], "input_x_gradient", *argv[6:], "--resume"]) == 2
    assert "settings changed (methods) since roar_scores.safetensors" in capsys.readouterr().err


def test_checkpoints_record_their_data_and_refuse_another_manifold_dataset(pipeline, tmp_path,
                                                                          capsys):
    vae = json.loads((pipeline / "vae" / "model.json").read_text())["metadata"]
    assert set(vae["data_sha256"]) == {"train", "test"}
    std = json.loads((pipeline / "std" / "model.json").read_text())["metadata"]
    assert set(std["dataset_sha256"]) == {"train", "test"}
    other = tmp_path / "ds2"  # the same VAE, another draw: another manifold dataset
    assert main(["manifold", "dataset", str(pipeline / "vae" / "model.json"), "--n-train", "60",
                 "--n-test", "40", "--labeller-steps", "30", "--seed", "1", "--out", str(other),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["manifold", "fraction", str(other), str(pipeline / "std/model.json"),
                 "--methods", "gradient", "--n", "10", "--out", str(tmp_path / "f"),
                 "--no-progress"]) == 2
    assert "was trained on another manifold dataset" in capsys.readouterr().err
    assert main(["manifold", "roar", str(other), str(pipeline / "std/model.json"),
                 "--methods", "gradient", "--fractions", "0.5", "--epochs", "1", "--arch", "mlp",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "was trained on another manifold dataset" in capsys.readouterr().err
    assert main(["manifold", "fraction", str(pipeline / "ds"), str(pipeline / "std/model.json"),
                 "--methods", "gradient", "--n", "41", "--out", str(tmp_path / "n"),
                 "--no-progress"]) == 2
    assert "n=41 exceeds the 40 test images" in capsys.readouterr().err


def test_reconstructive_splits_are_shuffled(pipeline, tmp_path):
    """Real splits may be sorted by class (mnist-5k): the first test images of a
    reconstructive dataset (probes, ``fraction --n``) must not all be one class."""
    out = tmp_path / "rec"
    assert main(["manifold", "dataset", str(pipeline / "vae" / "model.json"), "--approach",
                 "reconstructive", "--n-train", "60", "--n-test", "40", "--out", str(out),
                 "--no-progress"]) == 0
    test = ManifoldDataset.load(out / "test")
    from manifoldlens.data import load_dataset

    drawn = load_dataset("digits", "test").subset(40, seed=0).labels.tolist()
    assert sorted(test.labels.tolist()) == sorted(drawn)  # the same images, shuffled
    assert test.labels.tolist() != drawn
