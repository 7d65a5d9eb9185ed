"""Find the parametrized modules, check we support them, and record their inputs and outputs."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from obdprune.curvature._layers import HANDLERS, LayerSquares
from obdprune.errors import UsageError


@dataclass
class Site:
    """One parametrized module: where its per-sample gradients come from."""

    name: str
    module: nn.Module
    handler: type[LayerSquares]
    # Parameter names local to the module that require grad (e.g. ("weight", "bias")).
    trainable: tuple[str, ...]
    input: Tensor | None = field(default=None, repr=False)
    input_version: int = -1
    output: Tensor | None = field(default=None, repr=False)
    output_version: int = -1

    def qualified(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local

    def checked_input(self) -> Tensor:
        assert self.input is not None
        if self.input._version != self.input_version:
            raise UsageError(
                f"the input of module {self.name!r} ({type(self.module).__name__}) was modified in place "
                "after the module ran; curvature needs it unchanged"
            )
        return self.input


def plan_sites(model: nn.Module) -> list[Site]:
    """The modules that own trainable parameters, checked against the supported layer types.

    Raises UsageError naming the module for any type we cannot handle exactly.
    """
    sites: list[Site] = []
    owner: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        own = dict(module.named_parameters(recurse=False))
        trainable = tuple(k for k, p in own.items() if p.requires_grad)
        if not trainable:
            continue
        label = f"module {name or '<root>'!r} ({type(module).__name__})"
        handler = HANDLERS.get(type(module))
        if handler is None:
            supported = ", ".join(sorted(t.__name__ for t in HANDLERS))
            raise UsageError(
                f"{label} has trainable parameters but its type is not supported for curvature; "
                f"supported parametrized layers: {supported} (freeze it with requires_grad_(False) to skip it)"
            )
        if set(own) - set(handler.param_names):
            raise UsageError(f"{label} has unexpected parameters {sorted(set(own) - set(handler.param_names))}")
        for local in trainable:
            pid = id(getattr(module, local))
            if pid in owner:
                raise UsageError(f"{label} shares parameter {local!r} with {owner[pid]!r}; shared parameters are not supported")
            owner[pid] = name
        sites.append(Site(name, module, handler, trainable))
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
    """While active, a forward pass stores each site's input and output.

    The hook runs before any user hook. With ``clone_outputs`` it hands a copy of the output
    downstream, so that later in-place ops (e.g. ReLU(inplace=True)) cannot overwrite the tensor we
    differentiate against; callers use it only after :func:`outputs_modified` says it is needed.
    """

    def make_hook(site: Site):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if site.output is not None:
                raise UsageError(
                    f"module {site.name!r} ({type(module).__name__}) ran more than once in one forward pass; "
                    "reused layers are not supported"
                )
            if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
                raise UsageError(f"module {site.name!r} must take and return a single tensor")
            site.input = args[0].detach()
            site.input_version = args[0]._version
            site.output = output
            site.output_version = output._version
            return output.clone() if clone_outputs and output.requires_grad else None

        return hook

    handles = [s.module.register_forward_hook(make_hook(s), prepend=True) for s in sites]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def output_bytes_per_sample(model: nn.Module, sites: list[Site], sample: Tensor) -> int:
    """Bytes of all sites' outputs for one sample, from a forward pass without autograd."""
    sizes: list[int] = []

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        if isinstance(output, Tensor):
            sizes.append(output.numel() * output.element_size())

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
    return any(s.output is not None and s.output._version != s.output_version for s in sites)


def reset(sites: list[Site]) -> None:
    for s in sites:
        s.input = None
        s.output = None
        s.input_version = -1
