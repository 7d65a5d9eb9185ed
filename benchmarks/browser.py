"""The browser as a runtime: dense against structured pruned models (OBD by MACs in blocks of 8) in headless
Chromium with onnxruntime-web (WebAssembly), beside onnxruntime on the CPU, at batch 1 and 64.

For each model this script trains a dense run on Fashion-MNIST (`obdprune train`), prunes it with
`obdprune prune --method obd --granularity channel --budget macs --channel-multiple 8 --max-drop PP`,
exports the pair as a page (`obdprune export --format web`), opens it in headless Chromium
(`obdprune.web.measure_in_browser`, one wasm thread, median of repeats, models interleaved), and times the
same ONNX files with onnxruntime on the CPU (one thread, interleaved). The floor is an identity model
timed the same way: the fixed cost of one call. Finished runs under --out are reused on a rerun.

    python benchmarks/browser.py --out bench-out/browser --md benchmarks/results/browser.md
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from obdprune.compact import compact
from obdprune.measure import measure_side_by_side
from obdprune.runfile import load_run
from obdprune.web import ORT_WEB_VERSION, measure_in_browser, read_web_manifest
from obdprune.layers import prunable_layers


def obdprune(*args: str) -> None:
    cmd = [sys.executable, "-m", "obdprune", *args]
    print("$ " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def run_model(model: str, args) -> dict:
    root = Path(args.out) / model
    dense, pruned, page = root / "dense", root / "obd-macs8", root / "web"
    data = ["--dataset", "fashion-mnist"] + (["--train-limit", str(args.train_limit)] if args.train_limit else [])
    if not (dense / "manifest.json").exists():
        obdprune("train", *data, "--model", model, "--epochs", str(args.epochs), "--out", str(dense), "--no-progress")
    if not (pruned / "manifest.json").exists():
        obdprune("prune", str(dense), "--method", "obd", "--granularity", "channel", "--budget", "macs",
                 "--channel-multiple", "8", "--prune-step", "0.3", "--max-drop", str(args.max_drop),
                 "--finetune-epochs", str(args.finetune_epochs), "--reg-epochs", "0", "--out", str(pruned),
                 "--no-progress")
    obdprune("export", str(pruned), "--format", "web", "--out", str(page))
    web = read_web_manifest(page)
    res = measure_in_browser(page, repeats=args.repeats, threads=1)
    d, p = load_run(dense), load_run(pruned)
    shape = tuple(web["input_shape"])
    models = {"dense": d.model.eval(), "pruned": compact(p.model.eval(), torch.zeros(2, *shape)).eval(),
              "floor": nn.Identity()}  # the identity model is what floor.onnx holds
    ort = measure_side_by_side(models, shape, batch_sizes=(1, 64), repeats=args.repeats, threads=1,
                               backends=("onnxruntime",),
                               onnx_paths={k: page / f"{k}.onnx" for k in ("dense", "pruned", "floor")})
    return {"model": model, "dense_test_accuracy": d.manifest["metrics"]["test_accuracy"],
            "pruned_test_accuracy": p.manifest["metrics"]["test_accuracy"],
            "dense_val_accuracy": d.manifest["metrics"]["val_accuracy"],
            "pruned_val_accuracy": p.manifest["metrics"]["val_accuracy"],
            "macs_removed": p.manifest["result"].get("macs_removed"),
            "web": web["models"],
            "browser": {k: {f: v for f, v in res[k].items() if f not in ("logits", "predictions")}
                        for k in ("dense", "pruned", "floor")},
            "browser_info": {k: res[k] for k in ("browser", "threads", "crossOriginIsolated", "userAgent")},
            "ort": ort, "units": {k: _widths(m) for k, m in models.items() if k != "floor"}}


def _widths(model: nn.Module) -> str:
    return "-".join(str(m.weight.shape[0]) for _, m in prunable_layers(model))


def render(results: list[dict], args, when: str) -> str:
    info = results[0]["browser_info"]
    lines = [
        "# In the browser: dense against structured pruned, onnxruntime-web (wasm) and onnxruntime (CPU)",
        "",
        f"Measured {when}. Command: `python benchmarks/browser.py {' '.join(sys.argv[1:])}`.",
        f"Machine: {platform.machine()}, {platform.system()} {platform.release()}, 2 shared CPU cores (other jobs "
        f"running); {info['browser']} headless (Debian's package), onnxruntime-web {ORT_WEB_VERSION}, WebAssembly "
        f"SIMD, {info['threads']} thread (cross-origin isolated: {info['crossOriginIsolated']}); onnxruntime "
        f"(Python) CPU, 1 thread.",
        f"Training: Fashion-MNIST{f', {args.train_limit} training images (stratified subset)' if args.train_limit else ''}"
        f", {args.epochs} epochs dense; `obdprune prune --method obd --granularity channel --budget macs "
        f"--channel-multiple 8 --prune-step 0.3 --max-drop {args.max_drop} --finetune-epochs {args.finetune_epochs} "
        f"--reg-epochs 0`; one seed. Latency: median of {args.repeats} repeats after warm-up, models interleaved; "
        "in the browser each batch-1 repeat averages 10 consecutive runs (the page's clock is coarse). "
        "Download: the ONNX file the page fetches (the wasm runtime, 14 MB, is the same for both models). "
        "Floor: an identity model, timed the same way.",
        "",
        f"The dense models are short-trained ({args.epochs} epochs); every pruning round adds "
        f"{args.finetune_epochs} fine-tuning epoch(s), so a pruned model has had more training than its dense "
        "parent, and a positive Δ says as much about those epochs as about pruning. `units` lists the "
        "Conv/Linear output widths after compaction.",
        "",
        "| model | units | test acc | Δ test (pt) | download | browser b1 | browser b64 | ORT CPU b1 | ORT CPU b64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, o = r["browser"], r["ort"]
        for name in ("dense", "pruned"):
            acc = r[f"{name}_test_accuracy"]
            delta = 100 * (acc - r["dense_test_accuracy"])

            def ratio(v, v0):
                return f"{v:.3f} ms" + (f" ({v / v0:.2f}×)" if name == "pruned" else "")

            size = b[name]["bytes"]
            lines.append(
                f"| {r['model']} {name} | {r['units'][name]} | {100 * acc:.2f}% | {delta:+.2f} | {size:,} B"
                + (f" ({size / b['dense']['bytes']:.3f}×)" if name == "pruned" else "") + " | "
                + " | ".join([ratio(b[name]["ms_b1"], b["dense"]["ms_b1"]), ratio(b[name]["ms_b64"], b["dense"]["ms_b64"]),
                              ratio(o[name]["onnxruntime"]["1"], o["dense"]["onnxruntime"]["1"]),
                              ratio(o[name]["onnxruntime"]["64"], o["dense"]["onnxruntime"]["64"])]) + " |")
        f = b["floor"]
        lines.append(f"| {r['model']} floor (identity) | – | – | – | {f['bytes']} B | {f['ms_b1']:.3f} ms | "
                     f"{f['ms_b64']:.3f} ms | {o['floor']['onnxruntime']['1']:.3f} ms | "
                     f"{o['floor']['onnxruntime']['64']:.3f} ms |")
    caffe = next((r for r in results if r["model"] == "lenet5-caffe"), None)
    if caffe:
        b = caffe["browser"]
        delta = 100 * (caffe["pruned_test_accuracy"] - caffe["dense_test_accuracy"])
        t = b["pruned"]["ms_b64"] / b["dense"]["ms_b64"]
        s = b["pruned"]["bytes"] / b["dense"]["bytes"]
        lines += ["", "Goals on lenet5-caffe within 0.5 pt of dense:",
                  f"- accuracy: Δ test {delta:+.2f} pt ({'within' if delta >= -0.5 else 'outside'} 0.5 pt);",
                  f"- browser time at batch 64 ≤ 0.4× dense: {t:.2f}× ({'met' if t <= 0.4 and delta >= -0.5 else 'not met'});",
                  f"- download ≤ 0.25× dense: {s:.3f}× ({'met' if s <= 0.25 and delta >= -0.5 else 'not met'})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lenet5", "lenet5-caffe"])
    ap.add_argument("--out", default="bench-out/browser")
    ap.add_argument("--md", default="benchmarks/results/browser.md")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    results = [run_model(m, args) for m in args.models]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    Path(args.md).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    Path(args.md).write_text(render(results, args, when))
    print(Path(args.md).read_text())


if __name__ == "__main__":
    main()
