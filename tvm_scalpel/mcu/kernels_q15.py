"""The q15 (int16) kernels: int16 activations and weights, int32 accumulators, power-of-two
scales (calibrate.py). Pairs of int16 weights and inputs are multiplied and added by the M4's
dual 16-bit MAC ``__smlad`` (arm_acle.h; the project's ``scalpel_dsp.h`` gives a portable
definition elsewhere): two weights per instruction in the dense kernel, and g/2 per group of
the grouped-sparse kernel when g is even (g = 2: one ``smlad`` per group). The pair is read as
one 32-bit word, so pairs start at even indices (groups of even g do).

Where no two consecutive weights meet two consecutive inputs (a conv window's rows are odd,
the patch offset table scatters a group), the kernels multiply one pair of int16 at a time.
A padding lane of a partial group weighs 0, so it adds 0 whatever it reads: the arena has
slack past its end for such reads (plan.py's ``slack``).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..format import GroupedSparseMatrix
from .kernels import direct_conv, sparse_conv


def _requant(shift: int, relu: bool):
    """int32 accumulator -> int16 output: rounding shift, then saturation (Select, not
    max/min: TVM's C printer reuses a stale load for those)."""
    lo = 0 if relu else -32768

    def scaled(acc):
        if shift > 0:
            return T.shift_right(acc + (1 << (shift - 1)), shift)
        if shift < 0:
            return T.shift_left(acc, -shift)
        return acc

    def out(acc):
        v = scaled(acc)
        return T.Cast("int16", T.Select(v > 32767, 32767, T.Select(v < lo, lo, v)))

    return out


def quantize(size: int, bits: int) -> tirx.PrimFunc:
    """float input -> int16 with ``bits`` fractional bits (rounded half away from zero)."""
    scale = float(2.0 ** bits)

    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle("float32"), y_ptr: T.handle("int16")):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((size,), "float32", data=x_ptr)
        y = T.decl_buffer((size,), "int16", data=y_ptr)
        v = T.alloc_buffer((1,), "float32", scope="global")
        for i in range(size):
            v[0] = x[i] * T.float32(scale)
            v[0] = T.Select(v[0] > T.float32(32767), T.float32(32767),
                            T.Select(v[0] < T.float32(-32768), T.float32(-32768), v[0]))
            y[i] = T.Cast("int16", v[0] + T.Select(v[0] >= T.float32(0), T.float32(0.5), T.float32(-0.5)))

    return f


def dequantize(size: int, bits: int) -> tirx.PrimFunc:
    scale = float(2.0 ** -bits)

    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle("int16"), y_ptr: T.handle("float32")):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((size,), "int16", data=x_ptr)
        y = T.decl_buffer((size,), "float32", data=y_ptr)
        for i in range(size):
            y[i] = T.Cast("float32", x[i]) * T.float32(scale)

    return f


def dense(n: int, k: int, shift: int, relu: bool, has_bias: bool) -> tirx.PrimFunc:
    """``y = requant(b + W x)``; two weights per ``__smlad`` when K is even."""
    out = _requant(shift, relu)
    pairs = k % 2 == 0
    half = k // 2

    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle("int16"), w_ptr: T.handle("int16"), b_ptr: T.handle("int32"),
          y_ptr: T.handle("int16")):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((k,), "int16", data=x_ptr)
        w = T.decl_buffer((n * k,), "int16", data=w_ptr)
        x2 = T.decl_buffer((half,), "int32", data=x_ptr)
        w2 = T.decl_buffer((n * half,), "int32", data=w_ptr)
        b = T.decl_buffer((n,), "int32", data=b_ptr)
        y = T.decl_buffer((n,), "int16", data=y_ptr)
        acc = T.alloc_buffer((1,), "int32", scope="global")
        for i in range(n):
            if has_bias:
                acc[0] = b[i]
            else:
                acc[0] = 0
            if pairs:
                for ko in range(half // 2):
                    for ki in T.unroll(2):
                        acc[0] = T.call_extern("int32", "__smlad", w2[i * half + ko * 2 + ki],
                                               x2[ko * 2 + ki], acc[0])
                if half % 2 == 1:
                    acc[0] = T.call_extern("int32", "__smlad", w2[i * half + half - 1], x2[half - 1], acc[0])
            else:
                for kk in range(k):
                    acc[0] = acc[0] + T.Cast("int32", w[i * k + kk]) * T.Cast("int32", x[kk])
            y[i] = out(acc[0])

    return f


def grouped_sparse(sparse: GroupedSparseMatrix, shift: int, relu: bool, has_bias: bool) -> tirx.PrimFunc:
    """Over the kept groups: g/2 ``__smlad`` per group for even g (g = 2: one), else g MACs."""
    n, k = sparse.shape
    g = sparse.group_width
    groups = max(sparse.n_groups, 1)
    padded = -(-k // g) * g
    pairs = g % 2 == 0
    half = g // 2
    out = _requant(shift, relu)

    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle("int16"), vals_ptr: T.handle("int16"), cols_ptr: T.handle("int32"),
          indptr_ptr: T.handle("int32"), b_ptr: T.handle("int32"), y_ptr: T.handle("int16")):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((padded,), "int16", data=x_ptr)
        vals = T.decl_buffer((groups * g,), "int16", data=vals_ptr)
        x2 = T.decl_buffer((padded // 2,), "int32", data=x_ptr)
        vals2 = T.decl_buffer((groups * g // 2,), "int32", data=vals_ptr)
        cols = T.decl_buffer((groups,), "int32", data=cols_ptr)
        indptr = T.decl_buffer((n + 1,), "int32", data=indptr_ptr)
        b = T.decl_buffer((n,), "int32", data=b_ptr)
        y = T.decl_buffer((n,), "int16", data=y_ptr)
        acc = T.alloc_buffer((1,), "int32", scope="global")
        for i in range(n):
            if has_bias:
                acc[0] = b[i]
            else:
                acc[0] = 0
            for j in range(indptr[i], indptr[i + 1]):
                if pairs:
                    for t in T.unroll(half):
                        acc[0] = T.call_extern("int32", "__smlad", vals2[j * half + t],
                                               x2[cols[j] * half + t], acc[0])
                else:
                    for t in T.unroll(g):
                        acc[0] = acc[0] + T.Cast("int32", vals[j * g + t]) * T.Cast("int32", x[cols[j] * g + t])
            y[i] = out(acc[0])

    return f


def q15_numerics(shift: int, relu: bool) -> dict:
    """int16 data and weights, int32 accumulator and bias, requantized by ``shift``."""
    return dict(data="int16", acc="int32", bias="int32",
                mac=lambda acc, w, x: acc + T.Cast("int32", w) * T.Cast("int32", x),
                finish=_requant(shift, relu))


def conv(in_shape, out_shape, kernel, stride, shift: int, relu: bool, has_bias: bool) -> tirx.PrimFunc:
    """Direct int16 convolution (the fp32 kernel's loops, kernels.direct_conv)."""
    return direct_conv(in_shape, out_shape, kernel, stride, has_bias, **q15_numerics(shift, relu))


def grouped_sparse_conv(sparse: GroupedSparseMatrix, in_shape, out_shape, kernel, stride,
                        shift: int, relu: bool, has_bias: bool) -> tirx.PrimFunc:
    """int16 grouped-sparse convolution (the fp32 kernel's loops, kernels.sparse_conv)."""
    return sparse_conv(sparse, in_shape, out_shape, kernel, stride, has_bias, **q15_numerics(shift, relu))


def pool(op: str, in_shape, out_shape, kernel, stride, relu: bool) -> tirx.PrimFunc:
    """int16 max pooling; average pooling as a sum times round(2**15 / window), shifted back."""
    ch, h, wd = in_shape
    _, oh, ow = out_shape
    kh, kw = kernel
    sh, sw = stride
    is_max = op == "maxpool"
    recip = int(round(2 ** 15 / (kh * kw)))
    out = _requant(15 if not is_max else 0, relu)

    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle("int16"), y_ptr: T.handle("int16")):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((ch * h * wd,), "int16", data=x_ptr)
        y = T.decl_buffer((ch * oh * ow,), "int16", data=y_ptr)
        acc = T.alloc_buffer((1,), "int32", scope="global")
        for o, r, c in T.grid(ch, oh, ow):
            if is_max:
                acc[0] = T.Cast("int32", x[(o * h + r * sh) * wd + c * sw])
            else:
                acc[0] = 0
            for u in range(kh):
                for v in T.unroll(kw):
                    if is_max:
                        acc[0] = T.Select(T.Cast("int32", x[(o * h + r * sh + u) * wd + c * sw + v]) > acc[0],
                                          T.Cast("int32", x[(o * h + r * sh + u) * wd + c * sw + v]), acc[0])
                    else:
                        acc[0] = acc[0] + T.Cast("int32", x[(o * h + r * sh + u) * wd + c * sw + v])
            if is_max:
                y[(o * oh + r) * ow + c] = out(acc[0])
            else:
                y[(o * oh + r) * ow + c] = out(acc[0] * recip)

    return f


def relu(size: int) -> tirx.PrimFunc:
    @T.prim_func(private=True, s_tir=True)
    def f(x_ptr: T.handle("int16"), y_ptr: T.handle("int16")):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((size,), "int16", data=x_ptr)
        y = T.decl_buffer((size,), "int16", data=y_ptr)
        for i in range(size):
            y[i] = T.Select(x[i] > T.int16(0), x[i], T.int16(0))

    return f


DSP_HEADER = """/* Generated by tvm-scalpel: the M4's dual 16-bit multiply-accumulate for the q15 kernels. */
#ifndef SCALPEL_DSP_H
#define SCALPEL_DSP_H
#include <stdint.h>
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
#include <arm_acle.h>
#else
/* elsewhere (a host build of the same sources): what smlad computes */
static inline int32_t __smlad(int32_t a, int32_t b, int32_t acc) {
  return acc + (int32_t)(int16_t)a * (int16_t)b + (int32_t)(int16_t)(a >> 16) * (int16_t)(b >> 16);
}
#endif
#endif
"""
