"""Benchmark cnnbp's kernels, training steps and inference against PyTorch's and
onnxruntime's, each library in a process of its own.

For every case this script starts worker processes (this file with --worker): one imports
cnnbp and never torch, the other imports torch and never cnnbp (and for inference a third
imports onnxruntime and neither), and each keeps its library's own default settings but for
the number of threads, --threads for all (cnnbp.set_num_threads, torch.set_num_threads,
onnxruntime's intra_op_num_threads). The script itself imports none of them, so nothing one
library sets in its process reaches another's, and it hands the workers its environment
without OMP_WAIT_POLICY, so each library's own default applies. The libraries alternate over --rounds rounds: round 1 runs cnnbp's process then
PyTorch's, round 2 PyTorch's then cnnbp's, and so on. A worker builds its case, warms it up
and takes --reps samples, each the mean time of a batch of calls lasting at least
--min-time seconds, and reports their median. The tables show per library the best of the
rounds' medians (their minimum: on a shared machine noise only ever adds time) and the
speed-up, the other library's time / cnnbp's time. float32 throughout.

    python benchmarks/bench.py [--rounds 3] [--threads N] [--only TEXT ...] [--markdown]

The tables:
- every case, forward and backward together (convolutions: forward, dinput, dweight and
  dbias), and training steps (zero_grad, forward, loss, backward, SGD);
- convolutions' forward and backward (dinput, dweight, dbias) timed apart;
- the training steps with cnnbp's threads always spinning (OMP_WAIT_POLICY=ACTIVE, a third
  process alternated with the other two) next to its default (spinning only while a call
  runs and the cores are not contended, sleeping otherwise);
- inference in eval mode of the `cnnbp train` networks (--arch cnn on 1x8x8 digits, --arch
  resnet on 1x28x28), batch 1 and 64: cnnbp's model under cnnbp.no_grad, PyTorch's with the
  same weights (its state_dict) under torch.inference_mode, and onnxruntime running the model.to_onnx export
  (CPU provider, intra_op_num_threads = --threads, its other defaults);
- the derivation's tiny training step (batch 1) on one thread, alternated the same way:
  from C++ (cnnbp_bench_step, built with -DCNNBP_BUILD_BENCHMARKS=ON and found under
  build/, or given by --step-binary), from Python in one call (model.train_step) and as the
  four calls, and PyTorch's.

Rates: GFLOP/s for convolutions, counting each of forward, dinput and dweight as
2*N*K*P*Q*(C/groups)*R*S, and GB/s for pools and batch norm. Two ceilings, measured in the
same run: "% of FMA peak" is a rate over the machine's fp32 peak, independent multiply-add
chains in the widest vectors the CPU has (cnnbp's run-time choice of instruction set) timed
on one core, times the threads; "% of NumPy sgemm" is over the rate of NumPy's BLAS for a
2048 x 2048 float32 matmul in a process of its own with the same threads
(OPENBLAS_NUM_THREADS, MKL_NUM_THREADS, OMP_NUM_THREADS): a practical ceiling. The Markdown
caption names the CPU, the threads and cores, both ceilings and the machine's load average
before and after: other work on the machine slows most a library whose idle threads spin
(PyTorch's and onnxruntime's defaults) when --threads is the number of cores, so compare
runs made on a quiet machine.
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny step"  # the name of the tiny training step's case
CXX_STEP = "C++ cnnbp::nn::train_step"
ACTIVE = "cnnbp ACTIVE"  # cnnbp's worker with OMP_WAIT_POLICY=ACTIVE
# the libraries a case alternates: label -> (worker, environment it adds)
LIBS = {
    "cnnbp": ("cnnbp", {}),
    "torch": ("torch", {}),
    "onnxruntime": ("onnxruntime", {}),
    ACTIVE: ("cnnbp", {"OMP_WAIT_POLICY": "ACTIVE"}),
}
MODULES = {"cnnbp": "cnnbp", "torch": "torch", "onnxruntime": "onnxruntime", "numpy": None}
SGEMM_SIZE = 2048  # NumPy's float32 matmul, SGEMM_SIZE square: the practical ceiling


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


# the `cnnbp train` networks' inputs for inference: --arch cnn on the digits, resnet on 28x28
INFERENCE_INPUTS = {"cnn": (1, 8, 8), "resnet": (1, 28, 28)}


def inference(network, N):
    size = "x".join(str(d) for d in INFERENCE_INPUTS[network])
    return f"inference (eval), --arch {network}, N={N} {size}", "infer", dict(network=network, N=N)


CASES = [
    conv(64, 1, 28, 8, 3),
    conv(64, 8, 13, 16, 3),
    conv(32, 32, 32, 64, 3, pad=1),
    conv(32, 32, 32, 64, 3, pad=2, dilation=2),
    conv(16, 64, 56, 64, 3, pad=1),
    conv(32, 64, 56, 64, 3, pad=1, groups=64, note="depthwise"),
    conv(32, 64, 28, 64, 3, pad=1, groups=4),
    # an RGB network's first layer: im2col depth 27 only
    conv(16, 3, 112, 64, 3, pad=1, note="3-channel first layer"),
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
    ("training step, --arch cnn, N=64 1x8x8", "step", dict(network="cnn")),
    ("training step, ResNet (--arch resnet), N=64 28x28", "step", dict(network="resnet")),
    inference("cnn", 1),
    inference("cnn", 64),
    inference("resnet", 1),
    inference("resnet", 64),
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


# cnnbp.train.build_model's network (its channels), written for both libraries; the
# inference worker of each loads the same state_dict, which checks names and shapes
CNN_CHANNELS = (32, 64)


def cnn(lib, input_shape):
    """The `cnnbp train --arch cnn` network for (C, H, W) images and 10 classes."""
    c, h, w = input_shape
    c1, c2 = CNN_CHANNELS
    return lib.Sequential(
        lib.Conv2d(c, c1, 3, padding=1),
        lib.ReLU(),
        lib.MaxPool2d(2),
        lib.Conv2d(c1, c2, 3, padding=1),
        lib.ReLU(),
        lib.MaxPool2d(2),
        lib.Flatten(),
        lib.Linear(c2 * (h // 4) * (w // 4), 10),
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


def digits_cnn(lib):
    """The `cnnbp train --arch cnn` network of the 1x8x8 digits."""
    return cnn(lib, INFERENCE_INPUTS["cnn"])


def cnnbp_digits_cnn(lib):
    from cnnbp import train

    model = digits_cnn(lib)
    built = train.build_model(INFERENCE_INPUTS["cnn"], 10)
    if repr(model) != repr(built):
        raise RuntimeError("bench.py's cnn is not cnnbp.train.build_model's network")
    return model


def cnnbp_resnet(lib):
    from cnnbp import train

    model = resnet(lib)
    built = train.build_resnet((1, 28, 28), 10)
    if repr(model) != repr(built):
        raise RuntimeError("bench.py's resnet is not cnnbp.train.build_resnet's network")
    return model


def inference_input(network, N):
    import numpy as np

    shape = (N, *INFERENCE_INPUTS[network])
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def model_file(data, network, suffix):
    return Path(data) / f"{network}{suffix}"


def step_problem(network):
    """(network(lib), X, target, loss class name) of a training-step case."""
    import numpy as np

    rng = np.random.default_rng(0)
    if network == "seed":
        X = rng.standard_normal((1, 1, 6, 6), dtype=np.float32)
        return seed_network, X, np.ones((1, 1), np.float32), "BCELoss"
    if network == "cnn":
        X = rng.standard_normal((64, *INFERENCE_INPUTS["cnn"]), dtype=np.float32)
        return digits_cnn, X, rng.integers(0, 10, 64), "CrossEntropyLoss"
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

    def forward():
        F.conv2d(x, w, b, 1, pad, dilation, groups)

    def backward():  # dinput, dweight, dbias
        F.conv2d_backward(dy, x, w, 1, pad, dilation, groups)

    def run():
        forward()
        backward()

    return {"cnnbp": run, "cnnbp fwd": forward, "cnnbp bwd": backward}, flops / 1e9


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
    model = {resnet: cnnbp_resnet, digits_cnn: cnnbp_digits_cnn}.get(network, network)(nn)
    loss_fn, opt = getattr(nn, loss)(), optim.SGD(model.parameters(), lr=0.01)

    def calls():
        model.zero_grad()
        loss_fn(model(X), target)
        model.backward(loss_fn.backward())
        opt.step()

    return calls, lambda: model.train_step(X, target, loss_fn, opt)


def cnnbp_step(network):
    return {"cnnbp": cnnbp_step_parts(network)[0]}, None


def cnnbp_export(data):
    """Write each inference network's weights (its state_dict, .npz) and its ONNX export."""
    import cnnbp
    import numpy as np
    from cnnbp import train

    for network, shape in INFERENCE_INPUTS.items():
        cnnbp.manual_seed(0)
        model = train.ARCHITECTURES[network].build(shape, 10)
        model.eval()
        np.savez(model_file(data, network, ".npz"), **model.state_dict())
        model.to_onnx(model_file(data, network, ".onnx"), shape)


def cnnbp_infer(network, N, data, threads):
    import cnnbp
    import numpy as np
    from cnnbp import train

    model = train.ARCHITECTURES[network].build(INFERENCE_INPUTS[network], 10)
    with np.load(model_file(data, network, ".npz")) as f:
        model.load_state_dict(dict(f))
    model.eval()
    x = inference_input(network, N)

    def run():
        with cnnbp.no_grad():
            return model(x)

    return {"cnnbp": run}, None, run()[-1]


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

    def forward():
        with torch.no_grad():
            conv2d(tx, tw, tb)

    def backward():  # the kernel autograd calls: dinput, dweight, dbias
        torch.ops.aten.convolution_backward(
            tdy,
            tx,
            tw,
            [K],
            [1, 1],
            [pad, pad],
            [dilation, dilation],
            False,
            [0, 0],
            groups,
            [True, True, True],
        )

    return {"torch": run, "torch fwd": forward, "torch bwd": backward}, None


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


def torch_infer(network, N, data, threads):
    import numpy as np
    import torch

    shape = INFERENCE_INPUTS[network]
    model = torch_resnet(torch.nn) if network == "resnet" else cnn(torch.nn, shape)
    with np.load(model_file(data, network, ".npz")) as f:
        model.load_state_dict({name: torch.from_numpy(f[name]) for name in f.files})
    model.eval()
    x = torch.from_numpy(inference_input(network, N))

    def run():
        with torch.inference_mode():
            return model(x)

    return {"torch": run}, None, run()[-1].numpy()


# --- onnxruntime's worker: the model cnnbp exported, on the CPU provider ---


def onnxruntime_infer(network, N, data, threads):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(
        str(model_file(data, network, ".onnx")), options, providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: inference_input(network, N)}

    def run():
        return session.run(None, feed)[0]

    return {"onnxruntime": run}, None, run()[-1]


# --- NumPy's worker: its BLAS's float32 matmul, the practical ceiling ---


def numpy_sgemm():
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((SGEMM_SIZE,) * 2, dtype=np.float32) for _ in range(2))
    c = np.empty_like(a)
    return {"numpy": lambda: np.matmul(a, b, out=c)}, 2 * SGEMM_SIZE**3 / 1e9


def blas_name():
    import numpy as np

    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas['version']}"
    except Exception:  # older NumPy: no dicts
        return "BLAS"


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
        "infer": cnnbp_infer,
        "tiny": cnnbp_tiny,
    },
    "torch": {
        "conv": torch_conv,
        "max_pool": torch_max_pool,
        "avg_pool": torch_avg_pool,
        "batch_norm": torch_batch_norm,
        "step": torch_step,
        "infer": torch_infer,
        "tiny": torch_tiny,
    },
    "onnxruntime": {"infer": onnxruntime_infer},
    "numpy": {"sgemm": numpy_sgemm},
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

            # the machine's fp32 peak: independent FMA chains on one core, widest vectors
            info["fma_peak_per_core"] = _core._fma_peak_gflops(max(0.02, 10 * args.min_time))
        elif args.case == "export":
            cnnbp_export(args.data)
    elif args.worker == "torch":
        import torch

        torch.set_num_threads(args.threads)
        info = {"version": torch.__version__}
    elif args.worker == "onnxruntime":
        import onnxruntime

        info = {"version": onnxruntime.__version__}
    else:  # numpy: its BLAS's threads come from the environment run_worker gives it
        import numpy as np

        info = {"version": np.__version__, "blas": blas_name()}
    result = {"info": info}
    if args.case not in ("info", "export"):
        if args.case == TINY:
            kind, params = "tiny", {}
        elif args.case == "sgemm":
            kind, params = "sgemm", {}
        else:
            kind, params = next((k, p) for name, k, p in CASES if name == args.case)
        if kind == "infer":
            params = dict(params, data=args.data, threads=args.threads)
        fns, amount, *check = BUILDERS[args.worker][kind](**params)
        result["times"] = {
            label: median_seconds(fn, args.reps, args.min_time) for label, fn in fns.items()
        }
        result["amount"] = amount
        if check:  # an output row, compared across the libraries by the parent
            result["check"] = [float(v) for v in check[0]]
    for lib, module in MODULES.items():
        if lib != args.worker and module in sys.modules:
            raise RuntimeError(f"the {args.worker} worker imported {module}")
    print(json.dumps(result))


# --- the parent: spawns the workers, alternates them, prints the tables ---


def worker_env(extra=None):
    """The environment of a worker: this one's without OMP_WAIT_POLICY (each library's own
    default applies), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return {**env, **(extra or {})}


def run_worker(lib, case, threads, args, env=None):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", lib, "--case", case]
    command += ["--threads", str(threads), "--reps", str(args.reps)]
    command += ["--min-time", str(args.min_time), "--data", args.data]
    done = subprocess.run(command, capture_output=True, text=True, env=worker_env(env))
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
        [str(binary)], capture_output=True, text=True, env=worker_env({"OMP_NUM_THREADS": "1"})
    ).stdout
    found = re.search(r"([0-9.]+) us", out)
    return {CXX_STEP: float(found.group(1)) * 1e-6} if found else {}


versions = {}  # each worker library's version, as the workers report it


def alternate(case, threads, libs, args, binary=None):
    """{label: [median of each round]}, the rate's amount and {lib: output row} (inference),
    the libraries (LIBS' labels) alternating."""
    times, amount, checks = {}, None, {}
    for r in range(args.rounds):
        for lib in libs if r % 2 == 0 else libs[::-1]:
            if lib == "binary":
                got = run_step_binary(binary)
            else:
                worker, env = LIBS[lib]
                result = run_worker(worker, case, threads, args, env)
                versions[worker] = result["info"]["version"]
                got = result["times"]
                if lib != worker:  # ACTIVE: "cnnbp" -> "cnnbp ACTIVE", "cnnbp fwd" -> ...
                    got = {label.replace(worker, lib, 1): t for label, t in got.items()}
                amount = result["amount"] if result["amount"] is not None else amount
                if "check" in result:
                    checks[lib] = result["check"]
            for label, seconds in got.items():
                times.setdefault(label, []).append(seconds)
    return times, amount, checks


def check_outputs(case, checks):
    """The libraries' output rows of an inference case agree (same weights, same input)."""
    ours = checks["cnnbp"]
    for lib, row in checks.items():
        worst = max(abs(a - b) for a, b in zip(ours, row))
        if worst > 1e-3 * max(1.0, max(abs(a) for a in ours)):
            raise SystemExit(f"{case}: {lib}'s output differs from cnnbp's by {worst:g}")


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


def fmt_speedup(theirs, ours):
    return f"{theirs / ours:.2f}x" if theirs and ours else "-"


def best(times, label):
    return min(times[label]) if label in times else None


def markdown_table(header, rows):
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


class Ceilings:
    """The rates a convolution's is a fraction of: the FMA peak (times the threads) and NumPy's
    sgemm, both GFLOP/s."""

    def __init__(self, fma_peak, sgemm):
        self.fma_peak, self.sgemm = fma_peak, sgemm

    def columns(self, gflop, seconds):
        """rate, % of FMA peak, % of NumPy sgemm."""
        rate = gflop / seconds
        return [f"{rate:.1f} GFLOP/s", f"{100 * rate / self.fma_peak:.0f}%"] + [
            f"{100 * rate / self.sgemm:.0f}%" if self.sgemm else "-"
        ]


def measure_ceilings(args):
    """(cnnbp's info, its FMA peak per core, NumPy's info, NumPy's sgemm GFLOP/s), each
    library in its own process; NumPy's BLAS gets --threads through the environment."""
    ours = run_worker("cnnbp", "info", args.threads, args)["info"]
    names = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
    result = run_worker("numpy", "sgemm", args.threads, args, {v: str(args.threads) for v in names})
    sgemm = result["amount"] / result["times"]["numpy"]
    return ours, ours["fma_peak_per_core"], result["info"], sgemm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the libraries")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reps", type=int, default=3, help="samples in each worker")
    parser.add_argument(
        "--min-time", type=float, default=0.05, help="seconds of calls in each sample"
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run the cases whose name contains this text (repeat: any of them)",
    )
    parser.add_argument("--step-binary", default="", help="the C++ cnnbp_bench_step")
    parser.add_argument("--worker", choices=tuple(BUILDERS), help=argparse.SUPPRESS)
    parser.add_argument("--case", default="info", help=argparse.SUPPRESS)
    parser.add_argument("--data", default="", help=argparse.SUPPRESS)  # inference models
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as data:
        args.data = data
        run(args)


def run(args):
    load_before = load_average()
    have = {lib: importlib.util.find_spec(lib) is not None for lib in ("torch", "onnxruntime")}
    have["onnx"] = importlib.util.find_spec("onnx") is not None  # cnnbp's export needs it
    libs = ["cnnbp", "torch"] if have["torch"] else ["cnnbp"]
    ours, peak_per_core, blas, sgemm = measure_ceilings(args)
    print(
        f"kernels: {ours['isa']}, FMA peak {peak_per_core:.0f} GFLOP/s per core, NumPy sgemm "
        f"{sgemm:.0f} GFLOP/s on {args.threads} threads ({blas['blas']}), {args.rounds} "
        "rounds, each library in its own process",
        flush=True,
    )

    def wanted(name):
        return not args.only or any(text in name for text in args.only)

    cases = [(name, kind) for name, kind, _ in CASES if wanted(name)]
    if any(kind == "infer" for _, kind in cases):
        run_worker("cnnbp", "export", args.threads, args)
    infer_libs = libs + (["onnxruntime"] if have["onnxruntime"] and have["onnx"] else [])
    results = []  # (name, kind, times, amount)
    for name, kind in cases:
        case_libs = {"step": libs + [ACTIVE], "infer": infer_libs}.get(kind, libs)
        times, amount, checks = alternate(name, args.threads, case_libs, args)
        if checks:
            check_outputs(name, checks)
        results.append((name, kind, times, amount))
        line = f"{name:60s}"
        for label in sorted(times, key=lambda label: (label not in LIBS, label)):
            line += f"  {label} {fmt_rounds(times[label])}"
        print(line, flush=True)

    tiny = []
    if wanted(TINY):
        binary = step_binary(args.step_binary)
        tiny_libs = (["binary"] if binary else []) + libs
        times, _, _ = alternate(TINY, 1, tiny_libs, args, binary)
        order = [CXX_STEP, "Python model.train_step (one call)"]
        order += ["Python zero_grad, forward, loss, backward, step"]
        tiny = [(how, min(times[how])) for how in order if how in times]
        tiny += [(how, min(s)) for how, s in times.items() if how.startswith("PyTorch")]
        for how, seconds in tiny:
            print(f"tiny step, 1 thread: {how:50s} {fmt_time(seconds):>10s}", flush=True)

    # the ceilings again at the end: each the better of the two measurements
    _, peak_end, _, sgemm_end = measure_ceilings(args)
    ceilings = Ceilings(max(peak_per_core, peak_end) * args.threads, max(sgemm, sgemm_end))
    print(
        f"FMA peak {ceilings.fma_peak:.0f} GFLOP/s on {args.threads} threads, NumPy sgemm "
        f"{ceilings.sgemm:.0f} GFLOP/s (the better of the first and last measurements)"
    )
    if args.markdown:
        print_markdown(args, results, tiny, ceilings, ours, blas, load_before)


def print_markdown(args, results, tiny, ceilings, ours, blas, load_before):
    load = ""
    if load_before is not None:
        load = f" Load average {load_before:.2f} before the run, {load_average():.2f} after."
    print(
        f"\n{cpu_name()}: {args.threads} threads on {os.cpu_count()} logical cores; kernels "
        f"{ours['isa']}; fp32 FMA peak {ceilings.fma_peak / args.threads:.0f} GFLOP/s per "
        f"core, {ceilings.fma_peak:.0f} GFLOP/s on {args.threads} threads; NumPy "
        f"{blas['version']} sgemm ({blas['blas']}, {SGEMM_SIZE}x{SGEMM_SIZE}, "
        f"{args.threads} threads) {ceilings.sgemm:.0f} GFLOP/s (each ceiling the better of a "
        "measurement before the cases and one after). "
        f"cnnbp {ours['version']}, "
        + "".join(f"{lib} {versions[lib]}, " for lib in ("torch", "onnxruntime") if lib in versions)
        + f"Python {platform.python_version()}. "
        f"Each library in its own process with its own defaults, alternating over "
        f"{args.rounds} rounds; times are the best round's median.{load}"
    )
    rows = []
    for name, kind, times, amount in results:
        if kind == "infer":
            continue
        ours_s, theirs_s = best(times, "cnnbp"), best(times, "torch")
        rate = ["", "", ""]
        if amount and kind == "conv":
            rate = ceilings.columns(amount, ours_s)
        elif amount:  # pools, batch norm
            rate = [f"{amount / ours_s:.1f} GB/s", "", ""]
        torch_time = fmt_time(theirs_s) if theirs_s else "-"
        rows.append([name, fmt_time(ours_s), *rate, torch_time, fmt_speedup(theirs_s, ours_s)])
    if rows:
        markdown_table(
            [
                "case",
                "cnnbp",
                "rate",
                "% of FMA peak",
                "% of NumPy sgemm",
                "PyTorch",
                "speed-up (PyTorch / cnnbp)",
            ],
            rows,
        )

    rows = []
    for name, kind, times, amount in results:
        if kind != "conv":
            continue
        row = [name.replace("conv fwd+bwd", "conv")]
        for part, share in (("fwd", 1 / 3), ("bwd", 2 / 3)):  # bwd: dinput and dweight
            ours_s, theirs_s = best(times, f"cnnbp {part}"), best(times, f"torch {part}")
            row += [fmt_time(ours_s), *ceilings.columns(amount * share, ours_s)[1:]]
            row += [fmt_time(theirs_s) if theirs_s else "-", fmt_speedup(theirs_s, ours_s)]
        rows.append(row)
    if rows:
        print(
            "\nConvolutions' forward and backward (dinput, dweight and dbias) timed apart; "
            "PyTorch's forward under torch.no_grad, its backward the kernel autograd calls "
            "(aten.convolution_backward):"
        )
        markdown_table(
            [
                "convolution",
                "forward",
                "% of FMA peak",
                "% of NumPy sgemm",
                "PyTorch",
                "speed-up",
                "backward",
                "% of FMA peak",
                "% of NumPy sgemm",
                "PyTorch",
                "speed-up",
            ],
            rows,
        )

    rows = []
    for name, kind, times, _ in results:
        if kind != "step":
            continue
        passive, active, theirs_s = (best(times, k) for k in ("cnnbp", ACTIVE, "torch"))
        rows.append(
            [
                name,
                fmt_time(passive),
                fmt_time(active),
                fmt_time(theirs_s) if theirs_s else "-",
                fmt_speedup(theirs_s, passive),
                fmt_speedup(theirs_s, active),
            ]
        )
    if rows:
        print(
            "\ncnnbp's threads by default (spinning only while a call runs, sleeping between "
            "calls: the main table's) and always spinning (OMP_WAIT_POLICY=ACTIVE), alternated "
            "in the same rounds; PyTorch with its default:"
        )
        markdown_table(
            [
                "training step",
                "cnnbp, default",
                "cnnbp, ACTIVE",
                "PyTorch",
                "speed-up default",
                "speed-up ACTIVE",
            ],
            rows,
        )

    rows = []
    for name, kind, times, _ in results:
        if kind != "infer":
            continue
        ours_s, theirs_s, ort_s = (best(times, k) for k in ("cnnbp", "torch", "onnxruntime"))
        rows.append(
            [
                name,
                fmt_time(ours_s),
                fmt_time(theirs_s) if theirs_s else "-",
                fmt_time(ort_s) if ort_s else "-",
                fmt_speedup(theirs_s, ours_s),
                fmt_speedup(ort_s, ours_s),
            ]
        )
    if rows:
        print(
            f"\nInference in eval mode, the same weights in each library: cnnbp's model under "
            f"cnnbp.no_grad, "
            f"PyTorch's under torch.inference_mode, onnxruntime "
            f"{'' if 'onnxruntime' in versions else '(not installed) '}running "
            f"model.to_onnx's export on the CPU provider with intra_op_num_threads="
            f"{args.threads}, its other defaults:"
        )
        markdown_table(
            [
                "inference",
                "cnnbp",
                "PyTorch",
                "onnxruntime",
                "speed-up (PyTorch / cnnbp)",
                "speed-up (onnxruntime / cnnbp)",
            ],
            rows,
        )

    if tiny:
        markdown_table(
            ["tiny step: seed network, N=1, float32, 1 thread", "time"],
            [[how, fmt_time(seconds)] for how, seconds in tiny],
        )


if __name__ == "__main__":
    main()
