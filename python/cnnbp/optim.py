"""Optimizers with torch.optim's update rules."""

from __future__ import annotations

import numpy as np

from . import _core


class _Optimizer:
    """Holds the parameters; subclasses update those that have a gradient."""

    def __init__(self, params):
        self.params = list(params)

    @staticmethod
    def _check_nonnegative(name, **values):
        for key, value in values.items():
            if not value >= 0:
                raise ValueError(f"[{name}] {key}: expected >= 0, got {value}")

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class SGD(_Optimizer):
    """Stochastic gradient descent, as torch.optim.SGD:

        g = grad + weight_decay * p
        buf = g (first step) or momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
        p -= lr * g
    """

    def __init__(self, params, lr=0.1, momentum=0.0, weight_decay=0.0, dampening=0.0,
                 nesterov=False):
        super().__init__(params)
        self._check_nonnegative("SGD", lr=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("[SGD] nesterov: expected momentum > 0 and dampening 0, "
                             f"got momentum {momentum}, dampening {dampening}")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.dampening, self.nesterov = dampening, nesterov
        self._momentum_buffers: list[np.ndarray | None] = [None] * len(self.params)

    def step(self) -> None:
        # All parameters in one C++ call, which follows the NumPy code below operation for
        # operation; it hands back the few whose arrays it cannot update in place.
        for i in _core.sgd_step(self.params, self._momentum_buffers, self.lr, self.momentum,
                                self.dampening, self.weight_decay, self.nesterov):
            self._step_one(i)

    def _step_one(self, i: int) -> None:
        p = self.params[i]
        g = p.grad
        if self.weight_decay:
            g = g + self.weight_decay * p.data
        if self.momentum:
            buf = self._momentum_buffers[i]
            if buf is None:
                buf = self._momentum_buffers[i] = g.copy()
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p.data -= (self.lr * g).astype(p.data.dtype, copy=False)


class Adam(_Optimizer):
    """Adam, as torch.optim.Adam (amsgrad off; weight decay added to the gradient):

        g = grad + weight_decay * p
        m = beta1 * m + (1 - beta1) * g          v = beta2 * v + (1 - beta2) * g * g
        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params)
        beta1, beta2 = betas
        self._check_nonnegative("Adam", lr=lr, eps=eps, weight_decay=weight_decay)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"[Adam] betas: expected values in [0, 1), got {betas}")
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.weight_decay = weight_decay
        self._steps = [0] * len(self.params)
        self._first_moments: list[np.ndarray | None] = [None] * len(self.params)
        self._second_moments: list[np.ndarray | None] = [None] * len(self.params)

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay:
                g = g + self.weight_decay * p.data
            if self._first_moments[i] is None:
                self._first_moments[i] = np.zeros_like(p.data)
                self._second_moments[i] = np.zeros_like(p.data)
            m, v = self._first_moments[i], self._second_moments[i]
            self._steps[i] += 1
            t = self._steps[i]
            m += (1 - self.beta1) * (g - m)
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            step_size = self.lr / (1 - self.beta1 ** t)
            denom = np.sqrt(v) / np.sqrt(1 - self.beta2 ** t) + self.eps
            p.data -= (step_size * m / denom).astype(p.data.dtype, copy=False)


__all__ = ["SGD", "Adam"]
