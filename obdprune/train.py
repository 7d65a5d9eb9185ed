"""Training and evaluation loops on in-memory tensors, with masks enforced and a regularizer hook."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from obdprune.runtime import check_stop
from obdprune.choices import Choice
from obdprune.errors import TrainingDiverged, UsageError
from obdprune.batches import Batches, as_batches
from obdprune.constraints import StepConstraints
from obdprune.distributed import World, all_reduce_sums, shard, wrap
from obdprune.masking import MaskSet
from obdprune.progress import progress_bar
from obdprune.regularize import NoRegularizer, Regularizer

__all__ = ["TrainConfig", "train", "evaluate", "seed_everything"]


class OptimizerName(Choice, label="optimizer"):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class ScheduleName(Choice, label="schedule"):
    ONECYCLE = "onecycle"
    COSINE = "cosine"
    CONSTANT = "constant"


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and schedule for one training phase."""

    epochs: int = 15
    lr: float = 0.05
    batch_size: int = 128
    optimizer: OptimizerName = OptimizerName.SGD
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: ScheduleName = ScheduleName.ONECYCLE
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", OptimizerName.parse(self.optimizer))
        object.__setattr__(self, "schedule", ScheduleName.parse(self.schedule))
        if self.epochs < 0:
            raise UsageError(f"epochs must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"learning rate must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise UsageError(f"weight decay must be >= 0, got {self.weight_decay}")

    def to_dict(self) -> dict:
        return {k: (v.value if isinstance(v, Choice) else v) for k, v in asdict(self).items()}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    name = cfg.optimizer
    if name is OptimizerName.SGD:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    if name is OptimizerName.ADAM:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


ONECYCLE_WARMUP = 0.25  # share of the steps spent warming up


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    """The LR scheduler of ``cfg.schedule`` over ``steps`` optimizer steps, or None (constant).

    One-cycle needs a warm-up of more than one step (``OneCycleLR`` divides by zero otherwise); shorter
    runs, of four steps or fewer, anneal by cosine instead.
    """
    name = cfg.schedule
    if name is ScheduleName.ONECYCLE and steps * ONECYCLE_WARMUP > 1:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=ONECYCLE_WARMUP)
    if name in (ScheduleName.ONECYCLE, ScheduleName.COSINE) and steps > 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return None


def train(
    model: nn.Module,
    data: Batches | tuple[torch.Tensor, torch.Tensor] | Iterable,
    cfg: TrainConfig,
    *extra: object,
    masks: MaskSet | Callable[[], MaskSet | None] | None = None,
    regularizer: Regularizer | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "train",
    on_epoch: Callable[[int, dict], None] | None = None,
    world: World | None = None,
    lrs: Sequence[float] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> list[dict]:
    """Train ``model`` in place with mean cross-entropy on ``data``: an ``(x (N, ...), y (N,))`` pair
    (shuffled here, seeded by ``cfg.seed``) or any re-iterable of batches such as a DataLoader.

    Pruned weights (``masks``) stay exactly zero after every optimizer step. The regularizer's penalty is
    added to the loss and its proximal step runs after each optimizer step. Returns one dict per epoch:
    ``{"epoch", "loss", "accuracy", "lr"}`` on training data. Raises TrainingDiverged naming the epoch
    and step if the loss is NaN or infinite.

    world: under torchrun (see :mod:`obdprune.distributed`), every rank calls ``train`` alike: the model
    is wrapped in DistributedDataParallel for this phase, in-memory data is sharded so ``cfg.batch_size``
    is the global batch, and the history counts every rank's samples.

    Hooks for pruning recipes (all off by default): ``lrs[k]`` is the learning rate of step k (0-based,
    counted over the whole run; replaces ``cfg.schedule``); ``loss_fn(logits, x, y)`` returns per-sample
    losses (B,) that replace the cross-entropy; ``on_step(k, optimizer)`` runs after step k (1-based) with
    its constraints applied. ``masks`` may be a callable returning the masks in force now (they may change
    inside ``on_step``).

    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> x, y = torch.randn(8, 1, 2, 2), torch.tensor([0, 1] * 4)
    >>> [h["epoch"] for h in train(model, (x, y), TrainConfig(epochs=2, batch_size=4), progress=False)]
    [1, 2]
    """
    if extra or not isinstance(cfg, TrainConfig):
        raise UsageError(f"train(model, data, cfg): cfg must be a TrainConfig, got {type(cfg).__name__}; pass the "
                         f"data as one argument: a DataLoader or an (inputs, targets) pair")
    world = world or World()
    batches = shard(as_batches(data, "training data"), world)
    regularizer = regularizer or NoRegularizer()
    device = torch.device(device)
    model.to(device)
    net = wrap(model, world)  # a new wrapper every phase: the model may have changed shape in between
    global_sizes = batches.global_batch_sizes(cfg.batch_size)
    steps_per_epoch = batches.steps_per_epoch(cfg.batch_size)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch * cfg.epochs) if steps_per_epoch and lrs is None else None
    if lrs is not None and steps_per_epoch is not None and len(lrs) < steps_per_epoch * cfg.epochs:
        raise UsageError(f"{len(lrs)} learning rates for {steps_per_epoch * cfg.epochs} steps")
    done = 0
    handle = StepConstraints(model, masks, regularizer).attach(opt)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            loss_sum, correct, seen = 0.0, 0, 0
            bar = progress_bar(total=steps_per_epoch, desc=f"{desc} {epoch}/{cfg.epochs}", enabled=progress)
            for step, (xb, yb) in enumerate(batches.epoch(cfg.batch_size, gen)):
                check_stop()  # SIGINT/SIGTERM: stop between steps, never inside one
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                logits = net(xb)
                if global_sizes is None:
                    loss = F.cross_entropy(logits, yb) if loss_fn is None else loss_fn(logits, xb, yb).mean()
                    objective = loss
                else:  # DDP averages over ranks: scale the shard's sum so the average is the global mean
                    loss_sum_shard = (F.cross_entropy(logits, yb, reduction="sum") if loss_fn is None
                                      else loss_fn(logits, xb, yb).sum())
                    loss = loss_sum_shard / max(int(yb.shape[0]), 1)
                    objective = loss_sum_shard * (world.size / global_sizes[step])
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch}, step {step + 1}; lower the learning rate "
                        f"(now {cfg.lr}) or the regularization strength")
                total = objective
                pen = regularizer.penalty(model)
                if pen is not None:
                    total = objective + pen
                opt.zero_grad(set_to_none=True)
                total.backward()
                if lrs is not None:
                    if done >= len(lrs):
                        raise UsageError(f"the learning-rate sequence has {len(lrs)} steps; the data gave more")
                    for group in opt.param_groups:
                        group["lr"] = float(lrs[done])
                opt.step()  # StepConstraints: masked gradients before, proximal step and masks after
                if sched is not None:
                    sched.step()
                done += 1
                if on_step is not None:
                    on_step(done, opt)
                bs = yb.shape[0]
                loss_sum += loss.item() * bs
                correct += int((logits.argmax(1) == yb).sum())
                seen += bs
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
            bar.close()
            loss_sum, correct, seen = all_reduce_sums(world, [loss_sum, correct, seen], "train")
            rec = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1),
                   "lr": opt.param_groups[0]["lr"]}
            history.append(rec)
            if on_epoch is not None:
                on_epoch(epoch, rec)
    finally:
        handle.remove()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, data: Batches | tuple[torch.Tensor, torch.Tensor] | Iterable, *,
             batch_size: int = 1000, device: torch.device | str = "cpu",
             world: World | None = None) -> tuple[float, float]:
    """Accuracy (fraction) and mean cross-entropy of ``model`` in eval mode on ``data``: an
    ``(x (N, ...), y (N,))`` pair or a re-iterable of batches.

    world: under torchrun every rank calls ``evaluate`` alike; in-memory data is split between the ranks
    and the counts are all-reduced, so every rank returns the same numbers.

    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> acc, loss = evaluate(model, (torch.randn(8, 1, 2, 2), torch.zeros(8, dtype=torch.long)))
    >>> 0.0 <= acc <= 1.0
    True
    """
    world = world or World()
    batches = shard(as_batches(data, "evaluation data"), world)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    correct, loss_sum, n = 0, 0.0, 0
    for xb, yb in batches.eval_batches(batch_size):
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
        n += int(yb.shape[0])
    model.train(was_training)
    correct, loss_sum, n = all_reduce_sums(world, [correct, loss_sum, n], "evaluate")
    n = max(n, 1)
    return correct / n, loss_sum / n
