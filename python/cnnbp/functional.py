"""Functional API: one function per C++ kernel, forward and backward side by side.

Arrays are NumPy, NCHW, float32 or float64 (not mixed within a call); outputs are new
C-contiguous arrays. Backward functions return gradients, they never accumulate.
Bad input raises ValueError (shapes, sizes, parameters) or TypeError (dtypes, types),
with a message that starts with the op's name, e.g. ``[conv2d] weight: expected ...``.

    y            = conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1)
                                            # x (N,C,H,W) w (K,C/groups,R,S) b (K,)
    dx, dw, db   = conv2d_backward(dy, x, w, stride=1, padding=0, dilation=1, groups=1)
    y, idx       = max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1,
                              ceil_mode=False)                   # idx: flat h*W+w
    dx           = max_pool2d_backward(dy, idx, x_shape)
    y            = avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False,
                              count_include_pad=True, divisor_override=None)
    dx           = avg_pool2d_backward(dy, x_shape, kernel_size, ...the same options...)
    y            = adaptive_avg_pool2d(x, output_size)   # output_size: int or (h, w), None = keep
    dx           = adaptive_avg_pool2d_backward(dy, x_shape, output_size)
    a = relu(z);    dz = relu_backward(da, z)
    a = sigmoid(z); dz = sigmoid_backward(da, a)
    a = tanh(z);    dz = tanh_backward(da, a)
    a = leaky_relu(z, negative_slope=0.01);  dz = leaky_relu_backward(da, z, negative_slope=0.01)
    a = gelu(z, approximate='none');         dz = gelu_backward(da, z, approximate='none')
    a = silu(z);    dz = silu_backward(da, z)                    # z * sigmoid(z)
    a = softmax(z, dim=1);     dz = softmax_backward(da, a, dim=1)
    a = log_softmax(z, dim=1); dz = log_softmax_backward(da, a, dim=1)
    y, mask      = dropout(x, p=0.5, seed=0)                     # mask bool: True = kept
    dx           = dropout_backward(dy, mask, p)                 # y = x * mask / (1 - p)
    y, mean, invstd = batch_norm2d(x, weight=None, bias=None, running_mean=None,
                                   running_var=None, training=False, momentum=0.1, eps=1e-5)
    dx, dweight, dbias = batch_norm2d_backward(dy, x, weight, mean, invstd, training=True)
    y = linear(x, w, b=None)                                     # w (out, in): y = x w^T + b
    dx, dw, db   = linear_backward(dy, x, w)
    loss = binary_cross_entropy(a, y, weight=None, reduction='mean')
    da   = binary_cross_entropy_backward(a, y, weight=None, reduction='mean', grad_output=None)
    loss = binary_cross_entropy_with_logits(z, y, weight=None, pos_weight=None, reduction='mean')
    dz   = binary_cross_entropy_with_logits_backward(z, y, ..., grad_output=None)
    loss = cross_entropy(logits, target, weight=None, ignore_index=-100, reduction='mean',
                         label_smoothing=0.0)
    dz   = cross_entropy_backward(logits, target, ..., grad_output=None)
    loss = nll_loss(input, target, weight=None, ignore_index=-100, reduction='mean')
    dx   = nll_loss_backward(input, target, ..., grad_output=None)

Losses have torch's options and semantics: reduction 'mean' (the default) or 'sum' gives a
float, 'none' the array of per-element losses; a backward takes the forward's arguments and
grad_output = dL/d(loss) (1 when None for a reduced loss, an array of the loss's shape for
'none'). weight and pos_weight broadcast to the input's shape (pos_weight along the last
dim, the classes); cross_entropy takes logits (N, K) or (N, K, d1, ...) with class indices
(N,) / (N, d1, ...) (an integer array; ignore_index counts for nothing) or class
probabilities of the logits' shape (floats), weight (K,), and label_smoothing in [0, 1];
nll_loss takes log-probabilities (log_softmax's output) of the same shapes with class indices
only, l = -weight[label] * input[label], its mean divided by the counted labels' weights.
conv2d has torch's options and semantics: padding an int, a pair, 'valid' (none) or 'same'
(stride 1; the output keeps the input's size, an odd total padding's extra zero going below
and to the right), taps dilation apart, and groups splitting C and K (groups == C is the
depthwise convolution). Every op on (N, C, H, W) also takes an unbatched (C, H, W) input
and returns an unbatched output, and cross_entropy unbatched logits (K,); an empty batch
(N = 0) gives empty outputs and zero weight gradients (a mean loss of nothing is NaN).
The pools have torch's options and semantics: ceil_mode rounds the output size up (a last
window may hang past the padding, never start in it); avg_pool2d divides by divisor_override
when given, else by the window's cells inside the padded input (count_include_pad=True) or
inside the input; output_size(in_size, kernel, stride, padding, dilation, ceil_mode) is the
rule both use. adaptive_avg_pool2d gives every input size the output (P, Q) = output_size (an
int, or an (h, w) pair whose None elements keep the input's size), output cell i of an axis
of input length L and output length O averaging input cells floor(i*L/O) to ceil((i+1)*L/O)
(torch's windows; with O > L they repeat cells). dropout's mask is a function of (seed, flat index) only
(cnnbp.reference.dropout_mask writes the hash out in NumPy): the same for any thread count
and on every run; p must lie in [0, 1], p == 0 is the identity and p == 1 gives x * 0.
batch_norm2d has torch's semantics (F.batch_norm on (N, C, H, W), native_batch_norm's
outputs): training uses each channel's batch mean and biased variance, returns them as mean
and invstd = 1 / sqrt(var + eps), and updates running_mean / running_var in place when given
(running = (1 - momentum) * running + momentum * batch, the variance unbiased; they must then
be writable C-contiguous arrays of x's dtype); it needs more than one value per channel.
Evaluation uses the running statistics and returns empty mean and invstd. weight and bias may
be None (affine=False). The backward differentiates through the batch statistics
(training=True, mean and invstd the forward's); for an evaluation-mode forward pass
training=False, mean = running_mean and invstd = 1 / sqrt(running_var + eps).
``conv2d_workspace_bytes(x_shape, w_shape, stride, padding, dtype, dilation, groups)``
reports the scratch memory a convolution allocates: a few images' worth per thread, never
the whole batch.
stride, padding, dilation and kernel_size take an int or an (h, w) pair.
The activations have torch's names, defaults and formulas: leaky_relu takes any finite
negative_slope; gelu's approximate is 'none' (z * 0.5 * (1 + erf(z / sqrt(2)))) or 'tanh'
(torch's tanh approximation); leaky_relu, gelu and silu compute their backward from the
input z, sigmoid and tanh from the output a. softmax and log_softmax run along dim (torch's
rule: an int in [-ndim, ndim), negative counted from the end) of any shape, computed stably
(the maximum subtracted, sums in float64), their backward from the output a as torch's.
"""

import math

import numpy as np

from ._core import (
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_backward,
    avg_pool2d,
    avg_pool2d_backward,
    batch_norm2d,
    batch_norm2d_backward,
    binary_cross_entropy,
    binary_cross_entropy_backward,
    binary_cross_entropy_with_logits,
    binary_cross_entropy_with_logits_backward,
    conv2d,
    conv2d_backward,
    conv2d_workspace_bytes,
    cross_entropy,
    cross_entropy_backward,
    dropout,
    dropout_backward,
    gelu,
    gelu_backward,
    leaky_relu,
    leaky_relu_backward,
    linear,
    linear_backward,
    log_softmax,
    log_softmax_backward,
    max_pool2d,
    max_pool2d_backward,
    nll_loss,
    nll_loss_backward,
    output_size,
    relu,
    relu_backward,
    sigmoid,
    sigmoid_backward,
    silu,
    silu_backward,
    softmax,
    softmax_backward,
    tanh,
    tanh_backward,
)


def flatten(x):
    """F (N, C*H*W) = x (N, C, H, W) reshaped: flattening moves no numbers.

    Flatten has no kernel: it is a reshape (a copy only when x is not C-contiguous).
    """
    x = np.asarray(x)
    if x.ndim < 1:  # checked before the copy, which would make a 0-d array 1-d
        raise ValueError(f"[flatten] input: expected at least 1 dim (N, ...), got shape {x.shape}")
    # the features counted, not inferred: -1 cannot be inferred for an empty batch
    return np.ascontiguousarray(x).reshape(x.shape[0], math.prod(x.shape[1:]))


def flatten_backward(dF, x_shape):
    """dx = dF reshaped back to the input's shape (inverts ``F = x.reshape(N, -1)``)."""
    dF = np.ascontiguousarray(dF)
    # math.prod for the usual tuple: np.prod would first convert it into an array
    count = math.prod(x_shape) if isinstance(x_shape, tuple) else int(np.prod(x_shape))
    if count != dF.size:
        raise ValueError(
            f"[flatten_backward] dF: expected {int(count)} elements "
            f"to fill x_shape {tuple(x_shape)}, got shape {dF.shape}"
        )
    return dF.reshape(x_shape)


__all__ = [
    "output_size",
    "conv2d",
    "conv2d_backward",
    "conv2d_workspace_bytes",
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
]
