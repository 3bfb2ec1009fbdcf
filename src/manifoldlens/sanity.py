"""Sanity checks for attributions (Adebayo et al. 2018) beside their fraction in tangent space
(Bordt et al. §5.3): is an attribution related to the model, and to the data manifold?

* Cascading parameter randomisation: re-initialise the classifier's layers one after another,
  top (logits) first; an attribution that depends on the model changes as the weights are
  destroyed. Similarity of the attributions of the trained and the randomised model:
  :func:`rank_correlation` (Spearman's ρ of the absolute values, Adebayo et al.'s "rank
  correlation (ABS)", or of the signed values) and :func:`ssim` (Wang et al. 2004).
* The counter-example of §5.3: :func:`random_tangent_attribution`, a random vector drawn
  inside each point's tangent space, ignoring the model. Its fraction in tangent space is 1 by
  construction, yet it is the same for every model: it fails the randomisation test. The
  fraction in tangent space is a necessary criterion for an explanation, not a sufficient one.

References
----------
J. Adebayo, J. Gilmer, M. Muelly, I. Goodfellow, M. Hardt, B. Kim. "Sanity Checks for Saliency
Maps." NeurIPS 2018. arXiv:1810.03292. §3 (cascading and independent randomisation),
Figures 2–4.

Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli. "Image Quality Assessment: From Error
Visibility to Structural Similarity." IEEE Trans. Image Processing 13(4), 2004. eqs. 13, 17.

S. Bordt, U. Upadhyay, Z. Akata, U. von Luxburg. "The Manifold Hypothesis for Gradient-Based
Explanations." CVPR Workshops 2023. arXiv:2206.07387. §5.3, Figure 13.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_choice
from ._utils import eval_mode
from .attribution import METHODS, explain
from .tangent import TangentSpace

__all__ = [
    "MODES",
    "SIMILARITIES",
    "SanityResult",
    "absolute_map",
    "randomizable_layers",
    "random_tangent_attribution",
    "randomized_models",
    "rank_correlation",
    "sanity_check",
    "ssim",
]

MODES = ("cascading", "independent")
#: The similarity measures :func:`sanity_check` reports, Adebayo et al.'s Figure 4.
SIMILARITIES = ("spearman_abs", "spearman", "ssim")


# ------------------------------------------------------------------------------ similarity


def _flat_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.ndim < 2:
        raise ValueError(f"a and b must be batches (n, ...), got shape {tuple(a.shape)}")
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1…m of each row of ``v`` (n, m), ties given the mean of their ranks (as
    ``scipy.stats.rankdata``), float64."""
    n, m = v.shape
    s, order = v.sort(dim=1, stable=True)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = new.long().cumsum(1) - 1  # index of the run of equal values
    pos = torch.arange(m, dtype=torch.float64, device=v.device).expand(n, m)
    first = torch.full((n, m), math.inf, dtype=torch.float64, device=v.device)
    last = torch.full((n, m), -math.inf, dtype=torch.float64, device=v.device)
    first = first.scatter_reduce(1, group, pos, "amin")
    last = last.scatter_reduce(1, group, pos, "amax")
    ranked = ((first + last) / 2 + 1).gather(1, group)
    return torch.empty_like(ranked).scatter_(1, order, ranked)


def rank_correlation(a: torch.Tensor, b: torch.Tensor, *, absolute: bool = True
                     ) -> torch.Tensor:
    """Spearman's rank correlation of each pair of attributions, (n,) float64: the Pearson
    correlation of their ranks (ties share the mean rank). ``absolute=True`` ranks |a| and |b|
    (Adebayo et al.'s "rank correlation (ABS)", the importance of each feature whatever its
    sign); ``absolute=False`` the signed values ("no ABS"). A constant map has no ranking: NaN
    (as ``scipy.stats.spearmanr``)."""
    a, b = _flat_pair(a, b)
    if absolute:
        a, b = a.abs(), b.abs()
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    r = (ra * rb).sum(1) / den
    return torch.where(den > 0, r.clamp(-1, 1), torch.full_like(r, math.nan))


def absolute_map(a: torch.Tensor) -> torch.Tensor:
    """``|a| / max |a|`` per sample, in [0, 1] (a zero map stays zero): the normalised
    importance map Adebayo et al. compare and draw."""
    flat = a.reshape(a.shape[0], -1).abs()
    top = flat.amax(1, keepdim=True)
    return (flat / torch.where(top > 0, top, torch.ones_like(top))).reshape(a.shape)


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, eq. 13 with the Gaussian window of §III-C)
    of each pair of images (n, C, H, W) or (n, H, W), averaged over channels and the window
    positions, (n,):

        SSIM = (2 μ_a μ_b + C₁)(2 σ_ab + C₂) / ((μ_a² + μ_b² + C₁)(σ_a² + σ_b² + C₂)),

    C₁ = (k₁ L)², C₂ = (k₂ L)², L = ``data_range``; local means, variances and covariance
    weighted by a ``window`` × ``window`` Gaussian of standard deviation ``sigma``, summing to
    1, at every position where it fits inside the image (Wang et al.'s 'valid' filtering).
    Images smaller than the window use the largest odd window that fits. SSIM(x, x) = 1.
    """
    if a.shape != b.shape or a.ndim not in (3, 4):
        raise ValueError(f"a and b must both be shaped (n, C, H, W) or (n, H, W), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not (data_range > 0 and math.isfinite(data_range)):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if a.ndim == 3:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    n, c, h, w = a.shape
    size = min(int(window), h, w)
    size -= 1 - size % 2  # odd
    dtype = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    t = torch.arange(size, dtype=dtype, device=a.device) - (size - 1) / 2
    g = torch.exp(-t**2 / (2 * sigma**2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).reshape(1, 1, size, size)

    def local(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z.reshape(n * c, 1, h, w).to(dtype), kernel)

    mu_a, mu_b = local(a), local(b)
    var_a = local(a * a) - mu_a**2
    var_b = local(b * b) - mu_b**2
    cov = local(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1)
                                                     * (var_a + var_b + c2))
    return s.reshape(n, -1).mean(1)


# --------------------------------------------------------------------- randomising a model


def randomizable_layers(model: nn.Module) -> list[str]:
    """Names of the modules that hold parameters of their own, top (output) first: the order
    of cascading randomisation. The order is that of ``named_modules()`` reversed, i.e. the
    reverse of the order in which the model registers its layers, which is the forward order
    for ``nn.Sequential`` stacks and the usual ``__init__`` style."""
    names = [name for name, m in model.named_modules()
             if any(True for _ in m.parameters(recurse=False))]
    return names[::-1]


def _reinitialise(module: nn.Module, name: str, seed: int) -> None:
    if not hasattr(module, "reset_parameters"):
        raise ValueError(f"layer {name!r} ({type(module).__name__}) has no reset_parameters(); "
                         "name the layers to randomise with layers=")
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        module.reset_parameters()


def randomized_models(model: nn.Module, *, layers: Sequence[str] | None = None,
                      mode: str = "cascading", seed: int = 0
                      ) -> Iterator[tuple[str, nn.Module]]:
    """Adebayo et al. §3: copies of ``model`` with layers re-initialised by their own
    ``reset_parameters()`` (PyTorch's initialisation), yielded as (layer name, model).

    ``mode="cascading"``: the layers of ``layers`` (default :func:`randomizable_layers`, top
    first) are randomised one after another, each copy keeping the previous ones randomised;
    ``"independent"``: each copy is the trained model with that one layer randomised. The
    layer i-th in ``layers`` draws its weights with seed ``seed + i`` in both modes, so the
    same layer gets the same random weights. ``model`` itself is never changed."""
    check_choice(mode, MODES, "mode")
    named = dict(model.named_modules())
    layers = randomizable_layers(model) if layers is None else list(layers)
    unknown = [name for name in layers if name not in named]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; layers with parameters: "
                         f"{randomizable_layers(model)}")
    if not layers:
        raise ValueError("no layer to randomise: the model has no parameters")
    current = copy.deepcopy(model)
    for i, name in enumerate(layers):
        if mode == "independent":
            current = copy.deepcopy(model)
        _reinitialise(current.get_submodule(name), name, seed + i)
        yield name, current


# ----------------------------------------------------------------------- the counter-example


def random_tangent_attribution(tangent: TangentSpace, *, seed: int = 0) -> torch.Tensor:
    """Bordt et al. §5.3: for each point a random vector of its tangent space,
    ``Σⱼ zⱼ tⱼ`` with z ~ N(0, I_k) over the orthonormal basis t₁…t_k, shaped
    ``(n, *input_shape)``. Point i draws z from a generator seeded with ``seed + i``: the
    "explanation" depends on the point only, never on a model. Fraction in tangent space: 1."""
    n, k, _ = tangent.basis.shape
    g = torch.Generator()
    z = torch.empty(n, k, dtype=torch.float64)
    for i in range(n):
        g.manual_seed(seed + i)
        z[i] = torch.randn(k, generator=g, dtype=torch.float64)
    z = z.to(tangent.basis) * tangent.mask.to(tangent.basis.dtype)
    return torch.einsum("nk,nkd->nd", z, tangent.basis).reshape(n, *tangent.input_shape)


# ------------------------------------------------------------------------------- the check


@dataclass
class SanityResult:
    """What :func:`sanity_check` measured, stage 0 being the trained model.

    ``stages``: "trained", then the layer randomised at each stage; ``similarity[method]
    [measure]`` (stages, n) with measure in :data:`SIMILARITIES`, each against the trained
    model's attribution; ``fraction[method]`` (stages, n) in tangent space; ``maps[method]``
    (stages, keep, *shape) the attributions of the first ``keep`` points; ``targets`` the
    classes explained (those the trained model predicts)."""

    stages: list[str]
    mode: str
    similarity: dict[str, dict[str, torch.Tensor]]
    fraction: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor]
    targets: torch.Tensor
    accuracy: list[float] = field(default_factory=list)


def _as_images(a: torch.Tensor) -> torch.Tensor:
    """Attributions as images for :func:`ssim`: (n, C, H, W) and (n, H, W) as they are, flat
    vectors (n, d) as one row (n, 1, 1, d)."""
    return a if a.ndim in (3, 4) else a.reshape(a.shape[0], 1, 1, -1)


def _compare(ref: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """The :data:`SIMILARITIES` of ``a`` to ``ref``, (n,) each."""
    return {"spearman_abs": rank_correlation(ref, a, absolute=True),
            "spearman": rank_correlation(ref, a, absolute=False),
            "ssim": ssim(_as_images(absolute_map(ref)), _as_images(absolute_map(a))).double()}


def sanity_check(model: nn.Module, x: torch.Tensor, tangent: TangentSpace, *,
                 methods: Sequence[str] = METHODS, labels: torch.Tensor | None = None,
                 layers: Sequence[str] | None = None, mode: str = "cascading",
                 options: dict[str, dict[str, Any]] | None = None,
                 controls: Sequence[str] = ("random_tangent", "random"), keep: int = 1,
                 batch_size: int | None = None, seed: int = 0) -> SanityResult:
    """Adebayo et al.'s model-parameter randomisation test beside Bordt et al.'s fraction in
    tangent space, for every method of :func:`~manifoldlens.attribution.explain` in
    ``methods`` (with ``options[method]``) and the ``controls``: ``"random_tangent"``
    (:func:`random_tangent_attribution`) and ``"random"`` (an isotropic Gaussian vector
    seeded per point, fraction ≈ √(k/d)); both ignore the model.

    Each stage (:func:`randomized_models`) explains the class the *trained* model predicts
    (fixed, so only the model changes) and compares with the trained model's attributions:
    Spearman ρ of |a| and of a, and SSIM of the normalised maps |a|/max|a| (L = 1). SmoothGrad
    uses the same noise at every stage (seed ``seed``). ``labels``: when given, the test
    accuracy at each stage goes to ``accuracy``."""
    check_choice(mode, MODES, "mode")
    for m in methods:
        check_choice(m, METHODS, "method")
    for c in controls:
        check_choice(c, ("random_tangent", "random"), "control")
    if x.shape[0] != tangent.basis.shape[0]:
        raise ValueError(f"x has {x.shape[0]} points but tangent has {tangent.basis.shape[0]}")
    if keep < 0 or keep > x.shape[0]:
        raise ValueError(f"keep must be in [0, {x.shape[0]}], got {keep}")
    options = options or {}
    device = next(model.parameters()).device
    x = x.to(device)
    ts = tangent.to(dtype=torch.float64, device="cpu")
    with eval_mode(model), torch.no_grad():
        targets = model(x).argmax(1)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
    fixed = {"random_tangent": random_tangent_attribution(ts, seed=seed).to(x.dtype),
             "random": noise}

    def attributions(net: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        with eval_mode(net):
            for m in methods:
                opts = dict(options.get(m, {}))
                if m == "smoothgrad":
                    opts.setdefault("seed", seed)
                out[m] = explain(net, x, m, targets, batch_size=batch_size, **opts).cpu()
        return {**out, **{c: fixed[c].cpu() for c in controls}}

    def accuracy(net: nn.Module) -> float:
        with eval_mode(net), torch.no_grad():
            return float((net(x).argmax(1).cpu() == labels.cpu()).double().mean())

    ref = attributions(model)
    names = list(ref)
    stages, acc = ["trained"], [accuracy(model)] if labels is not None else []
    per_stage = [ref]
    for name, net in randomized_models(model, layers=layers, mode=mode, seed=seed):
        stages.append(name)
        per_stage.append(attributions(net))
        if labels is not None:
            acc.append(accuracy(net))
    compared = {m: [_compare(ref[m], st[m]) for st in per_stage] for m in names}
    similarity = {m: {s: torch.stack([c[s] for c in compared[m]]) for s in SIMILARITIES}
                  for m in names}
    fraction = {m: torch.stack([ts.fraction(st[m].double()) for st in per_stage]) for m in names}
    maps = {m: torch.stack([st[m][:keep] for st in per_stage]) for m in names}
    return SanityResult(stages, mode, similarity, fraction, maps, targets.cpu(), acc)
