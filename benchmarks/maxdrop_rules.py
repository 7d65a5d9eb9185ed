"""Every `--max-drop-rule` on the validation sequences a study logged: the sparsity each rule returns.

Reads the round lines `obdprune compare --no-progress` prints ("METHOD round K: S% of weights removed,
validation V% (dense D%)") from OUT/<model>/seed<k>*.log and applies
:func:`obdprune.stopping.choose_max_drop` to each method's sequence (n = the validation split's size).

    python benchmarks/maxdrop_rules.py bench-out/study15 --max-drop 0.3 --n-val 6000
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from obdprune.stopping import MaxDropRule, choose_max_drop

ROUND = re.compile(r"^(\w+(?: max-drop)?) round (\d+): ([\d.]+)% of weights removed, "
                   r"validation ([\d.]+)% \(dense ([\d.]+)%\)")


def sequences(log: Path) -> tuple[dict[str, list[tuple[float, float]]], float | None]:
    """{method: [(sparsity %, val accuracy)]} in round order, and the dense validation accuracy."""
    seqs: dict[str, list[tuple[float, float]]] = {}
    dense = None
    for line in log.read_text(errors="replace").splitlines():
        m = ROUND.match(line.strip())
        if m:
            seqs.setdefault(m[1], []).append((float(m[3]), float(m[4]) / 100))
            dense = float(m[5]) / 100
    return seqs, dense


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--max-drop", type=float, default=0.3)
    p.add_argument("--n-val", type=int, default=6000)
    args = p.parse_args()
    rules = list(MaxDropRule)
    rows: dict[tuple[str, str], dict[str, list[str]]] = {}
    for log in sorted(args.out.glob("*/seed*.log")):
        seqs, dense = sequences(log)
        for method, seq in seqs.items():
            row = rows.setdefault((log.parent.name, method), {r.value: [] for r in rules})
            for rule in rules:
                k = choose_max_drop(rule, [v for _, v in seq], args.n_val, dense, args.max_drop)
                row[rule.value].append(f"{seq[k - 1][0] if k else 0.0:.1f}")
    print(f"Sparsity (%) each rule returns at `--max-drop {args.max_drop}`, seeds in order ({args.n_val:,} validation "
          f"images):\n")
    print("| model | method | " + " | ".join(r.value for r in rules) + " |")
    print("|---|---|" + "---|" * len(rules))
    for (model, method), row in sorted(rows.items()):
        print(f"| {model} | {method} | " + " | ".join(" / ".join(row[r.value]) for r in rules) + " |")


if __name__ == "__main__":
    main()
