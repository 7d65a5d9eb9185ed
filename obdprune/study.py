"""Whole studies: train the dense model, prune it with each method, write runs and reports.

The CLI is a thin layer over these functions; they are also the Python API for scripted studies.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from obdprune.checkpoint import RoundStore, StudyState
from obdprune.data import Dataset, load_dataset
from obdprune.distributed import barrier, broadcast_object, current
from obdprune.errors import DataError, ModelFileError, UsageError
from obdprune.groups import Granularity, unit_analysis
from obdprune.measure import measured_sparsity
from obdprune.methods import Method, PruneConfig, PrunePoint, prune_model
from obdprune.models import build_model, model_spec, rebuild_model
from obdprune.report import write_study_outputs
from obdprune.runfile import LoadedRun, load_run, save_run
from obdprune.train import TrainConfig, evaluate, train

__all__ = ["DataSpec", "load_data", "load_run_data", "dataset_manifest_entry", "run_metrics", "train_dense",
           "prune_dense", "run_compare", "result_label"]


class DataSpec(dict):
    """JSON-able description of a dataset load, stored in manifests so a run can reload its data."""

    @classmethod
    def make(cls, name: str, data_dir: str | None = None, *, val_fraction: float = 0.1,
             train_limit: int | None = None, test_limit: int | None = None,
             image_size: Sequence[int] | None = None) -> "DataSpec":
        """``data_dir`` is recorded as an absolute path, so a run reloads its data from any folder."""
        spec = cls(name=name, data_dir=os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None,
                   val_fraction=val_fraction, train_limit=train_limit, test_limit=test_limit)
        if image_size is not None:
            spec["image_size"] = [int(s) for s in image_size]
        return spec


def load_data(spec: dict, data_dir: str | None = None) -> Dataset:
    """Load the dataset a DataSpec (or a manifest's ``dataset`` entry) describes; ``data_dir`` overrides."""
    size = spec.get("image_size")
    return load_dataset(spec["name"], data_dir or spec.get("data_dir"), val_fraction=spec.get("val_fraction", 0.1),
                        train_limit=spec.get("train_limit"), test_limit=spec.get("test_limit"),
                        image_size=tuple(size) if isinstance(size, list) else size)


def load_run_data(run: LoadedRun, data_dir: str | None = None) -> Dataset:
    """Load the dataset a run was made with (``data_dir`` overrides its folder) and check that it fits the
    run's model: same image shape and class count, else DataError."""
    spec = run.manifest.get("dataset")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ModelFileError(f"{run.path}: the manifest does not say which dataset the run was made with")
    data = load_data(spec, data_dir)
    model = run.manifest["model"]
    want, classes = tuple(int(s) for s in model["input_shape"]), int(model["num_classes"])
    if tuple(data.input_shape) != want or data.num_classes != classes:
        shape = "x".join(map(str, data.input_shape))
        raise DataError(f"{data.source}: images are {shape} with {data.num_classes} classes, but the model of "
                        f"{run.path} expects {'x'.join(map(str, want))} with {classes} classes")
    return data


def dataset_manifest_entry(spec: dict, data: Dataset) -> dict:
    """The ``dataset`` entry of a run manifest: the load ``spec`` (a :class:`DataSpec`) plus what was
    loaded (source, image shape, classes, normalization, split sizes), so the run can reload and check it."""
    return {**spec, "source": data.source, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "classes": list(data.classes), "mean": list(data.mean), "std": list(data.std),
            "pixel_scale": data.pixel_scale,
            "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)}}


def run_metrics(model: nn.Module, data: Dataset, device: str | torch.device = "cpu") -> dict:
    """The ``metrics`` entry of a run manifest: validation and test accuracy and loss of ``model`` on
    ``data`` (counts summed over every rank under torchrun), and its Conv2d/Linear weight count, nonzero
    count and sparsity."""
    world = current()
    val_acc, val_loss = evaluate(model, data.val, device=device, world=world)
    test_acc, test_loss = evaluate(model, data.test, device=device, world=world)
    sparsity, nonzero, total = measured_sparsity(model)
    return {"val_accuracy": val_acc, "test_accuracy": test_acc, "val_loss": val_loss, "test_loss": test_loss,
            "weights": total, "nonzero_weights": nonzero, "sparsity": sparsity}


def train_dense(data: Dataset, spec: dict, model_name: str, cfg: TrainConfig, *, device: str = "cpu",
                progress: bool = True, out: str | Path | None = None) -> tuple[nn.Module, dict]:
    """Build ``model_name`` for ``data`` (model init seeded by ``cfg.seed``), train it, optionally save a run.

    Under torchrun every rank trains its shard (``cfg.batch_size`` is the global batch); rank 0 saves."""
    world = current()
    torch.manual_seed(cfg.seed)
    model = build_model(model_name, data.input_shape, data.num_classes)
    t0 = time.perf_counter()
    history = train(model, data.train, cfg, device=device, progress=progress and world.writer, desc="dense",
                    world=world)
    manifest = {
        "kind": "dense",
        "model": model_spec(model_name, data.input_shape, data.num_classes),
        "dataset": dataset_manifest_entry(spec, data),
        "seed": cfg.seed,
        "device": str(device),
        "distributed": world.to_dict(cfg.batch_size),
        "train": cfg.to_dict(),
        "history": history,
        "seconds": time.perf_counter() - t0,
        "metrics": run_metrics(model, data, device),
    }
    if out is not None and world.writer:
        save_run(out, model.cpu(), manifest)
    barrier(world)
    return model, manifest


def result_label(r: PrunePoint) -> str:
    if r.max_drop is not None:
        return f"{r.method}-maxdrop{r.max_drop:g}"
    return f"{r.method}-s{r.target_sparsity:.4g}"


def round_line(record: dict, dense_val_accuracy: float) -> str:
    """One line for a finished pruning round (a :func:`obdprune.methods.prune_model` round record)."""
    macs = f", {100 * record['macs_removed']:.1f}% of MACs" if "macs_removed" in record else ""
    name = f"{record['method']} {record['path']}" if "path" in record else record["method"]
    return (f"{name} round {record['round']}: {100 * record['sparsity']:.1f}% of weights{macs} removed, "
            f"validation {100 * record['val_accuracy']:.2f}% (dense {100 * dense_val_accuracy:.2f}%)")


def prune_dense(dense: LoadedRun | tuple[nn.Module, dict], data: Dataset, cfg: PruneConfig, *,
                targets: Sequence[float] = (), max_drop: float | None = None, device: str = "cpu",
                progress: bool = True, out_dir: str | Path | None = None,
                on_round: Callable[[dict], None] | None = None, checkpoint: RoundStore | None = None,
                parent_path: str | Path | None = None) -> list[dict]:
    """Prune a dense run with one method; save each result as a run folder under ``out_dir/<label>``.

    ``checkpoint`` makes the pruning path resumable (see :func:`obdprune.methods.prune_model`).
    ``parent_path`` (default: the folder of a LoadedRun ``dense``) is recorded in each result's manifest
    as ``parent.path``, so that the dense baseline can be found again (``export --format web``).

    Returns the results as summary dicts (see :class:`obdprune.methods.PrunePoint`), each with its
    ``path`` when saved.
    """
    model, manifest = (dense.model, dense.manifest) if isinstance(dense, LoadedRun) else dense
    if parent_path is None and isinstance(dense, LoadedRun):
        parent_path = dense.path
    dense_val = manifest["metrics"]["val_accuracy"]
    world = current()
    results = prune_model(model, data, cfg, targets=list(targets), max_drop=max_drop, dense_val_accuracy=dense_val,
                          device=device, progress=progress, on_round=on_round, checkpoint=checkpoint,
                          dense_train=_dense_train(manifest, parent_path) if cfg.lr_rewind else None)
    out = []
    for r in results:
        d = r.to_dict()
        if out_dir is not None and world.writer:
            pruned = rebuild_model(manifest["model"])
            pruned.load_state_dict(r.state_dict)
            path = Path(out_dir) / result_label(r)
            run_manifest = {
                "kind": "pruned",
                "model": manifest["model"],
                "dataset": manifest["dataset"],
                "seed": cfg.seed,
                "device": str(device),
                "distributed": world.to_dict(cfg.finetune.batch_size),
                "parent": {"train": manifest.get("train"), "metrics": manifest["metrics"]}
                          | ({"path": str(Path(parent_path).resolve())} if parent_path is not None else {}),
                "prune": cfg.to_dict(),
                "negative_curvature": cfg.negative_curvature.value,
                "result": d,
                "metrics": {"val_accuracy": r.val_accuracy, "test_accuracy": r.test_accuracy,
                            "weights": r.weights, "nonzero_weights": r.nonzero_weights, "sparsity": r.sparsity},
            }
            save_run(path, pruned, run_manifest, masks=r.masks)
            d["path"] = str(path)
        out.append(d)
    barrier(world)
    return out


def _dense_train(manifest: dict, where: str | Path | None) -> TrainConfig:
    """The dense run's TrainConfig from its manifest (what learning-rate rewinding replays)."""
    if not isinstance(manifest.get("train"), dict):
        raise UsageError(f"learning-rate rewinding replays the dense run's training schedule, but the run"
                         f"{f' at {where}' if where else ''} records none (imported runs do not); leave it out")
    return TrainConfig(**manifest["train"])


def run_compare(
    data: Dataset,
    spec: dict,
    model_name: str,
    train_cfg: TrainConfig,
    prune_cfg: PruneConfig,
    *,
    methods: Sequence[str] = ("magnitude", "l1", "obd", "hybrid"),
    targets: Sequence[float] = (),
    max_drop: float | None = None,
    out: str | Path,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    state: StudyState | None = None,
    measure: bool = False,
    measure_repeats: int = 30,
    browser: bool = False,
) -> dict[str, Any]:
    """Train the dense model once, run every method at every target from the same dense weights, and
    write ``out/summary.json``, ``out/report.md`` and ``out/accuracy_vs_sparsity.png``.

    ``state`` records each finished stage (dense training, every pruning round, every method); stages it
    already holds are skipped, so an interrupted study continues where it stopped. ``browser`` also runs
    every result beside the dense model in headless Chromium (:func:`obdprune.web.study.browser_study`).

    Under torchrun every rank calls ``run_compare`` alike (the others with a follower ``state`` from
    :func:`obdprune.outputs.shared_output`); rank 0 writes every file and alone measures the results."""
    if not targets and max_drop is None:
        raise UsageError("give sparsity targets, a max drop, or both")
    methods = [Method.parse(m).value for m in methods]
    out, world = Path(out), current()
    if state is not None and state.done("dense"):
        log(f"dense: finished earlier, loading {out / 'dense'}")
        if not world.distributed:
            dense = load_run(out / "dense")
            dense_model, dense_manifest = dense.model, dense.manifest
        else:  # rank 0 reads the run; the others rebuild the model from what it sends
            dense = load_run(out / "dense") if world.writer else None
            dense_manifest, weights = broadcast_object(world, (dense.manifest, dense.model.state_dict())
                                                       if dense is not None else None)
            dense_model = rebuild_model(dense_manifest["model"])
            dense_model.load_state_dict(weights)
    else:
        log(f"training dense {model_name} on {data.name} ({len(data.train)} train / {len(data.val)} val / "
            f"{len(data.test)} test)")
        dense_model, dense_manifest = train_dense(data, spec, model_name, train_cfg, device=device,
                                                  progress=progress, out=out / "dense")
        if state is not None:
            state.finish("dense", str(out / "dense"))
    m = dense_manifest["metrics"]
    log(f"dense: test {100 * m['test_accuracy']:.2f}%, val {100 * m['val_accuracy']:.2f}%")
    summary: dict[str, Any] = {
        "dataset": data.name,
        "model": model_name,
        "seed": train_cfg.seed,
        "dense": {k: m[k] for k in ("test_accuracy", "val_accuracy", "weights", "nonzero_weights")}
                 | {"seconds": dense_manifest["seconds"], "path": str(out / "dense")},
        "train": train_cfg.to_dict(),
        "prune": prune_cfg.to_dict(),
        "targets": list(targets),
        "max_drop": max_drop,
        "distributed": world.to_dict(train_cfg.batch_size),
        "results": [],
    }
    if prune_cfg.granularity is Granularity.CHANNEL:  # every method of the study shares these
        x = data.train.x[:1].to(next(dense_model.parameters()).device)
        summary["excluded_layers"] = unit_analysis(dense_model, x, keep=prune_cfg.keep).reasons(
            prune_cfg.min_units, prune_cfg.layer_floor)
    for method in methods:
        cfg = replace(prune_cfg, method=method)
        stage = f"prune:{method}"
        rs = state.done(stage) if state is not None else None
        if rs is not None:
            log(f"{method}: finished earlier")
        else:
            log(f"pruning with {method}")
            rs = prune_dense((dense_model, dense_manifest), data, cfg, targets=targets, max_drop=max_drop,
                             device=device, progress=progress, out_dir=out / "runs", parent_path=out / "dense",
                             on_round=lambda r: log(round_line(r, m["val_accuracy"])),
                             checkpoint=state.rounds(stage) if state is not None else None)
        for r in rs:
            tag = f"max-drop {r['max_drop']}" if "max_drop" in r else f"target {r['target_sparsity']:.2f}"
            log(f"  {method} {tag}: sparsity {100 * r['sparsity']:.2f}%, test {100 * r['test_accuracy']:.2f}%, "
                f"val {100 * r['val_accuracy']:.2f}%")
        summary["results"].extend(rs)
        if world.writer:
            write_study_outputs(out, summary)
        if state is not None and state.done(stage) is None:
            state.finish(stage, rs)
    if not world.writer:  # measuring and the reports are rank 0's alone
        if state is not None:
            state.complete()
        return summary
    if measure and summary["results"]:
        from obdprune.measure import measure_study

        log("measuring: compaction, checked ONNX export, sizes, latency side by side (1 thread)")
        measure_study(summary, dense_model, data.test.x[:256], out, repeats=measure_repeats)
    if browser and summary["results"]:
        from obdprune.web.study import browser_study

        log("measuring in the browser: every result beside the dense model in headless Chromium (1 thread)")
        browser_study(summary, out, repeats=measure_repeats, log=log)
    write_study_outputs(out, summary)
    if state is not None:
        state.complete()
    return summary
