"""Does the exact curvature matter? OBD and hybrid pruning with each curvature estimator.

From existing dense runs (one per seed, e.g. those of benchmarks/pruning.py), runs
`obdprune prune --curvature K` for K in exact, mc, empirical-fisher, hutchinson and reports test accuracy
at each target (mean ± std over seeds) and the share of wall time spent computing curvature.

    python benchmarks/curvature_e2e.py --dense bench-out/pruning/lenet5/seed{0,1,2}/dense --out bench-out/curv-e2e
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

KINDS = ("ggn", "ggn-mc", "empirical-fisher", "hessian-hutchinson")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", nargs="+", required=True, help="dense run folders, one per seed")
    p.add_argument("--methods", nargs="+", default=["obd", "hybrid"])
    p.add_argument("--kinds", nargs="+", default=list(KINDS))
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.9, 0.95])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="bench-out/curv-e2e")
    args, extra = p.parse_known_args()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    jobs = [(d, m, k) for d in args.dense for m in args.methods for k in args.kinds]

    def run(job):
        dense, method, kind = job
        seed = json.loads((Path(dense) / "manifest.json").read_text())["seed"]
        out = Path(args.out) / f"{method}-{kind}-seed{seed}"
        if not (out / "summary.json").exists():
            cmd = [sys.executable, "-m", "obdprune", "prune", dense, "--method", method, "--curvature", kind,
                   "--sparsity", *map(str, args.sparsity), "--seed", str(seed), "--out", str(out),
                   "--no-progress", "--threads", "1", *extra]
            log = Path(args.out) / f"{out.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as fh:
                if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode:
                    raise SystemExit(f"failed: {' '.join(cmd)} (see {log})")
        s = json.loads((out / "summary.json").read_text())
        return method, kind, seed, s["results"]

    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(run, jobs))
    table: dict[tuple, dict[float, list[float]]] = {}
    share: dict[tuple, list[float]] = {}
    for method, kind, seed, results in done:
        for r in results:
            table.setdefault((method, kind), {}).setdefault(r["target_sparsity"], []).append(100 * r["test_accuracy"])
        last = max(results, key=lambda r: r["target_sparsity"])
        share.setdefault((method, kind), []).append(last["curvature_seconds"] / last["seconds"])

    def ms(xs):
        return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"

    lines = [f"Command: `python benchmarks/curvature_e2e.py {' '.join(sys.argv[1:])}`",
             f"Started {started}; {os.cpu_count()} cores, one torch thread per run, {args.jobs} runs side by side.", "",
             "| method | curvature | " + " | ".join(f"test acc at {t:.0%}" for t in args.sparsity)
             + " | curvature share of wall time |", "|---|---|" + "---|" * len(args.sparsity) + "---|"]
    for method in args.methods:
        for kind in args.kinds:
            row = table[(method, kind)]
            lines.append(f"| {method} | {kind} | " + " | ".join(ms(row[t]) for t in args.sparsity)
                         + f" | {100 * statistics.mean(share[(method, kind)]):.1f}% |")
    text = "\n".join(lines)
    (Path(args.out) / "curvature_e2e.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
