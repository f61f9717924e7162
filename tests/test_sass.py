"""Disassembly check of the fused gate GEMM kernels (NVRTC compile + nvdisasm; no GPU needed).

nvdisasm comes with the ``cuda13`` extra (``cuda-toolkit[nvdisasm]``); the CUDA 12 toolkit wheels have no
such extra, so there the test skips with a reason.  CI (cuda13) fails if it skips.
"""

from __future__ import annotations

import pytest

from twell.kernels import gate_gemm
from twell.runtime import loader

pytest.importorskip("cupy", reason="the compile check needs CuPy and the NVRTC wheel (pip install .[cuda13])")


@pytest.mark.compile
def test_gate_gemm_sass_uses_tensor_cores_without_local_memory():
    """Disassembly check of the fused gate GEMM: the Hopper kernel issues wgmma (HGMMA) with TMA loads
    (UTMALDG), the portable one mma.sync (HMMA); neither touches local memory (LDL/STL)."""
    if loader.find_nvdisasm() is None:
        pytest.skip("nvdisasm not found (pip install 'cuda-toolkit[nvdisasm]', part of the cuda13 extra)")
    sass = loader.disassemble(gate_gemm.FAMILY, arch="sm_90a")
    assert sass, "no kernel disassembled"
    for expr, text in sass.items():
        assert "LDL" not in text and "STL" not in text, f"{expr}: local memory in SASS"
        if expr.startswith("gate_twell_wgmma<"):
            assert text.count("HGMMA.64x256x16.F32") == 4, f"{expr}: expected 4 wgmma per k-step"
            assert "UTMALDG.2D" in text, f"{expr}: no TMA load"
            assert "HMMA" not in text, f"{expr}: fell back to mma.sync"
        else:
            assert "HMMA.16816.F32" in text and "HGMMA" not in text, f"{expr}: expected mma.sync"
