"""ONNX export: ``model.to_onnx(path, input_shape)`` and ``cnnbp export``.

A model is written as the network its eval mode computes (BatchNorm2d with its running
statistics, Dropout as the identity), one ONNX node or a few per layer, built with the
``onnx`` package's helpers (``pip install 'cnnbp[onnx]'``; imported only when a model is
exported) and checked by ``onnx.checker`` before it is saved. The graph has one input,
"input" (N, *input_shape), and one output, "output"; the batch dim N is left free.
Weights are initializers under their state_dict names ("3.block.0.weight").

Every layer type the C++ registry declares has an entry in ``_EXPORTERS``. An exporter
reads the layer's arguments, emits its nodes and returns the output's shape (batch dim
first, as None), so that the next layer's checks and choices (AdaptiveAvgPool2d's windows,
Softmax's axis) see the shape the network has there. What ONNX cannot express is refused
with ValueError("[to_onnx] layer PATH (Type): ..."), before anything is written.

The graph is float32 whatever the model's dtype: a float64 model's weights are rounded to
float32 (onnxruntime's CPU convolutions run in float32 only).

This module is a leaf: it imports nn, and nothing in the package imports it but
``Module.to_onnx`` and the command line (``cnnbp export``), when called.
"""

from __future__ import annotations

import math
import os

import numpy as np

from . import nn

OPSET = 17  # onnxruntime 1.14 and later run every operator used here at this opset
IR_VERSION = 8  # the IR version of opset 17 (ONNX 1.12), so older runtimes load the file
BATCH_DIM = "N"


def _import_onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as error:
        raise ImportError(
            "[to_onnx] onnx: expected the onnx package (pip install 'cnnbp[onnx]'), "
            f"got {type(error).__name__}: {error}"
        ) from None
    return onnx, helper, numpy_helper


def to_model(model, input_shape):
    """The onnx.ModelProto of `model` (an nn.Module) in eval mode, for inputs of shape
    (N, *input_shape), N free; checked by onnx.checker."""
    onnx, helper, numpy_helper = _import_onnx()
    shape = _input_shape(input_shape)
    graph = _Graph(helper, numpy_helper)
    output, out_shape = graph.module(model, "", "input", (None, *shape))
    graph.nodes.append(helper.make_node("Identity", [output], ["output"], name="output"))

    def value_info(name, dims):
        dims = [BATCH_DIM if d is None else d for d in dims]
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)

    proto = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "cnnbp",
            [value_info("input", (None, *shape))],
            [value_info("output", out_shape)],
            initializer=graph.initializers,
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="cnnbp",
    )
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export(model, path, input_shape):
    """Write `model` to `path` as ONNX (see to_model); returns the onnx.ModelProto."""
    onnx, _, _ = _import_onnx()
    proto = to_model(model, input_shape)
    onnx.save_model(proto, os.fspath(path))
    return proto


def _input_shape(input_shape):
    """input_shape as a tuple of positive ints (the dims after the batch dim)."""
    try:
        dims = tuple(input_shape)
    except TypeError:
        dims = None
    if (
        not dims
        or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in dims)
        or any(d < 1 for d in dims)
    ):
        raise ValueError(
            f"[to_onnx] input_shape: expected the dims after the batch dim, positive ints "
            f"such as (1, 28, 28), got {input_shape!r}"
        )
    return tuple(int(d) for d in dims)


def _shape_str(shape):
    return "(" + ", ".join(BATCH_DIM if d is None else str(d) for d in shape) + ")"


class _Refused(ValueError):
    """An exporter's refusal; _Graph.module names the layer in the message."""


class _Graph:
    """The nodes and initializers of the graph being built, with unique tensor names."""

    def __init__(self, helper, numpy_helper):
        self.helper = helper
        self.numpy_helper = numpy_helper
        self.nodes = []
        self.initializers = []
        self._names = set()

    def name(self, wanted):
        name, i = wanted, 1
        while name in self._names or name in ("input", "output"):
            name, i = f"{wanted}_{i}", i + 1
        self._names.add(name)
        return name

    def constant(self, name, array):
        """An initializer holding `array` as float32 (int64 arrays stay int64)."""
        array = np.asarray(array)
        array = array if array.dtype == np.int64 else array.astype(np.float32)
        name = self.name(name)
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, path, **attributes):
        """One node; returns the name of its (one) output."""
        output = self.name(f"{path}.{op}" if path else op)
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def module(self, module, path, x, shape):
        """Emit `module` applied to tensor `x` of `shape`; returns (output name, its shape)."""
        kind = type(module).__name__
        label = f"layer {path} ({kind})" if path else f"layer {kind}"
        if isinstance(module, nn._Container):
            exporter = next((e for c, e in _CONTAINERS.items() if isinstance(module, c)), None)
        elif isinstance(module, nn._DeclaredLayer):
            exporter = _EXPORTERS.get(module._declaration["name"])
        else:
            exporter = None
        if exporter is None or _runs_in_python(module):
            raise ValueError(
                f"[to_onnx] {label}: expected a cnnbp layer or container, got a module "
                "whose forward runs in Python, which cannot be exported"
            )
        try:
            return exporter(self, module, path, x, shape)
        except _Refused as error:
            raise ValueError(f"[to_onnx] {label}: {error}") from None


def _runs_in_python(module):
    """Whether a built-in module's class or instance redefines forward or backward (it then
    runs in Python, as nn's _NativeModule._as_layer decides)."""
    return (
        type(module).forward is not nn._NativeModule.forward
        or type(module).backward is not nn._NativeModule.backward
        or "forward" in module.__dict__
        or "backward" in module.__dict__
    )


def _prefix(path):
    return f"{path}." if path else ""


# ---- containers ----------------------------------------------------------------------------


def _sequential(graph, module, path, x, shape):
    for name, child in module.named_children():
        x, shape = graph.module(child, _prefix(path) + name, x, shape)
    return x, shape


def _residual(graph, module, path, x, shape):
    """y = block(x) + (shortcut(x) or x): Add."""
    y, y_shape = graph.module(module.block, _prefix(path) + "block", x, shape)
    if module.shortcut is None:
        s, s_shape = x, shape
    else:
        s, s_shape = graph.module(module.shortcut, _prefix(path) + "shortcut", x, shape)
    if y_shape != s_shape:
        raise _Refused(
            f"expected the block's output shape {_shape_str(y_shape)} from the "
            f"{'input' if module.shortcut is None else 'shortcut'}, got {_shape_str(s_shape)}"
        )
    return graph.node("Add", [y, s], path), y_shape


def _concat(graph, module, path, x, shape):
    """The branches' outputs side by side along dim 1: Concat(axis=1)."""
    outputs, shapes = [], []
    for name, branch in module.named_children():
        y, y_shape = graph.module(branch, _prefix(path) + name, x, shape)
        outputs.append(y)
        shapes.append(y_shape)
    first = shapes[0]
    for i, s in enumerate(shapes):
        if len(s) < 2 or len(s) != len(first) or s[2:] != first[2:]:
            raise _Refused(
                f"branch {i}: expected an output shape equal to branch 0's "
                f"{_shape_str(first)} apart from dim 1, got {_shape_str(s)}"
            )
    return graph.node("Concat", outputs, path, axis=1), (
        None,
        sum(s[1] for s in shapes),
        *first[2:],
    )


_CONTAINERS = {nn.Sequential: _sequential, nn.Residual: _residual, nn.Concat: _concat}


# ---- layers --------------------------------------------------------------------------------


def _expect_rank(shape, rank, what):
    if len(shape) != rank:
        raise _Refused(f"input: expected {rank} dims {what}, got shape {_shape_str(shape)}")


def _window_output(size, kernel, stride, pad_begin, pad_end, dilation, ceil_mode=False):
    """Output size along one dim, torch's rule (cnnbp's shapes.cpp output_size): in ceil
    mode the last window must start inside the input or the left padding."""
    span = size + pad_begin + pad_end - dilation * (kernel - 1) - 1
    steps = -(-span // stride) if ceil_mode else span // stride
    if ceil_mode and steps * stride >= size + pad_begin:
        steps -= 1
    return steps + 1


def _conv2d(graph, layer, path, x, shape):
    """Conv: kernel_shape, strides, pads (top, left, bottom, right), dilations, group."""
    a = layer._arguments
    _expect_rank(shape, 4, "(N, C, H, W)")
    if shape[1] != a["in_channels"]:
        raise _Refused(
            f"input: expected {a['in_channels']} channels, got shape {_shape_str(shape)}"
        )
    (r, s), (dh, dw) = a["kernel_size"], a["dilation"]
    if a["padding"] == "same":  # torch's split: the odd cell at the bottom and right
        top, left = (dh * (r - 1)) // 2, (dw * (s - 1)) // 2
        pads = [top, left, dh * (r - 1) - top, dw * (s - 1) - left]
    elif a["padding"] == "valid":
        pads = [0, 0, 0, 0]
    else:
        pads = [*a["padding"], *a["padding"]]
    p, q = (
        _window_output(shape[2 + i], (r, s)[i], a["stride"][i], pads[i], pads[i + 2], (dh, dw)[i])
        for i in range(2)
    )
    if p < 1 or q < 1:
        raise _Refused(
            f"input: expected at least the dilated kernel's extent after padding, got shape "
            f"{_shape_str(shape)}"
        )
    inputs = [x, graph.constant(_prefix(path) + "weight", layer.weight.data)]
    if layer.bias is not None:
        inputs.append(graph.constant(_prefix(path) + "bias", layer.bias.data))
    y = graph.node(
        "Conv",
        inputs,
        path,
        kernel_shape=[r, s],
        strides=list(a["stride"]),
        pads=pads,
        dilations=[dh, dw],
        group=a["groups"],
    )
    return y, (None, a["out_channels"], p, q)


def _pool_geometry(shape, a, dilation):
    """((P, Q), (extra_h, extra_w)): torch's output size, and the cells added after the
    right padding so that ONNX's floor rule gives that size (ceil mode as extra padding:
    ONNX's and torch's ceil rules differ where a last window would start in the padding)."""
    _expect_rank(shape, 4, "(N, C, H, W)")
    out, extra = [], []
    for i in range(2):
        size, kernel, stride = shape[2 + i], a["kernel_size"][i], a["stride"][i]
        padding = a["padding"][i]
        o = _window_output(size, kernel, stride, padding, padding, dilation[i], a["ceil_mode"])
        if o < 1:
            raise _Refused(
                f"input: expected at least the window's extent after padding, got shape "
                f"{_shape_str(shape)}"
            )
        extent = dilation[i] * (kernel - 1) + 1
        out.append(o)
        extra.append(max(0, (o - 1) * stride + extent - (size + 2 * padding)))
    return tuple(out), tuple(extra)


def _pool_attributes(a, extra, pads=None, dilation=None):
    """The window attributes of MaxPool / AveragePool (floor rule), pads (top, left, bottom,
    right) by default the layer's padding plus `extra` at the end."""
    ph, pw = a["padding"]
    attributes = dict(
        kernel_shape=list(a["kernel_size"]),
        strides=list(a["stride"]),
        pads=pads if pads is not None else [ph, pw, ph + extra[0], pw + extra[1]],
    )
    if dilation is not None:
        attributes["dilations"] = list(dilation)
    return attributes


def _zero_pad(graph, path, x, begin, end):
    """Pad (constant 0) of H and W by begin = (top, left) and end = (bottom, right)."""
    if not any(begin) and not any(end):
        return x
    pads = graph.constant(_prefix(path) + "pads", np.array([0, 0, *begin, 0, 0, *end], np.int64))
    return graph.node("Pad", [x, pads], path)


def _max_pool2d(graph, layer, path, x, shape):
    """MaxPool with the same window (padding counts as -inf in both); ceil mode as extra
    padding at the end."""
    a = layer._arguments
    out, extra = _pool_geometry(shape, a, a["dilation"])
    if any(p + e >= k for p, e, k in zip(a["padding"], extra, a["kernel_size"])):
        # a dilated window: more end padding than ONNX allows (< kernel), so the extra
        # cells are an explicit Pad of -inf
        pads = np.array([0, 0, 0, 0, 0, 0, *extra], np.int64)
        minus_inf = graph.constant(_prefix(path) + "minus_inf", np.array(-np.inf))
        x = graph.node("Pad", [x, graph.constant(_prefix(path) + "pads", pads), minus_inf], path)
        extra = (0, 0)
    y = graph.node("MaxPool", [x], path, **_pool_attributes(a, extra, dilation=a["dilation"]))
    return y, (None, shape[1], *out)


def _avg_pool2d(graph, layer, path, x, shape):
    """AveragePool. torch divides by the window's cells inside the padded input
    (count_include_pad) or inside the input, or by divisor_override; a ceil-mode window can
    run past the padding, so where that matters the padding is an explicit Pad of zeros
    and only the cells past it are AveragePool's (uncounted) padding. divisor_override d:
    the mean of the zero-padded windows (sum / (kh * kw)) times kh * kw / d."""
    a = layer._arguments
    out, extra = _pool_geometry(shape, a, (1, 1))
    ph, pw = a["padding"]
    divisor = a["divisor_override"]
    if divisor is not None:
        x = _zero_pad(graph, path, x, (ph, pw), (ph + extra[0], pw + extra[1]))
        attributes = _pool_attributes(a, extra, pads=[0, 0, 0, 0])
    elif a["count_include_pad"] and any(extra):
        x = _zero_pad(graph, path, x, (ph, pw), (ph, pw))
        attributes = _pool_attributes(a, extra, pads=[0, 0, *extra])
        attributes["count_include_pad"] = 0
    else:
        attributes = _pool_attributes(a, extra)
        attributes["count_include_pad"] = int(a["count_include_pad"])
    y = graph.node("AveragePool", [x], path, **attributes)
    window = a["kernel_size"][0] * a["kernel_size"][1]
    if divisor is not None and divisor != window:
        scale = graph.constant(_prefix(path) + "window_over_divisor", window / divisor)
        y = graph.node("Mul", [y, scale], path)
    return y, (None, shape[1], *out)


def _adaptive_windows(size, out):
    """torch's adaptive windows along one dim: cells floor(i*L/O) to ceil((i+1)*L/O)."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def _adaptive_avg_pool2d(graph, layer, path, x, shape):
    """GlobalAveragePool for a 1x1 output, AveragePool where the windows tile the input
    evenly, otherwise the mean as two matrix products (N, C, H, W) . A_w^T then A_h . that,
    A the (out, in) averaging matrix of each dim's windows."""
    _expect_rank(shape, 4, "(N, C, H, W)")
    h, w = shape[2:]
    oh, ow = (
        shape[2 + i] if o is None else o for i, o in enumerate(layer._arguments["output_size"])
    )
    out = (None, shape[1], oh, ow)
    if (oh, ow) == (1, 1):
        return graph.node("GlobalAveragePool", [x], path), out
    if h % oh == 0 and w % ow == 0:
        kernel = [h // oh, w // ow]
        y = graph.node("AveragePool", [x], path, kernel_shape=kernel, strides=kernel)
        return y, out

    def averaging(size, o):
        m = np.zeros((o, size))
        for i, (begin, end) in enumerate(_adaptive_windows(size, o)):
            m[i, begin:end] = 1.0 / (end - begin)
        return m

    across = graph.constant(_prefix(path) + "average_w", averaging(w, ow).T)
    down = graph.constant(_prefix(path) + "average_h", averaging(h, oh))
    rows = graph.node("MatMul", [x, across], path)  # (N, C, h, ow)
    return graph.node("MatMul", [down, rows], path), out


def _batch_norm2d(graph, layer, path, x, shape):
    """BatchNormalization with the running statistics (weight ones and bias zeros without
    affine); without track_running_stats, eval mode normalizes by the batch's own biased
    statistics, spelled out as ReduceMean, Sub, Mul, Sqrt, Div."""
    a = layer._arguments
    _expect_rank(shape, 4, "(N, C, H, W)")
    c = a["num_features"]
    if shape[1] != c:
        raise _Refused(f"input: expected {c} channels, got shape {_shape_str(shape)}")
    prefix = _prefix(path)
    ones, zeros = np.ones(c), np.zeros(c)
    weight = layer.weight.data if layer.weight is not None else ones
    bias = layer.bias.data if layer.bias is not None else zeros
    if a["track_running_stats"]:
        inputs = [
            x,
            graph.constant(prefix + ("weight" if layer.weight is not None else "ones"), weight),
            graph.constant(prefix + ("bias" if layer.bias is not None else "zeros"), bias),
            graph.constant(prefix + "running_mean", layer.running_mean),
            graph.constant(prefix + "running_var", layer.running_var),
        ]
        return graph.node("BatchNormalization", inputs, path, epsilon=a["eps"]), shape
    axes = [0, 2, 3]
    mean = graph.node("ReduceMean", [x], path, axes=axes, keepdims=1)
    centered = graph.node("Sub", [x, mean], path)
    var = graph.node(
        "ReduceMean", [graph.node("Mul", [centered, centered], path)], path, axes=axes, keepdims=1
    )
    eps = graph.constant(prefix + "eps", a["eps"])
    y = graph.node(
        "Div", [centered, graph.node("Sqrt", [graph.node("Add", [var, eps], path)], path)], path
    )
    if layer.weight is not None:
        y = graph.node("Mul", [y, graph.constant(prefix + "weight", weight.reshape(c, 1, 1))], path)
        y = graph.node("Add", [y, graph.constant(prefix + "bias", bias.reshape(c, 1, 1))], path)
    return y, shape


def _linear(graph, layer, path, x, shape):
    """Gemm(transB=1) for (N, in); MatMul by weight^T (+ bias) for more dims (N, *, in)."""
    a = layer._arguments
    if len(shape) < 2 or shape[-1] != a["in_features"]:
        raise _Refused(
            f"input: expected last dim {a['in_features']} (N, ..., {a['in_features']}), "
            f"got shape {_shape_str(shape)}"
        )
    out = (*shape[:-1], a["out_features"])
    prefix = _prefix(path)
    if len(shape) == 2:
        inputs = [x, graph.constant(prefix + "weight", layer.weight.data)]
        if layer.bias is not None:
            inputs.append(graph.constant(prefix + "bias", layer.bias.data))
        return graph.node("Gemm", inputs, path, transB=1), out
    y = graph.node("MatMul", [x, graph.constant(prefix + "weight_t", layer.weight.data.T)], path)
    if layer.bias is not None:
        y = graph.node("Add", [y, graph.constant(prefix + "bias", layer.bias.data)], path)
    return y, out


def _flatten(graph, layer, path, x, shape):
    """Flatten(axis=1): (N, C, H, W) -> (N, C*H*W)."""
    if len(shape) < 2:
        return graph.node("Identity", [x], path), shape
    return graph.node("Flatten", [x], path, axis=1), (None, math.prod(shape[1:]))


def _unary(op):
    def export(graph, layer, path, x, shape):
        return graph.node(op, [x], path), shape

    export.__doc__ = f"{op}, shape unchanged."
    return export


def _leaky_relu(graph, layer, path, x, shape):
    return graph.node("LeakyRelu", [x], path, alpha=layer._arguments["negative_slope"]), shape


def _silu(graph, layer, path, x, shape):
    """x * Sigmoid(x)."""
    return graph.node("Mul", [x, graph.node("Sigmoid", [x], path)], path), shape


def _gelu(graph, layer, path, x, shape):
    """0.5 x (1 + erf(x / sqrt 2)), or with approximate='tanh' 0.5 x (1 + tanh(sqrt(2/pi)
    (x + 0.044715 x^3))): opset 17 has no Gelu operator."""
    prefix = _prefix(path)
    half = graph.constant(prefix + "half", 0.5)
    one = graph.constant(prefix + "one", 1.0)
    if layer._arguments["approximate"] == "tanh":
        cube = graph.node("Mul", [x, graph.node("Mul", [x, x], path)], path)
        inner = graph.node(
            "Add",
            [x, graph.node("Mul", [cube, graph.constant(prefix + "c", 0.044715)], path)],
            path,
        )
        scaled = graph.node(
            "Mul", [inner, graph.constant(prefix + "sqrt_2_over_pi", math.sqrt(2 / math.pi))], path
        )
        phi = graph.node("Tanh", [scaled], path)
    else:
        scaled = graph.node("Mul", [x, graph.constant(prefix + "rsqrt_2", 1 / math.sqrt(2))], path)
        phi = graph.node("Erf", [scaled], path)
    y = graph.node(
        "Mul", [graph.node("Mul", [x, half], path), graph.node("Add", [phi, one], path)], path
    )
    return y, shape


def _softmax(op):
    def export(graph, layer, path, x, shape):
        dim = layer._arguments["dim"]
        if not -len(shape) <= dim < len(shape):
            raise _Refused(
                f"dim: expected a dim of the input {_shape_str(shape)} (in "
                f"[{-len(shape)}, {len(shape) - 1}]), got {dim}"
            )
        return graph.node(op, [x], path, axis=dim), shape

    export.__doc__ = f"{op} along dim (the axis)."
    return export


_EXPORTERS = {
    "Conv2d": _conv2d,
    "Linear": _linear,
    "MaxPool2d": _max_pool2d,
    "AvgPool2d": _avg_pool2d,
    "AdaptiveAvgPool2d": _adaptive_avg_pool2d,
    "BatchNorm2d": _batch_norm2d,
    "Dropout": _unary("Identity"),  # eval mode
    "ReLU": _unary("Relu"),
    "Sigmoid": _unary("Sigmoid"),
    "Tanh": _unary("Tanh"),
    "LeakyReLU": _leaky_relu,
    "GELU": _gelu,
    "SiLU": _silu,
    "Identity": _unary("Identity"),
    "Softmax": _softmax("Softmax"),
    "LogSoftmax": _softmax("LogSoftmax"),
    "Flatten": _flatten,
}
