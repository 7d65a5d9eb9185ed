"""Recovery-recipe ablation: `obdprune compare` once per (recipe variant, seed), then one table per method
with validation and test accuracy, seconds and curvature share of every variant at every target.

A variant is NAME=ARGS, ARGS the compare flags it adds (quoted, space-separated); every variant gets the
same common flags (`--dataset`, `--model`, `--seed`, `--sparsity`, `--methods` and what follows `--`).
The variant chosen per method is the one with the best mean *validation* accuracy over the targets; test
accuracy is only reported. Runs land in OUT/<variant>/seed<k>/ and are reused when finished.

    python benchmarks/recipe.py --model lenet5 --seeds 0 1 2 --out bench-out/recipe -- --train-limit 20000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

GRADUAL = "--prune-schedule gradual --total-epochs 30"
VARIANTS = {
    "rounds": "",
    "gradual": GRADUAL,
    "gradual+rewind": f"{GRADUAL} --lr-rewind",
    "gradual+distill": f"{GRADUAL} --distill 2 0.5",
    "gradual+obs": f"{GRADUAL} --update obs",
    "gradual+auto": f"{GRADUAL} --l1-lambda auto",
}


def run_one(variant: str, flags: str, seed: int, args, extra: list[str]) -> Path:
    out = Path(args.out) / variant / f"seed{seed}"
    if (out / "summary.json").exists():
        return out
    cmd = [sys.executable, "-m", "obdprune", "compare", "--dataset", args.dataset, "--model", args.model,
           "--seed", str(seed), "--sparsity", *map(str, args.sparsity), "--methods", *args.methods,
           "--out", str(out), "--no-progress", "--threads", "1", "--no-measure", *shlex.split(flags), *extra]
    if (out / "state.json").exists():
        cmd.append("--resume")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out.parent / f"seed{seed}.log", "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"{variant} seed {seed}: exit {r.returncode} in {time.time() - t0:.0f} s", flush=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {out.parent / f'seed{seed}.log'}")
    return out


def ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def tables(variants: dict[str, str], summaries: dict[str, list[dict]], methods: list[str]) -> list[str]:
    """Per method: one row per variant, val / Δ test per target, seconds and curvature share."""
    targets = sorted({r["target_sparsity"] for ss in summaries.values() for s in ss for r in s["results"]
                      if "target_sparsity" in r and r["target_sparsity"] is not None})
    lines = []
    for method in methods:
        head = " | ".join(f"{100 * t:g} % val / Δ test" for t in targets)
        lines += [f"### {method}", "", f"| variant | {head} | mean val | seconds | curvature share |",
                  "|---|" + "---|" * (len(targets) + 3)]
        best = None
        for variant, ss in summaries.items():
            cells, vals, secs, shares = [], [], [], []
            for t in targets:
                val, delta = [], []
                for s in ss:
                    r = next((r for r in s["results"] if r["method"] == method and r.get("target_sparsity") == t), None)
                    if r is None:
                        continue
                    val.append(100 * r["val_accuracy"])
                    delta.append(100 * (r["test_accuracy"] - s["dense"]["test_accuracy"]))
                    if t == targets[-1]:
                        secs.append(r["seconds"])
                        shares.append(r.get("curvature_seconds", 0.0) / max(r["seconds"], 1e-9))
                cells.append(f"{ms(val)} / {ms(delta)}" if val else "–")
                vals += [statistics.mean(val)] if val else []
            if len(vals) != len(targets):
                continue
            mean_val = statistics.mean(vals)
            if best is None or mean_val > best[1]:
                best = (variant, mean_val)
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {mean_val:.2f} | {statistics.mean(secs):.0f} | "
                         f"{100 * statistics.mean(shares):.1f}% |")
        if best is not None:
            lines += ["", f"Best on validation: **{best[0]}** (mean val {best[1]:.2f} %)."]
        lines.append("")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.9, 0.95, 0.98, 0.99])
    p.add_argument("--methods", nargs="+", default=["magnitude", "obd", "hybrid"])
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME=ARGS",
                   help=f"recipe variants (default: {', '.join(VARIANTS)})")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench-out/recipe"))
    p.add_argument("--report", type=Path, default=None, help="write the tables here (markdown)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    variants = dict(v.split("=", 1) for v in args.variants) if args.variants else VARIANTS
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    jobs = [(v, s) for v in variants for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        outs = list(pool.map(lambda vs: run_one(vs[0], variants[vs[0]], vs[1], args, extra), jobs))
    summaries = {v: [json.loads((o / "summary.json").read_text()) for o, (w, _) in zip(outs, jobs) if w == v]
                 for v in variants}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    text = [f"Command: `python benchmarks/recipe.py {' '.join(argv)}`",
            f"Started {started}; machine: {os.cpu_count()} cores ({cpu}), {platform.platform()}, one torch thread "
            f"per run, {args.jobs} side by side. Variants: " + "; ".join(f"`{k}`: `{v or '(defaults)'}`"
                                                                         for k, v in variants.items()), "",
            "Cells: validation accuracy % / Δ test accuracy (pt, against each seed's dense model), mean ± std over "
            f"seeds {args.seeds}; seconds and curvature share of the last target's result.", ""]
    text += tables(variants, summaries, args.methods)
    print("\n".join(text))
    if args.report is not None:
        args.report.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
