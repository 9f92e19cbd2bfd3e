"""Training inside TVM: softmax cross-entropy, ``relax.transform.Gradient``, our own optimizers.

``Trainer`` takes an ONNX classifier, imports it to Relax with the weights as function inputs,
appends ``nll_loss(log_softmax(logits), labels)``, differentiates it with
``relax.transform.Gradient`` and compiles forward+backward once. The update step is ours
(``relax.training``'s optimizers crash on init in 0.27): SGD with momentum or Adam, in numpy.

Two kinds of masks:

* weight masks (fixed): zeros of a weight-pruned layer stay zero while training (the gradient
  is masked and the weight re-masked after each step), so fine-tuning never undoes pruning;
* node masks (trainable, Scalpel's mask layers): after every prunable FC / CONV layer the output
  is multiplied by ``alpha = [beta >= T]`` per neuron / feature map. ``alpha`` is an input of the
  compiled function, so autodiff gives dL/dalpha; the straight-through estimator uses it as
  dL/dbeta, and a penalty ``lambda * |beta|`` drives unimportant betas below T.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tqdm import tqdm
from tvm import relax

from .data import Dataset
from .errors import ScalpelError
from .passes.graph import (
    GraphIndex,
    GraphRewriter,
    RewritePlan,
    absorb_bias,
    emit_in_place_of,
    match_layer,
    op_name,
)
from .targets import resolve_target

log = logging.getLogger("tvm_scalpel.training")

@dataclass
class MaskLayer:
    """A node mask after a prunable layer: ``size`` neurons or feature maps."""

    name: str  # the ONNX weight initializer of the layer it follows
    size: int
    conv: bool
    beta: np.ndarray = field(repr=False, default=None)

    def alpha(self, threshold: float) -> np.ndarray:
        return (self.beta >= threshold).astype(np.float32)


@dataclass
class EpochLog:
    epoch: int
    loss: float
    train_accuracy: float
    test_accuracy: float | None
    open_nodes: dict[str, int] | None = None


class _Adam:
    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        for k, g in grads.items():
            m = self.m.setdefault(k, np.zeros_like(g))
            v = self.v.setdefault(k, np.zeros_like(g))
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            mh = m / (1 - self.b1**self.t)
            vh = v / (1 - self.b2**self.t)
            params[k] -= (self.lr * mh / (np.sqrt(vh) + self.eps)).astype(params[k].dtype)


class _Sgd:
    def __init__(self, lr: float, momentum: float = 0.9):
        self.lr, self.momentum = lr, momentum
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        for k, g in grads.items():
            v = self.v.setdefault(k, np.zeros_like(g))
            v *= self.momentum
            v += g
            params[k] -= (self.lr * v).astype(params[k].dtype)


def make_optimizer(name: str, lr: float):
    if name == "adam":
        return _Adam(lr)
    if name == "sgd":
        return _Sgd(lr)
    raise ScalpelError(f"unknown optimizer {name!r}: use adam or sgd")


class Trainer:
    """Trains an ONNX classifier with TVM-compiled forward and backward passes."""

    def __init__(self, model: onnx.ModelProto, node_masks: bool = False, target=None,
                 mask_threshold: float = 0.5, batch_size: int = 64, trainable: bool = True) -> None:
        from tvm.relax.frontend import detach_params
        from tvm.relax.frontend.onnx import from_onnx

        self.model = model
        self.profile = resolve_target(target)
        self.threshold = mask_threshold
        self.batch_size = batch_size
        try:
            # A fixed batch: Gradient fails on reshapes with a symbolic batch in TVM 0.27.
            mod = from_onnx(_with_batch(model, batch_size), keep_params_in_input=True)
        except Exception as err:
            lines = [s for s in str(err).strip().splitlines() if s.strip()]
            raise ScalpelError(f"TVM cannot import this model: {lines[-1] if lines else err}") from None
        mod, params = detach_params(mod)
        main = mod["main"]
        n_in = int(main.attrs["num_input"])
        if n_in != 1:
            raise ScalpelError(f"the model has {n_in} inputs; training takes one (the images)")
        self.input_name = model.graph.input[0].name
        self.input_shape = tuple(int(d) if isinstance(d, int) else -1 for d in
                                 [_dim(v) for v in main.params[0].ty.shape.values])
        self.param_names = [p.name for p in main.params[n_in:]]
        self.params = {n: a.numpy().copy() for n, a in zip(self.param_names, params["main"])}
        out_ty = main.body.body.ty if isinstance(main.body, relax.SeqExpr) else None
        if not isinstance(out_ty, relax.TensorType) or out_ty.ndim != 2:
            raise ScalpelError("the model's output is not class scores of shape [batch, classes]")
        self.num_classes = _dim(out_ty.shape.values[1])
        self.weight_masks: dict[str, np.ndarray] = {}
        self.masks: list[MaskLayer] = []
        self.frozen: set[str] = set()
        self._build(mod, main, n_in, node_masks, trainable)

    # -- graph construction --------------------------------------------------------------

    def _build(self, mod: tvm.IRModule, main: relax.Function, n_in: int, node_masks: bool,
               trainable: bool) -> None:
        index = GraphIndex(main)
        params = set(main.params[n_in:])

        # batch-norm statistics are constants of the inference form: never updated by SGD
        self.frozen = {a.name for b in index.bindings if op_name(b.value) == "relax.nn.batch_norm"
                       for a in b.value.args[3:5] if a in params}
        # the layers: a matmul / conv2d whose weight is a parameter (behind permute_dims or not)
        layers = [m for b in index.bindings
                  if (m := match_layer(index, b.var, is_weight=lambda leaf, kind: leaf in params,
                                       epilogue=False)) is not None]
        plan = RewritePlan(drop_dead=False)
        alphas = []
        if node_masks:
            for layer in layers[:-1]:  # the last layer's outputs are the class scores
                conv = layer.kind == "conv"
                absorb_bias(index, layer, lambda operand: operand)  # the mask comes after the bias
                size = _dim(layer.op.ty.shape.values[1 if conv else -1])
                shape = (size, 1, 1) if conv else (size,)
                alpha = relax.Var(f"mask_{len(alphas)}", relax.TensorType(shape, "float32"))
                plan.bindings[layer.output] = _masked(index, layer.output, alpha)
                alphas.append(alpha)
                self.masks.append(MaskLayer(layer.weight.name, size, conv, np.ones(size, np.float32)))
        masked = GraphRewriter(mod).rewrite_function(main, plan)
        # its own copy of the vars: a Relax var may be defined by one function only
        forward = relax.utils.copy_with_new_vars(
            relax.Function(list(main.params) + alphas, masked.body))

        batch = main.params[0].ty.shape.values[0]
        labels = relax.Var("labels", relax.TensorType((batch,), "int64"))
        logits = masked.body.body
        final = GraphIndex(masked).values.get(logits)
        if op_name(final) == "relax.nn.softmax":  # a model that ends in Softmax: train its logits
            logits = final.args[0]
        bb = relax.BlockBuilder()
        inputs = list(main.params) + alphas + [labels]
        with bb.function("train_loss", inputs):
            with bb.dataflow():
                for blk in masked.body.blocks:
                    for b in blk.bindings:
                        bb.emit_normalized(b)
                logp = bb.emit(relax.op.nn.log_softmax(logits))
                loss = bb.emit_output(relax.op.nn.nll_loss(logp, labels))
            bb.emit_func_output(loss)
        train_mod = bb.get()
        train_mod["forward"] = forward.with_attr("global_symbol", "forward")
        require = [p for p in train_mod["train_loss"].params if p.name not in (main.params[0].name, "labels")]
        self.grad_names = [p.name for p in require]
        if trainable:
            # batch_norm has no gradient rule: in its inference form it is element-wise ops
            train_mod = relax.transform.DecomposeOpsForInference()(train_mod)
            train_mod = relax.transform.Gradient("train_loss", require_grads=require)(train_mod)
        else:  # evaluation only: no backward pass to compile
            train_mod = tvm.IRModule({"forward": train_mod["forward"]})
        exe = tvm.compile(train_mod, target=self.profile.target)
        self.vm = relax.VirtualMachine(exe, tvm.cpu())

    # -- running -----------------------------------------------------------------------

    def _tensors(self, x: np.ndarray) -> list:
        dev = tvm.cpu()
        args = [tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), dev)]
        args += [tvm.runtime.tensor(self.params[n], dev) for n in self.param_names]
        args += [tvm.runtime.tensor(m.alpha(self.threshold).reshape(-1, *([1, 1] if m.conv else [])), dev)
                 for m in self.masks]
        return args

    def check_data(self, data: Dataset) -> Dataset:
        shape = tuple(d for d in self.input_shape[1:])
        data = data.reshaped(shape)
        for y in (data.y_train, data.y_test):
            if y.ndim != 1:
                raise ScalpelError(f"{data.name}: labels must be a vector, got shape {y.shape}")
            if y.size and y.min() < 0:
                raise ScalpelError(f"{data.name}: negative label {int(y.min())}")
        if data.num_classes > self.num_classes:
            raise ScalpelError(f"{data.name}: label {data.num_classes - 1} is out of range for a "
                               f"model with {self.num_classes} class scores")
        return data

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class scores, run in batches of ``batch_size`` (the last one zero-padded)."""
        b = self.batch_size
        if len(x) == 0:
            return np.zeros((0, self.num_classes), np.float32)
        x = np.asarray(x, dtype=np.float32)
        out = []
        for i in range(0, len(x), b):
            chunk = x[i:i + b]
            if len(chunk) < b:
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out.append(self.vm["forward"](*self._tensors(chunk)).numpy()[: min(b, len(x) - i)])
        return np.concatenate(out)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x).argmax(axis=1) == y).mean())

    def fix_weight_zeros(self) -> None:
        """Keep every weight that is zero now at zero from here on (pruned weights)."""
        for name, w in self.params.items():
            if w.ndim >= 2 and np.any(w == 0):
                self.weight_masks[name] = (w != 0).astype(w.dtype)

    def fit(self, data: Dataset, epochs: int, lr: float = 1e-3, optimizer: str = "adam",
            seed: int = 0, mask_penalty: float = 0.0, mask_lr: float = 0.01,
            progress: bool = True, desc: str = "train") -> list[EpochLog]:
        """Minibatch training; with node masks, betas follow dL/dalpha (straight-through) plus
        ``mask_penalty`` per step pulling them towards zero."""
        data = self.check_data(data)
        opt = make_optimizer(optimizer, lr)
        rng = np.random.default_rng(seed)
        history = []
        n = len(data.x_train)
        batch_size = self.batch_size
        if n < batch_size:
            raise ScalpelError(f"{data.name}: {n} training samples, fewer than one batch of {batch_size}")
        steps = n // batch_size
        # disable=None: no bar when the output is not a terminal (CI logs, pipes)
        bar = tqdm(total=epochs * steps, desc=desc, disable=None if progress else True, unit="step",
                   leave=False)
        for epoch in range(epochs):
            order = rng.permutation(n)
            losses = []
            for s in range(steps):
                idx = order[s * batch_size:(s + 1) * batch_size]
                x, y = data.x_train[idx], data.y_train[idx]
                args = self._tensors(x) + [tvm.runtime.tensor(y.astype(np.int64))]
                loss, grads = self.vm["train_loss_adjoint"](*args)
                grads = [g.numpy() for g in grads]
                losses.append(float(loss.numpy()))
                g_params = {n: g for n, g in zip(self.grad_names[: len(self.param_names)], grads)
                            if n not in self.frozen}
                for name, mask in self.weight_masks.items():
                    g_params[name] *= mask
                opt.step(self.params, g_params)
                for name, mask in self.weight_masks.items():
                    self.params[name] *= mask
                for m, g in zip(self.masks, grads[len(self.param_names):]):
                    # straight-through: dL/dbeta := dL/dalpha; L1 penalty drives beta down
                    m.beta -= mask_lr * (g.reshape(-1) + mask_penalty * np.sign(m.beta))
                    np.clip(m.beta, 0.0, 1.0, out=m.beta)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            train_acc = self.accuracy(data.x_train, data.y_train)
            test_acc = self.accuracy(data.x_test, data.y_test) if len(data.x_test) else None
            history.append(EpochLog(epoch + 1, float(np.mean(losses)), train_acc, test_acc,
                                    {m.name: int(m.alpha(self.threshold).sum()) for m in self.masks} or None))
            log.info("epoch %d: loss %.4f, train %.4f, test %s", epoch + 1, history[-1].loss,
                     train_acc, f"{test_acc:.4f}" if test_acc is not None else "-")
            if not math.isfinite(history[-1].loss):
                raise ScalpelError("training diverged (loss is not finite): lower the learning rate")
        bar.close()
        return history

    # -- results -----------------------------------------------------------------------

    def node_masks(self) -> dict[str, np.ndarray]:
        """The current 0/1 node masks by layer weight name."""
        return {m.name: m.alpha(self.threshold) for m in self.masks}

    def export(self) -> onnx.ModelProto:
        """The input ONNX model with the trained weights (initializers matched by name)."""
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        by_name = {init.name: init for init in out.graph.initializer}
        for name, value in self.params.items():
            if name in by_name:
                by_name[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            else:
                log.warning("trained parameter %s has no initializer of that name", name)
        return out


def _with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of ``model`` whose first input and outputs have batch dimension ``batch``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in list(out.graph.input[:1]) + list(out.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_value = batch
    del out.graph.value_info[:]
    return out


def _dim(value) -> int:
    return int(value.value) if hasattr(value, "value") else -1


def _masked(index: GraphIndex, var: relax.Var, alpha: relax.Var):
    """The binding of ``var`` as it was, then ``var_masked = var * alpha``, which its readers
    read instead."""

    def make(bb: relax.BlockBuilder, visit) -> relax.Var:
        kept = emit_in_place_of(bb, var, visit(index.values[var]))
        return bb.emit(relax.op.multiply(kept, alpha), name_hint=f"{var.name}_masked")

    return make
