"""The NumPy reference ("oracle") for every cnnbp kernel.

This module is the float64 ground truth that each C++ kernel is tested against, and it
is meant to be read beside the derivation in the design notes:

    X --conv W1 + B1--> Z1 --ReLU--> A1 --maxpool--> P1 --flatten--> F
      --F.W2 + B2--> Z2 --sigmoid--> A2 --BCE(Y)--> L

Everything here is plain NumPy in float64, written for reading rather than speed:
explicit loops over output positions, one short comment per step, shapes next to the
arrays. Each backward sits right after its forward and quotes the forward line it
inverts. The semantics follow PyTorch (zero-padded cross-correlation with torch's
stride, padding ('same' included), dilation and groups, max-pool that pads with -inf,
picks the first index on a tie and propagates NaN, BCE that clamps its logs at -100,
stable BCE-with-logits and cross-entropy, losses averaged like torch's reduction='mean').

The oracle checks nothing beyond what it needs: it is a reference, not the user-facing
API (that is `cnnbp.functional`, whose validation lives in C++). It imports NumPy and
the standard library's math (for erf) and nothing else, not even the rest of cnnbp: it can
be read, and run, without a build.

At the end, the optimizers' updates (SGD, Adam, AdamW) for one parameter, written beside
torch.optim's update rules, as the reference for cnnbp.optim.

Dimension letters: N batch, C in-channels, K out-channels, H/W input height/width,
P/Q output height/width, R/S filter height/width.
"""

import math

import numpy as np

__all__ = [
    "output_size",
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "batch_norm2d",
    "batch_norm2d_backward",
    "relu",
    "relu_backward",
    "sigmoid",
    "sigmoid_backward",
    "tanh",
    "tanh_backward",
    "leaky_relu",
    "leaky_relu_backward",
    "gelu",
    "gelu_backward",
    "silu",
    "silu_backward",
    "softmax",
    "softmax_backward",
    "log_softmax",
    "log_softmax_backward",
    "dropout_mask",
    "dropout",
    "dropout_backward",
    "linear",
    "linear_backward",
    "flatten",
    "flatten_backward",
    "binary_cross_entropy",
    "binary_cross_entropy_backward",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_backward",
    "cross_entropy",
    "cross_entropy_backward",
    "nll_loss",
    "nll_loss_backward",
    "seed_network",
    "sgd_step",
    "adam_step",
    "adamw_step",
]


def _f64(a):
    """Any array-like as a float64 ndarray."""
    return np.asarray(a, dtype=np.float64)


def _out(a):
    """Results are returned float64 and C-contiguous (0-d arrays stay 0-d)."""
    return np.asarray(a, dtype=np.float64, order="C")


def _pair(v):
    """An int or an (h, w) pair, as an (h, w) tuple of ints."""
    if np.ndim(v) == 0:
        return int(v), int(v)
    h, w = v
    return int(h), int(w)


def output_size(in_size, kernel, stride=1, padding=0, dilation=1, ceil_mode=False):
    """The number of window positions along one axis, torch's rule.

    The padded axis holds H + 2p cells; a window's taps lie d apart, so it spans
    e = d * (k - 1) + 1 cells. Windows start at 0, s, 2s, ... and the last start is at most
    H + 2p - e, which gives floor((H + 2p - e) / s) + 1 positions: the floor drops a last
    partial window, as torch does with ceil_mode=False. With ceil_mode=True the division
    rounds up, keeping a last window that hangs past the padding, except one that would
    start in the right padding: torch drops it (if (out - 1) * s >= H + p: out -= 1).
    """
    extent = dilation * (kernel - 1) + 1
    span = in_size + 2 * padding - extent
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1  # ceil division
    if (out - 1) * stride >= in_size + padding:
        out -= 1
    return out


def _padded(x, ph, pw):
    """x (N, C, H, W) with ph rows of zeros above and below, pw columns left and right.

    ph and pw may also be (before, after) pairs, for uneven padding (conv2d's 'same').
    """
    return np.pad(x, ((0, 0), (0, 0), _pair(ph), _pair(pw)))


def _windows(H, W, kh, kw, stride, padding, dilation=1, ceil_mode=False):
    """Where a kh x kw window slides over an H x W plane: the strides (sh, sw), the
    paddings (ph, pw) and the number of positions (P, Q)."""
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    return (
        (sh, sw),
        (ph, pw),
        (output_size(H, kh, sh, ph, dh, ceil_mode), output_size(W, kw, sw, pw, dw, ceil_mode)),
    )


# ---------------------------------------------------------------------------------------
# conv2d: zero padding, cross-correlation (no filter flip), like torch's conv2d, with
# every option: stride, padding (int, pair, 'valid', 'same'), dilation and groups
# ---------------------------------------------------------------------------------------


def _conv_padding(padding, kernel, stride, dilation):
    """conv2d's padding as ((top, bottom), (left, right)), torch's rule.

    An int or an (h, w) pair pads both sides of an axis alike; 'valid' is no padding.
    'same' keeps the output the size of the input: a window spans d * (k - 1) + 1 cells, so
    an axis needs total = d * (k - 1) cells of padding, top = total // 2 before it and
    bottom = total - top after it (an odd total puts the extra cell at the bottom/right, as
    torch does). Only with stride 1: torch refuses 'same' for a strided convolution.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(
                f"[conv2d] padding: expected an int, a pair, 'valid' or 'same', got '{padding}'"
            )
        if stride != (1, 1):
            raise ValueError(
                f"[conv2d] padding: expected stride 1 with padding='same', got stride {stride}"
            )
        (R, S), (dil_h, dil_w) = kernel, dilation
        total_h, total_w = dil_h * (R - 1), dil_w * (S - 1)
        return (total_h // 2, total_h - total_h // 2), (total_w // 2, total_w - total_w // 2)
    ph, pw = _pair(padding)
    return (ph, ph), (pw, pw)


def _conv_geometry(x_shape, w_shape, stride, padding, dilation):
    """conv2d's arguments, parsed once for forward and backward: the strides (sh, sw), the
    dilations (dil_h, dil_w), the paddings ((top, bottom), (left, right)) and the output
    size (P, Q).

    The padded plane holds H + top + bottom rows; windows of extent dil_h * (R - 1) + 1
    start at rows 0, sh, 2 sh, ..., so output_size counts them there, with no further padding.
    """
    _, _, H, W = x_shape
    _, _, R, S = w_shape
    sh, sw = _pair(stride)
    dil_h, dil_w = _pair(dilation)
    (top, bottom), (left, right) = _conv_padding(padding, (R, S), (sh, sw), (dil_h, dil_w))
    P = output_size(H + top + bottom, R, sh, 0, dil_h)
    Q = output_size(W + left + right, S, sw, 0, dil_w)
    return (sh, sw), (dil_h, dil_w), ((top, bottom), (left, right)), (P, Q)


def _conv_groups(C, K, groups):
    """The channels of each group, as (input channels, filters) slices: group g convolves
    input channels g*Cg ... (g+1)*Cg - 1 with filters g*Kg ... (g+1)*Kg - 1 (Cg = C / groups,
    Kg = K / groups), so output channel k reads the input channels of group k // Kg."""
    if groups < 1 or C % groups or K % groups:
        raise ValueError(
            f"[conv2d] groups: expected a divisor of C = {C} and K = {K}, got {groups}"
        )
    Cg, Kg = C // groups, K // groups
    return [(slice(g * Cg, (g + 1) * Cg), slice(g * Kg, (g + 1) * Kg)) for g in range(groups)]


def _taps(p, stride, kernel, dilation):
    """The padded plane's rows (or columns) that output row p's filter taps read,
    p*s, p*s + d, ..., p*s + (k - 1)*d, as a slice."""
    first = p * stride
    return slice(first, first + dilation * (kernel - 1) + 1, dilation)


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """Cross-correlation of x with the filters w, plus b:

        y[n, k, p, q] = b[k] + sum_{c, r, s} xpad[n, c, p*sh + r*dil_h, q*sw + s*dil_w]
                                             * w[k, c, r, s]

    with c over the C/groups input channels of k's group (_conv_groups) and xpad the input
    with top/bottom rows and left/right columns of zeros (_conv_padding): tap (r, s) reads
    input row p*sh - top + r*dil_h, column q*sw - left + s*dil_w.
    """
    x = _f64(x)  # x (N, C, H, W)
    w = _f64(w)  # w (K, C/groups, R, S)
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    (sh, sw), (dil_h, dil_w), ((top, bottom), (left, right)), (P, Q) = _conv_geometry(
        x.shape, w.shape, stride, padding, dilation
    )

    # Zero padding: the window may hang over the border ('same': one more at the bottom/right).
    xpad = _padded(x, (top, bottom), (left, right))  # xpad (N, C, H+top+bottom, W+left+right)

    y = np.zeros((N, K, P, Q))  # y (N, K, P, Q)
    for cs, ks in _conv_groups(C, K, groups):  # cs: the group's input channels, ks: its filters
        wg = w[ks]  # wg (K/groups, C/groups, R, S)
        for p in range(P):
            for q in range(Q):
                rows, cols = _taps(p, sh, R, dil_h), _taps(q, sw, S, dil_w)
                window = xpad[:, cs, rows, cols]  # (N, C/groups, R, S): the taps, dil apart
                # One dot product per (sample, filter) over the whole window.
                y[:, ks, p, q] = np.einsum("ncrs,kcrs->nk", window, wg)
    if b is not None:
        y += _f64(b).reshape(1, K, 1, 1)  # b (K,) broadcast over N, P, Q
    return _out(y)


def conv2d_backward(dy, x, w, stride=1, padding=0, dilation=1, groups=1):
    """Gradients of conv2d; returns (dx, dw, db).

    Inverts, for every group and output position (p, q), the forward lines
        y[:, ks, p, q] = np.einsum("ncrs,kcrs->nk", window, wg)
        y += _f64(b).reshape(1, K, 1, 1)
    so each term window[n, c, r, s] * wg[k, c, r, s] sends
        dy[n, k, p, q] * wg[k, c, r, s]      to the input cell it read,
        dy[n, k, p, q] * window[n, c, r, s]  to the weight it used.
    The cell read is xpad[n, c, p*sh + r*dil_h, q*sw + s*dil_w], c in k's group: a filter
    never reads another group's channels, so it sends them nothing.
    Summing these over (p, q) makes dw the valid cross-correlation of x with dy and dx
    the full convolution of dy with w (rotated 180 degrees), each within a group, with the
    filter's taps dil apart and the windows' starts s apart, written out as loops.
    """
    dy = _f64(dy)  # dy (N, K, P, Q)
    x = _f64(x)  # x (N, C, H, W)
    w = _f64(w)  # w (K, C/groups, R, S)
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    (sh, sw), (dil_h, dil_w), ((top, bottom), (left, right)), (P, Q) = _conv_geometry(
        x.shape, w.shape, stride, padding, dilation
    )

    xpad = _padded(x, (top, bottom), (left, right))  # xpad (N, C, H+top+bottom, W+left+right)
    dxpad = np.zeros_like(xpad)  # dxpad (N, C, H+top+bottom, W+left+right)
    dw = np.zeros_like(w)  # dw (K, C/groups, R, S)
    for cs, ks in _conv_groups(C, K, groups):  # cs: the group's input channels, ks: its filters
        wg = w[ks]  # wg (K/groups, C/groups, R, S)
        for p in range(P):
            for q in range(Q):
                rows, cols = _taps(p, sh, R, dil_h), _taps(q, sw, S, dil_w)
                window = xpad[:, cs, rows, cols]  # (N, C/groups, R, S)
                g = dy[:, ks, p, q]  # g (N, K/groups)
                dw[ks] += np.einsum("nk,ncrs->kcrs", g, window)
                # Overlapping windows (stride < extent) read the same cell: add, never assign.
                dxpad[:, cs, rows, cols] += np.einsum("nk,kcrs->ncrs", g, wg)
    # The padding was constant zeros, not an input: drop its gradient.
    dx = dxpad[:, :, top : top + H, left : left + W]  # dx (N, C, H, W)
    # y += b[k] for every (n, p, q), so db[k] sums dy over those.
    db = dy.sum(axis=(0, 2, 3))  # db (K,)
    return _out(dx), _out(dw), _out(db)


# ---------------------------------------------------------------------------------------
# max_pool2d: PyTorch CPU semantics
# ---------------------------------------------------------------------------------------


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Returns (y, idx): the max of each window and its flat index h*W + w in the plane.

    A window's taps lie `dilation` apart: rows h0, h0 + dh, ..., h0 + (kh - 1) * dh. Padding
    counts as -inf, so a padded cell is never chosen; only in-bounds taps are scanned (with
    ceil_mode the last window may hang past the padding: those taps are skipped too). The
    scan goes in row-major order starting from the first in-bounds tap with maxval = -inf,
    and takes a cell when `val > maxval or isnan(val)`: on a tie the first index stays, a
    NaN is always taken (so NaN propagates and the last NaN of the window wins), and a
    window of -inf values reports -inf at its first in-bounds tap.
    """
    x = _f64(x)  # x (N, C, H, W)
    kh, kw = _pair(kernel_size)
    dh, dw = _pair(dilation)
    N, C, H, W = x.shape
    (sh, sw), (ph, pw), (P, Q) = _windows(
        H, W, kh, kw, kernel_size if stride is None else stride, padding, dilation, ceil_mode
    )

    y = np.empty((N, C, P, Q))  # y (N, C, P, Q)
    idx = np.empty((N, C, P, Q), dtype=np.int64)  # idx (N, C, P, Q)
    for n in range(N):
        for c in range(C):
            plane = x[n, c]  # plane (H, W)
            for p in range(P):
                for q in range(Q):
                    # The window's taps in input coordinates, the in-bounds ones only.
                    h0, w0 = p * sh - ph, q * sw - pw
                    rows = [h0 + i * dh for i in range(kh) if 0 <= h0 + i * dh < H]
                    cols = [w0 + j * dw for j in range(kw) if 0 <= w0 + j * dw < W]
                    maxindex = rows[0] * W + cols[0]
                    maxval = -np.inf
                    for h in rows:
                        for w in cols:
                            val = plane[h, w]
                            if val > maxval or np.isnan(val):
                                maxval = val
                                maxindex = h * W + w
                    y[n, c, p, q] = maxval
                    idx[n, c, p, q] = maxindex
    return _out(y), np.ascontiguousarray(idx, dtype=np.int64)


def max_pool2d_backward(dy, idx, x_shape):
    """Gradient of max_pool2d with respect to its input x.

    Inverts:
        y[n, c, p, q] = maxval      (maxval = plane[h, w], idx[n, c, p, q] = h * W + w)
    so dy[n, c, p, q] goes to that one cell and every other cell of the window gets 0.
    Overlapping windows can pick the same cell, so the contributions are added.
    """
    dy = _f64(dy)  # dy (N, C, P, Q)
    idx = np.asarray(idx, dtype=np.int64)  # idx (N, C, P, Q)
    N, C, H, W = (int(d) for d in x_shape)
    _, _, P, Q = dy.shape

    dx = np.zeros((N, C, H * W))  # dx (N, C, H*W): each plane flattened, as idx indexes it
    for n in range(N):
        for c in range(C):
            for p in range(P):
                for q in range(Q):
                    dx[n, c, idx[n, c, p, q]] += dy[n, c, p, q]
    return _out(dx.reshape(N, C, H, W))


# ---------------------------------------------------------------------------------------
# avg_pool2d: PyTorch CPU semantics, every option
# ---------------------------------------------------------------------------------------


def _avg_divisor(p, q, H, W, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override):
    """What torch divides window (p, q)'s sum by.

    divisor_override when given. Otherwise torch first clips the window to the padded input
    (hend = min(hstart + kh, H + ph)), counts its cells as pool_size, then clips it to the
    input; count_include_pad=True divides by pool_size (the whole window, except a ceil_mode
    window hanging past the right padding), False by the cells inside the input.
    """
    if divisor_override is not None:
        return divisor_override
    h0, w0 = p * sh - ph, q * sw - pw
    h1, w1 = min(h0 + kh, H + ph), min(w0 + kw, W + pw)
    if count_include_pad:
        return (h1 - h0) * (w1 - w0)
    return (min(h1, H) - max(h0, 0)) * (min(w1, W) - max(w0, 0))


def avg_pool2d(x, kernel_size, stride=None, padding=0,
               ceil_mode=False, count_include_pad=True, divisor_override=None):  # fmt: skip
    """y[n, c, p, q] = sum of the kh x kw window of xpad at (p*sh, q*sw) / divisor.

    Padding is zeros; the divisor is _avg_divisor's (torch's rule). With ceil_mode a last
    window may hang past the padded input: the cells beyond it add nothing.
    """
    x = _f64(x)  # x (N, C, H, W)
    kh, kw = _pair(kernel_size)
    N, C, H, W = x.shape
    (sh, sw), (ph, pw), (P, Q) = _windows(
        H, W, kh, kw, kernel_size if stride is None else stride, padding, 1, ceil_mode
    )

    xpad = _padded(x, ph, pw)  # xpad (N, C, H+2ph, W+2pw)
    y = np.empty((N, C, P, Q))  # y (N, C, P, Q)
    for p in range(P):
        for q in range(Q):
            window = xpad[:, :, p * sh : p * sh + kh, q * sw : q * sw + kw]  # (N, C, <=kh, <=kw)
            divisor = _avg_divisor(
                p, q, H, W, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override
            )
            y[:, :, p, q] = window.sum(axis=(2, 3)) / divisor
    return _out(y)


def avg_pool2d_backward(dy, x_shape, kernel_size, stride=None, padding=0,
                        ceil_mode=False, count_include_pad=True, divisor_override=None):  # fmt: skip
    """Gradient of avg_pool2d with respect to its input x.

    Inverts:
        y[:, :, p, q] = window.sum(axis=(2, 3)) / divisor
    so every cell of the window receives dy[n, c, p, q] / divisor. Overlapping windows
    (stride < kernel) share cells, so the contributions are added; the padding's share (and
    what a ceil_mode window holds beyond the padding) is dropped, and cells that no window
    covers get 0.
    """
    dy = _f64(dy)  # dy (N, C, P, Q)
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    N, C, H, W = (int(d) for d in x_shape)
    _, _, P, Q = dy.shape

    # the padded input, with room for ceil_mode windows that hang past it (sliced off)
    Hp = max(H + 2 * ph, (P - 1) * sh + kh)
    Wp = max(W + 2 * pw, (Q - 1) * sw + kw)
    dxpad = np.zeros((N, C, Hp, Wp))  # dxpad (N, C, Hp, Wp)
    for p in range(P):
        for q in range(Q):
            divisor = _avg_divisor(
                p, q, H, W, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override
            )
            share = dy[:, :, p, q] / divisor  # share (N, C)
            dxpad[:, :, p * sh : p * sh + kh, q * sw : q * sw + kw] += share[:, :, None, None]
    return _out(dxpad[:, :, ph : ph + H, pw : pw + W])  # dx (N, C, H, W)


# ---------------------------------------------------------------------------------------
# adaptive_avg_pool2d: torch's windows
# ---------------------------------------------------------------------------------------


def _adaptive_windows(size_in, size_out):
    """The input cells [start, end) that each of the size_out output cells of an axis averages.

    torch's rule, with L = size_in and O = size_out: output cell i covers floor(i*L/O) to
    ceil((i+1)*L/O). Together the windows cover the axis; neighbours may share a cell, and
    with O > L cells repeat.
    """
    L, O = size_in, size_out  # noqa: E741 (the rule's letters)
    return [(i * L // O, -(-(i + 1) * L // O)) for i in range(O)]  # -(-a // b) = ceil(a / b)


def _adaptive_output_size(output_size, H, W):
    """(P, Q) from an int or an (h, w) pair; a None element keeps the input's size."""
    P, Q = (output_size, output_size) if np.isscalar(output_size) else output_size
    return (H if P is None else int(P)), (W if Q is None else int(Q))


def adaptive_avg_pool2d(x, output_size):
    """y[n, c, p, q] = mean of x[n, c, rows of window p, columns of window q].

    The windows are _adaptive_windows's (torch's rule), so any input size gives the output
    size (P, Q); y (N, C, P, Q), or (C, P, Q) for an unbatched x (C, H, W).
    """
    x = _f64(x)
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]  # (1, C, H, W)
    N, C, H, W = x.shape
    P, Q = _adaptive_output_size(output_size, H, W)

    y = np.empty((N, C, P, Q))  # y (N, C, P, Q)
    for p, (h0, h1) in enumerate(_adaptive_windows(H, P)):
        for q, (w0, w1) in enumerate(_adaptive_windows(W, Q)):
            y[:, :, p, q] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return _out(y[0] if unbatched else y)


def adaptive_avg_pool2d_backward(dy, x_shape, output_size):
    """Gradient of adaptive_avg_pool2d with respect to its input x.

    Inverts:
        y[:, :, p, q] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    so every cell of window (p, q) receives dy[n, c, p, q] / ((h1 - h0) * (w1 - w0)); cells
    that several windows share add their shares.
    """
    dy = _f64(dy)
    unbatched = len(x_shape) == 3
    if unbatched:
        dy, x_shape = dy[None], (1, *x_shape)
    N, C, H, W = (int(d) for d in x_shape)
    P, Q = _adaptive_output_size(output_size, H, W)

    dx = np.zeros((N, C, H, W))  # dx (N, C, H, W)
    for p, (h0, h1) in enumerate(_adaptive_windows(H, P)):
        for q, (w0, w1) in enumerate(_adaptive_windows(W, Q)):
            share = dy[:, :, p, q] / ((h1 - h0) * (w1 - w0))  # share (N, C)
            dx[:, :, h0:h1, w0:w1] += share[:, :, None, None]
    return _out(dx[0] if unbatched else dx)


# ---------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------


def relu(z):
    """a = max(z, 0); NaN stays NaN (np.maximum propagates it, as torch.relu does)."""
    z = _f64(z)
    return _out(np.maximum(z, 0.0))


def relu_backward(da, z):
    """Gradient of relu with respect to z.

    Inverts:
        return _out(np.maximum(z, 0.0))
    slope 1 where z > 0 and 0 where z <= 0 (at the kink z = 0 the gradient is 0, as in
    torch's threshold_backward `0 if z <= 0 else da`, which lets a NaN z pass da through).
    """
    da = _f64(da)
    z = _f64(z)
    return _out(np.where(z <= 0, 0.0, da))


def sigmoid(z):
    """a = 1 / (1 + exp(-z))."""
    z = _f64(z)
    with np.errstate(over="ignore"):  # exp(-z) -> inf for z << 0 gives a = 0, correctly
        return _out(1.0 / (1.0 + np.exp(-z)))


def sigmoid_backward(da, a):
    """Gradient of sigmoid with respect to z, from the forward OUTPUT a.

    Inverts:
        return _out(1.0 / (1.0 + np.exp(-z)))
    whose derivative is da/dz = a * (1 - a).
    """
    da = _f64(da)
    a = _f64(a)
    return _out(da * a * (1.0 - a))


def tanh(z):
    """a = tanh(z) = (exp(z) - exp(-z)) / (exp(z) + exp(-z)); +-1 for large |z|, no overflow."""
    z = _f64(z)
    return _out(np.tanh(z))


def tanh_backward(da, a):
    """Gradient of tanh with respect to z, from the forward OUTPUT a.

    Inverts:
        return _out(np.tanh(z))
    whose derivative is da/dz = 1 - tanh(z)^2 = 1 - a^2 (torch's tanh_backward), written
    (1 - a)(1 + a): near a = +-1, 1 - a * a would cancel to a few correct digits.
    """
    da = _f64(da)
    a = _f64(a)
    return _out(da * ((1.0 - a) * (1.0 + a)))


def leaky_relu(z, negative_slope=0.01):
    """a = z where z > 0, else negative_slope * z; NaN stays NaN (both sides are NaN)."""
    z = _f64(z)
    return _out(np.where(z > 0, z, z * negative_slope))


def leaky_relu_backward(da, z, negative_slope=0.01):
    """Gradient of leaky_relu with respect to z.

    Inverts:
        return _out(np.where(z > 0, z, z * negative_slope))
    slope 1 where z > 0 and negative_slope where z <= 0 (at z = 0 the slope's side, as in
    torch's leaky_relu_backward `da if z > 0 else da * negative_slope`).
    """
    da = _f64(da)
    z = _f64(z)
    return _out(np.where(z > 0, da, da * negative_slope))


_erf = np.vectorize(math.erf, otypes=[np.float64])  # NumPy has no erf; math's, per element


def _normal_cdf(z):
    """Phi(z) = P(X <= z) for X ~ N(0, 1) = (1 + erf(z / sqrt(2))) / 2."""
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


def _normal_pdf(z):
    """phi(z) = exp(-z^2 / 2) / sqrt(2 pi), the derivative of Phi."""
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


_GELU_KAPPA = 0.044715  # the cubic term of the tanh approximation


def _gelu_tanh_inner(z):
    """u = sqrt(2 / pi) * (z + 0.044715 z^3): tanh(u) approximates erf(z / sqrt(2))."""
    return math.sqrt(2.0 / math.pi) * (z + _GELU_KAPPA * z**3)


def _check_approximate(approximate):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")


def gelu(z, approximate="none"):
    """a = z * Phi(z) (approximate='none'), or torch's tanh approximation of it:

    approximate='tanh':  a = 0.5 * z * (1 + tanh(sqrt(2 / pi) * (z + 0.044715 z^3)))
    """
    _check_approximate(approximate)
    z = _f64(z)
    with np.errstate(over="ignore", invalid="ignore"):  # z^3 -> inf, inf * 0 -> NaN: torch's
        if approximate == "tanh":
            return _out(0.5 * z * (1.0 + np.tanh(_gelu_tanh_inner(z))))
        return _out(z * _normal_cdf(z))


def gelu_backward(da, z, approximate="none"):
    """Gradient of gelu with respect to z, from the forward INPUT z.

    Inverts:
        return _out(z * _normal_cdf(z))
    by the product rule: d(z Phi(z))/dz = Phi(z) + z phi(z). For approximate='tanh',
        a = 0.5 z (1 + t), t = tanh(u), u = sqrt(2 / pi) (z + 0.044715 z^3):
        da/dz = 0.5 (1 + t) + 0.5 z (1 - t^2) du/dz,  du/dz = sqrt(2 / pi) (1 + 3 * 0.044715 z^2)
    (torch's gelu_backward formulas).
    """
    _check_approximate(approximate)
    da = _f64(da)
    z = _f64(z)
    with np.errstate(over="ignore", invalid="ignore"):
        if approximate == "tanh":
            t = np.tanh(_gelu_tanh_inner(z))
            du_dz = math.sqrt(2.0 / math.pi) * (1.0 + 3.0 * _GELU_KAPPA * z * z)
            return _out(da * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du_dz))
        return _out(da * (_normal_cdf(z) + z * _normal_pdf(z)))


def silu(z):
    """a = z * sigmoid(z) = z / (1 + exp(-z)) (also called swish)."""
    z = _f64(z)
    with np.errstate(over="ignore", invalid="ignore"):  # exp(-z) -> inf: a = z / inf = -0
        return _out(z / (1.0 + np.exp(-z)))


def silu_backward(da, z):
    """Gradient of silu with respect to z, from the forward INPUT z.

    Inverts:
        return _out(z / (1.0 + np.exp(-z)))
    by the product rule with s = sigmoid(z), ds/dz = s (1 - s):
        da/dz = s + z s (1 - s) = s (1 + z (1 - s))   (torch's silu_backward).
    """
    da = _f64(da)
    z = _f64(z)
    with np.errstate(over="ignore", invalid="ignore"):
        s = 1.0 / (1.0 + np.exp(-z))
        return _out(da * s * (1.0 + z * (1.0 - s)))


# ---------------------------------------------------------------------------------------
# softmax and log_softmax along one dim (torch's rule: dim in [-ndim, ndim), a 0-d input
# counting as 1 dim), the backward from the output a
# ---------------------------------------------------------------------------------------


def _along(z, dim):
    """z with the softmax's dim moved last (a 0-d z as shape (1,)), and how to move it back."""
    z = _f64(z)
    shape = z.shape
    z = z.reshape(shape or (1,))
    axis = dim % z.ndim

    def back(a):
        return np.moveaxis(a, -1, axis).reshape(shape)

    return np.moveaxis(z, axis, -1), back


def softmax(z, dim=1):
    """a = exp(z) / sum(exp(z)) along dim, with the maximum subtracted first (exp <= 1)."""
    z, back = _along(z, dim)  # z (..., K)
    # (initial: an empty slice has no maximum; inf - inf = nan makes the slice nan, as torch)
    with np.errstate(invalid="ignore"):
        e = np.exp(z - z.max(axis=-1, keepdims=True, initial=-np.inf))
        return _out(back(e / e.sum(axis=-1, keepdims=True)))


def softmax_backward(da, a, dim=1):
    """Gradient of softmax with respect to z, from the forward OUTPUT a.

    Inverts:
        a = e / e.sum(axis=-1, keepdims=True)
    whose Jacobian is da_k/dz_j = a_k ([k == j] - a_j), so
        dz_j = sum_k da_k a_k ([k == j] - a_j) = a_j (da_j - sum_k da_k a_k).
    """
    da, _ = _along(da, dim)
    a, back = _along(a, dim)
    return _out(back(a * (da - (da * a).sum(axis=-1, keepdims=True))))


def log_softmax(z, dim=1):
    """a = z - log(sum(exp(z))) along dim = (z - top) - log(sum(exp(z - top))), top the max."""
    z, back = _along(z, dim)
    with np.errstate(invalid="ignore"):
        shifted = z - z.max(axis=-1, keepdims=True, initial=-np.inf)
        return _out(back(shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))))


def log_softmax_backward(da, a, dim=1):
    """Gradient of log_softmax with respect to z, from the forward OUTPUT a.

    Inverts:
        a = shifted - log(exp(shifted).sum(axis=-1, keepdims=True))
    whose Jacobian is da_k/dz_j = [k == j] - softmax_j = [k == j] - exp(a_j), so
        dz_j = da_j - exp(a_j) sum_k da_k.
    """
    da, _ = _along(da, dim)
    a, back = _along(a, dim)
    return _out(back(da - np.exp(a) * da.sum(axis=-1, keepdims=True)))


# ---------------------------------------------------------------------------------------
# dropout: y = x * mask / (1 - p), the mask drawn from (seed, flat index)
# ---------------------------------------------------------------------------------------

_U64 = np.uint64
_GAMMA = _U64(0x9E3779B97F4A7C15)  # SplitMix64's increment (2^64 / golden ratio)


def _mix64(z):
    """SplitMix64's finalizer on a uint64 array (arithmetic wraps modulo 2^64)."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def dropout_mask(shape, p, seed):
    """The keep mask cnnbp's dropout draws (bool, True = kept), written out in NumPy.

    Element i (flat, row-major) gets the counter-based hash
        h = mix64(mix64(seed) + (i + 1) * GAMMA)        (SplitMix64's i-th output)
    and the uniform u = (h >> 11) * 2^-53 in [0, 1); it is kept when u >= p, which happens
    with probability 1 - p. Nothing but (seed, i) enters: no state, no thread count.
    """
    count = int(np.prod(shape, dtype=np.int64))
    key = _mix64(np.array([seed], dtype=_U64))  # (1,)
    counter = np.arange(1, count + 1, dtype=_U64)  # i + 1 for i in [0, count)
    h = _mix64(key + counter * _GAMMA)  # h (count,)
    u = (h >> _U64(11)).astype(np.float64) * 2.0**-53  # exact: 53-bit integers
    return (u >= p).reshape(tuple(int(d) for d in shape))


def dropout(x, mask, p):
    """y = x * mask / (1 - p): dropped elements become 0, kept ones are scaled so that the
    expected value of y is x. p == 1 drops everything: y = x * 0, as torch."""
    x = _f64(x)
    mask = np.asarray(mask, dtype=bool)  # mask: x's shape, True = kept
    if p == 1:
        return _out(x * 0.0)
    return _out(x * mask / (1.0 - p))


def dropout_backward(dy, mask, p):
    """Gradient of dropout with respect to x.

    Inverts:
        return _out(x * mask / (1.0 - p))
    a scaling by the constant mask / (1 - p), so dx = dy * mask / (1 - p) (dy * 0 for p == 1).
    """
    dy = _f64(dy)
    mask = np.asarray(mask, dtype=bool)
    if p == 1:
        return _out(dy * 0.0)
    return _out(dy * mask / (1.0 - p))


# ---------------------------------------------------------------------------------------
# batch normalization over (N, C, H, W): statistics per channel c over its M = N*H*W values
# ---------------------------------------------------------------------------------------


def batch_norm2d(
    x,
    weight=None,
    bias=None,
    running_mean=None,
    running_var=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
):
    """(y, save_mean, save_invstd): y = (x - mean) / sqrt(var + eps) * weight + bias.

    Training: mean and var are each channel's batch statistics (var biased, divided by M);
    save_mean = mean, save_invstd = 1 / sqrt(var + eps); the running statistics, when
    given, are updated in place with the unbiased variance (torch):
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)
    An empty batch has mean 0 and var 0 and leaves them as they are. Evaluation: mean and
    var are the running statistics, and save_mean, save_invstd are empty (torch's).
    """
    x = _f64(x)  # x (N, C, H, W)
    N, C, H, W = x.shape
    M = N * H * W
    w = np.ones(C) if weight is None else _f64(weight)  # (C,)
    b = np.zeros(C) if bias is None else _f64(bias)  # (C,)
    if training:
        mean = x.mean(axis=(0, 2, 3)) if M else np.zeros(C)  # (C,)
        var = ((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3)) if M else np.zeros(C)
        if running_mean is not None and M:
            running_mean[...] = (1 - momentum) * _f64(running_mean) + momentum * mean
            running_var[...] = (1 - momentum) * _f64(running_var) + momentum * var * M / (M - 1)
        save_mean, save_invstd = mean, 1 / np.sqrt(var + eps)
    else:
        mean, var = _f64(running_mean), _f64(running_var)
        save_mean, save_invstd = np.zeros(0), np.zeros(0)
    invstd = 1 / np.sqrt(var + eps)  # (C,)
    xhat = (x - mean[None, :, None, None]) * invstd[None, :, None, None]
    y = xhat * w[None, :, None, None] + b[None, :, None, None]
    return _out(y), _out(save_mean), _out(save_invstd)


def batch_norm2d_backward(dy, x, weight, mean, invstd, training=True):
    """Gradients of batch_norm2d; returns (dx, dweight, dbias).

    Inverts:
        xhat = (x - mean[None, :, None, None]) * invstd[None, :, None, None]
        y = xhat * w[None, :, None, None] + b[None, :, None, None]
    dbias = sum(dy), dweight = sum(dy * xhat) per channel. In evaluation mode mean and invstd
    (the running statistics') are constants: dx = dy * w * invstd. In training they are the
    batch's, functions of every x of the channel:
        dmean/dx = 1 / M,  dvar/dx = 2 (x - mean) / M,  dinvstd/dvar = -invstd^3 / 2
    which together give dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
    """
    dy = _f64(dy)  # dy (N, C, H, W)
    x = _f64(x)  # x (N, C, H, W)
    N, C, H, W = x.shape
    M = N * H * W
    w = np.ones(C) if weight is None else _f64(weight)  # (C,)
    channel = (slice(None), None, None)  # (C,) -> (C, 1, 1), broadcast over (N, C, H, W)
    xhat = (x - _f64(mean)[channel]) * _f64(invstd)[channel]
    dbias = dy.sum(axis=(0, 2, 3))  # (C,)
    dweight = (dy * xhat).sum(axis=(0, 2, 3))  # (C,)
    scale = (w * _f64(invstd))[channel]
    if not training or M == 0:
        return _out(dy * scale), _out(dweight), _out(dbias)
    dx = scale * (dy - dbias[channel] / M - xhat * dweight[channel] / M)
    return _out(dx), _out(dweight), _out(dbias)


# ---------------------------------------------------------------------------------------
# linear (fully connected) and flatten
# ---------------------------------------------------------------------------------------


def linear(x, w, b=None):
    """y = x w^T + b, over any number of leading dimensions of x."""
    x = _f64(x)  # x (*, IN)
    w = _f64(w)  # w (OUT, IN)
    y = x @ w.T  # y (*, OUT)
    if b is not None:
        y = y + _f64(b)  # b (OUT,) broadcast over the leading dims
    return _out(y)


def linear_backward(dy, x, w):
    """Gradients of linear; returns (dx, dw, db).

    Inverts:
        y = x @ w.T
        y = y + _f64(b)
    so dx = dy w, dw = dy^T x and db = dy summed, each over every leading dimension.
    """
    dy = _f64(dy)  # dy (*, OUT)
    x = _f64(x)  # x (*, IN)
    w = _f64(w)  # w (OUT, IN)
    OUT, IN = w.shape
    dx = dy @ w  # dx (*, IN)
    # Every leading index is one more sample of the same weights: stack them as rows.
    dy2 = dy.reshape(-1, OUT)  # dy2 (M, OUT), M = product of leading dims
    x2 = x.reshape(-1, IN)  # x2 (M, IN)
    dw = dy2.T @ x2  # dw (OUT, IN)
    db = dy2.sum(axis=0)  # db (OUT,)
    return _out(dx), _out(dw), _out(db)


def flatten(x):
    """Keeps the batch axis and flattens the rest: (N, ...) -> (N, D).

    Flatten has no kernel; it is here so the oracle can run the whole derivation.
    """
    x = _f64(x)  # x (N, ...)
    N = x.shape[0]
    D = int(np.prod(x.shape[1:], dtype=np.int64))
    return _out(x.reshape(N, D))  # (N, D)


def flatten_backward(dF, x_shape):
    """Gradient of flatten: reshaped back to x's shape.

    Inverts:
        return _out(x.reshape(N, D))
    """
    dF = _f64(dF)  # dF (N, D)
    return _out(dF.reshape(tuple(int(d) for d in x_shape)))


# ---------------------------------------------------------------------------------------
# losses, with torch's options: each computes the per-element losses l (torch's
# reduction='none'), then reduces them: 'mean' (the default) and 'sum' give a python float.
# A backward returns dL/dinput for dL/d(loss) = grad_output (1 for a reduced loss, an
# array of the loss's shape for 'none').
# ---------------------------------------------------------------------------------------

REDUCTIONS = ("mean", "sum", "none")


def _reduce(losses, reduction, divisor=None):
    """torch's reduction of the per-element losses; 'mean' divides by divisor (their count)."""
    if reduction == "none":
        return _out(losses)
    total = float(np.sum(losses))
    if reduction == "sum":
        return total
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 = nan, as torch
        return float(np.float64(total) / (losses.size if divisor is None else divisor))


def _grad_of_loss(grad_output, reduction, shape, divisor=None):
    """dL/d l per element: grad_output (an array for 'none', else a number, 1 by default),
    over the mean's divisor."""
    if reduction == "none":
        return _f64(grad_output)
    g = 1.0 if grad_output is None else float(grad_output)
    if reduction == "mean":
        n = np.prod(shape) if divisor is None else divisor
        with np.errstate(divide="ignore"):
            g = np.float64(g) / n
    return np.full(shape, g)


def _weight_like(weight, shape):
    """A weight broadcast to shape (torch's expand), or ones."""
    return np.ones(shape) if weight is None else np.broadcast_to(_f64(weight), shape)


def binary_cross_entropy(a, y, weight=None, reduction="mean"):
    """l = -weight * (y * log a + (1 - y) * log(1 - a)), each log clamped at -100 as torch does.

    The clamp keeps a = 0 or a = 1 finite: a = 0 with y = 1 costs 100, not inf.
    """
    a = _f64(a)  # a: probabilities in [0, 1]
    y = _f64(y)  # y: targets, same shape as a
    w = _weight_like(weight, a.shape)  # weight: broadcast to a's shape
    with np.errstate(divide="ignore"):  # log(0) = -inf, clamped just below
        log_a = np.maximum(np.log(a), -100.0)
        log_1ma = np.maximum(np.log1p(-a), -100.0)
    return _reduce(-w * (y * log_a + (1.0 - y) * log_1ma), reduction)


# torch declares this clamp as a C++ `float` (constexpr float EPSILON = 1e-12), so in
# float64 it is 1e-12 rounded to float32, 9.99999996e-13; using it keeps the clamped
# gradient equal to torch's, not just close.
BCE_EPSILON = float(np.float32(1e-12))


def binary_cross_entropy_backward(a, y, weight=None, reduction="mean", grad_output=None):
    """dL/da of binary_cross_entropy.

    Inverts:
        l = -w * (y * log_a + (1.0 - y) * log_1ma)
    with log_a = log a and log_1ma = log(1 - a) (unclamped in the interior):
    dl/da = w * (-y/a + (1 - y)/(1 - a)) = w * (a - y) / (a (1 - a)), times dL/dl (1/numel
    for the mean). Like torch, the denominator is kept at least BCE_EPSILON (~1e-12) so
    a = 0 or 1 stays finite.
    """
    a = _f64(a)
    y = _f64(y)
    w = _weight_like(weight, a.shape)
    g = _grad_of_loss(grad_output, reduction, a.shape)
    return _out(g * w * (a - y) / np.maximum(a * (1.0 - a), BCE_EPSILON))


def binary_cross_entropy_with_logits(z, y, weight=None, pos_weight=None, reduction="mean"):
    """BCE of sigmoid(z), computed from the logits z without forming sigmoid(z).

    torch's form, with pos_weight p weighting the positive term (broadcast along the last
    dim, the classes):
        l = w * ((1 - y) z + (1 + (p - 1) y) * log(1 + exp(-z)))
    and log(1 + exp(-z)) = log(1 + exp(-|z|)) + max(-z, 0), where exp(-|z|) <= 1 never
    overflows. With p = 1 it is max(z, 0) - z y + log(1 + exp(-|z|)).
    """
    z = _f64(z)  # z: logits
    y = _f64(y)  # y: targets, same shape as z
    w = _weight_like(weight, z.shape)
    p = _weight_like(pos_weight, z.shape)
    log_weight = 1.0 + (p - 1.0) * y
    softplus_neg_z = np.log1p(np.exp(-np.abs(z))) + np.maximum(-z, 0.0)  # log(1 + exp(-z))
    return _reduce(w * ((1.0 - y) * z + log_weight * softplus_neg_z), reduction)


def binary_cross_entropy_with_logits_backward(
    z, y, weight=None, pos_weight=None, reduction="mean", grad_output=None
):
    """dL/dz of binary_cross_entropy_with_logits.

    Inverts:
        l = w * ((1 - y) z + log_weight * log(1 + exp(-z)))
    d log(1 + exp(-z))/dz = -sigmoid(-z) = sigmoid(z) - 1, so
    dl/dz = w * ((1 - y) + log_weight (sigmoid(z) - 1)) = w * (log_weight sigmoid(z) - p y),
    which is sigmoid(z) - y when w = p = 1; times dL/dl (1/numel for the mean).
    """
    z = _f64(z)
    y = _f64(y)
    w = _weight_like(weight, z.shape)
    p = _weight_like(pos_weight, z.shape)
    log_weight = 1.0 + (p - 1.0) * y
    g = _grad_of_loss(grad_output, reduction, z.shape)
    return _out(g * w * (log_weight * sigmoid(z) - p * y))


def _cross_entropy_parts(logits, target, weight, ignore_index, label_smoothing):
    """The pieces torch's cross_entropy combines, with the classes moved last:
    log_p (M, K) = log_softmax of each position's logits (M = N * d1 * ...), the mixed
    targets t (M, K) = (1 - eps) onehot(label) or probabilities + eps / K, w (K,), the
    mask of counted positions (M,) and the mean's divisor."""
    z = np.moveaxis(_f64(logits), 1, -1)  # (N, d1, ..., K)
    K = z.shape[-1]
    z = z.reshape(-1, K)  # z (M, K)
    w = np.ones(K) if weight is None else _f64(weight)  # w (K,): one per class
    eps = float(label_smoothing)
    zs = z - z.max(axis=1, keepdims=True)  # stable: exp(zs) <= 1
    log_p = zs - np.log(np.exp(zs).sum(axis=1, keepdims=True))  # log_softmax (M, K)
    target = np.asarray(target)
    if target.dtype.kind == "f" and target.shape == np.shape(logits):  # class probabilities
        probabilities = np.moveaxis(_f64(target), 1, -1).reshape(-1, K)
        t = (1.0 - eps) * probabilities + eps / K
        counted = np.ones(len(z), dtype=bool)
        divisor = float(len(z))  # torch: the number of positions, weights or not
    else:  # class indices (N, d1, ...); ignore_index counts for nothing
        labels = target.astype(np.int64).reshape(-1)  # (M,)
        counted = labels != ignore_index
        onehot = np.zeros_like(z)
        onehot[np.flatnonzero(counted), labels[counted]] = 1.0
        t = (1.0 - eps) * onehot + eps / K
        divisor = float(w[labels[counted]].sum())  # torch: the counted targets' weights
    return log_p, t, w, counted, divisor


def cross_entropy(
    logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0
):
    """Softmax cross-entropy of logits (N, K) or (N, K, d1, ...) against class indices
    (N,) / (N, d1, ...) or class probabilities of the logits' shape, as torch:

        l = -sum_c w_c t_c log p_c     (0 where label == ignore_index)

    with t the one-hot label or the probabilities, mixed with the uniform 1/K by
    label_smoothing eps: t = (1 - eps) t + eps / K (for labels torch writes this as
    (1 - eps) nll + eps / K * smooth_loss, the same sum). 'mean' divides by the counted
    labels' weights (nan when every label is ignored), or by N * d1 * ... for probabilities.
    """
    log_p, t, w, counted, divisor = _cross_entropy_parts(
        logits, target, weight, ignore_index, label_smoothing
    )
    losses = np.where(counted, -(w * t * np.where(t > 0, log_p, 0.0)).sum(axis=1), 0.0)
    shape = np.shape(logits)[:1] + np.shape(logits)[2:]
    return _reduce(losses.reshape(shape), reduction, divisor)


def cross_entropy_backward(
    logits,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    grad_output=None,
):
    """dL/dlogits of cross_entropy.

    Inverts:
        l = -(w * t * log_p).sum(axis=1)
    with d log p_c / dz_k = [c == k] - p_k: dl/dz_k = p_k sum_c w_c t_c - w_k t_k, zero
    where the label is ignored; times dL/dl (over the divisor for the mean).
    """
    log_p, t, w, counted, divisor = _cross_entropy_parts(
        logits, target, weight, ignore_index, label_smoothing
    )
    p = np.exp(log_p)  # softmax (M, K)
    dl = p * (w * t).sum(axis=1, keepdims=True) - w * t  # (M, K)
    shape = np.shape(logits)[:1] + np.shape(logits)[2:]
    g = _grad_of_loss(grad_output, reduction, shape, divisor).reshape(-1, 1)
    with np.errstate(invalid="ignore"):  # inf * 0 at ignored positions, dropped
        dz = np.where(counted[:, None], g * dl, 0.0)  # (M, K), classes last
    moved = np.shape(logits)[:1] + np.shape(logits)[2:] + np.shape(logits)[1:2]
    return _out(np.moveaxis(dz.reshape(moved), -1, 1))


def _nll_loss_parts(input, target, weight, ignore_index):
    """input (N, K, d1, ...) with the classes moved last, as (M, K) (an unbatched (K,) input
    is one row), the labels (M,), w (K,), the mask of counted positions (M,), the mean's
    divisor (the counted labels' weights) and the loss's shape."""
    x = _f64(input)
    loss_shape = np.shape(target)
    if x.ndim == 1:  # unbatched (K,), a () target
        x = x[None]
    x = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])  # x (M, K)
    w = np.ones(x.shape[1]) if weight is None else _f64(weight)  # w (K,): one per class
    labels = np.asarray(target).astype(np.int64).reshape(-1)  # (M,)
    counted = labels != ignore_index
    divisor = float(w[labels[counted]].sum())  # torch: the counted targets' weights
    return x, labels, w, counted, divisor, loss_shape


def nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean"):
    """Negative log-likelihood of log-probabilities input (N, K) or (N, K, d1, ...) (or
    unbatched (K,)) against class indices (N,) / (N, d1, ...) (or ()), as torch:

        l = -w_label * input[label]     (0 where label == ignore_index)

    'mean' divides by the counted labels' weights (nan when every label is ignored).
    """
    x, labels, w, counted, divisor, loss_shape = _nll_loss_parts(
        input, target, weight, ignore_index
    )
    rows = np.flatnonzero(counted)
    losses = np.zeros(len(x))
    losses[rows] = -w[labels[rows]] * x[rows, labels[rows]]
    return _reduce(losses.reshape(loss_shape), reduction, divisor)


def nll_loss_backward(
    input, target, weight=None, ignore_index=-100, reduction="mean", grad_output=None
):
    """dL/dinput of nll_loss.

    Inverts:
        losses[rows] = -w[labels[rows]] * x[rows, labels[rows]]
    dl/dx_c = -w_c at the label's class c, 0 at the others and where the label is ignored;
    times dL/dl (over the divisor for the mean).
    """
    x, labels, w, counted, divisor, loss_shape = _nll_loss_parts(
        input, target, weight, ignore_index
    )
    g = _grad_of_loss(grad_output, reduction, loss_shape, divisor).reshape(-1)  # (M,)
    rows = np.flatnonzero(counted)
    dx = np.zeros_like(x)  # (M, K), classes last
    dx[rows, labels[rows]] = -w[labels[rows]] * g[rows]
    shape = np.shape(input)
    if len(shape) == 1:
        return _out(dx.reshape(shape))
    moved = shape[:1] + shape[2:] + shape[1:2]
    return _out(np.moveaxis(dx.reshape(moved), -1, 1))


# ---------------------------------------------------------------------------------------
# the derivation network, forward and backward, with every intermediate kept
# ---------------------------------------------------------------------------------------


def seed_network(X, W1, B1, W2, B2, Y):
    """One training step of the derivation network, returning every quantity by name.

    X (N, 1, 6, 6) --conv W1 (1, 1, 3, 3) + B1 (1,)--> Z1 (N, 1, 4, 4) --ReLU--> A1
      --maxpool 2x2/2--> P1 (N, 1, 2, 2) --flatten--> F (N, 4)
      --F W2^T + B2 (W2 (1, 4), B2 (1,))--> Z2 (N, 1) --sigmoid--> A2 --BCE(Y (N, 1))--> L

    The backward follows the derivation line by line; the loss is a mean over the batch,
    so dL/dZ2 carries a factor 1/N.
    """
    X = _f64(X)  # X (N, 1, 6, 6)
    W1 = _f64(W1)  # W1 (1, 1, 3, 3)
    B1 = _f64(B1)  # B1 (1,)
    W2 = _f64(W2)  # W2 (1, 4)
    B2 = _f64(B2)  # B2 (1,)
    Y = _f64(Y)  # Y (N, 1)
    N = X.shape[0]

    # ---- forward
    Z1 = conv2d(X, W1, B1)  # Z1 (N, 1, 4, 4)
    A1 = relu(Z1)  # A1 (N, 1, 4, 4)
    P1, idx = max_pool2d(A1, 2, 2)  # P1, idx (N, 1, 2, 2)
    F = flatten(P1)  # F (N, 4)
    Z2 = linear(F, W2, B2)  # Z2 (N, 1)
    A2 = sigmoid(Z2)  # A2 (N, 1), y_hat
    L = binary_cross_entropy(A2, Y)  # python float

    # ---- backward
    # Shown for inspection only: the next line does not go through it.
    dA2 = binary_cross_entropy_backward(A2, Y)  # dL/dA2 (N, 1)
    # dL/dZ2 = A2 - Y: sigmoid and BCE together (the a (1 - a) factors cancel); / N for the mean.
    dZ2 = (A2 - Y) / N  # dL/dZ2 (N, 1)
    # dL/dW2 = (A2 - Y) F^T, summed over the batch.
    dW2 = dZ2.T @ F  # dL/dW2 (1, 4)
    # dL/dB2 = A2 - Y, summed over the batch.
    dB2 = dZ2.sum(axis=0)  # dL/dB2 (1,)
    # dL/dF = W2^T (A2 - Y), one row per sample.
    dF = dZ2 @ W2  # dL/dF (N, 4)
    # dL/dP1 = reshape(dL/dF, P1.shape).
    dP1 = flatten_backward(dF, P1.shape)  # dL/dP1 (N, 1, 2, 2)
    # dL/dA1 = dL/dP1 scattered to the argmax of each pooling window, zero elsewhere.
    dA1 = max_pool2d_backward(dP1, idx, A1.shape)  # dL/dA1 (N, 1, 4, 4)
    # dL/dZ1 = dL/dA1 * (Z1 > 0).
    dZ1 = relu_backward(dA1, Z1)  # dL/dZ1 (N, 1, 4, 4)
    # dL/dB1 = sum(dL/dZ1); dL/dW1 = valid cross-correlation of X with dL/dZ1;
    # dL/dX = full convolution of dL/dZ1 with W1 rotated 180 degrees.
    dX, dW1, dB1 = conv2d_backward(dZ1, X, W1)

    return {
        "X": _out(X),
        "W1": _out(W1),
        "B1": _out(B1),
        "Z1": Z1,
        "A1": A1,
        "P1": P1,
        "F": F,
        "W2": _out(W2),
        "B2": _out(B2),
        "Z2": Z2,
        "A2": A2,
        "Y": _out(Y),
        "L": L,
        "dL/dA2": dA2,
        "dL/dZ2": _out(dZ2),
        "dL/dW2": _out(dW2),
        "dL/dB2": _out(dB2),
        "dL/dF": _out(dF),
        "dL/dP1": dP1,
        "dL/dA1": dA1,
        "dL/dZ1": dZ1,
        "dL/dW1": dW1,
        "dL/dB1": dB1,
        "dL/dX": dX,
    }


# ---------------------------------------------------------------------------------------
# optimizer updates: one step for one parameter, torch.optim's rules written out
# ---------------------------------------------------------------------------------------


def sgd_step(
    p, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False
):
    """One step of torch.optim.SGD; returns (p, momentum_buffer).

    torch.optim.SGD's update, line for line:
        g = grad + weight_decay * p
        b = g                                      on the first step (momentum_buffer None)
        b = momentum * b + (1 - dampening) * g     after it
        g = g + momentum * b  if nesterov  else b
        p = p - lr * g
    Without momentum there is no buffer: it stays None and g is used as it is.
    """
    p = _f64(p)
    g = _f64(grad) + weight_decay * p
    if momentum:
        if momentum_buffer is None:
            momentum_buffer = g.copy()
        else:
            momentum_buffer = momentum * _f64(momentum_buffer) + (1 - dampening) * g
        g = g + momentum * momentum_buffer if nesterov else momentum_buffer
    return _out(p - lr * g), momentum_buffer


def adam_step(
    p, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
):
    """One step of torch.optim.Adam (amsgrad off); returns (p, exp_avg, exp_avg_sq, step).

    `step` counts the steps taken before this one (0 at first, when exp_avg and exp_avg_sq
    may be 0). torch.optim.Adam's update, line for line, with t = step + 1:
        g = grad + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """
    beta1, beta2 = betas
    t = step + 1
    p = _f64(p)
    g = _f64(grad) + weight_decay * p
    m = beta1 * _f64(exp_avg) + (1 - beta1) * g
    v = beta2 * _f64(exp_avg_sq) + (1 - beta2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - beta2**t) + eps
    return _out(p - lr / (1 - beta1**t) * m / denom), _out(m), _out(v), t


def adamw_step(
    p, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2
):
    """One step of torch.optim.AdamW; returns (p, exp_avg, exp_avg_sq, step).

    Decoupled weight decay: the parameter shrinks first, and the gradient is left alone,
        p = p * (1 - lr * weight_decay)
    then Adam's update above without weight decay.
    """
    p = _f64(p) * (1 - lr * weight_decay)
    return adam_step(p, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay=0.0)
