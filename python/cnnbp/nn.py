"""Layers: NumPy in, NumPy out, with PyTorch's names, weight layouts and init.

Every layer keeps what its backward needs and shows it: after ``forward`` and ``backward``
a layer holds ``input``, ``output``, ``grad_output`` (dL/d output) and ``grad_input``
(dL/d input), and each of its parameters holds ``.data`` and ``.grad``. ``layer.trace()``
returns all of them by name; ``Sequential.trace()`` returns one trace per layer, so every
intermediate quantity of a network can be inspected.

Parameter gradients accumulate across backward calls, as in PyTorch, until ``zero_grad()``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
import threading
import weakref
from collections import OrderedDict

import numpy as np

from . import _core
from ._native import check_dtype, dtype_of, native


class no_grad(contextlib.ContextDecorator):
    """Forwards without gradients, as torch.no_grad: inside ``with cnnbp.no_grad():`` (or a
    function decorated with it) forwards on this thread keep nothing for a backward. The
    layers' traces then hold no inputs, a container recycles the outputs it has passed on,
    so inference runs on a few buffers that stay in cache, and a Sequential runs a Conv2d
    with the eval-mode BatchNorm2d and ReLU after it (a Residual with its ReLU) as one pass
    (the layers it stands for show no output). The outputs are the same bits; the model's
    own output stays in its trace, and ``backward`` after such a forward raises as before
    any forward."""

    _previous = threading.local()  # per thread, the modes to restore, innermost last

    def __enter__(self):
        stack = self._previous.__dict__.setdefault("stack", [])
        stack.append(_core.grad_enabled())
        _core.set_grad_enabled(False)

    def __exit__(self, *exc_info):
        _core.set_grad_enabled(self._previous.stack.pop())
        return False


def is_grad_enabled() -> bool:
    """False inside ``no_grad`` on this thread (torch.is_grad_enabled)."""
    return _core.grad_enabled()


def manual_seed(seed: int) -> None:
    """Seed the one generator (in C++) that initializes new layers' weights and Dropout's
    seeds: the same seed gives the same layers in Python and in C++
    (cnnbp::nn::manual_seed)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"[manual_seed] seed: expected an int, got {seed!r}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"[manual_seed] seed: expected an int in [0, 2^64), got {seed}")
    _core.manual_seed(int(seed))


class Parameter:
    """A trainable array ``data`` and its accumulated gradient ``grad`` (None until a backward).

    Both are NumPy views of the C++ parameter that the layers and optimizers update, so
    in-place changes (``p.data[...] = v``) reach them; assigning ``p.data = a`` copies ``a``
    in (same shape), and ``p.grad = g`` copies ``g`` (same shape) or, with None, clears it.

    A layer's parameter pickles as that attribute of its layer (the layer pickles once, so
    an optimizer pickled with its model still updates that model's parameters); a parameter
    of no layer pickles as a copy of its data. The gradient is not kept, as torch's."""

    __slots__ = ("_impl", "_owner", "__weakref__")

    def __init__(self, data, *, _impl=None, _owner=None):
        if _impl is None:
            data = np.asarray(data)
            _impl = native("Parameter", check_dtype(data.dtype))(data)
        self._impl = _impl
        self._owner = _owner  # (weak reference to the layer, attribute name), or None

    def __reduce__(self):
        layer = self._owner[0]() if self._owner is not None else None
        if layer is not None and getattr(layer, self._owner[1], None) is self:
            return (getattr, (layer, self._owner[1]))
        return (Parameter, (self.data.copy(),))

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

    def named_buffers(self, prefix: str = ""):
        """(name, array) pairs of the state that is not trained but saved, with torch's names:
        "running_mean", "1.num_batches_tracked", ... (NumPy views: in-place changes reach
        the layer)."""
        return [(prefix + name, b) for name, b in self._own_buffers()]

    def _own_buffers(self):
        return []

    def buffers(self):
        return [b for _, b in self.named_buffers()]

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
        """name -> copy of each parameter and buffer array, with torch's key names and order
        (module by module, its parameters then its buffers)."""
        state = [(name, p.data) for name, p in self.named_parameters()]
        return OrderedDict(
            (name, a.copy()) for name, a in _torch_order(state, self.named_buffers())
        )

    def load_state_dict(self, state_dict) -> None:
        """Copy arrays into the parameters; keys, shapes and dtypes must match exactly."""
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(
                f"[load_state_dict] state_dict: expected a mapping of names to "
                f"arrays, got {type(state_dict).__name__}"
            )
        own = OrderedDict((name, p.data) for name, p in self.named_parameters())
        own.update(self.named_buffers())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise KeyError(
                f"[load_state_dict] expected keys {list(own)}, "
                f"got missing {missing}, unexpected {unexpected}"
            )
        for name, target in own.items():
            try:
                value = np.asarray(state_dict[name])
            except ValueError as error:  # ragged nested lists
                raise ValueError(
                    f"[load_state_dict] {name}: expected an array, got {error}"
                ) from None
            if value.shape != target.shape:
                raise ValueError(
                    f"[load_state_dict] {name}: expected shape {target.shape}, "
                    f"got shape {value.shape}"
                )
            if value.dtype != target.dtype:
                raise TypeError(
                    f"[load_state_dict] {name}: expected {target.dtype}, got {value.dtype}"
                )
        for name, target in own.items():
            np.copyto(target, state_dict[name])

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
            impls[dtype] = native("PythonLayer", dtype)(self)
        return impls[dtype]

    def _activate(self, dtype) -> None:
        """Read the trace from the C++ layer of `dtype` (built-in layers)."""

    def to_onnx(self, path, input_shape):
        """Write this module's eval-mode network to `path` as ONNX (opset 17, float32), for
        inputs (N, *input_shape) with the batch dim N free: input_shape is (C, H, W) for
        images. Needs the onnx package (pip install 'cnnbp[onnx]'); a layer ONNX cannot
        express raises ValueError naming it. Returns the onnx.ModelProto."""
        from . import onnx_export  # imports onnx: only when a model is exported

        return onnx_export.export(self, path, input_shape)

    def config(self):
        """The architecture entry of a model file: the type and constructor arguments."""
        return {"type": type(self).__name__}

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def __getstate__(self):
        # a module written in Python pickles its attributes; the C++ layers that call it
        # back are made again when it next runs inside a Sequential
        state = dict(self.__dict__)
        state.pop("_python_layers", None)
        return state


def _model_file_bytes(model):
    """The bytes of the model file `model` (a Sequential) saves."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.npz")
        model.save(path)
        with open(path, "rb") as stream:
            return stream.read()


def _unpickle_layer(data, training):
    """The layer a model file's bytes hold (one layer in a Sequential), in its mode."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.npz")
        with open(path, "wb") as stream:
            stream.write(data)
        dtype = np.dtype(_core.model_file_dtype(path))
        layer = _from_native(native("load_model", dtype)(path).layers()[0])
    return layer.train(training)


def _unpickle_container(cls, children, training):
    container = cls(*children)
    container.training = training  # its own flag: each child was unpickled in its own mode
    return container


def _torch_order(params, buffers):
    """(name, array) pairs of parameters and buffers in torch's state_dict order: module by
    module (numbered path components by number, named ones in order of first appearance),
    each module's parameters before its buffers."""
    if not buffers:
        return params
    first = {}
    for name, _ in params + buffers:
        for part in name.split(".")[:-1]:
            first.setdefault(part, len(first))

    def key(item):
        kind, (name, _) = item
        path = [(0, int(p), 0) if p.isdigit() else (1, 0, first[p]) for p in name.split(".")[:-1]]
        return path, kind

    tagged = [(0, pair) for pair in params] + [(1, pair) for pair in buffers]
    return [pair for _, pair in sorted(tagged, key=key)]


def _traced(name, after_run=False):
    """A property that reads entry `name` of the trace of the C++ object behind `_impl` (a
    copy; None before a pass, or with after_run, before the object has run)."""

    def read(self):
        impl = self._impl
        if impl is None or (after_run and not impl.has_run()):
            return None
        return getattr(impl, name)()

    return property(read)


class _NativeModule(Module):
    """A built-in layer: a C++ layer object per dtype runs it and holds its trace.

    The C++ objects: ``_impls[dtype]``, made by ``_make(dtype)`` when ``_native_for(dtype)``
    first asks for it; ``_impl``, the one whose trace shows, chosen by ``_activate(dtype)``;
    ``_as_layer(dtype)``, what a C++ Sequential holds for this module. Layers with
    parameters have one fixed dtype."""

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

    def _activate(self, dtype):
        """The C++ layer of `dtype`, made the one whose trace shows."""
        self._impl = self._native_for(dtype)
        return self._impl

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

    def forward(self, x):
        return self._activate(self._fixed_dtype or dtype_of(x)).forward(x)

    def backward(self, grad_output):
        if self._impl is None:
            raise RuntimeError(f"[{type(self).__name__}] backward called before forward")
        return self._impl.backward(grad_output)

    # the trace of the last pass, read from the C++ layer (copies; None before a pass)
    input = _traced("input")
    output = _traced("output")
    grad_output = _traced("grad_output")
    grad_input = _traced("grad_input")


class _DeclaredLayer(_NativeModule):
    """A layer type declared in C++ (cnnbp/registry.hpp): its arguments are checked there,
    its weights drawn there, and its model-file entry is its config()."""

    _declaration = None  # the registry's entry: name, doc, fields, ...

    def __init__(self, *args, **kwargs):
        super().__init__()
        given = self.__signature__.bind(*args, **kwargs)
        given.apply_defaults()
        arguments = dict(given.arguments)
        has_parameters = self._declaration["has_parameters"]
        dtype = check_dtype(arguments.pop("dtype")) if has_parameters else np.dtype(np.float32)
        impl = native("make_layer", dtype)(self._declaration["name"], arguments)
        self._adopt(impl, dtype, arguments)

    def _adopt(self, impl, dtype, shown):
        """Run as the C++ layer `impl` of `dtype`: take its arguments (all, normalized: a
        drawn seed too), show `shown` as attributes, and wrap its parameters."""
        self._arguments = impl.arguments()
        self._impls[dtype] = impl
        for name, value in shown.items():
            setattr(self, name, value)
        if self._declaration["has_parameters"]:
            self._fixed_dtype = dtype
            self._impl = impl  # a layer with parameters has one dtype: its trace is this one's
            params = dict(impl.named_parameters())
            owner = weakref.ref(self)
            for name in ("weight", "bias"):  # None where the layer has none (bias=False)
                parameter = None
                if name in params:
                    parameter = Parameter(None, _impl=params[name], _owner=(owner, name))
                setattr(self, name, parameter)
            self._buffers = OrderedDict(impl.named_buffers())
            for name, buffer in self._buffers.items():  # NumPy views of the C++ storage
                setattr(self, name, buffer)

    def _own_buffers(self):
        return list(self.__dict__.get("_buffers", {}).items())

    @classmethod
    def _from_native(cls, impl):
        """The Python layer around a C++ layer built elsewhere (a loaded model file)."""
        layer = cls.__new__(cls)
        _NativeModule.__init__(layer)
        arguments = {name: _shown(value) for name, value in impl.arguments().items()}
        dtype = np.dtype(np.float32 if type(impl).__name__.endswith("32") else np.float64)
        layer._adopt(impl, dtype, arguments)
        return layer

    def _make(self, dtype):
        return native("make_layer", dtype)(self._declaration["name"], self._arguments)

    def __reduce__(self):
        """Pickled as the model file of a Sequential holding this layer alone: its
        arguments, weights and buffers (model.save's bytes), and its mode."""
        return (_unpickle_layer, (_model_file_bytes(Sequential(self)), self.training))

    def config(self):
        """The architecture entry of a model file: the type and the saved arguments."""
        return next(iter(self._impls.values())).config()

    def trace(self):
        out = super().trace()
        for name in self._declaration["trace_extras"]:
            out[name] = getattr(self, name)
        return out

    def extra_repr(self):
        return ", ".join(
            f"{field['name']}={_shown(self._arguments[field['name']])!r}"
            for field in self._declaration["fields"]
            if field["saved"]
        )


def _shown(value):
    """An argument as Python shows it: pairs as tuples."""
    return tuple(value) if isinstance(value, list) else value


def _trace_extra(name):
    def read(self):
        return self._impl.trace_extras()[name] if self._impl else None

    return property(read, doc=f"{name} of the last forward (see the layer's doc)")


def _declared_class(declaration):
    """The Python class of a layer type declared in C++, with its signature and doc."""
    parameters = [
        inspect.Parameter(
            field["name"],
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            **({} if field["required"] else {"default": field["default"]}),
        )
        for field in declaration["fields"]
    ]
    if declaration["has_parameters"]:
        parameters.append(
            inspect.Parameter("dtype", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=np.float32)
        )
    namespace = {
        "_declaration": declaration,
        "__doc__": declaration["doc"] + ".",
        "__signature__": inspect.Signature(parameters),
        "__module__": __name__,
        "__qualname__": declaration["name"],
    }
    for name in declaration["trace_extras"]:
        namespace[name] = _trace_extra(name)
    return type(declaration["name"], (_DeclaredLayer,), namespace)


# One class per layer type the C++ registry declares: Conv2d, Linear, MaxPool2d, ...
_LAYER_CLASSES = {d["name"]: _declared_class(d) for d in _core.layer_types()}
globals().update(_LAYER_CLASSES)
# torch's attributes of a BatchNorm2d without track_running_stats (which has no buffers)
BatchNorm2d.running_mean = BatchNorm2d.running_var = BatchNorm2d.num_batches_tracked = None  # noqa: F821


def _from_native(impl):
    """The Python module around a C++ layer of a declared type or a container."""
    container = _CONTAINER_CLASSES.get(impl.type())
    if container is not None:
        return container._from_native(impl)
    return _LAYER_CLASSES[impl.type()]._from_native(impl)


class _Container(_NativeModule):
    """A module made of modules (Sequential, Residual, Concat), run by the C++ container of
    the same name. Its parameters are its children's under dotted names ("3.block.1.weight"),
    and its trace lists every module below it by that path."""

    def __init__(self, children):
        super().__init__()
        for name, child in children:
            if not isinstance(child, Module):
                raise TypeError(
                    f"[{type(self).__name__}] {self._child_label.format(name)}: expected an "
                    f"nn.Module, "
                    f"got {type(child).__name__}"
                )
        self._named = tuple(children)
        # the dtype of the parameters, or of the running statistics (BatchNorm2d(affine=False))
        dtypes = {p.dtype for p in self.parameters()}
        dtypes |= {b.dtype for b in self.buffers() if b.dtype.kind == "f"}
        if len(dtypes) > 1:
            raise TypeError(
                f"[{type(self).__name__}] parameters: expected one dtype, "
                f"got {sorted(str(d) for d in dtypes)}"
            )
        self._fixed_dtype = dtypes.pop() if dtypes else None

    _child_label = "{}"  # how messages name a child: "block", "layer 1", "branch 0"

    def named_children(self):
        """(name, module) pairs, in the order the forward runs them."""
        return list(self._named)

    def _children(self):
        return tuple(child for _, child in self._named)

    def _activate(self, dtype):
        impl = self._native_for(dtype)
        if impl is not self._impl:  # the children's traces now come from this dtype's objects
            self._impl = impl
            self._step = None
            for child in self._children():
                child._activate(dtype)
        return impl

    _step = None

    def named_parameters(self, prefix: str = ""):
        return [
            pair
            for name, child in self._named
            for pair in child.named_parameters(f"{prefix}{name}.")
        ]

    def named_buffers(self, prefix: str = ""):
        return [
            pair for name, child in self._named for pair in child.named_buffers(f"{prefix}{name}.")
        ]

    def zero_grad(self) -> None:
        for child in self._children():
            child.zero_grad()

    def named_modules(self, prefix: str = ""):
        """(dotted path, module) for every module below this one, each container before
        its children (torch's order, without this module itself)."""
        out = []
        for name, child in self._named:
            path = prefix + name
            out.append((path, child))
            if isinstance(child, _Container):
                out.extend(child.named_modules(path + "."))
        return out

    def trace(self):
        """One trace per module below this one, by dotted path: [("0", {"input": ...,
        "output": ..., ...}), ..., ("3", the Residual's), ("3.block", ...), ("3.block.0",
        ...), ...]; a container's entry shows its own input, output and gradients (a
        Residual's output is the sum, its grad_input the sum of both paths')."""
        return [
            (path, Module.trace(module) if isinstance(module, _Container) else module.trace())
            for path, module in self.named_modules()
        ]

    def __reduce__(self):
        """Pickled as its children (each a model file's bytes, or a module written in
        Python) and its mode; rebuilt by its constructor."""
        return (_unpickle_container, (type(self), self._constructor_arguments(), self.training))

    def _constructor_arguments(self):
        return self._children()

    def _repr_child(self, name, child):
        inner = repr(child).replace("\n", "\n  ")
        return f"  ({name}): {inner}"

    def __repr__(self):
        inner = "\n".join(self._repr_child(name, child) for name, child in self._named)
        return f"{type(self).__name__}(\n{inner}\n)"


# ---- a model's tensors as one flat buffer (cnnbp/nn.hpp's pack_* / unpack_*) ---------------


def _native_model(model, op):
    if not isinstance(model, _NativeModule):
        raise TypeError(f"[{op}] model: expected a cnnbp nn module, got {type(model).__name__}")
    return model._native_for(model._fixed_dtype or np.dtype(np.float32))


def pack_gradients(model, out=None):
    """Every parameter's gradient, one after another in named_parameters() order, as one
    1-dim array of the model's dtype (into `out` when given); zeros for a parameter without
    a gradient. One collective call moves the whole buffer (cnnbp.distributed)."""
    return _native_model(model, "pack_gradients").pack_gradients(out)


def unpack_gradients(model, flat):
    """The inverse of pack_gradients: each parameter's gradient from its slice of `flat`
    (parameters without a gradient are left without one)."""
    _native_model(model, "unpack_gradients").unpack_gradients(flat)


def pack_parameters(model, out=None):
    """Every parameter's values as one flat array (pack_gradients's layout)."""
    return _native_model(model, "pack_parameters").pack_parameters(out)


def unpack_parameters(model, flat):
    """Every parameter's values from one flat array (pack_parameters's layout)."""
    _native_model(model, "unpack_parameters").unpack_parameters(flat)


def pack_buffers(model, out=None):
    """The floating buffers (BatchNorm2d's running statistics, not the int64 counters), in
    named_buffers() order, as one flat array."""
    return _native_model(model, "pack_buffers").pack_buffers(out)


def unpack_buffers(model, flat):
    """The floating buffers from one flat array (pack_buffers's layout)."""
    _native_model(model, "unpack_buffers").unpack_buffers(flat)


def _child(container, children, i):
    """children[i] (ints from the end too, slices as a tuple), IndexError with the C++
    containers' message past either end."""
    if isinstance(i, int) and not -len(children) <= i < len(children):
        bound = f"< {len(children)}" if i >= 0 else f">= -{len(children)}"
        raise IndexError(f"[{container}] index: expected {bound}, got {i}")
    return children[i]


class Sequential(_Container):
    """Layers applied in order; backward runs them in reverse. Names are "0", "1", ...

    A C++ Sequential runs the layers (modules written in Python included, called back);
    ``train_step`` runs a whole training step in one call."""

    _child_label = "layer {}"

    def __init__(self, *layers: Module):
        super().__init__([(str(i), layer) for i, layer in enumerate(layers)])
        self.layers = tuple(layers)

    def _make(self, dtype):
        impl = native("Sequential", dtype)()
        for layer in self.layers:
            impl.add(layer._as_layer(dtype))
        return impl

    def __getitem__(self, i):
        return _child("Sequential", self.layers, i)

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def train_step(self, x, y, loss_fn, optimizer) -> float:
        """One training step: zero_grad, forward, loss, backward, optimizer.step(); returns
        the loss. The same as the four calls written out, in one call into C++. The loss
        must be reduced ('mean' or 'sum'): as torch's backward(), a step needs a scalar."""
        if getattr(loss_fn, "reduction", "mean") == "none":
            raise ValueError(
                "[train_step] loss: expected reduction 'mean' or 'sum' (a scalar loss to step "
                f"on), got {type(loss_fn).__name__} with reduction 'none'"
            )
        if not _core.grad_enabled():
            raise RuntimeError(
                "[train_step] expected gradients enabled, got a call under no_grad (NoGradGuard)"
            )
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
        dtype = self._fixed_dtype or dtype_of(x)
        impl = self._activate(dtype)
        native_optimizer = optimizer._native_for(dtype)
        if native_optimizer is None:  # parameters of both dtypes: the calls one by one
            self.zero_grad()
            loss = loss_fn(self.forward(x), y)
            self.backward(loss_fn.backward())
            optimizer.step()
            return loss
        native_loss = loss_fn._activate(dtype)
        step = native("TrainStep", dtype)(impl, native_loss, native_optimizer)
        self._step = (loss_fn, optimizer, getattr(x, "dtype", None), native_loss, step)
        return step(x, y)

    def save(self, path, optimizer=None) -> None:
        """Write the architecture and weights to one .npz model file (cnnbp.load reads it,
        and so does the C++ library: both are cnnbp/model_file.hpp). A temporary file is
        renamed over `path`. With an optimizer over this model's parameters, its settings
        and state go in the file too (cnnbp.load(path, optimizer=True) gives them back)."""
        dtype = self._fixed_dtype or np.dtype(np.float32)
        native_optimizer = None
        if optimizer is not None:
            native_optimizer = optimizer._native_for(dtype)
            if native_optimizer is None:
                raise ValueError(
                    "[save] optimizer: expected an optimizer over this model's parameters, in order"
                )
        self._native_for(dtype).save(os.fspath(path), native_optimizer)

    @classmethod
    def _from_native(cls, impl):
        """The Python model around a C++ Sequential of declared layers (a loaded file)."""
        return cls(*(_from_native(layer) for layer in impl.layers()))


class Residual(_Container):
    """A skip connection: y = block(x) + x, or block(x) + shortcut(x) with a shortcut (a
    strided 1x1 Conv2d, say, where the block changes the shape). The backward sends dL/dy
    through both paths and adds their input gradients. state_dict keys: "block.*",
    "shortcut.*"."""

    def __init__(self, block: Module, shortcut: Module | None = None):
        children = [("block", block)] + ([] if shortcut is None else [("shortcut", shortcut)])
        super().__init__(children)
        if shortcut is block:
            raise ValueError(
                "[Residual] shortcut: expected a layer other than the block (each keeps its "
                "own trace), got the block itself"
            )
        self.block = block
        self.shortcut = shortcut

    def _constructor_arguments(self):
        return (self.block, self.shortcut)

    def _make(self, dtype):
        shortcut = None if self.shortcut is None else self.shortcut._as_layer(dtype)
        return native("Residual", dtype)(self.block._as_layer(dtype), shortcut)

    @classmethod
    def _from_native(cls, impl):
        shortcut = impl.shortcut()
        return cls(_from_native(impl.block()), None if shortcut is None else _from_native(shortcut))


class Concat(_Container):
    """Branches side by side on the same input: y = the branches' outputs (N, K_i, ...)
    concatenated along dim 1 (channels); the backward gives each branch its slice of dL/dy
    and adds their input gradients. state_dict keys: "0.*", "1.*", ..."""

    _child_label = "branch {}"

    def __init__(self, *branches: Module):
        if not branches:
            raise ValueError("[Concat] branches: expected at least one, got none")
        super().__init__([(str(i), branch) for i, branch in enumerate(branches)])
        for i, branch in enumerate(branches):
            for j in range(i):
                if branches[j] is branch:
                    raise ValueError(
                        f"[Concat] branch {i}: expected a layer other than the earlier branches "
                        f"(each keeps its own trace), got branch {j} again"
                    )
        self.branches = tuple(branches)

    def _make(self, dtype):
        return native("Concat", dtype)([branch._as_layer(dtype) for branch in self.branches])

    def __getitem__(self, i):
        return _child("Concat", self.branches, i)

    def __len__(self):
        return len(self.branches)

    @classmethod
    def _from_native(cls, impl):
        return cls(*(_from_native(branch) for branch in impl.branches()))


_CONTAINER_CLASSES = {"Sequential": Sequential, "Residual": Residual, "Concat": Concat}


class _Loss:
    """A loss remembers its arguments so that ``backward()`` needs none. A C++ loss object
    per dtype computes it and keeps the trace. The options are torch's, checked once, when
    the loss is built; with reduction='none' a call returns the per-element losses (an
    array) and ``backward`` takes dL/d(loss) of their shape."""

    def __init__(self, **options):
        self._options = options
        self._impls = {}
        self._impl = None
        self._activate(np.dtype(np.float32))  # the options are checked here, once
        self._impl = None

    @property
    def reduction(self) -> str:
        return self._options["reduction"]

    def _activate(self, dtype):
        """The C++ loss of `dtype`, made the one whose trace shows."""
        impl = self._impls.get(dtype)
        if impl is None:
            impl = self._impls[dtype] = native(self._native_name, dtype)(**self._options)
        self._impl = impl
        return impl

    def __call__(self, input, target):
        return self.forward(input, target)

    def forward(self, input, target):
        """The loss: a float for reduction 'mean' or 'sum', an array for 'none'."""
        return self._activate(dtype_of(input)).forward(input, target)

    def backward(self, grad_output=None):
        """dL/d input of the last call, given dL/d(loss): None (1, the loss is the objective)
        or a number for a reduced loss, an array of the loss's shape for reduction='none'."""
        if self._impl is None or not self._impl.has_run():
            raise RuntimeError(f"[{type(self).__name__}] backward called before forward")
        return self._impl.backward(grad_output)

    input = _traced("input", after_run=True)
    target = _traced("target", after_run=True)
    loss = _traced("value", after_run=True)
    grad_input = _traced("grad_input", after_run=True)

    def trace(self):
        return OrderedDict(
            input=self.input, target=self.target, loss=self.loss, grad_input=self.grad_input
        )

    def __repr__(self):
        return f"{type(self).__name__}()"


class BCELoss(_Loss):
    """Binary cross-entropy of probabilities (torch.nn.BCELoss): weight broadcasts to the
    input's shape; reduction 'mean', 'sum' or 'none'."""

    _native_name = "BCELoss"  # subclasses keep the C++ loss of their base

    def __init__(self, weight=None, reduction="mean"):
        super().__init__(weight=weight, reduction=reduction)


class BCEWithLogitsLoss(_Loss):
    """Binary cross-entropy of sigmoid(logits), computed stably (torch.nn.BCEWithLogitsLoss):
    weight broadcasts to the input's shape, pos_weight (the positive term's weight) along
    the last dim, the classes."""

    _native_name = "BCEWithLogitsLoss"

    def __init__(self, weight=None, reduction="mean", pos_weight=None):
        super().__init__(weight=weight, reduction=reduction, pos_weight=pos_weight)


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy of logits (N, K) or (N, K, d1, ...) against class indices
    (N,) / (N, d1, ...) or class probabilities of the logits' shape
    (torch.nn.CrossEntropyLoss): weight (K,), ignore_index, reduction, label_smoothing."""

    _native_name = "CrossEntropyLoss"

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        super().__init__(
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )


class NLLLoss(_Loss):
    """Negative log-likelihood of log-probabilities (N, K) or (N, K, d1, ...), LogSoftmax's
    output, against class indices (N,) / (N, d1, ...) (torch.nn.NLLLoss): weight (K,),
    ignore_index, reduction."""

    _native_name = "NLLLoss"

    def __init__(self, weight=None, ignore_index=-100, reduction="mean"):
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction)


__all__ = [
    "Parameter",
    "Module",
    *_LAYER_CLASSES,
    "Sequential",
    "Residual",
    "Concat",
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "NLLLoss",
    "manual_seed",
    "pack_gradients",
    "unpack_gradients",
    "pack_parameters",
    "unpack_parameters",
    "pack_buffers",
    "unpack_buffers",
]
