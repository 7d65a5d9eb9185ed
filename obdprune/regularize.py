"""Sparse regularizers: L1 (single weights) or group lasso (whole units), as a loss penalty or as a
proximal step.

A regularizer has two hooks the training loop calls: ``penalty(model)`` is added to the loss before
backward (subgradient form), ``after_step(model, lr)`` runs after each optimizer step (proximal form).
Subgradient L1 leaves weights near zero; the proximal step sets them exactly to zero.

Group lasso (Yuan & Lin 2006) penalizes λ·Σ_g √|g|·‖w_g‖₂ over the unit groups of
:mod:`obdprune.groups` (a unit's weights, bias and BatchNorm scale and shift together, in every layer
the unit is coupled to: both sides of a residual sum, a depthwise conv, a concatenation's norms); its proximal
step sets whole groups exactly to zero. The √|g| weight makes λ comparable with L1's: a group whose
|g| entries all have magnitude a costs λ·|g|·a under both.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch
from torch import nn

from obdprune.choices import Choice
from obdprune.errors import UsageError
from obdprune.groups import UnitLayer
from obdprune.masking import prunable_weights

__all__ = ["Regularizer", "NoRegularizer", "L1Penalty", "L1Proximal", "L1Mode", "make_l1",
           "GroupLassoPenalty", "GroupLassoProximal", "SPARSE_REGULARIZERS", "make_regularizer"]


LearningRate = Union[float, Callable[[str], float]]


def _rate(lr: LearningRate, name: str) -> float:
    return float(lr(name)) if callable(lr) else float(lr)


class Regularizer:
    """Base class: override ``penalty`` and/or ``after_step``."""

    name = "none"

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module, lr: LearningRate) -> None:
        """The proximal step after an optimizer step; ``lr`` is one rate, or a rate per parameter name."""
        return None

    def describe(self) -> dict:
        return {"name": self.name}


class NoRegularizer(Regularizer):
    pass


class _L1(Regularizer):
    """``lam·Σ|w|`` over every Conv2d/Linear weight; subclasses apply it as a penalty or a proximal step."""

    def __init__(self, lam: float):
        if lam < 0:
            raise UsageError(f"L1 strength must be >= 0, got {lam}")
        self.lam = float(lam)

    def describe(self) -> dict:
        return {"name": self.name, "lambda": self.lam}


class L1Penalty(_L1):
    """Adds ``lam * Σ|w|`` over every Conv2d/Linear weight to the loss."""

    name = "l1-penalty"

    def penalty(self, model: nn.Module) -> torch.Tensor:
        return self.lam * sum(p.abs().sum() for p in prunable_weights(model).values())


class L1Proximal(_L1):
    """After each step: ``w ← sign(w)·max(|w| − lr·lam, 0)`` (the proximal map of ``lr·lam·|w|``)."""

    name = "l1-proximal"

    @torch.no_grad()
    def after_step(self, model: nn.Module, lr: LearningRate) -> None:
        for name, p in prunable_weights(model).items():
            t = _rate(lr, name) * self.lam
            shrunk = p - t * torch.sign(p)
            p.copy_(torch.where(p.abs() > t, shrunk, torch.zeros_like(p)))  # exact +0.0 below the threshold


class L1Mode(Choice, label="L1 mode"):
    """L1 as a loss term (subgradient) or as a soft-threshold after each step (exact zeros)."""

    PENALTY = "penalty"
    PROXIMAL = "proximal"


def make_l1(lam: float, mode: L1Mode | str) -> Regularizer:
    mode = L1Mode.parse(mode)
    return L1Penalty(lam) if mode is L1Mode.PENALTY else L1Proximal(lam)


def _group_rows(model: nn.Module, g: UnitLayer) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The members of ``g``'s groups as (rows, entries) views of their parameters, the layer's weight
    first, with the rows of units 0..units-1 (None: the first ``units`` rows, in order)."""
    params = dict(model.named_parameters())
    return [(params[p].view(params[p].shape[0], -1), rows) for p, _, rows in g.members()]


def _unit_rows(view: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """(units, entries): the unit rows of a member view (a copy for coupled members; a unit's rows in every
    channel group side by side when ``rows`` is (units, blocks))."""
    return view if rows is None else view[rows.to(view.device)].reshape(rows.shape[0], -1)


class _GroupLasso(Regularizer):
    """``lam · Σ_g √|g|·‖w_g‖₂`` over the unit ``groups``; subclasses apply it as a penalty or a proximal map."""

    def __init__(self, lam: float, groups: Sequence[UnitLayer]):
        if not (lam >= 0 and math.isfinite(lam)):
            raise UsageError(f"group-lasso strength must be a number >= 0, got {lam}")
        if not groups:
            raise UsageError("group lasso needs unit groups, and the model has no removable units")
        self.lam, self.groups = float(lam), list(groups)

    def describe(self) -> dict:
        return {"name": self.name, "lambda": self.lam, "layers": [g.layer for g in self.groups]}


class GroupLassoPenalty(_GroupLasso):
    """Adds ``lam · Σ_g √|g|·‖w_g‖₂`` over every unit group to the loss (subgradient 0 at w_g = 0)."""

    name = "group-lasso-penalty"

    def penalty(self, model: nn.Module) -> torch.Tensor:
        total = 0.0
        for g in self.groups:
            rows = torch.cat([_unit_rows(v, r) for v, r in _group_rows(model, g)], dim=1)  # (units, |g|)
            total = total + math.sqrt(g.group_size) * torch.linalg.vector_norm(rows, dim=1).sum()
        return self.lam * total


class GroupLassoProximal(_GroupLasso):
    """After each step, for every unit group g: ``w_g ← w_g · max(0, 1 − lr·lam·√|g| / ‖w_g‖₂)``, the
    proximal map of ``lr·lam·√|g|·‖w_g‖₂`` (block soft-thresholding): a group whose norm is at most
    the threshold becomes exactly zero, the others shrink toward zero along their own direction."""

    name = "group-lasso-proximal"

    @torch.no_grad()
    def after_step(self, model: nn.Module, lr: LearningRate) -> None:
        for g in self.groups:
            members = _group_rows(model, g)
            norm = torch.sqrt(sum(_unit_rows(v, r).pow(2).sum(dim=1) for v, r in members))  # (units,)
            threshold = _rate(lr, g.weight) * self.lam * math.sqrt(g.group_size)
            # norm > threshold keeps 1 - t/norm; otherwise (zero norms included) the factor is 0
            factor = torch.where(norm > threshold, 1.0 - threshold / norm.clamp_min(threshold), torch.zeros_like(norm))
            for v, rows in members:
                r = _unit_rows(v, rows)
                r.mul_(factor.to(r.dtype).unsqueeze(1))
                r.masked_fill_(factor.unsqueeze(1).expand_as(r) == 0, 0.0)  # +0.0, not -0.0
                if rows is not None:
                    v[rows.to(v.device)] = r.view(*rows.shape, -1)


SPARSE_REGULARIZERS = ("l1", "group-lasso")


def make_regularizer(kind: str, lam: float, mode: L1Mode | str, groups: Sequence[UnitLayer] | None = None) -> Regularizer:
    """``kind`` ``l1`` (every Conv/Linear weight) or ``group-lasso`` (the unit ``groups``), as a loss
    ``penalty`` or a ``proximal`` step."""
    mode = L1Mode.parse(mode)
    if kind == "l1":
        return make_l1(lam, mode)
    if kind == "group-lasso":
        cls = GroupLassoPenalty if mode is L1Mode.PENALTY else GroupLassoProximal
        return cls(lam, groups or [])
    raise UsageError(f"unknown regularizer {kind!r}; choose one of: {', '.join(SPARSE_REGULARIZERS)}")
