"""Finding dense layers in a Relax function: the analysis both of our passes share.

A *dense layer* is what the ONNX importer makes of ``Gemm`` (with or without ``transB``) and of
``MatMul`` + ``Add``: ``matmul(x, W)`` where W is a constant, either ``[K, N]`` itself or
``permute_dims`` of a constant ``[N, K]``, optionally followed by ``add`` of a constant bias of
N values and by ``nn.relu``. Bias and activation are part of the layer only when nothing else
reads the intermediate result, so fusing them never changes what other bindings see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from tvm import ir, relax
from tvm.relax.expr_functor import PyExprVisitor, visitor

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


def const_array(expr: relax.Expr) -> np.ndarray | None:
    if isinstance(expr, ir.expr.GenericConst) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    return None


def op_name(expr: relax.Expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, ir.Op):
        return str(expr.op.name)
    return None


def tensor_type(expr: relax.Expr):
    ty = getattr(expr, "ty", None)
    return ty if isinstance(ty, relax.TensorType) else None


@visitor
class UseCounter(PyExprVisitor):
    """How many times each var is read."""

    def __init__(self) -> None:
        self.uses: dict[relax.Var, int] = {}

    def visit_var_(self, var: relax.Var) -> None:
        self.uses[var] = self.uses.get(var, 0) + 1

    def visit_dataflow_var_(self, var: relax.Var) -> None:
        self.uses[var] = self.uses.get(var, 0) + 1


def emit_in_place_of(builder: relax.BlockBuilder, var: relax.Var, value: relax.Expr) -> relax.Var:
    """Emit ``value`` as a binding like ``var``'s: a dataflow var, or an output of the block."""
    if isinstance(var, relax.DataflowVar):
        return builder.emit(value, name_hint=var.name)
    return builder.emit_output(value, name_hint=var.name)


def var_bindings(func: relax.Function):
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return []
    return [b for block in body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)]


def readers_of(bindings) -> dict[relax.Var, relax.Var]:
    """var -> the (last seen) binding whose call reads it."""
    readers: dict[relax.Var, relax.Var] = {}
    for b in bindings:
        if isinstance(b.value, relax.Call):
            for arg in b.value.args:
                if isinstance(arg, relax.Var):
                    readers[arg] = b.var
    return readers


def _weight_of(matmul: relax.Call, values: dict) -> tuple[np.ndarray, ir.expr.GenericConst, bool] | None:
    """``(W[N, K], constant, transposed)`` when the matmul's right operand is a constant."""
    rhs = matmul.args[1]
    arr = const_array(rhs)
    if arr is not None and arr.ndim == 2:
        return np.ascontiguousarray(arr.T), rhs, False
    if isinstance(rhs, relax.Var) and op_name(values.get(rhs)) == "relax.permute_dims":
        perm = values[rhs]
        arr = const_array(perm.args[0])
        axes = perm.attrs.axes
        if arr is not None and arr.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
            return np.ascontiguousarray(arr), perm.args[0], True
    return None


def find_dense_layers(func: relax.Function, warn: bool = True) -> list[DenseLayer]:
    """The dense layers of ``func`` that our kernels take, in binding order.

    A matmul on a constant weight that the kernels cannot take (inputs of rank other than 2, or
    not float32) is left as it is, with a warning.
    """
    counter = UseCounter()
    counter.visit_expr(func)
    uses = counter.uses
    bindings = var_bindings(func)
    values = {b.var: b.value for b in bindings}
    readers = readers_of(bindings)

    layers: list[DenseLayer] = []
    for b in bindings:
        if op_name(b.value) != "relax.matmul":
            continue
        found = _weight_of(b.value, values)
        if found is None:
            continue
        weight, const, transposed = found
        data = b.value.args[0]
        ty = tensor_type(data)
        if ty is None or ty.ndim != 2 or str(ty.dtype) != "float32" or weight.dtype != np.float32:
            if warn:
                log.warning(
                    "dense layer %s (weight %s) left as it is: only float32 inputs of rank 2 "
                    "are supported, got %s",
                    b.var.name, "x".join(map(str, weight.shape)), ty,
                )
            continue
        layer = DenseLayer(len(layers), data, weight, const, transposed, b.var, b.var)
        absorb_epilogue(layer, values, readers, uses)
        layers.append(layer)
    return layers


def _bias_vector(bias: np.ndarray | None, n: int) -> np.ndarray | None:
    """A constant added to ``[B, N]`` as a vector of N, when it broadcasts without changing the
    output's shape: a scalar, ``[1]``, ``[N]``, ``[1, 1]`` or ``[1, N]``."""
    if bias is None or bias.dtype != np.float32 or bias.ndim > 2:
        return None
    if bias.ndim and (bias.shape[-1] not in (1, n) or any(d != 1 for d in bias.shape[:-1])):
        return None
    return np.ascontiguousarray(np.broadcast_to(bias.reshape(-1), (n,)), dtype=np.float32)


def absorb_epilogue(layer, values: dict, readers: dict, uses: dict, bias_of=None) -> None:
    """Extend the layer over a following bias ``add`` and ``relu`` read by nobody else.

    ``bias_of(expr)`` gives the N bias values an added operand stands for, or None (default:
    a constant that broadcasts over ``[B, N]`` as a vector of N)."""
    n = layer.shape[0]
    bias_of = bias_of or (lambda expr: _bias_vector(const_array(expr), n))
    nxt = readers.get(layer.output)
    if nxt is not None and uses.get(layer.output) == 1 and op_name(values[nxt]) == "relax.add":
        lhs, rhs = values[nxt].args
        other = rhs if lhs.same_as(layer.output) else lhs
        bias = bias_of(other)
        if bias is not None:
            layer.bias = bias
            layer.fused.append(layer.output)
            layer.output = nxt
    nxt = readers.get(layer.output)
    if nxt is not None and uses.get(layer.output) == 1 and op_name(values[nxt]) == "relax.nn.relu":
        layer.relu = True
        layer.fused.append(layer.output)
        layer.output = nxt
