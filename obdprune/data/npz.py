"""Arrays in one ``.npz`` file: ``x_train, y_train, x_test, y_test`` (and optionally ``classes``).

Read with ``allow_pickle=False``: an object array is refused, never unpickled. Images may be
(N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3 (when both axes could be channels, the
PyTorch order (N, C, H, W) is taken), as uint8 (0..255), other integers within 0..255, or floats
(used as they are: pixel scale 1). Labels are integers in [0, K).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from obdprune.errors import DataError, UsageError

__all__ = ["NPZ_KEYS", "load_npz"]

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
CHANNELS = (1, 3)


def _array(npz, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise DataError(f"{path}: {key} holds Python objects (dtype=object), which obdprune never unpickles; "
                            f"save numeric arrays") from None
        raise DataError(f"{path}: {key} is not a readable array ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: {key} is truncated or corrupt ({e})") from None


def _images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """(N, C, H, W) uint8 or float32 from any accepted layout and dtype."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] in CHANNELS:
        pass
    elif x.ndim == 4 and x.shape[3] in CHANNELS:
        x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{path}: {key} has shape {x.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
                        f"with C = 1 or 3")
    if x.shape[0] == 0 or min(x.shape[2:]) < 1:
        raise DataError(f"{path}: {key} holds no images (shape {x.shape})")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{path}: {key} is {x.dtype} with values in [{lo}, {hi}]; integer pixels must be in "
                            f"0..255 (or store floats)")
        return np.ascontiguousarray(x, dtype=np.uint8)
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise DataError(f"{path}: {key} contains NaN or inf")
        return np.ascontiguousarray(x, dtype=np.float32)
    raise DataError(f"{path}: {key} has dtype {x.dtype}; pixels must be uint8 or floating point")


def _labels(y: np.ndarray, n: int, key: str, path: Path) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{path}: {key} has shape {y.shape}; labels must be (N,) class indices, not one-hot")
    if y.shape[0] != n:
        raise DataError(f"{path}: {key} has {y.shape[0]} labels for {n} images")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"{path}: {key} holds non-integer values; labels must be class indices 0..K-1")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{path}: {key} has dtype {y.dtype}; labels must be integers 0..K-1")
    if y.size and y.min() < 0:
        raise DataError(f"{path}: {key} holds the negative label {int(y.min())}; labels must be class indices 0..K-1")
    return y.astype(np.int64)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, tuple[str, ...] | None]:
    """Read ``path`` → (x_train, y_train, x_test, y_test, pixel_scale, class names or None).

    ``x_*`` are (N, C, H, W), uint8 (pixel_scale 255) or float32 (pixel_scale 1); ``y_*`` int64 (N,).
    An optional ``classes`` array of K strings names the classes. Raises DataError naming the file and
    the array at fault.

    >>> np.savez("d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)  # doctest: +SKIP
    >>> load_npz("d.npz")[0].shape
    (1000, 1, 28, 28)
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{path} is a folder; the npz dataset needs the .npz file itself as data_dir")
    if not path.is_file():
        raise DataError(f"{path} does not exist; the npz dataset reads x_train, y_train, x_test, y_test from it")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive of {', '.join(NPZ_KEYS)}; save with np.savez")
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise DataError(f"{path}: missing arrays {missing}; found {sorted(npz.files)}, need {', '.join(NPZ_KEYS)}")
        x_train = _images(_array(npz, "x_train", path), "x_train", path)
        x_test = _images(_array(npz, "x_test", path), "x_test", path)
        y_train = _labels(_array(npz, "y_train", path), x_train.shape[0], "y_train", path)
        y_test = _labels(_array(npz, "y_test", path), x_test.shape[0], "y_test", path)
        names = None
        if "classes" in npz.files:
            classes = _array(npz, "classes", path)
            if classes.ndim != 1 or classes.dtype.kind not in "US":
                raise DataError(f"{path}: classes must be a 1-D array of strings, got {classes.dtype} {classes.shape}")
            names = tuple(str(c) for c in classes.astype(str))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: x_train images are {x_train.shape[1:]} (C, H, W) but x_test images are "
                        f"{x_test.shape[1:]}")
    if x_train.dtype != x_test.dtype:
        raise DataError(f"{path}: x_train is {x_train.dtype} but x_test is {x_test.dtype}; store both as 8-bit "
                        f"pixels or both as floats")
    return x_train, y_train, x_test, y_test, 255.0 if x_train.dtype == np.uint8 else 1.0, names
