"""Nothing lost: outputs that would overwrite an input are refused, ``run`` writes every output,
wrong inputs are explained in the model's terms, and Ctrl-C at any moment is one line and
exit status 130 with no output (or temporary file) left and the tuning database intact."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, ort_run, rel_err, run_cli
from onnx import helper, numpy_helper

from tvm_scalpel import models

SCRIPT = Path(sys.executable).with_name("tvm-scalpel")
ONE_LINE_INTERRUPTED = "tvm-scalpel: interrupted\n"


def two_output_model(k: int = 24, n: int = 10, seed: int = 3) -> onnx.ModelProto:
    """``logits = x @ W.T + b`` and ``act = relu(logits)``: two graph outputs."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], transB=1),
             helper.make_node("Relu", ["logits"], ["act"])]
    return make_model(nodes, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
                      [("x", ["N", k])], [("logits", ["N", n]), ("act", ["N", n])])


def ort_outputs(model: onnx.ModelProto, x: np.ndarray) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))


def old_style_library(model: onnx.ModelProto, path: Path) -> None:
    """A library as compiled before libraries recorded their signature (no extra function)."""
    from tvm_scalpel.api import build_relax, export_library
    from tvm_scalpel.onnx_io import to_relax

    export_library(build_relax(to_relax(model)).executable, path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    small = models.mlp([40, 24, 6], seed=7)
    onnx.save(small, str(d / "m.onnx"))
    onnx.save(two_output_model(), str(d / "two.onnx"))
    lenet = models.lenet_300_100()
    onnx.save(lenet, str(d / "lenet.onnx"))
    for args in (["compile", d / "m.onnx", "-o", d / "m.so"],
                 ["compile", d / "two.onnx", "-o", d / "two.so"],
                 ["compile", d / "lenet.onnx", "-o", d / "lenet.so"],
                 ["compile", d / "lenet.onnx", "-o", d / "lenet_b1.so", "--batch", "1"]):
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr
    old_style_library(two_output_model(), d / "two_old.so")
    old_style_library(lenet, d / "lenet_old.so")
    np.save(d / "x.npy", np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32))
    (d / "data.npz").write_bytes(b"a data file, only named here: never read")
    (d / "db.jsonl").write_text("")
    return {"dir": d, "small": small, "lenet": lenet}


def digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def assert_one_line_error(res, *fragments) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvm-scalpel: error:"), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], res.stderr


# --------------------------------------------------------------------------- 3. in-place outputs

IN_PLACE = [
    ("run-o-library", "run {d}/m.so --input {d}/x.npy -o {d}/m.so"),
    ("run-o-input", "run {d}/m.so --input {d}/x.npy -o {d}/x.npy"),
    ("run-o-input-dot-spelling", "run {d}/m.so --input {d}/x.npy -o {d}/./sub/../x.npy"),
    ("run-o-symlink-to-library", "run {d}/m.so --input {d}/x.npy -o {d}/link_to_m.so"),
    ("run-o-hard-link-to-input", "run {d}/m.so --input {d}/x.npy -o {d}/hard_x.npy"),
    ("prune-o-model", "prune {d}/m.onnx -o {d}/m.onnx"),
    ("prune-o-model-relative", "prune m.onnx -o ./m.onnx"),
    ("prune-o-symlink-to-model", "prune {d}/m.onnx -o {d}/link_to_m.onnx"),
    ("prune-o-db", "prune {d}/m.onnx -o {d}/db.jsonl --db {d}/db.jsonl --group-width auto"),
    ("prune-o-data", "prune {d}/m.onnx -o {d}/data.npz --data {d}/data.npz"),
    ("train-o-model", "train {d}/m.onnx -o {d}/m.onnx --epochs 1"),
    ("train-o-data", "train {d}/m.onnx -o {d}/data.npz --data {d}/data.npz"),
    ("compile-o-model", "compile {d}/model.so -o {d}/model.so"),
    ("compile-o-db", "compile {d}/m.onnx -o {d}/db.so --db {d}/db.so"),
    ("tune-db-is-model", "tune {d}/m.onnx --db {d}/m.onnx --trials 1"),
]


@pytest.mark.parametrize("args", [c[1] for c in IN_PLACE], ids=[c[0] for c in IN_PLACE])
def test_an_output_that_is_an_input_is_refused(work, tmp_path, args):
    d = tmp_path / "d"
    d.mkdir()
    (d / "sub").mkdir()
    for name in ("m.so", "x.npy", "m.onnx", "db.jsonl", "data.npz"):
        (d / name).write_bytes((work["dir"] / name).read_bytes())
    (d / "model.so").write_bytes((work["dir"] / "m.onnx").read_bytes())  # an ONNX model named .so
    (d / "db.so").write_text("")  # a (empty) tuning database named like a library
    (d / "link_to_m.so").symlink_to(d / "m.so")
    (d / "link_to_m.onnx").symlink_to("m.onnx")
    os.link(d / "x.npy", d / "hard_x.npy")
    before = digest(d)
    res = run_cli(*args.replace("{d}", str(d)).split(), cwd=d)
    assert_one_line_error(res, "same file as the")
    assert digest(d) == before  # nothing written, nothing replaced, no temporary file


def test_a_distinct_output_beside_the_input_still_works(work, tmp_path):
    d = tmp_path
    (d / "m.so").write_bytes((work["dir"] / "m.so").read_bytes())
    (d / "x.npy").write_bytes((work["dir"] / "x.npy").read_bytes())
    res = run_cli("run", "m.so", "--input", "x.npy", "-o", "./y.npy", cwd=d)
    assert res.returncode == 0, res.stderr
    x = np.load(d / "x.npy")
    assert rel_err(np.load(d / "y.npy"), ort_run(work["small"], x)) < 1e-4


# --------------------------------------------------------------------------- 4. every output


def test_run_writes_every_output_keyed_by_onnx_name(work, tmp_path):
    d = work["dir"]
    x = np.random.default_rng(11).standard_normal((4, 24)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = run_cli("run", d / "two.so", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz")
    assert res.returncode == 0, res.stderr
    ref = ort_outputs(two_output_model(), x)
    with np.load(tmp_path / "y.npz") as got:
        assert list(got.keys()) == ["logits", "act"]
        for name in ref:
            assert got[name].shape == ref[name].shape and got[name].dtype == np.float32
            assert rel_err(got[name], ref[name]) < 1e-5
    assert (ref["logits"] < 0).any()  # the two outputs really differ: relu cut something
    assert "logits" in res.stdout and "act" in res.stdout


def test_several_outputs_into_a_npy_name_is_refused(work, tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 24), np.float32))
    for lib in ("two.so", "two_old.so"):
        res = run_cli("run", work["dir"] / lib, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
        assert_one_line_error(res, "2 outputs", ".npz")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_a_library_without_signature_runs_with_generic_names(work, tmp_path):
    x = np.random.default_rng(12).standard_normal((2, 24)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = run_cli("run", work["dir"] / "two_old.so", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz")
    assert res.returncode == 0, res.stderr
    ref = ort_outputs(two_output_model(), x)
    with np.load(tmp_path / "y.npz") as got:
        assert list(got.keys()) == ["output_0", "output_1"]
        assert rel_err(got["output_0"], ref["logits"]) < 1e-5 and rel_err(got["output_1"], ref["act"]) < 1e-5


def test_one_output_into_npz_and_npy(work, tmp_path):
    x = np.load(work["dir"] / "x.npy")
    ref = ort_run(work["small"], x)
    for name in ("y.npy", "y.npz"):
        res = run_cli("run", work["dir"] / "m.so", "--input", work["dir"] / "x.npy", "-o", tmp_path / name)
        assert res.returncode == 0, res.stderr
    assert rel_err(np.load(tmp_path / "y.npy"), ref) < 1e-5
    with np.load(tmp_path / "y.npz") as got:
        assert list(got.keys()) == [work["small"].graph.output[0].name]
        assert rel_err(got[work["small"].graph.output[0].name], ref) < 1e-5


def test_python_api_returns_every_output(work):
    from tvm_scalpel import load_library, run_library
    from tvm_scalpel.api import library_signature, run_library_outputs

    x = np.random.default_rng(13).standard_normal((3, 24)).astype(np.float32)
    ref = ort_outputs(two_output_model(), x)
    vm = load_library(work["dir"] / "two.so")
    out = run_library(vm, x)
    assert isinstance(out, dict) and list(out) == ["logits", "act"]
    for name in ref:
        assert rel_err(out[name], ref[name]) < 1e-5
    sig = library_signature(vm)
    assert [(t.name, t.shape, t.dtype) for t in sig.inputs] == [("x", ["N", 24], "float32")]
    assert [(t.name, t.shape) for t in sig.outputs] == [("logits", ["N", 10]), ("act", ["N", 10])]
    # one output: the array itself, as before; an old library: no signature, still runs
    small = load_library(work["dir"] / "m.so")
    xs = np.load(work["dir"] / "x.npy")
    assert rel_err(run_library(small, xs), ort_run(work["small"], xs)) < 1e-5
    old = load_library(work["dir"] / "two_old.so")
    assert library_signature(old) is None
    assert list(run_library_outputs(old, x)) == ["output_0", "output_1"]


def test_rpc_run_writes_every_output(work, tmp_path):
    from tvm import rpc

    server = rpc.Server(host="127.0.0.1", port=20510, port_end=20600, silent=True)
    try:
        x = np.random.default_rng(14).standard_normal((2, 24)).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        res = run_cli("run", work["dir"] / "two.so", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz",
                      "--rpc", f"127.0.0.1:{server.port}")
        assert res.returncode == 0, res.stderr
        ref = ort_outputs(two_output_model(), x)
        with np.load(tmp_path / "y.npz") as got:
            assert list(got.keys()) == ["logits", "act"]
            assert rel_err(got["act"], ref["act"]) < 1e-5
        np.save(tmp_path / "bad.npy", x[:, :-4].copy())
        res = run_cli("run", work["dir"] / "two.so", "--input", tmp_path / "bad.npy", "-o", tmp_path / "z.npz",
                      "--rpc", f"127.0.0.1:{server.port}")
        assert_one_line_error(res, "input x has shape (2, 20); the model expects (N, 24)")
    finally:
        server.terminate()


# --------------------------------------------------------------------------- 7. errors in the user's terms

WRONG = [
    ("shape", "lenet.so", (1, 100), np.float32, "input input has shape (1, 100); the model expects (N, 784)"),
    ("rank", "lenet.so", (1, 784, 1), np.float32, "input input has shape (1, 784, 1); the model expects (N, 784)"),
    ("rank-1", "lenet.so", (784,), np.float32, "input input has shape (784,); the model expects (N, 784)"),
    ("dtype", "lenet.so", (1, 784), np.float64, "input input has dtype float64; the model expects float32"),
    ("int-dtype", "lenet.so", (1, 784), np.int32, "input input has dtype int32; the model expects float32"),
    ("fixed-batch", "lenet_b1.so", (2, 784), np.float32, "input input has shape (2, 784); the model expects (1, 784)"),
    ("old-library-shape", "lenet_old.so", (1, 100), np.float32,
     "input input has shape (1, 100); the model expects (N, 784)"),
    ("old-library-rank", "lenet_old.so", (1, 784, 1), np.float32,
     "input input has shape (1, 784, 1); the model expects (N, 784)"),
]


@pytest.mark.parametrize("lib,shape,dtype,message", [c[1:] for c in WRONG], ids=[c[0] for c in WRONG])
def test_a_wrong_input_is_explained_in_the_models_terms(work, tmp_path, lib, shape, dtype, message):
    np.save(tmp_path / "bad.npy", np.ones(shape, dtype))
    res = run_cli("run", work["dir"] / lib, "--input", tmp_path / "bad.npy", "-o", tmp_path / "y.npy")
    assert_one_line_error(res, message)
    assert "Check failed" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy"]


def test_nan_or_inf_in_the_input_is_warned_about(work, tmp_path):
    x = np.random.default_rng(15).standard_normal((2, 784)).astype(np.float32)
    x[0, 3], x[1, 7] = np.nan, np.inf
    np.save(tmp_path / "x.npy", x)
    res = run_cli("run", work["dir"] / "lenet.so", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and "2 NaN/Inf" in warnings[0] and warnings[0].startswith("WARNING"), res.stderr
    assert np.load(tmp_path / "y.npy").shape == (2, 10)
    finite = x.copy()
    finite[~np.isfinite(finite)] = 0.5
    np.save(tmp_path / "ok.npy", finite)
    res = run_cli("run", work["dir"] / "lenet.so", "--input", tmp_path / "ok.npy", "-o", tmp_path / "y2.npy")
    assert res.returncode == 0 and res.stderr == "", res.stderr


# --------------------------------------------------------------------------- 5. interrupts


def start(args, cwd, env_extra=None, script=None):
    env = dict(os.environ, TMPDIR=str(cwd / "tmp"), **(env_extra or {}))
    (cwd / "tmp").mkdir(exist_ok=True)
    cmd = [sys.executable, str(script), *map(str, args)] if script else [str(SCRIPT), *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def loaded(proc, fragment: str) -> bool:
    try:
        return fragment in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


def wait_for(condition, proc, timeout=120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, ("finished before the interrupt", proc.communicate())
        assert time.time() < deadline, "timed out waiting for the moment to interrupt"
        time.sleep(0.005)


def interrupt_and_check(proc, workdir: Path, inputs: set) -> None:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert err == ONE_LINE_INTERRUPTED, err
    assert proc.returncode == 130
    left = {p.name for p in workdir.iterdir()} - inputs - {"tmp"}
    assert left == set(), left  # no output, no temporary file
    assert list((workdir / "tmp").iterdir()) == []


def test_interrupt_while_importing_tvm(tmp_path):
    """The console script, interrupted as soon as TVM's FFI library is mapped (TVM's import)."""
    proc = start(["prune", "lenet-300-100", "-o", "out.onnx"], tmp_path)
    wait_for(lambda: loaded(proc, "tvm_ffi"), proc)
    interrupt_and_check(proc, tmp_path, set())


HOOK = textwrap.dedent("""
    # the real program, but it sends itself SIGINT from inside one of our passes (run from C++)
    import os, signal, sys
    import importlib
    module, name = sys.argv.pop(1).rsplit(":", 1)
    module = importlib.import_module(module)
    real = getattr(module, name)
    def hooked(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    setattr(module, name, hooked)
    from tvm_scalpel.cli import main
    sys.exit(main())
""")


@pytest.mark.parametrize("hook,command", [
    ("tvm_scalpel.passes.prune_weights:prune_groups", ["prune", "m.onnx", "-o", "out.onnx"]),
    ("tvm_scalpel.passes.rewrite_dense_layers:recover_group_width", ["compile", "m.onnx", "-o", "out.so"]),
    # while the library is being written to its temporary name
    ("tvm_scalpel.api:_quiet_native_stderr", ["compile", "m.onnx", "-o", "out.so"]),
    # after the model ran, before its output is written
    ("tvm_scalpel.api:named_outputs", ["run", "m.so", "--input", "x.npy", "-o", "y.npy"]),
], ids=["prune-pass", "compile-pass", "compile-export", "run"])
def test_interrupt_inside_a_pass_or_step(work, tmp_path, hook, command):
    for name in ("m.onnx", "m.so", "x.npy"):
        (tmp_path / name).write_bytes((work["dir"] / name).read_bytes())
    script = tmp_path.parent / f"hook_{tmp_path.name}.py"
    script.write_text(HOOK)
    proc = start([hook, *command], tmp_path, script=script)
    interrupt_check_only(proc, tmp_path, {"m.onnx", "m.so", "x.npy"})


def interrupt_check_only(proc, workdir: Path, inputs: set) -> None:
    _, err = proc.communicate(timeout=300)
    assert err == ONE_LINE_INTERRUPTED, err
    assert proc.returncode == 130
    assert {p.name for p in workdir.iterdir()} - inputs - {"tmp"} == set()


@pytest.mark.parametrize("fraction", [0.15, 0.4, 0.65, 0.8])
def test_interrupt_compile_at_any_moment(work, tmp_path, fraction):
    """SIGINT at a fraction of a whole compile (import, passes, LLVM, linking the library)."""
    (tmp_path / "lenet.onnx").write_bytes((work["dir"] / "lenet.onnx").read_bytes())
    if "total" not in TIMES:
        t0 = time.time()
        res = run_cli("compile", tmp_path / "lenet.onnx", "-o", tmp_path / "timing.so")
        assert res.returncode == 0, res.stderr
        TIMES["total"] = time.time() - t0
        (tmp_path / "timing.so").unlink()
    proc = start(["compile", "lenet.onnx", "-o", "out.so"], tmp_path)
    time.sleep(fraction * TIMES["total"])
    if proc.poll() is not None:
        pytest.skip("the compile finished before the interrupt on this (fast) machine")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # it finished just as the signal came: then it is all there
        assert err == "" and (tmp_path / "out.so").stat().st_size > 0
        pytest.skip("the compile finished as the interrupt came")
    assert err == ONE_LINE_INTERRUPTED, err
    assert proc.returncode == 130
    assert {p.name for p in tmp_path.iterdir()} == {"lenet.onnx", "tmp"}
    assert list((tmp_path / "tmp").iterdir()) == []


TIMES: dict = {}


def test_interrupt_during_tune_keeps_the_database(work, tmp_path):
    (tmp_path / "m.onnx").write_bytes((work["dir"] / "m.onnx").read_bytes())
    db = tmp_path / "db.jsonl"
    res = run_cli("tune", tmp_path / "m.onnx", "--db", db, "--trials", "2", "--quiet")
    assert res.returncode == 0, res.stderr
    before = db.read_text()
    proc = start(["tune", "m.onnx", "--db", "db.jsonl", "--trials", "12", "--quiet"], tmp_path)
    wait_for(lambda: db.stat().st_size > len(before.encode()), proc)  # tuning has begun
    interrupt_and_check(proc, tmp_path, {"m.onnx", "db.jsonl"})
    after = db.read_text()
    assert after.startswith(before) and after.endswith("\n")
    for line in after.splitlines():
        json.loads(line)


def test_interrupt_during_training(work, tmp_path):
    proc = start(["train", "lenet-300-100", "-o", "out.onnx", "--epochs", "20", "--quiet"], tmp_path,
                 env_extra={"PYTHONUNBUFFERED": "1"})
    first = proc.stdout.readline()  # "data: ..." is printed once the data set is loaded
    assert first.startswith("data:"), first
    time.sleep(1.0)
    interrupt_and_check(proc, tmp_path, set())


