"""Python threads: kernels called concurrently, models trained side by side, the GIL.

The kernels keep no state between calls and release the GIL while they run, so any
number of Python threads may call them at once, each getting exactly the bits it would
get alone. Layers, models and optimizers hold their last input and gradients: each
thread trains its own. (README, "Guarantees".)
"""

import threading
import time

import cnnbp
import numpy as np
import pytest
from cnnbp import functional as F
from cnnbp import nn, optim

THREADS = 8


def kernel_workload(seed, dtype):
    """Every kernel, forward and backward, on inputs of its own: a tuple of results."""
    rng = np.random.default_rng(seed)

    def randn(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x, w, b = randn(4, 3, 12, 12), randn(6, 3, 3, 3), randn(6)
    y = F.conv2d(x, w, b, 1, 1)
    dx, dw, db = F.conv2d_backward(randn(*y.shape), x, w, 1, 1)
    p, idx = F.max_pool2d(y, 2)
    dp = F.max_pool2d_backward(randn(*p.shape), idx, y.shape)
    r = F.relu(p)
    dr = F.relu_backward(randn(*r.shape), p)
    s = F.sigmoid(r)
    ds = F.sigmoid_backward(randn(*s.shape), s)
    h = F.flatten(s)
    lw, lb = randn(5, h.shape[1]), randn(5)
    z = F.linear(h, lw, lb)
    dh, dlw, dlb = F.linear_backward(randn(*z.shape), h, lw)
    labels = rng.integers(0, 5, z.shape[0])
    target = rng.integers(0, 2, z.shape).astype(dtype)
    a = F.sigmoid(z)
    losses = np.array(
        [
            F.cross_entropy(z, labels),
            F.binary_cross_entropy_with_logits(z, target),
            F.binary_cross_entropy(a, target),
        ]
    )
    grads = (
        F.cross_entropy_backward(z, labels),
        F.binary_cross_entropy_with_logits_backward(z, target),
        F.binary_cross_entropy_backward(a, target),
    )
    return (y, dx, dw, db, p, idx, dp, r, dr, s, ds, z, dh, dlw, dlb, losses) + grads


def make_model(seed, dtype):
    nn.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, dtype=dtype),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3, dtype=dtype),
    )


def train(model, seed, dtype, steps=15):
    """A few steps of Adam or SGD with momentum on data of its own; (losses, parameters)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, 1, 8, 8)).astype(dtype)
    labels = rng.integers(0, 3, 8)
    loss_fn = nn.CrossEntropyLoss()
    opt = (
        optim.Adam(model.parameters(), lr=0.01)
        if seed % 2
        else optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    losses = [model.train_step(x, labels, loss_fn, opt) for _ in range(steps)]
    return np.array(losses), tuple(p.data.copy() for p in model.parameters())


def assert_same_bits(one, two):
    assert len(one) == len(two)
    for a, b in zip(one, two):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


class Busy:
    """A background thread keeping the cores busy with large convolutions (GIL released)."""

    def __init__(self):
        self.stop = threading.Event()
        rng = np.random.default_rng(99)
        self.x = rng.standard_normal((8, 16, 32, 32)).astype(np.float32)
        self.w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            F.conv2d(self.x, self.w, None, 1, 1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_threads(target, count):
    """Runs target(i) in `count` threads started together; returns their results by i."""
    results, errors = [None] * count, []
    barrier = threading.Barrier(count)

    def body(i):
        try:
            barrier.wait()
            results[i] = target(i)
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_concurrent_kernel_calls_match_the_serial_results(dtype):
    serial = [kernel_workload(seed, dtype) for seed in range(THREADS)]
    with Busy():
        for _ in range(2):
            concurrent = run_threads(
                lambda i: [kernel_workload(i, dtype) for _ in range(3)], THREADS
            )
            for i, repeats in enumerate(concurrent):
                for result in repeats:
                    assert_same_bits(result, serial[i])


def test_threads_training_separate_models_match_serial_training():
    dtypes = [np.float32, np.float64]
    serial = [train(make_model(i, dtypes[i % 2]), i, dtypes[i % 2]) for i in range(THREADS)]
    models = [make_model(i, dtypes[i % 2]) for i in range(THREADS)]  # built here: the seed
    with Busy():  # generator is global
        concurrent = run_threads(lambda i: train(models[i], i, dtypes[i % 2]), THREADS)
    for (losses, params), (want_losses, want_params) in zip(concurrent, serial):
        assert_same_bits([losses], [want_losses])
        assert_same_bits(params, want_params)


def test_threads_with_their_own_thread_counts():
    # set_num_threads is a setting of the calling thread: each keeps its own
    serial = kernel_workload(7, np.float32)

    def body(i):
        cnnbp.set_num_threads(1 + i % 3)
        result = kernel_workload(7, np.float32)
        return cnnbp.get_num_threads(), result

    before = cnnbp.get_num_threads()
    for i, (count, result) in enumerate(run_threads(body, 6)):
        assert count == 1 + i % 3
        assert_same_bits(result, serial)
    assert cnnbp.get_num_threads() == before


def long_call(kernel):
    """A call of `kernel` that takes at least 60 ms on one thread (the batch doubled until
    it does), as a function of no arguments."""
    rng = np.random.default_rng(3)
    image = rng.standard_normal((1, 16, 32, 32)).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    dy_image = rng.standard_normal((1, 32, 30, 30)).astype(np.float32)
    m = rng.standard_normal((256, 1024)).astype(np.float32)

    def make(batch):
        if kernel == "conv2d":
            x = np.repeat(image, batch, axis=0)
            return lambda: F.conv2d(x, w)
        if kernel == "conv2d_backward":
            x, dy = np.repeat(image, batch, axis=0), np.repeat(dy_image, batch, axis=0)
            return lambda: F.conv2d_backward(dy, x, w)
        if kernel == "max_pool2d":
            x = np.repeat(image, batch, axis=0)
            return lambda: F.max_pool2d(x, 3, 1, 1)
        a = np.repeat(image.reshape(16, 1024), batch, axis=0)
        return lambda: F.linear(a, m)

    batch = 4
    while True:
        call = make(batch)
        call()  # warm up
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        if elapsed > 0.06 or batch >= 4096:
            return call
        batch *= max(2, min(16, int(0.08 / max(elapsed, 1e-4))))


@pytest.mark.parametrize("kernel", ["conv2d", "conv2d_backward", "max_pool2d", "linear"])
def test_kernels_release_the_gil(kernel):
    """While one thread is inside a kernel, another runs Python code all along."""
    before = cnnbp.get_num_threads()
    cnnbp.set_num_threads(1)
    try:
        call = long_call(kernel)
    finally:
        cnnbp.set_num_threads(before)
    span = {}

    def worker():
        cnnbp.set_num_threads(1)  # this thread's own setting: the timing above
        span["start"] = time.perf_counter()
        call()
        span["end"] = time.perf_counter()

    ticks = []
    thread = threading.Thread(target=worker)
    thread.start()
    while thread.is_alive():
        ticks.append(time.perf_counter())  # pure Python: needs the GIL
    thread.join()
    # Were the GIL held inside the kernel, this thread could not tick from the moment the
    # worker entered it (at most one switch interval, 5 ms, after its start) to its end.
    start, end = span["start"] + 0.01, span["end"] - 0.002
    inside = [t for t in ticks if start < t < end]
    assert len(inside) > 100, (len(inside), span)
    gaps = np.diff([start] + inside + [end])
    assert gaps.max() < 0.5 * (end - start), (gaps.max(), span)


def test_one_model_in_two_threads_at_once_is_refused_not_corrupted():
    # a model keeps its input and trace: a second call on it while a first runs (GIL
    # released) is a RuntimeError naming the object, and the first call's result is intact
    import threading

    import cnnbp
    from cnnbp import nn

    cnnbp.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Flatten())
    x = np.random.default_rng(0).standard_normal((16, 8, 48, 48)).astype(np.float32)
    want = model(x)
    stop = threading.Event()
    results = []

    def keep_running():
        while not stop.is_set():
            try:
                results.append(model(x))
            except RuntimeError:  # refused while the main thread's call runs
                pass

    worker = threading.Thread(target=keep_running)
    worker.start()
    refused = 0
    try:
        for _ in range(200):
            try:
                model(x)
            except RuntimeError as error:
                assert str(error).startswith("[Sequential] in use by another thread")
                refused += 1
            if refused >= 3:
                break
    finally:
        stop.set()
        worker.join()
    assert refused >= 1
    for got in results:
        np.testing.assert_array_equal(got, want)
