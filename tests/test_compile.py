"""NVRTC-only compile of every kernel family for sm_90a (needs no GPU; runs in CI).

Prints registers / stack / spills per kernel; fails on spills in a family's hot kernels.
"""

from __future__ import annotations

import re

import pytest

from twell.kernels import FAMILIES as _FAMILIES
from twell.runtime import loader

pytest.importorskip("cupy", reason="the compile check needs CuPy and the NVRTC wheel (pip install .[cuda13])")

FAMILIES = {f.name: f for f in _FAMILIES}


def test_private_cupy_compiler_api_exists():
    import cupy._core.core as core
    from cupy.cuda import compiler

    assert hasattr(core, "assemble_cupy_compiler_options")
    assert hasattr(compiler, "_NVRTCProgram")


def test_every_family_is_listed():
    src = loader.cuda_src_dir()
    on_disk = sorted(p.stem for p in src.glob("*.cu"))
    assert on_disk == sorted(FAMILIES), f"every cuda_src/*.cu must be a family of twell.kernels.FAMILIES: {on_disk}"


@pytest.mark.compile
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nvrtc_compiles_family_for_sm90a(family, capsys):
    fam = FAMILIES[family]
    report = loader.nvrtc_compile(fam, arch="sm_90a")
    compiled = {r.name_expression for r in report}
    missing = set(fam.name_expressions) - compiled
    assert not missing, f"name expressions with no compiled kernel: {sorted(missing)}"
    with capsys.disabled():
        print(f"\n[{family}] {len(report)} kernels for sm_90a")
        for r in sorted(report, key=lambda r: r.name_expression):
            print(f"  {r.name_expression:70s} regs={r.registers:3d} stack={r.stack_bytes:4d} "
                  f"spill_st={r.spill_stores:4d} spill_ld={r.spill_loads:4d} smem={r.shared_bytes}")
    hot = [r for r in report if any(re.match(p, r.name_expression) for p in fam.hot_kernels)]
    assert not fam.hot_kernels or hot, f"{family}: hot-kernel patterns match nothing"
    spilling = [r.name_expression for r in hot if r.spill_stores or r.spill_loads]
    assert not spilling, f"hot kernels spill to local memory: {spilling}"


def test_headers_are_inlined():
    for family in FAMILIES.values():
        text = loader.family_source(family)
        assert '#include "' not in text, f"{family}: a local header was not inlined"


def test_cubin_text_sections_rejects_non_elf():
    with pytest.raises(ValueError, match="ELF64"):
        loader.cubin_text_sections(b"not a cubin")
