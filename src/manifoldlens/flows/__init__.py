"""Normalizing flows (seeds 002–003): NICE, RealNVP and Glow with exact likelihood.

>>> import torch
>>> from manifoldlens import flows
>>> flow = flows.RealNVP((2,), couplings=4, hidden=16)
>>> flow.log_prob(torch.randn(3, 2)).shape
torch.Size([3])
"""

from ..models import ARCHITECTURES
from . import layers
from .bpd import bits_per_dim, dequantize
from .layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    DiagonalScaling,
    InvertibleConv1x1,
    Logit,
    Shift,
    Split,
    Squeeze,
    StandardLogistic,
    StandardNormal,
)
from .models import NICE, Flow, Glow, RealNVP, Reshape, initialize, interpolate

ARCHITECTURES.update({"nice": NICE, "realnvp": RealNVP, "glow": Glow})

__all__ = [
    "layers",
    "Flow",
    "NICE",
    "RealNVP",
    "Glow",
    "Reshape",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "DiagonalScaling",
    "InvertibleConv1x1",
    "Logit",
    "Shift",
    "Split",
    "Squeeze",
    "StandardLogistic",
    "StandardNormal",
    "bits_per_dim",
    "dequantize",
    "initialize",
    "interpolate",
]
