"""Model files: ``cnnbp.load`` and ``model.save``, thin wrappers over the one implementation
in C++ (cnnbp/model_file.hpp documents the format). Loading is data only: the file is read
as arrays and a JSON architecture, checked entry by entry, and anything unexpected is
refused with ValueError("[load] ...").

This module is a leaf: it imports nn and optim, and nothing in the package imports it but
the package root.
"""

from __future__ import annotations

import os

import numpy as np

from . import _core, nn, optim
from ._native import native


def save(model, path, optimizer=None) -> None:
    """Write `model` (and `optimizer`'s settings and state) to `path`: model.save."""
    model.save(path, optimizer)


def load(path, optimizer=False):
    """Rebuild the model saved at `path` (by Python's model.save or C++'s cnnbp::nn::save).

    With optimizer=True, returns (model, optimizer): the optimizer saved beside the model by
    model.save(path, optimizer=opt), over the new model's parameters and with its state
    (momentum buffers, Adam's moments and steps), or None when the file holds none."""
    path = os.fspath(path)
    dtype = np.dtype(_core.model_file_dtype(path))
    if not optimizer:
        return nn.Sequential._from_native(native("load_model", dtype)(path))
    impl, native_optimizer = native("load_checkpoint", dtype)(path)
    model = nn.Sequential._from_native(impl)
    if native_optimizer is None:
        return model, None
    return model, optim._from_native(native_optimizer, model.parameters())
