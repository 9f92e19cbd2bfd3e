"""What every target's kernels share: a layer as a kernel sees it, the knobs, the packed layouts.

``LayerSpec`` describes one dense layer (dense or grouped-sparse weight, bias, ReLU, vector width,
weight layout); ``CpuKnobs`` are the schedule knobs autotuning searches; the packers turn a
weight into a kernel's constant operands. ``TargetRule`` is the interface each target's rule
file (``x86.py``, ``aarch64.py``, ``cortex_m4.py``, ``cuda.py``) implements, as TVM's dlight
rules do for its GPU / CPU schedules.

Tail groups: the packed layout (``pack_grouped_sparse``) moves a row's partial last group to
start at ``K - g``, with zeros in the lanes it shares with the previous group, so every load is
a full, in-bounds vector and no lane needs a bounds check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from tvm import tirx

from tvm_scalpel.errors import ScalpelError
from tvm_scalpel.format import GroupedSparseMatrix
from tvm_scalpel.targets import TargetProfile

F32 = "float32"


@dataclass(frozen=True)
class CpuKnobs:
    """Schedule knobs of the CPU kernels (what autotuning searches)."""

    unroll: int = 2  # independent accumulators per row in the GEMV path
    batch_tile: int = 8  # inputs that share each weight load in the GEMM path
    parallel_gemv: bool = False  # spread rows over threads at batch 1
    parallel_gemm: bool = False  # spread rows over threads for batch tiles
    # dense GEMM path: output rows computed together (register blocking). 4 (with batch_tile 8)
    # is 1.6x faster on AlexNet fc6 at batch 16 but slower on LeNet's layers: a tuning knob.
    row_tile: int = 1
    # panel-packed dense path (LayerSpec.panel > 0): inputs per micro-kernel call, the mr of
    # an mr x nr block of accumulators held in registers (0: by the vector width, gemm_tile)
    gemm_rows: int = 0
    gemm_kc: int = 0  # inputs k per K block of the panel GEMM (0: gemm_k_block's default)


@dataclass(frozen=True)
class LayerSpec:
    """One dense layer as a kernel sees it. ``group_width=0`` means a dense weight."""

    n: int
    k: int
    relu: bool
    group_width: int = 0
    n_groups: int = 0
    lanes: int = 16  # vector width of the dense kernel
    knobs: CpuKnobs = field(default_factory=CpuKnobs)
    # dense weight layout: 0 = row-major W[N, K]; nr > 0 = panels P[ceil(N/nr), K, nr] of nr
    # outputs each, zero-padded (``pack_dense_panels``), for the register-blocked GEMM
    panel: int = 0

    @property
    def sparse(self) -> bool:
        return self.group_width > 0

    @property
    def panels(self) -> int:
        return -(-self.n // self.panel) if self.panel else 0

    def operand_types(self) -> list[tuple[str, tuple[int, ...], str]]:
        """Constant operands after x, in kernel-parameter order."""
        if self.sparse:
            groups = max(self.n_groups, 1)  # an all-zero layer still needs a valid buffer
            return [("values", (groups, self.group_width), F32), ("offsets", (groups,), "int32"),
                    ("indptr", (self.n + 1,), "int32"), ("bias", (self.n,), F32)]
        if self.panel:
            return [("weight", (self.panels, self.k, self.panel), F32),
                    ("bias", (self.panels * self.panel,), F32)]
        return [("weight", (self.n, self.k), F32), ("bias", (self.n,), F32)]

    def to_attr(self) -> dict:
        """A plain dict, stored on the PrimFunc so later passes can rebuild the kernel."""
        d = asdict(self)
        d.update(d.pop("knobs"))
        return d

    @classmethod
    def from_attr(cls, attr) -> "LayerSpec":
        d = {str(k): v for k, v in dict(attr).items()}
        knob_names = CpuKnobs.__dataclass_fields__
        knobs = CpuKnobs(**{k: _py(d.pop(k)) for k in list(d) if k in knob_names})
        return cls(knobs=knobs, **{k: _py(v) for k, v in d.items()})


def _py(value):
    """TVM attribute values back to Python ints / bools."""
    if isinstance(value, (bool, int)):
        return value
    return int(value.value) if hasattr(value, "value") else int(value)


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
    if m.n_groups == 0:
        return PackedGroupedSparse(np.zeros((1, g), np.float32), np.zeros(1, np.int32),
                                   m.indptr.astype(np.int32))
    return PackedGroupedSparse(values, offsets.astype(np.int32), m.indptr.astype(np.int32))


def pack_dense_panels(w: np.ndarray, bias: np.ndarray | None, nr: int) -> tuple[np.ndarray, np.ndarray]:
    """``W[N, K]`` into panels ``P[ceil(N/nr), K, nr]`` (``P[p, k, j] = W[p*nr + j, k]``) and the
    bias into ``[ceil(N/nr) * nr]``, zero-padded: each step of the micro-kernel loads nr
    consecutive weights of one input as whole vectors, streaming each panel once."""
    n, k = w.shape
    panels = -(-n // nr)
    padded = np.zeros((panels * nr, k), np.float32)
    padded[:n] = w
    packed = np.ascontiguousarray(padded.reshape(panels, nr, k).transpose(0, 2, 1))
    b = np.zeros(panels * nr, np.float32)
    if bias is not None:
        b[:n] = bias
    return packed, b


def pack_dense(spec: LayerSpec, weight, bias=None) -> list[np.ndarray]:
    """The constant operands of a dense layer's kernel, ``[weight, bias]`` in ``spec``'s layout
    (``W[N, K]`` row-major, or packed into panels)."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    b = np.zeros(spec.n, np.float32) if bias is None else np.asarray(bias, np.float32)
    if spec.panel:
        return list(pack_dense_panels(w, b, spec.panel))
    return [w, b]


class TargetRule:
    """One target's schedules: which kernels it has and the numbers they are built with.

    A rule file says its target's vector registers, the layer size from which rows go over
    threads, the default knobs, and builds the kernels (the LLVM CPUs share their emitters,
    ``cpu_kernels.py``). What a target lacks raises ``ScalpelError``.
    """

    name = "generic"
    dense = False  # we schedule dense layers (else TVM's own pipeline does)

    def lanes(self, profile: TargetProfile) -> int:
        """Vector width of the dense-layer kernels."""
        return max(profile.simd_width, 1)

    def panel_width(self, lanes: int) -> int:
        """nr of the panel-packed dense layout (``pack_dense_panels``); 0: none."""
        return 0

    def default_knobs(self, macs_per_row: int) -> CpuKnobs:
        return CpuKnobs()

    def kernel(self, specs: list[LayerSpec]) -> tirx.PrimFunc:
        raise NotImplementedError

    def patch_kernel(self, profile: TargetProfile, spec: LayerSpec, positions: int) -> tirx.PrimFunc:
        raise ScalpelError(f"no convolution kernel for target kind {profile.kind!r}")

    def default_conv_knobs(self, profile: TargetProfile, shape, winograd: bool = True):
        raise ScalpelError(f"no convolution kernel for target kind {profile.kind!r}")

    def conv2d(self, profile: TargetProfile, shape, knobs, relu: bool, residual: bool,
               pool=None, io=None) -> tirx.PrimFunc:
        raise ScalpelError(f"no convolution kernel for target kind {profile.kind!r}")
