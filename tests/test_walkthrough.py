"""The walkthrough: every quantity of the derivation's network, its checks, and the command."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from cnnbp import nn, reference, walkthrough
from cnnbp._text import count
from cnnbp.gradcheck import numeric_gradient

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


FD_SIZES = {"dL/dW1": 9, "dL/dB1": 1, "dL/dW2": 4, "dL/dB2": 1, "dL/dX": 36}


def probes_and_skips(check):
    probed, skipped = (int(v) for v in re.findall(r"\d+", check.detail))
    return probed, skipped


def step_of(result, X=None, B1=None):
    """The walkthrough's network with `result`'s weights (B1 replaced if given), one forward
    and backward on X (default: result's input); (model, loss_fn, quantities, argmax)."""
    model, loss_fn = walkthrough.build_network(), nn.BCELoss()
    model.load_state_dict(
        {
            "0.weight": result["W1"],
            "0.bias": result["B1"] if B1 is None else B1,
            "4.weight": result["W2"],
            "4.bias": result["B2"],
        }
    )
    X = result["X"] if X is None else X
    q, argmax = walkthrough._forward_backward(model, loss_fn, X, result["Y"])
    return model, loss_fn, q, argmax


@pytest.mark.parametrize("seed", [0, 3])
def test_finite_differences_agree_with_the_analytic_gradients(seed):
    result = walkthrough.run(seed=seed)
    checks = {c.name: c for c in result.finite_differences}
    assert list(checks) == list(FD_SIZES)
    for name, check in checks.items():
        assert check.ok and check.error <= walkthrough.FD_TOLERANCE, (name, check.error)
        probed, skipped = probes_and_skips(check)
        assert probed + skipped == FD_SIZES[name] and probed > 0, check.detail
    # the same comparison outside the walkthrough: differences of the oracle's loss
    inputs = {n: np.array(result[n], copy=True) for n in ("X", "W1", "B1", "W2", "B2", "Y")}

    def loss():
        return reference.seed_network(**inputs)["L"]

    for name in ("X", "W1", "B1", "W2", "B2"):
        numeric = numeric_gradient(loss, inputs[name])
        scale = float(np.max(np.abs(numeric)))
        np.testing.assert_allclose(
            result["dL/d" + name], numeric, rtol=1e-6, atol=1e-6 * scale, err_msg=name
        )


@pytest.mark.parametrize("name", list(FD_SIZES))
def test_checks_catch_a_wrong_gradient(name):
    # a wrong gradient must be caught by both the oracle and the finite-difference check
    result = walkthrough.run(seed=0)
    model, loss_fn, q, argmax = step_of(result)
    q[name] = q[name] + 1e-3
    oracle = {c.name: c for c in walkthrough._oracle(q)}
    assert not oracle[name].ok
    assert [n for n, c in oracle.items() if not c.ok] == [name]
    fd = {c.name: c for c in walkthrough._finite_differences(model, loss_fn, q, argmax)}
    assert not fd[name].ok and fd[name].error > 100 * walkthrough.FD_TOLERANCE
    assert [n for n, c in fd.items() if not c.ok] == [name]


def test_finite_differences_skip_probes_across_a_relu_kink():
    # a zero image and a zero bias put every pre-activation Z1 exactly at the kink: moving
    # B1 or an input pixel changes which are positive, so those probes are skipped; the
    # filter's weights multiply zeros and cannot move Z1
    result = walkthrough.run(seed=0)
    model, loss_fn, q, argmax = step_of(result, X=np.zeros((1, 1, 6, 6)), B1=np.zeros(1))
    fd = {c.name: c for c in walkthrough._finite_differences(model, loss_fn, q, argmax)}
    assert probes_and_skips(fd["dL/dB1"]) == (0, 1)
    assert probes_and_skips(fd["dL/dW1"]) == (9, 0)
    assert probes_and_skips(fd["dL/dX"]) == (0, 36)
    assert all(c.ok for c in fd.values())


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
    assert "cnnbp walkthrough: error: argument --label: expected a number in [0, 1], got 3" in (
        proc.stderr
    )


def test_argmax_cells_are_listed_in_one_order_one_per_cell_of_P1():
    """Seed 2's argmax cells, [5, 2, 8, 15], are not in ascending order: the pooling windows
    of P1 (row-major) come first. The list, the identity's detail and the JSON agree."""
    result = walkthrough.run(seed=2, steps=1)
    cells = result.argmax.ravel().tolist()
    assert cells == [5, 2, 8, 15] and cells != sorted(cells)
    windows = result["A1"].reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)
    assert [divmod(c, 4) for c in cells] == [
        (i // 2 * 2 + w // 2, i % 2 * 2 + w % 2) for i, w in enumerate(windows.argmax(axis=1))
    ]
    text = walkthrough.format_result(result)
    assert f"one per cell of P1 in row-major order): {cells}" in text
    assert f"argmax cells {cells}, 0 nonzero elsewhere" in text
    assert result.to_json()["argmax"] == result.argmax.tolist()


def test_printed_counts_agree_with_their_nouns():
    assert count(1, "probe") == "1 probe" and count(2, "probe") == "2 probes"
    assert count(0, "class", "classes") == "0 classes" and count(1, "class") == "1 class"
    text = walkthrough.format_result(walkthrough.run(seed=0, steps=1))
    assert re.search(r"\(36 probes, 0 skipped", text) and "1 probes" not in text
