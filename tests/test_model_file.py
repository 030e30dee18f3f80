"""Model files: model.save(path) / cnnbp.load(path), and what loading refuses."""

import io
import json
import os
import stat
import subprocess
import sys
import zipfile

import cnnbp
import numpy as np
import pytest
from cnnbp import nn, optim
from conftest import file_model_stem

F32, F64 = np.float32, np.float64


def every_layer_model(dtype):
    nn.manual_seed(5)
    return nn.Sequential(
        *file_model_stem(dtype),
        nn.Conv2d(3, 2, 1, bias=False, dtype=dtype),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 4, dtype=dtype),
        nn.Sigmoid(),
    )


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


_FAILED_SAVE = """
import resource, signal, sys
import numpy as np
from cnnbp import nn
path = sys.argv[1]
# a file-size limit below the new model's size: the write fails as on a full disk
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    nn.Sequential(nn.Linear(64, 64)).save(path)
except OSError as error:
    print("OSError", error)
"""


def test_a_failed_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "model.npz"
    every_layer_model(F32).save(path)
    before = path.read_bytes()
    assert len(before) < 4096
    run = subprocess.run(
        [sys.executable, "-c", _FAILED_SAVE, str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("OSError [save] path: cannot write"), run.stdout
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
    cases["object array (pickle)"] = (
        dict(good, **{"0.weight": np.array([{}], dtype=object)}),
        False,
        "expected a numeric array, got dtype object",
    )
    cases["compressed"] = (good, True, "uncompressed")
    missing = dict(good)
    del missing["5.weight"]
    cases["missing array"] = (missing, False, r"5\.weight: expected an array")
    cases["extra array"] = (dict(good, stowaway=np.zeros(3, F32)), False, "stowaway")
    cases["wrong shape"] = (
        dict(good, **{"5.bias": np.zeros(5, F32)}),
        False,
        r"5\.bias: expected shape \(4,\)",
    )
    cases["wrong dtype"] = (
        dict(good, **{"5.bias": np.zeros(4, F64)}),
        False,
        r"5\.bias: expected dtype float32",
    )
    cases["no architecture"] = (
        {k: v for k, v in good.items() if k != "architecture"},
        False,
        "expected an array 'architecture'",
    )
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


@pytest.mark.parametrize(
    "case",
    [
        "object array (pickle)",
        "compressed",
        "missing array",
        "extra array",
        "wrong shape",
        "wrong dtype",
        "no architecture",
        "bad JSON",
        "unknown layer",
        "future version",
        "huge sizes",
    ],
)
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
    for name, content in [
        ("truncated", data[: len(data) // 2]),
        ("text", b"hello" * 20),
        ("empty", b""),
    ]:
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


# ---------------------------------------------------------------------------------------
# files are data: pickles, lying headers and hostile JSON are refused before allocating
# ---------------------------------------------------------------------------------------


class _CreatesAFile:
    """Unpickling this creates the file at `path`: the proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def zip_of(path, entries):
    """A stored (uncompressed) zip of name -> bytes, as np.savez writes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def npy_bytes(array=None, header=None, data=b""):
    """A .npy entry: an array's, or a hand-written header dict followed by `data`."""
    buffer = io.BytesIO()
    if array is not None:
        np.save(buffer, array, allow_pickle=True)
    else:
        np.lib.format.write_array_header_1_0(buffer, header)
        buffer.write(data)
    return buffer.getvalue()


def good_entries(tmp_path):
    path = tmp_path / "good.npz"
    every_layer_model(F32).save(path)
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def refuses(path, message):
    with pytest.raises(ValueError, match=r"^\[load\] .*" + message):
        cnnbp.load(path)


def test_pickles_are_never_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "unpickled"
    evil = np.array([_CreatesAFile(marker)], dtype=object)
    entries = good_entries(tmp_path)
    # an object array in place of a weight, an extra one, a pickle entry, a pickle file
    refuses(
        zip_of(tmp_path / "a.npz", dict(entries, **{"0.weight.npy": npy_bytes(evil)})),
        "expected a numeric array, got dtype object",
    )
    refuses(
        zip_of(tmp_path / "b.npz", dict(entries, **{"extra.npy": npy_bytes(evil)})),
        "expected a numeric array, got dtype object",
    )
    refuses(
        zip_of(tmp_path / "c.npz", dict(entries, **{"evil.pkl": pickle.dumps(evil)})),
        "expected only .npy entries",
    )
    raw = tmp_path / "d.npz"
    raw.write_bytes(pickle.dumps({"architecture": evil}))
    refuses(raw, "file: expected a .npz model file")
    # and the saved weights of np.savez(allow_pickle=True) are refused the same way
    path = tmp_path / "e.npz"
    np.savez(path, **dict(np.load(tmp_path / "good.npz")), stowaway=evil)
    refuses(path, "expected a numeric array, got dtype object")
    assert not marker.exists()
    pickle.loads(pickle.dumps(_CreatesAFile(marker)))  # the payload does work when unpickled
    assert marker.exists()


def test_lying_npy_headers_are_refused_before_allocating(tmp_path):
    entries = good_entries(tmp_path)
    # 2^40 float64 (8 TiB) declared over 32 bytes of data: np.load would allocate it first
    huge = npy_bytes(
        header={"descr": "<f8", "fortran_order": False, "shape": (2**40,)}, data=bytes(32)
    )
    refuses(
        zip_of(tmp_path / "a.npz", dict(entries, **{"5.bias.npy": huge})),
        r"5\.bias\.npy: expected 8796093022208 bytes of data as its header declares",
    )
    # truncated: the header declares 4 floats, 2 are there
    short = npy_bytes(header={"descr": "<f4", "fortran_order": False, "shape": (4,)}, data=bytes(8))
    refuses(
        zip_of(tmp_path / "b.npz", dict(entries, **{"5.bias.npy": short})),
        "expected 16 bytes of data as its header declares",
    )
    # more data than declared
    long = npy_bytes(header={"descr": "<f4", "fortran_order": False, "shape": (4,)}, data=bytes(64))
    refuses(
        zip_of(tmp_path / "c.npz", dict(entries, **{"5.bias.npy": long})),
        "expected 16 bytes of data",
    )
    # negative and overflowing shapes, structured and void dtypes, a broken header
    for i, header in enumerate(
        [
            {"descr": "<f4", "fortran_order": False, "shape": (-4,)},
            {"descr": "<f4", "fortran_order": False, "shape": (2**62, 2**62)},
            {"descr": [("a", "<f4")], "fortran_order": False, "shape": (4,)},
            {"descr": "|V16", "fortran_order": False, "shape": (1,)},
            {"descr": "<c8", "fortran_order": False, "shape": (2,)},
        ]
    ):
        entry = npy_bytes(header=header, data=bytes(16))
        refuses(zip_of(tmp_path / f"d{i}.npz", dict(entries, **{"5.bias.npy": entry})), "")
    garbage = b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4    \n" + bytes(16)
    refuses(zip_of(tmp_path / "e.npz", dict(entries, **{"5.bias.npy": garbage})), "")
    refuses(zip_of(tmp_path / "f.npz", dict(entries, **{"5.bias.npy": b"not an npy file"})), "")


def test_zip_directories_declaring_huge_sizes_are_refused(tmp_path):
    # a zip bomb's trick: the directory declares far more than the file holds
    path = tmp_path / "bomb.npz"
    every_layer_model(F32).save(path)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")  # the first central-directory entry
    local = data.find(b"PK\x03\x04")
    for offset in (central + 20, central + 24, local + 18, local + 22):  # both sizes, both
        data[offset : offset + 4] = (2**31).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    refuses(
        path, r"expected an entry within the file's \d+ bytes, got a declared size of 2147483648"
    )


def test_compressed_entries_are_refused_whatever_they_expand_to(tmp_path):
    # a deflated entry could expand without bound: only stored entries are read
    entries = good_entries(tmp_path)
    path = tmp_path / "deflated.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
        archive.writestr("zeros.npy", npy_bytes(np.zeros(2**22, np.uint8)))  # 4 MiB of zeros
    refuses(path, "expected an uncompressed, unencrypted entry")


def hostile_architectures(arch):
    """(name, JSON text) of architectures that must be refused."""
    text = json.dumps(arch)
    conv = json.dumps(arch["layers"][0])

    def layer0(**changes):
        hostile = json.loads(text)
        hostile["layers"][0].update(changes)
        return json.dumps(hostile)

    cases = [
        ("deep list nesting", "[" * 100_000 + "]" * 100_000),
        ("deep object nesting", '{"a": ' * 100_000 + "1" + "}" * 100_000),
        (
            "deep nesting inside a layer",
            text.replace(conv, '{"x": ' * 50_000 + conv + "}" * 50_000),
        ),
        ("5000-digit integer", text.replace('"in_channels": 2', '"in_channels": 1' + "0" * 5000)),
        ("integer beyond int64", layer0(in_channels=2**64)),
        ("1e999", text.replace('"in_channels": 2', '"in_channels": 1e999')),
        ("NaN", text.replace('"in_channels": 2', '"in_channels": NaN')),
        ("float size", layer0(in_channels=2.0)),
        ("string size", layer0(in_channels="2")),
        ("bool size", layer0(in_channels=True)),
        ("null size", layer0(in_channels=None)),
        ("zero channels", layer0(in_channels=0)),
        ("negative padding", layer0(padding=[-1, 0])),
        ("zero stride", layer0(stride=[0, 1])),
        ("kernel of three", layer0(kernel_size=[3, 2, 1])),
        ("kernel as dict", layer0(kernel_size={"h": 3, "w": 2})),
        ("bias as string", layer0(bias="yes")),
        ("type as list", layer0(type=["Conv2d"])),
        ("version true", json.dumps(dict(arch, version=True))),
        ("version string", json.dumps(dict(arch, version="1"))),
        ("dtype object", json.dumps(dict(arch, dtype="object"))),
        ("dtype as list", json.dumps(dict(arch, dtype=["float32"]))),
        ("layers as dict", json.dumps(dict(arch, layers={"0": arch["layers"][0]}))),
        ("layer as list", json.dumps(dict(arch, layers=[["Conv2d"]] + arch["layers"][1:]))),
        ("top level list", json.dumps([arch])),
        ("top level string", json.dumps(text)),
        ("not UTF-8", None),
        ("empty", ""),
        (
            "pool padding over half",
            json.dumps(
                dict(
                    arch,
                    layers=arch["layers"][:2]
                    + [dict(arch["layers"][2], padding=[2, 0])]
                    + arch["layers"][3:],
                )
            ),
        ),
    ]
    return cases


def test_hostile_architecture_json_is_refused(tmp_path):
    good = saved_arrays(tmp_path)
    arch = architecture_of(good)
    assert arch["layers"][0]["in_channels"] == 2 and arch["layers"][2]["type"] == "MaxPool2d"
    for name, text in hostile_architectures(arch):
        raw = b"\xff\xfe{}" if text is None else text.encode()
        arrays = dict(good, architecture=np.frombuffer(raw, dtype=np.uint8))
        path = tmp_path / "hostile.npz"
        write_npz(path, arrays)
        with pytest.raises(ValueError, match=r"^\[load\] ") as info:
            cnnbp.load(path)
        assert "architecture" in str(info.value), (name, str(info.value))


# ---- optimizer state beside the model ------------------------------------------------------


def _resume_case(kind, dtype):
    cnnbp.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, dtype=dtype), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3, dtype=dtype)
    )
    settings = {
        "SGD": dict(lr=0.1, momentum=0.9, nesterov=True),
        "Adam": dict(lr=0.01),
        "AdamW": dict(lr=0.01, weight_decay=0.1),
    }[kind]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 1, 4, 4)).astype(dtype)
    y = np.array([0, 2, 1, 0])
    return model, getattr(optim, kind)(model.parameters(), **settings), x, y


@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_training_resumes_from_a_saved_optimizer_exactly(tmp_path, kind, dtype):
    model, opt, x, y = _resume_case(kind, dtype)
    for _ in range(3):
        model.train_step(x, y, nn.CrossEntropyLoss(), opt)
    model.save(tmp_path / "m.npz", optimizer=opt)
    loaded, loaded_opt = cnnbp.load(tmp_path / "m.npz", optimizer=True)
    assert type(loaded_opt) is type(opt) and loaded_opt.lr == opt.lr
    assert [p for p in loaded_opt.params] == loaded.parameters()
    ours = [model.train_step(x, y, nn.CrossEntropyLoss(), opt) for _ in range(3)]
    theirs = [loaded.train_step(x, y, nn.CrossEntropyLoss(), loaded_opt) for _ in range(3)]
    assert ours == theirs
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    # the model alone loads as before; a file without an optimizer gives None
    assert isinstance(cnnbp.load(tmp_path / "m.npz"), nn.Sequential)
    model.save(tmp_path / "plain.npz")
    assert cnnbp.load(tmp_path / "plain.npz", optimizer=True)[1] is None


def test_optimizer_state_dict_round_trips_and_is_checked():
    model, opt, x, y = _resume_case("Adam", np.float64)
    state = opt.state_dict()
    assert state["state"] == [None] * 4  # no step yet
    model.train_step(x, y, nn.CrossEntropyLoss(), opt)
    state = opt.state_dict()
    assert state["type"] == "Adam" and state["state"][0]["step"] == 1
    assert state["state"][0]["exp_avg"].shape == model.parameters()[0].shape
    other = optim.Adam(model.parameters(), lr=0.5)
    other.load_state_dict(state)
    again = other.state_dict()
    assert again["lr"] == 0.01
    for a, b in zip(state["state"], again["state"]):
        assert a["step"] == b["step"]
        np.testing.assert_array_equal(a["exp_avg_sq"], b["exp_avg_sq"])
    with pytest.raises(
        ValueError,
        match=r"\[SGD.load_state_dict\] type: expected 'SGD', "
        r"got 'Adam'",
    ):
        optim.SGD(model.parameters(), lr=0.1).load_state_dict(state)
    bad = dict(state, state=[dict(state["state"][0], exp_avg=np.zeros(3))] + state["state"][1:])
    with pytest.raises(ValueError, match=r"\[Adam.load_state_dict\] exp_avg: expected shape"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"\[Adam.load_state_dict\] state: expected one entry"):
        other.load_state_dict(dict(state, state=state["state"][:2]))
    with pytest.raises(
        ValueError,
        match=r"\[save\] optimizer: expected an optimizer over "
        r"this model's parameters",
    ):
        model.save("never.npz", optimizer=optim.SGD(model.parameters()[:2], lr=0.1))


def test_hostile_optimizer_entries_are_refused(tmp_path):
    model, opt, x, y = _resume_case("SGD", np.float64)
    model.train_step(x, y, nn.CrossEntropyLoss(), opt)
    model.save(tmp_path / "m.npz", optimizer=opt)
    with np.load(tmp_path / "m.npz") as contents:
        arrays = {k: contents[k] for k in contents.files}
    settings = json.loads(arrays["optimizer"].tobytes())

    def variant(name, **changes):
        content = dict(arrays, **changes)
        np.savez(tmp_path / name, **content)
        return tmp_path / name

    cases = {
        "type.npz": variant(
            "type.npz",
            optimizer=np.frombuffer(json.dumps(dict(settings, type="LBFGS")).encode(), np.uint8),
        ),
        "lr.npz": variant(
            "lr.npz", optimizer=np.frombuffer(json.dumps(dict(settings, lr=-1)).encode(), np.uint8)
        ),
        "shape.npz": variant("shape.npz", **{"optimizer.0.momentum_buffer": np.zeros(5)}),
        "json.npz": variant("json.npz", optimizer=np.frombuffer(b"{not json", np.uint8)),
    }
    for path in cases.values():
        assert isinstance(cnnbp.load(path), nn.Sequential)  # the model alone still loads
        with pytest.raises(ValueError, match=r"^\[load\] optimizer"):
            cnnbp.load(path, optimizer=True)


# ---- files written by earlier versions -----------------------------------------------------

_DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize(
    "name", ["v1_seed_float64", "v1_every_layer_float32", "v1_every_layer_float32_cpp"]
)
def test_files_of_format_1_still_load_and_give_their_outputs(name):
    expected = np.load(os.path.join(_DATA, "v1_expected.npz"))
    model = cnnbp.load(os.path.join(_DATA, name + ".npz")).eval()
    np.testing.assert_array_equal(model(expected[name + ".input"]), expected[name + ".output"])


@pytest.mark.parametrize("name", ["v1_sgd_float64", "v1_adamw_float64"])
def test_optimizers_saved_by_format_1_resume_exactly(name):
    expected = np.load(os.path.join(_DATA, "v1_expected.npz"))
    model, opt = cnnbp.load(os.path.join(_DATA, name + ".npz"), optimizer=True)
    model.train_step(
        expected[name + ".input"], expected[name + ".target"], nn.CrossEntropyLoss(), opt
    )
    after = np.concatenate([p.data.ravel() for p in model.parameters()])
    np.testing.assert_array_equal(after, expected[name + ".after_step"])


def test_unknown_fields_in_a_layer_entry_are_refused(tmp_path):
    good = saved_arrays(tmp_path)
    arch = architecture_of(good)
    arch["layers"][0]["padding_mode"] = "zeros"
    write_npz(tmp_path / "extra.npz", with_architecture(good, arch))
    refuses(
        tmp_path / "extra.npz", 'layer 0: expected the fields of Conv2d, got also "padding_mode"'
    )


def test_the_same_seed_gives_the_same_weights():
    def weights():
        cnnbp.manual_seed(0)
        model = every_layer_model(F64)
        return [p.data.copy() for p in model.parameters()]

    first, second = weights(), weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_file_has_the_mode_a_plain_open_gives(tmp_path, umask, mode):
    """0666 less the umask, as any program's new file; a temporary left over by a failed
    save (here one of mode 0600) does not pass its mode on."""
    path = tmp_path / "m.npz"
    (tmp_path / "m.npz.tmp").write_bytes(b"left over")
    os.chmod(tmp_path / "m.npz.tmp", 0o600)
    model = nn.Sequential(nn.Linear(2, 1))
    previous = os.umask(umask)
    try:
        model.save(path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert not (tmp_path / "m.npz.tmp").exists()
    cnnbp.load(path)
