"""Convert a trusted PyTorch checkpoint (a state_dict of a known architecture) into a run folder.

This is the only place obdprune opens a pickle-based file, and only with
``torch.load(weights_only=True, map_location="cpu")``: its unpickler builds tensors and plain containers
and refuses every other object, so a malicious file cannot run code; it is refused with one clear error.
"""
from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from obdprune.data import Dataset
from obdprune.errors import ModelFileError, UsageError
from obdprune.models import build_model, model_spec
from obdprune.runfile import save_run

__all__ = ["read_state_dict", "load_into", "import_torch"]

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")  # what training scripts commonly save around it
PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict saved with ``torch.save``: plain, or under "state_dict"/"model"/"model_state_dict".

    "module."/"_orig_mod." prefixes (DDP, torch.compile) are stripped. Raises ModelFileError for files that
    are junk, hold anything but tensors and plain containers, or hold no state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist or is not a file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the one error line says enough
            warnings.simplefilter("ignore")
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise ModelFileError(
                f"{path} holds objects other than tensors and plain containers; torch.load(weights_only=True) "
                f"refused to build them, as they could run code. Save a plain state_dict instead: "
                f"torch.save(model.state_dict(), FILE)") from None
        raise ModelFileError(f"{path} is not a PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - the file is untrusted; whatever torch.load trips over is a bad file
        raise ModelFileError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelFileError(f"{path} holds {type(obj).__name__ if obj else 'nothing'}, not a state_dict (a dict "
                             f"of parameter names to tensors)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ModelFileError(f"{path}: not a state_dict: entries {bad[:3]} are not named tensors")
    sd = dict(obj)
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``sd`` into ``model`` after checking names, shapes and finiteness; ModelFileError otherwise."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{where}: the state_dict does not fit the model: missing {missing[:4]}"
                             f"{' …' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                             f"{' …' if len(unexpected) > 4 else ''}")
    for k, v in expected.items():
        t = sd[k]
        if tuple(t.shape) != tuple(v.shape):
            raise ModelFileError(f"{where}: {k!r} has shape {tuple(t.shape)}, the model expects {tuple(v.shape)}")
        if v.is_floating_point() and not t.is_floating_point():
            raise ModelFileError(f"{where}: {k!r} has dtype {t.dtype}, the model expects floating point")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"{where}: {k!r} contains NaN or inf")
    model.load_state_dict({k: sd[k].to(expected[k].dtype) for k in expected})


def import_torch(sd: Mapping[str, torch.Tensor], source: str | Path, model_name: str, data: Dataset, spec: dict,
                 *, out: str | Path, device: str = "cpu") -> dict:
    """Build ``model_name`` for ``data``, load ``sd`` (read from ``source``), evaluate, save a run folder.

    Returns the manifest written to ``out``.
    """
    from obdprune.study import dataset_manifest_entry, run_metrics

    model = build_model(model_name, data.input_shape, data.num_classes)
    where = f"{source} as {model_name} for {'x'.join(map(str, data.input_shape))} images, {data.num_classes} classes"
    load_into(model, sd, where)
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    manifest = {
        "kind": "imported",
        "model": model_spec(model_name, data.input_shape, data.num_classes),
        "dataset": dataset_manifest_entry(spec, data),
        "seed": None,
        "device": str(device),
        "source": {"file": str(Path(source).resolve()), "sha256": digest},
        "metrics": run_metrics(model, data, device),
    }
    save_run(out, model.cpu(), manifest)
    return manifest
