"""Tests for util/safe_pickle.py: malicious pickles never run, chumpy and Python 2 files load as arrays."""
from __future__ import annotations

import builtins
import os
import pickle
import pickletools
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tests.data.sources.model_files import Ch, Python2Pickler, Select, install_fake_chumpy
from util.safe_pickle import load_model_file


class Payload:
    """Unpickles as call(*args): what a crafted model file would do."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def malicious_payloads(marker: Path) -> dict[str, Payload]:
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.eval": Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
    }


def write(path: Path, obj, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "builtins.exec", "subprocess.call"])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, protocol):
    marker = tmp_path / "marker"
    model = {"v_template": np.zeros((3, 3)), "shapedirs": malicious_payloads(marker)[payload]}
    path = write(tmp_path / "evil.pkl", model, protocol)
    with pytest.raises(ValueError, match=r"asks to load .*; only NumPy/SciPy arrays are allowed") as error:
        load_model_file(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_the_malicious_pickle_does_run_code_under_plain_pickle(tmp_path):
    # The refusal above is meaningful only if the same bytes are harmful to an ordinary load.
    marker = tmp_path / "marker"
    path = write(tmp_path / "evil.pkl", {"f": malicious_payloads(marker)["os.system"]})
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_chumpy_objects_become_arrays(tmp_path, monkeypatch):
    install_fake_chumpy(monkeypatch)
    rng = np.random.default_rng(0)
    shapedirs, flat = rng.normal(size=(4, 3, 2)), rng.normal(size=12)
    indices = rng.permutation(12)[:6]
    model = {"shapedirs": Ch(shapedirs), "v_template": Select(Ch(flat), indices, (2, 3)), "f": np.arange(3)}
    path = write(tmp_path / "chumpy.pkl", model)
    assert b"chumpy.ch" in path.read_bytes() and b"chumpy.reordering" in path.read_bytes()
    loaded = load_model_file(path)
    assert isinstance(loaded["shapedirs"], np.ndarray) and isinstance(loaded["v_template"], np.ndarray)
    np.testing.assert_array_equal(loaded["shapedirs"], shapedirs)
    np.testing.assert_array_equal(loaded["v_template"], flat[indices].reshape(2, 3))


def test_python2_file_with_latin1_strings_loads(tmp_path):
    rng = np.random.default_rng(1)
    model = {"weights": rng.random((20, 4)), "kintree_table": np.arange(8, dtype=np.uint32).reshape(2, 4),
             "shapedirs": Ch(rng.normal(size=(5, 3, 2))), "bs_style": "lbs", "scale": np.float64(0.5)}
    path = tmp_path / "py2.pkl"
    with open(path, "wb") as handle:
        Python2Pickler(handle, protocol=2).dump(model)
    data = path.read_bytes()
    opcodes = {op.name for op, _, _ in pickletools.genops(data)}
    # It is a Python 2 byte stream: str as BINSTRING, Python 2 and NumPy 1 module names, no unicode.
    assert "SHORT_BINSTRING" in opcodes and "BINSTRING" in opcodes and not opcodes & {"BINUNICODE", "SHORT_BINUNICODE"}
    assert b"numpy.core.multiarray" in data and b"__builtin__" in data
    loaded = load_model_file(path)
    np.testing.assert_array_equal(loaded["weights"], model["weights"])
    np.testing.assert_array_equal(loaded["kintree_table"], model["kintree_table"])
    assert loaded["kintree_table"].dtype == np.uint32
    np.testing.assert_array_equal(loaded["shapedirs"], model["shapedirs"].x)
    assert loaded["bs_style"] == "lbs" and loaded["scale"] == 0.5


@pytest.mark.parametrize("python2", [False, True])
@pytest.mark.parametrize("kind", ["csc", "csr"])
def test_sparse_regressor_loads(tmp_path, python2, kind):
    dense = np.random.default_rng(2).random((24, 50)) * (np.random.default_rng(3).random((24, 50)) < 0.1)
    matrix = sp.csc_matrix(dense) if kind == "csc" else sp.csr_matrix(dense)
    path = tmp_path / "sparse.pkl"
    with open(path, "wb") as handle:
        (Python2Pickler(handle, protocol=2) if python2 else pickle.Pickler(handle, protocol=2)).dump(
            {"J_regressor": matrix})
    loaded = load_model_file(path)["J_regressor"]
    assert sp.issparse(loaded) and loaded.format == kind
    np.testing.assert_array_equal(loaded.toarray(), dense)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_protocol_of_an_array_dict_loads(tmp_path, protocol):
    rng = np.random.default_rng(4)
    model = {"v_template": rng.normal(size=(6, 3)).astype(np.float32), "f": np.arange(6, dtype=np.uint32),
             "J_regressor": sp.csc_matrix(rng.random((2, 6))), "joints": {3, 4}, "scale": np.float64(2.0)}
    loaded = load_model_file(write(tmp_path / "model.pkl", model, protocol))
    np.testing.assert_array_equal(loaded["v_template"], model["v_template"])
    assert loaded["v_template"].dtype == np.float32 and loaded["f"].dtype == np.uint32
    np.testing.assert_array_equal(loaded["J_regressor"].toarray(), model["J_regressor"].toarray())
    assert loaded["joints"] == {3, 4} and loaded["scale"] == 2.0


def test_unknown_chumpy_operation_is_refused(tmp_path, monkeypatch):
    install_fake_chumpy(monkeypatch)

    class Add(Ch):
        pass

    Add.__module__, Add.__qualname__ = "chumpy.ch_ops", "add"
    path = tmp_path / "op.pkl"
    with open(path, "wb") as handle:
        Python2Pickler(handle, protocol=2).dump({"shapedirs": Add(np.zeros(3))})
    with pytest.raises(ValueError, match=r"entry 'shapedirs' is a chumpy\.ch_ops\.add object; only .* can be read"):
        load_model_file(path)


def test_missing_damaged_and_non_dict_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_file(tmp_path / "absent.pkl")
    whole = pickle.dumps({"v_template": np.zeros((4, 3))}, protocol=2)
    (tmp_path / "cut.pkl").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="could not be read as a pickle"):
        load_model_file(tmp_path / "cut.pkl")
    with pytest.raises(ValueError, match="holds a list; a dict of arrays was expected"):
        load_model_file(write(tmp_path / "list.pkl", [np.zeros(3)]))
