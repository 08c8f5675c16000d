"""Loss mixture fit, threshold and detection metrics (SPEC §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_phases.errors import DegenerateInputError, PhaseStatisticsWarning
from lightning_phases.functional import (
    class_dependence,
    detection_metrics,
    fit_loss_mixture,
    mixture_threshold,
    symmetric_noise_class_dependence,
)
from tests.reference.ensemble import mann_whitney_auroc


def _bimodal(n_clean=700, n_noisy=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clean = 0.3 + 0.1 * torch.randn(n_clean, generator=gen, dtype=torch.float64)
    noisy = 2.5 + 0.4 * torch.randn(n_noisy, generator=gen, dtype=torch.float64)
    losses = torch.cat([clean, noisy])
    mask = torch.cat([torch.zeros(n_clean, dtype=torch.bool), torch.ones(n_noisy, dtype=torch.bool)])
    return losses, mask


def _weighted_densities(x, r, mc, mw, sc, sw):
    def pdf(v, m, s):
        return math.exp(-0.5 * ((v - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    return (1 - r) * pdf(x, mc, sc), r * pdf(x, mw, sw)


def test_fit_recovers_components():
    losses, mask = _bimodal()
    mix = fit_loss_mixture(losses)
    assert mix.mean_clean == pytest.approx(0.3, abs=0.03)
    assert mix.mean_noisy == pytest.approx(2.5, abs=0.08)
    assert mix.std_clean == pytest.approx(0.1, abs=0.03)
    assert mix.std_noisy == pytest.approx(0.4, abs=0.06)
    assert mix.weight_noisy == pytest.approx(0.3, abs=0.02)
    assert mix.delta_L == pytest.approx(mix.mean_noisy - mix.mean_clean)
    assert mix.separation > 2 and mix.converged
    # threshold: the two weighted densities are equal there (and nowhere else between the means)
    dc, dw = _weighted_densities(
        mix.threshold, mix.weight_noisy, mix.mean_clean, mix.mean_noisy, mix.std_clean, mix.std_noisy
    )
    assert dc == pytest.approx(dw, rel=1e-6)
    assert mix.mean_clean < mix.threshold < mix.mean_noisy
    assert torch.equal(mix.flags, losses > mix.threshold)
    assert mix.num_flagged == int(mask.sum())  # perfectly separable data


def test_posterior_is_bayes_rule_of_the_fitted_components():
    losses, _ = _bimodal(seed=1)
    mix = fit_loss_mixture(losses)
    for i in [0, 10, 699, 700, 999]:
        dc, dw = _weighted_densities(
            float(losses[i]), mix.weight_noisy, mix.mean_clean, mix.mean_noisy, mix.std_clean, mix.std_noisy
        )
        assert float(mix.posterior[i]) == pytest.approx(dw / (dc + dw), abs=1e-6)


def test_threshold_against_grid_search():
    for args in [(0.3, 0.2, 2.0, 0.1, 0.5), (0.5, 0.0, 1.0, 0.2, 0.2), (0.1, 1.0, 3.0, 0.5, 1.0)]:
        r, mc, mw, sc, sw = args
        grid = np.linspace(mc, mw, 200_001)
        diff = [(_weighted_densities(v, *args)[0] - _weighted_densities(v, *args)[1]) for v in grid[::100]]
        # first sign change on a coarse grid, refined by bisection
        k = next(i for i in range(len(diff) - 1) if diff[i] > 0 >= diff[i + 1])
        lo, hi = grid[::100][k], grid[::100][k + 1]
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            d = _weighted_densities(mid, *args)
            lo, hi = (mid, hi) if d[0] > d[1] else (lo, mid)
        assert mixture_threshold(*args) == pytest.approx(lo, abs=1e-9)


def test_threshold_falls_back_to_midpoint():
    # a tiny noisy weight: the noisy density never catches up between the means
    assert mixture_threshold(1e-9, 0.0, 1.0, 0.5, 0.5) == pytest.approx(0.5)
    assert mixture_threshold(0.0, 0.0, 2.0, 0.5, 0.5) == pytest.approx(1.0)


def test_normalisation_does_not_change_the_answer():
    losses, _ = _bimodal(seed=2)
    scale = float(losses.max() - losses.min())
    a = fit_loss_mixture(losses, normalize=True, reg_covar=5e-4)
    # the same regularisation expressed in loss units: the fit is the same up to EM round-off
    b = fit_loss_mixture(losses, normalize=False, reg_covar=5e-4 * scale**2)
    assert a.threshold == pytest.approx(b.threshold, rel=1e-4)
    assert a.mean_noisy == pytest.approx(b.mean_noisy, rel=1e-4)
    assert a.std_clean == pytest.approx(b.std_clean, rel=1e-4)
    assert torch.equal(a.flags, b.flags)


def test_clipping_keeps_every_sample_scored():
    losses, _ = _bimodal(seed=3)
    losses[0] = 50.0  # an outlier
    mix = fit_loss_mixture(losses, clip_percentiles=(5, 95))
    assert mix.posterior.shape == losses.shape and bool(mix.flags[0])
    assert mix.mean_noisy < 3.0  # the outlier did not drag the component


def test_seeded_fit_is_reproducible():
    losses, _ = _bimodal(seed=4)
    a, b = fit_loss_mixture(losses, seed=7), fit_loss_mixture(losses, seed=7)
    assert a.threshold == b.threshold and torch.equal(a.posterior, b.posterior)


def test_degenerate_losses():
    with pytest.warns(PhaseStatisticsWarning, match="constant") as record:
        mix = fit_loss_mixture(torch.full((50,), 0.7))
    assert len(record) == 1
    assert math.isnan(mix.threshold) and math.isnan(mix.delta_L) and mix.num_flagged == 0
    assert torch.isnan(mix.posterior).all()
    with pytest.warns(PhaseStatisticsWarning, match="NaN"):
        mix = fit_loss_mixture(torch.tensor([0.1, float("nan"), 2.0, 0.3]))
    assert mix.num_flagged == 0
    with pytest.raises(DegenerateInputError, match="at least 2"):
        fit_loss_mixture(torch.tensor([0.5]))
    with pytest.raises(DegenerateInputError, match="1-D"):
        fit_loss_mixture(torch.ones(3, 2))
    with pytest.raises(DegenerateInputError, match="clip_percentiles"):
        fit_loss_mixture(torch.rand(10), clip_percentiles=(90, 10))


def test_detection_metrics_against_counting():
    gen = torch.Generator().manual_seed(0)
    truth = torch.rand(200, generator=gen) < 0.3
    scores = (truth.float() * 0.4 + torch.rand(200, generator=gen) * 0.7).double()
    met = detection_metrics(scores, truth)
    flags = scores > 0.5
    tp = int((flags & truth).sum())
    fp = int((flags & ~truth).sum())
    fn = int((~flags & truth).sum())
    p, r = tp / (tp + fp), tp / (tp + fn)
    assert met.precision == pytest.approx(p, abs=1e-6)
    assert met.recall == pytest.approx(r, abs=1e-6)
    assert met.f1 == pytest.approx(2 * p * r / (p + r), abs=1e-6)
    assert met.auroc == pytest.approx(mann_whitney_auroc(scores.tolist(), truth.tolist()), abs=1e-6)
    # flags (bool) work too, and a raw loss score outside [0, 1] ranks the same
    met_flags = detection_metrics(flags, truth)
    assert met_flags.precision == pytest.approx(p, abs=1e-6)
    assert met_flags.auroc == pytest.approx(mann_whitney_auroc(flags.float().tolist(), truth.tolist()), abs=1e-6)
    shifted = detection_metrics(scores * 10 - 3, truth, threshold=2.0)
    assert shifted.auroc == pytest.approx(met.auroc, abs=1e-6)


def test_detection_metrics_edge_cases():
    truth = torch.tensor([False, False, True, True])
    none_flagged = detection_metrics(torch.zeros(4, dtype=torch.bool), truth)
    assert none_flagged.precision == 0.0 and none_flagged.recall == 0.0
    with pytest.warns(PhaseStatisticsWarning, match="one class"):
        met = detection_metrics(torch.rand(4), torch.zeros(4, dtype=torch.bool))
    assert math.isnan(met.auroc)
    with pytest.raises(DegenerateInputError, match="equal length"):
        detection_metrics(torch.rand(3), truth)
    with pytest.raises(DegenerateInputError, match="NaN"):
        detection_metrics(torch.tensor([0.1, float("nan"), 0.2, 0.3]), truth)


def test_end_to_end_mixture_detection():
    losses, mask = _bimodal(n_clean=800, n_noisy=200, seed=5)
    losses[:20] += 1.5  # some hard clean samples
    mix = fit_loss_mixture(losses)
    met = detection_metrics(mix.flags, mask)
    assert met.recall > 0.95 and met.precision > 0.85
    assert detection_metrics(mix.posterior, mask).auroc > 0.95


def _class_dependence_loop(flags, labels):
    """η² written out with Python sums over classes and samples."""
    f = [float(v) for v in flags]
    y = [int(v) for v in labels]
    mean = sum(f) / len(f)
    total = sum((v - mean) ** 2 for v in f)
    between = 0.0
    for k in set(y):
        members = [f[i] for i in range(len(f)) if y[i] == k]
        between += len(members) * (sum(members) / len(members) - mean) ** 2
    return between / total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_dependence_against_a_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 7, (300,), generator=gen)
    rate = torch.rand(7, generator=gen)[labels]  # each class flagged at its own rate
    flags = torch.rand(300, generator=gen) < rate
    assert class_dependence(flags, labels) == pytest.approx(_class_dependence_loop(flags, labels), abs=1e-12)
    scores = torch.rand(300, generator=gen, dtype=torch.float64)  # posteriors work too
    assert class_dependence(scores, labels) == pytest.approx(_class_dependence_loop(scores, labels), abs=1e-12)


def test_class_dependence_extremes():
    labels = torch.arange(400) % 4
    assert class_dependence(labels >= 2, labels) == pytest.approx(1.0)  # whole classes flagged
    spread = (torch.arange(400) // 4) % 2 == 0  # every class flagged at exactly one half
    assert class_dependence(spread, labels) == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(class_dependence(torch.zeros(400, dtype=torch.bool), labels))  # nothing to explain
    with pytest.raises(DegenerateInputError):
        class_dependence(torch.ones(3), torch.arange(4))
    with pytest.raises(DegenerateInputError):
        class_dependence(torch.ones(0), torch.arange(0))


def _exact_symmetric_noise(true_counts, rate):
    """Labels with exactly `rate` of each true class flipped, spread evenly over the other classes."""
    num = len(true_counts)
    true = torch.cat([torch.full((n,), k) for k, n in enumerate(true_counts)])
    given, noisy, start = true.clone(), torch.zeros(len(true), dtype=torch.bool), 0
    for k, n in enumerate(true_counts):
        flipped = round(rate * n)
        others = [j for j in range(num) if j != k]
        for i in range(flipped):
            given[start + i] = others[i % len(others)]
        noisy[start : start + flipped] = True
        start += n
    return given, noisy


@pytest.mark.parametrize(
    "true_counts,rate",
    [
        ((600, 300, 100), 0.3),
        ((800, 200), 0.2),
        ((900, 100), 0.2),
        ((600, 600, 600, 600), 0.5),
        ((600, 300, 300, 150), 0.4),
        ((800, 200), 0.6),
        ((900, 100), 0.7),
        ((600, 300, 150), 0.8),
    ],  # the last three above (C − 1)/C
)
def test_symmetric_noise_class_dependence_is_that_of_the_exact_noise_mask(true_counts, rate):
    given, noisy = _exact_symmetric_noise(true_counts, rate)
    assert symmetric_noise_class_dependence(given, rate) == pytest.approx(class_dependence(noisy, given), abs=1e-12)


def test_symmetric_noise_class_dependence_edge_cases():
    labels = torch.arange(400) % 4
    assert symmetric_noise_class_dependence(labels, 0.3) == pytest.approx(0.0, abs=1e-15)  # equal class sizes
    imbalanced = torch.cat([torch.zeros(300), torch.ones(100)]).long()
    assert symmetric_noise_class_dependence(imbalanced, 0.0) == 0.0
    assert math.isnan(symmetric_noise_class_dependence(imbalanced, 0.5))  # ρ = (C − 1)/C: labels say nothing
    assert math.isnan(symmetric_noise_class_dependence(imbalanced, 0.46))  # too close to it to recover the true shares
    with pytest.raises(DegenerateInputError):
        symmetric_noise_class_dependence(imbalanced, 1.5)
