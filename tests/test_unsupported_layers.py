"""Dense layers our kernels cannot take are left to TVM, with a warning, and still run right."""

import logging

import numpy as np
import pytest
from helpers import (
    assert_whole_groups,
    make_model,
    onnx_dense_layers,
    ort_run,
    rel_err,
    vm_run,
    zero_fraction,
)
from onnx import helper, numpy_helper

from tvm_scalpel import compile_onnx, prune_onnx


@pytest.fixture(scope="module")
def rank3_model():
    """x[2, 3, 24] -MatMul+Add+Relu-> [2, 3, 20] -Reshape-> [6, 20] -Gemm(transB=1)-> [6, 9]."""
    rng = np.random.default_rng(77)
    w1 = rng.standard_normal((24, 20)).astype(np.float32)
    b1 = rng.standard_normal(20).astype(np.float32)
    w2 = rng.standard_normal((9, 20)).astype(np.float32)
    b2 = rng.standard_normal(9).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Add", ["h", "B1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["hr"]),
        helper.make_node("Reshape", ["hr", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W2", "B2"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "B1"),
             numpy_helper.from_array(np.array([6, 20], np.int64), "shape"),
             numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(b2, "B2")]
    return make_model(nodes, inits, [("x", [2, 3, 24])], [("y", [6, 9])])


def dense_warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "left as it is" in r.getMessage()]


def test_rank3_matmul_is_left_dense_when_pruning(rank3_model, caplog):
    with caplog.at_level(logging.WARNING):
        outcome = prune_onnx(rank3_model, 0.75, group_width=4)
    assert dense_warnings(caplog), caplog.text
    assert [layer.shape for layer in outcome.layers] == [(9, 20)]
    assert outcome.initializer_names == {0: "W2"}
    inits = {i.name: numpy_helper.to_array(i) for i in outcome.model.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in rank3_model.graph.initializer}
    np.testing.assert_array_equal(inits["W1"], original["W1"])  # untouched
    (gemm,) = [layer for layer in onnx_dense_layers(outcome.model) if layer["name"] == "W2"]
    assert_whole_groups(gemm["w"], 4)
    assert abs(zero_fraction(gemm["w"]) - 0.75) <= 0.03


def test_rank3_matmul_compiles_and_matches_onnxruntime(rank3_model, caplog, rng):
    pruned = prune_onnx(rank3_model, 0.75, group_width=4).model
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        compiled = compile_onnx(pruned, mode="sparse")
    assert dense_warnings(caplog), caplog.text
    assert [(d.shape, d.kernel) for d in compiled.layers] == [((9, 20), "grouped-sparse")]
    x = rng.standard_normal((2, 3, 24)).astype(np.float32)
    assert rel_err(vm_run(compiled.executable, x), ort_run(pruned, x)) < 1e-4


@pytest.mark.parametrize("bias_shape", [(1,), ()], ids=["bias-[1]", "bias-scalar"])
def test_single_output_layer(rng, bias_shape):
    """A regression head: one output neuron; ONNX lets Gemm's C be [1] or a scalar."""
    w = rng.standard_normal((1, 40)).astype(np.float32)
    bias = np.full(bias_shape, 0.3, np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)],
                       [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B")],
                       [("x", ["N", 40])], [("y", ["N", 1])])
    pruned = prune_onnx(model, 0.5, group_width=8).model
    compiled = compile_onnx(pruned)
    x = rng.standard_normal((4, 40)).astype(np.float32)
    assert rel_err(vm_run(compiled.executable, x), ort_run(pruned, x)) < 1e-4
