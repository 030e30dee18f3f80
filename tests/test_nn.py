"""cnnbp.nn and cnnbp.optim against PyTorch: the same networks with the same weights
(moved by state_dict) give the same outputs, losses and gradients, layer by layer; the
per-layer trace is consistent; gradients accumulate; SGD follows torch.optim.SGD; the
default init follows torch's.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn

import cnnbp  # noqa: E402
from cnnbp import nn, optim  # noqa: E402
from conftest import (
    NETWORK_TOL,
    SGD_CONFIG_IDS,
    SGD_CONFIGS,
    assert_close,  # noqa: E402
    check_array,
    layer_dtype,
    seed_network,
)

F32, F64 = np.float32, np.float64
TORCH_DTYPE = {F32: torch.float32, F64: torch.float64}
TOL = NETWORK_TOL  # cnnbp against torch, normwise (see conftest)
DTYPE_IDS = ["float32", "float64"]


# ---------------------------------------------------------------------------------------
# the networks, each written once for cnnbp.nn and torch.nn
# ---------------------------------------------------------------------------------------


def seed_net(lib, dtype):
    """The derivation's 15-parameter network."""
    return seed_network(dtype, lib)


def big_net(lib, dtype):
    """Strides, paddings, overlapping pools, a non-square kernel, two conv layers.
    Input (N, 3, 17, 15) -> (N, 4, 9, 8) -> pool (N, 4, 5, 4) -> (N, 5, 5, 3) -> pool
    (N, 5, 2, 1) -> 10 features -> 7 classes."""
    kw = layer_dtype(lib, dtype)
    return lib.Sequential(
        lib.Conv2d(3, 4, 3, stride=2, padding=1, **kw),
        lib.ReLU(),
        lib.MaxPool2d(3, stride=2, padding=1),
        lib.Conv2d(4, 5, (3, 2), padding=(1, 0), **kw),
        lib.ReLU(),
        lib.MaxPool2d(2),
        lib.Flatten(),
        lib.Linear(10, 7, **kw),
    )


def logits_net(lib, dtype):
    """Rectangular kernels and strides, a stride-1 pool; two logits per sample.
    Input (N, 2, 7, 9) -> (N, 3, 6, 4) -> pool (N, 3, 5, 3) -> 45 features -> 2."""
    kw = layer_dtype(lib, dtype)
    return lib.Sequential(
        lib.Conv2d(2, 3, (2, 3), stride=(1, 2), **kw),
        lib.ReLU(),
        lib.MaxPool2d((2, 2), stride=1),
        lib.Flatten(),
        lib.Linear(45, 2, **kw),
    )


def no_bias_net(lib, dtype):
    """Layers without bias, a sigmoid in the middle."""
    kw = layer_dtype(lib, dtype)
    return lib.Sequential(
        lib.Conv2d(2, 3, 3, padding=1, bias=False, **kw),
        lib.Sigmoid(),
        lib.MaxPool2d(2),
        lib.Flatten(),
        lib.Linear(12, 3, bias=False, **kw),
    )


# per network: the input's (C, H, W), its targets (rng, N, dtype) and its loss (the same
# class name in both libraries)
DATA = {
    "seed": ((1, 6, 6), lambda rng, N, dtype: rng.integers(0, 2, (N, 1)).astype(dtype), "BCELoss"),
    "big": ((3, 17, 15), lambda rng, N, dtype: rng.integers(0, 7, N), "CrossEntropyLoss"),
    "logits": (
        (2, 7, 9),
        lambda rng, N, dtype: rng.uniform(0, 1, (N, 2)).astype(dtype),
        "BCEWithLogitsLoss",
    ),
    "no_bias": ((2, 4, 4), lambda rng, N, dtype: rng.integers(0, 3, N), "CrossEntropyLoss"),
}


def make_data(name, dtype, N, rng):
    """Inputs and targets for network `name`, and its loss in cnnbp and in torch."""
    shape, targets, loss = DATA[name]
    x = rng.standard_normal((N, *shape)).astype(dtype)
    return x, targets(rng, N, dtype), getattr(nn, loss)(), getattr(tnn, loss)()


NETS = {"seed": seed_net, "big": big_net, "logits": logits_net, "no_bias": no_bias_net}


def numpy_state(tmodel):
    return {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}


def build_pair(name, dtype, seed=0):
    torch.manual_seed(seed)
    tmodel = NETS[name](tnn, dtype).to(TORCH_DTYPE[dtype])
    model = NETS[name](nn, dtype)
    model.load_state_dict(numpy_state(tmodel))
    return model, tmodel


def run_torch(tmodel, tloss, x, y):
    """Forward and backward through torch, keeping every layer's input, output and their
    gradients (acts[i] is layer i's input, acts[i + 1] its output)."""
    xt = torch.tensor(x, requires_grad=True)
    acts = [xt]
    for layer in tmodel:
        out = layer(acts[-1])
        out.retain_grad()
        acts.append(out)
    yt = torch.tensor(y)
    loss = tloss(acts[-1], yt)
    loss.backward()
    return loss, acts


def run_cnnbp(model, loss_fn, x, y):
    out = model(x)
    loss = loss_fn(out, y)
    dx = model.backward(loss_fn.backward())
    return out, loss, dx


def t2n(t):
    return t.detach().numpy()


def compare_with_torch(model, tmodel, loss_fn, tloss, x, y, dtype):
    tol = TOL[dtype]
    out, loss, dx = run_cnnbp(model, loss_fn, x, y)
    tl, acts = run_torch(tmodel, tloss, x, y)

    check_array(out, tuple(acts[-1].shape), dtype)
    assert_close(out, t2n(acts[-1]), tol, "output")
    assert type(loss) is float
    assert_close(loss, tl.item(), tol, "loss")
    check_array(dx, x.shape, dtype)
    assert_close(dx, t2n(acts[0].grad), tol, "input gradient")

    tparams = dict(tmodel.named_parameters())
    named = model.named_parameters()
    assert [n for n, _ in named] == list(tparams)
    for name, p in named:
        check_array(p.grad, tuple(tparams[name].shape), dtype)
        assert_close(p.grad, t2n(tparams[name].grad), tol, f"{name}.grad")

    # layer by layer: every intermediate quantity and its gradient
    for i, (layer, (lname, tr)) in enumerate(zip(model, model.trace())):
        assert lname == str(i)
        assert_close(tr["output"], t2n(acts[i + 1]), tol, f"layer {i} output")
        assert_close(tr["grad_output"], t2n(acts[i + 1].grad), tol, f"layer {i} grad_output")
        assert_close(tr["grad_input"], t2n(acts[i].grad), tol, f"layer {i} grad_input")
        if isinstance(layer, nn.MaxPool2d):
            tlayer = tmodel[i]
            _, tidx = torch.nn.functional.max_pool2d(
                acts[i].detach(),
                tlayer.kernel_size,
                tlayer.stride,
                tlayer.padding,
                return_indices=True,
            )
            check_array(tr["indices"], tuple(tidx.shape), np.int64)
            np.testing.assert_array_equal(tr["indices"], tidx.numpy(), err_msg=f"layer {i}")
    return out, loss, dx


# ---------------------------------------------------------------------------------------
# parity with torch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64], ids=DTYPE_IDS)
@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("name", list(NETS))
def test_network_matches_torch(name, N, dtype):
    model, tmodel = build_pair(name, dtype, seed=N)
    x, y, loss_fn, tloss = make_data(name, dtype, N, np.random.default_rng(N))
    compare_with_torch(model, tmodel, loss_fn, tloss, x, y, dtype)


def set_integer_weights(tmodel, rng, low=-1, high=2):
    with torch.no_grad():
        for p in tmodel.parameters():
            p.copy_(torch.tensor(rng.integers(low, high, tuple(p.shape))))


def count_tied_windows(a, kernel, stride, padding):
    """How many pooling windows hold their maximum more than once."""
    pair = lambda v: (v, v) if np.isscalar(v) else tuple(v)  # noqa: E731
    (kh, kw), (ph, pw) = pair(kernel), pair(padding)
    sh, sw = pair(kernel if stride is None else stride)
    N, C, H, W = a.shape
    ties = 0
    for h0 in range(-ph, H + ph - kh + 1, sh):
        for w0 in range(-pw, W + pw - kw + 1, sw):
            win = a[:, :, max(h0, 0) : h0 + kh, max(w0, 0) : w0 + kw].reshape(N, C, -1)
            ties += int(((win == win.max(axis=2, keepdims=True)).sum(axis=2) > 1).sum())
    return ties


@pytest.mark.parametrize("dtype", [F32, F64], ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["seed", "big"])
def test_pooling_ties_route_the_gradient_like_torch(name, dtype):
    # Integer inputs and weights: every sum is exact, ReLU makes many zeros, and pooled
    # windows hold equal maxima (positive ones and all-zero ones). Which cell of a tied
    # window receives the gradient must be torch's choice, the first in row-major order.
    rng = np.random.default_rng(11)
    torch.manual_seed(0)
    tmodel = NETS[name](tnn, dtype).to(TORCH_DTYPE[dtype])
    set_integer_weights(tmodel, rng)
    model = NETS[name](nn, dtype)
    model.load_state_dict(numpy_state(tmodel))
    x, y, loss_fn, tloss = make_data(name, dtype, 4, rng)
    x = rng.integers(0, 3, x.shape).astype(dtype)

    compare_with_torch(model, tmodel, loss_fn, tloss, x, y, dtype)
    _, acts = run_torch(tmodel, tloss, x, y)

    ties = 0
    for i, layer in enumerate(model):
        if not isinstance(layer, nn.MaxPool2d):
            continue
        ties += count_tied_windows(layer.input, layer.kernel_size, layer.stride, layer.padding)
        # the cells that receive a gradient are torch's (a cell whose gradient is only
        # rounding noise, where contributions cancel, may be 0 on one side)
        got, want = layer.grad_input, t2n(acts[i].grad)
        noise = TOL[dtype] * np.abs(want).max()
        assert ((got != 0) | (np.abs(want) <= noise)).all(), f"layer {i}: a cell torch feeds is 0"
        assert ((want != 0) | (np.abs(got) <= noise)).all(), f"layer {i}: a cell torch leaves 0"
        assert (np.abs(got) > noise).any()
    assert ties >= 5, f"the data made only {ties} tied windows"


def test_pooling_tie_known_answer_against_torch():
    # a window [[2, 2], [2, 1]]: the gradient goes to the top-left cell only
    x = np.array([[[[2.0, 2.0], [2.0, 1.0]]]])
    model = nn.Sequential(nn.MaxPool2d(2))
    out = model(x)
    dx = model.backward(np.ones_like(out))
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(xt, 2).sum().backward()
    np.testing.assert_array_equal(dx, xt.grad.numpy())
    np.testing.assert_array_equal(dx, [[[[1.0, 0.0], [0.0, 0.0]]]])


@pytest.mark.parametrize("dtype", [F32, F64], ids=DTYPE_IDS)
def test_state_dict_keys_shapes_and_round_trip(dtype):
    model, tmodel = build_pair("big", dtype)
    sd = model.state_dict()
    tsd = tmodel.state_dict()
    assert (
        list(sd) == list(tsd) == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"]
    )
    for k in sd:
        check_array(sd[k], tuple(tsd[k].shape), dtype)
        np.testing.assert_array_equal(sd[k], tsd[k].numpy())
    seed, tseed = build_pair("seed", dtype)
    assert (
        list(seed.state_dict())
        == list(tseed.state_dict())
        == ["0.weight", "0.bias", "4.weight", "4.bias"]
    )
    # state_dict returns copies: changing them leaves the model alone
    sd["0.weight"][...] = 0
    assert not np.array_equal(model.state_dict()["0.weight"], sd["0.weight"])
    # and a cnnbp state_dict loads back into torch
    nn.manual_seed(5)
    other = big_net(nn, dtype)
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in other.state_dict().items()})
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(tmodel.state_dict()[k].numpy(), v)


def test_loaded_parameters_do_not_alias_the_source():
    model, tmodel = build_pair("seed", F64)
    state = numpy_state(tmodel)
    model.load_state_dict(state)
    for k, p in model.named_parameters():
        assert not np.shares_memory(p.data, state[k])
        assert p.data.flags.c_contiguous


# ---------------------------------------------------------------------------------------
# the trace
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seed", "big"])
def test_trace_is_consistent(name):
    model, _ = build_pair(name, F64)
    x, y, loss_fn, _ = make_data(name, F64, 3, np.random.default_rng(3))
    out, loss, dx = run_cnnbp(model, loss_fn, x, y)
    trace = model.trace()
    assert [n for n, _ in trace] == [str(i) for i in range(len(model))]

    np.testing.assert_array_equal(trace[0][1]["input"], x)
    np.testing.assert_array_equal(trace[-1][1]["output"], out)
    np.testing.assert_array_equal(trace[-1][1]["grad_output"], loss_fn.grad_input)
    np.testing.assert_array_equal(trace[0][1]["grad_input"], dx)
    for (_, a), (_, b) in zip(trace, trace[1:]):
        np.testing.assert_array_equal(a["output"], b["input"])  # layer i's output feeds i+1
        np.testing.assert_array_equal(b["grad_input"], a["grad_output"])  # and back
    for layer, (_, tr) in zip(model, trace):
        for key in ("input", "output", "grad_output", "grad_input"):
            assert isinstance(tr[key], np.ndarray), key
        assert tr["grad_input"].shape == np.shape(tr["input"])
        assert tr["grad_output"].shape == tr["output"].shape
        own = dict(layer.named_parameters())
        for pname, p in own.items():
            np.testing.assert_array_equal(tr[pname], p.data)
            np.testing.assert_array_equal(tr[pname + ".grad"], p.grad)
            assert tr[pname + ".grad"].shape == p.data.shape
        if not own:
            assert not any(k.endswith(".grad") for k in tr)
        if isinstance(layer, nn.MaxPool2d):
            assert tr["indices"].shape == tr["output"].shape
            picked = np.take_along_axis(
                tr["input"].reshape(*tr["input"].shape[:2], -1),
                tr["indices"].reshape(*tr["indices"].shape[:2], -1),
                2,
            )
            np.testing.assert_array_equal(picked.reshape(tr["output"].shape), tr["output"])

    lt = loss_fn.trace()
    assert lt["loss"] == loss
    np.testing.assert_array_equal(lt["input"], out)


def test_seed_network_trace_follows_the_derivation():
    # dL/dZ2 = A2 - Y (per sample, / N for the mean), dL/dW2 = (A2 - Y) F^T, dL/dB2 = sum
    model, _ = build_pair("seed", F64)
    rng = np.random.default_rng(8)
    x, y, loss_fn, _ = make_data("seed", F64, 5, rng)
    out, loss, dx = run_cnnbp(model, loss_fn, x, y)
    (_, conv), (_, relu), (_, pool), (_, flat), (_, lin), (_, sig) = model.trace()
    dZ2 = (out - y) / len(x)
    assert_close(sig["grad_input"], dZ2, 1e-12)
    assert_close(lin["weight.grad"], dZ2.T @ flat["output"], 1e-12)
    assert_close(lin["bias.grad"], dZ2.sum(0), 1e-12)
    assert_close(flat["grad_input"], (dZ2 @ lin["weight"]).reshape(pool["output"].shape), 1e-12)
    assert_close(relu["grad_input"], relu["grad_output"] * (conv["output"] > 0), 0)
    assert_close(conv["bias.grad"], relu["grad_input"].sum(keepdims=True).reshape(1), 1e-12)


# ---------------------------------------------------------------------------------------
# gradient accumulation and zero_grad
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64], ids=DTYPE_IDS)
def test_gradients_accumulate_until_zero_grad(dtype):
    model, tmodel = build_pair("big", dtype)
    rng = np.random.default_rng(21)
    x1, y1, loss_fn, tloss = make_data("big", dtype, 2, rng)
    x2, y2, _, _ = make_data("big", dtype, 3, rng)
    for p in model.parameters():
        assert p.grad is None

    run_cnnbp(model, loss_fn, x1, y1)
    first = {k: p.grad.copy() for k, p in model.named_parameters()}
    run_cnnbp(model, loss_fn, x1, y1)
    for k, p in model.named_parameters():
        np.testing.assert_array_equal(p.grad, 2 * first[k])  # g + g is exact

    model.zero_grad()
    for p in model.parameters():
        assert p.grad is None
    run_cnnbp(model, loss_fn, x1, y1)
    for k, p in model.named_parameters():
        np.testing.assert_array_equal(p.grad, first[k])  # the same call, the same bits
    run_cnnbp(model, loss_fn, x2, y2)

    # torch accumulates the same way
    run_torch(tmodel, tloss, x1, y1)
    run_torch(tmodel, tloss, x2, y2)
    tparams = dict(tmodel.named_parameters())
    for k, p in model.named_parameters():
        assert p.grad.dtype == dtype
        assert_close(p.grad, t2n(tparams[k].grad), TOL[dtype], k)

    opt = optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_accumulated_gradient_does_not_alias_the_trace_of_an_earlier_step():
    model, _ = build_pair("seed", F64)
    x, y, loss_fn, _ = make_data("seed", F64, 2, np.random.default_rng(4))
    run_cnnbp(model, loss_fn, x, y)
    dx_first = model.trace()[0][1]["grad_input"].copy()
    run_cnnbp(model, loss_fn, x, y)
    # grad_input is not accumulated: it is the gradient of the last backward only
    np.testing.assert_array_equal(model.trace()[0][1]["grad_input"], dx_first)


@pytest.mark.parametrize("loss_name", ["seed", "big", "logits"])
def test_loss_backward_scales_by_grad_loss(loss_name):
    _, _, loss_fn, tloss = make_data(loss_name, F64, 3, np.random.default_rng(9))
    rng = np.random.default_rng(10)
    x, y, _, _ = make_data(loss_name, F64, 3, rng)
    shape = {"seed": (3, 1), "big": (3, 7), "logits": (3, 2)}[loss_name]
    out = rng.uniform(0.1, 0.9, shape) if loss_name == "seed" else rng.standard_normal(shape)
    loss_fn(out, y)
    g1 = loss_fn.backward()
    g3 = loss_fn.backward(3.0)
    assert_close(g3, 3 * g1, 1e-15)
    ot = torch.tensor(out, requires_grad=True)
    (tloss(ot, torch.tensor(y)) * 3.0).backward()
    assert_close(g3, ot.grad.numpy(), 1e-12)


@pytest.mark.parametrize("dtype", [F32, F64], ids=DTYPE_IDS)
def test_losses_at_their_edges_match_torch(dtype):
    # BCE at the clamp (a = 0 or 1), BCE-with-logits and cross-entropy at huge logits
    cases = [
        (
            nn.BCELoss(),
            tnn.BCELoss(),
            np.array([[0.0, 1.0, 0.0, 1.0, 0.5, 1e-30]], dtype),
            np.array([[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]], dtype),
        ),
        (
            nn.BCEWithLogitsLoss(),
            tnn.BCEWithLogitsLoss(),
            np.array([[-1e4, -100.0, 0.0, 100.0, 1e4, 3.0]], dtype),
            np.array([[1.0, 0.0, 0.5, 0.0, 1.0, 0.25]], dtype),
        ),
        (
            nn.CrossEntropyLoss(),
            tnn.CrossEntropyLoss(),
            np.array([[1000.0, 0.0, -1000.0], [-1e4, -1e4 - 1, -1e4 - 2], [0.0, 0.0, 0.0]], dtype),
            np.array([2, 0, 1]),
        ),
    ]
    for loss_fn, tloss, out, y in cases:
        loss = loss_fn(out, y)
        grad = loss_fn.backward()
        ot = torch.tensor(out, requires_grad=True)
        tl = tloss(ot, torch.tensor(y))
        tl.backward()
        name = type(loss_fn).__name__
        assert type(loss) is float
        assert np.isfinite(loss) and np.isfinite(grad).all(), name
        assert_close(loss, tl.item(), TOL[dtype], name)
        check_array(grad, out.shape, dtype)
        assert_close(grad, ot.grad.numpy(), TOL[dtype], name)


# ---------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=SGD_CONFIG_IDS)
def test_sgd_matches_torch_over_five_steps(config):
    check_optimizer_matches_torch(optim.SGD, torch.optim.SGD, config, steps=5, seed=2)


def check_optimizer_matches_torch(ours, theirs, config, steps, seed):
    """Same weights, same batch: losses and parameters agree after every step (float64)."""
    model, tmodel = build_pair("seed", F64, seed=seed)
    rng = np.random.default_rng(10 + seed)
    x, y, loss_fn, tloss = make_data("seed", F64, 6, rng)
    opt = ours(model.parameters(), **config)
    topt = theirs(tmodel.parameters(), **config)
    tparams = dict(tmodel.named_parameters())
    for step in range(steps):
        opt.zero_grad()
        topt.zero_grad()
        loss = run_cnnbp(model, loss_fn, x, y)[1]
        tl, _ = run_torch(tmodel, tloss, x, y)
        assert_close(loss, tl.item(), 1e-10, f"loss at step {step}")
        opt.step()
        topt.step()
        for k, p in model.named_parameters():
            check_array(p.data, tuple(tparams[k].shape), F64)
            assert_close(p.data, t2n(tparams[k]), 1e-10, f"{k} after step {step}")


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=SGD_CONFIG_IDS)
def test_sgd_update_rule_with_given_gradients(config):
    # the optimizer alone: the same gradients fed to both, parameters must follow torch's
    rng = np.random.default_rng(13)
    shapes = [(3, 4), (4,), (2, 1, 3, 3)]
    params = [nn.Parameter(rng.standard_normal(s)) for s in shapes]
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    opt = optim.SGD(params, **config)
    topt = torch.optim.SGD(tparams, **config)
    for step in range(5):
        for p, tp in zip(params, tparams):
            g = rng.standard_normal(p.shape)
            p.grad = g.copy()
            tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
        for p, tp in zip(params, tparams):
            assert_close(p.data, tp.detach().numpy(), 1e-12, f"step {step}")


def test_sgd_skips_parameters_without_gradient_and_keeps_float32():
    lin = nn.Linear(3, 2)
    before = lin.state_dict()
    opt = optim.SGD(lin.parameters(), lr=0.5, momentum=0.9)
    opt.step()  # no gradients yet: nothing moves
    for k, v in lin.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    lin.weight.grad = np.ones((2, 3), np.float32)
    opt.step()
    np.testing.assert_array_equal(lin.state_dict()["bias"], before["bias"])
    assert_close(lin.weight.data, before["weight"] - 0.5, 1e-7)
    assert lin.weight.data.dtype == np.float32 and lin.bias.data.dtype == np.float32


def test_training_steps_follow_torch():
    # a few steps of the whole loop on the bigger network, float64
    model, tmodel = build_pair("big", F64, seed=4)
    rng = np.random.default_rng(14)
    x, y, loss_fn, tloss = make_data("big", F64, 8, rng)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        topt.zero_grad()
        loss = run_cnnbp(model, loss_fn, x, y)[1]
        tl, _ = run_torch(tmodel, tloss, x, y)
        assert_close(loss, tl.item(), 1e-9)
        losses.append(loss)
        opt.step()
        topt.step()
    assert losses[-1] < losses[0]
    tparams = dict(tmodel.named_parameters())
    for k, p in model.named_parameters():
        assert_close(p.data, t2n(tparams[k]), 1e-9, k)


# ---------------------------------------------------------------------------------------
# default init
# ---------------------------------------------------------------------------------------


def test_default_init_is_within_torchs_kaiming_uniform_bounds():
    def network(lib):
        return lib.Sequential(
            lib.Conv2d(3, 16, 5),
            lib.Conv2d(16, 8, (3, 2)),
            lib.Flatten(),
            lib.Linear(200, 50),
            lib.Linear(50, 10),
        )

    nn.manual_seed(0)
    model = network(nn)
    torch.manual_seed(0)
    tmodel = network(tnn)
    tparams = dict(tmodel.named_parameters())
    for k, p in model.named_parameters():
        t = tparams[k.replace(".bias", ".weight")]
        fan_in = math.prod(t.shape[1:])
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) and torch's bias init
        check_array(p.data, tuple(tparams[k].shape), F32)  # float32 by default
        assert np.abs(p.data).max() <= bound
        # torch's own init lies in the same interval
        assert tparams[k].detach().abs().max().item() <= bound + 1e-7
        if p.data.size >= 100:  # spread over the whole interval, centered
            assert np.abs(p.data).max() > 0.9 * bound
            assert abs(float(p.data.mean())) < 0.2 * bound
            assert 0.9 < float(np.std(p.data)) / (bound / math.sqrt(3)) < 1.1  # U(-b, b)


def test_manual_seed_makes_init_reproducible():
    def state(seed):
        nn.manual_seed(seed)
        return big_net(nn, F32).state_dict()

    a, b, c = state(123), state(123), state(124)
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    cnnbp.manual_seed(123)  # the same function at the package level
    d = big_net(nn, F32).state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], d[k])
    # float64 layers draw the same numbers, unrounded
    nn.manual_seed(123)
    e = big_net(nn, F64).state_dict()
    for k in a:
        assert e[k].dtype == F64
        np.testing.assert_array_equal(e[k].astype(F32), a[k])


# ---------------------------------------------------------------------------------------
# Adam
# ---------------------------------------------------------------------------------------

ADAM_CONFIGS = [
    dict(lr=0.01),
    dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=0.01, weight_decay=0.1),
]


@pytest.mark.parametrize(
    "config", ADAM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_adam_matches_torch_over_ten_steps(config):
    check_optimizer_matches_torch(optim.Adam, torch.optim.Adam, config, steps=10, seed=3)


ADAMW_CONFIGS = [dict(lr=0.01), dict(lr=0.02, betas=(0.8, 0.99), weight_decay=0.1)]


@pytest.mark.parametrize(
    "config", ADAMW_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_adamw_matches_torch_over_ten_steps(config):
    check_optimizer_matches_torch(optim.AdamW, torch.optim.AdamW, config, steps=10, seed=4)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_a_new_learning_rate_applies_from_the_next_step(name):
    # torch's schedulers set the rate between steps; ours is the optimizer's `lr`
    config = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    model, tmodel = build_pair("seed", F64, seed=5)
    x, y, loss_fn, tloss = make_data("seed", F64, 4, np.random.default_rng(15))
    opt = getattr(optim, name)(model.parameters(), **config)
    topt = getattr(torch.optim, name)(tmodel.parameters(), **config)
    for step, lr in enumerate([0.1, 0.05, 0.02, 0.0]):
        opt.lr = lr
        for group in topt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        topt.zero_grad()
        run_cnnbp(model, loss_fn, x, y)
        run_torch(tmodel, tloss, x, y)
        opt.step()
        topt.step()
        tparams = dict(tmodel.named_parameters())
        for k, p in model.named_parameters():
            assert_close(p.data, t2n(tparams[k]), 1e-10, f"{k} after step {step}")
    assert opt.lr == 0.0
    with pytest.raises(ValueError, match=rf"\[{name}\] lr: expected >= 0, got -1.0"):
        opt.lr = -1.0


def test_adam_rejects_bad_hyperparameters():
    params = nn.Linear(2, 1).parameters()
    with pytest.raises(ValueError, match=r"\[Adam\] betas"):
        optim.Adam(params, betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"\[Adam\] lr"):
        optim.Adam(params, lr=-1.0)
