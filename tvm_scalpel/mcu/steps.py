"""Each layer of the chain as a step of the project: its kernel (a TIR function), the constant
arrays it reads from flash, and the kind it is reported as.

A layer with weights goes grouped-sparse when its zeros form groups (g recovered from the
pattern, as ``compile`` does for other targets) and, in ``mode="auto"``, when that takes less
flash than dense: on a microcontroller flash is the scarce resource, and the grouped-sparse
kernel does less work whenever it stores fewer weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ScalpelError
from ..format import GroupedSparseMatrix
from ..pruning import recover_group_width
from . import kernels
from .graph import Layer

GROUP_CANDIDATES = (32, 16, 8, 4, 2)


@dataclass
class ConstArray:
    """A ``const`` array in flash; ``role`` says what it holds (values, indices, ...)."""

    symbol: str
    role: str
    data: np.ndarray

    @property
    def ctype(self) -> str:
        return {np.dtype(np.float32): "float", np.dtype(np.int32): "int32_t",
                np.dtype(np.int16): "int16_t", np.dtype(np.int8): "int8_t"}[self.data.dtype]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class Step:
    """One kernel call: ``symbol(input, *arrays, output)``."""

    layer: Layer
    symbol: str
    kind: str  # "dense" | "grouped-sparse" | "conv" | "grouped-sparse conv" | "maxpool" | ...
    function: object  # tirx.PrimFunc
    arrays: list[ConstArray] = field(default_factory=list)
    group_width: int = 0
    density: float = 1.0
    in_ctype: str = "float"  # C type of the activation read
    out_ctype: str = "float"  # of the activation written
    bias_ctype: str = "float"

    @property
    def flash_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def choose_format(w2d: np.ndarray, mode: str) -> GroupedSparseMatrix | None:
    """The grouped-sparse form of an unfolded weight, or None where it stays dense."""
    if mode == "dense" or np.all(w2d != 0):
        return None
    k = w2d.shape[1]
    g = recover_group_width(w2d, tuple(c for c in GROUP_CANDIDATES if c <= k))
    sparse = GroupedSparseMatrix.from_dense(w2d, g)
    if mode == "sparse" or sparse.nbytes < w2d.nbytes:
        return sparse
    return None


def _bias(layer: Layer, prefix: str, n: int) -> ConstArray:
    bias = layer.bias if layer.bias is not None else np.zeros(n, np.float32)
    return ConstArray(f"{prefix}_bias", "bias", np.ascontiguousarray(bias, np.float32))


def _sparse_arrays(prefix: str, sparse: GroupedSparseMatrix) -> list[ConstArray]:
    vals = sparse.values.reshape(-1) if sparse.n_groups else np.zeros(sparse.group_width, np.float32)
    cols = sparse.group_cols if sparse.n_groups else np.zeros(1, np.int32)
    return [ConstArray(f"{prefix}_values", "values", np.ascontiguousarray(vals, np.float32)),
            ConstArray(f"{prefix}_group_cols", "group column indices", np.ascontiguousarray(cols, np.int32)),
            ConstArray(f"{prefix}_indptr", "row pointers", np.ascontiguousarray(sparse.indptr, np.int32))]


def make_step(index: int, layer: Layer, mode: str) -> Step:
    prefix = f"scalpel_l{index}"
    symbol = f"{prefix}_{layer.op}"
    has_bias = layer.bias is not None and bool(np.any(layer.bias != 0))
    if layer.op == "dense":
        n, k = layer.weight.shape
        sparse = choose_format(layer.weight, mode)
        density = float(np.count_nonzero(layer.weight)) / layer.weight.size
        if sparse is None:
            arrays = [ConstArray(f"{prefix}_weight", "weights", layer.weight.reshape(-1))]
            fn = kernels.dense(n, k, layer.relu, has_bias)
            kind, g = "dense", 0
        else:
            arrays = _sparse_arrays(prefix, sparse)
            fn = kernels.grouped_sparse(sparse, layer.relu, has_bias)
            kind, g = "grouped-sparse", sparse.group_width
        if has_bias:
            arrays.append(_bias(layer, prefix, n))
        return Step(layer, symbol, kind, fn, arrays, g, density)
    if layer.op == "conv":
        co = layer.weight.shape[0]
        w2d = layer.weight.reshape(co, -1)
        sparse = choose_format(w2d, mode)
        density = float(np.count_nonzero(w2d)) / w2d.size
        if sparse is None:
            arrays = [ConstArray(f"{prefix}_weight", "weights", layer.weight.reshape(-1))]
            fn = kernels.conv(layer.in_shape, layer.out_shape, layer.kernel, layer.stride,
                              layer.relu, has_bias)
            kind, g = "conv", 0
        else:
            offsets = kernels.patch_offsets(layer.in_shape, layer.kernel, sparse.group_width)
            arrays = _sparse_arrays(prefix, sparse) + [
                ConstArray(f"{prefix}_patch_offsets", "patch offsets", offsets)]
            fn = kernels.grouped_sparse_conv(sparse, layer.in_shape, layer.out_shape, layer.kernel,
                                             layer.stride, layer.relu, has_bias)
            kind, g = "grouped-sparse conv", sparse.group_width
        if has_bias:
            arrays.append(_bias(layer, prefix, co))
        return Step(layer, symbol, kind, fn, arrays, g, density)
    if layer.op in ("maxpool", "avgpool"):
        fn = kernels.pool(layer.op, layer.in_shape, layer.out_shape, layer.kernel, layer.stride, layer.relu)
        return Step(layer, symbol, layer.op, fn)
    if layer.op == "relu":
        return Step(layer, symbol, "relu", kernels.relu(layer.in_size))
    if layer.op == "pad":
        return Step(layer, symbol, "pad", kernels.pad(layer.in_shape, layer.out_shape, layer.pads))
    raise ScalpelError(f"layer {layer.name}: no cortex-m4 kernel for {layer.op}")

