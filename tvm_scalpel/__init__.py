"""tvm-scalpel: Scalpel (ISCA 2017) pruning on Apache TVM.

Public API:

* ``prune`` / ``compile`` / ``tune`` / ``train`` (``tvm_scalpel.flows``): what the
  ``tvm-scalpel`` commands do, one call each, returning ``PruneResult`` / ``CompileResult`` /
  ``TuneResult`` per layer / ``TrainResult`` with the per-layer report;
* ``prune_onnx`` / ``compile_onnx`` / ``export_library`` / ``load_library`` / ``run_library``:
  the flows;
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

__version__ = "0.1.0"

# The names below are imported on first use (PEP 562), not here: importing tvm_scalpel (and so
# starting ``tvm-scalpel``, whose entry point lives in tvm_scalpel.cli) must not load TVM before
# the command line has taken over Ctrl-C (see interrupts.py).
_LAZY = {
    "CompileResult": "flows",
    "PruneResult": "flows",
    "TrainResult": "flows",
    "Training": "flows",
    "TuneResult": "flows",
    "compile": "flows",
    "prune": "flows",
    "train": "flows",
    "tune": "flows",
    "GroupedSparseMatrix": "format",
    "KernelKind": "kinds",
    "LayerDecision": "decisions",
    "LayerKind": "kinds",
    "Parallelism": "kinds",
    "ScalpelError": "errors",
    "TargetProfile": "targets",
    "compile_onnx": "api",
    "export_library": "api",
    "load_library": "api",
    "prune_groups": "pruning",
    "prune_onnx": "api",
    "resolve_target": "targets",
    "run_library": "api",
}

__all__ = sorted([*_LAZY, "configure_threads"])


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
