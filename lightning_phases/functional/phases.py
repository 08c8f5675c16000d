"""Online phase classification from a series of order parameters (SPEC.md §2, §3).

:class:`PhaseTracker` reads one set of statistics per measurement and
decides, causally, which phase of learning the run is in:

* ``"two"`` (clean data, Feng & Tu 2021 section 3): ``fast_learning`` → ``exploration``.
  The run enters exploration when the smoothed alignment ``R`` falls below
  ``r_explore`` *and* the smoothed ``sigma2_lambda`` exceeds ``sigma2_explore``.
* ``"four"`` (mislabeled data, section 4): ``I`` → ``II`` → ``III`` → ``IV``.
  Phase II starts when the directed activities balance
  (``A0_c/A0_w <= balance``) while the clean and mislabeled gradients oppose
  each other (``R_cw <= r_cw_oppose``); phase III when they align
  (``R_cw >= r_cw_align``); phase IV when the mislabeled samples are
  memorised (``err_w <= memorised``) and the activity has fallen below
  ``activity_drop`` times its phase-III maximum.

Independently it records the end of *clean-priority learning*: the first
measurement at which the smoothed mean segment ratio
``‖g_clean^(c)‖/‖g_noise^(c)‖`` falls to ``segment_end`` (1 by default, SPEC §3).

Every statistic is smoothed with an exponential moving average
(``smoothing`` is the weight of the newest value); a transition is taken only
after its condition has held for ``patience`` consecutive measurements, and
phases only advance, so noise cannot make the phase flap. The detection step
is the step of the measurement that completed the patience window.

Two more events are recorded in phase II. *Clean data learned*: the smoothed
loss gap ``L_w − L_c`` (the logged ``split/L_w − split/L_c``) has stopped growing -- its
relative growth per measurement stayed at or below ``gap_plateau`` for
``patience`` measurements (phase II often starts while the clean samples are
still being learned; the gap widens until they are). *Memorisation onset*:
the smoothed error on the mislabeled samples against their given labels,
``err_w``, has fallen ``memorisation_drop`` below its maximum since
phase II began, for ``patience`` measurements -- the network has started to
learn the wrong labels (SPEC §2: in phase III "err_w falls toward 0").

The recommended stopping point -- the clean data learned, the mislabeled
data not yet -- is the end of phase II: the first of the memorisation onset
and the start of phase III. (With statistics logged by hand that lack
``err_w``: the first of the loss-gap plateau, the start of phase III,
the start of phase II when no loss statistics are logged either, and the end
of clean-priority learning.) With the two-phase model there is none.
:class:`~lightning_phases.callbacks.PhaseDetector` keeps the weights averaged
over phase II up to that point (or the weights at it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_phases.errors import LightningPhasesError

__all__ = ["PhaseTracker", "PhaseTransition", "PHASE_MODELS", "PHASE_NAMES", "required_keys"]

PHASE_MODELS = ("auto", "two", "four")
PHASE_NAMES: dict[str, tuple[str, ...]] = {
    "two": ("fast_learning", "exploration"),
    "four": ("I", "II", "III", "IV"),
}
_KEYS = {
    "two": ("R", "sigma2_lambda"),
    "four": ("A0_c", "A0_w", "R_cw", "err_w", "A"),
}
_SEGMENT_KEY = "segment_ratio"
_GAP_KEYS = ("L_c", "L_w")


def required_keys(model: str) -> tuple[str, ...]:
    """The statistics (SPEC names, see :meth:`PhaseTracker.update`) a phase model reads."""
    if model not in PHASE_NAMES:
        raise LightningPhasesError(f"phase model must be one of {tuple(PHASE_NAMES)}; got {model!r}.")
    return _KEYS[model]


@dataclass(frozen=True)
class PhaseTransition:
    """One detected transition (or event).

    Attributes:
        kind: ``"phase"`` for a phase change, ``"clean_priority_end"`` for the segment-ratio event.
        from_phase: Phase before (the event's name for events).
        to_phase: Phase after.
        step: Global step of the measurement that confirmed it.
        epoch: Epoch of that measurement.
        measurement: Index of that measurement in the series.
        statistics: The smoothed statistics that triggered it.
    """

    kind: str
    from_phase: str
    to_phase: str
    step: int
    epoch: int
    measurement: int
    statistics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Thresholds:
    r_explore: float = 0.1
    sigma2_explore: float = 1.0
    balance: float = 2.0
    r_cw_oppose: float = -0.3
    r_cw_align: float = 0.0
    memorised: float = 0.05
    activity_drop: float = 0.5
    segment_end: float = 1.0


class PhaseTracker:
    """Causal, smoothed, hysteretic phase classification (see the module docstring).

    Args:
        model: ``"auto"`` (four phases once split statistics appear, else two),
            ``"two"`` or ``"four"``.
        smoothing: EMA weight of the newest value, in ``(0, 1]`` (1 = no smoothing).
        patience: Consecutive measurements a condition must hold, ``>= 1``.
        r_explore, sigma2_explore: Two-phase thresholds.
        balance, r_cw_oppose, r_cw_align, memorised, activity_drop: Four-phase thresholds.
        segment_end: Segment ratio that ends clean-priority learning.
        gap_plateau: In phase II, relative growth per measurement of the
            smoothed loss gap ``L_w − L_c`` at or below which (for
            ``patience`` measurements) the clean data counts as learned. The
            default 0.01 suits one measurement per epoch.
        memorisation_drop: Fall of the smoothed ``err_w`` below its phase-II
            maximum, in ``(0, 1)``, that marks the memorisation onset (for
            ``patience`` measurements); default 0.03.

    Raises:
        LightningPhasesError: an unknown model, ``patience < 1``, a threshold
            that is not a finite number, ``smoothing`` outside ``(0, 1]``,
            ``balance < 1``, correlations outside ``[-1, 1]`` or
            ``r_cw_oppose > r_cw_align``, ``memorised`` outside ``[0, 1)``,
            ``activity_drop`` outside ``(0, 1]``, ``sigma2_explore`` or
            ``segment_end <= 0``, ``gap_plateau < 0``, ``memorisation_drop``
            outside ``(0, 1)``.
    """

    def __init__(
        self,
        model: str = "auto",
        *,
        smoothing: float = 0.5,
        patience: int = 2,
        r_explore: float = 0.1,
        sigma2_explore: float = 1.0,
        balance: float = 2.0,
        r_cw_oppose: float = -0.3,
        r_cw_align: float = 0.0,
        memorised: float = 0.05,
        activity_drop: float = 0.5,
        segment_end: float = 1.0,
        gap_plateau: float = 0.01,
        memorisation_drop: float = 0.03,
    ) -> None:
        if model not in PHASE_MODELS:
            raise LightningPhasesError(f"phase model must be one of {PHASE_MODELS}; got {model!r}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise LightningPhasesError(f"patience must be an int >= 1; got {patience!r}.")
        for name, value in (
            ("smoothing", smoothing),
            ("r_explore", r_explore),
            ("sigma2_explore", sigma2_explore),
            ("balance", balance),
            ("r_cw_oppose", r_cw_oppose),
            ("r_cw_align", r_cw_align),
            ("memorised", memorised),
            ("activity_drop", activity_drop),
            ("segment_end", segment_end),
            ("gap_plateau", gap_plateau),
            ("memorisation_drop", memorisation_drop),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LightningPhasesError(f"{name} must be a finite number; got {value!r}.")
        if not 0 < smoothing <= 1:
            raise LightningPhasesError(f"smoothing must be in (0, 1]; got {smoothing!r}.")
        if balance < 1:
            raise LightningPhasesError(f"balance is a ratio A0_c/A0_w threshold >= 1; got {balance!r}.")
        if not -1 <= r_explore <= 1 or not -1 <= r_cw_oppose <= 1 or not -1 <= r_cw_align <= 1:
            raise LightningPhasesError(
                f"r_explore, r_cw_oppose and r_cw_align are correlations in [-1, 1]; got {r_explore!r}, {r_cw_oppose!r}, {r_cw_align!r}."
            )
        if r_cw_oppose > r_cw_align:
            raise LightningPhasesError(f"r_cw_oppose ({r_cw_oppose}) must not exceed r_cw_align ({r_cw_align}).")
        if not 0 <= memorised < 1:
            raise LightningPhasesError(f"memorised is an error rate in [0, 1); got {memorised!r}.")
        if not 0 < activity_drop <= 1:
            raise LightningPhasesError(
                f"activity_drop is a fraction of the peak activity in (0, 1]; got {activity_drop!r}."
            )
        if sigma2_explore <= 0 or segment_end <= 0:
            raise LightningPhasesError(
                f"sigma2_explore and segment_end must be > 0; got {sigma2_explore!r}, {segment_end!r}."
            )
        self.requested_model = model
        self.smoothing = float(smoothing)
        self.patience = patience
        if not gap_plateau >= 0:
            raise LightningPhasesError(f"gap_plateau is a relative growth >= 0; got {gap_plateau!r}.")
        self.thresholds = _Thresholds(
            r_explore, sigma2_explore, balance, r_cw_oppose, r_cw_align, memorised, activity_drop, segment_end
        )
        self.gap_plateau = float(gap_plateau)
        if not 0 < memorisation_drop < 1:
            raise LightningPhasesError(f"memorisation_drop is a fall of err_w in (0, 1); got {memorisation_drop!r}.")
        self.memorisation_drop = float(memorisation_drop)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything measured so far."""
        self.model: str | None = None if self.requested_model == "auto" else self.requested_model
        self.phase_index = 0
        self.num_measurements = 0
        self.smoothed: dict[str, float] = {}
        self.streak = 0
        self.segment_streak = 0
        self.peak_activity = 0.0
        self.gap_prev: float | None = None
        self.gap_streak = 0
        self.err_w_max: float | None = None
        self.onset_streak = 0
        self.transitions: list[PhaseTransition] = []
        self.history: list[dict[str, Any]] = []

    @property
    def phase(self) -> str | None:
        """Name of the current phase (``None`` before the first measurement)."""
        if self.model is None:
            return None
        return PHASE_NAMES[self.model][self.phase_index]

    @property
    def phases(self) -> tuple[str, ...]:
        """The phase names of the model in use."""
        return PHASE_NAMES[self.model] if self.model else ()

    @property
    def clean_priority_end(self) -> PhaseTransition | None:
        """The event at which the segment ratio reached ``segment_end``, if it has."""
        return next((t for t in self.transitions if t.kind == "clean_priority_end"), None)

    @property
    def clean_learned(self) -> PhaseTransition | None:
        """The event at which the loss gap stopped growing in phase II, if it has."""
        return next((t for t in self.transitions if t.kind == "clean_learned"), None)

    @property
    def memorisation_onset(self) -> PhaseTransition | None:
        """The event at which the mislabeled samples started to be memorised, if it has happened."""
        return next((t for t in self.transitions if t.kind == "memorisation_onset"), None)

    @property
    def has_gap(self) -> bool:
        """Whether the four-phase model has seen the loss statistics ``L_c`` and ``L_w``."""
        return self.model == "four" and all(k in self.smoothed for k in _GAP_KEYS)

    @property
    def recommended(self) -> PhaseTransition | None:
        """The recommended stopping point (see the module docstring); ``None`` until there is one.

        With the four-phase model and ``err_w``: the end of phase II, i.e.
        the first of the memorisation onset (``kind="memorisation_onset"``) and
        the start of phase III. Without ``err_w`` (statistics logged by
        hand): the first of the loss-gap plateau in phase II
        (``kind="clean_learned"``), the start of phase III, the start of phase
        II when no loss statistics are logged either, and the end of
        clean-priority learning.
        """
        phase_start = {t.to_phase: t for t in self.transitions if t.kind == "phase"}
        if self.model == "four" and "err_w" in self.smoothed:
            candidates = [t for t in self.transitions if t.kind == "memorisation_onset"]
            candidates += [phase_start[p] for p in ("III", "IV") if p in phase_start]
            return min(candidates, key=lambda t: t.measurement) if candidates else None
        candidates = [t for t in self.transitions if t.kind in ("clean_learned", "clean_priority_end")]
        if self.has_gap:
            if "III" in phase_start:
                candidates.append(phase_start["III"])
        elif "II" in phase_start:
            candidates.append(phase_start["II"])
        return min(candidates, key=lambda t: t.measurement) if candidates else None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the series after a restart."""
        return {
            "model": self.model,
            "phase_index": self.phase_index,
            "num_measurements": self.num_measurements,
            "smoothed": dict(self.smoothed),
            "streak": self.streak,
            "segment_streak": self.segment_streak,
            "peak_activity": self.peak_activity,
            "gap_prev": self.gap_prev,
            "gap_streak": self.gap_streak,
            "err_w_max": self.err_w_max,
            "onset_streak": self.onset_streak,
            "transitions": [asdict(t) for t in self.transitions],
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (missing keys keep their defaults)."""
        self.reset()
        self.model = state.get("model", self.model)
        self.phase_index = int(state.get("phase_index", 0))
        self.num_measurements = int(state.get("num_measurements", 0))
        self.smoothed = {k: float(v) for k, v in state.get("smoothed", {}).items()}
        self.streak = int(state.get("streak", 0))
        self.segment_streak = int(state.get("segment_streak", 0))
        self.peak_activity = float(state.get("peak_activity", 0.0))
        self.gap_prev = None if state.get("gap_prev") is None else float(state["gap_prev"])
        self.gap_streak = int(state.get("gap_streak", 0))
        self.err_w_max = None if state.get("err_w_max") is None else float(state["err_w_max"])
        self.onset_streak = int(state.get("onset_streak", 0))
        self.transitions = [PhaseTransition(**t) for t in state.get("transitions", [])]
        self.history = [dict(h) for h in state.get("history", [])]

    # ------------------------------------------------------------------ update
    def _smooth(self, stats: Mapping[str, float]) -> None:
        a = self.smoothing
        for key, value in stats.items():
            value = float(value)
            if not math.isfinite(value):
                continue
            prev = self.smoothed.get(key)
            self.smoothed[key] = value if prev is None else a * value + (1 - a) * prev

    def _condition(self) -> bool:
        """Whether the condition for leaving the current phase holds (on smoothed values)."""
        s, t = self.smoothed, self.thresholds
        if self.model == "two":
            if self.phase_index == 0:
                return s.get("R", math.inf) < t.r_explore and s.get("sigma2_lambda", 0.0) > t.sigma2_explore
            return False
        a0c, a0w, rcw = s.get("A0_c"), s.get("A0_w"), s.get("R_cw")
        if a0c is None or a0w is None or rcw is None:
            return False
        if self.phase_index == 0:
            return a0w > 0 and a0c / a0w <= t.balance and rcw <= t.r_cw_oppose
        if self.phase_index == 1:
            return rcw >= t.r_cw_align
        if self.phase_index == 2:
            err_w = s.get("err_w", math.inf)
            activity = s.get("A", s.get("A_c", math.inf))
            return err_w <= t.memorised and activity <= t.activity_drop * self.peak_activity
        return False

    def update(self, stats: Mapping[str, float], *, step: int, epoch: int = 0) -> list[PhaseTransition]:
        """Feed one measurement; return the transitions it confirmed (usually none).

        Args:
            stats: ``{statistic: value}`` by SPEC name (``R``, ``sigma2_lambda``,
                ``A``, ``A_c``, ``A0_c``, ``A0_w``, ``R_cw``, ``err_w``, ``L_c``,
                ``L_w``, and ``segment_ratio`` for SPEC §3's mean segment ratio);
                :class:`~lightning_phases.callbacks.PhaseDetector` maps the
                logged keys to these names (``lightning_phases.keys.TRACKER_STATISTICS``).
                Missing or non-finite values are ignored.
            step: Global step of the measurement.
            epoch: Epoch of the measurement.
        """
        if self.model is None:
            self.model = "four" if all(k in stats for k in ("A0_c", "A0_w", "R_cw")) else "two"
        self._smooth(stats)
        index = self.num_measurements
        self.num_measurements += 1
        if self.model == "four" and self.phase_index == 2:
            self.peak_activity = max(self.peak_activity, self.smoothed.get("A", self.smoothed.get("A_c", 0.0)))
        found: list[PhaseTransition] = []
        if self.phase_index < len(self.phases) - 1:
            self.streak = self.streak + 1 if self._condition() else 0
            if self.streak >= self.patience:
                old = self.phase
                self.phase_index += 1
                self.streak = 0
                if self.model == "four" and self.phase_index == 2:
                    self.peak_activity = self.smoothed.get("A", self.smoothed.get("A_c", 0.0))
                found.append(
                    PhaseTransition("phase", str(old), str(self.phase), step, epoch, index, dict(self.smoothed))
                )
        found.extend(self._gap_update(step, epoch, index))
        found.extend(self._onset_update(step, epoch, index))
        seg = self.smoothed.get(_SEGMENT_KEY)
        if self.clean_priority_end is None and seg is not None:
            self.segment_streak = self.segment_streak + 1 if seg <= self.thresholds.segment_end else 0
            if self.segment_streak >= self.patience:
                found.append(
                    PhaseTransition(
                        "clean_priority_end", "clean_priority", "balanced", step, epoch, index, dict(self.smoothed)
                    )
                )
        self.transitions.extend(found)
        self.history.append({"step": step, "epoch": epoch, "phase": self.phase, "phase_index": self.phase_index})
        return found

    def _gap_update(self, step: int, epoch: int, index: int) -> list[PhaseTransition]:
        """Track the smoothed loss gap; in phase II, report once when it stops growing."""
        if not self.has_gap:
            return []
        gap = self.smoothed["L_w"] - self.smoothed["L_c"]
        prev, self.gap_prev = self.gap_prev, gap
        if self.phase_index != 1 or self.clean_learned is not None or prev is None:
            return []
        growth = (gap - prev) / abs(gap) if gap != 0 else 0.0
        self.gap_streak = self.gap_streak + 1 if growth <= self.gap_plateau else 0
        if self.gap_streak < self.patience:
            return []
        return [PhaseTransition("clean_learned", "II", "II", step, epoch, index, dict(self.smoothed))]

    def _onset_update(self, step: int, epoch: int, index: int) -> list[PhaseTransition]:
        """From phase II on, report once when the smoothed ``err_w`` has fallen ``memorisation_drop`` below its maximum."""
        err_w = self.smoothed.get("err_w")
        if self.model != "four" or self.phase_index < 1 or err_w is None or self.memorisation_onset is not None:
            return []
        self.err_w_max = err_w if self.err_w_max is None else max(self.err_w_max, err_w)
        self.onset_streak = self.onset_streak + 1 if err_w <= self.err_w_max - self.memorisation_drop else 0
        if self.onset_streak < self.patience:
            return []
        return [PhaseTransition("memorisation_onset", "II", "II", step, epoch, index, dict(self.smoothed))]

    def run(self, series: Sequence[Mapping[str, float]], *, steps: Sequence[int] | None = None) -> list[str]:
        """Feed a whole recorded series causally; return the phase after each measurement."""
        out = []
        for i, stats in enumerate(series):
            self.update(stats, step=steps[i] if steps is not None else i, epoch=i)
            out.append(str(self.phase))
        return out

    def timeline(self) -> list[tuple[str, int, int]]:
        """``(phase, first_epoch, last_epoch)`` for each phase visited, from the history."""
        spans: list[tuple[str, int, int]] = []
        for h in self.history:
            if spans and spans[-1][0] == h["phase"]:
                spans[-1] = (spans[-1][0], spans[-1][1], h["epoch"])
            else:
                spans.append((h["phase"], h["epoch"], h["epoch"]))
        return spans
