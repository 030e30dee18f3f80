"""Benchmark cnnbp's kernels and training steps against PyTorch's, each library in a process
of its own.

For every case this script starts worker processes (this file with --worker): one imports
cnnbp and never torch, the other imports torch and never cnnbp, and each keeps its library's
own default settings but for the number of threads, --threads for both (cnnbp.set_num_threads,
torch.set_num_threads). The script itself imports neither, so neither's settings (cnnbp sets
OMP_WAIT_POLICY=PASSIVE when imported) reach the other's process. The two libraries alternate
over --rounds rounds: round 1 runs cnnbp's process then PyTorch's, round 2 PyTorch's then
cnnbp's, and so on. A worker builds its case, warms it up and takes --reps samples, each the
mean time of a batch of calls lasting at least --min-time seconds, and reports their median.
The table shows per library the best of the rounds' medians (their minimum: on a shared
machine noise only ever adds time) and the speed-up, PyTorch's time / cnnbp's time.
float32 throughout. The Markdown caption gives the machine's load average before and after:
other work on the machine slows most a library whose idle threads spin (PyTorch's OpenMP
default) when --threads is the number of cores, so compare runs made on a quiet machine.

    python benchmarks/bench.py [--rounds 5] [--threads N] [--only TEXT] [--markdown]

A last table times the derivation's tiny training step (batch 1) on one thread, alternated
the same way: from C++ (cnnbp_bench_step, built with -DCNNBP_BUILD_BENCHMARKS=ON and found
under build/, or given by --step-binary), from Python in one call (model.train_step) and as
the four calls, and PyTorch's.

Rates: GFLOP/s for convolutions, counting forward, dinput and dweight as
3 * 2*N*K*P*Q*(C/groups)*R*S, and GB/s for pools. "% of micro-kernel peak" is a convolution's
rate over cnnbp's float micro-kernel timed on one core with its data in L1, times the number
of threads: a practical ceiling for cnnbp's own kernels, not the machine's fp32 peak.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny step"  # the name of the tiny training step's case
CXX_STEP = "C++ cnnbp::nn::train_step"


# --- the cases: (name, kind, parameters), built by both workers from the same parameters ---


def conv(N, C, H, K, R, pad=0, dilation=1, groups=1, note=""):
    name = f"conv fwd+bwd N{N} C{C} {H}x{H} K{K} {R}x{R}"
    name += f" pad {pad}" if pad else ""
    name += f" dilation {dilation}" if dilation != 1 else ""
    name += f" groups {groups}" if groups != 1 else ""
    name += f" ({note})" if note else ""
    return name, "conv", dict(N=N, C=C, H=H, K=K, R=R, pad=pad, dilation=dilation, groups=groups)


def max_pool(shape, k, ceil_mode=False):
    name = f"max-pool {k}x{k}{' ceil_mode' if ceil_mode else ''} fwd+bwd {shape}"
    return name, "max_pool", dict(shape=shape, k=k, ceil_mode=ceil_mode)


def avg_pool(shape, k, stride, pad, ceil_mode=False):
    mode = " ceil_mode" if ceil_mode else ""
    name = f"avg-pool {k}x{k} stride {stride} pad {pad}{mode} fwd+bwd {shape}"
    return name, "avg_pool", dict(shape=shape, k=k, stride=stride, pad=pad, ceil_mode=ceil_mode)


def batch_norm(shape):
    name = f"batch-norm fwd+bwd (training) {shape}"
    return name, "batch_norm", dict(shape=shape)


CASES = [
    conv(64, 1, 28, 8, 3),
    conv(64, 8, 13, 16, 3),
    conv(32, 32, 32, 64, 3, pad=1),
    conv(32, 32, 32, 64, 3, pad=2, dilation=2),
    conv(16, 64, 56, 64, 3, pad=1),
    conv(32, 64, 56, 64, 3, pad=1, groups=64, note="depthwise"),
    conv(32, 64, 28, 64, 3, pad=1, groups=4),
    max_pool((64, 8, 26, 26), 2),
    max_pool((64, 8, 27, 27), 2),
    max_pool((64, 8, 27, 27), 2, ceil_mode=True),
    max_pool((32, 64, 32, 32), 2),
    # k3/2 pad 1: ceil_mode adds a last window on an even size (32 -> 17, floor 16)
    avg_pool((32, 64, 32, 32), 3, 2, 1),
    avg_pool((32, 64, 32, 32), 3, 2, 1, ceil_mode=True),
    batch_norm((32, 64, 32, 32)),
    ("training step, seed network, N=1", "step", dict(network="seed")),
    ("training step, small CNN, N=64 28x28", "step", dict(network="small_cnn")),
    ("training step, ResNet (--arch resnet), N=64 28x28", "step", dict(network="resnet")),
]


def conv_arrays(N, C, H, K, R, groups, out_size):
    """x, w, b and dy of a conv case, the same in both workers (out_size: P from H)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, H), dtype=np.float32)
    w = rng.standard_normal((K, C // groups, R, R), dtype=np.float32) * 0.1
    b = rng.standard_normal(K, dtype=np.float32)
    P = out_size(H)
    dy = rng.standard_normal((N, K, P, P), dtype=np.float32)
    return x, w, b, dy


def pool_input(shape):
    import numpy as np

    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def seed_network(lib):
    return lib.Sequential(
        lib.Conv2d(1, 1, 3),
        lib.ReLU(),
        lib.MaxPool2d(2),
        lib.Flatten(),
        lib.Linear(4, 1),
        lib.Sigmoid(),
    )


def small_cnn(lib):
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


# cnnbp.train.build_resnet's network (its widths and blocks per stage), written for both
# libraries; the cnnbp worker checks that it is the same network as build_resnet's
RESNET_WIDTHS, RESNET_BLOCKS = (16, 32), 2


def resnet(lib, residual=None):
    """The `cnnbp train --arch resnet` network for 1x28x28 images and 10 classes."""
    residual = residual or lib.Residual

    def conv(cin, cout, k, stride=1):
        return lib.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)

    layers = [conv(1, RESNET_WIDTHS[0], 3), lib.BatchNorm2d(RESNET_WIDTHS[0]), lib.ReLU()]
    channels = RESNET_WIDTHS[0]
    for stage, width in enumerate(RESNET_WIDTHS):
        for i in range(RESNET_BLOCKS):
            stride = 2 if stage > 0 and i == 0 else 1
            block = lib.Sequential(
                conv(channels, width, 3, stride),
                lib.BatchNorm2d(width),
                lib.ReLU(),
                conv(width, width, 3),
                lib.BatchNorm2d(width),
            )
            shortcut = None
            if stride != 1 or channels != width:
                shortcut = lib.Sequential(conv(channels, width, 1, stride), lib.BatchNorm2d(width))
            layers += [residual(block, shortcut), lib.ReLU()]
            channels = width
    layers += [lib.AdaptiveAvgPool2d(1), lib.Flatten(), lib.Linear(channels, 10)]
    return lib.Sequential(*layers)


def torch_resnet(lib):
    import torch

    class Residual(torch.nn.Module):  # y = block(x) + (x or shortcut(x)), as nn.Residual
        def __init__(self, block, shortcut=None):
            super().__init__()
            self.block, self.shortcut = block, shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    return resnet(lib, Residual)


def cnnbp_resnet(lib):
    from cnnbp import train

    model = resnet(lib)
    built = train.build_resnet((1, 28, 28), 10)
    if repr(model) != repr(built):
        raise RuntimeError("bench.py's resnet is not cnnbp.train.build_resnet's network")
    return model


def step_problem(network):
    """(network(lib), X, target, loss class name) of a training-step case."""
    import numpy as np

    rng = np.random.default_rng(0)
    if network == "seed":
        X = rng.standard_normal((1, 1, 6, 6), dtype=np.float32)
        return seed_network, X, np.ones((1, 1), np.float32), "BCELoss"
    X = rng.standard_normal((64, 1, 28, 28), dtype=np.float32)
    if network == "resnet":
        return resnet, X, rng.integers(0, 10, 64), "CrossEntropyLoss"
    return small_cnn, X, rng.integers(0, 10, 64), "CrossEntropyLoss"


# --- cnnbp's worker: each builder returns ({label: fn}, the rate's amount or None) ---


def cnnbp_conv(N, C, H, K, R, pad, dilation, groups):
    from cnnbp import functional as F

    x, w, b, dy = conv_arrays(
        N, C, H, K, R, groups, lambda n: F.output_size(n, R, 1, pad, dilation)
    )
    P = dy.shape[2]
    flops = 3 * 2 * N * K * P * P * (C // groups) * R * R  # forward, dinput, dweight

    def run():
        F.conv2d(x, w, b, 1, pad, dilation, groups)
        F.conv2d_backward(dy, x, w, 1, pad, dilation, groups)

    return {"cnnbp": run}, flops / 1e9


def cnnbp_max_pool(shape, k, ceil_mode):
    import numpy as np
    from cnnbp import functional as F

    x = pool_input(shape)
    y, idx = F.max_pool2d(x, k, ceil_mode=ceil_mode)
    dy = np.ones_like(y)

    def run():
        _, i = F.max_pool2d(x, k, ceil_mode=ceil_mode)
        F.max_pool2d_backward(dy, i, x.shape)

    # read x, write y and idx; read dy and idx, write dx
    return {"cnnbp": run}, (x.nbytes * 2 + y.nbytes * 2 + idx.nbytes * 2) / 1e9


def cnnbp_avg_pool(shape, k, stride, pad, ceil_mode):
    import numpy as np
    from cnnbp import functional as F

    x = pool_input(shape)
    y = F.avg_pool2d(x, k, stride, pad, ceil_mode=ceil_mode)
    dy = np.ones_like(y)

    def run():
        F.avg_pool2d(x, k, stride, pad, ceil_mode=ceil_mode)
        F.avg_pool2d_backward(dy, x.shape, k, stride, pad, ceil_mode=ceil_mode)

    return {"cnnbp": run}, (x.nbytes * 2 + y.nbytes * 2) / 1e9  # read x, write y, dy, dx


def cnnbp_batch_norm(shape):
    import numpy as np
    from cnnbp import functional as F

    x, dy = pool_input(shape), pool_input(shape)[::-1].copy()
    C = shape[1]
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    running_mean, running_var = np.zeros(C, np.float32), np.ones(C, np.float32)

    def run():  # as BatchNorm2d in training mode: batch statistics, running ones updated
        _, mean, invstd = F.batch_norm2d(x, w, b, running_mean, running_var, True, 0.1, 1e-5)
        F.batch_norm2d_backward(dy, x, w, mean, invstd)

    # read x, write y; read dy and x, write dx
    return {"cnnbp": run}, 5 * x.nbytes / 1e9


def cnnbp_step_parts(network):
    from cnnbp import nn, optim

    network, X, target, loss = step_problem(network)
    model = cnnbp_resnet(nn) if network is resnet else network(nn)
    loss_fn, opt = getattr(nn, loss)(), optim.SGD(model.parameters(), lr=0.01)

    def calls():
        model.zero_grad()
        loss_fn(model(X), target)
        model.backward(loss_fn.backward())
        opt.step()

    return calls, lambda: model.train_step(X, target, loss_fn, opt)


def cnnbp_step(network):
    return {"cnnbp": cnnbp_step_parts(network)[0]}, None


def cnnbp_tiny():
    calls, one_call = cnnbp_step_parts("seed")
    return {
        "Python model.train_step (one call)": one_call,
        "Python zero_grad, forward, loss, backward, step": calls,
    }, None


# --- PyTorch's worker ---


def torch_conv(N, C, H, K, R, pad, dilation, groups):
    import torch

    def conv2d(x, w, b):
        return torch.nn.functional.conv2d(x, w, b, 1, pad, dilation, groups)

    def out_size(n):
        with torch.no_grad():
            probe = torch.zeros(1, C, n, n)
            return conv2d(probe, torch.zeros(K, C // groups, R, R), None).shape[2]

    x, w, b, dy = conv_arrays(N, C, H, K, R, groups, out_size)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    tdy = torch.tensor(dy)

    def run():
        tx.grad = tw.grad = tb.grad = None
        conv2d(tx, tw, tb).backward(tdy)

    return {"torch": run}, None


def torch_max_pool(shape, k, ceil_mode):
    import torch

    tx = torch.tensor(pool_input(shape), requires_grad=True)
    tdy = torch.ones_like(torch.nn.functional.max_pool2d(tx.detach(), k, ceil_mode=ceil_mode))

    def run():
        tx.grad = None
        torch.nn.functional.max_pool2d(tx, k, ceil_mode=ceil_mode).backward(tdy)

    return {"torch": run}, None


def torch_avg_pool(shape, k, stride, pad, ceil_mode):
    import torch

    def pool(x):
        return torch.nn.functional.avg_pool2d(x, k, stride, pad, ceil_mode=ceil_mode)

    tx = torch.tensor(pool_input(shape), requires_grad=True)
    tdy = torch.ones_like(pool(tx.detach()))

    def run():
        tx.grad = None
        pool(tx).backward(tdy)

    return {"torch": run}, None


def torch_batch_norm(shape):
    import torch

    layer = torch.nn.BatchNorm2d(shape[1])
    tx = torch.tensor(pool_input(shape), requires_grad=True)
    tdy = torch.tensor(pool_input(shape)[::-1].copy())

    def run():
        tx.grad = layer.weight.grad = layer.bias.grad = None
        layer(tx).backward(tdy)

    return {"torch": run}, None


def torch_step(network):
    import torch

    network, X, target, loss = step_problem(network)
    model = torch_resnet(torch.nn) if network is resnet else network(torch.nn)
    loss_fn, opt = getattr(torch.nn, loss)(), torch.optim.SGD(model.parameters(), lr=0.01)
    tX, ttarget = torch.tensor(X), torch.tensor(target)

    def run():
        opt.zero_grad()
        loss_fn(model(tX), ttarget).backward()
        opt.step()

    return {"torch": run}, None


def torch_tiny():
    import torch

    return {"PyTorch " + torch.__version__: torch_step("seed")[0]["torch"]}, None


BUILDERS = {
    "cnnbp": {
        "conv": cnnbp_conv,
        "max_pool": cnnbp_max_pool,
        "avg_pool": cnnbp_avg_pool,
        "batch_norm": cnnbp_batch_norm,
        "step": cnnbp_step,
        "tiny": cnnbp_tiny,
    },
    "torch": {
        "conv": torch_conv,
        "max_pool": torch_max_pool,
        "avg_pool": torch_avg_pool,
        "batch_norm": torch_batch_norm,
        "step": torch_step,
        "tiny": torch_tiny,
    },
}


def median_seconds(fn, reps, min_time):
    """The median of `reps` samples, each the mean time of a batch of calls lasting at least
    min_time, after two warm-up calls (first touch of memory, thread pools starting)."""
    fn()
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    repeat = max(1, int(min_time / once))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        samples.append((time.perf_counter() - start) / repeat)
    return statistics.median(samples)


def worker(args):
    """Time one case with one library; print the result as one line of JSON."""
    if args.worker == "cnnbp":
        import cnnbp

        cnnbp.set_num_threads(args.threads)
        info = {"version": cnnbp.__version__, "isa": cnnbp.kernel_isa()}
        if args.case == "info":
            from cnnbp import _core

            # the practical peak: the float micro-kernel on one core with its data in L1
            info["peak_per_core"] = _core._micro_kernel_gflops(0.5)
    else:
        import torch

        torch.set_num_threads(args.threads)
        info = {"version": torch.__version__}
    result = {"info": info}
    if args.case != "info":
        if args.case == TINY:
            kind, params = "tiny", {}
        else:
            kind, params = next((k, p) for name, k, p in CASES if name == args.case)
        fns, amount = BUILDERS[args.worker][kind](**params)
        result["times"] = {
            label: median_seconds(fn, args.reps, args.min_time) for label, fn in fns.items()
        }
        result["amount"] = amount
    other = "torch" if args.worker == "cnnbp" else "cnnbp"
    if other in sys.modules:
        raise RuntimeError(f"the {args.worker} worker imported {other}")
    print(json.dumps(result))


# --- the parent: spawns the workers, alternates them, prints the tables ---


def run_worker(lib, case, threads, args):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", lib, "--case", case]
    command += ["--threads", str(threads), "--reps", str(args.reps)]
    command += ["--min-time", str(args.min_time)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {lib} worker for {case!r} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_binary(given):
    if given:
        return Path(given) if Path(given).exists() else None
    found = sorted((ROOT / "build").glob("benchmarks/cnnbp_bench_step"))
    found += sorted((ROOT / "build").glob("*/benchmarks/cnnbp_bench_step"))
    return found[0] if found else None


def run_step_binary(binary):
    out = subprocess.run(
        [str(binary)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    ).stdout
    found = re.search(r"([0-9.]+) us", out)
    return {CXX_STEP: float(found.group(1)) * 1e-6} if found else {}


def alternate(case, threads, libs, args, binary=None):
    """{label: [median of each round]} and the rate's amount, the libraries alternating."""
    times, amount = {}, None
    for r in range(args.rounds):
        for lib in libs if r % 2 == 0 else libs[::-1]:
            if lib == "binary":
                got = run_step_binary(binary)
            else:
                result = run_worker(lib, case, threads, args)
                got = result["times"]
                amount = result["amount"] if result["amount"] is not None else amount
            for label, seconds in got.items():
                times.setdefault(label, []).append(seconds)
    return times, amount


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    """The 1-minute load average, or None where the system has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def fmt_time(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def fmt_rounds(samples):
    return f"{fmt_time(min(samples))} (rounds up to {fmt_time(max(samples))})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the libraries")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reps", type=int, default=5, help="samples in each worker")
    parser.add_argument(
        "--min-time", type=float, default=0.05, help="seconds of calls in each sample"
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--only", default="", help="run cases whose name contains this")
    parser.add_argument("--step-binary", default="", help="the C++ cnnbp_bench_step")
    parser.add_argument("--worker", choices=("cnnbp", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--case", default="info", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    load_before = load_average()
    have_torch = importlib.util.find_spec("torch") is not None
    libs = ["cnnbp", "torch"] if have_torch else ["cnnbp"]
    ours = run_worker("cnnbp", "info", args.threads, args)["info"]
    theirs = run_worker("torch", "info", args.threads, args)["info"] if have_torch else None
    peak_per_core = ours["peak_per_core"]
    print(
        f"kernels: {ours['isa']}, micro-kernel peak {peak_per_core:.0f} GFLOP/s per core, "
        f"{args.threads} threads, {args.rounds} rounds, each library in its own process",
        flush=True,
    )

    rows = []
    for name, kind, _ in CASES:
        if args.only not in name:
            continue
        times, amount = alternate(name, args.threads, libs, args)
        t_ours = min(times["cnnbp"])
        t_theirs = min(times["torch"]) if "torch" in times else None
        row = {
            "case": name,
            "cnnbp": fmt_time(t_ours),
            "rate": "",
            "peak": "",
            "torch": fmt_time(t_theirs) if t_theirs else "-",
            "speedup": f"{t_theirs / t_ours:.2f}x" if t_theirs else "-",
        }
        if amount:
            unit = "GFLOP/s" if kind == "conv" else "GB/s"  # pools, batch norm
            row["rate"] = f"{amount / t_ours:.1f} {unit}"
            if kind == "conv":
                row["peak"] = f"{100 * amount / t_ours / (peak_per_core * args.threads):.0f}%"
        rows.append(row)
        print(
            f"{name:60s} cnnbp {fmt_rounds(times['cnnbp']):>34s} {row['rate']:>14s} "
            f"{row['peak']:>4s}  torch "
            f"{fmt_rounds(times['torch']) if t_theirs else '-':>34s}  speed-up {row['speedup']}",
            flush=True,
        )

    tiny = []
    if "tiny" in args.only or not args.only:
        binary = step_binary(args.step_binary)
        tiny_libs = (["binary"] if binary else []) + libs
        times, _ = alternate(TINY, 1, tiny_libs, args, binary)
        order = [CXX_STEP, "Python model.train_step (one call)"]
        order += ["Python zero_grad, forward, loss, backward, step"]
        tiny = [(how, min(times[how])) for how in order if how in times]
        tiny += [(how, min(s)) for how, s in times.items() if how.startswith("PyTorch")]
    for how, seconds in tiny:
        print(f"tiny step, 1 thread: {how:50s} {fmt_time(seconds):>10s}", flush=True)

    load = ""
    if load_before is not None:
        load = f" Load average {load_before:.2f} before the run, {load_average():.2f} after."
    if args.markdown:
        print(
            f"\n{cpu_name()}, {args.threads} threads, kernels {ours['isa']}, "
            f"micro-kernel peak {peak_per_core:.0f} GFLOP/s per core; "
            f"torch {theirs['version'] if theirs else 'not installed'}, "
            f"cnnbp {ours['version']}. Each library in its own process with its own defaults, "
            f"alternating over {args.rounds} rounds; times are the best round's median.{load}\n"
        )
        print(
            "| case | cnnbp | rate | % of micro-kernel peak | PyTorch "
            "| speed-up (PyTorch / cnnbp) |"
        )
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
