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
from obdprune.groups import DEFAULT_MIN_UNITS, Granularity
from obdprune.masking import MaskSet, Scope, masks_from_weights
from obdprune.measure import measured_sparsity
from obdprune.regularize import L1Mode, NoRegularizer, Regularizer
from obdprune.selection import Budget, Selector, make_selector
from obdprune.train import TrainConfig, evaluate, train

__all__ = ["Method", "Budget", "PruneConfig", "PrunePoint", "sparsity_path", "prune_model", "measured_sparsity",
           "FineTune", "round_curvature", "sparsity_targets", "beyond_limit"]

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
DEFAULT_L1_LAMBDA = {Granularity.ELEMENT: 2e-3, Granularity.CHANNEL: 3e-4}

_CHOICES = {"method": Method, "scope": Scope, "granularity": Granularity, "budget": Budget, "l1_mode": L1Mode,
            "curvature": CurvatureKind, "negative_curvature": NegativeCurvature}


@dataclass(frozen=True)
class PruneConfig:
    """Everything that defines a pruning run besides the data and the dense weights.

    Options may be given as strings; they are parsed once here into their enums.

    >>> PruneConfig(method="obd", granularity="channel").granularity
    <Granularity.CHANNEL: 'channel'>
    """

    method: Method = Method.HYBRID
    scope: Scope = Scope.GLOBAL
    layer_floor: float = 0.01
    prune_step: float = 0.6
    reg_epochs: int = 2
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.03, schedule="cosine"))
    l1_lambda: float | None = None  # None: DEFAULT_L1_LAMBDA of the granularity
    l1_mode: L1Mode = L1Mode.PROXIMAL
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

    def __post_init__(self) -> None:
        for name, choice in _CHOICES.items():
            object.__setattr__(self, name, choice.parse(getattr(self, name)))
        if self.l1_lambda is None:
            object.__setattr__(self, "l1_lambda", DEFAULT_L1_LAMBDA[self.granularity])
        if self.budget is Budget.MACS:
            if self.granularity is not Granularity.CHANNEL:
                raise UsageError("a MAC budget needs channel granularity (removing single weights saves no time)")
            if self.scope is not Scope.GLOBAL:
                raise UsageError("a MAC budget needs global scope (one ranking of units across layers)")
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
        if not (self.l1_lambda >= 0 and math.isfinite(self.l1_lambda)):
            raise UsageError(f"L1 strength must be a number >= 0, got {self.l1_lambda}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d = {k: (v.value if isinstance(v, Choice) else v) for k, v in d.items()}
        d["finetune"] = self.finetune.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        d = dict(d)
        d["finetune"] = TrainConfig(**d["finetune"])
        return cls(**d)


def _check_fraction(what: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        hint = f"; give {value / 100:g}, not {value:g}" if 1.0 < value <= 100.0 else ""
        raise UsageError(f"{what} must be a fraction in (0, 1), got {value}{hint}")


@dataclass
class PrunePoint:
    """One point of a method's path: the model state at a target (or the max-drop choice).

    ``test_accuracy`` is None when no test data was given.
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
    state_dict: dict | None = None
    masks: MaskSet | None = None

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("state_dict", "masks")}
        for k in ("target_sparsity", "max_drop", "macs_removed"):
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
                  progress: bool, world: World) -> Callable[..., None]:
    """``run(model, epochs, seed, desc, masks, regularizer)``: obdprune's loop, or the user's ``fine_tune``
    with masks and the proximal step enforced after every step of any optimizer it creates. Under torchrun
    the user's ``fine_tune`` gets the model wrapped in DistributedDataParallel."""
    if fine_tune is None:
        def run(model, epochs, seed, desc, masks, reg) -> None:
            train(model, train_data, replace(cfg.finetune, epochs=epochs, seed=seed), masks=masks, regularizer=reg,
                  device=device, progress=progress, desc=desc, world=world)
        return run

    def run_user(model, epochs, seed, desc, masks, reg) -> None:
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
) -> list[PrunePoint]:
    """Run one method's path on a copy of ``model`` (left unchanged) and return its points.

    data: an :class:`obdprune.data.Dataset`, or any object with ``train``, ``val`` and optionally ``test``
      attributes that :func:`obdprune.batches.as_batches` accepts.
    targets: sparsities to report (fractions of Conv/Linear weights, or MACs, removed).
    max_drop: percentage points of validation accuracy the result may lose against
      ``dense_val_accuracy``; the last round that held is returned as the max-drop point.
    fine_tune: the user's ``fine_tune(model, epochs)`` for every training phase instead of obdprune's loop.
    checkpoint: saves the state after every round and, if it holds one, continues after its last round.
    world: the ranks of a torchrun run (default: the initialized process group, else one process). Every
      rank calls ``prune_model`` alike; rank 0's weights are copied to all, data is sharded, curvature and
      accuracies are all-reduced, the masks are checked equal every round, and only rank 0 saves the
      checkpoint (the others wait; on resume they get rank 0's snapshot).
    Points hold CPU state_dicts and masks so callers can save the models.
    """
    targets = sparsity_targets(targets)
    _check_request(targets, max_drop, cfg, fine_tune)
    world = world or current()
    method, device, splits = cfg.method, torch.device(device), _splits(data, world)
    dense_model, model = model, copy.deepcopy(model).to(device)
    sync_module(world, model)
    example = (example_inputs if example_inputs is not None else splits.train.example()).to(device)
    if dense_val_accuracy is None:
        dense_val_accuracy, _ = evaluate(model, splits.val, device=device, world=world)
    selector = make_selector(model, example, granularity=cfg.granularity, budget=cfg.budget, scope=cfg.scope,
                             layer_floor=cfg.layer_floor, channel_multiple=cfg.channel_multiple,
                             min_units=cfg.min_units, keep=cfg.keep)
    plan = _plan(selector, model, cfg, targets, max_drop)
    reg = selector.regularizer(cfg.l1_lambda, cfg.l1_mode) if method.regularized else NoRegularizer()
    run_phase = _phase_runner(cfg, splits.train, fine_tune, device, progress and world.writer, world)
    gen = torch.Generator().manual_seed(cfg.seed)
    state = _Progress(MaskSet.dense(model), [])
    snapshots = _Snapshots(checkpoint, world, model, gen, time.perf_counter())

    if not snapshots.resume(state, device) and cfg.reg_epochs:
        run_phase(model, cfg.reg_epochs, cfg.seed * 1000, f"{method.value} regularize", state.masks, reg)
        snapshots.save(state)

    for rnd, target in [] if state.stop else list(enumerate(plan.path, start=1))[state.round:]:
        _prune_step(model, cfg, selector, splits.train, state, target, gen, device, world, f"{method.value} round {rnd}")
        run_phase(model, cfg.finetune.epochs, cfg.seed * 1000 + rnd, f"{method.value} {target:.3f}", state.masks, reg)
        point = _measure_point(model, splits, method, state, selector, rnd, snapshots.start, device, world)
        if on_round is not None:
            on_round(_round_record(point, target, selector.macs(model, state.masks, example)))
        if round(target, 12) in plan.targets:
            state.results.append(_with_test(point, model, splits, device, world, target_sparsity=target))
        if max_drop is not None and not state.failed:
            if point.val_accuracy >= dense_val_accuracy - max_drop / 100.0 - 1e-12:
                state.held = _with_test(point, model, splits, device, world, max_drop=max_drop)
            else:
                state.failed = True
        state.round, state.stop = rnd, state.failed and target >= plan.last_target
        snapshots.save(state)
        if state.stop:
            break
    return state.results + ([_choose_held(state, dense_model, splits, method, max_drop, device, snapshots.start,
                                          world)] if max_drop is not None else [])


def _check_request(targets: list[float], max_drop: float | None, cfg: PruneConfig, fine_tune: FineTune | None) -> None:
    if not targets and max_drop is None:
        raise UsageError("give sparsity targets, a max drop, or both")
    if max_drop is not None and not (0.0 <= max_drop <= 100.0):
        raise UsageError(f"the max drop is in percentage points and must be in [0, 100], got {max_drop}")
    if fine_tune is not None and cfg.method.regularized and cfg.l1_mode is L1Mode.PENALTY:
        raise UsageError("the L1 penalty form adds to obdprune's own loss; with fine_tune use l1_mode='proximal'")


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
                                            state.stop, state.curvature_seconds, time.perf_counter() - self.start))
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
        state.curvature_seconds = resumed.curvature_seconds
        self.generator.set_state(resumed.generator_state)
        self.start -= resumed.seconds
        return True


def _prune_step(model: nn.Module, cfg: PruneConfig, selector: Selector, train_data: Batches, state: _Progress,
                target: float, gen: torch.Generator, device: torch.device, world: World, what: str) -> None:
    """Score (OBD on a fresh curvature sample, or magnitude), select masks reaching ``target``, apply them."""
    curv = None
    if cfg.method.second_order:
        x, y = train_data.sample(min(cfg.curvature_samples, len(train_data)), gen)
        curv, seconds = round_curvature(model, cfg, x, y, device, gen, world)
        state.curvature_seconds += seconds
    scores = selector.scores(model, curv, cfg.negative_curvature)
    state.masks = selector.select(scores, target, state.masks, model)
    check_same_masks(world, state.masks, what)
    state.masks.apply(model)


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
                      macs_removed=selector.macs_removed(state.masks), masks=state.masks)


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
                  RuntimeWarning, stacklevel=3)
    model = copy.deepcopy(dense).to(device)
    sync_module(world, model)
    sparsity, nonzero, total = measured_sparsity(model)
    point = PrunePoint(method=method.value, sparsity=sparsity, nonzero_weights=nonzero, weights=total,
                       val_accuracy=evaluate(model, splits.val, device=device, world=world)[0], test_accuracy=None,
                       seconds=time.perf_counter() - start, curvature_seconds=state.curvature_seconds, round=0,
                       masks=masks_from_weights(model))
    return _with_test(point, model, splits, device, world, max_drop=max_drop)
