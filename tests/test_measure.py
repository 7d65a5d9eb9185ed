"""Weight / MAC counts (hand-checked), file sizes, latency helpers (no timing assertions)."""
from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn as nn

from obdprune.errors import UsageError
from obdprune.measure import (
    Clock,
    bytes_dense_fp32,
    bytes_sparse,
    count_macs,
    count_nonzero_weights,
    count_weights,
    file_sizes,
    latency_onnxruntime,
    latency_torch,
    measure_models,
    measure_side_by_side,
    measured_sparsity,
)
from obdprune.export import export_onnx


def test_macs_conv_stride_padding_groups() -> None:
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    x = torch.randn(3, 4, 9, 9)
    # H_out = W_out = floor((9 + 2 - 3) / 2) + 1 = 5; each output sums (4 / 2) * 3 * 3 = 18 products
    assert count_macs(conv, x) == 8 * 5 * 5 * 18 == 3600
    with torch.no_grad():
        conv.weight[:3] = 0  # 3 of 8 filters: 3 * 2 * 3 * 3 = 54 of 144 weights zero
        conv.weight[5, 0, 0, 0] = 0
    assert count_macs(conv, x, effective=True) == (144 - 54 - 1) * 25 == 2225


def test_macs_linear_and_net() -> None:
    lin = nn.Linear(10, 7)
    assert count_macs(lin, torch.randn(5, 10)) == 70
    assert count_macs(lin, torch.randn(2, 3, 10)) == 210  # applied at 3 positions
    with torch.no_grad():
        lin.weight[:, :4] = 0
    assert count_macs(lin, torch.randn(5, 10), effective=True) == 42
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    assert count_macs(net, torch.randn(1, 1, 6, 6)) == 2 * 16 * 9 + 32 * 3


def test_weight_counts() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    assert count_weights(net) == 18 + 24
    with torch.no_grad():
        net[0].weight[0] = 0
        net[3].weight[1, :5] = 0
    assert count_nonzero_weights(net) == 9 + 19


def lenet() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 10),
    )  # fmt: skip
    with torch.no_grad():
        for layer in (m[0], m[3], m[7], m[9]):
            layer.weight[torch.rand(layer.weight.shape) < 0.9] = 0
        m[3].weight[:8] = 0
        m[3].bias[:8] = 0  # half of conv2's filters dead
    return m


def test_file_sizes(tmp_path) -> None:
    m = lenet()
    sizes = file_sizes(m, (1, 28, 28), onnx_dir=tmp_path)
    assert set(sizes) == {"bytes_dense_fp32", "bytes_sparse", "bytes_onnx_compacted"}
    assert sizes["bytes_dense_fp32"] == bytes_dense_fp32(m) > 4 * count_weights(m)
    assert sizes["bytes_sparse"] == bytes_sparse(m) < 0.25 * sizes["bytes_dense_fp32"]
    assert 0 < sizes["bytes_onnx_compacted"] < sizes["bytes_dense_fp32"]
    assert (tmp_path / "compacted.onnx").exists()


def test_latency_functions_return_positive_numbers(tmp_path) -> None:
    m = lenet()
    threads = torch.get_num_threads()
    ms = latency_torch(m, 2, (1, 28, 28), repeats=3, warmup=1)
    assert math.isfinite(ms) and ms > 0
    assert torch.get_num_threads() == threads and m.training
    export_onnx(m, torch.randn(1, 1, 28, 28), tmp_path / "m.onnx", check_inputs=torch.randn(2, 1, 28, 28))
    ms = latency_onnxruntime(tmp_path / "m.onnx", 2, (1, 28, 28), repeats=3, warmup=1)
    assert math.isfinite(ms) and ms > 0
    with pytest.raises(UsageError):
        latency_torch(m, 1, (1, 28, 28), repeats=0)


def test_side_by_side() -> None:
    a, b = lenet(), nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    out = measure_side_by_side({"a": a, "b": b}, (1, 28, 28), batch_sizes=(1, 4), repeats=3, warmup=1)
    assert set(out) == {"a", "b"}
    for per_model in out.values():
        assert set(per_model) == {"torch", "onnxruntime"}
        for per_backend in per_model.values():
            assert set(per_backend) == {"1", "4"}
            assert all(math.isfinite(v) and v > 0 for v in per_backend.values())


def test_measure_models_on_random_check_inputs(tmp_path) -> None:
    m = lenet()
    r = measure_models({"pruned": m}, (1, 28, 28), onnx_dir=tmp_path, batch_sizes=(1, 8), repeats=2,
                       warmup=1)["pruned"]
    assert r["weights"] == 150 + 2400 + 30720 + 1200
    assert r["nonzero_weights"] == count_nonzero_weights(m) < r["weights"]
    assert measured_sparsity(m) == (1 - r["nonzero_weights"] / r["weights"], r["nonzero_weights"], r["weights"])
    assert r["weights_after_compaction"] < r["weights"]
    assert r["macs_effective"] < r["macs_dense"]
    assert r["macs_after_compaction"] < r["macs_dense"]
    assert r["bytes_sparse"] < r["bytes_dense_fp32"]
    assert r["bytes_onnx_compacted"] > 0 and r["onnx_max_abs_diff"] <= 1e-4
    assert set(r["latency_ms"]) == {"torch", "onnxruntime"}
    assert all(math.isfinite(v) and v > 0 for d in r["latency_ms"].values() for v in d.values())
    assert set(r["latency_ms"]["torch"]) == {"1", "8"}
    assert {p.name for p in tmp_path.iterdir()} == {"pruned.onnx"}


def test_clock_cpu_leaves_out_waiting() -> None:
    assert Clock.WALL.elapsed_ms(lambda: time.sleep(0.05)) >= 50
    assert Clock.CPU.elapsed_ms(lambda: time.sleep(0.05)) < 25  # asleep, the process spends no CPU time
    assert Clock.parse("cpu") is Clock.CPU
    with pytest.raises(UsageError, match="clock 'gpu'; choose one of: wall, cpu"):
        Clock.parse("gpu")
    m = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    assert latency_torch(m, 1, (1, 28, 28), repeats=2, warmup=0, clock="cpu") >= 0
