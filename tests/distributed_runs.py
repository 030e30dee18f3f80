"""The runs test_distributed.py compares between 1, 2 and 3 processes (shared with
distributed_worker.py, which runs them under mpiexec)."""

import numpy as np
from cnnbp import train

# name: (arch, dtype, epochs, global batch). 66 training images: 2 and 3 ranks share each
# epoch without padding, and the last batch of an epoch (66 = 5 * 12 + 6) is a short one.
RUNS = {
    "cnn64": ("cnn", np.float64, 2, 12),
    "cnn32": ("cnn", np.float32, 2, 12),
    "resnet64": ("resnet", np.float64, 1, 12),
}


def dataset(dtype, n_train=66, n_test=20):
    """Random 8x8 images of 3 classes, each class a brighter quadrant."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, n_train + n_test)
    x = rng.random((n_train + n_test, 1, 8, 8)) * 0.5
    for label, (r, c) in enumerate([(0, 0), (0, 4), (4, 0)]):
        x[y == label, 0, r : r + 4, c : c + 4] += 0.5
    x = np.ascontiguousarray(x.astype(dtype))
    return train.Dataset(
        "npz",
        "random quadrants",
        x[:n_train],
        y[:n_train],
        x[n_train:],
        y[n_train:],
        ["0", "1", "2"],
    )
