"""Every kernel's forward (through cnnbp.functional) against the NumPy oracle
(cnnbp.reference), for every case of the op table (tests/ops.py) in float32 and float64.

The oracle runs on exactly the numbers the kernel saw (float32 widened to float64); the
result is checked for type, shape, dtype and layout, then within the op's tolerance
(conftest.KERNEL_TOL): exactly for selections (max-pool values and indices, relu, flatten,
dropout masks).
"""

import pytest
from cnnbp import functional as F
from conftest import KERNEL_TOL, check_result
from ops import cases


@pytest.mark.parametrize("op, case, dtype", cases("cases+big"))
def test_forward_matches_the_oracle(op, case, dtype):
    s = op.sample(case, dtype)
    check_result(op.forward(F, s), op.expected(s), dtype, KERNEL_TOL[op.name][dtype], op.name)
