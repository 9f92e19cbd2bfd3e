"""Real CNNs: the paper's networks (ConvNet, NIN, AlexNet, VGG-11, ResNet-18; LeNet-5 too),
whole-model and per-layer, onnxruntime vs TVM vs tvm-scalpel.

For each network (``tvm_scalpel.models``, He-initialized weights from a seed) and batch size:

* onnxruntime: the dense model and each pruned model (best of 1 and 2 intra-op threads);
* TVM default: TVM's own legalization, no pass of ours (very slow for big nets: timed with one
  call a sample, and skipped above ``--tvm-default-max-gmacs`` with a note);
* ours, dense: ``compile_onnx(model, tuning_db=db)`` (our conv / dense kernels, no pruning),
  its conv layers tuned first as ``tvm-scalpel tune --conv-trials 8`` does (``--conv-trials``;
  the tuning time is in the notes) and every "ours" variant compiled with that database, as
  ``compile --db`` does; "untuned" is the dense model on the rule's conv knobs;
* ours, FC 0.9: SIMD-aware weight pruning of the FC layers at rate 0.9 (g = SIMD width);
* ours, CPU policy: the paper's rules for a CPU (``policy.plan_layers``: FC weights at 0.9,
  CONV nodes at 0.5 by L1 norm, as ``tvm-scalpel prune --policy rules`` does);
* traditional: FC weights pruned at 0.9 one by one (g = 1, CSR), ``mode="sparse"``.

Every compiled model is checked against onnxruntime on its own (pruned) ONNX (relative max
error < 1e-4) before it is timed. The per-layer table times each kernel of our compiled model
on its own (TVM 0.27's Relax VM has no profiler): the module after our passes and TVM's
legalization / fusion, each ``call_tir`` compiled and timed with its constants and random
inputs of the layer's shape (reshapes, which the VM makes free views, left out).

    .venv/bin/python benchmarks/bench_cnn.py --nets convnet,lenet5 --batches 1 --quick
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import common  # noqa: I001  (imports tvm_scalpel first: thread pool size)
from common import (
    check_close,
    compile_tvm_default,
    fmt_bytes,
    fmt_rel,
    fmt_us,
    machine_info,
    markdown_table,
    measure_rounds,
    ort_samplers,
    ort_sessions,
    pick_best_ort,
    report_header,
    time_single,
    to_tvm,
    vm_output,
    vm_sampler,
    write_text,
)

import numpy as np
import onnx
import tvm
from tvm import relax

from tvm_scalpel import compile_onnx, flows, models, prune_onnx, resolve_target
from tvm_scalpel.finetune import node_prune
from tvm_scalpel.kinds import KernelKind, LayerKind
from tvm_scalpel.onnx_io import to_relax, with_batch
from tvm_scalpel.policy import plan_layers

log = logging.getLogger("bench.cnn")


NETS = ("lenet5", "convnet", "nin", "alexnet", "vgg11", "resnet18")
BATCHES = (1, 8)
FC_RATE = 0.9
NODE_RATE = 0.5

ORT, TVM_DEFAULT, DENSE, FC, POLICY, TRAD = "ort", "tvm_default", "dense", "fc", "policy", "traditional"
DENSE_RULE = "dense_rule"
LABELS = {
    DENSE: "ours, dense",
    DENSE_RULE: "ours, dense, untuned (rule's conv knobs)",
    FC: f"ours, FC weights {FC_RATE}",
    POLICY: f"ours, CPU policy (FC {FC_RATE} + CONV nodes {NODE_RATE})",
    TRAD: f"traditional (g=1), FC {FC_RATE}",
    TVM_DEFAULT: "TVM default (untuned)",
}


@dataclass
class Variant:
    key: str
    model: onnx.ModelProto  # the (pruned) ONNX model it computes
    executable: tvm.runtime.Executable | None = None
    kernel_bytes: int = 0  # bytes of the weight operands our kernels read
    kernels: str = ""  # which layers went grouped-sparse
    max_error: float = 0.0


@dataclass
class NetResult:
    name: str
    params: int
    gmacs: float  # per image
    onnx_bytes: dict[str, int] = field(default_factory=dict)  # variant -> dense weight bytes
    kernel_bytes: dict[str, int] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)
    times: dict[int, dict[str, common.Timing]] = field(default_factory=dict)  # batch -> contender
    ort_threads: dict[int, dict[str, int]] = field(default_factory=dict)
    layers: dict[int, list[tuple[str, str, float]]] = field(default_factory=dict)  # batch -> rows
    notes: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------ the variants


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer)


def macs_per_image(model: onnx.ModelProto) -> float:
    """Multiply-adds of the Conv and Gemm nodes for one image (shape inference at batch 1)."""
    inferred = onnx.shape_inference.infer_shapes(with_batch(model, 1))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0.0
    for node in inferred.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.output[0] in shapes and node.input[1] in inits:
            out = shapes[node.output[0]]
            w = inits[node.input[1]]
            per_output = int(np.prod(w[1:])) if node.op_type == "Conv" else w[1]
            total += float(np.prod(out[1:])) * per_output
    return total


def policy_model(model: onnx.ModelProto, profile) -> onnx.ModelProto:
    """The paper's CPU rules, as ``tvm-scalpel prune --policy rules``: CONV nodes at
    NODE_RATE (L1 norm: no data here), then FC weights at FC_RATE."""
    plans = plan_layers(model, profile)
    nodes = {p.name: NODE_RATE for p in plans if p.method == "nodes"}
    if nodes:
        model = node_prune(model, nodes, criterion="l1").model
    fc_weights = any(p.method == "weights" and p.kind is LayerKind.FC for p in plans)
    return prune_onnx(model, FC_RATE if fc_weights else 0.0, profile).model


def tune_conv_layers(models_: list[onnx.ModelProto], profile, trials: int, db: Path | None) -> float:
    """``tvm-scalpel tune``'s conv half (flows.tune_convs) on each model, into ``db``; seconds."""
    t0 = time.time()
    if db is not None and trials:
        for m in models_:
            flows.tune_convs(m, db, target=profile, trials=trials, progress=False)
    return time.time() - t0


def build_variants(model: onnx.ModelProto, profile, conv_trials: int = 0,
                   db: Path | None = None) -> tuple[list[Variant], float]:
    """The pruned models, their conv layers tuned (``conv_trials`` knob candidates a shape, as
    ``tune --conv-trials``), each compiled with the database as ``compile --db`` does; and the
    dense model once more with the rule's knobs. Returns the variants and the tuning seconds."""
    specs = [(DENSE, model, "auto"),
             (FC, prune_onnx(model, FC_RATE, profile).model, "auto"),
             (POLICY, policy_model(model, profile), "auto"),
             (TRAD, prune_onnx(model, FC_RATE, profile, group_width=1).model, "sparse")]
    tuning_s = tune_conv_layers([model, specs[2][1]], profile, conv_trials, db)
    tuned = db if conv_trials and db is not None and db.exists() else None
    specs.append((DENSE_RULE, model, "auto"))
    variants = []
    for key, onnx_model, mode in specs:
        out = compile_onnx(onnx_model, profile, mode=mode, tuning_db=None if key == DENSE_RULE else tuned)
        sparse = [d.name for d in out.layers if d.kernel is KernelKind.SPARSE]
        variants.append(Variant(key, onnx_model, out.executable, sum(d.weight_bytes for d in out.layers),
                                f"{len(sparse)} of {len(out.layers)} layers grouped-sparse"))
    return variants, tuning_s


# ------------------------------------------------------------------------------ per layer


def layer_times(model: onnx.ModelProto, batch: int, profile, min_repeat_ms: float,
                db: Path | None = None) -> list[tuple[str, str, float]]:
    """``(kernel, output shape, us)`` of each kernel call of our compiled model, in order (conv
    knobs from the tuning database ``db`` where it has them)."""
    from tvm_scalpel.passes import scalpel_pipeline
    from tvm_scalpel.passes.graph import const_array
    from tvm.relax.backend import cpu_generic

    mod = to_relax(with_batch(model, batch))
    # our passes, then legalized only (not fused or lowered further), so that each kernel call
    # can be compiled and timed on its own
    lowering = tvm.transform.Sequential(cpu_generic.library_dispatch_passes(profile.target)
                                        + cpu_generic.legalize_passes(profile.target))
    conv_knobs_for = None
    if db is not None and db.exists():
        from tvm_scalpel.tuning import TuningDatabase

        tuned = TuningDatabase(db)
        conv_knobs_for = lambda shape: tuned.conv_knobs_for(profile, shape)  # noqa: E731
    with profile.target:
        mod = scalpel_pipeline(profile, default_pipeline=lowering, conv_knobs_for=conv_knobs_for)(mod)
    rng = np.random.default_rng(0)
    rows = []
    compiled: dict[str, tvm.runtime.Module] = {}
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
                    and call.op.name == "relax.call_tir"):
                continue
            gv = call.args[0]
            name = gv.name_hint
            if re.fullmatch(r"reshape\d*", name):  # a free view in the VM (fused ones are kept)
                continue
            out_ty = binding.var.ty
            if not isinstance(out_ty, relax.TensorType):
                continue
            arrays = []
            for arg in call.args[1].fields:
                value = const_array(arg)
                if value is not None:
                    arrays.append(value)
                else:
                    shape = [int(d) for d in arg.ty.shape.values]
                    arrays.append(rng.standard_normal(shape).astype(str(arg.ty.dtype)))
            out_shape = [int(d) for d in out_ty.shape.values]
            arrays.append(np.zeros(out_shape, str(out_ty.dtype)))
            if name not in compiled:
                func = mod[gv].with_attr("global_symbol", "main")
                compiled[name] = tvm.compile(tvm.IRModule({"main": func}), target=profile.target).mod
            args = [tvm.runtime.tensor(a) for a in arrays]
            timer = compiled[name].time_evaluator("main", tvm.cpu(), number=1, repeat=5,
                                                  min_repeat_ms=int(min_repeat_ms))
            rows.append((name, "x".join(map(str, out_shape)), float(np.median(timer(*args).results)) * 1e6))
    return rows


# ------------------------------------------------------------------------------ one network


def run_net(name: str, args, cfg: common.TimingConfig, profile) -> NetResult:
    t0 = time.time()
    model = models.build(name, seed=args.seed)
    res = NetResult(name, sum(int(np.prod(i.dims)) for i in model.graph.initializer), macs_per_image(model) / 1e9)
    log.info("%s: %.1fM parameters, %.2f GMACs per image (built in %.0f s)", name, res.params / 1e6,
             res.gmacs, time.time() - t0)
    variants, tuning_s = build_variants(model, profile, args.conv_trials, args.db)
    if args.conv_trials:
        res.notes.append(f"conv layers tuned ({args.conv_trials} knob candidates a shape, at batch 1; "
                         f"{tuning_s:.0f} s)")
    log.info("%s: %d variants pruned, conv-tuned and compiled in %.0f s", name, len(variants), time.time() - t0)
    for v in variants:
        res.onnx_bytes[v.key] = weight_bytes(v.model)
        res.kernel_bytes[v.key] = v.kernel_bytes
        res.kernels[v.key] = v.kernels
    default_ok = res.gmacs * max(args.batches) <= args.tvm_default_max_gmacs
    default_vm = compile_tvm_default(model, profile.target) if default_ok else None
    if not default_ok:
        res.notes.append(f"TVM default skipped: {res.gmacs:.2f} GMACs an image x batch {max(args.batches)} "
                         f"is above --tvm-default-max-gmacs {args.tvm_default_max_gmacs:g}")
    in_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    rng = np.random.default_rng(args.seed + 1)
    for bs in args.batches:
        x = rng.standard_normal((bs, *in_shape)).astype(np.float32)
        xt = to_tvm(x)
        samplers, refs = {}, {}
        for v in variants:
            sessions = ort_sessions(v.model, (1, 2))
            ort, ref = ort_samplers(sessions, x)
            refs[v.key] = ref
            for t, s in ort.items():
                samplers[(ORT, v.key, t)] = s
            vm = relax.VirtualMachine(v.executable, tvm.cpu())
            err = check_close(f"{name} {v.key} batch {bs}", vm_output(vm["main"](xt)), ref)
            res.errors[v.key] = max(res.errors.get(v.key, 0.0), err)
            samplers[(v.key,)] = vm_sampler(vm, xt)
        timings = measure_rounds(samplers, cfg, f"{name} batch {bs}")
        res.times[bs] = {}
        res.ort_threads[bs] = {}
        for v in variants:
            best = pick_best_ort({t: timings[(ORT, v.key, t)] for t in (1, 2)})
            res.times[bs][f"{ORT}:{v.key}"] = best.timing
            res.ort_threads[bs][v.key] = best.threads
            res.times[bs][v.key] = timings[(v.key,)]
        if default_vm is not None:
            out = vm_output(default_vm["main"](xt))
            res.errors[TVM_DEFAULT] = max(res.errors.get(TVM_DEFAULT, 0.0),
                                          check_close(f"{name} TVM default", out, refs[DENSE]))
            slow = common.TimingConfig(repeat=args.default_repeat, min_repeat_ms=0)
            res.times[bs][TVM_DEFAULT] = time_single(vm_sampler(default_vm, xt), slow)
        if not args.no_layers:
            res.layers[bs] = {key: layer_times(v.model, bs, profile, args.layer_repeat_ms, args.db)
                              for key, v in ((v.key, v) for v in variants) if key in (DENSE, POLICY)}
        log.info("%s batch %d: ORT %s us, ours dense %s us, policy %s us", name, bs,
                 fmt_us(res.times[bs][f"{ORT}:{DENSE}"].median_us), fmt_us(res.times[bs][DENSE].median_us),
                 fmt_us(res.times[bs][POLICY].median_us))
    return res


# ------------------------------------------------------------------------------ report


def whole_model_table(results: list[NetResult], bs: int) -> str:
    headers = ["network", "ORT dense us (threads)", "TVM default", "ours dense", LABELS[FC], LABELS[POLICY],
               LABELS[TRAD], "ORT FC 0.9", "ORT policy", "ORT traditional", LABELS[DENSE_RULE]]
    rows = []
    for r in results:
        t = r.times.get(bs)
        if not t:
            continue
        ref = t[f"{ORT}:{DENSE}"].median_us

        def cell(key: str) -> str:
            if key not in t:
                return "–"
            us = t[key].median_us
            return f"{fmt_us(us)} ({fmt_rel(us / ref)})"

        rows.append([r.name, f"{fmt_us(ref)} ({r.ort_threads[bs][DENSE]})", cell(TVM_DEFAULT), cell(DENSE),
                     cell(FC), cell(POLICY), cell(TRAD), cell(f"{ORT}:{FC}"), cell(f"{ORT}:{POLICY}"),
                     cell(f"{ORT}:{TRAD}"), cell(DENSE_RULE)])
    return markdown_table(headers, rows)


def size_table(results: list[NetResult]) -> str:
    headers = ["network", "parameters", "GMACs / image", "dense weights"] + [
        f"{LABELS[k]} (x dense)" for k in (FC, POLICY, TRAD)] + ["max rel. error vs ORT"]
    rows = []
    for r in results:
        dense = r.kernel_bytes[DENSE] or r.onnx_bytes[DENSE]
        cells = [f"{fmt_bytes(r.kernel_bytes[k])} ({r.kernel_bytes[k] / dense:.3f}x); {r.kernels[k]}"
                 for k in (FC, POLICY, TRAD)]
        rows.append([r.name, f"{r.params / 1e6:.2f}M", f"{r.gmacs:.3f}", fmt_bytes(dense), *cells,
                     f"{max(r.errors.values()):.1e}"])
    return markdown_table(headers, rows)


def us_text(us: float) -> str:
    text = fmt_us(us)
    return text if text.endswith("ms") else f"{text} us"


def layers_section(results: list[NetResult], top: int) -> list[str]:
    out = []
    for r in results:
        for bs, by_variant in r.layers.items():
            for key, rows in by_variant.items():
                total = sum(us for _, _, us in rows) or 1.0
                ranked = sorted(enumerate(rows), key=lambda ir: -ir[1][2])[:top]
                out += [f"### {r.name}, batch {bs}, {LABELS[key]}", "",
                        f"Sum of the {len(rows)} kernels: {us_text(total)} (whole model: "
                        f"{us_text(r.times[bs][key].median_us)}).", "",
                        markdown_table(["#", "kernel", "output", "us", "share"],
                                       [[i, name, shape, fmt_us(us), f"{us / total * 100:.1f}%"]
                                        for i, (name, shape, us) in ranked]), ""]
    return out


def plot(results: list[NetResult], batches, path: Path) -> None:
    """The paper's figure: relative execution time (onnxruntime dense = 1) and relative model
    size per network, grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [DENSE, FC, POLICY, TRAD]
    nets = [r.name for r in results]
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4.8 * (len(batches) + 1), 3.8), squeeze=False)
    width = 0.8 / len(keys)
    xs = np.arange(len(nets))
    for col, bs in enumerate(batches):
        ax = axes[0][col]
        for i, key in enumerate(keys):
            ys = [r.times[bs][key].median_us / r.times[bs][f"{ORT}:{DENSE}"].median_us if bs in r.times else 0
                  for r in results]
            ax.bar(xs + (i - len(keys) / 2 + 0.5) * width, ys, width, label=LABELS[key])
        ax.axhline(1.0, color="black", ls="--", lw=1)
        ax.set_xticks(xs, nets, rotation=20)
        ax.set_title(f"relative execution time, batch {bs}\n(onnxruntime dense = 1)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    ax = axes[0][-1]
    for i, key in enumerate(keys):
        ys = [r.kernel_bytes[key] / (r.kernel_bytes[DENSE] or 1) for r in results]
        ax.bar(xs + (i - len(keys) / 2 + 0.5) * width, ys, width, label=LABELS[key])
    ax.set_xticks(xs, nets, rotation=20)
    ax.set_title("relative model size (weights)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(keys), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("wrote %s", path)


def write_report(args, info, results: list[NetResult], elapsed: float) -> None:
    lines = report_header("Real CNNs: onnxruntime vs TVM vs tvm-scalpel", "bench_cnn.py", elapsed, info)
    lines += [
        "Networks from `tvm_scalpel.models` (He-initialized, seed "
        f"{args.seed}); times are medians of interleaved rounds, from the VM's C++ evaluator "
        "for TVM and `session.run` for onnxruntime (best of 1 and 2 intra-op threads; "
        "the TVM thread count is in the machine table). Relative times in parentheses: onnxruntime "
        "on the dense model = 1. `ORT FC 0.9` etc.: onnxruntime on the same pruned ONNX models "
        "(zeros stored dense; node pruning makes them smaller). Every compiled model matched "
        "onnxruntime on its own ONNX (relative max error < 1e-4) before it was timed. "
        f"{common.NOISE.summary()}.", ""]
    for r in results:
        lines += [f"- {r.name}: {note}" for note in r.notes]
    lines.append("")
    for bs in args.batches:
        lines += [f"## Whole model, batch {bs}", "", whole_model_table(results, bs), ""]
    lines += ["## Model size", "",
              "Bytes of the weight operands our kernels read (dense rows or panels, or grouped-sparse "
              "values + one int32 index per group + row pointers); node pruning shrinks the dense "
              "layers themselves.", "", size_table(results), ""]
    if not args.no_layers:
        lines += ["## Per layer (our kernels, each timed alone)", ""] + layers_section(results, args.top_layers)
    lines += ["![relative execution time and size](cnn.png)", ""]
    write_text(args.out_dir / "cnn.md", "\n".join(lines))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default=",".join(NETS), help=f"comma-separated, of {', '.join(NETS)}")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--quick", action="store_true",
                   help="3 rounds of 10 ms, no per-layer table: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tvm-default-max-gmacs", type=float, default=2.0,
                   help="skip TVM's untuned default above this many GMACs per call (image GMACs x "
                        "the largest batch): it runs conv as plain loops, minutes for big nets")
    p.add_argument("--default-repeat", type=int, default=3, help="single calls timed for TVM default")
    p.add_argument("--no-layers", action="store_true", help="no per-layer table")
    p.add_argument("--layer-repeat-ms", type=float, default=20.0)
    p.add_argument("--top-layers", type=int, default=8, help="rows of each per-layer table")
    p.add_argument("--conv-trials", type=int, default=8,
                   help="tune each conv shape's kernel knobs first (as tune --conv-trials; 0: the rule)")
    common.add_timing_args(p)
    args = p.parse_args(argv)
    args.nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in args.nets if n not in models.BUILDERS]
    if unknown:
        p.error(f"unknown network(s) {', '.join(unknown)}: use {', '.join(models.BUILDERS)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error("--batches takes comma-separated integers")
    if args.quick:
        args.repeat, args.min_repeat_ms, args.no_layers = 3, 10.0, True
        args.extra_rounds, args.wait_budget = 0, 0.0  # a smoke run does not wait for quiet
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    out_dir = args.out_dir
    cfg = common.apply_timing_args(args)
    if out_dir is None:
        args.out_dir = common.results_dir(quick=args.quick)
    profile = resolve_target("x86")
    info = machine_info(profile)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-cnn-") as tmp:
        args.db = Path(tmp) / "tuning.jsonl"
        results = [run_net(name, args, cfg, profile) for name in args.nets]
    elapsed = time.time() - t0
    for bs in args.batches:
        print(f"\nbatch {bs}\n" + whole_model_table(results, bs))
    print("\n" + size_table(results))
    write_report(args, info, results, elapsed)
    plot(results, args.batches, args.out_dir / "cnn.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
