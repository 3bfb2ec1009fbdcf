"""Benchmark of tangent spaces from a decoder: forward mode, batched, against the seed-004
reference (one backward pass per output pixel).

Usage::

    .venv/bin/python bench/tangent.py [--quick] [--threads N] [--repeats R] [--batch B]
                                      [--ref-images M] [--device cpu|cuda]

Prints ONE JSON object on stdout; progress goes to stderr.

Decoder: the β-TCVAE decoder shape of seed 004 (MNIST32): ``Linear(10→256) → ReLU →
Linear(256→64·4·4) → ReLU → ConvTranspose2d 64→32→32→1`` (4 × 4 → 32 × 32) → sigmoid; random
init, eval, float32, on ``--device`` (default CPU); k = 10 latent dims, d = 1024 pixels.

* ``ours``: :meth:`manifoldlens.tangent.TangentSpace.from_decoder` on a batch of ``--batch``
  codes: k JVPs (``torch.func.jvp`` under ``vmap`` over the unit tangents), then a thin QR
  and the SVD of its k × k factor.
* ``reference``: seed 004's ``compute_tangent_space`` (tml-tuebingen/explanations-manifold),
  one code at a time: one forward pass, then ``torch.autograd.grad`` of each of the d output
  pixels with ``retain_graph`` (d = 1024 backward passes per image) into the d × k Jacobian,
  then its orthonormal basis by SVD (as ``scipy.linalg.orth``), on ``--ref-images`` codes.

Both must span the same subspaces: the largest principal angle between them over the
reference images is reported. That check runs each method once and serves as the warm-up;
then the methods are timed round-robin (one call of each per round, order rotated). The JSON
reports ms per image and the ratio reference / ours (of medians, of mins, median of the
per-round ratios).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from _common import (
    add_device,
    loadavg,
    make_logger,
    print_json,
    ratio,
    round_robin,
    run_metadata,
    stats,
)
from manifoldlens.tangent import TangentSpace, principal_angles

SEED = 0
LATENT = 10
TARGET = ">= 40"

log = make_logger("tangent")


class BetaTCVAEDecoder(nn.Module):
    """Decoder of the kind β-TCVAE papers use for 32 × 32 images (Burgess et al. 2018)."""

    def __init__(self, latent_dim: int = LATENT) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, 256), nn.ReLU(), nn.Linear(256, 64 * 4 * 4), nn.ReLU()
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),  # 8 × 8
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),  # 16 × 16
            nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1), nn.Sigmoid(),  # 32 × 32
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).reshape(-1, 64, 4, 4))


def reference_tangent_space(decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Seed 004, one code z (k,): d backward passes, then an orthonormal basis (k, d)."""
    z = z.detach().clone().requires_grad_(True)
    out = decoder(z[None]).reshape(-1)
    jac = torch.zeros(z.shape[0], out.shape[0], device=z.device)
    for i in range(out.shape[0]):
        (g,) = torch.autograd.grad(out[i], z, retain_graph=i < out.shape[0] - 1)
        jac[:, i] = g
    u, s, _ = torch.linalg.svd(jac.T, full_matrices=False)  # scipy.linalg.orth
    rank = int((s > s[0] * max(jac.shape) * torch.finfo(s.dtype).eps).sum())
    return u[:, :rank].T


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny: batch 8, 1 reference image, 2 rounds")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, quick 2)")
    p.add_argument("--batch", type=int, default=None, help="codes for ours (default 64, quick 8)")
    p.add_argument("--ref-images", type=int, default=None,
                   help="codes for the reference (default 2, quick 1)")
    p.add_argument("--attr-batch", type=int, default=None,
                   help="images for the attribution throughput (default 128, quick 8)")
    add_device(p)
    return p.parse_args(argv)


def attribution_throughput(batch: int, repeats: int, device: str = "cpu") -> dict:
    """Images per second of each attribution method (seed 004's settings: IG 50 steps,
    SmoothGrad 25 samples at noise 0.02) on the seed-001 CNN at 1×32×32 (MNIST32), next to
    the bare gradient."""
    from manifoldlens.attribution import METHODS, explain
    from manifoldlens.models import Seed001CNN

    torch.manual_seed(SEED)
    model = Seed001CNN((1, 32, 32), 10).eval().to(device)
    x = torch.rand(batch, 1, 32, 32, generator=torch.Generator().manual_seed(SEED + 2)).to(device)
    options = {"integrated_gradients": {"steps": 50, "internal_batch_size": 512},
               "smoothgrad": {"samples": 25, "noise_level": 0.02, "seed": 0,
                              "samples_batch_size": 25}}
    methods = {m: (lambda m=m: explain(model, x, m, **options.get(m, {}))) for m in METHODS}
    times = round_robin(methods, repeats, warmup=1, log=log)
    per_s = {m: [1e3 * batch / t for t in v] for m, v in times.items()}  # times in ms
    return {"model": "Seed001CNN (1x32x32, C=10), random init, eval, float32",
            "batch": batch, "options": options,
            "images_per_s": {m: stats(v, 1) for m, v in per_s.items()},
            "cost_vs_gradient": {m: ratio(times[m], times["gradient"], digits=2)
                                 for m in METHODS if m != "gradient"}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    batch = args.batch or (8 if args.quick else 64)
    ref_images = args.ref_images or (1 if args.quick else 2)
    attr_batch = args.attr_batch or (8 if args.quick else 128)
    if min(repeats, batch, ref_images) < 1 or ref_images > batch:
        raise SystemExit("--repeats, --batch, --ref-images must be >= 1, ref-images <= batch")
    t_start = time.perf_counter()
    load_start = loadavg()
    torch.manual_seed(SEED)
    decoder = BetaTCVAEDecoder().eval().to(args.device)
    z = torch.randn(batch, LATENT, generator=torch.Generator().manual_seed(SEED + 1)).to(
        args.device)
    d = decoder(z[:1]).numel()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d = {d}, k = {LATENT}")

    def ours() -> TangentSpace:
        return TangentSpace.from_decoder(decoder, z)

    def reference() -> list[torch.Tensor]:
        return [reference_tangent_space(decoder, z[i]) for i in range(ref_images)]

    # agreement: the same subspaces, up to float32 rounding
    ts, refs = ours(), reference()
    ref_space = TangentSpace(
        torch.stack([torch.cat([r, r.new_zeros(LATENT - r.shape[0], d)]) for r in refs]),
        torch.stack([torch.arange(LATENT, device=r.device) < r.shape[0] for r in refs]),
    )
    mine = TangentSpace(ts.basis[:ref_images], ts.mask[:ref_images], ts.input_shape)
    angles = principal_angles(mine, ref_space)
    agreement = {
        "max_principal_angle_rad": float(f"{float(angles.nan_to_num(0).abs().max()):.3g}"),
        "max_angle_per_image_rad": [float(f"{float(a):.3g}") for a in angles.amax(1)],
        "dims_ours": ts.dim[:ref_images].tolist(),
        "dims_reference": [r.shape[0] for r in refs],
    }
    log(f"agreement: {agreement}")

    times = round_robin({"ours": ours, "reference": reference}, repeats, warmup=0, log=log)
    per_image = {
        "ours": [t / batch for t in times["ours"]],
        "reference": [t / ref_images for t in times["reference"]],
    }
    out = {
        "meta": {
            **run_metadata("bench/tangent.py"),
            "quick": args.quick,
            "repeats": repeats,
            "warmup": "the agreement check (one call of each) before the timed rounds",
            "seed": SEED,
            "loadavg_at_start": load_start,
        },
        "config": {
            "decoder": "Linear(10,256)-ReLU-Linear(256,1024)-ReLU-ConvT(64,32)-ReLU-"
                       "ConvT(32,32)-ReLU-ConvT(32,1)-Sigmoid, 1x32x32, random init, eval",
            "k": LATENT,
            "d": d,
            "dtype": "float32",
            "device": args.device,
            "batch_ours": batch,
            "images_reference": ref_images,
        },
        "ms_per_image": {name: stats(v, 3) for name, v in per_image.items()},
        "raw_ms_per_call": {name: [round(t, 2) for t in v] for name, v in times.items()},
        "ratios": {"reference_over_ours": ratio(per_image["reference"], per_image["ours"],
                                                TARGET, digits=2)},
        "agreement": agreement,
        "attribution": attribution_throughput(attr_batch, repeats, args.device),
        "notes": [
            "ours = TangentSpace.from_decoder(decoder, z) on the whole batch: k JVPs "
            "(vmap over unit tangents), thin QR + SVD of the k x k factor, masks",
            "reference = seed 004 compute_tangent_space: d torch.autograd.grad calls with "
            "retain_graph per image, then an SVD of the d x k Jacobian (scipy.linalg.orth)",
            "ratios: ms per image; 'met' is judged on the ratio of medians",
            "agreement: principal angles (arcsin of the residual for small angles) between "
            "both bases on the reference images; float32 rounding differs between forward "
            "and reverse mode",
        ],
    }
    print_json(out, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
