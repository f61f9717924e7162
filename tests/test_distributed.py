"""Neuron sharding of the gated FFN: the shard partition (CPU) and the sharded math against the unsharded op
on the NumPy reference (the GPU version, with NCCL, is tests/test_gpu_distributed.py)."""

from __future__ import annotations

import numpy as np
import pytest

import twell
from twell import distributed, reference


@pytest.mark.parametrize("n, world", [(1, 1), (5632, 2), (5632, 3), (7, 4), (100, 7)])
def test_shards_partition_the_rows(n, world):
    covered = []
    for rank in range(world):
        s = distributed.shard(n, rank, world)
        covered.extend(range(n)[s])
        assert s.stop - s.start in (n // world, n // world + 1)
    assert covered == list(range(n))


def test_shard_arguments():
    with pytest.raises(ValueError, match="rank must be < world"):
        distributed.shard(10, 2, 2)
    with pytest.raises(TypeError, match="world must be an integer"):
        distributed.shard(10, 0, 1.5)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_sums_equal_the_unsharded_op_on_the_reference(world):
    """Σ_r gated_ffn(x, shard_r) = gated_ffn(x, W) and the backward's dx sums / dW concatenates (float64:
    equal to rounding)."""
    rng = np.random.default_rng(world)
    m, d, n = 37, 24, 70
    x = rng.standard_normal((m, d))
    x[:, 0] = 1.0
    wg, wu, wd = (rng.standard_normal((n, d)) / np.sqrt(d) for _ in range(3))
    wg[:, 0] = -1.0
    dy = rng.standard_normal((m, d))
    y_full = twell.gated_ffn(x, wg, wu, wd)
    _, saved, _ = twell.gated_ffn_forward(x, wg, wu, wd, l1_weight=0.3)
    full_grads = twell.gated_ffn_backward(saved, dy)
    y = np.zeros_like(y_full)
    dx = np.zeros_like(x)
    dws = [[], [], []]
    for rank in range(world):
        shards = distributed.shard_weights(wg, wu, wd, rank, world)
        y += twell.gated_ffn(x, *shards)
        _, saved_r, _ = twell.gated_ffn_forward(x, *shards, l1_weight=0.3)
        g = twell.gated_ffn_backward(saved_r, dy)
        dx += g[0]
        for lst, a in zip(dws, g[1:]):
            lst.append(a)
    np.testing.assert_allclose(y, y_full, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, full_grads[0], rtol=1e-12, atol=1e-12)
    for lst, want in zip(dws, full_grads[1:]):
        np.testing.assert_allclose(np.concatenate(lst), want, rtol=1e-12, atol=1e-12)
    assert np.allclose(y_full, reference.gated_ffn_dense(x, wg, wu, wd))
