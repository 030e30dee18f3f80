"""Optimizers with torch.optim's update rules, run by the C++ optimizers.

Each optimizer holds one C++ optimizer per parameter dtype; the update of every parameter
happens in C++ (``cnnbp/optim.hpp`` states the order of operations, torch's).
"""

from __future__ import annotations

import numpy as np

from . import lr_scheduler  # noqa: F401 - optim.lr_scheduler, as torch
from ._native import native as native_class
from .nn import Parameter


def _check_number(name, key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"[{name}] {key}: expected a number, got {value!r}")


class _Optimizer:
    """Holds the parameters; ``step()`` updates those that have a gradient."""

    def __init__(self, params, **hyper):
        self.params = list(params)
        name = type(self).__name__
        for p in self.params:
            if not isinstance(p, Parameter):
                raise TypeError(
                    f"[{name}] params: expected nn.Parameter objects, got {type(p).__name__}"
                )
        for key, value in hyper.items():
            if key != "nesterov":
                _check_number(name, key, value)
        groups = {}
        self._where = []  # parameter i -> (its dtype's C++ optimizer, its index there)
        for p in self.params:
            group = groups.setdefault(p.dtype, [])
            self._where.append((p.dtype, len(group)))
            group.append(p._impl)
        if not groups:  # still check the settings
            groups[np.dtype(np.float64)] = []
        self._natives = {
            dtype: native_class(name, dtype)(impls, **hyper) for dtype, impls in groups.items()
        }
        self._where = [(self._natives[dtype], j) for dtype, j in self._where]
        self._lr = hyper["lr"]

    def _adopt(self, params, impl):
        """Run as the C++ optimizer `impl` over `params` (one dtype, in order)."""
        self.params = list(params)
        self._natives = {params[0].dtype if params else np.dtype(np.float64): impl}
        self._where = [(impl, j) for j in range(len(self.params))]
        self._lr = impl.lr

    def _native_for(self, dtype):
        """The C++ optimizer of a model of `dtype`, when it updates all the parameters."""
        if len(self._natives) != 1:
            return None
        return self._natives.get(dtype)

    @property
    def lr(self) -> float:
        """The learning rate; setting it (a schedule does) applies from the next step."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        _check_number(type(self).__name__, "lr", value)
        for native in self._natives.values():
            native.lr = value
        self._lr = value

    def step(self) -> None:
        for native in self._natives.values():
            native.step()

    def state_dict(self):
        """The settings (the constructor's arguments) and, per parameter (in order), a copy
        of its state; None for a parameter without state yet. torch's names: momentum_buffer; step, exp_avg,
        exp_avg_sq."""
        return {
            "type": type(self).__name__,
            "lr": self.lr,
            "hyperparameters": dict(self._settings),
            "state": [self._state_of(native, j) for native, j in self._where],
        }

    def load_state_dict(self, state) -> None:
        """Take the state of an optimizer of the same type over parameters of the same shapes
        (as state_dict() gives it); the learning rate too."""
        name = type(self).__name__
        if not isinstance(state, dict) or state.get("type") != name:
            got = state.get("type") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"[{name}.load_state_dict] type: expected {name!r}, got {got!r}")
        per_parameter = state.get("state")
        if not isinstance(per_parameter, (list, tuple)) or len(per_parameter) != len(self.params):
            raise ValueError(
                f"[{name}.load_state_dict] state: expected one entry per parameter "
                f"({len(self.params)}), got {per_parameter!r:.80}"
            )
        for i, entry in enumerate(per_parameter):
            if entry is not None and not isinstance(entry, dict):
                raise ValueError(
                    f"[{name}.load_state_dict] state[{i}]: expected a dict or "
                    f"None, got {type(entry).__name__}"
                )
        for (native, j), entry in zip(self._where, per_parameter):
            self._set_state(native, j, entry or {})
        self.lr = state.get("lr", self.lr)

    @staticmethod
    def _state_of(native, j):
        raise NotImplementedError

    @staticmethod
    def _set_state(native, j, entry):
        raise NotImplementedError

    def zero_grad(self) -> None:
        for native in self._natives.values():
            native.zero_grad()

    def __reduce__(self):
        """Pickled as its parameters (a layer's pickle as that layer's, so a model pickled
        with it is the one it updates), its settings and its state_dict()."""
        return (_unpickle_optimizer, (type(self), self.params, self._settings, self.state_dict()))


def _unpickle_optimizer(cls, params, settings, state):
    opt = cls(params, lr=state["lr"], **settings)
    opt.load_state_dict(state)
    return opt


class SGD(_Optimizer):
    """Stochastic gradient descent, as torch.optim.SGD:

    g = grad + weight_decay * p
    buf = g (first step) or momentum * buf + (1 - dampening) * g
    g = g + momentum * buf if nesterov else buf
    p -= lr * g
    """

    def __init__(
        self, params, lr=0.1, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False
    ):
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            dampening=dampening,
            nesterov=bool(nesterov),
        )
        self._show(momentum, weight_decay, dampening, nesterov)

    def _show(self, momentum, weight_decay, dampening, nesterov):
        """The settings as attributes, and as state_dict's hyperparameters."""
        self.momentum, self.weight_decay = momentum, weight_decay
        self.dampening, self.nesterov = dampening, nesterov
        self._settings = dict(
            momentum=momentum,
            weight_decay=weight_decay,
            dampening=dampening,
            nesterov=bool(nesterov),
        )

    @staticmethod
    def _state_of(native, j):
        buffer = native.momentum_buffer(j)
        return None if buffer is None else {"momentum_buffer": buffer}

    @staticmethod
    def _set_state(native, j, entry):
        native.set_momentum_buffer(j, entry.get("momentum_buffer"))


class Adam(_Optimizer):
    """Adam, as torch.optim.Adam (amsgrad off; weight decay added to the gradient):

    g = grad + weight_decay * p
    m = beta1 * m + (1 - beta1) * g          v = beta2 * v + (1 - beta2) * g * g
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        name = type(self).__name__
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"[{name}] betas: expected a pair (beta1, beta2), got {betas!r}")
        beta1, beta2 = betas
        super().__init__(
            params, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay
        )
        self._show((beta1, beta2), eps, weight_decay)

    def _show(self, betas, eps, weight_decay):
        """The settings as attributes, and as state_dict's hyperparameters."""
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self._settings = dict(betas=list(betas), eps=eps, weight_decay=weight_decay)

    @staticmethod
    def _state_of(native, j):
        moments = native.moments(j)
        if moments is None:
            return None
        step, first, second = moments
        return {"step": step, "exp_avg": first, "exp_avg_sq": second}

    @staticmethod
    def _set_state(native, j, entry):
        step = entry.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"[Adam.load_state_dict] step: expected an int, got {step!r}")
        native.set_moments(j, int(step), entry.get("exp_avg"), entry.get("exp_avg_sq"))


class AdamW(Adam):
    """AdamW, as torch.optim.AdamW: Adam with decoupled weight decay, applied to the
    parameter before the update (p *= 1 - lr * weight_decay); torch's default decay 0.01."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _from_native(impl, params):
    """The Python optimizer around a C++ one over `params` (a loaded model file's)."""
    cls = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[impl.type()]
    opt = cls.__new__(cls)
    _Optimizer._adopt(opt, params, impl)
    cls._show(opt, **impl.settings())
    return opt


__all__ = ["SGD", "Adam", "AdamW", "lr_scheduler"]
