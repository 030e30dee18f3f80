"""The lean training-step path keeps the behaviour of the plain one.

optim.SGD updates all parameters in one C++ call (cnnbp._core.sgd_step) that follows the
NumPy update operation for operation, and leaves to NumPy the parameters whose arrays it
cannot update in place. Module.zero_grad reaches "weight" and "bias" directly unless a
subclass defines its parameters otherwise. Flatten works on array-likes as before.
"""

import numpy as np
import pytest

from cnnbp import _core, nn, optim
from conftest import DTYPES, SGD_CONFIG_IDS, SGD_CONFIGS

DTYPE_IDS = ["float32", "float64"]


def make_params(dtype, seed):
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (4,), (2, 1, 3, 3), (1,), (300, 400)]  # the last above the GIL threshold
    return [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]


def numpy_steps(opt):
    """The NumPy update for every parameter that has a gradient (the reference)."""
    for i, p in enumerate(opt.params):
        if p.grad is not None:
            opt._step_one(i)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=SGD_CONFIG_IDS)
def test_sgd_one_call_equals_the_numpy_update_bit_for_bit(config, dtype):
    fast, slow = make_params(dtype, 1), make_params(dtype, 1)
    opt_fast, opt_slow = optim.SGD(fast, **config), optim.SGD(slow, **config)
    rng = np.random.default_rng(2)
    for step in range(4):
        for i, (a, b) in enumerate(zip(fast, slow)):
            if step == 1 and i == 1:  # a parameter without gradient is skipped
                a.grad = b.grad = None
                continue
            g = rng.standard_normal(a.shape).astype(dtype)
            a.grad, b.grad = g.copy(), g.copy()
        opt_fast.step()
        numpy_steps(opt_slow)
        for a, b in zip(fast, slow):
            assert a.data.dtype == dtype
            np.testing.assert_array_equal(a.data.view(np.uint8), b.data.view(np.uint8))
        for ba, bb in zip(opt_fast._momentum_buffers, opt_slow._momentum_buffers):
            assert (ba is None) == (bb is None)
            if ba is not None:
                np.testing.assert_array_equal(ba, bb)


def test_sgd_leaves_unusual_arrays_to_numpy():
    rng = np.random.default_rng(3)
    w = nn.Parameter(rng.standard_normal((4, 3)))
    w.data = np.asfortranarray(w.data)  # not C-contiguous
    b = nn.Parameter(rng.standard_normal(3).astype(np.float32))
    b.data = b.data.astype(b.data.dtype.newbyteorder())  # other byte order
    c = nn.Parameter(rng.standard_normal((2, 2)))
    ro = nn.Parameter(rng.standard_normal(5))
    ro.data.flags.writeable = False
    params = [w, b, c, ro]
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)
    c.grad = np.ones((1, 2))  # broadcasts, as NumPy allows
    before = [p.data.copy() for p in params]
    assert _core.sgd_step(params, [None] * 4, 0.5, 0.0, 0.0, 0.0, False) == [0, 1, 2, 3]
    for p, old in zip(params, before):
        np.testing.assert_array_equal(p.data, old)  # untouched, left to the caller
    ro.data.flags.writeable = True
    opt = optim.SGD([w, b, c], lr=0.5, momentum=0.9)
    opt.step()
    np.testing.assert_allclose(w.data, before[0] - 0.5 * w.grad)
    np.testing.assert_allclose(b.data, before[1] - 0.5 * b.grad.astype(np.float64), rtol=1e-6)
    np.testing.assert_allclose(c.data, before[2] - 0.5)
    assert opt._momentum_buffers[0] is not None


def test_sgd_step_rejects_a_buffer_list_of_the_wrong_length():
    p = nn.Parameter(np.zeros(3))
    p.grad = np.ones(3)
    with pytest.raises(ValueError, match=r"\[sgd_step\] buffers: expected one per parameter"):
        _core.sgd_step([p], [], 0.1, 0.9, 0.0, 0.0, False)


def test_sgd_sees_parameters_replaced_by_load_state_dict():
    lin = nn.Linear(3, 2, dtype=np.float64)
    opt = optim.SGD(lin.parameters(), lr=1.0)
    state = {k: np.zeros_like(v) for k, v in lin.state_dict().items()}
    lin.load_state_dict(state)  # new arrays behind the same Parameter objects
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
    model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4, 1), nn.Sigmoid())
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
