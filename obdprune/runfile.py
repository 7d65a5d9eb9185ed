"""Run folders: the model as safetensors plus a JSON manifest. No pickles, ever.

A run folder holds ``model.safetensors`` (the state_dict; the manifest is embedded in its metadata too,
so the single file is self-describing), ``masks.safetensors`` (uint8 keep-masks, for pruned runs) and
``manifest.json`` (model, dataset, seed, versions, configs, masks summary, metrics, file hashes).
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import obdprune
from obdprune.atomic import atomic_folder, atomic_write, atomic_write_json, make_folder
from obdprune.errors import ModelFileError, UsageError
from obdprune.masking import MaskSet
from obdprune.models import is_user_spec, rebuild_model

__all__ = ["save_run", "load_run", "LoadedRun", "PICKLE_SUFFIXES", "versions", "refuse_pickle", "check_replaceable"]

MODEL_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "obdprune-run"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar")


def versions() -> dict[str, str]:
    return {"obdprune": obdprune.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_run(folder: str | Path, model: nn.Module, manifest: dict[str, Any], masks: MaskSet | None = None) -> Path:
    """Write ``model`` (and ``masks``) with ``manifest`` as the run folder ``folder``, all or nothing.

    The files are written into a hidden sibling folder that replaces ``folder`` only when complete, so
    a failure or a kill leaves either the previous run folder or none, never a partial one. The manifest
    must hold ``model`` = {name, input_shape, num_classes}; versions, mask summaries and file hashes are
    added here. Returns the folder.
    """
    folder = Path(folder)
    check_replaceable(folder)
    make_folder(folder.parent)
    manifest = dict(manifest)
    manifest.update({"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions()})
    if masks is not None:
        manifest["masks"] = {n: {"shape": list(m.shape), "kept": int(m.sum())} for n, m in masks.items()}
    else:
        manifest["masks"] = None
    embedded = {k: v for k, v in manifest.items() if k != "files"}
    meta = {"format": FORMAT, "manifest": json.dumps(embedded, sort_keys=True)}

    def write(tmp: Path) -> None:
        _save_tensors(tmp / MODEL_FILE, model.state_dict(), meta)
        files = {MODEL_FILE: _sha256(tmp / MODEL_FILE)}
        if masks is not None:
            _save_tensors(tmp / MASKS_FILE, masks.state_tensors(), {"format": FORMAT})
            files[MASKS_FILE] = _sha256(tmp / MASKS_FILE)
        manifest["files"] = files
        atomic_write_json(tmp / MANIFEST_FILE, manifest)

    atomic_folder(folder, write)
    return folder


def check_replaceable(folder: Path) -> None:
    """Refuse (UsageError) to write a run folder over a file, or over a non-empty folder that is not a run folder.

    A folder this process has claimed (:class:`obdprune.outputs.OutputTarget`) was checked by that claim,
    which may allow replacing any obdprune output.
    """
    from obdprune.atomic import held_lock
    from obdprune.outputs import OutputKind, existing_output

    what = existing_output(folder, OutputKind.RUN)
    is_run = (folder / MANIFEST_FILE).exists() or (folder / MODEL_FILE).exists()
    if what is not None and not is_run and held_lock(folder) is None:
        raise UsageError(f"{folder} holds {what}, not a run folder; choose a new or empty folder")


class LoadedRun:
    """A model rebuilt from a run folder or model file, with its masks and manifest."""

    def __init__(self, model: nn.Module, manifest: dict, masks: MaskSet | None, path: Path):
        self.model, self.manifest, self.masks, self.path = model, manifest, masks, path


def _is_safetensors(head: bytes, size: int) -> bool:
    """The first 9 bytes of a safetensors file: its JSON header's length (u64, little-endian), then ``{``."""
    n = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def refuse_pickle(path: Path) -> None:
    """Refuse pickle-based checkpoints: loading them can execute arbitrary code."""
    looks_pickle = path.suffix.lower() in PICKLE_SUFFIXES
    if not looks_pickle and path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(9)
        # pickle protocol >= 2, or torch's zip container; a safetensors header length may start with 0x80 too
        looks_pickle = (head[:1] == b"\x80" or head[:2] == b"PK") and not _is_safetensors(head, path.stat().st_size)
    if looks_pickle:
        raise ModelFileError(
            f"{path} is a pickle-based PyTorch file, which can run arbitrary code when loaded; obdprune "
            f"never unpickles. If you trust it and it holds a state_dict of a known model, convert it: "
            f"obdprune import-torch {path} --model NAME --dataset D --out RUN")


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            return {k: fh.get_tensor(k) for k in fh.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None


def load_run(path: str | Path, *, verify_hashes: bool = True) -> LoadedRun:
    """Load a run folder, or a ``model.safetensors`` written by obdprune, into a model.

    Validates the manifest (known model, shapes, masks binary and consistent with the weights and the
    recorded counts) and raises ModelFileError with one clear line on any problem.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if path.is_dir():
        folder = path
        model_path = folder / MODEL_FILE
        manifest_path = folder / MANIFEST_FILE
        if not model_path.exists():
            refuse_any_pickle_in(folder)
            raise ModelFileError(f"{folder} is not an obdprune run folder: {MODEL_FILE} is missing")
    else:
        refuse_pickle(path)
        model_path, folder = path, path.parent
        manifest_path = None
    tensors, meta = _read_tensors(model_path)
    if manifest_path is not None and manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{manifest_path} is not valid JSON ({e})") from None
    elif "manifest" in meta:
        try:
            manifest = json.loads(meta["manifest"])
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{model_path}: embedded manifest is not valid JSON ({e})") from None
    else:
        raise ModelFileError(f"{model_path} carries no obdprune manifest and no {MANIFEST_FILE} is beside it")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFileError(f"{manifest_path or model_path}: not an obdprune manifest (format must be {FORMAT!r})")
    if verify_hashes and manifest_path is not None and isinstance(manifest.get("files"), dict):
        for fname, digest in manifest["files"].items():
            if fname not in (MODEL_FILE, MASKS_FILE) or not isinstance(digest, str):
                raise ModelFileError(f"{manifest_path}: 'files' may only record sha256 strings of {MODEL_FILE} and "
                                     f"{MASKS_FILE}, found {fname!r}")
            fpath = folder / fname
            if fpath.exists() and _sha256(fpath) != digest:
                raise ModelFileError(f"{fpath} does not match the sha256 recorded in {manifest_path}; it was modified")

    if manifest.get("compacted") is True:
        model = _build_compacted(manifest, model_path, tensors)
    else:
        model = _build_from_manifest(manifest, model_path, tensors)
        _load_state(model, tensors, model_path)
    masks = None
    if manifest.get("masks"):
        masks = _load_masks(folder / MASKS_FILE, manifest["masks"], model)
    return LoadedRun(model, manifest, masks, path)


def refuse_any_pickle_in(folder: Path) -> None:
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in PICKLE_SUFFIXES:
            refuse_pickle(p)


def _build_from_manifest(manifest: dict, where: Path, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Build the manifest's model; a reference model's shapes are checked against ``tensors`` on the meta
    device first, so a tampered manifest cannot make us allocate more than the file itself holds. A user
    model is built directly: its factory may compute with tensors, which meta tensors cannot."""
    spec = manifest.get("model")
    user_code = isinstance(spec, dict) and is_user_spec(spec.get("name"))
    try:
        if user_code:
            model = rebuild_model(spec)
        else:
            with torch.device("meta"):
                skeleton = rebuild_model(spec)
    except ModelFileError as e:
        raise ModelFileError(f"{where}: {e}") from None
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise ModelFileError(f"{where}: manifest model description is invalid ({e})") from None
    if user_code:
        _check_names_and_shapes(model.state_dict(), tensors, where)
        return model
    _check_names_and_shapes(skeleton.state_dict(), tensors, where)
    return rebuild_model(spec)


def _build_compacted(manifest: dict, where: Path, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A compacted model: the manifest's architecture with its layers resized to the stored shapes."""
    from obdprune.compact import resize_to_state_dict

    spec = manifest.get("model")
    try:
        dense = rebuild_model(spec)
    except ModelFileError as e:
        raise ModelFileError(f"{where}: {e}") from None
    shape = tuple(int(s) for s in spec["input_shape"])
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelFileError(f"{where}: tensor {k!r} contains NaN or inf")
    try:
        return resize_to_state_dict(dense, tensors, example_inputs=torch.zeros(1, *shape))
    except ModelFileError as e:
        raise ModelFileError(f"{where}: {e}") from None


def _check_names_and_shapes(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{where}: tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise ModelFileError(f"{where}: tensor {k!r} has shape {tuple(tensors[k].shape)}, model expects {tuple(v.shape)}")


def _load_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    _check_names_and_shapes(expected, tensors, where)
    for k, v in expected.items():
        if v.is_floating_point() and not tensors[k].is_floating_point():
            raise ModelFileError(f"{where}: tensor {k!r} has dtype {tensors[k].dtype}, model expects floating point")
        if v.is_floating_point() and not torch.isfinite(tensors[k]).all():
            raise ModelFileError(f"{where}: tensor {k!r} contains NaN or inf")
    model.load_state_dict({k: t.to(expected[k].dtype) for k, t in tensors.items()})


def _load_masks(path: Path, summary: Any, model: nn.Module) -> MaskSet:
    if not path.exists():
        raise ModelFileError(f"{path} is missing but the manifest lists masks")
    if not isinstance(summary, dict):
        raise ModelFileError(f"{path}: manifest 'masks' must map parameter names to shapes and counts")
    tensors, _ = _read_tensors(path)
    weights = dict(model.named_parameters())  # channel pruning masks biases and BatchNorm parameters too
    masks = {}
    if set(tensors) != set(summary):
        raise ModelFileError(f"{path}: mask names differ from the manifest's")
    for name, t in tensors.items():
        if name not in weights:
            raise ModelFileError(f"{path}: mask for {name!r}, which is not a parameter of the model")
        if not isinstance(summary[name], dict):
            raise ModelFileError(f"{path}: manifest entry for mask {name!r} must hold its shape and kept count")
        w = weights[name]
        if tuple(t.shape) != tuple(w.shape) or list(t.shape) != summary[name].get("shape"):
            raise ModelFileError(f"{path}: mask {name!r} has shape {tuple(t.shape)}, weight has {tuple(w.shape)}, "
                                 f"manifest records {summary[name].get('shape')!r}")
        if t.is_floating_point() or not bool(((t == 0) | (t == 1)).all()):
            raise ModelFileError(f"{path}: mask {name!r} holds values other than 0 and 1")
        m = t != 0
        if int(m.sum()) != summary[name].get("kept"):
            raise ModelFileError(f"{path}: mask {name!r} keeps {int(m.sum())} weights, the manifest says {summary[name].get('kept')}")
        if bool((w.detach()[~m] != 0).any()):
            raise ModelFileError(f"{path}: weights of {name!r} are nonzero where the mask prunes them")
        masks[name] = m
    return MaskSet(masks)
