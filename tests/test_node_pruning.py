"""Node pruning: mask layers in, masked nodes out (ONNX) and the RemoveMaskedNodes Relax pass.

References are onnxruntime on the masked model (the same ONNX the library reads) and numpy
float64 computations written here; masks and inputs are drawn from seeded generators.
"""

import logging

import numpy as np
import onnx
import pytest
import tvm
from helpers import make_model, ort_run, rel_err, vm_run
from onnx import helper, numpy_helper
from tvm import relax

from tvm_scalpel import models
from tvm_scalpel.node_pruning import (
    insert_masks,
    masks_for_rate,
    prunable_layers,
    prune_nodes,
    remove_masked_nodes,
    weight_importance,
)
from tvm_scalpel.onnx_io import to_relax
from tvm_scalpel.passes import RemoveMaskedNodes
from tvm_scalpel.targets import host_target

MLP_SIZES = [64, 48, 32, 10]
TOL = 1e-5


# --------------------------------------------------------------------------- models


def conv_net(variant: str, seed: int = 3) -> onnx.ModelProto:
    """x[N, 1, 12, 12] -> Conv(4, 3x3)+bias -> Relu -> MaxPool 2x2 (or AveragePool)
    -> Conv(6, 3x3) (no bias, or a bias) -> BatchNormalization -> Relu
    -> Flatten (or Reshape [-1, 54]) -> Gemm(10, transB=1)."""
    rng = np.random.default_rng(seed)
    reshape = variant == "reshape"
    f32 = np.float32
    inits = {
        "conv1.weight": rng.standard_normal((4, 1, 3, 3)).astype(f32) * f32(0.5),
        "conv1.bias": (rng.standard_normal(4) * 0.1).astype(f32),
        "conv2.weight": (rng.standard_normal((6, 4, 3, 3)) * 0.3).astype(f32),
        "bn.scale": rng.uniform(0.5, 1.5, 6).astype(f32),
        "bn.B": rng.uniform(0.2, 1.0, 6).astype(f32),  # bn(0) > 0 mostly: removed channels
        "bn.mean": (rng.standard_normal(6) * 0.2).astype(f32),  # before the norm carry a constant
        "bn.var": rng.uniform(0.5, 1.5, 6).astype(f32),
        "fc.weight": (rng.standard_normal((10, 54)) * 0.2).astype(f32),
        "fc.bias": (rng.standard_normal(10) * 0.1).astype(f32),
    }
    conv2_inputs = ["p1", "conv2.weight"]
    if reshape:
        inits["conv2.bias"] = (rng.standard_normal(6) * 0.1).astype(f32)
        inits["flat_shape"] = np.array([-1, 54], np.int64)
        conv2_inputs.append("conv2.bias")
    pool = ("AveragePool" if reshape else "MaxPool")
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node(pool, ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", conv2_inputs, ["c2"], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c2", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["n2"]),
        helper.make_node("Relu", ["n2"], ["r2"]),
        (helper.make_node("Reshape", ["r2", "flat_shape"], ["f"]) if reshape
         else helper.make_node("Flatten", ["r2"], ["f"])),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1),
    ]
    return make_model(nodes, [numpy_helper.from_array(v, k) for k, v in inits.items()],
                      [("x", ["N", 1, 12, 12])], [("y", ["N", 10])])


def conv_gap_net(seed: int = 4) -> onnx.ModelProto:
    """x[N, 2, 8, 8] -> Conv(5, 3x3, no bias) -> BatchNormalization -> Relu
    -> Conv(7, 3x3, no bias) -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten
    -> Gemm(4). Masks before the norms send constants into convolutions without a bias."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inits = {
        "conv1.weight": (rng.standard_normal((5, 2, 3, 3)) * 0.4).astype(f32),
        "conv2.weight": (rng.standard_normal((7, 5, 3, 3)) * 0.3).astype(f32),
        "fc.weight": (rng.standard_normal((4, 7)) * 0.5).astype(f32),
        "fc.bias": (rng.standard_normal(4) * 0.1).astype(f32),
    }
    for i, c in ((1, 5), (2, 7)):
        inits[f"bn{i}.scale"] = rng.uniform(0.5, 1.5, c).astype(f32)
        inits[f"bn{i}.B"] = rng.uniform(0.2, 1.0, c).astype(f32)
        inits[f"bn{i}.mean"] = (rng.standard_normal(c) * 0.2).astype(f32)
        inits[f"bn{i}.var"] = rng.uniform(0.5, 1.5, c).astype(f32)
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight"], ["c1"], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c1", "bn1.scale", "bn1.B", "bn1.mean", "bn1.var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight"], ["c2"], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c2", "bn2.scale", "bn2.B", "bn2.mean", "bn2.var"], ["n2"]),
        helper.make_node("Relu", ["n2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1),
    ]
    return make_model(nodes, [numpy_helper.from_array(v, k) for k, v in inits.items()],
                      [("x", ["N", 2, 8, 8])], [("y", ["N", 4])])


MODELS = {
    "mlp-gemm": lambda: models.mlp(MLP_SIZES, seed=11, layout="gemm"),
    "mlp-matmul": lambda: models.mlp(MLP_SIZES, seed=12, layout="matmul"),
    "conv-flatten": lambda: conv_net("flatten"),
    "conv-reshape": lambda: conv_net("reshape"),
    "conv-gap": conv_gap_net,
}


def input_for(model: onnx.ModelProto, batch: int, rng) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return rng.standard_normal([batch] + dims).astype(np.float32)


def random_masks(model: onnx.ModelProto, rng, rate: float = 0.4) -> dict[str, np.ndarray]:
    """Close round(rate * n) random nodes of every prunable layer."""
    masks = {}
    for layer in prunable_layers(model):
        mask = np.ones(layer.channels, np.float32)
        mask[rng.choice(layer.channels, int(round(rate * layer.channels)), replace=False)] = 0
        masks[layer.name] = mask
    return masks


def inits_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def io_signature(model: onnx.ModelProto):
    def sig(values):
        return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    return sig(model.graph.input), sig(model.graph.output)


@pytest.fixture(scope="module", params=[(name, pos) for name in MODELS for pos in ("after_norm", "after_bias")
                                        if name.startswith("conv") or pos == "after_norm"],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pruned(request):
    """(name, original, masks, masked, removed, report, position) for one model and mask position."""
    name, position = request.param
    original = MODELS[name]()
    masks = random_masks(original, np.random.default_rng(sum(map(ord, name + position))))
    masked = insert_masks(original, masks, position=position)
    small, report = remove_masked_nodes(masked)
    return name, original, masks, masked, small, report, position


# --------------------------------------------------------------------------- prunable layers


def test_prunable_layers_exclude_the_class_scores():
    gemm = prunable_layers(MODELS["mlp-gemm"]())
    assert [(la.name, la.op, la.channels) for la in gemm] == [
        ("fc1.weight", "Gemm", 48), ("fc2.weight", "Gemm", 32)]
    matmul = prunable_layers(MODELS["mlp-matmul"]())
    assert [(la.name, la.op, la.channels, la.output) for la in matmul] == [
        ("fc1.weight", "MatMul", 48, "fc1"), ("fc2.weight", "MatMul", 32, "fc2")]  # after the bias Add
    conv = prunable_layers(conv_net("flatten"))
    assert [(la.name, la.op, la.channels, la.norm_output) for la in conv] == [
        ("conv1.weight", "Conv", 4, None), ("conv2.weight", "Conv", 6, "n2")]


def test_insert_masks_keeps_interface_and_runs(rng):
    model = conv_net("flatten")
    masks = random_masks(model, rng)
    masked = insert_masks(model, masks)
    onnx.checker.check_model(masked, full_check=True)
    assert io_signature(masked) == io_signature(model)
    muls = [n for n in masked.graph.node if n.op_type == "Mul"]
    assert len(muls) == 2
    stored = inits_of(masked)
    assert sorted(stored[n.input[1]].shape for n in muls) == [(4, 1, 1), (6, 1, 1)]
    for n in muls:  # each mask holds the values asked for
        layer = n.input[1].removesuffix(".mask")
        np.testing.assert_array_equal(stored[n.input[1]].reshape(-1), masks[layer])
    # a mask of all ones changes nothing; the random masks do change the output
    x = input_for(model, 2, rng)
    ones = insert_masks(model, {k: np.ones_like(v) for k, v in masks.items()})
    assert rel_err(ort_run(ones, x), ort_run(model, x)) == 0.0
    assert rel_err(ort_run(masked, x), ort_run(model, x)) > 1e-3


def test_insert_masks_rejects_bad_keys_and_sizes():
    from tvm_scalpel import ScalpelError

    model = MODELS["mlp-gemm"]()
    with pytest.raises(ScalpelError, match="fc3.weight"):
        insert_masks(model, {"fc3.weight": np.ones(10)})  # the class scores
    with pytest.raises(ScalpelError, match="47 values for 48"):
        insert_masks(model, {"fc1.weight": np.ones(47)})


# --------------------------------------------------------------------------- (a) outputs, (b) weights


@pytest.mark.parametrize("batch", [1, 3])
def test_removed_model_matches_masked_model(pruned, batch, rng):
    name, original, masks, masked, small, report, _ = pruned
    onnx.checker.check_model(small, full_check=True)
    assert io_signature(small) == io_signature(original)
    assert not [n for n in small.graph.node if n.op_type == "Mul"]  # every mask removed
    x = input_for(original, batch, rng)
    ref = ort_run(masked, x)
    out = ort_run(small, x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL


def test_report_counts_nodes(pruned):
    _, _, masks, _, _, report, _ = pruned
    assert {r.name: (r.nodes_before, r.nodes_after) for r in report} == {
        k: (m.size, int(m.sum())) for k, m in masks.items()}
    for r in report:
        np.testing.assert_array_equal(r.kept, np.flatnonzero(masks[r.name]))


def test_removed_weights_are_sliced(pruned):
    name, original, masks, _, small, _, position = pruned
    before, after = inits_of(original), inits_of(small)
    keep = {k: np.flatnonzero(m) for k, m in masks.items()}
    if name.startswith("mlp"):
        k1, k2 = keep["fc1.weight"], keep["fc2.weight"]
        rows = {"fc1": (k1, None), "fc2": (k2, k1), "fc3": (None, k2)}
        for layer, (out_idx, in_idx) in rows.items():
            w = before[f"{layer}.weight"]
            if name == "mlp-matmul":
                w = w.T  # stored [K, N]
            if out_idx is not None:
                w = w[out_idx]
            if in_idx is not None:
                w = w[:, in_idx]
            stored = after[f"{layer}.weight"]
            np.testing.assert_array_equal(stored.T if name == "mlp-matmul" else stored, w)
            bias = before[f"{layer}.bias"]
            np.testing.assert_array_equal(after[f"{layer}.bias"], bias if out_idx is None else bias[out_idx])
        return
    k1, k2 = keep["conv1.weight"], keep["conv2.weight"]
    if name == "conv-gap":
        np.testing.assert_array_equal(after["conv1.weight"], before["conv1.weight"][k1])
        np.testing.assert_array_equal(after["conv2.weight"], before["conv2.weight"][k2][:, k1])
        np.testing.assert_array_equal(after["fc.weight"], before["fc.weight"][:, k2])
        for i, k in ((1, k1), (2, k2)):
            for p in ("scale", "B", "var"):
                np.testing.assert_array_equal(after[f"bn{i}.{p}"], before[f"bn{i}.{p}"][k])
        if position == "after_norm":  # nothing to fold
            np.testing.assert_array_equal(after["bn2.mean"], before["bn2.mean"][k2])
            np.testing.assert_array_equal(after["fc.bias"], before["fc.bias"])
        return
    np.testing.assert_array_equal(after["conv1.weight"], before["conv1.weight"][k1])
    np.testing.assert_array_equal(after["conv1.bias"], before["conv1.bias"][k1])
    np.testing.assert_array_equal(after["conv2.weight"], before["conv2.weight"][k2][:, k1])
    if "conv2.bias" in before:
        np.testing.assert_array_equal(after["conv2.bias"], before["conv2.bias"][k2])
    for p in ("scale", "B", "mean", "var"):
        np.testing.assert_array_equal(after[f"bn.{p}"], before[f"bn.{p}"][k2])
    cols = (k2[:, None] * 9 + np.arange(9)).reshape(-1)  # channel c feeds inputs 9c .. 9c+8
    np.testing.assert_array_equal(after["fc.weight"], before["fc.weight"][:, cols])
    assert after["fc.weight"].shape == (10, len(k2) * 9)
    if name == "conv-reshape":
        np.testing.assert_array_equal(after["flat_shape"], [-1, len(k2) * 9])
    # a mask before the batch norm: a removed channel reaches the Gemm as relu(bn(0)), which
    # is folded into its bias (float64 reference)
    expected_bias = before["fc.bias"].astype(np.float64)
    if position == "after_bias":
        gone = np.setdiff1d(np.arange(6), k2)
        bn0 = (0.0 - before["bn.mean"].astype(np.float64)) / np.sqrt(before["bn.var"] + 1e-5) \
            * before["bn.scale"] + before["bn.B"]
        const = np.maximum(bn0, 0.0)
        for c in gone:
            expected_bias += before["fc.weight"][:, 9 * c:9 * c + 9].astype(np.float64).sum(axis=1) * const[c]
    np.testing.assert_allclose(after["fc.bias"], expected_bias, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- (c) the Relax pass, compiled


def relax_consts_shapes(mod) -> list[tuple[int, ...]]:
    shapes = []

    def visit(expr):
        if isinstance(expr, tvm.ir.expr.GenericConst):
            shapes.append(tuple(expr.value.numpy().shape))

    relax.analysis.post_order_visit(mod["main"], visit)
    return shapes


def multiplies(mod) -> int:
    count = 0

    def visit(expr):
        nonlocal count
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) \
                and expr.op.name == "relax.multiply":
            count += 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return count



@pytest.mark.parametrize("name,position", [("mlp-gemm", "after_norm"), ("mlp-matmul", "after_norm"),
                                           ("conv-flatten", "after_bias"), ("conv-reshape", "after_norm"),
                                           ("conv-gap", "after_bias")])
def test_relax_pass_compiles_and_matches_onnxruntime(name, position, rng):
    model = MODELS[name]()
    masks = random_masks(model, rng)
    masked = insert_masks(model, masks, position=position)
    mod = to_relax(masked)
    assert multiplies(mod) == len(masks)
    report = []
    new = RemoveMaskedNodes(report=report)(mod)
    assert multiplies(new) == 0
    assert [(r.nodes_before, r.nodes_after) for r in report] == [
        (m.size, int(m.sum())) for m in masks.values()]
    out_axis = 1 if name == "mlp-matmul" else 0  # MatMul weights are [K, N]
    for r, mask in zip(report, masks.values()):
        sliced = dict(r.constants)[r.weight]
        assert sliced.shape[out_axis] == int(mask.sum()) < r.weight.value.numpy().shape[out_axis]
        assert sliced.shape in relax_consts_shapes(new)
    exe = tvm.compile(new, target=host_target())
    for batch in (1, 3):
        x = input_for(model, batch, rng)
        assert rel_err(vm_run(exe, x), ort_run(masked, x)) < TOL


# --------------------------------------------------------------------------- (d) masks from weights


def ref_norms(model: onnx.ModelProto, criterion: str) -> dict[str, np.ndarray]:
    """Per-node weight norms, node by node in float64 (rows of [N, K] or filters)."""
    inits = inits_of(model)
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul", "Conv") or node.input[1] in ("fc3.weight", "fc.weight"):
            continue
        w = inits[node.input[1]].astype(np.float64)
        trans = any(a.name == "transB" and a.i for a in node.attribute)
        nodes = [w[i] for i in range(w.shape[0])] if node.op_type == "Conv" or trans else \
            [w[:, j] for j in range(w.shape[1])]
        out[node.input[1]] = np.array([np.abs(v).sum() if criterion == "l1" else np.sqrt((v * v).sum())
                                       for v in nodes])
    return out


@pytest.mark.parametrize("name,criterion,rate", [("mlp-gemm", "l1", 0.4), ("mlp-matmul", "l2", 0.25),
                                                 ("conv-flatten", "l1", 0.5)])
def test_weight_importance_prunes_the_weakest_nodes(name, criterion, rate, rng):
    model = MODELS[name]()
    ref = ref_norms(model, criterion)
    imp = weight_importance(model, criterion)
    assert sorted(imp) == sorted(ref)
    for k in ref:
        np.testing.assert_allclose(imp[k], ref[k], rtol=1e-12)
    small, report = prune_nodes(model, rate, criterion)
    for r in report:
        n = ref[r.name].size
        assert r.nodes_after == n - int(round(rate * n))
        weakest = set(np.argsort(ref[r.name])[:n - r.nodes_after].tolist())
        assert set(r.kept.tolist()) == set(range(n)) - weakest
    x = input_for(model, 2, rng)
    masked = insert_masks(model, masks_for_rate(imp, rate))
    assert rel_err(ort_run(small, x), ort_run(masked, x)) < TOL


def test_masks_for_rate_keeps_one_node_per_layer():
    imp = {"a": np.array([3.0, 1.0, 2.0]), "b": np.array([5.0])}
    masks = masks_for_rate(imp, 0.99)
    np.testing.assert_array_equal(masks["a"], [1, 0, 0])
    np.testing.assert_array_equal(masks["b"], [1])
    assert masks_for_rate(imp, {"a": 0.34}).keys() == {"a"}


# --------------------------------------------------------------------------- (e) what is left alone


def residual_model(seed: int = 5) -> onnx.ModelProto:
    """x[N, 16] -> Gemm(16) -> Mul(mask) -> Relu -> Add(., x) -> Gemm(10)."""
    rng = np.random.default_rng(seed)
    mask = np.ones(16, np.float32)
    mask[[1, 4, 9]] = 0
    inits = [numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "B1"),
             numpy_helper.from_array(mask, "M1"),
             numpy_helper.from_array((rng.standard_normal((10, 16)) * 0.3).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(10).astype(np.float32) * 0.1, "B2")]
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1),
             helper.make_node("Mul", ["h", "M1"], ["hm"]),
             helper.make_node("Relu", ["hm"], ["r"]),
             helper.make_node("Add", ["r", "x"], ["s"]),
             helper.make_node("Gemm", ["s", "W2", "B2"], ["y"], transB=1)]
    return make_model(nodes, inits, [("x", ["N", 16])], [("y", ["N", 10])])


def left_alone(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "left as it is" in r.getMessage()]


def test_residual_mask_is_left_alone_with_a_warning(caplog, rng):
    model = residual_model()
    with caplog.at_level(logging.WARNING):
        small, report = remove_masked_nodes(model)
    assert report == []
    assert any("residual" in m or "relax.add" in m for m in left_alone(caplog)), caplog.text
    assert [n.op_type for n in small.graph.node] == [n.op_type for n in model.graph.node]
    shapes = [{k: v.shape for k, v in inits_of(m).items()} for m in (small, model)]
    assert shapes[0] == shapes[1]
    x = input_for(model, 3, rng)
    assert rel_err(ort_run(small, x), ort_run(model, x)) < TOL


def test_non_binary_mask_is_left_alone_with_a_warning(caplog, rng):
    model = MODELS["mlp-gemm"]()
    masks = random_masks(model, rng)
    masks["fc1.weight"] = masks["fc1.weight"] * 0.5  # a scale, not a mask
    masked = insert_masks(model, masks)
    with caplog.at_level(logging.WARNING):
        small, report = remove_masked_nodes(masked)
    assert any("not all 0 or 1" in m for m in left_alone(caplog)), caplog.text
    assert [r.name for r in report] == ["fc2.weight"]  # the other mask is still removed
    assert [n.input[1] for n in small.graph.node if n.op_type == "Mul"] == ["fc1.weight.mask"]
    assert inits_of(small)["fc1.weight"].shape == (48, 64)
    x = input_for(model, 3, rng)
    assert rel_err(ort_run(small, x), ort_run(masked, x)) < TOL


def test_relax_pass_leaves_non_constant_weight_alone(caplog):
    """x @ w with w a function input: no weight to slice."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8, 6), "float32"))
    mask = relax.const(np.array([1, 0, 1, 1, 0, 1], np.float32))
    w2 = relax.const(np.ones((6, 3), np.float32))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            h = bb.emit(relax.op.matmul(x, w))
            hm = bb.emit(relax.op.multiply(h, mask))
            out = bb.emit_output(relax.op.matmul(hm, w2))
        bb.emit_func_output(out)
    mod = bb.get()
    with caplog.at_level(logging.WARNING):
        new = RemoveMaskedNodes()(mod)
    assert any("not a constant" in m for m in left_alone(caplog)), caplog.text
    assert multiplies(new) == 1
    tvm.ir.assert_structural_equal(new, mod)


def test_all_zero_and_all_one_masks(caplog, rng):
    model = MODELS["mlp-gemm"]()
    masks = {"fc1.weight": np.zeros(48, np.float32), "fc2.weight": np.ones(32, np.float32)}
    masked = insert_masks(model, masks)
    with caplog.at_level(logging.WARNING):
        small, report = remove_masked_nodes(masked)
    assert any("all zeros" in r.getMessage() for r in caplog.records), caplog.text
    assert [(r.name, r.nodes_before, r.nodes_after) for r in report] == [
        ("fc1.weight", 48, 1), ("fc2.weight", 32, 32)]
    after = inits_of(small)
    assert after["fc1.weight"].shape == (1, 64) and after["fc2.weight"].shape == (32, 1)
    muls = [n for n in small.graph.node if n.op_type == "Mul"]  # the zero mask stays, on one channel
    assert len(muls) == 1 and after[muls[0].input[1]].tolist() == [0.0]
    x = input_for(model, 3, rng)
    assert rel_err(ort_run(small, x), ort_run(masked, x)) < TOL


def test_hand_written_masks_of_other_shapes(rng):
    """Masks [1, N] after a Relu and [N] before a LeakyRelu + Dropout; Gemm without transB."""
    g = np.random.default_rng(8)
    m1 = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0], np.float32)
    m2 = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1], np.float32)
    w1 = (g.standard_normal((20, 12)) * 0.3).astype(np.float32)  # [K, N]: no transB
    w2 = (g.standard_normal((9, 12)) * 0.3).astype(np.float32)
    w3 = (g.standard_normal((5, 9)) * 0.3).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w1, "W1"), ((g.standard_normal(12) * 0.1).astype(np.float32), "B1"), (m1.reshape(1, 12), "M1"),
        (w2, "W2"), ((g.standard_normal(9) * 0.1).astype(np.float32), "B2"), (m2, "M2"),
        (w3, "W3"), ((g.standard_normal(5) * 0.1).astype(np.float32), "B3"))]
    nodes = [helper.make_node("Gemm", ["x", "W1", "B1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Mul", ["M1", "r1"], ["m1"]),  # mask first
             helper.make_node("Gemm", ["m1", "W2", "B2"], ["h2"], transB=1),
             helper.make_node("Mul", ["h2", "M2"], ["m2"]),
             helper.make_node("LeakyRelu", ["m2"], ["r2"], alpha=0.2),
             helper.make_node("Dropout", ["r2"], ["d2"]),
             helper.make_node("Gemm", ["d2", "W3", "B3"], ["y"], transB=1)]
    model = make_model(nodes, inits, [("x", ["N", 20])], [("y", ["N", 5])])
    small, report = remove_masked_nodes(model)
    assert [(r.name, r.nodes_after) for r in report] == [("W1", 8), ("W2", 6)]
    k1, k2 = np.flatnonzero(m1), np.flatnonzero(m2)
    after = inits_of(small)
    np.testing.assert_array_equal(after["W1"], w1[:, k1])
    np.testing.assert_array_equal(after["W2"], w2[k2][:, k1])
    np.testing.assert_array_equal(after["W3"], w3[:, k2])
    assert "M1" not in after and "M2" not in after
    x = input_for(model, 3, rng)
    assert rel_err(ort_run(small, x), ort_run(model, x)) < TOL


def test_constant_into_padded_convolution_is_left_alone(caplog, rng):
    """A mask before a batch norm whose removed channels would reach a padded convolution as a
    constant (the padding makes its contribution differ at the borders): left alone."""
    model = conv_gap_net()
    for node in model.graph.node:
        if node.input[1:2] == ["conv2.weight"]:
            node.attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    masks = random_masks(model, np.random.default_rng(2))
    masked = insert_masks(model, masks, position="after_bias")
    with caplog.at_level(logging.WARNING):
        small, report = remove_masked_nodes(masked)
    assert any("padded convolution" in m for m in left_alone(caplog)), caplog.text
    assert [r.name for r in report] == ["conv2.weight"]
    assert inits_of(small)["conv1.weight"].shape == (5, 2, 3, 3)
    x = input_for(model, 2, rng)
    assert rel_err(ort_run(small, x), ort_run(masked, x)) < TOL
