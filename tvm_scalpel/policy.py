"""The hardware-aware choice of Scalpel: which pruning each layer gets on a target.

The paper's rules, by the target's parallelism class:

* low (microcontrollers): SIMD-aware weight pruning for FC and CONV layers;
* moderate (CPUs): weight pruning for FC layers, node pruning for CONV layers;
* high (GPUs): node pruning only: sparse weights do not pay on wide parallel hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .kinds import LayerKind, Parallelism
from .targets import TargetProfile

FC, CONV = LayerKind.FC, LayerKind.CONV
RULES: dict[Parallelism, dict[LayerKind, str]] = {
    Parallelism.LOW: {FC: "weights", CONV: "weights"},
    Parallelism.MODERATE: {FC: "weights", CONV: "nodes"},
    Parallelism.HIGH: {FC: "nodes", CONV: "nodes"},
}


@dataclass(frozen=True)
class LayerPlan:
    name: str  # the layer's weight initializer
    kind: LayerKind
    method: str  # "weights", "nodes" or "none"
    note: str = ""


def _weight_layers(model: onnx.ModelProto) -> list[tuple[str, LayerKind]]:
    """``(weight initializer, kind)`` of every Gemm / MatMul / Conv, in node order."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("Gemm", "MatMul", "Conv") and len(node.input) > 1 and node.input[1] in inits:
            kind = CONV if node.op_type == "Conv" else FC
            out.append((node.input[1], kind))
    return out


def plan_layers(model: onnx.ModelProto, profile: TargetProfile) -> list[LayerPlan]:
    """The rules' choice for every weight layer of ``model`` on ``profile``'s target.

    Node pruning needs a next layer to shrink, so the last layer (the class scores) takes
    weight pruning where the rules allow it and nothing otherwise. SIMD-aware weight pruning of
    a CONV layer groups its unfolded ``C*KH*KW`` weights (see ``passes.conv_layers``).
    """
    from .node_pruning import prunable_layers

    rules = RULES[profile.parallelism]
    node_prunable = {layer.name for layer in prunable_layers(model)}
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    depthwise = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1
                 and len(dims.get(n.input[1], [])) == 4 and dims[n.input[1]][1] == 1
                 and any(a.name == "group" and a.i == dims[n.input[1]][0] > 1 for a in n.attribute)}
    plans = []
    for name, kind in _weight_layers(model):
        method, note = rules[kind], ""
        if method == "nodes" and name in depthwise:
            note = "depthwise: follows the layer feeding it"
        elif method == "nodes" and name not in node_prunable:
            method = "weights" if rules[FC] == "weights" and kind is FC else "none"
            note = "no next layer to shrink"
        plans.append(LayerPlan(name, kind, method, note))
    return plans


@dataclass(frozen=True)
class MeasuredLayer:
    name: str
    dense_us: float
    sparse_us: float

    @property
    def pays(self) -> bool:
        return self.sparse_us < self.dense_us


def keep_where_sparse_pays(outcome, profile: TargetProfile, time_fn=None,
                           rpc: str | None = None) -> list[MeasuredLayer]:
    """The measured mode of the policy: time each weight-pruned layer's grouped-sparse kernel
    against our dense kernel on this machine (or on the RPC server ``rpc``), and give back its
    dense weights (in ``outcome.model``) wherever sparse does not pay. The paper found sparse FC layers breaking
    even only near 84% pruning on its CPU, and sparse CONV layers hardly ever."""
    from .format import GroupedSparseMatrix
    from .onnx_io import replace_weights
    from .tuning import time_layer

    time_fn = time_fn or (lambda w, positions: time_layer(profile, w, rpc=rpc, positions=positions))
    results, undo = [], []
    for position, layer in enumerate(outcome.layers):
        # a conv layer runs on the patch kernel over its output positions: time it there
        dense = time_fn(layer.original, layer.positions)
        sparse = time_fn(GroupedSparseMatrix.from_dense(layer.pruned, layer.group_width), layer.positions)
        name = outcome.weight_name(position)
        results.append(MeasuredLayer(name, dense * 1e6, sparse * 1e6))
        if not results[-1].pays:
            undo.append((layer.pruned, layer.original))
    if undo:
        replace_weights(outcome.model, undo)
    return results
