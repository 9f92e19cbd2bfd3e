"""IR tests of ``RewriteConvLayers``, kept to what the conv lowering's rework leaves in place:
a pruned conv layer becomes a ``call_tir`` of a grouped-sparse kernel whose operands are its
unfolded weight ``W[O, C*KH*KW]`` packed (values, offsets, row pointer) and its bias, with bias
and ReLU fused; an unsupported layer is left as it was, with a warning; ``mode`` picks the
kernel. How the patches reach the kernel (im2col, a layout change) is not pinned here.
"""

import logging

import numpy as np
import pytest
import tvm
from builders import HASWELL, const_operands, he, op_names, packed_ref, rms_prune, tir_calls
from tvm.script import ir as I, relax as R

from tvm_scalpel.passes import RewriteConvLayers
from tvm_scalpel.targets import resolve_target


def conv(weight, bias):
    """conv 2 -> 4 (2x2) on 6x6 + bias ``[1, 4, 1, 1]`` + ReLU."""

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((1, 2, 6, 6), "float32")) -> R.Tensor((1, 4, 5, 5), "float32"):
            with R.dataflow():
                c = R.nn.conv2d(x, R.const(weight))
                cb = R.add(c, R.const(bias))
                cr = R.nn.relu(cb)
                R.output(cr)
            return cr

    return Module


@pytest.fixture
def pruned(rng):
    """W[4, 8] unfolded, 2 groups of 4 a filter, 5 of the 8 removed."""
    return rms_prune(he(rng, 4, 8), 4, 5).reshape(4, 2, 2, 2), he(rng, 1, 4, 1, 1)


def test_pruned_conv_becomes_a_grouped_sparse_call(pruned):
    weight, bias = pruned
    before = conv(weight, bias)
    after = RewriteConvLayers(HASWELL, mode="sparse")(before)
    ops = op_names(after["main"])
    assert not {"relax.nn.conv2d", "relax.add", "relax.nn.relu"} & set(ops), ops
    sparse = [(name, call) for name, call in tir_calls(after["main"]) if "grouped_sparse" in name]
    assert len(sparse) == 1
    name, call = sparse[0]
    assert name.endswith("4x8_g4"), name
    values, offsets, indptr, kernel_bias = const_operands(call)
    v, o, p = packed_ref(weight.reshape(4, 8), 4)
    np.testing.assert_array_equal(values, v)
    np.testing.assert_array_equal(offsets, o)
    np.testing.assert_array_equal(indptr, p)
    np.testing.assert_array_equal(kernel_bias, bias.reshape(4))
    # the function still maps [1, 2, 6, 6] to [1, 4, 5, 5]
    tvm.ir.assert_structural_equal(after["main"].ret_ty, before["main"].ret_ty)
    tvm.relax.analysis.well_formed(after)


def test_dense_mode_uses_no_sparse_kernel(pruned):
    after = RewriteConvLayers(HASWELL, mode="dense")(conv(*pruned))
    assert "relax.nn.conv2d" not in op_names(after["main"])
    names = [name for name, _ in tir_calls(after["main"])]
    assert names and not any("sparse" in n for n in names), names


def symbolic_image(weight):
    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((1, 4, "h", "w"), "float32")) -> R.Tensor((1, 4, "h - 1", "w - 1"), "float32"):
            with R.dataflow():
                c = R.nn.conv2d(x, R.const(weight))
                cr = R.nn.relu(c)
                R.output(cr)
            return cr

    return Module


def test_conv_with_symbolic_image_size_left_as_it_is(rng, caplog):
    # grouped and depthwise convs now have kernels of their own; what our kernels cannot take
    # is an image size unknown at compile time
    weight = he(rng, 4, 4, 2, 2)
    with caplog.at_level(logging.WARNING, logger="tvm_scalpel.passes"):
        after = RewriteConvLayers(HASWELL, mode="sparse")(symbolic_image(weight))
    tvm.ir.assert_structural_equal(after, symbolic_image(weight))
    assert any("static channel and image size" in r.getMessage() for r in caplog.records)


def test_gpu_targets_leave_conv_to_tvm(pruned):
    before = conv(*pruned)
    tvm.ir.assert_structural_equal(RewriteConvLayers(resolve_target("cuda"))(before), before)
