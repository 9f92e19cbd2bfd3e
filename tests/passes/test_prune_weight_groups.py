"""IR tests of ``PruneWeightGroups``: only weight constants change, by the RMS/MAX rule."""

import logging

import numpy as np
import pytest
import tvm
from builders import he, rms_prune
from tvm.script import ir as I, relax as R, tirx as T

from tvm_scalpel.passes import PruneWeightGroups


def mlp(w0_nk, b0, w1_kn, b1):
    """Two dense layers as the ONNX importer writes them: ``Gemm(transB=1)`` (the weight
    ``[N, K]`` behind ``permute_dims``) + ReLU, then ``MatMul`` + ``Add`` (weight ``[K, N]``)."""

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor(("n", 16), "float32")) -> R.Tensor(("n", 4), "float32"):
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
def weights(rng):
    return he(rng, 8, 16), he(rng, 8), he(rng, 8, 4), he(rng, 4)


def test_rms_groups_removed_in_both_layouts(weights):
    w0, b0, w1_kn, b1 = weights
    before = mlp(w0, b0, w1_kn, b1)
    after = PruneWeightGroups(0.5, 4)(before)
    # layer 0: 8 rows x 4 groups of 4, half of them (16) go; layer 1 (W[N, K] = w1_kn.T):
    # 4 rows x 2 groups, 4 go. The [K, N] constant keeps its orientation.
    expected = mlp(rms_prune(w0, 4, 16), b0, rms_prune(w1_kn.T, 4, 4).T.copy(), b1)
    tvm.ir.assert_structural_equal(after, expected)
    # a module pass is functional: the input module is untouched
    tvm.ir.assert_structural_equal(before, mlp(w0, b0, w1_kn, b1))


def test_rate_mapping_prunes_only_the_named_layer(weights):
    w0, b0, w1_kn, b1 = weights
    after = PruneWeightGroups({1: 0.75}, 2)(mlp(w0, b0, w1_kn, b1))
    # layer 1 has 4 rows x 4 groups of 2: 12 of 16 go; layer 0 is not named
    expected = mlp(w0, b0, rms_prune(w1_kn.T, 2, 12).T.copy(), b1)
    tvm.ir.assert_structural_equal(after, expected)


def test_max_importance(weights):
    w0, b0, w1_kn, b1 = weights
    after = PruneWeightGroups({0: 0.25}, 8, importance="max")(mlp(w0, b0, w1_kn, b1))
    # 8 rows x 2 groups of 8; the 4 whose largest |w| is smallest go
    groups = w0.reshape(8, 2, 8)
    weakest = np.argsort(np.abs(groups).max(axis=2).reshape(-1), kind="stable")[:4]
    pruned = groups.copy()
    for flat in weakest:
        pruned[flat // 2, flat % 2] = 0.0
    expected = mlp(pruned.reshape(8, 16), b0, w1_kn, b1)
    tvm.ir.assert_structural_equal(after, expected)


def conv(weight, bias):
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


def test_conv_groups_run_along_the_unfolded_patch(rng):
    kernel, bias = he(rng, 4, 2, 2, 2), he(rng, 1, 4, 1, 1)
    after = PruneWeightGroups(0.5, 4, layers="conv")(conv(kernel, bias))
    # W[O, C*KH*KW] = [4, 8]: 2 groups of 4 per filter, 4 of the 8 go
    expected = conv(rms_prune(kernel.reshape(4, 8), 4, 4).reshape(4, 2, 2, 2), bias)
    tvm.ir.assert_structural_equal(after, expected)
    # layers="fc" (the default) does not touch a conv layer
    tvm.ir.assert_structural_equal(PruneWeightGroups(0.5, 4)(conv(kernel, bias)), conv(kernel, bias))


def test_rate_capped_so_the_layer_keeps_its_strongest_group(weights, caplog):
    w0, b0, w1_kn, b1 = weights
    with caplog.at_level(logging.WARNING, logger="tvm_scalpel.passes"):
        after = PruneWeightGroups({1: 1.0 - 1e-6}, 8)(mlp(w0, b0, w1_kn, b1))
    # layer 1 is 4 rows x 1 group of 8: all but the strongest (RMS) group go
    expected = mlp(w0, b0, rms_prune(w1_kn.T, 8, 3).T.copy(), b1)
    tvm.ir.assert_structural_equal(after, expected)
    assert any("capped" in r.getMessage() for r in caplog.records)
