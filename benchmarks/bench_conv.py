"""Dense convolution: our blocked conv kernels vs onnxruntime (MLAS), layer by layer.

For every distinct conv layer of torchvision's AlexNet, VGG-11 and ResNet-18 (ImageNet, 224x224
input) a single-Conv ONNX model (``Conv`` + bias + ``Relu``, weights random) is built with
onnx.helper; onnxruntime (``intra_op_num_threads`` = TVM's threads) and our compiled model
(``compile_onnx``: ``RewriteConvLayers`` -> the blocked NCHW[x]c kernel) run the SAME model,
interleaved in rounds (``common.measure_rounds``), batch 1 and 8. Outputs are checked against
onnxruntime's. Network totals weight each layer by how often it occurs.

    .venv/bin/python benchmarks/bench_conv.py            # all, batch 1 and 8
    .venv/bin/python benchmarks/bench_conv.py --quick    # AlexNet, batch 1, 3 rounds
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (imports tvm_scalpel first: TVM_NUM_THREADS)
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tvm  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tvm_scalpel import compile_onnx, resolve_target, schedules  # noqa: E402
from tvm_scalpel.schedules import ConvShape  # noqa: E402
from tvm_scalpel.threads import num_threads  # noqa: E402

log = logging.getLogger("bench")

STEM = "conv"
# the CPUs we may use, read before TVM's pool starts (it pins this thread to one core)
CORES = len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Layer:
    name: str
    c: int
    hw: int
    o: int
    k: int
    stride: int = 1
    pad: int = 0
    count: int = 1  # how often the network has this layer

    def shape(self, batch: int) -> ConvShape:
        p = self.pad
        return ConvShape(batch, self.c, self.hw, self.hw, self.o, self.k, self.k,
                         (self.stride, self.stride), (p, p, p, p))


NETWORKS: dict[str, list[Layer]] = {
    "AlexNet": [
        Layer("conv1 11x11 s4", 3, 224, 64, 11, 4, 2),
        Layer("conv2 5x5", 64, 27, 192, 5, 1, 2),
        Layer("conv3 3x3", 192, 13, 384, 3, 1, 1),
        Layer("conv4 3x3", 384, 13, 256, 3, 1, 1),
        Layer("conv5 3x3", 256, 13, 256, 3, 1, 1),
    ],
    "VGG-11": [
        Layer("conv1 3->64 @224", 3, 224, 64, 3, 1, 1),
        Layer("conv2 64->128 @112", 64, 112, 128, 3, 1, 1),
        Layer("conv3 128->256 @56", 128, 56, 256, 3, 1, 1),
        Layer("conv4 256->256 @56", 256, 56, 256, 3, 1, 1),
        Layer("conv5 256->512 @28", 256, 28, 512, 3, 1, 1),
        Layer("conv6 512->512 @28", 512, 28, 512, 3, 1, 1),
        Layer("conv7-8 512->512 @14", 512, 14, 512, 3, 1, 1, count=2),
    ],
    "ResNet-18": [
        Layer("conv1 7x7 s2", 3, 224, 64, 7, 2, 3),
        Layer("layer1 3x3 64 @56", 64, 56, 64, 3, 1, 1, count=4),
        Layer("layer2.0 3x3 s2 64->128", 64, 56, 128, 3, 2, 1),
        Layer("layer2 3x3 128 @28", 128, 28, 128, 3, 1, 1, count=3),
        Layer("layer2 down 1x1 s2", 64, 56, 128, 1, 2, 0),
        Layer("layer3.0 3x3 s2 128->256", 128, 28, 256, 3, 2, 1),
        Layer("layer3 3x3 256 @14", 256, 14, 256, 3, 1, 1, count=3),
        Layer("layer3 down 1x1 s2", 128, 28, 256, 1, 2, 0),
        Layer("layer4.0 3x3 s2 256->512", 256, 14, 512, 3, 2, 1),
        Layer("layer4 3x3 512 @7", 512, 7, 512, 3, 1, 1, count=3),
        Layer("layer4 down 1x1 s2", 256, 14, 512, 1, 2, 0),
    ],
}


def conv_onnx(layer: Layer, batch: int, rng: np.random.Generator) -> onnx.ModelProto:
    """``Relu(Conv(x, W, b))`` with random weights, static shapes, opset 17."""
    s = layer.shape(batch)
    oh, ow = s.out_size
    w = (rng.standard_normal((layer.o, layer.c, layer.k, layer.k)) / np.sqrt(layer.c * layer.k ** 2)).astype(np.float32)
    b = (rng.standard_normal(layer.o) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[layer.k] * 2,
                              strides=[layer.stride] * 2, pads=[layer.pad] * 4),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, layer.c, layer.hw, layer.hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, layer.o, oh, ow])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@dataclass
class Row:
    network: str
    layer: Layer
    batch: int
    ours_us: float
    ort_us: float
    error: float
    knobs: str
    disturbed: bool

    @property
    def ratio(self) -> float:
        return self.ours_us / self.ort_us


def measure(network: str, layer: Layer, batch: int, cfg, profile, threads: int) -> Row:
    rng = np.random.default_rng(hash((layer.name, batch)) % 2**32)
    model = conv_onnx(layer, batch, rng)
    x = rng.standard_normal((batch, layer.c, layer.hw, layer.hw)).astype(np.float32)
    built = compile_onnx(model, profile)
    vm = tvm.relax.VirtualMachine(built.executable, tvm.cpu())
    xt = common.to_tvm(x)
    sessions = common.ort_sessions(model, (threads,))
    ort_samplers, ref = common.ort_samplers(sessions, x, style="iobinding")
    err = common.check_close(f"{network} {layer.name} b{batch}", common.vm_output(vm["main"](xt)), ref)
    samplers = {"ours": common.vm_sampler(vm, xt), "ort": ort_samplers[threads]}
    timings = common.measure_rounds(samplers, cfg, f"{network} {layer.name} b{batch}")
    knobs = schedules.default_conv_knobs(profile, layer.shape(batch))
    return Row(network, layer, batch, timings["ours"].median_us, timings["ort"].median_us, err,
               f"oc{knobs.oc_block} ic{knobs.ic_block} ow{knobs.ow_tile}",
               timings["ours"].disturbed or timings["ort"].disturbed)


def totals(rows: list[Row]) -> dict[tuple[str, int], tuple[float, float]]:
    out: dict[tuple[str, int], tuple[float, float]] = {}
    for r in rows:
        ours, ort = out.get((r.network, r.batch), (0.0, 0.0))
        out[(r.network, r.batch)] = (ours + r.ours_us * r.layer.count, ort + r.ort_us * r.layer.count)
    return out


def tables(rows: list[Row]) -> tuple[str, str]:
    per_layer = common.markdown_table(
        ["network", "layer", "batch", "x", "GMAC", "knobs", "ours (ms)", "onnxruntime (ms)", "ours / ORT"],
        [[r.network, r.layer.name, r.batch, r.layer.count,
          f"{r.layer.shape(r.batch).macs * 1e-9:.3f}", r.knobs, f"{r.ours_us / 1e3:.3f}",
          f"{r.ort_us / 1e3:.3f}", common.fmt_rel(r.ratio) + (" (noisy)" if r.disturbed else "")]
         for r in rows],
        ["l", "l", "r", "r", "r", "l", "r", "r", "r"])
    tot = common.markdown_table(
        ["network", "batch", "ours (ms)", "onnxruntime (ms)", "ours / ORT"],
        [[net, b, f"{o / 1e3:.2f}", f"{t / 1e3:.2f}", common.fmt_rel(o / t)]
         for (net, b), (o, t) in totals(rows).items()])
    return per_layer, tot


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in rows})
    nets = list(dict.fromkeys(r.network for r in rows))
    fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets), 4.2), squeeze=False)
    for ax, net in zip(axes[0], nets):
        layers = list(dict.fromkeys(r.layer.name for r in rows if r.network == net))
        width = 0.8 / len(batches)
        for i, b in enumerate(batches):
            ratio = {r.layer.name: r.ratio for r in rows if r.network == net and r.batch == b}
            xs = [j + i * width for j in range(len(layers))]
            ax.bar(xs, [ratio.get(n, 0) for n in layers], width, label=f"batch {b}")
        ax.axhline(1.0, color="black", ls="--", lw=1)
        ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(layers))])
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.set_title(net)
        ax.set_ylabel("ours / onnxruntime (lower is better)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Conv layers: our blocked kernel relative to onnxruntime (MLAS), same ONNX")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--quick", action="store_true", help="AlexNet, batch 1, 3 rounds")
    common.add_timing_args(parser, repeat=5, min_repeat_ms=40.0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.networks, args.batches, args.repeat = ["AlexNet"], [1], 3
    if args.out_dir is None:
        args.out_dir = common.results_dir(quick=args.quick)
    cfg = common.apply_timing_args(args)
    common.setup_logging(args.verbose)
    start = time.time()
    profile = resolve_target("x86")
    threads = num_threads()
    # one thread (TVM_NUM_THREADS=1) writes its own files beside the all-cores ones
    stem = STEM if threads == CORES else f"{STEM}_{threads}thread"
    info = common.machine_info(profile)
    rows: list[Row] = []
    for net in args.networks:
        for batch in args.batches:
            for layer in NETWORKS[net]:
                row = measure(net, layer, batch, cfg, profile, threads)
                rows.append(row)
                print(f"{net:10s} {layer.name:26s} b{batch}: ours {row.ours_us / 1e3:8.3f} ms  "
                      f"ORT {row.ort_us / 1e3:8.3f} ms  ratio {row.ratio:.2f}  [{row.knobs}]", flush=True)
    per_layer, tot = tables(rows)
    print("\n" + tot)
    text = "\n".join([
        *common.report_header("Conv layers: blocked NCHW[x]c kernel vs onnxruntime", "bench_conv.py",
                              time.time() - start, info),
        "Each row: one single-Conv ONNX model (Conv + bias + Relu, random weights), run by "
        f"onnxruntime ({threads} intra-op threads, MLAS) and by our compiled model ({threads} TVM "
        "threads), interleaved rounds, medians. Outputs equal onnxruntime's (relative error < "
        f"{common.REL_TOL:g}). Totals weight each layer by its count (x) in the network.", "",
        "## Totals over each network's conv layers", "", tot, "",
        "## Per layer", "", per_layer, "",
        f"![ratios]({stem}.png)", ""])
    common.write_text(args.out_dir / f"{stem}.md", text)
    plot(rows, args.out_dir / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
