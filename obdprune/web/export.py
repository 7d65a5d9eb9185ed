"""A pruned run and its dense parent as a static web page that runs both models in the browser.

The folder :func:`export_web` writes works offline (no CDN) from any static server:

``index.html``, ``app.js``, ``style.css``  the page (copied from ``obdprune/web/page``);
``ort/``                                  onnxruntime-web's wasm backend, copied from the local npm cache;
``dense.onnx``, ``pruned.onnx``           the dense parent and the compacted pruned model, each checked
                                          against PyTorch with onnxruntime (:func:`obdprune.export.export_onnx`);
``floor.onnx``                            an identity model: the fixed cost of one call in the browser;
``samples.bin``                           the sample test images as little-endian float32 (N, C, H, W),
                                          normalized exactly as the models saw them in training;
``web.json``                              shapes, class names, labels, normalization, file sizes, accuracies.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from obdprune.atomic import atomic_folder
from obdprune.compact import compact
from obdprune.errors import ModelFileError, UsageError
from obdprune.export import export_onnx
from obdprune.measure import count_macs, count_weights
from obdprune.runfile import LoadedRun, load_run

__all__ = ["ORT_WEB_VERSION", "ORT_WEB_FILES", "WEB_MANIFEST", "ort_web_prefix", "ort_web_dist", "export_web",
           "find_dense_parent", "read_web_manifest", "read_samples"]

ORT_WEB_VERSION = "1.30.0"
# The wasm backend only: the ES module, its Emscripten glue (which also starts the worker threads) and the
# SIMD + threads binary. The WebGPU, WebGL and JSEP builds are not needed.
ORT_WEB_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
WEB_MANIFEST = "web.json"
PAGE_FILES = ("index.html", "app.js", "style.css")
WEB_FORMAT = "obdprune-web"


def ort_web_prefix() -> Path:
    """The npm prefix ``scripts/setup.sh`` installs onnxruntime-web into: ``$OBDPRUNE_NPM_CACHE`` (default
    ``~/.cache/obdprune/npm``) / ``onnxruntime-web-<version>``."""
    root = os.environ.get("OBDPRUNE_NPM_CACHE") or Path.home() / ".cache" / "obdprune" / "npm"
    return Path(root) / f"onnxruntime-web-{ORT_WEB_VERSION}"


def ort_web_dist() -> Path:
    """The ``dist`` folder of the pinned onnxruntime-web; UsageError with the install command if it is missing."""
    dist = ort_web_prefix() / "node_modules" / "onnxruntime-web" / "dist"
    missing = [f for f in ORT_WEB_FILES if not (dist / f).is_file()]
    if missing:
        raise UsageError(
            f"onnxruntime-web {ORT_WEB_VERSION} is not in {dist} (missing {missing[0]}); run scripts/setup.sh, or: "
            f"npm install --prefix {ort_web_prefix()} --ignore-scripts onnxruntime-web@{ORT_WEB_VERSION}")
    return dist


def find_dense_parent(run: LoadedRun, dense: str | Path | LoadedRun | None = None) -> LoadedRun:
    """The dense run a pruned run came from: ``dense`` if given, else the path its manifest records.

    The two must describe the same architecture (model name, input shape, class count) and dataset.
    """
    if run.manifest.get("kind") == "dense":
        raise UsageError(f"{run.path} is a dense run; export a pruned run, and its dense parent is shown beside it")
    if dense is None:
        recorded = (run.manifest.get("parent") or {}).get("path")
        if not isinstance(recorded, str):
            raise UsageError(f"{run.path}: the manifest records no dense parent; give it with --dense RUN0")
        if not Path(recorded).exists():
            raise UsageError(f"{run.path}: its dense parent {recorded} no longer exists; give it with --dense RUN0")
        dense = recorded
    parent = dense if isinstance(dense, LoadedRun) else load_run(dense)
    mine, theirs = run.manifest["model"], parent.manifest["model"]
    for key in ("name", "input_shape", "num_classes"):
        if mine.get(key) != theirs.get(key):
            raise UsageError(f"dense run {parent.path} is not the parent of {run.path}: model {key} "
                             f"{theirs.get(key)!r} != {mine.get(key)!r}")
    if (run.manifest.get("dataset") or {}).get("name") != (parent.manifest.get("dataset") or {}).get("name"):
        raise UsageError(f"dense run {parent.path} was trained on another dataset than {run.path}")
    return parent


def _identity_onnx(input_shape: tuple[int, ...], opset: int = 17) -> bytes:
    """An ONNX model whose output is its input: what one inference call costs without any work."""
    import onnx
    from onnx import TensorProto, helper

    dims = ["batch", *input_shape]
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "floor",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)])
    # IR version 8 goes with opset 17 (what torch.onnx writes); the onnx package's default may be newer
    # than onnxruntime-web reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _sample_indices(n_test: int, samples: int) -> torch.Tensor:
    """A fixed random draw of test images (the test split may be ordered by class)."""
    return torch.randperm(n_test, generator=torch.Generator().manual_seed(0))[:samples].sort().values


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / WEB_MANIFEST).exists())):
        raise UsageError(f"--out {out} exists and is not an exported web page; choose a new or empty folder")


def export_web(run: str | Path | LoadedRun, out: str | Path, *, dense: str | Path | LoadedRun | None = None,
               samples: int = 64, data_dir: str | None = None, check_samples: int = 256) -> dict[str, Any]:
    """Write a pruned run and its dense parent as a static page that runs both in the browser (wasm).

    ``run`` is a pruned run; ``dense`` its parent (default: the path recorded in its manifest). The
    pruned model is compacted first; both ONNX files are checked against PyTorch on ``check_samples``
    test images. ``samples`` test images (a fixed random draw) go into the page with their labels. The
    folder appears whole or not at all. Returns the ``web.json`` contents plus ``path``.

    Example:
        >>> info = export_web("runs/fast", "web/fast")               # doctest: +SKIP
        >>> info["models"]["pruned"]["bytes"] / info["models"]["dense"]["bytes"]  # doctest: +SKIP
        0.21
    """
    from obdprune.study import load_run_data

    if not isinstance(samples, int) or not 1 <= samples <= 1024:
        raise UsageError(f"samples must be an integer in [1, 1024], got {samples!r}")
    out = Path(out)
    _check_replaceable(out)
    dist = ort_web_dist()
    pruned = run if isinstance(run, LoadedRun) else load_run(run)
    parent = find_dense_parent(pruned, dense)
    data = load_run_data(pruned, data_dir)
    shape = tuple(int(s) for s in data.input_shape)
    pick = _sample_indices(len(data.test), samples)
    x, y = data.test.x[pick].contiguous(), data.test.y[pick]
    check = data.test.x[:check_samples]
    example = check[:2].clone()
    models = {"dense": parent.model.eval(), "pruned": compact(pruned.model.eval(), example).eval()}
    accuracy = {"dense": parent.manifest["metrics"]["test_accuracy"], "pruned": pruned.manifest["metrics"]["test_accuracy"]}
    page = Path(__file__).with_name("page")
    info: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        entries = {}
        for label, model in models.items():
            res = export_onnx(model, example, tmp / f"{label}.onnx", check_inputs=check)
            with torch.no_grad():
                logits = model(x)
            entries[label] = {"file": f"{label}.onnx", "bytes": res["bytes"], "max_abs_diff": res["max_abs_diff"],
                              "weights": count_weights(model), "macs": count_macs(model, example[:1]),
                              "test_accuracy": accuracy[label],
                              "sample_accuracy": float((logits.argmax(1) == y).float().mean())}
        (tmp / "floor.onnx").write_bytes(_identity_onnx(shape))
        (tmp / "samples.bin").write_bytes(x.numpy().astype("<f4").tobytes())
        (tmp / "ort").mkdir()
        for f in ORT_WEB_FILES:
            shutil.copyfile(dist / f, tmp / "ort" / f)
        for f in PAGE_FILES:
            shutil.copyfile(page / f, tmp / f)
        ds = pruned.manifest["dataset"]
        info.update({
            "format": WEB_FORMAT,
            "model": pruned.manifest["model"]["name"],
            "dataset": data.name,
            "input_shape": list(shape),
            "classes": list(data.classes),
            "mean": [float(v) for v in data.mean],
            "std": [float(v) for v in data.std],
            "samples": {"file": "samples.bin", "count": int(len(y)), "dtype": "float32-le",
                        "labels": [int(v) for v in y], "test_indices": [int(i) for i in pick]},
            "models": entries,
            "floor": {"file": "floor.onnx"},
            "runs": {"dense": str(parent.path), "pruned": str(pruned.path)},
            "prune": {k: (pruned.manifest.get("prune") or {}).get(k) for k in ("method", "granularity", "budget")},
            "data_split": {k: ds.get(k) for k in ("train_limit", "test_limit", "val_fraction")},
            "onnxruntime_web": ORT_WEB_VERSION,
        })
        (tmp / WEB_MANIFEST).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        for f in tmp.glob("*.onnx"):  # written through temp files, which are private: a web server must read them
            f.chmod(0o644)

    try:
        atomic_folder(out, write)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    return info | {"path": str(out)}


def read_web_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``web.json`` of an exported page; UsageError if ``folder`` is not one."""
    path = Path(folder) / WEB_MANIFEST
    if not path.is_file():
        raise UsageError(f"{folder} is not a page written by 'obdprune export --format web' ({WEB_MANIFEST} is missing)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != WEB_FORMAT:
        raise ModelFileError(f"{path}: not an obdprune web manifest")
    return info


def read_samples(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The sample images (N, C, H, W) float32 and labels (N,) of an exported page."""
    info = read_web_manifest(folder)
    x = np.fromfile(Path(folder) / info["samples"]["file"], dtype="<f4")
    labels = np.asarray(info["samples"]["labels"], dtype=np.int64)
    return x.reshape(len(labels), *info["input_shape"]), labels
