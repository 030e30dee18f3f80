"""cnnbp.set_num_threads / get_num_threads, and results that do not depend on the count.

Every kernel gives each output element to one thread and reduces in a fixed order, so one
thread and two threads must give the same bits. The sizes are above the threading
thresholds, so that two threads really split the work.
"""

import cnnbp
import numpy as np
import pytest
from cnnbp import functional as F
from conftest import with_threads

DTYPES = (np.float32, np.float64)
DTYPE_IDS = ["float32", "float64"]


@pytest.fixture(autouse=True)
def restore_thread_count():
    before = cnnbp.get_num_threads()
    yield
    cnnbp.set_num_threads(before)


def assert_same_bits(one, two):
    """Tuples of arrays, equal byte for byte (NaNs and signed zeros included)."""
    if not isinstance(one, tuple):
        one, two = (one,), (two,)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def check_thread_independent(fn):
    assert_same_bits(with_threads(1, fn), with_threads(2, fn))


# ---------------------------------------------------------------------------------------
# the setting itself
# ---------------------------------------------------------------------------------------


def test_set_and_get_num_threads():
    assert cnnbp.get_num_threads() >= 1
    for n in (1, 3, 2):
        cnnbp.set_num_threads(n)
        assert cnnbp.get_num_threads() == n
    cnnbp.set_num_threads(np.int64(1))  # any integer type
    assert cnnbp.get_num_threads() == 1
    assert "set_num_threads" in cnnbp.__all__ and "get_num_threads" in cnnbp.__all__


@pytest.mark.parametrize("n", [0, -1, -(2**40)])
def test_set_num_threads_rejects_less_than_one(n):
    with pytest.raises(ValueError, match=rf"^\[set_num_threads\] n: expected >= 1, got {n}$"):
        cnnbp.set_num_threads(n)


def test_set_num_threads_rejects_huge_counts_and_non_integers():
    # OpenMP ends the process when it cannot start or even allocate a team this large
    for huge in (1025, 2**31 - 1, 2**31):
        with pytest.raises(
            ValueError, match=rf"^\[set_num_threads\] n: expected <= 1024, got {huge}$"
        ):
            cnnbp.set_num_threads(huge)
    with pytest.raises(ValueError, match=r"^\[set_num_threads\] n: expected a 64-bit integer"):
        cnnbp.set_num_threads(2**64)
    for bad in (2.0, "2", None, True):
        with pytest.raises(TypeError, match=r"^\[set_num_threads\] n: expected an int"):
            cnnbp.set_num_threads(bad)


# ---------------------------------------------------------------------------------------
# the same bits with one and two threads
# ---------------------------------------------------------------------------------------


def data(shape, dtype, seed, special=True):
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 5, shape).astype(dtype) * dtype(0.5)  # ties for max-pool
    x += rng.standard_normal(shape).astype(dtype) * (rng.random(shape) < 0.5)
    if special:
        flat = x.reshape(-1)
        flat[rng.integers(0, flat.size, 20)] = np.nan
        flat[rng.integers(0, flat.size, 20)] = -np.inf
        flat[rng.integers(0, flat.size, 20)] = -0.0
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(64, 8, 26, 26), (8, 64, 33, 31)], ids=str)
@pytest.mark.parametrize("pool", [(2, None, 0), (3, 2, 1), (2, 1, 0)], ids=str)
def test_max_pool2d_is_thread_independent(shape, pool, dtype):
    x = data(shape, dtype, 1)
    kernel, stride, padding = pool
    check_thread_independent(lambda: F.max_pool2d(x, kernel, stride, padding))
    y, idx = F.max_pool2d(x, kernel, stride, padding)
    dy = data(y.shape, dtype, 2)
    check_thread_independent(lambda: F.max_pool2d_backward(dy, idx, x.shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_and_sigmoid_are_thread_independent(dtype):
    z = data((7, 100_003), dtype, 3)
    da = data(z.shape, dtype, 4)
    check_thread_independent(lambda: F.relu(z))
    check_thread_independent(lambda: F.relu_backward(da, z))
    check_thread_independent(lambda: F.sigmoid(z))
    a = F.sigmoid(z)
    check_thread_independent(lambda: F.sigmoid_backward(da, a))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_is_thread_independent(dtype):
    x, w, b = (
        data((256, 300), dtype, 5, False),
        data((40, 300), dtype, 6, False),
        data((40,), dtype, 7, False),
    )
    dy = data((256, 40), dtype, 8, False)
    check_thread_independent(lambda: F.linear(x, w, b))
    check_thread_independent(lambda: F.linear_backward(dy, x, w))


CONV_CASES = [
    # (N, C, H, W, K, R, stride, padding)
    (64, 1, 28, 28, 8, 3, 1, 0),
    (16, 8, 13, 13, 16, 3, 1, 0),
    (8, 16, 20, 20, 32, 3, 1, 1),
    (6, 5, 17, 15, 7, 3, 2, 1),
    (1, 32, 32, 32, 32, 3, 1, 1),  # one image: the threads must split something else
    (3, 2, 6, 6, 4, 3, 1, 0),  # tiny: direct loops
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_is_thread_independent(case, dtype):
    N, C, H, W, K, R, stride, padding = case
    x = data((N, C, H, W), dtype, 9, False)
    w = data((K, C, R, R), dtype, 10, False) * dtype(0.1)
    b = data((K,), dtype, 11, False)
    check_thread_independent(lambda: F.conv2d(x, w, b, stride, padding))
    y = F.conv2d(x, w, b, stride, padding)
    dy = data(y.shape, dtype, 12, False)
    check_thread_independent(lambda: F.conv2d_backward(dy, x, w, stride, padding))


def test_idle_threads_sleep_unless_the_user_chose_otherwise():
    # OpenMP's busy-wait made small steps 10x slower on shared cores; cnnbp asks for
    # passive waiting before OpenMP loads, and keeps a policy the user set
    import os
    import subprocess
    import sys

    code = "import os, cnnbp; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE", out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE", out.stderr


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_losses_are_thread_independent(dtype):
    rng = np.random.default_rng(13)
    z = data((4096, 40), dtype, 14, False)
    labels = rng.integers(0, 40, 4096)
    y = rng.integers(0, 2, z.shape).astype(dtype)
    a = F.sigmoid(z)
    for fn, args in [
        (F.cross_entropy, (z, labels)),
        (F.binary_cross_entropy_with_logits, (z, y)),
        (F.binary_cross_entropy, (a, y)),
    ]:
        one, two = with_threads(1, lambda: fn(*args)), with_threads(2, lambda: fn(*args))
        assert one == two and np.float64(one).tobytes() == np.float64(two).tobytes()
    check_thread_independent(lambda: F.cross_entropy_backward(z, labels))
    check_thread_independent(lambda: F.binary_cross_entropy_with_logits_backward(z, y))
    check_thread_independent(lambda: F.binary_cross_entropy_backward(a, y))


def training_run(dtype, optimizer):
    """Ten training steps of a small CNN; the losses and the final parameters."""
    from cnnbp import nn, optim

    nn.manual_seed(21)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, dtype=dtype),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(32 * 6 * 6, 10, dtype=dtype),
    )
    rng = np.random.default_rng(22)
    x = rng.standard_normal((64, 3, 16, 16)).astype(dtype)
    labels = rng.integers(0, 10, 64)
    opt = (
        optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if optimizer == "SGD"
        else optim.Adam(model.parameters(), lr=1e-3)
    )
    loss_fn = nn.CrossEntropyLoss()
    losses = [model.train_step(x, labels, loss_fn, opt) for _ in range(10)]
    return (np.array(losses),) + tuple(p.data for p in model.parameters())


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_training_steps_are_thread_independent(dtype, optimizer):
    # sizes above the threading thresholds: conv2d's batch is split between the threads
    check_thread_independent(lambda: training_run(dtype, optimizer))


# Run in a fresh process: a hash of every kernel's results and of a training run.
HASH_SCRIPT = r"""
import hashlib, sys
import numpy as np
import cnnbp
from cnnbp import functional as F
sys.path.insert(0, sys.argv[1])
from test_threads import data, training_run

cnnbp.set_num_threads(int(sys.argv[2]))
digest = hashlib.sha256()
def add(*arrays):
    for a in arrays:
        a = np.asarray(a)
        digest.update(str((a.dtype, a.shape)).encode() + a.tobytes())
for dtype in (np.float32, np.float64):
    x, w, b = data((16, 8, 20, 20), dtype, 1, False), data((16, 8, 3, 3), dtype, 2, False), data((16,), dtype, 3, False)
    y = F.conv2d(x, w, b, 1, 1)
    add(y, *F.conv2d_backward(data(y.shape, dtype, 4, False), x, w, 1, 1))
    add(*F.conv2d_backward(data((16, 16, 9, 9), dtype, 5, False), x, w, 2, 0))
    p, idx = F.max_pool2d(data((16, 8, 20, 20), dtype, 6), 3, 2, 1)
    add(p, idx, F.max_pool2d_backward(data(p.shape, dtype, 7), idx, (16, 8, 20, 20)))
    z = data((300, 500), dtype, 8)
    add(F.relu(z), F.relu_backward(z, z), F.sigmoid(z), F.sigmoid_backward(z, F.sigmoid(z)))
    lx, lw = data((256, 300), dtype, 9, False), data((40, 300), dtype, 10, False)
    add(F.linear(lx, lw), *F.linear_backward(data((256, 40), dtype, 11, False), lx, lw))
    logits, labels = data((256, 40), dtype, 12, False), np.arange(256) % 40
    add([F.cross_entropy(logits, labels)], F.cross_entropy_backward(logits, labels))
    add(*training_run(dtype, "Adam"))
print(digest.hexdigest())
"""


def test_results_are_identical_across_processes(tmp_path):
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "hash_run.py"
    script.write_text(HASH_SCRIPT)

    def digest(threads):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out = subprocess.run(
            [sys.executable, str(script), here, str(threads)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    first, second, threaded = digest(1), digest(1), digest(2)
    assert len(first) == 64
    assert first == second == threaded
