"""The functional API's array contract, for every op of the table (tests/ops.py): arrays in
any memory layout, nested lists, dtypes equal to float32/float64 but not the same object,
inputs never modified, outputs new C-contiguous arrays, and the same call giving the same
bits twice. Then how sizes are spelled: ints, pairs, NumPy ints and keywords.
"""

import pickle

import numpy as np
import pytest
from cnnbp import functional as F
from conftest import DTYPES, assert_same_bits, randn, rng_for
from ops import OPS

DTYPE_IDS = ["float32", "float64"]

# one small and one large case of every op, each call (forward, backward) on its own
CALLS = [
    pytest.param(op, case, direction, id=f"{op.name}-{direction}-{case}")
    for op in OPS
    for case in (op.cases[1], op.big[0])
    for direction in ("forward", "backward")
]


def prepare(op, case, direction, dtype):
    """The call (forward or backward), a sample, and the keys of the call's array arguments."""
    call, args = (
        (op.forward, op.forward_args) if direction == "forward" else (op.backward, op.backward_args)
    )
    s = op.sample(case, dtype)
    return call, s, [a.key for a in args if isinstance(s[a.key], np.ndarray)]


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


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op, case, direction", CALLS)
def test_other_layouts_give_identical_results(op, case, direction, dtype):
    call, s, keys = prepare(op, case, direction, dtype)
    want = call(F, s)
    for key in keys:
        for layout, variant in layouts(s[key]).items():
            assert_same_bits(call(F, s.replace(**{key: variant})), want, f"{key} {layout}")
    # every array argument in Fortran order at once
    fortran = {key: np.asfortranarray(s[key]) for key in keys}
    assert_same_bits(call(F, s.replace(**fortran)), want, "all Fortran")


@pytest.mark.parametrize("op, case, direction", CALLS)
def test_lists_are_accepted_as_arrays(op, case, direction):
    call, s, keys = prepare(op, case, direction, np.float64)
    lists = {key: s[key].tolist() for key in keys if s[key].ndim}
    assert_same_bits(call(F, s.replace(**lists)), call(F, s), "lists")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op, case, direction", CALLS)
def test_dtypes_equal_to_float32_or_float64_are_accepted(op, case, direction, dtype):
    # A float64 array that went through pickle (multiprocessing, joblib, a saved object) or
    # whose dtype carries metadata has a dtype object equal to np.float64 but not the same
    # object; it holds the same native float64 numbers and must be accepted.
    call, s, keys = prepare(op, case, direction, dtype)
    want = call(F, s)
    variants = {
        "pickled": lambda a: pickle.loads(pickle.dumps(a)),
        "metadata": lambda a: a.view(np.dtype(a.dtype, metadata={"unit": "m"})),
        "native byte order": lambda a: a.view(a.dtype.newbyteorder("=")),
    }
    floats = [key for key in keys if s[key].dtype.kind == "f"]
    for name, make in variants.items():
        new = {key: make(s[key]) for key in floats}
        assert all(new[key].dtype == s[key].dtype for key in floats)
        assert_same_bits(call(F, s.replace(**new)), want, f"{name} arrays")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op, case, direction", CALLS)
def test_inputs_are_untouched_and_outputs_are_new(op, case, direction, dtype):
    # backward returns gradients: it never accumulates into or aliases its arguments
    call, s, keys = prepare(op, case, direction, dtype)
    copies = {key: s[key].copy() for key in keys}
    first = call(F, s)
    results = first if isinstance(first, tuple) else (first,)
    for key in keys:
        np.testing.assert_array_equal(s[key], copies[key], err_msg=key)
        if op.name != "flatten":  # flatten is a reshape: a view of a C-contiguous input
            for r in results:
                assert not np.shares_memory(r, s[key]), key
    assert_same_bits(call(F, s), first, "the same call twice")


# ---------------------------------------------------------------------------------------
# sizes: ints, (h, w) pairs, NumPy ints, keywords
# ---------------------------------------------------------------------------------------


def test_conv_and_max_pool_accept_ints_pairs_numpy_ints_and_keywords():
    x = randn(rng_for("pairs"), (1, 2, 7, 8), np.float64)
    w = randn(rng_for("pairs-w"), (3, 2, 3, 2), np.float64)
    b = np.zeros(3)
    want = F.conv2d(x, w, b, (2, 2), (1, 1))
    for stride, padding in [
        (2, 1),
        ([2, 2], [1, 1]),
        (np.int64(2), np.int32(1)),
        ((np.int64(2), 2), (1, np.int8(1))),
    ]:
        assert_same_bits(F.conv2d(x, w, b, stride, padding), want, f"{stride} {padding}")
        assert_same_bits(
            F.conv2d_backward(want, x, w, stride, padding),
            F.conv2d_backward(want, x, w, (2, 2), (1, 1)),
            f"{stride} {padding}",
        )
    want = F.max_pool2d(x, (3, 3), (2, 2), (1, 1))
    for k, s, p in [(3, 2, 1), ([3, 3], [2, 2], [1, 1]), (np.int64(3), np.int64(2), 1)]:
        assert_same_bits(F.max_pool2d(x, k, s, p), want, f"{k} {s} {p}")
    # keyword arguments by their documented names; b=None is the default
    assert_same_bits(F.conv2d(x=x, w=w, b=b, stride=2, padding=1), F.conv2d(x, w, b, 2, 1), "kw")
    assert_same_bits(F.conv2d(x, w, stride=2, padding=1), F.conv2d(x, w, None, 2, 1), "no b")
    assert_same_bits(F.max_pool2d(x=x, kernel_size=3, stride=2, padding=1), want, "kw")
    lx, lw = x.reshape(-1, 8), x.reshape(-1, 8)[:3].copy()
    assert_same_bits(F.linear(lx, lw), F.linear(lx, lw, None), "linear without b")


def test_avg_pool2d_accepts_ints_pairs_numpy_ints_and_keywords():
    x = randn(rng_for("new_ops", "avg-pairs"), (1, 2, 7, 8), np.float64)
    want = F.avg_pool2d(x, (3, 3), (2, 2), (1, 1))
    for k, s, p in [(3, 2, 1), ([3, 3], [2, 2], [1, 1]), (np.int64(3), np.int32(2), 1)]:
        assert_same_bits(F.avg_pool2d(x, k, s, p), want, f"{k} {s} {p}")
    assert_same_bits(F.avg_pool2d(x=x, kernel_size=3, stride=2, padding=1), want, "keywords")
    dy = np.ones_like(want)
    dx = F.avg_pool2d_backward(dy, x.shape, 3, 2, 1)
    for shape in ([1, 2, 7, 8], np.array(x.shape), (np.int64(1), 2, np.int32(7), 8)):
        assert_same_bits(F.avg_pool2d_backward(dy, shape, 3, 2, 1), dx, str(shape))
    assert_same_bits(
        F.avg_pool2d_backward(dy=dy, x_shape=x.shape, kernel_size=3, stride=2, padding=1),
        dx,
        "keywords",
    )
    # stride None (the default) is the kernel size
    assert_same_bits(F.avg_pool2d(x, 2), F.avg_pool2d(x, 2, 2), "default stride")
    assert_same_bits(
        F.avg_pool2d_backward(np.ones((1, 2, 3, 4)), x.shape, 2),
        F.avg_pool2d_backward(np.ones((1, 2, 3, 4)), x.shape, 2, 2),
        "default stride",
    )
