"""``RemoveMaskedNodes``: Scalpel's node pruning, the removal half.

Scalpel prunes whole nodes (neurons of a dense layer, filters of a convolution) by training a
*mask layer* after each layer: the layer's output is multiplied element-wise by a constant 0/1
vector along the channel axis (``[N]`` or ``[1, N]`` for a dense output ``[B, N]``; ``[C, 1, 1]``
or ``[1, C, 1, 1]`` for a convolution output ``[B, C, H, W]``). Once the masks are learned, a
node whose mask is 0 contributes nothing and is removed from the network: the layer that
produces it loses a weight row (or filter), its bias and batch-norm entries, and the layer that
reads it loses the matching input columns (or input channels). This pass does that removal.

A removed channel is 0 right after the mask. Ops between the mask and the next layer may turn
that 0 into a per-channel constant (a batch norm after the mask: ``beta - gamma * mean / std``);
the next layer then sees a constant input on that channel, whose contribution is folded into its
bias (or into the mean of the batch norm that follows it) so that the result does not change.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import ir, relax
from tvm.ir.prim.expr import IntImm

from .graph import (
    GraphIndex,
    GraphRewriter,
    Replacement,
    RewritePlan,
    const_array,
    conv_layout_problem,
    op_name,
    swaps_two_axes,
    tensor_type,
    weight_source,
)

log = logging.getLogger("tvm_scalpel.passes")


@dataclass
class MaskedLayer:
    """What ``RemoveMaskedNodes`` did with one mask multiply (for reports and ONNX write-back)."""

    index: int  # position among the function's mask multiplies, in binding order
    name: str  # the var the mask multiplies (the producing layer's output)
    kind: str  # "dense" or "conv"
    nodes_before: int
    nodes_after: int
    kept: np.ndarray  # indices of the channels kept, ascending
    mask: ir.expr.GenericConst  # the mask constant as the graph held it
    weight: ir.expr.GenericConst | None  # the producing layer's weight constant (before)
    mask_kept: bool = False  # an all-zero mask: one channel stays, still multiplied by 0
    flatten: list[tuple[int, int, int]] = field(default_factory=list)  # (axis, old, new) reshapes
    constants: list[tuple[ir.expr.GenericConst, np.ndarray]] = field(default_factory=list)
    # every constant rewritten for this mask, with the value it has after the pass


class _Unsupported(Exception):
    """A mask the pass leaves as it is; the message says why."""


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _erf(v):
    return np.vectorize(math.erf, otypes=[np.float64])(v)


# Element-wise unary ops a channel may pass through, with what they make of a constant.
UNARY = {
    "relax.nn.relu": lambda v, a: np.maximum(v, 0.0),
    "relax.nn.relu6": lambda v, a: np.clip(v, 0.0, 6.0),
    "relax.nn.leakyrelu": lambda v, a: np.where(v >= 0, v, float(a.alpha) * v),
    "relax.nn.silu": lambda v, a: v * _sigmoid(v),
    "relax.nn.gelu": lambda v, a: 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0))),
    "relax.nn.gelu_tanh": lambda v, a: 0.5 * v * (
        1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3))),
    "relax.sigmoid": lambda v, a: _sigmoid(v),
    "relax.tanh": lambda v, a: np.tanh(v),
    "relax.abs": lambda v, a: np.abs(v),
    "relax.negative": lambda v, a: -v,
    "relax.exp": lambda v, a: np.exp(v),
}
POOLS = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d")
TUPLE_OPS = ("relax.nn.batch_norm", "relax.nn.dropout")  # read through their item 0


def _static_shape(expr) -> list[int | None] | None:
    ty = tensor_type(expr)
    if ty is None or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    return [int(v) if isinstance(v, IntImm) else None for v in ty.shape.values]


def _int_tuple(values) -> list[int]:
    return [int(v) for v in values] if values is not None else []


class _Graph(GraphIndex):
    """The function's index, with the checks that leave a mask alone (raise _Unsupported)."""

    def only_reader(self, var: relax.Var) -> relax.Var:
        readers = self.readers.get(var, [])
        if self.uses.get(var, 0) == 1 and not readers:
            raise _Unsupported(f"{var.name} is an output of the function: no layer reads it")
        if self.uses.get(var, 0) != 1 or len(readers) != 1:
            raise _Unsupported(f"{var.name} is read {self.uses.get(var, 0)} times (a branch: a "
                               "residual connection, a concat, ...)")
        return readers[0]

    def own_const(self, expr, what: str) -> tuple[ir.expr.GenericConst, np.ndarray]:
        arr = const_array(expr)
        if arr is None:
            raise _Unsupported(f"{what} is not a constant")
        if self.const_uses.get(expr, 0) != 1:
            raise _Unsupported(f"{what} is a constant shared with other ops")
        return expr, arr

    def dense_weight(self, rhs: relax.Expr, what: str) -> tuple[ir.expr.GenericConst, np.ndarray, bool]:
        """``(constant, its array, transposed)`` of a matmul's weight, stored ``[K, N]`` or as
        ``[N, K]`` behind ``permute_dims``, when no other op reads it."""
        leaf, permute = weight_source(self, rhs)
        if const_array(leaf) is None:
            raise _Unsupported(f"{what} is not a constant")
        if permute is not None:
            if not swaps_two_axes(self.values[permute]):
                raise _Unsupported(f"{what} is permuted other than [1, 0]")
            if self.uses.get(permute, 0) != 1:
                raise _Unsupported(f"{what} is shared with other ops")
        const, arr = self.own_const(leaf, what)
        return const, arr, permute is not None

    def tuple_item0(self, tuple_var: relax.Var) -> relax.Var:
        """The var bound to ``tuple_var[0]``, when the other items are read by nobody."""
        main = None
        for reader in self.readers.get(tuple_var, []):
            value = self.values[reader]
            if not isinstance(value, relax.TupleGetItem):
                raise _Unsupported(f"{tuple_var.name} is read whole")
            if int(value.index) == 0 and main is None:
                main = reader
            elif self.uses.get(reader, 0):
                raise _Unsupported(f"{reader.name} (item {int(value.index)} of a tuple) is read")
        if main is None or self.uses.get(tuple_var, 0) != len(self.readers[tuple_var]):
            raise _Unsupported(f"{tuple_var.name} is read in ways the pass does not follow")
        return main


@dataclass
class _Plan:
    """The edits one mask asks for, in the original index space."""

    mult: relax.Var
    source: relax.Expr
    mask_const: ir.expr.GenericConst
    mask: np.ndarray  # [C]
    kept: np.ndarray
    kind: str = "dense"
    weight: ir.expr.GenericConst | None = None
    drop: bool = True  # the multiply disappears
    slices: list = field(default_factory=list)  # (const, axis, indices)
    deltas: list = field(default_factory=list)  # (const, array added to the original)
    reshapes: list = field(default_factory=list)  # (binding var, axis, new size)
    flatten: list = field(default_factory=list)  # (axis, old, new)


def _channel_axis(shape: tuple[int, ...], out_ndim: int, channels: int) -> int | None:
    """Axis of a constant of ``shape`` that lands on axis 1 of a rank-``out_ndim`` tensor by
    broadcasting, when all its other axes are 1 and that one holds ``channels`` values."""
    axis = len(shape) - (out_ndim - 1)
    if axis < 0 or len(shape) > out_ndim or shape[axis] != channels:
        return None
    if any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return axis


class _Planner:
    def __init__(self, graph: _Graph) -> None:
        self.g = graph

    # ------------------------------------------------------------------ mask recognition

    def mask_of(self, binding_var: relax.Var) -> tuple[relax.Expr, ir.expr.GenericConst, np.ndarray] | None:
        """``(masked operand, mask constant, mask[C])`` for a multiply by a per-channel constant;
        None for anything else. Raises _Unsupported for a per-channel constant not 0/1."""
        value = self.g.values[binding_var]
        if op_name(value) != "relax.multiply":
            return None
        a, b = value.args
        if const_array(a) is not None and const_array(b) is None:
            a, b = b, a
        arr = const_array(b)
        shape = _static_shape(a)
        if arr is None or not isinstance(a, relax.Var) or shape is None or len(shape) not in (2, 4):
            return None
        channels = shape[1]
        if channels is None or arr.ndim < (1 if len(shape) == 2 else 3):
            return None
        if _channel_axis(arr.shape, len(shape), channels) is None:
            return None
        mask = arr.reshape(-1)
        if not np.all((mask == 0) | (mask == 1)):
            raise _Unsupported("its values are not all 0 or 1")
        return a, b, mask

    # ------------------------------------------------------------------ planning

    def plan(self, binding_var: relax.Var, source, mask_const, mask) -> _Plan:
        kept = np.flatnonzero(mask)
        p = _Plan(binding_var, source, mask_const, mask, kept,
                  kind="conv" if len(_static_shape(source)) == 4 else "dense")
        if not isinstance(binding_var, relax.DataflowVar) and isinstance(source, relax.DataflowVar):
            # the product is read outside the dataflow block, where the operand is not visible
            raise _Unsupported("the masked result is an output of its dataflow block, not read "
                               "by a next layer")
        if len(kept) == len(mask):  # all ones: only the multiply goes
            try:
                self.backward(p)  # only to name the layer in the report
            except _Unsupported:
                p.weight = None
            p.slices, p.reshapes = [], []
            return p
        if len(kept) == 0:
            p.kept = kept = np.array([0])
            p.drop = False
            p.slices.append((mask_const, _channel_axis(const_array(mask_const).shape,
                                                       len(_static_shape(source)), len(mask)), kept))
        if self.g.const_uses.get(mask_const, 0) != 1:
            raise _Unsupported("the mask constant is shared with other ops")
        self.backward(p)
        self.forward(p)
        return p

    def _bias(self, add_var: relax.Var, chain_var: relax.Var, channels: int,
              out_ndim: int) -> tuple[ir.expr.GenericConst, int, relax.Var | None, int | None] | None:
        """The per-channel bias an ``add`` binding adds to ``chain_var``: (constant, its channel
        axis, the reshape binding in between or None, that reshape's channel axis)."""
        lhs, rhs = self.g.values[add_var].args
        if lhs.same_as(rhs):
            return None
        other = rhs if lhs.same_as(chain_var) else lhs
        arr = const_array(other)
        if arr is not None:
            axis = _channel_axis(arr.shape, out_ndim, channels)
            if axis is None:
                return None
            const, _ = self.g.own_const(other, "the bias")
            return const, axis, None, None
        value = self.g.values.get(other) if isinstance(other, relax.Var) else None
        if op_name(value) == "relax.reshape" and const_array(value.args[0]) is not None:
            arr = const_array(value.args[0])
            target = _static_shape(other)
            if arr.ndim != 1 or arr.shape[0] != channels or target is None or None in target:
                return None
            r_axis = _channel_axis(tuple(target), out_ndim, channels)
            if r_axis is None or self.g.uses.get(other, 0) != 1:
                return None
            const, _ = self.g.own_const(value.args[0], "the bias")
            return const, 0, other, r_axis
        return None

    def _slice_bias(self, p: _Plan, bias, idx: np.ndarray, kept_count: int) -> None:
        const, axis, reshape_var, r_axis = bias
        p.slices.append((const, axis, idx))
        if reshape_var is not None:
            p.reshapes.append((reshape_var, r_axis, kept_count))

    def _batch_norm_consts(self, call: relax.Call, channels: int, ndim: int):
        if int(call.attrs.axis) % ndim != 1:
            raise _Unsupported("a batch norm along another axis than the channels")
        consts = []
        for i, what in enumerate(("gamma", "beta", "mean", "variance"), start=1):
            const, arr = self.g.own_const(call.args[i], f"batch-norm {what}")
            if arr.shape != (channels,):
                raise _Unsupported(f"batch-norm {what} is not one value per channel")
            consts.append((const, arr))
        return consts

    def backward(self, p: _Plan) -> None:
        """From the masked operand back to the layer that makes the channels."""
        shape = _static_shape(p.source)
        ndim, channels, kept = len(shape), shape[1], p.kept
        cur = p.source
        while True:
            if not isinstance(cur, relax.Var) or cur not in self.g.values:
                raise _Unsupported("no layer with a constant weight makes the masked channels")
            if self.g.uses.get(cur, 0) != 1:
                raise _Unsupported(f"{cur.name}, before the mask, is also read elsewhere")
            value = self.g.values[cur]
            op = op_name(value)
            if isinstance(value, relax.TupleGetItem) and int(value.index) == 0 \
                    and op_name(self.g.values.get(value.tuple_value)) in TUPLE_OPS:
                tup = value.tuple_value
                if not self.g.tuple_item0(tup).same_as(cur):
                    raise _Unsupported(f"{tup.name} is read in ways the pass does not follow")
                call = self.g.values[tup]
                if op_name(call) == "relax.nn.batch_norm":
                    for const, _ in self._batch_norm_consts(call, channels, ndim):
                        p.slices.append((const, 0, kept))
                cur = call.args[0]
            elif op in UNARY:
                cur = value.args[0]
            elif op in POOLS:
                if ndim != 4 or str(value.attrs.layout) != "NCHW":
                    raise _Unsupported(f"{op} in a layout other than NCHW")
                cur = value.args[0]
            elif op == "relax.add":
                bias, chain = None, None
                for chain in value.args:  # the operand of the full shape; the other is the bias
                    if isinstance(chain, relax.Var) and _static_shape(chain) == _static_shape(cur):
                        bias = self._bias(cur, chain, channels, ndim)
                        if bias is not None:
                            break
                if bias is None:
                    raise _Unsupported("the masked channels come from an add of two branches "
                                       "(a residual connection)")
                self._slice_bias(p, bias, kept, len(kept))
                cur = chain
            elif op == "relax.nn.conv2d":
                if conv_layout_problem(value.attrs) is not None:
                    raise _Unsupported("a grouped or non-NCHW/OIHW convolution")
                const, arr = self.g.own_const(value.args[1], "the convolution's weight")
                p.kind, p.weight = "conv", const
                p.slices.append((const, 0, kept))
                break
            elif op == "relax.matmul":
                if ndim != 2 or len(_static_shape(value.args[0]) or []) != 2:
                    raise _Unsupported("a matmul whose input is not of rank 2")
                const, _, transposed = self.g.dense_weight(value.args[1], "the matmul's weight")
                p.slices.append((const, 0 if transposed else 1, kept))  # the N axis
                p.kind, p.weight = "dense", const
                break
            else:
                raise _Unsupported(f"the masked channels come from {op or type(value).__name__}, "
                                   "not from a dense or convolution layer")

    def forward(self, p: _Plan) -> None:
        """From the mask to the layer that reads the channels, carrying what a removed channel
        holds (0 after the mask) through the ops in between."""
        shape = _static_shape(p.source)
        ndim, channels, kept = len(shape), shape[1], p.kept
        removed = np.setdiff1d(np.arange(channels), kept)
        vals = np.zeros(channels)  # what each channel holds when its mask is 0
        per = 1  # consecutive features per channel once flattened
        cur = p.mult
        while True:
            nxt = self.g.only_reader(cur)
            value = self.g.values[nxt]
            op = op_name(value)
            if op in TUPLE_OPS and value.args[0].same_as(cur):
                if op == "relax.nn.batch_norm":
                    if per != 1 and ndim == 2:
                        raise _Unsupported("a batch norm after flattening")
                    consts = self._batch_norm_consts(value, channels, ndim)
                    for const, _ in consts:
                        p.slices.append((const, 0, kept))
                    (_, gamma), (_, beta), (_, mean), (_, var) = consts
                    a = value.attrs
                    v = (vals - mean) / np.sqrt(var.astype(np.float64) + float(a.epsilon))
                    vals = (v * gamma if a.scale else v) + (beta if a.center else 0.0)
                cur = self.g.tuple_item0(nxt)
            elif op in UNARY:
                vals = UNARY[op](vals, value.attrs)
                cur = nxt
            elif op in POOLS:
                a = value.attrs
                if ndim != 4 or str(a.layout) != "NCHW" or str(getattr(a, "out_layout", "NCHW")) != "NCHW":
                    raise _Unsupported(f"{op} in a layout other than NCHW")
                if op == "relax.nn.avg_pool2d" and np.any(vals[removed] != 0) and (
                        (any(_int_tuple(a.padding)) and a.count_include_pad) or a.ceil_mode):
                    raise _Unsupported("removed channels hold a non-zero constant that a padded "
                                       "average pool does not keep constant")
                cur = nxt
            elif op == "relax.mean":
                axes = sorted(int(x) % ndim for x in value.attrs.axis) if value.attrs.axis else []
                if ndim != 4 or axes != [2, 3]:
                    raise _Unsupported("a mean over other axes than the spatial ones")
                if not value.attrs.keepdims:
                    ndim, per = 2, 1
                cur = nxt
            elif op == "relax.reshape" and value.args[0].same_as(cur):
                src = _static_shape(cur)
                dst = _static_shape(nxt)
                if src is None or dst is None or len(dst) != 2 or dst[1] is None or None in src[1:]:
                    raise _Unsupported("a reshape other than a flatten to [B, C*H*W]")
                size = int(np.prod(src[1:]))
                if dst[1] != size:
                    raise _Unsupported("a reshape other than a flatten to [B, C*H*W]")
                per = size // channels
                if not isinstance(value.args[1], relax.ShapeExpr):
                    raise _Unsupported("a reshape to a shape computed at run time")
                new = len(kept) * per
                p.reshapes.append((nxt, 1, new))
                p.flatten.append((1, size, new))
                ndim = 2
                cur = nxt
            elif op == "relax.matmul" and value.args[0].same_as(cur):
                self._consume_dense(p, nxt, value, vals, removed, channels, per)
                return
            elif op == "relax.nn.conv2d" and value.args[0].same_as(cur):
                if ndim != 4:
                    raise _Unsupported("a convolution of flattened channels")
                self._consume_conv(p, nxt, value, vals, removed, channels)
                return
            else:
                raise _Unsupported(f"the masked channels reach {op or type(value).__name__} "
                                   "before the next layer (a residual add, a concat, ...)")

    def _consume_dense(self, p, var, value, vals, removed, channels, per) -> None:
        if len(_static_shape(var) or []) != 2:
            raise _Unsupported("the next matmul's output is not of rank 2")
        idx = (p.kept[:, None] * per + np.arange(per)).reshape(-1)
        gone = (removed[:, None] * per + np.arange(per)).reshape(-1)
        const, arr, transposed = self.g.dense_weight(value.args[1], "the next matmul's weight")
        axis, w_nk = (1, arr) if transposed else (0, arr.T)  # the K axis
        if w_nk.shape[1] != channels * per:
            raise _Unsupported("the next matmul's weight does not match the flattened channels")
        p.slices.append((const, axis, idx))
        carried = np.repeat(vals[removed], per)
        if np.any(carried != 0):
            delta = w_nk[:, gone].astype(np.float64) @ carried
            self._fold(p, var, delta)

    def _consume_conv(self, p, var, value, vals, removed, channels) -> None:
        a = value.attrs
        if conv_layout_problem(a) is not None:
            raise _Unsupported("the next convolution is grouped or not NCHW/OIHW")
        const, arr = self.g.own_const(value.args[1], "the next convolution's weight")
        if arr.shape[1] != channels:
            raise _Unsupported("the next convolution's weight does not match the channels")
        p.slices.append((const, 1, p.kept))
        if np.any(vals[removed] != 0):
            if any(_int_tuple(a.padding)):
                raise _Unsupported("removed channels hold a non-zero constant that a padded "
                                   "convolution does not see everywhere alike")
            delta = arr[:, removed].astype(np.float64).sum(axis=(2, 3)) @ vals[removed]
            self._fold(p, var, delta)

    def _fold(self, p: _Plan, layer_var: relax.Var, delta: np.ndarray) -> None:
        """Add what the removed (constant) channels contributed to the next layer's bias, or
        take it off the mean of the batch norm that follows it."""
        nxt = self.g.only_reader(layer_var)
        value = self.g.values[nxt]
        shape = _static_shape(layer_var)
        out = shape[1]
        try:
            found = self.mask_of(nxt)
        except _Unsupported:
            found = None
        if found is not None and found[0].same_as(layer_var) \
                and op_name(self.g.values[self.g.only_reader(nxt)]) == "relax.nn.batch_norm":
            # the next layer's own mask sits before its batch norm: a shift of the kept channels
            # passes it as it is, and the channels it removes must keep their batch-norm mean
            delta = delta * found[2]
            layer_var, nxt = nxt, self.g.only_reader(nxt)
            value = self.g.values[nxt]
        if op_name(value) == "relax.add":
            bias = self._bias(nxt, layer_var, out, len(shape))
            if bias is not None:
                const, axis, _, _ = bias
                arr = const_array(const)
                p.deltas.append((const, np.moveaxis(delta.reshape((out,) + (1,) * (arr.ndim - 1)),
                                                    0, axis).reshape(arr.shape)))
                return
        if op_name(value) == "relax.nn.batch_norm" and value.args[0].same_as(layer_var):
            consts = self._batch_norm_consts(value, out, len(shape))
            p.deltas.append((consts[2][0], -delta))
            return
        raise _Unsupported("removed channels hold a non-zero constant (a batch norm after the "
                           "mask) and the next layer has no bias to fold it into")


def _describe(var: relax.Var) -> str:
    shape = _static_shape(var)
    return "x".join("?" if d is None else str(d) for d in shape) if shape else "?"


def _reshape_to(value: relax.Call, axis: int, size: int) -> Replacement:
    """A ``reshape`` like ``value`` whose target shape has ``size`` on ``axis``."""
    shape = list(value.args[1].values)
    shape[axis] = size
    return lambda bb, visit: relax.op.reshape(visit(value.args[0]), relax.ShapeExpr(shape))


@tvm.transform.module_pass(opt_level=0, name="RemoveMaskedNodes")
class RemoveMaskedNodes:
    """Remove the nodes (neurons, filters) that constant 0/1 channel masks switch off.

    Rewrites, in every Relax function, each ``multiply`` of a layer's output by a constant 0/1
    vector along the channel axis (``[N]``/``[1, N]`` on a dense output ``[B, N]``;
    ``[C, 1, 1]``/``[1, C, 1, 1]`` on a convolution output ``[B, C, H, W]``):

    * the producing layer keeps only the channels whose mask is 1: rows of its matmul weight
      (``[K, N]`` or behind ``permute_dims`` as ``[N, K]``) or filters of its conv2d weight
      (``[O, I, kh, kw]`` axis 0), entries of its bias and of a batch norm before the mask;
    * the consuming layer (the next matmul or conv2d) keeps only the matching input columns
      (the K axis of its weight) or input channels (conv2d weight axis 1), across the
      channel-preserving ops in between: unary element-wise ops (relu, sigmoid, ...),
      max/avg/adaptive pooling, spatial mean, batch norm, dropout, and a flatten
      ``[B, C, H, W] -> [B, C*H*W]`` (channel c feeds the inputs ``c*H*W .. c*H*W+H*W-1``,
      and the reshape's target shape shrinks with it);
    * the multiply disappears. A removed channel that reaches the next layer as a non-zero
      constant (a batch norm after the mask) has its contribution folded into that layer's
      bias, or into the mean of the batch norm right after it.

    A mask of all ones only loses its multiply. A mask of all zeros keeps one channel, still
    multiplied by 0, so that shapes stay valid (with a warning). A mask the pass cannot handle
    safely (its channels reach a residual add or a concat, a layer with a non-constant or shared
    weight, a mask that is not 0/1, ...) is left as it is, with a warning.

    Parameters
    ----------
    report: when a list is given, one ``MaskedLayer`` per mask removed is appended to it.
    """

    def __init__(self, report: list[MaskedLayer] | None = None) -> None:
        self.report = report

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        def plan_of(func: relax.Function) -> RewritePlan:
            graph = _Graph(func)
            plans = self._plan(graph)
            if not plans:
                return RewritePlan()
            final = self._final_constants(plans)
            rewrite = RewritePlan(constants={c: relax.const(arr) for c, arr in final.items()})
            for p in plans:
                if p.drop:  # readers of the product read the masked operand
                    rewrite.bindings[p.mult] = lambda bb, visit, source=p.source: visit(source)
                for var, axis, new in p.reshapes:
                    rewrite.bindings[var] = _reshape_to(graph.values[var], axis, new)
            for i, p in enumerate(plans if self.report is not None else []):
                touched = list(dict.fromkeys([c for c, _, _ in p.slices] + [c for c, _ in p.deltas]))
                self.report.append(MaskedLayer(
                    index=i, name=str(p.source.name), kind=p.kind,
                    nodes_before=len(p.mask), nodes_after=len(p.kept), kept=p.kept,
                    mask=p.mask_const, weight=p.weight, mask_kept=not p.drop,
                    flatten=list(p.flatten), constants=[(c, final[c]) for c in touched]))
            return rewrite

        return GraphRewriter(mod).rewrite(mod, plan_of)

    @staticmethod
    def _plan(graph: _Graph) -> list[_Plan]:
        planner = _Planner(graph)
        plans: list[_Plan] = []
        sliced: set = set()  # (constant, axis) already sliced by an accepted plan
        reshaped: set = set()
        for b in graph.bindings:
            try:
                found = planner.mask_of(b.var)
                if found is None:
                    continue
                source, const, mask = found
                plan = planner.plan(b.var, source, const, mask)
            except _Unsupported as why:
                log.warning("mask %s (%s) left as it is: %s", b.var.name, _describe(b.var), why)
                continue
            keys = {(c, axis) for c, axis, _ in plan.slices}
            if keys & sliced or {v for v, _, _ in plan.reshapes} & reshaped:
                log.warning("mask %s left as it is: another mask already removes channels of the "
                            "same layer", b.var.name)
                continue
            sliced |= keys
            reshaped |= {v for v, _, _ in plan.reshapes}
            if not plan.drop:
                log.warning("mask %s is all zeros: layer %s keeps one channel (multiplied by 0) "
                            "so that shapes stay valid", b.var.name, source.name)
            log.info("mask %s: %s %s keeps %d of %d nodes", b.var.name, plan.kind, source.name,
                     len(plan.kept), len(mask))
            plans.append(plan)
        return plans

    @staticmethod
    def _final_constants(plans: list[_Plan]) -> dict:
        """Every rewritten constant's new value: folded contributions added in the original
        index space, then each axis sliced."""
        deltas: dict = {}
        slices: dict = {}
        for p in plans:
            for const, delta in p.deltas:
                deltas[const] = deltas.get(const, 0.0) + delta
            for const, axis, idx in p.slices:
                slices.setdefault(const, []).append((axis, idx))
        final = {}
        for const in list(dict.fromkeys(list(deltas) + list(slices))):
            arr = const_array(const)
            if const in deltas:
                arr = (arr.astype(np.float64) + deltas[const]).astype(arr.dtype)
            for axis, idx in slices.get(const, []):
                arr = np.take(arr, idx, axis=axis)
            final[const] = np.ascontiguousarray(arr)
        return final
