"""The built-in networks: structure, onnxruntime, TVM's ONNX importer and our compiled models
(small variants of the big ones: AlexNet / VGG-11 at full size have 61M / 133M weights)."""

from collections import Counter

import numpy as np
import onnx
import pytest
from helpers import ort_run, rel_err, run_cli, vm_run
from tvm.relax.frontend.onnx import from_onnx

from tvm_scalpel import compile_onnx, models

# name -> (builder kwargs of a small variant, input shape, classes, conv layers, FC layers)
SMALL = {
    "convnet": ({}, (3, 32, 32), 10, 3, 1),
    "nin": ({"scale": 0.125}, (3, 32, 32), 10, 9, 0),
    "alexnet": ({"scale": 1 / 16}, (3, 224, 224), 1000, 5, 3),
    "vgg11": ({"scale": 1 / 16, "image": 32, "classes": 100}, (3, 32, 32), 100, 8, 3),
    "resnet18": ({"scale": 1 / 8, "image": 64, "classes": 100}, (3, 64, 64), 100, 20, 1),
}


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("name", SMALL)
def test_builder_structure_and_onnxruntime(name):
    kwargs, shape, classes, convs, fcs = SMALL[name]
    model = models.BUILDERS[name](seed=1, **kwargs)
    onnx.checker.check_model(model)
    assert model.ir_version <= 13  # onnxruntime reads IR <= 13 only
    count = ops(model)
    assert count["Conv"] == convs and count["Gemm"] == fcs
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert all({a.name: a.i for a in n.attribute if a.name == "transB"} == {"transB": 1} for n in gemms)
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    y = ort_run(model, x)
    assert y.shape == (2, classes) and np.all(np.isfinite(y)) and y.std() > 0
    # deterministic from the seed, different across seeds
    again = models.BUILDERS[name](seed=1, **kwargs)
    other = models.BUILDERS[name](seed=2, **kwargs)
    w = [i.raw_data for i in model.graph.initializer]
    assert w == [i.raw_data for i in again.graph.initializer]
    assert w != [i.raw_data for i in other.graph.initializer]


def test_paper_layer_shapes():
    """The geometry of the full-size networks (narrow variants: the spatial sizes, and so
    the FC inputs, do not depend on the width)."""
    def gemm_inputs(model):
        inits = {i.name: i for i in model.graph.initializer}
        return [tuple(inits[n.input[1]].dims) for n in model.graph.node if n.op_type == "Gemm"]

    assert gemm_inputs(models.convnet()) == [(10, 1024)]  # 64 maps of 4x4, as cifar10_full
    assert gemm_inputs(models.alexnet(scale=1 / 16))[0] == (256, 16 * 6 * 6)  # 256x6x6 at full width
    assert gemm_inputs(models.vgg11(scale=1 / 16))[0] == (256, 32 * 7 * 7)  # 512x7x7 at full width
    count = ops(models.resnet18(scale=1 / 8))
    assert count["BatchNormalization"] == 20 and count["Add"] == 8 and count["GlobalAveragePool"] == 1
    assert ops(models.nin(scale=1 / 8))["GlobalAveragePool"] == 1


@pytest.mark.parametrize("name", SMALL)
def test_builder_compiles_against_onnxruntime(name, rng):
    """TVM's importer takes it, and our compiled model matches onnxruntime (batch 1 and 3)."""
    kwargs, shape, classes, _, _ = SMALL[name]
    model = models.BUILDERS[name](seed=3, **kwargs)
    from_onnx(model, keep_params_in_input=False)
    exe = compile_onnx(model).executable
    for batch in (1, 3):
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        assert rel_err(vm_run(exe, x), ort_run(model, x)) < 1e-4, f"batch {batch}"


def test_cli_takes_builtin_names(tmp_path):
    assert set(SMALL) | {"lenet-300-100", "lenet5"} == set(models.BUILDERS)
    out = tmp_path / "convnet.onnx"
    res = run_cli("prune", "convnet", "-o", out, "--rate", "0.5")
    assert res.returncode == 0, res.stderr
    pruned = onnx.load(out)
    fc = next(i for i in pruned.graph.initializer if i.name == "fc1.weight")
    w = onnx.numpy_helper.to_array(fc)
    assert w.shape == (10, 1024) and abs((w == 0).mean() - 0.5) < 0.05
