"""The cleansing-time decision from a series of loss-mixture fits (SPEC.md §4).

:class:`CleansingTracker` reads one fitted two-component loss mixture
(:class:`~lightning_phases.functional.mixture.LossMixture`) per measurement
and decides, causally, when the cleansing time ``t_c`` is reached and which
samples are flagged:

* A fit **counts as bimodal** unless one of the rejection rules applies, in
  this order: ``"weight"`` (a degenerate fit: ΔL or Ashman's D not finite, or
  the mislabeled weight ``r`` outside ``(min_weight, 1 − min_weight)``),
  ``"separation"`` (Ashman's D below ``min_separation``, or, when the
  mislabeled component is large, ``r >= heavy_noise_weight``, and two
  components explain the losses better than one Gaussian by BIC
  (``fit.bic_gain > 0``: a single Gaussian split in two has D 1.2–1.5), below
  ``heavy_noise_separation``),
  ``"class"`` (the flags follow the given class: the class-dependence value,
  see :func:`excess_class_dependence`, above ``max_class_dependence``).
* Over the bimodal fits the tracker keeps an exponential moving average of
  ``ΔL = m_w − m_c`` (``smoothing`` is the weight of the newest fit; 1 uses
  the raw ΔL). A smoothed value above every earlier one is a **new peak**;
  the peak is **confirmed** as ``t_c`` once ``patience`` *consecutive*
  bimodal fits after it have not exceeded it. A fit that is not bimodal
  neither makes nor confirms a peak, and restarts the count.
* The **flags** of a bimodal fit are its samples above the threshold, at most
  ``floor(max_fraction · n)`` of them (by default ``max_fraction = (C − 1)/C``
  for ``C`` classes: symmetric noise up to that rate leaves the true class the
  most frequent given label, beyond it the labels carry no information; 0.5
  without classes): when the fit flags more, the highest
  posteriors are kept and ties (posteriors saturated at 1) go to the higher
  loss, then to the lower index. The flags at ``t_c`` are those of the fit at
  the peak.

Nothing here touches Lightning, files or ranks: the
:class:`~lightning_phases.callbacks.GMMCleanser` callback computes the losses,
fits the mixture, feeds this tracker and acts on its decisions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_phases.errors import LightningPhasesError, PhaseStatisticsWarning
from lightning_phases.functional.mixture import (
    LossMixture,
    class_dependence,
    fit_loss_mixture,
    symmetric_noise_class_dependence,
)

__all__ = [
    "CleansingDecision",
    "CleansingTracker",
    "REJECTIONS",
    "class_wise_flags",
    "default_max_fraction",
    "excess_class_dependence",
    "logit_margin",
]

REJECTIONS = ("weight", "separation", "class")


def _capped(flags: Tensor, posterior: Tensor, losses: Tensor, fraction: float) -> Tensor:
    """``flags`` with at most ``floor(fraction · n)`` set: the highest posteriors, ties by the higher loss."""
    flags = flags.clone()
    cap = int(math.floor(fraction * flags.numel()))
    if int(flags.sum()) > cap:
        by_loss = torch.argsort(losses.to(posterior.device), descending=True, stable=True)
        order = by_loss[torch.argsort(posterior[by_loss], descending=True, stable=True)]
        flags = torch.zeros_like(flags)
        flags[order[:cap]] = True
    return flags


def logit_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """How much more the model believes in its best other class than in the given one, in nats.

    ``s_i = log p(ĵ_i | x_i) − log p(y_i | x_i)`` with ``ĵ_i`` the likeliest class other than the
    given ``y_i``: for ``C >= 2`` softmax logits ``z`` this is ``max_{j ≠ y} z_j − z_y``, and for one
    logistic logit ``z`` (label 1 means ``z > 0``) it is ``(1 − 2y)·z``. Equivalently the given label's
    cross-entropy minus that of the best other label. ``s_i > 0`` exactly when the model predicts
    another class than the given one. Before the network memorises the wrong labels, a mislabeled
    sample's true class is usually the best other class, and ``s`` separates the two populations
    where the loss alone cannot: under a consistent pair flip a calibrated model gives a mislabeled
    sample ``p = 0.4`` for its given label and ``0.6`` for its true one, so ``s > 0``, while a hard clean
    sample can have a low ``p`` for its label with no single other class ahead.

    Args:
        logits: Pre-softmax outputs ``[n, C]`` (``C >= 2``), or one logistic logit per sample
            ``[n]`` / ``[n, 1]``.
        labels: Given labels ``[n]``: class indices, or 0/1 for one logit.

    Returns:
        float64 ``[n]`` on the logits' device.

    Raises:
        LightningPhasesError: shapes that do not match, or labels that are not class indices of the logits.
    """
    z = torch.as_tensor(logits).detach()
    y = torch.as_tensor(labels).detach().reshape(-1).to(z.device)
    n = y.numel()
    if z.ndim == 1 or (z.ndim == 2 and z.shape[1] == 1):
        z = z.reshape(-1).to(torch.float64)
        if z.numel() != n or not bool(((y == 0) | (y == 1)).all()):
            raise LightningPhasesError(
                f"logit_margin of one logit per sample needs n logits and n labels in {{0, 1}}; got {z.numel()} "
                f"logits and labels {torch.unique(y).tolist()[:5]}."
            )
        return (1.0 - 2.0 * y.to(torch.float64)) * z
    if z.ndim != 2 or z.shape[0] != n:
        raise LightningPhasesError(
            f"logit_margin needs logits [n, C] and labels [n]; got {tuple(z.shape)} and {tuple(labels.shape)}."
        )
    classes = y.long()
    if not torch.equal(classes.to(y.dtype), y) or n and (int(classes.min()) < 0 or int(classes.max()) >= z.shape[1]):
        raise LightningPhasesError(f"logit_margin needs class indices in [0, {z.shape[1]}) as labels.")
    z = z.to(torch.float64)
    given = z.gather(1, classes[:, None]).squeeze(1)
    others = z.scatter(1, classes[:, None], -math.inf)
    return others.max(1).values - given


def class_wise_flags(
    losses: Tensor,
    labels: Tensor,
    fallback: LossMixture,
    *,
    max_fraction: float,
    min_class_size: int = 20,
    seed: int = 0,
    normalize: bool = True,
    clip_percentiles: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Flags at ``t_c`` from one loss mixture per given class instead of one for the whole training set.

    A network learns some classes better than others, so the clean losses of a
    hard class sit higher than those of an easy one, and one threshold for
    every class flags the hard classes' clean tail and misses the easy
    classes' mislabeled samples. Here the losses of each given class are
    fitted by their own two-component mixture (:func:`fit_loss_mixture`) and
    flagged above that class's threshold ``l_c`` (SPEC.md §4 within the
    class). Whether the losses are bimodal at all and when ``t_c`` is were
    decided on the global fit; this only places the threshold. A class with
    fewer than ``min_class_size`` samples, or whose losses cannot be fitted
    (constant, non-finite), keeps the global fit's flags and posteriors.
    At most ``floor(max_fraction · n)`` samples are flagged (the highest
    posteriors, ties by the higher loss).

    Chosen on the tuning half of ``benchmarks/generalization.py`` (mean
    detection F1 at ρ = 0.2 and 0.4 at the runs' t_c 0.702 against 0.674 with
    the global threshold; held-out 0.696 against 0.686; see benchmarks/README).
    Fitted to the :func:`logit_margin` instead of the losses (what
    :class:`~lightning_phases.callbacks.GMMCleanser` does for class logits) it
    gave 0.747 on the tuning half and 0.723 held out (0.690 with the losses).

    Args:
        losses: Per-sample losses ``[n]`` (those the global fit was made from), or another score that
            is higher for a likelier wrong label, such as :func:`logit_margin` (what
            :class:`~lightning_phases.callbacks.GMMCleanser` passes for class logits).
        labels: Given integer class labels ``[n]``.
        fallback: The global fit of ``losses``: flags and posteriors of the samples of small or
            unfittable classes.
        max_fraction: The flag cap, in ``(0, 1]``.
        min_class_size: Smallest class fitted on its own (``>= 2``).
        seed, normalize, clip_percentiles: Passed to :func:`fit_loss_mixture`.

    Returns:
        ``(flags, posterior)``: bool ``[n]`` and float64 ``[n]`` (each sample's posterior of its
        class's mislabeled component, or of the global one where it fell back).

    Raises:
        LightningPhasesError: shapes that do not match, or ``min_class_size < 2``.
    """
    loss = torch.as_tensor(losses).detach().reshape(-1).to("cpu", torch.float64)
    y = torch.as_tensor(labels).detach().reshape(-1).cpu()
    if y.numel() != loss.numel() or fallback.flags.numel() != loss.numel():
        raise LightningPhasesError(
            f"class_wise_flags needs losses, labels and the fallback fit of one length; got {loss.numel()}, "
            f"{y.numel()} and {fallback.flags.numel()}."
        )
    if isinstance(min_class_size, bool) or not isinstance(min_class_size, int) or min_class_size < 2:
        raise LightningPhasesError(f"min_class_size must be an int >= 2; got {min_class_size!r}.")
    flags = fallback.flags.detach().cpu().clone()
    posterior = fallback.posterior.detach().to("cpu", torch.float64).clone()
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        if members.numel() < min_class_size:
            continue
        with warnings.catch_warnings():  # a constant class: it keeps the global flags (said in the docstring)
            warnings.simplefilter("ignore", PhaseStatisticsWarning)
            fit = fit_loss_mixture(loss[members], seed=seed, normalize=normalize, clip_percentiles=clip_percentiles)
        if not bool(torch.isfinite(fit.posterior).all()):  # unfitted (NaN fields)
            continue
        flags[members] = fit.flags
        posterior[members] = fit.posterior
    return _capped(flags, posterior, loss, max_fraction), posterior


def default_max_fraction(num_classes: int | None) -> float:
    """The flag cap when none is given: ``(C − 1)/C`` for ``C >= 2`` classes, else 0.5.

    Under symmetric noise at rate ``ρ`` the true class stays the most frequent given label of its
    samples only while ``ρ < (C − 1)/C``; a cleanser flagging more would remove the labels' information.
    """
    if num_classes is None or isinstance(num_classes, bool) or int(num_classes) < 2:
        return 0.5
    return (int(num_classes) - 1) / int(num_classes)


def excess_class_dependence(fit: LossMixture, labels: Tensor | None) -> float:
    """η² of the fit's flags on the given class, beyond what exact symmetric-noise flags would show.

    ``class_dependence(fit.flags, labels) − symmetric_noise_class_dependence(labels, r)`` with
    ``r`` the fitted mislabeled weight (clamped to ``[0, 1]``); the raw η² when the baseline is
    undefined (``r`` too close to ``(C − 1)/C`` to recover the class sizes: the cautious side).

    Args:
        fit: The mixture fit; ``fit.flags`` is bool ``[n]``.
        labels: Given class labels, long ``[n]``, or ``None`` (targets that are not classes).

    Returns:
        The value, or ``nan`` when there are no class labels, their length differs from the
        flags' or the fitted weight is not finite (no class check then).
    """
    if labels is None or fit.flags.numel() != labels.numel() or not math.isfinite(fit.weight_noisy):
        return math.nan
    expected = symmetric_noise_class_dependence(labels, min(max(fit.weight_noisy, 0.0), 1.0))
    return class_dependence(fit.flags, labels) - (0.0 if math.isnan(expected) else expected)


@dataclass(frozen=True)
class CleansingDecision:
    """What one measurement decided.

    Attributes:
        step: Global step of the measurement.
        epoch: Epoch of the measurement.
        bimodal: Whether the fit counts as bimodal.
        rejection: ``None`` if bimodal, else the rule that rejected it (one of :data:`REJECTIONS`).
        reason: Human-readable reason of the rejection (``None`` if bimodal).
        delta_L: ``ΔL`` of this fit.
        smoothed_delta_L: The moving average after this fit (bimodal fits only, else ``None``).
        class_dependence: The class-dependence value the fit was judged with (``nan``: no check).
        new_peak: Whether this fit is a new peak of the smoothed ΔL.
        confirmed: Whether this measurement confirmed ``t_c`` (then ``tracker.t_c_step`` is set).
        flags: The fit's capped flags, bool ``[n]`` (all False if not bimodal).
    """

    step: int
    epoch: int
    bimodal: bool
    rejection: str | None
    reason: str | None
    delta_L: float
    smoothed_delta_L: float | None
    class_dependence: float
    new_peak: bool
    confirmed: bool
    flags: Tensor

    @property
    def num_flagged(self) -> int:
        """Number of samples this fit flags (after the cap)."""
        return int(self.flags.sum())


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LightningPhasesError(f"{name} must be a finite number; got {value!r}.")
    return float(value)


class CleansingTracker:
    """Peak tracking, smoothing, patience, rejection rules and the flag cap (see the module docstring).

    Args:
        patience: Bimodal fits after the ΔL peak that confirm it, ``>= 1``.
        max_fraction: Never flag more than this fraction of the samples, in ``(0, 1]``; ``None``
            (default): :func:`default_max_fraction` of the ``num_classes`` given to :meth:`update`.
        min_separation: Minimal Ashman's D of a bimodal fit, ``> 0``.
        min_weight: Minimal weight of each component of a bimodal fit, in ``[0, 0.5)``.
        smoothing: EMA weight of the newest ΔL, in ``(0, 1]`` (1: raw ΔL).
        max_class_dependence: Largest class-dependence value of a bimodal fit, in ``(0, 1]`` (1: off).
            Default 0.1, chosen on the tuning half of ``benchmarks/generalization.py``: on clean
            MNIST-1D a weak network's misclassified samples form a second loss population with values
            0.14–0.42 (they gather in the harder classes), symmetric-noise fits after the first epochs
            stay at or below 0.09.
        heavy_noise_separation: The Ashman's D, ``> 0``, that suffices for fits whose mislabeled
            weight is at least ``heavy_noise_weight`` and whose two components beat one Gaussian by BIC
            (``fit.bic_gain > 0``; the smaller of it and ``min_separation`` is
            used); ``None``: ``min_separation`` for every fit. Default 1.2 (chosen on the tuning half
            of ``benchmarks/generalization.py``: with many mislabeled samples, or a weak model, the
            two loss populations overlap without forming a second hump).
        heavy_noise_weight: See ``heavy_noise_separation``; in ``(0, 1)``, default 0.2.

    Raises:
        LightningPhasesError: an argument out of its range or not a finite number.
    """

    def __init__(
        self,
        *,
        patience: int = 3,
        max_fraction: float | None = None,
        min_separation: float = 2.0,
        min_weight: float = 0.01,
        smoothing: float = 0.5,
        max_class_dependence: float = 0.1,
        heavy_noise_separation: float | None = 1.2,
        heavy_noise_weight: float = 0.2,
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise LightningPhasesError(f"patience must be an int >= 1; got {patience!r}.")
        if max_fraction is not None:
            max_fraction = _check_number("max_fraction", max_fraction)
        min_separation = _check_number("min_separation", min_separation)
        min_weight = _check_number("min_weight", min_weight)
        smoothing = _check_number("smoothing", smoothing)
        max_class_dependence = _check_number("max_class_dependence", max_class_dependence)
        heavy_noise_weight = _check_number("heavy_noise_weight", heavy_noise_weight)
        if heavy_noise_separation is not None:
            heavy_noise_separation = _check_number("heavy_noise_separation", heavy_noise_separation)
        if max_fraction is not None and not 0 < max_fraction <= 1:
            raise LightningPhasesError(f"max_fraction must be in (0, 1]; got {max_fraction!r}.")
        if min_separation <= 0:
            raise LightningPhasesError(
                f"min_separation is Ashman's D of a bimodal fit, > 0 (2 by convention); got {min_separation!r}."
            )
        if not 0 <= min_weight < 0.5:
            raise LightningPhasesError(f"min_weight must be in [0, 0.5); got {min_weight!r}.")
        if not 0 < smoothing <= 1:
            raise LightningPhasesError(f"smoothing must be in (0, 1]; got {smoothing!r}.")
        if not 0 < max_class_dependence <= 1:
            raise LightningPhasesError(
                "max_class_dependence is a share of variance in (0, 1] (1 turns the check off); "
                f"got {max_class_dependence!r}."
            )
        if not 0 < heavy_noise_weight < 1:
            raise LightningPhasesError(f"heavy_noise_weight must be in (0, 1); got {heavy_noise_weight!r}.")
        if heavy_noise_separation is not None and not heavy_noise_separation > 0:
            raise LightningPhasesError(
                f"heavy_noise_separation must be None or an Ashman's D > 0 (such as 1.2); got {heavy_noise_separation!r}."
            )
        self.patience = patience
        self.max_fraction = max_fraction
        self.min_separation = min_separation
        self.min_weight = min_weight
        self.smoothing = smoothing
        self.max_class_dependence = max_class_dependence
        self.heavy_noise_separation = heavy_noise_separation
        self.heavy_noise_weight = heavy_noise_weight
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every fit seen so far."""
        self.smoothed_delta_L: float | None = None  # EMA of ΔL over the bimodal fits
        self.delta_L_history: list[tuple[int, int, float]] = []  # (step, epoch, raw ΔL) of the bimodal fits
        self.best_delta_L: float = -math.inf
        self.best_step: int | None = None
        self.best_epoch: int | None = None
        self.since_best: int = 0
        self.t_c_step: int | None = None
        self.t_c_epoch: int | None = None
        self.peak_flags: Tensor = torch.zeros(0, dtype=torch.long)  # indices flagged by the fit at the peak
        self.flagged_indices: Tensor = torch.zeros(0, dtype=torch.long)  # the peak's, once t_c is confirmed

    @property
    def confirmed(self) -> bool:
        """Whether ``t_c`` has been confirmed (the tracker then takes no more fits)."""
        return self.t_c_step is not None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the series after a restart (plain Python types)."""
        return {
            "delta_L_history": [list(h) for h in self.delta_L_history],
            "best_delta_L": self.best_delta_L,
            "best_step": self.best_step,
            "best_epoch": self.best_epoch,
            "since_best": self.since_best,
            "t_c_step": self.t_c_step,
            "t_c_epoch": self.t_c_epoch,
            "flagged_indices": self.flagged_indices.tolist(),
            "candidate_flags": self.peak_flags.tolist(),
            "smoothed_delta_L": self.smoothed_delta_L,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (missing keys keep their defaults, so old checkpoints load)."""
        self.reset()
        self.delta_L_history = [(int(a), int(b), float(c)) for a, b, c in state.get("delta_L_history", [])]
        self.best_delta_L = float(state.get("best_delta_L", -math.inf))
        self.best_step = None if state.get("best_step") is None else int(state["best_step"])
        self.best_epoch = None if state.get("best_epoch") is None else int(state["best_epoch"])
        self.since_best = int(state.get("since_best", 0))
        self.t_c_step = None if state.get("t_c_step") is None else int(state["t_c_step"])
        self.t_c_epoch = None if state.get("t_c_epoch") is None else int(state["t_c_epoch"])
        self.flagged_indices = torch.tensor(state.get("flagged_indices", []), dtype=torch.long)
        self.peak_flags = torch.tensor(state.get("candidate_flags", state.get("flagged_indices", [])), dtype=torch.long)
        value = state.get("smoothed_delta_L")
        self.smoothed_delta_L = None if value is None else float(value)

    # ------------------------------------------------------------------ rules
    def rejection(self, fit: LossMixture, dependence: float = math.nan) -> tuple[str, str] | None:
        """``None`` if the fit counts as bimodal, else ``(rule, reason)`` with ``rule`` in :data:`REJECTIONS`."""
        r, sep = fit.weight_noisy, fit.separation
        if not (math.isfinite(fit.delta_L) and math.isfinite(sep)) or not self.min_weight < r < 1 - self.min_weight:
            return "weight", f"the fit is degenerate (mislabeled weight {r:.3g})"
        heavy = self.heavy_noise_separation
        needed = self.min_separation
        if heavy is not None and r >= self.heavy_noise_weight and fit.bic_gain > 0:
            needed = min(heavy, needed)
        if sep < needed:
            return "separation", f"separation {sep:.2f} < {needed}"
        if math.isfinite(dependence) and dependence > self.max_class_dependence:
            return "class", (
                f"the split follows the given class (η² of the flags {dependence:.2f} above what symmetric noise "
                f"would give > max_class_dependence = {self.max_class_dependence}): some classes are learned and "
                "others not yet, or the network predicts a constant"
            )
        return None

    def cap_fraction(self, num_classes: int | None = None) -> float:
        """``max_fraction``, or :func:`default_max_fraction` of ``num_classes`` when it is ``None``."""
        return self.max_fraction if self.max_fraction is not None else default_max_fraction(num_classes)

    def capped_flags(self, fit: LossMixture, losses: Tensor, num_classes: int | None = None) -> Tensor:
        """The fit's flags, at most ``floor(cap · n)``: the highest posteriors, ties by the higher loss.

        Args:
            fit: The mixture fit (``flags`` and ``posterior`` of shape ``[n]``).
            losses: The per-sample losses the fit was made from, ``[n]``.
            num_classes: Number of classes of the targets (``None``: not classes), for the default cap.

        Returns:
            Bool ``[n]``.
        """
        return _capped(fit.flags, fit.posterior, losses, self.cap_fraction(num_classes))

    # ------------------------------------------------------------------ update
    def update(
        self,
        fit: LossMixture,
        losses: Tensor,
        *,
        dependence: float = math.nan,
        step: int,
        epoch: int = 0,
        num_classes: int | None = None,
    ) -> CleansingDecision:
        """Feed one measurement; return its decision.

        Args:
            fit: The mixture fit of this measurement.
            losses: Per-sample losses the fit was made from, ``[n]`` (for the cap's tie rule).
            dependence: The class-dependence value (:func:`excess_class_dependence`); ``nan``: no class check.
            step: Global step of the measurement.
            epoch: Epoch of the measurement.
            num_classes: Number of classes of the targets (``None``: not classes), for the default cap.

        Raises:
            LightningPhasesError: ``t_c`` is already confirmed (the decision is final).
        """
        if self.confirmed:
            raise LightningPhasesError(
                f"CleansingTracker: t_c was confirmed at step {self.t_c_step}; it takes no more fits (reset() to start over)."
            )
        rejected = self.rejection(fit, dependence)
        bimodal = rejected is None
        flags = (
            self.capped_flags(fit, losses, num_classes)
            if bimodal
            else torch.zeros(int(losses.numel()), dtype=torch.bool)
        )
        new_peak, level = False, None
        if bimodal:
            self.delta_L_history.append((int(step), int(epoch), float(fit.delta_L)))
            prev = self.smoothed_delta_L
            level = fit.delta_L if prev is None else self.smoothing * fit.delta_L + (1 - self.smoothing) * prev
            self.smoothed_delta_L = level
            if level > self.best_delta_L:
                self.best_delta_L, self.best_step, self.best_epoch = level, int(step), int(epoch)
                self.since_best = 0
                self.peak_flags = torch.nonzero(flags).flatten().cpu()
                new_peak = True
            else:
                self.since_best += 1
        elif self.best_step is not None:
            self.since_best = 0  # a sporadic bimodal fit (e.g. on clean data) is not a confirmed peak
        confirmed = self.best_step is not None and self.since_best >= self.patience
        if confirmed:
            self.t_c_step, self.t_c_epoch = self.best_step, self.best_epoch
            self.flagged_indices = self.peak_flags.clone()
        return CleansingDecision(
            step=int(step),
            epoch=int(epoch),
            bimodal=bimodal,
            rejection=None if rejected is None else rejected[0],
            reason=None if rejected is None else rejected[1],
            delta_L=float(fit.delta_L),
            smoothed_delta_L=level,
            class_dependence=float(dependence),
            new_peak=new_peak,
            confirmed=confirmed,
            flags=flags,
        )
