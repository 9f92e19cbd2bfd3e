"""Accuracy-aware flows: train, prune then fine-tune, and search the largest pruning that keeps
test accuracy within a budget. All training runs in TVM (``training.Trainer``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx

from .api import prune_onnx
from .data import Dataset
from .checks import check_rate
from .errors import ScalpelError
from .training import EpochLog, Trainer

log = logging.getLogger("tvm_scalpel")


@dataclass
class TrainSettings:
    epochs: int = 10
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 64
    seed: int = 0
    progress: bool = True


def input_sample_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims[1:])
    if not shape or any(d <= 0 for d in shape):
        raise ScalpelError("the model's input needs fixed sizes beyond the batch dimension")
    return shape


def fit_data(model: onnx.ModelProto, data: Dataset) -> Dataset:
    """``data`` with samples shaped as the model's input (a clear error when they do not fit)."""
    return data.reshaped(input_sample_shape(model))


def train(model: onnx.ModelProto, data: Dataset, settings: TrainSettings,
          keep_zeros: bool = False, desc: str = "train") -> tuple[onnx.ModelProto, list[EpochLog]]:
    """Train ``model``; with ``keep_zeros`` its zero weights (pruned) stay zero."""
    trainer = Trainer(model, batch_size=settings.batch_size)
    data = trainer.check_data(fit_data(model, data))
    if keep_zeros:
        trainer.fix_weight_zeros()
    history = trainer.fit(data, settings.epochs, settings.lr, settings.optimizer,
                          seed=settings.seed, progress=settings.progress, desc=desc)
    return trainer.export(), history


def accuracy(model: onnx.ModelProto, data: Dataset, batch_size: int = 100) -> float:
    """Test accuracy, computed with TVM (the trainer's forward function)."""
    trainer = Trainer(model, batch_size=batch_size, trainable=False)
    data = trainer.check_data(fit_data(model, data))
    return trainer.accuracy(data.x_test, data.y_test)


@dataclass
class PruneStep:
    rate: float
    accuracy_before_fine_tune: float
    accuracy: float


@dataclass
class WeightPruneResult:
    model: onnx.ModelProto
    rate: float
    accuracy: float
    steps: list[PruneStep] = field(default_factory=list)


def prune_and_fine_tune(model: onnx.ModelProto, data: Dataset, rate: float, group_width: int,
                        settings: TrainSettings, target="x86", importance: str = "rms",
                        schedule: tuple[float, ...] = (0.5, 0.75),
                        last_layer_rate: float | None = None) -> WeightPruneResult:
    """Iterative pruning (Han et al.): prune to each rate of ``schedule`` below ``rate`` and then
    to ``rate``, fine-tuning with the zeros kept after each step."""
    steps = []
    current = model
    for r in [s for s in schedule if s < rate] + [rate]:
        current, step = _prune_step(current, data, r, group_width, settings, target, importance,
                                    last_layer_rate)
        steps.append(step)
    return WeightPruneResult(current, rate, steps[-1].accuracy, steps)


def _prune_step(model: onnx.ModelProto, data: Dataset, rate: float, group_width: int,
                settings: TrainSettings, target, importance: str,
                last_layer_rate: float | None) -> tuple[onnx.ModelProto, PruneStep]:
    """Prune ``model`` to ``rate`` and fine-tune it with the zeros kept."""
    last = None if last_layer_rate is None else min(rate, last_layer_rate)
    pruned = prune_onnx(model, rate, target, group_width, importance, last).model
    before = accuracy(pruned, data)
    tuned, _ = train(pruned, data, settings, keep_zeros=True, desc=f"fine-tune {rate:.2f}")
    step = PruneStep(rate, before, accuracy(tuned, data))
    log.info("rate %.3f: accuracy %.4f before fine-tuning, %.4f after", rate, before, step.accuracy)
    return tuned, step


def search_max_rate(model: onnx.ModelProto, data: Dataset, max_drop_points: float,
                    group_width: int, settings: TrainSettings, target="x86",
                    importance: str = "rms",
                    rates: tuple[float, ...] = (0.5, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98),
                    last_layer_rate: float | None = None,
                    ) -> tuple[WeightPruneResult | None, float, list[PruneStep]]:
    """The largest rate in ``rates`` whose fine-tuned accuracy stays within ``max_drop_points``
    percentage points of the unpruned model. Rates are tried in increasing order, each step
    starting from the previous fine-tuned model, and the search stops at the first failure."""
    if max_drop_points < 0:
        raise ScalpelError(f"the accuracy drop must be >= 0 points, got {max_drop_points}")
    base = accuracy(model, data)
    best = None
    tried = []
    current = model
    for r in rates:
        tuned, step = _prune_step(current, data, r, group_width, settings, target, importance,
                                  last_layer_rate)
        tried.append(step)
        if (base - step.accuracy) * 100 > max_drop_points:
            break
        best = WeightPruneResult(tuned, r, step.accuracy, list(tried))
        current = tuned
    return best, base, tried


@dataclass
class NodePruneResult:
    model: onnx.ModelProto  # smaller dense model, masks gone
    nodes_before: dict[str, int]
    nodes_after: dict[str, int]
    accuracy_before_fine_tune: float | None
    accuracy: float | None
    layers: list = field(default_factory=list)  # node_pruning.NodeRemoval per layer (node, reason)

    @property
    def removed_fraction(self) -> float:
        before = sum(self.nodes_before.values())
        return 1.0 - sum(self.nodes_after.values()) / before if before else 0.0


def _keep_one_node(masks: dict[str, np.ndarray], betas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``masks`` with every all-zero mask opened on its node of largest beta: a layer without
    nodes would leave the network's output constant (``RemoveMaskedNodes`` would keep one
    channel multiplied by 0)."""
    out = {}
    for name, mask in masks.items():
        mask = np.asarray(mask, dtype=np.float32).copy()
        if mask.size and not mask.any():
            keep = int(np.argmax(np.asarray(betas[name]).reshape(-1)))
            mask.reshape(-1)[keep] = 1.0
            log.warning("layer %s: every node's mask closed; it keeps node %d (largest beta) so "
                        "that its output still depends on its input", name, keep)
        out[name] = mask
    return out


def node_prune(model: onnx.ModelProto, rate: float | Mapping[str, float] | None = None,
               data: Dataset | None = None,
               settings: TrainSettings | None = None, mask_epochs: int = 3,
               mask_penalty: float = 0.05, criterion: str = "masks", block: int | None = None,
               strict: bool = False) -> NodePruneResult:
    """Scalpel's node pruning: remove neurons / feature maps, then fine-tune.

    With data (``criterion="masks"``): mask layers are trained for ``mask_epochs`` with an L1
    penalty on their betas (straight-through gradients). With ``rate``, the ``rate`` fraction of
    nodes with the lowest betas in each layer is removed; without, every node whose mask closed
    (beta < T). Without data (``criterion="l1"`` or ``"l2"``): the ``rate`` fraction of nodes
    with the smallest weight norm is removed. Then the nodes are removed for good
    (``node_pruning.prune_coupled``) and, with data and ``settings.epochs``, the model is fine-tuned.
    A mapping of rates (by layer weight name) prunes only the layers it names. Every layer
    keeps at least one node: a rate that would remove them all is capped, and a layer whose
    trained masks all closed keeps its node of largest beta (with a warning either way).
    Channels tied together (a residual add, a concat, a depthwise convolution) are chosen and
    removed together (``node_pruning.prune_coupled``); ``block`` rounds kept counts to the
    target's preferred width; a layer that cannot be pruned stays whole with a warning
    (``strict``: an error).
    """
    from .node_pruning import out_channels, prune_coupled

    if isinstance(rate, (int, float)):
        check_rate(rate, "node pruning rate")
    if criterion == "masks":
        if data is None:
            raise ScalpelError("node pruning with trained masks needs data (or use an L1/L2 criterion)")
        settings = settings or TrainSettings()
        trainer = Trainer(model, node_masks=True, batch_size=settings.batch_size)
        fitted = trainer.check_data(fit_data(model, data))
        trainer.fit(fitted, mask_epochs, settings.lr, settings.optimizer, seed=settings.seed,
                    mask_penalty=mask_penalty, progress=settings.progress, desc="mask layers")
        trained = trainer.export()
        betas = {m.name: np.asarray(m.beta, dtype=np.float64).reshape(-1) for m in trainer.masks}
        if rate is not None:
            slim, removals = prune_coupled(trained, rate, importance=betas, block=block, strict=strict)
        else:
            masks = _keep_one_node(trainer.node_masks(), betas)
            slim, removals = prune_coupled(trained, importance=betas, masks=masks, block=block,
                                           strict=strict)
    elif criterion in ("l1", "l2"):
        if rate is None:
            raise ScalpelError("node pruning by weight norm needs a rate")
        slim, removals = prune_coupled(model, rate, criterion, block=block, strict=strict)
    else:
        raise ScalpelError(f"unknown node criterion {criterion!r}: use masks, l1 or l2")
    before_ft = accuracy(slim, data) if data is not None else None
    final = before_ft
    if data is not None and settings is not None and settings.epochs > 0:
        slim, _ = train(slim, data, settings, desc="fine-tune")
        final = accuracy(slim, data)
    written = out_channels(slim)  # the counts of the model written, not of the plan
    return NodePruneResult(slim, {r.name: r.nodes_before for r in removals},
                           {r.name: written.get(r.name, r.nodes_after) for r in removals},
                           before_ft, final, removals)
