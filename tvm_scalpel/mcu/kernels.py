"""One TIR function per layer, written in TVMScript with the layer's sizes baked in, and TVM's C
code generator turning them into one C file.

Why TVMScript with raw pointer parameters: the packed calling convention (``MakePackedAPI``)
wraps every function in argument checks with error strings and a call into TVM's runtime,
which a bare-metal project has not got. Our kernels take plain ``float *`` / ``int32_t *``
arguments (their buffers declared over them), and are lowered by TVM's own TIR passes minus
the packed-API step; ``target.build.c`` then prints them as ordinary C functions.

Why unrolled loops and no ``vectorize``: the C target prints vectorized loops as ``float4``
arithmetic, which is not C. The M4 has no fp32 SIMD anyway; the grouped-sparse inner loop is
unrolled over g (one group-column index read per g weights), and the dense kernels over the
innermost window or a few inputs.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.script import tirx as T

from ..format import GroupedSparseMatrix

DENSE_UNROLL = 4  # inputs per iteration of the dense inner loop (where K allows)


def _epilogue(relu: bool):
    return (lambda v: T.max(v, T.float32(0))) if relu else (lambda v: v)


def dense(n: int, k: int, relu: bool, has_bias: bool) -> tirx.PrimFunc:
    """``y[n] = act(b[n] + sum_k w[n, k] x[k])``; w row-major [N, K]."""
    act = _epilogue(relu)
    u = DENSE_UNROLL if k % DENSE_UNROLL == 0 else 1

    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle("float32"), w_ptr: T.handle("float32"), b_ptr: T.handle("float32"),
          y_ptr: T.handle("float32")):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((k,), "float32", data=x_ptr)
        w = T.decl_buffer((n * k,), "float32", data=w_ptr)
        b = T.decl_buffer((n,), "float32", data=b_ptr)
        y = T.decl_buffer((n,), "float32", data=y_ptr)
        acc = T.alloc_buffer((1,), "float32", scope="global")
        for i in range(n):
            if has_bias:
                acc[0] = b[i]
            else:
                acc[0] = T.float32(0)
            for ko in range(k // u):
                for ki in T.unroll(u):
                    acc[0] = acc[0] + w[i * k + ko * u + ki] * x[ko * u + ki]
            y[i] = act(acc[0])

    return f


def grouped_sparse(sparse: GroupedSparseMatrix, relu: bool, has_bias: bool) -> tirx.PrimFunc:
    """``y = act(b + W x)`` over the kept groups of W: one column index per group of g weights,
    the g multiply-adds of a group unrolled. A partial last group (K not a multiple of g) reads
    only its real columns."""
    n, k = sparse.shape
    g = sparse.group_width
    groups = max(sparse.n_groups, 1)
    guard = k % g != 0
    act = _epilogue(relu)

    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle("float32"), vals_ptr: T.handle("float32"), cols_ptr: T.handle("int32"),
          indptr_ptr: T.handle("int32"), b_ptr: T.handle("float32"), y_ptr: T.handle("float32")):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((k,), "float32", data=x_ptr)
        vals = T.decl_buffer((groups * g,), "float32", data=vals_ptr)
        cols = T.decl_buffer((groups,), "int32", data=cols_ptr)
        indptr = T.decl_buffer((n + 1,), "int32", data=indptr_ptr)
        b = T.decl_buffer((n,), "float32", data=b_ptr)
        y = T.decl_buffer((n,), "float32", data=y_ptr)
        acc = T.alloc_buffer((1,), "float32", scope="global")
        for i in range(n):
            if has_bias:
                acc[0] = b[i]
            else:
                acc[0] = T.float32(0)
            for j in range(indptr[i], indptr[i + 1]):
                for t in T.unroll(g):
                    if guard:
                        acc[0] = acc[0] + T.if_then_else(cols[j] * g + t < k,
                                                         vals[j * g + t] * x[cols[j] * g + t],
                                                         T.float32(0))
                    else:
                        acc[0] = acc[0] + vals[j * g + t] * x[cols[j] * g + t]
            y[i] = act(acc[0])

    return f


# Output pixels of one row computed together by the conv kernels: each weight (and, sparse, its
# index and patch offset) is loaded once for PIXEL_TILE multiply-adds, the accumulators in FPU
# registers (the M4F has 32 single-precision ones). Leftover columns run one at a time.
PIXEL_TILE = 4


def pixel_tile(ow: int) -> int:
    return PIXEL_TILE if ow >= PIXEL_TILE else 1


def float_numerics(relu: bool) -> dict:
    """The fp32 kernels' types and arithmetic (kernels_q15.q15_numerics: the int16 ones)."""
    return dict(data="float32", acc="float32", bias="float32",
                mac=lambda acc, w, x: acc + w * x, finish=_epilogue(relu))


def direct_conv(in_shape, out_shape, kernel, stride, has_bias: bool, data: str, acc: str, bias: str,
                mac, finish) -> tirx.PrimFunc:
    """Direct convolution, NCHW, no padding (a pad layer comes first): PIXEL_TILE outputs of a
    row at a time, accumulated in registers; the window's row unrolled. ``data``/``acc``/``bias``
    are the types, ``mac(acc, w, x)`` one multiply-add, ``finish(acc)`` the stored value."""
    ci, h, wd = in_shape
    co, oh, ow = out_shape
    kh, kw = kernel
    sh, sw = stride
    pt = pixel_tile(ow)
    tiles = ow // pt
    zero = tirx.const(0, acc)

    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle(data), w_ptr: T.handle(data), b_ptr: T.handle(bias), y_ptr: T.handle(data)):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((ci * h * wd,), data, data=x_ptr)
        w = T.decl_buffer((co * ci * kh * kw,), data, data=w_ptr)
        b = T.decl_buffer((co,), bias, data=b_ptr)
        y = T.decl_buffer((co * oh * ow,), data, data=y_ptr)
        a = T.alloc_buffer((pt,), acc, scope="global")
        for o, r in T.grid(co, oh):
            for t in range(tiles):
                for p in T.unroll(pt):
                    if has_bias:
                        a[p] = b[o]
                    else:
                        a[p] = zero
                for i, u in T.grid(ci, kh):
                    for v in T.unroll(kw):
                        for p in T.unroll(pt):
                            a[p] = mac(a[p], w[((o * ci + i) * kh + u) * kw + v],
                                       x[(i * h + r * sh + u) * wd + (t * pt + p) * sw + v])
                for p in T.unroll(pt):
                    y[(o * oh + r) * ow + t * pt + p] = finish(a[p])
            for c in range(tiles * pt, ow):
                if has_bias:
                    a[0] = b[o]
                else:
                    a[0] = zero
                for i, u in T.grid(ci, kh):
                    for v in T.unroll(kw):
                        a[0] = mac(a[0], w[((o * ci + i) * kh + u) * kw + v],
                                   x[(i * h + r * sh + u) * wd + c * sw + v])
                y[(o * oh + r) * ow + c] = finish(a[0])

    return f


def conv(in_shape, out_shape, kernel, stride, relu: bool, has_bias: bool) -> tirx.PrimFunc:
    """The fp32 direct convolution (:func:`direct_conv`)."""
    return direct_conv(in_shape, out_shape, kernel, stride, has_bias, **float_numerics(relu))


def patch_offsets(in_shape, kernel, g: int) -> np.ndarray:
    """``offset[r]``: where unfolded weight ``r = (ci, kh, kw)`` reads, relative to the output
    position's window corner, padded with zeros to whole groups (padding lanes weigh 0)."""
    ci, h, wd = in_shape
    kh, kw = kernel
    i, u, v = np.meshgrid(np.arange(ci), np.arange(kh), np.arange(kw), indexing="ij")
    offsets = ((i * h + u) * wd + v).reshape(-1).astype(np.int32)
    padded = -(-offsets.size // g) * g
    return np.concatenate([offsets, np.zeros(padded - offsets.size, np.int32)])


def sparse_conv(sparse: GroupedSparseMatrix, in_shape, out_shape, kernel, stride, has_bias: bool,
                data: str, acc: str, bias: str, mac, finish) -> tirx.PrimFunc:
    """Convolution over the kept groups of the unfolded ``[CO, CI*KH*KW]`` weight: per output,
    one group-column index per g weights, each weight's input found through the patch offset
    table (the unfolded axis crosses window rows, so a group is not contiguous in the input).
    PIXEL_TILE outputs of a row share each weight, index and offset load. Types and arithmetic
    as :func:`direct_conv`."""
    ci, h, wd = in_shape
    co, oh, ow = out_shape
    sh, sw = stride
    g = sparse.group_width
    groups = max(sparse.n_groups, 1)
    patch = -(-sparse.shape[1] // g) * g
    pt = pixel_tile(ow)
    tiles = ow // pt
    zero = tirx.const(0, acc)

    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle(data), vals_ptr: T.handle(data), cols_ptr: T.handle("int32"),
          indptr_ptr: T.handle("int32"), off_ptr: T.handle("int32"), b_ptr: T.handle(bias),
          y_ptr: T.handle(data)):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((ci * h * wd,), data, data=x_ptr)
        vals = T.decl_buffer((groups * g,), data, data=vals_ptr)
        cols = T.decl_buffer((groups,), "int32", data=cols_ptr)
        indptr = T.decl_buffer((co + 1,), "int32", data=indptr_ptr)
        off = T.decl_buffer((patch,), "int32", data=off_ptr)
        b = T.decl_buffer((co,), bias, data=b_ptr)
        y = T.decl_buffer((co * oh * ow,), data, data=y_ptr)
        a = T.alloc_buffer((pt,), acc, scope="global")
        for o, r in T.grid(co, oh):
            for t in range(tiles):
                for p in T.unroll(pt):
                    if has_bias:
                        a[p] = b[o]
                    else:
                        a[p] = zero
                for j in range(indptr[o], indptr[o + 1]):
                    for q in T.unroll(g):
                        for p in T.unroll(pt):
                            a[p] = mac(a[p], vals[j * g + q],
                                       x[r * sh * wd + (t * pt + p) * sw + off[cols[j] * g + q]])
                for p in T.unroll(pt):
                    y[(o * oh + r) * ow + t * pt + p] = finish(a[p])
            for c in range(tiles * pt, ow):
                if has_bias:
                    a[0] = b[o]
                else:
                    a[0] = zero
                for j in range(indptr[o], indptr[o + 1]):
                    for q in T.unroll(g):
                        a[0] = mac(a[0], vals[j * g + q], x[r * sh * wd + c * sw + off[cols[j] * g + q]])
                y[(o * oh + r) * ow + c] = finish(a[0])

    return f


def grouped_sparse_conv(sparse: GroupedSparseMatrix, in_shape, out_shape, kernel, stride,
                        relu: bool, has_bias: bool) -> tirx.PrimFunc:
    """The fp32 grouped-sparse convolution (:func:`sparse_conv`)."""
    return sparse_conv(sparse, in_shape, out_shape, kernel, stride, has_bias, **float_numerics(relu))


def pool(op: str, in_shape, out_shape, kernel, stride, relu: bool) -> tirx.PrimFunc:
    """Max or average pooling, NCHW, no padding."""
    ch, h, wd = in_shape
    _, oh, ow = out_shape
    kh, kw = kernel
    sh, sw = stride
    is_max = op == "maxpool"
    scale = 1.0 / (kh * kw)
    act = _epilogue(relu)

    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle("float32"), y_ptr: T.handle("float32")):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((ch * h * wd,), "float32", data=x_ptr)
        y = T.decl_buffer((ch * oh * ow,), "float32", data=y_ptr)
        acc = T.alloc_buffer((1,), "float32", scope="global")
        for o, r, c in T.grid(ch, oh, ow):
            if is_max:
                acc[0] = x[(o * h + r * sh) * wd + c * sw]
            else:
                acc[0] = T.float32(0)
            for u in range(kh):
                for v in T.unroll(kw):
                    if is_max:  # Select, not T.max: the C printer reuses a stale load for max
                        acc[0] = T.Select(x[(o * h + r * sh + u) * wd + c * sw + v] > acc[0],
                                          x[(o * h + r * sh + u) * wd + c * sw + v], acc[0])
                    else:
                        acc[0] = acc[0] + x[(o * h + r * sh + u) * wd + c * sw + v]
            if is_max:
                y[(o * oh + r) * ow + c] = act(acc[0])
            else:
                y[(o * oh + r) * ow + c] = act(acc[0] * T.float32(scale))

    return f


def relu(size: int) -> tirx.PrimFunc:
    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle("float32"), y_ptr: T.handle("float32")):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((size,), "float32", data=x_ptr)
        y = T.decl_buffer((size,), "float32", data=y_ptr)
        for i in range(size):
            y[i] = T.max(x[i], T.float32(0))

    return f


def pad(in_shape, out_shape, pads, dtype: str = "float32") -> tirx.PrimFunc:
    """Zero border around each channel (the padding of the conv layer that follows); ``dtype``
    is the activations' type (float32, or int16 for q15)."""
    ch, h, wd = in_shape
    _, ph, pw = out_shape
    top, left = pads[0], pads[1]
    zero = tirx.const(0, dtype)

    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle(dtype), y_ptr: T.handle(dtype)):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((ch * h * wd,), dtype, data=x_ptr)
        y = T.decl_buffer((ch * ph * pw,), dtype, data=y_ptr)
        for o, r, c in T.grid(ch, ph, pw):
            y[(o * ph + r) * pw + c] = T.if_then_else(
                r >= top and r < top + h and c >= left and c < left + wd,
                x[(o * h + r - top) * wd + c - left], zero)

    return f


# TVM's S-TIR lowering (s_tir/pipeline.py), without the host/device split and MakePackedAPI:
# our functions keep plain pointer parameters and no runtime calls.
def _lowering() -> list:
    S, X = s_tir.transform, tirx.transform
    return [S.CanonicalizeLoop(), S.LowerInitBlock(), S.PlanAndUpdateBufferAllocationLocation(),
            S.ConvertBlocksToOpaque(), S.CompactBufferAllocation(), S.LowerMatchBuffer(),
            S.StmtSimplify(), S.LowerOpaqueBlock(), X.FlattenBuffer(), X.NarrowDataType(32),
            S.LoopPartition(), X.StorageRewrite(), S.HoistIfThenElse(), X.UnrollLoop(),
            S.RenormalizeSplitPattern(), X.StmtSimplify(), X.RemoveNoOp(),
            S.RewriteUnsafeSelect(), X.LowerIntrin()]


def generate_c(functions: dict[str, tirx.PrimFunc]) -> str:
    """The C source of ``{symbol: PrimFunc}``, generated by TVM's ``c`` target."""
    target = tvm.target.Target({"kind": "c"})
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in functions.items()})
    mod = tirx.transform.BindTarget(target)(mod)
    mod = tvm.ir.transform.Sequential(_lowering())(mod)
    return tvm.get_global_func("target.build.c")(mod, target).inspect_source()
