"""Pruning methods as schedules of prune → fine-tune rounds, all starting from the same dense weights.

- ``magnitude``: remove the smallest |w| (Han et al. 2015).
- ``l1``: sparse regularization: L1-regularized training and fine-tuning, remove the smallest |w|.
- ``obd``: Optimal Brain Damage: remove the lowest ½·h_kk·w_k², h from a curvature estimator.
- ``hybrid``: L1-regularized training and fine-tuning, with OBD saliency choosing what goes.

Every method gets the same epochs: ``reg_epochs`` of training before the first round (with the L1
regularizer for ``l1``/``hybrid``, plain for the others), then ``finetune.epochs`` after every round.
The sparsity path passes through every requested target; each round removes at most ``prune_step`` of
the weights still present. With ``budget="macs"`` (channel granularity) the targets and the path count
the share of the dense Conv/Linear MACs removed instead, and units go by score per MAC saved. Every
round is scored on the validation split; ``max_drop`` keeps the last round whose validation accuracy
stayed within the allowed drop. Test accuracy is only reported.

:func:`prune_model` is the loop: plan the path, run the rounds (score → select → fine-tune → validate),
choose. What differs between granularities lives in one :mod:`~obdprune.selection` selector; training
phases run obdprune's own loop or the user's ``fine_tune(model, epochs)``.
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from obdprune.batches import Batches, as_batches
from obdprune.checkpoint import RoundState, RoundStore
from obdprune.choices import Choice
from obdprune.constraints import StepConstraints
from obdprune.curvature import CurvatureKind, NegativeCurvature, estimate_curvature
from obdprune.distributed import World, all_reduce_mean, barrier, broadcast_object, check_same_masks, current, \
    shard, sync_module, wrap
from obdprune.errors import ObdpruneError, UsageError
from obdprune.gradual import plan_gradual
from obdprune.groups import DEFAULT_MIN_UNITS, Granularity
from obdprune import lambda_search
from obdprune.lambda_search import search_l1_lambda
from obdprune.masking import DEFAULT_LAYER_FLOOR, MaskSet, Scope, masks_from_weights, prunable_weights
from obdprune.measure import measured_sparsity
from obdprune.obs import DEFAULT_DAMP, dampen, layer_hessians, obs_prune, obs_saliency
from obdprune.recipe import Criterion, PruneSchedule, Recovery, WeightUpdate, check_distill
from obdprune.regularize import L1Mode, NoRegularizer, Regularizer
from obdprune.selection import Budget, Selector, make_selector
from obdprune.stopping import MaxDropRule, Verdict, judge, standard_error
from obdprune.train import TrainConfig, evaluate, train

__all__ = ["Method", "Budget", "PruneConfig", "PrunePoint", "sparsity_path", "prune_model", "measured_sparsity",
           "FineTune", "round_curvature", "prune_step", "sparsity_targets", "beyond_limit", "AUTO"]

FineTune = Callable[[nn.Module, int], Any]
"""A user's training phase: ``fine_tune(model, epochs)`` trains ``model`` in place for ``epochs`` epochs."""


class Method(Choice):
    """The pruning methods compared by ``compare``."""

    MAGNITUDE = "magnitude"
    L1 = "l1"
    OBD = "obd"
    HYBRID = "hybrid"

    @property
    def regularized(self) -> bool:
        return self in (Method.L1, Method.HYBRID)

    @property
    def second_order(self) -> bool:
        return self in (Method.OBD, Method.HYBRID)


# Chosen on the validation split (BENCHMARKS.md): L1 on lenet5; group lasso on lenet5 and lenet5-caffe,
# where 2e-3 zeroed so many units during the first regularized epoch that no round held 0.5 points.
FIXED_L1_LAMBDA = {Granularity.ELEMENT: 2e-3, Granularity.CHANNEL: 3e-4}
"""The given strengths where no search runs: a user's ``fine_tune`` or :class:`~obdprune.api.Pruner`."""

_CHOICES = {"method": Method, "scope": Scope, "granularity": Granularity, "budget": Budget, "l1_mode": L1Mode,
            "curvature": CurvatureKind, "negative_curvature": NegativeCurvature, "prune_schedule": PruneSchedule,
            "update": WeightUpdate, "max_drop_rule": MaxDropRule}
AUTO = "auto"
"""``l1_lambda=AUTO``: the strength is searched on the validation split (:mod:`obdprune.lambda_search`)."""
DEFAULT_L1_LAMBDA = {Granularity.ELEMENT: AUTO, Granularity.CHANNEL: FIXED_L1_LAMBDA[Granularity.CHANNEL]}
"""``l1_lambda=None`` in obdprune's loop: searched for single weights (on lenet5's validation split, 20,000
images, 3 seeds, +0.10 / +0.12 pt for l1 / hybrid over the fixed 2e-3 at targets 90-99 %, a tie with 76 % among
them; BENCHMARKS.md); group lasso keeps its given strength."""
DEFAULT_CURVATURE_WINDOW = 8
"""Ramp steps a gradual schedule's running curvature spans (:class:`RunningCurvature`)."""
DEFAULT_DISTILL = (2.0, 0.5)
"""Distillation from the dense model, temperature 2 and weight 0.5: on by default in obdprune's own loop
(chosen on validation with 0.3 prune steps and one fine-tuning epoch per round, then kept with the 0.15
steps that beat them on validation for every method; BENCHMARKS.md)."""
OWN_TRAINING = ("prune_schedule", "lr_rewind", "distill")
"""Options that need obdprune's training loop (not a user's ``fine_tune``)."""
PRUNE_LOOP = (*OWN_TRAINING, "max_drop_rule", "l1_lambda", "l1_ramp", "curvature_window")
"""Options that only :func:`prune_model` applies (not a :class:`~obdprune.api.Pruner` in the user's loop)."""


@dataclass(frozen=True)
class PruneConfig:
    """Everything that defines a pruning run besides the data and the dense weights.

    Options may be given as strings; they are parsed once here into their enums. The recovery recipe
    (:mod:`obdprune.recipe`: ``prune_schedule`` … ``max_drop_rule``, and ``l1_lambda="auto"``) is off by
    default but for distillation from the dense model (``distill``, :data:`DEFAULT_DISTILL`; ``None`` turns it
    off), the L1 strength searched on validation for element granularity (:data:`DEFAULT_L1_LAMBDA`; a
    number turns it off), both in obdprune's own loop only, and the ``monotone`` max-drop rule; ``total_epochs``,
    ``prune_every`` (optimizer steps) and ``curvature_window`` (ramp steps a running curvature estimate spans)
    belong to ``prune_schedule="gradual"``.

    >>> PruneConfig(method="obd", granularity="channel").granularity
    <Granularity.CHANNEL: 'channel'>
    """

    method: Method = Method.HYBRID
    scope: Scope = Scope.GLOBAL
    layer_floor: float = DEFAULT_LAYER_FLOOR
    prune_step: float = 0.15
    reg_epochs: int = 2
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=0.03, schedule="cosine"))
    l1_lambda: float | str | None = None  # None: DEFAULT_L1_LAMBDA of the granularity; AUTO: searched
    l1_mode: L1Mode = L1Mode.PROXIMAL
    l1_ramp: bool = False  # rounds: λ·s/s_end while pruning toward sparsity s (the path's end s_end gets λ)
    curvature: CurvatureKind = CurvatureKind.GGN
    curvature_samples: int = 1024
    curvature_draws: int | None = None
    negative_curvature: NegativeCurvature = NegativeCurvature.CLAMP
    max_sparsity: float = 0.99
    seed: int = 0
    granularity: Granularity = Granularity.ELEMENT
    budget: Budget = Budget.WEIGHTS
    channel_multiple: int = 1
    min_units: int = DEFAULT_MIN_UNITS
    keep: tuple[str, ...] = ()
    prune_schedule: PruneSchedule = PruneSchedule.ROUNDS
    total_epochs: int | None = None
    prune_every: int = 100
    curvature_window: int = DEFAULT_CURVATURE_WINDOW
    lr_rewind: bool = False
    distill: tuple[float, float] | None = DEFAULT_DISTILL
    criterion: Criterion | None = None  # None: the method's own (OBD for obd/hybrid, else magnitude)
    update: WeightUpdate = WeightUpdate.NONE
    obs_damp: float = DEFAULT_DAMP
    max_drop_rule: MaxDropRule = MaxDropRule.MONOTONE

    def __post_init__(self) -> None:
        for name, choice in _CHOICES.items():
            object.__setattr__(self, name, choice.parse(getattr(self, name)))
        if self.criterion is not None:
            object.__setattr__(self, "criterion", Criterion.parse(self.criterion))
        if self.distill is not None:
            object.__setattr__(self, "distill", check_distill(self.distill))
        if self.l1_lambda is None:
            object.__setattr__(self, "l1_lambda", DEFAULT_L1_LAMBDA[self.granularity])
        if isinstance(self.l1_lambda, str):
            text = self.l1_lambda.strip().lower()
            try:
                object.__setattr__(self, "l1_lambda", AUTO if text == AUTO else float(text))
            except ValueError:
                raise UsageError(f"L1 strength must be a number >= 0 or 'auto', got {self.l1_lambda!r}") from None
        self._check_recipe()
        if self.budget is Budget.MACS:
            if self.granularity is not Granularity.CHANNEL:
                raise UsageError("a MAC budget needs channel granularity (removing single weights saves no time)")
        object.__setattr__(self, "keep", (self.keep,) if isinstance(self.keep, str) else tuple(self.keep))
        if isinstance(self.min_units, bool) or not isinstance(self.min_units, int) or self.min_units < 1:
            raise UsageError(f"min units must be an integer >= 1, got {self.min_units!r}")
        if self.channel_multiple < 1:
            raise UsageError(f"channel multiple must be >= 1, got {self.channel_multiple}")
        if self.channel_multiple > 1 and self.budget is not Budget.MACS:
            raise UsageError("a channel multiple needs the MAC budget (budget='macs')")
        _check_fraction("prune step", self.prune_step)
        _check_fraction("max sparsity", self.max_sparsity)
        if not 0.0 <= self.layer_floor <= 1.0:
            raise UsageError(f"layer floor is a fraction in [0, 1], got {self.layer_floor}")
        if self.reg_epochs < 0:
            raise UsageError(f"regularization epochs must be >= 0, got {self.reg_epochs}")
        if self.curvature_samples < 1:
            raise UsageError(f"curvature samples must be >= 1, got {self.curvature_samples}")
        if self.curvature_draws is not None and self.curvature_draws < 1:
            raise UsageError(f"curvature draws must be >= 1, got {self.curvature_draws}")
        if self.l1_lambda != AUTO and not (self.l1_lambda >= 0 and math.isfinite(self.l1_lambda)):
            raise UsageError(f"L1 strength must be a number >= 0, got {self.l1_lambda}")

    def _check_recipe(self) -> None:
        gradual = self.prune_schedule is PruneSchedule.GRADUAL
        if gradual and self.total_epochs is None:
            raise UsageError("the gradual schedule needs total_epochs, the training budget of its one run")
        if not gradual and self.curvature_window != DEFAULT_CURVATURE_WINDOW:
            raise UsageError("curvature_window carries curvature across the steps of prune_schedule='gradual'; "
                             "rounds estimate it afresh on curvature_samples every round")
        if not gradual and self.total_epochs is not None:
            raise UsageError("total_epochs is the budget of prune_schedule='gradual'; rounds spend reg_epochs + "
                             "the fine-tuning epochs of every round")
        if self.total_epochs is not None and (isinstance(self.total_epochs, bool) or self.total_epochs < 1):
            raise UsageError(f"total epochs must be an integer >= 1, got {self.total_epochs!r}")
        if isinstance(self.prune_every, bool) or not isinstance(self.prune_every, int) or self.prune_every < 1:
            raise UsageError(f"prune_every is a number of training steps >= 1, got {self.prune_every!r}")
        if (isinstance(self.curvature_window, bool) or not isinstance(self.curvature_window, int)
                or self.curvature_window < 1):
            raise UsageError(f"curvature_window is a number of ramp steps >= 1, got {self.curvature_window!r}")
        if not isinstance(self.l1_ramp, bool):
            raise UsageError(f"l1_ramp is True or False, got {self.l1_ramp!r}")
        if self.l1_ramp and gradual:
            raise UsageError("l1_ramp scales λ round by round; the gradual schedule keeps one λ for its one run")
        if not isinstance(self.lr_rewind, bool):
            raise UsageError(f"lr_rewind is True or False, got {self.lr_rewind!r}")
        if not (self.obs_damp >= 0 and math.isfinite(self.obs_damp)):
            raise UsageError(f"OBS dampening must be a number >= 0, got {self.obs_damp}")
        obs = [f"{n}='obs'" for n in ("criterion", "update") if getattr(self, n) in (Criterion.OBS, WeightUpdate.OBS)]
        if obs and self.granularity is not Granularity.ELEMENT:
            raise UsageError(f"{' and '.join(obs)}: layer-wise OBS removes single weights and corrects the rest of "
                             f"their row; it has no rule for whole units: use granularity='element', or leave "
                             f"{'/'.join(n.split('=')[0] for n in obs)} at the default for channel granularity")

    @property
    def scoring(self) -> Criterion:
        """The criterion that ranks weights: ``criterion``, else OBD for obd/hybrid and magnitude otherwise."""
        if self.criterion is not None:
            return self.criterion
        return Criterion.OBD if self.method.second_order else Criterion.MAGNITUDE

    def recipe_set(self, names: Sequence[str]) -> list[str]:
        """Those of the recipe options ``names`` that are on: set away from their defaults, ``l1_lambda`` when
        AUTO, ``distill`` when not None (it is on by default).

        >>> PruneConfig(lr_rewind=True, l1_lambda="auto", distill=None).recipe_set(PRUNE_LOOP)
        ['lr_rewind', "l1_lambda='auto'"]
        """
        default = PruneConfig()

        def on(n: str) -> bool:
            if n == "l1_lambda":
                return self.l1_lambda == AUTO
            if n == "distill":
                return self.distill is not None
            return getattr(self, n) != getattr(default, n)

        return [(f"{n}='auto'" if n == "l1_lambda" else n) for n in names if on(n)]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d = {k: (v.value if isinstance(v, Choice) else v) for k, v in d.items()}
        d["finetune"] = self.finetune.to_dict()
        if self.distill is not None:
            d["distill"] = list(self.distill)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        d = dict(d)
        d.setdefault("distill", None)  # written before distillation existed, so without it
        d["finetune"] = TrainConfig(**d["finetune"])
        return cls(**d)


def _check_fraction(what: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        hint = f"; give {value / 100:g}, not {value:g}" if 1.0 < value <= 100.0 else ""
        raise UsageError(f"{what} must be a fraction in (0, 1), got {value}{hint}")


@dataclass
class PrunePoint:
    """One point of a method's path: the model state at a target (or the max-drop choice).

    ``test_accuracy`` is None when no test data was given. ``val_accuracy_se`` is the standard error
    √(p(1−p)/n) of ``val_accuracy`` on the n validation images. With ``l1_lambda="auto"``, ``l1_lambda`` is
    the chosen strength and ``l1_search`` the search (every candidate's validation accuracy, its cost).
    """

    method: str
    sparsity: float
    nonzero_weights: int
    weights: int
    val_accuracy: float
    test_accuracy: float | None
    seconds: float
    curvature_seconds: float
    round: int
    target_sparsity: float | None = None
    max_drop: float | None = None
    macs_removed: float | None = None
    val_accuracy_se: float | None = None
    l1_lambda: float | None = None
    l1_search: dict | None = None
    state_dict: dict | None = None
    masks: MaskSet | None = None

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("state_dict", "masks")}
        for k in ("target_sparsity", "max_drop", "macs_removed", "val_accuracy_se", "l1_lambda", "l1_search"):
            if d[k] is None:
                d.pop(k)
        return d


def sparsity_path(targets: list[float], prune_step: float, *, max_sparsity: float | None = None) -> list[float]:
    """Sparsity after each round: passes through every target (and ``max_sparsity`` if given), each round
    removing at most ``prune_step`` of the weights still present (geometric in density between stops).

    >>> [round(s, 3) for s in sparsity_path([0.76, 0.9], 0.6)]
    [0.51, 0.76, 0.9]
    """
    stops = sorted(set(float(t) for t in targets) | ({float(max_sparsity)} if max_sparsity else set()))
    for s in stops:
        _check_fraction("a sparsity target", s)
    path: list[float] = []
    density = 1.0
    for stop in stops:
        d_next = 1.0 - stop
        n = max(1, math.ceil(math.log(d_next / density) / math.log(1.0 - prune_step) - 1e-9))
        for k in range(1, n + 1):
            path.append(1.0 - density * (d_next / density) ** (k / n))
        path[-1] = stop
        density = d_next
    return path


def sparsity_targets(sparsity: float | Sequence[float] | None) -> list[float]:
    """One fraction or a list of fractions in (0, 1) as a list; UsageError with a hint otherwise.

    >>> sparsity_targets(0.9), sparsity_targets([0.5, 0.8])
    ([0.9], [0.5, 0.8])
    """
    if sparsity is None:
        return []
    values = [sparsity] if isinstance(sparsity, (int, float)) else sparsity
    try:
        values = [float(s) for s in values]
    except (TypeError, ValueError):
        raise UsageError(f"sparsity must be a fraction or a list of fractions, got {sparsity!r}") from None
    for s in values:
        _check_fraction("a sparsity target", s)
    return values


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class _Splits:
    train: Batches
    val: Batches
    test: Batches | None


def _splits(data: Any, world: World) -> _Splits:
    """An obdprune Dataset, or anything with train/val(/test) attributes, as batches (this rank's shard)."""
    if not (hasattr(data, "train") and hasattr(data, "val")):
        raise UsageError(f"data must have train and val splits (an obdprune Dataset), got {type(data).__name__}; "
                         f"for your own data call obdprune.prune(model, train, val) with DataLoaders or "
                         f"(inputs, targets) pairs")
    test = getattr(data, "test", None)
    return _Splits(shard(as_batches(data.train, "train"), world), shard(as_batches(data.val, "val"), world),
                   shard(as_batches(test, "test"), world) if test is not None else None)


@dataclass
class _Plan:
    path: list[float]
    targets: set[float]
    last_target: float


def beyond_limit(selector: Selector, cfg: PruneConfig, target: float, limit: float) -> UsageError:
    """The error for a ``target`` above the selector's ``limit``, listing every layer that cannot lose units
    and why (:meth:`Selector.explain`)."""
    why = selector.explain()
    return UsageError(f"target sparsity {target} would empty a layer: with a layer floor of "
                      f"{cfg.layer_floor}, min units {cfg.min_units} and {cfg.scope.value} scope at most "
                      f"{limit:.4f} of the {selector.counted} can go"
                      + ("; layers that cannot lose units:\n  " + "\n  ".join(why) if why else ""))


def _plan(selector: Selector, model: nn.Module, cfg: PruneConfig, targets: list[float],
          max_drop: float | None) -> _Plan:
    limit = selector.limit(model)
    too_far = [t for t in targets if t > limit]
    if too_far:
        raise beyond_limit(selector, cfg, max(too_far), limit)
    path = sparsity_path(targets, cfg.prune_step,
                         max_sparsity=min(cfg.max_sparsity, limit) if max_drop is not None else None)
    return _Plan(path, {round(t, 12) for t in targets}, max(targets) if targets else 0.0)


def _phase_runner(cfg: PruneConfig, train_data: Batches, fine_tune: FineTune | None, device: torch.device,
                  progress: bool, world: World, recovery: Recovery) -> Callable[..., None]:
    """``run(model, epochs, seed, desc, masks, regularizer)``: obdprune's loop (with the ``recovery`` recipe's
    loss and learning rates), or the user's ``fine_tune`` with masks and the proximal step enforced after
    every step of any optimizer it creates. Under torchrun the user's ``fine_tune`` gets the model wrapped
    in DistributedDataParallel."""
    if fine_tune is None:
        def run(model, epochs, seed, desc, masks, reg, data: Batches | None = None) -> None:
            data = train_data if data is None else data
            steps = data.steps_per_epoch(cfg.finetune.batch_size)
            train(model, data, replace(cfg.finetune, epochs=epochs, seed=seed), masks=masks, regularizer=reg,
                  device=device, progress=progress, desc=desc, world=world, **recovery.train_kwargs(epochs, steps))
        return run

    def run_user(model, epochs, seed, desc, masks, reg, data: Batches | None = None) -> None:
        with StepConstraints(model, masks, reg).every_optimizer():
            fine_tune(wrap(model, world), epochs)
    return run_user


def round_curvature(model: nn.Module, cfg: PruneConfig, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                    generator: torch.Generator, world: World | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """The curvature ``cfg`` asks for on ``x`` (N, ...), ``y`` (N,) in eval mode, checked finite, and its seconds.

    world: under torchrun ``x``, ``y`` are this rank's share of the samples; every estimator's mean over
    samples is all-reduced with the sample counts, so each rank returns the estimate on the union. Label
    draws and probes come from a generator of this rank's own, seeded from ``generator``'s state without
    drawing from it, so ``generator`` stays where one process would leave it for an exact estimator.
    """
    world = world or World()
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    if world.distributed:
        digest = hashlib.sha256(generator.get_state().numpy().tobytes()).digest()
        own = torch.Generator().manual_seed(int.from_bytes(digest[:7], "little") + world.rank)
        rows = int(y.shape[0])
        xs, ys = (x, y) if rows else (x[:0].new_zeros((1, *x.shape[1:])), y.new_zeros(1))  # shapes only
        local = estimate_curvature(cfg.curvature, model, xs.to(device), ys.to(device), samples=cfg.curvature_draws,
                                   generator=own)
        curv = all_reduce_mean(world, local, rows)
    else:
        curv = estimate_curvature(cfg.curvature, model, x.to(device), y.to(device), samples=cfg.curvature_draws,
                                  generator=generator)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    for name, h in curv.items():
        if not torch.isfinite(h).all():
            raise ObdpruneError(f"curvature of {name!r} contains NaN or inf; the model may have diverged")
    return curv, seconds


def round_hessians(model: nn.Module, cfg: PruneConfig, x: torch.Tensor, device: torch.device,
                   world: World | None = None, reuse: RunningCurvature | None = None) -> dict[str, torch.Tensor]:
    """Layer-wise OBS Hessians H = 2·X·Xᵀ/N of every Conv2d/Linear layer on inputs ``x`` (N, ...), dampened
    by ``cfg.obs_damp`` (:func:`obdprune.obs.layer_hessians`). Under torchrun ``x`` is this rank's share and
    the undampened means are all-reduced with the sample counts, so every rank gets the union's H."""
    world = world or World()
    rows = int(x.shape[0])
    xs = x if rows or not world.distributed else x[:0].new_zeros((1, *x.shape[1:]))  # shapes only
    hessians = all_reduce_mean(world, layer_hessians(model, xs.to(device), damp=0.0), rows)
    if reuse is not None:
        hessians = reuse.blend("hessians", hessians)
    return {name: dampen(h, cfg.obs_damp) for name, h in hessians.items()}


class RunningCurvature:
    """Curvature carried across the close pruning steps of a gradual ramp (``cfg.curvature_window`` = W).

    The first step estimates on the full ``curvature_samples`` S; every later one on ⌈S/W⌉ fresh samples,
    blended in as h ← (1 − 1/W)·h + (1/W)·ĥ. The blend's variance is (1/W)/(2 − 1/W)·W/S·σ² ≤ σ²/S, that of one
    estimate on S samples, at 1/W of its cost per step; the price is a lag of about W steps behind the
    weights. W = 1 is a fresh estimate on S samples at every step. The same holds for OBS's layer
    Hessians (means over samples, blended before damping).

    >>> r = RunningCurvature(4)
    >>> r.samples(1024), r.blend("curvature", {"w": torch.ones(2)})["w"].tolist(), r.samples(1024)
    (1024, [1.0, 1.0], 256)
    >>> r.blend("curvature", {"w": torch.zeros(2)})["w"].tolist()
    [0.75, 0.75]
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._estimates: dict[str, dict[str, torch.Tensor]] = {}

    def samples(self, full: int) -> int:
        """How many fresh samples the next step draws: ``full`` first, then ⌈full/W⌉."""
        return full if not self._estimates else max(1, math.ceil(full / self.window))

    def blend(self, kind: str, fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The running estimate of ``kind`` after ``fresh`` (the first one is taken as is)."""
        old = self._estimates.get(kind)
        if old is not None and old.keys() == fresh.keys():
            b = 1.0 / self.window
            fresh = {k: old[k].mul(1.0 - b).add_(h, alpha=b) for k, h in fresh.items()}
        self._estimates[kind] = fresh
        return {k: h.clone() for k, h in fresh.items()}


def prune_step(model: nn.Module, cfg: PruneConfig, selector: Selector, masks: MaskSet, target: float,
               data: Batches | None, *, samples: int, generator: torch.Generator, device: torch.device,
               world: World, what: str, reuse: RunningCurvature | None = None) -> tuple[MaskSet, float]:
    """One pruning step on ``model`` in place: score by ``cfg.scoring`` (magnitude; OBD on a fresh curvature
    sample; or OBS's w²/[H⁻¹]_qq), select masks reaching ``target`` that only shrink ``masks``, and apply
    them; with ``cfg.update == "obs"`` the weights left in each row are corrected (:func:`obdprune.obs.obs_prune`).
    ``samples`` images are drawn from ``data`` (this rank's share under torchrun) for the curvature and the
    layer Hessians; the masks are checked equal on every rank (``what`` names the step if not). Returns the
    masks and the seconds spent on curvature and Hessians. ``reuse`` (gradual ramps) blends them into the
    running estimates of :class:`RunningCurvature`; ``samples`` should then come from its ``samples()``."""
    scoring, seconds = cfg.scoring, 0.0
    curv = hessians = None
    if scoring is not Criterion.MAGNITUDE or cfg.update is WeightUpdate.OBS:
        if data is None:
            raise UsageError(f"{scoring.value} ranks by curvature or layer inputs: pass data=, a DataLoader or "
                             f"(inputs, targets)")
        x, y = data.sample(samples, generator)
        if scoring is Criterion.OBD:
            curv, seconds = round_curvature(model, cfg, x, y, device, generator, world)
            if reuse is not None:
                curv = reuse.blend("curvature", curv)
        if scoring is Criterion.OBS or cfg.update is WeightUpdate.OBS:
            t0 = time.perf_counter()
            hessians = round_hessians(model, cfg, x, device, world, reuse)
            seconds += time.perf_counter() - t0
    scores = (obs_saliency(prunable_weights(model), hessians, masks) if scoring is Criterion.OBS
              else selector.scores(model, curv, cfg.negative_curvature))
    selected = selector.select(scores, target, masks, model)
    if cfg.update is WeightUpdate.OBS:
        selected = obs_prune(model, hessians, masks, selected)
    check_same_masks(world, selected, what)
    selected.apply(model)
    return selected, seconds


@dataclass
class _Progress:
    """Where a path stands: what a checkpoint saves after every round."""

    masks: MaskSet
    results: list[PrunePoint]
    held: PrunePoint | None = None
    failed: bool = False
    stop: bool = False
    round: int = 0
    curvature_seconds: float = 0.0
    l1_search: dict | None = None
    val_history: list[float] = field(default_factory=list)  # every round's validation accuracy, in order


def prune_model(
    model: nn.Module,
    data: Any,
    cfg: PruneConfig,
    *,
    targets: list[float] = (),
    max_drop: float | None = None,
    dense_val_accuracy: float | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_round: Callable[[dict], None] | None = None,
    checkpoint: RoundStore | None = None,
    fine_tune: FineTune | None = None,
    example_inputs: torch.Tensor | None = None,
    world: World | None = None,
    dense_train: TrainConfig | None = None,
) -> list[PrunePoint]:
    """Run one method's path on a copy of ``model`` (left unchanged) and return its points.

    data: an :class:`obdprune.data.Dataset`, or any object with ``train``, ``val`` and optionally ``test``
      attributes that :func:`obdprune.batches.as_batches` accepts.
    targets: sparsities to report (fractions of Conv/Linear weights, or MACs, removed).
    max_drop: percentage points of validation accuracy the result may lose against
      ``dense_val_accuracy``; ``cfg.max_drop_rule`` (:mod:`obdprune.stopping`) picks the round returned.
    fine_tune: the user's ``fine_tune(model, epochs)`` for every training phase instead of obdprune's loop.
    checkpoint: saves the state after every round and, if it holds one, continues after its last round
      (``prune_schedule="gradual"`` is one training run: it starts over).
    world: the ranks of a torchrun run (default: the initialized process group, else one process). Every
      rank calls ``prune_model`` alike; rank 0's weights are copied to all, data is sharded, curvature and
      accuracies are all-reduced, the masks are checked equal every round, and only rank 0 saves the
      checkpoint (the others wait; on resume they get rank 0's snapshot).
    dense_train: the dense run's TrainConfig, whose learning rates ``cfg.lr_rewind`` replays.
    Points hold CPU state_dicts and masks so callers can save the models.
    """
    targets = sparsity_targets(targets)
    _check_request(targets, max_drop, cfg, fine_tune)
    if own_max_drop_path(cfg, targets, max_drop):
        kw = dict(dense_val_accuracy=dense_val_accuracy, device=device, progress=progress, fine_tune=fine_tune,
                  example_inputs=example_inputs, world=world, dense_train=dense_train)
        points = prune_model(model, data, cfg, targets=targets, checkpoint=checkpoint, on_round=on_round, **kw)
        return points + prune_model(
            model, data, cfg, max_drop=max_drop, checkpoint=checkpoint.branch(MAX_DROP_PATH) if checkpoint else None,
            on_round=(lambda r: on_round(r | {"path": MAX_DROP_PATH})) if on_round is not None else None, **kw)
    world = world or current()
    device, splits = torch.device(device), _splits(data, world)
    dense_model, model = model, copy.deepcopy(model).to(device)
    sync_module(world, model)
    example = (example_inputs if example_inputs is not None else splits.train.example()).to(device)
    if dense_val_accuracy is None:
        dense_val_accuracy, _ = evaluate(model, splits.val, device=device, world=world)
    selector = make_selector(model, example, granularity=cfg.granularity, budget=cfg.budget, scope=cfg.scope,
                             layer_floor=cfg.layer_floor, channel_multiple=cfg.channel_multiple,
                             min_units=cfg.min_units, keep=cfg.keep)
    recovery = Recovery.make(cfg.distill, cfg.lr_rewind, model, dense_train)
    progress = progress and world.writer
    gen = torch.Generator().manual_seed(cfg.seed)
    state = _Progress(MaskSet.dense(model), [])
    schedule = _SCHEDULES[cfg.prune_schedule]
    path = _Path(cfg, model, splits, selector, _plan(selector, model, cfg, targets, max_drop), example, state,
                 _Snapshots(checkpoint if schedule is _run_rounds else None, world, model, gen, time.perf_counter()),
                 gen, device, world, progress, _phase_runner(cfg, splits.train, fine_tune, device, progress, world,
                                                             recovery), recovery, max_drop, dense_val_accuracy, on_round,
                 own_loop=fine_tune is None)
    resumed = path.snapshots.resume(state, device)
    path.reg, regularized = _regularizer(path)
    schedule(path, resumed, regularized)
    return path.finish(dense_model)


MAX_DROP_PATH = "max-drop"
"""The name of a max drop's own path (round records' ``path``, the checkpoint's branch)."""


def own_max_drop_path(cfg: PruneConfig, targets: Sequence[float], max_drop: float | None) -> bool:
    """True when a max drop, asked together with sparsity targets, gets a path of its own: the L1 strength is
    searched (``l1_lambda="auto"``) and each request searches its own grid
    (:data:`obdprune.lambda_search.AUTO_L1_STRENGTHS_MAX_DROP` for the max drop).

    >>> [own_max_drop_path(PruneConfig(method=m), [0.9], 0.3) for m in ("l1", "obd")]
    [True, False]
    """
    return bool(targets) and max_drop is not None and cfg.method.regularized and cfg.l1_lambda == AUTO


def _check_request(targets: list[float], max_drop: float | None, cfg: PruneConfig, fine_tune: FineTune | None) -> None:
    if not targets and max_drop is None:
        raise UsageError("give sparsity targets, a max drop, or both")
    if max_drop is not None and not (0.0 <= max_drop <= 100.0):
        raise UsageError(f"the max drop is in percentage points and must be in [0, 100], got {max_drop}")
    if fine_tune is not None and cfg.method.regularized and cfg.l1_mode is L1Mode.PENALTY:
        raise UsageError("the L1 penalty form adds to obdprune's own loss; with fine_tune use l1_mode='proximal'")
    own = cfg.recipe_set(OWN_TRAINING)
    if fine_tune is not None and own:
        hint = " (distillation is on by default: distill=None turns it off)" if "distill" in own else ""
        raise UsageError(f"{', '.join(own)}: need obdprune's own training loop; leave out fine_tune{hint}")


@dataclass
class _Snapshots:
    """The path's checkpoint: rank 0 saves after every round (the others wait), and on resume every rank
    gets rank 0's snapshot. ``start`` is the path's start time, moved back by the resumed seconds."""

    checkpoint: RoundStore | None
    world: World
    model: nn.Module
    generator: torch.Generator
    start: float

    def save(self, state: _Progress) -> None:
        if self.checkpoint is None:
            return
        if self.world.writer:
            self.checkpoint.save(RoundState(state.round, self.model.state_dict(), state.masks,
                                            self.generator.get_state(), state.results, state.held, state.failed,
                                            state.stop, state.curvature_seconds, time.perf_counter() - self.start,
                                            state.l1_search, state.val_history))
        barrier(self.world)

    def resume(self, state: _Progress, device: torch.device) -> bool:
        """Load the newest snapshot into the model, ``state`` and the generator; False when there is none."""
        if self.checkpoint is None:
            return False
        resumed = broadcast_object(self.world, self.checkpoint.load() if self.world.writer else None)
        if resumed is None:
            return False
        self.model.load_state_dict(resumed.model_state)
        state.masks, state.results, state.held = resumed.masks.to(device), resumed.results, resumed.held
        state.failed, state.stop, state.round = resumed.failed, resumed.stop, resumed.round
        state.curvature_seconds, state.l1_search = resumed.curvature_seconds, resumed.l1_search
        state.val_history = list(resumed.val_history)
        self.generator.set_state(resumed.generator_state)
        self.start -= resumed.seconds
        return True


@dataclass
class _Path:
    """One method's path in progress: the pruned copy and what its schedule's steps use."""

    cfg: PruneConfig
    model: nn.Module
    splits: _Splits
    selector: Selector
    plan: _Plan
    example: torch.Tensor
    state: _Progress
    snapshots: _Snapshots
    generator: torch.Generator
    device: torch.device
    world: World
    progress: bool
    run_phase: Callable[..., None]
    recovery: Recovery
    max_drop: float | None
    dense_val_accuracy: float
    on_round: Callable[[dict], None] | None
    own_loop: bool = True  # False: phases run the user's fine_tune
    reg: Regularizer = field(default_factory=NoRegularizer)
    reuse: RunningCurvature | None = None  # set by the gradual schedule

    def prune_to(self, target: float, what: str) -> None:
        """:func:`prune_step` to ``target`` on a fresh sample of the training data."""
        st = self.state
        full = min(self.cfg.curvature_samples, len(self.splits.train))
        st.masks, seconds = prune_step(self.model, self.cfg, self.selector, st.masks, target, self.splits.train,
                                       samples=self.reuse.samples(full) if self.reuse is not None else full,
                                       generator=self.generator, device=self.device, world=self.world, what=what,
                                       reuse=self.reuse)
        st.curvature_seconds += seconds

    def end_round(self, rnd: int, target: float) -> bool:
        """Measure the model after round ``rnd``, report it, keep it if ``target`` is a requested one, judge it
        for the max drop, save the checkpoint; True when the path may stop."""
        st = self.state
        point = _measure_point(self.model, self.splits, self.cfg.method, st, self.selector, rnd, self.snapshots.start,
                               self.device, self.world)
        if self.on_round is not None:
            self.on_round(_round_record(point, target, self.selector.macs(self.model, st.masks, self.example)))
        key = round(target, 12)
        if key in self.plan.targets and all(round(r.target_sparsity, 12) != key for r in st.results):
            st.results.append(self._with_test(point, target_sparsity=target))
        st.val_history.append(point.val_accuracy)
        if self.max_drop is not None and not st.failed:
            previous_held = rnd == 1 or (st.held is not None and st.held.round == rnd - 1)
            verdict = judge(self.cfg.max_drop_rule, st.val_history, len(self.splits.val), self.dense_val_accuracy,
                            self.max_drop, previous_held)
            if verdict is Verdict.HOLD:
                st.held = self._with_test(point, max_drop=self.max_drop)
            st.failed = verdict is Verdict.STOP
        st.round, st.stop = rnd, st.failed and target >= self.plan.last_target
        self.snapshots.save(st)
        return st.stop

    def _with_test(self, point: PrunePoint, **kw) -> PrunePoint:
        return _with_test(point, self.model, self.splits, self.device, self.world, **kw)

    def reg_toward(self, target: float) -> Regularizer:
        """The regularizer of a phase that trains toward ``target`` sparsity: the method's own, or with
        ``l1_ramp`` its strength scaled by target / (the path's last point), so λ grows along the path."""
        if not self.cfg.l1_ramp or not self.cfg.method.regularized:
            return self.reg
        lam = self.state.l1_search["l1_lambda"] if self.state.l1_search is not None else self.cfg.l1_lambda
        return self.selector.regularizer(lam * min(1.0, target / self.plan.path[-1]), self.cfg.l1_mode)

    def finish(self, dense: nn.Module) -> list[PrunePoint]:
        """The target points and the max-drop choice, with the searched λ when ``l1_lambda="auto"``."""
        st = self.state
        points = st.results + ([_choose_held(st, dense, self.splits, self.cfg.method, self.max_drop, self.device,
                                             self.snapshots.start, self.world)] if self.max_drop is not None else [])
        if st.l1_search is None:
            return points
        return [replace(p, l1_lambda=st.l1_search["l1_lambda"], l1_search=st.l1_search) for p in points]


def _regularizer(path: _Path) -> tuple[Regularizer, dict | None]:
    """The method's regularizer: none, L1 (group lasso) of strength ``cfg.l1_lambda``, or with ``"auto"`` of the
    strength searched on the validation split (once: a resumed path reads it back). Also returns the winning
    trial's weights when that trial was exactly the rounds' regularization phase, so it is not run twice."""
    cfg, st, selector = path.cfg, path.state, path.selector
    if not cfg.method.regularized:
        return NoRegularizer(), None
    if cfg.l1_lambda != AUTO:
        return selector.regularizer(cfg.l1_lambda, cfg.l1_mode), None
    reused = None
    if st.l1_search is None:
        choice = _search_lambda(path)
        st.l1_search = choice.to_dict()
        if cfg.reg_epochs and cfg.prune_schedule is PruneSchedule.ROUNDS:
            reused = choice.regularized_state
    return selector.regularizer(st.l1_search["l1_lambda"], cfg.l1_mode), reused


def _search_lambda(path: _Path):
    """``l1_lambda="auto"``: trials of the regularization phase (``reg_epochs``, at least one), each probed by
    one-shot magnitude pruning to every requested target (with a max drop only: to the path's end, at most
    0.9, and from the gentler grid), chosen on validation (:func:`obdprune.lambda_search.search_l1_lambda`).

    In obdprune's loop the K trials share that phase's budget: trial k trains on every K-th batch of each
    epoch, so the search costs ``max(1, reg_epochs)`` epochs in all, as long as the phase it replaces. A
    user's ``fine_tune`` (or fewer batches per epoch than candidates) gets whole epochs per trial instead."""
    cfg, selector, model = path.cfg, path.selector, path.model
    epochs = max(1, cfg.reg_epochs)
    strengths = (lambda_search.AUTO_L1_STRENGTHS_MAX_DROP if path.max_drop is not None and not path.plan.targets
                 else lambda_search.AUTO_L1_STRENGTHS)
    steps = path.splits.train.steps_per_epoch(cfg.finetune.batch_size)
    shared = path.own_loop and steps is not None and steps >= len(strengths)
    parts = len(strengths) if shared else 1
    probe_targets = (sorted(path.plan.targets) if path.plan.targets else [min(0.9, path.plan.path[-1])])

    def regularize(m: nn.Module, lam: float, k: int) -> None:
        path.run_phase(m, epochs, cfg.seed * 1000 + k, f"{cfg.method.value} λ={lam:.3g}", MaskSet.dense(m),
                       selector.regularizer(lam, cfg.l1_mode), data=path.splits.train.part(k, parts) if shared
                       else None)

    def probe(m: nn.Module) -> list[MaskSet]:
        scores = selector.magnitude_scores(m)
        return [selector.select(scores, t, MaskSet.dense(m), m) for t in probe_targets]

    return search_l1_lambda(model, regularize=regularize, epochs=epochs * len(strengths) // parts, probe=probe,
                            val=path.splits.val, device=path.device, world=path.world, strengths=strengths)


def _run_rounds(path: _Path, resumed: bool, regularized: dict | None) -> None:
    """Today's schedule: the regularization phase, then rounds of prune → fine-tune along the plan's path."""
    cfg, st, model, method = path.cfg, path.state, path.model, path.cfg.method.value
    if not resumed and cfg.reg_epochs:
        if regularized is not None:
            model.load_state_dict(regularized)
        else:
            path.run_phase(model, cfg.reg_epochs, cfg.seed * 1000, f"{method} regularize", st.masks,
                           path.reg_toward(path.plan.path[0]))
        path.snapshots.save(st)
    for rnd, target in [] if st.stop else list(enumerate(path.plan.path, start=1))[st.round:]:
        path.prune_to(target, f"{method} round {rnd}")
        path.run_phase(model, cfg.finetune.epochs, cfg.seed * 1000 + rnd, f"{method} {target:.3f}", st.masks,
                       path.reg_toward(target))
        if path.end_round(rnd, target):
            break


def _run_gradual(path: _Path, resumed: bool, regularized: dict | None) -> None:
    """One continuous run of ``cfg.total_epochs``: ``reg_epochs`` before the ramp, the cubic ramp of
    :mod:`obdprune.gradual` pruning every ``prune_every`` steps, the fine-tuning epochs after it. A "round" is
    a pruning step; it is measured at the end of its segment, just before the next one (the last: at the end).
    An ``l1_lambda="auto"`` search's epochs come out of ``total_epochs``, so every method trains as long.
    Curvature runs on :class:`RunningCurvature` estimates over ``curvature_window`` steps."""
    cfg, st, model = path.cfg, path.state, path.model
    steps_per_epoch = path.splits.train.steps_per_epoch(cfg.finetune.batch_size)
    searched = st.l1_search["epochs"] if st.l1_search is not None else 0
    epochs = cfg.total_epochs - searched
    if searched and epochs <= cfg.reg_epochs + cfg.finetune.epochs:
        raise UsageError(f"the l1_lambda='auto' search spent {searched} of total_epochs={cfg.total_epochs}, leaving "
                         f"{epochs}: not more than the epochs before and after the ramp ({cfg.reg_epochs} + "
                         f"{cfg.finetune.epochs}); raise total_epochs or give l1_lambda a value")
    ramp = plan_gradual(sorted(path.plan.targets | {round(path.plan.path[-1], 12)}), steps_per_epoch=steps_per_epoch,
                        total_epochs=epochs, pre_epochs=cfg.reg_epochs, tail_epochs=cfg.finetune.epochs,
                        prune_every=cfg.prune_every)
    at = {step: k for k, step in enumerate(ramp.steps)}
    path.reuse = RunningCurvature(cfg.curvature_window)

    def on_step(done: int, opt: torch.optim.Optimizer) -> None:
        k = at.get(done)
        if k is not None:
            if k > 0:
                path.end_round(k, ramp.sparsities[k - 1])
            path.prune_to(ramp.sparsities[k], f"{cfg.method.value} ramp step {k + 1}")
            st.masks.zero_optimizer_state(opt, model)

    train(model, path.splits.train, replace(cfg.finetune, epochs=epochs, seed=cfg.seed * 1000),
          masks=lambda: st.masks, regularizer=path.reg, device=path.device, progress=path.progress,
          desc=f"{cfg.method.value} gradual", world=path.world, on_step=on_step,
          **path.recovery.train_kwargs(epochs, steps_per_epoch))
    path.end_round(len(ramp.steps), ramp.sparsities[-1])


_SCHEDULES = {PruneSchedule.ROUNDS: _run_rounds, PruneSchedule.GRADUAL: _run_gradual}


def _round_record(point: PrunePoint, target: float, macs: int) -> dict:
    """What ``on_round`` gets after a round."""
    return ({"method": point.method, "round": point.round, "target": target, "sparsity": point.sparsity,
             "macs": macs, "val_accuracy": point.val_accuracy, "seconds": point.seconds,
             "curvature_seconds": point.curvature_seconds}
            | ({"macs_removed": point.macs_removed} if point.macs_removed is not None else {}))


def _measure_point(model: nn.Module, splits: _Splits, method: Method, state: _Progress, selector: Selector,
                   rnd: int, start: float, device: torch.device, world: World) -> PrunePoint:
    sparsity, nonzero, total = measured_sparsity(model)
    val_acc, _ = evaluate(model, splits.val, device=device, world=world)
    return PrunePoint(method=method.value, sparsity=sparsity, nonzero_weights=nonzero, weights=total,
                      val_accuracy=val_acc, test_accuracy=None, seconds=time.perf_counter() - start,
                      curvature_seconds=state.curvature_seconds, round=rnd,
                      macs_removed=selector.macs_removed(state.masks), masks=state.masks,
                      val_accuracy_se=standard_error(val_acc, len(splits.val)))


def _with_test(point: PrunePoint, model: nn.Module, splits: _Splits, device: torch.device, world: World,
               **kw) -> PrunePoint:
    """The point as a result: test accuracy (reported only), a CPU copy of the weights and masks."""
    test_acc = evaluate(model, splits.test, device=device, world=world)[0] if splits.test is not None else None
    return replace(point, test_accuracy=test_acc, **kw,
                   state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                   masks=point.masks.to("cpu"))


def _choose_held(state: _Progress, dense: nn.Module, splits: _Splits, method: Method, max_drop: float,
                 device: torch.device, start: float, world: World) -> PrunePoint:
    """The max-drop point: the last round that held, else the dense weights (round 0, always holds)."""
    if state.held is not None:
        return state.held
    warnings.warn(f"{method.value}: no pruning round kept validation accuracy within {max_drop} points of "
                  f"the dense model; the max-drop result is the dense model itself (sparsity 0)",
                  RuntimeWarning, stacklevel=4)
    model = copy.deepcopy(dense).to(device)
    sync_module(world, model)
    sparsity, nonzero, total = measured_sparsity(model)
    val_acc = evaluate(model, splits.val, device=device, world=world)[0]
    point = PrunePoint(method=method.value, sparsity=sparsity, nonzero_weights=nonzero, weights=total,
                       val_accuracy=val_acc, test_accuracy=None, seconds=time.perf_counter() - start,
                       curvature_seconds=state.curvature_seconds, round=0, masks=masks_from_weights(model),
                       val_accuracy_se=standard_error(val_acc, len(splits.val)))
    return _with_test(point, model, splits, device, world, max_drop=max_drop)
