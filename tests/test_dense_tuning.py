"""Dense layers tuned with meta_schedule: `tune --dense-trials`, and compile using the result."""

import json

import numpy as np
import pytest
from helpers import ort_run, rel_err, run_cli, vm_run

from tvm_scalpel import compile_onnx, models, resolve_target
from tvm_scalpel.onnx_io import save_onnx
from tvm_scalpel.tuning import TuningDatabase


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One layer (24x64) tuned by meta_schedule at batch 2 (4 trials: about a minute)."""
    root = tmp_path_factory.mktemp("ms")
    model = models.mlp([64, 24], seed=3)
    save_onnx(model, root / "m.onnx")
    db = root / "db.jsonl"
    res = run_cli("tune", str(root / "m.onnx"), "--db", str(db), "--rate", "0", "--dense-trials", "4",
                  "--batch", "2", timeout=600)
    assert res.returncode == 0, res.stderr
    return model, root, db, res.stdout


def test_tune_records_both_dense_kernels_and_reruns_measure_nothing(tuned):
    model, root, db, stdout = tuned
    assert "dense (ours)" in stdout or "dense (meta_schedule)" in stdout
    records = [json.loads(line) for line in db.read_text().splitlines()]
    kernels = {r["dense"] for r in records if "dense" in r}
    assert kernels == {"ours", "meta_schedule"}
    assert all(r["seconds"] > 0 for r in records)
    assert (root / "db.jsonl.ms" / "database_tuning_record.json").stat().st_size > 0
    again = run_cli("tune", str(root / "m.onnx"), "--db", str(db), "--rate", "0", "--dense-trials", "4",
                    "--batch", "2")
    assert again.returncode == 0, again.stderr
    assert "0 new measurements" in again.stdout
    assert db.read_text().count("\n") == len(records)


def test_compile_uses_meta_schedule_kernel_where_it_won(tuned, rng, tmp_path):
    """Whichever kernel measured faster is compiled in; to see both paths, the test then makes
    meta_schedule the winner by a record of its own (the database keeps the latest time)."""
    model, root, db, _ = tuned
    profile = resolve_target("x86")
    base = TuningDatabase(db)
    won = base.meta_schedule_wins(profile, 24, 64, 2)
    built = compile_onnx(model, "x86", tuning_db=db, batch=2)
    assert [d.kernel for d in built.layers] == ["dense (meta_schedule)" if won else "dense"]

    (tmp_path / "db.jsonl").write_text(db.read_text())
    (tmp_path / "db.jsonl.ms").symlink_to(root / "db.jsonl.ms")
    forced = TuningDatabase(tmp_path / "db.jsonl")
    forced.add_dense(profile, 24, 64, 2, "meta_schedule", 1e-9)
    built = compile_onnx(model, "x86", tuning_db=tmp_path / "db.jsonl", batch=2)
    assert [d.kernel for d in built.layers] == ["dense (meta_schedule)"]
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-5
    # a symbolic batch is not what meta_schedule tuned: our kernel
    assert [d.kernel for d in compile_onnx(model, "x86", tuning_db=tmp_path / "db.jsonl").layers] == ["dense"]


def test_dense_trials_need_the_host(tmp_path):
    save_onnx(models.mlp([8, 4], seed=1), tmp_path / "m.onnx")
    res = run_cli("tune", str(tmp_path / "m.onnx"), "--db", str(tmp_path / "db"), "--target", "aarch64",
                  "--rpc", "127.0.0.1:1", "--dense-trials", "2")
    assert res.returncode != 0 and "meta_schedule" in res.stderr
    assert not (tmp_path / "db").exists()


def test_unreadable_meta_schedule_database_falls_back_to_our_kernel(tmp_path, caplog, rng):
    import logging

    profile = resolve_target("x86")
    model = models.mlp([64, 24], seed=3)
    db = TuningDatabase(tmp_path / "db.jsonl")
    db.add_dense(profile, 24, 64, 2, "meta_schedule", 1e-9)  # says meta_schedule won
    ms_dir = tmp_path / "db.jsonl.ms"
    ms_dir.mkdir()
    (ms_dir / "database_tuning_record.json").write_text("{not json\n")
    (ms_dir / "database_workload.json").write_text("[[[\n")
    with caplog.at_level(logging.WARNING):
        built = compile_onnx(model, "x86", tuning_db=tmp_path / "db.jsonl", batch=2)
    assert [d.kernel for d in built.layers] == ["dense"]
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-5
    # tuning into it is a one-line error, and our own database keeps what it measured
    save_onnx(model, tmp_path / "m.onnx")
    res = run_cli("tune", str(tmp_path / "m.onnx"), "--db", str(tmp_path / "db.jsonl"), "--rate", "0",
                  "--dense-trials", "2", "--batch", "1")
    assert res.returncode == 2 and "unreadable" in res.stderr and "Traceback" not in res.stderr
    assert TuningDatabase(tmp_path / "db.jsonl").dense_times(profile, 24, 64, 1).keys() == {"ours"}


def test_candidate_build_skips_the_slow_tensor_intrin_import(host):
    """meta_schedule's default build imports tvm.s_tir.tensor_intrin in every fresh worker (30 s
    to 2 minutes on a busy 2-core host: each build timed out and tuning found "no valid
    schedule"); ours builds the same candidate without it, into a module that runs correctly."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, tvm\n"
        "from tvm_scalpel.dense_tuning import build_candidate, workload\n"
        "from tvm_scalpel.targets import resolve_target\n"
        "lib = build_candidate(workload(2, 24, 64), resolve_target('x86').target)\n"
        "assert 'tvm.s_tir.tensor_intrin' not in sys.modules\n"
        "rng = np.random.default_rng(5)\n"
        "x, w, b = (rng.standard_normal(s).astype('float32') for s in ((2, 64), (24, 64), (24,)))\n"
        "y = tvm.runtime.tensor(np.zeros((2, 24), 'float32'))\n"
        "lib['main'](*(tvm.runtime.tensor(a) for a in (x, w, b)), y)\n"
        "ref = x.astype('float64') @ w.T.astype('float64') + b\n"
        "assert np.abs(y.numpy() - ref).max() < 1e-4 * np.abs(ref).max(), 'wrong result'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_no_valid_schedule_falls_back_to_our_kernel(tmp_path, caplog, monkeypatch):
    """If meta_schedule measures nothing valid, the layer keeps our kernel with a warning."""
    import logging

    from tvm.s_tir import meta_schedule as ms

    from tvm_scalpel.dense_tuning import tune_dense

    monkeypatch.setattr(ms, "tune_tir", lambda *args, **kwargs: None)  # every candidate failed
    with caplog.at_level(logging.WARNING):
        times = tune_dense(resolve_target("x86"), 2, 24, 64, 4, tmp_path / "db.jsonl.ms")
    assert times.keys() == {"ours"} and 0 < times["ours"] < 1e-2
    assert any("no valid schedule" in r.getMessage() and "our dense kernel" in r.getMessage()
               for r in caplog.records)
