"""Flow models: NICE [1]_, RealNVP [2]_ and Glow [3]_, with exact likelihood.

Every model maps data x to a latent z in its base distribution's own space:
``model(x) → (z (n, D), log|det ∂z/∂x| (n,))`` and

    log p(x) = log p_Z(z) + log|det ∂z/∂x|                       (change of variables)

holds exactly — with multi-scale splits, z concatenates the standardized latents of every
scale, so the learned split priors are part of the map. ``decode(T · ε)`` with ε from the base
is sampling at temperature T.

The three classes are registered architectures (``"nice"``, ``"realnvp"``, ``"glow"``, with
:func:`~manifoldlens.models.register_architecture`), so their checkpoints load by name.

References
----------
[1]–[3]: NICE (Dinh et al. 2014), RealNVP (Dinh et al. 2017), Glow (Kingma & Dhariwal 2018),
cited in full in :mod:`manifoldlens.flows`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_batch, check_number, check_positive_int
from ..models import register_architecture
from .layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Bijection,
    DiagonalScaling,
    GlowCouplingNet,
    InvertibleConv1x1,
    Logit,
    ResNetCoupling,
    Shift,
    Split,
    Squeeze,
    StandardLogistic,
    StandardNormal,
    alternating_mask,
    mlp,
)

__all__ = ["Flow", "NICE", "RealNVP", "Glow", "Reshape", "BASES"]

BASES = {"normal": StandardNormal, "logistic": StandardLogistic}


class Reshape(Bijection):
    """Reshape each sample from ``in_shape`` to ``out_shape``; log|det| = 0."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        if math.prod(self.in_shape) != math.prod(self.out_shape):
            raise ValueError(f"cannot reshape {self.in_shape} to {self.out_shape}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.reshape(x.shape[0], *self.out_shape), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(y.shape[0], *self.in_shape)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.out_shape


def _base(name: str) -> nn.Module:
    if name not in BASES:
        raise ValueError(f"unknown base distribution {name!r}; known: {sorted(BASES)}")
    return BASES[name]()


class Flow(nn.Module):
    """A normalizing flow: a sequence of bijections and multi-scale splits over a base.

    Parameters
    ----------
    shape : one sample's shape, e.g. ``(2,)`` or ``(1, 28, 28)``.
    steps : :class:`~manifoldlens.flows.layers.Bijection` and
        :class:`~manifoldlens.flows.layers.Split` modules, applied in order from data to latent.
    base : ``"normal"`` or ``"logistic"``.
    domain : ``(lo, hi)`` that inputs must lie in (e.g. ``(0, 1)`` for images), or None.
    open_domain : the bounds themselves are excluded (a logit preprocessing maps them to ±∞).
    """

    def __init__(self, shape: Sequence[int], steps: Sequence[nn.Module], base: str = "normal",
                 domain: tuple[float, float] | None = None, open_domain: bool = False):
        super().__init__()
        self.open_domain = open_domain
        self.shape = tuple(int(s) for s in shape)
        self.steps = nn.ModuleList(steps)
        self.base = _base(base)
        self.domain = domain
        cur = self.shape
        self._latent_shapes: list[tuple[int, ...]] = []
        for step in self.steps:
            if isinstance(step, Split):
                self._latent_shapes.append(step.latent_shape(cur))
            cur = step.output_shape(cur)
        self._latent_shapes.append(cur)
        self.dim = math.prod(self.shape)
        assert sum(math.prod(s) for s in self._latent_shapes) == self.dim

    # ------------------------------------------------------------------ maps

    def _check(self, x: torch.Tensor, name: str = "x") -> None:
        check_batch(x, name)
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"{name} must be shaped (n, {', '.join(map(str, self.shape))}) for this flow, "
                f"got {tuple(x.shape)}"
            )
        if self.domain is not None:
            lo, hi = self.domain
            xmin, xmax = float(x.detach().min()), float(x.detach().max())
            outside = (xmin <= lo or xmax >= hi) if self.open_domain else (xmin < lo or xmax > hi)
            if outside:
                raise ValueError(
                    f"{name} must lie in [{lo}, {hi}] (this flow models data scaled to that "
                    f"box), got values in [{xmin:.4g}, {xmax:.4g}]"
                )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z (n, D), log|det ∂z/∂x| (n,))``: the latent in the base's space."""
        self._check(x)
        h, logdet, parts = x, x.new_zeros(x.shape[0]), []
        for step in self.steps:
            if isinstance(step, Split):
                h, eps, ld = step(h)
                parts.append(eps.reshape(x.shape[0], -1))
            else:
                h, ld = step(h)
            logdet = logdet + ld
        parts.append(h.reshape(x.shape[0], -1))
        return torch.cat(parts, 1), logdet

    def latent_scales(self) -> list[slice]:
        """Where each scale's latent lies in z (n, D), in the order of :meth:`encode`: those
        that leave at the multi-scale splits first (finest), the output of the last step
        (coarsest) last. One slice, all of z, for a flow without splits.

        >>> Glow((1, 8, 8), levels=2, depth=1, hidden_channels=4).latent_scales()
        [slice(0, 32, None), slice(32, 64, None)]
        """
        ends = list(itertools.accumulate(math.prod(s) for s in self._latent_shapes))
        return [slice(a, b) for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent z (n, D) of x: all scales concatenated, standardized by their priors."""
        return self(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode`: z (n, D) → x (n, *shape)."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must be shaped (n, {self.dim}), got {tuple(z.shape)}")
        n = z.shape[0]
        sizes = [math.prod(s) for s in self._latent_shapes]
        pieces = list(z.split(sizes, dim=1))
        h = pieces.pop().reshape(n, *self._latent_shapes[-1])
        k = len(pieces)
        for step in reversed(self.steps):
            if isinstance(step, Split):
                k -= 1
                h = step.inverse(h, pieces[k].reshape(n, *self._latent_shapes[k]))
            else:
                h = step.inverse(h)
        return h

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x) = log p_Z(z) + log|det ∂z/∂x|`` (lecture slides, change of variables)."""
        z, logdet = self(x)
        return self.base.log_prob(z) + logdet

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples at ``temperature``: ``decode(T · ε)``, ε from the base distribution."""
        check_positive_int(n, "n")
        check_number(temperature, "temperature", low=0.0, strict=True)
        p = next(self.parameters())
        device = generator.device if generator is not None else p.device
        eps = self.base.sample((n, self.dim), dtype=p.dtype, device=device, generator=generator)
        return self.decode(temperature * eps.to(p.device))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, base={self.base.name}"


def _positive(**sizes: int) -> None:
    """Every layer count and width a positive integer (checked before anything is built)."""
    for name, value in sizes.items():
        check_positive_int(value, name)


# ----------------------------------------------------------------------------- NICE


@register_architecture("nice")
class NICE(Flow):
    """NICE (Dinh et al. 2014): additive couplings, a diagonal scaling, a logistic prior.

    The defaults are the paper's MNIST set-up: 4 coupling layers with alternating partitions,
    each a ReLU MLP of ``depth = 5`` hidden layers of ``hidden = 1000`` units. Images are
    flattened. ``domain=(lo, hi)`` makes inputs outside that box an error.

    Examples
    --------
    >>> import torch
    >>> flow = NICE((2,), couplings=4, hidden=16, depth=2, domain=None).double()
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> bool(torch.allclose(flow.decode(flow.encode(x)), x))
    True
    """

    def __init__(self, shape: Sequence[int], couplings: int = 4, hidden: int = 1000,
                 depth: int = 5, base: str = "logistic",
                 domain: Sequence[float] | None = None, split: str = "alternating"):
        _positive(couplings=couplings, hidden=hidden, depth=depth)
        shape = tuple(int(s) for s in shape)
        d = math.prod(shape)
        if d < 2:
            raise ValueError(f"NICE needs at least 2 features, got shape {shape}")
        if split not in ("alternating", "mask"):
            raise ValueError(f"split must be 'alternating' or 'mask', got {split!r}")
        steps: list[nn.Module] = []
        if len(shape) != 1:
            steps.append(Reshape(shape, (d,)))
        for k in range(couplings):
            p = k % 2
            if split == "alternating":  # m: R^{D/2} → R^{D/2} on the two index classes
                cond = len(range(p, d, 2))
                steps.append(AdditiveCoupling(mlp(cond, d - cond, hidden, depth),
                                              split="alternating", parity=p))
            else:  # a masked network R^D → R^D (the layout of NICE checkpoints before 0.2)
                steps.append(AdditiveCoupling(mlp(d, d, hidden, depth), alternating_mask(d, p)))
        # initialised from data so the outputs start with the prior's spread (π/√3 logistic)
        steps.append(DiagonalScaling((d,), target_std=math.pi / math.sqrt(3)
                                     if base == "logistic" else 1.0))
        super().__init__(shape, steps, base, tuple(domain) if domain is not None else None)
        self.spec = {"arch": "nice", "shape": list(shape), "couplings": couplings,
                     "hidden": hidden, "depth": depth, "base": base,
                     "domain": list(domain) if domain is not None else None, "split": split}

    @staticmethod
    def upgrade_spec(spec: dict) -> dict:
        """Checkpoints of version 0.1 have no ``split``: their couplings were masked R^D → R^D
        networks."""
        spec.setdefault("split", "mask")
        return spec


# ----------------------------------------------------------------------------- RealNVP


@register_architecture("realnvp")
class RealNVP(Flow):
    """RealNVP (Dinh et al. 2017): affine couplings with a bounded scale.

    Vectors (``shape = (d,)``): ``couplings`` affine couplings with alternating masks, each an
    MLP (``depth`` hidden layers of ``hidden`` units). Images ``(C, H, W)``: the logit
    preprocessing ``logit(α + (1 − 2α)x)``, then ``scales`` scales; each but the last is 3
    checkerboard couplings, a squeeze, 3 channel-wise couplings and a split of half the
    channels with a learned conditional prior; the last is 4 checkerboard couplings. The
    coupling networks are ResNets of ``blocks`` residual blocks with ``hidden_channels``.

    Examples
    --------
    >>> import torch
    >>> flow = RealNVP((1, 4, 4), scales=2, hidden_channels=8, blocks=1).double()
    >>> x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    >>> flow.encode(x).shape
    torch.Size([3, 16])
    """

    def __init__(self, shape: Sequence[int], couplings: int = 8, hidden: int = 256,
                 depth: int = 2, scales: int = 2, hidden_channels: int = 64, blocks: int = 4,
                 alpha: float = 0.05, base: str = "normal"):
        _positive(couplings=couplings, hidden=hidden, depth=depth, scales=scales,
                  hidden_channels=hidden_channels, blocks=blocks)
        shape = tuple(int(s) for s in shape)
        steps: list[nn.Module] = []
        if len(shape) == 1:
            d = shape[0]
            if d < 2:
                raise ValueError(f"RealNVP needs at least 2 features, got shape {shape}")
            for k in range(couplings):
                steps.append(AffineCoupling(mlp(d, 2 * d, hidden, depth),
                                            alternating_mask(d, k % 2), features=d))
            domain = None
        elif len(shape) == 3:
            c, h, w = shape
            for _ in range(scales - 1):
                if h % 2 or w % 2:
                    raise ValueError(
                        f"RealNVP with {scales} scales needs an image side divisible by "
                        f"2**{scales - 1}; got {shape[1:]}, use fewer scales"
                    )
                steps += self._checkerboard(c, h, w, 3, hidden_channels, blocks)
                steps.append(Squeeze())
                c, h, w = 4 * c, h // 2, w // 2
                for k in range(3):
                    steps.append(AffineCoupling(
                        ResNetCoupling(c // 2, c, hidden_channels, blocks, False),
                        split="channel", parity=k % 2, features=c // 2))
                split = Split(c)
                steps.append(split)
                c = split.kept
            steps += self._checkerboard(c, h, w, 4, hidden_channels, blocks)
            steps.insert(0, Logit(alpha))
            margin = alpha / (1 - 2 * alpha)  # where α + (1 − 2α)x stays in (0, 1)
            domain = (-margin, 1.0 + margin)
        else:
            raise ValueError(f"RealNVP takes vectors (d,) or images (C, H, W), got shape {shape}")
        super().__init__(shape, steps, base, domain, open_domain=domain is not None)
        self.spec = {"arch": "realnvp", "shape": list(shape), "couplings": couplings,
                     "hidden": hidden, "depth": depth, "scales": scales,
                     "hidden_channels": hidden_channels, "blocks": blocks, "alpha": alpha,
                     "base": base}

    @staticmethod
    def _checkerboard(c, h, w, count, hidden_channels, blocks) -> list[nn.Module]:
        if w % 2:
            raise ValueError(f"RealNVP's checkerboard couplings need an even width, got {w}")
        return [AffineCoupling(ResNetCoupling(c, 2 * c, hidden_channels, blocks, False),
                               split="checkerboard", parity=k % 2, features=c)
                for k in range(count)]


# ----------------------------------------------------------------------------- Glow


@register_architecture("glow")
class Glow(Flow):
    """Glow (Kingma & Dhariwal 2018): ``levels`` levels of squeeze → ``depth`` steps of
    (ActNorm → invertible 1×1 convolution (LU) → affine coupling) → split with a learned
    prior (no split after the last level). Data in [0, 1] are centred (``x − ½``) first;
    the density is defined on all of R^D (samples may leave [0, 1]).

    Examples
    --------
    >>> import torch
    >>> flow = Glow((1, 4, 4), levels=2, depth=2, hidden_channels=8).double()
    >>> x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    >>> bool(torch.allclose(flow.decode(flow.encode(x)), x))
    True
    """

    def __init__(self, shape: Sequence[int], levels: int = 3, depth: int = 32,
                 hidden_channels: int = 512, base: str = "normal", seed: int = 0):
        _positive(levels=levels, depth=depth, hidden_channels=hidden_channels)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ValueError(f"Glow takes images (C, H, W), got shape {shape}")
        c, h, w = shape
        steps: list[nn.Module] = [Shift(0.5)]
        for level in range(levels):
            if h % 2 or w % 2:
                raise ValueError(
                    f"Glow with {levels} levels needs an image side divisible by 2**{levels}; "
                    f"got {shape[1:]}, use fewer levels"
                )
            steps.append(Squeeze())
            c, h, w = 4 * c, h // 2, w // 2
            for k in range(depth):
                steps += [
                    ActNorm(c),
                    InvertibleConv1x1(c, seed=seed + 1000 * level + k),
                    AffineCoupling(GlowCouplingNet(c // 2, 2 * (c - c // 2), hidden_channels),
                                   split="channel", scale="sigmoid"),
                ]
            if level < levels - 1:
                split = Split(c)
                steps.append(split)
                c = split.kept
        super().__init__(shape, steps, base)
        self.spec = {"arch": "glow", "shape": list(shape), "levels": levels, "depth": depth,
                     "hidden_channels": hidden_channels, "base": base, "seed": seed}


# ----------------------------------------------------------------------------- helpers


@torch.no_grad()
def initialize(model: nn.Module, x: torch.Tensor) -> int:
    """Data-dependent initialisation of every uninitialised :class:`ActNorm` (and NICE's
    :class:`DiagonalScaling`) from the batch x
    (one forward pass in training mode). Returns how many layers were initialised; layers
    already initialised (e.g. loaded from a checkpoint) are left alone."""
    todo = [m for m in model.modules() if isinstance(m, (ActNorm, DiagonalScaling))
            and not bool(m.initialized)]
    if todo:
        was = model.training
        model.train()
        model(x)
        model.train(was)
    return len(todo)


@torch.no_grad()
def interpolate(model: Flow, x0: torch.Tensor, x1: torch.Tensor, steps: int = 8,
                method: str = "linear") -> torch.Tensor:
    """Decode points on the latent segment between ``encode(x0)`` and ``encode(x1)``
    (lecture slides, latent interpolation): returns (n, steps, *shape), endpoints included.

    ``method="slerp"`` follows the great circle instead, which keeps the latent norm (and so
    the sample "typicality") roughly constant for Gaussian bases.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if method not in ("linear", "slerp"):
        raise ValueError(f"method must be 'linear' or 'slerp', got {method!r}")
    z0, z1 = model.encode(x0), model.encode(x1)
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device).view(1, -1, 1)
    a, b = z0.unsqueeze(1), z1.unsqueeze(1)
    if method == "linear":
        z = (1 - t) * a + t * b
    else:
        cos = torch.nn.functional.cosine_similarity(z0, z1, dim=1).clamp(-1, 1)
        omega = torch.arccos(cos).view(-1, 1, 1)
        so = torch.sin(omega)
        small = so.abs() < 1e-6
        wa = torch.where(small, 1 - t, torch.sin((1 - t) * omega) / so.where(~small, 1))
        wb = torch.where(small, t, torch.sin(t * omega) / so.where(~small, 1))
        z = wa * a + wb * b
    n = z0.shape[0]
    return model.decode(z.reshape(n * steps, -1)).reshape(n, steps, *x0.shape[1:])
