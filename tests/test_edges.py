"""Numerics at the edges: huge logits, infinities, probabilities 0 and 1, NaN.

Each kernel is held to the float64 oracle (cnnbp.reference) and, where PyTorch is
installed, to torch itself: bit for bit where both compute the same operations (gradients
at saturated logits, the -100 clamp, NaN routing through max-pool and ReLU), within the
per-op tolerances of conftest.KERNEL_TOL elsewhere.
"""

import warnings

import numpy as np
import pytest
from cnnbp import functional as F
from cnnbp import reference as ref
from conftest import DTYPES, KERNEL_TOL, assert_close, rng_for, wide

F32, F64 = np.float32, np.float64
DTYPE_IDS = ["float32", "float64"]
# the loss tolerances of the kernel tests (conftest.KERNEL_TOL)
LOSS_TOL = KERNEL_TOL["binary_cross_entropy_with_logits"]


def torch_or_skip():
    return pytest.importorskip("torch")


def torch_grad(fn, x, *rest):
    """(value, dvalue/dx) of a torch loss fn(x, *rest) at the NumPy array x."""
    torch = torch_or_skip()
    tx = torch.tensor(x, requires_grad=True)
    value = fn(tx, *(torch.tensor(r) for r in rest))
    value.backward()
    return value.item(), tx.grad.numpy()


def assert_same_bits(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    np.testing.assert_array_equal(got, want, err_msg=what)  # NaNs in the same places


# ---------------------------------------------------------------------------------------
# logits of +-1e4: BCE-with-logits and cross-entropy stay finite and exact
# ---------------------------------------------------------------------------------------

# (logit, target, exact loss): |z| = 1e4 saturates the sigmoid completely
BCE_LOGIT_CASES = [
    (1e4, 0.0, 1e4),
    (-1e4, 1.0, 1e4),
    (1e4, 1.0, 0.0),
    (-1e4, 0.0, 0.0),
    (1e4, 0.5, 5e3),
    (-1e4, 0.25, 2.5e3),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bce_with_logits_at_huge_logits(dtype):
    for z, y, exact in BCE_LOGIT_CASES:
        zs, ys = np.array([z], dtype), np.array([y], dtype)
        loss = F.binary_cross_entropy_with_logits(zs, ys)
        grad = F.binary_cross_entropy_with_logits_backward(zs, ys)
        assert np.isfinite(loss) and np.all(np.isfinite(grad))
        assert loss == exact, (z, y, loss)
        assert loss == ref.binary_cross_entropy_with_logits(zs, ys)
        # sigmoid(z) is exactly 0 or 1 here, so dL/dz = sigmoid(z) - y is exact
        assert_same_bits(grad, np.array([(1.0 if z > 0 else 0.0) - y], dtype))
    # a batch mixing them: the mean of the exact values
    zs = np.array([c[0] for c in BCE_LOGIT_CASES], dtype)
    ys = np.array([c[1] for c in BCE_LOGIT_CASES], dtype)
    want = ref.binary_cross_entropy_with_logits(zs, ys)
    assert_close(F.binary_cross_entropy_with_logits(zs, ys), want, LOSS_TOL[dtype])
    assert_close(
        F.binary_cross_entropy_with_logits_backward(zs, ys),
        ref.binary_cross_entropy_with_logits_backward(zs, ys),
        LOSS_TOL[dtype],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bce_with_logits_at_huge_logits_matches_torch(dtype):
    torch = torch_or_skip()
    for z, y, _ in BCE_LOGIT_CASES:
        zs, ys = np.array([z, -z / 2], dtype), np.array([y, 1 - y], dtype)
        t_loss, t_grad = torch_grad(torch.nn.functional.binary_cross_entropy_with_logits, zs, ys)
        assert F.binary_cross_entropy_with_logits(zs, ys) == t_loss
        assert_same_bits(F.binary_cross_entropy_with_logits_backward(zs, ys), t_grad)


CE_CASES = [
    # (logits row, label, exact loss)
    ([1e4, -1e4, 0.0], 0, 0.0),
    ([1e4, -1e4, 0.0], 1, 2e4),
    ([-1e4, -1e4, -1e4], 2, float(np.log(3.0))),
    ([1e4, 1e4], 1, float(np.log(2.0))),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cross_entropy_at_huge_logits(dtype):
    for row, label, exact in CE_CASES:
        z, labels = np.array([row], dtype), np.array([label])
        loss = F.cross_entropy(z, labels)
        grad = F.cross_entropy_backward(z, labels)
        assert np.isfinite(loss) and np.all(np.isfinite(grad))
        assert loss == exact, (row, label, loss)
        assert loss == ref.cross_entropy(z, labels)
        # equal logits share the probability exactly; a dominated one gets exactly 0
        assert_same_bits(grad, ref.cross_entropy_backward(z, labels).astype(dtype))
    z = np.array([[1e4, 1e4, -1e4], [-1e4, 0.0, 1e4], [3.0, -1e4, 1e4]], dtype)
    labels = np.array([2, 0, 1])
    assert_close(F.cross_entropy(z, labels), ref.cross_entropy(z, labels), LOSS_TOL[dtype])
    assert_same_bits(
        F.cross_entropy_backward(z, labels), ref.cross_entropy_backward(z, labels).astype(dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cross_entropy_at_huge_logits_matches_torch(dtype):
    torch = torch_or_skip()
    # softmax probabilities 1, 1/2 and 0: the gradients are exact in both
    z = np.array([[1e4, 1e4, -1e4], [-1e4, 0.0, 1e4], [1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], dtype)
    labels = np.array([2, 0, 1, 1])
    t_loss, t_grad = torch_grad(torch.nn.functional.cross_entropy, z, labels)
    assert_same_bits(F.cross_entropy_backward(z, labels), t_grad)
    # cnnbp sums in float64 and returns a Python float; torch rounds to the dtype
    assert F.cross_entropy(z, labels) == pytest.approx(t_loss, rel=LOSS_TOL[dtype])
    # 1/3 each: cnnbp rounds the float64 softmax once, torch computes in the dtype
    z = np.array([[1e4, 1e4, 1e4], [-1e4, -1e4, -1e4]], dtype)
    labels = np.array([0, 2])
    t_loss, t_grad = torch_grad(torch.nn.functional.cross_entropy, z, labels)
    assert_close(F.cross_entropy_backward(z, labels), t_grad, LOSS_TOL[dtype])
    assert F.cross_entropy(z, labels) == pytest.approx(t_loss, rel=LOSS_TOL[dtype])


def test_cross_entropy_with_infinite_or_nan_logits_is_nan_like_torch():
    torch = torch_or_skip()
    for row in ([np.inf, 0.0], [-np.inf, -np.inf], [np.nan, 1.0], [0.0, np.inf]):
        z = np.array([row])
        for label in (0, 1):
            labels = np.array([label])
            t_loss, t_grad = torch_grad(torch.nn.functional.cross_entropy, z, labels)
            loss = F.cross_entropy(z, labels)
            assert np.isnan(loss) == np.isnan(t_loss), (row, label, loss, t_loss)
            assert_same_bits(np.isnan(F.cross_entropy_backward(z, labels)), np.isnan(t_grad))


# ---------------------------------------------------------------------------------------
# sigmoid does not overflow
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sigmoid_at_huge_and_infinite_inputs(dtype):
    z = np.array(
        [
            1e4,
            -1e4,
            np.inf,
            -np.inf,
            1e30,
            -1e30,
            88.8,
            -88.8,
            104.0,
            -104.0,
            710.0,
            -710.0,
            0.0,
            -0.0,
        ],
        dtype,
    )
    with np.errstate(all="raise"):  # nothing here may need NumPy's overflow handling
        a = F.sigmoid(z)
    assert np.all((a >= 0) & (a <= 1)), a
    assert_same_bits(a[:6], np.array([1, 0, 1, 0, 1, 0], dtype))
    assert_close(a, ref.sigmoid(z), 1e-6 if dtype == F32 else 1e-14)
    assert np.isnan(F.sigmoid(np.array([np.nan], dtype))[0])
    # the gradient at a saturated output is exactly 0, not NaN
    da = np.ones_like(a)
    assert_same_bits(F.sigmoid_backward(da[:6], a[:6]), np.zeros(6, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sigmoid_saturation_matches_torch(dtype):
    torch = torch_or_skip()
    z = np.array([1e4, -1e4, np.inf, -np.inf, 1e30, -1e30, 50.0, -50.0, 0.0], dtype)
    want = torch.sigmoid(torch.tensor(z)).numpy()
    got = F.sigmoid(z)
    assert_same_bits(got[:6], want[:6])
    assert_close(got, want, 1e-6 if dtype == F32 else 1e-14)


# ---------------------------------------------------------------------------------------
# BCE at probabilities 0 and 1: torch's -100 clamp
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bce_at_probabilities_zero_and_one(dtype):
    a = np.array([0.0, 1.0, 0.0, 1.0, -0.0], dtype)
    y = np.array([1.0, 0.0, 0.0, 1.0, 0.5], dtype)
    want = [100.0, 100.0, 0.0, 0.0, 50.0]  # log clamped at -100, never infinite
    for i in range(len(a)):
        assert F.binary_cross_entropy(a[i : i + 1], y[i : i + 1]) == want[i]
        assert ref.binary_cross_entropy(a[i : i + 1], y[i : i + 1]) == want[i]
    assert F.binary_cross_entropy(a, y) == pytest.approx(np.mean(want), rel=1e-15)
    grad = F.binary_cross_entropy_backward(a, y)
    assert np.all(np.isfinite(grad))
    assert_same_bits(grad, ref.binary_cross_entropy_backward(a, y).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bce_at_probabilities_zero_and_one_matches_torch(dtype):
    torch = torch_or_skip()
    a = np.array([0.0, 1.0, 0.0, 1.0, 1e-30, 1 - 1e-7, 0.5], dtype)
    y = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5], dtype)
    for i in range(len(a)):
        ai, yi = a[i : i + 1], y[i : i + 1]
        t_loss, t_grad = torch_grad(torch.nn.functional.binary_cross_entropy, ai, yi)
        assert F.binary_cross_entropy(ai, yi) == pytest.approx(t_loss, rel=1e-7, abs=0), (ai, yi)
        assert_same_bits(F.binary_cross_entropy_backward(ai, yi), t_grad)


# ---------------------------------------------------------------------------------------
# NaN through max_pool2d and relu, forward and backward, exactly as torch
# ---------------------------------------------------------------------------------------


def nan_laden(rng, shape, dtype):
    """Small integers (ties) salted with NaN, +inf and -inf."""
    x = rng.integers(-2, 3, shape).astype(dtype)
    u = rng.random(shape)
    x[u < 0.2] = np.nan
    x[(u >= 0.2) & (u < 0.3)] = -np.inf
    x[(u >= 0.3) & (u < 0.35)] = np.inf
    return x


def pool_cases(count, seed):
    rng = np.random.default_rng(seed)
    while count:
        N, C, H, W = (int(v) for v in rng.integers(1, [3, 3, 9, 9]))
        k = (int(rng.integers(1, H + 3)), int(rng.integers(1, W + 3)))
        p = (int(rng.integers(0, k[0] // 2 + 1)), int(rng.integers(0, k[1] // 2 + 1)))
        s = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        if H + 2 * p[0] < k[0] or W + 2 * p[1] < k[1]:
            continue
        dtype = DTYPES[count % 2]
        yield nan_laden(rng, (N, C, H, W), dtype), k, s, p, rng
        count -= 1


def test_max_pool2d_propagates_nan_like_the_oracle():
    for x, k, s, p, rng in pool_cases(60, 1):
        y, idx = F.max_pool2d(x, k, s, p)
        want_y, want_idx = ref.max_pool2d(x, k, s, p)
        assert_same_bits(y, want_y.astype(x.dtype), f"{x.shape} {k} {s} {p}")
        assert_same_bits(idx, want_idx)
        dy = rng.standard_normal(y.shape).astype(x.dtype)
        dy.reshape(-1)[::7] = np.nan  # a NaN gradient goes where its window's max went
        # overlapping windows add up: the tolerance of the kernel tests
        assert_close(
            F.max_pool2d_backward(dy, idx, x.shape),
            ref.max_pool2d_backward(dy, idx, x.shape),
            1e-6 if x.dtype == F32 else 1e-14,
        )


def test_max_pool2d_propagates_nan_like_torch():
    torch = torch_or_skip()
    tf = torch.nn.functional
    for x, k, s, p, rng in pool_cases(60, 2):
        y, idx = F.max_pool2d(x, k, s, p)
        ty, tidx = tf.max_pool2d(torch.tensor(x), k, s, p, return_indices=True)
        assert_same_bits(y, ty.numpy(), f"{x.shape} {k} {s} {p}")
        assert_same_bits(idx, tidx.numpy())
        dy = rng.standard_normal(y.shape).astype(x.dtype)
        tx = torch.tensor(x, requires_grad=True)
        tf.max_pool2d(tx, k, s, p).backward(torch.tensor(dy))
        assert_same_bits(F.max_pool2d_backward(dy, idx, x.shape), tx.grad.numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_propagates_nan_like_torch(dtype):
    z = np.array([np.nan, -np.nan, -1.0, 0.0, 2.0, np.inf, -np.inf, np.nan], dtype)
    da = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 6.0, 7.0, np.nan], dtype)
    a = F.relu(z)
    dz = F.relu_backward(da, z)
    assert_same_bits(a, ref.relu(z).astype(dtype))
    # NaN z passes da through (torch's threshold_backward: z <= 0 ? 0 : da)
    assert_same_bits(dz, np.array([1, 2, 0, 0, np.nan, 6, 0, np.nan], dtype))
    assert_same_bits(dz, ref.relu_backward(da, z).astype(dtype))
    torch = pytest.importorskip("torch")
    tz = torch.tensor(z, requires_grad=True)
    out = torch.relu(tz)
    out.backward(torch.tensor(da))
    assert_same_bits(a, out.detach().numpy())
    assert_same_bits(dz, tz.grad.numpy())


# ---------------------------------------------------------------------------------------
# no overflow, no warning: sigmoid, BCE-with-logits and cross-entropy at large inputs, and
# cross-entropy's labels of any integer type
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sigmoid_extremes_are_finite(dtype):
    z = np.array([-1e4, -1000, -100, -30, 0, 30, 100, 1000, 1e4], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = F.sigmoid(z)
    assert np.isfinite(a).all()
    assert a[0] == 0 and a[-1] == 1 and a[4] == 0.5
    assert (np.diff(a) >= 0).all()
    assert_close(a, ref.sigmoid(wide(z)), KERNEL_TOL["sigmoid"][dtype])


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
        KERNEL_TOL["binary_cross_entropy_with_logits"][dtype],
    )
    assert_close(
        dz,
        ref.binary_cross_entropy_with_logits_backward(wide(z), wide(y)),
        KERNEL_TOL["binary_cross_entropy_with_logits_backward"][dtype],
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
            assert_close(
                loss, ref.cross_entropy(wide(z), [2, 0, 1]), KERNEL_TOL["cross_entropy"][dtype]
            )
            assert_close(
                dz,
                ref.cross_entropy_backward(wide(z), [2, 0, 1]),
                KERNEL_TOL["cross_entropy_backward"][dtype],
            )
    assert_close(F.cross_entropy(z[2:], [1]), np.log(3.0), KERNEL_TOL["cross_entropy"][dtype])


# ---------------------------------------------------------------------------------------
# tanh: correctly rounded in float32, saturated without overflow, its gradient keeping its
# digits near +-1
# ---------------------------------------------------------------------------------------


def test_float_tanh_is_the_double_tanh_rounded_once():
    # within half a float ulp of the float64 tanh (plus the float64 tanh's own error)
    rng = rng_for("new_ops", "tanh-ulp")
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
