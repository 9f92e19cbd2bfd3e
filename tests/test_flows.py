"""The library API (tvm_scalpel.prune / compile / tune / train): each one call does what the
matching ``tvm-scalpel`` command does. Every test runs the command as a subprocess and the call
on the same small model, and checks that they agree (weights, tables, libraries), and checks the
result against an independent reference (numpy / onnxruntime)."""

import re

import numpy as np
import onnx
import pytest
from helpers import (
    assert_whole_groups,
    onnx_dense_layers,
    ort_run,
    ref_prune,
    rel_err,
    run_cli,
    separable_data,
    zero_fraction,
)

import tvm_scalpel
from tvm_scalpel import ScalpelError, checks, flows, models
from tvm_scalpel.tables import format_table

SIZES = [60, 40, 24, 6]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("flows")
    model = models.mlp(SIZES, seed=21, layout="gemm")
    onnx.save(model, str(d / "model.onnx"))
    return {"dir": d, "model": model}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {layer["name"]: layer["w"] for layer in onnx_dense_layers(model)}


def _table_in(stdout: str, headers, rows) -> bool:
    return format_table(headers, rows) in stdout


def test_prune_is_the_command(work, host):
    d, model = work["dir"], work["model"]
    res = run_cli("prune", d / "model.onnx", "-o", d / "cli.onnx", "--rate", 0.8, "--policy", "rules",
                  "--last-layer-rate", 0.5)
    assert res.returncode == 0, res.stderr
    result = tvm_scalpel.prune(model, rate=0.8, policy="rules", target="x86", last_layer_rate=0.5)
    cli = _weights(onnx.load(str(d / "cli.onnx")))
    api = _weights(result.model)
    assert cli.keys() == api.keys() and len(api) == 3
    for name in api:
        np.testing.assert_array_equal(api[name], cli[name])
    # the same tables the command printed, from the result's rows
    assert _table_in(res.stdout, flows.POLICY_HEADERS, result.policy_rows())
    assert _table_in(res.stdout, flows.PRUNE_HEADERS, result.rows())
    assert [p.method for p in result.policy] == ["weights"] * 3  # a CPU: FC layers get weights
    # and what they say holds: the reference pruning of each input weight at the rate asked
    for (name, w), orig, rate in zip(api.items(), onnx_dense_layers(model), [0.8, 0.8, 0.5]):
        assert_whole_groups(w, host.simd_width)
        ref, _ = ref_prune(orig["w"], host.simd_width, rate)
        np.testing.assert_array_equal(w, ref)
    assert result.rate == 0.8 and result.nodes is None and result.data is None
    assert result.rows()[-1][-1] == sum(layer.sparse_bytes for layer in result.weights.layers)


def test_prune_nodes_is_the_command(work):
    d, model = work["dir"], work["model"]
    res = run_cli("prune", d / "model.onnx", "-o", d / "nodes.onnx", "--rate", 0.5, "--nodes", 0.5,
                  "--nodes-criterion", "l2", "--group-width", 4, "--importance", "max")
    assert res.returncode == 0, res.stderr
    result = tvm_scalpel.prune(model, 0.5, nodes=0.5, nodes_criterion="l2", group_width=4,
                               importance="max")
    cli = _weights(onnx.load(str(d / "nodes.onnx")))
    for name, w in _weights(result.model).items():
        np.testing.assert_array_equal(w, cli[name])
        assert_whole_groups(w, 4)
    assert _table_in(res.stdout, flows.NODE_HEADERS, result.node_rows())
    assert result.nodes.nodes_after == {"fc1.weight": 20, "fc2.weight": 12}
    # fc1 lost half its outputs, so fc2 lost the same inputs: shapes are the smaller network's
    assert [w.shape for w in _weights(result.model).values()] == [(20, 60), (12, 20), (6, 12)]


def test_compile_is_the_command(work, rng):
    d = work["dir"]
    pruned = tvm_scalpel.prune(work["model"], 0.85).model
    onnx.save(pruned, str(d / "pruned.onnx"))
    res = run_cli("compile", d / "pruned.onnx", "-o", d / "cli.so")
    assert res.returncode == 0, res.stderr
    result = tvm_scalpel.compile(pruned, d / "api.so")
    assert _table_in(res.stdout, flows.COMPILE_HEADERS, result.rows())
    assert f"{result.sparse_layers} of 3 dense layers went grouped-sparse" in res.stdout
    assert result.names == ["fc1.weight", "fc2.weight", "fc3.weight"]
    x = rng.standard_normal((3, SIZES[0])).astype(np.float32)
    ref = ort_run(pruned, x)
    for lib in ("cli.so", "api.so"):
        y = tvm_scalpel.run_library(tvm_scalpel.load_library(d / lib), x)
        assert rel_err(y, ref) < 1e-5, lib


def test_compile_without_output_writes_nothing(work, tmp_path):
    result = tvm_scalpel.compile(work["model"], mode="dense")
    assert result.output is None and result.sparse_layers == 0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ScalpelError, match="must end in .so"):
        tvm_scalpel.compile(work["model"], tmp_path / "lib.dll")


def test_tune_is_the_command(work):
    """The command measures; the call on the same database then measures nothing new and
    reports the same per-layer table (the times are the database's)."""
    d = work["dir"]
    db = d / "tune.jsonl"
    res = run_cli("tune", d / "model.onnx", "--db", db, "--trials", 2, "--quiet")
    assert res.returncode == 0, res.stderr
    results = tvm_scalpel.tune(work["model"], db, trials=2, progress=False)
    assert [r.new_trials for r in results] == [0, 0, 0]
    # the same table but for its last column: the command measured, the call did not
    table = format_table(flows.TUNE_HEADERS, [r.row() for r in results]).splitlines()[2:]
    cli = [line.split() for line in res.stdout.splitlines() if line.startswith("fc")]
    assert [line.split()[:-1] for line in table] == [row[:-1] for row in cli]
    assert sum(int(row[-1]) for row in cli) == 3 * (2 + 1)  # 2 sparse candidates + ours, per layer
    assert [r.shape for r in results] == [(40, 60), (24, 40), (6, 24)]
    for r in results:
        assert r.kernel in flows.KernelKind and str(r.kernel) in r.kernel_text
        fastest = min([r.sparse_seconds, r.dense_seconds["ours"]])
        assert (r.kernel is flows.KernelKind.SPARSE) == (r.sparse_seconds == fastest < r.dense_seconds["ours"])


def test_train_is_the_command(tmp_path):
    rng = np.random.default_rng(7)
    x, y = separable_data(rng, 120, 12, 3)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    model = models.mlp([12, 16, 3], seed=3, layout="gemm")
    onnx.save(model, str(tmp_path / "model.onnx"))
    res = run_cli("train", tmp_path / "model.onnx", "-o", tmp_path / "cli.onnx", "--data",
                  tmp_path / "data.npz", "--epochs", 2, "--batch-size", 16, "--lr", 0.05, "--quiet")
    assert res.returncode == 0, res.stderr
    result = tvm_scalpel.train(model, tmp_path / "data.npz", epochs=2,
                               training=flows.Training(lr=0.05, batch_size=16, progress=False))
    assert _table_in(res.stdout, flows.TRAIN_HEADERS, result.rows())
    cli = _weights(onnx.load(str(tmp_path / "cli.onnx")))
    for name, w in _weights(result.model).items():
        np.testing.assert_allclose(w, cli[name], rtol=1e-5, atol=1e-6)
    test_x, test_y = result.data.x_test, result.data.y_test
    ort_acc = float((ort_run(result.model, test_x).argmax(axis=1) == test_y).mean())
    assert result.accuracy_after == pytest.approx(ort_acc, abs=1e-6)


def test_bad_arguments_are_refused_alike():
    """One validator per argument: the call refuses what the command line refuses."""
    model = models.mlp([8, 4], seed=0)
    for kwargs, fragment in [({"rate": 1.0}, "pruning rate must be in [0, 1)"),
                             ({"nodes": -0.1}, "node pruning rate must be in [0, 1)"),
                             ({"group_width": 0}, "group width must be >= 1"),
                             ({"importance": "l3"}, "unknown importance"),
                             ({"policy": "random"}, "unknown policy")]:
        with pytest.raises(ScalpelError, match=re.escape(fragment)):
            tvm_scalpel.prune(model, **{"rate": 0.5, **kwargs})
    with pytest.raises(ScalpelError, match="unknown mode"):
        tvm_scalpel.compile(model, mode="fast")
    res = run_cli("prune", "m.onnx", "-o", "out.onnx", "--rate", "1.0")
    assert res.returncode == 2 and "must be in [0, 1), got 1.0" in res.stderr
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1"):
        checks.parse_group_width("0")
    assert checks.parse_group_width("auto") == "auto" and checks.parse_rate("0.25") == 0.25


def test_one_rule_for_the_default_group_width(host):
    assert checks.default_group_width(host, None) == host.simd_width
    assert checks.default_group_width(host, "auto") == host.simd_width
    assert checks.default_group_width(host, 3) == 3


def test_scalpel_pipeline_is_what_compile_runs(work, rng):
    """compile_onnx's passes are scalpel_pipeline's: the same decisions, the same outputs."""
    import tvm

    from tvm_scalpel.onnx_io import to_relax
    from tvm_scalpel.passes import scalpel_pipeline

    pruned = tvm_scalpel.prune(work["model"], 0.9, group_width=4).model
    report = []
    exe = tvm.compile(to_relax(pruned), target=host_target(),
                      relax_pipeline=scalpel_pipeline("x86", report=report))
    built = tvm_scalpel.compile_onnx(pruned, "x86")
    assert [(d.name, d.kernel, d.group_width) for d in report] == \
        [(d.name, d.kernel, d.group_width) for d in built.layers]
    assert [d.group_width for d in report] == [4, 4, 4]
    x = rng.standard_normal((2, SIZES[0])).astype(np.float32)
    vm = tvm.relax.VirtualMachine(exe, tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert rel_err(y, ort_run(pruned, x)) < 1e-5
    assert zero_fraction(_weights(pruned)["fc1.weight"]) == pytest.approx(0.9, abs=0.01)


def host_target():
    from tvm_scalpel.targets import resolve_target

    return resolve_target("x86").target
