"""Parameters are shared with the C++ layers and optimizers, and behave as arrays.

optim.SGD runs the C++ update, which follows the NumPy update below operation for
operation (bit for bit, float32 included). nn.Parameter's data and grad are views of the
C++ storage: assignments copy into it, whatever the layout or byte order of the array
assigned, and in-place changes reach the layers. Flatten works on array-likes as before.
"""

import numpy as np
import pytest
from cnnbp import nn, optim
from conftest import DTYPES, SGD_CONFIG_IDS, SGD_CONFIGS, seed_network

DTYPE_IDS = ["float32", "float64"]


def make_params(dtype, seed):
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (4,), (2, 1, 3, 3), (1,), (300, 400)]
    return [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]


class NumpySGD:
    """torch.optim.SGD written in NumPy, in the C++ update's order of operations."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.weight_decay, self.dampening, self.nesterov = weight_decay, dampening, nesterov
        self.buffers = [None] * len(params)

    def step(self):
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay:
                g = g + self.weight_decay * p.data
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = g.copy()
                else:
                    buf *= self.momentum
                    buf += (1 - self.dampening) * g
                g = g + self.momentum * buf if self.nesterov else buf
            p.data -= (self.lr * g).astype(p.data.dtype, copy=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=SGD_CONFIG_IDS)
def test_sgd_equals_the_numpy_update_bit_for_bit(config, dtype):
    fast, slow = make_params(dtype, 1), make_params(dtype, 1)
    opt_fast, opt_slow = optim.SGD(fast, **config), NumpySGD(slow, **config)
    rng = np.random.default_rng(2)
    for step in range(4):
        for i, (a, b) in enumerate(zip(fast, slow)):
            if step == 1 and i == 1:  # a parameter without gradient is skipped
                a.grad = b.grad = None
                continue
            g = rng.standard_normal(a.shape).astype(dtype)
            a.grad, b.grad = g.copy(), g.copy()
        opt_fast.step()
        opt_slow.step()
        for a, b in zip(fast, slow):
            assert a.data.dtype == dtype
            np.testing.assert_array_equal(a.data.view(np.uint8), b.data.view(np.uint8))


def test_parameters_take_arrays_of_any_layout_by_copy():
    rng = np.random.default_rng(3)
    w = nn.Parameter(rng.standard_normal((4, 3)))
    fortran = np.asfortranarray(rng.standard_normal((4, 3)))
    w.data = fortran  # copied into the parameter's C-contiguous storage
    assert w.data.flags.c_contiguous and not np.shares_memory(w.data, fortran)
    np.testing.assert_array_equal(w.data, fortran)
    b = nn.Parameter(rng.standard_normal(3).astype(np.float32))
    swapped = b.data.astype(b.data.dtype.newbyteorder())  # other byte order
    b.data = swapped
    assert b.data.dtype == np.float32 and b.data.dtype.isnative
    c = nn.Parameter(rng.standard_normal((2, 2)))
    read_only = rng.standard_normal((2, 2))
    read_only.flags.writeable = False
    c.data = read_only
    params = [w, b, c]
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)
    c.grad = np.ones((2, 2))
    before = [p.data.copy() for p in params]
    optim.SGD(params, lr=0.5, momentum=0.9).step()
    np.testing.assert_allclose(w.data, before[0] - 0.5 * w.grad)
    np.testing.assert_allclose(b.data, before[1] - 0.5 * b.grad.astype(np.float64), rtol=1e-6)
    np.testing.assert_allclose(c.data, before[2] - 0.5)


def test_parameter_assignments_are_checked_before_anything_changes():
    p = nn.Parameter(np.zeros((2, 3)))
    with pytest.raises(
        ValueError,
        match=r"\[Parameter\] data: expected shape \(2, 3\), "
        r"got shape \(3, 2\)",
    ):
        p.data = np.ones((3, 2))
    with pytest.raises(
        ValueError,
        match=r"\[Parameter\] grad: expected shape \(2, 3\), "
        r"got shape \(1, 3\)",
    ):
        p.grad = np.ones((1, 3))  # no broadcasting: torch refuses it too
    assert p.grad is None
    np.testing.assert_array_equal(p.data, np.zeros((2, 3)))
    with pytest.raises(TypeError, match=r"\[nn\] dtype: expected float32 or float64, got int64"):
        nn.Parameter(np.zeros(3, np.int64))


def test_in_place_changes_reach_the_layer():
    lin = nn.Linear(2, 1, dtype=np.float64)
    lin.weight.data[...] = [[1.0, 2.0]]
    lin.bias.data[0] = 0.5
    np.testing.assert_array_equal(lin(np.array([[1.0, 1.0]])), [[3.5]])
    lin.weight.accumulate(np.ones((1, 2)))
    lin.weight.accumulate(np.ones((1, 2)))
    np.testing.assert_array_equal(lin.weight.grad, [[2.0, 2.0]])


def test_sgd_sees_parameters_replaced_by_load_state_dict():
    lin = nn.Linear(3, 2, dtype=np.float64)
    opt = optim.SGD(lin.parameters(), lr=1.0)
    state = {k: np.zeros_like(v) for k, v in lin.state_dict().items()}
    lin.load_state_dict(state)  # new values behind the same Parameter objects
    lin.weight.grad = np.ones((2, 3))
    lin.bias.grad = np.ones(2)
    opt.step()
    np.testing.assert_array_equal(lin.weight.data, -np.ones((2, 3)))
    np.testing.assert_array_equal(lin.bias.data, -np.ones(2))


class _Pair(nn.Module):
    """A container that names its parameters itself, as user code may."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 1)

    def named_parameters(self, prefix=""):
        return self.a.named_parameters(prefix + "a.") + self.b.named_parameters(prefix + "b.")


def test_zero_grad_follows_overridden_named_parameters():
    m = _Pair()
    for p in m.parameters():
        p.grad = np.ones(p.shape, np.float32)
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1, bias=False))
    for p in seq.parameters():
        p.grad = np.ones(p.shape, np.float32)
    seq.zero_grad()
    assert all(p.grad is None for p in seq.parameters()) and len(seq.parameters()) == 3


def test_flatten_layer_takes_array_likes():
    layer = nn.Flatten()
    x = np.arange(12.0).reshape(2, 3, 2)
    out = layer(x.tolist())
    np.testing.assert_array_equal(out, x.reshape(2, 6))
    dx = layer.backward(np.ones((2, 6)).tolist())
    assert dx.shape == (2, 3, 2)


def test_a_training_step_reuses_nothing_it_should_not():
    # each step's trace holds that step's arrays: outputs are fresh, gradients not aliased
    model = seed_network()
    loss_fn, opt = nn.BCELoss(), optim.SGD(model.parameters(), lr=0.1)
    x = np.random.default_rng(4).standard_normal((1, 1, 6, 6)).astype(np.float32)
    y = np.ones((1, 1), np.float32)
    traces = []
    for _ in range(2):
        model.zero_grad()
        loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        opt.step()
        traces.append(model.trace())
    for (_, first), (_, second) in zip(*traces):
        for key in ("output", "grad_input", "grad_output"):
            assert not np.shares_memory(first[key], second[key]), key
