"""cnnbp's dropout: the mask is a documented counter-based hash of (seed, flat index), kept
with probability 1 - p, the same on every run and for every thread count, independent
between seeds and positions; y is exactly x * mask / (1 - p) in x's dtype, p = 0 the
identity and p = 1 zeros as torch. (Its values against the oracle, its gradient against
finite differences and its threads: the op table, tests/ops.py.)"""

import numpy as np
import pytest
from cnnbp import functional as F
from cnnbp import reference as ref
from conftest import DTYPES, assert_same_bits, check_array, randn, rng_for
from ops import DROPOUT_PS

F32, F64 = np.float32, np.float64
DTYPE_IDS = ["float32", "float64"]
PS = DROPOUT_PS
DROPOUT_SHAPES = [(7,), (3, 4), (2, 3, 4, 5), (1,), (0, 3), (64, 64, 20)]


def dropout_formula(x, mask, p):
    """y = x * mask / (1 - p) as NumPy computes it: in x's dtype (p a Python float)."""
    with np.errstate(invalid="ignore"):  # inf * 0
        return x * mask / (1 - p)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("p", PS, ids=lambda p: f"p={p:.3g}")
def test_dropout_is_exactly_x_times_mask_over_keep_probability(p, dtype):
    for shape in DROPOUT_SHAPES:
        rng = rng_for("new_ops", "dropout", shape, p)
        x = randn(rng, shape, dtype)
        y, mask = F.dropout(x, p, seed=17)
        check_array(y, shape, dtype)
        check_array(mask, shape, np.bool_)
        np.testing.assert_array_equal(y, dropout_formula(x, mask, p))
        dy = randn(rng, shape, dtype)
        np.testing.assert_array_equal(F.dropout_backward(dy, mask, p), dropout_formula(dy, mask, p))


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
    x = randn(rng_for("new_ops", "dropout-det"), (8, 3, 20, 20), dtype)
    y, mask = F.dropout(x, 0.3, 99)
    y2, mask2 = F.dropout(x, 0.3, 99)
    assert_same_bits(y2, y, "y")
    assert_same_bits(mask2, mask, "mask")
    # the default seed is 0 and the default p 0.5
    assert_same_bits(F.dropout(x)[1], F.dropout(x, 0.5, 0)[1], "defaults")
    # a NumPy integer seed is that integer
    assert_same_bits(F.dropout(x, 0.3, np.uint64(99))[1], mask, "numpy seed")
    assert_same_bits(F.dropout(x, 0.3, np.int64(99))[1], mask, "numpy seed")
    # another seed, another mask
    assert not np.array_equal(F.dropout(x, 0.3, 100)[1], mask)


def test_dropout_mask_depends_on_the_flat_index_only():
    # not on the shape, the dtype or the values: element i of any array gets the same draw
    x = randn(rng_for("new_ops", "dropout-flat"), (4, 5, 6), F64)
    _, mask = F.dropout(x, 0.4, 5)
    assert_same_bits(F.dropout(x.reshape(-1), 0.4, 5)[1], mask.reshape(-1), "flat")
    assert_same_bits(F.dropout(x.astype(F32) * 3, 0.4, 5)[1], mask, "float32")
    assert_same_bits(F.dropout(x[:2], 0.4, 5)[1], mask[:2], "prefix")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_p_zero_is_the_identity(dtype):
    x = randn(rng_for("new_ops", "dropout-0"), (3, 50), dtype)
    x[0, :3] = [np.nan, -0.0, np.inf]
    for p in (0, 0.0):
        y, mask = F.dropout(x, p, 3)
        assert mask.all()
        assert_same_bits(y, x, "y")
        assert_same_bits(F.dropout_backward(x, mask, p), x, "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_p_one_gives_zeros_as_torch(dtype):
    torch = pytest.importorskip("torch")
    x = randn(rng_for("new_ops", "dropout-1"), (3, 50), dtype)
    for p in (1, 1.0):
        y, mask = F.dropout(x, p, 3)
        check_array(y, x.shape, dtype)
        assert not mask.any()
        np.testing.assert_array_equal(y, 0)
        yt = torch.nn.functional.dropout(torch.tensor(x), p=1.0, training=True)
        assert_same_bits(y, yt.numpy(), "torch")  # x * 0: signed zeros as torch's
        dx = F.dropout_backward(x, mask, p)
        np.testing.assert_array_equal(dx, 0)
        # the gradient of x * 0 is 0 whatever the mask says
        np.testing.assert_array_equal(F.dropout_backward(x, np.ones(x.shape, bool), p), 0)
    # non-finite inputs: inf * 0 and NaN * 0 are NaN, as torch
    z = np.array([np.inf, np.nan, -1.0, 2.0], dtype)
    y, _ = F.dropout(z, 1.0)
    yt = torch.nn.functional.dropout(torch.tensor(z), p=1.0, training=True)
    assert_same_bits(y, yt.numpy(), "torch, non-finite")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_of_non_finite_values_follows_the_formula(dtype):
    x = np.array([np.inf, -np.inf, np.nan, 1.0] * 50, dtype)
    y, mask = F.dropout(x, 0.5, 1)
    assert mask.any() and not mask.all()
    np.testing.assert_array_equal(y, dropout_formula(x, mask, 0.5))  # dropped inf: NaN


def test_dropout_backward_takes_any_bool_layout_and_lists():
    rng = rng_for("new_ops", "dropout-layouts")
    dy = randn(rng, (6, 7), F64)
    _, mask = F.dropout(dy, 0.5, 2)
    want = F.dropout_backward(dy, mask, 0.5)
    assert_same_bits(F.dropout_backward(dy, np.asfortranarray(mask), 0.5), want, "Fortran mask")
    big = np.zeros((6, 14), bool)
    big[:, ::2] = mask
    assert_same_bits(F.dropout_backward(dy, big[:, ::2], 0.5), want, "strided mask")
    assert_same_bits(F.dropout_backward(np.asfortranarray(dy), mask, 0.5), want, "Fortran dy")
    assert_same_bits(F.dropout_backward(dy.tolist(), mask.tolist(), 0.5), want, "lists")
    assert_same_bits(F.dropout_backward(dy, mask, np.float32(0.5)), want, "numpy p")
