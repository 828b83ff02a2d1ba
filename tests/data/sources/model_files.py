"""Tiny SMPL- and SMAL-format model files for tests, pickled the way the authors' files are.

The published files are Python 2 pickles (protocol 2) of a dict holding NumPy arrays, a SciPy CSC
J_regressor, a few strings and chumpy objects. `Python2Pickler` writes the byte stream a Python 2
pickler writes for such a dict: every str and bytes object as a Python 2 `str` (BINSTRING), and module
names as Python 2, NumPy 1 and SciPy < 1.8 spelled them (__builtin__, numpy.core.multiarray,
scipy.sparse.csc). `Ch` and `Select` pickle like chumpy's classes of those names (NEWOBJ of
chumpy.ch.Ch / chumpy.reordering.Select, then the instance __dict__ as state; chumpy/ch.py
`Ch.__getstate__`), without chumpy being installed.
"""
from __future__ import annotations

import pickle
import struct
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import scipy.sparse as sp

from data.sources.smpl import SMAL_PARENTS, SMPL_PARENTS


class Ch:
    """Pickles like chumpy.ch.Ch holding the array x."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.asarray(x, dtype=np.float64)
        # The bookkeeping entries chumpy keeps in __dict__ next to the value.
        self._dirty_vars = set()
        self._itr = None
        self._depends_on_deps = {}
        self._make_dense = False
        self._make_sparse = False


class Select:
    """Pickles like chumpy.reordering.Select: a.ravel()[idxs] reshaped to preferred_shape."""

    def __init__(self, a: Ch, idxs: np.ndarray, preferred_shape: tuple[int, ...]) -> None:
        self.a = a
        self.idxs = np.asarray(idxs, dtype=np.int64)
        self.preferred_shape = preferred_shape
        self._dirty_vars = {"a"}
        self._itr = None
        self._depends_on_deps = {}
        self._make_dense = False
        self._make_sparse = False


Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
Select.__module__, Select.__qualname__ = "chumpy.reordering", "Select"


def install_fake_chumpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `chumpy.ch.Ch` and `chumpy.reordering.Select` importable, so the standard pickler can write them."""
    package = types.ModuleType("chumpy")
    ch_module = types.ModuleType("chumpy.ch")
    reordering = types.ModuleType("chumpy.reordering")
    ch_module.Ch = Ch
    reordering.Select = Select
    monkeypatch.setitem(sys.modules, "chumpy", package)
    monkeypatch.setitem(sys.modules, "chumpy.ch", ch_module)
    monkeypatch.setitem(sys.modules, "chumpy.reordering", reordering)


# Module names as a Python 2 era file spells them.
PY2_MODULE_NAMES = {
    "builtins": "__builtin__",
    "copyreg": "copy_reg",
    "numpy._core.multiarray": "numpy.core.multiarray",
    "scipy.sparse._csc": "scipy.sparse.csc",
    "scipy.sparse._csr": "scipy.sparse.csr",
}


class Python2Pickler(pickle._Pickler):
    """A protocol-2 pickler that writes str/bytes and global names the way Python 2 did."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_python2_str
    dispatch[bytes] = save_python2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = PY2_MODULE_NAMES.get(obj.__module__, obj.__module__)
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode("ascii"))
        self.memoize(obj)


def tiny_model(parents: Sequence[int], num_vertices: int, num_betas: int, seed: int = 0) -> dict[str, Any]:
    """A random but well-formed SMPL-format model: vertices clustered around joints, weights favouring the nearest.

    Args:
        parents: the kinematic tree (parents[0] == -1).
        num_vertices: V.
        num_betas: S, the number of shape directions.
        seed: for the random arrays.
    Returns:
        dict with v_template, shapedirs, posedirs, J_regressor (CSC), weights, kintree_table (uint32,
        root parent 4294967295 as in SMPL files), f, J, bs_style and bs_type.
    """
    rng = np.random.default_rng(seed)
    num_joints = len(parents)
    joints = np.cumsum(rng.normal(scale=0.2, size=(num_joints, 3)), axis=0)
    owner = np.arange(num_vertices) % num_joints
    template = joints[owner] + rng.normal(scale=0.05, size=(num_vertices, 3))
    regressor = np.zeros((num_joints, num_vertices))
    regressor[owner, np.arange(num_vertices)] = 1.0
    regressor /= regressor.sum(axis=1, keepdims=True)
    weights = rng.random((num_vertices, num_joints)) ** 8
    weights[np.arange(num_vertices), owner] += 1.0
    weights /= weights.sum(axis=1, keepdims=True)
    first = rng.permutation(num_vertices)
    faces = np.stack([first, np.roll(first, 1), np.roll(first, 2)], axis=1).astype(np.uint32)
    kintree = np.stack([np.asarray(parents, dtype=np.int64) % 2**32, np.arange(num_joints)]).astype(np.uint32)
    return {
        "v_template": template,
        "shapedirs": rng.normal(scale=0.02, size=(num_vertices, 3, num_betas)),
        "posedirs": rng.normal(scale=0.01, size=(num_vertices, 3, 9 * (num_joints - 1))),
        "J_regressor": sp.csc_matrix(regressor),
        "weights": weights,
        "kintree_table": kintree,
        "f": faces,
        "J": regressor @ template,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def tiny_smpl_model(num_vertices: int = 50, num_betas: int = 10, seed: int = 0) -> dict[str, Any]:
    """`tiny_model` on SMPL's 24-joint tree."""
    return tiny_model(SMPL_PARENTS, num_vertices, num_betas, seed)


def tiny_smal_model(num_vertices: int = 70, num_betas: int = 41, seed: int = 0) -> dict[str, Any]:
    """`tiny_model` on SMAL's 33-joint tree."""
    return tiny_model(SMAL_PARENTS, num_vertices, num_betas, seed)


def as_chumpy(model: dict[str, Any]) -> dict[str, Any]:
    """The model with shapedirs as a chumpy Ch and v_template as a Select of a Ch, as in the authors' files."""
    chumpy_model = dict(model)
    template = model["v_template"]
    chumpy_model["shapedirs"] = Ch(model["shapedirs"])
    chumpy_model["v_template"] = Select(Ch(template.ravel()), np.arange(template.size), template.shape)
    return chumpy_model


def write_model_file(path: Path, model: dict[str, Any], python2: bool = False) -> Path:
    """Pickle a model dict with protocol 2, by Python 3's pickler or as Python 2 would have."""
    with open(path, "wb") as handle:
        if python2:
            Python2Pickler(handle, protocol=2).dump(model)
        else:
            pickle.dump(model, handle, protocol=2)
    return path
