"""The GPU bundle, checked on the CPU: ``scripts/gpu_bundle.sh --device cpu`` packs the
runtime-only TVM (this Python's wheels, no libtvm_compiler.so) with an LLVM-compiled model in
the four variants of the GPU table, weights lifted out; the bundle's ``gpu_run.py`` then
regenerates the weights, loads each library through the runtime-only TVM in a subprocess and
checks it against onnxruntime, as it does on a lent GPU with the CUDA libraries.

About a minute (the first run downloads two wheels, ~100 MB, into ``.gpu_bundle/wheels``;
skipped if that download fails).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tvm_scalpel.gpu_runner import gather_groups, he_uniform, undelta, unit_uniform
from tvm_scalpel.schedules import pack_grouped_sparse
from tvm_scalpel.format import GroupedSparseMatrix

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_bundle.sh"
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"
DOWNLOAD_FAILED = 3  # gpu_bundle.sh's exit status when pip download fails
VARIANTS = {"dense", "node-pruned", "traditional", "grouped-sparse"}


def bundle_cmd(out: Path, *extra: str) -> list[str]:
    return ["bash", str(SCRIPT), "--python", PYVER, "--device", "cpu", "--out", str(out), *extra]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TVM_USE_RUNTIME_LIB")}
    env["PYTHON_VENV"] = sys.executable
    return env


def build_bundle(out: Path, *extra: str) -> subprocess.CompletedProcess:
    run = subprocess.run(bundle_cmd(out, *extra), cwd=ROOT, env=clean_env(), capture_output=True,
                         text=True, timeout=600)
    if run.returncode == DOWNLOAD_FAILED:
        pytest.skip(f"the TVM wheels for Python {PYVER} could not be downloaded: "
                    f"{run.stderr.strip().splitlines()[-1]}")
    return run


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "bundle"
    run = build_bundle(out)
    assert run.returncode == 0, run.stderr
    return out


def run_bundle(bundle: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    """The runner as on the device: a plain script, from elsewhere, no PYTHONPATH of ours."""
    return subprocess.run([sys.executable, str(bundle / "gpu_run.py"), "--out", str(results), *extra],
                          cwd=results.parent, env=clean_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def results(bundle, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("run") / "results.json"
    run = run_bundle(bundle, path)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(path.read_text())


def test_bundle_holds_the_runtime_only(bundle):
    lib = bundle / "site" / "tvm" / "lib"
    assert (lib / "libtvm_runtime.so").is_file()
    assert not (lib / "libtvm_compiler.so").exists()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {e["variant"] for e in manifest["libraries"]} == VARIANTS
    # weights are not shipped: every parameter of the dense model is made from the seed
    dense = next(e for e in manifest["libraries"] if e["variant"] == "dense")
    assert dense["params"] and all(manifest["arrays"][k]["from"] == "init" for k in dense["params"])
    kinds = {manifest["arrays"][k]["from"] for e in manifest["libraries"] for k in e["params"]}
    assert "gather" in kinds  # the grouped-sparse values come from the regenerated weights


def test_every_library_runs_runtime_only_and_matches_onnxruntime(bundle, results):
    info = results["info"]
    assert info["runtime_only"] and not info["compiler_loaded"]
    assert Path(info["tvm_file"]).resolve().is_relative_to(bundle.resolve() / "site")
    assert all(w["weights_match_build"] for w in results["weights"])
    rows = results["results"]
    assert {r["variant"] for r in rows} == VARIANTS and {r["batch"] for r in rows} == {1, 4}
    for r in rows:
        assert r["ok"] and r["input_matches_build"], r
        assert r["rel_error"] < 1e-4 and r["median_us"] > 0


def test_check_only_rebuilds_every_parameter_without_tvm(bundle, tmp_path):
    run = run_bundle(bundle, tmp_path / "unused.json", "--check-only")
    assert run.returncode == 0 and " 0 differ" in run.stdout, run.stdout + run.stderr
    assert not (tmp_path / "unused.json").exists()


def test_a_wrong_reference_is_reported(bundle, tmp_path):
    """The check can fail: a bundle whose reference is off by a little makes the runner say BAD
    and exit 1."""
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad, symlinks=True)
    data = dict(np.load(bad / "data.npz"))
    manifest = json.loads((bad / "manifest.json").read_text())
    entry = next(e for e in manifest["libraries"] if e["variant"] == "grouped-sparse")
    ref = data[entry["reference"]]
    ref.flat[0] += 0.01 * np.abs(ref).max()
    np.savez(bad / "data.npz", **data)
    run = run_bundle(bad, tmp_path / "r.json", "--only", Path(entry["file"]).stem)
    assert run.returncode == 1, run.stdout + run.stderr
    row = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert not row["ok"] and row["rel_error"] > 1e-3


def test_report_writes_table_and_plot(results, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "report", str(path),
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    md = (tmp_path / "gpu.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| mlp")]
    assert len(table) == 2 and all("yes" in line for line in table)
    assert all(f"{v}" in md for v in VARIANTS)
    assert (tmp_path / "gpu.png").stat().st_size > 1000


def test_report_of_a_missing_file_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "report",
                          str(tmp_path / "none.json")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_over_the_size_limit_leaves_no_bundle(tmp_path):
    out = tmp_path / "small"
    run = build_bundle(out, "--limit-mib", "1", "--", "--models", "mlp", "--batches", "1",
                       "--variants", "dense")
    assert run.returncode == 1 and "over the 1 MiB limit" in run.stderr
    assert not out.exists() and not list(tmp_path.glob(".build.*"))


# ------------------------------------------------------ CUDA libraries, up to the driver call

STUB_LIBCUDA = r"""
/* A stand-in for the NVIDIA driver's libcuda.so.1: every call fails (CUDA_ERROR_UNKNOWN). */
static const char *msg = "stub libcuda: no driver";
int cuGetErrorName(int e, const char **s) { *s = msg; return 0; }
int cuGetErrorString(int e, const char **s) { *s = msg; return 0; }
int cuDeviceGetName(void) { return 999; }
int cuFuncSetAttribute(void) { return 999; }
int cuLaunchKernelEx(void) { return 999; }
int cuModuleGetFunction(void) { return 999; }
int cuModuleLoadData(void) { return 999; }
int cuModuleUnload(void) { return 999; }
int cuTensorMapEncodeTiled(void) { return 999; }
"""

LOAD_CUDA = r"""
import ctypes, json, sys
from pathlib import Path
site, stub, cudart, libs, kernels = sys.argv[1:6]
sys.path.insert(0, site)
ctypes.CDLL(stub, mode=ctypes.RTLD_GLOBAL)  # resolves libtvm_runtime_cuda's libcuda.so.1
import importlib.util
spec = importlib.util.spec_from_file_location("gpu_run", sys.argv[6])
gpu_run = importlib.util.module_from_spec(spec); spec.loader.exec_module(gpu_run)
bundle = Path(cudart).parent.parent
tvm = gpu_run.import_runtime(bundle, "cuda")  # what the runner does on the device
import tvm_ffi
cache = gpu_run.KernelCache(Path(kernels), "sm_90")
tvm_ffi.register_global_func("tvm_callback_cuda_compile", cache, override=True)
for lib in libs.split(","):
    tvm.runtime.load_module(lib)
print(json.dumps({"hits": cache.hits, "jit": cache.jit, "compiler": gpu_run._compiler_loaded(),
                  "cuda_loader": tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda",
                                                         allow_missing=True) is not None}))
"""


def test_cuda_libraries_load_runtime_only_with_the_kernels_built_here(bundle, tmp_path):
    """Without a GPU: the bundle's libtvm_runtime_cuda.so loads (against a stub driver), reads
    the CUDA libraries compiled here and asks for their kernels, which are the fatbins nvcc made
    here (same source, same hash): nothing is compiled where they run."""
    cudart = next((p for home in ("/usr/local/cuda", *sorted(Path("/usr/local").glob("cuda-*")))
                   for p in sorted(Path(home).glob("lib*/libcudart.so.[0-9]*"))), None)
    if shutil.which("nvcc") is None or shutil.which("gcc") is None or cudart is None:
        pytest.skip("needs nvcc, gcc and libcudart (the CUDA toolkit)")
    cuda = tmp_path / "cuda"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "build", "--out",
                          str(cuda), "--device", "cuda", "--models", "mlp", "--batches", "1",
                          "--variants", "dense,grouped-sparse"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (cuda / "lib").mkdir()
    shutil.copy(cudart, cuda / "lib" / cudart.name)
    stub = tmp_path / "libcuda.so.1"
    (tmp_path / "stub.c").write_text(STUB_LIBCUDA)
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub),
                    str(tmp_path / "stub.c")], check=True)
    libs = sorted((cuda / "models").glob("*.so"))
    assert len(libs) == 2
    run = subprocess.run([sys.executable, "-c", LOAD_CUDA, str(bundle / "site"), str(stub),
                          str(cuda / "lib" / cudart.name), ",".join(map(str, libs)), str(cuda / "kernels"),
                          str(bundle / "gpu_run.py")], env=clean_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["cuda_loader"] and not got["compiler"]
    assert got["jit"] == [] and got["hits"] == len(libs)  # one CUDA module per library


# ------------------------------------------------------------------ the runner's numpy parts


@pytest.mark.parametrize("k, g", [(64, 8), (50, 8), (37, 4), (40, 1)])
def test_gather_groups_matches_our_packing(rng, k, g):
    """The runner's gather makes exactly what the kernels' packing makes, tail groups too."""
    w = rng.standard_normal((9, k)).astype(np.float32)
    groups = -(-k // g)
    keep = rng.random((9, groups)) < 0.4
    dense = np.repeat(keep, g, axis=1)[:, :k] * w
    packed = pack_grouped_sparse(GroupedSparseMatrix.from_dense(dense, g))
    got = gather_groups(w, packed.offsets, packed.indptr, g)
    np.testing.assert_array_equal(got, packed.values)


def test_regenerated_weights_are_deterministic_and_he_scaled():
    a = he_uniform(7, 3, (300, 784), np.sqrt(6 / 784))
    assert a.dtype == np.float32 and np.array_equal(a, he_uniform(7, 3, (300, 784), np.sqrt(6 / 784)))
    assert not np.array_equal(a, he_uniform(7, 4, (300, 784), np.sqrt(6 / 784)))
    assert np.abs(a).max() < np.sqrt(6 / 784) and abs(a.var() - 2 / 784) < 0.05 * 2 / 784
    x = unit_uniform(7, 5, (1000,))
    assert x.min() >= 0 and x.max() < 1


def test_int_arrays_ship_as_deltas(rng):
    offsets = np.sort(rng.integers(0, 9000, 500)).astype(np.int32)
    offsets[250:] -= 4000  # a new row starts lower
    assert np.array_equal(undelta(np.diff(offsets.astype(np.int64), prepend=0).astype(np.int16)), offsets)
