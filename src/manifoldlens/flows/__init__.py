"""Normalizing flows: NICE [1]_, RealNVP [2]_ and Glow [3]_ with exact likelihood.

The three models are architectures of :mod:`manifoldlens.models` (``"nice"``, ``"realnvp"``,
``"glow"``), registered where :mod:`manifoldlens.flows.models` defines them. A flow's decoder is a
bijection; the k-dimensional manifolds it gives (slices of its latent space) and their tangent
spaces are in :mod:`manifoldlens.flows.manifold` (:func:`tangent_space`).

>>> import torch
>>> from manifoldlens import flows
>>> flow = flows.RealNVP((2,), couplings=4, hidden=16)
>>> flow.log_prob(torch.randn(3, 2)).shape
torch.Size([3])

References
----------
.. [1] L. Dinh, D. Krueger, Y. Bengio, "NICE: Non-linear Independent Components Estimation",
   2014. arXiv:1410.8516
.. [2] L. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP",
   ICLR 2017. arXiv:1605.08803
.. [3] D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
   NeurIPS 2018. arXiv:1807.03039
.. [4] L. Theis, A. van den Oord, M. Bethge, "A note on the evaluation of generative models",
   ICLR 2016. arXiv:1511.01844 (dequantization, bits per dimension)
"""

from . import layers, layouts, manifold
from .bpd import bits_per_dim, dequantize
from .layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Coupling,
    DiagonalScaling,
    InvertibleConv1x1,
    Logit,
    Shift,
    Split,
    Squeeze,
    StandardLogistic,
    StandardNormal,
)
from .layouts import (
    AlternatingLayout,
    ChannelLayout,
    CheckerboardLayout,
    Layout,
    MaskLayout,
)
from .manifold import LatentSlice, principal_directions, tangent_space
from .models import NICE, Flow, Glow, RealNVP, Reshape, initialize, interpolate

__all__ = [
    "layers",
    "layouts",
    "manifold",
    "Flow",
    "NICE",
    "RealNVP",
    "Glow",
    "Reshape",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "Coupling",
    "DiagonalScaling",
    "InvertibleConv1x1",
    "Logit",
    "Shift",
    "Split",
    "Squeeze",
    "StandardLogistic",
    "StandardNormal",
    "Layout",
    "MaskLayout",
    "AlternatingLayout",
    "ChannelLayout",
    "CheckerboardLayout",
    "bits_per_dim",
    "dequantize",
    "initialize",
    "interpolate",
    "LatentSlice",
    "principal_directions",
    "tangent_space",
]
