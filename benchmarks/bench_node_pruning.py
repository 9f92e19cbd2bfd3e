"""Node pruning of full-size models as PyTorch's exporters write them: how many conv layers
shrink at rate 0.5 (L1 criterion, kept counts in whole SIMD vectors of the host), the size of
the written file, and whether the TVM-compiled pruned model equals onnxruntime on it.

Models (torchvision layouts): ``resnet18``, ``mobilenet_v2``, ``vgg11``, ``alexnet`` from
``tvm_scalpel.models`` where it has them, else the TorchScript-like builders of
``tests/exporter_graphs`` (shared zero biases and BN constants, shape-subgraph flatten).
Usage: .venv/bin/python benchmarks/bench_node_pruning.py [--rate 0.5] [--no-compile] [--models ...]
Writes benchmarks/results/node_pruning.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import exporter_graphs  # noqa: E402

from tvm_scalpel import models  # noqa: E402
from tvm_scalpel.node_pruning import prune_coupled  # noqa: E402
from tvm_scalpel.targets import resolve_target  # noqa: E402


def builders() -> dict:
    """``tvm_scalpel.models``' builders where it has them, else the exporter-like ones here."""
    out = {}
    for name in ("resnet18", "mobilenet_v2", "vgg11", "alexnet"):
        fn = getattr(models, name, None)
        if fn is not None:
            out[name] = (fn, "tvm_scalpel.models")
        elif hasattr(exporter_graphs, name):
            out[name] = ((lambda f: lambda: f()[0])(getattr(exporter_graphs, name)),
                         "tests/exporter_graphs (TorchScript-like)")
    return out


def convs(model: onnx.ModelProto) -> dict[str, int]:
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.input[1]: inits[n.input[1]][0] for n in model.graph.node
            if n.op_type == "Conv" and n.input[1] in inits}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--models", nargs="*", default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    profile = resolve_target("x86")
    rows = []
    for name, (build, origin) in builders().items():
        if args.models and name not in args.models:
            continue
        model = build()
        t0 = time.time()
        small, report = prune_coupled(model, args.rate, "l1", block=profile.simd_width)
        secs = time.time() - t0
        before, after = convs(model), convs(small)
        shrunk = sum(after[k] < before[k] for k in before)
        refused = [r for r in report if r.reason]
        masks = sum(n.op_type == "Mul" for n in small.graph.node) - sum(
            n.op_type == "Mul" for n in model.graph.node)
        shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        sess = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"])
        y_ort = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        err = "not compiled"
        if not args.no_compile:
            import tvm

            from tvm_scalpel import compile_onnx

            built = compile_onnx(small, "x86")
            vm = tvm.relax.VirtualMachine(built.executable, tvm.cpu())
            y_tvm = vm["main"](tvm.runtime.tensor(x)).numpy()
            err = f"{np.abs(y_tvm - y_ort).max() / np.abs(y_ort).max():.1e}"
        mb = lambda m: len(m.SerializeToString()) / 1e6  # noqa: E731
        rows.append([name, origin, f"{shrunk}/{len(before)}", len(refused), masks,
                     f"{mb(model):.1f} -> {mb(small):.1f}", f"{secs:.1f}", err])
        print(rows[-1], flush=True)
        for r in refused:
            print(f"  {r.name} ({r.node}): {r.reason}")
    head = ["model", "builder", "convs shrunk", "layers refused", "masks left", "MB", "prune s", "TVM vs ORT rel. err"]
    table = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                      + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
    print(table)
    out = ROOT / "benchmarks" / "results" / "node_pruning.md"
    out.write_text(f"# Node pruning at rate {args.rate} (L1, block {profile.simd_width})\n\n"
                   f"Host target x86 (fp32 SIMD width {profile.simd_width}).\n\n{table}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
