"""Kernels for dense layers, one file a target: ``x86.py`` (any LLVM CPU), ``cuda.py``.

Entry points: :func:`layer_spec` describes a layer with the target's default knobs;
:func:`kernel` returns the TensorIR ``PrimFunc`` for one layer or a chain of layers run back to
back; :func:`grouped_sparse_dense` and :func:`dense` are the one-layer shortcuts.
"""

from __future__ import annotations

from tvm import tirx

from tvm_scalpel.errors import ScalpelError
from tvm_scalpel.targets import TargetProfile

from . import x86
from .conv_cpu import ConvKnobs, ConvShape
from .x86 import CpuKnobs, LayerSpec, PackedGroupedSparse, pack_grouped_sparse

__all__ = [
    "CpuKnobs",
    "LayerSpec",
    "PackedGroupedSparse",
    "pack_grouped_sparse",
    "pack_dense",
    "default_knobs",
    "layer_spec",
    "kernel",
    "grouped_sparse_dense",
    "dense",
    "supports",
    "supports_dense",
    "patch_kernel",
    "ConvKnobs",
    "ConvShape",
    "default_conv_knobs",
    "conv2d",
    "pack_conv_weight",
    "pack_conv_bias",
]

# Multiply-adds per call above which spreading rows over threads beats the fork/join cost of
# TVM's thread pool. Measured on 2 idle cores: a 784x300 dense layer (235k) runs 1.7x faster
# on two threads, a 92%-pruned one (19k) slower. Below this, one thread.
PARALLEL_MIN_MACS = 200_000


def supports(profile: TargetProfile) -> bool:
    return profile.kind in ("llvm", "cuda")


def supports_dense(profile: TargetProfile) -> bool:
    """Whether we schedule dense layers too (on GPUs, TVM's dlight rules do)."""
    return profile.kind == "llvm"


def _require(profile: TargetProfile) -> None:
    if not supports(profile):
        raise ScalpelError(f"no dense-layer schedule for target kind {profile.kind!r} yet")


def default_knobs(profile: TargetProfile, macs_per_row: int) -> CpuKnobs:
    _require(profile)
    if profile.kind == "cuda":
        return CpuKnobs()  # the CUDA kernel has no knobs yet
    tile = 8
    return CpuKnobs(
        unroll=2,
        batch_tile=tile,
        parallel_gemv=macs_per_row >= PARALLEL_MIN_MACS,
        parallel_gemm=macs_per_row * tile >= PARALLEL_MIN_MACS,
    )


def layer_spec(
    profile: TargetProfile,
    n: int,
    k: int,
    relu: bool,
    group_width: int = 0,
    n_groups: int = 0,
    knobs: CpuKnobs | None = None,
    packed: bool = False,
) -> LayerSpec:
    """A dense layer (``group_width=0``) or a grouped-sparse one, with the target's knobs.
    ``packed``: a dense weight in GEMM panels (``pack_dense``) instead of row-major, on CPUs."""
    macs = n_groups * group_width if group_width else n * k
    lanes = max(profile.simd_width, 1)
    panel = x86.panel_width(lanes) if packed and not group_width and profile.kind == "llvm" else 0
    return LayerSpec(n, k, relu, group_width, n_groups, lanes=lanes,
                     knobs=knobs or default_knobs(profile, macs), panel=panel)


def pack_dense(spec: LayerSpec, weight, bias=None) -> list:
    """The constant operands of a dense layer's kernel, ``[weight, bias]`` in ``spec``'s layout
    (``W[N, K]`` row-major, or packed into panels)."""
    import numpy as np

    w = np.ascontiguousarray(weight, dtype=np.float32)
    b = np.zeros(spec.n, np.float32) if bias is None else np.asarray(bias, np.float32)
    if spec.panel:
        return list(x86.pack_dense_panels(w, b, spec.panel))
    return [w, b]


def kernel(profile: TargetProfile, specs: list[LayerSpec]) -> tirx.PrimFunc:
    """One function computing the layers back to back: parameters ``x, *operands, y``
    (on CUDA: one grouped-sparse layer)."""
    _require(profile)
    if profile.kind == "cuda":
        from . import cuda

        if len(specs) != 1:
            raise ScalpelError("the CUDA kernels take one layer at a time")
        return cuda.grouped_sparse_dense_kernel(specs[0])
    from . import x86

    return x86.chain_kernel(specs)


def grouped_sparse_dense(
    profile: TargetProfile, n: int, k: int, g: int, n_groups: int, relu: bool,
    knobs: CpuKnobs | None = None,
) -> tirx.PrimFunc:
    """``y = act(x @ W.T + b)`` for a grouped-sparse W (operands from ``pack_grouped_sparse``)."""
    return kernel(profile, [layer_spec(profile, n, k, relu, g, n_groups, knobs)])


def dense(
    profile: TargetProfile, n: int, k: int, relu: bool, knobs: CpuKnobs | None = None,
    packed: bool = False,
) -> tirx.PrimFunc:
    """``y = act(x @ W.T + b)`` for a dense row-major ``W[n, k]`` (``packed``: the operands
    ``pack_dense`` makes of it)."""
    return kernel(profile, [layer_spec(profile, n, k, relu, knobs=knobs, packed=packed)])


def patch_kernel(profile: TargetProfile, spec: LayerSpec, positions: int) -> tirx.PrimFunc:
    """A conv layer over its unfolded patches (``cols[B, C*KH*KW, OH*OW]`` to ``y[B, O,
    OH*OW]``), vectorized along the output positions; CPU targets only."""
    if not supports_dense(profile):
        raise ScalpelError(f"no convolution kernel for target kind {profile.kind!r}")
    from . import x86

    return x86.patch_kernel(spec, positions)


def _conv_lanes(profile: TargetProfile) -> int:
    return max(profile.simd_width, 4)


def default_conv_knobs(profile: TargetProfile, shape: ConvShape) -> ConvKnobs:
    """The blocked conv kernel's knobs by the rule of ``conv_cpu.default_conv_knobs``."""
    from . import conv_cpu

    triple = str(profile.target.attrs.get("mtriple", "")) if profile.kind == "llvm" else ""
    x86 = triple.startswith(("x86", "i386", "i686")) or not triple
    lanes = _conv_lanes(profile)
    return conv_cpu.default_conv_knobs(shape, lanes, conv_cpu.vector_registers(lanes, x86))


def conv2d(profile: TargetProfile, shape: ConvShape, knobs: ConvKnobs | None = None,
           relu: bool = False, residual: bool = False) -> tirx.PrimFunc:
    """The blocked (NCHW[x]c) dense / grouped / depthwise conv kernel: parameters ``data,
    weight, bias[, residual], out``, data and out NCHW, weight and bias packed by
    :func:`pack_conv_weight` / :func:`pack_conv_bias` with the same knobs; CPU targets only."""
    if not supports_dense(profile):
        raise ScalpelError(f"no convolution kernel for target kind {profile.kind!r}")
    from . import conv_cpu

    knobs = knobs or default_conv_knobs(profile, shape)
    return conv_cpu.conv2d_kernel(shape, knobs, _conv_lanes(profile), relu, residual)


def pack_conv_weight(kernel, shape: ConvShape, knobs: ConvKnobs):
    from . import conv_cpu

    return conv_cpu.pack_weight(kernel, shape, knobs)


def pack_conv_bias(bias, shape: ConvShape, knobs: ConvKnobs):
    from . import conv_cpu

    return conv_cpu.pack_bias(bias, shape, knobs)
