"""``RewriteConvLayers``: every conv layer becomes a call of one of our conv kernels.

A layer whose weight is dense (or not sparse enough to pay) becomes a call of the blocked
NCHW[x]c convolution kernel (``schedules.conv2d``: weights packed at compile time, an
output-width x output-channel tile in vector registers, NeoCPU's scheme); grouped and depthwise
convolutions take its grouped / channel-blocked forms. A grouped-sparse weight (SIMD-aware
CONV weight pruning) becomes im2col + our patch kernel, as below.

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

import numpy as np
import tvm
from tvm import relax, te, tirx

from tvm_scalpel import schedules
from tvm_scalpel.decisions import LayerDecision
from tvm_scalpel.targets import resolve_target

from .conv_layers import ConvLayer, find_conv_layers
from .graph import GraphIndex, GraphRewriter, RewritePlan
from .rewrite_dense_layers import KernelLowering, Mode

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


def conv_shape(layer: ConvLayer, data: relax.Expr) -> schedules.ConvShape:
    """The layer as the conv kernels see it (the batch may be symbolic)."""
    batch, channels, height, width = data.ty.shape.values
    o, _, kh, kw = layer.kernel.shape
    batch = int(batch) if isinstance(batch, tirx.IntImm) else batch
    return schedules.ConvShape(batch, int(channels), int(height), int(width), int(o), int(kh),
                               int(kw), layer.strides, layer.padding, layer.dilation, layer.groups)


def _lower_patch(bb: relax.BlockBuilder, lowering: KernelLowering, layer: ConvLayer,
                 data: relax.Expr, sparse, residual: relax.Expr | None) -> relax.Expr:
    """im2col, the patch kernel, and a free reshape of its ``[B, O, OH*OW]`` result to NCHW
    (a residual input is added, and the ReLU applied, after it)."""
    batch, _, height, width = data.ty.shape.values
    oh, ow = layer.output_size(int(height), int(width))
    n, k = layer.shape
    positions = oh * ow
    patches = bb.emit_te(lambda x: im2col(x, layer), data, primfunc_name_hint="scalpel_im2col")
    cols = bb.emit(relax.op.reshape(patches, relax.ShapeExpr([batch, k, positions])))
    knobs = schedules.CpuKnobs(parallel_gemm=n * k * positions >= schedules.PARALLEL_MIN_MACS)
    relu = layer.relu
    if residual is not None:
        layer.relu = False  # the ReLU comes after the residual add
    try:
        spec, name, operands = lowering.operands(layer, sparse, knobs)
    finally:
        layer.relu = relu
    kernel = bb.add_func(schedules.patch_kernel(lowering.profile, spec, positions),
                         name.replace("_dense_", "_conv_", 1))
    out = bb.emit(relax.call_tir(kernel, [cols] + [relax.const(a) for a in operands],
                                 out_ty=relax.TensorType((batch, n, positions), "float32")))
    out = relax.op.reshape(out, relax.ShapeExpr([batch, n, oh, ow]))
    if residual is not None:
        out = relax.op.add(bb.emit(out), residual)
        if relu:
            out = relax.op.nn.relu(bb.emit(out))
    if layer.pool is not None:  # the patch kernel has no pooling stage: TVM's, after it
        pool = layer.pool
        if pool.average:
            out = relax.op.nn.avg_pool2d(bb.emit(out), pool.size, pool.strides, pool.padding,
                                         ceil_mode=pool.ceil_mode, count_include_pad=pool.count_include_pad)
        else:
            out = relax.op.nn.max_pool2d(bb.emit(out), pool.size, pool.strides, pool.padding,
                                         ceil_mode=pool.ceil_mode)
    return out


def _lower_blocked(bb: relax.BlockBuilder, profile, layer: ConvLayer, data: relax.Expr,
                   residual: relax.Expr | None, knobs_for=None,
                   io: schedules.ConvIO = schedules.NCHW):
    """One call of the NCHW[x]c conv kernel (bias, residual and ReLU fused), and the blocked
    layout of its output when ``io.blocked_out`` (else None). The shape is read from the
    layer's original (NCHW) data: ``data`` may be blocked."""
    shape = conv_shape(layer, layer.data)
    knobs = (knobs_for(shape) if knobs_for is not None else None) or schedules.default_conv_knobs(
        profile, shape)
    func = schedules.conv2d(profile, shape, knobs, relu=layer.relu, residual=residual is not None,
                            pool=layer.pool, io=io)
    o, i, kh, kw = layer.kernel.shape
    kind = "dw" if shape.depthwise else (f"g{shape.groups}_" if shape.groups > 1 else "")
    gv = bb.add_func(func, f"scalpel_conv_{kind}{o}x{i}x{kh}x{kw}")
    args = [data, relax.const(schedules.pack_conv_weight(layer.kernel, shape, knobs)),
            relax.const(schedules.pack_conv_bias(layer.bias, shape, knobs))]
    if residual is not None:
        args.append(residual)
    batch = data.ty.shape.values[0]
    if io.blocked_out:
        layout = schedules.conv_output_layout(shape, knobs, layer.pool)
        out_ty = relax.TensorType((batch, -(-o // layout.block), layout.positions, layout.block),
                                  "float32")
        return relax.call_tir(gv, args, out_ty=out_ty), layout
    oh, ow = shape.out_size
    if layer.pool is not None:
        oh, ow = layer.pool.out_size(oh, ow)
    return relax.call_tir(gv, args, out_ty=relax.TensorType((batch, o, oh, ow), "float32")), None


def blocked_outputs(index: GraphIndex, blocked: list[ConvLayer]) -> set[relax.Var]:
    """The outputs of the ``blocked`` layers (those lowered to the NCHW[x]c kernel) that only
    blocked layers read, as their data or their residual: these stay in the blocked layout.
    Any other reader (a pool, a reshape, the function's result) needs NCHW."""
    reads: dict[relax.Var, int] = {}
    for layer in blocked:
        for var in (layer.data, layer.residual):
            if isinstance(var, relax.Var):
                reads[var] = reads.get(var, 0) + 1
    return {layer.output for layer in blocked
            if reads.get(layer.output, 0) and reads[layer.output] == index.uses.get(layer.output, 0)}


@tvm.transform.module_pass(opt_level=0, name="RewriteConvLayers")
class RewriteConvLayers:
    """Rewrite each conv layer ``act(conv2d(x, W) + b)`` into im2col and a kernel call.

    For every Relax function, each conv layer found by ``find_conv_layers`` (constant OIHW
    weight, NCHW data, ``groups=1``, optional bias and ReLU) becomes

        cols = reshape(im2col(x), [B, C*KH*KW, OH*OW])
        y = call_tir(patch_kernel, (cols, ...))   # [B, O, OH*OW], bias and ReLU fused
        out = reshape(y, [B, O, OH, OW])

    where the patch kernel (``schedules.patch_kernel``: one weight broadcast into FMAs over
    SIMD vectors of output positions) reads the unfolded weight ``W[O, C*KH*KW]`` grouped-sparse,
    when its zeros form groups and the cost model says sparse pays (chosen exactly as
    ``RewriteDenseLayers`` chooses, ``mode="auto"``). Every other layer, and every grouped or
    depthwise one, becomes one call of the blocked conv kernel (``schedules.conv2d``):

        y = call_tir(conv2d_nchwc, (x, W_packed, bias_packed[, skip]))   # NCHW in and out

    with a following inference BatchNormalization folded into ``W`` and the bias, and a
    residual ``add``, ReLU and a max or average pooling that only it reads fused. Where only such
    (ungrouped) layers read a layer's output, as data or as residual, it stays in the blocked
    layout, ``[B, O/ob, positions, ob]`` (``blocked_outputs``; ``keep_blocked=False`` turns
    this off): layout changes happen at the edges of runs of conv layers only. On targets we have no dense kernels for (GPUs), conv layers
    are left to TVM.

    Parameters are those of ``RewriteDenseLayers``; reported decisions have ``kind="conv"``,
    ``kernel`` "grouped-sparse" (patch kernel) or "dense" (blocked kernel; "dense grouped" /
    "dense depthwise" for those); ``conv_knobs_for(shape) -> ConvKnobs | None`` may override the
    blocked kernel's knobs (default: ``schedules.default_conv_knobs``).
    """

    def __init__(self, target=None, mode: Mode = "auto", report: list[LayerDecision] | None = None,
                 knobs_for=None, conv_knobs_for=None, keep_blocked: bool = True):
        self.profile = resolve_target(target)
        self.keep_blocked = keep_blocked
        self.mode = mode
        self.report = report
        self.knobs_for = knobs_for
        self.conv_knobs_for = conv_knobs_for

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not schedules.supports_dense(self.profile):
            return mod
        lowering = KernelLowering(self.profile, self.mode, self.knobs_for)

        def plan_of(func: relax.Function) -> RewritePlan:
            plan = RewritePlan()
            chosen = []
            for layer in find_conv_layers(func, kernels=True):
                if layer.groups == 1:
                    decision, sparse = lowering.decide(layer, kind="conv")
                else:  # no sparse grouped kernel: the blocked one
                    decision, sparse = _grouped_decision(layer), None
                chosen.append((layer, sparse))
                if self.report is not None:
                    self.report.append(decision)
                log.info("conv layer %s %s -> %s (g=%d, density %.3f)", decision.name,
                         decision.shape, decision.kernel, decision.group_width, decision.density)
            # ungrouped dense layers pass blocked tensors to each other (see ConvIO)
            blocked = [layer for layer, sparse in chosen if sparse is None and layer.groups == 1]
            index = GraphIndex(func)
            stay_blocked = blocked_outputs(index, blocked) if self.keep_blocked else set()
            layouts: dict[relax.Var, schedules.Blocked] = {}  # original output var -> layout
            for layer, sparse in chosen:
                plan.bindings[layer.output] = lambda bb, visit, layer=layer, sparse=sparse: lower(
                    bb, layer, visit, sparse, layouts, layer.output in stay_blocked)
                if layer.data in stay_blocked:
                    # the layer's inner bindings (conv2d, bias add, batch norm, ...) are dead
                    # after the rewrite, but are visited first: stand them for the (blocked)
                    # data rather than re-infer them on it
                    for var in _chain(index, layer):
                        plan.bindings[var] = lambda bb, visit, layer=layer: visit(layer.data)
            return plan

        def lower(bb, layer, visit, sparse, layouts, blocked_out):
            data = visit(layer.data)
            residual = visit(layer.residual) if layer.residual is not None else None
            if sparse is not None:
                return _lower_patch(bb, lowering, layer, data, sparse, residual)
            io = schedules.ConvIO(layouts.get(layer.data), layouts.get(layer.residual),
                                  blocked_out)
            call, layout = _lower_blocked(bb, self.profile, layer, data, residual,
                                          self.conv_knobs_for, io)
            if layout is not None:
                layouts[layer.output] = layout
            return call

        return GraphRewriter(mod).rewrite(mod, plan_of)


def _chain(index: GraphIndex, layer: ConvLayer) -> list[relax.Var]:
    """The bindings from the layer's conv2d up to, not including, its output."""
    chain, todo = [], [layer.conv]
    while todo:
        var = todo.pop()
        if var.same_as(layer.output) or var in chain:
            continue
        chain.append(var)
        todo += index.readers.get(var, [])
    return chain


def _grouped_decision(layer: ConvLayer) -> LayerDecision:
    n, k = layer.shape
    w = layer.weight
    depthwise = layer.kernel.shape[1] == 1 and layer.groups == layer.kernel.shape[0]
    return LayerDecision(index=layer.index, name=str(layer.output.name), shape=(n, k),
                         kernel="dense depthwise" if depthwise else "dense grouped", group_width=0,
                         density=float(np.count_nonzero(w)) / w.size, estimated_speedup=0.0,
                         weight=w, kind="conv")
