"""model.json, the machine-readable description of a Cortex-M4 C project (format
``tvm-scalpel-mcu/1``, see /work/mcu-interface.md and the README): read and checked here so
that a bad project folder is one clear error before anything is compiled."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ScalpelError

FORMAT = "tvm-scalpel-mcu/1"
TARGET = "cortex-m4"
NUMERICS = ("fp32", "q15")


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Floats in one call (the whole shape: its first axis is the batch of one call)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Project:
    """A complete project folder as model.json describes it; paths are absolute."""

    root: Path
    input: Tensor
    output: Tensor
    sources: tuple[Path, ...]
    objects: tuple[Path, ...]
    cflags: tuple[str, ...]
    layers: tuple[dict, ...]
    flash_bytes: int | None
    ram_bytes: int | None
    numerics: str


def load_project(folder: str | Path) -> Project:
    """Read and check ``folder/model.json``; a ScalpelError (one line) says what is wrong."""
    root = Path(folder)
    if not root.is_dir():
        raise ScalpelError(f"{root}: no such directory")
    path = root / "model.json"
    if not path.is_file():
        raise ScalpelError(f"{root}: not a complete Cortex-M4 project (no model.json; written "
                           "last by `tvm-scalpel compile --target cortex-m4`)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ScalpelError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ScalpelError(f"{path}: expected a JSON object")

    def field(name: str, kind: type | tuple[type, ...], default=...):
        if name not in doc:
            if default is not ...:
                return default
            raise ScalpelError(f"{path}: missing field {name!r}")
        value = doc[name]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ScalpelError(f"{path}: field {name!r} has the wrong type")
        return value

    if field("format", str) != FORMAT:
        raise ScalpelError(f"{path}: format {doc['format']!r}, this runner reads {FORMAT!r}")
    if field("target", str) != TARGET:
        raise ScalpelError(f"{path}: target {doc['target']!r}; the runner emulates {TARGET} only")
    numerics = field("numerics", str, "fp32")
    if numerics not in NUMERICS:
        raise ScalpelError(f"{path}: numerics {numerics!r}, expected one of {', '.join(NUMERICS)}")
    tensors = [_tensor(path, key, field(key, dict)) for key in ("input", "output")]
    sources = tuple(_inside(path, root, p, "sources") for p in field("sources", list))
    objects = tuple(_inside(path, root, p, "objects") for p in field("objects", list, []))
    if not sources and not objects:
        raise ScalpelError(f"{path}: lists no sources and no objects")
    cflags = field("cflags", list, [])
    if not all(isinstance(flag, str) for flag in cflags):
        raise ScalpelError(f"{path}: field 'cflags' must be a list of strings")
    if not (root / "model.h").is_file():
        raise ScalpelError(f"{root}: no model.h")
    layers = field("layers", list, [])
    return Project(root=root, input=tensors[0], output=tensors[1], sources=sources,
                   objects=objects, cflags=tuple(cflags),
                   layers=tuple(layer for layer in layers if isinstance(layer, dict)),
                   flash_bytes=_count(path, doc, "flash_bytes"),
                   ram_bytes=_count(path, doc, "ram_bytes"), numerics=numerics)


def _tensor(path: Path, key: str, spec: dict) -> Tensor:
    shape = spec.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ScalpelError(f"{path}: {key} shape must be a non-empty list of positive integers")
    dtype = spec.get("dtype", "float32")
    if dtype != "float32":
        raise ScalpelError(f"{path}: {key} dtype {dtype!r}; scalpel_model_run takes float32")
    return Tensor(name=str(spec.get("name", key)), shape=tuple(shape), dtype=dtype)


def _inside(path: Path, root: Path, rel, key: str) -> Path:
    """A file listed in model.json: relative, inside the project, present."""
    if not isinstance(rel, str) or not rel:
        raise ScalpelError(f"{path}: {key} must be a list of file names")
    full = (root / rel).resolve()
    if Path(rel).is_absolute() or not full.is_relative_to(root.resolve()):
        raise ScalpelError(f"{path}: {key} entry {rel!r} is outside the project folder")
    if not full.is_file():
        raise ScalpelError(f"{root}: {key} entry {rel} does not exist")
    return full


def _count(path: Path, doc: dict, key: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ScalpelError(f"{path}: {key} must be a non-negative integer")
    return value
