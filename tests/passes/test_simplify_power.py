"""``SimplifyPower``: Before / Expected modules in TVMScript, and LRN graphs (ConvNet's) against
onnxruntime."""

import numpy as np
import pytest
import tvm
from helpers import make_model, ort_run, rel_err, vm_run
from onnx import helper, numpy_helper
from tvm.script import ir as I, relax as R

from tvm_scalpel import compile_onnx
from tvm_scalpel.passes import SimplifyPower


def power_module(exponent: float):
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                y = R.power(x, R.const(exponent, "float32"))
                R.output(y)
            return y

    return Before


def test_three_quarters_becomes_a_root_times_its_root():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                s = R.sqrt(x)
                q = R.sqrt(s)
                y = R.multiply(s, q)
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(SimplifyPower()(power_module(0.75)), Expected)


def test_one_and_a_half_and_two():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                s = R.sqrt(x)
                y = R.multiply(x, s)
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(SimplifyPower()(power_module(1.5)), Expected)

    @I.ir_module
    class Square:
        @R.function
        def main(x: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                y = R.multiply(x, x)
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(SimplifyPower()(power_module(2.0)), Square)


@pytest.mark.parametrize("exponent", [0.3, 3.5, -0.75, 0.0])
def test_other_exponents_stay_powers(exponent):
    before = power_module(exponent)
    tvm.ir.assert_structural_equal(SimplifyPower()(before), before)


def test_a_tensor_exponent_stays_a_power():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "float32"), e: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                y = R.power(x, e)
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(SimplifyPower()(Before), Before)


@pytest.mark.parametrize("beta", [0.75, 0.5, 1.25])
def test_lrn_after_a_conv_matches_onnxruntime(rng, beta):
    """Conv -> Relu -> LRN (across channels), as Caffe's cifar10_full and AlexNet have it."""
    w = (rng.standard_normal((12, 3, 3, 3)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("LRN", ["r"], ["y"], size=5, alpha=1e-2, beta=beta, bias=1.0)]
    model = make_model(nodes, [numpy_helper.from_array(w, "w")], [("x", ["N", 3, 9, 9])],
                       [("y", ["N", 12, 9, 9])])
    built = compile_onnx(model, "x86")
    for batch in (1, 3):
        x = (rng.standard_normal((batch, 3, 9, 9)) * 3).astype(np.float32)
        assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-5
