"""What pruning buys: weight counts, multiply-accumulates, file sizes and latency.

All counts are per sample. Latency is the median wall time of single forward passes; models
that are compared are measured side by side (round-robin in one process) so that machine noise
hits them equally. Nothing here asserts anything about timings.
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from obdprune.compact import compact
from obdprune.errors import UsageError
from obdprune.export import encode_sparse, export_onnx

__all__ = [
    "count_weights",
    "count_nonzero_weights",
    "count_macs",
    "macs_per_layer",
    "bytes_dense_fp32",
    "bytes_sparse",
    "bytes_onnx",
    "file_sizes",
    "latency_torch",
    "latency_onnxruntime",
    "measure_side_by_side",
    "measure_model",
    "size_report",
]

_WEIGHTED = (nn.Conv2d, nn.Linear)


def _weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, _WEIGHTED) and m.weight is not None]


def count_weights(model: nn.Module) -> int:
    """Number of entries of all Conv2d / Linear weight tensors (biases, BN excluded)."""
    return sum(w.numel() for w in _weight_tensors(model))


def count_nonzero_weights(model: nn.Module) -> int:
    """Number of non-zero entries of all Conv2d / Linear weight tensors."""
    return sum(int(torch.count_nonzero(w.detach())) for w in _weight_tensors(model))


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

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _WEIGHTED)]
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


def _timed_ms(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def latency_torch(
    model: nn.Module,
    batch_size: int,
    input_shape: Sequence[int],
    *,
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 1,
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
    )["model"]["torch"][str(batch_size)]


def latency_onnxruntime(
    onnx_path: str | os.PathLike,
    batch_size: int,
    input_shape: Sequence[int],
    *,
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 1,
) -> float:
    """Median milliseconds of one onnxruntime (CPU, sequential) run on a random batch."""
    _check_timing_args(repeats, warmup, threads)
    sess = _ort_session(onnx_path, threads)
    name = sess.get_inputs()[0].name
    x = _example(input_shape, batch_size).numpy()
    for _ in range(warmup):
        sess.run(None, {name: x})
    return statistics.median(_timed_ms(lambda: sess.run(None, {name: x})) for _ in range(repeats))


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
) -> dict[str, dict[str, dict[str, float]]]:
    """Median latency (ms) of several models, measured interleaved.

    Every repeat runs each (model, backend) once, in an order rotated per repeat, so slow
    phases of a shared machine hit all of them alike. ONNX files are taken from ``onnx_paths``
    or exported (checked) into ``onnx_dir`` / a temp folder. Returns
    ``{name: {backend: {str(batch_size): ms}}}``.
    """
    _check_timing_args(repeats, warmup, threads)
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
                        runners.append((name, b, lambda m=m: m(x)))
                    else:
                        sess = sessions[name]
                        feed = {sess.get_inputs()[0].name: x_np}
                        runners.append((name, b, lambda s=sess, f=feed: s.run(None, f)))
            times: dict[tuple[str, str], list[float]] = {(n, b): [] for n, b, _ in runners}
            with torch.inference_mode():
                for _ in range(warmup):
                    for _, _, fn in runners:
                        fn()
                for r in range(repeats):
                    k = r % len(runners)
                    for name, b, fn in runners[k:] + runners[:k]:
                        times[(name, b)].append(_timed_ms(fn))
            for (name, b), ts in times.items():
                result[name][b][str(bs)] = statistics.median(ts)
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


def measure_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    onnx_dir: str | os.PathLike | None = None,
    batch_sizes: Iterable[int] = (1, 256),
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 1,
    compare_dense: bool = True,
) -> dict[str, Any]:
    """Sizes, MACs and latency of a pruned model (weights exactly 0.0 where pruned).

    Returns a flat dict: ``weights``, ``nonzero_weights``, ``weights_after_compaction``,
    ``macs_dense``, ``macs_effective``, ``macs_after_compaction``, ``bytes_dense_fp32``,
    ``bytes_sparse``, ``bytes_onnx_compacted``, ``latency_ms`` = {"torch": {"1": ms, "256": ms},
    "onnxruntime": {...}} of the COMPACTED model, and with ``compare_dense`` also
    ``latency_ms_dense``: the uncompacted model measured side by side with it.
    ``input_shape`` excludes the batch dim.
    """
    shape = _check_shape(input_shape)
    example = _example(shape, 2)
    compacted = compact(model, example)
    sizes = [int(b) for b in batch_sizes]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(onnx_dir) if onnx_dir is not None else Path(tmp)
        check = _example(shape, 4, seed=1)
        paths = {"compacted": folder / "compacted.onnx"}
        onnx_bytes = export_onnx(compacted, example, paths["compacted"], check_inputs=check)["bytes"]
        models = {"compacted": compacted}
        if compare_dense:
            dense = copy.deepcopy(model)
            paths["dense"] = folder / "dense.onnx"
            export_onnx(dense, example, paths["dense"], check_inputs=check)
            models["dense"] = dense
        lat = measure_side_by_side(
            models,
            shape,
            batch_sizes=sizes,
            repeats=repeats,
            warmup=warmup,
            threads=threads,
            onnx_paths=paths,
        )
    out: dict[str, Any] = size_report(model, compacted, example, onnx_bytes) | {"latency_ms": lat["compacted"]}
    if compare_dense:
        out["latency_ms_dense"] = lat["dense"]
    return out
