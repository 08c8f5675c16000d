"""MeasurementBudget: the Lightning side of the overhead budget (timers, rank-0 decision, broadcast).

Private helper of the measuring callbacks; the decision logic is
:class:`lightning_phases.functional.schedule.BudgetSchedule`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_phases import _lightning as pl
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional.schedule import BudgetSchedule, should_measure

__all__ = ["MeasurementBudget"]


def _check_interval(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LightningPhasesError(f"{name} must be an int >= 1 or None; got {value!r}.")


def _on_gpu(trainer: pl.Trainer) -> bool:
    try:
        return trainer.strategy.root_device.type == "cuda"
    except Exception:  # noqa: BLE001 - a trainer without a strategy (tests): the CPU clock is enough
        return False


class MeasurementBudget:
    """When a measuring callback measures: within an overhead budget (default) or on a fixed schedule.

    Budgeted (the default, ``every_n_epochs = every_n_steps = None``): the
    callback measures at the start and then as often as
    :class:`~lightning_phases.functional.schedule.BudgetSchedule` allows:
    its measurement time stays at most ``overhead`` × the training time it
    sees (wall time since the first call, without its own measurements),
    with geometrically spaced steps (next at ``≥ (1 + growth)·last``) so
    that measurements are densest early. The cost of a measurement is the
    time spent inside :meth:`timed` at one step.

    Fixed: ``every_n_epochs`` (measure after every that many epochs) or
    ``every_n_steps`` (every that many optimizer steps), as a pure function
    of the step, never at step 0 (the callback's ``measure_at_start`` says
    whether it measures at the start). The time is measured all the same.

    Every rank takes the same decision: under DDP the budget is decided on
    rank 0 from rank 0's clock and broadcast (``trainer.strategy.broadcast``),
    and only at the steps rank 0 planned (no collective between them). One
    instance may serve several callbacks that measure together (their work
    adds up to one measurement per step, and a decision taken at a step is
    repeated to every caller at that step), so that they measure at the same
    steps and share their Gram matrix.

    Usage in a callback::

        if self.budget.should_measure(trainer, epoch_end=False):
            with self.budget.timed(trainer):
                ...  # measure
        metrics[f"{prefix}/overhead"] = self.budget.overhead

    Args:
        overhead: Budget: measurement time at most this fraction of the
            training time (default 0.1: ≤ 1.1× the fit time without the
            callback). Used when no fixed schedule is given.
        every_n_epochs: Fixed schedule: after every this many epochs.
        every_n_steps: Fixed schedule: every this many optimizer steps.
        growth: Geometric spacing ``q`` of the budgeted schedule.
    """

    def __init__(
        self,
        overhead: float = 0.1,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        *,
        growth: float = 0.1,
    ) -> None:
        _check_interval("every_n_epochs", every_n_epochs)
        _check_interval("every_n_steps", every_n_steps)
        if every_n_epochs is not None and every_n_steps is not None:
            raise LightningPhasesError(
                f"Set only one of every_n_epochs={every_n_epochs} and every_n_steps={every_n_steps} "
                "(or neither, for the overhead budget)."
            )
        self.schedule = BudgetSchedule(overhead, growth=growth)  # validates overhead and growth
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        # clock: training time = base + (now - t0) - spent in this process
        self._train_time_base = 0.0
        self._t0: float | None = None
        self._spent_here = 0.0
        self._plan = 0  # next step at which rank 0 decides (the same on every rank)
        self._decided: tuple[int, bool] | None = None  # (step, decision) taken at that step

    # ------------------------------------------------------------------ properties
    @property
    def budgeted(self) -> bool:
        """Whether the overhead budget schedules the measurements (no fixed schedule given)."""
        return self.every_n_epochs is None and self.every_n_steps is None

    @property
    def overhead(self) -> float:
        """Realised overhead: measurement seconds / training seconds so far (NaN before any training)."""
        return self.schedule.realised_overhead(self.train_time())

    @property
    def spent(self) -> float:
        """Seconds spent measuring so far (one-off setup work included)."""
        return self.schedule.spent

    def train_time(self) -> float:
        """Training seconds so far: wall time since the first call, without this budget's measurements."""
        if self._t0 is None:
            return self._train_time_base
        return max(0.0, self._train_time_base + (time.perf_counter() - self._t0) - self._spent_here)

    def start(self) -> None:
        """Start the training clock now (otherwise the first decision or timed block starts it); idempotent."""
        if self._t0 is None:
            self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ decisions
    def should_measure(self, trainer: pl.Trainer, *, epoch_end: bool) -> bool:
        """Measure now? Call after a training batch (``epoch_end=False``) or at an epoch's end (True).

        Identical on every rank. Cheap between planned steps (an integer comparison).
        """
        self.start()
        step = int(trainer.global_step)
        if not self.budgeted:
            return should_measure(
                global_step=step,
                epoch_end=int(trainer.current_epoch) if epoch_end else None,
                every_n_steps=None if epoch_end else self.every_n_steps,
                every_n_epochs=self.every_n_epochs if epoch_end else None,
            )
        if self._decided is not None and self._decided[0] == step:
            return self._decided[1]
        if step < self._plan:
            return False
        decision, plan = False, step + 1
        if trainer.is_global_zero:
            train_time = self.train_time()
            decision = self.schedule.decide(step=step, train_time=train_time)
            plan = step if decision else self.schedule.next_step(step=step, train_time=train_time)
        if trainer.world_size > 1:
            decision, plan = trainer.strategy.broadcast((bool(decision), int(plan)), src=0)
        self._plan = int(plan)
        self._decided = (step, bool(decision))
        return bool(decision)

    @contextmanager
    def timed(self, trainer: pl.Trainer) -> Iterator[None]:
        """Time the block as (part of) the measurement at the current step.

        On a GPU the device is synchronised before and after, so queued
        training kernels are not billed to the measurement and its own
        kernels are. After the block the next planned step is updated.
        """
        self.start()
        gpu = _on_gpu(trainer)
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if gpu:
                torch.cuda.synchronize()
            cost = time.perf_counter() - start
            self._spent_here += cost
            step = int(trainer.global_step)
            self.schedule.record(step=step, cost=cost, train_time=self.train_time())
            if self.budgeted:
                # the plan must be the same on every rank: the earliest step the spacing allows (a
                # function of the step alone); rank 0 looks at its clock only when that step comes
                self._plan = self.schedule.earliest_step()

    # ------------------------------------------------------------------ reporting and state
    def summary(self, name: str) -> str:
        """One line: the realised overhead of ``name``'s measurements."""
        train = self.train_time()
        ratio = self.overhead
        share = "n/a" if math.isnan(ratio) else f"{100 * ratio:.1f}%"
        mode = (
            f"budget {100 * self.schedule.overhead:.0f}%"
            if self.budgeted
            else (
                f"every {self.every_n_epochs} epoch(s)"
                if self.every_n_epochs
                else f"every {self.every_n_steps} step(s)"
            )
        )
        return (
            f"{name}: {self.schedule.num_measurements} measurement(s), {self.spent:.2f} s measuring over "
            f"{train:.2f} s of training: overhead {share} ({mode})."
        )

    def report(self, trainer: pl.Trainer, name: str) -> None:
        """Print :meth:`summary` on rank 0 (``rank_zero_info``); call at the end of fitting."""
        if trainer.is_global_zero:
            pl.rank_zero_info(self.summary(name))

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "train_time": self.train_time(), "plan": self._plan}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict.get("schedule", {}))
        self._train_time_base = float(state_dict.get("train_time", 0.0))
        self._t0 = None
        self._spent_here = 0.0
        self._plan = int(state_dict.get("plan", 0))
        self._decided = None
