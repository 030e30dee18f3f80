"""Every C++ kernel (through cnnbp.functional) against the NumPy oracle (cnnbp.reference),
every backward against central finite differences of the C++ forward, and the array
contract: dtypes, layouts, lists, determinism, Python-float losses.
"""

import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from cnnbp import functional as F
from cnnbp import reference as ref
from conftest import (
    DTYPES,
    KERNEL_TOL,
    assert_close,
    check_array,
    fd_check,
    pair,
    randn,
    rng_for,
    wide,
)

F32, F64 = np.float32, np.float64

TOL = KERNEL_TOL

DTYPE_IDS = ["float32", "float64"]


# ---------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------

CONV_CASES = [
    # (N, C, H, W, K, R, S, stride, padding)
    (1, 1, 5, 5, 1, 3, 3, 1, 0),  # the smallest: one sample, one channel
    (3, 4, 7, 6, 5, 3, 3, 1, 1),  # batch, several channels, padding, W != H
    (2, 3, 8, 8, 2, 1, 1, 1, 0),  # 1x1 kernel
    (2, 2, 9, 7, 3, 1, 1, 2, 0),  # 1x1 kernel with stride: every other cell unread
    (2, 3, 9, 9, 4, 3, 3, 2, 1),  # stride 2 and padding
    (1, 2, 7, 8, 3, 3, 2, (2, 1), (1, 0)),  # non-square kernel, (h, w) stride/padding
    (2, 1, 6, 5, 2, 2, 4, (1, 3), (0, 2)),  # wide kernel, padding only in w
    (1, 2, 5, 5, 2, 5, 5, 1, 0),  # kernel covers the whole input: 1x1 output
    (1, 1, 4, 4, 1, 3, 3, 1, 3),  # padding > kernel: border outputs read only zeros
    (2, 2, 11, 10, 3, 3, 3, 4, 0),  # stride > kernel: some cells never read
    (1, 3, 7, 7, 2, 2, 3, (3, 2), (2, 1)),
    (1, 1, 1, 1, 1, 1, 1, 1, 0),  # a single number
    # Enough work per image for the packed GEMM path (K*P*Q*C*R*S >= 4096):
    (2, 30, 8, 8, 10, 3, 3, 1, 1),  # C*R*S = 270: two k-blocks; K = 10: a partial row panel
    (1, 2, 24, 20, 9, 3, 3, 1, 1),  # P*Q = 480: two column blocks, a partial column tile
    (2, 3, 17, 15, 6, 3, 2, (2, 1), (1, 0)),  # (h, w) stride and padding through the GEMM
    (1, 3, 9, 9, 10, 3, 3, 2, 1),  # stride 2 with padding
    (1, 4, 10, 10, 7, 5, 5, 3, 2),  # stride > 1 with a 5x5 kernel
    (2, 33, 6, 7, 3, 3, 2, 1, (1, 0)),  # unit strides, C >= 32: dinput as a forward conv
    (1, 3, 7, 6, 64, 3, 3, 1, 1),  # unit strides, K = 64: dweight read in place
    (2, 2, 5, 5, 70, 3, 2, 1, (0, 1)),  # K = 70: a partial filter panel in place
    (2, 3, 8, 7, 20, 3, 3, 1, 0),  # K = 20: the middle gather panel, partially filled
]
BIG_CONV_CASE = (4, 8, 16, 16, 8, 3, 3, 1, 1)  # enough work for the threaded path


def conv_data(case, dtype):
    N, C, H, W, K, R, S, stride, padding = case
    rng = rng_for("conv", case, np.dtype(dtype).name)
    x = randn(rng, (N, C, H, W), dtype)
    w = randn(rng, (K, C, R, S), dtype)
    b = randn(rng, (K,), dtype)
    return x, w, b, stride, padding


def conv_out_shape(case):
    N, C, H, W, K, R, S, stride, padding = case
    (sh, sw), (ph, pw) = pair(stride), pair(padding)
    return (N, K, (H + 2 * ph - R) // sh + 1, (W + 2 * pw - S) // sw + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CONV_CASES + [BIG_CONV_CASE], ids=str)
def test_conv2d_matches_oracle(case, dtype):
    x, w, b, stride, padding = conv_data(case, dtype)
    y = F.conv2d(x, w, b, stride=stride, padding=padding)
    check_array(y, conv_out_shape(case), dtype)
    want = ref.conv2d(wide(x), wide(w), wide(b), stride=stride, padding=padding)
    assert_close(y, want, TOL["conv2d"][dtype], "conv2d")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CONV_CASES + [BIG_CONV_CASE], ids=str)
def test_conv2d_backward_matches_oracle(case, dtype):
    x, w, b, stride, padding = conv_data(case, dtype)
    dy = randn(rng_for("dy", case), conv_out_shape(case), dtype)
    dx, dw, db = F.conv2d_backward(dy, x, w, stride=stride, padding=padding)
    check_array(dx, x.shape, dtype)
    check_array(dw, w.shape, dtype)
    check_array(db, b.shape, dtype)
    want = ref.conv2d_backward(wide(dy), wide(x), wide(w), stride=stride, padding=padding)
    tol = TOL["conv2d_backward"][dtype]
    assert_close(dx, want[0], tol, "dx")
    assert_close(dw, want[1], tol, "dw")
    assert_close(db, want[2], tol, "db")


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_backward_finite_differences(case):
    x, w, b, stride, padding = conv_data(case, F64)
    g = randn(rng_for("g", case), conv_out_shape(case), F64)

    def objective():
        return float(np.sum(F.conv2d(x, w, b, stride=stride, padding=padding) * g))

    dx, dw, db = F.conv2d_backward(g, x, w, stride=stride, padding=padding)
    fd_check(dx, objective, x, "dx")
    fd_check(dw, objective, w, "dw")
    fd_check(db, objective, b, "db")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[5]], ids=str)
def test_conv2d_without_bias(case, dtype):
    # b=None is the default and means "no bias": the same as a zero bias.
    x, w, _, stride, padding = conv_data(case, dtype)
    y = F.conv2d(x, w, None, stride=stride, padding=padding)
    check_array(y, conv_out_shape(case), dtype)
    assert_close(y, ref.conv2d(wide(x), wide(w), None, stride, padding), TOL["conv2d"][dtype])
    np.testing.assert_array_equal(F.conv2d(x, w, stride=stride, padding=padding), y)


def test_conv2d_known_answer():
    # The derivation's first layer: a 6x6 ramp and a 3x3 filter with a single 1.
    x = np.arange(36, dtype=F64).reshape(1, 1, 6, 6)
    w = np.zeros((1, 1, 3, 3))
    w[0, 0, 1, 2] = 1.0  # picks x[p + 1, q + 2]
    y = F.conv2d(x, w, np.array([0.5]))
    check_array(y, (1, 1, 4, 4), F64)
    np.testing.assert_array_equal(y[0, 0], x[0, 0, 1:5, 2:6] + 0.5)


# ---------------------------------------------------------------------------------------
# max_pool2d
# ---------------------------------------------------------------------------------------

POOL_CASES = [
    # (N, C, H, W, kernel, stride, padding)
    (1, 1, 4, 4, 2, None, 0),  # the derivation's pool, default stride = kernel
    (2, 3, 6, 6, 2, 2, 0),
    (2, 2, 7, 7, 3, 2, 0),  # overlapping windows, odd size, floored output
    (2, 2, 9, 8, 3, 2, 1),  # overlapping windows and -inf padding
    (1, 2, 5, 7, (2, 3), (1, 2), (1, 1)),  # non-square, (h, w) pairs
    (1, 1, 5, 5, 1, 1, 0),  # 1x1: the identity
    (3, 1, 6, 5, (3, 2), None, (1, 1)),
    (1, 1, 5, 5, 5, 1, 2),  # window as large as the input, maximal padding
    (2, 1, 7, 5, 2, 3, 0),  # stride > kernel: some cells never looked at
]
BIG_POOL_CASE = (2, 16, 24, 24, 3, 2, 1)  # enough work for the threaded path


def pool_out_shape(case):
    N, C, H, W, kernel, stride, padding = case
    (kh, kw) = pair(kernel)
    (sh, sw) = pair(kernel if stride is None else stride)
    (ph, pw) = pair(padding)
    return (N, C, (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)


def distinct_values(rng, shape, dtype):
    """Values 0.1 apart in random order: no ties, and a 1e-6 step changes no argmax."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) * 0.1 - n * 0.05).astype(dtype)


def check_pool(x, kernel, stride, padding, dtype, out_shape):
    y, idx = F.max_pool2d(x, kernel, stride, padding)
    check_array(y, out_shape, dtype)
    check_array(idx, out_shape, np.int64)
    want_y, want_idx = ref.max_pool2d(wide(x), kernel, stride, padding)
    np.testing.assert_array_equal(idx, want_idx)
    assert_close(y, want_y, TOL["max_pool2d"][dtype], "max_pool2d")
    return y, idx


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", POOL_CASES + [BIG_POOL_CASE], ids=str)
def test_max_pool2d_matches_oracle(case, dtype):
    N, C, H, W, kernel, stride, padding = case
    rng = rng_for("pool", case, np.dtype(dtype).name)
    x = randn(rng, (N, C, H, W), dtype)
    y, idx = check_pool(x, kernel, stride, padding, dtype, pool_out_shape(case))
    # the backward routes dy to those indices, adding where windows overlap
    dy = randn(rng, y.shape, dtype)
    dx = F.max_pool2d_backward(dy, idx, x.shape)
    check_array(dx, x.shape, dtype)
    want = ref.max_pool2d_backward(wide(dy), idx, x.shape)
    assert_close(dx, want, TOL["max_pool2d_backward"][dtype], "max_pool2d_backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool2d_ties_pick_the_first_index(case, dtype):
    N, C, H, W, kernel, stride, padding = case
    rng = rng_for("ties", case)
    # integer values from a small range: most windows hold several equal maxima
    x = rng.integers(-2, 3, (N, C, H, W)).astype(dtype)
    check_pool(x, kernel, stride, padding, dtype, pool_out_shape(case))
    # all equal: every window reports its first in-bounds cell
    x = np.full((N, C, H, W), 1.5, dtype)
    y, idx = check_pool(x, kernel, stride, padding, dtype, pool_out_shape(case))
    ph, pw = pair(padding)
    sh, sw = pair(kernel if stride is None else stride)
    P, Q = y.shape[2:]
    first_h = np.maximum(np.arange(P) * sh - ph, 0)
    first_w = np.maximum(np.arange(Q) * sw - pw, 0)
    expected = first_h[:, None] * W + first_w[None, :]
    np.testing.assert_array_equal(idx, np.broadcast_to(expected, idx.shape))
    np.testing.assert_array_equal(y, 1.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_max_pool2d_nan_propagates(dtype):
    rng = rng_for("nan")
    x = randn(rng, (2, 2, 7, 6), dtype)
    x[0, 0, 1, 1] = np.nan  # one NaN
    x[0, 1, 0, 0] = x[0, 1, 1, 1] = np.nan  # two NaNs in one window: the last one wins
    x[1, 0, :, :] = np.nan  # a plane of NaN
    x[1, 1, 2, 3] = np.inf  # +inf next to a NaN: the NaN wins
    x[1, 1, 3, 2] = np.nan
    for kernel, stride, padding in [(2, None, 0), (3, 2, 1), ((2, 3), (1, 2), (1, 0))]:
        y, idx = F.max_pool2d(x, kernel, stride, padding)
        want_y, want_idx = ref.max_pool2d(wide(x), kernel, stride, padding)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(y, want_y)  # NaN in the same places
        assert np.isnan(y[1, 0]).all()
        # the output is NaN exactly where the window holds a NaN, and idx points at one
        picked = np.take_along_axis(x.reshape(2, 2, -1), idx.reshape(2, 2, -1), 2)
        np.testing.assert_array_equal(np.isnan(picked.reshape(y.shape)), np.isnan(y))
    y, idx = F.max_pool2d(x, 2)
    assert idx[0, 1, 0, 0] == 1 * 6 + 1  # the last NaN of the window [0:2, 0:2]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_max_pool2d_padding_is_minus_infinity(dtype):
    # all inputs negative: a zero-padded pool would report 0 at the border
    rng = rng_for("neg")
    x = -np.abs(randn(rng, (1, 2, 5, 5), dtype)) - 1
    y, idx = check_pool(x, 3, 2, 1, dtype, (1, 2, 3, 3))
    assert (y < 0).all()
    # windows of -inf only: -inf at the first in-bounds cell, never a padded position
    x = np.full((1, 1, 4, 4), -np.inf, dtype)
    y, idx = check_pool(x, 3, 2, 1, dtype, (1, 1, 2, 2))
    assert np.isneginf(y).all()
    np.testing.assert_array_equal(idx[0, 0], [[0, 1], [4, 5]])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_max_pool2d_backward_accumulates_overlapping_windows(dtype):
    # kernel 3, stride 2 on 5x5: the center cell is in all four windows
    x = np.zeros((1, 1, 5, 5), dtype)
    x[0, 0, 2, 2] = 9
    y, idx = F.max_pool2d(x, 3, 2)
    np.testing.assert_array_equal(idx, np.full((1, 1, 2, 2), 12))
    dy = np.array([[[[1.0, 2.0], [4.0, 8.0]]]], dtype)
    dx = F.max_pool2d_backward(dy, idx, x.shape)
    check_array(dx, x.shape, dtype)
    want = np.zeros((1, 1, 5, 5))
    want[0, 0, 2, 2] = 15.0
    np.testing.assert_array_equal(dx, want)


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool2d_backward_finite_differences(case):
    N, C, H, W, kernel, stride, padding = case
    rng = rng_for("pool-fd", case)
    x = distinct_values(rng, (N, C, H, W), F64)
    y, idx = F.max_pool2d(x, kernel, stride, padding)
    g = randn(rng, y.shape, F64)

    def objective():
        return float(np.sum(F.max_pool2d(x, kernel, stride, padding)[0] * g))

    fd_check(F.max_pool2d_backward(g, idx, x.shape), objective, x, "dx")


def test_max_pool2d_known_answer():
    x = np.arange(16, dtype=F64).reshape(1, 1, 4, 4)[:, :, ::-1, :].copy()
    y, idx = F.max_pool2d(x, 2)
    # rows are 12..15, 8..11, 4..7, 0..3: each window's maximum is its top-right cell
    np.testing.assert_array_equal(y[0, 0], [[13, 15], [5, 7]])
    np.testing.assert_array_equal(idx[0, 0], [[1, 3], [9, 11]])


# ---------------------------------------------------------------------------------------
# relu, sigmoid
# ---------------------------------------------------------------------------------------

ELEMENTWISE_SHAPES = [(7,), (3, 4), (2, 3, 4, 5), (1, 1, 1, 1), (0, 3), (64, 64, 20)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_relu_matches_oracle(shape, dtype):
    rng = rng_for("relu", shape)
    z = randn(rng, shape, dtype)
    if z.size >= 3:
        z.reshape(-1)[:3] = [0.0, -0.0, np.nan]  # the kink (gradient 0) and NaN
    da = randn(rng, shape, dtype)
    a = F.relu(z)
    check_array(a, shape, dtype)
    assert_close(a, ref.relu(wide(z)), TOL["relu"][dtype], "relu")
    dz = F.relu_backward(da, z)
    check_array(dz, shape, dtype)
    assert_close(dz, ref.relu_backward(wide(da), wide(z)), TOL["relu_backward"][dtype])
    if z.size >= 3:
        assert np.isnan(a.reshape(-1)[2])
        np.testing.assert_array_equal(dz.reshape(-1)[:3], [0.0, 0.0, da.reshape(-1)[2]])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_sigmoid_matches_oracle(shape, dtype):
    rng = rng_for("sigmoid", shape)
    z = randn(rng, shape, dtype, scale=4.0)
    da = randn(rng, shape, dtype)
    a = F.sigmoid(z)
    check_array(a, shape, dtype)
    assert_close(a, ref.sigmoid(wide(z)), TOL["sigmoid"][dtype], "sigmoid")
    dz = F.sigmoid_backward(da, a)
    check_array(dz, shape, dtype)
    assert_close(dz, ref.sigmoid_backward(wide(da), wide(a)), TOL["sigmoid_backward"][dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sigmoid_extremes_are_finite(dtype):
    z = np.array([-1e4, -1000, -100, -30, 0, 30, 100, 1000, 1e4], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = F.sigmoid(z)
    assert np.isfinite(a).all()
    assert a[0] == 0 and a[-1] == 1 and a[4] == 0.5
    assert (np.diff(a) >= 0).all()
    assert_close(a, ref.sigmoid(wide(z)), TOL["sigmoid"][dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_elementwise_ops_keep_a_0d_shape(dtype):
    z, da = np.array(-0.5, dtype), np.array(2.0, dtype)
    for got, want in [
        (F.relu(z), 0.0),
        (F.relu(-z), 0.5),
        (F.relu_backward(da, z), 0.0),
        (F.relu_backward(da, -z), 2.0),
        (F.sigmoid(np.array(0.0, dtype)), 0.5),
        (F.sigmoid_backward(da, np.array(0.5, dtype)), 0.5),
    ]:
        check_array(got, (), dtype)
        assert got == want


def test_relu_backward_finite_differences():
    rng = rng_for("relu-fd")
    z = rng.standard_normal((3, 4, 5))
    z = np.where(np.abs(z) < 1e-2, 0.5, z)  # away from the kink
    g = rng.standard_normal(z.shape)
    fd_check(F.relu_backward(g, z), lambda: float(np.sum(F.relu(z) * g)), z, "relu")


def test_sigmoid_backward_finite_differences():
    rng = rng_for("sigmoid-fd")
    z = rng.standard_normal((4, 6)) * 3
    g = rng.standard_normal(z.shape)
    dz = F.sigmoid_backward(g, F.sigmoid(z))
    fd_check(dz, lambda: float(np.sum(F.sigmoid(z) * g)), z, "sigmoid")


# ---------------------------------------------------------------------------------------
# linear, flatten
# ---------------------------------------------------------------------------------------

LINEAR_CASES = [
    # (x shape, out_features)
    ((1, 1), 1),
    ((5, 4), 3),
    ((2, 3, 4), 6),  # extra leading dims
    ((4,), 2),  # a single vector
    ((8, 17), 1),
    ((64, 300), 40),  # enough work for the threaded path
]


def linear_data(case, dtype):
    x_shape, OUT = case
    rng = rng_for("linear", case, np.dtype(dtype).name)
    IN = x_shape[-1]
    return (
        randn(rng, x_shape, dtype),
        randn(rng, (OUT, IN), dtype),
        randn(rng, (OUT,), dtype),
        randn(rng, x_shape[:-1] + (OUT,), dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_matches_oracle(case, dtype):
    x, w, b, dy = linear_data(case, dtype)
    y = F.linear(x, w, b)
    check_array(y, dy.shape, dtype)
    assert_close(y, ref.linear(wide(x), wide(w), wide(b)), TOL["linear"][dtype], "linear")
    dx, dw, db = F.linear_backward(dy, x, w)
    check_array(dx, x.shape, dtype)
    check_array(dw, w.shape, dtype)
    check_array(db, b.shape, dtype)
    want = ref.linear_backward(wide(dy), wide(x), wide(w))
    tol = TOL["linear_backward"][dtype]
    assert_close(dx, want[0], tol, "dx")
    assert_close(dw, want[1], tol, "dw")
    assert_close(db, want[2], tol, "db")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [LINEAR_CASES[1], LINEAR_CASES[2]], ids=str)
def test_linear_without_bias(case, dtype):
    x, w, _, dy = linear_data(case, dtype)
    y = F.linear(x, w, None)
    check_array(y, dy.shape, dtype)
    assert_close(y, ref.linear(wide(x), wide(w)), TOL["linear"][dtype])
    np.testing.assert_array_equal(F.linear(x, w), y)


@pytest.mark.parametrize("case", LINEAR_CASES[:5], ids=str)
def test_linear_backward_finite_differences(case):
    x, w, b, g = linear_data(case, F64)

    def objective():
        return float(np.sum(F.linear(x, w, b) * g))

    dx, dw, db = F.linear_backward(g, x, w)
    fd_check(dx, objective, x, "dx")
    fd_check(dw, objective, w, "dw")
    fd_check(db, objective, b, "db")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flatten_matches_oracle(dtype):
    x = randn(rng_for("flatten"), (3, 2, 4, 5), dtype)
    f = F.flatten(x)
    check_array(f, (3, 40), dtype)
    assert_close(f, ref.flatten(wide(x)), TOL["flatten"][dtype])
    g = randn(rng_for("flatten-g"), (3, 40), dtype)
    dx = F.flatten_backward(g, x.shape)
    check_array(dx, x.shape, dtype)
    assert_close(dx, ref.flatten_backward(wide(g), x.shape), TOL["flatten"][dtype])
    x64, g64 = wide(x).copy(), wide(g)
    fd_check(
        F.flatten_backward(g64, x.shape),
        lambda: float(np.sum(F.flatten(x64) * g64)),
        x64,
        "flatten",
    )


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------

LOSS_SHAPES = [(1, 1), (4, 1), (3, 5), (2, 3, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=str)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_binary_cross_entropy_matches_oracle(shape, dtype, hard):
    rng = rng_for("bce", shape, hard)
    a = rng.uniform(0.01, 0.99, shape).astype(dtype)
    y = (rng.integers(0, 2, shape) if hard else rng.uniform(0, 1, shape)).astype(dtype)
    loss = F.binary_cross_entropy(a, y)
    assert type(loss) is float
    assert_close(
        loss, ref.binary_cross_entropy(wide(a), wide(y)), TOL["binary_cross_entropy"][dtype]
    )
    da = F.binary_cross_entropy_backward(a, y)
    check_array(da, shape, dtype)
    assert_close(
        da,
        ref.binary_cross_entropy_backward(wide(a), wide(y)),
        TOL["binary_cross_entropy_backward"][dtype],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_binary_cross_entropy_clamps_logs_at_minus_100(dtype):
    a = np.array([0.0, 1.0, 0.0, 1.0], dtype)
    y = np.array([1.0, 0.0, 0.0, 1.0], dtype)
    assert F.binary_cross_entropy(a[:1], y[:1]) == 100.0
    assert F.binary_cross_entropy(a[1:2], y[1:2]) == 100.0
    assert F.binary_cross_entropy(a[2:], y[2:]) == 0.0
    loss = F.binary_cross_entropy(a, y)
    assert loss == 50.0
    da = F.binary_cross_entropy_backward(a, y)
    assert np.isfinite(da).all()
    assert_close(
        da,
        ref.binary_cross_entropy_backward(wide(a), wide(y)),
        TOL["binary_cross_entropy_backward"][dtype],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=str)
def test_binary_cross_entropy_with_logits_matches_oracle(shape, dtype):
    rng = rng_for("bcel", shape)
    z = randn(rng, shape, dtype, scale=4.0)
    y = rng.uniform(0, 1, shape).astype(dtype)
    loss = F.binary_cross_entropy_with_logits(z, y)
    assert type(loss) is float
    assert_close(
        loss,
        ref.binary_cross_entropy_with_logits(wide(z), wide(y)),
        TOL["binary_cross_entropy_with_logits"][dtype],
    )
    dz = F.binary_cross_entropy_with_logits_backward(z, y)
    check_array(dz, shape, dtype)
    assert_close(
        dz,
        ref.binary_cross_entropy_with_logits_backward(wide(z), wide(y)),
        TOL["binary_cross_entropy_with_logits_backward"][dtype],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_binary_cross_entropy_with_logits_is_stable(dtype):
    z = np.array([-1e4, -1000.0, -100.0, 0.0, 100.0, 1000.0, 1e4], dtype)
    y = np.array([1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = F.binary_cross_entropy_with_logits(z, y)
        dz = F.binary_cross_entropy_with_logits_backward(z, y)
    assert np.isfinite(loss) and np.isfinite(dz).all()
    assert_close(
        loss,
        ref.binary_cross_entropy_with_logits(wide(z), wide(y)),
        TOL["binary_cross_entropy_with_logits"][dtype],
    )
    assert_close(
        dz,
        ref.binary_cross_entropy_with_logits_backward(wide(z), wide(y)),
        TOL["binary_cross_entropy_with_logits_backward"][dtype],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("NK", [(1, 1), (1, 2), (6, 5), (32, 10)], ids=str)
def test_cross_entropy_matches_oracle(NK, dtype):
    rng = rng_for("ce", NK)
    z = randn(rng, NK, dtype, scale=3.0)
    labels = rng.integers(0, NK[1], NK[0])
    loss = F.cross_entropy(z, labels)
    assert type(loss) is float
    assert_close(loss, ref.cross_entropy(wide(z), labels), TOL["cross_entropy"][dtype])
    dz = F.cross_entropy_backward(z, labels)
    check_array(dz, NK, dtype)
    assert_close(
        dz, ref.cross_entropy_backward(wide(z), labels), TOL["cross_entropy_backward"][dtype]
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cross_entropy_is_stable_and_takes_any_integer_labels(dtype):
    z = np.array([[1000.0, 0.0, -1000.0], [-1000.0, -1001.0, -1002.0], [0.0, 0.0, 0.0]], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for labels in (
            np.array([2, 0, 1]),
            np.array([2, 0, 1], np.int32),
            np.array([2, 0, 1], np.uint8),
            [2, 0, 1],
        ):
            loss = F.cross_entropy(z, labels)
            dz = F.cross_entropy_backward(z, labels)
            assert type(loss) is float and np.isfinite(loss) and np.isfinite(dz).all()
            assert_close(loss, ref.cross_entropy(wide(z), [2, 0, 1]), TOL["cross_entropy"][dtype])
            assert_close(
                dz,
                ref.cross_entropy_backward(wide(z), [2, 0, 1]),
                TOL["cross_entropy_backward"][dtype],
            )
    assert_close(F.cross_entropy(z[2:], [1]), np.log(3.0), TOL["cross_entropy"][dtype])


def test_binary_cross_entropy_backward_finite_differences():
    rng = rng_for("bce-fd")
    a = rng.uniform(0.05, 0.95, (4, 3))
    for y in (rng.uniform(0, 1, a.shape), rng.integers(0, 2, a.shape).astype(F64)):
        fd_check(
            F.binary_cross_entropy_backward(a, y), lambda: F.binary_cross_entropy(a, y), a, "bce"
        )


def test_binary_cross_entropy_with_logits_backward_finite_differences():
    rng = rng_for("bcel-fd")
    z = rng.standard_normal((3, 5)) * 4
    z = np.where(np.abs(z) < 1e-2, 0.5, z)  # |z| and max(z, 0) have kinks at 0
    y = rng.uniform(0, 1, z.shape)
    fd_check(
        F.binary_cross_entropy_with_logits_backward(z, y),
        lambda: F.binary_cross_entropy_with_logits(z, y),
        z,
        "bce_with_logits",
    )


def test_cross_entropy_backward_finite_differences():
    rng = rng_for("ce-fd")
    z = rng.standard_normal((6, 5)) * 3
    labels = rng.integers(0, 5, 6)
    fd_check(F.cross_entropy_backward(z, labels), lambda: F.cross_entropy(z, labels), z, "ce")


# ---------------------------------------------------------------------------------------
# output_size
# ---------------------------------------------------------------------------------------


def test_output_size_floors():
    assert F.output_size(6, 3) == 4
    assert F.output_size(7, 3, 2) == 3
    assert F.output_size(8, 3, 2) == 3  # floored
    assert F.output_size(5, 3, 2, 1) == 3
    assert F.output_size(1, 1) == 1
    assert F.output_size(4, 3, 1, 3) == 8
    assert F.output_size(2, 5, 1, 0) == -2  # window larger than the input: < 1, not an error


# ---------------------------------------------------------------------------------------
# the array contract: layouts, lists, determinism
# ---------------------------------------------------------------------------------------


def layouts(a):
    """The same values in other memory layouts: Fortran order, strided, reversed views."""
    a = np.ascontiguousarray(a)
    out = {"fortran": np.asfortranarray(a)}
    if a.ndim:
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        out["strided"] = big[..., ::2]
        out["reversed"] = np.ascontiguousarray(a[..., ::-1])[..., ::-1]
        if a.ndim >= 2:
            out["transposed"] = np.ascontiguousarray(np.swapaxes(a, 0, -1)).swapaxes(0, -1)
    for v in out.values():
        np.testing.assert_array_equal(v, a)
    return out


def _calls(dtype):
    """(name, function, args) for every kernel; all array arguments are C-contiguous."""
    rng = rng_for("calls", np.dtype(dtype).name)
    x = randn(rng, (2, 3, 7, 6), dtype)
    w = randn(rng, (4, 3, 3, 2), dtype)
    b = randn(rng, (4,), dtype)
    dy = randn(rng, (2, 4, 4, 7), dtype)
    y, idx = F.max_pool2d(x, 3, 2, 1)
    dp = randn(rng, y.shape, dtype)
    z = randn(rng, (5, 6), dtype)
    a = F.sigmoid(z)
    t = rng.uniform(0, 1, z.shape).astype(dtype)
    lx, lw, lb = randn(rng, (5, 6), dtype), randn(rng, (3, 6), dtype), randn(rng, (3,), dtype)
    ldy = randn(rng, (5, 3), dtype)
    labels = rng.integers(0, 6, 5)
    return [
        ("conv2d", F.conv2d, (x, w, b, (2, 1), 1)),
        ("conv2d_backward", F.conv2d_backward, (dy, x, w, (2, 1), 1)),
        ("max_pool2d", F.max_pool2d, (x, 3, 2, 1)),
        ("max_pool2d_backward", F.max_pool2d_backward, (dp, idx, x.shape)),
        ("relu", F.relu, (z,)),
        ("relu_backward", F.relu_backward, (t, z)),
        ("sigmoid", F.sigmoid, (z,)),
        ("sigmoid_backward", F.sigmoid_backward, (t, a)),
        ("linear", F.linear, (lx, lw, lb)),
        ("linear_backward", F.linear_backward, (ldy, lx, lw)),
        ("binary_cross_entropy", F.binary_cross_entropy, (a, t)),
        ("binary_cross_entropy_backward", F.binary_cross_entropy_backward, (a, t)),
        ("binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits, (z, t)),
        (
            "binary_cross_entropy_with_logits_backward",
            F.binary_cross_entropy_with_logits_backward,
            (z, t),
        ),
        ("cross_entropy", F.cross_entropy, (z, labels)),
        ("cross_entropy_backward", F.cross_entropy_backward, (z, labels)),
    ]


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def assert_identical(got, want, what):
    got, want = as_tuple(got), as_tuple(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, float):
            assert type(g) is float and (g == w or (np.isnan(g) and np.isnan(w))), what
        else:
            assert g.dtype == w.dtype and g.shape == w.shape, what
            assert g.flags.c_contiguous, f"{what}: output not C-contiguous"
            assert g.tobytes() == w.tobytes(), f"{what}: not bitwise identical"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_other_layouts_give_identical_results(dtype):
    for name, fn, args in _calls(dtype):
        want = fn(*args)
        for i, arg in enumerate(args):
            if not isinstance(arg, np.ndarray):
                continue
            for layout, variant in layouts(arg).items():
                got = fn(*args[:i], variant, *args[i + 1 :])
                assert_identical(got, want, f"{name} argument {i} {layout}")
        # every array argument in Fortran order at once
        got = fn(*(np.asfortranarray(a) if isinstance(a, np.ndarray) else a for a in args))
        assert_identical(got, want, f"{name} all Fortran")


def test_lists_are_accepted_as_arrays():
    for name, fn, args in _calls(F64):
        want = fn(*args)
        as_lists = [a.tolist() if isinstance(a, np.ndarray) else a for a in args]
        got = fn(*as_lists)
        assert_identical(got, want, f"{name} with lists")


def test_dtypes_equal_to_float32_or_float64_are_accepted():
    # A float64 array that went through pickle (multiprocessing, joblib, a saved object) or
    # whose dtype carries metadata has a dtype object equal to np.float64 but not the same
    # object; it holds the same native float64 numbers and must be accepted.
    for dtype in DTYPES:
        for name, fn, args in _calls(dtype):
            want = fn(*args)
            variants = {
                "pickled": lambda a: pickle.loads(pickle.dumps(a)),
                "metadata": lambda a: a.view(np.dtype(a.dtype, metadata={"unit": "m"})),
                "native byte order": lambda a: a.view(a.dtype.newbyteorder("=")),
            }
            for vname, make in variants.items():
                new = [
                    make(a) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a
                    for a in args
                ]
                assert all(
                    n.dtype == a.dtype for n, a in zip(new, args) if isinstance(a, np.ndarray)
                )
                assert_identical(fn(*new), want, f"{name} with {vname} arrays")


def test_flatten_accepts_lists():
    # like every other function of the functional API
    x = randn(rng_for("flatten-list"), (2, 3, 2, 2), F64)
    got = F.flatten(x.tolist())
    check_array(got, (2, 12), F64)
    np.testing.assert_array_equal(got, F.flatten(x))
    got = F.flatten_backward(got.tolist(), x.shape)
    check_array(got, x.shape, F64)
    np.testing.assert_array_equal(got, x)


def test_flatten_outputs_are_c_contiguous_for_any_input_layout():
    # "outputs are new C-contiguous arrays", whatever the layout of the input
    x = randn(rng_for("flatten-layout"), (2, 3, 2, 2), F64)
    f = F.flatten(x)
    for name, variant in layouts(x).items():
        got = F.flatten(variant)
        check_array(got, (2, 12), F64)
        np.testing.assert_array_equal(got, f, err_msg=name)
    for name, variant in layouts(f).items():
        got = F.flatten_backward(variant, x.shape)
        check_array(got, x.shape, F64)
        np.testing.assert_array_equal(got, x, err_msg=name)


def test_stride_padding_and_kernel_accept_ints_pairs_and_numpy_ints():
    x = randn(rng_for("pairs"), (1, 2, 7, 8), F64)
    w = randn(rng_for("pairs-w"), (3, 2, 3, 2), F64)
    b = np.zeros(3)
    want = F.conv2d(x, w, b, (2, 2), (1, 1))
    for stride, padding in [
        (2, 1),
        ([2, 2], [1, 1]),
        (np.int64(2), np.int32(1)),
        ((np.int64(2), 2), (1, np.int8(1))),
    ]:
        assert_identical(F.conv2d(x, w, b, stride, padding), want, f"{stride} {padding}")
        assert_identical(
            F.conv2d_backward(want, x, w, stride, padding),
            F.conv2d_backward(want, x, w, (2, 2), (1, 1)),
            f"{stride} {padding}",
        )
    want = F.max_pool2d(x, (3, 3), (2, 2), (1, 1))
    for k, s, p in [(3, 2, 1), ([3, 3], [2, 2], [1, 1]), (np.int64(3), np.int64(2), 1)]:
        assert_identical(F.max_pool2d(x, k, s, p), want, f"{k} {s} {p}")
    # keyword arguments by their documented names
    assert_identical(F.conv2d(x=x, w=w, b=b, stride=2, padding=1), F.conv2d(x, w, b, 2, 1), "kw")
    assert_identical(F.max_pool2d(x=x, kernel_size=3, stride=2, padding=1), want, "kw")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_same_call_twice_is_bitwise_identical(dtype):
    rng = rng_for("twice")
    x, w, b, stride, padding = conv_data(BIG_CONV_CASE, dtype)
    dy = randn(rng, conv_out_shape(BIG_CONV_CASE), dtype)
    xp = randn(rng, (2, 16, 24, 24), dtype)
    yp, idx = F.max_pool2d(xp, 3, 2, 1)
    lx, lw, ldy = (
        randn(rng, (64, 300), dtype),
        randn(rng, (40, 300), dtype),
        randn(rng, (64, 40), dtype),
    )
    z = randn(rng, (64, 64, 20), dtype)
    calls = [
        (F.conv2d, (x, w, b, stride, padding)),
        (F.conv2d_backward, (dy, x, w, stride, padding)),
        (F.max_pool2d, (xp, 3, 2, 1)),
        (F.max_pool2d_backward, (yp, idx, xp.shape)),
        (F.linear, (lx, lw, ldy[0])),
        (F.linear_backward, (ldy, lx, lw)),
        (F.relu, (z,)),
        (F.relu_backward, (z, z)),
        (F.sigmoid, (z,)),
        (F.sigmoid_backward, (z, z)),
    ] + [(fn, args) for _, fn, args in _calls(dtype)]
    for fn, args in calls:
        assert_identical(fn(*args), fn(*args), fn.__name__)


_THREADS_SCRIPT = textwrap.dedent("""
    import hashlib
    import numpy as np
    from cnnbp import functional as F
    rng = np.random.default_rng(7)
    out = hashlib.sha256()
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((4, 8, 20, 20)).astype(dtype)
        w = rng.standard_normal((8, 8, 3, 3)).astype(dtype)
        b = rng.standard_normal(8).astype(dtype)
        y = F.conv2d(x, w, b, 1, 1)
        results = [y, *F.conv2d_backward(y, x, w, 1, 1)]
        p, idx = F.max_pool2d(x, 3, 2, 1)
        results += [p, idx, F.max_pool2d_backward(p, idx, x.shape)]
        lx = rng.standard_normal((128, 300)).astype(dtype)
        lw = rng.standard_normal((64, 300)).astype(dtype)
        ly = F.linear(lx, lw, b[:1].repeat(64))
        results += [ly, *F.linear_backward(ly, lx, lw), F.relu(x), F.sigmoid(x)]
        for r in results:
            out.update(r.tobytes())
    print(out.hexdigest())
""")


def test_results_do_not_depend_on_the_number_of_threads():
    digests = set()
    for threads in ("1", "2", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        run = subprocess.run(
            [sys.executable, "-c", _THREADS_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        digests.add(run.stdout.strip())
    assert len(digests) == 1


def test_inputs_are_not_modified():
    for dtype in DTYPES:
        for name, fn, args in _calls(dtype):
            copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
            fn(*args)
            for a, c in zip(args, copies):
                if isinstance(a, np.ndarray):
                    np.testing.assert_array_equal(a, c, err_msg=name)


def test_backward_outputs_are_new_arrays():
    # backward returns gradients, it never accumulates into or aliases its arguments
    for name, fn, args in _calls(F64):
        results = as_tuple(fn(*args))
        for r in results:
            if isinstance(r, np.ndarray):
                for a in args:
                    if isinstance(a, np.ndarray):
                        assert not np.shares_memory(r, a), name


# ---------------------------------------------------------------------------------------
# conv2d workspace
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stride, dtype", [(1, "float32"), (2, "float32"), (1, "float64"), (2, "float64")]
)
def test_conv2d_workspace_is_bounded_by_images_not_batch(stride, dtype):
    # scratch memory is a few images per thread plus fixed partial sums: it stops growing
    # once the batch outnumbers the reduction chunks
    sizes = [
        F.conv2d_workspace_bytes((n, 16, 24, 24), (32, 16, 3, 3), stride, 1, dtype)
        for n in (64, 256, 1024)
    ]
    assert sizes[0] > 0
    assert sizes[0] == sizes[1] == sizes[2]
    whole_batch_im2col = 1024 * 16 * 9 * 24 * 24 * np.dtype(dtype).itemsize
    assert sizes[2] < whole_batch_im2col / 100


def test_conv2d_workspace_of_tiny_problems_is_zero_and_arguments_are_checked():
    assert F.conv2d_workspace_bytes((1, 1, 6, 6), (1, 1, 3, 3)) == 0
    with pytest.raises(ValueError, match=r"\[conv2d_workspace_bytes\] weight"):
        F.conv2d_workspace_bytes((1, 2, 6, 6), (1, 3, 3, 3))
    with pytest.raises(TypeError, match=r"\[conv2d_workspace_bytes\] dtype"):
        F.conv2d_workspace_bytes((1, 2, 6, 6), (1, 2, 3, 3), dtype="int32")
