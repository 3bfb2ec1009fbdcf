"""The Jacobian engine against autograd brute force and closed forms, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from manifoldlens.jacobian import (
    class_correlation,
    gram_spectrum,
    jacobian,
    jacobian_gram,
    jacobian_gram_plan,
    jacobian_neighbors,
    kernel_target_alignment,
    score_jacobian,
    select_strategy,
    transform_jacobian,
)
from manifoldlens.memory import MemoryBudgetError, allocator_peak

from helpers import Counting, TinyCNN, TinyMLP, make

OUTPUT_FNS = {
    "logits": lambda s: s,
    "log_softmax": lambda s: torch.log_softmax(s, -1),
    "softmax": lambda s: torch.softmax(s, -1),
}


def brute_force(model, x, output):
    f = OUTPUT_FNS[output]
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda z: f(model(z[None])[0]), xi) for xi in x]
    )


MODELS = {
    "relu_mlp": (lambda: make(TinyMLP(act=nn.ReLU)), (12,)),
    "tanh_mlp": (lambda: make(TinyMLP(act=nn.Tanh)), (3, 4)),
    "cnn": (lambda: make(TinyCNN()), (1, 6, 6)),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("strategy", ["vjp", "vmap", "forward", "auto"])
@pytest.mark.parametrize("output", ["logits", "log_softmax", "softmax"])
def test_matches_autograd(name, strategy, output):
    build, shape = MODELS[name]
    model = build()
    x = torch.randn(5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if name == "tanh_mlp":
        model.net[0] = nn.Flatten()  # accepts (3, 4) inputs
    got = jacobian(model, x, output=output, strategy=strategy)
    ref = brute_force(model, x, output)
    assert got.shape == (5, ref.shape[1], *shape)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_output", ["logits", "log_probs"])
def test_relative_score_jacobian(relu_mlp, model_output):
    """C − 1 VJPs give rows ∇(s_c − s_r), r the top class: the same J_logp as C VJPs."""
    model = relu_mlp if model_output == "logits" else nn.Sequential(relu_mlp, nn.LogSoftmax(1))
    x = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    full, s = score_jacobian(model, x, model_output=model_output, strategy="vjp")
    rel, s_rel = score_jacobian(model, x, model_output=model_output, strategy="vjp",
                                relative=True)
    top = s.argmax(1)
    rows = torch.arange(7)
    torch.testing.assert_close(rel, full - full[rows, top].unsqueeze(1), rtol=1e-12, atol=1e-13)
    assert (rel[rows, top] == 0).all()
    torch.testing.assert_close(s_rel, s)
    ref = brute_force(model, x, "log_softmax")
    torch.testing.assert_close(transform_jacobian(rel, s, "log_softmax"), ref, rtol=1e-10,
                               atol=1e-12)


def test_linear_softmax_closed_form(linear):
    x = torch.randn(7, 12, dtype=torch.float64)
    w = linear[1].weight
    p = torch.softmax(linear(x), -1)
    j_s = w.expand(7, 4, 12)
    j_logp = j_s - torch.einsum("nc,cd->nd", p, w)[:, None]
    j_p = p[..., None] * j_logp
    torch.testing.assert_close(jacobian(linear, x, output="logits"), j_s)
    torch.testing.assert_close(jacobian(linear, x, output="log_softmax"), j_logp)
    torch.testing.assert_close(jacobian(linear, x, output="softmax"), j_p)
    # rows of J_p sum to zero (probabilities sum to one); Σ p_c ∇log p_c = 0
    torch.testing.assert_close(j_p.sum(1), torch.zeros(7, 12, dtype=torch.float64))


@pytest.mark.parametrize(
    "declared,head", [("log_probs", nn.LogSoftmax(1)), ("probs", nn.Softmax(1))]
)
def test_models_returning_probabilities(relu_mlp, declared, head):
    wrapped = nn.Sequential(relu_mlp, head).eval()
    x = torch.randn(6, 12, dtype=torch.float64)
    for output in ("log_softmax", "softmax"):
        ref = jacobian(relu_mlp, x, output=output)
        got = jacobian(wrapped, x, output=output, model_output=declared)
        torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match=f"model_output='{declared}'"):
        jacobian(wrapped, x)  # declared logits: refused with the fix in the message


def test_declared_log_probs_but_logits(relu_mlp):
    with pytest.raises(ValueError, match="not normalised"):
        jacobian(relu_mlp, torch.randn(3, 12, dtype=torch.float64), model_output="log_probs")


def test_batchnorm_train_mode_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="BatchNorm1d.*model.eval"):
        jacobian(model, x)
    model.eval()
    assert jacobian(model, x).shape == (5, 3, 4)


def test_dropout_train_mode_warns():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="dropout"):
        jacobian(model, torch.randn(2, 4))


def test_bad_inputs(relu_mlp):
    x = torch.randn(4, 12, dtype=torch.float64)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*\[2\]"):
        jacobian(relu_mlp, x)
    with pytest.raises(ValueError, match="batched on the first axis"):
        jacobian(relu_mlp, torch.randn(12, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        jacobian(relu_mlp, torch.ones(2, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="output must be one of"):
        jacobian(relu_mlp, x.nan_to_num(), output="probs")
    with pytest.raises(ValueError, match="strategy must be one of"):
        jacobian(relu_mlp, x.nan_to_num(), strategy="fast")
    scalar = nn.Sequential(nn.Linear(12, 1), nn.Flatten(0)).double()
    with pytest.raises(ValueError, match=r"shaped \(n, C\)"):
        jacobian(scalar, x.nan_to_num())


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    chunk=st.one_of(st.none(), st.integers(1, 10)),
    shape=st.sampled_from([(12,), (2, 6), (3, 2, 2)]),
    strategy=st.sampled_from(["vjp", "vmap", "forward"]),
)
def test_shapes_and_chunking(n, chunk, shape, strategy):
    model = make(TinyMLP())
    x = torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    j = jacobian(model, x, strategy=strategy, chunk_size=chunk)
    assert j.shape == (n, 4, *shape) and not j.requires_grad
    torch.testing.assert_close(j, jacobian(model, x, strategy="vjp"))


def test_dtype_preserved_float32():
    model = TinyMLP().eval()
    x = torch.randn(3, 12)
    assert jacobian(model, x).dtype == torch.float32


def test_auto_rule():
    wide = nn.Linear(2, 10)
    assert select_strategy(wide, torch.randn(1, 2)) == "forward"
    assert select_strategy(TinyMLP(), torch.randn(1, 12)) == "vjp"


# ------------------------------------------------------------------ Gram matrix (seed 000)


@pytest.fixture
def gram_setup(cnn):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 1, 6, 6, dtype=torch.float64, generator=g)
    flat = jacobian(cnn, x, output="softmax").reshape(11, -1)
    return cnn, x, flat


def test_gram_brute_force(gram_setup):
    model, x, flat = gram_setup
    m = jacobian_gram(model, x, batch_size=4)
    torch.testing.assert_close(m, flat @ flat.T)
    cos = jacobian_gram(model, x, batch_size=3, normalize=True)
    unit = flat / flat.norm(dim=1, keepdim=True)
    torch.testing.assert_close(cos, unit @ unit.T)


def test_gram_low_memory_and_memmap(gram_setup, tmp_path):
    model, x, flat = gram_setup
    dense = jacobian_gram(model, x, batch_size=4, output="log_softmax")
    low = jacobian_gram(
        model, x, batch_size=4, output="log_softmax", low_memory=True, cache_dir=tmp_path
    )
    torch.testing.assert_close(low, dense)
    assert list(tmp_path.iterdir()) == []  # scratch file removed
    path = tmp_path / "m.npy"
    mm = jacobian_gram(model, x, batch_size=5, output="log_softmax", out=path, low_memory=True)
    torch.testing.assert_close(mm, dense)
    np.testing.assert_allclose(np.load(path), dense.numpy())
    with pytest.raises(ValueError, match=".npy"):
        jacobian_gram(model, x, out=tmp_path / "m.bin")


def test_gram_analysis():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    y = nn.functional.one_hot(labels).double()
    m = y @ y.T + 0.1
    cc = class_correlation(m, labels)
    assert cc.within == pytest.approx(1.1) and cc.between == pytest.approx(0.1)
    torch.testing.assert_close(cc.block_means, torch.eye(3, dtype=torch.float64) + 0.1)
    assert kernel_target_alignment(y @ y.T, labels) == pytest.approx(1.0)
    assert kernel_target_alignment(torch.eye(7, dtype=torch.float64), labels, centered=False) < 1
    ev = gram_spectrum(m)
    torch.testing.assert_close(ev, torch.linalg.eigvalsh(m).flip(0))
    pts = torch.randn(7, 3, dtype=torch.float64)
    nb = jacobian_neighbors(pts @ pts.T, k=2, labels=labels)
    d = torch.cdist(pts, pts)
    d.fill_diagonal_(float("inf"))
    ref_d, ref_i = d.topk(2, largest=False)
    assert torch.equal(nb.indices, ref_i)
    torch.testing.assert_close(nb.distances, ref_d)
    assert 0 <= nb.label_agreement <= 1
    single = class_correlation(m[:6, :6], labels[:6])  # one-sample class: no within pairs
    assert torch.isnan(single.block_means[2, 2])


# ------------------------------------------- jacobian_gram's max_memory: the whole call's budget




@pytest.fixture(scope="module")
def gram_budget():
    model = make(TinyCNN())
    x = torch.randn(23, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    return model, x, jacobian_gram(model, x, batch_size=23, block_size=23)


def test_gram_sizes_shrink_with_the_budget_and_the_result_does_not_change(gram_budget):
    model, x, ref = gram_budget
    plans = [jacobian_gram_plan(model, x, max_memory=b) for b in (2**30, 2e5, 1e5, 5e4, 2e4)]
    assert (plans[0].batch_size, plans[0].block_size, plans[0].low_memory) == (23, 23, False)
    for big, small in zip(plans, plans[1:], strict=False):
        assert small.batch_size <= big.batch_size and small.block_size <= big.block_size
    assert plans[-1].block_size < 23 and plans[-1].batch_size < 23 and plans[-1].low_memory
    for plan in plans:
        assert plan.peak <= plan.budget and plan.held <= plan.peak
        got = jacobian_gram(model, x, max_memory=plan.budget)
        # the sizes the budget gave: bit for bit what they give when passed
        assert torch.equal(got, jacobian_gram(model, x, batch_size=plan.batch_size,
                                              block_size=plan.block_size))
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_gram_given_sizes_are_used_as_given_and_give_the_same_bits(gram_budget, tmp_path):
    model, x, _ = gram_budget
    plan = jacobian_gram_plan(model, x, batch_size=4, block_size=5, max_memory=5e4)
    assert (plan.batch_size, plan.block_size) == (4, 5)
    loose = jacobian_gram(model, x, batch_size=4, block_size=5, max_memory=2**30)
    tight = jacobian_gram(model, x, batch_size=4, block_size=5, max_memory=5e4,
                          cache_dir=tmp_path)
    assert torch.equal(loose, tight)


def test_gram_peak_stays_within_max_memory(gram_budget):
    model, x, _ = gram_budget
    for budget in (2e5, 1e5, 3e4):  # the CPU allocator's own count, M and 𝒥 included
        assert allocator_peak(lambda b=budget: jacobian_gram(model, x, max_memory=b)) <= budget


def test_gram_budget_too_small_is_refused_before_any_forward_pass(gram_budget, tmp_path):
    _, x, _ = gram_budget
    model = Counting(make(TinyCNN()))
    with pytest.raises(MemoryBudgetError, match=r"jacobian_gram needs ~.* for one sample of "
                                                r"\(1, 6, 6\).*max_memory is 1 KiB") as err:
        jacobian_gram(model, x, max_memory=1024)
    assert isinstance(err.value, ValueError) and "raise max_memory" in str(err.value)
    m_bytes = 23 * 23 * 8  # M alone takes more than the budget: out= is the way out
    with pytest.raises(MemoryBudgetError, match=r"for M \(23 × 23\) in memory.*pass out="):
        jacobian_gram(model, x, max_memory=m_bytes)
    with pytest.raises(MemoryBudgetError, match=r"for 𝒥 \(23 × 180\) in memory.*low_memory=True"):
        jacobian_gram(model, x, low_memory=False, max_memory=2e4)
    with pytest.raises(MemoryBudgetError, match="needs"):
        jacobian_gram(model, x, out=tmp_path / "m.npy", max_memory=1024)
    assert not (tmp_path / "m.npy").exists() and model.calls == 0


@pytest.mark.parametrize("bad", [0, -1, -0.5, float("nan"), float("inf"), True, "1GB"])
def test_gram_bad_budgets_are_refused(gram_budget, bad):
    model, x, _ = gram_budget
    with pytest.raises(ValueError, match="max_memory"):
        jacobian_gram(model, x, max_memory=bad)


def test_gram_resumed_with_another_budget_keeps_the_recorded_sizes(gram_budget, tmp_path):
    model, x, ref = gram_budget
    out = tmp_path / "m.npy"
    first = jacobian_gram(model, x, out=out, max_memory=3e4).clone()
    recorded = jacobian_gram_plan(model, x, out=out, max_memory=2**30)
    assert recorded.block_size < 23  # the record's, not the 23 a larger budget alone gives
    assert jacobian_gram_plan(model, x, max_memory=2**30).block_size == 23
    again = jacobian_gram(model, x, out=out, max_memory=2**30)  # not refused as "other settings"
    assert torch.equal(again, first)
    torch.testing.assert_close(first, ref, rtol=1e-12, atol=1e-14)
