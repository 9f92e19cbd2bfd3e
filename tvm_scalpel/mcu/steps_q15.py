"""The q15 project's steps: the float input quantized into the arena, every layer in int16
with its calibrated scales (calibrate.py), and the last activation dequantized into the
caller's float output. Weights in flash are int16 (grouped-sparse where pruned), biases int32
at the accumulator's scale. The interface stays ``scalpel_model_run(const float *, float *)``.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from . import kernels_q15 as kq
from .calibrate import LayerScales, calibrate, quantize
from .graph import Chain, Layer
from .kernels import patch_offsets
from .steps import ConstArray, Step, choose_format

I16, I32 = "int16_t", "int32_t"


def _q_step(layer: Layer, symbol: str, kind: str, fn, arrays=(), g: int = 0, density: float = 1.0) -> Step:
    return Step(layer, symbol, kind, fn, list(arrays), g, density, in_ctype=I16, out_ctype=I16, bias_ctype=I32)


def _sparse_arrays(prefix: str, sparse, bits: int) -> list[ConstArray]:
    g = sparse.group_width
    vals = sparse.values.reshape(-1) if sparse.n_groups else np.zeros(g, np.float32)
    cols = sparse.group_cols if sparse.n_groups else np.zeros(1, np.int32)
    return [ConstArray(f"{prefix}_values", "values (q15)", quantize(vals, bits)),
            ConstArray(f"{prefix}_group_cols", "group column indices", np.ascontiguousarray(cols, np.int32)),
            ConstArray(f"{prefix}_indptr", "row pointers", np.ascontiguousarray(sparse.indptr, np.int32))]


def _bias(layer: Layer, prefix: str, scales: LayerScales) -> list[ConstArray]:
    if layer.bias is None or not np.any(layer.bias != 0):
        return []
    bits = scales.in_bits + scales.weight_bits
    return [ConstArray(f"{prefix}_bias", "bias (int32, accumulator scale)",
                       quantize(layer.bias, bits, np.int32))]


def _weighted(index: int, layer: Layer, scales: LayerScales, mode: str) -> Step:
    prefix = f"scalpel_l{index}"
    symbol = f"{prefix}_{layer.op}_q15"
    bias = _bias(layer, prefix, scales)
    w2d = layer.weight.reshape(layer.weight.shape[0], -1)
    # the format is chosen on the float weights, so q15 and fp32 prune and group alike
    sparse = choose_format(w2d, mode)
    density = float(np.count_nonzero(w2d)) / w2d.size
    bits, shift = scales.weight_bits, scales.shift
    if layer.op == "dense":
        n, k = w2d.shape
        if sparse is None:
            fn = kq.dense(n, k, shift, layer.relu, bool(bias))
            arrays = [ConstArray(f"{prefix}_weight", "weights (q15)", quantize(w2d.reshape(-1), bits))]
            return _q_step(layer, symbol, "dense", fn, arrays + bias, 0, density)
        fn = kq.grouped_sparse(sparse, shift, layer.relu, bool(bias))
        return _q_step(layer, symbol, "grouped-sparse", fn, _sparse_arrays(prefix, sparse, bits) + bias,
                       sparse.group_width, density)
    if sparse is None:
        fn = kq.conv(layer.in_shape, layer.out_shape, layer.kernel, layer.stride, shift, layer.relu, bool(bias))
        arrays = [ConstArray(f"{prefix}_weight", "weights (q15)", quantize(layer.weight.reshape(-1), bits))]
        return _q_step(layer, symbol, "conv", fn, arrays + bias, 0, density)
    offsets = patch_offsets(layer.in_shape, layer.kernel, sparse.group_width)
    fn = kq.grouped_sparse_conv(sparse, layer.in_shape, layer.out_shape, layer.kernel, layer.stride,
                                shift, layer.relu, bool(bias))
    arrays = _sparse_arrays(prefix, sparse, bits) + [ConstArray(f"{prefix}_patch_offsets", "patch offsets", offsets)]
    return _q_step(layer, symbol, "grouped-sparse conv", fn, arrays + bias, sparse.group_width, density)


def make_q15_steps(chain: Chain, samples: np.ndarray, mode: str) -> tuple[list[Step], list[LayerScales]]:
    input_bits, scales = calibrate(chain, samples)
    first, last = chain.layers[0], chain.layers[-1]
    entry = Layer("quantize", "quantize", first.in_shape, first.in_shape)
    steps = [Step(entry, "scalpel_quantize", "quantize (float -> q15)",
                  kq.quantize(first.in_size, input_bits), in_ctype="float", out_ctype=I16)]
    for i, (layer, s) in enumerate(zip(chain.layers, scales)):
        symbol = f"scalpel_l{i}_{layer.op}_q15"
        if layer.weight is not None:
            steps.append(_weighted(i, layer, s, mode))
        elif layer.op in ("maxpool", "avgpool"):
            steps.append(_q_step(layer, symbol, layer.op, kq.pool(layer.op, layer.in_shape, layer.out_shape,
                                                                  layer.kernel, layer.stride, layer.relu)))
        elif layer.op == "relu":
            steps.append(_q_step(layer, symbol, "relu", kq.relu(layer.in_size)))
        else:
            steps.append(_q_step(layer, symbol, "pad", kernels.pad(layer.in_shape, layer.out_shape, layer.pads, "int16")))
    exit_ = Layer("dequantize", "dequantize", last.out_shape, last.out_shape)
    steps.append(Step(exit_, "scalpel_dequantize", "dequantize (q15 -> float)",
                      kq.dequantize(last.out_size, scales[-1].out_bits), in_ctype=I16, out_ctype="float"))
    return steps, scales
