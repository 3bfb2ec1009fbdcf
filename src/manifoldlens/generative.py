"""Generative models of the data manifold and datasets whose manifold is known (Bordt et al.).

- :class:`VAE`: Gaussian encoder q(z|x) = N(μ(x), diag σ²(x)), Bernoulli or Gaussian decoder,
  loss = reconstruction + β·KL(q(z|x) ‖ N(0, I)) (β = 1: the ELBO).
- :class:`BetaTCVAE` (Chen et al. 2018): the KL split into index-code mutual information,
  total correlation and dimension-wise KL, weighted α, β, γ, with q(z) estimated by
  minibatch-weighted sampling. Bordt et al. used α = γ = 1, β = 6, k = 10.
- :class:`AutoEncoder`: a plain convolutional autoencoder (the reconstructive approach).

:func:`generative_dataset` is Bordt et al., Algorithm 1 (appendix): decode latents drawn from
the prior, label them with a labelling function trained on (latent, reconstruction) → label,
accept each with probability p_max², and keep the decoder's tangent space at every image.
:func:`reconstructive_dataset` keeps autoencoder reconstructions of real images with their
labels and tangent spaces. Tangent spaces come from :meth:`TangentSpace.from_decoder`; a
decoder whose Jacobian has rank below k at an image (narrow layers, dead ReLUs, a latent it
ignores) spans fewer than k directions there: the datasets record the dimension per image
(``info["tangent_dim"]``, :func:`tangent_dim_summary`) and warn when it is below k.

References
----------
S. Bordt, U. Upadhyay, Z. Akata, U. von Luxburg. "The Manifold Hypothesis for Gradient-Based
Explanations." CVPR Workshops 2023. arXiv:2206.07387. §4, Algorithm 1 and appendix A.

D. P. Kingma, M. Welling. "Auto-Encoding Variational Bayes." ICLR 2014. arXiv:1312.6114.

C. P. Burgess, I. Higgins, A. Pal, L. Matthey, N. Watters, G. Desjardins, A. Lerchner.
"Understanding disentangling in β-VAE." Preprint, 2018. arXiv:1804.03599.

R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud. "Isolating Sources of Disentanglement in
Variational Autoencoders." NeurIPS 2018. arXiv:1802.04942.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_batch
from ._utils import eval_mode
from .models import register_architecture
from .runs import Run
from .tangent import TangentSpace, default_rank_rtol, nonzero_rows
from .training import RunOptions, TrainResult, fit

__all__ = [
    "VAE",
    "BetaTCVAE",
    "AutoEncoder",
    "Labeller",
    "UpsampledDecoder",
    "ManifoldDataset",
    "tangent_dim_summary",
    "thin_tangent_message",
    "train_generative",
    "generative_dataset",
    "reconstructive_dataset",
    "latent_code",
    "latent_traversal",
]


# ----------------------------------------------------------------------------- networks


def _conv_sizes(shape: Sequence[int]) -> tuple[int, int]:
    """Channels and the number of stride-2 convolutions of the Burgess et al. architecture."""
    c, h, w = shape
    if h != w or h < 16 or h & (h - 1):
        raise ValueError(
            f"the convolutional encoder needs square images with a power-of-two side >= 16 "
            f"(e.g. 32 × 32, as Bordt et al.'s MNIST32), got {h} × {w}; resize the images or use "
            "network='mlp'"
        )
    return c, int(math.log2(h)) - 2  # down to 4 × 4


class _Encoder(nn.Module):
    """Burgess et al. (2018) encoder (Bordt et al. used it through disentangling-vae):
    stride-2 4×4 convolutions of 32 channels down to 4×4, two 256-unit layers, then the
    outputs."""

    def __init__(self, shape: Sequence[int], out: int, network: str, hidden: int = 256):
        super().__init__()
        if network == "conv":
            c, n = _conv_sizes(shape)
            layers: list[nn.Module] = []
            for i in range(n):
                layers += [nn.Conv2d(c if i == 0 else 32, 32, 4, 2, 1), nn.ReLU()]
            layers += [nn.Flatten(), nn.Linear(32 * 16, hidden), nn.ReLU()]
        else:
            layers = [nn.Flatten(), nn.Linear(math.prod(shape), hidden), nn.ReLU()]
        layers += [nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Decoder(nn.Module):
    """The mirror image of :class:`_Encoder`; returns logits of the pixel means."""

    def __init__(self, shape: Sequence[int], latent_dim: int, network: str, hidden: int = 256):
        super().__init__()
        self.shape = tuple(shape)
        layers: list[nn.Module] = [nn.Linear(latent_dim, hidden), nn.ReLU(),
                                   nn.Linear(hidden, hidden), nn.ReLU()]
        if network == "conv":
            c, n = _conv_sizes(shape)
            layers += [nn.Linear(hidden, 32 * 16), nn.ReLU(), nn.Unflatten(1, (32, 4, 4))]
            for i in range(n):
                last = i == n - 1
                layers.append(nn.ConvTranspose2d(32, c if last else 32, 4, 2, 1))
                if not last:
                    layers.append(nn.ReLU())
        else:
            layers += [nn.Linear(hidden, math.prod(shape)), nn.Unflatten(1, self.shape)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def _check_images(x: torch.Tensor, shape: tuple[int, ...], name: str = "x") -> None:
    check_batch(x, name)
    if tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"{name} must be shaped (n, {', '.join(map(str, shape))}), got {tuple(x.shape)}"
        )


# ----------------------------------------------------------------------------- models


@register_architecture("vae")
class VAE(nn.Module):
    """Variational autoencoder with a Gaussian encoder (Bordt et al., §4, appendix A).

    ``decode(z)`` returns the decoder's mean image (sigmoid of the logits for the Bernoulli
    decoder): the map whose Jacobian spans the tangent space of the learned manifold.

    Examples
    --------
    >>> import torch
    >>> vae = VAE((1, 8, 8), latent_dim=3, network="mlp", hidden=16)
    >>> x = torch.rand(4, 1, 8, 8)
    >>> vae.loss(x).shape, vae.decode(torch.zeros(2, 3)).shape
    (torch.Size([4]), torch.Size([2, 1, 8, 8]))
    """

    def __init__(self, shape: Sequence[int] = (1, 32, 32), latent_dim: int = 10,
                 decoder: str = "bernoulli", network: str = "conv", hidden: int = 256,
                 beta: float = 1.0, decoder_std: float = 0.1):
        super().__init__()
        if decoder not in ("bernoulli", "gaussian"):
            raise ValueError(f"decoder must be 'bernoulli' or 'gaussian', got {decoder!r}")
        if network not in ("conv", "mlp"):
            raise ValueError(f"network must be 'conv' or 'mlp', got {network!r}")
        self.shape = tuple(int(s) for s in shape)
        self.latent_dim = int(latent_dim)
        self.likelihood = decoder
        self.beta, self.decoder_std = float(beta), float(decoder_std)
        self.encoder = _Encoder(self.shape, 2 * self.latent_dim, network, hidden)
        self.decoder = _Decoder(self.shape, self.latent_dim, network, hidden)
        self.spec = {"arch": type(self).__name__.lower(), "shape": list(self.shape),
                     "latent_dim": self.latent_dim, "decoder": decoder, "network": network,
                     "hidden": hidden, **self._extra_spec()}

    def _extra_spec(self) -> dict[str, Any]:
        return {"beta": self.beta, "decoder_std": self.decoder_std}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, log σ²)`` of q(z|x), each (n, k)."""
        _check_images(x, self.shape)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30, 20)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image for latents z (n, k) → (n, *shape)."""
        out = self.decoder(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x through the posterior means."""
        return self.decode(self.encode(x)[0])

    def reconstruction_nll(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """−log p(x|z) per sample (up to a constant for the Gaussian decoder)."""
        if self.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        else:
            nll = 0.5 * ((x - logits) / self.decoder_std) ** 2
        return nll.reshape(x.shape[0], -1).sum(1)

    def loss(self, x: torch.Tensor, dataset_size: int | None = None) -> torch.Tensor:
        """Negative ELBO per sample with the KL weighted β (β = 1: the ELBO)."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        rec = self.reconstruction_nll(x, self.decode_logits(z))
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
        return rec + self.beta * kl


def _log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 * torch.exp(-logvar))


@register_architecture("betatcvae")
class BetaTCVAE(VAE):
    """β-TCVAE (Chen et al. 2018): ``rec + α·MI + β·TC + γ·dimKL`` per sample, where

    MI = log q(z|x) − log q(z),   TC = log q(z) − Σ_j log q(z_j),
    dimKL = Σ_j log q(z_j) − log p(z)

    and log q(z), log q(z_j) are estimated by minibatch-weighted sampling over the batch
    (``log q(z_i) ≈ logsumexp_m log q(z_i | x_m) − log(N·M)``, N the dataset size, M the batch
    size). Bordt et al. use α = γ = 1, β = 6, k = 10.
    """

    def __init__(self, shape: Sequence[int] = (1, 32, 32), latent_dim: int = 10,
                 decoder: str = "bernoulli", network: str = "conv", hidden: int = 256,
                 alpha: float = 1.0, beta: float = 6.0, gamma: float = 1.0,
                 decoder_std: float = 0.1):
        self.alpha, self.gamma = float(alpha), float(gamma)
        super().__init__(shape, latent_dim, decoder, network, hidden, beta, decoder_std)

    def _extra_spec(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "decoder_std": self.decoder_std}

    def loss(self, x: torch.Tensor, dataset_size: int | None = None) -> torch.Tensor:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        rec = self.reconstruction_nll(x, self.decode_logits(z))
        terms = self.kl_terms(z, mu, logvar, dataset_size or x.shape[0])
        return rec + self.alpha * terms["mi"] + self.beta * terms["tc"] + \
            self.gamma * terms["dim_kl"]

    @staticmethod
    def kl_terms(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                 dataset_size: int) -> dict[str, torch.Tensor]:
        """Per-sample MI, TC and dimension-wise KL estimates (minibatch-weighted sampling)."""
        m = z.shape[0]
        log_qz_x = _log_normal(z, mu, logvar).sum(1)
        log_pz = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
        mat = _log_normal(z.unsqueeze(1), mu.unsqueeze(0), logvar.unsqueeze(0))  # (m, m, k)
        norm = math.log(dataset_size * m)
        log_qz = torch.logsumexp(mat.sum(2), dim=1) - norm
        log_prod_qzj = (torch.logsumexp(mat, dim=1) - norm).sum(1)
        return {"mi": log_qz_x - log_qz, "tc": log_qz - log_prod_qzj,
                "dim_kl": log_prod_qzj - log_pz}


@register_architecture("autoencoder")
class AutoEncoder(nn.Module):
    """A deterministic convolutional autoencoder (the reconstructive approach of Bordt et al.).

    >>> import torch
    >>> ae = AutoEncoder((1, 8, 8), latent_dim=4, network="mlp", hidden=16)
    >>> ae(torch.rand(2, 1, 8, 8)).shape
    torch.Size([2, 1, 8, 8])
    """

    def __init__(self, shape: Sequence[int] = (1, 32, 32), latent_dim: int = 10,
                 network: str = "conv", hidden: int = 256):
        super().__init__()
        if network not in ("conv", "mlp"):
            raise ValueError(f"network must be 'conv' or 'mlp', got {network!r}")
        self.shape = tuple(int(s) for s in shape)
        self.latent_dim = int(latent_dim)
        self.encoder = _Encoder(self.shape, self.latent_dim, network, hidden)
        self.decoder = _Decoder(self.shape, self.latent_dim, network, hidden)
        self.spec = {"arch": "autoencoder", "shape": list(self.shape),
                     "latent_dim": self.latent_dim, "network": network, "hidden": hidden}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.shape)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor, dataset_size: int | None = None) -> torch.Tensor:
        logits = self.decoder(self.encode(x))
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").reshape(
            x.shape[0], -1).sum(1)


class UpsampledDecoder(nn.Module):
    """``decode`` followed by a differentiable bilinear upsampling to ``size × size`` (seed
    004's MNIST256): the same manifold in a larger ambient space."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, int(size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.model.decode(z)
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                             align_corners=False)


def _tangent_rtol(model: nn.Module, z: torch.Tensor) -> float:
    """The rank tolerance of the decoder's own output (:func:`~manifoldlens.tangent.
    default_rank_rtol` at its d), also for its upsampled copy: the exact linear upsampling
    neither adds directions nor the rounding error that the default at the upsampled d
    assumes, which would drop at 256 × 256 the weak directions (latents the decoder barely
    uses) kept at the decoder's size."""
    return default_rank_rtol(math.prod(model.shape), z.shape[1], z.dtype)


# ----------------------------------------------------------------------------- training


def train_generative(model: nn.Module, images: torch.Tensor, *, steps: int | None = None,
                     epochs: float | None = None, batch_size: int = 64, lr: float = 1e-3,
                     seed: int = 0, run: Run | RunOptions | None = None,
                     progress: bool = True, device: str = "cpu",
                     test_images: torch.Tensor | None = None) -> TrainResult:
    """Train a VAE, β-TCVAE or autoencoder with Adam on images in [0, 1]
    (:func:`manifoldlens.training.fit`: checkpoints, resume and metadata through
    ``run=RunOptions(...)``, NaN stop)."""
    check_batch(images, "images")
    torch.manual_seed(seed)
    model.to(device)
    n = images.shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step_loss(xb, _, step):
        return model.loss(xb, dataset_size=n).mean()

    @torch.no_grad()
    def evaluate():  # in chunks: the β-TCVAE's estimator is quadratic in the batch
        with eval_mode(model):
            se, loss, m = 0.0, 0.0, test_images.shape[0]
            for i in range(0, m, 256):
                xt = test_images[i:i + 256].to(device)
                se += float(((model(xt) - xt) ** 2).sum())
                loss += float(model.loss(xt, dataset_size=n).sum())
        return {"test_recon_mse": se / test_images[0].numel() / m, "test_loss": loss / m}

    config = {"optimizer": "adam", "lr": lr, "batch_size": batch_size, "seed": seed, "n_train": n}
    return fit(model, images, None, step_loss, opt, batch_size=batch_size, steps=steps,
               epochs=epochs, seed=seed, run=run, progress=progress, device=device,
               train_config=config, evaluate_fn=evaluate if test_images is not None else None,
               desc=type(model).__name__)


@torch.no_grad()
def latent_traversal(model: nn.Module, z: torch.Tensor | None = None, *, span: float = 2.5,
                     steps: int = 9) -> torch.Tensor:
    """Decoded images varying one latent at a time around z (default 0):
    (k, steps, *shape), the usual disentanglement picture."""
    k = model.latent_dim
    p = next(model.parameters())
    base = torch.zeros(k, dtype=p.dtype, device=p.device) if z is None else z.reshape(k)
    vals = torch.linspace(-span, span, steps, dtype=p.dtype, device=p.device)
    zz = base.repeat(k, steps, 1)
    for j in range(k):
        zz[j, :, j] = base[j] + vals
    return model.decode(zz.reshape(k * steps, k)).reshape(k, steps, *model.shape)


# ----------------------------------------------------------------------------- labeller


class Labeller(nn.Module):
    """The labelling function c(z, x̂) → y of Algorithm 1: a small CNN on the reconstruction
    joined with an MLP on the latent code."""

    def __init__(self, shape: Sequence[int], latent_dim: int, num_classes: int = 10):
        super().__init__()
        c, h, w = shape
        self.image = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), 128), nn.ReLU(),
        )
        self.latent = nn.Sequential(nn.Linear(latent_dim, 64), nn.ReLU())
        self.head = nn.Linear(128 + 64, num_classes)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.image(x), self.latent(z)], 1))


# ----------------------------------------------------------------------------- datasets


@dataclass
class ManifoldDataset:
    """Images on a known manifold: labels, latent codes and the tangent space of every image.

    ``tangent`` holds orthonormal rows (n, k, d); ``tangent_space()`` wraps them in a
    :class:`~manifoldlens.tangent.TangentSpace`. Saved as safetensors + JSON. Rows that are
    zero span nothing: an image's tangent dimension (:meth:`tangent_dims`) is its number of
    nonzero rows, k or fewer; ``info["tangent_dim"]`` (:func:`tangent_dim_summary`, kept up
    to date by :meth:`subset`) summarises it.
    """

    images: torch.Tensor
    labels: torch.Tensor
    latents: torch.Tensor
    tangent: torch.Tensor
    classes: list[str]
    info: dict[str, Any]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def tangent_space(self, index: Any = slice(None)):
        return TangentSpace(self.tangent[index], input_shape=self.shape)

    def tangent_dims(self) -> torch.Tensor:
        """Dimension of each image's tangent space (n,) int64: its nonzero rows, as
        :attr:`TangentSpace.dim <manifoldlens.tangent.TangentSpace.dim>` counts them
        (:func:`~manifoldlens.tangent.nonzero_rows`, no copy of the whole basis)."""
        return nonzero_rows(self.tangent).sum(-1)

    def subset(self, index: Any) -> ManifoldDataset:
        info = dict(self.info)
        part = ManifoldDataset(self.images[index], self.labels[index], self.latents[index],
                               self.tangent[index], self.classes, info)
        if "tangent_dim" in info:  # the subset's own images
            info["tangent_dim"] = tangent_dim_summary(part.tangent_dims(), self.tangent.shape[1])
        return part

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json``; returns the JSON path."""
        import json

        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": self.images.contiguous(), "labels": self.labels.contiguous(),
                   "latents": self.latents.contiguous(), "tangent": self.tangent.contiguous()},
                  str(path.with_suffix(".safetensors")))
        meta = {"format": "manifoldlens-manifold-dataset", "classes": self.classes,
                "n": len(self), "shape": list(self.shape), **self.info}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | Path) -> ManifoldDataset:
        import json

        from safetensors.torch import load_file

        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise FileNotFoundError(f"manifold dataset not found: {meta_path}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "manifoldlens-manifold-dataset":
            raise ValueError(f"{meta_path} is not a manifoldlens manifold dataset")
        t = load_file(str(path.with_suffix(".safetensors")))
        info = {k: v for k, v in meta.items() if k not in ("format", "classes", "n", "shape")}
        return cls(t["images"], t["labels"], t["latents"], t["tangent"], meta["classes"], info)


def tangent_dim_summary(dims: torch.Tensor, k: int) -> dict[str, Any]:
    """Min, median and max of the tangent dimensions ``dims`` (n,) and how many images have
    fewer than ``k`` directions (``below_k``): what ``info["tangent_dim"]`` records."""
    values = [int(m) for m in torch.as_tensor(dims).flatten().tolist()]
    if not values:
        return {"min": None, "median": None, "max": None, "below_k": 0}
    median = statistics.median(values)
    return {"min": min(values), "median": int(median) if median == int(median) else median,
            "max": max(values), "below_k": sum(m < k for m in values)}


def thin_tangent_message(summaries: dict[str, dict[str, Any]], sizes: dict[str, int],
                         k: int) -> str | None:
    """A sentence when some images' tangent spaces have fewer than k directions, naming how
    many of each part (``summaries`` of :func:`tangent_dim_summary` and ``sizes`` by name,
    e.g. the splits) and the range of their dimensions; None when every image has k."""
    parts = [f"{s['below_k']} of {sizes[name]} {name} images (dimension {s['min']}–{s['max']}, "
             f"median {s['median']})" for name, s in summaries.items() if s["below_k"]]
    if not parts:
        return None
    return (f"the decoder's tangent space has fewer than k = {k} directions at "
            f"{'; '.join(parts)}: its Jacobian has lower rank there (narrow layers, dead ReLUs "
            "or a latent the decoder ignores); the random baseline is computed from each "
            "image's dimension, not from k")


def _record_dims(info: dict[str, Any], ts: TangentSpace, k: int, warn: bool) -> None:
    """``info["tangent_dim"]`` of a new dataset, and its warning when some are below k."""
    info["tangent_dim"] = tangent_dim_summary(ts.dim.cpu(), k)
    message = thin_tangent_message({"dataset": info["tangent_dim"]}, {"dataset": len(ts)}, k)
    if warn and message:
        warnings.warn(message, stacklevel=3)


def _posterior(model, images, device):
    """``(μ, σ)`` of q(z|x) for a VAE; ``(code, 0)`` for an autoencoder."""
    mus, sigmas = [], []
    with torch.no_grad():
        for i in range(0, len(images), 512):
            out = model.encode(images[i:i + 512].to(device))
            mu, logvar = out if isinstance(out, tuple) else (out, None)
            mus.append(mu)
            sigmas.append(torch.zeros_like(mu) if logvar is None else (0.5 * logvar).exp())
    return torch.cat(mus), torch.cat(sigmas)


def _train_labeller(model, images, labels, num_classes, *, steps, batch_size, seed, progress):
    """The labelling function c(ẑ, x̂) of Algorithm 1, on latent states drawn from the
    encoder, ẑ ~ q(z|x) (a fresh draw at every step), and their decodings x̂ = dec(ẑ);
    trained on 90 % of the data, its accuracy measured on the held-out 10 % (one draw each;
    Bordt et al. report 96 % on MNIST's test images).

    Drawn, not the posterior mean: a latent the decoder ignores has q(z|x) ≈ N(0, 1), so
    drawn codes teach c that it carries no label. Trained on μ(x) ≈ 0 there, c would label
    prior samples (where that latent is N(0, 1)) by features the images do not show."""
    device = next(model.parameters()).device
    mu, sigma = _posterior(model, images, device)
    labels = labels.to(device)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(device)
    cut = len(labels) - max(1, len(labels) // 10)
    fit_idx, held = perm[:cut], perm[cut:]
    torch.manual_seed(seed)
    labeller = Labeller(model.shape, model.latent_dim, num_classes).to(device)
    opt = torch.optim.Adam(labeller.parameters(), lr=1e-3)
    k = model.latent_dim
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = m + s * torch.randn(m.shape, generator=gen, device=device, dtype=m.dtype)
        with torch.no_grad():
            return z, model.decode(z)

    def step_loss(xb, yb, step):
        z, rec = draw(xb[:, :k], xb[:, k:])
        return F.cross_entropy(labeller(z, rec), yb)

    fit(labeller, torch.cat([mu, sigma], 1)[fit_idx], labels[fit_idx], step_loss, opt,
        batch_size=min(batch_size, len(fit_idx)),
        steps=steps, seed=seed, progress=progress, desc="labeller", device=device)
    labeller.eval()
    with torch.no_grad():
        pred = torch.cat([labeller(*draw(mu[h], sigma[h])).argmax(1)
                          for h in held.split(512)])
    return labeller, float((pred == labels[held]).double().mean())


def generative_dataset(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, n: int, *,
                       classes: Sequence[str] | None = None, upsample: int | None = None,
                       labeller_steps: int = 2000, batch_size: int = 256, seed: int = 0,
                       progress: bool = True, labeller: Callable | None = None,
                       warn: bool = True) -> tuple[ManifoldDataset, dict]:
    """Bordt et al., Algorithm 1 (appendix): a dataset with a completely known manifold.

    1. pass the dataset through the trained (β-TC)VAE ``model``: ẑ ~ q(z|x), x̂ = dec(ẑ);
    2. train a labelling function c(ẑ, x̂) → y (:class:`Labeller`), a fresh ẑ at every step;
    3. draw z ~ N(0, I), decode x = dec(z), label y = argmax c(z, x) and accept with
       probability p_max² (rejection sampling, as in Bordt et al., A.1), until n are accepted;
    4. keep the tangent space span ∂dec/∂z at each accepted z (forward mode).

    ``upsample=S`` appends a differentiable bilinear upsampling to S × S (Bordt et al.'s MNIST256).
    Returns the dataset and statistics (labeller accuracy, acceptance rate, the tangent
    dimensions ``tangent_dim``); ``warn``: a ``UserWarning`` when some tangent spaces have
    fewer than k directions.
    """
    model.eval()
    num_classes = int(labels.max()) + 1
    acc = float("nan")
    if labeller is None:
        labeller, acc = _train_labeller(model, images, labels, num_classes,
                                        steps=labeller_steps, batch_size=64, seed=seed,
                                        progress=progress)
    g = torch.Generator().manual_seed(seed)
    p = next(model.parameters())
    zs, ys, tried = [], [], 0
    with torch.no_grad():
        while sum(len(z) for z in zs) < n:
            z = torch.randn(batch_size, model.latent_dim, generator=g, dtype=p.dtype).to(p.device)
            x = model.decode(z)
            prob = torch.softmax(labeller(z, x), 1)
            pmax, y = prob.max(1)
            u = torch.rand(batch_size, generator=g, dtype=p.dtype).to(p.device)
            keep = u < pmax**2  # rejection sampling: accept with probability p_max²
            zs.append(z[keep])
            ys.append(y[keep])
            tried += batch_size
    accepted = sum(len(z) for z in zs)
    z = torch.cat(zs)[:n]
    y = torch.cat(ys)[:n].cpu()
    decoder = UpsampledDecoder(model, upsample) if upsample else model.decode
    with torch.no_grad():
        x = torch.cat([decoder(z[i:i + 512]) for i in range(0, n, 512)])
    ts = TangentSpace.from_decoder(decoder, z, chunk_size=256, rtol=_tangent_rtol(model, z))
    info = {"approach": "generative", "latent_dim": model.latent_dim, "upsample": upsample,
            "labeller_heldout_accuracy": acc, "acceptance_rate": accepted / tried, "seed": seed}
    _record_dims(info, ts, model.latent_dim, warn)
    ds = ManifoldDataset(x.float().cpu(), y, z.float().cpu(), ts.basis.float().cpu(),
                         list(classes) if classes else [str(c) for c in range(num_classes)],
                         info)
    return ds, info


def reconstructive_dataset(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                           classes: Sequence[str] | None = None,
                           upsample: int | None = None, warn: bool = True) -> ManifoldDataset:
    """The reconstructive approach of Bordt et al.: autoencoder reconstructions of real images,
    with the original labels and the decoder's tangent space at each code (its dimensions in
    ``info["tangent_dim"]``; ``warn``: a ``UserWarning`` when some are below k)."""
    model.eval()
    with torch.no_grad():
        z = torch.cat([latent_code(model, images[i:i + 512])
                       for i in range(0, len(images), 512)])
    decoder = UpsampledDecoder(model, upsample) if upsample else model.decode
    with torch.no_grad():
        x = torch.cat([decoder(z[i:i + 512]) for i in range(0, len(z), 512)])
    ts = TangentSpace.from_decoder(decoder, z, chunk_size=256, rtol=_tangent_rtol(model, z))
    num_classes = int(labels.max()) + 1
    info = {"approach": "reconstructive", "latent_dim": model.latent_dim, "upsample": upsample}
    _record_dims(info, ts, model.latent_dim, warn)
    return ManifoldDataset(x.float(), labels.clone(), z.float(), ts.basis.float(),
                           list(classes) if classes else [str(c) for c in range(num_classes)],
                           info)


def latent_code(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The code of x: the posterior mean μ(x) of a VAE, the encoding of an autoencoder."""
    out = model.encode(x)
    return out[0] if isinstance(out, tuple) else out
