"""Pruning study across models and seeds: `obdprune compare` per (model, seed), then mean ± std tables.

Each (model, seed) is one `obdprune compare` process with one torch thread; `--jobs` run side by side.
Results land in OUT/<model>/seed<k>/ (summary.json, report.md, plot, runs) and the aggregate in
OUT/pruning.md plus one accuracy-vs-sparsity plot per model (mean ± std over seeds). A (model, seed) may
instead have run as method groups, one `compare --methods ...` each, in OUT/<model>/seed<k>-<group>/ (to
spread one seed over several cores); their summaries are joined when the dense models agree.

    python benchmarks/pruning.py --models lenet5 lenet300 lenet5-caffe --seeds 0 1 2 --out bench-out/pruning
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

METHODS = ("magnitude", "l1", "obd", "hybrid")


def merge_parts(out: Path) -> bool:
    """Join the studies of one (model, seed) that ran as method groups in ``<out>-<group>/`` (one compare
    per group, each training the same dense model) into ``out/summary.json``; False when there are none.
    The dense models must agree (test and validation accuracy), else the parts are not one study."""
    parts = sorted(out.parent.glob(f"{out.name}-*/summary.json"))
    if not parts:
        return False
    summaries = [json.loads(p.read_text()) for p in parts]
    dense = {(s["dense"]["test_accuracy"], s["dense"]["val_accuracy"]) for s in summaries}
    if len(dense) != 1:
        raise SystemExit(f"{out}: the method groups trained different dense models {sorted(dense)}")
    merged = dict(summaries[0], results=[r for s in summaries for r in s["results"]],
                  parts=[str(p.parent) for p in parts])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(merged, indent=1))
    return True


def run_one(model: str, seed: int, args, extra: list[str]) -> Path:
    out = Path(args.out) / model / f"seed{seed}"
    if merge_parts(out):  # joined afresh every time: a group may have finished since
        return out
    if (out / "summary.json").exists() and not args.force:
        s = json.loads((out / "summary.json").read_text())
        if len(s["results"]) == len(METHODS) * (len(args.sparsity) + (args.max_drop is not None)):
            return out
    cmd = [sys.executable, "-m", "obdprune", "compare", "--dataset", args.dataset, "--model", model,
           "--seed", str(seed), "--sparsity", *map(str, args.sparsity), "--out", str(out), "--no-progress",
           "--threads", "1", *extra]
    if args.max_drop is not None:
        cmd += ["--max-drop", str(args.max_drop)]
    if (out / "state.json").exists():  # an earlier, interrupted or finished, compare in this folder
        if args.force:
            shutil.rmtree(out)
        else:
            cmd.append("--resume")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out.parent / f"seed{seed}.log", "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    print(f"{model} seed {seed}: exit {r.returncode} in {time.time() - t0:.0f} s", flush=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {out.parent / f'seed{seed}.log'}")
    return out


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def aggregate(model: str, summaries: list[dict]) -> tuple[str, dict]:
    dense = [100 * s["dense"]["test_accuracy"] for s in summaries]
    rows: dict[tuple, dict[str, list[float]]] = {}
    for s in summaries:
        d = s["dense"]["test_accuracy"]
        for r in s["results"]:
            key = (r["method"], ("max-drop", r["max_drop"]) if "max_drop" in r else ("target", r["target_sparsity"]))
            row = rows.setdefault(key, {"test": [], "delta": [], "sparsity": [], "val": [], "sec": [], "curv": []})
            row["test"].append(100 * r["test_accuracy"])
            row["delta"].append(100 * (r["test_accuracy"] - d))
            row["sparsity"].append(100 * r["sparsity"])
            row["val"].append(100 * r["val_accuracy"])
            row["sec"].append(r["seconds"])
            row["curv"].append(r.get("curvature_seconds", 0.0))
    lines = [f"### {model} (dense test accuracy {mean_std(dense)} %, {len(summaries)} seeds)", "",
             "| method | target | sparsity % | test acc % | Δ test (pt) | val acc % | seconds | curvature share |",
             "|---|---|---|---|---|---|---|---|"]

    def order(k):
        kind, value = k[1]
        return (kind == "max-drop", value, METHODS.index(k[0]))

    for key in sorted(rows, key=order):
        row = rows[key]
        kind, value = key[1]
        target = f"max-drop {value} pt" if kind == "max-drop" else f"{value:.2f}"
        share = statistics.mean(c / max(s, 1e-9) for c, s in zip(row["curv"], row["sec"]))
        lines.append(f"| {key[0]} | {target} | {mean_std(row['sparsity'])} | {mean_std(row['test'])} | "
                     f"{mean_std(row['delta'])} | {mean_std(row['val'])} | {statistics.mean(row['sec']):.0f} | "
                     f"{100 * share:.1f}% |")
    return "\n".join(lines), rows


def headline(model: str, rows: dict, summaries: list[dict]) -> str:
    """Δ test (pt) per method and target, the hybrid's margin over magnitude against the seed-to-seed spread,
    and the wall time of one (model, seed): the dense run plus every method's whole path."""
    targets = sorted({k[1][1] for k in rows if k[1][0] == "target"})
    lines = [f"| {model} | " + " | ".join(f"{100 * t:g} %" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    for method in METHODS:
        cells = [mean_std(rows[(method, ("target", t))]["delta"]) if (method, ("target", t)) in rows else "–"
                 for t in targets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    margin = []
    for t in targets:
        h, m = rows.get(("hybrid", ("target", t))), rows.get(("magnitude", ("target", t)))
        if not h or not m or len(h["delta"]) < 2:
            margin.append("–")
            continue
        diff = [a - b for a, b in zip(h["delta"], m["delta"])]
        spread = max(statistics.stdev(h["delta"]), statistics.stdev(m["delta"]))
        margin.append(f"{statistics.mean(diff):+.2f}" + (f" ({statistics.mean(diff) / spread:+.1f} sd)" if spread else ""))
    lines.append("| hybrid − magnitude | " + " | ".join(margin) + " |")
    walls = [s["dense"]["seconds"] + sum(max(r["seconds"] for r in s["results"] if r["method"] == m)
                                         for m in {r["method"] for r in s["results"]}) for s in summaries]
    lines += ["", f"Wall time of one (model, seed), dense training and all four paths, one thread under the load "
                  f"described above: {statistics.mean(walls) / 60:.1f} min (mean of {len(walls)})."]
    return "\n".join(lines)


def plot(model: str, rows: dict, dense: list[float], path: Path, dataset: str = "fashion-mnist") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.axhline(statistics.mean(dense), color="black", ls="--", lw=1, label=f"dense {statistics.mean(dense):.2f}%")
    for method in METHODS:
        pts = sorted((statistics.mean(r["sparsity"]), statistics.mean(r["test"]),
                      statistics.stdev(r["test"]) if len(r["test"]) > 1 else 0.0)
                     for k, r in rows.items() if k[0] == method and k[1][0] == "target")
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=method)
    ax.set_xlabel("weights removed (%)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"{model} on {dataset}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--models", nargs="+", default=["lenet5", "lenet300", "lenet5-caffe"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.76, 0.9, 0.95, 0.98])
    p.add_argument("--max-drop", type=float, default=0.3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="bench-out/pruning")
    p.add_argument("--force", action="store_true")
    args, extra = p.parse_known_args()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    jobs = [(m, s) for m in args.models for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        outs = list(pool.map(lambda ms: run_one(ms[0], ms[1], args, extra), jobs))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    parts = [f"Command: `python benchmarks/pruning.py {' '.join(sys.argv[1:])}`",
             f"Started {started}; machine: {os.cpu_count()} cores ({cpu}), {platform.platform()}, "
             f"one torch thread per run, {args.jobs} runs side by side.", ""]
    for model in args.models:
        summaries = [json.loads((o / "summary.json").read_text()) for o, (m, _) in zip(outs, jobs) if m == model]
        table, rows = aggregate(model, summaries)
        png = Path(args.out) / f"{model}_accuracy_vs_sparsity.png"
        plot(model, rows, [100 * s["dense"]["test_accuracy"] for s in summaries], png, args.dataset)
        parts += [table, "", "Δ test (pt), mean ± std over seeds; hybrid − magnitude in points and in seed standard "
                  "deviations (the larger of the two methods'):", "", headline(model, rows, summaries), "",
                  f"![{model}]({png.name})", ""]
    text = "\n".join(parts)
    (Path(args.out) / "pruning.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
