"""Shared pieces of the per-pass IR tests (tests/passes/test_*.py).

The Before/Expected modules themselves are written in TVMScript inside each test, next to what
they check; this file only holds what several tests need: a pinned target, numpy references
written independently of ``tvm_scalpel`` (no call into its pruning or format code), and small
IR inspection helpers.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx

from tvm_scalpel.targets import resolve_target

# A pinned AVX2 CPU (fp32 SIMD width 8) rather than the host, so that the kernel choices and
# names the tests expect are the same on an AVX2 and an AVX-512 machine. Nothing is compiled.
HASWELL = resolve_target(tvm.target.Target(
    {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}))
F32 = "float32"


# --------------------------------------------------------------------------- numpy references


def he(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """float32 weights with no zeros of their own (so every zero a pass makes is its own)."""
    w = rng.standard_normal(shape).astype(np.float32)
    w[w == 0] = 0.5
    return w


def rms_prune(w_nk: np.ndarray, g: int, n_remove: int) -> np.ndarray:
    """``w[N, K]`` (K a multiple of g) with its ``n_remove`` weakest groups of g (RMS) zeroed."""
    n, k = w_nk.shape
    groups = w_nk.astype(np.float64).reshape(n, k // g, g)
    rms = np.sqrt((groups**2).mean(axis=2)).reshape(-1)
    out = w_nk.copy().reshape(n, k // g, g)
    for flat in np.argsort(rms, kind="stable")[:n_remove]:
        out[flat // (k // g), flat % (k // g)] = 0.0
    return out.reshape(n, k)


def packed_ref(w_nk: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grouped-sparse kernel operands of ``w[N, K]``, written out group by group:
    ``values[G, g]`` (the kept groups), ``offsets[G]`` (element offset of each group's first
    lane) and ``indptr[N + 1]``. A partial tail group (K not a multiple of g) is moved to start
    at ``K - g`` so that its load stays in bounds: its leading lanes (columns the previous group
    covers) are zero."""
    n, k = w_nk.shape
    values, offsets, indptr = [], [], [0]
    for r in range(n):
        for start in range(0, k, g):
            group = w_nk[r, start:start + g]
            if not np.any(group):
                continue
            offset = min(start, k - g)
            lanes = np.zeros(g, np.float32)
            lanes[start - offset:start - offset + len(group)] = group
            values.append(lanes)
            offsets.append(offset)
        indptr.append(len(values))
    return (np.array(values, np.float32).reshape(-1, g), np.array(offsets, np.int32),
            np.array(indptr, np.int32))


# --------------------------------------------------------------------------- IR inspection


def calls(func: relax.Function, op: str | None = None) -> list[relax.Call]:
    """Every call in ``func`` (of the operator named ``op``, e.g. "relax.call_tir")."""
    found: list[relax.Call] = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) \
                and (op is None or str(expr.op.name) == op):
            found.append(expr)

    relax.analysis.post_order_visit(func, visit)
    return found


def op_names(func: relax.Function) -> list[str]:
    return [str(c.op.name) for c in calls(func)]


def tir_calls(func: relax.Function) -> list[tuple[str, relax.Call]]:
    """``(callee name, call)`` of every ``call_tir`` in ``func``, in post order."""
    return [(str(c.args[0].name_hint), c) for c in calls(func, "relax.call_tir")]


def const_operands(call: relax.Call) -> list[np.ndarray]:
    """The constant operands of a ``call_tir`` (its arguments after the first, the data)."""
    args = list(call.args[1].fields)[1:]
    assert all(isinstance(a, tvm.ir.expr.GenericConst) for a in args), args
    return [a.value.numpy() for a in args]


def signature(func: tirx.PrimFunc) -> list[tuple[str, str]]:
    """``(shape, dtype)`` of every parameter of a PrimFunc, symbolic dims by name."""
    return [(str(list(p.shape)), str(p.dtype)) for p in func.params]


def layer_attrs(func: tirx.PrimFunc) -> list[dict]:
    """The ``scalpel.layers`` attribute of one of our kernels, as plain dicts (the fields a
    layer's kernel is rebuilt from; the schedule knobs left out)."""
    keys = ("n", "k", "relu", "group_width", "n_groups")
    return [{k: int(a[k]) for k in keys} for a in func.attrs["scalpel.layers"]]


def primfunc_names(mod: tvm.IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def assert_main_equal(after: tvm.IRModule, expected: tvm.IRModule) -> None:
    """``main`` of both modules structurally equal; ``map_free_vars`` lets the GlobalVar of a
    callee match the one of the same name in the other module (different names still fail)."""
    tvm.ir.assert_structural_equal(after["main"], expected["main"], map_free_vars=True)


def assert_signatures_equal(after: tvm.IRModule, expected: tvm.IRModule, name: str) -> None:
    """The kernel ``name`` of ``after`` takes the parameters the stub of ``expected`` declares."""
    assert name in primfunc_names(after), (name, primfunc_names(after))
    assert signature(after[name]) == signature(expected[name])
