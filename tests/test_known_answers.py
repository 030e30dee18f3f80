"""Small inputs whose answers are worked out by hand: the derivation's first layer, and each
pool on a ramp."""

import numpy as np
from cnnbp import functional as F
from conftest import check_array

F64 = np.float64


def test_conv2d_known_answer():
    # The derivation's first layer: a 6x6 ramp and a 3x3 filter with a single 1.
    x = np.arange(36, dtype=F64).reshape(1, 1, 6, 6)
    w = np.zeros((1, 1, 3, 3))
    w[0, 0, 1, 2] = 1.0  # picks x[p + 1, q + 2]
    y = F.conv2d(x, w, np.array([0.5]))
    check_array(y, (1, 1, 4, 4), F64)
    np.testing.assert_array_equal(y[0, 0], x[0, 0, 1:5, 2:6] + 0.5)


def test_max_pool2d_known_answer():
    x = np.arange(16, dtype=F64).reshape(1, 1, 4, 4)[:, :, ::-1, :].copy()
    y, idx = F.max_pool2d(x, 2)
    # rows are 12..15, 8..11, 4..7, 0..3: each window's maximum is its top-right cell
    np.testing.assert_array_equal(y[0, 0], [[13, 15], [5, 7]])
    np.testing.assert_array_equal(idx[0, 0], [[1, 3], [9, 11]])


def test_avg_pool2d_known_answer():
    x = np.arange(16, dtype=F64).reshape(1, 1, 4, 4)
    y = F.avg_pool2d(x, 2)
    check_array(y, (1, 1, 2, 2), F64)
    np.testing.assert_array_equal(y[0, 0], [[2.5, 4.5], [10.5, 12.5]])
    dx = F.avg_pool2d_backward(np.array([[[[4.0, 8.0], [12.0, 16.0]]]]), x.shape, 2)
    np.testing.assert_array_equal(
        dx[0, 0], [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    )
