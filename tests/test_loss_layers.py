"""The loss layers with torch's options (nn.BCELoss, nn.BCEWithLogitsLoss,
nn.CrossEntropyLoss): signatures, values and gradients against torch.nn's losses, and
train_step with every option against the same training steps in torch."""

import inspect

import numpy as np
import pytest
from cnnbp import nn, optim
from conftest import DTYPES, assert_close

torch = pytest.importorskip("torch")
tnn = torch.nn

F32, F64 = np.float32, np.float64
DTYPE_IDS = ["float32", "float64"]
TOL = {F64: 1e-12, F32: 1e-5}  # as test_torch_parity's losses: torch in the same dtype


@pytest.mark.parametrize("name", ["BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss"])
def test_loss_signatures_are_torchs_without_the_deprecated_arguments(name):
    ours = inspect.signature(getattr(nn, name)).parameters
    theirs = inspect.signature(getattr(tnn, name)).parameters
    kept = [p for p in theirs if p not in ("size_average", "reduce")]
    assert list(ours) == kept
    for p in kept:
        assert ours[p].default == theirs[p].default or (
            isinstance(theirs[p].default, float) and ours[p].default == theirs[p].default
        ), p


def bce_case(rng, dtype, logits=False):
    x = rng.standard_normal((4, 3)) * 3 if logits else rng.uniform(0.02, 0.98, (4, 3))
    return x.astype(dtype), rng.uniform(0, 1, (4, 3)).astype(dtype)


def cross_entropy_case(rng, dtype, shape, target):
    z = (rng.standard_normal(shape) * 2).astype(dtype)
    if target == "probs":
        t = rng.uniform(0, 1, shape)
        return z, (t / t.sum(axis=1, keepdims=True)).astype(dtype)
    labels = rng.integers(0, shape[1], shape[:1] + shape[2:])
    if target == "some":
        labels.reshape(-1)[::3] = -100
    return z, labels


def weight(rng, shape, dtype):
    return rng.uniform(0.2, 2.0, shape).astype(dtype)


# (our class, options) -- each option alone and together
def loss_configs(dtype, rng):
    w3, w1 = weight(rng, (3,), dtype), weight(rng, (4, 1), dtype)
    configs = []
    for reduction in ("mean", "sum", "none"):
        configs += [
            ("BCELoss", dict(reduction=reduction), "bce"),
            ("BCELoss", dict(weight=w3, reduction=reduction), "bce"),
            ("BCELoss", dict(weight=w1, reduction=reduction), "bce"),
            ("BCEWithLogitsLoss", dict(reduction=reduction), "logits"),
            ("BCEWithLogitsLoss", dict(pos_weight=w3, reduction=reduction), "logits"),
            ("BCEWithLogitsLoss", dict(weight=w1, pos_weight=w3, reduction=reduction), "logits"),
        ]
        for shape, target in [((5, 3), "index"), ((5, 3), "some"), ((2, 3, 4), "some")] + [
            ((5, 3), "probs"),
            ((2, 3, 2, 2), "probs"),
        ]:
            for options in (
                {},
                dict(weight=w3),
                dict(label_smoothing=0.2),
                dict(weight=w3, label_smoothing=0.3),
            ):
                configs.append(
                    ("CrossEntropyLoss", dict(reduction=reduction, **options), (shape, target))
                )
    configs.append(
        ("CrossEntropyLoss", dict(ignore_index=1, weight=w3, reduction="mean"), ((6, 3), "index"))
    )
    return configs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_loss_layers_with_options_match_torch(dtype):
    rng = np.random.default_rng(31)
    for name, options, data in loss_configs(dtype, rng):
        if data in ("bce", "logits"):
            x, y = bce_case(rng, dtype, logits=data == "logits")
        else:
            x, y = cross_entropy_case(rng, dtype, *data)
        what = f"{name}({options}) on {data}"
        ours = getattr(nn, name)(**options)
        theirs = getattr(tnn, name)(
            **{k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
        )
        xt = torch.tensor(x, requires_grad=True)
        lt = theirs(xt, torch.tensor(y))
        loss = ours(x, y)
        if options["reduction"] == "none":
            grad_output = rng.standard_normal(lt.shape).astype(dtype)
            assert isinstance(loss, np.ndarray) and loss.dtype == dtype, what
            np.testing.assert_array_equal(ours.loss, loss)  # the trace shows the losses
        else:
            grad_output = 0.25
            assert isinstance(loss, float), what
        lt.backward(torch.tensor(grad_output, dtype=lt.dtype))
        assert_close(loss, lt.detach().numpy(), TOL[dtype], what)
        grad = ours.backward(grad_output)
        assert_close(grad, xt.grad.numpy(), TOL[dtype], what + " grad")
        np.testing.assert_array_equal(ours.grad_input, grad)


def test_loss_layers_refuse_bad_options_when_built():
    for make, message in [
        (lambda: nn.BCELoss(reduction="avg"), "[BCELoss] reduction: expected 'mean', 'sum'"),
        (lambda: nn.BCEWithLogitsLoss(reduction=None), "[BCEWithLogitsLoss] reduction: "),
        (
            lambda: nn.CrossEntropyLoss(label_smoothing=1.5),
            "[CrossEntropyLoss] label_smoothing: expected a number in [0, 1], got 1.5",
        ),
        (
            lambda: nn.CrossEntropyLoss(weight=np.ones((2, 2))),
            "[CrossEntropyLoss] weight: expected 1 dim (one weight per class), got shape (2, 2)",
        ),
    ]:
        with pytest.raises(ValueError) as info:
            make()
        assert str(info.value).startswith(message)


def test_loss_layer_option_errors_at_the_call():
    with pytest.raises(ValueError, match=r"^\[cross_entropy\] weight: expected shape \(4,\)"):
        nn.CrossEntropyLoss(weight=np.ones(3))(np.zeros((2, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"^\[binary_cross_entropy\] weight: expected a shape"):
        nn.BCELoss(weight=np.ones(2))(np.full((2, 3), 0.5), np.ones((2, 3)))
    loss_fn = nn.BCELoss(reduction="none")
    loss_fn(np.full((2, 3), 0.5), np.ones((2, 3)))
    with pytest.raises(
        ValueError,
        match=r"^\[binary_cross_entropy_backward\] grad_output: expected an array of shape "
        r"\(2, 3\) \(the loss's, reduction='none'\), got a number",
    ):
        loss_fn.backward()
    with pytest.raises(ValueError, match=r"grad_output: expected shape \(2, 3\)"):
        loss_fn.backward(np.ones(3))
    reduced = nn.BCELoss()
    reduced(np.full((2, 3), 0.5), np.ones((2, 3)))
    with pytest.raises(ValueError, match="expected a number"):
        reduced.backward(np.ones((2, 3)))


# ---------------------------------------------------------------------------------------
# train_step with every option, against the same steps in torch (float64)
# ---------------------------------------------------------------------------------------


def network(lib, out, head=None):
    """x (N, 6) -> Linear(6, 5) -> Tanh -> Linear(5, out) [-> head]."""
    if lib is nn:
        layers = [nn.Linear(6, 5, dtype=F64), nn.Tanh(), nn.Linear(5, out, dtype=F64)]
        return nn.Sequential(*layers, *([nn.Sigmoid()] if head else []))
    layers = [tnn.Linear(6, 5), tnn.Tanh(), tnn.Linear(5, out)]
    return tnn.Sequential(*layers, *([tnn.Sigmoid()] if head else [])).double()


def conv_network(lib):
    """x (N, 1, 5, 5) -> Conv2d(1, 3, 3, padding=1): per-pixel logits of 3 classes."""
    if lib is nn:
        return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, dtype=F64))
    return tnn.Sequential(tnn.Conv2d(1, 3, 3, padding=1)).double()


def train_runs():
    rng = np.random.default_rng(5)
    w4, pw4 = rng.uniform(0.3, 2, 4), rng.uniform(0.3, 3, 4)
    w3 = rng.uniform(0.3, 2, 3)
    runs = []
    for reduction in ("mean", "sum"):
        runs += [
            ("BCELoss", dict(reduction=reduction, weight=w4), "bce"),
            ("BCEWithLogitsLoss", dict(reduction=reduction), "logits"),
            ("BCEWithLogitsLoss", dict(reduction=reduction, weight=w4, pos_weight=pw4), "logits"),
            ("CrossEntropyLoss", dict(reduction=reduction, weight=w3), "index"),
            ("CrossEntropyLoss", dict(reduction=reduction, label_smoothing=0.1), "some"),
            (
                "CrossEntropyLoss",
                dict(reduction=reduction, weight=w3, label_smoothing=0.2, ignore_index=2),
                "index",
            ),
            ("CrossEntropyLoss", dict(reduction=reduction, weight=w3), "probs"),
            ("CrossEntropyLoss", dict(reduction=reduction, label_smoothing=0.1), "spatial"),
        ]
    return runs


RUNS = train_runs()


def batch(rng, kind):
    if kind == "spatial":
        x = rng.standard_normal((4, 1, 5, 5))
        labels = rng.integers(0, 3, (4, 5, 5))
        labels[:, 0, :] = -100
        return x, labels
    x = rng.standard_normal((8, 6))
    if kind in ("bce", "logits"):
        return x, rng.choice([0.0, 1.0, 0.4], (8, 4))
    if kind == "probs":
        t = rng.uniform(0, 1, (8, 3))
        return x, t / t.sum(axis=1, keepdims=True)
    labels = rng.integers(0, 3, 8)
    if kind == "some":
        labels[::3] = -100
    return x, labels


@pytest.mark.parametrize(
    "name,options,kind",
    RUNS,
    ids=[f"{n}-{k}-" + "-".join(sorted(o)) + f"-{o['reduction']}" for n, o, k in RUNS],
)
def test_train_step_with_loss_options_equals_torch(name, options, kind):
    torch.manual_seed(3)
    if kind == "spatial":
        tmodel, model = conv_network(tnn), conv_network(nn)
    else:
        out = 4 if kind in ("bce", "logits") else 3
        tmodel, model = network(tnn, out, kind == "bce"), network(nn, out, kind == "bce")
    model.load_state_dict({k: v.detach().numpy() for k, v in tmodel.state_dict().items()})
    loss_fn = getattr(nn, name)(**options)
    tloss_fn = getattr(tnn, name)(
        **{k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in options.items()}
    )
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(11)
    for step in range(4):
        x, y = batch(rng, kind)
        loss = model.train_step(x, y, loss_fn, opt)
        topt.zero_grad()
        tloss = tloss_fn(tmodel(torch.tensor(x)), torch.tensor(y))
        tloss.backward()
        topt.step()
        assert_close(loss, tloss.item(), 1e-10, f"loss at step {step}")
    for k, v in tmodel.state_dict().items():
        assert_close(model.state_dict()[k], v.numpy(), 1e-10, k)


@pytest.mark.parametrize(
    "loss_fn",
    [nn.BCEWithLogitsLoss(reduction="none"), nn.CrossEntropyLoss(reduction="none")],
    ids=repr,
)
def test_train_step_refuses_an_unreduced_loss(loss_fn):
    model = network(nn, 3)
    opt = optim.SGD(model.parameters(), lr=0.1)
    before = [p.data.copy() for p in model.parameters()]
    x = np.ones((2, 6))
    y = np.array([0, 1]) if isinstance(loss_fn, nn.CrossEntropyLoss) else np.ones((2, 3))
    message = (
        "[train_step] loss: expected reduction 'mean' or 'sum' (a scalar loss to step on), "
        f"got {type(loss_fn).__name__} with reduction 'none'"
    )
    with pytest.raises(ValueError) as info:
        model.train_step(x, y, loss_fn, opt)
    assert str(info.value) == message
    for p, b in zip(model.parameters(), before, strict=True):
        np.testing.assert_array_equal(p.data, b)  # nothing was stepped
    # the loss itself works: its losses, then a backward given their gradient
    out = model(x)
    losses = loss_fn(out, y)
    assert isinstance(losses, np.ndarray)
    model.backward(loss_fn.backward(np.ones_like(losses)))
