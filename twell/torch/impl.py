"""What the ops run on real 2-D tensors: the inference op, the training forward and the training backward
(CPU tensors through the NumPy reference, CUDA tensors through CuPy views on PyTorch's current stream)."""

from __future__ import annotations

import dataclasses

import torch

from twell import ops as core
from twell.dispatch import check_path

from .interop import StreamRef, check_devices, cuda_interop, evict_oldest, from_host, host_array, l1_dtype, to_torch
from .registry import mark_consumed, register_state, take_state

#: Inference batches above this many rows allocate from PyTorch's pool (with ``torch_memory``); smaller ones
#: always use CuPy's pool (fewer host operations per call).
_TORCH_MEMORY_ROWS = 512

_gpu = []           # twell.gpu.inference, imported by the first CUDA call

#: Calls whose weights and options an earlier call validated: key (device, options, x's dtype and width, each
#: weight's address, shape, strides and dtype) -> _CallPlan.  Bounded; holds no tensor.
_plans: dict = {}
_PLAN_CACHE = 256
_DECODE_KERNELS = ("auto", "cublas")


def _gpu_inference():
    if not _gpu:
        from twell.gpu import inference  # noqa: PLC0415 - imported with CuPy, by the first CUDA call
        _gpu.append(inference)
    return _gpu[0]


class _CallPlan:
    """What a validated call leaves for the next one with the same key: CuPy views of the weights, the
    core's row threshold, and whether the fused decode kernels take these weights (their launch plans per
    batch size)."""

    __slots__ = ("weights", "threshold", "decode_ok", "decode")

    def __init__(self, weights, threshold, decode_ok):
        self.weights, self.threshold, self.decode_ok = weights, threshold, decode_ok
        self.decode = {}                # M -> ffn_forward.DecodePlan


def _plan_key(x, w_first, w_up, w_down, dev, options):
    return (dev, options, x.shape[1], x.dtype,
            w_first.data_ptr(), w_first.shape, w_first.stride(), w_first.dtype,
            w_up.data_ptr(), w_up.shape, w_up.stride(), w_up.dtype,
            w_down.data_ptr(), w_down.shape, w_down.stride(), w_down.dtype)


def _remember(key, cw, cy, gated, tile_width, compression, threshold):
    """After a call that the core validated: its plan, if the weights pass the core's fast check against y
    (fresh, aligned, x's shape and dtype: what the plan's later calls check x for)."""
    fast = core.fast_cupy_args(cy, cw)
    if fast is None:
        return
    first = cw["w_gate"] if gated else cw["w_up"]
    weights = (first, cw["w_up"], cw["w_down"])
    decode_ok = _gpu_inference().ffn_forward.decode_fused_supported(cy[:1], *weights, cy[:1])
    evict_oldest(_plans, _PLAN_CACHE)
    _plans[key] = _CallPlan(weights, core.inference_threshold(threshold, fast[1], tile_width, compression), decode_ok)


def infer_impl(x, w_first, w_up, w_down, gated, tile_width, compression, threshold, gate_kernel, path, tracker,
               slot, torch_memory):
    """The inference op on real 2-D tensors: y (M, d), allocated by PyTorch."""
    named = (("w_gate", w_first), ("w_up", w_up), ("w_down", w_down)) if gated else (("w_up", w_up),
                                                                                    ("w_down", w_down))
    dev = check_devices(x, named)
    op = core.gated_ffn if gated else core.ffn
    if dev < 0:
        arrays = {"x": host_array(x, "x")}
        arrays.update((k, host_array(w, k)) for k, w in named)
        res = op(*arrays.values(), tile_width=tile_width, compression=compression, dense_row_threshold=threshold,
                 return_stats=slot is not None, gate_kernel=gate_kernel, path=path, tracker=tracker)
        if slot is None:
            return from_host(res)
        slot.put(res[1], x.device)
        return from_host(res[0])
    ci = cuda_interop()
    cp = ci.cp
    m = x.shape[0]
    key = _plan_key(x, w_first, w_up, w_down, dev, (gated, tile_width, compression, threshold, gate_kernel, path))
    plan = _plans.get(key)
    observe = None
    if plan is not None and not (m and x.is_contiguous() and x.data_ptr() % 16 == 0
                                 and cp.cuda.runtime.getDevice() == dev):
        plan = False                    # planned weights, but not this x (or device): the full path, no new plan
    if plan:
        # The weights and options were validated by an earlier call (the key says so); x is checked here.
        if (plan.decode_ok and slot is None and m <= _gpu_inference().FUSED_DECODE_ROWS and path != "dense"
                and gate_kernel in _DECODE_KERNELS):
            # Decode: two PyTorch allocations and the fused decode's two launches by address on PyTorch's
            # current stream (capturable: every allocation is PyTorch's, nothing is read back).  A tracker is
            # asked here as the core would ask it (outside a capture): the sparse path with no report due
            # launches; anything else goes to the core with its answers.
            stream_ptr = ci.stream_ptr(dev)
            if tracker is not None and not cp.cuda.runtime.streamIsCapturing(stream_ptr):
                if path == "auto":
                    path = tracker.choose(m, w_down.shape[0], x.shape[1], 2, training=False)
                observe = tracker.wants_small_batch_observation()
            if tracker is None or (observe is False and path == "sparse"):
                dplan = plan.decode.get(m)
                if dplan is None:
                    dplan = plan.decode[m] = _gpu_inference().ffn_forward.decode_plan(
                        plan.weights[0].dtype, m, w_down.shape[0], x.shape[1], gated)
                y = x.new_empty(x.shape)
                workspace = torch.empty(dplan.workspace_bytes, dtype=torch.uint8, device=x.device)
                dplan.launch(x.data_ptr(), w_first.data_ptr(), w_up.data_ptr(), w_down.data_ptr(), y.data_ptr(),
                             workspace.data_ptr(), StreamRef(stream_ptr))
                return y
        y = x.new_empty(x.shape)
        cx, cy = ci.view(x, dev, "x"), ci.view(y, dev, "out")
        run = (_infer_planned, (plan, cx, cy, gated, tile_width, compression, gate_kernel, path, tracker, slot,
                                observe))
    else:
        y = x.new_empty(x.shape)           # contiguous, PyTorch-owned
        cx = ci.view(x, dev, "x")
        if gated:
            cw = {"w_gate": ci.view(w_first, dev, "w_gate"), "w_up": ci.view(w_up, dev, "w_up"),
                  "w_down": ci.view(w_down, dev, "w_down")}
        else:
            cw = {"w_up": ci.view(w_up, dev, "w_up"), "w_down": ci.view(w_down, dev, "w_down")}
        cy = ci.view(y, dev, "out")
        run = (_infer_run, (op, cx, cw, cy, gated, tile_width, compression, threshold, gate_kernel, path, tracker,
                            slot))
    stream = ci.stream(dev)
    fn, args = run
    if m <= _TORCH_MEMORY_ROWS and cp.cuda.runtime.getDevice() == dev:
        if cp.cuda.get_current_stream().ptr == stream.ptr:
            res, want = fn(stream, *args)          # already CuPy's current stream (PyTorch's default stream)
        else:
            with stream:                # the common case without contextlib's cost
                res, want = fn(stream, *args)
    else:
        with ci.on_device(dev, torch_memory=torch_memory, stream=stream):
            res, want = fn(stream, *args)
    if slot is not None:
        slot.put(res[1] if want else None, x.device)
    if plan is None:                    # a new key, validated by the core: remember it
        _remember(key, cw, cy, gated, tile_width, compression, threshold)
    return y


def _infer_planned(stream, plan, cx, cy, gated, tile_width, compression, gate_kernel, path, tracker, slot, observe):
    """The core's GPU op on the plan's weight views, inside the device / stream context; returns (result,
    stats asked).  ``observe``: the tracker's answer when the caller already asked it (None: the core asks)."""
    want = slot is not None and not stream.is_capturing()
    w_first, w_up, w_down = plan.weights
    res = _gpu_inference().forward(cx, w_first, w_up, w_down, gated=gated, tile_width=tile_width,
                                   compression=compression, threshold=plan.threshold, return_stats=want, out=cy,
                                   gate_kernel=gate_kernel, path=path, tracker=tracker, observe=observe)
    return res, want


def _infer_run(stream, op, cx, cw, cy, gated, tile_width, compression, threshold, gate_kernel, path, tracker, slot):
    """The inference call on CuPy views, inside the device / stream context; returns (result, stats asked).

    Inside a CUDA-graph capture no statistics are kept (their memory would belong to the graph); the core
    consults the tracker without synchronising there and records no observation."""
    want = slot is not None and not stream.is_capturing()
    fast = core.fast_cupy_args(cx, cw)
    if fast is not None:
        # every argument is a well-formed CuPy array (the core's own fast check) and out is fresh: what is left
        # are the options' checks, memoised in the core
        thr = core.inference_threshold(threshold, fast[1], tile_width, compression)
        core.check_gate_kernel(gate_kernel)
        check_path(path)
        res = _gpu_inference().forward(cx, cw["w_gate"] if gated else cw["w_up"], cw["w_up"], cw["w_down"],
                                       gated=gated, tile_width=tile_width, compression=compression, threshold=thr,
                                       return_stats=want, out=cy, gate_kernel=gate_kernel, path=path,
                                       tracker=tracker)
    else:           # the public op: its full checks raise the precise error (or copy a misaligned view)
        res = op(cx, *cw.values(), tile_width=tile_width, compression=compression, dense_row_threshold=threshold,
                 return_stats=want, out=cy, gate_kernel=gate_kernel, path=path, tracker=tracker)
    return res, want


def train_fwd_impl(x, w_gate, w_up, w_down, l1_weight, threshold, gate_kernel, path, tracker, slot, keep_state,
                   torch_memory):
    """The training forward on real 2-D tensors: (y, l1 (0-d), handle (CPU int64 0-d; 0 if not kept))."""
    named = (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down))
    dev = check_devices(x, named)
    if dev < 0:
        arrays = [host_array(x, "x")] + [host_array(w, k) for k, w in named]
        y, saved, stats = core.gated_ffn_forward(*arrays, l1_weight=l1_weight, dense_row_threshold=threshold,
                                                 gate_kernel=gate_kernel, path=path, tracker=tracker)
        y_t = from_host(y)
        l1 = torch.tensor(float(stats.l1), dtype=l1_dtype(x))
    else:
        ci = cuda_interop()
        cx = ci.view(x, dev, "x")
        cw = [ci.view(w, dev, k) for k, w in named]
        with ci.on_device(dev, torch_memory=torch_memory):
            y, saved, stats = core.gated_ffn_forward(cx, *cw, l1_weight=l1_weight, dense_row_threshold=threshold,
                                                     gate_kernel=gate_kernel, path=path, tracker=tracker)
            y_t = to_torch(y, dev)
            l1 = to_torch(stats.l1, dev).to(l1_dtype(x))
    if slot is not None:
        slot.put(stats, x.device)
    h = register_state(saved) if keep_state else 0
    return y_t, l1, torch.tensor(h, dtype=torch.int64)


def train_bwd_impl(dy, dl1, handle, x, torch_memory):
    """The training backward: (dx, dw_gate, dw_up, dw_down) from the handle's saved state."""
    h = int(handle)
    kept, retained = take_state(h)
    # the core marks what it is given consumed: give it a shallow copy (the registry says what is consumed),
    # with λ plus the gradient of l1 when l1 is used in the loss (a host read of that gradient)
    saved = dataclasses.replace(kept, l1_weight=float(kept.l1_weight) + (0.0 if dl1 is None else float(dl1)))
    dy = dy.contiguous()
    dev = x.get_device()
    try:
        if dy.get_device() != dev:
            raise ValueError(f"the gradient of y is on {dy.device} but the forward ran on {x.device}")
        if dev < 0:
            grads = core.gated_ffn_backward(saved, host_array(dy, "dy"))
            return tuple(from_host(g) for g in grads)
        ci = cuda_interop()
        cdy = ci.view(dy, dev, "dy")
        with ci.on_device(dev, torch_memory=torch_memory):
            grads = core.gated_ffn_backward(saved, cdy)
            return tuple(to_torch(g, dev) for g in grads)
    finally:
        if saved.consumed and not retained:
            mark_consumed(h)
