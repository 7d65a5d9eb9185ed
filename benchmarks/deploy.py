"""Deployment benchmark: what obdprune's pruned models buy at inference, next to Torch-Pruning's own.

For every dense run (one per seed, from `obdprune train` or benchmarks/pruning.py) this script

1. prunes it with `obdprune prune --max-drop PP` for each variant (method × granularity),
2. prunes it with Torch-Pruning's structured pruning (magnitude and Hessian importance, see
   benchmarks/tp_peer.py) under the same fine-tuning budget and the same validation accuracy rule,
3. measures dense and every result side by side in ONE `obdprune.measure.measure_models` call
   (compaction, checked ONNX export, weights, MACs, file sizes, PyTorch and onnxruntime latency at
   batch 1 and 256, one thread) timed by process CPU time, then the same compacted models and ONNX
   files again by wall clock (on a shared machine wall-clock medians include waiting for a core),
4. times the dense model's first convolution alone, with its ReLU and pooling, and with fewer filters
   against the whole model: the floor that the first convolution on the full image sets,

then aggregates over seeds (mean ± std of accuracies and sizes, median of latency ratios) into a
markdown file. A method with no round within the drop on some seed counts as the dense model there
(kept round 0). Every finished run and measurement is kept under --out and skipped on a rerun.

    python benchmarks/deploy.py --dense bench-out/pruning/lenet5/seed{0,1,2}/dense \\
        bench-out/pruning/lenet5-caffe/seed{0,1,2}/dense --out bench-out/deploy --md benchmarks/results/deploy.md

Flags this script does not know are passed to every `obdprune prune` call (not to the Torch-Pruning
peers; keep budget flags among the known ones so both sides get them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tp_peer  # noqa: E402
from obdprune.compact import compact, resize_to_state_dict  # noqa: E402
from obdprune.export import encode_sparse  # noqa: E402
from obdprune.measure import Clock, measure_models, measure_side_by_side  # noqa: E402
from obdprune.runfile import load_run  # noqa: E402
from obdprune.study import load_run_data  # noqa: E402
from obdprune.train import TrainConfig  # noqa: E402

VARIANTS = ("hybrid:element", "hybrid:channel", "magnitude:element", "l1:element", "obd:element",
            "magnitude:channel", "obd:channel", "hybrid:channel:macs", "magnitude:channel:macs", "obd:channel:macs",
            "hybrid:channel:macs8", "obd:channel:macs8")
PEERS = ("magnitude", "hessian", "hessian-shipped")
BACKENDS = (("torch", "torch"), ("onnxruntime", "ORT"))


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_variant(variant: str) -> tuple[str, str, str, int, str | None]:
    """``method:granularity[:budget[:lambda]]`` → (method, granularity, budget, channel multiple, λ or None);
    budget is weights (the default), macs, or macsN: macs with ``--channel-multiple N``; lambda is the
    ``--l1-lambda`` of this variant (default: obdprune's)."""
    parts = variant.split(":")
    match = re.fullmatch(r"(weights|macs)(\d*)", parts[2]) if len(parts) >= 3 else None
    if len(parts) not in (2, 3, 4) or (len(parts) >= 3 and match is None):
        raise SystemExit(f"variant {variant!r}: expected method:granularity[:weights|macs|macsN[:lambda]]")
    lam = parts[3] if len(parts) == 4 else None
    if match is None:
        return parts[0], parts[1], "weights", 1, lam
    return parts[0], parts[1], match.group(1), int(match.group(2) or 1), lam


def variant_label(variant: str) -> str:
    method, gran, budget, multiple, lam = parse_variant(variant)
    return (f"{method}-{gran}" + ("" if budget == "weights" else f"-{budget}") + (f"{multiple}" if multiple > 1 else "")
            + (f"-lam{lam}" if lam else ""))


# ------------------------------------------------------------------------------------------------
# Pruning: obdprune (subprocess, as a user runs it) and the Torch-Pruning peers (in process)
# ------------------------------------------------------------------------------------------------


def run_obdprune(dense: Path, variant: str, seed: int, folder: Path, args: argparse.Namespace,
                 extra: Sequence[str]) -> Path | None:
    """`obdprune prune DENSE --method M --granularity G --max-drop PP` into folder/runs/<label>; skipped if done.
    None if no round held the accuracy budget (recorded in <label>.failed, also skipped on a rerun)."""
    method, gran, budget, multiple, lam = parse_variant(variant)
    step = args.macs_prune_step if budget == "macs" else args.prune_step
    out = folder / "runs" / variant_label(variant)
    failed = out.parent / f"{out.name}.failed"
    if (out / "manifest.json").exists():
        return out
    if failed.exists():
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "obdprune", "prune", str(dense), "--method", method, "--granularity", gran,
           "--max-drop", str(args.max_drop), "--out", str(out), "--seed", str(seed), "--threads", "1",
           "--no-progress", "--finetune-epochs", str(args.finetune_epochs), "--reg-epochs", str(args.reg_epochs),
           "--finetune-lr", str(args.finetune_lr), "--prune-step", str(step), "--budget", budget,
           *(["--channel-multiple", str(multiple)] if multiple > 1 else []), *(["--l1-lambda", lam] if lam else []),
           "--batch-size", str(args.batch_size), *extra]
    if (out.parent / f".{out.name}.work").exists():
        cmd.append("--resume")
    log(f"{folder.name} {variant_label(variant)}: {' '.join(cmd[1:])}")
    t0 = time.time()
    with open(out.parent / f"{out.name}.log", "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    text = (out.parent / f"{out.name}.log").read_text()
    if r.returncode != 0 and "no pruning round kept validation accuracy" in text:
        failed.write_text(text.strip().splitlines()[-1] + "\n")
        log(f"{folder.name} {variant_label(variant)}: no round held the accuracy budget")
        return None
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {r.returncode}); see {out.parent / f'{out.name}.log'}")
    log(f"{folder.name} {variant_label(variant)}: done in {time.time() - t0:.0f} s")
    return out


def check_settings(folder: Path, dense: Path, args: argparse.Namespace, extra: Sequence[str]) -> None:
    """Finished runs are reused by folder, so a folder serves one dense run and one budget only."""
    settings = {"dense": str(dense.resolve()), "max_drop": args.max_drop, "finetune_epochs": args.finetune_epochs,
                "reg_epochs": args.reg_epochs, "finetune_lr": args.finetune_lr, "prune_step": args.prune_step,
                "batch_size": args.batch_size, "tp_ratios": list(peer_config("magnitude", 0, args).ratios),
                "hessian_samples": args.hessian_samples, "obdprune_flags": list(extra),
                "macs_prune_step": args.macs_prune_step}
    path = folder / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        if any(k not in old for k in settings):  # written before these settings existed: add them
            old = {**settings, **old}
            path.write_text(json.dumps(old, indent=1))
        if old != settings:
            diff = ", ".join(f"{k}: {old.get(k)!r} → {v!r}" for k, v in settings.items() if old.get(k) != v)
            raise SystemExit(f"{folder} holds runs made with other settings ({diff}); use another --out")
    else:
        path.write_text(json.dumps(settings, indent=1))


def peer_config(importance: str, seed: int, args: argparse.Namespace) -> tp_peer.PeerConfig:
    ratios = tuple(args.tp_ratios) if args.tp_ratios else tuple(tp_peer.linear_schedule(args.tp_step))
    ft = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=args.batch_size,
                     schedule="cosine", seed=seed)
    return tp_peer.PeerConfig(importance=importance, ratios=ratios, reg_epochs=args.reg_epochs, finetune=ft,
                              max_drop=args.max_drop, hessian_samples=args.hessian_samples, seed=seed)


def run_tp(dense_run: Any, data: Any, importance: str, seed: int, folder: Path,
           args: argparse.Namespace) -> Path | None:
    """Torch-Pruning peer into folder/tp/tp-<importance>/ (model.safetensors + record.json); skipped if done. None if
    no step held the accuracy budget (the record says so)."""
    out = folder / "tp" / f"tp-{importance}"
    if (out / "record.json").exists():
        return None if json.loads((out / "record.json").read_text()).get("failed") else out
    cfg = peer_config(importance, seed, args)
    log(f"{folder.name} tp-{importance}: channel ratios {[round(r, 3) for r in cfg.ratios]}")
    torch.manual_seed(seed)
    model, record = tp_peer.run_peer(dense_run.model, data, cfg,
                                     dense_val_accuracy=dense_run.manifest["metrics"]["val_accuracy"], log=log)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        (out / "record.json").write_text(json.dumps(record, indent=1))
        log(f"{folder.name} tp-{importance}: no step held the accuracy budget")
        return None
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "record.json").write_text(json.dumps(record, indent=1))
    log(f"{folder.name} tp-{importance}: round {record['chosen_round']}, {100 * record['sparsity']:.1f}% of weights "
        f"removed, test {100 * record['test_accuracy']:.2f}% in {record['seconds']:.0f} s")
    return out


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def _first_filters(conv: nn.Conv2d, k: int) -> nn.Conv2d:
    """A copy of ``conv`` with only its first ``k`` filters."""
    small = nn.Conv2d(conv.in_channels, k, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      bias=conv.bias is not None)
    with torch.no_grad():
        small.weight.copy_(conv.weight[:k])
        if conv.bias is not None:
            small.bias.copy_(conv.bias[:k])
    return small


def floor_models(dense: nn.Module) -> dict[str, nn.Module]:
    """The dense model's prefix up to its first Conv2d, up to the pooling after it, and that prefix with
    fewer first-layer filters (what channel pruning of the first layer could reach). Sequential models."""
    if not isinstance(dense, nn.Sequential):
        raise SystemExit("the floor measurement needs an nn.Sequential model")
    layers = list(dense)
    i = next(k for k, m in enumerate(layers) if isinstance(m, nn.Conv2d))
    j = next(k for k, m in enumerate(layers) if k > i and isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)))
    out = {"dense": dense, "conv1": nn.Sequential(*layers[:i + 1]),
           "conv1+relu+pool": nn.Sequential(*layers[:j + 1])}
    n = layers[i].out_channels
    for k in sorted({max(1, round(n * f)) for f in (5 / 6, 1 / 2, 1 / 4)} | {1}, reverse=True):
        if k < n:
            out[f"conv1+relu+pool, {k} of {n} filters"] = nn.Sequential(
                *layers[:i], _first_filters(layers[i], k), *layers[i + 1:j + 1])
    return out


def bytes_sparse_plus_zero(model: nn.Module) -> int:
    """Sparse-format bytes after turning -0.0 into +0.0 (same values; the exact encoder stores -0.0 as a
    non-zero bit pattern, and masking by multiplication leaves -0.0 wherever a negative weight was cut)."""
    return len(encode_sparse({k: (v.detach() + 0.0) if v.is_floating_point() else v.detach()
                              for k, v in model.state_dict().items()}))


def measure_floor(folder: Path, floors: dict[str, nn.Module], shape: tuple[int, ...],
                  args: argparse.Namespace, clock: Clock) -> dict:
    """The dense model and its first-layer prefixes side by side (measure_side_by_side, checked ONNX)."""
    return measure_side_by_side(floors, shape, batch_sizes=args.batch_sizes, repeats=args.floor_repeats, threads=1,
                                onnx_dir=folder / "onnx-floor", clock=clock)


def measure_seed(folder: Path, dense_run: Any, data: Any, labels: list[str], args: argparse.Namespace) -> dict:
    """Every model of one seed in one measure_models call (process CPU time), the same compacted models and
    ONNX files again by wall clock, and the first-layer floor by both; cached in measure.json."""
    path = folder / "measure.json"
    floors = floor_models(dense_run.model.eval())
    key = {"labels": labels, "repeats": args.repeats, "floor_repeats": args.floor_repeats,
           "batch_sizes": args.batch_sizes, "floor": list(floors), "clocks": ["cpu", "wall"]}
    if path.exists() and not args.remeasure:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    models: dict[str, nn.Module] = {"dense": dense_run.model.eval()}
    info: dict[str, dict[str, Any]] = {"dense": {"test_accuracy": dense_run.manifest["metrics"]["test_accuracy"],
                                                 "val_accuracy": dense_run.manifest["metrics"]["val_accuracy"],
                                                 "sparsity": 0.0}}
    for label in labels[1:]:
        if label.startswith("tp-"):
            rec = json.loads((folder / "tp" / label / "record.json").read_text())
            # Torch-Pruning keeps layer types and only shrinks them: rebuild the dense architecture at the
            # stored shapes instead of pickling whole modules
            models[label] = resize_to_state_dict(dense_run.model, load_file(str(folder / "tp" / label / "model.safetensors"))).eval()
            info[label] = {k: rec[k] for k in ("test_accuracy", "val_accuracy", "sparsity", "chosen_round",
                                                "channel_ratio")}
        else:
            run = load_run(folder / "runs" / label)
            models[label] = run.model.eval()
            info[label] = {k: run.manifest["metrics"][k] for k in ("test_accuracy", "val_accuracy", "sparsity")}
            info[label]["chosen_round"] = run.manifest["result"]["round"]
    check = data.test.x[:256]
    example = check[:2].clone()
    shape = tuple(check.shape[1:])
    compacted = {label: compact(m, example).eval() for label, m in models.items()}
    for label, m in models.items():
        info[label]["widths"] = tp_peer.layer_widths(compacted[label])
        info[label]["bytes_sparse_plus_zero"] = bytes_sparse_plus_zero(m)
    log(f"{folder.name}: measuring {len(models)} models side by side ({args.repeats} repeats, batches "
        f"{args.batch_sizes}, 1 thread, process CPU time then wall clock), then the floor ({len(floors)} models, "
        f"{args.floor_repeats} repeats)")
    load_before = os.getloadavg()
    t0 = time.time()
    # With one thread, process CPU time is the compute time without the time the process waited for a core:
    # on a shared machine wall-clock medians of longer calls are inflated by preemption, which biases the
    # ratios between short and long calls. Both are kept.
    meas = measure_models(models, shape, check_inputs=check, onnx_dir=folder / "onnx",
                          batch_sizes=args.batch_sizes, repeats=args.repeats, threads=1, clock=Clock.CPU)
    wall = measure_side_by_side(compacted, shape, batch_sizes=args.batch_sizes, repeats=args.repeats, threads=1,
                                onnx_paths={label: folder / "onnx" / f"{label}.onnx" for label in compacted},
                                clock=Clock.WALL)
    floor = measure_floor(folder, floors, shape, args, Clock.CPU)
    floor_wall = measure_floor(folder, floors, shape, args, Clock.WALL)
    out = {"key": key, "measurements": meas, "wall": wall, "info": info, "floor": floor, "floor_wall": floor_wall,
           "seconds": time.time() - t0, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    path.write_text(json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------------------------------
# Aggregation over seeds
# ------------------------------------------------------------------------------------------------


def mean_std(xs: list[float], fmt: str = ".2f") -> str:
    """``mean ± std`` (sample std), or the value alone for one seed."""
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ± {format(statistics.stdev(xs), fmt.lstrip('+'))}"


def same_or_each(xs: list[str]) -> str:
    """One value if every seed gave it, else the seeds' values in seed order."""
    return xs[0] if len(set(xs)) == 1 else "; ".join(xs)


def med(xs: list[float]) -> str:
    """Median ratio over seeds, with the range when there are several."""
    s = f"{statistics.median(xs):.2f}×"
    return s if len(xs) == 1 else f"{s} ({min(xs):.2f}–{max(xs):.2f})"


def per_label(seeds: list[dict], label: str) -> dict[str, list]:
    """Per-seed values of one model label, as ratios to each seed's dense model; where no round of the label
    held the accuracy budget its result is the dense model (kept round 0)."""
    row: dict[str, list] = {}
    for s in seeds:
        held = label in s["measurements"]  # else no round held the drop: the method delivers the dense model
        m, d = s["measurements"][label if held else "dense"], s["measurements"]["dense"]
        i, di = s["info"][label if held else "dense"], s["info"]["dense"]
        wl = label if held else "dense"
        vals = {
            "test": 100 * i["test_accuracy"], "delta": 100 * (i["test_accuracy"] - di["test_accuracy"]),
            "val_delta": 100 * (i["val_accuracy"] - di["val_accuracy"]), "removed": 100 * i["sparsity"],
            "weights": m["weights_after_compaction"] / d["weights_after_compaction"],
            "macs": m["macs_after_compaction"] / d["macs_after_compaction"],
            "sparse_file": m["bytes_sparse"] / d["bytes_dense_fp32"],
            "sparse_file_pz": i["bytes_sparse_plus_zero"] / d["bytes_dense_fp32"],
            "onnx": m["bytes_onnx_compacted"] / d["bytes_onnx_compacted"],
            "widths": "-".join(map(str, i["widths"])),
            "round": str(i.get("chosen_round", "–")) if held else "0",
        }
        for b, _ in BACKENDS:
            for bs in m["latency_ms"][b]:
                vals[f"{b}:{bs}"] = m["latency_ms"][b][bs] / d["latency_ms"][b][bs]
                vals[f"{b}:{bs}:ms"] = m["latency_ms"][b][bs]
                w, dw = s["wall"][wl][b][bs], s["wall"]["dense"][b][bs]
                vals[f"wall:{b}:{bs}"], vals[f"wall:{b}:{bs}:ms"] = w / dw, w
        for k, v in vals.items():
            row.setdefault(k, []).append(v)
    return row


def model_section(name: str, seeds: list[dict], labels: list[str], args: argparse.Namespace) -> str:
    dense = per_label(seeds, "dense")
    n = len(seeds)
    cols = [f"{b}:{bs}" for b, _ in BACKENDS for bs in map(str, args.batch_sizes)]
    heads = [f"{short} b{bs}" for _, short in BACKENDS for bs in args.batch_sizes]
    lines = [f"### {name} on {seeds[0]['dataset']} ({n} seed{'s' if n > 1 else ''}: {', '.join(map(str, [s['seed'] for s in seeds]))};"
             f" dense test accuracy {mean_std(dense['test'])} %)", "",
             "Accuracy and size (mean ± std over seeds; ratios to each seed's dense model; kept round 0: no round "
             "stayed within the drop on validation, so the method's result is the dense model):", "",
             "| model | test acc % | Δ test (pt) | Δ val (pt) | kept round | weights removed % | units kept (compacted) | "
             "weights after compaction | MACs after compaction | sparse file | sparse file, −0 → +0 | compacted ONNX |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = {label: per_label(seeds, label) for label in labels}
    for label in labels:
        r = rows[label]
        lines.append(f"| {label} | {mean_std(r['test'])} | {mean_std(r['delta'], '+.2f')} | "
                     f"{mean_std(r['val_delta'], '+.2f')} | {same_or_each(r['round'])} | {mean_std(r['removed'], '.1f')} | "
                     f"{same_or_each(r['widths'])} | "
                     f"{mean_std(r['weights'], '.3f')}× | {mean_std(r['macs'], '.3f')}× | "
                     f"{mean_std(r['sparse_file'], '.3f')}× | {mean_std(r['sparse_file_pz'], '.3f')}× | "
                     f"{mean_std(r['onnx'], '.3f')}× |")
    for clock_name, prefix, floor_key in (("process CPU time", "", "floor"), ("wall clock", "wall:", "floor_wall")):
        lines += ["", f"Latency by {clock_name}, as a ratio to dense: every model measured side by side in one process, "
                  "one thread (median over seeds of each seed's median of repeats; range over seeds in brackets"
                  + ("" if prefix else "; wall clock on this busy machine includes time spent waiting for a core")
                  + "):", "", "| model | " + " | ".join(heads) + " |", "|---" * (1 + len(cols)) + "|"]
        lines.append("| dense (ms) | " + " | ".join(f"{statistics.median(dense[prefix + c + ':ms']):.3f} ms"
                                                    for c in cols) + " |")
        for label in labels[1:]:
            lines.append(f"| {label} | " + " | ".join(med(rows[label][prefix + c]) for c in cols) + " |")
        # floor: the first convolution on the full image
        lines += ["", f"Floor by {clock_name}: the dense model's first convolution alone, with its ReLU and pooling, "
                  f"and with fewer filters (its first k), against the whole dense model, side by side "
                  f"({args.floor_repeats} repeats; median over seeds):", "",
                  "| part | " + " | ".join(heads) + " |", "|---" * (1 + len(cols)) + "|"]
        for k in [k for k in seeds[0][floor_key] if k != "dense"]:
            vals = []
            for c in cols:
                b, bs = c.split(":")
                ms = statistics.median(s[floor_key][k][b][bs] for s in seeds)
                ratio = statistics.median(s[floor_key][k][b][bs] / s[floor_key]["dense"][b][bs] for s in seeds)
                vals.append(f"{ms:.3f} ms ({ratio:.2f}×)")
            lines.append(f"| {k} | " + " | ".join(vals) + " |")
    # goals
    goal = args.goal.get(name)
    ok = [l for l in labels[1:] if statistics.mean(rows[l]["delta"]) >= -args.max_drop]
    lines += ["", "Reading (generated from the numbers above):", ""]
    if ok:
        best = min(ok, key=lambda l: statistics.median(rows[l]["onnxruntime:256"]))
        t = statistics.median(rows[best]["onnxruntime:256"])
        lines.append(f"- Fastest model within {args.max_drop} pt of dense on test (mean over seeds): **{best}**, "
                     f"onnxruntime batch 256 at {t:.2f}× dense by process CPU time"
                     + (f" (goal ≤ {goal}×: {'met' if t <= goal else 'not met'})." if goal else "."))
    for label in [l for l in labels if "-element" in l]:
        f = statistics.mean(rows[label]["sparse_file"])
        lines.append(f"- {label}: sparse file {f:.3f}× the dense fp32 file at "
                     f"{statistics.mean(rows[label]['removed']):.1f}% of weights removed, Δ test "
                     f"{statistics.mean(rows[label]['delta']):+.2f} pt (goal ≤ 0.1×: {'met' if f <= 0.1 else 'not met'}).")
    big = str(max(args.batch_sizes))
    for b, short in BACKENDS:
        def floor(k: str) -> float:
            return statistics.median(s["floor"][k][b][big] / s["floor"]["dense"][b][big] for s in seeds)

        fewest = list(seeds[0]["floor"])[-1]
        lines.append(f"- Floor ({short}, batch {big}, process CPU time): a model that keeps every first-layer filter "
                     f"cannot go below {floor('conv1+relu+pool'):.2f}× dense (first convolution with its ReLU and "
                     f"pooling; the convolution alone {floor('conv1'):.2f}×); keeping {fewest.split(', ')[-1]} it is "
                     f"still {floor(fewest):.2f}×.")
    for peer in [l for l in labels if l.startswith("tp-")]:
        for ours in [l for l in labels if l.startswith(("hybrid-channel", "obd-channel-macs"))]:
            a, b = rows[ours], rows[peer]
            lines.append(f"- {ours} vs {peer}: Δ test {statistics.mean(a['delta']):+.2f} vs {statistics.mean(b['delta']):+.2f} pt, "
                         f"weights {statistics.mean(a['weights']):.3f}× vs {statistics.mean(b['weights']):.3f}×, "
                         f"MACs {statistics.mean(a['macs']):.3f}× vs {statistics.mean(b['macs']):.3f}×, onnxruntime b256 "
                         f"{statistics.median(a['onnxruntime:256']):.2f}× vs {statistics.median(b['onnxruntime:256']):.2f}×.")
    return "\n".join(lines)


def shown_args(argv: list[str]) -> list[str]:
    """The command line without --note and its text."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    import onnxruntime

    return (f"{os.cpu_count()} cores ({cpu}), {platform.platform()}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, torch-pruning {tp_peer.tp_version()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", nargs="+", required=True, help="dense run folders (one per seed; several models allowed)")
    p.add_argument("--out", default="bench-out/deploy")
    p.add_argument("--md", default="benchmarks/results/deploy.md")
    p.add_argument("--max-drop", type=float, default=0.5)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                   help="obdprune method:granularity[:budget[:lambda]] (budget weights, macs, or macsN for macs with "
                        "--channel-multiple N; default weights; lambda: this variant's --l1-lambda)")
    p.add_argument("--peers", nargs="*", default=list(PEERS), help=f"Torch-Pruning importances: {', '.join(PEERS)}")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--reg-epochs", type=int, default=2)
    p.add_argument("--finetune-lr", type=float, default=0.03)
    p.add_argument("--prune-step", type=float, default=0.6)
    p.add_argument("--macs-prune-step", type=float, default=0.3,
                   help="prune step of the macs-budget variants (share of the remaining MACs per round)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--tp-step", type=float, default=0.1, help="Torch-Pruning's linear schedule: channel ratio "
                   "0.1, 0.2, ... (pruning_ratio=0.9, iterative_steps=9 for 0.1)")
    p.add_argument("--tp-ratios", type=float, nargs="+", help="cumulative channel ratios instead of --tp-step "
                   "(e.g. 0.319 0.536 0.684 0.785 0.853 0.9 follows obdprune's path, same number of rounds)")
    p.add_argument("--hessian-samples", type=int, default=1024, help="per-sample gradients for the Hessian peers "
                   "(obdprune's --curvature-samples default)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--floor-repeats", type=int, default=100, help="repeats for the first-layer floor (cheap)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--remeasure", action="store_true", help="time again even if measure.json holds the same models")
    p.add_argument("--note", default="", help="text for the results file (e.g. why fewer seeds)")
    args, extra = p.parse_known_args()
    args.goal = {"lenet5": 0.5, "lenet5-caffe": 0.25}
    torch.set_num_threads(1)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    by_model: dict[str, list[dict]] = {}
    labels_by_model: dict[str, list[str]] = {}
    for dense_dir in map(Path, args.dense):
        dense_run = load_run(dense_dir)
        name, seed = dense_run.manifest["model"]["name"], int(dense_run.manifest["seed"])
        folder = Path(args.out) / name / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        check_settings(folder, dense_dir, args, extra)
        data = load_run_data(dense_run)
        done = [variant_label(v) for v in args.variants if run_obdprune(dense_dir, v, seed, folder, args, extra)]
        done += [f"tp-{i}" for i in args.peers if run_tp(dense_run, data, i, seed, folder, args)]
        m = measure_seed(folder, dense_run, data, ["dense", *done], args)
        by_model.setdefault(name, []).append(m | {"seed": seed, "dataset": data.name})
        labels_by_model[name] = ["dense", *map(variant_label, args.variants), *(f"tp-{i}" for i in args.peers)]
    budget = (f"`--max-drop {args.max_drop}` (validation points), {args.reg_epochs} epoch(s) before the first round "
              f"and {args.finetune_epochs} fine-tuning epoch(s) after each round (SGD, lr {args.finetune_lr}, cosine, "
              f"batch {args.batch_size}) for obdprune and Torch-Pruning alike; prune step {args.prune_step} (MAC-budget variants: {args.macs_prune_step} of the remaining MACs)")
    ratios = peer_config("magnitude", 0, args).ratios
    parts = [
        "## Deployment: compacted size, MACs and latency of pruned models, obdprune vs Torch-Pruning", "",
        f"Command: `python benchmarks/deploy.py {' '.join(shown_args(sys.argv[1:]))}`  ",
        f"Run {started} (measurement of each seed cached in {args.out}/<model>/seed<k>/measure.json); machine: "
        f"{machine()}.  ",
        f"Budget: {budget}. Torch-Pruning peers: `BasePruner` with `MagnitudeImportance(p=2)` / "
        f"`GroupHessianImportance()` ({args.hessian_samples} per-sample gradients per step), local (per-layer) channel "
        f"ratios {', '.join(f'{r:.3g}' for r in ratios)} after each step, final Linear ignored. Both sides prune, then "
        f"fine-tune, round after round, and stop at the first round that falls more than the drop below dense on "
        f"validation, keeping the last round that held; test accuracy is only reported. The rounds differ: obdprune's "
        f"path removes {args.prune_step:g} of the remaining weights per round (up to 99%), Torch-Pruning's steps its "
        f"per-layer channel ratio linearly, so each side gets as many rounds (of equal cost) as it holds plus one.",
        "",
    ]
    if args.note:
        parts += [args.note, ""]
    for name, seeds in by_model.items():
        parts += [model_section(name, sorted(seeds, key=lambda s: s["seed"]), labels_by_model[name], args), ""]
        loads = [f"seed {s['seed']}: {s['loadavg_before'][0]:.1f} → {s['loadavg_after'][0]:.1f}" for s in seeds]
        parts += [f"1-minute load average during the {name} measurements ({os.cpu_count()} cores): "
                  f"{'; '.join(loads)}.", ""]
    text = "\n".join(parts)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
