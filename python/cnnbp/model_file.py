"""Model files: one uncompressed .npz holding the architecture (JSON) and the weights.

    architecture.npy   uint8: UTF-8 JSON {"format": "cnnbp-model", "version": 1,
                       "dtype": "float32", "layers": [{"type": "Conv2d", ...}, ...]}
    0.weight.npy ...   every parameter under its torch name, in the model's dtype
    optimizer.npy ...  (optional) an optimizer's settings as JSON, and its state per
                       parameter: optimizer.0.momentum_buffer.npy, optimizer.3.exp_avg.npy, ...

The C++ library reads and writes the same files (cnnbp/model_file.hpp). Loading is data
only: np.load(allow_pickle=False), stored (uncompressed) entries, known layer types, and
exactly the arrays the architecture implies, with their shapes and dtype; anything else is
refused with ValueError("[load] ..."). Every entry's .npy header is read and checked against
the entry's real size before NumPy allocates anything: a header or a zip directory that
declares more data than the file holds is refused, not allocated.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
import zipfile

import numpy as np
from numpy.lib import format as npy_format

from . import nn

FORMAT, VERSION = "cnnbp-model", 1


def _optimizer_arrays(model, optimizer):
    """The entries that hold `optimizer`'s settings (JSON) and state beside the model."""
    params = model.parameters()
    if len(optimizer.params) != len(params) or any(
        a is not b for a, b in zip(optimizer.params, params)
    ):
        raise ValueError(
            "[save] optimizer: expected an optimizer over this model's parameters, in order"
        )
    state = optimizer.state_dict()
    settings = {
        "type": state["type"],
        "lr": state["lr"],
        "hyperparameters": state["hyperparameters"],
        "steps": [entry.get("step") if entry else None for entry in state["state"]],
    }
    arrays = {"optimizer": np.frombuffer(json.dumps(settings).encode(), dtype=np.uint8)}
    for i, entry in enumerate(state["state"]):
        for key, value in (entry or {}).items():
            if key != "step":
                arrays[f"optimizer.{i}.{key}"] = np.ascontiguousarray(value)
    return arrays


def save(model, path, optimizer=None) -> None:
    params = model.named_parameters()
    dtypes = {p.data.dtype for _, p in params}
    if len(dtypes) > 1:
        raise TypeError(
            f"[save] model: expected one dtype for all parameters, got {sorted(map(str, dtypes))}"
        )
    dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
    architecture = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": str(dtype),
        "layers": [layer.config() for layer in model],
    }
    arrays = {"architecture": np.frombuffer(json.dumps(architecture).encode(), dtype=np.uint8)}
    arrays.update({name: np.ascontiguousarray(p.data) for name, p in params})
    if optimizer is not None:
        arrays.update(_optimizer_arrays(model, optimizer))
    path = os.fspath(path)
    # a half-written file never replaces a good one: write beside it, then rename
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _refuse(what):
    raise ValueError(f"[load] {what}")


_INT64_MAX = 2**63 - 1


def _is_int(value, minimum):
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= _INT64_MAX


def _int(spec, key, where, minimum=1):
    value = spec.get(key)
    if not _is_int(value, minimum):
        _refuse(f"{where}.{key}: expected an integer in [{minimum}, 2^63), got {value!r}")
    return value


def _pair(spec, key, where, minimum=1):
    value = spec.get(key)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(_is_int(v, minimum) for v in value)
    ):
        _refuse(f"{where}.{key}: expected a pair of integers in [{minimum}, 2^63), got {value!r}")
    return tuple(value)


def _bool(spec, key, where):
    value = spec.get(key)
    if not isinstance(value, bool):
        _refuse(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _pool(spec, where):
    """kernel_size, stride and padding of a pooling layer; padding at most half the kernel."""
    kernel, padding = _pair(spec, "kernel_size", where), _pair(spec, "padding", where, 0)
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        _refuse(
            f"{where}.padding: expected at most half the kernel size {list(kernel)}, "
            f"got {list(padding)}"
        )
    return kernel, _pair(spec, "stride", where), padding


def _build(spec, where, dtype):
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        _refuse(f'{where}: expected an object with a string "type"')
    kind = spec["type"]
    if kind == "Conv2d":
        return nn.Conv2d(
            _int(spec, "in_channels", where),
            _int(spec, "out_channels", where),
            _pair(spec, "kernel_size", where),
            _pair(spec, "stride", where),
            _pair(spec, "padding", where, 0),
            _bool(spec, "bias", where),
            dtype=dtype,
        )
    if kind == "Linear":
        return nn.Linear(
            _int(spec, "in_features", where),
            _int(spec, "out_features", where),
            _bool(spec, "bias", where),
            dtype=dtype,
        )
    if kind == "MaxPool2d":
        return nn.MaxPool2d(*_pool(spec, where))
    if kind == "AvgPool2d":
        return nn.AvgPool2d(*_pool(spec, where))
    if kind == "Dropout":
        p = spec.get("p")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            _refuse(f"{where}.p: expected a number in [0, 1], got {p!r}")
        return nn.Dropout(p)
    if kind in ("ReLU", "Sigmoid", "Tanh", "Flatten"):
        return getattr(nn, kind)()
    _refuse(f"{where}: expected a known layer type, got {kind!r}")


def _check_entry(archive, info, file_size):
    """The entry is a stored .npy of a plain numeric dtype whose header declares exactly the
    bytes the entry holds, and the entry lies within the file: NumPy allocates an array of
    the declared shape before reading it, so a lying header must not reach np.load."""
    name = info.filename
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
        _refuse(f"{name}: expected an uncompressed, unencrypted entry")
    if info.file_size != info.compress_size or info.file_size > file_size:
        _refuse(
            f"{name}: expected an entry within the file's {file_size} bytes, "
            f"got a declared size of {info.file_size}"
        )
    if not name.endswith(".npy"):
        _refuse(f"{name}: expected only .npy entries")
    with archive.open(info) as entry:
        try:
            version = npy_format.read_magic(entry)
            read_header = {
                (1, 0): npy_format.read_array_header_1_0,
                (2, 0): npy_format.read_array_header_2_0,
            }[version]
            shape, _, dtype = read_header(entry)
        except Exception as error:  # NumPy's header parser raises ValueError, SyntaxError, ...
            _refuse(
                f"{name}: expected a .npy header of version 1.0 or 2.0, got "
                f"{type(error).__name__}: {error}"
            )
        header_size = entry.tell()
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        _refuse(f"{name}: expected a numeric array, got dtype {dtype}")
    declared = math.prod(shape) * dtype.itemsize
    if declared != info.file_size - header_size:
        _refuse(
            f"{name}: expected {declared} bytes of data as its header declares "
            f"(shape {shape}, {dtype}), got {info.file_size - header_size}"
        )


def _load_optimizer(model, raw, arrays):
    """The optimizer saved beside the model, over the model's parameters, with its state."""
    from . import optim

    try:
        settings = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        _refuse(f"optimizer: expected valid JSON, got {type(error).__name__}: {error}")
    if not isinstance(settings, dict) or settings.get("type") not in ("SGD", "Adam", "AdamW"):
        _refuse(f"optimizer: expected type SGD, Adam or AdamW, got {settings!r:.80}")
    kind, hyper = settings["type"], settings.get("hyperparameters")
    optimizer_class = getattr(optim, kind)
    # every argument of the constructor but the parameters and the rate, and nothing else
    keys = set(inspect.signature(optimizer_class).parameters) - {"params", "lr"}
    if not isinstance(hyper, dict) or set(hyper) != keys:
        _refuse(f"optimizer: expected hyperparameters {sorted(keys)}, got {hyper!r:.80}")
    params = model.parameters()
    steps = settings.get("steps")
    if not isinstance(steps, list) or len(steps) != len(params):
        _refuse(f"optimizer: expected one step count per parameter ({len(params)})")
    try:
        opt = optimizer_class(params, lr=settings.get("lr"), **hyper)
        state = []
        for i, step in enumerate(steps):
            entry = {
                key.split(".", 2)[2]: arrays[key]
                for key in arrays
                if key.startswith(f"optimizer.{i}.")
            }
            if step is not None:
                entry["step"] = step
            state.append(entry or None)
        opt.load_state_dict({"type": kind, "lr": settings.get("lr"), "state": state})
    except (TypeError, ValueError) as error:
        _refuse(f"optimizer: {error}")
    return opt


def load(path, optimizer=False):
    """Rebuild the model saved at `path` (by Python's model.save or C++'s cnnbp::nn::save).

    With optimizer=True, returns (model, optimizer): the optimizer saved beside the model by
    model.save(path, optimizer=opt), over the new model's parameters and with its state
    (momentum buffers, Adam's moments and steps), or None when the file holds none."""
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_entry(archive, info, file_size)
        with np.load(path, allow_pickle=False) as contents:
            arrays = {name: contents[name] for name in contents.files}
    except ValueError as error:
        if str(error).startswith("[load]"):
            raise
        _refuse(f"file: expected a model file, got an unreadable array ({error})")
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, NotImplementedError) as error:
        _refuse(f"file: expected a .npz model file, got {type(error).__name__}: {error}")

    optimizer_raw = arrays.pop("optimizer", None)
    optimizer_arrays = {k: arrays.pop(k) for k in list(arrays) if k.startswith("optimizer.")}
    raw = arrays.pop("architecture", None)
    if raw is None:
        _refuse("file: expected an array 'architecture', got none")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        _refuse("architecture: expected a 1-D uint8 array of JSON text")
    try:
        architecture = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # ValueError: JSONDecodeError, and integers of more digits than Python converts;
        # RecursionError: nesting deeper than the decoder's stack
        _refuse(f"architecture: expected valid JSON, got {type(error).__name__}: {error}")
    if not isinstance(architecture, dict) or architecture.get("format") != FORMAT:
        _refuse(f'architecture: expected format "{FORMAT}"')
    if type(architecture.get("version")) is not int or architecture["version"] != VERSION:
        _refuse(f"architecture: expected version {VERSION}, got {architecture.get('version')!r}")
    dtype = architecture.get("dtype")
    if dtype not in ("float32", "float64"):
        _refuse(f'architecture: expected dtype "float32" or "float64", got {dtype!r}')
    layers = architecture.get("layers")
    if not isinstance(layers, list):
        _refuse('architecture: expected a list "layers"')

    # the weights the architecture asks for must be in the file before any is allocated
    for i, spec in enumerate(layers):
        if isinstance(spec, dict) and spec.get("type") in ("Conv2d", "Linear"):
            where = f"architecture: layer {i}"
            if spec["type"] == "Conv2d":
                r, s = _pair(spec, "kernel_size", where)
                count = _int(spec, "out_channels", where) * _int(spec, "in_channels", where) * r * s
            else:
                count = _int(spec, "out_features", where) * _int(spec, "in_features", where)
            weight = arrays.get(f"{i}.weight")
            if weight is None:
                _refuse(f"{i}.weight: expected an array, got none")
            if weight.size != count:
                _refuse(
                    f"{where}: expected weights that fit in the file, got {count} weights "
                    f"for an array of {weight.size}"
                )

    model = nn.Sequential(
        *(
            _build(spec, f"architecture: layer {i}", np.dtype(dtype))
            for i, spec in enumerate(layers)
        )
    )
    expected = dict(model.named_parameters())
    for name in expected:
        if name not in arrays:
            _refuse(f"{name}: expected an array, got none")
    extra = sorted(set(arrays) - set(expected))
    if extra:
        _refuse(f"file: expected only the architecture's arrays, got also {extra}")
    for name, p in expected.items():
        value = arrays[name]
        if value.dtype != np.dtype(dtype):
            _refuse(f"{name}: expected dtype {dtype}, got {value.dtype}")
        if value.shape != p.data.shape:
            _refuse(f"{name}: expected shape {p.data.shape}, got shape {value.shape}")
        p.data = np.ascontiguousarray(value)
    if not optimizer:
        return model
    if optimizer_raw is None:
        if optimizer_arrays:
            _refuse(
                f"file: expected optimizer state with its settings, got only "
                f"{sorted(optimizer_arrays)}"
            )
        return model, None
    if optimizer_raw.dtype != np.uint8 or optimizer_raw.ndim != 1:
        _refuse("optimizer: expected a 1-D uint8 array of JSON text")
    return model, _load_optimizer(model, optimizer_raw, optimizer_arrays)
