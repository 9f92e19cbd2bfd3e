"""``tvm-scalpel``: prune, compile and run ONNX models the Scalpel way.

Every user error ends as one line on stderr and exit status 2 (1 for an unexpected failure),
never a traceback, and never with a half-written output file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import ScalpelError

log = logging.getLogger("tvm_scalpel")


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _group_width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_prune(args: argparse.Namespace) -> int:
    from .api import prune_onnx
    from .onnx_io import load_onnx, save_onnx
    from .targets import resolve_target

    profile = resolve_target(args.target)
    model = load_onnx(args.model)
    outcome = prune_onnx(model, args.rate, profile, args.group_width, args.importance)
    if not outcome.layers:
        log.warning("no dense layer with a constant weight found: the model is written unchanged")
    save_onnx(outcome.model, args.output)
    rows = []
    for layer in outcome.layers:
        rows.append([
            outcome.initializer_names.get(layer.index, layer.name),
            f"{layer.shape[0]}x{layer.shape[1]}",
            layer.group_width,
            f"{layer.rate:.3f}",
            layer.dense_bytes,
            layer.sparse_bytes,
        ])
    total_dense = sum(r.dense_bytes for r in outcome.layers)
    total_sparse = sum(r.sparse_bytes for r in outcome.layers)
    rows.append(["total", "", "", "", total_dense, total_sparse])
    print(format_table(["layer", "shape (NxK)", "g", "rate", "dense bytes", "grouped-sparse bytes"], rows))
    print(f"wrote {args.output} (target {profile.name}, importance {args.importance})")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .api import compile_onnx, export_library
    from .onnx_io import initializer_names, load_onnx
    from .targets import resolve_target

    if Path(args.output).suffix != ".so":
        raise ScalpelError(f"{args.output}: the output library must end in .so")
    profile = resolve_target(args.target)
    model = load_onnx(args.model)
    outcome = compile_onnx(model, profile, mode=args.mode)
    export_library(outcome.executable, args.output)
    names = initializer_names(model, [d.weight for d in outcome.layers])
    rows = [[name or d.name, f"{d.shape[0]}x{d.shape[1]}", f"{1 - d.density:.3f}", d.group_width or "-",
             d.kernel, f"{d.estimated_speedup:.2f}" if d.group_width else "-"] for d, name in zip(outcome.layers, names)]
    print(format_table(["layer", "shape (NxK)", "zeros", "g", "kernel", "est. speedup"], rows))
    sparse = sum(d.kernel == "grouped-sparse" for d in outcome.layers)
    print(f"{sparse} of {len(outcome.layers)} dense layers went grouped-sparse; wrote {args.output}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from .api import load_library, run_library
    from .onnx_io import atomic_output
    from .threads import configure_threads

    configure_threads()
    path = Path(args.input)
    if not path.is_file():
        raise ScalpelError(f"{path}: no such file")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception:
        raise ScalpelError(f"{path}: not a .npy array") from None
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise ScalpelError(f"{path}: expected a float32 array, got {getattr(x, 'dtype', type(x).__name__)}")
    vm = load_library(args.model)
    y = run_library(vm, x)
    with atomic_output(args.output) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, y)
    print(f"wrote {args.output}: shape {tuple(y.shape)} {y.dtype}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tvm-scalpel", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the passes do")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    target_help = "'x86' (the host CPU, default) or a TVM JSON target string"

    p = sub.add_parser("prune", help="SIMD-aware weight pruning; writes a standard ONNX model")
    p.add_argument("model", help="input ONNX model")
    p.add_argument("-o", "--output", required=True, help="pruned ONNX model to write")
    p.add_argument("--target", default="x86", help=target_help)
    p.add_argument("--group-width", type=_group_width, default=None,
                   help="g, weights per group (default: the target's fp32 SIMD width; 1 = unstructured)")
    p.add_argument("--rate", type=_rate, default=0.9, help="fraction of each layer's weights to remove")
    p.add_argument("--importance", choices=["rms", "max", "mean"], default="rms")
    p.set_defaults(func=cmd_prune)

    c = sub.add_parser("compile", help="compile to a shared library, sparse layers grouped-sparse")
    c.add_argument("model", help="input ONNX model (pruned or not)")
    c.add_argument("-o", "--output", required=True, help="library to write (.so)")
    c.add_argument("--target", default="x86", help=target_help)
    c.add_argument("--mode", choices=["auto", "sparse", "dense"], default="auto",
                   help="auto: sparse only where the cost model says it pays (default)")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run a compiled library on a .npy input")
    r.add_argument("model", help="library written by 'tvm-scalpel compile'")
    r.add_argument("--input", required=True, help="input array (.npy, float32)")
    r.add_argument("-o", "--output", required=True, help="output array to write (.npy)")
    r.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints usage + one error line and exits 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except ScalpelError as err:
        print(f"tvm-scalpel: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tvm-scalpel: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours: still one line, with a hint for the report
        text = [line for line in str(err).strip().splitlines() if line.strip()]
        print(f"tvm-scalpel: internal error: {type(err).__name__}: {text[-1] if text else ''} "
              "(run with TVM_SCALPEL_DEBUG=1 for a traceback)", file=sys.stderr)
        if __import__("os").environ.get("TVM_SCALPEL_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
