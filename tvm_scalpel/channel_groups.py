"""Coupled channel groups: node pruning of the ONNX graphs exporters write.

Removing a filter of a convolution is only safe when every tensor that carries that channel
loses it too. In a plain chain (VGG, AlexNet) that is the producing layer and its next layer;
but a residual ``Add`` ties the channels of both its inputs and of its output, a ``Concat``
places its inputs' channels side by side, a depthwise convolution maps channel c to channel c.
Following Torch-Pruning's DepGraph (Fang et al., CVPR 2023), this module finds those sets: one
union-find over *channel groups* (the channel index space a producing layer creates) and a small
rule per op type saying how a node's output channels relate to its inputs' (same group, a
concatenation of groups, a flatten that repeats each channel ``per`` times, or a new group).

A group is pruned as a whole: its channels are scored by the aggregate importance of its
producing layers (each layer's importance normalised by its mean, then summed), the weakest go,
and the same channel indices are removed from every member: producing weights (axis 0 of a
filter bank), per-channel parameters (biases, batch norm, per-channel constants), depthwise
filters, the consuming layers' input columns, and the flatten shapes in between. Every op in a
group computes each channel from the same channel only, so the result equals the original
model with the consuming layers' input columns for the removed channels set to zero: exact.

A group added to a concatenation of groups is cut into matching parts. A group is left whole
(with a reason) when one of its tensors reaches something with no rule
(a softmax, a graph output, a grouped convolution, a reshape that is not a flatten, ...).

Exporter quirks handled before the analysis: ``Constant`` nodes become initializers, a constant
read by several nodes is copied per reader (the TorchScript exporter merges identical
initializers: the all-zero biases, the all-ones BN gammas of a fresh model), ``Identity`` and
``Dropout`` (inference) are bypassed; shape subgraphs (``Shape``/``Gather``/``Concat`` into a
``Reshape`` with ``-1``) carry no channels and are left as they are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ScalpelError

log = logging.getLogger("tvm_scalpel")

# Ops whose output channel c depends on input channel c alone (input 0), shape unchanged.
CHANNELWISE = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu",
    "Selu", "Softplus", "Softsign", "Abs", "Neg", "Exp", "Erf", "Gelu", "Mish", "Celu", "Sqrt",
    "Reciprocal", "Cast", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    "LpPool", "GlobalLpPool", "Floor", "Ceil", "Round", "Identity", "Dropout",
}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow"}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_label(node: onnx.NodeProto) -> str:
    """How a user finds a node in Netron: its name, else its op and output."""
    return node.name or f"{node.op_type}({node.output[0]})"


# --------------------------------------------------------------------------- exporter quirks


def unique_name(base: str, used: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... if taken; the name returned is added to ``used``."""
    name, i = base, 1
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every name in use in ``graph`` (tensors, initializers, inputs, outputs, nodes)."""
    used = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    used |= {o.name for o in graph.output} | {n.name for n in graph.node if n.name}
    for node in graph.node:
        used |= set(node.input) | set(node.output)
    return used


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """``Constant`` nodes holding a tensor become initializers (one place to read and slice)."""
    graph = model.graph
    for node in [n for n in graph.node if n.op_type == "Constant"]:
        value = _attr(node, "value")
        if value is None or node.output[0] in {o.name for o in graph.output}:
            continue
        arr = numpy_helper.to_array(value)
        graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        graph.node.remove(node)


def unshare_initializers(model: onnx.ModelProto) -> int:
    """Give every reader of an initializer read by several node inputs its own copy (the first
    reader keeps the name). The TorchScript exporter merges equal initializers; they are not
    shared *layers*, and slicing one for one layer must not touch the others. Returns the number
    of copies made."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    used = all_names(graph)
    seen: set[str] = set()
    copies = 0
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name not in inits:
                continue
            if name not in seen:
                seen.add(name)
                continue
            new = unique_name(f"{name}.copy", used)
            t = onnx.TensorProto()
            t.CopyFrom(inits[name])
            t.name = new
            graph.initializer.append(t)
            node.input[slot] = new
            copies += 1
    return copies


def bypass_passthrough(model: onnx.ModelProto) -> int:
    """Remove ``Identity`` nodes and inference ``Dropout`` nodes (their mask output unread):
    both return their input. Graph output names are kept. Returns the number removed."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    read = {name for n in graph.node for name in n.input}
    removed = 0
    for node in list(graph.node):
        if node.op_type == "Identity":
            pass
        elif node.op_type == "Dropout" and not (len(node.output) > 1 and node.output[1] in read):
            if len(node.input) > 2 and node.input[2]:  # training_mode given: must be a constant False
                t = next((i for i in graph.initializer if i.name == node.input[2]), None)
                if t is None or bool(numpy_helper.to_array(t)):
                    continue
        else:
            continue
        src, out = node.input[0], node.output[0]
        graph.node.remove(node)
        if out in outputs:  # keep the model's output name: rename the producer's output instead
            if src in {i.name for i in graph.input} | {i.name for i in graph.initializer}:
                graph.node.append(helper.make_node("Identity", [src], [out]))
                continue
            for n in graph.node:
                for seq in (n.input, n.output):
                    for i, name in enumerate(seq):
                        if name == src:
                            seq[i] = out
        else:
            for n in graph.node:
                for i, name in enumerate(n.input):
                    if name == out:
                        n.input[i] = src
        removed += 1
    return removed


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with the exporter quirks above undone (same function)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants_to_initializers(out)
    bypass_passthrough(out)
    unshare_initializers(out)
    return out


# --------------------------------------------------------------------------- the group graph


@dataclass
class _Layout:
    """The channel axis (axis 1) of one tensor: groups side by side, each channel repeated
    ``per`` times (``per > 1`` after a flatten of ``[B, C, H, W]`` into ``[B, C*H*W]``)."""

    groups: tuple[int, ...]
    per: int = 1


@dataclass
class _Slice:
    """One edit: take the kept channels of ``layout`` along ``axis`` of initializer ``init``."""

    init: str
    axis: int
    layout: _Layout


@dataclass
class Layer:
    """A weight layer of the model and its place in the groups."""

    name: str  # its weight initializer
    node: str  # its node, as a user finds it
    op: str
    channels: int  # output channels
    group: int | None  # the group its output channels belong to (None: not prunable at all)
    depthwise: bool = False
    layout: _Layout | None = None  # its output channels


@dataclass
class Group:
    gid: int
    size: int
    producers: list[str] = field(default_factory=list)  # layer names making these channels
    offsets: dict[str, int] = field(default_factory=dict)  # where they sit in each producer
    members: list[str] = field(default_factory=list)  # depthwise layers carrying them through
    reason: str | None = None  # why the group cannot be pruned


class ChannelGraph:
    """The coupled channel groups of a (normalized) ONNX model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes: dict[str, list[int | None]] = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                        for d in t.shape.dim]
        self.parent: list[int] = []
        self.sizes: list[int] = []
        self.reasons: dict[int, str] = {}
        self.split: dict[int, list[int]] = {}  # a group cut in parts (tied to a concat)
        self.layouts: dict[str, _Layout] = {}
        self.slices: list[_Slice] = []
        self.reshapes: list[tuple[onnx.NodeProto, _Layout, int]] = []  # (node, layout, old size)
        self.layers: list[Layer] = []
        self._build()

    # ------------------------------------------------------------------ union-find

    def _new(self, size: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        if reason:
            self.reasons[len(self.parent) - 1] = reason
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def _union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        self.parent[b] = a
        if b in self.reasons and a not in self.reasons:
            self.reasons[a] = self.reasons[b]

    def _fix(self, layout: _Layout | None, reason: str) -> None:
        if layout is None:
            return
        for g in self.expand(layout.groups):
            self.reasons.setdefault(g, reason)

    def expand(self, groups) -> list[int]:
        """The current groups (roots) of a layout, split groups replaced by their parts."""
        out: list[int] = []
        for g in groups:
            r = self.find(g)
            if r in self.split:
                out.extend(self.expand(self.split[r]))
            else:
                out.append(r)
        return out

    def _cut(self, root: int, parts: list[int]) -> None:
        reason = self.reasons.get(root)
        self.split[root] = [self._new(p, reason) for p in parts]

    def _width(self, layout: _Layout) -> int:
        return sum(self.sizes[g] for g in self.expand(layout.groups))

    # ------------------------------------------------------------------ rules per op

    def _build(self) -> None:
        graph = self.model.graph
        for inp in graph.input:
            if inp.name in self.inits:
                continue
            shape = self.shapes.get(inp.name)
            if shape and len(shape) >= 2 and shape[1]:
                self.layouts[inp.name] = _Layout((self._new(shape[1], "the model's input"),))
        for node in graph.node:
            ins = [self.layouts.get(name) for name in node.input]
            if not any(ins):
                continue  # no channels in: a shape subgraph, or constants only
            label = node_label(node)
            try:
                self._rule(node, ins, label)
            except _Stop as why:
                for layout in ins:
                    self._fix(layout, f"{why} at {node.op_type} {label}")
                for out in node.output:
                    self.layouts.pop(out, None)
        for out in graph.output:
            self._fix(self.layouts.get(out.name), "reaches a model output")

    def _shape(self, name: str) -> list[int | None] | None:
        return self.shapes.get(name)

    def _rule(self, node: onnx.NodeProto, ins: list, label: str) -> None:
        op = node.op_type
        x = ins[0]
        if op in ("Conv", "Gemm", "MatMul"):
            self._layer(node, ins, label)
        elif op == "BatchNormalization":
            if any(ins[1:]) or x.per != 1:
                raise _Stop("a batch norm of computed parameters")
            if any(node.output[1:]) and any(o in {i for n in self.model.graph.node for i in n.input}
                                            for o in node.output[1:]):
                raise _Stop("a training-mode batch norm")
            for name in node.input[1:5]:
                self._param(name, 0, x, "batch norm")
            self.layouts[node.output[0]] = x
        elif op in CHANNELWISE:
            if any(ins[1:]):
                raise _Stop("an element-wise op of two computed tensors")
            if op in POOLS and x.per != 1:
                raise _Stop("a pool after a flatten")
            if op == "PRelu" and len(node.input) > 1:
                self._broadcast_const(node.input[1], node.output[0], x)
            self.layouts[node.output[0]] = x
        elif op in BINARY:
            layouts = [(name, lay) for name, lay in zip(node.input, ins)]
            computed = [lay for _, lay in layouts if lay is not None]
            out = computed[0]
            for other in computed[1:]:
                self._tie(out, other)
            for name, lay in layouts:
                if lay is None:
                    self._broadcast_const(name, node.output[0], out)
            self.layouts[node.output[0]] = out
        elif op == "Concat":
            rank = len(self._shape(node.output[0]) or [])
            if rank < 2 or int(_attr(node, "axis", 0)) % rank != 1:
                raise _Stop("a concat along another axis than the channels")
            if any(lay is None or lay.per != 1 for lay in ins):
                raise _Stop("a concat of a constant or flattened tensor")
            self.layouts[node.output[0]] = _Layout(tuple(g for lay in ins for g in lay.groups))
        elif op in ("Flatten", "Reshape"):
            if any(ins[1:]):
                raise _Stop("a reshape to a computed channel count")
            src, dst = self._shape(node.input[0]), self._shape(node.output[0])
            if op == "Reshape" and dst is not None and len(dst) == 2 and dst[1] is None \
                    and self._batch_then_minus1(node.input[1]) and src and None not in src[1:]:
                dst = [dst[0], math.prod(src[1:])]  # [B, -1] from a shape subgraph
            if (src is None or dst is None or len(dst) != 2 or len(src) < 2 or None in src[1:]
                    or dst[1] != math.prod(src[1:])):
                raise _Stop("a reshape other than a flatten to [B, C*H*W]")
            if op == "Flatten" and int(_attr(node, "axis", 1)) != 1:
                raise _Stop("a flatten along another axis")
            per = x.per * math.prod(src[2:])
            new = _Layout(x.groups, per)
            if op == "Reshape":
                self.reshapes.append((node, new, dst[1]))
            self.layouts[node.output[0]] = new
        elif op in ("Squeeze", "Unsqueeze"):
            axes = _attr(node, "axes")
            if axes is None and len(node.input) > 1:
                axes = self.inits.get(node.input[1])
            src = self._shape(node.input[0])
            if axes is None or src is None:
                raise _Stop("a squeeze of unknown axes")
            rank = len(src) + (len(np.atleast_1d(axes)) if op == "Unsqueeze" else 0)
            if any(int(a) % rank in (0, 1) for a in np.atleast_1d(axes)):
                raise _Stop("a squeeze of the batch or channel axis")
            self.layouts[node.output[0]] = x
        elif op == "Shape":
            return  # a shape tensor: it carries no channels
        else:
            raise _Stop("no rule for the op")

    def _batch_then_minus1(self, shape: str) -> bool:
        """Whether a computed target shape is ``Concat(<batch>, [-1])`` (``x.view(x.size(0), -1)``
        as the TorchScript exporter writes it)."""
        producer = next((n for n in self.model.graph.node if shape in n.output), None)
        if producer is None or producer.op_type != "Concat" or len(producer.input) != 2:
            return False
        last = self.inits.get(producer.input[1])
        return last is not None and last.reshape(-1).tolist() == [-1]

    def _tie(self, a: _Layout, b: _Layout) -> None:
        """Two tensors added element-wise: their channels are the same channels."""
        ea, eb = self.expand(a.groups), self.expand(b.groups)
        sa, sb = [self.sizes[g] for g in ea], [self.sizes[g] for g in eb]
        if a.per != b.per or sum(sa) != sum(sb):
            self._fix(a, "an element-wise op of differently shaped channels")
            self._fix(b, "an element-wise op of differently shaped channels")
            return
        if sa != sb:  # a group added to a concat of groups: cut both into common parts
            bounds = sorted(set(np.cumsum(sa).tolist()) | set(np.cumsum(sb).tolist()))
            for groups, sizes in ((ea, sa), (eb, sb)):
                start = 0
                for g, size in zip(groups, sizes):
                    inner = [c - start for c in bounds if start < c <= start + size]
                    if len(inner) > 1:
                        self._cut(g, np.diff([0] + inner).tolist())
                    start += size
            ea, eb = self.expand(a.groups), self.expand(b.groups)
        for ga, gb in zip(ea, eb):
            self._union(ga, gb)

    def _param(self, name: str, axis: int, layout: _Layout, what: str) -> None:
        arr = self.inits.get(name)
        if arr is None or arr.ndim <= axis or arr.shape[axis] != self._width(layout) * layout.per:
            raise _Stop(f"{what} parameters that are not one per channel")
        self.slices.append(_Slice(name, axis, layout))

    def _broadcast_const(self, name: str, out: str, layout: _Layout) -> None:
        """A constant operand of an element-wise op: sliced when it is per channel; left alone
        when it is the same for every channel; anything else stops the group."""
        arr = self.inits.get(name)
        rank = len(self._shape(out) or [])
        if arr is None or rank < 2:
            raise _Stop("an element-wise op of unknown operands")
        axis = arr.ndim - (rank - 1)
        if axis < 0 or arr.shape[axis] == 1:
            return  # broadcast along the channels: every channel sees the same values
        if arr.shape[axis] != self._width(layout) * layout.per:
            raise _Stop("a constant that does not broadcast along the channels")
        self.slices.append(_Slice(name, axis, layout))

    def _layer(self, node: onnx.NodeProto, ins: list, label: str) -> None:
        op, x = node.op_type, ins[0]
        w_name = node.input[1] if len(node.input) > 1 else ""
        w = self.inits.get(w_name)
        if w is None or any(ins[1:]):
            raise _Stop("a layer whose weight is not a constant")
        if op == "Conv":
            group = int(_attr(node, "group", 1))
            if w.ndim < 3 or x.per != 1:
                raise _Stop("a convolution of flattened channels")
            c_out = w.shape[0]
            if group == 1:
                self.slices.append(_Slice(w_name, 1, x))
                gid = self._new(c_out)
                self._bias(node, 2, gid, c_out)
                self.layers.append(Layer(w_name, label, op, c_out, gid, layout=_Layout((gid,))))
                self.layouts[node.output[0]] = _Layout((gid,))
            elif group == self._width(x) == c_out and w.shape[1] == 1:
                self.slices.append(_Slice(w_name, 0, x))  # depthwise: channel c to channel c
                if len(node.input) > 2 and node.input[2]:
                    self._param(node.input[2], 0, x, "depthwise bias")
                self.layers.append(Layer(w_name, label, op, c_out, None, depthwise=True, layout=x))
                self.layouts[node.output[0]] = x
            else:
                raise _Stop("a grouped convolution")
            return
        if w.ndim != 2:
            raise _Stop("a dense layer whose weight is not a matrix")
        if op == "Gemm":
            if _attr(node, "transA", 0):
                raise _Stop("a Gemm with transA")
            trans = bool(_attr(node, "transB", 0))
            in_axis, out_axis = (1, 0) if trans else (0, 1)
            self.slices.append(_Slice(w_name, in_axis, x))
            c_out = w.shape[out_axis]
            gid = self._new(c_out)
            self.slices.append(_Slice(w_name, out_axis, _Layout((gid,))))
            if len(node.input) > 2 and node.input[2]:
                b = self.inits.get(node.input[2])
                if b is None or (b.ndim >= 1 and b.shape[-1] not in (1, c_out)):
                    self.reasons[gid] = "a Gemm bias that is not a constant per neuron"
                elif b.ndim >= 1 and b.shape[-1] == c_out and c_out > 1:
                    self.slices.append(_Slice(node.input[2], b.ndim - 1, _Layout((gid,))))
        else:  # MatMul [B, K] x [K, N]
            if len(self._shape(node.input[0]) or []) != 2:
                raise _Stop("a MatMul of a tensor that is not [B, K]")
            self.slices.append(_Slice(w_name, 0, x))
            c_out = w.shape[1]
            gid = self._new(c_out)
            self.slices.append(_Slice(w_name, 1, _Layout((gid,))))
        self.layers.append(Layer(w_name, label, op, c_out, gid, layout=_Layout((gid,))))
        self.layouts[node.output[0]] = _Layout((gid,))

    def _bias(self, node: onnx.NodeProto, slot: int, gid: int, c_out: int) -> None:
        if len(node.input) > slot and node.input[slot]:
            b = self.inits.get(node.input[slot])
            if b is None or b.shape != (c_out,):
                self.reasons[gid] = "a bias that is not a constant per channel"
            else:
                self.slices.append(_Slice(node.input[slot], 0, _Layout((gid,))))
        # the filter bank itself, axis 0
        self.slices.append(_Slice(node.input[1], 0, _Layout((gid,))))

    # ------------------------------------------------------------------ results

    def groups(self) -> dict[int, Group]:
        out: dict[int, Group] = {}
        for layer in self.layers:
            if layer.group is not None:
                offset = 0
                for root in self.expand(layer.layout.groups):
                    group = out.setdefault(root, Group(root, self.sizes[root]))
                    group.producers.append(layer.name)
                    group.offsets[layer.name] = offset
                    offset += self.sizes[root]
        for layer in self.layers:
            if layer.depthwise:
                for root in self.expand(layer.layout.groups):
                    if root in out:
                        out[root].members.append(layer.name)
        for root, group in out.items():
            group.reason = self.reasons.get(root)
        return out

    def indices(self, layout: _Layout, kept: Mapping[int, np.ndarray]) -> np.ndarray:
        """The positions along an axis of ``layout`` that the kept channels occupy."""
        parts, offset = [], 0
        for root in self.expand(layout.groups):
            size = self.sizes[root]
            k = kept.get(root)
            k = np.arange(size) if k is None else k
            parts.append(offset + k)
            offset += size
        idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if layout.per > 1:
            idx = (idx[:, None] * layout.per + np.arange(layout.per)).reshape(-1)
        return idx.astype(np.int64)


class _Stop(Exception):
    """A node the channels cannot pass: every group reaching it stays whole."""


# --------------------------------------------------------------------------- choosing and removing


def round_kept(n: int, keep: int, block: int | None) -> int:
    """``keep`` rounded up to a multiple of ``block`` (the target's preferred vector width:
    odd widths waste lanes, and Torch-Pruning's users saw MobileNetV2 run 3x slower for them),
    unless that would keep all ``n`` channels: then the asked count stays."""
    if not block or block <= 1:
        return keep
    up = -(-keep // block) * block
    return up if up < n else keep


@dataclass
class GroupChoice:
    group: Group
    kept: np.ndarray  # channel indices kept, ascending
    reason: str | None = None  # why nothing was removed


def choose(cg: ChannelGraph, importance: Mapping[str, np.ndarray],
           rate: float | Mapping[str, float] | None = None,
           masks: Mapping[str, np.ndarray] | None = None,
           block: int | None = None) -> dict[int, GroupChoice]:
    """The channels every group keeps. With ``rate``: ``round(rate * n)`` of the group's n
    channels go, the weakest by aggregate importance (each producer's importance over its mean,
    summed), rounded by ``block``; a mapping of rates prunes the groups of the layers it names
    (the first named producer's rate). With ``masks`` (layer -> 0/1): a channel goes when every
    named producer of its group has it switched off."""
    out: dict[int, GroupChoice] = {}
    for root, group in cg.groups().items():
        n = group.size
        everything = np.arange(n)
        named = [p for p in group.producers
                 if (masks is not None and p in masks)
                 or (masks is None and (not isinstance(rate, Mapping) or p in rate))]
        if not named:
            out[root] = GroupChoice(group, everything, "not asked")
            continue
        if group.reason:
            out[root] = GroupChoice(group, everything, group.reason)
            continue
        if masks is not None:
            on = np.zeros(n, dtype=bool)
            for p in named:
                off = group.offsets.get(p, 0)
                on |= np.asarray(masks[p]).reshape(-1)[off:off + n] != 0
            if not on.any():
                score = np.zeros(n)
                for p in named:
                    if importance and p in importance:
                        off = group.offsets.get(p, 0)
                        score += np.asarray(importance[p], dtype=np.float64).reshape(-1)[off:off + n]
                on[int(np.argmax(score))] = True
                log.warning("group of %s: every channel's mask is closed; it keeps one",
                            ", ".join(group.producers))
            out[root] = GroupChoice(group, np.flatnonzero(on))
            continue
        r = rate.get(named[0]) if isinstance(rate, Mapping) else rate
        if not 0.0 <= float(r) < 1.0:
            raise ScalpelError(f"node pruning rate must be in [0, 1), got {r} for {named[0]}")
        score = np.zeros(n)
        for p in group.producers:
            imp = importance.get(p)
            if imp is None:
                continue
            imp = np.asarray(imp, dtype=np.float64).reshape(-1)
            mean = float(np.mean(imp)) if imp.size else 0.0  # over the whole layer
            off = group.offsets.get(p, 0)
            part = imp[off:off + n]
            score += part / mean if mean > 0 else part
        asked = int(round(float(r) * n))
        k = max(min(asked, n - 1), 0)
        if n and asked > k:
            log.warning("layer %s: node pruning rate %.3f capped at %.3f so that the layer keeps "
                        "one of its %d nodes", named[0], float(r), k / n, n)
        keep = round_kept(n, n - k, block)
        # on ties, the earlier channel goes first (as masks_for_rate does)
        order = np.argsort(score, kind="stable")
        kept = np.sort(order[n - keep:]) if keep < n else everything
        out[root] = GroupChoice(group, kept)
    return out


def apply(cg: ChannelGraph, choices: Mapping[int, GroupChoice]) -> onnx.ModelProto:
    """A copy of the analysed model with the channels not kept removed from every member."""
    kept = {root: c.kept for root, c in choices.items() if len(c.kept) < c.group.size}
    out = onnx.ModelProto()
    out.CopyFrom(cg.model)
    graph = out.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    done: set[tuple[str, int]] = set()
    for s in cg.slices:
        idx = cg.indices(s.layout, kept)
        arr = arrays[s.init]
        if len(idx) == arr.shape[s.axis]:
            continue
        if (s.init, s.axis) in done:
            raise ScalpelError(f"{s.init}: sliced twice along axis {s.axis}")
        done.add((s.init, s.axis))
        arrays[s.init] = np.take(arr, idx, axis=s.axis)
    for init in graph.initializer:
        if init.name in arrays and tuple(init.dims) != arrays[init.name].shape:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arrays[init.name]), init.name))
    for i, inp in enumerate(graph.input):  # IR < 4 lists initializers as inputs too
        if inp.name in arrays:
            graph.input[i].CopyFrom(helper.make_tensor_value_info(
                inp.name, inp.type.tensor_type.elem_type, list(arrays[inp.name].shape)))
    for node, layout, old in cg.reshapes:
        new = len(cg.indices(layout, kept))
        if new == old:
            continue
        target = next(n for n in graph.node if list(n.output) == list(node.output))
        if node.op_type != "Reshape" or target.input[1] not in arrays:
            continue  # computed at run time (Shape/Gather/Concat with -1): follows by itself
        shape = np.array(arrays[target.input[1]], copy=True)
        if shape.size > 1 and shape[1] == old:
            shape[1] = new
        elif shape.size < 2 or shape[1] not in (-1, 0):
            raise ScalpelError(f"Reshape {node_label(node)}: cannot shrink target shape "
                               f"{shape.tolist()} to follow the removed nodes")
        for init in graph.initializer:
            if init.name == target.input[1]:
                init.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), init.name))
    for la in cg.layers:  # a depthwise convolution's group count is its channel count
        if la.depthwise:
            new = len(cg.indices(la.layout, kept))
            node = next(n for n in graph.node if n.op_type == "Conv" and len(n.input) > 1
                        and n.input[1] == la.name)
            for a in node.attribute:
                if a.name == "group":
                    a.i = new
    del graph.value_info[:]  # stale channel counts
    return out
