"""Data for training: image datasets as NumPy arrays, splits and minibatches.

    x, y = data.load_digits()                        # (1797, 1, 8, 8) in [0, 1], labels 0..9
    x, y = data.load_mnist("mnist/", split="train")  # IDX files, plain or .gz (also Fashion-MNIST)
    x, y = data.load_npz("my_images.npz")            # arrays "x" (N, C, H, W) or (N, H, W), "y" (N,)
    (x_train, y_train), (x_test, y_test) = data.train_test_split(x, y, test_fraction=0.2, seed=0)
    x01, y01 = data.select_classes(x, y, [0, 1])     # two classes, labels remapped to 0 and 1
    for xb, yb in data.DataLoader(x_train, y_train, batch_size=32, shuffle=True, seed=0):
        loss = model.train_step(xb, yb, loss_fn, optimizer)
    data.export_npz("run.npz", x_train, y_train, x_test, y_test, epochs=25, seed=0)
                                                     # the split and each epoch's order, for C++

Images come out NCHW, C-contiguous, in the requested float dtype (float32 by default);
labels come out int64. Loaders read data only (never unpickle) and refuse malformed files
with ValueError("[load_...] <what>: expected ..., got ...").
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib

import numpy as np

from ._text import count

_EXTRA_HINT = 'install the datasets extra: pip install "cnnbp[datasets]"'


def _float_dtype(dtype, where):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"[{where}] dtype: expected float32 or float64, got {dtype}")
    return dtype


# ---- scikit-learn's 8x8 digits --------------------------------------------------------------


def load_digits(dtype=np.float32):
    """The 1797 8x8 handwritten digits bundled with scikit-learn (no download).

    Returns x (1797, 1, 8, 8) scaled from 0..16 to [0, 1] and y (1797,) int64 in 0..9.
    """
    dtype = _float_dtype(dtype, "load_digits")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise ImportError(
            f"[load_digits] scikit-learn is needed for the digits dataset: {_EXTRA_HINT}"
        ) from error
    digits = sklearn_load_digits()
    images = np.asarray(digits.images)  # (1797, 8, 8), values 0..16
    x = np.ascontiguousarray((images / 16.0).astype(dtype)[:, None, :, :])
    y = np.asarray(digits.target, dtype=np.int64)
    return x, y


# ---- MNIST-format IDX files ---------------------------------------------------------------

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims (count, rows, columns)
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim (count)
_READ_CHUNK = 1 << 20


def _find_idx_file(directory, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"[load_mnist] {stem}: expected {stem} or {stem}.gz in {directory!r}, got neither"
    )


def _read_exactly(stream, size, name, dims):
    """Read `size` bytes, growing the buffer only as data actually arrives, so a header
    that claims more than the file holds never makes us allocate it."""
    chunks, have = [], 0
    while have < size:
        chunk = stream.read(min(_READ_CHUNK, size - have))
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    if have != size:
        raise ValueError(
            f"[load_mnist] {name}: expected {size} data bytes for dimensions {dims}, got {have}"
        )
    return b"".join(chunks)


def _read_idx(path, magic, ndim):
    """The array in one IDX file (unsigned bytes), header checked against the file length."""
    name = os.path.basename(path)
    compressed = path.endswith(".gz")
    header_size = 4 + 4 * ndim
    try:
        stream = gzip.open(path, "rb") if compressed else open(path, "rb")
        with stream:
            header = stream.read(header_size)
            if len(header) < 4:
                raise ValueError(
                    f"[load_mnist] {name}: expected an IDX header of "
                    f"{header_size} bytes, got {len(header)} bytes"
                )
            got_magic = int.from_bytes(header[:4], "big")
            if got_magic != magic:
                raise ValueError(
                    f"[load_mnist] {name}: expected magic number 0x{magic:08x}, "
                    f"got 0x{got_magic:08x}"
                )
            if len(header) < header_size:
                raise ValueError(
                    f"[load_mnist] {name}: expected an IDX header of "
                    f"{header_size} bytes, got {len(header)} bytes"
                )
            dims = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
            if any(d == 0 for d in dims):
                raise ValueError(f"[load_mnist] {name}: expected non-zero dimensions, got {dims}")
            size = int(np.prod(dims, dtype=object))
            if not compressed:
                # the length is known before reading: refuse a header that does not fit it
                available = os.fstat(stream.fileno()).st_size - header_size
                if available != size:
                    raise ValueError(
                        f"[load_mnist] {name}: expected {size} data bytes for "
                        f"dimensions {dims}, got {available}"
                    )
            body = _read_exactly(stream, size, name, dims)
            if stream.read(1):
                raise ValueError(
                    f"[load_mnist] {name}: expected {size} data bytes for "
                    f"dimensions {dims}, got more"
                )
    except (OSError, EOFError, zlib.error) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(
            f"[load_mnist] {name}: expected a readable IDX file, "
            f"got {type(error).__name__}: {error}"
        ) from error
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_mnist(directory, split="train", dtype=np.float32):
    """MNIST (or Fashion-MNIST, or any MNIST-format) IDX files from `directory`.

    split "train" reads train-images-idx3-ubyte / train-labels-idx1-ubyte, split "test"
    reads t10k-images-idx3-ubyte / t10k-labels-idx1-ubyte, each plain or gzipped (.gz).
    Returns x (N, 1, rows, cols) scaled from 0..255 to [0, 1] and y (N,) int64.
    """
    dtype = _float_dtype(dtype, "load_mnist")
    if split not in _IDX_FILES:
        raise ValueError(f"[load_mnist] split: expected 'train' or 'test', got {split!r}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"[load_mnist] directory: expected a directory holding the IDX files, got {directory!r}"
        )
    images_stem, labels_stem = _IDX_FILES[split]
    images = _read_idx(_find_idx_file(directory, images_stem), _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(_find_idx_file(directory, labels_stem), _IDX_LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"[load_mnist] {split}: expected as many labels as images "
            f"({images.shape[0]}), got {labels.shape[0]}"
        )
    x = (images.astype(dtype) / dtype.type(255))[:, None, :, :]
    return np.ascontiguousarray(x), labels.astype(np.int64)


# ---- any .npz of images and labels -----------------------------------------------------


def _labels(y, where):
    if y.ndim != 1:
        raise ValueError(f"[{where}] y: expected 1 dim (N,), got shape {y.shape}")
    if y.dtype.kind in "iu":
        labels = y.astype(np.int64)
    elif y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        labels = y.astype(np.int64)  # whole numbers stored as floats
    else:
        raise ValueError(f"[{where}] y: expected integer class labels, got {y.dtype} values")
    if labels.size and labels.min() < 0:
        raise ValueError(f"[{where}] y: expected labels >= 0, got {labels.min()}")
    return labels


def _archive_problem(path):
    """What keeps the file at `path` from being a zip archive, in the words the model file
    reader uses for the same file (cpp/src/npz.cpp), or None. A .npy file is left to np.load,
    which refuses it by name."""
    with open(path, "rb") as stream:
        if stream.read(6) == b"\x93NUMPY":
            return None
    size = os.path.getsize(path)
    if size < 22:  # the end-of-archive record alone is 22 bytes
        return count(size, "byte")
    if not zipfile.is_zipfile(path):
        return "no zip directory (truncated?)"
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return "a corrupt zip directory"
    return None


def _entry_problem(error):
    """An archive entry that could not be read, said as the model file reader says it."""
    if isinstance(error, (EOFError, zlib.error)) or "Truncated" in str(error):
        return "expected an entry within the file, got one that runs past its end (truncated?)"
    if isinstance(error, zipfile.BadZipFile) and "CRC" in str(error):
        return "expected its checksum, got other data (the file is damaged)"
    return (
        "expected a numeric array (pickled data is never loaded), "
        f"got {type(error).__name__}: {error}"
    )


def load_npz(path, dtype=np.float32):
    """Images and labels from a .npz holding arrays "x" and "y".

    x: (N, C, H, W), or (N, H, W) which becomes (N, 1, H, W); uint8 images are scaled from
    0..255 to [0, 1], other numeric types are converted as they are. y: (N,) non-negative
    integer labels (integer dtype, or floats holding whole numbers). Extra arrays are ignored.
    """
    dtype = _float_dtype(dtype, "load_npz")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"[load_npz] {path}: expected a .npz file, got no such file")
    name = os.path.basename(path)
    problem = _archive_problem(path)
    if problem is not None:
        raise ValueError(f"[load_npz] {name}: expected a readable .npz archive, got {problem}")
    # NumPy reads the archive: allow_pickle=False refuses object arrays (and pickle files),
    # and each member is read only when it is asked for
    try:
        contents = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"[load_npz] {name}: expected a readable .npz archive, "
            f"got {type(error).__name__}: {error}"
        ) from error
    if not isinstance(contents, np.lib.npyio.NpzFile):
        raise ValueError(
            f"[load_npz] {name}: expected a readable .npz archive, got a single .npy array"
        )
    arrays = {}
    with contents:
        for key in ("x", "y"):
            if key not in contents.files:
                raise ValueError(
                    f"[load_npz] {key}: expected arrays 'x' and 'y', got {sorted(contents.files)}"
                )
        for key in ("x", "y"):
            try:
                arrays[key] = contents[key]
            except (
                ValueError,
                OSError,
                EOFError,
                MemoryError,
                zipfile.BadZipFile,
                zlib.error,
            ) as error:
                raise ValueError(f"[load_npz] {key}: {_entry_problem(error)}") from error

    x, y = arrays["x"], arrays["y"]
    if x.ndim == 3:
        x = x[:, None, :, :]
    if x.ndim != 4:
        raise ValueError(
            f"[load_npz] x: expected 4 dims (N, C, H, W) or 3 dims (N, H, W), got shape {x.shape}"
        )
    if x.dtype.kind not in "biuf":
        raise ValueError(f"[load_npz] x: expected numeric images, got {x.dtype}")
    labels = _labels(y, "load_npz")
    if x.shape[0] != labels.shape[0]:
        raise ValueError(
            f"[load_npz] y: expected one label per image ({x.shape[0]}), got {labels.shape[0]}"
        )
    if x.shape[0] == 0:
        raise ValueError("[load_npz] x: expected at least one image, got 0")
    images = x.astype(dtype) / dtype.type(255) if x.dtype == np.uint8 else x.astype(dtype)
    if not np.all(np.isfinite(images)):
        raise ValueError("[load_npz] x: expected finite values, got NaN or infinity")
    return np.ascontiguousarray(images), labels


# ---- splits and minibatches ------------------------------------------------------------


def _check_pair(x, y, where):
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"[{where}] y: expected 1 dim (N,), got shape {y.shape}")
    if x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"[{where}] x: expected {y.shape[0]} samples like y, got shape {x.shape}")
    return x, y


def train_test_split(x, y, test_fraction=0.2, seed=0):
    """Split into (x_train, y_train), (x_test, y_test), stratified: each class puts
    round(test_fraction * its count) samples into the test part, chosen by `seed`.
    Both parts keep the original order of the samples. Deterministic for a seed."""
    x, y = _check_pair(x, y, "train_test_split")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"[train_test_split] test_fraction: expected a value in (0, 1), got {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    test = np.zeros(y.shape[0], dtype=bool)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        count = int(round(test_fraction * members.size))
        test[rng.permutation(members)[:count]] = True
    if test.all() or not test.any():
        raise ValueError(
            f"[train_test_split] x: expected enough samples for a training and "
            f"a test part at test_fraction {test_fraction}, got {y.shape[0]}"
        )
    train_index, test_index = np.flatnonzero(~test), np.flatnonzero(test)
    return (x[train_index], y[train_index]), (x[test_index], y[test_index])


def select_classes(x, y, classes):
    """Only the samples whose label is in `classes`, relabelled 0..k-1 in that order:
    select_classes(x, y, [3, 8]) makes 3 -> 0 and 8 -> 1."""
    x, y = _check_pair(x, y, "select_classes")
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"[select_classes] classes: expected distinct labels, got {classes}")
    mapping = {c: i for i, c in enumerate(classes)}
    present = set(np.unique(y).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(
            f"[select_classes] classes: expected labels present in the data "
            f"({sorted(present)}), got {missing}"
        )
    keep = np.flatnonzero(np.isin(y, classes))
    kept = y[keep]
    remapped = np.empty(keep.size, dtype=np.int64)
    for label, index in mapping.items():
        remapped[kept == label] = index
    return x[keep], remapped


def _pass_order(rng, n, shuffle):
    """One pass's order over n samples: rng's next permutation, or 0..n-1 (rng untouched).
    DataLoader and DistributedSampler both draw it, so a sampler's passes are the loader's."""
    return rng.permutation(n) if shuffle else np.arange(n, dtype=np.int64)


class DataLoader:
    """Minibatches (xb, yb) of x and y, C-contiguous, in a fresh order every epoch.

    With shuffle=True the order comes from one generator seeded once here, so the k-th
    pass over the loader is the same in every run with the same seed, and different from
    the passes before it. len(loader) is the number of batches per epoch; drop_last
    leaves out a last batch smaller than batch_size.
    """

    def __init__(self, x, y, batch_size=64, shuffle=True, seed=0, drop_last=False, sampler=None):
        x, y = _check_pair(x, y, "DataLoader")
        if sampler is not None and sampler.n != y.shape[0]:
            raise ValueError(
                f"[DataLoader] sampler: expected one over {y.shape[0]} samples, "
                f"got one over {sampler.n}"
            )
        if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
            raise ValueError(
                f"[DataLoader] batch_size: expected an integer >= 1, got {batch_size!r}"
            )
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.sampler = sampler
        self._rng = np.random.default_rng(seed)

    def _count(self):
        return len(self.sampler) if self.sampler is not None else self.y.shape[0]

    def __len__(self):
        n = self._count()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def next_order(self):
        """The order in which the next pass yields the samples (int64 indices into x and y),
        taken from the loader's generator as that pass would take it: a fresh permutation
        with shuffle=True, else 0..N-1 (the generator untouched); with a sampler, the
        sampler's next order (its shuffle and seed, the loader's unused). __iter__ calls it."""
        if self.sampler is not None:
            return self.sampler.next_order()
        return _pass_order(self._rng, self.y.shape[0], self.shuffle)

    def __iter__(self):
        n = self._count()
        order = self.next_order() if self.shuffle or self.sampler is not None else None
        for b in range(len(self)):
            start, stop = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if order is None:
                yield (
                    np.ascontiguousarray(self.x[start:stop]),
                    np.ascontiguousarray(self.y[start:stop]),
                )
            else:
                index = order[start:stop]
                yield np.ascontiguousarray(self.x[index]), np.ascontiguousarray(self.y[index])


class DistributedSampler:
    """One process's share of each pass over n samples, as torch's DistributedSampler:
    the pass's order (the permutation DataLoader(..., shuffle=True, seed=seed) would draw
    in the same pass, or 0..n-1 without shuffle) is padded by repeating its head to a
    multiple of num_replicas (or cut to one with drop_last), and rank r takes every
    num_replicas-th index from position r. The shares of one pass are disjoint (but for
    the padding) and of equal length, len(sampler).

    Given to DataLoader(x, y, batch_size=B // num_replicas, sampler=...) on every rank,
    step s's batches of all ranks together are exactly the single-process batch s of
    batch size B (positions s*B .. (s+1)*B of the padded order). Each pass draws the next
    permutation, as DataLoader does, so set_epoch is not needed; set_epoch(e) makes the next
    pass the e-th (from 0), as torch's does.
    """

    def __init__(self, n, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=False):
        if not (isinstance(n, (int, np.integer)) and n >= 1):
            raise ValueError(f"[DistributedSampler] n: expected an integer >= 1, got {n!r}")
        if not (isinstance(num_replicas, (int, np.integer)) and num_replicas >= 1):
            raise ValueError(
                f"[DistributedSampler] num_replicas: expected an integer >= 1, got {num_replicas!r}"
            )
        if not (isinstance(rank, (int, np.integer)) and 0 <= rank < num_replicas):
            raise ValueError(
                f"[DistributedSampler] rank: expected an integer in [0, {num_replicas}), "
                f"got {rank!r}"
            )
        if drop_last and n < num_replicas:
            raise ValueError(
                f"[DistributedSampler] n: expected at least num_replicas ({num_replicas}) "
                f"samples with drop_last, got {n}"
            )
        self.n, self.num_replicas, self.rank = int(n), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        per_rank = self.n // self.num_replicas if drop_last else -(-self.n // self.num_replicas)
        self.num_samples, self.total_size = per_rank, per_rank * self.num_replicas
        self.set_epoch(0)

    def set_epoch(self, epoch):
        """Make the next pass the pass `epoch` (0 for the first)."""
        self._rng = np.random.default_rng(self.seed)
        for _ in range(int(epoch)):
            self.global_order()

    def __len__(self):
        return self.num_samples

    def global_order(self):
        """The next pass's padded order over all ranks (total_size indices); draws it."""
        n = self.n
        order = _pass_order(self._rng, n, self.shuffle)
        if self.total_size > n:  # pad with the head, repeated as often as needed
            order = np.concatenate([order, np.resize(order, self.total_size - n)])
        return order[: self.total_size]

    def next_order(self):
        """This rank's indices for the next pass: global_order()[rank::num_replicas]."""
        return np.ascontiguousarray(self.global_order()[self.rank :: self.num_replicas])

    def __iter__(self):
        return iter(self.next_order().tolist())


# ---- the data of a training run, for a program outside Python -------------------------------


def export_npz(path, x_train, y_train, x_test, y_test, epochs, seed=0):
    """Write one uncompressed .npz with what a training run on this data draws from NumPy:

        x_train (n, C, H, W), y_train (n,) int64, x_test (m, C, H, W), y_test (m,) int64
        order   (epochs, n) int64: row e lists the training samples (indices into x_train)
                in the order DataLoader(x_train, y_train, shuffle=True, seed=seed) yields
                them in its pass e + 1; batch b of a pass is order[e, b*B : (b+1)*B]
        seed    () int64: `seed`, for the weights (cnnbp.manual_seed)

    NumPy's Generator.permutation is not reproduced outside NumPy, so the orders are written
    out: a C++ program that reads the file (cnnbp::nn::NpzFile) draws the same minibatches
    (examples/cpp/train_lenet.cpp; `cnnbp train --export-data` writes its run's data).
    Images keep their dtype; labels become int64.
    """
    x_train, y_train = _check_pair(x_train, y_train, "export_npz")
    x_test, y_test = _check_pair(x_test, y_test, "export_npz")
    if not (isinstance(epochs, (int, np.integer)) and epochs >= 1):
        raise ValueError(f"[export_npz] epochs: expected an integer >= 1, got {epochs!r}")
    loader = DataLoader(x_train, y_train, shuffle=True, seed=seed)
    order = np.stack([loader.next_order() for _ in range(int(epochs))]).astype(np.int64)
    with open(os.fspath(path), "wb") as stream:  # the name as given (savez would add .npz)
        np.savez(
            stream,
            x_train=np.ascontiguousarray(x_train),
            y_train=np.ascontiguousarray(y_train, dtype=np.int64),
            x_test=np.ascontiguousarray(x_test),
            y_test=np.ascontiguousarray(y_test, dtype=np.int64),
            order=order,
            seed=np.array(seed, dtype=np.int64),
        )


__all__ = [
    "load_digits",
    "load_mnist",
    "load_npz",
    "train_test_split",
    "select_classes",
    "DataLoader",
    "DistributedSampler",
    "export_npz",
]
