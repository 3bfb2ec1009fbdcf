"""ResNets (He et al. 2016) in the model registry, without torchvision.

Four architectures, registered by name for :func:`~manifoldlens.models.create_model`,
:func:`~manifoldlens.models.build_model` and :func:`~manifoldlens.models.load_checkpoint`:

- ``resnet18`` (:class:`ResNet18`) and ``resnet50`` (:class:`ResNet50`): the ImageNet layout,
  a 7×7 stride-2 stem convolution → BatchNorm → ReLU → 3×3 stride-2 max-pool, four stages of
  [2, 2, 2, 2] basic blocks or [3, 4, 6, 3] bottleneck blocks (expansion 4, the stride on the
  3×3 convolution as torchvision's "v1.5"), adaptive average pooling and a fully connected
  layer. Defaults: ``in_shape=(3, 224, 224)``, ``num_classes=1000``.
- ``resnet18_cifar`` (:class:`ResNet18CIFAR`) and ``resnet50_cifar`` (:class:`ResNet50CIFAR`):
  the same stages after a 3×3 stride-1 stem convolution and no max-pool, for small images.
  Defaults: ``in_shape=(3, 32, 32)``, ``num_classes=10``.

``width`` is the number of channels of the first stage (the stages have width·(1, 2, 4, 8),
times 4 at the output of a bottleneck block); any number of input channels works. A block
whose output shape differs from its input's adds a 1×1 convolution and BatchNorm to its
shortcut. Convolutions are initialised as torchvision's (Kaiming normal, fan-out), BatchNorm
with weight 1 and bias 0, and parameter names are torchvision's, so its state dicts load with
``strict=True``; at the standard configurations the parameter counts are torchvision's
(11 689 512 for ResNet-18, 25 557 032 for ResNet-50).

BatchNorm couples the samples of a batch in train mode: input Jacobians need ``model.eval()``
(the library refuses a model in train mode).

>>> import torch
>>> from manifoldlens.models import count_parameters, create_model
>>> m = create_model("resnet18_cifar", (1, 16, 16), 3, width=4).eval()
>>> m(torch.zeros(2, 1, 16, 16)).shape
torch.Size([2, 3])
>>> m.spec
{'arch': 'resnet18_cifar', 'in_shape': [1, 16, 16], 'num_classes': 3, 'width': 4}
>>> count_parameters(ResNet18())
11689512

References
----------
K. He, X. Zhang, S. Ren, J. Sun. "Deep Residual Learning for Image Recognition." CVPR 2016.
arXiv:1512.03385.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .models import as_batch, image_shape, make_spec, positive_int, register_architecture

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNet18",
    "ResNet18CIFAR",
    "ResNet50",
    "ResNet50CIFAR",
]


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    """The 1×1 convolution + BatchNorm of a block whose output shape differs from its input's."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """3×3 conv → BN → ReLU → 3×3 conv → BN, plus the shortcut, → ReLU."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(c_in, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = _shortcut(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + identity)  # out of place: safe under torch.func transforms


class Bottleneck(nn.Module):
    """1×1 conv → BN → ReLU → 3×3 conv (stride) → BN → ReLU → 1×1 conv (×4) → BN, plus the
    shortcut, → ReLU."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = _conv(c_in, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv(planes, c_out, 1)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu3 = nn.ReLU()
        self.downsample = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """A ResNet of ``block`` with ``layers[i]`` blocks in stage i; ``cifar`` selects the 3×3
    stride-1 stem without max-pool. Not registered itself: use the named subclasses."""

    arch = "resnet"

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 in_shape: Sequence[int], num_classes: int, width: int, cifar: bool) -> None:
        super().__init__()
        c, h, w = image_shape(in_shape, 1, type(self).__name__)
        self.in_shape: tuple[int, ...] = (c, h, w)
        self.num_classes = positive_int(num_classes, "num_classes")
        self.width = width = positive_int(width, "width")
        if cifar:
            self.conv1 = _conv(c, width, 3)
        else:
            self.conv1 = nn.Conv2d(c, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, stride=2, padding=1)
        c_in = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, planes, stride=2 if i > 0 and j == 0 else 1))
                c_in = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, self.num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.spec = make_spec(self.arch, in_shape=self.in_shape, num_classes=self.num_classes,
                              width=self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_batch(x, self.in_shape)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_architecture("resnet18")
class ResNet18(ResNet):
    """ResNet-18, ImageNet layout (11 689 512 parameters at the defaults)."""

    arch = "resnet18"

    def __init__(self, in_shape: Sequence[int] = (3, 224, 224), num_classes: int = 1000,
                 width: int = 64) -> None:
        super().__init__(BasicBlock, (2, 2, 2, 2), in_shape, num_classes, width, cifar=False)


@register_architecture("resnet50")
class ResNet50(ResNet):
    """ResNet-50, ImageNet layout (25 557 032 parameters at the defaults)."""

    arch = "resnet50"

    def __init__(self, in_shape: Sequence[int] = (3, 224, 224), num_classes: int = 1000,
                 width: int = 64) -> None:
        super().__init__(Bottleneck, (3, 4, 6, 3), in_shape, num_classes, width, cifar=False)


@register_architecture("resnet18_cifar")
class ResNet18CIFAR(ResNet):
    """ResNet-18, CIFAR layout: 3×3 stride-1 stem, no max-pool."""

    arch = "resnet18_cifar"

    def __init__(self, in_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 width: int = 64) -> None:
        super().__init__(BasicBlock, (2, 2, 2, 2), in_shape, num_classes, width, cifar=True)


@register_architecture("resnet50_cifar")
class ResNet50CIFAR(ResNet):
    """ResNet-50, CIFAR layout: 3×3 stride-1 stem, no max-pool."""

    arch = "resnet50_cifar"

    def __init__(self, in_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                 width: int = 64) -> None:
        super().__init__(Bottleneck, (3, 4, 6, 3), in_shape, num_classes, width, cifar=True)
