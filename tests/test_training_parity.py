"""A training run in cnnbp and in PyTorch, from the same weights and the same minibatches,
has the same loss curve: float64, 20 steps, SGD (momentum, Nesterov, weight decay), Adam and
AdamW, with and without a learning-rate schedule; each loss within 1e-8 relative and the
final weights alike. Schedules give torch's learning rates exactly."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn

from cnnbp import nn, optim  # noqa: E402

STEPS, BATCH, SAMPLES = 20, 16, 64


def small_cnn(lib):
    """8x8 images, 10 classes: the shape of the digits set."""
    if lib is nn:
        return nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1, dtype=np.float64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, dtype=np.float64),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32, 10, dtype=np.float64),
        )
    return tnn.Sequential(
        tnn.Conv2d(1, 6, 3, padding=1),
        tnn.ReLU(),
        tnn.MaxPool2d(2),
        tnn.Conv2d(6, 8, 3),
        tnn.ReLU(),
        tnn.Flatten(),
        tnn.Linear(32, 10),
    ).double()


def minibatches(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (SAMPLES, 1, 8, 8))
    y = rng.integers(0, 10, SAMPLES)
    order = np.concatenate([rng.permutation(SAMPLES) for _ in range(STEPS * BATCH // SAMPLES)])
    for step in range(STEPS):
        take = order[step * BATCH : (step + 1) * BATCH]
        yield x[take], y[take]


RUNS = [
    ("SGD", dict(lr=0.1, momentum=0.9), None),
    (
        "SGD",
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        ("StepLR", dict(step_size=2, gamma=0.5)),
    ),
    ("Adam", dict(lr=0.01), None),
    ("Adam", dict(lr=0.01, weight_decay=1e-3), ("CosineAnnealingLR", dict(T_max=5))),
    ("AdamW", dict(lr=0.01, weight_decay=0.05), ("CosineAnnealingLR", dict(T_max=5, eta_min=1e-3))),
]


@pytest.mark.parametrize(
    "name,config,schedule",
    RUNS,
    ids=[
        f"{n}-{'-'.join(f'{k}={v}' for k, v in c.items())}{'-' + s[0] if s else ''}"
        for n, c, s in RUNS
    ],
)
def test_loss_curve_equals_torch(name, config, schedule):
    torch.manual_seed(7)
    tmodel = small_cnn(tnn)
    model = small_cnn(nn)
    model.load_state_dict({k: v.detach().numpy() for k, v in tmodel.state_dict().items()})
    opt = getattr(optim, name)(model.parameters(), **config)
    topt = getattr(torch.optim, name)(tmodel.parameters(), **config)
    sched = tsched = None
    if schedule:
        sched = getattr(optim.lr_scheduler, schedule[0])(opt, **schedule[1])
        tsched = getattr(torch.optim.lr_scheduler, schedule[0])(topt, **schedule[1])
    loss_fn, tloss = nn.CrossEntropyLoss(), tnn.CrossEntropyLoss()
    ours, theirs = [], []
    for step, (x, y) in enumerate(minibatches(3)):
        ours.append(model.train_step(x, y, loss_fn, opt))
        topt.zero_grad()
        loss = tloss(tmodel(torch.tensor(x)), torch.tensor(y))
        loss.backward()
        topt.step()
        theirs.append(loss.item())
        if sched and step % 4 == 3:  # an "epoch" of four steps
            sched.step()
            tsched.step()
            assert opt.lr == tsched.get_last_lr()[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=0)
    assert ours[-1] < ours[0]  # it learned something on its batches
    for k, v in tmodel.state_dict().items():
        np.testing.assert_allclose(
            dict(model.named_parameters())[k].data, v.numpy(), rtol=1e-8, atol=1e-10, err_msg=k
        )


@pytest.mark.parametrize(
    "schedule",
    [
        ("StepLR", dict(step_size=3, gamma=0.5)),
        ("CosineAnnealingLR", dict(T_max=5)),
        ("CosineAnnealingLR", dict(T_max=4, eta_min=0.001)),
    ],
)
def test_schedules_give_torchs_rates_exactly(schedule):
    opt = optim.SGD([nn.Parameter(np.zeros(2))], lr=0.1)
    topt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    ours = getattr(optim.lr_scheduler, schedule[0])(opt, **schedule[1])
    theirs = getattr(torch.optim.lr_scheduler, schedule[0])(topt, **schedule[1])
    for _ in range(15):  # past T_max: the cosine comes back up, as torch's does
        topt.step()
        ours.step()
        theirs.step()
        assert ours.get_last_lr() == theirs.get_last_lr()


def test_schedule_arguments_are_checked():
    opt = optim.SGD([nn.Parameter(np.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match=r"\[StepLR\] step_size: expected an int >= 1, got 0"):
        optim.lr_scheduler.StepLR(opt, 0)
    with pytest.raises(ValueError, match=r"\[CosineAnnealingLR\] T_max"):
        optim.lr_scheduler.CosineAnnealingLR(opt, 2.5)
    with pytest.raises(TypeError, match=r"\[StepLR\] optimizer: expected a cnnbp optimizer"):
        optim.lr_scheduler.StepLR(object(), 2)
