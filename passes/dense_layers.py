"""Finding dense layers in a Relax function: the analysis both of our dense passes share.

A *dense layer* is what the ONNX importer makes of ``Gemm`` (with or without ``transB``) and of
``MatMul`` + ``Add``: ``matmul(x, W)`` where W is a constant, either ``[K, N]`` itself or
``permute_dims`` of a constant ``[N, K]``, optionally followed by ``add`` of a constant bias of
N values and by ``nn.relu`` (``graph.match_layer``). Bias and activation are part of the layer
only when nothing else reads the intermediate result, so fusing them never changes what other
bindings see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from tvm import ir, relax

from .graph import GraphIndex, const_array, match_layer, tensor_type

log = logging.getLogger("tvm_scalpel.passes")


@dataclass
class DenseLayer:
    """One dense layer: ``output = act(data @ weight.T + bias)``."""

    index: int  # position among the function's dense layers, in binding order
    data: relax.Expr  # the input activations x[B, K]
    weight: np.ndarray  # W[N, K], float32: one row per output neuron
    weight_const: ir.expr.GenericConst  # the constant as the graph holds it
    transposed: bool  # True when the graph holds W[N, K] behind permute_dims (Gemm transB=1)
    matmul: relax.Var  # the var bound to matmul
    output: relax.Var  # the last var of the layer (matmul, add or relu)
    bias: np.ndarray | None = None  # [N] float32
    relu: bool = False
    fused: list[relax.Var] = field(default_factory=list)  # bindings the layer absorbs

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.weight.shape[1])


def find_dense_layers(func: relax.Function, warn: bool = True) -> list[DenseLayer]:
    """The dense layers of ``func`` that our kernels take, in binding order.

    A matmul on a constant weight that the kernels cannot take (inputs of rank other than 2, or
    not float32) is left as it is, with a warning.
    """
    index = GraphIndex(func)
    layers: list[DenseLayer] = []
    for b in index.bindings:
        match = match_layer(index, b.var, kind="dense")
        if match is None:
            continue
        stored = const_array(match.weight)
        weight = np.ascontiguousarray(stored if match.transposed else stored.T)
        ty = tensor_type(match.data)
        if ty is None or ty.ndim != 2 or str(ty.dtype) != "float32" or weight.dtype != np.float32:
            if warn:
                log.warning(
                    "dense layer %s (weight %s) left as it is: only float32 inputs of rank 2 "
                    "are supported, got %s",
                    b.var.name, "x".join(map(str, weight.shape)), ty,
                )
            continue
        layers.append(DenseLayer(len(layers), match.data, weight, match.weight, match.transposed,
                                 match.op, match.output, match.bias, match.relu, match.fused))
    return layers
