"""The whole Scalpel flow as one pass that ``tvm.compile(..., relax_pipeline=...)`` accepts."""

from __future__ import annotations

import tvm
from tvm import relax

from tvm_scalpel.targets import resolve_target

from .fuse_dense_chains import FuseDenseChains
from .prune_weights import PruneWeightGroups
from .rewrite_conv_layers import RewriteConvLayers
from .rewrite_dense_layers import RewriteDenseLayers


def scalpel_pipeline(
    target=None,
    rate: float | None = None,
    group_width: int | None = None,
    importance: str = "rms",
    mode: str = "auto",
) -> tvm.transform.Pass:
    """Prune (when ``rate`` is given), rewrite conv and dense layers to our kernels, fuse chains,
    then TVM's default Relax pipeline for the target.

    ``group_width`` defaults to the target's fp32 SIMD width.
    Use: ``tvm.compile(mod, target, relax_pipeline=scalpel_pipeline(target, rate=0.9))``.
    """
    profile = resolve_target(target)
    passes: list[tvm.transform.Pass] = []
    if rate is not None:
        passes.append(PruneWeightGroups(rate, group_width or profile.simd_width, importance))
    passes.append(RewriteConvLayers(profile, mode=mode))
    passes.append(RewriteDenseLayers(profile, mode=mode))
    passes.append(FuseDenseChains(profile))
    passes.append(relax.get_default_pipeline(profile.target))
    return tvm.transform.Sequential(passes, name="ScalpelPipeline")
