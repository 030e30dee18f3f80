"""Run under mpiexec by tests/test_distributed.py (not a test file itself).

mpiexec -n P python tests/distributed_worker.py train OUT_DIR
    fits the networks of test_distributed.py's RUNS on every rank; each rank writes
    OUT_DIR/rank{R}.npz: per run, the epoch losses and test losses and the flat
    parameters and buffers it ends with
mpiexec -n P python tests/distributed_worker.py raise STEP
    rank 1 raises at the step STEP of the first epoch (the Python API)
mpiexec -n P python tests/distributed_worker.py cli-raise STEP ARGS...
    `cnnbp train ARGS...` with rank 1's loader raising at its step STEP
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cnnbp import data, distributed, nn, train  # noqa: E402
from distributed_runs import RUNS, dataset  # noqa: E402


def run_all(out_dir):
    world = distributed.init()
    arrays = {}
    for name, (arch, dtype, epochs, batch) in RUNS.items():
        result = train.fit(
            dataset(dtype), epochs=epochs, batch_size=batch, seed=0, arch=arch, world=world
        )
        arrays[f"{name}.loss"] = np.array(result.losses)
        arrays[f"{name}.test_loss"] = np.array([e["test_loss"] for e in result.history])
        arrays[f"{name}.parameters"] = nn.pack_parameters(result.model)
        arrays[f"{name}.buffers"] = nn.pack_buffers(result.model)
    np.savez(os.path.join(out_dir, f"rank{world.rank}.npz"), **arrays)


def raising_loader(step):
    """DataLoader.__iter__, but rank 1 raises at its batch `step`."""
    world = distributed.init()
    original = data.DataLoader.__iter__

    def iterate(self):
        for i, batch in enumerate(original(self)):
            if world.rank == 1 and i == step:
                raise RuntimeError(f"a fault injected at step {step}")
            yield batch

    data.DataLoader.__iter__ = iterate


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        run_all(sys.argv[2])
    elif mode == "raise":
        raising_loader(int(sys.argv[2]))
        train.fit(dataset(np.float64), epochs=2, batch_size=12, world=distributed.init())
    elif mode == "cli-raise":
        raising_loader(int(sys.argv[2]))
        from cnnbp.__main__ import main

        sys.exit(main(["train", *sys.argv[3:]]))
