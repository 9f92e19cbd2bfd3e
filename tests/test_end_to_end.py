"""prune_onnx -> compile_onnx -> run, on models the project has not seen, against onnxruntime."""

import numpy as np
import onnx
import pytest
import tvm
from helpers import (
    assert_whole_groups,
    cpu_has_avx512f,
    onnx_dense_layers,
    ort_run,
    rel_err,
    vm_run,
    zero_fraction,
)
from tvm import relax

from tvm_scalpel import (
    ScalpelError,
    compile_onnx,
    export_library,
    load_library,
    models,
    prune_onnx,
    resolve_target,
)
from tvm_scalpel.api import run_library
from tvm_scalpel.onnx_io import save_onnx

SIZES = [97, 203, 50, 13]
RATE = {"gemm": 0.9, "matmul": 0.75}


@pytest.fixture(scope="module", params=["gemm", "matmul"])
def flow(request):
    """One model per layout (symbolic batch N), pruned with the default g, then compiled."""
    layout = request.param
    model = models.mlp(SIZES, seed=101, layout=layout, batch="N")
    pruned = prune_onnx(model, RATE[layout])  # no group_width: the host's SIMD width
    compiled = compile_onnx(pruned.model)
    return layout, model, pruned, compiled


@pytest.mark.parametrize("batch", [1, 5, 16, 17])
def test_compiled_model_matches_onnxruntime(flow, rng, batch):
    _, _, pruned, compiled = flow
    x = rng.standard_normal((batch, SIZES[0])).astype(np.float32)
    y = vm_run(compiled.executable, x)
    assert y.shape == (batch, SIZES[-1])
    assert rel_err(y, ort_run(pruned.model, x)) < 1e-4


def test_default_group_width_is_host_simd_width(flow, host):
    _, _, pruned, compiled = flow
    assert [layer.group_width for layer in pruned.layers] == [host.simd_width] * 3
    if cpu_has_avx512f():
        assert host.simd_width == 16
    # the compiler recovers g from the zeros alone
    assert [d.group_width for d in compiled.layers] == [host.simd_width] * 3
    assert all(d.kernel == "grouped-sparse" for d in compiled.layers)


def test_written_onnx_holds_whole_groups(flow, host, tmp_path):
    layout, model, pruned, _ = flow
    path = tmp_path / "pruned.onnx"
    save_onnx(pruned.model, path)
    written = onnx.load(str(path))
    assert written.ir_version <= 13
    onnx.checker.check_model(written)
    assert sorted(pruned.initializer_names.values()) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    for before, after in zip(onnx_dense_layers(model), onnx_dense_layers(written)):
        assert after["w"].shape == before["w"].shape
        assert_whole_groups(after["w"], host.simd_width)
        assert abs(zero_fraction(after["w"]) - RATE[layout]) <= 0.03
        kept = after["w"] != 0
        np.testing.assert_array_equal(after["w"][kept], before["w"][kept])
        np.testing.assert_array_equal(after["bias"], before["bias"])


def test_exported_library_runs(flow, rng, tmp_path):
    """The README snippet: load_module + VirtualMachine(lib, cpu)["main"](x)."""
    _, _, pruned, compiled = flow
    path = tmp_path / "model.so"
    export_library(compiled.executable, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.so"]
    lib = tvm.runtime.load_module(str(path))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    x = rng.standard_normal((3, SIZES[0])).astype(np.float32)
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = ort_run(pruned.model, x)
    assert rel_err(y, ref) < 1e-4
    assert rel_err(run_library(load_library(path), x), ref) < 1e-4


@pytest.mark.parametrize("layout,g,importance", [("gemm", 4, "max"), ("matmul", 8, "mean")])
def test_static_batch_explicit_group_width(rng, layout, g, importance):
    model = models.mlp([61, 37, 29], seed=202, layout=layout, batch=7)
    pruned = prune_onnx(model, 0.8, group_width=g, importance=importance)
    for layer in onnx_dense_layers(pruned.model):
        assert_whole_groups(layer["w"], g)
        assert abs(zero_fraction(layer["w"]) - 0.8) <= 0.03
    compiled = compile_onnx(pruned.model, mode="sparse")
    assert [d.group_width for d in compiled.layers] == [g, g]
    x = rng.standard_normal((7, 61)).astype(np.float32)
    assert rel_err(vm_run(compiled.executable, x), ort_run(pruned.model, x)) < 1e-4


def test_unpruned_model_compiles_dense(rng):
    model = models.mlp([45, 33, 10], seed=303)
    compiled = compile_onnx(model)
    assert [d.kernel for d in compiled.layers] == ["dense", "dense"]
    x = rng.standard_normal((4, 45)).astype(np.float32)
    assert rel_err(vm_run(compiled.executable, x), ort_run(model, x)) < 1e-4


@pytest.mark.parametrize("cpu", [None, "haswell", "skylake-avx512"])
def test_narrow_layer_gets_whole_row_groups(rng, host, cpu):
    """A layer with fewer inputs than the SIMD width is pruned in groups of its whole row: on
    the host, and pruned for pinned AVX2 / AVX-512 targets (then compiled for the host)."""
    profile = host if cpu is None else resolve_target(
        '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "%s"}' % cpu)
    narrow = profile.simd_width - 5  # 3 on AVX2, 11 on AVX-512
    model = models.mlp([40, narrow, 120], seed=404)
    pruned = prune_onnx(model, 0.5, target=profile)
    assert [layer.group_width for layer in pruned.layers] == [profile.simd_width, narrow]
    w = onnx_dense_layers(pruned.model)[1]["w"]
    assert_whole_groups(w, narrow)
    assert abs(zero_fraction(w) - 0.5) <= 0.5 / narrow + 0.03  # whole rows of a few weights
    compiled = compile_onnx(pruned.model, mode="sparse")
    x = rng.standard_normal((5, 40)).astype(np.float32)
    assert rel_err(vm_run(compiled.executable, x), ort_run(pruned.model, x)) < 1e-4


@pytest.mark.parametrize("kwargs", [{"rate": 1.0}, {"rate": -0.5}, {"rate": 0.5, "group_width": 0},
                                    {"rate": 0.5, "importance": "median"}, {"rate": 0.5, "target": "nonsense"}])
def test_prune_onnx_rejects_bad_arguments(kwargs):
    with pytest.raises(ScalpelError):
        prune_onnx(models.mlp([20, 10], seed=1), **kwargs)
