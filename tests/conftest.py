"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import TinyCNN, TinyMLP, make

torch.set_num_threads(1)


@pytest.fixture
def relu_mlp():
    return make(TinyMLP(act=nn.ReLU))


@pytest.fixture
def tanh_mlp():
    return make(TinyMLP(act=nn.Tanh))


@pytest.fixture
def cnn():
    return make(TinyCNN())


@pytest.fixture
def linear():
    return make(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))
