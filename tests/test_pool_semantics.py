"""PyTorch's pooling semantics, held by the kernels: max-pool picks the first index on a tie,
propagates NaN (the last NaN of a window wins), pads with -inf and adds the gradients of
overlapping windows; avg-pool counts the zero padding in its divisor, drops the padding's
gradient and propagates NaN and infinities."""

import os
import subprocess
import sys

import numpy as np
import pytest
from cnnbp import functional as F
from cnnbp import reference as ref
from conftest import (
    DTYPES,
    KERNEL_TOL,
    assert_close,
    assert_same_bits,
    check_array,
    pair,
    randn,
    rng_for,
    wide,
)
from ops import POOL_CASES, pooled_shape

DTYPE_IDS = ["float32", "float64"]


def check_pool(x, kernel, stride, padding, dtype, out_shape):
    y, idx = F.max_pool2d(x, kernel, stride, padding)
    check_array(y, out_shape, dtype)
    check_array(idx, out_shape, np.int64)
    want_y, want_idx = ref.max_pool2d(wide(x), kernel, stride, padding)
    np.testing.assert_array_equal(idx, want_idx)
    assert_close(y, want_y, KERNEL_TOL["max_pool2d"][dtype], "max_pool2d")
    return y, idx


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool2d_ties_pick_the_first_index(case, dtype):
    N, C, H, W, kernel, stride, padding = case
    rng = rng_for("ties", case)
    # integer values from a small range: most windows hold several equal maxima
    x = rng.integers(-2, 3, (N, C, H, W)).astype(dtype)
    check_pool(x, kernel, stride, padding, dtype, pooled_shape(x.shape, kernel, stride, padding))
    # all equal: every window reports its first in-bounds cell
    x = np.full((N, C, H, W), 1.5, dtype)
    y, idx = check_pool(
        x, kernel, stride, padding, dtype, pooled_shape(x.shape, kernel, stride, padding)
    )
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


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_avg_pool2d_padding_counts_in_the_divisor(dtype):
    # count_include_pad=True: a corner window of a 2x2 pool with padding 1 holds one cell
    # and three zeros, and divides by 4
    x = np.ones((1, 1, 2, 2), dtype)
    y = F.avg_pool2d(x, 2, 1, 1)
    check_array(y, (1, 1, 3, 3), dtype)
    np.testing.assert_array_equal(y[0, 0], [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]])
    # and the gradient of the padding is dropped: each cell is in four windows of 1/4
    dx = F.avg_pool2d_backward(np.ones_like(y), x.shape, 2, 1, 1)
    np.testing.assert_array_equal(dx, np.ones_like(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_avg_pool2d_backward_adds_overlapping_windows_and_zeroes_unread_cells(dtype):
    # kernel 3, stride 2 on 5x5: the center cell is in all four windows
    dy = np.array([[[[9.0, 18.0], [27.0, 36.0]]]], dtype)
    dx = F.avg_pool2d_backward(dy, (1, 1, 5, 5), 3, 2)
    check_array(dx, (1, 1, 5, 5), dtype)
    assert dx[0, 0, 2, 2] == 1 + 2 + 3 + 4
    assert dx[0, 0, 0, 0] == 1 and dx[0, 0, 4, 4] == 4 and dx[0, 0, 0, 2] == 1 + 2
    # stride 3 > kernel 2 on 5 columns: column 2 is in no window
    dx = F.avg_pool2d_backward(np.ones((1, 1, 1, 2), dtype), (1, 1, 2, 5), 2, (1, 3))
    np.testing.assert_array_equal(dx[0, 0], [[0.25, 0.25, 0, 0.25, 0.25]] * 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_avg_pool2d_propagates_nan_and_inf(dtype):
    x = np.ones((1, 2, 4, 4), dtype)
    x[0, 0, 0, 0] = np.nan
    x[0, 1, 0, 0] = np.inf
    x[0, 1, 3, 3] = np.inf
    x[0, 1, 3, 2] = -np.inf  # inf - inf in one window: NaN
    y = F.avg_pool2d(x, 2)
    with np.errstate(invalid="ignore"):
        want = ref.avg_pool2d(wide(x), 2)
    np.testing.assert_array_equal(y, want)  # NaN in the same places
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[0, 1, 1, 1])
    assert y[0, 1, 0, 0] == np.inf
    assert (y[0, 0].reshape(-1)[1:] == 1).all()


# ceil_mode's last row and column of partial windows (odd sizes) through the 2x2 / stride 2
# kernels: after whole vector steps and in a partial one, a plane of one input row or one
# column, a single cell, and enough planes for the threads
CEIL_2X2_SHAPES = [
    (2, 3, 7, 9),
    (1, 2, 9, 35),
    (2, 2, 3, 67),
    (1, 2, 1, 33),
    (1, 2, 31, 1),
    (1, 1, 1, 1),
    (2, 2, 6, 31),
    (2, 2, 27, 8),
    (4, 16, 31, 33),
]


def tricky(shape, dtype, key):
    """Ties (multiples of 0.5, most windows hold equal maxima) with NaN, -inf and -0."""
    rng = rng_for("ceil-2x2", shape, np.dtype(dtype).name, key)
    x = (rng.integers(-2, 3, shape) * 0.5).astype(dtype)
    flat = x.reshape(-1)
    for value in (np.nan, -np.inf, -0.0):
        flat[rng.integers(0, flat.size, max(1, flat.size // 40))] = value
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", CEIL_2X2_SHAPES, ids=str)
def test_max_pool2d_ceil_mode_2x2_partial_windows(shape, dtype):
    # the oracle's values and indices, and the scatter of dy to them, exactly
    x = tricky(shape, dtype, "x")
    H, W = shape[2:]
    y, idx = F.max_pool2d(x, 2, ceil_mode=True)
    check_array(y, (*shape[:2], (H + 1) // 2, (W + 1) // 2), dtype)
    want_y, want_idx = ref.max_pool2d(wide(x), 2, ceil_mode=True)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(y, want_y.astype(dtype))  # NaN in the same places
    dy = tricky(y.shape, dtype, "dy")
    dy[np.isnan(dy) | np.isinf(dy)] = 1.0
    dx = F.max_pool2d_backward(dy, idx, x.shape)
    check_array(dx, x.shape, dtype)
    # every cell takes at most one window's gradient: 0 + dy, -0 turned into +0
    np.testing.assert_array_equal(dx, ref.max_pool2d_backward(wide(dy), idx, x.shape))
    assert not np.signbit(dx[dx == 0]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_max_pool2d_backward_of_indices_outside_the_partial_windows(dtype):
    # indices a ceil_mode 2x2 pool cannot make (another window's cell, or the cell right of
    # the last column, which is the next row's first) are scattered and added, not lost
    shape = (2, 3, 7, 37)
    x = tricky(shape, dtype, "x")
    y, idx = F.max_pool2d(x, 2, ceil_mode=True)
    rng = rng_for("ceil-2x2-strays", np.dtype(dtype).name)
    dy = randn(rng, y.shape, dtype)
    moved = idx.copy()
    moved[0, 0, 1, -1] += 1  # right of the last column: a next row's first cell
    moved[0, 1, -1, 3] += 2  # the last row's next window
    moved[1, 2, 2, 4] = moved[1, 2, 2, 5]  # two windows on one cell: their gradients add
    for indices in (idx, moved):
        dx = F.max_pool2d_backward(dy, indices, x.shape)
        want = ref.max_pool2d_backward(wide(dy), indices, x.shape)
        np.testing.assert_allclose(dx, want, rtol=1e-6 if dtype == np.float32 else 1e-15)
        assert_same_bits(dx, dx_by_scatter(dy, indices, x.shape))


def dx_by_scatter(dy, idx, x_shape):
    """Zero-fill and scatter in dy's dtype, window by window in row-major order."""
    N, C, H, W = x_shape
    dx = np.zeros((N * C, H * W), dy.dtype)
    flat_dy, flat_idx = dy.reshape(N * C, -1), idx.reshape(N * C, -1)
    for plane in range(N * C):
        np.add.at(dx[plane], flat_idx[plane], flat_dy[plane])
    return dx.reshape(x_shape)


_CEIL_SCRIPT = """
import sys
import numpy as np
from cnnbp import functional as F
rng = np.random.default_rng(29)
out = {}
for i, shape in enumerate([(4, 8, 27, 27), (2, 3, 33, 35), (1, 1, 1, 97), (8, 64, 31, 31)]):
    x = rng.integers(-3, 4, shape).astype(np.float32)
    x.reshape(-1)[rng.integers(0, x.size, 9)] = np.nan
    x.reshape(-1)[rng.integers(0, x.size, 9)] = -np.inf
    y, idx = F.max_pool2d(x, 2, ceil_mode=True)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dy.reshape(-1)[:3] = -0.0
    out[f"y{i}"], out[f"idx{i}"] = y, idx
    out[f"dx{i}"] = F.max_pool2d_backward(dy, idx, x.shape)
np.savez(sys.argv[1], **out)
"""


def test_max_pool2d_ceil_mode_same_bits_on_portable_and_vector_kernels(tmp_path):
    # CNNBP_ISA=generic keeps the AVX-512 kernels out (where the CPU has them): the portable
    # loops and the scatter must give the vector kernels' bytes, partial windows included
    results = {}
    for isa in ("generic", ""):
        env = dict(os.environ, CNNBP_ISA=isa)
        path = tmp_path / f"ceil-{isa or 'default'}.npz"
        subprocess.run([sys.executable, "-c", _CEIL_SCRIPT, str(path)], env=env, check=True)
        results[isa] = np.load(path)
    for key in results[""].files:
        assert results["generic"][key].tobytes() == results[""][key].tobytes(), key
