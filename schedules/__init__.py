"""Kernels for dense and conv layers, one rule file a target (as TVM's dlight rules):
``x86.py``, ``aarch64.py``, ``cortex_m4.py`` (the LLVM CPUs, sharing ``cpu_kernels.py`` and
``conv_cpu.py``) and ``cuda.py``; ``spec.py`` has what they share (layer spec, knobs, packing),
``toolchains.py`` the build tools (cross linkers, nvcc). ``RULES`` maps a target to its rule.

Entry points: :func:`layer_spec` describes a layer with the target's default knobs;
:func:`kernel` returns the TensorIR ``PrimFunc`` for one layer or a chain of layers run back to
back; :func:`grouped_sparse_dense` and :func:`dense` are the one-layer shortcuts.
"""

from __future__ import annotations

from tvm import tirx

from tvm_scalpel.errors import ScalpelError
from tvm_scalpel.targets import TargetProfile

from . import aarch64, conv_cpu, conv_winograd, cortex_m4, cpu_kernels, cuda, x86  # noqa: F401
from .conv_cpu import NCHW, Blocked, ConvIO, ConvKnobs, ConvShape, Pool
from .spec import CpuKnobs, LayerSpec, PackedGroupedSparse, TargetRule, pack_dense, pack_grouped_sparse

__all__ = [
    "CpuKnobs",
    "LayerSpec",
    "PackedGroupedSparse",
    "TargetRule",
    "pack_grouped_sparse",
    "pack_dense",
    "rule_of",
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
    "Pool",
    "Blocked",
    "ConvIO",
    "NCHW",
    "default_conv_knobs",
    "conv2d",
    "conv_output_layout",
    "pack_conv_weight",
    "pack_conv_bias",
]

# (target kind, LLVM triple's architecture) -> rule; "" is no triple (LLVM: the host, x86).
RULES: dict[tuple[str, str], TargetRule] = {
    ("llvm", ""): x86.RULE,
    ("llvm", "x86_64"): x86.RULE,
    ("llvm", "x86"): x86.RULE,
    ("llvm", "i386"): x86.RULE,
    ("llvm", "i686"): x86.RULE,
    ("llvm", "aarch64"): aarch64.RULE,
    ("llvm", "arm64"): aarch64.RULE,
    ("llvm", "thumbv7em"): cortex_m4.RULE,
    ("cuda", ""): cuda.RULE,
}
# a target kind's rule for the architectures without a file of their own
FALLBACK: dict[str, TargetRule] = {"llvm": cpu_kernels.GENERIC}

# The rows-over-threads threshold of the host's rule (conv patch kernels use it on any CPU).
PARALLEL_MIN_MACS = x86.RULE.parallel_min_macs


def rule_of(profile: TargetProfile) -> TargetRule | None:
    """The rule that schedules ``profile``'s target, or None where we have none."""
    return RULES.get((profile.kind, profile.arch)) or FALLBACK.get(profile.kind)


def supports(profile: TargetProfile) -> bool:
    return rule_of(profile) is not None


def supports_dense(profile: TargetProfile) -> bool:
    """Whether we schedule dense layers too (on GPUs, TVM's dlight rules do)."""
    rule = rule_of(profile)
    return rule is not None and rule.dense


def _rule(profile: TargetProfile) -> TargetRule:
    rule = rule_of(profile)
    if rule is None:
        raise ScalpelError(f"no dense-layer schedule for target kind {profile.kind!r} yet")
    return rule


def _cpu_rule(profile: TargetProfile) -> TargetRule:
    if not supports_dense(profile):
        raise ScalpelError(f"no convolution kernel for target kind {profile.kind!r}")
    return rule_of(profile)


def default_knobs(profile: TargetProfile, macs_per_row: int) -> CpuKnobs:
    return _rule(profile).default_knobs(macs_per_row)


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
    rule = _rule(profile)
    macs = n_groups * group_width if group_width else n * k
    lanes = rule.lanes(profile)
    panel = rule.panel_width(lanes) if packed and not group_width else 0
    return LayerSpec(n, k, relu, group_width, n_groups, lanes=lanes,
                     knobs=knobs or rule.default_knobs(macs), panel=panel)


def kernel(profile: TargetProfile, specs: list[LayerSpec]) -> tirx.PrimFunc:
    """One function computing the layers back to back: parameters ``x, *operands, y``
    (on CUDA: one grouped-sparse layer)."""
    return _rule(profile).kernel(specs)


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
    return _cpu_rule(profile).patch_kernel(profile, spec, positions)


def default_conv_knobs(profile: TargetProfile, shape: ConvShape, winograd: bool = True) -> ConvKnobs:
    """The conv kernel's knobs by the target's rule: Winograd where ``conv_winograd.winograd_pays``
    (unless ``winograd=False``), else the direct kernel's (``conv_cpu.default_conv_knobs``),
    with the target's lanes and vector registers."""
    return _cpu_rule(profile).default_conv_knobs(profile, shape, winograd)


def conv2d(profile: TargetProfile, shape: ConvShape, knobs: ConvKnobs | None = None,
           relu: bool = False, residual: bool = False, pool: Pool | None = None,
           io: ConvIO = NCHW) -> tirx.PrimFunc:
    """The blocked (NCHW[x]c) dense / grouped / depthwise conv kernel: parameters ``data,
    weight, bias[, residual], out``, data and out NCHW, weight and bias packed by
    :func:`pack_conv_weight` / :func:`pack_conv_bias` with the same knobs, ``out`` max-pooled
    by ``pool`` when given; ``io``: which of data, residual and out are blocked instead
    (:class:`ConvIO`, ungrouped convs); CPU targets only."""
    rule = _cpu_rule(profile)
    knobs = knobs or rule.default_conv_knobs(profile, shape)
    return rule.conv2d(profile, shape, knobs, relu, residual, pool, io)


def conv_output_layout(shape: ConvShape, knobs: ConvKnobs, pool: Pool | None = None) -> Blocked:
    """The blocked layout of the conv kernel's output when ``io.blocked_out``."""
    return conv_cpu.output_layout(shape, knobs, pool)


def pack_conv_weight(kernel, shape: ConvShape, knobs: ConvKnobs):
    """The weight as the kernel of ``knobs`` reads it (Winograd's transformed, or blocked)."""
    if knobs.winograd:
        return conv_winograd.pack_weight(kernel, shape, knobs)
    return conv_cpu.pack_weight(kernel, shape, knobs)


def pack_conv_bias(bias, shape: ConvShape, knobs: ConvKnobs):
    return conv_cpu.pack_bias(bias, shape, knobs)
