"""``LayerDecision``: how the lowering passes (``RewriteDenseLayers``, ``RewriteConvLayers``)
lowered one layer; the per-layer report of ``compile``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .format import GroupedSparseMatrix
from .kinds import KernelKind, LayerKind


@dataclass
class LayerDecision:
    """How one layer was lowered: onto which kernel, and the facts the choice was made on."""

    index: int
    name: str
    shape: tuple[int, int]  # (N, K); conv layers: the unfolded (O, C*KH*KW)
    kernel: KernelKind
    group_width: int  # recovered g (1 = unstructured / CSR); 0 for a layer without zeros
    density: float  # fraction of weights that are non-zero
    estimated_speedup: float  # dense cost / sparse cost from the cost model
    weight: np.ndarray = field(default=None, repr=False)  # W[N, K] as compiled
    kind: LayerKind = LayerKind.FC

    def __setattr__(self, name: str, value) -> None:
        # the passes give the kernel and kind as their text ("grouped-sparse", "conv"); they
        # are kept as the enums, so a misspelt one fails here and not in a report
        if name == "kernel":
            value = KernelKind(value)
        elif name == "kind":
            value = LayerKind(value)
        super().__setattr__(name, value)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight operands the kernel reads: the kept groups with their indices,
        or the dense ``W[N, K]``."""
        if self.kernel is KernelKind.SPARSE:
            return GroupedSparseMatrix.from_dense(self.weight, self.group_width).nbytes
        return self.shape[0] * self.shape[1] * 4
