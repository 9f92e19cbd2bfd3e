"""``tvm-scalpel``: prune, compile and run ONNX models the Scalpel way.

Every user error ends as one line on stderr and exit status 2 (1 for an unexpected failure),
never a traceback, and never with a half-written output file; an output that is one of the
inputs is refused. Ctrl-C, at any moment: ``tvm-scalpel: interrupted``, exit status 130.
Nothing heavy (TVM, numpy, onnx) is imported at module level: see interrupts.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .checks import (
    IMPORTANCES,
    MODES,
    NODE_CRITERIA,
    NUMERICS,
    OPTIMIZERS,
    POLICIES,
    parse_group_width,
    parse_non_negative,
    parse_positive,
    parse_rate,
    parse_seconds,
)
from .errors import ScalpelError

log = logging.getLogger("tvm_scalpel")


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    from .tables import format_table as table  # kept here for scripts that imported it

    return table(headers, rows)


def _training(args: argparse.Namespace):
    from .flows import Training

    return Training(lr=args.lr, optimizer=args.optimizer, batch_size=args.batch_size,
                    seed=args.seed, progress=not args.quiet)


def _print_accuracy(label: str, value: float | None) -> None:
    if value is not None:
        print(f"test accuracy {label}: {value * 100:.2f}%")


def cmd_prune(args: argparse.Namespace) -> int:
    from . import flows
    from .onnx_io import save_onnx
    from .targets import resolve_target

    profile = resolve_target(args.target)
    try:
        result = flows.prune(
            args.model, args.rate, target=profile, group_width=args.group_width,
            importance=args.importance, last_layer_rate=args.last_layer_rate,
            conv_rate=args.conv_rate, nodes=args.nodes, nodes_criterion=args.nodes_criterion,
            policy=args.policy, rpc=args.rpc, db=args.db, fine_tune=args.fine_tune,
            max_accuracy_drop=args.max_accuracy_drop, mask_epochs=args.mask_epochs,
            data=args.data, training=_training(args), strict=args.strict,
            outputs=args.outputs, write_back=not args.cut_only)
    except flows.NoRateFound as err:
        _print_prune_steps(err.result)
        raise
    _print_prune_steps(result)
    if result.cut is not None:
        print(result.cut_summary())
    if result.weights is None:
        save_onnx(result.model, args.output)
        _print_prune_accuracies(result, "after pruning")
        print(f"wrote {args.output} (target {profile.name}: node pruning only)")
        return 0
    if result.measured is not None:
        print(format_table(flows.MEASURED_HEADERS, result.measured_rows()))
    save_onnx(result.model, args.output)
    print(format_table(flows.PRUNE_HEADERS, result.rows()))
    _print_prune_accuracies(result, "after pruning" + (" and fine-tuning" if args.fine_tune else ""))
    print(f"wrote {args.output} (target {profile.name}, importance {args.importance})")
    return 0


def _print_prune_steps(result) -> None:
    """The policy's plan, node pruning and the rate search, as far as they ran."""
    from . import flows

    if result.policy is not None:
        print(f"policy for {result.target.name} ({result.target.parallelism} parallelism):")
        print(format_table(flows.POLICY_HEADERS, result.policy_rows()))
    if result.nodes is not None:
        print(format_table(flows.NODE_HEADERS, result.node_rows()))
        print(f"node pruning removed {result.nodes.removed_fraction * 100:.1f}% of the prunable nodes")
    if result.search is not None:
        print(format_table(flows.SEARCH_HEADERS, result.search_rows()))
        if result.rate is not None:
            print(f"largest rate within {result.max_accuracy_drop} points: {result.rate}")


def _print_prune_accuracies(result, label: str) -> None:
    """Accuracy of the input and of the model written, when there is data."""
    if result.data is None:
        return
    _print_accuracy("before pruning", result.accuracy_before)
    _print_accuracy(label, result.accuracy_after)


def cmd_tune(args: argparse.Namespace) -> int:
    from . import flows
    from .targets import resolve_target

    profile = resolve_target(args.target)
    results = flows.tune(args.model, args.db, target=profile, rate=args.rate,
                         last_layer_rate=args.last_layer_rate, batch=args.batch, trials=args.trials, dense_trials=args.dense_trials,
                         rpc=args.rpc, progress=not args.quiet, name=args.model)
    convs = flows.tune_convs(args.model, args.db, target=profile, batch=args.batch,
                             trials=args.conv_trials if args.rpc is None else 0,
                             progress=not args.quiet)
    if results:
        print(format_table(flows.tune_headers(results), [r.row() for r in results]))
    if convs:
        print(format_table(flows.CONV_TUNE_HEADERS, [r.row() for r in convs]))
    new = sum(r.new_trials for r in results) + sum(r.new_trials for r in convs)
    print(f"{new} new measurements; database {args.db} (target "
          f"{profile.name}, rate {args.rate}, batch {args.batch})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import flows
    from .onnx_io import save_onnx

    def loaded(data) -> None:  # printed before training: Ctrl-C tests and users wait for it
        print(f"data: {data.name}, {len(data.x_train)} train / {len(data.x_test)} test samples", flush=True)

    result = flows.train(args.model, args.data, epochs=args.epochs,
                         training=_training(args), on_data=loaded)
    _print_accuracy("before training", result.accuracy_before)
    print(format_table(flows.TRAIN_HEADERS, result.rows()))
    save_onnx(result.model, args.output)
    _print_accuracy("after training", result.accuracy_after)
    print(f"wrote {args.output}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from . import flows
    from .targets import resolve_target

    mcu_only = [f"--{name.replace('_', '-')}" for name in ("flash_bytes", "ram_bytes", "numerics")
                if getattr(args, name) is not None]
    if resolve_target(args.target).name == "cortex-m4":
        return _compile_mcu(args)
    if mcu_only:
        raise ScalpelError(f"{', '.join(mcu_only)}: only with --target cortex-m4")
    result = flows.compile(args.model, args.output, target=args.target, mode=args.mode,
                           db=args.db, batch=args.batch, outputs=args.outputs)
    if result.cut is not None:
        print(result.cut.summary(written_back=False))
    print(format_table(flows.COMPILE_HEADERS, result.rows()))
    print(f"{result.sparse_layers} of {len(result.layers)} dense layers went grouped-sparse; "
          f"wrote {args.output}")
    return 0


def _compile_mcu(args: argparse.Namespace) -> int:
    """--target cortex-m4: a C project folder, its size table printed."""
    from . import flows
    from .mcu.project import SIZE_HEADERS

    for flag, given in (("--db", args.db), ("--batch", args.batch)):
        if given is not None:
            raise ScalpelError(f"{flag} is not taken with --target cortex-m4 (one sample per call)")
    project = flows.compile_mcu(args.model, args.output, mode=args.mode, flash_bytes=args.flash_bytes,
                                ram_bytes=args.ram_bytes, numerics=args.numerics or "fp32",
                                data=args.data)
    print(format_table(SIZE_HEADERS, project.rows()))
    sparse = sum("grouped-sparse" in layer.kind for layer in project.layers)
    print(f"{sparse} of {len(project.layers)} layers grouped-sparse; flash {project.flash_bytes} bytes "
          f"(constants), RAM {project.ram_bytes} bytes (activations), {project.numerics}; "
          f"wrote {args.output}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from .onnx_io import atomic_output
    from .threads import configure_threads

    path = Path(args.input)
    if not path.is_file():
        raise ScalpelError(f"{path}: no such file")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception:
        raise ScalpelError(f"{path}: not a .npy array") from None
    if not isinstance(x, np.ndarray):
        raise ScalpelError(f"{path}: not a .npy array (a .npz archive?)")
    if Path(args.model).is_dir():  # a Cortex-M4 project folder: under qemu, counted
        return _run_mcu(args, path, x)
    configure_threads()
    npz = Path(args.output).suffix == ".npz"
    try:
        if args.rpc is not None:
            from .remote import run_remote

            if not Path(args.model).is_file():
                raise ScalpelError(f"{args.model}: no such file")
            outputs = run_remote(args.rpc, args.model, x, named=True)
        else:
            from .api import library_signature, load_library, run_library_outputs

            vm = load_library(args.model)
            signature = library_signature(vm)
            if signature is not None:  # refuse before running, when the library says how many
                names = [t.name for t in signature.outputs]
                if args.outputs is not None:
                    names = list(_select_outputs(dict.fromkeys(names), args.outputs))
                _check_output_count(args.output, names)
            outputs = run_library_outputs(vm, x)
    except ScalpelError as err:
        raise ScalpelError(f"{path}: {err}" if str(err).startswith("input ") else str(err)) from None
    if args.outputs is not None:
        outputs = _select_outputs(outputs, args.outputs)
    _check_output_count(args.output, list(outputs))
    with atomic_output(args.output) as tmp:
        with open(tmp, "wb") as f:
            if len(outputs) == 1 and not npz:
                np.save(f, next(iter(outputs.values())))
            else:  # every output, keyed by its ONNX name
                np.savez(f, **outputs)
    shapes = ", ".join(f"{name} {tuple(y.shape)} {y.dtype}" for name, y in outputs.items())
    if len(outputs) == 1 and not npz:
        shapes = "shape " + shapes.split(" ", 1)[1]
    print(f"wrote {args.output}: {shapes}")
    return 0


def _run_mcu(args: argparse.Namespace, path: Path, x) -> int:
    import numpy as np

    from .mcu.firmware import run_project
    from .onnx_io import atomic_output

    try:
        result = run_project(args.model, x, timeout=args.timeout)
    except ScalpelError as err:
        raise ScalpelError(f"{path}: {err}" if str(err).startswith("input ") else str(err)) from None
    with atomic_output(args.output) as tmp:
        with open(tmp, "wb") as f:
            if Path(args.output).suffix == ".npz":
                from .mcu.manifest import load_project

                np.savez(f, **{load_project(args.model).output.name: result.outputs})
            else:
                np.save(f, result.outputs)
    print(f"wrote {args.output}: shape {tuple(result.outputs.shape)} {result.outputs.dtype}")
    low, high = int(result.instructions.min()), int(result.instructions.max())
    print(f"instructions: {result.per_call}")
    if low != high:
        print(f"instructions per call ranged from {low} to {high} over {result.calls} calls "
              "(the line above is their mean)")
    return 0


def _select_outputs(outputs: dict, wanted: str) -> dict:
    from .graph_cut import parse_outputs

    names = parse_outputs(wanted)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise ScalpelError(f"--outputs: the library has no output named {unknown[0]!r}; its "
                           f"outputs are {', '.join(outputs)}")
    return {n: outputs[n] for n in names}


def _check_output_count(output: str, names: list[str]) -> None:
    """Several outputs go to a .npz; a .npy name would have to drop all but one of them."""
    if len(names) > 1 and Path(output).suffix == ".npy":
        raise ScalpelError(f"{output}: the model has {len(names)} outputs ({', '.join(names)}); "
                           "give -o a .npz name to write them all")


def _add_training_args(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam")
    p.add_argument("--batch-size", type=parse_positive, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tvm-scalpel", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the passes do")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    target_help = ("x86 (the host CPU, default), aarch64, cuda[:sm_XX], cortex-m4, "
                   "or a TVM JSON target string")

    p = sub.add_parser("prune", help="SIMD-aware weight pruning (and node pruning); writes ONNX")
    p.add_argument("model", help="input ONNX model (or lenet-300-100 / lenet5, built in)")
    p.add_argument("-o", "--output", required=True, help="pruned ONNX model to write")
    p.add_argument("--target", default="x86", help=target_help)
    p.add_argument("--group-width", type=parse_group_width, default=None,
                   help="g, weights per group (default: the target's fp32 SIMD width; 1 = "
                        "unstructured; auto = each layer's fastest g in the tuning database)")
    p.add_argument("--db", default=None, help="tuning database written by 'tvm-scalpel tune'")
    p.add_argument("--rate", type=parse_rate, default=0.9, help="fraction of each layer's weights to remove")
    p.add_argument("--last-layer-rate", type=parse_rate, default=None,
                   help="rate for the last dense layer (the class scores); default: --rate")
    p.add_argument("--conv-rate", type=parse_rate, default=None,
                   help="also weight-prune CONV layers at this rate (with --policy rules, "
                        "low-parallelism targets do so at --rate unless this says otherwise)")
    p.add_argument("--rpc", default=None, metavar="ADDRESS",
                   help="with --policy measured: measure on an RPC server of the target "
                        "(HOST:PORT or tracker://HOST:PORT/KEY) instead of here")
    p.add_argument("--importance", choices=list(IMPORTANCES), default="rms")
    p.add_argument("--nodes", type=parse_rate, default=None, metavar="RATE",
                   help="first remove this fraction of the neurons / feature maps of each layer")
    p.add_argument("--nodes-criterion", choices=list(NODE_CRITERIA), default=None,
                   help="masks: trained mask layers (needs data; the default with --data); "
                        "l1/l2: weight norms (the default without)")
    p.add_argument("--policy", choices=list(POLICIES), default="none",
                   help="rules: the paper's hardware-aware choice per layer for --target (weights "
                        "for FC and CONV on microcontrollers, FC weights + CONV nodes on CPUs, "
                        "nodes only on GPUs); measured: the rules, then weight pruning is kept "
                        "only on layers where it measures faster here; none: do what --rate / "
                        "--nodes say (default)")
    p.add_argument("--strict", action="store_true",
                   help="node pruning: a layer that cannot be pruned is an error (default: it "
                        "stays whole, with a warning)")
    p.add_argument("--outputs", default=None, metavar="NAME[,NAME]",
                   help="prune the graph from its inputs to these tensors only (default: all of "
                        "it, or, when TVM cannot import its post-processing, up to the first "
                        "node TVM cannot take); the pruned part is written back into the whole "
                        "original graph unless --cut-only")
    p.add_argument("--cut-only", action="store_true",
                   help="write only the part pruned (inputs to --outputs, or to where TVM stops), "
                        "not the whole original graph")
    p.add_argument("--mask-epochs", type=parse_positive, default=3, help="epochs of mask-layer training")
    p.add_argument("--fine-tune", type=parse_non_negative, default=0, metavar="EPOCHS",
                   help="fine-tune after pruning, pruned weights kept at zero (needs data)")
    p.add_argument("--max-accuracy-drop", type=float, default=None, metavar="POINTS",
                   help="search the largest rate whose fine-tuned accuracy is within POINTS of the input's")
    _add_training_args(p, data_help="data for fine-tuning and accuracy (default: mnist-sample when needed)")
    p.set_defaults(func=cmd_prune)

    u = sub.add_parser("tune", help="measure the fastest group width and kernel knobs per layer "
                       "(cortex-m4: by instruction count under qemu)")
    u.add_argument("model", help="ONNX model (or lenet-300-100 / lenet5, built in)")
    u.add_argument("--target", default="x86", help=target_help)
    u.add_argument("--db", required=True, help="tuning database (JSON lines; created or extended)")
    u.add_argument("--rate", type=parse_rate, default=0.9, help="pruning rate the layers are tuned for")
    u.add_argument("--last-layer-rate", type=parse_rate, default=None,
                   help="rate the last dense layer is tuned for (as prune --last-layer-rate); "
                        "default: --rate")
    u.add_argument("--batch", type=parse_positive, default=1, help="batch size tuned for")
    u.add_argument("--trials", type=parse_positive, default=16,
                   help="candidates known per layer at the end (database records count)")
    u.add_argument("--dense-trials", type=parse_non_negative, default=0, metavar="TRIALS",
                   help="tune the layers that stay dense with meta_schedule, this many trials "
                        "each (x86; a minute or more per layer); compile --db --batch uses the "
                        "result where it beats our dense kernel")
    u.add_argument("--conv-trials", type=parse_non_negative, default=8, metavar="TRIALS",
                   help="knob candidates of the blocked conv kernel timed per conv shape (x86 "
                        "here; 0: none); compile --db builds each conv layer with the fastest")
    u.add_argument("--rpc", default=None, metavar="ADDRESS",
                   help="measure on an RPC server: HOST:PORT, or tracker://HOST:PORT/KEY")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=cmd_tune)

    t = sub.add_parser("train", help="train a classifier with TVM; writes the trained ONNX")
    t.add_argument("model", help="ONNX model, or lenet-300-100 / lenet5 (built in)")
    t.add_argument("-o", "--output", required=True, help="trained ONNX model to write")
    t.add_argument("--epochs", type=parse_positive, default=10)
    _add_training_args(t, data_help="mnist-sample (default), a .npz with x and y, or an MNIST IDX folder")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compile", help="compile to a shared library, sparse layers grouped-sparse")
    c.add_argument("model", help="input ONNX model (pruned or not)")
    c.add_argument("-o", "--output", required=True,
                   help="library to write (.so); with --target cortex-m4, the C project folder")
    c.add_argument("--target", default="x86", help=target_help)
    c.add_argument("--mode", choices=list(MODES), default="auto",
                   help="auto: sparse only where the cost model says it pays (default)")
    c.add_argument("--db", default=None, help="tuning database: use the kernel knobs measured best "
                   "(and meta_schedule's dense kernels where they won, with --batch)")
    c.add_argument("--batch", type=parse_positive, default=None,
                   help="fix the batch size (default: any batch at run time)")
    c.add_argument("--flash-bytes", type=parse_positive, default=None, metavar="N",
                   help="cortex-m4: refuse (writing nothing) a model whose constants exceed N bytes")
    c.add_argument("--ram-bytes", type=parse_positive, default=None, metavar="N",
                   help="cortex-m4: refuse a model whose activation arena exceeds N bytes")
    c.add_argument("--numerics", choices=list(NUMERICS), default=None,
                   help="cortex-m4: fp32 (default) or q15 (int16, per-layer scales from --data)")
    c.add_argument("--data", default=None,
                   help="cortex-m4 q15: calibration data (default: the MNIST sample)")
    c.add_argument("--outputs", default=None, metavar="NAME[,NAME]",
                   help="compile the graph from its inputs to these tensors only (for models "
                        "whose post-processing TVM cannot import)")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run a compiled library on a .npy input")
    r.add_argument("model", help="library written by 'tvm-scalpel compile', or a Cortex-M4 "
                   "project folder (compile --target cortex-m4): built into a firmware, run "
                   "under qemu-system-arm, and its instructions counted")
    r.add_argument("--input", required=True, help="input array (.npy, float32)")
    r.add_argument("-o", "--output", required=True,
                   help="output to write: .npy, or .npz (keyed by the ONNX output names; "
                        "required when the model has several outputs)")
    r.add_argument("--rpc", default=None, metavar="ADDRESS",
                   help="run on an RPC server: HOST:PORT, or tracker://HOST:PORT/KEY")
    r.add_argument("--timeout", type=parse_seconds, default=None, metavar="SECONDS",
                   help="Cortex-M4 project: stop qemu after this long (default: 60 s + 1 s "
                        "per input row)")
    r.add_argument("--outputs", default=None, metavar="NAME[,NAME]",
                   help="write only these of the library's outputs (by ONNX name)")
    r.set_defaults(func=cmd_run)
    return parser


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Do two paths name one file (through symlinks, hard links, ./ or ../ spellings)?"""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(a).resolve() == Path(b).resolve()


def _refuse_in_place(args: argparse.Namespace) -> None:
    """An output that is also an input (model, library, input array, data, tuning database)
    would destroy that input: refuse before any work."""
    inputs = [("library" if args.command == "run" else "model", getattr(args, "model", None)),
              ("input array", getattr(args, "input", None)),
              ("data", getattr(args, "data", None))]
    output = getattr(args, "output", None)
    if output is None and args.command == "tune":
        output = args.db  # tune extends its database: the model must not be it
    else:
        inputs.append(("tuning database", getattr(args, "db", None)))
    if output is None:
        return
    kind = "tuning database" if args.command == "tune" else "output"
    for role, path in inputs:
        if path is not None and os.path.exists(path) and _same_file(output, path):
            raise ScalpelError(f"{output}: the {kind} is the same file as the {role} {path}; "
                               "nothing written, choose another name")


def main(argv: list[str] | None = None) -> int:
    """The ``tvm-scalpel`` program. Called without ``argv`` (as the program, from the console
    script or ``python -m``) it also takes over Ctrl-C before anything heavy is imported."""
    from . import interrupts

    if argv is None:
        interrupts.install()
    try:
        status = _main(argv)
    except KeyboardInterrupt:
        status = _interrupted()
    if argv is None:
        interrupts.finished()
    return status


def _interrupted() -> int:
    from . import interrupts

    interrupts.report()
    return interrupts.EXIT_STATUS


def _main(argv: list[str] | None) -> int:
    from . import interrupts

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints usage + one error line and exits 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    try:
        _refuse_in_place(args)
        status = args.func(args)
    except KeyboardInterrupt:
        return _interrupted()
    except ScalpelError as err:
        if interrupts.interrupted():  # an interrupt that our error handling wrapped
            return _interrupted()
        print(f"tvm-scalpel: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug of ours: still one line, with a hint for the report
        if interrupts.is_interrupt(err):  # TVM's C++ side wraps a KeyboardInterrupt
            return _interrupted()
        text = [line for line in str(err).strip().splitlines() if line.strip()]
        print(f"tvm-scalpel: internal error: {type(err).__name__}: {text[-1] if text else ''} "
              "(run with TVM_SCALPEL_DEBUG=1 for a traceback)", file=sys.stderr)
        if os.environ.get("TVM_SCALPEL_DEBUG"):
            raise
        return 1
    if interrupts.interrupted():  # swallowed somewhere on the way: nothing was committed
        return _interrupted()
    return status


if __name__ == "__main__":
    sys.exit(main())
