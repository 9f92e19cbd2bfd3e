"""Training in TVM (``training.Trainer``) and node pruning with data (``finetune.node_prune``).

Gradients are checked against hand-written float64 backward passes, optimizer steps against a
float64 re-implementation of SGD with momentum / Adam, and every trained or pruned model against
onnxruntime running the ONNX file the library wrote.
"""

import numpy as np
import onnx
import pytest
import tvm
from helpers import (
    make_model,
    mlp_loss_grads_ref,
    mlp_ref,
    onnx_dense_layers,
    ort_accuracy,
    ort_run,
    rel_err,
    separable_data,
    softmax_xent_ref,
    xent_grad_ref,
)
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from tvm_scalpel import models
from tvm_scalpel.data import Dataset
from tvm_scalpel.errors import ScalpelError
from tvm_scalpel.finetune import TrainSettings, node_prune
from tvm_scalpel.training import Trainer

SIZES = [12, 9, 7, 4]
THRESHOLD = 0.5  # Trainer's default mask threshold


def adjoint(trainer: Trainer, x: np.ndarray, y: np.ndarray):
    """(loss, {param or mask name: gradient}) from the compiled forward+backward function."""
    args = trainer._tensors(x) + [tvm.runtime.tensor(y.astype(np.int64))]
    loss, grads = trainer.vm["train_loss_adjoint"](*args)
    return float(loss.numpy()), dict(zip(trainer.grad_names, [g.numpy() for g in grads]))


def set_alphas(trainer: Trainer, alphas: list[np.ndarray]) -> None:
    """Give the trainer's mask layers betas on either side of the threshold."""
    assert len(trainer.masks) == len(alphas)
    for mask, alpha in zip(trainer.masks, alphas):
        mask.beta = np.where(alpha > 0, 0.75, 0.25).astype(np.float32)


def random_alphas(rng, sizes: list[int]) -> list[np.ndarray]:
    """0/1 masks with at least two closed and two open nodes per layer."""
    out = []
    for n in sizes:
        a = np.ones(n)
        a[rng.choice(n, size=max(2, n // 3), replace=False)] = 0.0
        assert 2 <= a.sum() < n
        out.append(a)
    return out


def layers_of(model: onnx.ModelProto, params: dict | None = None) -> list[dict]:
    """The dense layers of a ``models.mlp`` model, weights ``[N, K]``; with ``params`` (trainer
    parameters by initializer name) those values instead of the file's."""
    layers = onnx_dense_layers(model)
    for i, layer in enumerate(layers):
        layer["bias_name"] = f"fc{i + 1}.bias"
        if params is not None:
            w = params[layer["name"]]
            layer["w"] = w if layer["stored_nk"] else w.T
            layer["bias"] = params[layer["bias_name"]]
    return layers


def reset(trainer: Trainer, params: dict) -> None:
    trainer.params = {k: v.copy() for k, v in params.items()}
    trainer.weight_masks = {}


# --------------------------------------------------------------------------- gradients: MLP


@pytest.mark.parametrize("node_masks", [False, True], ids=["plain", "masks"])
@pytest.mark.parametrize("layout", ["gemm", "matmul"])
def test_mlp_gradients_match_numpy(rng, layout, node_masks):
    model = models.mlp(SIZES, seed=int(rng.integers(1 << 30)), layout=layout)
    batch = 6
    trainer = Trainer(model, node_masks=node_masks, batch_size=batch)
    assert trainer.num_classes == SIZES[-1]
    x = rng.standard_normal((batch, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], batch)
    alphas = None
    if node_masks:
        assert [(m.name, m.size, m.conv) for m in trainer.masks] == \
            [("fc1.weight", SIZES[1], False), ("fc2.weight", SIZES[2], False)]
        alphas = random_alphas(rng, SIZES[1:-1])
        set_alphas(trainer, alphas)
    else:
        assert trainer.masks == []

    loss, grads = adjoint(trainer, x, y)
    layers = layers_of(model)
    ref_loss, ref_grads, ref_dalpha = mlp_loss_grads_ref(layers, x, y, alphas)
    assert abs(loss - ref_loss) / abs(ref_loss) < 1e-5
    for layer, (dw, db) in zip(layers, ref_grads):
        g = grads[layer["name"]]
        assert rel_err(g if layer["stored_nk"] else g.T, dw) < 1e-4, layer["name"]
        assert rel_err(grads[layer["bias_name"]], db) < 1e-4, layer["bias_name"]
    if node_masks:
        for i, (alpha, dalpha) in enumerate(zip(alphas, ref_dalpha)):
            got = grads[f"mask_{i}"]
            assert got.shape == alpha.shape
            assert rel_err(got, dalpha) < 1e-4
            # a closed node passes no gradient to its weights, but its mask still gets one
            closed = alpha == 0
            w = grads[layers[i]["name"]]
            assert np.all((w if layers[i]["stored_nk"] else w.T)[closed] == 0)
            assert np.all(grads[layers[i]["bias_name"]][closed] == 0)
            assert np.all(got[closed] != 0)
        # the forward function applies the same masks: its logits give the same loss
        logits = trainer.vm["forward"](*trainer._tensors(x)).numpy()
        assert abs(softmax_xent_ref(logits, y) - ref_loss) / abs(ref_loss) < 1e-5


# --------------------------------------------------------------------------- gradients: conv net

CONV_IN = (1, 8, 8)
CONV_CLASSES = 5


def tiny_convnet(seed: int) -> onnx.ModelProto:
    """conv 3@3x3 -> relu -> maxpool 2 -> conv 4@2x2 -> relu -> flatten -> fc 5 on 1x8x8."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: a.astype(np.float32)
    inits = [
        numpy_helper.from_array(f32(rng.standard_normal((3, 1, 3, 3)) * 0.6), "conv1.weight"),
        numpy_helper.from_array(f32(rng.standard_normal(3) * 0.1), "conv1.bias"),
        numpy_helper.from_array(f32(rng.standard_normal((4, 3, 2, 2)) * 0.5), "conv2.weight"),
        numpy_helper.from_array(f32(rng.standard_normal(4) * 0.1), "conv2.bias"),
        numpy_helper.from_array(f32(rng.standard_normal((CONV_CLASSES, 16)) * 0.4), "fc.weight"),
        numpy_helper.from_array(f32(rng.standard_normal(CONV_CLASSES) * 0.1), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], kernel_shape=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    return make_model(nodes, inits, [("input", ["N", *CONV_IN])], [("logits", ["N", CONV_CLASSES])])


def conv_ref(x, w, b):
    win = sliding_window_view(x, w.shape[2:], axis=(2, 3))  # n c h w p q
    return np.einsum("nchwpq,ocpq->nohw", win, w) + b[None, :, None, None]


def convnet_loss_grads_ref(p: dict, x: np.ndarray, y: np.ndarray, alpha1, alpha2):
    """float64 forward/backward of ``tiny_convnet`` with node masks after each conv's bias."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    a1, a2 = (np.asarray(a, np.float64)[None, :, None, None] for a in (alpha1, alpha2))
    x = np.asarray(x, np.float64)
    z1 = conv_ref(x, p["conv1.weight"], p["conv1.bias"])
    m1 = z1 * a1
    r1 = np.maximum(m1, 0)
    n, c, h, w = r1.shape
    windows = r1.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    p1 = windows.max(axis=-1)
    z2 = conv_ref(p1, p["conv2.weight"], p["conv2.bias"])
    m2 = z2 * a2
    r2 = np.maximum(m2, 0)
    flat = r2.reshape(len(x), -1)
    logits = flat @ p["fc.weight"].T + p["fc.bias"]
    g = {}
    d = xent_grad_ref(logits, y)
    g["fc.weight"], g["fc.bias"] = d.T @ flat, d.sum(0)
    dm2 = (d @ p["fc.weight"]).reshape(r2.shape) * (m2 >= 0)
    g["mask_1"] = (dm2 * z2).sum(axis=(0, 2, 3))
    dz2 = dm2 * a2
    g["conv2.bias"] = dz2.sum(axis=(0, 2, 3))
    g["conv2.weight"] = np.einsum("nchwpq,nohw->ocpq", sliding_window_view(p1, (2, 2), axis=(2, 3)), dz2)
    dp1 = np.zeros_like(p1)
    for i in range(2):
        for j in range(2):
            dp1[:, :, i:i + dz2.shape[2], j:j + dz2.shape[3]] += np.einsum(
                "nohw,oc->nchw", dz2, p["conv2.weight"][:, :, i, j])
    # max-pool backward: to the first maximum of each window
    route = np.eye(4)[windows.argmax(axis=-1)] * dp1[..., None]
    dr1 = route.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)
    dm1 = dr1 * (m1 >= 0)
    g["mask_0"] = (dm1 * z1).sum(axis=(0, 2, 3))
    dz1 = dm1 * a1
    g["conv1.bias"] = dz1.sum(axis=(0, 2, 3))
    g["conv1.weight"] = np.einsum("nchwpq,nohw->ocpq", sliding_window_view(x, (3, 3), axis=(2, 3)), dz1)
    return softmax_xent_ref(logits, y), logits, g


def test_convnet_loss_matches_onnxruntime(rng):
    model = tiny_convnet(int(rng.integers(1 << 30)))
    batch = 4
    trainer = Trainer(model, batch_size=batch)
    assert trainer.input_shape == (batch, *CONV_IN) and trainer.num_classes == CONV_CLASSES
    x = rng.standard_normal((batch, *CONV_IN)).astype(np.float32)
    y = rng.integers(0, CONV_CLASSES, batch)
    loss, grads = adjoint(trainer, x, y)
    ref = softmax_xent_ref(ort_run(model, x), y)
    assert abs(loss - ref) / abs(ref) < 1e-5
    assert set(grads) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias"}
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads.values())


def test_convnet_gradients_with_closed_feature_maps(rng):
    model = tiny_convnet(int(rng.integers(1 << 30)))
    batch = 4
    trainer = Trainer(model, node_masks=True, batch_size=batch)
    assert [(m.name, m.size, m.conv) for m in trainer.masks] == \
        [("conv1.weight", 3, True), ("conv2.weight", 4, True)]
    x = rng.standard_normal((batch, *CONV_IN)).astype(np.float32)
    y = rng.integers(0, CONV_CLASSES, batch)
    params = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    # the reference itself agrees with onnxruntime when every mask is open
    _, logits, _ = convnet_loss_grads_ref(params, x, y, np.ones(3), np.ones(4))
    assert rel_err(logits, ort_run(model, x)) < 1e-5

    alpha1, alpha2 = np.array([1.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0, 0.0])
    set_alphas(trainer, [alpha1, alpha2])
    loss, grads = adjoint(trainer, x, y)
    ref_loss, _, ref = convnet_loss_grads_ref(params, x, y, alpha1, alpha2)
    assert abs(loss - ref_loss) / abs(ref_loss) < 1e-5
    for name in ["fc.weight", "fc.bias", "conv2.weight", "conv2.bias", "conv1.weight", "conv1.bias", "mask_1"]:
        assert rel_err(grads[name].reshape(ref[name].shape), ref[name]) < 1e-4, name
    assert np.all(grads["conv1.weight"][1] == 0) and np.all(grads["conv2.weight"][[0, 3]] == 0)
    # closed conv1 maps hit ties in the max-pool windows: only the open ones are well defined
    open1 = alpha1 > 0
    assert rel_err(grads["mask_0"].reshape(-1)[open1], ref["mask_0"][open1]) < 1e-4


# --------------------------------------------------------------------------- optimizer steps


def sgd_ref(params, grads_at, lr, steps, momentum=0.9):
    p = {k: v.astype(np.float64) for k, v in params.items()}
    vel = {k: np.zeros_like(v) for k, v in p.items()}
    for _ in range(steps):
        g = grads_at(p)
        for k in p:
            vel[k] = momentum * vel[k] + g[k]
            p[k] = p[k] - lr * vel[k]
    return p


def adam_ref(params, grads_at, lr, steps, b1=0.9, b2=0.999, eps=1e-8):
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t in range(1, steps + 1):
        g = grads_at(p)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            p[k] = p[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
    return p


def ref_grads_fn(model, x, y, alphas=None):
    """A function of the parameters (by initializer name) giving the reference gradients."""
    def grads_at(p):
        layers = layers_of(model, p)
        _, grads, _ = mlp_loss_grads_ref(layers, x, y, alphas)
        out = {}
        for layer, (dw, db) in zip(layers, grads):
            out[layer["name"]] = dw if layer["stored_nk"] else dw.T
            out[layer["bias_name"]] = db
        return out
    return grads_at


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adam", 0.01)])
def test_full_batch_steps_match_reference_optimizer(rng, optimizer, lr):
    """With one batch per epoch the order of the samples does not matter: three epochs are three
    steps that a float64 SGD-with-momentum / Adam on the reference gradients reproduces (float32
    rounding leaves a few 1e-6 of the update; a wrong moment or bias correction shows as 1e-3)."""
    model = models.mlp(SIZES, seed=int(rng.integers(1 << 30)), layout="matmul")
    batch = 16
    trainer = Trainer(model, batch_size=batch)
    x, y = separable_data(rng, batch + 8, SIZES[0], SIZES[-1])
    data = Dataset(x[:batch], y[:batch], x[batch:], y[batch:], "synthetic")
    start = {k: v.copy() for k, v in trainer.params.items()}
    history = trainer.fit(data, epochs=3, lr=lr, optimizer=optimizer, progress=False)

    grads_at = ref_grads_fn(model, x[:batch], y[:batch])
    ref = (sgd_ref if optimizer == "sgd" else adam_ref)(start, grads_at, lr, steps=3)
    for name, value in trainer.params.items():
        assert rel_err(value - start[name], ref[name] - start[name]) < 5e-5, name
    assert abs(history[0].loss - mlp_loss_grads_ref(layers_of(model), x[:batch], y[:batch])[0]) < 1e-5
    assert [h.epoch for h in history] == [1, 2, 3]
    exported = trainer.export()
    assert history[-1].train_accuracy == ort_accuracy(exported, x[:batch], y[:batch])
    assert history[-1].test_accuracy == ort_accuracy(exported, x[batch:], y[batch:])
    assert history[-1].open_nodes is None


def test_mask_step_is_straight_through_with_penalty(rng):
    """One full-batch step with node masks: the weights follow Adam on the masked network's
    gradients; each beta moves by ``-mask_lr * (dL/dalpha + penalty * sign(beta))``, clipped."""
    model = models.mlp(SIZES, seed=int(rng.integers(1 << 30)), layout="gemm")
    batch = 16
    trainer = Trainer(model, node_masks=True, batch_size=batch)
    x, y = separable_data(rng, batch, SIZES[0], SIZES[-1])
    data = Dataset(x, y, x[:0], y[:0], "synthetic")
    betas = [rng.choice([0.02, 0.3, 0.45, 0.55, 0.7, 1.0], size=n).astype(np.float32) for n in SIZES[1:-1]]
    betas[0][:2] = [0.3, 0.7]  # at least one closed and one open node
    betas[1][:2] = [0.3, 0.7]
    for mask, beta in zip(trainer.masks, betas):
        mask.beta = beta.copy()
    alphas = [(b >= THRESHOLD).astype(np.float64) for b in betas]
    start = {k: v.copy() for k, v in trainer.params.items()}
    lr, mask_lr, penalty = 0.01, 0.2, 0.3
    history = trainer.fit(data, epochs=1, lr=lr, optimizer="adam", mask_penalty=penalty,
                          mask_lr=mask_lr, progress=False)

    ref = adam_ref(start, ref_grads_fn(model, x, y, alphas), lr, steps=1)
    for name, value in trainer.params.items():
        assert rel_err(value - start[name], ref[name] - start[name]) < 5e-5, name
    _, _, dalphas = mlp_loss_grads_ref(layers_of(model), x, y, alphas)
    for mask, beta, dalpha in zip(trainer.masks, betas, dalphas):
        expected = np.clip(beta - mask_lr * (dalpha + penalty * np.sign(beta)), 0.0, 1.0)
        assert np.abs(mask.beta - expected).max() < 1e-5
        assert np.any(np.abs(mask.beta - beta) > 1e-3)
    assert history[0].test_accuracy is None
    assert history[0].open_nodes == {m.name: int((m.beta >= THRESHOLD).sum()) for m in trainer.masks}
    masks = trainer.node_masks()
    assert sorted(masks) == ["fc1.weight", "fc2.weight"]
    for m in trainer.masks:
        assert np.array_equal(masks[m.name], (m.beta >= THRESHOLD).astype(np.float32))


# --------------------------------------------------------------------------- training


TRAIN_SIZES = [12, 16, 8, 4]


@pytest.fixture(scope="module")
def task():
    """A separable 4-class problem and one compiled trainer (tests reset its parameters)."""
    rng = np.random.default_rng(20240611)
    x, y = separable_data(rng, 384, TRAIN_SIZES[0], TRAIN_SIZES[-1])
    data = Dataset(x[:256], y[:256], x[256:], y[256:], "synthetic")
    model = models.mlp(TRAIN_SIZES, seed=5, layout="gemm")
    trainer = Trainer(model, batch_size=32)
    return {"data": data, "model": model, "trainer": trainer,
            "start": {k: v.copy() for k, v in trainer.params.items()}}


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.01), ("sgd", 0.02)])
def test_training_learns(task, optimizer, lr):
    trainer, data, model = task["trainer"], task["data"], task["model"]
    reset(trainer, task["start"])
    loss_before = softmax_xent_ref(ort_run(model, data.x_train), data.y_train)
    acc_before = ort_accuracy(model, data.x_test, data.y_test)
    history = trainer.fit(data, epochs=4, lr=lr, optimizer=optimizer, seed=1, progress=False)
    trained = trainer.export()
    loss_after = softmax_xent_ref(ort_run(trained, data.x_train), data.y_train)
    acc_after = ort_accuracy(trained, data.x_test, data.y_test)
    assert len(history) == 4 and history[-1].loss < history[0].loss
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert acc_after >= 0.9 and acc_after > acc_before, (acc_before, acc_after)
    assert history[-1].test_accuracy == acc_after
    assert history[-1].train_accuracy == ort_accuracy(trained, data.x_train, data.y_train)


def test_fit_is_reproducible_with_a_seed(task):
    trainer, data = task["trainer"], task["data"]
    runs = []
    for seed in (3, 3, 4):
        reset(trainer, task["start"])
        trainer.fit(data, epochs=1, lr=0.01, seed=seed, progress=False)
        runs.append(trainer.params["fc1.weight"].copy())
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])  # another shuffle, other steps


def zeroed_model(rng, fraction: float = 0.5) -> tuple[onnx.ModelProto, dict]:
    """``models.mlp`` with ``fraction`` of every weight matrix set to zero (at random)."""
    model = models.mlp(TRAIN_SIZES, seed=int(rng.integers(1 << 30)), layout="gemm")
    zeros = {}
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init).copy()
        if w.ndim == 2:
            zero = rng.random(w.shape) < fraction
            w[zero] = 0.0
            zeros[init.name] = zero
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    return model, zeros


def test_fix_weight_zeros_keeps_the_zero_pattern(task, rng):
    model, zeros = zeroed_model(rng)
    data = task["data"]
    trainer = Trainer(model, batch_size=32)
    start = {k: v.copy() for k, v in trainer.params.items()}

    # without fixing, training fills the zeros in (so the check below can fail)
    trainer.fit(data, epochs=1, lr=0.01, progress=False)
    assert all(np.count_nonzero(trainer.params[k] == 0) < zeros[k].sum() for k in zeros)

    reset(trainer, start)
    trainer.fix_weight_zeros()
    assert sorted(trainer.weight_masks) == sorted(zeros)
    for optimizer in ("adam", "sgd"):
        trainer.fit(data, epochs=2, lr=0.01, optimizer=optimizer, progress=False)
        for name, zero in zeros.items():
            w = trainer.params[name]
            assert np.array_equal(w == 0, zero), name
            assert np.mean(w[~zero] != start[name][~zero]) > 0.9  # the others did train
    exported = trainer.export()
    inits = {i.name: numpy_helper.to_array(i) for i in exported.graph.initializer}
    for name, zero in zeros.items():
        assert np.array_equal(inits[name] == 0, zero)
    x = data.x_test[:21]
    assert rel_err(ort_run(exported, x), trainer.predict(x)) < 1e-4


def test_export_round_trips_and_predict_handles_partial_batches(task, rng):
    trainer, data, model = task["trainer"], task["data"], task["model"]
    reset(trainer, task["start"])
    original = model.SerializeToString()
    # untrained: predict equals onnxruntime on the input model, whatever the batch split
    for n in (3, 32, 45, 64):  # fewer than a batch, one batch, one and a part, two
        x = rng.standard_normal((n, TRAIN_SIZES[0])).astype(np.float32)
        out = trainer.predict(x)
        assert out.shape == (n, TRAIN_SIZES[-1])
        assert rel_err(out, ort_run(model, x)) < 1e-5

    trainer.fit(data, epochs=1, lr=0.01, progress=False)
    exported = trainer.export()
    assert model.SerializeToString() == original  # the trainer's input is left alone
    assert [n.op_type for n in exported.graph.node] == [n.op_type for n in model.graph.node]
    assert [i.name for i in exported.graph.input] == [i.name for i in model.graph.input]
    inits = {i.name: numpy_helper.to_array(i) for i in exported.graph.initializer}
    assert sorted(inits) == sorted(trainer.params)
    for name, value in trainer.params.items():
        assert np.array_equal(inits[name], value)
        assert not np.array_equal(value, task["start"][name])
    onnx.checker.check_model(exported)
    x = rng.standard_normal((45, TRAIN_SIZES[0])).astype(np.float32)
    assert rel_err(ort_run(exported, x), trainer.predict(x)) < 1e-4
    # and the exported weights are those of a plain float64 forward pass
    assert rel_err(trainer.predict(x), mlp_ref(layers_of(model, trainer.params), x)) < 1e-4
    assert trainer.accuracy(data.x_test, data.y_test) == ort_accuracy(exported, data.x_test, data.y_test)


# --------------------------------------------------------------------------- errors


def test_bad_optimizer_and_data_raise(task):
    trainer, data = task["trainer"], task["data"]
    reset(trainer, task["start"])
    with pytest.raises(ScalpelError, match="unknown optimizer 'rmsprop'"):
        trainer.fit(data, epochs=1, optimizer="rmsprop", progress=False)

    y_out = data.y_train.copy()
    y_out[7] = TRAIN_SIZES[-1]  # one label too many classes for the model
    with pytest.raises(ScalpelError, match="out of range"):
        trainer.fit(Dataset(data.x_train, y_out, data.x_test, data.y_test), epochs=1, progress=False)

    narrow = Dataset(data.x_train[:, :-1], data.y_train, data.x_test[:, :-1], data.y_test)
    with pytest.raises(ScalpelError, match="do not fit"):
        trainer.fit(narrow, epochs=1, progress=False)

    few = Dataset(data.x_train[:31], data.y_train[:31], data.x_test, data.y_test)
    with pytest.raises(ScalpelError, match="fewer than one batch"):
        trainer.fit(few, epochs=1, progress=False)
    # nothing of the above touched the parameters
    assert all(np.array_equal(trainer.params[k], v) for k, v in task["start"].items())


def test_model_without_class_scores_raises():
    w = np.random.default_rng(8).standard_normal((6, 12)).astype(np.float32)
    shape = helper.make_node("Constant", [], ["shape"],
                             value=numpy_helper.from_array(np.array([0, 3, 2], np.int64)))
    model = make_model(
        [helper.make_node("Gemm", ["input", "w"], ["h"], transB=1), shape,
         helper.make_node("Reshape", ["h", "shape"], ["out"])],
        [numpy_helper.from_array(w, "w")], [("input", ["N", 12])], [("out", ["N", 3, 2])])
    assert ort_run(model, np.ones((2, 12), np.float32)).shape == (2, 3, 2)
    with pytest.raises(ScalpelError, match=r"class scores of shape \[batch, classes\]"):
        Trainer(model, batch_size=4)


def test_model_with_two_inputs_raises():
    w = np.random.default_rng(9).standard_normal((4, 12)).astype(np.float32)
    model = make_model(
        [helper.make_node("Add", ["a", "b"], ["s"]),
         helper.make_node("Gemm", ["s", "w"], ["out"], transB=1)],
        [numpy_helper.from_array(w, "w")], [("a", ["N", 12]), ("b", ["N", 12])], [("out", ["N", 4])])
    with pytest.raises(ScalpelError, match="2 inputs"):
        Trainer(model, batch_size=4)


# --------------------------------------------------------------------------- node pruning


NODE_SIZES = [12, 10, 8, 4]


@pytest.fixture(scope="module")
def node_data():
    rng = np.random.default_rng(777)
    x, y = separable_data(rng, 256, NODE_SIZES[0], NODE_SIZES[-1])
    return Dataset(x[:192], y[:192], x[192:], y[192:], "synthetic")


def shapes(model: onnx.ModelProto) -> dict:
    return {i.name: tuple(i.dims) for i in model.graph.initializer}


def slim_shapes(sizes: list[int]) -> dict:
    out = {}
    for i, (k, n) in enumerate(zip(sizes, sizes[1:])):
        out[f"fc{i + 1}.weight"], out[f"fc{i + 1}.bias"] = (n, k), (n,)
    return out


@pytest.mark.parametrize("fine_tune", [0, 2])
def test_node_prune_with_trained_masks(node_data, fine_tune):
    model = models.mlp(NODE_SIZES, seed=11, layout="gemm")
    settings = TrainSettings(epochs=fine_tune, lr=0.03, batch_size=32, progress=False)
    result = node_prune(model, 0.5, node_data, settings, mask_epochs=1)
    assert result.nodes_before == {"fc1.weight": 10, "fc2.weight": 8}
    assert result.nodes_after == {"fc1.weight": 5, "fc2.weight": 4}
    assert result.removed_fraction == pytest.approx(0.5)
    assert shapes(result.model) == slim_shapes([12, 5, 4, 4])
    onnx.checker.check_model(result.model)
    out = ort_run(result.model, node_data.x_test)
    assert out.shape == (len(node_data.x_test), 4) and np.all(np.isfinite(out))
    acc = ort_accuracy(result.model, node_data.x_test, node_data.y_test)
    assert result.accuracy == acc
    if fine_tune:
        assert acc >= 0.8 and acc > result.accuracy_before_fine_tune  # chance is 0.25
    else:
        assert result.accuracy_before_fine_tune == acc


@pytest.mark.parametrize("criterion", ["l1", "l2"])
@pytest.mark.parametrize("layout", ["gemm", "matmul"])
def test_node_prune_by_weight_norm_without_data(rng, layout, criterion):
    model = models.mlp(NODE_SIZES, seed=int(rng.integers(1 << 30)), layout=layout)
    rate = 0.4
    result = node_prune(model, rate, criterion=criterion)
    assert result.accuracy is None and result.accuracy_before_fine_tune is None
    keep = [n - int(round(rate * n)) for n in NODE_SIZES[1:-1]]
    assert result.nodes_after == {"fc1.weight": keep[0], "fc2.weight": keep[1]}
    expected = slim_shapes([NODE_SIZES[0], *keep, NODE_SIZES[-1]])
    if layout == "matmul":
        expected = {k: v[::-1] for k, v in expected.items()}
    assert shapes(result.model) == expected

    # reference: the weakest rows (by the norm of each neuron's incoming weights) switched off
    layers = onnx_dense_layers(model)
    for layer in layers[:-1]:
        w = layer["w"].astype(np.float64)
        norm = np.abs(w).sum(axis=1) if criterion == "l1" else np.sqrt((w * w).sum(axis=1))
        off = np.argsort(norm)[: int(round(rate * len(norm)))]
        layer["w"], layer["bias"] = layer["w"].copy(), layer["bias"].copy()
        layer["w"][off] = 0.0
        layer["bias"][off] = 0.0
    x = rng.standard_normal((9, NODE_SIZES[0])).astype(np.float32)
    assert rel_err(ort_run(result.model, x), mlp_ref(layers, x)) < 1e-5


def test_node_prune_bad_arguments(node_data):
    model = models.mlp(NODE_SIZES, seed=2)
    with pytest.raises(ScalpelError, match="needs data"):
        node_prune(model, 0.5)
    with pytest.raises(ScalpelError, match="needs a rate"):
        node_prune(model, None, criterion="l1")
    with pytest.raises(ScalpelError, match="unknown node criterion"):
        node_prune(model, 0.5, criterion="l3")
    with pytest.raises(ScalpelError, match=r"\[0, 1\)"):
        node_prune(model, 1.0, node_data)


@pytest.mark.parametrize("bad", ["negative", "2d"])
def test_bad_labels_in_a_dataset_raise(task, bad):
    trainer, data = task["trainer"], task["data"]
    reset(trainer, task["start"])
    y = data.y_train.copy()
    if bad == "negative":
        y[5] = -1
    else:
        y = y[:, None]
    with pytest.raises(ScalpelError, match="label"):
        trainer.fit(Dataset(data.x_train, y, data.x_test, data.y_test), epochs=1, progress=False)


def bn_softmax_net(seed: int) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> AveragePool -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(seed)
    c = 4
    inits = [
        numpy_helper.from_array((rng.standard_normal((c, 1, 3, 3)) * 0.3).astype(np.float32), "c.w"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "c.b"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn.scale"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "bn.bias"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "bn.mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn.var"),
        numpy_helper.from_array((rng.standard_normal((3, c * 4 * 4)) * 0.1).astype(np.float32), "fc.w"),
        numpy_helper.from_array(np.zeros(3, np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "c.w", "c.b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    return make_model(nodes, inits, [("input", ["N", 1, 8, 8])], [("prob", ["N", 3])])


def test_batch_norm_avg_pool_and_softmax_train(rng):
    """batch_norm (no gradient rule in TVM) trains in its inference form with its statistics
    frozen; a final Softmax is trained through its logits (the loss equals cross-entropy of the
    probabilities onnxruntime computes)."""
    model = bn_softmax_net(int(rng.integers(1 << 30)))
    x = rng.random((192, 1, 8, 8)).astype(np.float32)
    y = (x[:, 0, :4].mean(axis=(1, 2)) * 3).astype(np.int64).clip(0, 2)
    trainer = Trainer(model, batch_size=32)
    loss, _ = adjoint(trainer, x[:32], y[:32])
    probs = ort_run(model, x[:32]).astype(np.float64)
    ref = -np.mean(np.log(probs[np.arange(32), y[:32]]))
    assert abs(loss - ref) / ref < 1e-4
    history = trainer.fit(Dataset(x[:160], y[:160], x[160:], y[160:], "bn"), 4, lr=1e-2, progress=False)
    assert history[-1].loss < 0.5 * history[0].loss
    trained = trainer.export()
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in trained.graph.initializer}
    for frozen in ("bn.mean", "bn.var"):
        np.testing.assert_array_equal(after[frozen], before[frozen])
    assert not np.array_equal(after["bn.scale"], before["bn.scale"])
    assert rel_err(trainer.predict(x[160:]), ort_run(trained, x[160:])) < 1e-4
