"""`cnnbp train` and `cnnbp evaluate`, run as a user runs them: `python -m cnnbp ...`."""

import json
import os
import subprocess
import sys

import cnnbp
import numpy as np
import pytest
from cnnbp import nn


def run(*args, timeout=180):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # small problems; keep the suite's cores free
    return subprocess.run(
        [sys.executable, "-m", "cnnbp", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def run_json(*args):
    result = run(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """150 noisy 8x8 images of three easy patterns: a row, a column, the diagonal."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 50)
    x = rng.uniform(0, 0.3, size=(150, 8, 8)).astype(np.float32)
    for i, label in enumerate(y):
        k = rng.integers(1, 7)
        if label == 0:
            x[i, k, :] += 0.7
        elif label == 1:
            x[i, :, k] += 0.7
        else:
            x[i][np.eye(8, dtype=bool)] += 0.7
    path = tmp_path_factory.mktemp("data") / "patterns.npz"
    np.savez(path, x=x, y=y)
    return path


def test_train_prints_epochs_and_the_report(dataset):
    result = run("train", "--npz", dataset, "--epochs", 2, "--quiet")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "epoch 1/2  loss " in out and "epoch 2/2  loss " in out
    assert "120 training and 30 test images of 1x8x8, 3 classes" in out
    assert "test accuracy " in out
    assert "confusion matrix (rows: true label, columns: predicted label):" in out
    assert "images/s" in out and "total time" in out
    assert "epoch" not in result.stderr  # --quiet: no progress bar


def test_same_seed_same_losses_other_seed_other_losses(dataset):
    first = run_json("train", "--npz", dataset, "--epochs", 2, "--quiet", "--seed", 3)
    again = run_json("train", "--npz", dataset, "--epochs", 2, "--quiet", "--seed", 3)
    other = run_json("train", "--npz", dataset, "--epochs", 2, "--quiet", "--seed", 4)
    assert len(first["losses"]) == 2 and all(np.isfinite(first["losses"]))
    assert first["losses"] == again["losses"]
    assert first["confusion_matrix"] == again["confusion_matrix"]
    assert first["losses"] != other["losses"]
    assert first["test_images"] == 30 and sum(map(sum, first["confusion_matrix"])) == 30
    assert first["correct"] == round(first["test_accuracy"] * 30)


@pytest.mark.parametrize(
    "optimizer,schedule", [("adamw", "cosine"), ("nesterov", "step"), ("adam", "constant")]
)
def test_optimizers_and_schedules_by_name(dataset, optimizer, schedule):
    result = run(
        "train",
        "--npz",
        dataset,
        "--epochs",
        3,
        "--quiet",
        "--optimizer",
        optimizer,
        "--schedule",
        schedule,
    )
    assert result.returncode == 0, result.stderr
    expected = "" if schedule == "constant" else f", {schedule} schedule"
    assert f"{optimizer} lr " in result.stdout and f"{expected}, seed 0" in result.stdout
    assert "test accuracy " in result.stdout


def test_export_data_writes_the_runs_split_and_batch_order(dataset, tmp_path):
    # what examples/cpp/train_lenet trains on (tests/test_cpp_example.py runs it)
    exported = tmp_path / "run.npz"
    trained = run_json(
        "train", "--npz", dataset, "--epochs", 2, "--quiet", "--export-data", exported, "--seed", 4
    )
    assert trained["exported_data"] == str(exported)
    (x_train, y_train), (x_test, y_test) = cnnbp.data.train_test_split(
        *cnnbp.data.load_npz(dataset), seed=4
    )
    loader = cnnbp.data.DataLoader(x_train, y_train, seed=4)
    with np.load(exported) as contents:
        for name, want in [("x_train", x_train), ("y_train", y_train), ("x_test", x_test)]:
            np.testing.assert_array_equal(contents[name], want, err_msg=name)
        np.testing.assert_array_equal(contents["y_test"], y_test)
        assert contents["order"].shape == (2, 120) and int(contents["seed"]) == 4
        for order in contents["order"]:
            np.testing.assert_array_equal(np.concatenate([xb for xb, _ in loader]), x_train[order])
    text = run("train", "--npz", dataset, "--epochs", 1, "--quiet", "--export-data", exported)
    assert text.returncode == 0 and f"saved the data to {exported}" in text.stdout


def test_saved_model_evaluates_to_the_same_accuracy(dataset, tmp_path):
    model = tmp_path / "model.npz"
    trained = run_json(
        "train", "--npz", dataset, "--epochs", 3, "--quiet", "--save", model, "--seed", 5
    )
    assert model.exists() and trained["saved"] == str(model)
    assert trained["test_accuracy"] > 0.6  # three easy patterns, three epochs
    evaluated = run_json("evaluate", model, "--npz", dataset, "--seed", 5)
    assert evaluated["test_accuracy"] == trained["test_accuracy"]
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]
    assert evaluated["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-6)
    text = run("evaluate", model, "--npz", dataset, "--seed", 5)
    assert text.returncode == 0, text.stderr
    assert f"test accuracy {100 * trained['test_accuracy']:.2f}%" in text.stdout
    assert "images/s" in text.stdout
    # another seed holds out other images, so the model is scored on others
    assert run_json("evaluate", model, "--npz", dataset, "--seed", 6)["test_images"] == 30


def test_binary_trains_one_logit_and_evaluate_needs_the_same_classes(dataset, tmp_path):
    model = tmp_path / "binary.npz"
    trained = run_json(
        "train", "--npz", dataset, "--binary", 2, 0, "--epochs", 2, "--quiet", "--save", model
    )
    assert trained["binary"] and trained["classes"] == ["2", "0"]
    assert trained["test_images"] == 20 and np.array(trained["confusion_matrix"]).shape == (2, 2)
    import cnnbp

    assert cnnbp.load(model)[-1].weight.data.shape[0] == 1  # one output: BCE with logits
    evaluated = run_json("evaluate", model, "--npz", dataset, "--binary", 2, 0)
    assert evaluated["test_accuracy"] == trained["test_accuracy"]
    refused = run("evaluate", model, "--npz", dataset)
    assert refused.returncode == 2
    assert "pass --binary A B" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_mnist_directory_trains_and_evaluates_on_the_t10k_files(dataset, tmp_path, arch):
    import gzip

    with np.load(dataset) as contents:
        x, y = contents["x"], contents["y"]
    images = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    order = np.random.default_rng(1).permutation(y.size)
    for prefix, part in (("train", order[:110]), ("t10k", order[110:])):
        n = part.size
        header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 8, 8))
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + images[part].tobytes())
        labels = (0x801).to_bytes(4, "big") + n.to_bytes(4, "big")
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(
            labels + y[part].astype(np.uint8).tobytes()
        )
    model = tmp_path / "m.npz"
    trained = run_json(
        "train", "--mnist", tmp_path, "--epochs", 2, "--quiet", "--save", model, "--arch", arch
    )
    assert trained["dataset"] == "mnist" and trained["epochs"] == 2 and trained["arch"] == arch
    assert trained["train_images"] == 110 and trained["test_images"] == 40
    evaluated = run_json("evaluate", model, "--mnist", tmp_path)
    assert evaluated["test_accuracy"] == trained["test_accuracy"]


LAYERS = {"0": "Conv2d", "3": "Conv2d", "7": "Linear"}  # the default arch's parameterized layers


def test_json_has_one_gradient_norm_per_layer_and_epoch_and_the_arch(dataset):
    summary = run_json("train", "--npz", dataset, "--epochs", 3, "--quiet")
    assert summary["arch"] == "cnn"
    assert summary["layer_types"] == LAYERS
    norms = summary["gradient_norms"]
    assert list(norms) == list(LAYERS)
    for values in norms.values():
        assert len(values) == 3
        assert all(np.isfinite(v) and v > 0 for v in values)
    for epoch, entry in enumerate(summary["history"]):  # the same numbers, per epoch
        assert entry["gradient_norms"] == {name: norms[name][epoch] for name in LAYERS}
    assert len({tuple(v) for v in norms.values()}) == 3  # each layer its own numbers


def test_gradient_norms_are_the_mean_per_step_norms_of_each_layers_gradient(dataset):
    """One epoch of three steps of 40 images, redone by hand: zero_grad, forward, loss,
    backward, read the gradients, step; the norms summed in float64 and averaged here."""
    import cnnbp
    from cnnbp import data, nn, optim

    summary = run_json(
        "train", "--npz", dataset, "--epochs", 1, "--batch-size", 40, "--quiet", "--seed", 2
    )
    x, y = data.load_npz(dataset)
    (x_train, y_train), _ = data.train_test_split(x, y, test_fraction=0.2, seed=2)
    cnnbp.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 3),
    )
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    norms = {name: [] for name in LAYERS}
    losses = []
    for xb, yb in data.DataLoader(x_train, y_train, batch_size=40, shuffle=True, seed=2):
        model.zero_grad()
        losses.append(float(loss_fn(model(xb), yb)) * yb.shape[0])
        model.backward(loss_fn.backward())
        for name in LAYERS:
            layer = model[int(name)]
            squares = [np.sum(p.grad.astype(np.float64) ** 2) for p in (layer.weight, layer.bias)]
            norms[name].append(np.sqrt(sum(squares)))
        opt.step()
    assert len(losses) == 3
    assert summary["losses"][0] == pytest.approx(sum(losses) / y_train.size, rel=1e-6)
    for name in LAYERS:
        assert summary["gradient_norms"][name][0] == pytest.approx(np.mean(norms[name]), rel=1e-5)
    # the mean over the steps, not one step's norm
    assert not any(
        summary["gradient_norms"]["0"][0] == pytest.approx(v, rel=1e-3) for v in norms["0"]
    )


def test_arch_is_a_choice_and_the_text_report_shows_the_gradient_norms(dataset):
    result = run("train", "--npz", dataset, "--epochs", 2, "--quiet", "--arch", "cnn")
    assert result.returncode == 0, result.stderr
    assert ", seed 0, arch cnn" in result.stdout
    assert "gradient norm per layer (mean over an epoch's steps), first -> last epoch:" in (
        result.stdout
    )
    assert "  0 Conv2d  " in result.stdout and "  7 Linear  " in result.stdout
    refused = run("train", "--arch", "mlp")
    assert refused.returncode == 2 and "--arch: invalid choice: 'mlp'" in refused.stderr


def test_plot_writes_a_png(dataset, tmp_path):
    pytest.importorskip("matplotlib")
    figure = tmp_path / "curves.png"
    result = run("train", "--npz", dataset, "--epochs", 2, "--quiet", "--plot", figure)
    assert result.returncode == 0, result.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"saved the figure to {figure}" in result.stdout


def test_plot_has_whole_epoch_ticks_accuracy_up_to_100_and_says_how_many_it_shows(
    dataset, tmp_path
):
    pytest.importorskip("matplotlib")
    from cnnbp import data, train
    from matplotlib.text import Text

    x, y = data.load_npz(dataset)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    evaluation = train.evaluate(model, x, y, binary=False, num_classes=3)  # untrained: wrong
    wrong = int(np.sum(evaluation.predicted != evaluation.labels))
    assert wrong > 24
    history = [
        {"epoch": e, "loss": 1 / e, "test_loss": 1 / e, "test_accuracy": a}
        for e, a in [(1, 0.9), (2, 1.0)]
    ]
    figure = train.plot_training(
        tmp_path / "p.png", history, model, x, evaluation, ["0", "1", "2"], max_images=24
    )
    loss_ax, accuracy_ax = figure.subfigs[0].axes[:2]
    for ax in (loss_ax, accuracy_ax):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert accuracy_ax.get_ylim()[1] == 100
    texts = [t.get_text() for t in figure.findobj(Text)]
    title = f"misclassified test images: {wrong} of 150, the first 24 shown (predicted / true)"
    assert title in texts, [t for t in texts if "misclassified" in t]


def test_progress_bar_goes_to_stderr(dataset):
    pytest.importorskip("tqdm")
    result = run("train", "--npz", dataset, "--epochs", 1, "--optimizer", "adam")
    assert result.returncode == 0, result.stderr
    assert "epoch 1/1" in result.stderr and "test accuracy" in result.stderr
    assert "adam lr 0.001" in result.stdout
    assert "training: 1 epoch, batch" in result.stdout  # not "1 epochs"


def test_default_run_is_the_digits():
    pytest.importorskip("sklearn")
    summary = run_json("train", "--epochs", 1, "--quiet")
    assert summary["dataset"] == "digits" and summary["train_images"] == 1438
    assert summary["test_images"] == 359 and summary["classes"] == [str(c) for c in range(10)]
    assert summary["test_accuracy"] > 0.5 and summary["images_per_second"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--epochs", "0"], "--epochs: expected an integer >= 1, got 0"),
        (["train", "--epochs", "two"], "--epochs: expected an integer, got 'two'"),
        (["train", "--lr", "-0.1"], "--lr: expected a number > 0, got -0.1"),
        (["train", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
        (["train", "--optimizer", "rmsprop"], "--optimizer: invalid choice: 'rmsprop'"),
        (["train", "--schedule", "linear"], "--schedule: invalid choice: 'linear'"),
        (["train", "--optimizer", "adam", "--momentum", "0.9"], "--momentum: not used by"),
        (["train", "--binary", "1", "1"], "--binary: expected two different classes"),
        (["train", "--binary", "1"], "--binary: expected 2 arguments"),
        (["train", "--binary", "1", "-2"], "--binary"),
        (["train", "--test-fraction", "1.5"], "--test-fraction: expected a number between 0 and 1"),
        (["train", "--mnist", "a", "--npz", "b"], "not allowed with argument"),
        (["train", "--threads", "0"], "--threads: expected an integer >= 1"),
        (["train", "--unknown"], "unrecognized arguments: --unknown"),
        (["evaluate"], "the following arguments are required: MODEL.npz"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_bad_data_and_paths_exit_2_with_a_message(dataset, tmp_path):
    cases = [
        (["train", "--npz", tmp_path / "missing.npz"], "[load_npz]"),
        (["train", "--mnist", tmp_path], "[load_mnist]"),
        (["train", "--npz", dataset, "--binary", "0", "7"], "[select_classes]"),
        (["train", "--npz", dataset, "--save", tmp_path / "no" / "m.npz"], "[train] save"),
        (["evaluate", dataset, "--npz", dataset], "[load]"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_resnet_trains_with_its_settings_and_evaluates_in_eval_mode(dataset, tmp_path):
    model = tmp_path / "resnet.npz"
    trained = run_json(
        "train", "--npz", dataset, "--arch", "resnet", "--epochs", 8, "--save", model, "--seed", 1
    )
    assert trained["arch"] == "resnet" and trained["lr"] == 0.1  # the architecture's SGD rate
    assert trained["test_accuracy"] > 0.6  # in eval mode: the running statistics
    # every convolution and BatchNorm2d is a layer of the gradient flow, by dotted path
    types = trained["layer_types"]
    assert types["0"] == "Conv2d" and types["1"] == "BatchNorm2d"
    assert types["3.block.0"] == "Conv2d" and types["7.shortcut.1"] == "BatchNorm2d"
    assert all(len(norms) == 8 for norms in trained["gradient_norms"].values())
    # the saved file holds the nested model with its running statistics; evaluate runs it
    # in eval mode (running statistics), as train's own test evaluation did
    loaded = cnnbp.load(model)
    assert isinstance(loaded[3], nn.Residual) and loaded[7].shortcut is not None
    assert int(loaded.state_dict()["1.num_batches_tracked"]) == 8 * 4  # 120 images, batch 32
    evaluated = run_json("evaluate", model, "--npz", dataset, "--seed", 1)
    assert evaluated["test_accuracy"] == trained["test_accuracy"]
    assert evaluated["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-6)
    text = run("train", "--npz", dataset, "--arch", "resnet", "--epochs", 1, "--quiet")
    assert "sgd lr 0.1, momentum 0.9, cosine schedule, weight decay 0.0005" in text.stdout
