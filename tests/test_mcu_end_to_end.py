"""The whole M4 path as a user runs it: ``compile --target cortex-m4`` (the generator), then
the firmware under qemu (``run``), against onnxruntime on the same (pruned) ONNX, for
LeNet-300-100, LeNet-5 (pruned by the rules: grouped-sparse FC and CONV, g = 2) and an MLP
that is none of the built-in networks. Needs ``make setup-mcu``; skipped without."""

import numpy as np
import pytest
from helpers import ort_run, rel_err

from tvm_scalpel import flows, models
from tvm_scalpel.data import mnist_sample
from tvm_scalpel.mcu.firmware import mcu_ready, run_project

REASON = mcu_ready()
if REASON is not None:
    pytest.skip(REASON, allow_module_level=True)

CASES = {
    "lenet-300-100 rules": lambda: flows.prune(models.build("lenet-300-100"), 0.92, target="cortex-m4",
                                               policy="rules", last_layer_rate=0.7).model,
    "lenet5 rules": lambda: flows.prune(models.build("lenet5"), 0.9, target="cortex-m4", policy="rules",
                                        conv_rate=0.8).model,
    "held-out mlp": lambda: flows.prune(models.mlp([64, 48, 5], seed=21, layout="matmul"), 0.75,
                                        target="cortex-m4", group_width=4).model,
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_firmware_equals_onnxruntime(case, rng, tmp_path):
    model = CASES[case]()
    project = flows.compile_mcu(model, tmp_path / "p")
    assert any(layer.kind.startswith("grouped-sparse") for layer in project.layers)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = rng.standard_normal((4, *shape[1:])).astype(np.float32)
    run = run_project(tmp_path / "p", x)
    ref = ort_run(model, x)
    assert run.outputs.shape == ref.shape and rel_err(run.outputs, ref) < 1e-4
    assert run.per_call > 0


def test_q15_firmware_keeps_the_float_models_classes(tmp_path):
    """q15 under qemu on MNIST test images (the calibration's kind of data), against the float
    model in onnxruntime (the host build of the same C is checked on 1,000 images in
    test_mcu_q15.py)."""
    model = CASES["lenet5 rules"]()
    flows.compile_mcu(model, tmp_path / "p", numerics="q15")
    x = mnist_sample().x_test[:20].reshape(-1, 1, 28, 28).astype(np.float32)
    run = run_project(tmp_path / "p", x)
    ref = ort_run(model, x)
    assert np.mean(run.outputs.argmax(1) == ref.argmax(1)) >= 0.95
    assert rel_err(run.outputs, ref) < 2e-2
