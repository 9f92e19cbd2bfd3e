"""ONNX builders for the networks the project ships with (weights from a fixed seed)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # onnxruntime reads IR <= 13; onnx 1.23 would write 14 by default


def _he(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    return (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32)


# onnx.checker serializes the whole model: seconds for AlexNet / VGG, whose small variants
# (``scale``) the tests check instead
CHECK_MAX_PARAMS = 20_000_000


def _model(nodes: list, name: str, input_shape: list, output: str, output_shape: list,
           inits: list) -> onnx.ModelProto:
    """A checked model with one float input called ``input`` and one float output."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tvm-scalpel")
    model.ir_version = IR_VERSION
    if sum(int(np.prod(t.dims)) for t in inits) <= CHECK_MAX_PARAMS:
        onnx.checker.check_model(model)
    return model


def mlp(
    sizes: list[int],
    seed: int = 0,
    name: str = "mlp",
    layout: str = "gemm",
    batch: int | str = "N",
) -> onnx.ModelProto:
    """An MLP ``sizes[0] -> ... -> sizes[-1]`` with ReLU between layers.

    ``layout="gemm"`` writes ``Gemm(transB=1)`` layers (weights ``[out, in]``, as PyTorch exports);
    ``layout="matmul"`` writes ``MatMul`` + ``Add`` (weights ``[in, out]``).
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "input"
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = _he(rng, n_out, n_in)
        b = (rng.standard_normal(n_out) * 0.05).astype(np.float32)
        out = f"fc{i + 1}"
        if layout == "gemm":
            inits += [numpy_helper.from_array(w, f"fc{i + 1}.weight"),
                      numpy_helper.from_array(b, f"fc{i + 1}.bias")]
            nodes.append(helper.make_node("Gemm", [prev, f"fc{i + 1}.weight", f"fc{i + 1}.bias"],
                                          [out], transB=1))
        elif layout == "matmul":
            inits += [numpy_helper.from_array(np.ascontiguousarray(w.T), f"fc{i + 1}.weight"),
                      numpy_helper.from_array(b, f"fc{i + 1}.bias")]
            nodes.append(helper.make_node("MatMul", [prev, f"fc{i + 1}.weight"], [out + "_mm"]))
            nodes.append(helper.make_node("Add", [out + "_mm", f"fc{i + 1}.bias"], [out]))
        else:
            raise ValueError(f"unknown layout {layout!r}")
        prev = out
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [out], [out + "_relu"]))
            prev = out + "_relu"
    return _model(nodes, name, [batch, sizes[0]], prev, [batch, sizes[-1]], inits)


def lenet_300_100(seed: int = 0, layout: str = "gemm") -> onnx.ModelProto:
    """LeNet-300-100 (784 -> 300 -> 100 -> 10), the paper's MNIST MLP."""
    return mlp([784, 300, 100, 10], seed=seed, name="lenet_300_100", layout=layout)


def lenet5(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """LeNet-5 as in Caffe and the Scalpel paper: conv 20@5x5, max-pool 2, conv 50@5x5,
    max-pool 2, fc 500, fc 10 (431k weights); input ``[N, 1, 28, 28]``."""
    rng = np.random.default_rng(seed)

    def conv_init(c_out: int, c_in: int, k: int) -> np.ndarray:
        fan_in = c_in * k * k
        return (rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    inits = [
        numpy_helper.from_array(conv_init(20, 1, 5), "conv1.weight"),
        numpy_helper.from_array(np.zeros(20, np.float32), "conv1.bias"),
        numpy_helper.from_array(conv_init(50, 20, 5), "conv2.weight"),
        numpy_helper.from_array(np.zeros(50, np.float32), "conv2.bias"),
        numpy_helper.from_array(_he(rng, 500, 800), "fc1.weight"),
        numpy_helper.from_array(np.zeros(500, np.float32), "fc1.bias"),
        numpy_helper.from_array(_he(rng, 10, 500), "fc2.weight"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc2.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1"], kernel_shape=[5, 5]),
        helper.make_node("MaxPool", ["conv1"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "conv2.weight", "conv2.bias"], ["conv2"], kernel_shape=[5, 5]),
        helper.make_node("MaxPool", ["conv2"], ["pool2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1"], transB=1),
        helper.make_node("Relu", ["fc1"], ["fc1_relu"]),
        helper.make_node("Gemm", ["fc1_relu", "fc2.weight", "fc2.bias"], ["fc2"], transB=1),
    ]
    return _model(nodes, "lenet5", [batch, 1, 28, 28], "fc2", [batch, 10], inits)


# ----------------------------------------------------------------------------------------------
# CNNs in the op patterns PyTorch's ONNX exporter writes (Conv, Relu, MaxPool, AveragePool,
# BatchNormalization, Add, GlobalAveragePool, Flatten, Gemm transB=1), He-initialized from a
# seed. Big weights are drawn directly in float32 (VGG-11 has 133M parameters).


class _Net:
    """Accumulates nodes and initializers; each method adds one layer and returns its output."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.names: dict[str, int] = {}

    def _name(self, kind: str) -> str:
        self.names[kind] = self.names.get(kind, 0) + 1
        return f"{kind}{self.names[kind]}"

    def _init(self, array: np.ndarray, name: str) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def _he(self, shape: tuple, fan_in: int) -> np.ndarray:
        """He (Kaiming) uniform: variance 2 / fan_in, drawn in place in float32 (uniform
        draws are several times faster than normal ones at VGG's 100M weights)."""
        w = self.rng.random(shape, dtype=np.float32)
        bound = np.float32(np.sqrt(6.0 / fan_in))
        w *= 2 * bound
        w -= bound
        return w

    def conv(self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, pad: int = 0,
             bias: bool = True) -> str:
        name = self._name("conv")
        w = self._init(self._he((c_out, c_in, k, k), c_in * k * k), f"{name}.weight")
        inputs = [x, w]
        if bias:
            inputs.append(self._init(self.rng.standard_normal(c_out, dtype=np.float32) * 0.01,
                                     f"{name}.bias"))
        self.nodes.append(helper.make_node("Conv", inputs, [name], kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[pad] * 4,
                                           dilations=[1, 1], group=1))
        return name

    def bn(self, x: str, c: int) -> str:
        """Eval-mode batch norm with realistic random statistics (scale near 1, small shift,
        running mean near 0, running variance near 1)."""
        name = self._name("bn")
        r = self.rng
        scale = self._init(1.0 + 0.1 * r.standard_normal(c, dtype=np.float32), f"{name}.weight")
        shift = self._init(0.1 * r.standard_normal(c, dtype=np.float32), f"{name}.bias")
        mean = self._init(0.1 * r.standard_normal(c, dtype=np.float32), f"{name}.running_mean")
        var = self._init(r.uniform(0.5, 1.5, c).astype(np.float32), f"{name}.running_var")
        self.nodes.append(helper.make_node("BatchNormalization", [x, scale, shift, mean, var],
                                           [name], epsilon=1e-5, momentum=0.9))
        return name

    def op(self, kind: str, inputs: list[str], **attrs) -> str:
        name = self._name(kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [name], **attrs))
        return name

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def maxpool(self, x: str, k: int, stride: int, pad: int = 0, ceil: bool = False) -> str:
        return self.op("MaxPool", [x], kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad] * 4, ceil_mode=int(ceil))

    def avgpool(self, x: str, k: int, stride: int, ceil: bool = False) -> str:
        return self.op("AveragePool", [x], kernel_shape=[k, k], strides=[stride, stride],
                       pads=[0] * 4, ceil_mode=int(ceil))

    def lrn(self, x: str, size: int = 3, alpha: float = 5e-5, beta: float = 0.75) -> str:
        return self.op("LRN", [x], size=size, alpha=alpha, beta=beta, bias=1.0)

    def fc(self, x: str, n_in: int, n_out: int) -> str:
        name = self._name("fc")
        w = self._init(self._he((n_out, n_in), n_in), f"{name}.weight")
        b = self._init(self.rng.standard_normal(n_out, dtype=np.float32) * 0.01, f"{name}.bias")
        self.nodes.append(helper.make_node("Gemm", [x, w, b], [name], alpha=1.0, beta=1.0, transB=1))
        return name

    def flatten(self, x: str) -> str:
        return self.op("Flatten", [x], axis=1)

    def build(self, name: str, input_shape: list, out: str, classes: int, batch) -> onnx.ModelProto:
        return _model(self.nodes, name, input_shape, out, [batch, classes], self.inits)


def _ch(c: int, scale: float) -> int:
    return max(1, int(round(c * scale)))


def _pooled(size: int, k: int, stride: int, pad: int = 0, ceil: bool = False) -> int:
    span = size + 2 * pad - k
    return (-(-span // stride) if ceil else span // stride) + 1


def convnet(seed: int = 0, batch: int | str = "N", scale: float = 1.0) -> onnx.ModelProto:
    """The paper's CIFAR-10 ConvNet, Caffe's ``cifar10_full``: conv 5x5 32 (pad 2), max-pool
    3/2, ReLU, LRN; conv 5x5 32, ReLU, avg-pool 3/2, LRN; conv 5x5 64, ReLU, avg-pool 3/2;
    FC 10. Pools round up as Caffe's do (32 -> 16 -> 8 -> 4); ONNX's LRN normalizes across
    channels (Caffe's within-channel region has no ONNX op). Input ``[N, 3, 32, 32]``."""
    c1, c2, c3 = _ch(32, scale), _ch(32, scale), _ch(64, scale)
    net = _Net(seed)
    h = net.lrn(net.relu(net.maxpool(net.conv("input", 3, c1, 5, pad=2), 3, 2, ceil=True)))
    h = net.lrn(net.avgpool(net.relu(net.conv(h, c1, c2, 5, pad=2)), 3, 2, ceil=True))
    h = net.avgpool(net.relu(net.conv(h, c2, c3, 5, pad=2)), 3, 2, ceil=True)
    side = _pooled(_pooled(_pooled(32, 3, 2, ceil=True), 3, 2, ceil=True), 3, 2, ceil=True)
    out = net.fc(net.flatten(h), c3 * side * side, 10)
    return net.build("convnet", [batch, 3, 32, 32], out, 10, batch)


def nin(seed: int = 0, batch: int | str = "N", scale: float = 1.0) -> onnx.ModelProto:
    """Network-in-Network for CIFAR-10 (Lin et al.; Caffe model zoo): three mlpconv blocks of a
    conv and two 1x1 convs (9 CONV layers, no FC), max-pool 3/2 and avg-pool 3/2 between
    them (rounding up), dropout omitted, global average pooling over the 10 class maps."""
    w192, w160, w96 = _ch(192, scale), _ch(160, scale), _ch(96, scale)
    net = _Net(seed)
    h = "input"
    for c_in, (c, k, pad), (a, b), pool in [
        (3, (w192, 5, 2), (w160, w96), "max"),
        (w96, (w192, 5, 2), (w192, w192), "avg"),
        (w192, (w192, 3, 1), (w192, 10), None),
    ]:
        h = net.relu(net.conv(h, c_in, c, k, pad=pad))
        h = net.relu(net.conv(h, c, a, 1))
        h = net.relu(net.conv(h, a, b, 1))
        if pool == "max":
            h = net.maxpool(h, 3, 2, ceil=True)
        elif pool == "avg":
            h = net.avgpool(h, 3, 2, ceil=True)
    out = net.flatten(net.op("GlobalAveragePool", [h]))
    return net.build("nin", [batch, 3, 32, 32], out, 10, batch)


def alexnet(seed: int = 0, batch: int | str = "N", scale: float = 1.0, image: int = 224,
            classes: int = 1000) -> onnx.ModelProto:
    """AlexNet in torchvision's layout: 5 CONV (11x11/4 64, 5x5 192, 3x3 384, 256, 256, with
    three max-pools 3/2) and 3 FC (9216 -> 4096 -> 4096 -> 1000 at 224x224); ``scale``
    narrows every layer (for tests), ``image`` changes the input size."""
    c = [_ch(v, scale) for v in (64, 192, 384, 256, 256)]
    hidden = _ch(4096, scale)
    net = _Net(seed)
    h = net.maxpool(net.relu(net.conv("input", 3, c[0], 11, stride=4, pad=2)), 3, 2)
    h = net.maxpool(net.relu(net.conv(h, c[0], c[1], 5, pad=2)), 3, 2)
    h = net.relu(net.conv(h, c[1], c[2], 3, pad=1))
    h = net.relu(net.conv(h, c[2], c[3], 3, pad=1))
    h = net.maxpool(net.relu(net.conv(h, c[3], c[4], 3, pad=1)), 3, 2)
    side = _pooled(_pooled(_pooled((image + 4 - 11) // 4 + 1, 3, 2), 3, 2), 3, 2)
    h = net.relu(net.fc(net.flatten(h), c[4] * side * side, hidden))
    h = net.relu(net.fc(h, hidden, hidden))
    out = net.fc(h, hidden, classes)
    return net.build("alexnet", [batch, 3, image, image], out, classes, batch)


def vgg11(seed: int = 0, batch: int | str = "N", scale: float = 1.0, image: int = 224,
          classes: int = 1000) -> onnx.ModelProto:
    """VGG-11 (configuration A) in torchvision's layout: 8 CONV 3x3 (64, M, 128, M, 256, 256,
    M, 512, 512, M, 512, 512, M) and 3 FC (25088 -> 4096 -> 4096 -> 1000 at 224x224)."""
    net = _Net(seed)
    h, c_in, side = "input", 3, image
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            h, side = net.maxpool(h, 2, 2), side // 2
        else:
            c = _ch(v, scale)
            h, c_in = net.relu(net.conv(h, c_in, c, 3, pad=1)), c
    hidden = _ch(4096, scale)
    h = net.relu(net.fc(net.flatten(h), c_in * side * side, hidden))
    h = net.relu(net.fc(h, hidden, hidden))
    out = net.fc(h, hidden, classes)
    return net.build("vgg11", [batch, 3, image, image], out, classes, batch)


def resnet18(seed: int = 0, batch: int | str = "N", scale: float = 1.0, image: int = 224,
             classes: int = 1000) -> onnx.ModelProto:
    """ResNet-18 in torchvision's layout: conv 7x7/2 64 + BN + ReLU + max-pool 3/2 (pad 1),
    four stages of two basic blocks (64, 128, 256, 512; stride 2 and a 1x1 conv + BN
    shortcut from the second stage on), global average pooling, FC 512 -> 1000. Convs have no
    bias (BN follows), as torchvision's."""
    net = _Net(seed)
    c0 = _ch(64, scale)
    h = net.maxpool(net.relu(net.bn(net.conv("input", 3, c0, 7, 2, 3, bias=False), c0)), 3, 2, pad=1)
    c_in = c0
    for stage, width in enumerate((64, 128, 256, 512)):
        c = _ch(width, scale)
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = net.relu(net.bn(net.conv(h, c_in, c, 3, stride, 1, bias=False), c))
            y = net.bn(net.conv(y, c, c, 3, 1, 1, bias=False), c)
            shortcut = h
            if stride != 1 or c_in != c:
                shortcut = net.bn(net.conv(h, c_in, c, 1, stride, 0, bias=False), c)
            h, c_in = net.relu(net.op("Add", [y, shortcut])), c
    out = net.fc(net.flatten(net.op("GlobalAveragePool", [h])), c_in, classes)
    return net.build("resnet18", [batch, 3, image, image], out, classes, batch)


# The built-in networks every command takes by name (``tvm-scalpel prune alexnet ...``).
BUILDERS = {
    "lenet-300-100": lenet_300_100,
    "lenet5": lenet5,
    "convnet": convnet,
    "nin": nin,
    "alexnet": alexnet,
    "vgg11": vgg11,
    "resnet18": resnet18,
}


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    """The built-in network ``name`` (a key of ``BUILDERS``) with weights from ``seed``."""
    if name not in BUILDERS:
        raise KeyError(f"unknown built-in network {name!r}: use one of {', '.join(BUILDERS)}")
    return BUILDERS[name](seed=seed)
