"""Physically remove dead units (filters / neurons) from a pruned model.

Masks alone change neither run time nor file size; this module turns a model whose pruned weights
are exactly 0.0 into a smaller dense model that computes the same function.

* :func:`find_dead_units` decides, exactly and conservatively, which output units of each
  Conv/Linear layer can be removed without changing the model's outputs.
* :func:`compact` removes them with Torch-Pruning's DependencyGraph, which also removes the
  matching BatchNorm entries, biases and the inputs of the following layer(s) (through Flatten,
  residual additions and concatenations).
* :func:`resize_to_state_dict` rebuilds the layer shapes of a compacted model from a fresh dense
  architecture and a saved state_dict, so compacted models load back without pickles.

How deadness is decided (per channel ``c`` of a Torch-Pruning group, i.e. the set of channels
that must be removed together -- a conv output, its BatchNorm, every tensor added to it in a
residual sum, and the matching inputs of every layer that reads it):

1. every node of the group must be an op whose channel structure we understand (conv, linear --
   on (N, features) or a channels-last (N, *, features) input --, batch norm, channel-wise
   activations/pooling, flatten, add/mul of aligned tensors, cat on dim 1); otherwise no channel of
   the group is removed. Each node's channel dim is tracked (1 after a conv, the last after a
   Linear, moved by a permute), and an op that expects the channels elsewhere stops the group. The
   graph is built by :func:`obdprune.channel_graph.build_graph`, cut at ops that move channels to
   other positions (a channel shuffle): the tensor before the cut counts as a model output;
2. no tensor of the group may be a model output (its units are never removed);
3. for every layer that reads channel ``c`` (consumer conv/linear, after Flatten ``c`` becomes
   H*W consecutive inputs), each input position either has all-zero weights in the consumer or
   carries a value that is identically zero for every model input;
4. a grouped conv (``groups`` = g, not depthwise) in the group must stay valid: of its output
   channels as many go from each group, of its input channels the same positions in each group
   (the largest such part of the dead channels is removed, the rest stays).

"Identically zero" is decided by propagating per-channel constants forward through the graph:
a conv/linear channel whose weights that meet non-zero inputs are all zero is the constant
``bias``; a BatchNorm channel with zero scale is the constant ``shift`` (and zero when its input
is zero and its shift and running mean are zero); ReLU / ReLU6 / Hardtanh clamp constants (so
ReLU of a non-positive constant is zero); ELU, GELU, SiLU, tanh, pooling, ... keep zeros zero;
Sigmoid, Softplus, adding a constant, ... do not, so such a unit is kept unless nothing reads
it. A sum of coupled channels is zero only when every summand is zero, so a channel dead in
just one branch of a residual block is kept.

Removing dead units can make others dead (their only readers disappear); the analysis zeroes
dead units in a scratch copy and repeats until nothing changes. :func:`compact` then checks
that the compacted model reproduces the original outputs and refuses (per group) any removal
that does not.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops as tp_ops

from obdprune.autograd_ops import (BINARY_OPS, CHANNELWISE_UNARY_OPS, CONST_PRESERVING_OPS, SHAPE_OPS,
                                   SPATIAL_REDUCE_OPS, normalized_dims, op_name, reduces_only_spatial_dims)
from obdprune.channel_graph import GraphFailure, build_graph
from obdprune.errors import ModelFileError, UsageError
from obdprune.layers import BATCH_NORM_TYPES, COMPACTABLE_TYPES, CONV_TYPES, is_depthwise, is_grouped

__all__ = ["find_dead_units", "compact", "resize_to_state_dict", "count_units"]


def _flatten_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _flatten_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flatten_tensors(v)]
    return []


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return model(*example_inputs)
    raise UsageError("example_inputs must be a tensor, a tuple/list of tensors or a dict of tensors")


def _autograd_ready(example_inputs: Any) -> Any:
    """Inputs usable by autograd tracing (inference-mode tensors are copied)."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs.clone() if example_inputs.is_inference() else example_inputs
    if isinstance(example_inputs, Mapping):
        return {k: _autograd_ready(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (list, tuple)):
        return type(example_inputs)(_autograd_ready(v) for v in example_inputs)
    return example_inputs


def _reads_input(m: nn.Module) -> torch.Tensor:
    """(in_channels,) bool: input channels some nonzero weight of the Conv/Linear ``m`` reads."""
    w = m.weight.detach()
    groups = getattr(m, "groups", 1)
    nz = (w != 0).transpose(0, 1).reshape(w.shape[1], groups, -1).any(dim=2)  # (in/groups, groups)
    return nz.T.reshape(-1)  # input channel c = group * (in/groups) + position


def _input_columns(m: nn.Module, channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of ``m.weight`` that read the input ``channels`` (grouped convs read a channel
    with the filters of its group only)."""
    groups = getattr(m, "groups", 1)
    per_in, per_out = m.weight.shape[1], m.weight.shape[0] // groups
    rows = (channels // per_in).unsqueeze(1) * per_out + torch.arange(per_out)  # (k, per_out)
    return rows, (channels % per_in).unsqueeze(1).expand_as(rows)


def _equal_groups(dg: tp.DependencyGraph, items: list[Any], dead: torch.Tensor) -> torch.Tensor:
    """The largest part of ``dead`` (bool over the root's channels) whose removal keeps every grouped conv
    of the group valid: as many output channels gone from each of its groups, and of its input channels
    the same positions in each group. A grouped conv otherwise could not be rebuilt."""
    dead = dead.clone()
    changed = True
    while changed:
        changed = False
        for it in items:
            m = it.dep.target.module
            if not is_grouped(m):
                continue
            out = dg.is_out_channel_pruning_fn(it.dep.handler)
            n = m.out_channels if out else m.in_channels
            size = n // m.groups
            roots = torch.as_tensor(list(it.root_idxs), dtype=torch.long)
            idx = torch.as_tensor(list(it.idxs), dtype=torch.long)
            here = torch.zeros(n, dtype=torch.bool)
            here[idx[dead[roots]]] = True
            grid = here.view(m.groups, size)
            if out:  # keep the first `least` dead channels of every group
                least = int(grid.sum(dim=1).min())
                keep = grid & (grid.cumsum(dim=1) <= least)
            else:
                keep = grid.all(dim=0, keepdim=True).expand_as(grid)
            undead = (grid & ~keep).reshape(-1)
            back = undead[idx]
            if back.any():
                dead[roots[back]] = False
                changed = True
    return dead


def _compactable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers whose output units compact can remove, in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, COMPACTABLE_TYPES)]


def _n_out(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def count_units(model: nn.Module) -> dict[str, int]:
    """Number of output units (filters / neurons) of each Conv/Linear layer, by dotted name."""
    return {n: _n_out(m) for n, m in _compactable_layers(model)}


# --------------------------------------------------------------------------------------------
# Tracing: Torch-Pruning's graph plus what it does not record (shapes, operand order, outputs).
# --------------------------------------------------------------------------------------------


@dataclass
class _Trace:
    dg: tp.DependencyGraph
    gf2node: dict[Any, Any]
    shapes: dict[Any, tuple[int, ...]]  # grad_fn -> output shape
    module_input: dict[nn.Module, Any]  # module -> grad_fn of its (single-call) input, or None
    module_in_shape: dict[nn.Module, tuple[int, ...]]
    reused: set[nn.Module]
    output_gfs: set[Any]
    inside: dict[Any, str]  # ops a Linear runs on an (N, *, features) input
    consts: dict[Any, torch.Tensor | None] = field(default_factory=dict)  # node -> channel consts
    axes: dict[Any, int | None] = field(default_factory=dict)  # node -> dim of its output that holds the channels


def _trace(model: nn.Module, example_inputs: Any) -> _Trace:
    """Build the dependency graph of ``model`` (modified: eval mode, requires_grad) and record
    each node's output shape via backward pre-hooks."""
    calls: dict[nn.Module, list[tuple[Any, tuple[int, ...]]]] = {}
    kept: dict[str, Any] = {}

    def hook(mod: nn.Module, args: tuple, _out: Any) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        calls.setdefault(mod, []).append(
            (x.grad_fn if x is not None else None, tuple(x.shape) if x is not None else ())
        )

    def forward_fn(m: nn.Module, inputs: Any) -> Any:
        calls.clear()
        handles = [
            sub.register_forward_hook(hook)
            for sub in m.modules()
            if isinstance(sub, (*COMPACTABLE_TYPES, *BATCH_NORM_TYPES))
        ]
        try:
            out = _call(m, inputs)
        finally:
            for h in handles:
                h.remove()
        kept["out"] = out
        return out

    for p in model.parameters():
        p.requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = build_graph(model, _autograd_ready(example_inputs), forward_fn)
        dg = graph.dg
        outputs = [t for t in _flatten_tensors(kept["out"]) if t.grad_fn is not None]
        # the tensors before a cut of the graph (a channel shuffle) count as outputs: their channels stay
        outputs += graph.cut_inputs
        gf2node = {node.grad_fn: node for node in dg.module2node.values()}
        shapes: dict[Any, tuple[int, ...]] = {}
        handles = []
        for gf in gf2node:
            if gf is None:
                continue

            def pre(grad_outputs: tuple, gf: Any = gf) -> None:
                for g in grad_outputs:
                    if g is not None:
                        shapes[gf] = tuple(g.shape)
                        break

            handles.append(gf.register_prehook(pre))
        params = list(model.parameters())
        if outputs and params:
            torch.autograd.grad(
                outputs,
                params,
                grad_outputs=[torch.ones_like(o) for o in outputs],
                retain_graph=True,
                allow_unused=True,
            )
        for h in handles:
            h.remove()
    module_input = {m: c[0][0] for m, c in calls.items()}
    module_in_shape = {m: c[0][1] for m, c in calls.items()}
    reused = {m for m, c in calls.items() if len(c) > 1}
    tr = _Trace(
        dg=dg,
        gf2node=gf2node,
        shapes=shapes,
        module_input=module_input,
        module_in_shape=module_in_shape,
        reused=reused,
        output_gfs={o.grad_fn for o in outputs},
        inside=graph.inside,
    )
    _find_axes(tr)
    return tr


def _find_axes(tr: _Trace) -> None:
    """Fill ``tr.axes``: the dim of each node's output that holds the channels its producers number (1 for
    a conv or BatchNorm, the last for a Linear, moved by a permute), None where it is not known (after a
    norm, a pooling of another layout, operands that disagree). Iterative post-order over the operands."""
    for start in tr.gf2node.values():
        stack = [(start, False)]
        while stack:
            n, ready = stack.pop()
            if n in tr.axes:
                continue
            deps = [o for o in _operands(tr, n) if o is not None] if _is_function_op(n) else []
            if not ready:
                stack.append((n, True))
                stack.extend((d, False) for d in deps if d not in tr.axes)
                continue
            tr.axes[n] = _axis_rule(tr, n, [tr.axes.get(d) for d in deps])


def _axis_rule(tr: _Trace, node: Any, operand_axes: list[int | None]) -> int | None:
    shape = _shape_of(tr, node)
    if shape is None or len(shape) < 2:
        return None
    t, m = node.type, node.module
    if t in (tp_ops.OPTYPE.CONV, tp_ops.OPTYPE.DEPTHWISE_CONV, tp_ops.OPTYPE.BN):
        return 1
    if t == tp_ops.OPTYPE.LINEAR:
        return len(shape) - 1
    if not _is_function_op(node) or not operand_axes or None in operand_axes or len(set(operand_axes)) != 1:
        return None
    axis, gf = operand_axes[0], node.grad_fn
    name = op_name(gf)
    if name == "PermuteBackward":
        perm = [normalized_dims([d], len(shape)).pop() for d in gf._saved_dims]
        return perm.index(axis) if axis in perm else None
    if t in (tp_ops.OPTYPE.CONCAT, tp_ops.OPTYPE.SPLIT, tp_ops.OPTYPE.RESHAPE) or name.startswith(SHAPE_OPS) or (
            gf is not None and gf.name() in SPATIAL_REDUCE_OPS) or "Pool" in name or "Upsample" in name:
        return 1 if axis == 1 else None  # ops that find the channels at dim 1
    first = next(o for o in _operands(tr, node) if o is not None)
    return axis if len(shape) == len(_shape_of(tr, first) or ()) else None  # pointwise ops keep the layout


_FUNCTION_OPS = tuple(getattr(tp_ops, n) for n in ("_ConcatOp", "_SplitOp", "_UnbindOp", "_ReshapeOp", "_SliceOp",
                                                    "_OutputOp", "_ElementWiseOp", "_ExpandOp") if hasattr(tp_ops, n))


def _is_function_op(node: Any) -> bool:
    """Whether the graph node is an autograd op rather than a layer (module)."""
    return isinstance(node.module, _FUNCTION_OPS)


def _width(tr: _Trace, node: Any) -> int | None:
    """Channels of ``node``'s output (the size of its channel dim), None when unknown."""
    axis, shape = tr.axes.get(node), _shape_of(tr, node)
    return shape[axis] if axis is not None and shape is not None else None


def _input_axis(tr: _Trace, m: nn.Module) -> int | None:
    """The channel dim of the input of module ``m`` (1 for the network input)."""
    gf = tr.module_input.get(m)
    if gf is None:
        return 1
    node = tr.gf2node.get(gf)
    return tr.axes.get(node) if node is not None else None


def _operands(tr: _Trace, node: Any) -> list[Any]:
    """Operand nodes of ``node`` in call order; ``None`` for an operand the graph does not track
    (a constant, a buffer, the model input)."""
    gf = node.grad_fn
    if gf is None or not hasattr(gf, "next_functions"):
        return []
    return [tr.gf2node.get(f) if f is not None else None for f, _ in gf.next_functions]


def _shape_of(tr: _Trace, node: Any) -> tuple[int, ...] | None:
    return tr.shapes.get(node.grad_fn)


def _shape_op_kind(tr: _Trace, node: Any) -> str | None:
    """For view/reshape/squeeze nodes: ``"same"`` (batch and channel dims unchanged),
    ``"flatten"`` ((N, C, *S) -> (N, C*prod(S))) or ``None`` (anything else)."""
    ins = _operands(tr, node)
    if len(ins) != 1 or ins[0] is None:
        return None
    s_in, s_out = _shape_of(tr, ins[0]), _shape_of(tr, node)
    if s_in is None or s_out is None or len(s_in) < 2 or len(s_out) < 2 or s_in[0] != s_out[0]:
        return None
    if s_in[1] == s_out[1] and math.prod(s_in[2:]) == math.prod(s_out[2:]):
        return "same"
    if len(s_out) == 2 and s_out[1] == math.prod(s_in[1:]):
        return "flatten"
    return None


def _scalar_operand(gf: Any, index: int) -> torch.Tensor | None:
    """The saved constant operand ``index`` of a Mul/Div node when it is a finite scalar."""
    attr = "_saved_self" if index == 0 else "_saved_other"
    try:
        v = getattr(gf, attr)
    except Exception:
        return None
    if isinstance(v, torch.Tensor) and v.numel() == 1 and bool(torch.isfinite(v).all()):
        return v
    return None


def _node_ok(tr: _Trace, node: Any, reader: bool = False) -> bool:
    """Whether removing a channel of this node's tensor (of its input, for a ``reader``) is
    structurally safe (see the module docstring)."""
    if not reader and (node.grad_fn in tr.output_gfs or node.type == tp_ops.OPTYPE.OUTPUT):
        return False
    m = node.module
    if isinstance(m, nn.Module) and m in tr.reused:
        return False
    if node.grad_fn in tr.inside:
        return True  # the Linear it belongs to is checked as a node of its own
    t = node.type
    if t in (tp_ops.OPTYPE.CONV, tp_ops.OPTYPE.DEPTHWISE_CONV):
        if not isinstance(m, CONV_TYPES):
            return False  # not transposed convs
        if is_depthwise(m) and not reader and not node.inputs:
            return False  # its input channels come from no layer (the network input, a channel shuffle)
        return _input_axis(tr, m) == 1 or not (reader or is_depthwise(m))
    if t == tp_ops.OPTYPE.LINEAR:  # on (N, features) or channels-last (N, *, features) inputs
        n_in = len(tr.module_in_shape.get(m, ()))
        return n_in >= 2 and (not reader or _input_axis(tr, m) == n_in - 1)
    if t == tp_ops.OPTYPE.BN:
        return _input_axis(tr, m) == 1
    if t == tp_ops.OPTYPE.RESHAPE:
        return _shape_op_kind(tr, node) is not None and tr.axes.get(node) == 1
    if t == tp_ops.OPTYPE.CONCAT:
        gf = node.grad_fn
        s = _shape_of(tr, node)
        ops_ = _operands(tr, node)
        return (
            s is not None
            and tr.axes.get(node) == 1
            and hasattr(gf, "_saved_dim")
            and normalized_dims([gf._saved_dim], len(s)) == {1}
            and all(o is not None for o in ops_)
        )
    if t != tp_ops.OPTYPE.ELEMENTWISE:
        return False
    gf = node.grad_fn
    name = op_name(gf)
    full = gf.name() if gf is not None else ""
    if name == "TBackward" and not node.inputs:
        return True  # the transposed weight of a Linear
    if name in CHANNELWISE_UNARY_OPS:
        return len([o for o in _operands(tr, node) if o is not None]) == 1 and tr.axes.get(node) is not None
    if name.startswith(SHAPE_OPS):
        return _shape_op_kind(tr, node) is not None and tr.axes.get(node) == 1
    if full in SPATIAL_REDUCE_OPS:
        return reduces_only_spatial_dims(gf) and tr.axes.get(node) == 1
    if full in BINARY_OPS:
        ops_ = _operands(tr, node)
        c_out = _width(tr, node)
        if c_out is None:
            return False
        for i, o in enumerate(ops_):
            if o is None:
                if name not in ("MulBackward", "DivBackward") or (name == "DivBackward" and i == 0):
                    return False
                if _scalar_operand(gf, i) is None:
                    return False
            elif _width(tr, o) != c_out:
                return False
        return True
    return False


# --------------------------------------------------------------------------------------------
# Constant propagation: which channels are identically zero (or another constant)
# --------------------------------------------------------------------------------------------


def _input_zero(tr: _Trace, module: nn.Module, length: int) -> torch.Tensor:
    """Bool (length,): True where the input channel of ``module`` (along the dim it reads: 1 for a conv or
    BatchNorm, the last for a Linear) is identically zero."""
    gf = tr.module_input.get(module)
    node = tr.gf2node.get(gf) if gf is not None else None
    const = _const(tr, node) if node is not None else None
    reads = len(tr.module_in_shape.get(module, ())) - 1 if isinstance(module, nn.Linear) else 1
    if const is None or const.numel() != length or tr.axes.get(node) != reads:
        return torch.zeros(length, dtype=torch.bool)
    return const == 0


def _const(tr: _Trace, node: Any) -> torch.Tensor | None:
    """Float64 vector over the channel dim (dim 1) of ``node``'s output: the value a channel has
    at every position for every model input, NaN where it is not provably constant; None when
    the channel count is unknown. Iterative post-order over the graph."""
    if node in tr.consts:
        return tr.consts[node]
    stack = [(node, False)]
    while stack:
        n, ready = stack.pop()
        if n in tr.consts:
            continue
        m = n.module
        if isinstance(m, nn.Module) and m in tr.module_input:
            gf_in = tr.module_input[m]
            n_in = tr.gf2node.get(gf_in) if gf_in is not None else None
            deps = [n_in] if n_in is not None else []
        else:
            deps = [o for o in _operands(tr, n) if o is not None]
        if not ready:
            stack.append((n, True))
            stack.extend((d, False) for d in deps if d not in tr.consts)
            continue
        tr.consts[n] = _compute_const(tr, n)
    return tr.consts[node]


def _zero_only(v: torch.Tensor) -> torch.Tensor:
    """Keep the zeros of ``v`` (f(0) == 0 ops), forget other constants."""
    return torch.where(v == 0, torch.zeros_like(v), torch.full_like(v, math.nan))


@torch.no_grad()
def _compute_const(tr: _Trace, node: Any) -> torch.Tensor | None:
    c = _width(tr, node)
    if c is None:
        return None
    unknown = torch.full((c,), math.nan, dtype=torch.float64)
    m = node.module
    if isinstance(m, nn.Module) and m in tr.reused:
        return unknown
    t = node.type
    if t in (tp_ops.OPTYPE.CONV, tp_ops.OPTYPE.DEPTHWISE_CONV, tp_ops.OPTYPE.LINEAR):
        if not isinstance(m, COMPACTABLE_TYPES) or _n_out(m) != c:
            return unknown
        w = m.weight.detach()
        groups = getattr(m, "groups", 1)
        in_zero = _input_zero(tr, m, w.shape[1] * groups)
        nz = (w != 0).reshape(w.shape[0], w.shape[1], -1).any(dim=2)  # (out, in/groups)
        out_group = torch.arange(w.shape[0]) // (w.shape[0] // groups)
        live_in = ~in_zero.view(groups, w.shape[1])[out_group]  # (out, in/groups)
        # Only zero inputs may be ignored: a constant non-zero input is not constant after a
        # zero-padded conv, and a weighted sum of constants is not exactly predictable.
        const_out = ~(nz & live_in).any(dim=1)
        bias = m.bias.detach().double() if m.bias is not None else torch.zeros(c, dtype=torch.float64)
        return torch.where(const_out, bias, unknown)
    if t == tp_ops.OPTYPE.BN:
        if not isinstance(m, BATCH_NORM_TYPES) or m.num_features != c:
            return unknown
        in_zero = _input_zero(tr, m, c)
        mean = m.running_mean if m.running_mean is not None else torch.zeros(c)
        if m.affine:
            gamma, beta = m.weight.detach(), m.bias.detach().double()
            out = torch.where(gamma == 0, beta, unknown)  # 0 * x_hat + beta
            return torch.where(in_zero & (beta == 0) & (mean == 0), torch.zeros_like(out), out)
        return torch.where(in_zero & (mean == 0), torch.zeros(c, dtype=torch.float64), unknown)
    ops_ = _operands(tr, node)
    ins = [_const(tr, o) if o is not None else None for o in ops_]
    if t == tp_ops.OPTYPE.CONCAT:
        if not _node_ok(tr, node):
            return unknown
        parts = []
        for o, v in zip(ops_, ins):
            ch = _width(tr, o)
            if ch is None:
                return unknown
            parts.append(v if v is not None and v.numel() == ch else torch.full((ch,), math.nan, dtype=torch.float64))
        out = torch.cat(parts)
        return out if out.numel() == c else unknown
    if t == tp_ops.OPTYPE.RESHAPE or (
        t == tp_ops.OPTYPE.ELEMENTWISE and op_name(node.grad_fn).startswith(SHAPE_OPS)
    ):
        kind = _shape_op_kind(tr, node)
        v = ins[0] if ins else None
        if kind is None or v is None:
            return unknown
        out = v if kind == "same" else v.repeat_interleave(c // v.numel())
        return out.clone() if out.numel() == c else unknown
    if t != tp_ops.OPTYPE.ELEMENTWISE or not _node_ok(tr, node):
        return unknown
    gf = node.grad_fn
    name, full = op_name(gf), gf.name()
    tracked = [v for o, v in zip(ops_, ins) if o is not None]
    if not tracked or any(v is None or v.numel() != c for v in tracked):
        return unknown
    v = tracked[0]
    if name == "ReluBackward":
        return v.clamp(min=0.0)  # NaN stays NaN
    if name == "HardtanhBackward":
        return v.clamp(min=float(gf._saved_min_val), max=float(gf._saved_max_val))
    if name in CONST_PRESERVING_OPS:
        return v.clone()
    if name in CHANNELWISE_UNARY_OPS:
        return _zero_only(v) if CHANNELWISE_UNARY_OPS[name] else unknown
    if full in SPATIAL_REDUCE_OPS:
        return _zero_only(v)
    if full in ("AddBackward0", "SubBackward0"):
        zero = torch.stack([u == 0 for u in tracked]).all(dim=0)
        return torch.where(zero, torch.zeros_like(v), unknown)
    if full == "MulBackward0":
        zero = torch.stack([u == 0 for u in tracked]).any(dim=0)
        return torch.where(zero, torch.zeros_like(v), unknown)
    if full == "DivBackward0" and len(tracked) == 1 and ops_[0] is not None:
        s = _scalar_operand(gf, 1)
        return _zero_only(v) if s is not None and float(s) != 0.0 else unknown
    return unknown


# --------------------------------------------------------------------------------------------
# Group analysis
# --------------------------------------------------------------------------------------------


def _out_fn(dg: tp.DependencyGraph, m: nn.Module) -> Any:
    return dg.get_pruner_of_module(m).prune_out_channels


def _role(dg: tp.DependencyGraph, item: Any) -> str:
    """``producer`` / ``reader`` / ``channelwise`` (BN, depthwise conv) / ``other``."""
    m = item.dep.target.module
    if isinstance(m, BATCH_NORM_TYPES) or is_depthwise(m):
        return "channelwise"
    if isinstance(m, COMPACTABLE_TYPES):
        return "producer" if dg.is_out_channel_pruning_fn(item.dep.handler) else "reader"
    return "other"


@dataclass
class _Group:
    root: nn.Module
    items: list[Any]
    ok: bool
    dead: torch.Tensor  # bool over root channels
    dg: tp.DependencyGraph


@torch.no_grad()
def _analyse_groups(model: nn.Module, example_inputs: Any) -> tuple[_Trace, list[_Group]]:
    """Trace ``model`` (which is modified: eval mode, requires_grad) and decide, for every
    channel group, which root channels are dead. No 'keep one' rule here."""
    tr = _trace(model, example_inputs)
    dg = tr.dg
    covered: set[nn.Module] = set()
    groups: list[_Group] = []
    for _, m in _compactable_layers(model):
        if m in covered or m not in dg.module2node:
            continue
        n = _n_out(m)
        try:
            with torch.enable_grad():
                items = list(dg.get_pruning_group(m, _out_fn(dg, m), list(range(n))).items)
        except Exception:  # the graph library cannot map this layer's channels: it keeps them
            covered.add(m)
            groups.append(_Group(root=m, items=[], ok=False, dead=torch.zeros(n, dtype=torch.bool), dg=dg))
            continue
        for it in items:
            if _role(dg, it) in ("producer", "channelwise"):
                covered.add(it.dep.target.module)
        ok = all(_node_ok(tr, it.dep.target, _role(dg, it) == "reader") for it in items)
        dead = torch.zeros(n, dtype=torch.bool)
        if ok:
            dead[:] = True
            for it in items:
                if _role(dg, it) != "reader":
                    continue
                reader = it.dep.target.module
                idx = torch.as_tensor(list(it.idxs), dtype=torch.long)
                roots = torch.as_tensor(list(it.root_idxs), dtype=torch.long)
                col_nz = _reads_input(reader)  # (in,)
                in_zero = _input_zero(tr, reader, col_nz.numel())
                contributes = col_nz[idx] & ~in_zero[idx]
                dead[roots[contributes]] = False
            dead = _equal_groups(dg, items, dead)
        groups.append(_Group(root=m, items=items, ok=ok, dead=dead, dg=dg))
    return tr, groups


@torch.no_grad()
def _zero_dead(dg: tp.DependencyGraph, group: _Group) -> None:
    """Set every slice that belongs to a dead channel of ``group`` to zero (function-preserving:
    a dead channel contributes nothing anyway)."""
    for it in group.items:
        role = _role(dg, it)
        if role == "other":
            continue
        roots = torch.as_tensor(list(it.root_idxs), dtype=torch.long)
        idx = torch.as_tensor(list(it.idxs), dtype=torch.long)[group.dead[roots]]
        if idx.numel() == 0:
            continue
        m = it.dep.target.module
        if role == "reader":
            m.weight[_input_columns(m, idx)] = 0
            continue
        if isinstance(m, BATCH_NORM_TYPES) and not m.affine:
            continue
        m.weight[idx] = 0
        if m.bias is not None:
            m.bias[idx] = 0


def _first_sample(example_inputs: Any) -> Any:
    """Batch of one for tracing (the analysis does not depend on the batch size), in the default memory
    format: a (N, 1, H, W) slice can have strides that also read as channels_last, and then reshapes
    after pooling trace as as_strided, which the analysis (rightly) refuses to see through."""
    if isinstance(example_inputs, torch.Tensor):
        x = example_inputs[:1] if example_inputs.dim() > 0 and example_inputs.shape[0] > 1 else example_inputs
        return x.clone(memory_format=torch.contiguous_format)
    if isinstance(example_inputs, Mapping):
        return {k: _first_sample(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (list, tuple)):
        return type(example_inputs)(_first_sample(v) for v in example_inputs)
    return example_inputs


def _find_dead(model: nn.Module, example_inputs: Any) -> tuple[dict[str, torch.Tensor], list[_Group], dict[nn.Module, str]]:
    """:func:`find_dead_units` plus the channel groups of the last round (on a scratch copy)
    and the scratch modules' names."""
    if not isinstance(model, nn.Module):
        raise UsageError("expected an nn.Module")
    example_inputs = _first_sample(example_inputs)
    scratch = copy.deepcopy(model)
    names = {m: n for n, m in _compactable_layers(scratch)}
    result = {n: torch.zeros(_n_out(m), dtype=torch.bool) for m, n in names.items()}
    groups: list[_Group] = []
    for _ in range(64):
        tr, groups = _analyse_groups(scratch, example_inputs)
        grew = False
        for g in groups:
            if not g.dead.any():
                continue
            for it in g.items:
                if _role(tr.dg, it) not in ("producer", "channelwise"):
                    continue
                m = it.dep.target.module
                if m not in names:
                    continue  # BatchNorm
                roots = torch.as_tensor(list(it.root_idxs), dtype=torch.long)
                idx = torch.as_tensor(list(it.idxs), dtype=torch.long)[g.dead[roots]]
                mask = result[names[m]]
                grew |= not bool(mask[idx].all())
                mask[idx] = True
            _zero_dead(tr.dg, g)
        if not grew:
            break
    return result, groups, names


@torch.inference_mode(False)  # copies made under inference mode could not be traced
def find_dead_units(model: nn.Module, example_inputs: Any) -> dict[str, torch.Tensor]:
    """Dead output units of every Conv/Linear layer.

    Returns ``{dotted module name: bool tensor of shape (out_units,)}``, True where the unit can
    be removed without changing the model's function (see the module docstring), including
    units that only become dead once other dead units are gone. ``model`` is not modified.
    Units feeding the model's outputs are never dead, nor any unit of a model whose channel graph
    cannot be built (:class:`~obdprune.channel_graph.GraphFailure`).
    """
    try:
        return _find_dead(model, example_inputs)[0]
    except GraphFailure:
        return {n: torch.zeros(_n_out(m), dtype=torch.bool) for n, m in _compactable_layers(model)}


# --------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------


def _random_like_inputs(example_inputs: Any, seed: int) -> Any:
    gen = torch.Generator().manual_seed(seed)

    def rnd(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        if isinstance(x, Mapping):
            return {k: rnd(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(rnd(v) for v in x)
        return x

    return rnd(example_inputs)


@torch.no_grad()
def _max_output_diff(a: nn.Module, b: nn.Module, inputs: list[Any]) -> float:
    """Largest |a(x) - b(x)| relative to max(1, |a(x)|) over ``inputs`` (eval mode); inf on
    shape mismatch or failure."""
    worst = 0.0
    for x in inputs:
        try:
            ya, yb = _flatten_tensors(_call(a, x)), _flatten_tensors(_call(b, x))
        except Exception:
            return math.inf
        if len(ya) != len(yb):
            return math.inf
        for ta, tb in zip(ya, yb):
            if ta.shape != tb.shape:
                return math.inf
            if ta.numel() == 0:
                continue
            ta, tb = ta.double(), tb.double()
            scale = max(1.0, float(ta.abs().max()))
            d = float((ta - tb).abs().max()) / scale
            if math.isnan(d):
                same_nan = bool(torch.equal(torch.isnan(ta), torch.isnan(tb)))
                finite = ~torch.isnan(ta)
                d = float((ta[finite] - tb[finite]).abs().max()) / scale if same_nan and finite.any() else (0.0 if same_nan else math.inf)
            worst = max(worst, d)
    return worst


def _plan(model: nn.Module, example_inputs: Any) -> list[tuple[str, list[int]]]:
    """``[(root module name, root channel indices to remove)]`` for the current model; keeps at
    least one channel in every group so that no layer becomes empty."""
    dead, groups, names = _find_dead(model, example_inputs)
    plan = []
    for g in groups:
        if not g.ok:
            continue
        gone = dead[names[g.root]].clone()
        if gone.all():
            gone[0] = False
        idxs = torch.nonzero(_equal_groups(g.dg, g.items, gone)).flatten().tolist()
        if idxs:
            plan.append((names[g.root], idxs))
    return plan


def _apply(model: nn.Module, example_inputs: Any, plan: list[tuple[str, list[int]]]) -> None:
    """Remove the planned channels in place with Torch-Pruning."""
    was_training = model.training
    modules = dict(model.named_modules())
    with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
        warnings.simplefilter("ignore")
        for p in model.parameters():
            p.requires_grad_(True)
        dg = build_graph(model, _autograd_ready(_first_sample(example_inputs)), _call).dg
        groups = []
        for name, idxs in plan:
            m = modules[name]
            groups.append(dg.get_pruning_group(m, _out_fn(dg, m), idxs))
        for g in groups:
            g.prune()
    model.train(was_training)


def _applied(model: nn.Module, example_inputs: Any, plan: list[tuple[str, list[int]]]) -> nn.Module | None:
    """A copy of ``model`` (eval mode) with the planned channels removed, or None when the graph library
    fails to remove them."""
    candidate = copy.deepcopy(model)
    try:
        _apply(candidate, example_inputs, plan)
    except Exception:
        return None
    return candidate.eval()


@torch.inference_mode(False)
def compact(
    model: nn.Module,
    example_inputs: Any,
    *,
    atol: float = 1e-5,
    max_rounds: int = 8,
) -> nn.Module:
    """A new, physically smaller model computing the same function as ``model``.

    Dead units (see :func:`find_dead_units`) are removed together with their BatchNorm entries,
    biases and the matching inputs of the following layer(s); repeated until nothing is dead.
    ``example_inputs`` (a tensor, a tuple of tensors or a dict) is used for tracing and for the
    final check: outputs in eval mode must match ``model`` to ``atol`` (relative to max(1,|y|))
    on ``example_inputs`` and on random inputs of the same shapes. A removal that fails the
    check is skipped with a warning. ``model`` is not modified.
    """
    if not isinstance(model, nn.Module):
        raise UsageError("compact expects an nn.Module")
    was_training = model.training
    reference = copy.deepcopy(model).eval()
    checks = [example_inputs, _random_like_inputs(example_inputs, 0), _random_like_inputs(example_inputs, 1)]
    current = copy.deepcopy(model).eval()
    refused: set[tuple[str, tuple[int, ...]]] = set()
    for _ in range(max_rounds):
        try:
            plan = [step for step in _plan(current, example_inputs) if (step[0], tuple(step[1])) not in refused]
        except GraphFailure as e:
            warnings.warn(f"compact: nothing removed: {e}", RuntimeWarning, stacklevel=2)
            break
        if not plan:
            break
        candidate = _applied(current, example_inputs, plan)
        if candidate is not None and _max_output_diff(reference, candidate, checks) <= atol:
            current = candidate
            continue
        # Something in the graph is not what the analysis assumed: apply groups one by one.
        applied = False
        for step in plan:
            candidate = _applied(current, example_inputs, [step])
            diff = math.inf if candidate is None else _max_output_diff(reference, candidate, checks)
            if diff <= atol:
                current, applied = candidate, True
            else:
                refused.add((step[0], tuple(step[1])))
                warnings.warn(
                    f"compact: not removing {len(step[1])} unit(s) of {step[0]!r}: "
                    f"outputs would change by {diff:.3g}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if not applied:
            break
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for n, p in current.named_parameters():
        p.requires_grad_(n not in frozen)
    return current.train(was_training)


# --------------------------------------------------------------------------------------------
# Loading compacted weights into a fresh architecture
# --------------------------------------------------------------------------------------------


def _resized(name: str, m: nn.Module, sd: Mapping[str, torch.Tensor]) -> nn.Module | None:
    """A new module like ``m`` with the shapes found in ``sd``; None when unchanged."""
    w = sd.get(f"{name}.weight")
    dev, dt = (m.weight.device, m.weight.dtype) if getattr(m, "weight", None) is not None else (None, None)
    if isinstance(m, nn.Linear):
        if w is None or w.dim() != 2:
            raise ModelFileError(f"state_dict lacks a 2-D '{name}.weight' for a Linear layer")
        if tuple(w.shape) == tuple(m.weight.shape):
            return None
        return nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device=dev, dtype=dt)
    if isinstance(m, CONV_TYPES):
        if w is None or w.dim() != m.weight.dim():
            raise ModelFileError(f"state_dict lacks a {m.weight.dim()}-D '{name}.weight' for a conv layer")
        if tuple(w.shape) == tuple(m.weight.shape):
            return None
        if tuple(w.shape[2:]) != tuple(m.weight.shape[2:]):
            raise ModelFileError(f"'{name}.weight' has kernel {tuple(w.shape[2:])}, the architecture {tuple(m.weight.shape[2:])}")
        out_c = w.shape[0]
        if is_depthwise(m):
            if w.shape[1] != 1:
                raise ModelFileError(f"'{name}.weight' has shape {tuple(w.shape)}; a depthwise conv needs (C, 1, ...)")
            groups, in_c = out_c, out_c
        else:
            groups, in_c = m.groups, w.shape[1] * m.groups
            if out_c % groups:
                raise ModelFileError(f"'{name}.weight' has {out_c} filters, not divisible by groups={groups}")
        return type(m)(
            in_c,
            out_c,
            kernel_size=m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=groups,
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
            device=dev,
            dtype=dt,
        )
    if isinstance(m, BATCH_NORM_TYPES):
        ref = sd.get(f"{name}.running_mean", w)
        if ref is None:
            return None
        if ref.dim() != 1:
            raise ModelFileError(f"'{name}' BatchNorm tensors must be 1-D, got shape {tuple(ref.shape)}")
        if ref.shape[0] == m.num_features:
            return None
        like = m.running_mean if m.running_mean is not None else m.weight
        return type(m)(
            ref.shape[0],
            eps=m.eps,
            momentum=m.momentum,
            affine=m.affine,
            track_running_stats=m.track_running_stats,
            device=like.device if like is not None else None,
            dtype=like.dtype if like is not None else None,
        )
    return None


@torch.inference_mode(False)
def resize_to_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    example_inputs: Any = None,
) -> nn.Module:
    """A copy of ``model`` (a freshly built dense architecture) whose Conv/Linear/BatchNorm
    layers have the shapes in ``state_dict`` (e.g. of a compacted model), loaded with it.

    Layer types and hyper-parameters (kernel, stride, padding, eps, ...) are kept. With
    ``example_inputs`` a forward pass checks that the shapes chain up. Missing/unexpected keys,
    shape mismatches or a failing forward raise :class:`ModelFileError`.
    """
    if not isinstance(model, nn.Module):
        raise UsageError("resize_to_state_dict expects an nn.Module")
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UsageError("state_dict must map names to tensors")
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if not name:
            continue
        new = _resized(name, m, state_dict)
        if new is None:
            continue
        new.train(m.training)
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, attr, new)
    try:
        out.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())
        raise ModelFileError(f"state_dict does not fit the architecture: {first[:400]}") from None
    if example_inputs is not None:
        was = out.training
        out.eval()
        try:
            with torch.no_grad():
                _call(out, example_inputs)
        except Exception as e:
            msg = " ".join(str(e).split())
            raise ModelFileError(f"state_dict shapes are inconsistent: forward pass fails: {msg[:300]}") from None
        finally:
            out.train(was)
    return out
