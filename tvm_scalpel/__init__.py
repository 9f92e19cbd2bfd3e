"""tvm-scalpel: Scalpel (ISCA 2017) pruning on Apache TVM.

Public API:

* ``prune_onnx`` / ``compile_onnx`` / ``export_library`` / ``load_library``: the flows;
* ``GroupedSparseMatrix``: the grouped-sparse weight format;
* ``prune_groups``: SIMD-aware weight pruning of one matrix;
* ``Trainer`` (``tvm_scalpel.training``): training inside TVM; ``tvm_scalpel.finetune``: train,
  prune-and-fine-tune, accuracy search, node pruning; ``tvm_scalpel.node_pruning``: mask layers
  and node removal on ONNX models; ``tvm_scalpel.data``: MNIST sample, IDX and .npz data;
* ``tvm_scalpel.passes``: the Relax passes (``PruneWeightGroups``, ``RewriteDenseLayers``,
  ``FuseDenseChains``, ``RemoveMaskedNodes``, ``scalpel_pipeline``);
  ``tvm_scalpel.schedules``: the kernels.
"""

from .threads import configure_threads

configure_threads()  # before TVM's thread pool starts: see threads.py

from .api import compile_onnx, export_library, load_library, prune_onnx  # noqa: E402
from .errors import ScalpelError  # noqa: E402
from .format import GroupedSparseMatrix  # noqa: E402
from .pruning import prune_groups  # noqa: E402
from .targets import TargetProfile, resolve_target  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "GroupedSparseMatrix",
    "ScalpelError",
    "TargetProfile",
    "compile_onnx",
    "configure_threads",
    "export_library",
    "load_library",
    "prune_groups",
    "prune_onnx",
    "resolve_target",
]
