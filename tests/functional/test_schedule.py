"""BudgetSchedule on a simulated clock: deterministic fake costs and step times."""

from __future__ import annotations

import math

import pytest

from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional.schedule import BudgetSchedule


def _simulate(schedule: BudgetSchedule, step_times, cost_of, num_steps: int, *, planned: bool = False):
    """Run ``num_steps`` training steps; return the measured steps and (spent, train_time) at the end.

    ``step_times(s)`` is the training time of step ``s`` (1-based), ``cost_of(k)`` the cost of the k-th
    measurement. With ``planned`` the schedule is asked only at the steps ``next_step`` names (as the
    Lightning adapter does), otherwise after every step.
    """
    train_time = 0.0
    measured = []
    plan = 0
    for step in range(num_steps + 1):
        if step > 0:
            train_time += step_times(step)
        if planned and step < plan:
            continue
        if schedule.decide(step=step, train_time=train_time):
            estimate, cost = schedule.last_cost, cost_of(len(measured))
            schedule.record(step=step, cost=cost, train_time=train_time)
            measured.append(step)
            # within budget whenever the estimate (the last cost) was right
            assert step == 0 or schedule.spent - (cost - estimate) <= schedule.overhead * train_time + 1e-12
        plan = schedule.next_step(step=step, train_time=train_time)
    return measured, train_time


def test_written_out_sequence():
    # τ = 1 s per step, every measurement 1 s, overhead 1/4, growth 1/2:
    # the budget needs 4·(m + 1) s of training for measurement m + 1 → steps 8, 12, 16 ...;
    # the spacing needs ≥ 1.5·s → 12 (both), 18, 27, ceil(40.5) = 41, ceil(61.5) = 62, 93
    sched = BudgetSchedule(0.25, growth=0.5)
    measured, _ = _simulate(sched, lambda s: 1.0, lambda k: 1.0, 100)
    assert measured == [0, 8, 12, 18, 27, 41, 62, 93]


def test_a_one_off_bill_counts_against_the_budget_but_not_as_the_next_cost():
    # the written-out sequence above with 4 s of setup billed before training: measurement m + 1 (cost 1 s)
    # now needs 4·(4 + m + 2) s of training → steps 24, 28, 32, ...; the spacing (≥ 1.5·s) → 24, 36, 54, 81
    sched = BudgetSchedule(0.25, growth=0.5)
    sched.bill(4.0)
    assert (sched.spent, sched.last_cost, sched.num_measurements) == (4.0, 0.0, 0)
    measured, train_time = _simulate(sched, lambda s: 1.0, lambda k: 1.0, 100)
    assert measured == [0, 24, 36, 54, 81]
    assert sched.spent == 4.0 + len(measured) and sched.last_cost == 1.0
    assert sched.realised_overhead(train_time) == pytest.approx((4.0 + 5) / 100)


@pytest.mark.parametrize("planned", [False, True])
@pytest.mark.parametrize("overhead", [0.05, 0.1, 0.3])
def test_overhead_within_budget_and_dense_early(overhead, planned):
    # step times and costs that vary deterministically (a slow first epoch, costs growing with the step)
    def step_time(s):
        return 0.02 * (3.0 if s <= 50 else 1.0) * (1.0 + 0.3 * math.sin(s))

    def cost(k):
        return 0.03 * (1.0 + 0.1 * (k % 3))

    sched = BudgetSchedule(overhead)
    measured, train_time = _simulate(sched, step_time, cost, 5000, planned=planned)
    assert measured[0] == 0
    # within budget: the cost of a measurement is estimated from the last one, which varies by ±20 %
    assert sched.spent <= overhead * train_time * 1.001 + 0.2 * 0.03
    assert sched.realised_overhead(train_time) <= overhead * 1.03
    # denser early: the budget binds early (one measurement per ~c/(overhead·τ) steps), the geometric
    # spacing later; more measurements in the first tenth of the steps than in the last half
    assert sum(s <= 500 for s in measured) > sum(s > 2500 for s in measured)
    gaps = [b - a for a, b in zip(measured, measured[1:])]
    assert gaps[-1] > gaps[1]


def test_planned_matches_every_step_decisions():
    args = (lambda s: 0.01 * (1 + (s % 7) / 7), lambda k: 0.05 + 0.01 * (k % 2), 3000)
    every, _ = _simulate(BudgetSchedule(0.1), *args)
    planned, _ = _simulate(BudgetSchedule(0.1), *args, planned=True)
    # a plan extrapolates the step time since the last measurement, so it may look later than
    # the every-step decision; it never measures where the every-step rule would not be allowed to
    assert planned[0] == 0 and len(planned) >= 0.8 * len(every)


def test_deterministic_and_state_round_trip():
    args = (lambda s: 0.01 * (1 + (s % 5)), lambda k: 0.02 * (1 + k % 4), 2000)
    a, _ = _simulate(BudgetSchedule(0.1), *args)
    b, _ = _simulate(BudgetSchedule(0.1), *args)
    assert a == b
    sched = BudgetSchedule(0.2, growth=0.3)
    sched.record(step=0, cost=0.5, train_time=0.0)
    sched.record(step=40, cost=0.25, train_time=10.0)
    sched.record(step=40, cost=0.25, train_time=10.0)  # a second piece of the same measurement
    assert sched.num_measurements == 2 and sched.last_cost == 0.5 and sched.spent == 1.0
    other = BudgetSchedule(0.2, growth=0.3)
    other.load_state_dict(sched.state_dict())
    assert other.state_dict() == sched.state_dict()
    for step, t in [(41, 10.1), (52, 12.0), (60, 20.0)]:
        assert other.decide(step=step, train_time=t) == sched.decide(step=step, train_time=t)
        assert other.next_step(step=step, train_time=t) == sched.next_step(step=step, train_time=t)
    fresh = BudgetSchedule()
    fresh.load_state_dict({})  # old checkpoints: defaults
    assert fresh.num_measurements == 0 and fresh.decide(step=7, train_time=0.0)


def test_geometric_spacing_and_budget_each_bind():
    sched = BudgetSchedule(0.1, growth=1.0)
    sched.record(step=0, cost=1.0, train_time=0.0)
    assert not sched.decide(step=5, train_time=10.0)  # spent 1 + 1 > 0.1·10
    assert sched.decide(step=5, train_time=20.0)
    sched.record(step=5, cost=1.0, train_time=20.0)
    assert sched.earliest_step() == 10
    assert not sched.decide(step=9, train_time=1000.0)  # the budget would allow it, the spacing does not
    assert sched.decide(step=10, train_time=1000.0)
    assert not sched.decide(step=5, train_time=1000.0)  # never twice at one step
    # 1 s per step since step 5 (20 s at step 5, 25 s at step 10): 3 s of measurements need 30 s of training
    assert sched.next_step(step=10, train_time=25.0) == 15


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"overhead": 0}, "overhead"),
        ({"overhead": float("nan")}, "overhead"),
        ({"overhead": True}, "overhead"),
        ({"growth": -1}, "growth"),
        ({"growth": "x"}, "growth"),
    ],
)
def test_argument_errors_name_the_argument(kwargs, name):
    with pytest.raises(LightningPhasesError, match=name):
        BudgetSchedule(**kwargs)
