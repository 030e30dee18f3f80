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

from . import functional as F

_rng = np.random.default_rng()


def manual_seed(seed: int) -> None:
    """Seed the generator that initializes new layers' weights."""
    global _rng
    _rng = np.random.default_rng(seed)


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"[nn] dtype: expected float32 or float64, got {dtype}")
    return dtype


class Parameter:
    """A trainable array ``data`` and its accumulated gradient ``grad`` (None until a backward)."""

    def __init__(self, data: np.ndarray):
        self.data = np.ascontiguousarray(data)
        self.grad: np.ndarray | None = None

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def accumulate(self, grad: np.ndarray) -> None:
        if self.grad is None:
            self.grad = grad
        else:
            self.grad += grad

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class: forward/backward, parameters, state_dict and the per-layer trace."""

    _plain_parameters = True

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
        return [(name, p) for name in ("weight", "bias")
                if isinstance(p := getattr(self, name, None), Parameter)]

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Whether the parameters are the plain "weight" and "bias" attributes, so that
        # zero_grad() can reach them without building named_parameters() every step.
        cls._plain_parameters = (cls.named_parameters is Module.named_parameters
                                 and cls.parameters is Module.parameters
                                 and cls._own_parameters is Module._own_parameters)

    def zero_grad(self) -> None:
        """Forget accumulated gradients (they become None, as torch's set_to_none=True)."""
        if not self._plain_parameters:
            for p in self.parameters():
                p.grad = None
            return
        attributes = self.__dict__
        for name in ("weight", "bias"):
            p = attributes.get(name)
            if isinstance(p, Parameter):
                p.grad = None

    def state_dict(self):
        """name -> copy of the parameter array, with torch's key names."""
        return OrderedDict((name, p.data.copy()) for name, p in self.named_parameters())

    def load_state_dict(self, state_dict) -> None:
        """Copy arrays into the parameters; keys, shapes and dtypes must match exactly."""
        own = OrderedDict(self.named_parameters())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise KeyError(f"[load_state_dict] expected keys {list(own)}, "
                           f"got missing {missing}, unexpected {unexpected}")
        for name, p in own.items():
            value = np.asarray(state_dict[name])
            if value.shape != p.data.shape:
                raise ValueError(f"[load_state_dict] {name}: expected shape {p.data.shape}, "
                                 f"got shape {value.shape}")
            if value.dtype != p.data.dtype:
                raise TypeError(f"[load_state_dict] {name}: expected {p.data.dtype}, "
                                f"got {value.dtype}")
        for name, p in own.items():
            p.data = np.array(state_dict[name], dtype=p.data.dtype, order="C", copy=True)

    def trace(self):
        """What this layer saw in its last forward and backward, by name."""
        out = OrderedDict(input=self.input, output=self.output,
                          grad_output=self.grad_output, grad_input=self.grad_input)
        for name, p in self._own_parameters():
            out[name] = p.data
            out[name + ".grad"] = p.grad
        return out

    def _finish_backward(self, dx, dw, db):
        """Accumulate weight and bias gradients, keep and return dL/d input."""
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        self.grad_input = dx
        return dx

    def config(self):
        """The architecture entry of a model file: the type and constructor arguments."""
        return {"type": type(self).__name__}

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


def _pair(v):
    """An int or an (h, w) pair as a list [h, w] of ints (the model file's form)."""
    return [int(v), int(v)] if np.isscalar(v) else [int(x) for x in v]


def _kaiming_uniform(shape, fan_in, dtype):
    # torch's default for conv and linear: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), +)
    bound = 1.0 / math.sqrt(fan_in)
    return _rng.uniform(-bound, bound, size=shape).astype(dtype)


class Conv2d(Module):
    """y (N, K, P, Q) = conv2d(x (N, C, H, W), weight (K, C, R, S)) + bias (K,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 dtype=np.float32):
        super().__init__()
        dtype = _check_dtype(dtype)
        r, s = (kernel_size, kernel_size) if np.isscalar(kernel_size) else tuple(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (r, s), stride, padding
        fan_in = in_channels * r * s
        self.weight = Parameter(_kaiming_uniform((out_channels, in_channels, r, s), fan_in, dtype))
        self.bias = Parameter(_kaiming_uniform((out_channels,), fan_in, dtype)) if bias else None

    def forward(self, x):
        self.input = x
        b = self.bias.data if self.bias is not None else None
        self.output = F.conv2d(x, self.weight.data, b, self.stride, self.padding)
        return self.output

    def backward(self, grad_output):
        self.grad_output = grad_output
        dx, dw, db = F.conv2d_backward(grad_output, self.input, self.weight.data,
                                       self.stride, self.padding)
        return self._finish_backward(dx, dw, db)

    def config(self):
        """The architecture entry of a model file."""
        return {"type": "Conv2d", "in_channels": int(self.in_channels),
                "out_channels": int(self.out_channels), "kernel_size": _pair(self.kernel_size),
                "stride": _pair(self.stride), "padding": _pair(self.padding),
                "bias": self.bias is not None}

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")


class MaxPool2d(Module):
    """y, argmax = max over each kernel_size window; backward routes dL/dy to the argmax."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.indices = None

    def forward(self, x):
        self.input = x
        self.output, self.indices = F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        return self.output

    def backward(self, grad_output):
        self.grad_output = grad_output
        self.grad_input = F.max_pool2d_backward(grad_output, self.indices, self.input.shape)
        return self.grad_input

    def trace(self):
        out = super().trace()
        out["indices"] = self.indices
        return out

    def config(self):
        stride = self.kernel_size if self.stride is None else self.stride
        return {"type": "MaxPool2d", "kernel_size": _pair(self.kernel_size),
                "stride": _pair(stride), "padding": _pair(self.padding)}

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class _Activation(Module):
    """An elementwise layer: backward needs either its input or its output, nothing else."""
    _forward = _backward = None
    _backward_uses_output = False

    def forward(self, x):
        self.input = x
        self.output = self._forward(x)
        return self.output

    def backward(self, grad_output):
        self.grad_output = grad_output
        saved = self.output if self._backward_uses_output else self.input
        self.grad_input = self._backward(grad_output, saved)
        return self.grad_input


class ReLU(_Activation):
    """a = max(z, 0); dz = da where z > 0."""
    _forward = staticmethod(F.relu)
    _backward = staticmethod(F.relu_backward)


class Sigmoid(_Activation):
    """a = 1 / (1 + exp(-z)); dz = da * a * (1 - a), from the output a."""
    _forward = staticmethod(F.sigmoid)
    _backward = staticmethod(F.sigmoid_backward)
    _backward_uses_output = True


class Flatten(Module):
    """F (N, C*H*W) = x (N, C, H, W) reshaped (torch's Flatten with start_dim=1)."""

    def forward(self, x):
        self.input = x
        self.output = F.flatten(x)
        return self.output

    def backward(self, grad_output):
        self.grad_output = grad_output
        x = self.input
        shape = x.shape if isinstance(x, np.ndarray) else np.shape(x)
        self.grad_input = F.flatten_backward(grad_output, shape)
        return self.grad_input


class Linear(Module):
    """y (*, out) = x (*, in) . weight (out, in)^T + bias (out,)."""

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32):
        super().__init__()
        dtype = _check_dtype(dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(_kaiming_uniform((out_features, in_features), in_features, dtype))
        self.bias = Parameter(_kaiming_uniform((out_features,), in_features, dtype)) if bias else None

    def forward(self, x):
        self.input = x
        b = self.bias.data if self.bias is not None else None
        self.output = F.linear(x, self.weight.data, b)
        return self.output

    def backward(self, grad_output):
        self.grad_output = grad_output
        dx, dw, db = F.linear_backward(grad_output, self.input, self.weight.data)
        return self._finish_backward(dx, dw, db)

    def config(self):
        return {"type": "Linear", "in_features": int(self.in_features),
                "out_features": int(self.out_features), "bias": self.bias is not None}

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse. Names are "0", "1", ..."""

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"[Sequential] layer {i}: expected an nn.Module, "
                                f"got {type(layer).__name__}")
        self.layers = list(layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def forward(self, x):
        self.input = x
        for layer in self.layers:
            x = layer.forward(x)  # what layer(x) calls, one Python call less per layer
        self.output = x
        return x

    def backward(self, grad_output):
        self.grad_output = grad_output
        for layer in reversed(self.layers):
            grad_output = layer.backward(grad_output)
        self.grad_input = grad_output
        return grad_output

    def named_parameters(self, prefix: str = ""):
        return [pair for i, layer in enumerate(self.layers)
                for pair in layer.named_parameters(f"{prefix}{i}.")]

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.zero_grad()

    def train_step(self, x, y, loss_fn, optimizer) -> float:
        """One training step: zero_grad, forward, loss, backward, optimizer.step(); returns
        the loss. The same as the four calls written out."""
        self.zero_grad()
        loss = loss_fn(self.forward(x), y)
        self.backward(loss_fn.backward())
        optimizer.step()
        return loss

    def save(self, path) -> None:
        """Write the architecture and weights to one .npz model file (cnnbp.load reads it,
        and so does the C++ library). A temporary file is renamed over `path`."""
        from .model_file import save
        save(self, path)

    def trace(self):
        """One trace per layer: [(name, {"input": ..., "output": ..., ...}), ...]."""
        return [(str(i), layer.trace()) for i, layer in enumerate(self.layers)]

    def __repr__(self):
        inner = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"


class _Loss:
    """A loss remembers its arguments so that ``backward()`` needs none."""

    def __init__(self):
        self.input = None
        self.target = None
        self.loss = None
        self.grad_input = None

    def __call__(self, input, target) -> float:
        return self.forward(input, target)

    def forward(self, input, target) -> float:
        self.input, self.target = input, target
        self.loss = self._forward(input, target)
        return self.loss

    def backward(self, grad_loss: float = 1.0):
        """dL/d input of the last call, scaled by dL/d loss (1 when the loss is the objective)."""
        if self.input is None:
            raise RuntimeError(f"[{type(self).__name__}] backward called before forward")
        grad = self._backward(self.input, self.target)
        self.grad_input = grad if grad_loss == 1.0 else grad * grad.dtype.type(grad_loss)
        return self.grad_input

    def trace(self):
        return OrderedDict(input=self.input, target=self.target, loss=self.loss,
                           grad_input=self.grad_input)

    def __repr__(self):
        return f"{type(self).__name__}()"


class BCELoss(_Loss):
    """Mean binary cross-entropy of probabilities (torch.nn.BCELoss)."""
    _forward = staticmethod(F.binary_cross_entropy)
    _backward = staticmethod(F.binary_cross_entropy_backward)


class BCEWithLogitsLoss(_Loss):
    """Mean binary cross-entropy of sigmoid(logits), computed stably (torch.nn.BCEWithLogitsLoss)."""
    _forward = staticmethod(F.binary_cross_entropy_with_logits)
    _backward = staticmethod(F.binary_cross_entropy_with_logits_backward)


class CrossEntropyLoss(_Loss):
    """Mean softmax cross-entropy of logits (N, K) against class indices (N,)."""
    _forward = staticmethod(F.cross_entropy)
    _backward = staticmethod(F.cross_entropy_backward)


__all__ = [
    "Parameter", "Module", "Conv2d", "MaxPool2d", "ReLU", "Sigmoid", "Flatten", "Linear",
    "Sequential", "BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss", "manual_seed",
]
