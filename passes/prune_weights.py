"""``PruneWeightGroups``: SIMD-aware weight pruning of every dense layer's constant weight."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import tvm
from tvm import relax

from tvm_scalpel.format import GroupedSparseMatrix
from tvm_scalpel.pruning import prune_groups

from .conv_layers import find_conv_layers
from .dense_layers import find_dense_layers
from .graph import GraphRewriter, RewritePlan

log = logging.getLogger("tvm_scalpel.passes")


@dataclass
class PrunedLayer:
    """What ``PruneWeightGroups`` did to one layer (for size tables and ONNX write-back)."""

    index: int  # position among the function's layers of its kind
    name: str
    shape: tuple[int, int]  # (N outputs, K inputs); a conv layer's unfolded (O, C*KH*KW)
    group_width: int
    rate: float  # achieved fraction of weights removed
    threshold: float  # importance of the strongest removed group
    dense_bytes: int
    sparse_bytes: int  # grouped-sparse storage: values + group indices + row pointer
    original: np.ndarray  # W[N, K] before
    pruned: np.ndarray  # W[N, K] after
    kind: str = "fc"  # "fc" or "conv"
    positions: int | None = None  # a conv layer's OH*OW output positions (its patch kernel's)
    rate_asked: float | None = None  # the rate asked for; above ``rate`` when it was capped


def _positions(layer) -> int | None:
    if not hasattr(layer, "output_size"):
        return None
    _, _, height, width = layer.data.ty.shape.values
    oh, ow = layer.output_size(int(height), int(width))
    return oh * ow


@tvm.transform.module_pass(opt_level=0, name="PruneWeightGroups")
class PruneWeightGroups:
    """Zero whole groups of g consecutive input weights in every dense (or conv) layer's weight.

    Rewrites each dense layer (see ``dense_layers``) of every Relax function, or with
    ``layers="conv"`` each conv layer (see ``conv_layers``: groups run along the unfolded
    ``C*KH*KW`` patch axis, the axis the im2col kernels vectorize): the weight
    constant is replaced by one in which the least important groups (RMS, MAX or MEAN of a
    group) are zero, so that ``rate`` of the layer's weights are removed. Shapes, the graph and
    everything else stay as they were; ``RewriteDenseLayers`` turns the zeros into speed.

    Parameters
    ----------
    rate: fraction of weights to remove per layer, in [0, 1); a mapping from layer index to
        rate prunes only the layers it names. A layer always keeps its strongest group: a rate
        that would remove them all is capped, with one warning per layer.
    group_width: g; 1 is plain magnitude pruning; a mapping from layer index to g (autotuned
        widths) gives each layer its own, layers it does not name keep ``default_group_width``.
    importance: "rms" (default), "max" or "mean".
    report: when a list is given, one ``PrunedLayer`` per pruned layer is appended to it.
    layers: "fc" (dense layers, the default) or "conv"; layer indices count that kind only.
    """

    def __init__(
        self,
        rate: float | Mapping[int, float],
        group_width: int | Mapping[int, int],
        importance: str = "rms",
        report: list[PrunedLayer] | None = None,
        default_group_width: int = 16,
        layers: str = "fc",
    ) -> None:
        if layers not in ("fc", "conv"):
            raise ValueError(f"layers must be 'fc' or 'conv', got {layers!r}")
        self.layers = layers
        self.rate = rate
        self.group_width = group_width
        self.default_group_width = default_group_width
        self.importance = importance
        self.report = report

    def _rate_for(self, index: int) -> float | None:
        if isinstance(self.rate, Mapping):
            return self.rate.get(index)
        return float(self.rate)

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        replace: dict = {}
        for _, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            find = find_conv_layers if self.layers == "conv" else find_dense_layers
            for layer in find(func):
                rate = self._rate_for(layer.index)
                if rate is None or layer.weight_const in replace:
                    continue
                g = (self.group_width.get(layer.index, self.default_group_width)
                     if isinstance(self.group_width, Mapping) else self.group_width)
                g = min(g, layer.shape[1])
                result = prune_groups(layer.weight, g, rate, self.importance)
                if self.layers == "conv":
                    stored = result.weight.reshape(layer.kernel.shape)
                else:
                    stored = result.weight if layer.transposed else result.weight.T
                replace[layer.weight_const] = relax.const(np.ascontiguousarray(stored))
                sparse = GroupedSparseMatrix.from_dense(result.weight, g)
                op_var = layer.conv if self.layers == "conv" else layer.matmul
                log.info("pruned %s %s: g=%d rate=%.3f", op_var.name, layer.shape, g, result.rate)
                if result.capped:
                    kind = "conv" if self.layers == "conv" else "dense"
                    log.warning("%s layer %d (%dx%d, %s): pruning rate %.3f capped at %.3f so "
                                "that the layer keeps one group of weights (its output would "
                                "otherwise be constant)", kind, layer.index, *layer.shape,
                                op_var.name, rate, result.rate)
                if self.report is not None:
                    self.report.append(
                        PrunedLayer(
                            index=layer.index,
                            name=str(op_var.name),
                            shape=layer.shape,
                            group_width=g,
                            rate=result.rate,
                            threshold=result.threshold,
                            dense_bytes=sparse.dense_nbytes,
                            sparse_bytes=sparse.nbytes,
                            original=layer.weight,
                            pruned=result.weight,
                            kind=self.layers,
                            positions=_positions(layer),
                            rate_asked=rate,
                        )
                    )
        # only constants change: the graph keeps every binding it had
        plan = RewritePlan(constants=replace, drop_dead=False)
        return GraphRewriter(mod).rewrite(mod, lambda func: plan)
