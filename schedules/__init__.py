"""Kernels for dense layers, one file a target: ``x86.py`` (any LLVM CPU) for now.

Entry points: :func:`grouped_sparse_dense` and :func:`dense` return a TensorIR ``PrimFunc`` for
the target, with knobs chosen by :func:`default_knobs` unless given.
"""

from __future__ import annotations

from tvm import tirx

from tvm_scalpel.errors import ScalpelError
from tvm_scalpel.targets import TargetProfile

from .x86 import CpuKnobs, PackedGroupedSparse, pack_grouped_sparse

__all__ = [
    "CpuKnobs",
    "PackedGroupedSparse",
    "pack_grouped_sparse",
    "default_knobs",
    "grouped_sparse_dense",
    "dense",
    "supports",
]

# Multiply-adds per call above which spreading rows over threads beats the fork/join cost of
# TVM's thread pool. Measured on 2 cores: a 784x300 dense layer (235k) at batch 1 loses with
# threads, AlexNet fc6 (3.8M at 90% pruning) gains about 1.4x; with the other core busy, the
# pool's join is far worse, so small layers stay on one thread.
PARALLEL_MIN_MACS = 1_000_000


def supports(profile: TargetProfile) -> bool:
    return profile.kind == "llvm"


def _require(profile: TargetProfile) -> None:
    if not supports(profile):
        raise ScalpelError(f"no dense-layer schedule for target kind {profile.kind!r} yet")


def default_knobs(profile: TargetProfile, macs_per_row: int) -> CpuKnobs:
    _require(profile)
    tile = 8
    return CpuKnobs(
        unroll=2,
        batch_tile=tile,
        parallel_gemv=macs_per_row >= PARALLEL_MIN_MACS,
        parallel_gemm=macs_per_row * tile >= PARALLEL_MIN_MACS,
    )


def grouped_sparse_dense(
    profile: TargetProfile,
    n: int,
    k: int,
    g: int,
    n_groups: int,
    relu: bool,
    knobs: CpuKnobs | None = None,
) -> tirx.PrimFunc:
    """``y = act(x @ W.T + b)`` for a grouped-sparse W (operands from ``pack_grouped_sparse``)."""
    from . import x86

    knobs = knobs or default_knobs(profile, n_groups * g)
    return x86.grouped_sparse_dense_kernel(n, k, g, n_groups, relu, knobs)


def dense(
    profile: TargetProfile, n: int, k: int, relu: bool, knobs: CpuKnobs | None = None
) -> tirx.PrimFunc:
    """``y = act(x @ W.T + b)`` for a dense row-major ``W[n, k]``."""
    from . import x86

    knobs = knobs or default_knobs(profile, n * k)
    return x86.dense_kernel(n, k, max(profile.simd_width, 1), relu, knobs)
