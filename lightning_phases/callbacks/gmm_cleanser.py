"""GMMCleanser: find mislabeled samples from the loss mixture at the time the two populations are furthest apart."""

from __future__ import annotations

import csv
import logging
import math
import os
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_phases import _lightning as pl
from lightning_phases._lightning import Callback, rank_zero_info, tensorboard_writers
from lightning_phases.callbacks._probe import Unpack, _check_positive_int, _check_real, default_unpack
from lightning_phases.data.protocol import find_probe_ground_truth
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional.mixture import (
    LossMixture,
    class_dependence,
    detection_metrics,
    fit_loss_mixture,
    symmetric_noise_class_dependence,
)
from lightning_phases.functional.per_sample import LossFn, default_loss, eval_mode

__all__ = ["GMMCleanser"]

log = logging.getLogger("lightning_phases")

ACTIONS = ("flag", "remove", "stop")


class GMMCleanser(Callback):
    """Fit the two-component loss mixture during training and flag the mislabeled samples at ``t_c``.

    SPEC.md §4 (Feng & Tu 2021, section 5). On its schedule the cleanser
    computes the loss of every training sample (eval mode, batched, no
    gradients; sharded across ranks and summed), fits
    ``l ~ (1−r)N(m_c, s_c²) + r N(m_w, s_w²)`` with scikit-learn, and tracks
    ``ΔL = m_w − m_c``. The cleansing time ``t_c`` is the peak of ``ΔL``,
    confirmed once ``patience`` further bimodal fits have not exceeded it
    (measurements before ``warmup_epochs`` are ignored). The peak is taken on
    an exponential moving average of ΔL over the bimodal fits (``smoothing``
    is the weight of the newest fit; 1 uses the raw ΔL), so that one fit
    that happens to split the losses a little wider does not end the search
    while the two populations are still drifting apart. The flags are those
    of the fit at the peak: samples whose loss is above the threshold
    ``l_c``, at most ``max_fraction`` of the training set (the highest
    posteriors are kept, ties broken by the higher loss).

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
    loss, posterior, given label, predicted label) and, with a TensorBoard
    logger, the image ``gmm/loss_histogram`` (the losses with the fitted
    mixture and threshold, as Feng & Tu's Figure 6B).

    Args:
        action: ``"flag"``, ``"remove"`` or ``"stop"``.
        every_n_epochs: Measure after every this many epochs.
        warmup_epochs: Ignore measurements before this epoch.
        patience: Bimodal fits after the ΔL peak that confirm it (``>= 1``).
        max_fraction: Never flag more than this fraction of the training set, in ``(0, 1]``.
        min_separation: Minimal Ashman's D of a fit that counts as bimodal.
        min_weight: Minimal weight of each component of a bimodal fit.
        max_class_dependence: Largest share of the flags' variance (η²) that the
            given class may explain, beyond what exact flags of symmetric noise at
            the fitted rate would show with these class sizes
            (:func:`~lightning_phases.functional.symmetric_noise_class_dependence`),
            for a fit to count (the raw η² when the fitted weight is too close to
            ``(C − 1)/C`` to recover the class sizes); in ``(0, 1]`` (1 turns the check off). Applies to
            integer class targets only. Noise concentrated in a few classes (e.g.
            pair flips between two classes only) can exceed it: raise it or pass 1.
        heavy_noise_separation: If set, a fit whose mislabeled weight is at least
            ``heavy_noise_weight`` counts as bimodal from this Ashman's D (below
            ``min_separation``). Meant for heavy label noise, where the mislabeled
            component is large and the mixture may have no second hump; note that
            once on it lowers the bar for every fit with a mislabeled weight of at
            least ``heavy_noise_weight``. ``None`` (default): off.
        heavy_noise_weight: The mislabeled weight from which ``heavy_noise_separation`` applies, in ``(0, 1)``.
        batch_size: Batch size of the loss pass over the training set.
        loss_fn: Per-sample loss ``(output_of_one_sample, target) -> scalar``; default cross-entropy.
        unpack: ``batch -> (inputs, targets)``; default the first two entries.
        seed: ``random_state`` of the mixture fit.
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
    """

    def __init__(
        self,
        action: str = "flag",
        *,
        every_n_epochs: int = 1,
        warmup_epochs: int = 0,
        patience: int = 3,
        max_fraction: float = 0.5,
        min_separation: float = 2.0,
        min_weight: float = 0.01,
        batch_size: int = 1024,
        loss_fn: LossFn | None = None,
        unpack: Unpack | None = None,
        seed: int = 0,
        clip_percentiles: tuple[float, float] | None = None,
        normalize: bool = True,
        smoothing: float = 0.5,
        max_class_dependence: float = 0.2,
        heavy_noise_separation: float | None = None,
        heavy_noise_weight: float = 0.2,
    ) -> None:
        super().__init__()
        if action not in ACTIONS:
            raise LightningPhasesError(f"action must be one of {ACTIONS}; got {action!r}.")
        _check_positive_int("every_n_epochs", every_n_epochs)
        _check_positive_int("warmup_epochs", warmup_epochs, minimum=0)
        _check_positive_int("patience", patience)
        _check_positive_int("batch_size", batch_size)
        reals = dict(
            max_fraction=max_fraction,
            min_separation=min_separation,
            min_weight=min_weight,
            smoothing=smoothing,
            max_class_dependence=max_class_dependence,
            heavy_noise_weight=heavy_noise_weight,
        )
        if heavy_noise_separation is not None:
            reals["heavy_noise_separation"] = heavy_noise_separation
        for name, value in reals.items():
            _check_real(name, value)
        if not 0 < max_fraction <= 1:
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
                f"max_class_dependence is a share of variance in (0, 1] (1 turns the check off); got {max_class_dependence!r}."
            )
        if not 0 < heavy_noise_weight < 1:
            raise LightningPhasesError(f"heavy_noise_weight must be in (0, 1); got {heavy_noise_weight!r}.")
        if heavy_noise_separation is not None and not 0 < heavy_noise_separation <= min_separation:
            raise LightningPhasesError(
                f"heavy_noise_separation must be None or in (0, min_separation={min_separation}]; got {heavy_noise_separation!r}."
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
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise LightningPhasesError(f"seed is the mixture fit's random_state, an int in [0, 2**32); got {seed!r}.")
        for name, fn in (("loss_fn", loss_fn), ("unpack", unpack)):
            if fn is not None and not callable(fn):
                raise LightningPhasesError(f"{name} must be callable or None; got {fn!r}.")
        if not isinstance(normalize, bool):
            raise LightningPhasesError(f"normalize must be True or False; got {normalize!r}.")
        self.action = action
        self.every_n_epochs = every_n_epochs
        self.warmup_epochs = warmup_epochs
        self.patience = patience
        self.max_fraction = float(max_fraction)
        self.min_separation = float(min_separation)
        self.min_weight = float(min_weight)
        self.batch_size = batch_size
        self.loss_fn = loss_fn
        self.unpack = unpack or default_unpack
        self.seed = seed
        self.clip_percentiles = clip_percentiles
        self.normalize = normalize
        self.smoothing = float(smoothing)
        self.max_class_dependence = float(max_class_dependence)
        self.heavy_noise_separation = None if heavy_noise_separation is None else float(heavy_noise_separation)
        self.heavy_noise_weight = float(heavy_noise_weight)
        # state
        self.smoothed_delta_L: float | None = None  # EMA of ΔL over the bimodal fits
        self.delta_L_history: list[tuple[int, int, float]] = []  # (step, epoch, ΔL) of bimodal fits
        self.best_delta_L: float = -math.inf
        self.best_step: int | None = None
        self.best_epoch: int | None = None
        self.since_best: int = 0
        self.t_c_step: int | None = None
        self.t_c_epoch: int | None = None
        self.flagged_indices: Tensor = torch.zeros(0, dtype=torch.long)
        self._candidate_flags: Tensor = torch.zeros(0, dtype=torch.long)  # flags of the current peak, until confirmed
        self.removed: bool = False
        self.csv_path: str | None = None
        self.last: dict[str, float] = {}
        self._candidate: dict[str, Tensor] | None = None
        self._candidate_fit: LossMixture | None = None
        self._warned: set[str] = set()  # rejection reasons already reported (once each)
        self._num_outputs: int | None = None  # the model's outputs per sample, seen in the loss pass

    @property
    def state_key(self) -> str:
        # Lightning reads this on every hook call (profiler names): build the string once per identity
        ident = (
            self.action,
            self.every_n_epochs,
        )
        if getattr(self, "_state_key_cache", (None, ""))[0] != ident:
            self._state_key_cache = (
                ident,
                self._generate_state_key(action=self.action, every_n_epochs=self.every_n_epochs),
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
            trainer.datamodule.remove_train_samples(self.flagged_indices.clone())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.t_c_step is not None or epoch < self.warmup_epochs or (epoch + 1) % self.every_n_epochs:
            return
        self._measure(trainer, pl_module)

    # ------------------------------------------------------------------ measurement
    def _train_dataset(self, trainer: pl.Trainer):
        loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        if not isinstance(loader, DataLoader):
            raise LightningPhasesError(
                f"GMMCleanser needs a single map-style training DataLoader; got {type(loader).__name__}."
            )
        return loader.dataset

    def _all_losses(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, given label and prediction of every training sample; identical on every rank."""
        dataset = self._train_dataset(trainer)
        n = len(dataset)
        world, rank = max(1, trainer.world_size), trainer.global_rank if trainer.world_size > 1 else 0
        mine = list(range(rank, n, world))
        losses = torch.zeros(n, dtype=torch.float64, device=pl_module.device)
        given = torch.zeros(n, dtype=torch.float64, device=pl_module.device)
        pred = torch.zeros(n, dtype=torch.float64, device=pl_module.device)
        loss_fn = self.loss_fn or default_loss
        loader = DataLoader(Subset(dataset, mine), batch_size=self.batch_size, shuffle=False)
        offset = 0
        devices = [torch.cuda.current_device()] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), eval_mode(pl_module):
            for batch in loader:
                x, y = self.unpack(batch)
                x, y = x.to(pl_module.device), y.to(pl_module.device)
                out = pl_module(x)
                self._num_outputs = int(out.shape[-1]) if out.ndim > 1 else 1
                idx = torch.tensor(mine[offset : offset + len(y)], device=pl_module.device)
                offset += len(y)
                losses[idx] = torch.vmap(loss_fn)(out, y).reshape(-1).to(torch.float64)
                given[idx] = y.reshape(-1).to(torch.float64)
                p = (out.reshape(-1) > 0).long() if out.ndim == 1 or out.shape[-1] == 1 else out.argmax(-1)
                pred[idx] = p.to(torch.float64)
        if world > 1:
            losses = trainer.strategy.reduce(losses, reduce_op="sum")
            given = trainer.strategy.reduce(given, reduce_op="sum")
            pred = trainer.strategy.reduce(pred, reduce_op="sum")
        return losses.cpu(), given.cpu(), pred.cpu().long()

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

    def _rejection(self, fit: LossMixture, dependence: float) -> tuple[str, str] | None:
        """``None`` if the fit counts as bimodal, else ``(kind, reason)``."""
        r, sep = fit.weight_noisy, fit.separation
        if not (math.isfinite(fit.delta_L) and math.isfinite(sep)) or not self.min_weight < r < 1 - self.min_weight:
            return "weight", f"the fit is degenerate (mislabeled weight {r:.3g})"
        heavy = self.heavy_noise_separation is not None and r >= self.heavy_noise_weight
        needed = self.heavy_noise_separation if heavy else self.min_separation
        if sep < needed:
            return "separation", f"separation {sep:.2f} < {needed}"
        if math.isfinite(dependence) and dependence > self.max_class_dependence:
            return "class", (
                f"the split follows the given class (η² of the flags {dependence:.2f} above what symmetric noise "
                f"would give > max_class_dependence = {self.max_class_dependence}): some classes are learned and "
                "others not yet, or the network predicts a constant"
            )
        return None

    def _capped_flags(self, fit: LossMixture, losses: Tensor) -> Tensor:
        """The fit's flags, at most ``max_fraction`` of the samples: the highest posteriors, ties (a
        posterior saturated at 1) broken by the higher loss."""
        flags = fit.flags.clone()
        cap = int(math.floor(self.max_fraction * flags.numel()))
        if int(flags.sum()) > cap:
            by_loss = torch.argsort(losses.to(fit.posterior.device), descending=True, stable=True)
            order = by_loss[torch.argsort(fit.posterior[by_loss], descending=True, stable=True)]
            flags = torch.zeros_like(flags)
            flags[order[:cap]] = True
        return flags

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        losses, given, pred = self._all_losses(trainer, pl_module)
        fit = fit_loss_mixture(losses, seed=self.seed, clip_percentiles=self.clip_percentiles, normalize=self.normalize)
        step, epoch = trainer.global_step, trainer.current_epoch
        labels = self._class_labels(given, self._num_outputs)
        dependence = math.nan
        if labels is not None and fit.flags.numel() == labels.numel() and math.isfinite(fit.weight_noisy):
            # beyond what exact flags of symmetric noise at the fitted rate would show (unequal class sizes)
            expected = symmetric_noise_class_dependence(labels, min(max(fit.weight_noisy, 0.0), 1.0))
            # near ρ = (C − 1)/C the class sizes cannot be recovered: judge the raw η² (the cautious side)
            dependence = class_dependence(fit.flags, labels) - (0.0 if math.isnan(expected) else expected)
        rejection = self._rejection(fit, dependence)
        bimodal = rejection is None
        flags = self._capped_flags(fit, losses) if bimodal else torch.zeros(losses.numel(), dtype=torch.bool)
        metrics = {
            "gmm/delta_L": fit.delta_L,
            "gmm/threshold": fit.threshold,
            "gmm/mean_clean": fit.mean_clean,
            "gmm/mean_noisy": fit.mean_noisy,
            "gmm/weight_noisy": fit.weight_noisy,
            "gmm/separation": fit.separation,
            "gmm/num_flagged": float(flags.sum()),
        }
        if math.isfinite(dependence):
            metrics["gmm/class_dependence"] = dependence
        truth = find_probe_ground_truth(
            self._train_dataset(trainer), torch.arange(losses.numel()), getattr(trainer, "datamodule", None)
        )
        if truth is not None and 0 < int(truth[0].sum()) < truth[0].numel():
            det = detection_metrics(flags, truth[0])
            scores = fit.posterior if bimodal and bool(torch.isfinite(fit.posterior).all()) else losses
            auroc = detection_metrics(scores.to(torch.float64), truth[0]).auroc
            metrics.update(
                {"gmm/precision": det.precision, "gmm/recall": det.recall, "gmm/f1": det.f1, "gmm/auroc": auroc}
            )
        if rejection is not None and rejection[0] not in self._warned:
            self._warned.add(rejection[0])
            rank_zero_info(
                f"GMMCleanser: at epoch {epoch} the training losses are not bimodal ({rejection[1]}); nothing is "
                "flagged and the fit does not count towards t_c. This is expected on clean data and early in training."
            )
        if bimodal:
            self.delta_L_history.append((step, epoch, fit.delta_L))
            prev = self.smoothed_delta_L
            level = fit.delta_L if prev is None else self.smoothing * fit.delta_L + (1 - self.smoothing) * prev
            self.smoothed_delta_L = level
            metrics["gmm/delta_L_smoothed"] = level
            if level > self.best_delta_L:
                self.best_delta_L, self.best_step, self.best_epoch = level, step, epoch
                self.since_best = 0
                self._candidate = {
                    "losses": losses,
                    "given": given,
                    "pred": pred,
                    "flags": flags,
                    "posterior": fit.posterior.cpu(),
                }
                self._candidate_fit = fit
                self._candidate_flags = torch.nonzero(flags).flatten()
            else:
                self.since_best += 1
        elif self.best_step is not None:
            self.since_best = 0  # a sporadic bimodal fit (e.g. on clean data) is not a confirmed peak
        # fits that are not bimodal neither make nor confirm a peak
        confirmed = self.best_step is not None and self.since_best >= self.patience
        if confirmed:
            self.t_c_step, self.t_c_epoch = self.best_step, self.best_epoch
            self.flagged_indices = self._candidate_flags.clone()
            metrics["gmm/t_c_step"] = float(self.t_c_step)
        self.last = {k: float(v) for k, v in metrics.items()}
        self._publish(trainer, metrics)
        if confirmed:
            self._on_confirmed(trainer)

    def _on_confirmed(self, trainer: pl.Trainer) -> None:
        n_flag = int(self.flagged_indices.numel())
        rank_zero_info(
            f"GMMCleanser: cleansing time t_c = step {self.t_c_step} (epoch {self.t_c_epoch}), "
            f"ΔL = {self.best_delta_L:.4g}; {n_flag} samples flagged."
        )
        directory = self._log_dir(trainer)  # a collective under DDP: every rank must ask
        if trainer.is_global_zero and self._candidate is not None:
            self._write_csv(directory)
            self._write_figure(trainer)
        trainer.strategy.barrier("gmm_cleanser_t_c")  # every rank confirms t_c at the same measurement
        if self.action == "stop":
            trainer.should_stop = True
        elif self.action == "remove" and n_flag:
            trainer.datamodule.remove_train_samples(self.flagged_indices.clone())
            trainer.reload_dataloaders_every_n_epochs = 1  # rebuild the training DataLoader at the next epoch
            self.removed = True

    def _log_dir(self, trainer: pl.Trainer) -> str:
        return trainer.log_dir or trainer.default_root_dir

    def _write_csv(self, directory: str) -> None:
        cand = self._candidate
        assert cand is not None
        path = os.path.join(directory, "gmm_flagged.csv")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["index", "loss", "posterior", "given_label", "predicted_label"])
            for i in self.flagged_indices.tolist():
                writer.writerow(
                    [
                        i,
                        f"{float(cand['losses'][i]):.6g}",
                        f"{float(cand['posterior'][i]):.6g}",
                        int(cand["given"][i]),
                        int(cand["pred"][i]),
                    ]
                )
        self.csv_path = path

    def _write_figure(self, trainer: pl.Trainer) -> None:
        writers = tensorboard_writers(trainer)
        if not writers or self._candidate_fit is None or self._candidate is None:
            return
        from lightning_phases.report.tensorboard import mixture_figure

        fig = mixture_figure(
            self._candidate["losses"], self._candidate_fit, title=f"losses at t_c (epoch {self.t_c_epoch})"
        )
        writers[0].add_figure("gmm/loss_histogram", fig, self.t_c_step)

    def _publish(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step)
        trainer.callback_metrics.update(
            {k: torch.tensor(float(v)) for k, v in metrics.items() if math.isfinite(float(v))}
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "delta_L_history": [list(h) for h in self.delta_L_history],
            "best_delta_L": self.best_delta_L,
            "best_step": self.best_step,
            "best_epoch": self.best_epoch,
            "since_best": self.since_best,
            "t_c_step": self.t_c_step,
            "t_c_epoch": self.t_c_epoch,
            "flagged_indices": self.flagged_indices.tolist(),
            "candidate_flags": self._candidate_flags.tolist(),
            "removed": self.removed,
            "smoothed_delta_L": self.smoothed_delta_L,
            "candidate": self._candidate_state(),
        }

    _FIT_FIELDS = ("weight_noisy", "mean_clean", "mean_noisy", "std_clean", "std_noisy", "threshold", "converged")

    def _candidate_state(self) -> dict[str, Any] | None:
        """The fit at the current, not yet confirmed peak: what the CSV and histogram at t_c are made from.

        Five per-sample vectors (loss, given label, prediction, flag, posterior) until t_c is confirmed.
        """
        if self._candidate is None or self._candidate_fit is None or self.t_c_step is not None:
            return None
        state: dict[str, Any] = {k: v.detach().cpu().clone() for k, v in self._candidate.items()}
        state["fit"] = {k: getattr(self._candidate_fit, k) for k in self._FIT_FIELDS}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.delta_L_history = [(int(a), int(b), float(c)) for a, b, c in state_dict.get("delta_L_history", [])]
        self.best_delta_L = float(state_dict.get("best_delta_L", -math.inf))
        self.best_step = state_dict.get("best_step")
        self.best_epoch = state_dict.get("best_epoch")
        self.since_best = int(state_dict.get("since_best", 0))
        self.t_c_step = state_dict.get("t_c_step")
        self.t_c_epoch = state_dict.get("t_c_epoch")
        self.flagged_indices = torch.tensor(state_dict.get("flagged_indices", []), dtype=torch.long)
        self._candidate_flags = torch.tensor(
            state_dict.get("candidate_flags", state_dict.get("flagged_indices", [])), dtype=torch.long
        )
        self.removed = bool(state_dict.get("removed", False))
        value = state_dict.get("smoothed_delta_L")
        self.smoothed_delta_L = None if value is None else float(value)
        candidate = state_dict.get("candidate")
        if candidate:
            fit = dict(candidate["fit"])
            self._candidate = {k: torch.as_tensor(v) for k, v in candidate.items() if k != "fit"}
            self._candidate_fit = LossMixture(
                **fit,
                posterior=self._candidate["posterior"].to(torch.float64),
                flags=self._candidate["losses"].to(torch.float64) > fit["threshold"],
            )
