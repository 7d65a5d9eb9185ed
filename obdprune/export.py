"""Saving pruned models: plain safetensors, a sparse safetensors format, and checked ONNX export.

Sparse format (one safetensors file, no pickles). Each tensor of the state_dict is stored with
the smallest of these exact encodings (payload bytes + per-key header cost):

``dense``   the tensor itself, under its own name;
``bitmask`` ``<name>::mask``  uint8, one bit per element (little-endian bit order), 1 = stored
            ``<name>::values`` the stored elements in flat (C) order, original dtype;
``index``   ``<name>::index`` flat indices of the stored elements, uint16 when the tensor has at
            most 65,536 elements, else uint32 / uint64; plus ``<name>::values``;
``delta``   ``<name>::delta`` the gaps between consecutive stored flat indices
            (``idx[i] - idx[i-1] - 1``, ``idx[-1] = -1``) as LEB128 varints in uint8 (one byte
            per gap below 128, two below 16,384, ...); plus ``<name>::values``.

An element is "stored" when its bit pattern is not all zeros, so -0.0 and NaN survive and the
round trip is bitwise exact. The safetensors metadata key ``obdprune.sparse`` holds JSON with
the format version, per-tensor encoding / shape / dtype / count, and a SHA-256 over the stored
arrays; any other metadata keys are the caller's (strings only). Junk, truncated or altered
files raise :class:`ModelFileError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from obdprune.atomic import atomic_write, atomic_write_bytes
from obdprune.errors import ModelFileError, ObdpruneError, UsageError

__all__ = [
    "save_safetensors",
    "load_safetensors",
    "read_safetensors_metadata",
    "encode_sparse",
    "decode_sparse",
    "save_sparse",
    "load_sparse",
    "read_sparse_metadata",
    "sparse_encoding_sizes",
    "export_onnx",
]

SPARSE_KEY = "obdprune.sparse"
SPARSE_FORMAT = "obdprune-sparse"
SPARSE_VERSION = 1
_SEP = "::"
_KEY_OVERHEAD = 96  # approx. safetensors header bytes per extra stored array
_ENCODINGS = ("dense", "bitmask", "index", "delta")
_ARRAY_SUFFIX = {"bitmask": "mask", "index": "index", "delta": "delta"}
_INT_BY_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------------------------
# Plain safetensors
# --------------------------------------------------------------------------------------------


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise UsageError("metadata must be a dict of str -> str")
    return dict(metadata)


def _check_state_dict(state_dict: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(state_dict, Mapping):
        raise UsageError("state_dict must be a mapping of names to tensors")
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise UsageError(f"state_dict entry {k!r} is not a (str, Tensor) pair")


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Detached contiguous CPU copy (safetensors refuses shared storage)."""
    return t.detach().to("cpu").contiguous().clone()


def _encode_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    from safetensors.torch import save

    return save({k: _plain(v) for k, v in tensors.items()}, metadata=dict(metadata) if metadata else None)


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> int:
    """Write ``state_dict`` as one safetensors file (atomically); returns the bytes written."""
    _check_state_dict(state_dict)
    data = _encode_safetensors(state_dict, _check_metadata(metadata))
    atomic_write_bytes(path, data)
    return len(data)


def _read(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from None


def _parse(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors blob; ModelFileError on anything malformed."""
    from safetensors.torch import load

    if len(data) < 8:
        raise ModelFileError(f"{source}: not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ModelFileError(f"{source}: not a safetensors file or truncated (header of {n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("metadata is not an object")
        tensors = load(data)
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise ModelFileError(f"{source}: not a valid safetensors file or truncated ({msg})") from None
    return tensors, {str(k): str(v) for k, v in meta.items()}


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file. Junk / truncated file -> ModelFileError."""
    return _parse(_read(path), str(path))[0]


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    return _parse(_read(path), str(path))[1]


# --------------------------------------------------------------------------------------------
# Sparse format
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from(name: Any, source: str) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ModelFileError(f"{source}: unknown dtype {name!r} in sparse metadata")
    return dt


def _stored_mask(t: torch.Tensor) -> torch.Tensor | None:
    """Flat bool mask of elements whose bit pattern is not all zeros; None if not viewable."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat
    int_dt = _INT_BY_SIZE.get(flat.element_size())
    if int_dt is None or flat.is_complex():
        return None
    try:
        return flat.view(int_dt) != 0
    except RuntimeError:
        return None


def _index_dtype(numel: int) -> np.dtype:
    if numel <= 2**16:
        return np.dtype(np.uint16)
    if numel <= 2**32:
        return np.dtype(np.uint32)
    return np.dtype(np.uint64)


def _varint_encode(values: np.ndarray) -> np.ndarray:
    """LEB128: 7 bits per byte, high bit set on all but the last byte of a number."""
    v = values.astype(np.uint64)
    if v.size == 0:
        return np.zeros(0, np.uint8)
    nbytes = np.ones(v.shape, np.int64)
    for k in range(1, 10):
        nbytes += v >= np.uint64(1 << (7 * k))
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), np.uint8)
    for j in range(int(nbytes.max())):
        sel = nbytes > j
        low = ((v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        more = (nbytes[sel] > j + 1).astype(np.uint8) << 7
        out[starts[sel] + j] = low | more
    return out


def _varint_decode(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_varint_encode`; ValueError on malformed input."""
    b = data.astype(np.uint8, copy=False)
    if b.size == 0:
        return np.zeros(0, np.uint64)
    ends = (b & 0x80) == 0
    if not ends[-1]:
        raise ValueError("truncated varint")
    starts = np.flatnonzero(np.concatenate(([True], ends[:-1])))
    number = np.cumsum(np.concatenate(([0], ends[:-1].astype(np.int64))))
    pos = np.arange(b.size) - starts[number]
    if pos.max() > 9 or np.any((pos == 9) & (b > 1)):
        raise ValueError("varint longer than 64 bits")
    last = np.flatnonzero(ends)
    if np.any((pos[last] > 0) & (b[last] == 0)):
        raise ValueError("overlong varint")
    shifted = (b & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    return np.add.reduceat(shifted, starts)


def _candidates(t: torch.Tensor) -> tuple[dict[str, int], dict[str, Any]]:
    """Payload bytes of each possible encoding of ``t`` and the arrays they need."""
    numel, item = t.numel(), t.element_size()
    costs = {"dense": numel * item}
    mask = _stored_mask(t)
    if mask is None or numel == 0:
        return costs, {}
    idx = torch.nonzero(mask).flatten().numpy().astype(np.int64)
    gaps = np.diff(idx, prepend=-1) - 1
    delta = _varint_encode(gaps.astype(np.uint64))
    values = idx.size * item
    costs["bitmask"] = values + (numel + 7) // 8
    costs["index"] = values + idx.size * _index_dtype(numel).itemsize
    costs["delta"] = values + int(delta.size)
    return costs, {"mask": mask, "idx": idx, "delta": delta}


def _encode_tensor(name: str, t: torch.Tensor, encoding: str = "auto") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stored arrays and the metadata entry of one tensor: the smallest exact encoding, or
    ``encoding`` when it applies to this tensor."""
    t = t.detach().to("cpu").contiguous()
    info: dict[str, Any] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    costs, parts = _candidates(t)
    if encoding in costs:
        enc = encoding
    else:
        # A sparse encoding stores two arrays instead of one: one more header entry.
        total = {e: c + (0 if e == "dense" else _KEY_OVERHEAD) for e, c in costs.items()}
        enc = min(total, key=lambda e: (total[e], _ENCODINGS.index(e)))
    if enc == "dense":
        return {name: t}, {**info, "encoding": "dense"}
    idx = parts["idx"]
    info.update(encoding=enc, count=int(idx.size))
    arrays = {f"{name}{_SEP}values": t.reshape(-1)[torch.from_numpy(idx)].clone()}
    key = f"{name}{_SEP}{_ARRAY_SUFFIX[enc]}"
    if enc == "bitmask":
        arrays[key] = torch.from_numpy(np.packbits(parts["mask"].numpy(), bitorder="little"))
    elif enc == "index":
        arrays[key] = torch.from_numpy(idx.astype(_index_dtype(t.numel())))
    else:
        arrays[key] = torch.from_numpy(parts["delta"])
    return arrays, info


def _digest(arrays: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        t = arrays[k].contiguous()
        h.update(f"{k}|{_dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sparse_encoding_sizes(t: torch.Tensor) -> dict[str, int]:
    """Payload bytes of each applicable encoding of one tensor (header bytes excluded)."""
    return _candidates(t.detach().to("cpu").contiguous())[0]


def encode_sparse(
    state_dict: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    encoding: str = "auto",
) -> bytes:
    """The sparse-format file contents for ``state_dict`` (see the module docstring).

    ``encoding="auto"`` picks the smallest exact encoding per tensor; ``"dense"``, ``"bitmask"``,
    ``"index"`` or ``"delta"`` forces one wherever it applies (comparisons, tests)."""
    _check_state_dict(state_dict)
    if encoding != "auto" and encoding not in _ENCODINGS:
        raise UsageError(f"encoding must be 'auto' or one of {', '.join(_ENCODINGS)}, got {encoding!r}")
    user = _check_metadata(metadata)
    if SPARSE_KEY in user:
        raise UsageError(f"metadata key {SPARSE_KEY!r} is reserved")
    arrays: dict[str, torch.Tensor] = {}
    table: dict[str, Any] = {}
    for name, t in state_dict.items():
        if _SEP in name:
            raise UsageError(f"tensor name {name!r} must not contain {_SEP!r}")
        stored, info = _encode_tensor(name, t, encoding)
        arrays.update(stored)
        table[name] = info
    header = {
        "format": SPARSE_FORMAT,
        "version": SPARSE_VERSION,
        "tensors": table,
        "sha256": _digest(arrays),
    }
    meta = {**user, SPARSE_KEY: json.dumps(header, separators=(",", ":"))}
    return _encode_safetensors(arrays, meta)


def save_sparse(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    encoding: str = "auto",
) -> int:
    """Write ``state_dict`` in the sparse format (atomically); returns the bytes written.
    ``encoding`` as in :func:`encode_sparse`."""
    data = encode_sparse(state_dict, metadata=metadata, encoding=encoding)
    atomic_write_bytes(path, data)
    return len(data)


def _decode_tensor(name: str, info: Any, arrays: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    def bad(why: str) -> ModelFileError:
        return ModelFileError(f"{source}: tensor {name!r}: {why}")

    if not isinstance(info, dict) or info.get("encoding") not in _ENCODINGS:
        raise bad("missing or unknown encoding")
    shape, enc = info.get("shape"), info["encoding"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise bad("bad shape")
    dtype = _dtype_from(info.get("dtype"), source)
    numel = math.prod(shape)
    if enc == "dense":
        t = arrays[name]
        if t.dtype != dtype or list(t.shape) != shape:
            raise bad(f"stored {_dtype_name(t.dtype)}{list(t.shape)}, expected {info.get('dtype')}{shape}")
        return t
    values = arrays[f"{name}{_SEP}values"]
    count = info.get("count")
    if values.dtype != dtype or values.dim() != 1 or values.numel() != count:
        raise bad("values do not match the metadata")
    if enc == "bitmask":
        packed = arrays[f"{name}{_SEP}{_ARRAY_SUFFIX[enc]}"]
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
            raise bad("bad bitmask")
        bits = np.unpackbits(packed.numpy(), bitorder="little")
        if bits[numel:].any():
            raise bad("bitmask has bits past the end")
        idx = np.flatnonzero(bits[:numel])
    elif enc == "index":
        index = arrays[f"{name}{_SEP}index"]
        if index.dim() != 1 or _dtype_name(index.dtype) != _index_dtype(numel).name:
            raise bad("bad index array")
        idx = index.numpy().astype(np.int64)
        if idx.size and (np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= numel):
            raise bad("indices not increasing or out of range")
    else:
        delta = arrays[f"{name}{_SEP}delta"]
        if delta.dtype != torch.uint8 or delta.dim() != 1:
            raise bad("bad delta array")
        try:
            gaps = _varint_decode(delta.numpy())
        except ValueError as e:
            raise bad(str(e)) from None
        if gaps.size and int(gaps.max()) >= numel:
            raise bad("index out of range")
        idx = np.cumsum(gaps.astype(np.int64) + 1) - 1
        if idx.size and idx[-1] >= numel:
            raise bad("index out of range")
    if idx.size != values.numel():
        raise bad(f"{idx.size} positions for {values.numel()} values")
    flat = torch.zeros(numel, dtype=dtype)
    if idx.size:
        flat[torch.from_numpy(idx.astype(np.int64))] = values
    return flat.reshape(shape)


def decode_sparse(data: bytes, source: str = "<bytes>") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (in saved order) and the caller's metadata of a sparse-format blob."""
    arrays, meta = _parse(data, source)
    raw = meta.pop(SPARSE_KEY, None)
    if raw is None:
        raise ModelFileError(f"{source}: not an obdprune sparse file (no {SPARSE_KEY!r} metadata)")
    try:
        header = json.loads(raw)
    except ValueError:
        raise ModelFileError(f"{source}: corrupt {SPARSE_KEY!r} metadata") from None
    if not isinstance(header, dict) or header.get("format") != SPARSE_FORMAT:
        raise ModelFileError(f"{source}: not an obdprune sparse file")
    if header.get("version") != SPARSE_VERSION:
        raise ModelFileError(f"{source}: sparse format version {header.get('version')!r} not supported")
    table = header.get("tensors")
    if not isinstance(table, dict):
        raise ModelFileError(f"{source}: corrupt {SPARSE_KEY!r} metadata")
    expected: set[str] = set()
    for name, info in table.items():
        enc = info.get("encoding") if isinstance(info, dict) else None
        if enc == "dense":
            expected.add(name)
        elif enc in _ENCODINGS:
            expected |= {f"{name}{_SEP}values", f"{name}{_SEP}{_ARRAY_SUFFIX[enc]}"}
        else:
            raise ModelFileError(f"{source}: tensor {name!r}: missing or unknown encoding")
    if set(arrays) != expected:
        extra, missing = sorted(set(arrays) - expected), sorted(expected - set(arrays))
        raise ModelFileError(f"{source}: stored arrays do not match the metadata (missing {missing[:3]}, extra {extra[:3]})")
    if _digest(arrays) != header.get("sha256"):
        raise ModelFileError(f"{source}: checksum mismatch: the file is corrupted or was altered")
    tensors = {name: _decode_tensor(name, info, arrays, source) for name, info in table.items()}
    return tensors, meta


def load_sparse(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict saved by :func:`save_sparse`, bitwise identical."""
    return decode_sparse(_read(path), str(path))[0]


def read_sparse_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The caller's metadata saved by :func:`save_sparse`."""
    return decode_sparse(_read(path), str(path))[1]


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def _outputs_list(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs_list(o)]
    if isinstance(out, Mapping):
        return [t for o in out.values() for t in _outputs_list(o)]
    raise ObdpruneError(f"cannot export a model returning {type(out).__name__} to ONNX")


def _onnxruntime_outputs(path: str | os.PathLike, inputs: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    """Run an ONNX file on one input array with onnxruntime (CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return list(sess.run(None, {sess.get_inputs()[0].name: inputs}))


def _max_abs_diff(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    if len(expected) != len(got):
        return math.inf
    worst = 0.0
    for e, g in zip(expected, got):
        if e.shape != g.shape:
            return math.inf
        if e.size == 0:
            continue
        d = np.abs(e.astype(np.float64) - g.astype(np.float64))
        if np.isnan(d).any():
            if not np.array_equal(np.isnan(e), np.isnan(g)):
                return math.inf
            d = np.nan_to_num(d, nan=0.0)
        worst = max(worst, float(d.max()))
    return worst


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    check_inputs: torch.Tensor,
    opset: int = 17,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export ``model`` (eval mode) to ONNX with a dynamic batch axis, checked.

    Uses the TorchScript exporter (``dynamo=False``; the dynamo exporter needs onnxscript), then
    ``onnx.checker.check_model``, then runs onnxruntime on ``check_inputs`` (real inputs, any
    batch size) and compares with PyTorch. If the max abs difference exceeds ``atol`` nothing is
    written and ObdpruneError reports the difference. The file is written atomically.

    Returns ``{"path": str, "max_abs_diff": float, "bytes": int}``.
    """
    import onnx

    if not isinstance(model, nn.Module):
        raise UsageError("export_onnx expects an nn.Module")
    if not isinstance(example_input, torch.Tensor) or not isinstance(check_inputs, torch.Tensor):
        raise UsageError("example_input and check_inputs must be tensors")
    path = Path(path)
    was_training = model.training
    model.eval()
    result: dict[str, Any] = {}
    try:
        with torch.no_grad():
            expected = [t.detach().cpu().numpy() for t in _outputs_list(model(check_inputs))]
        out_names = ["output"] if len(expected) == 1 else [f"output{i}" for i in range(len(expected))]
        axes = {n: {0: "batch"} for n in ["input", *out_names]}

        def write(tmp: Path) -> None:
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        model,
                        (example_input,),
                        str(tmp),
                        dynamo=False,
                        opset_version=opset,
                        input_names=["input"],
                        output_names=out_names,
                        dynamic_axes=axes,
                        do_constant_folding=True,
                    )
                onnx.checker.check_model(onnx.load(str(tmp)))
            except OSError:
                raise  # disk full, permission denied, ...: atomic_write reports it as an OutputError
            except Exception as e:
                msg = " ".join(str(e).split())[:300]
                raise ObdpruneError(f"ONNX export to {path} failed: {type(e).__name__}: {msg}") from None
            got = _onnxruntime_outputs(tmp, check_inputs.detach().cpu().numpy())
            diff = _max_abs_diff(expected, got)
            if not diff <= atol:
                raise ObdpruneError(
                    f"ONNX export to {path} does not match PyTorch: max abs diff {diff:.3g} > atol {atol:g}; file not written"
                )
            result["max_abs_diff"] = diff

        atomic_write(path, write)
    finally:
        model.train(was_training)
    return {"path": str(path), "max_abs_diff": result["max_abs_diff"], "bytes": path.stat().st_size}
