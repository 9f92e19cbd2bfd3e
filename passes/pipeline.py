"""The whole Scalpel flow as one pass that ``tvm.compile(..., relax_pipeline=...)`` accepts."""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_scalpel.checks import default_group_width
from tvm_scalpel.decisions import LayerDecision
from tvm_scalpel.targets import resolve_target

from .fuse_dense_chains import FuseDenseChains
from .mark_no_alias import MarkNoAlias
from .prune_weights import PruneWeightGroups
from .rewrite_conv_layers import RewriteConvLayers
from .rewrite_dense_layers import RewriteDenseLayers


def scalpel_pipeline(
    target=None,
    rate: float | None = None,
    group_width: int | None = None,
    importance: str = "rms",
    mode: str = "auto",
    report: list[LayerDecision] | None = None,
    knobs_for=None,
    dense_kernel_for=None,
    conv_knobs_for=None,
    fuse: bool = True,
    default_pipeline: tvm.transform.Pass | None = None,
) -> tvm.transform.Pass:
    """Prune (when ``rate`` is given), rewrite conv and dense layers to our kernels, fuse chains
    (unless ``fuse=False``), then TVM's default Relax pipeline for the target, and
    ``MarkNoAlias`` (keeps LLVM's no-alias guarantee for every kernel). This is the one
    place the passes are ordered: ``tvm_scalpel.compile`` / ``compile_onnx`` use it too.

    ``group_width`` defaults to the target's fp32 SIMD width. ``report`` collects one
    ``LayerDecision`` per rewritten layer; ``knobs_for(n, k, g, rate)`` gives tuned kernel knobs
    and ``dense_kernel_for(n, k, batch)`` a tuned dense kernel (see ``RewriteDenseLayers``),
    ``conv_knobs_for(shape)`` tuned conv kernel knobs (see ``RewriteConvLayers``);
    ``default_pipeline`` replaces TVM's default Relax pipeline for the target.
    Use: ``tvm.compile(mod, target, relax_pipeline=scalpel_pipeline(target, rate=0.9))``.
    """
    profile = resolve_target(target)
    passes: list[tvm.transform.Pass] = []
    if rate is not None:
        passes.append(PruneWeightGroups(rate, default_group_width(profile, group_width), importance))
    passes.append(RewriteConvLayers(profile, mode=mode, report=report, knobs_for=knobs_for,
                                    conv_knobs_for=conv_knobs_for))
    passes.append(RewriteDenseLayers(profile, mode=mode, report=report, knobs_for=knobs_for,
                                     dense_kernel_for=dense_kernel_for))
    if fuse:
        passes.append(FuseDenseChains(profile))
    passes.append(default_pipeline or relax.get_default_pipeline(profile.target))
    # after the default pipeline, which makes the VM's shape_func: see mark_no_alias.py
    passes.append(MarkNoAlias())
    return tvm.transform.Sequential(passes, name="ScalpelPipeline")
