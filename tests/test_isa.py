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


BATCH_NORM_BITS = """
import hashlib, numpy as np
from cnnbp import functional as F
digest = hashlib.sha256()
for dtype in (np.float32, np.float64):
    for shape in [(5, 3, 7, 9), (9, 2, 13, 3), (2, 4, 1, 1)]:
        rng = np.random.default_rng(7)
        x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        C = shape[1]
        w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
        for training in (True, False):
            rm, rv = np.full(C, 0.5, dtype), np.full(C, 2.0, dtype)
            y, mean, invstd = F.batch_norm2d(x, w, b, rm, rv, training, 0.1, 1e-5)
            if not training:
                mean, invstd = rm, (1 / np.sqrt(rv + 1e-5)).astype(dtype)
            grads = F.batch_norm2d_backward(dy, x, w, mean, invstd, training)
            for a in (y, rm, rv, mean, invstd, *grads):
                digest.update(np.ascontiguousarray(a).tobytes())
print(digest.hexdigest())
"""


def test_batch_norm2d_gives_the_same_bits_on_every_instruction_set():
    children = [run_child(isa, "-c", BATCH_NORM_BITS) for isa in ("generic", "avx512")]
    for child in children:
        assert child.returncode == 0, child.stderr
    assert children[0].stdout == children[1].stdout
