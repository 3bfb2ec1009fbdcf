"""Coupling layouts: where a coupling layer's two parts live in its input, one class each.

A coupling (:class:`~manifoldlens.flows.layers.Coupling`) keeps one part ``x_a`` as it is and
transforms the other, ``x_b``, element-wise with parameters computed from ``x_a``. The
layout is the only place that knows how the two parts are laid out:

* ``split(x) → (x_a, x_b)``: the conditioning part and the transformed part;
* ``merge(x_a, y_b) → y``: the inverse of ``split``, with ``y_b`` in place of ``x_b``;
* ``restrict(h)``: a parameter computed from ``x_a`` (the network output, reshaped) as it
  applies to ``x_b`` — the identity, except for a masked layout, whose ``x_b`` is the whole
  input and whose parameters must leave the identity part's positions alone.

A new layout is one subclass of :class:`Layout`, passed to a coupling as ``split=``.

References
----------
.. [1] L. Dinh, D. Krueger, Y. Bengio, "NICE: Non-linear Independent Components Estimation",
   2014. arXiv:1410.8516 (alternating partitions, eq. 6).
.. [2] L. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP",
   ICLR 2017. arXiv:1605.08803 (checkerboard and channel-wise masks, §3.4).
.. [3] D. P. Kingma, P. Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
   NeurIPS 2018. arXiv:1807.03039 (split of the channels into halves).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "Layout",
    "MaskLayout",
    "AlternatingLayout",
    "ChannelLayout",
    "CheckerboardLayout",
    "LAYOUTS",
    "make_layout",
    "alternating_mask",
    "checkerboard_mask",
    "channel_mask",
]


# ----------------------------------------------------------------------------- masks


def alternating_mask(dim: int, parity: int = 0) -> torch.Tensor:
    """Vector mask (dim,) with ones on the indices i with ``i % 2 == parity`` (NICE)."""
    return (torch.arange(dim) % 2 == parity).float()


def checkerboard_mask(height: int, width: int, parity: int = 0) -> torch.Tensor:
    """Image mask (1, H, W): ones where ``(i + j) % 2 == parity`` (RealNVP)."""
    i = torch.arange(height).view(-1, 1)
    j = torch.arange(width).view(1, -1)
    return ((i + j) % 2 == parity).float().unsqueeze(0)


def channel_mask(channels: int, parity: int = 0) -> torch.Tensor:
    """Image mask (C, 1, 1): ones on the first half of the channels (parity 0) or the second."""
    m = (torch.arange(channels) < channels // 2).float()
    if parity:
        m = 1 - m
    return m.view(-1, 1, 1)


# ----------------------------------------------------------------------------- layouts


class Layout(nn.Module):
    """Base class: ``split(x) → (x_a, x_b)``, ``merge(x_a, x_b) → x``, ``restrict(h)``.

    A module so that any tensor it holds (a mask) follows the coupling's device and dtype;
    such tensors are non-persistent buffers, which the coupling saves under its own names.
    """

    #: the name a coupling's ``split=`` argument gives for this layout
    name = ""

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def merge(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def restrict(self, h: torch.Tensor) -> torch.Tensor:
        """A parameter of the map of ``x_b`` as it applies to ``x_b``: unchanged."""
        return h


class _ParityLayout(Layout):
    """A layout of two index classes; ``parity`` 1 swaps which one conditions."""

    def __init__(self, parity: int = 0):
        super().__init__()
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        self.parity = parity

    def _ordered(self, first: torch.Tensor, second: torch.Tensor):
        """``(first, second)`` as ``(x_a, x_b)`` for parity 0; swapped for parity 1 (and back:
        the swap is its own inverse)."""
        return (second, first) if self.parity else (first, second)

    def extra_repr(self) -> str:
        return f"parity={self.parity}"


class MaskLayout(Layout):
    """``x_a = m ⊙ x`` for a 0/1 ``mask`` m broadcastable to one sample; ``x_b`` is all of x
    and the parameters are zeroed where m is 1, so ``y = x`` there. The network maps the full
    (masked) input to full-size outputs, half of which are unused (NICE's and RealNVP's
    original layout, kept for their checkpoints)."""

    name = "mask"

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.clone(), persistent=False)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.mask.to(x), x

    def merge(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        return x_b

    def restrict(self, h: torch.Tensor) -> torch.Tensor:
        return (1 - self.mask.to(h)) * h

    def extra_repr(self) -> str:
        return f"mask_shape={tuple(self.mask.shape)}"


class AlternatingLayout(_ParityLayout):
    """Vectors (n, d): ``x_a`` the features with ``i % 2 == parity``, ``x_b`` the others, in
    order — the partition of :func:`alternating_mask` without the wasted half of a masked
    network's inputs and outputs: a network R^{⌈d/2⌉} → R^{⌊d/2⌋} or the reverse (NICE's
    m: R^{D/2} → R^{D/2}, Dinh et al. 2014 eq. 6)."""

    name = "alternating"

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 2:
            raise ValueError(f"an alternating split takes vectors (n, d), got {tuple(x.shape)}")
        return x[:, self.parity::2], x[:, 1 - self.parity::2]

    def merge(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        even, odd = self._ordered(x_a, x_b)
        n, m = x_a.shape[0], odd.shape[1]
        pairs = torch.stack([even[:, :m], odd], dim=2).reshape(n, 2 * m)
        return pairs if even.shape[1] == m else torch.cat([pairs, even[:, m:]], dim=1)


class ChannelLayout(_ParityLayout):
    """Images (or vectors) cut into their first and second half of channels; ``x_a`` is the
    first half (parity 0) or the second (parity 1), and the network sees only it (Glow) — half
    the compute of a channel mask."""

    name = "channel"

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._ordered(*x.chunk(2, dim=1))

    def merge(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._ordered(x_a, x_b), dim=1)


class CheckerboardLayout(_ParityLayout):
    """Images (n, C, H, W) cut into the two colours of a checkerboard, each gathered into a
    half-width image (n, C, H, W/2); ``x_a`` is the colour ``(i + j) % 2 == parity`` (the ones
    of :func:`checkerboard_mask`). The network runs at half resolution on the conditioning
    pixels only (as normflows does) instead of on a masked full image."""

    name = "checkerboard"

    @staticmethod
    def _odd_rows(h: int, device: torch.device) -> torch.Tensor:
        return (torch.arange(h, device=device) % 2 == 1).view(1, 1, h, 1)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = x.shape
        if w % 2:
            raise ValueError(f"a checkerboard split needs an even width, got {w}")
        pairs = x.reshape(n, c, h, w // 2, 2)
        odd = self._odd_rows(h, x.device)
        first, second = pairs[..., 0], pairs[..., 1]  # colour (i + j) % 2 == 0 is
        even_colour = torch.where(odd, second, first)  # at j = 2m on even rows, 2m+1 on odd
        odd_colour = torch.where(odd, first, second)
        return self._ordered(even_colour, odd_colour)

    def merge(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        even_colour, odd_colour = self._ordered(x_a, x_b)
        n, c, h, w2 = x_a.shape
        odd = self._odd_rows(h, x_a.device)
        first = torch.where(odd, odd_colour, even_colour)
        second = torch.where(odd, even_colour, odd_colour)
        return torch.stack([first, second], dim=-1).reshape(n, c, h, 2 * w2)


#: The layouts a coupling's ``split=`` argument names.
LAYOUTS: dict[str, type[Layout]] = {
    cls.name: cls for cls in (MaskLayout, ChannelLayout, CheckerboardLayout, AlternatingLayout)
}


def make_layout(split: str | Layout = "mask", mask: torch.Tensor | None = None,
                parity: int = 0) -> Layout:
    """The layout of a coupling's arguments: a :class:`Layout` as it is, or its name in
    :data:`LAYOUTS` with the ``mask`` (``"mask"`` only) or the ``parity`` (the others).

    >>> make_layout("channel", parity=1)
    ChannelLayout(parity=1)
    """
    if isinstance(split, Layout):
        if mask is not None:
            raise ValueError("a coupling given a Layout takes no separate mask")
        return split
    if split not in LAYOUTS:
        raise ValueError(f"split must be one of {', '.join(map(repr, LAYOUTS))}, got {split!r}")
    if split == "mask" and mask is None:
        raise ValueError("a mask coupling needs a mask")
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")
    if split == "mask":
        return MaskLayout(mask)
    if mask is not None:
        raise ValueError(f"a {split!r} split takes no mask (its parts are fixed by `parity`)")
    return LAYOUTS[split](parity)
