"""CUDA: the grouped-sparse kernel and the node-pruned dense layers compile to PTX with nvcc.
Running needs a GPU and a TVM build with the CUDA runtime (the PyPI wheel keeps CUDA source
only), so here the tests stop at PTX."""

import re
import shutil

import pytest

from tvm_scalpel import compile_onnx, models, prune_onnx
from tvm_scalpel.schedules.toolchains import to_ptx

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")


@pytest.fixture(scope="module")
def pruned():
    return prune_onnx(models.mlp([72, 40, 24, 5], seed=13), 0.8, "cuda:sm_90", 8).model


def test_sparse_mode_uses_our_cuda_kernel(pruned):
    built = compile_onnx(pruned, "cuda:sm_90", mode="sparse")
    assert [d.kernel for d in built.layers] == ["grouped-sparse"] * 3
    assert [d.group_width for d in built.layers] == [8, 8, 8]
    entries = re.findall(r"\.entry\s+(\w+)", to_ptx(built.executable, "sm_90"))
    assert sorted(entries) == sorted(f"scalpel_grouped_sparse_dense_{n}x{k}_g8_kernel"
                                     for n, k in [(40, 72), (24, 40), (5, 24)])


def test_auto_mode_leaves_dense_layers_to_tvm_on_gpus(pruned):
    """On GPUs the cost model never prefers sparse weights; TVM's dlight rules schedule them."""
    built = compile_onnx(pruned, "cuda:sm_90")
    assert all(d.kernel.startswith("dense (TVM") for d in built.layers)
    entries = re.findall(r"\.entry\s+(\w+)", to_ptx(built.executable, "sm_90"))
    assert len(entries) == 3 and not any(e.startswith("scalpel") for e in entries)
