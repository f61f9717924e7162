"""CPU tests of the launch geometry helpers (no GPU: a fake kernel records the launch)."""

from __future__ import annotations

import pytest

pytest.importorskip("cupy")

from twell.kernels import common  # noqa: E402


class FakeKernel:
    def __init__(self, num_regs):
        self.num_regs = num_regs
        self.calls = []

    def __call__(self, grid, block, args, **kw):
        self.calls.append((grid, block, args))


@pytest.mark.parametrize("regs, m, want_blocks", [
    (168, 16384, 3 * 132),   # 12 warps per SM by registers -> 3 CTAs of 4 warps
    (40, 16384, 12 * 132),   # registers allow 51 warps -> 12 CTAs (shared memory would allow 13)
    (168, 10, 3),            # never more warps than rows
])
def test_launch_warp_rows_grid(monkeypatch, regs, m, want_blocks):
    monkeypatch.setattr(common, "sm_count", lambda: 132)
    k = FakeKernel(regs)
    counter = object()
    common.launch_warp_rows(k, m, common.MAX_LIST * 8, ("a", "b"), counter)
    (grid, block, args), = k.calls
    assert block == (32 * common.WARP_KERNEL_WARPS,)
    assert args == ("a", "b", counter)
    assert grid == (want_blocks,)


def test_choose_splits():
    assert common.choose_splits(20000, 132) == 1
    assert common.choose_splits(1, 132) == 32
    assert common.choose_splits(64, 132) == 17


def test_warp_path_only_for_16bit_multiples_of_256():
    import numpy as np
    assert common.warp_path_nc(np.dtype("float32"), 2048) == 0
    assert common.warp_path_nc(np.dtype("float16"), 2048) == 8
    assert common.warp_path_nc(np.dtype("float16"), 2304) == 0
    assert common.warp_path_nc(np.dtype("float16"), 200) == 0


def _driver_launch_example():
    import numpy as np
    from types import SimpleNamespace

    from twell.runtime.launch import NULL, SLOT, DriverLaunch, i32
    struct = np.frombuffer(bytes(range(128)), dtype=np.dtype((np.void, 128)))   # a by-value CUtensorMap
    fixed = SimpleNamespace(data=SimpleNamespace(ptr=0x7000_0000_1000))          # a device array
    kernel = SimpleNamespace(kernel=SimpleNamespace(ptr=0x1234))
    args = (struct, i32(-5), SLOT, NULL, fixed, SLOT, np.uint64(2**63 + 7))
    return DriverLaunch(kernel, (33,), (384,), 4096, args)


def test_driver_launch_parameter_buffer():
    """Each parameter's bytes as cuLaunchKernel reads them: structs copied, int32 / 64-bit scalars,
    fixed array pointers, and the SLOT pointers set per launch, in argument order."""
    import struct as st
    launch = _driver_launch_example()
    got = launch.parameter_bytes(0xAAAA_0000, 0xBBBB_0008)
    assert got[0] == bytes(range(128))
    assert got[1] == st.pack("<i", -5)
    assert got[2] == st.pack("<Q", 0xAAAA_0000)
    assert got[3] == st.pack("<Q", 0)
    assert got[4] == st.pack("<Q", 0x7000_0000_1000)
    assert got[5] == st.pack("<Q", 0xBBBB_0008)
    assert got[6] == st.pack("<Q", 2**63 + 7)
    assert launch.parameter_bytes(1, 2)[2] == st.pack("<Q", 1)          # the next launch's pointers
    with pytest.raises(TypeError, match="2 slot pointers, got 1"):
        launch.parameter_bytes(1)
    from types import SimpleNamespace

    from twell.runtime.launch import DriverLaunch
    with pytest.raises(TypeError, match="cannot pass an argument of type float"):
        DriverLaunch(SimpleNamespace(kernel=SimpleNamespace(ptr=1)), (1,), (32,), 0, (1.5,))


def test_driver_launch_call(monkeypatch):
    """The call passes function, grid, block, shared memory, stream and the parameter array to
    cuLaunchKernel, and a non-zero CUresult raises."""
    import ctypes

    from twell.runtime.launch import DriverLaunch
    launch = _driver_launch_example()
    calls = []

    def fake(func, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        calls.append((func.value, (gx, gy, gz), (bx, by, bz), smem, stream, extra))
        p = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        calls.append(ctypes.c_uint64.from_address(p[2]).value)
        return len(calls) // 2 - 1             # 0 on the first call, 1 (an error) on the second

    monkeypatch.setattr(DriverLaunch, "_fn", fake)
    launch(0x55, 0xA0, 0xB0)
    assert calls[0] == (0x1234, (33, 1, 1), (384, 1, 1), 4096, 0x55, None)
    assert calls[1] == 0xA0
    with pytest.raises(RuntimeError, match="CUresult 1"):
        launch(0, 0xA0, 0xB0)
