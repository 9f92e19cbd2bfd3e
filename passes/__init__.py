"""Relax passes of tvm-scalpel, composable in ``tvm.transform.Sequential``.

* ``PruneWeightGroups``: SIMD-aware weight pruning of dense (or conv) layers' constant weights.
* ``RewriteDenseLayers``: dense layers -> grouped-sparse or dense scheduled kernels.
* ``RewriteConvLayers``: conv layers -> im2col + the same kernels (CONV weight pruning pays).
* ``FuseDenseChains``: back-to-back kernel calls -> one chained kernel call.
* ``RemoveMaskedNodes``: node pruning: neurons / feature maps closed by a 0/1 mask layer are
  removed from producer and consumer weights; the model stays dense, just smaller.
* ``SimplifyPower``: ``power(x, 0.75)`` (LRN) and other quarter exponents -> sqrt / multiply.
* ``scalpel_pipeline``: pruning + rewrite + fusion, then TVM's default pipeline, for
  ``tvm.compile``.

Every pass is written with ``graph``: one index of a function's bindings, readers and
constants (``GraphIndex``), one layer matcher (``match_layer``: dense or conv, weight constant
or ``permute_dims`` of one, bias, ReLU; ``find_dense_layers`` / ``find_conv_layers`` build on
it), one rewriter (``GraphRewriter`` applying a ``RewritePlan``).
"""

from tvm_scalpel.decisions import LayerDecision

from .conv_layers import ConvLayer, find_conv_layers
from .dense_layers import DenseLayer, find_dense_layers
from .fuse_dense_chains import FuseDenseChains
from .mark_no_alias import MarkNoAlias
from .pipeline import backend_pipeline, scalpel_pipeline
from .prune_weights import PrunedLayer, PruneWeightGroups
from .remove_masked_nodes import MaskedLayer, RemoveMaskedNodes
from .rewrite_conv_layers import RewriteConvLayers
from .rewrite_dense_layers import RewriteDenseLayers
from .simplify_power import SimplifyPower

__all__ = [
    "ConvLayer",
    "find_conv_layers",
    "RewriteConvLayers",
    "DenseLayer",
    "find_dense_layers",
    "FuseDenseChains",
    "MarkNoAlias",
    "PrunedLayer",
    "PruneWeightGroups",
    "LayerDecision",
    "MaskedLayer",
    "RemoveMaskedNodes",
    "RewriteDenseLayers",
    "scalpel_pipeline",
    "backend_pipeline",
    "SimplifyPower",
]
