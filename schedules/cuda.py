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

from .x86 import F32, LayerSpec

WARP = 32


def grouped_sparse_dense_kernel(spec: LayerSpec) -> tirx.PrimFunc:
    """``y = act(x @ W.T + bias)`` with W in the packed grouped-sparse layout (see x86.py)."""
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


def to_ptx(executable, arch: str) -> str:
    """PTX of every CUDA kernel in a compiled module, built with ``nvcc`` (the TVM wheel has no
    CUDA runtime: its device modules keep CUDA C source)."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    if shutil.which("nvcc") is None:
        raise RuntimeError("nvcc not found")
    sources = [m.inspect_source("") for m in _device_modules(executable.mod)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, src in enumerate(sources):
            cu, ptx = Path(tmp) / f"k{i}.cu", Path(tmp) / f"k{i}.ptx"
            cu.write_text(src)
            run = subprocess.run(["nvcc", "--ptx", f"-arch={arch}", str(cu), "-o", str(ptx)],
                                 capture_output=True, text=True, timeout=300)
            if run.returncode:
                raise RuntimeError(f"nvcc failed: {run.stderr.strip().splitlines()[-1]}")
            out.append(ptx.read_text())
    return "\n".join(out)


def _device_modules(module):
    for m in module.imports:
        if "__global__" in (m.inspect_source("") if _has_source(m) else ""):
            yield m
        yield from _device_modules(m)


def _has_source(module) -> bool:
    try:
        module.inspect_source("")
        return True
    except Exception:
        return False
