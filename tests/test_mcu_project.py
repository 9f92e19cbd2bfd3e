"""The Cortex-M4 project generator (``tvm-scalpel compile --target cortex-m4 -o OUT_DIR``).

Numerics are checked before any emulator: the generated C (the very files of the project) is
compiled for this machine with the system gcc and a tiny main that reads and writes raw floats,
and compared with onnxruntime on the same (pruned) ONNX model, on fresh random inputs. The
project is also built for the M4F with arm-none-eabi-gcc and its Makefile (skipped without the
toolchain), and the objects' sizes are checked against the size table: every constant byte in
flash and every arena byte in RAM is accounted for.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from helpers import make_model, ort_run, rel_err, run_cli
from tvm_scalpel import flows, models
from tvm_scalpel.errors import ScalpelError
from tvm_scalpel.mcu.plan import plan_memory
from tvm_scalpel.mcu.project import generate

HOST_MAIN = r"""
#include <stdio.h>
#include "model.h"
int main(int argc, char **argv) {
  static float x[SCALPEL_INPUT_SIZE], y[SCALPEL_OUTPUT_SIZE];
  FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
  if (!in || !out) return 3;
  while (fread(x, sizeof(float), SCALPEL_INPUT_SIZE, in) == SCALPEL_INPUT_SIZE) {
    if (scalpel_model_run(x, y) != 0) return 4;
    fwrite(y, sizeof(float), SCALPEL_OUTPUT_SIZE, out);
  }
  return fclose(out) != 0;
}
"""
M4_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"]
needs_arm_gcc = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None,
                                   reason="arm-none-eabi-gcc not installed (make setup-mcu)")
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="no host C compiler")


def host_run(project_dir: Path, x: np.ndarray, build: Path) -> np.ndarray:
    """The project's sources + a host main, compiled by the system gcc, run on the rows of x."""
    meta = json.loads((project_dir / "model.json").read_text())
    build.mkdir(exist_ok=True)
    (build / "main.c").write_text(HOST_MAIN)
    sources = [str(project_dir / s) for s in meta["sources"]]
    res = subprocess.run(["gcc", *meta["cflags"], "-Wall", "-Werror", "-I", str(project_dir),
                          str(build / "main.c"), *sources, "-lm", "-o", str(build / "host")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    np.ascontiguousarray(x, np.float32).tofile(build / "x.bin")
    subprocess.run([str(build / "host"), str(build / "x.bin"), str(build / "y.bin")], check=True)
    return np.fromfile(build / "y.bin", np.float32).reshape(len(x), *meta["output"]["shape"][1:])


def _pruned(name: str, **kwargs) -> onnx.ModelProto:
    return flows.prune(models.build(name), 0.9, target="cortex-m4", policy="rules", **kwargs).model


def _padded_cnn(seed: int = 3) -> onnx.ModelProto:
    """What LeNet-5 does not have: conv padding and stride, average pooling, a ReLU on the
    input (its own layer) and one after a reshape (fused), MatMul + Add, biases."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((6, 2, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((6 * 4 * 5, 12)).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "b2"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "shape")]
    nodes = [helper.make_node("Relu", ["x"], ["x_relu"]),
             helper.make_node("Conv", ["x_relu", "w1", "b1"], ["c"], kernel_shape=[3, 3], pads=[1, 2, 1, 0],
                              strides=[2, 1]),
             helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[2, 2], strides=[1, 2]),
             helper.make_node("Reshape", ["p", "shape"], ["f"]),
             helper.make_node("Relu", ["f"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Add", ["m", "b2"], ["y"])]
    # x [1, 2, 9, 10] -> pad [2, 11, 12] -> conv (stride 2, 1) [6, 5, 10] -> avgpool [6, 4, 5]
    return make_model(nodes, inits, [("x", ["N", 2, 9, 10])], [("y", ["N", 12])])


def _held_out_mlp() -> onnx.ModelProto:
    """An MLP that is none of the built-in networks: MatMul + Add layers, K = 100 and 30, pruned
    at g = 16 so that every row ends in a partial group."""
    model = models.mlp([100, 30, 7], seed=11, layout="matmul")
    return flows.prune(model, 0.8, target="cortex-m4", group_width=16).model


CASES = {
    "lenet-300-100 dense": lambda: models.build("lenet-300-100"),
    "lenet-300-100 pruned": lambda: _pruned("lenet-300-100"),
    "lenet5 dense": lambda: models.build("lenet5"),
    "lenet5 pruned": lambda: _pruned("lenet5"),
    "lenet5 pruned g=2": lambda: _pruned("lenet5", group_width=2),
    "held-out mlp": _held_out_mlp,
    "padded cnn": _padded_cnn,
    # output rows of 10: two 4-pixel tiles and two leftover columns, through the sparse kernel
    "padded cnn pruned": lambda: flows.prune(_padded_cnn(), 0.8, target="cortex-m4", policy="rules").model,
}


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    """Each case's model and its project folder, generated once."""
    root = tmp_path_factory.mktemp("mcu")
    out = {}
    for i, (name, build) in enumerate(CASES.items()):
        model = build()
        project = flows.compile_mcu(model, root / f"p{i}")
        out[name] = (model, project, root / f"p{i}")
    return out


@needs_gcc
@pytest.mark.parametrize("case", list(CASES))
def test_host_build_matches_onnxruntime(projects, case, rng, tmp_path):
    model, project, folder = projects[case]
    x = rng.standard_normal((5, *project.chain.input_shape[1:])).astype(np.float32)
    assert rel_err(host_run(folder, x, tmp_path), ort_run(model, x)) < 1e-4


def test_pruned_layers_go_grouped_sparse(projects):
    kinds = {case: [layer.kind for layer in p.layers] for case, (_, p, _) in projects.items()}
    assert kinds["lenet-300-100 dense"] == ["dense"] * 3
    assert kinds["lenet-300-100 pruned"] == ["grouped-sparse"] * 3
    assert kinds["lenet5 dense"] == ["conv", "maxpool", "conv", "maxpool", "dense", "dense"]
    assert kinds["lenet5 pruned"] == ["grouped-sparse conv", "maxpool", "grouped-sparse conv",
                                      "maxpool", "grouped-sparse", "grouped-sparse"]
    assert [layer.group_width for layer in projects["lenet5 pruned g=2"][1].layers if layer.group_width] == [2] * 4
    assert kinds["padded cnn"] == ["relu", "pad", "conv", "avgpool", "dense"]
    # the grouped-sparse inner loop is unrolled over g: g multiply-adds per column index read
    source = (projects["held-out mlp"][2] / "kernels.c").read_text()
    assert "float4" not in source and source.count("cols_ptr[") >= 16


def test_flash_accounts_for_every_weight(projects):
    """Flash per layer = its values + indices + row pointers (+ patch offsets) + bias, exactly."""
    _, dense, _ = projects["lenet-300-100 dense"]
    assert dense.flash_bytes == sum(4 * (n * k + n) for k, n in ((784, 300), (300, 100), (100, 10)))
    model, pruned, folder = projects["lenet-300-100 pruned"]
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for layer, name in zip(pruned.layers, ("fc1", "fc2", "fc3")):
        w = weights[f"{name}.weight"]
        g = layer.group_width  # the rules' g on the M4: 2 (smlad pairs)
        assert g == 2
        n, k = w.shape
        padded = np.zeros((n, -(-k // g) * g), np.float32)
        padded[:, :k] = w
        groups = int(np.any(padded.reshape(n, -1, g) != 0, axis=2).sum())
        # g values and one index per kept group, row pointers, bias
        assert layer.flash_bytes == groups * (g * 4 + 4) + (n + 1) * 4 + n * 4
    meta = json.loads((folder / "model.json").read_text())
    assert meta["flash_bytes"] == sum(layer["flash_bytes"] for layer in meta["layers"]) == pruned.flash_bytes
    assert pruned.flash_bytes < 0.25 * dense.flash_bytes


def test_model_json_and_files(projects):
    _, project, folder = projects["lenet5 pruned"]
    meta = json.loads((folder / "model.json").read_text())
    assert meta["format"] == "tvm-scalpel-mcu/1" and meta["target"] == "cortex-m4"
    assert meta["input"] == {"name": "input", "shape": [1, 1, 28, 28], "dtype": "float32"}
    assert meta["output"] == {"name": "fc2", "shape": [1, 10], "dtype": "float32"}
    assert meta["numerics"] == "fp32" and meta["objects"] == []
    assert all((folder / s).is_file() for s in meta["sources"])
    assert meta["ram_bytes"] == project.ram_bytes == max(layer["ram_bytes"] for layer in meta["layers"])
    header = (folder / "model.h").read_text()
    assert "int scalpel_model_run(const float *in, float *out);" in header
    assert "#define SCALPEL_INPUT_SIZE 784" in header and "#define SCALPEL_OUTPUT_SIZE 10" in header
    assert "malloc" not in "".join((folder / s).read_text() for s in meta["sources"])


@needs_arm_gcc
@pytest.mark.parametrize("case", ["lenet-300-100 pruned", "lenet5 pruned g=2", "padded cnn"])
def test_makefile_builds_for_the_m4_and_sizes_match(projects, case, tmp_path):
    """``make`` in a copy of the folder: no warning, and the archive's sizes are the table's:
    weights.o holds exactly the flash bytes, model.o's .bss exactly the arena."""
    _, project, folder = projects[case]
    work = tmp_path / "p"
    shutil.copytree(folder, work)
    res = subprocess.run(["make", "-C", str(work)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning" not in res.stderr, res.stderr[-3000:]
    assert (work / "libscalpel_model.a").is_file()
    sizes = {}
    for obj in ("weights.o", "model.o", "kernels.o"):
        out = subprocess.run(["arm-none-eabi-size", str(work / obj)], capture_output=True, text=True, check=True)
        text, data, bss = map(int, out.stdout.splitlines()[1].split()[:3])
        sizes[obj] = (text, data, bss)
    assert sizes["weights.o"] == (project.flash_bytes, 0, 0)
    assert sizes["model.o"][1:] == (0, project.ram_bytes)
    # thumb code, hard-float calling convention (an object built for another core fails here)
    attrs = subprocess.run(["arm-none-eabi-readelf", "-A", str(work / "kernels.o")],
                           capture_output=True, text=True, check=True).stdout
    assert "Cortex-M4" in attrs or "7E-M" in attrs


def test_memory_plan_never_overlaps_a_layers_input_and_output():
    sizes = [(784, 300), (300, 1000), (1000, 30), (30, 500), (500, 10)]
    plan = plan_memory(sizes)
    assert plan.arena == max(300 + 1000, 1000 + 32, 32 + 500)  # aligned to 4 elements
    for (n_in, n_out), slot, nxt in zip(sizes, plan.slots, plan.slots[1:] + [None]):
        if slot.input_offset is not None and slot.output_offset is not None:
            a, b = sorted([(slot.input_offset, n_in), (slot.output_offset, n_out)])
            assert a[0] + a[1] <= b[0]
        if nxt is not None:
            assert nxt.input_offset == slot.output_offset
    assert plan.slots[0].input_offset is None and plan.slots[-1].output_offset is None


def test_too_big_for_the_flash_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "proj"
    res = run_cli("compile", "lenet-300-100", "--target", "cortex-m4", "-o", out, "--flash-bytes", "1000000")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "1066440 bytes of flash" in res.stderr and "nothing written" in res.stderr
    assert list(tmp_path.iterdir()) == []
    res = run_cli("compile", "lenet-300-100", "--target", "cortex-m4", "-o", out, "--ram-bytes", "1000")
    assert res.returncode == 2 and "1600 bytes of RAM" in res.stderr and list(tmp_path.iterdir()) == []


def test_cli_prints_the_size_table_and_writes_the_project(tmp_path):
    out = tmp_path / "proj"
    res = run_cli("compile", "lenet-300-100", "--target", "cortex-m4", "-o", out, "--flash-bytes", "1066440")
    assert res.returncode == 0, res.stderr
    assert "flash bytes" in res.stdout and "RAM bytes" in res.stdout
    assert "total" in res.stdout and "1066440" in res.stdout
    assert json.loads((out / "model.json").read_text())["flash_bytes"] == 1066440
    # compiling again replaces the earlier project; a folder that is not one is refused
    assert run_cli("compile", "lenet-300-100", "--target", "cortex-m4", "-o", out).returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    res = run_cli("compile", "lenet-300-100", "--target", "cortex-m4", "-o", other)
    assert res.returncode == 2 and "not a tvm-scalpel project" in res.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "proj"]


def test_unsupported_layer_is_one_line_exit_2(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Softmax", ["h"], ["y"])]
    path = tmp_path / "softmax.onnx"
    onnx.save(make_model(nodes, [w], [("x", [1, 3])], [("y", [1, 4])]), str(path))
    res = run_cli("compile", path, "--target", "cortex-m4", "-o", tmp_path / "proj")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "does not take Softmax" in res.stderr
    assert not (tmp_path / "proj").exists()
    res = run_cli("compile", path, "-o", tmp_path / "m.so", "--flash-bytes", "10")
    assert res.returncode == 2 and "only with --target cortex-m4" in res.stderr


def test_branching_model_is_refused():
    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Add", ["r", "h"], ["y"])]
    with pytest.raises(ScalpelError, match="chains of layers"):
        generate(make_model(nodes, [w], [("x", [1, 3])], [("y", [1, 3])]))
