#!/usr/bin/env python
"""Per-layer kernel benchmark: Scalpel's grouped-sparse kernel against CSR and dense baselines.

For each layer (AlexNet fc6/fc7, LeNet-300-100 fc1/fc2), pruning rate and batch size, random
float32 weights (fixed seed) are pruned with ``prune_groups(W, g, rate)``: g = the target's SIMD
width (16 with AVX-512) for Scalpel, g = 1 for traditional (unstructured) pruning. Contenders:

* ours: the grouped-sparse kernel, g = SIMD width, on the g-pruned matrix;
* CSR (ours): the same kernel with g = 1 on the g=1-pruned matrix;
* scipy CSR: ``scipy.sparse.csr_matrix @ x.T`` on the g=1-pruned matrix;
* dense TVM: our scheduled dense kernel on panel-packed weights (``schedules.dense(packed=True)``, as ``compile`` uses it);
* TVM default: a single-Gemm ONNX model through ``from_onnx`` + ``tvm.compile`` (untuned);
* onnxruntime dense: the same Gemm model (faster of 1 and 2 intra-op threads) — the reference;
* numpy dense: ``x @ W.T + b``.

Dense contenders do not depend on the rate and are measured once per (layer, batch). Every
output is checked against numpy float64 before it is timed. Results: ``kernels.md`` and
``kernels.png`` in the output directory (by default ``benchmarks/results/<machine class>``,
e.g. ``avx2``, named from the host's target profile).

Run: ``.venv/bin/python benchmarks/bench_kernels.py`` (about 6 minutes on 2 otherwise idle
cores; 2 of them go to ``prune_groups(W, 1, rate)`` on fc6/fc7) or with ``--quick`` for a smoke
run (about a minute, written to ``benchmarks/results/<machine class>/quick``). Timings are taken
in interleaved rounds and rounds disturbed by other processes are replaced (see ``common.measure_rounds``).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import common  # noqa: I001  (imports tvm_scalpel first: thread pool size)
from common import (
    Panel,
    PythonSampler,
    Sampler,
    Series,
    Timing,
    TimingConfig,
    TvmSampler,
    check_close,
    compile_tvm_default,
    fmt_bytes,
    fmt_rel,
    fmt_us,
    machine_info,
    markdown_table,
    measure_quietly,
    measure_rounds,
    ort_samplers,
    ort_sessions,
    pick_best_ort,
    plot_relative,
    report_header,
    time_single,
    to_tvm,
    vm_output,
    vm_sampler,
    write_text,
)

import numpy as np
import onnx
import scipy.sparse
import tvm
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tvm_scalpel import GroupedSparseMatrix, prune_groups, resolve_target, schedules
from tvm_scalpel.models import IR_VERSION, OPSET
from tvm_scalpel.targets import TargetProfile

log = logging.getLogger("bench.kernels")


@dataclass(frozen=True)
class Layer:
    name: str
    net: str
    n: int  # outputs
    k: int  # inputs

    @property
    def title(self) -> str:
        return f"{self.net} {self.name} ({self.n}x{self.k})"


LAYERS = {
    "fc6": Layer("fc6", "AlexNet", 4096, 9216),
    "fc7": Layer("fc7", "AlexNet", 4096, 4096),
    "fc1": Layer("fc1", "LeNet-300-100", 300, 784),
    "fc2": Layer("fc2", "LeNet-300-100", 100, 300),
}
RATES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97)
BATCHES = (1, 16)

# Contender keys, in table order.
OURS, CSR_OURS, SCIPY, DENSE_TVM, TVM_DEFAULT, ORT, NUMPY = (
    "ours", "csr_ours", "scipy", "dense_tvm", "tvm_default", "ort", "numpy")
SPARSE_KEYS = (OURS, CSR_OURS, SCIPY)
DENSE_KEYS = (DENSE_TVM, TVM_DEFAULT, ORT, NUMPY)


def contender_label(key: str, g: int, ort_threads: int | None = None) -> str:
    return {
        OURS: f"ours: grouped-sparse g={g}",
        CSR_OURS: "CSR, our kernel (g=1)",
        SCIPY: "scipy CSR (g=1)",
        DENSE_TVM: "dense TVM (our schedule)",
        TVM_DEFAULT: "TVM default dense (untuned)",
        ORT: f"onnxruntime dense ({ort_threads} thr)" if ort_threads else "onnxruntime dense",
        NUMPY: "numpy dense (x @ W.T)",
    }[key]


@dataclass
class RateInfo:
    achieved_g: float  # achieved rate with g = SIMD width
    achieved_1: float  # achieved rate with g = 1
    bytes_g: int
    bytes_1: int
    parallel_g: bool  # our kernel spreads rows over threads


@dataclass
class LayerResults:
    layer: Layer
    dense: dict[int, dict[str, Timing]] = field(default_factory=dict)  # batch -> key -> timing
    sparse: dict[int, dict[float, dict[str, Timing]]] = field(default_factory=dict)
    ort_threads: dict[int, int] = field(default_factory=dict)
    ort_all: dict[int, dict[int, Timing]] = field(default_factory=dict)
    rates: dict[float, RateInfo] = field(default_factory=dict)
    max_error: float = 0.0

    def ort_us(self, batch: int) -> float:
        return self.dense[batch][ORT].median_us

    def rel(self, batch: int, timing: Timing | None) -> float | None:
        return None if timing is None else timing.median_us / self.ort_us(batch)


# ------------------------------------------------------------------------------------------------
# Building the contenders
# ------------------------------------------------------------------------------------------------


def gemm_model(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """One ONNX ``Gemm(transB=1)``: ``y = x @ W.T + b`` with a symbolic batch."""
    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "weight", "bias"], ["output"], transB=1)],
        "single_gemm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "weight"), numpy_helper.from_array(b, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION  # onnxruntime reads IR <= 13
    return model


def compile_prim_func(func: tvm.tirx.PrimFunc, profile: TargetProfile) -> tvm.runtime.Module:
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=profile.target).mod


class KernelRunner:
    """A compiled kernel with its constant operands; runs on any batch."""

    def __init__(self, mod: tvm.runtime.Module, operands: list[np.ndarray], n: int) -> None:
        self.mod = mod
        self.operands = [to_tvm(a) for a in operands]
        self.n = n

    def args(self, x: np.ndarray) -> list[Any]:
        y = to_tvm(np.zeros((x.shape[0], self.n), np.float32))
        return [to_tvm(x), *self.operands, y]

    def run(self, args: list[Any]) -> np.ndarray:
        self.mod["main"](*args)
        return args[-1].numpy()


def grouped_sparse_runner(profile: TargetProfile, w: np.ndarray, b: np.ndarray, g: int
                          ) -> tuple[KernelRunner, GroupedSparseMatrix, bool]:
    n, k = w.shape
    m = GroupedSparseMatrix.from_dense(w, g)
    packed = schedules.pack_grouped_sparse(m)
    knobs = schedules.default_knobs(profile, m.n_groups * g)
    func = schedules.grouped_sparse_dense(profile, n, k, g, m.n_groups, relu=False, knobs=knobs)
    values = packed.values if m.n_groups else np.zeros((1, g), np.float32)
    offsets = packed.offsets if m.n_groups else np.zeros(1, np.int32)
    runner = KernelRunner(compile_prim_func(func, profile), [values, offsets, packed.indptr, b], n)
    return runner, m, knobs.parallel_gemv


def adapt(cfg: TimingConfig, single_call_s: float, budget_s: float = 3.0) -> TimingConfig:
    """Fewer repeats for very slow calls (TVM's untuned dense takes seconds on fc6)."""
    if single_call_s * cfg.repeat <= budget_s:
        return cfg
    return TimingConfig(max(1, min(cfg.repeat, int(budget_s / single_call_s))), 0.0)


def timed_first_call(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------


def bench_layer(layer: Layer, rates: tuple[float, ...], batches: tuple[int, ...],
                tvm_default_batches: tuple[int, ...], cfg: TimingConfig, profile: TargetProfile,
                seed: int, tick: Callable[[str], None]) -> LayerResults:
    """Build and check every contender of one layer, then time them all in interleaved rounds."""
    g = profile.simd_width
    rng = np.random.default_rng([seed, layer.n, layer.k])
    w = (rng.standard_normal((layer.n, layer.k)) / np.sqrt(layer.k)).astype(np.float32)
    b = (rng.standard_normal(layer.n) * 0.05).astype(np.float32)
    xs = {bs: rng.standard_normal((bs, layer.k)).astype(np.float32) for bs in batches}
    res = LayerResults(layer)
    samplers: dict[tuple, Sampler] = {}  # (contender, batch, rate or None) -> sampler

    def check(name: str, got: np.ndarray, ref: np.ndarray) -> None:
        res.max_error = max(res.max_error, check_close(f"{layer.name} {name}", got, ref))

    def reference(weight: np.ndarray, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64) @ weight.astype(np.float64).T + b.astype(np.float64)

    # ---- dense contenders (rate-independent) --------------------------------------------------
    model = gemm_model(w, b)
    dense_spec = schedules.layer_spec(profile, layer.n, layer.k, False, packed=True)  # as compile does
    dense_tvm = KernelRunner(compile_prim_func(schedules.kernel(profile, [dense_spec]), profile),
                             schedules.pack_dense(dense_spec, w, b), layer.n)
    default_vm = compile_tvm_default(model, profile.target) if tvm_default_batches else None
    sessions = ort_sessions(model, (1, 2))
    for bs in batches:
        x = xs[bs]
        ref = reference(w, x)
        ort, ort_out = ort_samplers(sessions, x, style="run")
        check("onnxruntime", ort_out, ref)
        for t, sampler in ort.items():
            samplers[(ORT, bs, t)] = sampler
        check("numpy", x @ w.T + b, ref)
        samplers[(NUMPY, bs, None)] = PythonSampler((lambda x: lambda: x @ w.T + b)(x), "numpy")
        args = dense_tvm.args(x)
        check("dense TVM", dense_tvm.run(args), ref)
        samplers[(DENSE_TVM, bs, None)] = TvmSampler(dense_tvm.mod, "main", args)
        if default_vm is not None and bs in tvm_default_batches:
            # Seconds per call on the AlexNet layers: timed alone, not in the rounds.
            xt = to_tvm(x)
            out, took = timed_first_call(lambda: vm_output(default_vm["main"](xt)))
            check("TVM default", out, ref)
            slow_cfg = adapt(cfg, took)
            res.dense.setdefault(bs, {})[TVM_DEFAULT] = measure_quietly(
                lambda: time_single(vm_sampler(default_vm, xt), slow_cfg),
                f"{layer.name} b={bs} TVM default", retries=0 if took > 1.0 else None)
            tick(f"{layer.name} TVM default b={bs} timed")
    del default_vm
    tick(f"{layer.name} dense contenders ready")

    # ---- sparse contenders, per rate ---------------------------------------------------------
    for rate in rates:
        pg = prune_groups(w, g, rate)
        p1 = prune_groups(w, 1, rate)
        ours, m_g, parallel = grouped_sparse_runner(profile, pg.weight, b, g)
        csr_ours, m_1, _ = grouped_sparse_runner(profile, p1.weight, b, 1)
        csr = scipy.sparse.csr_matrix((m_1.values[:, 0], m_1.group_cols, m_1.indptr), shape=w.shape)
        res.rates[rate] = RateInfo(pg.rate, p1.rate, m_g.nbytes, m_1.nbytes, parallel)
        for bs in batches:
            x = xs[bs]
            ref_g, ref_1 = reference(pg.weight, x), reference(p1.weight, x)
            args_g, args_1 = ours.args(x), csr_ours.args(x)
            check(f"ours g={g} rate {rate}", ours.run(args_g), ref_g)
            check(f"CSR ours rate {rate}", csr_ours.run(args_1), ref_1)
            xt = x.T
            check(f"scipy CSR rate {rate}", (csr @ xt).T + b, ref_1)
            samplers[(OURS, bs, rate)] = TvmSampler(ours.mod, "main", args_g)
            samplers[(CSR_OURS, bs, rate)] = TvmSampler(csr_ours.mod, "main", args_1)
            samplers[(SCIPY, bs, rate)] = PythonSampler((lambda c, v: lambda: c @ v)(csr, xt), "scipy")
        del pg, p1, m_g, m_1
        tick(f"{layer.name} rate {rate} ready")

    # ---- every contender, interleaved rounds -------------------------------------------------
    timings = measure_rounds(samplers, cfg, f"{layer.name} kernels", seed=seed,
                             progress=lambda: tick(f"{layer.name} timing"))
    for (key, bs, extra), t in timings.items():
        if key == ORT:
            res.ort_all.setdefault(bs, {})[extra] = t
        elif extra is None:
            res.dense.setdefault(bs, {})[key] = t
        else:
            res.sparse.setdefault(bs, {}).setdefault(extra, {})[key] = t
    for bs in batches:
        best = pick_best_ort(res.ort_all[bs])
        res.dense[bs][ORT] = best.timing
        res.ort_threads[bs] = best.threads
        d = res.dense[bs]
        log.info("%s b=%d dense: ORT %s us (%d thr), dense TVM %s, numpy %s", layer.name, bs,
                 fmt_us(d[ORT].median_us), best.threads, fmt_us(d[DENSE_TVM].median_us),
                 fmt_us(d[NUMPY].median_us))
        for rate in rates:
            t = res.sparse[bs][rate]
            log.info("%s rate %.2f b=%d: ours %s (%s ORT), CSR ours %s, scipy %s", layer.name, rate,
                     bs, fmt_us(t[OURS].median_us), fmt_rel(res.rel(bs, t[OURS])),
                     fmt_us(t[CSR_OURS].median_us), fmt_us(t[SCIPY].median_us))
    return res


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def cell(res: LayerResults, batch: int, timing: Timing | None) -> str:
    if timing is None:
        return "–"
    mark = "*" if timing.disturbed else ""
    return f"{fmt_us(timing.median_us)}{mark} ({fmt_rel(res.rel(batch, timing))})"


def layer_table(res: LayerResults, batch: int, g: int, rates: tuple[float, ...]) -> str:
    headers = ["contender", "dense", *[f"rate {r:g}" for r in rates]]
    rows = []
    dense = res.dense[batch]
    for key in DENSE_KEYS:
        label = contender_label(key, g, res.ort_threads[batch] if key == ORT else None)
        rows.append([label, cell(res, batch, dense.get(key)), *["" for _ in rates]])
    sparse = res.sparse.get(batch, {})
    for key in SPARSE_KEYS:
        rows.append([contender_label(key, g), "", *[cell(res, batch, sparse[r][key]) for r in rates]])
    rows.append(["ours vs scipy CSR (speed-up)", "",
                 *[f"{sparse[r][SCIPY].median_us / sparse[r][OURS].median_us:.1f}x" for r in rates]])
    rows.append(["ours vs dense TVM (speed-up)", "",
                 *[f"{dense[DENSE_TVM].median_us / sparse[r][OURS].median_us:.1f}x" for r in rates]])
    dense_bytes = res.layer.n * res.layer.k * 4
    rows.append([f"weight bytes g={g} / g=1 (dense {fmt_bytes(dense_bytes)})", "",
                 *[f"{res.rates[r].bytes_g / dense_bytes:.2f} / {res.rates[r].bytes_1 / dense_bytes:.2f}"
                   for r in rates]])
    rows.append([f"our g={g} kernel: rows in parallel", "",
                 *["yes" if res.rates[r].parallel_g else "no" for r in rates]])
    return markdown_table(headers, rows)


def key_numbers(results: dict[str, LayerResults], g: int) -> list[str]:
    lines = []
    fc6 = results.get("fc6")
    if fc6 and 1 in fc6.sparse and 0.9 in fc6.sparse[1]:
        t = fc6.sparse[1][0.9]
        rel = fc6.rel(1, t[OURS])
        vs_scipy = t[SCIPY].median_us / t[OURS].median_us
        lines.append(
            f"- AlexNet fc6, rate 0.9, batch 1, g={g}: ours {fmt_us(t[OURS].median_us)} us = "
            f"**{rel:.3f}x onnxruntime dense** (goal <= 0.15x: {'met' if rel <= 0.15 else 'NOT met'}); "
            f"**{vs_scipy:.1f}x faster than scipy CSR** (goal >= 2x: {'met' if vs_scipy >= 2 else 'NOT met'})."
        )
    else:
        lines.append("- (fc6 at rate 0.9, batch 1 was not part of this run: no goal check.)")
    return lines


def write_report(results: dict[str, LayerResults], args: argparse.Namespace, info: dict[str, str],
                 g: int, out_dir: Path, elapsed: float) -> str:
    rates = tuple(args.rates)
    parts = [
        *report_header("Kernel benchmark: grouped-sparse (Scalpel) vs CSR vs dense",
                       "bench_kernels.py", elapsed, info),
        "## Key numbers",
        "",
        *key_numbers(results, g),
        "",
        "## Method",
        "",
        f"- Weights: random float32 `W[N, K]` (normal, scaled 1/sqrt(K); seed {args.seed}), a random "
        f"bias, inputs `x[B, K]`. Every contender computes `y = x @ W.T + b` "
        "(scipy CSR: `csr @ x.T`, without the bias).",
        f"- Pruning: `prune_groups(W, {g}, rate)` for ours (g = the target's fp32 SIMD width), "
        "`prune_groups(W, 1, rate)` for traditional pruning (CSR, our kernel with g=1, and scipy).",
        "- Every output is checked against numpy float64 (relative max error "
        f"max|y - ref| / max|ref| < {common.REL_TOL:g}; largest seen: "
        f"{max(r.max_error for r in results.values()):.1e}) before it is timed.",
        f"- Times, in microseconds per call: every contender of a layer is timed in {args.repeat} "
        f"interleaved rounds; in each round it runs for at least {args.min_repeat_ms:g} ms after a "
        "warm-up call. Contenders are grouped by runtime (TVM, scipy, numpy, each onnxruntime "
        "session) with a "
        f"{common.COOLDOWN_S:g} s pause between groups, so that one runtime's spinning threads do "
        "not slow down the next, and go in random order within a group. Reported: the median "
        "over rounds. Our kernels: TVM's C++ time evaluator (output buffer preallocated). scipy, "
        "numpy, onnxruntime: a Python loop (`session.run` with numpy in/out for onnxruntime). "
        "TVM default: timed on its own through the Relax VM's `invoke_stateful` (fewer repeats "
        "when one call takes seconds).",
        "- onnxruntime dense: a single `Gemm(transB=1)` ONNX model, the faster of "
        "`intra_op_num_threads` 1 and 2 (thread count in the row label). The same model through "
        "`from_onnx` + `tvm.compile` (default Relax pipeline, no tuning) is 'TVM default dense'.",
        "- In parentheses: **relative execution time** = time / onnxruntime dense time (the paper's "
        "metric; < 1 is faster than onnxruntime). Dense contenders do not depend on the rate and "
        "are measured once per layer and batch ('dense' column).",
        "- Other processes share this machine: each round watches the CPU time they take "
        f"(/proc/stat) and is replaced when they used more than {common.FOREIGN_LOAD_LIMIT:g} "
        f"cores meanwhile. This run: {common.NOISE.summary()}.",
        f"- Our kernels use `schedules.default_knobs`: rows go parallel (TVM's pool, "
        f"{info['TVM threads']} threads) when a row holds >= {schedules.PARALLEL_MIN_MACS:,} "
        "multiply-adds; see the last row of each table.",
        "",
        f"![relative execution time](kernels.png)",
        "",
    ]
    for name, res in results.items():
        for bs in args.batches:
            parts += [f"## {res.layer.title}, batch {bs}", "", layer_table(res, bs, g, rates), ""]
            others = ", ".join(f"{t} thr {fmt_us(tm.median_us)} us" for t, tm in res.ort_all[bs].items())
            parts += [f"onnxruntime dense by thread count: {others}.", ""]
    text = "\n".join(parts)
    write_text(out_dir / "kernels.md", text)
    return text


def plot(results: dict[str, LayerResults], batches: tuple[int, ...], rates: tuple[float, ...],
         g: int, path: Path, ymax: float) -> None:
    grid = []
    for bs in batches:
        row = []
        for res in results.values():
            rel = lambda key: [res.rel(bs, res.sparse[bs][r][key]) for r in rates]  # noqa: E731
            dense_rel = res.rel(bs, res.dense[bs][DENSE_TVM])
            row.append(Panel(f"{res.layer.title}, batch {bs}", [
                Series(contender_label(OURS, g), rates, rel(OURS), {"color": "tab:red", "lw": 2}),
                Series(contender_label(CSR_OURS, g), rates, rel(CSR_OURS), {"color": "tab:blue"}),
                Series(contender_label(SCIPY, g), rates, rel(SCIPY), {"color": "tab:green", "ls": "-."}),
                Series(contender_label(DENSE_TVM, g), rates, [dense_rel] * len(rates),
                       {"color": "tab:gray", "ls": ":", "marker": None}),
            ]))
        grid.append(row)
    plot_relative(path, grid, suptitle="Dense-layer kernels: time relative to onnxruntime dense "
                  f"(lower is better; g={g} = fp32 SIMD width)", ymax=ymax)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-layer kernel benchmark: grouped-sparse (Scalpel, g = SIMD width) vs CSR "
                    "(our kernel with g=1, scipy) vs dense (TVM, onnxruntime, numpy).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fc7, fc1, fc2 at rates 0.7 and 0.9, few repeats; results go "
                             "to benchmarks/results/<machine class>/quick unless --out-dir is given")
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--tvm-default-batches", nargs="*", type=int, default=list(BATCHES),
                        help="batches at which TVM's untuned default dense is measured (slow: "
                             "seconds per call on fc6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ymax", type=float, default=3.0, help="y-axis limit of the plot")
    common.add_timing_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers = [l for l in ("fc7", "fc1", "fc2") if l in args.layers] or args.layers
        args.rates = [0.7, 0.9]
        args.repeat = min(args.repeat, 3)
        args.min_repeat_ms = min(args.min_repeat_ms, 10.0)
        args.tvm_default_batches = [b for b in args.tvm_default_batches if b == 1]
    for r in args.rates:
        if not 0.0 <= r < 1.0:
            parser.error(f"pruning rate must be in [0, 1), got {r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    cfg = common.apply_timing_args(args)
    started = time.perf_counter()
    profile = resolve_target("x86")
    g = profile.simd_width
    info = machine_info(profile)
    log.info("target %s, g=%d, TVM threads %s", profile.target, g, info["TVM threads"])
    rates, batches = tuple(args.rates), tuple(args.batches)
    results: dict[str, LayerResults] = {}
    default_batches = tuple(b for b in args.tvm_default_batches if b in batches)
    total = len(args.layers) * (len(default_batches) + 1 + len(rates) + cfg.repeat)
    with logging_redirect_tqdm(), tqdm(total=total, desc="kernels", unit="step") as bar:

        def tick(done: str) -> None:
            if bar.n >= bar.total:  # an extra round replaced a disturbed one
                bar.total = bar.n + 1
            bar.set_postfix_str(done)
            bar.update(1)

        for name in args.layers:
            results[name] = bench_layer(LAYERS[name], rates, batches, default_batches,
                                        cfg, profile, args.seed, tick)
    elapsed = time.perf_counter() - started
    text = write_report(results, args, info, g, args.out_dir, elapsed)
    plot(results, batches, rates, g, args.out_dir / "kernels.png", args.ymax)
    print(text)
    log.info("done in %.1f min", (time.perf_counter() - started) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
