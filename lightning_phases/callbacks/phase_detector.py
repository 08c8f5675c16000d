"""PhaseDetector: name the phase of learning online and recommend (or act on) a stopping point."""

from __future__ import annotations

import copy
import inspect
import math
import os
from typing import Any, Literal

import torch

from lightning_phases import _lightning as pl
from lightning_phases import keys
from lightning_phases._io import atomic_path
from lightning_phases._lightning import Callback, rank_zero_info, tensorboard_writers
from lightning_phases.callbacks._monitor import publish
from lightning_phases.callbacks._safety import SafetyNet
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional.phases import PHASE_MODELS, PhaseTracker, PhaseTransition, required_keys

__all__ = ["PhaseDetector"]


_TRIGGERS = (keys.order("measured_step"), keys.split("measured_step"))
_PROVIDERS = {keys.ORDER_PREFIX + "/": "OrderParameterMonitor", keys.SPLIT_PREFIX + "/": "NoiseSplitTracker"}
_STAT_PREFIXES = tuple(p + "/" for p in (keys.ORDER_PREFIX, keys.SPLIT_PREFIX, keys.SEGMENT_PREFIX))


def _logged(statistics: tuple[str, ...]) -> list[str]:
    """The logged keys of PhaseTracker statistics (SPEC names)."""
    return [keys.TRACKER_STATISTICS[s] for s in statistics]


PhaseModel = Literal["auto", "two", "four"]
# PhaseDetector's threshold defaults are PhaseTracker's (one place for each value)
_TRACKER = {k: p.default for k, p in inspect.signature(PhaseTracker).parameters.items()}


def _statistics(metrics: Any) -> dict[str, float]:
    """The published phase statistics among ``metrics``, as floats."""
    return {k: float(v) for k, v in metrics.items() if k.startswith(_STAT_PREFIXES)}


class PhaseDetector(SafetyNet, Callback):
    """Detect the phases of learning from the statistics other callbacks publish.

    Reads ``trainer.callback_metrics`` -- as ``EarlyStopping`` reads its
    monitor -- after each new measurement of
    :class:`~lightning_phases.callbacks.OrderParameterMonitor` and
    :class:`~lightning_phases.callbacks.NoiseSplitTracker` (it never imports
    or references them) and feeds a
    :class:`~lightning_phases.functional.phases.PhaseTracker`: the two phases
    of clean data (``fast_learning`` → ``exploration``), the four phases with
    mislabeled data (``I`` → ``IV``, SPEC.md §2), and the end of clean-priority
    learning (the segment ratio falling to 1, SPEC.md §3). Decisions are
    causal, smoothed and hysteretic; every rank sees the same reduced
    statistics, so every rank takes the same decision.

    Its place in the callback list does not change the measurements: a
    measurement is taken once per measured step, when every provider has
    published it (a measurement still waiting when a checkpoint is written is
    saved with it and taken on resume). Put it after the monitors, on the same
    schedule, so that this happens in the same hook; otherwise it waits for
    its next hook, and a ``stop`` takes effect one training step later.

    **Stopping point.** The recommended stop is where the clean data is
    learned and the mislabeled data not yet: the end of phase II, i.e. the
    first of the *memorisation onset* (the smoothed ``split/err_w`` has
    fallen ``memorisation_drop`` below its phase-II maximum: the network has
    started to fit the wrong labels) and the start of phase III (see
    :class:`~lightning_phases.functional.phases.PhaseTracker`). The loss-gap
    plateau (``clean_learned``) and the end of clean-priority learning are
    reported as events along the way.

    **Kept weights.** Phase II is a plateau on which SGD wanders between
    equally good solutions (Feng & Tu's exploration), and the test accuracy of
    single iterates there fluctuates by a few points from epoch to epoch. With
    ``average_weights=True`` (default) the detector keeps the average of the
    weights measured from the start of phase II to the stop -- stochastic
    weight averaging over the plateau -- in ``recommended_state_dict``
    (floating-point entries of the ``state_dict`` averaged, others as at the
    stop; BatchNorm running statistics are averaged too, so for such models
    consider recomputing them, e.g. with ``torch.optim.swa_utils.update_bn``).
    This costs one float64 copy of the weights on the CPU, which is also part
    of the detector's checkpoint state (so a resumed run continues the
    average), together with the kept weights once there are any. With
    ``average_weights=False`` it keeps the weights at the stop. If training
    ends in phase II, the average so far is kept (no stop is recommended).
    ``benchmarks/early_stopping.py`` measures both against an oracle and
    ``EarlyStopping``. At the stop the detector optionally writes a
    checkpoint with the kept weights (``save_checkpoint=True``:
    ``<log_dir>/phase_recommended.ckpt``) and optionally stops training
    (``stop=True``). It also publishes ``phase/recommended`` (1.0 at that
    measurement, 0.0 otherwise), so ``ModelCheckpoint(monitor="phase/recommended",
    mode="max", save_top_k=1, save_on_train_epoch_end=True)`` keeps the
    weights *at* the stop. No clean validation data is needed.

    Args:
        model: Phase model: ``"auto"`` (four phases when a split tracker is among the callbacks and
            its first measurement has split statistics; two otherwise, e.g. on clean data, where the
            probe has no mislabeled samples), ``"two"`` or ``"four"``.
        smoothing: EMA weight of the newest measurement, in ``(0, 1]``.
        patience: Consecutive measurements a transition condition must hold.
        stop: Stop training at the recommended point.
        save_checkpoint: Write ``phase_recommended.ckpt`` (with the kept weights) at the recommended point.
        average_weights: Keep the weights averaged over phase II (default) instead of those at the stop.
        strict: Fail in ``setup()`` when no callback provides the needed statistics.
        verbose: Print each transition and the phase timeline at the end of fitting.
        r_explore, sigma2_explore: Two-phase thresholds of
            :class:`~lightning_phases.functional.phases.PhaseTracker` (the run
            explores once the smoothed ``order/R < r_explore`` and
            ``order/sigma2_lambda > sigma2_explore``).
        balance, r_cw_oppose, r_cw_align, memorised, activity_drop: Four-phase
            thresholds of :class:`~lightning_phases.functional.phases.PhaseTracker`.
        segment_end: Segment ratio that ends clean-priority learning.
        gap_plateau: Relative growth per measurement of the loss gap at or below
            which the clean data counts as learned in phase II.
        memorisation_drop: Fall of the smoothed ``split/err_w`` below its phase-II
            maximum that marks the memorisation onset.

    **Never ends the run.** Every piece of work after a measurement (the
    tracker update, the weight average, logging, the TensorBoard text, the
    checkpoint) runs in a warn-once-and-skip net: a failure warns once per kind
    (rank zero), is counted in ``phase/skipped``, and training goes on.
    ``phase_recommended.ckpt`` is written atomically (a temporary file in the
    same directory, then ``os.replace``): an old file is replaced whole or left
    as it was; under DDP the checkpoint's collective is matched on every rank
    even when the write fails, and every rank agrees whether it was written.

    **Lifecycle.** Each ``trainer.fit`` starts fresh: the same detector reused
    for a second ``fit`` forgets the first one's measurements, phases, kept
    weights and recommendation in ``setup``. A ``fit(ckpt_path=...)`` then
    restores the checkpoint's state (``load_state_dict``), so a resumed run
    continues where it was.

    Logged metrics:
        - ``phase/index``: index of the current phase (0-based) after each measurement.
        - ``phase/recommended``: 1.0 at the measurement of the recommended stop, else 0.0.
        - ``phase/recommended_step``: global step of the recommended stop (once known).
        - ``phase/skipped``: pieces of work that failed and were skipped so far (logged when one fails).
        - TensorBoard only: a text entry ``phase/transitions`` per transition.
    """

    _net_name = "PhaseDetector"
    _skipped_key = keys.phase("skipped")

    def __init__(
        self,
        model: PhaseModel = "auto",
        *,
        smoothing: float = _TRACKER["smoothing"],
        patience: int = _TRACKER["patience"],
        stop: bool = False,
        save_checkpoint: bool = False,
        average_weights: bool = True,
        strict: bool = True,
        verbose: bool = True,
        r_explore: float = _TRACKER["r_explore"],
        sigma2_explore: float = _TRACKER["sigma2_explore"],
        balance: float = _TRACKER["balance"],
        r_cw_oppose: float = _TRACKER["r_cw_oppose"],
        r_cw_align: float = _TRACKER["r_cw_align"],
        memorised: float = _TRACKER["memorised"],
        activity_drop: float = _TRACKER["activity_drop"],
        segment_end: float = _TRACKER["segment_end"],
        gap_plateau: float = _TRACKER["gap_plateau"],
        memorisation_drop: float = _TRACKER["memorisation_drop"],
    ) -> None:
        super().__init__()
        if not isinstance(model, str) or model not in PHASE_MODELS:
            raise LightningPhasesError(f"model must be one of {PHASE_MODELS}; got {model!r}.")
        for name, value in (
            ("stop", stop),
            ("save_checkpoint", save_checkpoint),
            ("average_weights", average_weights),
            ("strict", strict),
            ("verbose", verbose),
        ):
            if not isinstance(value, bool):
                raise LightningPhasesError(f"{name} must be True or False (a bool, not a string); got {value!r}.")
        thresholds = dict(
            r_explore=r_explore,
            sigma2_explore=sigma2_explore,
            balance=balance,
            r_cw_oppose=r_cw_oppose,
            r_cw_align=r_cw_align,
            memorised=memorised,
            activity_drop=activity_drop,
            segment_end=segment_end,
            gap_plateau=gap_plateau,
            memorisation_drop=memorisation_drop,
        )
        self.tracker = PhaseTracker(model, smoothing=smoothing, patience=patience, **thresholds)
        self.thresholds = thresholds
        self.model = model
        self.stop = bool(stop)
        self.save_checkpoint = bool(save_checkpoint)
        self.average_weights = bool(average_weights)
        self.strict = bool(strict)
        self.verbose = bool(verbose)
        self._seen: dict[str, float] = {}
        self._quiet: tuple[Any, ...] | None = None  # the published triggers at the last poll that found nothing new
        self._where: tuple[int | None, int | None] = (None, None)  # (step, epoch) of the last completed step
        self._expected: tuple[str, ...] = ()  # measured-step keys the Trainer's callbacks publish (from setup)
        self._trainer: pl.Trainer | None = None
        self._pending: dict[str, Any] | None = None  # a waiting measurement restored from a checkpoint
        self.recommended_state_dict: dict[str, torch.Tensor] | None = None
        self.recommended_checkpoint: str | None = None
        # running sum of the weights measured in phase II (float entries, CPU, float64) and their count
        self._weight_sum: dict[str, torch.Tensor] | None = None
        self._weight_count: int = 0
        self.skipped: int = 0  # pieces of work that failed and were skipped (logged as phase/skipped)
        self._failed: set[str] = set()  # kinds of failure already warned about (once each)

    def _reset(self) -> None:
        """Forget every measurement: a new ``fit`` starts here (a resumed one then loads its checkpoint)."""
        self.tracker.reset()
        self._seen = {}
        self._quiet = None
        self._where = (None, None)
        self._pending = None
        self.recommended_state_dict = None
        self.recommended_checkpoint = None
        self._weight_sum = None
        self._weight_count = 0
        self.skipped = 0
        self._failed = set()

    @property
    def state_key(self) -> str:
        # Lightning reads this on every hook call (profiler names): build the string once per identity
        ident = (self.model, self.average_weights)
        if getattr(self, "_state_key_cache", (None, ""))[0] != ident:
            self._state_key_cache = (
                ident,
                self._generate_state_key(model=self.model, average_weights=self.average_weights),
            )
        return self._state_key_cache[1]

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per measurement: step, epoch, phase, phase index."""
        return self.tracker.history

    @property
    def transitions(self) -> list[PhaseTransition]:
        """Every detected transition and event, in order."""
        return self.tracker.transitions

    @property
    def phase(self) -> str | None:
        """The current phase."""
        return self.tracker.phase

    @property
    def recommended(self) -> PhaseTransition | None:
        """The recommended stopping point (``None`` until detected)."""
        return self.tracker.recommended

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # a new fit starts fresh; fit(ckpt_path=...) restores the checkpoint's state after this hook
        self._reset()
        self._trainer = trainer  # for state_dict: a measurement waiting for its next hook is saved with its statistics
        provided: set[str] = set()
        for cb in trainer.callbacks:
            provided.update(getattr(cb, "phase_metrics", ()) or ())
        self._expected = tuple(k for k in _TRIGGERS if k in provided)
        if self.model == "auto" and self.tracker.model is None and provided:
            # decide from what the Trainer's callbacks will publish; the first measurement revises it to the
            # two-phase model when the split tracker publishes nothing (no mislabeled probe samples: clean data)
            self.tracker.model = "four" if all(k in provided for k in _logged(required_keys("four"))) else "two"
        if not self.strict:
            return
        needed = _logged(required_keys("two"))
        if self.model == "four":
            needed += _logged(required_keys("four"))
        missing = [k for k in needed if k not in provided]
        if missing:
            names = sorted({name for prefix, name in _PROVIDERS.items() if any(k.startswith(prefix) for k in missing)})
            raise LightningPhasesError(
                f"PhaseDetector(model={self.model!r}) needs {missing}, which no callback of this Trainer provides. "
                f"Add {' and '.join(names)} to Trainer(callbacks=[...]) (or pass strict=False if you log them yourself)."
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None

    # ------------------------------------------------------------------ hooks
    # Every hook polls. A provider later in the callback list publishes after this detector's hook in the
    # same round; a measurement whose providers have not all caught up is therefore taken at the next hook
    # (`_poll`), and each measured step is taken once.
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._where = (trainer.global_step, trainer.current_epoch)
        self._poll(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._poll(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._poll(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._where = (trainer.global_step, trainer.current_epoch)
        self._poll(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:  # resumed from a checkpoint saved while a measurement waited for its next hook
            pending, self._pending = self._pending, None
            where = pending.get("where") or (None, None)
            self._where = (where[0], where[1])
            self._poll(trainer, pl_module, final=True, metrics=pending.get("metrics", {}))
        self._where = (trainer.global_step, trainer.current_epoch)
        self._poll(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._poll(trainer, pl_module, final=True)
        # phase II had not ended when training did: keep its average so far (no stop was recommended)
        if (
            self.recommended_state_dict is None
            and self.average_weights
            and self._weight_count
            and not self._attempt(trainer, "keeping the phase-II weights", self._keep_weights, pl_module)
        ):
            rank_zero_info(
                f"PhaseDetector: training ended in phase II; keeping the weights averaged over its "
                f"{self._weight_count} measurements (no stopping point was recommended)."
            )
        self._note_too_few_measurements()
        if self.verbose:
            self._attempt(trainer, "the summary", lambda: rank_zero_info(self.summary()))

    def _note_too_few_measurements(self) -> None:
        """Say so at the end of fitting when the run gave too few measurements for two phase changes."""
        n, needed = self.tracker.num_measurements, 2 * self.tracker.patience
        if self.tracker.recommended is not None or n >= needed:
            return
        rank_zero_info(
            f"PhaseDetector: {n} measurement(s) in this run, fewer than the {needed} (2 x patience) in which phase "
            "II can begin and end, so the phases could not be told apart and no stop was recommended. The "
            "monitors measure within an overhead budget (by default 10% of the training time; on a short run "
            "that may be the measurement at the start alone): pass a larger overhead= or every_n_epochs=1 to "
            "OrderParameterMonitor and NoiseSplitTracker, or a smaller probe_size."
        )

    def _keep_weights(self, pl_module: pl.LightningModule) -> None:
        self.recommended_state_dict = self._kept_weights(pl_module)

    # ------------------------------------------------------------------ logic
    def _new_measurement(self, metrics: dict[str, Any], final: bool) -> int | None:
        """The step of a measurement not taken yet whose providers have all published, else ``None``.

        A provider whose latest step is behind the newest one may still publish in this hook round (it
        comes later in the callback list): the measurement waits for the next hook, once, and is then
        taken with whatever has been published (a provider on a slower schedule keeps its last values).
        """
        # the detector polls at every hook; while the providers have published nothing since the last poll
        # that found nothing new (the same tensor objects: `publish` makes new ones), nothing is read
        published = tuple(metrics.get(k) for k in _TRIGGERS)
        if self._quiet is not None and all(a is b for a, b in zip(published, self._quiet)):
            return None
        steps = {k: float(metrics[k]) for k in _TRIGGERS if k in metrics}
        if not steps or max(steps.values()) <= self._seen.get("taken", -math.inf):
            self._quiet = published
            return None
        self._quiet = None
        newest = max(steps.values())
        behind = any(steps.get(k, -math.inf) < newest for k in (*steps, *self._expected))
        if not final and behind and self._seen.get("waited") != newest:
            self._seen["waited"] = newest
            return None
        self._seen["taken"] = newest
        return int(newest)

    def _poll(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        final: bool = False,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        metrics = trainer.callback_metrics if metrics is None else metrics
        try:
            step = self._new_measurement(metrics, final)
            stats = None if step is None else _statistics(metrics)
        except Exception as error:  # published values it cannot read: the same on every rank
            self._skip(trainer, "reading the published statistics", error)
            return
        if step is None or stats is None:
            return
        self._take(trainer, pl_module, step, stats)

    def _take(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, stats: dict[str, float]) -> None:
        """Feed one measurement to the tracker and act on it; each piece of work in the safety net."""
        # the epoch of the hook in which that step completed (a deferred measurement is taken one hook later)
        where_step, where_epoch = self._where
        epoch = int(where_epoch if where_step == step and where_epoch is not None else trainer.current_epoch)
        before = self.tracker.recommended
        snapshot = self.tracker.state_dict()
        named = keys.tracker_statistics(stats)
        first_of_auto = self.model == "auto" and self.tracker.num_measurements == 0 and self.tracker.model == "four"
        if first_of_auto and not any(k in named for k in ("A0_c", "A0_w", "R_cw")):
            # the split tracker publishes nothing: its probe has no mislabeled samples (clean data)
            self.tracker.model = "two"
        try:
            found = self.tracker.update(named, step=step, epoch=epoch)
        except Exception as error:  # the same statistics on every rank: the same outcome on every rank
            self.tracker.load_state_dict(snapshot)
            self._skip(trainer, "the phase update", error)
            return
        if self.average_weights and before is None and self.tracker.model == "four" and self.tracker.phase_index >= 1:
            self._attempt(trainer, "the phase-II weight average", self._accumulate, pl_module)
        out = {keys.phase("index"): float(self.tracker.phase_index)}
        now = self.tracker.recommended
        is_new_recommendation = before is None and now is not None
        out[keys.phase("recommended")] = 1.0 if is_new_recommendation else 0.0
        if now is not None:
            out[keys.phase("recommended_step")] = float(now.step)
        self._attempt(trainer, "logging the metrics", self._publish, trainer, out)
        for t in found:
            self._attempt(trainer, "reporting a transition", self._report, trainer, t)
        if is_new_recommendation and now is not None:
            self._on_recommended(trainer, pl_module, now)

    # the safety net (_skip, _attempt, _any_rank) comes from callbacks/_safety.SafetyNet

    def _report(self, trainer: pl.Trainer, t: PhaseTransition) -> None:
        what = {
            "phase": f"phase {t.from_phase} -> {t.to_phase}",
            "clean_learned": "clean data learned (the loss gap L_w - L_c stopped growing in phase II)",
            "memorisation_onset": "memorisation onset (err_w on the mislabeled samples started to fall)",
        }.get(t.kind, "clean-priority learning ended (segment ratio reached 1)")
        shown = ("A0_c", "A0_w", "R_cw", "err_w", "L_c", "L_w", "R", "sigma2_lambda", "segment_ratio")
        trig = ", ".join(f"{keys.TRACKER_STATISTICS[k]}={t.statistics[k]:.4g}" for k in shown if k in t.statistics)
        text = f"step {t.step} (epoch {t.epoch}): {what}; smoothed {trig}"
        if self.verbose:
            rank_zero_info(f"PhaseDetector: {text}")
        for writer in tensorboard_writers(trainer):
            writer.add_text(keys.phase("transitions"), text, t.step)

    def _accumulate(self, pl_module: pl.LightningModule) -> None:
        """Add the current weights to the phase-II running sum (float entries; others keep the latest value)."""
        state = pl_module.state_dict()
        if self._weight_sum is None:
            self._weight_sum = {
                k: v.detach().to("cpu", torch.float64, copy=True) for k, v in state.items() if v.is_floating_point()
            }
        else:
            for k, total in self._weight_sum.items():
                total += state[k].detach().to("cpu", torch.float64)
        self._weight_count += 1

    def _kept_weights(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The phase-II average (when averaging and anything was summed) or the current weights, on the CPU."""
        current = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        if not (self.average_weights and self._weight_sum is not None and self._weight_count):
            return current
        return {
            k: (self._weight_sum[k] / self._weight_count).to(v.dtype) if k in self._weight_sum else v
            for k, v in current.items()
        }

    def _on_recommended(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: PhaseTransition) -> None:
        if self.stop:
            trainer.should_stop = True  # the decision first: nothing below can prevent it
        failed = self._attempt(trainer, "keeping the recommended weights", self._keep_weights, pl_module)
        if self._any_rank(trainer, pl_module, failed):  # every rank goes on to the checkpoint, or none does
            self.recommended_state_dict = None
        what = (
            "the weights averaged over" if self.average_weights and self._weight_count else "the weights at the end of"
        )
        rank_zero_info(
            f"PhaseDetector: recommended stop at step {t.step} (epoch {t.epoch}), the end of phase II: the clean data "
            f"is learned and the mislabeled data not yet; keeping {what} phase II "
            f"({self._weight_count} measurement{'s' if self._weight_count != 1 else ''})."
        )
        if self.save_checkpoint and self.recommended_state_dict is not None:  # the same on every rank
            directory = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
            path = os.path.join(directory, "phase_recommended.ckpt")
            failed = self._attempt(
                trainer, "writing phase_recommended.ckpt", self._save_with_kept_weights, trainer, pl_module, path
            )
            if not self._any_rank(trainer, pl_module, failed):  # every rank agrees whether it was written
                self.recommended_checkpoint = path

    def _save_with_kept_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: str) -> None:
        """Write a Lightning checkpoint whose weights are the kept ones, atomically; the live weights are put back.

        ``trainer.save_checkpoint`` ends in a barrier on every rank; when it fails before reaching it (the
        write fails on rank zero, the only rank that writes), the barrier is called here instead, so the
        ranks stay in step. (Strategies whose checkpoint dump is itself a collective, such as FSDP, are not
        covered by this.)
        """
        live = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        reached = False
        try:
            pl_module.load_state_dict(self.recommended_state_dict)  # type: ignore[arg-type]
            if trainer.is_global_zero:
                with atomic_path(path) as tmp:
                    trainer.save_checkpoint(tmp)
                    reached = True
            else:
                trainer.save_checkpoint(path)  # only rank zero writes; the call ends in a barrier
                reached = True
        except Exception:
            if not reached and trainer.world_size > 1:
                trainer.strategy.barrier("Trainer.save_checkpoint")  # the one the failed call did not reach
            raise
        finally:
            pl_module.load_state_dict(live)

    def _publish(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        publish(trainer, metrics)  # the monitors' one rule: non-finite values are neither logged nor published

    def restore_recommended(self, pl_module: torch.nn.Module) -> None:
        """Load the weights kept at the recommended stop into ``pl_module``.

        Raises:
            LightningPhasesError: no stopping point was recommended.
        """
        if self.recommended_state_dict is None:
            raise LightningPhasesError("No stopping point has been recommended yet; there are no weights to restore.")
        pl_module.load_state_dict(copy.deepcopy(self.recommended_state_dict))

    def summary(self) -> str:
        """A short phase timeline: epochs per phase, transitions and the recommended stop."""
        lines = [f"Phase timeline ({self.tracker.model or 'no'} model, {self.tracker.num_measurements} measurements):"]
        for phase, first, last in self.tracker.timeline():
            lines.append(
                f"  {phase:<14s} epochs {first}-{last} ({last - first + 1} epoch{'s' if last > first else ''})"
            )
        rec = self.tracker.recommended
        why = {"memorisation_onset": "memorisation onset: err_w started to fall", "phase": "start of phase III"}
        lines.append(
            f"  recommended stop: step {rec.step}, epoch {rec.epoch} ({why.get(rec.kind, rec.kind.replace('_', ' '))})"
            if rec
            else "  recommended stop: not reached"
        )
        if self.recommended_state_dict is not None:
            kept = (
                f"averaged over {self._weight_count} phase-II measurements"
                if self.average_weights and self._weight_count
                else "at the recommended stop"
            )
            lines.append(f"  kept weights: {kept} (recommended_state_dict)")
        return "\n".join(lines)

    # ------------------------------------------------------------------ state
    def _waiting_measurement(self) -> dict[str, Any] | None:
        """A measurement that waits for the next hook, with the statistics published so far (for a checkpoint)."""
        if self._pending is not None:
            return self._pending
        if self._trainer is None:
            return None
        published = self._trainer.callback_metrics
        newest = max((float(published[k]) for k in _TRIGGERS if k in published), default=-math.inf)
        if not newest > self._seen.get("taken", -math.inf):  # published after this detector's last hook, not taken yet
            return None
        return {"metrics": _statistics(published), "where": [self._trainer.global_step, self._trainer.current_epoch]}

    def state_dict(self) -> dict[str, Any]:
        return {
            "pending": self._waiting_measurement(),
            "tracker": self.tracker.state_dict(),
            "seen": dict(self._seen),
            "recommended_checkpoint": self.recommended_checkpoint,
            "weight_sum": self._weight_sum,
            "weight_count": self._weight_count,
            "recommended_state_dict": self.recommended_state_dict,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict.get("tracker", {}))
        self._seen = {k: float(v) for k, v in state_dict.get("seen", {}).items()}
        self._quiet = None
        if "taken" not in self._seen and any(
            k in self._seen for k in _TRIGGERS
        ):  # checkpoints written before "taken" was kept
            self._seen["taken"] = max(v for k, v in self._seen.items() if k in _TRIGGERS)
        self._pending = state_dict.get("pending")
        self.recommended_checkpoint = state_dict.get("recommended_checkpoint")
        self._weight_sum = state_dict.get("weight_sum")
        self._weight_count = int(state_dict.get("weight_count", 0))
        self.recommended_state_dict = state_dict.get("recommended_state_dict")
        self.skipped = int(state_dict.get("skipped", 0))
