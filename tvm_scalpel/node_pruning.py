"""Scalpel's node pruning on ONNX models: mask layers in, masked nodes out.

Node pruning removes whole nodes: neurons of a dense layer (``Gemm``, ``MatMul`` + ``Add``) and
filters of a convolution (``Conv``). Scalpel learns which ones by training a *mask layer* after
each layer, an element-wise ``Mul`` by a 0/1 vector along the channel axis; the nodes whose mask
is 0 are then taken out of the network. This module does the ONNX side of both halves:

* ``prunable_layers``: the layers that can carry a mask, with their node counts;
* ``insert_masks``: put ``Mul(h, mask)`` nodes after those layers (for training, or to apply
  masks chosen some other way);
* ``weight_importance`` + ``masks_for_rate``: masks from the weights alone (L1/L2 norm of each
  neuron's weight row or each filter), for users without data to train masks on;
* ``remove_masked_nodes``: import into Relax, run ``RemoveMaskedNodes`` and write a smaller
  standard ONNX model back (sliced initializers, no mask nodes, fixed flatten shapes);
* ``prune_nodes``: the three above in one call.

Layers are named by their **weight initializer** (e.g. ``fc1.weight``): that name survives
inserting masks (which renames the layer's output tensor) and is what ``onnx_io`` reports for
weight pruning too.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .checks import check_rate
from .errors import ScalpelError
from .onnx_io import MAX_IR_VERSION, constant_tensors, match_tensors, to_relax

log = logging.getLogger("tvm_scalpel")

LAYER_OPS = ("Gemm", "MatMul", "Conv")
POSITIONS = ("after_norm", "after_bias")
CRITERIA = ("l1", "l2")


@dataclass(frozen=True)
class PrunableLayer:
    """A layer whose nodes a mask can switch off."""

    name: str  # its weight initializer: the key of masks and importances
    op: str  # "Gemm", "MatMul" (with its bias "Add", if any) or "Conv"
    channels: int  # nodes: output neurons or filters
    output: str  # the tensor after its bias
    norm_output: str | None = None  # the output of a BatchNormalization reading only it


@dataclass
class NodeRemoval:
    """What ``remove_masked_nodes`` did to one layer."""

    name: str  # the layer's weight initializer (as in ``prunable_layers``)
    op: str
    nodes_before: int
    nodes_after: int
    kept: np.ndarray  # indices of the nodes kept
    node: str = ""  # the layer's ONNX node, as a user finds it
    reason: str = ""  # why nothing was removed, when nothing was
    coupled: tuple[str, ...] = ()  # the other layers whose channels it shares


# --------------------------------------------------------------------------- graph helpers


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            if name:
                out.setdefault(name, []).append(node)
    return out


def _layers(model: onnx.ModelProto, normalized: bool = False) -> tuple[list[PrunableLayer], dict[str, onnx.NodeProto]]:
    """Every layer with an initializer weight, and the node of each (by layer name). Read on
    the model with exporter quirks undone: shared constants copied per reader, ``Identity``
    and inference ``Dropout`` bypassed (``channel_groups.normalize``)."""
    from .channel_groups import normalize

    if not normalized:
        model = normalize(model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    layers, nodes = [], {}
    for node in graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.input[1]
        dims = list(inits[name].dims)
        if len(consumers.get(name, [])) != 1:
            continue  # a weight shared by several nodes
        out = node.output[0]
        if node.op_type == "Gemm" and len(dims) == 2:
            channels = dims[0] if _attr(node, "transB", 0) else dims[1]
        elif node.op_type == "MatMul" and len(dims) == 2:
            channels = dims[1]
            readers = consumers.get(out, [])
            if len(readers) == 1 and readers[0].op_type == "Add":
                other = [i for i in readers[0].input if i != out]
                if len(other) == 1 and other[0] in inits:
                    out = readers[0].output[0]
        elif node.op_type == "Conv" and len(dims) == 4 and _attr(node, "group", 1) == 1:
            channels = dims[0]
        else:
            continue
        readers = consumers.get(out, [])
        norm = None
        if len(readers) == 1 and readers[0].op_type == "BatchNormalization" and readers[0].input[0] == out:
            norm = readers[0].output[0]
        layers.append(PrunableLayer(name, node.op_type, int(channels), out, norm))
        nodes[name] = node
    return layers, nodes


def _feeds_a_layer(graph: onnx.GraphProto, tensor: str, layer_nodes) -> bool:
    """Whether another layer reads ``tensor``, directly or through other nodes."""
    consumers = _consumers(graph)
    ids = {id(n) for n in layer_nodes}
    todo, seen = deque([tensor]), {tensor}
    while todo:
        for node in consumers.get(todo.popleft(), []):
            if id(node) in ids:
                return True
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    todo.append(out)
    return False


def prunable_layers(model: onnx.ModelProto) -> list[PrunableLayer]:
    """The layers a mask can go after, in node order: ``Gemm`` and ``MatMul`` (+ ``Add``) with
    an initializer weight of rank 2, ``Conv`` with an initializer weight and ``group=1``. A
    layer no other layer reads from (the one whose outputs are the class scores) is left out:
    its nodes are the model's outputs."""
    from .channel_groups import normalize

    model = normalize(model)
    layers, nodes = _layers(model, normalized=True)
    all_nodes = list(nodes.values())
    graph = model.graph
    return [layer for layer in layers
            if _feeds_a_layer(graph, layer.norm_output or layer.output, all_nodes)]


def _finish(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------- masks in


def insert_masks(model: onnx.ModelProto, masks: Mapping[str, np.ndarray],
                 position: str = "after_norm") -> onnx.ModelProto:
    """A copy of ``model`` with a mask layer ``Mul(h, mask)`` after each layer ``masks`` names.

    ``masks`` maps a layer's name (its weight initializer, see ``prunable_layers``) to a vector
    of its ``channels`` values; it is stored as ``[N]`` for a dense layer and ``[C, 1, 1]`` for
    a convolution. ``position="after_norm"`` puts the mask after the BatchNormalization that
    directly follows the layer, if any; ``"after_bias"`` right after the layer (and its bias).
    The mask multiplies the tensor every reader of the layer's output saw; the layer's output
    tensor is renamed ``<name>.unmasked``, so the model keeps its inputs and outputs.
    """
    if position not in POSITIONS:
        raise ScalpelError(f"unknown mask position {position!r}: use {' or '.join(POSITIONS)}")
    layers = {layer.name: layer for layer in prunable_layers(model)}
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise ScalpelError(f"no prunable layer named {', '.join(unknown)} "
                           f"(prunable: {', '.join(layers) or 'none'})")
    from .channel_groups import normalize

    out = normalize(model)  # a copy; shared constants copied per reader, Identity bypassed
    graph = out.graph
    from .channel_groups import all_names, unique_name

    used = all_names(graph)
    for name, mask in masks.items():
        layer = layers[name]
        arr = np.asarray(mask, dtype=np.float32).reshape(-1)
        if arr.size != layer.channels:
            raise ScalpelError(f"mask for {name}: {arr.size} values for {layer.channels} nodes")
        if layer.op == "Conv":
            arr = arr.reshape(layer.channels, 1, 1)
        point = layer.norm_output if position == "after_norm" and layer.norm_output else layer.output
        index, producer = next((i, n) for i, n in enumerate(graph.node) if point in n.output)
        hidden = unique_name(f"{point}.unmasked", used)
        producer.output[list(producer.output).index(point)] = hidden
        mask_name = unique_name(f"{name}.mask", used)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), mask_name))
        mul = helper.make_node("Mul", [hidden, mask_name], [point], name=unique_name(f"{name}.mask_mul", used))
        graph.node.insert(index + 1, mul)
    return _finish(out)


# --------------------------------------------------------------------------- masks from weights


def _rows(model: onnx.ModelProto, layer: PrunableLayer, node: onnx.NodeProto) -> np.ndarray:
    """One row per node: its incoming weights (a neuron's row, a filter flattened)."""
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == layer.name))
    if layer.op == "Gemm" and _attr(node, "transB", 0):
        return w.astype(np.float64)
    if layer.op in ("Gemm", "MatMul"):
        return w.T.astype(np.float64)
    return w.reshape(w.shape[0], -1).astype(np.float64)


def weight_importance(model: onnx.ModelProto, criterion: str = "l1") -> dict[str, np.ndarray]:
    """Each prunable layer's node importance from its weights alone: the L1 (``"l1"``) or L2
    (``"l2"``) norm of every neuron's weight row or every filter, as float64 ``[channels]``."""
    from .channel_groups import normalize

    if criterion not in CRITERIA:
        raise ScalpelError(f"unknown criterion {criterion!r}: use {' or '.join(CRITERIA)}")
    model = normalize(model)
    _, nodes = _layers(model, normalized=True)
    out = {}
    for layer in prunable_layers(model):
        rows = _rows(model, layer, nodes[layer.name])
        out[layer.name] = (np.abs(rows).sum(axis=1) if criterion == "l1"
                           else np.sqrt((rows * rows).sum(axis=1)))
    return out


def masks_for_rate(importances: Mapping[str, np.ndarray],
                   rate: float | Mapping[str, float]) -> dict[str, np.ndarray]:
    """0/1 float32 masks that switch off ``round(rate * n)`` of each layer's n nodes, the least
    important first (the earlier node on a tie), always keeping at least one node per layer
    (a layer whose rate would switch them all off keeps its most important one, with a
    warning). A mapping of rates masks only the layers it names."""
    masks = {}
    for name, imp in importances.items():
        r = rate.get(name) if isinstance(rate, Mapping) else rate
        if r is None:
            continue
        check_rate(r, "node pruning rate", where=f" for {name}")
        imp = np.asarray(imp, dtype=np.float64).reshape(-1)
        n = imp.size
        asked = int(round(float(r) * n))
        k = max(min(asked, n - 1), 0)
        if n and asked > k:  # every node would go: the layer's output would no longer depend on its input
            log.warning("layer %s: node pruning rate %.3f capped at %.3f so that the layer keeps "
                        "one of its %d nodes", name, float(r), k / n, n)
        mask = np.ones(n, dtype=np.float32)
        mask[np.argsort(imp, kind="stable")[:k]] = 0.0
        masks[name] = mask
    return masks


# --------------------------------------------------------------------------- masked nodes out


def _pair_constants(model: onnx.ModelProto, func) -> dict:
    """Relax constant -> ``(tensor name, transposed)``, matched by content
    (``onnx_io.match_tensors``); equal contents pair in the order they are first read."""
    from .passes.graph import GraphIndex

    relax_consts = list(GraphIndex(func).constants)
    matches = match_tensors(constant_tensors(model.graph), [c.value.numpy() for c in relax_consts])
    return {const: match for const, match in zip(relax_consts, matches) if match is not None}


class _Writer:
    """Edits of one ONNX graph, by tensor name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph

    def node_reading(self, tensor: str, op_type: str | None = None) -> onnx.NodeProto | None:
        for node in self.graph.node:
            if tensor in node.input and (op_type is None or node.op_type == op_type):
                return node
        return None

    def read(self, name: str) -> np.ndarray | None:
        for init in self.graph.initializer:
            if init.name == name:
                return numpy_helper.to_array(init)
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output[0] == name:
                return numpy_helper.to_array(_attr(node, "value"))
        return None

    def write(self, name: str, arr: np.ndarray) -> None:
        for init in self.graph.initializer:
            if init.name == name:
                new = numpy_helper.from_array(np.ascontiguousarray(arr.astype(
                    onnx.helper.tensor_dtype_to_np_dtype(init.data_type))), name)
                init.CopyFrom(new)
                for i, inp in enumerate(self.graph.input):  # IR < 4 lists initializers as inputs
                    if inp.name == name:
                        self.graph.input[i].CopyFrom(helper.make_tensor_value_info(
                            name, init.data_type, list(arr.shape)))
                return
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output[0] == name:
                for a in node.attribute:
                    if a.name == "value":
                        a.t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(
                            arr.astype(onnx.helper.tensor_dtype_to_np_dtype(a.t.data_type)))))
                return
        raise KeyError(name)

    def fix_flatten(self, start: str, edits: list[tuple[int, int, int]]) -> None:
        """Shrink the target shapes of the Reshape nodes between ``start`` and the next layer."""
        tensor = start
        for _ in range(len(self.graph.node)):
            readers = [n for n in self.graph.node if tensor in n.input]
            if len(readers) != 1 or readers[0].op_type in LAYER_OPS:
                return
            node = readers[0]
            if node.op_type == "Reshape":
                self._fix_reshape(node, edits)
            tensor = node.output[0]

    def _fix_reshape(self, node: onnx.NodeProto, edits) -> None:
        shape = self.read(node.input[1])
        if shape is None:
            log.warning("Reshape %s: its target shape is computed at run time; not checked",
                        node.name or node.output[0])
            return
        new = np.array(shape, copy=True)
        for axis, old, size in edits:
            if axis < new.size and new[axis] == old:
                new[axis] = size
            elif axis < new.size and new[axis] not in (-1, 0):
                raise ScalpelError(f"Reshape {node.name or node.output[0]}: cannot shrink target "
                                   f"shape {shape.tolist()} to follow the removed nodes")
        if np.array_equal(new, shape):
            return
        if sum(node.input[1] in n.input for n in self.graph.node) > 1:  # shared: give it its own
            from .channel_groups import all_names, unique_name

            name = unique_name(f"{node.input[1]}.pruned", all_names(self.graph))
            self.graph.initializer.append(numpy_helper.from_array(new, name))
            node.input[1] = name
        else:
            self.write(node.input[1], new)

    def bypass(self, node: onnx.NodeProto, keep: str) -> None:
        """Remove ``node``, whose output equals its input ``keep``."""
        out = node.output[0]
        self.graph.node.remove(node)
        if out in {o.name for o in self.graph.output}:  # keep the model's output names
            for n in self.graph.node:
                for seq in (n.input, n.output):
                    for i, name in enumerate(seq):
                        if name == keep:
                            seq[i] = out
        else:
            for n in self.graph.node:
                for i, name in enumerate(n.input):
                    if name == out:
                        n.input[i] = keep

    def drop_unused(self, names: set[str]) -> None:
        read = {name for n in self.graph.node for name in n.input}
        for init in [i for i in self.graph.initializer if i.name in names and i.name not in read]:
            self.graph.initializer.remove(init)
        for inp in [i for i in self.graph.input if i.name in names and i.name not in read]:
            self.graph.input.remove(inp)


def remove_masked_nodes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[NodeRemoval]]:
    """Remove the nodes the model's mask layers switch off; return a smaller standard ONNX
    model, with the same inputs and outputs, and one ``NodeRemoval`` per mask removed.

    The model is imported into Relax and ``RemoveMaskedNodes`` decides what goes (see its
    docstring for what it supports); the initializers are then sliced as it sliced the Relax
    constants (matched by content), the mask ``Mul`` nodes removed and the target shapes of
    flattening ``Reshape`` nodes shrunk. Masks the pass leaves alone (with a warning) stay in
    the model. The result passes ``onnx.checker`` and strict shape inference.
    """
    from tvm import relax

    from .channel_groups import normalize
    from .passes import MaskedLayer, RemoveMaskedNodes

    model = normalize(model)  # a constant shared by several layers is no reason to give up
    mod = to_relax(model, "masked model")
    pairings = {}
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            pairings.update(_pair_constants(model, func))
    report: list[MaskedLayer] = []
    RemoveMaskedNodes(report=report)(mod)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    writer = _Writer(out)
    removals: list[NodeRemoval] = []
    written: dict[str, np.ndarray] = {}
    masks_gone: set[str] = set()

    def slot(const, what: str) -> tuple[str, bool]:
        if const not in pairings:
            raise ScalpelError(f"{what} ({'x'.join(map(str, const.value.numpy().shape))}) is not "
                               "among the model's initializers: cannot write the pruned model")
        return pairings[const]

    for entry in report:
        mask_name, _ = slot(entry.mask, f"the mask of {entry.name}")
        mul = writer.node_reading(mask_name, "Mul")
        if mul is None:
            raise ScalpelError(f"no Mul node reads mask {mask_name}")
        if entry.weight is not None:
            layer_name, _ = slot(entry.weight, f"the weight of {entry.name}")
            layer_node = writer.node_reading(layer_name)
            op = layer_node.op_type if layer_node is not None else "?"
        else:
            layer_name, op = next(i for i in mul.input if i != mask_name), "?"
        for const, arr in entry.constants:
            name, transposed = slot(const, f"a constant of {layer_name}")
            written[name] = arr.T if transposed else arr
        if entry.flatten:
            writer.fix_flatten(mul.output[0], entry.flatten)
        if not entry.mask_kept:
            writer.bypass(mul, next(i for i in mul.input if i != mask_name))
            masks_gone.add(mask_name)
        removals.append(NodeRemoval(layer_name, op, entry.nodes_before, entry.nodes_after,
                                    np.asarray(entry.kept)))
        log.info("%s (%s): %d -> %d nodes", layer_name, op, entry.nodes_before, entry.nodes_after)
    for name, arr in written.items():
        writer.write(name, arr)
    writer.drop_unused(masks_gone)
    del out.graph.value_info[:]  # stale channel counts; shape inference writes them anew
    try:
        _finish(out)
        out = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScalpelError(f"the node-pruned model is not valid ONNX: {first}") from None
    return out, removals


def _norm_rows(w: np.ndarray, op: str, node: onnx.NodeProto | None, criterion: str) -> np.ndarray:
    if op == "Gemm" and node is not None and _attr(node, "transB", 0):
        rows = w
    elif op in ("Gemm", "MatMul"):
        rows = w.T
    else:
        rows = w.reshape(w.shape[0], -1)
    rows = rows.astype(np.float64)
    return np.abs(rows).sum(axis=1) if criterion == "l1" else np.sqrt((rows * rows).sum(axis=1))


def prune_coupled(model: onnx.ModelProto, rate: float | Mapping[str, float] | None = None,
                  criterion: str = "l1", importance: Mapping[str, np.ndarray] | None = None,
                  masks: Mapping[str, np.ndarray] | None = None, block: int | None = None,
                  strict: bool = False) -> tuple[onnx.ModelProto, list[NodeRemoval]]:
    """Node pruning by coupled channel groups (``channel_groups``), straight on the ONNX graph.

    Every group of channels that must move together (a residual stage, a concat, a depthwise
    convolution and the layer feeding it) is scored by its producing layers' importance
    (``importance`` by layer name, else the ``criterion`` weight norm) and loses the same
    channels everywhere: ``round(rate * n)`` of them (a mapping of rates prunes the groups of
    the layers it names), or, with ``masks`` (layer -> 0/1), the channels every named producer
    switched off. ``block`` rounds each kept count up to a multiple of the target's preferred
    width (``channel_groups.round_kept``). No mask node is written: a layer that cannot be
    pruned stays whole, with a warning (``strict``: a ScalpelError). The result is the input
    model with its consuming layers' input columns for the removed channels set to zero.

    Returns the smaller model and one ``NodeRemoval`` per layer asked for (and per depthwise
    layer carried along), with its ONNX node name, the layers it is coupled with and, when it
    was not pruned, why.
    """
    from .channel_groups import ChannelGraph, apply, choose, normalize

    if criterion not in CRITERIA and importance is None and masks is None:
        raise ScalpelError(f"unknown criterion {criterion!r}: use {' or '.join(CRITERIA)}")
    work = normalize(model)
    cg = ChannelGraph(work)
    by_weight = {n.input[1]: n for n in work.graph.node if len(n.input) > 1}
    if importance is None:
        importance = {la.name: _norm_rows(cg.inits[la.name], la.op, by_weight.get(la.name), criterion)
                      for la in cg.layers if not la.depthwise}
    asked = (set(masks) if masks is not None else set(rate) if isinstance(rate, Mapping)
             else {la.name for la in prunable_layers(model)})
    choices = choose(cg, importance, rate=None if masks is not None else rate, masks=masks,
                     block=block)
    pruned = apply(cg, choices)
    kept_by_root = {root: c.kept for root, c in choices.items()}
    removals: list[NodeRemoval] = []
    problems: list[str] = []
    for la in cg.layers:
        roots = cg.expand(la.layout.groups)
        parts = [choices[r] for r in roots if r in choices]
        if la.depthwise:
            if not any(len(c.kept) < c.group.size for c in parts):
                continue
        elif la.name not in asked:
            continue
        kept = cg.indices(la.layout, kept_by_root)
        coupled = tuple(dict.fromkeys(p for c in parts for p in c.group.producers if p != la.name))
        reason = next((c.reason for c in parts if c.reason and c.reason != "not asked"), "")
        if la.depthwise:
            reason = ""
        removals.append(NodeRemoval(la.name, la.op, la.channels, len(kept), kept, la.node,
                                    reason, coupled))
        if reason:
            problems.append(f"layer {la.name} (node {la.node}) not pruned: {reason}")
    for line in problems:
        log.warning("%s", line)
    if strict and problems:
        raise ScalpelError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    for r in removals:
        if r.nodes_after < r.nodes_before:
            log.info("%s (%s, node %s): %d -> %d nodes", r.name, r.op, r.node, r.nodes_before,
                     r.nodes_after)
    try:
        _finish(pruned)
        pruned = onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScalpelError(f"the node-pruned model is not valid ONNX: {first}") from None
    return pruned, removals


def out_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels of every weight layer (``Conv``, ``Gemm``, ``MatMul``), by weight name,
    read from the weights the model holds."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = inits[node.input[1]]
        if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB", 0)):
            out[node.input[1]] = dims[0]
        elif len(dims) == 2:
            out[node.input[1]] = dims[1]
    return out


def prune_nodes(model: onnx.ModelProto, rate: float | Mapping[str, float], criterion: str = "l1",
                block: int | None = None, strict: bool = False,
                ) -> tuple[onnx.ModelProto, list[NodeRemoval]]:
    """Node pruning without data: remove the ``rate`` least important channels of every
    coupled channel group by weight norm (``prune_coupled``)."""
    return prune_coupled(model, rate, criterion, block=block, strict=strict)
