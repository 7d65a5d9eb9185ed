"""Sparse regularizers: L1 as a loss penalty or as a proximal soft-threshold step.

A regularizer has two hooks the training loop calls: ``penalty(model)`` is added to the loss before
backward (subgradient form), ``after_step(model, lr)`` runs after each optimizer step (proximal form).
Subgradient L1 leaves weights near zero; the proximal step sets them exactly to zero.
"""
from __future__ import annotations

import enum

import torch
from torch import nn

from obdprune.errors import UsageError
from obdprune.masking import prunable_weights

__all__ = ["Regularizer", "NoRegularizer", "L1Penalty", "L1Proximal", "L1Mode", "make_l1"]


class Regularizer:
    """Base class: override ``penalty`` and/or ``after_step``."""

    name = "none"

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module, lr: float) -> None:
        return None

    def describe(self) -> dict:
        return {"name": self.name}


class NoRegularizer(Regularizer):
    pass


class L1Penalty(Regularizer):
    """Adds ``lam * Σ|w|`` over every Conv2d/Linear weight to the loss."""

    name = "l1-penalty"

    def __init__(self, lam: float):
        if lam < 0:
            raise UsageError(f"L1 strength must be >= 0, got {lam}")
        self.lam = float(lam)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        return self.lam * sum(p.abs().sum() for p in prunable_weights(model).values())

    def describe(self) -> dict:
        return {"name": self.name, "lambda": self.lam}


class L1Proximal(Regularizer):
    """After each step: ``w ← sign(w)·max(|w| − lr·lam, 0)`` (the proximal map of ``lr·lam·|w|``)."""

    name = "l1-proximal"

    def __init__(self, lam: float):
        if lam < 0:
            raise UsageError(f"L1 strength must be >= 0, got {lam}")
        self.lam = float(lam)

    @torch.no_grad()
    def after_step(self, model: nn.Module, lr: float) -> None:
        t = lr * self.lam
        for p in prunable_weights(model).values():
            p.copy_(torch.sign(p) * torch.clamp(p.abs() - t, min=0.0))

    def describe(self) -> dict:
        return {"name": self.name, "lambda": self.lam}


class L1Mode(str, enum.Enum):
    PENALTY = "penalty"
    PROXIMAL = "proximal"

    @classmethod
    def parse(cls, value: "str | L1Mode") -> "L1Mode":
        try:
            return cls(value)
        except ValueError:
            raise UsageError(f"unknown L1 mode {value!r}; choose one of: {', '.join(m.value for m in cls)}") from None


def make_l1(lam: float, mode: L1Mode | str) -> Regularizer:
    mode = L1Mode.parse(mode)
    return L1Penalty(lam) if mode is L1Mode.PENALTY else L1Proximal(lam)
