"""One input's whole forward and backward pass through a network, as one HTML page.

    report = cnnbp.explain(model, x, y, loss_fn)   # one pass in eval mode, read off the trace
    report.rules                                   # each layer's backprop rule, checked
    report.to_html("explain.html")                 # self-contained: no network, file:// works

For every module of ``model.trace()`` (containers too, by dotted path) the page shows the
input and output feature maps (one labelled colour scale per layer), dL/d(output) and
dL/d(input) (a diverging scale centred on 0), convolution filters and their gradients, every
parameter's norms and histograms, and the rule that produced the layer's input gradient,
evaluated on these numbers and marked as holding or not with its largest deviation. At the
top: the input, the prediction with its class probabilities, the loss and the saliency map
|dL/dX|. The numbers are embedded exactly (base64 of the arrays' bytes) in a JSON block,
``<script type="application/json" id="cnnbp-data">``, which the page's script draws.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from dataclasses import dataclass, field

import numpy as np

from . import nn, reference

# A rule holds when max |got - expected| <= tolerance * max(max |expected|, tiny): the two
# sides are computed in different orders, so they agree to rounding in the trace's dtype.
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
HISTOGRAM_BINS = 24
SUITE = "checked by the test suite (tests/test_backward.py, test_layer_table.py)"


@dataclass
class Rule:
    """One layer's backprop rule on this pass: `deviation` is the largest |got - expected|,
    `relative` that over the largest |expected|; None where the rule is stated only."""

    path: str
    statement: str
    deviation: float | None = None
    relative: float | None = None
    tolerance: float | None = None

    @property
    def checked(self) -> bool:
        return self.deviation is not None

    @property
    def holds(self) -> bool | None:
        if not self.checked:
            return None
        return bool(self.relative <= self.tolerance)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "rule": self.statement,
            "checked": self.checked,
            "holds": self.holds,
            "deviation": self.deviation,
            "relative": self.relative,
            "tolerance": self.tolerance,
        }


@dataclass
class Report:
    """What `explain` found: the page's data (`data`, plain JSON types with the arrays as
    base64) and the checked rules. `to_html(path)` writes the page."""

    data: dict
    rules: list[Rule] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every checked rule holds."""
        return all(r.holds for r in self.rules if r.checked)

    @property
    def loss(self) -> float:
        return self.data["loss"]

    @property
    def prediction(self) -> int:
        return self.data["prediction"]

    def to_html(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(render_html(self.data))


# ---- the pass ---------------------------------------------------------------------------


def explain(model, x, y, loss_fn, class_names=None, title="cnnbp explain", numbers=False):
    """One forward and backward pass of one input in eval mode, and the report of it.

    x: one input, (C, H, W) or (1, C, H, W); y: its label (an int, for CrossEntropyLoss and
    NLLLoss) or target (a number or an array of the output's shape, for BCELoss and
    BCEWithLogitsLoss). The model's modes are restored afterwards. numbers=True writes
    every value into its cell (for tiny networks, such as the walkthrough's)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"[explain] model: expected an nn.Module, got {type(model).__name__}")
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim < 2 or x.shape[0] != 1:
        raise ValueError(
            f"[explain] x: expected one input, (C, H, W) or (1, ...), got shape {x.shape}"
        )
    modes = [(m, m.training) for m in [model, *_modules(model)]]
    model.eval()
    try:
        model.zero_grad()
        output = model(np.ascontiguousarray(x))
        target = _target(y, output, loss_fn)
        loss_fn(output, target)
        model.backward(loss_fn.backward())
        trace = _trace(model)
        loss_trace = loss_fn.trace()
    finally:
        for module, training in modes:
            module.train(training)
    return build_report(
        trace,
        loss_trace,
        type(loss_fn).__name__,
        _default_loss(loss_fn),
        class_names=class_names,
        title=title,
        numbers=numbers,
    )


def _modules(model):
    return [m for _, m in model.named_modules()] if hasattr(model, "named_modules") else []


def _trace(model):
    """[(path, type, arguments, trace)] for every module below the model (or the model)."""
    pairs = model.named_modules() if hasattr(model, "named_modules") else [("0", model)]
    traces = dict(model.trace()) if hasattr(model, "named_modules") else {"0": model.trace()}
    out = []
    for path, m in pairs:
        t = dict(traces[path])
        if not isinstance(m, nn._Container):  # BatchNorm2d's running statistics
            t.update((name, np.array(b)) for name, b in m._own_buffers())
        out.append((path, type(m).__name__, dict(getattr(m, "_arguments", {})), t))
    return out


def _target(y, output, loss_fn):
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and np.ndim(y) == 0:
        return np.array([int(y)], dtype=np.int64)
    target = np.asarray(y, dtype=output.dtype)
    return np.ascontiguousarray(np.broadcast_to(target, output.shape))


def _default_loss(loss_fn):
    """True when the loss has torch's default options (the rule prediction - target holds)."""
    options = loss_fn._options
    return (
        options.get("reduction") == "mean"
        and options.get("weight") is None
        and options.get("pos_weight") is None
        and not options.get("label_smoothing")
    )


# ---- the rules --------------------------------------------------------------------------


def _compare(path, statement, got, expected, dtype):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        return Rule(
            path, statement + f" (shape {got.shape} vs {expected.shape})", math.inf, math.inf, 0.0
        )
    deviation = float(np.max(np.abs(got - expected), initial=0.0))
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    return Rule(path, statement, deviation, deviation / scale, TOLERANCE[np.dtype(dtype)])


def _pair(v):
    return (int(v), int(v)) if np.ndim(v) == 0 else (int(v[0]), int(v[1]))


def _conv_weight_gradient(x, dz, weight_shape, args):
    """dL/dW[k, c, r, s] = sum over n, p, q of X[n, c, p*sh + r*dh, q*sw + s*dw] dL/dZ[n, k, p, q]:
    the cross-correlation of the (padded) input with dL/dZ, group by group."""
    x, dz = np.asarray(x, np.float64), np.asarray(dz, np.float64)
    K, Cg, R, S = weight_shape
    (sh, sw), (dh, dw) = _pair(args["stride"]), _pair(args["dilation"])
    padding = args["padding"]
    if padding == "valid":
        padding = 0
    if padding == "same":
        th, tw = dh * (R - 1), dw * (S - 1)
        pads = ((th // 2, th - th // 2), (tw // 2, tw - tw // 2))
    else:
        ph, pw = _pair(padding)
        pads = ((ph, ph), (pw, pw))
    xpad = np.pad(x, ((0, 0), (0, 0), *pads))
    P, Q = dz.shape[2:]
    groups = int(args["groups"])
    Kg = K // groups
    dweight = np.zeros(weight_shape)
    for g in range(groups):
        xs = xpad[:, g * Cg : (g + 1) * Cg]
        ds = dz[:, g * Kg : (g + 1) * Kg]
        for r in range(R):
            for s in range(S):
                window = xs[
                    :,
                    :,
                    r * dh : r * dh + sh * (P - 1) + 1 : sh,
                    s * dw : s * dw + sw * (Q - 1) + 1 : sw,
                ]
                dweight[g * Kg : (g + 1) * Kg, :, r, s] = np.einsum("ncpq,nkpq->kc", window, ds)
    return dweight


def layer_rules(path, kind, args, t, children, dtype):
    """The rules of one module, checked on its trace `t` (children: its children's traces by
    name, for containers)."""
    x, y, dy, dx = t["input"], t["output"], t["grad_output"], t["grad_input"]
    if dx is None or dy is None:
        return [Rule(path, "no backward ran through this module")]

    def check(statement, got, expected):
        return _compare(path, statement, got, expected, dtype)

    def adjoint(statement, bias=0.0):
        # a map linear in X: sum(dL/dY * (Y - bias)) = sum(dL/dX * X)
        lhs = np.sum(np.asarray(dy, np.float64) * (np.asarray(y, np.float64) - bias))
        return check(statement, np.sum(np.asarray(dx, np.float64) * x), lhs)

    if kind == "ReLU":
        return [check("dL/dZ = dL/dA * (Z > 0): the gradient passes where Z > 0", dx, dy * (x > 0))]
    if kind == "LeakyReLU":
        slope = args["negative_slope"]
        return [
            check(
                f"dL/dZ = dL/dA * (1 where Z > 0, else {slope:g})",
                dx,
                dy * np.where(x > 0, 1.0, slope),
            )
        ]
    if kind == "Sigmoid":
        return [check("dL/dZ = dL/dA * A (1 - A)", dx, dy * y * (1.0 - y))]
    if kind == "Tanh":
        return [check("dL/dZ = dL/dA * (1 - A^2)", dx, dy * (1.0 - y * y))]
    if kind == "MaxPool2d":
        idx = t["indices"]
        expected = np.zeros(x.shape, np.float64)
        planes = expected.reshape(x.shape[0] * x.shape[1], -1)
        flat = idx.reshape(planes.shape[0], -1)
        for plane, cells, grads in zip(planes, flat, dy.reshape(planes.shape[0], -1)):
            np.add.at(plane, cells, grads)
        return [
            check(
                "dL/dX = dL/dY routed to the argmax cell of each window, 0 elsewhere", dx, expected
            )
        ]
    if kind in ("Flatten",):
        return [check("dL/dX = dL/dY reshaped to X's shape", dx, np.reshape(dy, x.shape))]
    if kind in ("Identity", "Dropout"):
        return [check("dL/dX = dL/dY (eval mode: the identity)", dx, dy)]
    if kind == "Conv2d":
        rules = [
            check(
                "dL/dW = cross-correlation of the input X with dL/dZ",
                t["weight.grad"],
                _conv_weight_gradient(x, dy, t["weight"].shape, args),
            )
        ]
        bias = 0.0
        if "bias" in t:
            rules.append(
                check(
                    "dL/dB = sum of dL/dZ over the batch and positions",
                    t["bias.grad"],
                    dy.sum(axis=(0, 2, 3)),
                )
            )
            bias = np.asarray(t["bias"], np.float64).reshape(1, -1, 1, 1)
        rules.append(
            adjoint(
                "dL/dX = full convolution of dL/dZ with W rotated 180 degrees: sum(dL/dX * X) = sum(dL/dZ * (Z - B))",
                bias,
            )
        )
        return rules
    if kind == "Linear":
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        rules = [check("dL/dW = dL/dY^T X", t["weight.grad"], dy2.T.astype(np.float64) @ x2)]
        if "bias" in t:
            rules.append(
                check("dL/dB = sum of dL/dY over the batch", t["bias.grad"], dy2.sum(axis=0))
            )
        rules.append(
            check("dL/dX = dL/dY W", dx, (dy2.astype(np.float64) @ t["weight"]).reshape(x.shape))
        )
        return rules
    if kind == "BatchNorm2d":
        if not args.get("track_running_stats", True):
            return [Rule(path, "batch statistics in eval mode too: " + SUITE)]
        invstd = 1.0 / np.sqrt(t["running_var"].astype(np.float64) + args["eps"])
        xhat = (x - t["running_mean"].reshape(1, -1, 1, 1)) * invstd.reshape(1, -1, 1, 1)
        gamma = t["weight"].astype(np.float64) if "weight" in t else np.ones_like(invstd)
        rules = [
            check(
                "eval mode: dL/dX = dL/dY * gamma / sqrt(running_var + eps)",
                dx,
                dy * (gamma * invstd).reshape(1, -1, 1, 1),
            )
        ]
        if "weight" in t:
            rules.append(
                check(
                    "dL/dgamma = sum of dL/dY * X_hat",
                    t["weight.grad"],
                    (dy * xhat).sum(axis=(0, 2, 3)),
                )
            )
            rules.append(check("dL/dbeta = sum of dL/dY", t["bias.grad"], dy.sum(axis=(0, 2, 3))))
        return rules
    if kind in ("AvgPool2d", "AdaptiveAvgPool2d"):
        return [
            adjoint(
                "dL/dX spreads each dL/dY evenly over its window (a linear map): sum(dL/dX * X) = sum(dL/dY * Y)"
            )
        ]
    if kind == "SiLU":
        return [
            check(
                "dL/dZ = dL/dA * s (1 + Z (1 - s)), s = sigmoid(Z)",
                dx,
                reference.silu_backward(dy, x),
            )
        ]
    if kind == "GELU":
        return [
            check(
                f"dL/dZ = dL/dA * GELU'(Z) (approximate={args['approximate']!r})",
                dx,
                reference.gelu_backward(dy, x, args["approximate"]),
            )
        ]
    if kind == "Softmax":
        return [
            check(
                "dL/dZ = A * (dL/dA - sum(dL/dA * A) along dim)",
                dx,
                reference.softmax_backward(dy, y, args["dim"]),
            )
        ]
    if kind == "LogSoftmax":
        return [
            check(
                "dL/dZ = dL/dA - exp(A) * sum(dL/dA) along dim",
                dx,
                reference.log_softmax_backward(dy, y, args["dim"]),
            )
        ]
    if kind == "Sequential":
        first, last = children[0], children[-1]
        return [
            check(
                "dL/dX = dL/dX of its first layer; the backward runs the layers in reverse",
                dx,
                first["grad_input"],
            ),
            check("dL/dY = dL/dY of its last layer", dy, last["grad_output"]),
        ]
    if kind == "Residual":
        block = children["block"]
        short = children.get("shortcut")
        through = dy if short is None else short["grad_input"]
        name = "dL/dY (the identity)" if short is None else "dL/dX of the shortcut"
        return [check(f"dL/dX = dL/dX of the block + {name}", dx, block["grad_input"] + through)]
    if kind == "Concat":
        total = sum(np.asarray(c["grad_input"], np.float64) for c in children.values())
        return [
            check("dL/dX = sum of the branches' dL/dX (each gets its channels of dL/dY)", dx, total)
        ]
    return [Rule(path, SUITE)]


def loss_rules(kind, last_kind, loss_trace, last_trace, default, dtype):
    """The rule at the loss: dL/dZ = prediction - target for the softmax / sigmoid pairs."""
    z, target = loss_trace["input"], loss_trace["target"]
    if not default:
        return [Rule("loss", "a loss with options (weight, reduction, smoothing): " + SUITE)]
    n = max(z.shape[0], 1) if z.ndim > 1 else 1
    if kind == "CrossEntropyLoss" and target.dtype.kind in "iu" and z.ndim == 2:
        shifted = np.exp(z - z.max(axis=1, keepdims=True))
        p = shifted / shifted.sum(axis=1, keepdims=True)
        onehot = np.eye(z.shape[1])[target]
        return [
            _compare(
                "loss",
                "softmax + cross-entropy: dL/dZ = (softmax(Z) - onehot(y)) / N",
                loss_trace["grad_input"],
                (p - onehot) / n,
                dtype,
            )
        ]
    if kind == "NLLLoss" and last_kind == "LogSoftmax" and z.ndim == 2:
        onehot = np.eye(z.shape[1])[target]
        return [
            _compare(
                "loss",
                "log-softmax + NLL: dL/dZ = (softmax(Z) - onehot(y)) / N",
                last_trace["grad_input"],
                (np.exp(z) - onehot) / n,
                dtype,
            )
        ]
    if kind == "BCEWithLogitsLoss":
        p = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
        return [
            _compare(
                "loss",
                "sigmoid + binary cross-entropy: dL/dZ = (sigmoid(Z) - Y) / size",
                loss_trace["grad_input"],
                (p - target) / z.size,
                dtype,
            )
        ]
    if kind == "BCELoss" and last_kind == "Sigmoid":
        return [
            _compare(
                "loss",
                "sigmoid + binary cross-entropy: dL/dZ = (A - Y) / size",
                last_trace["grad_input"],
                (z - target) / z.size,
                dtype,
            )
        ]
    return [Rule("loss", f"{kind}: " + SUITE)]


# ---- the page's data --------------------------------------------------------------------


class _Tensors:
    """Arrays by content: one entry per distinct array (a layer's input is often the one
    before it's output), the bytes as base64."""

    def __init__(self):
        self.table = {}

    def add(self, array):
        if array is None:
            return None
        a = np.ascontiguousarray(array)
        if a.dtype.kind == "f" and a.dtype.itemsize < 4:
            a = a.astype(np.float32)
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        key = "t" + hashlib.sha1(raw + str((a.shape, a.dtype.str)).encode()).hexdigest()[:12]
        if key not in self.table:
            kind = {"f4": "float32", "f8": "float64", "i8": "int64", "i4": "int32", "b1": "bool"}
            self.table[key] = {
                "shape": list(a.shape),
                "dtype": kind.get(a.dtype.str[1:], "float64"),
                "data": base64.b64encode(raw).decode("ascii"),
            }
        return key


def decode(tensor):
    """A tensor entry of the page's data as a NumPy array (its exact values)."""
    dtype = {"float32": "<f4", "float64": "<f8", "int64": "<i8", "int32": "<i4", "bool": "?"}
    raw = base64.b64decode(tensor["data"])
    return np.frombuffer(raw, dtype=dtype[tensor["dtype"]]).reshape(tensor["shape"])


def _finite_range(arrays):
    values = [np.asarray(a, np.float64)[np.isfinite(a)] for a in arrays if a is not None]
    values = [v for v in values if v.size]
    if not values:
        return [0.0, 0.0]
    return [float(min(v.min() for v in values)), float(max(v.max() for v in values))]


def _histogram(a):
    a = np.asarray(a, np.float64).ravel()
    a = a[np.isfinite(a)]
    if not a.size:
        return {"counts": [], "edges": []}
    counts, edges = np.histogram(a, bins=HISTOGRAM_BINS)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def build_report(
    trace,
    loss_trace,
    loss_kind,
    default_loss=True,
    class_names=None,
    title="cnnbp explain",
    numbers=False,
):
    """The report of one pass from its trace: [(path, type, arguments, trace dict)] for every
    module (containers before their children) and the loss's trace."""
    tensors = _Tensors()
    by_path = {path: t for path, _, _, t in trace}
    leaves = [entry for entry in trace if not any(p.startswith(entry[0] + ".") for p in by_path)]
    first, last = trace[0], leaves[-1]
    dtype = np.asarray(first[3]["output"]).dtype
    if dtype.kind != "f":
        dtype = np.dtype(np.float32)
    rules, layers = [], []
    for path, kind, args, t in trace:
        prefix = path + "."
        children = {
            p[len(prefix) :]: c
            for p, c in by_path.items()
            if p.startswith(prefix) and "." not in p[len(prefix) :]
        }
        if kind == "Sequential":
            children = [children[k] for k in sorted(children, key=int)]
        own = layer_rules(path, kind, args, t, children, dtype)
        rules += own
        params = []
        for name in ("weight", "bias"):
            if name in t and t[name] is not None:
                value, grad = t[name], t.get(name + ".grad")
                params.append(
                    {
                        "name": name,
                        "value": tensors.add(value),
                        "grad": tensors.add(grad),
                        "norm": float(np.linalg.norm(np.asarray(value, np.float64))),
                        "grad_norm": None
                        if grad is None
                        else float(np.linalg.norm(np.asarray(grad, np.float64))),
                        "hist": _histogram(value),
                        "grad_hist": _histogram(grad),
                    }
                )
        buffers = {k: tensors.add(t[k]) for k in ("running_mean", "running_var") if k in t}
        extras = {k: tensors.add(t[k]) for k in ("indices", "mask") if t.get(k) is not None}
        gmax = max(abs(v) for v in _finite_range([t["grad_output"], t["grad_input"]]))
        layers.append(
            {
                "path": path,
                "type": kind,
                "arguments": {k: v for k, v in args.items() if k != "seed"},
                "depth": path.count("."),
                "container": kind in ("Sequential", "Residual", "Concat"),
                "input": tensors.add(t["input"]),
                "output": tensors.add(t["output"]),
                "grad_output": tensors.add(t["grad_output"]),
                "grad_input": tensors.add(t["grad_input"]),
                "value_range": _finite_range([t["input"], t["output"]]),
                "grad_range": [-gmax, gmax],
                "parameters": params,
                "buffers": buffers,
                "extras": extras,
                "rules": [r.to_dict() for r in own],
            }
        )
    last_trace = by_path[last[0]]
    loss_checks = loss_rules(loss_kind, last[1], loss_trace, last_trace, default_loss, dtype)
    rules += loss_checks
    x, dx = first[3]["input"], first[3]["grad_input"]
    logits = np.asarray(loss_trace["input"], np.float64)
    if loss_kind in ("CrossEntropyLoss",):
        e = np.exp(logits[0] - logits[0].max())
        probs = e / e.sum()
    elif loss_kind == "NLLLoss":
        probs = np.exp(logits[0])
    elif loss_kind == "BCEWithLogitsLoss":
        p = 1.0 / (1.0 + np.exp(-logits.ravel()[0]))
        probs = np.array([1 - p, p])
    else:  # BCELoss: the input is a probability
        p = logits.ravel()[0]
        probs = np.array([1 - p, p])
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(probs))]
    names += [str(i) for i in range(len(names), len(probs))]
    target = np.asarray(loss_trace["target"])
    saliency = None if dx is None else np.abs(np.asarray(dx)).max(axis=1)
    data = {
        "format": "cnnbp-explain 1",
        "title": title,
        "numbers": bool(numbers),
        "dtype": str(dtype),
        "loss_type": loss_kind,
        "loss": float(loss_trace["loss"]),
        "target": target.tolist(),
        "probabilities": [float(v) for v in probs],
        "classes": names[: len(probs)],
        "prediction": int(np.argmax(probs)),
        "input": tensors.add(x),
        "grad_input": tensors.add(dx),
        "saliency": tensors.add(saliency),
        "loss_grad": tensors.add(loss_trace["grad_input"]),
        "loss_rules": [r.to_dict() for r in loss_checks],
        "layers": layers,
        "summary": {
            "checked": sum(r.checked for r in rules),
            "holding": sum(bool(r.holds) for r in rules),
            "stated": sum(not r.checked for r in rules),
        },
        "tensors": tensors.table,
    }
    return Report(data, rules)


# ---- the page ---------------------------------------------------------------------------


def render_html(data) -> str:
    """The page: the data as JSON, the style and the script that draws it, in one file."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    summary = data["summary"]
    title = html.escape(data["title"])
    return (
        _PAGE.replace("%TITLE%", title)
        .replace(
            "%SUMMARY%",
            html.escape(
                f"{summary['holding']} of {summary['checked']} checked rules hold"
                + (f", {summary['stated']} stated" if summary["stated"] else "")
            ),
        )
        .replace("%DATA%", payload)
    )


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<script>
window.cnnbpErrors = [];
window.addEventListener("error", function (e) {
  window.cnnbpErrors.push(String(e.message) + " at " + e.lineno);
  var el = document.getElementById("cnnbp-errors");
  if (el) el.textContent = window.cnnbpErrors.join("\\n");
});
</script>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0 1.2em 2em;color:#222;background:#fff}
h1{font-size:1.4em;margin:.6em 0 .2em}h2{font-size:1.1em;margin:.2em 0}
.top{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start;border-bottom:1px solid #ccc;padding-bottom:.8em}
.layer{border-left:4px solid #9ab;margin:.8em 0;padding:.2em .8em;background:#fafbfc}
.layer.container{border-left-color:#c9a;background:#fcfafb}
.maps{display:flex;flex-wrap:wrap;gap:1em}.map{min-width:8em}
.map h3{font-size:.9em;margin:.3em 0;font-weight:600}
.chans{display:flex;flex-wrap:wrap;gap:3px;max-width:46em}
canvas.ch{image-rendering:pixelated;border:1px solid #ddd;cursor:zoom-in}
.scale{display:flex;align-items:center;gap:.4em;font-size:.8em;color:#555}
.scale canvas{height:10px;width:120px;border:1px solid #ccc}
.rules{margin:.4em 0;padding:0;list-style:none}.rules li{margin:.15em 0}
.ok{color:#176d2c;font-weight:600}.bad{color:#b00020;font-weight:600}.said{color:#666;font-weight:600}
table.params{border-collapse:collapse;font-size:.85em}table.params td,table.params th{padding:.1em .6em;border-bottom:1px solid #eee;text-align:right}
.bar{display:flex;align-items:center;gap:.4em;font-size:.85em}.bar span.fill{display:inline-block;height:10px;background:#4a7bd0}
.bar.pred span.fill{background:#d0664a}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;padding:2px 6px;border-radius:3px;font-size:12px;display:none;z-index:20}
#zoom{position:fixed;inset:0;background:rgba(0,0,0,.55);display:none;align-items:center;justify-content:center;z-index:10}
#zoom div{background:#fff;padding:1em;border-radius:6px;max-width:95vw;max-height:95vh;overflow:auto}
#zoom canvas{image-rendering:pixelated}
.muted{color:#666;font-size:.85em}
</style></head><body>
<h1>%TITLE%</h1>
<p class="muted">%SUMMARY%. Click a channel to enlarge it; hover a cell for its value.
Feature maps share one colour scale per layer; gradients use a diverging scale centred on 0.</p>
<pre id="cnnbp-errors" style="color:#b00020"></pre>
<div id="top" class="top"></div>
<div id="layers"></div>
<div id="tip"></div><div id="zoom"><div id="zoombox"></div></div>
<script type="application/json" id="cnnbp-data">%DATA%</script>
<script>
(function () {
"use strict";
var started = performance.now();
var D = JSON.parse(document.getElementById("cnnbp-data").textContent);
var cache = {};
function tensor(key) {
  if (!key) return null;
  if (cache[key]) return cache[key];
  var t = D.tensors[key], bin = atob(t.data), bytes = new Uint8Array(bin.length);
  for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  var buf = bytes.buffer, v;
  if (t.dtype === "float32") v = new Float32Array(buf);
  else if (t.dtype === "float64") v = new Float64Array(buf);
  else if (t.dtype === "int32") v = new Int32Array(buf);
  else if (t.dtype === "int64") { var w = new Int32Array(buf); v = new Float64Array(w.length / 2); for (var j = 0; j < v.length; j++) v[j] = w[2 * j] + 4294967296 * w[2 * j + 1]; }
  else v = new Uint8Array(buf);
  return (cache[key] = {shape: t.shape, v: v});
}
var VIRIDIS = [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],[53,183,121],[109,205,89],[180,222,44],[253,231,37]];
function seq(t) { t = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1); var i = Math.min(Math.floor(t), VIRIDIS.length - 2), f = t - i, a = VIRIDIS[i], b = VIRIDIS[i + 1];
  return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])]; }
function div(t) { t = Math.max(-1, Math.min(1, t)); return t >= 0 ? [255, 255 - 200 * t, 255 - 220 * t] : [255 + 220 * t, 255 + 170 * t, 255]; }
function lut(f) { var t = new Uint8ClampedArray(256 * 3); for (var i = 0; i < 256; i++) { var c = f(i / 255); t[3 * i] = c[0]; t[3 * i + 1] = c[1]; t[3 * i + 2] = c[2]; } return t; }
var SEQ = lut(seq), DIV = lut(function (u) { return div(2 * u - 1); });
function colour(scale, x) {
  if (!isFinite(x)) return [255, 0, 255];
  var u = scale.diverging ? (scale.hi > 0 ? 0.5 + 0.5 * x / scale.hi : 0.5) : (scale.hi > scale.lo ? (x - scale.lo) / (scale.hi - scale.lo) : 0.5);
  var i = 3 * Math.round(255 * Math.max(0, Math.min(1, u))), t = scale.diverging ? DIV : SEQ;
  return [t[i], t[i + 1], t[i + 2]];
}
function fmt(x) { if (!isFinite(x)) return String(x); var a = Math.abs(x);
  return (a !== 0 && (a < 1e-3 || a >= 1e4)) ? x.toExponential(3) : String(+x.toFixed(4)); }
function el(tag, cls, text) { var e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = text; return e; }
// the planes of an array without its batch dim: (C, H, W) -> C planes; vectors -> one row
function planes(t) {
  var s = t.shape.slice(); if (s.length >= 2 && s[0] === 1 && s.length !== 2) s = s.slice(1);
  if (s.length === 2 && t.shape.length === 2) s = [1, s[1]];
  if (s.length === 0) s = [1];
  var h, w, c;
  if (s.length === 1) { c = 1; h = 1; w = s[0]; }
  else if (s.length === 2) { c = 1; h = s[0]; w = s[1]; }
  else { w = s[s.length - 1]; h = s[s.length - 2]; c = t.v.length / (h * w); }
  return {c: c, h: h, w: w};
}
// one pixel per cell, enlarged by CSS (image-rendering: pixelated); with numbers, drawn
// enlarged so that each cell's value can be written into it
function draw(canvas, t, off, h, w, scale, px, numbers) {
  var small = numbers && px >= 24 ? el("canvas") : canvas;
  small.width = w; small.height = h;
  var ctx = small.getContext("2d"), img = ctx.createImageData(w, h), d = img.data;
  var lo = scale.lo, span = scale.hi - scale.lo, table = scale.diverging ? DIV : SEQ;
  for (var k = 0; k < h * w; k++) {
    var x = t.v[off + k], u;
    if (!isFinite(x)) { d[4 * k] = 255; d[4 * k + 1] = 0; d[4 * k + 2] = 255; d[4 * k + 3] = 255; continue; }
    u = scale.diverging ? (scale.hi > 0 ? 0.5 + 0.5 * x / scale.hi : 0.5) : (span > 0 ? (x - lo) / span : 0.5);
    var i = 3 * Math.round(255 * (u < 0 ? 0 : u > 1 ? 1 : u));
    d[4 * k] = table[i]; d[4 * k + 1] = table[i + 1]; d[4 * k + 2] = table[i + 2]; d[4 * k + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  canvas.style.width = (w * px) + "px"; canvas.style.height = (h * px) + "px";
  if (small === canvas) return;
  canvas.width = w * px; canvas.height = h * px;
  var big = canvas.getContext("2d");
  big.imageSmoothingEnabled = false; big.drawImage(small, 0, 0, w * px, h * px);
  big.font = Math.max(8, Math.floor(px / 4.2)) + "px monospace"; big.textAlign = "center"; big.textBaseline = "middle";
  for (var i2 = 0; i2 < h; i2++) for (var j2 = 0; j2 < w; j2++) {
    var v = t.v[off + i2 * w + j2], c2 = colour(scale, v);
    big.fillStyle = (0.3 * c2[0] + 0.6 * c2[1] + 0.1 * c2[2]) > 140 ? "#000" : "#fff";
    big.fillText(fmt(v), j2 * px + px / 2, i2 * px + px / 2);
  }
}
var tip = document.getElementById("tip");
function hover(canvas, t, off, h, w, label) {
  canvas.addEventListener("mousemove", function (e) {
    var r = canvas.getBoundingClientRect(), j = Math.floor((e.clientX - r.left) / r.width * w), i = Math.floor((e.clientY - r.top) / r.height * h);
    if (i < 0 || j < 0 || i >= h || j >= w) return;
    tip.textContent = label + " [" + i + ", " + j + "] = " + fmt(t.v[off + i * w + j]);
    tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; tip.style.display = "block";
  });
  canvas.addEventListener("mouseleave", function () { tip.style.display = "none"; });
}
var zoom = document.getElementById("zoom"), zoombox = document.getElementById("zoombox");
zoom.addEventListener("click", function () { zoom.style.display = "none"; zoombox.textContent = ""; });
function enlarge(t, off, h, w, scale, label) {
  zoombox.textContent = ""; zoombox.appendChild(el("h2", null, label + "  (" + h + " x " + w + ")"));
  var px = Math.max(4, Math.min(64, Math.floor(560 / Math.max(h, w)))), c = el("canvas");
  draw(c, t, off, h, w, scale, px, px >= 24); hover(c, t, off, h, w, label);
  zoombox.appendChild(c); zoombox.appendChild(scaleBar(scale)); zoom.style.display = "flex";
}
function scaleBar(scale) {
  var box = el("div", "scale"), c = el("canvas"); c.width = 120; c.height = 1;
  var ctx = c.getContext("2d"), img = ctx.createImageData(120, 1);
  for (var i = 0; i < 120; i++) { var x = scale.lo + (scale.hi - scale.lo) * i / 119, col = colour(scale, x); img.data.set([col[0], col[1], col[2], 255], 4 * i); }
  ctx.putImageData(img, 0, 0);
  box.appendChild(el("span", null, fmt(scale.lo))); box.appendChild(c); box.appendChild(el("span", null, fmt(scale.hi) + (scale.diverging ? " (0 is white)" : "")));
  return box;
}
function mapBlock(title, key, scale, maxPx) {
  var block = el("div", "map"); block.appendChild(el("h3", null, title));
  var t = tensor(key); if (!t) { block.appendChild(el("span", "muted", "none")); return block; }
  var g = planes(t), chans = el("div", "chans");
  var px = D.numbers ? Math.max(24, Math.min(48, Math.floor(240 / Math.max(g.h, g.w)))) : Math.max(1, Math.min(maxPx || 6, Math.floor(96 / Math.max(g.h, g.w))));
  if (g.h === 1 && !D.numbers) px = Math.max(px, Math.min(12, Math.floor(600 / g.w)) || 1);
  for (var c = 0; c < g.c; c++) {
    (function (c) {
      var cv = el("canvas", "ch"), off = c * g.h * g.w, label = title + (g.c > 1 ? " channel " + c : "");
      cv.dataset.channel = c;
      draw(cv, t, off, g.h, g.w, scale, px, D.numbers); hover(cv, t, off, g.h, g.w, label);
      cv.addEventListener("click", function () { enlarge(t, off, g.h, g.w, scale, label); });
      chans.appendChild(cv);
    })(c);
  }
  block.appendChild(chans); block.appendChild(el("div", "muted", "shape (" + t.shape.join(", ") + ")"));
  return block;
}
function filterBlock(title, key, scale) {
  // conv filters (K, C/groups, R, S): one row per filter
  var block = el("div", "map"), t = tensor(key); block.appendChild(el("h3", null, title));
  var K = t.shape[0], C = t.shape[1], R = t.shape[2], S = t.shape[3];
  var px = D.numbers ? 40 : Math.max(3, Math.min(10, Math.floor(30 / Math.max(R, S)))), shown = Math.min(C, 16);
  var grid = el("div"); grid.style.display = "grid"; grid.style.gridTemplateColumns = "repeat(" + shown + ", auto)"; grid.style.gap = "2px"; grid.style.justifyContent = "start";
  for (var k = 0; k < K; k++) for (var c = 0; c < shown; c++) {
    (function (k, c) {
      var cv = el("canvas", "ch"), off = (k * C + c) * R * S, label = title + " filter " + k + ", in-channel " + c;
      draw(cv, t, off, R, S, scale, px, D.numbers); hover(cv, t, off, R, S, label);
      cv.addEventListener("click", function () { enlarge(t, off, R, S, scale, label); });
      grid.appendChild(cv);
    })(k, c);
  }
  block.appendChild(grid);
  if (shown < C) block.appendChild(el("div", "muted", "first " + shown + " of " + C + " in-channels"));
  block.appendChild(scaleBar(scale));
  return block;
}
function absMax(key) { var t = tensor(key), m = 0; if (!t) return 0; for (var i = 0; i < t.v.length; i++) { var a = Math.abs(t.v[i]); if (a > m && isFinite(a)) m = a; } return m; }
function histogram(h, colourFill) {
  var w = 150, ht = 40, c = el("canvas"); c.width = w; c.height = ht; c.style.border = "1px solid #eee";
  if (!h.counts.length) return c;
  var ctx = c.getContext("2d"), m = Math.max.apply(null, h.counts), bw = w / h.counts.length;
  ctx.fillStyle = colourFill;
  h.counts.forEach(function (n, i) { var bh = m ? n / m * (ht - 2) : 0; ctx.fillRect(i * bw, ht - bh, bw - 1, bh); });
  c.title = "from " + fmt(h.edges[0]) + " to " + fmt(h.edges[h.edges.length - 1]) + ", " + h.counts.length + " bins";
  return c;
}
function rulesList(rules) {
  var ul = el("ul", "rules");
  rules.forEach(function (r) {
    var li = el("li"), mark;
    if (!r.checked) mark = el("span", "said", "stated: ");
    else mark = el("span", r.holds ? "ok" : "bad", r.holds ? "\\u2713 holds: " : "\\u2717 does not hold: ");
    li.appendChild(mark); li.appendChild(document.createTextNode(r.rule));
    if (r.checked) li.appendChild(el("span", "muted", "  largest deviation " + fmt(r.deviation) + " (relative " + fmt(r.relative) + ", tolerance " + fmt(r.tolerance) + ")"));
    li.dataset.holds = r.checked ? String(r.holds) : "stated";
    ul.appendChild(li);
  });
  return ul;
}
// ---- the top: input, prediction, loss, saliency
var top = document.getElementById("top");
var inRange = (function () { var t = tensor(D.input), lo = Infinity, hi = -Infinity; for (var i = 0; i < t.v.length; i++) { if (t.v[i] < lo) lo = t.v[i]; if (t.v[i] > hi) hi = t.v[i]; } return {lo: lo, hi: hi}; })();
top.appendChild(mapBlock("input X", D.input, inRange, 12));
var sal = absMax(D.saliency);
top.appendChild(mapBlock("saliency |dL/dX| (max over channels)", D.saliency, {lo: 0, hi: sal}, 12));
var pred = el("div"); pred.appendChild(el("h2", null, "prediction: " + D.classes[D.prediction]));
D.probabilities.forEach(function (p, i) {
  var b = el("div", "bar" + (i === D.prediction ? " pred" : "")), f = el("span", "fill");
  f.style.width = Math.max(1, Math.round(p * 160)) + "px";
  b.appendChild(el("span", null, "class " + D.classes[i])); b.appendChild(f); b.appendChild(el("span", null, (100 * p).toFixed(2) + "%"));
  pred.appendChild(b);
});
pred.appendChild(el("p", null, D.loss_type + " = " + fmt(D.loss) + ", target " + JSON.stringify(D.target)));
pred.appendChild(rulesList(D.loss_rules));
top.appendChild(pred);
// ---- every module, by dotted path
var layers = document.getElementById("layers");
var observer = window.IntersectionObserver ? new IntersectionObserver(function (entries) {
  entries.forEach(function (e) { if (e.isIntersecting) { observer.unobserve(e.target); e.target.fill(); } });
}, {rootMargin: "400px"}) : null;
D.layers.forEach(function (L) {
  var sec = el("section", "layer" + (L.container ? " container" : ""));
  sec.id = "layer-" + L.path; sec.dataset.path = L.path; sec.style.marginLeft = (1.5 * L.depth) + "em";
  var args = Object.keys(L.arguments).map(function (k) { return k + "=" + JSON.stringify(L.arguments[k]); }).join(", ");
  sec.appendChild(el("h2", null, L.path + "  " + L.type + "(" + args + ")"));
  sec.appendChild(rulesList(L.rules));
  sec.fill = function () { fill(sec, L); };
  layers.appendChild(sec);
  if (observer) observer.observe(sec); else sec.fill();
});
// a layer's maps are drawn when it comes near the window, so that large networks load fast
function fill(sec, L) {
  if (sec.dataset.drawn) return;
  sec.dataset.drawn = "1";
  var vs = {lo: L.value_range[0], hi: L.value_range[1]}, gs = {lo: L.grad_range[0], hi: L.grad_range[1], diverging: true};
  var maps = el("div", "maps");
  [["input", L.input, vs], ["output", L.output, vs], ["dL/d(output)", L.grad_output, gs], ["dL/d(input)", L.grad_input, gs]].forEach(function (m) { maps.appendChild(mapBlock(m[0], m[1], m[2])); });
  sec.appendChild(maps);
  var scales = el("div", "maps"); scales.appendChild(el("span", "muted", "maps:")); scales.appendChild(scaleBar(vs)); scales.appendChild(el("span", "muted", "gradients:")); scales.appendChild(scaleBar(gs));
  sec.appendChild(scales);
  if (L.parameters.length) {
    var tbl = el("table", "params"), head = el("tr");
    ["parameter", "shape", "||value||", "||gradient||", "values", "gradients"].forEach(function (h) { head.appendChild(el("th", null, h)); });
    tbl.appendChild(head);
    L.parameters.forEach(function (p) {
      var tr = el("tr"), t = tensor(p.value);
      [p.name, "(" + t.shape.join(", ") + ")", fmt(p.norm), p.grad_norm == null ? "none" : fmt(p.grad_norm)].forEach(function (x) { tr.appendChild(el("td", null, x)); });
      var a = el("td"); a.appendChild(histogram(p.hist, "#4a7bd0")); tr.appendChild(a);
      var b = el("td"); b.appendChild(histogram(p.grad_hist, "#d0664a")); tr.appendChild(b);
      tbl.appendChild(tr);
    });
    sec.appendChild(tbl);
    var w = L.parameters[0];
    if (L.type === "Conv2d") {
      var fm = el("div", "maps"), wm = absMax(w.value), gm = absMax(w.grad);
      fm.appendChild(filterBlock("filters W", w.value, {lo: -wm, hi: wm, diverging: true}));
      if (w.grad) fm.appendChild(filterBlock("dL/dW", w.grad, {lo: -gm, hi: gm, diverging: true}));
      sec.appendChild(fm);
    } else if (D.numbers) {
      var pm = el("div", "maps");
      L.parameters.forEach(function (p) { var m = absMax(p.value), g = absMax(p.grad);
        pm.appendChild(mapBlock(p.name, p.value, {lo: -m, hi: m, diverging: true}));
        if (p.grad) pm.appendChild(mapBlock("dL/d" + p.name, p.grad, {lo: -g, hi: g, diverging: true})); });
      sec.appendChild(pm);
    }
  }
}
// #selftest: hover and click the first channel, and say what happened
if (location.hash === "#selftest") {
  var first = document.querySelector("canvas.ch"), r = first.getBoundingClientRect();
  first.dispatchEvent(new MouseEvent("mousemove", {clientX: r.left + 1, clientY: r.top + 1, bubbles: true}));
  first.dispatchEvent(new MouseEvent("click", {bubbles: true}));
  document.body.dataset.selftest = "tip=" + tip.textContent + "; zoom=" + zoom.style.display;
}
document.body.dataset.renderMs = Math.round(performance.now() - started);
document.body.dataset.rendered = "ok";
})();
</script>
</body></html>
"""


# ---- the command ------------------------------------------------------------------------


def run_explain(args) -> int:
    """`cnnbp explain MODEL --html OUT`: one test image of the split `cnnbp evaluate` uses."""
    from . import load, train
    from ._text import count

    train._check_output_path(args.html, "html")
    train._set_threads(args)
    model = load(args.model)
    dtype = model.parameters()[0].data.dtype if model.parameters() else np.float32
    dataset = train._load_data(args, dtype=dtype, need_train=False)
    class_names = train._model_classes(model, dataset, "explain")
    n = len(dataset.y_test)
    if not 0 <= args.index < n:
        raise ValueError(f"[explain] index: expected an index in [0, {n}), got {args.index}")
    x = dataset.x_test[args.index : args.index + 1]
    label = int(dataset.y_test[args.index])
    y = float(label) if dataset.binary else label
    loss_fn = train.loss_function(dataset.binary)
    title = f"cnnbp explain: {args.model}, test image {args.index} ({dataset.description})"
    report = explain(model, x, y, loss_fn, class_names=class_names, title=title)
    report.to_html(args.html)
    summary = report.data["summary"]
    probability = report.data["probabilities"][report.prediction]
    print(
        f"wrote {args.html}: test image {args.index} of {count(n, 'image')}, label "
        f"{class_names[label]}, predicted {class_names[report.prediction]} "
        f"({100 * probability:.1f}%), loss {report.loss:.4f}; "
        f"{summary['holding']} of {count(summary['checked'], 'checked rule')} hold"
    )
    return 0 if report.passed else 1
