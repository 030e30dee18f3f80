"""Bounded memory: long training loops and many calls (failing ones too) do not grow the
process, and conv2d's workspace does not grow with the batch."""

import os
import sys

import cnnbp
import numpy as np
import pytest
from cnnbp import functional as F
from cnnbp import nn, optim

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the resident set size from /proc/self/statm"
)

MB = 1 << 20
# Allocator noise: freed blocks the allocator keeps, a page table or two. A leak of even
# one small array per step (the model's smallest, 16 bytes) times the steps below, or a
# leaked workspace, is far beyond it.
MARGIN = 4 * MB


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_model(dtype):
    nn.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 10, dtype=dtype),
    )


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_long_training_loop_does_not_grow_memory(optimizer):
    dtype = np.float32
    model = make_model(dtype)
    rng = np.random.default_rng(1)
    batches = [
        (rng.standard_normal((32, 1, 12, 12)).astype(dtype), rng.integers(0, 10, 32))
        for _ in range(4)
    ]
    opt = (
        optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if optimizer == "SGD"
        else optim.Adam(model.parameters(), lr=1e-3)
    )
    loss_fn = nn.CrossEntropyLoss()

    def steps(count):
        for i in range(count):
            x, labels = batches[i % len(batches)]
            loss = model.train_step(x, labels, loss_fn, opt)
        return loss

    steps(30)  # warm up: workspaces, the thread pool, the allocator's arenas
    before = rss()
    loss = steps(400)
    after = rss()
    assert np.isfinite(loss)
    assert after - before < MARGIN, f"RSS grew by {(after - before) / MB:.1f} MB in 400 steps"


def test_many_kernel_calls_and_errors_do_not_grow_memory():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 16, 16))
    w = rng.standard_normal((8, 3, 3, 3))
    good_idx = F.max_pool2d(x, 2)[1]
    bad_idx = good_idx.copy()
    bad_idx[0, 0, 0, 0] = 10**6

    def calls():
        y = F.conv2d(x, w, None, 1, 1)
        F.conv2d_backward(y, x, w, 1, 1)
        p, idx = F.max_pool2d(y, 2)
        F.max_pool2d_backward(p, idx, y.shape)
        F.linear(F.flatten(p), rng.standard_normal((5, p[0].size)))
        F.cross_entropy_backward(F.flatten(p)[:, :5], np.zeros(4, np.int64))
        # every failure path: validation errors, type errors, refused indices and sizes
        for bad in [
            lambda: F.conv2d(x, w[:, :2]),
            lambda: F.conv2d(x.astype(np.int64), w),
            lambda: F.conv2d(x, w, None, 2**70),
            lambda: F.conv2d(x, w, None, 1, 2**40),
            lambda: F.max_pool2d_backward(p, bad_idx, x.shape),
            lambda: F.cross_entropy(p[:, 0, 0], np.full(4, 9)),
            lambda: F.binary_cross_entropy(np.full(3, 2.0), np.ones(3)),
        ]:
            try:
                bad()
            except (ValueError, TypeError):
                pass

    for _ in range(50):
        calls()
    before = rss()
    for _ in range(500):
        calls()
    after = rss()
    assert after - before < MARGIN, f"RSS grew by {(after - before) / MB:.1f} MB"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "layer",
    [
        ((3, 32, 32), (16, 3, 3, 3), 1, 1),
        ((16, 28, 28), (32, 16, 3, 3), 1, 0),
        ((32, 14, 14), (64, 32, 3, 3), 2, 1),
    ],
    ids=str,
)
def test_conv2d_workspace_is_bounded_in_the_batch(layer, dtype):
    (C, H, W), w_shape, stride, padding = layer
    before = cnnbp.get_num_threads()
    largest = {}
    try:
        for threads in (1, 2, 4):
            cnnbp.set_num_threads(threads)
            sizes = [
                F.conv2d_workspace_bytes((n, C, H, W), w_shape, stride, padding, dtype)
                for n in (1, 8, 64, 512, 4096, 2**16, 2**20)
            ]
            # it grows with the first images (the partial sums' chunks, the pixel blocks of
            # the gradient), then stops: a million images need no more than 4096
            assert sizes == sorted(sizes) and sizes[-3] == sizes[-2] == sizes[-1], sizes
            largest[threads] = sizes[-1]
    finally:
        cnnbp.set_num_threads(before)
    # blocks of fixed size per thread, and partial weight gradients: at most linear in the
    # threads, and megabytes for these layers however large the batch
    assert largest[1] <= largest[2] <= 2 * largest[1] and largest[4] <= 4 * largest[1], largest
    assert largest[4] < 16 * MB * (np.dtype(dtype).itemsize // 4), largest


def test_conv2d_real_memory_matches_its_workspace_report():
    # a large batch through conv2d and its backward adds to RSS about the output and the
    # gradients, not batch-sized scratch
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 8, 32, 32)).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((256, 16, 32, 32)).astype(np.float32)
    reported = F.conv2d_workspace_bytes(x.shape, w.shape, 1, 1, "float32")

    def calls(count):
        for _ in range(count):
            y = F.conv2d(x, w, None, 1, 1)
            grads = F.conv2d_backward(dy, x, w, 1, 1)
            del y, grads

    calls(2)  # warm up: the allocator keeps the freed outputs for the next ones
    before = rss()
    calls(6)
    after = rss()
    assert reported < x.nbytes // 8, (reported, x.nbytes)  # far below the batch's size
    assert after - before < MARGIN + reported, f"RSS grew by {(after - before) / MB:.1f} MB"
