"""The grouped-sparse weight format.

A dense layer's weight is a row-major matrix ``W[N, K]``: one row per output neuron, one column
per input. Each row is cut into groups of ``g`` consecutive weights along K. Only the groups that
hold a non-zero weight are kept:

* ``values  [n_groups, g]`` float32: the kept groups, row after row, columns ascending;
* ``group_cols [n_groups]`` int32: one group-column index ``j`` per kept group (the group covers
  input columns ``j*g .. j*g+g-1``);
* ``indptr [N + 1]`` int32: row ``n`` owns groups ``indptr[n] .. indptr[n+1]-1``.

Tail: when K is not a multiple of g the last group of a row is *partial*, covering only
``K - j*g`` columns. It is stored zero-padded to g values (the padding lanes are zeros that map
to no column). Pruning treats a partial group as one group of its real size. With ``g = 1`` the
format is plain CSR, the "traditional" pruning baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

def num_group_cols(k: int, g: int) -> int:
    """How many groups (the last one possibly partial) one row of K inputs holds."""
    return -(-k // g)


def pad_columns(w: np.ndarray, g: int) -> np.ndarray:
    """``w[N, K]`` zero-padded on the right to a multiple of g columns."""
    n, k = w.shape
    kp = num_group_cols(k, g) * g
    if kp == k:
        return w
    out = np.zeros((n, kp), dtype=w.dtype)
    out[:, :k] = w
    return out


def group_view(w: np.ndarray, g: int) -> np.ndarray:
    """``w[N, K]`` as ``[N, ceil(K/g), g]`` groups (zero padded at the tail)."""
    n, _ = w.shape
    return pad_columns(w, g).reshape(n, -1, g)


def group_sizes(k: int, g: int) -> np.ndarray:
    """Number of real (unpadded) weights in each group column of a row."""
    sizes = np.full(num_group_cols(k, g), g, dtype=np.int64)
    if k % g:
        sizes[-1] = k % g
    return sizes


@dataclass(frozen=True)
class GroupedSparseMatrix:
    """A ``[N, K]`` matrix stored as kept groups of g consecutive weights along K."""

    shape: tuple[int, int]
    group_width: int
    values: np.ndarray  # [n_groups, g] float32
    group_cols: np.ndarray  # [n_groups] int32
    indptr: np.ndarray  # [N + 1] int32

    @classmethod
    def from_dense(cls, w: np.ndarray, group_width: int) -> "GroupedSparseMatrix":
        """Keep every group of ``w`` that holds at least one non-zero weight."""
        if w.ndim != 2:
            raise ValueError(f"expected a 2-D weight matrix, got shape {w.shape}")
        if group_width < 1:
            raise ValueError(f"group width must be >= 1, got {group_width}")
        w = np.asarray(w, dtype=np.float32)
        groups = group_view(w, group_width)
        kept = np.any(groups != 0, axis=2)
        rows, cols = np.nonzero(kept)  # row-major order: rows ascending, columns ascending
        indptr = np.zeros(w.shape[0] + 1, dtype=np.int32)
        np.cumsum(kept.sum(axis=1), out=indptr[1:])
        return cls(
            shape=(int(w.shape[0]), int(w.shape[1])),
            group_width=group_width,
            values=np.ascontiguousarray(groups[rows, cols], dtype=np.float32),
            group_cols=cols.astype(np.int32),
            indptr=indptr,
        )

    def to_dense(self) -> np.ndarray:
        n, k = self.shape
        g = self.group_width
        groups = np.zeros((n, num_group_cols(k, g), g), dtype=np.float32)
        rows = np.repeat(np.arange(n), np.diff(self.indptr))
        groups[rows, self.group_cols] = self.values
        return groups.reshape(n, -1)[:, :k].copy()

    @property
    def n_groups(self) -> int:
        return int(self.values.shape[0])

    @property
    def nbytes(self) -> int:
        """Exact storage: values + one index per group + row pointer."""
        return int(self.values.nbytes + self.group_cols.nbytes + self.indptr.nbytes)

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4

    @property
    def group_density(self) -> float:
        """Fraction of group slots kept."""
        n, k = self.shape
        return self.n_groups / float(n * num_group_cols(k, self.group_width))
