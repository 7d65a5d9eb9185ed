"""Gradual pruning (Zhu & Gupta 2017): sparsity follows a cubic ramp inside one continuous training run.

With pruning every Δt steps from step t₀, the sparsity after the k-th pruning step (t = t₀ + k·Δt,
k = 1 … n) is

    s_k = s_f + (s_i − s_f)·(1 − k/n)³,      s_i = 0, s_f = the largest target,

fast at first, gently near the end. Every requested target is hit exactly: the first pruning step
whose ramp value reaches a target prunes to that target instead (so the path stays non-decreasing and
each target is held for one segment of Δt steps). The budget is ``total_epochs`` of training: the first
``pre_epochs`` (the regularization epochs) train before the ramp, the last ``tail_epochs`` (the
fine-tuning epochs) recover after it, and the n = ⌊(steps between) / Δt⌋ pruning steps fill the rest.

A target's result is the model at the end of its segment (just before the next pruning step); the last
target's is the model at the end of the run, after the recovery tail.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from obdprune.errors import UsageError

__all__ = ["cubic_sparsity", "gradual_sparsities", "GradualPlan", "plan_gradual"]


def cubic_sparsity(k: int, n: int, final: float, initial: float = 0.0) -> float:
    """s_f + (s_i − s_f)·(1 − k/n)³ after the k-th of n pruning steps.

    >>> cubic_sparsity(0, 4, 0.9), cubic_sparsity(4, 4, 0.9), round(cubic_sparsity(2, 4, 0.8), 3)
    (0.0, 0.9, 0.7)
    """
    return final + (initial - final) * (1.0 - k / n) ** 3


def gradual_sparsities(targets: Sequence[float], n: int) -> list[float]:
    """Sparsity after each of ``n`` pruning steps: the cubic ramp to ``max(targets)`` with every target
    snapped onto the first step (after the previous target's) whose ramp value reaches it.

    >>> [round(s, 3) for s in gradual_sparsities([0.5, 0.9], 4)]
    [0.5, 0.787, 0.886, 0.9]
    """
    stops = sorted(set(float(t) for t in targets))
    if not stops:
        raise UsageError("a gradual schedule needs at least one target sparsity")
    out = [cubic_sparsity(k, n, stops[-1]) for k in range(1, n + 1)]
    ramp = list(out)
    previous = -1
    for t in stops:
        k = next((i for i in range(previous + 1, n) if ramp[i] >= t - 1e-12), None)
        if k is None:
            raise UsageError(f"a gradual ramp of {n} pruning steps cannot hit the {len(stops)} targets "
                             f"{', '.join(f'{s:g}' for s in stops)} one step each; prune more often "
                             f"(a smaller prune_every) or train longer (more total_epochs)")
        out[k] = t
        previous = k
    return out


@dataclass(frozen=True)
class GradualPlan:
    """Where the pruning steps of one run fall (1-based optimizer step counts) and their sparsities."""

    steps: tuple[int, ...]
    sparsities: tuple[float, ...]
    total_steps: int

    def segment_end(self, k: int) -> int:
        """The step count at which the k-th pruning step's segment (0-based k) ends."""
        return self.steps[k + 1] if k + 1 < len(self.steps) else self.total_steps


def plan_gradual(targets: Sequence[float], *, steps_per_epoch: int | None, total_epochs: int, pre_epochs: int,
                 tail_epochs: int, prune_every: int) -> GradualPlan:
    """The pruning steps of a ``total_epochs`` run: after ``pre_epochs``, every ``prune_every`` steps,
    leaving ``tail_epochs`` after the last one.

    >>> plan = plan_gradual([0.9], steps_per_epoch=10, total_epochs=4, pre_epochs=1, tail_epochs=1, prune_every=5)
    >>> plan.steps, plan.total_steps
    ((15, 20, 25, 30), 40)
    """
    if steps_per_epoch is None:
        raise UsageError("a gradual schedule needs training data of known length (a DataLoader with len())")
    if prune_every < 1:
        raise UsageError(f"prune_every is a number of steps >= 1, got {prune_every}")
    if total_epochs <= pre_epochs + tail_epochs:
        raise UsageError(f"total_epochs ({total_epochs}) must exceed the epochs before the ramp ({pre_epochs}, "
                         f"reg_epochs) plus the recovery after it ({tail_epochs}, the fine-tuning epochs)")
    t0, total = pre_epochs * steps_per_epoch, total_epochs * steps_per_epoch
    n = (total - t0 - tail_epochs * steps_per_epoch) // prune_every
    if n < 1:
        raise UsageError(f"the ramp spans {total - t0 - tail_epochs * steps_per_epoch} steps, fewer than one "
                         f"prune_every ({prune_every}); lower prune_every or raise total_epochs")
    sparsities = gradual_sparsities(targets, n)
    return GradualPlan(tuple(t0 + k * prune_every for k in range(1, n + 1)), tuple(sparsities), total)
