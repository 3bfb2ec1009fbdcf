"""``manifoldlens leaf train|across|horizontal|mirror|noisy|involutivity``: the experiments of
Grementieri & Fioresi (2022) §4 on the foliation a classifier induces on its input space.

- ``train`` (Figure 2): their CNN with SGD, batch 60, learning rate 0.01, following the trace
  of G; the step-10000 checkpoint is kept for the other experiments;
- ``across`` (Figure 3): steps across the leaves (on ker G) from test images;
- ``horizontal`` (Figure 4) and ``mirror`` (Figure 5): horizontal paths (Algorithm 1) between
  test images, or towards mirrored ones, beside the straight lines;
- ``noisy`` (Figure 6): from a noisy image towards a valid one;
- ``involutivity`` (Theorem 3.1): Lie-bracket residuals outside D_x.

References
----------
Grementieri, L. & Fioresi, R. (2022). Model-centric data manifold: the data through the eyes
of the model. arXiv:2104.13289.
"""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Any

import torch
from torch import nn

from .. import viz
from ..data import ImageDataset
from ..distributed import gather, gather_objects, is_main, shard, world_size
from ..foliation import PathResult, horizontal_path, involutivity_residual, leaf_crossing_path
from ..models import Seed001CNN, register_architecture
from ..runs import Run
from .classifier import run_train
from .common import (
    add_checkpoint_data,
    add_command,
    add_common,
    add_data,
    add_resume,
    allow_change,
    checkpoint_data,
    interpolation,
    option,
    pick,
    pick_pairs,
    progress,
)

__all__ = [
    "add_arguments",
    "run_leaf_across",
    "run_leaf_horizontal",
    "run_leaf_involutivity",
    "run_leaf_mirror",
    "run_leaf_noisy",
    "run_leaf_train",
    "trace_criterion_step",
]

CITE = "Grementieri & Fioresi 2022"

#: the ``Normalize`` constants of the seed-001 code (MNIST's mean and standard deviation)
PAPER_NORMALIZE = (0.1307, 0.3081)


@register_architecture("seed001_cnn_normalized")
class NormalizedSeed001CNN(Seed001CNN):
    """:class:`~manifoldlens.models.Seed001CNN` that first maps its [0, 1] input to
    ``(x − mean)/std``, as the seed-001 code feeds MNIST (``Normalize(0.1307, 0.3081)``):
    trained on [0, 1] images it takes exactly the SGD steps the paper's network takes on
    normalised ones. Its leaves are the same sets in either units; lengths in the paper's
    units are those in [0, 1] units divided by ``std`` (α = 0.1, tol = 1 there are
    ``0.1·std``, ``std`` here)."""

    def __init__(self, in_shape: Any = (1, 28, 28), num_classes: int = 10,
                 log_softmax: bool = False, mean: float = PAPER_NORMALIZE[0],
                 std: float = PAPER_NORMALIZE[1]) -> None:
        super().__init__(in_shape, num_classes, log_softmax)
        if not (float(std) > 0 and abs(float(mean)) < float("inf")):
            raise ValueError(f"normalisation needs a finite mean and std > 0, got {mean}, {std}")
        self.mean, self.std = float(mean), float(std)
        self.spec = {**self.spec, "arch": "seed001_cnn_normalized", "mean": self.mean,
                     "std": self.std}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.mean) / self.std)


def trace_criterion_step(records: list[dict[str, Any]], within: float = 0.1) -> int | None:
    """The paper's checkpoint criterion (§4.1): the first recorded step after the peak of the
    smoothed trace (``ema_trace``) at which it is back near its starting value, i.e. within
    ``within`` of its rise above the start (``ema ≤ start + within·(peak − start)``); None
    if it never comes back."""
    if not records:
        return None
    ema = [r["ema_trace"] for r in records]
    start, top = ema[0], max(range(len(ema)), key=ema.__getitem__)
    if top == 0:  # it never rose
        return None
    bound = start + within * (ema[top] - start)
    return next((records[i]["step"] for i in range(top, len(ema)) if ema[i] <= bound), None)


def run_leaf_train(run: Run, *, data: str = "fashion-mnist", root: str | None = None,
                   steps: int = 10000, trace_every: int = 100, seed: int = 0,
                   normalize: tuple[float, float] | None = None,
                   keep_every: int | None = None,
                   resume: bool = False, allow_changes: tuple[str, ...] = (),
                   progress: bool = True,
                   device: str = "cpu") -> dict[str, Any]:
    """Figure 2 of Grementieri & Fioresi (2022): their CNN (``seed001_cnn``) trained as their
    code does, plain SGD (no momentum), batch 60, learning rate 0.01, for ``steps`` steps,
    following the trace of G on 60 test images; checkpoints every 1000 steps, the step-10000
    one kept for the other experiments (``keep_every``: every ``keep_every`` steps instead,
    all kept). ``normalize=(mean, std)``: the network normalises its input as theirs
    (:class:`NormalizedSeed001CNN`; the paper's: :data:`PAPER_NORMALIZE`). The metrics record
    :func:`trace_criterion_step`, the step the paper's criterion picks."""
    every = keep_every or 1000
    run_train(
        run, data=data, root=root,
        arch="seed001_cnn" if normalize is None else "seed001_cnn_normalized",
        arch_options=None if normalize is None else {"mean": normalize[0], "std": normalize[1]},
        trace_every=trace_every, probe_size=60,
        resume=resume, allow_changes=allow_changes, progress=progress, optimizer="sgd", lr=0.01,
        momentum=0.0, batch_size=60, steps=steps,
        seed=seed, eval_every=every, checkpoint_every=every,
        keep_checkpoints=tuple(range(every, steps + 1, every)) if keep_every else (10000,),
        device=device,
    )
    file = run.path / "trace_of_g.json"  # the callback's records, resumes included once
    records = json.loads(file.read_text()) if file.exists() else []
    run.metrics["trace_criterion_step"] = trace_criterion_step(records)
    return run.metrics


def _path_metrics(res, start_class: torch.Tensor) -> dict[str, Any]:
    pred = res.probs.argmax(-1)
    return {
        "record_steps": res.record_steps,
        "mean_distance": res.distances.mean(1),
        "agreement_with_start": (pred == start_class).double().mean(1),
        "mean_max_prob": res.probs.max(-1).values.mean(1),
    }


def _class_changes(probs: torch.Tensor) -> torch.Tensor:
    pred = probs.argmax(-1)  # (T, n)
    return (pred[1:] != pred[:-1]).sum(0)


def _share(n: int, what: str) -> slice:
    """This process's paths (all of them in one process); a ValueError on every rank when
    there are fewer paths than processes."""
    if n < world_size():
        raise ValueError(f"{n} {what} cannot be shared by {world_size()} processes: ask for at "
                         "least as many as there are processes")
    return shard(n)


def _state_dir(run: Run, name: str, part: slice) -> Any:
    """Where a share of the paths keeps its resumable state: ``<run>/<name>`` in one process,
    ``<run>/<name>-<start>-<stop>`` for each share under torch.distributed."""
    return run.path / (name if world_size() == 1 else f"{name}-{part.start}-{part.stop}")


def _gathered(res: PathResult, every: int) -> PathResult:
    """Every process's share of a batch of paths, in order, recorded as one process records
    them: at 0, every ``every`` steps and at the step where the last path of all stopped (a
    share that stopped earlier repeats its final record; its own last record is kept only
    where one process would have made it)."""
    if world_size() == 1:
        return res
    last = max(gather_objects(int(res.record_steps[-1])))
    grid = sorted({*range(0, last + 1, every), last})
    own = res.record_steps.tolist()
    at = torch.tensor([own.index(t) if t in own else len(own) - 1 for t in grid])

    def paths(t: torch.Tensor) -> torch.Tensor:  # (T, n, ...) gathered along n
        return gather(t[at].transpose(0, 1).contiguous()).transpose(0, 1)

    return PathResult(
        points=paths(res.points), distances=paths(res.distances), probs=paths(res.probs),
        steps=gather(res.steps), reached=gather(res.reached),
        status=[s for part in gather_objects(res.status) for s in part],
        length=gather(res.length), record_steps=torch.tensor(grid),
        residuals=paths(res.residuals) if res.residuals.numel() else res.residuals)


def run_leaf_across(
    run: Run, model: nn.Module, dataset: ImageDataset, *, n: int = 8, steps: int = 1000,
    step_size: float = 0.1, seed: int = 0, record_every: int = 10,
    clamp: tuple[float, float] | None = (0.0, 1.0), model_output: str = "logits",
    top_k: int | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Figure 3 of Grementieri & Fioresi (2022): from ``n`` test images, ``steps`` steps across
    the leaves (on ker G), kept in the data domain ``clamp`` (None: not clamped). ``top_k``:
    G over the K most probable classes at each point.

    Under ``torch.distributed`` each process follows a share of the images (the random
    directions drawn for all ``n`` as one process draws them) and rank 0 writes the gathered
    paths (the others return ``{}``)."""
    idx = pick(dataset, n, seed)
    x = dataset.images[idx]
    part = _share(n, "images")
    g = torch.Generator().manual_seed(seed)  # leaf_crossing_path's own draw, for all n
    r = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)
    res = leaf_crossing_path(model, x[part], direction=r[part], steps=steps,
                             step_size=step_size, seed=seed, record_every=record_every,
                             clamp=clamp, model_output=model_output, top_k=top_k,
                             checkpoint_dir=_state_dir(run, "state", part),
                             progress=progress and is_main())
    res = _gathered(res, record_every)
    if not is_main():
        return {}
    start = res.probs[0].argmax(-1)
    m = _path_metrics(res, start)
    run.save_arrays("across", indices=idx, points=res.points, probs=res.probs,
                    distances=res.distances, record_steps=res.record_steps)
    run.save_figure("across_strips", viz.plot_path_grid(
        [(res, i, f"test #{int(idx[i])}") for i in range(min(n, 6))], frames=9,
        classes=dataset.classes, title=f"Across the leaves ({CITE}, Fig. 3)"))
    run.save_figure("across_curves", viz.plot_curves(res.record_steps, {
        "distance from start": res.distances, "prediction = start class": m[
            "agreement_with_start"], "max probability": res.probs.max(-1).values}))
    out = {
        "n": n, "steps": steps, "step_size": step_size,
        "final_mean_distance": float(res.distances[-1].mean()),
        "final_agreement_with_start": float(m["agreement_with_start"][-1]),
        "min_agreement_with_start": float(m["agreement_with_start"].min()),
        "final_mean_max_prob": float(m["mean_max_prob"][-1]),
        "start_mean_max_prob": float(m["mean_max_prob"][0]),
        "status": res.status,
        "curve": {k: v.tolist() for k, v in m.items()},
    }
    run.save_json("results", out)
    run.metrics["across"] = {k: v for k, v in out.items() if k != "curve"}
    return out


PAIR_KINDS = ("different-class", "same-class", "any", "nearest")


def _pick_pairs(dataset: ImageDataset, n: int, seed: int, kind: str) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """``n`` (source, target) index pairs of ``kind``: ``different-class`` (labels differ),
    ``same-class``, ``any`` (two distinct images drawn independently, as the seed-001 scripts
    draw them) or ``nearest`` (each source's nearest other image, in Euclidean distance)."""
    if kind not in PAIR_KINDS:
        raise ValueError(f"pair kind must be one of {', '.join(PAIR_KINDS)}, got {kind!r}")
    if kind == "different-class":
        return pick_pairs(dataset, n, seed)
    if kind == "nearest":
        src = pick(dataset, n, seed)
        flat = dataset.images.reshape(len(dataset), -1)
        d = torch.cdist(flat[src], flat)
        d[torch.arange(n), src] = float("inf")
        return src, d.argmin(1).cpu()
    labels = dataset.labels.cpu()
    if kind == "same-class" and int(labels.bincount().max()) < 2:
        raise ValueError("same-class pairs need a class with two images in the split")
    g = torch.Generator().manual_seed(seed)
    src: list[int] = []
    tgt: list[int] = []
    while len(src) < n:
        i, j = torch.randint(len(dataset), (2,), generator=g).tolist()
        if i != j and (kind == "any" or labels[i] == labels[j]):
            src.append(i)
            tgt.append(j)
    return torch.tensor(src), torch.tensor(tgt)


def run_leaf_horizontal(
    run: Run, model: nn.Module, dataset: ImageDataset, *, pairs: int = 20,
    steps: int = 10000, step_size: float = 0.1, tol: float = 1.0, seed: int = 0,
    record_every: int = 50, clamp: tuple[float, float] | None = (0.0, 1.0),
    mirror: bool = False, model_output: str = "logits", progress: bool = True,
    name: str = "horizontal", capped: bool = False, top_k: int | None = None,
    pair_kind: str = "different-class",
) -> dict[str, Any]:
    """Figure 4 of Grementieri & Fioresi (2022) (and Figure 5 with ``mirror=True``: targets
    flipped left–right): horizontal paths between test images beside the straight line
    between them. ``top_k``: G over the K most probable classes at each point. ``pair_kind``:
    which pairs (:data:`PAIR_KINDS`; their code draws ``any`` two).

    Under ``torch.distributed`` each process follows a share of the pairs and rank 0 writes
    the gathered paths (the others return ``{}``)."""
    si, ti = _pick_pairs(dataset, pairs, seed, pair_kind)
    src, tgt = dataset.images[si], dataset.images[ti]
    if mirror:
        tgt = tgt.flip(-1)
    part = _share(pairs, "pairs")
    res = horizontal_path(model, src[part], tgt[part], step_size=step_size, max_steps=steps,
                          tol=tol, record_every=record_every, clamp=clamp,
                          model_output=model_output, top_k=top_k, capped=capped,
                          checkpoint_dir=_state_dir(run, "state", part),
                          progress=progress and is_main())
    res = _gathered(res, record_every)
    if not is_main():
        return {}
    lin = interpolation(model, src, tgt, 33, model_output)
    straight = (tgt - src).reshape(pairs, -1).norm(dim=1)
    reached = res.reached
    run.save_arrays(name, sources=si, targets=ti, points=res.points, probs=res.probs,
                    distances=res.distances, steps=res.steps, reached=reached,
                    length=res.length, record_steps=res.record_steps)
    rows = []
    for i in range(min(pairs, 4)):
        rows.append((res, i, f"path {i}"))
        rows.append((lin, i, f"line {i}"))
    label = f"mirrored targets ({CITE}, Fig. 5)" if mirror else f"{CITE}, Fig. 4"
    run.save_figure(f"{name}_strips", viz.plot_path_grid(
        rows, frames=9, classes=dataset.classes,
        title=f"Horizontal paths vs straight lines, {label}"))
    run.save_figure(f"{name}_distance", viz.plot_curves(
        res.record_steps, {"distance to target": res.distances}, logy=("distance to target",)))
    steps_reached = res.steps[reached].double()
    out = {
        "pairs": pairs, "pair_kind": pair_kind, "max_steps": steps, "step_size": step_size,
        "tol": tol, "mirror": mirror, "capped": capped, "clamp": clamp,
        "reached_share": float(reached.double().mean()),
        "reached": int(reached.sum()),
        "steps_median": float(res.steps.double().median()),
        "steps_to_reach_median": float(steps_reached.median()) if reached.any() else None,
        "steps_to_reach_max": int(steps_reached.max()) if reached.any() else None,
        "final_distance_median": float(res.distances[-1].median()),
        "start_distance_median": float(res.distances[0].median()),
        "path_length_over_straight_median": float((res.length / straight.double()).median()),
        "class_changes_path_mean": float(_class_changes(res.probs).double().mean()),
        "class_changes_line_mean": float(_class_changes(lin.probs).double().mean()),
        "min_max_prob_path_mean": float(res.probs.max(-1).values.min(0).values.mean()),
        "min_max_prob_line_mean": float(lin.probs.max(-1).values.min(0).values.mean()),
        "status_counts": {s: res.status.count(s) for s in set(res.status)},
    }
    run.save_json("results", out)
    run.metrics[name] = out
    return out


def run_leaf_mirror(
    run: Run, model: nn.Module, dataset: ImageDataset, *, pairs: int = 8,
    steps: int = 10000, step_size: float = 0.1, tol: float = 1.0, seed: int = 0,
    record_every: int = 50, clamp: tuple[float, float] | None = (0.0, 1.0),
    model_output: str = "logits", progress: bool = True, capped: bool = False,
    top_k: int | None = None,
) -> dict[str, Any]:
    """Figure 5 of Grementieri & Fioresi (2022): horizontal paths from test images towards
    other test images flipped left–right (:func:`run_leaf_horizontal` with ``mirror=True``;
    results under the name ``mirror``)."""
    return run_leaf_horizontal(
        run, model, dataset, pairs=pairs, steps=steps, step_size=step_size, tol=tol, seed=seed,
        record_every=record_every, clamp=clamp, mirror=True, model_output=model_output,
        progress=progress, name="mirror", capped=capped, top_k=top_k,
    )


def run_leaf_noisy(
    run: Run, model: nn.Module, dataset: ImageDataset, *, n: int = 8, noise_steps: int = 250,
    steps: int = 10000, step_size: float = 0.1, tol: float = 1.0, seed: int = 0,
    record_every: int = 50, clamp: tuple[float, float] | None = (0.0, 1.0),
    model_output: str = "logits", progress: bool = True, capped: bool = False,
    top_k: int | None = None,
) -> dict[str, Any]:
    """Figure 6 of Grementieri & Fioresi (2022): move a valid image ``noise_steps`` across the
    leaves, then try to reach another valid image by a horizontal path; the noise persists.
    ``top_k``: G over the K most probable classes at each point, in both walks."""
    si, ti = pick_pairs(dataset, n, seed)
    x0, tgt = dataset.images[si], dataset.images[ti]
    noisy = leaf_crossing_path(model, x0, steps=noise_steps, step_size=step_size, seed=seed,
                               record_every=noise_steps, model_output=model_output, clamp=clamp,
                               checkpoint_dir=run.path / "state_noise", progress=progress,
                               top_k=top_k).final
    res = horizontal_path(model, noisy, tgt, step_size=step_size, max_steps=steps, tol=tol,
                          record_every=record_every, model_output=model_output, clamp=clamp,
                          checkpoint_dir=run.path / "state", progress=progress, capped=capped,
                          top_k=top_k)
    noise = (noisy - x0).reshape(n, -1)
    residual = (res.final - tgt).reshape(n, -1)
    cos = torch.nn.functional.cosine_similarity(noise, residual, dim=1)
    run.save_arrays("noisy", sources=si, targets=ti, noisy=noisy, points=res.points,
                    probs=res.probs, distances=res.distances, record_steps=res.record_steps)
    run.save_figure("noisy_strips", viz.plot_path_grid(
        [(res, i, f"pair {i}") for i in range(min(n, 6))], frames=9, classes=dataset.classes,
        title=f"Noisy start → valid image ({CITE}, Fig. 6)"))
    run.save_figure("noisy_distance", viz.plot_curves(
        res.record_steps, {"distance to target": res.distances}, logy=("distance to target",)))
    out = {
        "n": n, "noise_steps": noise_steps, "steps": steps, "tol": tol, "capped": capped,
        "clamp": clamp,
        "noise_norm_median": float(noise.norm(dim=1).median()),
        "final_distance_median": float(residual.norm(dim=1).median()),
        "reached_share": float(res.reached.double().mean()),
        "residual_noise_cosine_median": float(cos.median()),
        "status_counts": {s: res.status.count(s) for s in set(res.status)},
    }
    run.save_json("results", out)
    run.metrics["noisy"] = out
    return out


def run_leaf_involutivity(
    run: Run, model: nn.Module, dataset: ImageDataset, *, n: int = 8, seed: int = 0,
    model_output: str = "logits",
) -> dict[str, Any]:
    """Theorem 3.1 of Grementieri & Fioresi (2022) checked numerically: Lie-bracket residuals
    outside D_x on ``n`` test images (float64)."""
    idx = pick(dataset, n, seed)
    x = dataset.images[idx].double()
    res = involutivity_residual(model.double(), x, model_output=model_output)
    model.float()
    run.save_arrays("involutivity", indices=idx, residual=res.residual,
                    bracket_norm=res.bracket_norm, pairs=torch.tensor(res.pairs))
    run.save_figure("involutivity", viz.plot_residual_histogram(res.residual))
    r = res.residual[torch.isfinite(res.residual)]
    out = {"n": n, "pairs": len(res.pairs), "median": float(r.median()), "max": float(r.max()),
           "dtype": "float64"}
    run.save_json("results", out)
    run.metrics["involutivity"] = out
    return out


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def _train(args: argparse.Namespace, run: Run) -> None:
    run_leaf_train(run, data=args.data, root=args.root, steps=args.steps,
                   trace_every=args.trace_every, seed=args.seed, resume=args.resume,
                   normalize=tuple(args.normalize) if args.normalize else None,
                   keep_every=args.keep_every,
                   allow_changes=allow_change(args),
                   progress=progress(args), device=args.device)


def _path_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options every path experiment shares, ``--no-clamp`` turned into ``clamp=None``."""
    return {"steps": args.steps, "step_size": args.step_size, "record_every": args.record_every,
            "clamp": None if args.no_clamp else tuple(args.clamp), "seed": args.seed,
            "model_output": args.model_output, "top_k": args.top_k, "progress": progress(args)}


def _across(args: argparse.Namespace, run: Run) -> None:
    model, ds = checkpoint_data(args)
    run_leaf_across(run, model, ds, n=args.n, **_path_options(args))


def _horizontal(args: argparse.Namespace, run: Run) -> None:
    model, ds = checkpoint_data(args)
    run_leaf_horizontal(run, model, ds, pairs=args.n, tol=args.tol, capped=args.capped,
                        pair_kind=args.pair_kind, **_path_options(args))


def _mirror(args: argparse.Namespace, run: Run) -> None:
    model, ds = checkpoint_data(args)
    run_leaf_mirror(run, model, ds, pairs=args.n, tol=args.tol, capped=args.capped,
                    **_path_options(args))


def _noisy(args: argparse.Namespace, run: Run) -> None:
    model, ds = checkpoint_data(args)
    run_leaf_noisy(run, model, ds, n=args.n, tol=args.tol, capped=args.capped,
                   noise_steps=args.noise_steps, **_path_options(args))


def _involutivity(args: argparse.Namespace, run: Run) -> None:
    model, ds = checkpoint_data(args)
    run_leaf_involutivity(run, model, ds, n=args.n, seed=args.seed,
                          model_output=args.model_output)


def _add_train(sub: Any) -> None:
    p = add_command(sub, "train", _train,
                    f"Fig. 2: the CNN of {CITE} (seed001_cnn), SGD 60/0.01, trace of G; keeps "
                    "the step-10000 checkpoint")
    add_common(p, run_leaf_train)
    add_data(p, run_leaf_train)
    option(p, "--steps", run_leaf_train, type=int, help="training steps")
    option(p, "--trace-every", run_leaf_train, type=int, help="steps between Tr G probes")
    option(p, "--normalize", run_leaf_train, type=float, low=None, nargs=2,
           metavar=("MEAN", "STD"), help="the network normalises its input to (x − MEAN)/STD "
           f"as theirs does (theirs: {PAPER_NORMALIZE[0]} {PAPER_NORMALIZE[1]})")
    option(p, "--keep-every", run_leaf_train, type=int,
           help="checkpoint and evaluate every this many steps and keep them all "
                "(default: every 1000, the step-10000 one kept)")
    add_resume(p, run_leaf_train)


def _add_experiment(sub: Any, name: str, handler: Any, fn: Any, help: str,
                    n: str = "n") -> argparse.ArgumentParser:
    p = add_command(sub, name, handler, help)
    p.add_argument("checkpoint", help="model checkpoint (.json) e.g. from `leaf train`")
    add_common(p, fn)
    add_checkpoint_data(p, fn)
    option(p, "--n", fn, n, type=int, aliases=("--count",),  # torchrun's parser takes --n
           help="pairs" if n == "pairs" else "test images")
    return p


def _add_path(sub: Any, name: str, handler: Any, fn: Any, help: str,
              n: str = "n") -> argparse.ArgumentParser:
    """A path experiment: steps, step size, recording, clamping, resume (and the tolerance
    and step rule of horizontal paths when ``fn`` takes them)."""
    p = _add_experiment(sub, name, handler, fn, help, n)
    option(p, "--steps", fn, type=int, low=0, help="steps of the path")
    option(p, "--step-size", fn, type=float, help="step length α")
    option(p, "--record-every", fn, type=int, help="steps between recorded points")
    add_resume(p)
    if "tol" in _params(fn):
        option(p, "--tol", fn, type=float, low=0.0,
               help="distance to the target that counts as reached")
        option(p, "--capped", fn, action="store_true",
               help="steps of min(α, ‖v‖): stop at the leaf's point nearest the target "
                    "instead of stepping α as Algorithm 1 does")
    if "pair_kind" in _params(fn):
        option(p, "--pair-kind", fn, choices=list(PAIR_KINDS),
               help="which test images to pair (their code draws any two)")
    if "noise_steps" in _params(fn):
        option(p, "--noise-steps", fn, type=int, low=0,
               help="steps across the leaves that add noise")
    option(p, "--clamp", fn, type=float, low=None, nargs=2, metavar=("LO", "HI"),
           help="keep points in the data domain, as the code of Grementieri & Fioresi does")
    p.add_argument("--no-clamp", action="store_true", help="do not clamp")
    option(p, "--top-k", fn, type=int,
           help="G over the K most probable classes at each point (default: all C)")
    if fn is not run_leaf_noisy:  # shares its paths under torchrun
        p.set_defaults(distributed=True)
    return p


def _params(fn: Any) -> set[str]:
    return set(inspect.signature(fn).parameters)


def add_arguments(sub: Any) -> None:
    """Register ``leaf`` and its experiments on the top-level ``sub``-parsers."""
    leaf = sub.add_parser("leaf", help=f"{CITE}: the foliation of a classifier",
                          description=f"The experiments of {CITE} on the foliation of a "
                                      "classifier.")
    lsub = leaf.add_subparsers(dest="experiment", required=True)
    _add_train(lsub)
    _add_path(lsub, "across", _across, run_leaf_across,
              "Fig. 3: steps across the leaves from test images")
    _add_path(lsub, "horizontal", _horizontal, run_leaf_horizontal,
              "Fig. 4: horizontal paths between test images", n="pairs")
    _add_path(lsub, "mirror", _mirror, run_leaf_mirror,
              "Fig. 5: horizontal paths towards mirrored images", n="pairs")
    _add_path(lsub, "noisy", _noisy, run_leaf_noisy,
              "Fig. 6: from a noisy image towards a valid one")
    _add_experiment(lsub, "involutivity", _involutivity, run_leaf_involutivity,
                    "Theorem 3.1: Lie-bracket residuals outside D_x")
