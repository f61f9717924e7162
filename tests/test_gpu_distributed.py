"""Tensor parallelism over NCCL on the GPU: NCCL with one rank on one GPU, the sharded math on one GPU against
the unsharded op, and — when two GPUs are present — two ranks in one process (one thread per GPU)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import rel_error
from test_gpu_ffn import HALF_ULP, _np_dtype, dense_same_precision, make_ffn

import twell
from twell import distributed, reference

pytestmark = pytest.mark.gpu


def _nccl(cp):
    from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("NCCL not available")
    return nccl


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_world_of_one(cp, dtype):
    nccl = _nccl(cp)
    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    rng = np.random.default_rng(0)
    dev = [cp.asarray(a) for a in make_ffn(rng, 700, 256, 1000, dtype, mean_active=20)]
    y = distributed.tensor_parallel_gated_ffn(*dev, comm=comm)
    cp.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(y.get(), twell.gated_ffn(*dev).get())
    yt, saved, stats = distributed.tensor_parallel_gated_ffn_forward(*dev, comm=comm, l1_weight=0.1)
    dy = cp.ones_like(yt)
    grads = distributed.tensor_parallel_gated_ffn_backward(saved, dy, comm=comm)
    _, saved2, _ = twell.gated_ffn_forward(*dev, l1_weight=0.1)
    for a, b in zip(grads, twell.gated_ffn_backward(saved2, dy)):
        np.testing.assert_array_equal(a.get(), b.get())
    g = distributed.gather_stats(stats, comm, sharded_neurons=True)
    assert int(g.nnz) == int(stats.nnz) and float(g.l0) == pytest.approx(float(stats.l0))
    np.testing.assert_array_equal(g.neuron_counts.get(), stats.neuron_counts.get())


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sharded_math_on_one_gpu(cp, world, dtype):
    """The partial outputs of every shard, summed (as the all-reduce does), meet the unsharded op's error
    rule; dx sums and the weight gradients concatenate."""
    rng = np.random.default_rng(world)
    arrays = make_ffn(rng, 2048, 512, 1536, dtype, mean_active=29)
    dev = [cp.asarray(a) for a in arrays]
    y = cp.zeros((2048, 512), dtype=cp.float32)
    for rank in range(world):
        y += twell.gated_ffn(dev[0], *distributed.shard_weights(*dev[1:], rank, world)).astype(cp.float32)
    ref = reference.gated_ffn_dense(*[a.astype(np.float64) for a in arrays])
    dense = dense_same_precision(cp, *dev)
    assert rel_error(y.astype(dev[0].dtype), ref) <= 2 * rel_error(dense, ref) + 2 * HALF_ULP[dtype]


def test_two_gpus_two_ranks(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    nccl = _nccl(cp)
    comms = nccl.NcclCommunicator.initAll([0, 1])
    rng = np.random.default_rng(1)
    arrays = make_ffn(rng, 4096, 512, 2048, "bfloat16", mean_active=29)
    results, errors = {}, []

    def rank_main(rank):
        try:
            with cp.cuda.Device(rank):
                dev = [cp.asarray(a) for a in arrays]
                shards = distributed.shard_weights(*dev[1:], rank, 2)
                y = distributed.tensor_parallel_gated_ffn(dev[0], *shards, comm=comms[rank])
                cp.cuda.get_current_stream().synchronize()
                results[rank] = y.get()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    np.testing.assert_array_equal(results[0].view(np.uint16), results[1].view(np.uint16))
    ref = reference.gated_ffn_dense(*[a.astype(np.float64) for a in arrays])
    assert rel_error(results[0], ref) < 1e-2
    _ = _np_dtype
