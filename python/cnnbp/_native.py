"""The C++ objects behind nn and optim: one class per dtype in cnnbp._core."""

from __future__ import annotations

import numpy as np

from . import _core

_SUFFIX = {np.dtype(np.float32): "32", np.dtype(np.float64): "64"}


def check_dtype(dtype):
    """float32 or float64, as a NumPy dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _SUFFIX:
        raise TypeError(f"[nn] dtype: expected float32 or float64, got {dtype}")
    return dtype


def native(name, dtype):
    """The C++ class or function `name` for dtype (float32 -> Conv2d32, float64 -> ...64)."""
    return getattr(_core, name + _SUFFIX[np.dtype(dtype)])


def dtype_of(x):
    """The dtype an input selects: its own for float32/float64 arrays, else float32 (the
    C++ side then reports anything that is not a float array). An array of another library
    (a PyTorch tensor) is seen as the kernels will see it, through _core.as_array."""
    dtype = getattr(x, "dtype", None)
    if not isinstance(dtype, np.dtype):
        try:
            dtype = _core.as_array(x).dtype
        except Exception:  # noqa: BLE001 - the kernel reports what it cannot take
            return np.dtype(np.float32)
    return dtype if dtype in _SUFFIX else np.dtype(np.float32)
