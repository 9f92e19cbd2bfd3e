"""The blocked (NCHW[x]c) conv kernels: every shape class on small sizes, whole models compiled
by ``compile_onnx`` against onnxruntime on the same single-Conv ONNX, fused BatchNorm / residual
graphs as PyTorch's exporter writes them, and the vector code they emit for explicit targets."""

import re

import numpy as np
import onnx
import pytest
import tvm
from helpers import make_model, ort_run, rel_err, vm_run
from onnx import helper, numpy_helper

from tvm_scalpel import compile_onnx, schedules
from tvm_scalpel.schedules import ConvShape, conv_cpu
from tvm_scalpel.targets import resolve_target

TOL = 1e-4


def conv_model(rng, c, h, w, o, k, strides=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1), groups=1,
               bias=True, relu=False, batch="N"):
    """One ONNX Conv (+ Relu) with random weights; pads are (top, left, bottom, right)."""
    kh, kw = (k, k) if isinstance(k, int) else k
    weight = (rng.standard_normal((o, c // groups, kh, kw)) / np.sqrt(c // groups * kh * kw)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(o).astype(np.float32), "b"))
        inputs.append("b")
    onnx_pads = [pads[0], pads[1], pads[2], pads[3]]
    nodes = [helper.make_node("Conv", inputs, ["c"], kernel_shape=[kh, kw], pads=onnx_pads,
                              strides=list(strides), dilations=list(dilation), group=groups)]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    else:
        nodes[0].output[0] = "y"
    shape = ConvShape(1, c, h, w, o, kh, kw, tuple(strides), tuple(pads), tuple(dilation), groups)
    oh, ow = shape.out_size
    return make_model(nodes, inits, [("x", [batch, c, h, w])], [("y", [batch, o, oh, ow])])


# (c, h, w, o, k, strides, pads, dilation, groups, relu)
SHAPES = {
    "3x3 p1": (16, 9, 10, 24, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, True),
    "1x1": (20, 7, 7, 36, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, False),
    "1x1 s2": (16, 9, 9, 32, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1, True),
    "5x5 p2": (8, 11, 12, 20, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1, True),
    "7x7 s2 p3 rgb": (3, 19, 17, 16, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, True),
    "11x11 s4 p2 rgb": (3, 31, 29, 12, 11, (4, 4), (2, 2, 2, 2), (1, 1), 1, True),
    "3x3 s2 odd channels": (13, 10, 11, 19, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1, False),
    "3x3 asymmetric pad": (6, 8, 9, 10, 3, (1, 2), (0, 1, 2, 0), (1, 1), 1, True),
    "3x3 dilation 2": (8, 12, 12, 16, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, True),
    "2x4 kernel": (5, 8, 10, 9, (2, 4), (1, 1), (0, 1, 1, 2), (1, 1), 1, False),
    "depthwise 3x3": (24, 9, 9, 24, 3, (1, 1), (1, 1, 1, 1), (1, 1), 24, True),
    "depthwise 3x3 s2 odd": (13, 10, 9, 13, 3, (2, 2), (1, 1, 1, 1), (1, 1), 13, False),
    "depthwise 5x5 dilated": (16, 12, 12, 16, 5, (1, 1), (4, 4, 4, 4), (2, 2), 16, True),
    "depthwise multiplier 2": (6, 8, 8, 12, 3, (1, 1), (1, 1, 1, 1), (1, 1), 6, True),
    "grouped 4": (16, 8, 8, 32, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4, True),
    "grouped 3 odd": (9, 7, 8, 15, 3, (2, 1), (1, 0, 1, 1), (1, 1), 3, False),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_conv_shapes_match_onnxruntime(rng, name):
    c, h, w, o, k, strides, pads, dilation, groups, relu = SHAPES[name]
    model = conv_model(rng, c, h, w, o, k, strides, pads, dilation, groups, relu=relu)
    built = compile_onnx(model, "x86")
    assert [d.kernel for d in built.layers] == [
        "dense" if groups == 1 else ("dense depthwise" if groups == c == o else "dense grouped")]
    for batch in (1, 3):
        x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
        assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < TOL


def test_static_batch_8_and_no_bias(rng):
    model = conv_model(rng, 12, 9, 9, 20, 3, pads=(1, 1, 1, 1), bias=False, batch=8)
    built = compile_onnx(model, "x86")
    x = rng.standard_normal((8, 12, 9, 9)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < TOL


@pytest.mark.parametrize("knobs", [
    conv_cpu.ConvKnobs(oc_block=8, ic_block=4, ow_tile=3, tiles_per_task=4, ic_step=2),
    conv_cpu.ConvKnobs(oc_block=16, ic_block=8, ow_tile=5, unroll_kw=True, tiles_per_task=2),
    conv_cpu.ConvKnobs(oc_block=32, ic_block=3, ow_tile=1),
])
def test_explicit_knobs_give_the_same_result(rng, knobs):
    """Knob settings a tuner may pick (cache blocking, unrolled kw, a tile of one) against a
    direct float64 convolution."""
    shape = ConvShape(2, 13, 9, 8, 21, 3, 3, (1, 1), (1, 0, 1, 1))
    w = rng.standard_normal((21, 13, 3, 3)).astype(np.float32)
    b = rng.standard_normal(21).astype(np.float32)
    x = rng.standard_normal((2, 13, 9, 8)).astype(np.float32)
    func = conv_cpu.conv2d_kernel(shape, knobs, 8, relu=False).with_attr("global_symbol", "main")
    f = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("x86").target)["main"]
    oh, ow = shape.out_size
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((2, 21, oh, ow), np.float32), dev)
    f(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(conv_cpu.pack_weight(w, shape, knobs), dev),
      tvm.runtime.tensor(conv_cpu.pack_bias(b, shape, knobs), dev), out)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (0, 1)))
    ref = np.zeros((2, 21, oh, ow))
    for i in range(oh):
        for j in range(ow):
            ref[:, :, i, j] = np.einsum("bchw,ochw->bo", xp[:, :, i:i + 3, j:j + 3], w.astype(np.float64))
    ref += b.reshape(1, -1, 1, 1)
    assert rel_err(out.numpy(), ref) < TOL


def resnet_block(rng, c: int, hw: int, batch="N"):
    """PyTorch's export of a ResNet basic block without folding: Conv -> BatchNormalization
    -> Relu -> Conv -> BatchNormalization -> Add(skip) -> Relu."""
    inits, nodes = [], []

    def conv_bn(src, dst, tag):
        w = (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{tag}.w"))
        for p, v in (("s", rng.uniform(0.5, 1.5, c)), ("b", rng.standard_normal(c) * 0.1),
                     ("m", rng.standard_normal(c) * 0.1), ("v", rng.uniform(0.5, 2.0, c))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{tag}.{p}"))
        nodes.append(helper.make_node("Conv", [src, f"{tag}.w"], [f"{tag}.c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization", [f"{tag}.c"] + [f"{tag}.{p}" for p in "sbmv"],
                                      [dst], epsilon=1e-5))

    conv_bn("x", "bn1", "c1")
    nodes.append(helper.make_node("Relu", ["bn1"], ["r1"]))
    conv_bn("r1", "bn2", "c2")
    nodes.append(helper.make_node("Add", ["bn2", "x"], ["sum"]))
    nodes.append(helper.make_node("Relu", ["sum"], ["y"]))
    return make_model(nodes, inits, [("x", [batch, c, hw, hw])], [("y", [batch, c, hw, hw])])


def test_conv_bn_relu_and_residual_add_are_fused_and_match_onnxruntime(rng):
    model = resnet_block(rng, 12, 8)
    built = compile_onnx(model, "x86")
    assert [d.kernel for d in built.layers] == ["dense", "dense"]
    text = built.executable.as_text() if hasattr(built.executable, "as_text") else ""
    assert "batch_norm" not in text
    for batch in (1, 3):
        x = rng.standard_normal((batch, 12, 8, 8)).astype(np.float32)
        assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < TOL


def test_group_sparse_convs_in_a_residual_block_keep_the_patch_kernel(rng):
    """Pruned in whole groups of 4 along the unfolded weight: the grouped-sparse patch kernel,
    with the folded BatchNorm, then the residual add and ReLU after it."""
    model = resnet_block(rng, 8, 6)
    for init in model.graph.initializer:
        if init.name.endswith(".w"):
            w = numpy_helper.to_array(init).reshape(8, -1).copy()
            groups = w.reshape(8, -1, 4)
            groups[rng.random(groups.shape[:2]) < 0.7] = 0.0
            init.CopyFrom(numpy_helper.from_array(groups.reshape(8, 8, 3, 3), init.name))
    built = compile_onnx(model, "x86", mode="sparse")
    assert [(d.kernel, d.group_width) for d in built.layers] == [("grouped-sparse", 4)] * 2
    for batch in (1, 3):
        x = rng.standard_normal((batch, 8, 6, 6)).astype(np.float32)
        assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < TOL


def test_fused_graph_has_one_kernel_call_per_conv(rng):
    """The BatchNorm, residual add and ReLUs leave no ops of their own behind."""
    from tvm_scalpel.onnx_io import to_relax
    from tvm_scalpel.passes import RewriteConvLayers

    mod = RewriteConvLayers("x86")(to_relax(resnet_block(rng, 8, 6)))
    text = mod["main"].script()
    assert text.count("call_tir") == 2
    for op in ("batch_norm", "R.add", "R.nn.relu", "R.nn.conv2d"):
        assert op not in text


@pytest.mark.parametrize("lanes,x86", [(4, True), (4, False), (8, True), (16, True)])
def test_default_knobs_fit_the_register_file(lanes, x86):
    for shape in (ConvShape(1, 64, 56, 56, 64, 3, 3, padding=(1, 1, 1, 1)),
                  ConvShape(1, 3, 224, 224, 64, 11, 11, (4, 4), (2, 2, 2, 2)),
                  ConvShape(1, 512, 7, 7, 512, 3, 3, padding=(1, 1, 1, 1)),
                  ConvShape(1, 6, 10, 10, 6, 3, 3, groups=6)):
        regs = conv_cpu.vector_registers(lanes, x86)
        k = conv_cpu.default_conv_knobs(shape, lanes, regs)
        assert k.oc_block % lanes == 0
        vecs = k.oc_block // lanes
        accumulators = k.ow_tile * vecs
        assert accumulators + vecs + 1 <= regs
        assert k.ow_tile >= min(4, shape.out_size[0] * shape.out_size[1])  # not degenerate


def _fma_blocks(target: dict, shape: ConvShape, fma: str):
    """The basic blocks of the compiled kernel that hold vector FMAs (the micro-kernel)."""
    profile = resolve_target(tvm.target.Target(target))
    func = schedules.conv2d(profile, shape, relu=True).with_attr("global_symbol", "main")
    asm = tvm.compile(tvm.IRModule({"main": func}), target=profile.target).mod.inspect_source("asm")
    blocks = re.split(r"\n(?=\S[^\n]*:)", asm)  # a new block at every label
    return [b for b in blocks if re.search(fma, b)]


CONV_SHAPES = [ConvShape(1, 32, 14, 14, 64, 3, 3, padding=(1, 1, 1, 1)),
               ConvShape(1, 32, 14, 14, 32, 3, 3, padding=(1, 1, 1, 1), groups=32)]


@pytest.mark.parametrize("mcpu,reg", [("haswell", "ymm"), ("skylake-avx512", "zmm")])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=["dense", "depthwise"])
def test_x86_codegen_uses_full_vector_fmas_without_gathers(mcpu, reg, shape):
    """Compile only: the AVX-512 code is never run here. (The data packing / unpacking stages
    may gather; the blocks with the FMAs must not.)"""
    blocks = _fma_blocks({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}, shape, r"vfmadd\w*ps")
    text = "\n".join(blocks)
    fmas = {r: len(re.findall(rf"vfmadd\w*ps\s[^\n]*%{r}", text)) for r in ("xmm", "ymm", "zmm")}
    assert fmas[reg] >= 8, fmas
    assert sum(fmas.values()) == fmas[reg], fmas
    assert "gather" not in text


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=["dense", "depthwise"])
def test_neon_codegen_uses_4_lane_fmas(shape):
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}
    text = "\n".join(_fma_blocks(target, shape, r"fmla"))
    assert len(re.findall(r"fmla\s+v\d+\.4s", text)) >= 8
    assert not re.search(r"fmla\s+s\d+", text)  # no scalar FMAs in the micro-kernel


def downsample_block(rng, c: int, o: int, hw: int):
    """ResNet's first block of a stage as torchvision exports it: conv 3x3/2 -> BN -> ReLU ->
    conv 3x3 -> BN, a 1x1/2 conv -> BN shortcut, Add of the two conv branches, ReLU."""
    inits, nodes = [], []

    def conv_bn(src, dst, tag, cin, k, stride):
        w = (rng.standard_normal((o, cin, k, k)) / np.sqrt(k * k * cin)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{tag}.w"))
        for p, v in (("s", rng.uniform(0.5, 1.5, o)), ("b", rng.standard_normal(o) * 0.1),
                     ("m", rng.standard_normal(o) * 0.1), ("v", rng.uniform(0.5, 2.0, o))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{tag}.{p}"))
        pad = k // 2
        nodes.append(helper.make_node("Conv", [src, f"{tag}.w"], [f"{tag}.c"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[pad] * 4))
        nodes.append(helper.make_node("BatchNormalization", [f"{tag}.c"] + [f"{tag}.{p}" for p in "sbmv"],
                                      [dst], epsilon=1e-5))

    conv_bn("x", "bn1", "c1", c, 3, 2)
    nodes.append(helper.make_node("Relu", ["bn1"], ["r1"]))
    conv_bn("r1", "bn2", "c2", o, 3, 1)
    conv_bn("x", "bnd", "down", c, 1, 2)  # after the main branch, as the exporter orders it
    nodes.append(helper.make_node("Add", ["bn2", "bnd"], ["sum"]))
    nodes.append(helper.make_node("Relu", ["sum"], ["y"]))
    half = hw // 2
    return make_model(nodes, inits, [("x", ["N", c, hw, hw])], [("y", ["N", o, half, half])])


def test_add_of_two_conv_branches_is_absorbed_once(rng):
    """Both branches of a downsample block end in the same Add: one conv absorbs it, the other
    stops before it and is its residual input, so no conv is left to TVM's default (each of
    the three convs once: ResNet-18 ran three of them on TVM's plain loops, 12x onnxruntime)."""
    from tvm_scalpel.onnx_io import to_relax
    from tvm_scalpel.passes import RewriteConvLayers

    model = downsample_block(rng, 8, 16, 8)
    text = RewriteConvLayers("x86")(to_relax(model))["main"].script()
    assert text.count("call_tir") == 3
    for op in ("batch_norm", "R.add", "R.nn.relu", "R.nn.conv2d"):
        assert op not in text
    built = compile_onnx(model, "x86")
    for batch in (1, 2):
        x = rng.standard_normal((batch, 8, 8, 8)).astype(np.float32)
        assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < TOL


def conv_pool_model(rng, c, hw, o, k, stride, pad, pool, pool_stride, pool_pads, relu=True,
                    depthwise=False, op="MaxPool", ceil=False, count_include_pad=None, relu_after=False):
    """Conv (+ Relu) -> MaxPool / AveragePool (+ Relu), as PyTorch exports AlexNet's, VGG's and
    ResNet's stem, and Caffe-converted NIN / ConvNet (ceil mode, average pools) are."""
    model = conv_model(rng, c, hw, hw, o, k, (stride, stride), (pad,) * 4,
                       groups=c if depthwise else 1, relu=relu)
    graph = model.graph
    graph.node[-1].output[0] = "conv_out"
    attrs = {"count_include_pad": count_include_pad} if count_include_pad is not None else {}
    graph.node.append(helper.make_node(op, ["conv_out"], ["pooled" if relu_after else "y"],
                                       kernel_shape=[pool, pool], strides=[pool_stride] * 2,
                                       pads=list(pool_pads), ceil_mode=int(ceil), **attrs))
    if relu_after:
        graph.node.append(helper.make_node("Relu", ["pooled"], ["y"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None))
    return model


# (c, hw, o, k, stride, pad, pool, pool stride, pool pads, relu, depthwise[, extra attributes])
POOLED = {
    "resnet stem 3x3 s2 p1": (3, 21, 16, 7, 2, 3, 3, 2, (1, 1, 1, 1), True, False),
    "alexnet 3x3 s2": (8, 15, 24, 3, 1, 1, 3, 2, (0, 0, 0, 0), True, False),
    "vgg 2x2 s2 odd size": (5, 11, 40, 3, 1, 1, 2, 2, (0, 0, 0, 0), False, False),
    "asymmetric pool pads": (6, 9, 12, 3, 1, 1, 3, 2, (0, 1, 1, 0), True, False),
    "depthwise then pool": (16, 10, 16, 3, 1, 1, 2, 2, (0, 0, 0, 0), True, True),
    # NIN's max pool: 3/2 rounding up (16 -> 8, floor would give 7)
    "ceil max 3/2": (8, 16, 20, 3, 1, 1, 3, 2, (0, 0, 0, 0), True, False, {"ceil": True}),
    # ceil mode whose last window would start in the padding: dropped (5 -> 3, not 4)
    "ceil max, last window dropped": (4, 5, 18, 1, 1, 0, 2, 2, (1, 1, 1, 1), True, False, {"ceil": True}),
    # ConvNet's Conv -> MaxPool -> Relu: the ReLU moves before the max
    "max then relu": (3, 12, 20, 5, 1, 2, 3, 2, (0, 0, 0, 0), False, False, {"ceil": True, "relu_after": True}),
    # NIN's and ConvNet's average pools: ceil mode, padding excluded from the divisor
    "ceil avg 3/2": (8, 16, 24, 3, 1, 1, 3, 2, (0, 0, 0, 0), True, False, {"op": "AveragePool", "ceil": True}),
    # PyTorch's AvgPool2d(3, 2, padding=1): count_include_pad=1
    "avg with pads counted": (6, 11, 20, 3, 1, 1, 3, 2, (1, 1, 1, 1), False, False,
                              {"op": "AveragePool", "count_include_pad": 1}),
    "avg with pads not counted": (6, 11, 20, 3, 1, 1, 3, 2, (1, 1, 1, 1), True, False,
                                  {"op": "AveragePool", "count_include_pad": 0}),
    # the divisor counts the explicit padding but not the ceil-mode overhang (onnxruntime's rule)
    "ceil avg, pads counted": (5, 10, 18, 3, 1, 1, 3, 2, (1, 1, 1, 1), True, False,
                               {"op": "AveragePool", "ceil": True, "count_include_pad": 1}),
    "depthwise then ceil avg": (16, 9, 16, 3, 1, 1, 3, 2, (0, 0, 0, 0), True, True,
                                {"op": "AveragePool", "ceil": True}),
}


@pytest.mark.parametrize("name", list(POOLED))
def test_pool_after_a_conv_is_fused_and_matches_onnxruntime(rng, name):
    c, hw, o, k, s, p, pool, ps, pads, relu, dw, *extra = POOLED[name]
    model = conv_pool_model(rng, c, hw, o, k, s, p, pool, ps, pads, relu, dw, **(extra[0] if extra else {}))
    from tvm_scalpel.onnx_io import to_relax
    from tvm_scalpel.passes import RewriteConvLayers

    text = RewriteConvLayers("x86")(to_relax(model))["main"].script()
    assert text.count("call_tir") == 1
    for op in ("max_pool2d", "avg_pool2d", "R.nn.relu"):
        assert op not in text
    built = compile_onnx(model, "x86")
    for batch in (1, 2):
        x = rng.standard_normal((batch, c, hw, hw)).astype(np.float32) - 0.5  # negatives: the pool's max
        assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < TOL


def test_avg_pool_then_relu_is_not_reordered(rng):
    """relu(avg(x)) differs from avg(relu(x)): a ReLU after an average pool stays TVM's."""
    model = conv_pool_model(rng, 6, 10, 20, 3, 1, 1, 3, 2, (0, 0, 0, 0), relu=False, op="AveragePool",
                            ceil=True, relu_after=True)
    from tvm_scalpel.onnx_io import to_relax
    from tvm_scalpel.passes import RewriteConvLayers

    text = RewriteConvLayers("x86")(to_relax(model))["main"].script()
    assert "avg_pool2d" not in text and "R.nn.relu" in text
    built = compile_onnx(model, "x86")
    x = rng.standard_normal((2, 6, 10, 10)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < TOL


def test_elementwise_readers_of_a_conv_kernel_are_not_fused_into_it(rng):
    """TVM's FuseOps would merge the elementwise ops that read a conv kernel's output into it
    (FuseTIR then fails on a kernel of several stages): the kernels are opaque to it."""
    model = conv_pool_model(rng, 4, 9, 16, 3, 1, 1, 3, 2, (0, 0, 0, 0), relu=False, op="AveragePool",
                            ceil=True)
    graph = model.graph
    graph.node[-1].output[0] = "pooled"
    graph.node.extend([helper.make_node("Sigmoid", ["pooled"], ["s"]),
                       helper.make_node("Mul", ["pooled", "s"], ["y"])])  # SiLU, read twice
    built = compile_onnx(model, "x86")
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < TOL


def test_max_pool_read_twice_or_after_a_sparse_conv_stays_correct(rng):
    """A pool that is not the conv's only reader is not fused; a group-sparse conv (patch
    kernel) keeps TVM's pool after it."""
    model = conv_pool_model(rng, 8, 9, 16, 3, 1, 1, 2, 2, (0, 0, 0, 0))
    w = numpy_helper.to_array(model.graph.initializer[0]).reshape(16, -1).copy()
    groups = w.reshape(16, -1, 4)
    groups[rng.random(groups.shape[:2]) < 0.75] = 0.0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(groups.reshape(16, 8, 3, 3), "w"))
    built = compile_onnx(model, "x86", mode="sparse")
    assert [d.kernel for d in built.layers] == ["grouped-sparse"]
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < TOL

    twice = conv_pool_model(rng, 8, 9, 16, 3, 1, 1, 2, 2, (0, 0, 0, 0))
    twice.graph.output.append(helper.make_tensor_value_info("conv_out", onnx.TensorProto.FLOAT, None))
    built = compile_onnx(twice, "x86")
    import onnxruntime as ort

    refs = ort.InferenceSession(twice.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    outs = tvm.relax.VirtualMachine(built.executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
    for out, ref in zip(outs, refs):
        assert rel_err(out.numpy(), ref) < TOL
