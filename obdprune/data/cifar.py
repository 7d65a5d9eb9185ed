"""CIFAR-10 "python version" batches, read with a restricted unpickler.

The batch files are pickles (protocol 2, written by Python 2). Unpickling can run arbitrary code,
so :class:`RestrictedUnpickler` resolves only the few globals a CIFAR batch refers to and refuses
everything else. Dicts, lists, ints and strings need no globals at all.
"""
from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from obdprune.errors import DataError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
SUBFOLDER = "cifar-10-batches-py"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
_MAX_FILE_BYTES = 1 << 30


class _Refused(Exception):
    pass


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    for module in modules:
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if obj is not None:
            return obj
    raise _Refused(f"{modules[0]}.{name} is not available in this numpy")


_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes at protocol 2 as _codecs.encode(str, "latin1"); allow only that.
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in _LATIN1:
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin-1")


def _bytes(*args: Any) -> bytes:
    # Protocol 2 writes b"" as bytes(); anything else could allocate or call arbitrary code.
    if args:
        raise _Refused("bytes() with arguments")
    return b""


# (module, name) as written in the pickle → how to resolve it. numpy 2 renamed numpy.core to
# numpy._core; old files (the official ones) say numpy.core.multiarray.
_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    **{(m, "_reconstruct"): (lambda: _numpy_attr(_MULTIARRAY, "_reconstruct")) for m in _MULTIARRAY},
    **{(m, "scalar"): (lambda: _numpy_attr(_MULTIARRAY, "scalar")) for m in _MULTIARRAY},
    **{(m, "_frombuffer"): (lambda: _numpy_attr(_NUMERIC, "_frombuffer")) for m in _NUMERIC},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
    ("builtins", "bytes"): lambda: _bytes,
    ("__builtin__", "bytes"): lambda: _bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays, dtypes and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED.get((module, name))
        if resolve is None:
            raise _Refused(f"refusing to load global {module}.{name}")
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("refusing persistent id")


def safe_load_pickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"``) → object.

    Raises DataError naming the file for anything refused, malformed or truncated.
    """
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise DataError(f"{path}: {size} bytes, too large for a CIFAR batch")
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as e:
        raise DataError(f"{path}: unsafe or unexpected pickle content ({e}); not a CIFAR batch") from None
    except MemoryError:
        raise DataError(f"{path}: malformed pickle (declares an impossibly large object)") from None
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, ValueError, TypeError, ...
        raise DataError(f"{path}: malformed or truncated pickle ({type(e).__name__}: {e})") from None


def _get(d: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    return None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch → images (n, 3, 32, 32) uint8, labels (n,) int64."""
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR batch (top level is {type(obj).__name__}, expected dict)")
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if data is None or labels is None:
        raise DataError(f"{path}: not a CIFAR-10 batch (needs keys 'data' and 'labels')")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (n, 3072), got {desc}")
    try:
        labels = np.asarray(labels)
    except Exception:
        raise DataError(f"{path}: 'labels' is not a list of integers") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' must be a list of integers, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: has {labels.shape[0]} labels but {data.shape[0]} images")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: negative label {int(labels.min())}")
    return np.ascontiguousarray(data).reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def read_class_names(path: Path) -> tuple[str, ...] | None:
    """Class names from ``batches.meta``; None if the file is absent."""
    if not path.is_file():
        return None
    obj = safe_load_pickle(path)
    names = _get(obj, "label_names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path}: no 'label_names' list of strings")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def batches_folder(folder: Path) -> Path | None:
    """The folder holding the batches: ``folder/cifar-10-batches-py`` or ``folder`` itself."""
    for candidate in (folder / SUBFOLDER, folder):
        if all((candidate / f).is_file() for f in (*TRAIN_BATCHES, TEST_BATCH)):
            return candidate
    return None


def missing_files(folder: Path) -> list[str]:
    """Batch files missing from ``folder`` (checked as-is)."""
    return [f for f in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / f).is_file()]


def load_cifar_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """Train images (50000, 3, 32, 32) uint8, train labels int64, test images, test labels, names."""
    parts = [read_batch(folder / name) for name in TRAIN_BATCHES]
    x_test, y_test = read_batch(folder / TEST_BATCH)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return x_train, y_train, x_test, y_test, read_class_names(folder / META)
