"""Validation accuracy against dense at each target, from the round lines a study logged: the numbers that
choose defaults here (mean over seeds, and over the targets).

Reads "METHOD round K: S% of weights removed, validation V% (dense D%)" from OUT/<model>/seed<k>*.log
(`obdprune compare --no-progress`) and takes, for each target, the round whose sparsity is nearest to it.

    python benchmarks/val_deltas.py bench-out/study15 --models lenet5 lenet300
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from maxdrop_rules import sequences


def deltas(log: Path) -> dict[str, dict[float, float]]:
    """{method: {sparsity %: validation − dense (pt)}} of one log."""
    seqs, dense = sequences(log)
    return {method: {s: 100 * (v - dense) for s, v in seq} for method, seq in seqs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.76, 0.9, 0.95, 0.98, 0.99])
    args = p.parse_args()
    targets = [100 * t for t in args.sparsity]
    print("| model | method | seeds | " + " | ".join(f"{t:g} %" for t in targets) + " | mean |")
    print("|---|---|---|" + "---|" * (len(targets) + 1))
    for model in args.models:
        rows: dict[str, list[list[float]]] = {}
        for log in sorted((args.out / model).glob("seed*.log")):
            for method, seq in deltas(log).items():
                near = [min(seq, key=lambda s: abs(s - t)) for t in targets]
                if all(abs(n - t) < 0.25 for n, t in zip(near, targets)):
                    rows.setdefault(method, []).append([seq[n] for n in near])
        for method, per_seed in sorted(rows.items()):
            means = [statistics.mean(c) for c in zip(*per_seed)]
            print(f"| {model} | {method} | {len(per_seed)} | " + " | ".join(f"{v:+.2f}" for v in means)
                  + f" | {statistics.mean(means):+.2f} |")


if __name__ == "__main__":
    main()
