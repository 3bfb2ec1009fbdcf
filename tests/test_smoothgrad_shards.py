"""SmoothGrad over shards: sample i of x is seeded by (seed, ``index_offset`` + i), so a shard
``x[a:b]`` explained with ``index_offset=a`` gets rows a:b of the whole dataset's
attributions (what the processes of a ``torch.distributed`` run rely on; the two-process run
of ``manifold fraction`` is in ``tests/test_distributed.py``), and a bad ``index_offset`` is
refused before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import manifoldlens as ml
from manifoldlens.attribution import explain, method_options, smoothgrad

from helpers import Counting, TinyCNN, make

OPTS = {"samples": 6, "seed": 11, "noise_level": 0.1}


@pytest.fixture(scope="module")
def setup():
    model = make(TinyCNN(c=5))
    x = torch.rand(9, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return model, x, smoothgrad(model, x, **OPTS)


@pytest.mark.parametrize("a,b", [(0, 4), (4, 9), (3, 7), (8, 9)])
def test_a_shard_with_its_offset_gets_the_rows_of_the_whole(setup, a, b):
    model, x, whole = setup
    part = smoothgrad(model, x[a:b], index_offset=a, **OPTS)
    torch.testing.assert_close(part, whole[a:b], rtol=0, atol=1e-12)
    # through explain, in other chunks, too
    again = explain(model, x[a:b], "smoothgrad", batch_size=1, index_offset=a,
                    samples_batch_size=4, **OPTS)
    torch.testing.assert_close(again, whole[a:b], rtol=0, atol=1e-12)


def test_shards_put_together_are_the_whole(setup):
    model, x, whole = setup
    parts = [smoothgrad(model, x[sl], index_offset=sl.start, **OPTS)
             for sl in (slice(0, 2), slice(2, 5), slice(5, 9))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-12)


def test_without_the_offset_a_shard_draws_other_noise(setup):
    model, x, whole = setup
    assert not torch.allclose(smoothgrad(model, x[4:9], **OPTS), whole[4:9])
    assert method_options("smoothgrad")["index_offset"] == 0




@pytest.mark.parametrize("bad", [-1, 1.5, 2.0, True, False, None, "3", np.float64(1.0)])
def test_a_bad_offset_is_refused_before_any_work(bad):
    model = Counting(make(TinyCNN(c=5)))
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    for call in (lambda: smoothgrad(model, x, index_offset=bad, seed=0),
                 lambda: explain(model, x, "smoothgrad", index_offset=bad),
                 lambda: ml.TangentFraction(method="smoothgrad", index_offset=bad)):
        with pytest.raises(ValueError, match="index_offset must be a non-negative int"):
            call()
    assert model.calls == 0


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=2**70))
def test_any_non_negative_int_offset_is_taken(offset):
    model = make(torch.nn.Linear(3, 2))
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = smoothgrad(model, x, 1, samples=2, seed=0, index_offset=np.int64(min(offset, 2**62))
                     if offset % 2 else offset)
    torch.testing.assert_close(got, model.weight[1].detach().expand(2, 3))  # linear: exact
