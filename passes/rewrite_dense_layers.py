"""``RewriteDenseLayers``: every dense layer becomes a call of one of our scheduled kernels.

A layer whose constant weight is group-sparse enough to pay becomes a call of the grouped-sparse
dense kernel; the others become a call of our dense kernel (TVM's untuned dense is 3-55x slower
than onnxruntime at batch 1 and far more at batch 16, so no layer is left to it). Bias and ReLU
are fused into the kernel.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import tvm
from tvm import relax, tirx

from tvm_scalpel import schedules
from tvm_scalpel.decisions import LayerDecision
from tvm_scalpel.format import GroupedSparseMatrix
from tvm_scalpel.pruning import recover_group_width
from tvm_scalpel.targets import TargetProfile, resolve_target

from .dense_layers import DenseLayer, find_dense_layers
from .graph import GraphRewriter, RewritePlan

log = logging.getLogger("tvm_scalpel.passes")

Mode = Literal["auto", "sparse", "dense"]


# Cost model, in vector-FMA slots per input row. A dense layer costs N*K/simd. A grouped-sparse
# layer costs, per kept group, ceil(g/simd) FMAs plus GROUP_OVERHEAD for reading its index and
# forming the address. Measured on AVX-512 at batch 1 (benchmarks/results/avx512/kernels.md): g=16 beats
# our dense kernel from rate 0.5 on AlexNet fc6/fc7 (memory-bound, 1.9x there) and breaks even
# near 0.5 on LeNet fc1 (L2-resident); CSR (g=1) pays only from ~0.7 on fc6 and ~0.95 on LeNet
# fc1. With 0.5 the model sends g=16 sparse from rate 0.34 and g=1 from ~0.96: right for the
# small layers, pessimistic for CSR on big ones (the traditional baseline, not our path).
GROUP_OVERHEAD = 0.5


def estimated_speedup(sparse: GroupedSparseMatrix, simd_width: int) -> float:
    n, k = sparse.shape
    dense_cost = n * k / float(simd_width)
    per_group = math.ceil(sparse.group_width / simd_width) + GROUP_OVERHEAD
    sparse_cost = max(sparse.n_groups * per_group, 1.0)
    return dense_cost / sparse_cost


class KernelLowering:
    """Chooses and builds the kernel call for one layer (dense, or a conv layer unfolded)."""

    def __init__(self, profile: TargetProfile, mode: Mode, knobs_for=None, dense_kernel_for=None) -> None:
        self.profile = profile
        self.mode = mode
        self.knobs_for = knobs_for
        self.dense_kernel_for = dense_kernel_for

    def tuned_dense(self, layer, batch) -> tirx.PrimFunc | None:
        """A searched kernel (meta_schedule) for a dense layer at a static batch, if one won."""
        if self.dense_kernel_for is None or not isinstance(batch, (int, tirx.IntImm)):
            return None
        n, k = layer.shape
        return self.dense_kernel_for(n, k, int(batch))

    def decide(self, layer: DenseLayer, kind: str = "fc") -> tuple[LayerDecision, GroupedSparseMatrix | None]:
        n, k = layer.shape
        w = layer.weight
        density = float(np.count_nonzero(w)) / w.size
        g = recover_group_width(w, tuple(c for c in (32, 16, 8, 4, 2) if c <= k))
        sparse = GroupedSparseMatrix.from_dense(w, g) if density < 1.0 else None
        speedup = estimated_speedup(sparse, self.profile.simd_width) if sparse else 0.0
        go_sparse = sparse is not None and (
            self.mode == "sparse"
            # on GPUs sparse weights hardly ever pay (the paper prunes nodes there)
            or (self.mode == "auto" and speedup > 1.0 and schedules.supports_dense(self.profile))
        )
        tuned = not go_sparse and self.tuned_dense(layer, tensor_batch(layer.data)) is not None
        decision = LayerDecision(
            index=layer.index,
            name=str(layer.output.name),
            shape=(n, k),
            kernel="grouped-sparse" if go_sparse else ("dense (meta_schedule)" if tuned else "dense"),
            group_width=g if sparse is not None else 0,
            density=density,
            estimated_speedup=speedup,
            weight=w,
            kind=kind,
        )
        return decision, (sparse if go_sparse else None)

    def operands(self, layer, sparse: GroupedSparseMatrix | None, knobs=None, packed: bool = False):
        """``(LayerSpec, kernel name, constant operands)`` of the layer's kernel; ``packed``: a
        dense weight in GEMM panels (the FC kernel's layout; the conv patch kernel reads rows)."""
        n, k = layer.shape
        bias = layer.bias if layer.bias is not None else np.zeros(n, np.float32)
        if sparse is None:
            spec = schedules.layer_spec(self.profile, n, k, layer.relu, knobs=knobs, packed=packed)
            return spec, f"scalpel_dense_{n}x{k}", schedules.pack_dense(spec, layer.weight, bias)
        packed = schedules.pack_grouped_sparse(sparse)  # handles an all-zero layer too
        if knobs is None and self.knobs_for is not None:
            rate = 1.0 - float(np.count_nonzero(layer.weight)) / layer.weight.size
            knobs = self.knobs_for(n, k, sparse.group_width, rate)
        spec = schedules.layer_spec(self.profile, n, k, layer.relu, sparse.group_width,
                                    sparse.n_groups, knobs)
        name = f"scalpel_grouped_sparse_dense_{n}x{k}_g{sparse.group_width}"
        return spec, name, [packed.values, packed.offsets, packed.indptr, bias]

    def call(self, bb: relax.BlockBuilder, layer: DenseLayer, data: relax.Expr,
             sparse: GroupedSparseMatrix | None) -> relax.Expr:
        n, k = layer.shape
        batch = tensor_batch(data)
        out_ty = relax.TensorType((batch, n), "float32")
        tuned = self.tuned_dense(layer, batch) if sparse is None else None
        # our dense kernel reads the weight in GEMM panels; meta_schedule's reads W[N, K] rows
        spec, name, operands = self.operands(layer, sparse, packed=tuned is None)
        args = [data] + [relax.const(a) for a in operands]
        if tuned is not None:  # bias inside, ReLU after: the tuned workload has none
            call = relax.call_tir(bb.add_func(tuned, f"scalpel_tuned_dense_{n}x{k}"), args, out_ty=out_ty)
            return relax.op.nn.relu(bb.emit(call)) if layer.relu else call
        gv = bb.add_func(schedules.kernel(self.profile, [spec]), name)
        return relax.call_tir(gv, args, out_ty=out_ty)


def tensor_batch(data: relax.Expr):
    return data.ty.shape.values[0]


@tvm.transform.module_pass(opt_level=0, name="RewriteDenseLayers")
class RewriteDenseLayers:
    """Rewrite each dense layer ``act(x @ W + b)`` into a call of a scheduled TensorIR kernel.

    For every Relax function, each dense layer found by ``find_dense_layers`` (constant
    weight, optional constant bias and ReLU) is replaced by ``R.call_tir`` of

    * the grouped-sparse dense kernel, when its weight's zeros form groups (g is recovered from
      the zero pattern; g = 1 is CSR) and the cost model says sparse pays (``mode="auto"``), or
      always when there are zeros (``mode="sparse"``);
    * otherwise our dense kernel.

    The weight, bias and sparse operands become constants of the module. Layers the target has
    no kernel for are left as they are, with a warning.

    Parameters
    ----------
    target: a ``TargetProfile``, a ``tvm.target.Target``, "x86" or a JSON target string.
    mode: "auto" (the cost model decides), "sparse" (every layer with zeros) or "dense".
    report: when a list is given, one ``LayerDecision`` per layer is appended to it.
    knobs_for: ``(n, k, g, rate) -> CpuKnobs | None``, e.g. a tuning database's
        ``knobs_for``: the kernel knobs of a grouped-sparse layer (default: the target's).
    dense_kernel_for: ``(n, k, batch) -> PrimFunc | None``: a searched kernel (meta_schedule,
        see ``tvm_scalpel.dense_tuning``) for a dense layer at a static batch, used instead of
        ours where the tuning database says it is faster.
    """

    def __init__(self, target=None, mode: Mode = "auto", report: list[LayerDecision] | None = None,
                 knobs_for=None, dense_kernel_for=None):
        self.profile = resolve_target(target)
        self.mode = mode
        self.report = report
        self.knobs_for = knobs_for
        self.dense_kernel_for = dense_kernel_for

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not schedules.supports(self.profile):
            log.warning("no dense-layer kernels for target kind %r: dense layers left to TVM",
                        self.profile.kind)
            return mod
        lowering = KernelLowering(self.profile, self.mode, self.knobs_for, self.dense_kernel_for)

        def plan_of(func: relax.Function) -> RewritePlan:
            plan = RewritePlan()
            for layer in find_dense_layers(func):
                decision, sparse = lowering.decide(layer)
                if sparse is None and not schedules.supports_dense(self.profile):
                    decision.kernel = f"dense (TVM's {self.profile.kind} pipeline)"
                else:  # the kernel call in place of the layer's output
                    plan.bindings[layer.output] = (
                        lambda bb, visit, layer=layer, sparse=sparse:
                        lowering.call(bb, layer, visit(layer.data), sparse))
                if self.report is not None:
                    self.report.append(decision)
                log.info("layer %s %s -> %s (g=%d, density %.3f)", decision.name,
                         decision.shape, decision.kernel, decision.group_width, decision.density)
            return plan

        return GraphRewriter(mod).rewrite(mod, plan_of)
