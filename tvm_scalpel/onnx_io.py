"""Reading ONNX models (with one-line errors) and writing pruned ones back."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from . import interrupts
from .errors import ScalpelError

# onnxruntime reads IR versions up to 13 only; what we write must stay loadable by it.
MAX_IR_VERSION = 13


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise ScalpelError(f"{path}: no such file")
    if path.is_dir():
        raise ScalpelError(f"{path}: is a directory, not an ONNX model")
    try:
        model = onnx.load(str(path))
    except Exception as err:
        raise ScalpelError(f"{path}: not a readable ONNX model ({type(err).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise ScalpelError(f"{path}: not an ONNX model (no graph)")
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScalpelError(f"{path}: invalid ONNX model: {first}") from None
    return model


def to_relax(model: onnx.ModelProto, source: str = "model"):
    """Import into Relax; importer failures (an op it cannot take) become one-line errors."""
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(model, keep_params_in_input=False)
    except Exception as err:
        text = str(err).strip().splitlines()
        detail = next((line for line in reversed(text) if line.strip()), type(err).__name__)
        raise ScalpelError(f"{source}: TVM cannot import this model: {detail.strip()}") from None


def with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs and outputs have batch size ``batch`` (their first dim)."""
    if batch < 1:
        raise ScalpelError(f"batch size must be >= 1, got {batch}")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    inits = {i.name for i in fixed.graph.initializer}
    for value in list(fixed.graph.input) + list(fixed.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.name not in inits and len(dims):
            if dims[0].HasField("dim_value") and dims[0].dim_value not in (batch,):
                raise ScalpelError(f"input {value.name!r} has a fixed batch of {dims[0].dim_value}, not {batch}")
            dims[0].dim_value = batch
    return fixed


def _float_matrices(model: onnx.ModelProto):
    """Float initializers as matrices: 2-D ones as they are, conv kernels ``[O, C, KH, KW]``
    unfolded to ``[O, C*KH*KW]`` (the matrix our passes prune)."""
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) in (2, 4):
            arr = numpy_helper.to_array(init)
            yield init, arr.reshape(arr.shape[0], -1)


def _orientation(arr: np.ndarray, w: np.ndarray) -> bool | None:
    """True if ``arr`` holds ``w[N, K]`` transposed, False if as is, None if not at all."""
    if arr.shape == w.shape and np.array_equal(arr, w):
        return False
    if arr.shape == w.T.shape and np.array_equal(arr, w.T):
        return True
    return None


def initializer_names(model: onnx.ModelProto, weights: list[np.ndarray]) -> list[str | None]:
    """The initializer that holds each ``W[N, K]`` (as ``[N, K]`` or ``[K, N]``), or None.

    The Relax importer does not keep initializer names, so layers are matched by content.
    """
    names: list[str | None] = [None] * len(weights)
    for init, arr in _float_matrices(model):
        for i, w in enumerate(weights):
            if names[i] is None and _orientation(arr, w) is not None:
                names[i] = init.name
                break
    return names


def replace_weights(model: onnx.ModelProto, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, int]:
    """Swap initializers: each ``(original W[N, K], pruned W[N, K])`` pair replaces the
    initializer holding ``original`` as ``[N, K]`` (Gemm transB=1), ``[K, N]`` (MatMul, Gemm)
    or, for a conv layer, as the kernel ``[N, C, KH, KW]`` that unfolds to it.
    Returns ``{initializer name: index of the pair}``.
    """
    found: dict[str, int] = {}
    for init, arr in _float_matrices(model):
        for i, (orig, pruned) in enumerate(pairs):
            transposed = None if i in found.values() else _orientation(arr, orig)
            if transposed is None:
                continue
            new = (pruned.T if transposed else pruned).reshape(tuple(init.dims))
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new, np.float32), init.name))
            found[init.name] = i
            break
    return found


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, executable: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path``; it is renamed onto ``path`` only on success,
    with the mode a plain ``open`` (or, for ``executable``, a linker) would have given it."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ScalpelError(f"{path}: directory {parent} does not exist")
    if path.is_dir():
        raise ScalpelError(f"{path}: is a directory; give a file name")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=parent)
    interrupts.add_temp(tmp)  # removed even if an interrupt ends the process the hard way
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, (0o777 if executable else 0o666) & ~_umask())  # mkstemp makes 0600
        interrupts.check()  # an interrupt swallowed on the way (inside TVM) still commits nothing
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        interrupts.discard_temp(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    with atomic_output(path) as tmp:
        onnx.save(model, tmp)
