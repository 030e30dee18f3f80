"""Tests of the NumPy oracle itself (cnnbp.reference).

1. every backward against central finite differences in float64;
2. small hand-computed answers and the PyTorch edge-case semantics (ties, NaN, -inf, clamps);
3. forward and backward against PyTorch in float64, when torch is installed.
"""

import itertools
import re

import numpy as np
import pytest
from cnnbp import reference as ref
from cnnbp.gradcheck import numeric_gradient
from conftest import SGD_CONFIG_IDS, SGD_CONFIGS, fd_check, rng_for
from ops import AVG_POOL2D, AVG_POOL_CASES

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def check_array(got, shape, dtype=np.float64):
    """Shape, dtype and layout before values."""
    assert isinstance(got, np.ndarray)
    assert got.shape == tuple(shape)
    assert got.dtype == dtype
    assert got.flags.c_contiguous


FD_TOL = dict(rtol=1e-6, atol=1e-8)


def check_gradient(grad, objective, x, what=""):
    """A gradient with respect to x: float64, C-contiguous, x's shape, and within FD_TOL of
    central differences of objective() at x."""
    check_array(grad, x.shape)
    np.testing.assert_allclose(grad, numeric_gradient(objective, x), err_msg=what, **FD_TOL)


# ---------------------------------------------------------------------------------------
# 1. finite differences
# ---------------------------------------------------------------------------------------

CONV_CASES = [
    # (N, C, H, W, K, R, S, stride, padding)
    (2, 3, 5, 6, 4, 3, 3, 1, 0),
    (2, 2, 7, 7, 3, 3, 3, 2, 1),
    (1, 2, 6, 5, 2, 2, 3, (2, 1), (1, 0)),
    (2, 1, 6, 6, 1, 3, 3, 1, 0),  # the derivation's conv
    (1, 2, 4, 4, 2, 3, 3, 1, 2),  # padding bigger than needed
    (1, 1, 8, 8, 2, 2, 2, 3, 0),  # stride past the filter: some cells unread
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_backward_finite_differences(case):
    N, C, H, W, K, R, S, stride, padding = case
    rng = np.random.default_rng(100 + CONV_CASES.index(case))
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((K, C, R, S))
    b = rng.standard_normal(K)
    y = ref.conv2d(x, w, b, stride=stride, padding=padding)
    g = rng.standard_normal(y.shape)

    def objective():
        return float(np.sum(ref.conv2d(x, w, b, stride=stride, padding=padding) * g))

    dx, dw, db = ref.conv2d_backward(g, x, w, stride=stride, padding=padding)
    for grad, wrt in ((dx, x), (dw, w), (db, b)):
        check_gradient(grad, objective, wrt)


# torch's other conv2d options. 'same' pads total = dilation * (kernel - 1) per axis, top =
# total // 2 and bottom = total - top: an odd total needs an even kernel and an odd dilation.
CONV_OPTION_CASES = [
    # (N, C, H, W, K, R, S, stride, padding, dilation, groups)
    (2, 2, 7, 7, 3, 3, 3, 1, 0, 2, 1),  # dilation 2
    (1, 2, 9, 8, 2, 3, 2, 1, 1, 3, 1),  # dilation 3, padded
    (2, 2, 8, 9, 2, 3, 3, 1, (1, 2), (2, 1), 1),  # dilation pair
    (1, 2, 6, 9, 2, 2, 3, 1, 0, (1, 3), 1),  # dilation pair, the other way
    (1, 3, 9, 9, 2, 3, 3, 2, 1, 2, 1),  # dilation with stride 2
    (2, 2, 10, 9, 3, 2, 3, (2, 3), (0, 2), (3, 2), 1),  # stride and dilation pairs
    (2, 4, 6, 6, 6, 3, 3, 1, 1, 1, 2),  # groups 2
    (1, 6, 7, 6, 3, 3, 2, 2, 1, 1, 3),  # groups 3, strided
    (2, 3, 6, 6, 3, 3, 3, 1, 1, 1, 3),  # depthwise: groups == C == K
    (1, 3, 7, 7, 6, 3, 3, 2, 1, 2, 3),  # depthwise, K == 2C, dilated and strided
    (2, 2, 5, 6, 3, 3, 3, 1, "same", 1, 1),  # 'same', odd kernel: total 2, even
    (1, 2, 5, 6, 2, 2, 2, 1, "same", 1, 1),  # 'same', kernel 2: total 1, extra bottom/right
    (1, 2, 6, 5, 2, 4, 4, 1, "same", 1, 1),  # 'same', kernel 4: total 3
    (1, 2, 7, 7, 2, 2, 4, 1, "same", 2, 1),  # 'same', dilation 2: totals 2 and 6, even
    (1, 2, 7, 8, 2, 3, 2, (1, 1), "same", (2, 3), 1),  # totals 4 and 3: even and odd
    (1, 2, 6, 6, 2, 2, 2, 1, "same", 3, 1),  # dilation 3, kernel 2: total 3, odd
    (1, 4, 6, 7, 4, 2, 3, 1, "same", (3, 1), 2),  # 'same' with groups: totals 3 and 2
    (1, 2, 3, 3, 2, 3, 3, 1, "same", 2, 1),  # 'same' with a window wider than the input
    (2, 2, 6, 7, 3, 3, 2, 1, "valid", 1, 1),  # 'valid' is padding 0
    (1, 2, 7, 8, 2, 2, 3, 2, "valid", 2, 1),  # 'valid', strided and dilated
    (2, 3, 7, 6, 2, 3, 2, (1, 3), (2, 0), 1, 1),  # asymmetric stride and padding pairs
    (1, 2, 8, 7, 3, 2, 3, (3, 2), (0, 1), 1, 1),
    (2, 3, 4, 5, 4, 1, 1, 1, 0, 1, 1),  # 1x1 kernel
    (1, 4, 5, 5, 4, 1, 1, 2, 1, 1, 2),  # 1x1 kernel, strided, padded, grouped
    (1, 2, 4, 5, 2, 1, 1, 1, "same", 3, 1),  # 1x1 'same': no padding whatever the dilation
]


def conv_option_sample(case, seed):
    """x, w, b and the keyword options of a CONV_OPTION_CASES case."""
    N, C, H, W, K, R, S, stride, padding, dilation, groups = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((K, C // groups, R, S))
    b = rng.standard_normal(K)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return rng, x, w, b, options


@pytest.mark.parametrize("case", CONV_OPTION_CASES, ids=str)
def test_conv2d_options_backward_finite_differences(case):
    rng, x, w, b, options = conv_option_sample(case, 1600 + CONV_OPTION_CASES.index(case))
    y = ref.conv2d(x, w, b, **options)
    g = rng.standard_normal(y.shape)

    def objective():
        return float(np.sum(ref.conv2d(x, w, b, **options) * g))

    dx, dw, db = ref.conv2d_backward(g, x, w, **options)
    for grad, wrt in ((dx, x), (dw, w), (db, b)):
        check_gradient(grad, objective, wrt)


POOL_CASES = [
    # (N, C, H, W, kernel, stride, padding)
    (2, 2, 4, 4, 2, None, 0),
    (1, 2, 7, 7, 3, 2, 0),  # overlapping windows
    (2, 1, 6, 5, 3, 2, 1),  # overlapping windows and -inf padding
    (1, 1, 5, 7, (2, 3), (1, 2), (1, 1)),
    (1, 1, 5, 5, 2, 1, 0),
]


@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool2d_backward_finite_differences(case):
    N, C, H, W, kernel, stride, padding = case
    rng = np.random.default_rng(200 + POOL_CASES.index(case))
    # Distinct values 0.1 apart: no ties, and a 1e-6 step never changes an argmax.
    x = rng.permutation(N * C * H * W).reshape(N, C, H, W) * 0.1 - 1.0
    y, idx = ref.max_pool2d(x, kernel, stride, padding)
    check_array(idx, y.shape, np.int64)
    g = rng.standard_normal(y.shape)

    def objective():
        return float(np.sum(ref.max_pool2d(x, kernel, stride, padding)[0] * g))

    check_gradient(ref.max_pool2d_backward(g, idx, x.shape), objective, x)


def test_relu_backward_finite_differences():
    rng = np.random.default_rng(300)
    z = rng.standard_normal((3, 4, 5))
    z = np.where(np.abs(z) < 1e-2, 0.5, z)  # keep away from the kink at 0
    g = rng.standard_normal(z.shape)
    check_gradient(ref.relu_backward(g, z), lambda: float(np.sum(ref.relu(z) * g)), z)


def test_sigmoid_backward_finite_differences():
    rng = np.random.default_rng(301)
    z = rng.standard_normal((4, 6)) * 3
    g = rng.standard_normal(z.shape)
    dz = ref.sigmoid_backward(g, ref.sigmoid(z))
    check_gradient(dz, lambda: float(np.sum(ref.sigmoid(z) * g)), z)


@pytest.mark.parametrize("x_shape", [(5, 4), (2, 3, 4), (4,)])
def test_linear_backward_finite_differences(x_shape):
    rng = np.random.default_rng(302 + len(x_shape))
    IN, OUT = x_shape[-1], 3
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((OUT, IN))
    b = rng.standard_normal(OUT)
    y = ref.linear(x, w, b)
    check_array(y, x_shape[:-1] + (OUT,))
    g = rng.standard_normal(y.shape)

    def objective():
        return float(np.sum(ref.linear(x, w, b) * g))

    dx, dw, db = ref.linear_backward(g, x, w)
    for grad, wrt in ((dx, x), (dw, w), (db, b)):
        check_gradient(grad, objective, wrt)


def test_flatten_backward_finite_differences():
    rng = np.random.default_rng(305)
    x = rng.standard_normal((2, 3, 2, 2))
    F = ref.flatten(x)
    check_array(F, (2, 12))
    g = rng.standard_normal(F.shape)
    dx = ref.flatten_backward(g, x.shape)
    check_gradient(dx, lambda: float(np.sum(ref.flatten(x) * g)), x)


def test_binary_cross_entropy_backward_finite_differences():
    rng = np.random.default_rng(306)
    a = rng.uniform(0.05, 0.95, (4, 3))
    y = rng.uniform(0.0, 1.0, (4, 3))  # soft targets too
    da = ref.binary_cross_entropy_backward(a, y)
    check_gradient(da, lambda: ref.binary_cross_entropy(a, y), a)


def test_binary_cross_entropy_with_logits_backward_finite_differences():
    rng = np.random.default_rng(307)
    z = rng.standard_normal((3, 5)) * 4
    z = np.where(np.abs(z) < 1e-2, 0.5, z)  # |z| and max(z, 0) have kinks at 0
    y = rng.uniform(0.0, 1.0, z.shape)
    dz = ref.binary_cross_entropy_with_logits_backward(z, y)
    check_gradient(dz, lambda: ref.binary_cross_entropy_with_logits(z, y), z)


def test_cross_entropy_backward_finite_differences():
    rng = np.random.default_rng(308)
    z = rng.standard_normal((6, 5)) * 3
    labels = rng.integers(0, 5, 6)
    dz = ref.cross_entropy_backward(z, labels)
    check_gradient(dz, lambda: ref.cross_entropy(z, labels), z)


SEED_KEYS = [
    "X", "W1", "B1", "Z1", "A1", "P1", "F", "W2", "B2", "Z2", "A2", "Y", "L",
    "dL/dA2", "dL/dZ2", "dL/dW2", "dL/dB2", "dL/dF", "dL/dP1", "dL/dA1", "dL/dZ1",
    "dL/dW1", "dL/dB1", "dL/dX",
]  # fmt: skip


def seed_inputs(seed, N):
    """Random derivation-network inputs, far from ReLU kinks and max-pool ties."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, 1, 6, 6))
    W1 = rng.standard_normal((1, 1, 3, 3))
    B1 = rng.standard_normal(1) * 0.1
    W2 = rng.standard_normal((1, 4))
    B2 = rng.standard_normal(1) * 0.1
    Y = rng.integers(0, 2, (N, 1)).astype(np.float64)
    return X, W1, B1, W2, B2, Y


def kink_margin(Z1):
    """Smallest distance of Z1 to the ReLU kink and, in each 2x2 pooling window with a
    positive maximum, between the two largest values (a tie there would make the
    gradient ill-defined)."""
    margin = np.min(np.abs(Z1))
    A1 = np.maximum(Z1, 0)
    N = Z1.shape[0]
    windows = A1.reshape(N, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(N, 4, 4)
    top2 = np.sort(windows, axis=-1)[..., -2:]
    positive = top2[..., 1] > 0
    if positive.any():
        margin = min(margin, np.min(top2[..., 1][positive] - top2[..., 0][positive]))
    return margin


@pytest.mark.parametrize("seed, N", [(400, 1), (401, 3)])
def test_seed_network_finite_differences(seed, N):
    X, W1, B1, W2, B2, Y = seed_inputs(seed, N)
    out = ref.seed_network(X, W1, B1, W2, B2, Y)
    assert list(out) == SEED_KEYS
    assert isinstance(out["L"], float)
    # The finite-difference check is only meaningful away from kinks and ties.
    assert kink_margin(out["Z1"]) > 1e-3

    shapes = {
        "Z1": (N, 1, 4, 4), "A1": (N, 1, 4, 4), "P1": (N, 1, 2, 2), "F": (N, 4),
        "Z2": (N, 1), "A2": (N, 1), "dL/dA2": (N, 1), "dL/dZ2": (N, 1),
        "dL/dW2": (1, 4), "dL/dB2": (1,), "dL/dF": (N, 4), "dL/dP1": (N, 1, 2, 2),
        "dL/dA1": (N, 1, 4, 4), "dL/dZ1": (N, 1, 4, 4), "dL/dW1": (1, 1, 3, 3),
        "dL/dB1": (1,), "dL/dX": (N, 1, 6, 6),
    }  # fmt: skip
    for key, shape in shapes.items():
        check_array(out[key], shape)

    def loss():
        return ref.seed_network(X, W1, B1, W2, B2, Y)["L"]

    # All 15 parameters and the input, through the loss.
    for name, arr in [("X", X), ("W1", W1), ("B1", B1), ("W2", W2), ("B2", B2)]:
        check_gradient(out["dL/d" + name], loss, arr, name)
    # Intermediate gradients, by perturbing the forward from that point on.
    A2 = out["A2"].copy()
    check_gradient(out["dL/dA2"], lambda: ref.binary_cross_entropy(A2, Y), A2)
    Z2 = out["Z2"].copy()
    check_gradient(out["dL/dZ2"], lambda: ref.binary_cross_entropy(ref.sigmoid(Z2), Y), Z2)
    F = out["F"].copy()
    check_gradient(
        out["dL/dF"], lambda: ref.binary_cross_entropy(ref.sigmoid(ref.linear(F, W2, B2)), Y), F
    )
    Z1 = out["Z1"].copy()

    def loss_from_z1():
        P1, _ = ref.max_pool2d(ref.relu(Z1), 2, 2)
        Z2 = ref.linear(ref.flatten(P1), W2, B2)
        return ref.binary_cross_entropy(ref.sigmoid(Z2), Y)

    check_gradient(out["dL/dZ1"], loss_from_z1, Z1)


def test_seed_network_matches_the_generic_backwards():
    X, W1, B1, W2, B2, Y = seed_inputs(402, 4)
    out = ref.seed_network(X, W1, B1, W2, B2, Y)
    N = X.shape[0]
    # The fused dL/dZ2 = (A2 - Y) / N equals BCE's backward followed by sigmoid's.
    np.testing.assert_allclose(
        out["dL/dZ2"], ref.sigmoid_backward(out["dL/dA2"], out["A2"]), rtol=1e-12
    )
    np.testing.assert_allclose(out["dL/dZ2"], (out["A2"] - Y) / N, rtol=0, atol=0)
    dF, dW2, dB2 = ref.linear_backward(out["dL/dZ2"], out["F"], W2)
    np.testing.assert_allclose(out["dL/dF"], dF, rtol=1e-14)
    np.testing.assert_allclose(out["dL/dW2"], dW2, rtol=1e-14)
    np.testing.assert_allclose(out["dL/dB2"], dB2, rtol=1e-14)
    np.testing.assert_array_equal(out["dL/dP1"], out["dL/dF"].reshape(N, 1, 2, 2))
    np.testing.assert_array_equal(out["dL/dZ1"], out["dL/dA1"] * (out["Z1"] > 0))
    np.testing.assert_allclose(out["dL/dB1"], [out["dL/dZ1"].sum()], rtol=1e-14)
    np.testing.assert_array_equal(out["P1"].reshape(N, 4), out["F"])


# ---------------------------------------------------------------------------------------
# 2. hand-computed answers and edge-case semantics
# ---------------------------------------------------------------------------------------


def test_conv2d_known_answer():
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1 2 3] [4 5 6] [7 8 9]]
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    y = ref.conv2d(x, w, [0.5])
    check_array(y, (1, 1, 2, 2))
    # y[0,0] = 1*1 + 2*2 + 3*4 + 4*5 = 37, and so on, plus the bias.
    np.testing.assert_array_equal(y[0, 0], [[37.5, 47.5], [67.5, 77.5]])

    dx, dw, db = ref.conv2d_backward(np.ones((1, 1, 2, 2)), x, w)
    # dw[r, s] = sum of the cells each filter tap read.
    np.testing.assert_array_equal(dw[0, 0], [[12.0, 16.0], [24.0, 28.0]])
    # dx = full convolution of ones with w: each cell sums the taps that read it.
    np.testing.assert_array_equal(dx[0, 0], [[1.0, 3.0, 2.0], [4.0, 10.0, 6.0], [3.0, 7.0, 4.0]])
    np.testing.assert_array_equal(db, [4.0])


def test_conv2d_padding_and_stride_known_answer():
    # A 1x1 input padded by 1 under a 3x3 filter: only the centre tap sees it.
    w = np.arange(9.0).reshape(1, 1, 3, 3)
    y = ref.conv2d([[[[2.0]]]], w, padding=1)
    np.testing.assert_array_equal(y, [[[[8.0]]]])
    # Stride 2 over a 4x4 input with a 1x1 filter picks every other cell.
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    y = ref.conv2d(x, [[[[1.0]]]], stride=2)
    np.testing.assert_array_equal(y[0, 0], [[0.0, 2.0], [8.0, 10.0]])
    dx, _, _ = ref.conv2d_backward(np.ones((1, 1, 2, 2)), x, [[[[1.0]]]], stride=2)
    np.testing.assert_array_equal(
        dx[0, 0], [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    )
    # (h, w) pairs: stride (1, 2), padding (0, 1).
    y = ref.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)), stride=(1, 2), padding=(0, 1))
    np.testing.assert_array_equal(y[0, 0], [[2.0, 4.0], [2.0, 4.0]])


def test_conv2d_channels_sum():
    # Two input channels are summed; two filters give two output channels.
    x = np.stack([np.ones((2, 2)), 2 * np.ones((2, 2))])[None]  # (1, 2, 2, 2)
    w = np.stack([np.ones((2, 2, 2)), -np.ones((2, 2, 2))])  # (2, 2, 2, 2)
    y = ref.conv2d(x, w, [1.0, 0.0])
    np.testing.assert_array_equal(y.reshape(-1), [13.0, -12.0])


def test_conv2d_dilation_known_answer():
    # x[h, w] = 5h + w; a 2x2 filter of ones with dilation 2 reads x[p, q], x[p, q + 2],
    # x[p + 2, q] and x[p + 2, q + 2]: 4 (5p + q) + 24.
    x = np.arange(25.0).reshape(1, 1, 5, 5)
    y = ref.conv2d(x, np.ones((1, 1, 2, 2)), dilation=2)
    check_array(y, (1, 1, 3, 3))
    np.testing.assert_array_equal(y[0, 0], [[24, 28, 32], [44, 48, 52], [64, 68, 72]])
    # Each tap sends dy to the cell it read: the four corners of each window, 2 apart.
    dx, dw, _ = ref.conv2d_backward(np.ones((1, 1, 3, 3)), x, np.ones((1, 1, 2, 2)), dilation=2)
    counts = [[1, 1, 2, 1, 1], [1, 1, 2, 1, 1], [2, 2, 4, 2, 2], [1, 1, 2, 1, 1], [1, 1, 2, 1, 1]]
    np.testing.assert_array_equal(dx[0, 0], counts)
    # dw[r, s] sums the 3x3 block of cells tap (r, s) read, which starts at (2r, 2s).
    np.testing.assert_array_equal(dw[0, 0], [[54.0, 72.0], [144.0, 162.0]])


def test_conv2d_groups_keep_channels_apart():
    # groups=2: filter 0 sees input channel 0 only, filter 1 channel 1 only.
    x = np.stack([np.ones((2, 2)), 2 * np.ones((2, 2))])[None]  # (1, 2, 2, 2)
    w = np.array([1.0, 10.0]).reshape(2, 1, 1, 1)  # (K, C/groups, R, S) = (2, 1, 1, 1)
    y = ref.conv2d(x, w, groups=2)
    check_array(y, (1, 2, 2, 2))
    np.testing.assert_array_equal(y[0, 0], np.ones((2, 2)))
    np.testing.assert_array_equal(y[0, 1], 20 * np.ones((2, 2)))
    dx, dw, db = ref.conv2d_backward(np.ones((1, 2, 2, 2)), x, w, groups=2)
    check_array(dw, (2, 1, 1, 1))
    np.testing.assert_array_equal(dx[0, 0], np.ones((2, 2)))  # only filter 0's weight
    np.testing.assert_array_equal(dx[0, 1], 10 * np.ones((2, 2)))  # only filter 1's
    np.testing.assert_array_equal(dw.reshape(-1), [4.0, 8.0])  # each its own channel's sum
    np.testing.assert_array_equal(db, [4.0, 4.0])


def test_conv2d_same_puts_the_odd_padding_cell_at_the_bottom_right():
    # A 2x2 filter needs one cell of padding per axis: none above/left, one below/right.
    x = np.arange(9.0).reshape(1, 1, 3, 3)  # [[0 1 2] [3 4 5] [6 7 8]]
    y = ref.conv2d(x, np.ones((1, 1, 2, 2)), padding="same")
    check_array(y, (1, 1, 3, 3))
    # y[p, q] sums x[p : p + 2, q : q + 2]; the last row and column read the zeros below/right.
    np.testing.assert_array_equal(y[0, 0], [[8, 12, 7], [20, 24, 13], [13, 15, 8]])
    # An odd filter pads evenly: 'same' with 3x3 is padding 1.
    w = np.arange(9.0).reshape(1, 1, 3, 3)
    np.testing.assert_array_equal(ref.conv2d(x, w, padding="same"), ref.conv2d(x, w, padding=1))
    # Dilation 2 with a 2x2 filter: total 2, one on each side, like padding 1.
    np.testing.assert_array_equal(
        ref.conv2d(x, w[:, :, :2, :2], padding="same", dilation=2),
        ref.conv2d(x, w[:, :, :2, :2], padding=1, dilation=2),
    )
    # 'valid' is no padding.
    np.testing.assert_array_equal(ref.conv2d(x, w, padding="valid"), ref.conv2d(x, w))


def test_conv2d_refuses_same_with_a_stride_unknown_strings_and_bad_groups():
    x, w = np.zeros((1, 4, 5, 5)), np.zeros((2, 4, 3, 3))
    strided = "[conv2d] padding: expected stride 1 with padding='same', got stride (2, 1)"
    with pytest.raises(ValueError, match=re.escape(strided)):
        ref.conv2d(x, w, stride=(2, 1), padding="same")
    with pytest.raises(ValueError, match=re.escape(strided)):
        ref.conv2d_backward(np.zeros((1, 2, 3, 5)), x, w, stride=(2, 1), padding="same")
    with pytest.raises(ValueError, match=re.escape("got stride (2, 2)")):
        ref.conv2d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match=re.escape("[conv2d] padding: expected an int, a pair")):
        ref.conv2d(x, w, padding="Same")  # torch's strings are lower case, exactly
    with pytest.raises(ValueError, match=re.escape("[conv2d] groups: expected a divisor")):
        ref.conv2d(x, np.zeros((2, 1, 3, 3)), groups=3)  # divides neither C = 4 nor K = 2
    with pytest.raises(ValueError, match=re.escape("[conv2d] groups: expected a divisor")):
        ref.conv2d(x, np.zeros((2, 1, 3, 3)), groups=4)  # divides C = 4 but not K = 2


def conv2d_as_before(x, w, b, stride, padding, dy):
    """The oracle's conv2d and conv2d_backward as written before dilation, groups and
    string paddings: (y, dx, dw, db)."""
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    (sh, sw), (ph, pw) = ref._pair(stride), ref._pair(padding)
    P, Q = ref.output_size(H, R, sh, ph), ref.output_size(W, S, sw, pw)
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y, dxpad, dw = np.zeros((N, K, P, Q)), np.zeros_like(xpad), np.zeros_like(w)
    for p in range(P):
        for q in range(Q):
            window = xpad[:, :, p * sh : p * sh + R, q * sw : q * sw + S]
            y[:, :, p, q] = np.einsum("ncrs,kcrs->nk", window, w)
            dw += np.einsum("nk,ncrs->kcrs", dy[:, :, p, q], window)
            dxpad[:, :, p * sh : p * sh + R, q * sw : q * sw + S] += np.einsum(
                "nk,kcrs->ncrs", dy[:, :, p, q], w
            )
    y += b.reshape(1, K, 1, 1)
    return y, dxpad[:, :, ph : ph + H, pw : pw + W], dw, dy.sum(axis=(0, 2, 3))


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_defaults_give_the_results_of_before(case):
    N, C, H, W, K, R, S, stride, padding = case
    rng = np.random.default_rng(1700 + CONV_CASES.index(case))
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((K, C, R, S))
    b = rng.standard_normal(K)
    y = ref.conv2d(x, w, b, stride, padding)  # the old signature, positionally
    dy = rng.standard_normal(y.shape)
    before = conv2d_as_before(x, w, b, stride, padding, dy)
    # dilation 1, groups 1 and an int or pair padding compute exactly what they did before.
    np.testing.assert_array_equal(y, before[0])
    np.testing.assert_array_equal(ref.conv2d(x, w, b, stride, padding, 1, 1), before[0])
    for got, want in zip(ref.conv2d_backward(dy, x, w, stride, padding), before[1:]):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(ref.conv2d_backward(dy, x, w, stride, padding, 1, 1), before[1:]):
        np.testing.assert_array_equal(got, want)


def test_max_pool2d_known_answer_and_default_stride():
    x = np.array(
        [[1.0, 2.0, 5.0, 0.0], [4.0, 3.0, 1.0, 1.0], [0.0, 0.0, 9.0, 8.0], [7.0, 0.0, 8.0, 9.0]]
    )
    y, idx = ref.max_pool2d(x[None, None], 2)  # stride defaults to the kernel size
    check_array(y, (1, 1, 2, 2))
    check_array(idx, (1, 1, 2, 2), np.int64)
    np.testing.assert_array_equal(y[0, 0], [[4.0, 5.0], [7.0, 9.0]])
    # Flat indices h*W + w into the 4x4 plane; 9 at (2,2) and (3,3) is a tie: first wins.
    np.testing.assert_array_equal(idx[0, 0], [[4, 2], [12, 10]])


def test_max_pool2d_output_size_is_floored():
    y, _ = ref.max_pool2d(np.zeros((1, 1, 5, 7)), 2)
    assert y.shape == (1, 1, 2, 3)


def test_max_pool2d_tie_picks_first_index():
    x = np.array([[[[1.0, 3.0], [3.0, 2.0]]]])
    y, idx = ref.max_pool2d(x, 2)
    assert y[0, 0, 0, 0] == 3.0
    assert idx[0, 0, 0, 0] == 1
    # An all-equal window reports its first cell.
    y, idx = ref.max_pool2d(np.full((1, 1, 2, 2), 7.0), 2)
    assert idx[0, 0, 0, 0] == 0


def test_max_pool2d_nan_propagates_and_last_nan_wins():
    nan = np.nan
    # A NaN is taken even though nothing compares greater than it...
    y, idx = ref.max_pool2d([[[[1.0, nan], [5.0, 2.0]]]], 2)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 1
    # ...and every later NaN is taken again, so the last one wins.
    y, idx = ref.max_pool2d([[[[nan, 1.0], [nan, 2.0]]]], 2)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 2
    y, idx = ref.max_pool2d([[[[nan, nan], [nan, nan]]]], 2)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 3


def test_max_pool2d_all_neg_inf_windows_with_padding():
    # Padding counts as -inf and is never chosen: an all -inf window reports -inf at
    # its first in-bounds cell.
    x = np.full((1, 1, 3, 3), -np.inf)
    y, idx = ref.max_pool2d(x, 3, stride=1, padding=1)
    assert np.all(y == -np.inf)
    np.testing.assert_array_equal(idx[0, 0], [[0, 0, 1], [0, 0, 1], [3, 3, 4]])


def test_max_pool2d_padding_never_chosen():
    # All inputs negative: a zero pad would win, a -inf pad never does.
    x = -np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    y, idx = ref.max_pool2d(x, 2, stride=2, padding=1)
    np.testing.assert_array_equal(y[0, 0], [[-1.0, -2.0], [-3.0, -4.0]])
    np.testing.assert_array_equal(idx[0, 0], [[0, 1], [2, 3]])


def test_max_pool2d_backward_adds_overlapping_picks():
    # Both 1x2 windows (stride 1) pick the middle cell: its gradient is the sum.
    x = np.array([[[[0.0, 5.0, 0.0]]]])
    y, idx = ref.max_pool2d(x, (1, 2), stride=1)
    np.testing.assert_array_equal(idx.reshape(-1), [1, 1])
    dx = ref.max_pool2d_backward([[[[2.0, 3.0]]]], idx, x.shape)
    check_array(dx, x.shape)
    np.testing.assert_array_equal(dx.reshape(-1), [0.0, 5.0, 0.0])


def test_relu_known_answers():
    z = np.array([-2.0, -0.0, 0.0, 3.0, np.nan])
    a = ref.relu(z)
    np.testing.assert_array_equal(a, [0.0, 0.0, 0.0, 3.0, np.nan])
    # The kink z = 0 gets gradient 0; a NaN z passes da through.
    dz = ref.relu_backward(np.full(5, 7.0), z)
    np.testing.assert_array_equal(dz, [0.0, 0.0, 0.0, 7.0, 7.0])


def test_sigmoid_known_answers():
    a = ref.sigmoid([0.0, 1000.0, -1000.0])
    np.testing.assert_array_equal(a, [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(ref.sigmoid_backward([1.0], [0.5]), [0.25])


def test_linear_known_answer():
    x = np.array([[1.0, 2.0]])
    w = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    np.testing.assert_array_equal(ref.linear(x, w, [0.0, 1.0, 2.0]), [[1.0, 4.0, 0.0]])
    np.testing.assert_array_equal(ref.linear(x, w), [[1.0, 3.0, -2.0]])
    dx, dw, db = ref.linear_backward([[1.0, 1.0, 1.0]], x, w)
    np.testing.assert_array_equal(dx, [[2.0, 0.0]])
    np.testing.assert_array_equal(dw, [[1.0, 2.0]] * 3)
    np.testing.assert_array_equal(db, [1.0, 1.0, 1.0])


def test_flatten_round_trip():
    x = np.arange(24.0).reshape(2, 3, 2, 2)
    F = ref.flatten(x)
    np.testing.assert_array_equal(F, np.arange(24.0).reshape(2, 12))
    np.testing.assert_array_equal(ref.flatten_backward(F, x.shape), x)


def test_binary_cross_entropy_clamps_at_minus_100():
    assert ref.binary_cross_entropy([0.0], [1.0]) == 100.0
    assert ref.binary_cross_entropy([1.0], [0.0]) == 100.0
    assert ref.binary_cross_entropy([0.0, 1.0], [0.0, 1.0]) == 0.0
    # Mean over all elements: (100 + 0) / 2.
    assert ref.binary_cross_entropy([[0.0], [1.0]], [[1.0], [1.0]]) == 50.0
    assert ref.binary_cross_entropy([0.5], [1.0]) == pytest.approx(np.log(2.0), rel=1e-15)
    # The backward keeps its denominator at torch's EPSILON, 1e-12 as a float32, so
    # a = 0 stays finite.
    assert ref.BCE_EPSILON == float(np.float32(1e-12))
    da = ref.binary_cross_entropy_backward([0.0], [1.0])
    np.testing.assert_array_equal(da, [-1.0 / ref.BCE_EPSILON])
    np.testing.assert_allclose(da, [-1e12], rtol=1e-8)
    np.testing.assert_allclose(
        ref.binary_cross_entropy_backward([0.5, 0.5], [1.0, 0.0]), [-1.0, 1.0]
    )


def test_binary_cross_entropy_with_logits_is_stable():
    assert ref.binary_cross_entropy_with_logits([1000.0], [0.0]) == 1000.0
    assert ref.binary_cross_entropy_with_logits([-1000.0], [1.0]) == 1000.0
    assert ref.binary_cross_entropy_with_logits([1000.0], [1.0]) == 0.0
    assert ref.binary_cross_entropy_with_logits([0.0], [1.0]) == pytest.approx(
        np.log(2.0), rel=1e-15
    )
    np.testing.assert_array_equal(
        ref.binary_cross_entropy_with_logits_backward([1000.0, -1000.0], [0.0, 1.0]), [0.5, -0.5]
    )
    # Equal to BCE of the sigmoid where the latter is accurate.
    rng = np.random.default_rng(500)
    z, y = rng.standard_normal(10), rng.uniform(0, 1, 10)
    assert ref.binary_cross_entropy_with_logits(z, y) == pytest.approx(
        ref.binary_cross_entropy(ref.sigmoid(z), y), rel=1e-13
    )


def test_cross_entropy_known_answers_and_stability():
    assert ref.cross_entropy([[0.0, 0.0]], [0]) == pytest.approx(np.log(2.0), rel=1e-15)
    assert ref.cross_entropy([[1000.0, 0.0]], [1]) == 1000.0
    assert ref.cross_entropy([[1000.0, 0.0]], [0]) == 0.0
    np.testing.assert_allclose(
        ref.cross_entropy_backward([[0.0, 0.0], [1000.0, 0.0]], [0, 0]),
        [[-0.25, 0.25], [0.0, 0.0]],
        rtol=0,
        atol=1e-300,
    )
    # Rows of the gradient sum to zero.
    rng = np.random.default_rng(501)
    dz = ref.cross_entropy_backward(rng.standard_normal((5, 4)), rng.integers(0, 4, 5))
    np.testing.assert_allclose(dz.sum(axis=1), 0.0, atol=1e-16)


def test_outputs_are_float64_and_contiguous_for_other_input_dtypes():
    rng = np.random.default_rng(502)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = np.asfortranarray(rng.standard_normal((2, 2, 3, 3)).astype(np.float32))
    y = ref.conv2d(x, w)
    check_array(y, (1, 2, 3, 3))
    for got in ref.conv2d_backward(y, x, w):
        assert got.dtype == np.float64 and got.flags.c_contiguous
    y, idx = ref.max_pool2d(np.arange(16, dtype=np.int32).reshape(1, 1, 4, 4), 2)
    check_array(y, (1, 1, 2, 2))
    check_array(idx, (1, 1, 2, 2), np.int64)
    dx = ref.max_pool2d_backward(y.astype(np.float32), idx.astype(np.int32), (1, 1, 4, 4))
    check_array(dx, (1, 1, 4, 4))
    z = np.ones((3, 4), dtype=np.float32).T  # a non-contiguous view
    check_array(ref.relu(z), (4, 3))
    check_array(ref.relu_backward(z, z), (4, 3))
    check_array(ref.sigmoid(z), (4, 3))
    check_array(ref.sigmoid_backward(z, z), (4, 3))
    check_array(ref.linear(z, np.ones((2, 3), np.float32)), (4, 2))
    for got in ref.linear_backward(np.ones((4, 2)), z, np.ones((2, 3))):
        assert got.dtype == np.float64 and got.flags.c_contiguous
    check_array(ref.flatten(z), (4, 3))
    assert isinstance(ref.binary_cross_entropy(np.float32([0.5]), [1]), float)
    assert isinstance(ref.binary_cross_entropy_with_logits(np.float32([0.5]), [1]), float)
    assert isinstance(ref.cross_entropy(np.float32([[0.5, 1.0]]), np.int32([1])), float)
    check_array(ref.cross_entropy_backward(np.float32([[0.5, 1.0]]), [1.0]), (1, 2))


# ---------------------------------------------------------------------------------------
# 3. against PyTorch (float64), when it is installed
# ---------------------------------------------------------------------------------------

TORCH_TOL = dict(rtol=1e-12, atol=1e-13)


def _t(a, grad=True):
    torch = pytest.importorskip("torch")
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_matches_torch(case, bias):
    torch = pytest.importorskip("torch")
    N, C, H, W, K, R, S, stride, padding = case
    rng = np.random.default_rng(600 + CONV_CASES.index(case))
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((K, C, R, S))
    b = rng.standard_normal(K) if bias else None
    y = ref.conv2d(x, w, b, stride=stride, padding=padding)
    xt, wt = _t(x), _t(w)
    bt = _t(b) if bias else None
    yt = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=padding)
    assert y.shape == tuple(yt.shape)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TORCH_TOL)

    g = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(g))
    dx, dw, db = ref.conv2d_backward(g, x, w, stride=stride, padding=padding)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **TORCH_TOL)
    np.testing.assert_allclose(dw, wt.grad.numpy(), **TORCH_TOL)
    if bias:
        np.testing.assert_allclose(db, bt.grad.numpy(), **TORCH_TOL)


# torch warns that 'same' with an even kernel and an odd dilation pads a copy of the input
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", CONV_OPTION_CASES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_options_match_torch(case, bias):
    torch = pytest.importorskip("torch")
    rng, x, w, b, options = conv_option_sample(case, 1800 + CONV_OPTION_CASES.index(case))
    b = b if bias else None
    y = ref.conv2d(x, w, b, **options)
    xt, wt = _t(x), _t(w)
    bt = _t(b) if bias else None
    yt = torch.nn.functional.conv2d(xt, wt, bt, **options)
    check_array(y, yt.shape)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TORCH_TOL)

    g = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(g))
    dx, dw, db = ref.conv2d_backward(g, x, w, **options)
    check_array(dx, x.shape)
    check_array(dw, w.shape)
    check_array(db, (w.shape[0],))
    np.testing.assert_allclose(dx, xt.grad.numpy(), **TORCH_TOL)
    np.testing.assert_allclose(dw, wt.grad.numpy(), **TORCH_TOL)
    if bias:
        np.testing.assert_allclose(db, bt.grad.numpy(), **TORCH_TOL)


def test_conv2d_refuses_what_torch_refuses():
    torch = pytest.importorskip("torch")
    x, w = np.zeros((1, 4, 5, 5)), np.zeros((2, 4, 3, 3))
    for options in (
        dict(stride=(2, 1), padding="same"),
        dict(stride=2, padding="same"),
        dict(padding="Same"),
        dict(padding="full"),
    ):
        with pytest.raises(RuntimeError):
            torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), **options)
        with pytest.raises(ValueError, match=re.escape("[conv2d] padding: ")):
            ref.conv2d(x, w, **options)
    # 'same' with stride 1 given as a pair is fine in both
    y = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), stride=(1, 1), padding="same")
    assert ref.conv2d(x, w, stride=(1, 1), padding="same").shape == tuple(y.shape)


def _torch_pool_check(x, kernel, stride, padding, rng):
    torch = pytest.importorskip("torch")
    y, idx = ref.max_pool2d(x, kernel, stride, padding)
    xt = _t(x)
    yt, it = torch.nn.functional.max_pool2d(
        xt, kernel, stride=stride, padding=padding, return_indices=True
    )
    assert y.shape == tuple(yt.shape)
    np.testing.assert_array_equal(idx, it.numpy())
    np.testing.assert_array_equal(y, yt.detach().numpy())  # NaN == NaN here
    g = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(
        ref.max_pool2d_backward(g, idx, x.shape), xt.grad.numpy(), **TORCH_TOL
    )


@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool2d_matches_torch_random(case):
    N, C, H, W, kernel, stride, padding = case
    rng = np.random.default_rng(700 + POOL_CASES.index(case))
    _torch_pool_check(rng.standard_normal((N, C, H, W)), kernel, stride, padding, rng)


@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool2d_matches_torch_ties_and_nan(case):
    N, C, H, W, kernel, stride, padding = case
    rng = np.random.default_rng(800 + POOL_CASES.index(case))
    # Few distinct values: ties everywhere; some NaN and -inf mixed in.
    x = rng.integers(0, 3, (N, C, H, W)).astype(np.float64)
    x[rng.uniform(size=x.shape) < 0.15] = np.nan
    x[rng.uniform(size=x.shape) < 0.1] = -np.inf
    _torch_pool_check(x, kernel, stride, padding, rng)


def test_max_pool2d_matches_torch_edge_cases():
    rng = np.random.default_rng(900)
    nan = np.nan
    _torch_pool_check(np.full((1, 1, 3, 3), -np.inf), 3, 1, 1, rng)
    _torch_pool_check(np.array([[[[nan, 1.0], [nan, 2.0]]]]), 2, None, 0, rng)
    _torch_pool_check(np.array([[[[1.0, nan], [5.0, 2.0]]]]), 2, None, 0, rng)
    _torch_pool_check(np.array([[[[1.0, 3.0], [3.0, 2.0]]]]), 2, None, 0, rng)
    _torch_pool_check(np.array([[[[0.0, 5.0, 0.0]]]]), (1, 2), 1, 0, rng)
    _torch_pool_check(-np.arange(1.0, 5.0).reshape(1, 1, 2, 2), 2, 2, 1, rng)


def test_relu_and_sigmoid_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1000)
    z = rng.standard_normal((3, 4, 5)) * 5
    z[0, 0, :3] = [0.0, -0.0, np.nan]
    g = rng.standard_normal(z.shape)

    zt = _t(z)
    at = torch.relu(zt)
    np.testing.assert_array_equal(ref.relu(z), at.detach().numpy())
    at.backward(torch.tensor(g))
    np.testing.assert_array_equal(ref.relu_backward(g, z), zt.grad.numpy())

    z = z[np.isfinite(z)]
    g = g.reshape(-1)[: z.size]
    zt = _t(z)
    at = torch.sigmoid(zt)
    a = ref.sigmoid(z)
    np.testing.assert_allclose(a, at.detach().numpy(), **TORCH_TOL)
    at.backward(torch.tensor(g))
    np.testing.assert_allclose(ref.sigmoid_backward(g, a), zt.grad.numpy(), **TORCH_TOL)


@pytest.mark.parametrize("x_shape", [(5, 4), (2, 3, 4), (4,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(x_shape, bias):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1100 + len(x_shape))
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((3, x_shape[-1]))
    b = rng.standard_normal(3) if bias else None
    xt, wt = _t(x), _t(w)
    bt = _t(b) if bias else None
    yt = torch.nn.functional.linear(xt, wt, bt)
    y = ref.linear(x, w, b)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TORCH_TOL)
    g = rng.standard_normal(y.shape)
    yt.backward(torch.tensor(g))
    dx, dw, db = ref.linear_backward(g, x, w)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **TORCH_TOL)
    np.testing.assert_allclose(dw, wt.grad.numpy(), **TORCH_TOL)
    if bias:
        np.testing.assert_allclose(db, bt.grad.numpy(), **TORCH_TOL)


def loss_inputs(name):
    """(input, target) of each loss, with clamped, saturated and boundary cases."""
    if name == "binary_cross_entropy":
        rng = np.random.default_rng(1200)
        a = rng.uniform(0.0, 1.0, (6, 3))
        y = rng.uniform(0.0, 1.0, (6, 3))
        a[0], y[0] = [0.0, 1.0, 1e-50], [1.0, 0.0, 1.0]  # clamped
        a[1], y[1] = [0.0, 1.0, 0.5], [0.0, 1.0, 0.5]  # the boundary
        return a, y
    if name == "binary_cross_entropy_with_logits":
        rng = np.random.default_rng(1300)
        z = rng.standard_normal((5, 4)) * 6
        y = rng.uniform(0.0, 1.0, z.shape)
        z[0], y[0] = [1000.0, -1000.0, 40.0, -40.0], [0.0, 1.0, 1.0, 0.0]
        return z, y
    rng = np.random.default_rng(1400)
    z = rng.standard_normal((7, 5)) * 4
    z[0] = [1000.0, 0.0, -1000.0, 3.0, 999.0]
    return z, rng.integers(0, 5, 7)


@pytest.mark.parametrize(
    "name", ["binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy"]
)
def test_losses_match_torch(name):
    torch = pytest.importorskip("torch")
    p, target = loss_inputs(name)
    pt = _t(p)
    Lt = getattr(torch.nn.functional, name)(pt, torch.tensor(target))
    assert getattr(ref, name)(p, target) == pytest.approx(Lt.item(), rel=1e-12)
    Lt.backward()
    np.testing.assert_allclose(
        getattr(ref, name + "_backward")(p, target), pt.grad.numpy(), **TORCH_TOL
    )


def test_seed_network_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    X, W1, B1, W2, B2, Y = seed_inputs(1500, 3)
    out = ref.seed_network(X, W1, B1, W2, B2, Y)
    Xt, W1t, B1t, W2t, B2t = (_t(v) for v in (X, W1, B1, W2, B2))
    nnf = torch.nn.functional
    Z1 = nnf.conv2d(Xt, W1t, B1t)
    P1 = nnf.max_pool2d(torch.relu(Z1), 2)
    A2 = torch.sigmoid(nnf.linear(P1.flatten(1), W2t, B2t))
    L = nnf.binary_cross_entropy(A2, torch.tensor(Y))
    assert out["L"] == pytest.approx(L.item(), rel=1e-12)
    L.backward()
    for name, t in [("X", Xt), ("W1", W1t), ("B1", B1t), ("W2", W2t), ("B2", B2t)]:
        np.testing.assert_allclose(out["dL/d" + name], t.grad.numpy(), err_msg=name, **TORCH_TOL)


def test_zero_dim_inputs_keep_their_shape():
    z = np.array(-1.0)
    for out in (ref.relu(z), ref.sigmoid(z), ref.relu_backward(z, z), ref.sigmoid_backward(z, z)):
        assert out.shape == ()


# ---------------------------------------------------------------------------------------
# 4. the oracle stands alone: its own output_size, NumPy only, no build needed
# ---------------------------------------------------------------------------------------


def test_output_size_floors():
    assert ref.output_size(6, 3) == 4
    assert ref.output_size(7, 3, 2) == 3
    assert ref.output_size(8, 3, 2) == 3  # floored
    assert ref.output_size(5, 3, 2, 1) == 3
    assert ref.output_size(1, 1) == 1
    assert ref.output_size(4, 3, 1, 3) == 8
    assert ref.output_size(2, 5, 1, 0) == -2  # a window larger than the input: < 1


def test_output_size_dilation_and_ceil_mode():
    assert ref.output_size(9, 3, 2, 1, dilation=2) == 4  # extent 5: floor((11 - 5) / 2) + 1
    assert ref.output_size(7, 2, 2, ceil_mode=True) == 4  # ceil(5 / 2) + 1
    assert ref.output_size(6, 2, 2, ceil_mode=True) == 3  # exact: the same as floored
    assert ref.output_size(5, 2, 2, 1, ceil_mode=True) == 3  # a 4th would start at 6 >= 5 + 1
    assert ref.output_size(3, 4, 2, ceil_mode=True) == 1  # hangs 1 past the input


def test_output_size_equals_the_kernels_helper():
    from cnnbp import functional as F

    for in_size in range(0, 9):
        for kernel in range(1, 6):
            for stride in range(1, 4):
                for padding in range(0, 3):
                    args = (in_size, kernel, stride, padding)
                    assert ref.output_size(*args) == F.output_size(*args), args
                    for dilation in (1, 2, 3):
                        for ceil_mode in (False, True):
                            more = args + (dilation, ceil_mode)
                            assert ref.output_size(*more) == F.output_size(*more), more


def test_output_size_matches_torch():
    torch = pytest.importorskip("torch")
    for in_size, kernel, stride, padding, dilation, ceil_mode in itertools.product(
        range(1, 8), range(1, 5), range(1, 4), range(0, 3), (1, 2, 3), (False, True)
    ):
        if padding > kernel // 2:
            continue
        want = None
        try:
            want = torch.nn.functional.max_pool2d(
                torch.zeros(1, 1, in_size, 1),
                (kernel, 1),
                (stride, 1),
                (padding, 0),
                (dilation, 1),
                ceil_mode,
            ).shape[2]
        except RuntimeError:
            pass
        got = ref.output_size(in_size, kernel, stride, padding, dilation, ceil_mode)
        assert (got if got >= 1 else None) == want, (in_size, kernel, stride, padding, dilation)


LOAD_BY_PATH = """
import importlib.util, sys
sys.modules["cnnbp"] = None  # importing cnnbp or cnnbp._core now raises ImportError
sys.modules["cnnbp._core"] = None
sys.modules["_core"] = None
spec = importlib.util.spec_from_file_location("reference", sys.argv[1])
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)
x = [[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]]]
w = [[[[1.0, 2.0], [3.0, 4.0]]]]
print(reference.conv2d(x, w, [0.5]).reshape(-1).tolist())
print(sorted(m for m in sys.modules if m.startswith("cnnbp") and sys.modules[m] is not None))
"""


def test_the_oracle_loads_by_path_without_the_package(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", LOAD_BY_PATH, ref.__file__],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # nothing of cnnbp on the path either
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    conv, loaded = run.stdout.splitlines()
    assert conv == "[37.5, 47.5, 67.5, 77.5]"  # test_conv2d_known_answer's numbers
    assert loaded == "[]"


# ---------------------------------------------------------------------------------------
# 5. the optimizer updates against torch.optim (float64)
# ---------------------------------------------------------------------------------------

ADAM_CONFIGS = [
    dict(lr=0.01),
    dict(lr=0.05, betas=(0.5, 0.9), eps=1e-6),
    dict(lr=0.01, weight_decay=0.1),
]


def _optimizer_runs(torch_cls, config, update, state, steps=6, seed=0):
    """The same gradients through torch_cls(**config) and the reference update; each
    step's parameters compared."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5,), (2, 1, 3, 3)]
    params = [rng.standard_normal(s) for s in shapes]
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    topt = torch_cls(tparams, **config)
    states = [state() for _ in params]
    for step in range(steps):
        for i, tp in enumerate(tparams):
            if step == 2 and i == 1:  # a parameter without a gradient is left alone
                tp.grad = None
                continue
            g = rng.standard_normal(tp.shape)
            tp.grad = torch.tensor(g)
            params[i], *states[i] = update(params[i], g, *states[i], **config)
        topt.step()
        for p, tp in zip(params, tparams):
            np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=SGD_CONFIG_IDS)
def test_sgd_step_matches_torch(config):
    torch = pytest.importorskip("torch")
    _optimizer_runs(torch.optim.SGD, config, ref.sgd_step, lambda: [None])


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_step_matches_torch(config):
    torch = pytest.importorskip("torch")
    _optimizer_runs(torch.optim.Adam, config, ref.adam_step, lambda: [0.0, 0.0, 0])


@pytest.mark.parametrize("config", ADAM_CONFIGS + [dict(lr=0.01, weight_decay=0.5)], ids=str)
def test_adamw_step_matches_torch(config):
    torch = pytest.importorskip("torch")
    _optimizer_runs(torch.optim.AdamW, config, ref.adamw_step, lambda: [0.0, 0.0, 0])


def test_adamw_defaults_to_torchs_weight_decay():
    p, g = np.ones(3), np.zeros(3)
    decayed, *_ = ref.adamw_step(p, g, 0.0, 0.0, 0, lr=0.1)
    np.testing.assert_allclose(decayed, 1 - 0.1 * 1e-2, rtol=1e-15)


# ---------------------------------------------------------------------------------------
# 6. avg_pool2d, tanh and dropout: finite differences of the oracle's own forwards, and
#    torch in float64
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", AVG_POOL_CASES, ids=str)
def test_reference_avg_pool2d_against_finite_differences_and_torch(case):
    s = AVG_POOL2D.sample(case, np.float64)
    x, g, kernel, stride, padding = s.x, s.dy, s.kernel, s.stride, s.padding

    def objective():
        return float(np.sum(ref.avg_pool2d(x, kernel, stride, padding) * g))

    dx = ref.avg_pool2d_backward(g, x.shape, kernel, stride, padding)
    fd_check(dx, objective, x, "reference avg_pool2d")
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.avg_pool2d(xt, kernel, stride, padding)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(
        ref.avg_pool2d(x, kernel, stride, padding), yt.detach().numpy(), **TORCH_TOL
    )
    np.testing.assert_allclose(dx, xt.grad.numpy(), **TORCH_TOL)


def test_reference_tanh_and_dropout_against_finite_differences_and_torch():
    rng = rng_for("new_ops", "reference-tanh")
    z = rng.standard_normal((3, 7)) * 2
    g = rng.standard_normal(z.shape)
    fd_check(
        ref.tanh_backward(g, ref.tanh(z)),
        lambda: float(np.sum(ref.tanh(z) * g)),
        z,
        "reference tanh",
    )
    mask = ref.dropout_mask(z.shape, 0.3, 4)
    fd_check(
        ref.dropout_backward(g, mask, 0.3),
        lambda: float(np.sum(ref.dropout(z, mask, 0.3) * g)),
        z,
        "reference dropout",
    )
    torch = pytest.importorskip("torch")
    zt = torch.tensor(z, requires_grad=True)
    at = torch.tanh(zt)
    at.backward(torch.tensor(g))
    np.testing.assert_allclose(ref.tanh(z), at.detach().numpy(), **TORCH_TOL)
    np.testing.assert_allclose(ref.tanh_backward(g, ref.tanh(z)), zt.grad.numpy(), **TORCH_TOL)
