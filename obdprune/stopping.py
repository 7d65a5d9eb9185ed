"""The ``max_drop`` rule: how far to prune while validation accuracy stays within PP points of dense.

Validation accuracy p on n images is a binomial proportion with standard error SE = √(p(1−p)/n)
(:func:`standard_error`; ≈ 0.35 points at p = 0.9, n = 6,000). A round *holds* when
val ≥ dense − PP. Rounds are judged in order of increasing sparsity, and the result is the last round
that held before the search stopped (the dense model if none did).

- ``first-failure``: the search stops at the first round that does not hold. One unlucky round early in
  the path ends it, so the same data can give 0% on one seed and 76% on the next.
- ``forgive-one`` (the default): a round that misses the line by at most one SE of its own accuracy
  (dense − PP − SE ≤ val < dense − PP) is a *noisy failure*; the search goes on after a noisy failure
  when the round before it held (or it is the first round). It stops at a round below
  dense − PP − SE, or at a second failure in a row. A noisy failure is never returned.

:func:`choose_max_drop` applies a rule to a whole sequence; the prune loop applies :func:`judge` round
by round and so gives the same answer.
"""
from __future__ import annotations

import math
from typing import Sequence

from obdprune.choices import Choice
from obdprune.errors import UsageError

__all__ = ["MaxDropRule", "Verdict", "standard_error", "judge", "choose_max_drop"]


class MaxDropRule(Choice, label="max-drop rule"):
    FIRST_FAILURE = "first-failure"
    FORGIVE_ONE = "forgive-one"


class Verdict(Choice):
    HOLD = "hold"
    FORGIVE = "forgive"  # a noisy failure: not a result, but the search goes on
    STOP = "stop"


def standard_error(accuracy: float, n: int) -> float:
    """√(p(1−p)/n): the standard error of an accuracy ``p`` measured on ``n`` images.

    >>> round(100 * standard_error(0.9, 6000), 3)
    0.387
    """
    if n < 1:
        raise UsageError(f"an accuracy needs at least one image, got n={n}")
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / n)


def judge(rule: MaxDropRule, val_accuracy: float, n_val: int, dense_val_accuracy: float, max_drop: float,
          previous_held: bool) -> Verdict:
    """The verdict on one round. ``max_drop`` in percentage points; accuracies as fractions;
    ``previous_held``: the round before held (True for the first round, whose predecessor is dense)."""
    line = dense_val_accuracy - max_drop / 100.0 - 1e-12
    if val_accuracy >= line:
        return Verdict.HOLD
    if rule is MaxDropRule.FORGIVE_ONE and previous_held and val_accuracy >= line - standard_error(val_accuracy, n_val):
        return Verdict.FORGIVE
    return Verdict.STOP


def choose_max_drop(rule: MaxDropRule | str, val_accuracies: Sequence[float], n_val: int, dense_val_accuracy: float,
                    max_drop: float) -> int:
    """The round the rule returns for rounds 1, 2, ... with ``val_accuracies``; 0 means the dense model.

    >>> choose_max_drop("first-failure", [0.898, 0.899, 0.80], 6000, 0.90, 0.1)
    0
    >>> choose_max_drop("forgive-one", [0.898, 0.899, 0.80], 6000, 0.90, 0.1)
    2
    """
    rule = MaxDropRule.parse(rule)
    held, previous_held = 0, True
    for rnd, val in enumerate(val_accuracies, start=1):
        verdict = judge(rule, val, n_val, dense_val_accuracy, max_drop, previous_held)
        if verdict is Verdict.STOP:
            break
        previous_held = verdict is Verdict.HOLD
        if previous_held:
            held = rnd
    return held
