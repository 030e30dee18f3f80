"""Layers: NumPy in, NumPy out, with PyTorch's names, weight layouts and init.

Every layer keeps what its backward needs and shows it: after ``forward`` and ``backward``
a layer holds ``input``, ``output``, ``grad_output`` (dL/d output) and ``grad_input``
(dL/d input), and each of its parameters holds ``.data`` and ``.grad``. ``layer.trace()``
returns all of them by name; ``Sequential.trace()`` returns one trace per layer, so every
intermediate quantity of a network can be inspected.

Parameter gradients accumulate across backward calls, as in PyTorch, until ``zero_grad()``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from . import _core

_rng = np.random.default_rng()


def manual_seed(seed: int) -> None:
    """Seed the generator that initializes new layers' weights."""
    global _rng
    _rng = np.random.default_rng(seed)


def _int_arg(op, name, value):
    """An int argument as a Python int; its range is checked by the C++ constructor."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"[{op}] {name}: expected an int, got {value!r}")
    value = int(value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"[{op}] {name}: expected a 64-bit integer, got {value}")
    return value


def _pair_arg(op, name, value):
    """An int or an (h, w) pair of ints, as a list [h, w]."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise TypeError(f"[{op}] {name}: expected an int or a pair of ints, got {value!r}")
        return [_int_arg(op, name, v) for v in value]
    return [_int_arg(op, name, value)] * 2


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"[nn] dtype: expected float32 or float64, got {dtype}")
    return dtype


_SUFFIX = {np.dtype(np.float32): "32", np.dtype(np.float64): "64"}


def _native(name, dtype):
    """The C++ class `name` for dtype (float32 -> Conv2d32, float64 -> Conv2d64)."""
    return getattr(_core, name + _SUFFIX[dtype])


def _dtype_of(x):
    """The dtype an input selects: its own for float32/float64 arrays, else float32 (the
    C++ side then reports anything that is not a float array)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(x).dtype
        except Exception:  # noqa: BLE001 - the kernel reports what it cannot take
            return np.dtype(np.float32)
    return dtype if dtype in _SUFFIX else np.dtype(np.float32)


class Parameter:
    """A trainable array ``data`` and its accumulated gradient ``grad`` (None until a backward).

    Both are NumPy views of the C++ parameter that the layers and optimizers update, so
    in-place changes (``p.data[...] = v``) reach them; assigning ``p.data = a`` copies ``a``
    in (same shape), and ``p.grad = g`` copies ``g`` (same shape) or, with None, clears it."""

    __slots__ = ("_impl", "__weakref__")

    def __init__(self, data, *, _impl=None):
        if _impl is None:
            data = np.asarray(data)
            _impl = _native("Parameter", _check_dtype(data.dtype))(data)
        self._impl = _impl

    @property
    def data(self) -> np.ndarray:
        return self._impl.data

    @data.setter
    def data(self, value):
        target = self._impl.data
        value = np.asarray(value)
        if value.shape != target.shape:
            raise ValueError(
                f"[Parameter] data: expected shape {target.shape}, got shape {value.shape}"
            )
        np.copyto(target, value, casting="same_kind")

    @property
    def grad(self):
        return self._impl.grad

    @grad.setter
    def grad(self, value):
        if value is None:
            self._impl.clear_grad()
            return
        value = np.asarray(value)
        if value.shape != self.shape:  # as torch: a gradient has its parameter's shape
            raise ValueError(
                f"[Parameter] grad: expected shape {self.shape}, got shape {value.shape}"
            )
        np.copyto(self._impl.grad_storage(), value, casting="same_kind")

    @property
    def shape(self):
        return self._impl.data.shape

    @property
    def dtype(self):
        return self._impl.data.dtype

    def accumulate(self, grad: np.ndarray) -> None:
        """grad (+)= the given array: the first call after zero_grad sets it."""
        current = self._impl.grad
        if current is None:
            self.grad = grad
        else:
            current += grad

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


class Module:
    """Base class: forward/backward, parameters, state_dict and the per-layer trace.

    A module written in Python sets ``input``, ``output``, ``grad_output`` and
    ``grad_input`` itself; the built-in layers run in C++ and read them from there."""

    def __init__(self):
        self.input = None
        self.output = None
        self.grad_output = None
        self.grad_input = None

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError

    def backward(self, grad_output):
        raise NotImplementedError

    def named_parameters(self, prefix: str = ""):
        """(name, Parameter) pairs with PyTorch's names: "weight", "bias", "0.weight", ..."""
        return [(prefix + name, p) for name, p in self._own_parameters()]

    def _own_parameters(self):
        return [
            (name, p)
            for name in ("weight", "bias")
            if isinstance(p := getattr(self, name, None), Parameter)
        ]

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        """Forget accumulated gradients (they become None, as torch's set_to_none=True)."""
        for p in self.parameters():
            p.grad = None

    training = True  # the mode: Dropout drops only while training

    def train(self, mode: bool = True):
        """Training mode (the default) or, with mode False, evaluation mode; returns self."""
        self.training = bool(mode)
        for child in self._children():
            child.train(mode)
        return self

    def eval(self):
        """Evaluation mode: train(False)."""
        return self.train(False)

    def _children(self):
        return ()

    def state_dict(self):
        """name -> copy of the parameter array, with torch's key names."""
        return OrderedDict((name, p.data.copy()) for name, p in self.named_parameters())

    def load_state_dict(self, state_dict) -> None:
        """Copy arrays into the parameters; keys, shapes and dtypes must match exactly."""
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(
                f"[load_state_dict] state_dict: expected a mapping of names to "
                f"arrays, got {type(state_dict).__name__}"
            )
        own = OrderedDict(self.named_parameters())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise KeyError(
                f"[load_state_dict] expected keys {list(own)}, "
                f"got missing {missing}, unexpected {unexpected}"
            )
        for name, p in own.items():
            try:
                value = np.asarray(state_dict[name])
            except ValueError as error:  # ragged nested lists
                raise ValueError(
                    f"[load_state_dict] {name}: expected an array, got {error}"
                ) from None
            if value.shape != p.shape:
                raise ValueError(
                    f"[load_state_dict] {name}: expected shape {p.shape}, got shape {value.shape}"
                )
            if value.dtype != p.dtype:
                raise TypeError(f"[load_state_dict] {name}: expected {p.dtype}, got {value.dtype}")
        for name, p in own.items():
            p.data = state_dict[name]

    def trace(self):
        """What this layer saw in its last forward and backward, by name (copies)."""
        out = OrderedDict(
            input=self.input,
            output=self.output,
            grad_output=self.grad_output,
            grad_input=self.grad_input,
        )
        for name, p in self._own_parameters():
            out[name] = p.data.copy()
            out[name + ".grad"] = None if p.grad is None else p.grad.copy()
        return out

    def _as_layer(self, dtype):
        """The C++ layer that runs this module inside a C++ Sequential of `dtype`: for a
        module written in Python, a layer that calls its forward and backward."""
        impls = self.__dict__.setdefault("_python_layers", {})
        if dtype not in impls:
            impls[dtype] = _native("PythonLayer", dtype)(self)
        return impls[dtype]

    def _activate(self, dtype) -> None:
        """Read the trace from the C++ layer of `dtype` (built-in layers)."""

    def config(self):
        """The architecture entry of a model file: the type and constructor arguments."""
        return {"type": type(self).__name__}

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class _NativeModule(Module):
    """A built-in layer: a C++ layer object per dtype runs it and holds its trace.

    ``_make(dtype)`` builds the C++ layer; layers with parameters have one fixed dtype."""

    _fixed_dtype = None

    def __init__(self):  # no Python-side trace attributes: they are read from C++
        self._impls = {}
        self._impl = None  # the C++ layer of the last pass

    def _make(self, dtype):
        raise NotImplementedError

    def _native_for(self, dtype):
        impl = self._impls.get(dtype)
        if impl is None:
            impl = self._impls[dtype] = self._make(dtype)
            impl.train(self.training)
            for child in self._children():  # each keeps its own mode
                child.train(child.training)
        return impl

    def _activate(self, dtype) -> None:
        self._impl = self._native_for(dtype)

    def _as_layer(self, dtype):
        # a subclass (or instance) that redefines forward or backward runs them in Python
        redefined = (
            type(self).forward is not _NativeModule.forward
            or type(self).backward is not _NativeModule.backward
            or "forward" in self.__dict__
            or "backward" in self.__dict__
        )
        return super()._as_layer(dtype) if redefined else self._native_for(dtype)

    def train(self, mode: bool = True):
        for impl in self._impls.values():
            impl.train(bool(mode))
        return super().train(mode)

    def _impl_for_input(self, x):
        dtype = self._fixed_dtype or _dtype_of(x)
        impl = self._impl = self._native_for(dtype)
        return impl

    def forward(self, x):
        return self._impl_for_input(x).forward(x)

    def backward(self, grad_output):
        if self._impl is None:
            raise RuntimeError(f"[{type(self).__name__}] backward called before forward")
        return self._impl.backward(grad_output)

    # the trace of the last pass, read from the C++ layer (copies; None before a pass)
    def _traced(name):  # noqa: N805 - a helper that builds properties
        return property(lambda self: getattr(self._impl, name)() if self._impl else None)

    input = _traced("input")
    output = _traced("output")
    grad_output = _traced("grad_output")
    grad_input = _traced("grad_input")
    del _traced


def _weight_init(impl, dtype, shape, fan_in, bias):
    # torch's default for conv and linear: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), +),
    # drawn from cnnbp.manual_seed's generator and copied into the C++ parameters
    bound = 1.0 / math.sqrt(fan_in)
    weight = Parameter(None, _impl=impl.named_parameters()[0][1])
    weight.data = _rng.uniform(-bound, bound, size=shape).astype(dtype)
    if not bias:
        return weight, None
    out_features = shape[0]
    bias_p = Parameter(None, _impl=impl.named_parameters()[1][1])
    bias_p.data = _rng.uniform(-bound, bound, size=(out_features,)).astype(dtype)
    return weight, bias_p


class Conv2d(_NativeModule):
    """y (N, K, P, Q) = conv2d(x (N, C, H, W), weight (K, C, R, S)) + bias (K,)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        bias=True,
        dtype=np.float32,
    ):
        super().__init__()
        dtype = self._fixed_dtype = _check_dtype(dtype)
        in_channels = _int_arg("Conv2d", "in_channels", in_channels)
        out_channels = _int_arg("Conv2d", "out_channels", out_channels)
        # [h, w] pairs, checked once; the model file's form
        self._pairs = {
            name: _pair_arg("Conv2d", name, value)
            for name, value in (
                ("kernel_size", kernel_size),
                ("stride", stride),
                ("padding", padding),
            )
        }
        r, s = self._pairs["kernel_size"]
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (r, s), stride, padding
        impl = self._impl = self._impls[dtype] = _native("Conv2d", dtype)(
            in_channels, out_channels, *self._pairs.values(), bool(bias)
        )
        self.weight, self.bias = _weight_init(
            impl, dtype, (out_channels, in_channels, r, s), in_channels * r * s, bias
        )

    def config(self):
        """The architecture entry of a model file."""
        return {
            "type": "Conv2d",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            **self._pairs,
            "bias": self.bias is not None,
        }

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )


class _Pool2d(_NativeModule):
    """A pooling layer over kernel_size windows; stride defaults to kernel_size, as torch's."""

    _native_name = None  # "MaxPool2d", "AvgPool2d": the C++ layer and the model file's type

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        name = self._native_name
        # [h, w] pairs, checked once; the model file's form
        self._pairs = {
            "kernel_size": _pair_arg(name, "kernel_size", kernel_size),
            "stride": _pair_arg(name, "stride", kernel_size if stride is None else stride),
            "padding": _pair_arg(name, "padding", padding),
        }

    def _make(self, dtype):
        return _native(self._native_name, dtype)(*self._pairs.values())

    def config(self):
        return {"type": self._native_name, **self._pairs}

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """y, argmax = max over each kernel_size window; backward routes dL/dy to the argmax."""

    _native_name = "MaxPool2d"

    @property
    def indices(self):
        """argmax of the last forward: flat h*W+w per input plane, shaped like the output."""
        return self._impl.indices() if self._impl else None

    def trace(self):
        out = super().trace()
        out["indices"] = self.indices
        return out


class AvgPool2d(_Pool2d):
    """y = the mean over each kernel_size window, padding counted as zeros (torch's
    count_include_pad=True); backward spreads dL/dy evenly over each window."""

    _native_name = "AvgPool2d"


class ReLU(_NativeModule):
    """a = max(z, 0); dz = da where z > 0."""

    def _make(self, dtype):
        return _native("ReLU", dtype)()


class Sigmoid(_NativeModule):
    """a = 1 / (1 + exp(-z)); dz = da * a * (1 - a), from the output a."""

    def _make(self, dtype):
        return _native("Sigmoid", dtype)()


class Tanh(_NativeModule):
    """a = tanh(z); dz = da * (1 - a * a), from the output a."""

    def _make(self, dtype):
        return _native("Tanh", dtype)()


class Dropout(_NativeModule):
    """While training: each element zeroed with probability p, the rest scaled by
    1 / (1 - p); in eval() mode, the identity. Each training forward draws a new mask;
    the masks follow from cnnbp.manual_seed (or seed=), like the weights."""

    def __init__(self, p: float = 0.5, seed: int | None = None):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)):
            raise TypeError(f"[Dropout] p: expected a probability in [0, 1], got {p!r}")
        if not 0 <= p <= 1:
            raise ValueError(f"[Dropout] p: expected a probability in [0, 1], got {p!r}")
        self.p = float(p)
        # the seed of the layer's own stream of mask seeds, one stream per dtype
        self._seed = int(_rng.integers(0, 2**63)) if seed is None else int(seed)

    def _make(self, dtype):
        return _native("Dropout", dtype)(self.p, self._seed)

    @property
    def mask(self):
        """Which elements the last training forward kept (bool, the input's shape)."""
        return self._impl.mask() if self._impl else None

    def trace(self):
        out = super().trace()
        out["mask"] = self.mask
        return out

    def config(self):
        return {"type": "Dropout", "p": self.p}

    def extra_repr(self):
        return f"p={self.p}"


class Flatten(_NativeModule):
    """F (N, C*H*W) = x (N, C, H, W) reshaped (torch's Flatten with start_dim=1)."""

    def _make(self, dtype):
        return _native("Flatten", dtype)()


class Linear(_NativeModule):
    """y (*, out) = x (*, in) . weight (out, in)^T + bias (out,)."""

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32):
        super().__init__()
        dtype = self._fixed_dtype = _check_dtype(dtype)
        in_features = _int_arg("Linear", "in_features", in_features)
        out_features = _int_arg("Linear", "out_features", out_features)
        self.in_features, self.out_features = in_features, out_features
        impl = self._impl = self._impls[dtype] = _native("Linear", dtype)(
            in_features, out_features, bool(bias)
        )
        self.weight, self.bias = _weight_init(
            impl, dtype, (out_features, in_features), in_features, bias
        )

    def config(self):
        return {
            "type": "Linear",
            "in_features": int(self.in_features),
            "out_features": int(self.out_features),
            "bias": self.bias is not None,
        }

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class Sequential(_NativeModule):
    """Layers applied in order; backward runs them in reverse. Names are "0", "1", ...

    A C++ Sequential runs the layers (modules written in Python included, called back);
    ``train_step`` runs a whole training step in one call."""

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(
                    f"[Sequential] layer {i}: expected an nn.Module, got {type(layer).__name__}"
                )
        self.layers = tuple(layers)
        dtypes = {p.dtype for p in self.parameters()}
        if len(dtypes) > 1:
            raise TypeError(
                f"[Sequential] parameters: expected one dtype, got {sorted(str(d) for d in dtypes)}"
            )
        self._fixed_dtype = dtypes.pop() if dtypes else None
        self._step = None  # train_step's bound C++ call, for the last loss and optimizer

    def _make(self, dtype):
        impl = _native("Sequential", dtype)()
        for layer in self.layers:
            impl.add(layer._as_layer(dtype))
        return impl

    def _impl_for_input(self, x):
        dtype = self._fixed_dtype or _dtype_of(x)
        impl = self._impls.get(dtype)
        if impl is None:
            impl = self._native_for(dtype)
        if impl is not self._impl:  # the layers' traces now come from this dtype's objects
            self._activate(dtype)
        return impl

    def _activate(self, dtype) -> None:
        self._impl = self._native_for(dtype)
        self._step = None
        for layer in self.layers:
            layer._activate(dtype)

    def _children(self):
        return self.layers

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def named_parameters(self, prefix: str = ""):
        return [
            pair
            for i, layer in enumerate(self.layers)
            for pair in layer.named_parameters(f"{prefix}{i}.")
        ]

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.zero_grad()

    def train_step(self, x, y, loss_fn, optimizer) -> float:
        """One training step: zero_grad, forward, loss, backward, optimizer.step(); returns
        the loss. The same as the four calls written out, in one call into C++."""
        cached = self._step
        if (
            cached is not None
            and cached[0] is loss_fn
            and cached[1] is optimizer
            and cached[2] is getattr(x, "dtype", None)
        ):
            loss_fn._impl = cached[3]  # the loss's trace is this step's
            return cached[4](x, y)
        return self._first_train_step(x, y, loss_fn, optimizer)

    def _first_train_step(self, x, y, loss_fn, optimizer) -> float:
        impl = self._impl_for_input(x)
        dtype = self._fixed_dtype or _dtype_of(x)
        native_optimizer = optimizer._native_for(dtype)
        if native_optimizer is None:  # parameters of both dtypes: the calls one by one
            self.zero_grad()
            loss = loss_fn(self.forward(x), y)
            self.backward(loss_fn.backward())
            optimizer.step()
            return loss
        native_loss = loss_fn._impl_for_dtype(dtype)
        step = _native("TrainStep", dtype)(impl, native_loss, native_optimizer)
        self._step = (loss_fn, optimizer, getattr(x, "dtype", None), native_loss, step)
        return step(x, y)

    def save(self, path, optimizer=None) -> None:
        """Write the architecture and weights to one .npz model file (cnnbp.load reads it,
        and so does the C++ library). A temporary file is renamed over `path`. With an
        optimizer over this model's parameters, its settings and state go in the file too
        (cnnbp.load(path, optimizer=True) gives them back)."""
        from .model_file import save

        save(self, path, optimizer)

    def trace(self):
        """One trace per layer: [(name, {"input": ..., "output": ..., ...}), ...]."""
        return [(str(i), layer.trace()) for i, layer in enumerate(self.layers)]

    def __repr__(self):
        inner = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"


class _Loss:
    """A loss remembers its arguments so that ``backward()`` needs none. A C++ loss object
    per dtype computes it and keeps the trace."""

    def __init__(self):
        self._impls = {}
        self._impl = None

    def _impl_for_dtype(self, dtype):
        impl = self._impls.get(dtype)
        if impl is None:
            impl = self._impls[dtype] = _native(self._native_name, dtype)()
        self._impl = impl
        return impl

    def __call__(self, input, target) -> float:
        return self.forward(input, target)

    def forward(self, input, target) -> float:
        return self._impl_for_dtype(_dtype_of(input)).forward(input, target)

    def backward(self, grad_loss: float = 1.0):
        """dL/d input of the last call, scaled by dL/d loss (1 when the loss is the objective)."""
        if self._impl is None or not self._impl.has_run():
            raise RuntimeError(f"[{type(self).__name__}] backward called before forward")
        return self._impl.backward(float(grad_loss))

    def _traced(name):  # noqa: N805 - a helper that builds properties
        return property(
            lambda self: (
                getattr(self._impl, name)() if self._impl and self._impl.has_run() else None
            )
        )

    input = _traced("input")
    target = _traced("target")
    loss = _traced("value")
    grad_input = _traced("grad_input")
    del _traced

    def trace(self):
        return OrderedDict(
            input=self.input, target=self.target, loss=self.loss, grad_input=self.grad_input
        )

    def __repr__(self):
        return f"{type(self).__name__}()"


class BCELoss(_Loss):
    """Mean binary cross-entropy of probabilities (torch.nn.BCELoss)."""

    _native_name = "BCELoss"  # subclasses keep the C++ loss of their base


class BCEWithLogitsLoss(_Loss):
    """Mean binary cross-entropy of sigmoid(logits), computed stably (torch.nn.BCEWithLogitsLoss)."""

    _native_name = "BCEWithLogitsLoss"


class CrossEntropyLoss(_Loss):
    """Mean softmax cross-entropy of logits (N, K) against class indices (N,)."""

    _native_name = "CrossEntropyLoss"


__all__ = [
    "Parameter",
    "Module",
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "Dropout",
    "Flatten",
    "Linear",
    "Sequential",
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "manual_seed",
]
