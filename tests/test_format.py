"""The grouped-sparse format: round trip, layout invariants and exact byte accounting."""

import numpy as np
import pytest
from helpers import group_bounds, group_zero_counts, grouped_sparse_bytes

from tvm_scalpel.decisions import LayerDecision
from tvm_scalpel.format import GroupedSparseMatrix

# (g, N, K): K is never a multiple of g (except g = 1), so every row ends in a partial group.
CASES = [(1, 9, 23), (3, 12, 40), (4, 10, 37), (8, 7, 61), (16, 11, 50), (16, 5, 7)]


def sparse_matrix(rng, n, k, g):
    """Random weights with whole zero groups, scattered single zeros and two all-zero rows."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    for r in range(n):
        for s, e in group_bounds(k, g):
            if rng.random() < 0.5:
                w[r, s:e] = 0.0
    w[rng.random((n, k)) < 0.05] = 0.0  # zeros inside kept groups
    w[[0, n // 2]] = 0.0
    return w


@pytest.mark.parametrize("g,n,k", CASES)
def test_round_trip_is_exact(rng, g, n, k):
    w = sparse_matrix(rng, n, k, g)
    m = GroupedSparseMatrix.from_dense(w, g)
    back = m.to_dense()
    assert back.shape == (n, k) and back.dtype == np.float32
    np.testing.assert_array_equal(back, w)
    assert m.shape == (n, k) and m.group_width == g


@pytest.mark.parametrize("g,n,k", CASES)
def test_byte_accounting(rng, g, n, k):
    w = sparse_matrix(rng, n, k, g)
    m = GroupedSparseMatrix.from_dense(w, g)
    expected = grouped_sparse_bytes(w, g)
    assert m.nbytes == expected
    assert m.dense_nbytes == n * k * 4
    # what compile's per-layer report counts for a layer on each kernel
    sparse = LayerDecision(0, "w", (n, k), "grouped-sparse", g, float(np.count_nonzero(w)) / w.size, 1.0, w)
    assert sparse.weight_bytes == expected
    sparse.kernel = "dense"
    assert sparse.weight_bytes == n * k * 4
    slots = n * len(group_bounds(k, g))
    kept = sum(1 for zeros, size in group_zero_counts(w, g) if zeros < size)
    assert m.n_groups == kept
    assert m.group_density == pytest.approx(kept / slots)


@pytest.mark.parametrize("g,n,k", CASES)
def test_layout_invariants(rng, g, n, k):
    w = sparse_matrix(rng, n, k, g)
    m = GroupedSparseMatrix.from_dense(w, g)
    bounds = group_bounds(k, g)
    assert m.values.dtype == np.float32 and m.values.shape == (m.n_groups, g)
    assert m.group_cols.dtype == np.int32 and m.group_cols.shape == (m.n_groups,)
    assert m.indptr.dtype == np.int32 and m.indptr.shape == (n + 1,)
    assert m.indptr[0] == 0 and m.indptr[-1] == m.n_groups
    assert np.all(np.diff(m.indptr) >= 0)
    for r in range(n):
        cols = m.group_cols[m.indptr[r]:m.indptr[r + 1]]
        # exactly the groups of the row that hold a non-zero, ascending
        expected = [j for j, (s, e) in enumerate(bounds) if np.any(w[r, s:e] != 0)]
        assert cols.tolist() == expected
        for p, j in zip(range(m.indptr[r], m.indptr[r + 1]), cols):
            s, e = bounds[j]
            np.testing.assert_array_equal(m.values[p, : e - s], w[r, s:e])
            assert not np.any(m.values[p, e - s:]), "tail padding lanes must be zero"


def test_all_zero_rows_own_no_groups(rng):
    w = sparse_matrix(rng, 8, 45, 4)
    m = GroupedSparseMatrix.from_dense(w, 4)
    counts = np.diff(m.indptr)
    assert counts[0] == 0 and counts[4] == 0
    assert np.all(counts[[r for r in range(8) if np.any(w[r])]] > 0)


def test_all_zero_matrix():
    m = GroupedSparseMatrix.from_dense(np.zeros((6, 19), np.float32), 8)
    assert m.n_groups == 0 and m.values.shape == (0, 8)
    assert m.nbytes == 7 * 4  # the row pointer only
    np.testing.assert_array_equal(m.indptr, np.zeros(7))
    np.testing.assert_array_equal(m.to_dense(), np.zeros((6, 19), np.float32))


def test_dense_matrix_keeps_every_group(rng):
    w = rng.standard_normal((5, 21)).astype(np.float32)
    m = GroupedSparseMatrix.from_dense(w, 8)
    assert m.n_groups == 5 * 3 and m.group_density == 1.0
    np.testing.assert_array_equal(m.to_dense(), w)


@pytest.mark.parametrize("bad", [np.zeros(10, np.float32), np.zeros((2, 3, 4), np.float32)])
def test_rejects_non_matrices(bad):
    with pytest.raises(ValueError):
        GroupedSparseMatrix.from_dense(bad, 4)


@pytest.mark.parametrize("g", [0, -3])
def test_rejects_bad_group_width(rng, g):
    with pytest.raises(ValueError):
        GroupedSparseMatrix.from_dense(rng.standard_normal((3, 8)).astype(np.float32), g)
