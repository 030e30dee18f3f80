"""AvgPool2d, Tanh and Dropout as layers: PyTorch's semantics inside networks, train() and
eval(), reproducible dropout masks, and model files that hold them."""

import cnnbp
import numpy as np
import pytest
from cnnbp import nn, optim
from conftest import NETWORK_TOL, assert_close

torch = pytest.importorskip("torch")
tnn = torch.nn

F32, F64 = np.float32, np.float64
TOL = NETWORK_TOL  # as the other network-level torch comparisons


def pair(dtype, seed=0):
    """The same network in cnnbp and torch (no dropout): Conv, Tanh, AvgPool (padded),
    Conv, ReLU, AvgPool (strided), Linear."""
    torch.manual_seed(seed)
    tmodel = tnn.Sequential(
        tnn.Conv2d(2, 4, 3, padding=1),
        tnn.Tanh(),
        tnn.AvgPool2d(3, stride=2, padding=1),
        tnn.Conv2d(4, 5, 2),
        tnn.ReLU(),
        tnn.AvgPool2d(2),
        tnn.Flatten(),
        tnn.Linear(20, 3),
    )
    tmodel = tmodel.to(torch.float64 if dtype == F64 else torch.float32)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, dtype=dtype),
        nn.Tanh(),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.Conv2d(4, 5, 2, dtype=dtype),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(20, 3, dtype=dtype),
    )
    model.load_state_dict({k: v.detach().numpy() for k, v in tmodel.state_dict().items()})
    return model, tmodel


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_avgpool_and_tanh_networks_match_torch(dtype):
    model, tmodel = pair(dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 11, 9)).astype(dtype)  # odd sizes: floored outputs
    y = rng.integers(0, 3, 3)
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(model(x), y)
    dx = model.backward(loss_fn.backward())
    xt = torch.tensor(x, requires_grad=True)
    tloss = tnn.CrossEntropyLoss()(tmodel(xt), torch.tensor(y))
    tloss.backward()
    assert_close(loss, tloss.item(), TOL[dtype], "loss")
    assert_close(dx, xt.grad.numpy(), TOL[dtype], "dL/dx")
    tparams = dict(tmodel.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, tparams[name].grad.numpy(), TOL[dtype], name + ".grad")


def test_dropout_scales_the_kept_elements_and_routes_the_gradient():
    layer = nn.Dropout(0.3, seed=5)
    x = np.random.default_rng(2).standard_normal((4, 3, 5, 5))
    y = layer(x)
    mask = layer.mask
    assert mask.dtype == bool and mask.shape == x.shape and 0 < mask.mean() < 1
    np.testing.assert_array_equal(y, x * mask / (1 - 0.3))
    dy = np.random.default_rng(3).standard_normal(x.shape)
    dx = layer.backward(dy)
    # torch's autograd of the same expression, with the same mask
    xt = torch.tensor(x, requires_grad=True)
    (xt * torch.tensor(mask) / (1 - 0.3)).backward(torch.tensor(dy))
    np.testing.assert_array_equal(dx, xt.grad.numpy())
    assert layer.trace()["mask"] is not None


def test_dropout_in_eval_mode_is_the_identity_and_eval_reaches_nested_layers():
    model = nn.Sequential(nn.Linear(6, 6, dtype=F64), nn.Sequential(nn.Dropout(0.5)))
    x = np.random.default_rng(4).standard_normal((2, 6))
    assert model.training and model[1][0].training
    model.eval()
    assert not model[1][0].training
    np.testing.assert_array_equal(model(x), model[0](x))
    np.testing.assert_array_equal(
        model.backward(np.ones((2, 6))), model[0].backward(np.ones((2, 6)))
    )
    assert model[1][0].mask is None  # nothing was dropped
    model.train()
    assert model[1][0].training
    assert not np.array_equal(model(x), model[0](x))


def test_dropout_masks_follow_the_seed():
    x = np.ones((8, 64))

    def masks(seed=None):
        if seed is None:
            cnnbp.manual_seed(11)
        layer = nn.Dropout(0.5, seed=seed)
        return [layer(x) != 0 for _ in range(3)]

    first, again = masks(), masks()
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)  # same manual_seed: same masks
    assert not np.array_equal(first[0], first[1])  # each forward draws a new mask
    np.testing.assert_array_equal(masks(seed=3)[2], masks(seed=3)[2])
    assert not np.array_equal(masks(seed=3)[0], masks(seed=4)[0])
    keep = np.mean([m.mean() for m in masks(seed=5)])
    assert abs(keep - 0.5) < 5 * np.sqrt(0.25 / (3 * x.size))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_dropout_extremes(p):
    layer = nn.Dropout(p, seed=0)
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(layer(x), x if p == 0 else np.zeros_like(x))


@pytest.mark.parametrize(
    "bad,error",
    [
        (1.5, ValueError),
        (-0.1, ValueError),
        (float("nan"), ValueError),
        ("0.5", TypeError),
        (True, TypeError),
    ],
)
def test_dropout_refuses_bad_probabilities(bad, error):
    with pytest.raises(error, match=r"\[Dropout\] p: expected a probability in \[0, 1\]"):
        nn.Dropout(bad)


def test_models_with_the_new_layers_save_load_and_train(tmp_path):
    cnnbp.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, dtype=F64),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(27, 2, dtype=F64),
    )
    x = np.random.default_rng(7).standard_normal((4, 1, 8, 8))
    y = np.array([0, 1, 1, 0])
    opt = optim.Adam(model.parameters(), lr=0.01)
    losses = [model.train_step(x, y, nn.CrossEntropyLoss(), opt) for _ in range(30)]
    assert losses[-1] < losses[0]
    model.save(tmp_path / "m.npz")
    loaded = cnnbp.load(tmp_path / "m.npz")
    assert [layer.config() for layer in loaded] == [layer.config() for layer in model]
    assert loaded[3].p == 0.2
    np.testing.assert_array_equal(loaded.eval()(x), model.eval()(x))
