"""``manifoldlens flow train|eval|sample|interpolate``: normalizing flows (NICE, RealNVP, Glow)
trained by maximum likelihood on a 2-D toy density or on images, their test bits/dim (NLL for
toys), samples at several temperatures and latent interpolations.

References
----------
Dinh, L., Krueger, D. & Bengio, Y. (2014). NICE: Non-linear Independent Components
Estimation. arXiv:1410.8516.
Dinh, L., Sohl-Dickstein, J. & Bengio, S. (2017). Density estimation using Real NVP.
arXiv:1605.08803.
Kingma, D. P. & Dhariwal, P. (2018). Glow: Generative Flow with Invertible 1x1
Convolutions. arXiv:1807.03039.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from .. import viz
from .._checks import check_choice, check_positive_int
from .._utils import latest_checkpoint
from ..data import load_dataset, make_toy_2d
from ..flows.models import NICE, Flow, Glow, RealNVP, interpolate
from ..flows.training import evaluate_flow, n_bins_for, train_flow
from ..models import count_parameters, load_checkpoint, model_for_checkpoint, save_checkpoint
from ..runs import Run
from ..training import RunOptions
from .common import (
    DATA_HELP,
    add_command,
    add_common,
    add_data,
    add_length,
    add_resume,
    allow_change,
    checked,
    floats,
    option,
    progress,
    split_sha256,
)

__all__ = ["TOYS", "add_arguments", "default_flow", "flow_data", "run_flow_eval",
           "run_flow_interpolate", "run_flow_sample", "run_flow_train"]

TOYS = ("two-moons", "8gaussians", "checkerboard", "rings")
KINDS = {"nice": NICE, "realnvp": RealNVP, "glow": Glow}
TEMPERATURES = (0.5, 0.7, 0.85, 1.0)


def flow_data(data: str, split: str, root: str | None = None, limit: int | None = None,
              seed: int = 0, toy_size: int = 20000) -> tuple[torch.Tensor, int | None, Any]:
    """``(x, n_bins, dataset)`` of a 2-D toy (``n_bins`` None; the test split is drawn with
    another seed) or an image dataset (a stratified subset of ``limit`` points if given)."""
    if data in TOYS:
        n = limit if limit is not None else toy_size
        return make_toy_2d(data, n, seed=seed if split == "train" else seed + 1), None, None
    ds = load_dataset(data, split, root)
    if limit is not None:
        ds = ds.subset(limit, seed=seed)
    return ds.images, n_bins_for(ds.name), ds


def default_flow(kind: str, shape: tuple[int, ...], **options: Any) -> Flow:
    """A flow of ``kind`` sized for this CPU unless ``options`` say otherwise (documented in
    ``docs/benchmarks.md``): 2-D toys, 8×8 digits and 28×28 images each get their own."""
    if kind not in KINDS:
        raise ValueError(f"unknown flow {kind!r}; known: {sorted(KINDS)}")
    vector = len(shape) == 1
    if kind == "glow" and vector:
        raise ValueError("Glow is a flow for images; use realnvp or nice for vectors")
    side = shape[-1]
    if kind == "nice":
        base = ({"couplings": 4, "hidden": 64, "depth": 3} if vector else
                {"couplings": 4, "hidden": 1000, "depth": 5} if side >= 28 else
                {"couplings": 4, "hidden": 256, "depth": 3})
    elif kind == "realnvp":
        base = ({"couplings": 8, "hidden": 64, "depth": 2} if vector else
                {"scales": 2, "hidden_channels": 32, "blocks": 2} if side >= 28 else
                {"scales": 2, "hidden_channels": 32, "blocks": 2})
    else:
        base = ({"levels": 2, "depth": 8, "hidden_channels": 128} if side >= 28 else
                {"levels": 2, "depth": 4, "hidden_channels": 64})
    base.update({k: v for k, v in options.items() if v is not None})
    return KINDS[kind](shape, **base)


def _figures(run: Run, model: Flow, x_test: torch.Tensor, n_bins: int | None, seed: int,
             pairs: int = 6) -> None:
    g = torch.Generator().manual_seed(seed)
    model.eval()
    p = next(model.parameters())
    x_test = x_test.to(p.device)
    if n_bins is None:
        pts = x_test[:5000].cpu()
        samples = model.sample(5000, generator=g).float().cpu()
        run.save_figure("density", viz.flow_density_2d(model, pts, samples=samples))
        run.save_figure("volume_change", viz.flow_volume_change(model, pts))
        return
    samples = {t: model.sample(32, temperature=t, generator=g).float().cpu()
               for t in TEMPERATURES}
    run.save_figure("samples", viz.sample_grid(samples, title="samples by temperature"))
    run.save_arrays("samples", **{f"T{t}": s.numpy() for t, s in samples.items()})
    k = min(pairs, x_test.shape[0] // 2)
    if k:
        a, b = x_test[:k].to(p.dtype), x_test[k: 2 * k].to(p.dtype)
        frames = interpolate(model, a, b, steps=9).float().cpu()
        run.save_figure("interpolation", viz.interpolation_strips(frames))


def run_flow_train(
    run: Run,
    *,
    data: str = "two-moons",
    root: str | None = None,
    kind: str | None = None,
    model_options: dict[str, Any] | None = None,
    limit: int | None = None,
    test_limit: int | None = None,
    n_bins: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 64,
    steps: int | None = None,
    epochs: float | None = None,
    warmup_steps: int = 200,
    clip_grad_norm: float | None = 100.0,
    eval_every: int | None = None,
    checkpoint_every: int | None = 500,
    resume: bool = False,
    allow_changes: tuple[str, ...] = (),
    progress: bool = True,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Train a flow on a toy density or an image dataset with :func:`train_flow`; write
    figures, the model and test bits/dim (images) or NLL (toys).

    ``kind``: ``nice``, ``realnvp`` or ``glow`` (default: realnvp for 2-D toys, glow for
    images), sized by :func:`default_flow` unless ``model_options`` say otherwise. Training
    length: ``steps`` or ``epochs``; 2000 steps when neither is given. ``n_bins``: the
    quantisation levels (default: 17 for digits, 256 for IDX images, none for toys).
    """
    if steps is None and epochs is None:
        steps = 2000
    kind = kind or ("realnvp" if data in TOYS else "glow")
    x, bins, ds = flow_data(data, "train", root, limit, seed)
    if test_limit is None and data in TOYS:
        test_limit = 10000
    x_test, _, _ = flow_data(data, "test", root, test_limit, seed)
    n_bins = n_bins if n_bins is not None else bins
    torch.manual_seed(seed)
    model = default_flow(kind, tuple(x.shape[1:]), **(model_options or {}))
    if resume and (latest := latest_checkpoint(run.path / "checkpoints")) is not None:
        model = model_for_checkpoint(model, latest)  # e.g. a NICE of the 0.1 layout
    meta = {"data": data, "n_bins": n_bins, "kind": kind, "seed": seed}
    if data not in TOYS:  # the identity of the image data, checked when the flow is evaluated
        meta["data_sha256"] = {s: split_sha256(load_dataset(data, s, root))
                               for s in ("train", "test")}
    options = RunOptions(run, checkpoint_every=checkpoint_every, resume=resume, metadata=meta,
                         allow_changes=allow_changes)
    result = train_flow(model, x, test_data=x_test, n_bins=n_bins, run=options,
                        progress=progress, lr=lr, batch_size=batch_size, steps=steps,
                        epochs=epochs, warmup_steps=warmup_steps, clip_grad_norm=clip_grad_norm,
                        eval_every=eval_every, device=device, seed=seed)
    save_checkpoint(run.path / "model", model, metadata={**meta, "step": result.step,
                                                         "metrics": result.metrics})
    if result.history:
        key = "test_nll" if n_bins is None else "test_bpd"
        run.save_figure("training", viz.plot_curves(
            [h["step"] for h in result.history], {key: [h[key] for h in result.history]},
            title=f"{kind} on {data}"))
    _figures(run, model, x_test, n_bins, seed)
    run.metrics.update({"parameters": count_parameters(model), "dim": math.prod(x.shape[1:])})
    return run.metrics


def _load_flow(checkpoint: str, device: str) -> tuple[Flow, dict[str, Any]]:
    model, meta = load_checkpoint(checkpoint, map_location=device)
    if not isinstance(model, Flow):
        raise ValueError(f"{checkpoint} holds a {type(model).__name__}, not a flow")
    return model, meta


def run_flow_eval(run: Run, checkpoint: str, *, data: str | None = None,
                  root: str | None = None, split: str = "test", limit: int | None = None,
                  n_bins: int | None = None, device: str = "cpu", seed: int | None = None,
                  batch_size: int = 500) -> dict[str, Any]:
    """Bits/dim (or NLL for toys) of a trained flow on a split, with sample figures. A toy's
    split is drawn with the training seed recorded in the checkpoint (``seed`` overrides)."""
    model, meta = _load_flow(checkpoint, device)
    if seed is None:
        seed = int(meta.get("seed", 0))
    name = data or meta.get("data")
    if name is None:
        raise ValueError("the checkpoint does not record its dataset: pass --data")
    recorded = (meta.get("data_sha256") or {}).get(split)
    if data is None and recorded is not None and recorded != split_sha256(
            load_dataset(name, split, root)):
        raise ValueError(f"the {split} split found for {name!r} is not the data the flow was "
                         "trained with (its sha256 differs): pass --root to that data, or "
                         "--data to evaluate on other data on purpose")
    x, bins, _ = flow_data(name, split, root, limit, seed)
    if n_bins is not None:
        bins = n_bins
    elif "n_bins" in meta:  # None for continuous (toy) data
        bins = meta["n_bins"]
    m = evaluate_flow(model, x, n_bins=bins, batch_size=batch_size, device=device)
    run.metrics.update({f"{split}_{k.split('_', 1)[1]}": v for k, v in m.items()})
    run.metrics.update({"n": x.shape[0], "data": name, "split": split})
    _figures(run, model, x, bins, seed)
    return run.metrics


def run_flow_sample(run: Run, checkpoint: str, *, n: int = 64,
                    temperatures: tuple[float, ...] = TEMPERATURES, device: str = "cpu",
                    seed: int = 0) -> dict[str, Any]:
    """Samples of a trained flow at several temperatures: ``samples.png`` and ``samples.npz``."""
    model, meta = _load_flow(checkpoint, device)
    g = torch.Generator().manual_seed(seed)
    samples = {t: model.sample(n, temperature=t, generator=g).float().cpu()
               for t in temperatures}
    if len(model.shape) == 1:
        fig = viz.flow_density_2d(model, samples[max(temperatures)], samples=samples[1.0]
                                  if 1.0 in samples else None)
    else:
        fig = viz.sample_grid(samples, title="samples by temperature")
    run.save_figure("samples", fig)
    run.save_arrays("samples", **{f"T{t}": s.numpy() for t, s in samples.items()})
    run.metrics.update({"n": n, "temperatures": list(temperatures),
                        "finite": all(bool(torch.isfinite(s).all()) for s in samples.values())})
    return run.metrics


def run_flow_interpolate(run: Run, checkpoint: str, *, data: str | None = None,
                         root: str | None = None, pairs: int = 6, steps: int = 9,
                         method: str = "linear", device: str = "cpu",
                         seed: int = 0) -> dict[str, Any]:
    """Latent interpolation between pairs of test images (lecture slides): strips figure."""
    check_positive_int(pairs, "pairs")
    check_positive_int(steps, "steps", minimum=2)
    check_choice(method, ("linear", "slerp"), "method")
    model, meta = _load_flow(checkpoint, device)
    name = data or meta.get("data")
    if name is None or name in TOYS:
        raise ValueError("interpolation needs an image dataset: pass --data")
    x, _, ds = flow_data(name, "test", root, None, seed)
    if 2 * pairs > x.shape[0]:
        raise ValueError(f"pairs={pairs} needs {2 * pairs} test images; {name!r} has "
                         f"{x.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=g)[: 2 * pairs]
    dtype = next(model.parameters()).dtype
    a, b = x[idx[:pairs]].to(device, dtype), x[idx[pairs:]].to(device, dtype)
    frames = interpolate(model, a, b, steps=steps, method=method).float().cpu()
    labels = None
    if ds is not None:
        labels = [f"{ds.classes[int(ds.labels[i])]} → {ds.classes[int(ds.labels[j])]}"
                  for i, j in zip(idx[:pairs].tolist(), idx[pairs:].tolist(), strict=True)]
    run.save_figure("interpolation", viz.interpolation_strips(frames, labels=labels))
    run.save_arrays("interpolation", frames=frames.numpy(), indices=idx.numpy())
    run.metrics.update({"pairs": pairs, "steps": steps, "method": method})
    return run.metrics


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

#: ``--levels`` … ``--blocks``: the flow's size, passed to :func:`default_flow`.
MODEL_OPTIONS = (
    ("levels", "Glow levels L"),
    ("depth", "Glow steps per level K; NICE/RealNVP MLP hidden layers"),
    ("hidden_channels", "Glow/RealNVP conv channels"),
    ("hidden", "NICE/RealNVP MLP width"),
    ("couplings", "vector couplings"),
    ("scales", "RealNVP scales"),
    ("blocks", "RealNVP residual blocks"),
)


def _train(args: argparse.Namespace, run: Run) -> None:
    run_flow_train(
        run, data=args.data, root=args.root, kind=args.model,
        model_options={k: getattr(args, k) for k, _ in MODEL_OPTIONS}, limit=args.limit,
        test_limit=args.test_limit, n_bins=args.n_bins, lr=args.lr, batch_size=args.batch_size,
        steps=args.steps, epochs=args.epochs, warmup_steps=args.warmup,
        clip_grad_norm=args.clip or None, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, resume=args.resume,
        allow_changes=allow_change(args), progress=progress(args),
        device=args.device, seed=args.seed,
    )


def _eval(args: argparse.Namespace, run: Run) -> None:
    run_flow_eval(run, args.checkpoint, data=args.data, root=args.root, split=args.split,
                  limit=args.limit, n_bins=args.n_bins, device=args.device, seed=args.seed)


def _sample(args: argparse.Namespace, run: Run) -> None:
    run_flow_sample(run, args.checkpoint, n=args.n, temperatures=args.temperatures,
                    device=args.device, seed=args.seed)


def _interpolate(args: argparse.Namespace, run: Run) -> None:
    run_flow_interpolate(run, args.checkpoint, data=args.data, root=args.root,
                         pairs=args.pairs, steps=args.steps, method=args.method,
                         device=args.device, seed=args.seed)


def _add_train(sub: Any) -> None:
    fn = run_flow_train
    p = add_command(sub, "train", _train, "maximum-likelihood training on a 2-D toy or images")
    add_common(p, fn)
    add_data(p, fn, help=f"{', '.join(TOYS)}, {DATA_HELP}")
    option(p, "--model", fn, "kind", choices=list(KINDS),
           help="the flow (default: realnvp for 2-D toys, glow for images)")
    for name, text in MODEL_OPTIONS:
        p.add_argument("--" + name.replace("_", "-"),
                       type=checked(int),
                       help=f"{text} (default: sized for the data by default_flow)")
    add_length(p, fn, steps="2000 when --epochs is not given")
    option(p, "--lr", fn, type=float, help="Adam learning rate")
    option(p, "--batch-size", fn, type=int, help="batch size")
    option(p, "--warmup", fn, "warmup_steps", type=int, low=0,
           help="linear learning-rate warm-up steps")
    option(p, "--clip", fn, "clip_grad_norm", type=float, low=0.0,
           help="gradient-norm clip (0: off)")
    option(p, "--n-bins", fn, type=int, low=2, help="quantisation levels (default: 17 for digits, "
           "256 for IDX images)")
    option(p, "--limit", fn, type=int, help="train on a subset of this size")
    option(p, "--test-limit", fn, type=int,
           help="evaluate on a subset of this size (default: 10000 points of a toy, all images)")
    option(p, "--eval-every", fn, type=int,
           help="steps between test evaluations (default: only at the end)")
    option(p, "--checkpoint-every", fn, type=int, low=0,
           help="steps between checkpoints (0: none)")
    add_resume(p, fn)


def _add_trained(sub: Any, name: str, handler: Any, fn: Any, help: str,
                 **common: Any) -> argparse.ArgumentParser:
    p = add_command(sub, name, handler, help)
    p.add_argument("checkpoint", help="flow checkpoint (.json), e.g. <run>/model.json")
    add_common(p, fn, **common)
    return p


def add_arguments(sub: Any) -> None:
    """Register ``flow`` and its subcommands on the top-level ``sub``-parsers."""
    flow = sub.add_parser("flow", help="normalizing flows (NICE, RealNVP, Glow)",
                          description="Normalizing flows: NICE (Dinh et al. 2014), RealNVP "
                                      "(Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018).")
    fsub = flow.add_subparsers(dest="experiment", required=True)
    _add_train(fsub)
    p = _add_trained(fsub, "eval", _eval, run_flow_eval,
                     "bits/dim (NLL for toys) of a trained flow",
                     seed_help="random seed (default: the training seed recorded in the "
                               "checkpoint)")
    add_data(p, run_flow_eval, help=f"{DATA_HELP} or a 2-D toy (default: the dataset the "
             "checkpoint records)")
    option(p, "--split", run_flow_eval, choices=["train", "test"], help="the dataset's split")
    option(p, "--limit", run_flow_eval, type=int, help="evaluate on a subset of this size")
    option(p, "--n-bins", run_flow_eval, type=int, low=2,
           help="quantisation levels (default: those recorded in the checkpoint)")
    p = _add_trained(fsub, "sample", _sample, run_flow_sample,
                     "samples at several temperatures")
    option(p, "--n", run_flow_sample, type=int, help="samples per temperature")
    option(p, "--temperatures", run_flow_sample, type=floats,
           help="comma-separated sampling temperatures")
    p = _add_trained(fsub, "interpolate", _interpolate, run_flow_interpolate,
                     "latent interpolation between test images")
    add_data(p, run_flow_interpolate,
             help=f"{DATA_HELP} (default: the dataset the checkpoint records)")
    option(p, "--pairs", run_flow_interpolate, type=int, help="pairs of test images")
    option(p, "--steps", run_flow_interpolate, type=int, low=2,
           help="frames per interpolation, endpoints included")
    option(p, "--method", run_flow_interpolate, choices=["linear", "slerp"],
           help="interpolation in the latent space")
