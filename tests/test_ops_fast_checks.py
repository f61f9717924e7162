"""The GPU ops' fast argument check (``twell.ops.fast_cupy_args``) on stand-in device arrays (no GPU):
it must accept exactly the common valid case and hand everything else to the full checks, which raise
the precise error.  Also the memoized dtype -> C++ type lookup of the launchers."""

from __future__ import annotations

from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

from twell import _backend as B
from twell import ops
from twell.runtime.launch import ctype_of


class FakeNdarray:
    """What the fast check reads from a CuPy array."""

    def __init__(self, shape, dtype=ml_dtypes.bfloat16, contiguous=True, device=0, ptr=1 << 20):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype)
        self.flags = SimpleNamespace(c_contiguous=contiguous)
        self.device = SimpleNamespace(id=device)
        self.data = SimpleNamespace(device_id=device, ptr=ptr)


@pytest.fixture
def fake_cupy(monkeypatch):
    runtime = SimpleNamespace(getDevice=lambda: 0)
    mod = SimpleNamespace(ndarray=FakeNdarray, cuda=SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(B, "cupy_or_none", lambda: mod)
    return mod


def _args(**over):
    m, d, n = 64, 32, 100
    x = over.pop("x", FakeNdarray((m, d)))
    w = {"w_gate": FakeNdarray((n, d)), "w_up": FakeNdarray((n, d)), "w_down": FakeNdarray((n, d))}
    w.update(over)
    return x, w


def test_fast_check_accepts_the_common_case(fake_cupy):
    x, w = _args()
    assert ops.fast_cupy_args(x, w) == (fake_cupy, 100)
    for dt in ("float16", "float32"):
        x, w = _args(x=FakeNdarray((64, 32), dt), w_gate=FakeNdarray((100, 32), dt),
                     w_up=FakeNdarray((100, 32), dt), w_down=FakeNdarray((100, 32), dt))
        assert ops.fast_cupy_args(x, w) == (fake_cupy, 100)


@pytest.mark.parametrize("case", [
    dict(x=FakeNdarray((64,))),                                  # x not 2-D
    dict(x=FakeNdarray((0, 32))),                                # no tokens
    dict(x=FakeNdarray((64, 32), contiguous=False)),             # x not contiguous
    dict(x=FakeNdarray((64, 32), np.float64)),                   # host-only dtype
    dict(w_up=FakeNdarray((100, 32), np.float16)),               # dtype mix
    dict(w_down=FakeNdarray((32, 100))),                         # transposed weight
    dict(w_up=FakeNdarray((99, 32))),                            # n mismatch
    dict(w_gate=FakeNdarray((100, 32), contiguous=False)),       # weight not contiguous
    dict(w_down=FakeNdarray((100, 32), device=1)),               # other device
    dict(x=FakeNdarray((64, 32), device=1), w_gate=FakeNdarray((100, 32), device=1),
         w_up=FakeNdarray((100, 32), device=1), w_down=FakeNdarray((100, 32), device=1)),  # not the current device
    dict(x=FakeNdarray((64, 32), ptr=(1 << 20) + 2)),            # x 2 bytes off a 16-byte boundary
    dict(w_up=FakeNdarray((100, 32), ptr=(1 << 20) + 8)),        # a weight 8 bytes off
    dict(w_gate=np.zeros((100, 32), np.float32)),                # host array
    dict(w_gate=FakeNdarray((0, 32)), w_up=FakeNdarray((0, 32)), w_down=FakeNdarray((0, 32))),  # n = 0
])
def test_fast_check_hands_anything_else_to_the_full_checks(fake_cupy, case):
    x, w = _args(**case)
    assert ops.fast_cupy_args(x, w) is None


def test_fast_check_off_without_cupy(monkeypatch):
    monkeypatch.setattr(B, "cupy_or_none", lambda: None)
    x, w = _args()
    assert ops.fast_cupy_args(x, w) is None


@pytest.mark.parametrize("dtype, ct", [("bfloat16", "__nv_bfloat16"), ("float16", "__half"), ("float32", "float")])
def test_ctype_of_every_spelling(dtype, ct):
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    for spelling in (dtype, dt, dt, dt.type):                    # twice: the memoized path
        assert ctype_of(spelling, "x") == ct


def test_ctype_of_names_the_argument():
    with pytest.raises(TypeError, match="w_up has dtype float64"):
        ctype_of(np.float64, "w_up")
    with pytest.raises(TypeError, match="x has dtype int32"):
        ctype_of(np.dtype(np.int32), "x")
