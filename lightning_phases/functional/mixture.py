"""Two-component loss mixture, cleansing threshold and detection metrics.

SPEC.md §4 (Feng & Tu 2021, section 5). The per-sample training losses are
fitted with ``l ~ (1−r)·N(m_c, s_c²) + r·N(m_w, s_w²)`` (EM in numpy, the
steps of scikit-learn's ``GaussianMixture``); the component with the larger mean is the mislabeled
one and ``ΔL = m_w − m_c``. The threshold ``l_c`` is where the two weighted
densities are equal between the means (falling back to ``(m_c + m_w)/2``);
samples with loss above it are flagged.

Following DivideMix (Li et al. 2020), losses are min–max normalised before the
fit by default (``reg_covar`` then acts on a fixed scale); the fitted means,
spreads and threshold are reported in the original loss units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_phases.errors import DegenerateInputError
from lightning_phases.functional.ensemble import _warn

__all__ = [
    "LossMixture",
    "fit_loss_mixture",
    "mixture_threshold",
    "class_dependence",
    "symmetric_noise_class_dependence",
    "DetectionMetrics",
    "detection_metrics",
]


@dataclass(frozen=True)
class LossMixture:
    """A fitted two-component loss mixture (SPEC.md §4).

    Attributes:
        weight_noisy: Mixing weight ``r`` of the mislabeled (higher-mean) component.
        mean_clean: ``m_c``.
        mean_noisy: ``m_w``.
        std_clean: ``s_c``.
        std_noisy: ``s_w``.
        threshold: ``l_c``, where the weighted densities cross between the means.
        posterior: Per-sample posterior probability of the mislabeled component, ``[n]``.
        flags: Per-sample ``loss > threshold``, bool ``[n]``.
        converged: Whether EM converged.
        bic_gain: ``BIC(one Gaussian) − BIC(the two-component fit)`` on the fitted (normalised)
            losses, in nats: ``2 (ℓ₂ − ℓ₁) − 3 log n``; positive when two components explain the losses
            better than one Gaussian. A single Gaussian sample split in two has Ashman's D of about
            1.2–1.5 but a gain near ``−3 log n``. ``nan`` when unknown.
    """

    weight_noisy: float
    mean_clean: float
    mean_noisy: float
    std_clean: float
    std_noisy: float
    threshold: float
    posterior: Tensor
    flags: Tensor
    converged: bool
    bic_gain: float = math.nan

    @property
    def delta_L(self) -> float:
        """``ΔL = m_w − m_c``."""
        return self.mean_noisy - self.mean_clean

    @property
    def separation(self) -> float:
        """Ashman's D ``= √2·|m_w − m_c| / √(s_c² + s_w²)``; D > 2 means clearly bimodal."""
        spread = math.sqrt(self.std_clean**2 + self.std_noisy**2)
        return math.sqrt(2.0) * abs(self.delta_L) / spread if spread > 0 else math.nan

    @property
    def num_flagged(self) -> int:
        """Number of flagged samples."""
        return int(self.flags.sum())


def mixture_threshold(
    weight_noisy: float, mean_clean: float, mean_noisy: float, std_clean: float, std_noisy: float
) -> float:
    """Loss ``l_c`` between the means where ``(1−r)N(l; m_c, s_c) = r N(l; m_w, s_w)``.

    Solves the quadratic ``log((1−r)N_c) = log(r N_w)`` and returns its root in
    ``[m_c, m_w]`` (the smaller one if both are); falls back to
    ``(m_c + m_w)/2`` when there is none.
    """
    r, mc, mw, sc, sw = weight_noisy, mean_clean, mean_noisy, std_clean, std_noisy
    mid = 0.5 * (mc + mw)
    if not (0 < r < 1 and sc > 0 and sw > 0 and mw > mc):
        return mid
    a = 1 / (2 * sw**2) - 1 / (2 * sc**2)
    b = mc / sc**2 - mw / sw**2
    c = mw**2 / (2 * sw**2) - mc**2 / (2 * sc**2) + math.log((1 - r) / sc) - math.log(r / sw)
    if abs(a) < 1e-12 * max(abs(b), 1e-300):
        roots = [-c / b] if b != 0 else []
    else:
        disc = b * b - 4 * a * c
        if disc < 0:
            roots = []
        else:
            sq = math.sqrt(disc)
            roots = [(-b - sq) / (2 * a), (-b + sq) / (2 * a)]
    inside = sorted(x for x in roots if mc <= x <= mw)
    return inside[0] if inside else mid


def _nan_mixture(n: int, device: torch.device) -> LossMixture:
    nan = math.nan
    return LossMixture(
        nan,
        nan,
        nan,
        nan,
        nan,
        nan,
        posterior=torch.full((n,), nan, dtype=torch.float64, device=device),
        flags=torch.zeros(n, dtype=torch.bool, device=device),
        converged=False,
    )


@dataclass(frozen=True)
class _Gaussians2:
    """Two fitted 1-D Gaussians (weights, means, variances ``[2]``) and the mean log-likelihood."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    mean_log_likelihood: float
    converged: bool

    def log_weighted(self, z: np.ndarray) -> np.ndarray:
        """``log w_k + log N(z; m_k, v_k)``, ``[n, 2]``."""
        return (
            np.log(self.weights)
            - 0.5 * (math.log(2 * math.pi) + np.log(self.variances))
            - 0.5 * (z[:, None] - self.means) ** 2 / self.variances
        )


def _two_means_split(z: np.ndarray) -> np.ndarray:
    """Responsibilities ``[n, 2]`` of the optimal two-means partition of 1-D ``z`` (at least two values).

    The exact minimum of the within-cluster sum of squares (what k-means looks for): over the splits of
    the sorted values between distinct neighbours, the one maximising ``S₁²/k + S₂²/(n − k)``.
    """
    order = np.sort(z)
    n = order.shape[0]
    prefix = np.cumsum(order)[:-1]  # the sums of the k smallest, k = 1 .. n-1
    k = np.arange(1, n, dtype=np.float64)
    score = prefix**2 / k + (order.sum() - prefix) ** 2 / (n - k)
    score[order[1:] <= order[:-1]] = -np.inf  # equal values stay together
    cut = order[int(np.argmax(score)) + 1]
    upper = (z >= cut).astype(np.float64)
    return np.stack([1.0 - upper, upper], axis=1)


def _m_step(z: np.ndarray, resp: np.ndarray, reg_covar: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nk = resp.sum(axis=0) + 10 * np.finfo(np.float64).eps
    means = (resp * z[:, None]).sum(axis=0) / nk  # elementwise: no BLAS pool
    variances = (resp * (z[:, None] - means) ** 2).sum(axis=0) / nk + reg_covar
    return nk / nk.sum(), means, variances


def _em_from(z: np.ndarray, resp: np.ndarray, *, max_iter: int, tol: float, reg_covar: float) -> _Gaussians2:
    """EM from the start responsibilities ``resp`` ``[n, 2]`` until the mean log-likelihood changes by less
    than ``tol`` (``mean_log_likelihood``: the value at the last E step, scikit-learn's lower bound)."""
    weights, means, variances = _m_step(z, resp, reg_covar)
    lower, converged = -math.inf, False
    for _ in range(max_iter):
        log_w = _Gaussians2(weights, means, variances, lower, converged).log_weighted(z)
        norm = np.logaddexp(log_w[:, 0], log_w[:, 1])
        weights, means, variances = _m_step(z, np.exp(log_w - norm[:, None]), reg_covar)
        previous, lower = lower, float(norm.mean())
        if abs(lower - previous) < tol:
            converged = True
            break
    return _Gaussians2(weights, means, variances, lower, converged)


def _em_two_gaussians(
    z: np.ndarray, *, max_iter: int, tol: float, reg_covar: float, n_init: int, seed: int
) -> _Gaussians2:
    """EM for a two-component 1-D Gaussian mixture, with the steps of ``sklearn.mixture.GaussianMixture``.

    The same E and M steps as scikit-learn's ``covariance_type="full"`` fit, in numpy without importing
    scikit-learn (its import and first fit cost 0.15-0.6 s, more than a whole loss pass on small data).
    Two deterministic starts cover the two ways two Gaussians on a line differ from one: by location
    (the optimal two-means partition of ``z``, what scikit-learn's k-means start looks for) and by scale
    (the optimal two-means partition of ``|z - median|``: a narrow core and wide shoulders); ``n_init - 1``
    random responsibilities drawn from ``seed`` follow. The fit with the highest likelihood is kept
    (scikit-learn's rule for its ``n_init`` starts), so a worse local optimum of one start is not returned
    when the other finds a better one.
    """
    rng = np.random.default_rng(seed)
    starts = [_two_means_split(z)]
    deviation = np.abs(z - np.median(z))
    if np.unique(deviation).shape[0] > 1:
        starts.append(_two_means_split(deviation))
    best: _Gaussians2 | None = None
    for start in range(len(starts) + n_init - 1):
        if start < len(starts):
            resp = starts[start]
        else:
            resp = rng.uniform(size=(z.shape[0], 2))
            resp /= resp.sum(axis=1, keepdims=True)
        fitted = _em_from(z, resp, max_iter=max_iter, tol=tol, reg_covar=reg_covar)
        if best is None or fitted.mean_log_likelihood > best.mean_log_likelihood:
            best = fitted
    assert best is not None  # at least the location start
    final = best.log_weighted(z)  # the likelihood at the returned parameters (scikit-learn's score)
    norm = np.logaddexp(final[:, 0], final[:, 1])
    return _Gaussians2(best.weights, best.means, best.variances, float(norm.mean()), best.converged)


def fit_loss_mixture(
    losses: Tensor,
    *,
    normalize: bool = True,
    clip_percentiles: tuple[float, float] | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 5e-4,
    n_init: int = 1,
    seed: int = 0,
) -> LossMixture:
    """Fit the two-component Gaussian mixture to per-sample losses.

    Args:
        losses: Per-sample training losses ``[n]``.
        normalize: Min–max normalise the losses before fitting (DivideMix);
            results are reported in the original units.
        clip_percentiles: e.g. ``(5, 95)`` to clip the losses to those
            percentiles before fitting (Arazo et al. 2019). Posteriors and flags
            are still computed for every sample.
        max_iter, tol, reg_covar: The EM settings, with the meaning they have
            in ``sklearn.mixture.GaussianMixture`` (``reg_covar`` is on the
            normalised scale when ``normalize``).
        n_init: One more than the number of random starts tried after the
            two deterministic ones (the most likely fit is kept).
        seed: Seed of the random starts when ``n_init > 1`` (EM always also
            starts from the two deterministic partitions, by location and by
            scale; no global random state is used).

    Returns:
        :class:`LossMixture`. If the losses contain NaN/inf or are (almost)
        constant, every float field and the posterior are NaN, nothing is
        flagged, and one :class:`PhaseStatisticsWarning` says why.

    Raises:
        DegenerateInputError: ``losses`` is not 1-D or has fewer than 2 samples,
            ``clip_percentiles`` is not ``(lo, hi)`` with ``0 <= lo < hi <= 100``,
            or ``max_iter`` or ``n_init`` is not an int of at least 1.
    """
    t = torch.as_tensor(losses)
    if t.ndim != 1 or t.shape[0] < 2:
        raise DegenerateInputError(f"losses must be a 1-D tensor of at least 2 values; got shape {tuple(t.shape)}.")
    for name, value in (("max_iter", max_iter), ("n_init", n_init)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DegenerateInputError(f"{name} must be an int of at least 1; got {value!r}.")
    if clip_percentiles is not None:
        lo_p, hi_p = clip_percentiles
        if not 0 <= lo_p < hi_p <= 100:
            raise DegenerateInputError(
                f"clip_percentiles must be (lo, hi) with 0 <= lo < hi <= 100; got {clip_percentiles!r}."
            )
    n = t.shape[0]
    x = t.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(x).all():
        _warn("Losses contain NaN or inf; the loss mixture is not fitted (NaN fields, no flags).")
        return _nan_mixture(n, t.device)
    fit_x = x
    if clip_percentiles is not None:
        lo, hi = np.percentile(x, clip_percentiles)
        fit_x = np.clip(x, lo, hi)
    lo_v, hi_v = float(fit_x.min()), float(fit_x.max())
    scale = hi_v - lo_v
    if scale <= 1e-12 * max(1.0, abs(hi_v)):
        _warn("Losses are (almost) constant, so not bimodal; the loss mixture is not fitted (NaN fields, no flags).")
        return _nan_mixture(n, t.device)
    shift, unit = (lo_v, scale) if normalize else (0.0, 1.0)
    z_fit = (fit_x - shift) / unit
    z_all = (x - shift) / unit
    fitted = _em_two_gaussians(z_fit, max_iter=max_iter, tol=tol, reg_covar=reg_covar, n_init=n_init, seed=seed)
    means = fitted.means
    stds = np.sqrt(fitted.variances)
    noisy = int(np.argmax(means))
    clean = 1 - noisy
    log_w = fitted.log_weighted(z_all)
    post = np.exp(log_w[:, noisy] - np.logaddexp(log_w[:, 0], log_w[:, 1]))
    mc, mw = shift + unit * float(means[clean]), shift + unit * float(means[noisy])
    sc, sw = unit * float(stds[clean]), unit * float(stds[noisy])
    r = float(fitted.weights[noisy])
    threshold = mixture_threshold(r, mc, mw, sc, sw)
    # one Gaussian (maximum likelihood, the same reg_covar) against the two-component fit, on the fitted values
    var0 = float(np.var(z_fit))
    var1 = var0 + reg_covar
    ll1 = -0.5 * z_fit.shape[0] * (math.log(2 * math.pi * var1) + var0 / var1)
    ll2 = fitted.mean_log_likelihood * z_fit.shape[0]
    bic_gain = 2.0 * (ll2 - ll1) - 3.0 * math.log(z_fit.shape[0])
    return LossMixture(
        weight_noisy=r,
        mean_clean=mc,
        mean_noisy=mw,
        std_clean=sc,
        std_noisy=sw,
        threshold=threshold,
        posterior=torch.as_tensor(post, dtype=torch.float64, device=t.device),
        flags=t.detach().to(torch.float64) > threshold,
        converged=fitted.converged,
        bic_gain=bic_gain,
    )


def class_dependence(flags: Tensor, labels: Tensor) -> float:
    """Share of the flags' variance explained by the given class (the correlation ratio η²).

    ``η² = Σ_k n_k (f̄_k − f̄)² / Σ_i (f_i − f̄)²`` for per-sample values ``f``
    (flags as 0/1, or posteriors) and classes ``k`` with ``n_k`` samples and
    mean ``f̄_k``. It is 1 when the flags are a function of the given label
    (whole classes flagged, others not) and near 0 when every class is
    flagged at the same rate. A loss split that follows the given class is
    not evidence of mislabeling: it is what an untrained network (some
    classes learned before others) or a collapsed one (predicting the class
    frequencies) produces, whereas symmetric label noise spreads the
    mislabeled samples over all classes.

    Args:
        flags: Per-sample flags (bool) or scores, ``[n]``.
        labels: Given integer labels, ``[n]``.

    Returns:
        η² in ``[0, 1]``; ``nan`` if the flags are constant (nothing to explain).

    Raises:
        DegenerateInputError: On shapes that do not match or an empty input.
    """
    f = torch.as_tensor(flags).detach().reshape(-1).to(torch.float64).cpu()
    y = torch.as_tensor(labels).detach().reshape(-1).cpu()
    if f.numel() != y.numel() or f.numel() == 0:
        raise DegenerateInputError(
            f"class_dependence needs flags and labels of the same non-zero length; got {f.numel()} and {y.numel()}."
        )
    mean = f.mean()
    total = float(((f - mean) ** 2).sum())
    if not total > 0:
        return math.nan
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, f)
    between = float((counts.to(torch.float64) * (sums / counts - mean) ** 2).sum())
    return min(1.0, max(0.0, between / total))


def symmetric_noise_class_dependence(labels: Tensor, rate: float, num_classes: int | None = None) -> float:
    """η² that a perfect detector of *symmetric* label noise at ``rate`` has on these given labels.

    With unequal class sizes the mislabeled share differs between given
    classes even under symmetric noise (a small class receives proportionally
    more wrong labels), so exact flags depend on the class to this extent.
    Symmetric noise: the given label is the true one with probability
    ``1 − ρ``, otherwise one of the other ``C − 1`` classes uniformly. From the
    given-label shares ``q_k`` the true shares are
    ``π_k = (q_k (C − 1) − ρ) / (C − 1 − C ρ)`` (clipped to ``[0, 1]``), the
    mislabeled share of given class ``k`` is ``f_k = ρ (1 − π_k) / ((C − 1) q_k)``,
    and the result is ``Σ_k q_k (f_k − f̄)² / (f̄ (1 − f̄))`` with ``f̄ = Σ_k q_k f_k``
    (:func:`class_dependence` of the exact noise mask).

    Args:
        labels: Given integer labels, ``[n]``.
        rate: Noise rate ``ρ`` in ``[0, 1]``.
        num_classes: ``C``; default the number of distinct labels.

    The true shares are recovered from the given ones through
    ``1/(C − 1 − C ρ)``, so sampling noise in ``q_k`` is amplified near
    ``ρ = (C − 1)/C``, where the given labels carry no information about the
    true ones; there the result is ``nan``.

    Returns:
        The expected η² in ``[0, 1]`` (0 when every class has the same size or
        ``ρ = 0``); ``nan`` when ``|C − 1 − C ρ| < 0.1 (C − 1)``.
    """
    y = torch.as_tensor(labels).detach().reshape(-1).cpu()
    if y.numel() == 0:
        raise DegenerateInputError("symmetric_noise_class_dependence needs at least one label.")
    if not 0 <= rate <= 1:
        raise DegenerateInputError(f"rate must be in [0, 1]; got {rate!r}.")
    _, counts = torch.unique(y, return_counts=True)
    c = max(int(num_classes or 0), counts.numel())
    q = torch.zeros(c, dtype=torch.float64)
    q[: counts.numel()] = counts.to(torch.float64) / y.numel()
    denominator = c - 1 - c * rate
    if c < 2 or rate <= 0:
        return 0.0
    if abs(denominator) < 0.1 * (c - 1):
        return math.nan
    pi = ((q * (c - 1) - rate) / denominator).clamp(0.0, 1.0)
    present = q > 0
    f = torch.zeros_like(q)
    f[present] = (rate * (1 - pi[present]) / ((c - 1) * q[present])).clamp(0.0, 1.0)
    mean = float((q * f).sum())
    if not 0 < mean < 1:
        return 0.0
    return min(1.0, float((q * (f - mean) ** 2).sum()) / (mean * (1 - mean)))


@dataclass(frozen=True)
class DetectionMetrics:
    """Quality of a mislabeled-sample detector against the known noise mask.

    Attributes:
        precision: Flagged samples that are truly mislabeled / flagged samples (0 if none flagged).
        recall: Mislabeled samples flagged / mislabeled samples.
        f1: Harmonic mean of precision and recall.
        auroc: Area under the ROC curve of the scores (NaN if the mask has one class only).
    """

    precision: float
    recall: float
    f1: float
    auroc: float


def detection_metrics(scores_or_flags: Tensor, true_mask: Tensor, *, threshold: float = 0.5) -> DetectionMetrics:
    """Precision, recall, F1 and AUROC of a detector of mislabeled samples (torchmetrics).

    Args:
        scores_or_flags: Boolean flags ``[n]``, or float scores ``[n]`` (e.g.
            the mixture posterior); scores are flagged at ``> threshold`` for
            precision/recall/F1 and used as they are for AUROC.
        true_mask: Boolean ``[n]``, True for truly mislabeled samples.
        threshold: Decision threshold for float scores.

    Returns:
        :class:`DetectionMetrics`. AUROC is NaN (with one warning) when
        ``true_mask`` is all True or all False.

    Raises:
        DegenerateInputError: shapes differ or are not 1-D, or scores are not finite.
    """
    from torchmetrics.functional.classification import binary_auroc, binary_f1_score, binary_precision, binary_recall

    s = torch.as_tensor(scores_or_flags)
    m = torch.as_tensor(true_mask)
    if s.ndim != 1 or m.shape != s.shape:
        raise DegenerateInputError(
            f"scores_or_flags and true_mask must be 1-D of equal length; got {tuple(s.shape)} and {tuple(m.shape)}."
        )
    if s.dtype == torch.bool:
        flags = s
        scores = s.to(torch.float32)
    else:
        scores = s.to(torch.float32)
        if not bool(torch.isfinite(scores).all()):
            raise DegenerateInputError("scores contain NaN or inf.")
        flags = scores > threshold
    target = m.bool().long().cpu()
    preds = flags.long().cpu()
    precision = float(binary_precision(preds, target, threshold=0.5))
    recall = float(binary_recall(preds, target, threshold=0.5))
    f1 = float(binary_f1_score(preds, target, threshold=0.5))
    positives = int(target.sum())
    if positives == 0 or positives == target.numel():
        _warn("The true mask has only one class; AUROC is undefined (NaN).")
        auroc = math.nan
    else:
        # binary_auroc applies a sigmoid to values outside [0, 1]; map scores monotonically into [0, 1].
        sc = scores.cpu()
        if bool(((sc < 0) | (sc > 1)).any()):
            sc = (sc - sc.min()) / (sc.max() - sc.min()).clamp_min(1e-12)
        auroc = float(binary_auroc(sc, target))
    return DetectionMetrics(precision=precision, recall=recall, f1=f1, auroc=auroc)
