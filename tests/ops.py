"""The table of functional ops that the kernel tests run over.

One entry per op: how to make random valid inputs (seeded, per dtype), the kernel call and
the oracle call (the same function of `lib`, which is cnnbp.functional or cnnbp.reference:
their signatures agree), the backward call and its oracle, the tolerance key (KERNEL_TOL),
which arguments are arrays and what the kernel calls them in its messages, and the
invalid-argument cases with their expected "[op] ..." messages.

The kernel tests are organized by property, each parametrized over this table:

    test_forward_vs_oracle.py   forward against the oracle, every case and dtype
    test_backward.py            backward against the oracle, and against central finite
                                differences in float64 (away from ReLU kinks and max-pool ties)
    test_validation.py          the invalid-argument cases, and dtype / None / mixed-dtype
                                refusals derived from the arguments
    test_threads.py             the same bits for 1, 2 and 3 threads, and across processes
    test_array_contract.py      layouts, lists, untouched inputs, new outputs, determinism
    test_fuzz.py                random cases in random layouts

Adding an op to OPS puts it under every one of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from cnnbp import functional as F
from cnnbp import reference as ref
from conftest import rng_for

F32, F64 = np.float32, np.float64


class Sample(dict):
    """The inputs of one call, by name (s.x is s["x"]); `replace` makes a changed copy."""

    __getattr__ = dict.__getitem__

    def replace(self, **changes):
        return Sample(self, **changes)


# ---------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------


def fill(rng, shape, dtype, values, scale=1.0):
    """Random numbers of `shape` in `dtype`:

    normal   N(0, scale^2)
    smooth   the same, moved at least 1e-2 away from 0 (ReLU's kink, |z| in the losses)
    ties     multiples of 0.5 (max-pool ties, ReLU kinks), half of them perturbed by N(0, 1)
    special  ties salted with NaN, -inf and -0 (20 of each)
    """
    if values in ("ties", "special"):
        x = np.array(rng.integers(-4, 5, shape), dtype)
        x *= dtype(0.5)  # in place: a 0-d array stays an array
        x += np.asarray(rng.standard_normal(shape), dtype) * (rng.random(shape) < 0.5)
        if values == "special" and x.size:
            flat = x.reshape(-1)
            flat[rng.integers(0, flat.size, 20)] = np.nan
            flat[rng.integers(0, flat.size, 20)] = -np.inf
            flat[rng.integers(0, flat.size, 20)] = -0.0
        return x
    x = rng.standard_normal(shape) * scale
    if values == "smooth":
        x = np.where(np.abs(x) < 1e-2, 0.5, x)
    return np.asarray(x).astype(dtype)


def distinct(rng, shape, dtype):
    """Values 0.1 apart in random order: no ties, and a 1e-6 step changes no argmax."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) * 0.1 - n * 0.05).astype(dtype)


def pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def pooled_shape(x_shape, kernel, stride, padding):
    """The output shape of a pool (or, with the filter's sizes, of a convolution)."""
    N, C, H, W = x_shape
    (kh, kw), (ph, pw) = pair(kernel), pair(padding)
    sh, sw = pair(kernel if stride is None else stride)
    return (N, C, ref.output_size(H, kh, sh, ph), ref.output_size(W, kw, sw, pw))


# ---------------------------------------------------------------------------------------
# the table's entries
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """An array argument of a call: its key in the sample, the name the kernel's messages
    give it, and what it holds: "float" (float32 or float64, the dtype of the call),
    "optional" (a float array or None), "int" / "bool" (indices, labels, masks), or "any"
    (flatten takes any array)."""

    key: str
    name: str
    kind: str = "float"


@dataclass(frozen=True)
class Bad:
    """An invalid call and the error it must raise: `pattern` is matched from the message's
    start (a literal text unless regex=True)."""

    fn: str
    args: tuple
    kwargs: dict
    exception: type
    pattern: str
    regex: bool = False

    def call(self):
        return getattr(F, self.fn)(*self.args, **self.kwargs)

    @property
    def match(self):
        return self.pattern if self.regex else "^" + re.escape(self.pattern)

    def __repr__(self):
        return f"{self.fn}: {self.pattern[:70]}"


@dataclass(frozen=True)
class Op:
    name: str  # F.name and ref.name; the tolerances KERNEL_TOL[name], KERNEL_TOL[name_backward]
    make: Callable  # make(case, dtype, rng, values) -> Sample
    forward: Callable  # forward(lib, s), lib = F or ref
    backward: Callable  # backward(lib, s) -> the gradients with respect to `wrt`, a tuple
    wrt: tuple  # the sample's keys that backward differentiates, in its result's order
    forward_args: tuple  # Arg: the forward's array arguments, in call order
    backward_args: tuple  # Arg: the backward's array arguments, in call order
    cases: list  # small cases: forward, backward, finite differences
    big: list  # cases above the threading thresholds: forward and backward against the oracle
    threads: list  # cases for the thread-count tests
    thread_values: str = "normal"  # the values of the thread-count tests (see fill)
    oracle: Callable | None = None  # the forward's oracle when ref's call differs
    loss: bool = False  # a scalar loss: its backward takes no dy
    errors: list = field(default_factory=list)  # Bad calls

    @property
    def backward_name(self):
        return self.name + "_backward"

    def sample(self, case, dtype, values="normal", *key):
        return self.make(case, dtype, rng_for(self.name, case, np.dtype(dtype).name, *key), values)

    def expected(self, s):
        return (self.oracle or self.forward)(ref, s)

    def objective(self, s):
        """The scalar whose gradient backward gives: the loss, or sum(output * dy)."""
        out = self.forward(F, s)
        if self.loss and s.get("dy") is None:  # a reduced loss, dL/d(loss) = 1
            return out
        return float(np.sum(np.asarray(out[0] if isinstance(out, tuple) else out) * s.dy))

    def __repr__(self):
        return self.name


# ---------------------------------------------------------------------------------------
# conv2d
# ---------------------------------------------------------------------------------------

CONV_CASES = [
    # (N, C, H, W, K, R, S, stride, padding[, bias][, {dilation, groups}]); K and C are the
    # whole layer's channels (the weight is (K, C / groups, R, S))
    (1, 1, 5, 5, 1, 3, 3, 1, 0),  # the smallest: one sample, one channel
    (3, 4, 7, 6, 5, 3, 3, 1, 1),  # batch, several channels, padding, W != H
    (3, 4, 7, 6, 5, 3, 3, 1, 1, False),  # b=None: no bias
    (2, 3, 8, 8, 2, 1, 1, 1, 0),  # 1x1 kernel
    (2, 2, 9, 7, 3, 1, 1, 2, 0),  # 1x1 kernel with stride: every other cell unread
    (2, 3, 9, 9, 4, 3, 3, 2, 1),  # stride 2 and padding
    (1, 2, 7, 8, 3, 3, 2, (2, 1), (1, 0)),  # non-square kernel, (h, w) stride/padding
    (1, 2, 7, 8, 3, 3, 2, (2, 1), (1, 0), False),
    (2, 1, 6, 5, 2, 2, 4, (1, 3), (0, 2)),  # wide kernel, padding only in w
    (1, 2, 5, 5, 2, 5, 5, 1, 0),  # kernel covers the whole input: 1x1 output
    (1, 1, 4, 4, 1, 3, 3, 1, 3),  # padding > kernel: border outputs read only zeros
    (2, 2, 11, 10, 3, 3, 3, 4, 0),  # stride > kernel: some cells never read
    (1, 3, 7, 7, 2, 2, 3, (3, 2), (2, 1)),
    (1, 1, 1, 1, 1, 1, 1, 1, 0),  # a single number
    # Enough work per image for the packed GEMM path (K*P*Q*C*R*S >= 4096):
    (2, 30, 8, 8, 10, 3, 3, 1, 1),  # C*R*S = 270: two k-blocks; K = 10: a partial row panel
    (1, 2, 24, 20, 9, 3, 3, 1, 1),  # P*Q = 480: two column blocks, a partial column tile
    (2, 3, 17, 15, 6, 3, 2, (2, 1), (1, 0)),  # (h, w) stride and padding through the GEMM
    (1, 3, 9, 9, 10, 3, 3, 2, 1),  # stride 2 with padding
    (1, 4, 10, 10, 7, 5, 5, 3, 2),  # stride > 1 with a 5x5 kernel
    (2, 33, 6, 7, 3, 3, 2, 1, (1, 0)),  # unit strides, C >= 32: dinput as a forward conv
    (1, 3, 7, 6, 64, 3, 3, 1, 1),  # unit strides, K = 64: dweight read in place
    (2, 2, 5, 5, 70, 3, 2, 1, (0, 1)),  # K = 70: a partial filter panel in place
    (2, 3, 8, 7, 20, 3, 3, 1, 0),  # K = 20: the middle gather panel, partially filled
    (2, 4, 7, 7, 24, 3, 3, 1, 1),  # K = 24: a two-vector gather panel; short last grid tiles
    (1, 4, 6, 6, 24, 3, 3, 1, 3),  # padding >= kernel: padded rows too wide to share zeros
    # torch's other options: dilation, groups, 'same' / 'valid' padding, an empty batch
    (2, 3, 9, 8, 4, 3, 3, 1, 1, {"dilation": 2}),  # tiny: direct loops
    (2, 4, 11, 10, 6, 3, 2, 2, (2, 1), {"dilation": (2, 3)}),  # dilation with stride
    (2, 8, 12, 12, 16, 3, 3, 1, 2, {"dilation": 2}),  # unit strides, in place
    (1, 8, 14, 13, 8, 3, 3, 2, 2, {"dilation": 2}),  # strided: GEMM and col2im
    (2, 6, 9, 9, 9, 3, 3, 1, 1, {"groups": 3}),
    (2, 8, 12, 12, 16, 3, 3, 1, 1, {"groups": 2}),  # groups through the in-place paths
    (2, 8, 12, 11, 16, 3, 3, 2, 1, {"groups": 4}),  # and the strided ones
    (2, 8, 12, 12, 16, 3, 3, 1, 2, False, {"groups": 2, "dilation": 2}),
    (2, 6, 9, 8, 6, 3, 3, 1, 1, {"groups": 6}),  # depthwise
    (2, 6, 9, 8, 12, 3, 3, 1, 1, {"groups": 6}),  # depthwise, two filters per channel
    (2, 4, 11, 9, 4, 3, 3, 2, 1, {"groups": 4}),  # depthwise with stride
    (2, 4, 9, 41, 8, 3, 3, (1, 2), 1, {"groups": 4}),  # strided depthwise, long rows
    (2, 4, 9, 12, 4, 3, 3, 1, 3, {"groups": 4}),  # depthwise, padding >= the kernel
    (1, 4, 12, 12, 4, 5, 5, 1, "same", {"groups": 4, "dilation": 2}),
    (2, 3, 7, 8, 4, 3, 3, 1, "same"),
    (2, 3, 7, 8, 4, 4, 2, 1, "same"),  # even kernels: one more zero at the bottom/right
    (2, 8, 10, 9, 16, 2, 4, 1, "same", {"dilation": (3, 1)}),  # odd totals, in place
    (2, 3, 7, 8, 4, 3, 3, 2, "valid"),
    (0, 3, 7, 8, 4, 3, 3, 1, 1),  # an empty batch: an empty output, zero gradients
    (0, 8, 12, 12, 16, 3, 3, 1, 1, {"groups": 8}),
]
CONV_BIG = [  # enough work for the threaded paths
    (4, 8, 16, 16, 8, 3, 3, 1, 1),
    (4, 16, 16, 16, 16, 3, 3, 1, 1, {"groups": 16}),
    (4, 8, 16, 16, 16, 3, 3, 1, 2, {"groups": 2, "dilation": 2}),
]
CONV_THREADS = [
    (64, 1, 28, 28, 8, 3, 3, 1, 0),
    (16, 8, 13, 13, 16, 3, 3, 1, 0),
    (8, 16, 20, 20, 32, 3, 3, 1, 1),
    (6, 5, 17, 15, 7, 3, 3, 2, 1),
    (1, 32, 32, 32, 32, 3, 3, 1, 1),  # one image: the threads must split something else
    # fewer images than threads: the padded grid's tiles (unit stride, the polyphase stack,
    # dilation, groups), the im2col GEMM's columns (1x1, stride 2), depthwise planes
    (1, 3, 100, 100, 16, 3, 3, 1, 1),
    (2, 16, 48, 48, 32, 3, 3, 2, 1),
    (3, 16, 26, 26, 16, 3, 3, 1, 2, {"dilation": 2}),
    (1, 16, 48, 48, 32, 3, 3, 1, 1, {"groups": 2}),
    (1, 64, 48, 48, 128, 1, 1, 2, 0),
    (1, 32, 32, 32, 32, 3, 3, 2, 1, {"groups": 32}),
    (3, 2, 6, 6, 4, 3, 3, 1, 0),  # tiny: direct loops
    (8, 32, 20, 20, 32, 3, 3, 1, 1, {"groups": 32}),  # depthwise: planes and filters split
    (8, 16, 20, 20, 32, 3, 3, 1, 2, {"groups": 4, "dilation": 2}),
    (9, 16, 20, 20, 32, 3, 3, 2, 1, {"groups": 2}),  # strided, groups: chunks by group
]


def make_conv2d(case, dtype, rng, values):
    N, C, H, W, K, R, S, stride, padding, *rest = case
    options = rest.pop() if rest and isinstance(rest[-1], dict) else {}
    dilation, groups = options.get("dilation", 1), options.get("groups", 1)
    x = fill(rng, (N, C, H, W), dtype, values)
    w = fill(rng, (K, C // groups, R, S), dtype, values)
    b = fill(rng, (K,), dtype, values) if rest in ([], [True]) else None
    P, Q = ref._conv_geometry(x.shape, w.shape, stride, padding, dilation)[3]
    dy = fill(rng, (N, K, P, Q), dtype, values)
    return Sample(
        x=x, w=w, b=b, stride=stride, padding=padding, dilation=dilation, groups=groups, dy=dy
    )


def conv2d_error(
    message, x=(2, 3, 6, 6), w=(4, 3, 3, 3), b=(4,), stride=1, padding=0, dilation=1, groups=1
):
    """conv2d on ones of these shapes, a valid call but for what a row changes, and the
    message it must raise after "[conv2d] "."""
    args = (np.ones(x), np.ones(w), np.zeros(b))
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return Bad("conv2d", args, kwargs, ValueError, "[conv2d] " + message)


# fmt: off
CONV2D_ERRORS = [
    conv2d_error("input: expected 3 dims (C, H, W) or 4 dims (N, C, H, W), got shape (6, 6)",
                 x=(6, 6)),
    conv2d_error("input: expected 3 dims (C, H, W) or 4 dims (N, C, H, W), got shape "
                 "(1, 2, 3, 6, 6)", x=(1, 2, 3, 6, 6)),
    conv2d_error("weight: expected 2 input channels (dim 1) to match input (2, 6, 6), got shape "
                 "(4, 3, 3, 3)", x=(2, 6, 6)),  # unbatched
    conv2d_error("weight: expected 4 dims (K, C / groups, R, S), got shape (3, 3)", w=(3, 3)),
    conv2d_error("weight: expected 3 input channels (dim 1) to match input (2, 3, 6, 6), "
                 "got shape (4, 2, 3, 3)", w=(4, 2, 3, 3)),
    conv2d_error("bias: expected shape (4,), got shape (3,)", b=(3,)),
    conv2d_error("bias: expected shape (4,), got shape (4, 1)", b=(4, 1)),
    conv2d_error("bias: expected shape (4,), got shape ()", b=()),
    conv2d_error("input: expected every dim but the batch >= 1, got shape (2, 0, 6, 6)",
                 x=(2, 0, 6, 6), w=(4, 0, 3, 3)),
    conv2d_error("input: expected every dim but the batch >= 1, got shape (2, 3, 6, 0)",
                 x=(2, 3, 6, 0)),
    conv2d_error("weight: expected every dim >= 1, got shape (0, 3, 3, 3)", w=(0, 3, 3, 3), b=(0,)),
    conv2d_error("weight: expected every dim >= 1, got shape (4, 3, 3, 0)", w=(4, 3, 3, 0)),
    conv2d_error("input: expected padded size (2, 6) >= kernel size (3, 3), "
                 "got input shape (2, 3, 2, 6)", x=(2, 3, 2, 6)),
    conv2d_error("input: expected padded size (6, 6) >= kernel size (7, 5), "
                 "got input shape (1, 1, 4, 4)", x=(1, 1, 4, 4), w=(1, 1, 7, 5), b=(1,), padding=1),
    conv2d_error("input: expected padded size (6, 4) >= kernel size (5, 5), "
                 "got input shape (1, 1, 4, 4)",
                 x=(1, 1, 4, 4), w=(1, 1, 5, 5), b=(1,), padding=(1, 0)),
    conv2d_error("stride: expected >= 1, got 0", stride=0),
    conv2d_error("stride: expected >= 1, got 0", stride=(1, 0)),
    conv2d_error("stride: expected >= 1, got -2", stride=-2),
    conv2d_error("padding: expected >= 0, got -1", padding=-1),
    conv2d_error("padding: expected >= 0, got -3", padding=(0, -3)),
    conv2d_error("padding: expected 'same', 'valid', an int or a pair of ints, got 'full'",
                 padding="full"),
    conv2d_error("padding: expected stride 1 with padding='same' (torch's rule), got stride (2, 2)",
                 padding="same", stride=2),
    conv2d_error("dilation: expected >= 1, got 0", dilation=0),
    conv2d_error("dilation: expected >= 1, got -1", dilation=(1, -1)),
    conv2d_error("input: expected padded size (6, 6) >= dilated kernel size (7, 7), "
                 "got input shape (2, 3, 6, 6)", dilation=3),
    conv2d_error("input: expected padded size (6, 8) >= dilated kernel size (7, 3), "
                 "got input shape (2, 3, 6, 6)", dilation=(3, 1), padding=(0, 1)),
    conv2d_error("groups: expected >= 1, got 0", groups=0),
    conv2d_error("groups: expected a divisor of the input channels 3 (input (2, 3, 6, 6)), got 2",
                 groups=2, w=(4, 1, 3, 3)),
    conv2d_error("weight: expected out channels (dim 0) divisible by groups 3, "
                 "got shape (4, 1, 3, 3)", groups=3, w=(4, 1, 3, 3)),
    conv2d_error("weight: expected 1 input channels (dim 1) to match input (2, 3, 6, 6) "
                 "and groups 3, got shape (6, 3, 3, 3)", groups=3, w=(6, 3, 3, 3), b=(6,)),
]
# fmt: on


def conv2d_backward_error(
    pattern, x=(2, 3, 6, 6), w=(4, 3, 3, 3), dy=(2, 4, 4, 4), stride=1, padding=0, shared=False
):
    """conv2d_backward on ones of these shapes, valid but for what a row changes, and the
    regex its message must match after "[conv2d_backward] " (or "[conv2d] " too, for the
    checks it shares with the forward)."""
    args = (np.ones(dy), np.ones(x), np.ones(w), stride, padding)
    op = r"^\[conv2d(_backward)?\] " if shared else r"^\[conv2d_backward\] "
    return Bad("conv2d_backward", args, {}, ValueError, op + pattern, True)


# fmt: off
CONV2D_BACKWARD_ERRORS = [
    conv2d_backward_error(r"doutput: expected shape \(2, 4, 4, 4\) \(the forward output's\), "
                          r"got shape \(2, 4, 3, 4\)", dy=(2, 4, 3, 4)),
    conv2d_backward_error(r"doutput: expected shape \(2, 4, 2, 2\)", stride=2),
    conv2d_backward_error(r"doutput: expected shape \(2, 4, 4, 4\).*got shape \(4, 4, 4\)",
                          dy=(4, 4, 4)),
    # shape checks shared with the forward (one parameter struct, one validation)
    conv2d_backward_error(r"input: expected 3 dims \(C, H, W\) or 4 dims \(N, C, H, W\), got "
                          r"shape \(6, 6\)", x=(6, 6), shared=True),
    conv2d_backward_error(r"doutput: expected shape \(4, 4, 4\) \(the forward output's\), "
                          r"got shape \(1, 4, 4, 4\)", x=(3, 6, 6), dy=(1, 4, 4, 4)),
    conv2d_backward_error(r"weight: expected 3 input channels", w=(4, 2, 3, 3), shared=True),
    conv2d_backward_error(r"stride: expected >= 1, got 0", stride=0, shared=True),
    conv2d_backward_error(r"padding: expected >= 0, got -1", padding=-1, shared=True),
    conv2d_backward_error(r"input: expected padded size \(2, 2\) >= kernel size \(3, 3\)",
                          x=(2, 3, 2, 2), dy=(2, 4, 1, 1), shared=True),
]
# fmt: on

CONV2D = Op(
    "conv2d",
    make_conv2d,
    forward=lambda lib, s: lib.conv2d(s.x, s.w, s.b, s.stride, s.padding, s.dilation, s.groups),
    backward=lambda lib, s: lib.conv2d_backward(
        s.dy, s.x, s.w, s.stride, s.padding, s.dilation, s.groups
    ),
    wrt=("x", "w", "b"),
    forward_args=(Arg("x", "input"), Arg("w", "weight"), Arg("b", "bias", "optional")),
    backward_args=(Arg("dy", "doutput"), Arg("x", "input"), Arg("w", "weight")),
    cases=CONV_CASES,
    big=CONV_BIG,
    threads=CONV_THREADS,
    thread_values="ties",
    errors=CONV2D_ERRORS + CONV2D_BACKWARD_ERRORS,
)


# ---------------------------------------------------------------------------------------
# max_pool2d, avg_pool2d
# ---------------------------------------------------------------------------------------

POOL_CASES = [
    # (N, C, H, W, kernel, stride, padding)
    (1, 1, 4, 4, 2, None, 0),  # the derivation's pool, default stride = kernel
    (2, 3, 6, 6, 2, 2, 0),
    (2, 2, 7, 7, 3, 2, 0),  # overlapping windows, odd size, floored output
    (2, 2, 9, 8, 3, 2, 1),  # overlapping windows and padding (-inf, or zeros in the divisor)
    (1, 2, 5, 7, (2, 3), (1, 2), (1, 1)),  # non-square, (h, w) pairs
    (1, 1, 5, 5, 1, 1, 0),  # 1x1: the identity
    (3, 1, 6, 5, (3, 2), None, (1, 1)),
    (1, 1, 5, 5, 5, 1, 2),  # window as large as the input, maximal padding
    (2, 1, 7, 5, 2, 3, 0),  # stride > kernel: some cells never looked at
]
AVG_POOL_CASES = POOL_CASES + [
    (1, 2, 8, 9, 3, 1, 1),  # unit stride: the contiguous inner loops
    (2, 2, 9, 9, (5, 4), (1, 2), (2, 1)),
]
# (N, C, H, W, kernel, stride, padding, options): torch's options beyond the window
MAX_POOL_OPTION_CASES = [
    (2, 2, 9, 9, 3, 2, 1, dict(dilation=2)),  # taps 2 apart, the first window from the padding
    (1, 2, 7, 8, (3, 2), (2, 1), (1, 1), dict(dilation=(2, 3))),
    (2, 2, 7, 7, 2, 2, 0, dict(ceil_mode=True)),  # the 2x2 kernels, a last partial row/column
    (1, 2, 5, 35, 2, 2, 0, dict(ceil_mode=True)),  # ... the partial column after a vector step
    (2, 1, 1, 7, 2, None, 0, dict(ceil_mode=True)),  # one input row: every window partial
    (2, 2, 6, 6, 2, 2, 0, dict(ceil_mode=True)),  # even: ceil_mode changes nothing
    (1, 2, 5, 5, 2, 2, 1, dict(ceil_mode=True)),  # a 4th window would start in the padding
    (2, 1, 5, 6, 3, 2, 1, dict(dilation=2, ceil_mode=True)),
    (1, 1, 3, 10, 2, 3, 0, dict(ceil_mode=True)),  # odd shapes: windows hang past the input
    (1, 1, 4, 5, 2, 1, 1, dict(dilation=4)),  # dilation as large as the input
]
AVG_POOL_OPTION_CASES = [
    (2, 2, 6, 6, 3, 2, 1, dict(ceil_mode=True)),  # a last window hangs past the padding
    (2, 1, 5, 5, 2, 2, 1, dict(ceil_mode=True)),  # a 4th window would start in the padding
    (1, 2, 6, 7, 3, 2, 1, dict(count_include_pad=False)),
    (1, 2, 6, 7, 3, 2, 1, dict(ceil_mode=True, count_include_pad=False)),
    (1, 2, 7, 5, (3, 2), (2, 1), (1, 0), dict(divisor_override=5)),
    (1, 1, 5, 8, 3, 3, 1, dict(ceil_mode=True, count_include_pad=False, divisor_override=-3)),
    (2, 2, 7, 9, (2, 4), (3, 2), (1, 2), dict(ceil_mode=True)),  # odd shapes, (h, w) pairs
]
POOL_BIG = [(2, 16, 24, 24, 3, 2, 1)]  # enough work for the threaded path
MAX_POOL_THREADS = [
    (N, C, H, W, *pool)
    for N, C, H, W in [(64, 8, 26, 26), (8, 64, 33, 31)]
    for pool in [(2, None, 0), (3, 2, 1), (2, 1, 0)]
]
MAX_POOL_THREADS += [
    (64, 8, 25, 27, 2, None, 0, dict(ceil_mode=True)),
    (8, 64, 31, 31, 2, None, 0, dict(ceil_mode=True)),
    (8, 64, 33, 31, 3, 2, 1, dict(dilation=2, ceil_mode=True)),
]
AVG_POOL_THREADS = [
    (8, 16, 24, 24, 3, 2, 1),
    (8, 16, 24, 24, 2, None, 0),
    (8, 16, 25, 23, 3, 2, 1, dict(ceil_mode=True, count_include_pad=False)),
    (8, 16, 32, 32, 3, 2, 1, dict(ceil_mode=True)),  # a last window hangs past the padding
    (8, 16, 24, 24, 3, 2, 1, dict(divisor_override=7)),
]


def pool_case(case):
    """(N, C, H, W), kernel, stride, padding and the options of a pooling case."""
    N, C, H, W, kernel, stride, padding, *options = case
    return (N, C, H, W), kernel, stride, padding, (options[0] if options else {})


def make_max_pool2d(case, dtype, rng, values):
    shape, kernel, stride, padding, options = pool_case(case)
    x = distinct(rng, shape, dtype) if values == "smooth" else fill(rng, shape, dtype, values)
    y, idx = F.max_pool2d(x, kernel, stride, padding, **options)
    dy = fill(rng, y.shape, dtype, "normal" if values == "smooth" else values)
    return Sample(
        x=x, kernel=kernel, stride=stride, padding=padding, options=options, idx=idx, dy=dy
    )


def make_avg_pool2d(case, dtype, rng, values):
    shape, kernel, stride, padding, options = pool_case(case)
    x = fill(rng, shape, dtype, values)
    dy = fill(rng, F.avg_pool2d(x, kernel, stride, padding, **options).shape, dtype, values)
    return Sample(x=x, kernel=kernel, stride=stride, padding=padding, options=options, dy=dy)


def pool_error(message, x=(1, 1, 4, 4), kernel=2, stride=None, padding=0):
    """(x_shape, kernel, stride, padding, message): a valid pooling call but for what a row
    changes, and the message after "[op] "."""
    return x, kernel, stride, padding, message


# the same for both pools' forwards, and for avg_pool2d_backward, which checks x_shape and the
# parameters the same way
# fmt: off
POOL_ERRORS = [
    pool_error("input: expected 3 dims (C, H, W) or 4 dims (N, C, H, W), got shape (4, 4)",
               x=(4, 4)),
    pool_error("input: expected 3 dims (C, H, W) or 4 dims (N, C, H, W), got shape "
               "(1, 1, 1, 4, 4)", x=(1, 1, 1, 4, 4)),
    # an empty batch works (torch's), an empty plane or channel dim does not
    pool_error("input: expected every dim but the batch >= 1, got shape (1, 0, 4, 4)",
               x=(1, 0, 4, 4)),
    pool_error("input: expected every dim but the batch >= 1, got shape (1, 1, 4, 0)",
               x=(1, 1, 4, 0)),
    pool_error("input: expected every dim >= 1, got shape (1, 0, 4)", x=(1, 0, 4)),  # unbatched
    pool_error("kernel_size: expected >= 1, got 0", kernel=0),
    pool_error("kernel_size: expected >= 1, got -1", kernel=(2, -1)),
    pool_error("stride: expected >= 1, got 0", stride=0),
    pool_error("stride: expected >= 1, got 0", stride=(0, 1)),
    pool_error("padding: expected >= 0, got -1", stride=2, padding=-1),
    pool_error("padding: expected at most half the kernel size (2, 2), got (2, 2)",
               stride=2, padding=2),
    pool_error("padding: expected at most half the kernel size (3, 2), got (1, 2)",
               x=(1, 1, 6, 6), kernel=(3, 2), stride=1, padding=(1, 2)),
    pool_error("input: expected padded size (3, 3) >= kernel size (5, 5), "
               "got input shape (1, 1, 3, 3)", x=(1, 1, 3, 3), kernel=5),
    pool_error("input: expected padded size (5, 10) >= kernel size (6, 2), "
               "got input shape (1, 1, 3, 8)",
               x=(1, 1, 3, 8), kernel=(6, 2), stride=1, padding=(1, 1)),
    pool_error("padding: expected at most half the kernel size (3, 3), got (2, 2)",
               x=(1, 1, 6, 6), kernel=3, stride=2, padding=2),
]
# fmt: on


def max_pool2d_backward_error(message, dy=(1, 1, 2, 2), idx=(1, 1, 2, 2), x=(1, 1, 4, 4)):
    """max_pool2d_backward on ones, zero indices and x_shape x, valid but for what a row
    changes, and the message after "[max_pool2d_backward] "."""
    args = (np.ones(dy), np.zeros(idx, np.int64), x)
    return Bad("max_pool2d_backward", args, {}, ValueError, "[max_pool2d_backward] " + message)


# fmt: off
MAX_POOL2D_BACKWARD_ERRORS = [
    max_pool2d_backward_error("indices: expected shape (1, 1, 2, 2) (doutput's), "
                              "got shape (1, 1, 2, 1)", idx=(1, 1, 2, 1)),
    max_pool2d_backward_error("indices: expected shape (1, 1, 2, 2) (doutput's), got shape (1, 4)",
                              idx=(1, 4)),
    max_pool2d_backward_error("doutput: expected 4 dims (N, C, P, Q) as x_shape (1, 1, 4, 4), "
                              "got shape (1, 2, 2)", dy=(1, 2, 2), idx=(1, 2, 2)),
    max_pool2d_backward_error("doutput: expected 3 dims (C, P, Q) as x_shape (1, 4, 4), "
                              "got shape (1, 1, 2, 2)", x=(1, 4, 4)),
    max_pool2d_backward_error("x_shape: expected 3 dims (C, H, W) or 4 dims (N, C, H, W), "
                              "got shape (4, 4)", x=(4, 4)),
    max_pool2d_backward_error("x_shape: expected every dim but the batch >= 1, got shape "
                              "(1, 1, 0, 4)", x=(1, 1, 0, 4)),
    max_pool2d_backward_error("x_shape: expected every dim >= 0, got shape (1, 1, -4, 4)",
                              x=(1, 1, -4, 4)),
    max_pool2d_backward_error("doutput: expected C = (2) to match x_shape (2, 4, 4), "
                              "got shape (1, 2, 2)", dy=(1, 2, 2), idx=(1, 2, 2), x=(2, 4, 4)),
    max_pool2d_backward_error("doutput: expected (N, C) = (2, 1) to match x_shape (2, 1, 4, 4), "
                              "got shape (1, 1, 2, 2)", x=(2, 1, 4, 4)),
    max_pool2d_backward_error("doutput: expected (N, C) = (1, 2) to match x_shape (1, 2, 4, 4), "
                              "got shape (1, 3, 2, 2)",
                              dy=(1, 3, 2, 2), idx=(1, 3, 2, 2), x=(1, 2, 4, 4)),
]
# fmt: on


def avg_pool2d_backward_error(
    message, dy=(1, 1, 2, 2), x=(1, 1, 4, 4), kernel=2, stride=None, padding=0
):
    """avg_pool2d_backward on ones, valid but for what a row changes, and the message after
    "[avg_pool2d_backward] "."""
    args = (np.ones(dy), x, kernel, stride, padding)
    return Bad("avg_pool2d_backward", args, {}, ValueError, "[avg_pool2d_backward] " + message)


# the forward's checks, on x_shape in place of the input, then the backward's own
# fmt: off
AVG_POOL2D_BACKWARD_ERRORS = [
    avg_pool2d_backward_error(e.replace("input shape", "x_shape").replace("input", "x_shape"),
                              x=x, kernel=k, stride=s, padding=p, dy=(1, 1, 1, 1))
    for x, k, s, p, e in POOL_ERRORS
] + [
    avg_pool2d_backward_error("doutput: expected shape (1, 1, 2, 2) (the forward output's), "
                              "got shape (1, 1, 2, 1)", dy=(1, 1, 2, 1)),
    avg_pool2d_backward_error("doutput: expected shape (1, 1, 3, 3) (the forward output's), "
                              "got shape (1, 1, 2, 2)", stride=1),
    avg_pool2d_backward_error("doutput: expected shape (1, 1, 2, 2) (the forward output's), "
                              "got shape (2, 1, 2, 2)", dy=(2, 1, 2, 2)),
    avg_pool2d_backward_error("doutput: expected shape (1, 1, 2, 2) (the forward output's), "
                              "got shape (1, 4)", dy=(1, 4)),
    avg_pool2d_backward_error("doutput: expected shape (1, 2, 2) (the forward output's), "
                              "got shape (1, 1, 2, 2)", x=(1, 4, 4)),
    avg_pool2d_backward_error("x_shape: expected every dim >= 0, got shape (1, 1, -4, 4)",
                              x=(1, 1, -4, 4)),
]
# fmt: on


def pool_errors(op):
    return [
        Bad(op, (np.ones(x), k, s, p), {}, ValueError, f"[{op}] {e}")
        for x, k, s, p, e in POOL_ERRORS
    ]


# torch's options: ceil_mode for both pools, dilation for max_pool2d
# fmt: off
MAX_POOL2D_OPTION_ERRORS = [
    Bad("max_pool2d", (np.ones((1, 1, 4, 4)), 3, 1), dict(dilation=2), ValueError,
        "[max_pool2d] input: expected padded size (4, 4) >= dilated kernel size (5, 5), "
        "got input shape (1, 1, 4, 4)"),
    Bad("max_pool2d", (np.ones((1, 1, 3, 3)), 5, 2), dict(ceil_mode=True), ValueError,
        "[max_pool2d] input: expected padded size (3, 3) + stride - 1 (4, 4) >= kernel size "
        "(5, 5), got input shape (1, 1, 3, 3)"),
    Bad("max_pool2d", (np.ones((1, 1, 4, 4)), 2), dict(dilation=0), ValueError,
        "[max_pool2d] dilation: expected >= 1, got 0"),
    Bad("max_pool2d", (np.ones((1, 1, 4, 4)), 2), dict(dilation=(1, -2)), ValueError,
        "[max_pool2d] dilation: expected >= 1, got -2"),
    Bad("max_pool2d", (np.ones((1, 1, 4, 4)), 3, 1, 2), dict(dilation=2), ValueError,
        "[max_pool2d] padding: expected at most half the kernel size (3, 3), got (2, 2)"),
    Bad("max_pool2d", (np.ones((1, 1, 4, 4)), 3), dict(dilation=2**47), ValueError,
        "[max_pool2d] dilation: expected a dilated kernel size (dilation * (kernel_size - 1) "
        "+ 1) of at most 2^48, got kernel_size (3, 3) and dilation (140737488355328, "
        "140737488355328)"),
    # taps -1 and 3 of a 3-row input: torch reports -inf at an index outside the plane
    Bad("max_pool2d", (np.ones((1, 1, 3, 5)), 2, 1, 1), dict(dilation=(4, 1)), ValueError,
        "[max_pool2d] input: expected every window to have a cell inside the input, got the "
        "window of output row 0 with taps -1, 3, ... (kernel_size 2, dilation 4, padding 1) "
        "missing its 3 rows, input shape (1, 1, 3, 5)"),
    Bad("max_pool2d", (np.ones((1, 1, 4, 4)), 2), dict(ceil_mode=1), TypeError,
        "[max_pool2d] ceil_mode: expected True or False, got 1"),
    Bad("max_pool2d", (np.ones((1, 1, 4, 4)), 2), dict(dilation=1.5), TypeError,
        "[max_pool2d] dilation: expected an int or a pair of ints, got 1.5"),
]
# fmt: on


def avg_pool2d_option_errors(op):
    """avg_pool2d's option errors, for the forward (on ones) or the backward (x_shape)."""
    backward = op == "avg_pool2d_backward"
    name = "x_shape" if backward else "input"

    def bad(x, args, kwargs, exception, message):
        first = (np.ones((1, 1, 1, 1)), x) if backward else (np.ones(x),)
        return Bad(op, first + args, kwargs, exception, f"[{op}] {message}")

    # fmt: off
    return [
        bad((1, 1, 4, 4), (2,), dict(divisor_override=0), ValueError,
            "divisor_override: expected a nonzero int or None, got 0"),
        bad((1, 1, 4, 4), (2,), dict(divisor_override=1.5), TypeError,
            "divisor_override: expected an int or None, got 1.5"),
        bad((1, 1, 4, 4), (2,), dict(divisor_override=True), TypeError,
            "divisor_override: expected an int or None, got True"),
        bad((1, 1, 4, 4), (2,), dict(count_include_pad=0), TypeError,
            "count_include_pad: expected True or False, got 0"),
        bad((1, 1, 4, 4), (2,), dict(ceil_mode="yes"), TypeError,
            "ceil_mode: expected True or False, got 'yes'"),
        bad((1, 1, 3, 3), (5, 2), dict(ceil_mode=True), ValueError,
            f"{name}: expected padded size (3, 3) + stride - 1 (4, 4) >= kernel size (5, 5), "
            f"got {name}{' ' if backward else ' shape '}(1, 1, 3, 3)"),
        bad((1, 1, 4, 4), (2, 2, 2), dict(ceil_mode=True), ValueError,
            "padding: expected at most half the kernel size (2, 2), got (2, 2)"),
    ]
    # fmt: on


MAX_POOL2D = Op(
    "max_pool2d",
    make_max_pool2d,
    forward=lambda lib, s: lib.max_pool2d(s.x, s.kernel, s.stride, s.padding, **s.options),
    backward=lambda lib, s: (lib.max_pool2d_backward(s.dy, s.idx, s.x.shape),),
    wrt=("x",),
    forward_args=(Arg("x", "input"),),
    backward_args=(Arg("dy", "doutput"), Arg("idx", "indices", "int")),
    cases=POOL_CASES + MAX_POOL_OPTION_CASES,
    big=POOL_BIG,
    threads=MAX_POOL_THREADS,
    thread_values="special",
    errors=pool_errors("max_pool2d") + MAX_POOL2D_OPTION_ERRORS + MAX_POOL2D_BACKWARD_ERRORS,
)

AVG_POOL2D = Op(
    "avg_pool2d",
    make_avg_pool2d,
    forward=lambda lib, s: lib.avg_pool2d(s.x, s.kernel, s.stride, s.padding, **s.options),
    backward=lambda lib, s: (
        lib.avg_pool2d_backward(s.dy, s.x.shape, s.kernel, s.stride, s.padding, **s.options),
    ),
    wrt=("x",),
    forward_args=(Arg("x", "input"),),
    backward_args=(Arg("dy", "doutput"),),
    cases=AVG_POOL_CASES + AVG_POOL_OPTION_CASES,
    big=POOL_BIG,
    threads=AVG_POOL_THREADS,
    errors=pool_errors("avg_pool2d")
    + avg_pool2d_option_errors("avg_pool2d")
    + AVG_POOL2D_BACKWARD_ERRORS
    + avg_pool2d_option_errors("avg_pool2d_backward"),
)


# ---------------------------------------------------------------------------------------
# adaptive_avg_pool2d
# ---------------------------------------------------------------------------------------

# (x shape, output_size): torch's windows floor(i*L/O) to ceil((i+1)*L/O)
ADAPTIVE_POOL_CASES = [
    ((1, 1, 4, 4), 1),  # the global pool: a plain sum per plane
    ((2, 3, 7, 9), (3, 5)),  # windows of unequal sizes that share a cell
    ((2, 2, 7, 9), (None, 2)),  # None keeps the input's height
    ((1, 2, 4, 3), (7, 5)),  # output larger than the input: windows repeat cells
    ((2, 2, 6, 6), 2),  # windows that tile the input: avg_pool2d's
    ((1, 3, 5, 7), (1, 4)),  # one output row, not the global pool
    ((2, 1, 5, 5), (None, None)),  # the identity
    ((1, 2, 10, 1), (3, None)),
    ((3, 5, 6), (4, 2)),  # unbatched
    ((0, 2, 5, 5), 3),  # an empty batch
]
ADAPTIVE_POOL_BIG = [((2, 16, 24, 24), (5, 7)), ((4, 64, 24, 24), 1)]  # the threaded paths
ADAPTIVE_POOL_THREADS = [
    ((8, 16, 24, 24), (5, 7)),
    ((8, 16, 24, 24), 1),
    ((8, 16, 13, 11), (17, 4)),
]


def make_adaptive_avg_pool2d(case, dtype, rng, values):
    shape, output_size = case
    x = fill(rng, shape, dtype, values)
    dy = fill(rng, F.adaptive_avg_pool2d(x, output_size).shape, dtype, values)
    return Sample(x=x, output_size=output_size, dy=dy)


def adaptive_avg_pool2d_errors():
    """The forward's and the backward's refusals (the backward checks x_shape and output_size
    as the forward checks the input)."""
    out = []
    for op in ("adaptive_avg_pool2d", "adaptive_avg_pool2d_backward"):
        backward = op.endswith("_backward")
        name = "x_shape" if backward else "input"
        shape_ = "" if backward else " shape"

        def bad(x, output_size, exception, message, op=op, backward=backward):
            args = (np.ones((1, 1, 1, 1)), x) if backward else (np.ones(x),)
            return Bad(op, args + (output_size,), {}, exception, f"[{op}] {message}")

        # fmt: off
        out += [
            bad((4, 4), 2, ValueError,
                f"{name}: expected 3 dims (C, H, W) or 4 dims (N, C, H, W), got shape (4, 4)"),
            bad((1, 0, 4, 4), 2, ValueError,
                f"{name}: expected every dim but the batch >= 1, got shape (1, 0, 4, 4)"),
            bad((1, 4, 0), 2, ValueError,
                f"{name}: expected every dim >= 1, got shape (1, 4, 0)"),
            bad((1, 1, 4, 4), 0, ValueError,
                "output_size: expected sizes >= 1 or None, got (0, 0)"),
            bad((1, 1, 4, 4), (2, -1), ValueError,
                "output_size: expected sizes >= 1 or None, got (2, -1)"),
            bad((1, 1, 4, 4), (None, 0), ValueError,
                "output_size: expected sizes >= 1 or None, got (None, 0)"),
            bad((1, 1, 4, 4), (2**61, 1), ValueError,
                "output_size: expected output size * input size at most 2^62 along each axis, "
                f"got output_size (2305843009213693952, 1) for {name}{shape_} (1, 1, 4, 4)"),
            bad((1, 1, 4, 4), 2**40, ValueError,
                "output: expected at most 2^48 elements, got shape (1, 1, 1099511627776, "
                f"1099511627776) from {name}{shape_} (1, 1, 4, 4) and output_size "
                "(1099511627776, 1099511627776)"),
            bad((1, 1, 4, 4), 2**63, ValueError, "output_size: expected a 64-bit integer"),
        ]
        for output_size in (2.5, None, (1, 2, 3), (True, 2), "ab", (1.5, None), [2]):
            out.append(bad((1, 1, 4, 4), output_size, TypeError,
                           "output_size: expected an int, or a pair of ints or None, got "
                           + repr(output_size)))
        # fmt: on
    # the backward's own: doutput must be the forward output's shape

    def bad_dy(dy, x, output_size, message):
        return Bad(
            "adaptive_avg_pool2d_backward",
            (np.ones(dy), x, output_size),
            {},
            ValueError,
            "[adaptive_avg_pool2d_backward] " + message,
        )

    # fmt: off
    out += [
        bad_dy((1, 1, 2, 1), (1, 1, 4, 4), 2, "doutput: expected shape (1, 1, 2, 2) "
               "(the forward output's), got shape (1, 1, 2, 1)"),
        bad_dy((1, 1, 4, 2), (1, 1, 4, 4), (None, 3), "doutput: expected shape (1, 1, 4, 3) "
               "(the forward output's), got shape (1, 1, 4, 2)"),
        bad_dy((1, 1, 2, 2), (1, 4, 4), 2, "doutput: expected shape (1, 2, 2) "
               "(the forward output's), got shape (1, 1, 2, 2)"),
        bad_dy((1, 1, 2, 2), (1, 1, -4, 4), 2,
               "x_shape: expected every dim >= 0, got shape (1, 1, -4, 4)"),
    ]
    # fmt: on
    return out


ADAPTIVE_AVG_POOL2D = Op(
    "adaptive_avg_pool2d",
    make_adaptive_avg_pool2d,
    forward=lambda lib, s: lib.adaptive_avg_pool2d(s.x, s.output_size),
    backward=lambda lib, s: (lib.adaptive_avg_pool2d_backward(s.dy, s.x.shape, s.output_size),),
    wrt=("x",),
    forward_args=(Arg("x", "input"),),
    backward_args=(Arg("dy", "doutput"),),
    cases=ADAPTIVE_POOL_CASES,
    big=ADAPTIVE_POOL_BIG,
    threads=ADAPTIVE_POOL_THREADS,
    errors=adaptive_avg_pool2d_errors(),
)


# ---------------------------------------------------------------------------------------
# batch_norm2d
# ---------------------------------------------------------------------------------------

# (x shape, training, affine, track_running_stats, momentum, eps)
BATCH_NORM_CASES = [
    ((2, 3, 4, 5), True, True, True, 0.1, 1e-5),
    ((3, 4, 5, 6), True, True, True, 0.3, 1e-3),  # every array argument
    ((2, 3, 4, 5), False, True, True, 0.1, 1e-5),  # evaluation: the running statistics
    ((4, 2, 3, 3), True, False, False, 0.1, 1e-5),  # affine=False, no running statistics
    ((2, 2, 3, 3), False, False, True, 0.5, 1e-2),
    # three values per channel, momentum 1 (with two, xhat is +-1 whatever x: dx is ~0, all
    # cancellation)
    ((1, 3, 1, 3), True, True, True, 1.0, 1e-5),
    ((5, 2, 1, 1), True, True, True, 0.0, 1e-5),  # one value per plane, momentum 0
    ((1, 1, 1, 1), False, True, True, 0.1, 1e-5),  # one value: fine in evaluation
    ((0, 3, 2, 2), True, True, True, 0.1, 1e-5),  # an empty batch
]
BATCH_NORM_BIG = [
    ((16, 32, 16, 16), True, True, True, 0.1, 1e-5),
    ((16, 32, 16, 16), False, True, True, 0.1, 1e-5),
]
BATCH_NORM_THREADS = [
    ((8, 16, 24, 24), True, True, True, 0.1, 1e-5),
    ((8, 16, 24, 24), False, True, True, 0.1, 1e-5),
]


def make_batch_norm2d(case, dtype, rng, values):
    """x with its channels' own offsets and scales; mean and invstd for the backward: the
    batch's (training) or the running statistics' (evaluation)."""
    shape, training, affine, track, momentum, eps = case
    C = shape[1]
    offsets, scales = rng.standard_normal(C) * 2, 0.5 + rng.random(C) * 2
    x = (fill(rng, shape, dtype, values) * scales[:, None, None] + offsets[:, None, None]).astype(
        dtype
    )
    w, b = (fill(rng, (C,), dtype, values) if affine else None for _ in range(2))
    rm = fill(rng, (C,), dtype, values) if track else None
    rv = (0.5 + rng.random(C)).astype(dtype) if track else None
    if training:
        _, mean, invstd = F.batch_norm2d(x, w, b, None, None, True, momentum, eps)
    else:
        mean, invstd = rm, (1 / np.sqrt(rv.astype(np.float64) + eps)).astype(dtype)
    dy = fill(rng, shape, dtype, values)
    return Sample(
        x=x,
        w=w,
        b=b,
        rm=rm,
        rv=rv,
        training=training,
        momentum=momentum,
        eps=eps,
        mean=mean,
        invstd=invstd,
        dy=dy,
    )


def _native_copy(a):
    """A new C-contiguous array of a's values, in native byte order: what batch_norm2d can
    update in place."""
    a = np.asarray(a)
    return np.array(
        a, dtype=a.dtype.newbyteorder("=") if a.dtype.kind == "f" else a.dtype, order="C"
    )


def batch_norm2d_call(lib, s):
    """(y, save_mean, save_invstd, running_mean, running_var): the running statistics are
    updated in place, so the call gets copies and returns them."""
    rm, rv = (None if a is None else _native_copy(a) for a in (s.rm, s.rv))
    y, mean, invstd = lib.batch_norm2d(s.x, s.w, s.b, rm, rv, s.training, s.momentum, s.eps)
    if rm is None:
        return y, mean, invstd
    return y, mean, invstd, rm, rv


def batch_norm2d_error(
    message,
    x=(2, 3, 4, 4),
    w=(3,),
    b=(3,),
    rm=(3,),
    rv=(3,),
    training=True,
    momentum=0.1,
    eps=1e-5,
    exception=ValueError,
):
    args = [np.ones(x)] + [None if a is None else np.ones(a) for a in (w, b, rm, rv)]
    return Bad(
        "batch_norm2d", (*args, training, momentum, eps), {}, exception, "[batch_norm2d] " + message
    )


def batch_norm2d_backward_error(
    message, dy=(2, 3, 4, 4), x=(2, 3, 4, 4), w=(3,), mean=(3,), invstd=(3,), exception=ValueError
):
    args = [np.ones(dy), np.ones(x)] + [
        None if a is None else np.ones(a) for a in (w, mean, invstd)
    ]
    return Bad(
        "batch_norm2d_backward", tuple(args), {}, exception, "[batch_norm2d_backward] " + message
    )


# fmt: off
BATCH_NORM_ERRORS = [
    batch_norm2d_error("input: expected 4 dims (N, C, H, W), got shape (3, 4, 4)", x=(3, 4, 4)),
    batch_norm2d_error("input: expected every dim but the batch >= 1, got shape (2, 3, 0, 4)",
                       x=(2, 3, 0, 4)),
    batch_norm2d_error("weight: expected shape (3,) (one value per channel), got shape (4,)",
                       w=(4,)),
    batch_norm2d_error("bias: expected shape (3,) (one value per channel), got shape (3, 1)",
                       b=(3, 1)),
    batch_norm2d_error("running_mean: expected shape (3,) (one value per channel), got shape ()",
                       rm=()),
    batch_norm2d_error("running_var: expected shape (3,) (one value per channel), got shape (2,)",
                       rv=(2,)),
    batch_norm2d_error("running_var: expected an array with running_mean, got None", rv=None),
    batch_norm2d_error("running_mean: expected an array with running_var, got None", rm=None),
    batch_norm2d_error("running_mean: expected the running statistics in evaluation mode "
                       "(training=False), got None", rm=None, rv=None, training=False),
    batch_norm2d_error("input: expected more than 1 value per channel when training, got shape "
                       "(1, 3, 1, 1)", x=(1, 3, 1, 1)),
    batch_norm2d_error("momentum: expected a number in [0, 1], got 1.5", momentum=1.5),
    batch_norm2d_error("momentum: expected a number in [0, 1], got nan", momentum=float("nan")),
    batch_norm2d_error("eps: expected a finite number > 0, got 0", eps=0.0),
    batch_norm2d_error("eps: expected a finite number > 0, got -1", eps=-1),
    batch_norm2d_error("momentum: expected a float, got None", momentum=None, exception=TypeError),
    batch_norm2d_error("training: expected True or False, got 1", training=1, exception=TypeError),
    Bad("batch_norm2d", (np.ones((2, 3, 4, 4)), None, None, np.ones(3)[::2].repeat(2)[:3],
                         np.ones(6)[::2], True), {}, ValueError,
        "[batch_norm2d] running_var: expected a writable C-contiguous array of native byte order "
        "(updated in place when training), got another layout"),
    batch_norm2d_backward_error("doutput: expected shape (2, 3, 4, 4) (input's), got shape "
                                "(2, 3, 4, 5)", dy=(2, 3, 4, 5)),
    batch_norm2d_backward_error("input: expected 4 dims (N, C, H, W), got shape (3, 4)",
                                dy=(3, 4), x=(3, 4)),
    batch_norm2d_backward_error("weight: expected shape (3,) (one value per channel), got shape "
                                "(2,)", w=(2,)),
    batch_norm2d_backward_error("mean: expected shape (3,) (one value per channel), got shape "
                                "(0,)", mean=(0,)),
    batch_norm2d_backward_error("invstd: expected shape (3,) (one value per channel), got shape "
                                "(3, 3)", invstd=(3, 3)),
]
# fmt: on

BATCH_NORM2D = Op(
    "batch_norm2d",
    make_batch_norm2d,
    forward=batch_norm2d_call,
    backward=lambda lib, s: lib.batch_norm2d_backward(s.dy, s.x, s.w, s.mean, s.invstd, s.training),
    wrt=("x", "w", "b"),
    forward_args=(
        Arg("x", "input"),
        Arg("w", "weight", "optional"),
        Arg("b", "bias", "optional"),
        Arg("rm", "running_mean", "optional"),
        Arg("rv", "running_var", "optional"),
    ),
    backward_args=(
        Arg("dy", "doutput"),
        Arg("x", "input"),
        Arg("w", "weight", "optional"),
        Arg("mean", "mean"),
        Arg("invstd", "invstd"),
    ),
    cases=BATCH_NORM_CASES,
    big=BATCH_NORM_BIG,
    threads=BATCH_NORM_THREADS,
    errors=BATCH_NORM_ERRORS,
)


# ---------------------------------------------------------------------------------------
# relu, sigmoid, tanh, leaky_relu, gelu, silu, dropout: any shape
# ---------------------------------------------------------------------------------------

ELEMENTWISE_SHAPES = [(7,), (3, 4), (2, 3, 4, 5), (1, 1, 1, 1), (0, 3), ()]
ELEMENTWISE_BIG = [(64, 64, 20)]
ELEMENTWISE_THREADS = [(7, 100_003), (64, 64, 20)]


def elementwise(name, saved, scale):
    """relu and silu (backward from their input z), sigmoid and tanh (backward from their
    output a)."""

    def make(shape, dtype, rng, values):
        z = fill(rng, shape, dtype, values, scale)
        if name == "relu" and values == "normal" and z.size >= 3:
            z.reshape(-1)[:3] = [0.0, -0.0, np.nan]  # the kink (gradient 0) and NaN
        dy = fill(rng, shape, dtype, "normal" if values == "smooth" else values)
        s = Sample(z=z, dy=dy)
        return s.replace(a=getattr(F, name)(z)) if saved == "a" else s

    def mismatched(saved_shape, dy_shape, shown):
        message = f"[{name}_backward] {saved}: expected shape {shown} (doutput's), got shape "
        return Bad(
            name + "_backward",
            (np.ones(dy_shape), np.ones(saved_shape)),
            {},
            ValueError,
            message + str(saved_shape),
        )

    return Op(
        name,
        make,
        forward=lambda lib, s: getattr(lib, name)(s.z),
        backward=lambda lib, s: (getattr(lib, name + "_backward")(s.dy, s[saved]),),
        wrt=("z",),
        forward_args=(Arg("z", "input"),),
        backward_args=(Arg("dy", "doutput"), Arg(saved, saved)),
        cases=ELEMENTWISE_SHAPES,
        big=ELEMENTWISE_BIG,
        threads=ELEMENTWISE_THREADS,
        thread_values="special",
        errors=[mismatched((3, 2), (2, 3), "(2, 3)"), mismatched((2, 3), (6,), "(6,)")],
    )


RELU = elementwise("relu", "z", 1.0)
SIGMOID = elementwise("sigmoid", "a", 4.0)
TANH = elementwise("tanh", "a", 3.0)


def elementwise_with_option(name, option, values, scale, errors):
    """leaky_relu (negative_slope) and gelu (approximate): activations with an option, the
    backward from the input z. A case is (shape, option value)."""

    def make(case, dtype, rng, values_kind):
        shape, value = case
        z = fill(rng, shape, dtype, values_kind, scale)
        if values_kind == "normal" and z.size >= 3:
            z.reshape(-1)[:3] = [0.0, -0.0, np.nan]  # the kink, the sign of zero, NaN
        dy = fill(rng, shape, dtype, "normal" if values_kind == "smooth" else values_kind)
        return Sample(z=z, dy=dy, **{option: value})

    def mismatched(z_shape, dy_shape, shown):
        message = f"[{name}_backward] z: expected shape {shown} (doutput's), got shape "
        return Bad(
            name + "_backward",
            (np.ones(dy_shape), np.ones(z_shape)),
            {},
            ValueError,
            message + str(z_shape),
        )

    return Op(
        name,
        make,
        forward=lambda lib, s: getattr(lib, name)(s.z, s[option]),
        backward=lambda lib, s: (getattr(lib, name + "_backward")(s.dy, s.z, s[option]),),
        wrt=("z",),
        forward_args=(Arg("z", "input"),),
        backward_args=(Arg("dy", "doutput"), Arg("z", "z")),
        cases=[(shape, v) for shape in ELEMENTWISE_SHAPES for v in values[:1]]
        + [((3, 4, 5), v) for v in values[1:]],
        big=[(shape, v) for shape in ELEMENTWISE_BIG for v in values],
        threads=[(shape, v) for shape in ELEMENTWISE_THREADS for v in values],
        thread_values="special",
        errors=[mismatched((3, 2), (2, 3), "(2, 3)"), mismatched((2, 3), (6,), "(6,)")] + errors,
    )


def option_errors(name, option, bad_values):
    """The option refused by the forward and the backward alike: (value, exception, text)."""
    z = np.ones((2, 3))
    return [
        Bad(fn, args, {option: value}, exception, f"[{fn}] {option}: {text}")
        for fn, args in ((name, (z,)), (name + "_backward", (z, z)))
        for value, exception, text in bad_values
    ]


LEAKY_RELU = elementwise_with_option(
    "leaky_relu",
    "negative_slope",
    [0.01, 0.2, -0.5, 0.0, 1.5, 3],  # torch's default first; any finite number
    1.0,
    option_errors(
        "leaky_relu",
        "negative_slope",
        [
            (np.inf, ValueError, "expected a finite float, got inf"),
            (np.nan, ValueError, "expected a finite float, got nan"),
            ("0.1", TypeError, "expected a float, got '0.1'"),
            (None, TypeError, "expected a float, got None"),
        ],
    ),
)
GELU = elementwise_with_option(
    "gelu",
    "approximate",
    ["none", "tanh"],
    3.0,
    option_errors(
        "gelu",
        "approximate",
        [
            ("x", ValueError, "expected 'none' or 'tanh', got 'x'"),
            ("Tanh", ValueError, "expected 'none' or 'tanh', got 'Tanh'"),
            (None, TypeError, "expected 'none' or 'tanh', got None"),
            (1, TypeError, "expected 'none' or 'tanh', got 1"),
        ],
    ),
)
SILU = elementwise("silu", "z", 4.0)


DROPOUT_PS = [0.1, 0.5, 0.9, 1 / 3]
DROPOUT_CASES = [
    (shape, p) for shape in [(7,), (3, 4), (2, 3, 4, 5), (1,), (0, 3), ()] for p in DROPOUT_PS
] + [((3, 4, 5), 0.0), ((3, 4, 5), 1.0)]
DROPOUT_BIG = [((64, 64, 20), p) for p in DROPOUT_PS]


def make_dropout(case, dtype, rng, values):
    shape, p = case
    x = fill(rng, shape, dtype, values)
    y, mask = F.dropout(x, p, 17)
    return Sample(x=x, p=p, seed=17, mask=mask, dy=fill(rng, shape, dtype, values))


def dropout_oracle(lib, s):
    """y = x * mask / (1 - p) with the mask the oracle draws from (seed, flat index)."""
    mask = ref.dropout_mask(np.shape(s.x), s.p, s.seed)
    return ref.dropout(s.x, mask, s.p), mask


DROPOUT = Op(
    "dropout",
    make_dropout,
    forward=lambda lib, s: lib.dropout(s.x, s.p, s.seed),
    oracle=dropout_oracle,
    backward=lambda lib, s: (lib.dropout_backward(s.dy, s.mask, s.p),),
    wrt=("x",),
    forward_args=(Arg("x", "input"),),
    backward_args=(Arg("dy", "doutput"), Arg("mask", "mask", "bool")),
    cases=DROPOUT_CASES,
    big=DROPOUT_BIG,
    threads=[((64, 64, 20), 0.3)],
    errors=[
        Bad(
            "dropout_backward",
            (np.ones(dy), np.ones(mask, bool), 0.5),
            {},
            ValueError,
            f"[dropout_backward] mask: expected shape {dy} (doutput's), got shape {mask}",
        )
        for dy, mask in [((2, 3), (3, 2)), ((6,), ())]
    ],
)


# ---------------------------------------------------------------------------------------
# linear, flatten
# ---------------------------------------------------------------------------------------

LINEAR_CASES = [
    # (x shape, out_features[, bias])
    ((1, 1), 1),
    ((5, 4), 3),
    ((5, 4), 3, False),  # b=None: no bias
    ((2, 3, 4), 6),  # extra leading dims
    ((2, 3, 4), 6, False),
    ((4,), 2),  # a single vector
    ((8, 17), 1),
]
LINEAR_BIG = [((64, 300), 40)]  # enough work for the threaded path


def make_linear(case, dtype, rng, values):
    x_shape, OUT, *bias = case
    IN = x_shape[-1]
    return Sample(
        x=fill(rng, x_shape, dtype, values),
        w=fill(rng, (OUT, IN), dtype, values),
        b=fill(rng, (OUT,), dtype, values) if bias in ([], [True]) else None,
        dy=fill(rng, x_shape[:-1] + (OUT,), dtype, values),
    )


def linear_error(message, x=(2, 3), w=(4, 3), b=(4,)):
    """linear on ones of these shapes, a valid call but for what a row changes, and the
    message after "[linear] "."""
    args = (np.ones(x), np.ones(w), np.zeros(b))
    return Bad("linear", args, {}, ValueError, "[linear] " + message)


# fmt: off
LINEAR_ERRORS = [
    linear_error("input: expected at least 1 dim (*, in_features), got shape ()", x=()),
    linear_error("weight: expected 2 dims (out_features, in_features), got shape (3,)", w=(3,)),
    linear_error("weight: expected 2 dims (out_features, in_features), got shape (1, 4, 3)",
                 w=(1, 4, 3)),
    linear_error("weight: expected in_features (dim 1) = 3 to match input (2, 3), got shape (4, 5)",
                 w=(4, 5)),
    linear_error("weight: expected in_features (dim 1) = 3 to match input (2, 5, 3), "
                 "got shape (4, 5)", x=(2, 5, 3), w=(4, 5)),
    linear_error("weight: expected in_features (dim 1) = 3 to match input (2, 3), got shape (3, 4)",
                 w=(3, 4)),
    linear_error("weight: expected every dim >= 1, got shape (0, 3)", w=(0, 3), b=(0,)),
    linear_error("weight: expected every dim >= 1, got shape (4, 0)", x=(2, 0), w=(4, 0)),
    linear_error("bias: expected shape (4,), got shape (3,)", b=(3,)),
    linear_error("bias: expected shape (4,), got shape (1, 4)", b=(1, 4)),
    linear_error("bias: expected shape (4,), got shape ()", b=()),
]
# fmt: on


def linear_backward_error(pattern, dy=(2, 4), x=(2, 3), w=(4, 3), shared=False):
    """linear_backward on ones of these shapes, valid but for what a row changes, and the
    regex its message must match after "[linear_backward] " (or "[linear] " too, for the
    checks it shares with the forward)."""
    args = (np.ones(dy), np.ones(x), np.ones(w))
    op = r"^\[linear(_backward)?\] " if shared else r"^\[linear_backward\] "
    return Bad("linear_backward", args, {}, ValueError, op + pattern, True)


# fmt: off
LINEAR_BACKWARD_ERRORS = [
    linear_backward_error(r"doutput: expected shape \(2, 4\) \(the forward output's\), "
                          r"got shape \(2, 5\)", dy=(2, 5)),
    linear_backward_error(r"doutput: expected shape \(2, 4\)", dy=(3, 4)),
    linear_backward_error(r"doutput: expected shape \(2, 4, 4\) \(the forward output's\), "
                          r"got shape \(8, 4\)", dy=(8, 4), x=(2, 4, 3)),
    linear_backward_error(r"weight: expected in_features \(dim 1\) = 3", w=(4, 5), shared=True),
    linear_backward_error(r"weight: expected 2 dims", w=(12,), shared=True),
]
# fmt: on

LINEAR = Op(
    "linear",
    make_linear,
    forward=lambda lib, s: lib.linear(s.x, s.w, s.b),
    backward=lambda lib, s: lib.linear_backward(s.dy, s.x, s.w),
    wrt=("x", "w", "b"),
    forward_args=(Arg("x", "input"), Arg("w", "weight"), Arg("b", "bias", "optional")),
    backward_args=(Arg("dy", "doutput"), Arg("x", "input"), Arg("w", "weight")),
    cases=LINEAR_CASES,
    big=LINEAR_BIG,
    threads=[((256, 300), 40), ((1, 512), 300)],  # one row: the threads split the outputs
    thread_values="ties",
    errors=LINEAR_ERRORS + LINEAR_BACKWARD_ERRORS,
)

FLATTEN = Op(
    "flatten",
    lambda shape, dtype, rng, values: Sample(
        x=fill(rng, shape, dtype, values),
        dy=fill(rng, (shape[0], int(np.prod(shape[1:]))), dtype, values),
    ),
    forward=lambda lib, s: lib.flatten(s.x),
    backward=lambda lib, s: (lib.flatten_backward(s.dy, s.x.shape),),
    wrt=("x",),
    forward_args=(Arg("x", "input", "any"),),
    backward_args=(Arg("dy", "dF", "any"),),
    cases=[(3, 2, 4, 5), (2, 3, 2, 2), (1, 1, 1, 1), (4, 6), (5,)],
    big=[(64, 16, 24, 24)],
    threads=[(64, 16, 24, 24)],
    errors=[
        Bad(
            "flatten",
            (np.float64(3.0),),
            {},
            ValueError,
            "[flatten] input: expected at least 1 dim (N, ...), got shape ()",
        ),
        Bad(
            "flatten_backward",
            (np.ones((2, 5)), (2, 3, 2)),
            {},
            ValueError,
            "[flatten_backward] dF: expected 12 elements to fill x_shape (2, 3, 2), "
            "got shape (2, 5)",
        ),
    ],
)


# ---------------------------------------------------------------------------------------
# softmax, log_softmax: along one dim of any shape, the backward from the output a
# ---------------------------------------------------------------------------------------

# (shape, dim); cases[1] is the validation and array-contract tests' case
SOFTMAX_CASES = [
    ((7,), 0),
    ((3, 4), 1),
    ((3, 4), -1),
    ((3, 4), 0),
    ((2, 3, 4, 5), 1),
    ((2, 3, 4, 5), -1),
    ((2, 3, 4, 5), -3),
    ((4, 1), 1),  # one class: softmax 1, log_softmax 0
    ((1, 1, 1, 1), 2),
    ((0, 3), 1),  # an empty batch
    ((), 0),  # a 0-d input counts as 1 dim, as in torch
]
SOFTMAX_BIG = [((64, 64, 20), 1), ((64, 64, 20), -1), ((300, 1000), 0)]
SOFTMAX_THREADS = [((7, 100_003), 0), ((64, 64, 20), 1), ((5, 10, 3001), 2)]


def softmax_op(name):
    """softmax and log_softmax: a case is (shape, dim)."""

    def make(case, dtype, rng, values):
        shape, dim = case
        z = fill(rng, shape, dtype, values, 3.0)
        dy = fill(rng, shape, dtype, "normal" if values == "smooth" else values)
        return Sample(z=z, dy=dy, dim=dim, a=getattr(F, name)(z, dim))

    def bad(fn, args, dim, exception, what):
        return Bad(fn, args, {"dim": dim}, exception, f"[{fn}] {what}")

    z = np.ones((2, 3))
    errors = []
    for fn, args in ((name, (z,)), (name + "_backward", (z, z))):
        errors += [
            bad(
                fn,
                args,
                2,
                ValueError,
                "dim: expected an int in [-2, 1] (input shape (2, 3)), got 2",
            ),
            bad(
                fn,
                args,
                -3,
                ValueError,
                "dim: expected an int in [-2, 1] (input shape (2, 3)), got -3",
            ),
            bad(fn, args, 1.0, TypeError, "dim: expected an int, got 1.0"),
            bad(fn, args, None, TypeError, "dim: expected an int, got None"),
        ]
    fn = name + "_backward"
    errors += [
        bad(
            fn,
            (np.ones((2, 3)), np.ones((3, 2))),
            1,
            ValueError,
            "a: expected shape (2, 3) (doutput's), got shape (3, 2)",
        ),
        bad(
            fn,
            (np.ones(6), np.ones((2, 3))),
            0,
            ValueError,
            "a: expected shape (6,) (doutput's), got shape (2, 3)",
        ),
    ]
    return Op(
        name,
        make,
        forward=lambda lib, s: getattr(lib, name)(s.z, s.dim),
        backward=lambda lib, s: (getattr(lib, name + "_backward")(s.dy, s.a, s.dim),),
        wrt=("z",),
        forward_args=(Arg("z", "input"),),
        backward_args=(Arg("dy", "doutput"), Arg("a", "a")),
        cases=SOFTMAX_CASES,
        big=SOFTMAX_BIG,
        threads=SOFTMAX_THREADS,
        thread_values="special",
        errors=errors,
    )


SOFTMAX = softmax_op("softmax")
LOG_SOFTMAX = softmax_op("log_softmax")


# ---------------------------------------------------------------------------------------
# losses: torch's options; a reduced loss is a Python float, reduction='none' an array.
# A sample's dy is the backward's grad_output: None (1) for most reduced cases, a number
# for some, an array of the loss's shape for 'none'.
# ---------------------------------------------------------------------------------------

LOSS_SHAPES = [(1, 1), (4, 1), (3, 5), (2, 3, 4)]
LOSS_THREADS = [(4096, 40)]
# (shape, weight's shape or None, reduction), beyond torch's defaults
LOSS_OPTIONS = [
    ((3, 5), (5,), "mean"),  # one weight per class (the last dim)
    ((3, 5), (3, 1), "sum"),  # one per row
    ((2, 3, 4), (2, 3, 4), "mean"),  # one per element
    ((2, 3, 4), None, "none"),
    ((2, 3, 4), (3, 1), "none"),
    ((4, 1), None, "sum"),
]


def loss_options(rng, dtype, shape, weight_shape, reduction, loss_shape=None):
    """The weight (or None), the reduction and dy (grad_output) of a loss sample."""
    w = None if weight_shape is None else rng.uniform(0.2, 2.0, weight_shape).astype(dtype)
    if reduction == "none":
        dy = rng.standard_normal(shape if loss_shape is None else loss_shape).astype(dtype)
    else:
        dy = 0.75 if reduction == "sum" else None
    return dict(w=w, reduction=reduction, dy=dy)


def make_bce(case, dtype, rng, values):
    shape, hard, weight_shape, reduction = case
    a = rng.uniform(0.05, 0.95, shape) if values == "smooth" else rng.uniform(0.01, 0.99, shape)
    y = rng.integers(0, 2, shape) if hard else rng.uniform(0, 1, shape)
    options = loss_options(rng, dtype, shape, weight_shape, reduction)
    return Sample(a=a.astype(dtype), y=y.astype(dtype), **options)


def make_bce_with_logits(case, dtype, rng, values):
    shape, weight_shape, pos_weight_shape, reduction = case
    z = fill(rng, shape, dtype, "smooth" if values == "smooth" else "normal", 4.0)
    options = loss_options(rng, dtype, shape, weight_shape, reduction)
    pw = None
    if pos_weight_shape is not None:
        pw = rng.uniform(0.2, 3.0, pos_weight_shape).astype(dtype)
    return Sample(z=z, y=rng.uniform(0, 1, shape).astype(dtype), pw=pw, **options)


# (logits' shape, target, weighted, reduction, label_smoothing, ignore_index): target is
# "index" (class indices), "some" (every other one ignore_index), "all" (every one) or
# "probs" (class probabilities)
CROSS_ENTROPY_OPTIONS = [
    ((6, 5), "index", True, "mean", 0.0, -100),
    ((6, 5), "index", False, "sum", 0.0, -100),
    ((6, 5), "index", True, "none", 0.0, -100),
    ((6, 5), "some", True, "mean", 0.0, -100),
    ((6, 5), "some", False, "mean", 0.0, 2),  # a class index as ignore_index
    ((6, 5), "all", False, "sum", 0.0, -100),
    ((6, 5), "all", True, "none", 0.1, -100),
    ((6, 5), "index", False, "mean", 0.1, -100),
    ((6, 5), "some", True, "mean", 0.3, -100),  # smoothing with weights and ignored labels
    ((6, 5), "probs", False, "mean", 0.0, -100),
    ((6, 5), "probs", True, "sum", 0.2, -100),
    ((2, 3, 4), "index", False, "mean", 0.0, -100),  # spatial: (N, K, d1)
    ((2, 3, 4, 2), "some", True, "none", 0.2, -100),  # (N, K, d1, d2)
    ((2, 3, 4, 2), "index", True, "mean", 0.1, -100),
    ((2, 4, 3), "probs", True, "none", 0.1, -100),
    ((1, 1), "index", True, "sum", 0.5, -100),
]


def make_cross_entropy(case, dtype, rng, values):
    if len(case) == 2:  # (N, K) with torch's defaults
        case = (case, "index", False, "mean", 0.0, -100)
    shape, target, weighted, reduction, label_smoothing, ignore_index = case
    z = fill(rng, shape, dtype, "normal", 3.0)
    K, loss_shape = shape[1], shape[:1] + shape[2:]
    if target == "probs":
        labels = rng.uniform(0, 1, shape)
        labels = (labels / labels.sum(axis=1, keepdims=True)).astype(dtype)
    else:
        labels = rng.integers(0, K, loss_shape)
        if target == "some":
            labels.reshape(-1)[::2] = ignore_index
        elif target == "all":
            labels[...] = ignore_index
    options = loss_options(rng, dtype, shape, (K,) if weighted else None, reduction, loss_shape)
    return Sample(
        z=z,
        labels=labels,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        **options,
    )


def loss_option_errors(op, pos_weight=False):
    """The options' errors: reduction, weight (and pos_weight) shapes, grad_output."""
    z = np.full((3, 5), 0.5)
    weights = [("weight", "w")] + ([("pos_weight", "pw")] if pos_weight else [])
    cases = []
    for fn in (op, op + "_backward"):
        for reduction, shown in (("avg", "'avg'"), ("Mean", "'Mean'"), (None, "None"), (1, "1")):
            what = f"reduction: expected 'mean', 'sum' or 'none', got {shown}"
            cases.append(Bad(fn, (z, z), {"reduction": reduction}, ValueError, f"[{fn}] {what}"))
        for name, _ in weights:
            for shape in ((3,), (2, 5), (1, 3, 5), (5, 3)):
                what = (
                    f"{name}: expected a shape that broadcasts to (3, 5) (input's), "
                    f"got shape {shape}"
                )
                cases.append(Bad(fn, (z, z), {name: np.ones(shape)}, ValueError, f"[{fn}] {what}"))
            message = f"[{fn}] {name}: expected float64 like the first array argument, got float32"
            cases.append(Bad(fn, (z, z), {name: np.ones(5, np.float32)}, TypeError, message))
    fn = op + "_backward"
    for kwargs, what in [
        (
            {"reduction": "none"},
            "grad_output: expected an array of shape (3, 5) (the loss's, reduction='none'), "
            "got None",
        ),
        (
            {"reduction": "none", "grad_output": np.ones(5)},
            "grad_output: expected shape (3, 5) (the loss's), got shape (5,)",
        ),
        (
            {"grad_output": np.ones(3)},
            "grad_output: expected a number (the loss is reduced), got shape (3,)",
        ),
        (
            {"reduction": "sum", "grad_output": "1"},
            "grad_output: expected a number (the loss is reduced), got '1'",
        ),
    ]:
        cases.append(Bad(fn, (z, z), kwargs, ValueError, f"[{fn}] {what}"))
    return cases


def binary_loss_errors(op, pos_weight=False):
    """Shape errors of the losses whose target has the input's shape, and their options'."""
    cases = []
    for fn in (op, op + "_backward"):
        for a, y, what in [
            ((2, 3), (3, 2), "target: expected shape (2, 3) (input's), got shape (3, 2)"),
            ((6,), (6, 1), "target: expected shape (6,) (input's), got shape (6, 1)"),
        ]:
            cases.append(Bad(fn, (np.full(a, 0.5), np.ones(y)), {}, ValueError, f"[{fn}] {what}"))
    return cases + loss_option_errors(op, pos_weight)


def cross_entropy_errors():
    cases = []
    z = np.zeros((3, 4))
    for fn in ("cross_entropy", "cross_entropy_backward"):
        for labels in (np.zeros(4, np.int64), np.zeros((3, 1), np.int64), 0):
            shown = np.shape(labels)
            message = (
                f"[{fn}] labels: expected shape (3,) (one class index per row of logits), "
                f"got shape {shown}"
            )
            cases.append(Bad(fn, (z, labels), {}, ValueError, message))
        for logits, labels, what in [
            (
                (4,),
                (1,),
                "labels: expected shape () (one class index for unbatched logits (4,)), got "
                "shape (1,)",
            ),
            (
                (),
                1,
                "logits: expected 1 dim (K,) (unbatched), 2 dims (N, K) or more (N, K, d1, ...), "
                "got shape ()",
            ),
            ((3, 0), 3, "logits: expected every dim but the batch >= 1, got shape (3, 0)"),
            (
                (2, 3, 0),
                (2, 0),
                "logits: expected every dim but the batch >= 1, got shape (2, 3, 0)",
            ),
            ((0,), (), "logits: expected every dim >= 1, got shape (0,)"),  # unbatched
            (
                (1, 3, 4),
                1,
                "labels: expected shape (1, 4) (logits' without the class dim), got shape (1,)",
            ),
            (
                (2, 3, 4, 5),
                (2, 5, 4),
                "labels: expected shape (2, 4, 5) (logits' without the class dim), "
                "got shape (2, 5, 4)",
            ),
        ]:
            args = (np.zeros(logits), np.zeros(labels, np.int64))
            cases.append(Bad(fn, args, {}, ValueError, f"[{fn}] {what}"))
        labels = np.array([0, 1, 3])
        for kwargs, what in [
            (
                {"weight": np.ones(3)},
                "weight: expected shape (4,) (one weight per class), got shape (3,)",
            ),
            (
                {"weight": np.ones((1, 4))},
                "weight: expected shape (4,) (one weight per class), got shape (1, 4)",
            ),
            ({"label_smoothing": 1.5}, "label_smoothing: expected a number in [0, 1], got 1.5"),
            ({"label_smoothing": -0.1}, "label_smoothing: expected a number in [0, 1], got -0.1"),
            ({"label_smoothing": np.nan}, "label_smoothing: expected a number in [0, 1], got nan"),
            ({"reduction": "avg"}, "reduction: expected 'mean', 'sum' or 'none', got 'avg'"),
            ({"ignore_index": 1}, "labels: expected class indices in [0, 4), got 4 at position 2"),
        ]:
            bad_labels = np.array([0, 1, 4]) if "ignore_index" in kwargs else labels
            cases.append(Bad(fn, (z, bad_labels), kwargs, ValueError, f"[{fn}] {what}"))
        # ignore_index moved to a class: the default's -100 is then out of range
        cases.append(
            Bad(
                fn,
                (z, np.array([0, -100, 1])),
                {"ignore_index": 0},
                ValueError,
                f"[{fn}] labels: expected class indices in [0, 4), got -100 at position 1",
            )
        )
        cases.append(
            Bad(
                fn,
                (z, np.full((3, 4), 0.25)),
                {"ignore_index": 0},
                ValueError,
                f"[{fn}] ignore_index: expected -100 (none) with class probabilities as the "
                "target, got 0",
            )
        )
        # probabilities: floats of the logits' shape and dtype
        cases.append(
            Bad(
                fn,
                (z, np.full((3, 4), 0.25, np.float32)),
                {},
                TypeError,
                f"[{fn}] target: expected float64 like the first array argument, got float32",
            )
        )
        cases.append(
            Bad(
                fn,
                (z, np.full((3, 2), 0.25)),
                {},
                TypeError,
                f"[{fn}] labels: expected an integer array, got float64",
            )
        )
    fn = "cross_entropy_backward"
    for kwargs, what in [
        (
            {"reduction": "none"},
            "grad_output: expected an array of shape (3,) (the loss's, reduction='none'), got None",
        ),
        (
            {"reduction": "none", "grad_output": np.ones((3, 4))},
            "grad_output: expected shape (3,) (the loss's), got shape (3, 4)",
        ),
        (
            {"grad_output": np.ones(3)},
            "grad_output: expected a number (the loss is reduced), got shape (3,)",
        ),
    ]:
        cases.append(Bad(fn, (z, np.array([0, 1, 3])), kwargs, ValueError, f"[{fn}] {what}"))
    return cases


# (input's shape, target, weighted, reduction, ignore_index), target as cross-entropy's
NLL_LOSS_OPTIONS = [
    ((6, 5), "index", False, "sum", -100),
    ((6, 5), "index", True, "none", -100),
    ((6, 5), "some", True, "mean", -100),
    ((6, 5), "some", False, "mean", 2),  # a class index as ignore_index
    ((6, 5), "all", False, "sum", -100),
    ((6, 5), "all", True, "none", -100),
    ((2, 3, 4), "index", False, "mean", -100),  # spatial: (N, K, d1)
    ((2, 3, 4, 2), "some", True, "none", -100),  # (N, K, d1, d2)
    ((2, 3, 4, 2), "index", True, "mean", -100),
    ((5,), "index", True, "mean", -100),  # unbatched (K,) with a () target
    ((0, 4), "index", False, "sum", -100),  # an empty batch
    ((1, 1), "index", True, "sum", -100),
]


def make_nll_loss(case, dtype, rng, values):
    """Log-probabilities (the oracle's log_softmax of random logits) and class indices."""
    shape, target, weighted, reduction, ignore_index = case
    x = ref.log_softmax(fill(rng, shape, F64, "normal", 3.0), 0 if len(shape) == 1 else 1)
    K = shape[0] if len(shape) == 1 else shape[1]
    loss_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    labels = np.asarray(rng.integers(0, K, loss_shape))
    if target == "some":
        labels.reshape(-1)[::2] = ignore_index
    elif target == "all":
        labels[...] = ignore_index
    options = loss_options(rng, dtype, shape, (K,) if weighted else None, reduction, loss_shape)
    return Sample(x=x.astype(dtype), labels=labels, ignore_index=ignore_index, **options)


def nll_loss_errors():
    cases = []
    x = np.full((3, 4), -1.0)
    for fn in ("nll_loss", "nll_loss_backward"):
        for shape, labels, what in [
            (
                (3, 4),
                (4,),
                "labels: expected shape (3,) (one class index per row of input), got shape (4,)",
            ),
            (
                (4,),
                (1,),
                "labels: expected shape () (one class index for unbatched input (4,)), "
                "got shape (1,)",
            ),
            (
                (),
                (),
                "input: expected 1 dim (K,) (unbatched), 2 dims (N, K) or more (N, K, d1, "
                "...), got shape ()",
            ),
            ((3, 0), (3,), "input: expected every dim but the batch >= 1, got shape (3, 0)"),
            (
                (1, 3, 4),
                (1,),
                "labels: expected shape (1, 4) (input's without the class dim), got shape (1,)",
            ),
        ]:
            args = (np.full(shape, -1.0), np.zeros(labels, np.int64))
            cases.append(Bad(fn, args, {}, ValueError, f"[{fn}] {what}"))
        labels = np.array([0, 1, 3])
        for kwargs, bad_labels, exception, what in [
            (
                {"weight": np.ones(3)},
                labels,
                ValueError,
                "weight: expected shape (4,) (one weight per class), got shape (3,)",
            ),
            (
                {"weight": np.ones((1, 4))},
                labels,
                ValueError,
                "weight: expected shape (4,) (one weight per class), got shape (1, 4)",
            ),
            (
                {"weight": np.ones(4, np.float32)},
                labels,
                TypeError,
                "weight: expected float64 like the first array argument, got float32",
            ),
            (
                {"reduction": "avg"},
                labels,
                ValueError,
                "reduction: expected 'mean', 'sum' or 'none', got 'avg'",
            ),
            (
                {},
                np.array([0, 4, 1]),
                ValueError,
                "labels: expected class indices in [0, 4), got 4 at position 1",
            ),
            (
                {"ignore_index": 0},
                np.array([0, -100, 1]),
                ValueError,
                "labels: expected class indices in [0, 4), got -100 at position 1",
            ),
            ({}, np.full(3, 0.5), TypeError, "labels: expected an integer array, got float64"),
            # torch's nll_loss takes no class probabilities
            (
                {},
                np.full((3, 4), 0.25),
                TypeError,
                "labels: expected an integer array, got float64",
            ),
        ]:
            cases.append(Bad(fn, (x, bad_labels), kwargs, exception, f"[{fn}] {what}"))
    fn = "nll_loss_backward"
    for kwargs, what in [
        (
            {"reduction": "none"},
            "grad_output: expected an array of shape (3,) (the loss's, reduction='none'), got None",
        ),
        (
            {"reduction": "none", "grad_output": np.ones((3, 4))},
            "grad_output: expected shape (3,) (the loss's), got shape (3, 4)",
        ),
        (
            {"grad_output": np.ones(3)},
            "grad_output: expected a number (the loss is reduced), got shape (3,)",
        ),
    ]:
        cases.append(Bad(fn, (x, np.array([0, 1, 3])), kwargs, ValueError, f"[{fn}] {what}"))
    return cases


BINARY_CROSS_ENTROPY = Op(
    "binary_cross_entropy",
    make_bce,
    forward=lambda lib, s: lib.binary_cross_entropy(s.a, s.y, s.w, s.reduction),
    backward=lambda lib, s: (lib.binary_cross_entropy_backward(s.a, s.y, s.w, s.reduction, s.dy),),
    wrt=("a",),
    forward_args=(Arg("a", "input"), Arg("y", "target"), Arg("w", "weight", "optional")),
    backward_args=(Arg("a", "input"), Arg("y", "target"), Arg("w", "weight", "optional")),
    # cases[1] (the validation and array-contract tests' case) has every array argument
    cases=[((1, 1), False, None, "mean"), ((3, 5), True, (5,), "mean")]
    + [(shape, hard, None, "mean") for shape in LOSS_SHAPES for hard in (False, True)]
    + [(shape, hard, w, r) for shape, w, r in LOSS_OPTIONS for hard in (False, True)],
    big=[(shape, True, None, "mean") for shape in LOSS_THREADS]
    + [(shape, True, (40,), "none") for shape in LOSS_THREADS],
    threads=[(shape, True, None, "mean") for shape in LOSS_THREADS]
    + [(shape, False, (1, 40), "sum") for shape in LOSS_THREADS],
    loss=True,
    errors=binary_loss_errors("binary_cross_entropy"),
)

BINARY_CROSS_ENTROPY_WITH_LOGITS = Op(
    "binary_cross_entropy_with_logits",
    make_bce_with_logits,
    forward=lambda lib, s: lib.binary_cross_entropy_with_logits(s.z, s.y, s.w, s.pw, s.reduction),
    backward=lambda lib, s: (
        lib.binary_cross_entropy_with_logits_backward(s.z, s.y, s.w, s.pw, s.reduction, s.dy),
    ),
    wrt=("z",),
    forward_args=(
        Arg("z", "input"),
        Arg("y", "target"),
        Arg("w", "weight", "optional"),
        Arg("pw", "pos_weight", "optional"),
    ),
    backward_args=(
        Arg("z", "input"),
        Arg("y", "target"),
        Arg("w", "weight", "optional"),
        Arg("pw", "pos_weight", "optional"),
    ),
    cases=[((1, 1), None, None, "mean"), ((3, 5), (3, 1), (5,), "mean")]
    + [(shape, None, None, "mean") for shape in LOSS_SHAPES]
    + [(shape, w, None, r) for shape, w, r in LOSS_OPTIONS]
    + [
        ((3, 5), None, (5,), "mean"),  # pos_weight along the last dim (the classes)
        ((3, 5), (3, 1), (5,), "sum"),
        ((2, 3, 4), None, (4,), "none"),
        ((2, 3, 4), (4,), (3, 4), "mean"),
        ((4, 1), None, (1,), "mean"),
    ],
    big=[(shape, None, None, "mean") for shape in LOSS_THREADS]
    + [(shape, None, (40,), "none") for shape in LOSS_THREADS],
    threads=[(shape, None, None, "mean") for shape in LOSS_THREADS]
    + [(shape, (40,), (40,), "sum") for shape in LOSS_THREADS],
    loss=True,
    errors=binary_loss_errors("binary_cross_entropy_with_logits", pos_weight=True),
)

CROSS_ENTROPY = Op(
    "cross_entropy",
    make_cross_entropy,
    forward=lambda lib, s: lib.cross_entropy(
        s.z, s.labels, s.w, s.ignore_index, s.reduction, s.label_smoothing
    ),
    backward=lambda lib, s: (
        lib.cross_entropy_backward(
            s.z, s.labels, s.w, s.ignore_index, s.reduction, s.label_smoothing, s.dy
        ),
    ),
    wrt=("z",),
    forward_args=(
        Arg("z", "logits"),
        Arg("labels", "labels", "int"),
        Arg("w", "weight", "optional"),
    ),
    backward_args=(
        Arg("z", "logits"),
        Arg("labels", "labels", "int"),
        Arg("w", "weight", "optional"),
    ),
    cases=[(1, 1), ((6, 5), "index", True, "mean", 0.0, -100), (1, 2), (6, 5), (32, 10)]
    + CROSS_ENTROPY_OPTIONS,
    big=LOSS_THREADS + [((64, 10, 8, 8), "some", True, "none", 0.1, -100)],
    threads=LOSS_THREADS + [((64, 10, 8, 8), "probs", True, "mean", 0.1, -100)],
    loss=True,
    errors=cross_entropy_errors(),
)


NLL_LOSS = Op(
    "nll_loss",
    make_nll_loss,
    forward=lambda lib, s: lib.nll_loss(s.x, s.labels, s.w, s.ignore_index, s.reduction),
    backward=lambda lib, s: (
        lib.nll_loss_backward(s.x, s.labels, s.w, s.ignore_index, s.reduction, s.dy),
    ),
    wrt=("x",),
    forward_args=(
        Arg("x", "input"),
        Arg("labels", "labels", "int"),
        Arg("w", "weight", "optional"),
    ),
    backward_args=(
        Arg("x", "input"),
        Arg("labels", "labels", "int"),
        Arg("w", "weight", "optional"),
    ),
    # torch's defaults first; cases[1] has every array argument
    cases=[((6, 5), "index", False, "mean", -100), ((6, 5), "index", True, "mean", -100)]
    + NLL_LOSS_OPTIONS,
    big=[((4096, 40), "index", False, "mean", -100), ((64, 10, 8, 8), "some", True, "none", -100)],
    threads=[((4096, 40), "some", True, "mean", -100), ((64, 10, 8, 8), "index", False, "sum", 3)],
    loss=True,
    errors=nll_loss_errors(),
)

OPS = [
    CONV2D,
    MAX_POOL2D,
    AVG_POOL2D,
    ADAPTIVE_AVG_POOL2D,
    BATCH_NORM2D,
    RELU,
    SIGMOID,
    TANH,
    LEAKY_RELU,
    GELU,
    SILU,
    SOFTMAX,
    LOG_SOFTMAX,
    DROPOUT,
    LINEAR,
    FLATTEN,
    BINARY_CROSS_ENTROPY,
    BINARY_CROSS_ENTROPY_WITH_LOGITS,
    CROSS_ENTROPY,
    NLL_LOSS,
]
BY_NAME = {op.name: op for op in OPS}
DTYPES = (F32, F64)


def cases(which="cases", dtypes=DTYPES):
    """pytest parameters (op, case, dtype) over the table: which = "cases", "big" or both."""
    import pytest

    return [
        pytest.param(op, case, dtype, id=f"{op.name}-{case}-{np.dtype(dtype).name}")
        for op in OPS
        for kind in which.split("+")
        for case in getattr(op, kind)
        for dtype in dtypes
    ]


def all_errors():
    import pytest

    return [pytest.param(bad, id=repr(bad)) for op in OPS for bad in op.errors]
