"""Training throughput and peak memory of our normalizing flows against ``normflows``.

Usage::

    .venv/bin/python bench/flows.py [--quick] [--threads N] [--repeats R] [--steps S]
                                    [--budget-s S] [--test-n N] [--device D]

Needs the ``bench`` extra (``pip install -c constraints.txt -e '.[bench]'``, i.e.
``normflows==1.7.3``). Prints ONE JSON object on stdout; progress goes to stderr. Data:
Fashion-MNIST train images (1×28×28, float32, on ``--device``, default CPU), dequantized
``(k + u) / 256`` with a fixed generator; every model is trained on the same batches with
the same loss (bits/dim,
``(−log p(y) + D ln 256) / (D ln 2)``, through :func:`manifoldlens.flows.bits_per_dim` for
both libraries), Adam (lr 1e-3), batch 64. Models: ours Glow / RealNVP (image, multi-scale)
/ NICE, and ``normflows`` Glow, RealNVP and NICE assembled from its own pieces
at the same size (``nf.MultiscaleFlow`` of ``GlowBlock`` / ``AffineCouplingBlock``,
``Squeeze``, ``Merge``, ``GlowBase`` priors); the JSON holds every parameter count and a
structure check (at initialisation, with the 1×1 convolutions and ActNorms copied across,
the two Glows give the same log-density).

1. ``memory``: peak RSS of training, one fresh child process per model (run first, while
   this process is small): after a toy training step (torch's one-time costs), VmHWM is reset
   to the current RSS; then the model, Adam, ActNorm init and ``--memory-steps`` training
   steps; the JSON has the peak over the RSS before the model and over the RSS once the
   model is built and initialised.
2. ``throughput``: ``--steps`` full training steps (forward, backward, Adam step) per timing,
   images/s; models timed round-robin (one timing of each per round, order rotated every
   round, one warm-up round) so that a noisy, shared machine slows them alike; median and min
   per model and ratios ours / normflows of throughput (ratio of medians, of the fastest
   rounds, and the median of the per-round ratios, which pairs timings taken close together).
3. ``budget`` (``--budget-s S`` > 0): each model, freshly built, trains for S seconds of wall
   clock (in ``--repeats`` slices, round-robin like the timings) on shuffled batches, then the
   mean test bits/dim on the first ``--test-n`` test images (dequantized with a fixed
   generator) is reported.

On a machine shared with other work, use fewer ``--threads`` than idle cores: OpenMP threads
that share a core with another process slow every op by orders of magnitude (``meta`` then
carries a ``busy_warning``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import _common as common
from _common import log, ratio, round_robin, stats
from manifoldlens import flows
from manifoldlens.data import load_dataset

try:
    import normflows as nf
except ImportError:  # pragma: no cover - reported by main()
    nf = None

SEED = 0
SHAPE = (1, 28, 28)
DIM = math.prod(SHAPE)
N_BINS = 256
LR = 1e-3
#: Where models and batches live (``--device``).
DEVICE = torch.device("cpu")
DATASET = "fashion-mnist"
MODELS = ("ours_glow", "normflows_glow", "ours_realnvp", "normflows_realnvp", "ours_nice",
          "normflows_nice")
PAIRS = {"glow": ("ours_glow", "normflows_glow"), "realnvp": ("ours_realnvp", "normflows_realnvp"),
         "nice": ("ours_nice", "normflows_nice")}


# --------------------------------------------------------------------------------------
# Helpers (shared ones in bench/_common.py)
# --------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class NormflowsDensity(nn.Module):
    """``log_prob(x)`` (n,) of an unconditional ``nf.MultiscaleFlow``, so that
    :func:`manifoldlens.flows.bits_per_dim` scores both libraries with the same code."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(x, None)


def normflows_glow(levels: int, depth: int, hidden: int) -> nn.Module:
    """Glow of ``levels`` levels × ``depth`` GlowBlocks, as normflows' own Glow example builds
    it (``examples/glow_colab.ipynb``: ``GlowBlock(c * 2 ** (L + 1 - i))``, a Squeeze per
    level, Merge between levels), for one-channel 28×28 images and unconditional priors.

    ``MultiscaleFlow`` lists levels from the coarsest (index 0, the deepest latent) to the
    finest (index L−1, the data side), each level's flows in the generative direction
    (latent → data); ``log_prob`` runs them backwards. So, in the data direction, level L−1
    is: ``Squeeze.inverse`` (C, H, W) → (4C, H/2, W/2), then ``depth`` × GlowBlock.inverse
    (ActNorm → LU 1×1 conv → affine coupling, sigmoid scale, 3×3 → 1×1 → zero 3×3 conv
    net on the first half of the channels), then ``Merge.inverse`` splits off the second half
    of the channels, scored by ``q0[L−1]``; and so on down to level 0, whose output is scored
    by ``q0[0]``. Priors: ``GlowBase`` (a learned mean and log-scale per channel).
    """
    c, h, w = SHAPE
    q0, level_flows, merges = [], [], []
    for i in range(levels):  # i = 0: coarsest level
        # channels entering level i (data direction), before its squeeze
        c_in = c * 2 ** (levels - 1 - i)
        c_sq = 4 * c_in
        side_h, side_w = h // 2 ** (levels - i), w // 2 ** (levels - i)
        blocks = [
            nf.flows.GlowBlock(c_sq, hidden, scale=True, scale_map="sigmoid",
                               split_mode="channel", leaky=0.0, init_zeros=True, use_lu=True)
            for _ in range(depth)
        ]
        level_flows.append([*blocks, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (c_sq // 2, side_h, side_w)  # the half split off at this level
        else:
            latent = (c_sq, side_h, side_w)
        q0.append(nf.distributions.GlowBase(latent))
    return nf.MultiscaleFlow(q0, level_flows, merges, class_cond=False)


def _nf_resnet(in_ch: int, out_ch: int, hidden: int, blocks: int) -> nn.Module:
    net = nf.nets.ConvResidualNet(in_ch, out_ch, hidden, num_blocks=blocks)
    # zero-initialised last layer, as ours (and RealNVP practice): couplings start at the
    # identity; normflows leaves its final 1×1 conv at PyTorch's default init
    nn.init.zeros_(net.final_layer.weight)
    nn.init.zeros_(net.final_layer.bias)
    return net


def normflows_realnvp(hidden: int, blocks: int, alpha: float) -> nn.Module:
    """RealNVP with two scales from normflows' pieces, mirroring ``flows.RealNVP`` on 1×28×28:
    ``nf.transforms.Logit(alpha)``; scale 1: 3 checkerboard couplings (alternating), squeeze,
    3 channel couplings (alternating), split of half the channels; scale 2: 4 checkerboard
    couplings. Each coupling is ``nf.flows.AffineCouplingBlock(net, scale=True,
    scale_map="exp")`` with ``net = nf.nets.ConvResidualNet(·, ·, hidden, num_blocks=blocks)``
    producing shift and log-scale. Priors: ``GlowBase`` for the split-off half and the top.
    """
    c, h, w = SHAPE

    def checker(ch: int, k: int) -> nn.Module:
        mode = "checkerboard" if k % 2 == 0 else "checkerboard_inv"
        return nf.flows.AffineCouplingBlock(_nf_resnet(ch, 2 * ch, hidden, blocks),
                                            scale=True, scale_map="exp", split_mode=mode)

    def channel(ch: int, k: int) -> nn.Module:
        mode = "channel" if k % 2 == 0 else "channel_inv"
        return nf.flows.AffineCouplingBlock(
            _nf_resnet(ch // 2, 2 * (ch - ch // 2), hidden, blocks),
            scale=True, scale_map="exp", split_mode=mode)

    # data direction, scale 1 (finest): 3 checkerboard, squeeze, 3 channel, then the split
    fine = [checker(c, k) for k in range(3)] + [nf.flows.Squeeze()]
    fine += [channel(4 * c, k) for k in range(3)]
    kept = 2 * c
    coarse = [checker(kept, k) for k in range(4)]
    q0 = [nf.distributions.GlowBase((kept, h // 2, w // 2)),
          nf.distributions.GlowBase((4 * c - kept, h // 2, w // 2))]
    # MultiscaleFlow wants the generative order: coarsest level first, each list reversed
    return nf.MultiscaleFlow(q0, [coarse[::-1], fine[::-1]], [nf.flows.Merge()],
                             transform=nf.transforms.Logit(alpha), class_cond=False)


class NormflowsFlat(nn.Module):
    """``log_prob(x)`` (n,) of an ``nf.NormalizingFlow`` over flattened images (NICE)."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(x.reshape(x.shape[0], -1))


def normflows_nice(hidden: int, depth: int) -> nn.Module:
    """NICE from normflows' pieces, the paper's MNIST set-up as ``flows.NICE``: 4 additive
    couplings with alternating masks (``nf.flows.MaskedAffineFlow(b, t=MLP)`` without a scale
    net is NICE's additive coupling), each a ReLU ``nf.nets.MLP`` of ``depth`` hidden layers
    of ``hidden`` units with a zero-initialised last layer, then NICE's diagonal scaling
    (``nf.flows.AffineConstFlow(shape, shift=False)``). normflows has no logistic base, so
    its prior is ``nf.distributions.DiagGaussian(D, trainable=False)`` (ours: the paper's
    logistic); the prior costs O(D) of a step dominated by 4 × 6 dense layers.
    ``NormalizingFlow`` lists flows in the generative order; ``log_prob`` runs them backwards.
    """
    steps: list[nn.Module] = []
    for k in range(4):  # conditioning on the indices i % 2 == k % 2, as flows.NICE
        mask = (torch.arange(DIM) % 2 == k % 2).float()
        net = nf.nets.MLP([DIM, *[hidden] * depth, DIM], init_zeros=True)
        steps.append(nf.flows.MaskedAffineFlow(mask, t=net))
    steps.append(nf.flows.AffineConstFlow((DIM,), shift=False))
    q0 = nf.distributions.DiagGaussian(DIM, trainable=False)
    return nf.NormalizingFlow(q0, steps[::-1])


def build_model(name: str, cfg: dict) -> nn.Module:
    """A fresh model with ``log_prob(x)`` (n,), seeded (normflows draws its 1×1 convolutions
    from the global generator), on :data:`DEVICE`."""
    return _build_model(name, cfg).to(DEVICE)


def _build_model(name: str, cfg: dict) -> nn.Module:
    torch.manual_seed(SEED)
    if name == "ours_glow":
        return flows.Glow(SHAPE, levels=cfg["levels"], depth=cfg["depth"],
                          hidden_channels=cfg["hidden"], seed=SEED)
    if name == "ours_realnvp":
        return flows.RealNVP(SHAPE, scales=2, hidden_channels=cfg["realnvp_hidden"],
                             blocks=cfg["realnvp_blocks"], alpha=cfg["alpha"])
    if name == "ours_nice":
        return flows.NICE(SHAPE, couplings=4, hidden=cfg["nice_hidden"],
                          depth=cfg["nice_depth"])
    if nf is None:
        raise SystemExit("normflows is not installed: pip install -c constraints.txt "
                         "-e '.[bench]' (normflows==1.7.3)")
    with warnings.catch_warnings():  # Invertible1x1Conv calls the deprecated Tensor.lu
        warnings.filterwarnings("ignore", message=r".*torch\.lu is deprecated")
        if name == "normflows_glow":
            return NormflowsDensity(normflows_glow(cfg["levels"], cfg["depth"], cfg["hidden"]))
        if name == "normflows_realnvp":
            return NormflowsDensity(normflows_realnvp(cfg["realnvp_hidden"],
                                                      cfg["realnvp_blocks"], cfg["alpha"]))
        if name == "normflows_nice":
            return NormflowsFlat(normflows_nice(cfg["nice_hidden"], cfg["nice_depth"]))
    raise ValueError(f"unknown model {name!r}; known: {MODELS}")


@torch.no_grad()
def init_model(model: nn.Module, x: torch.Tensor) -> None:
    """ActNorm data-dependent initialisation on the batch x (ours: flows.initialize; normflows
    initialises every ActNorm on the first log_prob call)."""
    if isinstance(model, (NormflowsDensity, NormflowsFlat)):
        model.log_prob(x)
    else:
        flows.initialize(model, x)


def bpd_loss(model: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return flows.bits_per_dim(model, y, N_BINS, dequantize_input=False,
                              differentiable=True).mean()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, y: torch.Tensor) -> float:
    loss = bpd_loss(model, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def test_bpd(model: nn.Module, y: torch.Tensor, chunk: int = 500) -> float:
    was = model.training
    model.eval()
    out = torch.cat([flows.bits_per_dim(model, y[i:i + chunk], N_BINS, dequantize_input=False)
                     for i in range(0, y.shape[0], chunk)])
    model.train(was)
    return float(out.mean())


def describe(name: str, cfg: dict) -> str:
    lv, k, hc = cfg["levels"], cfg["depth"], cfg["hidden"]
    rh, rb, a = cfg["realnvp_hidden"], cfg["realnvp_blocks"], cfg["alpha"]
    return {
        "ours_glow": f"flows.Glow((1, 28, 28), levels={lv}, depth={k}, hidden_channels={hc})",
        "normflows_glow": f"nf.MultiscaleFlow: {lv} levels x {k} nf.flows.GlowBlock(C, {hc}, "
        "scale=True, scale_map='sigmoid', split_mode='channel', use_lu=True) + nf.flows."
        "Squeeze(), nf.flows.Merge() between levels, nf.distributions.GlowBase priors",
        "ours_realnvp": f"flows.RealNVP((1, 28, 28), scales=2, hidden_channels={rh}, "
        f"blocks={rb}, alpha={a})",
        "normflows_realnvp": f"nf.MultiscaleFlow(transform=nf.transforms.Logit({a})): "
        "[3 checkerboard, Squeeze, 3 channel] + Merge + [4 checkerboard] nf.flows."
        f"AffineCouplingBlock(nf.nets.ConvResidualNet(., ., {rh}, num_blocks={rb}), "
        "scale_map='exp'), nf.distributions.GlowBase priors",
        "ours_nice": f"flows.NICE((1, 28, 28), couplings=4, hidden={cfg['nice_hidden']}, "
        f"depth={cfg['nice_depth']})",
        "normflows_nice": "nf.NormalizingFlow(DiagGaussian(784)): 4 x nf.flows.MaskedAffineFlow("
        f"alternating mask, t=nf.nets.MLP([784] + [{cfg['nice_hidden']}] * "
        f"{cfg['nice_depth']} + [784], init_zeros=True)) + nf.flows.AffineConstFlow(784, "
        "shift=False)",
    }[name]


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def train_images(n: int | None = None) -> torch.Tensor:
    images = load_dataset(DATASET, split="train").images
    return images if n is None else images[:n].clone()


def dequantized_batches(images: torch.Tensor, batch: int, count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [flows.dequantize(images[i * batch:(i + 1) * batch], N_BINS, generator=g).to(DEVICE)
            for i in range(count)]


class BatchStream:
    """Shuffled, dequantized training batches; the same seed gives the same sequence."""

    def __init__(self, images: torch.Tensor, batch: int, seed: int):
        self.images, self.batch = images, batch
        self.g = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(len(images), generator=self.g), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = torch.randperm(len(self.images), generator=self.g), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return flows.dequantize(self.images[idx], N_BINS, generator=self.g).to(DEVICE)


# --------------------------------------------------------------------------------------
# Structure check: at init, with the 1×1 convs copied, the two Glows are the same map
# --------------------------------------------------------------------------------------


@torch.no_grad()
def log_p_agreement(ours: nn.Module, theirs: nn.Module, y: torch.Tensor,
                    with_bpd: bool = False) -> dict[str, object]:
    """How far apart the two models' log p(y) are; they ``agree`` within 1e-4 relative."""
    lp_ours, lp_nf = ours.log_prob(y), theirs.log_prob(y)
    diff = float((lp_ours - lp_nf).abs().max())
    scale = float(lp_ours.abs().max())
    out: dict[str, object] = {
        "max_abs_diff_log_p": float(f"{diff:.3g}"),
        "max_abs_log_p": float(f"{scale:.4g}"),
    }
    if with_bpd:
        out["max_abs_diff_bpd"] = float(f"{diff / (DIM * math.log(2)):.3g}")
    out["agree"] = diff <= 1e-4 * max(1.0, scale)
    return out


@torch.no_grad()
def glow_structure_check(cfg: dict, y: torch.Tensor) -> dict:
    ours = build_model("ours_glow", cfg)
    theirs = build_model("normflows_glow", cfg)
    ours_steps = [m for m in ours.modules()
                  if isinstance(m, (flows.ActNorm, flows.InvertibleConv1x1))]
    nf_steps = []  # normflows' in data-direction order: its generative order undone
    for level in reversed(theirs.flow.flows):
        for block in reversed(level):
            if isinstance(block, nf.flows.GlowBlock):
                nf_steps += [m for m in reversed(block.flows)
                             if isinstance(m, (nf.flows.ActNorm, nf.flows.Invertible1x1Conv))]
    assert len(ours_steps) == len(nf_steps)
    pairs = list(zip(ours_steps, nf_steps, strict=True))
    for a, b in pairs:  # 1x1 convs first, so that both ActNorm inits see the same data
        if isinstance(a, flows.InvertibleConv1x1):
            assert isinstance(b, nf.flows.Invertible1x1Conv)
            b.P.copy_(a.perm)
            b.L.copy_(a.lower)
            b.U.copy_(a.upper)
            b.log_S.copy_(a.log_s)
            b.sign_S.copy_(a.sign_s)
    init_model(ours, y)
    init_model(theirs, y)
    actnorm_diff, first = 0.0, True
    for a, b in pairs:
        if isinstance(a, flows.ActNorm):
            assert isinstance(b, nf.flows.ActNorm)
            # ours (x + bias) * exp(log_scale); normflows' inverse (x - t) * exp(-s); ours
            # sees x - 0.5 in its first ActNorm (flows.Shift), normflows x itself
            t = -a.bias + (0.5 if first else 0.0)
            first = False
            actnorm_diff = max(actnorm_diff,
                               float((b.t.flatten() - t).abs().max()),
                               float((b.s.flatten() + a.log_scale).abs().max()))
            b.t.copy_(t.view_as(b.t))
            b.s.copy_(-a.log_scale.view_as(b.s))
    return {
        "what": "fresh ours_glow and normflows_glow; the LU factors of every 1x1 conv copied "
        "from ours into normflows (data-direction order), ActNorms initialised on the same "
        "batch, then their parameters copied from ours too; at init both couplings are "
        "x_b * sigmoid(2) (zero last conv) and every prior is N(0, I), so log p(y) must "
        "agree to float32 rounding if levels, squeezes, splits, block order and channel "
        "halves are wired alike",
        "actnorm_init_max_abs_diff": float(f"{actnorm_diff:.3g}"),
        "actnorm_init_note": "before the copy: normflows' data-dependent init uses the "
        "unbiased std (N-1), ours the biased one (N), a relative 1/(2N) difference in scale",
        "batch": int(y.shape[0]),
        **log_p_agreement(ours, theirs, y, with_bpd=True),
    }


@torch.no_grad()
def realnvp_init_check(cfg: dict, y: torch.Tensor) -> dict:
    ours = build_model("ours_realnvp", cfg)
    theirs = build_model("normflows_realnvp", cfg)
    return {
        "what": "fresh ours_realnvp and normflows_realnvp: every coupling starts at the identity "
        "(zero-init output layers) and every prior at N(0, I), so both are Logit(alpha) + "
        "N(0, I) and log p(y) must agree; a weak check (it tests the Logit formula and that "
        "all D dimensions are scored once), not of the coupling wiring",
        **log_p_agreement(ours, theirs, y),
    }


@torch.no_grad()
def nice_structure_check(cfg: dict, y: torch.Tensor) -> dict:
    """Same map, checked: ours' couplings are NICE's m: R^{D/2} → R^{D/2}; normflows' masked
    R^D → R^D networks reproduce them exactly when their first layer reads only the
    conditioning features and their last writes only the others. normflows runs its flows
    in the data direction through ``inverse`` (x_b − t, x · exp(−s)), ours through forward
    (x_b + t, x · exp(s)), so the copied output layer and log-scale change sign."""
    ours = build_model("ours_nice", cfg)
    theirs = build_model("normflows_nice", cfg)
    g = torch.Generator().manual_seed(SEED + 7)
    ours_steps = [m for m in ours.modules() if isinstance(m, flows.AdditiveCoupling)]
    nf_steps = [m for m in theirs.flow.flows[::-1] if isinstance(m, nf.flows.MaskedAffineFlow)]
    for a, b in zip(ours_steps, nf_steps, strict=True):
        cond = b.b.flatten().bool()
        la = [m for m in a.net.modules() if isinstance(m, nn.Linear)]
        lb = [m for m in b.t.modules() if isinstance(m, nn.Linear)]
        for i, (u, v) in enumerate(zip(la, lb, strict=True)):  # random, not zero: couplings act
            u.weight.copy_(0.02 * torch.randn(u.weight.shape, generator=g))
            u.bias.copy_(0.02 * torch.randn(u.bias.shape, generator=g))
            last = i == len(la) - 1
            rows = ~cond if last else slice(None)
            cols = cond if i == 0 else slice(None)
            sign = -1.0 if last else 1.0
            v.weight.zero_()
            v.bias.zero_()
            v.weight[rows, cols] = sign * u.weight
            v.bias[rows] = sign * u.bias
    scaling = next(m for m in ours.modules() if isinstance(m, flows.DiagonalScaling))
    flows.initialize(ours, y)
    theirs.flow.flows[0].s.copy_(-scaling.log_scale.view_as(theirs.flow.flows[0].s))
    z_ours = ours.encode(y)
    z_nf, _ = theirs.flow.inverse_and_log_det(y.reshape(y.shape[0], -1))
    diff = float((z_ours - z_nf).abs().max())
    scale = float(z_ours.abs().max())
    return {
        "what": "fresh ours_nice and normflows_nice, ours' coupling MLPs set to random weights "
        "(not zero, so the couplings act) and embedded in normflows' masked networks (first "
        "layer reading the conditioning features only, last writing the others, negated for "
        "normflows' inverse direction), ours' diagonal scaling initialised from the batch and "
        "copied (negated): the latents z = f(y) must agree to float32 rounding if masks, "
        "order and nets are wired alike (the priors differ by design, logistic vs normal, so "
        "log p is not compared)",
        "max_abs_diff_z": float(f"{diff:.3g}"),
        "max_abs_z": float(f"{scale:.4g}"),
        "agree": diff <= 1e-4 * max(1.0, scale),
    }


# --------------------------------------------------------------------------------------
# 1. Memory (child process per model)
# --------------------------------------------------------------------------------------


def _warm_up_torch() -> None:
    """Pay torch's one-time costs (kernel libraries, thread pools, allocator arenas) on a toy
    net before the measurement, so that they are not charged to the first model measured."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1),
                        nn.Flatten(), nn.Linear(4 * 7 * 7, 8))
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    x = torch.rand(4, 2, 7, 7)
    for _ in range(2):
        loss = torch.nn.functional.logsigmoid(net(x)).sum() + torch.linalg.slogdet(
            torch.eye(4) + 0.1 * net[2].weight.view(4, 4))[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    del net, opt, x, loss


def memory_child(name: str, cfg: dict) -> dict:
    """Runs in a fresh interpreter: peak RSS of ``memory_steps`` training steps of one model."""
    batch, steps = cfg["batch"], cfg["memory_steps"]
    images = train_images(batch * (steps + 1))
    batches = dequantized_batches(images, batch, steps + 1, SEED + 1)
    del images
    _warm_up_torch()
    gc.collect()
    rss_before_model = common.current_rss_mb()
    was_reset = common.reset_peak_rss()
    model = build_model(name, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    init_model(model, batches[0])
    with torch.no_grad():  # one no-grad forward for every model (ActNorm init or not)
        model.log_prob(batches[0])
    gc.collect()
    rss_model, peak_model, maxrss_model = common.rss_snapshot()
    rss_after, losses = [], []
    for i in range(steps):
        losses.append(train_step(model, opt, batches[1 + i]))
        rss_after.append(common.current_rss_mb() or float("nan"))
    peak = common.peak_rss_mb()
    params = count_params(model)
    return {
        "params": params,
        "params_MiB": round(params * 4 / 2**20, 2),
        "steps": steps,
        "losses_bpd": [round(v, 4) for v in losses],
        "peak_source": "VmHWM (/proc/self/status), reset before the model is built"
        if was_reset else "ru_maxrss (VmHWM reset unavailable: includes the data loading)",
        "rss_MiB": {
            "before_model": None if rss_before_model is None else round(rss_before_model, 1),
            "after_model_optimizer_init": None if rss_model is None else round(rss_model, 1),
            "peak_until_init": round(peak_model, 1),
            "after_each_step": [round(v, 1) for v in rss_after],
            "peak": round(peak, 1),
            "ru_maxrss_after_init": round(maxrss_model, 1),
            "ru_maxrss_end": round(common.ru_maxrss_mb(), 1),
        },
        "peak_rss_increase_MiB": {
            "total_over_before_model": None if rss_before_model is None
            else round(peak - rss_before_model, 1),
            "training_over_model": None if rss_model is None else round(peak - rss_model, 1),
            "last_step_growth": round(rss_after[-1] - rss_after[-2], 1) if steps > 1 else None,
        },
    }


def bench_memory(names: list[str], cfg: dict, threads: int) -> dict:
    out: dict[str, object] = {}
    for name in names:
        log(f"memory: {name} (child process)")
        out[name] = common.run_json_child(
            __file__, ["--_child-memory", name, "--threads", str(threads), "--_config",
                       json.dumps(cfg), "--device", str(DEVICE)])
        if "error" in out[name]:
            continue
        inc = out[name]["peak_rss_increase_MiB"]
        log(f"memory: {name}: peak +{inc['training_over_model']} MiB over the built model, "
            f"+{inc['total_over_before_model']} MiB in all ({out[name]['params']} params)")
    return {
        "method": "one fresh child process per model (same threads): load and dequantize the "
        f"first {cfg['memory_steps'] + 1} batches, then reset the peak RSS (echo 5 > "
        "/proc/self/clear_refs; VmHWM in /proc/self/status) after a training step of a toy "
        "net (torch's one-time costs: kernels, thread pools, allocator arenas), build the "
        "model and Adam, "
        "ActNorm init (normflows: its first log_prob) and one no-grad forward on batch 0 "
        f"(every model), then {cfg['memory_steps']} training steps. "
        "total_over_before_model = peak RSS - RSS before the model (parameters, init, "
        "gradients, Adam state, activations and autograd graph, allocator caches); "
        "training_over_model = peak RSS - RSS after model + optimizer + init + forward (what "
        "training adds); last_step_growth = RSS after the last step - after the one before "
        "(~0: steady state). CPU RSS through glibc malloc: freed blocks may stay resident, so "
        "these are upper bounds on what the tensors need, alike for every model",
        "by_model": out,
    }


# --------------------------------------------------------------------------------------
# 2. Throughput
# --------------------------------------------------------------------------------------


def bench_throughput(names: list[str], cfg: dict, images: torch.Tensor, repeats: int,
                     warmup: int) -> dict:
    batch, steps = cfg["batch"], cfg["steps"]
    batches = dequantized_batches(images, batch, steps + 1, SEED + 1)
    init_batch, step_batches = batches[0], batches[1:]
    models, opts, last_loss = {}, {}, {}
    for name in names:
        models[name] = build_model(name, cfg)
        init_model(models[name], init_batch)
        opts[name] = torch.optim.Adam(models[name].parameters(), lr=LR)

    def runner(name: str) -> Callable[[], None]:
        def run() -> None:
            for y in step_batches:
                last_loss[name] = train_step(models[name], opts[name], y)
        return run

    times = round_robin({n: runner(n) for n in names}, repeats, warmup, label="throughput")
    ips = {n: [batch * steps / (t / 1e3) for t in ts] for n, ts in times.items()}
    results = {}
    for name in names:
        results[name] = {
            "construction": describe(name, cfg),
            "params": count_params(models[name]),
            "images_per_s": stats(ips[name], 2),
            "ms_per_step": stats([t / steps for t in times[name]], 2),
            "raw_ms_per_timing": [round(t, 1) for t in times[name]],
            "last_train_bpd": round(last_loss[name], 4),
            "loss_finite": math.isfinite(last_loss[name]),
        }
    ratios = {}
    for arch, (ours, theirs) in PAIRS.items():
        if ours in times and theirs in times:
            # throughput ratio ours / normflows = time ratio normflows / ours
            ratios[f"{arch}_ours_over_normflows"] = ratio(times[theirs], times[ours])
    return {
        "config": {"batch": batch, "steps_per_timing": steps, "repeats": repeats,
                   "warmup_rounds": warmup, "optimizer": f"Adam(lr={LR})",
                   "loss": "flows.bits_per_dim(model, y, 256, dequantize_input=False).mean()",
                   "data": f"{steps} fixed dequantized batches of Fashion-MNIST train images "
                   "(the same for every model), reused every round; ActNorm init on another"},
        "results": results,
        "ratios": ratios,
        "notes": [
            "a timing = `steps` full training steps (forward, backward, Adam step, "
            "zero_grad(set_to_none=True)); images/s = batch * steps / seconds",
            "ratios are of throughput, ours / normflows (> 1: ours faster), computed from the "
            "times as normflows / ours: of_medians = median(ours)/median(normflows) images/s, "
            "of_mins = fastest round of ours / fastest round of normflows, "
            "median_of_paired_rounds = median over rounds of the two timings in a round",
            "models keep training across rounds (their parameters change; the work per step "
            "does not)",
        ],
    }


# --------------------------------------------------------------------------------------
# 3. Fixed wall-clock budget, then test bits/dim
# --------------------------------------------------------------------------------------


def bench_budget(names: list[str], cfg: dict, images: torch.Tensor, budget_s: float,
                 slices: int, test_n: int) -> dict:
    batch = cfg["batch"]
    test = load_dataset(DATASET, split="test").images[:test_n]
    y_test = flows.dequantize(test, N_BINS, generator=torch.Generator().manual_seed(
        SEED + 3)).to(DEVICE)
    init_batch = flows.dequantize(images[:batch], N_BINS,
                                  generator=torch.Generator().manual_seed(SEED + 4)).to(DEVICE)
    state = {}
    for name in names:
        model = build_model(name, cfg)
        init_model(model, init_batch)
        state[name] = {
            "model": model, "opt": torch.optim.Adam(model.parameters(), lr=LR),
            "stream": BatchStream(images, batch, SEED + 5), "steps": 0, "train_s": 0.0,
            "losses": [], "diverged_at": None,
            "bpd_at_init": test_bpd(model, y_test),
        }
    slice_s = budget_s / slices
    for r in range(slices):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            st = state[name]
            if st["diverged_at"] is not None:
                continue
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < slice_s:
                loss = train_step(st["model"], st["opt"], st["stream"].next())
                st["steps"] += 1
                st["losses"].append(loss)
                if not math.isfinite(loss):
                    st["diverged_at"] = st["steps"]
                    break
            st["train_s"] += time.perf_counter() - t0
        log(f"budget slice {r + 1}/{slices}: "
            + ", ".join(f"{n}={state[n]['steps']} steps" for n in names))
    results = {}
    for name in names:
        st = state[name]
        tail = st["losses"][-10:]
        results[name] = {
            "params": count_params(st["model"]),
            "steps": st["steps"],
            "images_seen": st["steps"] * batch,
            "train_s": round(st["train_s"], 2),
            "train_bpd_last10_mean": round(statistics.fmean(tail), 4) if tail else None,
            "test_bpd_at_init": round(st["bpd_at_init"], 4),
            "test_bpd": round(test_bpd(st["model"], y_test), 4),
            "diverged_at_step": st["diverged_at"],
        }
        log(f"budget: {name}: {st['steps']} steps, test bpd {results[name]['test_bpd']}")
    return {
        "config": {"budget_s_per_model": budget_s, "slices": slices, "batch": batch,
                   "optimizer": f"Adam(lr={LR})", "test_n": int(y_test.shape[0]),
                   "test_data": "first test_n Fashion-MNIST test images, dequantized once with "
                   f"torch.Generator().manual_seed({SEED + 3}), the same for every model",
                   "train_data": "shuffled train batches, dequantized on the fly; the same "
                   "seed, so the same sequence of batches, for every model"},
        "results": results,
        "notes": [
            "each model trains budget_s seconds of wall clock in `slices` slices, models "
            "round-robin with the order rotated per slice (a load burst hits all); the last "
            "step of a slice may overrun it (train_s is the measured time)",
            "test_bpd: mean over the test images of (-log p(y) + D ln 256) / (D ln 2), eval "
            "mode, no grad; a model that diverges (non-finite loss) stops training there",
        ],
    }


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


# flags whose default depends on --quick: cfg key -> (default, --quick default, what it sets)
SIZES = {
    "repeats": (3, 1, "timed rounds"),
    "steps": (5, 2, "training steps per timing"),
    "depth": (8, 2, "Glow steps per level K"),
    "hidden": (128, 16, "Glow coupling hidden channels"),
    "realnvp_hidden": (64, 16, "RealNVP ResNet hidden channels"),
    "realnvp_blocks": (4, 1, "RealNVP residual blocks per coupling net"),
    "nice_hidden": (1000, 64, "NICE hidden units"),
    "nice_depth": (5, 2, "NICE hidden layers per coupling"),
    "test_n": (2000, 256, "test images for bits/dim"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small models and few steps for a smoke test (K=2, H=16, RealNVP "
                   "hidden 16 with 1 block, NICE hidden 64 depth 2, steps 2, repeats 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--levels", type=int, default=2, help="Glow levels L (default 2)")
    for key, (full, quick, what) in SIZES.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                       help=f"{what} (default {full}, --quick {quick})")
    p.add_argument("--memory-steps", type=int, default=3,
                   help="training steps per memory child (default 3)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="seconds of training per model before test bits/dim (default 0: skip)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--skip-memory", action="store_true", help="skip the memory children")
    common.add_device(p)
    p.add_argument("--_child-memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_config", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict:
    def pick(key: str) -> int:
        full, quick, _ = SIZES[key]
        value = getattr(args, key)
        return value if value is not None else (quick if args.quick else full)

    cfg = {
        "batch": args.batch,
        "steps": pick("steps"),
        "repeats": pick("repeats"),
        "levels": args.levels,
        "depth": pick("depth"),
        "hidden": pick("hidden"),
        "realnvp_hidden": pick("realnvp_hidden"),
        "realnvp_blocks": pick("realnvp_blocks"),
        "nice_hidden": pick("nice_hidden"),
        "nice_depth": pick("nice_depth"),
        "alpha": 0.05,
        "memory_steps": args.memory_steps,
        "budget_s": args.budget_s,
        "test_n": pick("test_n"),
    }
    for key in ("batch", "levels", *SIZES):
        if cfg[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1")
    if cfg["memory_steps"] < 2:
        raise SystemExit("--memory-steps must be >= 2")
    if cfg["levels"] > 2:
        raise SystemExit("--levels must be <= 2: 28x28 halves to 7x7 only twice")
    return cfg


NOTES = [
    "same size: parameter counts per model are in throughput.results[*].params and "
    "param_counts; differences come from the pieces below, not from widths or depths",
    "Glow, structure: same L, K, hidden channels, data-direction order ActNorm -> LU 1x1 "
    "conv -> affine coupling (conv 3x3 -> ReLU -> conv 1x1 -> ReLU -> zero-init conv 3x3 on "
    "the first half of the channels), squeeze first in every level, half the channels split "
    "off after every level but the last (verified by glow_structure_check)",
    "Glow, differences: ours' last coupling conv has a learned per-channel output log-scale "
    "(ZeroConv2d, Glow's reference), normflows' is a plain zero-init conv; ours computes "
    "x_b * sigmoid(h+2) + t, normflows (x_b - t) * sigmoid(h+2); ours' split prior is "
    "conditional (mean and log-scale from a zero-init 3x3 conv of the kept half, as in "
    "Glow) and the top prior is N(0, I), normflows' MultiscaleFlow can only give every level "
    "an unconditional GlowBase (learned mean and log-scale per channel); ours subtracts 0.5 "
    "first (flows.Shift), normflows has none here because nf.transforms.Shift works in place "
    "on the input batch (it would shift the reused batches again every step); the first "
    "ActNorm's data-dependent init absorbs a constant shift exactly",
    "RealNVP, structure: same Logit(alpha) preprocessing (nf.transforms.Logit has the same "
    "formula and log-det), 2 scales: 3 checkerboard couplings, squeeze, 3 channel couplings, "
    "split of half the channels, 4 checkerboard couplings; ResNet coupling nets of the same "
    "width and number of residual blocks (2 conv 3x3 each), zero-init output layer",
    "RealNVP, differences: both checkerboard couplings gather the conditioning pixels into "
    "a (C, H, W/2) tensor and run their net there, predicting only the other half; "
    "normflows' checkerboard also flips parity across channels (3-D), ours is the same 2-D "
    "board for every channel; nf.nets.ConvResidualNet has 1x1 input/output convs (ours 3x3, "
    "with a ReLU before the output and a learned output log-scale) and its final layer is "
    "zero-initialised here (normflows leaves it at the default init); scale: ours "
    "s = c * tanh(h) with a learned c per channel, normflows exp(h) unbounded "
    "(scale_map='exp'); priors as for Glow (ours: conditional split prior and N(0, I) top; "
    "normflows: GlowBase on both)",
    "NICE: both are 4 additive couplings (alternating masks over the flattened image) of the "
    "same ReLU MLPs and a diagonal scaling; ours initialises the scaling from the data "
    "(DiagonalScaling(target_std)), normflows' AffineConstFlow starts at exp(0) = 1; prior: "
    "ours logistic (the paper's), normflows a standard normal (it has no logistic base); "
    "normflows' MaskedAffineFlow also evaluates the (zero) scale and two isfinite checks",
    "bits/dim for every model: flows.bits_per_dim(model, y, 256, dequantize_input=False) = "
    "(-log p(y) + D ln 256) / (D ln 2) on the same y in [0, 1]; normflows' log_prob (via "
    "MultiscaleFlow.log_prob(y, None), its transform included) is the density of that y",
]


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    args = parse_args(argv)
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    if args._child_memory:
        print(json.dumps(memory_child(args._child_memory, json.loads(args._config))))
        return 0

    if nf is None:
        raise SystemExit("normflows is not installed: pip install -c constraints.txt "
                         "-e '.[bench]' (normflows==1.7.3)")
    cfg = resolve(args)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        raise SystemExit(f"unknown --models {unknown}; known: {','.join(MODELS)}")
    repeats = cfg["repeats"]

    t_start = time.perf_counter()
    meta = {
        **common.run_metadata(
            "bench/flows.py", versions={"normflows": getattr(nf, "__version__", "unknown")}),
        "device": str(DEVICE),
        "dtype": "float32",
        "dataset": f"{DATASET} (1x28x28)",
        "quick": args.quick,
        "repeats": repeats,
        "seed": SEED,
        "loadavg_at_start": common.loadavg(),
    }
    log(f"torch {torch.__version__}, normflows {meta['normflows']}, {meta['threads']} threads, "
        f"{meta['cpu_model']}")
    free = (os.cpu_count() or 1) - meta["loadavg_at_start"][0]
    if free < meta["threads"] - 0.5:
        meta["busy_warning"] = (
            f"load average {meta['loadavg_at_start'][0]} on {os.cpu_count()} CPUs leaves fewer "
            f"than {meta['threads']} free: OpenMP threads that share a core with another "
            "process wait on each other at every op, and timings can be off by orders of "
            "magnitude; rerun on an idle machine or with fewer --threads")
        log(f"warning: {meta['busy_warning']}")
    out: dict[str, object] = {"meta": meta, "config": cfg}
    sections: dict[str, dict[str, object]] = {}
    meta["sections"] = sections

    run = functools.partial(common.run_section, sections)

    # memory first, in children spawned while this process is small
    memory = None
    if not args.skip_memory:
        memory = run("memory", lambda: bench_memory(names, cfg, args.threads))

    images = train_images()
    out["models"] = {n: describe(n, cfg) for n in names}
    out["param_counts"] = {n: count_params(build_model(n, cfg)) for n in names}
    out["realnvp_variant"] = "image multi-scale RealNVP (1x28x28) for both libraries"
    if "ours_glow" in names and "normflows_glow" in names:
        log("structure check: ours Glow vs normflows Glow at init")
        y = dequantized_batches(images, cfg["batch"], 1, SEED + 2)[0]
        out["glow_structure_check"] = run("glow_structure_check",
                                          lambda: glow_structure_check(cfg, y))
    if "ours_realnvp" in names and "normflows_realnvp" in names:
        y = dequantized_batches(images, cfg["batch"], 1, SEED + 2)[0]
        out["realnvp_init_check"] = realnvp_init_check(cfg, y)
    if "ours_nice" in names and "normflows_nice" in names:
        y = dequantized_batches(images, cfg["batch"], 1, SEED + 2)[0]
        out["nice_structure_check"] = run("nice_structure_check",
                                          lambda: nice_structure_check(cfg, y))
    log(f"throughput: {', '.join(names)}")
    out["throughput"] = run("throughput",
                            lambda: bench_throughput(names, cfg, images, repeats, 1))
    if memory is not None:
        out["memory"] = memory
    if cfg["budget_s"] > 0:
        log(f"budget: {cfg['budget_s']} s per model")
        out["budget"] = run("budget", lambda: bench_budget(
            names, cfg, images, cfg["budget_s"], repeats, cfg["test_n"]))
    out["notes"] = NOTES

    tp = out["throughput"]
    summary: dict[str, object] = {
        "images_per_s_median": {n: r["images_per_s"]["median"]
                                for n, r in tp["results"].items()},
        "throughput_ours_over_normflows_of_medians": {
            k: v["of_medians"] for k, v in tp["ratios"].items()},
        "params": out["param_counts"],
    }
    if memory is not None:
        summary["peak_rss_increase_MiB"] = {
            n: {k: r.get("peak_rss_increase_MiB", {}).get(k)
                for k in ("training_over_model", "total_over_before_model")}
            for n, r in memory["by_model"].items()}
    if "budget" in out:
        summary["test_bpd"] = {n: r["test_bpd"] for n, r in out["budget"]["results"].items()}
    if "glow_structure_check" in out:
        summary["glow_structure_check_agree"] = out["glow_structure_check"]["agree"]
    if "nice_structure_check" in out:
        summary["nice_structure_check_agree"] = out["nice_structure_check"]["agree"]
    out["summary"] = summary
    common.print_json(out, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
