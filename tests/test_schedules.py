"""The LLVM CPU kernels (``cpu_kernels``) on their own, against numpy float64, over group widths, batches and knobs."""

import numpy as np
import pytest
from helpers import build_primfunc, dense_ref, ref_prune, rel_err, tensors

from tvm_scalpel import ScalpelError, schedules
from tvm_scalpel.format import GroupedSparseMatrix
from tvm_scalpel.schedules import CpuKnobs, LayerSpec, cpu_kernels, pack_grouped_sparse
from tvm_scalpel.targets import resolve_target

GROUP_WIDTHS = [1, 4, 8, 16, 32]
# batch 1 and 7: GEMV only (tile 8); 8, 16: whole GEMM tiles; 19: two tiles and a remainder
BATCHES = [1, 7, 8, 16, 19]
KNOBS = {
    "serial-u1": CpuKnobs(unroll=1, batch_tile=8, parallel_gemv=False, parallel_gemm=False),
    "parallel-u2": CpuKnobs(unroll=2, batch_tile=8, parallel_gemv=True, parallel_gemm=True),
    "u4-tile4": CpuKnobs(unroll=4, batch_tile=4, parallel_gemv=False, parallel_gemm=True),
    # dense GEMM register blocking over 4 rows; N = 21 leaves a remainder row
    "rows4-tile4": CpuKnobs(unroll=2, batch_tile=4, parallel_gemm=True, row_tile=4),
}
N = 21


def k_for(g: int) -> int:
    """A row length that is not a multiple of g (for g > 1) and holds a few groups."""
    return 3 * g + 5 if g > 1 else 37


def sparse_weight(rng, k, g):
    """~60% pruned in groups of g, with one all-zero row."""
    w, _ = ref_prune(rng.standard_normal((N, k)).astype(np.float32), g, 0.6)
    w[3] = 0.0
    return w


def run_kernel(fn, x, operands, n):
    y = np.full((x.shape[0], n), np.nan, dtype=np.float32)  # every output must be written
    args = tensors(x, *operands, y)
    fn(*args)
    return args[-1].numpy()


def check_batches(rng, fn, operands, w, bias, relu):
    for batch in BATCHES:
        x = rng.standard_normal((batch, w.shape[1])).astype(np.float32)
        y = run_kernel(fn, x, operands, w.shape[0])
        ref = dense_ref(x, w, bias, relu)
        assert rel_err(y, ref) < 1e-5, f"batch {batch}"
    if relu:  # the activation was really exercised
        assert np.any(ref == 0) and np.any(ref > 0)


@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("g", GROUP_WIDTHS)
def test_grouped_sparse_dense_kernel(host, rng, g, relu, knobs):
    k = k_for(g)
    w = sparse_weight(rng, k, g)
    bias = rng.standard_normal(N).astype(np.float32)
    m = GroupedSparseMatrix.from_dense(w, g)
    packed = pack_grouped_sparse(m)
    fn = build_primfunc(schedules.grouped_sparse_dense(host, N, k, g, m.n_groups, relu, knobs), host.target)
    check_batches(rng, fn, [packed.values, packed.offsets, packed.indptr, bias], w, bias, relu)


@pytest.mark.parametrize("knobs", KNOBS.values(), ids=KNOBS.keys())
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("lanes", GROUP_WIDTHS)
def test_dense_kernel(host, rng, lanes, relu, knobs):
    k = k_for(lanes)
    w = rng.standard_normal((N, k)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    # a row-major W[N, K] (no panels), vectorized by ``lanes``
    spec = LayerSpec(N, k, relu, lanes=lanes, knobs=knobs)
    fn = build_primfunc(cpu_kernels.chain_kernel([spec]), host.target)
    check_batches(rng, fn, [w, bias], w, bias, relu)


@pytest.mark.parametrize("k", [5, 16, 53])
def test_dense_entry_point_any_width(host, rng, k):
    """``schedules.dense`` vectorizes by the SIMD width; K below, at and above it."""
    w = rng.standard_normal((N, k)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    fn = build_primfunc(schedules.dense(host, N, k, True), host.target)
    check_batches(rng, fn, [w, bias], w, bias, True)


def test_grouped_sparse_kernel_all_zero_weight(host, rng):
    """A layer pruned away entirely: no groups at all, the output is act(bias)."""
    g, k = 8, 29
    bias = rng.standard_normal(N).astype(np.float32)
    fn = build_primfunc(schedules.grouped_sparse_dense(host, N, k, g, 0, True), host.target)
    operands = [np.zeros((1, g), np.float32), np.zeros(1, np.int32), np.zeros(N + 1, np.int32), bias]
    for batch in (1, 13):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        y = run_kernel(fn, x, operands, N)
        np.testing.assert_allclose(y, np.broadcast_to(np.maximum(bias, 0), y.shape), rtol=0, atol=0)


@pytest.mark.parametrize("g", GROUP_WIDTHS)
def test_pack_grouped_sparse(rng, g):
    k = k_for(g)
    w = sparse_weight(rng, k, g)
    m = GroupedSparseMatrix.from_dense(w, g)
    packed = pack_grouped_sparse(m)
    assert packed.offsets.dtype == np.int32 and packed.indptr.dtype == np.int32
    assert np.all(packed.offsets >= 0) and np.all(packed.offsets <= k - g)  # full in-bounds loads
    rebuilt = np.zeros_like(w)
    for r in range(N):
        for p in range(packed.indptr[r], packed.indptr[r + 1]):
            rebuilt[r, packed.offsets[p]:packed.offsets[p] + g] += packed.values[p]
    np.testing.assert_array_equal(rebuilt, w)


def test_pack_rejects_rows_narrower_than_a_group(rng):
    m = GroupedSparseMatrix.from_dense(rng.standard_normal((4, 6)).astype(np.float32), 8)
    with pytest.raises(ValueError):
        pack_grouped_sparse(m)


def test_default_knobs_parallelize_only_large_layers(host):
    assert not schedules.default_knobs(host, 1000).parallel_gemv
    assert schedules.default_knobs(host, 10 * schedules.PARALLEL_MIN_MACS).parallel_gemm


def test_kernels_refuse_targets_without_schedules():
    c = resolve_target('{"kind": "c"}')
    assert not schedules.supports(c)
    with pytest.raises(ScalpelError):
        schedules.dense(c, 4, 8, False)
    with pytest.raises(ScalpelError):
        schedules.grouped_sparse_dense(c, 4, 8, 4, 2, False)
