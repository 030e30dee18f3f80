"""Learning-rate schedules, as torch.optim.lr_scheduler: call ``step()`` once per epoch,
after the optimizer's steps of that epoch; the optimizer's ``lr`` follows.

The rates are computed with torch's own recurrences, so they equal torch's step for step.
"""

from __future__ import annotations

import math


class _Schedule:
    def __init__(self, optimizer):
        if not hasattr(optimizer, "lr"):
            raise TypeError(
                f"[{type(self).__name__}] optimizer: expected a cnnbp optimizer, "
                f"got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_epoch = 0

    def step(self) -> None:
        self.last_epoch += 1
        self.optimizer.lr = self._next_lr(self.optimizer.lr)

    def get_last_lr(self) -> list[float]:
        return [self.optimizer.lr]

    def _next_lr(self, lr: float) -> float:
        raise NotImplementedError


class StepLR(_Schedule):
    """lr *= gamma every `step_size` epochs."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1):
        super().__init__(optimizer)
        if not (isinstance(step_size, int) and step_size >= 1):
            raise ValueError(f"[StepLR] step_size: expected an int >= 1, got {step_size!r}")
        self.step_size, self.gamma = step_size, gamma

    def _next_lr(self, lr):
        return lr * self.gamma if self.last_epoch % self.step_size == 0 else lr


class CosineAnnealingLR(_Schedule):
    """lr from its initial value down to eta_min along half a cosine over T_max epochs:
    lr_t = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2."""

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0):  # noqa: N803 - torch's name
        super().__init__(optimizer)
        if not (isinstance(T_max, int) and T_max >= 1):
            raise ValueError(f"[CosineAnnealingLR] T_max: expected an int >= 1, got {T_max!r}")
        self.T_max, self.eta_min = T_max, eta_min

    def _next_lr(self, lr):
        t, T, low = self.last_epoch, self.T_max, self.eta_min
        if (t - 1 - T) % (2 * T) == 0:
            return lr + (self.base_lr - low) * (1 - math.cos(math.pi / T)) / 2
        return (1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) * (
            lr - low
        ) + low


__all__ = ["StepLR", "CosineAnnealingLR"]
