"""An ONNX model as the chain of layers a Cortex-M4 project runs, one sample at a time.

The microcontroller path takes chains: every node reads the previous node's output (and
constant initializers). Layers: dense (Gemm, MatMul [+ Add]), conv (Conv, its padding as a
separate pad layer), max / average pooling, ReLU (fused into the layer before it when it can
be), and the reshapes that do not move data in NCHW order (Flatten, Reshape to [1, -1]). Any
other op, a branch, or a dynamic shape is a one-line ``ScalpelError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ScalpelError

TAKEN = ("Gemm", "MatMul", "Add (bias of a MatMul)", "Conv", "MaxPool", "AveragePool", "Relu",
         "Flatten", "Reshape")


@dataclass
class Layer:
    """One step of the chain. ``in_shape`` / ``out_shape`` are per sample (no batch axis)."""

    name: str
    op: str  # "dense" | "conv" | "maxpool" | "avgpool" | "relu" | "pad"
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight: np.ndarray | None = None  # dense [N, K]; conv [CO, CI, KH, KW]
    bias: np.ndarray | None = None
    weight_name: str = ""  # the ONNX initializer it came from
    relu: bool = False  # ReLU fused into the epilogue
    kernel: tuple[int, int] = (1, 1)  # conv / pool window
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # pad layer: top, left, bottom, right
    attrs: dict = field(default_factory=dict)

    @property
    def in_size(self) -> int:
        return int(np.prod(self.in_shape))

    @property
    def out_size(self) -> int:
        return int(np.prod(self.out_shape))


@dataclass
class Chain:
    input_name: str
    input_shape: tuple[int, ...]  # with the batch axis (1)
    output_name: str
    output_shape: tuple[int, ...]
    layers: list[Layer]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _static_input(model: onnx.ModelProto) -> tuple[str, tuple[int, ...]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise ScalpelError(f"the cortex-m4 path takes models with one input, this one has {len(inputs)}")
    value = inputs[0]
    if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ScalpelError(f"input {value.name!r}: the cortex-m4 path takes float32 inputs")
    dims = value.type.tensor_type.shape.dim
    shape = [1] + [d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:]]
    if not dims or any(s <= 0 for s in shape):
        raise ScalpelError(f"input {value.name!r} has a dynamic shape besides the batch axis: "
                           "the cortex-m4 path needs static sizes")
    return value.name, tuple(shape)


def _pool_out(size: int, k: int, s: int, pad: int = 0) -> int:
    return (size + pad - k) // s + 1


class _Reader:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.layers: list[Layer] = []

    def const(self, node: onnx.NodeProto, i: int) -> np.ndarray:
        name = node.input[i] if len(node.input) > i else ""
        if name not in self.inits:
            raise ScalpelError(f"node {node.name or node.op_type} ({node.op_type}): input {i} "
                               "must be a constant initializer on the cortex-m4 path")
        return self.inits[name].astype(np.float32)

    def dense(self, node, shape, attrs) -> Layer:
        if len(shape) != 1:
            raise ScalpelError(f"node {node.name or node.op_type} ({node.op_type}): takes a "
                               f"flat input on the cortex-m4 path, got shape {shape}")
        w = self.const(node, 1)
        if node.op_type == "Gemm":
            if attrs.get("transA", 0):
                raise ScalpelError(f"node {node.name or 'Gemm'}: transA=1 is not taken on the cortex-m4 path")
            w = w if attrs.get("transB", 0) else w.T
            w = w * np.float32(attrs.get("alpha", 1.0))
            bias = self.const(node, 2) * np.float32(attrs.get("beta", 1.0)) if len(node.input) > 2 and node.input[2] else None
        else:
            w, bias = w.T, None
        n, k = w.shape
        if k != shape[0]:
            raise ScalpelError(f"node {node.name or node.op_type}: weight takes {k} inputs, gets {shape[0]}")
        if bias is not None:
            bias = np.broadcast_to(bias.reshape(-1), (n,)).astype(np.float32)
        return Layer(node.name or node.output[0], "dense", shape, (n,), np.ascontiguousarray(w, np.float32),
                     bias, weight_name=node.input[1])

    def conv(self, node, shape, attrs) -> list[Layer]:
        if len(shape) != 3:
            raise ScalpelError(f"node {node.name or 'Conv'}: takes a [C, H, W] input, got {shape}")
        if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise ScalpelError(f"node {node.name or 'Conv'}: grouped or dilated convolutions are not "
                               "taken on the cortex-m4 path")
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            raise ScalpelError(f"node {node.name or 'Conv'}: auto_pad is not taken on the cortex-m4 path; "
                               "give explicit pads")
        w = self.const(node, 1)
        co, ci, kh, kw = w.shape
        if ci != shape[0]:
            raise ScalpelError(f"node {node.name or 'Conv'}: weight takes {ci} channels, gets {shape[0]}")
        bias = self.const(node, 2) if len(node.input) > 2 and node.input[2] else None
        pads = tuple(attrs.get("pads", [0, 0, 0, 0]))
        sh, sw = attrs.get("strides", [1, 1])
        out: list[Layer] = []
        c, h, wd = shape
        if any(pads):
            top, left, bottom, right = pads[0], pads[1], pads[2], pads[3]
            padded = (c, h + top + bottom, wd + left + right)
            out.append(Layer(f"{node.name or node.output[0]}.pad", "pad", shape, padded,
                             pads=(top, left, bottom, right)))
            shape, h, wd = padded, padded[1], padded[2]
        oh, ow = _pool_out(h, kh, sh), _pool_out(wd, kw, sw)
        out.append(Layer(node.name or node.output[0], "conv", shape, (co, oh, ow), w, bias,
                         weight_name=node.input[1], kernel=(kh, kw), stride=(sh, sw)))
        return out

    def pool(self, node, shape, attrs) -> Layer:
        if len(shape) != 3:
            raise ScalpelError(f"node {node.name or node.op_type}: takes a [C, H, W] input, got {shape}")
        if any(attrs.get("pads", [0])) or attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", [1])):
            raise ScalpelError(f"node {node.name or node.op_type}: padded, ceil-mode or dilated "
                               "pooling is not taken on the cortex-m4 path")
        kh, kw = attrs["kernel_shape"]
        sh, sw = attrs.get("strides", [1, 1])
        c, h, w = shape
        op = "maxpool" if node.op_type == "MaxPool" else "avgpool"
        return Layer(node.name or node.output[0], op, shape, (c, _pool_out(h, kh, sh), _pool_out(w, kw, sw)),
                     kernel=(kh, kw), stride=(sh, sw))


def read_chain(model: onnx.ModelProto) -> Chain:
    """The model as a chain of ``Layer``s; a one-line error for anything the M4 path does not take."""
    input_name, input_shape = _static_input(model)
    reader = _Reader(model)
    layers = reader.layers
    current, shape = input_name, tuple(input_shape[1:])
    nodes = list(model.graph.node)
    i = 0
    while i < len(nodes):
        node = nodes[i]
        label = node.name or node.output[0]
        data_inputs = [x for x in node.input if x and x not in reader.inits]
        if node.op_type == "Constant":
            raise ScalpelError(f"node {label} (Constant): give constants as initializers on the cortex-m4 path")
        if data_inputs != [current]:
            raise ScalpelError(f"node {label} ({node.op_type}) does not read the previous layer's "
                               "output alone: the cortex-m4 path takes chains of layers")
        attrs = _attrs(node)
        op = node.op_type
        if op in ("Gemm", "MatMul"):
            layer = reader.dense(node, shape, attrs)
            nxt = nodes[i + 1] if i + 1 < len(nodes) else None
            if (op == "MatMul" and nxt is not None and nxt.op_type == "Add"
                    and node.output[0] in nxt.input):
                other = [x for x in nxt.input if x != node.output[0]]
                if len(other) == 1 and other[0] in reader.inits:
                    layer.bias = np.broadcast_to(reader.inits[other[0]].astype(np.float32).reshape(-1),
                                                 layer.out_shape).copy()
                    node = nxt
                    i += 1
            layers.append(layer)
        elif op == "Conv":
            layers.extend(reader.conv(node, shape, attrs))
        elif op in ("MaxPool", "AveragePool"):
            layers.append(reader.pool(node, shape, attrs))
        elif op == "Relu":
            if layers and layers[-1].op in ("dense", "conv", "maxpool", "avgpool") and not layers[-1].relu:
                layers[-1].relu = True  # also across a reshape: ReLU is elementwise
                current = node.output[0]
                i += 1
                continue
            layers.append(Layer(label, "relu", shape, shape))
        elif op in ("Flatten", "Reshape"):
            target = (int(np.prod(shape)),)
            if op == "Reshape":
                dims = [int(d) for d in reader.const(node, 1).astype(np.int64).reshape(-1)] if node.input[1] in reader.inits else None
                if dims is None or len(dims) != 2 or dims[0] not in (1, -1, 0) or dims[1] not in (-1, target[0]):
                    raise ScalpelError(f"node {label} (Reshape): only a reshape to [batch, -1] is "
                                       "taken on the cortex-m4 path")
            elif attrs.get("axis", 1) != 1:
                raise ScalpelError(f"node {label} (Flatten): only axis=1 is taken on the cortex-m4 path")
            shape = target
            current = node.output[0]
            i += 1
            continue  # NCHW is already flat in memory: no layer, no copy
        else:
            raise ScalpelError(f"node {label}: the cortex-m4 path does not take {op} layers "
                               f"(it takes {', '.join(TAKEN)})")
        shape = layers[-1].out_shape
        current = node.output[0]
        i += 1
    outputs = list(model.graph.output)
    if len(outputs) != 1 or outputs[0].name != current:
        raise ScalpelError("the cortex-m4 path takes models with one output, the last layer's")
    if not layers:
        raise ScalpelError("the model has no layer to run")
    return Chain(input_name, input_shape, current, (1, *shape), layers)
