"""Fixtures shared by the tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from helpers import TinyCNN, TinyMLP, make

if TYPE_CHECKING:
    from matplotlib.figure import Figure

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    """120 training digits (8 × 8), stratified, seed 0; modules may define their own."""
    from manifoldlens.data import load_dataset

    return load_dataset("digits", "train").subset(120, seed=0)


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


@pytest.fixture
def figs():
    """A list to put matplotlib figures in; each is cleared after the test."""
    made: list[Figure] = []
    yield made
    for fig in made:
        fig.clf()
