"""The public flows: prune an ONNX model, compile it, run the result."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax

from .errors import ScalpelError
from .onnx_io import atomic_output, replace_weights, to_relax
from .passes import (
    FuseDenseChains,
    find_dense_layers,
    LayerDecision,
    PrunedLayer,
    PruneWeightGroups,
    RewriteConvLayers,
    RewriteDenseLayers,
)
from .pruning import IMPORTANCES
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
    if not 0.0 <= rate < 1.0:
        raise ScalpelError(f"pruning rate must be in [0, 1), got {rate}")
    if group_width is not None and group_width < 1:
        raise ScalpelError(f"group width must be >= 1, got {group_width}")
    if importance not in IMPORTANCES:
        raise ScalpelError(f"unknown importance {importance!r}: use one of {', '.join(IMPORTANCES)}")


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
    g: int | dict[int, int] = profile.simd_width if auto or group_width is None else group_width
    if auto:
        g = tuned_group_widths(layers, rates, profile, tuning_db)
    report: list[PrunedLayer] = []
    mod = PruneWeightGroups(rates, g, importance, report=report,
                            default_group_width=profile.simd_width)(mod)
    if conv_rate is not None:
        conv_g = profile.simd_width if auto or group_width is None else group_width
        PruneWeightGroups(conv_rate, conv_g, importance, report=report, layers="conv")(mod)
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
                        n, k, rate, profile.simd_width)
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
    default pipeline."""
    profile = resolve_target(target)
    try:
        default_pipeline = relax.get_default_pipeline(profile.target)
    except ValueError:
        raise ScalpelError(f"TVM cannot compile whole models for target kind {profile.kind!r}") from None
    report: list[LayerDecision] = []
    knobs_for = dense_kernel_for = None
    if tuning_db is not None:
        from .tuning import TuningDatabase

        if not Path(tuning_db).exists():
            raise ScalpelError(f"{tuning_db}: no such tuning database")
        db = TuningDatabase(tuning_db)
        knobs_for = lambda n, k, g, rate: db.knobs_for(profile, n, k, g, rate)  # noqa: E731
        dense_kernel_for = _meta_schedule_kernels(db, profile, tuning_db)
    passes = [RewriteConvLayers(profile, mode=mode, report=report, knobs_for=knobs_for),
              RewriteDenseLayers(profile, mode=mode, report=report, knobs_for=knobs_for,
                                 dense_kernel_for=dense_kernel_for)]
    if fuse:
        passes.append(FuseDenseChains(profile))
    seq = tvm.transform.Sequential(passes + [default_pipeline])
    exe = tvm.compile(mod, target=profile.target, relax_pipeline=seq)
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
    if mode not in ("auto", "sparse", "dense"):
        raise ScalpelError(f"unknown mode {mode!r}: use auto, sparse or dense")
    if batch is not None:
        from .onnx_io import with_batch

        model = with_batch(model, batch)
    mod = with_signature(to_relax(model), model_signature(model))
    return build_relax(mod, target, mode, fuse, tuning_db)


# Cross compilers for the LLVM triples whose libraries we link here but run elsewhere.
CROSS_COMPILERS = {"aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")}


def cross_linker(profile: TargetProfile | None):
    """``fcompile`` for ``export_library``: None (the host's cc) unless the target needs one."""
    if profile is None or profile.kind != "llvm":
        return None  # host code of GPU targets is compiled for this machine
    triple = str(profile.target.attrs.get("mtriple", ""))
    arch = triple.split("-")[0]
    if not triple or arch == "x86_64":
        return None
    if arch not in CROSS_COMPILERS:
        raise ScalpelError(f"no shared library for {triple}: a bare-metal target has no loader; "
                           "use the kernels' object code instead")
    compiler, package = CROSS_COMPILERS[arch]
    if shutil.which(compiler) is None:
        raise ScalpelError(f"{compiler} not found: install the Debian package {package} "
                           "to cross-compile for {triple}".replace("{triple}", triple))
    from tvm.support import cc

    return cc.cross_compiler(compiler)


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


# --------------------------------------------------------------------------- the library's signature
#
# A compiled library records the ONNX names, shapes and dtypes of its inputs and outputs, so that
# ``run`` can name every output and explain a wrong input in the user's terms. They are stored IN
# the library (a copy or an RPC upload cannot lose them): a Relax function SIGNATURE_FUNCTION
# beside ``main`` that returns a constant uint8 tensor, the UTF-8 JSON of ``Signature.to_json``.
# Libraries compiled before it existed have no such function and run with names output_0...

SIGNATURE_FUNCTION = "scalpel_signature"
SIGNATURE_VERSION = 1


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str | None]  # an int, a symbolic dim's name, or None (unknown)
    dtype: str

    def shape_text(self) -> str:
        """``(N, 784)``: the first (batch) dim shown as N when symbolic."""
        dims = [str(d) if isinstance(d, int) else ("N" if i == 0 else (d or "?"))
                for i, d in enumerate(self.shape)]
        return _tuple_text(dims)


@dataclass
class Signature:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def to_json(self) -> str:
        import json

        return json.dumps({"version": SIGNATURE_VERSION,
                           "inputs": [vars(t) for t in self.inputs],
                           "outputs": [vars(t) for t in self.outputs]})

    @staticmethod
    def from_json(text: str) -> Signature:
        import json

        data = json.loads(text)
        return Signature([TensorSpec(**t) for t in data["inputs"]],
                         [TensorSpec(**t) for t in data["outputs"]])


def _tuple_text(dims) -> str:
    dims = [str(d) for d in dims]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def model_signature(model: onnx.ModelProto) -> Signature:
    """The graph inputs (initializers excluded: they are weights) and outputs of an ONNX model."""
    from onnx.helper import tensor_dtype_to_np_dtype

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        try:
            dtype = np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).name
        except Exception:  # noqa: BLE001 - an undefined elem type: nothing to check against
            dtype = "unknown"
        return TensorSpec(value.name, dims, dtype)

    weights = {init.name for init in model.graph.initializer}
    return Signature([spec(v) for v in model.graph.input if v.name not in weights],
                     [spec(v) for v in model.graph.output])


def with_signature(mod: tvm.IRModule, signature: Signature) -> tvm.IRModule:
    """Add to ``mod`` the function SIGNATURE_FUNCTION that returns ``signature`` (see above)."""
    blob = np.frombuffer(signature.to_json().encode("utf-8"), dtype=np.uint8).copy()
    bb = relax.BlockBuilder()
    with bb.function(SIGNATURE_FUNCTION, []):
        bb.emit_func_output(bb.emit(relax.const(blob, "uint8")))
    mod[SIGNATURE_FUNCTION] = bb.get()[SIGNATURE_FUNCTION]
    return mod


def library_signature(vm) -> Signature | None:
    """The signature a library records (a local or an RPC VM), None for an older library."""
    cached = getattr(vm, "_scalpel_signature", False)
    if cached is not False:
        return cached
    try:
        blob = vm[SIGNATURE_FUNCTION]().numpy()
        signature = Signature.from_json(bytes(blob.astype(np.uint8)).decode("utf-8"))
    except Exception:  # noqa: BLE001 - no such function (compiled before it existed), or garbled
        signature = None
    try:
        vm._scalpel_signature = signature
    except AttributeError:
        pass
    return signature


def check_input(x: np.ndarray, signature: Signature | None) -> None:
    """A one-line error, in the model's terms, for an input the library cannot take; a warning
    for NaN / Inf values (onnxruntime propagates NaN, our kernels' ReLU turns it into 0)."""
    if signature is None:  # an older library: our models take float32; the shape is TVM's to check
        if x.dtype != np.float32:
            raise ScalpelError(f"input has dtype {x.dtype}; the model expects float32")
        name = "input"
    else:
        if len(signature.inputs) != 1:
            names = ", ".join(t.name for t in signature.inputs)
            raise ScalpelError(f"the model has {len(signature.inputs)} inputs ({names}); run takes one")
        spec = signature.inputs[0]
        name = spec.name
        if spec.dtype != "unknown" and x.dtype != np.dtype(spec.dtype):
            raise ScalpelError(f"input {name} has dtype {x.dtype}; the model expects {spec.dtype}")
        fits = len(x.shape) == len(spec.shape) and all(
            not isinstance(d, int) or d == n for d, n in zip(spec.shape, x.shape))
        if not fits:
            raise ScalpelError(f"input {name} has shape {_tuple_text(x.shape)}; "
                               f"the model expects {spec.shape_text()}")
    if np.issubdtype(x.dtype, np.floating):
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        if bad:
            log.warning("input %s has %d NaN/Inf value(s): the output may differ from other "
                        "runtimes (onnxruntime propagates NaN; the ReLU here turns it into 0)", name, bad)


# TVM's own message for a wrong input: "... param=x, annotation=R.Tensor((N, 8), dtype="float32")"
_TVM_PARAM = r'param=([^,]+), annotation=R\.Tensor\(\(([^)]*)\),\s*dtype="(\w+)"\)'


def _input_error(err: Exception, x: np.ndarray) -> str:
    """TVM's complaint about an input, retold in the model's terms where it can be parsed."""
    import re

    text = str(err)
    found = re.search(_TVM_PARAM, text)
    if found:
        name, dims, dtype = found.groups()
        dims = [d.strip() for d in dims.split(",") if d.strip()]
        if x.dtype != np.dtype(dtype):
            return f"input {name} has dtype {x.dtype}; the model expects {dtype}"
        return f"input {name} has shape {_tuple_text(x.shape)}; the model expects {_tuple_text(dims)}"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return f"running the model failed: {lines[-1] if lines else type(err).__name__}"


def named_outputs(result, signature: Signature | None) -> dict[str, np.ndarray]:
    """A VM result (a tensor or a nested tuple of them) as ``{ONNX output name: array}``."""
    flat = []

    def walk(value):
        if hasattr(value, "numpy"):
            flat.append(value.numpy())
        else:
            for item in value:
                walk(item)

    walk(result)
    if signature is not None and len(signature.outputs) == len(flat):
        names = [t.name for t in signature.outputs]
    else:
        names = [f"output_{i}" for i in range(len(flat))]
    return dict(zip(names, flat))


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
