"""From masks to real gains: compact, measure side by side, and export runs.

Masks alone save neither time nor memory. This module compacts each pruned model (physically removes
dead units), writes the sparse on-disk format and a checked ONNX file, counts weights and MACs, and
times dense and pruned models side by side in the same process (PyTorch and onnxruntime, batch 1 and
256, one thread).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from obdprune.atomic import make_folder
from obdprune.compact import compact
from obdprune.errors import UsageError
from obdprune.export import export_onnx, save_sparse
from obdprune.measure import measure_side_by_side, size_report
from obdprune.runfile import LoadedRun, save_run

__all__ = ["measure_models", "measure_study", "export_run", "speed_table"]


def measure_models(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    check_inputs: torch.Tensor,
    onnx_dir: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 256),
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 1,
) -> dict[str, dict[str, Any]]:
    """Compact every model, export it to checked ONNX, and time all of them side by side.

    ``models`` maps a label to a (masked) model; ``check_inputs`` (N, C, H, W) are real inputs the
    ONNX files are verified on. Returns ``{label: size_report | {"latency_ms": {backend: {batch: ms}}}}``.
    """
    example = check_inputs[:2].clone()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(onnx_dir) if onnx_dir is not None else Path(tmp)
        make_folder(folder)
        compacted, paths, out = {}, {}, {}
        for label, model in models.items():
            model = model.eval()
            small = compact(model, example).eval()
            path = folder / f"{label}.onnx"
            info = export_onnx(small, example, path, check_inputs=check_inputs)
            compacted[label], paths[label] = small, path
            out[label] = size_report(model, small, example, info["bytes"]) | {"onnx_max_abs_diff": info["max_abs_diff"]}
        lat = measure_side_by_side(compacted, input_shape, batch_sizes=batch_sizes, repeats=repeats, warmup=warmup,
                                   threads=threads, onnx_paths=paths)
    for label in out:
        out[label]["latency_ms"] = lat[label]
    return out


def speed_table(measurements: Mapping[str, Mapping[str, Any]], dense_label: str = "dense",
                accuracies: Mapping[str, float] | None = None) -> str:
    """Markdown table: sizes, MACs and latency of each model as ratios to the dense one."""
    d = measurements[dense_label]
    cols = [(b, bs) for b in d["latency_ms"] for bs in sorted(d["latency_ms"][b], key=int)]
    short = {"torch": "torch", "onnxruntime": "ORT"}
    head = ("| model | test acc | weights after compaction | MACs after compaction | sparse file | compacted ONNX | "
            + " | ".join(f"{short.get(b, b)} b{bs}" for b, bs in cols) + " |")
    lines = [head, "|---" * (6 + len(cols)) + "|"]
    for label, m in measurements.items():
        def ratio(key: str) -> str:
            return f"{m[key] / max(d[key], 1):.3f}×"

        def lat(backend: str, bs: str) -> str:
            t, t0 = m["latency_ms"][backend][bs], d["latency_ms"][backend][bs]
            return f"{t:.3f} ms ({t / t0:.2f}×)"

        acc = f"{100 * accuracies[label]:.2f}%" if accuracies and label in accuracies else "–"
        lines.append(
            f"| {label} | {acc} | {m['weights_after_compaction']:,} ({ratio('weights_after_compaction')}) | "
            f"{m['macs_after_compaction']:,} ({ratio('macs_after_compaction')}) | "
            f"{m['bytes_sparse']:,} B ({m['bytes_sparse'] / d['bytes_dense_fp32']:.3f}×) | "
            f"{m['bytes_onnx_compacted']:,} B ({ratio('bytes_onnx_compacted')}) | "
            + " | ".join(lat(b, bs) for b, bs in cols) + " |")
    lines += ["", "Ratios are to the dense model, measured side by side in the same process (median of repeats, "
              "one thread). File ratios are to the dense fp32 safetensors / dense ONNX."]
    if all("browser" in m for m in measurements.values()):
        db = d["browser"]
        lines += ["", "| model | browser download | browser b1 | browser b64 |", "|---|---|---|---|"]
        for label, m in measurements.items():
            b = m["browser"]
            lines.append(f"| {label} | {b['bytes']:,} B ({b['bytes'] / db['bytes']:.3f}×) | "
                         f"{b['ms_b1']:.3f} ms ({b['ms_b1'] / db['ms_b1']:.2f}×) | "
                         f"{b['ms_b64']:.3f} ms ({b['ms_b64'] / db['ms_b64']:.2f}×) |")
        lines += ["", "In the browser: onnxruntime-web (WebAssembly) in headless Chromium, both models on one page; "
                  "the dense row is the run's dense parent."]
    return "\n".join(lines)


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


def measure_study(summary: dict[str, Any], dense_model: nn.Module, check_inputs: torch.Tensor, out: str | Path, *,
                  repeats: int = 30, threads: int = 1, batch_sizes: Sequence[int] = (1, 256)) -> dict[str, Any]:
    """Add size, MAC and latency fields to ``summary['dense']`` and every result (loaded from its run
    folder), measured side by side; compacted ONNX files go to ``out/onnx/<label>.onnx``."""
    from obdprune.runfile import load_run

    models: dict[str, nn.Module] = {"dense": dense_model}
    labels = []
    for r in summary["results"]:
        label = Path(r["path"]).name
        labels.append(label)
        models[label] = load_run(r["path"]).model
    shape = tuple(check_inputs.shape[1:])
    m = measure_models(models, shape, check_inputs=check_inputs, onnx_dir=Path(out) / "onnx",
                       batch_sizes=batch_sizes, repeats=repeats, threads=threads)
    summary["dense"].update(m["dense"])
    accuracies = {"dense": summary["dense"]["test_accuracy"]}
    for r, label in zip(summary["results"], labels):
        r.update(m[label])
        accuracies[label] = r["test_accuracy"]
    summary["speed_table"] = speed_table(m, accuracies=accuracies)
    return summary
