"""The signature a compiled library records: the ONNX names, shapes and dtypes of its inputs
and outputs, and the checks and names ``run`` gives from it (here and over RPC)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import tvm
from tvm import relax

from .errors import ScalpelError

log = logging.getLogger("tvm_scalpel")

# --------------------------------------------------------------------------- the library's signature
#
# A compiled library records the ONNX names, shapes and dtypes of its inputs and outputs, so that
# ``run`` can name every output and explain a wrong input in the user's terms. They are stored IN
# the library (a copy or an RPC upload cannot lose them): a Relax function SIGNATURE_FUNCTION
# beside ``main`` that returns a constant uint8 tensor, the UTF-8 JSON of ``Signature.to_json``.
# Libraries compiled before it existed have no such function and run with names output_0...

SIGNATURE_FUNCTION = "scalpel_signature"
SIGNATURE_VERSION = 1


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str | None]  # an int, a symbolic dim's name, or None (unknown)
    dtype: str

    def shape_text(self) -> str:
        """``(N, 784)``: the first (batch) dim shown as N when symbolic."""
        dims = [str(d) if isinstance(d, int) else ("N" if i == 0 else (d or "?"))
                for i, d in enumerate(self.shape)]
        return _tuple_text(dims)


@dataclass
class Signature:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def to_json(self) -> str:
        import json

        return json.dumps({"version": SIGNATURE_VERSION,
                           "inputs": [vars(t) for t in self.inputs],
                           "outputs": [vars(t) for t in self.outputs]})

    @staticmethod
    def from_json(text: str) -> Signature:
        import json

        data = json.loads(text)
        return Signature([TensorSpec(**t) for t in data["inputs"]],
                         [TensorSpec(**t) for t in data["outputs"]])


def _tuple_text(dims) -> str:
    dims = [str(d) for d in dims]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def model_signature(model: onnx.ModelProto) -> Signature:
    """The graph inputs (initializers excluded: they are weights) and outputs of an ONNX model."""
    from onnx.helper import tensor_dtype_to_np_dtype

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        try:
            dtype = np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).name
        except Exception:  # noqa: BLE001 - an undefined elem type: nothing to check against
            dtype = "unknown"
        return TensorSpec(value.name, dims, dtype)

    weights = {init.name for init in model.graph.initializer}
    return Signature([spec(v) for v in model.graph.input if v.name not in weights],
                     [spec(v) for v in model.graph.output])


def with_signature(mod: tvm.IRModule, signature: Signature) -> tvm.IRModule:
    """Add to ``mod`` the function SIGNATURE_FUNCTION that returns ``signature`` (see above)."""
    blob = np.frombuffer(signature.to_json().encode("utf-8"), dtype=np.uint8).copy()
    bb = relax.BlockBuilder()
    with bb.function(SIGNATURE_FUNCTION, []):
        bb.emit_func_output(bb.emit(relax.const(blob, "uint8")))
    mod[SIGNATURE_FUNCTION] = bb.get()[SIGNATURE_FUNCTION]
    return mod


def library_signature(vm) -> Signature | None:
    """The signature a library records (a local or an RPC VM), None for an older library."""
    cached = getattr(vm, "_scalpel_signature", False)
    if cached is not False:
        return cached
    try:
        blob = vm[SIGNATURE_FUNCTION]().numpy()
        signature = Signature.from_json(bytes(blob.astype(np.uint8)).decode("utf-8"))
    except Exception:  # noqa: BLE001 - no such function (compiled before it existed), or garbled
        signature = None
    try:
        vm._scalpel_signature = signature
    except AttributeError:
        pass
    return signature


def check_input(x: np.ndarray, signature: Signature | None) -> None:
    """A one-line error, in the model's terms, for an input the library cannot take; a warning
    for NaN / Inf values (onnxruntime propagates NaN, our kernels' ReLU turns it into 0)."""
    if signature is None:  # an older library: our models take float32; the shape is TVM's to check
        if x.dtype != np.float32:
            raise ScalpelError(f"input has dtype {x.dtype}; the model expects float32")
        name = "input"
    else:
        if len(signature.inputs) != 1:
            names = ", ".join(t.name for t in signature.inputs)
            raise ScalpelError(f"the model has {len(signature.inputs)} inputs ({names}); run takes one")
        spec = signature.inputs[0]
        name = spec.name
        if spec.dtype != "unknown" and x.dtype != np.dtype(spec.dtype):
            raise ScalpelError(f"input {name} has dtype {x.dtype}; the model expects {spec.dtype}")
        fits = len(x.shape) == len(spec.shape) and all(
            not isinstance(d, int) or d == n for d, n in zip(spec.shape, x.shape))
        if not fits:
            raise ScalpelError(f"input {name} has shape {_tuple_text(x.shape)}; "
                               f"the model expects {spec.shape_text()}")
    if np.issubdtype(x.dtype, np.floating):
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        if bad:
            log.warning("input %s has %d NaN/Inf value(s): the output may differ from other "
                        "runtimes (onnxruntime propagates NaN; the ReLU here turns it into 0)", name, bad)


# TVM's own message for a wrong input: "... param=x, annotation=R.Tensor((N, 8), dtype="float32")"
_TVM_PARAM = r'param=([^,]+), annotation=R\.Tensor\(\(([^)]*)\),\s*dtype="(\w+)"\)'


def _input_error(err: Exception, x: np.ndarray) -> str:
    """TVM's complaint about an input, retold in the model's terms where it can be parsed."""
    import re

    text = str(err)
    found = re.search(_TVM_PARAM, text)
    if found:
        name, dims, dtype = found.groups()
        dims = [d.strip() for d in dims.split(",") if d.strip()]
        if x.dtype != np.dtype(dtype):
            return f"input {name} has dtype {x.dtype}; the model expects {dtype}"
        return f"input {name} has shape {_tuple_text(x.shape)}; the model expects {_tuple_text(dims)}"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return f"running the model failed: {lines[-1] if lines else type(err).__name__}"


def named_outputs(result, signature: Signature | None) -> dict[str, np.ndarray]:
    """A VM result (a tensor or a nested tuple of them) as ``{ONNX output name: array}``."""
    flat = []

    def walk(value):
        if hasattr(value, "numpy"):
            flat.append(value.numpy())
        else:
            for item in value:
                walk(item)

    walk(result)
    if signature is not None and len(signature.outputs) == len(flat):
        names = [t.name for t in signature.outputs]
    else:
        names = [f"output_{i}" for i in range(len(flat))]
    return dict(zip(names, flat))
