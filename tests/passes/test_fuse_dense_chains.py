"""IR tests of ``FuseDenseChains``: back-to-back kernel calls become one chained kernel call.

Before: ``main`` in TVMScript calling kernel stubs, which are then replaced by the real
grouped-sparse kernels (the pass reads their ``scalpel.layers`` attribute). Expected: ``main``
in TVMScript calling the chained kernel with every constant in layer order, and that kernel
equal to ``schedules.kernel`` of the layers' specs concatenated.
"""

import numpy as np
import tvm
from builders import HASWELL, assert_main_equal, he, primfunc_names
from tvm.script import ir as I, relax as R, tirx as T

from tvm_scalpel import schedules
from tvm_scalpel.passes import FuseDenseChains
from tvm_scalpel.targets import resolve_target


def sparse_spec(n, k, relu, n_groups):
    return schedules.layer_spec(HASWELL, n, k, relu, 4, n_groups)


def operands(rng, spec):
    """Packed grouped-sparse operands of a spec (any values: the pass only moves them)."""
    g = spec.group_width
    offsets = (np.arange(spec.n_groups) % (spec.k // g) * g).astype(np.int32)
    indptr = np.linspace(0, spec.n_groups, spec.n + 1).astype(np.int32)
    return [he(rng, spec.n_groups, g), offsets, indptr, he(rng, spec.n)]


def with_kernels(mod: tvm.IRModule, kernels: dict) -> tvm.IRModule:
    """``mod`` with each stub named in ``kernels`` replaced by that PrimFunc (of the same
    signature: the stubs declare the real kernels' parameters)."""
    mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions_items()))
    for name, func in kernels.items():
        mod.update_func(mod.get_global_var(name), func)
    tvm.relax.analysis.well_formed(mod)  # the calls match the real kernels' signatures
    return mod


S1, S2, S3 = sparse_spec(8, 16, True, 6), sparse_spec(8, 8, True, 5), sparse_spec(4, 8, False, 3)


def chain3(c1, c2, c3):
    """x -> k1 -> k2 -> k3, every intermediate read once."""

    @I.ir_module
    class Module:
        @T.prim_func(private=True)
        def k1(x_h: T.handle, values: T.Buffer((S1.n_groups, 4), "float32"),
                offsets: T.Buffer((S1.n_groups,), "int32"), indptr: T.Buffer((S1.n + 1,), "int32"),
                bias: T.Buffer((S1.n,), "float32"), y_h: T.handle):
            batch = T.int64()
            x = T.match_buffer(x_h, (batch, S1.k), "float32")
            y = T.match_buffer(y_h, (batch, S1.n), "float32")
            T.evaluate(0)

        @T.prim_func(private=True)
        def k2(x_h: T.handle, values: T.Buffer((S2.n_groups, 4), "float32"),
                offsets: T.Buffer((S2.n_groups,), "int32"), indptr: T.Buffer((S2.n + 1,), "int32"),
                bias: T.Buffer((S2.n,), "float32"), y_h: T.handle):
            batch = T.int64()
            x = T.match_buffer(x_h, (batch, S2.k), "float32")
            y = T.match_buffer(y_h, (batch, S2.n), "float32")
            T.evaluate(0)

        @T.prim_func(private=True)
        def k3(x_h: T.handle, values: T.Buffer((S3.n_groups, 4), "float32"),
                offsets: T.Buffer((S3.n_groups,), "int32"), indptr: T.Buffer((S3.n + 1,), "int32"),
                bias: T.Buffer((S3.n,), "float32"), y_h: T.handle):
            batch = T.int64()
            x = T.match_buffer(x_h, (batch, S3.k), "float32")
            y = T.match_buffer(y_h, (batch, S3.n), "float32")
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor(("n", 16), "float32")) -> R.Tensor(("n", 4), "float32"):
            n = T.int64()
            cls = Module
            with R.dataflow():
                h1 = R.call_tir(cls.k1, (x, *[R.const(c) for c in c1]), out_ty=R.Tensor((n, 8), "float32"))
                h2 = R.call_tir(cls.k2, (h1, *[R.const(c) for c in c2]), out_ty=R.Tensor((n, 8), "float32"))
                y = R.call_tir(cls.k3, (h2, *[R.const(c) for c in c3]), out_ty=R.Tensor((n, 4), "float32"))
                R.output(y)
            return y

    return with_kernels(Module, {"k1": schedules.kernel(HASWELL, [S1]),
                                 "k2": schedules.kernel(HASWELL, [S2]),
                                 "k3": schedules.kernel(HASWELL, [S3])})


def test_chain_of_three_becomes_one_call(rng):
    c1, c2, c3 = operands(rng, S1), operands(rng, S2), operands(rng, S3)
    after = FuseDenseChains(HASWELL)(chain3(c1, c2, c3))

    @I.ir_module(check_well_formed=False)  # a stub of the chained kernel: only main is compared
    class Expected:
        @T.prim_func(private=True)
        def scalpel_chain_16_8_8_4(x: T.handle):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor(("n", 16), "float32")) -> R.Tensor(("n", 4), "float32"):
            n = T.int64()
            cls = Expected
            with R.dataflow():
                y = R.call_tir(cls.scalpel_chain_16_8_8_4,
                               (x, *[R.const(c) for c in c1 + c2 + c3]),
                               out_ty=R.Tensor((n, 4), "float32"))
                R.output(y)
            return y

    assert_main_equal(after, Expected)
    tvm.ir.assert_structural_equal(after["scalpel_chain_16_8_8_4"],
                                   schedules.kernel(HASWELL, [S1, S2, S3]))


def test_intermediate_read_twice_is_not_fused(rng):
    """h1 also feeds the output: k1 stays a call of its own; k2 -> k3 still fuse."""
    c1, c2, c3 = operands(rng, S1), operands(rng, S2), operands(rng, S3)

    @I.ir_module
    class Before:
        @T.prim_func(private=True)
        def k1(x_h: T.handle, values: T.Buffer((S1.n_groups, 4), "float32"),
                offsets: T.Buffer((S1.n_groups,), "int32"), indptr: T.Buffer((S1.n + 1,), "int32"),
                bias: T.Buffer((S1.n,), "float32"), y_h: T.handle):
            batch = T.int64()
            x = T.match_buffer(x_h, (batch, S1.k), "float32")
            y = T.match_buffer(y_h, (batch, S1.n), "float32")
            T.evaluate(0)

        @T.prim_func(private=True)
        def k2(x_h: T.handle, values: T.Buffer((S2.n_groups, 4), "float32"),
                offsets: T.Buffer((S2.n_groups,), "int32"), indptr: T.Buffer((S2.n + 1,), "int32"),
                bias: T.Buffer((S2.n,), "float32"), y_h: T.handle):
            batch = T.int64()
            x = T.match_buffer(x_h, (batch, S2.k), "float32")
            y = T.match_buffer(y_h, (batch, S2.n), "float32")
            T.evaluate(0)

        @T.prim_func(private=True)
        def k3(x_h: T.handle, values: T.Buffer((S3.n_groups, 4), "float32"),
                offsets: T.Buffer((S3.n_groups,), "int32"), indptr: T.Buffer((S3.n + 1,), "int32"),
                bias: T.Buffer((S3.n,), "float32"), y_h: T.handle):
            batch = T.int64()
            x = T.match_buffer(x_h, (batch, S3.k), "float32")
            y = T.match_buffer(y_h, (batch, S3.n), "float32")
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor(("n", 16), "float32")):
            n = T.int64()
            cls = Before
            with R.dataflow():
                h1 = R.call_tir(cls.k1, (x, *[R.const(c) for c in c1]), out_ty=R.Tensor((n, 8), "float32"))
                h2 = R.call_tir(cls.k2, (h1, *[R.const(c) for c in c2]), out_ty=R.Tensor((n, 8), "float32"))
                y = R.call_tir(cls.k3, (h2, *[R.const(c) for c in c3]), out_ty=R.Tensor((n, 4), "float32"))
                out = (y, h1)
                R.output(out)
            return out

    before = with_kernels(Before, {"k1": schedules.kernel(HASWELL, [S1]),
                                   "k2": schedules.kernel(HASWELL, [S2]),
                                   "k3": schedules.kernel(HASWELL, [S3])})
    after = FuseDenseChains(HASWELL)(before)

    @I.ir_module(check_well_formed=False)  # a stub of the chained kernel: only main is compared
    class Expected:
        @T.prim_func(private=True)
        def k1(x_h: T.handle, values: T.Buffer((S1.n_groups, 4), "float32"),
                offsets: T.Buffer((S1.n_groups,), "int32"), indptr: T.Buffer((S1.n + 1,), "int32"),
                bias: T.Buffer((S1.n,), "float32"), y_h: T.handle):
            batch = T.int64()
            x = T.match_buffer(x_h, (batch, S1.k), "float32")
            y = T.match_buffer(y_h, (batch, S1.n), "float32")
            T.evaluate(0)

        @T.prim_func(private=True)
        def scalpel_chain_8_8_4(x: T.handle):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor(("n", 16), "float32")):
            n = T.int64()
            cls = Expected
            with R.dataflow():
                h1 = R.call_tir(cls.k1, (x, *[R.const(c) for c in c1]), out_ty=R.Tensor((n, 8), "float32"))
                y = R.call_tir(cls.scalpel_chain_8_8_4, (h1, *[R.const(c) for c in c2 + c3]),
                               out_ty=R.Tensor((n, 4), "float32"))
                out = (y, h1)
                R.output(out)
            return out

    assert_main_equal(after, Expected)
    tvm.ir.assert_structural_equal(after["scalpel_chain_8_8_4"], schedules.kernel(HASWELL, [S2, S3]))


def test_foreign_kernel_breaks_the_chain(rng):
    """A call_tir of a PrimFunc that is not ours (no ``scalpel.layers``) between two of ours:
    nothing to fuse, the module is returned as it was."""
    c1, c3 = operands(rng, S1), operands(rng, S3)

    @I.ir_module
    class Before:
        @T.prim_func(private=True)
        def k1(x_h: T.handle, values: T.Buffer((S1.n_groups, 4), "float32"),
                offsets: T.Buffer((S1.n_groups,), "int32"), indptr: T.Buffer((S1.n + 1,), "int32"),
                bias: T.Buffer((S1.n,), "float32"), y_h: T.handle):
            batch = T.int64()
            x = T.match_buffer(x_h, (batch, S1.k), "float32")
            y = T.match_buffer(y_h, (batch, S1.n), "float32")
            T.evaluate(0)

        @T.prim_func(private=True)
        def k3(x_h: T.handle, values: T.Buffer((S3.n_groups, 4), "float32"),
                offsets: T.Buffer((S3.n_groups,), "int32"), indptr: T.Buffer((S3.n + 1,), "int32"),
                bias: T.Buffer((S3.n,), "float32"), y_h: T.handle):
            batch = T.int64()
            x = T.match_buffer(x_h, (batch, S3.k), "float32")
            y = T.match_buffer(y_h, (batch, S3.n), "float32")
            T.evaluate(0)

        @T.prim_func(private=True)
        def double(a: T.Buffer((T.int64(2), T.int64(8)), "float32"),
                   b: T.Buffer((T.int64(2), T.int64(8)), "float32")):
            for i, j in T.grid(T.int64(2), T.int64(8)):
                b[i, j] = a[i, j] * T.float32(2)

        @R.function
        def main(x: R.Tensor((2, 16), "float32")) -> R.Tensor((2, 4), "float32"):
            cls = Before
            with R.dataflow():
                h1 = R.call_tir(cls.k1, (x, *[R.const(c) for c in c1]), out_ty=R.Tensor((2, 8), "float32"))
                h2 = R.call_tir(cls.double, (h1,), out_ty=R.Tensor((2, 8), "float32"))
                y = R.call_tir(cls.k3, (h2, *[R.const(c) for c in c3]), out_ty=R.Tensor((2, 4), "float32"))
                R.output(y)
            return y

    before = with_kernels(Before, {"k1": schedules.kernel(HASWELL, [S1]),
                                   "k3": schedules.kernel(HASWELL, [S3])})
    after = FuseDenseChains(HASWELL)(before)
    tvm.ir.assert_structural_equal(after, before)


def test_not_on_gpu_targets(rng):
    before = chain3(operands(rng, S1), operands(rng, S2), operands(rng, S3))
    after = FuseDenseChains(resolve_target("cuda"))(before)
    tvm.ir.assert_structural_equal(after, before)
    assert primfunc_names(after) == {"k1", "k2", "k3"}
