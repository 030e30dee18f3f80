"""Model files: model.save(path) / cnnbp.load(path), and what loading refuses."""

import io
import json
import zipfile

import numpy as np
import pytest

import cnnbp
from cnnbp import model_file, nn

F32, F64 = np.float32, np.float64


def every_layer_model(dtype):
    nn.manual_seed(5)
    return nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dtype=dtype),
                         nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Conv2d(3, 2, 1, bias=False,
                                                                      dtype=dtype),
                         nn.Flatten(), nn.Linear(2 * 3 * 3, 4, dtype=dtype), nn.Sigmoid())


def batch(dtype):
    return np.random.default_rng(1).standard_normal((2, 2, 8, 5)).astype(dtype)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_round_trip_gives_the_same_model(tmp_path, dtype):
    model = every_layer_model(dtype)
    x = batch(dtype)
    expected = model(x)
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = cnnbp.load(path)
    assert [type(a) for a in loaded] == [type(b) for b in model]
    assert [layer.config() for layer in loaded] == [layer.config() for layer in model]
    for (name, p), (name2, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert name == name2 and q.data.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(p.data, q.data)
    np.testing.assert_array_equal(loaded(x), expected)
    # NumPy reads the file with pickling off
    with np.load(path, allow_pickle=False) as contents:
        assert set(contents.files) == {"architecture"} | set(dict(model.named_parameters()))


def test_a_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    model = every_layer_model(F32)
    path = tmp_path / "model.npz"
    model.save(path)
    before = path.read_bytes()

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        every_layer_model(F32).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary left


def write_npz(path, arrays, compressed=False):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)


def saved_arrays(tmp_path):
    path = tmp_path / "good.npz"
    every_layer_model(F32).save(path)
    with np.load(path) as contents:
        return {k: contents[k] for k in contents.files}


def architecture_of(arrays):
    return json.loads(arrays["architecture"].tobytes())


def with_architecture(arrays, architecture):
    out = dict(arrays)
    out["architecture"] = np.frombuffer(json.dumps(architecture).encode(), dtype=np.uint8)
    return out


def damaged_files(tmp_path):
    good = saved_arrays(tmp_path)
    arch = architecture_of(good)
    cases = {}
    cases["object array (pickle)"] = (dict(good, **{"0.weight": np.array([{}], dtype=object)}),
                                      False, "unreadable array")
    cases["compressed"] = (good, True, "uncompressed")
    missing = dict(good)
    del missing["5.weight"]
    cases["missing array"] = (missing, False, r"5\.weight: expected an array")
    cases["extra array"] = (dict(good, stowaway=np.zeros(3, F32)), False, "stowaway")
    cases["wrong shape"] = (dict(good, **{"5.bias": np.zeros(5, F32)}), False,
                            r"5\.bias: expected shape \(4,\)")
    cases["wrong dtype"] = (dict(good, **{"5.bias": np.zeros(4, F64)}), False,
                            r"5\.bias: expected dtype float32")
    cases["no architecture"] = ({k: v for k, v in good.items() if k != "architecture"}, False,
                                "expected an array 'architecture'")
    bad_json = dict(good, architecture=np.frombuffer(b"{not json", dtype=np.uint8))
    cases["bad JSON"] = (bad_json, False, "expected valid JSON")
    unknown = json.loads(json.dumps(arch))
    unknown["layers"][1]["type"] = "os.system"
    cases["unknown layer"] = (with_architecture(good, unknown), False, "known layer type")
    version = dict(arch, version=99)
    cases["future version"] = (with_architecture(good, version), False, "expected version 1")
    huge = json.loads(json.dumps(arch))
    huge["layers"][5]["in_features"] = 10**12
    cases["huge sizes"] = (with_architecture(good, huge), False, "fit in the file")
    return cases


@pytest.mark.parametrize("case", ["object array (pickle)", "compressed", "missing array",
                                  "extra array", "wrong shape", "wrong dtype", "no architecture",
                                  "bad JSON", "unknown layer", "future version", "huge sizes"])
def test_damaged_or_hostile_files_are_refused(tmp_path, case):
    arrays, compressed, message = damaged_files(tmp_path)[case]
    path = tmp_path / "bad.npz"
    write_npz(path, arrays, compressed)
    with pytest.raises(ValueError, match=r"\[load\] .*" + message):
        cnnbp.load(path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    good = tmp_path / "good.npz"
    every_layer_model(F32).save(good)
    data = good.read_bytes()
    for name, content in [("truncated", data[: len(data) // 2]), ("text", b"hello" * 20),
                          ("empty", b"")]:
        path = tmp_path / f"{name}.npz"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"\[load\] file"):
            cnnbp.load(path)
    with pytest.raises(ValueError, match=r"\[load\] file"):
        cnnbp.load(tmp_path / "does_not_exist.npz")


def test_the_walkthrough_network_saves_and_loads(tmp_path):
    from cnnbp import walkthrough

    model = walkthrough.build_network()
    path = tmp_path / "seed.npz"
    model.save(path)
    loaded = cnnbp.load(path)
    x = np.random.default_rng(2).standard_normal((3, 1, 6, 6))
    np.testing.assert_array_equal(loaded(x), model(x))
    assert sum(p.data.size for p in loaded.parameters()) == 15


def test_train_step_is_the_four_calls(tmp_path):
    from cnnbp import optim

    x = batch(F64)
    y = np.array([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=F64)
    a, b = every_layer_model(F64), every_layer_model(F64)
    loss_a, loss_b = nn.BCELoss(), nn.BCELoss()
    opt_a = optim.SGD(a.parameters(), lr=0.3, momentum=0.9)
    opt_b = optim.SGD(b.parameters(), lr=0.3, momentum=0.9)
    for _ in range(3):
        got = a.train_step(x, y, loss_a, opt_a)
        b.zero_grad()
        want = loss_b(b(x), y)
        b.backward(loss_b.backward())
        opt_b.step()
        assert got == want
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data)
