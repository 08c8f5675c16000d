"""GMMCleanser: find mislabeled samples from the loss mixture at the time the two populations are furthest apart."""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import os
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_phases import _lightning as pl
from lightning_phases import keys
from lightning_phases._io import atomic_write
from lightning_phases._lightning import Callback, rank_zero_info, tensorboard_writers
from lightning_phases._validation import check_choice, check_int
from lightning_phases.callbacks._budget import MeasurementBudget
from lightning_phases.callbacks._monitor import publish
from lightning_phases.callbacks._safety import SafetyNet
from lightning_phases.callbacks.model_adapter import Forward, ModelAdapter, OutputSelector, Task, Unpack, default_unpack
from lightning_phases.callbacks.probe import input_dtype, served_positions, training_dataloader
from lightning_phases.data.protocol import find_probe_ground_truth
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional.cleansing import CleansingTracker, class_wise_flags, excess_class_dependence
from lightning_phases.functional.ensemble import derived_seed
from lightning_phases.functional.mixture import LossMixture, detection_metrics, fit_loss_mixture
from lightning_phases.functional.per_sample import LossFn, eval_mode

__all__ = ["GMMCleanser"]


Action = Literal["flag", "remove", "stop"]
ACTIONS: tuple[Action, ...] = ("flag", "remove", "stop")
FlagScore = Literal["auto", "loss"]
FLAG_SCORES: tuple[FlagScore, ...] = ("auto", "loss")

# The budgeted schedule asks at every epoch end whether the budget allows a loss pass, with no geometric
# spacing: the peak search needs consecutive fits (patience), and geometric spacing never confirmed t_c
# within 60 epochs on digits (benchmarks/README.md): growth 0, so it may fit at consecutive epochs.
# The default budget: 0.2, not the monitors' 0.1. On noisy digits (benchmarks/README.md, "GMMCleanser under the
# budget") 0.1 put t_c 17 epochs late at rho = 0.2 (Q 0.73 -> 0.50); 0.2 kept every-epoch quality at
# rho = 0.2, 0.4, 0.5, 0.6, and the cleanser stops measuring at t_c (realised 5-15 % over those runs).
DEFAULT_OVERHEAD = 0.2
# The search for t_c looks at a fixed random subset of this many training samples (all of them when the
# training set is no larger); the flags at t_c come from one pass over every sample at the peak's weights.
# A two-component fit to 4096 losses estimates the means to about 2 % of a spread at a 20 % minority.
DEFAULT_SEARCH_SAMPLES = 4096


class GMMCleanser(SafetyNet, Callback):
    """Fit the two-component loss mixture during training and flag the mislabeled samples at ``t_c``.

    SPEC.md §4 (Feng & Tu 2021, section 5). On its schedule the cleanser
    computes the loss of every training sample (eval mode, batched, no
    gradients; sharded across ranks and summed), fits
    ``l ~ (1−r)N(m_c, s_c²) + r N(m_w, s_w²)`` by EM, and tracks
    ``ΔL = m_w − m_c``. The cleansing time ``t_c`` is the peak of ``ΔL``,
    confirmed once ``patience`` further bimodal fits have not exceeded it
    (measurements before ``warmup_epochs`` are ignored). The peak is taken on
    an exponential moving average of ΔL over the bimodal fits (``smoothing``
    is the weight of the newest fit; 1 uses the raw ΔL), so that one fit
    that happens to split the losses a little wider does not end the search
    while the two populations are still drifting apart. The flags are those
    of the fit at the peak: samples whose loss is above the threshold
    ``l_c``, at most ``max_fraction`` of the training set (the highest
    posteriors are kept, ties broken by the higher loss). With class labels
    (the default ``class_wise=True``) the flags at ``t_c`` instead come from one
    two-component mixture per given class, and for class logits under the
    task's cross-entropy (the default ``flag_score="auto"``) that mixture is fitted
    to the **logit margin** ``max_{j≠y} z_j − z_y`` of each sample
    (:func:`~lightning_phases.functional.logit_margin`: how much more the model
    believes in its best other class than in the given one) rather than to the
    loss. Whether and when to flag is decided on the losses either way.

    Fits that are not clearly bimodal (Ashman's separation below
    ``min_separation``, or a mislabeled weight outside
    ``(min_weight, 1 − min_weight)``) flag nothing and do not count as peaks;
    a peak is confirmed only by ``patience`` *consecutive* bimodal fits after
    it (a fit that is not bimodal restarts the count), and
    ``flagged_indices`` stays empty until ``t_c`` is confirmed. So on data
    without label noise, where a fit is occasionally bimodal by chance, the
    cleanser flags (almost) nothing and says the losses are not bimodal.

    Nor do fits count whose flags follow the given class (more than
    ``max_class_dependence`` of the flags' variance explained by the label,
    :func:`~lightning_phases.functional.class_dependence`): in the first
    epochs, or when the network predicts a constant, the losses split by which
    classes are learned, which can look bimodal but says nothing about
    mislabeling (symmetric label noise spreads the mislabeled samples over all
    classes). With heavy label noise the mislabeled component holds most of
    the losses and the mixture may have no second hump even when the two
    populations are distinct; ``heavy_noise_separation`` (off by default)
    accepts fits with a mislabeled weight of at least ``heavy_noise_weight``
    from that smaller separation.

    Actions at ``t_c``: ``"flag"`` (default) only records; ``"stop"`` stops
    training; ``"remove"`` continues the same ``fit`` without the flagged
    samples: the datamodule must implement ``remove_train_samples(indices)``
    (the package's noisy datamodules do) and the training DataLoader is
    rebuilt at the next epoch. The user's dataset object and files are never
    modified. For your own data, apply ``cleanser.flagged_indices`` yourself,
    e.g. ``Subset(train_set, [i for i in range(len(train_set)) if i not in flagged])``.

    Outputs at ``t_c``: ``gmm_flagged.csv`` in the log directory (index,
    loss, posterior, given label, predicted label, logit margin) and, with a TensorBoard
    logger, the image ``gmm/loss_histogram`` (the losses with the fitted
    mixture and threshold, as Feng & Tu's Figure 6B).

    The decision itself (peak, moving average, patience, rejection rules, the
    ``max_fraction`` cap) is :class:`~lightning_phases.functional.CleansingTracker`,
    in ``self.tracker``; this callback schedules the measurements, computes and
    reduces the losses, writes the outputs, acts, and keeps checkpoint state.

    **Never ends the run.** All of the cleanser's work (the loss pass, the fit,
    logging, the CSV and the figure, the datamodule's removal) runs in a
    warn-once-and-skip net: a NaN loss, labels the loss cannot take, an
    ``IterableDataset``, an error of the model or of a write warns once per kind
    (rank zero), is counted in ``gmm/skipped``, and training goes on (the
    measurement is retried at the next scheduled epoch). Under DDP a failure on
    one rank is reduced across ranks before anything is decided, so no rank
    waits on another and every rank skips or decides alike. ``gmm_flagged.csv``
    is written atomically (a temporary file in the same directory, then
    ``os.replace``): an old file is replaced whole or left as it was.

    **Lifecycle.** Each ``trainer.fit`` starts fresh: the same cleanser reused
    for a second ``fit`` (e.g. on other data) forgets the first one's fits,
    ``t_c``, flags and CSV path in ``setup``. A ``fit(ckpt_path=...)`` then
    restores the checkpoint's state (``load_state_dict``), so a resumed run
    continues its search (and, after ``"remove"``, drops the same samples again).

    **On a subset while searching.** With more than ``search_samples`` training samples the
    measurements that search for ``t_c`` evaluate a fixed random subset of that size (4096 by default),
    so a measurement costs the same on 50 000 samples as on 4096. The module's state at the current
    peak is kept (a CPU copy of its ``state_dict``); when ``t_c`` is confirmed the cleanser loads it
    for one pass over every training sample, fits the mixture to all of those losses and flags from
    that fit, then puts the current state back (the optimizer is not touched). The metrics logged at
    the confirming measurement (``gmm/num_flagged``, precision, recall, F1, AUROC) are those of the
    full pass; the others, at every measurement, are the subset's. If the peak's state could not be
    kept or loaded (for example the module gained a buffer since), or the full pass fails, that is
    warned and counted, the module keeps its own state, and the flags (and ``gmm_flagged.csv``) are
    those of the searched samples at the peak. A run resumed with another ``search_samples`` flags
    the right samples either way. So does a fit to every sample that the rules would not count as
    bimodal (stated at t_c).

    **Schedule.** By default (``every_n_epochs=None``) the loss pass keeps within
    an overhead budget: the cleanser measures at the end of the first epoch
    (after ``warmup_epochs``) and then at every epoch end at which its
    measurement time so far plus the last measurement's cost is at most
    ``overhead`` × the training time it has seen (wall time since the start of
    training, without its own measurements;
    :class:`~lightning_phases.functional.schedule.BudgetSchedule` without
    geometric spacing). When an epoch costs more than ``1/overhead`` loss
    passes that is every epoch; otherwise fits are spaced evenly in time. The
    realised overhead is logged as ``gmm/overhead`` and printed at the end of
    fitting. ``every_n_epochs=k`` gives the fixed schedule instead (after every
    ``k``-th epoch, whatever it costs; ``every_n_epochs=1`` is the schedule of
    earlier versions). Under DDP rank 0 decides and broadcasts, so every rank
    fits at the same epochs.

    Args:
        action: ``"flag"``, ``"remove"`` or ``"stop"``.
        overhead: Budget of the loss pass and fit, as a fraction of the training
            time (default 0.2: while it searches for ``t_c``, at most about 1.2× the
            training time without the cleanser; it stops measuring at ``t_c``),
            ``> 0``. Used when ``every_n_epochs`` is ``None``; ``None`` is allowed
            only with a fixed ``every_n_epochs``.
        every_n_epochs: ``None`` (default): the overhead budget schedules the
            measurements. An int ``>= 1``: measure after every this many epochs instead.
        warmup_epochs: Ignore measurements before this epoch.
        patience: Bimodal fits after the ΔL peak that confirm it (``>= 1``).
        max_fraction: Never flag more than this fraction of the training set, in ``(0, 1]``. ``None``
            (default): ``(C − 1)/C`` for ``C`` classes (beyond that rate symmetric noise leaves the given
            labels no information), 0.5 for targets that are not classes.
        min_separation: Minimal Ashman's D of a fit that counts as bimodal.
        min_weight: Minimal weight of each component of a bimodal fit.
        max_class_dependence: Largest share of the flags' variance (η²) that the
            given class may explain, beyond what exact flags of symmetric noise at
            the fitted rate would show with these class sizes
            (:func:`~lightning_phases.functional.symmetric_noise_class_dependence`),
            for a fit to count (the raw η² when the fitted weight is too close to
            ``(C − 1)/C`` to recover the class sizes); in ``(0, 1]`` (1 turns the check off). Applies to
            integer class targets only. Default 0.1: on clean data a weak network's misclassified
            samples form a second loss population that gathers in the harder classes (0.14–0.42 on
            clean MNIST-1D), while symmetric-noise flags stay below 0.1. Noise concentrated in a few
            classes (e.g. pair flips between two classes only) can exceed it: raise it or pass 1.
        heavy_noise_separation: A fit whose mislabeled weight is at least
            ``heavy_noise_weight`` and whose two components explain the losses better than one Gaussian
            by BIC counts as bimodal from this Ashman's D (the smaller of it and ``min_separation``; a
            single Gaussian split in two has D 1.2–1.5, hence the BIC condition). For heavy label noise or a weak model: the two loss populations
            then overlap without a second hump. Default 1.2 (chosen on the tuning half of
            ``benchmarks/generalization.py``, see its README); ``None``: ``min_separation`` for every fit.
        heavy_noise_weight: The mislabeled weight from which ``heavy_noise_separation`` applies, in
            ``(0, 1)``; default 0.2 (fits with a smaller mislabeled weight need ``min_separation``).
        class_wise: At ``t_c``, flag from one mixture per given class (each class above its own
            threshold, :func:`~lightning_phases.functional.class_wise_flags`) instead of the global fit's
            threshold: a hard class's clean losses sit higher than an easy class's. Integer class
            targets only (other targets keep the global flags); whether and when to flag is still the
            global fit's decision. Default True (chosen on the tuning half of
            ``benchmarks/generalization.py``: mean F1 at ρ = 0.2, 0.4 0.702 vs 0.674); False: the
            global threshold ``l_c``.
        flag_score: What the class-wise mixtures at ``t_c`` are fitted to. ``"auto"`` (default): the logit
            margin (:func:`~lightning_phases.functional.logit_margin`) when the outputs are the logits of the
            task's multi-class or binary cross-entropy (no ``loss_fn``), else the loss. Under a consistent
            pair flip a mislabeled sample's loss need not stand out, but its true class is ahead of its
            given one, which the margin sees. Chosen on the tuning half of ``benchmarks/generalization.py``
            (mean F1 at ρ = 0.2, 0.4 at the runs' t_c 0.747 vs 0.702 with the loss, ahead in all 12 groups;
            see benchmarks/README for the held-out half). ``"loss"``: the loss, as in earlier versions.
        batch_size: Batch size of the loss pass over the training set.
        search_samples: While it searches for ``t_c``, the cleanser evaluates a fixed random subset of this
            many training samples (the same at every measurement and on every rank; all of them when the
            training set is no larger), ``>= 64``; default 4096. At ``t_c`` it evaluates every sample once,
            at the module's state of the peak (kept as a CPU copy of the ``state_dict`` from the peak to
            ``t_c``, and in checkpoints made meanwhile), and flags from a fit to all of them. ``None``:
            every sample at every measurement.
        loss_fn: Per-sample loss ``(output_of_one_sample, target) -> scalar``; default cross-entropy.
        unpack: ``batch -> (inputs, targets)``; default the first two entries.
        forward: ``(pl_module, inputs) -> output`` instead of calling the module (as for the monitors).
        output: Pick the logits in a tuple/dict output: int index, str key or callable.
        task: ``"auto"``, ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``: the
            per-sample loss when ``loss_fn`` is not given (see
            :class:`~lightning_phases.callbacks.ModelAdapter`). The loss pass collates with the training
            DataLoader's ``collate_fn`` and casts floating inputs under true-precision plugins, like the
            monitors' probe. A DataLoader whose sampler serves only part of its dataset is refused (warned
            once, skipped): pass a ``Subset`` instead, so that no never-trained sample can be flagged.
        seed: Seed of the mixture fit's random starts (``n_init > 1`` only), any non-negative int (from
            ``2**32`` on it is hashed into ``[0, 2**32)``).
        clip_percentiles, normalize: Passed to :func:`~lightning_phases.functional.fit_loss_mixture`.
        smoothing: EMA weight of the newest ΔL in the peak search, in ``(0, 1]`` (1: raw ΔL).

    Logged metrics:
        - ``gmm/delta_L``: ``m_w − m_c`` of the latest fit.
        - ``gmm/threshold``: the threshold ``l_c``.
        - ``gmm/mean_clean``, ``gmm/mean_noisy``: the component means.
        - ``gmm/weight_noisy``: the mislabeled component's weight ``r``.
        - ``gmm/separation``: Ashman's D of the fit.
        - ``gmm/class_dependence``: η² of the fit's flags on the given class minus that of exact
          symmetric-noise flags at the fitted rate (class targets only); compared with ``max_class_dependence``.
        - ``gmm/num_flagged``: samples flagged by the latest fit (0 if not bimodal).
        - ``gmm/precision``, ``gmm/recall``, ``gmm/f1``, ``gmm/auroc``: against the
          dataset's ground truth, when it has one.
        - ``gmm/delta_L_smoothed``: the moving average of ΔL whose peak is ``t_c`` (bimodal fits only).
        - ``gmm/t_c_step``: global step of the confirmed cleansing time (once).
        - ``gmm/skipped``: pieces of work that failed and were skipped so far (with each measurement,
          and whenever one fails).
        - ``gmm/overhead``: realised overhead when the measurement began: seconds of the cleanser's
          measurements so far / training seconds so far (with each measurement; under a fixed schedule too).
    """

    _net_name = "GMMCleanser"
    _skipped_key = keys.gmm("skipped")

    def __init__(
        self,
        action: Action = "flag",
        *,
        overhead: float | None = DEFAULT_OVERHEAD,
        every_n_epochs: int | None = None,
        warmup_epochs: int = 0,
        patience: int = 3,
        max_fraction: float | None = None,
        min_separation: float = 2.0,
        min_weight: float = 0.01,
        batch_size: int = 1024,
        search_samples: int | None = DEFAULT_SEARCH_SAMPLES,
        loss_fn: LossFn | None = None,
        unpack: Unpack | None = None,
        seed: int = 0,
        clip_percentiles: tuple[float, float] | None = None,
        normalize: bool = True,
        smoothing: float = 0.5,
        max_class_dependence: float = 0.1,
        heavy_noise_separation: float | None = 1.2,
        heavy_noise_weight: float = 0.2,
        class_wise: bool = True,
        flag_score: FlagScore = "auto",
        forward: Forward | None = None,
        output: OutputSelector = None,
        task: Task = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(action, str) or action not in ACTIONS:
            raise LightningPhasesError(f"action must be one of {ACTIONS}; got {action!r}.")
        if every_n_epochs is not None:
            check_int("every_n_epochs", every_n_epochs, minimum=1)
        elif overhead is None:
            raise LightningPhasesError(
                "GMMCleanser needs a schedule: overhead=None and every_n_epochs=None; pass overhead=0.2 (the "
                "default budget) or a fixed every_n_epochs=1."
            )
        if overhead is not None and (
            isinstance(overhead, bool)
            or not isinstance(overhead, (int, float))
            or not math.isfinite(overhead)
            or overhead <= 0
        ):
            raise LightningPhasesError(
                f"overhead is the loss pass's share of the training time, a number > 0 such as 0.2 (or None "
                f"with a fixed every_n_epochs); got {overhead!r}."
            )
        check_int("warmup_epochs", warmup_epochs, minimum=0)
        check_int("batch_size", batch_size, minimum=1)
        if search_samples is not None:
            check_int("search_samples", search_samples, minimum=64)
        # the decision's own arguments (patience, max_fraction, separations, weights, smoothing, class check)
        self.tracker = CleansingTracker(
            patience=patience,
            max_fraction=max_fraction,
            min_separation=min_separation,
            min_weight=min_weight,
            smoothing=smoothing,
            max_class_dependence=max_class_dependence,
            heavy_noise_separation=heavy_noise_separation,
            heavy_noise_weight=heavy_noise_weight,
        )
        if clip_percentiles is not None:
            lo_hi = tuple(clip_percentiles) if isinstance(clip_percentiles, (tuple, list)) else ()
            if (
                len(lo_hi) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in lo_hi)
                or not 0 <= lo_hi[0] < lo_hi[1] <= 100
            ):
                raise LightningPhasesError(
                    f"clip_percentiles must be (low, high) with 0 <= low < high <= 100; got {clip_percentiles!r}."
                )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise LightningPhasesError(
                f"seed is the mixture fit's random_state: pass a non-negative int such as 0; got {seed!r}."
            )
        for name, fn in (("loss_fn", loss_fn), ("unpack", unpack)):
            if fn is not None and not callable(fn):
                raise LightningPhasesError(f"{name} must be callable or None; got {fn!r}.")
        # the monitors' model adapter: collate_fn, unpack, forward, output selector, dtype cast, task and loss
        self.adapter = ModelAdapter(unpack=unpack, forward=forward, output=output, task=task, loss_fn=loss_fn)
        if not isinstance(normalize, bool):
            raise LightningPhasesError(f"normalize must be True or False (a bool, not a string); got {normalize!r}.")
        if not isinstance(class_wise, bool):
            raise LightningPhasesError(f"class_wise must be True or False (a bool); got {class_wise!r}.")
        self.class_wise = class_wise
        check_choice("flag_score", flag_score, FLAG_SCORES)
        self.flag_score: FlagScore = flag_score
        self.action = action
        self.overhead = None if overhead is None else float(overhead)
        self.every_n_epochs = every_n_epochs
        self.warmup_epochs = warmup_epochs
        self.batch_size = batch_size
        self.search_samples = search_samples
        self.loss_fn = loss_fn
        self.unpack = unpack or default_unpack
        self.seed = seed
        self.clip_percentiles = clip_percentiles
        self.normalize = normalize
        self._reset()

    def _reset(self) -> None:
        """Forget every measurement: a new ``fit`` starts here (and a resumed one then loads its checkpoint)."""
        self.tracker.reset()
        if hasattr(self, "adapter"):
            self.adapter.reset()  # the task is resolved again on the new fit's data
        self.removed: bool = False
        self.csv_path: str | None = None
        self.last: dict[str, float] = {}
        self.skipped: int = 0  # pieces of work that failed and were skipped (logged as gmm/skipped)
        self._candidate: dict[str, Tensor] | None = None  # the per-sample vectors of the fit at the current peak
        self._candidate_fit: LossMixture | None = None
        self._peak_weights: dict[str, Tensor] | None = None  # the module's state at the peak (subset search only)
        self._warned: set[str] = set()  # rejection reasons already reported (once each)
        self._failed: set[str] = set()  # kinds of failure already warned about (once each)
        self._num_outputs: int | None = None  # the model's outputs per sample, seen in the loss pass
        self._overhead_before: float = math.nan  # the realised overhead when the current measurement began
        self.budget = MeasurementBudget(
            overhead=DEFAULT_OVERHEAD if self.overhead is None else self.overhead,
            every_n_epochs=self.every_n_epochs,
            growth=0.0,
        )

    # The decision state lives in the tracker; these read it.
    patience = property(lambda self: self.tracker.patience)
    max_fraction = property(lambda self: self.tracker.max_fraction)
    min_separation = property(lambda self: self.tracker.min_separation)
    min_weight = property(lambda self: self.tracker.min_weight)
    smoothing = property(lambda self: self.tracker.smoothing)
    max_class_dependence = property(lambda self: self.tracker.max_class_dependence)
    heavy_noise_separation = property(lambda self: self.tracker.heavy_noise_separation)
    heavy_noise_weight = property(lambda self: self.tracker.heavy_noise_weight)
    smoothed_delta_L = property(lambda self: self.tracker.smoothed_delta_L, doc="EMA of ΔL over the bimodal fits.")
    delta_L_history = property(
        lambda self: self.tracker.delta_L_history, doc="``(step, epoch, ΔL)`` of every bimodal fit."
    )
    best_delta_L = property(lambda self: self.tracker.best_delta_L, doc="The smoothed ΔL at the current peak.")
    best_step = property(lambda self: self.tracker.best_step, doc="Global step of the current peak.")
    best_epoch = property(lambda self: self.tracker.best_epoch, doc="Epoch of the current peak.")
    since_best = property(lambda self: self.tracker.since_best, doc="Consecutive bimodal fits since the peak.")
    t_c_step = property(lambda self: self.tracker.t_c_step, doc="Global step of the confirmed ``t_c``.")
    t_c_epoch = property(lambda self: self.tracker.t_c_epoch, doc="Epoch of the confirmed ``t_c``.")
    flagged_indices = property(
        lambda self: self.tracker.flagged_indices, doc="Indices flagged at ``t_c`` (empty until confirmed), long."
    )
    _candidate_flags = property(lambda self: self.tracker.peak_flags)

    @property
    def state_key(self) -> str:
        # Lightning reads this on every hook call (profiler names): build the string once per identity
        ident = (self.action, self.every_n_epochs, self.class_wise, self.flag_score)
        if getattr(self, "_state_key_cache", (None, ""))[0] != ident:
            # non-defaults enter the key only when set (checkpoints of earlier versions keep their key)
            extra: dict[str, Any] = {} if self.class_wise else {"class_wise": False}
            if self.flag_score != "auto":
                extra["flag_score"] = self.flag_score
            self._state_key_cache = (
                ident,
                self._generate_state_key(action=self.action, every_n_epochs=self.every_n_epochs, **extra),
            )
        return self._state_key_cache[1]

    @property
    def t_c(self) -> int | None:
        """Global step of the confirmed cleansing time (``None`` until confirmed)."""
        return self.t_c_step

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # a new fit starts fresh; fit(ckpt_path=...) restores the checkpoint's state after this hook
        self._reset()
        if self.action == "remove":
            dm = getattr(trainer, "datamodule", None)
            if dm is None or not callable(getattr(dm, "remove_train_samples", None)):
                raise LightningPhasesError(
                    "GMMCleanser(action='remove') continues training without the flagged samples through the "
                    "datamodule's remove_train_samples(indices) method, and this Trainer's datamodule has none. "
                    "Use a datamodule of lightning_phases.data, implement remove_train_samples, or use action='flag' "
                    "and apply cleanser.flagged_indices yourself."
                )

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # resumed after a removal: the fresh datamodule must drop the same samples again (indices are
        # relative to the full training set, which is what the datamodule serves before any removal)
        if self.removed and self.flagged_indices.numel() and self.action == "remove":
            failed = self._attempt(trainer, "removing the flagged samples again after resuming", self._remove, trainer)
            if self._any_rank(trainer, pl_module, failed):
                self.removed = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.budget.start()  # the budget's training clock starts with training (not at the first epoch end)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.t_c_step is not None or epoch < self.warmup_epochs:
            return
        # the same answer on every rank (fixed: a function of the epoch; budgeted: rank 0's, broadcast)
        if not self.budget.should_measure(trainer, epoch_end=True):
            return
        self._overhead_before = self.budget.overhead  # logged with this measurement (its own time not yet known)
        with self.budget.timed(trainer):
            self._measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with contextlib.suppress(Exception):
            self.budget.report(trainer, "GMMCleanser")

    # the safety net (_skip, _attempt, _any_rank) comes from callbacks/_safety.SafetyNet

    # ------------------------------------------------------------------ measurement
    def _train_loader(self, trainer: pl.Trainer) -> DataLoader:
        """The training DataLoader (found as the monitors find it); its dataset must be map-style."""
        loader = training_dataloader(trainer, "GMMCleanser")
        if isinstance(loader.dataset, IterableDataset):
            raise LightningPhasesError(
                "GMMCleanser needs a single map-style training DataLoader (a dataset with __len__ and "
                f"__getitem__, so that every sample has an index to flag); got {type(loader.dataset).__name__}."
            )
        return loader

    def _train_dataset(self, trainer: pl.Trainer) -> Any:
        return self._train_loader(trainer).dataset

    def _search_positions(self, n: int) -> Tensor | None:
        """The training samples the search for ``t_c`` looks at: ``None`` for all ``n``, else sorted indices.

        A fixed random subset of ``search_samples`` indices when ``n`` is larger, the same on every rank and
        at every measurement (drawn from ``seed`` and ``n``).
        """
        if self.search_samples is None or n <= self.search_samples:
            return None
        generator = torch.Generator().manual_seed(derived_seed(self.seed, f"gmm_search/{n}"))
        return torch.randperm(n, generator=generator)[: self.search_samples].sort().values

    def _all_losses(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The loss pass: loss, given label, prediction and logit margin of every training sample, ``[N]``.

        float64, float64, long, float64; the margin (:func:`~lightning_phases.functional.logit_margin`) is
        NaN where the outputs are not the logits of the task's loss.

        Eval mode, no gradients, batches of ``batch_size``; rank ``r`` of ``W`` computes samples
        ``r, r + W, ...`` and the shards are summed across ranks in one collective, which also carries
        a failure flag: every rank calls it exactly once, and either every rank returns the same
        vectors or every rank raises :class:`LightningPhasesError` (a failure on one rank never hangs
        the others). A non-finite loss is a failure. With ``positions`` (dataset indices, long ``[m]``)
        only those samples are evaluated and the vectors are ``[m]``, in the order of ``positions``.
        """
        loader = self._train_loader(trainer)  # the same answer (or error) on every rank
        dataset = loader.dataset
        n = len(dataset)  # type: ignore[arg-type]
        served = served_positions(loader)
        if served is not None and served.numel() < n:
            raise LightningPhasesError(
                f"the training DataLoader's sampler serves {served.numel()} of the {n} samples of its dataset, and "
                "GMMCleanser would flag samples that are never trained on; give the DataLoader a "
                "torch.utils.data.Subset of the served samples instead of a subset sampler"
            )
        self.adapter.bind(collate_fn=loader.collate_fn, cast_dtype=input_dtype(trainer, pl_module))
        world, rank = max(1, trainer.world_size), trainer.global_rank if trainer.world_size > 1 else 0
        device = pl_module.device
        indices = list(range(n)) if positions is None else [int(i) for i in positions.tolist()]
        m = len(indices)
        # [losses | given | pred | margin] of this rank's shard, then (failed, Σ outputs per sample, batches seen)
        buffer = torch.zeros(4 * m + 3, dtype=torch.float64, device=device)
        error: Exception | None = None
        try:
            slots = list(range(rank, m, world))
            self._shard_losses(dataset, pl_module, [indices[s] for s in slots], slots, buffer)
        except Exception as exc:
            error = exc
            buffer.zero_()
            buffer[4 * m] = 1.0
        if world > 1:
            buffer = trainer.strategy.reduce(buffer, reduce_op="sum")
        buffer = buffer.cpu()
        if float(buffer[4 * m]) > 0:
            if error is not None:
                raise error
            raise LightningPhasesError("the loss pass failed on another rank (that rank's warning says why)")
        if float(buffer[4 * m + 2]) > 0:
            self._num_outputs = int(round(float(buffer[4 * m + 1]) / float(buffer[4 * m + 2])))
        return (
            buffer[:m].clone(),
            buffer[m : 2 * m].clone(),
            buffer[2 * m : 3 * m].long(),
            buffer[3 * m : 4 * m].clone(),
        )

    def _shard_losses(
        self, dataset: Any, pl_module: pl.LightningModule, mine: list[int], slots: list[int], buffer: Tensor
    ) -> None:
        """Fill ``buffer`` (see :meth:`_all_losses`) at ``slots`` with the losses of the samples ``mine``.

        No collectives. Batches go through the monitors' :class:`~lightning_phases.callbacks.ModelAdapter`:
        the training DataLoader's ``collate_fn``, ``unpack``, ``forward``, ``output``, the true-precision
        input cast, and the task's loss (or ``loss_fn``).
        """
        n = (buffer.numel() - 3) // 4
        adapter = self.adapter
        loader = DataLoader(
            Subset(dataset, mine), batch_size=self.batch_size, shuffle=False, collate_fn=adapter.collate
        )
        offset = 0
        device = pl_module.device
        devices = [torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), eval_mode(pl_module):
            for batch in loader:
                inputs, targets = adapter.model_inputs(batch)
                x = adapter.to_module(inputs, pl_module)
                y = adapter.to_module(targets, pl_module, cast=False)
                out = adapter.outputs(pl_module, x)
                adapter.resolve_task(out, y)
                count = int(y.shape[0])
                outputs = int(out[0].numel()) if out.ndim > 1 else 1
                idx = torch.tensor(slots[offset : offset + count], device=device)
                offset += count
                losses = torch.vmap(adapter.loss())(out, y).reshape(-1).to(torch.float64)
                if not bool(torch.isfinite(losses).all()):
                    bad = mine[offset - count + int(torch.nonzero(~torch.isfinite(losses))[0])]
                    raise LightningPhasesError(
                        f"the loss of training sample {bad} is {float(losses[~torch.isfinite(losses)][0])}: "
                        "the mixture needs finite losses (check the model's outputs and the loss_fn)"
                    )
                buffer[idx] = losses
                if y.numel() == count:  # one target per sample: the given label (class checks, the CSV)
                    buffer[n + idx] = y.reshape(-1).to(torch.float64)
                    if out.ndim == 1 or out.shape[-1] == 1:
                        p = (out.reshape(-1) > 0).long()
                    else:
                        p = out.reshape(count, -1).argmax(-1)
                    buffer[2 * n + idx] = p.to(torch.float64)
                    margin = adapter.margins(out, y)
                    buffer[3 * n + idx] = math.nan if margin is None else margin.to(buffer.device)
                else:  # multi-label or multi-output targets: no single label (NaN: not class labels)
                    buffer[n + idx] = math.nan
                    buffer[2 * n + idx] = -1.0
                    buffer[3 * n + idx] = math.nan
                buffer[4 * n + 1] += outputs
                buffer[4 * n + 2] += 1

    @staticmethod
    def _class_labels(given: Tensor, num_outputs: int | None = None) -> Tensor | None:
        """The given labels if they are class labels, else ``None``.

        Class labels: integers, on average two or more samples per class, and (when the model's number
        of outputs is known) each one an output index -- or 0/1 for a single logit. Integer-valued
        regression targets (counts, ratings) therefore do not count.
        """
        given = given.to(torch.float64)
        if not given.numel() or not bool(torch.isfinite(given).all()) or not torch.equal(given, given.round()):
            return None
        labels = given.long()
        if num_outputs is not None and (int(labels.min()) < 0 or int(labels.max()) >= max(2, num_outputs)):
            return None
        return labels if 2 * torch.unique(labels).numel() <= labels.numel() else None

    def _num_classes(self, labels: Tensor) -> int:
        """The number of classes of class-label targets: the model's outputs, or the labels seen if more."""
        return max(self._num_outputs or 0, int(torch.unique(labels).numel()))

    @property
    def _fit_seed(self) -> int:
        """The seed of every mixture fit (``seed``, hashed into ``[0, 2**32)`` from 2**32 on)."""
        return self.seed if self.seed < 2**32 else derived_seed(self.seed, "gmm") % 2**32

    def _fit(
        self, trainer: pl.Trainer, losses: Tensor, given: Tensor, positions: Tensor | None = None
    ) -> tuple[LossMixture, float, Any, int | None]:
        """The mixture fit, its class-dependence value, the ground truth (or ``None``) and the number of
        classes (``None``: the targets are not classes); no collectives. ``positions``: the dataset indices
        of the losses (``None``: all, in order)."""
        fit = fit_loss_mixture(
            losses,
            seed=self._fit_seed,
            clip_percentiles=self.clip_percentiles,
            normalize=self.normalize,
        )
        labels = self._class_labels(given, self._num_outputs)
        dependence = excess_class_dependence(fit, labels)
        truth = find_probe_ground_truth(
            self._train_dataset(trainer),
            torch.arange(losses.numel()) if positions is None else positions,
            getattr(trainer, "datamodule", None),
        )
        num_classes = None if labels is None else self._num_classes(labels)
        return fit, dependence, truth, num_classes

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One measurement: loss pass, fit, decision, logging and (at t_c) the outputs and the action.

        Every failure is skipped (warned once, counted in ``gmm/skipped``); every rank reaches the same
        collectives in the same order and takes the same decision.
        """
        epoch = trainer.current_epoch
        try:
            positions = self._search_positions(len(self._train_dataset(trainer)))
            losses, given, pred, margin = self._all_losses(trainer, pl_module, positions)
        except Exception as failure:  # raised on every rank alike (see _all_losses)
            self._skip(trainer, "the loss pass", failure, epoch)
            return
        error: Exception | None = None
        try:
            fit, dependence, truth, num_classes = self._fit(trainer, losses, given, positions)
        except Exception as exc:
            error = exc
        if self._any_rank(trainer, pl_module, error is not None):
            self._skip(trainer, "the mixture fit", error or "it failed on another rank", epoch)
            return
        decision = self.tracker.update(
            fit, losses, dependence=dependence, step=trainer.global_step, epoch=epoch, num_classes=num_classes
        )
        flags = decision.flags
        if decision.new_peak:
            self._candidate = {
                "losses": losses,
                "given": given,
                "pred": pred,
                "margin": margin,
                "flags": decision.flags,
                "posterior": fit.posterior.cpu(),
            }
            self._candidate_fit = fit
            self._peak_weights = None
            if positions is not None:  # the full pass waits for confirmation: keep the module's state at the peak
                # the tracker's flags are dataset indices whatever the search ran on (a resume may change it)
                self.tracker.peak_flags = positions[self.tracker.peak_flags]
                self._candidate["positions"] = positions
                self._keep_peak_state(trainer, pl_module)
        scored_fit, scored_losses = fit, losses  # the posterior (or losses) the logged AUROC is of
        if decision.confirmed and self._candidate is not None and "positions" in self._candidate:
            full = self._flag_every_sample(trainer, pl_module)
            if full is not None:
                scored_fit, scored_losses, flags, truth = full
        if decision.confirmed and self.class_wise:
            refined = self._class_wise_flags(trainer, pl_module)
            if refined is not None:
                flags = refined
                if truth is not None and truth[0].numel() != flags.numel():
                    # this measurement searched a subset but the peak was every sample's (a resume that
                    # changed search_samples): the subset's ground truth does not score these flags
                    truth = None
        metrics = {
            keys.gmm("delta_L"): fit.delta_L,
            keys.gmm("threshold"): fit.threshold,
            keys.gmm("mean_clean"): fit.mean_clean,
            keys.gmm("mean_noisy"): fit.mean_noisy,
            keys.gmm("weight_noisy"): fit.weight_noisy,
            keys.gmm("separation"): fit.separation,
            keys.gmm("num_flagged"): float(flags.sum()),
            keys.gmm("skipped"): float(self.skipped),
        }
        overhead = self._overhead_before  # measurement seconds / training seconds before this measurement
        if math.isfinite(overhead):
            metrics[keys.gmm("overhead")] = overhead
        if math.isfinite(dependence):
            metrics[keys.gmm("class_dependence")] = dependence
        if truth is not None and 0 < int(truth[0].sum()) < truth[0].numel():
            det = detection_metrics(flags, truth[0])
            finite = bool(torch.isfinite(scored_fit.posterior).all())
            scores = scored_fit.posterior if decision.bimodal and finite else scored_losses
            auroc = detection_metrics(scores.to(torch.float64), truth[0]).auroc
            metrics.update(
                {
                    keys.gmm("precision"): det.precision,
                    keys.gmm("recall"): det.recall,
                    keys.gmm("f1"): det.f1,
                    keys.gmm("auroc"): auroc,
                }
            )
        if decision.rejection is not None and decision.rejection not in self._warned:
            self._warned.add(decision.rejection)
            rank_zero_info(
                f"GMMCleanser: at epoch {epoch} the training losses are not bimodal ({decision.reason}); nothing is "
                "flagged and the fit does not count towards t_c. This is expected on clean data and early in training."
            )
        if decision.smoothed_delta_L is not None:
            metrics[keys.gmm("delta_L_smoothed")] = decision.smoothed_delta_L
        if decision.confirmed:
            metrics[keys.gmm("t_c_step")] = float(self.tracker.t_c_step)  # type: ignore[arg-type]
        self.last = {k: float(v) for k, v in metrics.items()}
        self._attempt(trainer, "logging the metrics", self._publish, trainer, metrics)
        if decision.confirmed:
            self._on_confirmed(trainer, pl_module)

    def _keep_peak_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep a CPU copy of the module's state at a new peak of a subset search (``None`` if that failed
        on any rank: warned and counted, and the flags at t_c are then the subset's)."""
        kept: list[dict[str, Any]] = []
        failed = self._attempt(
            trainer, "keeping the module's state at the peak", lambda: kept.append(_module_state(pl_module))
        )
        self._peak_weights = None if self._any_rank(trainer, pl_module, failed) or not kept else kept[0]

    def _num_searched(self) -> int:
        """How many samples the subset search measured at the current peak."""
        return int(self._candidate["positions"].numel()) if self._candidate else 0

    def _flag_every_sample(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[LossMixture, Tensor, Tensor, Any] | None:
        """After a search on a subset: the flags at ``t_c`` from every training sample, at the peak's weights.

        Loads the module's state at the peak, computes every sample's loss, fits the mixture to them and
        restores the current state; the flags are that fit's (capped as the tracker caps). Sets the
        tracker's ``flagged_indices`` and the CSV's vectors and returns ``(fit, losses, flags, ground
        truth)``, or ``None`` when it failed (warned and counted; the flags then stay the searched
        samples' flags at the peak).
        """
        epoch = trainer.current_epoch
        state, self._peak_weights = self._peak_weights, None
        if state is None:  # it could not be kept (warned then), or the checkpoint resumed from did not hold it
            rank_zero_info(
                "GMMCleanser: the module's state at the peak is unknown, so the flags at t_c are those of the "
                f"{self._num_searched()} samples searched at the peak."
            )
            return None
        try:
            with _module_state_loaded(pl_module, state):
                losses, given, pred, margin = self._all_losses(trainer, pl_module)
        except Exception as failure:  # raised on every rank alike (see _all_losses)
            self._skip(trainer, "the loss pass over every sample at t_c", failure, epoch)
            return None
        error: Exception | None = None
        try:
            fit, dependence, truth, num_classes = self._fit(trainer, losses, given)
            flags = self.tracker.capped_flags(fit, losses, num_classes)
        except Exception as exc:
            error = exc
        if self._any_rank(trainer, pl_module, error is not None):
            self._skip(trainer, "the mixture fit over every sample at t_c", error or "it failed on another rank", epoch)
            return None
        rejected = self.tracker.rejection(fit, dependence)  # the same on every rank: the losses are all-reduced
        if rejected is not None:
            rank_zero_info(
                f"GMMCleanser: the fit to every training sample at the peak is not bimodal ({rejected[1]}); the "
                f"flags at t_c are those of the {self._num_searched()} samples searched at the peak."
            )
            return None
        self.tracker.flagged_indices = torch.nonzero(flags).flatten().cpu()
        self._candidate = {
            "losses": losses,
            "given": given,
            "pred": pred,
            "margin": margin,
            "flags": flags,
            "posterior": fit.posterior.cpu(),
        }
        self._candidate_fit = fit
        return fit, losses, flags, truth

    def _class_wise_flags(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """At ``t_c``: the flags from one mixture per given class (:func:`class_wise_flags`), bool ``[N]``.

        Replaces the tracker's ``flagged_indices`` and the CSV's flags and posteriors; ``None`` (the
        global fit's flags stay) when the targets are not class labels, when only the searched samples'
        losses are known (the full pass at ``t_c`` failed), or when it failed on any rank (warned, counted).
        """
        cand, fit = self._candidate, self._candidate_fit
        if cand is None or fit is None or "positions" in cand:
            return None
        labels = self._class_labels(cand["given"], self._num_outputs)
        if labels is None:
            return None
        scores = cand["losses"]
        margin = cand.get("margin")  # absent in checkpoints of earlier versions
        if self.flag_score == "auto" and margin is not None and bool(torch.isfinite(margin).all()):
            scores = margin.to(torch.float64)
        out: list[tuple[Tensor, Tensor]] = []
        failed = self._attempt(
            trainer,
            "the class-wise mixture fits at t_c",
            lambda: out.append(
                class_wise_flags(
                    scores,
                    labels,
                    fit,
                    max_fraction=self.tracker.cap_fraction(self._num_classes(labels)),
                    seed=self._fit_seed,
                    normalize=self.normalize,
                    clip_percentiles=self.clip_percentiles,
                )
            ),
        )
        if self._any_rank(trainer, pl_module, failed) or not out:
            return None
        flags, posterior = out[0]
        self.tracker.flagged_indices = torch.nonzero(flags).flatten().cpu()
        cand["flags"], cand["posterior"] = flags, posterior
        return flags

    def _on_confirmed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n_flag = int(self.flagged_indices.numel())
        rank_zero_info(
            f"GMMCleanser: cleansing time t_c = step {self.t_c_step} (epoch {self.t_c_epoch}), "
            f"ΔL = {self.best_delta_L:.4g}; {n_flag} samples flagged."
        )
        directory = self._log_dir(trainer)  # a collective under DDP: every rank must ask
        if trainer.is_global_zero and self._candidate is not None:
            self._attempt(trainer, "writing gmm_flagged.csv", self._write_csv, directory)
            self._attempt(trainer, "drawing the loss histogram", self._write_figure, trainer)
        trainer.strategy.barrier("gmm_cleanser_t_c")  # every rank confirms t_c at the same measurement
        if self.action == "stop":
            trainer.should_stop = True
        elif self.action == "remove" and n_flag:
            failed = self._attempt(trainer, "removing the flagged samples", self._remove, trainer)
            if not self._any_rank(trainer, pl_module, failed):  # every rank removes, or none continues without
                trainer.reload_dataloaders_every_n_epochs = 1  # rebuild the training DataLoader at the next epoch
                self.removed = True

    def _remove(self, trainer: pl.Trainer) -> None:
        trainer.datamodule.remove_train_samples(self.flagged_indices.clone())

    def _log_dir(self, trainer: pl.Trainer) -> str:
        return trainer.log_dir or trainer.default_root_dir

    def _write_csv(self, directory: str) -> None:
        """``gmm_flagged.csv``, written atomically (an old file is replaced whole or left as it was)."""
        cand = self._candidate
        if cand is None:
            return
        path = os.path.join(directory, "gmm_flagged.csv")
        # the vectors are per dataset index, or (the full pass at t_c failed) per searched sample
        slot = {int(p): j for j, p in enumerate(cand["positions"].tolist())} if "positions" in cand else None
        with atomic_write(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["index", "loss", "posterior", "given_label", "predicted_label", "margin"])
            margin = cand.get("margin")
            for i in self.flagged_indices.tolist():
                j = i if slot is None else slot[i]
                m = math.nan if margin is None else float(margin[j])
                writer.writerow(
                    [
                        i,
                        f"{float(cand['losses'][j]):.6g}",
                        f"{float(cand['posterior'][j]):.6g}",
                        "" if math.isnan(float(cand["given"][j])) else int(cand["given"][j]),
                        int(cand["pred"][j]),
                        "" if math.isnan(m) else f"{m:.6g}",
                    ]
                )
        self.csv_path = path

    def _write_figure(self, trainer: pl.Trainer) -> None:
        writers = tensorboard_writers(trainer)
        if not writers or self._candidate_fit is None or self._candidate is None:
            return
        from lightning_phases.report.tensorboard import add_figure, mixture_figure

        fig = mixture_figure(
            self._candidate["losses"], self._candidate_fit, title=f"losses at t_c (epoch {self.t_c_epoch})"
        )
        add_figure(writers, keys.gmm("loss_histogram"), fig, self.t_c_step)  # every TensorBoard logger

    def _publish(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        publish(trainer, metrics)  # the monitors' one rule: non-finite values are neither logged nor published

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.tracker.state_dict(),
            "removed": self.removed,
            "skipped": self.skipped,
            "candidate": self._candidate_state(),
            "peak_weights": None if self.t_c_step is not None else self._peak_weights,
            "budget": self.budget.state_dict(),
        }

    _FIT_FIELDS = ("weight_noisy", "mean_clean", "mean_noisy", "std_clean", "std_noisy", "threshold", "converged")

    def _candidate_state(self) -> dict[str, Any] | None:
        """The fit at the current, not yet confirmed peak: what the CSV and histogram at t_c are made from.

        Six per-sample vectors (loss, given label, prediction, logit margin, flag, posterior) until t_c is
        confirmed (five in checkpoints of earlier versions: no margin).
        """
        if self._candidate is None or self._candidate_fit is None or self.t_c_step is not None:
            return None
        state: dict[str, Any] = {k: v.detach().cpu().clone() for k, v in self._candidate.items()}
        state["fit"] = {k: getattr(self._candidate_fit, k) for k in self._FIT_FIELDS}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)
        self.removed = bool(state_dict.get("removed", False))
        self.skipped = int(state_dict.get("skipped", 0))
        self.budget.load_state_dict(state_dict.get("budget", {}))  # old checkpoints: a fresh budget
        self._candidate, self._candidate_fit = None, None
        weights = state_dict.get("peak_weights")
        self._peak_weights = None if weights is None else {k: torch.as_tensor(v) for k, v in weights.items()}
        candidate = state_dict.get("candidate")
        if candidate:
            fit = dict(candidate["fit"])
            self._candidate = {k: torch.as_tensor(v) for k, v in candidate.items() if k != "fit"}
            self._candidate_fit = LossMixture(
                **fit,
                posterior=self._candidate["posterior"].to(torch.float64),
                flags=self._candidate["losses"].to(torch.float64) > fit["threshold"],
            )


def _module_state(module: torch.nn.Module) -> dict[str, Any]:
    """A CPU copy of the module's ``state_dict`` (parameters, buffers and any ``get_extra_state`` object)."""
    return {
        k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else copy.deepcopy(v)
        for k, v in module.state_dict().items()
    }


@contextlib.contextmanager
def _module_state_loaded(module: torch.nn.Module, state: dict[str, Any]) -> Iterator[None]:
    """Within the block the module holds ``state`` (copied into its own tensors, so the optimizer's
    references stay valid); afterwards its own state again, also when loading fails part of the way
    (``load_state_dict`` copies every matching tensor before it raises on missing, unexpected or
    reshaped keys)."""
    current = _module_state(module)
    try:
        module.load_state_dict(state)
        yield
    finally:
        module.load_state_dict(current)
