#!/usr/bin/env python
"""Whole-model benchmark: LeNet-300-100 pruned by Scalpel vs traditional pruning vs dense.

``tvm_scalpel.models.lenet_300_100()`` (random weights from a fixed seed; no training, which
does not change the timings) at several pruning rates and batch sizes:

* onnxruntime dense: the unpruned ONNX model, the faster of 1 and 2 intra-op threads — the
  reference (relative execution time 1.0);
* dense TVM: ``compile_onnx(model, mode="dense")`` (our scheduled dense kernels);
* TVM default: ``tvm.compile`` of the imported model with the default Relax pipeline (untuned);
* traditional pruning: ``prune_onnx(model, rate, "x86", 1)`` compiled with ``mode="sparse"``
  (every layer with zeros on our kernel with g=1, i.e. CSR);
* Scalpel: ``prune_onnx(model, rate, "x86", g)`` with g = SIMD width, ``mode="auto"``.

Each TVM result is checked against onnxruntime running the same (pruned) ONNX model. Timed two
ways: (i) per call from Python — ``vm["main"](x)`` with ``x`` a TVM tensor, against
onnxruntime's ``run_with_iobinding`` (input bound once, output allocated by onnxruntime, no copy
to numpy); (ii) TVM without Python — the VM's ``invoke_stateful`` in TVM's C++ time evaluator.
Results: ``models.md`` and ``models.png``.

Run: ``.venv/bin/python benchmarks/bench_models.py`` (under a minute on 2 otherwise idle cores)
or ``--quick`` (smoke run, written to ``benchmarks/results/<machine class>/quick``).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import common  # noqa: I001  (imports tvm_scalpel first: thread pool size)
from common import (
    Panel,
    PythonSampler,
    Sampler,
    Series,
    Timing,
    TimingConfig,
    check_close,
    compile_tvm_default,
    fmt_bytes,
    fmt_rel,
    fmt_us,
    machine_info,
    markdown_table,
    measure_rounds,
    ort_run,
    ort_samplers,
    ort_session,
    ort_sessions,
    pick_best_ort,
    plot_relative,
    report_header,
    to_tvm,
    vm_output,
    vm_sampler,
    write_text,
)

import numpy as np
import onnx
import tvm
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tvm_scalpel import compile_onnx, prune_onnx, resolve_target
from tvm_scalpel.kinds import KernelKind
from tvm_scalpel.models import lenet_300_100
from tvm_scalpel.passes import LayerDecision

log = logging.getLogger("bench.models")

RATES = (0.8, 0.9, 0.92, 0.95)
BATCHES = (1, 16)
GOAL_RATE = 0.92
GOAL_REL = 0.38

DENSE_TVM, TVM_DEFAULT, TRADITIONAL, SCALPEL = "dense_tvm", "tvm_default", "traditional", "scalpel"


@dataclass
class Way:
    """One configuration at one batch, timed both ways."""

    python: Timing  # (i) vm["main"](x) from Python
    native: Timing  # (ii) invoke_stateful in TVM's C++ evaluator
    error: float  # relative max error against onnxruntime on the same ONNX model


@dataclass
class Config:
    key: str
    rate: float | None  # None: the unpruned model
    label: str
    layers: list[LayerDecision]
    weight_bytes: int  # bytes of the weight operands the kernels read
    ways: dict[int, Way] = field(default_factory=dict)  # batch -> timings
    achieved: list[float] = field(default_factory=list)  # achieved rate per layer
    sparse_bytes: int = 0  # grouped-sparse storage of the pruned weights (PrunedLayer.sparse_bytes)
    errors: dict[int, float] = field(default_factory=dict)  # batch -> rel. error vs onnxruntime

    @property
    def name(self) -> str:
        return self.key if self.rate is None else f"{self.key} {self.rate:g}"


@dataclass
class OrtRef:
    iobinding: dict[int, common.OrtBest] = field(default_factory=dict)
    run: dict[int, common.OrtBest] = field(default_factory=dict)


def layer_summary(layers: list[LayerDecision]) -> str:
    parts = []
    for d in layers:
        kind = f"sparse g={d.group_width}" if d.kernel is KernelKind.SPARSE else d.kernel
        parts.append(f"{d.shape[0]}x{d.shape[1]}: {kind}")
    return "; ".join(parts) if parts else "TVM's own kernels"


def add_config(c: Config, vm: tvm.relax.VirtualMachine, onnx_model: onnx.ModelProto,
               xs: dict[int, np.ndarray], samplers: dict[tuple, Sampler]) -> None:
    """Check ``vm`` against onnxruntime on ``onnx_model`` at every batch; add its samplers:
    (i) ``vm["main"](x)`` in a Python loop, (ii) ``invoke_stateful`` in TVM's evaluator."""
    sess = ort_session(onnx_model, 1)
    main = vm["main"]
    for bs, x in xs.items():
        xt = to_tvm(x)
        c.errors[bs] = check_close(f"{c.label} rate {c.rate} b={bs}", vm_output(main(xt)),
                                   ort_run(sess, x))
        samplers[(c.name, bs, "python")] = PythonSampler((lambda v: lambda: main(v))(xt), "tvm")
        samplers[(c.name, bs, "native")] = vm_sampler(vm, xt)
    del sess


def run(args: argparse.Namespace, cfg: TimingConfig) -> tuple[OrtRef, list[Config], dict]:
    profile = resolve_target("x86")
    g = profile.simd_width
    model = lenet_300_100(seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    xs = {bs: rng.standard_normal((bs, 784)).astype(np.float32) for bs in args.batches}
    configs: list[Config] = []
    samplers: dict[tuple, Sampler] = {}
    total = 3 + 2 * len(args.rates) + cfg.repeat
    with logging_redirect_tqdm(), tqdm(total=total, desc="models", unit="step") as bar:

        def tick(done: str) -> None:
            if bar.n >= bar.total:  # an extra round replaced a disturbed one
                bar.total = bar.n + 1
            bar.set_postfix_str(done)
            bar.update(1)

        sessions = ort_sessions(model, (1, 2))
        for bs, x in xs.items():
            for style in ("iobinding", "run"):
                ort, _ = ort_samplers(sessions, x, style=style)
                for t, sampler in ort.items():
                    samplers[("onnxruntime " + style, bs, t)] = sampler
        tick("onnxruntime ready")

        out = compile_onnx(model, profile, mode="dense")
        dense_bytes = sum(d.shape[0] * d.shape[1] * 4 for d in out.layers)
        c = Config(DENSE_TVM, None, "dense TVM (our kernels)", out.layers, dense_bytes)
        add_config(c, tvm.relax.VirtualMachine(out.executable, tvm.cpu()), model, xs, samplers)
        configs.append(c)
        tick("dense TVM ready")

        c = Config(TVM_DEFAULT, None, "TVM default (untuned)", [], dense_bytes)
        add_config(c, compile_tvm_default(model, profile.target), model, xs, samplers)
        configs.append(c)
        tick("TVM default ready")

        for rate in args.rates:
            for key, width, mode, label in (
                (TRADITIONAL, 1, "sparse", "traditional pruning (g=1, CSR)"),
                (SCALPEL, g, "auto", f"Scalpel (g={g})"),
            ):
                pruned = prune_onnx(model, rate, profile, width)
                out = compile_onnx(pruned.model, profile, mode=mode)
                c = Config(key, rate, label, out.layers, sum(d.weight_bytes for d in out.layers),
                           achieved=[p.rate for p in pruned.layers],
                           sparse_bytes=sum(p.sparse_bytes for p in pruned.layers))
                add_config(c, tvm.relax.VirtualMachine(out.executable, tvm.cpu()), pruned.model,
                           xs, samplers)
                configs.append(c)
                tick(f"{key} {rate} ready")

        timings = measure_rounds(samplers, cfg, "LeNet-300-100 models", seed=args.seed,
                                 progress=lambda: tick("timing"))
    ort_ref = OrtRef()
    for bs in args.batches:
        for style, store in (("iobinding", ort_ref.iobinding), ("run", ort_ref.run)):
            store[bs] = pick_best_ort({t: timings[("onnxruntime " + style, bs, t)] for t in (1, 2)})
    for c in configs:
        for bs in args.batches:
            c.ways[bs] = Way(timings[(c.name, bs, "python")], timings[(c.name, bs, "native")],
                             c.errors[bs])
            log.info("%s rate %s b=%d: (i) %s us, (ii) %s us", c.label, c.rate, bs,
                     fmt_us(c.ways[bs].python.median_us), fmt_us(c.ways[bs].native.median_us))
    return ort_ref, configs, {"g": g, "profile": profile, "dense_bytes": dense_bytes}


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def rel(t: Timing, ort: common.OrtBest) -> float:
    return t.median_us / ort.timing.median_us


def cell(t: Timing, ort: common.OrtBest) -> str:
    mark = "*" if t.disturbed else ""
    return f"{fmt_us(t.median_us)}{mark} ({fmt_rel(rel(t, ort))})"


def batch_table(bs: int, ort_ref: OrtRef, configs: list[Config]) -> str:
    ort = ort_ref.iobinding[bs]
    headers = ["configuration", "rate", "(i) per call from Python, us (rel.)",
               "(ii) TVM without Python, us (rel.)", "max rel. error"]
    rows = [
        [f"onnxruntime dense, run_with_iobinding ({ort.threads} thr)", "–", cell(ort.timing, ort), "", ""],
        [f"onnxruntime dense, session.run numpy ({ort_ref.run[bs].threads} thr)", "–",
         cell(ort_ref.run[bs].timing, ort), "", ""],
    ]
    for c in configs:
        w = c.ways[bs]
        rows.append([c.label, "–" if c.rate is None else f"{c.rate:g}", cell(w.python, ort),
                     cell(w.native, ort), f"{w.error:.1e}"])
    return markdown_table(headers, rows, ["l", "r", "r", "r", "r"])


def bytes_table(configs: list[Config], dense_bytes: int) -> str:
    headers = ["rate", "Scalpel: achieved rates", "Scalpel bytes (x dense)", "Scalpel kernels (auto)",
               "traditional bytes (x dense)", "traditional kernels (sparse)"]
    by_rate: dict[float, dict[str, Config]] = {}
    for c in configs:
        if c.rate is not None:
            by_rate.setdefault(c.rate, {})[c.key] = c
    rows = []
    for rate, cs in by_rate.items():
        s, t = cs[SCALPEL], cs[TRADITIONAL]
        rows.append([
            f"{rate:g}", " / ".join(f"{a:.3f}" for a in s.achieved),
            f"{fmt_bytes(s.sparse_bytes)} ({s.sparse_bytes / dense_bytes:.3f}x)",
            layer_summary(s.layers),
            f"{fmt_bytes(t.sparse_bytes)} ({t.sparse_bytes / dense_bytes:.3f}x)",
            layer_summary(t.layers),
        ])
    return markdown_table(headers, rows, ["r", "l", "r", "l", "r", "l"])


def find(configs: list[Config], key: str, rate: float | None) -> Config | None:
    return next((c for c in configs if c.key == key and c.rate == rate), None)


def key_numbers(ort_ref: OrtRef, configs: list[Config]) -> list[str]:
    c = find(configs, SCALPEL, GOAL_RATE)
    if c is None or 1 not in c.ways:
        return [f"- (Scalpel at rate {GOAL_RATE}, batch 1 was not part of this run: no goal check.)"]
    ort = ort_ref.iobinding[1]
    w = c.ways[1]
    r1, r2 = rel(w.python, ort), rel(w.native, ort)
    verdict = lambda r: "met" if r <= GOAL_REL else "NOT met"  # noqa: E731
    lines = [
        f"- LeNet-300-100, rate {GOAL_RATE}, batch 1, {c.label}: onnxruntime dense "
        f"{fmt_us(ort.timing.median_us)} us ({ort.threads} thr, run_with_iobinding).",
        f"  - (i) per call from Python: {fmt_us(w.python.median_us)} us = **{r1:.3f}x onnxruntime** "
        f"(goal <= {GOAL_REL}x: {verdict(r1)});",
        f"  - (ii) TVM without Python: {fmt_us(w.native.median_us)} us = **{r2:.3f}x onnxruntime** "
        f"(goal <= {GOAL_REL}x: {verdict(r2)}).",
    ]
    t = find(configs, TRADITIONAL, GOAL_RATE)
    if t is not None:
        lines.append(f"- Same rate, traditional pruning (g=1, CSR): (i) {rel(t.ways[1].python, ort):.3f}x, "
                     f"(ii) {rel(t.ways[1].native, ort):.3f}x onnxruntime.")
    return lines


def write_report(args: argparse.Namespace, info: dict[str, str], ort_ref: OrtRef,
                 configs: list[Config], extra: dict, elapsed: float) -> str:
    g = extra["g"]
    parts = [
        *report_header("Whole-model benchmark: LeNet-300-100", "bench_models.py", elapsed, info),
        "## Key numbers",
        "",
        *key_numbers(ort_ref, configs),
        "",
        "## Method",
        "",
        f"- Model: `tvm_scalpel.models.lenet_300_100(seed={args.seed})` (784-300-100-10, Gemm "
        "transB=1 + ReLU, random weights, not trained: timings do not depend on the values).",
        f"- Scalpel: `prune_onnx(model, rate, 'x86', {g})` then `compile_onnx(mode='auto')`; "
        "traditional: `prune_onnx(model, rate, 'x86', 1)` then `compile_onnx(mode='sparse')`; "
        "dense TVM: `compile_onnx(model, mode='dense')` on the unpruned model; TVM default: "
        "`tvm.compile` of the imported model with `relax.get_default_pipeline` (no rewrite, no "
        "tuning).",
        "- Reference: onnxruntime on the unpruned model, the faster of 1 and 2 intra-op threads. "
        "Every TVM output is checked against onnxruntime running the same (pruned) ONNX model "
        f"(relative max error < {common.REL_TOL:g}).",
        "- (i) per call from Python: `vm['main'](x)` with `x` already a TVM tensor (the result stays "
        "a TVM tensor), against onnxruntime `run_with_iobinding` with the input bound once as an "
        "OrtValue and the output allocated by onnxruntime (no copy to numpy): the same work on "
        "both sides. `session.run` with numpy in/out is shown for information.",
        "- (ii) TVM without Python: `vm.set_input` then `invoke_stateful` timed by TVM's C++ time "
        "evaluator. onnxruntime has no equivalent from Python, so (ii) is relative to the same "
        "onnxruntime number as (i) (which includes onnxruntime's own few microseconds of Python "
        "binding).",
        f"- Times: all configurations, both ways, both batches, are timed in {args.repeat} "
        f"interleaved rounds; in each round each runs for at least {args.min_repeat_ms:g} ms after "
        f"a warm-up call (TVM first, then each onnxruntime session, {common.COOLDOWN_S:g} s pause "
        "between them as thread pools spin after work). Reported: the median over rounds, in "
        "microseconds per call; in parentheses the relative execution time (time / onnxruntime "
        "dense; < 1 is faster).",
        "- Other processes share this machine: a round during which they used more than "
        f"{common.FOREIGN_LOAD_LIMIT:g} cores (/proc/stat) is replaced. This run: "
        f"{common.NOISE.summary()}.",
        "",
        "![relative execution time](models.png)",
        "",
    ]
    for bs in args.batches:
        parts += [f"## Batch {bs}", "", batch_table(bs, ort_ref, configs), ""]
    parts += [
        "## Model size and kernel choices",
        "",
        f"Weights of the dense model: {fmt_bytes(extra['dense_bytes'])} (float32). Pruned sizes are "
        "the grouped-sparse storage (`PrunedLayer.sparse_bytes`: values + one int32 index per "
        "group + row pointers; g=1 is CSR). Achieved rates per layer: fc1 / fc2 / fc3.",
        "",
        bytes_table(configs, extra["dense_bytes"]),
        "",
    ]
    text = "\n".join(parts)
    write_text(args.out_dir / "models.md", text)
    return text


def plot(args: argparse.Namespace, ort_ref: OrtRef, configs: list[Config], g: int, path: Path) -> None:
    rates = list(args.rates)
    panels = []
    for bs in args.batches:
        ort = ort_ref.iobinding[bs]

        def line(key: str, way: str) -> list[float]:
            return [rel(getattr(find(configs, key, r).ways[bs], way), ort) for r in rates]

        dense = find(configs, DENSE_TVM, None).ways[bs]
        series = [
            Series(f"Scalpel g={g}, (i) from Python", rates, line(SCALPEL, "python"),
                   {"color": "tab:red", "lw": 2}),
            Series(f"Scalpel g={g}, (ii) no Python", rates, line(SCALPEL, "native"),
                   {"color": "tab:red", "ls": "--"}),
            Series("traditional g=1, (i)", rates, line(TRADITIONAL, "python"), {"color": "tab:blue"}),
            Series("traditional g=1, (ii)", rates, line(TRADITIONAL, "native"),
                   {"color": "tab:blue", "ls": "--"}),
            Series("dense TVM, (i)", rates, [rel(dense.python, ort)] * len(rates),
                   {"color": "tab:gray", "marker": None}),
            Series("dense TVM, (ii)", rates, [rel(dense.native, ort)] * len(rates),
                   {"color": "tab:gray", "ls": ":", "marker": None}),
        ]
        panels.append(Panel(f"LeNet-300-100, batch {bs}", series))
    plot_relative(path, [panels], ymax=args.ymax,
                  suptitle="LeNet-300-100 whole model: time relative to onnxruntime dense "
                           "(lower is better)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Whole-model benchmark of LeNet-300-100: Scalpel (g = SIMD width) vs "
                    "traditional pruning (g=1, CSR) vs dense TVM, TVM default and onnxruntime.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: rates 0.9 and 0.92, few repeats; results go to "
                             "benchmarks/results/<machine class>/quick unless --out-dir is given")
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ymax", type=float, default=None, help="y-axis limit of the plot")
    common.add_timing_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.rates = [0.9, 0.92]
        args.repeat = min(args.repeat, 3)
        args.min_repeat_ms = min(args.min_repeat_ms, 10.0)
    for r in args.rates:
        if not 0.0 <= r < 1.0:
            parser.error(f"pruning rate must be in [0, 1), got {r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    cfg = common.apply_timing_args(args)
    started = time.perf_counter()
    info = machine_info(resolve_target("x86"))
    ort_ref, configs, extra = run(args, cfg)
    elapsed = time.perf_counter() - started
    text = write_report(args, info, ort_ref, configs, extra, elapsed)
    plot(args, ort_ref, configs, extra["g"], args.out_dir / "models.png")
    print(text)
    log.info("done in %.1f min", (time.perf_counter() - started) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
