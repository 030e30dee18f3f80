"""ONNX export (cnnbp.onnx_export, model.to_onnx, `cnnbp export`): onnxruntime runs the
exported graph and must give the model's eval-mode outputs, for every declared layer type
with options away from the defaults, for nested containers, for any batch size, and for
the networks `cnnbp train` saves.

Tolerance: the graph runs in float32 (onnxruntime's own kernels, other summation orders),
so outputs are compared with rtol 1e-4, atol 1e-5.

Adding a layer type to the registry without an entry in EXPORTS (and an exporter in
onnx_export._EXPORTERS) fails the first two tests.
"""

import itertools
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import cnnbp
from cnnbp import _core, nn, onnx_export, train

RTOL, ATOL = 1e-4, 1e-5

# type -> cases of (constructor arguments, one input's shape without the batch dim)
EXPORTS = {
    "Conv2d": [
        (dict(in_channels=3, out_channels=4, kernel_size=3), (3, 7, 6)),
        (
            dict(
                in_channels=4,
                out_channels=6,
                kernel_size=(3, 2),
                stride=(2, 1),
                padding=(1, 2),
                dilation=(2, 1),
                groups=2,
                bias=False,
            ),
            (4, 9, 7),
        ),
        (dict(in_channels=2, out_channels=3, kernel_size=4, padding="same", dilation=2), (2, 9, 8)),
        (dict(in_channels=2, out_channels=3, kernel_size=(2, 3), padding="valid"), (2, 5, 5)),
        (dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, groups=4), (4, 8, 9)),
    ],
    "Linear": [
        (dict(in_features=5, out_features=3), (5,)),
        (dict(in_features=5, out_features=2, bias=False), (5,)),
        (dict(in_features=4, out_features=3), (2, 3, 4)),  # (N, *, in): MatMul
    ],
    "MaxPool2d": [
        (dict(kernel_size=2), (2, 6, 7)),
        (dict(kernel_size=3, stride=2, padding=1, dilation=(2, 1), ceil_mode=True), (2, 7, 6)),
        (dict(kernel_size=3, stride=3, padding=1, dilation=3, ceil_mode=True), (2, 6, 7)),
        (dict(kernel_size=(2, 3), stride=(3, 2), padding=(1, 1), ceil_mode=True), (2, 8, 8)),
    ],
    "AvgPool2d": [
        (dict(kernel_size=2), (2, 6, 7)),
        (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (2, 6, 6)),
        (
            dict(kernel_size=(2, 3), stride=2, padding=1, ceil_mode=True, count_include_pad=False),
            (2, 5, 6),
        ),
        (dict(kernel_size=3, stride=2, padding=1, divisor_override=4), (2, 7, 7)),
        (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, divisor_override=5), (2, 6, 6)),
        (dict(kernel_size=2, stride=3, ceil_mode=True, divisor_override=4), (2, 8, 7)),
    ],
    "AdaptiveAvgPool2d": [
        (dict(output_size=1), (3, 5, 7)),  # GlobalAveragePool
        (dict(output_size=(2, 3)), (3, 6, 9)),  # uniform windows: AveragePool
        (dict(output_size=(None, 4)), (2, 7, 3)),  # windows of unequal sizes, repeated cells
        (dict(output_size=(3, 2)), (2, 7, 5)),
    ],
    "BatchNorm2d": [
        (dict(num_features=3, eps=1e-3, momentum=0.2), (3, 4, 5)),
        (dict(num_features=3, affine=False), (3, 4, 5)),
        (dict(num_features=3, track_running_stats=False), (3, 4, 5)),  # the batch's statistics
        (dict(num_features=2, affine=False, track_running_stats=False), (2, 3, 3)),
    ],
    "Dropout": [(dict(p=0.3, seed=5), (3, 4, 4))],
    "ReLU": [({}, (3, 4, 4))],
    "Sigmoid": [({}, (3, 4, 4))],
    "Tanh": [({}, (3, 4, 4))],
    "LeakyReLU": [({}, (3, 4, 4)), (dict(negative_slope=0.2), (3, 4, 4))],
    "GELU": [({}, (3, 4, 4)), (dict(approximate="tanh"), (3, 4, 4))],
    "SiLU": [({}, (3, 4, 4))],
    "Identity": [({}, (3, 4, 4))],
    "Softmax": [({}, (3, 4, 4)), (dict(dim=-2), (3, 4, 4)), (dict(dim=0), (5,))],
    "LogSoftmax": [({}, (6,)), (dict(dim=3), (3, 4, 4))],
    "Flatten": [({}, (3, 4, 4)), ({}, (5,))],
}

DECLARED = [t["name"] for t in _core.layer_types()]
CASES = [
    pytest.param(name, arguments, shape, id=f"{name}-{i}")
    for name in EXPORTS
    for i, (arguments, shape) in enumerate(EXPORTS[name])
]


def test_every_declared_layer_has_an_entry():
    assert sorted(DECLARED) == sorted(EXPORTS), "give each declared layer type cases in EXPORTS"


def test_every_declared_layer_has_an_exporter():
    assert sorted(DECLARED) == sorted(onnx_export._EXPORTERS)


def with_statistics(model, seed=0):
    """`model` with BatchNorm2d weights, biases and running statistics away from their
    initial ones, so that the export must carry them."""
    rng = np.random.default_rng(seed)
    modules = [model] + [m for _, m in getattr(model, "named_modules", list)()]
    for m in modules:
        if isinstance(m, nn.BatchNorm2d):
            for p in m.parameters():
                p.data = rng.uniform(0.5, 1.5, p.shape) * rng.choice([-1, 1], p.shape)
            if m.running_mean is not None:
                m.running_mean[...] = rng.normal(0, 0.5, m.running_mean.shape)
                m.running_var[...] = rng.uniform(0.5, 2.0, m.running_var.shape)
    return model


def run_onnx(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def assert_same_outputs(model, input_shape, batch_sizes=(3,), seed=0):
    """onnxruntime's outputs equal the model's eval-mode outputs, shape first."""
    model.eval()
    proto = onnx_export.to_model(model, input_shape)
    rng = np.random.default_rng(seed)
    dtype = model._fixed_dtype or np.float32
    for n in batch_sizes:
        x = rng.standard_normal((n, *input_shape)).astype(dtype)
        want = model(x)
        got = run_onnx(proto, x.astype(np.float32))
        assert got.dtype == np.float32
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    return proto


@pytest.mark.parametrize("name, arguments, shape", CASES)
def test_layer_matches_onnxruntime(name, arguments, shape):
    cnnbp.manual_seed(0)
    layer = with_statistics(getattr(nn, name)(**arguments))
    assert_same_outputs(layer, shape, batch_sizes=(3, 1))


def test_pools_over_a_grid_of_windows():
    """Ceil mode is where ONNX's and torch's rules part (a last window starting in the right
    padding): every combination of window, stride, padding, dilation and divisor, on sizes
    that give each a last window ending inside, at and past the padding."""
    checked = 0
    for k, stride, padding, ceil_mode, size in itertools.product(
        (2, 3), (1, 2, 3), (0, 1), (False, True), (5, 6, 7)
    ):
        shape = (2, size, size + 1)
        for dilation in (1, 2, 3):
            if dilation * (k - 1) + 1 <= size + 2 * padding:
                pool = nn.MaxPool2d(k, stride, padding, dilation, ceil_mode)
                assert_same_outputs(pool, shape, batch_sizes=(2,))
                checked += 1
        for count_include_pad, divisor in itertools.product((False, True), (None, 3)):
            pool = nn.AvgPool2d(k, stride, padding, ceil_mode, count_include_pad, divisor)
            assert_same_outputs(pool, shape, batch_sizes=(2,))
            checked += 1
    assert checked == 492


def nested_model(dtype=np.float32):
    """Residuals with and without a shortcut, a Concat of a Sequential, a pool and a
    Residual, a nested Sequential, BatchNorm2d and Dropout inside."""
    cnnbp.manual_seed(1)
    block = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, bias=False, dtype=dtype),
        nn.BatchNorm2d(4, dtype=dtype),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, dtype=dtype),
    )
    strided = nn.Residual(
        nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, dtype=dtype), nn.GELU()),
        nn.Sequential(
            nn.Conv2d(4, 6, 1, stride=2, bias=False, dtype=dtype), nn.BatchNorm2d(6, dtype=dtype)
        ),
    )
    branches = nn.Concat(
        nn.Sequential(nn.Conv2d(6, 2, 1, dtype=dtype), nn.SiLU()),
        nn.MaxPool2d(3, stride=1, padding=1),
        nn.Residual(nn.Sequential(nn.Dropout(0.5), nn.Tanh())),
    )
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, dtype=dtype),
        nn.Residual(block),
        nn.LeakyReLU(0.1),
        strided,
        branches,
        nn.Sequential(nn.AdaptiveAvgPool2d((2, 3)), nn.Flatten()),
        nn.Linear(14 * 6, 5, dtype=dtype),
        nn.LogSoftmax(dim=1),
    )


def test_nested_containers_match_onnxruntime_for_other_batch_sizes():
    model = with_statistics(nested_model())
    assert_same_outputs(model, (2, 9, 10), batch_sizes=(1, 4, 9))


def test_the_resnet_of_cnnbp_train_matches_onnxruntime():
    model = with_statistics(train.build_resnet((1, 8, 8), 10))
    assert_same_outputs(model, (1, 8, 8), batch_sizes=(2, 5))


def test_a_float64_model_is_exported_in_float32():
    model = with_statistics(nested_model(np.float64))
    proto = assert_same_outputs(model, (2, 9, 10), batch_sizes=(3,))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {i.data_type for i in proto.graph.initializer} <= {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.INT64,
    }


def test_the_graph_input_output_opset_and_weight_names(tmp_path):
    model = with_statistics(nested_model())
    path = tmp_path / "model.onnx"
    returned = model.to_onnx(path, (2, 9, 10))
    proto = onnx.load(str(path))
    assert proto == returned
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [onnx_export.OPSET]
    (graph_input,), (graph_output,) = proto.graph.input, proto.graph.output
    assert graph_input.name == "input" and graph_output.name == "output"
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims == ["N", 2, 9, 10]
    dims = [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim]
    assert dims == ["N", 5]
    # every parameter and running statistic is an initializer under its state_dict name
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for name, value in state.items():
        np.testing.assert_array_equal(initializers[name], value)


def test_export_is_of_eval_mode_and_leaves_the_mode():
    cnnbp.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Flatten())
    with_statistics(model)
    model.train()
    proto = onnx_export.to_model(model, (1, 5, 5))
    assert model.training and model[2].training
    x = np.random.default_rng(0).standard_normal((4, 1, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(proto, x), model.eval()(x), rtol=RTOL, atol=ATOL)


# ---- refusals ------------------------------------------------------------------------------


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


class PythonReLU(nn.ReLU):
    def forward(self, x):
        return np.maximum(x, 0)


def test_a_module_written_in_python_is_refused_by_path_and_type():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Residual(nn.Sequential(nn.ReLU(), Doubler())))
    with pytest.raises(ValueError) as error:
        onnx_export.to_model(model, (1, 5, 5))
    assert str(error.value) == (
        "[to_onnx] layer 1.block.1 (Doubler): expected a cnnbp layer or container, got a "
        "module whose forward runs in Python, which cannot be exported"
    )
    with pytest.raises(ValueError, match=r"^\[to_onnx\] layer 0 \(PythonReLU\): expected"):
        onnx_export.to_model(nn.Sequential(PythonReLU()), (3,))
    with pytest.raises(ValueError, match=r"^\[to_onnx\] layer Doubler: expected"):
        onnx_export.to_model(Doubler(), (3,))


@pytest.mark.parametrize(
    "model, shape, message",
    [
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(10, 2)),
            (1, 5, 5),
            "[to_onnx] layer 2 (Linear): input: expected last dim 10 (N, ..., 10), got shape "
            "(N, 18)",
        ),
        (
            nn.Sequential(nn.Conv2d(3, 2, 3)),
            (1, 5, 5),
            "[to_onnx] layer 0 (Conv2d): input: expected 3 channels, got shape (N, 1, 5, 5)",
        ),
        (
            nn.Sequential(nn.Flatten(), nn.MaxPool2d(2)),
            (1, 4, 4),
            "[to_onnx] layer 1 (MaxPool2d): input: expected 4 dims (N, C, H, W), got shape (N, 16)",
        ),
        (
            nn.Residual(nn.Conv2d(1, 2, 1)),
            (1, 4, 4),
            "[to_onnx] layer Residual: expected the block's output shape (N, 2, 4, 4) from the "
            "input, got (N, 1, 4, 4)",
        ),
        (
            nn.Concat(nn.Identity(), nn.MaxPool2d(2)),
            (1, 4, 4),
            "[to_onnx] layer Concat: branch 1: expected an output shape equal to branch 0's "
            "(N, 1, 4, 4) apart from dim 1, got (N, 1, 2, 2)",
        ),
        (
            nn.Sequential(nn.Softmax(dim=2)),
            (5,),
            "[to_onnx] layer 0 (Softmax): dim: expected a dim of the input (N, 5) (in [-2, 1]), "
            "got 2",
        ),
    ],
)
def test_a_model_that_does_not_fit_the_input_shape_is_refused(model, shape, message):
    with pytest.raises(ValueError) as error:
        onnx_export.to_model(model, shape)
    assert str(error.value) == message


@pytest.mark.parametrize("shape", [(), (1, 0, 4), (1.5, 4), "1,8,8", 3, (True, 2)])
def test_a_bad_input_shape_is_refused(shape):
    with pytest.raises(ValueError, match=r"^\[to_onnx\] input_shape: expected the dims"):
        onnx_export.to_model(nn.ReLU(), shape)


def test_without_onnx_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'cnnbp\[onnx\]'"):
        nn.ReLU().to_onnx(tmp_path / "relu.onnx", (3,))
    assert not (tmp_path / "relu.onnx").exists()


# ---- the command line ----------------------------------------------------------------------


def cnnbp_command(*args):
    return subprocess.run(
        [sys.executable, "-m", "cnnbp", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_cnnbp_export_of_trained_networks_matches_on_the_digits(arch, tmp_path):
    pytest.importorskip("sklearn")
    model_path, onnx_path = tmp_path / f"{arch}.npz", tmp_path / f"{arch}.onnx"
    trained = cnnbp_command("train", "--arch", arch, "--epochs", 2, "--quiet", "--save", model_path)
    assert trained.returncode == 0, trained.stderr
    result = cnnbp_command("export", model_path, onnx_path, "--input-shape", "1,8,8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {onnx_path}: {model_path} (")
    assert result.stdout.rstrip().endswith("input (N, 1, 8, 8) float32, opset 17")

    x = train.load_dataset(seed=0, need_train=False).x_test  # the test split train reported
    model = cnnbp.load(model_path).eval()
    want = model(x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    assert got.shape == want.shape == (len(x), 10)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_cnnbp_export_refusals(tmp_path):
    model_path = tmp_path / "model.npz"
    nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 3)).save(model_path)
    result = cnnbp_command("export", model_path, tmp_path / "out.onnx")
    assert result.returncode == 2
    assert "the following arguments are required: --input-shape" in result.stderr
    result = cnnbp_command("export", model_path, tmp_path / "out.onnx", "--input-shape", "1,x,8")
    assert result.returncode == 2
    assert "argument --input-shape: expected positive integers separated by commas" in result.stderr
    result = cnnbp_command("export", model_path, tmp_path / "out.onnx", "--input-shape", "1,9,9")
    assert result.returncode == 2
    assert result.stderr == (
        "cnnbp export: [to_onnx] layer 2 (Linear): input: expected last dim 72 (N, ..., 72), "
        "got shape (N, 98)\n"
    )
    assert not (tmp_path / "out.onnx").exists()
    result = cnnbp_command(
        "export", tmp_path / "missing.npz", tmp_path / "out.onnx", "--input-shape", "1,8,8"
    )
    assert result.returncode == 2 and result.stderr.startswith("cnnbp export: ")
    result = cnnbp_command("export", model_path, tmp_path / "out.onnx", "--input-shape", "1,8,8")
    assert result.returncode == 0, result.stderr
    assert "(3 layers, 239 parameters)" in result.stdout
