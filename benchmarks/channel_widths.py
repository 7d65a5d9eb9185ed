"""What the runtimes reward: latency of LeNet-shaped networks as a function of their layer widths.

Times randomly initialised networks of the lenet5-caffe family (conv 5×5 → pool → conv 5×5 → pool →
Linear → Linear) and the first convolution of lenet5 (with ReLU and pooling) at a range of widths, in
PyTorch and onnxruntime, batch 1 and 256, one thread, by process CPU time (median of repeats; every
configuration timed round-robin so machine load hits all alike). The point: time is not proportional
to MACs; onnxruntime's convolutions are much faster when the channel counts are multiples of the CPU's
vector width, which is what ``--channel-multiple`` exploits.

    python benchmarks/channel_widths.py --md benchmarks/results/channel_widths.md
"""
from __future__ import annotations

import argparse
import io
import platform
import statistics
import time
import warnings
from datetime import datetime, timezone

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from obdprune.measure import count_macs

CAFFE = [(20, 50, 500), (16, 48, 500), (16, 40, 400), (12, 30, 300), (10, 25, 200), (8, 24, 200), (8, 16, 200),
         (7, 17, 200), (6, 14, 100), (4, 12, 100)]
FIRST = [6, 5, 4, 3, 2, 1, 8, 16]


def caffe_net(c1: int, c2: int, h: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 16, h), nn.ReLU(), nn.Linear(h, 10)).eval()


def lenet5_conv1(k: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, k, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)).eval()


def session(model: nn.Module, x: torch.Tensor) -> ort.InferenceSession:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, f, input_names=["x"], output_names=["y"], dynamo=False,
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(f.getvalue(), opts, providers=["CPUExecutionProvider"])


def time_all(models: dict[str, nn.Module], batches: list[int], repeats: int) -> dict[str, dict[str, float]]:
    """{name: {"torch b1": ms, ...}}: median process CPU time, all callables timed round-robin."""
    gen = torch.Generator().manual_seed(0)
    xs = {b: torch.randn(b, 1, 28, 28, generator=gen) for b in batches}
    calls = {}
    for name, m in models.items():
        s = session(m, xs[batches[0]])
        for b in batches:
            x, xn = xs[b], xs[b].numpy()

            def run_torch(m=m, x=x):
                with torch.no_grad():
                    m(x)

            calls[(name, f"torch b{b}")] = run_torch
            calls[(name, f"ORT b{b}")] = lambda s=s, xn=xn: s.run(None, {"x": xn})
    for fn in calls.values():
        for _ in range(3):
            fn()
    samples: dict = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.process_time()
            fn()
            samples[k].append(time.process_time() - t0)
    out: dict[str, dict[str, float]] = {}
    for (name, col), v in samples.items():
        out.setdefault(name, {})[col] = 1e3 * statistics.median(v)
    return out


def table(title: str, models: dict[str, nn.Module], base: str, batches: list[int], repeats: int) -> list[str]:
    times = time_all(models, batches, repeats)
    x = torch.zeros(1, 1, 28, 28)
    cols = [f"{b} b{n}" for b in ("torch", "ORT") for n in batches]
    lines = [f"### {title}", "", "| widths | MACs | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    base_macs = count_macs(models[base], x[:1])
    for name, m in models.items():
        cells = [f"{times[name][c]:.2f} ms ({times[name][c] / times[base][c]:.2f}×)" for c in cols]
        lines.append(f"| {name} | {count_macs(m, x[:1]) / base_macs:.2f}× | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--md", default="benchmarks/results/channel_widths.md")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    caffe = {"-".join(map(str, c)): caffe_net(*c) for c in CAFFE}
    first = {f"conv1+relu+pool, {k} filters": lenet5_conv1(k) for k in FIRST}
    lines = ["## Latency against layer widths (randomly initialised networks)", "",
             f"Command: `python benchmarks/channel_widths.py --md {args.md}`  ",
             f"Run {started}; machine: {torch.get_num_threads()} thread, {platform.platform()}; torch {torch.__version__}, "
             f"onnxruntime {ort.__version__}, numpy {np.__version__}. Median process CPU time of {args.repeats} "
             "round-robin repeats; ratios to the first row.", ""]
    lines += table("lenet5-caffe shape (conv1-conv2-fc1 widths), 28×28 input", caffe, "20-50-500", args.batches,
                   args.repeats)
    lines += table("lenet5's first layer (1→k filters, 5×5, padding 2) with ReLU and 2×2 max-pooling", first,
                   "conv1+relu+pool, 6 filters", args.batches, args.repeats)
    with open(args.md, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
