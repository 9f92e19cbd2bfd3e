"""``relax.analysis.well_formed`` after every pass, on every model the suite builds.

Each model (the shipped LeNet builders, and small ``onnx.helper`` graphs: Gemm without transB,
a CNN with batch norms, masked versions of them) goes through the passes in pipeline order:
node removal, conv and fc weight pruning, conv and dense rewriting, chain fusion. After each
pass the module must be well formed (``well_formed`` raises on the first violation, with the
offending node), and the pass must have done its part where the model gives it one.
"""

import numpy as np
import onnx
import pytest
import tvm
from builders import HASWELL, calls, op_names
from helpers import gemm_transb0_mlp, make_model
from onnx import helper, numpy_helper
from tvm import relax

from tvm_scalpel import models
from tvm_scalpel.node_pruning import insert_masks, prunable_layers
from tvm_scalpel.onnx_io import to_relax
from tvm_scalpel.passes import (
    FuseDenseChains,
    PruneWeightGroups,
    RemoveMaskedNodes,
    RewriteConvLayers,
    RewriteDenseLayers,
)


def conv_bn_net(seed: int = 1) -> onnx.ModelProto:
    """x[N, 3, 10, 10] -> Conv(6, 3x3, pad 1) -> BatchNormalization -> Relu -> MaxPool 2
    -> Conv(8, 3x3) + bias -> Relu -> Flatten -> Gemm(5, transB=1)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inits = {
        "conv1.weight": (rng.standard_normal((6, 3, 3, 3)) * 0.4).astype(f32),
        "bn.scale": rng.uniform(0.5, 1.5, 6).astype(f32),
        "bn.B": rng.uniform(-0.5, 0.5, 6).astype(f32),
        "bn.mean": (rng.standard_normal(6) * 0.2).astype(f32),
        "bn.var": rng.uniform(0.5, 1.5, 6).astype(f32),
        "conv2.weight": (rng.standard_normal((8, 6, 3, 3)) * 0.3).astype(f32),
        "conv2.bias": (rng.standard_normal(8) * 0.1).astype(f32),
        "fc.weight": (rng.standard_normal((5, 72)) * 0.2).astype(f32),
        "fc.bias": (rng.standard_normal(5) * 0.1).astype(f32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1),
    ]
    return make_model(nodes, [numpy_helper.from_array(v, k) for k, v in inits.items()],
                      [("x", ["N", 3, 10, 10])], [("y", ["N", 5])])


def masked(model: onnx.ModelProto, position: str, seed: int = 2) -> onnx.ModelProto:
    """``model`` with a mask closing about a third of the nodes of every prunable layer."""
    rng = np.random.default_rng(seed)
    masks = {}
    for layer in prunable_layers(model):
        mask = np.ones(layer.channels, np.float32)
        mask[rng.choice(layer.channels, max(1, layer.channels // 3), replace=False)] = 0.0
        masks[layer.name] = mask
    return insert_masks(model, masks, position=position)


MODELS = {
    "lenet-300-100-gemm": lambda: models.lenet_300_100(seed=1, layout="gemm"),
    "lenet-300-100-matmul": lambda: models.lenet_300_100(seed=2, layout="matmul"),
    "lenet5": lambda: models.lenet5(seed=3),
    "lenet5-batch1": lambda: models.lenet5(seed=4, batch=1),
    "mlp-gemm-transb0": lambda: gemm_transb0_mlp([37, 29, 11], seed=5),
    "conv-bn": conv_bn_net,
    "masked-lenet-300-100": lambda: masked(models.lenet_300_100(seed=6), "after_bias"),
    "masked-lenet5": lambda: masked(models.lenet5(seed=7), "after_bias"),
    "masked-conv-bn-after-norm": lambda: masked(conv_bn_net(8), "after_norm"),
    "masked-conv-bn-after-bias": lambda: masked(conv_bn_net(9), "after_bias"),
}


def count(mod: tvm.IRModule, op: str) -> int:
    return sum(len(calls(f, op)) for _, f in mod.functions_items() if isinstance(f, relax.Function))


def changed(before: tvm.IRModule, after: tvm.IRModule) -> bool:
    try:
        tvm.ir.assert_structural_equal(before, after)
    except ValueError:
        return True
    return False


def pipeline(mode: str):
    """(pass, what it must have done: a check of (before, after)) in pipeline order."""

    def no_masks(before, after):
        return count(after, "relax.multiply") < count(before, "relax.multiply") or \
            count(before, "relax.multiply") == 0

    def pruned(before, after):
        return changed(before, after) or count(before, "relax.matmul") == 0

    def conv_pruned(before, after):
        return changed(before, after) or count(before, "relax.nn.conv2d") == 0

    def no_conv(before, after):
        return count(after, "relax.nn.conv2d") == 0

    def no_matmul(before, after):
        return count(after, "relax.matmul") == 0

    def fused(before, after):  # the dense layers of these models follow each other
        dense = [c for _, f in before.functions_items() if isinstance(f, relax.Function)
                 for c in calls(f, "relax.call_tir") if "_dense_" in str(c.args[0].name_hint)]
        if len(dense) < 2:
            return not changed(before, after)
        return count(after, "relax.call_tir") == count(before, "relax.call_tir") - len(dense) + 1

    return [
        (RemoveMaskedNodes(), no_masks),
        (PruneWeightGroups(0.8, 8, layers="conv"), conv_pruned),
        (PruneWeightGroups(0.9, 8), pruned),
        (RewriteConvLayers(HASWELL, mode=mode), no_conv),
        (RewriteDenseLayers(HASWELL, mode=mode), no_matmul),
        (FuseDenseChains(HASWELL), fused),
    ]


# every model in "auto" mode; the CNNs in "sparse" and "dense" modes too (the MLPs' layers take
# the same kernels as the CNNs' fc layers)
CASES = [(name, "auto") for name in MODELS] + [
    (name, mode) for mode in ("sparse", "dense") for name in MODELS
    if name.startswith(("lenet5", "masked-lenet5", "conv-bn", "masked-conv"))]


@pytest.mark.parametrize("name,mode", CASES)
def test_well_formed_after_every_pass(name, mode):
    mod = to_relax(MODELS[name]())
    relax.analysis.well_formed(mod)
    for ps, did_its_part in pipeline(mode):
        after = ps(mod)
        try:
            relax.analysis.well_formed(after)
        except Exception as err:  # name the pass: well_formed only names the node
            raise AssertionError(f"{ps.info.name} made an ill-formed module: {err}") from None
        assert did_its_part(mod, after), f"{ps.info.name} did not do its part on {name}"
        mod = after
    # what is left of the layers: our kernels, no matmul or conv2d for TVM to legalize
    ops = {op for _, f in mod.functions_items() if isinstance(f, relax.Function) for op in op_names(f)}
    assert not ops & {"relax.matmul", "relax.nn.conv2d"}, ops
