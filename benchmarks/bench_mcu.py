"""The microcontroller: LeNet-300-100 and LeNet-5 on a Cortex-M4F, counted under qemu.

For each network: trained in TVM on the embedded MNIST sample, then three variants, each
compiled to a C project by the generator (``compile --target cortex-m4``) and run
by the firmware runner (tvm_scalpel/mcu/firmware.py) on every test image:

* dense: the trained model;
* traditional: weight pruning without SIMD awareness (g = 1) of the FC and CONV layers at the
  paper's rates, fine-tuned;
* Scalpel: ``prune --policy rules --target cortex-m4`` (the paper's rule for microcontrollers:
  weight pruning of FC and CONV), at the same rates, fine-tuned; with ``--db`` (a database
  from ``tvm-scalpel tune --target cortex-m4``) each layer's g comes from it
  (``group_width="auto"``).

Reported: instructions per inference (qemu ``-icount``: an instruction count, not a time on
hardware; machine-independent, so the results are not kept per machine class), relative to
dense, flash and RAM bytes (the generator's model.json, and arm-none-eabi-size's reading of the
compiled objects), accuracy of the firmware on the test split, and the firmware's agreement with
onnxruntime on the same pruned ONNX. Writes benchmarks/results/mcu.md and mcu.png (quick/ below
it with --quick).

    make setup-mcu
    .venv/bin/python benchmarks/bench_mcu.py            # ~10 min on 2 cores (training included)
    .venv/bin/python benchmarks/bench_mcu.py --quick    # smoke run: few epochs, 100 test images
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from common import (
    RESULTS_DIR,
    command_line,
    fmt_bytes,
    markdown_table,
    ort_run,
    ort_session,
    rel_max_error,
    setup_logging,
    write_text,
)

import tvm_scalpel
from tvm_scalpel import flows
from tvm_scalpel.data import mnist_sample
from tvm_scalpel.mcu.firmware import firmware_for, mcu_ready
from tvm_scalpel.mcu.manifest import load_project

log = logging.getLogger("bench_mcu")

TOLERANCE = 1e-4  # fp32 firmware against onnxruntime, max |a - b| / max |ref|


@dataclass(frozen=True)
class Network:
    label: str
    builtin: str
    rate: float  # FC (and CONV, below) weights removed, the paper's rates
    last_layer_rate: float
    conv_rate: float | None
    epochs: int
    quick_epochs: int


NETWORKS = [
    Network("LeNet-300-100", "lenet-300-100", 0.92, 0.7, None, epochs=8, quick_epochs=2),
    Network("LeNet-5", "lenet5", 0.9, 0.7, 0.8, epochs=4, quick_epochs=1),
]


@dataclass
class Row:
    network: str
    variant: str
    numerics: str
    group_widths: str
    weights_kept: float
    instructions: int
    flash_json: int | None
    ram_json: int | None
    flash_measured: int
    ram_measured: int
    accuracy: float
    accuracy_ort: float
    rel_err: float
    dense_instructions: int = 0

    @property
    def relative(self) -> float:
        return self.instructions / self.dense_instructions


def weights_kept(model: onnx.ModelProto) -> float:
    """Fraction of non-zero weights over the FC and CONV weight tensors (rank >= 2)."""
    total = nonzero = 0
    for init in model.graph.initializer:
        if len(init.dims) >= 2:
            a = onnx.numpy_helper.to_array(init)
            total, nonzero = total + a.size, nonzero + int(np.count_nonzero(a))
    return nonzero / total


def compile_project(model: onnx.ModelProto, folder: Path, numerics: str | None) -> None:
    """What ``tvm-scalpel compile --target cortex-m4 -o folder [--numerics q15]`` writes
    (q15 calibrated on the MNIST sample, the command's default)."""
    flows.compile_mcu(model, folder, numerics=numerics or "fp32")


def generator_numerics() -> list[str | None]:
    """fp32 (None) and every fixed-point variant the generator has."""
    from tvm_scalpel.mcu.project import NUMERICS

    return [None] + [n for n in NUMERICS if n != "fp32"]


def measure(network: Network, variant: str, model: onnx.ModelProto, data, numerics: str | None,
            work: Path) -> Row:
    folder = work / f"{network.builtin}-{variant}-{numerics or 'fp32'}"
    t0 = time.time()
    compile_project(model, folder, numerics)
    project = load_project(folder)
    x = data.x_test.reshape((-1, *project.input.shape[1:])).astype(np.float32)
    with firmware_for(project) as firmware:
        run = firmware.run(x)
        sizes = firmware.flash_bytes, firmware.ram_bytes
    ref = ort_run(ort_session(model, 1), x)
    got = run.outputs.reshape(ref.shape)
    err = rel_max_error(got, ref)
    doc = json.loads((folder / "model.json").read_text())
    widths = sorted({int(layer.get("group_width", 0)) for layer in doc.get("layers", [])
                     if "sparse" in str(layer.get("kind", ""))})
    row = Row(network.label, variant, project.numerics, ", ".join(map(str, widths)) or "–",
              weights_kept(model), run.per_call, project.flash_bytes, project.ram_bytes, *sizes,
              float(np.mean(np.argmax(got, 1) == data.y_test)),
              float(np.mean(np.argmax(ref, 1) == data.y_test)), err)
    spread = (int(run.instructions.min()), int(run.instructions.max()))
    log.info("%s %s %s: %d instructions/inference (range %s), accuracy %.2f%% (onnxruntime "
             "%.2f%%), rel. error %.1e, %.0f s", network.label, variant, row.numerics,
             run.per_call, spread, row.accuracy * 100, row.accuracy_ort * 100, err, time.time() - t0)
    if project.numerics == "fp32" and err > TOLERANCE:
        log.error("%s %s: firmware differs from onnxruntime by %.2e (> %g)", network.label,
                  variant, err, TOLERANCE)
    return row


def trained_model(network: Network, data, epochs: int, cache: Path | None) -> onnx.ModelProto:
    """The network trained in TVM; with ``cache``, read from / written to cache/<name>.onnx."""
    from tvm_scalpel.onnx_io import load_onnx, save_onnx

    path = None if cache is None else cache / f"{network.builtin}-{epochs}ep.onnx"
    if path is not None and path.is_file():
        log.info("%s: trained model from %s", network.label, path)
        return load_onnx(path)
    t0 = time.time()
    model = flows.train(network.builtin, data, epochs=epochs,
                        training=flows.Training(progress=False)).model
    log.info("%s trained (%d epochs) in %.0f s", network.label, epochs, time.time() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_onnx(model, path)
    return model


def variants(network: Network, trained: onnx.ModelProto, data, fine_tune: int, db: Path | None):
    training = flows.Training(progress=False)
    common = dict(target="cortex-m4", last_layer_rate=network.last_layer_rate,
                  conv_rate=network.conv_rate, fine_tune=fine_tune, data=data, training=training)
    yield "dense", trained
    yield "traditional (g=1)", flows.prune(trained, network.rate, group_width=1, **common).model
    yield "Scalpel (rules)", flows.prune(trained, network.rate, policy="rules", **common).model
    if db is not None:  # each layer's g by instruction count under qemu (tune --target cortex-m4)
        t0 = time.time()
        tuned = flows.tune(trained, db, target="cortex-m4", rate=network.rate,
                           last_layer_rate=network.last_layer_rate, progress=False)
        log.info("%s tuned in %.0f s: g %s", network.label, time.time() - t0,
                 [r.best.group_width for r in tuned])
        yield "Scalpel (rules, g tuned)", flows.prune(trained, network.rate, policy="rules",
                                                      group_width="auto", db=db, **common).model


def table(rows: list[Row]) -> str:
    headers = ["network", "variant", "numerics", "g", "weights kept", "instructions / inference",
               "vs dense", "flash (model.json)", "flash (measured)", "RAM (model.json)",
               "RAM (measured)", "accuracy (firmware)", "accuracy (onnxruntime)", "max rel. error"]
    return markdown_table(headers, [[
        r.network, r.variant, r.numerics, r.group_widths, f"{r.weights_kept * 100:.1f}%",
        f"{r.instructions:,}", f"{r.relative:.3f}x",
        fmt_bytes(r.flash_json) if r.flash_json is not None else "–", fmt_bytes(r.flash_measured),
        fmt_bytes(r.ram_json) if r.ram_json is not None else "–", fmt_bytes(r.ram_measured),
        f"{r.accuracy * 100:.2f}%", f"{r.accuracy_ort * 100:.2f}%", f"{r.rel_err:.1e}"]
        for r in rows])


def plot(rows: list[Row], path: Path) -> None:
    """Instructions and flash relative to dense, one group of bars per network (the style of
    the paper's figure 17)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = list(dict.fromkeys(r.network for r in rows))
    labels = list(dict.fromkeys(f"{r.variant} {r.numerics}" for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (title, value) in zip(axes, [
            ("instructions per inference (qemu -icount)", lambda r: r.relative),
            ("flash bytes of the model", lambda r: r.flash_measured / dense_flash[r.network])]):
        dense_flash = {r.network: r.flash_measured for r in rows if r.variant == "dense"}
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ys = [next((value(r) for r in rows if r.network == n and f"{r.variant} {r.numerics}"
                        == label), 0.0) for n in networks]
            bars = ax.bar(np.arange(len(networks)) + (i - (len(labels) - 1) / 2) * width, ys,
                          width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(np.arange(len(networks)), networks)
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_ylabel("relative to dense")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), frameon=False, fontsize=8)
    fig.suptitle("Cortex-M4F (qemu mps2-an386): dense = 1.0", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs, 100 test images: "
                        "checks the script, not the claims")
    parser.add_argument("--networks", nargs="*", default=[n.label for n in NETWORKS],
                        choices=[n.label for n in NETWORKS])
    parser.add_argument("--tune", action="store_true", help="also Scalpel with each layer's g "
                        "tuned by instruction count (tune --target cortex-m4; database in the "
                        "results folder)")
    parser.add_argument("--trained", type=Path, default=None, metavar="DIR",
                        help="keep the trained models in DIR and reuse them on the next run")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)
    reason = mcu_ready()
    if reason is not None:
        print(f"bench_mcu: {reason}", file=sys.stderr)
        return 2
    out = args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    data = mnist_sample()
    if args.quick:
        data = type(data)(data.x_train, data.y_train, data.x_test[:100], data.y_test[:100], data.name)
    fine_tune = 1 if args.quick else 2
    numerics = generator_numerics()
    start = time.time()
    rows: list[Row] = []
    db_path = out / "mcu_tuning.jsonl"
    if args.tune:  # counts of this code only: an earlier run's kernels may have counted otherwise
        db_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-mcu-") as tmp:
        for network in NETWORKS:
            if network.label not in args.networks:
                continue
            epochs = network.quick_epochs if args.quick else network.epochs
            trained = trained_model(network, data, epochs, args.trained)
            db = db_path if args.tune else None
            for variant, model in variants(network, trained, data, fine_tune, db):
                for kind in numerics:
                    rows.append(measure(network, variant, model, data, kind, Path(tmp)))
    for r in rows:
        r.dense_instructions = next(d.instructions for d in rows if d.network == r.network
                                    and d.variant == "dense" and d.numerics == r.numerics)
    print(table(rows))
    text = "\n".join([
        "# Cortex-M4F: instructions, flash and accuracy (LeNet-300-100, LeNet-5)", "",
        f"Generated by `{command_line()}` in {(time.time() - start) / 60:.1f} min "
        f"(tvm-scalpel {tvm_scalpel.__version__ if hasattr(tvm_scalpel, '__version__') else ''}).",
        "",
        "Each variant is compiled to a C project (`compile --target cortex-m4`), built for the "
        "M4F (`-mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -O2`) and run under "
        "`qemu-system-arm -M mps2-an386` on every image of the MNIST sample's test split "
        f"({len(data.x_test)} images). **Instructions** are counted by qemu's `-icount` and the "
        "board's timers around each call of `scalpel_model_run` (README, \"Cortex-M4 under "
        "qemu\"): an instruction count, the same on every machine, not a time on hardware. "
        "**Flash** is the model's const data and code, **RAM** its static buffers (no stack), "
        "as the generator's model.json states them and as arm-none-eabi-size measures the "
        "compiled objects. Accuracy is the firmware's top-1 on the test split; the onnxruntime "
        "column and the relative error compare it with the same ONNX model on the host.",
        "",
        f"Rates: LeNet-300-100 {NETWORKS[0].rate} of the FC weights ({NETWORKS[0].last_layer_rate}"
        f" of the last layer's); LeNet-5 {NETWORKS[1].rate} of the FC weights "
        f"({NETWORKS[1].last_layer_rate} of the last), {NETWORKS[1].conv_rate} of the CONV "
        f"weights; fine-tuned {fine_tune} epochs with the pruned weights held at zero. The "
        "rules' g on the Cortex-M4 is 2 (no fp32 SIMD, but the DSP extension's `smlad` "
        "multiplies two 16-bit lanes at once: one q15 group of 2 is one instruction; in fp32 "
        "the pair halves the index loads); the tuned rows take each FC layer's g from a "
        "database of `tune --target cortex-m4` (CONV layers keep the rules' g). The tuner "
        "measures instructions only: its wider groups cost accuracy, shown beside them.",
        "", table(rows), "", "![relative instructions and flash](mcu.png)", ""])
    write_text(out / "mcu.md", text)
    plot(rows, out / "mcu.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
