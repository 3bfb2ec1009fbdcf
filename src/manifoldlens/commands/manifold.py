"""``manifoldlens manifold vae|dataset|train|fraction|roar``: explanations against the data
manifold, after Bordt et al. (2023).

1. ``vae``: a (β-TC)VAE or autoencoder of a dataset, images resized to a square power-of-two
   side (Bordt et al.: MNIST at 32 × 32), with reconstructions and latent traversals;
2. ``dataset``: a dataset on a known manifold (generative approach, Algorithm 1, or the
   reconstructive approach), optionally upsampled;
3. ``train``: a classifier on it, standard or ℓ2-adversarial, with true or random labels
   (§5.1), following the fraction of its gradient in tangent space (Figures 6, 15);
4. ``fraction``: attributions split into tangent and orthogonal parts (Figure 2), their
   fractions in tangent space against the random baseline (Figures 3 and 7), and the
   classifier's own D_x against the data's tangent space (principal angles);
5. ``roar``: remove-and-retrain for every method and the tangent space's feature importance
   (Figure 5);
6. ``theorem1`` and ``sanity`` (§5.2–5.3), in :mod:`.manifold_checks`, registered here.

References
----------
Bordt, S., Upadhyay, U., Akata, Z. & von Luxburg, U. (2023). The Manifold Hypothesis for
Gradient-Based Explanations. arXiv:2206.07387.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import viz
from .._utils import differing, tensor_sha256, write_atomic
from ..attribution import METHODS, explain
from ..callbacks import TangentFractionDuringTraining
from ..data import load_dataset
from ..distributed import broadcast_object, gather, is_main, shard, world_size
from ..generative import (
    VAE,
    AutoEncoder,
    BetaTCVAE,
    generative_dataset,
    latent_code,
    latent_traversal,
    reconstructive_dataset,
    train_generative,
)
from ..models import (
    checkpoint_metadata,
    checkpoint_sha256,
    count_parameters,
    create_model,
    load_checkpoint,
    save_checkpoint,
)
from ..roar import roar, tangent_importance
from ..runs import Run
from ..tangent import TangentSpace, principal_angles
from ..training import RunOptions, evaluate, train_classifier
from . import manifold_checks
from .common import (
    add_command,
    add_common,
    add_data,
    add_length,
    add_resume,
    allow_change,
    data_directory,
    data_root,
    floats,
    names,
    option,
    progress,
    split_sha256,
    verify_split,
)
from .manifold_checks import (
    load_manifold_dataset,
    manifold_split_sha256,
    split_dims,
    summary,
    tangent_baseline,
    verify_manifold_split,
)

__all__ = [
    "add_arguments",
    "resize_images",
    "run_manifold_vae",
    "run_manifold_dataset",
    "run_manifold_train",
    "run_manifold_fraction",
    "run_manifold_roar",
    "load_manifold_dataset",
    "summary",
    "verify_manifold_split",
]

KINDS = {"betatcvae": BetaTCVAE, "vae": VAE, "autoencoder": AutoEncoder}


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to size × size, kept in [0, 1] (Bordt et al. used MNIST at 32 × 32)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def run_manifold_vae(run: Run, *, data: str = "fashion-mnist", root: str | None = None,
                     kind: str = "betatcvae", size: int = 32, latent_dim: int = 10,
                     alpha: float = 1.0, beta: float = 6.0, gamma: float = 1.0,
                     limit: int | None = None, steps: int | None = None,
                     epochs: float | None = None, batch_size: int = 64, lr: float = 1e-3,
                     checkpoint_every: int | None = 500, resume: bool = False,
                     allow_changes: tuple[str, ...] = (),
                     progress: bool = True, device: str = "cpu", seed: int = 0
                     ) -> dict[str, Any]:
    """Train the generative model of the data manifold (Bordt et al.: β-TCVAE, α = γ = 1,
    β = 6, k = 10); write ``model.json``, reconstructions and latent traversals. Training
    length: ``steps`` or ``epochs``; 10 epochs when neither is given. ``model.json`` records
    the data's directory (``data_dir``; None for digits and mnist-5k), where ``manifold
    dataset`` looks for it by default."""
    if steps is None and epochs is None:
        epochs = 10.0
    if kind not in KINDS:
        raise ValueError(f"unknown model {kind!r}; known: {sorted(KINDS)}")
    train = load_dataset(data, "train", root)
    test = load_dataset(data, "test", root)
    splits = {"train": split_sha256(train), "test": split_sha256(test)}  # the data's identity
    if limit is not None:
        train = train.subset(limit, seed=seed)
    x = resize_images(train.images, size)
    xt = resize_images(test.images[:512], size)
    shape = (x.shape[1], size, size)
    torch.manual_seed(seed)
    network = "conv" if size >= 16 else "mlp"
    if kind == "betatcvae":
        model = BetaTCVAE(shape, latent_dim, network=network, alpha=alpha, beta=beta,
                          gamma=gamma)
    else:
        model = KINDS[kind](shape, latent_dim, network=network)
    meta = {"data": train.name, "data_dir": data_directory(data, root), "classes": train.classes,
            "size": size, "data_sha256": splits}
    res = train_generative(model, x, steps=steps, epochs=epochs if steps is None else None,
                           batch_size=batch_size, lr=lr, seed=seed,
                           run=RunOptions(run, checkpoint_every=checkpoint_every, resume=resume,
                                          allow_changes=allow_changes,
                                          metadata=meta),
                           progress=progress, device=device, test_images=xt)
    model.eval()
    save_checkpoint(run.path / "model", model, metadata={**meta, "metrics": res.metrics})
    with torch.no_grad():
        pairs = torch.stack([xt[:8], model(xt[:8].to(device)).cpu()], 1)  # (8, 2, C, H, W)
    run.save_figure("reconstructions", viz.interpolation_strips(
        pairs, labels=[train.classes[int(c)] for c in test.labels[:8]],
        title="test images and their reconstructions"))
    if hasattr(model, "latent_dim"):
        with torch.no_grad():
            z0 = latent_code(model, xt[:1].to(device))
        trav = latent_traversal(model, z0, span=2.5, steps=9).cpu()
        run.save_figure("traversals", viz.interpolation_strips(
            trav, labels=[f"z{j + 1}" for j in range(model.latent_dim)],
            title="latent traversals around a test image's code"))
    run.metrics.update({**res.metrics, "parameters": count_parameters(model),
                        "shape": list(shape)})
    return run.metrics


def run_manifold_dataset(run: Run, checkpoint: str, *, n_train: int = 6000, n_test: int = 1000,
                         approach: str = "generative", upsample: int | None = None,
                         labeller_steps: int = 2000, root: str | None = None,
                         progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """A dataset on a known manifold from a trained (β-TC)VAE or autoencoder (Bordt et al.,
    Algorithm 1, or the reconstructive approach): ``train`` and ``test`` splits with labels,
    latent codes and tangent bases, a figure of samples, and k/d with the random baseline.

    The source data are read from ``root``, by default the directory ``manifold vae``
    recorded (``data_dir``); their sha256 must be the recorded one. Each split's info records
    its tangent dimensions (``tangent_dim``: min, median, max, ``below_k``); when some images
    have fewer than k directions (a decoder of lower rank) the run warns, and the random
    baseline is the mean over the images of each one's own (:meth:`TangentSpace.
    random_baseline`), not the baseline of k."""
    if approach not in ("generative", "reconstructive"):
        raise ValueError(f"approach must be 'generative' or 'reconstructive', got {approach!r}")
    model, meta = load_checkpoint(checkpoint)
    model.eval()
    name, size = meta.get("data"), int(meta.get("size", model.shape[-1]))
    if name is None:
        raise ValueError(f"{checkpoint} does not record its dataset")
    classes = meta.get("classes")
    root = data_root(meta, root, checkpoint)
    hint = "pass --root to the data the model was trained with"
    if approach == "generative":
        train = load_dataset(name, "train", root)
        verify_split(meta, train, "train", hint)
        x = resize_images(train.images, size)
        ds, info = generative_dataset(model, x, train.labels, n_train + n_test, classes=classes,
                                      upsample=upsample, labeller_steps=labeller_steps,
                                      seed=seed, progress=progress, warn=False)
        tr, te = ds.subset(slice(0, n_train)), ds.subset(slice(n_train, n_train + n_test))
    else:  # reconstructive
        parts = []
        for split, n in (("train", n_train), ("test", n_test)):
            real = load_dataset(name, split, root)
            verify_split(meta, real, split, hint)
            real = real.subset(n, seed=seed)
            # shuffled: a split sorted by class (mnist-5k) would give probes of one class
            order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
            parts.append(reconstructive_dataset(model, resize_images(real.images[order], size),
                                                real.labels[order], classes=classes,
                                                upsample=upsample, warn=False))
        tr, te = parts
        info = dict(tr.info)
    tr.save(run.path / "train")
    te.save(run.path / "test")
    k, d = model.latent_dim, math.prod(tr.shape)
    dims, base, sqrt_m_d, label = split_dims(run, {"train": tr, "test": te}, k)  # warns if < k
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(te), generator=g)[:32]
    run.save_figure("samples", viz.sample_grid(te.images[idx], title=f"{approach} dataset "
                                               f"({tr.shape[-1]}×{tr.shape[-1]}, {label})"))
    counts = torch.bincount(tr.labels, minlength=len(tr.classes)).tolist()
    run.metrics.update({**{key: v for key, v in info.items() if key != "tangent_dim"},
                        "n_train": len(tr), "n_test": len(te), "k": k, "d": d,
                        "sqrt_k_over_d": sqrt_m_d, "random_baseline": base,
                        "class_counts": counts, "source": name, "tangent_dim": dims})
    return run.metrics


def _check_adversarial(adversarial: bool, eps: tuple[float, ...], pgd_steps: int) -> None:
    defaults = inspect.signature(run_manifold_train).parameters
    if not adversarial and (tuple(eps) != defaults["eps"].default
                            or pgd_steps != defaults["pgd_steps"].default):
        raise ValueError("eps and pgd_steps set the adversarial training: give them with "
                         "adversarial=True (CLI: --adversarial), or leave them out")


def run_manifold_train(run: Run, dataset_dir: str, *, arch: str = "seed001_cnn",
                       epochs: float = 5.0, lr: float = 1e-3, batch_size: int = 64,
                       adversarial: bool | dict[str, Any] | None = False,
                       eps: tuple[float, ...] = (1.0, 4.0, 8.0), pgd_steps: int = 100,
                       probe: int | None = None, random_labels: bool = False,
                       beside: str | None = None,
                       fraction_every: int = 100, checkpoint_every: int | None = 500,
                       resume: bool = False, allow_changes: tuple[str, ...] = (),
                       progress: bool = True, device: str = "cpu",
                       seed: int = 0) -> dict[str, Any]:
    """Train a classifier on a manifold dataset with Adam (Bordt et al.: lr 1e-4 decayed 10×
    every 10 epochs for 50 epochs; the CPU default here is lr 1e-3 for 5 epochs), standard or
    ℓ2-adversarial, recording the fraction of its gradient in tangent space on ``probe`` test
    images (default: the first 200, or all when fewer) every ``fraction_every`` steps
    (Figure 6).

    ``adversarial=True``: ℓ2-PGD training with a radius drawn from ``eps`` at every step and
    ``pgd_steps`` iterations (Bordt et al.: ε ∈ {1, 4, 8}, 100 iterations); a dict is passed
    to :func:`~manifoldlens.training.train_classifier` as it is.

    ``random_labels=True`` (§5.1, Figure 15 right): every training image gets a class drawn
    uniformly at random (seeded by ``seed``, independent of the image), so all the model can
    learn about the data manifold it learns without labels; test accuracy is at chance.
    Bordt et al. train 3000 epochs to fit the random labels. ``beside``: the run directory of
    another ``manifold train`` run (e.g. the same data with true labels) whose fraction over
    training is drawn in the same figure.
    """
    _check_adversarial(bool(adversarial), eps, pgd_steps)
    other = _beside_records(beside) if beside is not None else None
    if adversarial is True:
        adversarial = {"eps": tuple(float(e) for e in eps), "steps": pgd_steps}
    adversarial = adversarial or None
    tr = load_manifold_dataset(dataset_dir, "train")
    te = load_manifold_dataset(dataset_dir, "test")
    if probe is None:
        probe = min(200, len(te))
    elif probe > len(te):
        raise ValueError(f"probe={probe} exceeds the {len(te)} test images of {dataset_dir}")
    identity = {"train": manifold_split_sha256(tr), "test": manifold_split_sha256(te)}
    labels = tr.labels
    if random_labels:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(tr.num_classes, tr.labels.shape, generator=g)
    torch.manual_seed(seed)
    model = create_model(arch, tr.shape, tr.num_classes)
    probe_ts = te.subset(slice(0, probe)).tangent_space()
    cb = TangentFractionDuringTraining(te.images[:probe], probe_ts, every=fraction_every)
    res = train_classifier(model, (tr.images, labels), test_data=(te.images, te.labels),
                           optimizer="adam", lr=lr, batch_size=batch_size, epochs=epochs,
                           seed=seed, callbacks=[cb], progress=progress, device=device,
                           adversarial=adversarial,
                           run=RunOptions(run, checkpoint_every=checkpoint_every, resume=resume,
                                          allow_changes=allow_changes,
                                          metadata={"dataset": str(dataset_dir),
                                                    "dataset_sha256": identity,
                                                    "classes": tr.classes,
                                                    "random_labels": random_labels}))
    save_checkpoint(run.path / "model", model, metadata={
        "dataset": str(dataset_dir), "dataset_sha256": identity, "classes": tr.classes,
        "metrics": res.metrics, "adversarial": adversarial, "random_labels": random_labels})
    base, dims, label = tangent_baseline(probe_ts)  # the probe images' own dimensions
    curves: Any = cb.records
    if other is not None:
        curves = {_training_name(adversarial, random_labels): cb.records, **other}
    run.save_figure("fraction_over_training", viz.plot_fraction_over_training(
        curves, baseline=base, title="fraction of the gradient in tangent space"
        + (f" ({label})" if dims["below_k"] else "")))
    run.save_json("fraction_over_training", cb.records)
    fit = evaluate(model, (tr.images, labels), device=device)
    run.metrics.update({**res.metrics, "fraction_start": cb.records[0]["mean"],
                        "fraction_end": cb.records[-1]["mean"],
                        "fraction_max": max(r["mean"] for r in cb.records),
                        "random_baseline": base, "probe": probe, "adversarial": adversarial,
                        "random_labels": random_labels, "train_accuracy": fit["accuracy"],
                        "tangent_dim": dims})
    return run.metrics


def _training_name(adversarial: Any, random_labels: bool) -> str:
    """How a ``manifold train`` run is named in a figure beside another."""
    return ("ℓ2-adversarial" if adversarial else "standard") + (
        ", random labels" if random_labels else ", true labels")


def _beside_records(directory: str) -> dict[str, list[dict[str, float]]]:
    """The fraction-over-training records of another ``manifold train`` run, by its name."""
    path = Path(directory) / "fraction_over_training.json"
    if not path.is_file():
        raise FileNotFoundError(f"beside={directory!r}: {path} not found; give the run "
                                "directory of a finished `manifold train` run")
    records = json.loads(path.read_text())
    meta = Path(directory) / "run.json"
    metrics = json.loads(meta.read_text()).get("metrics", {}) if meta.is_file() else {}
    name = _training_name(metrics.get("adversarial"), bool(metrics.get("random_labels")))
    return {f"{name} ({Path(directory).name})": records}


def run_manifold_fraction(run: Run, checkpoints: list[str], dataset_dir: str, *,
                          methods: tuple[str, ...] = METHODS, n: int = 500,
                          names: list[str] | None = None, options: dict[str, dict] | None = None,
                          figure_images: int = 8, batch_size: int | None = None,
                          device: str = "cpu", seed: int = 0,
                          top_k: int | None = None) -> dict[str, Any]:
    """Fractions of each attribution in the data's tangent space (Figures 2, 3, 7) and in the
    classifier's own D_x, and the principal angles between D_x and the tangent space.

    ``checkpoints``: one or more classifiers (e.g. standard and ℓ2-robust) evaluated on the
    first ``n`` test images of the manifold dataset, attributions towards the predicted class.
    ``top_k=K``: D_x spanned by the K most probable classes' gradients only.

    Under ``torch.distributed`` each process explains a share of the images and rank 0
    writes the gathered results (the others return ``{}``), equal to a single process's
    for every method: SmoothGrad seeds image i's noise by (its seed, i) over the n images
    (``index_offset``), its seed, when none is given in ``options``, being the global RNG's
    draw on rank 0 (what one process draws), sent to the others.
    """
    names = names or [Path(c).parent.name or Path(c).stem for c in checkpoints]
    if len(names) != len(checkpoints):
        raise ValueError("give one name per checkpoint")
    if len(set(names)) != len(names):  # each names its figures and its entry in the results
        raise ValueError(f"the classifiers' names {list(names)} are not distinct; give "
                         "distinct ones (CLI: --names a,b)")
    full = load_manifold_dataset(dataset_dir, "test")
    if n > len(full):
        raise ValueError(f"n={n} exceeds the {len(full)} test images of {dataset_dir}")
    loaded = [load_checkpoint(c, map_location=device) for c in checkpoints]
    for ckpt, (_, meta) in zip(checkpoints, loaded, strict=True):
        verify_manifold_split(ckpt, meta, full, "test", dataset_dir)
    if n < world_size():
        raise ValueError(f"n={n} images cannot be shared by {world_size()} processes")
    te = full.subset(slice(0, n))
    ts = te.tangent_space()
    part = shard(n)  # this process's images (all of them in one process)
    ts_part = te.tangent_space(part)
    k, d = te.tangent.shape[1], math.prod(te.shape)
    base, dims, label = tangent_baseline(ts)  # each image's own dimension, not k
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randn(te.images.shape, generator=g)
    results: dict[str, Any] = {"k": k, "d": d, "tangent_dim": dims, "random_baseline": base,
                               "random_vectors": summary(ts.fraction(rnd)), "models": {}}
    by_method: dict[str, torch.Tensor] = {}
    for name, (model, _) in zip(names, loaded, strict=True):
        x = te.images[part].to(device)
        acc = evaluate(model, (x, te.labels[part].to(device)))["accuracy"]
        if world_size() > 1:  # the share's correct answers, summed
            acc = float(gather(torch.tensor([round(acc * x.shape[0])])).sum()) / n
        dx = TangentSpace.from_model(model, x, top_k=top_k).to(dtype=torch.float32, device="cpu")
        angles = gather(principal_angles(dx, ts_part))
        entry: dict[str, Any] = {"test_accuracy": acc, "methods": {},
                                 "dx_dim_mean": float(gather(dx.dim).double().mean()),
                                 "smallest_angle_deg": summary(angles[:, 0].rad2deg()),
                                 "mean_angle_deg": summary(angles.nanmean(1).rad2deg()),
                                 "random_in_dx": summary(gather(dx.fraction(rnd[part])))}
        if top_k is not None:
            entry["top_k"] = top_k
        parts = {}
        for method in methods:
            opts = dict((options or {}).get(method, {}))
            if method == "smoothgrad":  # the noise one process draws for these images
                opts["index_offset"] = opts.get("index_offset", 0) + part.start
                if opts.get("seed") is None:  # smoothgrad's own draw, made once on rank 0
                    opts["seed"] = broadcast_object(int(torch.randint(0, 2**62, (1,))))
            a = explain(model, x, method, batch_size=batch_size, **opts).cpu()
            in_dx = gather(dx.fraction(a))
            a = gather(a)
            f_t = ts.fraction(a)
            entry["methods"][method] = {"tangent": summary(f_t), "dx": summary(in_dx)}
            by_method[f"{method} ({name})" if len(checkpoints) > 1 else method] = f_t
            m = figure_images
            parts[method] = {"attribution": a[:m], "tangent": ts.project(a)[:m],
                             "orthogonal": ts.orthogonal(a)[:m]}
        if not is_main():
            continue
        run.save_figure(f"decomposition_{name}", viz.plot_attribution_decomposition(
            te.images[:figure_images], parts,
            labels=[te.classes[int(c)] for c in te.labels[:figure_images]],
            title=f"attributions of {name}: in the tangent space and orthogonal to it"))
        run.save_figure(f"principal_angles_{name}", viz.plot_principal_angles(
            angles, title=f"D_x of {name} against the data's tangent space"))
        results["models"][name] = entry
    if not is_main():
        return {}
    run.save_figure("fraction_by_method", viz.plot_fraction_by_method(
        {k_: v.numpy() for k_, v in by_method.items()}, baseline=base,
        title="fraction of each attribution in the tangent space"
        + (f" ({label})" if dims["below_k"] else "")))
    run.save_json("results", results)
    run.metrics.update({"random_baseline": base, "k": k, "d": d,
                        "mean_fraction": {m: float(v.mean()) for m, v in by_method.items()},
                        "tangent_dim": dims})
    return run.metrics


def run_manifold_roar(run: Run, checkpoint: str, dataset_dir: str, *,
                      methods: tuple[str, ...] = METHODS,
                      fractions: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
                      n_train: int | None = None, arch: str = "seed001_cnn",
                      epochs: float = 2.0, remove: str = "top", progress: bool = True,
                      device: str = "cpu", seed: int = 0, resume: bool = False
                      ) -> dict[str, Any]:
    """ROAR (Figure 5): rank pixels by each method's attribution for the trained classifier
    ``checkpoint``, by the tangent space's own importance ‖P_T e_i‖, and at random; remove
    a fraction, retrain a fresh ``arch`` and test.

    Resumable (``resume=True``, CLI ``--resume``): the rankings are stored in
    ``roar_scores.safetensors`` and every retrained cell in ``roar_progress.json`` as soon as
    it is measured; a resumed run with the same settings loads both and retrains only the
    missing cells (each cell is seeded alone, so the results equal an uninterrupted run).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tr = load_manifold_dataset(dataset_dir, "train")
    te = load_manifold_dataset(dataset_dir, "test")
    if n_train is not None and n_train > len(tr):
        raise ValueError(f"n_train={n_train} exceeds the {len(tr)} training images of "
                         f"{dataset_dir}")
    try:  # the manifest a .json, .safetensors, stem or directory path names
        model_sha256 = checkpoint_sha256(checkpoint)
        meta = checkpoint_metadata(checkpoint)
    except FileNotFoundError:
        model_sha256, meta = None, {}
    for split, part in (("train", tr), ("test", te)):
        verify_manifold_split(checkpoint, meta, part, split, dataset_dir)
    if n_train:
        tr = tr.subset(slice(0, n_train))
    settings = {"checkpoint": str(Path(checkpoint).resolve()), "dataset": str(
        Path(dataset_dir).resolve()), "methods": list(methods), "fractions": [
        float(q) for q in fractions], "n_train": len(tr), "arch": arch, "epochs": float(epochs),
        "remove": remove, "seed": seed, "device": str(device),
        # what the files held, not just where they were: a changed model or dataset is refused
        "checkpoint_sha256": model_sha256,
        "data_sha256": tensor_sha256(tr.images, tr.labels, te.images, te.labels)}
    progress_file = run.path / "roar_progress.json"
    scores_file = run.path / "roar_scores.safetensors"

    def check(stored: dict[str, Any], where: Path) -> None:
        if stored != settings:
            changed = differing(stored, settings)
            raise ValueError(f"cannot resume {run.path}: settings changed ({', '.join(changed)}) "
                             f"since {where.name} was written; use another --out or the run's "
                             "own settings")

    done: dict[str, dict[float, float]] = {}
    if resume and progress_file.exists():
        state = json.loads(progress_file.read_text())
        check(state["settings"], progress_file)
        done = {name: {float(q): acc for q, acc in cells.items()}
                for name, cells in state["cells"].items()}
    names = [*methods, "tangent space", "random"]
    if resume and scores_file.exists():
        with safe_open(str(scores_file), framework="pt") as f:
            meta = f.metadata() or {}
        check(json.loads(meta.get("settings", "{}")), scores_file)
        flat = load_file(str(scores_file))
        scores = {n: (flat[f"{n}/train"], flat[f"{n}/test"]) for n in names}
    else:
        model, _ = load_checkpoint(checkpoint, map_location=device)
        scores = {}
        for method in methods:
            scores[method] = tuple(explain(model, part.images.to(device), method).cpu()
                                   for part in (tr, te))
        scores["tangent space"] = (tangent_importance(tr.tangent_space()),
                                   tangent_importance(te.tangent_space()))
        g = torch.Generator().manual_seed(seed)
        scores["random"] = (torch.rand(tr.images.shape, generator=g),
                            torch.rand(te.images.shape, generator=g))
        flat = {f"{n}/{part}": t.contiguous() for n, pair in scores.items()
                for part, t in zip(("train", "test"), pair, strict=True)}
        write_atomic(scores_file, lambda tmp: save_file(
            flat, str(tmp), metadata={"settings": json.dumps(settings)}))

    def store(name: str, q: float, acc: float) -> None:
        done.setdefault(name, {})[q] = acc
        run.save_json(progress_file.name, {"settings": settings, "cells": {
            n: {str(k): v for k, v in cells.items()} for n, cells in done.items()}})

    def make():
        torch.manual_seed(seed)
        return create_model(arch, tr.shape, tr.num_classes)

    res = roar(make, (tr.images, tr.labels), (te.images, te.labels), scores, fractions,
               remove=remove, train_options={"epochs": epochs, "seed": seed, "device": device},
               progress=progress, done=done, on_result=store)
    run.save_figure("roar", viz.plot_roar(res, remove=remove,
                                          title=f"ROAR: remove the {remove} pixels, retrain"))
    run.save_json("results", res)
    run.metrics.update({"roar": res, "n_train": len(tr), "epochs": epochs})
    return run.metrics


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

ARCHS = ["seed001_cnn", "small_cnn", "mlp", "resnet18", "resnet18_cifar"]


def _vae(args: argparse.Namespace, run: Run) -> None:
    run_manifold_vae(run, data=args.data, root=args.root, kind=args.model, size=args.size,
                     latent_dim=args.latent, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                     limit=args.limit, steps=args.steps, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, resume=args.resume,
                     allow_changes=allow_change(args),
                     progress=progress(args), device=args.device, seed=args.seed)


def _dataset(args: argparse.Namespace, run: Run) -> None:
    run_manifold_dataset(run, args.checkpoint, n_train=args.n_train, n_test=args.n_test,
                         approach=args.approach, upsample=args.upsample,
                         labeller_steps=args.labeller_steps, root=args.root,
                         progress=progress(args), seed=args.seed)


def _train(args: argparse.Namespace, run: Run) -> None:
    run_manifold_train(run, args.dataset, arch=args.arch, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, adversarial=args.adversarial, eps=args.eps,
                       pgd_steps=args.pgd_steps, fraction_every=args.fraction_every,
                       random_labels=args.random_labels, beside=args.beside,
                       resume=args.resume, allow_changes=allow_change(args),
                       progress=progress(args), device=args.device,
                       seed=args.seed)


def _fraction(args: argparse.Namespace, run: Run) -> None:
    run_manifold_fraction(run, args.checkpoints, args.dataset, methods=args.methods, n=args.n,
                          names=list(args.names) if args.names else None, device=args.device,
                          seed=args.seed, top_k=args.top_k)


def _roar(args: argparse.Namespace, run: Run) -> None:
    run_manifold_roar(run, args.checkpoint, args.dataset, methods=args.methods,
                      fractions=args.fractions, n_train=args.n_train, arch=args.arch,
                      epochs=args.epochs, remove=args.remove, progress=progress(args),
                      resume=args.resume, device=args.device, seed=args.seed)


def _add_vae(sub: Any) -> None:
    fn = run_manifold_vae
    p = add_command(sub, "vae", _vae, "a (β-TC)VAE or autoencoder of the data manifold")
    add_common(p, fn)
    add_data(p, fn)
    option(p, "--model", fn, "kind", choices=list(KINDS), help="the generative model")
    option(p, "--size", fn, type=int, help="images resized to size × size")
    option(p, "--latent", fn, "latent_dim", type=int, help="latent dimension k")
    option(p, "--alpha", fn, type=float, low=0.0, help="β-TCVAE weight of the index-code MI")
    option(p, "--beta", fn, type=float, low=0.0, help="β-TCVAE weight of the total correlation")
    option(p, "--gamma", fn, type=float, low=0.0, help="β-TCVAE weight of the dimension-wise KL")
    option(p, "--limit", fn, type=int, help="train on a stratified subset of this size")
    add_length(p, fn, epochs="10 when --steps is not given")
    option(p, "--lr", fn, type=float, help="Adam learning rate")
    option(p, "--batch-size", fn, type=int, help="batch size")
    add_resume(p, fn)


def _add_dataset(sub: Any) -> None:
    fn = run_manifold_dataset
    p = add_command(sub, "dataset", _dataset, "a dataset on a known manifold (Algorithm 1)")
    p.add_argument("checkpoint", help="<run>/model.json of `manifold vae`")
    add_common(p, fn)
    option(p, "--root", fn, help="directory of the source dataset's IDX files (default: the "
           "one `manifold vae` recorded, else $MANIFOLDLENS_DATA, else /usr/share/datasets/<name>)")
    option(p, "--approach", fn, choices=["generative", "reconstructive"],
           help="decode latents and label them (generative) or reconstruct real images")
    option(p, "--n-train", fn, type=int, help="training images")
    option(p, "--n-test", fn, type=int, help="test images")
    option(p, "--upsample", fn, type=int, help="bilinear upsampling to this side (MNIST256)")
    option(p, "--labeller-steps", fn, type=int, help="training steps of the labelling function")


def _add_train(sub: Any) -> None:
    fn = run_manifold_train
    p = add_command(sub, "train", _train, "a classifier on a manifold dataset (Figure 6)")
    p.add_argument("dataset", help="run directory of `manifold dataset`")
    add_common(p, fn)
    option(p, "--arch", fn, choices=ARCHS, help="architecture")
    option(p, "--epochs", fn, type=float, help="training epochs")
    option(p, "--lr", fn, type=float, help="Adam learning rate")
    option(p, "--batch-size", fn, type=int, help="batch size")
    option(p, "--adversarial", fn, action="store_true", help="ℓ2-PGD adversarial training")
    option(p, "--eps", fn, type=floats,
           help="comma-separated ℓ2 radii, one drawn at every step (Bordt et al.: 1,4,8)")
    option(p, "--pgd-steps", fn, type=int, help="PGD iterations (Bordt et al.: 100)")
    option(p, "--fraction-every", fn, type=int,
           help="steps between measurements of the gradient's fraction in tangent space")
    option(p, "--random-labels", fn, action="store_true",
           help="train on classes drawn uniformly at random (Bordt et al. §5.1)")
    option(p, "--beside", fn, metavar="RUN",
           help="another `manifold train` run whose fraction over training is drawn beside")
    add_resume(p, fn)
    p.set_defaults(check=_check_train)


def _check_train(args: argparse.Namespace) -> None:
    """``manifold train``'s checks across options, before the run directory exists."""
    _check_adversarial(args.adversarial, args.eps, args.pgd_steps)
    if args.beside is not None:
        _beside_records(args.beside)


def _add_fraction(sub: Any) -> None:
    fn = run_manifold_fraction
    p = add_command(sub, "fraction", _fraction,
                    "attributions in tangent space (Figures 2, 3, 7)")
    p.add_argument("dataset", help="run directory of `manifold dataset`")
    p.add_argument("checkpoints", nargs="+", help="classifiers (<run>/model.json)")
    add_common(p, fn)
    option(p, "--names", fn, type=names,
           help="comma-separated names of the classifiers (default: their run directories)")
    option(p, "--methods", fn, type=names, help="comma-separated attribution methods")
    option(p, "--n", fn, type=int, aliases=("--count",),  # torchrun's parser takes --n
           help="test images")
    option(p, "--top-k", fn, type=int,
           help="D_x from the K most probable classes' gradients (default: all C)")
    p.set_defaults(distributed=True)  # shares its images under torchrun


def _add_roar(sub: Any) -> None:
    fn = run_manifold_roar
    p = add_command(sub, "roar", _roar, "remove and retrain (Figure 5)")
    p.add_argument("dataset", help="run directory of `manifold dataset`")
    p.add_argument("checkpoint", help="the classifier whose attributions rank the pixels")
    add_common(p, fn)
    option(p, "--methods", fn, type=names, help="comma-separated attribution methods")
    option(p, "--fractions", fn, type=floats, low=0.0, high=1.0,
           help="comma-separated fractions of pixels removed")
    option(p, "--remove", fn, choices=["top", "bottom"],
           help="remove the most (top) or least (bottom) important pixels")
    option(p, "--n-train", fn, type=int, help="retrain on the first n training images "
           "(default: all)")
    option(p, "--epochs", fn, type=float, help="training epochs of every retrained classifier")
    option(p, "--arch", fn, choices=ARCHS, help="architecture of the retrained classifiers")
    add_resume(p, fn)


def add_arguments(sub: Any) -> None:
    """Register ``manifold`` and its subcommands on the top-level ``sub``-parsers."""
    man = sub.add_parser("manifold", help="Bordt et al. 2023: explanations against the data "
                         "manifold", description="Explanations against the data manifold, "
                         "after Bordt et al. (2023).")
    msub = man.add_subparsers(dest="experiment", required=True)
    _add_vae(msub)
    _add_dataset(msub)
    _add_train(msub)
    _add_fraction(msub)
    _add_roar(msub)
    manifold_checks.add_subcommands(msub)
