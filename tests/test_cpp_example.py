"""Python and C++ agree: the C++ example programs (examples/cpp) against the walkthrough, and
model files written by either language, read by the other.

That the installed CMake package builds the examples and that they run is ctest's
(install_and_build_example); here the two programs are only needed. The session builds them
once, against the C++ library of a build of this source tree: the one CNNBP_BUILD_DIR names,
else the newest unsanitized build*/ or build*/*/ directory whose CMake cache names this tree
(ctest's, brought up to date, so nothing is compiled again after ctest), else one it
configures itself. The library is installed into a scratch prefix and examples/cpp is
configured against it with find_package(cnnbp), as a user would.
"""

import os
import pathlib
import random
import shutil
import subprocess
import warnings

import cnnbp
import numpy as np
import pytest
from cnnbp import nn, walkthrough

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*command, cwd=None):
    proc = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, cwd=cwd, timeout=900
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
    """The directory holding the built train_seed_network and run_model."""
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


# ---- model files between Python and C++ -------------------------------------------------


def interop_model(dtype):
    nn.manual_seed(8)
    return nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2, stride=1),
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_python_model_runs_in_cpp_and_cpp_copy_loads_in_python(programs, tmp_path, dtype):
    model = interop_model(dtype).eval()  # run_model evaluates (Dropout off)
    x = np.random.default_rng(4).standard_normal((2, 2, 8, 5)).astype(dtype)
    saved, copy, inputs = (tmp_path / name for name in ("model.npz", "copy.npz", "input.txt"))
    model.save(saved)
    inputs.write_text(
        " ".join(map(str, x.shape)) + "\n" + " ".join(repr(float(v)) for v in x.ravel())
    )
    proc = run_model(programs, saved, inputs, copy)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    expected = model(x)
    assert tuple(int(d) for d in lines["shape"].split()) == expected.shape
    got = np.array([float(v) for v in lines["values"].split()], dtype=dtype)
    np.testing.assert_array_equal(got, expected.ravel())  # the same kernels: the same bits
    # the file C++ wrote loads in Python as the same model
    reloaded = cnnbp.load(copy).eval()
    assert [layer.config() for layer in reloaded] == [layer.config() for layer in model]
    for (name, p), (_, q) in zip(model.named_parameters(), reloaded.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    np.testing.assert_array_equal(reloaded(x), expected)


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
        if proc.returncode == 2:
            assert b"[load]" in proc.stderr, (trial, proc.stderr[-500:])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cnnbp.load(path)
        except ValueError as error:
            assert str(error).startswith("[load]")
