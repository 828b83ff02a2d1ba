"""A restricted unpickler for SMPL- and SMAL-style model files: arrays come out, code never runs.

The SMPL and SMAL authors distribute their models as Python 2 pickles of a dict of NumPy arrays, SciPy
sparse matrices and chumpy objects (chumpy.ch.Ch, chumpy.reordering.Select, ...). An ordinary
`pickle.load` of such a file imports and calls whatever the file names, so a crafted "model file" could
run any code. `RestrictedUnpickler.find_class` therefore answers only for the few callables that
rebuild arrays (NumPy's `_reconstruct`, `ndarray`, `dtype`, scalar and buffer helpers; SciPy's CSC/CSR
classes; sets and `copyreg._reconstructor`) and refuses every other name with a ValueError before
anything is called.

chumpy is not needed: every `chumpy.*` class is answered by a stand-in that only records the pickled
state. Ch keeps its value in that state under "x" (chumpy/ch.py: `Ch.__getstate__` pickles the instance
`__dict__`) and the reordering classes keep their operand under "a" (chumpy/reordering.py);
`load_model_file` evaluates Ch, Select, Reshape and transpose with NumPy and refuses any other chumpy
operation.

Python 2 `str` objects (array buffers, dict keys) are decoded as latin-1, which maps every byte to one
character; NumPy encodes such buffers back to the original bytes.
"""
from __future__ import annotations

import copyreg
import io
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """Stand-in for `_codecs.encode`, which Python 3 pickles of `bytes` at protocol < 3 call."""
    if encoding not in ("latin1", "latin-1"):
        raise ValueError(f"pickled bytes use encoding {encoding!r}; only latin1 is allowed")
    return text.encode("latin1")


# The array helpers are taken from what NumPy itself pickles, so both NumPy 1 (numpy.core) and
# NumPy 2 (numpy._core) spellings resolve to the installed functions without importing either module.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_SCALAR = np.float64(0.0).__reduce__()[0]
_FROMBUFFER = np.empty(1).__reduce_ex__(5)[0]

# Every global a model file may name: (module, name) as written in the pickle -> the object used.
# Python 2 files say __builtin__ and copy_reg; SciPy moved csc/csr into private modules in 1.8.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("scipy.sparse", "csc_matrix"): sp.csc_matrix,
    ("scipy.sparse", "csr_matrix"): sp.csr_matrix,
    ("scipy.sparse.csc", "csc_matrix"): sp.csc_matrix,
    ("scipy.sparse.csr", "csr_matrix"): sp.csr_matrix,
    ("scipy.sparse._csc", "csc_matrix"): sp.csc_matrix,
    ("scipy.sparse._csr", "csr_matrix"): sp.csr_matrix,
    ("scipy.sparse._csc", "csc_array"): sp.csc_array,
    ("scipy.sparse._csr", "csr_array"): sp.csr_array,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("__builtin__", "object"): object,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("copy_reg", "_reconstructor"): copyreg._reconstructor,
    ("_codecs", "encode"): _latin1_bytes,
}


class ForbiddenGlobalError(ValueError):
    """A pickle named a global outside ALLOWED_GLOBALS."""


class ChumpyStandIn:
    """A chumpy object as pickled: the chumpy class name and the state dict, nothing else.

    Subclasses are made per chumpy class by `RestrictedUnpickler`; `chumpy_class` holds "module.name".
    """

    chumpy_class = "chumpy.ch.Ch"
    state: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> "ChumpyStandIn":
        # NEWOBJ and REDUCE may pass chumpy's constructor arguments; they are ignored, the state is what counts.
        obj = object.__new__(cls)
        obj.state = {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        # Protocol 2 passes the pickled __dict__; a class with __slots__ would add a second dict.
        self.state = dict(state[0] if isinstance(state, tuple) else state)


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that builds only NumPy arrays, SciPy CSC/CSR matrices, containers and chumpy stand-ins.

    Args:
        file: a binary file object holding the pickle.
        source: the name used in error messages (the model file's path).
    """

    def __init__(self, file: io.BufferedIOBase, source: str | os.PathLike = "<pickle>") -> None:
        super().__init__(file, encoding="latin1")
        self.source = str(source)
        self._stand_ins: dict[str, type[ChumpyStandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "chumpy" or module.startswith("chumpy."):
            qualified = f"{module}.{name}"
            if qualified not in self._stand_ins:
                self._stand_ins[qualified] = type(name, (ChumpyStandIn,), {"chumpy_class": qualified})
            return self._stand_ins[qualified]
        if (module, name) not in ALLOWED_GLOBALS:
            raise ForbiddenGlobalError(
                f"model file {self.source} asks to load {module}.{name}; only NumPy/SciPy arrays are allowed")
        return ALLOWED_GLOBALS[(module, name)]


# ---------------------------------------------------------------------------------------------------
# chumpy objects -> arrays
# ---------------------------------------------------------------------------------------------------

def _chumpy_value(state: dict[str, Any], key: str, obj: ChumpyStandIn, where: str) -> Any:
    if key not in state:
        raise ValueError(f"{where} is a {obj.chumpy_class} object without its {key!r} entry; it cannot be read")
    return state[key]


def _eval_ch(obj: ChumpyStandIn, where: str) -> np.ndarray:
    return _to_array(_chumpy_value(obj.state, "x", obj, where), where)


def _eval_select(obj: ChumpyStandIn, where: str) -> np.ndarray:
    operand = _to_array(_chumpy_value(obj.state, "a", obj, where), where)
    indices = _to_array(_chumpy_value(obj.state, "idxs", obj, where), where).astype(np.int64)
    selected = operand.ravel()[indices]
    if "preferred_shape" in obj.state:
        return selected.reshape(obj.state["preferred_shape"])
    return selected


def _eval_reshape(obj: ChumpyStandIn, where: str) -> np.ndarray:
    operand = _to_array(_chumpy_value(obj.state, "a", obj, where), where)
    return operand.reshape(_chumpy_value(obj.state, "newshape", obj, where))


def _eval_transpose(obj: ChumpyStandIn, where: str) -> np.ndarray:
    operand = _to_array(_chumpy_value(obj.state, "a", obj, where), where)
    return np.ascontiguousarray(np.transpose(operand, obj.state.get("axes")))


# The chumpy classes whose value is a plain function of their pickled state (chumpy/ch.py Ch.compute_r,
# chumpy/reordering.py Select/Reshape/transpose.compute_r); anything else needs chumpy to evaluate.
CHUMPY_EVALUATORS: dict[str, Callable[[ChumpyStandIn, str], np.ndarray]] = {
    "chumpy.ch.Ch": _eval_ch,
    "chumpy.Ch": _eval_ch,
    "chumpy.reordering.Select": _eval_select,
    "chumpy.reordering.Reshape": _eval_reshape,
    "chumpy.reordering.transpose": _eval_transpose,
}


def _to_array(value: Any, where: str) -> np.ndarray:
    """The NumPy value of an array, a number or a chumpy stand-in."""
    if isinstance(value, ChumpyStandIn):
        if value.chumpy_class not in CHUMPY_EVALUATORS:
            raise ValueError(
                f"{where} is a {value.chumpy_class} object; only {', '.join(CHUMPY_EVALUATORS)} can be read "
                "without chumpy")
        return np.asarray(CHUMPY_EVALUATORS[value.chumpy_class](value, where))
    return np.asarray(value)


def _to_plain(value: Any, where: str) -> Any:
    """Replace chumpy stand-ins by arrays and rebuild sparse matrices, recursing into containers."""
    if isinstance(value, ChumpyStandIn):
        return _to_array(value, where)
    if sp.issparse(value):
        try:
            return type(value)((value.data, value.indices, value.indptr), shape=value.shape)
        except (AttributeError, TypeError, ValueError) as err:
            raise ValueError(f"{where} is a damaged sparse matrix: {err}") from None
    if isinstance(value, dict):
        return {key: _to_plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(item, f"{where}[{i}]") for i, item in enumerate(value))
    return value


def load_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a pickled model file (SMPL/SMAL format) without running any code from it.

    Args:
        path: the .pkl file, from Python 2 or 3, any pickle protocol.
    Returns:
        The file's dict with chumpy objects turned into NumPy arrays and sparse matrices rebuilt (and
        so checked); other plain values (strings, numbers) are kept as they are.
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable pickle of a dict, names anything but array types, or
            holds a chumpy operation that cannot be evaluated without chumpy.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        content = RestrictedUnpickler(io.BytesIO(path.read_bytes()), source=path).load()
    except ForbiddenGlobalError:
        raise
    except Exception as err:  # a damaged pickle raises many types (EOFError, UnpicklingError, ...); report them as one
        raise ValueError(f"model file {path} could not be read as a pickle: {type(err).__name__}: {err}") from None
    if not isinstance(content, dict):
        raise ValueError(f"model file {path} holds a {type(content).__name__}; a dict of arrays was expected")
    return {str(key): _to_plain(value, f"model file {path} entry {key!r}") for key, value in content.items()}
