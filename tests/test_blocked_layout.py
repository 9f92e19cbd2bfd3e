"""Conv layers that feed conv layers pass their outputs on in the blocked layout (NCHW[x]c, as
NeoCPU keeps it between layers): the kernels with blocked data, residual and output against a
float64 numpy conv, and ``RewriteConvLayers``' choice of which tensors stay blocked, checked
against onnxruntime on whole exported-style graphs."""

import numpy as np
import pytest
import tvm
from exporter_graphs import mini_resnet, mini_vgg
from helpers import make_model, ort_run, rel_err, vm_run
from onnx import helper, numpy_helper
from tvm import relax

from tvm_scalpel import compile_onnx
from tvm_scalpel.onnx_io import to_relax
from tvm_scalpel.passes import RewriteConvLayers
from tvm_scalpel.schedules import Blocked, ConvIO, ConvShape, Pool, conv_cpu
from tvm_scalpel.targets import resolve_target

PROFILE = resolve_target("x86")
LANES = max(PROFILE.simd_width, 4)


def conv_ref(x, w, b, shape: ConvShape, residual=None) -> np.ndarray:
    (sh, sw), (pt, pl, pb, pr) = shape.strides, shape.padding
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh, ow = shape.out_size
    out = np.zeros((x.shape[0], w.shape[0], oh, ow)) + b.astype(np.float64)[None, :, None, None]
    for ky in range(shape.kh):
        for kx in range(shape.kw):
            patch = xp[:, :, ky:ky + sh * oh:sh, kx:kx + sw * ow:sw]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, ky, kx].astype(np.float64))
    if residual is not None:
        out += residual
    return np.maximum(out, 0.0)


def to_blocked(a: np.ndarray, layout: Blocked) -> np.ndarray:
    """NCHW -> [N, C/block, positions, block], the padding random (it must not be read)."""
    n, c, h, w = a.shape
    chunks = -(-c // layout.block)
    out = np.random.default_rng(9).standard_normal((n, chunks * layout.block, layout.positions))
    out[:, c:] = 0.0  # a producer's padded channels are zeros
    out[:, :c, :h * w] = a.reshape(n, c, h * w)
    return out.reshape(n, chunks, layout.block, -1).transpose(0, 1, 3, 2).astype(np.float32).copy()


def from_blocked(a: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
    n, chunks, positions, block = a.shape
    flat = a.transpose(0, 1, 3, 2).reshape(n, chunks * block, positions)
    return flat[:, :c, :h * w].reshape(n, c, h, w)


CASES = {  # c, hw, o, k, stride, pad, data block, residual block (None: no residual)
    "same blocks, residual": (2 * LANES, 9, 2 * LANES, 3, 1, 1, None, None),
    "odd channels, other blocks": (LANES + 5, 7, LANES + 3, 3, 2, 1, LANES, 2 * LANES),
    "1x1, residual in other blocks": (3 * LANES, 6, LANES, 1, 1, 0, 2 * LANES, LANES // 2),
}


@pytest.mark.parametrize("pool", [None, Pool((2, 2), (2, 2))], ids=["no pool", "pool"])
@pytest.mark.parametrize("name", list(CASES))
def test_blocked_data_residual_and_output_match_numpy(rng, name, pool):
    c, hw, o, k, stride, pad, data_block, res_block = CASES[name]
    shape = ConvShape(2, c, hw, hw, o, k, k, (stride, stride), (pad,) * 4)
    knobs = conv_cpu.default_conv_knobs(shape, LANES, 32 if LANES >= 16 else 16)
    oh, ow = shape.out_size
    data_in = Blocked(data_block or knobs.ic_block, hw * hw + 3)  # a producer's padded tiles
    res_in = Blocked(res_block or knobs.oc_block, oh * ow + 5)
    residual = name != "odd channels, other blocks"
    io = ConvIO(data=data_in, residual=res_in if residual else None, blocked_out=True)
    func = conv_cpu.conv2d_kernel(shape, knobs, LANES, relu=True, residual=residual, pool=pool, io=io)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=PROFILE.target).mod

    x = rng.standard_normal((2, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    r = rng.standard_normal((2, o, oh, ow)).astype(np.float32) if residual else None
    want = conv_ref(x, w, b, shape, r)
    if pool is not None:
        ph, pw = pool.out_size(oh, ow)
        want = want[:, :, :2 * ph, :2 * pw].reshape(2, o, ph, 2, pw, 2).max(axis=(3, 5))
    out_layout = conv_cpu.output_layout(shape, knobs, pool)
    out_shape = (2, -(-o // out_layout.block), out_layout.positions, out_layout.block)
    args = [to_blocked(x, data_in), conv_cpu.pack_weight(w, shape, knobs),
            conv_cpu.pack_bias(b, shape, knobs)]
    args += [to_blocked(r, res_in)] if residual else []
    args.append(np.full(out_shape, np.nan, np.float32))
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    out = tensors[-1].numpy()
    assert rel_err(from_blocked(out, o, *want.shape[2:]), want) < 1e-5
    # the output's padded channels are zeros, so that the next layer may copy whole blocks
    flat = out.transpose(0, 1, 3, 2).reshape(2, -1, out_layout.positions)
    assert np.all(flat[:, o:, :want.shape[2] * want.shape[3]] == 0.0)


def test_grouped_convs_refuse_blocked_inputs():
    shape = ConvShape(1, 8, 6, 6, 8, 3, 3, groups=2)
    knobs = conv_cpu.default_conv_knobs(shape, LANES)
    with pytest.raises(ValueError, match="ungrouped"):
        conv_cpu.conv2d_kernel(shape, knobs, LANES, io=ConvIO(blocked_out=True))


def _call_outputs(mod) -> list[tuple[str, tuple[int, ...]]]:
    """(kernel name, output shape) of each call_tir of ``main``, in order (batch dims as -1)."""
    calls = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.call_tir")):
            dims = tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else -1
                         for d in expr.ty.shape.values)
            calls.append((expr.args[0].name_hint, dims))

    relax.analysis.post_order_visit(mod["main"], visit)
    return calls


def test_resnet_convs_pass_blocked_tensors_and_match_onnxruntime(rng):
    """Stem + pool, a basic block, a stride-2 block with a 1x1 shortcut: every conv output that
    only convs read (as data or as the residual) stays blocked; the last one, read by the global
    pooling, is NCHW."""
    model, _ = mini_resnet("torchscript", seed=2, trained_bn=True)
    mod = RewriteConvLayers("x86")(to_relax(model))
    convs = [(name, dims) for name, dims in _call_outputs(mod) if name.startswith("scalpel_conv")]
    assert len(convs) == 6
    assert all(len(dims) == 4 and dims[-1] % LANES == 0 and dims[2] >= 1 for _, dims in convs[:-1])
    assert convs[-1][1][1:] == (32, 4, 4)  # NCHW for GlobalAveragePool
    built = compile_onnx(model, "x86")
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
        assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-4


def test_keep_blocked_off_gives_nchw_between_layers_and_the_same_result(rng):
    model, _ = mini_vgg("torchscript", seed=3)
    blocked = RewriteConvLayers("x86")(to_relax(model))
    nchw = RewriteConvLayers("x86", keep_blocked=False)(to_relax(model))
    shapes = [d for n, d in _call_outputs(nchw) if n.startswith("scalpel_conv")]
    assert shapes and all(len(d) == 4 and d[1] > 4 for d in shapes)
    assert _call_outputs(blocked) != _call_outputs(nchw)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    outs = []
    for mod in (blocked, nchw):
        lib = tvm.compile(mod, target=PROFILE.target)
        outs.append(vm_run(lib, x))
    ref = ort_run(model, x)
    assert rel_err(outs[0], ref) < 1e-4 and rel_err(outs[1], ref) < 1e-4


def test_a_conv_output_read_by_anything_else_stays_nchw(rng):
    """conv1's output feeds conv2 and is also a graph output: it must stay NCHW."""
    w1 = rng.standard_normal((LANES, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((LANES, LANES, 3, 3)).astype(np.float32) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)]
    model = make_model(nodes, [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
                       [("x", [1, 3, 8, 8])], [("r1", [1, LANES, 8, 8]), ("y", [1, LANES, 8, 8])])
    mod = RewriteConvLayers("x86")(to_relax(model))
    assert [d for _, d in _call_outputs(mod)] == [(1, LANES, 8, 8)] * 2
    built = compile_onnx(model, "x86")
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x))
    import onnxruntime as ort

    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    for g, w in zip(got, want):
        assert rel_err(g.numpy(), w) < 1e-4


def test_nin_pools_keep_the_chain_blocked_and_match_onnxruntime(rng):
    """NIN's ceil-mode max and average pools are fused into the conv before them, so that all
    of its nine convs but the last (read by the global pooling) pass blocked tensors on."""
    from tvm_scalpel import models

    model = models.nin(seed=4, scale=0.125)
    mod = RewriteConvLayers("x86")(to_relax(model))
    text = mod["main"].script()
    assert "max_pool2d" not in text and "avg_pool2d" not in text
    convs = [dims for name, dims in _call_outputs(mod) if name.startswith("scalpel_conv")]
    assert len(convs) == 9
    # blocked: [N, blocks, positions, block] with a block of whole vectors
    assert all(d[-1] % LANES == 0 and d[1] * d[-1] >= 10 for d in convs[:-1])
    assert convs[2][2] == 16 * 16 and convs[5][2] == 8 * 8  # the pooled images
    assert convs[-1][1:] == (10, 8, 8)
    built = compile_onnx(model, "x86")
    for batch in (1, 2):
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-4
