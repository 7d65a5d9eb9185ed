"""Find the parametrized modules, choose each one's rule, and record their inputs and outputs."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from obdprune.curvature._fallback import (
    FallbackSquares,
    describe_costs,
    float_leaves,
    recording_is_paused,
    tensor_leaves,
)
from obdprune.curvature._layers import HANDLERS, LayerSquares
from obdprune.errors import UsageError


@dataclass
class Site:
    """One parametrized module: where its per-sample gradients come from.

    ``handler`` is its closed-form rule, or None for the torch.func fallback (any module type).
    """

    name: str
    module: nn.Module
    handler: type[LayerSquares] | None
    # Parameter names local to the module that require grad (e.g. ("weight", "bias")).
    trainable: tuple[str, ...]
    args: tuple = field(default=(), repr=False)
    kwargs: dict = field(default_factory=dict, repr=False)
    input_versions: tuple[int, ...] = ()
    # The tensors the module returned (one for closed-form rules), and their versions then.
    outputs: tuple[Tensor, ...] = field(default=(), repr=False)
    output_versions: tuple[int, ...] = ()

    @property
    def ran(self) -> bool:
        return bool(self.outputs)

    def qualified(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local

    def make_handler(self, num_columns: int) -> LayerSquares | FallbackSquares:
        """The accumulator for this chunk, after checking the recorded inputs are unchanged."""
        if tuple(t._version for t in tensor_leaves((self.args, self.kwargs))) != self.input_versions:
            raise UsageError(
                f"the input of module {self.name!r} ({type(self.module).__name__}) was modified in place "
                "after the module ran; curvature needs it unchanged"
            )
        if self.handler is None:
            label = f"module {self.name or '<root>'!r} ({type(self.module).__name__})"
            return FallbackSquares(self.module, self.args, self.kwargs, self.outputs, self.trainable, label)
        return self.handler(self.module, self.args[0], num_columns)


def plan_sites(model: nn.Module) -> list[Site]:
    """The modules that own trainable parameters, each with its closed-form rule or the fallback.

    Modules of a type without a rule in ``HANDLERS`` (or with parameters the rule does not know)
    take the exact torch.func fallback, with a one-line warning naming the module and its cost (one line
    for all modules of one type).
    Raises UsageError for shared parameters.
    """
    sites: list[Site] = []
    owner: dict[int, str] = {}
    fallbacks: dict[tuple[type, tuple[str, ...]], list[tuple[str, nn.Module, tuple[str, ...]]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        own = dict(module.named_parameters(recurse=False))
        trainable = tuple(k for k, p in own.items() if p.requires_grad)
        if not trainable:
            continue
        label = f"module {name or '<root>'!r} ({type(module).__name__})"
        handler = HANDLERS.get(type(module))
        if handler is not None and set(own) - set(handler.param_names):
            handler = None
        if handler is None:
            fallbacks.setdefault((type(module), trainable), []).append((name, module, trainable))
        for local in trainable:
            pid = id(getattr(module, local))
            if pid in owner:
                raise UsageError(f"{label} shares parameter {local!r} with {owner[pid]!r}; shared parameters are not supported")
            owner[pid] = name
        sites.append(Site(name, module, handler, trainable))
    for entries in fallbacks.values():
        warnings.warn(describe_costs(entries), UserWarning, stacklevel=4)
    check_eval_mode(model)
    return sites


def check_eval_mode(model: nn.Module) -> None:
    """Reject training-mode BatchNorm (it would also update running stats) and active Dropout."""
    for name, module in model.named_modules():
        batch_stats = isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        )
        dropout = isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0
        if batch_stats or dropout:
            raise UsageError(
                f"module {name or '<root>'!r} ({type(module).__name__}) is in training mode or uses batch "
                "statistics, so samples are coupled or random; call model.eval() first"
            )


@contextmanager
def recording(sites: list[Site], clone_outputs: bool = False) -> Iterator[None]:
    """While active, a forward pass stores each site's inputs and outputs.

    The hook runs before any user hook. With ``clone_outputs`` it hands a copy of the output
    downstream, so that later in-place ops (e.g. ReLU(inplace=True)) cannot overwrite the tensor we
    differentiate against; callers use it only after :func:`outputs_modified` says it is needed.
    """

    def make_hook(site: Site):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if recording_is_paused():
                return None
            if site.ran:
                raise UsageError(
                    f"module {site.name!r} ({type(module).__name__}) ran more than once in one forward pass; "
                    "reused layers are not supported"
                )
            if site.handler is not None:
                if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor) or kwargs:
                    raise UsageError(f"module {site.name!r} must take and return a single tensor")
                outputs: tuple[Tensor, ...] = (output,)
            else:
                outputs = float_leaves(output)
                if not outputs:
                    raise UsageError(f"module {site.name!r} ({type(module).__name__}) must return tensors")
            site.args = tree_map(_detached, args)
            site.kwargs = tree_map(_detached, kwargs)
            site.input_versions = tuple(t._version for t in tensor_leaves((args, kwargs)))
            site.outputs = outputs
            site.output_versions = tuple(t._version for t in outputs)
            if not clone_outputs:
                return None
            return tree_map(lambda t: t.clone() if isinstance(t, Tensor) and t.requires_grad else t, output)

        return hook

    handles = [s.module.register_forward_hook(make_hook(s), prepend=True, with_kwargs=True) for s in sites]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _detached(obj: Any) -> Any:
    return obj.detach() if isinstance(obj, Tensor) else obj


def output_bytes_per_sample(model: nn.Module, sites: list[Site], sample: Tensor) -> int:
    """Bytes of all sites' outputs for one sample, from a forward pass without autograd."""
    sizes: list[int] = []

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        sizes.extend(t.numel() * t.element_size() for t in tensor_leaves(output))

    handles = [s.module.register_forward_hook(hook) for s in sites]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return sum(sizes)


def outputs_modified(sites: list[Site]) -> bool:
    """Whether an op after some site modified its output in place (so its autograd history changed)."""
    return any(tuple(t._version for t in s.outputs) != s.output_versions for s in sites if s.ran)


def reset(sites: list[Site]) -> None:
    for s in sites:
        s.args, s.kwargs, s.input_versions = (), {}, ()
        s.outputs, s.output_versions = (), ()


def check_idle_parameters(sites: list[Site], logits: Tensor) -> None:
    """Raise if the logits depend on a parameter whose module did not run (it was used elsewhere)."""
    idle = [(s, local) for s in sites if not s.ran for local in s.trainable]
    if not idle or not logits.requires_grad:
        return
    params = [getattr(s.module, local) for s, local in idle]
    grads = torch.autograd.grad(logits.sum(), params, retain_graph=True, allow_unused=True)
    for (s, local), g in zip(idle, grads):
        if g is not None:
            raise UsageError(
                f"parameter {s.qualified(local)!r} is used outside the forward of its module {s.name!r} "
                f"({type(s.module).__name__}); curvature needs each parameter used by the module that owns it"
            )
