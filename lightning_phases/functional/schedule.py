"""An overhead budget as a measurement schedule (pure decision logic, no Lightning, no clock).

A monitor that doubles training time gets switched off. :class:`BudgetSchedule`
decides *when* to measure so that the time spent measuring stays within a
fraction ``overhead`` of the training time, and spends that budget where the
training dynamics move fastest, at the start:

* the first call measures (the measurement at the start of training);
* after a measurement at step ``s`` the next one is at a step
  ``≥ max(s + 1, ⌈(1 + growth)·s⌉)`` (geometric spacing: equally many
  measurements per decade of steps, so densest early);
* and only when the budget allows it: ``spent + c ≤ overhead · T``, with
  ``spent`` the time of all measurements so far, ``c`` the cost of the last
  one (the estimate of the next one) and ``T`` the training time so far
  (wall time without the measurements). So after every measurement the
  realised overhead ``spent / T`` is at most ``overhead`` whenever the cost
  estimate holds; only the measurement at the start can exceed it (before
  any training, ``T = 0``).

Early on the budget binds (measurements every ``c / (overhead·τ)`` steps for a
step time ``τ``), later the geometric spacing does, and the realised overhead
then falls below the budget. Everything is a deterministic function of the
numbers passed in: a caller that feeds every process the same numbers (or
decides on one process and broadcasts) gets the same decisions everywhere.

:meth:`BudgetSchedule.next_step` plans ahead: the earliest step at which
:meth:`~BudgetSchedule.decide` can say yes, assuming the step time seen since
the last measurement. A distributed caller decides (and communicates) only
at planned steps, not after every step.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_phases.errors import LightningPhasesError

__all__ = ["BudgetSchedule", "should_measure"]


def _check_number(name: str, value: Any, *, low: float, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LightningPhasesError(f"{name} must be a finite number; got {value!r}.")
    if value < low or (low_open and value == low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise LightningPhasesError(f"{name} must be {bound}; got {value!r}.")
    return float(value)


def should_measure(
    *, global_step: int, epoch_end: int | None, every_n_steps: int | None, every_n_epochs: int | None
) -> bool:
    """The schedule as a pure function, so that every rank agrees.

    ``epoch_end`` is the index of the epoch that just ended (``None`` when
    called after a training step). Steps are counted by ``global_step``
    (optimizer steps taken so far).
    """
    if epoch_end is None:
        return every_n_steps is not None and global_step > 0 and global_step % every_n_steps == 0
    return every_n_epochs is not None and (epoch_end + 1) % every_n_epochs == 0


class BudgetSchedule:
    """When to measure so that measuring costs at most ``overhead`` × training time.

    Args:
        overhead: Budget: measurement time at most this fraction of the training
            time (default 0.1, i.e. ≤ 1.1× the wall time of training alone).
        growth: Geometric spacing ``q ≥ 0``: after a measurement at step ``s``
            the next one is at a step ``≥ (1 + q)·s`` (default 0.1: at most
            about 24 measurements per decade of steps; 0: no spacing, only
            the budget, at least one step apart).

    State (all plain numbers, saved by :meth:`state_dict`):
        ``num_measurements``, ``last_step`` (``-1`` before the first), ``spent``
        (seconds measured in total), ``last_cost`` (seconds of the last
        measurement) and ``last_train_time`` (training seconds at the last
        measurement).
    """

    def __init__(self, overhead: float = 0.1, *, growth: float = 0.1) -> None:
        self.overhead = _check_number("overhead", overhead, low=0.0, low_open=True)
        self.growth = _check_number("growth", growth, low=0.0, low_open=False)
        self.num_measurements = 0
        self.last_step = -1
        self.spent = 0.0
        self.last_cost = 0.0
        self.last_train_time = 0.0

    # ------------------------------------------------------------------ decisions
    def earliest_step(self) -> int:
        """The first step the geometric spacing allows (0 before any measurement)."""
        if self.num_measurements == 0:
            return 0
        return max(self.last_step + 1, math.ceil((1.0 + self.growth) * self.last_step))

    def affordable(self, train_time: float) -> bool:
        """Whether one more measurement of the last one's cost keeps ``spent ≤ overhead · train_time``."""
        return self.spent + self.last_cost <= self.overhead * train_time

    def decide(self, *, step: int, train_time: float) -> bool:
        """Measure now, at ``step`` after ``train_time`` seconds of training (measurements excluded)?

        True before the first measurement; afterwards when ``step`` is at
        least :meth:`earliest_step` and the budget is :meth:`affordable`.
        """
        if self.num_measurements == 0:
            return True
        return step >= self.earliest_step() and self.affordable(train_time)

    def next_step(self, *, step: int, train_time: float) -> int:
        """The earliest step ``> step`` at which :meth:`decide` can be True.

        The training time of future steps is extrapolated from the time per
        step since the last measurement (``(train_time − last_train_time) /
        (step − last_step)``); where that is not known yet (no step since the
        last measurement) it is the next step the spacing allows.
        """
        earliest = max(step + 1, self.earliest_step())
        if self.num_measurements == 0 or self.affordable(train_time):
            return earliest
        steps = step - self.last_step
        per_step = (train_time - self.last_train_time) / steps if steps > 0 else 0.0
        if not per_step > 0:
            return earliest
        missing = (self.spent + self.last_cost) / self.overhead - train_time  # training seconds still needed
        return max(earliest, step + math.ceil(missing / per_step))

    def record(self, *, step: int, cost: float, train_time: float) -> None:
        """A measurement at ``step`` took ``cost`` seconds; ``train_time`` is the training time at it.

        Several records at the same step (work split into pieces, or several
        callbacks sharing one schedule) add up to one measurement.
        """
        cost = max(0.0, float(cost))
        if self.num_measurements and step == self.last_step:
            self.last_cost += cost
        else:
            self.num_measurements += 1
            self.last_step = int(step)
            self.last_cost = cost
        self.spent += cost
        self.last_train_time = float(train_time)

    def bill(self, cost: float) -> None:
        """A one-off cost that is not a measurement (setup work): it counts in ``spent``, and so against
        the budget, but is not taken as the estimate of the next measurement's cost."""
        self.spent += max(0.0, float(cost))

    def realised_overhead(self, train_time: float) -> float:
        """``spent / train_time`` (NaN before any training)."""
        return self.spent / train_time if train_time > 0 else math.nan

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_measurements": self.num_measurements,
            "last_step": self.last_step,
            "spent": self.spent,
            "last_cost": self.last_cost,
            "last_train_time": self.last_train_time,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_measurements = int(state_dict.get("num_measurements", 0))
        self.last_step = int(state_dict.get("last_step", -1))
        self.spent = float(state_dict.get("spent", 0.0))
        self.last_cost = float(state_dict.get("last_cost", 0.0))
        self.last_train_time = float(state_dict.get("last_train_time", 0.0))
