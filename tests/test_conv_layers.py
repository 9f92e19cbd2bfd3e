"""CONV layers: SIMD-aware weight pruning of the unfolded kernel, and im2col + our kernels,
checked against onnxruntime on the same ONNX model and against numpy in float64."""

import logging

import numpy as np
import onnx
import pytest
from helpers import assert_whole_groups, make_model, ort_run, rel_err, run_cli, vm_run
from onnx import helper, numpy_helper

from tvm_scalpel import compile_onnx, models, prune_onnx
from tvm_scalpel.onnx_io import to_relax
from tvm_scalpel.passes import find_conv_layers


def conv_net(rng, pads, strides, relu: bool, bias: bool = True) -> onnx.ModelProto:
    """conv(3->12, 3x3, pads, strides) [+ bias] [+ relu] -> conv(12->8, 2x2) -> flatten -> gemm."""
    w1 = (rng.standard_normal((12, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((8, 12, 2, 2)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "c1.weight"), numpy_helper.from_array(w2, "c2.weight"),
             numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "c2.bias")]
    c1_inputs = ["x", "c1.weight"]
    if bias:
        inits.append(numpy_helper.from_array((rng.standard_normal(12) * 0.1).astype(np.float32), "c1.bias"))
        c1_inputs.append("c1.bias")
    nodes = [helper.make_node("Conv", c1_inputs, ["h1"], kernel_shape=[3, 3], pads=pads, strides=strides)]
    last = "h1"
    if relu:
        nodes.append(helper.make_node("Relu", ["h1"], ["r1"]))
        last = "r1"
    nodes.append(helper.make_node("Conv", [last, "c2.weight", "c2.bias"], ["h2"], kernel_shape=[2, 2]))
    h = (11 + pads[0] + pads[2] - 3) // strides[0] + 1 - 1
    w = (13 + pads[1] + pads[3] - 3) // strides[1] + 1 - 1
    nodes.append(helper.make_node("Flatten", ["h2"], ["flat"], axis=1))
    fc = (rng.standard_normal((5, 8 * h * w)) * 0.1).astype(np.float32)
    inits.append(numpy_helper.from_array(fc, "fc.weight"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight"], ["y"], transB=1))
    return make_model(nodes, inits, [("x", ["N", 3, 11, 13])], [("y", ["N", 5])])


def conv_ref(x: np.ndarray, w: np.ndarray, bias, pads, strides) -> np.ndarray:
    """Direct convolution in float64 (independent of im2col)."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    o, _, kh, kw = w.shape
    oh = (x.shape[2] - kh) // strides[0] + 1
    ow = (x.shape[3] - kw) // strides[1] + 1
    out = np.zeros((x.shape[0], o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * strides[0]:i * strides[0] + kh, j * strides[1]:j * strides[1] + kw]
            out[:, :, i, j] = np.einsum("bchw,ochw->bo", patch, w.astype(np.float64))
    return out + (0 if bias is None else bias.reshape(1, -1, 1, 1))


@pytest.mark.parametrize("pads,strides,relu,bias", [
    ([0, 0, 0, 0], [1, 1], False, True),
    ([1, 1, 1, 1], [1, 1], True, True),
    ([1, 0, 2, 1], [2, 1], True, False),
])
def test_conv_layers_compile_to_our_kernels_and_match_onnxruntime(rng, pads, strides, relu, bias):
    model = conv_net(rng, pads, strides, relu, bias)
    layers = find_conv_layers(to_relax(model)["main"])
    assert [(layer.shape, layer.relu, layer.bias is not None) for layer in layers] == [
        ((12, 27), relu, bias), ((8, 48), False, True)]
    assert layers[0].padding == tuple(pads) and layers[0].strides == tuple(strides)

    built = compile_onnx(model, "x86")
    assert [(d.kind, d.kernel) for d in built.layers] == [("conv", "dense"), ("conv", "dense"), ("fc", "dense")]
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 11, 13)).astype(np.float32)
        assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-5


def test_first_conv_matches_numpy_float64(rng):
    """The conv layer alone (bias, padding, stride) against a direct float64 convolution."""
    pads, strides = [2, 1, 0, 1], [1, 2]
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=pads, strides=strides)]
    model = make_model(nodes, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
                       [("x", [2, 2, 9, 10])], [("y", [2, 6, 9, 5])])
    x = rng.standard_normal((2, 2, 9, 10)).astype(np.float32)
    built = compile_onnx(model, "x86")
    assert [d.kind for d in built.layers] == ["conv"]
    out = vm_run(built.executable, x)
    assert rel_err(out, conv_ref(x, w, b, pads, strides)) < 1e-5


@pytest.mark.parametrize("g", [1, 4, 16])
def test_conv_weight_pruning_groups_the_unfolded_kernel(rng, g):
    model = models.lenet5(seed=4)
    outcome = prune_onnx(model, 0.0, "x86", group_width=g, conv_rate=0.7)
    conv = [layer for layer in outcome.layers if layer.kind == "conv"]
    assert [layer.shape for layer in conv] == [(20, 25), (50, 500)]
    assert [outcome.weight_name(i) for i, layer in enumerate(outcome.layers) if layer.kind == "conv"] == [
        "conv1.weight", "conv2.weight"]
    assert [layer.positions for layer in conv] == [24 * 24, 8 * 8]
    weights = {i.name: numpy_helper.to_array(i) for i in outcome.model.graph.initializer}
    for name in ("conv1.weight", "conv2.weight"):
        kernel = weights[name]
        assert kernel.ndim == 4
        unfolded = kernel.reshape(kernel.shape[0], -1)
        assert abs(np.mean(unfolded == 0) - 0.7) < 0.05
        assert_whole_groups(unfolded, g)
    assert np.all(weights["fc1.weight"] != 0)  # FC layers were given rate 0

    # grouped-sparse conv kernels, numerically the pruned model
    built = compile_onnx(outcome.model, "x86", mode="sparse")
    kernels = [(d.kind, d.kernel, d.group_width) for d in built.layers if d.kind == "conv"]
    assert kernels == [("conv", "grouped-sparse", g)] * 2
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(outcome.model, x)) < 1e-5


def test_unsupported_conv_is_left_to_tvm_with_a_warning(rng, caplog):
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3])]
    # a symbolic image size: the kernels need static spatial extents
    model = make_model(nodes, [numpy_helper.from_array(w, "w")], [("x", [1, 2, "H", "W"])], [("y", [1, 4, "OH", "OW"])])
    with caplog.at_level(logging.WARNING):
        built = compile_onnx(model, "x86")
    assert built.layers == []
    assert any("static channel and image size" in r.getMessage() for r in caplog.records)
    x = rng.standard_normal((1, 2, 6, 7)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-5


def test_grouped_conv_takes_our_grouped_kernel(rng):
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)  # groups=2 over 2 channels
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], group=2)]
    model = make_model(nodes, [numpy_helper.from_array(w, "w")], [("x", [1, 2, 6, 6])], [("y", [1, 4, 4, 4])])
    built = compile_onnx(model, "x86")
    assert [(d.kind, d.kernel) for d in built.layers] == [("conv", "dense grouped")]
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-5


def test_cli_rules_prune_conv_weights_on_a_microcontroller(tmp_path, rng):
    out = tmp_path / "m4.onnx"
    res = run_cli("prune", "lenet5", "-o", str(out), "--policy", "rules", "--target", "cortex-m4",
                  "--rate", "0.8", "--conv-rate", "0.5", "--group-width", "2")
    assert res.returncode == 0, res.stderr
    assert "low parallelism" in res.stdout and "conv2.weight" in res.stdout
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    for name, rate in (("conv1.weight", 0.5), ("conv2.weight", 0.5), ("fc1.weight", 0.8)):
        unfolded = weights[name].reshape(weights[name].shape[0], -1)
        assert abs(np.mean(unfolded == 0) - rate) < 0.05, name
        assert_whole_groups(unfolded, 2)
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    pruned = onnx.load(str(out))
    assert rel_err(vm_run(compile_onnx(pruned, "x86").executable, x), ort_run(pruned, x)) < 1e-5


def test_measured_policy_times_conv_layers_on_the_patch_kernel():
    from tvm_scalpel import resolve_target
    from tvm_scalpel.format import GroupedSparseMatrix
    from tvm_scalpel.policy import keep_where_sparse_pays
    from tvm_scalpel.tuning import time_layer

    host = resolve_target("x86")
    outcome = prune_onnx(models.lenet5(seed=6), 0.0, host, group_width=4, conv_rate=0.6)
    outcome.layers = [layer for layer in outcome.layers if layer.kind == "conv"]
    seen = []

    def timed(w, positions):
        seen.append(positions)
        return time_layer(host, w, positions=positions, min_repeat_ms=1)

    measured = keep_where_sparse_pays(outcome, host, timed)
    assert seen == [576, 576, 64, 64]
    assert all(m.dense_us > 0 and m.sparse_us > 0 for m in measured)
    sparse = GroupedSparseMatrix.from_dense(outcome.layers[1].pruned, 4)
    assert time_layer(host, sparse, positions=64, min_repeat_ms=1) > 0
