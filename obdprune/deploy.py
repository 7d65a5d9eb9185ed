"""Export a run folder's model as ONNX, a run folder of safetensors, or the sparse format.

Measuring lives in :mod:`obdprune.measure`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from obdprune.compact import compact
from obdprune.errors import UsageError
from obdprune.export import export_onnx, save_sparse
from obdprune.runfile import LoadedRun, save_run

__all__ = ["export_run"]


def export_run(run: LoadedRun, fmt: str, out: str | Path, *, check_inputs: torch.Tensor,
               compact_model: bool = False) -> dict[str, Any]:
    """Write ``run``'s model as ``onnx`` (checked with onnxruntime on ``check_inputs``), ``safetensors``
    (a run folder; compacted models reload through the manifest) or ``sparse`` (indices + values)."""
    model = run.model.eval()
    example = check_inputs[:2].clone()
    if compact_model:
        model = compact(model, example).eval()
    out = Path(out)
    if fmt == "onnx":
        info = export_onnx(model, example, out, check_inputs=check_inputs)
        return {"format": "onnx", "path": str(out), "bytes": info["bytes"], "max_abs_diff": info["max_abs_diff"]}
    if fmt == "sparse":
        n = save_sparse({k: v.detach() for k, v in model.state_dict().items()}, out,
                        metadata={"model": run.manifest["model"]["name"]})
        return {"format": "sparse", "path": str(out), "bytes": int(n)}
    if fmt == "safetensors":
        manifest = {k: v for k, v in run.manifest.items() if k not in ("files", "masks", "format", "format_version")}
        manifest["compacted"] = bool(compact_model)
        if compact_model:
            manifest["compacted_shapes"] = {k: list(v.shape) for k, v in model.state_dict().items()}
        save_run(out, model, manifest, masks=None if compact_model else run.masks)
        return {"format": "safetensors", "path": str(out),
                "bytes": sum(p.stat().st_size for p in Path(out).iterdir())}
    raise UsageError(f"unknown export format {fmt!r}; choose one of: onnx, safetensors, sparse")
