"""Masks: which weights are kept. Selection from saliency scores, application, and enforcement.

Masks are plain bool tensors keyed by dotted parameter names (``"features.3.weight"``). They are applied
in place to ordinary parameters (no reparametrization), so state_dicts stay clean and deepcopy works.
Masks alone make a model neither faster nor smaller: :func:`obdprune.compact.compact` does that.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from obdprune.choices import Choice
from obdprune.errors import UsageError
from obdprune.layers import prunable_layers

__all__ = [
    "DEFAULT_LAYER_FLOOR",
    "Scope", "MaskSet", "prunable_weights", "select_masks", "masks_from_weights",
]

DEFAULT_LAYER_FLOOR = 0.005
"""Every layer keeps at least this share of its weights (units); half a percent, so that a 99 % target
stays reachable when each layer's floor is rounded up to whole weights."""


class Scope(Choice):
    """Where the sparsity target applies: across all layers at once, or to each layer alike."""

    GLOBAL = "global"
    LAYER = "layer"


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight tensors pruning acts on: the ``weight`` of every prunable layer
    (:data:`obdprune.layers.PRUNABLE_TYPES`: Conv2d and Linear), by dotted name."""
    out: dict[str, nn.Parameter] = {}
    for mod_name, module in prunable_layers(model):
        out[f"{mod_name}.weight" if mod_name else "weight"] = module.weight
    if not out:
        raise UsageError("the model has no Conv2d or Linear layers to prune")
    return out


class MaskSet:
    """Bool keep-masks by parameter name. ``True`` = kept, ``False`` = pruned (held at exactly 0.0)."""

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        self.masks: dict[str, torch.Tensor] = {}
        for name, m in masks.items():
            if m.dtype != torch.bool:
                raise ValueError(f"mask {name!r} must be bool, got {m.dtype}")
            self.masks[name] = m

    @classmethod
    def dense(cls, model: nn.Module) -> "MaskSet":
        return cls({n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_weights(model).items()})

    def __iter__(self):
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.masks:
            some = ", ".join(list(self.masks)[:4])
            raise UsageError(f"no mask for {name!r}; masks are keyed by parameter name, e.g. {some}")
        return self.masks[name]

    def __contains__(self, name: object) -> bool:
        return name in self.masks

    def items(self):
        return self.masks.items()

    def numel(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def sparsity(self) -> float:
        return 1.0 - self.kept() / max(1, self.numel())

    def layer_sparsity(self) -> dict[str, float]:
        return {n: 1.0 - float(m.sum()) / m.numel() for n, m in self.masks.items()}

    def to(self, device: torch.device | str) -> "MaskSet":
        return MaskSet({n: m.to(device) for n, m in self.masks.items()})

    def check_against(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, m in self.masks.items():
            if name not in params:
                raise UsageError(f"mask names parameter {name!r}, which the model does not have")
            if tuple(params[name].shape) != tuple(m.shape):
                raise UsageError(f"mask {name!r} has shape {tuple(m.shape)}, parameter has {tuple(params[name].shape)}")

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero the pruned entries of the model's parameters in place."""
        params = dict(model.named_parameters())
        for name, m in self.masks.items():
            p = params[name]
            p.masked_fill_(~m.to(p.device), 0.0)  # +0.0, never -0.0, so sparse files see real zeros

    @torch.no_grad()
    def mask_grads(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, m in self.masks.items():
            g = params[name].grad
            if g is not None:
                g.mul_(m.to(device=g.device, dtype=g.dtype))

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        """Keep pruned weights exactly zero through every step of ``optimizer`` (any torch optimizer):
        pruned gradients are zeroed before each step, pruned weights after it. Returns a handle with
        ``remove()``. See :class:`obdprune.constraints.StepConstraints`, which also runs a proximal step.
        """
        from obdprune.constraints import StepConstraints  # constraints builds on MaskSet

        return StepConstraints(model, self).attach(optimizer)

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """Zero the optimizer's per-parameter buffers (momentum, Adam moments) at pruned entries."""
        by_id = {id(p): n for n, p in model.named_parameters()}
        for p, state in optimizer.state.items():
            name = by_id.get(id(p))
            if name is None or name not in self.masks:
                continue
            m = self.masks[name].to(p.device)
            for value in state.values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.mul_(m.to(value.dtype))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Masks as uint8 tensors for safetensors."""
        return {n: m.to(torch.uint8).contiguous().cpu() for n, m in self.masks.items()}


def masks_from_weights(model: nn.Module) -> MaskSet:
    """Masks read off the weights themselves: kept = nonzero."""
    return MaskSet({n: p.detach() != 0 for n, p in prunable_weights(model).items()})


def select_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    scope: Scope | str = Scope.GLOBAL,
    current: MaskSet | None = None,
    layer_floor: float = DEFAULT_LAYER_FLOOR,
) -> MaskSet:
    """Keep-masks removing exactly ``round(sparsity * n)`` weights with the lowest scores.

    scores: per-tensor saliencies (higher = more important), same shapes as the weights.
    current: masks already in force; weights pruned there stay pruned (masks only shrink).
    layer_floor: every tensor keeps at least ``max(1, ceil(layer_floor * numel))`` weights, so no layer
      is emptied; a target that cannot be met under that floor raises UsageError.
    Ties are broken by position (stable sort), so the count is exact and the result deterministic.
    """
    scope = Scope.parse(scope)
    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 <= layer_floor <= 1.0:
        raise UsageError(f"layer floor must be in [0, 1], got {layer_floor}")
    names = list(scores)
    flat: dict[str, torch.Tensor] = {}
    floors: dict[str, int] = {}
    for name in names:
        s = scores[name].detach().reshape(-1).to(torch.float64).cpu()
        if torch.isnan(s).any():
            raise UsageError(f"saliency of {name!r} contains NaN")
        if current is not None and name in current.masks:
            # already pruned entries go first, ahead of any real score
            s = torch.where(current[name].reshape(-1).cpu(), s, torch.full_like(s, -math.inf))
        flat[name] = s
        floors[name] = min(s.numel(), max(1, math.ceil(layer_floor * s.numel())))

    keep: dict[str, torch.Tensor] = {}
    if scope is Scope.LAYER:
        for name in names:
            n = flat[name].numel()
            n_remove = int(round(sparsity * n))
            if n - n_remove < floors[name]:
                raise UsageError(
                    f"sparsity {sparsity} would leave {name!r} with {n - n_remove} of {n} weights, "
                    f"below its floor of {floors[name]}; lower the target or the layer floor")
            keep[name] = _keep_top(flat[name], n - n_remove)
    else:
        total = sum(t.numel() for t in flat.values())
        n_remove = int(round(sparsity * total))
        protected = sum(floors.values())
        if total - n_remove < protected:
            raise UsageError(
                f"sparsity {sparsity} would remove {n_remove} of {total} weights but the per-layer floor "
                f"keeps {protected}; a layer would be emptied. Lower the target or the layer floor")
        # Protect each tensor's top-`floor` entries, then remove the globally lowest of the rest.
        cand_scores, cand_owner, cand_index = [], [], []
        for i, name in enumerate(names):
            s = flat[name]
            order = torch.sort(s, stable=True).indices  # ascending; ties in position order
            rest = order[: s.numel() - floors[name]]
            cand_scores.append(s[rest])
            cand_owner.append(torch.full((rest.numel(),), i, dtype=torch.int64))
            cand_index.append(rest)
        all_scores = torch.cat(cand_scores)
        owner = torch.cat(cand_owner)
        index = torch.cat(cand_index)
        # stable ascending sort on (score, owner, index) makes ties deterministic
        key_order = torch.argsort(index, stable=True)
        key_order = key_order[torch.argsort(owner[key_order], stable=True)]
        key_order = key_order[torch.argsort(all_scores[key_order], stable=True)]
        removed = key_order[:n_remove]
        for i, name in enumerate(names):
            k = torch.ones(flat[name].numel(), dtype=torch.bool)
            sel = removed[owner[removed] == i]
            k[index[sel]] = False
            keep[name] = k
    return MaskSet({n: keep[n].reshape(scores[n].shape).to(scores[n].device) for n in names})


def _keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    order = torch.sort(scores, stable=True).indices  # ascending; among ties the earlier position goes first
    k = torch.zeros(scores.numel(), dtype=torch.bool)
    k[order[scores.numel() - n_keep:]] = True
    return k


def check_binary(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Validate a stored mask (any numeric dtype) and return it as bool."""
    if tensor.dtype == torch.bool:
        return tensor
    if not bool(((tensor == 0) | (tensor == 1)).all()):
        raise ValueError(f"mask {name!r} holds values other than 0 and 1")
    return tensor != 0

