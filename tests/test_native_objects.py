"""The Python layers, losses and optimizers are views of the C++ objects that run them.

One implementation: a model built in Python runs as a C++ Sequential, modules written in
Python included (called back); `train_step` is one C++ call that equals the four calls
written out; the trace is read from the C++ objects and stays safe to read after the
container that produced it is gone.
"""

import gc

import numpy as np
import pytest
from cnnbp import nn, optim

F64 = np.float64


class Scale(nn.Module):
    """A module written in Python, with a parameter of its own: y = s * x."""

    def __init__(self, dtype=F64):
        super().__init__()
        self.weight = nn.Parameter(np.array([2.0], dtype))

    def forward(self, x):
        self.input = x
        self.output = x * self.weight.data[0]
        return self.output

    def backward(self, grad_output):
        self.grad_output = grad_output
        self.weight.accumulate(np.array([np.sum(grad_output * self.input)]))
        self.grad_input = grad_output * self.weight.data[0]
        return self.grad_input


def seed_model(dtype=F64, seed=0, extra=None):
    nn.manual_seed(seed)
    layers = [
        nn.Conv2d(1, 1, 3, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 1, dtype=dtype),
    ]
    if extra is not None:
        layers.append(extra)
    return nn.Sequential(*layers, nn.Sigmoid())


def batch(dtype=F64, n=3, seed=1):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, 1, 6, 6)).astype(dtype),
        (rng.random((n, 1)) > 0.5).astype(dtype),
    )


def four_calls(model, x, y, loss_fn, opt):
    model.zero_grad()
    loss = loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    opt.step()
    return loss


@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_train_step_is_the_four_calls_with_a_python_module_inside(opt_name, dtype):
    a, b = seed_model(dtype, extra=Scale(dtype)), seed_model(dtype, extra=Scale(dtype))
    opt_a = getattr(optim, opt_name)(a.parameters(), lr=0.05)
    opt_b = getattr(optim, opt_name)(b.parameters(), lr=0.05)
    loss_a, loss_b = nn.BCELoss(), nn.BCELoss()
    x, y = batch(dtype)
    for _ in range(4):
        assert a.train_step(x, y, loss_a, opt_a) == four_calls(b, x, y, loss_b, opt_b)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=name)
    assert "5.weight" in dict(a.named_parameters())  # the Python module's own parameter
    assert a[5].weight.data[0] != 2.0  # ... which the C++ optimizer updated
    for (_, ta), (_, tb) in zip(a.trace(), b.trace()):
        for key in ta:
            np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)
    for key, value in loss_a.trace().items():
        np.testing.assert_array_equal(value, loss_b.trace()[key], err_msg=key)


def test_train_step_follows_a_change_of_loss_optimizer_or_dtype():
    model = nn.Sequential(nn.ReLU(), nn.Flatten())  # no parameters: the input's dtype rules
    sgd = optim.SGD(model.parameters(), lr=0.1)
    x = np.linspace(-1, 1, 6).reshape(2, 3)
    y = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    first, second = nn.BCEWithLogitsLoss(), nn.BCEWithLogitsLoss()
    value = model.train_step(x, y, first, sgd)
    assert model.train_step(x, y, second, sgd) == value
    assert second.loss == value and first.loss == value
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    value32 = model.train_step(x32, y32, second, sgd)
    assert second.trace()["input"].dtype == np.float32
    assert model.trace()[0][1]["output"].dtype == np.float32
    assert value32 == pytest.approx(value, rel=1e-6)


def test_the_trace_outlives_the_container_that_produced_it():
    model = seed_model()
    loss_fn = nn.BCELoss()
    x, y = batch()
    model.train_step(x, y, loss_fn, optim.SGD(model.parameters(), lr=0.1))
    relu, linear = model[1], model[4]
    want = relu.trace()
    del model
    gc.collect()
    # the layers live on; what they borrowed from the container is gone, not dangling
    assert relu.input is None and relu.grad_output is None
    np.testing.assert_array_equal(relu.output, want["output"])
    np.testing.assert_array_equal(relu.grad_input, want["grad_input"])
    assert linear.weight.grad is not None
    assert loss_fn.trace()["loss"] > 0  # the loss keeps its own copies
    # a layer used on its own keeps its input
    relu(np.array([-1.0, 2.0]))
    np.testing.assert_array_equal(relu.input, [-1.0, 2.0])


def test_a_layer_shared_by_two_models_stays_consistent():
    conv = nn.Conv2d(1, 1, 3, dtype=F64)
    one = nn.Sequential(conv, nn.Flatten())
    two = nn.Sequential(conv, nn.ReLU(), nn.Flatten())
    x, _ = batch()
    np.testing.assert_array_equal(one(x), conv(x).reshape(3, -1))
    np.testing.assert_array_equal(two(x), np.maximum(conv(x), 0).reshape(3, -1))
    del one
    gc.collect()
    np.testing.assert_array_equal(two(x), np.maximum(conv(x), 0).reshape(3, -1))


def test_outputs_are_new_arrays_the_next_pass_leaves_alone():
    model = seed_model()
    x, _ = batch()
    first = model(x)
    kept = first.copy()
    model(x[::-1].copy())
    np.testing.assert_array_equal(first, kept)


def test_models_of_parameters_of_two_dtypes_are_refused():
    with pytest.raises(TypeError, match=r"\[Sequential\] parameters: expected one dtype"):
        nn.Sequential(nn.Linear(2, 2, dtype=np.float32), nn.Linear(2, 1, dtype=F64))


def test_an_optimizer_over_two_dtypes_updates_both():
    a, b = nn.Linear(2, 1, dtype=np.float32), nn.Linear(2, 1, dtype=F64)
    opt = optim.SGD(a.parameters() + b.parameters(), lr=1.0)
    before = [p.data.copy() for p in opt.params]
    for p in opt.params:
        p.grad = np.ones(p.shape)
    opt.step()
    for p, old in zip(opt.params, before):
        np.testing.assert_array_equal(p.data, old - 1)
    with pytest.raises(
        TypeError,
        match=r"\[SGD\] params: expected nn.Parameter objects, "
        r"got ndarray",
    ):
        optim.SGD([np.zeros(3)])
