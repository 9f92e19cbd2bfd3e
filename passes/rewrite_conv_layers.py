"""``RewriteConvLayers``: every conv layer becomes im2col + a call of our patch kernel.

TVM's own conv2d has no CPU schedule without tuning (it runs LeNet-5's convolutions as plain
loops), and TOPI has no sparse convolution at all. Unfolding the input patches (im2col) turns a
convolution into a dense layer over ``B*OH*OW`` patches, with the weights and formats of FC
layers: grouped-sparse when the weight is group-sparse enough to pay (SIMD-aware CONV weight
pruning, the paper's choice for low-parallelism targets), dense otherwise. Its kernel
vectorizes along output positions rather than along the weights, which suits the few output
channels and short patches of small CNNs.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax, te, tirx

from tvm_scalpel import schedules
from tvm_scalpel.targets import resolve_target

from .conv_layers import ConvLayer, find_conv_layers
from .rewrite_dense_layers import KernelLowering, LayerDecision, LayerRewriter, Mode

log = logging.getLogger("tvm_scalpel.passes")


def im2col(data: te.Tensor, layer: ConvLayer) -> te.Tensor:
    """``cols[b, c, ky, kx, oy, ox]``: the input under weight ``(c, ky, kx)`` at each output
    position (zero in the padding); reshaped to ``[B, C*KH*KW, OH*OW]`` it is the patch
    kernel's input, output positions contiguous so that they fill SIMD lanes."""
    _, channels, height, width = data.shape
    oh, ow = layer.output_size(int(height), int(width))
    _, _, kh, kw = layer.kernel.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = layer.strides, layer.dilation, layer.padding
    padded = any(layer.padding)

    def value(b, c, ky, kx, oy, ox):
        y = oy * sh - pt + ky * dh
        x = ox * sw - pl + kx * dw
        if not padded:
            return data[b, c, y, x]
        inside = tirx.all(y >= 0, y < height, x >= 0, x < width)
        return tirx.if_then_else(inside, data[b, c, y, x], tirx.const(0.0, "float32"))

    return te.compute((data.shape[0], channels, kh, kw, oh, ow), value, name="im2col")


def _lower_conv(lowering: KernelLowering):
    """``lower(builder, layer, data, sparse)`` for ``LayerRewriter``: im2col, the patch kernel,
    and a free reshape of its ``[B, O, OH*OW]`` result to NCHW."""

    def lower(bb: relax.BlockBuilder, layer: ConvLayer, data: relax.Expr, sparse) -> relax.Expr:
        batch, _, height, width = data.ty.shape.values
        oh, ow = layer.output_size(int(height), int(width))
        n, k = layer.shape
        positions = oh * ow
        patches = bb.emit_te(lambda x: im2col(x, layer), data, primfunc_name_hint="scalpel_im2col")
        cols = bb.emit(relax.op.reshape(patches, relax.ShapeExpr([batch, k, positions])))
        knobs = schedules.CpuKnobs(parallel_gemm=n * k * positions >= schedules.PARALLEL_MIN_MACS)
        spec, name, operands = lowering.operands(layer, sparse, knobs)
        kernel = bb.add_func(schedules.patch_kernel(lowering.profile, spec, positions),
                             name.replace("_dense_", "_conv_", 1))
        out = bb.emit(relax.call_tir(kernel, [cols] + [relax.const(a) for a in operands],
                                     out_ty=relax.TensorType((batch, n, positions), "float32")))
        return relax.op.reshape(out, relax.ShapeExpr([batch, n, oh, ow]))

    return lower


@tvm.transform.module_pass(opt_level=0, name="RewriteConvLayers")
class RewriteConvLayers:
    """Rewrite each conv layer ``act(conv2d(x, W) + b)`` into im2col and a kernel call.

    For every Relax function, each conv layer found by ``find_conv_layers`` (constant OIHW
    weight, NCHW data, ``groups=1``, optional bias and ReLU) becomes

        cols = reshape(im2col(x), [B, C*KH*KW, OH*OW])
        y = call_tir(patch_kernel, (cols, ...))   # [B, O, OH*OW], bias and ReLU fused
        out = reshape(y, [B, O, OH, OW])

    where the patch kernel (``schedules.patch_kernel``: one weight broadcast into FMAs over
    SIMD vectors of output positions) reads the unfolded weight ``W[O, C*KH*KW]`` dense or
    grouped-sparse, chosen exactly as ``RewriteDenseLayers`` chooses: grouped-sparse when its
    zeros form groups and the cost model says sparse pays (``mode="auto"``), dense otherwise.
    On targets we have no dense kernels for (GPUs), conv layers are left to TVM.

    Parameters are those of ``RewriteDenseLayers``; reported decisions have ``kind="conv"``.
    """

    def __init__(self, target=None, mode: Mode = "auto", report: list[LayerDecision] | None = None,
                 knobs_for=None):
        self.profile = resolve_target(target)
        self.mode = mode
        self.report = report
        self.knobs_for = knobs_for

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not schedules.supports_dense(self.profile):
            return mod
        lowering = KernelLowering(self.profile, self.mode, self.knobs_for)

        def plan_of(func: relax.Function) -> dict:
            plan = {}
            for layer in find_conv_layers(func):
                decision, sparse = lowering.decide(layer, kind="conv")
                plan[layer.output] = (layer, sparse)
                if self.report is not None:
                    self.report.append(decision)
                log.info("conv layer %s %s -> %s (g=%d, density %.3f)", decision.name,
                         decision.shape, decision.kernel, decision.group_width, decision.density)
            return plan

        return LayerRewriter(mod, _lower_conv(lowering)).rewrite(mod, plan_of)
