"""Target profiles: the group width g defaults to the target's fp32 SIMD width."""

import pytest
import tvm
from helpers import cpu_has_avx512f

from tvm_scalpel import ScalpelError
from tvm_scalpel.targets import host_target, llvm_simd_width, resolve_target


def test_host_simd_width(host):
    assert host.simd_width == llvm_simd_width(host_target())
    assert host.kind == "llvm" and host.parallelism == "moderate"
    if cpu_has_avx512f():
        assert host.simd_width == 16
    assert resolve_target(None).simd_width == host.simd_width


@pytest.mark.parametrize("mcpu,lanes", [("haswell", 8), ("skylake-avx512", 16), ("nehalem", 4)])
def test_json_llvm_targets(mcpu, lanes):
    spec = f'{{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "{mcpu}"}}'
    profile = resolve_target(spec)
    assert profile.simd_width == lanes
    assert resolve_target(profile.target).simd_width == lanes
    assert resolve_target(profile) is profile


def test_c_target_is_scalar():
    profile = resolve_target('{"kind": "c"}')
    assert profile.simd_width == 1 and profile.parallelism == "low"


@pytest.mark.parametrize("spec", ["nonsense", '{"kind": "llvm"', '{"kind": "nonsense"}', "{}", "[1, 2]"])
def test_bad_targets_raise_one_line_errors(spec):
    with pytest.raises(ScalpelError) as err:
        resolve_target(spec)
    assert len(str(err.value).splitlines()) == 1


def test_target_object_is_accepted():
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    assert resolve_target(target).simd_width == 8


@pytest.mark.parametrize("name,kind,lanes,parallelism", [
    ("aarch64", "llvm", 4, "moderate"),
    ("cortex-m4", "llvm", 1, "low"),
    ("cuda", "cuda", 32, "high"),
    ("cuda:sm_90", "cuda", 32, "high"),
])
def test_named_targets(name, kind, lanes, parallelism):
    profile = resolve_target(name)
    assert (profile.kind, profile.simd_width, profile.parallelism) == (kind, lanes, parallelism)
    if name == "cuda:sm_90":
        assert str(profile.target.attrs["arch"]) == "sm_90"


def test_bad_cuda_arch_is_one_line():
    with pytest.raises(ScalpelError, match="invalid CUDA arch"):
        resolve_target("cuda:90")


def test_aarch64_kernels_use_neon_fma(rng, tmp_path):
    """Cross-compiled (no toolchain needed to generate code): NEON FMAs on 4 fp32 lanes."""
    import re

    from tvm_scalpel import compile_onnx, models, prune_onnx

    pruned = prune_onnx(models.mlp([40, 24, 6], seed=5), 0.75, "aarch64").model
    built = compile_onnx(pruned, "aarch64")
    assert [d.kernel for d in built.layers] == ["grouped-sparse", "grouped-sparse"]
    assert [d.group_width for d in built.layers] == [4, 4]
    asm = built.executable.mod.imports[0].inspect_source("asm")
    assert re.search(r"fmla\s+v\d+\.4s", asm)


def test_missing_cross_compiler_is_a_clear_error(monkeypatch):
    from tvm_scalpel import api

    monkeypatch.setattr(api.shutil, "which", lambda name: None)
    with pytest.raises(ScalpelError, match="aarch64-linux-gnu-gcc not found"):
        api.cross_linker(resolve_target("aarch64"))
    with pytest.raises(ScalpelError, match="bare-metal"):
        api.cross_linker(resolve_target("cortex-m4"))
    assert api.cross_linker(resolve_target("x86")) is None
