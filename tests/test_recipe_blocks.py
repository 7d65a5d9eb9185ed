"""Building blocks of the accuracy recipe (issue: accuracy at high sparsity), each against its definition:
the cubic ramp of gradual pruning (Zhu & Gupta 2017) and the max-drop stopping rules on rigged sequences.
Layer-wise OBS is in tests/test_obs.py; their wiring into the prune loop in tests/test_recipe.py."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from obdprune.errors import UsageError
from obdprune.gradual import cubic_sparsity, gradual_sparsities, plan_gradual
from obdprune.stopping import choose_max_drop, monotone_fit, standard_error


def test_cubic_ramp_formula_and_snapped_targets():
    n, final = 10, 0.9
    ramp = [cubic_sparsity(k, n, final) for k in range(1, n + 1)]
    assert ramp[-1] == final and ramp == sorted(ramp)
    assert cubic_sparsity(3, 10, 0.8, 0.2) == pytest.approx(0.8 + (0.2 - 0.8) * 0.7 ** 3)
    path = gradual_sparsities([0.5, 0.75, 0.9], n)
    first = {t: min(k for k in range(n) if ramp[k] >= t) for t in (0.5, 0.75, 0.9)}
    for t, k in first.items():
        assert path[k] == t  # exact, at the first step the ramp reaches it
    assert path == sorted(path)
    assert [s for k, s in enumerate(path) if k not in first.values()] == \
        [r for k, r in enumerate(ramp) if k not in first.values()]
    with pytest.raises(UsageError, match="prune_every"):
        gradual_sparsities([0.1, 0.2, 0.3, 0.9], 2)
    with pytest.raises(UsageError, match="total_epochs"):
        plan_gradual([0.5], steps_per_epoch=8, total_epochs=2, pre_epochs=1, tail_epochs=1, prune_every=2)


def test_max_drop_rules_on_rigged_sequences():
    n, dense, pp = 6000, 0.90, 0.3
    se = standard_error(0.897, n)
    assert se == pytest.approx((0.897 * 0.103 / 6000) ** 0.5)
    line = dense - pp / 100
    seed_a = [line - 0.5 * se, line + 0.001, line + 0.0005, line - 0.02]  # round 1 misses by noise
    seed_b = [line + 0.0005, line + 0.001, line + 0.0002, line - 0.02]
    assert choose_max_drop("first-failure", seed_a, n, dense, pp) == 0  # the flip the old rule allows
    assert choose_max_drop("first-failure", seed_b, n, dense, pp) == 3
    assert choose_max_drop("forgive-one", seed_a, n, dense, pp) == 3
    assert choose_max_drop("forgive-one", seed_b, n, dense, pp) == 3
    # a miss beyond one SE stops it; so does a second miss in a row; a forgiven round is never returned
    assert choose_max_drop("forgive-one", [line + 0.001, line - 2 * se, line + 0.01], n, dense, pp) == 1
    assert choose_max_drop("forgive-one", [line + 0.001, line - 0.5 * se, line - 0.5 * se, line + 0.01], n, dense,
                           pp) == 1
    assert choose_max_drop("forgive-one", [line - 0.5 * se, line - 0.5 * se, line + 0.01], n, dense, pp) == 0
    assert choose_max_drop("forgive-one", [line + 0.001, line - 0.5 * se, line + 0.001, line - 0.5 * se,
                                           line + 0.001], n, dense, pp) == 5


def test_monotone_rule_pools_a_flat_stretch_along_the_line():
    """The curve runs along the line for rounds 1-6 (readings ±0.6 SE around line + 0.1 SE), then falls:
    forgive-one stops at the first two low readings in a row, the monotone fit pools them and goes on."""
    n, dense, pp = 6000, 0.90, 0.3
    line, se = dense - pp / 100, standard_error(0.897, n)
    flat = [line + (0.1 + d) * se for d in (0.5, -0.6, -0.5, 0.6, 0.4, -0.2)]
    seq = flat + [line - 3 * se, line - 6 * se]
    assert choose_max_drop("forgive-one", seq, n, dense, pp) == 1
    assert choose_max_drop("monotone", seq, n, dense, pp) == 5  # round 6 alone reads under the line
    # the stretch reads low by a whole SE on average: nothing holds, whatever single rounds say
    low = [line + (d - 1.0) * se for d in (0.5, -0.6, -0.5, 0.9, 0.4, -0.2)]
    assert choose_max_drop("monotone", low, n, dense, pp) == 0
    assert choose_max_drop("forgive-one", low, n, dense, pp) == 0
    # it stops once the fit of the newest round is more than one SE under the line
    assert choose_max_drop("monotone", [line + se, line - 3 * se, line + 3 * se], n, dense, pp) == 1


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=9))
def test_monotone_fit_is_the_least_squares_non_increasing_fit_and_only_rises_with_new_rounds(values):
    fit = monotone_fit(values)
    assert all(a >= b - 1e-12 for a, b in zip(fit, fit[1:]))
    assert sum(fit) == pytest.approx(sum(values))
    # brute force: no non-increasing sequence from the blocks' candidate levels fits better (a local check:
    # moving any maximal block of equal values up or down increases the squared error)
    err = sum((f - v) ** 2 for f, v in zip(fit, values))
    for i in range(len(fit)):
        for j in range(i + 1, len(fit) + 1):
            for eps in (1e-3, -1e-3):
                moved = fit[:i] + [f + eps for f in fit[i:j]] + fit[j:]
                if all(a >= b for a, b in zip(moved, moved[1:])):
                    assert sum((f - v) ** 2 for f, v in zip(moved, values)) >= err - 1e-12
    for k in range(1, len(values)):  # a round's fit never falls when later rounds come in
        before, after = monotone_fit(values[:k]), fit[:k]
        assert all(a >= b - 1e-12 for a, b in zip(after, before))
