"""Running and tuning through TVM RPC, against a server and a tracker on 127.0.0.1."""

import json
import socket
import time

import numpy as np
import onnx
import pytest
from helpers import ort_run, rel_err, run_cli

from tvm_scalpel import compile_onnx, export_library, models, prune_onnx


def free_port_range(start: int) -> int:
    for port in range(start, start + 500, 10):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


@pytest.fixture(scope="module")
def rpc_env(tmp_path_factory):
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=free_port_range(19100), port_end=19600, silent=True)
    # a server registered with the tracker only serves sessions the tracker hands out
    tracked = rpc.Server(host="127.0.0.1", port=free_port_range(19700), port_end=20200,
                         tracker_addr=("127.0.0.1", tracker.port), key="scalpel-test", silent=True)
    server = rpc.Server(host="127.0.0.1", port=free_port_range(tracked.port + 10), port_end=20290,
                        silent=True)
    deadline = time.time() + 30
    while time.time() < deadline:  # wait until the server has registered with the tracker
        summary = rpc.connect_tracker("127.0.0.1", tracker.port).summary()
        if summary.get("queue_info", {}).get("scalpel-test", {}).get("free"):
            break
        time.sleep(0.2)
    d = tmp_path_factory.mktemp("rpc")
    model = models.mlp([40, 24, 6], seed=21)
    pruned = prune_onnx(model, 0.75).model
    onnx.save(pruned, str(d / "m.onnx"))
    export_library(compile_onnx(pruned).executable, d / "m.so")
    yield {"server": f"127.0.0.1:{server.port}", "tracker": f"tracker://127.0.0.1:{tracker.port}/scalpel-test",
           "dir": d, "model": pruned}
    for proc in (server, tracked, tracker):
        proc.terminate()


@pytest.mark.parametrize("via", ["server", "tracker"])
def test_run_remote_matches_onnxruntime(rpc_env, rng, via):
    d = rpc_env["dir"]
    x = rng.standard_normal((3, 40)).astype(np.float32)
    np.save(d / f"x_{via}.npy", x)
    res = run_cli("run", str(d / "m.so"), "--input", str(d / f"x_{via}.npy"), "-o", str(d / f"y_{via}.npy"),
                  "--rpc", rpc_env[via])
    assert res.returncode == 0, res.stderr
    assert rel_err(np.load(d / f"y_{via}.npy"), ort_run(rpc_env["model"], x)) < 1e-4


def test_run_remote_times_the_model_on_the_server(rpc_env, rng):
    from tvm_scalpel.remote import run_remote

    x = rng.standard_normal((2, 40)).astype(np.float32)
    out, seconds = run_remote(rpc_env["server"], rpc_env["dir"] / "m.so", x, min_repeat_ms=5)
    assert rel_err(out, ort_run(rpc_env["model"], x)) < 1e-4
    assert 0 < seconds < 1e-2


def test_tune_over_rpc_fills_the_database(rpc_env):
    d = rpc_env["dir"]
    db = d / "db.jsonl"
    res = run_cli("tune", str(d / "m.onnx"), "--db", str(db), "--rate", "0.75", "--trials", "6",
                  "--rpc", rpc_env["server"], "--quiet")
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in db.read_text().splitlines()]
    assert all(0 < r["seconds"] < 1e-2 for r in records)
    # 6 grouped-sparse candidates a layer, and our dense kernel once a layer (2 layers)
    assert sum("candidate" in r for r in records) == 12
    assert [r["dense"] for r in records if "dense" in r] == ["ours", "ours"]


def test_a_server_that_is_down_is_a_clear_error(tmp_path, rng):
    port = free_port_range(20300)  # nothing listens there
    np.save(tmp_path / "x.npy", rng.standard_normal((1, 40)).astype(np.float32))
    start = time.time()
    res = run_cli("run", str(tmp_path / "missing.so"), "--input", str(tmp_path / "x.npy"), "-o",
                  str(tmp_path / "y.npy"), "--rpc", f"127.0.0.1:{port}")
    assert res.returncode == 2 and "no such file" in res.stderr
    onnx.save(models.mlp([40, 6], seed=1), str(tmp_path / "m.onnx"))
    res = run_cli("tune", str(tmp_path / "m.onnx"), "--db", str(tmp_path / "db.jsonl"),
                  "--rpc", f"127.0.0.1:{port}")
    assert res.returncode == 2, res.stderr
    assert "cannot reach the RPC server" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert time.time() - start < 60
    assert not (tmp_path / "db.jsonl").exists() and not (tmp_path / "y.npy").exists()
    bad = run_cli("tune", str(tmp_path / "m.onnx"), "--db", str(tmp_path / "db.jsonl"), "--rpc", "nonsense")
    assert bad.returncode == 2 and "invalid RPC address" in bad.stderr
