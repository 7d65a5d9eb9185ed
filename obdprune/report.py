"""Study outputs: summary.json, report.md (the paper-style table) and the accuracy-vs-sparsity plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from obdprune.atomic import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["write_summary", "render_report", "browser_table", "plot_accuracy_vs_sparsity", "write_study_outputs"]

METHOD_ORDER = ("magnitude", "l1", "obd", "hybrid")


def _sort_key(r: dict) -> tuple:
    m = r["method"]
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m, "max_drop" in r,
            r.get("target_sparsity", r.get("sparsity", 0.0)))


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    return atomic_write_json(path, summary)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def render_report(summary: dict[str, Any]) -> str:
    """Markdown report: dense baseline and one row per (method, target) with accuracies and sizes."""
    d = summary["dense"]
    lines = [
        f"# obdprune study: {summary['model']} on {summary['dataset']}",
        "",
        f"Seed {summary['seed']}. Thresholds and `--max-drop` choices use the validation split; "
        "test accuracy is reported only. Sparsity counts exactly-zero Conv/Linear weights.",
        "",
        f"Dense: test {_pct(d['test_accuracy'])}, validation {_pct(d['val_accuracy'])}, "
        f"{d['nonzero_weights']:,} of {d['weights']:,} weights nonzero.",
        "",
    ]
    lines += _schedule_lines(summary.get("prune") or {})
    macs = any("macs_removed" in r for r in summary["results"])
    unit = " of MACs" if (summary.get("prune") or {}).get("budget") == "macs" else ""
    lines += [
        "| method | target | sparsity | nonzero weights | compression |" + (" MACs removed |" if macs else "")
        + " val acc | test acc | Δ test (pt) | seconds | curvature s |",
        "|---|---|---|---|---|" + ("---|" if macs else "") + "---|---|---|---|---|",
    ]
    for r in sorted(summary["results"], key=_sort_key):
        target = f"max-drop {r['max_drop']} pt" if "max_drop" in r else f"{r['target_sparsity']:.2f}{unit}"
        comp = d["weights"] / max(r["nonzero_weights"], 1)
        delta = 100 * (r["test_accuracy"] - d["test_accuracy"])
        mac_cell = (f" {_pct(r['macs_removed'])} |" if "macs_removed" in r else " – |") if macs else ""
        lines.append(
            f"| {r['method']} | {target} | {_pct(r['sparsity'])} | {r['nonzero_weights']:,} | {comp:.1f}× |{mac_cell} "
            f"{_pct(r['val_accuracy'])}{_se(r)} | {_pct(r['test_accuracy'])} | {delta:+.2f} | {r['seconds']:.0f} | "
            f"{r.get('curvature_seconds', 0.0):.1f} |")
    searched = [r for r in sorted(summary["results"], key=_sort_key) if "l1_search" in r]
    if searched:
        lines += ["", "## L1 strength chosen on validation (`l1_lambda` auto: λ = ρ / number of Conv/Linear weights)", "",
                  "| method | result | ρ | λ | validation accuracy per ρ (probe) | search epochs | search s |",
                  "|---|---|---|---|---|---|---|"]
        for r in searched:
            search = r["l1_search"]
            cands = ", ".join(f"{c['strength']:g}: {_pct(c['val_accuracy'])}" for c in search["candidates"])
            label = f"max-drop {r['max_drop']} pt" if "max_drop" in r else f"{r['target_sparsity']:.2f}"
            lines.append(f"| {r['method']} | {label} | {search['strength']:g} | {search['l1_lambda']:.3g} | {cands} | "
                         f"{search['epochs']} | {search['seconds']:.0f} |")
        if summary.get("targets") and any("max_drop" in r for r in searched):
            lines += ["", "The max drop of a method with a searched λ comes from a path of its own: its λ is searched on "
                          "a grid one factor of 4 gentler, so that the method's first rounds stay at dense accuracy "
                          "(its seconds are that path's)."]
    excluded = summary.get("excluded_layers")
    if excluded:
        lines += ["", "## Layers that keep all their units", ""] + [f"- `{n}`: {why}" for n, why in excluded.items()]
    extra = summary.get("speed_table")
    if extra:
        lines += ["", "## Size and speed (compacted models; ratios to dense)", "", extra]
    if "browser" in d:
        lines += ["", "## In the browser (onnxruntime-web, WebAssembly; ratios to dense on the same page)", "",
                  browser_table(summary)]
    lines += ["", "![accuracy vs sparsity](accuracy_vs_sparsity.png)", ""]
    return "\n".join(lines)


def _se(r: dict) -> str:
    return f" ± {100 * r['val_accuracy_se']:.2f}" if "val_accuracy_se" in r else ""


def _schedule_lines(prune: dict) -> list[str]:
    """What every method's training was: the schedule, its budget and the recovery options in force."""
    if not prune:
        return []
    ft = (prune.get("finetune") or {}).get("epochs")
    if prune.get("prune_schedule") == "gradual":
        text = (f"Schedule: gradual (cubic sparsity ramp) inside one run of {prune['total_epochs']} epochs per method "
                f"({prune.get('reg_epochs')} before the ramp, {ft} after it), pruning every {prune['prune_every']} "
                f"steps.")
    else:
        text = (f"Schedule: rounds of prune → fine-tune: {prune.get('reg_epochs')} epochs before the first round, "
                f"{ft} after each.")
    recipe = [name for name, on in (("learning-rate rewinding", prune.get("lr_rewind")),
                                    (f"distillation T={(prune.get('distill') or [0, 0])[0]:g} "
                                     f"α={(prune.get('distill') or [0, 0])[1]:g}", prune.get("distill")),
                                    (f"criterion {prune.get('criterion')}", prune.get("criterion")),
                                    ("OBS weight update", prune.get("update") == "obs"),
                                    ("λ searched on validation", prune.get("l1_lambda") == "auto"),
                                    (f"max-drop rule {prune.get('max_drop_rule')}",
                                     prune.get("max_drop_rule") not in (None, "monotone"))) if on]
    if recipe:
        text += " Recovery recipe: " + ", ".join(recipe) + "."
    return [text + " Validation accuracy ± its standard error √(p(1−p)/n).", ""]


def browser_table(summary: dict[str, Any]) -> str:
    """Markdown table of the ``browser`` entries (``compare --browser``): download and latency per model."""
    d, info = summary["dense"], summary.get("browser") or {}
    lines = ["| model | test acc | download | batch 1 | batch 64 |", "|---|---|---|---|---|",
             f"| dense | {_pct(d['test_accuracy'])} | {d['browser']['bytes']:,} B | {d['browser']['ms_b1']:.3f} ms | "
             f"{d['browser']['ms_b64']:.3f} ms |"]
    for r in sorted(summary["results"], key=_sort_key):
        b = r.get("browser")
        if not b:
            continue
        lines.append(
            f"| {Path(r['path']).name} | {_pct(r['test_accuracy'])} | {b['bytes']:,} B "
            f"({b['bytes'] / d['browser']['bytes']:.3f}×) | {b['ms_b1']:.3f} ms ({b['ms_b1'] / b['dense_ms_b1']:.2f}×) | "
            f"{b['ms_b64']:.3f} ms ({b['ms_b64'] / b['dense_ms_b64']:.2f}×) |")
    floor = info.get("floor") or {}
    lines += ["", f"{info.get('browser', 'Chromium')}, onnxruntime-web {info.get('onnxruntime_web', '?')}, "
              f"{info.get('threads', '?')} thread(s), median of {info.get('repeats', '?')} repeats; each pruned model "
              "is timed beside the dense one on its own page (`web/<result>/`), and the ratios are to that dense time."
              + (f" Floor (an identity model, the fixed cost of one call): {floor['ms_b1']:.3f} ms at batch 1, "
                 f"{floor['ms_b64']:.3f} ms at batch 64." if floor else "")]
    return "\n".join(lines)


def plot_accuracy_vs_sparsity(path: str | Path, summary: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    dense = summary["dense"]["test_accuracy"]
    ax.axhline(100 * dense, color="black", lw=1, ls="--", label=f"dense {100 * dense:.2f}%")
    by_method: dict[str, list[dict]] = {}
    for r in summary["results"]:
        if "target_sparsity" in r:
            by_method.setdefault(r["method"], []).append(r)
    for method in sorted(by_method, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99):
        rs = sorted(by_method[method], key=lambda r: r["sparsity"])
        ax.plot([100 * r["sparsity"] for r in rs], [100 * r["test_accuracy"] for r in rs], marker="o", label=method)
    for r in summary["results"]:
        if "max_drop" in r:
            ax.scatter([100 * r["sparsity"]], [100 * r["test_accuracy"]], marker="*", s=80, zorder=3)
    ax.set_xlabel("weights removed (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{summary['model']} on {summary['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()

    def _write(tmp: Path) -> None:
        fig.savefig(tmp, format="png")

    atomic_write(path, _write)
    plt.close(fig)
    return Path(path)


def write_study_outputs(out: str | Path, summary: dict[str, Any]) -> None:
    out = Path(out)
    write_summary(out / "summary.json", summary)
    atomic_write_text(out / "report.md", render_report(summary))
    if summary["results"]:
        plot_accuracy_vs_sparsity(out / "accuracy_vs_sparsity.png", summary)
