"""Graphs TVM cannot import whole: cut them where it can, and put the pruned part back.

Exporters add post-processing that TVM's Relax ONNX importer does not take: scikit-learn's
``skl2onnx`` ends a classifier with ``ArrayFeatureExtractor`` and ``ZipMap`` (domain
``ai.onnx.ml``, the latter returning a sequence of maps, not a tensor). Pruning only needs the
layers in front of it, so:

* ``importable_part`` cuts a model automatically at the first node the importer cannot take
  (an op outside its converter table or outside the default domain, or one that makes a
  sequence, map or optional): the cut keeps the model's inputs and ends at every tensor the
  rest of the graph reads from it;
* ``cut_at`` cuts at tensors the user names (``--outputs``), with one-line errors for names
  that are not there;
* ``write_back`` puts the pruned part back in front of the untouched rest of the original graph
  (the post-processing, with its own constants, outputs, opsets and metadata), after checking
  that every tensor the rest reads still has its shape: a pruned channel that would reach the
  post-processing is refused, never written.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ScalpelError

log = logging.getLogger("tvm_scalpel")

DEFAULT_DOMAINS = ("", "ai.onnx")
# Handled by the importer itself rather than its converter table.
BUILT_IN_OPS = {"If", "Constant"}


@dataclass
class Cut:
    """The part of a model TVM imports, and what was left out of it."""

    model: onnx.ModelProto  # the original inputs up to ``outputs``; standard ONNX
    outputs: list[str]  # the tensors it ends at (its graph outputs, in node order)
    left_out: list[onnx.NodeProto] = field(default_factory=list)  # the original's other nodes
    stop: onnx.NodeProto | None = None  # the first node TVM cannot take (automatic cuts)
    asked: list[str] = field(default_factory=list)  # the --outputs names, when given

    def left_out_ops(self) -> list[str]:
        """The op types left out, once each, in node order."""
        return list(dict.fromkeys(n.op_type for n in self.left_out))

    def summary(self, written_back: bool = True) -> str:
        """One line: where the graph was cut, what was pruned and what was kept."""
        where = ("at --outputs " + ", ".join(self.asked) if self.asked else
                 f"before {label(self.stop)}, the first node TVM cannot import"
                 if self.stop is not None else "")
        line = f"graph cut {where}: pruned the part ending at {', '.join(self.outputs)}"
        if not self.left_out:
            return line
        rest = f"{len(self.left_out)} node(s) after it ({', '.join(self.left_out_ops())})"
        if written_back:
            return f"{line}; {rest} kept as they were, pruned weights written back into the original graph"
        return f"{line}; {rest} left out of the file written"


def label(node: onnx.NodeProto) -> str:
    """How a user finds a node in Netron: its op and name, else its op and first output."""
    if node.name and node.name != node.op_type:
        return f"{node.op_type} {node.name}"
    if node.name:
        return f"{node.op_type} node"
    return f"{node.op_type}({node.output[0] if node.output else ''})"


def parse_outputs(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"a,b"`` (or a list of names) as ``["a", "b"]``, blanks dropped, duplicates once."""
    if text is None:
        return []
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(p.strip() for p in parts if p and p.strip()))
    if not names:
        raise ScalpelError("--outputs: give one or more tensor names, separated by commas")
    return names


# --------------------------------------------------------------------------- what TVM takes


def _convert_map() -> set[str]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return set(_get_convert_map())


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor a node reads, the outer-scope names its subgraphs use included."""
    names = {i for i in node.input if i}
    for g in _subgraphs(node):
        inner = {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            names |= _reads(n) - inner
            inner |= set(n.output)
    return names


def _why_not(node: onnx.NodeProto, ops: set[str], types: dict[str, onnx.TypeProto]) -> str | None:
    """Why TVM's importer cannot take ``node`` (None: it can)."""
    if node.domain not in DEFAULT_DOMAINS:
        return f"an op of domain {node.domain}"
    if node.op_type not in ops and node.op_type not in BUILT_IN_OPS:
        return "an op TVM's ONNX importer does not have"
    for out in node.output:
        t = types.get(out)
        if out and t is not None and not t.HasField("tensor_type"):
            kind = t.WhichOneof("value").removesuffix("_type")
            return f"its output {out} is a {kind}, not a tensor"
    for g in _subgraphs(node):
        for inner in g.node:
            why = _why_not(inner, ops, {})
            if why:
                return f"its subgraph holds {inner.op_type}: {why}"
    return None


def _may_make_non_tensors(model: onnx.ModelProto) -> bool:
    """Whether a standard op of the graph may make a sequence or an optional (only then are
    types worth inferring: shape inference of a large model takes seconds)."""
    if any(o.type.WhichOneof("value") not in (None, "tensor_type") for o in model.graph.output):
        return True
    return any("Sequence" in n.op_type or n.op_type.startswith("Optional")
               or any(True for _ in _subgraphs(n)) for n in model.graph.node)


def _types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The type of every tensor onnx's shape inference can tell (the graph's own first)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an op inference does not know: use what the file says
        inferred = model
    types: dict[str, onnx.TypeProto] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if vi.type.WhichOneof("value") is not None:
            types[vi.name] = vi.type
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.type.WhichOneof("value") is not None:
            types[vi.name] = vi.type
    for init in model.graph.initializer:
        types.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    return types


def unimportable(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str]]:
    """``(node, why)`` for every node TVM's Relax ONNX importer cannot take."""
    ops, types = _convert_map(), _types(model)
    out = []
    for node in model.graph.node:
        why = _why_not(node, ops, types)
        if why:
            out.append((node, why))
    return out


# --------------------------------------------------------------------------- cutting


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def _ancestors(graph: onnx.GraphProto, names: list[str]) -> set[int]:
    """Indices of the nodes ``names`` are computed from."""
    producers = _producers(graph)
    todo = [producers[n] for n in names if n in producers]
    seen: set[int] = set()
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        todo.extend(producers[n] for n in _reads(graph.node[i]) if n in producers)
    return seen


def _frontier(graph: onnx.GraphProto, part: set[int]) -> list[str]:
    """Tensors the nodes ``part`` make that the other nodes read or the graph returns."""
    made = {out for i in part for out in graph.node[i].output if out}
    read = {n for i, node in enumerate(graph.node) if i not in part for n in _reads(node)}
    read |= {o.name for o in graph.output}
    return [out for i in sorted(part) for out in graph.node[i].output if out in made and out in read]


def _extract(model: onnx.ModelProto, part: set[int], outputs: list[str],
             types: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
    """A model of the nodes ``part`` with the original inputs they read and ``outputs``."""
    graph = model.graph
    nodes = [graph.node[i] for i in sorted(part)]
    read = set().union(*(_reads(n) for n in nodes)) if nodes else set()
    inits = [i for i in graph.initializer if i.name in read]
    init_names = {i.name for i in inits}
    inputs = [i for i in graph.input if i.name in read or (i.name in outputs and i.name not in init_names)]
    outs = []
    for name in outputs:
        t = types.get(name)
        if t is None:
            raise ScalpelError(f"cannot tell the type of tensor {name} (shape inference does not "
                               "reach it): cut elsewhere with --outputs")
        vi = onnx.ValueInfoProto()
        vi.name = name
        vi.type.CopyFrom(t)
        outs.append(vi)
    made = {o for n in nodes for o in n.output}
    value_info = [vi for vi in graph.value_info if vi.name in made and vi.name not in outputs]
    cut_graph = helper.make_graph(nodes, graph.name or "cut", inputs, outs, inits,
                                  value_info=value_info)
    cut_graph.sparse_initializer.extend(s for s in graph.sparse_initializer if s.values.name in read)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    cut.graph.CopyFrom(cut_graph)
    used = {n.domain for n in nodes} | {""}
    keep = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del cut.opset_import[:]
    cut.opset_import.extend(keep)
    del cut.functions[:]
    cut.functions.extend(f for f in model.functions if (f.domain, f.name) in
                         {(n.domain, n.op_type) for n in nodes})
    try:
        onnx.checker.check_model(cut)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScalpelError(f"the cut model is not valid ONNX: {first}") from None
    return cut


def importable_part(model: onnx.ModelProto) -> Cut | None:
    """The model cut before the first node TVM's importer cannot take (and everything that
    depends on it); None when TVM takes the whole graph. The cut ends at every tensor the
    nodes left out (or the model's outputs) read from it."""
    ops, graph = _convert_map(), model.graph
    if not _may_make_non_tensors(model) and all(_why_not(n, ops, {}) is None for n in graph.node):
        return None  # TVM takes every node: no need to infer types
    types = _types(model)
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    part: set[int] = set()
    stop = None
    for i, node in enumerate(graph.node):
        if _why_not(node, ops, types) is None and _reads(node) <= available:
            part.add(i)
            available |= set(node.output)
        elif stop is None:
            stop = node
    if stop is None:
        return None
    why = _why_not(stop, ops, types) or "it reads a tensor TVM cannot take"
    outputs = _frontier(graph, part)
    if not outputs:
        raise ScalpelError(f"TVM cannot import this model: its first node it cannot take, "
                           f"{label(stop)} ({why}), leaves nothing in front of "
                           "it that TVM can import")
    part = _ancestors(graph, outputs)
    log.info("TVM cannot import %s (%s): cutting the graph at %s", label(stop),
             why, ", ".join(outputs))
    return Cut(_extract(model, part, outputs, types), outputs,
               [n for i, n in enumerate(graph.node) if i not in part], stop)


def cut_at(model: onnx.ModelProto, names, keep_rest: bool = False) -> Cut:
    """The model from its inputs to the tensors ``names`` (``--outputs``). ``keep_rest``: for
    ``write_back``, the cut also ends at every other tensor the rest of the graph reads from it
    (so that pruning leaves those alone). Names that are not tensors of the model, inputs, and
    cuts that still hold nodes TVM cannot import are one-line errors."""
    names = parse_outputs(names)
    graph = model.graph
    producers = _producers(graph)
    inputs = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for name in names:
        if name in producers:
            continue
        if name in inputs:
            raise ScalpelError(f"--outputs: {name} is an input or a constant of the model, not a "
                               "tensor a node computes")
        close = difflib.get_close_matches(name, list(producers), n=3)
        hint = (f"; did you mean {' or '.join(close)}?" if close else
                f"; the model's outputs are {', '.join(o.name for o in graph.output)}")
        raise ScalpelError(f"--outputs: no tensor named {name!r} in the model{hint}")
    ops, types = _convert_map(), _types(model)
    part = _ancestors(graph, names)
    for i in sorted(part):
        why = _why_not(graph.node[i], ops, types)
        if why:
            node = graph.node[i]
            raise ScalpelError(f"--outputs {','.join(names)}: the cut still holds {label(node)} "
                               f"({why}); cut before it")
    outputs = names
    if keep_rest:
        outputs = list(dict.fromkeys(names + _frontier(graph, part)))
    return Cut(_extract(model, part, outputs, types), outputs,
               [n for i, n in enumerate(graph.node) if i not in part], asked=names)


def for_tvm(model: onnx.ModelProto, outputs=None, keep_rest: bool = True) -> Cut | None:
    """The cut ``prune`` / ``compile`` work on: at ``outputs`` when given, else automatically
    before what TVM cannot import (None when it imports the whole model)."""
    if outputs is not None:
        return cut_at(model, outputs, keep_rest=keep_rest)
    return importable_part(model)


def class_scores(cut: Cut) -> str | None:
    """The tensor a classifier's softmax reads in the cut part (the class scores a trainer
    needs as the output), if there is one."""
    soft = [n for n in cut.model.graph.node if n.op_type in ("Softmax", "LogSoftmax")]
    return soft[-1].input[0] if soft else None


# --------------------------------------------------------------------------- putting it back


def _dims(t: onnx.TypeProto | None) -> list | None:
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in t.tensor_type.shape.dim]


def _inferred(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Tensor types as the nodes compute them: the shapes the graph declares for its outputs
    and intermediate tensors (those of the model before pruning) left out."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    for out in bare.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(bare)
    except Exception:
        return {}
    return {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}


def _check_ends(cut: Cut, pruned: onnx.ModelProto) -> None:
    """Every tensor the rest of the graph reads keeps its type and shape."""
    names = {o.name for o in pruned.graph.output}
    missing = [o for o in cut.outputs if o not in names]
    if missing:
        raise ScalpelError(f"the pruned part no longer ends at {', '.join(missing)}: cannot put "
                           "it back into the original graph")
    before, after = _types(cut.model), _inferred(pruned)
    readers = {}
    for node in cut.left_out:
        for name in _reads(node):
            readers.setdefault(name, label(node))
    for name in cut.outputs:
        old, new = _dims(before.get(name)), _dims(after.get(name))
        if old is None or new is None or len(old) != len(new):
            continue
        changed = [(a, b) for a, b in zip(old, new) if isinstance(a, int) and isinstance(b, int) and a != b]
        if changed:
            who = readers.get(name, "the model's output")
            raise ScalpelError(f"pruning changed tensor {name} from {old} to {new}, and {who} "
                               "reads it: the removed channels would reach the part TVM does "
                               "not import; nothing written (cut later with --outputs)")


def write_back(original: onnx.ModelProto, cut: Cut, pruned: onnx.ModelProto) -> onnx.ModelProto:
    """The original model with its cut part replaced by ``pruned`` (the cut model, pruned):
    pruned initializers (zeros for weight pruning, shrunk ones for node pruning) and the
    pruned part's nodes, followed by the nodes left out as they were, with their own
    constants. Inputs, outputs, opsets and metadata are the original's. A tensor the rest
    reads must keep its shape (else a ScalpelError: nothing is written)."""
    _check_ends(cut, pruned)
    out = onnx.ModelProto()
    out.CopyFrom(original)
    graph = out.graph
    pruned_inits = {i.name: i for i in pruned.graph.initializer}
    originals = {i.name: i for i in original.graph.initializer}
    rest = [onnx.NodeProto() for _ in cut.left_out]
    for copy, node in zip(rest, cut.left_out):
        copy.CopyFrom(node)
    rest_reads = set().union(*(_reads(n) for n in rest)) if rest else set()
    # a constant the rest reads and pruning changed: the rest keeps its own, under a new name
    from .channel_groups import all_names

    used = all_names(original.graph) | all_names(pruned.graph)
    renamed: dict[str, str] = {}
    kept_inits = []
    for name in sorted(rest_reads & set(originals)):
        init = originals[name]
        if name in pruned_inits and not _same(pruned_inits[name], init):
            new = _unique(f"{name}.unpruned", used)
            renamed[name] = new
            t = onnx.TensorProto()
            t.CopyFrom(init)
            t.name = new
            kept_inits.append(t)
        elif name not in pruned_inits:
            kept_inits.append(init)
    if renamed:
        for node in rest:
            _rename_reads(node, renamed)
    del graph.node[:]
    graph.node.extend(list(pruned.graph.node) + rest)
    del graph.initializer[:]
    graph.initializer.extend(list(pruned.graph.initializer) + kept_inits)
    for i, inp in enumerate(graph.input):  # IR < 4 lists initializers among the inputs too
        if inp.name in pruned_inits:
            init = pruned_inits[inp.name]
            graph.input[i].CopyFrom(helper.make_tensor_value_info(inp.name, init.data_type, list(init.dims)))
    read = set().union(*(_reads(n) for n in graph.node)) | {o.name for o in graph.output}
    keep_inputs = [i for i in graph.input if i.name not in originals or i.name in read
                   or i.name in pruned_inits]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    made_by_rest = {o for n in rest for o in n.output}
    value_info = [vi for vi in original.graph.value_info if vi.name in made_by_rest]
    del graph.value_info[:]  # the pruned part's channel counts changed; inference redoes them
    graph.value_info.extend(value_info)
    have = {o.domain for o in out.opset_import}
    out.opset_import.extend(o for o in pruned.opset_import if o.domain not in have)
    try:
        onnx.checker.check_model(out)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScalpelError(f"the pruned model put back into the original graph is not valid "
                           f"ONNX: {first}") from None
    return out


def _same(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def _unique(base: str, used: set[str]) -> str:
    name, i = base, 1
    while name in used:
        name, i = f"{base}.{i}", i + 1
    used.add(name)
    return name


def _rename_reads(node: onnx.NodeProto, renamed: dict[str, str]) -> None:
    for i, name in enumerate(node.input):
        if name in renamed:
            node.input[i] = renamed[name]
    for g in _subgraphs(node):
        inner = {i.name for i in g.input} | {i.name for i in g.initializer}
        for n in g.node:
            _rename_reads(n, {k: v for k, v in renamed.items() if k not in inner})
            inner |= set(n.output)
