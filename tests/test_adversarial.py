"""ℓ2-PGD and adversarial training (seed 004, appendix A)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from manifoldlens.data import load_dataset
from manifoldlens.models import create_model
from manifoldlens.training import RunOptions, pgd_l2, train_classifier

from helpers import TinyMLP, make


def test_one_step_without_clamp_is_the_normalised_gradient():
    model = make(TinyMLP())
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    adv = pgd_l2(model, x, y, 0.5, steps=1, step_size=0.5, clamp=None)
    expected = x + 0.5 * g / g.norm(dim=1, keepdim=True)
    torch.testing.assert_close(adv, expected)


@settings(max_examples=20, deadline=None)
@given(eps=st.floats(0.0, 3.0), steps=st.integers(1, 6), seed=st.integers(0, 100))
def test_perturbation_stays_in_the_ball_and_the_domain(eps, steps, seed):
    model = make(TinyMLP())
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 12, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    adv = pgd_l2(model, x, y, eps, steps=steps)
    assert ((adv - x).norm(dim=1) <= eps + 1e-9).all()
    assert (adv >= 0).all() and (adv <= 1).all()


def test_attack_raises_the_loss_and_takes_per_sample_radii():
    model = make(TinyMLP())
    x = torch.rand(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    eps = torch.tensor([0.0, 0.1, 0.2, 0.5, 1.0, 2.0], dtype=torch.float64)
    adv = pgd_l2(model, x, y, eps, steps=20, clamp=None)
    torch.testing.assert_close((adv - x).norm(dim=1)[0], torch.tensor(0.0, dtype=torch.float64))
    before = F.cross_entropy(model(x), y, reduction="none")
    after = F.cross_entropy(model(adv), y, reduction="none")
    assert (after[1:] > before[1:]).all()
    assert ((adv - x).norm(dim=1) <= eps + 1e-9).all()
    with pytest.raises(ValueError, match="eps"):
        pgd_l2(model, x, y, -1.0)


def test_adversarial_training_is_recorded_and_deterministic(tmp_path):
    from manifoldlens.runs import Run

    train = load_dataset("digits", "train").subset(120, seed=0)

    def run(adversarial, out=None):
        torch.manual_seed(0)
        model = create_model("mlp", (1, 8, 8), 10, hidden=(16,))
        kw = {}
        if out is not None:
            kw = {"run": RunOptions(Run(out, "train"), checkpoint_every=6)}
        return train_classifier(model, train, steps=6, batch_size=20, lr=0.1, progress=False,
                                adversarial=adversarial, **kw)

    adv = {"eps": (0.5, 1.0), "steps": 3}
    a, b, plain = run(adv, tmp_path / "a"), run(adv), run(None)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pp) for pa, pp in
               zip(a.model.parameters(), plain.model.parameters(), strict=True))
    meta = json.loads((tmp_path / "a" / "checkpoints" / "step-00000006.json").read_text())
    assert meta["metadata"]["train_config"]["adversarial"] == {
        "eps": [0.5, 1.0], "steps": 3, "clamp": [0.0, 1.0]}
