"""CleansingTracker: the t_c / flag decision on constructed series with known answers, the cap, resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional import (
    CleansingTracker,
    LossMixture,
    class_dependence,
    class_wise_flags,
    default_max_fraction,
    detection_metrics,
    excess_class_dependence,
    fit_loss_mixture,
    logit_margin,
    symmetric_noise_class_dependence,
)

N = 30


def _mixture(
    delta: float, *, std: float = 0.1, r: float = 0.3, n: int = N, seed: int = 0, bic_gain: float = 10.0
) -> tuple[LossMixture, torch.Tensor]:
    """A fit with ΔL = ``delta`` and Ashman's D = delta/std, and losses: the first round(r·n) samples high
    (two components better than one Gaussian by ``bic_gain``)."""
    gen = torch.Generator().manual_seed(seed)
    noisy = torch.arange(n) < round(r * n)
    losses = 0.2 + std * torch.randn(n, generator=gen, dtype=torch.float64) + delta * noisy
    threshold = 0.2 + delta / 2
    posterior = torch.sigmoid((losses - threshold) / max(std, 1e-3) * 4)
    fit = LossMixture(r, 0.2, 0.2 + delta, std, std, threshold, posterior, losses > threshold, True, bic_gain)
    return fit, losses


def _reference(deltas, bimodal, *, smoothing, patience):
    """The rule written out: EMA over the bimodal fits, strict new maximum = peak, confirmed after
    `patience` consecutive bimodal fits not above it; a rejected fit resets the count. -> (peak, confirm) indices."""
    ema, best, peak, since = None, -math.inf, None, 0
    for i, (d, ok) in enumerate(zip(deltas, bimodal)):
        if not ok:
            since = 0
            continue
        ema = d if ema is None else smoothing * d + (1 - smoothing) * ema
        if ema > best:
            best, peak, since = ema, i, 0
        else:
            since += 1
        if peak is not None and since >= patience:
            return peak, i
    return None, None


def _run(tracker, fits, start=0):
    out = []
    for i, (fit, losses) in enumerate(fits[start:], start):
        if tracker.confirmed:
            break
        out.append(tracker.update(fit, losses, step=10 * i, epoch=i))
    return out


def test_peak_confirmed_after_patience_on_raw_delta():
    deltas = [0.5, 1.0, 1.5, 2.0, 1.9, 1.95, 1.8, 1.7, 1.6]
    tracker = CleansingTracker(patience=3, smoothing=1.0)
    decisions = _run(tracker, [_mixture(d, seed=i) for i, d in enumerate(deltas)])
    assert [d.new_peak for d in decisions] == [True, True, True, True, False, False, False]
    assert [d.confirmed for d in decisions] == [False] * 6 + [True]
    assert (tracker.t_c_epoch, tracker.t_c_step) == (3, 30)
    peak_fit, _ = _mixture(2.0, seed=3)
    assert torch.equal(tracker.flagged_indices, torch.nonzero(peak_fit.flags).flatten())


def test_flags_stay_empty_until_confirmed():
    tracker = CleansingTracker(patience=2, smoothing=1.0)
    _run(tracker, [_mixture(d) for d in (1.0, 2.0, 1.5)])
    assert not tracker.confirmed and tracker.flagged_indices.numel() == 0 and tracker.peak_flags.numel() > 0


@pytest.mark.parametrize("smoothing,patience", [(0.5, 2), (0.3, 3), (1.0, 1)])
def test_noisy_series_matches_the_written_out_rule_where_a_naive_rule_flaps(smoothing, patience):
    # a rising ΔL with noise: the first local maximum (the naive "stop at the first drop") is far too early
    gen = torch.Generator().manual_seed(7)
    trend = [0.4 + 0.12 * min(i, 14) - 0.05 * max(i - 14, 0) for i in range(30)]
    deltas = [t + 0.15 * float(torch.randn(1, generator=gen)) for t in trend]
    first_drop = next(i for i in range(1, 30) if deltas[i] < deltas[i - 1]) - 1
    peak, confirm = _reference(deltas, [True] * 30, smoothing=smoothing, patience=patience)
    assert peak is not None
    tracker = CleansingTracker(patience=patience, smoothing=smoothing)
    decisions = _run(tracker, [_mixture(d, seed=i) for i, d in enumerate(deltas)])
    assert tracker.t_c_epoch == peak and len(decisions) == confirm + 1
    if smoothing < 1:
        assert peak > first_drop + 3  # the smoothed rule does not stop at the noise's first dip
        level = None
        for d, decision in zip(deltas, decisions):
            level = d if level is None else smoothing * d + (1 - smoothing) * level
            assert decision.smoothed_delta_L == pytest.approx(level)


def test_rejected_fits_restart_the_count_and_make_no_peak():
    # bimodal (D = ΔL/0.1 >= 2) at even indices only: never `patience` bimodal fits in a row after a peak
    deltas = [1.0, 0.1, 1.2, 0.1, 1.1, 0.1, 1.0, 0.1, 0.9, 0.1]
    tracker = CleansingTracker(patience=2, smoothing=1.0)
    decisions = _run(tracker, [_mixture(d, seed=i) for i, d in enumerate(deltas)])
    assert [d.bimodal for d in decisions] == [i % 2 == 0 for i in range(10)]
    assert {d.rejection for d in decisions if not d.bimodal} == {"separation"}
    assert all(d.num_flagged == 0 and d.smoothed_delta_L is None for d in decisions if not d.bimodal)
    assert not tracker.confirmed and len(tracker.delta_L_history) == 5
    assert _reference(deltas, [i % 2 == 0 for i in range(10)], smoothing=1.0, patience=2) == (None, None)
    steady = CleansingTracker(patience=2, smoothing=1.0)  # the same bimodal values back to back: confirmed
    _run(steady, [_mixture(d, seed=i) for i, d in enumerate([1.0, 1.2, 1.1, 1.0])])
    assert steady.t_c_epoch == 1


def test_rejection_rules_in_order():
    tracker = CleansingTracker(min_separation=2.0, min_weight=0.05, max_class_dependence=0.2)
    ok, _ = _mixture(1.0)
    assert tracker.rejection(ok) is None and tracker.rejection(ok, 0.1) is None
    low_weight, _ = _mixture(0.1, r=0.04)  # degenerate weight and low separation: the weight rule first
    assert tracker.rejection(low_weight)[0] == "weight"
    high_weight, _ = _mixture(1.0, r=0.96)
    assert tracker.rejection(high_weight)[0] == "weight"
    nan_fit = LossMixture(0.3, 0.2, math.nan, 0.1, 0.1, 0.5, ok.posterior, ok.flags, False)
    assert tracker.rejection(nan_fit)[0] == "weight"
    close, _ = _mixture(0.15)  # D = 1.5 at weight 0.3: enough under the default heavy-noise rule, not without it
    assert tracker.rejection(close) is None
    assert CleansingTracker(heavy_noise_separation=None).rejection(close)[0] == "separation"
    closer, _ = _mixture(0.1)  # D = 1.0 < 1.2
    assert tracker.rejection(closer)[0] == "separation"
    assert tracker.rejection(ok, 0.25)[0] == "class" and "follows the given class" in tracker.rejection(ok, 0.25)[1]
    assert tracker.rejection(ok, math.nan) is None  # no class labels: no class check
    assert CleansingTracker(max_class_dependence=1.0).rejection(ok, 0.99) is None


@pytest.mark.parametrize(
    "sep,weight,r,accepted",
    [(None, 0.2, 0.6, False), (1.2, 0.2, 0.6, True), (1.2, 0.7, 0.6, False), (1.6, 0.2, 0.6, False)],
)
def test_heavy_noise_separation(sep, weight, r, accepted):
    fit, _ = _mixture(0.15, r=r)  # D = 1.5
    tracker = CleansingTracker(heavy_noise_separation=sep, heavy_noise_weight=weight)
    assert (tracker.rejection(fit) is None) == accepted


def test_cap_keeps_the_highest_posteriors_ties_by_loss_then_index():
    n = 20
    losses = torch.tensor([0.5, 3.0, 2.0, 2.0, 0.1, 5.0, 4.0, 1.0, 2.5, 0.9] * 2, dtype=torch.float64)
    losses[10:] += 0.01 * torch.arange(10)  # second half slightly higher, except equal pairs kept below
    losses[13] = losses[3]  # an exact tie of loss and posterior: the lower index first
    posterior = torch.tensor([0.2, 1.0, 1.0, 1.0, 0.1, 1.0, 0.97, 0.6, 1.0, 0.55] * 2, dtype=torch.float64)
    flags = posterior > 0.5
    fit = LossMixture(0.5, 0.2, 2.0, 0.3, 0.3, 1.0, posterior, flags, True)
    for max_fraction in (1.0, 0.5, 0.3, 0.26, 0.05):
        capped = CleansingTracker(max_fraction=max_fraction).capped_flags(fit, losses)
        cap = math.floor(max_fraction * n)
        if int(flags.sum()) <= cap:
            assert torch.equal(capped, flags)
            continue
        ranked = sorted(range(n), key=lambda i: (-float(posterior[i]), -float(losses[i]), i))
        assert sorted(torch.nonzero(capped).flatten().tolist()) == sorted(ranked[:cap])
        assert int(capped.sum()) == cap


@pytest.mark.parametrize("classes,cap", [(None, 0.5), (1, 0.5), (2, 0.5), (4, 0.75), (10, 0.9), (100, 0.99)])
def test_default_cap_is_the_symmetric_noise_limit(classes, cap):
    assert default_max_fraction(classes) == pytest.approx(cap)
    n = 200
    losses = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    posterior = losses.clone()
    fit = LossMixture(0.95, 0.0, 1.0, 0.1, 0.1, 0.0, posterior, losses > 0.0, True)  # flags 199 of 200
    capped = CleansingTracker().capped_flags(fit, losses, classes)
    assert int(capped.sum()) == min(199, math.floor(cap * n))
    assert bool(capped[-int(capped.sum()) :].all())  # the highest posteriors
    assert int(CleansingTracker(max_fraction=0.3).capped_flags(fit, losses, classes).sum()) == 60  # explicit wins


def test_update_uses_the_number_of_classes_for_the_cap():
    fit, losses = _mixture(2.0, r=0.8)  # 24 of 30 flagged
    assert CleansingTracker(patience=1).update(fit, losses, step=0, num_classes=10).num_flagged == 24
    assert CleansingTracker(patience=1).update(fit, losses, step=0, num_classes=4).num_flagged == 22
    assert CleansingTracker(patience=1).update(fit, losses, step=0).num_flagged == 15


def test_default_heavy_noise_rule():
    tracker = CleansingTracker()
    majority, _ = _mixture(0.15, r=0.3)  # D = 1.5 with a mislabeled weight of at least 0.2
    minority, _ = _mixture(0.15, r=0.1)
    assert tracker.rejection(majority) is None
    assert tracker.rejection(minority)[0] == "separation"
    assert CleansingTracker(heavy_noise_separation=None).rejection(majority)[0] == "separation"
    one_gaussian, _ = _mixture(0.15, r=0.3, bic_gain=-5.0)  # D 1.5, but one Gaussian explains the losses better
    assert tracker.rejection(one_gaussian)[0] == "separation"
    unknown, _ = _mixture(0.15, r=0.3, bic_gain=math.nan)
    assert tracker.rejection(unknown)[0] == "separation"
    low, _ = _mixture(0.11, r=0.3)  # D = 1.1 at weight 0.3: below the default 1.2, above min_separation 1.0
    assert CleansingTracker(min_separation=1.0).rejection(low) is None  # the smaller of the two applies


def test_cap_decides_the_flags_at_t_c():
    tracker = CleansingTracker(patience=1, smoothing=1.0, max_fraction=0.1)
    _run(tracker, [_mixture(d, seed=i) for i, d in enumerate([1.0, 2.0, 1.5])])
    fit, losses = _mixture(2.0, seed=1)
    assert tracker.flagged_indices.numel() == 3 and int(fit.flags.sum()) == 9
    assert torch.equal(tracker.flagged_indices, torch.nonzero(tracker.capped_flags(fit, losses)).flatten())


def _series(num=16):
    gen = torch.Generator().manual_seed(3)
    deltas = [
        0.3 + 0.1 * min(i, 8) - 0.08 * max(i - 8, 0) + 0.1 * float(torch.randn(1, generator=gen)) for i in range(num)
    ]
    deltas[5] = 0.1  # one rejected fit inside the series
    return [_mixture(d, seed=i) for i, d in enumerate(deltas)]


def _state_round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # plain types only: a checkpoint loads with weights_only


def test_resume_at_every_cut_equals_the_uninterrupted_run():
    fits = _series()
    whole = CleansingTracker(patience=3, smoothing=0.5)
    reference = _run(whole, fits)
    assert whole.confirmed and len(reference) < len(fits)  # a t_c inside the series
    for cut in range(len(reference) + 1):
        first = CleansingTracker(patience=3, smoothing=0.5)
        before = _run(first, fits[:cut])
        second = CleansingTracker(patience=3, smoothing=0.5)
        second.load_state_dict(_state_round_trip(first.state_dict()))
        after = _run(second, fits, start=cut)
        decisions = before + after
        assert len(decisions) == len(reference)
        for got, want in zip(decisions, reference):
            assert (got.bimodal, got.new_peak, got.confirmed, got.rejection) == (
                want.bimodal,
                want.new_peak,
                want.confirmed,
                want.rejection,
            )
            assert got.smoothed_delta_L == want.smoothed_delta_L and torch.equal(got.flags, want.flags)
        assert second.state_dict() == whole.state_dict()


def test_old_and_empty_states_load_with_defaults():
    tracker = CleansingTracker()
    tracker.load_state_dict({})
    assert tracker.best_step is None and tracker.best_delta_L == -math.inf and tracker.smoothed_delta_L is None
    tracker.load_state_dict({"flagged_indices": [1, 4], "t_c_step": 7, "t_c_epoch": 1})  # before candidate_flags
    assert tracker.peak_flags.tolist() == [1, 4] and tracker.confirmed


def test_reset_and_no_updates_after_confirmation():
    tracker = CleansingTracker(patience=1, smoothing=1.0)
    _run(tracker, [_mixture(d) for d in (1.0, 0.9)])
    assert tracker.confirmed
    with pytest.raises(LightningPhasesError, match="confirmed"):
        tracker.update(*_mixture(1.0), step=99)
    tracker.reset()
    assert tracker.state_dict() == CleansingTracker(patience=1, smoothing=1.0).state_dict()


def test_excess_class_dependence():
    fit, _ = _mixture(1.0, n=40)
    labels = torch.arange(40) % 4
    expected = class_dependence(fit.flags, labels) - symmetric_noise_class_dependence(labels, 0.3)
    assert excess_class_dependence(fit, labels) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(excess_class_dependence(fit, None))
    assert math.isnan(excess_class_dependence(fit, labels[:10]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(patience=0), "patience"),
        (dict(patience=True), "patience"),
        (dict(max_fraction=0.0), "max_fraction"),
        (dict(max_fraction=float("inf")), "max_fraction"),
        (dict(min_separation=float("nan")), "min_separation"),
        (dict(min_weight=0.5), "min_weight"),
        (dict(smoothing=0.0), "smoothing"),
        (dict(max_class_dependence="0.2"), "max_class_dependence"),
        (dict(heavy_noise_separation=0.0), "heavy_noise_separation"),
        (dict(heavy_noise_separation=float("nan")), "heavy_noise_separation"),
        (dict(heavy_noise_weight=1.0), "heavy_noise_weight"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(LightningPhasesError, match=match):
        CleansingTracker(**kwargs)


def test_an_equal_value_is_not_a_new_peak():
    tracker = CleansingTracker(patience=2, smoothing=1.0)
    decisions = _run(tracker, [_mixture(d, seed=i) for i, d in enumerate([1.0, 2.0, 2.0, 2.0])])
    assert [d.new_peak for d in decisions] == [True, True, False, False] and tracker.t_c_epoch == 1


def test_a_single_gaussian_split_in_two_is_not_bimodal_under_the_heavy_noise_rule():
    """EM splits one Gaussian at Ashman's D 1.2-1.5 with weights near 0.5; the BIC condition refuses it."""
    from sklearn.mixture import GaussianMixture

    from lightning_phases.functional import fit_loss_mixture
    from lightning_phases.functional.mixture import _two_means_split

    gen = torch.Generator().manual_seed(0)
    one = 0.2 + 0.1 * torch.randn(2000, generator=gen, dtype=torch.float64)
    two = torch.cat(
        [0.2 + 0.1 * torch.randn(1400, generator=gen), 0.45 + 0.1 * torch.randn(600, generator=gen)]
    ).double()
    for losses, bimodal in ((one, False), (two, True)):
        fit = fit_loss_mixture(losses)
        z = ((losses - losses.min()) / (losses.max() - losses.min())).numpy().reshape(-1, 1)
        # the more likely of scikit-learn's fits from its k-means start and from the scale start
        deviation = np.abs(z[:, 0] - np.median(z))
        outer = deviation > deviation[_two_means_split(deviation)[:, 1] == 1].min() - 1e-12
        scale_start = {
            "means_init": np.array([[z[~outer].mean()], [z[outer].mean()]]),
            "weights_init": np.array([1 - outer.mean(), outer.mean()]),
            "precisions_init": 1 / (np.array([z[~outer].var(), z[outer].var()]) + 5e-4)[:, None, None],
        }
        two = max(
            (GaussianMixture(2, reg_covar=5e-4, random_state=0, **init).fit(z) for init in ({}, scale_start)),
            key=lambda gmm: gmm.lower_bound_,
        )
        reference = GaussianMixture(1, reg_covar=5e-4).fit(z).bic(z) - two.bic(z)
        assert fit.bic_gain == pytest.approx(reference, rel=1e-3, abs=0.5)
        assert (fit.bic_gain > 0) == bimodal
        assert (CleansingTracker().rejection(fit) is None) == bimodal
    # EM from the location split alone (scikit-learn's k-means start) splits the one Gaussian at a D the
    # heavy-noise bar alone would have passed; the more likely fit kept has nearly one centre
    from lightning_phases.functional.mixture import _em_from

    z = ((one - one.min()) / (one.max() - one.min())).numpy()
    location = _em_from(z, _two_means_split(z), max_iter=100, tol=1e-3, reg_covar=5e-4)
    d = math.sqrt(2) * abs(location.means[0] - location.means[1]) / math.sqrt(location.variances.sum())
    assert 1.2 <= d < 2
    assert fit_loss_mixture(one).separation < d


def _hard_class_losses(high_mean: float, *, class_dependent: bool, seed: int, n: int = 4000):
    """Clean-data-like losses: about 20 % of the samples high, either gathered in three "hard" classes
    (45 % of those, 10 % of the rest: a weak network's misclassified samples) or independent of the class
    (symmetric noise at the same rate). -> (losses [n], labels [n])."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    rate = torch.where(labels < 3, 0.45, 0.1) if class_dependent else torch.full((n,), 0.205)
    high = torch.rand(n, generator=gen) < rate
    low = 0.3 * torch.rand(n, generator=gen)
    losses = torch.where(high, high_mean + 0.5 * torch.randn(n, generator=gen), low).abs().double()
    return losses, labels


@pytest.mark.parametrize("class_dependent", [True, False])
def test_default_class_rule_rejects_hard_classes_of_clean_data(class_dependent):
    # ΔL rises to index 2 and falls; the smoothed ΔL (EMA 0.5) peaks at index 3
    means = [1.5, 2.0, 2.5, 2.3, 2.2, 2.1, 2.0]
    default, old = CleansingTracker(), CleansingTracker(max_class_dependence=0.2)
    values = []
    for i, mean in enumerate(means):
        losses, labels = _hard_class_losses(mean, class_dependent=class_dependent, seed=i)
        fit = fit_loss_mixture(losses, seed=0)
        dependence = excess_class_dependence(fit, labels)
        values.append(dependence)
        decision = default.update(fit, losses, dependence=dependence, step=i, epoch=i, num_classes=10)
        if not old.confirmed:
            old.update(fit, losses, dependence=dependence, step=i, epoch=i, num_classes=10)
        assert decision.bimodal is not class_dependent
        assert decision.rejection == ("class" if class_dependent else None)
    if class_dependent:
        # between the new default (0.1) and the old one (0.2): the old default flagged clean samples
        assert all(0.1 < v < 0.2 for v in values), values
        assert not default.confirmed and old.confirmed and old.t_c_epoch == 3
    else:
        assert all(v < 0.05 for v in values), values
        assert default.confirmed and default.t_c_epoch == 3


def _two_difficulties(n_per_class: int = 400, rate: float = 0.3, seed: int = 0):
    """An easy class (clean losses ~0.2, mislabeled ~1.2) and a hard one (clean ~1.0, mislabeled ~2.2)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(2 * n_per_class) % 2
    noisy = torch.rand(2 * n_per_class, generator=gen) < rate
    clean_level = torch.where(labels == 0, 0.2, 1.0).double()
    losses = clean_level + 1.0 * noisy + 0.08 * torch.randn(2 * n_per_class, generator=gen, dtype=torch.float64)
    return losses, labels, noisy


def test_class_wise_flags_are_each_class_fitted_on_its_own():
    losses, labels, noisy = _two_difficulties()
    global_fit = fit_loss_mixture(losses, seed=0)
    flags, posterior = class_wise_flags(losses, labels, global_fit, max_fraction=0.5)
    for c in (0, 1):  # the reference: one fit per class, written out
        members = torch.nonzero(labels == c).flatten()
        fit = fit_loss_mixture(losses[members], seed=0)
        assert torch.equal(flags[members], fit.flags)
        assert torch.allclose(posterior[members], fit.posterior)
    # one threshold for both classes cannot separate the easy class's mislabeled (1.2) from the hard
    # class's clean (1.0) samples; a threshold per class does
    assert detection_metrics(flags, noisy).f1 == 1.0
    assert detection_metrics(global_fit.flags, noisy).f1 < 0.8


def test_class_wise_flags_fall_back_to_the_global_fit_and_keep_the_cap():
    losses, labels, noisy = _two_difficulties()
    labels = labels.clone()
    labels[:10] = 2  # a class of 10 samples: below min_class_size, it keeps the global flags
    labels[10:40] = 3
    losses[10:40] = 0.5  # a class of constant losses: cannot be fitted, keeps the global flags
    global_fit = fit_loss_mixture(losses, seed=0)
    flags, posterior = class_wise_flags(losses, labels, global_fit, max_fraction=0.5, min_class_size=20)
    assert torch.equal(flags[:40], global_fit.flags[:40])
    assert torch.equal(posterior[:40], global_fit.posterior[:40])
    # the cap: the highest posteriors (ties by the higher loss) of the uncapped class-wise flags
    uncapped, post = class_wise_flags(losses, labels, global_fit, max_fraction=1.0)
    capped, _ = class_wise_flags(losses, labels, global_fit, max_fraction=0.1)
    cap = math.floor(0.1 * losses.numel())
    assert int(uncapped.sum()) > cap and int(capped.sum()) == cap
    top = sorted(range(losses.numel()), key=lambda i: (-float(post[i]), -float(losses[i]), i))[:cap]
    assert sorted(torch.nonzero(capped).flatten().tolist()) == sorted(top)


@pytest.mark.parametrize(
    "kwargs,match", [(dict(min_class_size=1), "min_class_size"), (dict(labels_len=5), "one length")]
)
def test_class_wise_flags_bad_arguments(kwargs, match):
    losses, labels, _ = _two_difficulties(n_per_class=20)
    fit = fit_loss_mixture(losses, seed=0)
    if "labels_len" in kwargs:
        labels = labels[: kwargs.pop("labels_len")]
    with pytest.raises(LightningPhasesError, match=match):
        class_wise_flags(losses, labels, fit, max_fraction=0.5, **kwargs)


def test_logit_margin_is_the_best_other_labels_loss_advantage():
    """``s_i`` against a loop: the given label's cross-entropy minus the least cross-entropy of any other."""
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(50, 5, generator=gen)
    labels = torch.randint(0, 5, (50,), generator=gen)
    expected = []
    for z, y in zip(logits, labels.tolist()):
        ce = [float(torch.nn.functional.cross_entropy(z, torch.tensor(j))) for j in range(5)]
        expected.append(ce[y] - min(c for j, c in enumerate(ce) if j != y))
    got = logit_margin(logits, labels)
    assert got.dtype == torch.float64 and torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    assert torch.equal(got > 0, logits.argmax(1) != labels)  # positive exactly where another class is predicted
    # one logistic logit: the other label's logistic loss advantage, for [n] and [n, 1] and float labels
    z = 2 * torch.randn(40, generator=gen)
    y = torch.randint(0, 2, (40,), generator=gen)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(z, y.float(), reduction="none") - bce(z, 1 - y.float(), reduction="none")
    for logit, label in ((z, y), (z[:, None], y.float())):
        assert torch.allclose(logit_margin(logit, label), expected.double(), atol=1e-5)


@pytest.mark.parametrize(
    "logits,labels,match",
    [
        (torch.zeros(4, 3), torch.tensor([0, 1, 3, 0]), r"class indices in \[0, 3\)"),
        (torch.zeros(4, 3), torch.tensor([0, 1]), "logits"),
        (torch.zeros(4, 3), torch.tensor([0.0, 1.5, 2.0, 0.0]), "class indices"),
        (torch.zeros(4), torch.tensor([0, 1, 2, 1]), r"in \{0, 1\}"),
        (torch.zeros(2, 3, 4), torch.tensor([0, 1]), "logits"),
    ],
)
def test_logit_margin_refuses_labels_that_are_not_classes_of_the_logits(logits, labels, match):
    with pytest.raises(LightningPhasesError, match=match):
        logit_margin(logits, labels)
