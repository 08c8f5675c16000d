"""What the probing monitors share: schedule, publishing, state key, the warn-once-and-skip net, DDP reduction.

Private: :class:`~lightning_phases.callbacks.OrderParameterMonitor` and
:class:`~lightning_phases.callbacks.NoiseSplitTracker` derive from
``_ProbeMonitor`` and say what to compute from the reduced statistics and
what to log.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_phases import _lightning as pl
from lightning_phases import keys
from lightning_phases._lightning import Callback, rank_zero_warn
from lightning_phases._validation import check_bool, check_int
from lightning_phases.callbacks._budget import MeasurementBudget
from lightning_phases.callbacks.model_adapter import OutputSelector, Task, Unpack
from lightning_phases.callbacks.probe import Probe
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional.ensemble import _all_finite
from lightning_phases.functional.per_sample import GramMethod, LossFn, ParamSelection, select_parameters
from lightning_phases.functional.schedule import should_measure  # re-exported: the fixed schedule
from lightning_phases.report.tensorboard import summary_writers, write_phase_layout

__all__ = ["publish", "should_measure", "stable_state_key"]


def publish(trainer: pl.Trainer, metrics: Mapping[str, float]) -> dict[str, float]:
    """Log scalars to every logger (rank 0) and put them into ``trainer.callback_metrics`` (every rank).

    One rule for undefined statistics: a value that is not finite (NaN, ±inf)
    is neither logged nor published; the key is absent at that step. Returns
    what was published.
    """
    clean = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    if not clean:
        return clean
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(clean, step=trainer.global_step)
    trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float32) for k, v in clean.items()})
    return clean


def stable_state_key(callback: Callback, ident: dict[str, Any]) -> str:
    """``Callback._generate_state_key(**ident)``, built once per identity (Lightning reads it on every hook)."""
    frozen = tuple(ident.items())
    cache = callback.__dict__.get("_state_key_cache")
    if cache is None or cache[0] != frozen:
        cache = (frozen, callback._generate_state_key(**ident))
        callback.__dict__["_state_key_cache"] = cache
    return cache[1]


# the Probe arguments a monitor takes, with the defaults of its signature
_PROBE_ARGS = {
    "probe_size": 1024,
    "seed": 0,
    "loss_fn": None,
    "params": None,
    "unpack": None,
    "forward": None,
    "output": None,
    "task": "auto",
    "chunk_size": None,
    "method": "auto",
}


class _ProbeMonitor(Callback):
    """Schedule, the warn-once-and-skip net, reduction and state shared by the probing monitors."""

    #: Default prefix of the keys and the registry table of the statistics.
    default_prefix: str = ""
    table: dict[str, keys.MetricKey] = {}
    # statistics that are partial sums over this rank's parameters (reduced); the rest are identical on every rank
    _reduce_keys: tuple[str, ...] = ("gram",)
    _finite_keys: tuple[str, ...] = ("gram",)

    def __init__(
        self,
        *,
        probe: Probe | None,
        prefix: str | None,
        batch_size: int | None,
        every_n_epochs: int | None,
        every_n_steps: int | None,
        overhead: float,
        measure_at_start: bool,
        num_minibatches: int,
        probe_args: dict[str, Any],
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, minimum=1, allow_none=True)
        check_int("every_n_epochs", every_n_epochs, minimum=1, allow_none=True)
        check_int("every_n_steps", every_n_steps, minimum=1, allow_none=True)
        check_int("num_minibatches", num_minibatches, minimum=2)
        check_bool("measure_at_start", measure_at_start)
        if every_n_epochs is not None and every_n_steps is not None:
            raise LightningPhasesError(
                f"Set only one of every_n_epochs={every_n_epochs} and every_n_steps={every_n_steps} "
                "(or neither, for the default overhead budget)."
            )
        #: When to measure: the overhead budget (default) or a fixed schedule; shared with the monitors
        #: that share this monitor's probe (see :meth:`setup`).
        self.budget = MeasurementBudget(overhead, every_n_epochs, every_n_steps)
        self._own_budget = self.budget
        self._own_probe = probe is None
        if probe is not None:
            if not isinstance(probe, Probe):
                raise LightningPhasesError(f"probe must be a lightning_phases.callbacks.Probe or None; got {probe!r}.")
            given = sorted(k for k, v in probe_args.items() if v is not _PROBE_ARGS[k] and v != _PROBE_ARGS[k])
            if given:
                raise LightningPhasesError(
                    f"{type(self).__name__}(probe=...) takes the probe's settings from the Probe; also got "
                    f"{', '.join(f'{k}={probe_args[k]!r}' for k in given)}. Pass them to Probe(...) instead."
                )
        else:
            probe = Probe(**probe_args)
        self.probe = probe
        self._probe_mine = probe
        self.prefix = keys.check_prefix(self.default_prefix if prefix is None else prefix)
        if batch_size is not None and batch_size > probe.probe_size:
            raise LightningPhasesError(
                f"batch_size={batch_size} is larger than probe_size={probe.probe_size}; the minibatch ensemble "
                "draws distinct probe samples. Increase probe_size or lower batch_size."
            )
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.overhead = float(overhead)
        self.measure_at_start = measure_at_start
        self.num_minibatches = num_minibatches
        self._fresh()

    # ------------------------------------------------------------------ the probe's settings, read through
    @property
    def probe_size(self) -> int:
        return self.probe.probe_size

    @property
    def seed(self) -> int:
        return self.probe.seed

    @property
    def probe_indices(self) -> Tensor | None:
        """The probe samples as indices into the original training dataset (once drawn)."""
        return self.probe.indices

    @probe_indices.setter
    def probe_indices(self, value: Tensor | None) -> None:
        self.probe.indices = value

    def key(self, statistic: str) -> str:
        """The logged name of one of this monitor's statistics (see :mod:`lightning_phases.keys`)."""
        return keys.name(self.prefix, statistic, table=self.table)

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        # probe size, seed and prefix as before (old checkpoints still match); every other argument that tells
        # two instances apart (params, method, task) only where it is set
        ident: dict[str, Any] = {"probe_size": self.probe.probe_size, "seed": self.probe.seed, "prefix": self.prefix}
        ident.update(self.probe.identity())
        return stable_state_key(self, ident)

    def _fresh(self) -> None:
        """Per-fit state, as before the first fit."""
        self.last_measured_step: int = -1
        self.num_measurements: int = 0
        self.num_failures: int = 0
        self.last: dict[str, float] = {}
        self._warned: set[str] = set()
        self._batch_size: int | None = self.batch_size

    def state_dict(self) -> dict[str, Any]:
        state = self.probe.state_dict()
        state.update(
            {
                "last_measured_step": self.last_measured_step,
                "num_measurements": self.num_measurements,
                "num_failures": self.num_failures,
                "last": dict(self.last),
                "budget": self.budget.state_dict(),
            }
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe.load_state_dict(state_dict)
        self.last_measured_step = int(state_dict.get("last_measured_step", -1))
        self.num_measurements = int(state_dict.get("num_measurements", 0))
        self.num_failures = int(state_dict.get("num_failures", 0))
        self.last = dict(state_dict.get("last", {}))
        if "budget" in state_dict:
            self.budget.load_state_dict(state_dict["budget"])

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise LightningPhasesError(
                f"{type(self).__name__} writes its statistics to the Trainer's loggers, but the Trainer has "
                "none (logger=False). Pass logger=True or a TensorBoardLogger."
            )
        select_parameters(pl_module, self.probe.params)  # raises ParameterSelectionError early
        # A new fit starts fresh (Lightning restores a checkpoint's state after setup).
        self._fresh()
        self.budget = self._own_budget = MeasurementBudget(self.overhead, self.every_n_epochs, self.every_n_steps)
        if self._own_probe and self.probe is not self._probe_mine:  # adopted in an earlier fit: back to its own
            self.probe = self._probe_mine
        self.probe.reset()
        self._share(trainer)

    def _schedule(self) -> tuple[Any, ...]:
        return (self.overhead, self.every_n_epochs, self.every_n_steps, self.measure_at_start)

    def _share(self, trainer: pl.Trainer) -> None:
        """Measure together with an earlier monitor of this Trainer that probes the same samples.

        A monitor built without ``probe=`` adopts the probe of an earlier
        monitor that was also built without one and has the same probe
        settings, so that the default ``[OrderParameterMonitor(),
        NoiseSplitTracker()]`` compute one Gram matrix per step; monitors
        with one probe (given or adopted) and the same schedule share one
        budget, so that they measure at the same steps. The sharing is held
        by the callbacks themselves, for this fit (no global state).
        """
        for other in trainer.callbacks:
            if other is self:
                break
            if not isinstance(other, _ProbeMonitor):
                continue
            if (
                self._own_probe
                and other._own_probe
                and other.probe is not self.probe
                and _probe_settings(other.probe) == _probe_settings(self.probe)
            ):
                self.probe = other.probe
            if other.probe is self.probe and other._schedule() == self._schedule():
                self.budget = other.budget
                return

    def _resolve_batch_size(self, trainer: pl.Trainer) -> None:
        from lightning_phases.callbacks.probe import training_dataloader

        loader = training_dataloader(trainer, type(self).__name__)
        if self._batch_size is None:
            per_device = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
            if per_device is None:
                raise LightningPhasesError(
                    "Cannot infer the minibatch size from the training DataLoader; pass batch_size=..."
                )
            # the SGD minibatch: per-device batches of every rank, accumulated
            self._batch_size = int(per_device) * max(1, trainer.world_size) * max(1, trainer.accumulate_grad_batches)
        n = self.probe.size
        if self._batch_size > n:
            raise LightningPhasesError(
                f"The minibatch size B={self._batch_size} is larger than the probe set (n={n}). "
                "Increase probe_size, or pass a smaller batch_size=."
            )

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe.prepare(trainer, pl_module, who=type(self).__name__)
        self._resolve_batch_size(trainer)
        self._on_probe_ready(trainer, pl_module)
        writers = summary_writers(trainer)
        if writers:
            try:
                write_phase_layout(writers)
            except Exception as err:  # noqa: BLE001 - a failed layout never ends the run
                self._warn_once("tensorboard", f"{type(self).__name__} could not write to TensorBoard ({err}).")
        at_start = self.measure_at_start and trainer.global_step == 0 and self.last_measured_step < 0
        if at_start and (not self.budget.budgeted or self._due(trainer, epoch_end=None)):
            self._run(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._due(trainer, epoch_end=None):
            self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer, epoch_end=trainer.current_epoch):
            self._run(trainer, pl_module)

    def _due(self, trainer: pl.Trainer, *, epoch_end: int | None) -> bool:
        """The one place where "measure now?" is decided: the same answer on every rank.

        A fixed schedule is a pure function of the step; the overhead budget is
        decided on rank 0 and broadcast (:class:`~lightning_phases.callbacks._budget.MeasurementBudget`).
        """
        try:
            return self.budget.should_measure(trainer, epoch_end=epoch_end is not None)
        except Exception as err:  # noqa: BLE001 - a monitor must never end the user's run
            self._skip(trainer, f"the schedule failed: {type(err).__name__}: {err}")
            return False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.budget is self._own_budget:  # a shared budget is reported once, by its owner
            with contextlib.suppress(Exception):
                self.budget.report(trainer, type(self).__name__)

    # ------------------------------------------------------------------ measurement
    def _on_probe_ready(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Subclass hook: the probe set and dataset are known (configuration errors may raise here)."""

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)

    def _skip(self, trainer: pl.Trainer, reason: str) -> None:
        self.num_failures += 1
        skipped = self.key("skipped")
        self._warn_once(
            "measure",
            f"{type(self).__name__} skipped the measurement at step {trainer.global_step} ({reason}); "
            f"training continues unchanged. Further skips are counted in '{skipped}' without another warning.",
        )
        with contextlib.suppress(Exception):  # a failing logger must not end the run either
            publish(trainer, {skipped: float(self.num_failures)})

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One measurement: all of its work inside one warn-once-and-skip net; training never stops here.

        A failure on any rank (an exception, NaN) before the reduction is
        turned into NaN statistics of the agreed shapes, so the collective
        calls still match on every rank and nobody hangs; the measurement is
        then skipped everywhere.
        """
        step = trainer.global_step
        if step == self.last_measured_step:
            return
        devices = [torch.cuda.current_device()] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            try:
                with self.budget.timed(trainer):
                    metrics = self._measure(trainer, pl_module)
                if metrics is not None:
                    metrics[self.key("measured_step")] = float(step)
                    metrics[self.key("overhead")] = self.budget.overhead
                    publish(trainer, metrics)
            except Exception as err:  # noqa: BLE001 - a monitor must never end the user's run
                self._skip(trainer, f"{type(err).__name__}: {err}")
        self.last_measured_step = step
        self.num_measurements += 1

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        # build (or re-map) the probe batch first, so that n below is this measurement's probe size; a failure
        # here is raised (and handled) again in _local_statistics
        with contextlib.suppress(Exception):
            self.probe.batch(trainer, pl_module)
        n = self.probe.size
        device = pl_module.device
        try:
            local = self._local_statistics(trainer, pl_module)
            failure = None
        except Exception as err:  # noqa: BLE001 - a monitor must never end the user's run
            local = self._empty_statistics(n, device)
            failure = f"{type(err).__name__}: {err}"
        reduced = {k: (self._reduce(trainer, v) if k in self._reduce_keys else v) for k, v in local.items()}
        if failure is not None or not all(_all_finite(v) for k, v in reduced.items() if k in self._finite_keys):
            self._skip(trainer, failure or "NaN or inf in the per-sample gradients or losses")
            return None
        metrics = self._metrics(trainer, pl_module, reduced)
        if metrics is not None:
            self.last = {k: v for k, v in metrics.items() if math.isfinite(v)}
            self._write_tensorboard(trainer, reduced, metrics)
        return metrics

    def _write_tensorboard(self, trainer: pl.Trainer, stats: dict[str, Tensor], metrics: dict[str, float]) -> None:
        writers = summary_writers(trainer)  # every TensorBoard logger's writer, rank 0 only
        if not writers:
            return
        try:
            self._tensorboard(writers, trainer, stats, metrics)
        except Exception as err:  # noqa: BLE001 - a failed figure never ends the run (the scalars are kept)
            self._warn_once(
                "tensorboard", f"{type(self).__name__} could not write to TensorBoard ({type(err).__name__}: {err})."
            )

    @staticmethod
    def _reduce(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
        if trainer.world_size <= 1:
            return tensor
        return trainer.strategy.reduce(tensor, reduce_op="sum")

    @property
    def effective_batch_size(self) -> int | None:
        """``B`` used for the minibatch ensemble (known once training has started)."""
        return self._batch_size

    # subclass API
    def _local_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        raise NotImplementedError

    def _empty_statistics(self, n: int, device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def _metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: dict[str, Tensor]
    ) -> dict[str, float] | None:
        raise NotImplementedError

    def _tensorboard(
        self, writers: list[Any], trainer: pl.Trainer, stats: dict[str, Tensor], metrics: dict[str, float]
    ) -> None:
        """Subclass hook: histograms and figures for every TensorBoard writer (rank 0, TensorBoard only)."""


def _probe_settings(probe: Probe) -> tuple[Any, ...]:
    """What makes two probes measure the same thing (callables compared by identity)."""
    adapter = probe.adapter
    return (
        probe.probe_size,
        probe.seed,
        id(probe.loss_fn),
        repr(probe.params) if not callable(probe.params) else id(probe.params),
        probe.chunk_size,
        probe.method,
        tuple(
            id(getattr(adapter, a, None)) if callable(getattr(adapter, a, None)) else repr(getattr(adapter, a, None))
            for a in ("unpack", "forward", "output", "task")
        ),
    )


def probe_args(
    *,
    probe_size: int,
    seed: int,
    loss_fn: LossFn | None,
    params: ParamSelection,
    unpack: Unpack | None,
    forward: Any,
    output: OutputSelector,
    task: Task,
    chunk_size: int | None,
    method: GramMethod,
) -> dict[str, Any]:
    """The Probe arguments of a monitor's signature, as a dict."""
    return dict(
        probe_size=probe_size,
        seed=seed,
        loss_fn=loss_fn,
        params=params,
        unpack=unpack,
        forward=forward,
        output=output,
        task=task,
        chunk_size=chunk_size,
        method=method,
    )
