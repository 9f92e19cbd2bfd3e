"""The public flows: prune an ONNX model, compile it, run the result."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
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
    RewriteDenseLayers,
)
from .pruning import IMPORTANCES
from .targets import TargetProfile, resolve_target

log = logging.getLogger("tvm_scalpel")


@dataclass
class PruneOutcome:
    model: onnx.ModelProto  # standard ONNX, pruned weights are zeros
    layers: list[PrunedLayer]
    initializer_names: dict[int, str]  # layer index -> ONNX initializer it came from


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
) -> PruneOutcome:
    """SIMD-aware weight pruning of every dense layer (g defaults to the target's SIMD width).

    ``last_layer_rate`` prunes the last dense layer (the class scores, ~0.4% of LeNet-300-100's
    weights, and the most sensitive) at its own rate, as Han et al. do (74% there)."""
    check_prune_args(rate, group_width, importance)
    if last_layer_rate is not None:
        check_prune_args(last_layer_rate, group_width, importance)
    profile = resolve_target(target)
    g = group_width or profile.simd_width
    mod = to_relax(model)
    rates: float | dict[int, float] = rate
    if last_layer_rate is not None:
        count = len(find_dense_layers(mod["main"], warn=False))
        rates = {i: (last_layer_rate if i == count - 1 else rate) for i in range(count)}
    report: list[PrunedLayer] = []
    PruneWeightGroups(rates, g, importance, report=report)(mod)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    names = replace_weights(pruned, [(r.original, r.pruned) for r in report])
    by_index = {i: name for name, i in names.items()}
    for i, layer in enumerate(report):
        if i not in by_index:
            log.warning("layer %s %s: weight not found among the initializers, left dense",
                        layer.name, layer.shape)
    kept = [r for i, r in enumerate(report) if i in by_index]
    return PruneOutcome(pruned, kept, {r.index: by_index[i] for i, r in enumerate(report) if i in by_index})


@dataclass
class CompileOutcome:
    executable: tvm.runtime.Executable
    layers: list[LayerDecision]
    profile: TargetProfile


def build_relax(mod: tvm.IRModule, target=None, mode: str = "auto", fuse: bool = True) -> CompileOutcome:
    """Rewrite dense layers to our kernels (fusing chains of them unless ``fuse=False``) and
    compile with TVM's default pipeline."""
    profile = resolve_target(target)
    try:
        default_pipeline = relax.get_default_pipeline(profile.target)
    except ValueError:
        raise ScalpelError(f"TVM cannot compile whole models for target kind {profile.kind!r}") from None
    report: list[LayerDecision] = []
    passes = [RewriteDenseLayers(profile, mode=mode, report=report)]
    if fuse:
        passes.append(FuseDenseChains(profile))
    seq = tvm.transform.Sequential(passes + [default_pipeline])
    exe = tvm.compile(mod, target=profile.target, relax_pipeline=seq)
    return CompileOutcome(exe, report, profile)


def compile_onnx(model: onnx.ModelProto, target=None, mode: str = "auto", fuse: bool = True) -> CompileOutcome:
    """Compile an ONNX model; layers whose zeros form groups and pay go grouped-sparse."""
    if mode not in ("auto", "sparse", "dense"):
        raise ScalpelError(f"unknown mode {mode!r}: use auto, sparse or dense")
    return build_relax(to_relax(model), target, mode, fuse)


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
    with atomic_output(path, executable=True) as tmp, _quiet_native_stderr():
        if fcompile is None:
            exe.export_library(tmp)
        else:
            exe.export_library(tmp, fcompile=fcompile)


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


def run_library(vm: relax.VirtualMachine, x: np.ndarray) -> np.ndarray:
    try:
        out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x), tvm.cpu()))
    except Exception as err:
        text = [line for line in str(err).strip().splitlines() if line.strip()]
        raise ScalpelError(f"running the model failed: {text[-1] if text else type(err).__name__}") from None
    if isinstance(out, (list, tuple)) or hasattr(out, "__len__") and not hasattr(out, "numpy"):
        out = out[0]
    return out.numpy()
