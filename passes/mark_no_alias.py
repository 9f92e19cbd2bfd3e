"""``MarkNoAlias``: every PrimFunc of the module that reads at most one buffer is marked
``tirx.noalias`` (vacuously true: a single buffer cannot alias another).

Why: TVM 0.27's LLVM build drops the ``noalias`` guarantee of EVERY function in a module as
soon as one function of it lacks ``tirx.noalias``. The Relax VM's ``shape_func`` (made by
``VMShapeLower`` for a model with a symbolic batch, one ``int64`` shape-heap buffer) is such a
function, so every kernel of a model with a symbolic batch lost it: measured on Zen 4, one
thread, ResNet-18's 64x64 3x3 conv at 56x56 ran 2.4x slower inside the whole model's library
(6.4 ms) than compiled alone (2.6 ms), and the whole network 2.5x slower than with a fixed
batch. Run it last, after TVM's default Relax pipeline (which makes ``shape_func``).
"""

from __future__ import annotations

import tvm
from tvm import tirx

NO_ALIAS = "tirx.noalias"


def _buffer_params(func: tirx.PrimFunc) -> int:
    """Parameters that are buffers or raw handles (what could alias each other)."""
    return sum(1 for p in func.params
               if isinstance(getattr(p, "ty", None), tirx.BufferType) or str(p.dtype) == "handle")


@tvm.transform.module_pass(opt_level=0, name="MarkNoAlias")
class MarkNoAlias:
    """Mark single-buffer PrimFuncs ``tirx.noalias`` (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and NO_ALIAS in func.attrs:
                continue
            if _buffer_params(func) <= 1:
                updates[gv] = func.with_attr(NO_ALIAS, True)
        if not updates:
            return mod
        funcs = {gv: updates.get(gv, func) for gv, func in mod.functions_items()}
        return tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)
