"""Prune inside your own training loop: obdprune.Pruner with AdamW and a hand-written loop.

The pruner keeps pruned weights at exactly zero and applies the group-lasso proximal step after every
optimizer step; you decide when to prune and how to fine-tune.

    python examples/own_loop.py
"""
import argparse

import torch
from torch.nn import functional as F

import obdprune
from common import SmallResNet, accuracy, digits_loaders

parser = argparse.ArgumentParser()
parser.add_argument("--limit", type=int, default=None)
parser.add_argument("--epochs", type=int, default=8, help="epochs before pruning")
parser.add_argument("--sparsity", type=float, nargs="+", default=[0.1, 0.2, 0.25])
args = parser.parse_args()

torch.manual_seed(0)
train, val, test = digits_loaders(args.limit)
model = SmallResNet()
x0 = next(iter(train))[0][:2]

# --- obdprune inside your loop -------------------------------------------------------------------------------
pruner = obdprune.Pruner(model, method="hybrid", granularity="channel", example_inputs=x0)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
pruner.attach(optimizer)                                   # masks + proximal step after every optimizer step
schedule = [None] * args.epochs + [s for s in args.sparsity for _ in range(2)]  # then 2 epochs per target
for epoch, target in enumerate(schedule):
    if target is not None and target > pruner.sparsity:
        pruner.step(sparsity=target, data=train)           # curvature on your data, select, apply masks
    model.train()
    for x, y in train:                                     # your own loop, unchanged
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
small = pruner.compact()                                   # a physically smaller nn.Module
# ---------------------------------------------------------------------------------------------------------------

params = lambda m: sum(p.numel() for p in m.parameters())
print(f"{100 * pruner.sparsity:.1f}% of weights removed, MACs {pruner.macs():,} per sample; test accuracy "
      f"{accuracy(model, test):.3f} (compacted: {accuracy(small, test):.3f}); parameters {params(model):,} -> "
      f"{params(small):,}")
