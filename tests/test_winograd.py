"""Winograd F(m x m, r x r) conv kernels (``schedules/conv_winograd.py``): the Toom-Cook
matrices in exact arithmetic; the kernels against a float64 numpy conv on odd sizes, partial
tiles, odd channel counts, padding, residual, pooling and the blocked layout; the rule that picks
them; and whole exported-style graphs against onnxruntime."""

from dataclasses import replace
from fractions import Fraction

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


TILE_SIZES = [(r, m) for r, ms in conv_winograd.TILES.items() for m in ms]


@pytest.mark.parametrize("r, m", TILE_SIZES)
def test_toom_cook_matrices_correlate_exactly(r, m):
    """``A^T [(G g) * (B^T d)]`` is the 1-D correlation of d with g, in exact fractions, for
    random integer inputs (so any wrong coefficient shows, with no rounding to hide it)."""
    bt, g, at = conv_winograd.MATRICES[m, r]
    a = m + r - 1
    assert (len(bt), len(bt[0]), len(g), len(g[0]), len(at), len(at[0])) == (a, a, a, r, m, a)
    ints = np.random.default_rng(r * 10 + m).integers(-9, 10, size=(5, a + r))
    for row in ints:
        d, w = [Fraction(int(v)) for v in row[:a]], [Fraction(int(v)) for v in row[a:]]
        gw = [sum(gj[k] * w[k] for k in range(r)) for gj in g]
        bd = [sum(bj[k] * d[k] for k in range(a)) for bj in bt]
        y = [sum(at[i][j] * gw[j] * bd[j] for j in range(a)) for i in range(m)]
        assert y == [sum(d[i + k] * w[k] for k in range(r)) for i in range(m)]


@pytest.mark.parametrize("r, m", TILE_SIZES)
@pytest.mark.parametrize("name", list(CASES))
def test_winograd_kernel_matches_numpy(rng, name, r, m):
    c, h, w_, o, pads, data_block, res_block, blocked_out = CASES[name]
    shape = ConvShape(2, c, h, w_, o, r, r, (1, 1), pads)
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
    wt = rng.standard_normal((o, c, r, r)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    res = rng.standard_normal((2, o, oh, ow)).astype(np.float32) if residual else None
    want = conv_ref(x, wt, b, shape, res)
    args = [to_blocked(x, data_in) if data_in else x, conv_winograd.pack_weight(wt, shape, knobs),
            conv_cpu.pack_bias(b, shape, knobs)]
    if residual:
        args.append(to_blocked(res, res_in) if res_in else res)
    if blocked_out:
        layout = conv_cpu.output_layout(shape, knobs)
        args.append(np.full((2, -(-o // layout.block), layout.positions, layout.block), np.nan, np.float32))
    else:
        args.append(np.full(want.shape, np.nan, np.float32))
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    out = tensors[-1].numpy()
    got = from_blocked(out, o, oh, ow) if blocked_out else out
    assert rel_err(got, want) < (1e-5 if m + r - 1 == 4 else 5e-5)
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


@pytest.mark.parametrize("r, m", [(3, 4), (5, 2)])
def test_weight_transform_is_exact_on_a_delta(r, m):
    """U = G g G^T: for g = a unit tap, the outer product of one column of G with itself."""
    shape = ConvShape(1, 1, 8, 8, 1, r, r, (1, 1), (1, 1, 1, 1))
    knobs = conv_cpu.ConvKnobs(oc_block=1, ic_block=1, ow_tile=1, winograd=m)
    for ky, kx in ((0, 0), (1, 2), (r - 1, 0)):
        w = np.zeros((1, 1, r, r), np.float32)
        w[0, 0, ky, kx] = 1.0
        u = conv_winograd.pack_weight(w, shape, knobs).reshape(6, 6)
        g = np.asarray(conv_winograd.MATRICES[m, r][1], np.float64)
        np.testing.assert_allclose(u, np.outer(g[:, ky], g[:, kx]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, tile", [
    (ConvShape(1, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1, 1, 1)), 4),  # ResNet-18 @ 56
    (ConvShape(1, 128, 28, 28, 128, 3, 3, (1, 1), (1, 1, 1, 1)), 4),
    (ConvShape(1, 256, 28, 28, 512, 3, 3, (1, 1), (1, 1, 1, 1)), 4),  # VGG-11 @ 28
    (ConvShape(1, 256, 14, 14, 256, 3, 3, (1, 1), (1, 1, 1, 1)), 2),  # 4x4 tiles pad 14 to 16
    (ConvShape(1, 512, 7, 7, 512, 3, 3, (1, 1), (1, 1, 1, 1)), 2),
    (ConvShape(1, 192, 13, 13, 384, 3, 3, (1, 1), (1, 1, 1, 1)), 2),  # AlexNet conv3
    (ConvShape(8, 192, 13, 13, 384, 3, 3, (1, 1), (1, 1, 1, 1)), 2),
    (ConvShape(1, 2048, 3, 3, 2048, 3, 3, (1, 1), (1, 1, 1, 1)), 0),  # weights 1800x the image
    (ConvShape(1, 64, 56, 56, 128, 3, 3, (2, 2), (1, 1, 1, 1)), 0),  # stride 2
    (ConvShape(1, 3, 224, 224, 64, 3, 3, (1, 1), (1, 1, 1, 1)), 0),  # RGB input
    (ConvShape(1, 64, 56, 56, 64, 1, 1), 0),
    (ConvShape(1, 64, 56, 56, 64, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2)), 0),  # dilated
    (ConvShape(1, 64, 3, 3, 64, 3, 3, (1, 1), (0, 0, 0, 0)), 0),  # one 2x2 tile for 1 output
    (ConvShape(1, 64, 27, 27, 192, 5, 5, (1, 1), (2, 2, 2, 2)), 2),  # AlexNet conv2
    (ConvShape(1, 96, 16, 16, 192, 5, 5, (1, 1), (2, 2, 2, 2)), 2),  # NIN's 5x5
    (ConvShape(1, 3, 32, 32, 192, 5, 5, (1, 1), (2, 2, 2, 2)), 0),  # RGB input
    (ConvShape(1, 64, 56, 56, 64, 7, 7, (1, 1), (3, 3, 3, 3)), 0),  # no 7x7 Winograd
    (ConvShape(1, 1, 28, 28, 6, 5, 5, (1, 1), (2, 2, 2, 2)), 0),  # LeNet-5's conv1: one channel
])
def test_rule_picks_the_winograd_tile_by_padding_and_weights(shape, tile):
    """The rule's tile for real layers (F(4x4) where its tiles fit, F(2x2) where 4x4 tiles pad
    much, none where the weights dwarf the image or the layer has no kernel)."""
    assert conv_winograd.rule_tile(shape) == tile
    assert schedules.default_conv_knobs(PROFILE, shape).winograd == tile
    assert conv_winograd.winograd_pays(shape) == (tile > 0)


@pytest.mark.parametrize("shape", [
    ConvShape(1, 1, 28, 28, 6, 5, 5, (1, 1), (2, 2, 2, 2)),  # LeNet-5's layers
    ConvShape(1, 6, 14, 14, 16, 5, 5),
    ConvShape(1, 2, 9, 9, 3, 3, 3),
    ConvShape(1, 3, 32, 32, 8, 3, 3, (1, 1), (1, 1, 1, 1)),
])
def test_every_tuner_candidate_schedules_on_narrow_layers(shape):
    """``tune`` tries both algorithms on layers the rule leaves direct: each candidate builds."""
    from tvm_scalpel.conv_tuning import conv_candidates

    candidates = conv_candidates(PROFILE, shape)
    assert any(k.winograd for k in candidates) == conv_winograd.supports(shape)
    for knobs in candidates:
        assert isinstance(schedules.conv2d(PROFILE, shape, knobs, relu=True), tvm.tirx.PrimFunc)


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


@pytest.mark.parametrize("k", [3, 5])
def test_a_single_winograd_conv_with_bias_and_relu_matches_onnxruntime(rng, k):
    c, o, hw = 24, 40, 16
    w = (rng.standard_normal((o, c, k, k)) / np.sqrt(k * k * c)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[k, k], pads=[k // 2] * 4),
             helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
                       [("x", ["N", c, hw, hw])], [("y", ["N", o, hw, hw])])
    mod = RewriteConvLayers("x86")(to_relax(model))
    assert any("wino_gemm" in f.script() for gv, f in mod.functions.items() if gv.name_hint.startswith("scalpel_conv"))
    built = compile_onnx(model, "x86")
    x = rng.standard_normal((3, c, hw, hw)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-4
