"""Node pruning of graphs written the way PyTorch's exporters write them: coupled channel
groups (residual adds, concats, depthwise convolutions), exporter quirks (shared initializers,
Identity, Dropout, shape subgraphs, Constant nodes), kept counts in whole blocks, and a summary
that matches the written file. References come from the builders' own records
(``exporter_graphs.reference``: the original model with the removed input columns zeroed) and
from ``insert_masks`` on plain chains, run in onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from exporter_graphs import mini_concat, mini_mobilenet_v2, mini_resnet, mini_vgg, reference
from helpers import ort_run, rel_err, run_cli
from onnx import helper

from tvm_scalpel.channel_groups import normalize, round_kept, unshare_initializers
from tvm_scalpel.errors import ScalpelError
from tvm_scalpel.finetune import node_prune
from tvm_scalpel.node_pruning import insert_masks, prunable_layers, prune_coupled

TOL = 1e-5
BLOCK = 8
BUILDERS = {"resnet": mini_resnet, "mobilenet_v2": mini_mobilenet_v2, "vgg": mini_vgg,
            "concat": mini_concat}
# layers whose channels must be removed together, by builder
COUPLED = {
    "resnet": [("conv1.weight", "layer1.0.conv2.weight"),
               ("layer2.0.conv2.weight", "layer2.0.downsample.0.weight")],
    "mobilenet_v2": [("features.0.0.weight", "features.1.conv.0.0.weight"),
                     ("features.2.conv.0.0.weight", "features.2.conv.1.0.weight"),
                     ("features.2.conv.2.weight", "features.3.conv.2.weight"),
                     ("features.3.conv.0.0.weight", "features.3.conv.1.0.weight")],
    "vgg": [], "concat": [],
}


def weight_layers(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.input[1]: inits[n.input[1]] for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits}


def out_channels_of(model: onnx.ModelProto) -> dict[str, int]:
    """Independent of the library: Conv / Gemm(transB) weights [O, ...]; MatMul [K, N]."""
    out = {}
    for name, dims in weight_layers(model).items():
        out[name] = dims[1] if name.endswith("_t") else dims[0]
    return out


def x_of(rng, n=3):
    return rng.standard_normal((n, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("style", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_layer_shrinks_coupled_ones_together(name, style, rng):
    model, net = BUILDERS[name](style, seed=int(rng.integers(1 << 20)))
    small, report = prune_coupled(model, 0.5, "l1", block=BLOCK)
    kept = {r.name: r.kept for r in report}
    before, after = out_channels_of(model), out_channels_of(small)
    # every conv (incl. depthwise and the residual ones) and every hidden dense layer shrinks
    asked = {p for srcs in net.reads.values() for p, _ in srcs if p != "input"} | set(net.convs)
    for layer in asked:
        assert after[layer] < before[layer], (layer, before[layer], after[layer])
        assert after[layer] % BLOCK == 0, (layer, after[layer])
        assert not [r for r in report if r.name == layer and r.reason], layer
    for a, b in COUPLED[name]:
        np.testing.assert_array_equal(kept[a], kept[b])
    assert len(small.graph.node) <= len(model.graph.node)
    assert not [n for n in small.graph.node if n.op_type in ("Mul", "Identity", "Dropout")]
    x = x_of(rng)
    ref = reference(model, net, kept)
    assert rel_err(ort_run(small, x), ort_run(ref, x)) < TOL
    assert rel_err(ort_run(ref, x), ort_run(model, x)) > 1e-3  # the pruning did something


def test_residual_stage_with_trained_batch_norm(rng):
    """With BN statistics randomized (no shared constants left), the residual convs are still
    pruned: the issue's ResNet-18 refused 12 of 20."""
    model, net = mini_resnet("torchscript", seed=3, trained_bn=True)
    small, report = prune_coupled(model, 0.5, "l2", block=BLOCK)
    assert all(r.nodes_after == r.nodes_before // 2 for r in report), report
    x = x_of(rng)
    assert rel_err(ort_run(small, x), ort_run(reference(model, net, {r.name: r.kept for r in report}), x)) < TOL


def test_shared_initializers_are_copied_not_refused():
    model, _ = mini_vgg("torchscript")
    shared = [i.name for i in model.graph.initializer
              if sum(i.name in n.input for n in model.graph.node) > 1]
    assert shared  # the exporter-like graph does share its zero biases
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert unshare_initializers(copy) > 0
    assert not [i.name for i in copy.graph.initializer
                if sum(i.name in n.input for n in copy.graph.node) > 1]
    names = [la.name for la in prunable_layers(model)]
    assert names == ["features.0.weight", "features.3.weight", "features.6.weight",
                     "classifier.0.weight", "classifier.3.weight"]


def test_masks_on_a_plain_chain_equal_the_masked_model(rng):
    """VGG: every op between two layers keeps a zero channel zero, so the model with mask
    layers after each layer (insert_masks) is the reference itself."""
    model, _ = mini_vgg("torchscript", seed=5)
    masks = {la.name: (rng.random(la.channels) < 0.6).astype(np.float32)
             for la in prunable_layers(model)}
    small, report = prune_coupled(model, masks=masks)
    for r in report:
        np.testing.assert_array_equal(r.kept, np.flatnonzero(masks[r.name]))
    x = x_of(rng)
    assert rel_err(ort_run(small, x), ort_run(insert_masks(model, masks), x)) < TOL


def test_round_kept():
    assert round_kept(64, 32, 8) == 32
    assert round_kept(64, 27, 8) == 32
    assert round_kept(20, 10, 8) == 16
    assert round_kept(20, 13, 8) == 16
    assert round_kept(20, 17, 8) == 17  # 24 would keep all 20: the asked count stays
    assert round_kept(12, 6, 8) == 8
    assert round_kept(10, 5, 16) == 5  # one block would keep all ten: the asked count stays
    assert round_kept(10, 5, None) == 5


def _softmax_tail(model: onnx.ModelProto) -> onnx.ModelProto:
    """mini ResNet whose first block's output also goes through a Softmax into the output:
    a node with no channel rule."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    add = next(n for n in out.graph.node if n.op_type == "Add")
    out.graph.node.append(helper.make_node("Softmax", [add.output[0]], ["side"], axis=1))
    out.graph.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, ["N", 16, 8, 8]))
    return out


def test_a_layer_that_cannot_be_pruned_stays_whole_with_a_reason(caplog, rng):
    model = _softmax_tail(mini_resnet("torchscript", seed=1)[0])
    with caplog.at_level(logging.WARNING):
        small, report = prune_coupled(model, 0.5, "l1")
    reasons = {r.name: r.reason for r in report}
    assert "Softmax" in reasons["conv1.weight"] and "Softmax" in reasons["layer1.0.conv2.weight"]
    assert not reasons["layer1.0.conv1.weight"] and not reasons["layer2.0.conv2.weight"]
    assert any("conv1.weight (node /conv1/Conv) not pruned" in r.getMessage() for r in caplog.records)
    assert out_channels_of(small)["conv1.weight"] == 16
    assert out_channels_of(small)["layer1.0.conv1.weight"] == 8
    assert not [n for n in small.graph.node if n.op_type == "Mul"]
    sess_out = ort_run(small, x_of(rng))
    assert np.all(np.isfinite(sess_out))
    with pytest.raises(ScalpelError, match="not pruned"):
        prune_coupled(model, 0.5, "l1", strict=True)


def test_node_prune_total_is_measured_on_the_written_model(rng):
    model, _ = mini_mobilenet_v2("torchscript", seed=2)
    result = node_prune(model, 0.5, criterion="l1", block=BLOCK)
    before, after = out_channels_of(model), out_channels_of(result.model)
    names = list(result.nodes_before)
    assert all(after[n] == result.nodes_after[n] and before[n] == result.nodes_before[n] for n in names)
    measured = 1 - sum(after[n] for n in names) / sum(before[n] for n in names)
    assert result.removed_fraction == pytest.approx(measured)
    assert [r.node for r in result.layers][:2] == ["/features.0.0/Conv", "/features.1.conv.0.0/Conv"]


def test_normalize_keeps_the_function(rng):
    model, _ = mini_resnet("dynamo", seed=4)
    x = x_of(rng)
    assert rel_err(ort_run(normalize(model), x), ort_run(model, x)) == 0.0


def test_cli_prints_per_layer_rows_and_the_written_total(tmp_path, rng):
    model, _ = mini_resnet("torchscript", seed=6)
    src, out = tmp_path / "resnet.onnx", tmp_path / "small.onnx"
    onnx.save(model, str(src))
    res = run_cli("prune", src, "-o", out, "--nodes", "0.5", "--rate", "0")
    assert res.returncode == 0, res.stderr
    small = onnx.load(str(out))
    before, after = out_channels_of(model), out_channels_of(small)
    lines = res.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "nodes before" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("node pruning removed"))
    rows = {line.split()[0]: line.split() for line in lines[start + 2:end]}
    assert set(rows) == set(before) - {"fc.weight"}
    for name, row in rows.items():
        assert row[1:4] == [str(before[name]), str(after[name]), f"/{name[:-7]}/Conv"], row
    names = list(rows)
    total = 1 - sum(after[n] for n in names) / sum(before[n] for n in names)
    assert f"node pruning removed {total * 100:.1f}% of the prunable nodes" in res.stdout
    assert not [n for n in small.graph.node if n.op_type == "Mul"]

    bad = tmp_path / "softmax.onnx"
    onnx.save(_softmax_tail(model), str(bad))
    res = run_cli("prune", bad, "-o", tmp_path / "no.onnx", "--nodes", "0.5", "--rate", "0", "--strict")
    assert res.returncode == 2 and "not pruned" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "no.onnx").exists()


def test_a_residual_add_over_a_concat_cuts_the_group_in_parts(rng):
    """A single group (mix, 32 channels) added to a concat of two (16 + 16): mix's channels are
    cut in two parts, each tied to one concat member, and pruned with it."""
    model, net = mini_concat("torchscript", seed=8)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    concat = next(n for n in graph.node if n.op_type == "Concat" and len(n.input) == 2
                  and not n.input[1].startswith("minus1"))
    mix = next(n for n in graph.node if n.op_type == "Conv" and n.input[1] == "mix.weight")
    add = helper.make_node("Add", [mix.output[0], concat.output[0]], ["mix_plus"])
    for n in graph.node:
        if mix.output[0] in n.input:
            n.input[list(n.input).index(mix.output[0])] = "mix_plus"
    graph.node.insert(list(graph.node).index(mix) + 1, add)
    onnx.checker.check_model(out)
    small, report = prune_coupled(out, 0.5, "l1", block=BLOCK)
    kept = {r.name: r.kept for r in report}
    assert not [r for r in report if r.reason]
    after = out_channels_of(small)
    assert (after["expand1x1.weight"], after["expand3x3.weight"], after["mix.weight"]) == (8, 8, 16)
    np.testing.assert_array_equal(kept["mix.weight"], np.concatenate(
        [kept["expand1x1.weight"], 16 + kept["expand3x3.weight"]]))
    x = x_of(rng)
    ref = reference(out, net, kept)
    assert rel_err(ort_run(small, x), ort_run(ref, x)) < TOL
    assert rel_err(ort_run(ref, x), ort_run(out, x)) > 1e-3
