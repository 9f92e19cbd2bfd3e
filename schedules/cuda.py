"""CUDA kernel for the grouped-sparse dense layer.

One thread block of one warp per (input, output row): the row's kept weights, group after
group, are spread over the 32 lanes (consecutive lanes read consecutive weights of a group, so
loads coalesce), each lane accumulates its share, and the warp's partial sums are added through
shared memory. Batch > 1 adds a grid dimension. On GPUs the paper prunes nodes, not weights
(sparse weights rarely pay on wide parallel hardware); this kernel is what the measured policy
and the benchmarks compare against.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from tvm_scalpel.errors import ScalpelError

from .spec import F32, LayerSpec, TargetRule

WARP = 32


def grouped_sparse_dense_kernel(spec: LayerSpec) -> tirx.PrimFunc:
    """``y = act(x @ W.T + bias)`` with W in the packed grouped-sparse layout (``spec.pack_grouped_sparse``)."""
    if not spec.sparse:
        raise ValueError("the CUDA kernel is for grouped-sparse layers; dense ones go to dlight")
    g, n, k = spec.group_width, spec.n, spec.k
    with IRBuilder() as builder:
        with T.prim_func(private=True):
            # scheduled by hand: TVM's default GPU rules (dlight) must leave it alone
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True,
                         "scalpel.layers": [spec.to_attr()]})
            batch = tirx.Var("batch", "int64")
            x = T.arg("x", T.buffer((batch, k), F32))
            (values, offsets, indptr, bias) = [T.arg(name, T.buffer(shape, dtype))
                                               for name, shape, dtype in spec.operand_types()]
            y = T.arg("y", T.buffer((batch, n), F32))
            with T.thread_binding(0, batch, thread="blockIdx.y") as b:
                with T.thread_binding(0, n, thread="blockIdx.x") as r:
                    with T.thread_binding(0, WARP, thread="threadIdx.x") as t:
                        partial = T.alloc_buffer((WARP,), F32, scope="shared")
                        acc = T.alloc_buffer((1,), F32, scope="local")
                        T.buffer_store(acc, tirx.const(0, F32), [0])
                        start = indptr[r]
                        count = (indptr[r + 1] - start) * g  # kept weights of the row
                        with T.serial(0, (count + WARP - 1) // WARP) as step:
                            e = step * WARP + t
                            with T.If(e < count):
                                with T.Then():
                                    p = start + e // g
                                    lane = e % g
                                    T.buffer_store(acc, acc[0] + values[p, lane] * x[b, offsets[p] + lane], [0])
                        T.buffer_store(partial, acc[0], [t])
                        T.evaluate(tirx.call_intrin("int32", "tirx.tvm_storage_sync", "shared"))
                        with T.If(t == 0):
                            with T.Then():
                                total = T.alloc_buffer((1,), F32, scope="local")
                                T.buffer_store(total, bias[r], [0])
                                with T.serial(0, WARP) as i:
                                    T.buffer_store(total, total[0] + partial[i], [0])
                                value = total[0]
                                if spec.relu:
                                    value = tirx.max(value, tirx.const(0, F32))
                                T.buffer_store(y, value, [b, r])
    return builder.get()


class CudaRule(TargetRule):
    """Our grouped-sparse kernel; dense layers are left to TVM's GPU pipeline (dlight). The
    kernel has no knobs yet, and takes one layer at a time. Lanes: a warp of 32."""

    name = "cuda"
    dense = False

    def kernel(self, specs: list[LayerSpec]) -> tirx.PrimFunc:
        if len(specs) != 1:
            raise ScalpelError("the CUDA kernels take one layer at a time")
        return grouped_sparse_dense_kernel(specs[0])


RULE = CudaRule()
