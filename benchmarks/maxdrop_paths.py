"""The max drop of l1 and hybrid on a path of its own (λ searched on the max-drop grid) against the same max
drop taken from the targets' path (λ searched for the targets), seed by seed.

The targets' path is read from a `compare` study's logs (OUT/<model>/seed<k>*.log, the round lines) and the
max-drop rule is applied to it offline (:func:`obdprune.stopping.choose_max_drop`); magnitude and obd are
shown the same way for reference. The own paths are `obdprune prune` runs of each seed's dense model:

    for m in lenet5 lenet300 lenet5-caffe; do for s in 0 1 2; do for meth in l1 hybrid; do
      g=lh; [ $m = lenet5-caffe ] && g=lo   # the study's folder that holds the seed's dense model
      obdprune prune bench-out/study15/$m/seed$s-$g/dense --method $meth --max-drop 0.3 --seed $s \\
        --threads 1 --no-progress --out bench-out/md64/$m/seed$s-$meth > bench-out/md64/$m/seed$s-$meth.log
    done; done; done
    python benchmarks/maxdrop_paths.py bench-out/study15 bench-out/md64 --models lenet5 lenet300 lenet5-caffe
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from maxdrop_rules import sequences
from obdprune.stopping import MaxDropRule, choose_max_drop


def _offline(study: Path, model: str, seed: int, n_val: int, max_drop: float) -> dict[str, float]:
    """{method: sparsity % the default rule returns} on the study's logged rounds of one seed."""
    got: dict[str, float] = {}
    for log in sorted((study / model).glob(f"seed{seed}*.log")):
        seqs, dense = sequences(log)
        for method, seq in seqs.items():
            k = choose_max_drop(MaxDropRule.MONOTONE, [v for _, v in seq], n_val, dense, max_drop)
            got[method] = seq[k - 1][0] if k else 0.0
    return got


def _dense(study: Path, model: str, seed: int) -> dict:
    for summary in sorted((study / model).glob(f"seed{seed}*/summary.json")):
        return json.loads(summary.read_text())["dense"]
    raise SystemExit(f"no summary.json for {model} seed {seed} under {study}")


def _cell(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:+.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:+.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", type=Path, help="the compare study whose logs hold the targets' paths")
    p.add_argument("runs", type=Path, help="the prune runs: RUNS/<model>/seed<k>-<method>/manifest.json")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-drop", type=float, default=0.3)
    p.add_argument("--n-val", type=int, default=6000)
    args = p.parse_args()
    print(f"Sparsity (%) at `--max-drop {args.max_drop:g}`, seeds {' / '.join(map(str, args.seeds))}; Δ against "
          f"each seed's dense model, mean ± std over seeds (pt).\n")
    print("| model | method | from the targets' path | own path | own path: Δ val | own path: Δ test | ρ chosen | "
          "own path: rounds, min |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        offline = {s: _offline(args.study, model, s, args.n_val, args.max_drop) for s in args.seeds}
        for method in ("magnitude", "obd", "l1", "hybrid"):
            old = " / ".join(f"{offline[s].get(method, float('nan')):.1f}" for s in args.seeds)
            runs = [args.runs / model / f"seed{s}-{method}" / "manifest.json" for s in args.seeds]
            if not all(r.exists() for r in runs):
                print(f"| {model} | {method} | {old} | (one path) | | | | |")
                continue
            results = [json.loads(r.read_text())["result"] for r in runs]
            dense = [_dense(args.study, model, s) for s in args.seeds]
            new = " / ".join(f"{100 * r['sparsity']:.1f}" for r in results)
            dval = [100 * (r["val_accuracy"] - d["val_accuracy"]) for r, d in zip(results, dense)]
            dtest = [100 * (r["test_accuracy"] - d["test_accuracy"]) for r, d in zip(results, dense)]
            rho = " / ".join(f"{r['l1_search']['strength']:g}" for r in results)
            rounds = " / ".join(str(len(sequences(run.parent.with_suffix(".log"))[0].get(method, []))) for run in runs)
            minutes = statistics.mean(r["seconds"] for r in results) / 60
            print(f"| {model} | {method} | {old} | {new} | {_cell(dval)} | {_cell(dtest)} | {rho} | {rounds}, "
                  f"{minutes:.1f} |")


if __name__ == "__main__":
    main()
