"""One held-out model, pruned by the policy for x86, aarch64 and CUDA: each gets the paper's
choices layer by layer, and each compiled result equals onnxruntime on its own pruned ONNX
(x86 natively, aarch64 under qemu through TVM RPC, CUDA compiled to PTX: no GPU in CI)."""

import shutil

import numpy as np
import onnx
import pytest
from helpers import assert_whole_groups, kept_in_blocks, ort_run, rel_err, run_cli, vm_run
from onnx import numpy_helper

from tvm_scalpel import compile_onnx, export_library, models, remote, resolve_target
from tvm_scalpel.emulation import arm_ready, qemu_rpc_server

RATE, NODES = 0.85, 0.4


@pytest.fixture(scope="module")
def held_out():
    """LeNet-5 with weights no other test uses."""
    return models.lenet5(seed=4242)


def prune_for(target: str, model: onnx.ModelProto, tmp_path) -> tuple[onnx.ModelProto, str]:
    src, out = tmp_path / "in.onnx", tmp_path / f"{target.replace(':', '_')}.onnx"
    onnx.save(model, str(src))
    res = run_cli("prune", str(src), "-o", str(out), "--policy", "rules", "--target", target,
                  "--rate", str(RATE), "--nodes", str(NODES))
    assert res.returncode == 0, res.stderr
    return onnx.load(str(out)), res.stdout


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def assert_cpu_choices(pruned: onnx.ModelProto, dense: onnx.ModelProto, g: int) -> None:
    """Moderate parallelism: CONV layers lose feature maps (no zeros), FC layers lose groups."""
    w, d = weights(pruned), weights(dense)
    # the rules keep whole vectors of the target (g, its SIMD width)
    assert w["conv1.weight"].shape[0] == kept_in_blocks(20, NODES, g)
    assert w["conv2.weight"].shape[0] == kept_in_blocks(50, NODES, g)
    assert np.all(w["conv1.weight"] != 0) and np.all(w["conv2.weight"] != 0)
    for name in ("fc1.weight", "fc2.weight"):
        assert abs(np.mean(w[name] == 0) - RATE) < 0.03, name
        assert_whole_groups(w[name], g)
    assert w["fc2.weight"].shape == d["fc2.weight"].shape  # the class scores keep their size


def test_x86_follows_the_cpu_rules_and_matches_onnxruntime(held_out, tmp_path, rng):
    pruned, stdout = prune_for("x86", held_out, tmp_path)
    assert "moderate parallelism" in stdout
    g = resolve_target("x86").simd_width
    assert_cpu_choices(pruned, held_out, g)
    built = compile_onnx(pruned, "x86")
    assert [(d.kind, d.kernel) for d in built.layers] == [
        ("conv", "dense"), ("conv", "dense"), ("fc", "grouped-sparse"), ("fc", "grouped-sparse")]
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(pruned, x)) < 1e-5


@pytest.mark.skipif(arm_ready() is not None, reason=str(arm_ready()))
def test_aarch64_follows_the_cpu_rules_and_matches_onnxruntime_under_qemu(held_out, tmp_path, rng):
    pruned, stdout = prune_for("aarch64", held_out, tmp_path)
    assert "moderate parallelism" in stdout
    assert_cpu_choices(pruned, held_out, 4)
    built = compile_onnx(pruned, "aarch64")
    assert [d.group_width for d in built.layers if d.kind == "fc"] == [4, 4]
    export_library(built.executable, tmp_path / "m.so", resolve_target("aarch64"))
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    with qemu_rpc_server() as server:
        y = remote.run_remote(server, tmp_path / "m.so", x)
    assert rel_err(y, ort_run(pruned, x)) < 1e-5


def test_cuda_prunes_nodes_only_and_compiles(held_out, tmp_path, rng):
    pruned, stdout = prune_for("cuda", held_out, tmp_path)
    assert "high parallelism" in stdout
    w = weights(pruned)
    # kept counts in whole warps (32) unless that keeps everything: 12 of 20, 32 of 50
    assert w["conv1.weight"].shape[0] == 12 and w["conv2.weight"].shape[0] == 32
    assert w["fc1.weight"].shape == (kept_in_blocks(500, NODES, 32), 32 * 16)
    assert all(np.all(v != 0) for v in w.values() if v.ndim > 1)  # no zeroed weights at all
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    # the node-pruned model is numerically itself: check it on the CPU against onnxruntime
    assert rel_err(vm_run(compile_onnx(pruned, "x86").executable, x), ort_run(pruned, x)) < 1e-5
    built = compile_onnx(pruned, "cuda:sm_90")
    assert all(d.kernel.startswith("dense (TVM") for d in built.layers)
    if shutil.which("nvcc") is not None:
        from tvm_scalpel.schedules.toolchains import to_ptx

        assert ".entry" in to_ptx(built.executable, "sm_90")
