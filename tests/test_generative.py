"""Generative models of the data manifold (seed 004): VAE, β-TCVAE, autoencoder."""

from __future__ import annotations

import math

import pytest
import torch

from manifoldlens.data import load_dataset
from manifoldlens.generative import (
    VAE,
    AutoEncoder,
    BetaTCVAE,
    _log_normal,
    latent_traversal,
    train_generative,
)
from manifoldlens.models import load_checkpoint, save_checkpoint

DT = torch.float64


@pytest.mark.parametrize("side", [16, 32, 64])
def test_conv_shapes(side):
    vae = BetaTCVAE((1, side, side), latent_dim=10)
    x = torch.rand(3, 1, side, side)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 10)
    assert vae.decode(mu).shape == (3, 1, side, side)
    assert vae.loss(x, dataset_size=100).shape == (3,)
    ae = AutoEncoder((1, side, side), latent_dim=6)
    assert ae(x).shape == x.shape and ae.encode(x).shape == (3, 6)


def test_conv_needs_a_power_of_two_side():
    with pytest.raises(ValueError, match="power-of-two"):
        VAE((1, 28, 28))
    with pytest.raises(ValueError, match="network"):
        VAE((1, 32, 32), network="rnn")
    vae = VAE((1, 32, 32))
    with pytest.raises(ValueError, match=r"shaped \(n, 1, 32, 32\)"):
        vae.encode(torch.rand(2, 1, 28, 28))


def test_tc_decomposition_sums_to_the_kl_sample_estimate():
    """MI + TC + dimKL = log q(z|x) − log p(z), sample by sample (Chen et al. eq. 2)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 4, dtype=DT, generator=g)
    logvar = 0.3 * torch.randn(7, 4, dtype=DT, generator=g)
    z = mu + torch.randn(7, 4, dtype=DT, generator=g) * (0.5 * logvar).exp()
    t = BetaTCVAE.kl_terms(z, mu, logvar, dataset_size=1000)
    log_qz_x = _log_normal(z, mu, logvar).sum(1)
    log_pz = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    torch.testing.assert_close(t["mi"] + t["tc"] + t["dim_kl"], log_qz_x - log_pz)


def test_minibatch_weighted_sampling_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    m, k, n_data = 5, 3, 50
    mu = torch.randn(m, k, dtype=DT, generator=g)
    logvar = 0.2 * torch.randn(m, k, dtype=DT, generator=g)
    z = torch.randn(m, k, dtype=DT, generator=g)
    t = BetaTCVAE.kl_terms(z, mu, logvar, dataset_size=n_data)
    normal = torch.distributions.Normal
    for i in range(m):
        dens = [normal(mu[j], (0.5 * logvar[j]).exp()).log_prob(z[i]) for j in range(m)]
        log_qz = torch.logsumexp(torch.stack([d.sum() for d in dens]), 0) - math.log(n_data * m)
        per_dim = torch.logsumexp(torch.stack(dens), 0) - math.log(n_data * m)
        log_qz_x = normal(mu[i], (0.5 * logvar[i]).exp()).log_prob(z[i]).sum()
        log_pz = normal(0.0, 1.0).log_prob(z[i]).sum()
        torch.testing.assert_close(t["tc"][i], log_qz - per_dim.sum())
        torch.testing.assert_close(t["mi"][i], log_qz_x - log_qz)
        torch.testing.assert_close(t["dim_kl"][i], per_dim.sum() - log_pz)


def test_vae_kl_is_analytic_and_beta_weighted():
    torch.manual_seed(0)
    vae = VAE((1, 8, 8), latent_dim=3, network="mlp", hidden=16).double()
    x = torch.rand(4, 1, 8, 8, dtype=DT)
    mu, logvar = vae.encode(x)
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    torch.manual_seed(5)
    l1 = vae.loss(x)
    vae.beta = 3.0
    torch.manual_seed(5)
    l3 = vae.loss(x)
    torch.testing.assert_close(l3 - l1, 2 * kl)


def test_training_lowers_the_loss_and_checkpoints_round_trip(tmp_path):
    train = load_dataset("digits", "train").subset(256, seed=0).images
    torch.manual_seed(0)
    vae = BetaTCVAE((1, 8, 8), latent_dim=4, network="mlp", hidden=64)
    with torch.no_grad():
        before = float(vae.loss(train, dataset_size=256).mean())
    res = train_generative(vae, train, steps=150, batch_size=64, lr=3e-3, progress=False,
                           test_images=train[:64])
    vae.eval()
    with torch.no_grad():
        after = float(vae.loss(train, dataset_size=256).mean())
    assert after < before - 5 and res.metrics["test_recon_mse"] < 0.2
    path = save_checkpoint(tmp_path / "vae", vae)
    loaded, _ = load_checkpoint(path)
    assert isinstance(loaded, BetaTCVAE) and loaded.spec == vae.spec
    torch.testing.assert_close(loaded.decode(torch.zeros(2, 4)), vae.decode(torch.zeros(2, 4)))
    trav = latent_traversal(vae, steps=5)
    assert trav.shape == (4, 5, 1, 8, 8)
    torch.testing.assert_close(trav[0, 2], vae.decode(torch.zeros(1, 4))[0])
