"""ISA-specific code generation, checked on any x86-64 host by compiling for explicit targets.

Nothing here runs the code it compiles (an AVX-512 kernel would fault on an AVX2 host): the
kernels are built for Haswell (AVX2, 8 fp32 lanes, ymm) and Skylake-AVX512 (16 lanes, zmm) and
their assembly is read, so both vector widths are checked wherever CI runs.
"""

import re

import numpy as np
import pytest
import tvm
from helpers import ref_prune

from tvm_scalpel import schedules
from tvm_scalpel.format import GroupedSparseMatrix
from tvm_scalpel.targets import resolve_target

# mcpu -> (fp32 lanes, the register its packed FMAs must use)
PINNED = {"haswell": (8, "ymm"), "skylake-avx512": (16, "zmm")}


def pinned(cpu: str):
    return resolve_target('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "%s"}' % cpu)


def assembly(profile, func) -> str:
    exe = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=profile.target)
    return exe.mod.inspect_source("asm")


def packed_fma_registers(asm: str) -> list[str]:
    """The destination register class (xmm/ymm/zmm) of every packed fp32 FMA."""
    return re.findall(r"\bvfmadd\d{3}ps\b[^\n]*%([xyz]mm)\d+\s*$", asm, flags=re.M)


@pytest.mark.parametrize("cpu", PINNED)
def test_profile_of_a_pinned_target(cpu):
    assert pinned(cpu).simd_width == PINNED[cpu][0]


@pytest.mark.parametrize("vectors", [1, 2, 4])
@pytest.mark.parametrize("cpu", PINNED)
def test_grouped_sparse_kernel_fmas_fill_the_targets_vectors(cpu, vectors, rng):
    """A group of g = 1, 2 or 4 vectors compiles to FMAs on whole registers of the target's
    width: zmm for AVX-512, ymm (and never zmm) for AVX2."""
    profile = pinned(cpu)
    lanes, reg = PINNED[cpu]
    g, n, k = vectors * lanes, 21, 5 * vectors * lanes + 3
    w, _ = ref_prune(rng.standard_normal((n, k)).astype(np.float32), g, 0.6)
    m = GroupedSparseMatrix.from_dense(w, g)
    asm = assembly(profile, schedules.grouped_sparse_dense(profile, n, k, g, m.n_groups, False))
    regs = packed_fma_registers(asm)
    assert regs and set(regs) == {reg}, (cpu, g, sorted(set(regs)))
    if reg != "zmm":
        assert "zmm" not in asm


@pytest.mark.parametrize("cpu", PINNED)
def test_dense_kernel_fmas_fill_the_targets_vectors(cpu):
    profile = pinned(cpu)
    lanes, reg = PINNED[cpu]
    asm = assembly(profile, schedules.dense(profile, 24, 7 * lanes + 3, relu=True))
    regs = packed_fma_registers(asm)
    assert regs and set(regs) == {reg}, (cpu, sorted(set(regs)))
    if reg != "zmm":
        assert "zmm" not in asm
