"""GPU: the fused gate GEMM → TwELL kernels (wgmma on Hopper, portable mma.sync) against their oracle,
cuBLAS + the pack kernel.

Inputs are small integers, so every product and partial sum is exact in fp32 whatever the order of
accumulation: the GEMM is exact in both kernels and the one rounding to the input dtype is the same,
so the fused TwELL must equal the oracle's bitwise (counts, slots, values, routes, neuron counts).
"""

from __future__ import annotations

import numpy as np
import pytest

import twell
from twell.format import TILE_WIDTHS, twell_layout

pytestmark = pytest.mark.gpu

FUSED_DTYPES = ["bfloat16", "float16"]


def gate_gemm_clusters():
    from twell.kernels import gate_gemm
    return gate_gemm.WGMMA_CLUSTERS


def _kernels(cp):
    """(kernel, cluster) variants this device runs."""
    ks = [("mma", 1)]
    if cp.cuda.Device().compute_capability == "90":
        ks = [("wgmma", c) for c in gate_gemm_clusters()] + ks
    return ks


def integer_gate_problem(cp, m, d, n, dtype, active_rate=0.01, seed=0):
    """x, w_gate with entries in {-2..2}; x[:, 0] = 1 and w[:, 0] = -bias so ~active_rate of z is > 0.
    Row 0 is dense (bias flipped), row 1 is empty (only the bias term), when m allows."""
    from scipy.stats import norm
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(m, d)).astype(np.float32)
    w = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    sigma = 2.0 * np.sqrt(max(d - 1, 1))
    bias = float(min(round(norm.isf(active_rate) * sigma), 250)) if d > 1 else 0.0
    x[:, 0] = 1.0
    w[:, 0] = -bias
    if m >= 2 and d > 1:
        x[0, 0] = -1.0           # z = +bias + ...: most columns active, tiles overflow
        x[1, 1:] = 0.0           # z = -bias everywhere: an empty row
    dt = cp.dtype(dtype) if dtype != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)
    return cp.asarray(x.astype(dt)), cp.asarray(w.astype(dt))


def _oracle(cp, x, w, tile_width, compression, threshold):
    from twell.kernels import pack
    z = cp.matmul(x, w.T)
    return pack.pack_twell_async(z, tile_width, compression, threshold, relu=True, neuron_counts=True)


def _fused(x, w, tile_width, compression, threshold, variant):
    from twell.kernels import gate_gemm
    kernel, cluster = variant
    return gate_gemm.gate_twell_async(x, w, tile_width, compression, threshold, kernel=kernel, cluster=cluster,
                                      neuron_counts=True)


def _assert_same(cp, a, b):
    for name in ("counts", "indices", "row_nnz", "row_route", "totals", "neuron_counts"):
        np.testing.assert_array_equal(cp.asnumpy(getattr(a, name)), cp.asnumpy(getattr(b, name)), err_msg=name)
    va, vb = cp.asnumpy(a.values.view(cp.uint16)), cp.asnumpy(b.values.view(cp.uint16))
    np.testing.assert_array_equal(va, vb, err_msg="values (bits)")


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("m,d,n", [(1, 8, 33), (130, 72, 300), (300, 200, 1000), (517, 2048, 5632),
                                   (129, 64, 256), (2100, 1024, 777)])
def test_fused_gate_twell_equals_cublas_pack(cp, dtype, m, d, n):
    x, w = integer_gate_problem(cp, m, d, n, dtype, seed=m + d + n)
    for kernel in _kernels(cp):
        for tile_width in TILE_WIDTHS:
            threshold = 40
            ref = _oracle(cp, x, w, tile_width, 8, threshold)
            got = _fused(x, w, tile_width, 8, threshold, kernel)
            _assert_same(cp, got, ref)


@pytest.mark.parametrize("compression", [1, 4, 16])
def test_fused_gate_twell_other_compressions(cp, compression):
    x, w = integer_gate_problem(cp, 700, 256, 1300, "bfloat16", active_rate=0.03, seed=compression)
    for kernel in _kernels(cp):
        for tile_width in (32, 64, 256):             # S = 2 with T = 32: rows' slot blocks off any alignment
            if tile_width % compression:
                continue
            ref = _oracle(cp, x, w, tile_width, compression, 100)
            got = _fused(x, w, tile_width, compression, 100, kernel)
            _assert_same(cp, got, ref)


def test_fused_gate_twell_writes_every_slot(cp):
    """Poison the output buffers through the allocator: every count and slot must be overwritten."""
    from twell.kernels import gate_gemm
    x, w = integer_gate_problem(cp, 333, 128, 700, "bfloat16", seed=3)
    n_tiles, slots = twell_layout(700, 64, 8)
    for kernel in _kernels(cp):
        pool = cp.cuda.MemoryPool()
        with cp.cuda.using_allocator(pool.malloc):
            junk = cp.full(4 << 20, 0xA5, dtype=cp.uint8)       # fill the pool's blocks with a pattern
            del junk
            got = gate_gemm.gate_twell_async(x, w, 64, 8, 50, kernel=kernel[0], cluster=kernel[1],
                                             neuron_counts=True)
        ref = _oracle(cp, x, w, 64, 8, 50)
        _assert_same(cp, got, ref)


def test_fused_gate_twell_bitwise_deterministic(cp):
    x, w = integer_gate_problem(cp, 1000, 512, 2000, "bfloat16", seed=5)
    rng = np.random.default_rng(0)
    # non-integer inputs: accumulation order matters, so this checks that it never changes
    xf = cp.asarray((rng.standard_normal(x.shape)).astype(np.float32)).astype(x.dtype)
    for kernel in _kernels(cp):
        first = _fused(xf, w, 256, 8, 128, kernel)
        for _ in range(9):
            _assert_same(cp, _fused(xf, w, 256, 8, 128, kernel), first)


@pytest.mark.parametrize("gate_kernel", ["auto", "fused", "wgmma", "mma", "cublas"])
def test_gated_ffn_each_gate_kernel_same_result(cp, gate_kernel):
    """With exact integer gates every gate kernel gives the same TwELL, hence bitwise the same y."""
    if gate_kernel == "wgmma" and cp.cuda.Device().compute_capability != "90":
        pytest.skip("needs Hopper")
    x, wg = integer_gate_problem(cp, 1500, 256, 1000, "bfloat16", active_rate=0.02, seed=11)
    rng = np.random.default_rng(1)
    wu = cp.asarray((rng.standard_normal((1000, 256)) / 16).astype(np.float32)).astype(x.dtype)
    wd = cp.asarray((rng.standard_normal((1000, 256)) / 16).astype(np.float32)).astype(x.dtype)
    y_ref = twell.gated_ffn(x, wg, wu, wd, gate_kernel="cublas")
    y, stats = twell.gated_ffn(x, wg, wu, wd, gate_kernel=gate_kernel, return_stats=True)
    fused = "wgmma" if cp.cuda.Device().compute_capability == "90" else "mma"
    expected = {"auto": "wgmma" if fused == "wgmma" else "cublas", "fused": fused}.get(gate_kernel, gate_kernel)
    assert stats.gate_kernel == expected
    assert stats.n_backup_rows >= 1                              # row 0 is dense: the backup path ran
    np.testing.assert_array_equal(cp.asnumpy(y.view(cp.uint16)), cp.asnumpy(y_ref.view(cp.uint16)))


def test_fused_gate_kernel_refuses_what_it_cannot_run(cp):
    x = cp.ones((100, 12), dtype=cp.float16)                    # d % 8 != 0
    w = cp.ones((50, 12), dtype=cp.float16)
    with pytest.raises(ValueError, match="multiple of 8"):
        twell.gated_ffn(x, w, w, w, gate_kernel="mma")
    y, stats = twell.gated_ffn(x, w, w, w, gate_kernel="fused", return_stats=True)
    assert stats.gate_kernel == "cublas"
    x32 = cp.ones((100, 16), dtype=cp.float32)
    w32 = cp.ones((50, 16), dtype=cp.float32)
    with pytest.raises(ValueError, match="bfloat16 / float16"):
        twell.gated_ffn(x32, w32, w32, w32, gate_kernel="wgmma")


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("presized", [True, False])
def test_training_forward_with_fused_gate_equals_cublas_gate(cp, dtype, presized):
    """The training forward's gate pattern from the fused GEMM (TwELL -> CSR, recomputed dense rows for
    backup rows and for compact rows that overflow a TwELL tile) is bitwise the cuBLAS + pack one, and so
    are y, the saved values and every gradient (exact integer gates) -- with the compact entries presized
    (queued before the read-back) and sized first."""
    from twell.gpu import training
    m, d, n, threshold = 700, 256, 1000, 200
    x, wg = integer_gate_problem(cp, m, d, n, dtype, active_rate=0.1, seed=21)
    rng = np.random.default_rng(2)
    wu = cp.asarray((rng.standard_normal((n, d)) / 16).astype(np.float32)).astype(x.dtype)
    wd = cp.asarray((rng.standard_normal((n, d)) / 16).astype(np.float32)).astype(x.dtype)
    dy = cp.asarray(rng.standard_normal((m, d)).astype(np.float32)).astype(x.dtype)
    # the problem exercises all three gate row kinds: compact, compact but over a 32-slot tile, backup
    z = cp.asnumpy(cp.matmul(x, wg.T).astype(cp.float32))
    active = ~(z <= 0)
    nnz = active.sum(axis=1)
    tiles = np.add.reduceat(active, np.arange(0, n, 256), axis=1)
    assert (nnz > threshold).any() and ((tiles > 32).any(axis=1) & (nnz <= threshold)).any()
    fused = "wgmma" if cp.cuda.Device().compute_capability == "90" else "mma"
    out = {}
    for kernel in ("cublas", fused):
        y, saved, stats, _ = training.sparse_forward(
            x, wg, wu, wd, l1_weight=0.5, threshold=threshold, gate_kernel=kernel,
            presize_max_bytes=training.PRESIZE_MAX_BYTES if presized else 0)
        assert stats.gate_kernel == kernel
        g = saved.gate
        arrays = [y, g.row_ptr, g.col_indices, g.values, g.backup_slot, g.backup_rows, g.backup_values,
                  saved.up_values, stats.neuron_counts]
        arrays += list(twell.gated_ffn_backward(saved, dy))
        out[kernel] = [cp.asnumpy(a.view(cp.uint16) if a.dtype.itemsize == 2 else a) for a in arrays]
    for i, (a, b) in enumerate(zip(out["cublas"], out[fused])):
        np.testing.assert_array_equal(a, b, err_msg=f"array {i}")


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("batch", ["mixed", "dense_no_overflow", "dense_with_overflow"])
def test_backup_rows_gate_from_twell_equals_cublas_gate(cp, gated, batch):
    """After the fused gate, backup rows routed by the row threshold take their gate row from the TwELL and
    only rows whose tile overflowed recompute it: with exact integer gates y is bitwise the cuBLAS + pack
    path's, for a batch of compact, threshold-routed and overflowed rows and for all-backup batches with and
    without overflowed rows."""
    m, d, n, threshold = 700, 256, 1000, 100
    x, wg = integer_gate_problem(cp, m, d, n, "bfloat16", active_rate=0.1, seed=23)
    if batch == "dense_no_overflow":
        x, threshold = cp.ascontiguousarray(x[2:]), 0            # row 0 overflowed, row 1 was empty
    elif batch == "dense_with_overflow":
        x, threshold = cp.concatenate([x[:1], x[2:]]), 0
    rng = np.random.default_rng(3)
    wu = cp.asarray((rng.standard_normal((n, d)) / 16).astype(np.float32)).astype(x.dtype)
    wd = cp.asarray((rng.standard_normal((n, d)) / 16).astype(np.float32)).astype(x.dtype)
    fused = "wgmma" if cp.cuda.Device().compute_capability == "90" else "mma"
    out = {}
    for kernel in ("cublas", fused):
        args = (x, wg, wu, wd) if gated else (x, wg, wd)
        fn = twell.gated_ffn if gated else twell.ffn
        y, stats = fn(*args, compression=4, dense_row_threshold=threshold, gate_kernel=kernel, return_stats=True)
        out[kernel] = (cp.asnumpy(y.view(cp.uint16)), stats.n_backup_rows, stats.n_overflow_rows)
    _, n_backup, n_overflow = out[fused]
    if batch == "mixed":
        assert 0 < n_overflow < n_backup < x.shape[0]
    else:
        assert n_backup == x.shape[0] and (n_overflow > 0) == (batch == "dense_with_overflow")
    assert out[fused][1:] == out["cublas"][1:]
    np.testing.assert_array_equal(out[fused][0], out["cublas"][0])


def test_planned_wgmma_launch_fresh_outputs_and_streams(cp):
    """The Hopper gate launch is memoized per operand address and shape (driver launch with a prebuilt
    parameter buffer): each call must still write fresh output buffers, read the current operands' data,
    honour neuron_counts, and run on the current stream."""
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("needs Hopper")
    from twell.kernels import gate_gemm
    x, w = integer_gate_problem(cp, 900, 256, 1000, "bfloat16", active_rate=0.03, seed=31)
    x2, _ = integer_gate_problem(cp, 900, 256, 1000, "bfloat16", active_rate=0.03, seed=32)
    for cluster in (1, 2):
        first = gate_gemm.gate_twell_async(x, w, 256, 8, 60, cluster=cluster, neuron_counts=True)
        second = gate_gemm.gate_twell_async(x2, w, 256, 8, 60, cluster=cluster, neuron_counts=True)
        third = gate_gemm.gate_twell_async(x, w, 256, 8, 60, cluster=cluster, neuron_counts=True)  # plan reused
        assert first.values.data.ptr != third.values.data.ptr
        _assert_same(cp, first, _oracle(cp, x, w, 256, 8, 60))
        _assert_same(cp, second, _oracle(cp, x2, w, 256, 8, 60))
        _assert_same(cp, third, first)
        # in place change of x's data: the same plan must read the new values
        x_copy = x.copy()
        x[...] = x2
        fourth = gate_gemm.gate_twell_async(x, w, 256, 8, 60, cluster=cluster, neuron_counts=True)
        _assert_same(cp, fourth, second)
        x[...] = x_copy
        # on a non-default stream, ordered after work queued on it
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            xs = cp.empty_like(x)
            cp.cuda.runtime.memcpyAsync(xs.data.ptr, x2.data.ptr, x2.nbytes, cp.cuda.runtime.memcpyDeviceToDevice, s.ptr)
            on_s = gate_gemm.gate_twell_async(xs, w, 256, 8, 60, cluster=cluster, neuron_counts=True)
        s.synchronize()
        _assert_same(cp, on_s, second)
