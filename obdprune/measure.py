"""What pruning buys: weight counts, multiply-accumulates, file sizes and latency. The one measuring module.

All counts are per sample and cover the prunable layers (:data:`obdprune.layers.PRUNABLE_TYPES`).
Latency is the median time of single forward passes; models that are compared are measured side by
side (round-robin in one process) so that machine noise hits them equally. :func:`measure_models` does
everything at once for several models: compaction, checked ONNX export, counts, sizes and latency.
Nothing here asserts anything about timings.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from obdprune.atomic import make_folder
from obdprune.choices import Choice
from obdprune.compact import compact
from obdprune.errors import UsageError
from obdprune.export import encode_sparse, export_onnx
from obdprune.layers import prunable_layers
from obdprune.masking import prunable_weights
from obdprune.runfile import load_run

__all__ = [
    "count_weights",
    "count_nonzero_weights",
    "measured_sparsity",
    "count_macs",
    "macs_per_layer",
    "bytes_dense_fp32",
    "bytes_sparse",
    "bytes_onnx",
    "file_sizes",
    "Clock",
    "latency_torch",
    "latency_onnxruntime",
    "measure_side_by_side",
    "size_report",
    "measure_models",
    "speed_table",
    "measure_study",
]


def _weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for _, m in prunable_layers(model) if m.weight is not None]


def count_weights(model: nn.Module) -> int:
    """Number of entries of all Conv2d / Linear weight tensors (biases, BN excluded)."""
    return sum(w.numel() for w in _weight_tensors(model))


def count_nonzero_weights(model: nn.Module) -> int:
    """Number of non-zero entries of all Conv2d / Linear weight tensors."""
    return sum(int(torch.count_nonzero(w.detach())) for w in _weight_tensors(model))


def measured_sparsity(model: nn.Module) -> tuple[float, int, int]:
    """(fraction of Conv2d/Linear weights that are exactly zero, nonzero count, total count).

    Raises UsageError for a model without Conv2d or Linear layers.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(4, 2)
        >>> _ = lin.weight.data[0].zero_()
        >>> measured_sparsity(lin)
        (0.5, 4, 8)
    """
    ws = prunable_weights(model).values()
    total = sum(w.numel() for w in ws)
    nonzero = sum(int((w != 0).sum()) for w in ws)
    return 1.0 - nonzero / total, nonzero, total


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"input_shape must be positive sizes without the batch dim, got {tuple(input_shape)}")
    return shape


def count_macs(model: nn.Module, example_input: torch.Tensor, *, effective: bool = False) -> int:
    """Multiply-accumulates of one sample's forward pass through Conv2d and Linear layers.

    Conv2d: out_channels * H_out * W_out * (in_channels / groups) * kh * kw; Linear: in * out per
    position. ``effective=True`` counts only non-zero weights: each non-zero weight times the
    number of output positions it is applied to. ``example_input`` has a batch dim (any size;
    the total is divided by it). Layers called twice count twice.
    """
    return sum(macs_per_layer(model, example_input, effective=effective).values())


def macs_per_layer(model: nn.Module, example_input: torch.Tensor, *, effective: bool = False) -> dict[str, int]:
    """{module name: MACs per sample} of every Conv2d/Linear layer that runs (see :func:`count_macs`)."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise UsageError("example_input must be a tensor with a batch dimension")
    names = {m: n for n, m in model.named_modules()}
    totals: dict[str, int] = {}

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        w = m.weight.detach()
        per_weight = int(torch.count_nonzero(w)) if effective else w.numel()
        if isinstance(m, nn.Conv2d):
            positions = math.prod(out.shape[2:])  # H_out * W_out
        else:
            positions = math.prod(args[0].shape[1:-1])  # 1 for a (N, in) input
        totals[names[m]] = totals.get(names[m], 0) + per_weight * positions * out.shape[0]

    handles = [m.register_forward_hook(hook) for _, m in prunable_layers(model)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: t // example_input.shape[0] for n, t in totals.items()}


# --------------------------------------------------------------------------------------------
# File sizes
# --------------------------------------------------------------------------------------------


def _state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return {k: v.detach() for k, v in model_or_state.state_dict().items()}
    return dict(model_or_state)


def bytes_dense_fp32(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Bytes of the state_dict as one safetensors file, floating tensors as float32."""
    from safetensors.torch import save

    sd = _state_dict(model_or_state)
    fp32 = {k: (v.float() if v.is_floating_point() else v).contiguous().clone() for k, v in sd.items()}
    return len(save(fp32))


def bytes_sparse(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Bytes of the state_dict in the sparse format (:func:`obdprune.export.save_sparse`)."""
    return len(encode_sparse(_state_dict(model_or_state)))


def _example(input_shape: Sequence[int], batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *_check_shape(input_shape)), generator=gen)


def bytes_onnx(model: nn.Module, input_shape: Sequence[int], onnx_path: str | os.PathLike) -> int:
    """Bytes of ``model`` exported (and checked) as ONNX at ``onnx_path``."""
    info = export_onnx(model, _example(input_shape, 2), onnx_path, check_inputs=_example(input_shape, 4, seed=1))
    return int(info["bytes"])


def file_sizes(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    onnx_dir: str | os.PathLike | None = None,
    compacted: nn.Module | None = None,
) -> dict[str, int]:
    """``bytes_dense_fp32`` and ``bytes_sparse`` of ``model`` and ``bytes_onnx_compacted`` of its
    compacted version (computed unless given). ONNX goes to ``onnx_dir`` or a temp folder."""
    if compacted is None:
        compacted = compact(model, _example(input_shape, 2))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(onnx_dir) if onnx_dir is not None else Path(tmp)
        onnx_bytes = bytes_onnx(compacted, input_shape, folder / "compacted.onnx")
    return {
        "bytes_dense_fp32": bytes_dense_fp32(model),
        "bytes_sparse": bytes_sparse(model),
        "bytes_onnx_compacted": onnx_bytes,
    }


# --------------------------------------------------------------------------------------------
# Latency
# --------------------------------------------------------------------------------------------


def _check_timing_args(repeats: int, warmup: int, threads: int) -> None:
    if repeats < 1 or warmup < 0 or threads < 1:
        raise UsageError("need repeats >= 1, warmup >= 0 and threads >= 1")


def _ort_session(onnx_path: str | os.PathLike, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


class Clock(Choice):
    """What latency is timed by: ``wall`` time, or this process's ``cpu`` time, which leaves out the time
    the process waited for a core on a busy machine (with one thread, that is the compute time)."""

    WALL = "wall"
    CPU = "cpu"

    def elapsed_ms(self, fn: Callable[[], Any]) -> float:
        """Milliseconds one call of ``fn`` takes by this clock."""
        now = time.perf_counter if self is Clock.WALL else time.process_time
        t0 = now()
        fn()
        return (now() - t0) * 1e3


def _interleaved_median_ms(runners: Sequence[tuple[Hashable, Callable[[], Any]]], *, repeats: int, warmup: int,
                           clock: Clock) -> dict[Hashable, float]:
    """{key: median ms} of each ``(key, fn)``: ``warmup`` untimed rounds, then ``repeats`` timed rounds,
    each running every ``fn`` once in an order rotated by one per round."""
    for _ in range(warmup):
        for _, fn in runners:
            fn()
    times: dict[Hashable, list[float]] = {key: [] for key, _ in runners}
    for r in range(repeats):
        k = r % len(runners)
        for key, fn in runners[k:] + runners[:k]:
            times[key].append(clock.elapsed_ms(fn))
    return {key: statistics.median(ts) for key, ts in times.items()}


def latency_torch(
    model: nn.Module,
    batch_size: int,
    input_shape: Sequence[int],
    *,
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 1,
    clock: Clock | str = Clock.WALL,
) -> float:
    """Median milliseconds of one eval-mode forward pass on a (batch_size, *input_shape) batch."""
    return measure_side_by_side(
        {"model": model},
        input_shape,
        batch_sizes=(batch_size,),
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        backends=("torch",),
        clock=clock,
    )["model"]["torch"][str(batch_size)]


def latency_onnxruntime(
    onnx_path: str | os.PathLike,
    batch_size: int,
    input_shape: Sequence[int],
    *,
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 1,
    clock: Clock | str = Clock.WALL,
) -> float:
    """Median milliseconds of one onnxruntime (CPU, sequential) run on a random batch."""
    _check_timing_args(repeats, warmup, threads)
    clock = Clock.parse(clock)
    sess = _ort_session(onnx_path, threads)
    feed = {sess.get_inputs()[0].name: _example(input_shape, batch_size).numpy()}
    return _interleaved_median_ms([("onnx", lambda: sess.run(None, feed))], repeats=repeats, warmup=warmup,
                                  clock=clock)["onnx"]


def measure_side_by_side(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    batch_sizes: Iterable[int] = (1, 256),
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 1,
    backends: Sequence[str] = ("torch", "onnxruntime"),
    onnx_paths: Mapping[str, str | os.PathLike] | None = None,
    onnx_dir: str | os.PathLike | None = None,
    clock: Clock | str = Clock.WALL,
) -> dict[str, dict[str, dict[str, float]]]:
    """Median latency (ms) of several models, measured interleaved.

    Every repeat runs each (model, backend) once, in an order rotated per repeat, so slow
    phases of a shared machine hit all of them alike. ONNX files are taken from ``onnx_paths``
    or exported (checked) into ``onnx_dir`` / a temp folder. ``clock``: see :class:`Clock`. Returns
    ``{name: {backend: {str(batch_size): ms}}}``.
    """
    _check_timing_args(repeats, warmup, threads)
    clock = Clock.parse(clock)
    shape = _check_shape(input_shape)
    unknown = set(backends) - {"torch", "onnxruntime"}
    if unknown or not backends:
        raise UsageError(f"backends must be a subset of ('torch', 'onnxruntime'), got {tuple(backends)}")
    if not models:
        raise UsageError("no models to measure")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise UsageError("batch sizes must be >= 1")
    old_threads = torch.get_num_threads()
    modes = {name: m.training for name, m in models.items()}
    tmp = tempfile.TemporaryDirectory()
    try:
        torch.set_num_threads(threads)
        for m in models.values():
            m.eval()
        sessions: dict[str, Any] = {}
        if "onnxruntime" in backends:
            folder = Path(onnx_dir) if onnx_dir is not None else Path(tmp.name)
            for name, m in models.items():
                path = (onnx_paths or {}).get(name)
                if path is None:
                    path = folder / f"{_safe(name)}.onnx"
                    export_onnx(m, _example(shape, 2), path, check_inputs=_example(shape, 4, seed=1))
                sessions[name] = _ort_session(path, threads)
        result: dict[str, dict[str, dict[str, float]]] = {n: {b: {} for b in backends} for n in models}
        for bs in sizes:
            x = _example(shape, bs)
            x_np = x.numpy()
            runners = []
            for name, m in models.items():
                for b in backends:
                    if b == "torch":
                        runners.append(((name, b), lambda m=m: m(x)))
                    else:
                        sess = sessions[name]
                        feed = {sess.get_inputs()[0].name: x_np}
                        runners.append(((name, b), lambda s=sess, f=feed: s.run(None, f)))
            with torch.inference_mode():
                medians = _interleaved_median_ms(runners, repeats=repeats, warmup=warmup, clock=clock)
            for (name, b), ms in medians.items():
                result[name][b][str(bs)] = ms
        return result
    finally:
        torch.set_num_threads(old_threads)
        for name, m in models.items():
            m.train(modes[name])
        tmp.cleanup()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


# --------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------


def size_report(model: nn.Module, compacted: nn.Module, example: torch.Tensor, onnx_bytes: int) -> dict[str, Any]:
    """Weights, MACs (dense / effective / after compaction) and file sizes of a pruned model and its
    compacted version; ``example`` is (N, C, H, W) input used for the MAC count."""
    return {
        "weights": count_weights(model),
        "nonzero_weights": count_nonzero_weights(model),
        "weights_after_compaction": count_weights(compacted),
        "macs_dense": count_macs(model, example),
        "macs_effective": count_macs(model, example, effective=True),
        "macs_after_compaction": count_macs(compacted, example),
        "bytes_dense_fp32": bytes_dense_fp32(model),
        "bytes_sparse": bytes_sparse(model),
        "bytes_onnx_compacted": int(onnx_bytes),
    }


def measure_models(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    check_inputs: torch.Tensor | None = None,
    onnx_dir: str | os.PathLike | None = None,
    batch_sizes: Iterable[int] = (1, 256),
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 1,
    clock: Clock | str = Clock.WALL,
) -> dict[str, dict[str, Any]]:
    """Compact every model, export it to checked ONNX, count it, and time all of them side by side.

    models: {label: model}, pruned weights exactly 0.0; each is put in eval mode.
    input_shape: one sample's shape (C, H, W), without the batch dim.
    check_inputs: (N, C, H, W) real inputs the ONNX files are verified on (random ones by default).
    onnx_dir: where ``<label>.onnx`` of each compacted model goes (a temp folder by default).
    Returns ``{label: size_report | {"onnx_max_abs_diff": float, "latency_ms": {backend: {batch: ms}}}}``,
    the latency being that of the compacted model.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = net[1].weight.data[:2].zero_(), net[1].bias.data[:2].zero_()  # two dead neurons
        >>> r = measure_models({"pruned": net}, (1, 4, 4), batch_sizes=(1,), repeats=2, warmup=0)["pruned"]
        >>> r["weights"], r["weights_after_compaction"], sorted(r["latency_ms"])
        (72, 36, ['onnxruntime', 'torch'])
    """
    shape = _check_shape(input_shape)
    if check_inputs is None:
        example, check_inputs = _example(shape, 2), _example(shape, 4, seed=1)
    else:
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
        lat = measure_side_by_side(compacted, shape, batch_sizes=batch_sizes, repeats=repeats, warmup=warmup,
                                   threads=threads, onnx_paths=paths, clock=clock)
    for label in out:
        out[label]["latency_ms"] = lat[label]
    return out


def speed_table(measurements: Mapping[str, Mapping[str, Any]], dense_label: str = "dense",
                accuracies: Mapping[str, float] | None = None) -> str:
    """Markdown table of :func:`measure_models` results: sizes, MACs and latency of each model as ratios
    to the ``dense_label`` one; ``accuracies`` ({label: fraction}) fills the test accuracy column."""
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


def measure_study(summary: dict[str, Any], dense_model: nn.Module, check_inputs: torch.Tensor, out: str | Path, *,
                  repeats: int = 30, threads: int = 1, batch_sizes: Sequence[int] = (1, 256)) -> dict[str, Any]:
    """Add size, MAC and latency fields to ``summary['dense']`` and every result of a study summary (each
    loaded from its run folder), measured side by side, and its ``speed_table``; compacted ONNX files go
    to ``out/onnx/<label>.onnx``. Returns ``summary``, updated in place."""
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
