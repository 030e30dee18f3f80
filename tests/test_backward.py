"""Every kernel's backward against the oracle's (float32 and float64), and against central
finite differences of the kernel's own forward in float64, for every op of the table
(tests/ops.py).

Finite differences run on values away from ReLU kinks (|z| >= 1e-2) and max-pool ties
(values 0.1 apart): a 1e-6 step never changes which branch is taken. The objective is the
loss itself for the losses and sum(output * dy) for the others, whose gradient is what the
backward returns for that dy.
"""

import numpy as np
import pytest
from cnnbp import functional as F
from cnnbp import reference as ref
from conftest import KERNEL_TOL, check_result, fd_check
from ops import OPS, cases


@pytest.mark.parametrize("op, case, dtype", cases("cases+big"))
def test_backward_matches_the_oracle(op, case, dtype):
    s = op.sample(case, dtype)
    got, want = op.backward(F, s), op.backward(ref, s)
    check_result(got, want, dtype, KERNEL_TOL[op.backward_name][dtype], op.backward_name)
    for gradient, key in zip(got, op.wrt):
        if s[key] is not None:
            assert gradient.shape == np.shape(s[key]), key


@pytest.mark.parametrize(
    "op, case", [pytest.param(op, case, id=f"{op.name}-{case}") for op in OPS for case in op.cases]
)
def test_backward_matches_finite_differences(op, case):
    s = op.sample(case, np.float64, "smooth")
    for gradient, key in zip(op.backward(F, s), op.wrt):
        if s[key] is not None:  # perturbed in place by the finite differences
            fd_check(gradient, lambda: op.objective(s), s[key], f"{op.name}: d{key}")
