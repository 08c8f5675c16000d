"""MeasurementBudget in a real Trainer.fit: a fake measuring callback whose work is a sleep."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_phases.callbacks._budget import MeasurementBudget
from lightning_phases.errors import LightningPhasesError
from tests.callbacks.helpers import DestroyProcessGroupAtExit, TinyClassifier


class _SlowStep(TinyClassifier):
    """A training step of known minimum duration."""

    def __init__(self, step_seconds: float) -> None:
        super().__init__()
        self.step_seconds = step_seconds

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_seconds)
        return super().training_step(batch, batch_idx)


class _FakeMonitor(pl.Callback):
    """Asks the budget where a monitor would, 'measures' by sleeping, and keeps its own stopwatch."""

    def __init__(self, budget: MeasurementBudget, cost, directory=None) -> None:
        self.budget = budget
        self.cost = cost  # (trainer) -> seconds
        self.directory = None if directory is None else str(directory)
        self.steps: list[int] = []
        self.own_seconds = 0.0
        self.logged: list[float] = []

    def _maybe(self, trainer, epoch_end: bool) -> None:
        if self.budget.should_measure(trainer, epoch_end=epoch_end) and trainer.global_step not in self.steps:
            start = time.perf_counter()
            with self.budget.timed(trainer):
                time.sleep(self.cost(trainer))
            self.own_seconds += time.perf_counter() - start
            self.steps.append(trainer.global_step)
            self.logged.append(self.budget.overhead)

    def on_train_start(self, trainer, pl_module):
        self._maybe(trainer, False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._maybe(trainer, False)

    def on_train_epoch_end(self, trainer, pl_module):
        self._maybe(trainer, True)

    def on_train_end(self, trainer, pl_module):
        self.budget.report(trainer, "fake")
        if self.directory is not None:
            with open(os.path.join(self.directory, f"rank{trainer.global_rank}.json"), "w") as fh:
                json.dump({"steps": self.steps, "overhead": self.budget.overhead}, fh)


def _data(n: int = 64):
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)), 4)


def _fit(tmp_path, callbacks, *, epochs: int, step_seconds: float = 0.0, **kwargs):
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )
    trainer.fit(_SlowStep(step_seconds), train_dataloaders=_data())
    return trainer


def test_budget_in_a_fit_keeps_the_overhead(tmp_path, caplog):
    budget = MeasurementBudget(overhead=0.1)
    fake = _FakeMonitor(budget, lambda trainer: 0.02)
    with caplog.at_level("INFO"):
        _fit(tmp_path, [fake], epochs=8, step_seconds=0.01)  # 128 steps of >= 10 ms: room for >= 6 measurements
    assert fake.steps[0] == 0 and len(fake.steps) >= 4
    # the budget's bill is what the callback's own stopwatch saw
    assert math.isclose(budget.spent, fake.own_seconds, rel_tol=0.05)
    # within budget, up to the start measurement (made before any training) and the sleep's jitter
    train = budget.train_time()
    assert budget.spent - 0.02 <= 0.1 * train * 1.15
    assert fake.logged[-1] <= 0.15
    assert any("fake:" in r.getMessage() and "overhead" in r.getMessage() for r in caplog.records)


def test_fixed_schedule_through_the_same_object(tmp_path):
    every_epochs = _FakeMonitor(MeasurementBudget(every_n_epochs=2), lambda t: 0.0)
    every_steps = _FakeMonitor(MeasurementBudget(every_n_steps=5), lambda t: 0.0)
    _fit(tmp_path, [every_epochs, every_steps], epochs=4)  # 16 steps per epoch
    assert every_epochs.steps == [32, 64]
    assert every_steps.steps == list(range(5, 65, 5))
    assert every_epochs.budget.schedule.num_measurements == 2


def test_shared_budget_gives_every_caller_the_same_steps(tmp_path):
    budget = MeasurementBudget(overhead=0.2)
    a = _FakeMonitor(budget, lambda t: 0.01)
    b = _FakeMonitor(budget, lambda t: 0.01)
    _fit(tmp_path, [a, b], epochs=4, step_seconds=0.01)  # >= 0.64 s of training: room for >= 6 measurements
    assert a.steps == b.steps and len(a.steps) >= 2
    # the two callbacks' work at one step is one measurement of twice the cost
    assert budget.schedule.num_measurements == len(a.steps)


def test_state_round_trip_and_defaults():
    budget = MeasurementBudget(overhead=0.3)
    budget.schedule.record(step=0, cost=0.5, train_time=0.0)
    budget.schedule.record(step=11, cost=0.25, train_time=4.0)
    budget._train_time_base = 4.0
    other = MeasurementBudget(overhead=0.3)
    other.load_state_dict(budget.state_dict())
    assert other.schedule.state_dict() == budget.schedule.state_dict()
    assert other.train_time() == pytest.approx(4.0)
    assert other.overhead == pytest.approx(0.75 / 4.0)
    fresh = MeasurementBudget()
    fresh.load_state_dict({})
    assert fresh.schedule.num_measurements == 0 and math.isnan(fresh.overhead)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"overhead": -0.1}, "overhead"),
        ({"overhead": "10%"}, "overhead"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_steps": 1.5}, "every_n_steps"),
        ({"every_n_epochs": 1, "every_n_steps": 1}, "every_n_epochs=1 and every_n_steps=1"),
    ],
)
def test_argument_errors(kwargs, name):
    with pytest.raises(LightningPhasesError, match=name):
        MeasurementBudget(**kwargs)


def _rank_cost(trainer) -> float:
    # the ranks' clocks disagree: rank 1's measurements take five times as long
    return 0.004 if trainer.global_rank == 0 else 0.02


@pytest.mark.slow
def test_ddp_ranks_take_identical_decisions(tmp_path):
    budget = MeasurementBudget(overhead=0.1)
    fake = _FakeMonitor(budget, _rank_cost, directory=tmp_path)
    _fit(
        tmp_path,
        [fake, DestroyProcessGroupAtExit()],
        epochs=6,
        step_seconds=0.002,
        devices=2,
        strategy="ddp_spawn",
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"]
    assert ranks[0]["steps"][0] == 0 and len(ranks[0]["steps"]) >= 3
    # each rank's own bill differs (rank 1 is slower), the decisions do not
    assert ranks[1]["overhead"] > ranks[0]["overhead"]
