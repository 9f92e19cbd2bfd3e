"""Winograd convolution for 3x3 and 5x5, stride-1 layers on LLVM CPU targets, in the blocked
layout.

Winograd's minimal filtering F(m x m, r x r) (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", CVPR 2016) computes an ``m x m`` output tile from an ``a x a`` input tile
(``a = m + r - 1``) with ``a * a`` multiplications per (input, output) channel pair instead of
``r * r * m * m``: 2.25x fewer for F(2x2, 3x3), 4x for F(4x4, 3x3), 2.8x for F(2x2, 5x5). The
kernel runs in four stages, each in the NCHW[x]c blocking of ``conv_cpu``:

1. ``data_pack``: the padded input, ``[N, C/ib, Hp, Wp, ib]`` (``conv_cpu.pack_data``);
2. ``wino_in``: each input tile transformed, ``V = B^T d B``, ``[N, a*a, C/ib, tiles, ib]``;
3. ``wino_gemm``: ``a * a`` independent GEMMs over the input channels, ``M[e] = V[e] U[e]``, with
   the weights ``U = G g G^T`` transformed at compile time (:func:`pack_weight`). This is the
   blocked 1x1 conv's micro-kernel: ``ow_tile`` tiles x ``oc_block`` output channels in vector
   registers, one broadcast times ``oc_block / lanes`` weight vectors a step;
4. ``wino_out``: each tile's outputs, ``Y = A^T M A``, computed per thread task right after its
   GEMMs (their result is still in cache); then ``conv_cpu.epilogue_and_unpack`` (bias,
   residual, ReLU, a fused pool, NCHW or blocked output), as for the direct kernel.

The matrices come from the Toom-Cook construction on the points 0, 1, -1, 2, -2 and infinity
(:func:`toom_cook`, exact in fractions); F(4x4, 3x3) and F(2x2, 5x5) share their 6 x 6 ``B``.
The transforms are unrolled with the matrices' nonzero coefficients only. The weights grow by
``a * a / (r * r)`` (1.8x and 4x for 3x3, 1.44x for 5x5) and the transformed input by
``a * a / (m * m)``: F(4x4, 3x3) pays on layers whose image its tiles fit (ResNet's and VGG's
3x3 layers at 112 to 28); on smaller images (14, 13, 7), whose 4x4 tiles would pad much and
whose larger weights are read from memory in a model, F(2x2, 3x3) does; F(2x2, 5x5) on 5x5
layers (NIN's, AlexNet's conv2); none where the transformed weights dwarf the batch's image
(:func:`rule_tile`).
"""

from __future__ import annotations

from fractions import Fraction
from math import prod

import numpy as np
import tvm
from tvm import te, tirx

from . import conv_cpu
from .conv_cpu import F32, ConvIO, ConvKnobs, ConvShape, Pool, _ceil_div

# the finite points of an a x a tile's transforms (the last point is infinity); small integers
# keep B's and A's coefficients exact in float32 and the rounding error near the direct kernel's
POINTS = {4: (0, 1, -1), 6: (0, 1, -1, 2, -2)}
TILES = {3: (2, 4), 5: (2,)}  # output tile sizes m by kernel size r


def _inverse(mat: list[list[Fraction]]) -> list[list[Fraction]]:
    """The exact inverse of a square matrix of fractions (Gauss-Jordan)."""
    n = len(mat)
    rows = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(mat)]
    for c in range(n):
        pivot = next(r for r in range(c, n) if rows[r][c] != 0)
        rows[c], rows[pivot] = rows[pivot], rows[c]
        rows[c] = [x / rows[c][c] for x in rows[c]]
        for r in range(n):
            if r != c and rows[r][c] != 0:
                rows[r] = [x - rows[r][c] * y for x, y in zip(rows[r], rows[c])]
    return [row[n:] for row in rows]


def toom_cook(m: int, r: int) -> tuple[list, list, list]:
    """``(B^T, G, A^T)`` of F(m, r), ``Y = A^T [(G g) * (B^T d)]``, as exact fractions.

    Winograd's correlation is the transpose of Toom-Cook's linear convolution: ``A^T`` evaluates
    powers at the points, ``G`` evaluates the filter, ``B^T`` is the transposed inverse of the
    Vandermonde matrix that interpolates the product. Each point's Lagrange denominator moves
    from ``B^T`` into ``G``, where it is folded into the weights at compile time."""
    n = m + r - 1
    p = [Fraction(x) for x in POINTS[n]]
    one_at = lambda i, k: Fraction(int(i == k))  # noqa: E731  (the point at infinity's row)
    denominators = [prod((p[j] - p[l] for l in range(n - 1) if l != j), start=Fraction(1))
                    for j in range(n - 1)]
    at = [[p[j] ** i for j in range(n - 1)] + [one_at(i, m - 1)] for i in range(m)]
    g = ([[p[j] ** k / denominators[j] for k in range(r)] for j in range(n - 1)]
         + [[one_at(k, r - 1) for k in range(r)]])
    vandermonde = [[p[j] ** k for k in range(n)] for j in range(n - 1)] + [[one_at(k, n - 1) for k in range(n)]]
    inverse = _inverse(vandermonde)
    scale = denominators + [Fraction(1)]
    bt = [[inverse[l][j] * scale[j] for l in range(n)] for j in range(n)]
    return bt, g, at


MATRICES = {(m, r): toom_cook(m, r) for r, ms in TILES.items() for m in ms}


def input_tile(shape: ConvShape, m: int) -> int:
    """``a = m + r - 1``: the side of the input tile an m x m output tile of this layer reads."""
    return m + shape.kh - 1


def supports(shape: ConvShape) -> bool:
    """3x3 or 5x5, stride 1, no dilation, ungrouped, more than one input channel (one has no
    reduction for the GEMMs to block, and its transforms would cost more than they save)."""
    return (shape.kh == shape.kw and shape.kh in TILES and shape.strides == (1, 1)
            and shape.dilation == (1, 1) and shape.groups == 1 and shape.in_channels > 1)


def tiles_for(shape: ConvShape) -> tuple[int, ...]:
    """The output tile sizes m with a kernel for this layer's filter size."""
    return TILES[shape.kh] if supports(shape) else ()


# The rule, measured in the models (interleaved A/B runs of whole networks, per-kernel times from
# the VM's instrument; 2 threads, AVX-512 Zen 4). Batch 1: F(4x4, 3x3) is 2x faster than the
# direct kernel on ResNet-18's 64 @ 56 and 128 @ 28 (F(2x2) 1.5x); at 14, 13 and 7 F(2x2) is the
# faster one (ResNet's 256 @ 14 1.8x the direct kernel, F(4x4) 1.35x; AlexNet's three layers at
# 13 1.4x, F(4x4) 1.2x; ResNet's 512 @ 7 1.1x): 4x4 tiles pad 13 and 14 to 16, and their 4x
# weights (2.25x F(2x2)'s) are read from memory in a model, where a layer alone keeps them in
# cache. F(2x2, 5x5): AlexNet's conv2 and NIN's 5x5 2.1x faster. Whole models, the rule against
# F(4x4) only (weights at most 8x the input): AlexNet 6% faster at batch 1, 11% at batch 8,
# ResNet-18 9% and 9%, VGG-11 3% at batch 8. Limiting the weights (64x the input) only ever cost
# time, so the limit is loose: the layer's whole batch must be worth its transformed weights.
MIN_CHANNELS = 16  # an RGB / narrow first layer: the transforms cost more than they save
# transformed weights (a * a per channel pair) / input elements of the whole batch
MAX_WEIGHT_RATIO = 256  # ResNet-18's 512 @ 7 at batch 1: 167
# the largest work ratio (GEMM multiplications / the direct kernel's) each tile is taken at, by
# (m, r), largest tile first: F(4x4, 3x3) where its tiles fit the image well (0.25 at best),
# else F(2x2, 3x3) (0.44 at best, smaller weights and tiles that pad less); F(2x2, 5x5): 0.36
MAX_WORK_RATIO = {(4, 3): 0.30, (2, 3): 0.60, (2, 5): 0.45}


def work_ratio(shape: ConvShape, m: int) -> float:
    """The GEMMs' multiply-adds over the direct kernel's: ``a * a`` per m x m tile (the last
    tiles partly padding) against ``r * r`` per output pixel."""
    oh, ow = shape.out_size
    return tile_count(shape, m) * input_tile(shape, m) ** 2 / (shape.kh * shape.kw * oh * ow)


def rule_tile(shape: ConvShape) -> int:
    """The rule's choice: the largest output tile m whose work ratio is within its limit and
    whose transformed weights are not large beside the batch's input (a weight-bound layer waits
    for them); 0 (the direct kernel) where none is, or for an unsupported or narrow layer."""
    if not supports(shape) or min(shape.in_channels, shape.out_channels) < MIN_CHANNELS:
        return 0
    batch = shape.batch if isinstance(shape.batch, int) else 1
    image = batch * shape.in_channels * shape.height * shape.width
    for m in sorted(tiles_for(shape), reverse=True):
        a = input_tile(shape, m)
        if (work_ratio(shape, m) <= MAX_WORK_RATIO[m, shape.kh]
                and shape.out_channels * shape.in_channels * a * a <= MAX_WEIGHT_RATIO * image):
            return m
    return 0


def winograd_pays(shape: ConvShape) -> bool:
    """Whether the rule takes Winograd for this layer (:func:`rule_tile`)."""
    return rule_tile(shape) > 0


def winograd_knobs(shape: ConvShape, direct: ConvKnobs, m: int) -> ConvKnobs:
    """F(m x m, r x r) with the channel blocks of the direct kernel's knobs ``direct``, and as many
    tiles in registers as it holds pixels (fewer where that pads less)."""
    return ConvKnobs(oc_block=direct.oc_block, ic_block=direct.ic_block,
                     ow_tile=conv_cpu._tile(tile_count(shape, m), direct.ow_tile), winograd=m)


def tile_count(shape: ConvShape, m: int) -> int:
    """The m x m output tiles of one image."""
    _, _, th, tw = _geometry(shape, m)
    return th * tw


def _geometry(shape: ConvShape, m: int):
    oh, ow = shape.out_size
    return oh, ow, _ceil_div(oh, m), _ceil_div(ow, m)


def pack_weight(kernel: np.ndarray, shape: ConvShape, knobs: ConvKnobs) -> np.ndarray:
    """``W[O, I, r, r]`` -> ``U[a*a, O/ob, I/ib, ib, ob]``, ``U[e = eps*a + nu] = (G W G^T)[eps, nu]``
    (computed in float64), zero-padded to whole channel blocks."""
    _, g, _ = MATRICES[knobs.winograd, shape.kh]
    g = np.asarray(g, np.float64)
    a = g.shape[0]
    o, i = kernel.shape[:2]
    ob, ib = knobs.oc_block, knobs.ic_block
    occ, icc = _ceil_div(o, ob), _ceil_div(i, ib)
    u = np.einsum("er,oirs,fs->efoi", g, kernel.astype(np.float64), g).reshape(a * a, o, i)
    out = np.zeros((a * a, occ * ob, icc * ib), np.float32)
    out[:, :o, :i] = u
    return np.ascontiguousarray(out.reshape(a * a, occ, ob, icc, ib).transpose(0, 1, 3, 4, 2))


def _combine(row, read):
    """``sum_r row[r] * read(r)`` over the nonzero coefficients, as a constant-folded expression."""
    total = None
    for r, c in enumerate(row):
        if c == 0:
            continue
        v = read(r)
        term = v if c == 1 else (-v if c == -1 else v * tirx.const(float(c), F32))
        total = term if total is None else total + term
    return total


def _select(index, values: list):
    """``values[index]`` for an index that the schedule unrolls (the chain then folds away)."""
    out = values[-1]
    for k in range(len(values) - 2, -1, -1):
        out = tirx.Select(index == k, values[k], out)
    return out


def _transform(mat, index, read):
    """``sum_r mat[index][r] * read(r)`` for an unrolled ``index``: one of a matrix's rows."""
    return _select(index, [_combine(row, read) for row in mat])


def conv2d_compute(shape: ConvShape, knobs: ConvKnobs, relu: bool, residual: bool = False,
                   pool: Pool | None = None, io: ConvIO = conv_cpu.NCHW):
    """TE tensors ``(data, weight, bias[, residual], out)``, as ``conv_cpu.conv2d_compute``."""
    m = knobs.winograd
    bt, _, at = MATRICES[m, shape.kh]
    a = input_tile(shape, m)
    ob, ib = knobs.oc_block, knobs.ic_block
    occ, icc = _ceil_div(shape.out_channels, ob), _ceil_div(shape.in_channels, ib)
    oh, ow, th, tw = _geometry(shape, m)
    tiles = th * tw
    padded_tiles = _ceil_div(tiles, knobs.ow_tile) * knobs.ow_tile
    n_ = conv_cpu._batch(shape)

    data = conv_cpu._data_placeholder(shape, n_, io.data)
    weight = te.placeholder((a * a, occ, icc, ib, ob), F32, name="weight")
    bias = te.placeholder((occ, ob), F32, name="bias")

    def in_channel_of(c, b):
        within = c * ib + b
        return tirx.min(within, shape.in_channels - 1), within < shape.in_channels

    packed = conv_cpu.pack_data(data, shape, icc, ib, (th - 1) * m + a, (tw - 1) * m + a, in_channel_of, io.data)

    # the transforms are separable: B^T d B is B^T applied to the rows, then to the columns
    # (half the operations of the 2-D sum, and small expressions for the compiler)
    def input_rows(n, c, t, eps, s, b):
        q = tirx.min(t, tiles - 1)  # padding tiles repeat the last one (never stored)
        y0, x0 = q // tw * m, q % tw * m
        return _transform(bt, eps, lambda r: packed[n, c, y0 + r, x0 + s, b])

    rows = te.compute((n_, icc, padded_tiles, a, a, ib), input_rows, name="wino_in_rows")
    v = te.compute((n_, a * a, icc, padded_tiles, ib),
                   lambda n, e, c, t, b: _transform(bt, e % a, lambda s: rows[n, c, t, e // a, s, b]),
                   name="wino_in")
    rc = te.reduce_axis((0, icc), name="rc")
    rb = te.reduce_axis((0, ib), name="rb")
    gemm = te.compute((n_, a * a, occ, padded_tiles, ob),
                      lambda n, e, oc, t, o: te.sum(v[n, e, rc, t, rb] * weight[e, oc, rc, rb, o], axis=[rc, rb]),
                      name="wino_gemm")

    out_rows = te.compute((n_, occ, padded_tiles, m, a, ob),
                          lambda n, oc, t, i, s, o: _transform(at, i, lambda r: gemm[n, r * a + s, oc, t, o]),
                          name="wino_out_rows")
    tile_out = te.compute((n_, occ, padded_tiles, m * m, ob),
                          lambda n, oc, t, j, o: _transform(at, j % m, lambda s: out_rows[n, oc, t, j // m, s, o]),
                          name="wino_out")

    def gathered(n, oc, p, o):
        y, x = p // ow, p % ow
        return tile_out[n, oc, y // m * tw + x // m, y % m * m + x % m, o]

    conv = te.compute((n_, occ, oh * ow, ob), gathered, name="wino_gather")

    def out_channel_of(oc, o):
        within = oc * ob + o
        return tirx.min(within, shape.out_channels - 1), within < shape.out_channels

    extra, out = conv_cpu.epilogue_and_unpack(shape, conv, bias, relu, residual, out_channel_of,
                                              lambda c: (c // ob, c % ob), pool, io)
    return [data, weight, bias] + extra + [out]


def conv2d_kernel(shape: ConvShape, knobs: ConvKnobs, relu: bool = False, residual: bool = False,
                  pool: Pool | None = None, io: ConvIO = conv_cpu.NCHW) -> tirx.PrimFunc:
    """The scheduled ``PrimFunc``, parameters as ``conv_cpu.conv2d_kernel``'s (the weight from
    :func:`pack_weight`, the bias from ``conv_cpu.pack_bias``)."""
    if knobs.winograd not in tiles_for(shape):
        raise ValueError(f"no Winograd F({knobs.winograd}, {shape.kh}) kernel for {shape}")
    func = te.create_prim_func(conv2d_compute(shape, knobs, relu, residual, pool, io))
    return conv_cpu.finish_kernel(schedule(func, shape, knobs, pool, io))


def schedule(func: tirx.PrimFunc, shape: ConvShape, knobs: ConvKnobs, pool: Pool | None,
             io: ConvIO) -> tirx.PrimFunc:
    sch = tvm.s_tir.Schedule(func)
    conv_cpu.schedule_pack(sch, knobs.ic_block, io)

    # input transform: threads over (batch, channel chunk, tile); per tile all a*a outputs
    # from one a x a window of channel vectors
    tin = sch.get_sblock("wino_in")
    n, e, c, t, b = sch.get_loops(tin)
    sch.reorder(n, c, t, e, b)
    sch.parallel(sch.fuse(n, c, t))
    sch.unroll(e)
    sch.vectorize(b)
    rows = sch.get_sblock("wino_in_rows")
    sch.compute_at(rows, sch.get_loops(tin)[0])  # a tile's a x a x ib rows, in L1
    _, eps, s_, b = sch.get_loops(rows)
    sch.unroll(eps)
    sch.unroll(s_)
    sch.vectorize(b)

    # GEMMs and output transform: a thread task is (batch, channel block, ow_tile tiles); it
    # runs the a*a GEMMs of its tiles (accumulators: ow_tile x oc_block in registers), then
    # transforms their outputs while they are in cache
    tout = sch.get_sblock("wino_out")
    gemm = sch.get_sblock("wino_gemm")
    n, oc, t, j, o = sch.get_loops(tout)
    to, ti = sch.split(t, [None, knobs.ow_tile])
    task = sch.fuse(n, oc, to)
    sch.parallel(task)
    out_rows = sch.get_sblock("wino_out_rows")
    sch.compute_at(out_rows, ti)  # one tile's m x a rows, from the GEMMs' results in cache
    i, s_, o_ = sch.get_loops(out_rows)[-3:]
    sch.unroll(i)
    sch.unroll(s_)
    sch.vectorize(o_)
    sch.compute_at(gemm, task)
    # under the task: e, the tiles, the channel block, then the reduction (rc, rb); compute_at
    # drops the loops of extent 1
    a = input_tile(shape, knobs.winograd)
    order = [("e", a * a), ("t", knobs.ow_tile), ("o", knobs.oc_block),
             ("rc", _ceil_div(shape.in_channels, knobs.ic_block)), ("rb", knobs.ic_block)]
    present = [name for name, extent in order if extent > 1]
    loops = dict(zip(present, sch.get_loops(gemm)[-len(present):]))
    sch.reorder(*[loops[k] for k in ("e", "rc", "rb", "t", "o") if k in loops])
    if "t" in loops:
        sch.unroll(loops["t"])
    sch.vectorize(loops["o"])
    sch.decompose_reduction(gemm, loops["rc"] if "rc" in loops else loops["rb"])
    il = sch.get_loops(sch.get_sblock("wino_gemm_init"))
    sch.vectorize(il[-1])
    if "t" in loops:
        sch.unroll(il[-2])
    sch.unroll(j)
    sch.vectorize(o)

    # gather + epilogue: threads over (batch, channel block, rows of positions)
    sch.compute_inline(sch.get_sblock("wino_gather"))
    epi = sch.get_sblock("epilogue")
    n, oc, p, o = sch.get_loops(epi)
    oh, ow = shape.out_size
    rows, _ = sch.split(p, [oh, ow])
    sch.parallel(sch.fuse(n, oc, rows))
    sch.vectorize(o)
    return conv_cpu.schedule_pool_and_unpack(sch, knobs.oc_block, pool, io, shape.out_size)
