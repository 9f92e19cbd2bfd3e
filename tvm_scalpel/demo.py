"""``make demo``: LeNet-300-100 trained, pruned the Scalpel way for this CPU, against dense.

Trains the LeNet-300-100 that ships with the project on the embedded MNIST sample (inside TVM;
or loads the one it trained before), prunes it twice at the same rate, traditional (g = 1, Han
et al.) and Scalpel (g = the CPU's fp32 SIMD width, the CPU policy for FC layers), fine-tunes
both with the pruned weights held at zero, compiles every variant with tvm-scalpel, checks them
against onnxruntime on the same ONNX model, and prints one table: test accuracy, model bytes,
batch-1 latency.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import configure_threads
from .api import compile_onnx, export_library
from .tables import format_table
from .models import lenet_300_100
from .onnx_io import atomic_output, save_onnx
from .targets import resolve_target
from .timing import run_ort, time_ort, time_tvm

log = logging.getLogger("tvm_scalpel.demo")


@dataclass
class Row:
    variant: str
    accuracy: float
    weight_bytes: int
    latency_us: float
    vm_us: float | None
    max_rel_err: float | None


def _weight_bytes(model) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.92, help="pruning rate (default 0.92)")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs of the dense model")
    parser.add_argument("--fine-tune", type=int, default=4, help="fine-tuning epochs per pruning step")
    parser.add_argument("--out", default="demo_out", help="folder for the table, plot, models")
    parser.add_argument("--retrain", action="store_true", help="train again even if a model is cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    configure_threads()
    from .data import mnist_sample
    from .finetune import TrainSettings, accuracy, prune_and_fine_tune, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = resolve_target("x86")
    g = profile.simd_width
    data = mnist_sample()
    x = data.x_test[:1].copy()
    print(f"LeNet-300-100 on {data.name}: {len(data.x_train)} train / {len(data.x_test)} test images; "
          f"target {profile.target.attrs.get('mcpu')} (fp32 SIMD width {g})")

    cached = out / "lenet_300_100_trained.onnx"
    if cached.exists() and not args.retrain:
        dense = onnx.load(str(cached))
        print(f"1. loaded the model trained before from {cached} (--retrain to train again)")
    else:
        print(f"1. training LeNet-300-100 in TVM for {args.epochs} epochs")
        dense, _ = train(lenet_300_100(), data, TrainSettings(epochs=args.epochs))
        save_onnx(dense, cached)
    base = accuracy(dense, data)
    tune = TrainSettings(epochs=args.fine_tune)
    print(f"2. traditional pruning (g=1) to {args.rate}, fine-tuning")
    trad = prune_and_fine_tune(dense, data, args.rate, 1, tune, profile, last_layer_rate=0.7,
                               schedule=(0.5, 0.75, 0.85))
    print(f"3. Scalpel SIMD-aware pruning (g={g}) to {args.rate}, fine-tuning")
    scal = prune_and_fine_tune(dense, data, args.rate, g, tune, profile, last_layer_rate=0.7,
                               schedule=(0.5, 0.75, 0.85))
    print("4. compiling and timing (batch 1)")
    bias_bytes = 4 * (300 + 100 + 10)

    rows: list[Row] = []
    ort_us, ort_threads = time_ort(dense, x)
    rows.append(Row(f"onnxruntime dense ({ort_threads} thread{'s' * (ort_threads > 1)})", base,
                    _weight_bytes(dense), ort_us, None, None))

    def add(variant: str, model, acc: float, mode: str, group_width: int | None, save_as: str | None = None) -> None:
        import tvm

        built = compile_onnx(model, profile, mode=mode)
        ref = run_ort(model, x)
        vm = tvm.relax.VirtualMachine(built.executable, tvm.cpu())
        y = vm["main"](tvm.runtime.tensor(x)).numpy()
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        t = time_tvm(built.executable, x)
        nbytes = _weight_bytes(model) if group_width is None else _sparse_bytes(model, group_width) + bias_bytes
        rows.append(Row(variant, acc, nbytes, t.python_us, t.vm_us, err))
        if save_as:
            export_library(built.executable, out / f"{save_as}.so")
            save_onnx(model, out / f"{save_as}.onnx")

    add("TVM dense (tvm-scalpel kernels)", dense, base, "dense", None)
    add(f"traditional pruning (g=1, CSR), rate {args.rate}", trad.model, trad.accuracy, "sparse", 1)
    add(f"Scalpel (g={g}), rate {args.rate}", scal.model, scal.accuracy, "auto", g, save_as="lenet_scalpel")

    base_us = rows[0].latency_us
    table = format_table(
        ["variant", "test accuracy", "weight bytes", "latency us", "vs onnxruntime", "in-VM us",
         "max rel err vs ORT"],
        [[r.variant, f"{r.accuracy * 100:.2f}%", r.weight_bytes, f"{r.latency_us:.1f}",
          f"{r.latency_us / base_us:.2f}x", "-" if r.vm_us is None else f"{r.vm_us:.1f}",
          "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}"] for r in rows],
    )
    print(table)
    note = ("latency: one call from Python on a ready input, median; in-VM: the same without "
            "Python's call cost (TVM time_evaluator). Weight bytes: dense float32, or grouped-"
            "sparse values + one int32 index per group + int32 row pointers, plus biases. Pruning "
            f"rate {args.rate} for the hidden layers, 0.7 for the class-score layer.")
    print(note)
    with atomic_output(out / "demo.md") as tmp:
        Path(tmp).write_text(f"# tvm-scalpel demo\n\n```\n{table}\n```\n\n{note}\n")
    _plot(rows, out / "demo.png")
    print(f"wrote {out}/demo.md, {out}/demo.png, {out}/lenet_scalpel.onnx and {out}/lenet_scalpel.so")
    return 0


def _sparse_bytes(model, g: int) -> int:
    """Grouped-sparse bytes of every 2-D weight of ``model`` (as [N, K] from Gemm transB=1)."""
    from onnx import numpy_helper

    from .format import GroupedSparseMatrix

    return sum(GroupedSparseMatrix.from_dense(numpy_helper.to_array(t), g).nbytes
               for t in model.graph.initializer if len(t.dims) == 2)


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b, ax_a) = plt.subplots(1, 3, figsize=(14, 3.6))
    names = [r.variant.split(", rate")[0] for r in rows]
    colors = ["#888888", "#4c72b0", "#dd8452", "#55a868"][: len(rows)]
    ax_t.barh(names, [r.latency_us for r in rows], color=colors)
    ax_t.set_xlabel("batch-1 latency (us, lower is better)")
    ax_b.barh(names, [r.weight_bytes / 1024 for r in rows], color=colors)
    ax_b.set_xlabel("weight storage (KiB)")
    ax_b.set_yticklabels([])
    ax_a.barh(names, [r.accuracy * 100 for r in rows], color=colors)
    ax_a.set_xlim(min(r.accuracy for r in rows) * 100 - 3, 100)
    ax_a.set_xlabel("test accuracy (%)")
    ax_a.set_yticklabels([])
    for ax in (ax_t, ax_b, ax_a):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("LeNet-300-100 on this CPU: dense vs traditional vs Scalpel pruning")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
