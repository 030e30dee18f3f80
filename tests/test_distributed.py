"""Data-parallel training on MPI: the sampler's shares, the flat gradient buffer, and whole
runs under mpiexec with 2 and 3 processes against one (float64 to 1e-12, float32 within its
tolerance, bit-identical reruns), a rank that fails, and `cnnbp train --distributed`.

The MPI runs start `mpiexec` (the mpich wheel's, from the test extra) as subprocesses on
this machine, each bounded by a timeout that ends the whole process group."""

import json
import os
import shutil
import signal
import subprocess
import sys

import cnnbp
import numpy as np
import pytest
from cnnbp import data, nn, train
from distributed_runs import RUNS, dataset

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
TIMEOUT = 180  # seconds for one mpiexec run (each takes a few)


def mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.path.exists(beside) else shutil.which("mpiexec")
    if found is None:
        pytest.fail('mpiexec not found: install the test extra (mpich): pip install ".[test]"')
    return found


def launch(processes, *args, timeout=TIMEOUT):
    """mpiexec -n processes python args...; (returncode, stdout, stderr). On a timeout the
    whole process group is killed and the test fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [p for p in [os.path.dirname(os.path.dirname(cnnbp.__file__)), HERE] if p]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    command = [mpiexec(), "-n", str(processes), sys.executable, *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {timeout} s")
    return process.returncode, out, err


# ---- the sampler -------------------------------------------------------------------------


@pytest.mark.parametrize("n, replicas", [(10, 3), (12, 4), (2, 5), (7, 1)])
def test_shares_are_the_single_process_permutation_padded(n, replicas):
    single = data.DataLoader(np.zeros((n, 1)), np.zeros(n), shuffle=True, seed=3)
    samplers = [data.DistributedSampler(n, replicas, r, seed=3) for r in range(replicas)]
    for _ in range(3):  # each pass draws the next permutation, as the loader's do
        order = single.next_order()
        shares = [s.next_order() for s in samplers]
        assert {len(share) for share in shares} == {-(-n // replicas)}
        total = -(-n // replicas) * replicas
        padded = np.resize(order, total) if total > n else order  # the head repeated
        for r, share in enumerate(shares):
            np.testing.assert_array_equal(share, padded[r::replicas])
        if total == n:
            assert sorted(np.concatenate(shares).tolist()) == list(range(n))  # disjoint


def test_drop_last_and_set_epoch():
    sampler = data.DistributedSampler(10, 3, 2, seed=0, drop_last=True)
    assert len(sampler) == 3
    first, second = sampler.next_order(), sampler.next_order()
    sampler.set_epoch(1)
    np.testing.assert_array_equal(sampler.next_order(), second)
    sampler.set_epoch(0)
    np.testing.assert_array_equal(sampler.next_order(), first)


def test_unshuffled_shares_are_torchs():
    torch_data = pytest.importorskip("torch.utils.data")
    for n, replicas, drop_last in [(10, 3, False), (10, 3, True), (2, 5, False)]:
        for rank in range(replicas):
            ours = data.DistributedSampler(n, replicas, rank, shuffle=False, drop_last=drop_last)
            theirs = torch_data.DistributedSampler(
                range(n), replicas, rank, shuffle=False, drop_last=drop_last
            )
            assert list(ours) == list(theirs)


def test_loader_batches_of_all_ranks_make_the_single_batch():
    n, batch, replicas = 66, 12, 3
    x = np.arange(n, dtype=np.float64)[:, None]
    y = np.arange(n)
    single = [yb for _, yb in data.DataLoader(x, y, batch_size=batch, seed=5)]
    ranks = [
        [
            yb
            for _, yb in data.DataLoader(
                x, y, batch_size=batch // replicas, sampler=data.DistributedSampler(n, 3, r, seed=5)
            )
        ]
        for r in range(replicas)
    ]
    assert all(len(batches) == len(single) for batches in ranks)
    for s, whole in enumerate(single):
        assert sorted(np.concatenate([batches[s] for batches in ranks]).tolist()) == sorted(
            whole.tolist()
        )


def test_sampler_checks():
    with pytest.raises(ValueError, match=r"\[DistributedSampler\] rank: expected an integer in"):
        data.DistributedSampler(10, 2, 2)
    with pytest.raises(ValueError, match=r"\[DataLoader\] sampler: expected one over 4 samples"):
        data.DataLoader(np.zeros((4, 1)), np.zeros(4), sampler=data.DistributedSampler(5))


# ---- the flat buffer ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flat_buffers_follow_named_parameters(dtype):
    cnnbp.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, dtype=dtype),
        nn.BatchNorm2d(2, dtype=dtype),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3, dtype=dtype),
    )
    params = [p for _, p in model.named_parameters()]
    packed = nn.pack_parameters(model)
    assert packed.dtype == dtype and packed.shape == (sum(p.data.size for p in params),)
    np.testing.assert_array_equal(packed, np.concatenate([p.data.ravel() for p in params]))
    np.testing.assert_array_equal(nn.pack_gradients(model), np.zeros_like(packed))  # no grads yet
    x = np.random.default_rng(0).random((3, 1, 6, 6)).astype(dtype)
    model.backward(np.ones_like(model(x)))
    flat = nn.pack_gradients(model, out=np.empty_like(packed))
    np.testing.assert_array_equal(flat, np.concatenate([p.grad.ravel() for p in params]))
    nn.unpack_gradients(model, 2 * flat)
    np.testing.assert_array_equal(nn.pack_gradients(model), 2 * flat)
    nn.unpack_parameters(model, packed + 1)
    np.testing.assert_array_equal(params[0].data.ravel(), packed[: params[0].data.size] + 1)
    buffers = [b for b in model.buffers() if b.dtype.kind == "f"]
    np.testing.assert_array_equal(nn.pack_buffers(model), np.concatenate(buffers))
    nn.unpack_buffers(model, np.arange(4, dtype=dtype))
    np.testing.assert_array_equal(model[1].running_var, [2, 3])
    with pytest.raises(
        ValueError, match=r"\[unpack_gradients\] flat: expected 123 elements, got 3"
    ):
        nn.unpack_gradients(model, flat[:3])
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(TypeError, match=r"\[unpack_parameters\] flat: expected"):
        nn.unpack_parameters(model, packed.astype(other))
    with pytest.raises(ValueError, match=r"\[unpack_buffers\] flat: expected 1 dim"):
        nn.unpack_buffers(model, np.zeros((2, 2), dtype))


# ---- whole runs under mpiexec --------------------------------------------------------------


@pytest.fixture(scope="module")
def single():
    """The runs of distributed_runs.RUNS in this process, without MPI."""
    out = {}
    for name, (arch, dtype, epochs, batch) in RUNS.items():
        result = train.fit(dataset(dtype), epochs=epochs, batch_size=batch, seed=0, arch=arch)
        out[name] = (result.losses, nn.pack_parameters(result.model))
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{P: [each rank's arrays]} for P = 2 (twice: "2" and "2 again") and 3."""
    out = {}
    for key, processes in [("2", 2), ("2 again", 2), ("3", 3)]:
        directory = tmp_path_factory.mktemp(f"ranks{processes}")
        code, stdout, stderr = launch(processes, WORKER, "train", str(directory))
        assert code == 0, stderr
        out[key] = [dict(np.load(directory / f"rank{r}.npz")) for r in range(processes)]
    return out


@pytest.mark.parametrize("processes", ["2", "3"])
def test_ranks_train_as_one_process(single, ranks, processes):
    for rank in ranks[processes]:  # every rank holds the same weights, to the bit
        for name in RUNS:
            np.testing.assert_array_equal(
                rank[f"{name}.parameters"], ranks[processes][0][f"{name}.parameters"]
            )
            np.testing.assert_array_equal(
                rank[f"{name}.buffers"], ranks[processes][0][f"{name}.buffers"]
            )
    run = ranks[processes][0]
    for name, tolerance in [("cnn64", 1e-12), ("cnn32", 1e-5)]:
        losses, parameters = single[name]
        np.testing.assert_allclose(run[f"{name}.loss"], losses, rtol=tolerance, atol=0)
        scale = np.abs(parameters).max()
        np.testing.assert_allclose(
            run[f"{name}.parameters"], parameters, rtol=0, atol=tolerance * scale
        )


def test_batch_norm_statistics_are_per_rank(single, ranks):
    # each rank normalizes its share of the batch with that share's statistics (torch's
    # DDP default): not the single process's numbers, but training all the same
    losses, parameters = single["resnet64"]
    run = ranks["2"][0]
    assert np.all(np.isfinite(run["resnet64.loss"]))
    assert np.abs(run["resnet64.parameters"] - parameters).max() > 1e-8


def test_reruns_are_bit_identical(ranks):
    for first, again in zip(ranks["2"], ranks["2 again"]):
        assert first.keys() == again.keys()
        for key in first:
            np.testing.assert_array_equal(first[key], again[key])


@pytest.mark.parametrize("entry", ["raise", "cli-raise"])
def test_a_failing_rank_ends_every_rank(entry):
    args = [WORKER, entry, "2"]
    if entry == "cli-raise":
        args += ["--distributed", "--epochs", "2", "--quiet", "--batch-size", "12"]
    code, stdout, stderr = launch(2, *args, timeout=120)
    assert code != 0
    assert "rank 1 of 2 failed: RuntimeError: a fault injected at step 2" in stderr


def test_cli_distributed_prints_one_report_with_the_single_process_losses():
    command = ["-m", "cnnbp", "train", "--epochs", "1", "--quiet", "--json", "--threads", "1"]
    code, stdout, stderr = launch(2, *command, "--distributed")
    assert code == 0, stderr
    report = json.loads(stdout)  # one report: rank 1 prints nothing
    assert report["processes"] == 2
    alone = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    expected = json.loads(alone.stdout)
    np.testing.assert_allclose(report["losses"], expected["losses"], rtol=1e-5)
    assert abs(report["test_accuracy"] - expected["test_accuracy"]) <= 2 / report["test_images"]


def test_cli_distributed_without_mpi_says_how_to_install_and_launch():
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "from cnnbp.__main__ import main\n"
        "sys.exit(main(['train', '--distributed', '--epochs', '1', '--quiet']))"
    )
    process = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert process.returncode == 1
    assert 'pip install "cnnbp[mpi]"' in process.stderr
    assert "mpiexec -n 2 cnnbp train --distributed" in process.stderr
