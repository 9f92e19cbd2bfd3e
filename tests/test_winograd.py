"""Winograd F(m x m, 3 x 3) conv kernels (``schedules/conv_winograd.py``): against a float64
numpy conv on odd sizes, partial tiles, odd channel counts, padding, residual, pooling and the
blocked layout; the rule that picks them; and whole exported-style graphs against onnxruntime."""

from dataclasses import replace

import numpy as np
import pytest
import tvm
from helpers import make_model, ort_run, rel_err, vm_run
from onnx import helper, numpy_helper
from test_blocked_layout import conv_ref, from_blocked, to_blocked

from tvm_scalpel import compile_onnx, schedules
from tvm_scalpel.onnx_io import to_relax
from tvm_scalpel.passes import RewriteConvLayers
from tvm_scalpel.schedules import Blocked, ConvIO, ConvShape, Pool, conv_cpu, conv_winograd
from tvm_scalpel.targets import resolve_target

PROFILE = resolve_target("x86")
LANES = max(PROFILE.simd_width, 4)
REGISTERS = 32 if LANES >= 16 else 16

# c, h, w, o, padding, data block (None: NCHW in), residual block (None: none), blocked out
CASES = {
    "partial tiles, NCHW": (LANES, 9, 11, 2 * LANES, (1, 1, 1, 1), None, None, False),
    "odd channels, no padding": (LANES + 5, 10, 7, LANES + 3, (0, 0, 0, 0), None, None, False),
    "asymmetric padding, residual": (2 * LANES, 8, 8, LANES, (1, 0, 2, 1), None, "nchw", False),
    "blocked in, residual and out": (2 * LANES, 13, 13, 2 * LANES, (1, 1, 1, 1), LANES, LANES // 2, True),
}


def knobs_for(shape: ConvShape, m: int) -> conv_cpu.ConvKnobs:
    base = conv_cpu.default_conv_knobs(replace(shape, height=64, width=64), LANES, REGISTERS)
    return replace(base, winograd=m, ow_tile=5, tiles_per_task=1, ic_step=0)


@pytest.mark.parametrize("m", conv_winograd.TILES)
@pytest.mark.parametrize("name", list(CASES))
def test_winograd_kernel_matches_numpy(rng, name, m):
    c, h, w_, o, pads, data_block, res_block, blocked_out = CASES[name]
    shape = ConvShape(2, c, h, w_, o, 3, 3, (1, 1), pads)
    knobs = knobs_for(shape, m)
    oh, ow = shape.out_size
    data_in = Blocked(data_block, h * w_ + 3) if data_block else None
    res_in = None if res_block in (None, "nchw") else Blocked(res_block, oh * ow + 5)
    residual = res_block is not None
    io = ConvIO(data=data_in, residual=res_in, blocked_out=blocked_out)
    func = conv_winograd.conv2d_kernel(shape, knobs, relu=True, residual=residual, io=io)
    assert "wino_gemm" in func.script()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=PROFILE.target).mod

    x = rng.standard_normal((2, c, h, w_)).astype(np.float32)
    wt = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    r = rng.standard_normal((2, o, oh, ow)).astype(np.float32) if residual else None
    want = conv_ref(x, wt, b, shape, r)
    args = [to_blocked(x, data_in) if data_in else x, conv_winograd.pack_weight(wt, shape, knobs),
            conv_cpu.pack_bias(b, shape, knobs)]
    if residual:
        args.append(to_blocked(r, res_in) if res_in else r)
    if blocked_out:
        layout = conv_cpu.output_layout(shape, knobs)
        args.append(np.full((2, -(-o // layout.block), layout.positions, layout.block), np.nan, np.float32))
    else:
        args.append(np.full(want.shape, np.nan, np.float32))
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    out = tensors[-1].numpy()
    got = from_blocked(out, o, oh, ow) if blocked_out else out
    assert rel_err(got, want) < (1e-5 if m == 2 else 5e-5)
    if blocked_out:  # padded channels zero, for the next layer's block copy
        flat = out.transpose(0, 1, 3, 2).reshape(2, -1, oh * ow)
        assert np.all(flat[:, o:] == 0.0)


def test_winograd_kernel_with_a_fused_pool_and_a_free_batch(rng):
    """Max pool fused after the transform; the batch a variable of the kernel (the model's N)."""
    shape = ConvShape(tvm.tirx.Var("n", "int64"), LANES, 10, 10, LANES, 3, 3, (1, 1), (1, 1, 1, 1))
    knobs = knobs_for(replace(shape, batch=1), 4)
    pool = Pool((2, 2), (2, 2))
    func = conv_winograd.conv2d_kernel(shape, knobs, relu=True, pool=pool)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=PROFILE.target).mod
    for batch in (1, 3):
        x = rng.standard_normal((batch, LANES, 10, 10)).astype(np.float32)
        wt = rng.standard_normal((LANES, LANES, 3, 3)).astype(np.float32)
        b = rng.standard_normal(LANES).astype(np.float32)
        want = conv_ref(x, wt, b, replace(shape, batch=batch)).reshape(batch, LANES, 5, 2, 5, 2).max(axis=(3, 5))
        tensors = [tvm.runtime.tensor(a) for a in (
            x, conv_winograd.pack_weight(wt, shape, knobs), conv_cpu.pack_bias(b, shape, knobs),
            np.full(want.shape, np.nan, np.float32))]
        lib["main"](*tensors)
        assert rel_err(tensors[-1].numpy(), want) < 5e-5


def test_weight_transform_is_exact_on_a_delta():
    """U = G g G^T: for g = a unit tap, the outer product of one column of G with itself."""
    shape = ConvShape(1, 1, 8, 8, 1, 3, 3, (1, 1), (1, 1, 1, 1))
    knobs = conv_cpu.ConvKnobs(oc_block=1, ic_block=1, ow_tile=1, winograd=4)
    for ky, kx in ((0, 0), (1, 2)):
        w = np.zeros((1, 1, 3, 3), np.float32)
        w[0, 0, ky, kx] = 1.0
        u = conv_winograd.pack_weight(w, shape, knobs).reshape(6, 6)
        g = np.asarray(conv_winograd.MATRICES[4][1])
        np.testing.assert_allclose(u, np.outer(g[:, ky], g[:, kx]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, pays", [
    (ConvShape(1, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1, 1, 1)), True),  # ResNet-18 @ 56
    (ConvShape(1, 128, 28, 28, 128, 3, 3, (1, 1), (1, 1, 1, 1)), True),
    (ConvShape(1, 256, 28, 28, 512, 3, 3, (1, 1), (1, 1, 1, 1)), True),  # VGG-11 @ 28
    (ConvShape(1, 512, 7, 7, 512, 3, 3, (1, 1), (1, 1, 1, 1)), False),  # weights 47x the image
    (ConvShape(1, 192, 13, 13, 384, 3, 3, (1, 1), (1, 1, 1, 1)), False),  # AlexNet conv3
    (ConvShape(1, 64, 56, 56, 128, 3, 3, (2, 2), (1, 1, 1, 1)), False),  # stride 2
    (ConvShape(1, 3, 224, 224, 64, 3, 3, (1, 1), (1, 1, 1, 1)), False),  # RGB input
    (ConvShape(1, 64, 56, 56, 64, 1, 1), False),
    (ConvShape(1, 64, 56, 56, 64, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2)), False),  # dilated
    (ConvShape(8, 256, 14, 14, 256, 3, 3, (1, 1), (1, 1, 1, 1)), True),  # a batch of 8 shares them
    (ConvShape(8, 192, 13, 13, 384, 3, 3, (1, 1), (1, 1, 1, 1)), False),  # 4x4 tiles pad 13 to 16
])
def test_rule_picks_winograd_where_the_image_outweighs_the_weights(shape, pays):
    knobs = schedules.default_conv_knobs(PROFILE, shape)
    assert (knobs.winograd == conv_winograd.DEFAULT_TILE) == pays
    assert conv_winograd.winograd_pays(shape) == pays


def test_winograd_layers_in_an_exported_graph_match_onnxruntime(rng):
    """Conv/Relu twice, MaxPool, Flatten, Gemm (transB=1), as torch.onnx.export writes a VGG
    stage: both 3x3 layers go Winograd and pass a blocked tensor between them."""
    def conv_init(o, c, name):
        return numpy_helper.from_array((rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32), name)

    inits = [conv_init(32, 16, "features.0.weight"), conv_init(32, 32, "features.2.weight"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32) * 0.1, "features.0.bias"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32) * 0.1, "features.2.bias"),
             numpy_helper.from_array(rng.standard_normal((10, 32 * 8 * 8)).astype(np.float32) * 0.01, "fc.weight"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias")]
    nodes = [helper.make_node("Conv", ["x", "features.0.weight", "features.0.bias"], ["c0"],
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "features.2.weight", "features.2.bias"], ["c1"],
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], alpha=1.0, beta=1.0, transB=1)]
    model = make_model(nodes, inits, [("x", ["N", 16, 16, 16])], [("y", ["N", 10])])
    mod = RewriteConvLayers("x86")(to_relax(model))
    kernels = {gv.name_hint: f.script() for gv, f in mod.functions.items() if gv.name_hint.startswith("scalpel_conv")}
    assert len(kernels) == 2 and all("wino_gemm" in k for k in kernels.values())
    built = compile_onnx(model, "x86")
    for batch in (1, 2):
        x = rng.standard_normal((batch, 16, 16, 16)).astype(np.float32)
        assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-4


def test_a_single_winograd_conv_with_bias_and_relu_matches_onnxruntime(rng):
    c, o, hw = 24, 40, 17
    w = (rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
                       [("x", ["N", c, hw, hw])], [("y", ["N", o, hw, hw])])
    built = compile_onnx(model, "x86")
    x = rng.standard_normal((3, c, hw, hw)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-4
