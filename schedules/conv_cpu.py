"""Dense, grouped and depthwise 2-D convolution kernels for LLVM CPU targets (NeoCPU style).

The layout is NCHW[x]c (Liu et al., "Optimizing CNN Model Inference on CPUs", USENIX ATC 2019):
channels are split into blocks of ``c`` that are the innermost (contiguous) axis, so that one
vector load takes ``c`` consecutive output channels of one weight position and one FMA updates
``c`` output channels of one output pixel.

* Weights are packed once, at compile time, in numpy (:func:`pack_weight`):
  ``OIHW -> [O/oc_block, I/ic_block, KH, KW, ic_block, oc_block]``, zero-padded where a channel
  count is not a multiple of its block (zeros never change a result).
* The data is packed (and zero-padded by the conv's padding) into ``[N, C/ic_block, Hp, Wp,
  ic_block]`` by the first stage of the kernel.
* The micro-kernel holds an ``ow_tile x oc_block`` tile of outputs in vector registers
  (``ow_tile * oc_block / lanes`` accumulators; the tile runs over the flattened ``OH x OW``
  positions, so it may span rows and only the image's last tile is padded), and for each
  ``(ic chunk, kh, kw, ic)`` loads ``oc_block / lanes`` weight vectors, broadcasts ``ow_tile``
  input scalars and issues ``ow_tile * oc_block / lanes`` FMAs on full vectors (AVX2: 6 x 2
  ymm = 12 accumulators; AVX-512: 14 x 2 zmm). Threads take ``(batch, oc chunk, tile)``
  tasks. Bias, ReLU and a residual input are applied to the tile before it is stored.
* The output is unpacked back to NCHW by the last stage, unless the next layers are conv
  layers too (:class:`ConvIO`): then the output stays blocked, ``[N, O/ob, positions, ob]``,
  and the next kernel's packing is a vector copy that adds the padding. (Measured, 2 threads,
  AVX-512: ResNet-18's 1x1 shortcuts 21% faster, its 3x3 layers 1-2%; the whole model at
  batch 1 ~10% faster together with the task-order rule.)

Depthwise convolutions (one input channel per output channel) are blocked over channels the
same way, with the channel block vectorized and an output-width tile in registers.

All kernels are TE computes scheduled with ``tvm.s_tir.Schedule``; their knobs are
:class:`ConvKnobs`, with defaults from :func:`default_conv_knobs`. 3x3 stride-1 layers may run
Winograd's algorithm instead (``conv_winograd.py``, ``ConvKnobs.winograd``), which shares the
packing, the epilogue and the layouts defined here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import te, tirx

F32 = "float32"


@dataclass(frozen=True)
class ConvShape:
    """One 2-D convolution, NCHW data and OIHW weight (``I = C / groups``)."""

    batch: int | tirx.PrimExpr  # symbolic when the model's batch is
    in_channels: int
    height: int
    width: int
    out_channels: int
    kh: int
    kw: int
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def out_size(self) -> tuple[int, int]:
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.strides, self.dilation, self.padding
        return ((self.height + pt + pb - dh * (self.kh - 1) - 1) // sh + 1,
                (self.width + pl + pr - dw * (self.kw - 1) - 1) // sw + 1)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def macs(self) -> int:
        oh, ow = self.out_size
        batch = self.batch if isinstance(self.batch, int) else 1
        return batch * self.out_channels * oh * ow * (self.in_channels // self.groups) * self.kh * self.kw


@dataclass(frozen=True)
class Pool:
    """A max or average pooling that follows the convolution (after its bias, residual and
    ReLU), fused into the kernel: it reads the blocked output while it is in cache, vectorized
    over the channel block, and only the pooled (smaller) tensor is unpacked to NCHW (or it
    stays blocked for the next conv: NIN's and ConvNet's ceil-mode pools no longer cut the
    chain of blocked layers).

    ``ceil_mode``: the output size rounds up, as ONNX, PyTorch, onnxruntime and TVM do, except
    that a last window starting past the image and its leading padding is dropped.
    ``count_include_pad`` (average): the divisor counts the explicit padding (never the
    ceil-mode overhang), as onnxruntime does; otherwise only the pixels inside the image."""

    size: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    ceil_mode: bool = False
    average: bool = False
    count_include_pad: bool = False

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return (_pooled(height, self.size[0], self.strides[0], self.padding[0], self.padding[2], self.ceil_mode),
                _pooled(width, self.size[1], self.strides[1], self.padding[1], self.padding[3], self.ceil_mode))


def _pooled(extent: int, k: int, stride: int, before: int, after: int, ceil_mode: bool) -> int:
    span = extent + before + after - k
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= extent + before:  # the last window would start in the padding
        out -= 1
    return out


@dataclass(frozen=True)
class ConvKnobs:
    """Schedule knobs of the conv kernels (what autotuning may search).

    oc_block: output channels of one register block (a multiple of the target's lanes);
        for depthwise, the channel block.
    ic_block: input channels of one packed data block (the innermost reduction loop).
    ow_tile: output pixels held in registers at once (consecutive positions of the flattened
        ``OH x OW`` output, so a tile may span rows and only the last one is padded).
    unroll_kw: unroll the kernel-width loop (more independent work per iteration).
    """

    oc_block: int
    ic_block: int
    ow_tile: int
    unroll_kw: bool = False
    # cache blocking: a thread task takes tiles_per_task tiles, and runs the reduction over
    # ic_step input-channel chunks at a time across all of them (0: all chunks at once), so a
    # step's weights stay in L1 while the task's accumulators go to memory between steps
    tiles_per_task: int = 1
    ic_step: int = 0
    # thread tasks ordered positions-major (consecutive tasks share the input tile and cycle
    # through the weights: for images larger than the weights) or channel-major (the weights
    # of one output-channel block stay in cache while the image streams by)
    positions_outer: bool = False
    # Winograd F(m x m, 3 x 3) (``conv_winograd``; 3x3 stride-1 convs only): m = 2 or 4, 0 for
    # the direct kernel. ow_tile then counts m x m tiles, not pixels
    winograd: int = 0


@dataclass(frozen=True)
class Blocked:
    """A tensor in the kernels' blocked layout ``[N, ceil(C / block), positions, block]``:
    channel ``c`` of pixel ``(y, x)`` is at ``[n, c // block, y * W + x, c % block]``. Positions
    past ``H * W`` (the padding of a last tile) are never read; channels past ``C`` are zeros."""

    block: int
    positions: int


@dataclass(frozen=True)
class ConvIO:
    """Where a conv kernel's tensors are blocked rather than NCHW: its data, its residual input
    (either as another kernel wrote it), and its output (``blocked_out``: the layout
    :func:`output_layout` gives). Conv layers that feed only conv layers pass their outputs on
    blocked, so that the next layer's packing is a copy and the unpacking goes (NeoCPU keeps
    NCHW[x]c between layers the same way)."""

    data: Blocked | None = None
    residual: Blocked | None = None
    blocked_out: bool = False


NCHW = ConvIO()


def output_layout(shape: "ConvShape", knobs: "ConvKnobs", pool: "Pool | None" = None) -> Blocked:
    """The layout of the kernel's output with ``blocked_out``: the tiles' positions (the last
    tile padded) in blocks of ``oc_block``, or the pooled image's."""
    if pool is not None:
        ph, pw = pool.out_size(*shape.out_size)
        return Blocked(knobs.oc_block, ph * pw)
    if knobs.winograd:
        oh, ow = shape.out_size
        return Blocked(knobs.oc_block, oh * ow)
    return Blocked(knobs.oc_block, _geometry(shape, knobs)[2])


def vector_registers(lanes: int, x86: bool = True) -> int:
    """Architectural vector registers: SSE / AVX2 have 16 xmm / ymm, AVX-512 32 zmm, AArch64
    NEON 32 q."""
    return 32 if lanes >= 16 or not x86 else 16


def _best_tile(width: int, candidates) -> int:
    """The tile from ``candidates`` (largest first) wasting the fewest padded columns; among
    equal waste, the largest."""
    best, best_cost = None, None
    for t in candidates:
        cost = math.ceil(width / t) * t
        if best_cost is None or cost < best_cost:
            best, best_cost = t, cost
    return best


def default_conv_knobs(shape: ConvShape, lanes: int, registers: int | None = None) -> ConvKnobs:
    """The direct kernel's rule (the target rules choose Winograd instead where
    ``conv_winograd.winograd_pays``): ``oc_block`` two vectors (one when a group has at most
    ``lanes`` output channels); ``ow_tile`` (output pixels, flattened over rows) as large as the register file
    allows with the weight vectors and one broadcast beside the accumulators (LLVM spills
    beyond: 7 x 2 ymm ran 2x slower than 5 x 2 on AVX2), shrunk by up to 2 where that wastes
    fewer padded positions; ``ic_block`` up to two vectors' worth of input channels."""
    lanes = max(lanes, 1)
    regs = registers or vector_registers(lanes)
    oh, ow = shape.out_size
    positions = oh * ow
    if shape.depthwise:
        cb = lanes * (2 if shape.in_channels >= 2 * lanes else 1)
        vecs = cb // lanes
        # per output pixel one accumulator a vector (the input vector is an FMA memory
        # operand), the kernel tap's weight vectors, one spare
        max_tile = max(1, (regs - vecs) // vecs - 1)
        return ConvKnobs(oc_block=cb, ic_block=cb, ow_tile=_tile(positions, max_tile))
    ocg = shape.out_channels // shape.groups
    icg = shape.in_channels // shape.groups
    vecs = 2 if ocg > lanes else 1
    max_tile = max(1, (regs - vecs - 1) // vecs)
    ic_block = icg if icg <= lanes * 2 else _largest_divisor(icg, lanes * 2) or lanes
    # A short innermost reduction (RGB input: 3 channels) is loop overhead: unrolling kw over
    # it ran AlexNet's, VGG's and ResNet's first layers 10-35% faster (1 thread, AVX2).
    unroll_kw = ic_block <= 4
    if unroll_kw and regs >= 32:
        # With kw unrolled LLVM keeps the broadcasts that neighbouring taps share live; beside
        # 14 x 2 zmm accumulators they spill. Half the tile: ResNet's stem (7x7 s2) 1.7x,
        # VGG's 1.5x and AlexNet's 5% faster (1 thread, AVX-512).
        max_tile = max(1, max_tile // 2)
    tile = _tile(positions, max_tile)
    # Cache blocking where the weights of one output-channel block outgrow L1 and the image
    # is large: measured (1 thread, AVX2) 15-20% faster on VGG's 256->256 @56, slower on
    # ResNet's 512 @7 and AlexNet's 384->256 @13 (too few positions to reuse the weights).
    # Task order: threads split the image where the weights are small beside it (each thread
    # then reads half the image and all the weights), else the output channels. Measured (2
    # threads, AVX-512, blocked in and out): positions-major 5-28% faster on ResNet's layers at
    # 56 and 28 and its 1x1 shortcuts (weights <= 2.9x the input), 9-38% slower on the 5x5 and
    # 3x3 layers at 27 and below (weights >= 5.9x the input).
    all_weights = shape.out_channels * icg * shape.kh * shape.kw
    positions_outer = all_weights <= POSITIONS_OUTER_MAX_WEIGHT_RATIO * shape.in_channels * shape.height * shape.width
    weight_bytes = icg * shape.kh * shape.kw * lanes * vecs * 4
    if positions >= BLOCKING_MIN_POSITIONS and weight_bytes > BLOCKING_MIN_WEIGHT_BYTES:
        step = max(1, BLOCKING_STEP_CHANNELS // ic_block)
        return ConvKnobs(oc_block=lanes * vecs, ic_block=ic_block, ow_tile=tile, unroll_kw=unroll_kw,
                         tiles_per_task=8, ic_step=step, positions_outer=positions_outer)
    return ConvKnobs(oc_block=lanes * vecs, ic_block=ic_block, ow_tile=tile, unroll_kw=unroll_kw,
                     positions_outer=positions_outer)


POSITIONS_OUTER_MAX_WEIGHT_RATIO = 4  # weights / input elements (both at one image)


BLOCKING_MIN_POSITIONS = 1024
BLOCKING_MIN_WEIGHT_BYTES = 64 * 1024
BLOCKING_STEP_CHANNELS = 32  # input channels per cache-blocked reduction step (18 KiB at 3x3)


def _tile(positions: int, max_tile: int) -> int:
    """``max_tile`` unless it pads more than 3% of the positions; then the tile (down to
    ``max_tile - 2``) that pads fewest."""
    if positions <= max_tile:
        return positions
    if _ceil_div(positions, max_tile) * max_tile <= positions * 1.03:
        return max_tile
    return _best_tile(positions, range(max_tile, max(1, max_tile - 2) - 1, -1))


def _largest_divisor(n: int, at_most: int) -> int | None:
    for d in range(at_most, max(at_most // 4, 1) - 1, -1):
        if n % d == 0:
            return d
    return None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------
# Weights, packed in numpy at compile time
# ----------------------------------------------------------------------------------------------


def pack_weight(kernel: np.ndarray, shape: ConvShape, knobs: ConvKnobs) -> np.ndarray:
    """``W[O, I, KH, KW]`` -> ``[G, OCg/ob, ICg/ib, KH, KW, ib, ob]`` (groups=1: G = 1),
    zero-padded to whole blocks; for depthwise, ``[C/cb, KH, KW, cb]``."""
    o, i, kh, kw = kernel.shape
    if shape.depthwise:
        cb = knobs.oc_block
        cc = _ceil_div(o, cb)
        w = np.zeros((cc * cb, kh, kw), np.float32)
        w[:o] = kernel[:, 0]
        return np.ascontiguousarray(w.reshape(cc, cb, kh, kw).transpose(0, 2, 3, 1))
    g = shape.groups
    ocg, icg = o // g, i
    ob, ib = knobs.oc_block, knobs.ic_block
    occ, icc = _ceil_div(ocg, ob), _ceil_div(icg, ib)
    w = np.zeros((g, occ * ob, icc * ib, kh, kw), np.float32)
    w[:, :ocg, :icg] = kernel.reshape(g, ocg, icg, kh, kw)
    w = w.reshape(g, occ, ob, icc, ib, kh, kw).transpose(0, 1, 3, 5, 6, 4, 2)
    return np.ascontiguousarray(w)


def pack_bias(bias: np.ndarray | None, shape: ConvShape, knobs: ConvKnobs) -> np.ndarray:
    """The bias in the blocked output channel order, ``[G * OCg/ob, ob]`` (zeros in padding)."""
    o = shape.out_channels
    bias = np.zeros(o, np.float32) if bias is None else bias.astype(np.float32)
    if shape.depthwise:
        cb = knobs.oc_block
        out = np.zeros(_ceil_div(o, cb) * cb, np.float32)
        out[:o] = bias
        return out.reshape(-1, cb)
    g, ob = shape.groups, knobs.oc_block
    ocg = o // g
    occ = _ceil_div(ocg, ob)
    out = np.zeros((g, occ * ob), np.float32)
    out[:, :ocg] = bias.reshape(g, ocg)
    return out.reshape(g * occ, ob)


# ----------------------------------------------------------------------------------------------
# TE computes
# ----------------------------------------------------------------------------------------------


def _geometry(shape: ConvShape, knobs: ConvKnobs):
    """Output positions (padded to whole tiles) and the packed input's extent."""
    oh, ow = shape.out_size
    task = knobs.ow_tile * knobs.tiles_per_task
    positions = _ceil_div(oh * ow, task) * task
    (sh, sw), (dh, dw) = shape.strides, shape.dilation
    hp = (oh - 1) * sh + (shape.kh - 1) * dh + 1
    wp = (ow - 1) * sw + (shape.kw - 1) * dw + 1
    return oh, ow, positions, hp, wp


def _pixel(p, oh: int, ow: int):
    """Output row and column of flattened position ``p``; the padding positions past the last
    tile repeat the last pixel (computed, never stored)."""
    q = tirx.min(p, oh * ow - 1)
    return q // ow, q % ow


def _data_placeholder(shape: ConvShape, n_, layout: Blocked | None) -> te.Tensor:
    if layout is None:
        return te.placeholder((n_, shape.in_channels, shape.height, shape.width), F32, name="data")
    return te.placeholder((n_, _ceil_div(shape.in_channels, layout.block), layout.positions,
                           layout.block), F32, name="data")


def pack_data(data: te.Tensor, shape: ConvShape, chunks: int, block: int, hp: int, wp: int,
               channel_of, layout: Blocked | None = None) -> te.Tensor:
    """``packed[n, c, y, x, b] = data[n, channel_of(c, b), y - pt, x - pl]``, zero outside the
    image and in padded channels; ``data`` NCHW, or blocked by ``layout`` (in blocks of
    ``block`` too, and ungrouped: a copy of whole blocks that only adds the padding)."""
    pt, pl = shape.padding[0], shape.padding[1]
    h, w = shape.height, shape.width
    same_blocks = layout is not None and layout.block == block and shape.groups == 1

    def value(n, c, y, x, b):
        iy, ix = y - pt, x - pl
        if same_blocks:  # the producer's padded channels are zeros already
            inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
            return tirx.if_then_else(inside, data[n, c, iy * w + ix, b], tirx.const(0.0, F32))
        ch, valid = channel_of(c, b)
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w, valid)
        if layout is None:
            v = data[n, ch, iy, ix]
        else:
            v = data[n, ch // layout.block, iy * w + ix, ch % layout.block]
        return tirx.if_then_else(inside, v, tirx.const(0.0, F32))

    return te.compute((data.shape[0], chunks, hp, wp, block), value, name="data_pack")


def reads_blocked_data(shape: ConvShape, knobs: ConvKnobs, io: ConvIO) -> bool:
    """Whether the kernel reads its blocked data in place, without a packing stage: blocks of
    its own ``ic_block``, ungrouped, and no padding to add (1x1 convs, unpadded ones)."""
    return (io.data is not None and io.data.block == knobs.ic_block and shape.groups == 1
            and not any(shape.padding))


def _batch(shape: ConvShape):
    """The batch extent: the int, or a fresh variable of the kernel's own (bound from the
    data's shape at the call)."""
    return shape.batch if isinstance(shape.batch, int) else te.var("batch")


def epilogue_and_unpack(shape: ConvShape, conv: te.Tensor, bias: te.Tensor, relu: bool,
                         residual: bool, channel_of, chunk_block, pool: Pool | None = None,
                         io: ConvIO = NCHW):
    """``blocked[n, oc, p, o] = act(conv + bias [+ residual])``, pooled by ``pool`` in the
    blocked layout, then NCHW ``out`` (``io.blocked_out``: the blocked tensor is the output).
    ``channel_of(oc, o)``: (NCHW channel, valid); ``chunk_block(c)``: (oc chunk, o) of channel c."""
    n_, chunks, positions, block = conv.shape
    oh, ow = shape.out_size
    extra = []
    rl = io.residual
    if residual:
        res_shape = ((n_, shape.out_channels, oh, ow) if rl is None else
                     (n_, _ceil_div(shape.out_channels, rl.block), rl.positions, rl.block))
        res = te.placeholder(res_shape, F32, name="residual")
        extra = [res]

    def residual_value(n, oc, p, o):
        if rl is not None and rl.block == block and shape.groups == 1:
            # same blocks: padded channels are zeros, the padded positions are never stored
            return res[n, oc, tirx.min(p, min(rl.positions, oh * ow) - 1), o]
        ch, valid = channel_of(oc, o)
        y, x = _pixel(p, oh, ow)
        v = res[n, ch, y, x] if rl is None else res[n, ch // rl.block, y * ow + x, ch % rl.block]
        return tirx.if_then_else(valid, v, tirx.const(0.0, F32))

    def epi(n, oc, p, o):
        v = conv[n, oc, p, o] + bias[oc, o]
        if residual:
            v = v + residual_value(n, oc, p, o)
        return tirx.max(v, tirx.const(0.0, F32)) if relu else v

    blocked = te.compute((n_, chunks, positions, block), epi, name="epilogue")
    if pool is None and io.blocked_out:
        return extra, blocked
    if pool is None:
        def unpack(n, c, y, x):
            chunk, o = chunk_block(c)
            return blocked[n, chunk, y * ow + x, o]

        return extra, te.compute((n_, shape.out_channels, oh, ow), unpack, name="unpack")

    ph, pw = pool.out_size(oh, ow)
    pooled_value = _pool_value(pool, blocked, oh, ow, pw)
    pooled = te.compute((n_, chunks, ph * pw, block), pooled_value, name="pool")
    if io.blocked_out:
        return extra, pooled

    def unpack_pooled(n, c, y, x):
        chunk, o = chunk_block(c)
        return pooled[n, chunk, y * pw + x, o]

    return extra, te.compute((n_, shape.out_channels, ph, pw), unpack_pooled, name="unpack")


def _pool_value(pool: Pool, blocked: te.Tensor, oh: int, ow: int, pw: int):
    """``value(n, oc, q, o)``: the pooled window ``q`` (flattened over the ``pw``-wide pooled
    image) of the blocked ``oh x ow`` image. The window's taps are unrolled; a tap outside the
    image reads a clamped pixel and is masked (``-inf``-like for max, 0 for the sum)."""
    (kh, kw), (psh, psw), (pt, pl, pb, pr) = pool.size, pool.strides, pool.padding
    lowest = tirx.const(-3.4028234663852886e38, F32)  # never the max: each window meets the image
    zero = tirx.const(0.0, F32)
    may_overhang = pool.ceil_mode or any(pool.padding)

    def value(n, oc, q, o):
        y, x = q // pw, q % pw
        y0, x0 = y * psh - pt, x * psw - pl
        acc = None
        for dy in range(kh):
            for dx in range(kw):
                iy, ix = y0 + dy, x0 + dx
                v = blocked[n, oc, tirx.max(tirx.min(iy, oh - 1), 0) * ow + tirx.max(tirx.min(ix, ow - 1), 0), o]
                if may_overhang:
                    v = tirx.if_then_else(tirx.all(iy >= 0, iy < oh, ix >= 0, ix < ow), v,
                                          zero if pool.average else lowest)
                acc = v if acc is None else (acc + v if pool.average else tirx.max(acc, v))
        if not pool.average:
            return acc
        if pool.count_include_pad:  # the window clipped to the padded image (not the overhang)
            rows = tirx.min(y0 + kh, oh + pb) - y0
            cols = tirx.min(x0 + kw, ow + pr) - x0
        else:  # the window clipped to the image
            rows = tirx.min(y0 + kh, oh) - tirx.max(y0, 0)
            cols = tirx.min(x0 + kw, ow) - tirx.max(x0, 0)
        return acc / (rows * cols).astype(F32)

    return value


def conv2d_compute(shape: ConvShape, knobs: ConvKnobs, relu: bool, residual: bool = False,
                   pool: Pool | None = None, io: ConvIO = NCHW):
    """TE tensors ``(data, weight, bias[, residual], out)`` of a dense or grouped conv."""
    g = shape.groups
    ocg, icg = shape.out_channels // g, shape.in_channels // g
    ob, ib = knobs.oc_block, knobs.ic_block
    occ, icc = _ceil_div(ocg, ob), _ceil_div(icg, ib)
    oh, ow, positions, hp, wp = _geometry(shape, knobs)
    (sh, sw), (dh, dw) = shape.strides, shape.dilation
    n_ = _batch(shape)

    data = _data_placeholder(shape, n_, io.data)
    weight = te.placeholder((g, occ, icc, shape.kh, shape.kw, ib, ob), F32, name="weight")
    bias = te.placeholder((g * occ, ob), F32, name="bias")

    def in_channel_of(c, b):  # c runs over G * icc chunks
        grp, cc = c // icc, c % icc
        within = cc * ib + b
        return grp * icg + tirx.min(within, icg - 1), within < icg

    if reads_blocked_data(shape, knobs, io):
        # the producer's blocks are the packed layout already, less the padding, of which
        # there is none: read them in place (1x1 convs: a whole copy of the input saved)
        def read(n, c, y, x, b):
            return data[n, c, y * shape.width + x, b]
    else:
        packed = pack_data(data, shape, g * icc, ib, hp, wp, in_channel_of, io.data)

        def read(n, c, y, x, b):
            return packed[n, c, y, x, b]
    rc = te.reduce_axis((0, icc), name="rc")
    ry = te.reduce_axis((0, shape.kh), name="ry")
    rx = te.reduce_axis((0, shape.kw), name="rx")
    rb = te.reduce_axis((0, ib), name="rb")

    def conv_value(n, oc, p, o):
        y, x = _pixel(p, oh, ow)
        return te.sum(read(n, (oc // occ) * icc + rc, y * sh + ry * dh, x * sw + rx * dw, rb)
                      * weight[oc // occ, oc % occ, rc, ry, rx, rb, o], axis=[rc, ry, rx, rb])

    conv = te.compute((n_, g * occ, positions, ob), conv_value, name="conv")

    def out_channel_of(oc, o):
        within = (oc % occ) * ob + o
        return (oc // occ) * ocg + tirx.min(within, ocg - 1), within < ocg

    def chunk_block(c):
        grp, co = c // ocg, c % ocg
        return grp * occ + co // ob, co % ob

    extra, out = epilogue_and_unpack(shape, conv, bias, relu, residual, out_channel_of, chunk_block,
                                      pool, io)
    return [data, weight, bias] + extra + [out]


def depthwise_compute(shape: ConvShape, knobs: ConvKnobs, relu: bool, residual: bool = False,
                      pool: Pool | None = None):
    """TE tensors ``(data, weight, bias[, residual], out)`` of a depthwise conv."""
    cb = knobs.oc_block
    c_ = shape.in_channels
    cc = _ceil_div(c_, cb)
    oh, ow, positions, hp, wp = _geometry(shape, knobs)
    (sh, sw), (dh, dw) = shape.strides, shape.dilation
    n_ = _batch(shape)
    data = te.placeholder((n_, c_, shape.height, shape.width), F32, name="data")
    weight = te.placeholder((cc, shape.kh, shape.kw, cb), F32, name="weight")
    bias = te.placeholder((cc, cb), F32, name="bias")

    def channel_of(c, b):
        ch = c * cb + b
        return tirx.min(ch, c_ - 1), ch < c_

    packed = pack_data(data, shape, cc, cb, hp, wp, channel_of)
    ry = te.reduce_axis((0, shape.kh), name="ry")
    rx = te.reduce_axis((0, shape.kw), name="rx")

    def conv_value(n, c, p, b):
        y, x = _pixel(p, oh, ow)
        return te.sum(packed[n, c, y * sh + ry * dh, x * sw + rx * dw, b] * weight[c, ry, rx, b], axis=[ry, rx])

    conv = te.compute((n_, cc, positions, cb), conv_value, name="conv")
    extra, out = epilogue_and_unpack(shape, conv, bias, relu, residual, channel_of,
                                      lambda c: (c // cb, c % cb), pool)
    return [data, weight, bias] + extra + [out]


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


def _schedule(func: tirx.PrimFunc, knobs: ConvKnobs, depthwise: bool, kh: int, kw: int,
              icc: int, pool: Pool | None = None, io: ConvIO = NCHW,
              out_size: tuple[int, int] = (0, 0), direct: bool = False) -> tirx.PrimFunc:
    sch = tvm.s_tir.Schedule(func)
    # data packing (none where the kernel reads blocked data in place: ``direct``): threads
    # over (n, chunk, row); from NCHW the (x, b) loops stay serial (a transpose), from blocks
    # of its own size b is a vector copy
    if not direct:
        schedule_pack(sch, knobs.ic_block, io)

    epi = sch.get_sblock("epilogue")
    conv = sch.get_sblock("conv")
    n, oc, p, o = sch.get_loops(epi)
    tpt = knobs.tiles_per_task
    xo, xt, xi = sch.split(p, [None, tpt, knobs.ow_tile])
    if knobs.positions_outer:
        sch.reorder(n, xo, oc)
        task = sch.fuse(n, xo, oc)
    else:
        task = sch.fuse(n, oc, xo)
    sch.parallel(task)
    sch.compute_at(conv, task)
    # conv's loops under the task are those of its block vars with extent > 1 (compute_at
    # drops unit loops): the task's positions, the channel block, then the reduction
    if depthwise:
        order = [("p", knobs.ow_tile * tpt), ("o", knobs.oc_block), ("ry", kh), ("rx", kw)]
    else:
        order = [("p", knobs.ow_tile * tpt), ("o", knobs.oc_block), ("rc", icc), ("ry", kh),
                 ("rx", kw), ("rb", knobs.ic_block)]
    present = [name for name, extent in order if extent > 1]
    loops = dict(zip(present, sch.get_loops(conv)[-len(present):]))
    if "p" in loops:
        if tpt > 1 and knobs.ow_tile > 1:
            loops["t"], loops["x"] = sch.split(loops.pop("p"), [tpt, knobs.ow_tile])
        elif tpt > 1:
            loops["t"] = loops.pop("p")
        else:
            loops["x"] = loops.pop("p")
    outer = []
    if not depthwise and knobs.ic_step and "rc" in loops and knobs.ic_step < icc and "t" in loops:
        loops["rco"], loops["rc"] = sch.split(loops["rc"], [None, knobs.ic_step])
        outer = ["rco"]
    if depthwise:
        red = ["ry", "rx"]
    elif knobs.unroll_kw:
        red = ["rc", "ry", "rb", "rx"]
    else:
        red = ["rc", "ry", "rx", "rb"]
    red = [r for r in red if r in loops]
    tiles = ["t"] if "t" in loops else []
    spatial = [s_ for s_ in ("x", "o") if s_ in loops]
    sch.reorder(*[loops[r] for r in outer + tiles + red + spatial])
    if knobs.unroll_kw and "rx" in loops and not depthwise:
        sch.unroll(loops["rx"])
    if "x" in loops:
        sch.unroll(loops["x"])
    sch.vectorize(loops["o"])
    if outer + red:
        sch.decompose_reduction(conv, loops[(outer + red)[0]])
        init = sch.get_sblock("conv_init")
        il = sch.get_loops(init)
        sch.vectorize(il[-1])
        if "x" in loops:
            sch.unroll(il[-2])
    sch.unroll(xi)
    sch.vectorize(o)

    return schedule_pool_and_unpack(sch, knobs.oc_block, pool, io, out_size)


def schedule_pack(sch: tvm.s_tir.Schedule, ic_block: int, io: ConvIO) -> None:
    """The ``data_pack`` stage: threads over (batch, chunk, row); a vector copy along the block
    where the data comes in blocks of the same size."""
    pack = sch.get_sblock("data_pack")
    n, c, y, x, b = sch.get_loops(pack)
    sch.parallel(sch.fuse(n, c, y))
    if io.data is not None and io.data.block == ic_block:
        sch.vectorize(b)


def schedule_pool_and_unpack(sch: tvm.s_tir.Schedule, oc_block: int, pool: Pool | None, io: ConvIO,
                             out_size: tuple[int, int]) -> tirx.PrimFunc:
    """Schedule the stages after the epilogue (:func:`epilogue_and_unpack`'s) and return the
    function."""
    if pool is not None:
        # the pool: threads over (batch, channel block, pooled row), the channel block a vector
        block = sch.get_sblock("pool")
        n, c, q, b = sch.get_loops(block)
        ph, pw = pool.out_size(*out_size)
        y, _ = sch.split(q, [ph, pw])
        sch.parallel(sch.fuse(n, c, y))
        sch.vectorize(b)

    # unpacking: for one (channel block, row) the blocked row (ow x block floats) stays in L1
    # while each channel's output row is written; channel-major order would re-read every
    # cache line from L3 once per channel (5 ms instead of 0.3 for VGG's 128 x 112 x 112)
    if io.blocked_out:
        return sch.mod["main"]
    unpack = sch.get_sblock("unpack")
    n, c, y, x = sch.get_loops(unpack)
    cc, cb = sch.split(c, [None, oc_block])
    sch.reorder(n, cc, y, cb, x)
    sch.parallel(sch.fuse(n, cc, y))
    return sch.mod["main"]


def conv2d_kernel(shape: ConvShape, knobs: ConvKnobs, lanes: int, relu: bool = False,
                  residual: bool = False, pool: Pool | None = None,
                  io: ConvIO = NCHW) -> tirx.PrimFunc:
    """The scheduled ``PrimFunc``: parameters ``data, weight, bias[, residual], out`` (data and
    out NCHW unless ``io`` says blocked; weight and bias from :func:`pack_weight` /
    :func:`pack_bias`; ``out`` pooled by ``pool`` when given). Depthwise and grouped convs
    take NCHW only."""
    if io != NCHW and shape.groups != 1:
        raise ValueError("blocked inputs and outputs are for ungrouped convolutions only")
    if knobs.winograd:
        raise ValueError("Winograd knobs: conv_winograd.conv2d_kernel builds that kernel")
    if shape.depthwise:
        tensors = depthwise_compute(shape, knobs, relu, residual, pool)
        icc = 1
    else:
        tensors = conv2d_compute(shape, knobs, relu, residual, pool, io)
        icc = _ceil_div(shape.in_channels // shape.groups, knobs.ic_block)
    func = te.create_prim_func(tensors)
    direct = not shape.depthwise and reads_blocked_data(shape, knobs, io)
    return finish_kernel(_schedule(func, knobs, shape.depthwise, shape.kh, shape.kw, icc, pool, io,
                                   shape.out_size, direct))


def finish_kernel(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """No global symbol: the module it is added to names it. Opaque to Relax's FuseOps: TVM
    would otherwise see an "out-elementwise fusable" function (its last stage is a copy) and
    fuse the elementwise ops that read its output into it, which FuseTIR cannot do for a
    kernel of several stages (ConvNet: a max pool fused here, then ReLU and LRN)."""
    return func.without_attr("global_symbol").with_attr("op_pattern", OP_PATTERN_OPAQUE)


OP_PATTERN_OPAQUE = 8  # tvm.relay's / relax's OpPatternKind.kOpaque
