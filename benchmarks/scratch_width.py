"""Can a lenet5-caffe-shaped network of given widths reach the dense model's accuracy at all?

Trains conv(1→C1, 5×5) → pool → conv(C1→C2, 5×5) → pool → Linear(16·C2, H) → Linear(H, classes) from
scratch with the dense run's own training configuration and data split, and prints validation and test
accuracy next to the dense run's. A width whose from-scratch accuracy is already more than the drop
budget below dense tells how far structured pruning to that shape can be expected to go.

    python benchmarks/scratch_width.py DENSE_RUN 8 24 200
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from obdprune.runfile import load_run
from obdprune.study import load_run_data
from obdprune.train import TrainConfig, evaluate, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dense", help="dense run folder of lenet5-caffe (its training config and split are reused)")
    p.add_argument("widths", type=int, nargs=3, metavar=("C1", "C2", "H"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    run = load_run(args.dense)
    data = load_run_data(run, None)
    c1, c2, h = args.widths
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Conv2d(data.input_shape[0], c1, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 5),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 16, h), nn.ReLU(),
                          nn.Linear(h, data.num_classes))
    cfg = TrainConfig(**{**run.manifest["train"], "seed": args.seed})
    train(model, data.train, cfg, progress=False)
    val, test = evaluate(model, data.val)[0], evaluate(model, data.test)[0]
    m = run.manifest["metrics"]
    print(f"{c1}-{c2}-{h} from scratch ({cfg.epochs} epochs): val {100 * val:.2f}% test {100 * test:.2f}%; "
          f"dense val {100 * m['val_accuracy']:.2f}% test {100 * m['test_accuracy']:.2f}%")


if __name__ == "__main__":
    main()
