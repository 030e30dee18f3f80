"""The convolution on every instruction set's kernels.

The kernels are chosen at run time from the CPU's features; CNNBP_ISA caps the choice so
the narrower sets (AVX2, the portable baseline) are tested on a machine that has more.
"""

import os
import pathlib
import subprocess
import sys

import cnnbp
import pytest

TESTS = pathlib.Path(__file__).parent


def test_kernel_isa_names_an_instruction_set():
    assert cnnbp.kernel_isa() in {"avx512", "avx2", "generic"}


def run_child(isa, *args):
    env = dict(os.environ, CNNBP_ISA=isa)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_cap_selects_the_instruction_set(isa):
    child = run_child(isa, "-c", "import cnnbp; print(cnnbp.kernel_isa())")
    assert child.returncode == 0, child.stderr
    # a CPU without the requested set falls back to the portable kernels
    assert child.stdout.strip() in {isa, "generic"}


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_conv2d_matches_the_oracle_on_narrower_kernels(isa):
    child = run_child(
        isa,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(TESTS / "test_forward_vs_oracle.py"),
        str(TESTS / "test_backward.py"),
        "-k",
        "conv2d",
    )
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-2000:]
    assert " passed" in child.stdout
