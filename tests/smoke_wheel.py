"""Smoke test of an installed cnnbp (a wheel in a fresh environment): run as a script,
never collected by pytest, needing nothing but cnnbp and NumPy.

    python tests/smoke_wheel.py

It imports cnnbp, runs the `cnnbp walkthrough` console script (exit status 0), and takes
a few training steps of a small network (Sequential + SGD + train_step) in float32 and
float64, checking that the loss falls. Then it runs itself again with CNNBP_ISA=generic,
so that the portable kernels of the same build are checked too (on a CPU without wider
instruction sets both runs take the portable kernels). Exit status 0 when all passed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cnnbp
import numpy as np
from cnnbp import nn, optim


def check_walkthrough() -> None:
    # the console script installed beside this interpreter (bin/ or Scripts/), else on PATH
    script = shutil.which("cnnbp", path=str(Path(sys.executable).parent)) or shutil.which("cnnbp")
    if script is None:
        sys.exit("smoke: the `cnnbp` console script is not installed")
    run = subprocess.run([script, "walkthrough"], capture_output=True, text=True)
    if run.returncode != 0 or "all checks passed" not in run.stdout:
        sys.exit(f"smoke: `cnnbp walkthrough` exited {run.returncode}\n{run.stdout}\n{run.stderr}")
    print("smoke: cnnbp walkthrough: all checks passed")


def check_training(dtype) -> None:
    cnnbp.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 8, 8)).astype(dtype)
    y = rng.integers(0, 3, 16)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3, dtype=dtype),
    )
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = [model.train_step(x, y, loss_fn, opt) for _ in range(20)]
    if not all(np.isfinite(losses)) or not losses[-1] < 0.5 * losses[0]:
        sys.exit(f"smoke: the {np.dtype(dtype).name} loss did not fall: {losses}")
    print(f"smoke: {np.dtype(dtype).name} training: loss {losses[0]:.4f} -> {losses[-1]:.4f}")


def main() -> None:
    isa = cnnbp.kernel_isa()
    print(f"smoke: cnnbp {cnnbp.__version__} from {Path(cnnbp.__file__).parent}, kernels {isa}")
    if os.environ.get("CNNBP_ISA") == "generic" and isa != "generic":
        sys.exit(f"smoke: CNNBP_ISA=generic, but the kernels chose {isa}")
    check_walkthrough()
    check_training(np.float32)
    check_training(np.float64)
    if "CNNBP_ISA" not in os.environ:
        print("smoke: again with CNNBP_ISA=generic", flush=True)
        env = dict(os.environ, CNNBP_ISA="generic")
        again = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env)
        if again.returncode != 0:
            sys.exit(again.returncode)
        print(f"smoke: ok, kernels {isa} and generic")
    else:
        print("smoke: ok")


if __name__ == "__main__":
    main()
