"""Tests for manifoldlens.models: architectures, spec registry, safetensors checkpoints."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

from manifoldlens.models import (
    ARCHITECTURES,
    MLP,
    Linear,
    Seed001CNN,
    SmallCNN,
    build_model,
    count_parameters,
    create_model,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)

SMALL_MODELS = [
    lambda: Seed001CNN((1, 10, 10), 4),
    lambda: Seed001CNN((3, 8, 9), 5, log_softmax=True),
    lambda: MLP((2, 3), 3, hidden=(5, 4), activation="tanh"),
    lambda: MLP(7, 2, hidden=()),
    lambda: SmallCNN((2, 5, 6), 3, channels=(4, 6), hidden=8, activation="softplus"),
    lambda: Linear((1, 3, 3), 4),
]


def _param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- shapes


def test_seed001_matches_reference_layout() -> None:
    torch.manual_seed(0)
    model = Seed001CNN()
    assert model.fc_in == 9216
    assert model.fc1.in_features == 64 * 12 * 12
    assert _param_shapes(model) == {
        "conv1.weight": (32, 1, 3, 3),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 3, 3),
        "conv2.bias": (64,),
        "fc1.weight": (128, 9216),
        "fc1.bias": (128,),
        "fc2.weight": (10, 128),
        "fc2.bias": (10,),
    }
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model(torch.randn(2, 784)).shape == (2, 10)  # flat input is reshaped


@pytest.mark.parametrize("in_shape", [(1, 6, 6), (3, 7, 11), (2, 12, 8)])
def test_seed001_shapes(in_shape: tuple[int, int, int]) -> None:
    model = Seed001CNN(in_shape, num_classes=3)
    c, h, w = in_shape
    assert model.fc_in == 64 * ((h - 4) // 2) * ((w - 4) // 2)
    assert model(torch.randn(4, *in_shape)).shape == (4, 3)


def test_seed001_log_softmax_rows_normalised() -> None:
    torch.manual_seed(1)
    model = Seed001CNN((1, 8, 8), 5, log_softmax=True)
    assert isinstance(list(model.children())[-1], nn.LogSoftmax)
    out = model(torch.randn(6, 1, 8, 8))
    assert out.shape == (6, 5)
    torch.testing.assert_close(torch.logsumexp(out, 1), torch.zeros(6), atol=1e-5, rtol=0)
    assert (out <= 0).all()


def test_seed001_too_small_input_rejected() -> None:
    with pytest.raises(ValueError, match="H, W >= 6"):
        Seed001CNN((1, 5, 8))
    with pytest.raises(ValueError, match="C, H, W"):
        Seed001CNN((28, 28))


@settings(max_examples=15, deadline=None)
@given(
    c=st.integers(1, 3),
    h=st.integers(2, 10),
    w=st.integers(2, 10),
    k=st.integers(1, 5),
    n=st.integers(1, 3),
)
def test_small_cnn_shapes(c: int, h: int, w: int, k: int, n: int) -> None:
    model = SmallCNN((c, h, w), k, channels=(3, 4), hidden=6)
    assert model.fc_in == 4 * (h // 2) * (w // 2)
    assert model(torch.randn(n, c, h, w)).shape == (n, k)


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    k=st.integers(1, 5),
    act=st.sampled_from(["relu", "tanh", "softplus"]),
)
def test_mlp_and_linear_shapes(shape: list[int], k: int, act: str) -> None:
    x = torch.randn(3, *shape)
    assert MLP(tuple(shape), k, hidden=(4, 3), activation=act)(x).shape == (3, k)
    assert Linear(tuple(shape), k)(x).shape == (3, k)


def test_small_cnn_default_is_for_8x8_digits() -> None:
    model = SmallCNN()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert model(torch.randn(2, 64)).shape == (2, 10)


def test_linear_is_affine_closed_form() -> None:
    torch.manual_seed(2)
    model = Linear((2, 3), 4)
    x = torch.randn(5, 2, 3)
    expected = x.reshape(5, -1) @ model.weight.T + model.bias
    torch.testing.assert_close(model(x), expected)
    assert count_parameters(model) == 6 * 4 + 4


def test_activation_modules_follow_choice() -> None:
    for name, cls in [("relu", nn.ReLU), ("tanh", nn.Tanh), ("softplus", nn.Softplus)]:
        assert any(isinstance(m, cls) for m in MLP(3, 2, activation=name).modules())
        assert any(isinstance(m, cls) for m in SmallCNN(activation=name).modules())


def test_input_shape_mismatch_is_clear() -> None:
    with pytest.raises(ValueError, match="does not match in_shape"):
        MLP((4,), 2)(torch.randn(3, 5))


def test_count_parameters() -> None:
    model = MLP((3,), 2, hidden=(4,))
    assert count_parameters(model) == (3 * 4 + 4) + (4 * 2 + 2)
    assert count_parameters(Seed001CNN()) == 1_199_882


# ----------------------------------------------------------------------------- errors


def test_bad_activation_lists_choices() -> None:
    with pytest.raises(ValueError, match="relu.*softplus.*tanh"):
        MLP(3, 2, activation="gelu")
    with pytest.raises(ValueError, match="unknown activation"):
        SmallCNN(activation="sigmoid")


def test_bad_arch_lists_known() -> None:
    with pytest.raises(ValueError, match="linear.*mlp.*seed001_cnn.*small_cnn"):
        create_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model({"arch": "resnet"})
    with pytest.raises(ValueError, match="unknown keys"):
        build_model({"arch": "linear", "in_shape": [3], "num_classes": 2, "depth": 3})


# ----------------------------------------------------------------------------- spec


@pytest.mark.parametrize("make", SMALL_MODELS)
def test_spec_rebuilds_same_architecture(make) -> None:
    model = make()
    spec = model.spec
    text = json.dumps(spec)
    assert spec["arch"] in ARCHITECTURES
    assert isinstance(ARCHITECTURES[spec["arch"]], type)
    assert isinstance(model, ARCHITECTURES[spec["arch"]])
    rebuilt = build_model(json.loads(text))
    assert type(rebuilt) is type(model)
    assert rebuilt.spec == spec
    assert _param_shapes(rebuilt) == _param_shapes(model)
    assert count_parameters(rebuilt) == count_parameters(model)


def test_spec_contents_and_create_model() -> None:
    model = create_model("small_cnn", (1, 8, 8), 10, channels=(8, 16), hidden=32)
    assert model.spec == {
        "arch": "small_cnn",
        "in_shape": [1, 8, 8],
        "num_classes": 10,
        "channels": [8, 16],
        "hidden": 32,
        "activation": "relu",
    }
    assert Seed001CNN().spec == {
        "arch": "seed001_cnn",
        "in_shape": [1, 28, 28],
        "num_classes": 10,
        "log_softmax": False,
    }
    assert Linear(5, 3).spec == {"arch": "linear", "in_shape": [5], "num_classes": 3}


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("make", SMALL_MODELS)
def test_checkpoint_round_trip(make, tmp_path) -> None:
    torch.manual_seed(3)
    model = make().eval()
    x = torch.randn(4, *model.in_shape)
    meta = {"step": 7, "metrics": {"acc": 0.5, "loss": [1.0, 0.25]}, "note": "ok"}
    manifest = save_checkpoint(tmp_path / "ckpt", model, metadata=meta)
    assert manifest == tmp_path / "ckpt.json"
    loaded, meta2 = load_checkpoint(manifest)
    assert meta2 == meta
    assert type(loaded) is type(model)
    assert not loaded.training
    assert all(not m.training for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_manifest_and_path_forms(tmp_path) -> None:
    torch.manual_seed(4)
    model = SmallCNN((1, 4, 4), 3, channels=(2,), hidden=4).eval()
    x = torch.randn(2, 1, 4, 4)
    stem = tmp_path / "run.5"  # a dotted stem must not lose its ".5"
    manifest_path = save_checkpoint(stem, model)
    assert manifest_path.name == "run.5.json"
    assert (tmp_path / "run.5.safetensors").is_file()
    assert not (tmp_path / "run.5.optim.pt").exists()
    manifest = json.loads(manifest_path.read_text())
    assert manifest["spec"] == model.spec
    assert manifest["weights"] == "run.5.safetensors"
    assert manifest["torch_version"] == torch.__version__
    assert len(manifest["sha256"]) == 64
    assert manifest["metadata"] == {}
    for form in [manifest_path, tmp_path / "run.5.safetensors", stem, str(stem)]:
        loaded, meta = load_checkpoint(form)
        assert meta == {}
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_checkpoint_into_directory(tmp_path) -> None:
    model = Linear(3, 2)
    path = save_checkpoint(tmp_path, model)
    assert path.parent == tmp_path and path.suffix == ".json"
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.weight, model.weight)


def test_weights_file_is_safetensors_not_pickle(tmp_path) -> None:
    model = MLP((3,), 2, hidden=(4,))
    save_checkpoint(tmp_path / "m", model)
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert not raw.startswith(b"\x80")  # pickle protocol marker
    assert not raw.startswith(b"PK")  # torch.save zip archive
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        for key, value in model.state_dict().items():
            assert torch.equal(f.get_tensor(key), value)


def test_tampered_weights_rejected(tmp_path) -> None:
    model = MLP((3,), 2, hidden=(4,))
    save_checkpoint(tmp_path / "m", model)
    weights = tmp_path / "m.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"sha256 mismatch.*m\.safetensors"):
        load_checkpoint(tmp_path / "m.json")


def test_missing_files_raise_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_checkpoint(tmp_path / "nope")
    save_checkpoint(tmp_path / "m", Linear(2, 2))
    (tmp_path / "m.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"m\.safetensors"):
        load_checkpoint(tmp_path / "m")


def test_any_module_round_trips_through_load_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "x", model, metadata={"step": 1}, optimizer=opt)
    with pytest.raises(ValueError, match="load_weights"):
        load_checkpoint(tmp_path / "x")
    fresh = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    assert load_weights(tmp_path / "x.json", fresh, optimizer=opt2) == {"step": 1}
    x = torch.randn(5, 2)
    assert torch.equal(fresh(x), model(x))
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_float64_weights_keep_dtype(tmp_path) -> None:
    model = MLP((3,), 2, hidden=(4,)).double().eval()
    save_checkpoint(tmp_path / "d", model)
    loaded, _ = load_checkpoint(tmp_path / "d")
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))


def test_optimizer_state_round_trip(tmp_path) -> None:
    torch.manual_seed(5)
    model = MLP((3,), 2, hidden=(4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    save_checkpoint(tmp_path / "o", model, metadata={"step": 1}, optimizer=opt)
    assert (tmp_path / "o.optim.pt").is_file()

    fresh = build_model(model.spec)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.0)
    loaded, meta = load_checkpoint(tmp_path / "o", optimizer=opt2)
    assert meta == {"step": 1}
    assert opt2.param_groups[0]["lr"] == 0.1
    assert opt2.param_groups[0]["momentum"] == 0.9
    assert [id(p) for p in opt2.param_groups[0]["params"]] == [id(p) for p in loaded.parameters()]
    for p_old, p_new in zip(model.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(
            opt.state[p_old]["momentum_buffer"], opt2.state[p_new]["momentum_buffer"]
        )

    # one more identical step on both keeps them identical
    loaded.train()
    for m, o in [(model, opt), (loaded, opt2)]:
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)


def test_optimizer_requested_but_absent(tmp_path) -> None:
    model = Linear(2, 2)
    save_checkpoint(tmp_path / "n", model)
    opt = torch.optim.SGD(build_model(model.spec).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "n", optimizer=opt)


def test_unserialisable_metadata_writes_nothing(tmp_path) -> None:
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "bad", Linear(2, 2), metadata={"obj": object()})
    assert list(tmp_path.iterdir()) == []
