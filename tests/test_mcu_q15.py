"""q15 Cortex-M4 projects (``compile --target cortex-m4 --numerics q15``): int16 weights and
activations with calibrated power-of-two scales, ``__smlad`` on pairs.

As for fp32 (test_mcu_project.py), the generated C is compiled for this machine (``__smlad``
from the project's portable definition) and compared with onnxruntime's float outputs on the
same ONNX model: the same top-1 class on >= 99% of the MNIST sample's test images (fresh
random inputs for the models MNIST does not fit), and a small relative error.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from helpers import ort_run, rel_err
from test_mcu_project import _padded_cnn, _pruned, host_run, needs_arm_gcc, needs_gcc
from tvm_scalpel import flows, models
from tvm_scalpel.data import Dataset, mnist_sample
from tvm_scalpel.mcu.calibrate import ACCUMULATOR_TOP, calibrate, run_layer
from tvm_scalpel.mcu.graph import read_chain


def _random_data(shape, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((600, *shape)).astype(np.float32)
    y = np.zeros(600, np.int64)
    return Dataset(x[:500], y[:500], x[500:], y[500:], "random")


CASES = {
    "lenet-300-100 pruned g=2": (lambda: _pruned("lenet-300-100", group_width=2), None),
    "lenet-300-100 dense": (lambda: models.build("lenet-300-100"), None),
    "lenet5 pruned g=2": (lambda: _pruned("lenet5", group_width=2), None),
    "held-out mlp g=4": (lambda: flows.prune(models.mlp([100, 30, 7], seed=11, layout="matmul"), 0.8,
                                             target="cortex-m4", group_width=4).model,
                         lambda: _random_data((100,), 5)),
    "padded cnn": (_padded_cnn, lambda: _random_data((2, 9, 10), 6)),
}


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    root = tmp_path_factory.mktemp("q15")
    out = {}
    for i, (name, (build, data)) in enumerate(CASES.items()):
        model = build()
        data = data() if data else mnist_sample()
        project = flows.compile_mcu(model, root / f"q{i}", numerics="q15", data=data)
        out[name] = (model, project, root / f"q{i}", data)
    return out


@needs_gcc
@pytest.mark.parametrize("case", list(CASES))
def test_q15_agrees_with_float_onnxruntime(projects, case, rng, tmp_path):
    model, project, folder, data = projects[case]
    if data.name == "random":  # inputs the calibration never saw
        x = rng.standard_normal((300, *project.chain.input_shape[1:])).astype(np.float32)
    else:
        x = data.x_test.reshape(len(data.x_test), *project.chain.input_shape[1:]).astype(np.float32)
    y, ref = host_run(folder, x, tmp_path), ort_run(model, x)
    assert np.mean(y.argmax(axis=1) == ref.argmax(axis=1)) >= 0.99
    assert rel_err(y, ref) < 0.02


def test_q15_layout(projects):
    _, project, folder, _ = projects["lenet5 pruned g=2"]
    kinds = [layer.kind for layer in project.layers]
    assert kinds[0].startswith("quantize") and kinds[-1].startswith("dequantize")
    assert kinds[1:-1] == ["grouped-sparse conv", "maxpool", "grouped-sparse conv", "maxpool",
                           "grouped-sparse", "grouped-sparse"]
    meta = (folder / "model.json").read_text()
    assert '"numerics": "q15"' in meta
    # int16 values: half the fp32 values' bytes, indices unchanged
    fp32 = flows.compile_mcu(projects["lenet5 pruned g=2"][0])
    for q, f in zip([layer for layer in project.layers if layer.group_width],
                    [layer for layer in fp32.layers if layer.group_width]):
        assert q.flash_bytes < f.flash_bytes
    assert project.ram_bytes < fp32.ram_bytes
    source = (folder / "kernels.c").read_text()
    assert source.count("__smlad(") >= 2 and "scalpel_dsp.h" in source


def test_calibration_bounds_every_accumulator():
    """The weight bits leave the accumulator's bound (sum |w||x| over the calibration set)
    under 2**30: no int32 overflow on anything like the calibration data."""
    chain = read_chain(_pruned("lenet5", group_width=2))
    x = mnist_sample().x_train[:256].reshape(-1, 1, 28, 28)
    first, scales = calibrate(chain, x)
    assert first == 13  # MNIST pixels are in [0, 1]: 1.0 -> 8192
    act = x.astype(np.float64)
    for layer, s in zip(chain.layers, scales):
        if layer.weight is not None:
            bound = run_layer(layer, act, absolute=True).max()
            assert bound * 2.0 ** (s.in_bits + s.weight_bits) < 2.0 ** ACCUMULATOR_TOP
            assert np.abs(layer.weight).max() * 2.0 ** s.weight_bits <= 32767.5
        out = run_layer(layer, act)
        assert np.abs(out).max() * 2.0 ** s.out_bits < 2.0 ** 14
        act = out


@needs_arm_gcc
def test_q15_builds_for_the_m4_with_smlad(projects, tmp_path):
    _, project, folder, _ = projects["lenet-300-100 pruned g=2"]
    work = tmp_path / "p"
    shutil.copytree(folder, work)
    res = subprocess.run(["make", "-C", str(work)], capture_output=True, text=True)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr[-3000:]
    asm = subprocess.run(["arm-none-eabi-objdump", "-d", str(work / "kernels.o")],
                         capture_output=True, text=True, check=True).stdout
    assert asm.count("smlad") >= 3  # one in each grouped-sparse layer's group loop (g = 2)
    sizes = {}
    for obj in ("weights.o", "model.o"):
        out = subprocess.run(["arm-none-eabi-size", str(work / obj)], capture_output=True, text=True, check=True)
        sizes[obj] = tuple(map(int, out.stdout.splitlines()[1].split()[:3]))
    assert sizes["weights.o"] == (project.flash_bytes, 0, 0)
    assert sizes["model.o"][1:] == (0, project.ram_bytes)


def test_q15_cli(tmp_path):
    from helpers import run_cli

    res = run_cli("compile", "lenet-300-100", "--target", "cortex-m4", "-o", tmp_path / "q",
                  "--numerics", "q15")
    assert res.returncode == 0, res.stderr
    assert "q15" in res.stdout and "quantize" in res.stdout
    res = run_cli("compile", "lenet5", "--target", "cortex-m4", "-o", tmp_path / "bad",
                  "--numerics", "q15", "--data", tmp_path / "missing.npz")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and not (tmp_path / "bad").exists()
