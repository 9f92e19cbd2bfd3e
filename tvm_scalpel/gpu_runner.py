#!/usr/bin/env python3
"""Run a GPU bundle's compiled models with the runtime-only TVM, check and time them.

This file is copied into the bundle (``scripts/gpu_bundle.sh``) as ``gpu_run.py`` and runs there
as a plain script: it needs the Python standard library, numpy, the bundle's runtime-only TVM
(``site/``: the apache-tvm and apache-tvm-ffi wheels without ``libtvm_compiler.so``) and, for
the PyTorch peer only, torch. It never imports tvm_scalpel (whose package imports the TVM
compiler) nor anything else of TVM than its runtime.

What it does, from the bundle's ``manifest.json``:

1. regenerates every model's dense weights and inputs from the seed (``he_uniform``: PCG64 raw
   bits, identical on every numpy, no transcendental functions) and checks them against the
   checksums written where the bundle was built;
2. rebuilds each library's parameters from those weights with the recipes of the manifest
   (a slice of kept nodes, a transpose, or the kept groups of a grouped-sparse layer gathered
   from the dense weight along the structure shipped in ``data.npz``);
3. loads each library (``tvm.runtime.load_module``), runs it on the device, compares the output
   with the reference computed where the bundle was built (onnxruntime on the same ONNX model),
   and times it with TVM's ``time_evaluator``;
4. runs the dense model in PyTorch on the same device (the peer), checks and times it;
5. writes everything to a JSON results file (``benchmarks/bench_gpu.py report`` makes the table).

CUDA kernels: the TVM wheel here compiles CUDA to source only, and its runtime JIT-compiles that
source through the ``tvm_callback_cuda_compile`` hook when a library is loaded. The bundle ships
every kernel module already compiled by nvcc where it was built (``kernels/<sha256>.fatbin``,
keyed by the source), so the hook below only looks them up; it falls back to the device's nvcc
for a source it does not know, and says so in the results.

Usage: ``python3 gpu_run.py [--bundle DIR] [--out results.json] [--device cuda|cpu]``.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FORMAT = 1
REL_TOL = 1e-4  # max |y - ref| / max |ref| a model's output must stay under


# ----------------------------------------------------------------------------------- weights


def _bits(seed: int, index: int, n: int) -> np.ndarray:
    """``n`` raw 64-bit words of PCG64 seeded by (seed, index): numpy keeps bit generators'
    streams stable across versions (NEP 19), unlike the Generator's distributions."""
    return np.random.PCG64(np.random.SeedSequence([seed, index])).random_raw(n)


def he_uniform(seed: int, index: int, shape, scale: float) -> np.ndarray:
    """Uniform on [-scale, scale) from the top 24 bits of each word: exact in float32."""
    n = int(np.prod(shape, dtype=np.int64))
    u = (_bits(seed, index, n) >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -23)
    return ((u - np.float32(1.0)) * np.float32(scale)).reshape(tuple(shape))


def unit_uniform(seed: int, index: int, shape) -> np.ndarray:
    """Uniform on [0, 1) in float32 (model inputs)."""
    n = int(np.prod(shape, dtype=np.int64))
    u = (_bits(seed, index, n) >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
    return u.reshape(tuple(shape))


def weight_scale(shape) -> float:
    """He-uniform bound sqrt(6 / fan_in) for weights (variance 2 / fan_in); 0.05 for biases."""
    if len(shape) < 2:
        return 0.05
    return float(np.sqrt(6.0 / int(np.prod(shape[1:]))))


def digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]


def generate_initializers(model: dict, seed: int) -> dict[str, np.ndarray]:
    """A model's dense initializers, as the manifest lists them (name, shape, scale, index)."""
    return {i["name"]: he_uniform(seed, i["index"], i["shape"], i["scale"])
            for i in model["initializers"]}


def model_input(seed: int, spec: dict) -> np.ndarray:
    return unit_uniform(seed, spec["index"], spec["shape"])


# ----------------------------------------------------------------------------------- recipes


def undelta(arr: np.ndarray) -> np.ndarray:
    """Inverse of ``np.diff(a, prepend=0)``: the int arrays ship as small deltas."""
    return np.cumsum(arr.astype(np.int64)).astype(np.int32)


def pack_panels(w: np.ndarray, nr: int) -> np.ndarray:
    """``W[N, K]`` as the CPU dense kernel reads it: panels ``P[ceil(N/nr), K, nr]`` with
    ``P[p, k, j] = W[p*nr + j, k]``, zero-padded (``schedules.spec.pack_dense_panels``)."""
    n, k = w.shape
    panels = -(-n // nr)
    padded = np.zeros((panels * nr, k), np.float32)
    padded[:n] = w
    return np.ascontiguousarray(padded.reshape(panels, nr, k).transpose(0, 2, 1))


def pad_vector(v: np.ndarray, length: int) -> np.ndarray:
    """``v`` followed by zeros up to ``length`` (a bias padded to whole panels)."""
    out = np.zeros(length, np.float32)
    out[: v.shape[0]] = v
    return out


def gather_groups(w: np.ndarray, offsets: np.ndarray, indptr: np.ndarray, g: int) -> np.ndarray:
    """The kept groups of ``w`` (rows of ``indptr``, starting columns ``offsets``), as the
    grouped-sparse kernels take them: ``values[p, lane] = w[row(p), offsets[p] + lane]``.
    A row's partial last group (k % g != 0) starts at k - g, shifted back in bounds: its first
    g - k % g lanes belong to the group before and are zero."""
    rows = np.repeat(np.arange(w.shape[0]), np.diff(indptr.astype(np.int64)))
    cols = offsets.astype(np.int64)[:, None] + np.arange(g)
    values = np.ascontiguousarray(w[rows[:, None], cols], dtype=np.float32)
    k = w.shape[1]
    if k % g:
        values[offsets % g != 0, : g - k % g] = 0.0
    return values


class Arrays:
    """Materializes the manifest's arrays from the dense initializers and ``data.npz``."""

    def __init__(self, manifest: dict, data, inits: dict[str, dict[str, np.ndarray]]):
        self.recipes = manifest["arrays"]
        self.data = data
        self.inits = inits
        self.cache: dict[str, np.ndarray] = {}

    def get(self, key: str) -> np.ndarray:
        if key not in self.cache:
            recipe = self.recipes[key]
            arr = self.build(recipe)
            if "sha" in recipe and digest(arr) != recipe["sha"]:
                raise ValueError(f"array {key} {arr.shape}: rebuilt here, it differs from the one "
                                 "the library was compiled with")
            self.cache[key] = arr
        return self.cache[key]

    def build(self, r: dict) -> np.ndarray:
        kind = r["from"]
        if kind == "init":
            arr = self.inits[r["model"]][r["name"]]
            if r.get("take"):
                arr = arr[np.ix_(*[np.arange(n) if idx is None else np.asarray(self.get(idx))
                                   for n, idx in zip(arr.shape, r["take"])])]
            if r.get("transpose"):
                arr = arr.T
            if r.get("panels"):
                arr = pack_panels(arr, r["panels"])
            if r.get("pad"):
                arr = pad_vector(arr, r["pad"])
            return np.ascontiguousarray(arr)
        if kind == "gather":
            w = self.get(r["weight"])
            return gather_groups(w, self.get(r["offsets"]), self.get(r["indptr"]), r["g"])
        if kind == "file":
            arr = self.data[r["key"]]
            return undelta(arr) if r.get("delta") else np.ascontiguousarray(arr)
        raise ValueError(f"unknown array recipe {kind!r}")


# ----------------------------------------------------------------------------------- runtime


def _compiler_loaded() -> bool:
    try:
        return "libtvm_compiler" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def import_runtime(bundle: Path, device: str):
    """Import the bundle's TVM in runtime-only mode; for CUDA, load its CUDA runtime too (TVM
    skips it under TVM_USE_RUNTIME_LIB=1) after the bundle's libcudart."""
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    site = bundle / "site"
    if site.is_dir():
        sys.path.insert(0, str(site))
    import tvm  # noqa: PLC0415

    if device == "cuda":
        cudart = sorted((bundle / "lib").glob("libcudart.so*"))
        if cudart:  # the device's own would do too, but its path is not on the loader's list
            ctypes.CDLL(str(cudart[0]), mode=ctypes.RTLD_GLOBAL)
        lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return tvm


class KernelCache:
    """``tvm_callback_cuda_compile``: the fatbins compiled where the bundle was built."""

    def __init__(self, folder: Path, arch: str):
        self.folder = folder
        self.arch = arch
        self.hits = 0
        self.jit: list[str] = []

    def __call__(self, code) -> bytes:
        text = code if isinstance(code, str) else bytes(code).decode()
        key = hashlib.sha256(text.encode()).hexdigest()
        path = self.folder / f"{key}.fatbin"
        if path.is_file():
            self.hits += 1
            return path.read_bytes()
        self.jit.append(key[:16])
        with tempfile.TemporaryDirectory() as tmp:
            cu, out = Path(tmp) / "k.cu", Path(tmp) / "k.fatbin"
            cu.write_text(text)
            subprocess.run(["nvcc", "--fatbin", "-O3", f"-arch={self.arch}", str(cu), "-o", str(out)],
                           check=True, capture_output=True, timeout=600)
            return out.read_bytes()


def _device_arch(tvm, dev) -> str:
    return "sm_" + str(dev.compute_version).replace(".", "")


def _vm_output(out):
    if hasattr(out, "numpy"):
        return out.numpy()
    return out[0].numpy()


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.max(np.abs(ref))) or 1.0
    return float(np.max(np.abs(y.astype(np.float64) - ref.astype(np.float64)))) / scale


def run_library(tvm, dev, entry: dict, bundle: Path, x: np.ndarray, params: list[np.ndarray],
                ref: np.ndarray, number: int, repeat: int) -> dict:
    from tvm.runtime.vm import VirtualMachine  # noqa: PLC0415

    started = time.time()
    lib = tvm.runtime.load_module(str(bundle / entry["file"]))
    vm = VirtualMachine(lib, dev)
    args = [tvm.runtime.tensor(x, dev)] + [tvm.runtime.tensor(p, dev) for p in params]
    y = _vm_output(vm["main"](*args))
    err = rel_error(y, ref)
    vm.set_input("main", *args)
    timer = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat,
                              min_repeat_ms=entry.get("min_repeat_ms", 50))
    res = timer("main")
    times = [float(t) * 1e6 for t in res.results]
    return {"rel_error": err, "ok": bool(err < REL_TOL and np.all(np.isfinite(y))),
            "median_us": float(np.median(times)), "min_us": float(np.min(times)),
            "times_us": times, "load_and_run_s": time.time() - started}


# ------------------------------------------------------------------------------------- torch


def torch_forward(torch, graph: list[dict], weights: dict, x):
    """The dense model's ONNX graph (the few ops our models use) in PyTorch."""
    F = torch.nn.functional
    env = dict(weights)
    env["input"] = x
    for node in graph:
        op, a, ins = node["op"], node["attrs"], [env[i] for i in node["inputs"]]
        if op == "Conv":
            pads = a.get("pads", [0, 0, 0, 0])
            if pads[:2] != pads[2:]:
                raise ValueError("asymmetric padding")
            y = F.conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None, stride=a.get("strides", 1),
                         padding=pads[:2], dilation=a.get("dilations", 1), groups=a.get("group", 1))
        elif op == "MaxPool":
            pads = a.get("pads", [0, 0, 0, 0])
            y = F.max_pool2d(ins[0], a["kernel_shape"], a.get("strides", a["kernel_shape"]), pads[:2])
        elif op == "Relu":
            y = F.relu(ins[0])
        elif op == "Flatten":
            y = torch.flatten(ins[0], a.get("axis", 1))
        elif op == "Gemm":
            w = ins[1] if a.get("transB", 0) else ins[1].t()
            y = F.linear(ins[0], w, ins[2] if len(ins) > 2 else None)
        elif op == "MatMul":
            y = ins[0] @ ins[1]
        elif op == "Add":
            y = ins[0] + ins[1]
        else:
            raise ValueError(f"no PyTorch peer for ONNX op {op}")
        env[node["outputs"][0]] = y
    return env[graph[-1]["outputs"][0]]


def run_torch(model: dict, inits: dict, x: np.ndarray, ref: np.ndarray, device: str,
              iters: int) -> dict:
    import torch  # noqa: PLC0415

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as TVM computes it
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(device)
    w = {k: torch.from_numpy(v).to(dev) for k, v in inits.items()}
    xt = torch.from_numpy(x).to(dev)
    with torch.inference_mode():
        y = torch_forward(torch, model["graph"], w, xt).cpu().numpy()
        err = rel_error(y, ref)
        for _ in range(10):
            torch_forward(torch, model["graph"], w, xt)
        times = []
        for _ in range(5):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(iters):
                    torch_forward(torch, model["graph"], w, xt)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    torch_forward(torch, model["graph"], w, xt)
                times.append((time.perf_counter() - t0) * 1e6 / iters)
    return {"rel_error": err, "ok": bool(err < REL_TOL), "median_us": float(np.median(times)),
            "min_us": float(np.min(times)), "times_us": times, "torch": torch.__version__}


# -------------------------------------------------------------------------------------- main


def check_only(bundle: Path, manifest: dict) -> int:
    """Regenerate and rebuild every parameter of every library; report what differs."""
    started = time.time()
    seed = manifest["seed"]
    inits, bad = {}, []
    for name, model in manifest["models"].items():
        inits[name] = generate_initializers(model, seed)
        bad += [f"{name}:{i['name']}" for i in model["initializers"]
                if digest(inits[name][i["name"]]) != i["sha"]]
    arrays = Arrays(manifest, np.load(bundle / "data.npz"), inits)
    n = 0
    for entry in manifest["libraries"]:
        if digest(model_input(seed, entry["input"])) != entry["input"]["sha"]:
            bad.append(f"{entry['file']}: input")
        for key in entry["params"]:
            try:
                arrays.get(key)
                n += 1
            except Exception as err:
                bad.append(f"{entry['file']}: {err}")
    print(f"gpu_run: {len(manifest['libraries'])} libraries, {n} parameters rebuilt, "
          f"{len(bad)} differ from the build's; {time.time() - started:.0f} s")
    for line in bad:
        print(f"  differs: {line}")
    return 1 if bad else 0



def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=here)
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: $OUT/gpu_results.json "
                   "or BUNDLE/results.json)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: the bundle's")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--number", type=int, default=10)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--only", default=None, help="run only libraries whose file name contains this")
    p.add_argument("--check-only", action="store_true", help="only regenerate the weights and "
                   "rebuild every library's parameters, checking them (numpy only: no TVM, no device)")
    args = p.parse_args(argv)

    bundle = args.bundle.resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        print(f"gpu_run: error: {bundle}/manifest.json has format {manifest.get('format')}, "
              f"this runner reads {FORMAT}", file=sys.stderr)
        return 2
    if args.check_only:
        return check_only(bundle, manifest)
    device = args.device or manifest["device"]
    out = args.out or (Path(os.environ["OUT"]) / "gpu_results.json" if os.environ.get("OUT")
                       else bundle / "results.json")
    started = time.time()
    try:
        tvm = import_runtime(bundle, device)
    except OSError as err:  # no driver (libcuda.so.1), or a runtime built for another Python
        print(f"gpu_run: error: cannot load TVM's {device} runtime: {err}", file=sys.stderr)
        return 2
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    if not dev.exist:
        print(f"gpu_run: error: no {device} device visible to TVM's runtime", file=sys.stderr)
        return 2
    kernels = None
    info = {"python": sys.version.split()[0], "numpy": np.__version__, "tvm_file": tvm.__file__,
            "runtime_only": bool(getattr(tvm.base, "_RUNTIME_ONLY", False)),
            "compiler_loaded": _compiler_loaded(), "machine": platform.node(), "device": device}
    if device == "cuda":
        import tvm_ffi  # noqa: PLC0415

        info["arch"] = _device_arch(tvm, dev)
        try:
            info["device_name"] = str(dev.device_name)
        except Exception:  # the name is for the report only
            info["device_name"] = "CUDA device"
        kernels = KernelCache(bundle / "kernels", info["arch"])
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", kernels, override=True)
    print(f"gpu_run: {device} ({info.get('device_name', platform.processor())}), TVM runtime from "
          f"{Path(tvm.__file__).parent}, compiler loaded: {info['compiler_loaded']}", flush=True)

    seed = manifest["seed"]
    data = np.load(bundle / "data.npz")
    inits, checks = {}, []
    for name, model in manifest["models"].items():
        inits[name] = generate_initializers(model, seed)
        bad = [i["name"] for i in model["initializers"] if digest(inits[name][i["name"]]) != i["sha"]]
        checks.append({"model": name, "weights_match_build": not bad, "mismatched": bad})
    arrays = Arrays(manifest, data, inits)

    results, peers = [], []

    def save() -> None:
        """After every model: a crash in a later one (a driver fault) keeps what ran."""
        if kernels is not None:
            info["kernels_prebuilt"] = kernels.hits
            info["kernels_jit_on_device"] = kernels.jit
        info["seconds"] = time.time() - started
        report = {"format": FORMAT, "info": info, "bundle": manifest.get("built", {}),
                  "weights": checks, "results": results + peers}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))

    for entry in manifest["libraries"]:
        if args.only and args.only not in entry["file"]:
            continue
        model = manifest["models"][entry["model"]]
        x = model_input(seed, entry["input"])
        row = {k: entry[k] for k in ("model", "variant", "batch", "file", "kernel", "layers")
               if k in entry}
        row["input_matches_build"] = digest(x) == entry["input"]["sha"]
        try:
            params = [arrays.get(k) for k in entry["params"]]
            row.update(run_library(tvm, dev, entry, bundle, x, params, data[entry["reference"]],
                                   args.number, args.repeat))
        except Exception as err:  # one broken library must not hide the others' results
            row.update({"ok": False, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"})
        results.append(row)
        save()
        status = f"{row['median_us']:10.1f} us  rel.err {row['rel_error']:.1e}" if "median_us" in row \
            else row["error"]
        print(f"  {entry['model']:16s} {entry['variant']:16s} b{entry['batch']:<3d} "
              f"{'ok ' if row['ok'] else 'BAD'} {status}", flush=True)

    try:
        import torch  # noqa: F401, PLC0415
    except ImportError:
        print("gpu_run: no torch here: no PyTorch peer", flush=True)
        args.no_torch = True
    if not args.no_torch:
        for peer in manifest.get("peers", []):
            model = manifest["models"][peer["model"]]
            x = model_input(seed, peer["input"])
            row = {"model": peer["model"], "variant": "pytorch", "batch": peer["batch"]}
            try:
                row.update(run_torch(model, inits[peer["model"]], x, data[peer["reference"]], device,
                                     peer.get("iters", 50)))
            except Exception as err:
                row.update({"ok": False, "error": f"{type(err).__name__}: {err}"})
            peers.append(row)
            save()
            status = f"{row['median_us']:10.1f} us  rel.err {row['rel_error']:.1e}" if "median_us" in row \
                else row["error"]
            print(f"  {peer['model']:16s} {'pytorch':16s} b{peer['batch']:<3d} "
                  f"{'ok ' if row['ok'] else 'BAD'} {status}", flush=True)

    save()
    n_bad = sum(not r["ok"] for r in results + peers)
    print(f"gpu_run: {len(results)} libraries, {len(peers)} PyTorch peers, {n_bad} failed; "
          f"{info['seconds']:.0f} s; results in {out}")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
