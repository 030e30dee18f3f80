"""`cnnbp train` and `cnnbp evaluate`: a small CNN trained on real images, and its report.

    cnnbp train                          # 8x8 digits (scikit-learn), stratified 20% test split
    cnnbp train --binary 0 1             # two classes: one logit, BCEWithLogitsLoss
    cnnbp train --mnist DIR --save m.npz --plot curves.png
    cnnbp evaluate m.npz --mnist DIR     # the same report for a saved model
    cnnbp train --export-data run.npz    # and the split and batch order, for C++ (train_lenet)

The network is chosen by name (--arch) from ARCHITECTURES. The default, "cnn"
(build_model), is conv 3x3 -> ReLU -> max-pool 2x2, twice, then one linear layer:
Conv2d(C, 32, 3, padding=1), ReLU, MaxPool2d(2), Conv2d(32, 64, 3, padding=1), ReLU,
MaxPool2d(2), Flatten, Linear(64 * H/4 * W/4, classes). A seed fixes everything random:
the split, the initial weights (cnnbp.manual_seed) and the minibatch order, so two runs
with the same arguments print the same losses.

Training records the gradient flow: per layer with parameters and per epoch, the mean
over the epoch's steps of the L2 norm of that layer's loss gradient (gradient_norms).

The same steps from Python:

    from cnnbp import train
    dataset = train.load_dataset(seed=0)                 # digits
    result = train.fit(dataset, epochs=20, seed=0)       # TrainResult: model, history, times
    evaluation = train.evaluate(result.model, dataset.x_test, dataset.y_test, dataset.binary)
    print(train.format_report(evaluation, dataset.class_names))
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import cnnbp  # the package's API, as a user calls it (cnnbp.load)

from . import data, nn, optim
from ._text import count

CONV_CHANNELS = (32, 64)  # output channels of the two convolutions
DEFAULT_EPOCHS = {"digits": 25, "npz": 25, "mnist": 5}
DEFAULT_BATCH_SIZE = 32
DEFAULT_MOMENTUM = 0.9
DEFAULT_TEST_FRACTION = 0.2
EVAL_BATCH_SIZE = 1000


# ---- optimizers, by name ---------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerChoice:
    """One entry of `cnnbp train --optimizer NAME`: how to build it and its default rate."""

    make: Callable  # make(params, lr=..., momentum=..., weight_decay=...) -> optimizer
    default_lr: float
    uses_momentum: bool = False


OPTIMIZERS = {
    "sgd": OptimizerChoice(
        lambda params, lr, momentum, weight_decay: optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay
        ),
        default_lr=0.05,
        uses_momentum=True,
    ),
    "nesterov": OptimizerChoice(
        lambda params, lr, momentum, weight_decay: optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True
        ),
        default_lr=0.05,
        uses_momentum=True,
    ),
    "adam": OptimizerChoice(
        lambda params, lr, momentum, weight_decay: optim.Adam(
            params, lr=lr, weight_decay=weight_decay
        ),
        default_lr=1e-3,
    ),
    "adamw": OptimizerChoice(  # decoupled weight decay; torch's default decay 0.01
        lambda params, lr, momentum, weight_decay: optim.AdamW(
            params, lr=lr, weight_decay=weight_decay or 1e-2
        ),
        default_lr=1e-3,
    ),
}

# learning-rate schedules, stepped once per epoch
SCHEDULES = {
    "constant": lambda opt, epochs: None,
    "step": lambda opt, epochs: optim.lr_scheduler.StepLR(opt, max(1, epochs // 3), 0.1),
    "cosine": lambda opt, epochs: optim.lr_scheduler.CosineAnnealingLR(opt, epochs),
}


def _choice(name):
    if name not in OPTIMIZERS:
        raise ValueError(f"[train] optimizer: expected one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name]


def optimizer_momentum(name, momentum=None):
    """The momentum the optimizer registered as `name` runs with: `momentum`, or
    DEFAULT_MOMENTUM where it is None; None for an optimizer without momentum, which refuses
    one (ValueError)."""
    if not _choice(name).uses_momentum:
        if momentum is not None:
            raise ValueError(f"[train] momentum: expected no momentum for {name}, got {momentum}")
        return None
    return DEFAULT_MOMENTUM if momentum is None else momentum


def make_optimizer(name, params, lr=None, momentum=None, weight_decay=0.0):
    """The optimizer registered as `name` in OPTIMIZERS; lr and momentum default per name."""
    choice = _choice(name)
    momentum = optimizer_momentum(name, momentum)
    lr = choice.default_lr if lr is None else lr
    return choice.make(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


# ---- data ------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Training and test images with labels 0..k-1, and what each label stands for."""

    name: str
    description: str
    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list
    binary: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_dataset(
    mnist=None,
    npz=None,
    binary=None,
    seed=0,
    test_fraction=DEFAULT_TEST_FRACTION,
    dtype=np.float32,
    need_train=True,
):
    """digits (default), MNIST-format IDX files in the directory `mnist`, or the .npz `npz`.

    digits and .npz files are split into training and test parts by train_test_split with
    `seed`; MNIST has its own test files (t10k-*), and its training files are read only when
    need_train. binary=(A, B) keeps classes A and B, relabelled 0 and 1.
    """
    if mnist is not None and npz is not None:
        raise ValueError("[train] data: expected at most one of mnist and npz, got both")
    if mnist is not None:
        name, description = "mnist", f"MNIST-format IDX files in {mnist}"
        x_test, y_test = data.load_mnist(mnist, "test", dtype=dtype)
        x_train = y_train = None
        if need_train:
            x_train, y_train = data.load_mnist(mnist, "train", dtype=dtype)
    else:
        if npz is not None:
            name, description = "npz", f"{npz}"
            x, y = data.load_npz(npz, dtype=dtype)
        else:
            name, description = "digits", "scikit-learn digits"
            x, y = data.load_digits(dtype=dtype)
        (x_train, y_train), (x_test, y_test) = data.train_test_split(
            x, y, test_fraction=test_fraction, seed=seed
        )
        description += f", stratified {test_fraction:g} test split (seed {seed})"

    if binary is not None:
        classes = [int(c) for c in binary]
        if len(classes) != 2:
            raise ValueError(f"[train] binary: expected two classes, got {classes}")
        x_test, y_test = data.select_classes(x_test, y_test, classes)
        if x_train is not None:
            x_train, y_train = data.select_classes(x_train, y_train, classes)
        class_names = [str(c) for c in classes]
        description += f", binary: {classes[0]} vs {classes[1]}"
    else:
        seen = [y_test] + ([y_train] if y_train is not None else [])
        class_names = [str(c) for c in range(int(max(int(v.max()) for v in seen)) + 1)]
    return Dataset(
        name, description, x_train, y_train, x_test, y_test, class_names, binary=binary is not None
    )


# ---- the network and what its outputs mean ----------------------------------------------


def build_model(input_shape, num_outputs, dtype=np.float32, channels=CONV_CHANNELS):
    """conv-ReLU-pool twice, then linear: for images (C, H, W) with H, W >= 4."""
    c, h, w = (int(v) for v in input_shape)
    if h < 4 or w < 4:
        raise ValueError(
            f"[train] x: expected images of at least 4x4 pixels (two 2x2 poolings), got {h}x{w}"
        )
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(c, c1, 3, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (h // 4) * (w // 4), num_outputs, dtype=dtype),
    )


RESNET_WIDTHS = (16, 32)  # channels of the two stages; the second halves the image
RESNET_BLOCKS = 2  # BasicBlocks per stage


def basic_block(in_channels, out_channels, stride=1, dtype=np.float32):
    """He et al.'s BasicBlock, then ReLU: y = relu(BN(conv3x3(relu(BN(conv3x3(x))))) + x),
    with the skip path a strided 1x1 conv + BN where the block changes the shape."""
    block = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, dtype=dtype),
        nn.BatchNorm2d(out_channels, dtype=dtype),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False, dtype=dtype),
        nn.BatchNorm2d(out_channels, dtype=dtype),
    )
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, dtype=dtype),
            nn.BatchNorm2d(out_channels, dtype=dtype),
        )
    return [nn.Residual(block, shortcut), nn.ReLU()]


def build_resnet(
    input_shape, num_outputs, dtype=np.float32, widths=RESNET_WIDTHS, blocks=RESNET_BLOCKS
):
    """A small ResNet: conv3x3-BN-ReLU stem, `blocks` BasicBlocks per stage (each stage after
    the first starts with stride 2), global average pooling, one linear layer."""
    c, h, w = (int(v) for v in input_shape)
    if h < 2 ** (len(widths) - 1) or w < 2 ** (len(widths) - 1):
        raise ValueError(
            f"[train] x: expected images of at least {2 ** (len(widths) - 1)} pixels a side "
            f"(one stride-2 stage per width after the first), got {h}x{w}"
        )
    layers = [
        nn.Conv2d(c, widths[0], 3, padding=1, bias=False, dtype=dtype),
        nn.BatchNorm2d(widths[0], dtype=dtype),
        nn.ReLU(),
    ]
    channels = widths[0]
    for stage, width in enumerate(widths):
        for i in range(blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            layers += basic_block(channels, width, stride, dtype)
            channels = width
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_outputs, dtype=dtype),
    ]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Architecture:
    """One entry of `cnnbp train --arch NAME`: build(input_shape (C, H, W), num_outputs,
    dtype) -> a model, and the training settings it is tuned for (used where the command
    line leaves them out)."""

    build: Callable
    description: str
    epochs: dict = field(default_factory=lambda: dict(DEFAULT_EPOCHS))  # per dataset
    sgd_lr: float | None = None  # the SGD rate (None: the optimizer's default)
    schedule: str = "constant"
    weight_decay: float = 0.0


ARCHITECTURES = {
    "cnn": Architecture(build_model, "conv-ReLU-pool x2 + linear"),
    "resnet": Architecture(
        build_resnet,
        "BasicBlocks with BatchNorm, 16 and 32 channels, a strided stage, global average pool",
        epochs={"digits": 30, "npz": 30, "mnist": 3},
        sgd_lr=0.1,
        schedule="cosine",
        weight_decay=5e-4,
    ),
}


def architecture(arch):
    """The ARCHITECTURES entry named `arch`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"[train] arch: expected one of {sorted(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch]


def make_model(arch, input_shape, num_outputs, dtype=np.float32):
    """The network registered as `arch` in ARCHITECTURES, for images of input_shape."""
    return architecture(arch).build(input_shape, num_outputs, dtype=dtype)


def training_settings(
    arch, dataset_name, optimizer, epochs=None, lr=None, schedule=None, weight_decay=None
):
    """(epochs, lr, schedule, weight_decay): those given, else the architecture's."""
    spec = architecture(arch)
    if epochs is None:
        epochs = spec.epochs[dataset_name]
    if lr is None:
        choice = _choice(optimizer)
        lr = spec.sgd_lr if spec.sgd_lr is not None and choice.uses_momentum else choice.default_lr
    schedule = spec.schedule if schedule is None else schedule
    weight_decay = spec.weight_decay if weight_decay is None else weight_decay
    return epochs, lr, schedule, weight_decay


def loss_function(binary):
    """One logit and BCE-with-logits for two classes, logits and cross-entropy otherwise."""
    return nn.BCEWithLogitsLoss() if binary else nn.CrossEntropyLoss()


def targets(y, binary, dtype):
    """What the loss compares the network's output with: labels, or (N, 1) floats 0/1."""
    return np.ascontiguousarray(y.astype(dtype)[:, None]) if binary else y


def predictions(output, binary):
    """Predicted labels from the network's output: logit > 0, or the largest logit."""
    if binary:
        return (output[:, 0] > 0).astype(np.int64)
    return np.argmax(output, axis=1).astype(np.int64)


def _set_mode(model, training):
    """model.train() / model.eval() where the layers have modes (dropout); else nothing."""
    switch = getattr(model, "train" if training else "eval", None)
    if callable(switch):
        switch()


def _output_count(model):
    for layer in reversed(list(model)):
        weight = getattr(layer, "weight", None)
        if weight is not None:
            return int(weight.data.shape[0])
    raise ValueError("[evaluate] model: expected a final layer with weights, got none")


def _parameter_count(model):
    return sum(int(p.data.size) for p in model.parameters())


# ---- gradient flow ---------------------------------------------------------------------


def parameter_layers(model):
    """{layer name: [its Parameters]}, in the model's order: a layer is named by what its
    parameters' names have before the last '.' ("0.weight" -> "0", "3.block.1.bias" ->
    "3.block.1"; "" for a model that is one layer)."""
    layers = {}
    for name, parameter in model.named_parameters():
        layers.setdefault(name.rpartition(".")[0], []).append(parameter)
    return layers


def layer_types(model):
    """{layer name (as parameter_layers): the layer's class name, e.g. "Conv2d"}."""
    types = {}
    for name in parameter_layers(model):
        module = model
        for part in name.split(".") if name else ():
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        types[name] = type(module).__name__
    return types


def gradient_norm(parameters):
    """The L2 norm of the gradients of `parameters` taken together, in float64:
    sqrt(sum over the parameters of sum(grad**2)); a parameter without a gradient adds 0."""
    total = 0.0
    for parameter in parameters:
        grad = parameter.grad
        if grad is not None:
            # not np.dot / np.linalg.norm: BLAS threads would wake and compete with the
            # kernels' own
            total += float(np.square(grad, dtype=np.float64).sum())
    return math.sqrt(total)


# ---- evaluation ------------------------------------------------------------------------


@dataclass
class Evaluation:
    """The model's predictions on one set of images and what they add up to."""

    labels: np.ndarray
    predicted: np.ndarray
    loss: float
    confusion: np.ndarray  # confusion[true, predicted], counts
    seconds: float

    @property
    def count(self) -> int:
        return int(self.labels.size)

    @property
    def correct(self) -> int:
        return int(np.sum(self.labels == self.predicted))

    @property
    def accuracy(self) -> float:
        return self.correct / self.count

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else math.inf


def evaluate(model, x, y, binary, num_classes=None, batch_size=EVAL_BATCH_SIZE):
    """Mean loss, predictions and confusion matrix of `model` on x, y (in eval mode)."""
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    dtype = model.parameters()[0].data.dtype
    loss_fn = loss_function(binary)
    _set_mode(model, training=False)
    predicted = np.empty(y.shape[0], dtype=np.int64)
    total_loss = 0.0
    start = time.perf_counter()
    with nn.no_grad():  # nothing kept for a backward: the passes recycle their outputs
        for first in range(0, y.shape[0], batch_size):
            xb = np.ascontiguousarray(x[first : first + batch_size])
            yb = y[first : first + batch_size]
            output = model(xb)
            total_loss += float(loss_fn(output, targets(yb, binary, dtype))) * yb.shape[0]
            predicted[first : first + yb.shape[0]] = predictions(output, binary)
    seconds = time.perf_counter() - start
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    return Evaluation(y, predicted, total_loss / y.shape[0], confusion, seconds)


# ---- training --------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: nn.Sequential
    # per epoch: loss, test_loss, test_accuracy and gradient_norms {layer: mean norm}
    history: list = field(default_factory=list)
    train_seconds: float = 0.0  # in training steps, evaluations excluded
    images: int = 0  # training images processed

    @property
    def images_per_second(self) -> float:
        return self.images / self.train_seconds if self.train_seconds > 0 else math.inf

    @property
    def losses(self) -> list:
        return [entry["loss"] for entry in self.history]

    @property
    def gradient_norms(self) -> dict:
        """{layer name: [per epoch, the mean over its steps of the layer's gradient norm]}."""
        return gradient_norms_by_layer(self.history)


def gradient_norms_by_layer(history):
    """The history's per-epoch "gradient_norms" {layer: value}, as {layer: [per epoch]}."""
    norms = {}
    for entry in history:
        for name, value in entry.get("gradient_norms", {}).items():
            norms.setdefault(name, []).append(value)
    return norms


def _progress_bar(loader, epoch, epochs, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # updated by hand: a bar wrapping the loader closes itself before the epoch's summary
    return tqdm(
        total=len(loader),
        desc=f"epoch {epoch}/{epochs}",
        unit="batch",
        file=sys.stderr,
        leave=True,
        dynamic_ncols=True,
    )


def format_epoch(entry, epochs):
    width = len(str(epochs))
    return (
        f"epoch {entry['epoch']:{width}d}/{epochs}  loss {entry['loss']:.6f}  "
        f"test loss {entry['test_loss']:.6f}  "
        f"test accuracy {100 * entry['test_accuracy']:.2f}%"
    )


def fit(
    dataset,
    epochs=None,
    batch_size=DEFAULT_BATCH_SIZE,
    optimizer="sgd",
    lr=None,
    momentum=None,
    weight_decay=None,
    seed=0,
    progress=False,
    log=None,
    schedule=None,
    arch="cnn",
    record_gradients=True,
    world=None,
):
    """Train the network ARCHITECTURES[arch] builds on dataset's training part; evaluate
    after each epoch.

    progress shows a tqdm bar per epoch (on stderr, when tqdm is installed); log(line) is
    called with one line per epoch when there is no bar. With record_gradients, each epoch's
    history entry has "gradient_norms": {layer: the mean over the epoch's steps of the L2
    norm of the loss's gradient with respect to all of that layer's parameters}, read from
    Parameter.grad after each step (the gradient of the batch's loss at the weights before
    the step; weight decay not included) -- see parameter_layers and gradient_norm.

    With a cnnbp.distributed World of more than one rank (every rank calls fit), the global
    batch `batch_size` is split over the ranks (a DistributedSampler's shares, gradients
    averaged by DistributedDataParallel), the epoch's losses and test metrics are summed over
    the ranks, and only rank 0 logs and shows progress; every rank returns the same model.
    """
    epochs, lr, schedule, weight_decay = training_settings(
        arch, dataset.name, optimizer, epochs, lr, schedule, weight_decay
    )
    if epochs < 1:
        raise ValueError(f"[train] epochs: expected >= 1, got {epochs}")
    x_train, y_train = dataset.x_train, dataset.y_train
    dtype = x_train.dtype
    from . import manual_seed

    manual_seed(seed)  # the initial weights
    outputs = 1 if dataset.binary else dataset.num_classes
    model = make_model(arch, x_train.shape[1:], outputs, dtype=dtype)
    opt = make_optimizer(
        optimizer, model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    if schedule not in SCHEDULES:
        raise ValueError(f"[train] schedule: expected one of {sorted(SCHEDULES)}, got {schedule!r}")
    scheduler = SCHEDULES[schedule](opt, epochs)
    loss_fn = loss_function(dataset.binary)
    size = 1 if world is None else world.size
    if size > 1:
        from . import distributed

        if batch_size % size:
            raise ValueError(
                f"[train] batch_size: expected a multiple of the number of processes "
                f"({size}), got {batch_size}"
            )
        stepper = distributed.DistributedDataParallel(model, world)
        sampler = data.DistributedSampler(x_train.shape[0], size, world.rank, seed=seed)
        loader = data.DataLoader(x_train, y_train, batch_size=batch_size // size, sampler=sampler)
        if not world.is_main:
            progress, log = False, None
    else:
        stepper = model
        loader = data.DataLoader(x_train, y_train, batch_size=batch_size, shuffle=True, seed=seed)
    result = TrainResult(model)
    layers = parameter_layers(model) if record_gradients else {}

    for epoch in range(1, epochs + 1):
        _set_mode(model, training=True)
        bar = _progress_bar(loader, epoch, epochs, progress)
        total, seen, steps = 0.0, 0, 0
        norm_sums = dict.fromkeys(layers, 0.0)
        start = time.perf_counter()
        for step, (xb, yb) in enumerate(loader):
            loss = stepper.train_step(xb, targets(yb, dataset.binary, dtype), loss_fn, opt)
            for name, parameters in layers.items():
                norm_sums[name] += gradient_norm(parameters)
            total += float(loss) * yb.shape[0]
            seen += yb.shape[0]
            steps += 1
            if bar is not None:
                if step % 10 == 0:
                    bar.set_postfix_str(f"loss {total / seen:.4f}", refresh=False)
                bar.update(1)
        if size > 1:  # this rank's sums -> the global batches' (one Allreduce of 2 numbers)
            total, seen = world.allreduce_sum([total, seen])
            seen = int(seen)
        result.train_seconds += time.perf_counter() - start
        result.images += seen
        if scheduler is not None:
            scheduler.step()
        if not math.isfinite(total):
            if bar is not None:
                bar.close()
            raise FloatingPointError(
                f"[train] loss: expected a finite value, got {total / seen} "
                f"in epoch {epoch} (try a smaller --lr)"
            )
        if size > 1:
            stepper.sync_buffers()  # rank 0's running statistics, for the evaluation
            test_loss, test_accuracy = _evaluate_shared(model, dataset, world)
        else:
            test = evaluate(
                model, dataset.x_test, dataset.y_test, dataset.binary, dataset.num_classes
            )
            test_loss, test_accuracy = test.loss, test.accuracy
        entry = {
            "epoch": epoch,
            "loss": total / seen,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
        }
        if layers:
            entry["gradient_norms"] = {name: value / steps for name, value in norm_sums.items()}
        result.history.append(entry)
        if bar is not None:
            bar.set_postfix_str(
                f"loss {entry['loss']:.4f}, test loss {test_loss:.4f}, "
                f"test accuracy {100 * test_accuracy:.2f}%"
            )
            bar.close()
        elif log is not None:
            log(format_epoch(entry, epochs))
    return result


def _evaluate_shared(model, dataset, world):
    """(test loss, test accuracy) of the whole test set, each rank evaluating a contiguous
    share of it and the sums reduced over the ranks."""
    shares = np.array_split(np.arange(dataset.y_test.shape[0]), world.size)
    mine = shares[world.rank]
    loss_sum = correct = 0.0
    if mine.size:
        x, y = dataset.x_test[mine[0] : mine[-1] + 1], dataset.y_test[mine[0] : mine[-1] + 1]
        share = evaluate(model, x, y, dataset.binary, dataset.num_classes)
        loss_sum, correct = share.loss * share.count, share.correct
    loss_sum, correct, count_ = world.allreduce_sum([loss_sum, correct, mine.size])
    return loss_sum / count_, correct / count_


# ---- reports ---------------------------------------------------------------------------


def format_confusion(confusion, class_names):
    width = max(
        5, max(len(n) for n in class_names) + 1, len(str(int(confusion.max(initial=0)))) + 1
    )
    lines = [
        "confusion matrix (rows: true label, columns: predicted label):",
        " " * width + "".join(f"{n:>{width}}" for n in class_names),
    ]
    for name, row in zip(class_names, confusion):
        lines.append(f"{name:>{width}}" + "".join(f"{int(v):>{width}d}" for v in row))
    return "\n".join(lines)


def format_report(evaluation, class_names):
    return "\n".join(
        [
            f"test accuracy {100 * evaluation.accuracy:.2f}% "
            f"({evaluation.correct}/{evaluation.count}), test loss {evaluation.loss:.6f}",
            format_confusion(evaluation.confusion, class_names),
        ]
    )


def format_gradient_flow(norms, types):
    """Each layer's mean gradient norm in the first and the last epoch, one line a layer."""
    lines = ["gradient norm per layer (mean over an epoch's steps), first -> last epoch:"]
    width = max((len(f"{name} {types[name]}") for name in norms), default=0)
    for name, values in norms.items():
        lines.append(f"  {f'{name} {types[name]}':<{width}}  {values[0]:.3e} -> {values[-1]:.3e}")
    return "\n".join(lines)


def _summary(command, dataset, evaluation, seconds):
    return {
        "command": command,
        "dataset": dataset.name,
        "description": dataset.description,
        "classes": dataset.class_names,
        "binary": dataset.binary,
        "test_images": evaluation.count,
        "test_accuracy": evaluation.accuracy,
        "test_loss": evaluation.loss,
        "correct": evaluation.correct,
        "confusion_matrix": evaluation.confusion.tolist(),
        "seconds": seconds,
    }


# ---- the figure ------------------------------------------------------------------------


def _image(ax, image, **kwargs):
    image = np.asarray(image, dtype=np.float64)
    if image.shape[0] == 3:  # RGB, as the eye sees it
        ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1), **kwargs)
    else:
        ax.imshow(image[0], cmap=kwargs.pop("cmap", "gray"), **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(count, columns):
    columns = max(1, min(columns, count))
    return max(1, -(-count // columns)), columns


def plot_gradient_flow(ax, history, types=None):
    """One line per layer on `ax`: the epoch's mean gradient norm (history's
    "gradient_norms") against the epoch, on a log scale; labelled "0 Conv2d" with types."""
    epochs = [e["epoch"] for e in history]
    norms = gradient_norms_by_layer(history)
    for name, values in norms.items():
        label = f"{name} {types[name]}" if types and name in types else name
        ax.plot(epochs, values, "o-", markersize=3, label=label or "model")
    ax.set(
        xlabel="epoch",
        ylabel="|dL/d parameters| (mean per step)",
        title="gradient flow",
        yscale="log",
    )
    ax.grid(alpha=0.3, which="both")
    if norms:
        if len(ax.get_lines()) <= 8:
            ax.legend(title="layer", fontsize=8)
        else:  # a deep network's many lines: the legend beside the panel, not over it
            ax.legend(title="layer", fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_training(path, history, model, x_test, evaluation, class_names, title="", max_images=24):
    """A PNG: loss and test accuracy per epoch, the gradient flow (each layer's gradient
    norm per epoch, plot_gradient_flow), the first convolution's filters, and misclassified
    test images labelled "predicted / true". Returns the matplotlib Figure."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise ImportError(
            f"[train] plot: matplotlib is needed for --plot: {data._EXTRA_HINT}"
        ) from error
    figure = Figure(figsize=(15, 9), layout="constrained")
    FigureCanvasAgg(figure)  # draws off screen; pyplot's global state stays untouched
    if title:
        figure.suptitle(title)
    top, bottom = figure.subfigures(2, 1, height_ratios=[1, 1.2])
    loss_ax, accuracy_ax, gradient_ax = top.subplots(1, 3)
    epochs = [e["epoch"] for e in history]
    loss_ax.plot(epochs, [e["loss"] for e in history], "o-", label="training")
    loss_ax.plot(epochs, [e["test_loss"] for e in history], "o-", label="test")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss", yscale="log")
    loss_ax.legend()
    accuracy_ax.plot(epochs, [100 * e["test_accuracy"] for e in history], "o-", color="C1")
    accuracy_ax.set(xlabel="epoch", ylabel="%", title="test accuracy")
    accuracy_ax.set_ylim(min(accuracy_ax.get_ylim()[0], 99), 100)  # no room above 100%
    for ax in (loss_ax, accuracy_ax):
        ax.grid(alpha=0.3)
    plot_gradient_flow(gradient_ax, history, layer_types(model))
    for ax in (loss_ax, accuracy_ax, gradient_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers

    filters_fig, wrong_fig = bottom.subfigures(1, 2)
    weights = next(
        (
            layer.weight.data
            for layer in model
            if getattr(layer, "weight", None) is not None and layer.weight.data.ndim == 4
        ),
        None,
    )
    if weights is not None:
        rows, columns = _grid(weights.shape[0], 8)
        limit = float(np.max(np.abs(weights))) or 1.0
        axes = np.atleast_1d(filters_fig.subplots(rows, columns)).ravel()
        for ax, w in zip(axes, weights):
            _image(ax, w if w.shape[0] == 3 else w[:1], cmap="RdBu_r", vmin=-limit, vmax=limit)
        for ax in axes[weights.shape[0] :]:
            ax.axis("off")
        shown = "" if weights.shape[1] in (1, 3) else " (input channel 0)"
        filters_fig.suptitle(f"first-layer filters{shown}")

    wrong = np.flatnonzero(evaluation.predicted != evaluation.labels)
    shown = wrong[:max_images]
    some = f", the first {shown.size} shown" if shown.size < wrong.size else ""
    wrong_fig.suptitle(
        f"misclassified test images: {wrong.size} of {evaluation.count}{some} (predicted / true)"
    )
    if wrong.size:
        rows, columns = _grid(shown.size, 6)
        axes = np.atleast_1d(wrong_fig.subplots(rows, columns)).ravel()
        for ax, i in zip(axes, shown):
            _image(ax, x_test[i])
            ax.set_title(
                f"{class_names[evaluation.predicted[i]]} / {class_names[evaluation.labels[i]]}",
                fontsize=8,
                color="C3",
            )
        for ax in axes[shown.size :]:
            ax.axis("off")
    figure.savefig(os.fspath(path), dpi=100, bbox_inches="tight")  # a legend beside a panel
    return figure


# ---- the commands ----------------------------------------------------------------------


def _check_output_path(path, what):
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"[train] {what}: expected an existing directory for "
            f"{path!r}, got no directory {directory!r}"
        )


def _set_threads(args):
    if args.threads is not None:
        from . import set_num_threads

        set_num_threads(args.threads)


def _load_data(args, **options):
    """The dataset the data options of train and evaluate name (__main__._add_data_arguments)."""
    return load_dataset(
        mnist=args.mnist,
        npz=args.npz,
        binary=args.binary,
        seed=args.seed,
        test_fraction=args.test_fraction,
        **options,
    )


def _print_json(summary):
    print(json.dumps(summary, indent=1))


def run_train(args) -> int:
    """`cnnbp train`, from the parsed arguments (see __main__.build_parser)."""
    start = time.perf_counter()
    if args.save is not None:
        _check_output_path(args.save, "save")
    if args.export_data is not None:
        _check_output_path(args.export_data, "export-data")
    if args.plot is not None:
        _check_output_path(args.plot, "plot")
        if importlib.util.find_spec("matplotlib") is None:  # fail before training, not after
            raise ImportError(f"[train] plot: matplotlib is needed for --plot: {data._EXTRA_HINT}")
    _set_threads(args)
    world = None
    if getattr(args, "distributed", False):
        from . import distributed

        world = distributed.init(require=True)
    main = world is None or world.is_main  # the one that prints, draws and saves
    dataset = _load_data(args)
    epochs, lr, schedule_name, weight_decay = training_settings(
        args.arch,
        dataset.name,
        args.optimizer,
        args.epochs,
        args.lr,
        args.schedule,
        args.weight_decay,
    )
    if args.export_data is not None and main:  # what fit draws from NumPy, before it runs
        data.export_npz(
            args.export_data,
            dataset.x_train,
            dataset.y_train,
            dataset.x_test,
            dataset.y_test,
            epochs,
            seed=args.seed,
        )
    say = (lambda *a, **k: None) if args.json or not main else print
    say(f"data: {dataset.description}")
    say(
        f"      {dataset.x_train.shape[0]} training and "
        f"{count(dataset.x_test.shape[0], 'test image')} "
        f"of {'x'.join(map(str, dataset.x_train.shape[1:]))}, "
        f"{count(dataset.num_classes, 'class', 'classes')}"
    )
    momentum = optimizer_momentum(args.optimizer, args.momentum)
    momentum = "" if momentum is None else f", momentum {momentum:g}"
    schedule = "" if schedule_name == "constant" else f", {schedule_name} schedule"
    decay = f", weight decay {weight_decay:g}" if weight_decay else ""
    say(
        f"training: {count(epochs, 'epoch')}, batch {args.batch_size}, {args.optimizer} lr {lr:g}"
        f"{momentum}{schedule}{decay}, seed {args.seed}, arch {args.arch}"
    )
    if world is not None:
        say(
            f"distributed: {count(world.size, 'process', 'processes')}, "
            f"{args.batch_size // world.size if args.batch_size % world.size == 0 else '?'} "
            f"images of each batch per process"
        )

    result = fit(
        dataset,
        epochs=epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=lr,
        momentum=args.momentum,
        weight_decay=weight_decay,
        seed=args.seed,
        progress=not args.quiet,
        log=say,
        schedule=schedule_name,
        arch=args.arch,
        world=world,
    )
    if not main:
        return 0
    model = result.model
    evaluation = evaluate(
        model, dataset.x_test, dataset.y_test, dataset.binary, dataset.num_classes
    )
    if args.save is not None:
        model.save(args.save)
    if args.plot is not None:
        plot_training(
            args.plot,
            result.history,
            model,
            dataset.x_test,
            evaluation,
            dataset.class_names,
            title=f"cnnbp train: {dataset.description}",
        )
    seconds = time.perf_counter() - start

    if args.json:
        summary = _summary("train", dataset, evaluation, seconds)
        summary.update(
            {
                "train_images": int(dataset.x_train.shape[0]),
                "epochs": epochs,
                "batch_size": args.batch_size,
                "arch": args.arch,
                "optimizer": args.optimizer,
                "lr": lr,
                "seed": args.seed,
                "parameters": _parameter_count(model),
                "processes": 1 if world is None else world.size,
                "losses": result.losses,
                "history": result.history,
                "gradient_norms": result.gradient_norms,
                "layer_types": layer_types(model),
                "train_seconds": result.train_seconds,
                "images_per_second": result.images_per_second,
                "saved": args.save,
                "exported_data": args.export_data,
                "plot": args.plot,
            }
        )
        _print_json(summary)
        return 0
    print(f"model: {count(len(model), 'layer')}, {count(_parameter_count(model), 'parameter')}")
    print(format_report(evaluation, dataset.class_names))
    print(format_gradient_flow(result.gradient_norms, layer_types(model)))
    print(
        f"trained {count(result.images, 'image')} in {result.train_seconds:.2f} s "
        f"({result.images_per_second:.0f} images/s); total time {seconds:.2f} s"
    )
    if args.save is not None:
        print(f"saved the model to {args.save}")
    if args.export_data is not None:
        print(f"saved the data to {args.export_data}")
    if args.plot is not None:
        print(f"saved the figure to {args.plot}")
    return 0


def _model_classes(model, dataset, command="evaluate"):
    """The class names of a saved model's outputs on `dataset` (marked binary for a
    one-output model), checked against the data's labels."""
    outputs = _output_count(model)
    if outputs == 1 and not dataset.binary:
        if dataset.num_classes > 2:
            raise ValueError(
                f"[{command}] model: a one-output (binary) model expects two "
                f"classes (pass --binary A B), got {dataset.num_classes} classes"
            )
        dataset.binary = True
    elif outputs != 1 and dataset.binary:
        raise ValueError(f"[{command}] binary: expected a one-output model, got {outputs} outputs")
    elif outputs != 1 and dataset.num_classes > outputs:
        raise ValueError(
            f"[{command}] model: expected at least {dataset.num_classes} outputs "
            f"for the data's labels, got {outputs}"
        )
    num_classes = 2 if dataset.binary else outputs
    return dataset.class_names + [str(c) for c in range(len(dataset.class_names), num_classes)]


def run_evaluate(args) -> int:
    """`cnnbp evaluate MODEL`: the report of a saved model on the test split."""
    start = time.perf_counter()
    _set_threads(args)
    model = cnnbp.load(args.model)
    dtype = model.parameters()[0].data.dtype if model.parameters() else np.float32
    dataset = _load_data(args, dtype=dtype, need_train=False)
    class_names = _model_classes(model, dataset)
    num_classes = len(class_names)
    evaluation = evaluate(model, dataset.x_test, dataset.y_test, dataset.binary, num_classes)
    seconds = time.perf_counter() - start
    if args.json:
        summary = _summary("evaluate", dataset, evaluation, seconds)
        summary.update(
            {
                "model": os.fspath(args.model),
                "classes": class_names,
                "images_per_second": evaluation.images_per_second,
            }
        )
        _print_json(summary)
        return 0
    print(
        f"model: {args.model}, {count(len(model), 'layer')}, "
        f"{count(_parameter_count(model), 'parameter')}"
    )
    print(f"data: {dataset.description}, {count(evaluation.count, 'test image')}")
    print(format_report(evaluation, class_names))
    print(
        f"evaluated {count(evaluation.count, 'image')} in {evaluation.seconds:.3f} s "
        f"({evaluation.images_per_second:.0f} images/s); total time {seconds:.2f} s"
    )
    return 0
