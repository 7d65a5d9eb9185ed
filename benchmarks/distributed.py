"""One prune study on 1 rank × 1 thread and on 2 ranks × 1 thread (gloo on CPU): wall time, throughput,
the share of all-reduce and synchronisation in curvature time, and whether every rank chose the same masks.

The driver starts ``torchrun --standalone --nproc-per-node N`` on this file for each N; every rank trains
the same dense model (seeded; DDP for N > 1), then runs ``prune_model`` (hybrid, exact GGN by default).
Only the prune study is timed. Rank 0 writes ``OUT/ranksN.json``; the driver writes ``OUT/distributed.md``.

    python benchmarks/distributed.py --dataset fashion-mnist --model lenet5-caffe --out bench-out/distributed
    python benchmarks/distributed.py --dataset digits --model lenet300 --train-limit 400 --sparsity 0.5 \\
        --finetune-epochs 1 --out /tmp/ddp-smoke          # a seconds-long check that it works
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="lenet5-caffe")
    p.add_argument("--method", default="hybrid")
    p.add_argument("--curvature", default="ggn")
    p.add_argument("--curvature-samples", type=int, default=1024)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--dense-epochs", type=int, default=2)
    p.add_argument("--reg-epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.76, 0.9, 0.95])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default="bench-out/distributed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> None:
    import torch

    from obdprune.data import load_dataset
    from obdprune.distributed import mask_digest, process_group, sync_seconds
    from obdprune.methods import PruneConfig, prune_model
    from obdprune.models import build_model
    from obdprune.runtime import deterministic
    from obdprune.train import TrainConfig, train

    torch.set_num_threads(1)
    deterministic()
    with process_group("cpu") as world:
        data = load_dataset(args.dataset, train_limit=args.train_limit)
        torch.manual_seed(0)
        model = build_model(args.model, data.input_shape, data.num_classes)
        train(model, data.train, TrainConfig(epochs=args.dense_epochs, batch_size=args.batch_size), progress=False,
              world=world)
        cfg = PruneConfig(method=args.method, curvature=args.curvature, curvature_samples=args.curvature_samples,
                          reg_epochs=args.reg_epochs,
                          finetune=TrainConfig(epochs=args.finetune_epochs, lr=0.03, schedule="cosine",
                                               batch_size=args.batch_size))
        rounds: list[dict] = []
        before = sync_seconds("curvature")
        t0 = time.perf_counter()
        points = prune_model(model, data, cfg, targets=args.sparsity, progress=False, on_round=rounds.append,
                             world=world)
        wall = time.perf_counter() - t0
        sync = sync_seconds("curvature") - before
        digests = [mask_digest(p.masks) for p in points]
        gathered = [None] * world.size
        if world.distributed:
            torch.distributed.all_gather_object(gathered, {"digests": digests, "sync": sync, "wall": wall})
        else:
            gathered = [{"digests": digests, "sync": sync, "wall": wall}]
        if world.writer:
            epochs = args.reg_epochs + len(rounds) * args.finetune_epochs
            curvature = points[-1].curvature_seconds
            record = {"ranks": world.size, "threads": 1, "wall_seconds": wall,
                      "train_samples_per_second": epochs * len(data.train) / wall, "rounds": len(rounds),
                      "curvature_seconds": curvature, "curvature_sync_seconds": sync,
                      "curvature_sync_share": sync / curvature if curvature else 0.0,
                      "masks_identical_across_ranks": len({json.dumps(g["digests"]) for g in gathered}) == 1,
                      "mask_digests": digests,
                      "accuracy": {f"{p.target_sparsity:g}": p.test_accuracy for p in points}}
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"ranks{world.size}.json").write_text(json.dumps(record, indent=2))


def driver(args, argv) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n in args.ranks:
        subprocess.run([torchrun, "--standalone", "--nproc-per-node", str(n), __file__, "--worker", *argv],
                       env=env, check=True)
    recs = [json.loads((out / f"ranks{n}.json").read_text()) for n in args.ranks]
    base = recs[0]["wall_seconds"]
    lines = [f"# Distributed prune study ({started})", "",
             f"`{args.method}`, curvature `{args.curvature}` on {args.curvature_samples} samples, `{args.model}` on "
             f"`{args.dataset}`{f' ({args.train_limit} training images)' if args.train_limit else ''}, global batch "
             f"{args.batch_size}, targets {' '.join(map(str, args.sparsity))}; each rank 1 thread, gloo.", "",
             "| ranks × threads | wall s | speed-up | train samples/s | curvature s | all-reduce + sync share of "
             "curvature | masks identical across ranks (every round) | masks = 1-rank masks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        same = r["mask_digests"] == recs[0]["mask_digests"]
        lines.append(f"| {r['ranks']} × 1 | {r['wall_seconds']:.1f} | {base / r['wall_seconds']:.2f}× | "
                     f"{r['train_samples_per_second']:.0f} | {r['curvature_seconds']:.2f} | "
                     f"{100 * r['curvature_sync_share']:.1f} % | {'yes' if r['masks_identical_across_ranks'] else 'NO'}"
                     f" | {'yes' if same else 'no (float32 sums in another order)'} |")
    lines += ["", "Command: `python benchmarks/distributed.py " + " ".join(argv) + "`"]
    (out / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    argv = sys.argv[1:]
    args = _args(argv)
    if args.worker:
        worker(args)
    else:
        driver(args, argv)
