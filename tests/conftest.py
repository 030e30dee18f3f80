"""Helpers shared by the kernel, validation and layer tests.

Import them with ``from conftest import ...`` (pytest puts this directory on sys.path).
"""

import hashlib
import os

# scikit-learn's array-API estimator check runs only when SciPy was imported with this set
# (test_sklearn.py); nothing imports SciPy before this file.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

import numpy as np
from cnnbp import nn
from cnnbp.gradcheck import numeric_gradient

DTYPES = (np.float32, np.float64)
F32, F64 = np.float32, np.float64


def _forward_and_backward(op, tol, backward=None):
    """The tolerances of op and of op_backward: the same unless `backward` is given."""
    return {op: tol, op + "_backward": dict(tol if backward is None else backward)}


# Tolerances against the float64 oracle, per op and dtype (see conftest.assert_close: the
# bound is tol * (|want| + max|want|)). The oracle is evaluated on exactly the numbers the
# kernel saw (float32 inputs widened to float64), so the only differences are the kernel's
# own rounding: a few ulps for elementwise ops (float64 ulp 1.1e-16, float32 ulp 6e-8),
# and growing with the length of the sums for conv2d / linear and their gradients.
# Selections (max-pool values and indices, relu, flatten) move numbers without arithmetic
# and must be exact.
KERNEL_TOL = {
    **_forward_and_backward("conv2d", {F64: 1e-12, F32: 1e-5}),
    # overlapping picks add up in the backward
    **_forward_and_backward("max_pool2d", {F64: 0, F32: 0}, backward={F64: 1e-14, F32: 1e-6}),
    **_forward_and_backward("relu", {F64: 0, F32: 0}),
    **_forward_and_backward("sigmoid", {F64: 1e-14, F32: 1e-6}),
    **_forward_and_backward("linear", {F64: 1e-12, F32: 1e-5}),
    **_forward_and_backward("flatten", {F64: 0, F32: 0}),
    **_forward_and_backward("binary_cross_entropy", {F64: 1e-12, F32: 1e-6}),
    **_forward_and_backward("binary_cross_entropy_with_logits", {F64: 1e-12, F32: 1e-6}),
    **_forward_and_backward("cross_entropy", {F64: 1e-12, F32: 1e-6}),
    # avg_pool2d sums at most kh*kw cells and divides once: a few ulps (overlapping windows
    # add up in the backward). float tanh is the double tanh rounded once (half an ulp),
    # float64 tanh the library's (an ulp or so). Dropout multiplies by 0 or 1 and divides by
    # 1 - p: exact in float64, where the oracle does the same operations; in float32 the
    # kernel divides by 1 - p rounded to float32.
    **_forward_and_backward("avg_pool2d", {F64: 1e-14, F32: 1e-6}),
    # adaptive_avg_pool2d: the same sums and divisions (torch's), the global pool's sums in
    # double
    **_forward_and_backward("adaptive_avg_pool2d", {F64: 1e-14, F32: 1e-6}),
    **_forward_and_backward("tanh", {F64: 1e-14, F32: 1e-6}),
    # batch_norm2d: statistics summed in double in another order than NumPy's; float32 y and
    # dx are computed in float32 from the statistics rounded to float32 (a few ulps)
    **_forward_and_backward("batch_norm2d", {F64: 1e-12, F32: 1e-5}),
    **_forward_and_backward("dropout", {F64: 0, F32: 1e-6}),
    # leaky_relu multiplies once by the slope (float32: the slope rounded to float32 first,
    # as torch); gelu and silu run in float64 with the library's erf, exp and tanh and round
    # float32 once: an ulp or so of float64, half an ulp of float32.
    **_forward_and_backward("leaky_relu", {F64: 0, F32: 1e-6}),
    **_forward_and_backward("gelu", {F64: 1e-14, F32: 1e-6}),
    **_forward_and_backward("silu", {F64: 1e-14, F32: 1e-6}),
    # softmax and log_softmax: an exp per element and sums over the dim, in float64 (float32
    # rounded once); nll_loss picks one value per position and sums like cross_entropy
    **_forward_and_backward("softmax", {F64: 1e-14, F32: 1e-6}),
    **_forward_and_backward("log_softmax", {F64: 1e-14, F32: 1e-6}),
    **_forward_and_backward("nll_loss", {F64: 1e-12, F32: 1e-6}),
}

# cnnbp networks against torch, normwise (see assert_close). float64: both sides are exact
# to ~1e-15, 1e-9 leaves room for different summation orders through a few layers.
# float32: torch sums with other blockings (oneDNN, BLAS), so differences of a few float32
# ulps per reduction, amplified a little through the layers.
NETWORK_TOL = {F64: 1e-9, F32: 1e-4}


def layer_dtype(lib, dtype):
    """The keyword arguments that make a layer's parameters `dtype`: cnnbp.nn layers take
    dtype=; torch.nn layers are made float32 and converted as a whole by the caller."""
    return {"dtype": dtype} if lib is nn else {}


def seed_network(dtype=F32, lib=nn, channels=1):
    """The derivation's network, (N, 1, 6, 6) -> conv 3x3 -> ReLU -> max-pool 2x2 -> flatten
    -> linear -> sigmoid -> (N, 1), with `channels` filters (1: its 15 parameters), made of
    cnnbp.nn's layers or torch.nn's (see layer_dtype)."""
    kw = layer_dtype(lib, dtype)
    return lib.Sequential(
        lib.Conv2d(1, channels, 3, **kw),
        lib.ReLU(),
        lib.MaxPool2d(2),
        lib.Flatten(),
        lib.Linear(4 * channels, 1, **kw),
        lib.Sigmoid(),
    )


def file_model_stem(dtype):
    """The first layers of the model-file tests' networks (Python's and C++'s loaders):
    (N, 2, 8, 5) -> conv (3, 2), stride (2, 1), padding (1, 0) -> (N, 3, 4, 4) -> ReLU ->
    max-pool 2, stride 1 -> (N, 3, 3, 3)."""
    return [
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2, stride=1),
    ]


def check_array(got, shape, dtype):
    """Type, shape, dtype and layout, checked before any value is compared."""
    assert isinstance(got, np.ndarray), f"expected an ndarray, got {type(got).__name__}"
    assert got.shape == tuple(shape), f"shape: expected {tuple(shape)}, got {got.shape}"
    assert got.dtype == np.dtype(dtype), f"dtype: expected {np.dtype(dtype)}, got {got.dtype}"
    assert got.flags.c_contiguous, "expected a C-contiguous result"


def check_result(got, want, dtype, tol, what=""):
    """A kernel's result against the oracle's, component by component: Python floats (the
    losses) within tol; float arrays of the call's dtype within tol; integer and bool arrays
    (max-pool indices, dropout masks) of the oracle's dtype, exactly. Type, shape, dtype and
    layout are checked before any value."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), f"{what}: {type(got)}"
        for i, (g, w) in enumerate(zip(got, want)):
            check_result(g, w, dtype, tol, f"{what}[{i}]")
    elif isinstance(want, float):
        assert type(got) is float, f"{what}: expected a Python float, got {type(got).__name__}"
        assert_close(got, want, tol, what)
    elif want.dtype.kind in "iub":
        check_array(got, want.shape, want.dtype)
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        check_array(got, want.shape, dtype)
        assert_close(got, want, tol, what)


def assert_same_bits(got, want, what=""):
    """Results identical byte for byte (NaNs and signed zeros included): arrays of the same
    dtype and shape, C-contiguous; Python floats (the losses) equal; tuples element-wise."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_bits(g, w, f"{what}[{i}]")
    elif isinstance(want, float):
        assert type(got) is float, what
        assert np.float64(got).tobytes() == np.float64(want).tobytes(), f"{what}: {got} != {want}"
    else:
        assert got.dtype == want.dtype and got.shape == want.shape, what
        assert got.flags.c_contiguous, f"{what}: output not C-contiguous"
        assert got.tobytes() == want.tobytes(), f"{what}: not bitwise identical"


def assert_close(got, want, tol, what=""):
    """|got - want| <= tol * (|want| + max|want|), elementwise.

    The first term is a relative tolerance per element; the second scales with the
    array's magnitude, so an element that is a sum of large terms cancelling to nearly
    zero is held to the precision of those terms rather than to its own tiny size.
    tol = 0 asks for exact equality (NaNs must sit in the same places).
    """
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if tol == 0:
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    finite = want[np.isfinite(want)]
    scale = float(np.max(np.abs(finite))) if finite.size else 0.0
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


# Finite differences with eps = 1e-6 in float64: truncation error ~ eps^2 |f'''| and
# rounding error ~ 1e-16 |f| / eps ~ 1e-10 relative, so 1e-6 leaves a wide margin while
# still catching any real mistake (a wrong index or factor is an O(1) error).
FD_RTOL = 1e-6


# torch.optim.SGD settings the optimizer tests sweep (tests/test_nn.py, test_layer_path.py)
SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.1, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, dampening=0.5),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.02, momentum=0.9, weight_decay=0.05, nesterov=True),
]
SGD_CONFIG_IDS = [",".join(f"{k}={v}" for k, v in c.items()) for c in SGD_CONFIGS]


def rng_for(*key):
    """A generator seeded from the test's parameters, so every case is reproducible."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def wide(a):
    """The exact float64 values of an array the kernel saw."""
    return np.asarray(a, dtype=np.float64)


def fd_check(analytic, objective, x, what):
    """An analytic gradient against central differences of objective() at x (FD_RTOL)."""
    numeric = numeric_gradient(objective, x)
    scale = max(float(np.max(np.abs(numeric), initial=0.0)), 1e-3)
    np.testing.assert_allclose(analytic, numeric, rtol=FD_RTOL, atol=FD_RTOL * scale, err_msg=what)


def pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def with_threads(n, fn):
    """fn() run with the kernels set to n threads."""
    import cnnbp

    cnnbp.set_num_threads(n)
    assert cnnbp.get_num_threads() == n
    return fn()
