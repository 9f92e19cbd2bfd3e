"""Calibration for q15: the chain run in float64 numpy on sample inputs, giving each activation's
range and, for each layer with weights, a bound on its accumulator.

Fixed point here is power-of-two (as CMSIS-NN's q15): a tensor with ``f`` fractional bits
stores ``round(v * 2**f)`` in int16. Activations get the most bits that keep the calibration
maximum below 2**14 (one bit of headroom for inputs a little outside the calibration range).
A layer's weights get the most bits that keep them in int16 *and* keep the int32 accumulator,
bounded by ``max sum |w| |x|`` over the calibration set (every partial sum is below it), under
2**30.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .graph import Chain, Layer

ACTIVATION_TOP = 14  # bits: calibration maxima map below 2**14
ACCUMULATOR_TOP = 30  # bits: accumulator bound below 2**30 (int32, 2x margin)


def _conv(x: np.ndarray, w: np.ndarray, stride) -> np.ndarray:
    """``x [N, C, H, W]`` * ``w [CO, C, KH, KW]``, no padding."""
    co, _, kh, kw = w.shape
    sh, sw = stride
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    return np.einsum("nchwuv,ocuv->nohw", windows, w, optimize=True)


def _pool(x: np.ndarray, layer: Layer) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(x, layer.kernel, axis=(2, 3))
    windows = windows[:, :, ::layer.stride[0], ::layer.stride[1]]
    return windows.max(axis=(4, 5)) if layer.op == "maxpool" else windows.mean(axis=(4, 5))


def run_layer(layer: Layer, x: np.ndarray, absolute: bool = False) -> np.ndarray:
    """One layer on a batch ``x [N, *in_shape]`` in float64; ``absolute``: with |w| and |b|
    (on |x|), the bound on every partial sum of the accumulator, before the epilogue."""
    x = x.reshape(len(x), *layer.in_shape).astype(np.float64)
    w = None if layer.weight is None else layer.weight.astype(np.float64)
    b = None if layer.bias is None else layer.bias.astype(np.float64)
    if absolute:
        x, w, b = np.abs(x), np.abs(w), None if b is None else np.abs(b)
    if layer.op == "dense":
        y = x @ w.T + (0 if b is None else b)
    elif layer.op == "conv":
        y = _conv(x, w, layer.stride) + (0 if b is None else b[None, :, None, None])
    elif layer.op in ("maxpool", "avgpool"):
        y = _pool(x, layer)
    elif layer.op == "relu":
        y = np.maximum(x, 0)
    elif layer.op == "pad":
        top, left, bottom, right = layer.pads
        y = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    else:
        raise ValueError(layer.op)
    if layer.relu and not absolute:
        y = np.maximum(y, 0)
    return y


def forward(chain: Chain, x: np.ndarray) -> np.ndarray:
    for layer in chain.layers:
        x = run_layer(layer, x)
    return x.reshape(len(x), -1)


def fraction_bits(maximum: float, top: int) -> int:
    """Most fractional bits with ``maximum * 2**f < 2**top``."""
    if maximum <= 0:
        return top
    return int(top - math.floor(math.log2(maximum)) - 1)


@dataclass(frozen=True)
class LayerScales:
    in_bits: int  # fractional bits of the layer's input
    out_bits: int  # of its output
    weight_bits: int = 0  # of its weights (layers with weights)

    @property
    def shift(self) -> int:
        """Right shift from the accumulator (in_bits + weight_bits) to the output."""
        return self.in_bits + self.weight_bits - self.out_bits


def calibrate(chain: Chain, samples: np.ndarray) -> tuple[int, list[LayerScales]]:
    """``(the input's fractional bits, each layer's scales)`` from calibration ``samples``."""
    x = samples.reshape(len(samples), *chain.input_shape[1:]).astype(np.float64)
    in_bits = fraction_bits(float(np.abs(x).max()), ACTIVATION_TOP)
    first = in_bits
    scales = []
    for layer in chain.layers:
        y = run_layer(layer, x)
        if layer.weight is None:
            out_bits = in_bits  # pooling, ReLU, padding: the same grid as their input
            scales.append(LayerScales(in_bits, out_bits))
        else:
            out_bits = fraction_bits(float(np.abs(y).max()), ACTIVATION_TOP)
            w_bits = fraction_bits(float(np.abs(layer.weight).max()), 15)
            bound = float(run_layer(layer, x, absolute=True).max())
            while w_bits > -16 and bound * 2.0 ** (in_bits + w_bits) >= 2.0 ** ACCUMULATOR_TOP:
                w_bits -= 1
            scales.append(LayerScales(in_bits, out_bits, w_bits))
        x, in_bits = y, out_bits
    return first, scales


def quantize(values: np.ndarray, bits: int, dtype=np.int16) -> np.ndarray:
    info = np.iinfo(dtype)
    q = np.round(np.asarray(values, np.float64) * 2.0 ** bits)
    return np.clip(q, info.min, info.max).astype(dtype)
