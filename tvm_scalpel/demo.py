"""``make demo``: LeNet-300-100 pruned the Scalpel way for this CPU, against dense.

Builds the LeNet-300-100 that ships with the project (seeded weights; training arrives with node
pruning), prunes it twice at the same rate, traditional (g = 1, Han et al.) and Scalpel (g = the
CPU's fp32 SIMD width), compiles all variants with tvm-scalpel, checks them against onnxruntime
on the same ONNX model, and prints one table: model bytes and batch-1 latency.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import configure_threads
from .api import compile_onnx, export_library, prune_onnx
from .cli import format_table
from .models import lenet_300_100
from .onnx_io import atomic_output, save_onnx
from .targets import resolve_target
from .timing import run_ort, time_ort, time_tvm

log = logging.getLogger("tvm_scalpel.demo")


@dataclass
class Row:
    variant: str
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
    parser.add_argument("--out", default="demo_out", help="folder for the table, plot, models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    configure_threads()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = resolve_target("x86")
    g = profile.simd_width
    rng = np.random.default_rng(2024)
    x = rng.standard_normal((1, 784)).astype(np.float32)
    dense = lenet_300_100()
    bias_bytes = 4 * (300 + 100 + 10)
    print(f"LeNet-300-100, batch 1, target {profile.target.attrs.get('mcpu')} "
          f"(fp32 SIMD width {g}), pruning rate {args.rate}")

    rows: list[Row] = []
    ort_us, ort_threads = time_ort(dense, x)
    rows.append(Row(f"onnxruntime dense ({ort_threads} thread{'s' * (ort_threads > 1)})",
                    _weight_bytes(dense), ort_us, None, None))

    def add(variant: str, model, mode: str, weight_bytes: int, save_as: str | None = None) -> None:
        built = compile_onnx(model, profile, mode=mode)
        ref = run_ort(model, x)
        import tvm

        vm = tvm.relax.VirtualMachine(built.executable, tvm.cpu())
        y = vm["main"](tvm.runtime.tensor(x)).numpy()
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        t = time_tvm(built.executable, x)
        rows.append(Row(variant, weight_bytes, t.python_us, t.vm_us, err))
        if save_as:
            export_library(built.executable, out / f"{save_as}.so")
            save_onnx(model, out / f"{save_as}.onnx")

    add("TVM dense (tvm-scalpel kernels)", dense, "dense", _weight_bytes(dense))
    trad = prune_onnx(dense, args.rate, profile, group_width=1)
    add(f"traditional pruning (g=1, CSR), rate {args.rate}", trad.model, "sparse",
        sum(r.sparse_bytes for r in trad.layers) + bias_bytes)
    scal = prune_onnx(dense, args.rate, profile, group_width=g)
    add(f"Scalpel (g={g}), rate {args.rate}", scal.model, "auto",
        sum(r.sparse_bytes for r in scal.layers) + bias_bytes, save_as="lenet_scalpel")

    base = rows[0].latency_us
    table = format_table(
        ["variant", "weight bytes", "latency us", "vs onnxruntime", "in-VM us", "max rel err vs ORT"],
        [[r.variant, r.weight_bytes, f"{r.latency_us:.1f}", f"{r.latency_us / base:.2f}x",
          "-" if r.vm_us is None else f"{r.vm_us:.1f}",
          "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}"] for r in rows],
    )
    print(table)
    note = ("latency: one call from Python on a ready input, median; in-VM: the same without "
            "Python's call cost (TVM time_evaluator).")
    print(note)
    with atomic_output(out / "demo.md") as tmp:
        Path(tmp).write_text(f"# tvm-scalpel demo\n\n```\n{table}\n```\n\n{note}\n")
    _plot(rows, out / "demo.png")
    print(f"wrote {out}/demo.md, {out}/demo.png, {out}/lenet_scalpel.onnx and {out}/lenet_scalpel.so")
    return 0


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 3.6))
    names = [r.variant.split(",")[0] for r in rows]
    colors = ["#888888", "#4c72b0", "#dd8452", "#55a868"][: len(rows)]
    ax_t.barh(names, [r.latency_us for r in rows], color=colors)
    ax_t.set_xlabel("batch-1 latency (us, lower is better)")
    ax_b.barh(names, [r.weight_bytes / 1024 for r in rows], color=colors)
    ax_b.set_xlabel("weight storage (KiB)")
    ax_b.set_yticklabels([])
    for ax in (ax_t, ax_b):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("LeNet-300-100 on this CPU: dense vs traditional vs Scalpel pruning")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
