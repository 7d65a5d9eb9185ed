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

from obdprune.channel_graph import ChannelGraph, GraphFailure, build_graph, failing_node
from obdprune.autograd_ops import CHANNELWISE_UNARY_OPS, SPATIAL_REDUCE_OPS, op_name, reduces_only_spatial_dims
from obdprune.compact import find_dead_units
from obdprune.choices import Choice
from obdprune.errors import UsageError
from obdprune.layers import BATCH_NORM_TYPES, PRUNABLE_TYPES, is_depthwise, is_grouped, prunable_layers
from obdprune.masking import DEFAULT_LAYER_FLOOR, MaskSet, Scope, prunable_weights

__all__ = [
    "Granularity", "UnitLayer", "UnitMember", "UnitAnalysis", "Exclusion", "DEFAULT_MIN_UNITS", "unit_analysis",
    "unit_groups", "unit_floor", "removed_units", "select_unit_masks",
    "max_unit_sparsity", "group_parameters", "total_prunable_weights", "unit_keep_masks", "checked_unit_scores",
]


class Granularity(Choice):
    """What pruning removes: single weights (``element``) or whole output units (``channel``)."""

    ELEMENT = "element"
    CHANNEL = "channel"


DEFAULT_MIN_UNITS = 4
"""Units every layer keeps unless told otherwise (all of them when it has fewer)."""


@dataclass(frozen=True)
class UnitMember:
    """A parameter a unit spans besides its layer's own: row ``rows[i]`` of ``param`` (rows along dim 0)
    belongs to unit ``i``; e.g. the other convs of a residual sum, a depthwise conv, their BatchNorms,
    the slice of a BatchNorm that normalizes a concatenation. With ``blocks`` > 1 (a grouped conv on the
    way) unit ``i`` spans the ``blocks`` rows ``rows[i * blocks:(i + 1) * blocks]``, one per channel group."""

    param: str
    shape: tuple[int, ...]
    rows: tuple[int, ...]
    blocks: int = 1

    @property
    def row_size(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def unit_size(self) -> int:
        """Entries of ``param`` one unit spans."""
        return self.row_size * self.blocks


@dataclass(frozen=True)
class UnitLayer:
    """The output units of one Conv/Linear layer and of every layer coupled to it; unit ``i`` is
    ``{model[p][i] for p in params} ∪ {model[m.param][m.rows[i]] for m in coupled}``.

    layer: dotted module name (``"features.0"``) of the first layer (in module order) whose outputs
      are the units; scores are keyed by it.
    params: dotted parameter names, the layer's ``weight`` first, then its ``bias`` and the
      following BatchNorm's ``weight`` and ``bias`` where present; each has ``units`` rows (dim 0).
    weight_shape: shape of ``weight``: (units, in/groups, kH, kW) or (units, in).
    readers: (layer, span) for every Conv/Linear layer that reads the units: each unit feeds ``span``
      of that layer's input features (1 for a channel, H*W for a Linear after Flatten).
    coupled: the members in other layers (empty when nothing is tied to ``layer``: a LeNet's units).
    producers: the other Conv/Linear layers whose output channels are the units (the convs on both
      sides of a residual sum, a depthwise conv): removing a unit removes one output of each.
    blocks: channels per unit; 1 unless a grouped convolution (``groups`` = g, not depthwise) produces or
      reads the channels. Then unit ``i`` is channel ``i`` of every one of ``blocks`` equal slices of the
      channels (rows ``i, i + units, i + 2·units, ...`` of ``params``): the same position in every group of
      the grouped conv, so removing units keeps its groups equal and compaction rebuilds it with fewer
      channels per group.
    """

    layer: str
    params: tuple[str, ...]
    weight_shape: tuple[int, ...]
    readers: tuple[tuple[str, int], ...] = ()
    coupled: tuple[UnitMember, ...] = ()
    producers: tuple[str, ...] = ()
    blocks: int = 1

    @property
    def weight(self) -> str:
        return self.params[0]

    @property
    def units(self) -> int:
        return self.weight_shape[0] // self.blocks

    @property
    def layers(self) -> tuple[str, ...]:
        """Every Conv/Linear layer that loses an output with a unit, ``layer`` first."""
        return (self.layer, *self.producers)

    @property
    def fan_in(self) -> int:
        """Conv/Linear weights of one unit (its layer's and every producer's row): what removing it
        counts toward the sparsity."""
        own = math.prod(self.weight_shape[1:]) * self.blocks
        weights = {f"{p}.weight" for p in self.producers}
        return own + sum(m.unit_size for m in self.coupled if m.param in weights)

    @property
    def group_size(self) -> int:
        """Entries of one unit's group |g|: the layer's weight row(s), one per bias / BatchNorm parameter
        (and block), and the rows of every coupled member."""
        own = (math.prod(self.weight_shape[1:]) + len(self.params) - 1) * self.blocks
        return own + sum(m.unit_size for m in self.coupled)

    @property
    def weights(self) -> int:
        return self.units * self.fan_in

    def members(self) -> list[tuple[str, tuple[int, ...], torch.Tensor | None]]:
        """(parameter, its shape, rows) of every member: rows is None for rows 0..units-1 of the layer's own
        parameters, (units,) row indices of a coupled member, or (units, blocks) when ``blocks`` > 1."""
        n = self.weight_shape[0]
        if self.blocks == 1:
            own = [(p, self.weight_shape if p == self.weight else (n,), None) for p in self.params]
            return own + [(m.param, m.shape, torch.tensor(m.rows, dtype=torch.long)) for m in self.coupled]
        mine = torch.arange(n).view(self.blocks, self.units).T.contiguous()
        own = [(p, self.weight_shape if p == self.weight else (n,), mine) for p in self.params]
        return own + [(m.param, m.shape, torch.tensor(m.rows, dtype=torch.long).view(self.units, self.blocks))
                      for m in self.coupled]


def group_parameters(model: nn.Module, groups: Sequence[UnitLayer]) -> dict[str, nn.Parameter]:
    """Every parameter that belongs to some unit group, by dotted name."""
    params = dict(model.named_parameters())
    return {p: params[p] for g in groups for p, _, _ in g.members()}


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


class Exclusion(Choice):
    """Why a layer has no removable units."""

    OUTPUT = "output layer"
    INPUT = "tied to the network input"
    UNSUPPORTED = "unsupported op"
    PROTECTED = "protected by the user"
    MINIMUM = "at its minimum"


@dataclass(frozen=True)
class UnitAnalysis:
    """The unit groups of a model and, for every Conv/Linear layer in none, why.

    excluded: {layer: (kind, detail)}, e.g. ``{"fc": (Exclusion.OUTPUT, "its outputs are the model's")}``.
    """

    groups: tuple[UnitLayer, ...]
    excluded: Mapping[str, tuple[Exclusion, str]]

    def reasons(self, min_units: int = DEFAULT_MIN_UNITS, layer_floor: float = 0.0) -> dict[str, str]:
        """``{layer: "kind (detail)"}`` for every layer that cannot lose units, layers at their minimum
        (``min_units`` / ``layer_floor``) included; e.g. ``{"fc": "output layer (its outputs are model outputs)"}``."""
        out = {n: f"{k.value} ({d})" for n, (k, d) in self.excluded.items()}
        for g in self.groups:
            floor = unit_floor(g.units, layer_floor, min_units)
            if floor >= g.units:
                out.update({n: f"{Exclusion.MINIMUM.value} ({g.units} units, keeps at least {floor})" for n in g.layers})
        return out

    def explain(self, min_units: int = DEFAULT_MIN_UNITS, layer_floor: float = 0.0) -> list[str]:
        """One line per layer that cannot lose units: ``"name: kind (detail)"`` (see :meth:`reasons`)."""
        return [f"{n}: {r}" for n, r in self.reasons(min_units, layer_floor).items()]


class _Excluded(Exception):
    def __init__(self, kind: Exclusion, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail
        self.layers: list[str] | None = None


def _op_label(m: Any) -> str:
    gf = getattr(m, "_grad_fn", None)
    return str(gf).rstrip("0123456789") if gf is not None else type(m).__name__.strip("_")


def _check_op(item: Any, names: Mapping[Any, str], graph: ChannelGraph) -> str | None:
    """Raise :class:`_Excluded` unless the group item is an op that carries a zero channel as zero
    (or, for a sum, tells that the sum has an operand no layer produces: the network input). Returns the
    op's name when it maps 0 to something else (a sigmoid): whether the unit is still removable depends
    on what follows (a product with a zero channel), which :func:`_probe_dead` checks."""
    m = item.dep.target.module
    if item.dep.target.grad_fn in graph.inside:
        return  # an op a Linear runs on an (N, *, features) input
    if isinstance(m, tp.ops._ElementWiseOp):
        full = str(m._grad_fn)  # Torch-Pruning keeps the autograd node's name
        name = op_name(full)
        if name == "TBackward" and not item.dep.target.inputs:
            return  # the transposed weight of a reading Linear
        if full in SPATIAL_REDUCE_OPS:  # a mean or sum over spatial dims (global average pooling)
            if reduces_only_spatial_dims(item.dep.target.grad_fn):
                return
            raise _Excluded(Exclusion.UNSUPPORTED, f"{name} over the batch or channel dim")
        if name in ("AddBackward", "SubBackward"):
            gf = item.dep.target.grad_fn
            if any(f is None for f, _ in gf.next_functions):
                raise _Excluded(Exclusion.INPUT, f"{name} of a tensor no layer produces")
            return
        if name in CHANNELWISE_UNARY_OPS and not CHANNELWISE_UNARY_OPS[name]:
            return name.removesuffix("Backward")
        if name in ("MulBackward", "DivBackward") or name in CHANNELWISE_UNARY_OPS or name.startswith(_VIEW_OPS):
            return None
        if name in ("NativeLayerNormBackward", "NativeGroupNormBackward"):
            where = graph.op_modules.get(item.dep.target.grad_fn)
            raise _Excluded(Exclusion.UNSUPPORTED, _normalizes_channels(name[6:-8] + (f" in {where!r}" if where else "")))
        raise _Excluded(Exclusion.UNSUPPORTED, name)
    if isinstance(m, (tp.ops._ReshapeOp, tp.ops._ConcatOp, tp.ops._SplitOp)):
        return
    if isinstance(m, tp.ops._OutputOp):
        raise _Excluded(Exclusion.OUTPUT, "its channels are a model output")
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        raise _Excluded(Exclusion.UNSUPPORTED, _normalizes_channels(f"{type(m).__name__} {names.get(m, '?')!r}"))
    if isinstance(m, nn.Parameter):
        raise _Excluded(Exclusion.UNSUPPORTED, "a parameter used outside a module (e.g. a layer scale)")
    raise _Excluded(Exclusion.UNSUPPORTED, _op_label(m))


def _normalizes_channels(norm: str) -> str:
    return (f"{norm} normalizes across channels: removing a channel changes the mean and variance that "
            f"normalize the others")


_VIEW_OPS = ("ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward", "SqueezeBackward", "UnsqueezeBackward",
             "PermuteBackward", "CloneBackward")


def _channel_blocks(items: Sequence[Any], channels: int, names: Mapping[Any, str], dg: tp.DependencyGraph) -> int:
    """Channels per unit: the least common multiple of the ``groups`` of the grouped convs that produce or
    read the group's channels (1 when there are none)."""
    blocks = 1
    for it in items:
        m = it.dep.target.module
        if is_grouped(m):
            blocks = math.lcm(blocks, m.groups)
    if channels % blocks:
        name = next(names[it.dep.target.module] for it in items if is_grouped(it.dep.target.module))
        raise _Excluded(Exclusion.UNSUPPORTED, f"grouped convolution {name!r}: its groups do not divide the "
                                               f"{channels} channels tied to it")
    return blocks


def _check_grouped(m: nn.Conv2d, name: str, unit_idxs: Sequence[Sequence[int]], out: bool) -> None:
    """Raise :class:`_Excluded` unless removing any set of units keeps ``m``'s groups equal: every unit takes
    as many of ``m``'s output channels (``out``) from every group, or, of its input channels, the same
    positions in every group."""
    n = m.out_channels if out else m.in_channels
    size = n // m.groups
    for idxs in unit_idxs:
        per_group: dict[int, list[int]] = {}
        for c in idxs:
            per_group.setdefault(c // size, []).append(c % size)
        positions = [sorted(v) for v in per_group.values()]
        if len(per_group) != m.groups or any(len(v) != len(positions[0]) for v in positions) or (
                not out and any(v != positions[0] for v in positions)):
            what = "as many output channels" if out else "the same input channels"
            raise _Excluded(Exclusion.UNSUPPORTED, f"grouped convolution {name!r} (groups={m.groups}): a unit "
                                                   f"does not take {what} from each group")


def _coupled_group(graph: ChannelGraph, root: nn.Module, names: Mapping[Any, str],
                   at_output: set[str]) -> tuple[UnitLayer, list[str], list[str]]:
    """The unit group rooted at ``root`` and the Conv/Linear layers whose outputs it covers; raises
    :class:`_Excluded` (with those layers in ``layers``) when its units cannot be removed exactly."""
    dg = graph.dg
    channels = root.weight.shape[0]
    try:
        with torch.enable_grad():
            items = list(dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels,
                                              list(range(channels))).items)
    except Exception as e:  # the graph library's index mapping
        node = failing_node(e)
        at = f" at {node.grad_fn.name() if getattr(node, 'grad_fn', None) is not None else names.get(node.module, '?')}" \
            if node is not None else ""
        raise _excluded_with(Exclusion.UNSUPPORTED, f"the channel graph library fails{at} ({type(e).__name__}: {e})",
                             [names[root]]) from None
    producers: list[str] = []
    for it in items:
        m = it.dep.target.module
        if isinstance(m, PRUNABLE_TYPES) and dg.is_out_channel_pruning_fn(it.dep.handler) and m in names:
            producers.append(names[m])
    producers = list(dict.fromkeys(producers))
    root_name = names[root]
    try:
        for it in items:
            cut = graph.cuts.get(it.dep.target.grad_fn)
            if cut is not None:
                raise _Excluded(Exclusion.UNSUPPORTED, cut.describe())
            m = it.dep.target.module
            if is_depthwise(m) and not dg.module2node[m].inputs:
                raise _Excluded(Exclusion.UNSUPPORTED, f"depthwise conv {names[m]!r} reads channels no layer "
                                                       f"produces (the network input, or channels after a reshape)")
        blocks = _channel_blocks(items, channels, names, dg)
        units = channels // blocks
        own, coupled, readers, bn_taken, nonzero_ops = [f"{root_name}.weight"], [], [], False, []
        if root.bias is not None:
            own.append(f"{root_name}.bias")
        seen: set[str] = set(own)
        for it in items:
            m, out = it.dep.target.module, dg.is_out_channel_pruning_fn(it.dep.handler)
            idxs, roots = list(it.idxs), list(it.root_idxs)
            if blocks > 1:  # the channels of unit i: i, i + units, ... of the root, as this item numbers them
                to_item = dict(zip(roots, idxs))
                if set(to_item) != set(range(channels)) and isinstance(m, (*PRUNABLE_TYPES, *BATCH_NORM_TYPES)):
                    raise _Excluded(Exclusion.UNSUPPORTED, "a reshape of the channels (a channel shuffle?)")
                unit_idxs = [[to_item[i + j * units] for j in range(blocks)] for i in range(units)]
                if is_grouped(m):
                    _check_grouped(m, names[m], unit_idxs, out)
            if m is root:
                continue
            if isinstance(m, PRUNABLE_TYPES):
                name = names[m]
                if not out:
                    n_in = m.weight.shape[1] * getattr(m, "groups", 1)
                    if len(idxs) % units or max(idxs) >= n_in:
                        raise _Excluded(Exclusion.UNSUPPORTED, "a reshape of the channels (a channel shuffle?)")
                    readers.append((name, len(idxs) // units))
                    continue
                members = [(f"{name}.weight", tuple(m.weight.shape))]
                members += [(f"{name}.bias", tuple(m.bias.shape))] if m.bias is not None else []
                if sorted(idxs) != list(range(channels)) or m.weight.shape[0] != channels:
                    raise _Excluded(Exclusion.UNSUPPORTED, "a reshape of the channels (a channel shuffle?)")
            elif isinstance(m, BATCH_NORM_TYPES):
                if not out or not m.affine:
                    raise _Excluded(Exclusion.UNSUPPORTED, f"BatchNorm {names[m]!r} without scale and shift")
                if len(idxs) != channels or len(set(idxs)) != channels or max(idxs) >= m.num_features:
                    raise _Excluded(Exclusion.UNSUPPORTED, "a reshape of the channels (a channel shuffle?)")
                members = [(f"{names[m]}.weight", (m.num_features,)), (f"{names[m]}.bias", (m.num_features,))]
                if not bn_taken and m.num_features == channels and idxs == roots == list(range(channels)):
                    bn_taken = True
                    own += [p for p, _ in members]
                    seen.update(own)
                    continue
            else:
                op = _check_op(it, names, graph)
                if op is not None:
                    nonzero_ops.append(op)
                continue
            if blocks == 1:
                rows = tuple(int(i) for _, i in sorted(zip(roots, idxs)))
            else:
                rows = tuple(int(c) for unit in unit_idxs for c in unit)
            for p, shape in members:
                if p not in seen:
                    seen.add(p)
                    coupled.append(UnitMember(p, shape, rows, blocks))
        tied = [p for p in producers if p in at_output]
        if tied:
            raise _Excluded(Exclusion.OUTPUT, f"{tied[0]!r} feeds a model output" if tied[0] != root_name
                            else "its outputs are model outputs")
        if not readers:
            raise _Excluded(Exclusion.UNSUPPORTED, "no Conv/Linear layer reads its units")
    except _Excluded as err:
        err.layers = producers
        raise
    return (UnitLayer(layer=root_name, params=tuple(own), weight_shape=tuple(root.weight.shape),
                      readers=tuple(dict.fromkeys(readers)), coupled=tuple(coupled),
                      producers=tuple(p for p in producers if p != root_name), blocks=blocks), producers,
            list(dict.fromkeys(nonzero_ops)))


def _probe_dead(model: nn.Module, example_inputs: torch.Tensor, groups: Sequence[UnitLayer]) -> list[bool]:
    """For each group: whether zeroing unit 0 (every member) lets compaction remove that unit from every
    layer of the group (checked with compaction's own analysis, all groups at once)."""
    scratch = copy.deepcopy(model).eval()
    params = dict(scratch.named_parameters())
    with torch.no_grad():
        for g in groups:
            for p, _, rows in g.members():
                params[p].view(params[p].shape[0], -1)[0 if rows is None else rows[0]] = 0
    dead = find_dead_units(scratch, example_inputs)
    return [all(bool(dead[n][0]) for n in g.layers) for g in groups]


def _protected(model: nn.Module, keep: Sequence[str]) -> set[str]:
    modules = dict(model.named_modules())
    unknown = [k for k in keep if k not in modules or not k]
    if unknown:
        layers = [n for n, m in modules.items() if isinstance(m, PRUNABLE_TYPES)]
        raise UsageError(f"keep names no module of the model: {', '.join(map(repr, unknown))}; "
                         f"its Conv/Linear layers are {', '.join(layers[:8])}{', ...' if len(layers) > 8 else ''}")
    return {n for n, m in modules.items() if isinstance(m, PRUNABLE_TYPES) and any(
        n == k or n.startswith(k + ".") for k in keep)}


@torch.inference_mode(False)
def unit_analysis(model: nn.Module, example_inputs: torch.Tensor, *, keep: Sequence[str] = ()) -> UnitAnalysis:
    """The coupled units of every Conv2d/Linear layer of ``model`` and why the other layers have none.

    example_inputs: a batch (N, C, H, W) the model accepts; traced on a copy (``model`` is untouched).
    keep: module names whose Conv/Linear layers (themselves or below them) never lose units.

    A unit is a channel index together with every layer tied to it (from Torch-Pruning's dependency
    graph): the convs, linears and BatchNorms on both sides of a residual sum, the slices of a
    concatenation (and the BatchNorms that normalize them), a depthwise conv's input and output
    channel. Where a grouped conv (``groups`` = g) produces or reads the channels, a unit is the same
    position in each of its g groups (:attr:`UnitLayer.blocks` channels), so the conv keeps equal groups.
    A Linear on a channels-last (N, *, features) input (ConvNeXt's MLP after a permute) has units like
    one on (N, features). A layer has no units (and :attr:`UnitAnalysis.excluded` says why) when they
    feed a model output, a sum with the network input, when a layer or op on the way is one whose
    channels cannot be removed alone (a norm across channels, a non-affine BatchNorm, a grouped conv
    whose groups the channels do not split into evenly, a depthwise conv on channels no layer produces,
    a layer called twice), when they reach an op that moves channels to other positions (a channel
    shuffle, a pixel shuffle, a reshape of the channel dim: the graph is cut there, see
    :mod:`obdprune.channel_graph`, and only the channels before the op keep their units), when nothing
    reads them, or when the user keeps them. Where the channel graph library (Torch-Pruning) fails on
    an op, the graph is cut at that op and the reason names it; nothing it raises escapes.

    Example:
        >>> from obdprune.models.cnn import resnet20
        >>> a = unit_analysis(resnet20((3, 8, 8), 10, width=4), torch.zeros(1, 3, 8, 8))
        >>> a.groups[0].layer, a.groups[0].producers, a.excluded["14"][0].value
        ('0', ('5.body.3', '4.body.3', '3.body.3'), 'output layer')
    """
    scratch = copy.deepcopy(model).eval()
    for p in scratch.parameters():
        p.requires_grad_(True)
    names = {m: n for n, m in scratch.named_modules()}
    protected = _protected(scratch, keep)
    calls: dict[str, int] = {}
    layer_gfs: dict[Any, str] = {}

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        calls[names[mod]] = calls.get(names[mod], 0) + 1
        layer_gfs[out.grad_fn] = names[mod]

    layers = prunable_layers(scratch)
    handles = [m.register_forward_hook(hook) for _, m in layers]
    x = _autograd_ready(example_inputs[:1])
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            outputs = scratch(x)
        finally:
            for h in handles:
                h.remove()
        try:
            graph = build_graph(scratch, x)
        except GraphFailure as e:  # the graph library cannot trace this model at all
            return UnitAnalysis((), {n: (Exclusion.UNSUPPORTED, str(e)) for n, _ in layers})
    dg = graph.dg
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else [t for t in outputs if isinstance(t, torch.Tensor)]
    at_output = _layer_outputs_feeding_model_outputs(outputs, layer_gfs)

    groups: list[UnitLayer] = []
    nonzero_ops: dict[str, list[str]] = {}
    excluded: dict[str, tuple[Exclusion, str]] = {}
    covered: set[str] = set()
    for name, m in layers:
        if name in covered:
            continue
        if m not in dg.module2node:
            excluded[name] = (Exclusion.UNSUPPORTED, "not reached when the model runs")
            continue
        try:
            group, producers, nonzero_ops[name] = _coupled_group(graph, m, names, at_output)
            covered.update(producers)
            shared = [p for p in group.layers if calls.get(p) != 1]
            if shared:
                raise _excluded_with(Exclusion.UNSUPPORTED, f"{shared[0]!r} is called {calls.get(shared[0], 0)} times",
                                     group.layers)
            kept = [p for p in group.layers if p in protected]
            if kept:
                raise _excluded_with(Exclusion.PROTECTED, f"keep {kept[0]!r}" + (
                    f", tied to {', '.join(p for p in group.layers if p != kept[0])}" if len(group.layers) > 1 else ""),
                    group.layers)
            groups.append(group)
        except _Excluded as err:
            for p in err.layers or [name]:
                covered.add(p)
                excluded.setdefault(p, (err.kind, err.detail))
    if groups:
        ok = _probe_dead(scratch, x, groups)
        for g, good in zip(list(groups), ok):
            if not good:
                groups.remove(g)
                ops = ", ".join(nonzero_ops[g.layer]) or "an op on the way"
                for p in g.layers:
                    excluded[p] = (Exclusion.UNSUPPORTED, f"{ops} does not keep a zeroed unit at zero")
    order = {n: i for i, (n, _) in enumerate(layers)}
    return UnitAnalysis(tuple(groups), dict(sorted(excluded.items(), key=lambda kv: order[kv[0]])))


def _excluded_with(kind: Exclusion, detail: str, layers: Sequence[str]) -> _Excluded:
    err = _Excluded(kind, detail)
    err.layers = list(layers)
    return err


def unit_groups(model: nn.Module, example_inputs: torch.Tensor, *, keep: Sequence[str] = ()) -> list[UnitLayer]:
    """The removable (coupled) units of the Conv2d/Linear layers of ``model``, in module order; see
    :func:`unit_analysis`, which also says why the other layers have none."""
    return list(unit_analysis(model, example_inputs, keep=keep).groups)


def _autograd_ready(x: torch.Tensor) -> torch.Tensor:
    # Standard strides: an input whose strides also read as channels_last (C = 1) makes global
    # pooling + flatten trace as as_strided, which hides the channel structure.
    return x.clone(memory_format=torch.contiguous_format)


def unit_floor(units: int, layer_floor: float, min_units: int = DEFAULT_MIN_UNITS) -> int:
    """Units a layer always keeps: ``max(min_units, ceil(layer_floor * units))``, or all of its ``units``
    when it has fewer.

    >>> unit_floor(64, 0.01), unit_floor(3, 0.01), unit_floor(64, 0.01, min_units=1), unit_floor(64, 0.5)
    (4, 3, 1, 32)
    """
    if min_units < 1:
        raise UsageError(f"min units must be >= 1, got {min_units}")
    return min(units, max(1, min_units, math.ceil(layer_floor * units)))


def removed_units(group: UnitLayer, current: MaskSet | None) -> torch.Tensor:
    """(units,) bool: units whose incoming weights ``current`` prunes entirely."""
    if current is None or group.weight not in current.masks:
        return torch.zeros(group.units, dtype=torch.bool)
    alive = current[group.weight].reshape(group.weight_shape[0], -1).any(dim=1).cpu()
    return ~alive.view(group.blocks, group.units).any(dim=0)


def max_unit_sparsity(groups: Sequence[UnitLayer], total_weights: int, layer_floor: float,
                      scope: Scope | str = Scope.GLOBAL, min_units: int = DEFAULT_MIN_UNITS) -> float:
    """Largest sparsity (fraction of ``total_weights``) :func:`select_unit_masks` can reach while every
    layer keeps its floor of units (floored to 1e-6)."""
    if not groups:
        return 0.0
    floors = [unit_floor(g.units, layer_floor, min_units) for g in groups]
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
    layer_floor: float = DEFAULT_LAYER_FLOOR,
    min_units: int = DEFAULT_MIN_UNITS,
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
    layer_floor, min_units: every layer keeps :func:`unit_floor` units; a target that cannot be met
      under that floor raises UsageError.
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
    floors = [unit_floor(g.units, layer_floor, min_units) for g in groups]
    keep: list[torch.Tensor] = []
    if scope is Scope.LAYER:
        for g, s, b, f in zip(groups, scores, before, floors):
            n_remove = int(round(sparsity * g.units))
            if g.units - n_remove < f:
                raise UsageError(
                    f"sparsity {sparsity} would leave {g.layer!r} with {g.units - n_remove} of {g.units} units, "
                    f"below its floor of {f}; lower the target, the layer floor or the min units")
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
                f"remove at most {removable} while every layer keeps its floor; lower the target, the layer floor or "
                f"the min units")
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
    shared: dict[str, torch.Tensor] = {}  # coupled members some groups share (a BatchNorm after a concatenation)
    for g, kk in zip(groups, keep):
        for p, shape, rows in g.members():
            if rows is None:
                m = kk.reshape((g.units,) + (1,) * (len(shape) - 1)).expand(shape).clone()
                if current is not None and p in current.masks:
                    m = m.to(current[p].device) & current[p]
                out[p] = m
                continue
            if p not in shared:
                base = current[p].clone() if current is not None and p in current.masks else torch.ones(shape, dtype=torch.bool)
                shared[p] = base
            m = shared[p]
            m.view(shape[0], -1)[rows[~kk.to(rows.device)].to(m.device)] = False
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
