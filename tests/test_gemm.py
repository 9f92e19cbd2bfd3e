"""The panel-packed dense GEMM kernel (FC layers): numerics against numpy float64 over odd
shapes, tails, K blocks and batches on one compiled (symbolic-batch) function; its code on
pinned targets (compile only); and whole models through compile_onnx against onnxruntime."""

import dataclasses
import re

import numpy as np
import pytest
import tvm
from helpers import build_primfunc, dense_ref, ort_run, rel_err, tensors, vm_run

from tvm_scalpel import compile_onnx, schedules
from tvm_scalpel.models import mlp
from tvm_scalpel.schedules import CpuKnobs, LayerSpec, cpu_kernels
from tvm_scalpel.schedules.spec import pack_dense_panels
from tvm_scalpel.targets import resolve_target

BATCHES = [1, 2, 7, 16, 17]
# (N, K): N below, at and above one panel with a partial last panel; K below a vector, odd,
# and above one K block with a partial last block (gemm_kc 64 below forces several blocks)
SHAPES = [(3, 5), (16, 8), (21, 37), (45, 131), (70, 300)]
KNOBS = {
    "serial": CpuKnobs(),
    "parallel": CpuKnobs(parallel_gemv=True),
    "parallel-from-tile": CpuKnobs(parallel_gemm=True),
    "kblocks": CpuKnobs(parallel_gemm=True, gemm_kc=64),
    "rows3-kblocks": CpuKnobs(gemm_rows=3, gemm_kc=100),
}


def packed_spec(profile, n, k, relu, knobs):
    spec = schedules.layer_spec(profile, n, k, relu, knobs=knobs, packed=True)
    assert spec.panel == cpu_kernels.gemm_tile(spec.lanes)[1] * spec.lanes
    return spec


def test_pack_dense_panels_layout(rng):
    w = rng.standard_normal((21, 5)).astype(np.float32)
    b = rng.standard_normal(21).astype(np.float32)
    p, bp = pack_dense_panels(w, b, 8)
    assert p.shape == (3, 5, 8) and bp.shape == (24,)
    for n in range(21):
        np.testing.assert_array_equal(p[n // 8, :, n % 8], w[n])
    assert not p[2, :, 5:].any() and not bp[21:].any()  # the padding of the last panel


@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
@pytest.mark.parametrize("n,k", SHAPES)
def test_panel_gemm_matches_numpy(host, rng, n, k, knobs):
    relu = n > 3  # 3 outputs at batch 1 could all be clipped: nothing would be compared
    spec = packed_spec(host, n, k, relu, knobs)
    fn = build_primfunc(schedules.kernel(host, [spec]), host.target)  # one function, any batch
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    operands = schedules.pack_dense(spec, w, bias)
    for batch in BATCHES:
        x = rng.standard_normal((batch, k)).astype(np.float32)
        y = np.full((batch, n), np.nan, np.float32)  # every output must be written
        args = tensors(x, *operands, y)
        fn(*args)
        assert rel_err(args[-1].numpy(), dense_ref(x, w, bias, relu)) < 1e-5, f"batch {batch}"


@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_panel_gemm_any_vector_width(host, rng, lanes):
    """The kernel for another vector width (NEON 4, AVX2 8, AVX-512 16) still computes the
    layer: run here (LLVM splits vectors wider than the host's)."""
    n, k = 37, 45
    nr = cpu_kernels.panel_width(lanes)
    spec = LayerSpec(n, k, True, lanes=lanes, knobs=CpuKnobs(gemm_kc=16), panel=nr)
    fn = build_primfunc(cpu_kernels.chain_kernel([spec]), host.target)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    operands = list(pack_dense_panels(w, bias, nr))
    for batch in (1, 7, 17):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        args = tensors(x, *operands, np.full((batch, n), np.nan, np.float32))
        fn(*args)
        assert rel_err(args[-1].numpy(), dense_ref(x, w, bias, True)) < 1e-5


PINNED = {
    "haswell": ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}', "ymm", 8),
    "skylake-avx512": ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}',
                       "zmm", 16),
}


@pytest.mark.parametrize("name", PINNED)
def test_panel_gemm_code_on_pinned_targets(name):
    """Compile only (AVX-512 code must not run on an AVX2 host): the hot loop of a whole
    mr x nr tile is FMAs on full vector registers, with no accumulator spilled to the stack."""
    target, reg, lanes = PINNED[name]
    profile = resolve_target(target)
    assert profile.simd_width == lanes
    spec = packed_spec(profile, 64, 512, False, CpuKnobs())
    mod = tvm.IRModule({"main": schedules.kernel(profile, [spec]).with_attr("global_symbol", "main")})
    asm = tvm.compile(mod, target=profile.target).mod.inspect_source("asm")
    lines = [ln.strip() for ln in asm.splitlines() if ln.strip() and not ln.strip().startswith((".loc", "#", ".cfi"))]
    mr, vectors = cpu_kernels.gemm_tile(lanes)
    # the basic block with the most FMAs: the unrolled k loop of the mr x nr micro-kernel
    blocks, current = [], []
    for ln in lines:
        if re.match(r"^\.LBB\d+_\d+:", ln):
            blocks.append(current)
            current = []
        elif not ln.startswith(".Ltmp"):
            current.append(ln)
    blocks.append(current)
    hot = max(blocks, key=lambda b: sum("vfmadd" in ln for ln in b))
    fmas = [ln for ln in hot if "vfmadd" in ln and "ps" in ln.split()[0]]
    assert len(fmas) >= mr * vectors, hot
    assert all(f"%{reg}" in ln for ln in fmas), fmas
    stores = [ln for ln in hot if ln.startswith("vmov") and re.search(r",\s*-?\d*\(%r[sb]p\)$", ln)]
    assert not stores, f"accumulators spilled: {stores}"


@pytest.mark.parametrize("fuse", [True, False], ids=["chained", "per-layer"])
def test_models_any_batch_against_onnxruntime(rng, fuse):
    """A compiled model takes any batch; FuseDenseChains still chains the packed layers."""
    model = mlp([300, 70, 45, 10], seed=3)
    outcome = compile_onnx(model, fuse=fuse)
    assert all(d.kernel == "dense" for d in outcome.layers)
    for batch in BATCHES:
        x = rng.standard_normal((batch, 300)).astype(np.float32)
        assert rel_err(vm_run(outcome.executable, x), ort_run(model, x)) < 1e-5, f"batch {batch}"


def test_fused_chain_keeps_packed_layers():
    from tvm_scalpel.onnx_io import to_relax
    from tvm_scalpel.passes import FuseDenseChains, RewriteDenseLayers

    host = resolve_target("x86")
    mod = to_relax(mlp([300, 70, 45, 10], seed=3))
    mod = tvm.transform.Sequential([RewriteDenseLayers(host), FuseDenseChains(host)])(mod)
    chains = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("scalpel_chain")]
    assert len(chains) == 1
    specs = [LayerSpec.from_attr(a) for a in chains[0].attrs["scalpel.layers"]]
    assert [s.n for s in specs] == [70, 45, 10]
    assert all(s.panel == cpu_kernels.panel_width(host.simd_width) for s in specs)


def test_panel_gemm_neon_code():
    """aarch64 (compile only, no toolchain needed to generate code): the dense layers' panel
    GEMM runs on NEON FMAs over 4 fp32 lanes."""
    built = compile_onnx(mlp([40, 24, 6], seed=5), "aarch64")
    assert [d.kernel for d in built.layers] == ["dense", "dense"]
    asm = built.executable.mod.imports[0].inspect_source("asm")
    assert re.search(r"fmla\s+v\d+\.4s", asm)
