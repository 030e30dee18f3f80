"""Check a model's parameter gradients against central finite differences.

    report = cnnbp.gradcheck(model, x, y, nn.CrossEntropyLoss())
    print(report)                    # one line per parameter: worst error, probes, skipped
    report.passed, report["0.weight"].error

For every entry of every parameter p, the analytic dL/dp from one backward pass is compared
with (L(p + eps) - L(p - eps)) / (2 eps). The comparison runs in float64: a float32 model
is checked on a float64 copy of itself (same architecture and weights, through the model
file format), so float32 rounding does not drown the differences; the model passed in is
left as it was.

ReLU and max-pooling are not differentiable everywhere. A probe whose +-eps step changes
which ReLU inputs are positive, or which element a max-pool window picks, straddles a kink
or a tie, where the difference quotient means nothing: such probes are skipped and counted.
They are found by comparing every layer's pattern (ReLU: input > 0; MaxPool2d: indices)
after each perturbed forward with the unperturbed one.

Each parameter's error is the walkthrough's measure, max |analytic - numeric| over the
probed entries divided by the largest |numeric| (at least 1e-12); a parameter passes when
that error is at most rtol, or when the absolute difference is at most atol (for gradients
that are zero up to rounding).

The differences come from `numeric_gradient(f, x, eps)`, cnnbp's one central-difference
routine; the walkthrough and the test suite use it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import nn


def numeric_gradient(f, x, eps=1e-6, entries=None, skip=None):
    """Central finite differences of the scalar f() with respect to the array x (float64).

    f takes no arguments and reads x, which is changed in place, one entry at a time:

        numeric[i] = (f() at x[i] + eps  -  f() at x[i] - eps) / (2 eps)

    and x[i] is restored before the next entry (x ends as it began). x must be a writeable
    float64 array; f must return a number.

    entries: the flat (row-major) indices to probe; default all of them. Entries not probed
    are NaN in the result.
    skip: a function of no arguments, called right after each f(); when it returns True for
    the + or the - evaluation, that entry is NaN too. It lets a caller drop probes whose step
    crosses a kink or a tie (a ReLU input changing sign, a max-pool window changing its
    pick), where the difference quotient means nothing.

    With eps = 1e-6 in float64 the truncation error is ~eps^2 |f'''| and the rounding error
    ~1e-16 |f| / eps, about 1e-10 relative: a wrong index or factor, an O(1) error, stands out.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float64:
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"[numeric_gradient] x: expected a float64 array, got {got}")
    if not eps > 0:
        raise ValueError(f"[numeric_gradient] eps: expected > 0, got {eps}")
    numeric = np.full(x.shape, np.nan)
    for i in range(x.size) if entries is None else entries:
        index = np.unravel_index(i, x.shape)
        saved = x[index]
        x[index] = saved + eps
        plus = float(f())
        crossed = skip is not None and skip()
        x[index] = saved - eps
        minus = float(f())
        crossed = crossed or (skip is not None and skip())
        x[index] = saved
        if not crossed:
            numeric[index] = (plus - minus) / (2 * eps)
    return numeric


@dataclass
class ParameterCheck:
    """The comparison for one parameter."""

    name: str
    shape: tuple
    error: float  # max |analytic - numeric| / max(max |numeric|, 1e-12), probed entries
    abs_error: float  # max |analytic - numeric|
    probed: int  # entries compared
    skipped: int  # entries whose probe crossed a ReLU kink or a max-pool tie
    worst_index: tuple | None
    passed: bool


@dataclass
class GradcheckReport:
    """Per-parameter results, by name, in the model's order; str() is a printable table."""

    parameters: dict = field(default_factory=dict)
    eps: float = 1e-6
    rtol: float = 1e-5
    atol: float = 1e-8
    loss: float = float("nan")
    copied_from: str | None = None  # "float32" when a float64 copy was checked

    def __getitem__(self, name) -> ParameterCheck:
        return self.parameters[name]

    def __iter__(self):
        return iter(self.parameters.values())

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self)

    @property
    def failed(self) -> list:
        """Names of the parameters whose gradients disagree with finite differences."""
        return [check.name for check in self if not check.passed]

    def summary(self) -> str:
        origin = f" (a float64 copy of the {self.copied_from} model)" if self.copied_from else ""
        rows = [
            (
                c.name,
                "x".join(map(str, c.shape)) or "scalar",
                f"{c.probed}",
                f"{c.skipped}",
                f"{c.error:.2e}",
                f"{c.abs_error:.2e}",
                "ok" if c.passed else "FAILED",
            )
            for c in self
        ]
        head = ("parameter", "shape", "probed", "skipped", "rel. error", "abs. error", "")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

        def line(r):
            cells = (v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
            return "  ".join(cells).rstrip()

        lines = [
            f"gradcheck: central differences, eps {self.eps:g}, float64{origin}; "
            f"loss {self.loss:.6g}",
            line(head),
        ] + [line(r) for r in rows]
        verdict = "passed" if self.passed else f"FAILED: {', '.join(self.failed)}"
        lines.append(
            f"{verdict} (rel. error <= {self.rtol:g} or abs. error <= {self.atol:g}; "
            f"probes across a ReLU kink or max-pool tie skipped)"
        )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "eps": self.eps,
            "rtol": self.rtol,
            "atol": self.atol,
            "loss": self.loss,
            "copied_from": self.copied_from,
            "parameters": {
                c.name: {
                    "shape": list(c.shape),
                    "error": c.error,
                    "abs_error": c.abs_error,
                    "probed": c.probed,
                    "skipped": c.skipped,
                    "passed": c.passed,
                }
                for c in self
            },
        }

    def __str__(self):
        return self.summary()


def _layers(model):
    """Every module of the model, nested ones included."""
    if isinstance(model, nn.Sequential | nn.Residual | nn.Concat):
        return [module for _, module in model.named_modules()]
    try:
        return list(model)
    except TypeError:
        return [model]


def _patterns(model):
    """What decides which piece of a piecewise-linear layer is active, layer by layer."""
    out = []
    for layer in _layers(model):
        if isinstance(layer, nn.ReLU) and layer.input is not None:
            out.append(np.asarray(layer.input) > 0)
        indices = getattr(layer, "indices", None)
        if indices is not None:
            out.append(np.array(indices, copy=True))
    return out


def _same(patterns, reference):
    return len(patterns) == len(reference) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(patterns, reference)
    )


def _copy_of(module):
    """The module rebuilt in float64 from its config() (containers from their children's),
    or None when it is not one of cnnbp's layers or containers."""
    if isinstance(module, nn.Sequential | nn.Concat):
        children = [_copy_of(child) for _, child in module.named_children()]
        return None if None in children else type(module)(*children)
    if isinstance(module, nn.Residual):
        block = _copy_of(module.block)
        shortcut = None if module.shortcut is None else _copy_of(module.shortcut)
        if block is None or (module.shortcut is not None and shortcut is None):
            return None
        return nn.Residual(block, shortcut)
    declared = getattr(nn, module.config()["type"], None)
    if not (isinstance(declared, type) and isinstance(module, declared)):
        return None
    arguments = module.config()
    del arguments["type"]
    if "dtype" in type(module).__signature__.parameters:  # BatchNorm2d(affine=False) too
        arguments["dtype"] = np.float64
    return declared(**arguments)


def _float64_copy(model):
    """The same architecture (each layer's config()) and weights, in float64."""
    copy = _copy_of(model) if isinstance(model, nn.Sequential) else None
    if copy is None:
        raise TypeError(
            f"[gradcheck] model: expected float64 parameters, or a Sequential of cnnbp's "
            f"layers to copy into float64, got a float32 {type(model).__name__}; "
            f"build it with dtype=np.float64"
        )
    copy.load_state_dict(  # the floats in float64; num_batches_tracked stays int64
        {
            k: v.astype(np.float64) if v.dtype.kind == "f" else v
            for k, v in model.state_dict().items()
        }
    )
    return copy


def _modules(module):
    """The module and, recursively, every module inside it."""
    yield module
    for child in getattr(module, "_children", lambda: ())():
        yield from _modules(child)


def _evaluation_mode(model):
    """Put Dropout layers in eval mode, so every forward is the same function; returns how to
    restore them. BatchNorm2d keeps its mode (in training mode its batch statistics are a
    function of x and the parameters), and the buffers that its training forwards update
    (running statistics, num_batches_tracked) are restored with the modes."""
    dropouts = [m for m in _modules(model) if isinstance(m, nn.Dropout) and m.training]
    buffers = [(b, b.copy()) for b in getattr(model, "buffers", list)()]
    for m in dropouts:
        m.eval()

    def restore():
        for m in dropouts:
            m.train()
        for b, value in buffers:
            np.copyto(b, value)

    return restore


def gradcheck(
    model, x, y, loss_fn, eps=1e-6, rtol=1e-5, atol=1e-8, max_entries=None, seed=0
) -> GradcheckReport:
    """Compare every parameter gradient of `model` on (x, y) with central differences.

    model: an nn.Sequential or a single layer; loss_fn: an nn loss (called as loss_fn(out, y),
    then loss_fn.backward()). float32 models are checked on a float64 copy; x and floating y
    are converted to float64. max_entries probes at most that many entries per parameter,
    chosen with `seed` (default: all of them).
    """
    if not eps > 0:
        raise ValueError(f"[gradcheck] eps: expected > 0, got {eps}")
    named = model.named_parameters()
    if not named:
        raise ValueError("[gradcheck] model: expected trainable parameters, got none")
    dtypes = {np.dtype(p.data.dtype) for _, p in named}
    copied_from = None
    if dtypes != {np.dtype(np.float64)}:
        if len(dtypes) > 1:
            raise TypeError(
                f"[gradcheck] model: expected one dtype for all parameters, "
                f"got {sorted(map(str, dtypes))}"
            )
        copied_from = str(dtypes.pop())
        model = _float64_copy(model)
        named = model.named_parameters()
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.asarray(y)
    if y.dtype.kind == "f":
        y = np.ascontiguousarray(y, dtype=np.float64)

    restore = _evaluation_mode(model)
    try:
        model.zero_grad()
        loss = float(loss_fn(model(x), y))
        model.backward(loss_fn.backward())
        base = _patterns(model)
        analytic = {
            name: (
                np.zeros(p.data.shape)
                if p.grad is None
                else np.array(p.grad, dtype=np.float64, copy=True)
            )
            for name, p in named
        }

        def loss_of_the_model():
            return loss_fn(model(x), y)

        def crossed_a_kink_or_tie():
            return not _same(_patterns(model), base)

        rng = np.random.default_rng(seed)
        report = GradcheckReport(eps=eps, rtol=rtol, atol=atol, loss=loss, copied_from=copied_from)
        for name, p in named:
            values = p.data  # perturbed in place, entry by entry, and restored
            count = values.size
            flat = np.arange(count)
            if max_entries is not None and count > max_entries:
                flat = np.sort(rng.choice(count, size=max_entries, replace=False))
            numeric = numeric_gradient(loss_of_the_model, values, eps, flat, crossed_a_kink_or_tie)
            probed = ~np.isnan(numeric)
            skipped = len(flat) - int(probed.sum())
            difference = np.abs(analytic[name] - np.where(probed, numeric, 0.0))
            difference[~probed] = 0.0
            abs_error = float(difference.max(initial=0.0))
            scale = max(float(np.max(np.abs(numeric[probed]), initial=0.0)), 1e-12)
            error = abs_error / scale
            worst = (
                tuple(int(v) for v in np.unravel_index(np.argmax(difference), values.shape))
                if probed.any()
                else None
            )
            report.parameters[name] = ParameterCheck(
                name,
                tuple(values.shape),
                error,
                abs_error,
                int(probed.sum()),
                skipped,
                worst,
                passed=error <= rtol or abs_error <= atol,
            )
        model(x)  # leave the layers holding the unperturbed forward
    finally:
        restore()
    return report


__all__ = ["gradcheck", "numeric_gradient", "GradcheckReport", "ParameterCheck"]
