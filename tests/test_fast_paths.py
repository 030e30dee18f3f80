"""The kernels' fast paths hold the exact semantics of the general code.

max_pool2d with 2x2 windows at stride 2 and no padding has a kernel of its own (vector code
where the CPU has it, also for ceil_mode's partial windows), and with AVX-512 its backward
writes each plane in one pass when the indices fit the 2x2 tiling (elsewhere it zero-fills
and scatters). Both are checked bit for bit against the rule written in NumPy, on ties,
NaN, infinities, -0 and sizes that leave a remainder row, column or partial vector step,
from a single window to a large batch; the backward also against indices that do not fit
the tiling. ReLU and sigmoid are checked on sizes above the threading threshold.

conv2d lays batches of small planes side by side on one padded stack: each image must get
the bits it gets alone, for any filter, padding and dilation the path takes.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cnnbp import functional as F
from cnnbp import reference as ref
from conftest import DTYPES, KERNEL_TOL, assert_close, check_array
from hypothesis import given, settings
from hypothesis import strategies as st

DTYPE_IDS = ["float32", "float64"]
UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}

# (N, C, H, W): one window; odd heights and widths (a row or column no window sees);
# widths around the 16-wide vector step; the benchmark's shapes.
POOL_SHAPES = [
    (1, 1, 2, 2),
    (1, 1, 3, 3),
    (2, 3, 5, 7),
    (1, 2, 4, 34),
    (2, 1, 7, 33),
    (1, 1, 2, 97),
    (3, 2, 33, 35),
    (1, 1, 64, 2),
    (64, 8, 26, 26),
    (4, 64, 32, 32),
    # many small even planes: 16 windows across planes a step (AVX-512), a remainder of
    # planes after the last whole step; rows of 3 and 6 windows stay on the plane kernels
    (64, 32, 8, 8),
    (64, 64, 4, 4),
    (5, 7, 2, 2),
    (3, 11, 4, 8),
    (2, 5, 32, 6),
    (3, 13, 16, 12),
]


def bits(a):
    """The array's bytes as unsigned integers: tells -0 from +0 and compares NaNs."""
    return np.ascontiguousarray(a).view(UINT[a.dtype])


def tricky(rng, shape, dtype):
    """Few distinct values, so windows tie, with NaN, -inf, +inf and -0 mixed in."""
    x = (rng.integers(0, 4, shape) - 1.5).astype(dtype)
    special = rng.integers(0, 20, shape)
    x[special == 0] = np.nan
    x[special == 1] = -np.inf
    x[special == 2] = np.inf
    x[special == 3] = -0.0
    return x


def pool2x2_rule(x):
    """The rule for 2x2 / stride 2 windows, vectorized: start from the first cell, then take
    a later cell (row-major) when it is greater or NaN."""
    N, C, H, W = x.shape
    P, Q = H // 2, W // 2
    rows = np.arange(P)[:, None] * 2 * W
    cols = np.arange(Q)[None, :] * 2
    best = x[:, :, 0 : 2 * P : 2, 0 : 2 * Q : 2].copy()
    offset = np.zeros(best.shape, np.int64)
    for dh, dw in [(0, 1), (1, 0), (1, 1)]:
        cell = x[:, :, dh : 2 * P : 2, dw : 2 * Q : 2]
        take = (cell > best) | np.isnan(cell)
        best = np.where(take, cell, best)
        offset = np.where(take, dh * W + dw, offset)
    return best, rows + cols + offset


def scatter(dy, idx, x_shape):
    """dx = zeros, then dy added at idx in order: the general backward, in dy's dtype."""
    N, C, H, W = x_shape
    dx = np.zeros((N * C, H * W), dy.dtype)
    planes = np.repeat(np.arange(N * C), idx[0, 0].size)
    with np.errstate(invalid="ignore"):  # inf + -inf in one cell is NaN, as in the kernel
        np.add.at(dx, (planes, idx.reshape(-1)), dy.reshape(-1))
    return dx.reshape(x_shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_pool2x2_forward_follows_the_rule_bit_for_bit(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    x = tricky(rng, shape, dtype)
    y, idx = F.max_pool2d(x, 2)
    want_y, want_idx = pool2x2_rule(x)
    check_array(y, want_y.shape, dtype)
    check_array(idx, want_y.shape, np.int64)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(bits(y), bits(want_y))
    # stride given explicitly, as a pair: the same kernel, the same bits
    y2, idx2 = F.max_pool2d(x, (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(bits(y2), bits(y))
    np.testing.assert_array_equal(idx2, idx)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (2, 3, 5, 7), (1, 2, 3, 34)], ids=str)
def test_pool2x2_matches_the_oracle(shape, dtype):
    rng = np.random.default_rng(len(shape) + shape[-1])
    x = tricky(rng, shape, dtype)
    y, idx = F.max_pool2d(x, 2)
    want_y, want_idx = ref.max_pool2d(x.astype(np.float64), 2)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(y, want_y)


def test_pool2x2_float32_and_float64_choose_the_same_cells():
    rng = np.random.default_rng(5)
    x = tricky(rng, (8, 4, 21, 38), np.float32)
    _, idx32 = F.max_pool2d(x, 2)
    _, idx64 = F.max_pool2d(x.astype(np.float64), 2)
    np.testing.assert_array_equal(idx32, idx64)


@pytest.mark.parametrize("shape", [(64, 8, 26, 26), (2, 3, 33, 35)], ids=str)
def test_pool2x2_matches_torch(shape):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    x = rng.integers(-3, 4, shape).astype(np.float32)  # many ties
    x[0, 0, 0, 0] = x[-1, -1, 1, 1] = np.nan
    y, idx = F.max_pool2d(x, 2)
    ty, tidx = torch.nn.functional.max_pool2d(torch.tensor(x), 2, return_indices=True)
    np.testing.assert_array_equal(idx, tidx.numpy())
    np.testing.assert_array_equal(y, ty.numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_pool2x2_backward_equals_the_scatter_bit_for_bit(shape, dtype):
    rng = np.random.default_rng(sum(shape) + 1)
    x = tricky(rng, shape, dtype)
    y, idx = F.max_pool2d(x, 2)
    dy = tricky(rng, y.shape, dtype)  # -0 must come back as +0, as 0 + (-0) does
    dx = F.max_pool2d_backward(dy, idx, x.shape)
    check_array(dx, x.shape, dtype)
    np.testing.assert_array_equal(bits(dx), bits(scatter(dy, idx, x.shape)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_with_indices_outside_the_2x2_tiling_scatters(dtype):
    # The backward sees only shapes and indices. These have the 2x2 pool's shapes but come
    # from overlapping windows, or anywhere in the plane: the result is the scatter's.
    rng = np.random.default_rng(17)
    shape = (4, 16, 26, 26)
    x = rng.standard_normal(shape).astype(dtype)
    _, overlapping = F.max_pool2d(x, 3, 2, 1)
    assert overlapping.shape == (4, 16, 13, 13)
    anywhere = rng.integers(0, 26 * 26, overlapping.shape)
    mixed = F.max_pool2d(x, 2)[1]
    mixed[1:3] = anywhere[1:3]  # some planes fit the tiling, some do not
    for idx in (overlapping, anywhere, mixed):
        dy = tricky(rng, idx.shape, dtype)
        dx = F.max_pool2d_backward(dy, idx, shape)
        np.testing.assert_array_equal(bits(dx), bits(scatter(dy, idx, shape)))


def test_pool2x2_known_answer_with_a_remainder_row_and_column():
    x = np.arange(15, dtype=np.float32).reshape(1, 1, 3, 5)
    y, idx = F.max_pool2d(x, 2)
    np.testing.assert_array_equal(y, [[[[6, 8]]]])
    np.testing.assert_array_equal(idx, [[[[6, 8]]]])
    dx = F.max_pool2d_backward(np.array([[[[1.0, 2.0]]]], np.float32), idx, x.shape)
    want = np.zeros((3, 5), np.float32)
    want[1, 1], want[1, 3] = 1, 2
    np.testing.assert_array_equal(dx[0, 0], want)


def test_backward_still_rejects_bad_indices_on_the_fast_path():
    x = np.zeros((2, 8, 16, 16), np.float32)
    y, idx = F.max_pool2d(x, 2)
    for bad in (-1, 256, 1 << 40):
        wrong = idx.copy()
        wrong[1, 7, 7, 7] = bad
        with pytest.raises(
            ValueError,
            match=r"\[max_pool2d_backward\] indices: expected values "
            rf"in \[0, 256\).*got {bad} at flat position 1023",
        ):
            F.max_pool2d_backward(np.ones_like(y), wrong, x.shape)


_POOL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from cnnbp import functional as F
    rng = np.random.default_rng(23)
    out = {}
    for i, shape in enumerate([(4, 8, 26, 26), (2, 3, 33, 35), (1, 1, 2, 97)]):
        x = rng.integers(-3, 4, shape).astype(np.float32)
        x.reshape(-1)[rng.integers(0, x.size, 9)] = np.nan
        x.reshape(-1)[rng.integers(0, x.size, 9)] = -np.inf
        y, idx = F.max_pool2d(x, 2)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dy.reshape(-1)[:3] = -0.0
        out[f"y{i}"], out[f"idx{i}"] = y, idx
        out[f"dx{i}"] = F.max_pool2d_backward(dy, idx, x.shape)
    z = (rng.standard_normal(300_001) * 30).astype(np.float32)
    z[:8] = [0.0, -0.0, np.nan, np.inf, -np.inf, -88.5, -100.0, 1e-30]
    out["sigmoid"] = F.sigmoid(z)
    np.savez(sys.argv[1], **out)
""")


def test_portable_and_vector_kernels_give_the_same_bits(tmp_path):
    # CNNBP_ISA=generic keeps the AVX-512 kernels out (where the CPU has them), so the
    # float32 portable loops of max-pool and sigmoid run; both processes must produce the
    # same bytes.
    results = {}
    for isa in ("generic", ""):
        env = dict(os.environ, CNNBP_ISA=isa)
        path = tmp_path / f"pool-{isa or 'default'}.npz"
        subprocess.run([sys.executable, "-c", _POOL_SCRIPT, str(path)], env=env, check=True)
        results[isa] = np.load(path)
    for key in results[""].files:
        assert results["generic"][key].tobytes() == results[""][key].tobytes(), key


# ---------------------------------------------------------------------------------------
# relu, sigmoid above the threading threshold
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_on_a_large_array(dtype):
    rng = np.random.default_rng(3)
    z = rng.standard_normal((3, 200_001)).astype(dtype)
    z[0, :4] = [0.0, -0.0, np.nan, -np.inf]
    z[2, -3:] = [np.inf, np.nan, -0.0]
    da = rng.standard_normal(z.shape).astype(dtype)
    a = F.relu(z)
    check_array(a, z.shape, dtype)
    want = np.where((z > 0) | np.isnan(z), z, dtype(0))  # relu(-0) = +0, NaN stays
    np.testing.assert_array_equal(bits(a), bits(want))
    dz = F.relu_backward(da, z)
    np.testing.assert_array_equal(bits(dz), bits(np.where(z <= 0, dtype(0), da)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sigmoid_on_a_large_array(dtype):
    rng = np.random.default_rng(4)
    z = (rng.standard_normal(600_007) * 8).astype(dtype)
    z[:8] = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e4, -1e4, -88.5]
    a = F.sigmoid(z)
    check_array(a, z.shape, dtype)
    assert np.isnan(a[2]) and a[3] == 1 and a[4] == 0 and a[5] == 1 and a[6] == 0
    assert a[0] == 0.5 and a[1] == 0.5
    finite = ~np.isnan(z)
    tol = {np.float32: 1e-6, np.float64: 1e-14}[dtype]
    assert_close(a[finite], ref.sigmoid(z[finite].astype(np.float64)), tol)
    # elementwise too: every value within a few ulps of the float64 answer
    want = ref.sigmoid(z[finite].astype(np.float64))
    ulp = np.spacing(want.astype(dtype)).astype(np.float64)
    assert (np.abs(a[finite] - want) <= 4 * ulp + np.finfo(dtype).tiny).all()
    da = rng.standard_normal(z.shape).astype(dtype)
    dz = F.sigmoid_backward(da, a)
    assert_close(
        dz[finite],
        ref.sigmoid_backward(da[finite].astype(np.float64), a[finite].astype(np.float64)),
        tol,
    )


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    N=st.integers(8, 40),
    C=st.integers(1, 9),
    K=st.integers(1, 40),
    H=st.integers(2, 9),
    W=st.integers(2, 9),
    kernel=st.sampled_from([(1, 1), (2, 2), (3, 3), (2, 3), (3, 1)]),
    padding=st.sampled_from([0, 1, 2, (1, 0), (0, 2), "same"]),
    dilation=st.sampled_from([1, 2, (1, 2)]),
    dtype=st.sampled_from(DTYPES),
)
def test_conv2d_small_planes_side_by_side_give_each_images_bits(
    N, C, K, H, W, kernel, padding, dilation, dtype
):
    R, S = kernel
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    ph, pw = (
        (0, 0) if padding == "same" else (padding, padding) if isinstance(padding, int) else padding
    )
    if H + 2 * ph < dh * (R - 1) + 1 or W + 2 * pw < dw * (S - 1) + 1:
        return  # no output
    rng = np.random.default_rng(N * 1000 + C * 100 + K)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C, R, S)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    y = F.conv2d(x, w, b, 1, padding, dilation)
    alone = np.concatenate([F.conv2d(x[n : n + 1], w, b, 1, padding, dilation) for n in range(N)])
    np.testing.assert_array_equal(bits(y), bits(alone))
    want = ref.conv2d(
        x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1, padding, dilation
    )
    assert_close(y, want, KERNEL_TOL["conv2d"][np.dtype(dtype).type])
    # dinput runs as such a forward too
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = F.conv2d_backward(dy, x, w, 1, padding, dilation)[0]
    dx_alone = np.concatenate(
        [
            F.conv2d_backward(dy[n : n + 1], x[n : n + 1], w, 1, padding, dilation)[0]
            for n in range(N)
        ]
    )
    np.testing.assert_array_equal(bits(dx), bits(dx_alone))
