"""CPU tests of the launch geometry helpers (no GPU: a fake kernel records the launch)."""

from __future__ import annotations

import pytest

pytest.importorskip("cupy")

from twell.kernels import ffn_forward  # noqa: E402


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
    monkeypatch.setattr(ffn_forward, "_sm_count", lambda: 132)
    k = FakeKernel(regs)
    counter = object()
    ffn_forward.launch_warp_rows(k, m, ffn_forward.MAX_LIST * 8, ("a", "b"), counter)
    (grid, block, args), = k.calls
    assert block == (32 * ffn_forward.WARP_KERNEL_WARPS,)
    assert args == ("a", "b", counter)
    assert grid == (want_blocks,)


def test_choose_splits():
    assert ffn_forward.choose_splits(20000, 132) == 1
    assert ffn_forward.choose_splits(1, 132) == 32
    assert ffn_forward.choose_splits(64, 132) == 17


def test_warp_path_only_for_16bit_multiples_of_256():
    import numpy as np
    assert ffn_forward.warp_path_nc(np.dtype("float32"), 2048) == 0
    assert ffn_forward.warp_path_nc(np.dtype("float16"), 2048) == 8
    assert ffn_forward.warp_path_nc(np.dtype("float16"), 2304) == 0
    assert ffn_forward.warp_path_nc(np.dtype("float16"), 200) == 0
