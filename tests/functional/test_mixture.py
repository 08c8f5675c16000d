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


def _sklearn_fit(z, *, start_at_two_means):
    """scikit-learn's fit of normalised losses ``z``, the more likely of two: from its k-means start (or,
    for the same EM path whatever k-means finds, the optimal two-means partition, tested by enumeration
    below) and from the two-means partition of ``|z - median|`` (the scale start)."""
    from sklearn.mixture import GaussianMixture

    from lightning_phases.functional.mixture import _m_step, _two_means_split

    def at(resp):
        weights, means, variances = _m_step(z, resp, 5e-4)
        return {"weights_init": weights, "means_init": means[:, None], "precisions_init": 1 / variances[:, None, None]}

    location = at(_two_means_split(z)) if start_at_two_means else {}
    fits = [
        GaussianMixture(2, reg_covar=5e-4, tol=1e-3, max_iter=100, random_state=0, **init).fit(z.reshape(-1, 1))
        for init in (location, at(_two_means_split(np.abs(z - np.median(z)))))
    ]
    return max(fits, key=lambda gmm: gmm.lower_bound_)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    ("shape", "start_at_two_means"),
    [
        ((700, 300, 0.3, 2.5, 0.3), False),
        ((700, 300, 0.3, 2.5, 0.3), True),
        ((1500, 150, 0.2, 0.9, 0.3), True),
        ((400, 400, 0.5, 1.6, 0.3), True),
        ((600, 400, 0.5, 0.5, 1.0), True),  # one centre, two widths: the scale start wins
    ],
)
def test_em_takes_the_steps_of_scikit_learn(seed, shape, start_at_two_means):
    """Every fitted field equals the more likely of scikit-learn's GaussianMixture fits of the same
    normalised losses from the same two starts; on well-separated losses also from its own k-means start."""
    n_clean, n_noisy, mean_clean, mean_noisy, std_noisy = shape
    gen = torch.Generator().manual_seed(seed)
    losses = torch.cat(
        [
            (mean_clean + 0.1 * torch.randn(n_clean, generator=gen, dtype=torch.float64)).abs(),
            (mean_noisy + std_noisy * torch.randn(n_noisy, generator=gen, dtype=torch.float64)).abs(),
        ]
    )
    mix = fit_loss_mixture(losses)
    lo, hi = float(losses.min()), float(losses.max())
    z = ((losses - lo) / (hi - lo)).numpy()
    ref = _sklearn_fit(z, start_at_two_means=start_at_two_means)
    noisy = int(np.argmax(ref.means_.reshape(-1)))
    scale = hi - lo
    assert mix.mean_noisy == pytest.approx(lo + scale * ref.means_[noisy, 0], rel=1e-9)
    assert mix.mean_clean == pytest.approx(lo + scale * ref.means_[1 - noisy, 0], rel=1e-9)
    assert mix.std_noisy == pytest.approx(scale * math.sqrt(ref.covariances_[noisy, 0, 0]), rel=1e-9)
    assert mix.std_clean == pytest.approx(scale * math.sqrt(ref.covariances_[1 - noisy, 0, 0]), rel=1e-9)
    assert mix.weight_noisy == pytest.approx(ref.weights_[noisy], rel=1e-9)
    np.testing.assert_allclose(mix.posterior.numpy(), ref.predict_proba(z.reshape(-1, 1))[:, noisy], atol=1e-9)
    assert mix.converged == ref.converged_
    one = _sklearn_fit_one(z)
    assert mix.bic_gain == pytest.approx(one.bic(z.reshape(-1, 1)) - ref.bic(z.reshape(-1, 1)), rel=1e-9)


def test_the_scale_start_keeps_a_more_likely_fit_than_the_location_start():
    """A narrow core and wide shoulders about one centre: EM from the location split ends in a worse local
    optimum (two separated components), from the scale split in a more likely one with nearly one centre,
    and that one is returned."""
    from lightning_phases.functional.mixture import _em_from, _two_means_split

    rng = np.random.default_rng(0)
    x = np.abs(np.concatenate([rng.normal(0.5, 0.05, 700), rng.normal(0.5, 0.3, 300)]))
    z = (x - x.min()) / (x.max() - x.min())
    kwargs = {"max_iter": 100, "tol": 1e-3, "reg_covar": 5e-4}
    location = _em_from(z, _two_means_split(z), **kwargs)
    scale = _em_from(z, _two_means_split(np.abs(z - np.median(z))), **kwargs)
    assert scale.mean_log_likelihood > location.mean_log_likelihood + 0.1
    assert abs(scale.means[0] - scale.means[1]) < 0.05 < 0.2 < abs(location.means[0] - location.means[1])
    mix = fit_loss_mixture(torch.as_tensor(x))
    unit = x.max() - x.min()
    expected_means = sorted(x.min() + unit * scale.means)
    assert sorted([mix.mean_clean, mix.mean_noisy]) == pytest.approx(expected_means, rel=1e-9)
    assert sorted([mix.std_clean, mix.std_noisy]) == pytest.approx(sorted(unit * np.sqrt(scale.variances)), rel=1e-9)
    assert mix.separation < 0.5  # so not bimodal: no cleansing fires on it


def test_fit_arguments_are_checked():
    losses = torch.rand(20, dtype=torch.float64)
    for kwargs in ({"n_init": 0}, {"max_iter": 0}, {"n_init": 1.5}, {"n_init": True}):
        with pytest.raises(DegenerateInputError, match=next(iter(kwargs))):
            fit_loss_mixture(losses, **kwargs)


def _sklearn_fit_one(z):
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(1, reg_covar=5e-4).fit(z.reshape(-1, 1))


@pytest.mark.parametrize("seed", range(5))
def test_the_first_start_is_the_optimal_two_means_partition(seed):
    """Against every cut of the sorted values (ties drawn in, so equal values must stay together)."""
    from lightning_phases.functional.mixture import _two_means_split

    rng = np.random.default_rng(seed)
    z = np.round(rng.exponential(size=40), 1)  # rounded: repeated values
    resp = _two_means_split(z)
    assert resp.shape == (40, 2) and np.array_equal(resp.sum(axis=1), np.ones(40))
    upper = resp[:, 1] == 1

    def within(mask):
        return sum(float(((z[m] - z[m].mean()) ** 2).sum()) for m in (mask, ~mask) if m.any())

    cuts = np.unique(z)[1:]
    best = min(within(z >= c) for c in cuts)
    assert within(upper) == pytest.approx(best, rel=1e-12)
    assert z[upper].min() > z[~upper].max()  # a cut of the sorted values: no value on both sides


def test_more_starts_keep_the_most_likely_fit_and_are_reproducible():
    from lightning_phases.functional.mixture import _em_two_gaussians

    rng = np.random.default_rng(3)
    z = np.concatenate([rng.normal(0.2, 0.05, 300), rng.normal(0.35, 0.1, 200), rng.uniform(0, 1, 50)])
    kwargs = {"max_iter": 100, "tol": 1e-3, "reg_covar": 5e-4}
    one = _em_two_gaussians(z, n_init=1, seed=0, **kwargs)
    many = _em_two_gaussians(z, n_init=6, seed=11, **kwargs)
    again = _em_two_gaussians(z, n_init=6, seed=11, **kwargs)
    assert many.mean_log_likelihood > one.mean_log_likelihood  # a random start ended higher
    assert np.array_equal(many.means, again.means) and np.array_equal(many.variances, again.variances)
    # the reported likelihood is the one at the returned parameters (scikit-learn's score)
    log_w = many.log_weighted(z)
    assert many.mean_log_likelihood == pytest.approx(float(np.logaddexp(log_w[:, 0], log_w[:, 1]).mean()))


def test_fitting_does_not_import_scikit_learn():
    """Importing scikit-learn's mixture module and its first fit cost 0.15-0.6 s; the fit is numpy only."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from lightning_phases.functional import fit_loss_mixture\n"
        "fit_loss_mixture(torch.cat([torch.rand(50), 3 + torch.rand(20)]).double(), n_init=2)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
