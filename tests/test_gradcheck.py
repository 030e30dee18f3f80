"""cnnbp.gradcheck: backward against central finite differences, kinks and ties skipped."""

import cnnbp
import numpy as np
import pytest
from cnnbp import nn, walkthrough
from cnnbp.gradcheck import GradcheckReport, numeric_gradient


def small_cnn(dtype=np.float64, seed=1):
    cnnbp.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5, dtype=dtype),
    )


def conv_relu_logit(in_channels, out_channels, size, seed):
    """float64 conv 3x3 -> ReLU -> flatten -> linear to one logit, for size x size images,
    its weights drawn after cnnbp.manual_seed(seed)."""
    cnnbp.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, dtype=np.float64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(out_channels * (size - 2) ** 2, 1, dtype=np.float64),
    )


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3, 2, 8, 8)), np.array([0, 3, 4])


def test_walkthrough_network_passes():
    cnnbp.manual_seed(0)
    model = walkthrough.build_network()
    rng = np.random.default_rng(0)
    x = np.round(rng.uniform(-1, 1, size=(1, 1, 6, 6)), 2)
    report = cnnbp.gradcheck(model, x, np.array([[1.0]]), nn.BCELoss())
    assert isinstance(report, GradcheckReport) and report.passed, report
    assert list(report.parameters) == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert sum(c.probed + c.skipped for c in report) == 15
    assert all(c.error < 1e-6 for c in report)
    assert report.copied_from is None


def test_small_cnn_passes_with_cross_entropy_and_bce_with_logits():
    x, y = batch()
    report = cnnbp.gradcheck(small_cnn(), x, y, nn.CrossEntropyLoss())
    assert report.passed, report
    assert [(c.name, c.shape, c.probed + c.skipped) for c in report] == [
        ("0.weight", (3, 2, 3, 3), 54),
        ("0.bias", (3,), 3),
        ("3.weight", (4, 3, 3, 3), 108),
        ("3.bias", (4,), 4),
        ("7.weight", (5, 16), 80),
        ("7.bias", (5,), 5),
    ]
    binary = conv_relu_logit(2, 2, 8, seed=2)
    report = cnnbp.gradcheck(binary, x, np.array([[1.0], [0.0], [1.0]]), nn.BCEWithLogitsLoss())
    assert report.passed, report


def test_every_convolution_and_pool_option_passes():
    model = nn.Sequential(
        nn.Conv2d(2, 4, (2, 3), padding="same", dilation=(1, 2), groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2, groups=4),  # depthwise
        nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )
    x = np.random.default_rng(0).standard_normal((3, 2, 9, 9)).astype(np.float32)
    report = cnnbp.gradcheck(
        model, x, np.array([0, 2, 1]), nn.CrossEntropyLoss(label_smoothing=0.1)
    )
    assert report.passed, report
    assert [c.shape for c in report][:3] == [(4, 1, 2, 3), (4,), (4, 1, 3, 3)]


def test_float32_model_is_checked_on_a_float64_copy_and_left_alone():
    model = small_cnn(dtype=np.float32)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    x, y = batch()
    report = cnnbp.gradcheck(model, x.astype(np.float32), y, nn.CrossEntropyLoss())
    assert report.passed, report
    assert report.copied_from == "float32" and "float64 copy of the float32 model" in str(report)
    for name, value in model.state_dict().items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, before[name])


class WrongConv(nn.Conv2d):
    """A layer whose dL/dW comes out 10% too large: its backward, redefined in Python, runs
    inside the model's C++ Sequential."""

    def backward(self, grad_output):
        dx = super().backward(grad_output)
        self.weight.grad *= 1.1
        return dx


def test_a_wrong_weight_gradient_is_caught():
    right_model, wrong_model = small_cnn(), small_cnn()
    layers = list(wrong_model)
    wrong = WrongConv(3, 4, 3, padding=1, dtype=np.float64)
    wrong.load_state_dict(layers[3].state_dict())
    layers[3] = wrong
    model = nn.Sequential(*layers)
    x, y = batch()
    loss_fn = nn.CrossEntropyLoss()

    def weight_gradient(net):
        net.zero_grad()
        loss_fn(net(x), y)
        net.backward(loss_fn.backward())
        return np.array(net[3].weight.grad, copy=True)

    np.testing.assert_allclose(weight_gradient(model), 1.1 * weight_gradient(right_model))

    report = cnnbp.gradcheck(model, x, y, loss_fn)
    assert not report.passed
    assert report.failed == ["3.weight"]
    assert report["3.weight"].error == pytest.approx(0.1, rel=1e-3)
    assert "FAILED: 3.weight" in report.summary()


def test_a_wrong_loss_gradient_fails_every_parameter():
    class HalfGradient(nn.CrossEntropyLoss):
        def backward(self, grad_loss=1.0):
            return super().backward(grad_loss) * 0.5

    x, y = batch()
    report = cnnbp.gradcheck(small_cnn(), x, y, HalfGradient())
    assert report.failed == list(report.parameters)
    assert all(c.error == pytest.approx(0.5, rel=1e-3) for c in report)


def test_probes_across_a_relu_kink_are_skipped():
    # zero images and a zero bias put every ReLU input exactly at the kink: moving the bias
    # by +-eps flips the pattern, so that probe is skipped; the weights cannot move it
    model = conv_relu_logit(1, 1, 4, seed=3)
    model[0].bias.data[:] = 0.0
    x = np.zeros((2, 1, 4, 4))
    report = cnnbp.gradcheck(model, x, np.array([[1.0], [0.0]]), nn.BCEWithLogitsLoss())
    assert report["0.bias"].skipped == 1 and report["0.bias"].probed == 0
    assert report["0.weight"].skipped == 0 and report["0.weight"].probed == 9
    assert report.passed, report


def test_probes_across_a_max_pool_tie_are_skipped():
    # two channels feed one 1x1 filter with equal weights: positions (0, 0) and (0, 1) of
    # the pooling window tie, and moving either weight breaks the tie one way or the other
    cnnbp.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 1, 1, dtype=np.float64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1, 1, dtype=np.float64),
    )
    model[0].weight.data[:] = 0.5
    x = np.zeros((1, 2, 2, 2))
    x[0, 0, 0, 0] = x[0, 1, 0, 1] = 1.0
    report = cnnbp.gradcheck(model, x, np.array([[1.0]]), nn.BCEWithLogitsLoss())
    assert report["0.weight"].skipped == 2 and report["0.weight"].probed == 0
    assert report["0.bias"].skipped == 0 and report["3.weight"].skipped == 0
    assert report.passed, report


def test_max_entries_samples_the_entries_and_json():
    x, y = batch()
    report = cnnbp.gradcheck(small_cnn(), x, y, nn.CrossEntropyLoss(), max_entries=7, seed=1)
    assert [c.probed + c.skipped for c in report] == [7, 3, 7, 4, 7, 5]
    summary = report.to_json()
    assert summary["passed"] and summary["parameters"]["3.weight"]["shape"] == [4, 3, 3, 3]
    text = str(report)
    assert text.splitlines()[1].split()[:4] == ["parameter", "shape", "probed", "skipped"]
    assert "3x2x3x3" in text and text.splitlines()[-1].startswith("passed")


def test_model_is_left_with_the_unperturbed_forward():
    model = small_cnn()
    x, y = batch()
    expected = model(x).copy()
    cnnbp.gradcheck(model, x, y, nn.CrossEntropyLoss(), max_entries=3)
    np.testing.assert_array_equal(model[-1].output, expected)
    np.testing.assert_array_equal(model(x), expected)


def test_bad_arguments():
    x, y = batch()
    with pytest.raises(ValueError, match=r"\[gradcheck\] eps: expected > 0"):
        cnnbp.gradcheck(small_cnn(), x, y, nn.CrossEntropyLoss(), eps=0)
    with pytest.raises(ValueError, match=r"\[gradcheck\] model: expected trainable parameters"):
        cnnbp.gradcheck(nn.Sequential(nn.ReLU()), x, y, nn.CrossEntropyLoss())


def test_numeric_gradient_of_a_known_function_restores_x():
    x = np.random.default_rng(5).standard_normal((3, 4))
    before = x.copy()
    numeric = numeric_gradient(lambda: float(np.sum(x**3)), x)
    assert numeric.shape == x.shape and numeric.dtype == np.float64
    np.testing.assert_allclose(numeric, 3 * before**2, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(x, before)  # every entry restored, bit for bit
    # a strided view is perturbed where it lies
    view = before.copy()[:, ::2]
    numeric = numeric_gradient(lambda: float(np.sum(view**2)), view)
    np.testing.assert_allclose(numeric, 2 * view, rtol=1e-8)


def test_numeric_gradient_probes_the_entries_asked_and_skips_crossings():
    x = np.array([-1.0, 0.0, 2.0, 3.0])

    def relu_sum():
        return float(np.sum(np.maximum(x, 0.0)))

    numeric = numeric_gradient(relu_sum, x, entries=[0, 1, 2])
    np.testing.assert_allclose(numeric[[0, 2]], [0.0, 1.0], atol=1e-9)
    assert numeric[1] == pytest.approx(0.5)  # across the kink: a meaningless quotient
    assert np.isnan(numeric[3])  # not probed
    signs = x > 0
    numeric = numeric_gradient(relu_sum, x, skip=lambda: not np.array_equal(x > 0, signs))
    assert np.isnan(numeric[1])  # the probe that crossed the kink is skipped
    np.testing.assert_allclose(numeric[[0, 2, 3]], [0.0, 1.0, 1.0], atol=1e-9)


def test_numeric_gradient_refuses_other_arrays():
    with pytest.raises(TypeError, match=r"\[numeric_gradient\] x: expected a float64 array"):
        numeric_gradient(lambda: 0.0, np.zeros(3, np.float32))
    with pytest.raises(TypeError, match=r"\[numeric_gradient\] x: expected a float64 array"):
        numeric_gradient(lambda: 0.0, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\[numeric_gradient\] eps: expected > 0"):
        numeric_gradient(lambda: 0.0, np.zeros(3), eps=0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_gradcheck_through_batch_norm_in_training_mode(dtype):
    # training mode: the gradients through the batch statistics; the running statistics that
    # every probe's forward updates are restored, and the modes kept
    cnnbp.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, dtype=dtype),
        nn.BatchNorm2d(3, dtype=dtype),
        nn.ReLU(),
        nn.BatchNorm2d(3, affine=False, momentum=None, dtype=dtype),
        nn.Flatten(),
        nn.Linear(48, 2, dtype=dtype),
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2, 6, 6)).astype(dtype)
    y = rng.integers(0, 2, 4)
    before = model.state_dict()
    report = cnnbp.gradcheck(model, x, y, nn.CrossEntropyLoss())
    assert report.passed, report
    assert "1.weight" in report.parameters
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    assert model.training and model[1].training and model[3].training
