#!/usr/bin/env python
"""Per-target benchmark: the paper's relative execution time table (dense, traditional, Scalpel).

For LeNet-300-100 and LeNet-5 (random weights from a fixed seed: timings do not depend on the
values) and each target — ``x86`` (this machine), ``aarch64`` (NEON, cross-compiled) and
``cuda`` — three models are made:

* dense: the unpruned model;
* traditional pruning: magnitude pruning of every layer, CONV included (g=1, CSR), at
  Han et al.'s kind of rates (see ``TRADITIONAL``), compiled with ``mode="sparse"``;
* Scalpel: the target's policy (``tvm_scalpel.policy.plan_layers``): node pruning (L1 norms, no
  data needed) where the rules say nodes, SIMD-aware weight pruning with g = the target's SIMD
  width where they say weights, compiled with ``mode="auto"``.

Every compiled model is checked against onnxruntime running the same ONNX model. On x86 each
is timed (relative execution time = time / dense TVM, the paper's measure; onnxruntime dense is
shown too). aarch64 runs under qemu through TVM RPC when ``make setup-arm`` was run: that checks
correctness; emulated time is not a speed figure, so the table gives size and error only. CUDA
compiles to PTX with nvcc; without a GPU (and a TVM build with the CUDA runtime) there is no
time. Results: ``targets.md`` and ``targets.png``.

Run: ``.venv/bin/python benchmarks/bench_targets.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import common  # noqa: I001  (imports tvm_scalpel first: thread pool size)
from common import (
    PythonSampler,
    check_close,
    fmt_bytes,
    fmt_us,
    machine_info,
    markdown_table,
    measure_rounds,
    ort_run,
    ort_samplers,
    ort_session,
    ort_sessions,
    pick_best_ort,
    rel_max_error,
    report_header,
    to_tvm,
    vm_output,
    vm_sampler,
    write_text,
)

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tvm_scalpel import ScalpelError, compile_onnx, models, prune_onnx, resolve_target
from tvm_scalpel.finetune import node_prune
from tvm_scalpel.format import GroupedSparseMatrix
from tvm_scalpel.kinds import KernelKind, LayerKind
from tvm_scalpel.policy import plan_layers
from tvm_scalpel.pruning import recover_group_width

log = logging.getLogger("bench.targets")

TARGETS = ("x86", "aarch64", "cuda")
BATCHES = (1, 16)


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str
    build: object  # seed -> onnx.ModelProto
    input_shape: tuple[int, ...]  # without the batch
    fc_rate: float  # weight pruning of FC layers (traditional and Scalpel)
    last_layer_rate: float  # the class-score layer
    conv_rate: float  # traditional pruning of CONV layers (Scalpel: only on low-parallelism targets)
    node_rates: dict[str, float]  # Scalpel's node pruning, per weight, where the policy says nodes


# Rates after Han et al. 2015 (LeNet-300-100: 92% of weights; LeNet-5: FC 90%/70%, CONV ~80%) and
# the node rates of benchmarks/results/avx512/accuracy.md (trained there with masks; L1 here).
SPECS = (
    ModelSpec("lenet300", "LeNet-300-100", lambda seed: models.lenet_300_100(seed=seed), (784,),
              0.92, 0.92, 0.0, {"fc1.weight": 0.5, "fc2.weight": 0.5}),
    ModelSpec("lenet5", "LeNet-5", lambda seed: models.lenet5(seed=seed), (1, 28, 28),
              0.9, 0.7, 0.8, {"conv1.weight": 0.3, "conv2.weight": 0.5, "fc1.weight": 0.5}),
)


@dataclass
class Variant:
    key: str  # "dense", "traditional", "scalpel"
    label: str
    model: onnx.ModelProto
    mode: str
    how: str  # what was done, for the table


@dataclass
class Result:
    spec: ModelSpec
    target: str
    variant: Variant
    weight_bytes: int
    kernels: str = ""
    error: float | None = None  # rel. max error vs onnxruntime on the same ONNX model
    status: str = ""  # what could not be done, and why
    times_us: dict[int, float] = field(default_factory=dict)  # batch -> median us (x86)
    native_us: dict[int, float] = field(default_factory=dict)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the FC and CONV weights as our kernels store them: a weight whose zeros form
    groups of g costs its grouped-sparse size (values + one index per group + row pointers;
    g=1 is CSR), a weight without zeros its dense size."""
    total = 0
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) not in (2, 4):
            continue
        w = numpy_helper.to_array(init)
        w = w.reshape(w.shape[0], -1)
        if np.all(w != 0):
            total += w.nbytes
            continue
        g = recover_group_width(w, tuple(c for c in (32, 16, 8, 4, 2) if c <= w.shape[1]))
        total += min(GroupedSparseMatrix.from_dense(w, g).nbytes, w.nbytes)
    return total


def variants(spec: ModelSpec, target: str, seed: int) -> list[Variant]:
    profile = resolve_target(target)
    dense = spec.build(seed)
    traditional = prune_onnx(dense, spec.fc_rate, profile, 1, last_layer_rate=spec.last_layer_rate,
                             conv_rate=spec.conv_rate or None).model
    plans = plan_layers(dense, profile)
    nodes = {p.name: spec.node_rates[p.name] for p in plans if p.method == "nodes" and p.name in spec.node_rates}
    scalpel, how = dense, []
    if nodes:
        scalpel = node_prune(dense, nodes, criterion="l1").model
        how.append("nodes " + ", ".join(f"{n.split('.')[0]} {r:.0%}" for n, r in nodes.items()))
    fc_weights = any(p.method == "weights" and p.kind is LayerKind.FC for p in plans)
    conv_weights = any(p.method == "weights" and p.kind is LayerKind.CONV for p in plans)
    if fc_weights or conv_weights:
        g = profile.simd_width
        scalpel = prune_onnx(scalpel, spec.fc_rate if fc_weights else 0.0, profile, g,
                             last_layer_rate=spec.last_layer_rate if fc_weights else None,
                             conv_rate=spec.conv_rate if conv_weights else None).model
        how.append(f"weights g={g}: " + ("FC" if fc_weights else "") + (" + CONV" if conv_weights else ""))
    trad_how = f"g=1: FC {spec.fc_rate:.0%} (last {spec.last_layer_rate:.0%})" + (
        f", CONV {spec.conv_rate:.0%}" if spec.conv_rate else "")
    return [
        Variant("dense", "dense", dense, "dense", "unpruned"),
        Variant("traditional", "traditional pruning", traditional, "sparse", trad_how),
        Variant("scalpel", f"Scalpel ({profile.parallelism} parallelism)", scalpel, "auto",
                "; ".join(how) or "nothing to prune"),
    ]


def kernel_summary(layers) -> str:
    parts = []
    for d in layers:
        kind = f"sparse g={d.group_width}" if d.kernel is KernelKind.SPARSE else d.kernel.short
        parts.append(f"{d.kind} {d.shape[0]}x{d.shape[1]}: {kind}")
    return "; ".join(parts)


def inputs(spec: ModelSpec, batches, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    return {b: rng.standard_normal((b, *spec.input_shape)).astype(np.float32) for b in batches}


# ------------------------------------------------------------------------------------- targets


def run_x86(spec: ModelSpec, args, cfg, bar) -> tuple[list[Result], dict[int, common.OrtBest]]:
    xs = inputs(spec, args.batches, args.seed)
    results, samplers = [], {}
    dense_model = None
    for v in variants(spec, "x86", args.seed):
        dense_model = dense_model or v.model
        built = compile_onnx(v.model, "x86", mode=v.mode)
        vm = tvm.relax.VirtualMachine(built.executable, tvm.cpu())
        r = Result(spec, "x86", v, weight_bytes(v.model), kernel_summary(built.layers))
        sess = ort_session(v.model, 1)
        errors = []
        for b, x in xs.items():
            xt = to_tvm(x)
            errors.append(check_close(f"{spec.title} {v.key} x86 b={b}", vm_output(vm["main"](xt)),
                                      ort_run(sess, x)))
            samplers[(v.key, b, "python")] = PythonSampler((lambda f, t: lambda: f(t))(vm["main"], xt), "tvm")
            samplers[(v.key, b, "native")] = vm_sampler(vm, xt)
        r.error = max(errors)
        results.append(r)
        bar.update(1)
    sessions = ort_sessions(dense_model, (1, 2))
    for b, x in xs.items():
        ort, _ = ort_samplers(sessions, x, style="iobinding")
        for t, sampler in ort.items():
            samplers[("onnxruntime", b, t)] = sampler
    timings = measure_rounds(samplers, cfg, f"{spec.title} x86", seed=args.seed)
    for r in results:
        for b in args.batches:
            r.times_us[b] = timings[(r.variant.key, b, "python")].median_us
            r.native_us[b] = timings[(r.variant.key, b, "native")].median_us
    ort_best = {b: pick_best_ort({t: timings[("onnxruntime", b, t)] for t in (1, 2)}) for b in args.batches}
    return results, ort_best


def run_aarch64(spec: ModelSpec, args, server: str | None, why_not: str | None, bar) -> list[Result]:
    from tvm_scalpel.api import export_library
    from tvm_scalpel.remote import run_remote

    results = []
    x = inputs(spec, (1,), args.seed)[1]
    for v in variants(spec, "aarch64", args.seed):
        built = compile_onnx(v.model, "aarch64", mode=v.mode)
        r = Result(spec, "aarch64", v, weight_bytes(v.model), kernel_summary(built.layers))
        if server is None:
            r.status = f"not run: {why_not}"
        else:
            with tempfile.TemporaryDirectory() as tmp:
                lib = Path(tmp) / f"{spec.key}_{v.key}.so"
                export_library(built.executable, lib, resolve_target("aarch64"))
                if args.rpc:  # a real board: its times are speed figures
                    out, seconds = run_remote(server, lib, x, min_repeat_ms=int(args.min_repeat_ms))
                    r.native_us[1] = seconds * 1e6
                else:
                    out = run_remote(server, lib, x)
            r.error = rel_max_error(out, ort_run(ort_session(v.model, 1), x))
            if r.error > common.REL_TOL:
                raise common.AccuracyError(f"{spec.title} {v.key} on aarch64: rel. error {r.error:.1e}")
            r.status = (f"ran on the RPC server {args.rpc}, batch 1: {fmt_us(r.native_us[1])} us"
                        if args.rpc else "ran under qemu-aarch64 through TVM RPC")
        results.append(r)
        bar.update(1)
    return results


def run_cuda(spec: ModelSpec, args, bar) -> list[Result]:
    import shutil

    from tvm_scalpel.schedules.toolchains import to_ptx

    results = []
    for v in variants(spec, "cuda", args.seed):
        built = compile_onnx(v.model, "cuda", mode=v.mode)
        r = Result(spec, "cuda", v, weight_bytes(v.model), kernel_summary(built.layers))
        if shutil.which("nvcc") is None:
            r.status = "compiled to CUDA source (nvcc not installed: no PTX)"
        else:
            ptx = to_ptx(built.executable, "sm_80")
            r.status = f"compiled to PTX ({ptx.count('.entry')} kernels); no GPU here: not run"
        results.append(r)
        bar.update(1)
    return results


# ------------------------------------------------------------------------------------- report


def x86_table(results: list[Result], ort: dict[int, common.OrtBest], batches) -> str:
    dense = next(r for r in results if r.variant.key == "dense")
    headers = ["model", "pruning"]
    for b in batches:
        headers += [f"batch {b}: us", f"batch {b}: rel. to dense TVM", f"batch {b}: rel. to onnxruntime"]
    headers += ["weight bytes", "max rel. error"]
    rows = [["onnxruntime dense", "unpruned"] + sum(
        ([fmt_us(ort[b].timing.median_us), "", "1.00"] for b in batches), []) + [fmt_bytes(dense.weight_bytes), ""]]
    for r in results:
        row = [r.variant.label, r.variant.how]
        for b in batches:
            row += [fmt_us(r.times_us[b]), f"**{r.times_us[b] / dense.times_us[b]:.2f}**",
                    f"{r.times_us[b] / ort[b].timing.median_us:.2f}"]
        row += [f"{fmt_bytes(r.weight_bytes)} ({r.weight_bytes / dense.weight_bytes:.2f}x)", f"{r.error:.1e}"]
        rows.append(row)
    return markdown_table(headers, rows)


def other_table(results: list[Result]) -> str:
    dense = next(r for r in results if r.variant.key == "dense")
    rows = [[r.variant.label, r.variant.how,
             f"{fmt_bytes(r.weight_bytes)} ({r.weight_bytes / dense.weight_bytes:.2f}x)",
             "–" if r.error is None else f"{r.error:.1e}", r.status, r.kernels] for r in results]
    headers = ["model", "pruning", "weight bytes", "max rel. error", "run", "kernels"]
    if all(1 in r.native_us for r in results):  # timed on a real board (--rpc)
        headers.insert(2, "batch 1: rel. to dense TVM")
        for row, r in zip(rows, results):
            row.insert(2, f"**{r.native_us[1] / dense.native_us[1]:.2f}**")
    return markdown_table(headers, rows)


def write_report(args, info, sections: list[tuple[ModelSpec, str, list[Result], dict]], elapsed: float) -> str:
    parts = [
        *report_header("Per-target benchmark: relative execution time of dense, traditional and Scalpel",
                       "bench_targets.py", elapsed, info),
        "## Method",
        "",
        "- Models: `tvm_scalpel.models.lenet_300_100()` and `lenet5()` (Caffe LeNet-5), random "
        f"weights (seed {args.seed}); timings and sizes do not depend on the values (accuracy: "
        "`accuracy.md`).",
        "- dense: the unpruned model on our dense kernels (conv layers as im2col + our dense "
        "kernel). traditional: magnitude pruning (g=1, CSR) of every layer, CONV included, "
        "compiled with every layer with zeros on the sparse kernel. Scalpel: the target's policy "
        "(`plan_layers`): node pruning (L1) where it says nodes, SIMD-aware weight pruning with "
        "g = SIMD width where it says weights, the cost model choosing sparse or dense per layer.",
        "- Relative execution time = time / dense TVM time on the same target (the paper's "
        "measure; < 1 is faster); onnxruntime dense (the faster of 1 and 2 threads, "
        "`run_with_iobinding`) is shown as well. TVM times: `vm['main'](x)` per call from Python, "
        f"median of {args.repeat} interleaved rounds of at least {args.min_repeat_ms:g} ms each.",
        "- Weight bytes: FC and CONV weights as the kernels store them (grouped-sparse: values + "
        "one int32 index per group + row pointers; a smaller node-pruned layer is dense).",
        "- Every compiled model is checked against onnxruntime on the same ONNX model. aarch64 "
        "runs under `qemu-aarch64` through TVM RPC (`make setup-arm`): correct results, but "
        "emulated time is not a speed figure. CUDA compiles to PTX; no GPU was lent to this run.",
        "",
        "![relative execution time](targets.png)",
        "",
    ]
    for spec, target, results, ort in sections:
        parts += [f"## {spec.title} on {target}", ""]
        parts += [x86_table(results, ort, args.batches) if target == "x86" else other_table(results), ""]
        if target == "x86":
            parts += ["Kernels: " + "; ".join(f"{r.variant.key}: {r.kernels}" for r in results), ""]
    text = "\n".join(parts)
    write_text(args.out_dir / "targets.md", text)
    return text


def plot(path: Path, sections, batches) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x86 = [(spec, results, ort) for spec, target, results, ort in sections if target == "x86"]
    fig, axes = plt.subplots(1, len(x86), figsize=(5.2 * len(x86), 3.8), squeeze=False)
    colors = {"onnxruntime": "tab:gray", "dense": "black", "traditional": "tab:blue", "scalpel": "tab:red"}
    for ax, (spec, results, ort) in zip(axes[0], x86):
        dense = next(r for r in results if r.variant.key == "dense")
        width = 0.8 / (len(results) + 1)
        for i, key in enumerate(["onnxruntime"] + [r.variant.key for r in results]):
            ys = [(ort[b].timing.median_us if key == "onnxruntime" else
                   next(r for r in results if r.variant.key == key).times_us[b]) / dense.times_us[b]
                  for b in batches]
            xs = np.arange(len(batches)) + (i - len(results) / 2) * width
            labels = {"onnxruntime": "onnxruntime dense", "dense": "dense TVM (ours)",
                      "traditional": "traditional (g=1)", "scalpel": "Scalpel"}
            bars = ax.bar(xs, ys, width, label=labels[key], color=colors[key])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(batches)), [f"batch {b}" for b in batches])
        ax.set_title(f"{spec.title}, x86 (this machine)", fontsize=10)
        ax.set_ylabel("time relative to dense TVM")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Relative execution time per model (lower is better)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few repeats, results in "
                        "benchmarks/results/<machine class>/quick unless --out-dir is given")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--models", nargs="+", choices=[s.key for s in SPECS], default=[s.key for s in SPECS])
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rpc", default=None, metavar="ADDRESS",
                        help="an aarch64 board's TVM RPC server (HOST:PORT or "
                             "tracker://HOST:PORT/KEY): run and time the aarch64 models there "
                             "instead of under qemu (whose time is not a speed figure)")
    common.add_timing_args(parser, repeat=7, min_repeat_ms=40.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.min_repeat_ms = min(args.repeat, 2), min(args.min_repeat_ms, 5.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    cfg = common.apply_timing_args(args)
    started = time.perf_counter()
    specs = [s for s in SPECS if s.key in args.models]
    sections = []
    from contextlib import ExitStack

    from tvm_scalpel.emulation import arm_ready, qemu_rpc_server

    with ExitStack() as stack, logging_redirect_tqdm(), \
            tqdm(total=3 * len(specs) * len(args.targets), desc="targets", unit="model") as bar:
        server = why_not = None
        if "aarch64" in args.targets and args.rpc:
            server = args.rpc
        elif "aarch64" in args.targets:
            why_not = arm_ready()
            if why_not is None:
                server = stack.enter_context(qemu_rpc_server())
        for spec in specs:
            for target in args.targets:
                bar.set_postfix_str(f"{spec.title} {target}")
                if target == "x86":
                    results, ort = run_x86(spec, args, cfg, bar)
                elif target == "aarch64":
                    results, ort = run_aarch64(spec, args, server, why_not, bar), {}
                else:
                    results, ort = run_cuda(spec, args, bar), {}
                sections.append((spec, target, results, ort))
    elapsed = time.perf_counter() - started
    text = write_report(args, machine_info(resolve_target("x86")), sections, elapsed)
    if "x86" in args.targets:
        plot(args.out_dir / "targets.png", sections, args.batches)
    print(text)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ScalpelError as err:
        raise SystemExit(f"error: {err}")
