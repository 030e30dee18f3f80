"""cnnbp.set_num_threads / get_num_threads, and results that do not depend on the count.

Every kernel gives each output element to one thread and reduces in a fixed order, so one
to four threads must give the same bits: every op of the table (tests/ops.py) on its
thread cases, which are above the threading thresholds so that the threads really split
the work, with ties, NaN, -inf and -0 where the op selects; training steps; and whole
processes started with other thread counts.
"""

import cnnbp
import numpy as np
import pytest
from cnnbp import functional as F
from conftest import DTYPES, assert_same_bits, with_threads
from ops import OPS

DTYPE_IDS = ["float32", "float64"]


@pytest.fixture(autouse=True)
def restore_thread_count():
    before = cnnbp.get_num_threads()
    yield
    cnnbp.set_num_threads(before)


def check_thread_independent(fn):
    assert_same_bits(with_threads(2, fn), with_threads(1, fn))


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
# the same bits with one, two and three threads, for every op of the table
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op, case, dtype",
    [
        pytest.param(op, case, dtype, id=f"{op.name}-{case}-{np.dtype(dtype).name}")
        for op in OPS
        for case in op.threads
        for dtype in DTYPES
    ],
)
def test_results_do_not_depend_on_the_number_of_threads(op, case, dtype):
    s = op.sample(case, dtype, op.thread_values)
    for call in (op.forward, op.backward):
        one = with_threads(1, lambda: call(F, s))
        for threads in (2, 3, 4):
            assert_same_bits(with_threads(threads, lambda: call(F, s)), one, f"{threads} threads")


def test_import_leaves_the_openmp_settings_alone():
    # the kernels' pool sleeps outside calls by itself: importing cnnbp changes nothing in the
    # environment that another OpenMP library in the process (PyTorch, say) would read
    import os
    import subprocess
    import sys

    code = "import os, cnnbp; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "unset", out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE", out.stderr


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


# Run in a fresh process: a hash of every op's results on its thread cases, and of a
# training run.
HASH_SCRIPT = r"""
import hashlib, sys
import numpy as np
import cnnbp
from cnnbp import functional as F
sys.path.insert(0, sys.argv[1])
from ops import OPS
from test_threads import training_run

cnnbp.set_num_threads(int(sys.argv[2]))
digest = hashlib.sha256()
def add(result):
    for a in result if isinstance(result, tuple) else (result,):
        a = np.asarray(a)
        digest.update(str((a.dtype, a.shape)).encode() + a.tobytes())
for dtype in (np.float32, np.float64):
    for op in OPS:
        for case in op.threads:
            s = op.sample(case, dtype, op.thread_values)
            add(op.forward(F, s))
            add(op.backward(F, s))
    add(training_run(dtype, "Adam"))
print(digest.hexdigest())
"""


def test_results_are_identical_across_processes(tmp_path):
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "hash_run.py"
    script.write_text(HASH_SCRIPT)

    def digest(threads, wait_policy="PASSIVE"):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY=wait_policy)
        out = subprocess.run(
            [sys.executable, str(script), here, str(threads)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    first, second, two, three = digest(1), digest(1), digest(2), digest(3)
    spinning = digest(2, "ACTIVE")  # the pool's threads never sleep
    assert len(first) == 64
    assert first == second == two == three == spinning


# ---------------------------------------------------------------------------------------
# the thread pool: Python threads calling at once, and a forked child
# ---------------------------------------------------------------------------------------


def test_python_threads_training_at_once_get_the_same_bits():
    # one caller has the pool's threads, the other runs its loops alone: the same results
    import threading

    cnnbp.set_num_threads(2)
    alone = training_run(np.float32, "SGD")
    results = [None] * 3

    def run(i):
        cnnbp.set_num_threads(2)  # a setting of the calling thread
        results[i] = training_run(np.float32, "SGD")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for result in results:
        assert_same_bits(result, alone)


FORK_SCRIPT = r"""
import os, sys
import numpy as np
import cnnbp
from cnnbp import functional as F

cnnbp.set_num_threads(2)
x = np.random.default_rng(5).standard_normal((64, 8, 16, 16)).astype(np.float32)
w = np.random.default_rng(6).standard_normal((16, 8, 3, 3)).astype(np.float32)
expected = F.conv2d(x, w, padding=1)  # the parent's pool has its threads now
pid = os.fork()
if pid == 0:  # the child: the same result, on a pool of its own
    same = np.array_equal(F.conv2d(x, w, padding=1), expected)
    os._exit(0 if same else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_runs_parallel_kernels(tmp_path):
    # the child has none of the parent's pool threads: it must start its own, not wait for
    # the parent's forever (in a fresh process, with no other library's threads)
    import subprocess
    import sys

    script = tmp_path / "fork_run.py"
    script.write_text(FORK_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
