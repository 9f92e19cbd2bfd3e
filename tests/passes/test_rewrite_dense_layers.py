"""IR tests of ``RewriteDenseLayers``: each dense layer becomes one ``call_tir`` of our kernels.

The grouped-sparse path is checked exactly (Expected ``main`` in TVMScript, with the packed
operands computed here in numpy, and the kernel's signature). The dense kernel's operand layout
is not fixed by these tests (it is being reworked): for it they check the call structure, the
callee and that its operands are what its parameters ask for.
"""

import logging

import numpy as np
import pytest
import tvm
from builders import (
    HASWELL,
    assert_main_equal,
    assert_signatures_equal,
    const_operands,
    he,
    layer_attrs,
    op_names,
    packed_ref,
    primfunc_names,
    rms_prune,
    signature,
    tir_calls,
)
from tvm.script import ir as I, relax as R, tirx as T

from tvm_scalpel.passes import RewriteDenseLayers
from tvm_scalpel.targets import resolve_target


def mlp(w0_nk, b0, w1_kn, b1):
    """``Gemm(transB=1)`` 20 -> 8 with bias and ReLU, then ``MatMul`` + ``Add`` 8 -> 4."""

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor(("n", 20), "float32")) -> R.Tensor(("n", 4), "float32"):
            n = T.int64()
            with R.dataflow():
                wt = R.permute_dims(R.const(w0_nk), axes=[1, 0])
                h = R.matmul(x, wt)
                hb = R.add(h, R.const(b0))
                hr = R.nn.relu(hb)
                y = R.matmul(hr, R.const(w1_kn))
                yb = R.add(y, R.const(b1))
                R.output(yb)
            return yb

    return Module


@pytest.fixture
def pruned(rng):
    """Layer 0 pruned in groups of 4 along K = 20 (5 groups a row, 30 of 40 removed); layer 1's
    K = 8 in groups of 4 (6 of 8 removed)."""
    w0 = rms_prune(he(rng, 8, 20), 4, 30)
    w1 = rms_prune(he(rng, 4, 8), 4, 6)
    return w0, he(rng, 8), np.ascontiguousarray(w1.T), he(rng, 4)


def test_pruned_layers_become_grouped_sparse_calls(pruned):
    w0, b0, w1_kn, b1 = pruned
    after = RewriteDenseLayers(HASWELL, mode="sparse")(mlp(w0, b0, w1_kn, b1))
    v0, o0, p0 = packed_ref(w0, 4)
    v1, o1, p1 = packed_ref(w1_kn.T, 4)
    g0, g1 = len(o0), len(o1)

    @I.ir_module
    class Expected:
        # kernel stubs: only their signatures are compared (their bodies are generated)
        @T.prim_func(private=True)
        def scalpel_grouped_sparse_dense_8x20_g4(
            x_h: T.handle, values: T.Buffer((g0, 4), "float32"), offsets: T.Buffer((g0,), "int32"),
            indptr: T.Buffer((9,), "int32"), bias: T.Buffer((8,), "float32"), y_h: T.handle,
        ):
            batch = T.int64()
            x = T.match_buffer(x_h, (batch, 20), "float32")
            y = T.match_buffer(y_h, (batch, 8), "float32")
            T.evaluate(0)

        @T.prim_func(private=True)
        def scalpel_grouped_sparse_dense_4x8_g4(
            x_h: T.handle, values: T.Buffer((g1, 4), "float32"), offsets: T.Buffer((g1,), "int32"),
            indptr: T.Buffer((5,), "int32"), bias: T.Buffer((4,), "float32"), y_h: T.handle,
        ):
            batch = T.int64()
            x = T.match_buffer(x_h, (batch, 8), "float32")
            y = T.match_buffer(y_h, (batch, 4), "float32")
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor(("n", 20), "float32")) -> R.Tensor(("n", 4), "float32"):
            n = T.int64()
            cls = Expected
            with R.dataflow():
                h = R.call_tir(cls.scalpel_grouped_sparse_dense_8x20_g4,
                               (x, R.const(v0), R.const(o0), R.const(p0), R.const(b0)),
                               out_ty=R.Tensor((n, 8), "float32"))
                y = R.call_tir(cls.scalpel_grouped_sparse_dense_4x8_g4,
                               (h, R.const(v1), R.const(o1), R.const(p1), R.const(b1)),
                               out_ty=R.Tensor((n, 4), "float32"))
                R.output(y)
            return y

    assert_main_equal(after, Expected)
    # the tail group of a row (columns 16..19) starts at K - g = 16, in bounds already; the
    # second layer's K = 8 has none: offsets are multiples of 4 below K
    assert set(o0.tolist()) <= {0, 4, 8, 12, 16}
    for name, n, k, groups in [("scalpel_grouped_sparse_dense_8x20_g4", 8, 20, g0),
                               ("scalpel_grouped_sparse_dense_4x8_g4", 4, 8, g1)]:
        assert_signatures_equal(after, Expected, name)
        # ReLU fused into the first kernel only (the second layer has none)
        assert layer_attrs(after[name]) == [
            {"n": n, "k": k, "relu": int(n == 8), "group_width": 4, "n_groups": groups}]


def test_partial_tail_group_is_moved_in_bounds(rng):
    """K = 20 in groups of 8: each row's third group covers columns 16..19 only; packed, it
    starts at 12 with zeros in the 4 lanes of columns 12..15."""
    w0 = he(rng, 8, 20)
    w0[:, :8] = 0.0  # first group of every row removed; groups 8..15 and 16..19 kept
    w0[::2, 8:16] = 0.0
    after = RewriteDenseLayers(HASWELL, mode="sparse")(mlp(w0, he(rng, 8), he(rng, 8, 4), he(rng, 4)))
    (name, call), _ = tir_calls(after["main"])
    assert name == "scalpel_grouped_sparse_dense_8x20_g8"
    values, offsets, indptr, _ = const_operands(call)
    np.testing.assert_array_equal(indptr, [0, 1, 3, 4, 6, 7, 9, 10, 12])
    np.testing.assert_array_equal(offsets, [12, 8, 12] * 4)  # even rows: the tail only
    tail = values[0]
    np.testing.assert_array_equal(tail[:4], 0.0)
    np.testing.assert_array_equal(tail[4:], w0[0, 16:20])
    np.testing.assert_array_equal(values[1], w0[1, 8:16])


def assert_dense_call(call, data, n, k, after):
    """A dense kernel call, its weight layout left open: the callee is our dense kernel for the
    layer, the data comes first, every other operand is a constant of the shape and type the
    kernel's parameter asks for, and the output is ``[batch, n]``."""
    callee, c = call
    assert "dense" in callee and "sparse" not in callee, callee
    assert c.args[1].fields[0].same_as(data)
    params = signature(after[callee])
    operands = const_operands(c)
    assert len(params) == len(operands) + 2  # x, the constants, y
    assert [(str(list(a.shape)), str(a.dtype)) for a in operands] == params[1:-1]
    assert [int(d) for d in c.ty.shape.values[1:]] == [n]


@pytest.mark.parametrize("mode", ["dense", "auto"])
def test_dense_kernel_when_not_sparse(rng, mode):
    """mode="dense" with pruned weights; "auto" with unpruned ones (nothing to skip)."""
    if mode == "dense":
        w0, w1_kn = rms_prune(he(rng, 8, 20), 4, 30), rms_prune(he(rng, 4, 8), 4, 6).T.copy()
    else:
        w0, w1_kn = he(rng, 8, 20), he(rng, 8, 4)
    before = mlp(w0, he(rng, 8), w1_kn, he(rng, 4))
    report = []
    after = RewriteDenseLayers(HASWELL, mode=mode, report=report)(before)
    assert op_names(after["main"]) == ["relax.call_tir"] * 2  # matmul, add, relu all absorbed
    (n0, c0), (n1, c1) = tir_calls(after["main"])
    assert_dense_call((n0, c0), after["main"].params[0], 8, 20, after)
    assert_dense_call((n1, c1), after["main"].body.blocks[0].bindings[0].var, 4, 8, after)
    assert [d.kernel for d in report] == ["dense", "dense"]
    assert not any("sparse" in name for name in primfunc_names(after))


def test_auto_mode_follows_the_cost_model(rng):
    """The cost model on an 8-lane target: the dense layer costs 8*20/8 = 20 vector FMAs, a
    kept group of 4 costs 1 FMA + 0.5 overhead. 14 kept groups (21) do not pay, 4 (6) do."""
    w_light = rms_prune(he(rng, 8, 20), 4, 26)  # 14 of 40 groups kept: speedup 20/21
    w_heavy = rms_prune(he(rng, 8, 20), 4, 36)  # 4 kept: speedup 20/6
    for w, kernel, speedup in [(w_light, "dense", 20 / 21), (w_heavy, "grouped-sparse", 20 / 6)]:
        report = []
        after = RewriteDenseLayers(HASWELL, mode="auto", report=report)(
            mlp(w, he(rng, 8), he(rng, 8, 4), he(rng, 4)))
        assert [d.kernel for d in report] == [kernel, "dense"]
        assert report[0].group_width == 4 and report[0].estimated_speedup == pytest.approx(speedup)
        name = tir_calls(after["main"])[0][0]
        assert ("grouped_sparse" in name) == (kernel == "grouped-sparse")


def test_sparse_mode_keeps_a_layer_without_zeros_dense(rng):
    report = []
    after = RewriteDenseLayers(HASWELL, mode="sparse", report=report)(
        mlp(he(rng, 8, 20), he(rng, 8), rms_prune(he(rng, 4, 8), 4, 6).T.copy(), he(rng, 4)))
    assert [d.kernel for d in report] == ["dense", "grouped-sparse"]
    names = [name for name, _ in tir_calls(after["main"])]
    assert "sparse" not in names[0] and names[1] == "scalpel_grouped_sparse_dense_4x8_g4"


def rank3(w_kn):
    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((2, 3, 8), "float32")) -> R.Tensor((2, 3, 4), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.const(w_kn))
                yr = R.nn.relu(y)
                R.output(yr)
            return yr

    return Module


def test_unsupported_layer_left_as_it_is(rng, caplog):
    w = he(rng, 8, 4)
    with caplog.at_level(logging.WARNING, logger="tvm_scalpel.passes"):
        after = RewriteDenseLayers(HASWELL, mode="sparse")(rank3(w))
    tvm.ir.assert_structural_equal(after, rank3(w))
    assert any("left as it is" in r.getMessage() and "rank 2" in r.getMessage()
               for r in caplog.records)


def test_no_kernels_for_the_target_kind(rng, caplog):
    """A target we have no kernels for (C source): the module is returned as it was."""
    before = mlp(he(rng, 8, 20), he(rng, 8), he(rng, 8, 4), he(rng, 4))
    with caplog.at_level(logging.WARNING, logger="tvm_scalpel.passes"):
        after = RewriteDenseLayers(resolve_target('{"kind": "c"}'))(before)
    tvm.ir.assert_structural_equal(after, before)
    assert any("no dense-layer kernels" in r.getMessage() for r in caplog.records)
