"""Torch-Pruning's dependency graph, built so that it never has to map channels it cannot follow.

Torch-Pruning guesses how a reshape maps channel indices from the channel counts around it. On a
channel shuffle (``view(N, g, C/g, H, W) → transpose(1, 2) → view(N, C, H, W)``, ShuffleNetV2) the guess
divides by zero or pairs the wrong channels. :func:`build_graph` runs the forward pass under a torch
function mode that *cuts* the graph at every op that moves channels to other positions, called a
**cut**: a view / reshape / flatten / squeeze that splits or merges the channel dim (dim 1) with
another dim, a permute other than channels-first ↔ channels-last, ``channel_shuffle``,
``pixel_shuffle`` and ``pixel_unshuffle``. The op's output is detached, so the graph library sees the
tensor before the cut as one more model output and the tensor after it as one more model input: the
channels before a cut cannot lose units (:attr:`ChannelGraph.cuts` names the op), the layers after it
read channels no layer produces, and everything else keeps its units.

When the graph library still raises (an op this module does not know), the op it failed on is made a
cut too and the graph is built again; :class:`GraphFailure` says which op when that does not help.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Shuffle(nn.Module):
    ...     def forward(self, x):
    ...         return x.view(1, 2, 2, 4, 4).transpose(1, 2).reshape(1, 4, 4, 4)
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), Shuffle(), nn.Conv2d(4, 2, 1))
    >>> g = build_graph(m, torch.zeros(1, 3, 4, 4))
    >>> [c.describe() for c in g.cuts.values()]
    ["a channel shuffle or another reshape of the channels: view (1, 4, 4, 4) → (1, 2, 2, 4, 4) in '1'"]
"""
from __future__ import annotations

import math
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["SHUFFLE", "Cut", "ChannelGraph", "GraphFailure", "build_graph", "failing_node"]

_RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze"})
_PERMUTES = frozenset({"permute", "transpose", "transpose_", "swapaxes", "swapdims", "movedim", "moveaxis"})
_CHANNEL_MOVERS = frozenset({"channel_shuffle", "native_channel_shuffle", "pixel_shuffle", "pixel_unshuffle"})


SHUFFLE = "a channel shuffle or another reshape of the channels"


@dataclass(frozen=True)
class Cut:
    """An op the graph stops at: ``op`` (``"view (1, 16, 4, 4) → (1, 2, 8, 4, 4)"``) run inside module
    ``module`` (dotted name, ``""`` for the model itself), and why (:data:`SHUFFLE`, or the graph library's
    failure there)."""

    op: str
    module: str
    why: str = SHUFFLE

    def describe(self) -> str:
        """``"why: op in 'module'"``, e.g. ``"a channel shuffle or another reshape of the channels: view (1, 8,
        8, 8) → (1, 2, 4, 8, 8) in '1'"``."""
        return f"{self.why}: {self.op}" + (f" in {self.module!r}" if self.module else "")


@dataclass
class ChannelGraph:
    """dg: the dependency graph; outputs: the model's output tensors (of the traced call); cuts:
    {autograd node of a tensor before a cut: the cut}; cut_inputs: those tensors; inside: {autograd node
    inside a Linear layer: its name}, the ops a Linear on an (N, *, features) input runs (flatten to 2-D,
    ``addmm``, view back), which read and write the features where the layer does; op_modules: {autograd
    node of an op's output: the module that ran the op}."""

    dg: tp.DependencyGraph
    outputs: list[torch.Tensor]
    cuts: dict[Any, Cut]
    cut_inputs: list[torch.Tensor]
    inside: dict[Any, str]
    op_modules: dict[Any, str]


class GraphFailure(RuntimeError):
    """The graph library fails on the model even with the op it failed on cut; the message names the op."""


def _perm_of(func: Callable, args: tuple, kwargs: dict, ndim: int) -> tuple[int, ...] | None:
    """The dim permutation a permute-like call applies (run on a meta tensor of distinct sizes)."""
    probe = torch.empty(tuple(range(2, 2 + ndim)), device="meta")
    try:
        out = func(probe, *args[1:], **kwargs)
    except Exception:
        return None
    return tuple(s - 2 for s in out.shape)


def _keeps_channels(name: str, func: Callable, args: tuple, kwargs: dict, x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether an op on an activation ``x`` keeps its channels where the graph library expects them."""
    if name in _CHANNEL_MOVERS:
        return False
    if name in _RESHAPES:
        if x.dim() < 2 or out.dim() < 2 or out.shape[0] != x.shape[0]:
            return x.dim() < 2 and out.dim() < 2
        flatten = out.dim() == 2 and out.shape[1] == math.prod(x.shape[1:])
        return out.shape[1] == x.shape[1] or flatten
    if name in _PERMUTES:
        n = x.dim()
        perm = _perm_of(func, args, kwargs, n)
        if perm is None or n < 3:
            return perm == tuple(range(n))
        to_last, to_first = (0, *range(2, n), 1), (0, n - 1, *range(1, n - 1))
        return perm[:2] == (0, 1) or perm in (to_last, to_first)
    return True


class _CutMode(TorchFunctionMode):
    """Runs every op that moves channels (and the ``force``-d calls, numbered over all ops that return a
    tensor) on detached inputs, recording the activations it was given."""

    def __init__(self, force: dict[int, str], stack: list[str]) -> None:
        super().__init__()
        self.force, self.stack = force, stack
        self.count = 0
        self.calls: dict[Any, tuple[int, str]] = {}  # autograd node of an op's output -> (call number, label)
        self.modules: dict[Any, str] = {}  # autograd node of an op's output -> the module running it
        self.cut_inputs: list[torch.Tensor] = []
        self.cuts: dict[Any, Cut] = {}
        self.model_out: Any = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out
        k, self.count = self.count, self.count + 1
        name = getattr(func, "__name__", str(func)).removesuffix("_")
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        first = args[0] if args else None
        if isinstance(first, (list, tuple)) and first and all(isinstance(t, torch.Tensor) for t in first):
            label = f"{name} [{', '.join(str(tuple(t.shape)) for t in first)}] → {tuple(out.shape)}"
        else:
            label = f"{name} {tuple(x.shape)} → {tuple(out.shape)}" if x is not None else name
        if out.grad_fn is not None and out.grad_fn not in self.calls:  # not an op that returns its input (eval dropout)
            self.calls[out.grad_fn] = (k, label)
            self.modules[out.grad_fn] = self.stack[-1] if self.stack else ""
        moved = x is not None and x.grad_fn is not None and not _keeps_channels(name, func, args, kwargs, x, out)
        if not moved and k not in self.force:
            return out
        cut = Cut(label, self.stack[-1] if self.stack else "", SHUFFLE if moved else self.force[k])
        activations = [t for t in _flatten((args, kwargs)) if t.grad_fn is not None]
        for t in activations:
            if t.grad_fn not in self.cuts:
                self.cut_inputs.append(t)
                self.cuts[t.grad_fn] = cut
        detached = {id(t): t.detach() for t in activations}
        return func(*_swap(args, detached), **_swap(kwargs, detached))


def _swap(obj: Any, new: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return new.get(id(obj), obj)
    if isinstance(obj, dict):
        return {k: _swap(v, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap(v, new) for v in obj)
    return obj


def _ops_between(start: Any, end: Any) -> list[Any]:
    """Autograd nodes on the way back from ``end`` to ``start`` (both excluded), leaves excluded."""
    found, stack = [], [end]
    while stack:
        gf = stack.pop()
        for f, _ in getattr(gf, "next_functions", ()):
            if f is None or f is start or f in found or "AccumulateGrad" in f.name():
                continue
            found.append(f)
            stack.append(f)
    return found


def failing_node(exc: BaseException) -> Any:
    """The graph node Torch-Pruning was working on when it raised ``exc`` (the outermost one its frames
    hold), or None."""
    node = None
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        if "torch_pruning" not in frame.f_code.co_filename:
            continue
        for v in frame.f_locals.values():
            if isinstance(v, tp.dependency.Node):
                node = v
                break
    return node


def _node_label(node: Any) -> str:
    gf = getattr(node, "grad_fn", None)
    return gf.name() if gf is not None and hasattr(gf, "name") else type(getattr(node, "module", node)).__name__


@torch.inference_mode(False)
def build_graph(model: nn.Module, example_inputs: Any, call: Callable[[nn.Module, Any], Any] | None = None,
                *, max_retries: int = 8) -> ChannelGraph:
    """Torch-Pruning's dependency graph of ``model`` on ``example_inputs``, cut at every op that moves
    channels (see the module docstring). ``model`` must already require grad on its parameters.

    call: ``call(model, example_inputs)`` runs the forward pass (default ``model(example_inputs)``).
    Raises :class:`GraphFailure` naming the op when the graph library fails even after cutting there.
    """
    call = call or (lambda m, x: m(x))
    names = {m: n for n, m in model.named_modules()}
    force: dict[int, str] = {}  # call number -> the graph library's failure there
    for _ in range(max_retries + 1):
        stack: list[str] = []
        inside: dict[Any, str] = {}
        modes: list[_CutMode] = []

        def pre(m: nn.Module, _args: Any) -> None:
            stack.append(names.get(m, ""))

        def post(m: nn.Module, args: Any, out: Any) -> None:
            if stack:
                stack.pop()
            if isinstance(m, nn.Linear) and isinstance(out, torch.Tensor) and out.grad_fn is not None:
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                inside.update(dict.fromkeys(_ops_between(x.grad_fn if x is not None else None, out.grad_fn),
                                            names.get(m, "")))

        def forward_fn(m: nn.Module, x: Any) -> Any:
            inside.clear()
            handles = [sub.register_forward_pre_hook(pre) for sub in model.modules()]
            handles += [sub.register_forward_hook(post) for sub in model.modules()]
            mode = _CutMode(force, stack)
            modes.append(mode)
            try:
                with mode:
                    out = call(m, x)
            finally:
                for h in handles:
                    h.remove()
            mode.model_out = out
            return [out, *mode.cut_inputs]

        try:
            with warnings.catch_warnings(), torch.enable_grad():
                warnings.simplefilter("ignore")
                dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                           forward_fn=forward_fn, verbose=False)
        except Exception as e:
            node = failing_node(e)
            mode = modes[-1] if modes else None
            at = mode.calls.get(getattr(node, "grad_fn", None)) if mode is not None else None
            what = _node_label(node) if node is not None else "an unknown op"
            if at is None or at[0] in force:
                raise GraphFailure(f"the channel graph library fails at {what} ({type(e).__name__}: {e})") from e
            force[at[0]] = f"the channel graph library fails there ({type(e).__name__}: {e})"
            continue
        mode = modes[-1]
        outputs = [t for t in _flatten(mode.model_out) if t.grad_fn is not None]
        return ChannelGraph(dg, outputs, dict(mode.cuts), list(mode.cut_inputs), dict(inside),
                            dict(mode.modules))
    raise GraphFailure(f"the channel graph library still fails after cutting the graph at {max_retries} ops")


def _flatten(obj: Any) -> list[Any]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flatten(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flatten(v)]
    return []
