"""cnnbp.data: the loaders (digits, IDX, npz), the stratified split and the DataLoader."""

import gzip
import io
import sys
import zipfile

import numpy as np
import pytest
from cnnbp import data

# ---- digits ------------------------------------------------------------------------------


def test_digits_shapes_range_and_labels():
    pytest.importorskip("sklearn")
    x, y = data.load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert sorted(np.unique(y).tolist()) == list(range(10))
    x64, y64 = data.load_digits(dtype=np.float64)
    assert x64.dtype == np.float64
    np.testing.assert_array_equal(x64.astype(np.float32), x)
    np.testing.assert_array_equal(y64, y)


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "cnnbp\[datasets\]"'):
        data.load_digits()


def test_digits_refuses_integer_dtype():
    with pytest.raises(TypeError, match=r"\[load_digits\] dtype"):
        data.load_digits(dtype=np.int32)


# ---- MNIST-format IDX files --------------------------------------------------------------


def idx_bytes(magic, dims, body):
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + bytes(body)


def write(path, content, gz=False):
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(content)
    else:
        path.write_bytes(content)
    return path


def write_mnist(directory, split="train", n=5, rows=28, cols=28, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    write(
        directory / f"{prefix}-images-idx3-ubyte",
        idx_bytes(0x803, (n, rows, cols), images.tobytes()),
        gz,
    )
    write(directory / f"{prefix}-labels-idx1-ubyte", idx_bytes(0x801, (n,), labels.tobytes()), gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_reads_plain_and_gzipped_idx(tmp_path, gz, split):
    images, labels = write_mnist(tmp_path, split, gz=gz)
    x, y = data.load_mnist(tmp_path, split=split)
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (5,) and y.dtype == np.int64
    np.testing.assert_allclose(x[:, 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, labels)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_mnist_other_image_sizes_and_float64(tmp_path):
    images, _ = write_mnist(tmp_path, "test", n=3, rows=4, cols=7)
    x, _ = data.load_mnist(str(tmp_path), split="test", dtype=np.float64)
    assert x.shape == (3, 1, 4, 7) and x.dtype == np.float64
    np.testing.assert_array_equal(x[:, 0], images / 255.0)


def _images_file(tmp_path, content, gz=False):
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(0x801, (2,), b"\x01\x02"))
    write(tmp_path / "train-images-idx3-ubyte", content, gz)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize(
    "content, message",
    [
        (
            idx_bytes(0x802, (2, 2, 2), bytes(8)),
            r"expected magic number 0x00000803, got 0x00000802",
        ),
        (idx_bytes(0x801, (8,), bytes(8)), r"expected magic number 0x00000803, got 0x00000801"),
        (idx_bytes(0x803, (2, 2, 2), bytes(7)), r"expected 8 data bytes .*, got 7"),
        (idx_bytes(0x803, (2, 2, 2), bytes(9)), r"expected 8 data bytes .*, got (9|more)"),
        (idx_bytes(0x803, (0, 2, 2), b""), r"expected non-zero dimensions, got \(0, 2, 2\)"),
        (idx_bytes(0x803, (2, 2, 2), b"")[:10], r"expected an IDX header of 16 bytes, got 10"),
        (b"\x00\x00", r"expected an IDX header of 16 bytes, got 2"),
        # a header claiming 2^32-1 images of 2^32-1 x 2^32-1 is refused, never allocated
        (idx_bytes(0x803, (2**32 - 1,) * 3, bytes(16)), r"expected \d+ data bytes"),
    ],
    ids=[
        "magic",
        "labels-magic",
        "truncated",
        "trailing",
        "zero-dim",
        "short-header",
        "tiny",
        "huge-header",
    ],
)
def test_mnist_refuses_malformed_images(tmp_path, content, message, gz):
    _images_file(tmp_path, content, gz)
    with pytest.raises(
        ValueError, match=r"^\[load_mnist\] train-images-idx3-ubyte(\.gz)?: " + message
    ):
        data.load_mnist(tmp_path)


def test_mnist_refuses_wrong_label_magic_and_count_mismatch(tmp_path):
    write_mnist(tmp_path, "train", n=3)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(0x803, (1, 1, 1), b"\x00"))
    with pytest.raises(
        ValueError,
        match=r"train-labels-idx1-ubyte: expected magic number "
        r"0x00000801, got 0x00000803",
    ):
        data.load_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(0x801, (4,), bytes(4)))
    with pytest.raises(
        ValueError,
        match=r"\[load_mnist\] train: expected as many labels as "
        r"images \(3\), got 4",
    ):
        data.load_mnist(tmp_path)


def test_mnist_refuses_corrupt_gzip_missing_files_and_bad_split(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip data at all")
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(0x801, (1,), b"\x00"))
    with pytest.raises(
        ValueError,
        match=r"\[load_mnist\] train-images-idx3-ubyte.gz: expected "
        r"a readable IDX file",
    ):
        data.load_mnist(tmp_path)
    with pytest.raises(
        FileNotFoundError,
        match=r"t10k-images-idx3-ubyte or "
        r"t10k-images-idx3-ubyte.gz",
    ):
        data.load_mnist(tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match=r"\[load_mnist\] directory"):
        data.load_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"split: expected 'train' or 'test', got 'valid'"):
        data.load_mnist(tmp_path, split="valid")


# ---- .npz ------------------------------------------------------------------------------


def test_npz_nchw_nhw_uint8_and_float_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 5, 4))
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(6), other=np.zeros(2))
    got_x, got_y = data.load_npz(tmp_path / "a.npz")
    assert got_x.shape == (6, 3, 5, 4) and got_x.dtype == np.float32 and got_x.flags.c_contiguous
    np.testing.assert_allclose(got_x, x, rtol=1e-6)
    assert got_y.dtype == np.int64 and got_y.tolist() == list(range(6))

    images = rng.integers(0, 256, size=(4, 5, 5), dtype=np.uint8)
    np.savez_compressed(tmp_path / "b.npz", x=images, y=np.array([0.0, 1.0, 2.0, 1.0]))
    got_x, got_y = data.load_npz(str(tmp_path / "b.npz"), dtype=np.float64)
    assert got_x.shape == (4, 1, 5, 5) and got_x.dtype == np.float64
    np.testing.assert_array_equal(got_x[:, 0], images / 255.0)
    assert got_y.tolist() == [0, 1, 2, 1]


def _npz_with_x(path, x_npy, n):
    """An archive whose x.npy holds the bytes x_npy, beside n good labels."""
    y = io.BytesIO()
    np.save(y, np.arange(n))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", x_npy)
        archive.writestr("y.npy", y.getvalue())


def _npz_with_object_array(path):
    """x is an object array: loading it would unpickle, which load_npz never does."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _npz_with_x(path, buffer.getvalue(), 2)


def _npz_with_lying_header(path):
    """x.npy's header claims 1000x more elements than the entry holds."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 2, 2), dtype=np.float32))
    content = buffer.getvalue().replace(b"(4, 2, 2), }   ", b"(4000, 2, 2), }")  # same length
    assert len(content) == len(buffer.getvalue())
    _npz_with_x(path, content, 4)


def _npz_with_huge_header(path):
    """x.npy's header claims 2^70 elements (written by NumPy's own header writer)."""
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (2**40, 2**30)}
    np.lib.format.write_array_header_1_0(buffer, header)
    buffer.write(bytes(64))
    _npz_with_x(path, buffer.getvalue(), 4)


def _npz_with_damaged_x(path):
    """One byte of x's data changed after the archive was written: its CRC-32 disagrees."""
    np.savez(path, x=np.zeros((2, 4, 4)), y=np.arange(2))
    content = bytearray(path.read_bytes())
    content[content.index(b"x.npy") + 5 + 128 + 8] ^= 0xFF  # inside x's data, past its header
    path.write_bytes(bytes(content))


def _truncated(path):
    np.savez(path, x=np.zeros((10, 4, 4)), y=np.arange(10))
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: np.savez(p, x=np.zeros((2, 4, 4))),
            r"y: expected arrays 'x' and 'y', got \['x'\]",
        ),
        (
            lambda p: np.savez(p, images=np.zeros((2, 4, 4)), y=np.arange(2)),
            r"x: expected arrays 'x' and 'y', got \['images', 'y'\]",
        ),
        (
            _npz_with_object_array,
            r"x: expected a numeric array \(pickled data is never loaded\), got ValueError: "
            r"Object arrays cannot be loaded when allow_pickle=False",
        ),
        (
            lambda p: np.savez(p, x=np.zeros((2, 4)), y=np.arange(2)),
            r"x: expected 4 dims \(N, C, H, W\) or 3 dims \(N, H, W\), got shape \(2, 4\)",
        ),
        (lambda p: np.savez(p, x=np.zeros((2, 1, 1, 4, 4)), y=np.arange(2)), r"x: expected 4 dims"),
        (
            lambda p: np.savez(p, x=np.zeros((3, 4, 4)), y=np.arange(2)),
            r"y: expected one label per image \(3\), got 2",
        ),
        (
            lambda p: np.savez(p, x=np.zeros((2, 4, 4)), y=np.array([0.5, 1.0])),
            r"y: expected integer class labels, got float64",
        ),
        (
            lambda p: np.savez(p, x=np.zeros((2, 4, 4)), y=np.array([0, -1])),
            r"y: expected labels >= 0, got -1",
        ),
        (
            lambda p: np.savez(p, x=np.zeros((2, 4, 4)), y=np.zeros((2, 1), dtype=int)),
            r"y: expected 1 dim \(N,\), got shape \(2, 1\)",
        ),
        (
            lambda p: np.savez(p, x=np.full((2, 4, 4), np.nan), y=np.arange(2)),
            r"x: expected finite values",
        ),
        (
            lambda p: np.savez(p, x=np.array(["a", "b"]).reshape(2, 1, 1), y=np.arange(2)),
            r"x: expected numeric images, got <U1",
        ),
        (
            _npz_with_lying_header,
            r"x: expected a numeric array .*got ValueError: .*expected 64000 bytes got 64",
        ),
        (_npz_with_huge_header, r"x: expected a numeric array .*got (ValueError|MemoryError)"),
        (
            _truncated,
            r"data.npz: expected a readable .npz archive, got no zip directory \(truncated\?\)$",
        ),
        (
            lambda p: p.write_bytes(b"plain text, not an archive"),
            r"expected a readable .npz archive, got no zip directory \(truncated\?\)$",
        ),
        (
            lambda p: p.write_bytes(b"PK"),
            r"data.npz: expected a readable .npz archive, got 2 bytes$",
        ),
        (lambda p: p.write_bytes(b""), r"expected a readable .npz archive, got 0 bytes$"),
        (_npz_with_damaged_x, r"x: expected its checksum, got other data \(the file is damaged\)$"),
        (
            lambda p: np.save(open(p, "wb"), np.zeros(3)),
            r"expected a readable .npz archive, got a single .npy array",
        ),
    ],
    ids=[
        "no-y",
        "no-x",
        "object",
        "x-2d",
        "x-5d",
        "n-mismatch",
        "float-labels",
        "negative",
        "y-2d",
        "nan",
        "strings",
        "lying-header",
        "huge-header",
        "truncated",
        "text",
        "2-bytes",
        "empty",
        "damaged",
        "npy",
    ],
)
def test_npz_refuses_bad_files(tmp_path, make, message):
    path = tmp_path / "data.npz"
    make(path)
    with pytest.raises(ValueError, match=r"^\[load_npz\] .*" + message):
        data.load_npz(path)


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\[load_npz\]"):
        data.load_npz(tmp_path / "missing.npz")


# ---- train_test_split and select_classes -------------------------------------------------


def _labelled(counts):
    y = np.concatenate([np.full(n, label) for label, n in enumerate(counts)])
    x = np.arange(y.size, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    return x, y


def test_split_is_stratified_disjoint_and_complete():
    x, y = _labelled([50, 31, 7, 120])
    (x_train, y_train), (x_test, y_test) = data.train_test_split(x, y, test_fraction=0.2, seed=1)
    for label, n in enumerate([50, 31, 7, 120]):
        assert np.sum(y_test == label) == round(0.2 * n)
        assert np.sum(y_train == label) == n - round(0.2 * n)
    ids_train, ids_test = x_train[:, 0].astype(int), x_test[:, 0].astype(int)
    assert not set(ids_train) & set(ids_test)
    assert sorted(set(ids_train) | set(ids_test)) == list(range(y.size))
    np.testing.assert_array_equal(y[ids_test], y_test)  # pairs stay together
    assert np.all(np.diff(ids_test) > 0)  # original order kept


def test_split_is_deterministic_for_a_seed():
    x, y = _labelled([40, 40, 40])
    first = data.train_test_split(x, y, seed=7)
    again = data.train_test_split(x, y, seed=7)
    other = data.train_test_split(x, y, seed=8)
    np.testing.assert_array_equal(first[1][0], again[1][0])
    assert not np.array_equal(first[1][0], other[1][0])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_refuses_bad_fractions(fraction):
    x, y = _labelled([10, 10])
    with pytest.raises(ValueError, match=r"\[train_test_split\] test_fraction"):
        data.train_test_split(x, y, test_fraction=fraction)


def test_split_refuses_too_few_samples_and_mismatched_lengths():
    with pytest.raises(ValueError, match=r"expected enough samples"):
        data.train_test_split(np.zeros((2, 1)), np.array([0, 1]), test_fraction=0.2)
    with pytest.raises(ValueError, match=r"\[train_test_split\] x: expected 3 samples"):
        data.train_test_split(np.zeros((2, 1)), np.array([0, 1, 1]))


def test_select_classes_remaps_in_the_given_order():
    x, y = _labelled([3, 4, 5, 6])
    xs, ys = data.select_classes(x, y, [3, 1])
    assert ys.dtype == np.int64 and xs.shape == (10, 3)
    np.testing.assert_array_equal(ys, np.where(y[np.isin(y, [1, 3])] == 3, 0, 1))
    np.testing.assert_array_equal(y[xs[:, 0].astype(int)], np.where(ys == 0, 3, 1))
    with pytest.raises(ValueError, match=r"expected labels present in the data .*, got \[9\]"):
        data.select_classes(x, y, [0, 9])
    with pytest.raises(ValueError, match=r"expected distinct labels"):
        data.select_classes(x, y, [2, 2])


# ---- DataLoader --------------------------------------------------------------------------


def test_loader_covers_every_sample_once_per_epoch():
    x, y = _labelled([13, 10])  # 23 samples
    loader = data.DataLoader(x, y, batch_size=5, seed=3)
    assert len(loader) == 5
    for _ in range(3):
        batches = list(loader)
        assert [b[0].shape[0] for b in batches] == [5, 5, 5, 5, 3]
        ids = np.concatenate([xb[:, 0] for xb, _ in batches]).astype(int)
        assert sorted(ids.tolist()) == list(range(23))
        for xb, yb in batches:
            assert xb.flags.c_contiguous and yb.flags.c_contiguous
            np.testing.assert_array_equal(y[xb[:, 0].astype(int)], yb)


def test_loader_same_seed_same_batches_new_order_each_epoch():
    x, y = _labelled([30, 30])
    a = data.DataLoader(x, y, batch_size=8, seed=11)
    b = data.DataLoader(x, y, batch_size=8, seed=11)
    epochs_a = [np.concatenate([xb[:, 0] for xb, _ in a]) for _ in range(3)]
    epochs_b = [np.concatenate([xb[:, 0] for xb, _ in b]) for _ in range(3)]
    for ea, eb in zip(epochs_a, epochs_b):
        np.testing.assert_array_equal(ea, eb)
    assert not np.array_equal(epochs_a[0], epochs_a[1])
    c = data.DataLoader(x, y, batch_size=8, seed=12)
    assert not np.array_equal(np.concatenate([xb[:, 0] for xb, _ in c]), epochs_a[0])


def test_loader_in_order_drop_last_and_noncontiguous_input():
    x = np.arange(40, dtype=np.float32).reshape(10, 4)[:, ::2]  # not C-contiguous
    y = np.arange(10)
    loader = data.DataLoader(x, y, batch_size=4, shuffle=False, drop_last=True)
    assert len(loader) == 2
    batches = list(loader)
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[1][1], [4, 5, 6, 7])
    assert all(xb.flags.c_contiguous for xb, _ in batches)
    np.testing.assert_array_equal(batches[0][0], x[:4])


def test_export_npz_holds_the_split_and_the_loaders_order_of_every_epoch(tmp_path):
    x, y = _labelled([13, 10])  # 23 samples: the last batch of 5 holds 3
    (x_train, y_train), (x_test, y_test) = data.train_test_split(x, y, seed=4)
    path = tmp_path / "run.data"  # the name as given, no .npz added
    data.export_npz(path, x_train, y_train, x_test, y_test, epochs=3, seed=9)
    with np.load(path) as contents:
        assert sorted(contents.files) == ["order", "seed", "x_test", "x_train", "y_test", "y_train"]
        got = {name: contents[name] for name in contents.files}
    for name, want in [("x_train", x_train), ("x_test", x_test)]:
        assert got[name].dtype == want.dtype
        np.testing.assert_array_equal(got[name], want)
    for name, want in [("y_train", y_train), ("y_test", y_test)]:
        assert got[name].dtype == np.int64
        np.testing.assert_array_equal(got[name], want)
    assert got["seed"].shape == () and int(got["seed"]) == 9
    # row e: the samples of the loader's pass e + 1, batch after batch, whatever the batch size
    assert got["order"].dtype == np.int64 and got["order"].shape == (3, x_train.shape[0])
    loader = data.DataLoader(x_train, y_train, batch_size=5, shuffle=True, seed=9)
    for order in got["order"]:
        batches = list(loader)
        np.testing.assert_array_equal(np.concatenate([xb for xb, _ in batches]), x_train[order])
        np.testing.assert_array_equal(np.concatenate([yb for _, yb in batches]), y_train[order])
    with pytest.raises(ValueError, match=r"\[export_npz\] epochs: expected an integer >= 1"):
        data.export_npz(path, x_train, y_train, x_test, y_test, epochs=0)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_loader_refuses_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match=r"\[DataLoader\] batch_size"):
        data.DataLoader(np.zeros((4, 1)), np.arange(4), batch_size=batch_size)
