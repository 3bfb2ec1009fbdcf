"""Normalizing flows: every layer and model inverted, and its log-determinant checked against
``slogdet`` of the brute-force autograd Jacobian, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manifoldlens import flows
from manifoldlens.data import make_toy_2d
from manifoldlens.flows import layers as L
from manifoldlens.models import load_checkpoint, save_checkpoint

DT = torch.float64


def _perturb(module: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """Move every parameter away from its (often identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _as_flat(fn, x0: torch.Tensor):
    """One sample's map as a function of the flattened input, output flattened."""
    return lambda v: fn(v.reshape(1, *x0.shape))[0].reshape(-1)


def _check_layer(layer, x: torch.Tensor, atol: float = 1e-10) -> None:
    y, logdet = layer(x)
    assert logdet.shape == (x.shape[0],)
    torch.testing.assert_close(layer.inverse(y), x, atol=atol, rtol=0)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(_as_flat(lambda v: layer(v)[0], x[i]),
                                                 x[i].reshape(-1))
        sign, ref = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(logdet[i], ref, atol=1e-9, rtol=1e-9)


def _vec(n=4, d=6, seed=0):
    return torch.randn(n, d, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _img(n=3, c=2, h=4, w=4, seed=0):
    return torch.randn(n, c, h, w, dtype=DT, generator=torch.Generator().manual_seed(seed))


LAYERS = {
    "additive_vector": lambda: (L.AdditiveCoupling(L.mlp(6, 6, 8, 2), L.alternating_mask(6)),
                                _vec()),
    "additive_channel": lambda: (L.AdditiveCoupling(L.GlowCouplingNet(2, 2, 8), split="channel",
                                                    parity=1), _img(c=4)),
    "affine_vector_tanh": lambda: (L.AffineCoupling(L.mlp(6, 12, 8, 2), L.alternating_mask(6, 1),
                                                    features=6), _vec()),
    "affine_checkerboard": lambda: (L.AffineCoupling(L.ResNetCoupling(2, 4, 8, 1),
                                                     L.checkerboard_mask(4, 4, 1), features=2,
                                                     pass_mask=True), _img()),
    "affine_checkerboard_split": lambda: (L.AffineCoupling(L.ResNetCoupling(2, 4, 8, 1, False),
                                                           split="checkerboard", parity=1,
                                                           features=2), _img()),
    "additive_checkerboard_split": lambda: (L.AdditiveCoupling(L.GlowCouplingNet(2, 2, 8),
                                                               split="checkerboard"), _img()),
    "affine_channel_mask": lambda: (L.AffineCoupling(L.ResNetCoupling(4, 8, 8, 1),
                                                     L.channel_mask(4, 0), features=4,
                                                     pass_mask=True), _img(c=4)),
    "affine_channel_sigmoid": lambda: (L.AffineCoupling(L.GlowCouplingNet(2, 4, 8),
                                                        split="channel", scale="sigmoid"),
                                       _img(c=4)),
    "additive_alternating_odd": lambda: (L.AdditiveCoupling(L.mlp(3, 2, 8, 2),
                                                            split="alternating"), _vec(d=5)),
    "affine_alternating": lambda: (L.AffineCoupling(L.mlp(3, 6, 8, 2), split="alternating",
                                                    parity=1, features=3), _vec()),
    "diagonal_scaling": lambda: (L.DiagonalScaling(6), _vec()),
    "actnorm_vector": lambda: (L.ActNorm(6), _vec()),
    "actnorm_image": lambda: (L.ActNorm(2), _img()),
    "invconv_1x1": lambda: (L.InvertibleConv1x1(4, seed=3), _img(c=4)),
    "squeeze": lambda: (L.Squeeze(), _img()),
    "reverse": lambda: (L.Reverse(), _vec()),
    "logit": lambda: (L.Logit(0.05), torch.rand(3, 1, 3, 3, dtype=DT)),
    "shift": lambda: (L.Shift(0.5), _vec()),
    "reshape": lambda: (flows.Reshape((2, 4, 4), (32,)), _img()),
}


@pytest.mark.parametrize("name", LAYERS)
def test_layer_inverse_and_logdet(name):
    layer, x = LAYERS[name]()
    layer = _perturb(layer.double()).eval()
    _check_layer(layer, x)


def test_split_standardizes_and_inverts():
    split = _perturb(L.Split(4).double())
    x = _img(c=4)
    z1, eps, logdet = split(x)
    assert z1.shape == (3, 2, 4, 4) and eps.shape == (3, 2, 4, 4)
    torch.testing.assert_close(split.inverse(z1, eps), x)
    mu, log_sigma = split.prior(z1).chunk(2, 1)
    torch.testing.assert_close(eps, (x[:, 2:] - mu) / log_sigma.exp())

    def full(v):  # (z1, z2) ↦ (z1, ε): log|det| = −Σ log σ(z1)
        a, e, _ = split(v)
        return torch.cat([a, e], 1)

    for i in range(3):
        jac = torch.autograd.functional.jacobian(_as_flat(full, x[i]), x[i].reshape(-1))
        torch.testing.assert_close(torch.linalg.slogdet(jac)[1], logdet[i])


@pytest.mark.parametrize("parity", [0, 1])
def test_checkerboard_split_is_the_checkerboard_mask(parity):
    """The half-resolution split conditions on exactly the pixels the mask keeps."""
    layer = L.AdditiveCoupling(nn.Identity(), split="checkerboard", parity=parity)
    x = torch.arange(2 * 4 * 6, dtype=DT).reshape(1, 2, 4, 6)
    a, b = layer.layout.split(x)
    m = L.checkerboard_mask(4, 6, parity).bool().expand(1, 2, 4, 6)
    assert torch.equal(a.sort(-1).values.flatten().sort().values, x[m].sort().values)
    assert torch.equal(b.flatten().sort().values, x[~m].sort().values)
    torch.testing.assert_close(layer.layout.merge(a, b), x)


@pytest.mark.parametrize("d", [5, 6])
@pytest.mark.parametrize("parity", [0, 1])
def test_alternating_split_is_the_alternating_mask(d, parity):
    """The vector split conditions on exactly the features the mask keeps, in order."""
    layer = L.AdditiveCoupling(nn.Identity(), split="alternating", parity=parity)
    x = torch.arange(2 * d, dtype=DT).reshape(2, d)
    a, b = layer.layout.split(x)
    m = L.alternating_mask(d, parity).bool()
    assert torch.equal(a, x[:, m]) and torch.equal(b, x[:, ~m])
    assert torch.equal(layer.layout.merge(a, b), x)
    with pytest.raises(ValueError, match="vectors"):
        layer.layout.split(x.reshape(2, 1, d))


def test_nice_alternating_equals_the_masked_layout_with_the_same_weights():
    """NICE's m: R^{D/2} → R^{D/2} is the masked R^D → R^D network restricted to the rows and
    columns the mask uses; copying those weights gives the same flow."""
    torch.manual_seed(0)
    half = _perturb(flows.NICE((5,), hidden=8, depth=2).double())
    masked = flows.NICE((5,), hidden=8, depth=2, split="mask").double()
    x = _vec(d=5)
    flows.initialize(half, x)
    with torch.no_grad():
        for a, b in zip(half.steps, masked.steps, strict=True):
            if isinstance(a, L.AdditiveCoupling):
                cond, out = b.mask.bool(), ~b.mask.bool()
                la, lb = a.net[0::2], b.net[0::2]
                for i, (u, v) in enumerate(zip(la, lb, strict=True)):
                    v.weight.zero_()
                    rows = out if i == len(la) - 1 else slice(None)
                    cols = cond if i == 0 else slice(None)
                    v.weight[rows, cols] = u.weight
                    v.bias.zero_()
                    v.bias[rows] = u.bias
            else:
                b.load_state_dict(a.state_dict())
    torch.testing.assert_close(masked(x)[0], half(x)[0])
    torch.testing.assert_close(masked.log_prob(x), half.log_prob(x))


def test_nice_checkpoints_without_a_split_load_as_masked(tmp_path):
    from manifoldlens.models import load_checkpoint, save_checkpoint

    old = _perturb(flows.NICE((6,), hidden=8, depth=1, split="mask").double())
    x = _vec()
    flows.initialize(old, x)
    old.spec.pop("split")  # as written by version 0.1
    save_checkpoint(tmp_path / "nice", old)
    loaded, _ = load_checkpoint(tmp_path / "nice.json")
    assert loaded.spec["split"] == "mask"
    torch.testing.assert_close(loaded.double().log_prob(x), old.log_prob(x))


def test_continuing_a_run_of_the_old_nice_layout(tmp_path):
    from manifoldlens.models import load_weights, model_for_checkpoint, save_checkpoint

    old = _perturb(flows.NICE((6,), hidden=8, depth=1, split="mask").double())
    old.spec.pop("split")  # a checkpoint of version 0.1
    save_checkpoint(tmp_path / "step", old)
    new = flows.NICE((6,), hidden=8, depth=1).double()  # what a resumed run builds now
    with pytest.raises(ValueError, match="do not fit this model"):
        load_weights(tmp_path / "step.json", new)
    model = model_for_checkpoint(new, tmp_path / "step.json")
    assert model.spec["split"] == "mask" and next(model.parameters()).dtype == DT
    load_weights(tmp_path / "step.json", model)
    torch.testing.assert_close(model.log_prob(_vec()), old.log_prob(_vec()))
    masked = flows.NICE((6,), hidden=8, depth=1, split="mask")
    assert model_for_checkpoint(masked, tmp_path / "step.json") is masked
    with pytest.raises(ValueError, match="hidden: 8 there, 16 now"):
        model_for_checkpoint(flows.NICE((6,), hidden=16, depth=1), tmp_path / "step.json")


@pytest.mark.parametrize("make", [lambda cl: L.ResNetCoupling(2, 4, 8, 2, channels_last=cl),
                                  lambda cl: L.GlowCouplingNet(2, 4, 8, channels_last=cl)])
def test_coupling_nets_in_channels_last_layout_are_the_same_function(make):
    torch.manual_seed(0)
    plain = _perturb(make(False).double())
    fast = make(True).double()
    fast.load_state_dict(plain.state_dict())
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = _img()
    torch.testing.assert_close(fast(x), plain(x))


def test_bases_match_torch_distributions():
    z = _vec(5, 3)
    normal = torch.distributions.Normal(torch.zeros((), dtype=DT), torch.ones((), dtype=DT))
    torch.testing.assert_close(L.StandardNormal().log_prob(z), normal.log_prob(z).sum(1))
    logistic = torch.distributions.TransformedDistribution(
        torch.distributions.Uniform(torch.zeros((), dtype=DT), torch.ones((), dtype=DT)),
        [torch.distributions.transforms.SigmoidTransform().inv],
    )
    torch.testing.assert_close(L.StandardLogistic().log_prob(z), logistic.log_prob(z).sum(1))
    g = torch.Generator().manual_seed(0)
    s = L.StandardLogistic().sample((20000, 1), dtype=DT, generator=g)
    assert torch.isfinite(s).all()
    assert abs(float(s.var()) - math.pi**2 / 3) < 0.15  # the standard logistic's variance


def test_logdets_add_under_composition():
    a = _perturb(L.AffineCoupling(L.mlp(6, 12, 8, 2), L.alternating_mask(6), features=6).double())
    b = _perturb(L.ActNorm(6).double(), seed=1).eval()
    flow = flows.Flow((6,), [a, b]).double()
    x = _vec()
    ya, lda = a(x)
    _, ldb = b(ya)
    torch.testing.assert_close(flow(x)[1], lda + ldb)


# ----------------------------------------------------------------------------- models

MODELS = {
    "nice_vector": lambda: (flows.NICE((6,), couplings=4, hidden=8, depth=2),
                            _vec()),
    "nice_image": lambda: (flows.NICE((1, 4, 4), hidden=8, depth=2),
                           torch.rand(3, 1, 4, 4, dtype=DT)),
    "nice_odd_masked": lambda: (flows.NICE((5,), hidden=8, depth=2, split="mask"),
                                _vec(d=5)),
    "realnvp_vector": lambda: (flows.RealNVP((2,), couplings=4, hidden=8), _vec(d=2)),
    "realnvp_image": lambda: (flows.RealNVP((1, 4, 4), scales=2, hidden_channels=8, blocks=1),
                              torch.rand(3, 1, 4, 4, dtype=DT)),
    "glow": lambda: (flows.Glow((1, 4, 4), levels=2, depth=2, hidden_channels=8),
                     torch.rand(3, 1, 4, 4, dtype=DT)),
    "glow_rgb_3_levels": lambda: (flows.Glow((3, 8, 8), levels=3, depth=1, hidden_channels=4),
                                  torch.rand(8, 3, 8, 8, dtype=DT)),
}


def _ready(name):
    torch.manual_seed(0)  # independent of the tests that ran before
    model, x = MODELS[name]()
    model = model.double()
    flows.initialize(model, x)
    return _perturb(model, 0.1).eval(), x


@pytest.mark.parametrize("name", MODELS)
def test_model_inverse_logdet_and_log_prob(name):
    model, x = _ready(name)
    z, logdet = model(x)
    assert z.shape == (x.shape[0], x[0].numel())
    torch.testing.assert_close(model.decode(z), x, atol=1e-9, rtol=0)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(_as_flat(lambda v: model(v)[0], x[i]),
                                                 x[i].reshape(-1))
        torch.testing.assert_close(torch.linalg.slogdet(jac)[1], logdet[i], atol=1e-8,
                                   rtol=1e-9)
    torch.testing.assert_close(model.log_prob(x), model.base.log_prob(z) + logdet)


@pytest.mark.parametrize("name", ["realnvp_image", "glow"])
def test_temperature_sampling_is_decoding_scaled_noise(name):
    model, _ = _ready(name)
    g = torch.Generator().manual_seed(5)
    samples = model.sample(4, temperature=0.7, generator=g)
    eps = torch.randn(4, model.dim, dtype=DT, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(samples, model.decode(0.7 * eps))
    torch.testing.assert_close(model.encode(samples), 0.7 * eps, atol=1e-9, rtol=0)


def test_actnorm_data_dependent_init():
    x = 3 + 2 * _img(n=16, c=3, seed=4)
    layer = L.ActNorm(3).double().train()
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=DT), atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=DT),
                               atol=1e-5, rtol=0)
    assert bool(layer.initialized)
    before = layer.bias.detach().clone()
    layer(_img(c=3, seed=9))  # a second batch never re-initialises
    torch.testing.assert_close(layer.bias.detach(), before)


def test_actnorm_state_survives_reload(tmp_path):
    model = flows.Glow((1, 4, 4), levels=2, depth=2, hidden_channels=8).double()
    x = torch.rand(8, 1, 4, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
    assert flows.initialize(model, x) == 4
    _perturb(model, 0.05)
    model.eval()
    ref = model.log_prob(x)
    path = save_checkpoint(tmp_path / "glow", model)
    loaded, _ = load_checkpoint(path)
    assert isinstance(loaded, flows.Glow) and loaded.spec == model.spec
    torch.testing.assert_close(loaded.log_prob(x), ref)
    loaded.train()  # a training-mode pass on other data must not re-initialise
    loaded(torch.rand(8, 1, 4, 4, dtype=DT))
    assert flows.initialize(loaded, x) == 0
    torch.testing.assert_close(loaded.eval().log_prob(x), ref)


def test_bits_per_dim_formula_and_dequantization():
    model, _ = _ready("glow")
    k = torch.randint(0, 256, (5, 1, 4, 4), generator=torch.Generator().manual_seed(1))
    x = (k / 255).to(DT)
    y = flows.dequantize(x, 256, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.floor(y * 256).long(), k)  # the noise stays inside each bin
    bpd = flows.bits_per_dim(model, y, 256, dequantize_input=False)
    torch.testing.assert_close(bpd, (-model.log_prob(y) + 16 * math.log(256)) / (16 * math.log(2)))
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    torch.testing.assert_close(flows.bits_per_dim(model, x, generator=g1),
                               flows.bits_per_dim(model, flows.dequantize(x, generator=g2),
                                                  dequantize_input=False))


def test_interpolation_endpoints_and_shape():
    model, x = _ready("realnvp_image")
    for method in ("linear", "slerp"):
        path = flows.interpolate(model, x[:2], x[1:3], steps=5, method=method)
        assert path.shape == (2, 5, 1, 4, 4)
        torch.testing.assert_close(path[:, 0], x[:2], atol=1e-9, rtol=0)
        torch.testing.assert_close(path[:, -1], x[1:3], atol=1e-9, rtol=0)


def test_trained_2d_density_integrates_to_one():
    torch.manual_seed(0)
    data = make_toy_2d("two-moons", 2000, seed=0).to(torch.float32)
    model = flows.RealNVP((2,), couplings=6, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        start = float(-model.log_prob(data).mean())  # the identity flow: N(0, I)
    for _ in range(250):
        batch = data[torch.randint(0, len(data), (256,))]
        loss = -model.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = model.double().eval()
    with torch.no_grad():
        assert float(-model.log_prob(data.double()).mean()) < start - 0.5  # it learned
    side = torch.linspace(-5, 5, 501, dtype=DT)
    gx, gy = torch.meshgrid(side, side, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    with torch.no_grad():
        p = model.log_prob(grid).exp()
    total = float(p.sum() * (side[1] - side[0]) ** 2)
    assert abs(total - 1) < 0.02, total


# ----------------------------------------------------------------------------- bad inputs


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3))
def test_wrong_shapes_are_named(shape):
    model = flows.Glow((1, 4, 4), levels=2, depth=1, hidden_channels=4)
    if tuple(shape) == (1, 4, 4):
        return
    with pytest.raises(ValueError, match="must be shaped"):
        model.log_prob(torch.rand(2, *shape))


def test_bad_values_are_refused():
    model = flows.RealNVP((1, 4, 4), scales=2, hidden_channels=4, blocks=1)
    x = torch.rand(3, 1, 4, 4)
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.log_prob(bad)
    with pytest.raises(ValueError, match=r"must lie in \[-0.05\d*, 1.05\d*\]"):
        model.log_prob(x * 3)
    with pytest.raises(ValueError, match="decod|shaped"):
        model.decode(torch.randn(2, 15))
    with pytest.raises(ValueError, match="divisible"):
        flows.Glow((1, 6, 6), levels=2)
    with pytest.raises(ValueError, match="unknown base"):
        flows.NICE((4,), base="cauchy")
    with pytest.raises(ValueError, match="scaled to"):
        flows.dequantize(x - 1)


def test_nice_scaling_starts_at_the_priors_spread_and_old_checkpoints_load():
    torch.manual_seed(0)
    model = flows.NICE((6,), hidden=8, depth=1).double()
    x = 0.3 * torch.rand(64, 6, dtype=DT)
    assert flows.initialize(model, x) == 1
    z = model.encode(x)
    torch.testing.assert_close(z.std(0, unbiased=False),
                               torch.full((6,), math.pi / math.sqrt(3), dtype=DT))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("initialized")}
    fresh = flows.NICE((6,), hidden=8, depth=1).double()
    fresh.load_state_dict(state)  # a checkpoint from before the buffer existed
    assert flows.initialize(fresh, x) == 0
    torch.testing.assert_close(fresh.encode(x), z)
