"""The whole Scalpel flow as one pass that ``tvm.compile(..., relax_pipeline=...)`` accepts."""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_scalpel.checks import default_group_width
from tvm_scalpel.decisions import LayerDecision
from tvm_scalpel.schedules.cpu_elementwise import Elementwise
from tvm_scalpel.targets import resolve_target

from .fuse_dense_chains import FuseDenseChains
from .mark_no_alias import MarkNoAlias
from .prune_weights import PruneWeightGroups
from .rewrite_conv_layers import RewriteConvLayers
from .rewrite_dense_layers import RewriteDenseLayers
from .simplify_power import SimplifyPower


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
    (unless ``fuse=False``), simplify constant powers (LRN's), then TVM's default Relax pipeline
    for the target (``backend_pipeline``: with our elementwise rule on CPUs), and ``MarkNoAlias``
    (keeps LLVM's no-alias guarantee for every kernel). This is the one place the passes are
    ordered: ``tvm_scalpel.compile`` / ``compile_onnx`` use it too.

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
    passes.append(SimplifyPower())
    passes.append(default_pipeline or backend_pipeline(profile))
    # after the default pipeline, which makes the VM's shape_func: see mark_no_alias.py
    passes.append(MarkNoAlias())
    return tvm.transform.Sequential(passes, name="ScalpelPipeline")


def backend_pipeline(target=None) -> tvm.transform.Pass:
    """TVM's default Relax pipeline for the target; on LLVM CPU targets with our elementwise
    rule (``schedules.cpu_elementwise``) applied to the functions TVM leaves unscheduled, between
    legalization (with fusion) and lowering. Raises ``ValueError`` where TVM has no pipeline."""
    profile = resolve_target(target)
    if profile.kind != "llvm":
        return relax.get_default_pipeline(profile.target)
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight

    target = profile.target

    @tvm.transform.module_pass(opt_level=0, name="ScalpelCpuBackend")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target)
                + cpu_generic.legalize_passes(target)
                + [dlight.ApplyDefaultSchedule(Elementwise())]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target))(mod)

    return _pipeline
