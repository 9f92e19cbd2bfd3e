"""ONNX builders for the networks the project ships with (weights from a fixed seed)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # onnxruntime reads IR <= 13; onnx 1.23 would write 14 by default


def _he(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    return (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32)


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
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, sizes[0]])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [batch, sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tvm-scalpel")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def lenet_300_100(seed: int = 0, layout: str = "gemm") -> onnx.ModelProto:
    """LeNet-300-100 (784 -> 300 -> 100 -> 10), the paper's MNIST MLP."""
    return mlp([784, 300, 100, 10], seed=seed, name="lenet_300_100", layout=layout)
