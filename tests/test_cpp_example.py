"""The C++ example, built against the installed CMake package, agrees with the walkthrough.

Builds the C++ library from this source tree, installs it into a scratch prefix, builds
examples/cpp with find_package(cnnbp), runs it on the walkthrough's input and weights, and
compares its losses and gradients with cnnbp.walkthrough.run (both float64).
"""

import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from cnnbp import walkthrough

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*command, cwd=None):
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd,
                          timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is needed to build the C++ example (pip install cmake)")
    work = tmp_path_factory.mktemp("cpp")
    build, prefix = work / "build", work / "prefix"
    run(cmake, "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DCNNBP_BUILD_TESTS=OFF",
        "-DCNNBP_BUILD_PYTHON=OFF")
    run(cmake, "--build", build, "-j", "2")
    run(cmake, "--install", build, "--prefix", prefix)
    example_build = work / "example"
    run(cmake, "-S", ROOT / "examples" / "cpp", "-B", example_build,
        f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release")
    run(cmake, "--build", example_build)
    return example_build / "train_seed_network", work


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
def test_example_matches_the_walkthrough(example, seed, label, lr, steps):
    binary, work = example
    result = walkthrough.run(seed=seed, label=label, lr=lr, steps=steps)
    values = np.concatenate([np.ravel(result[name]) for name in ("X", "W1", "B1", "W2", "B2", "Y")])
    assert values.size == 52
    path = work / f"values_{seed}.txt"
    path.write_text(" ".join(repr(float(v)) for v in values))
    losses, grads = parse(run(binary, path, repr(lr), steps))
    np.testing.assert_allclose(losses, result.losses, rtol=1e-12)
    for name in ("dL/dW1", "dL/dB1", "dL/dW2", "dL/dB2", "dL/dX"):
        np.testing.assert_allclose(grads[name], np.ravel(result[name]), rtol=1e-12, atol=1e-15,
                                   err_msg=name)
