"""Strict reader for the IDX format (MNIST/Fashion-MNIST files), gzipped or not.

Layout: 2 zero bytes, a dtype code (0x08 = unsigned byte), the number of dimensions, then one
big-endian uint32 per dimension, then the data. Sizes in the header are checked against the bytes
actually present; nothing is allocated on the header's word alone.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from obdprune.errors import DataError

# Stem → expected number of dimensions. Each file may also carry a ".gz" suffix.
IDX_FILES: dict[str, int] = {
    "train-images-idx3-ubyte": 3,
    "train-labels-idx1-ubyte": 1,
    "t10k-images-idx3-ubyte": 3,
    "t10k-labels-idx1-ubyte": 1,
}

_GZIP_MAGIC = b"\x1f\x8b"
_DTYPE_CODES = {
    0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64",
}  # fmt: skip
_MAX_DATA_BYTES = 1 << 32  # refuse headers declaring more than 4 GiB
_CHUNK = 1 << 24


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """The file for ``stem`` in ``folder``: uncompressed preferred, else ``.gz``; None if neither."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with ``ndim`` dimensions → uint8 array of the header's shape.

    Compression is detected from the content, not the name. Any problem → DataError naming the file.
    """
    path = Path(path)
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
    with fh:
        is_gzip = fh.read(2) == _GZIP_MAGIC
        fh.seek(0)
        if not is_gzip:
            return _parse(fh, path, ndim, os.fstat(fh.fileno()).st_size)
        try:
            with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                return _parse(gz, path, ndim, None)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip data ({e or type(e).__name__})") from None


def _read_upto(f: BinaryIO, n: int) -> bytes:
    """Read up to ``n`` bytes (fewer only at end of file)."""
    parts, got = [], 0
    while got < n:
        part = f.read(min(n - got, _CHUNK))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _parse(f: BinaryIO, path: Path, ndim: int, file_size: int | None) -> np.ndarray:
    what = "images (N, rows, cols)" if ndim == 3 else "labels (N,)"
    magic = _read_upto(f, 4)
    if len(magic) < 4:
        raise DataError(f"{path}: truncated: {len(magic)} bytes, too short for an IDX header")
    if magic[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file (bad magic bytes {magic.hex(' ')}, expected 00 00 08 {ndim:02x})")
    code, nd = magic[2], magic[3]
    if code != 0x08:
        kind = _DTYPE_CODES.get(code, "unknown")
        raise DataError(
            f"{path}: unsupported IDX dtype code 0x{code:02x} ({kind}); only 0x08 (unsigned byte) is supported"
        )
    if nd != ndim:
        raise DataError(f"{path}: IDX file has {nd} dimensions, expected {ndim} for {what}")
    raw_dims = _read_upto(f, 4 * nd)
    if len(raw_dims) < 4 * nd:
        raise DataError(f"{path}: truncated inside the IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
    if any(d == 0 for d in dims):
        raise DataError(f"{path}: IDX header declares an empty shape {dims}")
    n_bytes = 1
    for d in dims:
        n_bytes *= d
    if n_bytes > _MAX_DATA_BYTES:
        raise DataError(f"{path}: IDX header declares shape {dims} ({n_bytes} bytes), implausibly large")
    header = 4 + 4 * nd
    if file_size is not None:
        if file_size != header + n_bytes:
            state = "truncated" if file_size < header + n_bytes else "trailing garbage"
            raise DataError(
                f"{path}: size mismatch ({state}): header declares shape {dims} = {n_bytes} data bytes, "
                f"file has {file_size - header}"
            )
        data = np.fromfile(f, dtype=np.uint8, count=n_bytes)
        if data.size != n_bytes:  # file shrank while reading
            raise DataError(f"{path}: truncated: expected {n_bytes} data bytes, read {data.size}")
    else:
        buf = _read_upto(f, n_bytes)
        if len(buf) < n_bytes:
            raise DataError(
                f"{path}: truncated: header declares shape {dims} = {n_bytes} data bytes, only {len(buf)} present"
            )
        if f.read(1):  # also makes gzip verify its CRC and length trailer
            raise DataError(f"{path}: trailing garbage after the {n_bytes} data bytes the header declares")
        data = np.frombuffer(buf, dtype=np.uint8).copy()  # writable for torch.from_numpy
    return data.reshape(dims)


def load_idx_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[Path]]:
    """Read the four IDX files of ``folder``.

    Returns train images (N, 1, H, W) uint8, train labels (N,) int64, test images, test labels,
    and the files read. Label/image counts and image sizes are cross-checked.
    """
    arrays, files = {}, []
    for stem, nd in IDX_FILES.items():
        path = find_idx_file(folder, stem)
        if path is None:
            raise DataError(f"{folder / stem}[.gz]: file not found")
        arrays[stem] = read_idx(path, nd)
        files.append(path)
    out = []
    for split, (img_path, lab_path) in (("train", files[0:2]), ("t10k", files[2:4])):
        images = arrays[f"{split}-images-idx3-ubyte"]
        labels = arrays[f"{split}-labels-idx1-ubyte"]
        if labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{lab_path}: has {labels.shape[0]} labels but {img_path} has {images.shape[0]} images"
            )
        out += [images[:, None], labels.astype(np.int64)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataError(
            f"{files[2]}: test images are {out[2].shape[2]}x{out[2].shape[3]} but "
            f"training images are {out[0].shape[2]}x{out[0].shape[3]}"
        )
    return out[0], out[1], out[2], out[3], files
