"""GPU paths and hardening: the dense path and the density tracker, CUDA-graph capture, misaligned views,
the NaN / Inf rule on every path, validation of user containers, devices, threads, retry after an error,
and a hypothesis fuzz of inference and training against the float64 reference."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from conftest import rel_error
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gpu_ffn import DTYPES, HALF_ULP, _check, _np_dtype, dense_same_precision, make_ffn, nan_inf_past_capacity
from test_gpu_ffn import observed_tracker as _observed
from test_gpu_train import check_train

import twell
from twell import reference

pytestmark = pytest.mark.gpu


def _bits(a):
    a = a.get() if hasattr(a, "get") else a
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a.view(np.uint32)


# --------------------------------------------------------------------------- dense path and tracker


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 700])
@pytest.mark.parametrize("gated", [True, False])
def test_dense_path_exact_with_statistics(cp, dtype, m, gated):
    rng = np.random.default_rng(m)
    arrays = make_ffn(rng, m, 256, 900, dtype, mean_active=300)
    dev = [cp.asarray(a) for a in arrays]
    out = cp.full((m, 256), np.nan, dtype=dev[0].dtype)
    if gated:
        y, stats = twell.gated_ffn(*dev, path="dense", return_stats=True, out=out)
        _check(cp, y, arrays, dtype)
        _, ref_stats = reference.gated_ffn(*arrays, return_stats=True)
    else:
        y, stats = twell.ffn(dev[0], dev[1], dev[3], path="dense", return_stats=True, out=out)
        ref = reference.ffn_dense(*[a.astype(np.float64) for a in (arrays[0], arrays[1], arrays[3])])
        assert rel_error(y, ref) < 4 * HALF_ULP[dtype] + 1e-6
        _, ref_stats = reference.ffn(arrays[0], arrays[1], arrays[3], return_stats=True)
    assert stats.path == "dense" and stats.n_backup_rows == m
    assert int(stats.nnz) == pytest.approx(int(ref_stats.nnz), rel=0.02, abs=3)
    counts = stats.neuron_counts.get()
    assert counts.sum() == int(stats.nnz)
    np.testing.assert_allclose(counts, ref_stats.neuron_counts, atol=max(3, 0.02 * m))
    for _ in range(3):                                          # bitwise repeatable
        again = twell.gated_ffn(*dev, path="dense") if gated else twell.ffn(dev[0], dev[1], dev[3], path="dense")
        np.testing.assert_array_equal(_bits(again), _bits(y))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_training_path_exact(cp, dtype):
    rng = np.random.default_rng(3)
    m, d, n = 300, 128, 700
    arrays = make_ffn(rng, m, d, n, dtype, mean_active=200)
    dy = rng.standard_normal((m, d)).astype(_np_dtype(dtype))
    dev = [cp.asarray(a) for a in arrays]
    y, saved, stats = twell.gated_ffn_forward(*dev, l1_weight=0.3, path="dense")
    assert stats.path == "dense" and stats.n_backup_rows == m and saved.gate.nnz == 0
    grads = twell.gated_ffn_backward(saved, cp.asarray(dy))
    # against the float64 reference within the dense-path error rule (same checks as the sparse path)
    y2, saved2, stats2 = twell.gated_ffn_forward(*dev, l1_weight=0.3, path="sparse")
    grads2 = twell.gated_ffn_backward(saved2, cp.asarray(dy))
    ry, rsaved, rstats = reference.gated_ffn_forward(*[a.astype(np.float64) for a in arrays], l1_weight=0.3)
    rgrads = reference.gated_ffn_backward(rsaved, dy.astype(np.float64))
    for out, out2, ref in zip((y, *grads), (y2, *grads2), (ry, *rgrads)):
        err, err2 = rel_error(out, ref), rel_error(out2, ref)
        assert err <= 2.0 * max(err2, HALF_ULP[dtype]) + HALF_ULP[dtype], (err, err2)
    assert int(stats.nnz) == int(stats2.nnz)
    assert float(stats.l1) == pytest.approx(float(stats2.l1), rel=2e-2)
    np.testing.assert_array_equal(stats.neuron_counts.get(), stats2.neuron_counts.get())


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 3000])
def test_dense_gate_mul_summary_matches_row_counts(cp, rows):
    """The tracker's device summary (entries of short rows, long rows, all entries) equals the one from
    the row counts, for row counts on both sides of the threshold and any CTA split of the rows."""
    from twell.kernels import ffn_forward
    rng = np.random.default_rng(rows)
    n = 1000
    z = cp.asarray((rng.standard_normal((rows, n)) + rng.uniform(-3.5, 0.5, (rows, 1))).astype(np.float32))
    u = cp.asarray(rng.standard_normal((rows, n)).astype(np.float32))
    row_nnz = cp.empty(rows, dtype=cp.int32)
    summary = cp.zeros(3, dtype=cp.uint64)
    ffn_forward.dense_gate_mul(z, u, row_nnz=row_nnz, summary=summary, summary_threshold=128)
    counts = row_nnz.get()
    np.testing.assert_array_equal(counts, (z.get() > 0).sum(axis=1))
    over = counts > 128
    assert summary.get().tolist() == [int(counts[~over].sum()), int(over.sum()), int(counts.sum())]


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_path_unobserved_calls_are_bitwise_the_observed_ones(cp, dtype):
    """A layer on the dense path reports its density every DENSE_INTERVAL-th call (the counting elementwise
    kernel) and runs the others through the flat one: every call's y is bitwise the same, and exact."""
    rng = np.random.default_rng(9)
    m = 1000
    arrays = make_ffn(rng, m, 256, 900, dtype, mean_active=400)
    dev = [cp.asarray(a) for a in arrays]
    tracker = twell.DensityTracker()
    outs = []
    for _ in range(2 + tracker.DENSE_INTERVAL):
        out = cp.full((m, 256), np.nan, dtype=dev[0].dtype)
        outs.append(twell.gated_ffn(*dev, tracker=tracker, out=out))
        cp.cuda.Device().synchronize()
    assert tracker.last_path == "dense" and tracker.calls["dense"] == 1 + tracker.DENSE_INTERVAL
    _check(cp, outs[1], arrays, dtype)
    for o in outs[2:]:
        np.testing.assert_array_equal(_bits(o), _bits(outs[1]))


def test_check_train_dense_batch_through_tracker(cp):
    """A tracker that has seen a dense batch sends the next call to the dense path, and back to sparse when
    the batch gets sparse; results stay within the error rule on both."""
    rng = np.random.default_rng(5)
    tracker = twell.DensityTracker()
    dense_arrays = make_ffn(rng, 1024, 256, 1500, "bfloat16", mean_active=600)
    sparse_arrays = make_ffn(rng, 1024, 256, 1500, "bfloat16", mean_active=8)
    dev_d = [cp.asarray(a) for a in dense_arrays]
    dev_s = [cp.asarray(a) for a in sparse_arrays]
    paths = []
    for dev, arrays in ((dev_d, dense_arrays), (dev_d, dense_arrays), (dev_s, sparse_arrays),
                        (dev_s, sparse_arrays)):
        y, stats = twell.gated_ffn(*dev, tracker=tracker, return_stats=True)
        _check(cp, y, arrays, "bfloat16")
        paths.append(stats.path)
    assert paths == ["sparse", "dense", "dense", "sparse"], paths
    assert tracker.calls == {"sparse": 2, "dense": 2}
    tr = twell.DensityTracker()
    dy = cp.asarray(rng.standard_normal((1024, 256)).astype(_np_dtype("bfloat16")))
    for want in ("sparse", "dense"):
        y, saved, stats = twell.gated_ffn_forward(*dev_d, tracker=tr)
        twell.gated_ffn_backward(saved, dy)
        assert stats.path == want


# --------------------------------------------------------------------------- CUDA graphs


def _capture(cp, fn, stream):
    with stream:
        fn()                                                    # warm-up on the capturing stream
        stream.synchronize()
        stream.begin_capture()
        fn()
        graph = stream.end_capture()
    return graph


@pytest.mark.parametrize("m", [1, 3, 8, 64, 65, 512])
@pytest.mark.parametrize("path", ["auto", "dense"])
def test_capture_replays_bitwise_like_eager(cp, m, path):
    rng = np.random.default_rng(m)
    dev = [cp.asarray(a) for a in make_ffn(rng, m, 2048, 5632, "bfloat16", mean_active=29)]
    eager = twell.gated_ffn(*dev, path=path)
    out = cp.full_like(eager, np.nan)
    s = cp.cuda.Stream(non_blocking=True)
    graph = _capture(cp, lambda: twell.gated_ffn(*dev, path=path, out=out), s)
    out.fill(np.nan)
    graph.launch(s)
    s.synchronize()
    np.testing.assert_array_equal(_bits(out), _bits(eager))
    # new inputs in the same buffers: the replay computes them
    dev[0][...] = cp.asarray(make_ffn(np.random.default_rng(m + 1), m, 2048, 5632, "bfloat16")[0])
    eager2 = twell.gated_ffn(*dev, path=path)
    for _ in range(3):
        graph.launch(s)
    s.synchronize()
    np.testing.assert_array_equal(_bits(out), _bits(eager2))
    twell.gated_ffn(*dev, path=path, out=cp.empty_like(out))   # allocations after the capture are not the graph's
    graph.launch(s)
    s.synchronize()
    np.testing.assert_array_equal(_bits(out), _bits(eager2))


def test_capture_of_large_batches_raises_clearly(cp):
    from twell.gpu.streams import CaptureError
    rng = np.random.default_rng(1)
    dev = [cp.asarray(a) for a in make_ffn(rng, 2048, 256, 1024, "bfloat16", mean_active=20)]
    out = cp.empty((2048, 256), dtype=dev[0].dtype)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        twell.gated_ffn(*dev, out=out)
        s.synchronize()
        s.begin_capture()
        try:
            with pytest.raises(CaptureError, match="cannot be captured.*at most 512 rows"):
                twell.gated_ffn(*dev, out=out)
            with pytest.raises(CaptureError, match="needs out="):
                twell.gated_ffn(*[a[:8] for a in dev[:1]], *dev[1:])
            with pytest.raises(CaptureError, match="cannot be captured"):
                twell.gated_ffn_forward(*dev)
        finally:
            s.end_capture()
    # the large batch captures on the dense path
    graph = _capture(cp, lambda: twell.gated_ffn(*dev, path="dense", out=out), cp.cuda.Stream(non_blocking=True))
    assert graph is not None


def test_capture_under_torch_cuda_graph(cp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(2)
    arrays = make_ffn(rng, 64, 2048, 5632, "bfloat16", mean_active=29)
    dev = [cp.asarray(a) for a in arrays]
    eager = twell.gated_ffn(*dev)
    out_t = torch.empty((64, 2048), dtype=torch.bfloat16, device="cuda")
    out = cp.from_dlpack(out_t)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with cp.cuda.ExternalStream(s.cuda_stream):
            twell.gated_ffn(*dev, out=out)                      # warm-up on the capture stream
    torch.cuda.synchronize()
    with torch.cuda.graph(g, stream=s):
        with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            twell.gated_ffn(*dev, out=out)
    out_t.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(_bits(out), _bits(eager))


# --------------------------------------------------------------------------- backup sized on the device


def _spy_queued(monkeypatch):
    """Capacities of the calls that sized their backup on the device (no host read-back)."""
    import twell.gpu.inference as inference
    calls = []
    real = inference.backup_rows_queued

    def spy(x, w_first, w_up, w_down, y, row_route, capacity, gated):
        calls.append(capacity)
        return real(x, w_first, w_up, w_down, y, row_route, capacity, gated)

    monkeypatch.setattr(inference, "backup_rows_queued", spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("heavy, observed", [(0, 0), (1, 0), (20, 0), (40, 40), (300, 0), (300, 2), (2048, 0)])
@pytest.mark.parametrize("gate_kernel", ["auto", "cublas"])
def test_queued_backup_exact(cp, monkeypatch, dtype, gated, heavy, observed, gate_kernel):
    """The sparse path with a tracker sizes the backup on the device: no backup rows, rows within the
    capacity, rows past it (the exact kernel from x alone) and every row a backup row; each against the
    float64 reference, bitwise repeatable, and the tracker then knows the true count."""
    m, d, n = 2048, 256, 1024
    rng = np.random.default_rng(heavy + 11)
    bias = np.ones(m, np.float32)
    bias[rng.choice(m, heavy, replace=False)] = -3.0                 # hundreds active: backup rows
    arrays = make_ffn(rng, m, d, n, dtype, mean_active=12, row_bias=bias)
    dev = [cp.asarray(a) for a in arrays]
    if gated:
        def run(**kw):
            return twell.gated_ffn(*dev, path="sparse", gate_kernel=gate_kernel, **kw)
    else:
        def run(**kw):
            return twell.ffn(dev[0], dev[1], dev[3], path="sparse", gate_kernel=gate_kernel, **kw)
    _, stats = run(return_stats=True)                               # the read-back path: the true count
    n_backup = int(stats.n_backup_rows)
    assert n_backup >= heavy
    calls = _spy_queued(monkeypatch)
    outs = []
    for _ in range(3):
        out = cp.full((m, d), np.nan, dtype=dev[0].dtype)
        tr = _observed(m, observed)
        outs.append(run(tracker=tr, out=out))
        cp.cuda.Device().synchronize()
        obs = tr.observation()
        assert obs.backup_rows == n_backup and obs.m == m
    capacity = calls[0]
    assert calls == [capacity] * 3 and capacity == (64 + 64 * -(-2 * observed // 64) if observed else 0)
    assert (n_backup > capacity) == (heavy > capacity)              # the excess kernel ran where it should
    for o in outs[1:]:
        np.testing.assert_array_equal(_bits(o), _bits(outs[0]))
    if gated:
        _check(cp, outs[0], arrays, dtype)
    else:
        ref = reference.ffn_dense(*[a.astype(np.float64) for a in (arrays[0], arrays[1], arrays[3])])
        assert rel_error(outs[0], ref) < 4 * HALF_ULP[dtype] + 8 * 2.0**-24 * np.sqrt(n)


@pytest.mark.parametrize("heavy, observed", [(200, 1), (40, 0)])
def test_queued_backup_nan_inf_rule(cp, heavy, observed):
    """Rows past the capacity (the exact kernel) and within it follow the NaN / Inf rule: NaN / Inf of x
    and of active neurons' weights propagate, inactive neurons' non-finite weights do not."""
    nan_inf_past_capacity(cp, lambda dev, tr: twell.gated_ffn(*dev, path="sparse", tracker=tr), heavy, observed)


def test_capture_of_large_batch_with_tracker(cp):
    """M = 2048 on the sparse path captures once its tracker has observed a call: the backup is sized on the
    device; replays are bitwise the eager call, also after new inputs with more backup rows (past the
    captured capacity: the exact kernel)."""
    m = 2048
    rng = np.random.default_rng(21)
    bias = np.ones(m, np.float32)
    bias[:20] = -3.0
    arrays = make_ffn(rng, m, 2048, 5632, "bfloat16", mean_active=29, row_bias=bias)
    dev = [cp.asarray(a) for a in arrays]
    tr = twell.DensityTracker()
    twell.gated_ffn(*dev, tracker=tr)                               # observed (read back)
    cp.cuda.Device().synchronize()
    eager = twell.gated_ffn(*dev, tracker=tr)                        # sized on the device
    out = cp.full_like(eager, np.nan)
    graph = _capture(cp, lambda: twell.gated_ffn(*dev, tracker=tr, out=out), cp.cuda.Stream(non_blocking=True))
    s = cp.cuda.Stream(non_blocking=True)
    graph.launch(s)
    s.synchronize()
    np.testing.assert_array_equal(_bits(out), _bits(eager))
    dev[0][:400, 0] = -3.0                                           # 400 heavy rows: past the capacity
    out.fill(np.nan)
    graph.launch(s)
    s.synchronize()
    _check(cp, out, [dev[0].get()] + arrays[1:], "bfloat16")
    tr_same = _observed(m, tr.observation().backup_rows)            # the capture's observation: its capacity
    np.testing.assert_array_equal(_bits(out), _bits(twell.gated_ffn(*dev, tracker=tr_same)))


# --------------------------------------------------------------------------- misaligned views


def _offset_view(cp, a, offset):
    """A C-contiguous view of a copy of ``a`` whose data pointer is ``offset`` elements past an aligned one."""
    buf = cp.empty(a.size + offset, dtype=a.dtype)
    view = buf[offset:].reshape(a.shape)
    view[...] = a
    assert view.flags.c_contiguous and view.data.ptr % 16 == offset * a.dtype.itemsize % 16
    return view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1, 2, 4, 8])
@pytest.mark.parametrize("which", ["x", "w_gate", "w_up", "w_down"])
def test_misaligned_views_meet_the_aligned_error_rule(cp, dtype, offset, which):
    if offset * _np_dtype(dtype).itemsize % 16 == 0:
        pytest.skip("this offset keeps 16-byte alignment for the dtype")
    rng = np.random.default_rng(offset)
    arrays = make_ffn(rng, 700, 256, 1000, dtype, mean_active=29)
    dev = [cp.asarray(a) for a in arrays]
    idx = ["x", "w_gate", "w_up", "w_down"].index(which)
    dev[idx] = _offset_view(cp, dev[idx], offset)
    aligned = [cp.asarray(a) for a in arrays]
    for m in (700, 3):                                          # the sparse and the small-batch paths
        sub = [dev[0][:m] if idx != 0 else _offset_view(cp, aligned[0][:m], offset), *dev[1:]]
        y = twell.gated_ffn(*sub)
        np.testing.assert_array_equal(_bits(y), _bits(twell.gated_ffn(aligned[0][:m], *aligned[1:])))
        _check(cp, y, [arrays[0][:m], *arrays[1:]], dtype)
    yt, saved, _ = twell.gated_ffn_forward(*dev, l1_weight=0.1)
    dy = _offset_view(cp, cp.asarray(rng.standard_normal((700, 256)).astype(_np_dtype(dtype))), offset)
    grads = twell.gated_ffn_backward(saved, dy)
    yr, saved_r, _ = twell.gated_ffn_forward(*aligned, l1_weight=0.1)
    grads_r = twell.gated_ffn_backward(saved_r, cp.ascontiguousarray(dy).copy())
    for a, b in zip((yt, *grads), (yr, *grads_r)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    tw = twell.pack_twell(cp.maximum(cp.matmul(aligned[0], aligned[1].T), 0))
    if which in ("x", "w_up", "w_down"):
        np.testing.assert_array_equal(_bits(twell.gated_up_down(dev[0], tw, dev[2], dev[3])),
                                      _bits(twell.gated_up_down(*[aligned[0], tw, aligned[2], aligned[3]])))
    y_ffn = twell.ffn(dev[0], dev[2], dev[3])
    np.testing.assert_array_equal(_bits(y_ffn), _bits(twell.ffn(aligned[0], aligned[2], aligned[3])))


# --------------------------------------------------------------------------- NaN / Inf rule


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 700])
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_inactive_neuron_weights_do_not_matter_on_any_path(cp, dtype, m, path):
    """Inf / NaN in the up / down weights of a neuron that is inactive on every token: the result equals the
    one with finite weights there, on compact rows, backup rows, small batches and the dense path, and in
    training (an inactive neuron contributes nothing, docs/design.md)."""
    rng = np.random.default_rng(7)
    bias = np.ones(m, np.float32)
    bias[: m // 3] = -2.5                                       # heavy rows: backup rows on the sparse path
    arrays = make_ffn(rng, m, 256, 1000, dtype, mean_active=20, row_bias=bias)
    arrays[1][[10, 20]] = 0                                     # z = 0: neurons 10, 20 never fire
    z = arrays[0].astype(np.float32) @ arrays[1].astype(np.float32).T
    dead = np.flatnonzero((z <= 0).all(axis=0))
    assert {10, 20} <= set(dead.tolist())
    bad = [a.copy() for a in arrays]
    bad[2][dead[0], 3] = np.inf                                 # w_up
    bad[3][dead[1], 5] = np.nan                                 # w_down
    bad[3][dead[0], 7] = -np.inf
    good_y = twell.gated_ffn(*[cp.asarray(a) for a in arrays], path=path)
    bad_y = twell.gated_ffn(*[cp.asarray(a) for a in bad], path=path)
    ref = reference.gated_ffn(*bad).astype(np.float64)
    assert np.isfinite(ref).all()
    _same_but_rounding(bad_y, good_y, dtype)
    dy = rng.standard_normal((m, 256)).astype(_np_dtype(dtype))
    out = []
    for a in (arrays, bad):
        y, saved, _ = twell.gated_ffn_forward(*[cp.asarray(v) for v in a], l1_weight=0.1, path=path)
        out.append([y, *twell.gated_ffn_backward(saved, cp.asarray(dy))])
    for i, (g, b) in enumerate(zip(*out)):
        if i in (2, 3, 4):                                      # the weight gradients: rows of dead neurons are 0
            np.testing.assert_array_equal(b.get().astype(np.float32)[dead], 0)
        _same_but_rounding(b, g, dtype)


def _same_but_rounding(bad, good, dtype):
    """Finite, and equal to the finite-weights result but where a dense GEMM's NaN was recomputed over the
    active neurons (another summation order: a rounding apart)."""
    b, g = bad.get().astype(np.float64), good.get().astype(np.float64)
    assert np.isfinite(b).all()
    scale = np.abs(g).max() + 1e-30
    assert np.abs(b - g).max() <= (4 * HALF_ULP[dtype] + 4 * 2.0**-24 * np.sqrt(1000)) * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 700])
def test_nan_inf_in_x_and_active_weights_propagate(cp, dtype, m):
    rng = np.random.default_rng(9)
    arrays = make_ffn(rng, m, 64, 500, dtype, mean_active=10)
    arrays[0][1, 5] = np.nan
    arrays[0][2, 9] = np.inf
    z = arrays[0].astype(np.float32) @ arrays[1].astype(np.float32).T
    live = int(np.flatnonzero(z[0] > 0)[0])
    arrays[3][live, 4] = np.inf                                 # an active neuron of row 0
    dev = [cp.asarray(a) for a in arrays]
    ref = reference.gated_ffn(*arrays).astype(np.float64)     # the rule: only active neurons count
    assert np.isnan(ref).any() and np.isinf(ref).any()
    for path in ("sparse", "dense"):
        y = twell.gated_ffn(*dev, path=path).get().astype(np.float32)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
        np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))


# --------------------------------------------------------------------------- user containers


def _twell_case(cp):
    g = np.zeros((5, 300), np.float32)
    g[0, [3, 40, 250]] = [1, 2, 3]
    g[1, :100] = 1.0                                            # overflows: a backup row
    g[3, 299] = 4.0
    return twell.pack_twell(cp.asarray(g), tile_width=64, compression=4)


@pytest.mark.parametrize("corrupt, rule", [
    (lambda tw: tw.indices.__setitem__((0, 0, 0), 200), "inside their tile"),
    (lambda tw: tw.indices.__setitem__((3, 4, 0), 50), "inside their tile"),   # column 306 >= n = 300
    (lambda tw: tw.indices.__setitem__((0, 0, 1), 0), "strictly ascending"),
    (lambda tw: tw.counts.__setitem__((0, 0), -1), "counts must be >= 0"),
    (lambda tw: tw.counts.__setitem__((0, 0), 99), "at most slots"),
    (lambda tw: tw.backup_slot.__setitem__(2, 0), "backup_slot"),
    (lambda tw: tw.backup_rows.__setitem__(0, 4), "backup_rows|backup_slot"),
])
def test_corrupted_device_twell_is_rejected_before_any_kernel(cp, corrupt, rule):
    tw = _twell_case(cp)
    corrupt(tw)
    x = cp.ones((5, 32), cp.float32)
    w = cp.ones((300, 32), cp.float32)
    for call in (lambda: twell.unpack_twell(tw), lambda: twell.gated_up_down(x, tw, w, w),
                 lambda: twell.down_projection(tw, w)):
        with pytest.raises(ValueError, match=rule):
            call()


def test_non_contiguous_device_container_is_rejected(cp):
    tw = _twell_case(cp)
    import dataclasses
    bad = dataclasses.replace(tw, values=cp.asfortranarray(tw.values))
    with pytest.raises(ValueError, match="values must be C-contiguous"):
        twell.unpack_twell(bad)


@pytest.mark.parametrize("corrupt, rule", [
    (lambda hy: hy.col_indices.__setitem__(0, 10**6), "inside their tile and below n_cols|below n_cols"),
    (lambda hy: hy.row_ptr.__setitem__(1, 10**6), "row_ptr"),
    (lambda hy: hy.row_ptr.__setitem__(2, 0), "row_ptr"),
    (lambda hy: hy.backup_slot.__setitem__(0, 3), "backup_slot"),
])
def test_corrupted_device_hybrid_is_rejected(cp, corrupt, rule):
    g = np.zeros((4, 50), np.float32)
    g[0, [1, 7]] = 1
    g[1, 3] = 2
    g[2, :40] = 1                                               # a backup row at threshold 10
    hy = twell.pack_hybrid(cp.asarray(g), 10)
    corrupt(hy)
    for call in (lambda: twell.unpack_hybrid(hy), lambda: twell.transpose_pattern(hy)):
        with pytest.raises(ValueError, match=rule):
            call()


# --------------------------------------------------------------------------- arguments, devices, threads


def test_out_and_threshold_checks(cp):
    rng = np.random.default_rng(0)
    x, wg, wu, wd = [cp.asarray(a) for a in make_ffn(rng, 8, 64, 128, "float32")]
    with pytest.raises(ValueError, match="out must not overlap x"):
        twell.gated_ffn(x, wg, wu, wd, out=x)
    with pytest.raises(ValueError, match="out must not overlap w_down"):          # a view inside w_down
        twell.gated_ffn(x, wg, wu, wd, out=wd.reshape(-1)[64:64 + 8 * 64].reshape(8, 64))
    for bad in (cp.empty((8, 64), dtype=cp.float16), cp.empty((8, 65), dtype=x.dtype),
                cp.empty((8, 128), dtype=x.dtype)[:, ::2], np.empty((8, 64), dtype=np.float32)):
        with pytest.raises((TypeError, ValueError), match="out"):
            twell.gated_ffn(x, wg, wu, wd, out=bad)
    buf = cp.empty((2, 8, 64), dtype=x.dtype)                                      # adjacent, not overlapping
    buf[0] = x
    got = twell.gated_ffn(buf[0], wg, wu, wd, out=buf[1])
    assert got is buf[1] or got.data.ptr == buf[1].data.ptr
    np.testing.assert_array_equal(_bits(buf[1]), _bits(twell.gated_ffn(x, wg, wu, wd)))
    with pytest.raises(TypeError, match="out must be an array"):
        twell.gated_ffn(x, wg, wu, wd, out=[[0.0] * 64] * 8)
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        twell.gated_ffn(x, wg, wu, wd, check_finite="no")
    with pytest.raises(TypeError, match="dense_row_threshold must be an integer"):
        twell.gated_ffn(x, wg, wu, wd, dense_row_threshold=np.array([1, 2]))
    with pytest.raises(ValueError, match="path must be one of"):
        twell.gated_ffn(x, wg, wu, wd, path="fast")
    big = twell.gated_ffn(x, wg, wu, wd, dense_row_threshold=2**40)       # as the NumPy path accepts
    np.testing.assert_array_equal(_bits(big), _bits(twell.gated_ffn(x, wg, wu, wd, dense_row_threshold=None)))
    y, saved, _ = twell.gated_ffn_forward(x, wg, wu, wd, dense_row_threshold=2**40)
    assert y.shape == x.shape


@pytest.mark.skipif(os.environ.get("TWELL_SKIP_MULTI_GPU") == "1", reason="requested")
def test_arrays_on_another_device_are_rejected(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    rng = np.random.default_rng(0)
    arrays = make_ffn(rng, 8, 64, 128, "float32")
    with cp.cuda.Device(1):
        dev1 = [cp.asarray(a) for a in arrays]
        out1 = cp.empty((8, 64), cp.float32)
    dev0 = [cp.asarray(a) for a in arrays]
    with pytest.raises(ValueError, match="current device"):
        twell.gated_ffn(*dev1)
    with pytest.raises(ValueError, match="device"):
        twell.gated_ffn(*dev0, out=out1)
    with cp.cuda.Device(1):                                     # the same op, plans and kernels of device 1
        y1 = twell.gated_ffn(*dev1)
    y0 = twell.gated_ffn(*dev0)
    np.testing.assert_array_equal(y1.get(), y0.get())


def test_threads_with_different_shapes(cp):
    """Concurrent calls from threads with different n and d (shared-memory limits of shared kernels only
    grow; plans and cuBLAS handles are per thread or locked): every result equals its serial one."""
    rng = np.random.default_rng(0)
    cases = [make_ffn(rng, m, d, n, "float32", mean_active=10) for m, d, n in
             [(700, 300, 3000), (700, 100, 500), (40, 2100, 700), (900, 16, 33)]]
    cases = [[cp.asarray(a) for a in c] for c in cases]
    want = [twell.gated_ffn(*c).get() for c in cases]
    errors = []

    def work(i):
        try:
            s = cp.cuda.Stream(non_blocking=True)
            with s:
                for _ in range(5):
                    got = twell.gated_ffn(*cases[i]).get()
                    np.testing.assert_array_equal(got, want[i])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_backward_error_leaves_saved_usable(cp, monkeypatch):
    rng = np.random.default_rng(1)
    dev = [cp.asarray(a) for a in make_ffn(rng, 700, 128, 500, "bfloat16", mean_active=20)]
    dy = cp.asarray(rng.standard_normal((700, 128)).astype(_np_dtype("bfloat16")))
    y, saved, _ = twell.gated_ffn_forward(*dev)
    import cupy
    real_empty = cupy.empty
    calls = {"n": 0}

    def failing_empty(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise cupy.cuda.memory.OutOfMemoryError(1 << 40, 0, 0)
        return real_empty(*args, **kw)

    monkeypatch.setattr(cupy, "empty", failing_empty)
    with pytest.raises(cupy.cuda.memory.OutOfMemoryError):
        twell.gated_ffn_backward(saved, dy)
    monkeypatch.setattr(cupy, "empty", real_empty)
    assert not saved.consumed
    grads = twell.gated_ffn_backward(saved, dy)
    y2, saved2, _ = twell.gated_ffn_forward(*dev)
    for a, b in zip(grads, twell.gated_ffn_backward(saved2, dy)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    with pytest.raises(ValueError, match="already consumed"):
        twell.gated_ffn_backward(saved, dy)


def test_first_compile_notice_and_warmup(cp, capsys):
    from twell.kernels import FAMILIES
    from twell.runtime import loader
    done = loader.warmup(FAMILIES)
    assert set(done) == {f.name for f in FAMILIES}


# --------------------------------------------------------------------------- fuzz

FUZZ = settings(max_examples=int(os.environ.get("TWELL_FUZZ_EXAMPLES", "60")), deadline=None)


@FUZZ
@given(
    m=st.integers(1, 1500), d=st.integers(2, 700), n=st.integers(1, 2100),
    dtype=st.sampled_from(DTYPES), offset=st.sampled_from([0, 1, 2, 4, 8]),
    kind=st.sampled_from(["uniform", "skewed", "all_active", "none"]), training=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_against_reference(cp, m, d, n, dtype, offset, kind, training, seed):
    """Random M, d, n (off every multiple), dtype, pointer offset and sparsity kind, inference and training,
    against the float64 reference within the error rule."""
    rng = np.random.default_rng(seed)
    bias = None
    if kind == "skewed":
        bias = np.where(rng.random(m) < 0.1, -2.0, 1.0).astype(np.float32)
    elif kind == "all_active":
        bias = np.full(m, -100.0, np.float32)
    elif kind == "none":
        bias = np.full(m, 100.0, np.float32)
    arrays = make_ffn(rng, m, d, n, dtype, mean_active=min(12.0, n / 2), row_bias=bias)
    if training:
        dy = rng.standard_normal((m, d)).astype(_np_dtype(dtype))
        check_train(cp, arrays, dy, dtype, l1_weight=0.05)
        return
    dev = [cp.asarray(a) for a in arrays]
    dev[0] = _offset_view(cp, dev[0], offset)
    out = cp.full((m, d), np.nan, dtype=dev[0].dtype)
    y = twell.gated_ffn(*dev, out=out)
    _check(cp, y, arrays, dtype)
