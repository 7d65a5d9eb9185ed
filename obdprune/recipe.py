"""The recovery recipe: what a pruning run may add to plain prune → fine-tune rounds. Distillation
(T = 2, α = 0.5) and the ``monotone`` max-drop rule are on by default, every other part is off (see
:class:`~obdprune.methods.PruneConfig`; the choice on validation is in BENCHMARKS.md).

- ``prune_schedule``: :class:`PruneSchedule` ``rounds`` (prune → fine-tune rounds) or ``gradual`` (the
  cubic ramp of :mod:`obdprune.gradual` inside one continuous training run of ``total_epochs``);
- ``lr_rewind``: every training phase replays the dense run's learning rates (Renda, Frankle & Carbin
  2020): a phase of E epochs uses the rates of the dense schedule's last E epochs (:func:`rewound_lrs`;
  a phase longer than the dense run replays all of it, stretched);
- ``distill=(T, α)``: every training phase learns from the dense model (Hinton et al. 2015) with
  :func:`distillation_loss`;
- ``criterion``: :class:`Criterion`, what ranks the weights (default: the method's own);
- ``update``: :class:`WeightUpdate` ``obs`` compensates the weights left in each row (:mod:`obdprune.obs`);
- ``max_drop_rule``: :mod:`obdprune.stopping`; ``l1_lambda="auto"``: :mod:`obdprune.lambda_search`.

:class:`Recovery` turns ``lr_rewind`` and ``distill`` into the hooks of :func:`obdprune.train.train`.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from obdprune.choices import Choice
from obdprune.errors import UsageError
from obdprune.train import TrainConfig, make_optimizer, make_scheduler

__all__ = ["PruneSchedule", "Criterion", "WeightUpdate", "distillation_losses", "distillation_loss",
           "Distillation", "check_distill", "lr_sequence", "rewound_lrs", "Recovery"]


class PruneSchedule(Choice, label="prune schedule"):
    """How sparsity grows: prune → fine-tune rounds, or a cubic ramp inside one training run."""

    ROUNDS = "rounds"
    GRADUAL = "gradual"


class Criterion(Choice):
    """What ranks the weights: |w|, OBD's ½·h_kk·w_k², or layer-wise OBS's w_q²/[H⁻¹]_qq."""

    MAGNITUDE = "magnitude"
    OBD = "obd"
    OBS = "obs"


class WeightUpdate(Choice, label="weight update"):
    """What happens to the weights that stay when others are removed: nothing, or the OBS correction."""

    NONE = "none"
    OBS = "obs"


def distillation_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                        temperature: float, alpha: float) -> torch.Tensor:
    """Per sample (B,): (1 − α)·CE(y, z_s) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)).

    student_logits, teacher_logits: (B, C); targets: (B,) class indices. The T² keeps the soft term's
    gradient on the scale of the hard term's as T changes (Hinton et al. 2015).
    """
    ce = F.cross_entropy(student_logits, targets, reduction="none")
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)
    return (1.0 - alpha) * ce + alpha * temperature ** 2 * kl


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """The batch mean of :func:`distillation_losses`.

    >>> z = torch.tensor([[2.0, 0.0]])
    >>> float(distillation_loss(z, z, torch.tensor([0]), 2.0, 1.0))  # student = teacher: no soft loss
    0.0
    """
    return distillation_losses(student_logits, teacher_logits, targets, temperature, alpha).mean()


def check_distill(distill: Any) -> tuple[float, float]:
    """``(T, α)`` as floats with T > 0 and α in [0, 1]; UsageError otherwise.

    >>> check_distill([2, "0.5"])
    (2.0, 0.5)
    """
    try:
        t, a = (float(v) for v in distill)
    except (TypeError, ValueError):
        raise UsageError(f"distill is a pair (T, alpha), e.g. (2, 0.5); got {distill!r}") from None
    if not 0 < t < float("inf"):
        raise UsageError(f"distillation temperature T must be > 0, got {t}")
    if not 0.0 <= a <= 1.0:
        raise UsageError(f"distillation weight alpha must be in [0, 1], got {a}")
    return t, a


class Distillation:
    """A ``loss_fn(logits, x, y) -> (B,)`` for :func:`obdprune.train.train`: :func:`distillation_losses`
    against a frozen copy of ``teacher`` run in eval mode on the same batch.

    >>> teacher = nn.Linear(3, 2)
    >>> kd = Distillation(teacher, 2.0, 0.5)
    >>> kd(teacher(torch.ones(4, 3)), torch.ones(4, 3), torch.zeros(4, dtype=torch.long)).shape
    torch.Size([4])
    """

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float):
        self.temperature, self.alpha = check_distill((temperature, alpha))
        self.teacher = copy.deepcopy(teacher).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher.to(x.device)(x)
        return distillation_losses(logits, teacher_logits, y, self.temperature, self.alpha)


def lr_sequence(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate of each of the ``cfg.epochs · steps_per_epoch`` steps of :func:`~obdprune.train.train`
    under ``cfg`` (its optimizer and schedule, replayed on a dummy parameter).

    >>> lrs = lr_sequence(TrainConfig(epochs=2, lr=0.1, schedule="cosine"), 2)
    >>> [round(v, 4) for v in lrs]
    [0.1, 0.0854, 0.05, 0.0146]
    """
    total = cfg.epochs * steps_per_epoch
    opt = make_optimizer(nn.Linear(1, 1, bias=False), cfg)
    sched = make_scheduler(opt, cfg, total)
    out = []
    with warnings.catch_warnings():  # stepping a scheduler without an optimizer step is what we mean here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(total):
            out.append(float(opt.param_groups[0]["lr"]))
            if sched is not None:
                sched.step()
    return out


def rewound_lrs(dense: TrainConfig, steps_per_epoch: int, epochs: int) -> list[float]:
    """Learning-rate rewinding: the rates of the last ``epochs`` epochs of the dense run's schedule.

    The dense schedule is laid out over ``steps_per_epoch`` steps per epoch (the phase's own), so with the
    dense run's batch size and data the sequence is exactly the dense run's tail. A phase longer than the
    dense run (a long gradual run) rewinds to the start: the whole dense schedule, stretched to the phase.

    >>> [round(v, 4) for v in rewound_lrs(TrainConfig(epochs=2, lr=0.1, schedule="cosine"), 2, 1)]
    [0.05, 0.0146]
    >>> [round(v, 4) for v in rewound_lrs(TrainConfig(epochs=1, lr=0.1, schedule="cosine"), 2, 2)]
    [0.1, 0.0854, 0.05, 0.0146]
    """
    if epochs > dense.epochs:
        return lr_sequence(replace(dense, epochs=epochs), steps_per_epoch)
    return lr_sequence(dense, steps_per_epoch)[(dense.epochs - epochs) * steps_per_epoch:]


@dataclass
class Recovery:
    """What a pruning run's training phases add to plain fine-tuning: :meth:`train_kwargs` are the extra
    keyword arguments of :func:`~obdprune.train.train` for a phase of ``epochs`` epochs (none when off)."""

    distillation: Distillation | None = None
    rewind_from: TrainConfig | None = None

    @classmethod
    def make(cls, distill: tuple[float, float] | None, lr_rewind: bool, dense: nn.Module,
             dense_train: TrainConfig | None) -> "Recovery":
        """From a PruneConfig's ``distill`` and ``lr_rewind``; ``dense_train`` is the dense run's TrainConfig."""
        if lr_rewind and dense_train is None:
            raise UsageError("learning-rate rewinding needs the dense run's training schedule: pass dense_train="
                             "TrainConfig(...) (the CLI reads it from the dense run's manifest)")
        return cls(Distillation(dense, *distill) if distill is not None else None,
                   dense_train if lr_rewind else None)

    def train_kwargs(self, epochs: int, steps_per_epoch: int | None) -> dict:
        kw: dict[str, Any] = {}
        if self.distillation is not None:
            kw["loss_fn"] = self.distillation
        if self.rewind_from is not None:
            if steps_per_epoch is None:
                raise UsageError("learning-rate rewinding needs training data of known length (len(loader))")
            kw["lrs"] = rewound_lrs(self.rewind_from, steps_per_epoch, epochs)
        return kw
