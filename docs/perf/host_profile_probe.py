"""Host-time profile (cProfile, by own time) of three calls: the inference op on the dense path (M 16,384, mean 512,
with a DensityTracker), the decode op on CuPy arrays (M 1) and through twell.torch (M 1).

    PYTHONPATH=. python docs/perf/host_profile_probe.py
"""
import cProfile
import io
import pstats

import cupy as cp
import numpy as np

import twell
from twell.synthetic import make_problem


def prof(name, fn, calls, sync):
    for _ in range(30):
        fn()
    sync()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
        sync()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s).sort_stats("tottime")
    st.print_stats(28)
    print(f"===== {name}: {calls} calls\n" + "\n".join(s.getvalue().splitlines()[:48]), flush=True)


p = make_problem(16384, mean_active=512.0, kind="uniform", dtype="bfloat16", seed=0, xp=cp)
a = p.arrays()
tr = twell.DensityTracker()
y = cp.empty_like(a[0])
sync = cp.cuda.Device().synchronize
prof("dense path via tracker, M 16384 mean 512", lambda: twell.gated_ffn(*a, tracker=tr, out=y), 100, sync)
print(repr(tr))
p1 = make_problem(1, mean_active=29.0, kind="uniform", dtype="bfloat16", seed=0, xp=np)
host = [np.ascontiguousarray(v) for v in p1.arrays()]
a1 = [cp.asarray(v) for v in host]
prof("decode M 1 (cupy)", lambda: twell.gated_ffn(*a1), 2000, lambda: None)
import torch  # noqa: E402

import twell.torch as tt  # noqa: E402

t1 = [torch.from_numpy(v.view(np.int16)).view(torch.bfloat16).cuda() for v in host]
with torch.no_grad():
    prof("decode M 1 (torch)", lambda: tt.gated_ffn(*t1), 2000, lambda: None)
