"""The dlight rule for the elementwise functions TVM leaves unscheduled on CPUs
(``schedules/cpu_elementwise.py``), on its own and in whole compiled models against onnxruntime."""

import numpy as np
import pytest
import tvm
from helpers import make_model, ort_run, rel_err, vm_run
from onnx import helper, numpy_helper
from tvm import te
from tvm.s_tir import dlight

from tvm_scalpel import compile_onnx
from tvm_scalpel.schedules.cpu_elementwise import PARALLEL_MIN_ELEMENTS, Elementwise
from tvm_scalpel.targets import resolve_target

PROFILE = resolve_target("x86")


def scaled_root(shape, batch_var: bool = False):
    """``y = sqrt(x * 0.5 + 1)`` in three TE stages, as FuseTIR leaves an LRN's tail."""
    dims = [te.var("n")] + list(shape[1:]) if batch_var else list(shape)
    x = te.placeholder(dims, "float32", name="x")
    a = te.compute(dims, lambda *i: x(*i) * 0.5, name="scale")
    b = te.compute(dims, lambda *i: a(*i) + 1.0, name="shift")
    y = te.compute(dims, lambda *i: te.sqrt(b(*i)), name="rooted")
    return te.create_prim_func([x, y])


def scheduled(func):
    mod = tvm.IRModule({"main": func})
    with PROFILE.target:
        return dlight.ApplyDefaultSchedule(Elementwise())(mod)


@pytest.mark.parametrize("shape, vector, parallel", [
    ((8, 32, 16, 16), True, True),  # 65536 elements
    ((2, 16, 8), True, False),  # small: no threads
    ((3, 5, 7), False, False),  # no whole vectors: left serial and scalar
])
def test_rule_inlines_fuses_vectorizes_and_threads(rng, shape, vector, parallel):
    mod = scheduled(scaled_root(shape))
    text = mod["main"].script()
    assert 'sblock("scale")' not in text and 'sblock("shift")' not in text  # inlined into one
    assert ("T.vectorized" in text) == vector
    assert ("T.parallel" in text) == parallel
    assert (np.prod(shape) >= PARALLEL_MIN_ELEMENTS) == parallel or not vector
    lib = tvm.compile(mod, target=PROFILE.target)
    x = rng.random(shape).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(shape, np.float32))
    lib["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_allclose(out.numpy(), np.sqrt(x.astype(np.float64) * 0.5 + 1), rtol=1e-6)


def test_a_free_batch_stays_an_outer_loop(rng):
    mod = scheduled(scaled_root((1, 64, 32, 32), batch_var=True))
    text = mod["main"].script()
    assert "T.vectorized" in text and "T.parallel" in text
    lib = tvm.compile(mod, target=PROFILE.target)
    for batch in (1, 3):
        x = rng.random((batch, 64, 32, 32)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros_like(x))
        lib["main"](tvm.runtime.tensor(x), out)
        np.testing.assert_allclose(out.numpy(), np.sqrt(x.astype(np.float64) * 0.5 + 1), rtol=1e-6)


def test_a_reduction_is_left_to_others():
    x = te.placeholder((4, 64), "float32", name="x")
    k = te.reduce_axis((0, 64), name="k")
    y = te.compute((4,), lambda i: te.sum(x[i, k], axis=k), name="sum")
    func = te.create_prim_func([x, y])
    tvm.ir.assert_structural_equal(scheduled(func)["main"], func)


def test_leftover_elementwise_ops_in_a_model_match_onnxruntime(rng):
    """Conv -> SiLU (Sigmoid, Mul) -> BatchNormalization on its own -> Relu, batch free: TVM's
    legalized elementwise functions, scheduled by the rule."""
    c, o, hw = 4, 16, 12
    inits = [numpy_helper.from_array(rng.standard_normal((o, c, 3, 3)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, o).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "bias"),
             numpy_helper.from_array(rng.standard_normal(o).astype(np.float32) * 0.1, "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, o).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("Mul", ["c", "s"], ["silu"]),
             helper.make_node("BatchNormalization", ["silu", "scale", "bias", "mean", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["y"])]
    model = make_model(nodes, inits, [("x", ["N", c, hw, hw])], [("y", ["N", o, hw, hw])])
    built = compile_onnx(model, "x86")
    for batch in (1, 5):
        x = rng.standard_normal((batch, c, hw, hw)).astype(np.float32)
        assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-5
