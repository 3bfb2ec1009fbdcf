"""Small float64 models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self, d: int = 12, c: int = 4, hidden: int = 16, act: type = nn.ReLU):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(d, hidden), act(), nn.Linear(hidden, hidden), act(),
            nn.Linear(hidden, c),
        )

    def forward(self, x):
        return self.net(x)


class TinyCNN(nn.Module):
    def __init__(self, c: int = 5, act: type = nn.ReLU):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), act(), nn.Conv2d(4, 6, 3), act(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(6 * 2 * 2, 12), act(), nn.Linear(12, c),
        )

    def forward(self, x):
        return self.net(x)


def make(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model.double().eval()


class Counting(nn.Module):
    """Counts its forward passes on real data (the meta-device measurements are free)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls, self.largest = inner, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta":
            self.calls += 1
            self.largest = max(self.largest, x.shape[0])  # inputs in one pass
        return self.inner(x)


def digits_mlp(activation: str = "relu", seed: int = 0) -> nn.Module:
    """The 64–16–10 MLP the run-level tests train on the 8 × 8 digits."""
    from manifoldlens.models import create_model

    torch.manual_seed(seed)
    return create_model("mlp", (1, 8, 8), 10, hidden=(16,), activation=activation)
