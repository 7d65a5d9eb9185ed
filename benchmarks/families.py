"""The CNN families people ship, at their standard sizes: what obdprune's curvature, unit analysis and
channel pruning by MACs do on each, next to Torch-Pruning's MetaPruner.

For each family of tests/family_nets.py (width = depth = 1, random weights, 10 classes, 3×64×64 input):

(a) the exact GGN diagonal (``obdprune.diag_ggn``) on ``--curvature-samples`` samples: seconds, and which
    modules took the torch.func fallback;
(b) the unit analysis: Conv/Linear layers with removable units out of all, the others counted by reason;
(c) ``obdprune.prune(method="obd", granularity="channel", budget="macs", sparsity=0.5)`` with no training
    (``reg_epochs=0``, ``finetune_epochs=0``: scoring, selection and masks only), then ``compact()``: the
    compacted model's MACs over the dense model's (the target is 0.50) and the largest absolute difference
    between the masked and the compacted model's outputs;
(d) Torch-Pruning's MetaPruner (magnitude importance p=2, pruning_ratio 0.3 in every layer, the classifier
    ignored, one step): its MACs over the dense model's, or the exception it raised.

A family's failure is recorded in its row as the exception's first line.

    OMP_NUM_THREADS=1 python benchmarks/families.py --out benchmarks/results/families.md
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import platform
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

import obdprune
from obdprune.atomic import atomic_write_text
from obdprune.groups import unit_analysis
from obdprune.layers import prunable_layers
from obdprune.measure import count_macs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from family_nets import FAMILIES, make  # noqa: E402

_FALLBACK = re.compile(r"module '([^']*)' \(([^)]*)\)")


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".replace("|", "\\|")


def curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[str, str]:
    """(seconds, modules on the fallback) of the exact GGN diagonal on (x, y)."""
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            obdprune.diag_ggn(model, x, y)
            seconds = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001 -- the table records every failure
        return first_line(err), "-"
    kinds = Counter(m.group(2) for w in record if (m := _FALLBACK.search(str(w.message))))
    fallback = ", ".join(f"{n}× {kind}" for kind, n in kinds.items()) or "none"
    return f"{seconds:.2f}", fallback


def units(model: nn.Module, x: torch.Tensor) -> tuple[str, str]:
    """('removable/total' Conv/Linear layers, the others counted by reason)."""
    try:
        analysis = unit_analysis(model, x)
    except Exception as err:  # noqa: BLE001
        return first_line(err), "-"
    total = len(prunable_layers(model))
    removable = len({n for g in analysis.groups for n in g.layers})
    reasons = Counter(_reason(kind.value, detail) for kind, detail in analysis.excluded.values())
    return f"{removable}/{total}", "; ".join(f"{n}× {r}" for r, n in reasons.most_common()) or "none"


def _reason(kind: str, detail: str) -> str:
    """The reason without the layer names it mentions, so that equal reasons count together."""
    detail = re.sub(r"'[^']*'", "'…'", detail)
    detail = re.sub(r"\b\d+(\.\w+)+\b", "…", detail)
    return f"{kind} ({detail})".replace("|", "\\|")


def obdprune_column(model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int) -> tuple[str, str, str]:
    """(compacted MACs / dense, max |masked − compacted|, seconds) after pruning half the MACs."""
    dense = count_macs(model, x[:1])
    try:
        t0 = time.perf_counter()
        result = obdprune.prune(model, (x, y), (x[:samples], y[:samples]), method="obd", granularity="channel",
                                budget="macs", sparsity=0.5, example_inputs=x[:1], progress=False, reg_epochs=0,
                                finetune_epochs=0, curvature_samples=samples, batch_size=samples)
        small = result.compact()
        seconds = time.perf_counter() - t0
        masked = result.model.eval()
        with torch.no_grad():
            diff = (masked(x) - small.eval()(x)).abs().max().item()
    except Exception as err:  # noqa: BLE001
        return first_line(err), "-", "-"
    return f"{count_macs(small, x[:1]) / dense:.3f}", f"{diff:.1e}", f"{seconds:.1f}"


def torch_pruning_column(model: nn.Module, x: torch.Tensor) -> str:
    """Compacted MACs / dense after MetaPruner(magnitude, pruning_ratio 0.3, classifier ignored).step()."""
    dense = count_macs(model, x[:1])
    model = copy.deepcopy(model)
    classifier = prunable_layers(model)[-1][1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(model, x[:1], importance=tp.importance.MagnitudeImportance(p=2),
                                          pruning_ratio=0.3, ignored_layers=[classifier])
            pruner.step()
            with torch.no_grad():
                out = model(x[:1])
        if out.shape != (1, 10):
            return f"output shape {tuple(out.shape)}"
        return f"{count_macs(model, x[:1]) / dense:.3f}"
    except Exception as err:  # noqa: BLE001
        return first_line(err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--curvature-samples", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "families.md")
    args = parser.parse_args(argv)

    header = ["family", "params", "dense MACs", "GGN s", "GGN fallback", "layers with units", "excluded (by reason)",
              "obdprune MACs ratio", "max \\|masked − compacted\\|", "obdprune s", "Torch-Pruning MACs ratio"]
    rows = []
    t_all = time.perf_counter()
    for name in args.families:
        torch.manual_seed(0)
        model = make(name).eval()
        n = args.curvature_samples
        x, y = torch.randn(n, 3, args.size, args.size), torch.arange(n) % 10
        t0 = time.perf_counter()
        row = [name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
               f"{count_macs(model, x[:1]) / 1e6:.1f}M"]
        row += curvature(model, x, y)
        row += units(model, x[:1])
        row += obdprune_column(model, x, y, n)
        row.append(torch_pruning_column(model, x))
        rows.append(row)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all

    command = "OMP_NUM_THREADS=1 python benchmarks/families.py" + (f" {' '.join(argv)}" if argv else "")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## CNN families at standard size: curvature, units, channel pruning by MACs",
        "",
        f"Command: `{command}`  ",
        f"Run {when}; machine: {torch.get_num_threads()} thread(s), {platform.platform()}; torch {torch.__version__}, "
        f"torch-pruning {importlib.metadata.version('torch-pruning')}; {total:.0f} s in all.  ",
        f"Random weights (seed 0), 10 classes, input 3×{args.size}×{args.size}; curvature on {args.curvature_samples} "
        "samples. obdprune: `prune(method=\"obd\", granularity=\"channel\", budget=\"macs\", sparsity=0.5, "
        "reg_epochs=0, finetune_epochs=0)` then `compact()` (target MACs ratio 0.50; default min units 4). "
        "Torch-Pruning: `MetaPruner(MagnitudeImportance(p=2), pruning_ratio=0.3, ignored_layers=[classifier])`, "
        "one step. A failure shows the exception's first line.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
