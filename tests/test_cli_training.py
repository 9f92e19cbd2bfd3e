"""The ``train`` command and the data-driven parts of ``prune`` (fine-tuning, node pruning), run as
subprocesses on small synthetic data sets; every printed accuracy is recomputed with onnxruntime
on the ONNX file the command wrote."""

import gzip
import os
import re
import struct

import numpy as np
import onnx
import pytest
from helpers import (
    make_model,
    mlp_ref,
    onnx_dense_layers,
    ort_accuracy,
    ort_run,
    ref_prune,
    rel_err,
    run_cli,
)
from onnx import helper, numpy_helper

from tvm_scalpel import models

SIZES = [12, 10, 8, 4]


def unit_clusters(rng, n: int, dim: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable clusters with every value in [0, 1] (what the loaders pass through unscaled)."""
    centres = rng.random((classes, dim))
    y = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])
    rng.shuffle(y)
    x = np.clip(centres[y] + 0.07 * rng.standard_normal((n, dim)), 0.0, 1.0)
    return x.astype(np.float32), y.astype(np.int64)


def accuracy_line(stdout: str, label: str) -> float:
    """The fraction printed as ``test accuracy <label>: 12.34%``."""
    found = re.findall(rf"^test accuracy {re.escape(label)}: ([0-9.]+)%$", stdout, re.M)
    assert len(found) == 1, stdout
    return float(found[0]) / 100


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_training")
    rng = np.random.default_rng(4242)
    model = models.mlp(SIZES, seed=17, layout="gemm")
    onnx.save(model, str(d / "model.onnx"))

    x, y = unit_clusters(rng, 256, SIZES[0], SIZES[-1])
    split = {"x_train": x[:192], "y_train": y[:192], "x_test": x[192:], "y_test": y[192:]}
    np.savez(d / "splits.npz", **split)
    np.savez(d / "narrow.npz", x=x[:, :-1], y=y)
    labels_out = y.copy()
    labels_out[10] = 6
    np.savez(d / "labels6.npz", x=x, y=labels_out)
    np.savez(d / "few.npz", x=x[:12], y=y[:12])  # 10 training samples, a batch is 64
    (d / "empty.npz").write_bytes(b"")
    np.savez(d / "noarrays.npz")
    (d / "corrupt.npz").write_bytes(rng.bytes(1000))

    # a model whose output is not [batch, classes]
    w = rng.standard_normal((6, SIZES[0])).astype(np.float32)
    shape = helper.make_node("Constant", [], ["shape"],
                             value=numpy_helper.from_array(np.array([0, 3, 2], np.int64)))
    out3d = make_model([helper.make_node("Gemm", ["input", "w"], ["h"], transB=1), shape,
                        helper.make_node("Reshape", ["h", "shape"], ["out"])],
                       [numpy_helper.from_array(w, "w")], [("input", ["N", SIZES[0]])], [("out", ["N", 3, 2])])
    onnx.save(out3d, str(d / "out3d.onnx"))

    # a gzipped IDX folder whose training images are cut short
    (d / "idx_truncated").mkdir()
    for name, arr in [("train-images-idx3-ubyte", rng.integers(0, 256, (20, 2, 6), dtype=np.uint8)),
                      ("train-labels-idx1-ubyte", rng.integers(0, 4, 20, dtype=np.uint8)),
                      ("t10k-images-idx3-ubyte", rng.integers(0, 256, (8, 2, 6), dtype=np.uint8)),
                      ("t10k-labels-idx1-ubyte", rng.integers(0, 4, 8, dtype=np.uint8))]:
        raw = gzip.compress(struct.pack(">I", 0x800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
                            + arr.tobytes())
        (d / "idx_truncated" / (name + ".gz")).write_bytes(raw[: len(raw) // 2] if "train-images" in name else raw)

    return {"dir": d, "model": model, "split": split}


# --------------------------------------------------------------------------- train


def test_train(work):
    d, split = work["dir"], work["split"]
    res = run_cli("train", d / "model.onnx", "-o", d / "trained.onnx", "--data", d / "splits.npz",
                  "--epochs", 3, "--batch-size", 16, "--lr", 0.05, "--quiet")
    assert res.returncode == 0, res.stderr
    assert f"data: {d / 'splits.npz'}, 192 train / 64 test samples" in res.stdout
    before = accuracy_line(res.stdout, "before training")
    after = accuracy_line(res.stdout, "after training")
    assert before == pytest.approx(ort_accuracy(work["model"], split["x_test"], split["y_test"]), abs=6e-5)
    trained = onnx.load(str(d / "trained.onnx"))
    assert after == pytest.approx(ort_accuracy(trained, split["x_test"], split["y_test"]), abs=6e-5)
    assert after >= 0.9 and after > before  # chance is 0.25
    epochs = [line.split() for line in res.stdout.splitlines() if re.match(r"^\d+\s", line)]
    assert [int(row[0]) for row in epochs] == [1, 2, 3]
    assert float(epochs[-1][1]) < float(epochs[0][1])  # the loss went down
    # the same network with new weights
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in work["model"].graph.node]
    for a, b in zip(onnx_dense_layers(trained), onnx_dense_layers(work["model"])):
        assert a["w"].shape == b["w"].shape and not np.array_equal(a["w"], b["w"])
    assert "%|" not in res.stderr  # --quiet: no progress bars


# --------------------------------------------------------------------------- prune with data


def test_prune_and_fine_tune(work):
    d, split, model = work["dir"], work["split"], work["model"]
    rate = 0.5
    res = run_cli("prune", d / "model.onnx", "-o", d / "fine_tuned.onnx", "--rate", rate, "--group-width", 1,
                  "--fine-tune", 3, "--data", d / "splits.npz", "--batch-size", 16, "--lr", 0.05, "--quiet")
    assert res.returncode == 0, res.stderr
    before = accuracy_line(res.stdout, "before pruning")
    after = accuracy_line(res.stdout, "after pruning and fine-tuning")
    out = onnx.load(str(d / "fine_tuned.onnx"))
    assert before == pytest.approx(ort_accuracy(model, split["x_test"], split["y_test"]), abs=6e-5)
    assert after == pytest.approx(ort_accuracy(out, split["x_test"], split["y_test"]), abs=6e-5)
    assert after >= 0.8
    for tuned, orig in zip(onnx_dense_layers(out), onnx_dense_layers(model)):
        pruned, keep = ref_prune(orig["w"], 1, rate)
        # exactly the reference's zeros survive fine-tuning, and nothing else became zero
        assert np.array_equal(tuned["w"] == 0, ~keep), tuned["name"]
        assert not np.array_equal(tuned["w"], pruned)  # fine-tuned, not just pruned


def test_prune_nodes_with_trained_masks(work):
    d, split = work["dir"], work["split"]
    res = run_cli("prune", d / "model.onnx", "-o", d / "masked.onnx", "--rate", 0, "--nodes", 0.5,
                  "--mask-epochs", 1, "--data", d / "splits.npz", "--batch-size", 16, "--lr", 0.05, "--quiet")
    assert res.returncode == 0, res.stderr
    lines = [line.split()[:3] for line in res.stdout.splitlines()]
    assert ["fc1.weight", "10", "5"] in lines and ["fc2.weight", "8", "4"] in lines
    assert "node pruning removed 50.0% of the prunable nodes" in res.stdout
    out = onnx.load(str(d / "masked.onnx"))
    assert [layer["w"].shape for layer in onnx_dense_layers(out)] == [(5, 12), (4, 5), (4, 4)]
    for label, net in [("before pruning", work["model"]), ("after pruning", out)]:
        assert accuracy_line(res.stdout, label) == pytest.approx(
            ort_accuracy(net, split["x_test"], split["y_test"]), abs=6e-5), label


# --------------------------------------------------------------------------- node pruning, no data


def test_prune_nodes_by_l1_norm_without_data(work, rng):
    d, model = work["dir"], work["model"]
    res = run_cli("prune", d / "model.onnx", "-o", d / "nodes.onnx", "--nodes", 0.5,
                  "--nodes-criterion", "l1", "--rate", 0)
    assert res.returncode == 0, res.stderr
    assert "test accuracy" not in res.stdout  # no data was asked for or loaded
    lines = [line.split()[:3] for line in res.stdout.splitlines()]
    assert ["fc1.weight", "10", "5"] in lines and ["fc2.weight", "8", "4"] in lines
    out = onnx.load(str(d / "nodes.onnx"))
    assert [layer["w"].shape for layer in onnx_dense_layers(out)] == [(5, 12), (4, 5), (4, 4)]
    # reference: the original network with the half of each hidden layer of least L1 norm off
    layers = onnx_dense_layers(model)
    for layer in layers[:-1]:
        off = np.argsort(np.abs(layer["w"].astype(np.float64)).sum(axis=1))[: len(layer["w"]) // 2]
        layer["w"], layer["bias"] = layer["w"].copy(), layer["bias"].copy()
        layer["w"][off], layer["bias"][off] = 0.0, 0.0
    x = rng.random((7, SIZES[0])).astype(np.float32)
    assert rel_err(ort_run(out, x), mlp_ref(layers, x)) < 1e-5


def test_prune_nodes_of_builtin_lenet5(work, rng):
    d = work["dir"]
    res = run_cli("prune", "lenet5", "-o", d / "lenet5_nodes.onnx", "--nodes", 0.5,
                  "--nodes-criterion", "l2", "--rate", 0.5)
    assert res.returncode == 0, res.stderr
    out = onnx.load(str(d / "lenet5_nodes.onnx"))
    inits = {i.name: tuple(i.dims) for i in out.graph.initializer}
    assert inits["conv1.weight"] == (10, 1, 5, 5) and inits["conv2.weight"] == (25, 10, 5, 5)
    assert inits["fc1.weight"] == (250, 400) and inits["fc2.weight"] == (10, 250)
    y = ort_run(out, rng.random((3, 1, 28, 28)).astype(np.float32))
    assert y.shape == (3, 10) and np.all(np.isfinite(y))
    fc1 = numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == "fc1.weight"))
    assert abs(np.mean(fc1 == 0) - 0.5) < 0.05  # then weight-pruned at --rate


# --------------------------------------------------------------------------- bad input

BAD = [
    ("train-data-shape", "train {d}/model.onnx --data {d}/narrow.npz", "do not fit the model's input (12,)"),
    ("prune-data-shape", "prune {d}/model.onnx --fine-tune 1 --data {d}/narrow.npz",
     "do not fit the model's input (12,)"),
    ("train-labels-out-of-range", "train {d}/model.onnx --data {d}/labels6.npz", "label 6 is out of range"),
    ("prune-labels-out-of-range", "prune {d}/model.onnx --fine-tune 1 --data {d}/labels6.npz",
     "label 6 is out of range"),
    ("train-fewer-than-a-batch", "train {d}/model.onnx --data {d}/few.npz", "fewer than one batch of 64"),
    ("train-empty-data-file", "train {d}/model.onnx --data {d}/empty.npz", "not a readable .npz"),
    ("prune-npz-without-arrays", "prune {d}/model.onnx --fine-tune 1 --data {d}/noarrays.npz", "found none"),
    ("train-corrupt-data", "train {d}/model.onnx --data {d}/corrupt.npz", "not a readable .npz"),
    ("prune-corrupt-data", "prune {d}/model.onnx --fine-tune 1 --data {d}/corrupt.npz", "not a readable .npz"),
    ("train-output-not-class-scores", "train {d}/out3d.onnx --data {d}/splits.npz", "not class scores"),
    ("prune-output-not-class-scores", "prune {d}/out3d.onnx --fine-tune 1 --data {d}/splits.npz",
     "not class scores"),
    ("prune-fine-tune-missing-data", "prune {d}/model.onnx --fine-tune 1 --data {d}/missing.npz",
     "missing.npz: no such file"),
    ("train-truncated-gzip-idx", "train {d}/model.onnx --data {d}/idx_truncated", "train-images-idx3-ubyte.gz"),
]


@pytest.mark.parametrize("args,message", [pytest.param(a, m, id=n) for n, a, m in BAD])
def test_bad_input_fails_cleanly(work, tmp_path, args, message):
    d = work["dir"]
    out = tmp_path / "out"
    out.mkdir()
    before_out, before_in = snapshot(tmp_path), snapshot(d)
    res = run_cli(*[a.replace("{d}", str(d)) for a in args.split()], "-o", out / "o.onnx", "--quiet")
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    assert lines[0].startswith("tvm-scalpel: error: ") and message in lines[0], lines[0]
    assert not os.path.exists(out / "o.onnx")
    assert snapshot(tmp_path) == before_out and snapshot(d) == before_in  # no stray temp files
