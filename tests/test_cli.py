"""The `cnnbp` command as a whole: its version, its error messages, and how it ends when
the program reading its output stops early."""

import os
import re
import subprocess
import sys
from pathlib import Path

import cnnbp
import numpy as np
import pytest
from cnnbp import __main__ as cli
from cnnbp import _core, walkthrough

ROOT = Path(__file__).resolve().parents[1]


def run(*args, **streams):
    """`python -m cnnbp ARGS`, its output captured unless `streams` says where it goes."""
    options = dict(capture_output=True) if not streams else streams
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "cnnbp", *map(str, args)], text=True, timeout=180, env=env, **options
    )


def test_version_is_written_once_and_everything_reports_it():
    result = run("--version")
    assert result.returncode == 0 and result.stdout == f"cnnbp {cnnbp.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", cnnbp.__version__)
    assert _core.__version__ == cnnbp.__version__  # CMake's project(VERSION), compiled in
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'input = "python/cnnbp/__init__.py"' in pyproject
    assert not re.search(r"^version\s*=", pyproject, re.MULTILINE)
    assert "project(cnnbp VERSION ${_cnnbp_version}" in (ROOT / "CMakeLists.txt").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["walkthrough", "--seed", "-1"], "argument --seed: expected an integer in [0, 2^64)"),
        (["walkthrough", "--seed", "x"], "argument --seed: expected an integer, got 'x'"),
        (["walkthrough", "--label", "2"], "argument --label: expected a number in [0, 1]"),
        (["walkthrough", "--label", "nan"], "argument --label: expected a number in [0, 1]"),
        (["walkthrough", "--lr", "0"], "argument --lr: expected a number > 0, got 0"),
        (["walkthrough", "--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
        (["train", "--seed", "-1"], "argument --seed: expected an integer in [0, 2^64)"),
        (["evaluate", "m.npz", "--seed", "-3"], "argument --seed: expected an integer in"),
        (["train", "--optimizer", "adam", "--momentum", "0.9"], "argument --momentum: not used"),
    ],
)
def test_every_option_error_names_the_option_and_the_command(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert f"cnnbp {args[0]}: error: {message}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_errors_of_a_running_command_carry_its_name(monkeypatch, capsys):
    def fail(**kwargs):
        raise ValueError("[walkthrough] something: expected this, got that")

    monkeypatch.setattr(walkthrough, "main", fail)
    assert cli.main(["walkthrough"]) == 2
    assert capsys.readouterr().err == (
        "cnnbp walkthrough: [walkthrough] something: expected this, got that\n"
    )


@pytest.fixture(scope="module")
def small_model_and_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    np.savez(folder / "d.npz", x=rng.uniform(size=(40, 8, 8)), y=np.arange(40) % 2)
    trained = run(
        "train", "--npz", folder / "d.npz", "--epochs", 1, "--quiet", "--save", folder / "m.npz"
    )
    assert trained.returncode == 0, trained.stderr
    return folder


@pytest.mark.parametrize(
    "args",
    [
        ["walkthrough"],
        ["walkthrough", "--json"],
        ["--help"],
        ["--version"],
        ["train", "--npz", "{d}/d.npz", "--epochs", "1", "--quiet"],
        ["train", "--npz", "{d}/d.npz", "--epochs", "1", "--quiet", "--json"],
        ["evaluate", "{d}/m.npz", "--npz", "{d}/d.npz"],
        ["evaluate", "{d}/m.npz", "--npz", "{d}/d.npz", "--json"],
    ],
    ids=lambda args: " ".join(a for a in args if "{d}" not in a),
)
def test_output_into_a_closed_pipe_ends_quietly(small_model_and_data, args):
    """`cnnbp ... | head`: the reader is gone before anything is written."""
    args = [a.format(d=small_model_and_data) for a in args]
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE, as after head has exited
    try:
        result = run(*args, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    # as a program stopped by SIGPIPE; argparse's --help and --version ignore write errors
    assert result.returncode == (0 if args[0].startswith("--") else 141), result.stderr
    assert result.stderr == "", result.stderr  # no traceback, no "Exception ignored"
