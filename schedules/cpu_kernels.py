"""TensorIR for dense layers on LLVM CPU targets (x86, AArch64, Cortex-M), grouped-sparse or dense.

Every kernel computes ``y[b, n] = act(bias[n] + sum_k x[b, k] * W[n, k])`` for a batch ``b`` that
may be symbolic. They are built with TVM's IRBuilder (what TVMScript parses into), so the loop
order is exactly the one we want (TE puts the fixed group axis outside a data-dependent
reduction) and so that several layers can be emitted into one function (``chain_kernel``):

* the group axis (g weights) is the innermost loop and is vectorized: one FMA on a vector
  register per kept group, the point of SIMD-aware pruning;
* batch 1 (GEMV) keeps ``unroll`` independent accumulators per row, so consecutive groups do not
  wait on each other's FMA latency;
* batch > 1 (GEMM) processes ``batch_tile`` inputs at once: each loaded group of weights is used
  ``batch_tile`` times from registers; the leftover inputs take the GEMV path;
* dense layers (``LayerSpec.panel``) read their weight packed into panels of nr outputs
  (``pack_dense_panels``) and run a register-blocked GEMM micro-kernel: mr inputs x nr outputs
  of accumulators, one broadcast input times nr/lanes weight vectors a step (no lane sums),
  K in cache-sized blocks, threads over panels; batch 1 is the same kernel with mr = 1;
* the lanes of an accumulator are summed by halving (log2 g vector adds), not by a chain of g
  dependent scalar adds, which at a few groups a row cost more than the groups themselves;
* rows are spread over the thread pool only where it pays (``parallel`` knobs).

The layer description, knobs and packed layouts are in ``spec.py``; ``LlvmCpuRule`` (at the end)
is what the rule files of the LLVM CPU targets (``x86.py``, ``aarch64.py``, ``cortex_m4.py``)
build on.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tvm_scalpel.targets import TargetProfile

from . import conv_cpu, conv_winograd
from .spec import F32, CpuKnobs, LayerSpec, TargetRule


def gemm_tile(lanes: int) -> tuple[int, int]:
    """``(mr, vectors)`` of the panel GEMM's micro-kernel for a vector width: mr inputs times
    ``vectors`` SIMD vectors of outputs (nr = vectors * lanes) accumulate in registers, plus
    ``vectors`` weight vectors and one broadcast input. AVX2 (8 lanes, 16 ymm): 6 x 2 = 12
    accumulators, as MLAS's FMA3 kernel; AVX-512 (16 lanes, 32 zmm): 8 x 2; 4 lanes: 6 x 2
    as well, which fits SSE's 16 registers (NEON has 32)."""
    if lanes >= 16:
        return 8, 2
    return 6, 2


def panel_width(lanes: int) -> int:
    """nr: outputs per packed weight panel for a vector width."""
    return gemm_tile(lanes)[1] * lanes


# ----------------------------------------------------------------------------------------------
# Emitters: each writes statements into the IRBuilder frame that is open.


def _rows(n: int, parallel: bool):
    return T.parallel(0, n) if parallel else T.serial(0, n)


def _store(buf, value, *idx) -> None:
    T.buffer_store(buf, value, list(idx))


def _zero(acc, count: int, width: int) -> None:
    for i in range(count):
        with T.vectorized(0, width) as lane:
            _store(acc, tirx.const(0, F32), i, lane)


def _lane_sum(acc, i: int, width: int) -> None:
    """``acc[i, 0] = sum(acc[i, :width])``, halving the live lanes with vector adds."""
    live = width
    while live > 1:
        half = live // 2
        with T.vectorized(0, half) as lane:
            _store(acc, acc[i, lane] + acc[i, lane + (live - half)], i, lane)
        if live % 2:  # odd width: the middle lane was not folded
            _store(acc, acc[i, 0] + acc[i, half], i, 0)
        live = half


def _finish(y, b, r, value, relu: bool) -> None:
    _store(y, tirx.max(value, tirx.const(0, F32)) if relu else value, b, r)


def emit_layer(spec: LayerSpec, x, operands: list, y, batch) -> None:
    """Emit ``y = act(x @ W.T + bias)`` for one layer (operands as ``spec.operand_types()``)."""
    if spec.sparse:
        _emit_grouped_sparse(spec, x, *operands, y, batch)
    else:
        _emit_dense(spec, x, *operands, y, batch)


def _emit_grouped_sparse(spec: LayerSpec, x, values, offsets, indptr, bias, y, batch) -> None:
    g, u, bt, n = spec.group_width, spec.knobs.unroll, spec.knobs.batch_tile, spec.n
    # GEMM path: bt inputs share every group of weights loaded.
    with T.serial(0, batch // bt) as bo:
        with _rows(n, spec.knobs.parallel_gemm) as r:
            acc = T.alloc_buffer((bt, g), F32, scope="global")  # "global": a stack array
            _zero(acc, bt, g)
            with T.serial(indptr[r], indptr[r + 1]) as p:
                for i in range(bt):
                    with T.vectorized(0, g) as lane:
                        row = bo * bt + i
                        _store(acc, acc[i, lane] + values[p, lane] * x[row, offsets[p] + lane], i, lane)
            for i in range(bt):
                _lane_sum(acc, i, g)
                _finish(y, bo * bt + i, r, acc[i, 0] + bias[r], spec.relu)
    # GEMV path: the inputs left over (all of them at batch 1).
    with T.serial(batch // bt * bt, batch) as b:
        with _rows(n, spec.knobs.parallel_gemv) as r:
            acc = T.alloc_buffer((u, g), F32, scope="global")
            _zero(acc, u, g)
            start = indptr[r]
            count = indptr[r + 1] - start
            with T.serial(0, count // u) as q:
                for a in range(u):
                    p = start + q * u + a
                    with T.vectorized(0, g) as lane:
                        _store(acc, acc[a, lane] + values[p, lane] * x[b, offsets[p] + lane], a, lane)
            with T.serial(start + count // u * u, start + count) as p:
                with T.vectorized(0, g) as lane:
                    _store(acc, acc[0, lane] + values[p, lane] * x[b, offsets[p] + lane], 0, lane)
            for a in range(1, u):  # fold the accumulators vector-wise first
                with T.vectorized(0, g) as lane:
                    _store(acc, acc[0, lane] + acc[a, lane], 0, lane)
            _lane_sum(acc, 0, g)
            _finish(y, b, r, acc[0, 0] + bias[r], spec.relu)


def _dense_tile(spec: LayerSpec, x, weight, bias, y, b0, r0, rt: int, bt: int, full: int) -> None:
    """Rows ``r0 .. r0+rt-1`` of ``y`` for inputs ``b0 .. b0+bt-1``."""
    lanes, k = spec.lanes, spec.k
    acc = T.alloc_buffer((rt * bt, lanes), F32, scope="global")
    _zero(acc, rt * bt, lanes)
    with T.serial(0, full) as j:
        for rr in range(rt):
            for i in range(bt):
                with T.vectorized(0, lanes) as lane:
                    c = j * lanes + lane
                    a = rr * bt + i
                    _store(acc, acc[a, lane] + weight[r0 + rr, c] * x[b0 + i, c], a, lane)
    for rr in range(rt):
        for i in range(bt):
            a = rr * bt + i
            _lane_sum(acc, a, lanes)
            with T.serial(full * lanes, k) as c:
                _store(acc, acc[a, 0] + weight[r0 + rr, c] * x[b0 + i, c], a, 0)
            _finish(y, b0 + i, r0 + rr, acc[a, 0] + bias[r0 + rr], spec.relu)


def _panel_block(spec: LayerSpec, x, weight, bias, y, b0, rows: int, p, valid: int, span) -> None:
    """Outputs ``p*nr .. p*nr+valid-1`` of inputs ``b0 .. b0+rows-1`` over the inputs k of one
    K block: the micro-kernel.

    ``rows x vectors`` accumulators (times ``split``: independent partial sums over
    alternating inputs k when there are too few to hide the FMA latency, as at batch 1) start
    at the bias in the first K block and at the partial sums stored in ``y`` in the others;
    each step broadcasts one input and multiplies it by ``vectors`` weight vectors of the
    panel. ReLU is applied by the last K block."""
    lanes, nr = spec.lanes, spec.panel
    k0, extent, first, last = span
    vectors = nr // lanes
    split = max(1, 8 // (rows * vectors))
    count = rows * vectors
    acc = T.alloc_buffer((split * count, lanes), F32, scope="global")

    def init(from_bias: bool) -> None:
        for i in range(rows):
            if not from_bias and valid < nr:  # the partial panel: only its valid outputs
                for j in range(valid):
                    _store(acc, y[b0 + i, p * nr + j], i * vectors + j // lanes, j % lanes)
                continue
            for v in range(vectors):
                with T.vectorized(0, lanes) as lane:
                    c = p * nr + v * lanes + lane
                    _store(acc, bias[c] if from_bias else y[b0 + i, c], i * vectors + v, lane)

    _branch(first, lambda: init(True), lambda: init(False))
    for s in range(1, split):
        for a in range(count):
            with T.vectorized(0, lanes) as lane:
                _store(acc, tirx.const(0, F32), s * count + a, lane)

    def step(kk, s: int) -> None:
        for i in range(rows):
            xv = x[b0 + i, kk]
            for v in range(vectors):
                with T.vectorized(0, lanes) as lane:
                    a = s * count + i * vectors + v
                    _store(acc, acc[a, lane] + xv * weight[p, kk, v * lanes + lane], a, lane)

    with T.serial(0, extent // split) as q:
        for s in range(split):
            step(k0 + q * split + s, s)
    if split > 1:
        with T.serial(extent // split * split, extent) as kk:
            step(k0 + kk, 0)
    for s in range(1, split):
        for a in range(count):
            with T.vectorized(0, lanes) as lane:
                _store(acc, acc[a, lane] + acc[s * count + a, lane], a, lane)

    def store(relu: bool) -> None:
        act = (lambda v: tirx.max(v, tirx.const(0, F32))) if relu else (lambda v: v)
        for i in range(rows):
            if valid == nr:  # a whole panel: vector stores
                for v in range(vectors):
                    with T.vectorized(0, lanes) as lane:
                        _store(y, act(acc[i * vectors + v, lane]), b0 + i, p * nr + v * lanes + lane)
            else:  # the last, partial panel: only its valid outputs
                for j in range(valid):
                    _store(y, act(acc[i * vectors + j // lanes, j % lanes]), b0 + i, p * nr + j)

    if spec.relu:
        _branch(last, lambda: store(True), lambda: store(False))
    else:
        store(False)


def _branch(cond, then, otherwise) -> None:
    """``then()`` or ``otherwise()``: chosen here for a Python bool, at run time for a TIR one."""
    if isinstance(cond, bool):
        return then() if cond else otherwise()
    with T.If(cond):
        with T.Then():
            then()
        with T.Else():
            otherwise()


def _panel_tiles(spec: LayerSpec, x, weight, bias, y, batch, p, valid: int, span) -> None:
    """Every input for panel ``p``: whole tiles of mr inputs, then one call sized to the rest."""
    mr = spec.knobs.gemm_rows or gemm_tile(spec.lanes)[0]
    with T.serial(0, batch // mr) as bo:
        _panel_block(spec, x, weight, bias, y, bo * mr, mr, p, valid, span)
    for rest in range(1, mr):  # the batch is symbolic: one branch per remainder size
        with T.If(batch % mr == rest):
            with T.Then():
                _panel_block(spec, x, weight, bias, y, batch - rest, rest, p, valid, span)


def gemm_k_block(spec: LayerSpec) -> int:
    """Inputs k per K block: a block of a panel (kc x nr floats, 64 KiB) stays in L2 while
    every tile of inputs uses it, instead of each tile streaming the whole panel again."""
    return spec.knobs.gemm_kc or max(256, 16384 // spec.panel)


def _panel_k_blocks(spec: LayerSpec, x, weight, bias, y, batch, p, valid: int) -> None:
    k, kc = spec.k, gemm_k_block(spec)
    if k <= kc:
        return _panel_tiles(spec, x, weight, bias, y, batch, p, valid, (0, k, True, True))
    blocks = -(-k // kc)
    with T.serial(0, blocks) as kb:
        extent = kc if k % kc == 0 else tirx.min(kc, k - kb * kc)
        span = (kb * kc, extent, kb == 0, kb == blocks - 1)
        _panel_tiles(spec, x, weight, bias, y, batch, p, valid, span)


def _emit_dense_panels(spec: LayerSpec, x, weight, bias, y, batch) -> None:
    """Dense layer on panel-packed weights: threads over panels (outputs); each K block of a
    panel is loaded once from memory and used by every tile of inputs."""
    full, tail = spec.n // spec.panel, spec.n % spec.panel
    knobs = spec.knobs

    def body(parallel: bool) -> None:
        if full:
            with _rows(full, parallel) as p:
                _panel_k_blocks(spec, x, weight, bias, y, batch, p, spec.panel)
        if tail:
            _panel_k_blocks(spec, x, weight, bias, y, batch, full, tail)

    if knobs.parallel_gemv or not knobs.parallel_gemm:
        body(knobs.parallel_gemv)
    else:  # threads pay only from a batch tile of inputs on (the knob's measure): decide at run time
        _branch(batch >= knobs.batch_tile, lambda: body(True), lambda: body(False))


def _emit_dense(spec: LayerSpec, x, weight, bias, y, batch) -> None:
    if spec.panel:
        return _emit_dense_panels(spec, x, weight, bias, y, batch)
    lanes, u, bt, n, k = spec.lanes, spec.knobs.unroll, spec.knobs.batch_tile, spec.n, spec.k
    full = k // lanes  # whole vectors per row; the k % lanes tail is scalar
    rt = spec.knobs.row_tile
    with T.serial(0, batch // bt) as bo:
        # rt rows x bt inputs per step: each loaded weight vector and input vector is used
        # bt and rt times from registers (a register-blocked GEMM micro-kernel).
        with _rows(n // rt, spec.knobs.parallel_gemm) as ro:
            _dense_tile(spec, x, weight, bias, y, bo * bt, ro * rt, rt, bt, full)
        with T.serial(n // rt * rt, n) as r:
            _dense_tile(spec, x, weight, bias, y, bo * bt, r, 1, bt, full)
    with T.serial(batch // bt * bt, batch) as b:
        with _rows(n, spec.knobs.parallel_gemv) as r:
            acc = T.alloc_buffer((u, lanes), F32, scope="global")
            _zero(acc, u, lanes)
            with T.serial(0, full // u) as q:
                for a in range(u):
                    with T.vectorized(0, lanes) as lane:
                        c = (q * u + a) * lanes + lane
                        _store(acc, acc[a, lane] + weight[r, c] * x[b, c], a, lane)
            with T.serial(full // u * u, full) as j:
                with T.vectorized(0, lanes) as lane:
                    c = j * lanes + lane
                    _store(acc, acc[0, lane] + weight[r, c] * x[b, c], 0, lane)
            for a in range(1, u):
                with T.vectorized(0, lanes) as lane:
                    _store(acc, acc[0, lane] + acc[a, lane], 0, lane)
            _lane_sum(acc, 0, lanes)
            with T.serial(full * lanes, k) as c:
                _store(acc, acc[0, 0] + weight[r, c] * x[b, c], 0, 0)
            _finish(y, b, r, acc[0, 0] + bias[r], spec.relu)


# ----------------------------------------------------------------------------------------------
# Kernels: whole PrimFuncs.


def chain_kernel(specs: list[LayerSpec]) -> tirx.PrimFunc:
    """One function running ``specs`` back to back: ``x, *operands of each layer, y``.

    Intermediate activations live in a workspace buffer; compared with one call per layer, the
    Relax VM saves an allocation, a shape computation and a call per layer (about 1 us each,
    as much as a 92%-pruned LeNet layer costs).
    """
    for a, b in zip(specs, specs[1:]):
        if a.n != b.k:
            raise ValueError(f"layer of {a.n} outputs cannot feed a layer of {b.k} inputs")
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr({"tirx.noalias": True, "scalpel.layers": [s.to_attr() for s in specs]})
            batch = tirx.Var("batch", "int64")
            x = T.arg("x", T.buffer((batch, specs[0].k), F32))
            operands = [[T.arg(f"{name}{i}", T.buffer(shape, dtype))
                         for name, shape, dtype in spec.operand_types()]
                        for i, spec in enumerate(specs)]
            y = T.arg("y", T.buffer((batch, specs[-1].n), F32))
            inputs = [x] + [T.alloc_buffer((batch, s.n), F32) for s in specs[:-1]]
            outputs = inputs[1:] + [y]
            for spec, xi, ops, yi in zip(specs, inputs, operands, outputs):
                emit_layer(spec, xi, ops, yi, batch)
    return builder.get()


# ----------------------------------------------------------------------------------------------
# Convolutions over unfolded patches: vectorized along output positions.

PATCH_VECTORS = 4  # accumulator vectors per block of output positions (hides FMA latency)
PATCH_ROWS = 2  # output channels per block of a dense weight: each loaded input vector feeds 4 FMAs


def _patch_block(spec: LayerSpec, cols, operands, acc, b, o, rows: int, p0, vectors: int,
                 width: int) -> None:
    """``acc[r*vectors + v, :width] += sum_k W[o + r, k] * cols[b, k, p0 + v*width + :width]``
    for ``r < rows``: each weight is one scalar broadcast into FMAs, with no lane sum (unlike
    the GEMV/GEMM paths); with several rows (dense weights) each input vector loaded is used
    ``rows`` times."""

    def fma(weights, k) -> None:
        for v in range(vectors):
            for r, w in enumerate(weights):
                with T.vectorized(0, width) as lane:
                    a = r * vectors + v
                    _store(acc, acc[a, lane] + w * cols[b, k, p0 + v * width + lane], a, lane)

    if spec.sparse:
        values, offsets, indptr = operands[:3]
        with T.serial(indptr[o], indptr[o + 1]) as grp:
            for j in range(spec.group_width):  # zero-padded lanes of a tail group add 0
                fma([values[grp, j]], offsets[grp] + j)
    else:
        with T.serial(0, spec.k) as k:
            fma([operands[0][o + r, k] for r in range(rows)], k)


def _patch_rows(spec: LayerSpec, cols, operands, y, b, o, rows: int, positions: int) -> None:
    """Output channels ``o .. o+rows-1`` of image ``b``, all positions."""
    lanes, bias = spec.lanes, operands[-1]
    block = lanes * PATCH_VECTORS
    # (first position, count, vectors, lanes) of each kind of block: full blocks, leftover
    # vectors, leftover scalars
    spans = [(0, positions // block, PATCH_VECTORS, lanes)]
    start = positions // block * block
    spans.append((start, (positions - start) // lanes, 1, lanes))
    start += (positions - start) // lanes * lanes
    spans.append((start, positions - start, 1, 1))
    acc = T.alloc_buffer((rows * PATCH_VECTORS, lanes), F32, scope="global")
    for first, count, vectors, width in spans:
        if count == 0:
            continue
        with T.serial(0, count) as q:
            p0 = first + q * (vectors * width)
            for r in range(rows):
                for v in range(vectors):
                    with T.vectorized(0, width) as lane:
                        _store(acc, bias[o + r], r * vectors + v, lane)
            _patch_block(spec, cols, operands, acc, b, o, rows, p0, vectors, width)
            for r in range(rows):
                for v in range(vectors):
                    with T.vectorized(0, width) as lane:
                        value = acc[r * vectors + v, lane]
                        if spec.relu:
                            value = tirx.max(value, tirx.const(0, F32))
                        _store(y, value, b, o + r, p0 + v * width + lane)


def _emit_patches(spec: LayerSpec, cols, operands, y, batch, positions: int) -> None:
    rows = 1 if spec.sparse else PATCH_ROWS  # sparse rows differ in their kept groups
    with T.serial(0, batch) as b:
        with _rows(spec.n // rows, spec.knobs.parallel_gemm) as ro:
            _patch_rows(spec, cols, operands, y, b, ro * rows, rows, positions)
        if spec.n % rows:
            with T.serial(spec.n // rows * rows, spec.n) as o:
                _patch_rows(spec, cols, operands, y, b, o, 1, positions)


def patch_kernel(spec: LayerSpec, positions: int) -> tirx.PrimFunc:
    """A conv layer over unfolded patches: ``y[b, n, p] = act(bias[n] + sum_k W[n, k] *
    cols[b, k, p])`` for ``positions`` output positions p (``cols`` is im2col transposed, so
    ``y`` is already NCHW). Operands as ``spec.operand_types()``, dense or grouped-sparse."""
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            T.func_attr({"tirx.noalias": True})
            batch = tirx.Var("batch", "int64")
            cols = T.arg("cols", T.buffer((batch, spec.k, positions), F32))
            operands = [T.arg(name, T.buffer(shape, dtype)) for name, shape, dtype in spec.operand_types()]
            y = T.arg("y", T.buffer((batch, spec.n, positions), F32))
            _emit_patches(spec, cols, operands, y, batch, positions)
    return builder.get()


# ----------------------------------------------------------------------------------------------
# The rule every LLVM CPU target's file fills in.


class LlvmCpuRule(TargetRule):
    """An LLVM CPU: our grouped-sparse and dense kernels, the conv kernels (``conv_cpu.py``).
    A target's file sets the class attributes below; the rest is shared."""

    dense = True
    # Multiply-adds per call above which spreading rows over threads beats the fork/join cost
    # of TVM's thread pool (the target's file says where it was measured).
    parallel_min_macs = 200_000
    unroll = 2  # GEMV accumulators a row (CpuKnobs.unroll)
    batch_tile = 8  # GEMM inputs a weight load (CpuKnobs.batch_tile)

    def vector_registers(self, lanes: int) -> int:
        """Architectural vector registers at this vector width (the conv kernels' register
        budget)."""
        return 32

    def conv_lanes(self, profile: TargetProfile) -> int:
        return max(profile.simd_width, 4)

    def panel_width(self, lanes: int) -> int:
        return panel_width(lanes)

    def default_knobs(self, macs_per_row: int) -> CpuKnobs:
        return CpuKnobs(
            unroll=self.unroll,
            batch_tile=self.batch_tile,
            parallel_gemv=macs_per_row >= self.parallel_min_macs,
            parallel_gemm=macs_per_row * self.batch_tile >= self.parallel_min_macs,
        )

    def kernel(self, specs: list[LayerSpec]) -> tirx.PrimFunc:
        return chain_kernel(specs)

    def patch_kernel(self, profile: TargetProfile, spec: LayerSpec, positions: int) -> tirx.PrimFunc:
        return patch_kernel(spec, positions)

    def default_conv_knobs(self, profile: TargetProfile, shape: conv_cpu.ConvShape,
                           winograd: bool = True) -> conv_cpu.ConvKnobs:
        lanes = self.conv_lanes(profile)
        direct = conv_cpu.default_conv_knobs(shape, lanes, self.vector_registers(lanes))
        tile = conv_winograd.rule_tile(shape) if winograd else 0
        if tile:
            return conv_winograd.winograd_knobs(shape, direct, tile)
        return direct

    def conv2d(self, profile: TargetProfile, shape: conv_cpu.ConvShape, knobs: conv_cpu.ConvKnobs,
               relu: bool, residual: bool, pool: conv_cpu.Pool | None = None,
               io: conv_cpu.ConvIO = conv_cpu.NCHW) -> tirx.PrimFunc:
        if knobs.winograd:
            return conv_winograd.conv2d_kernel(shape, knobs, relu, residual, pool, io)
        return conv_cpu.conv2d_kernel(shape, knobs, self.conv_lanes(profile), relu, residual, pool,
                                      io)


GENERIC = LlvmCpuRule()  # an LLVM CPU without a file of its own (riscv64, armv7a, ...)
