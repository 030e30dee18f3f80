"""cnnbp.no_grad: forwards that keep nothing for a backward give the same outputs, bit for
bit, while a container recycles the outputs it has passed on (outputs of 1 MiB and more);
the trace then shows no inputs, backward and train_step refuse, and the mode is per
thread, nests and comes back."""

import threading

import cnnbp
import numpy as np
import pytest
from cnnbp import nn, optim, train
from hypothesis import given, settings
from hypothesis import strategies as st
from test_containers import nested_model

F32, F64 = np.float32, np.float64


def networks():
    """(name, model in eval mode, input): the CLI's networks at a batch whose outputs are
    recycled, and every kind of nesting in float64."""
    rng = np.random.default_rng(0)
    nn.manual_seed(3)
    out = []
    for arch, shape, n in (("resnet", (1, 28, 28), 64), ("cnn", (1, 8, 8), 256)):
        model = train.ARCHITECTURES[arch].build(shape, 10)
        out.append((arch, model, rng.standard_normal((n, *shape)).astype(F32)))
    out.append(("nested", nested_model(nn, F64), rng.standard_normal((40, 2, 32, 32))))
    for _, model, _ in out:
        model.eval()
    return out


@pytest.mark.parametrize("index", range(3), ids=["resnet", "cnn", "nested"])
def test_outputs_are_the_same_bits_and_the_trace_comes_back(index):
    _, model, x = networks()[index]
    expected = model(x)
    trace = dict(model.trace())
    with cnnbp.no_grad():
        for _ in range(3):  # the later passes run on storage recycled by the earlier ones
            np.testing.assert_array_equal(model(x), expected)
        assert model.output is not None and np.array_equal(model.output, expected)
        recycled = [name for name, entry in model.trace() if entry["output"] is None]
        assert recycled, "no output was recycled"
        assert all(entry["input"] is None for _, entry in model.trace())
    # with gradients again, every layer's output as before
    np.testing.assert_array_equal(model(x), expected)
    for name, entry in model.trace():
        np.testing.assert_array_equal(entry["output"], trace[name]["output"], err_msg=name)


def test_a_backward_after_it_raises_and_a_training_step_is_refused():
    nn.manual_seed(4)
    model = train.ARCHITECTURES["cnn"].build((1, 8, 8), 10)
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(F32)
    y = np.arange(4) % 10
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=0.1)
    with cnnbp.no_grad():
        loss_fn(model(x), y)
        with pytest.raises(RuntimeError, match=r"\[Linear\] backward called before forward"):
            model.backward(loss_fn.backward())
        with pytest.raises(RuntimeError, match=r"\[train_step\] expected gradients enabled"):
            model.train_step(x, y, loss_fn, opt)
    # and the same model trains as one that never ran without gradients
    nn.manual_seed(4)
    twin = train.ARCHITECTURES["cnn"].build((1, 8, 8), 10)
    twin_opt = optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(2):
        assert model.train_step(x, y, loss_fn, opt) == twin.train_step(x, y, loss_fn, twin_opt)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)


def test_the_mode_is_per_thread_nests_and_is_restored():
    assert cnnbp.is_grad_enabled()
    seen = []
    with cnnbp.no_grad():
        assert not cnnbp.is_grad_enabled()
        with cnnbp.no_grad():
            assert not cnnbp.is_grad_enabled()
        assert not cnnbp.is_grad_enabled()
        other = threading.Thread(target=lambda: seen.append(cnnbp.is_grad_enabled()))
        other.start()
        other.join()
    assert seen == [True]
    assert cnnbp.is_grad_enabled()
    with pytest.raises(KeyError):
        with cnnbp.no_grad():
            raise KeyError("inside")
    assert cnnbp.is_grad_enabled()

    @cnnbp.no_grad()
    def infer(depth):
        assert not cnnbp.is_grad_enabled()
        return depth if depth == 0 else infer(depth - 1)

    infer(3)
    assert cnnbp.is_grad_enabled()


def conv_norm_relu(dtype, conv_args, parts, end=False, bias=True):
    """Conv2d, then the parts ("bn", "relu") in order, then a Flatten unless `end`; in eval
    mode, the BatchNorm2d with running statistics, weight and bias of its own."""
    rng = np.random.default_rng(len(parts) + 10 * len(conv_args))
    c_in, k = conv_args["in_channels"], conv_args["out_channels"]
    layers = [nn.Conv2d(**conv_args, bias=bias, dtype=dtype)]
    for part in parts:
        if part == "bn":
            norm = nn.BatchNorm2d(k, dtype=dtype)
            norm.load_state_dict(
                {
                    "weight": rng.standard_normal(k).astype(dtype),
                    "bias": rng.standard_normal(k).astype(dtype),
                    "running_mean": rng.standard_normal(k).astype(dtype),
                    "running_var": (rng.random(k) + 0.1).astype(dtype),
                    "num_batches_tracked": np.array(3),
                }
            )
            layers.append(norm)
        else:
            layers.append(nn.ReLU())
    if not end:
        layers.append(nn.Flatten())
    model = nn.Sequential(*layers)
    model.eval()
    return model, rng.standard_normal((5, c_in, 9, 10)).astype(dtype)


CONVS = [
    dict(in_channels=3, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2),
    dict(in_channels=4, out_channels=8, kernel_size=1, stride=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=4),
    dict(in_channels=2, out_channels=3, kernel_size=2, dilation=2),
]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("conv", range(len(CONVS)))
@pytest.mark.parametrize("parts", [("bn", "relu"), ("bn",), ("relu",)])
@pytest.mark.parametrize("end", [False, True])
def test_a_conv_applies_the_batch_norm_and_relu_after_it_with_their_bits(dtype, conv, parts, end):
    model, x = conv_norm_relu(dtype, CONVS[conv], parts, end, bias=conv % 2 == 0)
    expected = model(x)
    with cnnbp.no_grad():
        got = model(x)
        # fused: the layers the conv stood in for show nothing, the conv no output of its own
        assert all(model[i].output is None for i in range(len(parts) + 1))
        np.testing.assert_array_equal(model.output, expected)
    np.testing.assert_array_equal(got, expected)


def test_a_batch_norm_with_batch_statistics_is_not_fused():
    x = np.random.default_rng(5).standard_normal((6, 2, 7, 7)).astype(F32)
    for training, track in ((True, True), (False, False)):
        built = []
        for _ in range(2):
            nn.manual_seed(6)
            model = nn.Sequential(
                nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=track), nn.ReLU()
            )
            model.train(training)
            built.append(model)
        expected = built[0](x)
        with cnnbp.no_grad():
            np.testing.assert_array_equal(built[1](x), expected)
            assert built[1][1].output is not None  # it ran on its own
        for (name, a), (_, b) in zip(built[0].state_dict().items(), built[1].state_dict().items()):
            np.testing.assert_array_equal(a, b, err_msg=name)  # the running statistics too


def test_what_the_fused_layers_would_refuse_is_refused_the_same():
    rng = np.random.default_rng(7)
    wrong = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(5), nn.ReLU())
    unbatched = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    for model, x in (
        (wrong, rng.standard_normal((2, 1, 6, 6))),
        (unbatched, rng.random((1, 6, 6))),
    ):
        model.eval()
        x = x.astype(F32)
        with pytest.raises(ValueError) as plain:
            model(x)
        with cnnbp.no_grad(), pytest.raises(ValueError) as fused:
            model(x)
        assert str(fused.value) == str(plain.value)


def block(kind, c, out, dtype):
    """One piece of a drawn network, taking c channels to `out` (the same size)."""

    def conv(i, o, k=3):
        return nn.Conv2d(i, o, k, padding=k // 2, dtype=dtype)

    def bn(o):
        return nn.BatchNorm2d(o, dtype=dtype)

    if kind == "conv_bn_relu":
        return [conv(c, out), bn(out), nn.ReLU()]
    if kind == "conv_relu":
        return [conv(c, out), nn.ReLU()]
    if kind == "conv_bn":
        return [conv(c, out), bn(out)]
    if kind == "residual":
        body = nn.Sequential(conv(c, out), bn(out), nn.ReLU(), conv(out, out), bn(out))
        return [nn.Residual(body, None if c == out else nn.Sequential(conv(c, out, 1), bn(out)))]
    if kind == "concat":
        half = out // 2
        return [nn.Concat(nn.Sequential(conv(c, half), nn.ReLU()), conv(c, out - half, 1))]
    return [nn.BatchNorm2d(c, dtype=dtype), nn.ReLU(), conv(c, out)]  # "bn_relu_conv"


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    kinds=st.lists(
        st.sampled_from(
            ["conv_bn_relu", "conv_relu", "conv_bn", "residual", "concat", "bn_relu_conv"]
        ),
        min_size=1,
        max_size=5,
    ),
    widths=st.lists(st.integers(2, 9), min_size=5, max_size=5),
    relu_after=st.lists(st.booleans(), min_size=5, max_size=5),
    head=st.booleans(),
    N=st.sampled_from([1, 3, 40]),
    dtype=st.sampled_from([F32, F64]),
)
def test_drawn_networks_give_the_same_bits_under_no_grad(kinds, widths, relu_after, head, N, dtype):
    # 40 images of 8 channels on 28x28 are about 1 MiB in float32: some outputs recycle
    nn.manual_seed(len(kinds) + sum(widths))
    layers, c = [nn.Conv2d(2, widths[0], 3, padding=1, dtype=dtype)], widths[0]
    for i, kind in enumerate(kinds):
        layers += block(kind, c, widths[i], dtype)
        c = widths[i]
        if relu_after[i]:
            layers.append(nn.ReLU())
    if head:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3, dtype=dtype)]
    model = nn.Sequential(*layers)
    x = np.random.default_rng(N).standard_normal((N, 2, 28, 28)).astype(dtype)
    model.train()
    model(x)  # running statistics of the BatchNorm2d layers
    model.eval()
    expected = model(x)
    with cnnbp.no_grad():
        for _ in range(2):
            np.testing.assert_array_equal(model(x), expected)
    np.testing.assert_array_equal(model(x), expected)
