"""The graph toolkit every Relax pass of tvm-scalpel is written with.

* ``GraphIndex``: one function's bindings, who reads each var, and its constants;
* ``match_layer``: a dense (``matmul``) or conv (``nn.conv2d``) layer on a constant weight,
  stored as it is or behind ``permute_dims`` (Gemm ``transB=1``), with the bias ``add`` and the
  ReLU that follow it (``absorb_bias`` / ``absorb_relu``, for passes that absorb more between);
* ``GraphRewriter``: emits what a ``RewritePlan`` makes in place of the bindings it names, swaps
  the constants it names, and drops the bindings that became dead.

A bias or activation is part of a layer only when nothing else reads the value before it, so
absorbing it never changes what other bindings see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from tvm import ir, relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

# ------------------------------------------------------------------------------ expressions


def const_array(expr: relax.Expr) -> np.ndarray | None:
    """The value of a Relax constant, else None."""
    if isinstance(expr, ir.expr.GenericConst) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    return None


def op_name(expr: relax.Expr | None) -> str | None:
    """``"relax.matmul"`` for a call of that operator, else None."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, ir.Op):
        return str(expr.op.name)
    return None


def tensor_type(expr: relax.Expr):
    ty = getattr(expr, "ty", None)
    return ty if isinstance(ty, relax.TensorType) else None


# ------------------------------------------------------------------------------ the index


@visitor
class _UseCounter(PyExprVisitor):
    """How many times each var is read (definitions are not reads)."""

    def __init__(self) -> None:
        self.uses: dict[relax.Var, int] = {}

    def visit_var_(self, var: relax.Var) -> None:
        self.uses[var] = self.uses.get(var, 0) + 1

    def visit_dataflow_var_(self, var: relax.Var) -> None:
        self.uses[var] = self.uses.get(var, 0) + 1


class GraphIndex:
    """One Relax function's bindings, who reads what, and its constants.

    * ``bindings``: its ``VarBinding``s in order; ``values``: var -> bound value;
    * ``uses``: var -> how many times it is read anywhere (the function's result included);
    * ``readers``: var -> the vars of the bindings whose value reads it, in binding order;
    * ``constants``: each distinct constant once, in the order they are first read (post
      order); ``const_uses``: constant -> how many times it occurs.
    """

    def __init__(self, func: relax.Function) -> None:
        self.func = func
        counter = _UseCounter()
        counter.visit_expr(func)
        self.uses: dict[relax.Var, int] = counter.uses
        body = func.body
        self.blocks = list(body.blocks) if isinstance(body, relax.SeqExpr) else []
        self.bindings = [b for block in self.blocks for b in block.bindings
                         if isinstance(b, relax.VarBinding)]
        self.values = {b.var: b.value for b in self.bindings}
        self.readers: dict[relax.Var, list[relax.Var]] = {}
        for b in self.bindings:
            for var in relax.analysis.free_vars(b.value):
                self.readers.setdefault(var, []).append(b.var)
        self.constants: list[ir.expr.GenericConst] = []
        self.const_uses: dict[ir.expr.GenericConst, int] = {}

        def count(expr):
            if isinstance(expr, ir.expr.GenericConst):
                if expr not in self.const_uses:
                    self.constants.append(expr)
                self.const_uses[expr] = self.const_uses.get(expr, 0) + 1

        relax.analysis.post_order_visit(func, count)

    def value_of(self, expr: relax.Expr) -> relax.Expr | None:
        """What ``expr`` is bound to, when it is a var bound in this function."""
        return self.values.get(expr) if isinstance(expr, relax.Var) else None

    def sole_reader(self, var: relax.Var, op: str | None = None) -> relax.Var | None:
        """The binding that reads ``var`` when nothing else does (and, given ``op``, whose value
        is a call of that operator), else None."""
        readers = self.readers.get(var, [])
        if self.uses.get(var, 0) != 1 or len(readers) != 1:
            return None
        if op is not None and op_name(self.values[readers[0]]) != op:
            return None
        return readers[0]

    def tuple_items(self, tuple_var: relax.Var) -> dict[int, relax.Var]:
        """index -> the var bound to ``tuple_var[index]``."""
        items = {}
        for reader in self.readers.get(tuple_var, []):
            value = self.values[reader]
            if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(tuple_var):
                items[int(value.index)] = reader
        return items


# ------------------------------------------------------------------------------ layers

LAYER_OPS = {"relax.matmul": "dense", "relax.nn.conv2d": "conv"}


def weight_source(index: GraphIndex, expr: relax.Expr) -> tuple[relax.Expr, relax.Var | None]:
    """``(leaf, permute)``: ``expr`` is ``permute_dims(leaf)`` bound to the var ``permute``, or
    is the leaf itself (``permute`` None)."""
    value = index.value_of(expr)
    if op_name(value) == "relax.permute_dims":
        return value.args[0], expr
    return expr, None


def swaps_two_axes(permute: relax.Call) -> bool:
    """A ``permute_dims`` that transposes a matrix: axes ``[1, 0]`` or left to the default."""
    axes = permute.attrs.axes
    return axes is None or [int(a) for a in axes] == [1, 0]


def conv_layout_problem(attrs, groups_ok: bool = False) -> str | None:
    """Why a ``conv2d`` of these attributes is not one our passes take (None: it is): only
    NCHW data, OIHW weights and NCHW output, and (unless ``groups_ok``) ``groups=1``."""
    if int(attrs.groups) != 1 and not groups_ok:
        return f"grouped convolution (groups={int(attrs.groups)}) is not supported"
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
    if layouts != ("NCHW", "OIHW", "NCHW"):
        return f"layout {attrs.data_layout}/{attrs.kernel_layout} is not supported"
    return None


def constant_weight(leaf: relax.Expr, kind: str) -> bool:
    """The default weight of ``match_layer``: a constant (a matrix for a dense layer)."""
    arr = const_array(leaf)
    return arr is not None and (kind != "dense" or arr.ndim == 2)


@dataclass
class LayerMatch:
    """One layer as the graph holds it: ``output = relu?(op(data, weight) + bias?)``."""

    kind: str  # "dense" (matmul) or "conv" (nn.conv2d)
    op: relax.Var  # the var bound to the matmul / conv2d
    data: relax.Expr  # its input activations
    weight: relax.Expr  # the stored weight: a constant (or what ``is_weight`` accepted)
    permute: relax.Var | None = None  # the permute_dims in between (a dense W[N, K], transB=1)
    output: relax.Var | None = None  # the last var of the layer (op, bias add or relu)
    bias: Any = None  # what ``bias_of`` made of the added operand
    relu: bool = False
    fused: list[relax.Var] = field(default_factory=list)  # the bindings the layer absorbs

    def __post_init__(self) -> None:
        if self.output is None:
            self.output = self.op

    @property
    def transposed(self) -> bool:
        return self.permute is not None


def vector_bias(bias: np.ndarray | None, n: int) -> np.ndarray | None:
    """A constant added to ``[B, N]`` as a vector of N, when it broadcasts without changing the
    output's shape: a scalar, ``[1]``, ``[N]``, ``[1, 1]`` or ``[1, N]``."""
    if bias is None or bias.dtype != np.float32 or bias.ndim > 2:
        return None
    if bias.ndim and (bias.shape[-1] not in (1, n) or any(d != 1 for d in bias.shape[:-1])):
        return None
    return np.ascontiguousarray(np.broadcast_to(bias.reshape(-1), (n,)), dtype=np.float32)


def channel_bias(index: GraphIndex, expr: relax.Expr, channels: int) -> np.ndarray | None:
    """The O bias values of an operand added to ``[B, O, H, W]``: a constant shaped ``[1, O, 1,
    1]`` or ``[O, 1, 1]``, possibly behind a ``reshape`` of a constant (the importer's form)."""
    arr = const_array(expr)
    value = index.value_of(expr)
    if arr is None and op_name(value) == "relax.reshape":
        source = const_array(value.args[0])
        ty = tensor_type(expr)
        if source is not None and ty is not None and ty.shape is not None:
            arr = source.reshape([int(d) for d in ty.shape.values])
    if arr is None or arr.dtype != np.float32 or arr.ndim not in (3, 4) or arr.size != channels:
        return None
    if arr.shape[-3] != channels:  # the channel axis must be the one of size O
        return None
    return np.ascontiguousarray(arr.reshape(channels))


def other_operand(call: relax.Call, var: relax.Var) -> relax.Expr:
    """The operand of a binary call that is not ``var``."""
    lhs, rhs = call.args
    return rhs if lhs.same_as(var) else lhs


def absorb_bias(index: GraphIndex, layer, bias_of: Callable[[relax.Expr], Any]) -> None:
    """Extend ``layer`` (anything with ``output``, ``fused``, ``bias``) over the ``add`` that
    alone reads its output, when ``bias_of`` accepts the added operand."""
    add = index.sole_reader(layer.output, "relax.add")
    if add is None:
        return
    bias = bias_of(other_operand(index.values[add], layer.output))
    if bias is not None:
        layer.bias = bias
        layer.fused.append(layer.output)
        layer.output = add


def absorb_relu(index: GraphIndex, layer) -> None:
    """Extend ``layer`` over the ``nn.relu`` that alone reads its output."""
    relu = index.sole_reader(layer.output, "relax.nn.relu")
    if relu is not None:
        layer.relu = True
        layer.fused.append(layer.output)
        layer.output = relu


def match_layer(index: GraphIndex, var: relax.Var, kind: str | None = None,
                is_weight: Callable[[relax.Expr, str], bool] = constant_weight,
                bias_of: Callable[[relax.Expr], Any] | None = None,
                epilogue: bool = True) -> LayerMatch | None:
    """The layer whose ``matmul`` / ``conv2d`` is bound to ``var`` (of ``kind`` "dense" or
    "conv", when given), or None.

    Its weight is the call's second operand, or for a matmul a ``permute_dims`` swapping the
    two axes of it, and must pass ``is_weight(weight, kind)`` (default: a constant). With
    ``epilogue``, a following bias ``add`` (``bias_of(operand)`` not None; default: a constant
    of one value per output, ``vector_bias`` / ``channel_bias``) and ReLU are absorbed."""
    value = index.values.get(var)
    found = LAYER_OPS.get(op_name(value))
    if found is None or (kind is not None and found != kind):
        return None
    leaf, permute = value.args[1], None
    if found == "dense":
        leaf, permute = weight_source(index, leaf)
        if permute is not None and not swaps_two_axes(index.values[permute]):
            return None
    if not is_weight(leaf, found):
        return None
    layer = LayerMatch(found, var, value.args[0], leaf, permute)
    if epilogue:
        absorb_bias(index, layer, bias_of or _default_bias(index, layer))
        absorb_relu(index, layer)
    return layer


def _default_bias(index: GraphIndex, layer: LayerMatch) -> Callable[[relax.Expr], Any]:
    weight = const_array(layer.weight)
    if weight is None:
        return lambda expr: None
    if layer.kind == "conv":
        return lambda expr: channel_bias(index, expr, int(weight.shape[0]))
    n = int(weight.shape[0] if layer.transposed else weight.shape[1])
    return lambda expr: vector_bias(const_array(expr), n)


# ------------------------------------------------------------------------------ rewriting

# Makes the value of a planned binding: ``make(builder, visit)``. ``visit(expr)`` maps an
# expression of the original function to the rewritten one; intermediate bindings are emitted
# on ``builder``. A var returned (already bound) replaces the binding without a new one.
Replacement = Callable[[relax.BlockBuilder, Callable[[relax.Expr], relax.Expr]], relax.Expr]


@dataclass
class RewritePlan:
    """The edits a pass makes to one function."""

    bindings: dict[relax.Var, Replacement] = field(default_factory=dict)  # var -> new value
    constants: dict[ir.expr.GenericConst, relax.Expr] = field(default_factory=dict)  # swaps
    drop_dead: bool = True  # remove the bindings nobody reads afterwards

    def __bool__(self) -> bool:
        return bool(self.bindings or self.constants)


def emit_in_place_of(builder: relax.BlockBuilder, var: relax.Var, value: relax.Expr) -> relax.Var:
    """Emit ``value`` as a binding like ``var``'s: a dataflow var, or an output of the block."""
    if isinstance(var, relax.DataflowVar):
        return builder.emit(value, name_hint=var.name)
    return builder.emit_output(value, name_hint=var.name)


@mutator
class GraphRewriter(PyExprMutator):
    """Rewrites functions by the ``RewritePlan`` made for each: ``rewrite(mod, plan_of)``.

    In place of each planned binding, what its replacement makes is emitted under the same
    name (a dataflow var stays one, a block output stays an output); planned constants are
    swapped wherever they occur; then, unless the plan says otherwise, the bindings nobody
    reads are removed (among them those a replaced layer absorbed). Passes use it as it is,
    with one plan per function, or subclass it for other visits."""

    def __init__(self, mod) -> None:
        super().__init__(mod)
        self.plan = RewritePlan()

    def visit_generic_const_(self, const: ir.expr.GenericConst) -> relax.Expr:
        return self.plan.constants.get(const, const)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        make = self.plan.bindings.get(binding.var)
        if make is None:
            return super().visit_var_binding_(binding)
        var = binding.var
        value = make(self.builder_, self.visit_expr)
        # an already bound var stands for the binding, unless it would carry a dataflow var
        # out of its block
        if isinstance(value, relax.Var) and (isinstance(var, relax.DataflowVar)
                                             or not isinstance(value, relax.DataflowVar)):
            self.set_var_remap(var, value)
        else:
            self.set_var_remap(var, emit_in_place_of(self.builder_, var, value))

    def rewrite_function(self, func: relax.Function, plan: RewritePlan) -> relax.Function:
        """``func`` rewritten by ``plan`` (the functions it adds go to the builder's module)."""
        self.plan = plan
        try:
            new_func = self.visit_expr(func)
        finally:
            self.plan = RewritePlan()
        return relax.analysis.remove_all_unused(new_func) if plan.drop_dead else new_func

    def rewrite(self, mod, plan_of: Callable[[relax.Function], RewritePlan]):
        """``mod`` with every Relax function rewritten by the plan ``plan_of(func)`` makes for
        it (plans are made one function after another); ``mod`` itself when no plan edits."""
        changed = False
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            plan = plan_of(func)
            if plan:
                self.builder_.update_func(gv, self.rewrite_function(func, plan))
                changed = True
        return self.builder_.finalize() if changed else mod
