"""Command-line interface: parse → config → one library call → write results.

Errors a user can cause print one line and exit with 2 (usage) or 1 (runtime); never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from obdprune.errors import Interrupted, ObdpruneError, OutputError, OutputExistsError, UsageError

RESUME_HELP = "continue an interrupted run (same arguments) after its last finished stage"
OVERWRITE_HELP = "replace an existing output at --out (only what obdprune wrote is ever replaced)"
STOPPABLE = ("train", "prune", "compare", "import-torch")  # SIGINT/SIGTERM stop these at a step boundary
MODEL_HELP = ("lenet300, lenet5, lenet5-caffe, vgg-small, or your own as FILE.py:FACTORY or package.module:FACTORY "
              "(FACTORY(input_shape=(C, H, W), num_classes=K) -> nn.Module). Your file is trusted code: it is run, like "
              "running a script; runs record its SHA-256 and are refused if it changes")
DEMO = dict(dataset="fashion-mnist", model="lenet5", epochs=6, sparsity=[0.76, 0.9, 0.95], finetune_epochs=1,
            reg_epochs=1, prune_step=0.6, measure_repeats=10, out="obdprune-demo")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def _number(cast: type, ok, says: str, what: str = "a number"):
    """An argparse type: ``cast(text)`` that must satisfy ``ok``; ``says`` completes "must be ..."."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"must be {says}, got {text}")
        return v

    return parse


_fraction_open = _number(float, lambda v: 0.0 < v < 1.0, "a fraction in (0, 1)")
_points = _number(float, lambda v: 0.0 <= v <= 100.0, "percentage points in [0, 100]", "a number of percentage points")
_positive_int = _number(int, lambda v: v >= 1, ">= 1", "an integer")
_nonneg_int = _number(int, lambda v: v >= 0, ">= 0", "an integer")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
_seed = _number(int, lambda v: 0 <= v < 2**32, "in [0, 2**32)", "an integer")
_threads_count = _number(int, lambda v: 1 <= v <= 1024, "in [1, 1024]", "an integer")
_unit_interval = _number(float, lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1]")


def _l1_lambda(text: str) -> float | str:
    """``auto`` or a number >= 0."""
    return "auto" if text.strip().lower() == "auto" else _nonneg_float(text)


def _add_common(p: argparse.ArgumentParser, *, lr: float | None = None) -> None:
    p.add_argument("--seed", type=_seed, default=0, help="seed for initialization, shuffling and sampling")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    if lr is not None:
        p.add_argument("--lr", type=_positive_float, default=lr, help=f"learning rate (default: {lr})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=_threads_count, default=None, help="torch CPU threads")


def _add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    from obdprune.data import DATASETS

    p.add_argument("--dataset", required=required,
                   help=f"one of: {', '.join(DATASETS)}. folder: your images as DIR/train/<class>/*.png|jpg and "
                        f"DIR/test/<class>/*; npz: your arrays x_train, y_train, x_test, y_test in FILE.npz")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (for npz: the .npz file)")
    p.add_argument("--image-size", type=_positive_int, nargs=2, default=None, metavar=("H", "W"),
                   help="with --dataset folder: resize every image to H x W (else all must share one size)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of training images held out for validation")
    p.add_argument("--train-limit", type=_positive_int, default=None, help="use a stratified subset of the training set")
    p.add_argument("--test-limit", type=_positive_int, default=None, help="use a stratified subset of the test set")


def _add_train(p: argparse.ArgumentParser, epochs: int = 15) -> None:
    p.add_argument("--epochs", type=_nonneg_int, default=epochs)
    p.add_argument("--optimizer", default="sgd", help="sgd, adam or adamw")
    p.add_argument("--weight-decay", type=_nonneg_float, default=5e-4)
    p.add_argument("--schedule", default="onecycle", help="onecycle, cosine or constant")


def _add_prune(p: argparse.ArgumentParser, with_method: bool = True) -> None:
    from obdprune.curvature import CurvatureKind

    if with_method:
        p.add_argument("--method", required=True, help="magnitude, l1, obd or hybrid")
    p.add_argument("--sparsity", type=_fraction_open, nargs="+", default=[], metavar="S",
                   help="fraction(s) of Conv/Linear weights to remove (of their MACs with --budget macs)")
    p.add_argument("--max-drop", type=_points, default=None, metavar="PP",
                   help="remove as much as possible while validation accuracy stays within PP points of dense")
    p.add_argument("--scope", default="global", help="global (one threshold across layers) or layer (the same share in every layer; with --budget macs, "
                        "every coupled group keeps the same share of its units)")
    p.add_argument("--granularity", default="element",
                   help="element (single weights) or channel (whole filters/neurons with their bias and BatchNorm; "
                        "group lasso for l1/hybrid)")
    p.add_argument("--budget", default="weights",
                   help="what --sparsity, --max-sparsity and --prune-step count: weights (share of Conv/Linear weights "
                        "removed) or macs (share of their multiply-accumulates; needs --granularity channel, units go "
                        "by saliency per MAC saved)")
    p.add_argument("--channel-multiple", type=_positive_int, default=1, metavar="N",
                   help="with --budget macs: every layer keeps a multiple of N units (or all); onnxruntime's "
                        "convolution kernels pad channels to 8 on AVX2 CPUs, to 16 with AVX-512")
    p.add_argument("--layer-floor", type=_unit_interval, default=0.005,
                   help="every layer keeps at least this fraction (default 0.005)")
    p.add_argument("--min-units", type=_positive_int, default=4, help="channel granularity: every layer keeps at least N units "
                   "(all of them if it has fewer)")
    p.add_argument("--keep", nargs="+", default=[], metavar="NAME", help="channel granularity: layers (module names) "
                   "that never lose units, e.g. the classifier head")
    p.add_argument("--prune-step", type=_fraction_open, default=0.15,
                   help="at most this fraction of the remaining weights (MACs with --budget macs) goes per round")
    p.add_argument("--finetune-epochs", type=_nonneg_int, default=1, help="fine-tuning epochs after each round")
    p.add_argument("--finetune-lr", type=_positive_float, default=0.03)
    p.add_argument("--reg-epochs", type=_nonneg_int, default=2,
                   help="epochs before the first round (L1-regularized for l1/hybrid)")
    p.add_argument("--l1-lambda", type=_l1_lambda, default=None,
                   help="L1 strength λ (group lasso for channel); default auto for element, 3e-4 for channel; auto: "
                        "λ = ρ/(number of Conv/Linear weights), ρ chosen on the validation split (README)")
    p.add_argument("--l1-mode", default="proximal", help="proximal (soft-threshold, exact zeros) or penalty (in the loss)")
    p.add_argument("--l1-ramp", action="store_true", help="rounds: λ·s/s_end while pruning toward sparsity s, so the "
                   "L1 strength grows along the path and reaches λ at its end")
    p.add_argument("--curvature", default="ggn",
                   help=f"one of: {', '.join(c.value for c in CurvatureKind)} (exact GGN diagonal, its Monte Carlo "
                        "estimate, mean squared per-sample gradient, Hutchinson Hessian diagonal); the old names "
                        "exact, mc and hutchinson still work")
    p.add_argument("--curvature-samples", type=_positive_int, default=1024,
                   help="training images the curvature is computed on (a fresh random draw every round)")
    p.add_argument("--curvature-draws", type=_positive_int, default=None,
                   help="MC label draws per image (default 1) or Hutchinson probes (default 100)")
    p.add_argument("--negative-curvature", default="clamp", help="clamp, abs or keep (for Hessian estimates)")
    p.add_argument("--max-sparsity", type=_fraction_open, default=0.99, help="how far --max-drop searches")
    p.add_argument("--max-drop-rule", default="monotone",
                   help="monotone (default: a round holds while the best non-increasing fit of the rounds' validation "
                        "accuracies is on or above dense - PP), forgive-one (go on past one round that misses by at "
                        "most one standard error of its "
                        "validation accuracy) or first-failure (stop at the first round below dense - PP)")
    recipe = p.add_argument_group("recovery recipe (off by default but for --distill 2 0.5; see README)")
    recipe.add_argument("--prune-schedule", default="rounds",
                        help="rounds (prune -> fine-tune) or gradual (cubic sparsity ramp inside one run of "
                             "--total-epochs; --schedule is the learning-rate schedule of dense training)")
    recipe.add_argument("--total-epochs", type=_positive_int, default=None,
                        help="with --prune-schedule gradual: epochs of the one run (--reg-epochs before the ramp, "
                             "--finetune-epochs after it), the same for every method")
    recipe.add_argument("--prune-every", type=_positive_int, default=100, metavar="STEPS",
                        help="with --prune-schedule gradual: optimizer steps between pruning steps")
    recipe.add_argument("--curvature-window", type=_positive_int, default=8, metavar="STEPS",
                        help="with --prune-schedule gradual: the first pruning step estimates curvature on "
                             "--curvature-samples, each later one on 1/STEPS of them, averaged in with weight "
                             "1/STEPS (1: afresh every step)")
    recipe.add_argument("--lr-rewind", action="store_true",
                        help="training phases replay the learning rates of the dense run's last epochs")
    recipe.add_argument("--distill", type=_nonneg_float, nargs=2, default=[2.0, 0.5], metavar=("T", "ALPHA"),
                        help="distill from the dense model: (1-ALPHA)·CE + ALPHA·T²·KL at temperature T "
                             "(default 2 0.5)")
    recipe.add_argument("--no-distill", dest="distill", action="store_const", const=None,
                        help="train on the labels alone (no distillation)")
    recipe.add_argument("--criterion", default=None,
                        help="what ranks weights: magnitude, obd or obs (default: the method's own)")
    recipe.add_argument("--update", default="none",
                        help="none or obs: layer-wise OBS corrects the weights left in each row (element granularity)")
    recipe.add_argument("--obs-damp", type=_nonneg_float, default=0.01, help="OBS dampening: H + d·mean(diag H)·I")


def build_parser() -> argparse.ArgumentParser:
    from obdprune import __version__

    parser = _Parser(prog="obdprune", description="Make trained PyTorch CNNs smaller and faster "
                     "(sparse regularization + Optimal Brain Damage).")
    parser.add_argument("--version", action="version", version=f"obdprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train a dense model and save it as a run folder")
    _add_data(p)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    _add_train(p)
    _add_common(p, lr=0.05)
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = sub.add_parser("prune", help="prune a trained run with one method")
    p.add_argument("run", help="dense run folder (from obdprune train)")
    _add_prune(p)
    _add_common(p)
    p.add_argument("--data-dir", default=None, help="override the dataset folder recorded in the run")
    p.add_argument("--out", required=True, help="run folder (or folder of run folders for several targets)")
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = sub.add_parser("evaluate", help="accuracy and sparsity of a run folder or model file")
    p.add_argument("path")
    p.add_argument("--data-dir", default=None, help="override the dataset folder recorded in the run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("compare", help="train once, run every method at every target, write a report")
    _add_data(p)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    _add_train(p)
    _add_prune(p, with_method=False)
    p.add_argument("--methods", nargs="+", default=["magnitude", "l1", "obd", "hybrid"])
    _add_common(p, lr=0.05)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP + "; the earlier study is deleted at the start")
    p.add_argument("--no-measure", action="store_true",
                   help="skip compaction, ONNX export and side-by-side latency of every result")
    p.add_argument("--measure-repeats", type=_positive_int, default=30, help="timing repeats per model")
    p.add_argument("--browser", action="store_true",
                   help="also run every result beside the dense model in headless Chromium (onnxruntime-web, wasm)")

    p = sub.add_parser("export", help="write a run as checked ONNX, safetensors run folder, sparse file or web page")
    p.add_argument("run", help="run folder or model.safetensors")
    p.add_argument("--format", required=True, choices=["onnx", "safetensors", "sparse", "web"])
    p.add_argument("--compact", action="store_true", help="physically remove dead units first")
    p.add_argument("--out", required=True, help="file (onnx, sparse) or folder (safetensors, web) to write")
    p.add_argument("--dense", default=None, metavar="RUN0",
                   help="web: the dense run to show beside the pruned one (default: the parent its manifest records)")
    p.add_argument("--samples", type=_positive_int, default=64, help="web: test images the page shows and runs")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--data-dir", default=None, help="override the dataset folder recorded in the run")
    p.add_argument("--check-samples", type=_positive_int, default=256, help="test images the export is verified on")

    p = sub.add_parser("bench", help="size, MACs and latency of a run's compacted model next to its dense architecture")
    p.add_argument("run", help="run folder or model.safetensors")
    p.add_argument("--repeats", type=_positive_int, default=30)
    p.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 256])
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--browser", action="store_true",
                   help="also measure the run and its dense parent in headless Chromium (onnxruntime-web, wasm)")
    p.add_argument("--dense", default=None, metavar="RUN0",
                   help="with --browser: the dense parent (default: the one the run's manifest records)")

    p = sub.add_parser("serve", help="serve an exported web page on 127.0.0.1 (with the headers wasm threads need)")
    p.add_argument("dir", help="folder written by: obdprune export RUN --format web --out DIR")
    p.add_argument("--port", type=_nonneg_int, default=8000, help="port (0: any free port; default 8000)")

    p = sub.add_parser("import-torch", help="convert a trusted PyTorch state_dict file (.pt/.pth) into a run folder")
    p.add_argument("file", help="file written by torch.save(model.state_dict(), FILE); read with weights_only=True")
    p.add_argument("--model", required=True, help="the architecture the state_dict belongs to: " + MODEL_HELP)
    _add_data(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = sub.add_parser("demo", help="a few-minute compare on Fashion-MNIST with lenet5")
    p.add_argument("--out", default=DEMO["out"], help="study folder; a rerun continues or reprints an earlier demo")
    p.add_argument("--overwrite", action="store_true", help="start over, deleting an earlier demo at --out")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=_threads_count, default=None)
    p.add_argument("--train-limit", type=_positive_int, default=None, help="try it on a subset of the training set")
    p.add_argument("--test-limit", type=_positive_int, default=None, help="try it on a subset of the test set")

    p = sub.add_parser("data", help="dataset utilities")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    dsub.required = True
    d = dsub.add_parser("download", help="fetch a dataset from its official mirror and verify checksums")
    d.add_argument("name")
    d.add_argument("--dest", default=None, help="folder to write (default: the user cache)")
    d.add_argument("--mirror", default=None, help="base URL overriding the official mirror")
    d.add_argument("--no-progress", action="store_true")
    return parser


def _device(name: str) -> str:
    import torch

    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        return name
    raise UsageError(f"unknown device {name!r}; use cpu or cuda")


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _train_cfg(args, epochs: int | None = None):
    from obdprune.train import TrainConfig

    return TrainConfig(epochs=args.epochs if epochs is None else epochs, lr=args.lr, batch_size=args.batch_size,
                       optimizer=args.optimizer, weight_decay=args.weight_decay, schedule=args.schedule,
                       seed=args.seed)


def _prune_cfg(args, method: str):
    from obdprune.methods import PruneConfig
    from obdprune.train import TrainConfig

    ft = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=args.batch_size,
                     schedule="cosine", seed=args.seed)
    return PruneConfig(method=method, scope=args.scope, layer_floor=args.layer_floor, prune_step=args.prune_step,
                       reg_epochs=args.reg_epochs, finetune=ft, l1_lambda=args.l1_lambda, l1_mode=args.l1_mode,
                       l1_ramp=args.l1_ramp,
                       curvature=args.curvature, curvature_samples=args.curvature_samples,
                       curvature_draws=args.curvature_draws,
                       negative_curvature=args.negative_curvature, max_sparsity=args.max_sparsity, seed=args.seed,
                       granularity=args.granularity, budget=args.budget,
                       channel_multiple=args.channel_multiple, min_units=args.min_units, keep=tuple(args.keep),
                       prune_schedule=args.prune_schedule, total_epochs=args.total_epochs, prune_every=args.prune_every,
                       curvature_window=args.curvature_window, lr_rewind=args.lr_rewind,
                       distill=tuple(args.distill) if args.distill else None,
                       criterion=args.criterion, update=args.update, obs_damp=args.obs_damp,
                       max_drop_rule=args.max_drop_rule)


def _shared(make):
    """The output ``make()`` opens, on rank 0 of a torchrun run (the other ranks follow it, writing nothing)."""
    from obdprune.distributed import current
    from obdprune.outputs import shared_output

    return shared_output(current(), make)


def _need_target(args) -> None:
    if not args.sparsity and args.max_drop is None:
        raise UsageError("give --sparsity S (fraction of weights to remove) or --max-drop PP")


def cmd_train(args) -> int:
    from obdprune.outputs import OutputKind, claim_output
    from obdprune.study import DataSpec, load_data, train_dense

    out = Path(args.out)
    cfg = _train_cfg(args)
    spec = DataSpec.make(args.dataset, args.data_dir, val_fraction=args.val_fraction,
                         train_limit=args.train_limit, test_limit=args.test_limit, image_size=args.image_size)
    with _shared(lambda: claim_output(out, OutputKind.RUN, overwrite=args.overwrite)):
        data = load_data(spec)
        try:
            _, manifest = train_dense(data, spec, args.model, cfg, device=_device(args.device),
                                      progress=not args.no_progress, out=out)
        except (Interrupted, OutputError) as e:
            e.hint = f"{out} was left as it was"
            raise
    m = manifest["metrics"]
    print(f"dense {args.model} on {data.name}: test accuracy {100 * m['test_accuracy']:.2f}%, "
          f"validation {100 * m['val_accuracy']:.2f}% → {out}")
    return 0


def cmd_prune(args) -> int:
    """Rounds are recorded in a hidden work folder beside --out; the output appears whole at the end."""
    from obdprune.checkpoint import normalized_args
    from obdprune.outputs import ResultsFolder
    from obdprune.runfile import load_run
    from obdprune.study import load_run_data, prune_dense, round_line

    _need_target(args)
    cfg = _prune_cfg(args, args.method)
    single = len(args.sparsity) + (args.max_drop is not None) == 1
    with _shared(lambda: ResultsFolder(Path(args.out), "prune", normalized_args(args), overwrite=args.overwrite,
                                       resume=args.resume)) as folder:
        run = load_run(args.run)
        data = load_run_data(run, args.data_dir)
        dense = run.manifest["metrics"]
        try:
            results = folder.run_stage(f"prune:{cfg.method.value}", lambda checkpoint: prune_dense(
                run, data, cfg, targets=args.sparsity, max_drop=args.max_drop, device=_device(args.device),
                progress=not args.no_progress, out_dir=folder.runs, checkpoint=checkpoint,
                on_round=lambda r: print(round_line(r, dense["val_accuracy"]), flush=True)))
            results = folder.publish(results, single=single, summary={"dense": dense})
        except (Interrupted, OutputError) as e:
            e.hint = f"finished rounds are saved in {folder.work}; resume with the same command plus --resume"
            raise
    for r in results:
        tag = f"max-drop {r['max_drop']} pt" if "max_drop" in r else f"target {r['target_sparsity']}"
        print(f"{r['method']} ({tag}): {100 * r['sparsity']:.2f}% of weights removed, "
              f"test accuracy {100 * r['test_accuracy']:.2f}% (dense {100 * dense['test_accuracy']:.2f}%)"
              f" → {r['path']}")
    return 0


def cmd_evaluate(args) -> int:
    from obdprune.measure import measured_sparsity
    from obdprune.runfile import load_run
    from obdprune.study import load_run_data
    from obdprune.train import evaluate

    run = load_run(args.path)
    data = load_run_data(run, args.data_dir)
    device = _device(args.device)
    val_acc, _ = evaluate(run.model, data.val, device=device)
    test_acc, test_loss = evaluate(run.model, data.test, device=device)
    sparsity, nonzero, total = measured_sparsity(run.model)
    res = {"path": str(args.path), "model": run.manifest["model"]["name"], "dataset": data.name,
           "val_accuracy": val_acc, "test_accuracy": test_acc, "test_loss": test_loss,
           "weights": total, "nonzero_weights": nonzero, "sparsity": sparsity}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['model']} on {data.name}: test accuracy {100 * test_acc:.2f}%, validation "
              f"{100 * val_acc:.2f}%, {nonzero:,} of {total:,} weights nonzero ({100 * sparsity:.2f}% removed)")
    return 0


def cmd_compare(args) -> int:
    from obdprune.checkpoint import normalized_args
    from obdprune.outputs import StudyFolder
    from obdprune.study import DataSpec, load_data, run_compare

    _need_target(args)
    out = Path(args.out)
    train_cfg, prune_cfg = _train_cfg(args), _prune_cfg(args, "magnitude")
    spec = DataSpec.make(args.dataset, args.data_dir, val_fraction=args.val_fraction,
                         train_limit=args.train_limit, test_limit=args.test_limit, image_size=args.image_size)
    with _shared(lambda: StudyFolder(out, "compare", normalized_args(args), overwrite=args.overwrite,
                                     resume=args.resume)) as study:
        data = load_data(spec)
        try:
            run_compare(data, spec, args.model, train_cfg, prune_cfg, methods=args.methods, targets=args.sparsity,
                        max_drop=args.max_drop, out=out, device=_device(args.device), progress=not args.no_progress,
                        state=study.state, measure=not args.no_measure, measure_repeats=args.measure_repeats,
                        browser=args.browser)
        except (Interrupted, OutputError) as e:
            e.hint = f"finished stages are saved in {out}; resume with the same command plus --resume"
            raise
    print(f"wrote {out / 'summary.json'}, {out / 'report.md'}, {out / 'accuracy_vs_sparsity.png'}")
    return 0


def cmd_demo(args) -> int:
    argv = ["compare", "--dataset", DEMO["dataset"], "--model", DEMO["model"], "--epochs", str(DEMO["epochs"]),
            "--sparsity", *map(str, DEMO["sparsity"]), "--finetune-epochs", str(DEMO["finetune_epochs"]),
            "--reg-epochs", str(DEMO["reg_epochs"]), "--prune-step", str(DEMO["prune_step"]), "--out", args.out,
            "--seed", str(args.seed), "--device", args.device, "--measure-repeats", str(DEMO["measure_repeats"])]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.no_progress:
        argv.append("--no-progress")
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.train_limit:
        argv += ["--train-limit", str(args.train_limit)]
    if args.test_limit:
        argv += ["--test-limit", str(args.test_limit)]
    if args.overwrite:
        argv.append("--overwrite")
    elif (Path(args.out) / "state.json").exists():  # a rerun continues (or just reprints) the earlier demo
        argv.append("--resume")
    print("obdprune demo: " + " ".join(argv))
    return main(argv)


def cmd_import_torch(args) -> int:
    from obdprune.importer import import_torch, read_state_dict
    from obdprune.models import check_model_name
    from obdprune.outputs import OutputKind, claim_output
    from obdprune.study import DataSpec, load_data

    check_model_name(args.model)
    out = Path(args.out)
    with claim_output(out, OutputKind.RUN, overwrite=args.overwrite):
        sd = read_state_dict(args.file)
        spec = DataSpec.make(args.dataset, args.data_dir, val_fraction=args.val_fraction,
                             train_limit=args.train_limit, test_limit=args.test_limit, image_size=args.image_size)
        data = load_data(spec)
        manifest = import_torch(sd, args.file, args.model, data, spec, out=out, device=_device(args.device))
    m = manifest["metrics"]
    print(f"imported {args.file} as {args.model} on {data.name}: test accuracy {100 * m['test_accuracy']:.2f}%, "
          f"validation {100 * m['val_accuracy']:.2f}% → {out}")
    return 0


def cmd_data(args) -> int:
    from obdprune.data import download_dataset

    path = download_dataset(args.name, Path(args.dest) if args.dest else None, base_url=args.mirror,
                            progress=not args.no_progress)
    print(f"{args.name} is ready in {path}")
    return 0


def cmd_export(args) -> int:
    from obdprune.deploy import export_run
    from obdprune.outputs import OutputKind, claim_output
    from obdprune.runfile import load_run
    from obdprune.study import load_run_data

    if args.format == "web":
        return _export_web(args)
    if args.dense is not None:
        raise UsageError("--dense goes with --format web")
    kind = OutputKind.RUN if args.format == "safetensors" else OutputKind.FILE
    with claim_output(args.out, kind, overwrite=args.overwrite):
        run = load_run(args.run)
        data = load_run_data(run, args.data_dir)
        info = export_run(run, args.format, Path(args.out), check_inputs=data.test.x[: args.check_samples],
                          compact_model=args.compact)
    extra = f", max |onnxruntime - torch| = {info['max_abs_diff']:.2e}" if "max_abs_diff" in info else ""
    print(f"wrote {info['path']} ({info['bytes']:,} bytes, {args.format}{', compacted' if args.compact else ''}{extra})")
    return 0


def _export_web(args) -> int:
    from obdprune.web import export_web

    from obdprune.outputs import OutputKind, claim_output

    with claim_output(args.out, OutputKind.WEB, overwrite=args.overwrite):
        info = export_web(args.run, Path(args.out), dense=args.dense, samples=args.samples,
                          data_dir=args.data_dir, check_samples=args.check_samples)
    m = info["models"]
    print(f"wrote {info['path']}: dense {m['dense']['bytes']:,} B and pruned {m['pruned']['bytes']:,} B ONNX "
          f"(compacted, checked against PyTorch), {info['samples']['count']} test images; "
          f"view it with: obdprune serve {info['path']}")
    return 0


def cmd_serve(args) -> int:
    from obdprune.web import serve

    try:
        serve(args.dir, args.port, announce=lambda line: print(line, flush=True))
    except KeyboardInterrupt:  # the usual way to stop a server
        pass
    return 0


def cmd_bench(args) -> int:
    import torch

    from obdprune.measure import measure_models, speed_table
    from obdprune.models import rebuild_model
    from obdprune.runfile import load_run

    run = load_run(args.run)
    spec = run.manifest["model"]
    shape = tuple(spec["input_shape"])
    torch.manual_seed(0)
    dense = rebuild_model(spec)  # same architecture, no zeros
    check = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    m = measure_models({"dense": dense, "run": run.model}, shape, check_inputs=check, batch_sizes=args.batch_sizes,
                       repeats=args.repeats, threads=args.threads)
    if args.browser:
        from obdprune.web.study import browser_bench, browser_entry

        res = browser_bench(run, dense=args.dense, repeats=args.repeats, threads=args.threads)
        m["dense"]["browser"], m["run"]["browser"] = browser_entry(res, "dense"), browser_entry(res, "pruned")
        m["browser"] = {"browser": res["browser"], "threads": res["threads"], "floor": res["floor"]}
    elif args.dense is not None:
        raise UsageError("--dense goes with --browser")
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(speed_table({k: v for k, v in m.items() if k != "browser"}))
        if args.browser:
            b = m["browser"]
            print(f"{b['browser']}, {b['threads']} thread(s); floor (identity model): {b['floor']['ms_b1']:.3f} ms at "
                  f"batch 1, {b['floor']['ms_b64']:.3f} ms at batch 64")
    return 0


COMMANDS = {"train": cmd_train, "prune": cmd_prune, "evaluate": cmd_evaluate, "compare": cmd_compare,
            "demo": cmd_demo, "export": cmd_export, "bench": cmd_bench, "serve": cmd_serve, "import-torch": cmd_import_torch, "data": cmd_data}


def _cli_message(e: ObdpruneError) -> str:
    """The error's message, in the command line's words where the library's name Python parameters."""
    if isinstance(e, OutputExistsError):
        if e.resumable:
            return (f"{e.path} holds {e.what}; continue it with --resume, replace it with --overwrite, "
                    f"or choose a new --out")
        return f"{e.path} already holds {e.what}; choose a new --out, or replace it with --overwrite"
    return str(e)


def _one_line(text: str) -> str:
    """Escape every character that would break a message into several lines, or could not be printed."""
    return "".join(repr(c)[1:-1] if c in _LINE_BREAKS or "\ud800" <= c <= "\udfff" else c for c in text)


_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"obdprune: warning: {message}\n"


DISTRIBUTED = ("train", "prune", "compare")  # what runs on several ranks under torchrun


@contextlib.contextmanager
def _ranks(args):
    """Under torchrun: join the process group for the command; only rank 0 prints to stdout."""
    from obdprune.distributed import launched, process_group

    if not launched():
        yield
        return
    if args.command not in DISTRIBUTED:
        raise UsageError(f"{args.command} runs in one process; run it without torchrun "
                         f"(under torchrun: {', '.join(DISTRIBUTED)})")
    with process_group(_device(args.device)) as world:
        args.device = str(world.device(args.device))
        try:
            if world.writer:
                yield
                return
            args.no_progress = True
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                yield
        except RuntimeError as e:  # a collective failed: another rank died, or the timeout passed
            if not _collective_failure(e):
                raise
            raise ObdpruneError(f"rank {world.rank}: another rank stopped or could not be reached "
                                f"({str(e).splitlines()[0][:200]})") from None


def _collective_failure(e: RuntimeError) -> bool:
    import torch

    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(e, dist_error) or any(w in str(e) for w in ("gloo", "Gloo", "NCCL", "Connection closed"))


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    from obdprune.runtime import deterministic, stop_on_signals

    warnings.formatwarning = _one_line_warning
    warnings.filterwarnings("default", message="curvature .* is now called", category=DeprecationWarning)

    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        if any("\0" in a for a in argv):
            raise UsageError("arguments must not contain NUL characters")
        args = build_parser().parse_args(argv)
        _threads(args)
        if args.command not in STOPPABLE:
            return COMMANDS[args.command](args)
        deterministic()
        with stop_on_signals(), _ranks(args):
            return COMMANDS[args.command](args)
    except ObdpruneError as e:
        print(f"obdprune: error: {_one_line(_cli_message(e))}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        print(f"obdprune: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("obdprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
