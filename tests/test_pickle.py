"""Models, optimizers and schedules pickle: each layer as its model file's bytes, an
optimizer as its parameters (those of its model, when pickled with it) and its state."""

import copy
import pickle

import cnnbp
import numpy as np
import pytest
from cnnbp import nn, optim


class Doubler(nn.Module):
    """A module written in Python."""

    def forward(self, x):
        self.input = x
        return 2 * x

    def backward(self, grad_output):
        return 2 * grad_output


def _model(dtype):
    cnnbp.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, dtype=dtype),
        nn.BatchNorm2d(4, dtype=dtype),
        nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, dtype=dtype)), Doubler()),
        nn.Concat(nn.Identity(), nn.MaxPool2d(1)),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8 * 6 * 6, 3, dtype=dtype),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [optim.SGD, optim.Adam, optim.AdamW])
@pytest.mark.parametrize("optimizer_first", [False, True])
def test_a_model_and_its_optimizer_continue_training_bit_for_bit(dtype, make, optimizer_first):
    model = _model(dtype)
    opt = make(model.parameters(), lr=0.01)
    schedule = optim.lr_scheduler.StepLR(opt, 1, 0.5)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 1, 8, 8)).astype(dtype), np.array([0, 1, 2, 0, 1])
    loss_fn = nn.CrossEntropyLoss()
    model.train_step(x, y, loss_fn, opt)
    schedule.step()
    if optimizer_first:
        opt2, schedule2, model2 = pickle.loads(pickle.dumps((opt, schedule, model)))
    else:
        model2, opt2, schedule2 = pickle.loads(pickle.dumps((model, opt, schedule)))
    assert schedule2.optimizer is opt2 and opt2.lr == opt.lr == 0.005
    assert all(p is q for p, q in zip(opt2.params, model2.parameters()))
    for (name, a), (name2, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert name == name2 and a.dtype == b.dtype and np.array_equal(a, b)
    model[6].eval()  # no dropout draws, whose generator state is not pickled
    model2[6].eval()
    for _ in range(2):
        assert model.train_step(x, y, loss_fn, opt) == model2.train_step(x, y, loss_fn, opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert np.array_equal(a.data, b.data)


def test_modes_and_copies():
    model = _model(np.float32).eval()
    model[2].train()
    restored = copy.deepcopy(model)
    assert [m.training for m in restored] == [m.training for m in model]
    assert restored.training is False and restored[3].shortcut.training is False
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    assert np.array_equal(restored(x), model(x))
    layer = pickle.loads(pickle.dumps(model[0]))  # a layer alone
    assert isinstance(layer, nn.Conv2d) and np.array_equal(layer.weight.data, model[0].weight.data)
    assert layer.weight._owner[0]() is layer


def test_a_parameter_of_no_layer_pickles_as_a_copy():
    p = nn.Parameter(np.arange(3.0))
    q = pickle.loads(pickle.dumps(p))
    assert q is not p and np.array_equal(q.data, p.data) and q.dtype == np.float64
