"""ONNX builders for the networks the project ships with (weights from a fixed seed)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # onnxruntime reads IR <= 13; onnx 1.23 would write 14 by default


def _he(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    return (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32)


def _model(nodes: list, name: str, input_shape: list, output: str, output_shape: list,
           inits: list) -> onnx.ModelProto:
    """A checked model with one float input called ``input`` and one float output."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tvm-scalpel")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def mlp(
    sizes: list[int],
    seed: int = 0,
    name: str = "mlp",
    layout: str = "gemm",
    batch: int | str = "N",
) -> onnx.ModelProto:
    """An MLP ``sizes[0] -> ... -> sizes[-1]`` with ReLU between layers.

    ``layout="gemm"`` writes ``Gemm(transB=1)`` layers (weights ``[out, in]``, as PyTorch exports);
    ``layout="matmul"`` writes ``MatMul`` + ``Add`` (weights ``[in, out]``).
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "input"
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = _he(rng, n_out, n_in)
        b = (rng.standard_normal(n_out) * 0.05).astype(np.float32)
        out = f"fc{i + 1}"
        if layout == "gemm":
            inits += [numpy_helper.from_array(w, f"fc{i + 1}.weight"),
                      numpy_helper.from_array(b, f"fc{i + 1}.bias")]
            nodes.append(helper.make_node("Gemm", [prev, f"fc{i + 1}.weight", f"fc{i + 1}.bias"],
                                          [out], transB=1))
        elif layout == "matmul":
            inits += [numpy_helper.from_array(np.ascontiguousarray(w.T), f"fc{i + 1}.weight"),
                      numpy_helper.from_array(b, f"fc{i + 1}.bias")]
            nodes.append(helper.make_node("MatMul", [prev, f"fc{i + 1}.weight"], [out + "_mm"]))
            nodes.append(helper.make_node("Add", [out + "_mm", f"fc{i + 1}.bias"], [out]))
        else:
            raise ValueError(f"unknown layout {layout!r}")
        prev = out
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [out], [out + "_relu"]))
            prev = out + "_relu"
    return _model(nodes, name, [batch, sizes[0]], prev, [batch, sizes[-1]], inits)


def lenet_300_100(seed: int = 0, layout: str = "gemm") -> onnx.ModelProto:
    """LeNet-300-100 (784 -> 300 -> 100 -> 10), the paper's MNIST MLP."""
    return mlp([784, 300, 100, 10], seed=seed, name="lenet_300_100", layout=layout)


def lenet5(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """LeNet-5 as in Caffe and the Scalpel paper: conv 20@5x5, max-pool 2, conv 50@5x5,
    max-pool 2, fc 500, fc 10 (431k weights); input ``[N, 1, 28, 28]``."""
    rng = np.random.default_rng(seed)

    def conv_init(c_out: int, c_in: int, k: int) -> np.ndarray:
        fan_in = c_in * k * k
        return (rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    inits = [
        numpy_helper.from_array(conv_init(20, 1, 5), "conv1.weight"),
        numpy_helper.from_array(np.zeros(20, np.float32), "conv1.bias"),
        numpy_helper.from_array(conv_init(50, 20, 5), "conv2.weight"),
        numpy_helper.from_array(np.zeros(50, np.float32), "conv2.bias"),
        numpy_helper.from_array(_he(rng, 500, 800), "fc1.weight"),
        numpy_helper.from_array(np.zeros(500, np.float32), "fc1.bias"),
        numpy_helper.from_array(_he(rng, 10, 500), "fc2.weight"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc2.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1"], kernel_shape=[5, 5]),
        helper.make_node("MaxPool", ["conv1"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "conv2.weight", "conv2.bias"], ["conv2"], kernel_shape=[5, 5]),
        helper.make_node("MaxPool", ["conv2"], ["pool2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1"], transB=1),
        helper.make_node("Relu", ["fc1"], ["fc1_relu"]),
        helper.make_node("Gemm", ["fc1_relu", "fc2.weight", "fc2.bias"], ["fc2"], transB=1),
    ]
    return _model(nodes, "lenet5", [batch, 1, 28, 28], "fc2", [batch, 10], inits)
