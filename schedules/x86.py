"""CPU kernels (x86 AVX-512 / AVX2; any LLVM CPU target) for dense layers, grouped-sparse or dense.

Both kernels compute ``y[b, n] = act(bias[n] + sum_k x[b, k] * W[n, k])`` for a batch ``b`` that
may be symbolic, and are written directly in TVMScript so that the loop order is exactly the one
we want (TE puts the fixed group axis outside a data-dependent reduction):

* the group axis (g weights) is the innermost loop and is ``T.vectorized``: one FMA on a vector
  register per kept group, the point of SIMD-aware pruning;
* batch 1 (GEMV) keeps ``unroll`` independent accumulators per row, so consecutive groups do not
  wait on each other's FMA latency;
* batch > 1 (GEMM) processes ``batch_tile`` inputs at once: each loaded group of weights is
  used ``batch_tile`` times from registers; the leftover inputs take the GEMV path;
* rows are spread over the thread pool only where it pays (``parallel`` knobs), because at
  batch 1 the thread pool's fork/join often costs more than a memory-bound layer gains.

Tail groups: the packed layout (``pack_grouped_sparse``) moves a row's partial last group to
start at ``K - g``, with zeros in the lanes it shares with the previous group, so every load is
a full, in-bounds vector and no lane needs a bounds check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from tvm_scalpel.format import GroupedSparseMatrix


@dataclass(frozen=True)
class CpuKnobs:
    """Schedule knobs of the CPU kernels (what autotuning searches)."""

    unroll: int = 4  # independent accumulators per row in the GEMV path
    batch_tile: int = 8  # inputs that share each weight load in the GEMM path
    parallel_gemv: bool = False  # spread rows over threads at batch 1
    parallel_gemm: bool = True  # spread rows over threads for batch tiles


@dataclass(frozen=True)
class PackedGroupedSparse:
    """Kernel operands: values [G, g], element offsets [G] (int32), row pointer [N + 1]."""

    values: np.ndarray
    offsets: np.ndarray
    indptr: np.ndarray


def pack_grouped_sparse(m: GroupedSparseMatrix) -> PackedGroupedSparse:
    """Turn group-column indices into element offsets, shifting partial tail groups in bounds."""
    n, k = m.shape
    g = m.group_width
    if k < g:
        raise ValueError(f"a row of {k} inputs is narrower than one group of {g}")
    start = m.group_cols.astype(np.int64) * g
    offsets = np.minimum(start, k - g)
    shift = start - offsets  # > 0 only for a partial tail group
    values = m.values.copy()
    for s in np.unique(shift[shift > 0]):
        rows = shift == s
        values[rows, s:] = m.values[rows, : g - s]
        values[rows, :s] = 0.0  # lanes that belong to the previous group
    return PackedGroupedSparse(values, offsets.astype(np.int32), m.indptr.astype(np.int32))


def _epilogue(value, relu: bool):
    return T.max(value, T.float32(0)) if relu else value


def _lane_sum(width: int):
    """Macro: ``acc[i, 0] = sum(acc[i, 0:width])``.

    For a power-of-two width the live lanes are halved log2(width) times with vector adds (a
    serial sum is a chain of ``width`` dependent adds, LLVM may not reorder float adds, and at
    ~4 groups a row that chain cost more than the groups themselves); else a serial sum.
    """
    tree = width & (width - 1) == 0 and width <= 64

    @T.macro
    def lane_sum(acc, i):
        if tree:
            if width >= 64:
                for lane in T.vectorized(32):
                    acc[i, lane] = acc[i, lane] + acc[i, lane + 32]
            if width >= 32:
                for lane in T.vectorized(16):
                    acc[i, lane] = acc[i, lane] + acc[i, lane + 16]
            if width >= 16:
                for lane in T.vectorized(8):
                    acc[i, lane] = acc[i, lane] + acc[i, lane + 8]
            if width >= 8:
                for lane in T.vectorized(4):
                    acc[i, lane] = acc[i, lane] + acc[i, lane + 4]
            if width >= 4:
                for lane in T.vectorized(2):
                    acc[i, lane] = acc[i, lane] + acc[i, lane + 2]
            if width >= 2:
                acc[i, 0] = acc[i, 0] + acc[i, 1]
        else:
            for lane in range(1, width):
                acc[i, 0] = acc[i, 0] + acc[i, lane]

    return lane_sum


def grouped_sparse_dense_kernel(
    n: int, k: int, g: int, n_groups: int, relu: bool, knobs: CpuKnobs = CpuKnobs()
) -> tirx.PrimFunc:
    """``y = act(x @ W.T + bias)`` with W in the packed grouped-sparse layout."""
    u, bt = knobs.unroll, knobs.batch_tile
    gemm_rows = T.parallel if knobs.parallel_gemm else T.serial
    gemv_rows = T.parallel if knobs.parallel_gemv else T.serial
    lane_sum = _lane_sum(g)
    n_groups = max(n_groups, 1)  # an all-zero layer still needs a valid (unused) buffer

    @T.prim_func(private=True)
    def kernel(
        x_handle: T.handle,
        values: T.Buffer((n_groups, g), "float32"),
        offsets: T.Buffer((n_groups,), "int32"),
        indptr: T.Buffer((n + 1,), "int32"),
        bias: T.Buffer((n,), "float32"),
        y_handle: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        batch = T.int64()
        x = T.match_buffer(x_handle, (batch, k), "float32")
        y = T.match_buffer(y_handle, (batch, n), "float32")
        # GEMM path: bt inputs share every group of weights loaded.
        for bo in range(batch // bt):
            for r in gemm_rows(n):
                acc = T.alloc_buffer((bt, g), "float32", scope="global")
                for i in T.unroll(bt):
                    for lane in T.vectorized(g):
                        acc[i, lane] = T.float32(0)
                for p in range(indptr[r], indptr[r + 1]):
                    for i in T.unroll(bt):
                        for lane in T.vectorized(g):
                            acc[i, lane] = acc[i, lane] + values[p, lane] * x[
                                bo * bt + i, offsets[p] + lane
                            ]
                for i in T.unroll(bt):
                    lane_sum(acc, i)
                    y[bo * bt + i, r] = _epilogue(acc[i, 0] + bias[r], relu)
        # GEMV path: the inputs left over (all of them at batch 1).
        for b in range(batch // bt * bt, batch):
            for r in gemv_rows(n):
                acc = T.alloc_buffer((u, g), "float32", scope="global")
                for a in T.unroll(u):
                    for lane in T.vectorized(g):
                        acc[a, lane] = T.float32(0)
                start = indptr[r]
                count = indptr[r + 1] - start
                for q in range(count // u):
                    for a in T.unroll(u):
                        for lane in T.vectorized(g):
                            acc[a, lane] = acc[a, lane] + values[start + q * u + a, lane] * x[
                                b, offsets[start + q * u + a] + lane
                            ]
                for p in range(start + count // u * u, start + count):
                    for lane in T.vectorized(g):
                        acc[0, lane] = acc[0, lane] + values[p, lane] * x[b, offsets[p] + lane]
                for a in T.unroll(1, u):  # fold the accumulators vector-wise first
                    for lane in T.vectorized(g):
                        acc[0, lane] = acc[0, lane] + acc[a, lane]
                lane_sum(acc, 0)
                y[b, r] = _epilogue(acc[0, 0] + bias[r], relu)

    return kernel


def dense_kernel(
    n: int, k: int, lanes: int, relu: bool, knobs: CpuKnobs = CpuKnobs()
) -> tirx.PrimFunc:
    """``y = act(x @ W.T + bias)`` with a dense row-major ``W[n, k]``, vectorized by ``lanes``."""
    u, bt = knobs.unroll, knobs.batch_tile
    full = k // lanes  # whole vectors per row; the k % lanes tail is scalar
    gemm_rows = T.parallel if knobs.parallel_gemm else T.serial
    gemv_rows = T.parallel if knobs.parallel_gemv else T.serial
    lane_sum = _lane_sum(lanes)

    @T.prim_func(private=True)
    def kernel(
        x_handle: T.handle,
        weight: T.Buffer((n, k), "float32"),
        bias: T.Buffer((n,), "float32"),
        y_handle: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        batch = T.int64()
        x = T.match_buffer(x_handle, (batch, k), "float32")
        y = T.match_buffer(y_handle, (batch, n), "float32")
        for bo in range(batch // bt):
            for r in gemm_rows(n):
                acc = T.alloc_buffer((bt, lanes), "float32", scope="global")
                for i in T.unroll(bt):
                    for lane in T.vectorized(lanes):
                        acc[i, lane] = T.float32(0)
                for j in range(full):
                    for i in T.unroll(bt):
                        for lane in T.vectorized(lanes):
                            acc[i, lane] = acc[i, lane] + weight[r, j * lanes + lane] * x[
                                bo * bt + i, j * lanes + lane
                            ]
                for i in T.unroll(bt):
                    lane_sum(acc, i)
                    for c in range(full * lanes, k):
                        acc[i, 0] = acc[i, 0] + weight[r, c] * x[bo * bt + i, c]
                    y[bo * bt + i, r] = _epilogue(acc[i, 0] + bias[r], relu)
        for b in range(batch // bt * bt, batch):
            for r in gemv_rows(n):
                acc = T.alloc_buffer((u, lanes), "float32", scope="global")
                for a in T.unroll(u):
                    for lane in T.vectorized(lanes):
                        acc[a, lane] = T.float32(0)
                for q in range(full // u):
                    for a in T.unroll(u):
                        for lane in T.vectorized(lanes):
                            acc[a, lane] = acc[a, lane] + weight[
                                r, (q * u + a) * lanes + lane
                            ] * x[b, (q * u + a) * lanes + lane]
                for j in range(full // u * u, full):
                    for lane in T.vectorized(lanes):
                        acc[0, lane] = acc[0, lane] + weight[r, j * lanes + lane] * x[
                            b, j * lanes + lane
                        ]
                for a in T.unroll(1, u):
                    for lane in T.vectorized(lanes):
                        acc[0, lane] = acc[0, lane] + acc[a, lane]
                lane_sum(acc, 0)
                for c in range(full * lanes, k):
                    acc[0, 0] = acc[0, 0] + weight[r, c] * x[b, c]
                y[b, r] = _epilogue(acc[0, 0] + bias[r], relu)

    return kernel
