"""One rank of the distributed tests (tests/test_distributed.py starts two with RANK/WORLD_SIZE set).

``python tests/ddp_worker.py OUT``: under the process group, curvature estimates on this rank's shard of
a sample and two prune paths (element and channel granularity) on float64 data; every rank writes what it
got to ``OUT/rank<R>.safetensors``, to be compared with the other rank and with one process.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from obdprune.batches import TensorBatches
from obdprune.distributed import process_group, shard
from obdprune.methods import PruneConfig, prune_model, round_curvature
from obdprune.train import TrainConfig

CURVATURES = ("ggn", "empirical-fisher", "ggn-mc", "hessian-hutchinson")
GRANULARITIES = ("element", "channel")
RECIPES = {  # the recovery recipe's options on the element path; a max drop exercises the max-drop rule
    "recipe-rounds": dict(distill=(2.0, 0.5), lr_rewind=True, criterion="obs", update="obs", l1_lambda="auto",
                          max_drop_rule="monotone", max_sparsity=0.9),
    "recipe-gradual": dict(prune_schedule="gradual", total_epochs=3, prune_every=1, distill=(2.0, 0.5),
                           update="obs", max_sparsity=0.9),
}
DENSE_TRAIN = TrainConfig(epochs=2, lr=0.05, batch_size=16)  # what lr_rewind replays


def problem() -> tuple[nn.Module, "Splits"]:
    """A float64 CNN and data, the same in every process."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.randn(90, 1, 8, 8, generator=g, dtype=torch.float64)
    y = (x[:, 0, :4].sum((1, 2)) > 0).long() + (x[:, 0, 4:].sum((1, 2)) > 1).long()
    return model, Splits(TensorBatches(x[:64], y[:64]), TensorBatches(x[64:], y[64:]), None)


class Splits:
    def __init__(self, train, val, test):
        self.train, self.val, self.test = train, val, test


def config(granularity: str, curvature: str = "ggn") -> PruneConfig:
    return PruneConfig(method="hybrid", granularity=granularity, reg_epochs=1, prune_step=0.6, curvature=curvature,
                       curvature_samples=40, l1_lambda=1e-3, min_units=1,
                       finetune=TrainConfig(epochs=1, lr=0.05, batch_size=16, schedule="cosine"))


def curvature(kind: str, world=None) -> dict[str, torch.Tensor]:
    """The round's curvature on 30 samples of the training data (this rank's share of them)."""
    model, splits = problem()
    gen = torch.Generator().manual_seed(3)
    train = shard(splits.train, world) if world is not None else splits.train
    x, y = train.sample(30, gen)
    cfg = PruneConfig(curvature=kind, curvature_draws=4)
    curv, _ = round_curvature(model, cfg, x, y, torch.device("cpu"), gen, world)
    return curv


def prune(granularity: str, world=None):
    model, splits = problem()
    return prune_model(model, splits, config(granularity), targets=[0.5, 0.8], progress=False, world=world)


def prune_recipe(name: str, world=None):
    model, splits = problem()
    return prune_model(model, splits, replace(config("element"), **RECIPES[name]), targets=[0.5, 0.8], max_drop=50.0,
                       progress=False, world=world, dense_train=DENSE_TRAIN)


def flat(prefix: str, points) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(points):
        for k, v in p.state_dict.items():
            out[f"{prefix}/{i}/w/{k}"] = v.contiguous()
        for k, m in p.masks.items():
            out[f"{prefix}/{i}/m/{k}"] = m.to(torch.uint8).contiguous()
        out[f"{prefix}/{i}/val"] = torch.tensor([p.val_accuracy], dtype=torch.float64)
    return out


def main(out: Path) -> None:
    with process_group("cpu") as world:
        tensors = {}
        for kind in CURVATURES:
            tensors |= {f"curv/{kind}/{k}": v.contiguous() for k, v in curvature(kind, world).items()}
        for gran in GRANULARITIES:
            tensors |= flat(gran, prune(gran, world))
        for name in RECIPES:
            tensors |= flat(name, prune_recipe(name, world))
        save_file(tensors, str(out / f"rank{world.rank}.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
