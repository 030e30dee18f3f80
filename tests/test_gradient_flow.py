"""The gradient flow `cnnbp train` records and draws, from Python: cnnbp.train's layer
names, the per-epoch gradient norms, the figure's panel and the ARCHITECTURES table."""

import numpy as np
import pytest
from cnnbp import nn, train


@pytest.fixture(scope="module")
def dataset():
    """120 noisy 8x8 images: a bright row (class 0) or a bright column (class 1)."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(2), 60)
    x = rng.uniform(0, 0.3, size=(120, 1, 8, 8)).astype(np.float32)
    for i, label in enumerate(y):
        k = rng.integers(1, 7)
        if label == 0:
            x[i, 0, k, :] += 0.7
        else:
            x[i, 0, :, k] += 0.7
    (x_train, y_train), (x_test, y_test) = train.data.train_test_split(x, y, seed=0)
    return train.Dataset("npz", "rows and columns", x_train, y_train, x_test, y_test, ["0", "1"])


def test_layers_are_named_by_their_parameters_prefix_in_nested_models_too():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(2, 2, 1))),
        nn.Flatten(),
        nn.Linear(8, 2, bias=False),
    )
    layers = train.parameter_layers(model)
    assert list(layers) == ["0.0", "0.2.0", "2"]
    assert [len(p) for p in layers.values()] == [2, 2, 1]
    assert layers["0.2.0"][0] is model[0][2][0].weight
    assert train.layer_types(model) == {"0.0": "Conv2d", "0.2.0": "Conv2d", "2": "Linear"}
    assert list(train.parameter_layers(nn.Linear(3, 2))) == [""]  # a model of one layer


def test_gradient_norm_is_the_l2_norm_of_all_the_layers_gradients_together():
    layer = nn.Linear(3, 2, dtype=np.float64)
    assert train.gradient_norm(layer.parameters()) == 0.0  # no gradient yet
    layer.weight.grad = np.full((2, 3), 2.0)
    layer.bias.grad = np.array([1.0, -1.0])
    assert train.gradient_norm(layer.parameters()) == pytest.approx(np.sqrt(6 * 4 + 2))


def test_another_architecture_is_one_table_entry(dataset, monkeypatch):
    def nested(input_shape, num_outputs, dtype):
        c, h, w = input_shape
        return nn.Sequential(
            nn.Sequential(nn.Conv2d(c, 4, 3, padding=1, dtype=dtype), nn.ReLU()),
            nn.Flatten(),
            nn.Linear(4 * h * w, num_outputs, dtype=dtype),
        )

    monkeypatch.setitem(
        train.ARCHITECTURES, "nested", train.Architecture(nested, "a nested network")
    )
    result = train.fit(dataset, epochs=2, arch="nested")
    assert isinstance(result.model[0], nn.Sequential)
    norms = result.gradient_norms
    assert list(norms) == ["0.0", "2"] and all(len(v) == 2 for v in norms.values())
    assert all(np.isfinite(v) and v > 0 for values in norms.values() for v in values)
    with pytest.raises(ValueError, match=r"\[train\] arch: expected one of .*, got 'mlp'"):
        train.fit(dataset, epochs=1, arch="mlp")


def test_recording_changes_nothing_about_the_training(dataset):
    recorded = train.fit(dataset, epochs=2, seed=3)
    plain = train.fit(dataset, epochs=2, seed=3, record_gradients=False)
    assert recorded.losses == plain.losses
    assert plain.gradient_norms == {} and "gradient_norms" not in plain.history[0]
    for a, b in zip(recorded.model.parameters(), plain.model.parameters()):
        np.testing.assert_array_equal(a.data, b.data)


def test_the_figure_has_a_gradient_flow_panel_with_one_line_per_layer(dataset, tmp_path):
    pytest.importorskip("matplotlib")
    result = train.fit(dataset, epochs=3)
    evaluation = train.evaluate(result.model, dataset.x_test, dataset.y_test, False)
    path = tmp_path / "curves.png"
    figure = train.plot_training(
        path, result.history, result.model, dataset.x_test, evaluation, dataset.class_names
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [ax.get_title() for ax in figure.get_axes()]
    assert titles[:3] == ["loss", "test accuracy", "gradient flow"]
    panel = figure.get_axes()[2]
    assert panel.get_yscale() == "log"
    labels = [text.get_text() for text in panel.get_legend().get_texts()]
    assert labels == ["0 Conv2d", "3 Conv2d", "7 Linear"]
    for line, values in zip(panel.get_lines(), result.gradient_norms.values()):
        np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
        np.testing.assert_array_equal(line.get_ydata(), values)
