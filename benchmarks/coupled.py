"""Channel pruning of coupled CNNs by MACs: obdprune (structured ``obd`` / ``hybrid``, blocks of channels)
against Torch-Pruning's MetaPruner (magnitude, Taylor, Hessian importance) at the same MAC targets.

Every variant starts from the same dense weights (trained here, ``--epochs``) and gets the same epochs
after them: obdprune's ``reg_epochs`` + ``finetune_epochs`` per round (rounds of ``--prune-step``);
Torch-Pruning ``reg_epochs`` of plain training before pruning and, after it, as many fine-tuning epochs
as the obdprune variant of that target with the most rounds spent on them (the column "epochs").
Torch-Pruning prunes 2% of channels per step (``ignored_layers`` = the classifier) until its MACs reach
the target. Accuracy is mean ± std over ``--seeds``; times are CPU-time ratios to the dense model
(onnxruntime and PyTorch, batch 1 and 256, medians, all variants of a seed timed round-robin).

    python benchmarks/coupled.py --models resnet20 --seeds 0 1 2 --train-limit 5000 --epochs 5 --reg-epochs 1 \
        --finetune-epochs 1 --prune-step 0.3 --variants global:8 layer:8 layer:1 --out bench-out/cpl_r20.md
    python benchmarks/coupled.py --merge bench-out/cpl_r20.json bench-out/cpl_r20_more_seeds.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

import obdprune
from obdprune.data import load_dataset
from obdprune.errors import UsageError
from obdprune.export import export_onnx
from obdprune.measure import count_macs
from obdprune.methods import sparsity_path
from obdprune.models import build_model
from obdprune.train import TrainConfig, evaluate, train


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tp_prune(dense: nn.Module, data, importance: str, mac_target: float, epochs: int, finetune_epochs: int, args,
             seed: int) -> nn.Module:
    model = copy.deepcopy(dense)
    x = data.train.x[:2]
    ft = TrainConfig(epochs=epochs, lr=args.lr, batch_size=args.batch_size, schedule="cosine", seed=seed)
    train(model, data.train, ft, progress=False)  # the epochs obdprune spends regularizing
    imp = {"magnitude": tp.importance.MagnitudeImportance(p=2), "taylor": tp.importance.TaylorImportance(),
           "hessian": tp.importance.GroupHessianImportance()}[importance]
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    dense_macs = count_macs(dense, x[:1])
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=0.98, iterative_steps=49,
                                  ignored_layers=[head], global_pruning=False)
    for _ in range(49):
        if importance in ("taylor", "hessian"):
            model.zero_grad()
            xb, yb = data.train.x[:64], data.train.y[:64]
            if importance == "taylor":
                F.cross_entropy(model(xb), yb).backward()
            else:
                for i in range(len(xb)):
                    model.zero_grad()
                    F.cross_entropy(model(xb[i:i + 1]), yb[i:i + 1]).backward()
                    imp.accumulate_grad(model)
        pruner.step()
        if count_macs(model, x[:1]) <= (1 - mac_target) * dense_macs:
            break
    train(model, data.train, TrainConfig(epochs=finetune_epochs, lr=args.lr, batch_size=args.batch_size,
                                         schedule="cosine", seed=seed + 1), progress=False)
    return model


def _ort_session(model: nn.Module, x: torch.Tensor):
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(model.eval(), x[:1], path, check_inputs=x[:4], atol=1e-3)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_ratios(variants: dict[str, nn.Module], x1: torch.Tensor, xb: torch.Tensor, reps: int) -> dict[str, dict]:
    """CPU-time ratios to ``variants["dense"]`` (PyTorch and onnxruntime, batch 1 and len(xb)), the
    repeats interleaved round-robin over all variants so that load from elsewhere hits them alike."""
    runners = {}
    for label, model in variants.items():
        model.eval()
        sess = _ort_session(model, x1)
        name = sess.get_inputs()[0].name
        runners[label] = {"torch1": lambda m=model: m(x1), "torch256": lambda m=model: m(xb),
                          "ort1": lambda s=sess, n=name: s.run(None, {n: x1.numpy()}),
                          "ort256": lambda s=sess, n=name: s.run(None, {n: xb.numpy()})}
    times = {label: {k: [] for k in r} for label, r in runners.items()}
    with torch.inference_mode():
        for r in runners.values():
            for fn in r.values():
                fn()  # warm-up
        for rep in range(reps):
            for label, r in runners.items():
                for k, fn in r.items():
                    if k.endswith("256") and rep % 4:
                        continue  # the large batch a quarter as often
                    t = time.process_time()
                    fn()
                    times[label][k].append(time.process_time() - t)
    med = {label: {k: statistics.median(v) for k, v in t.items()} for label, t in times.items()}
    return {label: {k: v / med["dense"][k] for k, v in m.items()} for label, m in med.items()}


def table(name: str, rows: dict[str, dict[str, list[float]]]) -> list[str]:
    """Markdown rows: accuracy mean ± std over seeds, mean params/MACs, median CPU-time ratios to dense."""
    lines = [f"## {name}", "", "| variant | test acc % | params | MACs | epochs | ort b1 | ort b256 | torch b1 | "
             "torch b256 |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        acc = r["acc"]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(f"| {label} | {statistics.mean(acc):.2f} ± {sd:.2f} | {statistics.mean(r['params']):,.0f} | "
                     f"{statistics.mean(r['macs']):,.0f} | {_epochs(r)} | " + " | ".join(
                         f"{statistics.median(r[k]):.2f}×" for k in ("ort1", "ort256", "torch1", "torch256")) + " |")
    lines.append("")
    return lines


def _epochs(r: dict) -> str:
    """Epochs after the dense model's (their range over seeds; runs older than the column: ?)."""
    e = r.get("epochs")
    return "?" if not e else (f"{min(e)}" if min(e) == max(e) else f"{min(e)}–{max(e)}")


def best_table(rows: dict[str, dict[str, list[float]]]) -> list[str]:
    """Per MAC target: obdprune's and Torch-Pruning's most accurate variant (mean over seeds), side by side."""
    dense_macs = statistics.mean(rows["dense"]["macs"])
    targets = sorted({label.split()[-1] for label in rows if label != "dense"})
    lines = ["| MACs removed | best obdprune | best Torch-Pruning | Δ (pt) | ORT b256 obdprune / TP | "
             "torch b256 obdprune / TP |", "|---|---|---|---|---|---|"]
    for t in targets:
        best = {}
        for tool in ("obdprune", "TP"):
            cands = [(statistics.mean(r["acc"]), label) for label, r in rows.items()
                     if label.startswith(tool) and label.split()[-1] == t]
            if cands:
                best[tool] = max(cands)
        if len(best) < 2:
            continue

        def cell(tool: str) -> str:
            acc, label = best[tool]
            r = rows[label]
            sd = statistics.stdev(r["acc"]) if len(r["acc"]) > 1 else 0.0
            name = " ".join(label.split()[1:-1])
            return f"{name} {acc:.2f} ± {sd:.2f} ({statistics.mean(r['macs']) / dense_macs:.3f}×)"

        ratio = {k: " / ".join(f"{statistics.median(rows[best[tool][1]][k]):.2f}×" for tool in ("obdprune", "TP"))
                 for k in ("ort256", "torch256")}
        lines.append(f"| {t} | {cell('obdprune')} | {cell('TP')} | {best['obdprune'][0] - best['TP'][0]:+.2f} | "
                     f"{ratio['ort256']} | {ratio['torch256']} |")
    return lines + [""]


def _unreachable(labels: dict[str, str]) -> list[str]:
    return [f"- {label}: not reachable ({why})" for label, why in labels.items()] + ([""] if labels else [])


def _row_order(item: tuple[str, dict]) -> tuple:
    """dense first, then by MAC target; obdprune before Torch-Pruning within a target."""
    label = item[0]
    if label == "dense":
        return (0.0, 0, "")
    return (float(label.split()[-1]), label.startswith("TP"), label)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2-small"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7], help="share of dense MACs removed")
    p.add_argument("--train-limit", type=int, default=20000)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--epochs", type=int, default=10, help="dense training")
    p.add_argument("--reg-epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=2, help="obdprune: per round")
    p.add_argument("--prune-step", type=float, default=0.3, help="obdprune: the most of the MACs left one round removes")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--importances", nargs="*", default=["magnitude", "taylor", "hessian"],
                   help="Torch-Pruning importances (none: obdprune variants only)")
    p.add_argument("--methods", nargs="+", default=["obd", "hybrid"], help="obdprune methods")
    p.add_argument("--curvature-samples", type=int, default=512, help="GGN samples per obdprune round")
    p.add_argument("--no-distill", action="store_true",
                   help="obdprune: fine-tune without distillation from the dense model (its default is on)")
    p.add_argument("--variants", nargs="+", default=["global:8", "layer:8"], metavar="SCOPE:MULTIPLE",
                   help="obdprune's MAC selection (global: score per MAC across layers; layer: the same share "
                        "per group) and the block of channels removed together")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="only render one table from the .json files of earlier runs (e.g. one per seed)")
    args = p.parse_args()
    started = time.time()
    if args.merge:
        runs = [json.loads(f.read_text()) for f in args.merge]
        rows: dict[str, dict[str, list[float]]] = {}
        seen: set[tuple[str, int]] = set()
        for run in runs:
            for label, r in run["rows"].items():
                for i, seed in enumerate(run["seeds"]):
                    if (label, seed) in seen:  # e.g. the dense model of a seed that two runs trained alike
                        continue
                    seen.add((label, seed))
                    for k, v in r.items():
                        rows.setdefault(label, {}).setdefault(k, []).append(v[i])
        text = "\n".join([f"Merged from {', '.join(str(f) for f in args.merge)}:", ""]
                         + [h for run in runs for h in run["header"][:1]] + [""]
                         + table(runs[0]["model"], dict(sorted(rows.items(), key=_row_order)))
                         + ["Most accurate variant of each tool per target (mean ± std over seeds, MACs kept):", ""]
                         + best_table(rows))
        print(text)
        if args.out is not None:
            args.out.write_text(text + "\n")
        return
    torch.set_num_threads(1)
    data = load_dataset("fashion-mnist", train_limit=args.train_limit, test_limit=args.test_limit)
    shape = tuple(data.train.x.shape[1:])
    lines = [f"Fashion-MNIST ({len(data.train)} training images), seeds {args.seeds}; `{' '.join(sys.argv[1:])}`", ""]
    for name in args.models:
        rows: dict[str, dict[str, list[float]]] = {}
        unreachable: dict[str, str] = {}
        for seed in args.seeds:
            torch.manual_seed(seed)
            dense = build_model(name, shape, 10)
            train(dense, data.train, TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                                 schedule="cosine", seed=seed), progress=False)
            x1, xb = data.test.x[:1].contiguous(), data.test.x[:256].contiguous()
            variants: dict[str, nn.Module] = {"dense": dense}
            epochs: dict[str, int] = {"dense": 0}
            for target in args.targets:
                spent = []  # epochs of this target's obdprune variants
                for method in args.methods:
                    for variant in args.variants:
                        scope, multiple = variant.split(":")
                        label = f"obdprune {method} {scope} x{multiple}{' no-KD' if args.no_distill else ''} {target}"
                        log(f"{name} seed {seed}: {label} ({time.time() - started:.0f} s)")
                        try:
                            res = obdprune.prune(dense, data.train, data.val, method=method, granularity="channel",
                                                 budget="macs", scope=scope, sparsity=target,
                                                 example_inputs=data.train.x[:2], channel_multiple=int(multiple),
                                                 reg_epochs=args.reg_epochs, finetune_epochs=args.finetune_epochs,
                                                 prune_step=args.prune_step,
                                                 finetune_lr=args.lr, batch_size=args.batch_size,
                                                 curvature_samples=args.curvature_samples, seed=seed, progress=False,
                                                 **({"distill": None} if args.no_distill else {}))
                        except UsageError as e:  # e.g. blocks of 16 on 16-wide layers cannot reach 0.3× MACs
                            log(f"  not reachable: {str(e).splitlines()[0]}")
                            unreachable.setdefault(label, str(e).splitlines()[0])
                            continue
                        variants[label] = res.compact()
                        epochs[label] = args.reg_epochs + args.finetune_epochs * len(res.rounds)
                        spent.append(epochs[label])
                for imp in args.importances:
                    log(f"{name} seed {seed}: Torch-Pruning {imp} {target} ({time.time() - started:.0f} s)")
                    label = f"TP {imp} {target}"
                    epochs[label] = max(spent, default=args.reg_epochs + args.finetune_epochs
                                        * len(sparsity_path([target], args.prune_step)))  # no variant ran
                    variants[label] = tp_prune(dense, data, imp, target, args.reg_epochs,
                                               epochs[label] - args.reg_epochs, args, seed)
            ratios = time_ratios(variants, x1, xb, args.reps)
            for label, model in variants.items():
                r = rows.setdefault(label, {})
                r.setdefault("acc", []).append(100 * evaluate(model, data.test)[0])
                r.setdefault("params", []).append(sum(q.numel() for q in model.parameters()))
                r.setdefault("macs", []).append(count_macs(model, x1))
                r.setdefault("epochs", []).append(epochs[label])
                for k, v in ratios[label].items():
                    r.setdefault(k, []).append(v)
            log(f"{name} seed {seed} done after {time.time() - started:.0f} s")
            if args.out is not None:  # partial results survive an interrupted run
                args.out.write_text("\n".join(lines + table(name, rows) + _unreachable(unreachable)) + "\n")
                args.out.with_suffix(".json").write_text(json.dumps({"header": lines, "model": name, "seeds": args.seeds[:len(rows["dense"]["acc"])], "rows": rows}))
        lines += table(name, rows) + _unreachable(unreachable)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
