"""``manifoldlens ood``: the data leaf put to work — out-of-distribution detection against the
flows' likelihood, and denoising by projection onto the data leaf (Grementieri & Fioresi's
future work, §1 and §6).

In-distribution: a dataset (Fashion-MNIST by default); the classifier (seed 001's CNN), the
Glow, a background Glow (trained on perturbed images, Ren et al. 2019) and a VAE are trained
on its training split — or loaded from ``--classifier`` / ``--flow`` / ``--background`` /
``--vae`` — and scored on test images. OOD sets: another dataset (MNIST digits,
``mnist-5k``), seed 001's noisy images (test images moved 50/250/1000 steps across the leaves,
on ker G), Gaussian-noised and uniform-noise images, and left–right flips. Every score of
:mod:`manifoldlens.ood` is computed on every set; the leaf distance (horizontal paths, the
expensive one) on the first ``leaf_n`` images of each. The run directory gets the table
(``results.json``, ``table.md``), ROC curves, score histograms, the AUROC map, and the
denoising of the noisy sets by the leaf projection against the VAE and the flow
(``denoise.json``, ``denoise_<set>.png``).

Everything expensive is kept in the run directory (models, ``sets.npz``,
``scores/<set>.npz``) with the settings it was made with; ``--resume`` reuses what still
matches and recomputes the rest.

References: see :mod:`manifoldlens.ood` and :mod:`manifoldlens.denoise`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import ood, viz
from .._checks import check_number, check_positive_int
from .._utils import differing, json_text, model_fingerprint
from ..data import load_dataset
from ..denoise import denoise_flow, denoise_vae, leaf_projection, psnr
from ..flows.training import evaluate_flow, train_flow
from ..generative import VAE, train_generative
from ..models import create_model, load_checkpoint, save_checkpoint
from ..runs import Run
from ..training import evaluate, train_classifier
from .common import add_command, add_common, add_data, add_resume, ints, option, progress
from .flow import default_flow

__all__ = ["add_arguments", "run_ood", "SCORES"]

#: the scores of the table, by family (higher = more OOD for each); the entropy of G's
#: spectrum is left out: exp of it is the effective rank, so it ranks points the same
SCORES = {
    "density": ("bpd", "typicality", "complexity", "likelihood_ratio"),
    "classifier": ("msp", "energy", "mahalanobis"),
    "geometry": ("trace_G", "stable_rank_G", "effective_rank_G", "leaf_distance", "leaf_share",
                 "score_in_D", "score_in_vae_tangent"),
    "control": ("nearest_distance", "vae_reconstruction"),
}
_LEAF = ("leaf_distance", "leaf_share")  # computed on the first leaf_n images of each set


@dataclass
class _Models:
    classifier: nn.Module
    flow: nn.Module
    background: nn.Module
    vae: nn.Module
    info: dict[str, Any]


def _settings_json(obj: Any) -> Any:
    return json.loads(json_text(obj))


def _model(run: Run, name: str, given: str | None, settings: dict[str, Any], train,
           device: str) -> tuple[nn.Module, dict[str, Any]]:
    """A model from ``given``, else from ``<run>/<name>.json`` if trained there with the same
    ``settings``, else trained by ``train()`` (returning ``(model, metadata)``) and saved."""
    if given is not None:
        model, meta = load_checkpoint(given, map_location=device)
        return model, {**meta, "source": str(given)}
    path = run.path / f"{name}.json"
    settings = _settings_json(settings)
    if path.exists():
        model, meta = load_checkpoint(path, map_location=device)
        if meta.get("settings") != settings:
            raise ValueError(f"{path} was trained with other settings (differing: "
                             f"{', '.join(differing(meta.get('settings') or {}, settings))}); "
                             f"delete it, or pass --{name} {path} to use it as it is")
        return model, {**meta, "source": str(path)}
    start = time.perf_counter()
    model, meta = train()
    meta = {**meta, "settings": settings, "train_seconds": round(time.perf_counter() - start, 1)}
    save_checkpoint(run.path / name, model, metadata=meta)
    return model.eval(), {**meta, "source": str(path)}


def _train_models(run: Run, train_ds, test_ds, *, classifier: str | None, flow: str | None,
                  background: str | None, vae: str | None, classifier_steps: int,
                  flow_steps: int, background_steps: int, vae_steps: int,
                  flow_size: tuple[int, int, int], background_rate: float, batch_size: int,
                  seed: int, device: str, show: bool) -> _Models:
    """The four models, trained at CPU sizes unless given (see :func:`run_ood`)."""
    shape = tuple(train_ds.images.shape[1:])
    x, held_out = train_ds.images, test_ds.images[-1000:]
    levels, depth, channels = flow_size
    base = {"data": train_ds.name, "batch_size": batch_size, "seed": seed}

    def cls():
        torch.manual_seed(seed)
        model = create_model("seed001_cnn", shape, train_ds.num_classes)
        train_classifier(model, train_ds, optimizer="adam", lr=1e-3, batch_size=batch_size,
                         steps=classifier_steps, seed=seed, device=device, progress=show)
        m = evaluate(model.eval(), (test_ds.images, test_ds.labels), device=device)
        return model, {"data": train_ds.name, "test_accuracy": m["accuracy"]}

    def glow(data: torch.Tensor, steps: int, what: str):
        def fit():
            torch.manual_seed(seed)
            model = default_flow("glow", shape, levels=levels, depth=depth,
                                 hidden_channels=channels)
            train_flow(model, data, n_bins=256, lr=1e-3, batch_size=batch_size, steps=steps,
                       warmup_steps=min(200, steps // 4), seed=seed, device=device,
                       progress=show)
            bpd = evaluate_flow(model.eval(), held_out, n_bins=256, device=device)
            return model, {"data": train_ds.name, "trained_on": what, **bpd}
        return fit

    def vae_fit():
        torch.manual_seed(seed)
        model = VAE(shape, latent_dim=10, network="mlp", hidden=256)
        res = train_generative(model, x, steps=vae_steps, batch_size=batch_size, lr=1e-3,
                               seed=seed, progress=show, device=device, test_images=held_out)
        return model, {"data": train_ds.name, **res.metrics}

    c, cm = _model(run, "classifier", classifier, {**base, "steps": classifier_steps,
                                                   "arch": "seed001_cnn"}, cls, device)
    f, fm = _model(run, "flow", flow, {**base, "steps": flow_steps, "size": flow_size},
                   glow(x, flow_steps, "training images"), device)
    noisy = ood.perturb(x, background_rate, seed=seed + 1)
    b, bm = _model(run, "background", background,
                   {**base, "steps": background_steps, "size": flow_size,
                    "rate": background_rate},
                   glow(noisy, background_steps, f"perturbed training images, rate "
                        f"{background_rate}"), device)
    v, vm = _model(run, "vae", vae, {**base, "steps": vae_steps}, vae_fit, device)
    return _Models(c, f, b, v, {"classifier": cm, "flow": fm, "background": bm, "vae": vm})


def _cached(run: Run, name: str, settings: dict[str, Any], compute) -> dict[str, np.ndarray]:
    """``<run>/<name>.npz`` if it was made with ``settings`` (``<name>.json``), else
    ``compute()`` (a dict of arrays), saved there."""
    meta, arrays = run.path / f"{name}.json", run.path / f"{name}.npz"
    settings = _settings_json(settings)
    if meta.exists() and arrays.exists() and json.loads(meta.read_text()) == settings:
        with np.load(arrays) as f:
            return {k: f[k] for k in f.files}
    out = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
           for k, v in compute().items()}
    run.save_arrays(name, **out)
    run.save_json(name, settings)
    return out


def _make_sets(model: nn.Module, test_ds, ood_ds, *, n_test: int, n_noise: int,
               leaf_steps: tuple[int, ...], noise_step_size: float, sigma: float, seed: int,
               device: str, show: bool) -> dict[str, torch.Tensor]:
    """Arrays ``<set>/x``, ``<set>/labels`` (−1: none) and ``<set>/clean`` (the image a noisy
    one was made from) of the in-distribution test images and every OOD set."""
    if 2 * n_test > len(test_ds):
        raise ValueError(f"n_test = {n_test}: needs 2 · n_test ≤ the {len(test_ds)} test images")
    if n_noise > n_test:
        raise ValueError(f"n_noise = {n_noise} exceeds n_test = {n_test}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(test_ds), generator=g)
    ins, src = perm[:n_test], perm[n_test: 2 * n_test]
    clean, labels = test_ds.images[src], test_ds.labels[src]
    out = {f"{test_ds.name}/x": test_ds.images[ins], f"{test_ds.name}/labels": test_ds.labels[ins]}
    k = min(n_test, len(ood_ds))
    pick = torch.randperm(len(ood_ds), generator=g)[:k]
    out[f"{ood_ds.name}/x"] = ood_ds.images[pick]
    out[f"{ood_ds.name}/labels"] = torch.full((k,), -1)
    noisy = ood.leaf_crossing_noise(model, clean[:n_noise].to(device), leaf_steps,
                                    step_size=noise_step_size, seed=seed, progress=show)
    derived = {f"leaf-{s}": ood.quantize(v.cpu()) for s, v in noisy.items()}
    derived[f"gaussian-{sigma:g}"] = ood.gaussian_noise(clean, sigma, seed=seed)
    derived["flip"] = clean.flip(-1)
    for name, x in derived.items():
        out[f"{name}/x"], out[f"{name}/labels"] = x, labels[: len(x)]
        out[f"{name}/clean"] = clean[: len(x)]
    out["uniform/x"] = ood.uniform_noise(n_test, tuple(clean.shape[1:]), seed=seed)
    out["uniform/labels"] = torch.full((n_test,), -1)
    return out


def _split_sets(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, torch.Tensor]]:
    sets: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in arrays.items():
        name, _, field = key.rpartition("/")
        sets.setdefault(name, {})[field] = torch.from_numpy(np.asarray(v))
    return sets


def _score_set(m: _Models, x: torch.Tensor, ctx: dict[str, Any], o: dict[str, Any],
               show: bool) -> dict[str, torch.Tensor]:
    """Every score of the table on one set (the leaf ones on its first ``leaf_n`` images),
    and the leaf projections (for denoising)."""
    x = x.float().to(o["device"])
    bpd = ood.flow_bits_per_dim(m.flow, x, seed=o["seed"]).cpu()
    bg = ood.flow_bits_per_dim(m.background, x, seed=o["seed"]).cpu()
    feats = ood.penultimate_features(m.classifier, x)
    grad = ood.flow_score(m.flow, x)  # ∇log p(x), shared by the two fractions
    geo = ood.data_matrix_scores(m.classifier, x, score=grad, progress=show)
    out = {
        "bpd": bpd, "typicality": ood.typicality(bpd, ctx["reference_bpd"]),
        "complexity": ood.complexity_corrected(bpd, x), "likelihood_ratio": bpd - bg,
        "msp": ood.max_softmax(m.classifier, x), "energy": ood.energy(m.classifier, x),
        "mahalanobis": ood.mahalanobis(feats, ctx["gaussian"]),
        "trace_G": geo["trace"], "stable_rank_G": geo["stable_rank"],
        "effective_rank_G": geo["effective_rank"],
        "score_in_D": geo["score_in_leaf"],
        "score_in_vae_tangent": ood.score_fraction_in_tangent(m.vae, None, x, score=grad),
        "nearest_distance": ood.nearest_distance(x, ctx["reference"]),
        "vae_reconstruction": ood.reconstruction_error(m.vae, x),
    }
    proj = leaf_projection(m.classifier, x[: o["leaf_n"]], ctx["reference"],
                           neighbours=o["neighbours"], max_steps=o["leaf_max_steps"],
                           step_size=o["leaf_step_size"], batch_size=o["leaf_batch"],
                           progress=show)
    start = proj.start_distance
    out.update(leaf_distance=proj.distance,
               leaf_share=torch.where(start > 0, proj.distance / start.clamp_min(1e-30), 0.0),
               leaf_points=proj.point, leaf_source=proj.source, leaf_steps=proj.steps)
    return {k: v.detach().cpu() for k, v in out.items()}


def _table(scores: dict[str, dict[str, np.ndarray]], in_name: str, bootstrap: int,
           seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """``table[score][set]``: :func:`~manifoldlens.ood.ood_metrics` of every score on every
    OOD set against the in-distribution set."""
    names = [s for fam in SCORES.values() for s in fam]
    table: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in names}
    for set_name, sc in scores.items():
        if set_name == in_name:
            continue
        for s in names:
            table[s][set_name] = ood.ood_metrics(scores[in_name][s], sc[s], bootstrap=bootstrap,
                                                 seed=seed)
    return table


def _markdown(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    sets = list(next(iter(table.values())))
    out = []
    for key, what in (("auroc", "AUROC"), ("aupr", "AUPR (OOD positive)"),
                      ("fpr95", "FPR at 95 % TPR (lower is better)")):
        out += [f"### {what} [95 % bootstrap interval]", "",
                "| score | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
        for s, row in table.items():
            cells = [f"{row[k][key]:.3f} [{row[k][key + '_ci'][0]:.2f}, "
                     f"{row[k][key + '_ci'][1]:.2f}]" if row[k][key + "_ci"] else
                     f"{row[k][key]:.3f}" for k in sets]
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _denoise(run: Run, m: _Models, sets: dict[str, dict[str, torch.Tensor]],
             scores: dict[str, dict[str, np.ndarray]], reference: torch.Tensor, *,
             temperature: float, device: str) -> dict[str, Any]:
    """PSNR and classifier accuracy of each noisy set's first ``leaf_n`` images before and
    after denoising: the leaf projection, the nearest clean neighbour it starts from, the
    VAE's reconstruction and the flow's ``dec(T · enc(x))`` (PSNR over the finite outputs;
    ``nonfinite`` counts the others, drawn black and counted wrong)."""

    def accuracy(y: torch.Tensor, labels: torch.Tensor) -> float:
        """Share classified right; a non-finite image counts as wrong."""
        ok = torch.isfinite(y.reshape(len(y), -1)).all(1)
        with torch.no_grad():
            pred = m.classifier(torch.nan_to_num(y).to(device)).argmax(1).cpu()
        return float(((pred == labels) & ok).double().mean())

    out: dict[str, Any] = {}
    for name, s in sets.items():
        if "clean" not in s or name == "flip":
            continue
        sc = scores[name]
        k = len(sc["leaf_distance"])
        clean, noisy, labels = s["clean"][:k].float(), s["x"][:k].float(), s["labels"][:k]
        rows = {
            "noisy": noisy,
            "leaf projection": torch.from_numpy(sc["leaf_points"]).float().clamp(0, 1),
            "nearest neighbour": reference[torch.from_numpy(sc["leaf_source"]).long()],
            "VAE reconstruction": denoise_vae(m.vae, noisy.to(device)).cpu(),
            f"flow dec(T·enc), T = {temperature:g}": denoise_flow(
                m.flow, noisy.to(device), temperature=temperature).cpu(),
        }
        res: dict[str, Any] = {"n": k, "clean_accuracy": accuracy(clean, labels)}
        for method, y in rows.items():
            ok = torch.isfinite(y.reshape(k, -1)).all(1)  # the flow's inverse may break
            p = psnr(y[ok], clean[ok]).double() if ok.any() else torch.zeros(0)
            p = p[torch.isfinite(p)]
            se = float(p.std() / p.numel() ** 0.5) if p.numel() > 1 else float("nan")
            res[method] = {"psnr_mean": float(p.mean()) if p.numel() else float("nan"),
                           "psnr_se": se, "accuracy": accuracy(y, labels),
                           "nonfinite": int((~ok).sum())}
        out[name] = res
        run.save_figure(f"denoise_{name}", viz.plot_denoising(
            {"clean": clean, **{k: torch.nan_to_num(v) for k, v in rows.items()}}, n=8,
            title=f"Denoising {name}: rows clean, noisy, then each method"))
    return out


def _figures(run: Run, scores: dict[str, dict[str, np.ndarray]], table: dict[str, Any],
             in_name: str) -> None:
    names = list(table)
    curves = {s: {k: ood.roc_curve(scores[in_name][s], v[s]) for k, v in scores.items()
                  if k != in_name} for s in names}
    aurocs = {s: {k: table[s][k]["auroc"] for k in table[s]} for s in names}
    run.save_figure("roc", viz.plot_roc_curves(
        curves, aurocs=aurocs, title=f"ROC curves against {in_name} test images "
        "(OOD positive); dashed: chance"))
    run.save_figure("histograms", viz.plot_score_histograms(
        {s: {k: v[s] for k, v in scores.items()} for s in names}, in_name=in_name,
        title=f"Scores per set (grey: {in_name} test images)"))
    run.save_figure("auroc", viz.plot_auroc_table(
        aurocs, title=f"AUROC of each score against {in_name} test images"))


#: integer options and their minimum; number options and (low, high, low excluded)
_COUNTS = {"classifier_steps": 1, "flow_steps": 1, "background_steps": 1, "vae_steps": 1,
           "batch_size": 1, "n_test": 1, "n_noise": 1, "n_reference": 1, "leaf_n": 1,
           "leaf_max_steps": 0, "neighbours": 1, "leaf_batch": 1, "bootstrap": 0, "seed": 0}
_NUMBERS = {"background_rate": (0.0, 1.0, False), "noise_step_size": (0.0, None, True),
            "sigma": (0.0, None, False), "leaf_step_size": (0.0, None, True),
            "temperature": (0.0, 1.0, True)}


def _check_options(o: dict[str, Any]) -> None:
    """Every option of :func:`run_ood` in range before any work (a ValueError names the
    option and its range)."""
    for name, minimum in _COUNTS.items():
        check_positive_int(o[name], name, minimum=minimum)
    for name, (low, high, strict) in _NUMBERS.items():
        check_number(o[name], name, low=low, high=high, strict=strict)
    for name, size in (("leaf_steps", None), ("flow_size", 3)):
        seq = tuple(o[name])
        if (size is not None and len(seq) != size) or not seq or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in seq):
            what = ("three positive integers (levels, depth, channels)" if size else
                    "positive integers")
            raise ValueError(f"{name} must be {what}, got {o[name]!r}")
    if o["leaf_n"] > o["n_noise"]:
        raise ValueError(f"leaf_n = {o['leaf_n']} must be at most n_noise = {o['n_noise']} "
                         "(the size of the leaf-crossing sets)")


def run_ood(
    run: Run, *, data: str = "fashion-mnist", root: str | None = None,
    ood_data: str = "mnist-5k", classifier: str | None = None, flow: str | None = None,
    background: str | None = None, vae: str | None = None, classifier_steps: int = 600,
    flow_steps: int = 500, background_steps: int = 250, vae_steps: int = 1500,
    flow_size: tuple[int, int, int] = (2, 4, 32), background_rate: float = 0.2,
    batch_size: int = 64, n_test: int = 500, n_noise: int = 32,
    leaf_steps: tuple[int, ...] = (50, 250, 1000), noise_step_size: float = 0.1,
    sigma: float = 0.1, n_reference: int = 5000, leaf_n: int = 32, leaf_max_steps: int = 30,
    leaf_step_size: float = 0.25, neighbours: int = 1, leaf_batch: int = 64,
    temperature: float = 0.7, bootstrap: int = 1000, progress: bool = True,
    device: str = "cpu", seed: int = 0,
) -> dict[str, Any]:
    """The OOD table and the denoising comparison (see the module docstring). Models are
    trained on ``data``'s training split unless given: seed 001's CNN (Adam 10⁻³,
    ``classifier_steps``), a Glow of ``flow_size = (levels, depth, channels)``
    (``flow_steps``), the same Glow on training images perturbed at ``background_rate``
    (``background_steps``) and an MLP VAE (k = 10, ``vae_steps``). Sets of ``n_test`` images
    (``n_noise`` for the leaf-crossing ones, ``leaf_steps`` steps of ``noise_step_size``);
    the leaf distance and the denoising on the first ``leaf_n`` of each, with
    ``leaf_max_steps`` capped steps of ``leaf_step_size`` from the ``neighbours`` nearest of
    ``n_reference`` training images."""
    _check_options(dict(locals()))
    clock = [("start", time.perf_counter(), time.process_time())]
    train_ds, test_ds = load_dataset(data, "train", root), load_dataset(data, "test", root)
    ood_ds = load_dataset(ood_data, "test")
    if n_reference > len(train_ds):
        raise ValueError(f"n_reference = {n_reference} exceeds the {len(train_ds)} training "
                         "images")
    m = _train_models(run, train_ds, test_ds, classifier=classifier, flow=flow,
                      background=background, vae=vae, classifier_steps=classifier_steps,
                      flow_steps=flow_steps, background_steps=background_steps,
                      vae_steps=vae_steps, flow_size=tuple(flow_size),
                      background_rate=background_rate, batch_size=batch_size, seed=seed,
                      device=device, show=progress)
    clock.append(("models", time.perf_counter(), time.process_time()))
    fp = {k: model_fingerprint(getattr(m, k)) for k in ("classifier", "flow", "background",
                                                         "vae")}
    set_opts = {"n_test": n_test, "n_noise": n_noise, "leaf_steps": list(leaf_steps),
                "noise_step_size": noise_step_size, "sigma": sigma, "seed": seed,
                "data": data, "ood_data": ood_data}
    sets = _split_sets(_cached(run, "sets", {**set_opts, "classifier": fp["classifier"]},
                               lambda: _make_sets(m.classifier, test_ds, ood_ds, n_test=n_test,
                                                  n_noise=n_noise, leaf_steps=tuple(leaf_steps),
                                                  noise_step_size=noise_step_size, sigma=sigma,
                                                  seed=seed, device=device, show=progress)))
    clock.append(("sets", time.perf_counter(), time.process_time()))
    bank = train_ds.subset(n_reference, seed=seed)
    ref = bank.images.to(device)
    feats = ood.penultimate_features(m.classifier, ref)
    ctx = {"reference": ref, "gaussian": ood.fit_class_gaussian(feats, bank.labels.to(device)),
           "reference_bpd": ood.flow_bits_per_dim(m.flow, ref[:1000], seed=seed)}
    o = {"device": device, "seed": seed, "leaf_n": leaf_n, "neighbours": neighbours,
         "leaf_max_steps": leaf_max_steps, "leaf_step_size": leaf_step_size,
         "leaf_batch": leaf_batch}
    score_opts = {**set_opts, **o, "n_reference": n_reference, "models": fp}
    scores = {}
    for name, s in sets.items():
        scores[name] = _cached(run, f"scores/{name}", score_opts,
                               lambda s=s: _score_set(m, s["x"], ctx, o, progress))
        run.log(stage="scores", set=name, seconds=round(time.perf_counter() - clock[-1][1], 1))
    clock.append(("scores", time.perf_counter(), time.process_time()))
    table = _table(scores, test_ds.name, bootstrap, seed)
    run.save_json("results", table)
    run.file("table.md").write_text(_markdown(table))
    _figures(run, scores, table, test_ds.name)
    den = _denoise(run, m, sets, scores, bank.images, temperature=temperature, device=device)
    run.save_json("denoise", den)
    clock.append(("table, figures, denoising", time.perf_counter(), time.process_time()))
    bpd = {k: float(np.mean(v["bpd"])) for k, v in scores.items()}
    run.metrics.update({
        "models": {k: {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float, str))}
                   for k, v in m.info.items()},
        "mean_bpd": bpd,
        "mnist_more_likely": bool(bpd[ood_ds.name] < bpd[test_ds.name]),
        "auroc": {s: {k: round(v["auroc"], 4) for k, v in row.items()}
                  for s, row in table.items()},
        "denoise": den,
        "sizes": {"n_test": n_test, "n_noise": n_noise, "leaf_n": leaf_n,
                  "n_reference": n_reference, "sets": {k: int(len(v["x"]))
                                                        for k, v in sets.items()}},
        # wall and CPU seconds (all threads) of each stage: the machine may be shared
        "seconds": {**{f"{a[0]}": {"wall": round(a[1] - b[1], 1), "cpu": round(a[2] - b[2], 1)}
                       for a, b in zip(clock[1:], clock[:-1], strict=True)},
                    "total": {"wall": round(clock[-1][1] - clock[0][1], 1),
                              "cpu": round(clock[-1][2] - clock[0][2], 1)}},
    })
    return run.metrics


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace, run: Run) -> None:
    fn_args = {k: getattr(args, k) for k in _OPTIONS}
    run_ood(run, data=args.data, root=args.root, progress=progress(args), device=args.device,
            seed=args.seed, **fn_args)


#: option → help; the defaults come from :func:`run_ood`
_OPTIONS = {
    "ood_data": "the other dataset (its test split) scored as OOD",
    "classifier": "classifier checkpoint (.json) to use instead of training one",
    "flow": "Glow checkpoint (.json) to use instead of training one",
    "background": "background flow checkpoint (.json) for the likelihood ratio",
    "vae": "VAE checkpoint (.json) to use instead of training one",
    "classifier_steps": "Adam steps of seed 001's CNN when trained here",
    "flow_steps": "steps of the Glow when trained here",
    "background_steps": "steps of the background Glow when trained here",
    "vae_steps": "steps of the VAE when trained here",
    "flow_size": "Glow levels,depth,channels when trained here",
    "background_rate": "share of pixels replaced for the background model (Ren et al.)",
    "batch_size": "training batch size",
    "n_test": "images per set (in-distribution, MNIST, Gaussian, uniform, flips)",
    "n_noise": "images moved across the leaves (the leaf-<steps> sets)",
    "leaf_steps": "comma-separated steps across the leaves of the noisy sets",
    "noise_step_size": "step length across the leaves",
    "sigma": "standard deviation of the Gaussian noise",
    "n_reference": "training images the neighbours and the Mahalanobis fit come from",
    "leaf_n": "images per set given a leaf distance (the expensive score) and denoised",
    "leaf_max_steps": "at most this many horizontal steps per leaf distance (the budget)",
    "leaf_step_size": "horizontal step length α (capped at ‖v‖)",
    "neighbours": "nearest training images each leaf distance starts from",
    "leaf_batch": "paths run together",
    "temperature": "T of the flow baseline dec(T · enc(x))",
    "bootstrap": "bootstrap resamples of each interval (0: none)",
}


def add_arguments(sub: Any) -> None:
    """Register ``ood`` on the top-level ``sub``-parsers."""
    p = add_command(sub, "ood", _run,
                    "OOD detection with the data leaf vs the flows' likelihood, and denoising",
                    description=__doc__.split("\n\n")[0].replace("``", ""))
    p.set_defaults(check=lambda args: _check_options(vars(args)))
    add_common(p, run_ood)
    add_data(p, run_ood)
    for name, text in _OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        default = run_ood.__kwdefaults__[name]
        if name in ("leaf_steps", "flow_size"):
            option(p, flag, run_ood, type=ints, help=text)
        elif isinstance(default, bool) or default is None or isinstance(default, str):
            option(p, flag, run_ood, help=text)
        elif isinstance(default, int):
            option(p, flag, run_ood, type=int, low=0, help=text)
        else:
            option(p, flag, run_ood, type=float, low=0.0, help=text)
    add_resume(p)
