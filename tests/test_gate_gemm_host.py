"""Host-side logic of the fused gate GEMM launcher (no GPU): kernel selection and tensor-map encoding."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

from twell.kernels import gate_gemm


class FakeDeviceArray:
    """Just what the launcher's checks read from a CuPy array."""

    def __init__(self, shape, dtype=ml_dtypes.bfloat16, ptr=1 << 20, contiguous=True):
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.data = SimpleNamespace(ptr=ptr)
        self.flags = SimpleNamespace(c_contiguous=contiguous)
        self.device = SimpleNamespace(id=0)


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(gate_gemm, "_capability", lambda: 90)


def test_auto_runs_the_hopper_kernel_where_it_can(hopper):
    x, w = FakeDeviceArray((256, 64)), FakeDeviceArray((512, 64))
    assert gate_gemm.choose_gate_kernel("auto", x, w) == "wgmma"
    assert gate_gemm.choose_gate_kernel("cublas", x, w) == "cublas"
    x32, w32 = FakeDeviceArray((256, 64), dtype=np.float32), FakeDeviceArray((512, 64), dtype=np.float32)
    assert gate_gemm.choose_gate_kernel("auto", x32, w32) == "cublas"       # fp32: no fused kernel
    xm = FakeDeviceArray((256, 64), ptr=(1 << 20) + 8)
    assert gate_gemm.choose_gate_kernel("auto", xm, w) == "cublas"          # misaligned: cuBLAS + pack


@pytest.mark.parametrize("cc", [80, 89, 100])
def test_auto_stays_on_cublas_without_hopper(monkeypatch, cc):
    """The portable mma.sync kernel is slower than cuBLAS + pack: "auto" never picks it."""
    monkeypatch.setattr(gate_gemm, "_capability", lambda: cc)
    x, w = FakeDeviceArray((256, 64)), FakeDeviceArray((512, 64))
    assert gate_gemm.choose_gate_kernel("auto", x, w) == "cublas"


@pytest.mark.parametrize("cc, expected", [(90, "wgmma"), (89, "mma"), (80, "mma"), (100, "mma")])
def test_fused_picks_the_device_kernel(monkeypatch, cc, expected):
    monkeypatch.setattr(gate_gemm, "_capability", lambda: cc)
    x, w = FakeDeviceArray((256, 64)), FakeDeviceArray((512, 64))
    assert gate_gemm.choose_gate_kernel("fused", x, w) == expected


@pytest.mark.parametrize("x, w, why", [
    (FakeDeviceArray((256, 64), dtype=np.float32), FakeDeviceArray((512, 64), dtype=np.float32), "bfloat16 / float16"),
    (FakeDeviceArray((256, 60)), FakeDeviceArray((512, 60)), "multiple of 8"),
    (FakeDeviceArray((256, 64), ptr=(1 << 20) + 8), FakeDeviceArray((512, 64)), "16-byte aligned"),
    (FakeDeviceArray((256, 64)), FakeDeviceArray((512, 64), contiguous=False), "C-contiguous"),
])
def test_what_the_fused_kernels_cannot_run(hopper, x, w, why):
    assert gate_gemm.choose_gate_kernel("fused", x, w) == "cublas"          # "fused" falls back
    for explicit in ("wgmma", "mma"):
        with pytest.raises(ValueError, match=why):
            gate_gemm.choose_gate_kernel(explicit, x, w)


def test_wgmma_needs_hopper(monkeypatch):
    monkeypatch.setattr(gate_gemm, "_capability", lambda: 89)
    x, w = FakeDeviceArray((256, 64)), FakeDeviceArray((512, 64))
    with pytest.raises(ValueError, match="Hopper"):
        gate_gemm.choose_gate_kernel("wgmma", x, w)
    monkeypatch.setattr(gate_gemm, "_capability", lambda: 75)
    with pytest.raises(ValueError, match="below 8.0"):
        gate_gemm.choose_gate_kernel("mma", x, w)


def test_unknown_gate_kernel():
    with pytest.raises(ValueError, match="gate_kernel must be one of"):
        gate_gemm.choose_gate_kernel("tensor-cores", None, None)


def _fake_encoder(calls, rc=0):
    def encode(addr, dtype, rank, gaddr, dims, strides, box, elem, interleave, swizzle, l2, oob):
        calls.append(dict(addr=addr, dtype=dtype, rank=rank, gaddr=gaddr.value, dims=(dims[0], dims[1]),
                          stride=strides[0], box=(box[0], box[1]), elem=(elem[0], elem[1]),
                          interleave=interleave, swizzle=swizzle, l2=l2, oob=oob))
        ctypes.memset(addr, 0xAB, 128)
        return rc
    return encode


def test_tensor_map_encoding_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(gate_gemm, "_driver", lambda: _fake_encoder(calls))
    a = FakeDeviceArray((300, 72), dtype=np.float16, ptr=0x7F0000)
    tm = gate_gemm.encode_tensor_map(a, 128)
    assert tm.dtype.itemsize == 128 and tm.shape == (1,)           # passed to the kernel by value
    assert bytes(tm.tobytes()) == b"\xab" * 128
    (c,) = calls
    assert c["addr"] % 128 == 0                                     # CUtensorMap is 128-byte aligned
    assert c["dtype"] == 6 and c["rank"] == 2 and c["gaddr"] == 0x7F0000   # FLOAT16
    assert c["dims"] == (72, 300) and c["stride"] == 72 * 2        # innermost first, strides in bytes
    assert c["box"] == (gate_gemm.WGMMA_BK, 128) and c["elem"] == (1, 1)
    assert (c["interleave"], c["swizzle"], c["l2"], c["oob"]) == (0, 3, 3, 0)   # 128B swizzle, zero fill


def test_tensor_map_encoding_failure_is_reported(monkeypatch):
    monkeypatch.setattr(gate_gemm, "_driver", lambda: _fake_encoder([], rc=1))
    with pytest.raises(RuntimeError, match="cuTensorMapEncodeTiled failed with CUresult 1"):
        gate_gemm.encode_tensor_map(FakeDeviceArray((64, 64)), 128)


def test_shared_memory_budget_fits_the_h200():
    assert gate_gemm.WGMMA_SMEM <= 232448                           # 227 KiB opt-in per block on sm_90
    assert gate_gemm.MMA_SMEM >= gate_gemm.BLOCK_M * (gate_gemm.BLOCK_N + 8) * 2   # the staged tile fits


def test_no_fully_fused_forward_variants():
    """The fully fused forward (gather warps inside the GEMM kernel) measured no faster and was removed
    (docs/performance-history.md, v6 and v21): every Hopper variant is the GEMM -> TwELL kernel alone."""
    names = gate_gemm.FAMILY.name_expressions
    assert len(names) == 26
    assert all(n.count(",") == 3 for n in names if n.startswith("gate_twell_wgmma<"))
    assert not hasattr(gate_gemm, "FUSED_FORWARD")
