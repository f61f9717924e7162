"""Host cost (µs per call) of the Python/CuPy steps before a twell launch (perf-notes.md, v13).

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/host_launch_probe.py
Numbers of session 7 (before v13): docs/results/host_launch_probe_session7.txt.
"""
import time, numpy as np, cupy as cp
import twell
from twell import synthetic
from twell.kernels import gate_gemm, _launch
from twell._kernels import get_kernel
from twell.kernels._launch import i32, NULL

def t(name, fn, n=3000):
    try:
        fn()
    except Exception as e:
        print(f"{name:55s} FAILED {type(e).__name__}: {e}", flush=True); return
    for _ in range(50): fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    cp.cuda.Device().synchronize()
    print(f"{name:55s} {dt:7.2f} us", flush=True)

p = synthetic.make_problem(256, kind="uniform", xp=cp)
x, wg = p.x, p.w_gate
m = x.shape[0]
t("np.int32(5)", lambda: np.int32(5))
t("i32(5)", lambda: i32(5))
t("type(x) is cp.ndarray", lambda: type(x) is cp.ndarray)
t("x.shape", lambda: x.shape)
t("x.dtype.name", lambda: x.dtype.name)
t("x.ndim", lambda: x.ndim)
t("x.flags.c_contiguous", lambda: x.flags.c_contiguous)
t("x._c_contiguous", lambda: x._c_contiguous)
t("x.strides", lambda: x.strides)
t("x.device.id", lambda: x.device.id)
t("x.data.device_id", lambda: x.data.device_id)
t("x.data.ptr", lambda: x.data.ptr)
t("cp.cuda.runtime.getDevice()", lambda: cp.cuda.runtime.getDevice())
t("cp.cuda.get_current_stream()", lambda: cp.cuda.get_current_stream())
t("cp.cuda.get_current_stream().ptr", lambda: cp.cuda.get_current_stream().ptr)
t("cp.empty((16384,22),int32)", lambda: cp.empty((16384, 22), dtype=cp.int32))
t("cp.empty((16384,22,32),uint8)", lambda: cp.empty((16384, 22, 32), dtype=cp.uint8))
t("cp.empty(n, np.int32 dtype obj)", lambda: cp.empty(16384, dtype=np.dtype(np.int32)))
t("cp.cuda.alloc(1<<20)", lambda: cp.cuda.alloc(1 << 20))
mp = cp.cuda.alloc(1 << 24)
t("cp.ndarray((16384,22),int32,memptr)", lambda: cp.ndarray((16384, 22), cp.int32, mp))
t("cp.zeros(3,int32)", lambda: cp.zeros(3, dtype=cp.int32))
z3 = cp.empty(3, dtype=cp.int32)
t("z3.fill(0)", lambda: z3.fill(0))
t("z3.data.memset_async(0,12)", lambda: z3.data.memset_async(0, 12))
t("alloc_pinned_memory(16)", lambda: cp.cuda.alloc_pinned_memory(16))
t("cp.cuda.Event(block=False, disable_timing=True)", lambda: cp.cuda.Event(block=False, disable_timing=True))
k = get_kernel("gate_gemm", "gate_twell_wgmma<__nv_bfloat16, 256, 2, true, 0, 0>")
t("k.max_dynamic_shared_size_bytes", lambda: k.max_dynamic_shared_size_bytes)
t("get_kernel(...)", lambda: get_kernel("gate_gemm", "gate_twell_wgmma<__nv_bfloat16, 256, 2, true, 0, 0>"))
t("tensor_map(x,128) cached", lambda: gate_gemm.tensor_map(x, 128))
route = get_kernel("pack", "route_twell_counts")
counts = cp.zeros((m, 22), cp.int32); rn = cp.empty(m, cp.int32); rr = cp.empty(m, cp.int32); tot = cp.zeros(3, cp.int32)
t("route launch (8 args, fresh i32)", lambda: route((32,), (256,), (counts, i32(m), i32(22), i32(32), i32(128), rn, rr, tot)), n=1000)
args = (counts, i32(m), i32(22), i32(32), i32(128), rn, rr, tot)
t("route launch (8 args, prebuilt tuple)", lambda: route((32,), (256,), args), n=1000)
ints = (counts.data.ptr, m, 22, 32, 128, rn.data.ptr, rr.data.ptr, tot.data.ptr)
mx, mw = gate_gemm.tensor_map(x, 128), gate_gemm.tensor_map(wg, 128)
n = wg.shape[0]
ind = cp.empty((m, 22, 32), cp.uint8); val = cp.empty((m, 22, 32), x.dtype)
grid = gate_gemm._wgmma_grid(k, gate_gemm.WGMMA_SMEM, 2, 22, 2, 0)
gargs = (mx, mw, i32(m), i32(n), i32(2048), i32(22), i32(32), counts, ind, val, NULL, NULL, NULL, NULL, NULL, i32(0), NULL, NULL, NULL, i32(0), i32(0))
t("GEMM launch (21 args prebuilt)", lambda: k((grid,), (384,), gargs, shared_mem=gate_gemm.WGMMA_SMEM), n=300)
t("GEMM launch (21 args, fresh i32 + maps lookups)", lambda: k((grid,), (384,), (gate_gemm.tensor_map(x, 128), gate_gemm.tensor_map(wg, 128), i32(m), i32(n), i32(2048), i32(22), i32(32), counts, ind, val, NULL, NULL, NULL, NULL, NULL, i32(0), NULL, NULL, NULL, i32(0), i32(0)), shared_mem=gate_gemm.WGMMA_SMEM), n=300)
gargs_p = (mx, mw, i32(m), i32(n), i32(2048), i32(22), i32(32), counts.data.ptr, ind.data.ptr, val.data.ptr, 0, 0, 0, 0, 0, i32(0), 0, 0, 0, i32(0), i32(0))
try:
    t("GEMM launch (pointers as python ints)", lambda: k((grid,), (384,), gargs_p, shared_mem=gate_gemm.WGMMA_SMEM), n=300)
except Exception as e:
    print("ints as pointers:", type(e).__name__, e)
try:
    gargs_mp = (mx, mw, i32(m), i32(n), i32(2048), i32(22), i32(32), counts.data, ind.data, val.data, NULL, NULL, NULL, NULL, NULL, i32(0), NULL, NULL, NULL, i32(0), i32(0))
    t("GEMM launch (MemoryPointer args)", lambda: k((grid,), (384,), gargs_mp, shared_mem=gate_gemm.WGMMA_SMEM), n=300)
except Exception as e:
    print("memptr:", type(e).__name__, e)
print("NULL is", type(NULL), NULL)
t("gate_twell_async (M=256)", lambda: gate_gemm.gate_twell_async(x, wg, 256, 8, 128), n=300)
wu, wd = p.w_up, p.w_down
t("twell.ops._valid_cupy_args", lambda: twell.ops._valid_cupy_args(x, {"w_gate": wg, "w_up": wu, "w_down": wd}))
t("twell.ops._check_ffn_args", lambda: twell.ops._check_ffn_args(x, {"w_gate": wg, "w_up": wu, "w_down": wd}))
t("_inference_threshold", lambda: twell.ops._inference_threshold("auto", n, 256, 8))
t("choose_gate_kernel", lambda: gate_gemm.choose_gate_kernel("auto", x, wg))
t("HostReadback(tot[:2], overlap)", lambda: _launch.HostReadback(tot[:2], overlap=True), n=500)
t("gated_ffn M=256 (full, includes sync)", lambda: twell.gated_ffn(x, wg, wu, wd), n=300)
import os
print("cpu", os.cpu_count(), open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0])
