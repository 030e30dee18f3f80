"""The derivation, run: the 15-parameter network, one step, every quantity printed and checked.

    X (6x6) --conv W1 (3x3) + B1--> Z1 (4x4) --ReLU--> A1 (4x4) --maxpool 2x2/2--> P1 (2x2)
      --flatten--> F (4) --F.W2 + B2--> Z2 (1) --sigmoid--> A2 = y_hat --BCE(Y)--> L

The network is built from cnnbp.nn layers (the C++ kernels), in float64. The walkthrough
reads every quantity off the layers' traces, shows the derivation's identities holding on
these numbers, compares everything with the NumPy oracle (cnnbp.reference), compares every
gradient with central finite differences, then takes a few gradient-descent steps.

    from cnnbp import walkthrough
    result = walkthrough.run(seed=0)
    result["dL/dW1"], result.passed
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import functional as F
from . import nn, optim, reference
from ._text import count
from .gradcheck import numeric_gradient

# The order in which the quantities are computed and shown.
FORWARD_NAMES = ["X", "W1", "B1", "Z1", "A1", "P1", "F", "W2", "B2", "Z2", "A2", "Y", "L"]
BACKWARD_NAMES = [
    "dL/dA2",
    "dL/dZ2",
    "dL/dW2",
    "dL/dB2",
    "dL/dF",
    "dL/dP1",
    "dL/dA1",
    "dL/dZ1",
    "dL/dW1",
    "dL/dB1",
    "dL/dX",
]

ORACLE_TOLERANCE = 1e-12  # kernels vs the oracle, both float64: relative to the largest value
IDENTITY_TOLERANCE = 1e-12  # the derivation's identities, float64
FD_TOLERANCE = 1e-6  # central differences with step FD_STEP are accurate to ~1e-9
FD_STEP = 1e-6


@dataclass
class Check:
    """One comparison: `error` is max |got - expected| / max(max |expected|, 1e-12)."""

    name: str
    error: float
    tolerance: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tolerance)


@dataclass
class WalkthroughResult:
    quantities: OrderedDict[str, np.ndarray | float]
    argmax: np.ndarray
    identities: list[Check] = field(default_factory=list)
    oracle: list[Check] = field(default_factory=list)
    finite_differences: list[Check] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __getitem__(self, name):
        return self.quantities[name]

    @property
    def checks(self) -> list[Check]:
        return self.identities + self.oracle + self.finite_differences

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks) and self.losses[-1] < self.losses[0]

    def to_json(self) -> dict:
        def value(v):
            return (
                float(v)
                if np.isscalar(v)
                else {"shape": list(np.shape(v)), "values": np.asarray(v).tolist()}
            )

        def checks(items):
            return [
                {
                    "name": c.name,
                    "error": c.error,
                    "tolerance": c.tolerance,
                    "ok": c.ok,
                    "detail": c.detail,
                }
                for c in items
            ]

        return {
            "quantities": {k: value(v) for k, v in self.quantities.items()},
            "argmax": self.argmax.tolist(),
            "identities": checks(self.identities),
            "oracle": checks(self.oracle),
            "finite_differences": checks(self.finite_differences),
            "losses": self.losses,
            "passed": self.passed,
        }


def build_network() -> nn.Sequential:
    """The derivation's network: 9 + 1 + 4 + 1 = 15 trainable parameters, float64."""
    return nn.Sequential(
        nn.Conv2d(1, 1, 3, dtype=np.float64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 1, dtype=np.float64),
        nn.Sigmoid(),
    )


def _relative_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-12)
    return float(np.max(np.abs(got - expected), initial=0.0)) / scale


def _forward_backward(model, loss_fn, X, Y):
    """One forward and backward through the layers; every quantity read off their traces."""
    model.zero_grad()
    A2 = model(X)
    L = loss_fn(A2, Y)
    dA2 = loss_fn.backward()
    model.backward(dA2)
    conv, relu, pool, flatten, fc, sigmoid = model
    q = OrderedDict()
    q["X"], q["W1"], q["B1"] = X, conv.weight.data, conv.bias.data
    q["Z1"], q["A1"], q["P1"], q["F"] = conv.output, relu.output, pool.output, flatten.output
    q["W2"], q["B2"] = fc.weight.data, fc.bias.data
    q["Z2"], q["A2"], q["Y"], q["L"] = fc.output, sigmoid.output, Y, L
    q["dL/dA2"], q["dL/dZ2"] = dA2, sigmoid.grad_input
    q["dL/dW2"], q["dL/dB2"], q["dL/dF"] = fc.weight.grad, fc.bias.grad, fc.grad_input
    q["dL/dP1"], q["dL/dA1"], q["dL/dZ1"] = flatten.grad_input, pool.grad_input, relu.grad_input
    q["dL/dW1"], q["dL/dB1"], q["dL/dX"] = conv.weight.grad, conv.bias.grad, conv.grad_input
    # a snapshot: parameters are updated in place by later steps
    q = OrderedDict((k, v if np.isscalar(v) else np.array(v, copy=True)) for k, v in q.items())
    return q, pool.indices.copy()


def _identities(q, argmax) -> list[Check]:
    """The derivation's equations, evaluated on this step's numbers."""
    checks = []
    checks.append(
        Check("dL/dZ2 = A2 - Y", _relative_error(q["dL/dZ2"], q["A2"] - q["Y"]), IDENTITY_TOLERANCE)
    )
    checks.append(
        Check(
            "dL/dW2 = (A2 - Y) F^T",
            _relative_error(q["dL/dW2"], (q["A2"] - q["Y"]).T @ q["F"]),
            IDENTITY_TOLERANCE,
        )
    )
    checks.append(
        Check(
            "dL/dB2 = A2 - Y",
            _relative_error(q["dL/dB2"], (q["A2"] - q["Y"])[0]),
            IDENTITY_TOLERANCE,
        )
    )
    checks.append(
        Check(
            "dL/dF = W2^T (A2 - Y)",
            _relative_error(q["dL/dF"], (q["A2"] - q["Y"]) @ q["W2"]),
            IDENTITY_TOLERANCE,
        )
    )
    # dL/dA1 is dL/dP1 at the argmax cells and exactly zero everywhere else
    expected_dA1 = np.zeros(16)
    expected_dA1[argmax.ravel()] = q["dL/dP1"].ravel()
    off_argmax = np.delete(q["dL/dA1"].ravel(), argmax.ravel())
    checks.append(
        Check(
            "dL/dA1 lands only on the argmax cells",
            _relative_error(q["dL/dA1"].ravel(), expected_dA1),
            IDENTITY_TOLERANCE,
            f"argmax cells {argmax.ravel().tolist()}, "
            f"{int(np.count_nonzero(off_argmax))} nonzero elsewhere",
        )
    )
    checks.append(
        Check(
            "dL/dZ1 = dL/dA1 * (Z1 > 0)",
            _relative_error(q["dL/dZ1"], q["dL/dA1"] * (q["Z1"] > 0)),
            IDENTITY_TOLERANCE,
        )
    )
    checks.append(
        Check(
            "dL/dB1 = sum(dL/dZ1)",
            _relative_error(q["dL/dB1"], [q["dL/dZ1"].sum()]),
            IDENTITY_TOLERANCE,
        )
    )
    # X (1,1,6,6) correlated with dL/dZ1 (1,1,4,4) used as a filter gives a (1,1,3,3) map
    checks.append(
        Check(
            "dL/dW1 = conv(X, dL/dZ1)",
            _relative_error(q["dL/dW1"], F.conv2d(q["X"], q["dL/dZ1"])),
            IDENTITY_TOLERANCE,
        )
    )
    return checks


def _oracle(q) -> list[Check]:
    expected = reference.seed_network(q["X"], q["W1"], q["B1"], q["W2"], q["B2"], q["Y"])
    return [
        Check(name, _relative_error(q[name], expected[name]), ORACLE_TOLERANCE)
        for name in FORWARD_NAMES + BACKWARD_NAMES
    ]


def _finite_differences(model, loss_fn, q, argmax) -> list[Check]:
    """Central differences of L for all 15 parameters and the 36 inputs.

    A probe whose +-h step moves a pre-activation across 0 (a ReLU kink) or changes a
    pooling argmax is skipped: there L is not differentiable, and the difference lies.
    """
    X, Y = q["X"], q["Y"]
    conv, pool = model[0], model[2]
    x_probe = np.array(X, copy=True)

    def loss():
        return loss_fn(model(x_probe), Y)

    def crossed_a_kink_or_tie():
        return not (
            np.array_equal(conv.output > 0, q["Z1"] > 0) and np.array_equal(pool.indices, argmax)
        )

    targets = [
        ("W1", model[0].weight.data, q["dL/dW1"]),
        ("B1", model[0].bias.data, q["dL/dB1"]),
        ("W2", model[4].weight.data, q["dL/dW2"]),
        ("B2", model[4].bias.data, q["dL/dB2"]),
        ("X", x_probe, q["dL/dX"]),
    ]
    checks = []
    for name, values, analytic in targets:
        numeric = numeric_gradient(loss, values, FD_STEP, skip=crossed_a_kink_or_tie)
        probed = ~np.isnan(numeric)
        skipped = values.size - int(probed.sum())
        error = _relative_error(np.asarray(analytic)[probed], numeric[probed])
        checks.append(
            Check(
                f"dL/d{name}",
                error,
                FD_TOLERANCE,
                f"{count(int(probed.sum()), 'probe')}, {skipped} skipped at kinks/ties",
            )
        )
    model(X)  # leave the layers holding the unperturbed step
    return checks


def setup(seed: int = 0, label: float = 1.0):
    """The network, X, Y and the loss of `seed`: (model, X, Y, loss_fn)."""
    rng = np.random.default_rng(seed)
    nn.manual_seed(seed)
    model = build_network()
    X = np.round(rng.uniform(-1.0, 1.0, size=(1, 1, 6, 6)), 2)  # X (N=1, C=1, 6, 6)
    Y = np.array([[label]], dtype=np.float64)  # Y (N=1, 1)
    return model, X, Y, nn.BCELoss()


def run(seed: int = 0, label: float = 1.0, lr: float = 0.5, steps: int = 5) -> WalkthroughResult:
    """Build the network from `seed`, run one checked step, then `steps` steps of SGD."""
    if not 0.0 <= label <= 1.0:
        raise ValueError(f"[walkthrough] label: expected a value in [0, 1], got {label}")
    if steps < 1:
        raise ValueError(f"[walkthrough] steps: expected >= 1, got {steps}")
    model, X, Y, loss_fn = setup(seed, label)

    q, argmax = _forward_backward(model, loss_fn, X, Y)
    result = WalkthroughResult(quantities=q, argmax=argmax)
    result.identities = _identities(q, argmax)
    result.oracle = _oracle(q)
    result.finite_differences = _finite_differences(model, loss_fn, q, argmax)

    # gradient descent: the loss should fall
    model.zero_grad()
    sgd = optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps + 1):
        out = model(X)
        result.losses.append(loss_fn(out, Y))
        if len(result.losses) > steps:
            break
        model.zero_grad()
        model.backward(loss_fn.backward())
        sgd.step()
    return result


# ---- printing ---------------------------------------------------------------------------

_DESCRIPTIONS = {
    "X": "input image",
    "W1": "conv filter",
    "B1": "conv bias",
    "Z1": "conv(X, W1) + B1",
    "A1": "ReLU(Z1)",
    "P1": "max-pool 2x2/2 of A1",
    "F": "P1 flattened",
    "W2": "linear weights",
    "B2": "linear bias",
    "Z2": "F . W2^T + B2",
    "A2": "sigmoid(Z2) = y_hat",
    "Y": "label",
    "L": "binary cross-entropy(A2, Y)",
    "dL/dA2": "(A2 - Y) / (A2 (1 - A2))",
    "dL/dZ2": "dL/dA2 * A2 (1 - A2)",
    "dL/dW2": "dL/dZ2 F^T",
    "dL/dB2": "dL/dZ2",
    "dL/dF": "W2^T dL/dZ2",
    "dL/dP1": "dL/dF reshaped to P1",
    "dL/dA1": "dL/dP1 routed to the argmax cells",
    "dL/dZ1": "dL/dA1 * (Z1 > 0)",
    "dL/dW1": "conv(X, dL/dZ1)",
    "dL/dB1": "sum(dL/dZ1)",
    "dL/dX": "full conv of dL/dZ1 with rotated W1",
}


def _show(name, value) -> str:
    head = f"{name:7s} {_DESCRIPTIONS[name]}"
    if np.isscalar(value):
        return f"{head}\n        = {value:.6f}"
    arr = np.asarray(value)
    # show each sample's planes as matrices: (1, 1, 4, 4) prints as its 4x4 plane
    squeezed = arr.reshape(arr.shape[-2:]) if arr.ndim == 4 else arr
    body = np.array2string(
        squeezed, precision=4, suppress_small=True, floatmode="fixed", max_line_width=100
    )
    body = "\n".join("        " + line for line in body.splitlines())
    return f"{head}   shape {tuple(arr.shape)}\n{body}"


def format_result(result: WalkthroughResult) -> str:
    lines = [
        "cnnbp walkthrough: X -> conv(W1)+B1 -> Z1 -> ReLU -> A1 -> max-pool -> P1 -> "
        "flatten -> F -> F.W2+B2 -> Z2 -> sigmoid -> A2 -> BCE -> L",
        "15 trainable parameters: W1 (9) + B1 (1) + W2 (4) + B2 (1); float64",
        "",
        "== forward",
    ]
    lines += [_show(n, result[n]) for n in FORWARD_NAMES]
    lines += [
        "",
        "max-pool argmax (flat index into the 4x4 plane of A1, one per cell of P1 in "
        f"row-major order): {result.argmax.ravel().tolist()}",
        "",
        "== backward",
    ]
    lines += [_show(n, result[n]) for n in BACKWARD_NAMES]

    def table(title, checks):
        out = ["", f"== {title}"]
        for c in checks:
            detail = f"  ({c.detail})" if c.detail else ""
            out.append(
                f"  {'ok  ' if c.ok else 'FAIL'} {c.name:38s} error {c.error:.2e} "
                f"(tolerance {c.tolerance:.0e}){detail}"
            )
        return out

    lines += table("the derivation's identities on these numbers", result.identities)
    lines += table("C++ kernels vs the NumPy oracle (float64, relative)", result.oracle)
    lines += table("gradients vs central finite differences (relative)", result.finite_differences)
    lines += ["", "== gradient descent (SGD)"]
    lines += [f"  step {i}: L = {loss:.6f}" for i, loss in enumerate(result.losses)]
    lines += ["", "all checks passed" if result.passed else "SOME CHECKS FAILED"]
    return "\n".join(lines)


def write_html(path, seed=0, label=1.0):
    """The first step as cnnbp explain's page, every number written in its cell."""
    from .explainer import explain

    model, X, Y, loss_fn = setup(seed, label)
    title = f"cnnbp walkthrough (seed {seed}, Y = {label:g}): the 15-parameter network's first step"
    report = explain(model, X, Y, loss_fn, class_names=["0", "1"], title=title, numbers=True)
    report.to_html(path)
    return report


def main(seed=0, label=1.0, lr=0.5, steps=5, as_json=False, html=None) -> int:
    result = run(seed=seed, label=label, lr=lr, steps=steps)
    if html is not None:
        report = write_html(html, seed=seed, label=label)
        if not as_json:
            print(f"wrote {html}")
        if not report.passed:
            return 1
    print(json.dumps(result.to_json(), indent=1) if as_json else format_result(result))
    return 0 if result.passed else 1
