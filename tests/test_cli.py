"""The ``tvm-scalpel`` command line, run as a subprocess: the happy path and every bad input."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import (
    assert_whole_groups,
    make_model,
    onnx_dense_layers,
    ort_run,
    rel_err,
    run_cli,
    zero_fraction,
)
from onnx import helper

from tvm_scalpel import models

SIZES = [97, 203, 50, 13]
RATE = 0.85


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Inputs, and the outputs of one prune -> compile -> run chain, shared by the tests."""
    d = tmp_path_factory.mktemp("cli")
    model = models.mlp(SIZES, seed=55, layout="gemm")
    onnx.save(model, str(d / "model.onnx"))
    x = np.random.default_rng(55).standard_normal((5, SIZES[0])).astype(np.float32)
    np.save(d / "x.npy", x)
    np.save(d / "x64.npy", x.astype(np.float64))
    np.save(d / "x_bad_shape.npy", x[:, :-1].copy())
    (d / "text.onnx").write_text("this is not an ONNX model\n")
    (d / "random.onnx").write_bytes(np.random.default_rng(0).bytes(777))
    (d / "text.npy").write_text("not an array\n")
    custom = make_model([helper.make_node("Foo", ["x"], ["y"], domain="com.example.scalpel")], [],
                        [("x", [2, 3])], [("y", [2, 3])], extra_opsets=[("com.example.scalpel", 1)])
    onnx.save(custom, str(d / "custom_op.onnx"))

    prune = run_cli("prune", d / "model.onnx", "-o", d / "pruned.onnx", "--rate", RATE)
    compile_ = run_cli("compile", d / "pruned.onnx", "-o", d / "pruned.so")
    run = run_cli("run", d / "pruned.so", "--input", d / "x.npy", "-o", d / "Y.npy")
    return {"dir": d, "model": model, "x": x, "prune": prune, "compile": compile_, "run": run}


def test_prune(work, host):
    res, d = work["prune"], work["dir"]
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    for name, (n_in, n_out) in zip(["fc1.weight", "fc2.weight", "fc3.weight"], zip(SIZES, SIZES[1:])):
        row = next(line for line in lines if line.startswith(name))
        cells = row.split()
        assert cells[1] == f"{n_out}x{n_in}" and cells[2] == str(host.simd_width)
        assert abs(float(cells[3]) - RATE) <= 0.03
    assert any(line.startswith("total") for line in lines)

    pruned = onnx.load(str(d / "pruned.onnx"))
    before = ort.InferenceSession(work["model"].SerializeToString())
    after = ort.InferenceSession(str(d / "pruned.onnx"))
    signature = lambda s: [(i.name, i.shape, i.type) for i in s.get_inputs() + s.get_outputs()]
    assert signature(after) == signature(before)
    for layer in onnx_dense_layers(pruned):
        assert_whole_groups(layer["w"], host.simd_width)
        assert abs(zero_fraction(layer["w"]) - RATE) <= 0.03


def test_compile(work):
    res = work["compile"]
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if "grouped-sparse" in line and "x" in line.split()[1]]
    assert sorted(r.split()[1] for r in rows) == sorted(f"{n}x{k}" for k, n in zip(SIZES, SIZES[1:]))
    assert "3 of 3 dense layers went grouped-sparse" in res.stdout
    assert (work["dir"] / "pruned.so").is_file()


def test_run(work):
    res, d = work["run"], work["dir"]
    assert res.returncode == 0, res.stderr
    y = np.load(d / "Y.npy")
    ref = ort_run(onnx.load(str(d / "pruned.onnx")), work["x"])
    assert y.shape == ref.shape and y.dtype == np.float32
    assert rel_err(y, ref) < 1e-4


def test_console_script(tmp_path):
    """The installed ``tvm-scalpel`` entry point is the same program."""
    script = Path(sys.executable).with_name("tvm-scalpel")
    res = subprocess.run([str(script), "prune", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("tvm-scalpel: error:")
    assert list(tmp_path.iterdir()) == []


def test_compile_mode_dense_and_verbose(work, tmp_path):
    res = run_cli("-v", "compile", work["dir"] / "pruned.onnx", "-o", tmp_path / "d.so", "--mode", "dense")
    assert res.returncode == 0, res.stderr
    assert "0 of 3 dense layers went grouped-sparse" in res.stdout
    assert "INFO" in res.stderr  # -v logs what the passes do


def test_outputs_are_created_with_default_permissions(work):
    """Outputs are written via a temporary file; they must still get the usual umask-based mode,
    like any file the user creates (mkstemp's 0600 would hide them from everyone else)."""
    umask = os.umask(0)
    os.umask(umask)
    expected = {"pruned.onnx": 0o666 & ~umask, "Y.npy": 0o666 & ~umask, "pruned.so": 0o777 & ~umask}
    modes = {name: stat.S_IMODE((work["dir"] / name).stat().st_mode) for name in expected}
    assert {k: oct(v) for k, v in modes.items()} == {k: oct(v) for k, v in expected.items()}


# --------------------------------------------------------------------------- bad input

# (id, arguments with {d} for the input directory and {out} for the output directory, output path)
BAD = [
    ("missing-file", "prune {d}/nope.onnx -o {out}/o.onnx", "{out}/o.onnx"),
    ("random-bytes", "prune {d}/random.onnx -o {out}/o.onnx", "{out}/o.onnx"),
    ("text-file", "prune {d}/text.onnx -o {out}/o.onnx", "{out}/o.onnx"),
    ("compile-random-bytes", "compile {d}/random.onnx -o {out}/o.so", "{out}/o.so"),
    ("compile-missing-file", "compile {d}/nope.onnx -o {out}/o.so", "{out}/o.so"),
    ("prune-unsupported-op", "prune {d}/custom_op.onnx -o {out}/o.onnx", "{out}/o.onnx"),
    ("compile-unsupported-op", "compile {d}/custom_op.onnx -o {out}/o.so", "{out}/o.so"),
    ("rate-1.0", "prune {d}/model.onnx -o {out}/o.onnx --rate 1.0", "{out}/o.onnx"),
    ("rate-negative", "prune {d}/model.onnx -o {out}/o.onnx --rate -0.5", "{out}/o.onnx"),
    ("rate-not-a-number", "prune {d}/model.onnx -o {out}/o.onnx --rate lots", "{out}/o.onnx"),
    ("group-width-0", "prune {d}/model.onnx -o {out}/o.onnx --group-width 0", "{out}/o.onnx"),
    ("prune-target-nonsense", "prune {d}/model.onnx -o {out}/o.onnx --target nonsense", "{out}/o.onnx"),
    ("compile-target-nonsense", "compile {d}/pruned.onnx -o {out}/o.so --target nonsense", "{out}/o.so"),
    ("target-malformed-json", ["prune", "{d}/model.onnx", "-o", "{out}/o.onnx", "--target", '{"kind": "llvm"'],
     "{out}/o.onnx"),
    ("target-unknown-kind", ["compile", "{d}/pruned.onnx", "-o", "{out}/o.so", "--target", '{"kind": "nonsense"}'],
     "{out}/o.so"),
    ("compile-target-without-pipeline", ["compile", "{d}/pruned.onnx", "-o", "{out}/o.so", "--target", '{"kind": "c"}'],
     "{out}/o.so"),
    ("compile-not-so", "compile {d}/pruned.onnx -o {out}/o.onnx", "{out}/o.onnx"),
    ("run-missing-input", "run {d}/pruned.so --input {d}/nope.npy -o {out}/y.npy", "{out}/y.npy"),
    ("run-non-npy-input", "run {d}/pruned.so --input {d}/text.npy -o {out}/y.npy", "{out}/y.npy"),
    ("run-float64-input", "run {d}/pruned.so --input {d}/x64.npy -o {out}/y.npy", "{out}/y.npy"),
    ("run-wrong-shape", "run {d}/pruned.so --input {d}/x_bad_shape.npy -o {out}/y.npy", "{out}/y.npy"),
    ("run-not-a-library", "run {d}/model.onnx --input {d}/x.npy -o {out}/y.npy", "{out}/y.npy"),
    ("run-missing-library", "run {d}/nope.so --input {d}/x.npy -o {out}/y.npy", "{out}/y.npy"),
    ("prune-output-dir-missing", "prune {d}/model.onnx -o {out}/missing/o.onnx", "{out}/missing"),
    ("compile-output-dir-missing", "compile {d}/pruned.onnx -o {out}/missing/o.so", "{out}/missing"),
    ("run-output-dir-missing", "run {d}/pruned.so --input {d}/x.npy -o {out}/missing/y.npy", "{out}/missing"),
    ("prune-output-is-a-directory", "prune {d}/model.onnx -o {out}/sub", None),
    ("run-output-is-a-directory", "run {d}/pruned.so --input {d}/x.npy -o {out}/sub", None),
]


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("args,output", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_fails_cleanly(work, tmp_path, args, output):
    d = work["dir"]
    assert (d / "pruned.so").is_file() and (d / "pruned.onnx").is_file()
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)  # an existing (empty) directory, for the directory cases
    before = snapshot(tmp_path)
    fill = lambda a: a.replace("{d}", str(d)).replace("{out}", str(out))
    res = run_cli(*map(fill, args.split() if isinstance(args, str) else args))

    # a user error: status 2 (the CLI's contract), one non-empty line, no traceback
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    # nothing written, no temporary file left behind
    if output is not None:
        assert not os.path.exists(fill(output))
    assert snapshot(tmp_path) == before
