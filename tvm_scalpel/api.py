"""The public flows: prune an ONNX model, compile it, run the result."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil  # noqa: F401  (the same module schedules.toolchains.cross_linker calls: tests patch api.shutil.which)
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax

from .checks import check_group_width, check_importance, check_mode, check_rate, default_group_width
from .errors import ScalpelError
from .onnx_io import atomic_output, replace_weights, to_relax
from .passes import (
    backend_pipeline,
    find_dense_layers,
    LayerDecision,
    PrunedLayer,
    PruneWeightGroups,
    scalpel_pipeline,
)
from .schedules.toolchains import CROSS_COMPILERS, cross_linker  # noqa: F401  (re-exported: tests, README)
from .signature import (  # noqa: F401  (re-exported: the library's signature lives there)
    SIGNATURE_FUNCTION,
    Signature,
    TensorSpec,
    _input_error,
    check_input,
    library_signature,
    model_signature,
    named_outputs,
    with_signature,
)
from .targets import TargetProfile, resolve_target
from .threads import threads_constructor_source

log = logging.getLogger("tvm_scalpel")


@dataclass
class PruneOutcome:
    model: onnx.ModelProto  # standard ONNX, pruned weights are zeros
    layers: list[PrunedLayer]  # dense layers first, then conv layers
    initializer_names: dict[int, str]  # position in ``layers`` -> ONNX initializer it came from

    def weight_name(self, position: int) -> str:
        return self.initializer_names.get(position, self.layers[position].name)


def check_prune_args(rate: float, group_width: int | None, importance: str) -> None:
    check_rate(rate)
    check_group_width(group_width)
    check_importance(importance)


def prune_onnx(
    model: onnx.ModelProto,
    rate: float,
    target: str | TargetProfile | None = "x86",
    group_width: int | None = None,
    importance: str = "rms",
    last_layer_rate: float | None = None,
    tuning_db: str | os.PathLike | None = None,
    conv_rate: float | None = None,
) -> PruneOutcome:
    """SIMD-aware weight pruning of every dense layer (g defaults to the target's SIMD width),
    and of every conv layer at ``conv_rate`` when it is given (the paper's choice for
    low-parallelism targets; groups run along the unfolded ``C*KH*KW`` patch axis).

    ``group_width="auto"`` takes each layer's g from the tuning database ``tuning_db`` (the
    fastest width measured by ``tvm-scalpel tune`` for that shape and rate on this target).
    ``last_layer_rate`` prunes the last dense layer (the class scores, ~0.4% of LeNet-300-100's
    weights, and the most sensitive) at its own rate, as Han et al. do (74% there)."""
    auto = group_width == "auto"
    check_prune_args(rate, None if auto else group_width, importance)
    for extra in (last_layer_rate, conv_rate):
        if extra is not None:
            check_prune_args(extra, None, importance)
    profile = resolve_target(target)
    mod = to_relax(model)
    layers = find_dense_layers(mod["main"], warn=False)
    rates: float | dict[int, float] = rate
    if last_layer_rate is not None:
        rates = {i: (last_layer_rate if i == len(layers) - 1 else rate) for i in range(len(layers))}
    g: int | dict[int, int] = default_group_width(profile, group_width)
    if auto:
        g = tuned_group_widths(layers, rates, profile, tuning_db)
    report: list[PrunedLayer] = []
    mod = PruneWeightGroups(rates, g, importance, report=report,
                            default_group_width=profile.group_width)(mod)
    if conv_rate is not None:
        PruneWeightGroups(conv_rate, default_group_width(profile, group_width), importance, report=report, layers="conv")(mod)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    names = replace_weights(pruned, [(r.original, r.pruned) for r in report])
    by_index = {i: name for name, i in names.items()}
    for i, layer in enumerate(report):
        if i not in by_index:
            log.warning("layer %s %s: weight not found among the initializers, left dense",
                        layer.name, layer.shape)
    kept = [i for i in range(len(report)) if i in by_index]
    return PruneOutcome(pruned, [report[i] for i in kept],
                        {position: by_index[i] for position, i in enumerate(kept)})


def dense_layer_shapes(model: onnx.ModelProto) -> list[tuple[str, tuple[int, int]]]:
    """``(ONNX weight name, (N, K))`` of every dense layer our passes take."""
    from .onnx_io import initializer_names

    layers = find_dense_layers(to_relax(model)["main"], warn=False)
    names = initializer_names(model, [layer.weight for layer in layers])
    return [(name or str(layer.matmul.name), layer.shape) for name, layer in zip(names, layers)]


def conv_layer_shapes(model: onnx.ModelProto, batch: int = 1) -> list[tuple[str, object]]:
    """``(ONNX weight name, schedules.ConvShape)`` of every conv layer the blocked conv kernel
    takes, at ``batch``; one entry per distinct shape (layers of one shape share a kernel)."""
    from .onnx_io import initializer_names, with_batch
    from .passes.conv_layers import find_conv_layers
    from .passes.rewrite_conv_layers import conv_shape

    layers = find_conv_layers(to_relax(with_batch(model, batch))["main"], warn=False, kernels=True)
    from .passes.graph import const_array

    # the weight as the graph holds it (a folded BatchNorm changed layer.kernel)
    kernels = [const_array(layer.weight_const) for layer in layers]
    names = initializer_names(model, [k.reshape(k.shape[0], -1) for k in kernels])
    out, seen = [], set()
    for name, layer in zip(names, layers):
        shape = conv_shape(layer, layer.data)
        if shape not in seen:
            seen.add(shape)
            out.append((name or str(layer.conv.name), shape))
    return out


def tuned_group_widths(layers, rates, profile: TargetProfile, tuning_db) -> dict[int, int]:
    """Each layer's fastest measured g; the SIMD width (with a warning) where none is known."""
    from .tuning import Task, TuningDatabase

    if tuning_db is None:
        raise ScalpelError("--group-width auto needs a tuning database (--db), made by 'tvm-scalpel tune'")
    if not Path(tuning_db).exists():
        raise ScalpelError(f"{tuning_db}: no such tuning database; run 'tvm-scalpel tune' first")
    db = TuningDatabase(tuning_db)
    widths = {}
    for layer in layers:
        n, k = layer.shape
        rate = rates.get(layer.index) if isinstance(rates, dict) else rates
        best = db.best(Task(n, k, rate), profile)
        if best is None:
            log.warning("no tuning record for layer %dx%d at rate %.3f on this target: g=%d",
                        n, k, rate, profile.group_width)
            continue
        widths[layer.index] = best[0].group_width
    return widths


@dataclass
class CompileOutcome:
    executable: tvm.runtime.Executable
    layers: list[LayerDecision]
    profile: TargetProfile


def build_relax(mod: tvm.IRModule, target=None, mode: str = "auto", fuse: bool = True,
                tuning_db: str | os.PathLike | None = None) -> CompileOutcome:
    """Rewrite dense layers to our kernels (fusing chains of them unless ``fuse=False``; with
    the kernel knobs measured best in ``tuning_db`` where it has them) and compile with TVM's
    default pipeline: ``tvm.compile`` with ``scalpel_pipeline``, the one place passes are ordered."""
    profile = resolve_target(target)
    try:
        default_pipeline = backend_pipeline(profile)
    except ValueError:
        raise ScalpelError(f"TVM cannot compile whole models for target kind {profile.kind!r}") from None
    report: list[LayerDecision] = []
    knobs_for = dense_kernel_for = conv_knobs_for = None
    if tuning_db is not None:
        from .tuning import TuningDatabase

        if not Path(tuning_db).exists():
            raise ScalpelError(f"{tuning_db}: no such tuning database")
        db = TuningDatabase(tuning_db)
        knobs_for = lambda n, k, g, rate: db.knobs_for(profile, n, k, g, rate)  # noqa: E731
        dense_kernel_for = _meta_schedule_kernels(db, profile, tuning_db)
        conv_knobs_for = lambda shape: db.conv_knobs_for(profile, shape)  # noqa: E731
    pipeline = scalpel_pipeline(profile, mode=mode, report=report, knobs_for=knobs_for,
                                dense_kernel_for=dense_kernel_for, conv_knobs_for=conv_knobs_for,
                                fuse=fuse,
                                default_pipeline=default_pipeline)
    exe = tvm.compile(mod, target=profile.target, relax_pipeline=pipeline)
    return CompileOutcome(exe, report, profile)


def _meta_schedule_kernels(db, profile: TargetProfile, tuning_db):
    """``(n, k, batch) -> PrimFunc | None``: meta_schedule's kernel where it measured faster
    than ours for that dense layer (``tvm-scalpel tune --dense-trials``)."""
    import functools

    from .dense_tuning import ms_work_dir, tuned_dense_kernel

    @functools.lru_cache(maxsize=None)
    def kernel_for(n: int, k: int, batch: int):
        if not db.meta_schedule_wins(profile, n, k, batch):
            return None
        return tuned_dense_kernel(profile, batch, n, k, ms_work_dir(tuning_db))

    return kernel_for


def compile_onnx(model: onnx.ModelProto, target=None, mode: str = "auto", fuse: bool = True,
                 tuning_db: str | os.PathLike | None = None, batch: int | None = None) -> CompileOutcome:
    """Compile an ONNX model; layers whose zeros form groups and pay go grouped-sparse.
    ``batch`` fixes the model's batch size (meta_schedule's kernels need a static one)."""
    check_mode(mode)
    if batch is not None:
        from .onnx_io import with_batch

        model = with_batch(model, batch)
    mod = with_signature(to_relax(model), model_signature(model))
    return build_relax(mod, target, mode, fuse, tuning_db)


def export_library(exe: tvm.runtime.Executable, path: str | os.PathLike,
                   profile: TargetProfile | None = None) -> None:
    """Write a loadable shared library, all-or-nothing (cross-linked for non-host targets)."""
    if Path(path).suffix not in (".so", ".dylib", ".dll"):
        raise ScalpelError(f"{path}: the output library must end in .so")
    fcompile = cross_linker(profile)
    with atomic_output(path, executable=True) as tmp, _quiet_native_stderr(), \
            tempfile.TemporaryDirectory() as scratch:
        # all cores by default wherever the library is loaded: see threads.py
        addons = [threads_constructor_source(scratch)]
        if fcompile is None:
            exe.export_library(tmp, addons=addons)
        else:
            exe.export_library(tmp, fcompile=fcompile, addons=addons)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Hide the C++ runtime's per-constant "Scope Saving" warnings that export prints to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_library(path: str | os.PathLike) -> relax.VirtualMachine:
    path = Path(path)
    if not path.is_file():
        raise ScalpelError(f"{path}: no such file")
    try:
        lib = tvm.runtime.load_module(str(path))
        return relax.VirtualMachine(lib, tvm.cpu())
    except Exception as err:
        raise ScalpelError(f"{path}: not a library compiled by tvm-scalpel ({type(err).__name__})") from None


def run_library_outputs(vm: relax.VirtualMachine, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the model, keyed by its ONNX name (output_0... for an older library)."""
    signature = library_signature(vm)
    check_input(x, signature)
    try:
        out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x), tvm.cpu()))
    except Exception as err:
        from . import interrupts

        if interrupts.is_interrupt(err):
            raise KeyboardInterrupt from None
        raise ScalpelError(_input_error(err, x)) from None
    return named_outputs(out, signature)


def run_library(vm: relax.VirtualMachine, x: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
    """Run the model on ``x``: its output, or ``{ONNX output name: array}`` (in the model's
    order) when it has several. ``run_library_outputs`` always gives the dict."""
    outs = run_library_outputs(vm, x)
    return next(iter(outs.values())) if len(outs) == 1 else outs
