"""The Relax passes: finding dense layers, pruning them, rewriting them to our kernels."""

import numpy as np
import pytest
import tvm
from helpers import (
    assert_whole_groups,
    gemm_transb0_mlp,
    make_model,
    grouped_sparse_bytes,
    mlp_ref,
    onnx_dense_layers,
    ort_run,
    ref_prune,
    rel_err,
    vm_run,
    zero_fraction,
)
from onnx import helper, numpy_helper
from tvm import relax

from tvm_scalpel import models, prune_onnx
from tvm_scalpel.onnx_io import to_relax
from tvm_scalpel.passes import (
    PruneWeightGroups,
    RewriteDenseLayers,
    find_dense_layers,
    scalpel_pipeline,
)
from tvm_scalpel.targets import host_target

SIZES = [97, 203, 50, 13]  # odd widths, none a multiple of the SIMD width
LAYOUTS = ["gemm", "gemm_transb0", "matmul"]


def build_model(layout: str, seed: int = 7):
    if layout == "gemm_transb0":
        return gemm_transb0_mlp(SIZES, seed)
    return models.mlp(SIZES, seed=seed, layout=layout)


@pytest.fixture(scope="module", params=LAYOUTS)
def layout_model(request):
    return request.param, build_model(request.param)


def matmul_ops(mod: tvm.IRModule) -> int:
    """How many relax.matmul calls are left in the module's Relax functions."""
    count = 0

    def visit(expr):
        nonlocal count
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.matmul":
            count += 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return count


# --------------------------------------------------------------------------- find_dense_layers


def test_find_dense_layers(layout_model):
    layout, model = layout_model
    expected = onnx_dense_layers(model)
    layers = find_dense_layers(to_relax(model)["main"])
    assert len(layers) == len(SIZES) - 1
    for i, (layer, ref) in enumerate(zip(layers, expected)):
        assert layer.index == i
        assert layer.shape == (SIZES[i + 1], SIZES[i])
        assert layer.weight.dtype == np.float32
        np.testing.assert_array_equal(layer.weight, ref["w"])  # oriented [N, K]
        np.testing.assert_array_equal(layer.bias, ref["bias"])  # bias fused
        assert layer.relu == (i < len(SIZES) - 2)  # ReLU fused, none after the last layer
        assert layer.transposed == (layout == "gemm")  # only Gemm(transB=1) holds [N, K]
        assert len(layer.fused) == 1 + layer.relu


def test_find_dense_layers_without_bias_or_relu(rng):
    w = rng.standard_normal((12, 30)).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)],
                       [numpy_helper.from_array(w, "W")], [("x", ["N", 30])], [("y", ["N", 12])])
    (layer,) = find_dense_layers(to_relax(model)["main"])
    assert layer.bias is None and not layer.relu
    np.testing.assert_array_equal(layer.weight, w)


# --------------------------------------------------------------------------- PruneWeightGroups


@pytest.mark.parametrize("rate,g,importance", [(0.9, 16, "rms"), (0.6, 4, "max"), (0.75, 8, "mean")])
def test_prune_weight_groups(layout_model, rate, g, importance):
    _, model = layout_model
    mod = to_relax(model)
    original = [layer.weight.copy() for layer in find_dense_layers(mod["main"])]
    report = []
    pruned_mod = PruneWeightGroups(rate, g, importance, report=report)(mod)

    assert [r.index for r in report] == [0, 1, 2]
    after = find_dense_layers(pruned_mod["main"])
    for r, layer, w in zip(report, after, original):
        assert r.shape == w.shape and r.group_width == g
        np.testing.assert_array_equal(r.original, w)
        np.testing.assert_array_equal(layer.weight, r.pruned)  # the module holds the pruned weight
        ref_weight, _ = ref_prune(w, g, rate, importance)
        np.testing.assert_array_equal(r.pruned, ref_weight)
        assert_whole_groups(r.pruned, g)
        assert r.rate == pytest.approx(zero_fraction(r.pruned))
        assert abs(r.rate - rate) <= 0.03
        assert r.dense_bytes == w.size * 4
        assert r.sparse_bytes == grouped_sparse_bytes(r.pruned, g)
    # the pass is functional: the input module still holds the original weights
    for layer, w in zip(find_dense_layers(mod["main"]), original):
        np.testing.assert_array_equal(layer.weight, w)


def test_prune_weight_groups_per_layer_rates():
    mod = to_relax(build_model("gemm"))
    report = []
    pruned_mod = PruneWeightGroups({1: 0.8}, 8, report=report)(mod)
    assert [r.index for r in report] == [1]
    before, after = find_dense_layers(mod["main"]), find_dense_layers(pruned_mod["main"])
    np.testing.assert_array_equal(after[0].weight, before[0].weight)
    np.testing.assert_array_equal(after[2].weight, before[2].weight)
    assert abs(zero_fraction(after[1].weight) - 0.8) <= 0.03
    assert_whole_groups(after[1].weight, 8)


# --------------------------------------------------------------------------- RewriteDenseLayers


@pytest.fixture(scope="module", params=["gemm", "matmul"])
def pruned_model(request):
    """A model pruned to 90% with g = 8, as a standard ONNX file would hold it."""
    return prune_onnx(build_model(request.param, seed=19), 0.9, group_width=8).model


@pytest.mark.parametrize("mode", ["auto", "sparse", "dense"])
def test_rewrite_dense_layers_matches_onnxruntime(pruned_model, host, rng, mode):
    mod = to_relax(pruned_model)
    report = []
    rewritten = RewriteDenseLayers(host, mode=mode, report=report)(mod)
    assert matmul_ops(mod) == 3 and matmul_ops(rewritten) == 0  # every layer went to our kernels

    assert len(report) == 3
    for d in report:
        assert d.density == pytest.approx(0.1, abs=0.03)
        if mode == "dense":
            assert d.kernel == "dense"
        elif mode == "sparse":
            assert d.kernel == "grouped-sparse" and d.group_width == 8
        else:
            assert d.kernel == ("grouped-sparse" if d.estimated_speedup > 1.0 else "dense")

    exe = tvm.compile(rewritten, target=host.target)
    x = rng.standard_normal((6, SIZES[0])).astype(np.float32)
    assert rel_err(vm_run(exe, x), ort_run(pruned_model, x)) < 1e-4


def test_rewrite_unstructured_weights_as_csr(host, rng):
    """g = 1 (traditional pruning): sparse mode runs the g = 1 kernel, auto keeps it dense."""
    model = prune_onnx(build_model("gemm", seed=23), 0.9, group_width=1).model
    mod = to_relax(model)
    for mode, kernel in [("sparse", "grouped-sparse"), ("auto", "dense")]:
        report = []
        exe = tvm.compile(RewriteDenseLayers(host, mode=mode, report=report)(mod), target=host.target)
        assert [(d.kernel, d.group_width) for d in report] == [(kernel, 1)] * 3
        x = rng.standard_normal((3, SIZES[0])).astype(np.float32)
        assert rel_err(vm_run(exe, x), ort_run(model, x)) < 1e-4


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("group_width,importance", [(None, "rms"), (4, "max")])
def test_scalpel_pipeline_in_tvm_compile(host, rng, group_width, importance):
    model = build_model("matmul", seed=29)
    mod = to_relax(model)
    target = host_target()
    exe = tvm.compile(mod, target, relax_pipeline=scalpel_pipeline(
        target, rate=0.9, group_width=group_width, importance=importance))
    g = group_width or host.simd_width
    layers = [{"w": ref_prune(layer["w"], g, 0.9, importance)[0], "bias": layer["bias"]}
              for layer in onnx_dense_layers(model)]
    for batch in (1, 9):
        x = rng.standard_normal((batch, SIZES[0])).astype(np.float32)
        assert rel_err(vm_run(exe, x), mlp_ref(layers, x)) < 1e-4


def test_passes_compose_in_sequential(host, rng):
    model = build_model("gemm_transb0", seed=31)
    seq = tvm.transform.Sequential([
        PruneWeightGroups(0.8, 8, "mean"),
        RewriteDenseLayers(host, mode="sparse"),
    ])
    rewritten = seq(to_relax(model))
    assert matmul_ops(rewritten) == 0
    exe = tvm.compile(rewritten, target=host.target)
    layers = [{"w": ref_prune(layer["w"], 8, 0.8, "mean")[0], "bias": layer["bias"]}
              for layer in onnx_dense_layers(model)]
    x = rng.standard_normal((11, SIZES[0])).astype(np.float32)
    assert rel_err(vm_run(exe, x), mlp_ref(layers, x)) < 1e-4
