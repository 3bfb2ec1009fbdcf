"""Out-of-distribution scores — from a flow's density, from a classifier, and from the
classifier's geometry — and the metrics that compare them.

Every score maps a batch (n, *shape) to (n,) and is oriented the same way: **higher means
more out-of-distribution**. The metrics treat OOD points as positives.

* the data's density (a normalizing flow p): bits/dim :func:`flow_bits_per_dim`; the
  typicality test :func:`typicality` ``|bpd(x) − Ĥ|`` with Ĥ the mean bits/dim of held-out
  in-distribution data (Nalisnick et al. 2019b, one point at a time); the input-complexity
  correction :func:`complexity_corrected` ``S(x) = bpd(x) − L(x)/D`` with L(x) the image's
  compressed length in bits (Serrà et al. 2020, eq. 2); the likelihood ratio
  :func:`likelihood_ratio` ``bpd(x) − bpd_bg(x)`` against a background model trained on
  perturbed data (:func:`perturb`; Ren et al. 2019).
* the classifier: :func:`max_softmax` ``1 − max_c p_c`` (Hendrycks & Gimpel 2017),
  :func:`energy` ``−T log Σ_c exp(s_c/T)`` (Liu et al. 2020, eq. 1), :func:`mahalanobis`
  ``min_c (f − μ_c)ᵀ Σ⁺ (f − μ_c)`` on penultimate features with a tied covariance (Lee et al.
  2018, eq. 2; no input preprocessing or layer ensemble).
* the classifier's geometry (Grementieri & Fioresi): the spectrum of G(x)
  (:func:`spectrum_scores`: ``Tr G``, the paper's soft rank; the stable rank ``Tr G/λ_max``;
  the entropy H of ``λ/Tr G`` and the effective rank ``exp H`` of Roy & Vetterli 2007);
  :func:`leaf_distance`, how far x lies off the data leaf (horizontal paths from its nearest
  training images, :func:`manifoldlens.denoise.leaf_projection`), beside the plain
  :func:`nearest_distance` it starts from; and the fraction of the flow's score ``∇ₓ log p``
  in the classifier's ``D_x`` (:func:`score_fraction_in_leaf`) and in a VAE's tangent space
  (:func:`score_fraction_in_tangent`). A fraction has no direction known in advance: it is
  scored as it is, and an AUROC below ½ means it separates the other way.

Metrics (:func:`ood_metrics`): AUROC (Mann–Whitney, ties counted ½), AUPR with OOD as the
positive class (average precision, as scikit-learn computes it), and the FPR at 95 % TPR in
the convention of Liu et al. 2020 — the share of OOD points accepted at the threshold that
accepts 95 % of in-distribution points — each with a percentile bootstrap interval that
resamples both sets.

References
----------
E. Nalisnick, A. Matsukawa, Y. W. Teh, D. Gorur, B. Lakshminarayanan. "Do Deep Generative
Models Know What They Don't Know?" ICLR 2019. arXiv:1810.09136.
E. Nalisnick, A. Matsukawa, Y. W. Teh, B. Lakshminarayanan. "Detecting Out-of-Distribution
Inputs to Deep Generative Models Using Typicality." arXiv:1906.02994, 2019.
J. Ren, P. J. Liu, E. Fertig, J. Snoek, R. Poplin, M. A. DePristo, J. V. Dillon,
B. Lakshminarayanan. "Likelihood Ratios for Out-of-Distribution Detection." NeurIPS 2019.
J. Serrà, D. Álvarez, V. Gómez, O. Slizovskaia, J. F. Núñez, J. Luque. "Input Complexity and
Out-of-distribution Detection with Likelihood-based Generative Models." ICLR 2020.
D. Hendrycks, K. Gimpel. "A Baseline for Detecting Misclassified and Out-of-Distribution
Examples in Neural Networks." ICLR 2017.
W. Liu, X. Wang, J. Owens, Y. Li. "Energy-based Out-of-distribution Detection." NeurIPS 2020.
K. Lee, K. Lee, H. Lee, J. Shin. "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks." NeurIPS 2018.
O. Roy, M. Vetterli. "The effective rank: a measure of effective dimensionality." EUSIPCO 2007.
L. Grementieri, R. Fioresi. "Model-centric Data Manifold." SIAM J. Imaging Sci. 15(3), 2022.
"""

from __future__ import annotations

import io
import math
import zlib
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ._checks import (
    MODEL_OUTPUTS,
    check_batch,
    check_choice,
    check_number,
    check_positive_int,
)
from ._utils import chunks, eval_mode, progress_bar, to_scores
from .denoise import leaf_projection, nearest_neighbours
from .flows.bpd import bits_per_dim
from .foliation import leaf_crossing_path
from .generative import latent_code
from .information import local_data_matrix
from .tangent import TangentSpace

__all__ = [
    "ClassGaussian",
    "aupr",
    "auroc",
    "complexity_corrected",
    "compressed_bits",
    "data_matrix_scores",
    "energy",
    "fit_class_gaussian",
    "flow_bits_per_dim",
    "flow_score",
    "fpr_at_tpr",
    "gaussian_noise",
    "leaf_crossing_noise",
    "leaf_distance",
    "likelihood_ratio",
    "mahalanobis",
    "max_softmax",
    "nearest_distance",
    "ood_metrics",
    "penultimate_features",
    "perturb",
    "quantize",
    "reconstruction_error",
    "roc_curve",
    "score_fraction_in_leaf",
    "score_fraction_in_tangent",
    "spectrum_scores",
    "typicality",
    "uniform_noise",
]


# ------------------------------------------------------------------------------ metrics


def _scores(s: Any, name: str) -> np.ndarray:
    a = (s.detach().cpu().double().numpy() if isinstance(s, torch.Tensor)
         else np.asarray(s, dtype=np.float64)).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(a).any():
        raise ValueError(f"{name} holds NaN at {np.flatnonzero(np.isnan(a))[:5].tolist()}")
    return a


def _auroc_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """AUROC of each row pair (B, n_in), (B, n_out) from mid-ranks (Mann–Whitney U)."""
    from scipy.stats import rankdata  # imported on use: scipy is slow to import

    na, nb = a.shape[1], b.shape[1]
    r = rankdata(np.concatenate([a, b], axis=1), axis=1)
    return (r[:, na:].sum(axis=1) - nb * (nb + 1) / 2) / (na * nb)


def _aupr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Average precision (OOD positive) of each row pair; tied scores form one threshold."""
    s = np.concatenate([a, b], axis=1)
    y = np.concatenate([np.zeros_like(a), np.ones_like(b)], axis=1)
    order = np.argsort(-s, axis=1, kind="stable")
    s, y = np.take_along_axis(s, order, 1), np.take_along_axis(y, order, 1)
    n = s.shape[1]
    tp = np.cumsum(y, axis=1)
    precision = tp / np.arange(1, n + 1)
    end = np.ones_like(s, dtype=bool)  # the last position of each group of tied scores
    end[:, :-1] = s[:, :-1] != s[:, 1:]
    pos = np.where(end, np.arange(n), n)
    group_end = np.minimum.accumulate(pos[:, ::-1], axis=1)[:, ::-1]  # next end at or after i
    prec_end = np.take_along_axis(precision, group_end, 1)
    return (y * prec_end).sum(axis=1) / b.shape[1]


def _fpr_rows(a: np.ndarray, b: np.ndarray, tpr: float) -> np.ndarray:
    """Share of OOD scores ≤ the smallest threshold accepting ≥ ``tpr`` of in-distribution."""
    k = max(int(math.ceil(tpr * a.shape[1] - 1e-9)), 1)
    t = np.sort(a, axis=1)[:, k - 1]
    return (b <= t[:, None]).mean(axis=1)


def auroc(in_scores: Any, out_scores: Any) -> float:
    """``P(s_out > s_in) + ½ P(s_out = s_in)``: 1 separates perfectly, ½ not at all.

    >>> auroc([0.0, 1.0], [2.0, 3.0]), auroc([0.0, 1.0], [0.0, 1.0])
    (1.0, 0.5)
    """
    a, b = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    return float(_auroc_rows(a[None], b[None])[0])


def aupr(in_scores: Any, out_scores: Any) -> float:
    """Area under the precision–recall curve, OOD positive (average precision; a score that
    does not separate gets about the OOD share ``n_out / (n_in + n_out)``)."""
    a, b = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    return float(_aupr_rows(a[None], b[None])[0])


def fpr_at_tpr(in_scores: Any, out_scores: Any, tpr: float = 0.95) -> float:
    """FPR at ``tpr`` TPR (Liu et al. 2020): accepting points scored ≤ t, with t the smallest
    threshold that accepts ``tpr`` of in-distribution points, the share of OOD points
    accepted (0 is best).

    >>> fpr_at_tpr(list(range(100)), [200.0, 50.0])  # t = 94: 50 is accepted
    0.5
    """
    check_number(tpr, "tpr", low=0.0, high=1.0, strict=True)
    a, b = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    return float(_fpr_rows(a[None], b[None], tpr)[0])


def roc_curve(in_scores: Any, out_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the ROC curve, OOD positive (scikit-learn's points)."""
    from sklearn.metrics import roc_curve as sk_roc

    a, b = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    fpr, tpr, _ = sk_roc(np.r_[np.zeros(a.size), np.ones(b.size)], np.r_[a, b])
    return fpr, tpr


def ood_metrics(in_scores: Any, out_scores: Any, *, bootstrap: int = 1000,
                confidence: float = 0.95, tpr: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """AUROC, AUPR (OOD positive) and FPR at ``tpr`` TPR with percentile bootstrap intervals
    (``bootstrap`` resamples of both sets with replacement, seeded; 0: none).

    Returns ``{"auroc", "auroc_ci", "aupr", "aupr_ci", "fpr95", "fpr95_ci", "n_in", "n_out"}``
    (``fpr95`` whatever ``tpr`` is; intervals ``[lo, hi]``, None without bootstrap).
    """
    check_positive_int(bootstrap, "bootstrap", minimum=0)
    check_number(confidence, "confidence", low=0.0, high=1.0, strict=True)
    check_number(tpr, "tpr", low=0.0, high=1.0, strict=True)
    a, b = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    fns = {"auroc": _auroc_rows, "aupr": _aupr_rows,
           "fpr95": lambda p, q: _fpr_rows(p, q, tpr)}
    out: dict[str, Any] = {}
    draws: dict[str, list[np.ndarray]] = {k: [] for k in fns}
    rng = np.random.default_rng(seed)
    for start in range(0, bootstrap, 250):  # 250 resamples at a time: bounded memory
        m = min(250, bootstrap - start)
        ra = a[rng.integers(0, a.size, (m, a.size))]
        rb = b[rng.integers(0, b.size, (m, b.size))]
        for k, f in fns.items():
            draws[k].append(f(ra, rb))
    lo, hi = 50 * (1 - confidence), 50 * (1 + confidence)
    for k, f in fns.items():
        out[k] = float(f(a[None], b[None])[0])
        d = np.concatenate(draws[k]) if draws[k] else None
        out[f"{k}_ci"] = (None if d is None
                          else [float(np.percentile(d, lo)), float(np.percentile(d, hi))])
    out.update(n_in=int(a.size), n_out=int(b.size))
    return out


# ----------------------------------------------------------------------------- data sets


def quantize(x: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """x clamped to [0, 1] and rounded to ``levels`` grey levels (``k / (levels − 1)``)."""
    check_positive_int(levels, "levels", minimum=2)
    return torch.round(x.clamp(0, 1) * (levels - 1)) / (levels - 1)


def _generator(seed: int) -> torch.Generator:
    check_positive_int(seed, "seed", minimum=0)
    return torch.Generator().manual_seed(seed)


def gaussian_noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """``quantize(x + σ ε)``, ε standard normal (seeded), kept in [0, 1]."""
    check_batch(x, "x")
    check_number(sigma, "sigma", low=0.0)
    eps = torch.randn(x.shape, generator=_generator(seed), dtype=torch.float64)
    return quantize(x + sigma * eps.to(x))


def uniform_noise(n: int, shape: tuple[int, ...], seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n images of i.i.d. uniform 8-bit pixels."""
    check_positive_int(n, "n")
    return quantize(torch.rand((n, *shape), generator=_generator(seed), dtype=dtype))


def perturb(x: torch.Tensor, rate: float, seed: int = 0, levels: int = 256) -> torch.Tensor:
    """Ren et al. (2019)'s perturbation for the background model: each pixel replaced, with
    probability ``rate``, by a grey level drawn uniformly from the ``levels``."""
    check_batch(x, "x")
    check_number(rate, "rate", low=0.0, high=1.0)
    g = _generator(seed)
    mask = torch.rand(x.shape, generator=g) < rate
    value = torch.randint(0, levels, x.shape, generator=g).to(x) / (levels - 1)
    return torch.where(mask.to(x.device), value.to(x.device), x)


def leaf_crossing_noise(model: nn.Module, x: torch.Tensor, steps: tuple[int, ...] = (50, 250, 1000),
                        *, step_size: float = 0.1, seed: int = 0,
                        clamp: tuple[float, float] | None = (0.0, 1.0),
                        model_output: str = "logits", progress: bool = False
                        ) -> dict[int, torch.Tensor]:
    """Seed 001's noisy images (§4.2, Figure 3): x moved ``s`` steps across the leaves, on
    ker G along a fixed random direction, for every s in ``steps`` (one path, recorded at
    each); clamped to the data domain as the paper's code does."""
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"steps must be positive integers, got {steps!r}")
    every = math.gcd(*steps)
    res = leaf_crossing_path(model, x, steps=max(steps), step_size=step_size, seed=seed,
                             clamp=clamp, record_every=every, model_output=model_output,
                             progress=progress)
    where = {int(s): i for i, s in enumerate(res.record_steps.tolist())}
    return {s: res.points[where[s]].to(x) for s in steps}


# ------------------------------------------------------------------ scores: the density


@torch.no_grad()
def flow_bits_per_dim(flow: nn.Module, x: torch.Tensor, *, n_bins: int = 256, seed: int = 0,
                      batch_size: int = 256) -> torch.Tensor:
    """Bits/dim of x (n,) under the flow (eval mode), dequantized with seeded uniform noise:
    ``(−log p(y) + D log n_bins) / (D ln 2)``. Higher: less likely."""
    check_batch(x, "x")
    check_positive_int(batch_size, "batch_size")
    g = _generator(seed)
    p = next(flow.parameters())
    with eval_mode(flow):
        return torch.cat([bits_per_dim(flow, x[sl].to(p), n_bins, generator=g)
                          for sl in chunks(x.shape[0], batch_size)])


def typicality(bpd: torch.Tensor, reference_bpd: torch.Tensor) -> torch.Tensor:
    """Nalisnick et al. (2019b)'s typicality test for one point at a time: ``|bpd(x) − Ĥ|``,
    Ĥ the mean bits/dim of held-out in-distribution data (the entropy estimate)."""
    h = _scores(reference_bpd, "reference_bpd").mean()
    return (bpd - h).abs()


def compressed_bits(x: torch.Tensor, *, codec: str = "png", levels: int = 256) -> torch.Tensor:
    """L(x): the length in bits of each image compressed losslessly (8-bit grey levels;
    ``"png"`` at compression level 9 as Serrà et al., or raw ``"zlib"`` level 9)."""
    check_batch(x, "x", min_ndim=3)
    check_choice(codec, ("png", "zlib"), "codec")
    if codec == "png" and (x.ndim != 4 or x.shape[1] not in (1, 3)):
        raise ValueError(f"codec='png' needs images (n, 1 or 3, H, W), got {tuple(x.shape)}")
    arr = torch.round(x.detach().clamp(0, 1) * (levels - 1)).to(torch.uint8).cpu().numpy()
    out = []
    for img in arr:
        if codec == "zlib":
            out.append(8 * len(zlib.compress(img.tobytes(), 9)))
            continue
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)).save(
            buf, format="PNG", compress_level=9)
        out.append(8 * buf.tell())
    return torch.tensor(out, dtype=torch.float64)


def complexity_corrected(bpd: torch.Tensor, x: torch.Tensor, *, codec: str = "png"
                         ) -> torch.Tensor:
    """Serrà et al. (2020)'s ``S(x) = −log₂ p(x) − L(x)``, per dimension: ``bpd(x) − L(x)/D``
    — the likelihood corrected by the image's complexity (an image a generic compressor
    shrinks well is no evidence for the model)."""
    d = x[0].numel()
    return bpd.double().cpu() - compressed_bits(x, codec=codec) / d


def likelihood_ratio(bpd: torch.Tensor, background_bpd: torch.Tensor) -> torch.Tensor:
    """Ren et al. (2019)'s likelihood ratio as an OOD score: ``bpd(x) − bpd_bg(x)``
    ``= −(log p(x) − log p_bg(x)) / (D ln 2)``, the background model trained on perturbed
    data (:func:`perturb`) so that it learns the population's low-level statistics."""
    if bpd.shape != background_bpd.shape:
        raise ValueError(f"bpd and background_bpd differ in shape: {tuple(bpd.shape)} and "
                         f"{tuple(background_bpd.shape)}")
    return bpd - background_bpd


# --------------------------------------------------------------- scores: the classifier


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, model_output: str,
            batch_size: int) -> torch.Tensor:
    check_choice(model_output, MODEL_OUTPUTS, "model_output")
    check_batch(x, "x")
    check_positive_int(batch_size, "batch_size")
    with eval_mode(model):
        return torch.cat([to_scores(model(x[sl]), model_output)
                          for sl in chunks(x.shape[0], batch_size)])


def max_softmax(model: nn.Module, x: torch.Tensor, *, model_output: str = "logits",
                batch_size: int = 1000) -> torch.Tensor:
    """Hendrycks & Gimpel (2017), oriented as an OOD score: ``1 − max_c p_c(x)``."""
    s = _logits(model, x, model_output, batch_size)
    return 1 - torch.softmax(s.double(), dim=1).max(dim=1).values


def energy(model: nn.Module, x: torch.Tensor, *, temperature: float = 1.0,
           batch_size: int = 1000) -> torch.Tensor:
    """Liu et al. (2020), eq. 1: ``E(x) = −T log Σ_c exp(s_c(x)/T)`` of the logits s (higher:
    more OOD). Needs a model that returns logits (for log-probabilities it is constant)."""
    check_number(temperature, "temperature", low=0.0, strict=True)
    s = _logits(model, x, "logits", batch_size).double()
    return -temperature * torch.logsumexp(s / temperature, dim=1)


def _last_linear(model: nn.Module) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer; pass layer= the module whose "
                         "input is the feature vector")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, *, layer: nn.Module | None = None,
                         batch_size: int = 1000) -> torch.Tensor:
    """The input of ``layer`` (default: the model's last ``nn.Linear``, i.e. the penultimate
    features), flattened to (n, F)."""
    check_batch(x, "x")
    check_positive_int(batch_size, "batch_size")
    layer = layer if layer is not None else _last_linear(model)
    got: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach()))
    try:
        with eval_mode(model):
            for sl in chunks(x.shape[0], batch_size):
                model(x[sl])
    finally:
        handle.remove()
    if not got:
        raise ValueError("the layer was not called by the model's forward pass")
    return torch.cat([g.reshape(g.shape[0], -1) for g in got])


class ClassGaussian(NamedTuple):
    """Class-conditional Gaussians with a tied covariance: means (C, F), precision Σ⁺ (F, F)."""

    means: torch.Tensor
    precision: torch.Tensor


def fit_class_gaussian(features: torch.Tensor, labels: torch.Tensor,
                       num_classes: int | None = None) -> ClassGaussian:
    """Lee et al. (2018), eq. 1: ``μ_c`` the class means, ``Σ = 1/N Σ_c Σ_{y_i=c} (f_i −
    μ_c)(f_i − μ_c)ᵀ`` the tied covariance, inverted by the pseudo-inverse (dead ReLU units
    make Σ singular). Float64."""
    check_batch(features, "features")
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features must be (n, F) and labels (n,), got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    f, y = features.double(), labels.long().to(features.device)
    c = int(num_classes if num_classes is not None else int(y.max()) + 1)
    counts = torch.bincount(y, minlength=c)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {empty} have no features")
    means = torch.zeros(c, f.shape[1], dtype=f.dtype, device=f.device).index_add_(0, y, f)
    means = means / counts[:, None]
    centred = f - means[y]
    cov = centred.T @ centred / f.shape[0]
    return ClassGaussian(means, torch.linalg.pinv(cov, hermitian=True))


def mahalanobis(features: torch.Tensor, gaussian: ClassGaussian) -> torch.Tensor:
    """Lee et al. (2018), eq. 2, oriented as an OOD score: ``min_c (f − μ_c)ᵀ Σ⁺ (f − μ_c)``."""
    check_batch(features, "features")
    f = features.double().reshape(features.shape[0], -1)
    diff = f[:, None, :] - gaussian.means[None]  # (n, C, F)
    return torch.einsum("ncf,fg,ncg->nc", diff, gaussian.precision, diff).min(dim=1).values


# ----------------------------------------------------------------- scores: the geometry


def spectrum_scores(eigenvalues: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores of G's spectrum (n, C): ``trace`` ``Tr G = Σλ`` (Grementieri & Fioresi's soft
    rank, eq. 11), ``stable_rank`` ``Tr G / λ_max``, ``spectral_entropy`` ``H = −Σ q log q``
    with ``q = λ / Tr G`` and ``effective_rank`` ``exp H`` (Roy & Vetterli 2007). A zero G
    has stable and effective rank 0 and entropy 0.

    >>> s = spectrum_scores(torch.tensor([[2.0, 2.0, 0.0]]))
    >>> [round(float(s[k][0]), 4) for k in ("trace", "stable_rank", "effective_rank")]
    [4.0, 2.0, 2.0]
    """
    check_batch(eigenvalues, "eigenvalues")
    lam = eigenvalues.double().clamp_min(0)
    tr = lam.sum(1)
    zero = tr <= 0
    q = lam / torch.where(zero, 1.0, tr)[:, None]
    h = -torch.where(q > 0, q * torch.log(q.clamp_min(1e-300)), 0.0).sum(1)
    lmax = lam.max(1).values
    return {
        "trace": tr,
        "stable_rank": torch.where(zero, 0.0, tr / torch.where(zero, 1.0, lmax)),
        "spectral_entropy": torch.where(zero, 0.0, h),
        "effective_rank": torch.where(zero, 0.0, torch.exp(h)),
    }


def data_matrix_scores(model: nn.Module, x: torch.Tensor, *, flow: nn.Module | None = None,
                       score: torch.Tensor | None = None, model_output: str = "logits",
                       batch_size: int = 128, progress: bool = False) -> dict[str, torch.Tensor]:
    """:func:`spectrum_scores` of G(x) and, given a ``flow`` (or its ``score`` ∇log p at x
    computed already), ``score_in_leaf`` (:func:`score_fraction_in_leaf`), from one pass of
    C − 1 products per batch."""
    check_batch(x, "x")
    check_positive_int(batch_size, "batch_size")
    if score is not None and score.shape != x.shape:
        raise ValueError(f"score must be shaped like x {tuple(x.shape)}, got "
                         f"{tuple(score.shape)}")
    eig, frac = [], []
    for sl in progress_bar(list(chunks(x.shape[0], batch_size)), enabled=progress, desc="G(x)",
                           unit="batch", leave=False):
        G = local_data_matrix(model, x[sl], model_output=model_output)
        eig.append(G.eigenvalues.detach())
        if score is not None or flow is not None:
            v = score[sl] if score is not None else flow_score(flow, x[sl], batch_size=batch_size)
            frac.append(_ratio(G.project(v.to(x)), v))
    out = spectrum_scores(torch.cat(eig))
    if frac:
        out["score_in_leaf"] = torch.cat(frac)
    return out


def nearest_distance(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """ℓ2 distance to the nearest reference (training) image: the pixel-space control of
    :func:`leaf_distance`, which starts from that neighbour."""
    return nearest_neighbours(x, reference, 1)[0][:, 0]


def leaf_distance(model: nn.Module, x: torch.Tensor, reference: torch.Tensor, *,
                  neighbours: int = 1, max_steps: int = 100, step_size: float = 0.1,
                  stall_rtol: float = 1e-2, batch_size: int = 64, model_output: str = "logits",
                  progress: bool = False) -> torch.Tensor:
    """How far x lies off the data leaf: ``‖x − y‖`` with y the end of capped horizontal paths
    from x's ``neighbours`` nearest reference images towards x, where the projection of
    ``x − y`` on D_y vanishes (:func:`manifoldlens.denoise.leaf_projection`; budget
    ``n · neighbours · max_steps`` Jacobians). 0 for a reference image; at most
    :func:`nearest_distance`."""
    return leaf_projection(model, x, reference, neighbours=neighbours, max_steps=max_steps,
                           step_size=step_size, stall_rtol=stall_rtol, batch_size=batch_size,
                           model_output=model_output, progress=progress).distance


def flow_score(flow: nn.Module, x: torch.Tensor, *, batch_size: int = 128) -> torch.Tensor:
    """The flow's score ``∇ₓ log p(x)`` (n, *shape), by autograd, in eval mode."""
    check_batch(x, "x")
    check_positive_int(batch_size, "batch_size")
    out = []
    with eval_mode(flow), torch.enable_grad():
        for sl in chunks(x.shape[0], batch_size):
            xr = x[sl].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(flow.log_prob(xr).sum(), xr)
            out.append(g)
    return torch.cat(out)


def score_fraction_in_leaf(model: nn.Module, flow: nn.Module, x: torch.Tensor, *,
                           model_output: str = "logits", batch_size: int = 128,
                           progress: bool = False) -> torch.Tensor:
    """``‖P_{D_x} ∇log p(x)‖ / ‖∇log p(x)‖``: the share of the data's probability flow that the
    classifier's sensitive directions ``D_x = (ker G)^⊥`` hold (random: ≈ √((C−1)/d))."""
    return data_matrix_scores(model, x, flow=flow, model_output=model_output,
                              batch_size=batch_size, progress=progress)["score_in_leaf"]


def _ratio(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    num = part.reshape(part.shape[0], -1).double().norm(dim=1)
    den = whole.reshape(whole.shape[0], -1).double().norm(dim=1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0).clamp(0, 1)


def score_fraction_in_tangent(vae: nn.Module, flow: nn.Module | None, x: torch.Tensor, *,
                              score: torch.Tensor | None = None,
                              batch_size: int = 128) -> torch.Tensor:
    """Fraction of the flow's score ``∇log p(x)`` (or ``score`` computed already) in the VAE's
    tangent space at x: the span of ``∂dec/∂z`` at ``z = μ(x)`` (Bordt et al.'s tangent
    space; random: ≈ √(k/d))."""
    if score is None:
        if flow is None:
            raise ValueError("give a flow or its score")
        score = flow_score(flow, x, batch_size=batch_size)
    out = []
    with eval_mode(vae):
        for sl in chunks(x.shape[0], batch_size):
            with torch.no_grad():
                z = latent_code(vae, x[sl])
            T = TangentSpace.from_decoder(vae.decode, z)
            out.append(T.fraction(score[sl].reshape(z.shape[0], -1)).double())
    return torch.cat(out)


@torch.no_grad()
def reconstruction_error(vae: nn.Module, x: torch.Tensor, *, batch_size: int = 512
                         ) -> torch.Tensor:
    """Mean squared error of the VAE's reconstruction ``dec(μ(x))`` per image."""
    check_batch(x, "x")
    with eval_mode(vae):
        rec = torch.cat([vae(x[sl]) for sl in chunks(x.shape[0], batch_size)])
    return (rec - x).reshape(x.shape[0], -1).double().pow(2).mean(1)
