"""``RewriteConvLayers``: every conv layer becomes im2col + a call of our dense-layer kernels.

TVM's own conv2d has no CPU schedule without tuning (it runs LeNet-5's convolutions as plain
loops), and TOPI has no sparse convolution at all. Unfolding the input patches (im2col) turns a
convolution into a dense layer over ``B*OH*OW`` patch rows, so the same kernels as for FC layers
run it: the grouped-sparse one when the weight is group-sparse enough to pay (SIMD-aware CONV
weight pruning, the paper's choice for low-parallelism targets), our dense one otherwise.
"""

from __future__ import annotations

import logging

import tvm
from tvm import relax, te, tirx

from tvm_scalpel import schedules
from tvm_scalpel.targets import resolve_target

from .conv_layers import ConvLayer, find_conv_layers
from .dense_layers import emit_in_place_of
from .rewrite_dense_layers import KernelLowering, LayerDecision, Mode

log = logging.getLogger("tvm_scalpel.passes")


def im2col(data: te.Tensor, layer: ConvLayer) -> te.Tensor:
    """``cols[b, oy, ox, c, ky, kx]``: the input under each weight of each output position
    (zero in the padding); reshaped to ``[B*OH*OW, C*KH*KW]`` it is the dense layer's input."""
    _, channels, height, width = data.shape
    oh, ow = layer.output_size(int(height), int(width))
    _, _, kh, kw = layer.kernel.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = layer.strides, layer.dilation, layer.padding
    padded = any(layer.padding)

    def value(b, oy, ox, c, ky, kx):
        y = oy * sh - pt + ky * dh
        x = ox * sw - pl + kx * dw
        if not padded:
            return data[b, c, y, x]
        inside = tirx.all(y >= 0, y < height, x >= 0, x < width)
        return tirx.if_then_else(inside, data[b, c, y, x], tirx.const(0.0, "float32"))

    return te.compute((data.shape[0], oh, ow, channels, kh, kw), value, name="im2col")


@relax.expr_functor.mutator
class _ConvRewriter(relax.expr_functor.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lowering: KernelLowering) -> None:
        super().__init__(mod)
        self.lowering = lowering
        self.plan: dict = {}  # output var -> (layer, sparse matrix or None)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        planned = self.plan.get(binding.var)
        if planned is None:
            return super().visit_var_binding_(binding)
        layer, sparse = planned
        bb = self.builder_
        data = self.visit_expr(layer.data)
        batch, _, height, width = data.ty.shape.values
        oh, ow = layer.output_size(int(height), int(width))
        n, k = layer.shape
        patches = bb.emit_te(lambda x: im2col(x, layer), data, primfunc_name_hint="scalpel_im2col")
        rows = bb.emit(relax.op.reshape(patches, relax.ShapeExpr([batch * oh * ow, k])))
        out = bb.emit(self.lowering.call(bb, layer, rows, sparse))
        nhwc = bb.emit(relax.op.reshape(out, relax.ShapeExpr([batch, oh, ow, n])))
        nchw = relax.op.permute_dims(nhwc, [0, 3, 1, 2])
        self.set_var_remap(binding.var, emit_in_place_of(bb, binding.var, nchw))


@tvm.transform.module_pass(opt_level=0, name="RewriteConvLayers")
class RewriteConvLayers:
    """Rewrite each conv layer ``act(conv2d(x, W) + b)`` into im2col and a kernel call.

    For every Relax function, each conv layer found by ``find_conv_layers`` (constant OIHW
    weight, NCHW data, ``groups=1``, optional bias and ReLU) becomes

        cols = im2col(x)                        # [B*OH*OW, C*KH*KW]
        y = call_tir(kernel, (cols, ...))       # [B*OH*OW, O], bias and ReLU fused
        out = permute_dims(reshape(y, [B, OH, OW, O]), [0, 3, 1, 2])

    where the kernel is chosen exactly as ``RewriteDenseLayers`` chooses it for the unfolded
    weight ``W[O, C*KH*KW]``: grouped-sparse when its zeros form groups and the cost model says
    sparse pays (``mode="auto"``), our dense kernel otherwise. On targets we have no dense
    kernels for (GPUs), conv layers are left to TVM.

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
        rewriter = _ConvRewriter(mod, lowering)
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            rewriter.plan = {}
            for layer in find_conv_layers(func):
                decision, sparse = lowering.decide(layer, kind="conv")
                rewriter.plan[layer.output] = (layer, sparse)
                if self.report is not None:
                    self.report.append(decision)
                log.info("conv layer %s %s -> %s (g=%d, density %.3f)", decision.name,
                         decision.shape, decision.kernel, decision.group_width, decision.density)
            if rewriter.plan:
                new_func = rewriter.visit_expr(func)
                rewriter.builder_.update_func(gv, relax.analysis.remove_all_unused(new_func))
        return rewriter.builder_.finalize()
