"""MACs as a function of the units each layer keeps, and unit selection by saliency per MAC.

Removing a unit (filter or neuron) of a layer saves twice: its own multiply-accumulates and the
ones its readers spend on its output. For a Conv2d/Linear layer ``R`` with dense MACs ``M_R``,

    MACs_R = M_R * (kept outputs of R / outputs of R) * (kept input features of R / input features of R)

where a coupled unit (see :class:`obdprune.groups.UnitLayer`) is one output of every layer of its
group (both sides of a residual sum, a depthwise conv), and a unit of a producing layer ``P`` feeds ``span(P, R)`` input features of ``R`` (1 for a
convolution reading a channel, H*W for a Linear after Flatten). This is exact for the Conv/Linear
MACs of the compacted model that :func:`obdprune.measure.count_macs` counts, as long as compaction
removes exactly the selected units.

:func:`select_units_by_macs` removes units greedily by score per MAC saved, re-evaluating the saving
after every removal (it depends on what the neighbours keep), until the model's MACs reach the
target: the structured counterpart of "least saliency for the weights removed" when what matters is
inference time rather than parameter count.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from obdprune.errors import UsageError
from obdprune.groups import DEFAULT_MIN_UNITS, UnitLayer, checked_unit_scores, removed_units, unit_floor, unit_keep_masks
from obdprune.layers import prunable_layers
from obdprune.masking import DEFAULT_LAYER_FLOOR, MaskSet
from obdprune.measure import macs_per_layer

__all__ = ["LayerMacs", "MacModel", "mac_model", "min_kept", "select_units_by_macs", "select_units_uniformly"]


def min_kept(units: int, layer_floor: float, multiple: int = 1, min_units: int = DEFAULT_MIN_UNITS) -> int:
    """Fewest units a layer of ``units`` may keep: its floor (:func:`~obdprune.groups.unit_floor`),
    rounded up to a multiple of ``multiple``; a layer of at most ``multiple`` units keeps them all."""
    floor = unit_floor(units, layer_floor, min_units)
    if multiple <= 1:
        return floor
    if units <= multiple:
        return units
    return min(units, math.ceil(floor / multiple) * multiple)


@dataclass(frozen=True)
class LayerMacs:
    """One Conv2d/Linear layer: dense MACs per sample (all its calls) and its output/input widths."""

    layer: str
    macs: int
    out_units: int
    in_features: int


@dataclass(frozen=True)
class MacModel:
    """Conv/Linear MACs per sample of a model as a function of ``kept[i]``, the units ``groups[i]`` keeps."""

    layers: tuple[LayerMacs, ...]
    groups: tuple[UnitLayer, ...]

    def __post_init__(self) -> None:
        by_name = {lm.layer: lm for lm in self.layers}
        for g in self.groups:
            for layer in g.layers:
                if layer not in by_name:
                    raise ValueError(f"unit layer {layer!r} has no MAC count")
            for reader, _ in g.readers:
                if reader not in by_name:
                    raise ValueError(f"reader {reader!r} of {g.layer!r} has no MAC count")

    @property
    def dense(self) -> int:
        return sum(lm.macs for lm in self.layers)

    def macs(self, kept: Sequence[int]) -> float:
        """MACs per sample when ``groups[i]`` keeps ``kept[i]`` units."""
        if len(kept) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} unit counts, got {len(kept)}")
        out_frac = {layer: k / g.units for g, k in zip(self.groups, kept) for layer in g.layers}
        in_removed: dict[str, int] = {}
        for g, k in zip(self.groups, kept):
            for reader, span in g.readers:
                in_removed[reader] = in_removed.get(reader, 0) + (g.units - k) * span
        return sum(lm.macs * out_frac.get(lm.layer, 1.0) * (1.0 - in_removed.get(lm.layer, 0) / lm.in_features)
                   for lm in self.layers)

    def kept_units(self, masks: MaskSet | None) -> list[int]:
        """Units each group keeps under ``masks`` (a unit whose incoming weights are all pruned is gone)."""
        return [g.units - int(removed_units(g, masks).sum()) for g in self.groups]

    def fraction_removed(self, masks: MaskSet | None) -> float:
        """Share of the dense Conv/Linear MACs that removing the units ``masks`` empties saves."""
        return 1.0 - self.macs(self.kept_units(masks)) / self.dense

    def max_fraction_removed(self, layer_floor: float, multiple: int = 1, min_units: int = DEFAULT_MIN_UNITS) -> float:
        """Largest MAC reduction reachable while every group keeps :func:`min_kept` units (floored to 1e-6)."""
        floors = [min_kept(g.units, layer_floor, multiple, min_units) for g in self.groups]
        return math.floor((1.0 - self.macs(floors) / self.dense) * 1e6) / 1e6


@torch.inference_mode(False)
def mac_model(model: nn.Module, example_inputs: torch.Tensor, groups: Sequence[UnitLayer]) -> MacModel:
    """The :class:`MacModel` of ``model`` for its unit ``groups`` (from :func:`obdprune.groups.unit_groups`).

    example_inputs: (N, C, H, W) batch the model accepts; one sample is run through it in eval mode
    (the model's mode is restored).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs = macs_per_layer(model, example_inputs[:1])
    out = tuple(LayerMacs(n, macs[n], m.weight.shape[0], m.in_channels if isinstance(m, nn.Conv2d) else m.in_features)
                for n, m in prunable_layers(model) if n in macs)
    return MacModel(out, tuple(groups))


class _Kept:
    """The units each group of ``model`` keeps and the per-layer factors of :meth:`MacModel.macs`, so that
    the MACs one removal saves cost time linear in the layers it touches (its group and their readers)
    rather than in the whole model: greedy selection asks this of every group at every step."""

    def __init__(self, model: MacModel, kept: Sequence[int]) -> None:
        index = {lm.layer: j for j, lm in enumerate(model.layers)}
        self.units = [g.units for g in model.groups]
        self.kept = list(kept)
        self.dense = [lm.macs for lm in model.layers]
        self.in_features = [lm.in_features for lm in model.layers]
        self.own = [[index[n] for n in g.layers] for g in model.groups]
        self.readers = [[(index[r], span) for r, span in g.readers] for g in model.groups]
        self.out_frac = [1.0] * len(model.layers)
        self.in_removed = [0] * len(model.layers)
        for i, k in enumerate(self.kept):
            for j in self.own[i]:
                self.out_frac[j] = k / self.units[i]
            for j, span in self.readers[i]:
                self.in_removed[j] += (self.units[i] - k) * span

    def _macs(self, j: int, out_frac: float, in_removed: int) -> float:
        return self.dense[j] * out_frac * (1.0 - in_removed / self.in_features[j])

    def saved(self, i: int, block: int) -> float:
        """MACs saved by removing ``block`` more units of group ``i``."""
        k = self.kept[i] - block
        after = {j: (k / self.units[i], self.in_removed[j]) for j in self.own[i]}
        for j, span in self.readers[i]:
            o, r = after.get(j, (self.out_frac[j], self.in_removed[j]))
            after[j] = (o, r + block * span)
        return sum(self._macs(j, self.out_frac[j], self.in_removed[j]) - self._macs(j, o, r)
                   for j, (o, r) in after.items())

    def remove(self, i: int, block: int) -> None:
        k = self.kept[i] - block
        for j in self.own[i]:
            self.out_frac[j] = k / self.units[i]
        for j, span in self.readers[i]:
            self.in_removed[j] += block * span
        self.kept[i] = k


def _check_request(fraction: float, layer_floor: float, multiple: int) -> None:
    if not 0.0 <= fraction < 1.0:
        raise UsageError(f"MAC fraction must be in [0, 1), got {fraction}")
    if not 0.0 <= layer_floor <= 1.0:
        raise UsageError(f"layer floor must be in [0, 1], got {layer_floor}")
    if multiple < 1:
        raise UsageError(f"channel multiple must be >= 1, got {multiple}")


def _beyond_floor(mac_model: MacModel, fraction: float, layer_floor: float, multiple: int, min_units: int) -> UsageError:
    return UsageError(
        f"removing {fraction} of the MACs needs more units than the layers can lose while each keeps its "
        f"floor (at most {mac_model.max_fraction_removed(layer_floor, multiple, min_units):.4f}); lower the "
        f"target, the layer floor or the min units")


def select_units_by_macs(
    unit_scores: Mapping[str, torch.Tensor],
    mac_model: MacModel,
    fraction: float,
    *,
    current: MaskSet | None = None,
    layer_floor: float = DEFAULT_LAYER_FLOOR,
    multiple: int = 1,
    min_units: int = DEFAULT_MIN_UNITS,
) -> MaskSet:
    """Keep-masks removing the units of least score per MAC saved until ``fraction`` of the dense
    Conv/Linear MACs is gone.

    unit_scores: {layer name: (units,)} additive costs of removing each unit (higher = keep).
    fraction: share of ``mac_model.dense`` to remove, in [0, 1). Each step removes, over all layers,
      the next unit (lowest score first within a layer) with the least score / MACs it saves now;
      the stop is the step whose MACs are nearest the target (ties: fewer removed).
    current: masks in force; units they empty stay removed and their other entries carry over.
    layer_floor, min_units: every layer keeps :func:`~obdprune.groups.unit_floor` units; a target that
      cannot be met under that floor raises UsageError.
    multiple: every layer keeps a multiple of this many units (or all of them; see :func:`min_kept`):
      a step removes the block of lowest-score units that brings a layer to its next lower multiple,
      scored by the block's summed score per MAC it saves. Convolution kernels of some runtimes are
      much faster for channel counts that are multiples of their vector width (onnxruntime's NCHWc
      kernels: 8 with AVX2, 16 with AVX-512).
    Returns masks for every member of every group plus the other masks of ``current``.
    """
    _check_request(fraction, layer_floor, multiple)
    groups = mac_model.groups
    scores = [checked_unit_scores(unit_scores, g) for g in groups]
    before = [removed_units(g, current) for g in groups]
    orders, lowest = [], []
    for g, s, b in zip(groups, scores, before):
        free = torch.nonzero(~b).flatten()
        orders.append(free[torch.sort(s[free], stable=True).indices].tolist())  # ascending; ties by index
        lowest.append(min_kept(g.units, layer_floor, multiple, min_units))
    kept = [g.units - int(b.sum()) for g, b in zip(groups, before)]
    dense = mac_model.dense
    target = (1.0 - fraction) * dense + 1e-9 * dense  # MACs are sums of float fractions: no rounding misses
    now = mac_model.macs(kept)
    state = _Kept(mac_model, kept)
    taken = [0] * len(groups)
    while now > target:
        best: tuple[float, int, float, int] | None = None
        for i, g in enumerate(groups):
            block = kept[i] - (kept[i] - 1) // multiple * multiple  # down to the next lower multiple
            if kept[i] - block < lowest[i]:
                continue
            saved = state.saved(i, block)
            after = now - saved
            if saved <= 0:
                continue
            ratio = float(scores[i][orders[i][taken[i]:taken[i] + block]].sum()) / saved
            if best is None or ratio < best[0]:
                best = (ratio, i, after, block)
        if best is None:
            raise _beyond_floor(mac_model, fraction, layer_floor, multiple, min_units)
        _, i, after, block = best
        prev, now = now, after
        kept[i] -= block
        state.remove(i, block)
        taken[i] += block
        if now <= target and target - now >= prev - target:  # the step before was as near: undo this one
            taken[i] -= block
            break
    keep = []
    for g, b, order, t in zip(groups, before, orders, taken):
        kk = ~b
        kk[order[:t]] = False
        keep.append(kk)
    return unit_keep_masks(groups, keep, current)


def _uniform_kept(units: int, free: int, lowest: int, share: float, multiple: int) -> int:
    """Units a group of ``units`` (``free`` of them not yet removed) keeps at ``share``: ``share·units``
    to the nearest multiple of ``multiple`` (halves up), within [its floor, what it still has]."""
    want = math.floor(share * units / multiple + 0.5 + 1e-9) * multiple
    return min(free, units, max(lowest, want))


def select_units_uniformly(
    unit_scores: Mapping[str, torch.Tensor],
    mac_model: MacModel,
    fraction: float,
    *,
    current: MaskSet | None = None,
    layer_floor: float = DEFAULT_LAYER_FLOOR,
    multiple: int = 1,
    min_units: int = DEFAULT_MIN_UNITS,
) -> MaskSet:
    """Keep-masks removing the same share of units from every group (each down to its floor at most, to the
    nearest ``multiple``) until ``fraction`` of the dense Conv/Linear MACs is gone; within a group the
    units of lowest score go first.

    The allocation across layers is fixed (every coupled group keeps the same share of its units, to the
    nearest multiple), so only the ranking inside a group depends on the scores: this is the per-layer rule
    of channel pruners such as Torch-Pruning's MetaPruner without global pruning. The share is the largest
    whose MACs meet the target, or the next larger step when that is nearer the target (ties: fewer removed).
    Arguments and result as :func:`select_units_by_macs`.

    >>> import torch
    >>> from obdprune.groups import unit_groups
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
    ...                           torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 2))
    >>> x = torch.randn(1, 1, 8, 8)
    >>> mm = mac_model(net, x, unit_groups(net, x))
    >>> scores = {g.layer: torch.arange(g.units, dtype=torch.float) for g in mm.groups}
    >>> masks = select_units_uniformly(scores, mm, 0.5, layer_floor=0.0, min_units=1)
    >>> mm.kept_units(masks), round(mm.fraction_removed(masks), 3)
    ([5, 5], 0.554)
    """
    _check_request(fraction, layer_floor, multiple)
    groups = mac_model.groups
    scores = [checked_unit_scores(unit_scores, g) for g in groups]
    before = [removed_units(g, current) for g in groups]
    free = [g.units - int(b.sum()) for g, b in zip(groups, before)]
    lowest = [min(f, min_kept(g.units, layer_floor, multiple, min_units)) for g, f in zip(groups, free)]
    dense = mac_model.dense
    target = (1.0 - fraction) * dense + 1e-9 * dense

    def kept_at(share: float) -> list[int]:
        return [_uniform_kept(g.units, f, lo, share, multiple) for g, f, lo in zip(groups, free, lowest)]

    if mac_model.macs(kept_at(0.0)) > target:
        raise _beyond_floor(mac_model, fraction, layer_floor, multiple, min_units)
    steps = {0.0, 1.0} | {(j + 0.5) * multiple / g.units for g in groups for j in range(g.units // multiple + 1)}
    shares = sorted(v for v in steps if v <= 1.0)  # where some group's rounded count changes
    lo, hi = 0, len(shares) - 1  # the largest share whose MACs meet the target: binary search, MACs rise with it
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mac_model.macs(kept_at(shares[mid])) <= target:
            lo = mid
        else:
            hi = mid - 1
    kept = kept_at(shares[lo])
    if lo + 1 < len(shares):
        above = kept_at(shares[lo + 1])
        if abs(mac_model.macs(above) - target) < abs(target - mac_model.macs(kept)):
            kept = above
    keep = []
    for g, s, b, k in zip(groups, scores, before, kept):
        alive = torch.nonzero(~b).flatten()
        order = alive[torch.sort(s[alive], stable=True).indices]
        kk = ~b
        kk[order[:len(alive) - k]] = False
        keep.append(kk)
    return unit_keep_masks(groups, keep, current)
