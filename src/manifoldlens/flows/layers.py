"""Bijections of the flows, one per class.

Every layer maps data towards the latent space: ``forward(x) → (y, log|det ∂y/∂x|)`` with the
log-determinant per sample, shape (n,); ``inverse(y) → x``. Layers are batched on the first
axis and follow the dtype and device of their input and parameters.

A flow ``f = f_K ∘ … ∘ f_1`` gives ``log p_X(x) = log p_Z(f(x)) + Σ_k log|det ∂f_k|``
(lecture slides, "composition of flows").

The couplings take their layout (which part of the input conditions, which is transformed)
from :mod:`~manifoldlens.flows.layouts`; the masks are defined there and re-exported here.

References
----------
[1]–[3]: NICE (Dinh et al. 2014), RealNVP (Dinh et al. 2017), Glow (Kingma & Dhariwal 2018),
cited in full in :mod:`manifoldlens.flows`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layouts import Layout, alternating_mask, channel_mask, checkerboard_mask, make_layout

__all__ = [
    "Bijection",
    "Coupling",
    "AdditiveCoupling",
    "AffineCoupling",
    "DiagonalScaling",
    "ActNorm",
    "InvertibleConv1x1",
    "Squeeze",
    "Split",
    "Logit",
    "Shift",
    "Reverse",
    "StandardNormal",
    "StandardLogistic",
    "alternating_mask",
    "checkerboard_mask",
    "channel_mask",
    "mlp",
    "ResNetCoupling",
    "GlowCouplingNet",
    "ZeroConv2d",
]


def _sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


class Bijection(nn.Module):
    """Base class: ``forward(x) → (y, logdet (n,))``, ``inverse(y) → x``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one output sample for an input sample of ``shape``."""
        return tuple(shape)


# ----------------------------------------------------------------------------- networks


def mlp(in_features: int, out_features: int, hidden: int, depth: int,
        activation: type[nn.Module] = nn.ReLU, zero_init: bool = True) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden``; the last layer starts at zero, so a
    coupling built on it starts as the identity."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    last = nn.Linear(width, out_features)
    if zero_init:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class ZeroConv2d(nn.Module):
    """3×3 convolution initialised at zero with a learned log-scale per output channel
    (Glow's last layer of every coupling network and of the split priors)."""

    def __init__(self, in_channels: int, out_channels: int, log_scale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.log_scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.log_scale_factor = log_scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.log_scale * self.log_scale_factor)


def _channels_last(module: nn.Module) -> None:
    """Convolution weights in channels-last layout: with channels-last activations, oneDNN's
    convolutions on CPU skip their layout reorders (bench/flows.py measures the gain). The
    values, state dict and checkpoints are unchanged (``save_checkpoint`` stores contiguous
    copies; loading copies into these parameters and keeps their layout)."""
    module.to(memory_format=torch.channels_last)


def _as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (n, C, H, W) with channels-last strides: the same copy as
    ``x.contiguous(memory_format=torch.channels_last)`` (none if x already is), spelled as
    ``permute → contiguous → permute`` because functorch's vmap (forward-mode tangent spaces
    of a decoder) implements no other memory format than the default."""
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if x.ndim == 4 else x


class GlowCouplingNet(nn.Module):
    """Glow's coupling network: conv 3×3 → ReLU → conv 1×1 → ReLU → ZeroConv 3×3.

    ``channels_last`` runs it in channels-last layout (the default; the same function)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int,
                 channels_last: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1), nn.ReLU(),
            ZeroConv2d(hidden_channels, out_channels),
        )
        self.channels_last = channels_last
        if channels_last:
            _channels_last(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_as_channels_last(x) if self.channels_last else x)


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResNetCoupling(nn.Module):
    """RealNVP's convolutional coupling network: conv → residual blocks → zero conv.

    The input is the masked image with the mask itself as an extra channel, so the network
    knows which pixels it may read (checkerboard) — the RealNVP reference does the same.
    ``channels_last`` runs it in channels-last layout (the default; the same function).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int,
                 blocks: int = 2, with_mask_channel: bool = True, channels_last: bool = True):
        super().__init__()
        extra = 1 if with_mask_channel else 0
        self.with_mask_channel = with_mask_channel
        self.head = nn.Conv2d(in_channels + extra, hidden_channels, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResBlock(hidden_channels) for _ in range(blocks)])
        self.tail = nn.Sequential(nn.ReLU(), ZeroConv2d(hidden_channels, out_channels))
        self.channels_last = channels_last
        if channels_last:
            _channels_last(self)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.with_mask_channel:
            m = mask[:1] if mask is not None else x.new_ones(1, 1, 1)
            x = torch.cat([x, m.to(x).unsqueeze(0).expand(x.shape[0], 1, *x.shape[2:])], 1)
        if self.channels_last:
            x = _as_channels_last(x)
        return self.tail(self.blocks(self.head(x)))


# ----------------------------------------------------------------------------- couplings


class Coupling(Bijection):
    """A coupling layer: the identity on one part of the input, ``x_a``, and an element-wise
    invertible map of the other part, ``x_b``, whose parameters ``net`` computes from ``x_a``.

    Where the two parts lie is the coupling's :attr:`layout`
    (:mod:`~manifoldlens.flows.layouts`), split once per call: ``split`` is a
    :class:`~manifoldlens.flows.layouts.Layout` or the name of one — ``"mask"`` with ``mask``
    (broadcastable to one sample; its ones select ``x_a``), or ``"channel"``,
    ``"checkerboard"``, ``"alternating"`` with ``parity`` (1 swaps which half conditions).
    ``pass_mask`` calls ``net(x_a, mask)`` (the masked layout's mask, None for the others).

    A subclass defines only its map: :meth:`map_params` (the network's output → the map's
    parameters), :meth:`transform` (``x_b → (y_b, log|det|)``) and :meth:`inverse_transform`.

    Examples
    --------
    >>> import torch
    >>> from manifoldlens.flows.layouts import ChannelLayout
    >>> layer = AdditiveCoupling(mlp(2, 2, 8, 1, zero_init=False), split=ChannelLayout(1))
    >>> x = torch.randn(3, 4)
    >>> bool(torch.allclose(layer.inverse(layer(x)[0]), x, atol=1e-6))
    True
    >>> list(AdditiveCoupling(mlp(4, 4, 8, 1), alternating_mask(4)).state_dict())[0]
    'mask'
    """

    def __init__(self, net: nn.Module, mask: torch.Tensor | None = None, *,
                 split: str | Layout = "mask", parity: int = 0, pass_mask: bool = False):
        super().__init__()
        self.net = net
        self.layout = make_layout(split, mask, parity)
        self.pass_mask = pass_mask

    @property
    def mask(self) -> torch.Tensor | None:
        """The mask of a masked layout (its ones select ``x_a``); None for the others."""
        return getattr(self.layout, "mask", None)

    def map_params(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parameters of the map of ``x_b`` from the network output h: h itself."""
        return (h,)

    def transform(self, x_b: torch.Tensor, *params: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """``(y_b, log|det ∂y_b/∂x_b| (n,))``."""
        raise NotImplementedError

    def inverse_transform(self, y_b: torch.Tensor, *params: torch.Tensor
                          ) -> torch.Tensor:  # pragma: no cover
        """``x_b`` from ``y_b``."""
        raise NotImplementedError

    def _params(self, x_a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.net(x_a, self.mask) if self.pass_mask else self.net(x_a)
        return tuple(self.layout.restrict(p) for p in self.map_params(h))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = self.layout.split(x)
        y_b, logdet = self.transform(x_b, *self._params(x_a))
        return self.layout.merge(x_a, y_b), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = self.layout.split(y)
        return self.layout.merge(y_a, self.inverse_transform(y_b, *self._params(y_a)))

    # A layout's tensors (a mask) are saved under the coupling's own names, ``<coupling>.mask``:
    # the keys of checkpoints written while the mask was a buffer of the coupling itself.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in self.layout.named_buffers():
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name, t in self.layout.named_buffers():
            key = prefix + name
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            if value.shape != t.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(value.shape)} from checkpoint, the shape in current "
                                  f"model is {tuple(t.shape)}.")
                continue
            with torch.no_grad():
                t.copy_(value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class AdditiveCoupling(Coupling):
    """NICE's additive coupling (Dinh et al. 2014): ``y_a = x_a``, ``y_b = x_b + m(x_a)``;
    log|det| = 0.

    Examples
    --------
    >>> import torch
    >>> layer = AdditiveCoupling(mlp(4, 4, 8, 2, zero_init=False), alternating_mask(4))
    >>> x = torch.randn(3, 4)
    >>> y, logdet = layer(x)
    >>> bool(torch.allclose(layer.inverse(y), x, atol=1e-6)), logdet.tolist()
    (True, [0.0, 0.0, 0.0])
    """

    def transform(self, x_b: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_b + t, x_b.new_zeros(x_b.shape[0])

    def inverse_transform(self, y_b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return y_b - t


class AffineCoupling(Coupling):
    """RealNVP's affine coupling (Dinh et al. 2017): ``y_b = x_b ⊙ exp(s(x_a)) + t(x_a)``,
    ``log|det| = Σ s``.

    The network returns ``(h_s, t)`` stacked on the feature axis; the log-scale is bounded:
    ``scale="tanh"`` gives ``s = c ⊙ tanh(h_s)`` with a learned per-feature ``c`` (RealNVP),
    ``scale="sigmoid"`` gives ``exp(s) = sigmoid(h_s + 2)`` (Glow), both finite for any input,
    so a training step cannot overflow ``exp``.

    Examples
    --------
    >>> import torch
    >>> layer = AffineCoupling(mlp(4, 8, 8, 2, zero_init=False), alternating_mask(4),
    ...                        features=4)
    >>> x = torch.randn(3, 4, dtype=torch.float64)
    >>> layer = layer.double()
    >>> y, logdet = layer(x)
    >>> jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x[0])
    >>> bool(torch.allclose(logdet[0], torch.linalg.slogdet(jac).logabsdet))
    True
    """

    def __init__(self, net: nn.Module, mask: torch.Tensor | None = None, *,
                 features: int | Sequence[int] | None = None, split: str | Layout = "mask",
                 parity: int = 0, scale: str = "tanh", pass_mask: bool = False):
        super().__init__(net, mask, split=split, parity=parity, pass_mask=pass_mask)
        if scale not in ("tanh", "sigmoid"):
            raise ValueError(f"scale must be 'tanh' or 'sigmoid', got {scale!r}")
        self.scale = scale
        if scale == "tanh":
            if features is None:
                raise ValueError("scale='tanh' needs `features` (channels or vector size)")
            shape = (features,) if isinstance(features, int) else tuple(features)
            self.scale_factor = nn.Parameter(torch.ones(shape))

    def map_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, t)``: the bounded log-scale and the shift."""
        h_s, t = h.chunk(2, dim=1)
        if self.scale == "sigmoid":
            return F.logsigmoid(h_s + 2.0), t
        c = self.scale_factor
        if h_s.ndim == 4 and c.ndim == 1:
            c = c.view(-1, 1, 1)
        return c * torch.tanh(h_s), t

    def transform(self, x_b: torch.Tensor, s: torch.Tensor, t: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        return x_b * torch.exp(s) + t, _sum_per_sample(s)

    def inverse_transform(self, y_b: torch.Tensor, s: torch.Tensor,
                          t: torch.Tensor) -> torch.Tensor:
        return (y_b - t) * torch.exp(-s)

# ----------------------------------------------------------------------------- scalings


class DiagonalScaling(Bijection):
    """NICE's last layer: ``y = x ⊙ exp(s)``, ``log|det| = Σ s`` (s learned, one per feature).

    With ``target_std`` set, the first forward pass in training mode initialises s from the
    data so that every output feature has that standard deviation (the base distribution's:
    π/√3 for the logistic prior); without it NICE spends its first thousands of steps growing
    s at the optimiser's pace. Whether that happened is the buffer ``initialized``.

    >>> import torch
    >>> layer = DiagonalScaling((3,))
    >>> _ = layer.log_scale.data.copy_(torch.tensor([0.5, -1.0, 2.0]))
    >>> layer(torch.ones(2, 3))[1].tolist()
    [1.5, 1.5]
    """

    def __init__(self, shape: int | Sequence[int], target_std: float | None = None):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.target_std = target_std
        self.register_buffer("initialized", torch.tensor(target_std is None))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set s so that the batch x leaves with standard deviation ``target_std`` per feature."""
        std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
        self.log_scale.data.copy_(math.log(self.target_std or 1.0) - torch.log(std))
        self.initialized.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the buffer existed were trained: treat them as initialised
        state_dict.setdefault(prefix + "initialized", torch.tensor(True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            self.initialize(x.detach())
        return x * torch.exp(self.log_scale), self.log_scale.sum().expand(x.shape[0]).to(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale)


class ActNorm(Bijection):
    """Glow's activation normalisation: ``y = (x + b) ⊙ exp(log_s)`` per channel;
    ``log|det| = h·w·Σ log_s`` for images (Σ log_s for vectors).

    Data-dependent initialisation: the first forward pass in training mode sets b and log_s
    so that that batch has zero mean and unit variance per channel. Whether that happened is
    the buffer ``initialized``, saved in the ``state_dict``: a reloaded model is never
    re-initialised.
    """

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))
        self.eps = eps

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, *[1] * (x.ndim - 2))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set b and log_s from the batch x: zero mean and unit variance per channel."""
        dims = [0, *range(2, x.ndim)]
        mean = x.mean(dim=dims)
        std = x.std(dim=dims, unbiased=False)
        self.bias.data.copy_(-mean)
        self.log_scale.data.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            self.initialize(x.detach())
        y = (x + self._view(self.bias, x)) * torch.exp(self._view(self.log_scale, x))
        pixels = math.prod(x.shape[2:])
        return y, (pixels * self.log_scale.sum()).expand(x.shape[0]).to(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self._view(self.log_scale, y)) - self._view(self.bias, y)


class InvertibleConv1x1(Bijection):
    """Glow's invertible 1×1 convolution in the LU parametrisation:
    ``W = P L (U + diag(sign(s)·exp(log|s|)))``, ``log|det| = h·w·Σ log|s|``.

    P (a random permutation), the signs of s and the triangular masks are buffers; L, U and
    log|s| are learned. W starts as a random rotation (as in Glow).
    """

    def __init__(self, channels: int, seed: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(w)
        s = upper.diagonal()
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(s.abs()).float())

    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight()
        y = F.conv2d(x, w.view(*w.shape, 1, 1))
        pixels = math.prod(x.shape[2:])
        return y, (pixels * self.log_s.sum()).expand(x.shape[0]).to(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inv = torch.linalg.inv(self.weight())
        return F.conv2d(y, w_inv.view(*w_inv.shape, 1, 1))


# ----------------------------------------------------------------------------- reshaping


class Squeeze(Bijection):
    """(C, H, W) → (4C, H/2, W/2): every 2×2 block of pixels becomes four channels."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs an even height and width, got {h}×{w}")
        y = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(n, 4 * c, h // 2, w // 2), x.new_zeros(n)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        n, c, h, w = y.shape
        x = y.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c // 4, 2 * h, 2 * w)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = shape
        return (4 * c, h // 2, w // 2)


class Reverse(Bijection):
    """Reverse the order of the features (channels for images); log|det| = 0."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flip(1), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.flip(1)


class Logit(Bijection):
    """RealNVP's preprocessing of data in [0, 1]: ``y = logit(α + (1 − 2α) x)``.

    ``log|det| = Σ [log(1 − 2α) − log u − log(1 − u)]`` with ``u = α + (1 − 2α) x``.
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(u) - torch.log1p(-u)
        ld = math.log(1 - 2 * self.alpha) - torch.log(u) - torch.log1p(-u)
        return y, _sum_per_sample(ld)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


class Shift(Bijection):
    """``y = x − shift`` (Glow centres data in [0, 1] at 0); log|det| = 0."""

    def __init__(self, shift: float = 0.5):
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x - self.shift, x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.shift


class Split(nn.Module):
    """Multi-scale split with a learned conditional prior (Dinh et al. 2017 §3.6; Glow).

    Half of the channels, ``z₂``, leave the flow; their prior is a location–scale family
    conditioned on the kept half: ``z₂ = μ(z₁) + σ(z₁) ⊙ ε`` with ε from the flow's base
    distribution. ``forward(x) → (z₁, ε, log|det ∂ε/∂z₂| = −Σ log σ)``, so the flow's
    ``encode`` returns ε, in the base distribution's own space. μ and log σ come from a
    zero-initialised convolution (the prior starts as the base distribution itself).
    """

    def __init__(self, channels: int, learned_prior: bool = True):
        super().__init__()
        if channels < 2:
            raise ValueError(f"Split needs at least 2 channels, got {channels}")
        self.kept = channels - channels // 2
        self.out = channels // 2
        self.prior = ZeroConv2d(self.kept, 2 * self.out) if learned_prior else None

    def _loc_scale(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prior is None:
            zero = z1.new_zeros(z1.shape[0], self.out, *z1.shape[2:])
            return zero, zero
        mu, log_sigma = self.prior(z1).chunk(2, dim=1)
        return mu, log_sigma

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z1, z2 = x[:, : self.kept], x[:, self.kept :]
        mu, log_sigma = self._loc_scale(z1)
        eps = (z2 - mu) * torch.exp(-log_sigma)
        return z1, eps, -_sum_per_sample(log_sigma)

    def inverse(self, z1: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        mu, log_sigma = self._loc_scale(z1)
        return torch.cat([z1, mu + torch.exp(log_sigma) * eps], dim=1)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.kept, *shape[1:])

    def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.out, *shape[1:])


# ----------------------------------------------------------------------------- bases


class StandardNormal(nn.Module):
    """Base distribution N(0, I): ``log_prob(z) = −½‖z‖² − (D/2) log 2π`` per sample."""

    name = "normal"

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        d = z[0].numel()
        return -0.5 * _sum_per_sample(z * z) - 0.5 * d * math.log(2 * math.pi)

    def sample(self, shape: Sequence[int], *, dtype=None, device=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=device, generator=generator)


class StandardLogistic(nn.Module):
    """Base distribution with independent standard logistic coordinates (NICE):
    ``log p(z) = −Σ [softplus(z) + softplus(−z)]``."""

    name = "logistic"

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -_sum_per_sample(F.softplus(z) + F.softplus(-z))

    def sample(self, shape: Sequence[int], *, dtype=None, device=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(*shape, dtype=dtype, device=device, generator=generator)
        fi = torch.finfo(u.dtype)
        u = u.clamp(fi.tiny, 1 - fi.eps)
        return torch.log(u) - torch.log1p(-u)
