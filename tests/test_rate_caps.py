"""Rates that would empty a layer are capped: every layer keeps one weight group / one node.

A rate close to 1 (0.999) on a small layer would remove every group of its weight (or every
node), leaving the network's output constant. These tests build models with ``onnx.helper``,
prune them at such rates and check that every layer still has a nonzero weight group, that
the output still depends on the input (onnxruntime on fresh random inputs), that TVM's
compiled pruned model agrees with onnxruntime on the same ONNX, and that each capped layer
gets one warning naming it with the rate asked and the rate reached.
"""

import logging
import re

import numpy as np
import onnx
import pytest
from helpers import (
    gemm_transb0_mlp,
    make_model,
    onnx_dense_layers,
    ort_run,
    ref_importance,
    rel_err,
    run_cli,
    vm_run,
)
from onnx import numpy_helper

from tvm_scalpel.api import compile_onnx, prune_onnx
from tvm_scalpel.finetune import _keep_one_node, node_prune
from tvm_scalpel.node_pruning import insert_masks, masks_for_rate, weight_importance
from tvm_scalpel.pruning import prune_groups

MLP_SIZES = [100, 100, 100, 10]  # the last layer is the 10x100
G = 8  # pinned: the cap must hold whatever the host's SIMD width
TOL = 1e-4


def warnings_with(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


def assert_depends_on_input(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime's output on ``x``: not the same for every sample (a constant network)."""
    y = ort_run(model, x)
    spread = np.ptp(y, axis=0)  # per output unit, over the batch
    assert spread.max() > 1e-3 * max(np.abs(y).max(), 1e-6), "the output does not depend on the input"
    return y


def assert_tvm_matches_ort(model: onnx.ModelProto, x: np.ndarray) -> None:
    exe = compile_onnx(model, "x86").executable
    assert rel_err(vm_run(exe, x), ort_run(model, x)) < TOL


# --------------------------------------------------------------------------- prune_groups


@pytest.mark.parametrize("n,k,g,rate", [(10, 100, 8, 0.999), (10, 100, 16, 0.999),
                                        (4, 18, 8, 0.99), (1, 1, 1, 0.9), (3, 5, 8, 0.9)])
def test_prune_groups_keeps_the_strongest_group(rng, n, k, g, rate):
    w = rng.standard_normal((n, k)).astype(np.float32)
    res = prune_groups(w, g, rate)
    assert res.capped
    assert res.mask.sum() == 1  # every other group goes: the cap stops at exactly one
    imp = ref_importance(w, g, "rms")
    assert imp[res.mask].item() == pytest.approx(imp.max(), rel=1e-9)
    kept = np.repeat(res.mask, g, axis=1)[:, :k]
    np.testing.assert_array_equal(res.weight[kept], w[kept])
    assert np.count_nonzero(res.weight) == kept.sum() > 0
    assert res.rate == pytest.approx(1.0 - kept.sum() / w.size, abs=1e-12)
    assert res.rate < 1.0


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.97])
def test_prune_groups_is_not_capped_below_the_limit(rng, rate):
    res = prune_groups(rng.standard_normal((10, 100)).astype(np.float32), G, rate)
    assert not res.capped and abs(res.rate - rate) <= 0.03


# --------------------------------------------------------------------------- weight pruning


def one_layer_model(layer: dict) -> onnx.ModelProto:
    """A model of just ``layer`` (weight ``[N, K]`` and bias), to run it on inputs of its own."""
    n, k = layer["w"].shape
    inits = [numpy_helper.from_array(np.ascontiguousarray(layer["w"]), "w"),
             numpy_helper.from_array(layer["bias"], "b")]
    node = onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    return make_model([node], inits, [("x", ["N", k])], [("y", ["N", n])])


def test_mlp_rate_0999_keeps_a_group_in_every_layer(caplog, rng):
    model = gemm_transb0_mlp(MLP_SIZES, seed=11)
    with caplog.at_level(logging.WARNING):
        outcome = prune_onnx(model, 0.999, "x86", group_width=G)
    layers = onnx_dense_layers(outcome.model)
    assert [layer["w"].shape for layer in layers] == [(100, 100), (100, 100), (10, 100)]
    for layer in layers:
        assert np.count_nonzero(layer["w"]) > 0, f"{layer['name']} was emptied"
        # Each layer's own output still depends on its input. (The network's may not: at
        # 0.999 the one group a layer keeps can read only neurons the previous layer cut off;
        # that is what the rate asks for, see the next test for the constant output.)
        x = rng.standard_normal((16, layer["w"].shape[1])).astype(np.float32)
        assert_depends_on_input(one_layer_model(layer), x)
    assert all(r.rate < 1.0 for r in outcome.layers)
    # Only the 10x100 layer reaches every group at 0.999 (130 groups; the 100x100 ones keep 2):
    # exactly one warning, naming it and both rates.
    capped = warnings_with(caplog, "capped")
    assert len(capped) == 1, caplog.text
    reached = outcome.layers[2].rate
    assert re.search(r"dense layer 2 \(10x100", capped[0]) and "0.999" in capped[0], capped[0]
    assert f"{reached:.3f}" in capped[0] and outcome.layers[2].rate_asked == 0.999
    x = rng.standard_normal((16, MLP_SIZES[0])).astype(np.float32)
    assert_tvm_matches_ort(outcome.model, x)


def test_last_layer_rate_0999_leaves_the_output_live(caplog, rng):
    """The issue's symptom: the class scores' layer emptied, every input gets the same scores."""
    model = gemm_transb0_mlp(MLP_SIZES, seed=11)
    with caplog.at_level(logging.WARNING):
        outcome = prune_onnx(model, 0.9, "x86", group_width=G, last_layer_rate=0.999)
    assert len(warnings_with(caplog, "capped")) == 1, caplog.text
    x = rng.standard_normal((32, MLP_SIZES[0])).astype(np.float32)
    assert_depends_on_input(outcome.model, x)
    assert_tvm_matches_ort(outcome.model, x)


def conv_model(seed: int = 4) -> onnx.ModelProto:
    """x[N, 2, 8, 8] -> Conv(4, 3x3) + bias -> Relu -> Flatten -> Gemm(10, transB=1): the conv
    weight unfolds to 4x18, 12 groups of g=8 (the last of 2 weights) that 0.999 would all take."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 2, 3, 3)) * 0.4).astype(np.float32), "conv.weight"),
             numpy_helper.from_array((rng.standard_normal(4) * 0.1).astype(np.float32), "conv.bias"),
             numpy_helper.from_array((rng.standard_normal((10, 144)) * 0.1).astype(np.float32), "fc.weight"),
             numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(np.float32), "fc.bias")]
    nodes = [onnx.helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[0, 0, 0, 0]),
             onnx.helper.make_node("Relu", ["c"], ["r"]),
             onnx.helper.make_node("Flatten", ["r"], ["f"], axis=1),
             onnx.helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1)]
    return make_model(nodes, inits, [("x", ["N", 2, 8, 8])], [("y", ["N", 10])])


def test_conv_rate_0999_keeps_a_group(caplog, rng):
    model = conv_model()
    with caplog.at_level(logging.WARNING):
        outcome = prune_onnx(model, 0.0, "x86", group_width=G, conv_rate=0.999)
    conv = numpy_helper.to_array(next(i for i in outcome.model.graph.initializer
                                      if i.name == "conv.weight"))
    assert 0 < np.count_nonzero(conv) <= G
    capped = warnings_with(caplog, "capped")
    assert len(capped) == 1 and "conv layer 0 (4x18" in capped[0] and "0.999" in capped[0], caplog.text
    x = rng.standard_normal((8, 2, 8, 8)).astype(np.float32)
    assert_depends_on_input(outcome.model, x)
    assert_tvm_matches_ort(outcome.model, x)


# --------------------------------------------------------------------------- node pruning


def test_masks_for_rate_warns_once_per_capped_layer(caplog):
    imp = {"a": np.array([3.0, 1.0, 2.0]), "b": np.arange(100.0), "c": np.arange(10.0)}
    with caplog.at_level(logging.WARNING):
        masks = masks_for_rate(imp, {"a": 0.99, "b": 0.999, "c": 0.5})
    assert [int(masks[n].sum()) for n in "abc"] == [1, 1, 5]
    capped = warnings_with(caplog, "capped")
    assert len(capped) == 2, caplog.text  # a and b; c's 0.5 is reached
    assert "layer a" in capped[0] and "0.990" in capped[0] and "0.667" in capped[0]
    assert "layer b" in capped[1] and "0.999" in capped[1] and "0.990" in capped[1]


def assert_every_layer_live(model: onnx.ModelProto, rng) -> None:
    """Every dense layer has a node and a nonzero weight, and its own output depends on its
    input. (With one node per layer the network's output may well be constant: a lone ReLU
    neuron can be off for every input. That is the rate's doing, not an emptied layer.)"""
    for layer in onnx_dense_layers(model):
        assert min(layer["w"].shape) >= 1, layer["name"]
        assert np.count_nonzero(layer["w"]) > 0, f"{layer['name']} {layer['w'].shape} was emptied"
        x = rng.standard_normal((16, layer["w"].shape[1])).astype(np.float32)
        assert_depends_on_input(one_layer_model(layer), x)


def test_nodes_0999_keeps_a_node_per_layer_and_runs(caplog, rng):
    model = gemm_transb0_mlp(MLP_SIZES, seed=12)
    with caplog.at_level(logging.WARNING):
        result = node_prune(model, 0.999, criterion="l1")
    assert result.nodes_after == {"W0": 1, "W1": 1}
    capped = warnings_with(caplog, "capped")
    assert [m.split(":")[0] for m in capped] == ["layer W0", "layer W1"], caplog.text
    assert all("0.999" in m and "0.990" in m for m in capped)
    assert_every_layer_live(result.model, rng)
    # It still runs in onnxruntime, and computes what the masked model computes.
    masks = masks_for_rate(weight_importance(model, "l1"), 0.999)
    x = rng.standard_normal((16, MLP_SIZES[0])).astype(np.float32)
    assert rel_err(ort_run(result.model, x), ort_run(insert_masks(model, masks), x)) < TOL
    # What `prune --nodes 0.999` does next: weight-prune the slim model (its middle layer is
    # now 1x1, a single group that any rate above 0.5 would remove).
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        outcome = prune_onnx(result.model, 0.9, "x86", group_width=G)
    assert any("dense layer 1 (1x1" in m for m in warnings_with(caplog, "capped")), caplog.text
    assert_every_layer_live(outcome.model, rng)
    assert_tvm_matches_ort(outcome.model, x)


def test_cli_nodes_0999(tmp_path, rng):
    """The issue's command line: every layer keeps a node and a weight, the model runs."""
    path = tmp_path / "mlp.onnx"
    onnx.save(gemm_transb0_mlp(MLP_SIZES, seed=13), path)
    out = tmp_path / "pruned.onnx"
    proc = run_cli("prune", path, "-o", out, "--nodes", "0.999", "--group-width", G)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("capped") == 3, proc.stderr  # W0, W1 nodes; W1's single weight
    pruned = onnx.load(out)
    assert [layer["w"].shape for layer in onnx_dense_layers(pruned)] == [(1, 100), (1, 1), (10, 1)]
    assert_every_layer_live(pruned, rng)
    x = rng.standard_normal((16, MLP_SIZES[0])).astype(np.float32)
    assert ort_run(pruned, x).shape == (16, 10)


def test_closed_trained_masks_keep_their_largest_beta(caplog):
    masks = {"a": np.zeros(4, np.float32), "b": np.array([0, 1, 0], np.float32)}
    betas = {"a": np.array([0.01, 0.03, 0.02, 0.0]), "b": np.array([0.0, 0.9, 0.1])}
    with caplog.at_level(logging.WARNING):
        out = _keep_one_node(masks, betas)
    np.testing.assert_array_equal(out["a"], [0, 1, 0, 0])
    np.testing.assert_array_equal(out["b"], [0, 1, 0])
    assert len(warnings_with(caplog, "layer a")) == 1 and not warnings_with(caplog, "layer b")
    assert not masks["a"].any()  # the caller's masks are left as they were
