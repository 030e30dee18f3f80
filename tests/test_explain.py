"""cnnbp.explain and `cnnbp explain`: the page's numbers are the trace's, every rule holds for
a correct model and a broken gradient is reported, and a real browser draws the page
without a JavaScript error."""

import json
import os
import re
import shutil
import subprocess
import sys

import cnnbp
import numpy as np
import pytest
from cnnbp import explainer as E
from cnnbp import nn, walkthrough
from cnnbp.train import build_model, build_resnet


def page_data(path):
    text = open(path, encoding="utf-8").read()
    match = re.search(r'<script type="application/json" id="cnnbp-data">(.*?)</script>', text, re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))


def nested(dtype=np.float32):
    """Every container and most layer types: Residual with and without a shortcut, Concat,
    BatchNorm2d, the activations, both average pools, Dropout and Identity."""
    nn.manual_seed(3)
    d = dict(dtype=dtype)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, **d),
        nn.BatchNorm2d(4, **d),
        nn.LeakyReLU(0.1),
        nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding="same", **d), nn.Tanh())),
        nn.Residual(
            nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, **d), nn.GELU()),
            nn.Conv2d(4, 6, 1, stride=2, bias=False, **d),
        ),
        nn.Concat(nn.SiLU(), nn.AvgPool2d(3, stride=1, padding=1), nn.Identity()),
        nn.MaxPool2d(2),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(18, 5, **d),
        nn.Softmax(dim=1),
        nn.Linear(5, 3, **d),
        nn.LogSoftmax(dim=1),
    )


def small_cnn(dtype=np.float32):
    nn.manual_seed(1)
    return build_model((1, 8, 8), 10, dtype=dtype, channels=(4, 6))


def image(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


CASES = {
    "cnn float32": lambda: (small_cnn(), image((1, 8, 8)), 3, nn.CrossEntropyLoss()),
    "cnn float64": lambda: (
        small_cnn(np.float64),
        image((1, 1, 8, 8), np.float64),
        7,
        nn.CrossEntropyLoss(),
    ),
    "nested float32 (NLLLoss)": lambda: (nested(), image((2, 8, 8)), 2, nn.NLLLoss()),
    "nested float64 (NLLLoss)": lambda: (
        nested(np.float64),
        image((2, 8, 8), np.float64),
        1,
        nn.NLLLoss(),
    ),
    "binary (BCEWithLogitsLoss)": lambda: (
        build_model((1, 8, 8), 1, channels=(4, 6)),
        image((1, 8, 8)),
        1.0,
        nn.BCEWithLogitsLoss(),
    ),
    "walkthrough (Sigmoid + BCELoss)": lambda: walkthrough.setup(0, 1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_every_rule_is_checked_and_holds_for_a_correct_model(case):
    model, x, y, loss_fn = CASES[case]()
    report = cnnbp.explain(model, x, y, loss_fn)
    assert report.rules and all(r.checked for r in report.rules), [
        r for r in report.rules if not r.checked
    ]
    assert report.passed, [r for r in report.rules if not r.holds]
    paths = {r.path for r in report.rules}
    assert paths == {path for path, _ in model.named_modules()} | {"loss"}
    # the pass ran in eval mode, and the modes are back as they were
    assert model.training and all(m.training for _, m in model.named_modules())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_page_embeds_every_module_and_exactly_the_trace_numbers(tmp_path, dtype):
    model, x, y, loss_fn = nested(dtype), image((1, 2, 8, 8), dtype), 2, nn.NLLLoss()
    report = cnnbp.explain(model, x, y, loss_fn, class_names=["a", "b", "c"])
    path = tmp_path / "page.html"
    report.to_html(path)
    data = page_data(path)
    tensors = data["tensors"]
    model.eval()  # the same pass, to compare with the page
    model.zero_grad()
    loss = loss_fn(model(x), np.array([y]))
    model.backward(loss_fn.backward())
    trace = model.trace()
    assert [layer["path"] for layer in data["layers"]] == [p for p, _ in trace]
    for layer, (p, t) in zip(data["layers"], trace):
        for name in ("input", "output", "grad_output", "grad_input"):
            got = E.decode(tensors[layer[name]])
            assert got.dtype == t[name].dtype and np.array_equal(got, t[name]), (p, name)
        for param in layer["parameters"]:
            value, grad = t[param["name"]], t[param["name"] + ".grad"]
            assert np.array_equal(E.decode(tensors[param["value"]]), value)
            assert np.array_equal(E.decode(tensors[param["grad"]]), grad)
            assert param["grad_norm"] == pytest.approx(np.linalg.norm(grad.astype(np.float64)))
            assert sum(param["hist"]["counts"]) == value.size
        assert all(rule["holds"] for rule in layer["rules"])
        if "indices" in t:
            assert np.array_equal(E.decode(tensors[layer["extras"]["indices"]]), t["indices"])
    assert data["loss"] == pytest.approx(loss)
    assert data["classes"] == ["a", "b", "c"]
    assert data["probabilities"] == pytest.approx(np.exp(model.output[0]).tolist())
    assert np.array_equal(
        E.decode(tensors[data["saliency"]]), np.abs(trace[0][1]["grad_input"]).max(axis=1)
    )
    assert data["summary"] == {
        "checked": len(report.rules),
        "holding": len(report.rules),
        "stated": 0,
    }


def test_a_broken_gradient_is_reported_as_not_holding():
    model, x, y, loss_fn = small_cnn(), image((1, 8, 8)), 3, nn.CrossEntropyLoss()
    model.eval()
    model(x[None])
    loss_fn(model.output, np.array([y]))
    model.backward(loss_fn.backward())
    trace = E._trace(model)
    broken = {"1": "grad_input", "0": "weight.grad", "7": "bias.grad"}  # ReLU, conv, linear
    for path, _, _, t in trace:
        if path in broken:
            t[broken[path]] = t[broken[path]].copy()
            t[broken[path]].flat[0] += 0.5
    report = E.build_report(trace, loss_fn.trace(), "CrossEntropyLoss")
    failing = {(r.path, r.statement.split(" ")[0]) for r in report.rules if not r.holds}
    assert failing == {("1", "dL/dZ"), ("0", "dL/dW"), ("7", "dL/dB")}
    assert not report.passed
    bad = [r for r in report.rules if not r.holds]
    assert all(r.deviation == pytest.approx(0.5, rel=1e-5) for r in bad)
    assert report.data["summary"]["holding"] == len(report.rules) - 3


def test_explain_refuses_a_batch():
    with pytest.raises(ValueError, match=r"\[explain\] x: expected one input"):
        cnnbp.explain(small_cnn(), image((2, 1, 8, 8)), 3, nn.CrossEntropyLoss())


def test_the_resnet_page_on_mnist_sized_images_stays_small(tmp_path):
    nn.manual_seed(0)
    report = cnnbp.explain(
        build_resnet((1, 28, 28), 10), image((1, 28, 28)), 4, nn.CrossEntropyLoss()
    )
    report.to_html(tmp_path / "resnet.html")
    assert report.passed
    assert os.path.getsize(tmp_path / "resnet.html") < 5e6


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "cnnbp", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


@pytest.fixture(scope="module")
def digits_page(tmp_path_factory):
    """A model of `cnnbp train`'s shape, saved, and `cnnbp explain`'s page of it."""
    folder = tmp_path_factory.mktemp("explain")
    nn.manual_seed(0)
    build_model((1, 8, 8), 10).save(folder / "model.npz")
    result = run_cli("explain", folder / "model.npz", "--index", 4, "--html", folder / "page.html")
    return folder, result


def test_the_command_writes_the_page_of_a_test_image(digits_page):
    folder, result = digits_page
    assert result.returncode == 0, result.stderr
    assert re.match(r"wrote .*page.html: test image 4 of 359 images, label \d", result.stdout)
    assert "15 of 15 checked rules hold" in result.stdout
    data = page_data(folder / "page.html")
    assert "test image 4" in data["title"] and data["classes"] == [str(i) for i in range(10)]
    x_test = cnnbp.train.load_dataset(need_train=False).x_test
    assert np.array_equal(E.decode(data["tensors"][data["input"]])[0], x_test[4])
    bad = run_cli("explain", folder / "model.npz", "--index", 359, "--html", folder / "x.html")
    assert bad.returncode == 2
    assert "cnnbp explain: [explain] index: expected an index in [0, 359), got 359" in bad.stderr


def test_the_walkthrough_page_shows_every_number_of_its_first_step(tmp_path):
    path = tmp_path / "walk.html"
    assert walkthrough.main(seed=2, html=path) == 0
    data = page_data(path)
    result = walkthrough.run(seed=2)
    assert data["numbers"] is True
    layers = {layer["path"]: layer for layer in data["layers"]}
    conv = {p["name"]: p for p in layers["0"]["parameters"]}
    assert np.array_equal(E.decode(data["tensors"][conv["weight"]["grad"]]), result["dL/dW1"])
    assert np.array_equal(E.decode(data["tensors"][layers["1"]["grad_input"]]), result["dL/dZ1"])
    assert np.array_equal(E.decode(data["tensors"][data["grad_input"]]), result["dL/dX"])
    assert data["loss"] == result["L"]


# ---- a real browser -----------------------------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser():
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip(f"no headless browser found (looked for {', '.join(BROWSERS)})")
    return found


def headless(url, *options):
    command = [browser(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars"]
    command += ["--virtual-time-budget=5000", *options, url]
    # the browser runs without a sanitizer runtime that a test run may preload for Python
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def test_chromium_draws_the_page_without_javascript_errors(digits_page, tmp_path):
    folder, _ = digits_page
    url = (folder / "page.html").resolve().as_uri()
    dom = headless(url + "#selftest", "--dump-dom").stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-rendered="ok"' in body, dom[-2000:]
    assert re.search(r'<pre id="cnnbp-errors"[^>]*></pre>', dom), dom
    # hovering the first channel showed a value, clicking it enlarged it
    assert re.search(r'data-selftest="tip=input X \[0, 0\] = -?[\d.e-]+; zoom=flex"', body), body
    shot = tmp_path / "page.png"
    headless(url, f"--screenshot={shot}", "--window-size=1200,900")
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1200)
    assert pixels[..., :3].std() > 0.05  # not blank: the maps are drawn


def test_the_browser_check_sees_a_javascript_error(digits_page, tmp_path):
    folder, _ = digits_page
    page = (folder / "page.html").read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("var D = JSON.parse(", "var D = JSON.parze("), encoding="utf-8")
    dom = headless(broken.resolve().as_uri(), "--dump-dom").stdout
    assert 'data-rendered="ok"' not in dom
    assert re.search(r'<pre id="cnnbp-errors"[^>]*>[^<]*JSON.parze', dom), dom[-2000:]
