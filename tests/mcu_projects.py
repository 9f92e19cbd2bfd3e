"""Hand-written Cortex-M4 C projects that follow the generator's contract (model.h, sources,
Makefile, model.json written last; see README, "Microcontrollers"), for testing the firmware
runner without the generator: a chain of dense layers with known weights (ReLU between them),
and tiny projects with a known instruction count, a hang, a fault and a failing return code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MAKEFILE = """\
CC ?= arm-none-eabi-gcc
AR ?= arm-none-eabi-ar
CFLAGS ?= -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -O2
SOURCES := {sources}
libscalpel_model.a: $(SOURCES:.c=.o)
\t$(AR) rcs $@ $^
clean:
\trm -f *.o libscalpel_model.a
"""


def _floats(a: np.ndarray) -> str:
    return ",\n".join(", ".join(f"{v:.9e}f" for v in row) for row in np.atleast_2d(a))


def write_project(folder: Path, sources: dict[str, str], in_size: int, out_size: int,
                  in_shape=None, out_shape=None, header_sizes=None, layers=(), cflags=("-O2",),
                  write_json: bool = True) -> Path:
    """Write ``sources`` (name -> C text), model.h, a Makefile and model.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    h_in, h_out = header_sizes or (in_size, out_size)
    (folder / "model.h").write_text(
        "#ifndef MODEL_H\n#define MODEL_H\n"
        f"#define SCALPEL_INPUT_SIZE {h_in}\n#define SCALPEL_OUTPUT_SIZE {h_out}\n"
        "int scalpel_model_run(const float *in, float *out);\n#endif\n")
    for name, text in sources.items():
        (folder / name).write_text(text)
    c_sources = [name for name in sources if name.endswith(".c")]
    (folder / "Makefile").write_text(MAKEFILE.format(sources=" ".join(c_sources)))
    doc = {
        "format": "tvm-scalpel-mcu/1", "target": "cortex-m4",
        "input": {"name": "x", "shape": list(in_shape or [1, in_size]), "dtype": "float32"},
        "output": {"name": "y", "shape": list(out_shape or [1, out_size]), "dtype": "float32"},
        "sources": c_sources, "objects": [], "cflags": list(cflags), "layers": list(layers),
        "flash_bytes": sum(layer["flash_bytes"] for layer in layers),
        "ram_bytes": sum(layer["ram_bytes"] for layer in layers), "numerics": "fp32",
    }
    if write_json:
        (folder / "model.json").write_text(json.dumps(doc, indent=2))
    return folder


def dense_project(folder: Path, weights: list[np.ndarray], biases: list[np.ndarray]) -> Path:
    """y = W_k relu(... relu(W_1 x + b_1) ...) + b_k, weights (out, in) as const arrays in flash,
    two static activation buffers reused between layers."""
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    widest = max(sizes[1:-1], default=1)
    data, calls, layers = [], [], []
    for i, (w, b) in enumerate(zip(weights, biases)):
        data.append(f"const float W{i}[{w.size}] = {{\n{_floats(w)}\n}};\n"
                    f"const float B{i}[{b.size}] = {{ {_floats(b)} }};\n")
        src = "in" if i == 0 else f"act{(i - 1) % 2}"
        dst = "out" if i == len(weights) - 1 else f"act{i % 2}"
        relu = int(i < len(weights) - 1)
        calls.append(f"    dense({src}, {dst}, W{i}, B{i}, {w.shape[1]}, {w.shape[0]}, {relu});")
        layers.append({"name": f"fc{i + 1}", "kind": "dense", "flash_bytes": 4 * (w.size + b.size),
                       "ram_bytes": 4 * w.shape[0] if relu else 0})
    externs = "".join(f"extern const float W{i}[], B{i}[];\n" for i in range(len(weights)))
    model = f"""#include "model.h"
{externs}
static float act0[{widest}], act1[{widest}];

static void dense(const float *x, float *y, const float *w, const float *b, int n_in, int n_out,
                  int relu) {{
    for (int o = 0; o < n_out; o++) {{
        float acc = b[o];
        const float *row = w + o * n_in;
        for (int i = 0; i < n_in; i++) acc += row[i] * x[i];
        y[o] = relu && acc < 0.0f ? 0.0f : acc;
    }}
}}

int scalpel_model_run(const float *in, float *out) {{
{chr(10).join(calls)}
    (void)act0; (void)act1;
    return 0;
}}
"""
    return write_project(folder, {"model.c": model, "weights.c": "".join(data)}, sizes[0],
                         sizes[-1], layers=layers)


def random_dense(rng: np.random.Generator, sizes: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    weights = [rng.standard_normal((n_out, n_in)).astype(np.float32) / np.sqrt(n_in)
               for n_in, n_out in zip(sizes, sizes[1:])]
    biases = [rng.standard_normal(n_out).astype(np.float32) * 0.1 for n_out in sizes[1:]]
    return weights, biases


def dense_reference(x: np.ndarray, weights, biases) -> np.ndarray:
    """numpy float64 of what dense_project computes."""
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w.astype(np.float64).T + b.astype(np.float64)
        if i < len(weights) - 1:
            h = np.maximum(h, 0.0)
    return h


def nops_project(folder: Path, count: int) -> Path:
    """scalpel_model_run is ``count`` nops then ``return 0`` (2 instructions, as the empty
    baseline's): the runner must count exactly ``count``."""
    body = "\n".join(["    nop"] * count)
    asm = f"""    .syntax unified
    .thumb
    .text
    .global scalpel_model_run
    .type scalpel_model_run, %function
    .thumb_func
scalpel_model_run:
{body}
    movs r0, #0
    bx lr
"""
    model = "/* the model is in nops.S */\n"
    folder = write_project(folder, {"model.c": model}, 4, 2)
    (folder / "nops.S").write_text(asm)
    doc = json.loads((folder / "model.json").read_text())
    doc["sources"].append("nops.S")
    (folder / "model.json").write_text(json.dumps(doc))
    return folder


def c_project(folder: Path, body: str, in_size: int = 4, out_size: int = 2, **kw) -> Path:
    """scalpel_model_run with the given C body (for hangs, faults, return codes)."""
    model = ('#include "model.h"\n'
             f"int scalpel_model_run(const float *in, float *out) {{\n{body}\n}}\n")
    return write_project(folder, {"model.c": model}, in_size, out_size, **kw)


def _gemm_weight(model) -> np.ndarray:
    """The ``[N, K]`` weight of a one-layer Gemm (transB=1) model."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    (node,) = model.graph.node
    return inits[node.input[1]].astype(np.float32)


def sparse_project(folder: Path, weight: np.ndarray, g: int) -> Path:
    """y = W x in the grouped-sparse format (values, group columns, row pointers) with the
    inner loop unrolled over g, as the generator's kernel does: one column index per group."""
    from tvm_scalpel.format import GroupedSparseMatrix, num_group_cols

    n, k = weight.shape
    m = GroupedSparseMatrix.from_dense(weight, g)
    padded = num_group_cols(k, g) * g
    terms = " + ".join(f"v[{i}] * xx[{i}]" for i in range(g))
    values = m.values.reshape(-1) if m.n_groups else np.zeros(1, np.float32)
    cols = m.group_cols if m.n_groups else np.zeros(1, np.int32)
    model = f"""#include <stdint.h>
#include "model.h"
static const float VALUES[] = {{ {_floats(values)} }};
static const int32_t COLS[] = {{ {", ".join(str(int(c) * g) for c in cols)} }};
static const int32_t INDPTR[] = {{ {", ".join(map(str, m.indptr))} }};
static float xpad[{padded}];

int scalpel_model_run(const float *in, float *out) {{
    for (int i = 0; i < {padded}; i++) xpad[i] = i < {k} ? in[i] : 0.0f;
    for (int r = 0; r < {n}; r++) {{
        float acc = 0.0f;
        for (int j = INDPTR[r]; j < INDPTR[r + 1]; j++) {{
            const float *v = VALUES + j * {g};
            const float *xx = xpad + COLS[j];
            acc += {terms};
        }}
        out[r] = acc;
    }}
    return 0;
}}
"""
    layers = [{"name": "fc", "kind": "grouped-sparse", "group_width": g,
               "flash_bytes": int(m.nbytes), "ram_bytes": 4 * padded}]
    return write_project(folder, {"model.c": model}, k, n, layers=layers)


def fake_generator(model, folder: Path, mode: str) -> None:
    """A stand-in for ``compile --target cortex-m4`` on one-layer Gemm models (bias zero):
    dense, or grouped-sparse with g recovered from the zero pattern, as the generator does."""
    from tvm_scalpel.pruning import recover_group_width

    w = _gemm_weight(model)
    if mode == "dense":
        dense_project(Path(folder), [w], [np.zeros(w.shape[0], np.float32)])
    else:
        sparse_project(Path(folder), w, recover_group_width(w) or 1)
