"""Training and evaluation loops on in-memory tensors, with masks enforced and a regularizer hook."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from obdprune.checkpoint import check_stop
from obdprune.choices import Choice
from obdprune.errors import TrainingDiverged, UsageError
from obdprune.masking import MaskSet
from obdprune.progress import progress_bar
from obdprune.regularize import NoRegularizer, Regularizer

__all__ = ["TrainConfig", "train", "evaluate", "seed_everything"]


class OptimizerName(Choice):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"

    @classmethod
    def label(cls) -> str:
        return "optimizer"


class ScheduleName(Choice):
    ONECYCLE = "onecycle"
    COSINE = "cosine"
    CONSTANT = "constant"

    @classmethod
    def label(cls) -> str:
        return "schedule"


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and schedule for one training phase."""

    epochs: int = 15
    lr: float = 0.05
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    seed: int = 0

    def __post_init__(self) -> None:
        OptimizerName.parse(self.optimizer)
        ScheduleName.parse(self.schedule)
        if self.epochs < 0:
            raise UsageError(f"epochs must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"learning rate must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise UsageError(f"weight decay must be >= 0, got {self.weight_decay}")

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    name = OptimizerName(cfg.optimizer)
    if name is OptimizerName.SGD:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    if name is OptimizerName.ADAM:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    name = ScheduleName(cfg.schedule)
    if name is ScheduleName.ONECYCLE and steps > 1:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.25)
    if name is ScheduleName.COSINE and steps > 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return None


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    masks: MaskSet | None = None,
    regularizer: Regularizer | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "train",
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` in place on ``x`` (N, C, H, W), ``y`` (N,) with mean cross-entropy.

    Pruned weights (``masks``) stay exactly zero after every optimizer step. The regularizer's penalty is
    added to the loss and its proximal step runs after each optimizer step. Shuffling is seeded by
    ``cfg.seed``. Returns one dict per epoch: ``{"epoch", "loss", "accuracy", "lr"}`` on training data.
    Raises TrainingDiverged naming the epoch and step if the loss is NaN or infinite.
    """
    regularizer = regularizer or NoRegularizer()
    device = torch.device(device)
    model.to(device)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch * cfg.epochs)
    handle = masks.attach(opt, model) if masks is not None else None
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    try:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            perm = torch.randperm(n, generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            bar = progress_bar(total=steps_per_epoch, desc=f"{desc} {epoch}/{cfg.epochs}", enabled=progress)
            for step in range(steps_per_epoch):
                check_stop()  # SIGINT/SIGTERM: stop between steps, never inside one
                idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch}, step {step + 1}; lower the learning rate "
                        f"(now {cfg.lr}) or the regularization strength")
                total = loss
                pen = regularizer.penalty(model)
                if pen is not None:
                    total = loss + pen
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                lr_now = opt.param_groups[0]["lr"]
                regularizer.after_step(model, lr_now)
                if masks is not None:
                    masks.apply(model)
                if sched is not None:
                    sched.step()
                bs = yb.shape[0]
                loss_sum += loss.item() * bs
                correct += int((logits.argmax(1) == yb).sum())
                seen += bs
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
            bar.close()
            rec = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1),
                   "lr": opt.param_groups[0]["lr"]}
            history.append(rec)
            if on_epoch is not None:
                on_epoch(epoch, rec)
    finally:
        if handle is not None:
            handle.remove()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000,
             device: torch.device | str = "cpu") -> tuple[float, float]:
    """Accuracy (fraction) and mean cross-entropy of ``model`` in eval mode on ``x`` (N, ...), ``y`` (N,)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    correct, loss_sum = 0, 0.0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    n = max(x.shape[0], 1)
    return correct / n, loss_sum / n
