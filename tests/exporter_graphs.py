"""Small ONNX graphs written the way PyTorch's exporters write them, for node-pruning tests.

``style="torchscript"``: identical initializers merged into one shared tensor (the all-zero
biases and all-ones BN gammas of a freshly initialised model), ``Gemm`` with ``transB=1``, a
flatten through a shape subgraph (``Shape``/``Gather``/``Unsqueeze``/``Concat`` into ``Reshape``
with -1), ``Dropout`` and ``Identity`` nodes. ``style="dynamo"``: shapes and clip bounds as
``Constant`` nodes, ``MatMul`` + ``Add`` with a transposed weight, a ``Reshape`` to a constant
``[-1, C*H*W]``... and ``Flatten`` after global pooling.

Each builder also records, for every layer that reads channels, which producing layers made
them (``Net.reads``: consumer weight -> [(producer, per)] in channel order), so that tests can
build the reference (the original model with those input columns zeroed) without the library.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import IR_VERSION, OPSET


class Net:
    def __init__(self, style: str = "torchscript", seed: int = 0, trained_bn: bool = False,
                 in_shape=(1, 3, 16, 16)) -> None:
        self.style, self.rng, self.trained_bn = style, np.random.default_rng(seed), trained_bn
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self.by_content: dict = {}
        self.n = 0
        self.in_shape = in_shape
        self.src: dict[str, list[tuple[str, int]]] = {"x": [("input", 1)]}  # tensor -> producers
        self.reads: dict[str, list[tuple[str, int]]] = {}
        self.convs: list[str] = []

    def _name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, arr: np.ndarray, name: str) -> str:
        arr = np.array(arr, order="C")  # (ascontiguousarray would make a scalar 1-d)
        if self.style == "torchscript":  # the exporter merges identical initializers
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self.by_content:
                return self.by_content[key]
            self.by_content[key] = name
        self.inits[name] = arr
        return name

    def shape_const(self, values, name: str) -> str:
        arr = np.array(values, dtype=np.int64)
        if self.style == "dynamo":
            out = self._name(name)
            self.nodes.append(helper.make_node(
                "Constant", [], [out], value=numpy_helper.from_array(arr, out + "_value")))
            return out
        return self.const(arr, name)

    def op(self, op_type: str, inputs, keep_src: str | None = None, **attrs) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"/{op_type}_{self.n}", **attrs))
        if keep_src is not None:
            self.src[out] = self.src[keep_src]
        return out

    # ------------------------------------------------------------------ layers

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1,
             bias: bool = False, name: str | None = None) -> str:
        name = name or self._name("conv")
        w = self.rng.standard_normal((cout, cin // group, k, k)).astype(np.float32)
        w *= np.sqrt(2.0 / (cin // group * k * k))
        inputs = [x, self.const(w, f"{name}.weight")]
        if bias:
            inputs.append(self.const(np.zeros(cout, np.float32), f"{name}.bias"))
        out = self._name(name)
        self.nodes.append(helper.make_node("Conv", inputs, [out], name=f"/{name}/Conv",
                                           kernel_shape=[k, k], strides=[stride, stride],
                                           pads=[k // 2] * 4, group=group))
        self.convs.append(f"{name}.weight")
        if group == 1:
            self.reads[f"{name}.weight"] = self.src[x]
            self.src[out] = [(f"{name}.weight", 1)]
        else:
            self.src[out] = self.src[x]
        return out

    def bn(self, x: str, c: int, name: str) -> str:
        if self.trained_bn:
            gamma = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
            beta = self.rng.normal(0, 0.1, c).astype(np.float32)
        else:
            gamma, beta = np.ones(c, np.float32), np.zeros(c, np.float32)
        mean = self.rng.normal(0, 0.1, c).astype(np.float32)
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        ins = [x, self.const(gamma, f"{name}.weight"), self.const(beta, f"{name}.bias"),
               self.const(mean, f"{name}.running_mean"), self.const(var, f"{name}.running_var")]
        return self.op("BatchNormalization", ins, keep_src=x, epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x], keep_src=x)

    def relu6(self, x: str) -> str:
        if self.style == "dynamo":  # bounds as Constant nodes
            lo, hi = self._name("clip_min"), self._name("clip_max")
            for out, v in ((lo, 0.0), (hi, 6.0)):
                self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(
                    np.array(v, np.float32), out + "_value")))
        else:  # one shared pair of initializers
            lo = self.const(np.array(0.0, np.float32), "clip_min")
            hi = self.const(np.array(6.0, np.float32), "clip_max")
        return self.op("Clip", [x, lo, hi], keep_src=x)

    def add(self, a: str, b: str) -> str:
        out = self.op("Add", [a, b], keep_src=a)
        return out

    def identity(self, x: str) -> str:
        return self.op("Identity", [x], keep_src=x)

    def concat(self, xs: list[str]) -> str:
        out = self.op("Concat", xs, axis=1)
        self.src[out] = [p for x in xs for p in self.src[x]]
        return out

    def maxpool(self, x: str) -> str:
        return self.op("MaxPool", [x], keep_src=x, kernel_shape=[2, 2], strides=[2, 2])

    def gap(self, x: str) -> str:
        return self.op("GlobalAveragePool", [x], keep_src=x)

    def flatten(self, x: str, chw: tuple[int, int, int]) -> str:
        per = chw[1] * chw[2]
        srcs = [(p, per * q) for p, q in self.src[x]]
        if self.style == "torchscript":  # x.view(x.size(0), -1) through a shape subgraph
            shape = self.op("Shape", [x])
            b = self.op("Gather", [shape, self.const(np.array(0, np.int64), "idx0")], axis=0)
            b = self.op("Unsqueeze", [b, self.const(np.array([0], np.int64), "axes0")])
            target = self.op("Concat", [b, self.const(np.array([-1], np.int64), "minus1")], axis=0)
            out = self.op("Reshape", [x, target])
        elif per == 1:
            out = self.op("Flatten", [x], axis=1)
        else:  # a constant target shape holding the channel count
            out = self.op("Reshape", [x, self.shape_const([-1, chw[0] * per], "flat_shape")])
        self.src[out] = srcs
        return out

    def dropout(self, x: str) -> str:
        return self.op("Dropout", [x], keep_src=x)

    def linear(self, x: str, k: int, n: int, name: str) -> str:
        w = (self.rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        b = self.rng.normal(0, 0.1, n).astype(np.float32)
        if self.style == "torchscript":
            out = self._name(name)
            self.nodes.append(helper.make_node(
                "Gemm", [x, self.const(w, f"{name}.weight"), self.const(b, f"{name}.bias")], [out],
                name=f"/{name}/Gemm", transB=1))
            wname = f"{name}.weight"
        else:
            wname = self.const(np.ascontiguousarray(w.T), f"{name}.weight_t")
            mm = self.op("MatMul", [x, wname])
            out = self.op("Add", [mm, self.const(b, f"{name}.bias")])
        self.reads[wname] = self.src[x]
        self.src[out] = [(wname, 1)]
        return out

    def model(self, y: str, classes: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "exported",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *self.in_shape[1:]])],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", classes])],
            [numpy_helper.from_array(a, n) for n, a in self.inits.items()])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = IR_VERSION
        onnx.checker.check_model(m)
        return m


def _cbr(net: Net, x, cin, cout, k, stride=1, group=1, name="", act="relu"):
    y = net.bn(net.conv(x, cin, cout, k, stride, group, name=name), cout, name + ".bn")
    if act == "relu":
        return net.relu(y)
    if act == "relu6":
        return net.relu6(y)
    return y


def mini_resnet(style="torchscript", seed=0, trained_bn=False) -> tuple[onnx.ModelProto, Net]:
    """Stem, a basic block at 16 channels, a stride-2 block to 32 with a 1x1 downsample."""
    net = Net(style, seed, trained_bn)
    x = net.maxpool(_cbr(net, "x", 3, 16, 3, name="conv1"))
    y = _cbr(net, x, 16, 16, 3, name="layer1.0.conv1")
    y = net.bn(net.conv(y, 16, 16, 3, name="layer1.0.conv2"), 16, "layer1.0.bn2")
    x = net.relu(net.add(y, x))
    y = _cbr(net, x, 16, 32, 3, 2, name="layer2.0.conv1")
    y = net.bn(net.conv(y, 32, 32, 3, name="layer2.0.conv2"), 32, "layer2.0.bn2")
    d = net.bn(net.conv(x, 16, 32, 1, 2, name="layer2.0.downsample.0"), 32, "layer2.0.downsample.1")
    x = net.relu(net.add(y, d))
    x = net.identity(x)
    x = net.flatten(net.gap(x), (32, 1, 1))
    return net.model(net.linear(x, 32, 10, "fc"), 10), net


def mini_mobilenet_v2(style="torchscript", seed=0, trained_bn=False) -> tuple[onnx.ModelProto, Net]:
    """Stem, an expansion-1 block (depthwise + project), a stride-2 inverted residual, a
    stride-1 inverted residual with its skip Add, the last 1x1 conv, pooling, classifier."""
    net = Net(style, seed, trained_bn)
    x = _cbr(net, "x", 3, 32, 3, 2, name="features.0.0", act="relu6")
    y = _cbr(net, x, 32, 32, 3, 1, 32, name="features.1.conv.0.0", act="relu6")
    x = _cbr(net, y, 32, 16, 1, name="features.1.conv.1", act=None)
    y = _cbr(net, x, 16, 64, 1, name="features.2.conv.0.0", act="relu6")
    y = _cbr(net, y, 64, 64, 3, 2, 64, name="features.2.conv.1.0", act="relu6")
    x = _cbr(net, y, 64, 24, 1, name="features.2.conv.2", act=None)
    y = _cbr(net, x, 24, 96, 1, name="features.3.conv.0.0", act="relu6")
    y = _cbr(net, y, 96, 96, 3, 1, 96, name="features.3.conv.1.0", act="relu6")
    y = _cbr(net, y, 96, 24, 1, name="features.3.conv.2", act=None)
    x = net.add(x, y)
    x = _cbr(net, x, 24, 64, 1, name="features.4.0", act="relu6")
    x = net.flatten(net.gap(x), (64, 1, 1))
    x = net.dropout(x)
    return net.model(net.linear(x, 64, 10, "classifier.1"), 10), net


def mini_vgg(style="torchscript", seed=0) -> tuple[onnx.ModelProto, Net]:
    """Three conv + ReLU + max-pool stages (zero biases: shared by the exporter), a flatten of
    32x2x2 and three linear layers with dropout."""
    net = Net(style, seed)
    x = "x"
    for i, (cin, cout) in enumerate([(3, 16), (16, 32), (32, 32)]):
        x = net.maxpool(net.relu(net.conv(x, cin, cout, 3, bias=True, name=f"features.{3 * i}")))
    x = net.flatten(x, (32, 2, 2))
    x = net.dropout(net.relu(net.linear(x, 128, 64, "classifier.0")))
    x = net.dropout(net.relu(net.linear(x, 64, 64, "classifier.3")))
    return net.model(net.linear(x, 64, 10, "classifier.6"), 10), net


def mini_concat(style="torchscript", seed=0) -> tuple[onnx.ModelProto, Net]:
    """A fire module: two branches concatenated, then a residual Add with a 1x1 conv of the
    concat, so concat members are tied to another producer."""
    net = Net(style, seed)
    s = net.relu(net.conv("x", 3, 16, 3, bias=True, name="squeeze"))
    a = net.relu(net.conv(s, 16, 16, 1, bias=True, name="expand1x1"))
    b = net.relu(net.conv(s, 16, 16, 3, bias=True, name="expand3x3"))
    c = net.concat([a, b])
    y = net.relu(net.conv(c, 32, 32, 1, bias=True, name="mix"))
    x = net.flatten(net.maxpool(net.maxpool(y)), (32, 4, 4))
    return net.model(net.linear(x, 512, 10, "fc"), 10), net


def reference(model: onnx.ModelProto, net: Net, kept: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The original model with every reading layer's input columns of removed channels set to
    zero (``kept``: producer weight -> channels kept), from the builder's own records."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    for consumer, srcs in net.reads.items():
        w = numpy_helper.to_array(inits[consumer]).copy()
        axis = 0 if consumer.endswith("_t") else 1  # MatMul [K, N]; Conv [O, I, ..]; Gemm [N, K]
        keep = np.zeros(w.shape[axis], dtype=bool)
        offset = 0
        for producer, per in srcs:
            size = numpy_helper.to_array(inits[producer]).shape[0] if producer != "input" else 3
            if producer.endswith("_t"):
                size = numpy_helper.to_array(inits[producer]).shape[1]
            k = kept.get(producer, np.arange(size))
            for c in k:
                keep[offset + c * per: offset + (c + 1) * per] = True
            offset += size * per
        assert offset == w.shape[axis], (consumer, offset, w.shape)
        idx = [slice(None)] * w.ndim
        idx[axis] = ~keep
        w[tuple(idx)] = 0.0
        inits[consumer].CopyFrom(numpy_helper.from_array(w, consumer))
    return out


def mobilenet_v2(style="torchscript", seed=0, trained_bn=True, size=224) -> tuple[onnx.ModelProto, Net]:
    """torchvision's MobileNetV2 layout (width 1.0, 17 inverted residuals, 52 convs), as the
    exporters write it; no builder in ``tvm_scalpel.models`` has it."""
    net = Net(style, seed, trained_bn, in_shape=(1, 3, size, size))
    x = _cbr(net, "x", 3, 32, 3, 2, name="features.0.0", act="relu6")
    cin, index = 32, 1
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            stride, hidden, p = (s if i == 0 else 1), cin * t, f"features.{index}.conv"
            y, j = x, 0
            if t != 1:
                y, j = _cbr(net, y, cin, hidden, 1, name=f"{p}.0.0", act="relu6"), 1
            y = _cbr(net, y, hidden, hidden, 3, stride, hidden, name=f"{p}.{j}.0", act="relu6")
            y = _cbr(net, y, hidden, c, 1, name=f"{p}.{j + 1}", act=None)
            x = net.add(x, y) if stride == 1 and cin == c else y
            cin, index = c, index + 1
    x = _cbr(net, x, cin, 1280, 1, name=f"features.{index}.0", act="relu6")
    x = net.dropout(net.flatten(net.gap(x), (1280, 1, 1)))
    return net.model(net.linear(x, 1280, 1000, "classifier.1"), 1000), net


def resnet18(style="torchscript", seed=0, trained_bn=False, size=224) -> tuple[onnx.ModelProto, Net]:
    """torchvision's ResNet-18 layout (20 convs, 8 residual Adds, 3 stride-2 downsamples)."""
    net = Net(style, seed, trained_bn, in_shape=(1, 3, size, size))
    x = _cbr(net, "x", 3, 64, 7, 2, name="conv1")
    x = net.op("MaxPool", [x], keep_src=x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, c in enumerate([64, 128, 256, 512], start=1):
        for b in range(2):
            stride, p = (2 if stage > 1 and b == 0 else 1), f"layer{stage}.{b}"
            y = _cbr(net, x, cin, c, 3, stride, name=f"{p}.conv1")
            y = net.bn(net.conv(y, c, c, 3, name=f"{p}.conv2"), c, f"{p}.bn2")
            if stride != 1 or cin != c:
                x = net.bn(net.conv(x, cin, c, 1, stride, name=f"{p}.downsample.0"), c, f"{p}.downsample.1")
            x = net.relu(net.add(y, x))
            cin = c
    x = net.flatten(net.gap(x), (512, 1, 1))
    return net.model(net.linear(x, 512, 1000, "fc"), 1000), net


def vgg11(style="torchscript", seed=0, size=224) -> tuple[onnx.ModelProto, Net]:
    """torchvision's VGG-11 layout (8 convs with zero biases, flatten of 512x7x7, 3 FC)."""
    net = Net(style, seed, in_shape=(1, 3, size, size))
    x, cin, index = "x", 3, 0
    for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
        if v == "M":
            x, index = net.maxpool(x), index + 1
            continue
        x = net.relu(net.conv(x, cin, v, 3, bias=True, name=f"features.{index}"))
        cin, index = v, index + 2
    hw = size // 32
    x = net.op("AveragePool", [x], keep_src=x, kernel_shape=[1, 1]) if hw == 7 else x
    x = net.flatten(x, (512, hw, hw))
    x = net.dropout(net.relu(net.linear(x, 512 * hw * hw, 4096, "classifier.0")))
    x = net.dropout(net.relu(net.linear(x, 4096, 4096, "classifier.3")))
    return net.model(net.linear(x, 4096, 1000, "classifier.6"), 1000), net
