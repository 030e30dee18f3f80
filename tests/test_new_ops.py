"""avg_pool2d, tanh and dropout: each C++ kernel (through cnnbp.functional) against the NumPy
oracle (cnnbp.reference), each backward against central finite differences of the C++
forward in float64, PyTorch parity, the dropout mask's statistics and determinism, thread
counts, and every validation error (type and message).
"""

import re
import warnings

import cnnbp
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
    wide,
    with_threads,
)
from conftest import rng_for as shared_rng_for

F32, F64 = np.float32, np.float64
DTYPE_IDS = ["float32", "float64"]

TOL = KERNEL_TOL


def rng_for(*key):
    """A generator seeded from the test's parameters, so every case is reproducible."""
    return shared_rng_for("new_ops", *key)


def same_bits(got, want, what=""):
    """Arrays of the same dtype, shape and bytes (NaNs and signed zeros included)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert got.flags.c_contiguous, f"{what}: output not C-contiguous"
    assert got.tobytes() == want.tobytes(), f"{what}: not bitwise identical"


@pytest.fixture
def restore_thread_count():
    before = cnnbp.get_num_threads()
    yield
    cnnbp.set_num_threads(before)


# ---------------------------------------------------------------------------------------
# avg_pool2d
# ---------------------------------------------------------------------------------------

AVG_POOL_CASES = [
    # (N, C, H, W, kernel, stride, padding)
    (1, 1, 4, 4, 2, None, 0),  # default stride = kernel
    (2, 3, 6, 6, 2, 2, 0),
    (2, 2, 7, 7, 3, 2, 0),  # overlapping windows, odd size, floored output
    (2, 2, 9, 8, 3, 2, 1),  # overlapping windows and zero padding in the divisor
    (1, 2, 5, 7, (2, 3), (1, 2), (1, 1)),  # non-square, (h, w) pairs
    (1, 1, 5, 5, 1, 1, 0),  # 1x1: the identity
    (3, 1, 6, 5, (3, 2), None, (1, 1)),
    (1, 1, 5, 5, 5, 1, 2),  # window as large as the input, maximal padding
    (2, 1, 7, 5, 2, 3, 0),  # stride > kernel: some cells in no window
    (1, 2, 8, 9, 3, 1, 1),  # unit stride: the contiguous inner loops
    (2, 2, 9, 9, (5, 4), (1, 2), (2, 1)),
]
BIG_AVG_POOL_CASE = (2, 16, 24, 24, 3, 2, 1)  # enough work for the threaded path


def avg_pool_out_shape(case):
    N, C, H, W, kernel, stride, padding = case
    (kh, kw) = pair(kernel)
    (sh, sw) = pair(kernel if stride is None else stride)
    (ph, pw) = pair(padding)
    return (N, C, (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)


def avg_pool_data(case, dtype):
    N, C, H, W, kernel, stride, padding = case
    rng = rng_for("avg_pool", case, np.dtype(dtype).name)
    x = randn(rng, (N, C, H, W), dtype)
    dy = randn(rng, avg_pool_out_shape(case), dtype)
    return x, dy, kernel, stride, padding


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", AVG_POOL_CASES + [BIG_AVG_POOL_CASE], ids=str)
def test_avg_pool2d_matches_oracle(case, dtype):
    x, dy, kernel, stride, padding = avg_pool_data(case, dtype)
    y = F.avg_pool2d(x, kernel, stride, padding)
    check_array(y, avg_pool_out_shape(case), dtype)
    assert_close(
        y, ref.avg_pool2d(wide(x), kernel, stride, padding), TOL["avg_pool2d"][dtype], "avg_pool2d"
    )
    dx = F.avg_pool2d_backward(dy, x.shape, kernel, stride, padding)
    check_array(dx, x.shape, dtype)
    want = ref.avg_pool2d_backward(wide(dy), x.shape, kernel, stride, padding)
    assert_close(dx, want, TOL["avg_pool2d_backward"][dtype], "avg_pool2d_backward")


@pytest.mark.parametrize("case", AVG_POOL_CASES, ids=str)
def test_avg_pool2d_backward_finite_differences(case):
    x, g, kernel, stride, padding = avg_pool_data(case, F64)

    def objective():
        return float(np.sum(F.avg_pool2d(x, kernel, stride, padding) * g))

    fd_check(F.avg_pool2d_backward(g, x.shape, kernel, stride, padding), objective, x, "dx")


def test_avg_pool2d_known_answer():
    x = np.arange(16, dtype=F64).reshape(1, 1, 4, 4)
    y = F.avg_pool2d(x, 2)
    check_array(y, (1, 1, 2, 2), F64)
    np.testing.assert_array_equal(y[0, 0], [[2.5, 4.5], [10.5, 12.5]])
    dx = F.avg_pool2d_backward(np.array([[[[4.0, 8.0], [12.0, 16.0]]]]), x.shape, 2)
    np.testing.assert_array_equal(
        dx[0, 0], [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    )


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


def test_avg_pool2d_accepts_ints_pairs_numpy_ints_and_keywords():
    x = randn(rng_for("avg-pairs"), (1, 2, 7, 8), F64)
    want = F.avg_pool2d(x, (3, 3), (2, 2), (1, 1))
    for k, s, p in [(3, 2, 1), ([3, 3], [2, 2], [1, 1]), (np.int64(3), np.int32(2), 1)]:
        same_bits(F.avg_pool2d(x, k, s, p), want, f"{k} {s} {p}")
    same_bits(F.avg_pool2d(x=x, kernel_size=3, stride=2, padding=1), want, "keywords")
    dy = np.ones_like(want)
    dx = F.avg_pool2d_backward(dy, x.shape, 3, 2, 1)
    for shape in ([1, 2, 7, 8], np.array(x.shape), (np.int64(1), 2, np.int32(7), 8)):
        same_bits(F.avg_pool2d_backward(dy, shape, 3, 2, 1), dx, str(shape))
    same_bits(
        F.avg_pool2d_backward(dy=dy, x_shape=x.shape, kernel_size=3, stride=2, padding=1),
        dx,
        "keywords",
    )
    # stride None (the default) is the kernel size
    same_bits(F.avg_pool2d(x, 2), F.avg_pool2d(x, 2, 2), "default stride")
    same_bits(
        F.avg_pool2d_backward(np.ones((1, 2, 3, 4)), x.shape, 2),
        F.avg_pool2d_backward(np.ones((1, 2, 3, 4)), x.shape, 2, 2),
        "default stride",
    )


# ---------------------------------------------------------------------------------------
# tanh
# ---------------------------------------------------------------------------------------

ELEMENTWISE_SHAPES = [(7,), (3, 4), (2, 3, 4, 5), (1, 1, 1, 1), (0, 3), (64, 64, 20)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
def test_tanh_matches_oracle(shape, dtype):
    rng = rng_for("tanh", shape)
    z = randn(rng, shape, dtype, scale=3.0)
    da = randn(rng, shape, dtype)
    a = F.tanh(z)
    check_array(a, shape, dtype)
    assert_close(a, ref.tanh(wide(z)), TOL["tanh"][dtype], "tanh")
    dz = F.tanh_backward(da, a)
    check_array(dz, shape, dtype)
    assert_close(
        dz, ref.tanh_backward(wide(da), wide(a)), TOL["tanh_backward"][dtype], "tanh_backward"
    )


def test_float_tanh_is_the_double_tanh_rounded_once():
    # within half a float ulp of the float64 tanh (plus the float64 tanh's own error)
    rng = rng_for("tanh-ulp")
    z = np.concatenate(
        [rng.standard_normal(20000) * 3, rng.uniform(-1e-3, 1e-3, 1000), rng.uniform(-12, 12, 5000)]
    ).astype(F32)
    a = F.tanh(z)
    want = np.tanh(wide(z))
    bound = 0.5 * np.spacing(np.abs(a)).astype(F64) + 4e-16 * np.abs(want)
    assert (np.abs(wide(a) - want) <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tanh_extremes_are_finite(dtype):
    z = np.array([-np.inf, -1e30, -1e4, -100, -20, -0.0, 0.0, 20, 100, 1e4, 1e30, np.inf], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = F.tanh(z)
    np.testing.assert_array_equal(a, [-1, -1, -1, -1, -1, 0, 0, 1, 1, 1, 1, 1])
    assert np.signbit(a[5]) and not np.signbit(a[6])  # tanh(-0) = -0, as torch
    assert (np.diff(a) >= 0).all()
    dz = F.tanh_backward(np.ones_like(a), a)
    np.testing.assert_array_equal(dz, [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0])
    assert np.isnan(F.tanh(np.array([1.0, np.nan], dtype))[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tanh_keeps_a_0d_shape(dtype):
    a = F.tanh(np.array(0.5, dtype))
    check_array(a, (), dtype)
    assert_close(a, np.tanh(0.5), TOL["tanh"][dtype])
    dz = F.tanh_backward(np.array(2.0, dtype), np.array(0.5, dtype))
    check_array(dz, (), dtype)
    assert dz == 1.5


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tanh_backward_keeps_its_digits_near_saturation(dtype):
    # a close to +-1: the gradient 1 - a^2 is small, and every element (not just the large
    # ones) is within a few ulps of the exact value for the a it was given
    z = np.concatenate([np.linspace(3, 9, 200), -np.linspace(3, 9, 200)]).astype(dtype)
    a = F.tanh(z)
    dz = F.tanh_backward(np.ones_like(a), a)
    a64 = wide(a)
    # exact for a float32 a (two 25-bit factors); for float64 as exact as float64 allows
    exact = (1 - a64) * (1 + a64)
    rel = np.abs(wide(dz) - exact) / exact
    assert rel.max() <= 4 * np.finfo(dtype).eps


def test_tanh_backward_finite_differences():
    rng = rng_for("tanh-fd")
    z = rng.standard_normal((4, 6)) * 2
    g = rng.standard_normal(z.shape)
    dz = F.tanh_backward(g, F.tanh(z))
    fd_check(dz, lambda: float(np.sum(F.tanh(z) * g)), z, "tanh")


# ---------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------

DROPOUT_SHAPES = [(7,), (3, 4), (2, 3, 4, 5), (1,), (0, 3), (64, 64, 20)]
PS = [0.1, 0.5, 0.9, 1 / 3]


def dropout_formula(x, mask, p):
    """y = x * mask / (1 - p) as NumPy computes it: in x's dtype (p a Python float)."""
    with np.errstate(invalid="ignore"):  # inf * 0
        return x * mask / (1 - p)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", DROPOUT_SHAPES, ids=str)
@pytest.mark.parametrize("p", PS, ids=lambda p: f"p={p:.3g}")
def test_dropout_is_x_times_mask_over_keep_probability(p, shape, dtype):
    rng = rng_for("dropout", shape, p)
    x = randn(rng, shape, dtype)
    y, mask = F.dropout(x, p, seed=17)
    check_array(y, shape, dtype)
    check_array(mask, shape, np.bool_)
    np.testing.assert_array_equal(y, dropout_formula(x, mask, p))  # exactly
    assert_close(y, ref.dropout(wide(x), mask, p), TOL["dropout"][dtype], "dropout")
    dy = randn(rng, shape, dtype)
    dx = F.dropout_backward(dy, mask, p)
    check_array(dx, shape, dtype)
    np.testing.assert_array_equal(dx, dropout_formula(dy, mask, p))
    assert_close(
        dx,
        ref.dropout_backward(wide(dy), mask, p),
        TOL["dropout_backward"][dtype],
        "dropout_backward",
    )


@pytest.mark.parametrize("seed", [0, 1, 17, 2**32 + 5, 2**63, 2**64 - 1])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1 / 3, 1.0])
def test_dropout_mask_is_the_documented_hash(p, seed):
    # the oracle writes the counter-based hash out in NumPy: same bits, element for element
    y, mask = F.dropout(np.ones((3, 5, 7), F32), p, seed)
    np.testing.assert_array_equal(mask, ref.dropout_mask((3, 5, 7), p, seed))


def test_dropout_hash_is_splitmix64():
    # seed 0 keys the stream with mix64(0) = 0: SplitMix64's published outputs from state 0
    # decide the first elements (kept iff (h >> 11) * 2^-53 >= p)
    published = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    u = [(h >> 11) * 2.0**-53 for h in published]  # 0.883, 0.431, 0.026
    for p in (0.02, 0.03, 0.5, 0.9):
        _, mask = F.dropout(np.ones(3), p, 0)
        np.testing.assert_array_equal(mask, [v >= p for v in u])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p):
    # 400k Bernoulli(1 - p) draws per seed: the kept fraction lies within 5 sigma of 1 - p,
    # overall and in each part of the array (halves, even and odd positions, rows)
    n = 400_000
    sigma = np.sqrt(p * (1 - p) / n)
    for seed in (0, 1, 2, 12345, 2**63 + 7):
        _, mask = F.dropout(np.ones(n, F32), p, seed)
        assert abs(mask.mean() - (1 - p)) < 5 * sigma, (seed, mask.mean())
        for part in (mask[: n // 2], mask[n // 2 :], mask[0::2], mask[1::2]):
            assert abs(part.mean() - (1 - p)) < 5 * sigma * np.sqrt(2)
        rows = mask.reshape(40, -1).mean(axis=1)  # 40 rows of 10k
        assert (np.abs(rows - (1 - p)) < 5 * sigma * np.sqrt(40)).all()
    # neighbouring elements are independent: both kept with probability (1 - p)^2
    both = (mask[:-1] & mask[1:]).mean()
    assert abs(both - (1 - p) ** 2) < 5 * np.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)


def test_dropout_masks_of_different_seeds_are_independent():
    # two seeds agree on an element with probability p^2 + (1 - p)^2 = 1/2 for p = 1/2
    n = 200_000
    masks = [F.dropout(np.ones(n), 0.5, seed)[1] for seed in (0, 1, 2, 3, 2**64 - 1)]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            agree = (masks[i] == masks[j]).mean()
            assert abs(agree - 0.5) < 5 * np.sqrt(0.25 / n), (i, j, agree)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_is_deterministic_for_the_seed(dtype):
    x = randn(rng_for("dropout-det"), (8, 3, 20, 20), dtype)
    y, mask = F.dropout(x, 0.3, 99)
    y2, mask2 = F.dropout(x, 0.3, 99)
    same_bits(y2, y, "y")
    same_bits(mask2, mask, "mask")
    # the default seed is 0 and the default p 0.5
    same_bits(F.dropout(x)[1], F.dropout(x, 0.5, 0)[1], "defaults")
    # a NumPy integer seed is that integer
    same_bits(F.dropout(x, 0.3, np.uint64(99))[1], mask, "numpy seed")
    same_bits(F.dropout(x, 0.3, np.int64(99))[1], mask, "numpy seed")
    # another seed, another mask
    assert not np.array_equal(F.dropout(x, 0.3, 100)[1], mask)


def test_dropout_mask_depends_on_the_flat_index_only():
    # not on the shape, the dtype or the values: element i of any array gets the same draw
    x = randn(rng_for("dropout-flat"), (4, 5, 6), F64)
    _, mask = F.dropout(x, 0.4, 5)
    same_bits(F.dropout(x.reshape(-1), 0.4, 5)[1], mask.reshape(-1), "flat")
    same_bits(F.dropout(x.astype(F32) * 3, 0.4, 5)[1], mask, "float32")
    same_bits(F.dropout(x[:2], 0.4, 5)[1], mask[:2], "prefix")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_p_zero_is_the_identity(dtype):
    x = randn(rng_for("dropout-0"), (3, 50), dtype)
    x[0, :3] = [np.nan, -0.0, np.inf]
    for p in (0, 0.0):
        y, mask = F.dropout(x, p, 3)
        assert mask.all()
        same_bits(y, x, "y")
        same_bits(F.dropout_backward(x, mask, p), x, "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_p_one_gives_zeros_as_torch(dtype):
    torch = pytest.importorskip("torch")
    x = randn(rng_for("dropout-1"), (3, 50), dtype)
    for p in (1, 1.0):
        y, mask = F.dropout(x, p, 3)
        check_array(y, x.shape, dtype)
        assert not mask.any()
        np.testing.assert_array_equal(y, 0)
        yt = torch.nn.functional.dropout(torch.tensor(x), p=1.0, training=True)
        same_bits(y, yt.numpy(), "torch")  # x * 0: signed zeros as torch's
        dx = F.dropout_backward(x, mask, p)
        np.testing.assert_array_equal(dx, 0)
        # the gradient of x * 0 is 0 whatever the mask says
        np.testing.assert_array_equal(F.dropout_backward(x, np.ones(x.shape, bool), p), 0)
    # non-finite inputs: inf * 0 and NaN * 0 are NaN, as torch
    z = np.array([np.inf, np.nan, -1.0, 2.0], dtype)
    y, _ = F.dropout(z, 1.0)
    yt = torch.nn.functional.dropout(torch.tensor(z), p=1.0, training=True)
    same_bits(y, yt.numpy(), "torch, non-finite")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_of_non_finite_values_follows_the_formula(dtype):
    x = np.array([np.inf, -np.inf, np.nan, 1.0] * 50, dtype)
    y, mask = F.dropout(x, 0.5, 1)
    assert mask.any() and not mask.all()
    np.testing.assert_array_equal(y, dropout_formula(x, mask, 0.5))  # dropped inf: NaN


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_keeps_a_0d_shape(dtype):
    y, mask = F.dropout(np.array(3.0, dtype), 0.5, 1)
    check_array(y, (), dtype)
    check_array(mask, (), np.bool_)
    assert y == (6.0 if mask else 0.0)
    dx = F.dropout_backward(np.array(1.0, dtype), mask, 0.5)
    check_array(dx, (), dtype)
    assert dx == (2.0 if mask else 0.0)


@pytest.mark.parametrize("p", PS + [0.0], ids=lambda p: f"p={p:.3g}")
def test_dropout_backward_finite_differences(p):
    rng = rng_for("dropout-fd", p)
    x = rng.standard_normal((3, 4, 5))
    g = rng.standard_normal(x.shape)
    _, mask = F.dropout(x, p, 8)

    def objective():  # the same seed: the same mask, so y is linear in x
        return float(np.sum(F.dropout(x, p, 8)[0] * g))

    fd_check(F.dropout_backward(g, mask, p), objective, x, "dropout")


def test_dropout_backward_takes_any_bool_layout_and_lists():
    rng = rng_for("dropout-layouts")
    dy = randn(rng, (6, 7), F64)
    _, mask = F.dropout(dy, 0.5, 2)
    want = F.dropout_backward(dy, mask, 0.5)
    same_bits(F.dropout_backward(dy, np.asfortranarray(mask), 0.5), want, "Fortran mask")
    big = np.zeros((6, 14), bool)
    big[:, ::2] = mask
    same_bits(F.dropout_backward(dy, big[:, ::2], 0.5), want, "strided mask")
    same_bits(F.dropout_backward(np.asfortranarray(dy), mask, 0.5), want, "Fortran dy")
    same_bits(F.dropout_backward(dy.tolist(), mask.tolist(), 0.5), want, "lists")
    same_bits(F.dropout_backward(dy, mask, np.float32(0.5)), want, "numpy p")


# ---------------------------------------------------------------------------------------
# against PyTorch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", AVG_POOL_CASES + [BIG_AVG_POOL_CASE], ids=str)
def test_avg_pool2d_matches_torch(case, dtype):
    # Each window is summed in torch's order (row-major) and divided by kh*kw as torch does,
    # and the backward adds the same shares in the same order: the same bits in both dtypes.
    torch = pytest.importorskip("torch")
    x, dy, kernel, stride, padding = avg_pool_data(case, dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.avg_pool2d(xt, kernel, stride, padding)
    yt.backward(torch.tensor(dy))
    same_bits(F.avg_pool2d(x, kernel, stride, padding), yt.detach().numpy(), "y")
    same_bits(F.avg_pool2d_backward(dy, x.shape, kernel, stride, padding), xt.grad.numpy(), "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_avg_pool2d_matches_torch_on_non_finite_values(dtype):
    torch = pytest.importorskip("torch")
    x = np.ones((1, 2, 5, 5), dtype)
    x[0, 0, 1, 1] = np.nan
    x[0, 1, 2, 2] = np.inf
    x[0, 1, 3, 3] = -np.inf
    for kernel, stride, padding in [(2, None, 0), (3, 2, 1), (3, 1, 1)]:
        yt = torch.nn.functional.avg_pool2d(torch.tensor(x), kernel, stride, padding)
        same_bits(F.avg_pool2d(x, kernel, stride, padding), yt.numpy(), f"{kernel}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tanh_matches_torch(dtype):
    torch = pytest.importorskip("torch")
    rng = rng_for("tanh-torch")
    z = randn(rng, (3, 4, 50), dtype, scale=4.0)
    z.reshape(-1)[:4] = [0.0, -0.0, 30.0, -30.0]
    g = randn(rng, z.shape, dtype)
    zt = torch.tensor(z, requires_grad=True)
    at = torch.tanh(zt)
    at.backward(torch.tensor(g))
    a = F.tanh(z)
    assert_close(a, at.detach().numpy(), TOL["tanh"][dtype], "tanh")
    # the backward from torch's own output, and from ours
    assert_close(
        F.tanh_backward(g, at.detach().numpy()),
        zt.grad.numpy(),
        TOL["tanh_backward"][dtype],
        "tanh_backward",
    )
    assert_close(
        F.tanh_backward(g, a),
        zt.grad.numpy(),
        10 * TOL["tanh_backward"][dtype],
        "tanh_backward from our a",
    )
    np.testing.assert_array_equal(np.signbit(a), np.signbit(at.detach().numpy()))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("p", PS, ids=lambda p: f"p={p:.3g}")
def test_dropout_backward_matches_torch_autograd(p, dtype):
    # torch's own dropout draws another mask; what must agree is the function of the mask:
    # y = x * mask / (1 - p) and its gradient, computed by torch's autograd
    torch = pytest.importorskip("torch")
    rng = rng_for("dropout-torch", p)
    x = randn(rng, (4, 3, 10, 10), dtype)
    g = randn(rng, x.shape, dtype)
    y, mask = F.dropout(x, p, 21)
    xt = torch.tensor(x, requires_grad=True)
    yt = xt * torch.tensor(mask) / (1 - p)
    yt.backward(torch.tensor(g))
    same_bits(y, yt.detach().numpy(), "y")
    np.testing.assert_array_equal(F.dropout_backward(g, mask, p), xt.grad.numpy())


def test_dropout_keep_rate_matches_torch():
    # the same Bernoulli(1 - p): torch's kept fraction and ours within 5 sigma of each other
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    n = 200_000
    for p in (0.1, 0.5, 0.9):
        ours = F.dropout(np.ones(n, F32), p, 4)[1].mean()
        theirs = float((torch.nn.functional.dropout(torch.ones(n), p) != 0).float().mean())
        assert abs(ours - theirs) < 5 * np.sqrt(2 * p * (1 - p) / n)


# ---------------------------------------------------------------------------------------
# the oracle itself: finite differences of its own forwards, and torch in float64
# ---------------------------------------------------------------------------------------

TORCH_TOL = dict(rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("case", AVG_POOL_CASES, ids=str)
def test_reference_avg_pool2d_against_finite_differences_and_torch(case):
    x, g, kernel, stride, padding = avg_pool_data(case, F64)

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
    rng = rng_for("reference-tanh")
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


# ---------------------------------------------------------------------------------------
# threads, layouts, inputs untouched
# ---------------------------------------------------------------------------------------


def _calls(dtype):
    """(name, function, args) for each new kernel, above the threading thresholds."""
    rng = rng_for("calls", np.dtype(dtype).name)
    x = randn(rng, (8, 16, 24, 24), dtype)
    y = F.avg_pool2d(x, 3, 2, 1)
    dy = randn(rng, y.shape, dtype)
    z = randn(rng, (64, 64, 20), dtype)
    a = F.tanh(z)
    _, mask = F.dropout(z, 0.3, 5)
    return [
        ("avg_pool2d", F.avg_pool2d, (x, 3, 2, 1)),
        ("avg_pool2d 2x2", F.avg_pool2d, (x, 2)),
        ("avg_pool2d_backward", F.avg_pool2d_backward, (dy, x.shape, 3, 2, 1)),
        ("tanh", F.tanh, (z,)),
        ("tanh_backward", F.tanh_backward, (z, a)),
        ("dropout", F.dropout, (z, 0.3, 5)),
        ("dropout_backward", F.dropout_backward, (z, mask, 0.3)),
    ]


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_results_do_not_depend_on_the_number_of_threads(dtype, restore_thread_count):
    for name, fn, args in _calls(dtype):
        one = as_tuple(with_threads(1, lambda: fn(*args)))
        for threads in (2, 3):
            other = as_tuple(with_threads(threads, lambda: fn(*args)))
            for a, b in zip(one, other):
                same_bits(b, a, f"{name} with {threads} threads")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_other_layouts_give_identical_results(dtype):
    for name, fn, args in _calls(dtype):
        want = as_tuple(fn(*args))
        x = args[0]
        for variant in (
            np.asfortranarray(x),
            x[..., ::-1].copy()[..., ::-1],
            np.swapaxes(np.swapaxes(x, 0, -1).copy(), 0, -1),
        ):
            np.testing.assert_array_equal(variant, x)
            for a, b in zip(as_tuple(fn(variant, *args[1:])), want):
                same_bits(a, b, f"{name} layout")


def test_inputs_are_not_modified_and_outputs_are_new():
    for dtype in DTYPES:
        for name, fn, args in _calls(dtype):
            copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
            results = as_tuple(fn(*args))
            for a, c in zip(args, copies):
                if isinstance(a, np.ndarray):
                    np.testing.assert_array_equal(a, c, err_msg=name)
                    for r in results:
                        assert not np.shares_memory(r, a), name


def test_lists_are_accepted_as_arrays():
    for name, fn, args in _calls(F64):
        want = as_tuple(fn(*args))
        got = as_tuple(fn(*(a.tolist() if isinstance(a, np.ndarray) else a for a in args)))
        for a, b in zip(got, want):
            same_bits(a, b, f"{name} with lists")


# ---------------------------------------------------------------------------------------
# validation: ValueError for sizes, shapes and values, TypeError for types and dtypes
# ---------------------------------------------------------------------------------------


def msg(text):
    """A regex matching the message from its start, with the literal text escaped."""
    return "^" + re.escape(text)


def raises(exception, text):
    return pytest.raises(exception, match=msg(text))


BAD_PAIRS = [
    "2",
    1.0,
    2.5,
    (1, 1, 1),
    (1,),
    (),
    (1, "a"),
    (1.0, 1),
    True,
    None,
    [1, None],
    {"h": 1},
]
BAD_DTYPES = [
    np.int64,
    np.int32,
    np.uint8,
    np.bool_,
    np.float16,
    np.complex64,
    np.complex128,
    np.longdouble,
    object,
]


def dtype_name(dtype):
    return str(np.dtype(dtype))


@pytest.mark.parametrize(
    "x_shape, kernel, stride, padding, expected",
    [
        ((4, 4), 2, None, 0, "input: expected 4 dims (N, C, H, W), got shape (4, 4)"),
        (
            (1, 1, 1, 4, 4),
            2,
            None,
            0,
            "input: expected 4 dims (N, C, H, W), got shape (1, 1, 1, 4, 4)",
        ),
        # an empty batch is refused, as max_pool2d refuses it
        ((0, 1, 4, 4), 2, None, 0, "input: expected every dim >= 1, got shape (0, 1, 4, 4)"),
        ((1, 0, 4, 4), 2, None, 0, "input: expected every dim >= 1, got shape (1, 0, 4, 4)"),
        ((1, 1, 4, 0), 2, None, 0, "input: expected every dim >= 1, got shape (1, 1, 4, 0)"),
        ((1, 1, 4, 4), 0, None, 0, "kernel_size: expected >= 1, got 0"),
        ((1, 1, 4, 4), (2, -1), None, 0, "kernel_size: expected >= 1, got -1"),
        ((1, 1, 4, 4), 2, 0, 0, "stride: expected >= 1, got 0"),
        ((1, 1, 4, 4), 2, (0, 1), 0, "stride: expected >= 1, got 0"),
        ((1, 1, 4, 4), 2, 2, -1, "padding: expected >= 0, got -1"),
        (
            (1, 1, 4, 4),
            2,
            2,
            2,
            "padding: expected at most half the kernel size (2, 2), got (2, 2)",
        ),
        (
            (1, 1, 6, 6),
            (3, 2),
            1,
            (1, 2),
            "padding: expected at most half the kernel size (3, 2), got (1, 2)",
        ),
        (
            (1, 1, 3, 3),
            5,
            None,
            0,
            "input: expected padded size (3, 3) >= kernel size (5, 5), got input shape (1, 1, 3, 3)",
        ),
        (
            (1, 1, 3, 8),
            (6, 2),
            1,
            (1, 1),
            "input: expected padded size (5, 10) >= kernel size (6, 2), got input shape (1, 1, 3, 8)",
        ),
    ],
)
def test_avg_pool2d_value_errors(x_shape, kernel, stride, padding, expected):
    with raises(ValueError, "[avg_pool2d] " + expected):
        F.avg_pool2d(np.ones(x_shape), kernel, stride, padding)
    # the backward checks x_shape and the parameters the same way
    x_expected = expected.replace("input shape", "x_shape").replace("input", "x_shape")
    with raises(ValueError, "[avg_pool2d_backward] " + x_expected):
        F.avg_pool2d_backward(np.ones((1, 1, 1, 1)), x_shape, kernel, stride, padding)


def test_avg_pool2d_padding_of_exactly_half_the_kernel_is_fine():
    assert F.avg_pool2d(np.ones((1, 1, 4, 4)), 2, 2, 1).shape == (1, 1, 3, 3)
    assert F.avg_pool2d(np.ones((1, 1, 3, 3)), 5, 1, 2).shape == (1, 1, 3, 3)
    assert F.avg_pool2d_backward(np.ones((1, 1, 3, 3)), (1, 1, 3, 3), 5, 1, 2).shape == (1, 1, 3, 3)


@pytest.mark.parametrize(
    "dy_shape, x_shape, kernel, stride, padding, expected",
    [
        (
            (1, 1, 2, 1),
            (1, 1, 4, 4),
            2,
            None,
            0,
            "doutput: expected shape (1, 1, 2, 2) (the forward output's), got shape (1, 1, 2, 1)",
        ),
        (
            (1, 1, 2, 2),
            (1, 1, 4, 4),
            2,
            1,
            0,
            "doutput: expected shape (1, 1, 3, 3) (the forward output's), got shape (1, 1, 2, 2)",
        ),
        (
            (2, 1, 2, 2),
            (1, 1, 4, 4),
            2,
            None,
            0,
            "doutput: expected shape (1, 1, 2, 2) (the forward output's), got shape (2, 1, 2, 2)",
        ),
        (
            (1, 4),
            (1, 1, 4, 4),
            2,
            None,
            0,
            "doutput: expected shape (1, 1, 2, 2) (the forward output's), got shape (1, 4)",
        ),
        (
            (1, 1, 2, 2),
            (1, 4, 4),
            2,
            None,
            0,
            "x_shape: expected 4 dims (N, C, H, W), got shape (1, 4, 4)",
        ),
        (
            (1, 1, 2, 2),
            (1, 1, -4, 4),
            2,
            None,
            0,
            "x_shape: expected every dim >= 1, got shape (1, 1, -4, 4)",
        ),
    ],
)
def test_avg_pool2d_backward_shape_errors(dy_shape, x_shape, kernel, stride, padding, expected):
    with raises(ValueError, "[avg_pool2d_backward] " + expected):
        F.avg_pool2d_backward(np.ones(dy_shape), x_shape, kernel, stride, padding)


@pytest.mark.parametrize("bad", BAD_PAIRS, ids=repr)
@pytest.mark.parametrize("name", ["kernel_size", "stride", "padding"])
def test_avg_pool2d_parameters_of_wrong_type(name, bad):
    if name == "stride" and bad is None:
        return  # stride=None means "the kernel size"
    args = dict(kernel_size=2, stride=None, padding=0)
    args[name] = bad
    with raises(TypeError, f"[avg_pool2d] {name}: expected an int or a pair of ints, got "):
        F.avg_pool2d(np.ones((1, 1, 4, 4)), **args)
    with raises(TypeError, f"[avg_pool2d_backward] {name}: expected an int or a pair of ints"):
        F.avg_pool2d_backward(np.ones((1, 1, 2, 2)), (1, 1, 4, 4), **args)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=dtype_name)
def test_avg_pool2d_refuses_other_dtypes(dtype):
    name = dtype_name(dtype)
    with raises(TypeError, f"[avg_pool2d] input: expected float32 or float64, got {name}"):
        F.avg_pool2d(np.ones((1, 1, 4, 4), dtype), 2)
    with raises(
        TypeError, f"[avg_pool2d_backward] doutput: expected float32 or float64, got {name}"
    ):
        F.avg_pool2d_backward(np.ones((1, 1, 2, 2), dtype), (1, 1, 4, 4), 2)


@pytest.mark.parametrize(
    "bad",
    ["abcd", 16, 4.0, None, (1, 1, 4.0, 4), (1, 1, "4", 4), (1, 1, None, 4), (1, True, 4, 4)],
    ids=repr,
)
def test_avg_pool2d_backward_x_shape_of_wrong_type(bad):
    with raises(TypeError, "[avg_pool2d_backward] x_shape: expected a sequence of ints, got "):
        F.avg_pool2d_backward(np.ones((1, 1, 2, 2)), bad, 2)


def test_avg_pool2d_refuses_none_and_non_arrays():
    with raises(TypeError, "[avg_pool2d] input: expected an array, got None"):
        F.avg_pool2d(None, 2)
    with raises(TypeError, "[avg_pool2d_backward] doutput: expected an array, got None"):
        F.avg_pool2d_backward(None, (1, 1, 4, 4), 2)
    with raises(TypeError, "[avg_pool2d] input: expected float32 or float64, got <U3"):
        F.avg_pool2d("abc", 2)


def test_tanh_errors():
    with raises(TypeError, "[tanh] input: expected an array, got None"):
        F.tanh(None)
    for dtype in BAD_DTYPES:
        name = dtype_name(dtype)
        with raises(TypeError, f"[tanh] input: expected float32 or float64, got {name}"):
            F.tanh(np.ones(3, dtype))
        with raises(TypeError, f"[tanh_backward] doutput: expected float32 or float64, got {name}"):
            F.tanh_backward(np.ones(3, dtype), np.ones(3))
        with raises(TypeError, f"[tanh_backward] a: expected float32 or float64, got {name}"):
            F.tanh_backward(np.ones(3), np.ones(3, dtype))
    with raises(
        TypeError, "[tanh_backward] a: expected float32 like the first array argument, got float64"
    ):
        F.tanh_backward(np.ones(3, F32), np.ones(3, F64))
    with raises(
        TypeError, "[tanh_backward] a: expected float64 like the first array argument, got float32"
    ):
        F.tanh_backward(np.ones(3, F64), np.ones(3, F32))
    with raises(TypeError, "[tanh_backward] doutput: expected an array, got None"):
        F.tanh_backward(None, np.ones(3))
    with raises(TypeError, "[tanh_backward] a: expected an array, got None"):
        F.tanh_backward(np.ones(3), None)
    with raises(
        ValueError, "[tanh_backward] a: expected shape (2, 3) (doutput's), got shape (3, 2)"
    ):
        F.tanh_backward(np.ones((2, 3)), np.ones((3, 2)))
    with raises(ValueError, "[tanh_backward] a: expected shape (6,) (doutput's), got shape (2, 3)"):
        F.tanh_backward(np.ones(6), np.ones((2, 3)))


@pytest.mark.parametrize(
    "bad, shown",
    [
        (-0.1, "-0.1"),
        (1.5, "1.5"),
        (1.0000000000000002, "1.0000000000000002"),
        (-1e-300, "-1e-300"),
        (np.nan, "nan"),
        (np.inf, "inf"),
        (-np.inf, "-inf"),
        (2, "2"),
        (np.float32(1.5), "1.5"),
    ],
    ids=["-0.1", "1.5", "1+ulp", "-1e-300", "nan", "inf", "-inf", "int 2", "float32 1.5"],
)
def test_dropout_refuses_p_outside_0_1(bad, shown):
    x = np.ones((2, 3))
    with raises(ValueError, f"[dropout] p: expected a probability in [0, 1], got {shown}"):
        F.dropout(x, bad)
    with raises(ValueError, f"[dropout_backward] p: expected a probability in [0, 1], got {shown}"):
        F.dropout_backward(x, np.ones((2, 3), bool), bad)


@pytest.mark.parametrize("bad", ["0.5", None, [0.5], 0.5j, True, np.array(0.5), object()], ids=repr)
def test_dropout_p_of_wrong_type(bad):
    x = np.ones((2, 3))
    with raises(TypeError, "[dropout] p: expected a float, got "):
        F.dropout(x, bad)
    with raises(TypeError, "[dropout_backward] p: expected a float, got "):
        F.dropout_backward(x, np.ones((2, 3), bool), bad)


def test_dropout_seed_errors():
    x = np.ones(4)
    for bad in (-1, -(2**70), 2**64, 2**80):
        with raises(ValueError, f"[dropout] seed: expected an int in [0, 2**64), got {bad}"):
            F.dropout(x, 0.5, bad)
    with raises(ValueError, "[dropout] seed: expected an int in [0, 2**64), got -3"):
        F.dropout(x, 0.5, np.int64(-3))
    for bad in (1.0, "1", None, True, np.float64(2.0), [1]):
        with raises(TypeError, "[dropout] seed: expected an int, got "):
            F.dropout(x, 0.5, bad)
    F.dropout(x, 0.5, 2**64 - 1)  # the largest seed is fine


def test_dropout_array_errors():
    with raises(TypeError, "[dropout] input: expected an array, got None"):
        F.dropout(None)
    mask = np.ones(3, bool)
    for dtype in BAD_DTYPES:
        name = dtype_name(dtype)
        with raises(TypeError, f"[dropout] input: expected float32 or float64, got {name}"):
            F.dropout(np.ones(3, dtype))
        with raises(
            TypeError, f"[dropout_backward] doutput: expected float32 or float64, got {name}"
        ):
            F.dropout_backward(np.ones(3, dtype), mask, 0.5)
    for dtype in (np.float64, np.float32, np.int64, np.uint8, np.int8, object):
        with raises(
            TypeError, f"[dropout_backward] mask: expected a bool array, got {dtype_name(dtype)}"
        ):
            F.dropout_backward(np.ones(3), np.ones(3, dtype), 0.5)
    with raises(TypeError, "[dropout_backward] doutput: expected an array, got None"):
        F.dropout_backward(None, mask, 0.5)
    with raises(TypeError, "[dropout_backward] mask: expected an array, got None"):
        F.dropout_backward(np.ones(3), None, 0.5)
    with raises(
        ValueError, "[dropout_backward] mask: expected shape (2, 3) (doutput's), got shape (3, 2)"
    ):
        F.dropout_backward(np.ones((2, 3)), np.ones((3, 2), bool), 0.5)
    with raises(
        ValueError, "[dropout_backward] mask: expected shape (6,) (doutput's), got shape ()"
    ):
        F.dropout_backward(np.ones(6), np.array(True), 0.5)


def test_everything_still_works_after_the_errors():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(F.avg_pool2d(x, 2).reshape(-1), [2.5, 4.5, 10.5, 12.5])
    y, mask = F.dropout(x, 0.0)
    np.testing.assert_array_equal(y, x)
    assert F.tanh(np.zeros(2)).tolist() == [0.0, 0.0]
