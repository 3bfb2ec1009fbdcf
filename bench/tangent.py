"""Benchmark of tangent spaces from a decoder: forward mode, batched, against the seed-004
reference (one backward pass per output pixel).

Usage::

    .venv/bin/python bench/tangent.py [--quick] [--threads N] [--repeats R] [--batch B]
                                      [--ref-images M]

Prints ONE JSON object on stdout; progress goes to stderr.

Decoder: the β-TCVAE decoder shape of seed 004 (MNIST32): ``Linear(10→256) → ReLU →
Linear(256→64·4·4) → ReLU → ConvTranspose2d 64→32→32→1`` (4 × 4 → 32 × 32) → sigmoid; random
init, eval, float32, CPU; k = 10 latent dims, d = 1024 pixels.

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
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from manifoldlens.tangent import TangentSpace, principal_angles

SEED = 0
LATENT = 10
TARGET = ">= 40"


def log(msg: str) -> None:
    print(f"[tangent] {msg}", file=sys.stderr, flush=True)


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
    jac = torch.zeros(z.shape[0], out.shape[0])
    for i in range(out.shape[0]):
        (g,) = torch.autograd.grad(out[i], z, retain_graph=i < out.shape[0] - 1)
        jac[:, i] = g
    u, s, _ = torch.linalg.svd(jac.T, full_matrices=False)  # scipy.linalg.orth
    rank = int((s > s[0] * max(jac.shape) * torch.finfo(s.dtype).eps).sum())
    return u[:, :rank].T


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def round_robin(
    methods: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """ms per call of every method, one call each per round, order rotated every round."""
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            methods[name]()
            ms = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times[name].append(ms)
        tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{repeats}"
        log(f"{tag}: " + ", ".join(
            f"{n}={times[n][-1]:.1f}ms" if r >= warmup else n for n in names
        ))
    return times


def ratio(num: list[float], den: list[float], target: str) -> dict[str, object]:
    of_medians = round(statistics.median(num) / statistics.median(den), 2)
    op, value = target.split()
    return {
        "of_medians": of_medians,
        "of_mins": round(min(num) / min(den), 2),
        "median_of_paired_rounds": round(
            statistics.median(a / b for a, b in zip(num, den, strict=True)), 2
        ),
        "target": target,
        "met": of_medians >= float(value) if op == ">=" else of_medians <= float(value),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny: batch 8, 1 reference image, 2 rounds")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, quick 2)")
    p.add_argument("--batch", type=int, default=None, help="codes for ours (default 64, quick 8)")
    p.add_argument("--ref-images", type=int, default=None,
                   help="codes for the reference (default 2, quick 1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    batch = args.batch or (8 if args.quick else 64)
    ref_images = args.ref_images or (1 if args.quick else 2)
    if min(repeats, batch, ref_images) < 1 or ref_images > batch:
        raise SystemExit("--repeats, --batch, --ref-images must be >= 1, ref-images <= batch")
    t_start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    torch.manual_seed(SEED)
    decoder = BetaTCVAEDecoder().eval()
    z = torch.randn(batch, LATENT, generator=torch.Generator().manual_seed(SEED + 1))
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
        torch.stack([torch.arange(LATENT) < r.shape[0] for r in refs]),
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

    times = round_robin({"ours": ours, "reference": reference}, repeats, warmup=0)
    per_image = {
        "ours": [t / batch for t in times["ours"]],
        "reference": [t / ref_images for t in times["reference"]],
    }
    out = {
        "meta": {
            "benchmark": "bench/tangent.py",
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
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
            "device": "cpu",
            "batch_ours": batch,
            "images_reference": ref_images,
        },
        "ms_per_image": {name: stats(v) for name, v in per_image.items()},
        "raw_ms_per_call": {name: [round(t, 2) for t in v] for name, v in times.items()},
        "ratios": {"reference_over_ours": ratio(per_image["reference"], per_image["ours"],
                                                TARGET)},
        "agreement": agreement,
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
    out["meta"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    out["meta"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
