"""Images in the ImageFolder layout: ``DIR/train/<class>/*.png|jpg|jpeg|bmp`` and ``DIR/test/<class>/*``.

Classes are the sorted folder names under ``train/``; the test classes must be among them. Images are
read with Pillow. If every image is grayscale the data has 1 channel, else every image is converted to
RGB (3 channels; alpha is dropped). Without ``image_size`` all images must share one size; with it,
every image is resized to (H, W) with bilinear filtering.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from obdprune.errors import DataError, UsageError

__all__ = ["IMAGE_SUFFIXES", "load_image_folder", "check_image_size"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SPLITS = ("train", "test")
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})
_WIDE_MODES = ("I", "F")  # 16/32-bit integer and float pixels: no lossless way into 8 bits


def check_image_size(image_size) -> tuple[int, int] | None:
    """``image_size`` as (H, W) of positive ints, or None; UsageError otherwise."""
    if image_size is None:
        return None
    try:
        h, w = image_size
    except (TypeError, ValueError):
        raise UsageError(f"image_size must be (height, width), got {image_size!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 4096:
            raise UsageError(f"image_size must be two integers in [1, 4096] (height, width), got {image_size!r}")
    return int(h), int(w)


def _class_folders(split: Path) -> dict[str, Path]:
    """Class folders by name; hidden ones (``.git``, ``._*`` resource forks) are not classes."""
    return {p.name: p for p in sorted(split.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _list(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """Class names (sorted train folders) and, per split, (file, label) pairs in a fixed order."""
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise DataError(f"{root}: no {' or '.join(f'{s}/' for s in missing)} folder; the folder dataset needs "
                        f"{root}/train/<class>/*.png|jpg and {root}/test/<class>/*")
    train_classes = _class_folders(root / "train")
    if not train_classes:
        raise DataError(f"{root / 'train'} holds no class folders; put each class's images in train/<class>/")
    names = tuple(train_classes)
    test_classes = _class_folders(root / "test")
    unknown = sorted(set(test_classes) - set(names))
    if unknown:
        raise DataError(f"{root / 'test'}: classes {unknown[:5]} have no folder under {root / 'train'}; the test "
                        f"classes must be among the training classes")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, classes in (("train", train_classes), ("test", test_classes)):
        pairs = []
        for label, name in enumerate(names):
            if name not in classes:
                continue
            found = _images(classes[name])
            if not found and split == "train":
                raise DataError(f"{classes[name]} holds no {'/'.join(IMAGE_SUFFIXES)} images; every training "
                                f"class needs at least one")
            pairs += [(p, label) for p in found]
        if not pairs:
            raise DataError(f"{root / split} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        files[split] = pairs
    return names, files


def _bad_image(path: Path, e: BaseException) -> DataError:
    return DataError(f"{path} is not a readable image ({type(e).__name__}: {str(e).strip() or 'no details'})")


def _headers(pairs: list[tuple[Path, int]]) -> list[tuple[str, tuple[int, int]]]:
    """(mode, (H, W)) of every image, read from the headers only."""
    from PIL import Image

    out = []
    for path, _ in pairs:
        try:
            with Image.open(path) as im:
                mode, (w, h) = im.mode, im.size
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds of errors on junk files
            raise _bad_image(path, e) from None
        if mode.startswith(_WIDE_MODES):
            raise DataError(f"{path} has {mode} pixels (16/32-bit or float); the folder dataset reads 8-bit "
                            f"grayscale or color images. Convert them, or store float arrays in an npz file")
        out.append((mode, (h, w)))
    return out


def _decode(pairs: list[tuple[Path, int]], pil_mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    channels = 1 if pil_mode == "L" else 3
    arrays = []
    for path, _ in pairs:
        try:
            with Image.open(path) as im:
                im = im.convert(pil_mode)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data
            raise _bad_image(path, e) from None
        arrays.append(a.reshape(a.shape[0], a.shape[1], channels))
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


def load_image_folder(root: str | Path, image_size: tuple[int, int] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read ``root/train`` and ``root/test`` → (x_train, y_train, x_test, y_test, class names).

    ``x_*`` are uint8 (N, C, H, W) with C = 1 if every image is grayscale, else 3; ``y_*`` int64 (N,),
    indices into the class names (the sorted folder names under ``train/``). Raises DataError naming the
    file or folder at fault, and when sizes differ without ``image_size``.

    >>> x_tr, y_tr, x_te, y_te, names = load_image_folder("pets")  # doctest: +SKIP
    >>> x_tr.shape, names
    ((1200, 3, 64, 64), ('cat', 'dog'))
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; the folder dataset needs {root}/train/<class>/*.png|jpg and "
                        f"{root}/test/<class>/*")
    size = check_image_size(image_size)
    names, files = _list(root)
    pairs = files["train"] + files["test"]
    headers = _headers(pairs)
    if size is None:
        first_path, first_size = pairs[0][0], headers[0][1]
        for (path, _), (_, hw) in zip(pairs, headers):
            if hw != first_size:
                raise DataError(f"{path} is {hw[0]}x{hw[1]} (HxW) but {first_path} is {first_size[0]}x{first_size[1]}; "
                                f"all images must share one size, or resize them with image_size=(H, W) "
                                f"(--image-size H W)")
    pil_mode = "L" if all(mode in _GRAY_MODES for mode, _ in headers) else "RGB"
    x_train = _decode(files["train"], pil_mode, size)
    x_test = _decode(files["test"], pil_mode, size)
    y_train = np.array([label for _, label in files["train"]], dtype=np.int64)
    y_test = np.array([label for _, label in files["test"]], dtype=np.int64)
    return x_train, y_train, x_test, y_test, names
