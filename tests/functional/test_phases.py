"""PhaseTracker on recorded series whose right answer is known by construction."""

from __future__ import annotations

import math
import random

import pytest

from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional import PhaseTracker


def _four_phase_series(noise: float = 0.0, seed: int = 0, lengths=(10, 30, 15, 15)):
    """Split statistics following the four phases of SPEC §2, with optional multiplicative/additive noise."""
    rng = random.Random(seed)
    series, truth = [], []
    for phase, length in enumerate(lengths):
        for k in range(length):
            frac = k / max(1, length - 1)
            if phase == 0:  # A0_c >> A0_w, R_cw < 0
                a0c, a0w, rcw, err_w, a = 10.0 - 5 * frac, 0.5 + 0.5 * frac, -0.4 - 0.2 * frac, 0.9, 5.0
            elif phase == 1:  # balanced, opposed
                a0c, a0w, rcw, err_w, a = 1.0, 1.0, -0.8, 0.95, 5.0
            elif phase == 2:  # aligned, memorising
                a0c, a0w, rcw, err_w, a = 1.0, 1.2, 0.4, 0.9 - 0.85 * frac, 8.0
            else:  # memorised, activity collapsed, opposed again
                a0c, a0w, rcw, err_w, a = 0.05, 0.05, -0.5, 0.01, 0.5
            jitter = lambda v: v * (1 + noise * rng.uniform(-1, 1))  # noqa: E731
            series.append(
                {
                    "A0_c": jitter(a0c),
                    "A0_w": jitter(a0w),
                    "R_cw": rcw + noise * rng.uniform(-1, 1) * 0.3,
                    "err_w": err_w,
                    "A": jitter(a),
                    "R": 0.1,
                    "sigma2_lambda": 1.0,
                }
            )
            truth.append(("I", "II", "III", "IV")[phase])
    return series, truth


def test_clean_four_phase_series_is_read_exactly():
    series, truth = _four_phase_series()
    tracker = PhaseTracker(smoothing=1.0, patience=1)
    phases = tracker.run(series)
    assert tracker.model == "four"
    assert phases == truth
    assert [t.to_phase for t in tracker.transitions if t.kind == "phase"] == ["II", "III", "IV"]
    # err_w is flat in phase II and falls from phase III on: phase II ends at measurement 40
    assert tracker.recommended.measurement == 40 and tracker.recommended.epoch == 40


def test_noisy_series_does_not_flap_and_lags_by_little():
    for seed in range(5):
        series, truth = _four_phase_series(noise=0.6, seed=seed)
        tracker = PhaseTracker(smoothing=0.5, patience=2)
        phases = tracker.run(series)
        order = ["I", "II", "III", "IV"]
        idx = [order.index(p) for p in phases]
        assert idx == sorted(idx), "phases must only advance"
        phase_changes = [t for t in tracker.transitions if t.kind == "phase"]
        assert len(phase_changes) == 3  # each transition exactly once
        for t in phase_changes:
            true_start = truth.index(t.to_phase)
            assert true_start <= t.measurement <= true_start + 4, (seed, t)


def test_alternating_statistics_that_make_a_naive_rule_flap():
    """In phase II R_cw alternates +0.1 / -0.5: a raw `R_cw >= 0` rule flips every measurement."""
    series, truth = _four_phase_series()
    for i in range(14, 40):
        series[i]["R_cw"] = 0.1 if i % 2 == 0 else -0.5
    naive = ["III" if s["R_cw"] >= 0 else "II" for s in series[14:40]]
    assert naive.count("III") == 13  # the naive reading flips at every measurement
    tracker = PhaseTracker(smoothing=0.5, patience=2)
    phases = tracker.run(series)
    assert phases.index("III") >= 40  # smoothed + hysteretic: no false phase III
    assert [t.to_phase for t in tracker.transitions if t.kind == "phase"] == ["II", "III", "IV"]


def test_two_phase_model_on_clean_statistics():
    series = [{"R": 0.4 - 0.01 * i, "sigma2_lambda": 0.2 + 0.05 * i} for i in range(40)]
    tracker = PhaseTracker(patience=2)
    phases = tracker.run(series)
    assert tracker.model == "two"
    first = phases.index("exploration")
    # condition R < 0.1 and sigma2 > 1 first holds at i = 31 (raw); smoothing and patience delay it a little
    assert 31 <= first <= 35
    assert tracker.recommended is None
    assert tracker.timeline()[0][0] == "fast_learning"


def test_segment_ratio_end_of_clean_priority():
    series = [{"segment_ratio": 9.0 * math.exp(-i / 5) + 0.5, "R": 0.3, "sigma2_lambda": 0.5} for i in range(30)]
    tracker = PhaseTracker(smoothing=1.0, patience=2)
    tracker.run(series)
    event = tracker.clean_priority_end
    raw_first = next(i for i, s in enumerate(series) if s["segment_ratio"] <= 1.0)
    assert event is not None and event.measurement == raw_first + 1
    assert tracker.recommended == event


def test_nan_values_are_ignored():
    series, truth = _four_phase_series()
    series[3]["R_cw"] = float("nan")
    tracker = PhaseTracker(smoothing=1.0, patience=1)
    assert tracker.run(series) == truth


def _with_gap(series, gaps):
    for stats, gap in zip(series, gaps):
        stats["L_c"], stats["L_w"] = 0.5, 0.5 + gap
    return series


def _plateau_reference(gaps, start, tol, patience):
    """The rule written out: from phase II's first measurement `start` on, the first index that ends
    `patience` consecutive measurements whose relative gap growth (vs the previous measurement) is <= tol."""
    streak = 0
    for i in range(start, len(gaps)):
        growth = (gaps[i] - gaps[i - 1]) / abs(gaps[i])
        streak = streak + 1 if growth <= tol else 0
        if streak >= patience:
            return i
    return None


@pytest.mark.parametrize("patience", [1, 3])
def test_clean_learned_is_the_loss_gap_plateau_in_phase_two(patience):
    # phase II starts at measurement 10 while the gap still widens (clean data still being learned),
    # then the gap saturates: 1 - exp(-k/6) growth inside phase II
    series, _ = _four_phase_series()
    gaps = [0.1 * i for i in range(10)] + [1.0 + 2.0 * (1 - math.exp(-k / 6)) for k in range(30)] + [3.0] * 30
    series = _with_gap(series, gaps)
    tracker = PhaseTracker(smoothing=1.0, patience=patience, gap_plateau=0.01)
    tracker.run(series)
    start = tracker.transitions[0]
    assert start.to_phase == "II" and start.measurement == 10 + patience - 1  # phase II itself is unchanged
    expected = _plateau_reference(gaps, start.measurement, 0.01, patience)
    assert expected is not None and start.measurement + 5 < expected < 40
    assert tracker.clean_learned.measurement == expected
    assert tracker.recommended.measurement == 40 + patience - 1  # the stop is still the end of phase II
    # without err_w (statistics logged by hand) the plateau itself is the recommendation
    for stats in series:
        del stats["err_w"]
    bare = PhaseTracker(smoothing=1.0, patience=patience, gap_plateau=0.01)
    bare.run(series)
    assert bare.recommended.kind == "clean_learned" and bare.recommended.measurement == expected


def _onset_reference(err_w, phase_two_start, drop, patience, smoothing):
    """The memorisation-onset rule written out: EMA of err_w, running max from phase II's first
    measurement, first index ending `patience` consecutive measurements at or below max - drop."""
    ema, peak, streak = None, None, 0
    for i, e in enumerate(err_w):
        ema = e if ema is None else smoothing * e + (1 - smoothing) * ema
        if i < phase_two_start:
            continue
        peak = ema if peak is None else max(peak, ema)
        streak = streak + 1 if ema <= peak - drop else 0
        if streak >= patience:
            return i
    return None


@pytest.mark.parametrize("smoothing,patience,drop", [(1.0, 1, 0.03), (0.5, 2, 0.03), (0.5, 3, 0.05)])
def test_recommendation_is_the_memorisation_onset_in_phase_two(smoothing, patience, drop):
    """err_w rises, peaks in phase II, then the mislabeled samples start to be memorised before R_cw turns positive."""
    series, _ = _four_phase_series(lengths=(10, 40, 15, 15))
    rng = random.Random(7)
    err_w = []
    for i, stats in enumerate(series):
        if 10 <= i < 50:
            k = i - 10
            value = 0.90 + 0.006 * k if k < 10 else 0.96 - 0.004 * (k - 10)  # peak at 0.96, then a slow fall
            stats["err_w"] = value + rng.uniform(-0.01, 0.01)
        err_w.append(stats["err_w"])
    tracker = PhaseTracker(smoothing=smoothing, patience=patience, memorisation_drop=drop)
    tracker.run(series)
    start = next(t for t in tracker.transitions if t.kind == "phase" and t.to_phase == "II")
    expected = _onset_reference(err_w, start.measurement, drop, patience, smoothing)
    assert expected is not None and start.measurement + 10 < expected < 50  # inside phase II, before phase III
    onset = tracker.memorisation_onset
    assert onset is not None and onset.measurement == expected
    assert tracker.recommended == onset
    assert tracker.phase == "IV"  # the phases themselves go on


def test_phase_three_before_any_onset_is_the_recommendation():
    series, _ = _four_phase_series()
    for stats in series[10:40]:
        stats["err_w"] = 0.95  # flat: no memorisation in phase II
    series[40]["R_cw"] = 0.9  # R_cw turns positive while err_w has not fallen yet
    series[40]["err_w"] = 0.95
    tracker = PhaseTracker(smoothing=1.0, patience=1)
    tracker.run(series)
    assert tracker.recommended.kind == "phase" and tracker.recommended.to_phase == "III"
    assert tracker.recommended.measurement == 40
    assert tracker.memorisation_onset.measurement == 41


def _onset_series():
    """Four phases with err_w peaking in phase II and then falling slowly (a memorisation onset at ≈ 32)."""
    series, _ = _four_phase_series(lengths=(10, 40, 15, 15), noise=0.2, seed=5)
    rng = random.Random(7)
    for i, stats in enumerate(series):
        if 10 <= i < 50:
            k = i - 10
            stats["err_w"] = (0.90 + 0.006 * k if k < 10 else 0.96 - 0.004 * (k - 10)) + rng.uniform(-0.01, 0.01)
    return series


@pytest.mark.parametrize(
    "make", [lambda: _four_phase_series(noise=0.4, seed=3)[0], _onset_series], ids=["noisy", "onset"]
)
def test_state_round_trip_continues_identically(make):
    series = make()
    full = PhaseTracker(patience=3, smoothing=0.5)
    expected = full.run(series)
    assert full.recommended is not None
    if make is _onset_series:
        assert full.recommended == full.memorisation_onset
    for cut in range(1, len(series)):  # every cut, including mid-streak and mid-onset ones
        first = PhaseTracker(patience=3, smoothing=0.5)
        first.run(series[:cut])
        second = PhaseTracker(patience=3, smoothing=0.5)
        second.load_state_dict(first.state_dict())
        rest = []
        for i, stats in enumerate(series[cut:]):
            second.update(stats, step=cut + i, epoch=cut + i)
            rest.append(second.phase)
        assert rest == expected[cut:], cut
        assert [(t.kind, t.measurement) for t in second.transitions] == [
            (t.kind, t.measurement) for t in full.transitions
        ], cut
        assert second.state_dict() == full.state_dict(), cut


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(model="five"), "phase model"),
        (dict(patience=0), "patience"),
        (dict(smoothing=0.0), "smoothing"),
        (dict(balance=0.5), "balance"),
        (dict(gap_plateau=-0.1), "gap_plateau"),
        (dict(memorisation_drop=0.0), "memorisation_drop"),
        (dict(memorisation_drop=1.0), "memorisation_drop"),
        (dict(smoothing=True), "smoothing"),
        (dict(balance=float("nan")), "balance"),
        (dict(r_explore=float("nan")), "r_explore"),
        (dict(r_explore=2.0), "correlations"),
        (dict(r_cw_oppose=0.5, r_cw_align=0.0), "must not exceed"),
        (dict(memorised=-1.0), "memorised"),
        (dict(activity_drop=5.0), "activity_drop"),
        (dict(sigma2_explore=0.0), "sigma2_explore"),
        (dict(segment_end="1"), "segment_end"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(LightningPhasesError, match=match):
        PhaseTracker(**kwargs)
