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
