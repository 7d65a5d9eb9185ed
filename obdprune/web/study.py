"""Browser numbers for ``bench --browser`` and ``compare --browser``: export, open in Chromium, read back."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from obdprune.runfile import LoadedRun
from obdprune.web.browser import measure_in_browser
from obdprune.web.export import export_web

__all__ = ["browser_bench", "browser_study", "browser_entry"]


def browser_entry(results: dict[str, Any], label: str) -> dict[str, Any]:
    """``{ms_b1, ms_b64, bytes}`` of one model (``dense`` or ``pruned``) of a page's published results."""
    return {k: results[label][k] for k in ("ms_b1", "ms_b64", "bytes")}


def browser_bench(run: str | Path | LoadedRun, *, dense: str | Path | LoadedRun | None = None, repeats: int = 20,
                  threads: int | None = 1, out: str | Path | None = None) -> dict[str, Any]:
    """Export ``run`` with its dense parent (into ``out``, else a temporary folder) and measure both in
    headless Chromium. Returns the page's results (see :func:`obdprune.web.measure_in_browser`)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out is not None else Path(tmp) / "web"
        export_web(run, folder, dense=dense)
        return measure_in_browser(folder, repeats=repeats, threads=threads)


def browser_study(summary: dict[str, Any], out: str | Path, *, repeats: int = 20, threads: int | None = 1,
                  log=print) -> dict[str, Any]:
    """Add ``browser`` = ``{ms_b1, ms_b64, bytes}`` to ``summary['dense']`` and to every result of a study.

    Each result becomes a page in ``out/web/<label>`` that runs it beside the dense model; the dense
    numbers come from the first page, and each result also keeps the dense times measured on its own
    page (``dense_ms_b1``, ``dense_ms_b64``) for side-by-side ratios. ``summary['browser']`` names the
    browser, the thread count and the floor (an identity model)."""
    for r in summary["results"]:
        label = Path(r["path"]).name
        res = browser_bench(r["path"], dense=summary["dense"]["path"], repeats=repeats, threads=threads,
                            out=Path(out) / "web" / label)
        r["browser"] = browser_entry(res, "pruned") | {"dense_ms_b1": res["dense"]["ms_b1"],
                                                         "dense_ms_b64": res["dense"]["ms_b64"],
                                                         "sample_accuracy": res["pruned"]["accuracy"]}
        if "browser" not in summary["dense"]:
            summary["dense"]["browser"] = browser_entry(res, "dense")
            summary["browser"] = {"browser": res["browser"], "threads": res["threads"], "repeats": repeats,
                                  "onnxruntime_web": res["onnxruntimeWeb"], "floor": res["floor"]}
        log(f"  {label} in {res['browser']}: batch 64 {res['pruned']['ms_b64']:.2f} ms "
            f"(dense {res['dense']['ms_b64']:.2f} ms), download {res['pruned']['bytes']:,} B "
            f"(dense {res['dense']['bytes']:,} B)")
    return summary
