"""Benchmark cnnbp's kernels and training steps, and PyTorch's when it is installed.

Each case is timed interleaved with its PyTorch counterpart in the same process (one call
of each per round), and the table reports medians and the speed-up (PyTorch time / cnnbp
time). float32 throughout; both libraries use the same number of threads.

    python benchmarks/bench.py [--rounds 50] [--threads 2] [--markdown]

A last table times the derivation's tiny training step (batch 1) on one thread: from C++
(build/benchmarks/cnnbp_bench_step, when built with -DCNNBP_BUILD_BENCHMARKS=ON), from
Python in one call (model.train_step) and as the four calls, and PyTorch's.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import cnnbp
import numpy as np
from cnnbp import _core, nn, optim
from cnnbp import functional as F

try:
    import torch
except ImportError:  # the table then shows cnnbp alone
    torch = None


def conv_case(N, C, H, K, R, pad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, H), dtype=np.float32)
    w = rng.standard_normal((K, C, R, R), dtype=np.float32) * 0.1
    b = rng.standard_normal(K, dtype=np.float32)
    P = F.output_size(H, R, 1, pad)
    dy = rng.standard_normal((N, K, P, P), dtype=np.float32)
    flops = 3 * 2 * N * K * P * P * C * R * R  # forward, dinput, dweight

    def ours():
        F.conv2d(x, w, b, 1, pad)
        F.conv2d_backward(dy, x, w, 1, pad)

    theirs = None
    if torch is not None:
        tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
        tdy = torch.tensor(dy)

        def theirs():
            tx.grad = tw.grad = tb.grad = None
            torch.nn.functional.conv2d(tx, tw, tb, padding=pad).backward(tdy)

    name = f"conv fwd+bwd N{N} C{C} {H}x{H} K{K} {R}x{R}" + (f" pad {pad}" if pad else "")
    return name, ours, theirs, ("GFLOP/s", flops / 1e9)


def pool_case(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    y, idx = F.max_pool2d(x, 2)
    dy = np.ones_like(y)
    nbytes = x.nbytes * 2 + y.nbytes * 2 + idx.nbytes * 2  # read x, write y/idx, backward

    def ours():
        _, i = F.max_pool2d(x, 2)
        F.max_pool2d_backward(dy, i, x.shape)

    theirs = None
    if torch is not None:
        tx, tdy = torch.tensor(x, requires_grad=True), torch.tensor(dy)

        def theirs():
            tx.grad = None
            torch.nn.functional.max_pool2d(tx, 2).backward(tdy)

    return f"max-pool 2x2 fwd+bwd {shape}", ours, theirs, ("GB/s", nbytes / 1e9)


def training_step_case(name, network, X, target, loss, keep=False):
    """One SGD step (lr 0.01) of network(lib) on (X, target) with the loss class named `loss`,
    lib being cnnbp.nn for ours and torch.nn for theirs (keep=True: with the model, batch,
    loss and optimizer in place of the rate, for one-call timing)."""
    model = network(nn)
    loss_fn, opt = getattr(nn, loss)(), optim.SGD(model.parameters(), lr=0.01)

    def ours():
        model.zero_grad()
        loss_fn(model(X), target)
        model.backward(loss_fn.backward())
        opt.step()

    theirs = None
    if torch is not None:
        tm = network(torch.nn)
        tloss, topt = getattr(torch.nn, loss)(), torch.optim.SGD(tm.parameters(), lr=0.01)
        tX, ttarget = torch.tensor(X), torch.tensor(target)

        def theirs():
            topt.zero_grad()
            tloss(tm(tX), ttarget).backward()
            topt.step()

    return name, ours, theirs, (model, X, target, loss_fn, opt) if keep else None


def seed_step_case(keep=False):
    """The training step of the derivation's network as the four calls (keep: see
    training_step_case)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1, 1, 6, 6), dtype=np.float32)
    Y = np.ones((1, 1), np.float32)

    def network(lib):
        return lib.Sequential(
            lib.Conv2d(1, 1, 3),
            lib.ReLU(),
            lib.MaxPool2d(2),
            lib.Flatten(),
            lib.Linear(4, 1),
            lib.Sigmoid(),
        )

    return training_step_case("training step, seed network, N=1", network, X, Y, "BCELoss", keep)


def small_cnn_case():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, 64)

    def network(lib):
        return lib.Sequential(
            lib.Conv2d(1, 8, 3),
            lib.ReLU(),
            lib.MaxPool2d(2),
            lib.Conv2d(8, 16, 3),
            lib.ReLU(),
            lib.MaxPool2d(2),
            lib.Flatten(),
            lib.Linear(400, 10),
        )

    return training_step_case(
        "training step, small CNN, N=64 28x28", network, X, labels, "CrossEntropyLoss"
    )


def tiny_step_rows(rounds):
    """The seed network's training step on one thread: (how, seconds) rows."""
    _, four_calls, theirs, (model, X, Y, loss_fn, opt) = seed_step_case(keep=True)
    threads = cnnbp.get_num_threads()
    cnnbp.set_num_threads(1)
    if torch is not None:
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    rows = []
    binary = Path(__file__).resolve().parent.parent / "build" / "benchmarks" / "cnnbp_bench_step"
    if binary.exists():
        out = subprocess.run(
            [str(binary)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        ).stdout
        found = re.search(r"([0-9.]+) us", out)
        if found:
            rows.append(("C++ cnnbp::nn::train_step", float(found.group(1)) * 1e-6))
    one_call, calls = interleaved(lambda: model.train_step(X, Y, loss_fn, opt), four_calls, rounds)
    rows += [
        ("Python model.train_step (one call)", one_call),
        ("Python zero_grad, forward, loss, backward, step", calls),
    ]
    if theirs is not None:
        rows.append(("PyTorch " + torch.__version__, interleaved(theirs, None, rounds)[0]))
        torch.set_num_threads(torch_threads)
    cnnbp.set_num_threads(threads)
    return rows


def median_seconds(fn, rounds, min_time=0.02):
    """`rounds` samples, each the mean time of a batch of calls lasting >= min_time."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    repeat = max(1, int(min_time / once))
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        samples.append((time.perf_counter() - start) / repeat)
    return samples


def interleaved(ours, theirs, rounds):
    a, b = [], []
    for _ in range(rounds):
        a += median_seconds(ours, 1)
        if theirs is not None:
            b += median_seconds(theirs, 1)
    return statistics.median(a), (statistics.median(b) if b else None)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt_time(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--only", default="", help="run cases whose name contains this")
    args = parser.parse_args()
    cnnbp.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)

    cases = [
        conv_case(64, 1, 28, 8, 3, 0),
        conv_case(64, 8, 13, 16, 3, 0),
        conv_case(32, 32, 32, 64, 3, 1),
        conv_case(16, 64, 56, 64, 3, 1),
        pool_case((64, 8, 26, 26)),
        pool_case((32, 64, 32, 32)),
        seed_step_case(),
        small_cnn_case(),
    ]
    # the practical peak: the float micro-kernel on one core with its data in L1
    peak_per_core = _core._micro_kernel_gflops(0.5)
    print(
        f"kernels: {cnnbp.kernel_isa()}, micro-kernel peak {peak_per_core:.0f} GFLOP/s per "
        f"core, {args.threads} threads",
        flush=True,
    )
    rows = []
    for name, ours, theirs, rate in cases:
        if args.only not in name:
            continue
        t_ours, t_theirs = interleaved(ours, theirs, args.rounds)
        row = {
            "case": name,
            "cnnbp": fmt_time(t_ours),
            "rate": "",
            "peak": "",
            "torch": fmt_time(t_theirs) if t_theirs else "-",
            "speedup": f"{t_theirs / t_ours:.2f}x" if t_theirs else "-",
        }
        if rate:
            unit, amount = rate
            row["rate"] = f"{amount / t_ours:.1f} {unit}"
            if unit == "GFLOP/s":
                peak = peak_per_core * args.threads
                row["peak"] = f"{100 * amount / t_ours / peak:.0f}%"
        rows.append(row)
        print(
            f"{name:45s} cnnbp {row['cnnbp']:>10s}  {row['rate']:>16s} {row['peak']:>4s}  "
            f"torch {row['torch']:>10s}  speed-up {row['speedup']}",
            flush=True,
        )

    tiny = tiny_step_rows(args.rounds) if "tiny" in args.only or not args.only else []
    for how, seconds in tiny:
        print(f"tiny step, 1 thread: {how:50s} {fmt_time(seconds):>10s}", flush=True)

    if args.markdown:
        print(
            f"\n{cpu_name()}, {args.threads} threads, kernels {cnnbp.kernel_isa()}, "
            f"micro-kernel peak {peak_per_core:.0f} GFLOP/s per core; "
            f"torch {torch.__version__ if torch else 'not installed'}, cnnbp {cnnbp.__version__}\n"
        )
        print("| case | cnnbp | rate | % of peak | PyTorch | speed-up |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['case']} | {r['cnnbp']} | {r['rate']} | {r['peak']} | {r['torch']} | "
                f"{r['speedup']} |"
            )
        if tiny:
            print("\n| tiny step: seed network, N=1, float32, 1 thread | time |")
            print("|---|---|")
            for how, seconds in tiny:
                print(f"| {how} | {fmt_time(seconds)} |")


if __name__ == "__main__":
    main()
