"""Every validation error: the exception type and the message (op prefix and key words).

Bad sizes, shapes and parameter values raise ValueError; wrong types and dtypes raise
TypeError; state_dict keys raise KeyError. Each error is raised before any kernel runs, so
the interpreter survives it (the next test runs in the same process).
"""

import re

import numpy as np
import pytest
from cnnbp import functional as F
from cnnbp import nn, optim
from cnnbp import reference as ref
from conftest import seed_network
from ops import OPS, all_errors

F32, F64 = np.float32, np.float64


def msg(text):
    """A regex matching the message from its start, with the literal text escaped."""
    return "^" + re.escape(text)


def raises(exception, text):
    """pytest.raises for an exception whose message starts with the literal text."""
    return pytest.raises(exception, match=msg(text))


def conv_args(dtype=F64):
    return np.ones((2, 3, 6, 6), dtype), np.ones((4, 3, 3, 3), dtype), np.zeros(4, dtype)


# ---------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# every op of the table: its invalid-argument cases, and the dtype / None / mixed-dtype
# refusals of each of its array arguments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", all_errors())
def test_invalid_arguments_are_refused(bad):
    with pytest.raises(bad.exception, match=bad.match):
        bad.call()


def calls(op, dtype=F64):
    """(name, call, array arguments) of the op's forward and backward, on one sample."""
    s = op.sample(op.cases[1], dtype, "smooth")  # no NaN to cast to the other dtypes
    return s, [
        (op.name, op.forward, op.forward_args),
        (op.backward_name, op.backward, op.backward_args),
    ]


@pytest.mark.parametrize("op", OPS, ids=repr)
def test_float_arguments_refuse_other_dtypes(op):
    s, named_calls = calls(op)
    for fn, call, args in named_calls:
        for arg in args:
            if arg.kind not in ("float", "optional"):
                continue
            for dtype in BAD_DTYPES:
                bad = s.replace(**{arg.key: s[arg.key].astype(dtype)})
                name = dtype_name(dtype)
                with raises(
                    TypeError, f"[{fn}] {arg.name}: expected float32 or float64, got {name}"
                ):
                    call(F, bad)


@pytest.mark.parametrize("op", OPS, ids=repr)
def test_array_arguments_refuse_none(op):
    s, named_calls = calls(op)
    for fn, call, args in named_calls:
        for arg in args:
            if arg.kind in ("float", "int", "bool"):  # "optional" takes None: no bias
                with raises(TypeError, f"[{fn}] {arg.name}: expected an array, got None"):
                    call(F, s.replace(**{arg.key: None}))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("op", OPS, ids=repr)
def test_float_arguments_refuse_the_other_float_dtype(op, dtype):
    other = F64 if dtype == F32 else F32
    s, named_calls = calls(op, dtype)
    for fn, call, args in named_calls:
        floats = [a for a in args if a.kind in ("float", "optional")]
        for arg in floats[1:]:  # the first array argument sets the dtype of the call
            with raises(
                TypeError,
                f"[{fn}] {arg.name}: expected {dtype_name(dtype)} like the first array "
                f"argument, got {dtype_name(other)}",
            ):
                call(F, s.replace(**{arg.key: s[arg.key].astype(other)}))
    if op.name == "conv2d":  # a list becomes float64: mixing it with float32 is the same error
        s = op.sample(op.cases[1], F32)
        with raises(
            TypeError, "[conv2d] bias: expected float32 like the first array argument, got float64"
        ):
            F.conv2d(s.x, s.w, s.b.tolist())


def test_non_arrays_are_refused():
    x, w, b = conv_args()
    with raises(TypeError, "[conv2d] input: expected an array, got list"):
        F.conv2d([[[[1.0, 2.0], [3.0]]]], w, b)  # ragged
    with raises(TypeError, "[conv2d] input: expected float32 or float64, got <U3"):
        F.conv2d("abc", w, b)
    with raises(TypeError, "[conv2d] input: expected float32 or float64, got object"):
        F.conv2d(object(), w, b)
    with raises(TypeError, "[avg_pool2d] input: expected float32 or float64, got <U3"):
        F.avg_pool2d("abc", 2)


def test_conv2d_kernel_exactly_as_large_as_the_padded_input_is_fine():
    y = F.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 6, 6)), np.zeros(1), padding=1)
    assert y.shape == (1, 1, 1, 1)


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


@pytest.mark.parametrize("bad", BAD_PAIRS, ids=repr)
@pytest.mark.parametrize("name", ["stride", "padding"])
def test_conv2d_stride_and_padding_of_wrong_type(name, bad):
    if name == "padding" and isinstance(bad, str):
        return  # padding may be a string: 'same' and 'valid' (others are ValueErrors)
    x, w, b = conv_args()
    expected = msg(f"[conv2d] {name}: expected an int or a pair of ints, got ")
    with pytest.raises(TypeError, match=expected):
        F.conv2d(x, w, b, **{name: bad})
    dy = np.ones((2, 4, 4, 4))
    with raises(TypeError, f"[conv2d_backward] {name}: expected an int or a pair"):
        F.conv2d_backward(dy, x, w, **{name: bad})


def test_stride_given_as_a_0d_integer_array():
    # np.array(2) is an integer (it has __index__): accept it like 2, or refuse it with
    # the op-prefixed TypeError that every other bad stride gets
    x, w, b = conv_args()
    try:
        y = F.conv2d(x, w, b, stride=np.array(2))
    except TypeError as e:
        assert re.match(r"^\[conv2d\] stride: expected an int or a pair of ints", str(e)), str(e)
    else:
        np.testing.assert_array_equal(y, F.conv2d(x, w, b, stride=2))


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


# ---------------------------------------------------------------------------------------
# max_pool2d
# ---------------------------------------------------------------------------------------


def test_pool_padding_of_exactly_half_the_kernel_is_fine():
    for pool in (F.max_pool2d, F.avg_pool2d):
        y = pool(np.ones((1, 1, 4, 4)), 2, 2, 1)
        assert (y[0] if isinstance(y, tuple) else y).shape == (1, 1, 3, 3)
        y = pool(np.ones((1, 1, 4, 4)), 3, 2, 1)
        assert (y[0] if isinstance(y, tuple) else y).shape == (1, 1, 2, 2)
        y = pool(np.ones((1, 1, 3, 3)), 5, 1, 2)
        assert (y[0] if isinstance(y, tuple) else y).shape == (1, 1, 3, 3)
    assert F.avg_pool2d_backward(np.ones((1, 1, 3, 3)), (1, 1, 3, 3), 5, 1, 2).shape == (1, 1, 3, 3)


# stride=None is no error: it means "the kernel size"
POOL_BAD_PARAMETERS = [
    (name, bad)
    for name in ("kernel_size", "stride", "padding")
    for bad in BAD_PAIRS
    if not (name == "stride" and bad is None)
]


@pytest.mark.parametrize("name, bad", POOL_BAD_PARAMETERS, ids=repr)
@pytest.mark.parametrize("pool", ["max_pool2d", "avg_pool2d"])
def test_pool_parameters_of_wrong_type(pool, name, bad):
    args = dict(kernel_size=2, stride=None, padding=0)
    args[name] = bad
    with raises(TypeError, f"[{pool}] {name}: expected an int or a pair of ints, got "):
        getattr(F, pool)(np.ones((1, 1, 4, 4)), **args)
    if pool == "avg_pool2d":
        with raises(TypeError, f"[avg_pool2d_backward] {name}: expected an int or a pair of ints"):
            F.avg_pool2d_backward(np.ones((1, 1, 2, 2)), (1, 1, 4, 4), **args)


# ---------------------------------------------------------------------------------------
# max_pool2d_backward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_index", [-1, 16, 17, -(2**40), 2**40, 2**62, -(2**63)])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_max_pool2d_backward_refuses_indices_out_of_range(bad_index, dtype):
    # a write through any of these would land outside dx (and crash or corrupt memory)
    x = np.arange(16, dtype=dtype).reshape(1, 1, 4, 4)
    y, idx = F.max_pool2d(x, 2)
    dy = np.ones_like(y)
    for position in [(0, 0, 0, 0), (0, 0, 1, 1)]:
        bad = idx.copy()
        bad[position] = bad_index
        expected = (
            "[max_pool2d_backward] indices: expected values in [0, 16) (flat positions "
            f"in an H*W input plane), got {bad_index} at flat position "
        )
        with raises(ValueError, expected):
            F.max_pool2d_backward(dy, bad, x.shape)
    # the indices of another plane size: 16 is valid for a 5x5 plane, not for 4x4
    with raises(ValueError, "[max_pool2d_backward] indices: expected values in [0, 4)"):
        F.max_pool2d_backward(dy, idx, (1, 1, 2, 2))
    # the module is still fine and the good indices still work
    np.testing.assert_array_equal(
        F.max_pool2d_backward(dy, idx, x.shape).reshape(-1)[idx.reshape(-1)], 1
    )


def test_max_pool2d_backward_refuses_unsigned_indices_that_wrap():
    dy = np.ones((1, 1, 2, 2))
    idx = np.full((1, 1, 2, 2), np.iinfo(np.uint64).max, np.uint64)
    with raises(ValueError, "[max_pool2d_backward] indices: expected values in [0, 16)"):
        F.max_pool2d_backward(dy, idx, (1, 1, 4, 4))


@pytest.mark.parametrize(
    "bad",
    ["abcd", 16, 4.0, None, (1, 1, 4.0, 4), (1, 1, "4", 4), (1, 1, None, 4), (1, True, 4, 4)],
    ids=repr,
)
def test_pool_backward_x_shape_of_wrong_type(bad):
    dy, idx = np.ones((1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.int64)
    with raises(TypeError, "[max_pool2d_backward] x_shape: expected a sequence of ints, got "):
        F.max_pool2d_backward(dy, idx, bad)
    with raises(TypeError, "[avg_pool2d_backward] x_shape: expected a sequence of ints, got "):
        F.avg_pool2d_backward(dy, bad, 2)


def test_max_pool2d_backward_x_shape_may_be_any_int_sequence():
    dy, idx = np.ones((1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.int64)
    want = F.max_pool2d_backward(dy, idx, (1, 1, 4, 4))
    for shape in ([1, 1, 4, 4], np.array([1, 1, 4, 4]), (np.int64(1), 1, np.int32(4), 4)):
        np.testing.assert_array_equal(F.max_pool2d_backward(dy, idx, shape), want)


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float32, np.complex128, np.bool_, object], ids=dtype_name
)
def test_max_pool2d_backward_indices_must_be_integers(dtype):
    dy = np.ones((1, 1, 2, 2))
    name = dtype_name(dtype)
    with raises(TypeError, f"[max_pool2d_backward] indices: expected an integer array, got {name}"):
        F.max_pool2d_backward(dy, np.zeros((1, 1, 2, 2), dtype), (1, 1, 4, 4))


# ---------------------------------------------------------------------------------------
# relu, sigmoid
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------

BCE_OPS = ["binary_cross_entropy", "binary_cross_entropy_backward"]


@pytest.mark.parametrize("op", BCE_OPS)
@pytest.mark.parametrize(
    "bad, shown",
    [
        (1.5, "1.5"),
        (-0.25, "-0.25"),
        (1.0 + 1e-6, "1.00000"),
        (np.nan, "nan"),
        (np.inf, "inf"),
        (-np.inf, "-inf"),
    ],
    ids=["1.5", "-0.25", "1+1e-6", "nan", "inf", "-inf"],
)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_binary_cross_entropy_refuses_non_probabilities(op, bad, shown, dtype):
    a = np.array([[0.5, 0.25], [0.75, 0.5]], dtype)
    a[1, 0] = bad
    y = np.ones((2, 2), dtype)
    expected = (
        re.escape(f"[{op}] input: expected probabilities in [0, 1], got ")
        + r"-?"
        + re.escape(shown.lstrip("-"))
        + r"\S* at flat position 2"
    )
    with pytest.raises(ValueError, match="^" + expected):
        getattr(F, op)(a, y)


@pytest.mark.parametrize("op", BCE_OPS)
def test_binary_cross_entropy_accepts_the_closed_interval(op):
    # 0, -0 and 1 are probabilities: no error, finite results (the logs are clamped), the
    # oracle's numbers
    a = np.array([0.0, 1.0, -0.0, 0.5])
    y = np.array([0.0, 1.0, 0.0, 1.0])
    got = getattr(F, op)(a, y)
    want = getattr(ref, op)(a, y)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("op", ["cross_entropy", "cross_entropy_backward"])
def test_cross_entropy_label_errors(op):
    fn = getattr(F, op)
    z = np.zeros((3, 4))
    for bad in ([0, 4, 1], [0, 1, 7], [-1, 0, 0], [0, 0, -4]):
        where = next(i for i, v in enumerate(bad) if not 0 <= v < 4)
        with raises(
            ValueError,
            f"[{op}] labels: expected class indices in [0, 4), got "
            f"{bad[where]} at position {where}",
        ):
            fn(z, np.array(bad))
    for dtype in (np.float64, np.float32, np.bool_, np.complex128, object):
        with raises(
            TypeError, f"[{op}] labels: expected an integer array, got {dtype_name(dtype)}"
        ):
            fn(z, np.zeros(3, dtype))
    with raises(TypeError, f"[{op}] labels: expected an integer array, got float64"):
        fn(z, [0, 1.0, 2])


# ---------------------------------------------------------------------------------------
# dropout: p and seed
# ---------------------------------------------------------------------------------------


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


def test_dropout_seed_and_mask_errors():
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
    for dtype in (np.float64, np.float32, np.int64, np.uint8, np.int8, object):
        with raises(
            TypeError, f"[dropout_backward] mask: expected a bool array, got {dtype_name(dtype)}"
        ):
            F.dropout_backward(np.ones(3), np.ones(3, dtype), 0.5)


# ---------------------------------------------------------------------------------------
# output_size
# ---------------------------------------------------------------------------------------


def test_output_size_errors():
    with raises(ValueError, "[output_size] kernel: expected >= 1, got 0"):
        F.output_size(5, 0)
    with raises(ValueError, "[output_size] stride: expected >= 1, got 0"):
        F.output_size(5, 3, 0)
    with raises(ValueError, "[output_size] stride: expected >= 1, got -1"):
        F.output_size(5, 3, -1)
    with raises(ValueError, "[output_size] padding: expected >= 0, got -1"):
        F.output_size(5, 3, 1, -1)


# ---------------------------------------------------------------------------------------
# layers, state_dict, optimizer
# ---------------------------------------------------------------------------------------


def test_load_state_dict_missing_and_unexpected_keys():
    model = seed_network()
    before = model.state_dict()
    good = model.state_dict()

    missing = dict(good)
    del missing["0.bias"]
    with pytest.raises(
        KeyError,
        match=re.escape(
            "[load_state_dict] expected keys ['0.weight', "
            "'0.bias', '4.weight', '4.bias'], got missing "
            "['0.bias'], unexpected []"
        ),
    ):
        model.load_state_dict(missing)

    extra = dict(good, **{"5.weight": np.ones(1, np.float32)})
    with pytest.raises(KeyError, match=re.escape("got missing [], unexpected ['5.weight']")):
        model.load_state_dict(extra)

    renamed = {k.replace("4.", "1."): v for k, v in good.items()}
    with pytest.raises(
        KeyError,
        match=re.escape("got missing ['4.weight', '4.bias'], unexpected ['1.weight', '1.bias']"),
    ):
        model.load_state_dict(renamed)

    with pytest.raises(KeyError, match=re.escape("[load_state_dict]")):
        model.load_state_dict({})

    for k, v in before.items():  # a refused load changes nothing
        np.testing.assert_array_equal(model.state_dict()[k], v)


def test_load_state_dict_wrong_shape_and_dtype():
    model = seed_network()
    before = model.state_dict()
    good = model.state_dict()

    bad = dict(good, **{"4.weight": np.ones((4, 1), np.float32)})
    with raises(ValueError, "[load_state_dict] 4.weight: expected shape (1, 4), got shape (4, 1)"):
        model.load_state_dict(bad)
    bad = dict(good, **{"0.bias": np.ones((), np.float32)})
    with raises(ValueError, "[load_state_dict] 0.bias: expected shape (1,), got shape ()"):
        model.load_state_dict(bad)

    bad = dict(good, **{"0.weight": good["0.weight"].astype(np.float64)})
    with raises(TypeError, "[load_state_dict] 0.weight: expected float32, got float64"):
        model.load_state_dict(bad)
    bad = dict(good, **{"4.bias": np.ones(1, np.int64)})
    with raises(TypeError, "[load_state_dict] 4.bias: expected float32, got int64"):
        model.load_state_dict(bad)
    bad = dict(good, **{"4.bias": [0.5]})  # a list becomes float64
    with raises(TypeError, "[load_state_dict] 4.bias: expected float32, got float64"):
        model.load_state_dict(bad)

    # the first parameters were fine and the last one was not: nothing was copied
    bad = {k: v + 1 for k, v in good.items()}
    bad["4.bias"] = bad["4.bias"].astype(np.float64)
    with pytest.raises(TypeError):
        model.load_state_dict(bad)
    for k, v in before.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)

    model64 = seed_network(np.float64)
    with raises(TypeError, "[load_state_dict] 0.weight: expected float64, got float32"):
        model64.load_state_dict(good)


@pytest.mark.parametrize(
    "dtype", [int, np.int64, np.int32, np.float16, np.complex128, bool, "int8"], ids=repr
)
def test_layers_refuse_non_float_dtypes(dtype):
    name = str(np.dtype(dtype))
    with raises(TypeError, f"[nn] dtype: expected float32 or float64, got {name}"):
        nn.Conv2d(1, 1, 3, dtype=dtype)
    with raises(TypeError, f"[nn] dtype: expected float32 or float64, got {name}"):
        nn.Linear(2, 1, dtype=dtype)


def test_layers_refuse_inputs_of_the_other_dtype():
    conv = nn.Conv2d(1, 2, 3)  # float32 by default
    with raises(
        TypeError, "[conv2d] weight: expected float64 like the first array argument, got float32"
    ):
        conv(np.ones((1, 1, 5, 5)))
    lin = nn.Linear(3, 2, dtype=np.float64)
    with raises(
        TypeError, "[linear] weight: expected float32 like the first array argument, got float64"
    ):
        lin(np.ones((2, 3), np.float32))
    with raises(ValueError, "[conv2d] weight: expected 1 input channels (dim 1)"):
        nn.Conv2d(2, 2, 3)(np.ones((1, 1, 5, 5), np.float32))
    with raises(
        ValueError,
        "[max_pool2d] input: expected 3 dims (C, H, W) or 4 dims (N, C, H, W), got shape (5, 5)",
    ):
        nn.MaxPool2d(2)(np.ones((5, 5)))


def test_sequential_refuses_non_modules():
    with raises(TypeError, "[Sequential] layer 1: expected an nn.Module, got function"):
        nn.Sequential(nn.ReLU(), lambda x: x)
    with raises(TypeError, "[Sequential] layer 0: expected an nn.Module, got type"):
        nn.Sequential(nn.ReLU)


@pytest.mark.parametrize("loss_cls", [nn.BCELoss, nn.BCEWithLogitsLoss, nn.CrossEntropyLoss])
def test_loss_backward_before_forward(loss_cls):
    with raises(RuntimeError, f"[{loss_cls.__name__}] backward called before forward"):
        loss_cls().backward()


def test_loss_layers_pass_the_kernel_errors_through():
    with raises(ValueError, "[binary_cross_entropy] input: expected probabilities in [0, 1]"):
        nn.BCELoss()(np.array([1.5]), np.array([1.0]))
    with raises(ValueError, "[cross_entropy] labels: expected class indices in [0, 2), got 2"):
        nn.CrossEntropyLoss()(np.zeros((1, 2)), np.array([2]))
    with raises(TypeError, "[cross_entropy] labels: expected an integer array, got float64"):
        nn.CrossEntropyLoss()(np.zeros((1, 2)), np.array([1.0]))


def test_sgd_errors():
    params = nn.Linear(2, 1).parameters()
    for name in ("lr", "momentum", "weight_decay"):
        with raises(ValueError, f"[SGD] {name}: expected >= 0, got -0.5"):
            optim.SGD(params, **{name: -0.5})
        with raises(ValueError, f"[SGD] {name}: expected >= 0, got nan"):
            optim.SGD(params, **{name: float("nan")})
    with raises(
        ValueError, "[SGD] nesterov: expected momentum > 0 and dampening 0, got momentum 0.0"
    ):
        optim.SGD(params, lr=0.1, nesterov=True)
    with raises(
        ValueError,
        "[SGD] nesterov: expected momentum > 0 and dampening 0, got momentum 0.9, dampening 0.1",
    ):
        optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)


def test_everything_still_works_after_the_errors():
    # errors are exceptions raised before any kernel runs: nothing was left half done
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    y, idx = F.max_pool2d(x, 2)
    np.testing.assert_array_equal(y.reshape(-1), [5, 7, 13, 15])
    dx = F.max_pool2d_backward(np.ones_like(y), idx, x.shape)
    assert dx.sum() == 4
    np.testing.assert_array_equal(F.conv2d(x, np.ones((1, 1, 1, 1)), np.zeros(1)), x)
    np.testing.assert_array_equal(F.avg_pool2d(x, 2).reshape(-1), [2.5, 4.5, 10.5, 12.5])
    y, mask = F.dropout(x, 0.0)
    np.testing.assert_array_equal(y, x)
    assert F.tanh(np.zeros(2)).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------
# sizes: huge ints, overflowing products, copies that cannot be allocated
# ---------------------------------------------------------------------------------------

HUGE_INTS = [2**63, 2**70, -(2**63) - 1, -(2**70), np.uint64(2**64 - 1)]


@pytest.mark.parametrize("huge", HUGE_INTS, ids=str)
def test_ints_beyond_int64_are_value_errors(huge):
    # pybind11 would raise RuntimeError("Unable to cast Python instance ...")
    x, w, b = conv_args()
    shown = str(int(huge))
    for name in ("stride", "padding"):
        with raises(ValueError, f"[conv2d] {name}: expected a 64-bit integer, got {shown}"):
            F.conv2d(x, w, b, **{name: huge})
        with raises(ValueError, f"[conv2d] {name}: expected a 64-bit integer, got {shown}"):
            F.conv2d(x, w, b, **{name: (1, huge)})
        with raises(ValueError, f"[conv2d_backward] {name}: expected a 64-bit integer"):
            F.conv2d_backward(np.ones((2, 4, 4, 4)), x, w, **{name: huge})
    for name in ("kernel_size", "stride", "padding"):
        args = {"kernel_size": 2, name: huge}
        with raises(ValueError, f"[max_pool2d] {name}: expected a 64-bit integer, got {shown}"):
            F.max_pool2d(x, **args)
    with raises(
        ValueError, f"[max_pool2d_backward] x_shape: expected a 64-bit integer, got {shown}"
    ):
        F.max_pool2d_backward(
            np.ones((1, 1, 1, 1)), np.zeros((1, 1, 1, 1), np.int64), (1, 1, huge, 2)
        )
    for i, name in enumerate(("in_size", "kernel", "stride", "padding")):
        args = [5, 1, 1, 0]
        args[i] = huge
        with raises(ValueError, f"[output_size] {name}: expected a 64-bit integer, got {shown}"):
            F.output_size(*args)
    with raises(ValueError, "[conv2d_workspace_bytes] padding: expected a 64-bit integer"):
        F.conv2d_workspace_bytes((1, 1, 4, 4), (1, 1, 3, 3), 1, huge)


@pytest.mark.parametrize(
    "padding, expected",
    [
        (
            2**62,
            "[conv2d] padding: expected a padded size (size + 2 * padding) of at most 2^48, "
            "got 6 + 2 * 4611686018427387904",
        ),
        (2**63 - 1, "[conv2d] padding: expected a padded size"),
        (
            2**40,
            "[conv2d] output: expected at most 2^48 elements, got shape (2, 4, 2199023255556, "
            "2199023255556)",
        ),
        (
            (2**31, 2**30),
            "[conv2d] output: expected at most 2^48 elements, got shape "
            "(2, 4, 4294967300, 2147483652)",
        ),
    ],
)
def test_conv2d_sizes_that_overflow_are_refused_before_allocating(padding, expected):
    # before: NumPy's "array is too big" ValueError, or a padded size that wrapped negative
    x, w, b = conv_args()
    with raises(ValueError, expected):
        F.conv2d(x, w, b, padding=padding)
    with raises(ValueError, expected.replace("[conv2d]", "[conv2d_backward]")):
        F.conv2d_backward(np.ones((2, 4, 4, 4)), x, w, padding=padding)
    with raises(ValueError, expected.replace("[conv2d]", "[conv2d_workspace_bytes]")):
        F.conv2d_workspace_bytes(x.shape, w.shape, 1, padding)


def test_max_pool2d_and_output_size_extremes():
    x = np.ones((1, 1, 4, 4))
    with raises(
        ValueError,
        "[max_pool2d] padding: expected a padded size (size + 2 * padding) "
        "of at most 2^48, got 4 + 2 * 4611686018427387903",
    ):
        F.max_pool2d(x, 2**63 - 1, 1, 2**62 - 1)
    with raises(
        ValueError,
        "[max_pool2d] input: expected padded size (4, 4) >= kernel size "
        "(9223372036854775807, 9223372036854775807)",
    ):
        F.max_pool2d(x, 2**63 - 1)
    # a stride beyond the input and a window as wide as the padded input are fine
    y, idx = F.max_pool2d(x, 2, 2**63 - 1)
    assert y.shape == (1, 1, 1, 1) and idx[0, 0, 0, 0] == 0
    y, _ = F.max_pool2d(x, (3, 2**40), 1, (1, 2**39))
    assert y.shape == (1, 1, 4, 5)
    with raises(
        ValueError,
        "[max_pool2d_backward] x_shape: expected at most 2^48 elements, got "
        "shape (1, 1, 4611686018427387904, 4611686018427387904)",
    ):
        F.max_pool2d_backward(
            np.ones((1, 1, 1, 1)), np.zeros((1, 1, 1, 1), np.int64), (1, 1, 2**62, 2**62)
        )
    assert F.output_size(0, 2**63 - 1, 2**63 - 1) == 0
    with raises(ValueError, "[output_size] padding: expected a padded size"):
        F.output_size(5, 1, 1, 2**62)
    with raises(ValueError, "[output_size] in_size: expected >= 0, got -5"):
        F.output_size(-5, 1)


def test_broadcast_views_too_large_to_copy():
    # zero-stride views whose contiguous copy does not fit: the size check names the op,
    # or the copy raises MemoryError (before: a null array and a segmentation fault)
    big = np.broadcast_to(np.float64(1), (2**29, 2**30))
    with raises(
        ValueError,
        "[relu] input: expected at most 2^48 elements, got shape (536870912, 1073741824)",
    ):
        F.relu(big)
    with raises(ValueError, "[sigmoid_backward] doutput: expected at most 2^48 elements"):
        F.sigmoid_backward(big, big)
    with raises(ValueError, "[binary_cross_entropy_with_logits] input: expected at most 2^48"):
        F.binary_cross_entropy_with_logits(big, big)
    x = np.broadcast_to(np.float32(1), (2**16, 2**31))
    w = np.broadcast_to(np.float32(1), (1, 2**31))
    with pytest.raises(MemoryError):
        F.linear(x, w)
    with pytest.raises(MemoryError):
        F.relu(np.broadcast_to(np.float32(1), (2**22, 2**24)))
    idx = np.broadcast_to(np.uint8(0), (1, 2**21, 2**12, 2**12))
    with pytest.raises(MemoryError):
        F.max_pool2d_backward(np.broadcast_to(np.float32(1), idx.shape), idx, idx.shape)


def test_conv2d_workspace_that_cannot_be_allocated_raises_memory_error():
    # the padded planes (2^16 channels of 32769 x 32769 floats per thread, 256 TiB: more
    # than the address space, so also refused where memory is overcommitted) cannot be
    # allocated: the allocation fails inside the threads' parallel region, and must surface
    # as MemoryError rather than terminate the process
    import cnnbp

    before = cnnbp.get_num_threads()
    x = np.ones((2, 2**16, 1, 1), np.float32)
    w = np.ones((1, 2**16, 1, 1), np.float32)
    try:
        for threads in (1, 2):
            cnnbp.set_num_threads(threads)
            with pytest.raises(MemoryError):
                F.conv2d(x, w, None, 1, 2**14)
    finally:
        cnnbp.set_num_threads(before)


def test_conv2d_workspace_bytes_dtype_errors():
    for bad in ("foo", 3.5, "int32", np.complex64):
        with raises(TypeError, "[conv2d_workspace_bytes] dtype: expected float32 or float64"):
            F.conv2d_workspace_bytes((1, 1, 4, 4), (1, 1, 3, 3), dtype=bad)


@pytest.mark.parametrize("stride", [2**62, 2**63 - 1, (1, 2**63 - 1), (2**63 - 1, 2)], ids=str)
def test_strides_beyond_the_input_are_one_window(stride):
    # the window range's ceiling division overflowed at strides near 2^63 and the direct
    # loops wrote outside dx ("double free or corruption")
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((4, 3, 3, 3))
    for padding in (0, 1, 2):
        y = F.conv2d(x, w, None, stride, padding)
        np.testing.assert_allclose(y, ref.conv2d(x, w, None, stride, padding), rtol=1e-12)
        dy = rng.standard_normal(y.shape)
        for got, want in zip(
            F.conv2d_backward(dy, x, w, stride, padding),
            ref.conv2d_backward(dy, x, w, stride, padding),
        ):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        out, idx = F.max_pool2d(x, 3, stride, min(padding, 1))
        want_out, want_idx = ref.max_pool2d(x, 3, stride, min(padding, 1))
        np.testing.assert_array_equal(out, want_out)
        np.testing.assert_array_equal(idx, want_idx)
