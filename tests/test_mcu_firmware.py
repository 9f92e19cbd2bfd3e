"""The Cortex-M4 firmware runner (tvm_scalpel/mcu/firmware.py, ``tvm-scalpel run OUT_DIR``) on
hand-written projects that follow the generator's contract (tests/mcu_projects.py): outputs
against numpy float64, the instruction counter against code of a known length, and every way
a project or an input can be bad.

Needs ``make setup-mcu`` (arm-none-eabi-gcc, newlib, qemu-system-arm); skipped without.
"""

import json
import os
import shutil

import numpy as np
import pytest
from helpers import rel_err, run_cli
from mcu_projects import c_project, dense_project, dense_reference, nops_project, random_dense

from tvm_scalpel import ScalpelError
from tvm_scalpel.mcu.firmware import build_firmware, firmware_for, mcu_ready, run_project

REASON = mcu_ready()
if REASON is not None:
    pytest.skip(REASON, allow_module_level=True)

SIZES = [96, 40, 24, 10]  # a small MLP: three dense layers, ReLU between


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    rng = np.random.default_rng(1212)
    weights, biases = random_dense(rng, SIZES)
    folder = dense_project(tmp_path_factory.mktemp("mcu") / "mlp", weights, biases)
    return folder, weights, biases


def test_outputs_equal_numpy_float64(mlp, rng, tmp_path):
    folder, weights, biases = mlp
    x = rng.standard_normal((6, SIZES[0])).astype(np.float32)
    before = sorted(p.name for p in folder.iterdir())
    result = run_project(folder, x)
    assert result.outputs.shape == (6, SIZES[-1]) and result.outputs.dtype == np.float32
    assert rel_err(result.outputs, dense_reference(x, weights, biases)) < 1e-4
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written into the project
    # each row is its own call: one row alone gives the same result as in the batch
    alone = run_project(folder, x[3:4]).outputs
    np.testing.assert_array_equal(alone[0], result.outputs[3])


@pytest.mark.parametrize("count", [0, 1, 250])
def test_counter_is_exact_on_code_of_known_length(tmp_path, count):
    result = run_project(nops_project(tmp_path / "nops", count), np.zeros((3, 4), np.float32))
    assert result.instructions.tolist() == [count] * 3


def test_count_is_deterministic_and_grows_with_the_layer(mlp, rng, tmp_path):
    folder = mlp[0]
    x = rng.standard_normal((4, SIZES[0])).astype(np.float32)
    with firmware_for(folder) as firmware:
        first, second = firmware.run(x), firmware.run(x)
    assert first.instructions.tolist() == second.instructions.tolist()
    assert first.per_call > 0
    # the same weights again in a fresh build: the same count
    assert run_project(folder, x).instructions.tolist() == first.instructions.tolist()
    # a dense layer twice as wide on the input side costs about twice the multiply-adds
    counts = {}
    for n_in in (64, 128):
        weights, biases = random_dense(rng, [n_in, 32])
        project = dense_project(tmp_path / f"dense{n_in}", weights, biases)
        counts[n_in] = run_project(project, rng.standard_normal((2, n_in))).per_call
    assert 1.8 < counts[128] / counts[64] < 2.1, counts
    assert counts[64] > 64 * 32  # at least one instruction per multiply-add


def test_sizes_count_the_weights(mlp, tmp_path):
    folder, weights, biases = mlp
    with firmware_for(folder) as firmware:
        weight_bytes = 4 * sum(w.size + b.size for w, b in zip(weights, biases))
        assert firmware.object_sizes["model_1_weights.o"][0] == weight_bytes  # const: .text/.rodata
        assert weight_bytes < firmware.flash_bytes < weight_bytes + 4096
        assert firmware.ram_bytes == 2 * 4 * max(SIZES[1:-1])  # the two activation buffers


def test_cli_runs_a_project(mlp, rng, tmp_path):
    folder, weights, biases = mlp
    x = rng.standard_normal((3, SIZES[0])).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = run_cli("run", folder, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert res.returncode == 0, res.stderr
    y = np.load(tmp_path / "y.npy")
    assert rel_err(y, dense_reference(x, weights, biases)) < 1e-4
    lines = res.stdout.splitlines()
    assert lines[0] == f"wrote {tmp_path / 'y.npy'}: shape (3, {SIZES[-1]}) float32"
    counted = [line for line in lines if line.startswith("instructions: ")]
    assert counted == [f"instructions: {run_project(folder, x).per_call}"]


def _cli_error(*args, timeout=300):
    res = run_cli(*args, timeout=timeout)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvm-scalpel: error: "), res.stderr
    return lines[0]


def test_cli_bad_inputs(mlp, tmp_path):
    folder = mlp[0]
    np.save(tmp_path / "short.npy", np.zeros((2, SIZES[0] - 1), np.float32))
    np.save(tmp_path / "flat.npy", np.zeros(SIZES[0], np.float32))
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    out = tmp_path / "y.npy"
    line = _cli_error("run", folder, "--input", tmp_path / "short.npy", "-o", out)
    assert f"the model takes (N, {SIZES[0]})" in line and "(2, 95)" in line
    assert "(N, 96)" in _cli_error("run", folder, "--input", tmp_path / "flat.npy", "-o", out)
    assert "dtype" in _cli_error("run", folder, "--input", tmp_path / "text.npy", "-o", out)
    assert "no model.json" in _cli_error("run", tmp_path, "--input", tmp_path / "flat.npy", "-o", out)
    assert not out.exists()


def test_cli_missing_toolchain(mlp, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, SIZES[0]), np.float32))
    env_path = os.environ["PATH"]
    try:
        os.environ["PATH"] = str(tmp_path)  # run_cli starts the venv's Python by its full path
        line = _cli_error("run", mlp[0], "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    finally:
        os.environ["PATH"] = env_path
    assert "not found" in line and "make setup-mcu" in line


def _broken_copy(mlp, tmp_path, edit) -> str:
    folder = tmp_path / "broken"
    shutil.copytree(mlp[0], folder)
    doc = json.loads((folder / "model.json").read_text())
    edit(folder, doc)
    (folder / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ScalpelError) as err:
        run_project(folder, np.zeros((1, SIZES[0]), np.float32))
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("edit, message", [
    (lambda f, d: d.pop("sources"), "missing field 'sources'"),
    (lambda f, d: d.update(format="other/2"), "format 'other/2'"),
    (lambda f, d: d.update(target="cortex-m7"), "emulates cortex-m4 only"),
    (lambda f, d: d["input"].update(shape=[1, -3]), "positive integers"),
    (lambda f, d: d.update(sources=["../elsewhere.c"]), "outside the project folder"),
    (lambda f, d: d.update(sources=["missing.c"]), "missing.c does not exist"),
    (lambda f, d: d["input"].update(shape=[1, SIZES[0] + 1]), "model.h and model.json disagree"),
    (lambda f, d: (f / "model.c").write_text("int scalpel_model_run(oops"), "model.c does not compile"),
    (lambda f, d: (f / "model.c").write_text("int other(void) { return 0; }\n"), "does not link"),
    (lambda f, d: (f / "model.h").unlink(), "no model.h"),
])
def test_bad_project_folders(mlp, tmp_path, edit, message):
    assert message in _broken_copy(mlp, tmp_path, edit)


def test_not_json(tmp_path):
    folder = c_project(tmp_path / "p", "return 0;")
    (folder / "model.json").write_text("{not json")
    with pytest.raises(ScalpelError, match="not valid JSON"):
        build_firmware(folder, tmp_path / "build")


def test_hang_is_a_timeout(tmp_path):
    folder = c_project(tmp_path / "hang", "for (;;) {}\nreturn 0;")
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    line = _cli_error("run", folder, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy",
                      "--timeout", "2")
    assert "did not finish within 2 s" in line and "hang" in line
    assert not (tmp_path / "y.npy").exists()


def test_fault_and_failing_return_code(tmp_path):
    x = np.zeros((3, 4), np.float32)
    fault = c_project(tmp_path / "fault", "*(volatile float *)0xF0000000u = in[0];\nreturn 0;")
    with pytest.raises(ScalpelError, match="faulted .* on input row 0"):
        run_project(fault, x, timeout=30)
    # fails on its second call only
    failing = c_project(tmp_path / "fails", "static int calls;\nout[0] = in[0];\n"
                        "return ++calls == 2 ? -7 : 0;")
    with pytest.raises(ScalpelError, match="returned -7 on input row 1"):
        run_project(failing, x, timeout=30)
