"""Tests for manifoldlens.resnet: the registered ResNets (torchvision's layouts and parameter
counts), their checkpoints, input Jacobians, and `manifold train --arch resnet18`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import manifoldlens
from manifoldlens.cli import main
from manifoldlens.generative import ManifoldDataset
from manifoldlens.models import (
    ARCHITECTURES,
    build_model,
    count_parameters,
    create_model,
    load_checkpoint,
    save_checkpoint,
)
from manifoldlens.resnet import ResNet18, ResNet18CIFAR, ResNet50, ResNet50CIFAR

NAMES = ["resnet18", "resnet50", "resnet18_cifar", "resnet50_cifar"]


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics, so that eval
    mode is not the identity map it is at initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def test_registered_and_exported():
    assert {ARCHITECTURES[n] for n in NAMES} == {ResNet18, ResNet50, ResNet18CIFAR,
                                                  ResNet50CIFAR}
    assert "resnet" in manifoldlens.__all__ and manifoldlens.resnet.ResNet18 is ResNet18


@pytest.mark.parametrize(("make", "count"), [
    (lambda: ResNet18(), 11_689_512),
    (lambda: create_model("resnet50", (3, 224, 224), 1000), 25_557_032),
    (lambda: ResNet18CIFAR(), 11_173_962),
    (lambda: ResNet50CIFAR(), 23_520_842),
])
def test_parameter_counts_are_torchvisions(make, count):
    with torch.device("meta"):  # the counts need no memory
        model = make()
    assert count_parameters(model) == count


def test_torchvision_parameter_names():
    with torch.device("meta"):
        names = set(ResNet50().state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight",
            "layer1.0.downsample.1.num_batches_tracked", "layer4.2.conv3.weight",
            "layer4.2.bn3.bias", "fc.weight", "fc.bias"} <= names
    assert not any("layer1.1.downsample" in n for n in names)


def test_torchvision_initialisation():
    torch.manual_seed(0)
    model = ResNet18CIFAR((3, 8, 8), 10, width=16)
    conv = model.layer3[0].conv2  # 64 → 64, 3 × 3: fan-out 576, std √(2/576)
    assert conv.weight.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.05)
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all())
               for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_shape", [(3, 32, 32), (1, 40, 40)])
def test_output_shapes(name, in_shape):
    torch.manual_seed(0)
    model = create_model(name, in_shape, 7, width=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *in_shape))
        flat = model(torch.randn(3, 1, *in_shape).flatten(1))  # any (n, ...) of d features
    assert out.shape == (2, 7) and flat.shape == (3, 7) and torch.isfinite(out).all()
    assert model.spec == {"arch": name, "in_shape": list(in_shape), "num_classes": 7,
                          "width": 4}
    assert build_model(model.spec).spec == model.spec


def test_stage_widths_and_layouts():
    model = ResNet50CIFAR((3, 16, 16), 5, width=8)
    assert model.fc.in_features == 8 * 8 * 4
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.kernel_size == (3, 3)
    imagenet = ResNet18((2, 64, 64), 5, width=8)
    assert imagenet.fc.in_features == 64 and imagenet.conv1.kernel_size == (7, 7)
    assert imagenet.conv1.stride == (2, 2) and isinstance(imagenet.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("bad", [{"width": 0}, {"num_classes": 0}, {"in_shape": (3, 32)},
                                 {"width": 2.5}])
def test_bad_arguments_are_refused(bad):
    kwargs = {"in_shape": (3, 32, 32), "num_classes": 10, "width": 4, **bad}
    with pytest.raises(ValueError):
        ResNet18CIFAR(**kwargs)


@pytest.mark.parametrize("name", ["resnet18", "resnet50_cifar"])
def test_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(1)
    model = create_model(name, (3, 64, 64) if name == "resnet18" else (1, 16, 16), 10, width=4)
    x = torch.randn(4, *model.in_shape)
    model.train()
    with torch.no_grad():
        model(x)  # moves the BatchNorm running statistics away from their initial values
    model.eval()
    manifest = save_checkpoint(tmp_path / "ckpt", model, metadata={"step": 1})
    loaded, meta = load_checkpoint(manifest)
    assert meta == {"step": 1} and type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.layer1[0].bn1.running_mean, model.layer1[0].bn1.running_mean)


def test_jacobian_matches_jacrev():
    torch.manual_seed(0)
    model = _randomise_batchnorm(create_model("resnet18", (3, 16, 16), 5, width=4)).double()
    model.eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    jac = manifoldlens.jacobian(model, x, output="log_softmax")

    def log_probs(xi):
        return torch.log_softmax(model(xi.unsqueeze(0)), dim=1)[0]

    ref = torch.stack([torch.func.jacrev(log_probs)(xi) for xi in x])
    assert jac.shape == ref.shape == (2, 5, 3, 16, 16)
    torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-12)
    G = manifoldlens.local_data_matrix(model, x)
    p = torch.softmax(model(x), dim=1).detach()
    trace = (p * ref.flatten(2).pow(2).sum(-1)).sum(-1)
    torch.testing.assert_close(G.trace, trace)


def test_train_mode_is_refused():
    model = create_model("resnet18_cifar", (3, 8, 8), 4, width=4).train()
    with pytest.raises(ValueError, match="train mode.*BatchNorm2d.*model.eval"):
        manifoldlens.local_data_matrix(model, torch.randn(2, 3, 8, 8))


def _tiny_manifold_dataset(path, n, seed):
    g = torch.Generator().manual_seed(seed)
    k, d = 3, 16 * 16
    tangent = torch.linalg.qr(torch.randn(n, d, k, generator=g)).Q.mT.contiguous()
    return ManifoldDataset(torch.rand(n, 1, 16, 16, generator=g),
                           torch.randint(2, (n,), generator=g), torch.randn(n, k, generator=g),
                           tangent, ["a", "b"], {}).save(path)


def test_manifold_train_resnet18(tmp_path):
    """`manifold train --arch resnet18` on a 1-channel dataset: trained in train mode (the
    running statistics move), measured and saved in eval mode."""
    _tiny_manifold_dataset(tmp_path / "ds" / "train", 16, 0)
    _tiny_manifold_dataset(tmp_path / "ds" / "test", 8, 1)
    out = tmp_path / "run"
    assert main(["manifold", "train", str(tmp_path / "ds"), "--arch", "resnet18", "--epochs",
                 "1", "--batch-size", "8", "--fraction-every", "1", "--no-progress",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert metrics["steps"] == 2 and 0 <= metrics["fraction_end"] <= 1
    model, _ = load_checkpoint(out / "model.json")
    assert model.spec["arch"] == "resnet18" and model.in_shape == (1, 16, 16)
    assert not torch.equal(model.bn1.running_mean, torch.zeros_like(model.bn1.running_mean))
