"""Reading ONNX models (with one-line errors) and writing pruned ones back."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import deque
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


# ----------------------------------------------------------------------------------------------
# Relax constants back to ONNX tensors. The Relax importer keeps no names, so arrays are matched
# to tensors by content; this is the one place that does it (layer weights to initializers,
# node removal's constants to initializers and Constant nodes).


def _content_key(arr: np.ndarray):
    return arr.dtype.str, arr.shape, np.ascontiguousarray(arr).tobytes()


def match_tensors(tensors, arrays: list[np.ndarray]) -> list[tuple[str, bool] | None]:
    """For each array, ``(name, transposed)`` of the tensor in ``tensors`` (``(name, array)``
    pairs) that holds it, or None. An array matches a tensor with exactly its contents first,
    else (a matrix) its transpose; each tensor goes to one array at most, and among equal
    contents the arrays take the tensors in the order ``tensors`` lists them."""
    slots: dict = {}
    for name, arr in tensors:
        slots.setdefault(_content_key(arr), deque()).append(name)
    found: list[tuple[str, bool] | None] = [None] * len(arrays)
    for transposed in (False, True):
        for i, arr in enumerate(arrays):
            if found[i] is not None or (transposed and arr.ndim != 2):
                continue
            names = slots.get(_content_key(arr.T if transposed else arr))
            if names:
                found[i] = (names.popleft(), transposed)
    return found


def constant_tensors(graph: onnx.GraphProto):
    """``(tensor name, array)`` of every initializer and ``Constant`` node output, in the order
    the nodes first read them."""
    inits = {i.name: i for i in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"
                 and any(a.name == "value" for a in n.attribute)}
    seen: set[str] = set()
    for node in graph.node:
        for name in node.input:
            if name in seen or not (name in inits or name in constants):
                continue
            seen.add(name)
            if name in inits:
                tensor = inits[name]
            else:
                tensor = next(a.t for a in constants[name].attribute if a.name == "value")
            yield name, numpy_helper.to_array(tensor)


def _weight_matrices(model: onnx.ModelProto):
    """``(name, matrix)`` of the float initializers that can hold a layer's weight: 2-D ones
    as they are, conv kernels ``[O, C, KH, KW]`` unfolded to ``[O, C*KH*KW]`` (the matrix our
    passes prune)."""
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) in (2, 4):
            arr = numpy_helper.to_array(init)
            yield init.name, arr.reshape(arr.shape[0], -1)


def initializer_names(model: onnx.ModelProto, weights: list[np.ndarray]) -> list[str | None]:
    """The initializer that holds each ``W[N, K]`` (as ``[N, K]``, ``[K, N]`` or a conv kernel
    unfolding to it), or None."""
    return [None if m is None else m[0] for m in match_tensors(_weight_matrices(model), weights)]


def replace_weights(model: onnx.ModelProto, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, int]:
    """Swap initializers: each ``(original W[N, K], pruned W[N, K])`` pair replaces the
    initializer holding ``original`` as ``[N, K]`` (Gemm transB=1), ``[K, N]`` (MatMul, Gemm)
    or, for a conv layer, as the kernel ``[N, C, KH, KW]`` that unfolds to it.
    Returns ``{initializer name: index of the pair}``.
    """
    inits = {init.name: init for init in model.graph.initializer}
    found: dict[str, int] = {}
    matches = match_tensors(_weight_matrices(model), [orig for orig, _ in pairs])
    for i, ((_, pruned), match) in enumerate(zip(pairs, matches)):
        if match is None:
            continue
        name, transposed = match
        init = inits[name]
        new = (pruned.T if transposed else pruned).reshape(tuple(init.dims))
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new, np.float32), name))
        found[name] = i
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
