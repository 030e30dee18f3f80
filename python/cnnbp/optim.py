"""Optimizers with torch.optim's update rules."""

from __future__ import annotations

import numpy as np


class SGD:
    """Stochastic gradient descent, as torch.optim.SGD:

        g = grad + weight_decay * p
        buf = g (first step) or momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
        p -= lr * g
    """

    def __init__(self, params, lr=0.1, momentum=0.0, weight_decay=0.0, dampening=0.0,
                 nesterov=False):
        self.params = list(params)
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not value >= 0:
                raise ValueError(f"[SGD] {name}: expected >= 0, got {value}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("[SGD] nesterov: expected momentum > 0 and dampening 0, "
                             f"got momentum {momentum}, dampening {dampening}")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.dampening, self.nesterov = dampening, nesterov
        self._momentum_buffers: list[np.ndarray | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
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


__all__ = ["SGD"]
