"""``SimplifyPower``: ``power(x, c)`` with a constant exponent of quarters -> sqrt and multiplies.

Local response normalization (ConvNet's, Caffe's AlexNet's) divides by ``(k + a * sum x^2) ^
0.75``; TVM's importer writes it as ``R.power(..., 0.75)``, which legalizes to a scalar ``powf``
call per element: 70% of the LRN's time, and a third of ConvNet's whole batch-8 inference on
Zen 4. ``x ^ (q / 4)`` is a product of ``x``, ``sqrt(x)`` and ``sqrt(sqrt(x))``, which vectorize
(and are as exact as ``powf`` to a rounding or two; NaN for a negative base, as ``powf`` gives).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .graph import GraphIndex, const_array, op_name, tensor_type

MAX_QUARTERS = 12  # exponents up to 3 (larger ones: more multiplies than a powf is worth)


def _quarters(expr: relax.Expr) -> int | None:
    """``q`` where ``expr`` is a scalar float constant equal to ``q / 4``, ``0 < q <= 12``."""
    value = const_array(expr)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    q = float(value.reshape(())) * 4
    if q != round(q) or not 0 < q <= MAX_QUARTERS:
        return None
    return int(round(q))


def _has_power(func) -> bool:
    if not isinstance(func, relax.Function):
        return False
    index = GraphIndex(func)
    return any(op_name(index.values[b.var]) == "relax.power" for b in index.bindings)


@relax.expr_functor.mutator
class _PowerRewriter(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if op_name(call) != "relax.power":
            return call
        q = _quarters(call.args[1])
        base = call.args[0]
        ty = tensor_type(base)
        if q is None or ty is None or not str(ty.dtype).startswith("float"):
            return call
        whole, rest = divmod(q, 4)  # x^whole * x^(rest/4), rest/4 = half (1 or 0) + quarter
        factors: list[relax.Expr] = [base] * whole
        if rest & 1:
            root = self.builder_.emit(relax.op.sqrt(base))
            if rest & 2:
                factors.append(root)
            factors.append(relax.op.sqrt(root))
        elif rest & 2:
            factors.append(relax.op.sqrt(base))
        out = factors[0]
        for factor in factors[1:]:
            out = relax.op.multiply(self._leaf(out), self._leaf(factor))
        return out  # the last call is the binding's own value

    def _leaf(self, expr: relax.Expr) -> relax.Expr:
        return self.builder_.emit(expr) if isinstance(expr, relax.Call) else expr


@tvm.transform.module_pass(opt_level=0, name="SimplifyPower")
class SimplifyPower:
    """Rewrite ``R.power(x, c)`` for a scalar constant ``c = q / 4`` (``0 < c <= 3``: LRN's
    0.75, 0.5, 1.5, 2, ...) into ``x``, ``R.sqrt(x)`` and ``R.sqrt(R.sqrt(x))`` multiplied."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not any(_has_power(func) for _, func in mod.functions_items()):
            return mod  # nothing to do: no block builder (Ctrl-C inside one warns at exit)
        rewriter = _PowerRewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

