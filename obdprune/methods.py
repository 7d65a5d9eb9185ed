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
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from obdprune.checkpoint import RoundState, RoundStore
from obdprune.curvature import NegativeCurvature, estimate_curvature
from obdprune.choices import Choice
from obdprune.errors import ObdpruneError, UsageError
from obdprune.groups import (Granularity, UnitLayer, group_parameters, max_unit_sparsity, select_unit_masks,
                             total_prunable_weights, unit_groups)
from obdprune.masking import MaskSet, Scope, masks_from_weights, prunable_weights, select_masks
from obdprune.regularize import L1Mode, NoRegularizer, Regularizer, make_regularizer
from obdprune.saliency import group_magnitude_saliency, group_saliency, magnitude_saliency, obd_saliency
from obdprune.train import TrainConfig, evaluate, train
from obdprune.unit_macs import MacModel, mac_model, select_units_by_macs

__all__ = ["Method", "Budget", "PruneConfig", "PruneResult", "sparsity_path", "prune_model", "measured_sparsity"]


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


CURVATURE_KINDS = ("exact", "mc", "empirical-fisher", "hutchinson")


# Chosen on the validation split (BENCHMARKS.md): L1 on lenet5; group lasso on lenet5 and lenet5-caffe,
# where 2e-3 zeroed so many units during the first regularized epoch that no round held 0.5 points.
DEFAULT_L1_LAMBDA = {Granularity.ELEMENT: 2e-3, Granularity.CHANNEL: 3e-4}


class Budget(Choice):
    """What sparsity targets count: the share of Conv/Linear weights or of their MACs removed."""

    WEIGHTS = "weights"
    MACS = "macs"


@dataclass(frozen=True)
class PruneConfig:
    """Everything that defines a pruning run besides the data and the dense weights."""

    method: str = "hybrid"
    scope: str = "global"
    layer_floor: float = 0.01
    prune_step: float = 0.6
    reg_epochs: int = 2
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.03, schedule="cosine"))
    l1_lambda: float | None = None  # None: DEFAULT_L1_LAMBDA of the granularity
    l1_mode: str = "proximal"
    curvature: str = "exact"
    curvature_samples: int = 1024
    curvature_draws: int | None = None
    negative_curvature: str = "clamp"
    max_sparsity: float = 0.99
    seed: int = 0
    granularity: str = "element"
    budget: str = "weights"
    channel_multiple: int = 1

    def __post_init__(self) -> None:
        Method.parse(self.method)
        Scope.parse(self.scope)
        granularity = Granularity.parse(self.granularity)
        if self.l1_lambda is None:
            object.__setattr__(self, "l1_lambda", DEFAULT_L1_LAMBDA[granularity])
        if Budget.parse(self.budget) is Budget.MACS:
            if granularity is not Granularity.CHANNEL:
                raise UsageError("--budget macs needs --granularity channel (removing single weights saves no time)")
            if Scope.parse(self.scope) is not Scope.GLOBAL:
                raise UsageError("--budget macs needs --scope global (one ranking of units across layers)")
        if self.channel_multiple < 1:
            raise UsageError(f"channel multiple must be >= 1, got {self.channel_multiple}")
        if self.channel_multiple > 1 and Budget.parse(self.budget) is not Budget.MACS:
            raise UsageError("--channel-multiple needs --budget macs")
        L1Mode.parse(self.l1_mode)
        NegativeCurvature.parse(self.negative_curvature)
        if self.curvature not in CURVATURE_KINDS:
            raise UsageError(f"unknown curvature {self.curvature!r}; choose one of: {', '.join(CURVATURE_KINDS)}")
        if not 0.0 < self.prune_step < 1.0:
            raise UsageError(f"prune step must be in (0, 1), got {self.prune_step}")
        if not 0.0 < self.max_sparsity < 1.0:
            raise UsageError(f"max sparsity must be in (0, 1), got {self.max_sparsity}")
        if self.reg_epochs < 0:
            raise UsageError(f"regularization epochs must be >= 0, got {self.reg_epochs}")
        if self.curvature_samples < 1:
            raise UsageError(f"curvature samples must be >= 1, got {self.curvature_samples}")
        if self.curvature_draws is not None and self.curvature_draws < 1:
            raise UsageError(f"curvature draws must be >= 1, got {self.curvature_draws}")
        if not (self.l1_lambda >= 0 and math.isfinite(self.l1_lambda)):
            raise UsageError(f"L1 strength must be a number >= 0, got {self.l1_lambda}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["finetune"] = self.finetune.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        d = dict(d)
        d["finetune"] = TrainConfig(**d["finetune"])
        return cls(**d)


@dataclass
class PruneResult:
    """One point of a method's path: the model state at a target (or the max-drop choice)."""

    method: str
    sparsity: float
    nonzero_weights: int
    weights: int
    val_accuracy: float
    test_accuracy: float
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
        if d["target_sparsity"] is None:
            d.pop("target_sparsity")
        for k in ("max_drop", "macs_removed"):
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
        if not 0.0 < s < 1.0:
            raise UsageError(f"sparsity targets must be in (0, 1), got {s}")
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


def measured_sparsity(model: nn.Module) -> tuple[float, int, int]:
    """(fraction of Conv/Linear weights that are exactly zero, nonzero count, total count)."""
    ws = prunable_weights(model).values()
    total = sum(w.numel() for w in ws)
    nonzero = sum(int((w != 0).sum()) for w in ws)
    return 1.0 - nonzero / total, nonzero, total


def max_feasible_sparsity(model: nn.Module, layer_floor: float, scope: str = "global") -> float:
    """Largest sparsity :func:`select_masks` can reach while every layer keeps its floor."""
    sizes = [w.numel() for w in prunable_weights(model).values()]
    floors = [min(n, max(1, math.ceil(layer_floor * n))) for n in sizes]
    if Scope.parse(scope) is Scope.LAYER:
        return min(math.floor((1.0 - f / n) * 1e6) / 1e6 for f, n in zip(floors, sizes))
    return math.floor((1.0 - sum(floors) / sum(sizes)) * 1e6) / 1e6


def _regularizer(method: Method, cfg: PruneConfig, groups: list[UnitLayer] | None = None) -> Regularizer:
    """L1 on every weight, or group lasso on the unit ``groups`` (channel granularity), for l1/hybrid."""
    if not method.regularized:
        return NoRegularizer()
    return make_regularizer("l1" if groups is None else "group-lasso", cfg.l1_lambda, cfg.l1_mode, groups)


def _select(scores: dict, target: float, cfg: PruneConfig, current: MaskSet, model: nn.Module,
            groups: list[UnitLayer] | None, macs: MacModel | None) -> MaskSet:
    """Element masks from per-weight scores, or unit masks from per-unit scores (``groups`` given),
    by weights or, for the MAC budget, by score per MAC saved."""
    if groups is None:
        return select_masks(scores, target, scope=cfg.scope, current=current, layer_floor=cfg.layer_floor)
    if Budget.parse(cfg.budget) is Budget.MACS:
        return select_units_by_macs(scores, macs, target, current=current, layer_floor=cfg.layer_floor,
                                    multiple=cfg.channel_multiple)
    return select_unit_masks(scores, groups, target, total_weights=total_prunable_weights(model), scope=cfg.scope,
                             current=current, layer_floor=cfg.layer_floor)


def _saliency(method: Method, model: nn.Module, cfg: PruneConfig, x_curv: torch.Tensor, y_curv: torch.Tensor,
              device: torch.device, generator: torch.Generator,
              groups: list[UnitLayer] | None = None) -> tuple[dict, float]:
    """Scores per weight ({weight name: like the weight}), or per unit ({layer: (units,)}) when ``groups``
    are given (summed over each unit's weights, bias and BatchNorm parameters), and curvature seconds."""
    weights = prunable_weights(model) if groups is None else group_parameters(model, groups)
    if not method.second_order:
        return (magnitude_saliency(weights) if groups is None else group_magnitude_saliency(weights, groups)), 0.0
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    curv = estimate_curvature(cfg.curvature, model, x_curv.to(device), y_curv.to(device),
                              samples=cfg.curvature_draws, generator=generator)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    for name in weights:
        if not torch.isfinite(curv[name]).all():
            raise ObdpruneError(f"curvature of {name!r} contains NaN or inf; the model may have diverged")
    scores = obd_saliency(weights, {n: curv[n] for n in weights}, cfg.negative_curvature)
    return (scores if groups is None else group_saliency(scores, groups)), seconds


def prune_model(
    model: nn.Module,
    data,
    cfg: PruneConfig,
    *,
    targets: list[float] = (),
    max_drop: float | None = None,
    dense_val_accuracy: float | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_round: Callable[[dict], None] | None = None,
    checkpoint: RoundStore | None = None,
) -> list[PruneResult]:
    """Run one method's path on a copy of ``model`` (left unchanged) and return its results.

    data: an :class:`obdprune.data.Dataset` (train / val / test splits).
    targets: sparsities to report (fractions of Conv/Linear weights removed).
    max_drop: percentage points of validation accuracy the result may lose against
      ``dense_val_accuracy``; the last round that held is returned as the max-drop result.
    Results hold CPU state_dicts and masks so callers can save the models.
    checkpoint: saves the state after every round and, if it holds one, continues after its last round.
    """
    method = Method.parse(cfg.method)
    if not targets and max_drop is None:
        raise UsageError("give sparsity targets, --max-drop, or both")
    if max_drop is not None and not (0.0 <= max_drop <= 100.0):
        raise UsageError(f"--max-drop is in percentage points and must be in [0, 100], got {max_drop}")
    device = torch.device(device)
    dense_model = model
    model = copy.deepcopy(model).to(device)
    if dense_val_accuracy is None:
        dense_val_accuracy, _ = evaluate(model, data.val.x, data.val.y, device=device)
    groups = macs = None
    if Granularity.parse(cfg.granularity) is Granularity.CHANNEL:
        groups = unit_groups(model, data.train.x[:1].to(device))
        if not groups:
            raise UsageError("--granularity channel: no Conv/Linear layer of this model has units that can be removed")
        macs = mac_model(model, data.train.x[:1].to(device), groups)
    counted = "MACs" if Budget.parse(cfg.budget) is Budget.MACS else "weights"
    if counted == "MACs":
        limit = macs.max_fraction_removed(cfg.layer_floor, cfg.channel_multiple)
    elif groups is not None:
        limit = max_unit_sparsity(groups, total_prunable_weights(model), cfg.layer_floor, cfg.scope)
    else:
        limit = max_feasible_sparsity(model, cfg.layer_floor, cfg.scope)
    too_far = [t for t in targets if t > limit]
    if too_far:
        raise UsageError(f"target sparsity {max(too_far)} would empty a layer: with --layer-floor {cfg.layer_floor} "
                         f"and scope {cfg.scope} at most {limit:.4f} of the {counted} can go")
    path = sparsity_path(list(targets), cfg.prune_step,
                         max_sparsity=min(cfg.max_sparsity, limit) if max_drop is not None else None)
    target_set = {round(t, 12) for t in targets}
    last_target = max(targets) if targets else 0.0
    reg = _regularizer(method, cfg, groups)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_curv = min(cfg.curvature_samples, data.train.x.shape[0])
    masks = MaskSet.dense(model)
    start = time.perf_counter()
    curvature_seconds = 0.0
    results: list[PruneResult] = []
    held: PruneResult | None = None
    failed = stop = False

    def save_round(rnd: int) -> None:
        if checkpoint is not None:
            checkpoint.save(RoundState(rnd, model.state_dict(), masks, gen.get_state(), results, held, failed, stop,
                                       curvature_seconds, time.perf_counter() - start))

    done = 0
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        model.load_state_dict(resumed.model_state)
        masks, results, held = resumed.masks.to(device), resumed.results, resumed.held
        failed, stop, done = resumed.failed, resumed.stop, resumed.round
        gen.set_state(resumed.generator_state)
        curvature_seconds, start = resumed.curvature_seconds, start - resumed.seconds
    elif cfg.reg_epochs:
        train(model, data.train.x, data.train.y,
              replace(cfg.finetune, epochs=cfg.reg_epochs, seed=cfg.seed * 1000),
              masks=masks, regularizer=reg, device=device, progress=progress, desc=f"{method.value} regularize")
        save_round(0)

    for rnd, target in [] if stop else list(enumerate(path, start=1))[done:]:
        idx = torch.randperm(data.train.x.shape[0], generator=gen)[:n_curv]
        scores, secs = _saliency(method, model, cfg, data.train.x[idx], data.train.y[idx], device, gen, groups)
        curvature_seconds += secs
        masks = _select(scores, target, cfg, masks, model, groups, macs)
        masks.apply(model)
        train(model, data.train.x, data.train.y, replace(cfg.finetune, seed=cfg.seed * 1000 + rnd),
              masks=masks, regularizer=reg, device=device, progress=progress,
              desc=f"{method.value} {target:.3f}")
        sparsity, nonzero, total = measured_sparsity(model)
        val_acc, _ = evaluate(model, data.val.x, data.val.y, device=device)
        macs_removed = macs.fraction_removed(masks) if macs is not None else None
        record = {"method": method.value, "round": rnd, "target": target, "sparsity": sparsity,
                  "val_accuracy": val_acc, "seconds": time.perf_counter() - start,
                  "curvature_seconds": curvature_seconds}
        if macs_removed is not None:
            record["macs_removed"] = macs_removed
        if on_round is not None:
            on_round(record)

        def snapshot(**kw) -> PruneResult:
            test_acc, _ = evaluate(model, data.test.x, data.test.y, device=device)
            return PruneResult(
                method=method.value, sparsity=sparsity, nonzero_weights=nonzero, weights=total,
                val_accuracy=val_acc, test_accuracy=test_acc, seconds=time.perf_counter() - start,
                curvature_seconds=curvature_seconds, round=rnd, macs_removed=macs_removed,
                state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                masks=masks.to("cpu"), **kw)

        if round(target, 12) in target_set:
            results.append(snapshot(target_sparsity=target))
        if max_drop is not None and not failed:
            if val_acc >= dense_val_accuracy - max_drop / 100.0 - 1e-12:
                held = snapshot(max_drop=max_drop)
            else:
                failed = True
        stop = failed and target >= last_target
        save_round(rnd)
        if stop:
            break
    if max_drop is not None:
        if held is None:
            held = _unpruned_result(dense_model, data, method, max_drop, device, time.perf_counter() - start,
                                    curvature_seconds)
            warnings.warn(f"{method.value}: no pruning round kept validation accuracy within {max_drop} points of "
                          f"the dense model; the max-drop result is the dense model itself (sparsity 0)",
                          RuntimeWarning, stacklevel=2)
        results.append(held)
    return results


def _unpruned_result(dense: nn.Module, data, method: Method, max_drop: float, device: torch.device,
                     seconds: float, curvature_seconds: float) -> PruneResult:
    """Round 0 of a path: the dense weights, the step that always holds a max-drop budget."""
    model = copy.deepcopy(dense).to(device)
    val_acc, _ = evaluate(model, data.val.x, data.val.y, device=device)
    test_acc, _ = evaluate(model, data.test.x, data.test.y, device=device)
    sparsity, nonzero, total = measured_sparsity(model)
    return PruneResult(method=method.value, sparsity=sparsity, nonzero_weights=nonzero, weights=total,
                       val_accuracy=val_acc, test_accuracy=test_acc, seconds=seconds,
                       curvature_seconds=curvature_seconds, round=0, max_drop=max_drop,
                       state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                       masks=masks_from_weights(model))
