"""Python and C++ agree: the C++ example programs (examples/cpp) against the walkthrough and
cnnbp train, and model files written by either language, read by the other.

That the installed CMake package builds the examples and that they run is ctest's
(install_and_build_example); here the programs are only needed. The session builds them
once, against the C++ library of a build of this source tree: the one CNNBP_BUILD_DIR names,
else the newest unsanitized build*/ or build*/*/ directory whose CMake cache names this tree
(ctest's, brought up to date, so nothing is compiled again after ctest), else one it
configures itself. The library is installed into a scratch prefix and examples/cpp is
configured against it with find_package(cnnbp), as a user would.
"""

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import warnings

import cnnbp
import numpy as np
import pytest
from cnnbp import nn, train, walkthrough
from conftest import file_model_stem

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*command, cwd=None, env=None):
    proc = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, cwd=cwd, timeout=900, env=env
    )
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def cmake_cache(build):
    """The entries of build/CMakeCache.txt, NAME -> value."""
    entries = {}
    for line in (build / "CMakeCache.txt").read_text(errors="replace").splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "//")):
            entries[name.split(":")[0]] = value
    return entries


def existing_build():
    """A build directory of this source tree to take the C++ library from, or None."""
    named = os.environ.get("CNNBP_BUILD_DIR")
    if named:
        build = pathlib.Path(named).resolve()
        assert (build / "CMakeCache.txt").is_file(), f"CNNBP_BUILD_DIR={named}: no CMake build"
        return build
    usable = []
    for cache in [*ROOT.glob("build*/CMakeCache.txt"), *ROOT.glob("build*/*/CMakeCache.txt")]:
        entries = cmake_cache(cache.parent)
        home = entries.get("CMAKE_HOME_DIRECTORY", "")
        if (
            home
            and pathlib.Path(home).resolve() == ROOT
            and entries.get("CNNBP_INSTALL", "").upper() in ("ON", "TRUE", "1", "YES")
            and not entries.get("CNNBP_SANITIZE")
        ):
            usable.append(cache)
    return max(usable, key=lambda cache: cache.stat().st_mtime).parent if usable else None


@pytest.fixture(scope="session")
def programs(tmp_path_factory):
    """The directory holding the built example programs (examples/cpp)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is needed to build the C++ example (pip install cmake)")
    work = tmp_path_factory.mktemp("cpp")
    build = existing_build()
    if build is None:
        build = work / "library"
        run(
            cmake,
            "-S",
            ROOT,
            "-B",
            build,
            "-DCMAKE_BUILD_TYPE=Release",
            "-DCNNBP_BUILD_TESTS=OFF",
            "-DCNNBP_BUILD_PYTHON=OFF",
        )
    cache = cmake_cache(build)
    config = cache.get("CMAKE_BUILD_TYPE") or "Release"
    run(cmake, "--build", build, "--config", config, "-j", "2")  # nothing to do when current
    prefix, example = work / "prefix", work / "example"
    run(cmake, "--install", build, "--prefix", prefix, "--config", config)
    run(
        cmake,
        "-S",
        ROOT / "examples" / "cpp",
        "-B",
        example,
        f"-DCMAKE_PREFIX_PATH={prefix}",
        f"-DCMAKE_CXX_COMPILER={cache.get('CMAKE_CXX_COMPILER', 'c++')}",
        "-DCMAKE_BUILD_TYPE=Release",
    )
    run(cmake, "--build", example)
    return example


def parse(output):
    losses, grads = [], {}
    for line in output.splitlines():
        if line.startswith("step "):
            losses.append(float(line.split("L = ")[1]))
        elif line.startswith("dL/d"):
            name, *values = line.split()
            grads[name] = np.array([float(v) for v in values])
    return losses, grads


@pytest.mark.parametrize("seed, label, lr, steps", [(0, 1.0, 0.5, 5), (3, 0.0, 0.1, 4)])
def test_example_matches_the_walkthrough(programs, tmp_path, seed, label, lr, steps):
    result = walkthrough.run(seed=seed, label=label, lr=lr, steps=steps)
    values = np.concatenate([np.ravel(result[name]) for name in ("X", "W1", "B1", "W2", "B2", "Y")])
    assert values.size == 52
    path = tmp_path / "values.txt"
    path.write_text(" ".join(repr(float(v)) for v in values))
    losses, grads = parse(run(programs / "train_seed_network", path, repr(lr), steps))
    np.testing.assert_allclose(losses, result.losses, rtol=1e-12)
    for name in ("dL/dW1", "dL/dB1", "dL/dW2", "dL/dB2", "dL/dX"):
        np.testing.assert_allclose(
            grads[name], np.ravel(result[name]), rtol=1e-12, atol=1e-15, err_msg=name
        )


# ---- the LeNet-style network of cnnbp train, trained by C++ -------------------------------


@pytest.mark.parametrize(
    "seed, options",
    [
        (0, []),  # cnnbp train's settings; 1438 training images: a last batch of 30
        (5, ["--batch-size", "50", "--schedule", "step", "--lr", "0.1"]),
        (2, ["--schedule", "cosine", "--momentum", "0.5"]),
    ],
)
def test_lenet_example_trains_as_cnnbp_train(programs, tmp_path, seed, options):
    pytest.importorskip("sklearn")  # the digits
    exported, epochs = tmp_path / "run.npz", 3
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["--seed", seed, "--epochs", epochs, *options]
    python = json.loads(
        run(
            *[sys.executable, "-m", "cnnbp", "train", "--arch", "cnn", *args],
            *["--export-data", exported, "--json", "--quiet"],
            env=env,
        )
    )
    # C++ with two threads and Python with one: the kernels' results do not depend on it
    env.update(OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")
    lines = run(programs / "train_lenet", exported, *options, env=env).splitlines()
    # the same split, initial weights, batches and steps: the same numbers, bit for bit
    assert [line for line in lines if line.startswith("epoch ")] == [
        train.format_epoch(entry, epochs) for entry in python["history"]
    ]
    result = lines[-1].split()
    assert result[0] == "result:"
    got = dict(zip(result[1::2], result[2::2]))
    assert (int(got["correct"]), int(got["count"])) == (python["correct"], python["test_images"])
    assert float(got["test_accuracy"]) == python["test_accuracy"]
    assert float(got["test_loss"]) == python["test_loss"]
    assert float(got["train_loss"]) == python["losses"][-1]


# ---- model files between Python and C++ -------------------------------------------------


def interop_model(dtype):
    nn.manual_seed(8)
    return nn.Sequential(
        *file_model_stem(dtype),
        nn.Tanh(),
        nn.AvgPool2d(3, stride=1, padding=1),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4, bias=False, dtype=dtype),
        nn.Sigmoid(),
    )


def run_model(programs, *args, text=True):
    return subprocess.run(
        [str(programs / "run_model"), *map(str, args)], capture_output=True, text=text, timeout=120
    )


def run_in_cpp(programs, tmp_path, model, x):
    """The model saved from Python, run by C++ (run_model, in eval mode) on x and written
    back from C++: (C++'s output, shaped as it printed it, and the path of C++'s copy)."""
    saved, copy, inputs = (tmp_path / name for name in ("model.npz", "copy.npz", "input.txt"))
    model.save(saved)
    inputs.write_text(
        " ".join(map(str, x.shape)) + "\n" + " ".join(repr(float(v)) for v in x.ravel())
    )
    proc = run_model(programs, saved, inputs, copy)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    shape = tuple(int(d) for d in lines["shape"].split())
    values = np.array([float(v) for v in lines["values"].split()], dtype=x.dtype)
    return values.reshape(shape), copy


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_python_model_runs_in_cpp_and_cpp_copy_loads_in_python(programs, tmp_path, dtype):
    model = interop_model(dtype).eval()  # run_model evaluates (Dropout off)
    x = np.random.default_rng(4).standard_normal((2, 2, 8, 5)).astype(dtype)
    got, copy = run_in_cpp(programs, tmp_path, model, x)
    expected = model(x)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)  # the same kernels: the same bits
    # the file C++ wrote loads in Python as the same model
    reloaded = cnnbp.load(copy).eval()
    assert [layer.config() for layer in reloaded] == [layer.config() for layer in model]
    for (name, p), (_, q) in zip(model.named_parameters(), reloaded.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    np.testing.assert_array_equal(reloaded(x), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_nested_model_runs_in_cpp_and_cpp_copy_loads_in_python(programs, tmp_path, dtype):
    from test_containers import nested_model

    nn.manual_seed(9)
    model = nested_model(nn, dtype).eval()
    x = np.random.default_rng(5).standard_normal((2, 2, 8, 8)).astype(dtype)
    got, copy = run_in_cpp(programs, tmp_path, model, x)
    np.testing.assert_array_equal(got, model(x))  # the same kernels: the same bits
    reloaded = cnnbp.load(copy).eval()  # a loaded model starts in training mode
    assert repr(reloaded) == repr(model)
    np.testing.assert_array_equal(reloaded(x), model(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_batch_norm_running_statistics_cross_between_languages(programs, tmp_path, dtype):
    # trained in Python (running statistics and num_batches_tracked away from their init),
    # evaluated by C++ with them, and written back by C++ with every buffer
    cnnbp.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, dtype=dtype),
        nn.BatchNorm2d(3, momentum=None, dtype=dtype),
        nn.ReLU(),
        nn.BatchNorm2d(3, affine=False, dtype=dtype),
        nn.Flatten(),
        nn.Linear(120, 2, dtype=dtype),
    )
    rng = np.random.default_rng(9)
    opt = cnnbp.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        x = rng.standard_normal((4, 2, 8, 5)).astype(dtype)
        model.train_step(x, rng.integers(0, 2, 4), nn.CrossEntropyLoss(), opt)
    model.eval()
    x = rng.standard_normal((2, 2, 8, 5)).astype(dtype)
    got, copy = run_in_cpp(programs, tmp_path, model, x)
    np.testing.assert_array_equal(got, model(x))
    want, got = model.state_dict(), cnnbp.load(copy).state_dict()
    assert list(got) == list(want) and int(got["1.num_batches_tracked"]) == 3
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_cpp_loads_a_model_saved_with_its_optimizer(programs, tmp_path):
    # the optimizer's entries are Python's: C++ loads the model beside them
    model = interop_model(np.float64).eval()
    opt = cnnbp.optim.Adam(model.parameters(), lr=0.01)
    x = np.random.default_rng(6).standard_normal((1, 2, 8, 5))
    model.train_step(x, np.array([[0.0, 1.0, 1.0, 0.0]]), nn.BCELoss(), opt)
    model.save(tmp_path / "with_optimizer.npz", optimizer=opt)
    inputs = tmp_path / "input.txt"
    inputs.write_text("1 2 8 5\n" + " ".join(repr(float(v)) for v in x.ravel()))
    proc = run_model(programs, tmp_path / "with_optimizer.npz", inputs)
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split(" ", 1) for line in proc.stdout.splitlines())["values"]
    np.testing.assert_array_equal(np.array(values.split(), dtype=np.float64), model(x).ravel())


def test_cpp_refuses_hostile_files(programs, tmp_path):
    work = tmp_path
    good = work / "good.npz"
    interop_model(np.float32).save(good)
    with np.load(good) as contents:
        arrays = {k: contents[k] for k in contents.files}
    inputs = work / "one.txt"
    inputs.write_text("1 2 8 5\n" + " ".join(["0.5"] * 80))
    cases = {
        "pickle.npz": dict(arrays, **{"0.weight": np.array([{}], dtype=object)}),
        "missing.npz": {k: v for k, v in arrays.items() if k != "7.weight"},  # the Linear's
    }
    for name, content in cases.items():
        np.savez(work / name, **content)
    (work / "truncated.npz").write_bytes(good.read_bytes()[:300])
    np.savez_compressed(work / "compressed.npz", **arrays)
    for name in ("pickle.npz", "missing.npz", "truncated.npz", "compressed.npz"):
        proc = run_model(programs, work / name, inputs)
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert "[load]" in proc.stderr, (name, proc.stderr)


def test_damaged_model_files_never_crash_either_loader(programs, tmp_path):
    # random byte flips and truncations: each loader either loads the model or refuses the
    # file with its "[load]" error, never anything worse
    work = tmp_path
    good = work / "fuzz_good.npz"
    interop_model(np.float64).save(good)
    data = good.read_bytes()
    inputs = work / "fuzz_input.txt"
    inputs.write_text("1 2 8 5\n" + " ".join(["0.25"] * 80))
    rng = random.Random(7)
    for trial in range(60):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        if trial % 5 == 0:
            damaged = damaged[: rng.randrange(len(damaged))]
        path = work / "fuzz_case.npz"
        path.write_bytes(bytes(damaged))
        proc = run_model(programs, path, inputs, text=False)
        assert proc.returncode in (0, 2), (trial, proc.returncode, proc.stderr[-500:])
        python_error = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cnnbp.load(path)
        except ValueError as error:
            python_error = str(error)
            assert python_error.startswith("[load]")
        # both languages accept the same files, and refuse the others with the same words
        if proc.returncode == 2:
            assert proc.stderr.decode().strip() == f"run_model: {python_error}", trial
        else:
            assert python_error is None, (trial, python_error)


def random_layers(rng):
    """A random architecture of every declared layer type with random options, as the
    layer entries of a model file (it need not be runnable: only built, saved and loaded)."""

    def pair(low, high):
        v = [int(rng.integers(low, high)), int(rng.integers(low, high))]
        return v if rng.random() < 0.5 else v[0]

    layers = []
    for _ in range(int(rng.integers(1, 8))):
        kind = rng.choice(
            [
                "Conv2d",
                "Linear",
                "MaxPool2d",
                "AvgPool2d",
                "Dropout",
                "ReLU",
                "Sigmoid",
                "Tanh",
                "Flatten",
                "LeakyReLU",
                "GELU",
                "SiLU",
                "Identity",
                "Softmax",
                "LogSoftmax",
                "AdaptiveAvgPool2d",
                "BatchNorm2d",
            ]
        )
        if kind == "Conv2d":
            groups = int(rng.choice([1, 1, 2, 3]))
            stride = pair(1, 3)
            entry = dict(
                in_channels=groups * int(rng.integers(1, 3)),
                out_channels=groups * int(rng.integers(1, 3)),
                kernel_size=pair(1, 4),
                stride=stride,
                # torch's 'same' takes stride 1 only
                padding=str(rng.choice(["same", "valid"]))
                if stride == 1 and rng.random() < 0.3
                else pair(0, 3),
                dilation=pair(1, 3),
                groups=groups,
                bias=bool(rng.random() < 0.5),
            )
        elif kind == "Linear":
            entry = dict(
                in_features=int(rng.integers(1, 9)),
                out_features=int(rng.integers(1, 9)),
                bias=bool(rng.random() < 0.5),
            )
        elif kind in ("MaxPool2d", "AvgPool2d"):
            k = int(rng.integers(1, 5))
            entry = dict(
                kernel_size=k,
                stride=None if rng.random() < 0.5 else pair(1, 4),
                padding=int(rng.integers(0, k // 2 + 1)),
            )
        elif kind == "Dropout":
            entry = dict(p=float(rng.choice([0.0, 0.25, 0.5, 1.0])))
        elif kind == "LeakyReLU":
            entry = dict(negative_slope=float(rng.choice([0.01, -0.5, 0.2, 3])))
        elif kind == "GELU":
            entry = dict(approximate=str(rng.choice(["none", "tanh"])))
        elif kind in ("Softmax", "LogSoftmax"):
            entry = dict(dim=int(rng.integers(-3, 4)))
        elif kind == "AdaptiveAvgPool2d":
            size = [None if rng.random() < 0.3 else int(rng.integers(1, 6)) for _ in range(2)]
            entry = dict(output_size=size if size[0] != size[1] or size[0] is None else size[0])
        elif kind == "BatchNorm2d":
            entry = dict(
                num_features=int(rng.integers(1, 9)),
                eps=float(rng.choice([1e-5, 1e-3, 0.5])),
                momentum=None if rng.random() < 0.3 else float(rng.choice([0.1, 0.0, 1.0])),
                affine=bool(rng.random() < 0.5),
                track_running_stats=bool(rng.random() < 0.7),
            )
        else:
            entry = {}
        layers.append({"type": str(kind), **entry})
    return layers


@pytest.mark.parametrize("case", range(12))
def test_random_architectures_cross_between_languages_with_the_same_seeded_weights(
    programs, tmp_path, case
):
    rng = np.random.default_rng(case)
    layers = random_layers(rng)
    dtype = "float64" if case % 2 else "float32"
    spec = tmp_path / "layers.json"
    spec.write_text(json.dumps(layers))
    # built by C++ under manual_seed(case) and saved from C++ ...
    subprocess.run(
        [str(programs / "new_model"), spec, str(case), dtype, tmp_path / "cpp.npz"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    # ... equals the same entries built by Python under the same seed, weights bit for bit
    cnnbp.manual_seed(case)
    python_model = nn.Sequential(
        *(
            getattr(nn, e["type"])(
                **{k: v for k, v in e.items() if k != "type"},
                **(
                    {"dtype": np.dtype(dtype)}
                    if "dtype" in getattr(nn, e["type"]).__signature__.parameters
                    else {}
                ),
            )
            for e in layers
        )
    )
    loaded = cnnbp.load(tmp_path / "cpp.npz")
    assert [layer.config() for layer in loaded] == [layer.config() for layer in python_model]
    want, got = python_model.state_dict(), loaded.state_dict()  # parameters and buffers
    assert list(want) == list(got)
    for name in want:
        assert want[name].dtype == got[name].dtype, name
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)
    # and a file Python saves, C++ reads and writes back the same
    python_model.save(tmp_path / "py.npz")
    proc = run_model(programs, tmp_path / "py.npz", tmp_path / "missing-input.txt")
    assert "cannot open" in proc.stderr  # the model loaded; only the input is missing
    assert not (tmp_path / "py.npz.tmp").exists()
