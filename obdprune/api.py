"""The front door for users' own models, data and training loops.

- :func:`prune`: the paper's iterative pipeline on any ``nn.Module`` in one call (regularized training,
  OBD ranking, rounds of prune → fine-tune, ``max_drop`` chosen on validation).
- :class:`Pruner`: for users who own the loop: ``attach(optimizer)`` → their training →
  ``step(sparsity, data)`` → their fine-tuning → ``compact()``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from obdprune.batches import as_batches
from obdprune.compact import compact as compact_model
from obdprune.constraints import StepConstraints, StepHandle
from obdprune.distributed import current, shard
from obdprune.errors import UsageError
from obdprune.groups import Granularity
from obdprune.masking import MaskSet
from obdprune.methods import (FIXED_L1_LAMBDA, PRUNE_LOOP, FineTune, Method, PruneConfig, PrunePoint, beyond_limit,
                              measured_sparsity, prune_model, prune_step, sparsity_targets)
from obdprune.regularize import NoRegularizer
from obdprune.selection import make_selector
from obdprune.train import TrainConfig, evaluate

__all__ = ["prune", "PruneResult", "Pruner"]

_TRAIN_OPTIONS = {"finetune_epochs": "epochs", "finetune_lr": "lr", "batch_size": "batch_size",
                  "optimizer": "optimizer", "weight_decay": "weight_decay"}


def _config(method: str | Method, granularity: str, budget: str, options: dict) -> PruneConfig:
    names = {f.name for f in dataclasses.fields(PruneConfig)} - {"method", "granularity", "budget", "finetune"}
    unknown = sorted(set(options) - names - set(_TRAIN_OPTIONS))
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r}; options are: {', '.join(sorted(names | set(_TRAIN_OPTIONS)))}")
    train_kw = {_TRAIN_OPTIONS[k]: options.pop(k) for k in list(options) if k in _TRAIN_OPTIONS}
    finetune = dataclasses.replace(PruneConfig().finetune, **train_kw)
    return PruneConfig(method=method, granularity=granularity, budget=budget, finetune=finetune, **options)


def _user_loop_defaults(granularity: str, options: dict) -> dict:
    """Defaults where the user's loop trains: no distillation (it needs obdprune's loss) and a given L1
    strength (a search would run every trial as a whole phase of the user's loop)."""
    options = {"distill": None, **options}
    if options.get("l1_lambda") is None:
        options["l1_lambda"] = FIXED_L1_LAMBDA[Granularity.parse(granularity)]
    return options


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    model: the chosen point's model (the max-drop choice if one was asked for, else the last target), with
      its masks applied; masks alone save no time: :meth:`compact` does.
    masks: that model's keep-masks. points: one :class:`~obdprune.methods.PrunePoint` per target (and the
      max-drop choice). rounds: one record per round: target, sparsity, MACs, validation accuracy, seconds
      (``path="max-drop"`` on the rounds of a max drop's own path).
    """

    model: nn.Module
    masks: MaskSet
    points: list[PrunePoint]
    rounds: list[dict]
    dense_val_accuracy: float
    example_inputs: torch.Tensor = field(repr=False)
    config: PruneConfig = field(repr=False)

    def at(self, target: float) -> nn.Module:
        """The model of the point at sparsity ``target`` (as given to :func:`prune`)."""
        for p in self.points:
            if p.target_sparsity is not None and abs(p.target_sparsity - float(target)) < 1e-9:
                model = copy.deepcopy(self.model)
                model.load_state_dict(p.state_dict)
                return model
        have = ", ".join(f"{p.target_sparsity:g}" for p in self.points if p.target_sparsity is not None)
        raise UsageError(f"no result at sparsity {target}; the targets were: {have or 'none (max_drop only)'}")

    def compact(self, example_inputs: torch.Tensor | None = None) -> nn.Module:
        """A physically smaller model computing the same function as :attr:`model` (see
        :func:`obdprune.compact.compact`)."""
        example = self.example_inputs if example_inputs is None else example_inputs
        return compact_model(self.model, example.to(_device_of(self.model)))

    def table(self) -> str:
        """The points as a small text table."""
        lines = ["point          sparsity  MACs removed  val acc  test acc"]
        for p in self.points:
            name = f"max-drop {p.max_drop:g}" if p.max_drop is not None else f"target {p.target_sparsity:g}"
            macs = f"{100 * p.macs_removed:11.1f}%" if p.macs_removed is not None else f"{'-':>12}"
            test = f"{100 * p.test_accuracy:7.2f}%" if p.test_accuracy is not None else f"{'-':>8}"
            lines.append(f"{name:<14} {100 * p.sparsity:7.2f}% {macs} {100 * p.val_accuracy:7.2f}% {test}")
        return "\n".join(lines)


@dataclass
class _UserData:
    train: Any
    val: Any
    test: Any = None


def prune(
    model: nn.Module,
    train: Any,
    val: Any,
    *,
    method: str | Method = "hybrid",
    sparsity: float | Sequence[float] | None = None,
    max_drop: float | None = None,
    granularity: str = "element",
    budget: str = "weights",
    example_inputs: torch.Tensor | None = None,
    fine_tune: FineTune | None = None,
    test: Any = None,
    progress: bool = True,
    dense_train: TrainConfig | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` (left unchanged) with the paper's iterative pipeline and return a :class:`PruneResult`.

    train, val, test: a DataLoader, any re-iterable of ``(inputs, targets)`` batches, or an
      ``(inputs, targets)`` pair of tensors. Choices (``max_drop``) use ``val``; ``test`` is only reported.
    method: ``magnitude``, ``l1``, ``obd`` or ``hybrid`` (L1-regularized training, OBD ranking).
    sparsity: a fraction of Conv/Linear weights (of MACs with ``budget="macs"``) to remove, or a list.
    max_drop: remove as much as possible while validation accuracy stays within this many percentage points.
      With ``sparsity`` too and a searched L1 strength (l1, hybrid), it runs as a second path whose λ is
      searched for it (:mod:`obdprune.lambda_search`).
    granularity: ``element`` (single weights) or ``channel`` (whole filters/neurons; compaction makes them
      physically smaller). example_inputs: one input batch for tracing (default: the first of ``train``).
    fine_tune: ``fine_tune(model, epochs)``, called for every regularization and fine-tuning phase
      instead of obdprune's loop; inside it, every optimizer step on the model keeps pruned weights at
      exactly zero and applies the L1 proximal step, whatever optimizer it creates.
    options: any :class:`~obdprune.methods.PruneConfig` field (``prune_step``, ``reg_epochs``, ``l1_lambda``,
      ``curvature``, ``seed``, ...) and ``finetune_epochs``, ``finetune_lr``, ``batch_size`` for obdprune's loop;
      the recovery recipe: distillation from the dense model (``distill=(T, α)``, default (2, 0.5) in
      obdprune's loop, off with ``fine_tune`` or ``distill=None``); the L1 strength searched on ``val``
      (``l1_lambda="auto"``, the default for element granularity in obdprune's loop; with ``fine_tune`` and
      for channels a given strength); ``prune_schedule="gradual"`` with ``total_epochs``, ``lr_rewind``,
      ``criterion="obs"`` and ``update="obs"`` are off unless asked for; ``max_drop_rule`` is
      ``"monotone"`` (:mod:`obdprune.stopping`; ``"forgive-one"``, ``"first-failure"``).
    dense_train: the TrainConfig the dense model was trained with; ``lr_rewind=True`` replays its learning rates.

    Under torchrun (with the process group initialized, e.g. by :func:`obdprune.distributed.process_group`)
    every rank calls ``prune`` with the same arguments; ``batch_size`` is the global batch, in-memory data
    is sharded, and every rank returns the same result. A ``fine_tune`` then gets the model wrapped in
    DistributedDataParallel and should shard its own loader with a DistributedSampler.

    Example::

        result = obdprune.prune(model, train_loader, val_loader, method="hybrid", max_drop=0.5)
        small = result.compact()
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if fine_tune is not None and not callable(fine_tune):
        raise UsageError("fine_tune must be a function fine_tune(model, epochs)")
    targets = sparsity_targets(sparsity)
    if not targets and max_drop is None:
        raise UsageError("say how far to prune: sparsity=0.9 (a fraction), max_drop=0.5 (percentage points), or both")
    if fine_tune is not None:
        options = _user_loop_defaults(granularity, options)
    cfg = _config(method, granularity, budget, dict(options))
    data = _UserData(as_batches(train, "train"), as_batches(val, "val"),
                     as_batches(test, "test") if test is not None else None)
    example = example_inputs if example_inputs is not None else data.train.example()
    device, world = _device_of(model), current()
    dense_val, _ = evaluate(model, data.val, device=device, world=world)
    rounds: list[dict] = []
    points = prune_model(model, data, cfg, targets=targets, max_drop=max_drop, dense_val_accuracy=dense_val,
                         device=device, progress=progress, on_round=rounds.append, fine_tune=fine_tune,
                         example_inputs=example, world=world, dense_train=dense_train)
    chosen = points[-1] if max_drop is not None else max(points, key=lambda p: p.target_sparsity or 0.0)
    pruned = copy.deepcopy(model)
    pruned.load_state_dict(chosen.state_dict)
    return PruneResult(pruned, chosen.masks.to(device), points, rounds, dense_val, example.detach().cpu(), cfg)


class Pruner:
    """Pruning inside the user's own training loop, on ``model`` in place.

    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))
    >>> pruner = Pruner(model, method="obd", example_inputs=x[:2])
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> handle = pruner.attach(opt)          # masks (and the L1 step for l1/hybrid) after every step
    >>> masks = pruner.step(sparsity=0.5, data=(x, y))
    >>> round(pruner.sparsity, 2)
    0.5
    """

    def __init__(self, model: nn.Module, *, method: str | Method = "hybrid", granularity: str = "element",
                 budget: str = "weights", example_inputs: torch.Tensor | None = None, **options: Any):
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.config = _config(method, granularity, budget, _user_loop_defaults(granularity, options))
        loop_only = self.config.recipe_set(PRUNE_LOOP)
        if loop_only:
            raise UsageError(f"{', '.join(loop_only)}: options of obdprune.prune's own loop; a Pruner steps inside "
                             f"yours and does not apply them (criterion and update do apply)")
        if example_inputs is None and self.config.granularity.value != "element":
            raise UsageError("channel granularity traces the model: pass example_inputs, e.g. one input batch x[:2]")
        self.example_inputs = example_inputs
        self.selector = make_selector(model, example_inputs, granularity=self.config.granularity,
                                      budget=self.config.budget, scope=self.config.scope,
                                      layer_floor=self.config.layer_floor, channel_multiple=self.config.channel_multiple,
                                      min_units=self.config.min_units, keep=self.config.keep)
        self.masks = MaskSet.dense(model)
        cfg = self.config
        self.regularizer = (self.selector.regularizer(cfg.l1_lambda, cfg.l1_mode) if cfg.method.regularized
                            else NoRegularizer())
        self._constraints = StepConstraints(model, lambda: self.masks, self.regularizer)
        self._optimizers: list[torch.optim.Optimizer] = []
        self._generator = torch.Generator().manual_seed(cfg.seed)

    def attach(self, optimizer: torch.optim.Optimizer) -> StepHandle:
        """After every step of ``optimizer``: pruned weights back to exactly zero and, for ``l1``/``hybrid``,
        the L1 (group lasso) proximal step. Returns a handle; ``handle.remove()`` detaches."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"attach expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._optimizers.append(optimizer)
        return self._constraints.attach(optimizer)

    def step(self, sparsity: float, data: Any = None) -> MaskSet:
        """Score (by the method's criterion, or ``criterion``: OBD on curvature from ``data``, OBS on layer inputs
        from ``data``, else magnitude), select masks reaching ``sparsity`` (masks only shrink), apply them to the
        model (with ``update="obs"`` correcting the weights left) and to the attached optimizers.

        Under torchrun every rank calls ``step`` alike: in-memory ``data`` is sharded, the curvature is
        all-reduced, and the masks are checked equal on every rank."""
        (target,) = sparsity_targets(sparsity)
        cfg, model = self.config, self.model
        limit = self.selector.limit(model)
        if target > limit:
            raise beyond_limit(self.selector, cfg, target, limit)
        world = current()
        batches = shard(as_batches(data, "data"), world) if data is not None else None
        self.masks, _ = prune_step(model, cfg, self.selector, self.masks, target, batches,
                                   samples=cfg.curvature_samples, generator=self._generator, device=_device_of(model),
                                   world=world, what=f"Pruner.step({target})")
        for opt in self._optimizers:
            self.masks.zero_optimizer_state(opt, model)
        return self.masks

    @property
    def sparsity(self) -> float:
        """Fraction of Conv/Linear weights that are exactly zero, measured on the model."""
        return measured_sparsity(self.model)[0]

    def macs(self) -> int:
        """Multiply-accumulates per sample the model will cost once compacted (channel granularity), or
        those of its nonzero weights (element granularity)."""
        if self.example_inputs is None:
            raise UsageError("counting MACs runs the model: pass example_inputs to the Pruner")
        return self.selector.macs(self.model, self.masks, self.example_inputs)

    def compact(self, example_inputs: torch.Tensor | None = None) -> nn.Module:
        """A new, physically smaller model computing the same function (dead units removed)."""
        example = self.example_inputs if example_inputs is None else example_inputs
        if example is None:
            raise UsageError("compact traces the model: pass example_inputs")
        return compact_model(self.model, example)
