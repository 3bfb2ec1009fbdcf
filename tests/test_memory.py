"""Memory budgets (``max_memory=``): the estimate of a routine's bytes holds against the CPU
allocator's own counts, chunk sizes follow the budget, results do not depend on it, a budget
too small for one sample is refused before any forward pass, and bad budgets are refused."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import manifoldlens as ml
from manifoldlens import memory
from manifoldlens.attribution import explain
from manifoldlens.information import top_k_jacobian, trace_estimate
from manifoldlens.jacobian import jacobian_chunk_size, score_jacobian, transform_jacobian
from manifoldlens.memory import MemoryBudgetError, MemoryMeter, allocator_peak
from manifoldlens.tangent import TangentSpace

from helpers import Counting, TinyCNN, TinyMLP, make

# ------------------------------------------------------------------------------- models


class Residual(nn.Module):
    """conv → BatchNorm (eval) → ReLU → conv, plus the skip connection, then a linear head."""

    def __init__(self, c: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.a, self.bn, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(
            8, 8, 3, padding=1)
        self.fc = nn.Linear(8, c)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.b(torch.relu(self.bn(self.a(h)))))
        return self.fc(h.mean((2, 3)))




def _models():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.Tanh(), nn.Linear(64, 10))
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 10))
    torch.manual_seed(0)
    return {"mlp": mlp.eval(), "cnn": cnn.eval(), "residual": Residual().eval()}



def _cost(model, kind, *settings):
    """The cost measured for ``model`` whose key starts with ``(kind, *settings)``."""
    n = 1 + len(settings)
    return next(v for k, v in memory.measured_costs(model).items() if k[:n] == (kind, *settings))


# ------------------------------------------------------------------------ the estimator


def test_the_meter_counts_a_storage_once_and_releases_it_with_its_last_view():
    with MemoryMeter() as meter:
        a = torch.empty(1000, device="meta")  # 4000 bytes
        v = a.view(10, 100).t()  # views: no new storage
        a.add_(1)  # in place: none either
        del a
        assert meter.live == 4000  # the view keeps it
        b = v * 2  # a new one
        assert meter.live == 8000
        del v, b
    assert (meter.live, meter.peak) == (0, 8000)


@pytest.mark.parametrize("strategy", ["vjp", "vmap", "forward"])
def test_the_estimate_is_within_a_small_factor_of_the_allocators_peak(strategy):
    """The chunk's estimate (SAFETY · (fixed + n · per_sample) plus the results) against the
    bytes the CPU allocator really held during the call, for three small models."""
    for name, model in _models().items():
        x = torch.randn(3, 3, 16, 16)
        step = jacobian_chunk_size(model, x, output="log_softmax", strategy=strategy,
                                   relative=True)
        assert step == 3
        cost = _cost(model, "jacobian", strategy)
        assert cost.exact  # measured on meta
        measured = allocator_peak(lambda m=model, x=x: ml.jacobian(m, x, strategy=strategy))
        if measured == 0:
            pytest.skip("this torch build's profiler does not report CPU allocations")
        ratio = cost.bytes(3) / measured
        assert 0.5 <= ratio <= 3, (name, strategy, cost, measured, ratio)


def test_chunk_sizes_shrink_with_the_budget():
    model = make(TinyCNN(c=5))
    x = torch.randn(64, 1, 6, 6, dtype=torch.float64)
    assert jacobian_chunk_size(model, x, max_memory=2**40) == 64
    one = _cost(model, "jacobian").bytes(1) + 64 * 5 * 36 * 8
    sizes = [jacobian_chunk_size(model, x, max_memory=one * f) for f in (64, 16, 4, 2, 1)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] > 8 and sizes[-1] == 1
    assert jacobian_chunk_size(model, x, max_memory=one, chunk_size=7) == 7  # explicit wins


def test_the_default_budget_is_half_the_available_memory():
    avail = memory.available_memory()
    assert avail > 0
    assert memory.resolve_max_memory(None) == pytest.approx(0.5 * avail, rel=0.2)
    assert memory.resolve_max_memory(3.5e9) == 3_500_000_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_default_budget_on_a_gpu_reads_its_free_memory():
    free, total = torch.cuda.mem_get_info()
    assert 0 < memory.available_memory("cuda") <= total
    model = make(TinyMLP()).cuda()
    x = torch.randn(8, 12, dtype=torch.float64, device="cuda")
    assert torch.equal(ml.jacobian(model, x, max_memory=1e6).cpu(),
                       ml.jacobian(model.cpu(), x.cpu()))


def test_a_model_that_cannot_run_on_meta_is_measured_on_real_samples():
    class Branchy(nn.Module):  # data-dependent control flow: impossible on meta
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 4)

        def forward(self, x):
            if float(x.detach().abs().max()) > 1e9:  # a value test: no meta run can do it
                raise ValueError("inputs out of range")
            return self.lin(x)

    model = make(Branchy())
    x = torch.randn(6, 12, dtype=torch.float64)
    kw = {"output": "log_softmax", "relative": True}
    assert jacobian_chunk_size(model, x, max_memory=2**30, **kw) == 6
    cost = _cost(model, "jacobian", "vjp", "logits", True, "log_softmax")
    assert not cost.exact
    ref = ml.jacobian(model, x)
    got = ml.jacobian(model, x, max_memory=cost.bytes(1) + 6 * 4 * 12 * 8)  # chunks of 1
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------- results do not change
# A budget only chooses the chunk size: the result is bit for bit the one of that explicit
# chunk_size, and when everything fits (the default here) the one of a single chunk, as
# before budgets existed. Other chunk sizes agree to rounding: batched BLAS and convolution
# kernels may sum in another order for another batch size.

CLOSE = {"rtol": 1e-10, "atol": 1e-12}


def _budgets(model, x, **kw):
    """Budgets that give chunks of 1, about half and all of x's samples (None: the default)."""
    jacobian_chunk_size(model, x, **kw)
    if kw.get("top_k"):
        cost = _cost(model, "top_k", "logits", max(kw["top_k"], 2))
    else:
        cost = _cost(model, "jacobian", kw.get("strategy", "vjp"), "logits",
                     kw.get("relative", False), kw.get("output", "logits"))
    out = model(x[:1]).shape[1] * x[0].numel() * x.element_size() * len(x)
    return [math.ceil(cost.bytes(m) + out) for m in (1, len(x) // 2)] + [None]


@pytest.mark.parametrize("output", ["logits", "log_softmax", "softmax"])
@pytest.mark.parametrize("strategy", ["vjp", "vmap", "forward"])
def test_jacobians_for_any_budget(output, strategy):
    model = make(TinyCNN(c=5))
    x = torch.randn(7, 1, 6, 6, dtype=torch.float64)
    ref = ml.jacobian(model, x, output=output, strategy=strategy)
    raw = score_jacobian(model, x, strategy=strategy, relative=output != "logits")
    assert torch.equal(ref, transform_jacobian(*raw, output))  # as before budgets existed
    kw = {"output": output, "strategy": strategy, "relative": output != "logits"}
    steps = []
    for budget in _budgets(model, x, **kw):
        steps.append(jacobian_chunk_size(model, x, max_memory=budget, **kw))
        got = ml.jacobian(model, x, output=output, strategy=strategy, max_memory=budget)
        assert torch.equal(got, ml.jacobian(model, x, output=output, strategy=strategy,
                                            chunk_size=steps[-1]))
        torch.testing.assert_close(got, ref, **CLOSE)
    assert steps[0] == 1 and 1 < steps[1] < 7 and steps[-1] == 7
    assert torch.equal(got, ref)  # all in one chunk: the very same computation


def test_g_top_k_trace_and_tangent_spaces_for_any_budget():
    model = make(TinyMLP(d=12, c=6))
    x = torch.randn(9, 12, dtype=torch.float64)
    G = ml.local_data_matrix(model, x)
    Gk = ml.local_data_matrix(model, x, top_k=3)
    tr = trace_estimate(model, x, top_k=2, samples=4)
    T = TangentSpace.from_model(model, x)
    for budget in _budgets(model, x, output="log_softmax", relative=True)[:2]:
        got = ml.local_data_matrix(model, x, max_memory=budget)
        step = jacobian_chunk_size(model, x, output="log_softmax", relative=True,
                                   max_memory=budget)
        assert step < 9
        assert torch.equal(got.jac_logp,
                           ml.local_data_matrix(model, x, chunk_size=step).jac_logp)
        torch.testing.assert_close(got.jac_logp, G.jac_logp, **CLOSE)
        torch.testing.assert_close(got.eigenvalues, G.eigenvalues, **CLOSE)
        basis = TangentSpace.from_model(model, x, max_memory=budget).basis
        torch.testing.assert_close(basis, T.basis, **CLOSE)
    for budget in _budgets(model, x, output="log_softmax", relative=True, strategy="vjp",
                           top_k=3)[:2]:
        jac, classes, _ = top_k_jacobian(model, x, 3, max_memory=budget)
        step = jacobian_chunk_size(model, x, output="log_softmax", relative=True,
                                   strategy="vjp", top_k=3, max_memory=budget)
        assert step < 9
        assert torch.equal(jac, top_k_jacobian(model, x, 3, chunk_size=step)[0])
        torch.testing.assert_close(jac.reshape(Gk.jac_logp.shape), Gk.jac_logp, **CLOSE)
        assert torch.equal(classes, Gk.classes)
        est = trace_estimate(model, x, top_k=2, samples=4, max_memory=budget)
        torch.testing.assert_close(est.estimate, tr.estimate, **CLOSE)


def test_decoder_tangent_spaces_for_any_budget():
    torch.manual_seed(1)
    dec = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 40)).double().eval()
    z = torch.randn(8, 3, dtype=torch.float64)
    ref = TangentSpace.from_decoder(dec, z)
    cost = _cost(dec, "decoder")
    for m in (1, 3):
        got = TangentSpace.from_decoder(dec, z, max_memory=cost.bytes(m))
        assert torch.equal(got.basis, TangentSpace.from_decoder(dec, z, chunk_size=m).basis)
        torch.testing.assert_close(got.basis, ref.basis, **CLOSE)


def test_paths_for_any_budget():
    model = make(TinyMLP(d=12, c=4))
    src, tgt = torch.randn(2, 6, 12, dtype=torch.float64)
    ref = ml.horizontal_path(model, src, tgt, step_size=0.05, max_steps=5, tol=1e-3)
    cost = _cost(model, "jacobian", "vjp", "logits", True, "log_softmax")
    small = cost.bytes(1) + 6 * 4 * 12 * 8  # one point per chunk
    res = ml.horizontal_path(model, src, tgt, step_size=0.05, max_steps=5, tol=1e-3,
                             max_memory=small)
    torch.testing.assert_close(res.points, ref.points, **CLOSE)
    assert res.status == ref.status
    across = ml.leaf_crossing_path(model, src, steps=3, max_memory=small)
    torch.testing.assert_close(across.points, ml.leaf_crossing_path(model, src, steps=3).points,
                               **CLOSE)
    assert torch.equal(ml.horizontal_path(model, src, tgt, step_size=0.05, max_steps=5,
                                          tol=1e-3, max_memory=2**40).points, ref.points)


def test_attributions_for_any_budget():
    model = make(TinyCNN(c=5))
    x = torch.rand(6, 1, 6, 6, dtype=torch.float64)
    for method, opts in [("gradient", {}), ("input_x_gradient", {}),
                         ("integrated_gradients", {"steps": 8}),
                         ("smoothgrad", {"samples": 5, "seed": 0})]:
        ref = explain(model, x, method, **opts)
        one = _cost(model, "gradient")
        for inputs in (1, 3, 7):  # inputs per forward pass: splits the steps / noisy copies
            budget = one.bytes(inputs) + 8 * inputs * 36 * 8 + 6 * 36 * 8
            got = explain(model, x, method, max_memory=budget, **opts)
            torch.testing.assert_close(got, ref, **CLOSE)
        assert torch.equal(explain(model, x, method, max_memory=2**40, **opts), ref)


# ------------------------------------------------------------- refusals before any work

ROUTINES = {
    "jacobian vjp": lambda m, x, b: ml.jacobian(m, x, strategy="vjp", max_memory=b),
    "jacobian vmap": lambda m, x, b: ml.jacobian(m, x, strategy="vmap", max_memory=b),
    "jacobian forward": lambda m, x, b: ml.jacobian(m, x, strategy="forward", max_memory=b),
    "jacobian chunk_size=1": lambda m, x, b: ml.jacobian(m, x, chunk_size=1, max_memory=b),
    "score_jacobian": lambda m, x, b: score_jacobian(m, x, max_memory=b),
    "G": lambda m, x, b: ml.local_data_matrix(m, x, max_memory=b),
    "G top_k": lambda m, x, b: ml.local_data_matrix(m, x, top_k=2, max_memory=b),
    "trace_estimate": lambda m, x, b: trace_estimate(m, x, top_k=2, max_memory=b),
    "horizontal_path": lambda m, x, b: ml.horizontal_path(m, x, x.flip(0), max_steps=2,
                                                          max_memory=b),
    "leaf_crossing_path": lambda m, x, b: ml.leaf_crossing_path(m, x, steps=2, max_memory=b),
    "from_model": lambda m, x, b: TangentSpace.from_model(m, x, max_memory=b),
    "gradient": lambda m, x, b: explain(m, x, "gradient", max_memory=b),
    "integrated_gradients": lambda m, x, b: explain(m, x, "integrated_gradients",
                                                    max_memory=b),
    "smoothgrad": lambda m, x, b: explain(m, x, "smoothgrad", max_memory=b),
    "TangentFraction": lambda m, x, b: ml.TangentFraction(max_memory=b, tangent_fn=lambda *a: 0
                                                          )(m, x),
}


@pytest.mark.parametrize("name", sorted(ROUTINES))
def test_a_budget_too_small_for_one_sample_is_refused_before_any_forward_pass(name):
    model = Counting(make(TinyCNN(c=5)))
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(MemoryBudgetError, match=r"needs ~.* for one sample of \(1, 6, 6\).*"
                                                r"max_memory is 1 KiB") as err:
        ROUTINES[name](model, x, 1024)
    assert isinstance(err.value, ValueError) and isinstance(err.value, MemoryError)
    assert model.calls == 0


def test_the_refusal_names_the_strategy_and_the_way_out():
    model = Counting(make(TinyCNN(c=5)))
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="strategy 'forward' needs") as err:
        ml.jacobian(model, x, strategy="forward", max_memory=2048)
    assert "use strategy='vjp' or raise max_memory" in str(err.value)
    need = _cost(model, "jacobian", "forward").bytes(1)
    assert memory.format_bytes(need) in str(err.value)
    with pytest.raises(ValueError, match="decoder"):
        TangentSpace.from_decoder(nn.Linear(2, 30).double(), torch.randn(3, 2).double(),
                                  max_memory=8)
    assert model.calls == 0


@pytest.mark.parametrize("bad", [0, -1, -0.5, float("nan"), float("inf"), True, "1GB"])
@pytest.mark.parametrize("name", sorted(ROUTINES))
def test_bad_budgets_are_refused_before_any_work(name, bad):
    model = Counting(make(TinyCNN(c=5)))
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_memory"):
        ROUTINES[name](model, x, bad)
    assert model.calls == 0


def test_bad_budgets_are_refused_by_the_decoder_and_the_planner():
    for bad in (0, float("nan"), False):
        with pytest.raises(ValueError, match="max_memory"):
            TangentSpace.from_decoder(nn.Linear(2, 5), torch.randn(3, 2), max_memory=bad)
        with pytest.raises(ValueError, match="max_memory"):
            jacobian_chunk_size(nn.Linear(2, 5), torch.randn(3, 2), max_memory=bad)
