"""The work of ``manifoldlens flow train|eval|sample|interpolate`` over a run directory."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import viz
from .._utils import latest_checkpoint
from ..data import load_dataset, make_toy_2d
from ..models import count_parameters, load_checkpoint, model_for_checkpoint, save_checkpoint
from ..runs import Run
from ..training import RunOptions
from .models import NICE, Flow, Glow, RealNVP, interpolate
from .training import evaluate_flow, n_bins_for, train_flow

__all__ = ["TOYS", "default_flow", "flow_data", "run_flow_train", "run_flow_eval",
           "run_flow_sample", "run_flow_interpolate"]

TOYS = ("two-moons", "8gaussians", "checkerboard", "rings")
KINDS = {"nice": NICE, "realnvp": RealNVP, "glow": Glow}
TEMPERATURES = (0.5, 0.7, 0.85, 1.0)


def flow_data(data: str, split: str, root: str | None = None, limit: int | None = None,
              seed: int = 0, toy_size: int = 20000) -> tuple[torch.Tensor, int | None, Any]:
    """``(x, n_bins, dataset)`` of a 2-D toy (``n_bins`` None; the test split is drawn with
    another seed) or an image dataset (a stratified subset of ``limit`` points if given)."""
    if data in TOYS:
        n = limit or toy_size
        return make_toy_2d(data, n, seed=seed if split == "train" else seed + 1), None, None
    ds = load_dataset(data, split, root)
    if limit:
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
    kind: str = "realnvp",
    model_options: dict[str, Any] | None = None,
    limit: int | None = None,
    test_limit: int | None = None,
    n_bins: int | None = None,
    resume: bool = False,
    progress: bool = True,
    **train_options: Any,
) -> dict[str, Any]:
    """Train a flow on a toy density or an image dataset; write figures, the model and test
    bits/dim (images) or NLL (toys). ``train_options`` go to :func:`train_flow`."""
    seed = train_options.get("seed", 0)
    x, bins, ds = flow_data(data, "train", root, limit, seed)
    x_test, _, _ = flow_data(data, "test", root, test_limit or (10000 if data in TOYS else None),
                             seed)
    n_bins = n_bins if n_bins is not None else bins
    torch.manual_seed(seed)
    model = default_flow(kind, tuple(x.shape[1:]), **(model_options or {}))
    if resume and (latest := latest_checkpoint(run.path / "checkpoints")) is not None:
        model = model_for_checkpoint(model, latest)  # e.g. a NICE of the 0.1 layout
    meta = {"data": data, "n_bins": n_bins, "kind": kind, "seed": seed}
    options = RunOptions(run, checkpoint_every=train_options.pop("checkpoint_every", None),
                         resume=resume, metadata=meta)
    result = train_flow(model, x, test_data=x_test, n_bins=n_bins, run=options,
                        progress=progress, **train_options)
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
    model, meta = _load_flow(checkpoint, device)
    name = data or meta.get("data")
    if name is None or name in TOYS:
        raise ValueError("interpolation needs an image dataset: pass --data")
    x, _, ds = flow_data(name, "test", root, None, seed)
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

