"""Every layer type the C++ registry declares, under every property a layer has: built
from Python with its declared arguments, backward against central finite differences,
float32 against float64, the model file round trip, the trace and its extras.

Adding a layer type to the registry without an entry in LAYERS fails
test_every_declared_layer_has_an_entry: the entry is what puts it under the properties.
"""

import cnnbp
import numpy as np
import pytest
from cnnbp import _core, nn
from cnnbp.gradcheck import numeric_gradient

# type -> (constructor arguments, input shape); options away from the defaults
LAYERS = {
    "Conv2d": (
        dict(
            in_channels=4,
            out_channels=6,
            kernel_size=(3, 2),
            stride=(2, 1),
            padding=1,
            dilation=(2, 1),
            groups=2,
        ),
        (2, 4, 7, 6),
    ),
    "Linear": (dict(in_features=5, out_features=3), (4, 5)),
    "MaxPool2d": (
        dict(kernel_size=3, stride=2, padding=1, dilation=(2, 1), ceil_mode=True),
        (2, 2, 7, 6),
    ),
    "AvgPool2d": (
        dict(kernel_size=(2, 3), stride=2, padding=(1, 1), ceil_mode=True, count_include_pad=False),
        (2, 2, 5, 6),
    ),
    # None keeps the input's height; the width grows (windows repeat cells)
    "AdaptiveAvgPool2d": (dict(output_size=(None, 4)), (2, 2, 7, 3)),
    "BatchNorm2d": (dict(num_features=3, eps=1e-3, momentum=0.2), (2, 3, 4, 5)),
    "Dropout": (dict(p=0.3, seed=5), (2, 3, 4, 4)),
    "ReLU": ({}, (2, 3, 4, 4)),
    "Sigmoid": ({}, (2, 3, 4, 4)),
    "Tanh": ({}, (2, 3, 4, 4)),
    "LeakyReLU": (dict(negative_slope=0.2), (2, 3, 4, 4)),
    "GELU": (dict(approximate="tanh"), (2, 3, 4, 4)),
    "SiLU": ({}, (2, 3, 4, 4)),
    "Identity": ({}, (2, 3, 4, 4)),
    "Softmax": (dict(dim=-2), (2, 3, 4, 4)),  # a negative dim, counted from the end
    "LogSoftmax": (dict(dim=1), (2, 3, 4, 4)),
    "Flatten": ({}, (2, 3, 4, 4)),
}

DECLARED = [t["name"] for t in _core.layer_types()]


def make(name, dtype=np.float64):
    arguments, shape = LAYERS[name]
    cls = getattr(nn, name)
    if "dtype" in cls.__signature__.parameters:
        arguments = dict(arguments, dtype=dtype)
    return cls(**arguments), shape


def away_from_kinks(rng, shape):
    """Inputs whose entries are distinct and at least 0.05 from 0 (ReLU's kink) and from
    each other (max-pool ties), so that a 1e-6 step crosses neither."""
    values = rng.permutation(np.arange(1, np.prod(shape) + 1, dtype=np.float64))
    signs = np.where(rng.random(values.size) < 0.5, -1.0, 1.0)
    return (signs * values * 0.05).reshape(shape) / np.sqrt(values.size)


def test_every_declared_layer_has_an_entry():
    assert sorted(DECLARED) == sorted(LAYERS), "give each declared layer type an entry in LAYERS"


@pytest.mark.parametrize("name", DECLARED)
def test_the_python_class_follows_the_declaration(name):
    declaration = next(t for t in _core.layer_types() if t["name"] == name)
    cls = getattr(nn, name)
    assert cls.__doc__.startswith(declaration["doc"])
    fields = [f["name"] for f in declaration["fields"]]
    assert list(cls.__signature__.parameters)[: len(fields)] == fields
    layer, _ = make(name)
    config = layer.config()
    assert config["type"] == name
    assert list(config)[1:] == [f["name"] for f in declaration["fields"] if f["saved"]]


@pytest.mark.parametrize("name", DECLARED)
def test_backward_matches_central_differences(name):
    rng = np.random.default_rng(sorted(LAYERS).index(name))
    layer, shape = make(name)
    layer.eval()  # Dropout: the identity, a fixed function
    x = away_from_kinks(rng, shape)
    weights = rng.standard_normal(layer(x).shape)  # L = sum(weights * layer(x))

    def loss():
        return float(np.sum(weights * layer(x)))

    for p in layer.parameters():
        p.grad = None
    loss()
    dx = layer.backward(weights)
    np.testing.assert_allclose(dx, numeric_gradient(loss, x), rtol=1e-6, atol=1e-9)
    for p in layer.parameters():
        analytic = p.grad.copy()
        before = p.data.copy()
        # p.data is a view of the C++ parameter: the layer sees each perturbation
        numeric = numeric_gradient(loss, p.data)
        np.testing.assert_array_equal(p.data, before)  # restored
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", DECLARED)
def test_float32_agrees_with_float64(name):
    rng = np.random.default_rng(7)
    cnnbp.manual_seed(3)
    layer64, shape = make(name, np.float64)
    cnnbp.manual_seed(3)
    layer32, _ = make(name, np.float32)
    x = rng.standard_normal(shape)
    if not layer64.parameters():
        layer32 = layer64  # one layer runs either dtype
    for p32, p64 in zip(layer32.parameters(), layer64.parameters()):
        np.testing.assert_array_equal(p32.data, p64.data.astype(np.float32))  # same draws
    layer32.eval(), layer64.eval()
    y32, y64 = layer32(x.astype(np.float32)), layer64(x)
    assert y32.dtype == np.float32 and y64.dtype == np.float64
    np.testing.assert_allclose(y32, y64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DECLARED)
def test_model_files_keep_the_layer(tmp_path, name):
    layer, shape = make(name)
    model = nn.Sequential(layer).eval()
    x = np.random.default_rng(1).standard_normal(shape)
    model.save(tmp_path / "m.npz")
    loaded = cnnbp.load(tmp_path / "m.npz").eval()
    assert type(loaded[0]) is type(layer) and loaded[0].config() == layer.config()
    np.testing.assert_array_equal(loaded(x), model(x))


@pytest.mark.parametrize("name", DECLARED)
def test_the_trace_shows_the_pass(name):
    declaration = next(t for t in _core.layer_types() if t["name"] == name)
    layer, shape = make(name)
    x = np.random.default_rng(2).standard_normal(shape)
    assert layer.trace()["input"] is None  # nothing before a pass
    y = layer(x)
    dy = np.ones_like(y)
    dx = layer.backward(dy)
    trace = layer.trace()
    np.testing.assert_array_equal(trace["input"], x)
    np.testing.assert_array_equal(trace["output"], y)
    np.testing.assert_array_equal(trace["grad_output"], dy)
    np.testing.assert_array_equal(trace["grad_input"], dx)
    for extra in declaration["trace_extras"]:
        assert trace[extra] is not None and trace[extra].shape == y.shape
    for p_name, p in layer.named_parameters():
        np.testing.assert_array_equal(trace[p_name + ".grad"], p.grad)


# the pools' options beyond LAYERS' entries: each layer computes its functional op
POOL_OPTIONS = [
    ("MaxPool2d", dict(kernel_size=2, ceil_mode=True), (2, 3, 7, 5)),
    ("MaxPool2d", dict(kernel_size=(3, 2), stride=(2, 1), padding=1, dilation=2), (1, 2, 9, 6)),
    ("AvgPool2d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (2, 2, 6, 6)),
    ("AvgPool2d", dict(kernel_size=2, stride=1, divisor_override=3), (1, 2, 4, 5)),
    ("AvgPool2d", dict(kernel_size=3, padding=1, count_include_pad=False), (1, 1, 7, 7)),
    ("AdaptiveAvgPool2d", dict(output_size=1), (2, 3, 5, 6)),
    ("AdaptiveAvgPool2d", dict(output_size=(3, 5)), (2, 2, 7, 9)),
    ("AdaptiveAvgPool2d", dict(output_size=[2, None]), (3, 7, 4)),
]


@pytest.mark.parametrize("name, arguments, shape", POOL_OPTIONS, ids=str)
def test_pool_layers_compute_their_functional_op(name, arguments, shape):
    from cnnbp import functional as F

    layer = getattr(nn, name)(**arguments)
    x = np.random.default_rng(4).standard_normal(shape)
    y = layer(x)
    dy = np.random.default_rng(5).standard_normal(y.shape)
    dx = layer.backward(dy)
    if name == "MaxPool2d":
        want_y, idx = F.max_pool2d(x, **arguments)
        want_dx = F.max_pool2d_backward(dy, idx, shape)
    elif name == "AdaptiveAvgPool2d":
        want_y = F.adaptive_avg_pool2d(x, **arguments)
        want_dx = F.adaptive_avg_pool2d_backward(dy, shape, **arguments)
    else:
        want_y = F.avg_pool2d(x, **arguments)
        want_dx = F.avg_pool2d_backward(dy, shape, **arguments)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(dx, want_dx)


def test_pool_layer_defaults_come_from_the_declaration():
    assert str(nn.MaxPool2d.__signature__) == (
        "(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False)"
    )
    assert str(nn.AvgPool2d.__signature__) == (
        "(kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, "
        "divisor_override=None)"
    )
    assert nn.AvgPool2d(2).config()["divisor_override"] is None
    with pytest.raises(ValueError, match=r"^\[AvgPool2d\] divisor_override: expected a nonzero"):
        nn.AvgPool2d(2, divisor_override=0)
    with pytest.raises(TypeError, match=r"^\[AvgPool2d\] divisor_override: expected an int or"):
        nn.AvgPool2d(2, divisor_override=2.5)
    with pytest.raises(ValueError, match=r"^\[MaxPool2d\] dilation: expected >= 1, got 0"):
        nn.MaxPool2d(2, dilation=0)


def test_adaptive_pool_layer_takes_torchs_output_sizes():
    assert str(nn.AdaptiveAvgPool2d.__signature__) == "(output_size)"
    # an int, a pair, None elements: kept as [h, w] in the model file's entry
    assert nn.AdaptiveAvgPool2d(3).config() == {"type": "AdaptiveAvgPool2d", "output_size": [3, 3]}
    assert nn.AdaptiveAvgPool2d((None, 2)).config()["output_size"] == [None, 2]
    assert nn.AdaptiveAvgPool2d(output_size=[4, None]).config()["output_size"] == [4, None]
    assert nn.AdaptiveAvgPool2d(np.int64(2)).config()["output_size"] == [2, 2]
    message = r"^\[AdaptiveAvgPool2d\] output_size: expected an int, or a pair of ints or None"
    for bad in (None, 2.5, (1, 2, 3), (True, 1), "2"):
        with pytest.raises(TypeError, match=message):
            nn.AdaptiveAvgPool2d(bad)
    for bad in (0, (2, 0), (None, -1)):
        with pytest.raises(ValueError, match=r"^\[AdaptiveAvgPool2d\] output_size: expected >= 1"):
            nn.AdaptiveAvgPool2d(bad)
    with pytest.raises(TypeError, match="output_size"):  # required, as torch's
        nn.AdaptiveAvgPool2d()
    # the input's checks are the functional op's
    with pytest.raises(ValueError, match=r"^\[adaptive_avg_pool2d\] input: expected 3 dims"):
        nn.AdaptiveAvgPool2d(2)(np.ones((4, 4)))


def test_model_file_entries_without_the_pool_options_take_the_defaults(tmp_path):
    # a file written before dilation, ceil_mode, count_include_pad and divisor_override
    # existed: its pool entries lack them (tests/data's v1 files are such files too)
    import json

    model = nn.Sequential(nn.MaxPool2d(2), nn.AvgPool2d(3, 1, 1))
    model.save(tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz") as f:
        arrays = dict(f)
    architecture = json.loads(arrays["architecture"].tobytes())
    options = ("dilation", "ceil_mode", "count_include_pad", "divisor_override")
    for entry in architecture["layers"]:
        for option in options:
            entry.pop(option, None)
    text = json.dumps(architecture).encode()
    arrays["architecture"] = np.frombuffer(text, np.uint8)
    np.savez(tmp_path / "old.npz", **arrays)
    loaded = cnnbp.load(tmp_path / "old.npz")
    assert loaded[0].config() == model[0].config()
    assert loaded[1].config() == model[1].config()


# the activations' options: each layer computes its functional op (Identity: the input)
ACTIVATIONS = [
    ("LeakyReLU", {}, "leaky_relu", {}),
    ("LeakyReLU", dict(negative_slope=-0.75), "leaky_relu", dict(negative_slope=-0.75)),
    ("LeakyReLU", dict(negative_slope=2), "leaky_relu", dict(negative_slope=2)),
    ("GELU", {}, "gelu", {}),
    ("GELU", dict(approximate="tanh"), "gelu", dict(approximate="tanh")),
    ("SiLU", {}, "silu", {}),
    ("Identity", {}, None, {}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name, arguments, fn, options", ACTIVATIONS, ids=str)
def test_activation_layers_compute_their_functional_op(name, arguments, fn, options, dtype):
    from cnnbp import functional as F

    layer = getattr(nn, name)(**arguments)
    x = (np.random.default_rng(4).standard_normal((2, 3, 5)) * 3).astype(dtype)
    x.reshape(-1)[:3] = [0.0, -0.0, np.nan]
    y = layer(x)
    dy = np.random.default_rng(5).standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    assert y.dtype == dx.dtype == dtype
    if fn is None:  # Identity
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(dx, dy)
        return
    np.testing.assert_array_equal(y, getattr(F, fn)(x, **options))
    np.testing.assert_array_equal(dx, getattr(F, fn + "_backward")(dy, x, **options))


def test_activation_layer_defaults_and_refusals_come_from_the_declaration():
    assert str(nn.LeakyReLU.__signature__) == "(negative_slope=0.01)"
    assert str(nn.GELU.__signature__) == "(approximate='none')"
    assert str(nn.SiLU.__signature__) == "()" and str(nn.Identity.__signature__) == "()"
    assert nn.LeakyReLU().config() == {"type": "LeakyReLU", "negative_slope": 0.01}
    assert nn.LeakyReLU(1).config()["negative_slope"] == 1.0  # an int is a number
    assert nn.GELU().config() == {"type": "GELU", "approximate": "none"}
    with pytest.raises(
        ValueError, match=r"^\[GELU\] approximate: expected 'none' or 'tanh', got 'x'$"
    ):
        nn.GELU("x")
    with pytest.raises(
        TypeError, match=r"^\[GELU\] approximate: expected 'none' or 'tanh', got 1$"
    ):
        nn.GELU(approximate=1)
    for bad, shown in ((float("inf"), "inf"), (float("-inf"), "-inf"), (float("nan"), "nan")):
        with pytest.raises(
            ValueError,
            match=rf"^\[LeakyReLU\] negative_slope: expected a finite float, got {shown}$",
        ):
            nn.LeakyReLU(bad)
    with pytest.raises(TypeError, match=r"^\[LeakyReLU\] negative_slope: expected a finite float"):
        nn.LeakyReLU("0.1")
    with pytest.raises(TypeError):
        nn.Identity(3)  # no arguments, unlike torch's, which ignores any


def test_model_files_keep_the_activation_options(tmp_path):
    model = nn.Sequential(nn.LeakyReLU(-0.3), nn.GELU("tanh"), nn.SiLU(), nn.Identity())
    model.save(tmp_path / "m.npz")
    loaded = cnnbp.load(tmp_path / "m.npz")
    assert [layer.config() for layer in loaded] == [layer.config() for layer in model]
    x = np.random.default_rng(6).standard_normal((3, 7))
    np.testing.assert_array_equal(loaded(x), model(x))


# BatchNorm2d: the training mode (batch statistics) beyond the table's evaluation-mode checks


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_backward_in_training_mode_matches_central_differences(affine):
    rng = np.random.default_rng(11)
    layer = nn.BatchNorm2d(3, momentum=None, affine=affine, dtype=np.float64)
    x = rng.standard_normal((2, 3, 4, 5)) * 2 + 1
    weights = rng.standard_normal(x.shape)

    def loss():  # training mode: through the batch's mean and variance
        return float(np.sum(weights * layer(x)))

    if affine:
        layer.weight.data[:] = rng.standard_normal(3)
    loss()
    dx = layer.backward(weights)
    np.testing.assert_allclose(dx, numeric_gradient(loss, x), rtol=1e-6, atol=1e-9)
    for p in layer.parameters():
        np.testing.assert_allclose(p.grad, numeric_gradient(loss, p.data), rtol=1e-6, atol=1e-9)


def test_batch_norm_layer_computes_its_functional_op():
    from cnnbp import functional as F

    rng = np.random.default_rng(12)
    layer = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3, dtype=np.float64)
    layer.weight.data[:] = rng.standard_normal(4)
    layer.bias.data[:] = rng.standard_normal(4)
    rm, rv = np.zeros(4), np.ones(4)
    for _ in range(2):
        x = rng.standard_normal((3, 4, 2, 5))
        dy = rng.standard_normal(x.shape)
        y, mean, invstd = F.batch_norm2d(
            x, layer.weight.data, layer.bias.data, rm, rv, True, 0.3, 1e-3
        )
        np.testing.assert_array_equal(layer(x), y)
        layer.zero_grad()
        dx, dw, db = F.batch_norm2d_backward(dy, x, layer.weight.data, mean, invstd)
        np.testing.assert_array_equal(layer.backward(dy), dx)
        np.testing.assert_array_equal(layer.weight.grad, dw)
        np.testing.assert_array_equal(layer.bias.grad, db)
    np.testing.assert_array_equal(layer.running_mean, rm)
    np.testing.assert_array_equal(layer.running_var, rv)
    assert layer.num_batches_tracked == 2 and layer.num_batches_tracked.dtype == np.int64
    layer.eval()  # the running statistics, constants
    y, _, _ = F.batch_norm2d(x, layer.weight.data, layer.bias.data, rm, rv, False, 0.3, 1e-3)
    np.testing.assert_array_equal(layer(x), y)
    dx, _, _ = F.batch_norm2d_backward(dy, x, layer.weight.data, rm, 1 / np.sqrt(rv + 1e-3), False)
    np.testing.assert_allclose(layer.backward(dy), dx, rtol=1e-15)
    assert layer.num_batches_tracked == 2


def test_batch_norm_declaration_and_refusals():
    assert str(nn.BatchNorm2d.__signature__) == (
        "(num_features, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, "
        "dtype=<class 'numpy.float32'>)"
    )
    assert nn.BatchNorm2d(2, momentum=None).config()["momentum"] is None
    bn = nn.BatchNorm2d(2, affine=False, track_running_stats=False, dtype=np.float64)
    assert bn.weight is None and bn.bias is None and bn.running_mean is None
    assert bn.parameters() == [] and bn.buffers() == [] and list(bn.state_dict()) == []
    with pytest.raises(
        ValueError,
        match=r"^\[BatchNorm2d\] momentum: expected a number in \[0, 1\] or None, got 1.5",
    ):
        nn.BatchNorm2d(2, momentum=1.5)
    with pytest.raises(
        TypeError,
        match=r"^\[BatchNorm2d\] momentum: expected a number in \[0, 1\] or None, got 'a'",
    ):
        nn.BatchNorm2d(2, momentum="a")
    with pytest.raises(
        ValueError, match=r"^\[BatchNorm2d\] eps: expected a finite number > 0, got 0"
    ):
        nn.BatchNorm2d(2, eps=0)
    with pytest.raises(ValueError, match=r"^\[BatchNorm2d\] num_features: expected >= 1, got 0"):
        nn.BatchNorm2d(0)
    with pytest.raises(
        ValueError,
        match=r"^\[batch_norm2d\] input: expected 2 channels \(num_features\), got shape \(1, 3, 2, 2\)",
    ):
        nn.BatchNorm2d(2)(np.ones((1, 3, 2, 2), np.float32))
    with pytest.raises(
        ValueError,
        match=r"^\[batch_norm2d\] input: expected more than 1 value per channel when training",
    ):
        nn.BatchNorm2d(2)(np.ones((1, 2, 1, 1), np.float32))
    bn = nn.BatchNorm2d(2)
    bn(np.ones((3, 2, 2, 2), np.float32))
    assert bn.num_batches_tracked == 1
    with pytest.raises(ValueError):  # refused before anything changes
        bn(np.ones((1, 2, 1, 1), np.float32))
    assert bn.num_batches_tracked == 1


def test_model_files_keep_the_running_statistics(tmp_path):
    rng = np.random.default_rng(13)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3, momentum=None),
        nn.ReLU(),
        nn.BatchNorm2d(3, affine=False),
    )
    for _ in range(3):
        model(rng.standard_normal((4, 2, 6, 6)).astype(np.float32))
    model.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        assert (
            f["1.num_batches_tracked"].dtype == np.int64 and f["1.num_batches_tracked"].shape == ()
        )
        assert f["3.running_var"].dtype == np.float32
    loaded = cnnbp.load(tmp_path / "m.npz")
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
        assert got[key].dtype == want[key].dtype
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded.eval()(x), model.eval()(x))
