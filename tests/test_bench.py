"""benchmarks/bench.py keeps working: one quick run (one round, one tiny sample) of a case of
each kind, each library in its own process, and the Markdown tables it prints."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the benchmark's other library (its workers load it)
pytest.importorskip("onnxruntime")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
CASES = {
    "conv fwd+bwd N64 C8 13x13 K16 3x3": "conv",
    "training step, seed network, N=1": "step",
    "inference (eval), --arch cnn, N=1 1x8x8": "inference",
    "inference (eval), --arch resnet, N=1 1x28x28": "inference",
}


def table(out, first_header):
    """The rows of the Markdown table whose first column header is first_header, as lists of
    cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def markdown():
    command = [sys.executable, str(BENCH), "--rounds", "1", "--reps", "1", "--min-time", "0.001"]
    command += ["--threads", "2", "--markdown", "--step-binary", "none"]
    for case in [*CASES, "tiny"]:
        command += ["--only", case]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


TIME = r"[0-9.]+ (us|ms)"


def test_caption_names_the_machine_and_the_ceilings(markdown):
    caption = next(line for line in markdown.splitlines() if "logical cores" in line)
    assert "2 threads on" in caption
    assert re.search(r"fp32 FMA peak [0-9]+ GFLOP/s per core, [0-9]+ GFLOP/s on 2 threads", caption)
    assert re.search(r"sgemm \(.*2048x2048, 2 threads\) [0-9]+ GFLOP/s", caption)
    assert re.search(r"Load average [0-9.]+ before the run, [0-9.]+ after", caption)


def test_main_table_has_the_rates_against_both_ceilings(markdown):
    rows = {row[0]: row for row in table(markdown, "case")}
    names = [name for name, kind in CASES.items() if kind != "inference"]
    assert sorted(rows) == sorted(names)
    conv = rows["conv fwd+bwd N64 C8 13x13 K16 3x3"]
    assert re.fullmatch(TIME, conv[1]) and conv[2].endswith("GFLOP/s")
    assert re.fullmatch(r"[0-9]+%", conv[3]) and re.fullmatch(r"[0-9]+%", conv[4])
    assert re.fullmatch(r"[0-9.]+x", conv[6])


def test_convolutions_forward_and_backward_apart(markdown):
    (row,) = table(markdown, "convolution")
    assert row[0] == "conv N64 C8 13x13 K16 3x3"
    for first in (1, 6):  # forward, backward: time, % of both ceilings, PyTorch, speed-up
        assert re.fullmatch(TIME, row[first]) and re.fullmatch(TIME, row[first + 3])
        assert all(re.fullmatch(r"[0-9]+%", cell) for cell in row[first + 1 : first + 3])


def test_both_wait_policies_for_training_steps(markdown):
    (row,) = table(markdown, "training step")
    assert row[0] == "training step, seed network, N=1"
    assert all(re.fullmatch(TIME, cell) for cell in row[1:4])


def test_inference_against_pytorch_and_onnxruntime(markdown):
    rows = table(markdown, "inference")
    assert [row[0] for row in rows] == [n for n, kind in CASES.items() if kind == "inference"]
    for row in rows:
        assert all(re.fullmatch(TIME, cell) for cell in row[1:4])
        assert all(re.fullmatch(r"[0-9.]+x", cell) for cell in row[4:6])


def test_tiny_step_table(markdown):
    rows = dict(table(markdown, "tiny step: seed network, N=1, float32, 1 thread"))
    assert "Python model.train_step (one call)" in rows
    assert any(how.startswith("PyTorch") for how in rows)
