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
        dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=1),
        (2, 2, 7, 6),
    ),
    "Linear": (dict(in_features=5, out_features=3), (4, 5)),
    "MaxPool2d": (dict(kernel_size=3, stride=2, padding=1), (2, 2, 7, 6)),
    "AvgPool2d": (dict(kernel_size=(2, 3), stride=1, padding=(1, 1)), (2, 2, 5, 6)),
    "Dropout": (dict(p=0.3, seed=5), (2, 3, 4, 4)),
    "ReLU": ({}, (2, 3, 4, 4)),
    "Sigmoid": ({}, (2, 3, 4, 4)),
    "Tanh": ({}, (2, 3, 4, 4)),
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
