"""What the ``tvm-scalpel`` commands do, as one call each: ``prune``, ``compile``, ``tune``,
``train``. Each returns a result object with the per-layer report that the command prints
(``rows()``), so a Python user can do in one call what the command line does, and the command
line (cli.py) only parses arguments, calls these and prints.

Layering: this module sits above api (prune_onnx, compile_onnx), finetune, policy and tuning,
and below cli and demo (see tests/test_import_graph.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from .checks import (
    NODE_CRITERIA,
    OPTIMIZERS,
    check_choice,
    check_count,
    check_group_width,
    check_importance,
    check_mode,
    check_policy,
    check_rate,
    default_group_width,
)
from .decisions import LayerDecision
from .errors import ScalpelError
from .kinds import KernelKind, LayerKind

log = logging.getLogger("tvm_scalpel")


def _as_model(model) -> onnx.ModelProto:
    """A ModelProto as it is; the name of a built-in network (``models.BUILDERS``: lenet5,
    alexnet, ...) unless a file of that name exists; else the path of an ONNX file."""
    if isinstance(model, onnx.ModelProto):
        return model
    from . import models
    from .onnx_io import load_onnx

    if str(model) in models.BUILDERS and not Path(model).exists():
        return models.build(str(model))
    return load_onnx(model)


def load_data(spec=None):
    """A Dataset as it is; None or "mnist-sample" for the embedded MNIST sample; else a .npz
    with x and y, or an MNIST IDX folder."""
    from .data import Dataset, load_data as load_path, mnist_sample

    if isinstance(spec, Dataset):
        return spec
    if spec is None or spec == "mnist-sample":
        return mnist_sample()
    return load_path(spec)


@dataclass(frozen=True)
class Training:
    """How training and fine-tuning run (the command line's --lr, --optimizer, ...)."""

    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 64
    seed: int = 0
    progress: bool = True

    def settings(self, epochs: int):
        from .finetune import TrainSettings

        check_choice(self.optimizer, OPTIMIZERS, "optimizer")
        check_count(self.batch_size, "batch size")
        return TrainSettings(epochs=epochs, lr=self.lr, optimizer=self.optimizer,
                             batch_size=self.batch_size, seed=self.seed, progress=self.progress)


# --------------------------------------------------------------------------- prune


@dataclass
class PruneResult:
    """What ``prune`` did, step by step; a step that did not run is None."""

    model: onnx.ModelProto  # the pruned (and fine-tuned) model, standard ONNX
    target: object  # the TargetProfile pruned for
    importance: str
    policy: list | None = None  # policy.LayerPlan per weight layer (policy rules / measured)
    nodes: object | None = None  # finetune.NodePruneResult (node pruning)
    search: list | None = None  # finetune.PruneStep per rate tried (max_accuracy_drop)
    search_base: float | None = None  # the accuracy the search kept within its budget of
    max_accuracy_drop: float | None = None  # that budget, in percentage points
    rate: float | None = None  # the weight pruning rate applied (None: node pruning only)
    weights: object | None = None  # api.PruneOutcome: the weight-pruned layers
    measured: list | None = None  # policy.MeasuredLayer per layer (policy measured)
    accuracy_before: float | None = None  # of the input model, when there is data
    accuracy_after: float | None = None  # of ``model``
    fine_tuned: bool = False
    data: object | None = None  # the Dataset used, if any
    cut: object | None = None  # graph_cut.Cut: the part pruned, when TVM cannot import it all
    part: onnx.ModelProto | None = None  # that part, pruned (``model`` holds it written back)
    written_back: bool = False  # ``model`` is the original graph with the pruned part put back
    original: onnx.ModelProto | None = None  # the input model, when it was cut

    def cut_summary(self) -> str | None:
        """Where the graph was cut and what was kept; None when it was pruned whole."""
        return None if self.cut is None else self.cut.summary(self.written_back)

    def node_rows(self) -> list[list]:
        if self.nodes is None:
            return []
        return [[r.name, self.nodes.nodes_before[r.name], self.nodes.nodes_after[r.name], r.node,
                 r.reason or (f"coupled with {', '.join(r.coupled)}" if r.coupled else "")]
                for r in self.nodes.layers]

    def policy_rows(self) -> list[list]:
        return [[p.name, p.kind, p.method, p.note] for p in self.policy or []]

    def search_rows(self) -> list[list]:
        return [[f"{t.rate:.2f}", f"{t.accuracy_before_fine_tune * 100:.2f}%", f"{t.accuracy * 100:.2f}%"]
                for t in self.search or []]

    def measured_rows(self) -> list[list]:
        return [[m.name, f"{m.dense_us:.2f}", f"{m.sparse_us:.2f}",
                 "kept" if m.pays else "undone: dense is faster"] for m in self.measured or []]

    def rows(self) -> list[list]:
        """The per-layer weight pruning table (the last row: totals); empty without it."""
        outcome = self.weights
        if outcome is None:
            return []
        rows = [[outcome.weight_name(position), f"{layer.shape[0]}x{layer.shape[1]}", layer.group_width,
                 f"{layer.rate:.3f}", layer.dense_bytes, layer.sparse_bytes]
                for position, layer in enumerate(outcome.layers)]
        rows.append(["total", "", "", "", sum(r.dense_bytes for r in outcome.layers),
                     sum(r.sparse_bytes for r in outcome.layers)])
        return rows


PRUNE_HEADERS = ["layer", "shape (NxK)", "g", "rate", "dense bytes", "grouped-sparse bytes"]
NODE_HEADERS = ["layer", "nodes before", "nodes after", "node", "note"]
POLICY_HEADERS = ["layer", "kind", "pruning", "note"]
SEARCH_HEADERS = ["rate", "accuracy before fine-tune", "accuracy"]
MEASURED_HEADERS = ["layer", "dense us", "grouped-sparse us", "weight pruning"]


class NoRateFound(ScalpelError):
    """``max_accuracy_drop``: no rate tried kept the accuracy; ``result`` holds the steps so far
    (its ``search`` says what each rate reached)."""

    def __init__(self, message: str, result: PruneResult) -> None:
        super().__init__(message)
        self.result = result


def prune(model, rate: float = 0.9, *, target="x86", group_width: int | str | None = None,
          importance: str = "rms", last_layer_rate: float | None = None,
          conv_rate: float | None = None, nodes: float | None = None,
          nodes_criterion: str | None = None, policy: str = "none", rpc: str | None = None,
          db: str | os.PathLike | None = None, fine_tune: int = 0,
          max_accuracy_drop: float | None = None, mask_epochs: int = 3, data=None,
          training: Training = Training(), strict: bool = False, outputs=None,
          write_back: bool = True) -> PruneResult:
    """``tvm-scalpel prune`` in one call: the policy's plan (``policy="rules"`` / ``"measured"``),
    node pruning (``nodes``), the rate search (``max_accuracy_drop``), SIMD-aware weight pruning
    at ``rate`` (``group_width``: the target's SIMD width by default, ``"auto"`` from the tuning
    database ``db``), the measured policy's undoing where sparse does not pay, and fine-tuning
    (``fine_tune`` epochs). ``strict``: a layer node pruning cannot shrink is an error, not a
    warning. ``data`` (a Dataset, a path, or None for the MNIST sample where data
    is needed) gives the accuracies. The model is returned, not written.

    A model TVM cannot import whole (post-processing such as skl2onnx's ``ZipMap``) is pruned
    up to the first node TVM cannot take, or up to the tensors ``outputs`` names ("a,b" or a
    list); with ``write_back`` (the default) the pruned part is then put back in front of the
    untouched rest of the original graph, else only the part is returned
    (``graph_cut``; ``result.cut_summary()`` says what was cut and kept)."""
    from .targets import resolve_target

    check_rate(rate)
    for extra, what in ((last_layer_rate, "last layer rate"), (conv_rate, "conv rate"),
                        (nodes, "node pruning rate")):
        if extra is not None:
            check_rate(extra, what)
    check_group_width(group_width, allow_auto=True)
    check_importance(importance)
    check_policy(policy)
    check_count(fine_tune, "fine-tune epochs", 0)
    check_count(mask_epochs, "mask epochs")
    if nodes_criterion is not None:
        check_choice(nodes_criterion, NODE_CRITERIA, "node pruning criterion")
    profile = resolve_target(target)
    model = _as_model(model)
    original = model
    from .graph_cut import for_tvm

    cut = for_tvm(model, outputs, keep_rest=write_back)
    if cut is not None:
        model = cut.model
    elif not write_back:
        log.warning("TVM imports the whole model and no --outputs were given: nothing cut")
    result = PruneResult(model, profile, importance, cut=cut,
                         written_back=cut is not None and write_back,
                         original=original if cut is not None else None)
    node_rates, weights, conv_weights = _apply_policy(policy, rpc, nodes, model, profile, result)
    conv_rate = conv_rate if conv_rate is not None else (rate if conv_weights else None)
    criterion = nodes_criterion or ("masks" if data is not None else "l1")
    wants_data = fine_tune or max_accuracy_drop is not None or (criterion == "masks" and node_rates)
    if wants_data or data is not None:
        from .finetune import accuracy, fit_data

        if cut is not None and len(cut.model.graph.output) != 1:
            from .graph_cut import class_scores

            scores = class_scores(cut)
            raise ScalpelError("accuracy and fine-tuning need one output, the class scores; the "
                               f"part of this model TVM imports ends at {', '.join(cut.outputs)}: "
                               "name the scores with --outputs"
                               + (f" (the input of the softmax: --outputs {scores})" if scores else ""))
        result.data = load_data(data)
        fit_data(model, result.data)  # shape check before any long work
        result.accuracy_before = accuracy(model, result.data)
    data = result.data

    if node_rates:
        from .finetune import node_prune

        # the rules are hardware-aware: kept counts in whole vectors of the target
        block = profile.simd_width if policy != "none" else None
        result.nodes = node_prune(model, node_rates, data, training.settings(fine_tune),
                                  mask_epochs=mask_epochs, criterion=criterion, block=block,
                                  strict=strict)
        model = result.model = result.nodes.model

    g = default_group_width(profile, group_width)
    if not weights and conv_rate is None:
        return _finish(result, model, data)
    if max_accuracy_drop is not None:
        from .finetune import search_max_rate

        best, base, tried = search_max_rate(model, data, max_accuracy_drop, g,
                                            training.settings(fine_tune or 3), profile,
                                            importance, last_layer_rate=last_layer_rate)
        result.search, result.search_base, result.max_accuracy_drop = tried, base, max_accuracy_drop
        if best is None:
            raise NoRateFound(f"no pruning rate kept accuracy within {max_accuracy_drop} points "
                              f"of {base * 100:.2f}%", result)
        rate, model = best.rate, best.model
    from .api import prune_onnx

    result.rate = rate
    last = None if last_layer_rate is None else min(rate, last_layer_rate)
    outcome = prune_onnx(model, rate if weights else 0.0, profile, group_width, importance,
                         last if weights else None, tuning_db=db, conv_rate=conv_rate)
    if not weights:  # the FC layers went through at rate 0: they are not pruned layers
        outcome.layers = [layer for layer in outcome.layers if layer.kind == LayerKind.CONV]
    if policy == "measured":
        from .policy import keep_where_sparse_pays

        result.measured = keep_where_sparse_pays(outcome, profile, rpc=rpc)
        outcome.layers = [layer for layer, m in zip(outcome.layers, result.measured) if m.pays]
    elif not outcome.layers:
        log.warning("no dense layer with a constant weight found: weights left as they are")
    result.weights = outcome
    final = outcome.model
    if fine_tune and max_accuracy_drop is None and rate > 0:
        from .finetune import train as fit

        final, _ = fit(final, data, training.settings(fine_tune), keep_zeros=True, desc="fine-tune")
        result.fine_tuned = True
    return _finish(result, final, data)


def _finish(result: PruneResult, model: onnx.ModelProto, data) -> PruneResult:
    result.model = model
    if data is not None:
        from .finetune import accuracy

        result.accuracy_after = accuracy(model, data)  # on the part TVM imports
    if result.cut is not None:
        result.part = model
        if result.written_back:
            from .graph_cut import write_back

            result.model = write_back(result.original, result.cut, model)
    return result


def _apply_policy(policy: str, rpc, nodes, model, profile, result: PruneResult):
    """``(node pruning rates, whether to weight-prune FC layers, and CONV layers)`` from the
    arguments or the target's rules (recorded in ``result.policy``)."""
    if rpc is not None and policy != "measured":
        raise ScalpelError("--rpc measures layers for --policy measured; it means nothing without it")
    if policy == "none":
        return nodes, True, False
    if policy == "measured" and profile.name != "x86" and rpc is None:
        raise ScalpelError(f"the measured policy times kernels on the target: give --rpc HOST:PORT "
                           f"of a {profile.name} RPC server, or use --target x86 to measure here")
    from .policy import plan_layers

    result.policy = plans = plan_layers(model, profile)
    rate = nodes if nodes is not None else 0.5
    node_rates = {p.name: rate for p in plans if p.method == "nodes"}
    weights = {kind: any(p.method == "weights" and p.kind is kind for p in plans) for kind in LayerKind}
    return node_rates or None, weights[LayerKind.FC], weights[LayerKind.CONV]


# --------------------------------------------------------------------------- compile


@dataclass
class CompileResult:
    executable: object  # tvm.runtime.Executable
    layers: list[LayerDecision]  # per dense / conv layer
    names: list[str]  # each layer's ONNX weight initializer (its Relax name where unknown)
    target: object  # the TargetProfile
    output: str | None = None  # the library written, if any
    cut: object | None = None  # graph_cut.Cut: the part compiled (``outputs``), if cut

    @property
    def sparse_layers(self) -> int:
        return sum(d.kernel is KernelKind.SPARSE for d in self.layers)

    def rows(self) -> list[list]:
        return [[name, f"{d.shape[0]}x{d.shape[1]}", f"{1 - d.density:.3f}", d.group_width or "-",
                 d.kernel, f"{d.estimated_speedup:.2f}" if d.group_width else "-"]
                for d, name in zip(self.layers, self.names)]


COMPILE_HEADERS = ["layer", "shape (NxK)", "zeros", "g", "kernel", "est. speedup"]


def compile(model, output: str | os.PathLike | None = None, *, target="x86", mode: str = "auto",
            db: str | os.PathLike | None = None, batch: int | None = None,
            outputs=None) -> CompileResult:
    """``tvm-scalpel compile`` in one call: layers whose zeros form groups (and pay, in
    ``mode="auto"``) go grouped-sparse; with ``output``, the shared library is written
    (all-or-nothing, cross-linked for a non-host target). ``outputs`` ("a,b" or a list of
    tensor names) compiles the graph from its inputs to those tensors only: the way to
    compile a model whose post-processing TVM cannot import (``graph_cut.cut_at``)."""
    from .api import compile_onnx, export_library
    from .schedules.toolchains import cross_linker
    from .onnx_io import initializer_names
    from .targets import resolve_target

    check_mode(mode)
    if batch is not None:
        check_count(batch, "batch")
    if output is not None and Path(output).suffix != ".so":
        raise ScalpelError(f"{output}: the output library must end in .so")
    profile = resolve_target(target)
    if output is not None:
        cross_linker(profile)  # a missing cross compiler is an error before minutes of compiling
    model = _as_model(model)
    from .graph_cut import cut_at, importable_part

    cut = None
    if outputs is not None:
        cut = cut_at(model, outputs)
        model = cut.model
    else:
        auto = importable_part(model)
        if auto is not None:  # a library cannot hold what TVM cannot import: say where to cut
            from .graph_cut import label

            raise ScalpelError(f"TVM cannot import {label(auto.stop)} "
                               f"(and what follows it): compile the part in front of it with "
                               f"--outputs {','.join(auto.outputs)}")
    outcome = compile_onnx(model, profile, mode=mode, tuning_db=db, batch=batch)
    if output is not None:
        export_library(outcome.executable, output, profile)
    names = initializer_names(model, [d.weight for d in outcome.layers])
    return CompileResult(outcome.executable, outcome.layers,
                         [name or d.name for d, name in zip(outcome.layers, names)], profile,
                         None if output is None else str(output), cut)


def compile_mcu(model, output: str | os.PathLike | None = None, *, mode: str = "auto",
                flash_bytes: int | None = None, ram_bytes: int | None = None,
                numerics: str = "fp32", data=None):
    """``tvm-scalpel compile --target cortex-m4 -o OUT_DIR`` in one call: a self-contained C
    project for the Cortex-M4F (``mcu.project``: one TVM-generated function per layer, the
    weights as const arrays, grouped-sparse where pruned, a static memory plan). Returns the
    ``McuProject`` (its ``rows()``: flash and RAM bytes per layer and in total); with
    ``output``, the folder is written, all or nothing. A model over ``flash_bytes`` /
    ``ram_bytes`` is an error and writes nothing. ``data`` (q15): the calibration data (None:
    the MNIST sample)."""
    from .mcu.project import generate

    for value, what in ((flash_bytes, "flash bytes"), (ram_bytes, "RAM bytes")):
        if value is not None:
            check_count(value, what)
    if output is not None and Path(output).suffix in (".so", ".dylib", ".dll"):
        raise ScalpelError(f"{output}: a Cortex-M4 project is a folder, not a library; give a folder name")
    model = _as_model(model)
    calibration = load_data(data) if numerics == "q15" else None
    project = generate(model, mode=mode, numerics=numerics, calibration=calibration)
    project.check_budget(flash_bytes, ram_bytes)
    if output is not None:
        project.write(output)
    return project


# --------------------------------------------------------------------------- tune


@dataclass
class TuneResult:
    """One dense layer, tuned."""

    name: str  # its ONNX weight initializer
    shape: tuple[int, int]  # (N, K)
    batch: int
    best: object | None  # tuning.Candidate: the fastest grouped-sparse one (None at rate 0)
    sparse_seconds: float | None
    dense_seconds: dict[str, float]  # {"ours": s, "meta_schedule": s}, those measured
    kernel: KernelKind  # the one it runs on
    new_trials: int  # measurements this call added to the database
    unit: str = "seconds"  # of sparse_seconds / dense_seconds: "instructions" on a microcontroller

    @property
    def kernel_text(self) -> str:
        if self.kernel is KernelKind.SPARSE:
            return f"grouped-sparse g={self.best.group_width}"
        # beside meta_schedule's kernel, ours is named as such
        return "dense (ours)" if self.kernel is KernelKind.DENSE else str(self.kernel)

    def row(self) -> list:
        if self.unit == "instructions":  # counted under qemu: no knobs besides g
            fmt = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
            knobs = ["-" if self.best is None else self.best.group_width, "-", "-", "-"]
        else:
            fmt = lambda v: "-" if v is None else f"{v * 1e6:.2f}"  # noqa: E731
            best = self.best
            knobs = ["-"] * 4 if best is None else [best.group_width, best.unroll,
                                                     best.batch_tile if self.batch > 1 else "-",
                                                     "yes" if best.parallel else "no"]
        return [self.name, f"{self.shape[0]}x{self.shape[1]}"] + knobs + [
            fmt(self.sparse_seconds), fmt(self.dense_seconds.get("ours")),
            fmt(self.dense_seconds.get("meta_schedule")), self.kernel_text, self.new_trials]


TUNE_HEADERS = ["layer", "shape (NxK)", "best g", "unroll", "batch tile", "threads", "sparse us",
                "dense us (ours)", "dense us (meta_schedule)", "kernel", "new trials"]
MCU_TUNE_HEADERS = ["layer", "shape (NxK)", "best g", "unroll", "batch tile", "threads",
                    "sparse instructions", "dense instructions", "dense (meta_schedule)", "kernel",
                    "new trials"]


def tune_headers(results: list[TuneResult]) -> list[str]:
    """The header of ``tune``'s table: times on a CPU, instruction counts on a microcontroller."""
    return MCU_TUNE_HEADERS if results and results[0].unit == "instructions" else TUNE_HEADERS


def _mcu_compile(model: onnx.ModelProto, folder, mode: str) -> None:
    """The Cortex-M4 project (what ``compile --target cortex-m4`` writes), as the
    instruction-count tuner calls it."""
    compile_mcu(model, folder, mode=mode)


def tune(model, db: str | os.PathLike, *, target="x86", rate: float = 0.9, batch: int = 1,
         last_layer_rate: float | None = None, trials: int = 16, dense_trials: int = 0, rpc: str | None = None,
         progress: bool = True, name: str | None = None) -> list[TuneResult]:
    """``tvm-scalpel tune`` in one call: per dense layer, grouped-sparse candidates (group width
    and kernel knobs) until ``trials`` are known in the database ``db``, our dense kernel, and
    (``dense_trials``) meta_schedule where the layer stays dense. Measured here, or on the RPC
    server ``rpc``; every measurement is appended to ``db`` at once. ``last_layer_rate``: the
    rate the last dense layer is tuned for, as ``prune --last-layer-rate`` prunes it (default:
    ``rate``). ``name`` is how an error names the model (default: its path, or "the model")."""
    from tqdm import tqdm

    from .api import dense_layer_shapes
    from .targets import resolve_target
    from .tuning import Task, TuningDatabase

    check_rate(rate)
    if last_layer_rate is not None:
        check_rate(last_layer_rate)
    check_count(batch, "batch")
    check_count(trials, "trials")
    check_count(dense_trials, "dense trials", 0)
    profile = resolve_target(target)
    if profile.kind != "llvm":
        raise ScalpelError(f"tuning measures our CPU kernels: target {profile.name} has none yet")
    if dense_trials and (profile.name != "x86" or rpc is not None):
        raise ScalpelError("--dense-trials tunes dense layers with meta_schedule on this machine: "
                           "use --target x86 without --rpc")
    measure_fn = dense_fn = None
    unit = "seconds"
    if profile.parallelism == "low":  # a microcontroller: instruction counts under qemu, here
        from functools import partial

        from .mcu.firmware import mcu_ready
        from .mcu.layer_cost import UNIT, measure_dense, measure_sparse

        if rpc is not None or batch != 1:
            raise ScalpelError(f"target {profile.name} is measured here under qemu, one input at "
                               "a time: drop --rpc and --batch")
        reason = mcu_ready()
        if reason is not None:
            raise ScalpelError(reason)
        measure_fn = partial(measure_sparse, compile_fn=_mcu_compile)
        dense_fn = partial(measure_dense, compile_fn=_mcu_compile)
        unit = UNIT
    elif profile.name != "x86" and rpc is None:
        raise ScalpelError(f"target {profile.name} cannot run here: measure on it with --rpc")
    if rpc is not None:
        from functools import partial

        from .remote import connect
        from .tuning import measure

        connect(rpc).cpu()  # a server that is down is an error before any work
        measure_fn = partial(measure, rpc=rpc)
    name = name or (str(model) if isinstance(model, (str, os.PathLike)) else "the model")
    model = _as_model(model)
    from .graph_cut import importable_part

    cut = importable_part(model)  # post-processing TVM cannot import has no dense layer to tune
    shapes = dense_layer_shapes(model if cut is None else cut.model)
    if not shapes:
        from .api import conv_layer_shapes

        if profile.parallelism != "low" and conv_layer_shapes(model if cut is None else cut.model):
            return []  # conv layers only (Network-in-Network): tune_convs has them
        raise ScalpelError(f"{name}: no dense layer to tune")
    database = TuningDatabase(db)
    rates = [rate] * len(shapes)
    if last_layer_rate is not None:
        rates[-1] = last_layer_rate  # the class scores, as prune --last-layer-rate prunes them
    results = []
    with tqdm(total=sum(trials + 1 if r > 0 else 1 for r in rates), desc="tune", unit="trial",
              disable=None if progress else True, leave=False) as bar:
        for (layer, (n, k)), layer_rate in zip(shapes, rates):
            task = Task(n, k, layer_rate, batch)
            sparse_trials = trials if layer_rate > 0 else 0  # rate 0: the layer stays dense
            results.append(_tune_layer(layer, task, profile, database, sparse_trials, dense_trials,
                                       db, rpc, measure_fn, bar, dense_fn, unit))
    return results


@dataclass
class ConvTuneResult:
    """One conv shape, tuned: the fastest knobs of the blocked conv kernel."""

    name: str  # the ONNX weight of its first layer
    shape: object  # schedules.ConvShape
    best: object  # schedules.ConvKnobs
    seconds: float
    rule_seconds: float | None  # the rule's knobs (schedules.default_conv_knobs)
    new_trials: int

    def row(self) -> list:
        s, k = self.shape, self.best
        what = f"{s.out_channels}x{s.in_channels // s.groups}x{s.kh}x{s.kw} @{s.height}x{s.width}"
        if s.strides != (1, 1):
            what += f" s{s.strides[0]}"
        gain = "-" if not self.rule_seconds else f"{self.rule_seconds / self.seconds:.2f}x"
        algorithm = f"Winograd F({k.winograd}x{k.winograd}, {s.kh}x{s.kw})" if k.winograd else "direct"
        return [self.name, what, algorithm, k.oc_block, k.ow_tile, "yes" if k.unroll_kw else "no",
                f"{k.tiles_per_task}/{k.ic_step}", "positions" if k.positions_outer else "channels",
                f"{self.seconds * 1e6:.1f}", "-" if self.rule_seconds is None else f"{self.rule_seconds * 1e6:.1f}",
                gain, self.new_trials]


CONV_TUNE_HEADERS = ["conv layer", "shape (OxIxKHxKW @HxW)", "algorithm", "channel block", "output tile",
                     "kw unrolled", "tiles/task, ic step", "task order", "us", "rule's us",
                     "speed-up", "new trials"]


def tune_convs(model, db: str | os.PathLike, *, target="x86", batch: int = 1, trials: int = 8,
               progress: bool = True) -> list[ConvTuneResult]:
    """The conv half of ``tvm-scalpel tune``: for each conv shape the blocked conv kernel takes,
    ``trials`` knob candidates around the rule (conv_tuning.py), timed here and appended to
    ``db``; ``compile --db`` then builds each layer with the fastest. Nothing on targets we
    cannot time here (other CPUs, microcontrollers, GPUs)."""
    from tqdm import tqdm

    from .api import conv_layer_shapes
    from .conv_tuning import tune_conv
    from .graph_cut import importable_part
    from .targets import resolve_target
    from .tuning import TuningDatabase

    check_count(batch, "batch")
    check_count(trials, "conv trials", 0)
    profile = resolve_target(target)
    if not trials or profile.name != "x86":
        return []
    model = _as_model(model)
    cut = importable_part(model)
    shapes = conv_layer_shapes(model if cut is None else cut.model, batch)
    database = TuningDatabase(db)
    results = []
    with tqdm(total=len(shapes) * trials, desc="tune conv", unit="trial",
              disable=None if progress else True, leave=False) as bar:
        for name, shape in shapes:
            best, secs, rule, new = tune_conv(profile, shape, database, trials, progress=bar)
            bar.update(trials - new)
            results.append(ConvTuneResult(name, shape, best, secs, rule, new))
    return results


def _tune_layer(name, task, profile, db, sparse_trials: int, dense_trials: int, db_path, rpc,
                measure_fn, bar, dense_fn=None, unit: str = "seconds") -> TuneResult:
    """One layer: grouped-sparse candidates, our dense kernel, and (``dense_trials``)
    meta_schedule where the layer stays dense. ``dense_fn(task)`` costs the dense kernel
    where it is not timed here (a microcontroller's instruction count, in ``unit``)."""
    import numpy as np

    from .tuning import time_layer, tune_task

    best = secs = None
    new = 0
    if sparse_trials:
        kwargs = {"measure_fn": measure_fn} if measure_fn else {}
        best, secs, new = tune_task(task, profile, db, sparse_trials, progress=bar, unit=unit,
                                    **kwargs)
        bar.update(sparse_trials - new)
    dense = db.dense_times(profile, task.n, task.k, task.batch)
    if "ours" not in dense:
        if dense_fn is not None:
            cost = dense_fn(task)
        else:
            w = np.random.default_rng(0).standard_normal((task.n, task.k)).astype(np.float32)
            cost = time_layer(profile, w, task.batch, rpc=rpc)
        db.add_dense(profile, task.n, task.k, task.batch, "ours", cost, unit)
        new += 1
    bar.update(1)
    stays_dense = secs is None or secs >= db.dense_times(profile, task.n, task.k, task.batch)["ours"]
    if stays_dense and dense_trials and "meta_schedule" not in dense:
        from .dense_tuning import ms_work_dir, tune_dense

        bar.set_postfix_str(f"meta_schedule {task.n}x{task.k}")
        times = tune_dense(profile, task.batch, task.n, task.k, dense_trials, ms_work_dir(db_path))
        for kernel, seconds in times.items():
            db.add_dense(profile, task.n, task.k, task.batch, kernel, seconds)
        new += dense_trials
    if not stays_dense:
        kernel = KernelKind.SPARSE
    elif db.meta_schedule_wins(profile, task.n, task.k, task.batch):
        kernel = KernelKind.DENSE_META_SCHEDULE
    else:
        kernel = KernelKind.DENSE
    return TuneResult(name, (task.n, task.k), task.batch, best, secs,
                      db.dense_times(profile, task.n, task.k, task.batch), kernel, new, unit)


# --------------------------------------------------------------------------- train


@dataclass
class TrainResult:
    model: onnx.ModelProto  # the trained model
    history: list  # training.EpochLog per epoch
    data: object  # the Dataset trained on
    accuracy_before: float

    @property
    def accuracy_after(self) -> float | None:
        return self.history[-1].test_accuracy

    def rows(self) -> list[list]:
        return [[h.epoch, f"{h.loss:.4f}", f"{h.train_accuracy * 100:.2f}%",
                 "-" if h.test_accuracy is None else f"{h.test_accuracy * 100:.2f}%"] for h in self.history]


TRAIN_HEADERS = ["epoch", "loss", "train accuracy", "test accuracy"]


def train(model, data=None, *, epochs: int = 10, training: Training = Training(),
          on_data=None) -> TrainResult:
    """``tvm-scalpel train`` in one call: train ``model`` in TVM on ``data`` (a Dataset, a path,
    or None for the embedded MNIST sample). ``on_data(dataset)`` is called once the data is
    loaded and fits the model, before any training (the command line says so then)."""
    from .finetune import accuracy, fit_data, train as fit

    check_count(epochs, "epochs")
    model = _as_model(model)
    data = load_data(data)
    fit_data(model, data)
    if on_data is not None:
        on_data(data)
    before = accuracy(model, data)
    trained, history = fit(model, data, training.settings(epochs))
    return TrainResult(trained, history, data, before)
