"""Why channel pruning of narrow convolutions may not speed up onnxruntime: its blocked (NCHWc) kernels.

With all graph optimizations (``ORT_ENABLE_ALL``, the default) onnxruntime's CPU provider rewrites
convolutions into a blocked layout whose channel block is the CPU's vector width: 8 floats with AVX2,
16 with AVX-512. Channels are padded up to the block, so on an AVX-512 CPU a convolution with 8 or 12
channels costs what 16 cost. This times resnet20's first-stage basic block (a 16-channel stream, inner
width c: conv3×3 16→c, BN, ReLU, conv3×3 c→16, BN, + identity) at 28×28, for c = 16 … 4, with all
optimizations and with ``ORT_ENABLE_EXTENDED`` (everything but the layout change), one thread, process
CPU time, all configurations round-robin.

    python benchmarks/ort_blocks.py --md benchmarks/results/ort_blocks.md
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

WIDTHS = (16, 14, 12, 8, 4)
LEVELS = {"all (NCHWc)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
          "extended (no NCHWc)": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}


class Block(nn.Module):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, inner, 3, padding=1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(),
                                  nn.Conv2d(inner, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def session(model: nn.Module, x: torch.Tensor, level) -> ort.InferenceSession:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), x, f, input_names=["x"], output_names=["y"], dynamo=False,
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.graph_optimization_level = level
    return ort.InferenceSession(f.getvalue(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--md", default="benchmarks/results/ort_blocks.md")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    flags = open("/proc/cpuinfo").read()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "neither AVX2 nor AVX-512"
    cpu = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")), "?")
    xs = {b: torch.randn(b, 16, 28, 28).numpy() for b in (1, 256)}
    calls = {}
    for c in WIDTHS:
        model = Block(16, c)
        for lname, level in LEVELS.items():
            s = session(model, torch.from_numpy(xs[1]), level)
            for b, x in xs.items():
                calls[(c, lname, b)] = lambda s=s, x=x: s.run(None, {"x": x})
    for fn in calls.values():
        fn()
    samples: dict = {k: [] for k in calls}
    for rep in range(args.repeats):
        for k, fn in calls.items():
            if k[2] == 256 or rep % 2 == 0:
                t0 = time.process_time()
                fn()
                samples[k].append(time.process_time() - t0)
    med = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    cols = [(lname, b) for lname in LEVELS for b in (1, 256)]
    lines = ["# onnxruntime and narrow convolutions: resnet20's first-stage block", "",
             f"Command: `python benchmarks/ort_blocks.py --md {args.md}`  ",
             f"Run {started}; machine: {cpu} ({isa}), {platform.platform()}; onnxruntime {ort.__version__}, "
             f"torch {torch.__version__}, numpy {np.__version__}; one thread, median process CPU time of "
             f"{args.repeats} round-robin repeats (b1: half as many). Ratios to inner width 16 at the same level.", "",
             "| inner width c | MACs | " + " | ".join(f"{lname} b{b}" for lname, b in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for c in WIDTHS:
        cells = [f"{med[(c, lname, b)]:.2f} ms ({med[(c, lname, b)] / med[(16, lname, b)]:.2f}×)" for lname, b in cols]
        lines.append(f"| {c} | {c / 16:.2f}× | " + " | ".join(cells) + " |")
    lines.append("")
    with open(args.md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
