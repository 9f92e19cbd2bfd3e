"""``FuseDenseChains``: back-to-back dense-layer kernels become one kernel call."""

from __future__ import annotations

import logging

import tvm
from tvm import ir, relax

from tvm_scalpel import schedules
from tvm_scalpel.schedules import LayerSpec
from tvm_scalpel.targets import resolve_target

from .graph import GraphIndex, GraphRewriter, RewritePlan, op_name

log = logging.getLogger("tvm_scalpel.passes")

LAYERS_ATTR = "scalpel.layers"


def _kernel_specs(mod: tvm.IRModule, call: relax.Expr) -> list[LayerSpec] | None:
    """The layer specs of a ``call_tir`` of one of our dense-layer kernels, else None."""
    if op_name(call) != "relax.call_tir":
        return None
    gv = call.args[0]
    func = mod[gv] if isinstance(gv, ir.GlobalVar) and gv in mod.get_global_vars() else None
    attrs = getattr(func, "attrs", None)
    if attrs is None or LAYERS_ATTR not in attrs:
        return None
    return [LayerSpec.from_attr(a) for a in attrs[LAYERS_ATTR]]


@tvm.transform.module_pass(opt_level=0, name="FuseDenseChains")
class FuseDenseChains:
    """Merge chains of dense-layer kernel calls into one call of a chained kernel.

    Rewrites, inside each dataflow block, ``h = call_tir(k1, (x, *c1)); y = call_tir(k2, (h,
    *c2))`` into ``y = call_tir(k12, (x, *c1, *c2))`` when ``k1`` and ``k2`` are kernels made by
    ``RewriteDenseLayers`` and ``h`` is read by nothing else; longer chains likewise. The chained
    kernel runs the same loops one layer after another, with the intermediate activations in a
    workspace buffer, which saves the Relax VM an allocation, shape work and a call per layer:
    at batch 1, a pruned LeNet layer costs about as much as that overhead.
    """

    def __init__(self, target=None) -> None:
        self.profile = resolve_target(target)

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.profile.kind != "llvm":  # chained kernels are CPU kernels
            return mod

        def plan_of(func: relax.Function) -> RewritePlan:
            plan = RewritePlan()  # the chained call in place of each chain's last binding
            index = GraphIndex(func)
            for block in index.blocks:
                for chain in self._chains(mod, block, index.uses):
                    plan.bindings[chain[-1][0].var] = self._replacement(chain)
            return plan

        return GraphRewriter(mod).rewrite(mod, plan_of)

    @staticmethod
    def _chains(mod, block, uses) -> list[list[tuple[relax.VarBinding, list[LayerSpec]]]]:
        chains: list[list] = []
        open_chain: dict = {}  # var ending a chain -> that chain
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                continue
            specs = _kernel_specs(mod, binding.value)
            if specs is None:
                continue
            data = binding.value.args[1].fields[0]
            prev = open_chain.pop(data, None)
            if prev is not None and uses.get(data) == 1 and prev[-1][1][-1].n == specs[0].k:
                prev.append((binding, specs))
                open_chain[binding.var] = prev
            else:
                chain = [(binding, specs)]
                chains.append(chain)
                open_chain[binding.var] = chain
        return [c for c in chains if len(c) > 1]

    def _replacement(self, chain):
        profile = self.profile
        specs = [s for _, layer_specs in chain for s in layer_specs]
        first_data = chain[0][0].value.args[1].fields[0]
        constants = [c for binding, _ in chain for c in list(binding.value.args[1].fields)[1:]]
        out_ty = chain[-1][0].value.ty
        shape = "_".join(str(s.n) for s in specs)
        log.info("fused %d dense layers into one kernel (%d-%s)", len(specs), specs[0].k, shape)

        def make(bb: relax.BlockBuilder, visit) -> relax.Call:
            gv = bb.add_func(schedules.kernel(profile, specs), f"scalpel_chain_{specs[0].k}_{shape}")
            return relax.call_tir(gv, [visit(first_data)] + constants, out_ty=out_ty)

        return make
