"""cnnbp.no_grad: forwards that keep nothing for a backward give the same outputs, bit for
bit, while a container recycles the outputs it has passed on (outputs of 1 MiB and more);
the trace then shows no inputs, backward and train_step refuse, and the mode is per
thread, nests and comes back."""

import threading

import cnnbp
import numpy as np
import pytest
from cnnbp import nn, optim, train
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
