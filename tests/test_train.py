"""Learning-rate schedules for every run length, and the train() docstring example."""
from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import obdprune.train as train_module
from obdprune.train import ScheduleName, TrainConfig, make_scheduler


def _lrs(schedule: ScheduleName, steps: int, lr: float = 0.1) -> list[float]:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=lr)
    sched = make_scheduler(opt, TrainConfig(lr=lr, schedule=schedule), steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out


@pytest.mark.parametrize("steps", range(1, 12))
@pytest.mark.parametrize("schedule", list(ScheduleName))
def test_every_schedule_runs_any_number_of_steps_with_lrs_in_range(schedule, steps):
    lrs = _lrs(schedule, steps)
    assert len(lrs) == steps and all(0 <= v <= 0.1 + 1e-12 for v in lrs)


def test_onecycle_warms_up_to_the_peak_then_anneals():
    lrs = _lrs(ScheduleName.ONECYCLE, 40)
    peak = max(range(40), key=lrs.__getitem__)
    assert lrs[peak] == pytest.approx(0.1) and 5 <= peak <= 15
    assert lrs[0] < 0.1 / 10 and lrs[-1] < 0.1 / 100


def test_a_four_step_onecycle_run_anneals_by_cosine_from_the_peak():
    assert _lrs(ScheduleName.ONECYCLE, 4) == pytest.approx(_lrs(ScheduleName.COSINE, 4))


def test_the_train_docstring_example_runs():
    result = doctest.testmod(train_module, verbose=False)
    assert result.attempted >= 1 and result.failed == 0
