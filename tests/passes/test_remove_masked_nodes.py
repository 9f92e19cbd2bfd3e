"""IR tests of ``RemoveMaskedNodes``: a 0/1 channel mask goes, and with it the rows/filters of
the layer before and the columns/input channels of the layer after.

Each Expected module is the Before module rebuilt from constants sliced here in numpy (and, for
a batch norm after the mask, the next bias corrected by what the removed channel still sends).
"""

import logging

import numpy as np
import tvm
from builders import he
from tvm.script import ir as I, relax as R, tirx as T

from tvm_scalpel.passes import RemoveMaskedNodes

MASK = np.array([1, 0, 1, 1, 0], np.float32)
KEPT = np.flatnonzero(MASK)  # [0, 2, 3]


def masked_mlp(w0_kn, b0, mask, w1_nk, b1):
    """``MatMul`` + ``Add`` 6 -> 5, the mask, ReLU, ``Gemm(transB=1)`` 5 -> 3."""

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor(("n", 6), "float32")) -> R.Tensor(("n", 3), "float32"):
            n = T.int64()
            with R.dataflow():
                h = R.matmul(x, R.const(w0_kn))
                hb = R.add(h, R.const(b0))
                hm = R.multiply(hb, R.const(mask))
                hr = R.nn.relu(hm)
                wt = R.permute_dims(R.const(w1_nk), axes=[1, 0])
                y = R.matmul(hr, wt)
                yb = R.add(y, R.const(b1))
                R.output(yb)
            return yb

    return Module


def mlp(w0_kn, b0, w1_nk, b1):
    """``masked_mlp`` without its mask."""

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor(("n", 6), "float32")) -> R.Tensor(("n", 3), "float32"):
            n = T.int64()
            with R.dataflow():
                h = R.matmul(x, R.const(w0_kn))
                hb = R.add(h, R.const(b0))
                hr = R.nn.relu(hb)
                wt = R.permute_dims(R.const(w1_nk), axes=[1, 0])
                y = R.matmul(hr, wt)
                yb = R.add(y, R.const(b1))
                R.output(yb)
            return yb

    return Module


def test_dense_nodes_removed(rng):
    w0, b0, w1, b1 = he(rng, 6, 5), he(rng, 5), he(rng, 3, 5), he(rng, 3)
    report = []
    after = RemoveMaskedNodes(report=report)(masked_mlp(w0, b0, MASK, w1, b1))
    # producer [K, N]: its columns; bias: its entries; consumer W[N, K]: its columns
    expected = mlp(w0[:, KEPT].copy(), b0[KEPT].copy(), w1[:, KEPT].copy(), b1)
    tvm.ir.assert_structural_equal(after, expected)
    (r,) = report
    assert (r.kind, r.nodes_before, r.nodes_after) == ("dense", 5, 3)
    np.testing.assert_array_equal(r.kept, KEPT)


def test_all_ones_mask_only_loses_its_multiply(rng):
    w0, b0, w1, b1 = he(rng, 6, 5), he(rng, 5), he(rng, 3, 5), he(rng, 3)
    after = RemoveMaskedNodes()(masked_mlp(w0, b0, np.ones(5, np.float32), w1, b1))
    tvm.ir.assert_structural_equal(after, mlp(w0, b0, w1, b1))


def test_all_zeros_mask_keeps_one_channel_times_zero(rng, caplog):
    w0, b0, w1, b1 = he(rng, 6, 5), he(rng, 5), he(rng, 3, 5), he(rng, 3)
    with caplog.at_level(logging.WARNING, logger="tvm_scalpel.passes"):
        after = RemoveMaskedNodes()(masked_mlp(w0, b0, np.zeros(5, np.float32), w1, b1))
    expected = masked_mlp(w0[:, :1].copy(), b0[:1].copy(), np.zeros(1, np.float32),
                          w1[:, :1].copy(), b1)
    tvm.ir.assert_structural_equal(after, expected)
    assert any("all zeros" in r.getMessage() for r in caplog.records)


def bn_mlp(w0_kn, b0, mask, gamma, beta, mean, var, w1_kn, b1, masked=True):
    """dense 6 -> 4, the mask, a batch norm, ReLU, dense 4 -> 3 (``masked=False``: no mask)."""

    # distinct class names: TVMScript finds a class's source by its name
    if masked:
        @I.ir_module
        class Masked:
            @R.function
            def main(x: R.Tensor(("n", 6), "float32")) -> R.Tensor(("n", 3), "float32"):
                n = T.int64()
                with R.dataflow():
                    h = R.matmul(x, R.const(w0_kn))
                    hb = R.add(h, R.const(b0))
                    hm = R.multiply(hb, R.const(mask))
                    bn = R.nn.batch_norm(hm, R.const(gamma), R.const(beta), R.const(mean),
                                         R.const(var), axis=1, epsilon=1e-5)
                    hn = bn[0]
                    hr = R.nn.relu(hn)
                    y = R.matmul(hr, R.const(w1_kn))
                    yb = R.add(y, R.const(b1))
                    R.output(yb)
                return yb
        return Masked

    @I.ir_module
    class Unmasked:
        @R.function
        def main(x: R.Tensor(("n", 6), "float32")) -> R.Tensor(("n", 3), "float32"):
            n = T.int64()
            with R.dataflow():
                h = R.matmul(x, R.const(w0_kn))
                hb = R.add(h, R.const(b0))
                bn = R.nn.batch_norm(hb, R.const(gamma), R.const(beta), R.const(mean),
                                     R.const(var), axis=1, epsilon=1e-5)
                hn = bn[0]
                hr = R.nn.relu(hn)
                y = R.matmul(hr, R.const(w1_kn))
                yb = R.add(y, R.const(b1))
                R.output(yb)
            return yb

    return Unmasked


def test_batch_norm_after_the_mask_folds_into_the_next_bias(rng):
    """Channel 2 is closed, but the batch norm makes its 0 into ``beta - gamma * mean / std``,
    which ReLU keeps when positive: the next layer's bias takes what it contributed."""
    mask = np.array([1, 1, 0, 1], np.float32)
    kept = [0, 1, 3]
    w0, b0, w1, b1 = he(rng, 6, 4), he(rng, 4), he(rng, 4, 3), he(rng, 3)
    gamma, var = np.abs(he(rng, 4)) + 0.5, np.abs(he(rng, 4)) + 0.5
    mean, beta = he(rng, 4), np.abs(he(rng, 4)) + 1.0  # channel 2 stays positive after BN
    after = RemoveMaskedNodes()(bn_mlp(w0, b0, mask, gamma, beta, mean, var, w1, b1))
    held = (0.0 - np.float64(mean[2])) / np.sqrt(np.float64(var[2]) + 1e-5) * gamma[2] + beta[2]
    assert held > 0
    b1_new = (b1.astype(np.float64) + w1[2].astype(np.float64) * max(held, 0.0)).astype(np.float32)
    expected = bn_mlp(w0[:, kept].copy(), b0[kept].copy(), None, gamma[kept].copy(),
                      beta[kept].copy(), mean[kept].copy(), var[kept].copy(),
                      w1[kept].copy(), b1_new, masked=False)
    tvm.ir.assert_structural_equal(after, expected)


def convnet(w1, b1, mask, w2):
    """conv 2 -> C (3x3) + bias, the mask ``[1, C, 1, 1]`` (None: no mask), ReLU, max-pool 2,
    conv C -> 3 (1x1)."""

    if mask is not None:  # parsed when defined: only with a mask
        @I.ir_module
        class Masked:
            @R.function
            def main(x: R.Tensor((1, 2, 8, 8), "float32")) -> R.Tensor((1, 3, 3, 3), "float32"):
                with R.dataflow():
                    c1 = R.nn.conv2d(x, R.const(w1))
                    c1b = R.add(c1, R.const(b1))
                    c1m = R.multiply(c1b, R.const(mask))
                    c1r = R.nn.relu(c1m)
                    p = R.nn.max_pool2d(c1r, pool_size=[2, 2], strides=[2, 2])
                    c2 = R.nn.conv2d(p, R.const(w2))
                    R.output(c2)
                return c2
        return Masked

    @I.ir_module
    class Unmasked:
        @R.function
        def main(x: R.Tensor((1, 2, 8, 8), "float32")) -> R.Tensor((1, 3, 3, 3), "float32"):
            with R.dataflow():
                c1 = R.nn.conv2d(x, R.const(w1))
                c1b = R.add(c1, R.const(b1))
                c1r = R.nn.relu(c1b)
                p = R.nn.max_pool2d(c1r, pool_size=[2, 2], strides=[2, 2])
                c2 = R.nn.conv2d(p, R.const(w2))
                R.output(c2)
            return c2

    return Unmasked


def test_conv_filters_and_input_channels_removed(rng):
    mask = np.array([0, 1, 1, 0], np.float32).reshape(1, 4, 1, 1)
    w1, b1, w2 = he(rng, 4, 2, 3, 3), he(rng, 1, 4, 1, 1), he(rng, 3, 4, 1, 1)
    report = []
    after = RemoveMaskedNodes(report=report)(convnet(w1, b1, mask, w2))
    expected = convnet(w1[[1, 2]].copy(), b1[:, [1, 2]].copy(), None, w2[:, [1, 2]].copy())
    tvm.ir.assert_structural_equal(after, expected)
    assert [(r.kind, r.nodes_before, r.nodes_after) for r in report] == [("conv", 4, 2)]


def conv_flatten_dense(w1, b1, mask, features, w2_kn):
    """conv 2 -> C (3x3, output 2x2) + bias, mask ``[C, 1, 1]`` (None: no mask), ReLU,
    flatten to ``[1, features]``, dense -> 5."""

    if mask is not None:  # parsed when defined: only with a mask
        @I.ir_module
        class Masked:
            @R.function
            def main(x: R.Tensor((1, 2, 4, 4), "float32")) -> R.Tensor((1, 5), "float32"):
                with R.dataflow():
                    c = R.nn.conv2d(x, R.const(w1))
                    cb = R.add(c, R.const(b1))
                    cm = R.multiply(cb, R.const(mask))
                    cr = R.nn.relu(cm)
                    f = R.reshape(cr, R.shape([1, features]))
                    y = R.matmul(f, R.const(w2_kn))
                    R.output(y)
                return y
        return Masked

    @I.ir_module
    class Unmasked:
        @R.function
        def main(x: R.Tensor((1, 2, 4, 4), "float32")) -> R.Tensor((1, 5), "float32"):
            with R.dataflow():
                c = R.nn.conv2d(x, R.const(w1))
                cb = R.add(c, R.const(b1))
                cr = R.nn.relu(cb)
                f = R.reshape(cr, R.shape([1, features]))
                y = R.matmul(f, R.const(w2_kn))
                R.output(y)
            return y

    return Unmasked


def test_flatten_removes_each_channels_block_of_features(rng):
    """Channel c of ``[1, 3, 2, 2]`` feeds flattened features ``4c .. 4c+3``: closing channel 1
    removes rows 4..7 of the next ``[K, N]`` weight and shrinks the reshape to 8."""
    mask = np.array([1, 0, 1], np.float32).reshape(3, 1, 1)
    w1, b1, w2 = he(rng, 3, 2, 3, 3), he(rng, 1, 3, 1, 1), he(rng, 12, 5)
    after = RemoveMaskedNodes()(conv_flatten_dense(w1, b1, mask, 12, w2))
    rows = [0, 1, 2, 3, 8, 9, 10, 11]
    expected = conv_flatten_dense(w1[[0, 2]].copy(), b1[:, [0, 2]].copy(), None, 8, w2[rows].copy())
    tvm.ir.assert_structural_equal(after, expected)


def test_mask_reaching_a_residual_add_is_left(rng, caplog):
    w0, b0, mask = he(rng, 5, 5), he(rng, 5), MASK

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("n", 5), "float32")) -> R.Tensor(("n", 5), "float32"):
            n = T.int64()
            with R.dataflow():
                h = R.matmul(x, R.const(w0))
                hb = R.add(h, R.const(b0))
                hm = R.multiply(hb, R.const(mask))
                hr = R.nn.relu(hm)
                y = R.add(hr, x)
                R.output(y)
            return y

    with caplog.at_level(logging.WARNING, logger="tvm_scalpel.passes"):
        after = RemoveMaskedNodes()(Before)
    tvm.ir.assert_structural_equal(after, Before)
    assert any("left as it is" in r.getMessage() and "residual" in r.getMessage()
               for r in caplog.records)
