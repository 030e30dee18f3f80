"""The walkthrough: every quantity of the derivation's network, its checks, and the command."""

import json
import subprocess
import sys

import numpy as np
import pytest
from cnnbp import reference, walkthrough

ALL_NAMES = walkthrough.FORWARD_NAMES + walkthrough.BACKWARD_NAMES
SHAPES = {
    "X": (1, 1, 6, 6),
    "W1": (1, 1, 3, 3),
    "B1": (1,),
    "Z1": (1, 1, 4, 4),
    "A1": (1, 1, 4, 4),
    "P1": (1, 1, 2, 2),
    "F": (1, 4),
    "W2": (1, 4),
    "B2": (1,),
    "Z2": (1, 1),
    "A2": (1, 1),
    "Y": (1, 1),
}


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
@pytest.mark.parametrize("label", [0.0, 1.0])
def test_run_passes_every_check(seed, label):
    result = walkthrough.run(seed=seed, label=label, steps=3)
    failed = [(c.name, c.error) for c in result.checks if not c.ok]
    assert failed == []
    assert result.passed
    assert len(result.losses) == 4
    assert result.losses[-1] < result.losses[0]


def test_quantities_have_the_derivations_shapes_and_15_parameters():
    result = walkthrough.run(seed=0)
    assert list(result.quantities) == ALL_NAMES
    for name, shape in SHAPES.items():
        assert np.shape(result[name]) == shape, name
        assert (
            np.shape(result["dL/d" + name] if "dL/d" + name in result.quantities else result[name])
            == shape
        )
    assert isinstance(result["L"], float)
    n_params = sum(np.size(result[n]) for n in ("W1", "B1", "W2", "B2"))
    assert n_params == 15


def test_numbers_match_the_oracle_independently():
    # recompute from the walkthrough's inputs with the oracle alone, not through run()'s checks
    result = walkthrough.run(seed=3, label=0.0)
    expected = reference.seed_network(*(result[n] for n in ("X", "W1", "B1", "W2", "B2", "Y")))
    for name in ALL_NAMES:
        np.testing.assert_allclose(
            result[name], expected[name], rtol=1e-12, atol=1e-15, err_msg=name
        )
    # dL/dZ2 = A2 - Y for one sample; the pool gradient sits on the argmax cells only
    np.testing.assert_allclose(result["dL/dZ2"], result["A2"] - result["Y"], rtol=1e-14)
    dA1 = result["dL/dA1"].ravel()
    off = np.setdiff1d(np.arange(16), result.argmax.ravel())
    assert np.all(dA1[off] == 0)


def test_checks_can_fail():
    # a wrong gradient must be caught by both the oracle and the finite-difference check
    result = walkthrough.run(seed=0)
    q = result.quantities
    q["dL/dW1"] = q["dL/dW1"] + 1e-3
    oracle = {c.name: c for c in walkthrough._oracle(q)}
    assert not oracle["dL/dW1"].ok


def test_same_seed_same_numbers_different_seed_different_numbers():
    a, b, c = walkthrough.run(seed=5), walkthrough.run(seed=5), walkthrough.run(seed=6)
    assert a["L"] == b["L"] and a.losses == b.losses
    assert not np.array_equal(a["X"], c["X"])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"\[walkthrough\] label"):
        walkthrough.run(label=2.0)
    with pytest.raises(ValueError, match=r"\[walkthrough\] steps"):
        walkthrough.run(steps=0)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cnnbp", *args], capture_output=True, text=True, timeout=120
    )


def test_command_prints_every_quantity_and_passes():
    proc = _cli("walkthrough", "--seed", "1", "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    for name in ALL_NAMES:
        assert f"\n{name} " in proc.stdout, name
    assert "dL/dW1 = conv(X, dL/dZ1)" in proc.stdout
    assert "all checks passed" in proc.stdout
    assert "FAIL" not in proc.stdout


def test_command_json_matches_python_api():
    proc = _cli(
        "walkthrough", "--json", "--seed", "4", "--label", "0", "--lr", "0.1", "--steps", "3"
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    result = walkthrough.run(seed=4, label=0.0, lr=0.1, steps=3)
    assert data["passed"] is True
    assert set(data["quantities"]) == set(ALL_NAMES)
    for name in ALL_NAMES:
        got = data["quantities"][name]
        if name == "L":
            assert got == result["L"]
        else:
            assert got["shape"] == list(np.shape(result[name]))
            np.testing.assert_array_equal(np.array(got["values"]), result[name])
    assert data["losses"] == result.losses
    assert len(data["finite_differences"]) == 5


def test_command_rejects_bad_label():
    proc = _cli("walkthrough", "--label", "3")
    assert proc.returncode == 2
    assert "[walkthrough] label" in proc.stderr
