"""Property tests (hypothesis) of every public entry point against the NumPy oracle.

Each test draws a case that is valid, or valid with one thing broken: a dtype (ints, bool,
float16, complex, object), a rank, a zero-sized or mismatched dim, a parameter (0,
negative, 2^62, 2^63, 2^64, -2^63 - 1, the wrong type), data with NaN, infinities and
huge values, arrays in every layout (Fortran order, negative strides, every other
element, byte-swapped, read-only, zero-stride broadcast views, nested lists). Then:

- a valid case returns what the oracle returns, within the per-op tolerances of
  conftest.KERNEL_TOL, and exactly what the same call on C-contiguous copies returns;
- a broken case raises ValueError or TypeError "[op] name: expected ..." naming the op
  and one of the arguments that can be at fault (MemoryError only where the sizes cannot
  be allocated); a broken parameter that is still valid (a stride of 2^62) must work.

Hypothesis runs derandomized (the same examples in every run) with a modest number of
examples per test, so the whole file takes seconds.
"""

import io
import json
import re
import zipfile

import cnnbp
import numpy as np
import pytest
from cnnbp import functional as F
from cnnbp import nn, optim
from cnnbp import reference as ref
from conftest import (
    KERNEL_TOL,
    assert_close,
    assert_same_bits,
    check_array,
    check_result,
    seed_network,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ops import OPS

# NaN and infinities cast to the wrong dtypes, and the oracle's own overflow, warn
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F32, F64 = np.float32, np.float64
DTYPES = (F32, F64)

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
# per kind of breakage (a pytest parameter, so that every kind is drawn)
PER_BREAK = settings(FUZZ, max_examples=12)

# the kernel tests' tolerances (conftest.KERNEL_TOL); the three losses share theirs
TOL = {**KERNEL_TOL, "loss": KERNEL_TOL["cross_entropy"]}

BAD_DTYPES = [
    np.int8,
    np.int32,
    np.int64,
    np.uint8,
    np.uint64,
    np.bool_,
    np.float16,
    np.complex64,
    np.complex128,
    object,
    np.longdouble,
]
# ints beyond int64, at its edges, and the wrong types for an int parameter
HUGE_INTS = [2**63, 2**64, -(2**63) - 1, 10**30, 2**62, 2**63 - 1, -(2**63), 2**48 + 1]
BAD_INT_TYPES = [
    1.0,
    2.5,
    "1",
    None,
    True,
    b"1",
    (1, 2, 3),
    (1,),
    [1, None],
    {"h": 1},
    np.float64(1.0),
    object(),
]
LAYOUTS = ["c", "c", "fortran", "negative", "strided", "swapped", "readonly", "list"]
SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 1e-40]
SEEDS = st.integers(0, 2**32 - 1)  # for np.random.default_rng
KINDS = st.sampled_from(["normal", "ties", "special"])  # of values (see values())


# ---------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------


def values(rng, shape, dtype, kind):
    """normal: N(0, 1); ties: multiples of 0.5 (max-pool ties, ReLU kinks);
    special: N(0, 1) salted with NaN, +-inf, +-0, +-1e30 and subnormals."""
    if kind == "ties":
        x = rng.integers(-3, 4, shape) * 0.5
    else:
        x = rng.standard_normal(shape)
        if kind == "special" and x.size:
            flat = x.reshape(-1)
            picks = rng.random(flat.size) < 0.3
            flat[picks] = rng.choice(SPECIALS, int(picks.sum()))
    return np.asarray(x).astype(dtype)


def relayout(x, layout, rng=None):
    """The same values in another memory layout (or as nested lists)."""
    if x.ndim == 0 and layout in ("fortran", "list"):
        return x  # np.asfortranarray makes a 0-d array 1-d, tolist() makes it a float
    if layout == "fortran":
        return np.asfortranarray(x)
    if layout == "negative":
        return np.flip(np.flip(x).copy())  # every axis walked backwards
    if layout == "strided":
        buffer = np.zeros(x.shape + (2,), x.dtype)
        buffer[..., 0] = x
        return buffer[..., 0]  # every other element
    if layout == "swapped":
        return x.astype(x.dtype.newbyteorder())
    if layout == "readonly":
        x = x.copy()
        x.flags.writeable = False
        return x
    if layout == "list" and x.dtype == F64 and x.size:  # [] would lose the inner dims
        return x.tolist()  # a list becomes float64: only where float64 is expected
    return x


def broadcast_some_axis(x, rng):
    """x made constant along one axis, as a zero-stride broadcast view."""
    axes = [a for a in range(x.ndim) if x.shape[a] > 1]
    if not axes:
        return x
    a = int(rng.choice(axes))
    return np.broadcast_to(np.take(x, [0], axis=a), x.shape)


def draw_rng_and_dtype(draw):
    """The first draws of a case: a generator from a drawn seed, and a dtype."""
    return np.random.default_rng(draw(SEEDS)), draw(st.sampled_from(DTYPES))


def make_array(draw, rng, shape, dtype, kind):
    x = values(rng, shape, dtype, kind)
    if draw(st.integers(0, 5)) == 0:
        x = broadcast_some_axis(x, rng)
    return relayout(x, draw(st.sampled_from(LAYOUTS)))


def contiguous(a):
    # np.ascontiguousarray would make a 0-d array 1-d
    return np.asarray(a, order="C").copy() if isinstance(a, np.ndarray) else a


def run(fn, *args, **kwargs):
    """(result, None) or (None, the exception) for the errors the API may raise."""
    try:
        return fn(*args, **kwargs), None
    except (ValueError, TypeError, MemoryError) as error:
        return None, error


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)


MESSAGE = re.compile(r"^\[(\w+)\] ([\w.]+): expected ")


def check_error(error, op, names, types=(ValueError, TypeError), memory=False):
    """An op-prefixed ValueError/TypeError naming one of `names` (MemoryError if allowed)."""
    assert error is not None, f"[{op}] expected an error naming one of {sorted(names)}"
    if memory and isinstance(error, MemoryError):
        return
    assert isinstance(error, types), f"{type(error).__name__}: {error}"
    match = MESSAGE.match(str(error))
    assert match, f"unclear message: {error}"
    ops = {op} if isinstance(op, str) else op
    assert match.group(1) in ops, str(error)
    assert match.group(2) in names, (
        f"names {match.group(2)}, expected one of {sorted(names)}: {error}"
    )


@st.composite
def bad_int(draw):
    return draw(st.sampled_from(HUGE_INTS + BAD_INT_TYPES + [0, -1, -(2**31)]))


def int_is_valid(v, minimum):
    return (
        isinstance(v, (int, np.integer))
        and not isinstance(v, (bool, np.bool_))
        and minimum <= int(v) < 2**63
    )


def pair_is_valid(v, minimum):
    if isinstance(v, (tuple, list)):
        return len(v) == 2 and all(int_is_valid(e, minimum) for e in v)
    return int_is_valid(v, minimum)


def pair_of(v):
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


# ---------------------------------------------------------------------------------------
# every op of the table: random cases, values and layouts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS, ids=repr)
@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_table_ops_fuzz(op, data):
    """A drawn case of the op (tests/ops.py), in a drawn dtype, with normal values, ties or
    NaN and infinities, its float arrays in drawn layouts: the same bits as on C-contiguous
    arrays, forward and backward; and, without NaN and infinities, the oracle's numbers."""
    draw = data.draw
    case = draw(st.sampled_from(op.cases))
    dtype = draw(st.sampled_from(DTYPES))
    values = draw(KINDS)
    s = op.make(case, dtype, np.random.default_rng(draw(SEEDS)), values)
    event(f"{op.name}: {values}")
    for call, args in ((op.forward, op.forward_args), (op.backward, op.backward_args)):
        laid_out = {
            a.key: relayout(s[a.key], draw(st.sampled_from(LAYOUTS)))
            for a in args
            if a.kind in ("float", "optional") and s[a.key] is not None
        }
        assert_same_bits(call(F, s.replace(**laid_out)), call(F, s), "layout")
    if values != "special":
        check_result(op.forward(F, s), op.expected(s), dtype, TOL[op.name][dtype], op.name)
        tol = TOL[op.backward_name][dtype]
        check_result(op.backward(F, s), op.backward(ref, s), dtype, tol, op.backward_name)


# ---------------------------------------------------------------------------------------
# conv2d and conv2d_backward
# ---------------------------------------------------------------------------------------

CONV_BREAKS = [
    None,
    "x dtype",
    "w dtype",
    "b dtype",
    "mixed",
    "x rank",
    "w rank",
    "zero dim",
    "channels",
    "bias shape",
    "stride",
    "padding",
    "window",
    "none",
    "not an array",
    "huge view",
    "dy shape",
    "dy dtype",
    "dilation",
    "groups",
]


@st.composite
def conv_cases(draw, brk):
    rng, dtype = draw_rng_and_dtype(draw)
    kind = draw(KINDS)
    # N = 0 is an empty batch, which works as in torch
    N, C, K = draw(st.integers(0, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    H, W = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if C % g == 0 and K % g == 0]))
    dilation = draw(st.sampled_from([1, 1, 2, (1, 3), [2, 1]]))
    dh, dw = pair_of(dilation)
    # kernels whose dilated extent fits the padded input
    R, S = (
        draw(st.integers(1, (H + 2 * ph - 1) // dh + 1)),
        draw(st.integers(1, (W + 2 * pw - 1) // dw + 1)),
    )
    stride = draw(st.sampled_from([1, 2, 3, (1, 2), (3, 1), [2, 2], np.int64(2)]))
    paddings = [(ph, pw), [ph, pw]] + ([ph] if ph == pw else [])
    if pair_of(stride) == (1, 1):
        paddings.append("same")  # torch's 'same' takes stride 1 only
    if dh * (R - 1) < H and dw * (S - 1) < W:
        paddings.append("valid")
    padding = draw(st.sampled_from(paddings))
    has_bias = draw(st.booleans())
    case = dict(
        dtype=dtype,
        kind=kind,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        brk=brk,
        x_shape=(N, C, H, W),
        w_shape=(K, C // groups, R, S),
        names=set(),
        types=(),
        memory=False,
    )
    x_dtype = w_dtype = b_dtype = dy_dtype = dtype
    if brk == "x dtype":
        x_dtype = draw(st.sampled_from(BAD_DTYPES))
        case.update(names={"input"}, types=(TypeError,))
    elif brk == "w dtype":
        w_dtype = draw(st.sampled_from(BAD_DTYPES))
        case.update(names={"weight"}, types=(TypeError,))
    elif brk == "b dtype" and has_bias:
        b_dtype = draw(st.sampled_from(BAD_DTYPES))
        case.update(names={"bias"}, types=(TypeError,))
    elif brk == "mixed":
        w_dtype = F64 if dtype == F32 else F32
        case.update(names={"weight"}, types=(TypeError,))
    elif brk == "dy dtype":
        dy_dtype = draw(st.sampled_from(BAD_DTYPES))
        case.update(names={"doutput"}, types=(TypeError,), forward_ok=True)
    elif brk == "x rank":
        # (C, H, W) is an unbatched input, not a wrong rank
        case["x_shape"] = draw(st.sampled_from([(H, W), (N, C, H, W, 1), (), (N * C * H * W,)]))
        case.update(names={"input"}, types=(ValueError,))
    elif brk == "w rank":
        case["w_shape"] = draw(st.sampled_from([(K, C, R), (K, C, R, S, 1), (K,)]))
        case.update(names={"weight"}, types=(ValueError,))
    elif brk == "zero dim":
        which = draw(st.sampled_from(["x", "w"]))
        key = which + "_shape"
        shape = list(case[key])
        shape[draw(st.integers(0 if which == "w" else 1, 3))] = 0  # x: N = 0 is allowed
        case[key] = tuple(shape)
        if which == "w" or shape[1] == 0:
            case["w_shape"] = tuple(shape) if which == "w" else (K, 0, R, S)
        case.update(names={"input", "weight", "bias"}, types=(ValueError,))
    elif brk == "channels":
        case["w_shape"] = (K, C // groups + 1, R, S)
        case.update(names={"weight"}, types=(ValueError,))
    elif brk == "bias shape":
        has_bias = "bad"
        case.update(names={"bias"}, types=(ValueError,))
    elif brk == "stride":
        bad = draw(bad_int())
        case["stride"] = draw(st.sampled_from([bad, (1, bad), [bad, 1]]))
        case.update(names={"stride", "input", "output"}, may_work=True)
    elif brk == "padding":
        # no padding that passes validation yet allocates gigabytes: nothing in [2^20, 2^48)
        bad = draw(
            st.sampled_from(
                [v for v in HUGE_INTS if not 0 < v < 2**48] + BAD_INT_TYPES + [-1, -(2**31)]
            )
        )
        case["padding"] = draw(st.sampled_from([bad, (0, bad), [bad, 0]]))
        case.update(names={"padding", "input", "output"}, may_work=True)
    elif brk == "window":  # a dilated extent beyond the padded input
        case["w_shape"] = (K, C // groups, (H + 2 * ph) // dh + 2, S)
        case.update(padding=(ph, pw), names={"input"}, types=(ValueError,))
    elif brk == "dilation":
        bad = draw(bad_int())
        case["dilation"] = draw(st.sampled_from([bad, (1, bad), [bad, 1]]))
        case.update(names={"dilation", "input", "output"}, may_work=True)
    elif brk == "groups":
        bad = draw(st.sampled_from(HUGE_INTS + BAD_INT_TYPES + [0, -1, C + 1, (1, 1)]))
        case.update(groups=bad, names={"groups", "weight"})
    elif brk == "none":
        case.update(
            none=draw(st.sampled_from(["x", "w"])), names={"input", "weight"}, types=(TypeError,)
        )
    elif brk == "not an array":
        case.update(
            x_value=draw(st.sampled_from(["abc", object(), {"a": 1}, [[1.0], [2.0, 3.0]]])),
            names={"input"},
            types=(TypeError,),
        )
    elif brk == "huge view":
        # 2^21 * C * 2^14 * 2^14 > 2^48 elements, as a view of one float
        case.update(huge=(2**21, C, 2**14, 2**14), names={"input"}, types=(ValueError,))
    elif brk == "dy shape":
        case.update(
            dy_shape_delta=draw(st.sampled_from([(0, 0, 1, 0), (1, 0, 0, 0), (0, 1, 0, 0)])),
            names={"doutput"},
            types=(ValueError,),
            forward_ok=True,
        )

    def array(shape, dt, scale=1.0):
        if np.dtype(dt) in (np.dtype(F32), np.dtype(F64)):
            return make_array(draw, rng, shape, dt, kind)
        return values(rng, shape, F64, "ties").astype(dt)

    case["x"] = array(case["x_shape"], x_dtype)
    case["w"] = array(case["w_shape"], w_dtype)
    if has_bias == "bad":
        case["b"] = array(draw(st.sampled_from([(K + 1,), (K, 1), ()])), dtype)
    else:
        case["b"] = array((K,), b_dtype) if has_bias else None
    if case.get("none") == "x":
        case["x"] = None
    elif case.get("none") == "w":
        case["w"] = None
    if "x_value" in case:
        case["x"] = case["x_value"]
    if "huge" in case:
        case["x"] = np.broadcast_to(dtype(1), case["huge"])
    case["dy_dtype"] = dy_dtype
    case["rng"] = rng
    return case


def conv_dy(case, y_shape):
    shape = tuple(np.add(y_shape, case.get("dy_shape_delta", (0, 0, 0, 0))))
    return values(
        case["rng"],
        shape,
        case["dy_dtype"]
        if np.dtype(case["dy_dtype"]).kind == "f" and np.dtype(case["dy_dtype"]).itemsize in (4, 8)
        else F64,
        "normal",
    ).astype(case["dy_dtype"])


@pytest.mark.parametrize("brk", CONV_BREAKS, ids=str)
@settings(PER_BREAK, max_examples=25)
@given(data=st.data())
def test_conv2d_fuzz(brk, data):
    case = data.draw(conv_cases(brk))
    x, w, b, stride, padding = case["x"], case["w"], case["b"], case["stride"], case["padding"]
    options = (case["dilation"], case["groups"])
    y, error = run(F.conv2d, x, w, b, stride, padding, *options)
    valid = case["brk"] in (None, "dy shape", "dy dtype") or (
        case["brk"] == "b dtype" and b is None
    )
    if case.get("may_work"):
        same = padding == "same"
        valid = (
            pair_is_valid(stride, 1)
            and (same or pair_is_valid(padding, 0))
            and pair_is_valid(case["dilation"], 1)
        )
        if valid:  # a parameter from the bad list that is fine (stride 2^62) or too large
            (sh, sw), (dh, dw) = pair_of(stride), pair_of(case["dilation"])
            N, C, H, W = case["x_shape"]
            K, _, R, S = case["w_shape"]
            if same:
                ph, pw = dh * (R - 1), dw * (S - 1)  # the total (top + bottom) paddings
                valid = (sh, sw) == (1, 1)
            else:
                ph, pw = pair_of(padding)
                ph, pw = 2 * ph, 2 * pw
            if H + ph > 2**48 or W + pw > 2**48:
                valid = False
            if dh * (R - 1) + 1 > H + ph or dw * (S - 1) + 1 > W + pw:
                valid = False  # the dilated kernel does not fit
    event(f"break: {case['brk']}, {'valid' if valid else 'refused'}, {case['kind']}")
    if not valid:
        types = case["types"] or (ValueError, TypeError)
        check_error(error, "conv2d", case["names"], types)
        if case["brk"] not in ("dy shape", "dy dtype", "bias shape", "b dtype"):  # no bias there
            dy = np.zeros((1, 1, 1, 1), case["dtype"])
            _, error = run(F.conv2d_backward, dy, x, w, stride, padding, *options)
            check_error(
                error, "conv2d_backward", case["names"] | {"doutput"}, (ValueError, TypeError)
            )
        return
    assert error is None, f"{type(error).__name__}: {error}"
    dtype = case["dtype"]
    N, C, H, W = case["x_shape"]
    K, Cg, R, S = case["w_shape"]
    P, Q = ref._conv_geometry((N, C, H, W), (K, Cg, R, S), stride, padding, case["dilation"])[3]
    check_array(y, (N, K, P, Q), dtype)
    # the same bits as on C-contiguous copies: layout never changes a result
    assert_same_bits(
        y,
        F.conv2d(
            contiguous(np.asarray(x, dtype)),
            contiguous(np.asarray(w, dtype)),
            contiguous(None if b is None else np.asarray(b, dtype)),
            stride,
            padding,
            *options,
        ),
    )
    dy = conv_dy(case, y.shape)
    grads, error = run(F.conv2d_backward, dy, x, w, stride, padding, *options)
    if case["brk"] in ("dy shape", "dy dtype"):
        check_error(error, "conv2d_backward", case["names"], case["types"])
        return
    assert error is None, f"{type(error).__name__}: {error}"
    for g, shape in zip(grads, [(N, C, H, W), (K, Cg, R, S), (K,)]):
        check_array(g, shape, dtype)
    if case["kind"] == "special":
        return  # inf * 0 and NaN: the paths may differ in which padded zeros they multiply
    tol = TOL["conv2d"][dtype]
    assert_close(y, ref.conv2d(x, w, b, stride, padding, *options), tol, "conv2d")
    for got, want, name in zip(
        grads, ref.conv2d_backward(dy, x, w, stride, padding, *options), ["dx", "dw", "db"]
    ):
        assert_close(got, want, tol, name)


# ---------------------------------------------------------------------------------------
# max_pool2d and max_pool2d_backward
# ---------------------------------------------------------------------------------------


POOL_BREAKS = [
    None,
    "dtype",
    "rank",
    "zero dim",
    "kernel",
    "stride",
    "padding",
    "none",
    "huge view",
]


@st.composite
def pool_cases(draw, brk):
    rng, dtype = draw_rng_and_dtype(draw)
    kind = draw(KINDS)
    N, C, H, W = (draw(st.integers(1, n)) for n in (2, 3, 7, 7))
    kh, kw = draw(st.integers(1, H + 2)), draw(st.integers(1, W + 2))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    if H + 2 * ph < kh or W + 2 * pw < kw:
        ph, pw = kh // 2, kw // 2
        if H + 2 * ph < kh or W + 2 * pw < kw:
            kh, kw, ph, pw = 1, 1, 0, 0
    kernel = draw(st.sampled_from([(kh, kw), [kh, kw]] + ([kh] if kh == kw else [])))
    stride = draw(st.sampled_from([None, 1, 2, (1, 3), [2, 1], np.int32(2)]))
    padding = (ph, pw) if (ph, pw) != (0, 0) else draw(st.sampled_from([0, (0, 0)]))
    names, x_dtype, shape = set(), dtype, (N, C, H, W)
    if brk == "dtype":
        x_dtype, names = draw(st.sampled_from(BAD_DTYPES)), {"input"}
    elif brk == "rank":
        # (C, H, W) is an unbatched input, not a wrong rank
        shape, names = draw(st.sampled_from([(H, W), (N, C, H, W, 1), ()])), {"input"}
    elif brk == "zero dim":
        shape = list(shape)
        shape[draw(st.integers(1, 3))] = 0  # N = 0 is an empty batch
        shape, names = tuple(shape), {"input"}
    elif brk in ("kernel", "stride", "padding"):
        bad = draw(bad_int())
        value = draw(st.sampled_from([bad, (1, bad), [bad, 1]]))
        if brk == "kernel":
            kernel = value
        elif brk == "stride":
            stride = value
        else:
            padding = value
        names = {"kernel_size", "stride", "padding", "input", "output"}
    elif brk == "none":
        names = {"input"}
    elif brk == "huge view":
        shape, names = (2**20, 2**20, 2**5, 2**4), {"input"}
    if brk == "huge view":
        x = np.broadcast_to(dtype(1), shape)
    elif brk == "none":
        x = None
    elif np.dtype(x_dtype) in (np.dtype(F32), np.dtype(F64)):
        x = make_array(draw, rng, shape, x_dtype, kind)
    else:
        x = values(rng, shape, F64, "ties").astype(x_dtype)
    return dict(
        x=x,
        kernel=kernel,
        stride=stride,
        padding=padding,
        brk=brk,
        names=names,
        dtype=dtype,
        kind=kind,
        rng=rng,
    )


def pool_case_is_valid(case):
    """Whether a drawn pooling case should run: unbroken, or its broken kernel, stride or
    padding still form a window the input can hold (torch's rules, 2^48 extents at most)."""
    if case["brk"] not in ("kernel", "stride", "padding"):
        return case["brk"] is None
    kernel, stride, padding = case["kernel"], case["stride"], case["padding"]
    if not (
        pair_is_valid(kernel, 1)
        and (stride is None or pair_is_valid(stride, 1))
        and pair_is_valid(padding, 0)
    ):
        return False
    (kh, kw), (ph, pw) = pair_of(kernel), pair_of(padding)
    _, _, H, W = np.shape(case["x"])
    return (
        2 * ph <= kh
        and 2 * pw <= kw
        and H + 2 * ph >= kh
        and W + 2 * pw >= kw
        and H + 2 * ph <= 2**48
        and W + 2 * pw <= 2**48
    )


def pool_result(op, case):
    """F.<op>(x, kernel, stride, padding) on a drawn pooling case: its result where the case
    is valid; else None, the error checked."""
    out, error = run(getattr(F, op), case["x"], case["kernel"], case["stride"], case["padding"])
    valid = pool_case_is_valid(case)
    event(f"break: {case['brk']}, {'valid' if valid else 'refused'}")
    if not valid:
        check_error(error, op, case["names"])
        return None
    assert error is None, f"{type(error).__name__}: {error}"
    return out


@pytest.mark.parametrize("brk", POOL_BREAKS, ids=str)
@settings(PER_BREAK, max_examples=25)
@given(data=st.data())
def test_max_pool2d_fuzz(brk, data):
    case = data.draw(pool_cases(brk))
    out = pool_result("max_pool2d", case)
    if out is None:
        return
    x, kernel, stride, padding = case["x"], case["kernel"], case["stride"], case["padding"]
    y, idx = out
    want_y, want_idx = ref.max_pool2d(x, kernel, stride, padding)
    check_array(y, want_y.shape, case["dtype"])
    check_array(idx, want_idx.shape, np.int64)
    # selection: the values, NaNs and first-index ties exactly as the oracle
    assert_close(y, want_y, 0, "max_pool2d")
    np.testing.assert_array_equal(idx, want_idx)
    assert_same_bits(out, F.max_pool2d(contiguous(np.asarray(x)), kernel, stride, padding))
    dy = values(case["rng"], y.shape, case["dtype"], case["kind"])
    dx = F.max_pool2d_backward(dy, idx, np.shape(x))
    check_array(dx, np.shape(x), case["dtype"])
    assert_close(
        dx,
        ref.max_pool2d_backward(dy, idx, np.shape(x)),
        TOL["max_pool2d_backward"][case["dtype"]],
        "max_pool2d_backward",
    )


@pytest.mark.parametrize("brk", POOL_BREAKS, ids=str)
@settings(PER_BREAK, max_examples=15)
@given(data=st.data())
def test_avg_pool2d_fuzz(brk, data):
    case = data.draw(pool_cases(brk))
    y = pool_result("avg_pool2d", case)
    if y is None:
        return
    x, kernel, stride, padding = case["x"], case["kernel"], case["stride"], case["padding"]
    want = ref.avg_pool2d(x, kernel, stride, padding)
    check_array(y, want.shape, case["dtype"])
    tol = TOL["avg_pool2d"][case["dtype"]]
    if case["kind"] != "special":  # inf - inf in a window's sum: NaN in either order
        assert_close(y, want, tol, "avg_pool2d")
    assert_same_bits(y, F.avg_pool2d(contiguous(np.asarray(x)), kernel, stride, padding))
    dy = values(case["rng"], y.shape, case["dtype"], "normal")
    dx = F.avg_pool2d_backward(dy, np.shape(x), kernel, stride, padding)
    check_array(dx, np.shape(x), case["dtype"])
    assert_close(dx, ref.avg_pool2d_backward(dy, np.shape(x), kernel, stride, padding), tol)


@settings(FUZZ, max_examples=60)
@given(
    SEEDS,
    st.sampled_from(DTYPES),
    shapes,
    st.one_of(
        st.sampled_from([0.0, 0.5, 1.0, 0.1, 1, 0, np.float32(0.25)]),
        st.sampled_from([-0.1, 1.5, float("nan"), float("inf"), "0.5", None, True, 1 + 1e-12]),
    ),
    st.one_of(
        st.integers(0, 2**64 - 1),
        st.sampled_from([-1, 2**64, 2**70, 1.5, "1", None, True, np.uint64(2**64 - 1)]),
    ),
    st.data(),
)
def test_dropout_fuzz(seed, dtype, shape, p, drop_seed, data):
    rng = np.random.default_rng(seed)
    x = make_array(data.draw, rng, shape, dtype, "normal")
    out, error = run(F.dropout, x, p, drop_seed)
    p_ok = isinstance(p, (float, int, np.floating)) and not isinstance(p, bool) and 0 <= p <= 1
    seed_ok = int_is_valid(drop_seed, 0) or (
        isinstance(drop_seed, (int, np.integer))
        and not isinstance(drop_seed, bool)
        and 0 <= int(drop_seed) < 2**64
    )
    if not (p_ok and seed_ok):
        check_error(error, "dropout", {"p", "seed"})
        return
    assert error is None, f"{type(error).__name__}: {error}"
    y, mask = out
    check_array(y, shape, dtype)
    check_array(mask, shape, np.bool_)
    want_mask = ref.dropout_mask(shape, float(p), int(drop_seed))
    np.testing.assert_array_equal(mask, want_mask)
    assert_close(y, ref.dropout(x, mask, float(p)), 1e-6 if dtype == F32 else 1e-15)
    dy = values(rng, shape, dtype, "normal")
    assert_close(
        F.dropout_backward(dy, mask, p),
        ref.dropout_backward(dy, mask, float(p)),
        1e-6 if dtype == F32 else 1e-15,
    )
    _, error = run(F.dropout_backward, dy, mask.astype(np.uint8), p)
    check_error(error, "dropout_backward", {"mask"}, (TypeError,))


POOL_BACKWARD_BREAKS = [
    None,
    "index",
    "x_shape",
    "x_shape type",
    "idx dtype",
    "idx shape",
    "dy dtype",
    "N mismatch",
]


@st.composite
def pool_backward_cases(draw, brk):
    rng, dtype = draw_rng_and_dtype(draw)
    N, C, H, W = (draw(st.integers(1, n)) for n in (2, 3, 6, 6))
    P, Q = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    idx = rng.integers(0, H * W, (N, C, P, Q))
    idx_dtype = draw(st.sampled_from([np.int64, np.int32, np.uint8, np.uint64, np.int16]))
    if np.iinfo(idx_dtype).max < H * W:
        idx_dtype = np.int64
    x_shape = draw(st.sampled_from([(N, C, H, W), [N, C, H, W], np.array([N, C, H, W])]))
    names = set()
    idx = idx.astype(idx_dtype)
    if brk == "index" and not idx.size:
        brk = None  # nothing to break
    if brk == "index":
        bad = draw(st.sampled_from([-1, H * W, H * W + 1, 2**40, -(2**63), 2**62]))
        idx = idx.astype(np.int64)
        idx.reshape(-1)[draw(st.integers(0, idx.size - 1))] = bad
        names = {"indices"}
    elif brk == "x_shape":
        x_shape = list(x_shape)
        x_shape[draw(st.integers(0, 3))] = draw(
            st.sampled_from([0, -1, 2**48 + 1, 2**62, 2**63 - 1, 2**63, 2**64, -(2**63) - 1])
        )
        if draw(st.booleans()):
            x_shape = x_shape[:3]
        names = {"x_shape", "indices", "doutput"}
    elif brk == "x_shape type":
        x_shape = draw(
            st.sampled_from(
                [None, "1234", 5, (1, 1, 2.0, 2), (1, None, 2, 2), {"N": 1}, (True, 1, 2, 2)]
            )
        )
        names = {"x_shape"}
    elif brk == "idx dtype":
        idx = idx.astype(
            draw(st.sampled_from([np.float64, np.float32, np.bool_, object, np.complex64]))
        )
        names = {"indices"}
    elif brk == "idx shape":
        idx = idx.reshape(-1) if idx.ndim else idx
        names = {"indices", "doutput"}
        if idx.shape == (N, C, P, Q):
            brk = None
    elif brk == "N mismatch":
        x_shape = (N + 1, C, H, W)
        names = {"doutput", "indices"}
    dy = values(rng, (N, C, P, Q), dtype, "normal")
    if brk == "dy dtype":
        dy = dy.astype(draw(st.sampled_from(BAD_DTYPES)))
        names = {"doutput"}
    return dict(
        dy=relayout(dy, draw(st.sampled_from(LAYOUTS))),
        idx=idx,
        x_shape=x_shape,
        brk=brk,
        names=names,
        dtype=dtype,
        idx_is_valid=brk is None,
    )


@pytest.mark.parametrize("brk", POOL_BACKWARD_BREAKS, ids=str)
@settings(PER_BREAK, max_examples=20)
@given(data=st.data())
def test_max_pool2d_backward_fuzz(brk, data):
    case = data.draw(pool_backward_cases(brk))
    dy, idx, x_shape = case["dy"], case["idx"], case["x_shape"]
    dx, error = run(F.max_pool2d_backward, dy, idx, x_shape)
    if case["brk"] is not None:
        check_error(error, "max_pool2d_backward", case["names"])
        return
    assert error is None, f"{type(error).__name__}: {error}"
    shape = tuple(int(v) for v in x_shape)
    check_array(dx, shape, case["dtype"])
    assert_close(
        dx, ref.max_pool2d_backward(dy, idx, shape), TOL["max_pool2d_backward"][case["dtype"]]
    )


# ---------------------------------------------------------------------------------------
# relu, sigmoid: any rank, zero-sized shapes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("brk", [None, "dtype", "saved dtype", "mixed", "shape", "none"], ids=str)
@pytest.mark.parametrize("op", ["relu", "sigmoid", "tanh"])
@settings(PER_BREAK, max_examples=20)
@given(
    SEEDS,
    st.sampled_from(DTYPES),
    shapes,
    KINDS,
    st.data(),
)
def test_activations_fuzz(op, brk, seed, dtype, shape, kind, data):
    rng = np.random.default_rng(seed)
    forward, backward = getattr(F, op), getattr(F, op + "_backward")
    saved_name = "z" if op == "relu" else "a"
    event(f"break: {brk}")
    z = make_array(data.draw, rng, shape, dtype, kind)
    if brk == "dtype":
        bad = np.asarray(values(rng, shape, F64, "ties")).astype(
            data.draw(st.sampled_from(BAD_DTYPES))
        )
        _, error = run(forward, bad)
        check_error(error, op, {"input"}, (TypeError,))
        _, error = run(backward, bad, z)
        check_error(error, op + "_backward", {"doutput"}, (TypeError,))
        return
    if brk == "none":
        _, error = run(forward, None)
        check_error(error, op, {"input"}, (TypeError,))
        return
    a, error = run(forward, z)
    assert error is None, f"{type(error).__name__}: {error}"
    check_array(a, shape, dtype)
    want = getattr(ref, op)(z)
    assert_close(a, want, TOL[op][dtype], op)
    assert_same_bits(a, forward(contiguous(np.asarray(z, dtype))))
    saved = z if op == "relu" else a
    da = make_array(data.draw, rng, shape, dtype, kind)
    if brk == "saved dtype":
        other = np.asarray(saved).astype(data.draw(st.sampled_from(BAD_DTYPES)))
        _, error = run(backward, da, other)
        check_error(error, op + "_backward", {saved_name}, (TypeError,))
        return
    if brk == "mixed":
        _, error = run(backward, da, np.asarray(saved).astype(F64 if dtype == F32 else F32))
        check_error(error, op + "_backward", {saved_name}, (TypeError,))
        return
    if brk == "shape":
        _, error = run(backward, da, np.zeros(tuple(shape) + (2,), dtype))
        check_error(error, op + "_backward", {saved_name}, (ValueError,))
        return
    dz, error = run(backward, da, saved)
    assert error is None, f"{type(error).__name__}: {error}"
    check_array(dz, shape, dtype)
    assert_close(dz, getattr(ref, op + "_backward")(da, saved), TOL[op][dtype], op + "_backward")


# ---------------------------------------------------------------------------------------
# linear and linear_backward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "brk",
    [
        None,
        "x dtype",
        "w dtype",
        "mixed",
        "in_features",
        "w rank",
        "bias",
        "zero out",
        "scalar",
        "dy shape",
        "huge view",
    ],
    ids=str,
)
@settings(PER_BREAK, max_examples=25)
@given(
    SEEDS,
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple),
    st.integers(1, 7),
    st.integers(1, 6),
    st.booleans(),
    KINDS,
    st.data(),
)
def test_linear_fuzz(brk, seed, dtype, lead, IN, OUT, has_bias, kind, data):
    rng = np.random.default_rng(seed)
    draw = data.draw
    x = make_array(draw, rng, lead + (IN,), dtype, kind)
    w = make_array(draw, rng, (OUT, IN), dtype, kind)
    b = make_array(draw, rng, (OUT,), dtype, kind) if has_bias else None
    names = {
        "x dtype": {"input"},
        "w dtype": {"weight"},
        "mixed": {"weight"},
        "in_features": {"weight"},
        "w rank": {"weight"},
        "bias": {"bias"},
        "zero out": {"weight"},
        "scalar": {"input"},
        "huge view": {"input", "output"},
    }
    if brk == "x dtype":
        x = np.asarray(x).astype(draw(st.sampled_from(BAD_DTYPES)))
    elif brk == "w dtype":
        w = np.asarray(w).astype(draw(st.sampled_from(BAD_DTYPES)))
    elif brk == "mixed":
        w = np.asarray(w).astype(F64 if dtype == F32 else F32)
    elif brk == "in_features":
        w = values(rng, (OUT, IN + 1), dtype, kind)
    elif brk == "w rank":
        w = values(rng, draw(st.sampled_from([(OUT,), (1, OUT, IN), ()])), dtype, kind)
    elif brk == "bias":
        b = values(rng, draw(st.sampled_from([(OUT + 1,), (1, OUT), ()])), dtype, kind)
    elif brk == "zero out":
        w = np.zeros((0, IN), dtype)
    elif brk == "scalar":
        x = np.asarray(values(rng, (), dtype, kind))
    elif brk == "huge view":
        # 2^47 rows of one element times 2^17 outputs: more than 2^48 elements of output
        x, w = np.broadcast_to(dtype(1), (2**47, 1)), np.broadcast_to(dtype(1), (2**17, 1))
        b = None
    y, error = run(F.linear, x, w, b)
    event(f"break: {brk}")
    if brk in names:
        check_error(error, "linear", names[brk])
        return
    assert error is None, f"{type(error).__name__}: {error}"
    check_array(y, lead + (OUT,), dtype)
    assert_same_bits(
        y,
        F.linear(
            contiguous(np.asarray(x, dtype)),
            contiguous(np.asarray(w, dtype)),
            contiguous(None if b is None else np.asarray(b, dtype)),
        ),
    )
    dy = values(rng, y.shape, dtype, "normal")
    if brk == "dy shape":
        _, error = run(F.linear_backward, values(rng, lead + (OUT + 1,), dtype, "normal"), x, w)
        check_error(error, "linear_backward", {"doutput"}, (ValueError,))
        return
    grads, error = run(F.linear_backward, dy, x, w)
    assert error is None, f"{type(error).__name__}: {error}"
    for g, shape in zip(grads, [lead + (IN,), (OUT, IN), (OUT,)]):
        check_array(g, shape, dtype)
    if kind == "special":
        return
    tol = TOL["linear"][dtype]
    assert_close(y, ref.linear(x, w, b), tol, "linear")
    for got, want, name in zip(grads, ref.linear_backward(dy, x, w), ["dx", "dw", "db"]):
        assert_close(got, want, tol, name)


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("brk", [None, "dtype", "target dtype", "mixed", "shape", "none"], ids=str)
@pytest.mark.parametrize("op", ["binary_cross_entropy", "binary_cross_entropy_with_logits"])
@settings(PER_BREAK, max_examples=20)
@given(
    SEEDS,
    st.sampled_from(DTYPES),
    shapes,
    st.sampled_from(["normal", "extreme", "special", "edges"]),
    st.data(),
)
def test_binary_losses_fuzz(op, brk, seed, dtype, shape, kind, data):
    rng = np.random.default_rng(seed)
    draw = data.draw
    backward = op + "_backward"
    if op == "binary_cross_entropy":
        p = rng.random(shape)
        if kind == "edges":
            p = rng.choice([0.0, 1.0, -0.0, 0.5, 1e-30, 1 - 1e-16], shape)
        elif kind == "special":
            p = np.where(rng.random(shape) < 0.3, rng.choice(SPECIALS + [1.5, -0.5], shape), p)
    else:
        p = rng.standard_normal(shape) * (1e4 if kind == "extreme" else 3)
        if kind in ("special", "edges"):
            p = np.where(rng.random(shape) < 0.3, rng.choice(SPECIALS, shape), p)
    y = rng.choice([0.0, 1.0, 0.25], shape)
    p, y = np.asarray(p).astype(dtype), np.asarray(y).astype(dtype)
    names = None
    if brk == "dtype":
        p, names = p.astype(draw(st.sampled_from(BAD_DTYPES))), ({"input"}, (TypeError,))
    elif brk == "target dtype":
        y, names = y.astype(draw(st.sampled_from(BAD_DTYPES))), ({"target"}, (TypeError,))
    elif brk == "mixed":
        y, names = y.astype(F64 if dtype == F32 else F32), ({"target"}, (TypeError,))
    elif brk == "shape":
        y, names = np.zeros(shape + (2,), dtype), ({"target"}, (ValueError,))
    elif brk == "none":
        p, names = None, ({"input"}, (TypeError,))
    probabilities_ok = (
        p is None or op != "binary_cross_entropy" or bool(np.all((p >= 0) & (p <= 1)))
    )
    if names is None and not probabilities_ok:
        names = ({"input"}, (ValueError,))
    p_view = relayout(p, draw(st.sampled_from(LAYOUTS))) if p is not None else None
    for fn in (op, backward):
        got, error = run(getattr(F, fn), p_view, y)
        if names is not None:
            check_error(error, fn, *names)
            continue
        assert error is None, f"{type(error).__name__}: {error}"
        want = getattr(ref, fn)(p, y)
        if fn == op:
            assert isinstance(got, float)
            assert_close(got, want, TOL["loss"][dtype], fn)
        else:
            check_array(got, shape, dtype)
            assert_close(got, want, TOL["loss"][dtype], fn)


@pytest.mark.parametrize(
    "brk",
    [None, "label range", "label dtype", "label shape", "logits rank", "logits dtype", "none"],
    ids=str,
)
@settings(PER_BREAK, max_examples=20)
@given(
    SEEDS,
    st.sampled_from(DTYPES),
    st.integers(0, 5),
    st.integers(0, 6),
    st.sampled_from(["normal", "extreme", "special"]),
    st.sampled_from([np.int64, np.int32, np.uint8, np.int8, list]),
    st.data(),
)
def test_cross_entropy_fuzz(brk, seed, dtype, N, K, kind, label_type, data):
    rng = np.random.default_rng(seed)
    draw = data.draw
    z = rng.standard_normal((N, K)) * (1e4 if kind == "extreme" else 3)
    if kind == "special":
        z = np.where(rng.random((N, K)) < 0.3, rng.choice(SPECIALS, (N, K)), z)
    z = z.astype(dtype)
    labels = rng.integers(0, max(K, 1), N)
    names = None
    if K == 0:  # (an empty list of labels is float64: a TypeError)
        names = ({"logits", "labels"}, (ValueError, TypeError))
    elif N == 0 and label_type is list:
        names = ({"labels"}, (TypeError,))  # [] becomes float64
    if brk == "label range" and N:
        labels[draw(st.integers(0, N - 1))] = draw(st.sampled_from([-1, K, K + 1, 2**40, -(2**63)]))
        label_type, names = np.int64, ({"labels", "logits"}, (ValueError,))
    elif brk == "label dtype":
        label_type = draw(st.sampled_from([np.float64, np.float32, np.bool_, object, np.complex64]))
        names = ({"labels"}, (TypeError,))
    elif brk == "label shape":
        labels = np.zeros(draw(st.sampled_from([(N + 1,), (N, 1), ()])), np.int64)
        names = ({"labels", "logits"}, (ValueError, TypeError))  # [] as a list is float64
    elif brk == "logits rank":  # (K,) is unbatched: a 0-d array is no logits
        z = np.asarray(z.reshape(-1)[0] if z.size else dtype(0))
        names = ({"logits"}, (ValueError,))
    elif brk == "logits dtype":
        z = z.astype(draw(st.sampled_from(BAD_DTYPES)))
        names = ({"logits"}, (TypeError,))
    elif brk == "none":
        z, names = None, ({"logits"}, (TypeError,))
    if label_type is list and np.size(labels) == 0 and names is not None:
        names = (names[0] | {"labels"}, names[1] + (TypeError,))  # [] becomes float64
    labels = labels.tolist() if label_type is list else np.asarray(labels).astype(label_type)
    z_view = relayout(z, draw(st.sampled_from(LAYOUTS))) if z is not None else None
    for fn in ("cross_entropy", "cross_entropy_backward"):
        got, error = run(getattr(F, fn), z_view, labels)
        if names is not None:
            check_error(error, fn, *names)
            continue
        assert error is None, f"{type(error).__name__}: {error}"
        want = getattr(ref, fn)(z, np.asarray(labels, dtype=np.int64))
        if fn == "cross_entropy":
            assert isinstance(got, float)
        else:
            check_array(got, (N, K), dtype)
        assert_close(got, want, TOL["loss"][dtype], fn)


# ---------------------------------------------------------------------------------------
# output_size, set_num_threads, conv2d_workspace_bytes: the scalar entry points
# ---------------------------------------------------------------------------------------


@FUZZ
@given(
    st.lists(
        st.one_of(st.integers(-3, 9), st.sampled_from(HUGE_INTS + BAD_INT_TYPES)),
        min_size=4,
        max_size=4,
    )
)
def test_output_size_fuzz(args):
    got, error = run(F.output_size, *args)
    in_size, kernel, stride, padding = args
    valid = (
        int_is_valid(in_size, 0)
        and int_is_valid(kernel, 1)
        and int_is_valid(stride, 1)
        and int_is_valid(padding, 0)
        and in_size + 2 * padding <= 2**48
    )
    if not valid:
        check_error(error, "output_size", {"in_size", "kernel", "stride", "padding"})
        return
    assert error is None and got == (in_size + 2 * padding - kernel) // stride + 1


@FUZZ
@given(st.one_of(st.integers(-3, 4), st.sampled_from(HUGE_INTS + BAD_INT_TYPES + [1025])))
def test_set_num_threads_fuzz(n):
    before = cnnbp.get_num_threads()
    try:
        _, error = run(cnnbp.set_num_threads, n)
        if int_is_valid(n, 1) and n <= 1024:
            assert error is None and cnnbp.get_num_threads() == n
        else:
            check_error(error, "set_num_threads", {"n"})
            assert cnnbp.get_num_threads() == before
    finally:
        cnnbp.set_num_threads(before)


@FUZZ
@given(
    st.lists(st.one_of(st.integers(0, 40), st.sampled_from(HUGE_INTS)), min_size=4, max_size=4),
    st.lists(st.one_of(st.integers(0, 5), st.sampled_from(HUGE_INTS)), min_size=4, max_size=4),
    st.one_of(st.integers(-1, 3), st.sampled_from(HUGE_INTS)),
    st.one_of(st.integers(-1, 3), st.sampled_from(HUGE_INTS)),
    st.sampled_from(["float32", "float64", np.float32, "int8", "bogus", None]),
)
def test_conv2d_workspace_bytes_fuzz(x_shape, w_shape, stride, padding, dtype):
    got, error = run(F.conv2d_workspace_bytes, x_shape, w_shape, stride, padding, dtype)
    if error is not None:
        check_error(
            error,
            "conv2d_workspace_bytes",
            {"x_shape", "w_shape", "input", "weight", "stride", "padding", "output", "dtype"},
        )
        return
    # it worked: the same shapes are a valid convolution, and the workspace is bounded
    assert isinstance(got, int) and 0 <= got < 2**62
    N, C, H, W = x_shape
    K, _, R, S = w_shape
    assert min(x_shape + w_shape) >= 1 and w_shape[1] == C and stride >= 1 and padding >= 0


# ---------------------------------------------------------------------------------------
# layers: numpy in, numpy out, the kernels' results and errors
# ---------------------------------------------------------------------------------------


@st.composite
def networks(draw):
    dtype = draw(st.sampled_from(DTYPES))
    C, K = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H = W = draw(st.integers(4, 7))
    k = draw(st.integers(1, 3))
    stride, padding = draw(st.integers(1, 2)), draw(st.integers(0, 1))
    activation = draw(st.sampled_from([nn.ReLU, nn.Sigmoid]))
    pool = draw(st.sampled_from([None, (2, None, 0), (3, 1, 1), (2, 1, 0)]))
    P = (H + 2 * padding - k) // stride + 1
    layers = [
        nn.Conv2d(C, K, k, stride=stride, padding=padding, bias=draw(st.booleans()), dtype=dtype),
        activation(),
    ]
    if pool is not None:
        pk, ps, pp = pool
        if P + 2 * pp >= pk:
            layers.append(nn.MaxPool2d(pk, ps, pp))
            P = (P + 2 * pp - pk) // (ps or pk) + 1
    out = draw(st.integers(1, 3))
    layers += [nn.Flatten(), nn.Linear(K * P * P, out, bias=draw(st.booleans()), dtype=dtype)]
    loss = draw(st.sampled_from([nn.BCELoss, nn.BCEWithLogitsLoss, nn.CrossEntropyLoss]))
    if loss is nn.BCELoss:
        layers.append(nn.Sigmoid())
    return dict(model=nn.Sequential(*layers), dtype=dtype, C=C, H=H, W=W, out=out, loss=loss)


def manual_forward_backward(layers, x, g):
    """The functional API applied layer by layer: what the layers must compute."""
    outs, grads = [x], {}
    for layer in layers:
        h = outs[-1]
        if isinstance(layer, nn.Conv2d):
            b = None if layer.bias is None else layer.bias.data
            outs.append(F.conv2d(h, layer.weight.data, b, layer.stride, layer.padding))
        elif isinstance(layer, nn.Linear):
            b = None if layer.bias is None else layer.bias.data
            outs.append(F.linear(h, layer.weight.data, b))
        elif isinstance(layer, nn.MaxPool2d):
            outs.append(F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding)[0])
        elif isinstance(layer, nn.ReLU):
            outs.append(F.relu(h))
        elif isinstance(layer, nn.Sigmoid):
            outs.append(F.sigmoid(h))
        else:
            outs.append(F.flatten(h))
    for i in reversed(range(len(layers))):
        layer, h, y = layers[i], outs[i], outs[i + 1]
        if isinstance(layer, nn.Conv2d):
            g, dw, db = F.conv2d_backward(g, h, layer.weight.data, layer.stride, layer.padding)
            grads[i] = (dw, db)
        elif isinstance(layer, nn.Linear):
            g, dw, db = F.linear_backward(g, h, layer.weight.data)
            grads[i] = (dw, db)
        elif isinstance(layer, nn.MaxPool2d):
            _, idx = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding)
            g = F.max_pool2d_backward(g, idx, h.shape)
        elif isinstance(layer, nn.ReLU):
            g = F.relu_backward(g, h)
        elif isinstance(layer, nn.Sigmoid):
            g = F.sigmoid_backward(g, y)
        else:
            g = F.flatten_backward(g, h.shape)
    return outs[-1], g, grads


# a model's input is checked by the model ("[Sequential] input: ...") or its first kernel
MODEL_OPS = {"conv2d", "Sequential"}


@pytest.mark.parametrize("brk", [None, "channels", "dtype", "rank", "none", "target"], ids=str)
@settings(PER_BREAK, max_examples=15)
@given(networks(), SEEDS, st.integers(1, 3), st.data())
def test_layers_fuzz(brk, net, seed, N, data):
    rng = np.random.default_rng(seed)
    model, dtype = net["model"], net["dtype"]
    x = make_array(data.draw, rng, (N, net["C"], net["H"], net["W"]), dtype, "normal")
    loss_fn = net["loss"]()
    if net["loss"] is nn.CrossEntropyLoss:
        target = rng.integers(0, net["out"], N)
    else:
        target = rng.integers(0, 2, (N, net["out"])).astype(dtype)
    if brk == "channels":
        x = values(rng, (N, net["C"] + 1, net["H"], net["W"]), dtype, "normal")
        _, error = run(model, x)
        check_error(error, MODEL_OPS, {"weight"}, (ValueError,))
        return
    if brk == "dtype":
        bad = data.draw(st.sampled_from(BAD_DTYPES + [F64 if dtype == F32 else F32]))
        _, error = run(model, np.asarray(x).astype(bad))
        check_error(error, MODEL_OPS, {"input", "weight"}, (TypeError,))
        return
    if brk == "rank":  # (C, H, W) is unbatched: (H, W) is no input
        _, error = run(model, np.asarray(x)[0, 0])
        check_error(error, MODEL_OPS, {"input"}, (ValueError,))
        return
    if brk == "none":
        _, error = run(model, None)
        check_error(error, MODEL_OPS, {"input"}, (TypeError,))
        return
    out = model(x)
    if brk == "target":
        bad_target = np.zeros((N + 1,) + np.shape(target)[1:], np.asarray(target).dtype)
        _, error = run(loss_fn, out, bad_target)
        assert error is not None and isinstance(error, (ValueError, TypeError))
        assert re.match(
            r"^\[(binary_cross_entropy|binary_cross_entropy_with_logits|"
            r"cross_entropy)\] (target|labels): expected ",
            str(error),
        ), str(error)
        return
    layers = list(model)
    g = rng.standard_normal(out.shape).astype(dtype)
    want_out, want_dx, want_grads = manual_forward_backward(layers, np.asarray(x), g)
    tol = TOL["conv2d"][dtype]
    check_array(out, want_out.shape, dtype)
    assert_close(out, want_out, tol, "output")
    model.zero_grad()
    dx = model.backward(g)
    check_array(dx, np.shape(x), dtype)
    assert_close(dx, want_dx, tol, "dx")
    for i, (dw, db) in want_grads.items():
        assert_close(layers[i].weight.grad, dw, tol, f"{i}.weight.grad")
        if layers[i].bias is not None:
            assert_close(layers[i].bias.grad, db, tol, f"{i}.bias.grad")
    # the loss layer: the functional loss and its gradient, scaled by grad_loss
    loss = loss_fn(out, target)
    fn = {
        nn.BCELoss: "binary_cross_entropy",
        nn.BCEWithLogitsLoss: "binary_cross_entropy_with_logits",
        nn.CrossEntropyLoss: "cross_entropy",
    }[net["loss"]]
    assert isinstance(loss, float)
    assert_close(loss, getattr(F, fn)(out, target), TOL["loss"][dtype])
    assert_close(loss_fn.backward(), getattr(F, fn + "_backward")(out, target), TOL["loss"][dtype])
    assert_close(
        loss_fn.backward(2.0), 2 * getattr(F, fn + "_backward")(out, target), TOL["loss"][dtype]
    )


# ---------------------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------------------

HYPER = [0.0, 1e-3, 0.1, 0.9, 1.0, -0.1, -1e-12, float("nan")]


@settings(FUZZ, max_examples=80)
@given(
    SEEDS,
    st.sampled_from(DTYPES),
    st.sampled_from(["SGD", "Adam"]),
    st.sampled_from(HYPER),
    st.sampled_from(HYPER),
    st.sampled_from(HYPER),
    st.sampled_from([0.0, 0.5, -0.5]),
    st.booleans(),
    st.sampled_from(
        [
            (0.9, 0.999),
            (0.0, 0.0),
            (0.5, 0.9),
            (1.0, 0.9),
            (0.9, 1.0),
            (-0.1, 0.9),
            (float("nan"), 0.9),
        ]
    ),
    st.sampled_from([1e-8, 0.0, 1.0, -1e-8]),
    st.sampled_from(["all", "some", "fortran"]),
)
def test_optimizers_fuzz(
    seed, dtype, kind, lr, momentum, weight_decay, dampening, nesterov, betas, eps, grads
):
    rng = np.random.default_rng(seed)
    nn.manual_seed(seed % 1000)
    model = nn.Sequential(nn.Linear(3, 2, dtype=dtype), nn.ReLU(), nn.Linear(2, 2, dtype=dtype))
    params = model.parameters()
    if kind == "SGD":
        valid = all(v >= 0 for v in (lr, momentum, weight_decay)) and not (
            nesterov and (momentum <= 0 or dampening != 0)
        )

        def make():
            return optim.SGD(
                params,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                dampening=dampening,
                nesterov=nesterov,
            )

        names = {"lr", "momentum", "weight_decay", "nesterov"}
    else:
        valid = all(v >= 0 for v in (lr, eps, weight_decay)) and all(0 <= b < 1 for b in betas)

        def make():
            return optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

        names = {"lr", "eps", "weight_decay", "betas"}
    opt, error = run(make)
    if not valid:
        check_error(error, kind, names, (ValueError,))
        return
    assert error is None, f"{type(error).__name__}: {error}"
    state = [dict(p=p.data.astype(F64), buf=None, m=0.0, v=0.0, t=0) for p in params]
    for _ in range(3):
        for i, p in enumerate(params):
            skip = grads == "some" and i % 2 == 1
            g = None if skip else rng.standard_normal(p.data.shape).astype(dtype)
            if g is not None and grads == "fortran":
                g = np.asfortranarray(g)
            p.grad = g
            if g is None:
                continue
            s = state[i]
            if kind == "SGD":
                s["p"], s["buf"] = ref.sgd_step(
                    s["p"], g, s["buf"], lr, momentum, dampening, weight_decay, nesterov
                )
            else:
                s["p"], s["m"], s["v"], s["t"] = ref.adam_step(
                    s["p"], g, s["m"], s["v"], s["t"], lr, betas, eps, weight_decay
                )
        opt.step()
        for i, p in enumerate(params):
            assert p.data.dtype == dtype and p.data.shape == state[i]["p"].shape
            # float32 rounds every operation: a few ulps of the largest value per step
            assert_close(p.data, state[i]["p"], 1e-5 if dtype == F32 else 1e-12, f"param {i}")


# ---------------------------------------------------------------------------------------
# load_state_dict
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        None,
        "drop",
        "extra",
        "rename",
        "shape",
        "dtype",
        "object",
        "list",
        "string",
        "scalar",
        "fortran",
        "negative",
        "broadcast",
        "nan",
        "readonly",
        "swapped",
    ],
    ids=str,
)
@settings(PER_BREAK, max_examples=6)
@given(
    SEEDS,
    st.sampled_from(DTYPES),
    st.sampled_from(["0.weight", "0.bias", "4.weight", "4.bias"]),
)
def test_load_state_dict_fuzz(change, seed, dtype, key):
    rng = np.random.default_rng(seed)
    model = seed_network(dtype, channels=2)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    new = {k: values(rng, v.shape, dtype, "normal") for k, v in before.items()}
    value = new[key]
    outcome = "ok"
    if change == "drop":
        del new[key]
        outcome = KeyError
    elif change == "extra":
        new["9.weight"] = value
        outcome = KeyError
    elif change == "rename":
        new["x" + key] = new.pop(key)
        outcome = KeyError
    elif change == "shape":
        new[key] = values(rng, value.shape + (1,), dtype, "normal")
        outcome = ValueError
    elif change == "dtype":
        new[key] = value.astype(rng.choice([F64 if dtype == F32 else F32, np.float16, np.int64]))
        outcome = TypeError
    elif change == "object":
        new[key] = value.astype(object)
        outcome = TypeError
    elif change == "string":
        new[key] = "abc"
        outcome = (ValueError, TypeError)
    elif change == "scalar":
        new[key] = dtype(1)
        outcome = ValueError
    elif change == "list":
        new[key] = value.tolist()  # becomes float64
        outcome = "ok" if dtype == F64 else TypeError
    elif change == "fortran":
        new[key] = np.asfortranarray(value)
    elif change == "negative":
        new[key] = relayout(value, "negative")
    elif change == "broadcast":
        new[key] = broadcast_some_axis(value, rng)
    elif change == "nan":
        new[key] = np.full_like(value, np.nan)
    elif change == "readonly":
        new[key] = relayout(value, "readonly")
    elif change == "swapped":
        new[key] = relayout(value, "swapped")
        outcome = TypeError  # >f4 is not the model's float32
    result, error = run(model.load_state_dict, new) if outcome is not KeyError else (None, None)
    if outcome is KeyError:
        with pytest.raises(KeyError, match=r"^.\[load_state_dict\] expected keys"):
            model.load_state_dict(new)
    elif outcome != "ok":
        assert isinstance(error, outcome), f"{type(error).__name__}: {error}"
        assert str(error).startswith("[load_state_dict] " + key + ": expected "), str(error)
    else:
        assert error is None, f"{type(error).__name__}: {error}"
    state = model.state_dict()
    if outcome != "ok":  # a refused load changes nothing
        for k, v in before.items():
            np.testing.assert_array_equal(state[k], v)
        return
    for k, v in new.items():
        got = state[k]
        assert got.dtype == dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, np.asarray(v, dtype=dtype))
    # the model holds copies: changing the source later changes nothing
    for p in model.parameters():
        assert p.data.flags.writeable and p.data.flags.c_contiguous
    source = new[key]
    if isinstance(source, np.ndarray) and source.flags.writeable and source.size:
        source.reshape(-1)[0] = 12345
        assert model.state_dict()[key].reshape(-1)[0] != 12345


# ---------------------------------------------------------------------------------------
# model files: mutated bytes and random architectures load or are refused with "[load]"
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file_bytes(tmp_path_factory):
    nn.manual_seed(3)
    model = seed_network(channels=2)
    path = tmp_path_factory.mktemp("model") / "model.npz"
    model.save(path)
    return path.read_bytes()


def load_or_refuse(tmp_path, content):
    path = tmp_path / "fuzzed.npz"
    path.write_bytes(content)
    try:
        model = cnnbp.load(path)
    except ValueError as error:
        assert str(error).startswith("[load] "), str(error)
        return None
    return model


@settings(FUZZ, max_examples=80)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "truncate", "insert", "delete", "set"]),
            st.floats(0, 1, exclude_max=True),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_model_files_load_or_are_refused(tmp_path_factory, model_file_bytes, mutations):
    data = bytearray(model_file_bytes)
    for kind, where, byte in mutations:
        i = int(where * len(data))
        if kind == "flip":
            data[i] ^= 1 << (byte % 8)
        elif kind == "truncate":
            del data[i:]
        elif kind == "insert":
            data[i:i] = bytes([byte]) * (1 + byte % 16)
        elif kind == "delete":
            del data[i : i + 1 + byte % 16]
        else:
            data[i] = byte
        if not data:
            break
    model = load_or_refuse(tmp_path_factory.mktemp("fuzz"), bytes(data))
    if model is not None:  # a mutation in bytes no reader looks at (zip comment, padding)
        x = np.ones((1, 1, 6, 6), np.float32)
        assert model(x).shape == (1, 1)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(FUZZ, max_examples=80)
@given(
    st.integers(0, 6),
    st.sampled_from(
        [
            "type",
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "bias",
            "in_features",
            "out_features",
            None,
        ]
    ),
    json_values,
    st.sampled_from([None, "format", "version", "dtype", "layers"]),
)
def test_random_architectures_load_or_are_refused(
    tmp_path_factory, model_file_bytes, layer, field, value, top
):
    with zipfile.ZipFile(io.BytesIO(model_file_bytes)) as archive:
        arrays = {name[:-4]: np.load(io.BytesIO(archive.read(name))) for name in archive.namelist()}
    arch = json.loads(arrays["architecture"].tobytes())
    if top is not None:
        arch[top] = value
    elif field is not None and layer < len(arch["layers"]):
        arch["layers"][layer][field] = value
    elif layer < len(arch["layers"]):
        arch["layers"][layer] = value
    arrays["architecture"] = np.frombuffer(json.dumps(arch).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    model = load_or_refuse(tmp_path_factory.mktemp("arch"), buffer.getvalue())
    if model is not None:  # then it is the architecture (fields it does not know ignored)
        assert len(model) == len(arch["layers"])
        for layer, spec in zip(model, arch["layers"]):
            assert layer.config() == {k: v for k, v in spec.items() if k in layer.config()}


# Python-level argument checks of nn.py and optim.py (constructors, state dicts, the
# gradients the optimizers are handed): each is an "[op] name: expected ..." error.
# ---------------------------------------------------------------------------------------

ARGUMENT_ERRORS = [
    ("Conv2d kernel_size '3'", lambda: nn.Conv2d(1, 1, "3"), TypeError),
    ("Conv2d in_channels 2.5", lambda: nn.Conv2d(2.5, 1, 3), TypeError),
    ("Linear in_features 2^64", lambda: nn.Linear(2**64, 1), ValueError),
    ("MaxPool2d kernel_size 2.0", lambda: nn.MaxPool2d(2.0), TypeError),  # as F.max_pool2d
    ("AvgPool2d stride '2'", lambda: nn.AvgPool2d(2, stride="2"), TypeError),
    ("SGD lr '0.1'", lambda: optim.SGD(nn.Linear(2, 1).parameters(), lr="0.1"), TypeError),
    ("SGD lr None", lambda: optim.SGD(nn.Linear(2, 1).parameters(), lr=None), TypeError),
    (
        "Adam betas of one",
        lambda: optim.Adam(nn.Linear(2, 1).parameters(), betas=(0.9,)),
        ValueError,
    ),
    (
        "load_state_dict ragged list",
        lambda: nn.Linear(2, 1).load_state_dict({"weight": [[1.0], [2.0, 3.0]], "bias": [0.0]}),
        ValueError,
    ),
    ("load_state_dict None", lambda: nn.Linear(2, 1).load_state_dict(None), TypeError),
    (
        "SGD step, gradient of another shape",
        lambda: sgd_step_with_grad(np.ones(3, F32)),
        ValueError,
    ),
    (
        "Adam step, gradient of another shape",
        lambda: sgd_step_with_grad(np.ones(3, F32), "Adam"),
        ValueError,
    ),
]


def sgd_step_with_grad(grad, kind="SGD"):
    """A step with a (3,) gradient for a (2, 3) weight: refused when it is assigned."""
    model = nn.Linear(3, 2)
    model.parameters()[0].grad = grad
    getattr(optim, kind)(model.parameters(), lr=0.5).step()


@pytest.mark.parametrize("name, call, kind", ARGUMENT_ERRORS, ids=[g[0] for g in ARGUMENT_ERRORS])
def test_layer_and_optimizer_arguments_are_checked(name, call, kind):
    _, error = run(call)
    assert isinstance(error, kind), f"{type(error).__name__}: {error}"
    assert re.match(r"^\[\w+\] [\w.]+: expected ", str(error)), f"{type(error).__name__}: {error}"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: nn.Conv2d(1, 1, 0), "[Conv2d] kernel_size: expected >= 1, got 0"),
        (lambda: nn.Conv2d(0, 1, 3), "[Conv2d] in_channels: expected >= 1, got 0"),
        (lambda: nn.Conv2d(1, -1, 3), "[Conv2d] out_channels: expected >= 1, got -1"),
        (lambda: nn.Linear(0, 1), "[Linear] in_features: expected >= 1, got 0"),
        (lambda: nn.Linear(2, -1), "[Linear] out_features: expected >= 1, got -1"),
        # weights whose element count overflows int64 (2^32 * (2^32 + 1) wrapped to 2^32 and
        # sized a 16 GiB buffer for a (2^32, 2^32 + 1) weight) or cannot exist
        (
            lambda: nn.Linear(2**32 + 1, 2**32),
            "[numel] shape: expected at most 2^48 elements, got shape (4294967296, 4294967297)",
        ),
        (lambda: nn.Linear(2**62, 2**62), "[numel] shape: expected at most 2^48 elements"),
        (lambda: nn.Conv2d(2**20, 2**20, 2**20), "[numel] shape: expected at most 2^48 elements"),
        (lambda: nn.Conv2d(2, 1, (2**24, 2**24)), "[numel] shape: expected at most 2^48 elements"),
        # the weight's size is checked before fan_in = in_channels * kernel_h * kernel_w
        (lambda: nn.Conv2d(1, 1, (2**32, 2**32)), "[numel] shape: expected at most 2^48 elements"),
    ],
    ids=[
        "kernel 0",
        "in 0",
        "out -1",
        "in_features 0",
        "out_features -1",
        "2^64 wraps",
        "2^124",
        "2^80",
        "2^64",
        "2^64 kernel",
    ],
)
def test_layer_constructors_refuse_sizes(call, message):
    _, error = run(call)
    assert isinstance(error, ValueError), f"{type(error).__name__}: {error}"
    assert str(error).startswith(message), str(error)
