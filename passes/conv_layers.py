"""Finding convolution layers in a Relax function, and seeing each as a dense layer.

A *conv layer* is ``nn.conv2d(x, W)`` with a constant ``W[O, C, KH, KW]`` (NCHW data, OIHW
weight, ``groups=1``), optionally followed by the bias ``add`` the ONNX importer makes
(``reshape`` of a constant of O values to ``[1, O, 1, 1]``) and by ``nn.relu``, fused only when
nothing else reads the intermediate result.

For the kernels (``kernels=True``, what ``RewriteConvLayers`` asks for) a layer also takes
grouped and depthwise convolutions, folds an inference ``nn.batch_norm`` with constant
statistics into its weight and bias, absorbs a residual ``add`` of another tensor of the
output's shape (ResNet's ``Conv -> BatchNormalization -> Add -> Relu``) and a ``max_pool2d`` or
``avg_pool2d`` (ceil mode too) that is the only reader of the result (``Conv -> Relu ->
MaxPool``: AlexNet, VGG, ResNet's stem; NIN's and ConvNet's ceil-mode max and average pools).
Pruning asks for the plain form: it must see and replace the weight exactly as the graph holds
it.

Unfolded over its input patches (im2col), a convolution is a dense layer: ``W`` becomes the
matrix ``W[O, C*KH*KW]`` (ONNX's own flattening, channel-major) and each output position reads
one patch row of ``C*KH*KW`` inputs. SIMD-aware weight pruning and our dense-layer kernels
therefore apply to it unchanged; groups of g weights run along that flattened patch axis.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from tvm import ir, relax, tirx

from tvm_scalpel.schedules import Pool

from .graph import (
    GraphIndex,
    absorb_bias,
    absorb_relu,
    channel_bias,
    const_array,
    conv_layout_problem,
    match_layer,
    op_name,
    other_operand,
    tensor_type,
)

log = logging.getLogger("tvm_scalpel.passes")


@dataclass
class ConvLayer:
    """One conv layer: ``output = act(conv2d(data, weight) + bias)``."""

    index: int  # position among the function's conv layers, in binding order
    data: relax.Expr  # x[B, C, H, W]
    kernel: np.ndarray  # W[O, C, KH, KW], float32
    weight_const: ir.expr.GenericConst
    conv: relax.Var
    output: relax.Var  # the last var of the layer (conv2d, add or relu)
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    bias: np.ndarray | None = None  # [O] float32
    relu: bool = False
    fused: list[relax.Var] = field(default_factory=list)
    groups: int = 1
    residual: relax.Expr | None = None  # added to the output before the ReLU
    batch_norm: bool = False  # an inference BatchNormalization folded into kernel and bias
    pool: Pool | None = None  # a max or average pooling of the (activated) output, fused

    @property
    def weight(self) -> np.ndarray:
        """The unfolded weight ``W[O, C*KH*KW]``."""
        return self.kernel.reshape(self.kernel.shape[0], -1)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.kernel.shape[0]), int(np.prod(self.kernel.shape[1:]))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        kh, kw = self.kernel.shape[2:]
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.strides, self.dilation, self.padding
        return ((h + pt + pb - dh * (kh - 1) - 1) // sh + 1,
                (w + pl + pr - dw * (kw - 1) - 1) // sw + 1)


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _padding(values) -> tuple[int, int, int, int]:
    pad = _ints(values)
    if len(pad) == 1:
        return pad * 4
    if len(pad) == 2:
        return pad + pad
    return pad  # type: ignore[return-value]


def find_conv_layers(func: relax.Function, warn: bool = True, kernels: bool = False) -> list[ConvLayer]:
    """The conv layers of ``func`` that we take, in binding order; others are left as they
    are (with a warning when ``warn``). ``kernels``: also grouped / depthwise convolutions, with
    a following batch norm folded in and a residual add absorbed (see the module docstring)."""
    index = GraphIndex(func)
    layers: list[ConvLayer] = []
    claimed: set = set()  # residual adds already absorbed by a layer
    for b in index.bindings:
        match = match_layer(index, b.var, kind="conv", epilogue=False)
        if match is None:
            continue
        data, weight, kernel = match.data, match.weight, const_array(match.weight)
        attrs = b.value.attrs
        ty = tensor_type(data)
        reason = None
        if ty is None or ty.ndim != 4 or str(ty.dtype) != "float32" or kernel.dtype != np.float32:
            reason = "only float32 inputs of rank 4 are supported"
        elif (layout := conv_layout_problem(attrs, groups_ok=kernels)) is not None:
            reason = layout
        elif attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", "void", "float32"):
            reason = f"output type {attrs.out_dtype} is not supported"
        elif not all(isinstance(d, tirx.IntImm) for d in ty.shape.values[1:]):
            reason = "only a static channel and image size is supported"
        if reason is not None:
            if warn:
                log.warning("conv layer %s (weight %s) left as it is: %s", b.var.name,
                            "x".join(map(str, kernel.shape)), reason)
            continue
        layer = ConvLayer(len(layers), data, kernel, weight, b.var, b.var, _ints(attrs.strides),
                          _padding(attrs.padding), _ints(attrs.dilation), groups=int(attrs.groups))
        channels = layer.shape[0]
        bias_of = lambda expr, o=channels: channel_bias(index, expr, o)  # noqa: E731
        absorb_bias(index, layer, bias_of)
        if kernels:
            _fold_batch_norm(layer, index)
            _absorb_residual(layer, index, claimed)
        absorb_relu(index, layer)
        if kernels:
            _absorb_pool(layer, index)
        layers.append(layer)
    return layers


def _fold_batch_norm(layer: ConvLayer, index: GraphIndex) -> None:
    """``batch_norm(conv)[0]`` with constant statistics (inference) -> scaled kernel and bias."""
    bn = index.sole_reader(layer.output, "relax.nn.batch_norm")
    if bn is None:
        return
    call = index.values[bn]
    if int(call.attrs.axis) != 1 or bool(call.attrs.training):
        return
    params = [const_array(a) for a in call.args[1:5]]
    o = layer.kernel.shape[0]
    if any(p is None or p.size != o for p in params):
        return
    items = index.tuple_items(bn)
    # only the normalized output may be read (the mean/var outputs are the importer's leftovers)
    if 0 not in items or any(index.uses.get(v, 0) for i, v in items.items() if i != 0):
        return
    gamma, beta, mean, var = (p.astype(np.float64).reshape(o) for p in params)
    scale = gamma / np.sqrt(var + float(call.attrs.epsilon))
    bias = layer.bias.astype(np.float64) if layer.bias is not None else np.zeros(o)
    layer.kernel = (layer.kernel.astype(np.float64) * scale.reshape(o, 1, 1, 1)).astype(np.float32)
    layer.bias = ((bias - mean) * scale + beta).astype(np.float32)
    layer.batch_norm = True
    layer.fused += [layer.output, bn]
    layer.output = items[0]


def _same_dim(a, b) -> bool:
    if isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm):
        return int(a) == int(b)
    return a.same_as(b)


def _absorb_residual(layer: ConvLayer, index: GraphIndex, claimed: set) -> None:
    """``add(conv, skip)`` where ``skip`` is a float32 tensor of exactly the output's shape.
    An add of two conv branches (ResNet's block with a downsample shortcut) is absorbed by the
    first of them only (``claimed``); the other ends before it and becomes its ``skip``."""
    add = index.sole_reader(layer.output, "relax.add")
    if add is None or add in claimed:
        return
    other = other_operand(index.values[add], layer.output)
    ty, out_ty = tensor_type(other), tensor_type(layer.output)
    if (ty is None or out_ty is None or const_array(other) is not None or str(ty.dtype) != "float32"
            or ty.shape is None or out_ty.shape is None or ty.ndim != 4
            or not all(_same_dim(a, b) for a, b in zip(ty.shape.values, out_ty.shape.values))):
        return
    layer.residual = other
    layer.fused.append(layer.output)
    layer.output = add
    claimed.add(add)


POOL_OPS = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d")


def _absorb_pool(layer: ConvLayer, index: GraphIndex) -> None:
    """``max_pool2d`` / ``avg_pool2d`` of the output in NCHW, without dilation, read by nothing
    else, whose output shape the graph states as :class:`Pool` computes it (so ceil mode agrees
    with the importer's) and whose windows each meet the image."""
    pool = next((v for op in POOL_OPS if (v := index.sole_reader(layer.output, op)) is not None), None)
    if pool is None:
        return
    call = index.values[pool]
    attrs = call.attrs
    if (str(attrs.layout) != "NCHW" or str(attrs.out_layout) not in ("NCHW", "")
            or _ints(attrs.dilation) != (1, 1)):
        return
    size, padding = _ints(attrs.pool_size), _padding(attrs.padding)
    if len(size) != 2 or padding[0] >= size[0] or padding[1] >= size[1]:
        return
    average = op_name(call) == "relax.nn.avg_pool2d"
    fused = Pool(size, _ints(attrs.strides), padding, ceil_mode=bool(attrs.ceil_mode), average=average,
                 count_include_pad=average and bool(attrs.count_include_pad))
    in_ty, out_ty = tensor_type(layer.output), tensor_type(pool)
    if in_ty is None or out_ty is None or out_ty.shape is None:
        return
    dims = [*in_ty.shape.values[2:], *out_ty.shape.values[2:]]
    if not all(isinstance(d, tirx.IntImm) for d in dims):
        return
    h, w, ph, pw = (int(d) for d in dims)
    if fused.out_size(h, w) != (ph, pw):
        return
    layer.pool = fused
    layer.fused.append(layer.output)
    layer.output = pool
    if not layer.relu and not average:  # relu(max(x)) = max(relu(x)): ConvNet's Conv -> MaxPool -> Relu
        absorb_relu(index, layer)
