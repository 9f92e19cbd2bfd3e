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


def _group_width(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _load_model(spec: str):
    """An ONNX file, or the name of a built-in network (``models.BUILDERS``)."""
    from . import models
    from .onnx_io import load_onnx

    if spec in models.BUILDERS and not Path(spec).exists():
        return models.build(spec)
    return load_onnx(spec)


def _load_data(spec: str | None):
    from .data import load_data, mnist_sample

    if spec is None or spec == "mnist-sample":
        return mnist_sample()
    return load_data(spec)


def _settings(args: argparse.Namespace, epochs: int):
    from .finetune import TrainSettings

    return TrainSettings(epochs=epochs, lr=args.lr, optimizer=args.optimizer,
                         batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)


def _print_accuracy(label: str, value: float | None) -> None:
    if value is not None:
        print(f"test accuracy {label}: {value * 100:.2f}%")


def _print_accuracies(data, before: float | None, model, label: str) -> None:
    """Accuracy of the input and of the model written, when there is data."""
    if data is None:
        return
    from .finetune import accuracy

    _print_accuracy("before pruning", before)
    _print_accuracy(label, accuracy(model, data))


def cmd_prune(args: argparse.Namespace) -> int:
    from .api import prune_onnx
    from .onnx_io import save_onnx
    from .targets import resolve_target

    profile = resolve_target(args.target)
    model = _load_model(args.model)
    node_rates, weights, conv_weights = _apply_policy(args, model, profile)
    conv_rate = args.conv_rate if args.conv_rate is not None else (args.rate if conv_weights else None)
    criterion = args.nodes_criterion or ("masks" if args.data else "l1")
    wants_data = args.fine_tune or args.max_accuracy_drop is not None or (criterion == "masks" and node_rates)
    data = _load_data(args.data) if (wants_data or args.data) else None
    acc_in = None
    if data is not None:
        from .finetune import accuracy, fit_data

        fit_data(model, data)  # shape check before any long work
        acc_in = accuracy(model, data)

    if node_rates:
        from .finetune import node_prune

        # the rules are hardware-aware: kept counts in whole vectors of the target
        block = profile.simd_width if args.policy != "none" else None
        result = node_prune(model, node_rates, data, _settings(args, args.fine_tune),
                            mask_epochs=args.mask_epochs, criterion=criterion, block=block,
                            strict=args.strict)
        rows = [[r.name, result.nodes_before[r.name], result.nodes_after[r.name], r.node,
                 r.reason or (f"coupled with {', '.join(r.coupled)}" if r.coupled else "")]
                for r in result.layers]
        print(format_table(["layer", "nodes before", "nodes after", "node", "note"], rows))
        print(f"node pruning removed {result.removed_fraction * 100:.1f}% of the prunable nodes")
        model = result.model

    g = profile.simd_width if args.group_width in (None, "auto") else args.group_width
    if not weights and conv_rate is None:
        save_onnx(model, args.output)
        _print_accuracies(data, acc_in, model, "after pruning")
        print(f"wrote {args.output} (target {profile.name}: node pruning only)")
        return 0
    if args.max_accuracy_drop is not None:
        from .finetune import search_max_rate

        best, base, tried = search_max_rate(model, data, args.max_accuracy_drop, g,
                                            _settings(args, args.fine_tune or 3), profile,
                                            args.importance, last_layer_rate=args.last_layer_rate)
        print(format_table(["rate", "accuracy before fine-tune", "accuracy"],
                           [[f"{t.rate:.2f}", f"{t.accuracy_before_fine_tune * 100:.2f}%",
                             f"{t.accuracy * 100:.2f}%"] for t in tried]))
        if best is None:
            raise ScalpelError(f"no pruning rate kept accuracy within {args.max_accuracy_drop} points "
                               f"of {base * 100:.2f}%")
        print(f"largest rate within {args.max_accuracy_drop} points: {best.rate}")
        rate, model_to_prune = best.rate, best.model
    else:
        rate, model_to_prune = args.rate, model
    last = None if args.last_layer_rate is None else min(rate, args.last_layer_rate)
    outcome = prune_onnx(model_to_prune, rate if weights else 0.0, profile, args.group_width,
                         args.importance, last if weights else None, tuning_db=args.db,
                         conv_rate=conv_rate)
    if not weights:  # the FC layers went through at rate 0: they are not pruned layers
        outcome.layers = [layer for layer in outcome.layers if layer.kind == "conv"]
    if args.policy == "measured":
        from .policy import keep_where_sparse_pays

        measured = keep_where_sparse_pays(outcome, profile, rpc=args.rpc)
        print(format_table(["layer", "dense us", "grouped-sparse us", "weight pruning"],
                           [[m.name, f"{m.dense_us:.2f}", f"{m.sparse_us:.2f}",
                             "kept" if m.pays else "undone: dense is faster"] for m in measured]))
        outcome.layers = [layer for layer, m in zip(outcome.layers, measured) if m.pays]
    elif not outcome.layers:
        log.warning("no dense layer with a constant weight found: weights left as they are")
    final = outcome.model
    if args.fine_tune and args.max_accuracy_drop is None and rate > 0:
        from .finetune import train

        final, _ = train(final, data, _settings(args, args.fine_tune), keep_zeros=True,
                         desc="fine-tune")
    save_onnx(final, args.output)
    _print_layer_table(outcome)
    _print_accuracies(data, acc_in, final, "after pruning" + (" and fine-tuning" if args.fine_tune else ""))
    print(f"wrote {args.output} (target {profile.name}, importance {args.importance})")
    return 0


def _apply_policy(args: argparse.Namespace, model, profile) -> tuple[dict | float | None, bool, bool]:
    """``(node pruning rates, whether to weight-prune FC layers, and CONV layers)`` from the
    flags or the target's rules."""
    if args.rpc is not None and args.policy != "measured":
        raise ScalpelError("--rpc measures layers for --policy measured; it means nothing without it")
    if args.policy == "none":
        return args.nodes, True, False
    if args.policy == "measured" and profile.name != "x86" and args.rpc is None:
        raise ScalpelError(f"the measured policy times kernels on the target: give --rpc HOST:PORT "
                           f"of a {profile.name} RPC server, or use --target x86 to measure here")
    from .policy import plan_layers

    plans = plan_layers(model, profile)
    rate = args.nodes if args.nodes is not None else 0.5
    nodes = {p.name: rate for p in plans if p.method == "nodes"}
    print(f"policy for {profile.name} ({profile.parallelism} parallelism):")
    print(format_table(["layer", "kind", "pruning", "note"],
                       [[p.name, p.kind, p.method, p.note] for p in plans]))
    weights = {kind: any(p.method == "weights" and p.kind == kind for p in plans) for kind in ("fc", "conv")}
    return nodes or None, weights["fc"], weights["conv"]


def _print_layer_table(outcome) -> None:
    rows = []
    for position, layer in enumerate(outcome.layers):
        rows.append([
            outcome.weight_name(position),
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


def cmd_tune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .api import dense_layer_shapes
    from .targets import resolve_target
    from .tuning import Task, TuningDatabase, tune_task

    profile = resolve_target(args.target)
    if profile.kind != "llvm":
        raise ScalpelError(f"tuning measures our CPU kernels: target {profile.name} has none yet")
    if args.dense_trials and (profile.name != "x86" or args.rpc is not None):
        raise ScalpelError("--dense-trials tunes dense layers with meta_schedule on this machine: "
                           "use --target x86 without --rpc")
    if profile.name != "x86" and args.rpc is None:
        raise ScalpelError(f"target {profile.name} cannot run here: measure on it with --rpc")
    measure_fn = None
    if args.rpc is not None:
        from functools import partial

        from .remote import connect
        from .tuning import measure

        connect(args.rpc).cpu()  # a server that is down is an error before any work
        measure_fn = partial(measure, rpc=args.rpc)
    shapes = dense_layer_shapes(_load_model(args.model))
    if not shapes:
        raise ScalpelError(f"{args.model}: no dense layer to tune")
    db = TuningDatabase(args.db)
    tasks = [Task(n, k, args.rate, args.batch) for _, (n, k) in shapes]
    sparse_trials = args.trials if args.rate > 0 else 0  # rate 0: every layer stays dense
    rows, total_new = [], 0
    with tqdm(total=len(tasks) * (sparse_trials + 1), desc="tune", unit="trial",
              disable=True if args.quiet else None, leave=False) as bar:
        for (name, _), task in zip(shapes, tasks):
            row, new = _tune_layer(args, task, profile, db, sparse_trials, measure_fn, bar)
            total_new += new
            rows.append([name, f"{task.n}x{task.k}"] + row)
    print(format_table(["layer", "shape (NxK)", "best g", "unroll", "batch tile", "threads",
                        "sparse us", "dense us (ours)", "dense us (meta_schedule)", "kernel",
                        "new trials"], rows))
    print(f"{total_new} new measurements; database {args.db} (target {profile.name}, "
          f"rate {args.rate}, batch {args.batch})")
    return 0


def _tune_layer(args, task, profile, db, sparse_trials: int, measure_fn, bar) -> tuple[list, int]:
    """Tune one layer: grouped-sparse candidates, our dense kernel, and (``--dense-trials``)
    meta_schedule where the layer stays dense. Returns its table row and new measurements."""
    import numpy as np

    from .tuning import time_layer, tune_task

    best = secs = None
    new = 0
    if sparse_trials:
        kwargs = {"measure_fn": measure_fn} if measure_fn else {}
        best, secs, new = tune_task(task, profile, db, sparse_trials, progress=bar, **kwargs)
        bar.update(sparse_trials - new)
    dense = db.dense_times(profile, task.n, task.k, task.batch)
    if "ours" not in dense:
        w = np.random.default_rng(0).standard_normal((task.n, task.k)).astype(np.float32)
        db.add_dense(profile, task.n, task.k, task.batch, "ours", time_layer(profile, w, task.batch, rpc=args.rpc))
        new += 1
    bar.update(1)
    stays_dense = secs is None or secs >= db.dense_times(profile, task.n, task.k, task.batch)["ours"]
    if stays_dense and args.dense_trials and "meta_schedule" not in dense:
        from .dense_tuning import ms_work_dir, tune_dense

        bar.set_postfix_str(f"meta_schedule {task.n}x{task.k}")
        times = tune_dense(profile, task.batch, task.n, task.k, args.dense_trials, ms_work_dir(args.db))
        for kernel, seconds in times.items():
            db.add_dense(profile, task.n, task.k, task.batch, kernel, seconds)
        new += args.dense_trials
    dense = db.dense_times(profile, task.n, task.k, task.batch)
    if not stays_dense:
        kernel = f"grouped-sparse g={best.group_width}"
    else:
        kernel = "dense (meta_schedule)" if db.meta_schedule_wins(profile, task.n, task.k, task.batch) else "dense (ours)"
    fmt = lambda v: "-" if v is None else f"{v * 1e6:.2f}"  # noqa: E731
    row = ["-"] * 4 if best is None else [best.group_width, best.unroll,
                                         best.batch_tile if task.batch > 1 else "-",
                                         "yes" if best.parallel else "no"]
    return row + [fmt(secs), fmt(dense.get("ours")), fmt(dense.get("meta_schedule")), kernel, new], new


def cmd_train(args: argparse.Namespace) -> int:
    from .finetune import accuracy, fit_data, train
    from .onnx_io import save_onnx

    model = _load_model(args.model)
    data = _load_data(args.data)
    fit_data(model, data)
    print(f"data: {data.name}, {len(data.x_train)} train / {len(data.x_test)} test samples")
    _print_accuracy("before training", accuracy(model, data))
    trained, history = train(model, data, _settings(args, args.epochs))
    rows = [[h.epoch, f"{h.loss:.4f}", f"{h.train_accuracy * 100:.2f}%",
             "-" if h.test_accuracy is None else f"{h.test_accuracy * 100:.2f}%"] for h in history]
    print(format_table(["epoch", "loss", "train accuracy", "test accuracy"], rows))
    save_onnx(trained, args.output)
    _print_accuracy("after training", history[-1].test_accuracy)
    print(f"wrote {args.output}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .api import cross_linker, compile_onnx, export_library
    from .onnx_io import initializer_names, load_onnx
    from .targets import resolve_target

    if Path(args.output).suffix != ".so":
        raise ScalpelError(f"{args.output}: the output library must end in .so")
    profile = resolve_target(args.target)
    cross_linker(profile)  # a missing cross compiler is an error before minutes of compiling
    model = load_onnx(args.model)
    outcome = compile_onnx(model, profile, mode=args.mode, tuning_db=args.db, batch=args.batch)
    export_library(outcome.executable, args.output, profile)
    names = initializer_names(model, [d.weight for d in outcome.layers])
    rows = [[name or d.name, f"{d.shape[0]}x{d.shape[1]}", f"{1 - d.density:.3f}", d.group_width or "-",
             d.kernel, f"{d.estimated_speedup:.2f}" if d.group_width else "-"] for d, name in zip(outcome.layers, names)]
    print(format_table(["layer", "shape (NxK)", "zeros", "g", "kernel", "est. speedup"], rows))
    sparse = sum(d.kernel == "grouped-sparse" for d in outcome.layers)
    print(f"{sparse} of {len(outcome.layers)} dense layers went grouped-sparse; wrote {args.output}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

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
    if not isinstance(x, np.ndarray):
        raise ScalpelError(f"{path}: not a .npy array (a .npz archive?)")
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
                _check_output_count(args.output, [t.name for t in signature.outputs])
            outputs = run_library_outputs(vm, x)
    except ScalpelError as err:
        raise ScalpelError(f"{path}: {err}" if str(err).startswith("input ") else str(err)) from None
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


def _check_output_count(output: str, names: list[str]) -> None:
    """Several outputs go to a .npz; a .npy name would have to drop all but one of them."""
    if len(names) > 1 and Path(output).suffix == ".npy":
        raise ScalpelError(f"{output}: the model has {len(names)} outputs ({', '.join(names)}); "
                           "give -o a .npz name to write them all")


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _add_training_args(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--batch-size", type=_positive, default=64)
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
    p.add_argument("--group-width", type=_group_width, default=None,
                   help="g, weights per group (default: the target's fp32 SIMD width; 1 = "
                        "unstructured; auto = each layer's fastest g in the tuning database)")
    p.add_argument("--db", default=None, help="tuning database written by 'tvm-scalpel tune'")
    p.add_argument("--rate", type=_rate, default=0.9, help="fraction of each layer's weights to remove")
    p.add_argument("--last-layer-rate", type=_rate, default=None,
                   help="rate for the last dense layer (the class scores); default: --rate")
    p.add_argument("--conv-rate", type=_rate, default=None,
                   help="also weight-prune CONV layers at this rate (with --policy rules, "
                        "low-parallelism targets do so at --rate unless this says otherwise)")
    p.add_argument("--rpc", default=None, metavar="ADDRESS",
                   help="with --policy measured: measure on an RPC server of the target "
                        "(HOST:PORT or tracker://HOST:PORT/KEY) instead of here")
    p.add_argument("--importance", choices=["rms", "max", "mean"], default="rms")
    p.add_argument("--nodes", type=_rate, default=None, metavar="RATE",
                   help="first remove this fraction of the neurons / feature maps of each layer")
    p.add_argument("--nodes-criterion", choices=["masks", "l1", "l2"], default=None,
                   help="masks: trained mask layers (needs data; the default with --data); "
                        "l1/l2: weight norms (the default without)")
    p.add_argument("--policy", choices=["none", "rules", "measured"], default="none",
                   help="rules: the paper's hardware-aware choice per layer for --target (weights "
                        "for FC and CONV on microcontrollers, FC weights + CONV nodes on CPUs, "
                        "nodes only on GPUs); measured: the rules, then weight pruning is kept "
                        "only on layers where it measures faster here; none: do what --rate / "
                        "--nodes say (default)")
    p.add_argument("--strict", action="store_true",
                   help="node pruning: a layer that cannot be pruned is an error (default: it "
                        "stays whole, with a warning)")
    p.add_argument("--mask-epochs", type=_positive, default=3, help="epochs of mask-layer training")
    p.add_argument("--fine-tune", type=_non_negative, default=0, metavar="EPOCHS",
                   help="fine-tune after pruning, pruned weights kept at zero (needs data)")
    p.add_argument("--max-accuracy-drop", type=float, default=None, metavar="POINTS",
                   help="search the largest rate whose fine-tuned accuracy is within POINTS of the input's")
    _add_training_args(p, data_help="data for fine-tuning and accuracy (default: mnist-sample when needed)")
    p.set_defaults(func=cmd_prune)

    u = sub.add_parser("tune", help="measure the fastest group width and kernel knobs per layer")
    u.add_argument("model", help="ONNX model (or lenet-300-100 / lenet5, built in)")
    u.add_argument("--target", default="x86", help=target_help)
    u.add_argument("--db", required=True, help="tuning database (JSON lines; created or extended)")
    u.add_argument("--rate", type=_rate, default=0.9, help="pruning rate the layers are tuned for")
    u.add_argument("--batch", type=_positive, default=1, help="batch size tuned for")
    u.add_argument("--trials", type=_positive, default=16,
                   help="candidates known per layer at the end (database records count)")
    u.add_argument("--dense-trials", type=_non_negative, default=0, metavar="TRIALS",
                   help="tune the layers that stay dense with meta_schedule, this many trials "
                        "each (x86; a minute or more per layer); compile --db --batch uses the "
                        "result where it beats our dense kernel")
    u.add_argument("--rpc", default=None, metavar="ADDRESS",
                   help="measure on an RPC server: HOST:PORT, or tracker://HOST:PORT/KEY")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=cmd_tune)

    t = sub.add_parser("train", help="train a classifier with TVM; writes the trained ONNX")
    t.add_argument("model", help="ONNX model, or lenet-300-100 / lenet5 (built in)")
    t.add_argument("-o", "--output", required=True, help="trained ONNX model to write")
    t.add_argument("--epochs", type=_positive, default=10)
    _add_training_args(t, data_help="mnist-sample (default), a .npz with x and y, or an MNIST IDX folder")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compile", help="compile to a shared library, sparse layers grouped-sparse")
    c.add_argument("model", help="input ONNX model (pruned or not)")
    c.add_argument("-o", "--output", required=True, help="library to write (.so)")
    c.add_argument("--target", default="x86", help=target_help)
    c.add_argument("--mode", choices=["auto", "sparse", "dense"], default="auto",
                   help="auto: sparse only where the cost model says it pays (default)")
    c.add_argument("--db", default=None, help="tuning database: use the kernel knobs measured best "
                   "(and meta_schedule's dense kernels where they won, with --batch)")
    c.add_argument("--batch", type=_positive, default=None,
                   help="fix the batch size (default: any batch at run time)")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run a compiled library on a .npy input")
    r.add_argument("model", help="library written by 'tvm-scalpel compile'")
    r.add_argument("--input", required=True, help="input array (.npy, float32)")
    r.add_argument("-o", "--output", required=True,
                   help="output to write: .npy, or .npz (keyed by the ONNX output names; "
                        "required when the model has several outputs)")
    r.add_argument("--rpc", default=None, metavar="ADDRESS",
                   help="run on an RPC server: HOST:PORT, or tracker://HOST:PORT/KEY")
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
