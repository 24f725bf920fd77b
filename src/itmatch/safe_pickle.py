"""Reading `.npy` files without running code from them.

The official `{split}_ims_size.npy` files are object arrays of {"image_w": w, "image_h": h} dicts,
stored as a pickle; `np.load(allow_pickle=True)` would run whatever such a pickle names. Here an
object array is unpickled by a restricted unpickler that builds only plain containers (dict, list,
tuple, set), strings, bytes, numbers, None and numpy arrays or scalars of plain dtypes; any other
global makes a one-line `DataError` naming the file, before anything is called.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np

from itmatch.errors import DataError

try:
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar as _numpy_scalar

# A dtype written as a type string: bool, integers, floats, complex, bytes, unicode, object.
_PLAIN_DTYPE = re.compile(r"[<>|=]?[?bBiufcSUO]\d*")


def _plain_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str) or not _PLAIN_DTYPE.fullmatch(spec):
        raise pickle.UnpicklingError(f"dtype {spec!r} is not a plain dtype")
    return np.dtype(spec, bool(align), bool(copy))


def _plain_reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subclass {subtype!r} is not allowed")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _plain_scalar(dtype, *state):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("only numeric numpy scalars are allowed")
    return _numpy_scalar(dtype, *state)


# What numpy's pickles of arrays and scalars name, mapped to checked stand-ins.
_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _plain_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _plain_reconstruct,
    ("numpy.core.multiarray", "scalar"): _plain_scalar,
    ("numpy._core.multiarray", "scalar"): _plain_scalar,
}


class PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: every global must be one of `_ALLOWED`."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refuses to load {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refuses persistent ids")


def loads_plain(data: bytes):
    """The object pickled in `data`, if it is plain data (else pickle.UnpicklingError)."""
    return PlainUnpickler(io.BytesIO(data)).load()


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """An .npy file's array; object arrays go through PlainUnpickler. Raises DataError naming the
    file for anything unreadable, corrupt, or holding more than plain data."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            header = _read_header(path, file)
            if not header[2].hasobject:
                return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            array = PlainUnpickler(file).load()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a folder, not a .npy file") from None
    except pickle.UnpicklingError as error:
        first = str(error).splitlines()[0] if str(error) else "unreadable pickle"
        raise DataError(path, f"holds pickled data that is not plain data ({first}); refused") from None
    except OSError as error:
        raise DataError(path, f"cannot be read ({error.strerror or error})") from None
    except DataError:
        raise
    except Exception as error:  # a damaged header or pickle can raise almost anything
        raise DataError(path, f"is truncated or corrupt ({type(error).__name__}: {_first_line(error)})") from None
    if not isinstance(array, np.ndarray) or array.shape != header[0]:
        raise DataError(path, f"its pickle does not hold the {header[0]} object array its header promises")
    return array


def _read_header(path: Path, file) -> tuple:
    magic = file.read(len(np.lib.format.MAGIC_PREFIX))
    # Without this check numpy calls any non-.npy file "pickled data".
    if magic != np.lib.format.MAGIC_PREFIX:
        raise DataError(path, "is not a .npy file (no NumPy header)")
    file.seek(0)
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(file)
    return np.lib.format.read_array_header_2_0(file)


def load_error(error: BaseException) -> str:
    """One line on why torch.load(weights_only=True) failed. Its own message spans several lines
    and suggests weights_only=False, i.e. running the file's code: never the advice here."""
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        return f"holds pickled objects beyond tensors and plain data{what}; refused, as loading them could run code"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]
