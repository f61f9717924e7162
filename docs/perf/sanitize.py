"""Every GPU path on small problems, for compute-sanitizer: inference (fused decode, small batch, the sparse
path with the cuBLAS and the fused gate, its backup read back and sized on the device with rows past the
capacity, the dense path; gated and not), the ops on user containers
(``gated_up_down``, ``down_projection``, with their validation kernels), and the training step (the sparse
path with the cuBLAS and the fused gate, compact entries presized and sized first, and the dense path).
bf16, fp16, fp32; d = 256 (warp-per-row kernels) and 200 (CTA kernels); token skew with a low row
threshold, so that backup rows, tile overflows, split neurons (> 128 entries) and the partial reductions
all run.  Prints a checksum per case.

    PYTHONPATH=. compute-sanitizer --tool memcheck python docs/perf/sanitize.py
    PYTHONPATH=. compute-sanitizer --tool racecheck python docs/perf/sanitize.py
"""

import cupy as cp

import twell
from twell.bench import make_dy
from twell.gpu import training
from twell.kernels import gate_gemm, pack
from twell.runtime import blas
from twell.synthetic import make_problem


def checksum(*arrays):
    cp.cuda.Device().synchronize()
    return " ".join(f"{float(a.astype(cp.float32).sum()):.4g}" for a in arrays)


def main():
    hopper = cp.cuda.Device().compute_capability == "90"
    for dtype in ("bfloat16", "float16", "float32"):
        for d in (256, 200):
            gates = ["cublas"] if dtype == "float32" or d % 8 else ["cublas", "fused"]
            for m in (1, 3, 37, 700):                  # fused decode, small batch (twice), sparse path
                p = make_problem(m, d, 160, mean_active=30.0, kind="token_skew", dtype=dtype, seed=1, xp=cp)
                x, wg, wu, wd = p.arrays()
                for gate in gates:
                    for gated in (True, False):
                        f = twell.gated_ffn if gated else (lambda x, wg, wu, wd, **kw: twell.ffn(x, wu, wd, **kw))
                        y = f(x, wg, wu, wd, dense_row_threshold=35, tile_width=32, compression=4,
                              gate_kernel=gate)
                        yd = f(x, wg, wu, wd, path="dense")
                        ys = []
                        if m > 512:                     # the backup sized on the device: a tracker that
                            for observed in (0, 100):   # saw none (rows past the capacity) and many
                                tr = twell.DensityTracker(35)
                                tr.observe_sparse(m, 10 * m, observed)
                                ys.append(f(x, wg, wu, wd, dense_row_threshold=35, tile_width=32, compression=4,
                                            gate_kernel=gate, path="sparse", tracker=tr))
                        print(dtype, d, "M", m, gate, "gated" if gated else "ffn", checksum(y, yd, *ys), flush=True)
            p = make_problem(700, d, 160, mean_active=30.0, kind="token_skew", dtype=dtype, seed=1, xp=cp)
            x, wg, wu, wd = p.arrays()
            g = twell.pack_twell(pack.relu_keep_nan(blas.gemm(x, wg, trans_b=True)), tile_width=32, compression=4,
                                 dense_row_threshold=35)
            print(dtype, d, "user TwELL", checksum(twell.gated_up_down(x, g, wu, wd), twell.down_projection(g, wd)),
                  flush=True)
            dy = make_dy(p, 0)
            for gate in gates:
                for presize in (64 << 20, 0):
                    y, saved, stats, _ = training.sparse_forward(x, wg, wu, wd, l1_weight=1e-3, threshold=35,
                                                                 gate_kernel=gate, presize_max_bytes=presize)
                    grads = twell.gated_ffn_backward(saved, dy)
                    print(dtype, d, "train", stats.gate_kernel, "presized" if presize else "sized first",
                          "backup rows", stats.n_backup_rows, "max neuron count", int(stats.neuron_counts.max()),
                          checksum(y, *grads), flush=True)
            y, saved, stats = twell.gated_ffn_forward(x, wg, wu, wd, l1_weight=1e-3, path="dense")
            print(dtype, d, "train dense", checksum(y, *twell.gated_ffn_backward(saved, dy)), flush=True)
    if hopper:                                          # the Hopper gate kernel with both cluster sizes
        p = make_problem(700, 256, 600, mean_active=30.0, dtype="bfloat16", seed=2, xp=cp)
        for cluster in gate_gemm.WGMMA_CLUSTERS:
            t = gate_gemm.gate_twell_async(p.x, p.w_gate, 256, 8, 128, kernel="wgmma", cluster=cluster)
            print("wgmma cluster", cluster, checksum(t.values, t.row_nnz), flush=True)


if __name__ == "__main__":
    main()
