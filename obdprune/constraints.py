"""What every optimizer step of a pruning phase must respect, in obdprune's loop or the user's own.

Before a step the gradients of pruned weights are zeroed (momentum and Adam moments never grow for
them); after it the regularizer's proximal step runs with each parameter's own learning rate, and the
pruned weights are set back to exactly 0.0 (weight decay, decoupled decay and momentum carried from
before pruning would move them). :meth:`StepConstraints.attach` hooks one optimizer;
:meth:`StepConstraints.every_optimizer` hooks every torch optimizer stepped inside a ``with`` block that
holds parameters of the model, so a user's ``fine_tune(model, epochs)`` needs no call of ours.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from obdprune.masking import MaskSet
from obdprune.regularize import NoRegularizer, Regularizer

__all__ = ["StepConstraints", "StepHandle"]


class StepHandle:
    """Removes the hooks it was given."""

    def __init__(self, *handles):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class StepConstraints:
    """Masks and proximal step for the optimizer steps on ``model``'s parameters.

    masks: a MaskSet, or a callable returning the one in force now (a Pruner's masks change between
      steps), or None.

    >>> model = nn.Linear(3, 2)
    >>> masks = MaskSet({"weight": torch.tensor([[True, False, True], [True, True, False]])})
    >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    >>> handle = StepConstraints(model, masks).attach(opt)
    >>> model(torch.randn(4, 3)).sum().backward(); opt.step()
    >>> bool(model.weight[0, 1] == 0 and model.weight[1, 2] == 0)
    True
    """

    def __init__(self, model: nn.Module, masks: MaskSet | Callable[[], MaskSet | None] | None = None,
                 regularizer: Regularizer | None = None):
        self.model = model
        self._masks = masks if callable(masks) else (lambda: masks)
        self.regularizer = regularizer or NoRegularizer()

    @property
    def masks(self) -> MaskSet | None:
        return self._masks()

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        masks = self.masks
        if masks is not None:
            masks.mask_grads(self.model)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        groups = optimizer.param_groups
        if len(groups) == 1:
            lr: float | Callable[[str], float] = float(groups[0]["lr"])
        else:
            by_param = {id(p): float(g["lr"]) for g in groups for p in g["params"]}
            names = {n: by_param.get(id(p), 0.0) for n, p in self.model.named_parameters()}
            lr = names.__getitem__
        self.regularizer.after_step(self.model, lr)
        masks = self.masks
        if masks is not None:
            masks.apply(self.model)

    def attach(self, optimizer: torch.optim.Optimizer) -> StepHandle:
        """Hook ``optimizer``: masked gradients before each step, proximal step and masks after it."""
        masks = self.masks
        if masks is not None:
            masks.apply(self.model)
            masks.zero_optimizer_state(optimizer, self.model)
        pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_step(opt))
        post = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step(opt))
        return StepHandle(pre, post)

    @contextlib.contextmanager
    def every_optimizer(self) -> Iterator[None]:
        """Within the block, every optimizer that holds a parameter of the model is constrained."""
        ids = {id(p) for p in self.model.parameters()}
        seen: "weakref.WeakKeyDictionary[torch.optim.Optimizer, bool]" = weakref.WeakKeyDictionary()

        def ours(opt: torch.optim.Optimizer) -> bool:
            if opt not in seen:
                seen[opt] = any(id(p) in ids for g in opt.param_groups for p in g["params"])
                if seen[opt] and self.masks is not None:
                    self.masks.zero_optimizer_state(opt, self.model)
            return seen[opt]

        def pre(opt, args, kwargs) -> None:
            if ours(opt):
                self.before_step(opt)

        def post(opt, args, kwargs) -> None:
            if ours(opt):
                self.after_step(opt)

        handle = StepHandle(register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post))
        masks = self.masks
        if masks is not None:
            masks.apply(self.model)
        try:
            yield
        finally:
            handle.remove()
            masks = self.masks
            if masks is not None:
                masks.apply(self.model)
