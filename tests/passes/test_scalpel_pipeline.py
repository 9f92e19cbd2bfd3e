"""IR tests of ``scalpel_pipeline``: the passes it composes, in order, and what they make of a
small MLP together: pruned (numpy's RMS rule), rewritten to grouped-sparse kernels, fused."""

import pytest
import tvm
from builders import HASWELL, assert_main_equal, he, layer_attrs, packed_ref, primfunc_names, rms_prune
from tvm.script import ir as I, relax as R, tirx as T

from tvm_scalpel.passes import scalpel_pipeline


def mlp(w0_nk, b0, w1_kn, b1):
    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor(("n", 16), "float32")) -> R.Tensor(("n", 4), "float32"):
            n = T.int64()
            with R.dataflow():
                wt = R.permute_dims(R.const(w0_nk), axes=[1, 0])
                h = R.matmul(x, wt)
                hb = R.add(h, R.const(b0))
                hr = R.nn.relu(hb)
                y = R.matmul(hr, R.const(w1_kn))
                yb = R.add(y, R.const(b1))
                R.output(yb)
            return yb

    return Module


def names(seq) -> list[str]:
    return [str(p.info.name) for p in seq.passes]


def test_passes_in_order():
    with_rate = names(scalpel_pipeline(HASWELL, rate=0.5))
    assert with_rate[:5] == ["PruneWeightGroups", "RewriteConvLayers", "RewriteDenseLayers",
                             "FuseDenseChains", "SimplifyPower"]
    # then TVM's default CPU pipeline with our elementwise rule, then MarkNoAlias over what
    # that pipeline added
    assert with_rate[5:] == ["ScalpelCpuBackend", "MarkNoAlias"]
    assert names(scalpel_pipeline(HASWELL))[:3] == ["RewriteConvLayers", "RewriteDenseLayers",
                                                    "FuseDenseChains"]


@pytest.fixture
def weights(rng):
    return he(rng, 8, 16), he(rng, 8), he(rng, 8, 4), he(rng, 4)


def test_prune_rewrite_fuse(weights):
    w0, b0, w1_kn, b1 = weights
    pipeline = scalpel_pipeline(HASWELL, rate=0.5, group_width=4, mode="sparse")
    scalpel_part = tvm.transform.Sequential(list(pipeline.passes)[:-2])
    after = scalpel_part(mlp(w0, b0, w1_kn, b1))
    # 16 of layer 0's 32 groups of 4 go, 4 of layer 1's 8; both layers in one chained kernel
    v0, o0, p0 = packed_ref(rms_prune(w0, 4, 16), 4)
    v1, o1, p1 = packed_ref(rms_prune(w1_kn.T.copy(), 4, 4), 4)

    @I.ir_module(check_well_formed=False)  # a stub of the chained kernel: only main is compared
    class Expected:
        @T.prim_func(private=True)
        def scalpel_chain_16_8_4(x: T.handle):
            T.evaluate(0)

        @R.function
        def main(x: R.Tensor(("n", 16), "float32")) -> R.Tensor(("n", 4), "float32"):
            n = T.int64()
            cls = Expected
            with R.dataflow():
                y = R.call_tir(cls.scalpel_chain_16_8_4,
                               (x, R.const(v0), R.const(o0), R.const(p0), R.const(b0),
                                R.const(v1), R.const(o1), R.const(p1), R.const(b1)),
                               out_ty=R.Tensor((n, 4), "float32"))
                R.output(y)
            return y

    assert_main_equal(after, Expected)
    assert layer_attrs(after["scalpel_chain_16_8_4"]) == [
        {"n": 8, "k": 16, "relu": 1, "group_width": 4, "n_groups": 16},
        {"n": 4, "k": 8, "relu": 0, "group_width": 4, "n_groups": 4}]


def test_whole_pipeline_keeps_our_kernel(weights):
    """Through TVM's default pipeline too: the module stays well formed, the chained kernel is
    what remains of the layers (no legalized matmul), the unfused kernels are gone."""
    with HASWELL.target:
        lowered = scalpel_pipeline(HASWELL, rate=0.5, group_width=4, mode="sparse")(mlp(*weights))
    tvm.relax.analysis.well_formed(lowered)
    kernels = primfunc_names(lowered)
    assert "scalpel_chain_16_8_4" in kernels
    assert not any("matmul" in k or "grouped_sparse_dense" in k for k in kernels), kernels
