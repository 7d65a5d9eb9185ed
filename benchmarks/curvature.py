"""Curvature benchmark: obdprune's estimators next to BackPACK and Torch-Pruning on LeNet-5 nets.

    python benchmarks/curvature.py [--threads 1] [--repeats 5] [--hutchinson-samples 10]

Times (median of repeats after one warm-up, wall clock and CPU time) each method on random 28×28
inputs, as a ratio to one plain forward+backward of the mean cross-entropy on the same batch, and the
peak resident memory each method adds (peak RSS during the call minus RSS just before it, in a fresh
subprocess per method). Writes benchmarks/results/curvature.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from obdprune.curvature import diag_empirical_fisher, diag_ggn, diag_hessian  # noqa: E402
from obdprune.layers import PRUNABLE_TYPES  # noqa: E402

MODELS = ("lenet5", "lenet5-caffe")
SIZES = (256, 1024)
METHODS = (
    "forward+backward",
    "obdprune exact",
    "obdprune mc",
    "obdprune empirical-fisher",
    "obdprune hutchinson",
    "backpack DiagGGNExact",
    "backpack DiagGGNMC",
    "backpack DiagHessian",
    "torch-pruning GroupHessianImportance",
)


def build(name: str) -> nn.Module:
    try:
        from obdprune.models import build_model
    except ImportError:
        build_model = None
    if build_model is not None:
        return build_model(name, input_shape=(1, 28, 28), num_classes=10)
    if name == "lenet5":
        return nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, 10))
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


def setup(model_name: str, n: int):
    torch.manual_seed(0)
    model = build(model_name).eval()
    x = torch.randn(n, 1, 28, 28)
    y = torch.randint(0, 10, (n,))
    return model, x, y


def make_method(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, probes: int) -> Callable[[], object]:
    """A zero-argument callable running ``method`` once; BackPACK/Torch-Pruning get their own model copy."""
    if method == "forward+backward":
        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        return run
    if method == "obdprune exact":
        return lambda: diag_ggn(model, x, y, method="exact")
    if method == "obdprune mc":
        return lambda: diag_ggn(model, x, y, method="mc", mc_samples=1, generator=torch.Generator().manual_seed(0))
    if method == "obdprune empirical-fisher":
        return lambda: diag_empirical_fisher(model, x, y)
    if method == "obdprune hutchinson":
        return lambda: diag_hessian(model, x, y, method="hutchinson", samples=probes,
                                    generator=torch.Generator().manual_seed(0))
    if method.startswith("backpack"):
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagGGNMC, DiagHessian

        ext = {"DiagGGNExact": DiagGGNExact, "DiagGGNMC": DiagGGNMC, "DiagHessian": DiagHessian}[method.split()[1]]
        bp_model = extend(copy.deepcopy(model))
        loss_fn = extend(nn.CrossEntropyLoss())

        def run():
            bp_model.zero_grad(set_to_none=True)
            with backpack(ext()):
                loss_fn(bp_model(x), y).backward()
            return {k: getattr(p, ext().savefield) for k, p in bp_model.named_parameters()}
        return run
    if method == "torch-pruning GroupHessianImportance":
        import torch_pruning as tp

        tp_model = copy.deepcopy(model)
        graph = tp.DependencyGraph().build_dependency(tp_model, example_inputs=x[:1])
        groups = list(graph.get_all_groups(root_module_types=list(PRUNABLE_TYPES)))
        imp = tp.importance.GroupHessianImportance()

        def run():
            # As its docstring prescribes: per-sample losses, one backward each, then score every group.
            imp.zero_grad()
            losses = F.cross_entropy(tp_model(x), y, reduction="none")
            for loss in losses:
                tp_model.zero_grad()
                loss.backward(retain_graph=True)
                imp.accumulate_grad(tp_model)
            return [imp(group) for group in groups]
        return run
    raise ValueError(method)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def measure_memory_child(model_name: str, n: int, method: str, probes: int) -> None:
    """Runs in a subprocess: peak RSS added by one call of ``method`` (KiB), printed as JSON.

    getrusage's ru_maxrss survives exec (it would report the parent's peak), so the child resets its
    own high-water mark (write 5 to /proc/self/clear_refs) and reads VmHWM, the peak RSS since then.
    """
    model, x, y = setup(model_name, n)
    make_method(method, model, x[:2], y[:2], probes)()  # one-time library initialization, not counted
    fn = make_method(method, model, x, y, probes)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    print(json.dumps({"peak_kib": max(0, _status_kib("VmHWM") - before)}))


def measure_memory(model_name: str, n: int, method: str, threads: int, probes: int) -> float | None:
    cmd = [sys.executable, __file__, "--_memory-child", model_name, str(n), method,
           "--threads", str(threads), "--hutchinson-samples", str(probes)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] / 1024


def max_relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


def machine_line(threads: int) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs (nproc), {cpu}, {platform.machine()}; torch {torch.__version__}; "
            f"{threads} torch thread(s); Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: comparable on a shared machine)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per method after one warm-up")
    parser.add_argument("--hutchinson-samples", type=int, default=10, help="Rademacher probes for Hutchinson")
    parser.add_argument("--slow-budget", type=float, default=4.0,
                        help="seconds per method for the timed repeats: slower methods get fewer repeats")
    parser.add_argument("--tp-max-n", type=int, default=256,
                        help="largest N for Torch-Pruning's per-sample loop (its cost grows like N²)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help="methods to time (forward+backward, the baseline, is always timed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curvature.md"))
    parser.add_argument("--_memory-child", nargs=3, metavar=("MODEL", "N", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._memory_child:
        model_name, n, method = args._memory_child
        measure_memory_child(model_name, int(n), method, args.hutchinson_samples)
        return

    command = "python benchmarks/curvature.py " + " ".join(sys.argv[1:])
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    rows = []
    checks = []
    for model_name in args.models:
        for n in args.sizes:
            model, x, y = setup(model_name, n)
            fns, notes, reps = {}, {}, {}
            methods = [m for m in METHODS if m in args.methods or m == "forward+backward"]
            for method in methods:
                notes[method] = f"{args.hutchinson_samples} probes; " if method == "obdprune hutchinson" else ""
                if method.startswith("torch-pruning") and n > args.tp_max_n:
                    notes[method] = (f"not run above N={args.tp_max_n} (--tp-max-n): its per-sample loop "
                                     "backpropagates through the retained full-batch graph once per sample, O(N²)")
                    continue
                try:
                    fns[method] = make_method(method, model, x, y, args.hutchinson_samples)
                    start = time.perf_counter()
                    fns[method]()  # warm-up
                    warm = time.perf_counter() - start
                except Exception as exc:  # noqa: BLE001 - a competitor that cannot run is reported, not fatal
                    fns.pop(method, None)
                    notes[method] += f"cannot run: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                    continue
                # Slow methods get fewer repeats so that the whole run stays short.
                reps[method] = max(1, min(args.repeats, int(args.slow_budget / max(warm, 1e-9))))
            wall = {m: [] for m in fns}
            cpu = {m: [] for m in fns}
            alone_wall, alone_cpu = [], []
            for _ in range(args.repeats):  # the baseline on its own, before anything else runs in between
                w0, c0 = time.perf_counter(), time.process_time()
                fns["forward+backward"]()
                alone_wall.append(time.perf_counter() - w0)
                alone_cpu.append(time.process_time() - c0)
            for r in range(args.repeats):  # round-robin, so load from other processes hits all methods alike
                for method, fn in fns.items():
                    if r < reps[method]:
                        w0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        wall[method].append(time.perf_counter() - w0)
                        cpu[method].append(time.process_time() - c0)
            base_wall = statistics.median(wall["forward+backward"])
            base_cpu = statistics.median(cpu["forward+backward"])
            rows.append((model_name, n, "forward+backward, alone", statistics.median(alone_wall),
                         statistics.median(alone_wall) / base_wall, statistics.median(alone_cpu),
                         statistics.median(alone_cpu) / base_cpu, None,
                         f"{args.repeats} back-to-back calls before the round-robin"))
            for method in methods:
                if method in fns:
                    med_wall, med_cpu = statistics.median(wall[method]), statistics.median(cpu[method])
                    if reps[method] < args.repeats:
                        notes[method] += f"{reps[method]} repeat(s)"
                else:
                    med_wall = med_cpu = None
                memory = None if args.no_memory or method not in fns else measure_memory(model_name, n, method, args.threads,
                                                                     args.hutchinson_samples)
                row = (model_name, n, method, med_wall, None if med_wall is None else med_wall / base_wall,
                       med_cpu, None if med_cpu is None else med_cpu / base_cpu, memory, notes[method].strip("; "))
                rows.append(row)
                print(" | ".join("—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in row),
                      flush=True)
            if "obdprune exact" in fns and "backpack DiagGGNExact" in fns:
                checks.append((model_name, n, max_relative_difference(fns["obdprune exact"](),
                                                                      fns["backpack DiagGGNExact"]())))

    lines = [
        "# Curvature benchmark",
        "",
        f"- command: `{command}`",
        f"- date: {date}",
        f"- machine: {machine_line(args.threads)}",
        f"- time: median of {args.repeats} repeats after one warm-up, all methods in one process, repeats "
        "interleaved round-robin; wall clock and process CPU time (the latter is less sensitive to other "
        "processes on a shared machine); × fb = ratio to one plain forward+backward of the mean CE loss "
        "on the same batch",
        "- peak memory: peak RSS during the first full-size call (after a 2-sample warm-up) minus RSS just before it (Linux VmHWM after resetting "
        "it via /proc/self/clear_refs; getrusage's max RSS would carry the parent's peak across exec), one "
        "fresh subprocess per method, CPU; counts the method's own allocations, not the model or the data "
        "(BackPACK/Torch-Pruning model copies are made before the measurement)",
        f"- Hutchinson: {args.hutchinson_samples} Rademacher probes (its error shrinks like 1/sqrt(probes))",
        "- Torch-Pruning: GroupHessianImportance as its docstring prescribes (per-sample backward + "
        "accumulate_grad, then scoring every Conv2d/Linear group); its accumulate_grad keys by parameter but "
        "tests the name, so it keeps only the last sample's squared gradient (torch-pruning 1.6.1)",
        "",
        "| model | N | method | wall ms | × fb (wall) | CPU ms | × fb (CPU) | peak ΔRSS MiB | note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for model_name, n, method, wall_ms, wall_ratio, cpu_ms, cpu_ratio, memory, note in rows:
        lines.append(
            f"| {model_name} | {n} | {method} | {fmt(wall_ms and wall_ms * 1e3, '.1f')} | {fmt(wall_ratio, '.2f')} | "
            f"{fmt(cpu_ms and cpu_ms * 1e3, '.1f')} | {fmt(cpu_ratio, '.2f')} | {fmt(memory, '.1f')} | {note} |"
        )
    lines += ["", "Agreement, float32: max over parameters of max|obdprune exact − BackPACK DiagGGNExact| / max|BackPACK|:", ""]
    lines += [f"- {m} N={n}: {d:.1e}" for m, n, d in checks]
    lines += ["", "Goals (LeNet-5): exact ≤ 5× fb and ≥ 3× faster than BackPACK DiagGGNExact; MC ≤ 1.5× fb. "
              "Measured (wall-clock medians; CPU-time medians in brackets):", ""]
    by_key = {(r[0], r[1], r[2]): r for r in rows}
    for model_name in args.models:
        for n in args.sizes:
            exact = by_key.get((model_name, n, "obdprune exact"))
            mc = by_key.get((model_name, n, "obdprune mc"))
            bp = by_key.get((model_name, n, "backpack DiagGGNExact"))
            if exact and mc and bp and None not in (exact[3], mc[3], bp[3]):
                lines.append(
                    f"- {model_name} N={n}: exact {exact[4]:.2f}× fb [{exact[6]:.2f}×], "
                    f"{bp[3] / exact[3]:.1f}× faster than BackPACK [{bp[5] / exact[5]:.1f}×]; "
                    f"MC {mc[4]:.2f}× fb [{mc[6]:.2f}×]"
                )
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
