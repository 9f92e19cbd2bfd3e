"""Models TVM cannot import whole: scikit-learn's MLP classifier as skl2onnx writes it.

skl2onnx ends a classifier with ``ArrayFeatureExtractor`` (the class label) and ``ZipMap`` (the
probabilities as a sequence of maps), both in the ``ai.onnx.ml`` domain, which TVM's importer
does not take. ``prune`` cuts the graph before them (or at ``--outputs``), prunes the part in
front and writes the pruned weights back into the original graph; onnxruntime runs the result,
post-processing and all. skl2onnx itself is not needed: the graph is built here with
``onnx.helper``, node for node as skl2onnx 1.x writes ``MLPClassifier``.

References are independent of the library: ``helpers.ref_prune`` for weight pruning, an L1
ranking written here for node pruning, both run by onnxruntime on the original graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import IR_VERSION, OPSET, ref_prune, rel_err, run_cli, zero_fraction
from onnx import TensorProto, helper, numpy_helper

from tvm_scalpel import flows
from tvm_scalpel.errors import ScalpelError
from tvm_scalpel.graph_cut import cut_at, importable_part, write_back

SIZES = (24, 64, 32, 5)  # features, two hidden layers, classes
WEIGHTS = ["coefficient", "coefficient1", "coefficient2"]
G = 8  # pinned: the same groups on AVX2 and AVX-512 hosts


def skl2onnx_mlp(sizes=SIZES, seed: int = 0) -> onnx.ModelProto:
    """``MLPClassifier`` as skl2onnx converts it: ``MatMul`` + ``Add`` (+ ``Relu``) per layer,
    ``Softmax``, then ``ArgMax`` -> ``ArrayFeatureExtractor`` -> ``Reshape`` -> ``Cast`` for
    ``output_label`` and ``Identity`` -> ``ZipMap`` for ``output_probability`` (seq(map))."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "float_input"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        s = "" if i == 0 else str(i)
        w = (rng.standard_normal((k, n)) * np.sqrt(2.0 / k)).astype(np.float32)
        b = (rng.standard_normal((1, n)) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"coefficient{s}"), numpy_helper.from_array(b, f"intercepts{s}")]
        nodes += [helper.make_node("MatMul", [prev, f"coefficient{s}"], [f"mul_result{s}"], name=f"MatMul{s}"),
                  helper.make_node("Add", [f"mul_result{s}", f"intercepts{s}"], [f"add_result{s}"], name=f"Add{s}")]
        prev = f"add_result{s}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"next_activations{s}"], name=f"Relu{s}"))
            prev = f"next_activations{s}"
    classes = np.arange(sizes[-1], dtype=np.int64)
    inits += [numpy_helper.from_array(classes, "classes"),
              numpy_helper.from_array(np.array([-1], np.int64), "shape_tensor")]
    nodes += [
        helper.make_node("Softmax", [prev], ["out_activations_result"], name="Softmax", axis=1),
        helper.make_node("ArgMax", ["out_activations_result"], ["label"], name="ArgMax", axis=1),
        helper.make_node("ArrayFeatureExtractor", ["classes", "label"], ["array_feature_extractor_result"],
                         name="ArrayFeatureExtractor", domain="ai.onnx.ml"),
        helper.make_node("Reshape", ["array_feature_extractor_result", "shape_tensor"], ["reshaped_result"],
                         name="Reshape"),
        helper.make_node("Cast", ["reshaped_result"], ["output_label"], name="Cast", to=TensorProto.INT64),
        helper.make_node("Identity", ["out_activations_result"], ["probabilities"], name="Identity"),
        helper.make_node("ZipMap", ["probabilities"], ["output_probability"], name="ZipMap",
                         domain="ai.onnx.ml", classlabels_int64s=classes.tolist()),
    ]
    seq_map = helper.make_sequence_type_proto(helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    graph = helper.make_graph(
        nodes, "mlp_classifier",
        [helper.make_tensor_value_info("float_input", TensorProto.FLOAT, [None, sizes[0]])],
        [helper.make_tensor_value_info("output_label", TensorProto.INT64, [None]),
         helper.make_value_info("output_probability", seq_map)], inits)
    model = helper.make_model(graph, producer_name="skl2onnx", opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def with_weights(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arrays[init.name]), init.name))
    return out


def ort_classify(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities [N, classes]) of a classifier whose probabilities are ZipMap'ed."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    labels, maps = sess.run(["output_label", "output_probability"], {"float_input": x})
    probs = np.array([[m[c] for c in range(SIZES[-1])] for m in maps], dtype=np.float64)
    return labels, probs


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cut")
    model = skl2onnx_mlp()
    onnx.save(model, str(d / "mlp.onnx"))
    return d, model


def check_post_processing_kept(original: onnx.ModelProto, written: onnx.ModelProto) -> None:
    assert [(o.name, o.type) for o in written.graph.output] == [(o.name, o.type) for o in original.graph.output]
    assert [(n.op_type, n.domain) for n in written.graph.node if n.domain == "ai.onnx.ml"] == [
        ("ArrayFeatureExtractor", "ai.onnx.ml"), ("ZipMap", "ai.onnx.ml")]
    assert inits(written)["classes"].tolist() == list(range(SIZES[-1]))
    onnx.checker.check_model(written, full_check=True)


# --------------------------------------------------------------------------- write-back (default)


def test_weight_pruning_is_written_back_with_the_post_processing(files, rng):
    d, model = files
    res = run_cli("prune", d / "mlp.onnx", "-o", d / "w.onnx", "--rate", 0.8, "--group-width", G)
    assert res.returncode == 0, res.stderr
    assert "graph cut before ArrayFeatureExtractor" in res.stdout
    assert "ZipMap" in res.stdout and "written back into the original graph" in res.stdout
    written = onnx.load(str(d / "w.onnx"))
    check_post_processing_kept(model, written)

    # each layer equals the independent reference (same shapes, zeros in whole groups), and the
    # printed rate is the zero fraction of the weight in the file written
    original, pruned = inits(model), inits(written)
    reference = {}
    for name in WEIGHTS:
        ref, _ = ref_prune(original[name].T, G, 0.8)
        reference[name] = ref.T
        assert pruned[name].shape == original[name].shape
        np.testing.assert_array_equal(pruned[name], ref.T)
        row = next(line.split() for line in res.stdout.splitlines() if line.startswith(name + " "))
        assert float(row[3]) == pytest.approx(zero_fraction(pruned[name]), abs=5e-4)

    x = rng.standard_normal((64, SIZES[0])).astype(np.float32)
    labels, probs = ort_classify(written, x)
    ref_labels, ref_probs = ort_classify(with_weights(model, reference), x)
    assert rel_err(probs, ref_probs) < 1e-5
    np.testing.assert_array_equal(labels, ref_labels)
    assert rel_err(probs, ort_classify(model, x)[1]) > 1e-3  # pruning changed something


def l1_kept(w_kn: np.ndarray, rate: float) -> np.ndarray:
    """The neurons a 1-layer L1 ranking keeps: the ``n - round(rate * n)`` largest columns'
    L1 norms (the earlier neuron goes first on a tie), ascending."""
    norms = np.abs(w_kn.astype(np.float64)).sum(axis=0)
    n = norms.size
    drop = int(round(rate * n))
    return np.sort(np.argsort(norms, kind="stable")[drop:])


def test_node_pruning_is_written_back_and_equals_the_masked_model(files, rng):
    d, model = files
    res = run_cli("prune", d / "mlp.onnx", "-o", d / "n.onnx", "--nodes", 0.5, "--rate", 0)
    assert res.returncode == 0, res.stderr
    written = onnx.load(str(d / "n.onnx"))
    check_post_processing_kept(model, written)

    original, pruned = inits(model), inits(written)
    # the removed fraction printed is the one measured on the file written
    before = SIZES[1] + SIZES[2]
    after = pruned["coefficient"].shape[1] + pruned["coefficient1"].shape[1]
    line = next(line for line in res.stdout.splitlines() if line.startswith("node pruning removed"))
    assert line.split()[3] == f"{(1 - after / before) * 100:.1f}%"
    assert after == before // 2
    assert pruned["coefficient2"].shape == (SIZES[2] // 2, SIZES[3])  # its inputs shrink with them

    # the reference: the original graph, post-processing included, with the next layer's input
    # rows of the L1-weakest neurons set to zero (what removing them computes)
    masked = {k: v.copy() for k, v in original.items()}
    for w, nxt in (("coefficient", "coefficient1"), ("coefficient1", "coefficient2")):
        gone = np.setdiff1d(np.arange(original[w].shape[1]), l1_kept(original[w], 0.5))
        masked[nxt][gone, :] = 0.0
    x = rng.standard_normal((64, SIZES[0])).astype(np.float32)
    labels, probs = ort_classify(written, x)
    ref_labels, ref_probs = ort_classify(with_weights(model, masked), x)
    assert rel_err(probs, ref_probs) < 1e-5
    np.testing.assert_array_equal(labels, ref_labels)
    assert rel_err(probs, ort_classify(model, x)[1]) > 1e-3  # pruning changed something


def test_outputs_inside_the_network_prunes_up_to_there_and_keeps_the_rest(rng):
    model = skl2onnx_mlp(seed=3)
    result = flows.prune(model, 0.75, group_width=G, outputs="next_activations")
    written = result.model
    check_post_processing_kept(model, written)
    assert result.cut.outputs == ["next_activations"] and result.written_back
    original, pruned = inits(model), inits(written)
    np.testing.assert_array_equal(pruned["coefficient"], ref_prune(original["coefficient"].T, G, 0.75)[0].T)
    for name in ("coefficient1", "coefficient2"):  # after the cut: as they were
        np.testing.assert_array_equal(pruned[name], original[name])
    assert [r[0] for r in result.rows()[:-1]] == ["coefficient"]

    x = rng.standard_normal((16, SIZES[0])).astype(np.float32)
    reference = with_weights(model, {"coefficient": ref_prune(original["coefficient"].T, G, 0.75)[0].T})
    assert rel_err(ort_classify(written, x)[1], ort_classify(reference, x)[1]) < 1e-5


# --------------------------------------------------------------------------- the cut alone


def test_cut_only_writes_the_part_and_compile_takes_it(files, tmp_path, rng):
    d, model = files
    out = tmp_path / "cut.onnx"
    res = run_cli("prune", d / "mlp.onnx", "-o", out, "--rate", 0.5, "--group-width", G,
                  "--outputs", "probabilities", "--cut-only")
    assert res.returncode == 0, res.stderr
    assert "graph cut at --outputs probabilities" in res.stdout and "left out" in res.stdout
    part = onnx.load(str(out))
    assert [o.name for o in part.graph.output] == ["probabilities"]
    assert not {"ZipMap", "ArrayFeatureExtractor", "ArgMax"} & set(ops(part))
    assert all(o.domain in ("", "ai.onnx") for o in part.opset_import)
    x = rng.standard_normal((9, SIZES[0])).astype(np.float32)
    sess = ort.InferenceSession(part.SerializeToString(), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {"float_input": x})[0]
    original = inits(model)
    reference = with_weights(model, {w: ref_prune(original[w].T, G, 0.5)[0].T for w in WEIGHTS})
    assert rel_err(probs, ort_classify(reference, x)[1]) < 1e-5

    # the whole model does not compile; the cut does, and runs as onnxruntime does
    with pytest.raises(ScalpelError, match="--outputs label,probabilities"):
        flows.compile(model)
    lib = tmp_path / "cut.so"
    compiled = flows.compile(d / "mlp.onnx", lib, outputs="label,probabilities")
    assert compiled.cut is not None and len(compiled.layers) == 3
    np.save(tmp_path / "x.npy", x)
    res = run_cli("run", lib, "--input", tmp_path / "x.npy", "-o", tmp_path / "p.npy", "--outputs", "probabilities")
    assert res.returncode == 0, res.stderr
    ref_labels, ref_probs = ort_classify(model, x)
    assert rel_err(np.load(tmp_path / "p.npy"), ref_probs) < 1e-5
    res = run_cli("run", lib, "--input", tmp_path / "x.npy", "-o", tmp_path / "q.npy", "--outputs", "scores")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "label, probabilities" in res.stderr and not (tmp_path / "q.npy").exists()


BAD_OUTPUTS = [
    ("unknown", "probabilites", "no tensor named 'probabilites' in the model; did you mean probabilities"),
    ("input", "float_input", "is an input or a constant"),
    ("past-zipmap", "output_probability", "the cut still holds ZipMap"),
    ("empty", ",", "give one or more tensor names"),
    ("blank", "", "give one or more tensor names"),
]


@pytest.mark.parametrize("name,message", [c[1:] for c in BAD_OUTPUTS], ids=[c[0] for c in BAD_OUTPUTS])
def test_bad_outputs_are_one_line_errors(files, tmp_path, name, message):
    d, _ = files
    res = run_cli("prune", d / "mlp.onnx", "-o", tmp_path / "o.onnx", "--outputs", name)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o.onnx").exists()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the library


def test_automatic_cut_ends_where_the_post_processing_reads():
    model = skl2onnx_mlp()
    cut = importable_part(model)
    assert cut.stop.op_type == "ArrayFeatureExtractor"
    assert cut.outputs == ["label", "probabilities"]
    assert [n.op_type for n in cut.left_out] == ["ArrayFeatureExtractor", "Reshape", "Cast", "ZipMap"]
    assert [o.name for o in cut.model.graph.input] == ["float_input"]
    onnx.checker.check_model(cut.model, full_check=True)
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    whole.graph.ClearField("output")  # a graph TVM takes whole is not cut
    whole.graph.output.extend([helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, SIZES[-1]])])
    keep = {"probabilities"}
    for node in reversed(list(whole.graph.node)):
        if keep & set(node.output):
            keep |= set(node.input)
        else:
            whole.graph.node.remove(node)
    assert importable_part(whole) is None


def test_a_sequence_output_of_a_standard_op_is_cut_too():
    """``SequenceConstruct`` is in TVM's table, but a sequence is no tensor to prune or return."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["r"]),
         helper.make_node("SequenceConstruct", ["r"], ["seq"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_value_info("seq", helper.make_sequence_type_proto(
            helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3])))], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    cut = importable_part(model)
    assert cut.stop.op_type == "SequenceConstruct" and cut.outputs == ["r"]


def test_a_removed_channel_reaching_the_post_processing_is_refused():
    """The pruner never shrinks a cut's outputs; if a pruned part did, ``write_back`` must
    refuse rather than write a graph whose ZipMap reads fewer classes than it labels."""
    model = skl2onnx_mlp()
    cut = cut_at(model, "probabilities", keep_rest=True)
    assert cut.outputs == ["probabilities", "out_activations_result"]  # ArgMax, left out, reads it
    shrunk = onnx.ModelProto()
    shrunk.CopyFrom(cut.model)
    arrays = inits(shrunk)
    shrunk = with_weights(shrunk, {"coefficient2": arrays["coefficient2"][:, :4],
                                   "intercepts2": arrays["intercepts2"][:, :4]})
    with pytest.raises(ScalpelError, match="probabilities.*ZipMap"):
        write_back(model, cut, shrunk)


def test_accuracy_needs_the_class_scores_named(rng):
    from helpers import separable_data

    from tvm_scalpel.data import Dataset

    model = skl2onnx_mlp(seed=1)
    x, y = separable_data(rng, 200, SIZES[0], SIZES[-1])
    data = Dataset(x[:160], y[:160], x[160:], y[160:], "clusters")
    with pytest.raises(ScalpelError, match="--outputs add_result2"):
        flows.prune(model, 0.5, data=data)
    result = flows.prune(model, 0.5, group_width=G, data=data, outputs="add_result2")
    assert result.accuracy_before is not None and result.accuracy_after is not None
    check_post_processing_kept(model, result.model)
    # the accuracy printed is that of the written model, as onnxruntime runs it
    labels, _ = ort_classify(result.model, data.x_test)
    assert result.accuracy_after == pytest.approx(float((labels == data.y_test).mean()), abs=1e-9)


def test_a_weight_the_post_processing_reads_too_stays_unpruned_there():
    """A constant read by the pruned part and by a node TVM cannot import: the part reads the
    pruned copy, the other node the original (under a name of its own)."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((32, 48)).astype(np.float32)
    w2 = rng.standard_normal((48, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
         helper.make_node("Explain", ["y", "w2"], ["why"], name="explain", domain="com.example")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16]),
         helper.make_tensor_value_info("why", TensorProto.FLOAT, [None, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.example", 1)])
    model.ir_version = IR_VERSION
    result = flows.prune(model, 0.5, group_width=G)
    assert result.cut.stop.name == "explain" and result.cut.outputs == ["y"]
    written = result.model
    arrays = inits(written)
    explain = next(n for n in written.graph.node if n.op_type == "Explain")
    fc2 = next(n for n in written.graph.node if n.name == "fc2")
    assert fc2.input[1] == "w2" and explain.input[1] != "w2"
    np.testing.assert_array_equal(arrays["w2"], ref_prune(w2.T, G, 0.5)[0].T)
    np.testing.assert_array_equal(arrays[explain.input[1]], w2)
    np.testing.assert_array_equal(arrays["w1"], ref_prune(w1.T, G, 0.5)[0].T)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    sess = ort.InferenceSession(result.part.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    ref = np.maximum(x.astype(np.float64) @ arrays["w1"], 0) @ arrays["w2"]
    assert rel_err(y, ref) < 1e-5
