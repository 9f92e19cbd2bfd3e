"""Independent references and small builders shared by the tests.

Nothing here calls into tvm_scalpel's pruning or format code: the references are written
separately (explicit loops, float64) so that the library is checked against them, not itself.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import onnx
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

IR_VERSION = 9  # onnxruntime reads IR <= 13
OPSET = 17


def cpu_has_avx512f() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def kept_in_blocks(n: int, rate: float, block: int) -> int:
    """Channels a layer of n keeps after node pruning at ``rate`` for a target whose preferred
    width is ``block``: rounded up to whole blocks unless that would keep them all."""
    keep = n - int(round(rate * n))
    up = -(-keep // block) * block
    return up if up < n else keep


# --------------------------------------------------------------------------- numerics


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| / max |ref| (ref must not be all zeros)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    scale = float(np.abs(ref).max())
    assert scale > 0, "reference is all zeros: the comparison would prove nothing"
    return float(np.abs(out - ref).max()) / scale


def dense_ref(x, w_nk, bias=None, relu=False) -> np.ndarray:
    """float64 ``act(x @ W.T + b)``."""
    y = np.asarray(x, np.float64) @ np.asarray(w_nk, np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return np.maximum(y, 0.0) if relu else y


def mlp_ref(layers: list[dict], x: np.ndarray) -> np.ndarray:
    """float64 forward pass of an MLP (ReLU between layers, none after the last)."""
    h = np.asarray(x, np.float64)
    for i, layer in enumerate(layers):
        h = dense_ref(h, layer["w"], layer["bias"], relu=i < len(layers) - 1)
    return h


# --------------------------------------------------------------------------- pruning reference


def group_bounds(k: int, g: int) -> list[tuple[int, int]]:
    """Column ranges [start, stop) of the aligned groups of one row (last one may be partial)."""
    return [(s, min(s + g, k)) for s in range(0, k, g)]


def ref_importance(w: np.ndarray, g: int, kind: str) -> np.ndarray:
    """Importance of every aligned group, computed group by group in float64."""
    n, k = w.shape
    bounds = group_bounds(k, g)
    out = np.empty((n, len(bounds)))
    for r in range(n):
        for j, (s, e) in enumerate(bounds):
            a = np.abs(w[r, s:e].astype(np.float64))
            if kind == "rms":
                out[r, j] = math.sqrt(float(np.mean(a * a)))
            elif kind == "max":
                out[r, j] = float(a.max())
            elif kind == "mean":
                out[r, j] = float(a.mean())
            else:
                raise ValueError(kind)
    return out


def ref_prune(w: np.ndarray, g: int, rate: float, kind: str = "rms"):
    """Remove whole groups, weakest first, taking the count whose removed weights are closest
    to ``rate`` of all weights (the smaller count on a tie). Returns (pruned W, kept mask)."""
    n, k = w.shape
    bounds = group_bounds(k, g)
    imp = ref_importance(w, g, kind)
    slots = [(imp[r, j], r * len(bounds) + j, r, j) for r in range(n) for j in range(len(bounds))]
    slots.sort()
    target = rate * n * k
    best_m, best_dist, removed = 0, abs(target), 0
    for m, (_, _, r, j) in enumerate(slots, start=1):
        s, e = bounds[j]
        removed += e - s
        if abs(removed - target) < best_dist:
            best_m, best_dist = m, abs(removed - target)
    keep = np.ones((n, len(bounds)), dtype=bool)
    pruned = np.array(w, dtype=np.float32, copy=True)
    for _, _, r, j in slots[:best_m]:
        keep[r, j] = False
        s, e = bounds[j]
        pruned[r, s:e] = 0.0
    return pruned, keep


def group_zero_counts(w: np.ndarray, g: int) -> list[tuple[int, int]]:
    """(zeros in group, group size) for every aligned group of ``w[N, K]``."""
    n, k = w.shape
    return [(int(np.count_nonzero(w[r, s:e] == 0)), e - s)
            for r in range(n) for s, e in group_bounds(k, g)]


def assert_whole_groups(w: np.ndarray, g: int) -> None:
    """Every zero of ``w[N, K]`` lies in an aligned group of g along K that is entirely zero
    (weights drawn from a continuous distribution have no zeros of their own)."""
    bad = [(z, size) for z, size in group_zero_counts(w, g) if z not in (0, size)]
    assert not bad, f"{len(bad)} groups of width {g} are partly zero, e.g. {bad[:3]}"


def zero_fraction(w: np.ndarray) -> float:
    return float(np.count_nonzero(w == 0)) / w.size


def grouped_sparse_bytes(w: np.ndarray, g: int) -> int:
    """Bytes of the grouped-sparse format, counted independently: float32 values of every kept
    (not all-zero) group padded to g, one int32 index per kept group, an int32 row pointer [N+1]."""
    n, _ = w.shape
    kept = sum(1 for z, size in group_zero_counts(w, g) if z < size)
    return kept * g * 4 + kept * 4 + (n + 1) * 4


# --------------------------------------------------------------------------- ONNX builders


def make_model(nodes, inits, inputs, outputs, extra_opsets=()) -> onnx.ModelProto:
    """A checked ONNX model; ``inputs``/``outputs`` are (name, shape) pairs of float tensors."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        inits,
    )
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tvm-scalpel-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def random_layers(sizes: list[int], seed: int) -> list[dict]:
    """Weights ``w[N, K]`` and biases of an MLP, He-scaled."""
    rng = np.random.default_rng(seed)
    return [
        {"w": (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32),
         "bias": (rng.standard_normal(n_out) * 0.1).astype(np.float32)}
        for n_in, n_out in zip(sizes[:-1], sizes[1:])
    ]


def gemm_transb0_mlp(sizes: list[int], seed: int, batch="N") -> onnx.ModelProto:
    """An MLP of ``Gemm`` nodes *without* transB: the initializer holds ``W`` as ``[K, N]``."""
    layers = random_layers(sizes, seed)
    nodes, inits, prev = [], [], "input"
    for i, layer in enumerate(layers):
        inits += [numpy_helper.from_array(np.ascontiguousarray(layer["w"].T), f"W{i}"),
                  numpy_helper.from_array(layer["bias"], f"B{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [f"y{i}"]))
        prev = f"y{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    return make_model(nodes, inits, [("input", [batch, sizes[0]])], [(prev, [batch, sizes[-1]])])


def onnx_dense_layers(model: onnx.ModelProto) -> list[dict]:
    """The dense layers of an ONNX model as written in the file, weights oriented ``[N, K]``:
    ``Gemm`` (transB or not) and ``MatMul`` (+ ``Add`` of an initializer), in node order."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = list(model.graph.node)
    layers = []
    for node in nodes:
        if node.op_type == "Gemm" and node.input[1] in inits:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            w = inits[node.input[1]]
            bias = inits[node.input[2]] if len(node.input) > 2 else None
            layers.append({"name": node.input[1], "w": w if trans_b else w.T, "bias": bias,
                           "stored_nk": bool(trans_b)})
        elif node.op_type == "MatMul" and node.input[1] in inits and inits[node.input[1]].ndim == 2:
            add = next((n for n in nodes if n.op_type == "Add" and node.output[0] in n.input), None)
            bias = None
            if add is not None:
                other = [i for i in add.input if i != node.output[0]][0]
                bias = inits.get(other)
            layers.append({"name": node.input[1], "w": inits[node.input[1]].T, "bias": bias,
                           "stored_nk": False})
    return layers


# --------------------------------------------------------------------------- running things


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def vm_run(executable_or_lib, x: np.ndarray) -> np.ndarray:
    """Run ``main`` of a compiled Relax executable (or a loaded library) on the CPU."""
    vm = relax.VirtualMachine(executable_or_lib, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x), tvm.cpu()))
    return out.numpy()


def build_primfunc(func, target):
    """Compile one TensorIR kernel into a callable ``main``."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=target)["main"]


def tensors(*arrays):
    return [tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu()) for a in arrays]


def run_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tvm_scalpel.cli", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


# --------------------------------------------------------------------------- training references


def softmax_xent_ref(logits: np.ndarray, labels: np.ndarray) -> float:
    """float64 mean softmax cross-entropy, ``mean(logsumexp(z) - z[label])``."""
    z = np.asarray(logits, np.float64)
    zmax = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
    return float(np.mean(lse - z[np.arange(len(z)), labels]))


def xent_grad_ref(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float64 d(mean cross-entropy)/d(logits): ``(softmax(z) - onehot) / batch``."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(z)), labels] -= 1.0
    return p / len(z)


def mlp_loss_grads_ref(layers: list[dict], x: np.ndarray, labels: np.ndarray, alphas=None):
    """Hand-written float64 forward/backward of an MLP with softmax cross-entropy.

    Hidden layer i computes ``relu((a @ W.T + b) * alpha_i)`` (alpha: a 0/1 node mask, all ones
    when ``alphas`` is None). ReLU's derivative at 0 is taken as 1 (TVM's convention, which only
    matters for closed masks, where it lets dL/dalpha see the unmasked signal).
    Returns ``(loss, [(dW[N, K], db)], [dL/dalpha_i])``.
    """
    n_hidden = len(layers) - 1
    if alphas is None:
        alphas = [np.ones(len(layer["bias"])) for layer in layers[:-1]]
    acts = [np.asarray(x, np.float64)]
    pre, masked = [], []
    for i, layer in enumerate(layers):
        z = acts[-1] @ np.asarray(layer["w"], np.float64).T + np.asarray(layer["bias"], np.float64)
        if i < n_hidden:
            m = z * np.asarray(alphas[i], np.float64)
            pre.append(z)
            masked.append(m)
            acts.append(np.maximum(m, 0.0))
        else:
            logits = z
    loss = softmax_xent_ref(logits, labels)
    d = xent_grad_ref(logits, labels)
    grads, dalphas = [None] * len(layers), [None] * n_hidden
    for i in range(len(layers) - 1, -1, -1):
        w = np.asarray(layers[i]["w"], np.float64)
        if i < n_hidden:
            dm = d * (masked[i] >= 0)
            dalphas[i] = (dm * pre[i]).sum(axis=0)
            d = dm * np.asarray(alphas[i], np.float64)
        grads[i] = (d.T @ acts[i], d.sum(axis=0))
        d = d @ w
    return loss, grads, dalphas


def separable_data(rng: np.random.Generator, n: int, dim: int, classes: int,
                   spread: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around random class centres: float32 x[n, dim], int64 y[n] (every
    class present), learnable by a small MLP."""
    centres = rng.standard_normal((classes, dim)) * 1.5
    y = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])
    rng.shuffle(y)
    x = centres[y] + spread * rng.standard_normal((n, dim))
    return x.astype(np.float32), y.astype(np.int64)


def ort_accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return float((ort_run(model, np.ascontiguousarray(x, np.float32)).argmax(axis=1) == y).mean())
