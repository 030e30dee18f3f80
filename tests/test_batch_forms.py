"""Unbatched inputs and empty batches, as torch takes them: every op and layer that takes
(N, C, H, W) also takes (C, H, W) and returns the unbatched result (the batched call's one
sample, bit for bit); cross_entropy takes unbatched logits (K,); and N = 0 gives empty
outputs and zero parameter gradients instead of an error."""

import math

import numpy as np
import pytest
from cnnbp import functional as F
from cnnbp import nn
from conftest import DTYPES, randn, rng_for

DTYPE_IDS = ["float32", "float64"]

# conv2d's options, and the pools': (kwargs, weight shape for x (3, 9, 8))
CONV_OPTIONS = [
    (dict(), (4, 3, 3, 3)),
    (dict(stride=2, padding=1), (4, 3, 3, 2)),
    (dict(padding="same", dilation=2), (4, 3, 3, 3)),
    (dict(padding=1, groups=3), (6, 1, 3, 3)),  # depthwise
]
POOL_OPTIONS = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options, w_shape", CONV_OPTIONS, ids=str)
def test_conv2d_unbatched_is_the_batched_sample(options, w_shape, dtype):
    rng = rng_for(options, dtype)
    x, w, b = randn(rng, (3, 9, 8), dtype), randn(rng, w_shape, dtype), randn(rng, (4,), dtype)
    if w_shape[0] != 4:
        b = randn(rng, (w_shape[0],), dtype)
    y = F.conv2d(x, w, b, **options)
    y_batched = F.conv2d(x[None], w, b, **options)
    assert y.shape == y_batched.shape[1:]
    np.testing.assert_array_equal(y, y_batched[0])
    dy = randn(rng, y.shape, dtype)
    grads = F.conv2d_backward(dy, x, w, **options)
    batched = F.conv2d_backward(dy[None], x[None], w, **options)
    assert grads[0].shape == x.shape
    np.testing.assert_array_equal(grads[0], batched[0][0])
    for got, want in zip(grads[1:], batched[1:]):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"^\[conv2d_backward\] doutput: expected shape"):
        F.conv2d_backward(dy[None], x, w, **options)  # the output's form, not the other


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", POOL_OPTIONS, ids=str)
def test_pools_unbatched_are_the_batched_sample(options, dtype):
    rng = rng_for(options, dtype)
    x = randn(rng, (3, 9, 8), dtype)
    y, idx = F.max_pool2d(x, **options)
    y_batched, idx_batched = F.max_pool2d(x[None], **options)
    np.testing.assert_array_equal(y, y_batched[0])
    np.testing.assert_array_equal(idx, idx_batched[0])
    dy = randn(rng, y.shape, dtype)
    dx = F.max_pool2d_backward(dy, idx, x.shape)
    np.testing.assert_array_equal(dx, F.max_pool2d_backward(dy[None], idx[None], (1,) + x.shape)[0])
    a = F.avg_pool2d(x, **options)
    np.testing.assert_array_equal(a, F.avg_pool2d(x[None], **options)[0])
    da = F.avg_pool2d_backward(dy, x.shape, **options)
    batched = F.avg_pool2d_backward(dy[None], (1,) + x.shape, **options)
    np.testing.assert_array_equal(da, batched[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cross_entropy_takes_unbatched_logits_as_torch(dtype):
    rng = rng_for("ce", dtype)
    z = randn(rng, (5,), dtype)
    targets = [np.array(3), np.array(-100), rng.dirichlet(np.ones(5)).astype(dtype)]
    for target in targets:
        for reduction in ("mean", "sum", "none"):
            loss = F.cross_entropy(z, target, reduction=reduction, label_smoothing=0.1)
            batched = F.cross_entropy(
                z[None], target[None], reduction=reduction, label_smoothing=0.1
            )
            np.testing.assert_array_equal(np.asarray(loss), np.asarray(batched).reshape(()))
            g = None if reduction != "none" else np.asarray(2.0, dtype)
            dz = F.cross_entropy_backward(
                z, target, reduction=reduction, label_smoothing=0.1, grad_output=g
            )
            g_batched = None if g is None else g[None]
            want = F.cross_entropy_backward(
                z[None],
                target[None],
                reduction=reduction,
                label_smoothing=0.1,
                grad_output=g_batched,
            )
            np.testing.assert_array_equal(dz, want[0])
    torch = pytest.importorskip("torch")
    want = torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(3), reduction="none")
    got = F.cross_entropy(z, np.array(3), reduction="none")
    assert np.shape(got) == tuple(want.shape) == ()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


def unbatched_layers(dtype):
    return [
        nn.Conv2d(3, 4, 3, padding="same", groups=1, dtype=dtype),
        nn.Conv2d(3, 6, 3, stride=2, groups=3, dtype=dtype),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.AvgPool2d(3, 2, 1),
        nn.ReLU(),
        nn.Tanh(),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layers_take_unbatched_inputs(dtype):
    rng = rng_for("layers", dtype)
    x = randn(rng, (3, 9, 8), dtype)
    for layer in unbatched_layers(dtype):
        y = layer(x)
        dy = randn(rng, y.shape, dtype)
        dx = layer.backward(dy)
        grads = [p.grad.copy() for p in layer.parameters()]
        layer.zero_grad()
        y_batched = layer(x[None])
        dx_batched = layer.backward(dy[None])
        np.testing.assert_array_equal(y, y_batched[0])
        np.testing.assert_array_equal(dx, dx_batched[0])
        for got, p in zip(grads, layer.parameters()):
            np.testing.assert_array_equal(got, p.grad)


# an empty batch through every op: (name, call, expected shapes)
def empty_batch_calls(dtype):
    x = np.zeros((0, 3, 9, 8), dtype)
    w = np.ones((6, 1, 3, 3), dtype)
    dy_conv = np.zeros((0, 6, 9, 8), dtype)
    y, idx = F.max_pool2d(x, 2)
    return [
        ("conv2d", lambda: F.conv2d(x, w, np.ones(6, dtype), padding=1, groups=3), [(0, 6, 9, 8)]),
        (
            "conv2d_backward",
            lambda: F.conv2d_backward(dy_conv, x, w, padding=1, groups=3),
            [(0, 3, 9, 8), (6, 1, 3, 3), (6,)],
        ),
        ("max_pool2d", lambda: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), [(0, 3, 5, 5)] * 2),
        ("max_pool2d_backward", lambda: F.max_pool2d_backward(y, idx, x.shape), [x.shape]),
        ("avg_pool2d", lambda: F.avg_pool2d(x, 2), [(0, 3, 4, 4)]),
        ("avg_pool2d_backward", lambda: F.avg_pool2d_backward(y, x.shape, 2), [x.shape]),
        ("relu", lambda: F.relu(x), [x.shape]),
        ("dropout", lambda: F.dropout(x, 0.5, 3), [x.shape, x.shape]),
        ("flatten", lambda: F.flatten(x), [(0, 216)]),
        (
            "linear_backward",
            lambda: F.linear_backward(
                np.zeros((0, 2), dtype), np.zeros((0, 5), dtype), np.ones((2, 5), dtype)
            ),
            [(0, 5), (2, 5), (2,)],
        ),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_op_takes_an_empty_batch(dtype):
    for name, call, shapes in empty_batch_calls(dtype):
        out = call()
        out = out if isinstance(out, tuple) else (out,)
        assert [a.shape for a in out] == shapes, name
        for a in out[1:] if name.endswith("_backward") else ():
            assert a.size == 0 or not a.any(), f"{name}: parameter gradients of nothing are 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_losses_of_an_empty_batch_are_torchs(dtype):
    """The mean of no losses is NaN (0 / 0), their sum 0, 'none' an empty array."""
    empty = np.zeros((0, 4), dtype)
    labels = np.zeros(0, np.int64)
    for reduction, want in (("mean", math.nan), ("sum", 0.0)):
        for loss in (
            F.binary_cross_entropy(empty, empty, reduction=reduction),
            F.binary_cross_entropy_with_logits(empty, empty, reduction=reduction),
            F.cross_entropy(empty, labels, reduction=reduction),
        ):
            np.testing.assert_equal(loss, want)
    assert F.cross_entropy(empty, labels, reduction="none").shape == (0,)
    assert F.cross_entropy_backward(empty, labels).shape == (0, 4)
    assert F.binary_cross_entropy_backward(empty, empty).shape == (0, 4)
    torch = pytest.importorskip("torch")
    t = torch.zeros(0, 4, dtype=torch.float64)
    assert math.isnan(torch.nn.functional.binary_cross_entropy(t, t).item())
    assert (
        torch.nn.functional.cross_entropy(t, torch.zeros(0, dtype=torch.long), reduction="sum") == 0
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_a_model_takes_an_empty_batch(dtype):
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, groups=3, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 2, dtype=dtype),
    )
    y = model(np.zeros((0, 3, 9, 8), dtype))
    assert y.shape == (0, 2)
    dx = model.backward(np.zeros((0, 2), dtype))
    assert dx.shape == (0, 3, 9, 8)
    for p in model.parameters():
        np.testing.assert_array_equal(p.grad, np.zeros_like(p.data))
