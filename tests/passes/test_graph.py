"""Tests of the graph toolkit every pass is written with (``passes/graph.py``): the index of a
function's bindings, users and constants; the layer matcher (dense weights stored as they are
or behind ``permute_dims``, conv weights, bias, ReLU); the rewriter (a plan's bindings emitted
in place, constants swapped, dead bindings dropped). Before/Expected modules in TVMScript."""

import numpy as np
import pytest
import tvm
from builders import he
from tvm import relax
from tvm.script import ir as I, relax as R, tirx as T

from tvm_scalpel.passes.graph import (
    GraphIndex,
    GraphRewriter,
    RewritePlan,
    conv_layout_problem,
    match_layer,
)


def mlp(w_nk, b, w2_kn):
    """``Gemm(transB=1)`` 6 -> 4 with bias and ReLU, then ``MatMul`` 4 -> 3 (no bias)."""

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor(("n", 6), "float32")) -> R.Tensor(("n", 3), "float32"):
            n = T.int64()
            with R.dataflow():
                wt = R.permute_dims(R.const(w_nk), axes=[1, 0])
                h = R.matmul(x, wt)
                hb = R.add(h, R.const(b))
                hr = R.nn.relu(hb)
                y = R.matmul(hr, R.const(w2_kn))
                R.output(y)
            return y

    return Module


@pytest.fixture
def weights(rng):
    return he(rng, 4, 6), he(rng, 4), he(rng, 4, 3)


def var(index: GraphIndex, name: str) -> relax.Var:
    (found,) = [b.var for b in index.bindings if b.var.name == name]
    return found


# --------------------------------------------------------------------------- the index


def test_index_bindings_users_and_constants(weights):
    w_nk, b, w2_kn = weights
    func = mlp(w_nk, b, w2_kn)["main"]
    index = GraphIndex(func)
    names = ["wt", "h", "hb", "hr", "y"]
    assert [str(binding.var.name) for binding in index.bindings] == names
    wt, h, hb, hr, y = (var(index, n) for n in names)
    x = func.params[0]
    assert index.uses[x] == 1 and index.uses[h] == 1
    assert index.uses[y] == 1  # the function's result is a read
    assert index.readers[x] == [h] and index.readers[h] == [hb] and y not in index.readers
    value = index.value_of(h)
    assert str(value.op.name) == "relax.matmul" and value.args[0].same_as(x) and value.args[1].same_as(wt)
    assert index.value_of(x) is None  # a parameter is bound by no binding
    # each constant once, in the order they are first read, each read once
    arrays = [c.value.numpy() for c in index.constants]
    assert len(arrays) == 3
    for got, want in zip(arrays, [w_nk, b, w2_kn]):
        np.testing.assert_array_equal(got, want)
    assert [index.const_uses[c] for c in index.constants] == [1, 1, 1]
    assert index.sole_reader(h) == hb
    assert index.sole_reader(h, "relax.add") == hb
    assert index.sole_reader(h, "relax.nn.relu") is None  # read by an add, not a relu
    assert index.sole_reader(y) is None  # read by the function's result only


def test_index_shared_constant_and_branch(rng):
    """A constant read twice counts twice; a var read twice (by two bindings, or by a binding
    and the function's result) has no sole reader."""
    shared = relax.const(he(rng, 5))

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((2, 5), "float32")):
            with R.dataflow():
                a = R.add(x, shared)
                b = R.multiply(a, shared)
                c = R.add(a, b)
                d = R.nn.relu(c)
                R.output(c, d)
            return (c, d)

    index = GraphIndex(Module["main"])
    assert len(index.constants) == 1 and index.const_uses[index.constants[0]] == 2
    a, b, c = (var(index, n) for n in "abc")
    assert index.uses[a] == 2 and index.readers[a] == [b, c]
    assert index.sole_reader(a) is None
    assert index.sole_reader(b, "relax.add") == c
    d = var(index, "d")
    assert index.readers[c] == [d] and index.uses[c] == 2
    assert index.sole_reader(c) is None


def test_index_tuple_items(rng):
    gamma, beta, mean, variance = he(rng, 3), he(rng, 3), he(rng, 3), np.abs(he(rng, 3))

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((1, 3, 4, 4), "float32")) -> R.Tensor((1, 3, 4, 4), "float32"):
            with R.dataflow():
                bn = R.nn.batch_norm(x, R.const(gamma), R.const(beta), R.const(mean),
                                     R.const(variance), axis=1)
                y = bn[0]
                m = bn[1]
                R.output(y)
            return y

    index = GraphIndex(Module["main"])
    bn, y, m = (var(index, n) for n in ("bn", "y", "m"))
    assert index.tuple_items(bn) == {0: y, 1: m}
    assert index.uses.get(m, 0) == 0


# --------------------------------------------------------------------------- the layer matcher


def test_match_transposed_weight_with_bias_and_relu(weights):
    w_nk, b, w2_kn = weights
    index = GraphIndex(mlp(w_nk, b, w2_kn)["main"])
    wt, h, hb, hr = (var(index, n) for n in ("wt", "h", "hb", "hr"))
    layer = match_layer(index, h)
    assert layer.kind == "dense" and layer.op == h
    assert layer.transposed and layer.permute == wt
    np.testing.assert_array_equal(layer.weight.value.numpy(), w_nk)  # the stored [N, K] constant
    assert layer.data.same_as(index.func.params[0])
    np.testing.assert_array_equal(layer.bias, b)
    assert layer.relu and layer.output == hr and layer.fused == [h, hb]
    # without the epilogue: the matmul alone
    bare = match_layer(index, h, epilogue=False)
    assert bare.output == h and bare.bias is None and not bare.relu and bare.fused == []


def test_match_untransposed_weight_without_bias(weights):
    w_nk, b, w2_kn = weights
    index = GraphIndex(mlp(w_nk, b, w2_kn)["main"])
    y = var(index, "y")
    layer = match_layer(index, y)
    assert layer.kind == "dense" and not layer.transposed and layer.permute is None
    np.testing.assert_array_equal(layer.weight.value.numpy(), w2_kn)  # [K, N] as stored
    assert layer.bias is None and not layer.relu and layer.output == y and layer.fused == []
    for name in ("wt", "hb", "hr"):  # not layers
        assert match_layer(index, var(index, name)) is None
    assert match_layer(index, y, kind="conv") is None


@pytest.mark.parametrize("shape,absorbed", [((1, 4), True), ((1,), True), ((4, 1), False), ((4, 4), False)])
def test_match_bias_shapes(rng, shape, absorbed):
    """A bias broadcasting over [B, N] as a vector of N is absorbed (``[1, N]``, ``[1]``); one
    that changes the output's shape or varies along the batch is not."""
    w_kn, bias = he(rng, 6, 4), he(rng, *shape)

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((4, 6), "float32")):
            with R.dataflow():
                h = R.matmul(x, R.const(w_kn))
                hb = R.add(R.const(bias), h)  # the bias first: either operand order is taken
                R.output(hb)
            return hb

    index = GraphIndex(Module["main"])
    layer = match_layer(index, var(index, "h"))
    if absorbed:
        np.testing.assert_array_equal(layer.bias, np.broadcast_to(bias.reshape(-1), (4,)))
        assert layer.output == var(index, "hb")
    else:
        assert layer.bias is None and layer.output == var(index, "h")


def test_match_stops_where_a_value_is_read_twice(rng):
    """The bias add's result also feeds the output: the ReLU is not part of the layer."""
    w_kn, bias = he(rng, 6, 4), he(rng, 4)

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((2, 6), "float32")):
            with R.dataflow():
                h = R.matmul(x, R.const(w_kn))
                hb = R.add(h, R.const(bias))
                hr = R.nn.relu(hb)
                out = R.add(hr, hb)
                R.output(out)
            return out

    index = GraphIndex(Module["main"])
    layer = match_layer(index, var(index, "h"))
    assert layer.bias is not None and not layer.relu and layer.output == var(index, "hb")


def test_match_weight_kinds(rng):
    """A permute_dims that does not swap the two axes, or a weight that is no constant, is not
    a layer for the default matcher; ``is_weight`` may accept a parameter instead."""
    square = he(rng, 6, 6)

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((2, 6), "float32"), w: R.Tensor((4, 6), "float32")):
            with R.dataflow():
                same = R.permute_dims(R.const(square), axes=[0, 1])
                a = R.matmul(x, same)
                wt = R.permute_dims(w, axes=[1, 0])
                b = R.matmul(x, wt)
                R.output(a, b)
            return (a, b)

    func = Module["main"]
    index = GraphIndex(func)
    a, b, wt = var(index, "a"), var(index, "b"), var(index, "wt")
    assert match_layer(index, a) is None
    assert match_layer(index, b) is None
    w = func.params[1]
    layer = match_layer(index, b, is_weight=lambda leaf, kind: leaf.same_as(w))
    assert layer.weight.same_as(w) and layer.transposed and layer.permute == wt


def test_match_conv_with_reshaped_bias_and_relu(rng):
    """The ONNX importer's conv bias: ``reshape`` of a constant of O values to [1, O, 1, 1]."""
    kernel, bias = he(rng, 4, 3, 3, 3), he(rng, 4)

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((1, 3, 6, 6), "float32")):
            with R.dataflow():
                c = R.nn.conv2d(x, R.const(kernel))
                rb = R.reshape(R.const(bias), R.shape([1, 4, 1, 1]))
                cb = R.add(c, rb)
                cr = R.nn.relu(cb)
                R.output(cr)
            return cr

    index = GraphIndex(Module["main"])
    c, cb, cr = (var(index, n) for n in ("c", "cb", "cr"))
    layer = match_layer(index, c)
    assert layer.kind == "conv" and not layer.transposed
    np.testing.assert_array_equal(layer.weight.value.numpy(), kernel)
    np.testing.assert_array_equal(layer.bias, bias)
    assert layer.relu and layer.output == cr and layer.fused == [c, cb]
    assert match_layer(index, c, kind="dense") is None


def test_conv_layout_problem():
    x = relax.Var("x", relax.TensorType((1, 8, 6, 6), "float32"))
    w = relax.const(np.ones((8, 4, 3, 3), np.float32))
    plain = relax.op.nn.conv2d(x, relax.const(np.ones((8, 8, 3, 3), np.float32)))
    grouped = relax.op.nn.conv2d(x, w, groups=2)
    nhwc = relax.op.nn.conv2d(relax.Var("y", relax.TensorType((1, 6, 6, 8), "float32")),
                              relax.const(np.ones((8, 8, 3, 3), np.float32)), data_layout="NHWC")
    assert conv_layout_problem(plain.attrs) is None
    assert conv_layout_problem(grouped.attrs) == "grouped convolution (groups=2) is not supported"
    assert conv_layout_problem(grouped.attrs, groups_ok=True) is None
    assert conv_layout_problem(nhwc.attrs) == "layout NHWC/OIHW is not supported"


# --------------------------------------------------------------------------- the rewriter


def test_rewriter_emits_in_place_and_drops_dead_bindings(weights):
    """The layer's output is replaced by what the plan makes (an intermediate binding, then
    the value); the bindings the layer absorbed, now unread, are gone."""
    w_nk, b, w2_kn = weights
    before = mlp(w_nk, b, w2_kn)
    index = GraphIndex(before["main"])
    layer = match_layer(index, var(index, "h"))

    w_kn = np.ascontiguousarray(w_nk.T)

    def make(bb, visit):
        t = bb.emit(relax.op.matmul(visit(layer.data), relax.const(w_kn)))
        return relax.op.nn.relu(t)

    after = GraphRewriter(before).rewrite(before, lambda func: RewritePlan({layer.output: make}))

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(("n", 6), "float32")) -> R.Tensor(("n", 3), "float32"):
            n = T.int64()
            with R.dataflow():
                t = R.matmul(x, R.const(w_kn))
                hr = R.nn.relu(t)
                y = R.matmul(hr, R.const(w2_kn))
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(after, Expected)
    relax.analysis.well_formed(after)


def test_rewriter_keeps_an_output_an_output(weights):
    w_nk, b, w2_kn = weights
    before = mlp(w_nk, b, w2_kn)
    index = GraphIndex(before["main"])
    hr, y = var(index, "hr"), var(index, "y")
    plan = RewritePlan({y: lambda bb, visit: relax.op.nn.silu(visit(hr))})
    after = GraphRewriter(before).rewrite(before, lambda func: plan)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(("n", 6), "float32")) -> R.Tensor(("n", 4), "float32"):
            n = T.int64()
            with R.dataflow():
                wt = R.permute_dims(R.const(w_nk), axes=[1, 0])
                h = R.matmul(x, wt)
                hb = R.add(h, R.const(b))
                hr = R.nn.relu(hb)
                y = R.nn.silu(hr)
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(after, Expected)
    relax.analysis.well_formed(after)


def test_rewriter_var_replacement_removes_the_binding(weights):
    """A var given as the new value stands for the binding: its readers read that var."""
    w_nk, b, w2_kn = weights
    before = mlp(w_nk, b, w2_kn)
    index = GraphIndex(before["main"])
    hb, hr = var(index, "hb"), var(index, "hr")
    after = GraphRewriter(before).rewrite(
        before, lambda func: RewritePlan({hr: lambda bb, visit: visit(hb)}))

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(("n", 6), "float32")) -> R.Tensor(("n", 3), "float32"):
            n = T.int64()
            with R.dataflow():
                wt = R.permute_dims(R.const(w_nk), axes=[1, 0])
                h = R.matmul(x, wt)
                hb = R.add(h, R.const(b))
                y = R.matmul(hb, R.const(w2_kn))
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(after, Expected)


@pytest.mark.parametrize("drop_dead", [False, True])
def test_rewriter_swaps_constants(rng, drop_dead):
    """Constants are swapped wherever they occur; an unread binding stays unless asked."""
    old, new = relax.const(he(rng, 5)), he(rng, 5)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 5), "float32")) -> R.Tensor((2, 5), "float32"):
            with R.dataflow():
                unread = R.multiply(x, old)
                y = R.add(x, old)
                R.output(y)
            return y

    plan = RewritePlan(constants={old: relax.const(new)}, drop_dead=drop_dead)
    after = GraphRewriter(Before).rewrite(Before, lambda func: plan)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 5), "float32")) -> R.Tensor((2, 5), "float32"):
            with R.dataflow():
                unread = R.multiply(x, R.const(new))
                y = R.add(x, R.const(new))
                R.output(y)
            return y

    @I.ir_module
    class ExpectedDropped:
        @R.function
        def main(x: R.Tensor((2, 5), "float32")) -> R.Tensor((2, 5), "float32"):
            with R.dataflow():
                y = R.add(x, R.const(new))
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(after, ExpectedDropped if drop_dead else Expected)


def test_rewriter_without_plan_returns_the_module(weights):
    before = mlp(*weights)
    assert GraphRewriter(before).rewrite(before, lambda func: RewritePlan()) is before


def test_rewrite_function(weights):
    """One function rewritten, the module left as it is."""
    w_nk, b, w2_kn = weights
    before = mlp(w_nk, b, w2_kn)
    func = before["main"]
    index = GraphIndex(func)
    hb, hr = var(index, "hb"), var(index, "hr")
    new = GraphRewriter(before).rewrite_function(func, RewritePlan({hr: lambda bb, visit: visit(hb)}))
    assert [str(binding.var.name) for binding in GraphIndex(new).bindings] == ["wt", "h", "hb", "y"]
    assert [str(binding.var.name) for binding in GraphIndex(before["main"]).bindings] == \
        ["wt", "h", "hb", "hr", "y"]
