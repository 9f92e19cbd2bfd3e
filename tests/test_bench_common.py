"""Benchmark results go to one folder per machine class, named from the target profile.

Targets are pinned (an AVX2 and an AVX-512 CPU by LLVM name), so the expectations hold on
whichever host runs the suite; the host's own class is checked against /proc/cpuinfo.
"""

import argparse
import sys
from pathlib import Path

import pytest
import tvm
from helpers import cpu_has_avx512f

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402  (benchmarks/common.py)

from tvm_scalpel.targets import resolve_target  # noqa: E402


def x86(mcpu: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})


@pytest.mark.parametrize("mcpu,expected", [
    ("haswell", "avx2"), ("znver3", "avx2"),
    ("skylake-avx512", "avx512"), ("sapphirerapids", "avx512"), ("znver4", "avx512"),
    ("sandybridge", "avx"), ("x86-64", "sse2"),
])
def test_machine_class_of_pinned_x86_targets(mcpu, expected):
    assert common.machine_class(x86(mcpu)) == expected
    assert common.machine_class(resolve_target(x86(mcpu))) == expected
    assert common.results_dir(x86(mcpu)) == common.RESULTS_DIR / expected
    assert common.results_dir(x86(mcpu), quick=True) == common.RESULTS_DIR / expected / "quick"


def test_machine_class_of_other_targets():
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                             "mattr": ["+neon"]})
    assert common.machine_class(arm) == "neon"
    assert common.machine_class("cuda") == "cuda"


def test_host_class_follows_the_cpu():
    host = common.machine_class()
    assert host == ("avx512" if cpu_has_avx512f() else "avx2")  # the hosts this project runs on
    assert common.machine_info()["machine class (results folder)"] == host


def test_default_output_is_the_host_class_folder():
    parser = argparse.ArgumentParser()
    common.add_timing_args(parser)
    parser.add_argument("--quick", action="store_true")
    for argv, quick in (([], False), (["--quick"], True)):
        args = parser.parse_args(argv)
        common.apply_timing_args(args)
        folder = common.RESULTS_DIR / common.machine_class()
        assert args.out_dir == (folder / "quick" if quick else folder)
    args = parser.parse_args(["--out-dir", "/tmp/elsewhere"])
    common.apply_timing_args(args)
    assert args.out_dir == Path("/tmp/elsewhere")


def test_machine_table_names_the_tvm_threads():
    from tvm_scalpel.threads import num_threads

    info = common.machine_info(resolve_target("x86"))
    assert info["TVM threads"] == str(num_threads()) and int(info["TVM threads"]) >= 1
