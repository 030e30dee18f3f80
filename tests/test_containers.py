"""Residual and Concat: nested models against the same network built in PyTorch (weights
moved by state_dict names), against finite differences, through the trace's dotted names,
model files and the checks of their arguments."""

import cnnbp
import numpy as np
import pytest
from cnnbp import nn, optim
from cnnbp.gradcheck import numeric_gradient
from test_validation import raises

F32, F64 = np.float32, np.float64


def nested_model(lib, dtype=F64, residual=None, concat=None):
    """A network with every kind of nesting: a plain Residual (with a BatchNorm2d inside), a
    Residual with a strided shortcut, a Concat whose branches are a Sequential, a pool and a
    Residual. `lib` is cnnbp.nn or torch.nn (with the torch containers below)."""
    residual = residual or lib.Residual
    concat = concat or lib.Concat
    kw = {"dtype": dtype} if lib is nn else {}
    return lib.Sequential(
        lib.Conv2d(2, 4, 3, padding=1, **kw),
        lib.ReLU(),
        residual(
            lib.Sequential(
                lib.Conv2d(4, 4, 3, padding=1, **kw),
                lib.BatchNorm2d(4, **kw),
                lib.Tanh(),
                lib.Conv2d(4, 4, 3, padding=1, **kw),
            )
        ),
        residual(
            lib.Sequential(lib.Conv2d(4, 6, 3, stride=2, padding=1, **kw), lib.SiLU()),
            lib.Conv2d(4, 6, 1, stride=2, **kw),
        ),
        concat(
            lib.Sequential(lib.Conv2d(6, 3, 1, **kw), lib.ReLU()),
            lib.AvgPool2d(3, stride=1, padding=1),
            residual(lib.Conv2d(6, 6, 3, padding=1, **kw)),
        ),
        lib.AdaptiveAvgPool2d(1),
        lib.Flatten(),
        lib.Linear(15, 5, **kw),
    )


def torch_containers(torch):
    class Residual(torch.nn.Module):
        def __init__(self, block, shortcut=None):
            super().__init__()
            self.block = block
            self.shortcut = shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    class Concat(torch.nn.Module):
        def __init__(self, *branches):
            super().__init__()
            for i, branch in enumerate(branches):
                self.add_module(str(i), branch)

        def forward(self, x):
            return torch.cat([branch(x) for branch in self.children()], 1)

    return Residual, Concat


def data(dtype, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, 8, 8)).astype(dtype), rng.integers(0, 5, n)


def torch_twin(torch, model, dtype):
    residual, concat = torch_containers(torch)
    twin = nested_model(torch.nn, residual=residual, concat=concat).to(
        torch.float64 if dtype == F64 else torch.float32
    )
    state = model.state_dict()
    assert list(state) == list(twin.state_dict())  # the same names, in the same order
    twin.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    return twin


# float64: only the summation orders differ; float32: those orders, in float32
TOL = {F64: dict(rtol=1e-10, atol=1e-12), F32: dict(rtol=2e-4, atol=2e-5)}


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_nested_model_matches_torch_outputs_and_every_gradient(dtype):
    torch = pytest.importorskip("torch")
    nn.manual_seed(1)
    model = nested_model(nn, dtype)
    twin = torch_twin(torch, model, dtype)
    x, y = data(dtype)
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(model(x), y)
    dx = model.backward(loss_fn.backward())

    xt = torch.tensor(x, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(twin(xt), torch.tensor(y))
    lt.backward()
    np.testing.assert_allclose(loss, lt.item(), **TOL[dtype])
    np.testing.assert_allclose(dx, xt.grad.numpy(), **TOL[dtype], err_msg="dL/dx")
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, grads[name].grad.numpy(), **TOL[dtype], err_msg=name)


def test_nested_model_trains_as_torch_does():
    torch = pytest.importorskip("torch")
    nn.manual_seed(2)
    model = nested_model(nn, F64)
    twin = torch_twin(torch, model, F64)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_t = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(4):
        x, y = data(F64, n=4, seed=step)
        loss = model.train_step(x, y, loss_fn, opt)  # the whole tree in one call into C++
        opt_t.zero_grad()
        lt = torch.nn.functional.cross_entropy(twin(torch.tensor(x)), torch.tensor(y))
        lt.backward()
        opt_t.step()
        np.testing.assert_allclose(loss, lt.item(), rtol=1e-10, err_msg=f"step {step}")
    for name, value in twin.state_dict().items():
        np.testing.assert_allclose(
            model.state_dict()[name], value.numpy(), rtol=1e-9, atol=1e-12, err_msg=name
        )


def test_nested_gradients_match_finite_differences():
    nn.manual_seed(3)
    model = nested_model(nn, F64)
    x, y = data(F64, n=2, seed=5)
    loss_fn = nn.CrossEntropyLoss()
    report = cnnbp.gradcheck(model, x, y, loss_fn, max_entries=40)
    assert report.passed, str(report)
    loss_fn(model(x), y)
    dx = model.backward(loss_fn.backward())
    probe = x.copy()
    numeric = numeric_gradient(lambda: loss_fn(model(probe), y), probe)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-9)


def test_a_float32_nested_model_is_checked_on_its_float64_copy():
    nn.manual_seed(4)
    model = nested_model(nn, F32)
    x, y = data(F32, n=2, seed=6)
    report = cnnbp.gradcheck(model, x, y, nn.CrossEntropyLoss(), max_entries=20)
    assert report.passed, str(report)
    assert len(report.parameters) == len(model.parameters())


def test_trace_names_every_module_by_its_dotted_path():
    nn.manual_seed(5)
    model = nested_model(nn, F64)
    x, y = data(F64)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    trace = dict(model.trace())
    assert list(trace) == [
        "0", "1",
        "2", "2.block", "2.block.0", "2.block.1", "2.block.2", "2.block.3",
        "3", "3.block", "3.block.0", "3.block.1", "3.shortcut",
        "4", "4.0", "4.0.0", "4.0.1", "4.1", "4.2", "4.2.block",
        "5", "6", "7",
    ]  # fmt: skip
    # a Residual's output is the sum of its paths, its grad_input the sum of their gradients
    r = trace["3"]
    np.testing.assert_array_equal(
        r["output"], trace["3.block.1"]["output"] + trace["3.shortcut"]["output"]
    )
    np.testing.assert_array_equal(
        r["grad_input"], trace["3.block.0"]["grad_input"] + trace["3.shortcut"]["grad_input"]
    )
    np.testing.assert_array_equal(
        trace["2"]["output"], trace["2.block.3"]["output"] + trace["2"]["input"]
    )
    np.testing.assert_array_equal(
        trace["2"]["grad_input"], trace["2.block.0"]["grad_input"] + trace["2"]["grad_output"]
    )
    # a Concat's branches see slices of its output gradient
    c = trace["4"]
    np.testing.assert_array_equal(c["grad_output"][:, :3], trace["4.0"]["grad_output"])
    np.testing.assert_array_equal(c["grad_output"][:, 3:9], trace["4.1"]["grad_output"])
    np.testing.assert_array_equal(c["grad_output"][:, 9:], trace["4.2"]["grad_output"])
    np.testing.assert_array_equal(
        c["output"],
        np.concatenate([trace[k]["output"] for k in ("4.0", "4.1", "4.2")], axis=1),
    )
    assert trace["2.block.0"]["weight.grad"].shape == (4, 4, 3, 3)


def test_state_dict_keys_are_dotted_paths():
    model = nested_model(nn, F64)
    keys = list(model.state_dict())
    assert keys[:4] == ["0.weight", "0.bias", "2.block.0.weight", "2.block.0.bias"]
    assert keys[4:9] == [
        "2.block.1.weight",
        "2.block.1.bias",
        "2.block.1.running_mean",
        "2.block.1.running_var",
        "2.block.1.num_batches_tracked",
    ]
    assert "3.shortcut.weight" in keys and "4.0.0.weight" in keys and "4.2.block.weight" in keys
    assert keys[-1] == "7.bias"


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_nested_model_file_round_trip(tmp_path, dtype):
    nn.manual_seed(6)
    model = nested_model(nn, dtype)
    x, _ = data(dtype)
    model.save(tmp_path / "nested.npz")
    loaded = cnnbp.load(tmp_path / "nested.npz")
    assert repr(loaded) == repr(model)
    assert isinstance(loaded[2], nn.Residual) and loaded[2].shortcut is None
    assert isinstance(loaded[3].shortcut, nn.Conv2d) and isinstance(loaded[4], nn.Concat)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(loaded(x), model(x))


def test_train_and_eval_reach_nested_layers():
    nn.manual_seed(7)
    drop = nn.Dropout(0.5)
    model = nn.Sequential(nn.Residual(nn.Sequential(nn.Linear(6, 6, dtype=F64), drop)))
    x = np.ones((4, 6))
    model.eval()
    assert not drop.training
    a, b = model(x), model(x)
    np.testing.assert_array_equal(a, b)  # no dropout in eval mode
    model.train()
    assert drop.training
    assert not np.array_equal(model(x), model(x))


def test_zero_grad_reaches_nested_parameters():
    model = nested_model(nn, F64)
    x, y = data(F64)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_a_python_module_runs_inside_a_residual():
    class Double(nn.Module):
        def forward(self, x):
            self.input = x
            return 2 * x

        def backward(self, dy):
            return 2 * dy

    model = nn.Sequential(nn.Residual(Double()))
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(model(x), 3 * x)
    np.testing.assert_array_equal(model.backward(np.ones_like(x)), np.full_like(x, 3.0))


def test_container_arguments_are_checked():
    conv = nn.Conv2d(2, 2, 1)
    with raises(ValueError, "[Residual] shortcut: expected a layer other than the block"):
        nn.Residual(conv, conv)
    with raises(ValueError, "[Concat] branch 1: expected a layer other than the earlier branches"):
        nn.Concat(conv, conv)
    with raises(ValueError, "[Concat] branches: expected at least one, got none"):
        nn.Concat()
    with raises(TypeError, "[Residual] block: expected an nn.Module, got function"):
        nn.Residual(lambda x: x)
    with raises(TypeError, "[Concat] branch 0: expected an nn.Module, got int"):
        nn.Concat(3)
    with raises(TypeError, "[Residual] parameters: expected one dtype"):
        nn.Residual(nn.Linear(2, 2), nn.Linear(2, 2, dtype=F64))


def test_shapes_that_do_not_combine_are_refused():
    x = np.ones((2, 2, 6, 6), F32)
    residual = nn.Sequential(nn.Residual(nn.Conv2d(2, 3, 1)))
    with raises(
        ValueError,
        "[Residual] block output: expected the shape of the input (2, 2, 6, 6), got shape (2, 3, 6, 6)",
    ):
        residual(x)
    strided = nn.Residual(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1, stride=2))
    with raises(
        ValueError,
        "[Residual] block output: expected the shape of the shortcut's output (2, 2, 3, 3), got shape (2, 2, 6, 6)",
    ):
        strided(x)
    concat = nn.Concat(nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 3))
    with raises(
        ValueError,
        "[Concat] branch 1 output: expected shape (2, 3, 6, 6) (branch 0's but along dim 1), got shape (2, 3, 4, 4)",
    ):
        concat(x)
    with raises(ValueError, "[Concat] branch 0 output: expected at least 2 dims"):
        nn.Concat(nn.ReLU())(np.ones(3, F32))
    model = nn.Sequential(nn.Residual(nn.ReLU()))
    model(x)
    with raises(ValueError, "[Residual.backward] doutput: expected"):
        model.backward(np.ones((2, 2, 6, 5), F32))


def test_a_model_file_with_a_damaged_container_is_refused(tmp_path):
    import json

    model = nn.Sequential(nn.Residual(nn.Linear(3, 3)), nn.Concat(nn.Linear(3, 2), nn.ReLU()))
    model.save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz") as contents:
        arrays = {k: contents[k] for k in contents.files}
    architecture = json.loads(arrays["architecture"].tobytes())
    assert architecture["layers"][0] == {
        "type": "Residual",
        "block": {"type": "Linear", "in_features": 3, "out_features": 3, "bias": True},
        "shortcut": None,
    }
    assert architecture["layers"][1]["type"] == "Concat"

    def write(layers, name):
        damaged = dict(arrays)
        text = json.dumps({**architecture, "layers": layers}).encode()
        damaged["architecture"] = np.frombuffer(text, np.uint8)
        np.savez(tmp_path / name, **damaged)
        return tmp_path / name

    good = architecture["layers"]
    cases = [
        ([{**good[0], "extra": 1}, good[1]], 'layer 0: expected the fields of Residual, got also "extra"'),
        ([{"type": "Residual"}, good[1]], 'layer 0.block: expected an object with a string "type"'),
        ([good[0], {"type": "Concat"}], 'layer 1: expected a list "branches" in a Concat'),
        ([good[0], {"type": "Concat", "branches": []}], "layer 1: [Concat] branches: expected at least one"),
        ([good[0], {"type": "Concat", "branches": [{"type": "Nope"}]}], "layer 1.0: expected a known layer type, got 'Nope'"),
    ]  # fmt: skip
    for i, (layers, message) in enumerate(cases):
        with raises(ValueError, "[load] architecture: " + message):
            cnnbp.load(write(layers, f"bad{i}.npz"))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_an_empty_batch_passes_through_nested_containers(dtype):
    nn.manual_seed(10)
    model = nested_model(nn, dtype).eval()  # eval: BatchNorm2d needs values to train on
    x = np.zeros((0, 2, 8, 8), dtype)
    y = model(x)
    assert y.shape == (0, 5) and y.dtype == dtype
    dx = model.backward(np.zeros((0, 5), dtype))
    assert dx.shape == x.shape
    trace = dict(model.trace())
    assert trace["4"]["output"].shape == (0, 15, 4, 4)  # 3 + 6 + 6 channels, no images
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.grad, np.zeros_like(p.data), err_msg=name)
    flat = nn.Concat(nn.Linear(3, 2, dtype=dtype), nn.Identity())
    assert flat(np.zeros((0, 3), dtype)).shape == (0, 5)
    assert flat.backward(np.zeros((0, 5), dtype)).shape == (0, 3)


def test_indexing_past_either_end_says_the_bound_as_cpp_does():
    model = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Identity())
    assert model[-1] is model[2] and model[0:2] == (model[0], model[1])
    with pytest.raises(IndexError, match=r"^\[Sequential\] index: expected < 3, got 99$"):
        model[99]
    with pytest.raises(IndexError, match=r"^\[Sequential\] index: expected >= -3, got -4$"):
        model[-4]
    concat = nn.Concat(nn.ReLU(), nn.Identity())
    with pytest.raises(IndexError, match=r"^\[Concat\] index: expected < 2, got 2$"):
        concat[2]
