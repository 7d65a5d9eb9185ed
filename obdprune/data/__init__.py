"""Datasets for obdprune: Fashion-MNIST, MNIST, any IDX folder, sklearn digits, CIFAR-10, and the user's
own images as an ImageFolder-style folder (``folder``) or arrays in an ``.npz`` file (``npz``).

``load_dataset(name)`` finds the files (see :func:`find_data_dir`), checks them strictly, carves a
stratified validation split off the training set with a fixed seed, and normalizes every split with
per-channel statistics of the training portion.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from obdprune.data import cifar
from obdprune.data.download import download_dataset
from obdprune.data.folder import check_image_size, load_image_folder
from obdprune.data.idx import load_idx_folder, read_idx
from obdprune.data.locate import DATASETS, canonical_name, find_data_dir, user_cache_dir
from obdprune.data.npz import load_npz
from obdprune.data.splits import (
    DIGITS_TEST_SEED,
    channel_stats,
    normalize,
    stratified_split,
    stratified_subset,
)
from obdprune.data.types import Dataset, Split
from obdprune.errors import DataError, UsageError

__all__ = [
    "DATASETS",
    "Dataset",
    "Split",
    "download_dataset",
    "find_data_dir",
    "load_dataset",
    "load_image_folder",
    "load_npz",
    "read_idx",
    "user_cache_dir",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_DIGIT_NAMES = tuple(str(i) for i in range(10))


@dataclass
class _Raw:
    x_train: np.ndarray  # (N, C, H, W) uint8 (float32 from an npz of floats, with pixel_scale 1)
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    train_labels: str  # where train/test labels came from, for error messages
    test_labels: str
    names: tuple[str, ...] | None = None  # known class names; labels must index into them
    pixel_scale: float = 255.0


def _load_raw(name: str, data_dir: str | os.PathLike | None, image_size: tuple[int, int] | None) -> _Raw:
    if image_size is not None and name != "folder":
        raise UsageError(f"image_size resizes the images of the folder dataset; {name} images keep their size")
    if name == "folder":
        folder = find_data_dir(name, data_dir)
        x_tr, y_tr, x_te, y_te, names = load_image_folder(folder, image_size)
        return _Raw(x_tr, y_tr, x_te, y_te, str(folder), str(folder / "train"), str(folder / "test"), names)
    if name == "npz":
        file = find_data_dir(name, data_dir)
        x_tr, y_tr, x_te, y_te, scale, names = load_npz(file)
        return _Raw(x_tr, y_tr, x_te, y_te, str(file), f"{file}: y_train", f"{file}: y_test", names, scale)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images.astype(np.uint8)[:, None]  # values 0..16
        labels = digits.target.astype(np.int64)
        train, test = stratified_split(labels, 0.2, seed=DIGITS_TEST_SEED)
        src = "sklearn.datasets.load_digits"
        return _Raw(images[train], labels[train], images[test], labels[test], src, src, src, _DIGIT_NAMES, 16.0)
    folder = find_data_dir(name, data_dir)
    if name == "cifar10":
        x_tr, y_tr, x_te, y_te, names = cifar.load_cifar_folder(folder)
        where = str(folder / cifar.TRAIN_BATCHES[0])
        return _Raw(x_tr, y_tr, x_te, y_te, str(folder), where, str(folder / cifar.TEST_BATCH),
                    names if names is not None else cifar.CLASSES)  # fmt: skip
    x_tr, y_tr, x_te, y_te, files = load_idx_folder(folder)
    names = {"fashion-mnist": FASHION_MNIST_CLASSES, "mnist": _DIGIT_NAMES}.get(name)
    return _Raw(x_tr, y_tr, x_te, y_te, str(folder), str(files[1]), str(files[3]), names)


def _check_limit(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise UsageError(f"{what} must be a positive integer or None, got {value!r}")


def _split(x: np.ndarray, y: np.ndarray, mean: tuple, std: tuple, scale: float) -> Split:
    return Split(normalize(x, mean, std, scale), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_fraction: float = 0.1,
    train_limit: int | None = None,
    test_limit: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> Dataset:
    """Load ``name`` (one of DATASETS) → Dataset with normalized float32 (N, C, H, W) splits.

    ``folder`` reads ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` images (see
    :func:`load_image_folder`; ``image_size`` = (H, W) resizes them); ``npz`` reads the arrays of the
    file ``data_dir`` (see :func:`load_npz`).

    ``train_limit``/``test_limit`` take deterministic class-stratified subsets of the training and
    test files; then ``val_fraction`` of the (limited) training images is carved off, stratified,
    with a fixed seed. Mean/std per channel come from the remaining training images only.
    Raises UsageError for bad arguments, DataError for missing or malformed files.
    """
    name = canonical_name(name)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not math.isfinite(val_fraction) or not 0 <= val_fraction < 1:  # fmt: skip
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    _check_limit(train_limit, "train_limit")
    _check_limit(test_limit, "test_limit")

    raw = _load_raw(name, data_dir, check_image_size(image_size))
    num_classes = int(raw.y_train.max()) + 1
    if raw.names is not None and num_classes > len(raw.names):
        raise DataError(
            f"{raw.train_labels}: label {num_classes - 1} out of range; {name} has {len(raw.names)} classes "
            f"(0..{len(raw.names) - 1})"
        )
    if raw.y_test.max() >= num_classes:
        raise DataError(
            f"{raw.test_labels}: test label {int(raw.y_test.max())} out of range; training labels "
            f"({raw.train_labels}) go up to {num_classes - 1}"
        )
    classes = raw.names[:num_classes] if raw.names is not None else tuple(str(i) for i in range(num_classes))

    x_tr, y_tr, x_te, y_te = raw.x_train, raw.y_train, raw.x_test, raw.y_test
    if train_limit is not None and train_limit < y_tr.size:
        keep = stratified_subset(y_tr, train_limit)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if test_limit is not None and test_limit < y_te.size:
        keep = stratified_subset(y_te, test_limit)
        x_te, y_te = x_te[keep], y_te[keep]
    train_idx, val_idx = stratified_split(y_tr, val_fraction)
    x_val, y_val = x_tr[val_idx], y_tr[val_idx]
    if val_idx.size:
        x_tr, y_tr = x_tr[train_idx], y_tr[train_idx]

    mean, std = channel_stats(x_tr, raw.pixel_scale)
    scale = raw.pixel_scale
    return Dataset(
        name=name,
        train=_split(x_tr, y_tr, mean, std, scale),
        val=_split(x_val, y_val, mean, std, scale),
        test=_split(x_te, y_te, mean, std, scale),
        input_shape=tuple(int(d) for d in x_tr.shape[1:]),  # type: ignore[arg-type]
        num_classes=num_classes,
        classes=classes,
        source=raw.source,
        mean=mean,
        std=std,
        pixel_scale=scale,
    )
