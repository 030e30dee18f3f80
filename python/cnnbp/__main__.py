"""The `cnnbp` command (also `python -m cnnbp`)."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnbp",
        description="Backpropagation through convolutional networks, visible and fast.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"cnnbp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    walk = commands.add_parser(
        "walkthrough",
        help="run the derivation's 15-parameter network step by step",
        description="Run one forward and backward pass of the derivation's network, print "
        "every quantity, check every gradient, then take a few SGD steps.",
    )
    walk.add_argument(
        "--seed", type=_seed, default=0, help="seed for X and the weights (default 0)"
    )
    walk.add_argument(
        "--label", type=_probability, default=1.0, help="the target Y in [0, 1] (default 1)"
    )
    walk.add_argument(
        "--lr", type=_positive_float, default=0.5, help="SGD learning rate (default 0.5)"
    )
    walk.add_argument(
        "--steps", type=_positive_int, default=5, help="SGD steps to take (default 5)"
    )
    walk.add_argument(
        "--html",
        metavar="OUT.html",
        help="also write the first step as a page (cnnbp explain's), every number shown",
    )

    from .train import (
        ARCHITECTURES,
        DEFAULT_BATCH_SIZE,
        DEFAULT_MOMENTUM,
        OPTIMIZERS,
        SCHEDULES,
    )

    train = commands.add_parser(
        "train",
        help="train a small CNN on real images and report its test accuracy",
        description="Train a CNN (by default conv-ReLU-pool x2 + linear) on the 8x8 digits "
        "(default), MNIST-format IDX files or a .npz, then print the test accuracy, the "
        "confusion matrix, each layer's gradient norm, images/s and the time.",
    )
    _add_data_arguments(train)
    train.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        default="cnn",
        help="the network: "
        + "; ".join(f"{name}: {spec.description}" for name, spec in ARCHITECTURES.items())
        + " (default cnn)",
    )
    train.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="passes over the training images (default: the architecture's, "
        + ", ".join(
            f"{name} {spec.epochs['digits']} ({spec.epochs['mnist']} for MNIST)"
            for name, spec in ARCHITECTURES.items()
        )
        + ")",
    )
    train.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per step (default {DEFAULT_BATCH_SIZE})",
    )
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd", help="default sgd")
    train.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default: "
        + ", ".join(f"{name} {choice.default_lr:g}" for name, choice in OPTIMIZERS.items())
        + "; sgd and nesterov 0.1 with --arch resnet)",
    )
    train.add_argument(
        "--momentum",
        type=_nonnegative_float,
        default=None,
        help=f"SGD momentum (default {DEFAULT_MOMENTUM:g})",
    )
    train.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default=None,
        help="learning rate per epoch: constant, step (x0.1 every third of the epochs) or "
        "cosine (down to 0 at the last epoch); default: the architecture's (cnn constant, "
        "resnet cosine)",
    )
    train.add_argument(
        "--weight-decay",
        type=_nonnegative_float,
        default=None,
        help="L2 penalty added to the gradient (default: the architecture's, cnn 0, resnet 5e-4)",
    )
    train.add_argument(
        "--save",
        metavar="MODEL.npz",
        help="write the trained model here (cnnbp evaluate and cnnbp.load read it)",
    )
    train.add_argument(
        "--plot",
        metavar="CURVES.png",
        help="write a figure: loss and accuracy per epoch, the gradient flow (each "
        "layer's gradient norm per epoch), first-layer filters, misclassified test images",
    )
    train.add_argument(
        "--export-data",
        metavar="DATA.npz",
        help="also write the training and test images and labels and each epoch's order of "
        "the training images, as this run uses them (for examples/cpp/train_lenet)",
    )
    train.add_argument(
        "--quiet", action="store_true", help="no progress bar: one line per epoch instead"
    )
    train.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over the MPI processes this one was launched with (mpiexec -n P "
        "cnnbp train --distributed): the global batch split over them, one report; needs "
        'pip install "cnnbp[mpi]"',
    )

    evaluate = commands.add_parser(
        "evaluate",
        help="report a saved model's accuracy on the test split",
        description="Load a model saved by `cnnbp train --save` and print its test accuracy "
        "and confusion matrix on the same test split (same --seed and "
        "--test-fraction as training).",
    )
    evaluate.add_argument("model", metavar="MODEL.npz", help="a model file (model.save)")
    _add_data_arguments(evaluate)

    explain = commands.add_parser(
        "explain",
        help="write one page that shows a saved model's forward and backward pass",
        description="Run one test image (the split cnnbp evaluate uses) forward and backward "
        "through a model saved by `cnnbp train --save`, in eval mode, and write a "
        "self-contained HTML page: every layer's feature maps and gradients, filters, "
        "parameter norms and histograms, and each layer's backprop rule checked on these "
        "numbers. Exit status 1 if a rule does not hold.",
    )
    explain.add_argument("model", metavar="MODEL.npz", help="a model file (model.save)")
    explain.add_argument(
        "--index",
        type=_index,
        default=0,
        metavar="I",
        help="which test image (default 0)",
    )
    _add_data_arguments(explain)
    explain.add_argument("--html", metavar="OUT.html", required=True, help="the page to write")

    export = commands.add_parser(
        "export",
        help="write a saved model as ONNX",
        description="Write a model saved by `cnnbp train --save` as an ONNX file (opset 17, "
        "float32, eval mode: BatchNorm2d with its running statistics, Dropout as the "
        "identity) whose batch dim N is free. Needs the onnx package: pip install "
        "'cnnbp[onnx]'.",
    )
    export.add_argument("model", metavar="MODEL.npz", help="a model file (model.save)")
    export.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    export.add_argument(
        "--input-shape",
        type=_input_shape,
        required=True,
        metavar="C,H,W",
        help="one input's shape without the batch dim, e.g. 1,8,8 for the digits or 1,28,28 "
        "for MNIST (model files do not record it)",
    )
    # every command's last option
    for command, output in [
        (walk, "machine-readable JSON"),
        (train, "a machine-readable summary"),
        (evaluate, "a machine-readable summary"),
    ]:
        command.add_argument("--json", action="store_true", help=f"print {output}")
    parser.commands = commands.choices  # each command's parser: its errors carry its name
    return parser


def _checked(kind, accept, expected):
    """An argparse type: the text as an int or float (kind), refused unless accept(value)."""

    def parse(text):
        value = _number(kind, text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a number > 0")
_nonnegative_float = _checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
_fraction = _checked(float, lambda v: 0 < v < 1, "a number between 0 and 1")
_label = _checked(int, lambda v: v >= 0, "a class label >= 0")
_index = _checked(int, lambda v: v >= 0, "an integer >= 0")
_seed = _checked(int, lambda v: 0 <= v < 2**64, "an integer in [0, 2^64)")
_probability = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _input_shape(text):
    """--input-shape C,H,W: positive integers separated by commas."""
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas (C,H,W), got {text!r}"
        )
    return dims


def _number(kind, text):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


class _TwoClasses(argparse.Action):
    """--binary A B: two different class labels."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values[0] == values[1]:
            parser.error(
                f"argument --binary: expected two different classes, got {values[0]} twice"
            )
        setattr(namespace, self.dest, values)


def _add_data_arguments(parser):
    """The data options train and evaluate share, so that both see the same test split."""
    from .train import DEFAULT_TEST_FRACTION

    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--mnist",
        metavar="DIR",
        help="MNIST-format IDX files (train-*, "
        "t10k-*; plain or .gz; Fashion-MNIST too) instead of the digits",
    )
    source.add_argument(
        "--npz",
        metavar="PATH",
        help="a .npz with images x (N, C, H, W) or "
        "(N, H, W) and integer labels y (N,) instead of the digits",
    )
    parser.add_argument(
        "--binary",
        nargs=2,
        type=_label,
        metavar=("A", "B"),
        action=_TwoClasses,
        help="only classes A and B, as a two-class problem (one logit, BCEWithLogitsLoss)",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed for the split, the weights and the batch order (default 0)",
    )
    parser.add_argument(
        "--test-fraction",
        type=_fraction,
        default=DEFAULT_TEST_FRACTION,
        help=f"share of each class held out for testing, digits and .npz "
        f"(default {DEFAULT_TEST_FRACTION:g})",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="kernel threads (default: cnnbp.get_num_threads())",
    )


def run_export(args) -> int:
    """`cnnbp export MODEL OUT --input-shape C,H,W`: the saved model as ONNX."""
    import numpy as np

    from . import load, onnx_export
    from ._text import count

    model = load(args.model)
    onnx_export.export(model, args.output, args.input_shape)
    rounded = "" if model._fixed_dtype in (None, np.float32) else ", weights rounded to float32"
    parameters = sum(p.data.size for p in model.parameters())
    shape = ", ".join(map(str, args.input_shape))
    print(
        f"wrote {args.output}: {args.model} ({count(len(model), 'layer')}, "
        f"{count(parameters, 'parameter')}{rounded}), "
        f"input (N, {shape}) float32, opset {onnx_export.OPSET}"
    )
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # --help and --version print too
        status = _run(parser.commands[args.command], args)
        sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
        return status
    except BrokenPipeError:
        # `cnnbp walkthrough --json | head`: the reader closed the pipe. End quietly, as a
        # program stopped by SIGPIPE does (status 128 + 13); stdout goes to devnull so that
        # the interpreter's last flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _abort_world(command, error):
    """A rank of a distributed run failed: say which, and end every rank (MPI_Abort). In a
    world of one (or without MPI, as --distributed's own ImportError), return."""
    from . import distributed

    world = distributed._WORLD
    if world is None or world.size == 1:
        return
    import traceback

    if not isinstance(error, (ValueError, OSError)):
        traceback.print_exception(type(error), error, error.__traceback__)
    print(f"{command.prog}: {distributed.failure_message(world, error)}", file=sys.stderr)
    world.abort(1)


def _run(command, args) -> int:
    """Run the parsed command; errors are printed as `cnnbp COMMAND: ...` (command.prog)."""
    if args.command in ("train", "evaluate", "explain"):
        from . import explainer, train

        if args.command == "train":
            try:
                train.optimizer_momentum(args.optimizer, args.momentum)
            except ValueError:
                command.error(f"argument --momentum: not used by --optimizer {args.optimizer}")

        run = {
            "train": train.run_train,
            "evaluate": train.run_evaluate,
            "explain": explainer.run_explain,
        }[args.command]
        try:
            return run(args)
        except BrokenPipeError:
            raise
        except Exception as error:
            if getattr(args, "distributed", False):
                _abort_world(command, error)  # the other ranks would wait for this one
            if isinstance(error, (ValueError, OSError)):  # bad data or paths: a bad argument
                print(f"{command.prog}: {error}", file=sys.stderr)
                return 2
            if isinstance(error, (ImportError, FloatingPointError)):
                print(f"{command.prog}: {error}", file=sys.stderr)
                return 1
            raise
    if args.command == "export":
        try:
            return run_export(args)
        except (ValueError, OSError) as error:
            print(f"cnnbp export: {error}", file=sys.stderr)
            return 2
        except ImportError as error:
            print(f"cnnbp export: {error}", file=sys.stderr)
            return 1
    if args.command == "walkthrough":
        from . import walkthrough

        try:
            return walkthrough.main(
                seed=args.seed,
                label=args.label,
                lr=args.lr,
                steps=args.steps,
                as_json=args.json,
                html=args.html,
            )
        except ValueError as error:
            print(f"{command.prog}: {error}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
