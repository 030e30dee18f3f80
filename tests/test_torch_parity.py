"""Kernels against PyTorch itself (the oracle's own torch checks are in test_reference.py):
avg-pool and adaptive avg-pool bit for bit, tanh within its tolerance, dropout's function of its mask through
torch's autograd and its keep rate against torch's."""

import itertools
import re

import numpy as np
import pytest
from cnnbp import functional as F
from conftest import DTYPES, KERNEL_TOL, assert_close, assert_same_bits, randn, rng_for
from ops import ADAPTIVE_AVG_POOL2D, AVG_POOL2D, AVG_POOL_CASES, DROPOUT_PS, POOL_BIG

F32, F64 = np.float32, np.float64
DTYPE_IDS = ["float32", "float64"]
TOL = KERNEL_TOL
PS = DROPOUT_PS


def avg_pool_data(case, dtype):
    s = AVG_POOL2D.sample(case, dtype)
    return s.x, s.dy, s.kernel, s.stride, s.padding


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", AVG_POOL_CASES + POOL_BIG, ids=str)
def test_avg_pool2d_matches_torch(case, dtype):
    # Each window is summed in torch's order (row-major) and divided by kh*kw as torch does,
    # and the backward adds the same shares in the same order: the same bits in both dtypes.
    torch = pytest.importorskip("torch")
    x, dy, kernel, stride, padding = avg_pool_data(case, dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.avg_pool2d(xt, kernel, stride, padding)
    yt.backward(torch.tensor(dy))
    assert_same_bits(F.avg_pool2d(x, kernel, stride, padding), yt.detach().numpy(), "y")
    assert_same_bits(
        F.avg_pool2d_backward(dy, x.shape, kernel, stride, padding), xt.grad.numpy(), "dx"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_avg_pool2d_matches_torch_on_non_finite_values(dtype):
    torch = pytest.importorskip("torch")
    x = np.ones((1, 2, 5, 5), dtype)
    x[0, 0, 1, 1] = np.nan
    x[0, 1, 2, 2] = np.inf
    x[0, 1, 3, 3] = -np.inf
    for kernel, stride, padding in [(2, None, 0), (3, 2, 1), (3, 1, 1)]:
        yt = torch.nn.functional.avg_pool2d(torch.tensor(x), kernel, stride, padding)
        assert_same_bits(F.avg_pool2d(x, kernel, stride, padding), yt.numpy(), f"{kernel}")


# (x shape, output_size): the global pool, unequal windows, None, output larger than the
# input, unbatched inputs, an empty batch, and the threaded paths
ADAPTIVE_TORCH_CASES = [
    ((2, 3, 7, 9), 1),
    ((2, 3, 7, 9), (1, 1)),
    ((3, 7, 9), 1),
    ((2, 3, 7, 9), (3, 5)),
    ((2, 3, 7, 9), (None, 2)),
    ((2, 3, 7, 9), (4, None)),
    ((2, 3, 7, 9), (None, None)),
    ((1, 2, 4, 3), (7, 5)),
    ((1, 2, 3, 2), (10, 9)),
    ((2, 2, 5, 11), (5, 3)),
    ((2, 2, 8, 8), 4),
    ((3, 7, 9), (3, 5)),
    ((2, 5, 6), (None, 8)),
    ((0, 3, 5, 5), 2),
    ((2, 16, 24, 24), (5, 7)),
    ((4, 64, 24, 24), 1),
]


def is_global(x_shape, output_size):
    """Whether the output is 1 x 1, where torch computes a mean."""
    P, Q = (output_size, output_size) if isinstance(output_size, int) else output_size
    return (x_shape[-2] if P is None else P, x_shape[-1] if Q is None else Q) == (1, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ADAPTIVE_TORCH_CASES, ids=str)
def test_adaptive_avg_pool2d_matches_torch(case, dtype):
    # torch's CPU kernel sums each window in row-major order in the input's dtype and divides
    # by kh, then kw; the backward adds dy / kh / kw window by window in row-major order: the
    # same arithmetic here, so the same bits. The global pool is torch's mean, whose sum is
    # blocked differently (ours runs in double): within the tolerance forward, and the
    # backward's dy / (H * W) is the same bits.
    torch = pytest.importorskip("torch")
    x_shape, output_size = case
    s = ADAPTIVE_AVG_POOL2D.sample(case, dtype)
    xt = torch.tensor(s.x, requires_grad=True)
    yt = torch.nn.functional.adaptive_avg_pool2d(xt, output_size)
    yt.backward(torch.tensor(s.dy))
    y = F.adaptive_avg_pool2d(s.x, output_size)
    dx = F.adaptive_avg_pool2d_backward(s.dy, s.x.shape, output_size)
    assert y.shape == tuple(yt.shape) and y.dtype == dtype and dx.shape == s.x.shape
    if is_global(x_shape, output_size):
        assert_close(y, yt.detach().numpy(), TOL["adaptive_avg_pool2d"][dtype], "y")
    else:
        assert_same_bits(y, yt.detach().numpy(), "y")
    assert_same_bits(dx, xt.grad.numpy(), "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_adaptive_avg_pool2d_matches_torch_on_non_finite_values(dtype):
    torch = pytest.importorskip("torch")
    x = np.ones((1, 2, 5, 6), dtype)
    x[0, 0, 1, 1] = np.nan
    x[0, 1, 2, 2] = np.inf
    x[0, 1, 3, 4] = -np.inf
    for output_size in (1, (2, 3), (None, 4), (7, 8)):
        yt = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(x), output_size)
        assert_same_bits(F.adaptive_avg_pool2d(x, output_size), yt.numpy(), f"{output_size}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("output_size", [1, (3, 5), (None, 2), (9, 4)], ids=str)
def test_adaptive_avg_pool2d_layer_matches_torchs_layer(output_size, dtype):
    torch = pytest.importorskip("torch")
    from cnnbp import nn

    x = randn(rng_for("adaptive-layer", str(output_size)), (2, 3, 7, 6), dtype)
    ours, theirs = nn.AdaptiveAvgPool2d(output_size), torch.nn.AdaptiveAvgPool2d(output_size)
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    dy = randn(rng_for("adaptive-layer-dy", str(output_size)), tuple(yt.shape), dtype)
    yt.backward(torch.tensor(dy))
    assert_close(ours(x), yt.detach().numpy(), TOL["adaptive_avg_pool2d"][dtype], "y")
    assert_same_bits(ours.backward(dy), xt.grad.numpy(), "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tanh_matches_torch(dtype):
    torch = pytest.importorskip("torch")
    rng = rng_for("new_ops", "tanh-torch")
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
    rng = rng_for("new_ops", "dropout-torch", p)
    x = randn(rng, (4, 3, 10, 10), dtype)
    g = randn(rng, x.shape, dtype)
    y, mask = F.dropout(x, p, 21)
    xt = torch.tensor(x, requires_grad=True)
    yt = xt * torch.tensor(mask) / (1 - p)
    yt.backward(torch.tensor(g))
    assert_same_bits(y, yt.detach().numpy(), "y")
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
# every option of the pools, against torch: the same sizes, the same refusals, the same bits
# ---------------------------------------------------------------------------------------

POOL_SHAPES = [(2, 2, 7, 6), (1, 2, 5, 9), (1, 1, 4, 4)]
POOL_WINDOWS = [
    (kernel, stride, padding)
    for kernel in (1, 2, 3, (2, 3))
    for stride in (None, 1, 2, 3)
    for padding in (0, 1, (1, 0))
]


def torch_or_none(call):
    """torch's result, or None where torch refuses the arguments."""
    try:
        return call()
    except RuntimeError:
        return None


def pool_values(shape, dtype, key):
    """Ties (multiples of 0.5), NaN, -inf and -0 in a small plane: tied maxima, NaN windows."""
    rng = rng_for("pool-options", shape, np.dtype(dtype).name, key)
    x = (rng.integers(-2, 3, shape) * 0.5).astype(dtype)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, 2)] = np.nan
    flat[rng.integers(0, flat.size, 2)] = -np.inf
    flat[rng.integers(0, flat.size, 2)] = -0.0
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_max_pool2d_options_match_torch(shape, dtype):
    # every window, dilation and rounding: torch's output size, values, indices (ties and
    # NaN with dilation included) and gradient, bit for bit; torch's refusals are ours
    torch = pytest.importorskip("torch")
    x = pool_values(shape, dtype, "max")
    compared = 0
    for (kernel, stride, padding), dilation, ceil_mode in itertools.product(
        POOL_WINDOWS, (1, 2, 3, (1, 2)), (False, True)
    ):
        options = dict(dilation=dilation, ceil_mode=ceil_mode)
        what = f"kernel {kernel} stride {stride} padding {padding} {options}"
        xt = torch.tensor(x, requires_grad=True)
        want = torch_or_none(
            lambda: torch.nn.functional.max_pool2d(
                xt, kernel, stride, padding, return_indices=True, **options
            )
        )
        plane = shape[2] * shape[3]
        if want is None or int(want[1].max()) >= plane:
            # torch refuses, or reports an index outside the plane (a window of dilated taps
            # that all miss the input): both are errors here
            with pytest.raises(ValueError, match=r"^\[max_pool2d\] (input|padding): expected"):
                F.max_pool2d(x, kernel, stride, padding, **options)
            continue
        y, idx = F.max_pool2d(x, kernel, stride, padding, **options)
        assert_same_bits(y, want[0].detach().numpy(), what)
        np.testing.assert_array_equal(idx, want[1].numpy(), what)
        dy = pool_values(y.shape, dtype, "dy")
        dy[np.isnan(dy) | np.isinf(dy)] = 1.0
        want[0].backward(torch.tensor(dy))
        assert_same_bits(F.max_pool2d_backward(dy, idx, x.shape), xt.grad.numpy(), what)
        compared += 1
    assert compared > 100


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_avg_pool2d_options_match_torch(shape, dtype):
    # every window, rounding, count_include_pad and divisor_override: torch's sizes, values
    # and gradients bit for bit (ceil_mode windows hanging past the padding included)
    torch = pytest.importorskip("torch")
    rng = rng_for("avg-pool-options", shape, np.dtype(dtype).name)
    x = randn(rng, shape, dtype)
    compared = 0
    for (kernel, stride, padding), ceil_mode, count_include_pad, divisor in itertools.product(
        POOL_WINDOWS, (False, True), (True, False), (None, 1, 3, -2)
    ):
        options = dict(
            ceil_mode=ceil_mode, count_include_pad=count_include_pad, divisor_override=divisor
        )
        what = f"kernel {kernel} stride {stride} padding {padding} {options}"
        xt = torch.tensor(x, requires_grad=True)
        want = torch_or_none(
            lambda: torch.nn.functional.avg_pool2d(xt, kernel, stride, padding, **options)
        )
        if want is None:
            with pytest.raises(ValueError, match=r"^\[avg_pool2d\] (input|padding): expected"):
                F.avg_pool2d(x, kernel, stride, padding, **options)
            continue
        y = F.avg_pool2d(x, kernel, stride, padding, **options)
        assert_same_bits(y, want.detach().numpy(), what)
        dy = randn(rng, y.shape, dtype)
        want.backward(torch.tensor(dy))
        dx = F.avg_pool2d_backward(dy, x.shape, kernel, stride, padding, **options)
        assert_same_bits(dx, xt.grad.numpy(), what)
        compared += 1
    assert compared > 100


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_option_refusals_match_torch(dtype):
    # the options torch refuses outright: dilation 0, divisor_override 0
    torch = pytest.importorskip("torch")
    x = np.ones((1, 1, 4, 4), dtype)
    with pytest.raises(RuntimeError):
        torch.nn.functional.max_pool2d(torch.tensor(x), 2, dilation=0)
    with pytest.raises(ValueError, match=r"^\[max_pool2d\] dilation: expected >= 1, got 0"):
        F.max_pool2d(x, 2, dilation=0)
    with pytest.raises(RuntimeError):
        torch.nn.functional.avg_pool2d(torch.tensor(x), 2, divisor_override=0)
    with pytest.raises(ValueError, match=r"^\[avg_pool2d\] divisor_override: expected a nonzero"):
        F.avg_pool2d(x, 2, divisor_override=0)


# ---------------------------------------------------------------------------------------
# losses: every option of torch's, every combination, forward and backward
# ---------------------------------------------------------------------------------------

# Against torch computing in the same dtype: float32 sums differ in their rounding (ours
# are accumulated in double), so float32 is held to a few float32 ulps of the loss.
LOSS_PARITY_TOL = {F64: 1e-12, F32: 1e-5}
REDUCTIONS = ["mean", "sum", "none"]


def loss_parity(torch, ours, ours_backward, theirs, input, args, kwargs, reduction, dtype):
    """Our forward and backward against torch's forward and autograd, with a random
    grad_output for reduction='none' and 0.5 for the reduced losses."""
    it = torch.tensor(input, requires_grad=True)
    targs = [None if a is None else torch.tensor(a) for a in args]
    tkw = {k: (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    out = theirs(it, *targs, reduction=reduction, **tkw)
    if reduction == "none":
        grad_output = rng_for("loss parity", str(out.shape)).standard_normal(out.shape)
        grad_output = grad_output.astype(dtype)
    else:
        grad_output = 0.5
    out.backward(torch.tensor(grad_output, dtype=out.dtype))
    got = ours(input, *args, reduction=reduction, **kwargs)
    if reduction == "none":
        assert isinstance(got, np.ndarray) and got.dtype == dtype
    else:
        assert isinstance(got, float)
    tol = LOSS_PARITY_TOL[dtype]
    assert_close(got, out.detach().numpy(), tol, "loss")
    grad = ours_backward(input, *args, reduction=reduction, grad_output=grad_output, **kwargs)
    assert grad.dtype == dtype
    assert_close(grad, it.grad.numpy(), tol, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight_shape", [None, (5,), (4, 1), (4, 5), (1, 1)], ids=str)
def test_binary_cross_entropy_options_match_torch(weight_shape, reduction, dtype):
    torch = pytest.importorskip("torch")
    rng = rng_for("bce parity", str(weight_shape), reduction)
    a = rng.uniform(0.02, 0.98, (4, 5)).astype(dtype)
    y = rng.uniform(0, 1, (4, 5)).astype(dtype)
    w = None if weight_shape is None else rng.uniform(0.1, 2, weight_shape).astype(dtype)
    loss_parity(
        torch,
        F.binary_cross_entropy,
        F.binary_cross_entropy_backward,
        torch.nn.functional.binary_cross_entropy,
        a,
        (y, w),
        {},
        reduction,
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pos_weight_shape", [None, (5,), (1, 5), (3, 1, 5), (1,)], ids=str)
@pytest.mark.parametrize("weight_shape", [None, (5,), (3, 4, 1)], ids=str)
def test_binary_cross_entropy_with_logits_options_match_torch(
    weight_shape, pos_weight_shape, reduction, dtype
):
    # pos_weight broadcasts along the last dim (the classes), as torch's
    torch = pytest.importorskip("torch")
    rng = rng_for("bce logits parity", str(weight_shape), str(pos_weight_shape), reduction)
    z = (rng.standard_normal((3, 4, 5)) * 4).astype(dtype)
    y = rng.choice([0.0, 1.0, 0.3], (3, 4, 5)).astype(dtype)
    w = None if weight_shape is None else rng.uniform(0.1, 2, weight_shape).astype(dtype)
    kwargs = {}
    if pos_weight_shape is not None:
        kwargs["pos_weight"] = rng.uniform(0.1, 4, pos_weight_shape).astype(dtype)
    loss_parity(
        torch,
        F.binary_cross_entropy_with_logits,
        F.binary_cross_entropy_with_logits_backward,
        torch.nn.functional.binary_cross_entropy_with_logits,
        z,
        (y, w),
        kwargs,
        reduction,
        dtype,
    )


def cross_entropy_target(rng, shape, kind, ignore_index, dtype):
    """Class indices ("index"; "some" with every third one ignore_index; "all" with every
    one) or class probabilities ("probs") for logits of `shape`."""
    if kind == "probs":
        p = rng.uniform(0, 1, shape)
        return (p / p.sum(axis=1, keepdims=True)).astype(dtype)
    labels = rng.integers(0, shape[1], shape[:1] + shape[2:])
    if kind == "some":
        labels.reshape(-1)[::3] = ignore_index
    elif kind == "all":
        labels[...] = ignore_index
    return labels


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["index", "some", "all", "probs"])
@pytest.mark.parametrize("shape", [(6, 4), (1, 1), (2, 3, 5), (2, 4, 3, 2)], ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_cross_entropy_options_match_torch(
    ignore_index, shape, kind, weighted, label_smoothing, reduction, dtype
):
    # spatial targets, probabilities, ignore_index on some and on every label (nan for the
    # mean, 0 for the sum, as torch), label smoothing with weights
    torch = pytest.importorskip("torch")
    key = (str(shape), kind, str(weighted), str(label_smoothing), reduction, str(ignore_index))
    rng = rng_for("cross entropy parity", *key)
    z = (rng.standard_normal(shape) * 3).astype(dtype)
    target = cross_entropy_target(rng, shape, kind, ignore_index, dtype)
    w = rng.uniform(0.1, 2, shape[1]).astype(dtype) if weighted else None
    kwargs = dict(ignore_index=ignore_index, label_smoothing=label_smoothing)
    if kind == "probs" and ignore_index != -100:  # refused by both
        with pytest.raises(RuntimeError, match="ignore_index is not supported"):
            torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(target), **kwargs)
        for fn in ("cross_entropy", "cross_entropy_backward"):
            with pytest.raises(
                ValueError,
                match=re.escape(
                    f"[{fn}] ignore_index: expected -100 (none) with class probabilities as "
                    "the target, got 1"
                ),
            ):
                getattr(F, fn)(z, target, w, **kwargs)
        return
    loss_parity(
        torch,
        F.cross_entropy,
        F.cross_entropy_backward,
        torch.nn.functional.cross_entropy,
        z,
        (target, w),
        kwargs,
        reduction,
        dtype,
    )


def test_cross_entropy_on_every_label_ignored_is_torchs():
    torch = pytest.importorskip("torch")
    z, labels = np.zeros((3, 4)), np.full(3, -100)
    assert np.isnan(F.cross_entropy(z, labels))
    assert np.isnan(torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(labels)).item())
    assert F.cross_entropy(z, labels, reduction="sum") == 0.0
    np.testing.assert_array_equal(F.cross_entropy_backward(z, labels), np.zeros((3, 4)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pos_weight", [None, 2.0], ids=["plain", "pos_weight"])
def test_binary_cross_entropy_with_logits_at_infinite_logits_is_torchs(pos_weight, dtype):
    # torch computes (1 - y) z - log sigmoid(z): inf for z = +inf and y < 1, nan for y = 1
    torch = pytest.importorskip("torch")
    z = np.array([np.inf, np.inf, np.inf, -np.inf, -np.inf, -np.inf, 0.0], dtype)
    y = np.array([0.0, 0.3, 1.0, 0.0, 0.3, 1.0, 0.5], dtype)
    pw = None if pos_weight is None else np.full(7, pos_weight, dtype)
    tpw = None if pw is None else torch.tensor(pw)
    for reduction in REDUCTIONS:
        want = torch.nn.functional.binary_cross_entropy_with_logits(
            torch.tensor(z), torch.tensor(y), pos_weight=tpw, reduction=reduction
        )
        got = F.binary_cross_entropy_with_logits(z, y, pos_weight=pw, reduction=reduction)
        np.testing.assert_array_equal(got, want.numpy(), err_msg=reduction)


# conv2d's options: (N, C, H, W, K, R, S, stride, padding, dilation, groups)
CONV_OPTION_CASES = [
    (2, 3, 9, 8, 4, 3, 3, 1, 1, 2, 1),
    (2, 4, 10, 9, 6, 3, 2, 1, 1, (2, 3), 2),
    (3, 6, 12, 12, 6, 3, 3, 1, 1, 1, 6),  # depthwise
    (3, 6, 12, 12, 12, 3, 3, 2, 1, 1, 6),  # depthwise, two filters per channel, strided
    (2, 6, 11, 13, 9, 3, 3, 2, 2, 2, 3),
    (2, 4, 10, 10, 8, 2, 2, 1, "same", 1, 2),  # an even kernel: one more zero after
    (2, 4, 10, 10, 8, 4, 3, 1, "same", (1, 3), 4),
    (2, 4, 10, 10, 8, 3, 3, (2, 1), "valid", 1, 1),
    (4, 16, 20, 20, 32, 3, 3, 1, 2, 2, 1),  # the in-place paths
    (4, 16, 20, 20, 32, 3, 3, 2, 2, 2, 4),  # the strided ones
    (4, 16, 20, 20, 16, 3, 3, 1, 1, 1, 16),
    (2, 12, 16, 16, 24, 3, 3, 1, "same", 2, 3),
    (0, 4, 10, 10, 8, 3, 3, 1, 1, 1, 2),  # an empty batch
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CONV_OPTION_CASES, ids=str)
def test_conv2d_options_match_torch(case, dtype):
    torch = pytest.importorskip("torch")
    N, C, H, W, K, R, S, stride, padding, dilation, groups = case
    rng = rng_for(case, dtype)
    x, w = randn(rng, (N, C, H, W), dtype), randn(rng, (K, C // groups, R, S), dtype)
    b = randn(rng, (K,), dtype)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.conv2d(xt, wt, bt, **options)
    dy = randn(rng, tuple(yt.shape), dtype)
    yt.backward(torch.tensor(dy))
    y = F.conv2d(x, w, b, **options)
    grads = F.conv2d_backward(dy, x, w, **options)
    assert_close(y, yt.detach().numpy(), TOL["conv2d"][dtype], "y")
    for got, want, name in zip(grads, (xt.grad, wt.grad, bt.grad), ("dx", "dw", "db")):
        assert_close(got, want.numpy(), TOL["conv2d_backward"][dtype], name)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_conv2d_layer_with_options_matches_torchs_layer():
    torch = pytest.importorskip("torch")
    from cnnbp import nn

    options = dict(stride=1, padding="same", dilation=(2, 1), groups=2, bias=True)
    theirs = torch.nn.Conv2d(4, 6, (3, 2), **options).double()
    ours = nn.Conv2d(4, 6, (3, 2), **options, dtype=np.float64)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x = randn(np.random.default_rng(3), (2, 4, 7, 6), F64)
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    yt.sum().backward()
    y = ours(x)
    dx = ours.backward(np.ones_like(y))
    assert_close(y, yt.detach().numpy(), 1e-12, "y")
    assert_close(dx, xt.grad.numpy(), 1e-12, "dx")
    assert_close(ours.weight.grad, theirs.weight.grad.numpy(), 1e-12, "dweight")


def test_conv2d_option_refusals_match_torch():
    torch = pytest.importorskip("torch")
    x, w = np.ones((1, 4, 6, 6)), np.ones((4, 2, 3, 3))
    for options in [
        dict(groups=3, w=(4, 1, 3, 3)),  # C not a multiple of groups
        dict(groups=2, w=(3, 2, 3, 3)),  # K not a multiple of groups
        dict(padding="same", stride=2),
        dict(padding="full"),
        dict(dilation=3),  # the dilated kernel is larger than the input
        dict(dilation=0),
    ]:
        weight = np.ones(options.pop("w")) if "w" in options else w
        options.setdefault("groups", 2)
        with pytest.raises((RuntimeError, ValueError)):
            torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(weight), **options)
        with pytest.raises(ValueError, match=r"^\[conv2d\] "):
            F.conv2d(x, weight, **options)


# the activations with torch's names: (ours, torch's, options); backward from the input z
ACTIVATIONS = [
    ("leaky_relu", "leaky_relu", {}),
    ("leaky_relu", "leaky_relu", dict(negative_slope=0.2)),
    ("leaky_relu", "leaky_relu", dict(negative_slope=-1.5)),
    ("leaky_relu", "leaky_relu", dict(negative_slope=0.0)),
    ("gelu", "gelu", {}),
    ("gelu", "gelu", dict(approximate="none")),
    ("gelu", "gelu", dict(approximate="tanh")),
    ("silu", "silu", {}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name, theirs, options", ACTIVATIONS, ids=str)
def test_activations_match_torch(name, theirs, options, dtype):
    # leaky_relu is the same operations as torch's: the same bits. gelu and silu run in
    # float64 (float32 rounded once), torch's float32 in float32: within the op's tolerance.
    torch = pytest.importorskip("torch")
    rng = rng_for("activations-torch", name, str(options), np.dtype(dtype).name)
    z = randn(rng, (3, 4, 50), dtype, scale=4.0)
    z.reshape(-1)[:8] = [0.0, -0.0, 30.0, -30.0, 1e-30, -1e-30, 9.0, -9.0]
    g = randn(rng, z.shape, dtype)
    zt = torch.tensor(z, requires_grad=True)
    at = getattr(torch.nn.functional, theirs)(zt, **options)
    at.backward(torch.tensor(g))
    a = getattr(F, name)(z, **options)
    dz = getattr(F, name + "_backward")(g, z, **options)
    assert a.dtype == dz.dtype == dtype
    if name == "leaky_relu":
        assert_same_bits(a, at.detach().numpy(), name)
        assert_same_bits(dz, zt.grad.numpy(), name + "_backward")
        return
    assert_close(a, at.detach().numpy(), TOL[name][dtype], name)
    assert_close(dz, zt.grad.numpy(), TOL[name + "_backward"][dtype], name + "_backward")
    np.testing.assert_array_equal(np.signbit(a), np.signbit(at.detach().numpy()))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name, theirs, options", ACTIVATIONS, ids=str)
def test_activations_on_non_finite_values_are_torchs(name, theirs, options, dtype):
    # NaN stays NaN; the infinities and huge values give what torch's formulas give in
    # float64 (gelu(-inf) and silu(-inf) are NaN: -inf * 0), in both dtypes: our float32 is
    # computed in float64. (torch's float32 kernels differ only there: NaN for gelu(+inf),
    # from its vectorized erf, and for the tanh form's gradient at |z| >~ 1e13, where z^2
    # overflows float32.)
    torch = pytest.importorskip("torch")
    z = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30], dtype)
    g = np.ones_like(z)
    # (leaky_relu: torch's own dtype, whose operations ours are)
    zt = torch.tensor(z if name == "leaky_relu" else z.astype(np.float64), requires_grad=True)
    at = getattr(torch.nn.functional, theirs)(zt, **options)
    at.backward(torch.tensor(g))
    a = getattr(F, name)(z, **options)
    dz = getattr(F, name + "_backward")(g, z, **options)
    assert_same_bits(a, at.detach().numpy().astype(dtype), name)
    assert_same_bits(dz, zt.grad.numpy().astype(dtype), name + "_backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda nn: nn.LeakyReLU(0.3), lambda tnn: tnn.LeakyReLU(0.3)),
        (lambda nn: nn.GELU("tanh"), lambda tnn: tnn.GELU("tanh")),
        (lambda nn: nn.GELU(), lambda tnn: tnn.GELU()),
        (lambda nn: nn.SiLU(), lambda tnn: tnn.SiLU()),
        (lambda nn: nn.Identity(), lambda tnn: tnn.Identity()),
    ],
    ids=["LeakyReLU", "GELU-tanh", "GELU", "SiLU", "Identity"],
)
def test_activation_layers_match_torch(ours, theirs, dtype):
    torch = pytest.importorskip("torch")
    from cnnbp import nn

    rng = rng_for("activation-layers-torch", np.dtype(dtype).name)
    x = randn(rng, (2, 3, 4, 5), dtype, scale=3.0)
    g = randn(rng, x.shape, dtype)
    layer, tlayer = ours(nn), theirs(torch.nn)
    xt = torch.tensor(x, requires_grad=True)
    yt = tlayer(xt)
    yt.backward(torch.tensor(g))
    tol = 1e-6 if dtype == F32 else 1e-14
    assert_close(layer(x), yt.detach().numpy(), tol, "forward")
    assert_close(layer.backward(g), xt.grad.numpy(), tol, "backward")


# softmax and log_softmax along every dim of a few shapes: (shape, dim)
SOFTMAX_TORCH_CASES = [
    ((3, 4, 50), 1),
    ((3, 4, 50), -1),
    ((3, 4, 50), 0),
    ((7,), 0),
    ((2, 3, 4, 5), -3),
    ((0, 3), 1),
    ((), 0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape, dim", SOFTMAX_TORCH_CASES, ids=str)
def test_softmax_and_log_softmax_match_torch(shape, dim, name, dtype):
    # ours in float64 (float32 rounded once), torch's float32 in float32: within the op's
    # tolerance; the backward from torch's output and from ours
    torch = pytest.importorskip("torch")
    rng = rng_for("softmax-torch", name, str(shape), dim, np.dtype(dtype).name)
    z = randn(rng, shape, dtype, scale=4.0)
    if z.size >= 3:
        z.reshape(-1)[:3] = [80.0, 80.0, -80.0]  # exp(80) overflows float32: the max is subtracted
    g = randn(rng, shape, dtype)
    zt = torch.tensor(z, requires_grad=True)
    at = getattr(torch.nn.functional, name)(zt, dim=dim)
    at.backward(torch.tensor(g))
    a = getattr(F, name)(z, dim)
    assert a.dtype == dtype and a.shape == shape
    assert_close(a, at.detach().numpy(), TOL[name][dtype], name)
    backward = getattr(F, name + "_backward")
    tol = TOL[name + "_backward"][dtype]
    assert_close(backward(g, at.detach().numpy(), dim), zt.grad.numpy(), tol, "from torch's a")
    assert_close(backward(g, a, dim), zt.grad.numpy(), 10 * tol, "from our a")


def test_softmax_on_non_finite_values_is_torchs():
    # a NaN or +inf in a slice makes the slice NaN; -inf entries are 0 (log: -inf); a slice of
    # -inf only is NaN
    torch = pytest.importorskip("torch")
    z = np.array(
        [[np.nan, 1.0, 2.0], [np.inf, 1.0, 2.0], [-np.inf, 1.0, 2.0], [-np.inf, -np.inf, -np.inf]]
    )
    for name in ("softmax", "log_softmax"):
        want = getattr(torch.nn.functional, name)(torch.tensor(z), dim=1).numpy()
        got = getattr(F, name)(z, 1)
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_softmax_dim_refusals_match_torch():
    torch = pytest.importorskip("torch")
    z = np.ones((2, 3))
    for dim in (2, -3, 5):
        with pytest.raises(IndexError):
            torch.softmax(torch.tensor(z), dim)
        for name in ("softmax", "log_softmax"):
            with pytest.raises(ValueError, match=re.escape(f"[{name}] dim: expected an int in")):
                getattr(F, name)(z, dim)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dim", [1, -1, 0])
def test_softmax_layers_match_torchs_layers(dim, dtype):
    torch = pytest.importorskip("torch")
    from cnnbp import nn

    rng = rng_for("softmax-layers-torch", dim, np.dtype(dtype).name)
    x = randn(rng, (2, 3, 4, 5), dtype, scale=3.0)
    g = randn(rng, x.shape, dtype)
    for ours, theirs in (
        (nn.Softmax(dim), torch.nn.Softmax(dim)),
        (nn.LogSoftmax(dim=dim), torch.nn.LogSoftmax(dim=dim)),
    ):
        xt = torch.tensor(x, requires_grad=True)
        yt = theirs(xt)
        yt.backward(torch.tensor(g))
        tol = 1e-6 if dtype == F32 else 1e-14
        assert_close(ours(x), yt.detach().numpy(), tol, f"{ours!r} forward")
        assert_close(ours.backward(g), xt.grad.numpy(), 10 * tol, f"{ours!r} backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["index", "some", "all"])
@pytest.mark.parametrize("shape", [(6, 4), (1, 1), (2, 3, 5), (2, 4, 3, 2), (5,)], ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_nll_loss_options_match_torch(ignore_index, shape, kind, weighted, reduction, dtype):
    # spatial targets, an unbatched input, ignore_index on some and on every label (nan for
    # the mean, 0 for the sum, as torch), weights
    torch = pytest.importorskip("torch")
    key = (str(shape), kind, str(weighted), reduction, str(ignore_index))
    rng = rng_for("nll loss parity", *key)
    class_dim = 0 if len(shape) == 1 else 1
    x = F.log_softmax((rng.standard_normal(shape) * 3).astype(dtype), class_dim)
    if len(shape) == 1:
        labels = np.array(ignore_index if kind == "all" else rng.integers(0, shape[0]))
    else:
        labels = cross_entropy_target(rng, shape, kind, ignore_index, dtype)
    w = rng.uniform(0.1, 2, shape[class_dim]).astype(dtype) if weighted else None
    loss_parity(
        torch,
        F.nll_loss,
        F.nll_loss_backward,
        torch.nn.functional.nll_loss,
        x,
        (labels, w),
        dict(ignore_index=ignore_index),
        reduction,
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "options",
    [{}, dict(reduction="sum"), dict(ignore_index=2), dict(weight=[0.5, 2.0, 1.0, 0.25])],
    ids=str,
)
def test_log_softmax_and_nll_loss_train_like_torch(options, dtype):
    # Linear -> LogSoftmax -> NLLLoss trained by train_step: the same losses and parameters
    # as torch's through its autograd and SGD, and NLLLoss(LogSoftmax) equals cross_entropy
    torch = pytest.importorskip("torch")
    from cnnbp import nn, optim

    rng = rng_for("nll-train-torch", str(options), np.dtype(dtype).name)
    x = randn(rng, (8, 5), dtype)
    labels = rng.integers(0, 4, 8)
    labels[3] = 2
    ours = nn.Sequential(nn.Linear(5, 4, dtype=dtype), nn.LogSoftmax(dim=1))
    theirs = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LogSoftmax(dim=1))
    theirs = theirs.double() if dtype == F64 else theirs
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    weight = options.get("weight")
    kwargs = dict(options, weight=None if weight is None else np.array(weight, dtype))
    loss_fn = nn.NLLLoss(**kwargs)
    tkwargs = dict(options, weight=None if weight is None else torch.tensor(kwargs["weight"]))
    tloss_fn = torch.nn.NLLLoss(**tkwargs)
    opt = optim.SGD(ours.parameters(), lr=0.5)
    topt = torch.optim.SGD(theirs.parameters(), lr=0.5)
    tol = 1e-5 if dtype == F32 else 1e-12
    for step in range(5):
        # the loss and the gradient of one pass, then the step, against torch's
        out = ours(x)
        value = loss_fn(out, labels)
        grad = loss_fn.backward()
        ce = F.cross_entropy(ours[0].trace()["output"], labels, **kwargs)
        assert_close(value, ce, tol, f"step {step}: NLLLoss(LogSoftmax) vs cross_entropy")
        topt.zero_grad()
        tout = theirs(torch.tensor(x))
        tout.retain_grad()
        tloss = tloss_fn(tout, torch.tensor(labels))
        tloss.backward()
        assert_close(value, tloss.item(), tol, f"step {step}: loss")
        assert_close(grad, tout.grad.numpy(), tol, f"step {step}: dL/d log-probabilities")
        got = ours.train_step(x, labels, loss_fn, opt)
        assert_close(got, tloss.item(), tol, f"step {step}: train_step's loss")
        topt.step()
        for (name, p), tp in zip(ours.named_parameters(), theirs.parameters()):
            assert_close(p.data, tp.detach().numpy(), tol, f"step {step}: {name}")


# ---------------------------------------------------------------------------------------
# BatchNorm2d: the layer in training and evaluation mode over several steps, with its
# running statistics and num_batches_tracked; torch's state_dict loaded; a small network
# trained with train_step
# ---------------------------------------------------------------------------------------

BATCH_NORM_OPTIONS = [
    {},
    dict(momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(eps=1e-3, momentum=0.5, affine=False, track_running_stats=False),
]


def torch_state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def assert_same_state(ours, theirs, dtype):
    want = torch_state(theirs)
    got = ours.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert_close(got[key], want[key], TOL["batch_norm2d"][dtype], key)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", BATCH_NORM_OPTIONS, ids=str)
def test_batch_norm_layer_matches_torch_over_steps(options, dtype):
    torch = pytest.importorskip("torch")
    from cnnbp import nn

    ours = nn.BatchNorm2d(4, dtype=dtype, **options)
    theirs = torch.nn.BatchNorm2d(4, **options).to(
        torch.float64 if dtype == np.float64 else torch.float32
    )
    rng = rng_for("batch-norm-layer", str(options), np.dtype(dtype).name)
    if ours.weight is not None:  # the same affine parameters away from the init
        state = {"weight": randn(rng, (4,), dtype), "bias": randn(rng, (4,), dtype)}
        theirs.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
        ours.weight.data, ours.bias.data = state["weight"], state["bias"]
    tol = TOL["batch_norm2d"][dtype]
    for step, mode in enumerate(["train", "train", "eval", "train", "eval"]):
        ours.train(mode == "train"), theirs.train(mode == "train")
        x = randn(rng, (3, 4, 5, 6), dtype) * (step + 1) + step
        dy = randn(rng, x.shape, dtype)
        xt = torch.tensor(x, requires_grad=True)
        theirs.zero_grad()
        yt = theirs(xt)
        yt.backward(torch.tensor(dy))
        ours.zero_grad()
        assert_close(ours(x), yt.detach().numpy(), tol, f"y {step}")
        assert_close(ours.backward(dy), xt.grad.numpy(), tol, f"dx {step}")
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert_close(p.grad, q.grad.numpy(), tol, f"grad {step}")
        assert_same_state(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batch_norm_loads_torchs_state_dict(dtype):
    torch = pytest.importorskip("torch")
    from cnnbp import nn

    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3, affine=False)
    ).to(torch_dtype)
    rng = rng_for("batch-norm-state", np.dtype(dtype).name)
    for _ in range(3):
        theirs(torch.tensor(randn(rng, (4, 2, 6, 6), dtype)))
    ours = nn.Sequential(
        nn.Conv2d(2, 3, 3, dtype=dtype),
        nn.BatchNorm2d(3, dtype=dtype),
        nn.BatchNorm2d(3, affine=False, dtype=dtype),
    )
    ours.load_state_dict(torch_state(theirs))
    assert ours[1].num_batches_tracked == 3
    assert_same_state(ours, theirs, dtype)
    ours.eval(), theirs.eval()
    x = randn(rng, (2, 2, 6, 6), dtype)
    assert_close(ours(x), theirs(torch.tensor(x)).detach().numpy(), TOL["batch_norm2d"][dtype], "y")
    bad = torch_state(theirs)
    bad["1.num_batches_tracked"] = bad["1.num_batches_tracked"].astype(np.float64)
    with pytest.raises(
        TypeError, match=r"^\[load_state_dict\] 1.num_batches_tracked: expected int64"
    ):
        ours.load_state_dict(bad)
    bad = torch_state(theirs)
    bad["2.running_var"] = bad["2.running_var"][:2]
    with pytest.raises(
        ValueError, match=r"^\[load_state_dict\] 2.running_var: expected shape \(3,\)"
    ):
        ours.load_state_dict(bad)
    del bad["2.running_var"]
    with pytest.raises(KeyError, match="2.running_var"):
        ours.load_state_dict(bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv_batch_norm_relu_trains_as_torch(dtype):
    torch = pytest.importorskip("torch")
    from cnnbp import nn, optim

    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 3, 3),
        torch.nn.BatchNorm2d(3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, 5),
    ).to(torch_dtype)
    ours = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, dtype=dtype),
        nn.BatchNorm2d(4, momentum=None, dtype=dtype),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, dtype=dtype),
        nn.BatchNorm2d(3, dtype=dtype),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5, dtype=dtype),
    )
    ours.load_state_dict(torch_state(theirs))
    loss_fn, opt = nn.CrossEntropyLoss(), optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    torch_loss, torch_opt = (
        torch.nn.CrossEntropyLoss(),
        torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9),
    )
    rng = rng_for("batch-norm-train", np.dtype(dtype).name)
    tol = 1e-9 if dtype == np.float64 else 1e-4  # conftest.NETWORK_TOL: through a few layers
    for step in range(4):
        x = randn(rng, (8, 2, 6, 6), dtype)
        y = rng.integers(0, 5, 8)
        loss = ours.train_step(x, y, loss_fn, opt)
        torch_opt.zero_grad()
        torch_value = torch_loss(theirs(torch.tensor(x)), torch.tensor(y))
        torch_value.backward()
        torch_opt.step()
        assert abs(loss - torch_value.item()) <= tol * max(1.0, abs(loss)), step
    want = torch_state(theirs)
    for key, value in ours.state_dict().items():
        assert value.dtype == want[key].dtype
        assert_close(value, want[key], tol, key)
    ours.eval(), theirs.eval()
    x = randn(rng, (3, 2, 6, 6), dtype)
    assert_close(ours(x), theirs(torch.tensor(x)).detach().numpy(), tol, "eval")
