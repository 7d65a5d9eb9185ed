"""The ``max_drop`` rule: how far to prune while validation accuracy stays within PP points of dense.

Validation accuracy p on n images is a binomial proportion with standard error SE = √(p(1−p)/n)
(:func:`standard_error`; ≈ 0.35 points at p = 0.9, n = 6,000). The line is dense − PP. Rounds are judged
in order of increasing sparsity, and the result is the last round that held before the search stopped
(the dense model if none did).

- ``monotone`` (the default): accuracy falls as weights go, so the rounds' validation accuracies are
  pooled into their best non-increasing fit (least squares, pool-adjacent-violators; :func:`monotone_fit`),
  which averages the noise of neighbouring rounds where the curve is flat. A round holds when its fitted
  value is on or above the line. Adding a round never lowers an earlier round's fit, so a round that held
  stays held and the loop needs no earlier snapshot. The search stops when the fit of the newest round is
  below the line by more than one SE of one round. A returned round may itself read a little below the line
  when its neighbours read above it: the pooled estimate is what counts.
- ``forgive-one``: a round that misses the line by at most one SE of its own accuracy
  (dense − PP − SE ≤ val < dense − PP) is a *noisy failure*; the search goes on after a noisy failure
  when the round before it held (or it is the first round). It stops at a round below
  dense − PP − SE, or at a second failure in a row. A noisy failure is never returned. Where the curve
  runs along the line for many rounds, two unlucky rounds in a row still end the search early.
- ``first-failure``: the search stops at the first round that does not hold. One unlucky round early in
  the path ends it, so the same data can give 0% on one seed and 76% on the next.

:func:`choose_max_drop` applies a rule to a whole sequence; the prune loop applies :func:`judge` round
by round to the accuracies so far and so gives the same answer.
"""
from __future__ import annotations

import math
from typing import Sequence

from obdprune.choices import Choice
from obdprune.errors import UsageError

__all__ = ["MaxDropRule", "Verdict", "standard_error", "monotone_fit", "judge", "choose_max_drop"]


class MaxDropRule(Choice, label="max-drop rule"):
    FIRST_FAILURE = "first-failure"
    FORGIVE_ONE = "forgive-one"
    MONOTONE = "monotone"


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


def monotone_fit(values: Sequence[float]) -> list[float]:
    """The non-increasing sequence closest to ``values`` in least squares (pool adjacent violators).

    >>> [round(v, 3) for v in monotone_fit([0.90, 0.91, 0.89, 0.92, 0.80])]
    [0.905, 0.905, 0.905, 0.905, 0.8]
    """
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]


def judge(rule: MaxDropRule, val_accuracies: Sequence[float], n_val: int, dense_val_accuracy: float,
          max_drop: float, previous_held: bool) -> Verdict:
    """The verdict on the newest round, ``val_accuracies[-1]``, given every round's so far (in order).
    ``max_drop`` in percentage points; accuracies as fractions; ``previous_held``: the round before held
    (True for the first round, whose predecessor is dense)."""
    line = dense_val_accuracy - max_drop / 100.0 - 1e-12
    val = val_accuracies[-1]
    if rule is MaxDropRule.MONOTONE:
        fitted = monotone_fit(val_accuracies)[-1]
        if fitted >= line:
            return Verdict.HOLD
        return Verdict.FORGIVE if fitted >= line - standard_error(fitted, n_val) else Verdict.STOP
    if val >= line:
        return Verdict.HOLD
    if rule is MaxDropRule.FORGIVE_ONE and previous_held and val >= line - standard_error(val, n_val):
        return Verdict.FORGIVE
    return Verdict.STOP


def choose_max_drop(rule: MaxDropRule | str, val_accuracies: Sequence[float], n_val: int, dense_val_accuracy: float,
                    max_drop: float) -> int:
    """The round the rule returns for rounds 1, 2, ... with ``val_accuracies``; 0 means the dense model.

    >>> choose_max_drop("first-failure", [0.898, 0.899, 0.80], 6000, 0.90, 0.1)
    0
    >>> choose_max_drop("forgive-one", [0.898, 0.899, 0.80], 6000, 0.90, 0.1)
    2
    >>> [choose_max_drop(r, [0.898, 0.8975, 0.902, 0.901, 0.80], 6000, 0.90, 0.1) for r in ("forgive-one", "monotone")]
    [0, 4]
    """
    rule = MaxDropRule.parse(rule)
    held, previous_held = 0, True
    for rnd in range(1, len(val_accuracies) + 1):
        verdict = judge(rule, val_accuracies[:rnd], n_val, dense_val_accuracy, max_drop, previous_held)
        if verdict is Verdict.STOP:
            break
        previous_held = verdict is Verdict.HOLD
        if previous_held:
            held = rnd
    return held
