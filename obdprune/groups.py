"""Structured (channel) pruning: the output units of Conv2d/Linear layers and their selection.

A *unit* is one output of a Conv/Linear layer: a filter of a convolution or a neuron of a linear
layer. Unit ``i`` of a layer is the group of parameter slices that go together:

* the incoming weights ``weight[i]`` (shape ``weight.shape[1:]``, ``fan_in`` entries),
* ``bias[i]`` if the layer has a bias,
* ``weight[i]`` and ``bias[i]`` of the BatchNorm that normalizes the layer's output, if any.

Zeroing the whole group makes the unit's output identically zero (a BatchNorm with zero scale and
shift outputs 0 whatever its statistics), so :func:`obdprune.compact.compact` removes it exactly.
The group's outgoing weights (the next layer's input slice) stay as they are: they read a zero.

:func:`select_unit_masks` turns per-unit scores into keep-masks for every member of every group.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from obdprune.autograd_ops import CHANNELWISE_UNARY_OPS, SPATIAL_REDUCE_OPS, op_name, reduces_only_spatial_dims
from obdprune.choices import Choice
from obdprune.errors import UsageError
from obdprune.layers import BATCH_NORM_TYPES, PRUNABLE_TYPES, prunable_layers
from obdprune.masking import MaskSet, Scope, prunable_weights

__all__ = [
    "Granularity", "UnitLayer", "unit_groups", "unit_floor", "removed_units", "select_unit_masks",
    "max_unit_sparsity", "group_parameters", "total_prunable_weights", "unit_keep_masks", "checked_unit_scores",
]


class Granularity(Choice):
    """What pruning removes: single weights (``element``) or whole output units (``channel``)."""

    ELEMENT = "element"
    CHANNEL = "channel"


@dataclass(frozen=True)
class UnitLayer:
    """The output units of one Conv/Linear layer; unit ``i`` is ``{model[p][i] for p in params}``.

    layer: dotted module name (``"features.0"``).
    params: dotted parameter names, the layer's ``weight`` first, then its ``bias`` and the
      following BatchNorm's ``weight`` and ``bias`` where present; each has ``units`` rows (dim 0).
    weight_shape: shape of ``weight``: (units, in/groups, kH, kW) or (units, in).
    readers: (layer, span) for every Conv/Linear layer that reads the units: each unit feeds ``span``
      of that layer's input features (1 for a channel, H*W for a Linear after Flatten).
    """

    layer: str
    params: tuple[str, ...]
    weight_shape: tuple[int, ...]
    readers: tuple[tuple[str, int], ...] = ()

    @property
    def weight(self) -> str:
        return self.params[0]

    @property
    def units(self) -> int:
        return self.weight_shape[0]

    @property
    def fan_in(self) -> int:
        """Conv/Linear weights of one unit: what removing it counts toward the sparsity."""
        return math.prod(self.weight_shape[1:])

    @property
    def group_size(self) -> int:
        """Entries of one unit's group |g|: ``fan_in`` plus one per bias / BatchNorm parameter."""
        return self.fan_in + len(self.params) - 1

    @property
    def weights(self) -> int:
        return self.units * self.fan_in


def group_parameters(model: nn.Module, groups: Sequence[UnitLayer]) -> dict[str, nn.Parameter]:
    """Every parameter that belongs to some unit group, by dotted name."""
    params = dict(model.named_parameters())
    return {p: params[p] for g in groups for p in g.params}


def _layer_outputs_feeding_model_outputs(outputs: list[torch.Tensor], layer_gfs: dict[Any, str]) -> set[str]:
    """Layers whose output reaches a model output without passing through another Conv/Linear."""
    found: set[str] = set()
    seen: set[Any] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        gf = stack.pop()
        if gf is None or gf in seen:
            continue
        seen.add(gf)
        if gf in layer_gfs:
            found.add(layer_gfs[gf])
            continue
        stack.extend(nxt for nxt, _ in getattr(gf, "next_functions", ()))
    return found


def _supported_item(dg: tp.DependencyGraph, item: Any, root: nn.Module, units: int) -> str | None:
    """Role of one Torch-Pruning group item for a unit group: ``bn``, ``reader``, ``pass`` (an op
    that carries zero channels as zero), or None when the layer's units cannot be removed alone."""
    m = item.dep.target.module
    out = dg.is_out_channel_pruning_fn(item.dep.handler)
    if m is root:
        return "pass" if out else None
    if isinstance(m, BATCH_NORM_TYPES):
        return "bn" if out and m.affine and m.num_features == units else None
    if isinstance(m, PRUNABLE_TYPES):
        depthwise = isinstance(m, nn.Conv2d) and m.groups > 1
        return "reader" if not out and not depthwise else None  # a coupled producer: residual sum
    if isinstance(m, tp.ops._ElementWiseOp):
        full = str(m._grad_fn)  # Torch-Pruning keeps the autograd node's name
        name = op_name(full)
        if name == "TBackward" and not item.dep.target.inputs:
            return "pass"  # the transposed weight of a reading Linear
        if full in SPATIAL_REDUCE_OPS:  # a mean or sum over spatial dims (global average pooling)
            return "pass" if reduces_only_spatial_dims(item.dep.target.grad_fn) else None
        return "pass" if CHANNELWISE_UNARY_OPS.get(name, False) else None
    if isinstance(m, (tp.ops._ReshapeOp, tp.ops._ConcatOp, tp.ops._SplitOp)):
        return "pass"
    return None


@torch.inference_mode(False)
def unit_groups(model: nn.Module, example_inputs: torch.Tensor) -> list[UnitLayer]:
    """The removable output units of every Conv2d/Linear layer of ``model``, in module order.

    example_inputs: a batch (N, C, H, W) the model accepts; traced on a copy (``model`` is untouched).
    A layer is left out (never channel-pruned) when its units are not independent removable units:
    it feeds a model output (the classifier: its units are the classes), no Conv/Linear reads it,
    it is called more than once, its channels are tied to another layer's (a residual sum, a
    depthwise convolution), or something between it and its readers does not map a zero channel
    to zero (a non-affine BatchNorm, a sigmoid, an op Torch-Pruning does not model).
    """
    scratch = copy.deepcopy(model).eval()
    for p in scratch.parameters():
        p.requires_grad_(True)
    names = {m: n for n, m in scratch.named_modules()}
    calls: dict[str, int] = {}
    layer_gfs: dict[Any, str] = {}

    def hook(mod: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        calls[names[mod]] = calls.get(names[mod], 0) + 1
        layer_gfs[out.grad_fn] = names[mod]

    layers = prunable_layers(scratch)
    handles = [m.register_forward_hook(hook) for _, m in layers]
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            outputs = scratch(_autograd_ready(example_inputs[:1]))
        finally:
            for h in handles:
                h.remove()
        dg = tp.DependencyGraph().build_dependency(scratch, example_inputs=_autograd_ready(example_inputs[:1]),
                                                   verbose=False)
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else [t for t in outputs if isinstance(t, torch.Tensor)]
    at_output = _layer_outputs_feeding_model_outputs(outputs, layer_gfs)

    groups: list[UnitLayer] = []
    for name, m in layers:
        if name in at_output or calls.get(name) != 1 or m not in dg.module2node:
            continue
        units = m.weight.shape[0]
        with torch.enable_grad():
            items = list(dg.get_pruning_group(m, dg.get_pruner_of_module(m).prune_out_channels, [0]).items)
        roles = [_supported_item(dg, it, m, units) for it in items]
        if None in roles or "reader" not in roles:
            continue
        bns = [it.dep.target.module for it, r in zip(items, roles) if r == "bn"]
        if len(bns) > 1:
            continue
        params = [f"{name}.weight"] + ([f"{name}.bias"] if m.bias is not None else [])
        params += [f"{names[bns[0]]}.weight", f"{names[bns[0]]}.bias"] if bns else []
        readers = tuple((names[it.dep.target.module], len(it.idxs)) for it, r in zip(items, roles) if r == "reader")
        groups.append(UnitLayer(layer=name, params=tuple(params), weight_shape=tuple(m.weight.shape),
                                readers=readers))
    return groups


def _autograd_ready(x: torch.Tensor) -> torch.Tensor:
    # Standard strides: an input whose strides also read as channels_last (C = 1) makes global
    # pooling + flatten trace as as_strided, which hides the channel structure.
    return x.clone(memory_format=torch.contiguous_format)


def unit_floor(units: int, layer_floor: float) -> int:
    """Units a layer always keeps: ``max(1, ceil(layer_floor * units))``."""
    return min(units, max(1, math.ceil(layer_floor * units)))


def removed_units(group: UnitLayer, current: MaskSet | None) -> torch.Tensor:
    """(units,) bool: units whose incoming weights ``current`` prunes entirely."""
    if current is None or group.weight not in current.masks:
        return torch.zeros(group.units, dtype=torch.bool)
    return ~current[group.weight].reshape(group.units, -1).any(dim=1).cpu()


def max_unit_sparsity(groups: Sequence[UnitLayer], total_weights: int, layer_floor: float,
                      scope: Scope | str = Scope.GLOBAL) -> float:
    """Largest sparsity (fraction of ``total_weights``) :func:`select_unit_masks` can reach while every
    layer keeps its floor of units (floored to 1e-6)."""
    if not groups:
        return 0.0
    floors = [unit_floor(g.units, layer_floor) for g in groups]
    if Scope.parse(scope) is Scope.LAYER:
        return min(math.floor((1.0 - f / g.units) * 1e6) / 1e6 for f, g in zip(floors, groups))
    removable = sum((g.units - f) * g.fan_in for f, g in zip(floors, groups))
    return math.floor(removable / total_weights * 1e6) / 1e6


def checked_unit_scores(unit_scores: Mapping[str, torch.Tensor], g: UnitLayer) -> torch.Tensor:
    """``unit_scores[g.layer]`` as a (units,) float64 CPU tensor, after checking that it is there, has one
    score per unit and no NaN (ValueError / UsageError naming the layer otherwise)."""
    if g.layer not in unit_scores:
        raise ValueError(f"no unit scores for layer {g.layer!r}")
    s = unit_scores[g.layer].detach().to(torch.float64).cpu()
    if tuple(s.shape) != (g.units,):
        raise ValueError(f"unit scores of {g.layer!r} have shape {tuple(s.shape)}, expected ({g.units},)")
    if torch.isnan(s).any():
        raise UsageError(f"saliency of {g.layer!r} contains NaN")
    return s


def select_unit_masks(
    unit_scores: Mapping[str, torch.Tensor],
    groups: Sequence[UnitLayer],
    sparsity: float,
    *,
    total_weights: int,
    scope: Scope | str = Scope.GLOBAL,
    current: MaskSet | None = None,
    layer_floor: float = 0.01,
) -> MaskSet:
    """Keep-masks removing whole units with the lowest scores.

    unit_scores: {layer name: (units,)} additive costs of removing each unit (higher = keep), e.g.
      from :func:`obdprune.saliency.group_saliency`.
    sparsity: fraction of ``total_weights`` (all Conv/Linear weights of the model) to remove; a unit
      counts its ``fan_in`` incoming weights.
      * global scope: units of all layers are ranked by score per counted weight (score / fan_in),
        the greedy order for "least total score for the weights removed"; the lowest go until the
        removed count is nearest to ``round(sparsity * total_weights)`` (ties: fewer removed).
      * layer scope: every grouped layer loses ``round(sparsity * units)`` units (layers without
        groups, like the classifier, lose none, so the overall sparsity is lower).
    current: masks in force; a unit whose weights it prunes entirely stays removed, every entry it
      prunes stays pruned, and its other entries are carried over (masks only shrink).
    layer_floor: every layer keeps ``max(1, ceil(layer_floor * units))`` units; a target that cannot
      be met under that floor raises UsageError.
    Returns masks for every member of every group (weights, biases, BatchNorm scale and shift) plus
    the other masks of ``current``. Ties are broken by layer order, then unit index.
    """
    scope = Scope.parse(scope)
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 <= layer_floor <= 1.0:
        raise UsageError(f"layer floor must be in [0, 1], got {layer_floor}")
    if total_weights < sum(g.weights for g in groups):
        raise ValueError(f"total_weights {total_weights} is less than the grouped layers' weights")
    scores = [checked_unit_scores(unit_scores, g) for g in groups]
    before = [removed_units(g, current) for g in groups]
    floors = [unit_floor(g.units, layer_floor) for g in groups]
    keep: list[torch.Tensor] = []
    if scope is Scope.LAYER:
        for g, s, b, f in zip(groups, scores, before, floors):
            n_remove = int(round(sparsity * g.units))
            if g.units - n_remove < f:
                raise UsageError(
                    f"sparsity {sparsity} would leave {g.layer!r} with {g.units - n_remove} of {g.units} units, "
                    f"below its floor of {f}; lower the target or the layer floor")
            s = torch.where(b, torch.full_like(s, -math.inf), s)
            keep.append(_keep_top(s, g.units - max(n_remove, int(b.sum()))))
    else:
        n_target = int(round(sparsity * total_weights))
        forced = sum(int(b.sum()) * g.fan_in for g, b in zip(groups, before))
        cand_key, cand_owner, cand_index = [], [], []
        for i, (g, s, b, f) in enumerate(zip(groups, scores, before, floors)):
            free = torch.nonzero(~b).flatten()
            order = free[torch.sort(s[free], stable=True).indices]  # ascending; ties in index order
            rest = order[: max(0, free.numel() - f)]  # the top `f` free units are protected
            cand_key.append(s[rest] / g.fan_in)
            cand_owner.append(torch.full((rest.numel(),), i, dtype=torch.int64))
            cand_index.append(rest)
        key, owner, index = torch.cat(cand_key), torch.cat(cand_owner), torch.cat(cand_index)
        fan_in = torch.tensor([g.fan_in for g in groups], dtype=torch.int64)
        removable = forced + int(fan_in[owner].sum())
        if n_target > removable:
            raise UsageError(
                f"sparsity {sparsity} would remove {n_target} of {total_weights} weights but whole units can "
                f"remove at most {removable} while every layer keeps its floor; lower the target or the layer floor")
        order = torch.argsort(index, stable=True)
        order = order[torch.argsort(owner[order], stable=True)]
        order = order[torch.argsort(key[order], stable=True)]
        cum = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(fan_in[owner[order]], 0)])
        need = n_target - forced
        k = int(torch.searchsorted(cum, torch.tensor(max(need, 0)), right=True)) - 1  # cum[k] <= need
        if k + 1 < cum.numel() and abs(int(cum[k + 1]) - need) < abs(need - int(cum[k])):
            k += 1
        chosen = order[:k]
        for i, (g, b) in enumerate(zip(groups, before)):
            kk = ~b
            kk[index[chosen[owner[chosen] == i]]] = False
            keep.append(kk)
    return unit_keep_masks(groups, keep, current)


def unit_keep_masks(groups: Sequence[UnitLayer], keep: Sequence[torch.Tensor], current: MaskSet | None) -> MaskSet:
    """Masks for every member of every group from per-unit keep flags ``keep[i]`` (units,) bool, and'ed
    with the masks of ``current``, whose other masks are carried over."""
    out = dict(current.masks) if current is not None else {}
    for g, kk in zip(groups, keep):
        for p in g.params:
            shape = g.weight_shape if p == g.weight else (g.units,)
            m = kk.reshape((g.units,) + (1,) * (len(shape) - 1)).expand(shape).clone()
            if current is not None and p in current.masks:
                m = m.to(current[p].device) & current[p]
            out[p] = m
    return MaskSet(out)


def _keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    order = torch.sort(scores, stable=True).indices  # ascending; among ties the earlier index goes first
    k = torch.zeros(scores.numel(), dtype=torch.bool)
    k[order[scores.numel() - n_keep:]] = True
    return k


def total_prunable_weights(model: nn.Module) -> int:
    """All Conv/Linear weights of ``model``: the denominator of every sparsity."""
    return sum(w.numel() for w in prunable_weights(model).values())
