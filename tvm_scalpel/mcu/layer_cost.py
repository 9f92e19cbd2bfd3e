"""What one dense layer costs on the Cortex-M4, in instructions counted under qemu: the measure
``tvm-scalpel tune --target cortex-m4`` uses instead of a time.

A candidate (group width g) is a random ``[N, K]`` weight pruned with g at the task's rate, as a
one-layer ONNX model (y = x W^T); the project generator compiles it (``compile_fn``, the
contract's ``compile --target cortex-m4``; passed in, so this module does not import the flows
that call it) and the firmware runner counts one call. The dense cost is the same layer
unpruned, compiled dense. Counts are exact and deterministic, so one run a candidate is enough.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..pruning import prune_groups
from ..targets import TargetProfile
from ..tuning import Candidate, Task
from .firmware import run_project

# compile_fn(model, out_dir, mode): writes a project for the model into out_dir
CompileFn = Callable[[onnx.ModelProto, Path, str], object]
UNIT = "instructions"


def layer_model(weight: np.ndarray) -> onnx.ModelProto:
    """``y = x @ weight.T + 0`` for one input row: a Gemm with transB, as exporters write it."""
    n, k = weight.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], transB=1)], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(np.ascontiguousarray(weight, np.float32), "fc.weight"),
         numpy_helper.from_array(np.zeros(n, np.float32), "fc.bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def instructions(model: onnx.ModelProto, compile_fn: CompileFn, mode: str, seed: int = 0) -> int:
    """Instructions of one call of ``model`` compiled in ``mode``, on a random input."""
    k = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    x = np.random.default_rng(seed).standard_normal((1, k)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="scalpel-tune-m4-") as tmp:
        folder = Path(tmp) / "project"
        compile_fn(model, folder, mode)
        return run_project(folder, x).per_call


def _weight(task: Task, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((task.n, task.k)).astype(np.float32)


def measure_sparse(task: Task, candidate: Candidate, profile: TargetProfile,
                   compile_fn: CompileFn, seed: int = 0) -> float:
    """Instructions of the grouped-sparse layer for ``task`` pruned with ``candidate``'s g."""
    pruned = prune_groups(_weight(task, seed), candidate.group_width, task.rate).weight
    return float(instructions(layer_model(pruned), compile_fn, "sparse", seed))


def measure_dense(task: Task, compile_fn: CompileFn, seed: int = 0) -> float:
    """Instructions of the same layer, unpruned, on the dense kernel."""
    return float(instructions(layer_model(_weight(task, seed)), compile_fn, "dense", seed))
