"""MarkNoAlias: after the whole pipeline every PrimFunc is tirx.noalias (one without it makes
TVM's LLVM build drop no-alias for all kernels of the module: 2.5x slower convs)."""

import numpy as np
import onnx
import tvm
from onnx import TensorProto, helper, numpy_helper

from tvm_scalpel.onnx_io import to_relax
from tvm_scalpel.passes import MarkNoAlias, scalpel_pipeline
from tvm_scalpel.targets import resolve_target


def _conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_every_primfunc_is_no_alias_after_pipeline_with_symbolic_batch():
    profile = resolve_target(None)
    with profile.target:
        mod = scalpel_pipeline(profile)(to_relax(_conv_model()))
    prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert "shape_func" in prims  # the symbolic batch makes one
    assert all(f.attrs is not None and "tirx.noalias" in f.attrs for f in prims.values())


def test_two_buffer_function_is_left_alone():
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def add_one(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
        for i in range(4):
            b[i] = a[i] + T.float32(1)

    mod = MarkNoAlias()(tvm.IRModule({"add_one": add_one}))
    attrs = mod["add_one"].attrs
    assert attrs is None or "tirx.noalias" not in attrs
