"""aarch64 (NEON) models run under qemu-aarch64 through TVM RPC, checked against onnxruntime.

Needs ``make setup-arm`` (qemu-user, the aarch64 cross toolchain, ``.arm/``); skipped without.
Emulated time says nothing about speed: these tests check results only.
"""

import threading
import time

import numpy as np
import onnx
import pytest
from helpers import assert_whole_groups, onnx_dense_layers, ort_run, run_cli

from tvm_scalpel import ScalpelError, compile_onnx, export_library, models, prune_onnx, remote, resolve_target
from tvm_scalpel.emulation import QemuRPCServer, arm_ready, qemu_rpc_server

REASON = arm_ready()
if REASON is not None:
    pytest.skip(REASON, allow_module_level=True)

NEON_LANES = 4
EM_AARCH64 = 183  # ELF e_machine


@pytest.fixture(scope="module")
def server():
    """One emulated aarch64 RPC server for the module's tests."""
    with qemu_rpc_server() as address:
        yield address


def build_for_arm(model: onnx.ModelProto, rate: float, path) -> tuple[onnx.ModelProto, list]:
    """Prune for aarch64, compile, cross-link to ``path``; the pruned ONNX and layer decisions."""
    pruned = prune_onnx(model, rate, "aarch64").model
    built = compile_onnx(pruned, "aarch64")
    export_library(built.executable, path, resolve_target("aarch64"))
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64
    return pruned, built.layers


def assert_matches_onnxruntime(y: np.ndarray, pruned: onnx.ModelProto, x: np.ndarray) -> None:
    ref = ort_run(pruned, x)
    assert np.abs(ref).max() > 0
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_mlp_runs_under_qemu(server, tmp_path, rng):
    """LeNet-300-100 (random weights, not used elsewhere), pruned with NEON's g = 4."""
    pruned, layers = build_for_arm(models.lenet_300_100(seed=2017), 0.9, tmp_path / "mlp.so")
    assert [(d.kernel, d.group_width) for d in layers] == [("grouped-sparse", NEON_LANES)] * 3
    for layer in onnx_dense_layers(pruned):
        assert_whole_groups(layer["w"], NEON_LANES)
    x = rng.standard_normal((4, 784)).astype(np.float32)
    assert np.all(x != 0)
    assert_matches_onnxruntime(remote.run_remote(server, tmp_path / "mlp.so", x), pruned, x)


def test_lenet5_runs_under_qemu(server, tmp_path, rng):
    pruned, layers = build_for_arm(models.lenet5(seed=2017), 0.9, tmp_path / "lenet5.so")
    assert any(d.kernel == "grouped-sparse" and d.group_width == NEON_LANES for d in layers)
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    assert_matches_onnxruntime(remote.run_remote(server, tmp_path / "lenet5.so", x), pruned, x)


def test_cli_prune_compile_run_over_rpc(server, tmp_path, rng):
    onnx.save(models.mlp([120, 64, 10], seed=31), str(tmp_path / "m.onnx"))
    x = rng.standard_normal((3, 120)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    steps = [("prune", tmp_path / "m.onnx", "-o", tmp_path / "p.onnx", "--rate", "0.8", "--target", "aarch64"),
             ("compile", tmp_path / "p.onnx", "--target", "aarch64", "-o", tmp_path / "m.so"),
             ("run", "--rpc", server, tmp_path / "m.so", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")]
    results = [run_cli(*args) for args in steps]
    for res in results:
        assert res.returncode == 0, res.stderr
    assert "2 of 2 dense layers went grouped-sparse" in results[1].stdout
    pruned = onnx.load(str(tmp_path / "p.onnx"))
    for layer in onnx_dense_layers(pruned):
        assert_whole_groups(layer["w"], NEON_LANES)
    assert_matches_onnxruntime(np.load(tmp_path / "y.npy"), pruned, x)


def test_server_dying_mid_session_is_an_error_not_a_hang(tmp_path, rng, monkeypatch):
    model = models.mlp([40, 24, 6], seed=8)
    build_for_arm(model, 0.75, tmp_path / "m.so")
    x = rng.standard_normal((1, 40)).astype(np.float32)
    real_upload = remote.upload_library
    outcome = {}

    with QemuRPCServer() as srv:
        def upload_then_kill(session, path):
            lib = real_upload(session, path)
            srv.stop()  # the server dies after the upload, before the model runs
            return lib

        def call():
            try:
                remote.run_remote(srv.address, tmp_path / "m.so", x, timeout=10)
            except ScalpelError as err:
                outcome["error"] = str(err)

        monkeypatch.setattr(remote, "upload_library", upload_then_kill)
        start = time.monotonic()
        worker = threading.Thread(target=call, daemon=True)  # a hang fails the test, not the run
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "run_remote hung after the server died"
        assert time.monotonic() - start < 30
        assert not srv.alive()
        assert "running on the RPC server" in outcome.get("error", ""), outcome
        monkeypatch.setattr(remote, "upload_library", real_upload)
        with pytest.raises(ScalpelError, match="cannot reach the RPC server"):
            remote.run_remote(srv.address, tmp_path / "m.so", x, timeout=10)


def qemu_children() -> int:
    import psutil

    return sum(p.name() == "qemu-aarch64" for p in psutil.Process().children(recursive=True))


def test_a_server_that_does_not_start_in_time_is_a_clear_error():
    before, start = qemu_children(), time.monotonic()
    with pytest.raises(ScalpelError, match="not ready after 0.2 s"):
        with qemu_rpc_server(timeout_s=0.2):
            pass
    assert time.monotonic() - start < 15
    assert qemu_children() == before  # the half-started server was killed


def test_winograd_convs_run_under_qemu(server, tmp_path, rng):
    """ResNet-18's stem and first blocks, narrow: their 3x3 stride-1 layers (16 channels at 16x16)
    go Winograd on NEON too, and the result equals onnxruntime's."""
    model = models.resnet18(seed=3, scale=1 / 4, image=64, classes=10)
    built = compile_onnx(model, "aarch64")
    export_library(built.executable, tmp_path / "resnet.so", resolve_target("aarch64"))
    from tvm_scalpel.onnx_io import to_relax
    from tvm_scalpel.passes import RewriteConvLayers

    mod = RewriteConvLayers("aarch64")(to_relax(model))
    assert any("wino_gemm" in f.script() for gv, f in mod.functions.items()
               if gv.name_hint.startswith("scalpel_conv"))
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    assert_matches_onnxruntime(remote.run_remote(server, tmp_path / "resnet.so", x), model, x)
