"""One selector per granularity, built once per model: what is scored, how scores become masks, how far
a target can go and what the regularizer acts on.

- :class:`ElementSelector`: single Conv/Linear weights, targets count weights;
- :class:`UnitSelector`: whole output units (a filter or neuron with its bias and BatchNorm entries,
  and every layer coupled to it), targets count weights, units ranked by score per weight;
- :class:`MacSelector`: whole units, targets count MACs; global scope ranks units by score per MAC
  saved, layer scope removes the same share of units from every coupled group (lowest scores first).

The prune loop only asks a selector for ``scores``, ``select``, ``limit`` and ``macs_removed``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from obdprune.choices import Choice
from obdprune.curvature import NegativeCurvature
from obdprune.errors import UsageError
from obdprune.groups import (DEFAULT_MIN_UNITS, Granularity, UnitAnalysis, UnitLayer, group_parameters,
                             max_unit_sparsity, select_unit_masks, total_prunable_weights, unit_analysis)
from obdprune.masking import MaskSet, Scope, prunable_weights, select_masks
from obdprune.measure import count_macs
from obdprune.regularize import L1Mode, Regularizer, make_regularizer
from obdprune.saliency import group_magnitude_saliency, group_saliency, magnitude_saliency, obd_saliency
from obdprune.unit_macs import MacModel, mac_model, select_units_by_macs, select_units_uniformly

__all__ = ["Budget", "Selector", "ElementSelector", "UnitSelector", "MacSelector", "make_selector",
           "max_feasible_sparsity"]


class Budget(Choice):
    """What sparsity targets count: the share of Conv/Linear weights or of their MACs removed."""

    WEIGHTS = "weights"
    MACS = "macs"


def max_feasible_sparsity(model: nn.Module, layer_floor: float, scope: Scope | str = Scope.GLOBAL) -> float:
    """Largest sparsity :func:`~obdprune.masking.select_masks` can reach while every layer keeps its floor."""
    sizes = [w.numel() for w in prunable_weights(model).values()]
    floors = [min(n, max(1, math.ceil(layer_floor * n))) for n in sizes]
    if Scope.parse(scope) is Scope.LAYER:
        return min(math.floor((1.0 - f / n) * 1e6) / 1e6 for f, n in zip(floors, sizes))
    return math.floor((1.0 - sum(floors) / sum(sizes)) * 1e6) / 1e6


@dataclass
class Selector:
    """Base: scores → masks for one granularity. ``counted`` names what targets count."""

    scope: Scope
    layer_floor: float
    counted = "weights"

    def scored_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def limit(self, model: nn.Module) -> float:
        """Largest target reachable while every layer keeps its floor."""
        raise NotImplementedError

    def _reduce(self, element_scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return element_scores

    def magnitude_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def scores(self, model: nn.Module, curvature: Mapping[str, torch.Tensor] | None = None,
               negative: NegativeCurvature = NegativeCurvature.CLAMP) -> dict[str, torch.Tensor]:
        """Magnitude scores without ``curvature``; OBD scores ½·h·w² (summed per unit) with it."""
        if curvature is None:
            return self.magnitude_scores(model)
        params = self.scored_parameters(model)
        return self._reduce(obd_saliency(params, {n: curvature[n] for n in params}, negative))

    def select(self, scores: dict[str, torch.Tensor], target: float, current: MaskSet, model: nn.Module) -> MaskSet:
        raise NotImplementedError

    def macs_removed(self, masks: MaskSet) -> float | None:
        return None

    def macs(self, model: nn.Module, masks: MaskSet, example_inputs: torch.Tensor) -> int:
        """MACs per sample of the pruned model: of its nonzero weights here; of the compacted model for units."""
        return count_macs(model, example_inputs[:1], effective=True)

    def explain(self) -> list[str]:
        """One line per layer that cannot lose what this selector removes, with the reason."""
        return []

    def regularizer(self, lam: float, mode: L1Mode) -> Regularizer:
        """L1 on every weight, or group lasso on the units."""
        return make_regularizer("l1", lam, mode)


@dataclass
class ElementSelector(Selector):
    def scored_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return prunable_weights(model)

    def limit(self, model: nn.Module) -> float:
        return max_feasible_sparsity(model, self.layer_floor, self.scope)

    def magnitude_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return magnitude_saliency(prunable_weights(model))

    def select(self, scores, target, current, model) -> MaskSet:
        return select_masks(scores, target, scope=self.scope, current=current, layer_floor=self.layer_floor)


@dataclass
class UnitSelector(Selector):
    groups: list[UnitLayer] = None  # type: ignore[assignment]
    mac_model: MacModel = None  # type: ignore[assignment]
    analysis: UnitAnalysis | None = None
    min_units: int = DEFAULT_MIN_UNITS

    def explain(self) -> list[str]:
        return self.analysis.explain(self.min_units, self.layer_floor) if self.analysis is not None else []

    def scored_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return group_parameters(model, self.groups)

    def limit(self, model: nn.Module) -> float:
        return max_unit_sparsity(self.groups, total_prunable_weights(model), self.layer_floor, self.scope,
                                 self.min_units)

    def _reduce(self, element_scores):
        return group_saliency(element_scores, self.groups)

    def magnitude_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return group_magnitude_saliency(group_parameters(model, self.groups), self.groups)

    def select(self, scores, target, current, model) -> MaskSet:
        return select_unit_masks(scores, self.groups, target, total_weights=total_prunable_weights(model),
                                 scope=self.scope, current=current, layer_floor=self.layer_floor,
                                 min_units=self.min_units)

    def regularizer(self, lam: float, mode: L1Mode) -> Regularizer:
        return make_regularizer("group-lasso", lam, mode, self.groups)

    def macs_removed(self, masks: MaskSet) -> float:
        return self.mac_model.fraction_removed(masks)

    def macs(self, model: nn.Module, masks: MaskSet, example_inputs: torch.Tensor) -> int:
        return round(self.mac_model.macs(self.mac_model.kept_units(masks)))


@dataclass
class MacSelector(UnitSelector):
    multiple: int = 1
    counted = "MACs"

    def limit(self, model: nn.Module) -> float:
        return self.mac_model.max_fraction_removed(self.layer_floor, self.multiple, self.min_units)

    def select(self, scores, target, current, model) -> MaskSet:
        rule = select_units_uniformly if self.scope is Scope.LAYER else select_units_by_macs
        return rule(scores, self.mac_model, target, current=current, layer_floor=self.layer_floor,
                    multiple=self.multiple, min_units=self.min_units)


def make_selector(model: nn.Module, example_inputs: torch.Tensor, *, granularity: Granularity, budget: Budget,
                  scope: Scope, layer_floor: float, channel_multiple: int = 1, min_units: int = DEFAULT_MIN_UNITS,
                  keep: Sequence[str] = ()) -> Selector:
    """The selector for ``granularity`` and ``budget`` on ``model``; ``example_inputs`` (1, ...) is traced to
    find the (coupled) units of channel granularity. ``min_units`` and ``keep`` (module names whose layers
    never lose units) apply to channel granularity."""
    if granularity is Granularity.ELEMENT:
        return ElementSelector(scope, layer_floor)
    analysis = unit_analysis(model, example_inputs, keep=tuple(keep))
    groups = list(analysis.groups)
    if not groups:
        raise UsageError("channel granularity: no Conv/Linear layer of this model has units that can be removed:\n  "
                         + "\n  ".join(analysis.explain(min_units, layer_floor)))
    macs = mac_model(model, example_inputs, groups)
    if budget is Budget.MACS:
        return MacSelector(scope, layer_floor, groups, macs, analysis, min_units, channel_multiple)
    return UnitSelector(scope, layer_floor, groups, macs, analysis, min_units)
