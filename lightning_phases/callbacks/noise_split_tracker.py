"""NoiseSplitTracker: the clean/mislabeled split of SPEC.md §2 and the segment gradients of §3."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_phases import _lightning as pl
from lightning_phases.callbacks._probe import Unpack, _ProbeCallback
from lightning_phases.data.protocol import find_probe_ground_truth  # re-exported: it used to live here
from lightning_phases.errors import DegenerateInputError, LightningPhasesError
from lightning_phases.functional.mixture import fit_loss_mixture
from lightning_phases.functional.noise_split import (
    segment_groups,
    segment_statistics_from_groups,
    single_logit_loss,
    split_order_parameters,
)
from lightning_phases.functional.per_sample import LossFn, ParamSelection, default_loss, reduce_gram_to_groups
from lightning_phases.report.tensorboard import write_phase_layout

__all__ = ["NoiseSplitTracker", "find_probe_ground_truth"]


class NoiseSplitTracker(_ProbeCallback):
    """Log the clean/mislabeled split of the order parameters and the per-class segment gradients.

    SPEC.md §2 (Feng & Tu 2021, section 4) and §3 (clean-priority learning).
    The probe set, schedule, DDP behaviour and guarantees are those of
    :class:`~lightning_phases.callbacks.OrderParameterMonitor`.

    **Which samples are mislabeled.** If ``noisy_mask`` (and optionally
    ``true_targets``) is given, it is used (tensors over the training
    dataset). Otherwise the ground truth is read from the training dataset
    (or its ``Subset`` wrappers, or the datamodule) when it implements the
    noisy-data protocol: attributes ``is_noisy`` and ``true_targets``, as
    the package's noisy datasets do. Without ground truth -- the real-world
    case -- the mask is *estimated* at each measurement from the two-component
    loss mixture of the probe losses (SPEC §4, posterior > 0.5), and
    ``split/mask_estimated`` is 1. With ``require_ground_truth=True`` a
    missing ground truth is an error instead.

    **Segment gradients** need the true classes, so they are logged only
    with ground truth: per true class ``c`` the norms of the summed clean and
    mislabeled segment gradients, their ratio and cosine, using the logistic
    loss gradient for one-output models and the single-logit gradient
    ``(f_c − y_c)∇h_c`` for ``C``-output models. For ``C`` outputs this costs a
    second forward and backward over the probe set and ``2C`` summed weight
    gradients per layer (no second ``n×n`` Gram matrix; see
    :func:`~lightning_phases.functional.grouped_gradient_gram`); one-output
    models reuse the main Gram matrix. ``segments=False`` turns it off.

    **Cost per measurement**: the probe set's ``n×n`` Gram matrix (as for
    :class:`~lightning_phases.callbacks.OrderParameterMonitor`, and shared
    with it when both probe the same samples at the same step), ``O(n²)`` for
    the split statistics, and the segment sums above; no eigendecomposition.
    On the digits example (MLP 64-128-128-10, ten classes, one CPU core) the
    segment sums take ≈ 4 ms at n = 512 and ≈ 7 ms at n = 1024, the Gram
    matrix ≈ 8 ms and ≈ 21 ms.

    Args:
        noisy_mask: Optional bool tensor over the training dataset.
        true_targets: Optional true labels over the training dataset.
        require_ground_truth: Raise if no ground truth can be found.
        segments: Also log the per-class segment gradients.
        probe_size, batch_size, every_n_epochs, every_n_steps, measure_at_start,
        loss_fn, params, unpack, seed, chunk_size, method: as for
            :class:`~lightning_phases.callbacks.OrderParameterMonitor`.

    Logged metrics:
        - ``split/rho``: fraction of mislabeled probe samples.
        - ``split/A_c``, ``split/A_w``: total activity of clean and mislabeled minibatches.
        - ``split/A0_c``, ``split/A0_w``, ``split/A0``: directed activities.
        - ``split/R_cw``, ``split/R_ac``, ``split/R_aw``: cosines of ``g_c``, ``g_w`` and ``g``.
        - ``split/L_c``, ``split/L_w``: mean loss of clean and mislabeled probe samples.
        - ``split/err_c``, ``split/err_w``: their error rates against the given labels.
        - ``split/mask_estimated``: 1 if the mask came from the loss mixture, 0 if from ground truth.
        - ``segment/ratio/<c>``, ``segment/cos/<c>``: per true class ``c``;
          ``segment/ratio``, ``segment/cos``: their means over classes.
        - ``split/measured_step``: global step of the latest measurement.
        - ``split/skipped``: number of skipped measurements (only after a failure).
        - TensorBoard only: histograms ``split/loss_clean`` and ``split/loss_noisy``.
    """

    prefix = "split"
    phase_metrics = (
        "split/rho",
        "split/A_c",
        "split/A_w",
        "split/A0_c",
        "split/A0_w",
        "split/A0",
        "split/R_cw",
        "split/R_ac",
        "split/R_aw",
        "split/L_c",
        "split/L_w",
        "split/err_c",
        "split/err_w",
        "split/mask_estimated",
        "split/measured_step",
        "segment/ratio",
        "segment/cos",
    )
    _finite_keys = ("gram", "segment_gram")
    _reduce_keys = ("gram", "segment_gram")

    def __init__(
        self,
        *,
        noisy_mask: Tensor | None = None,
        true_targets: Tensor | None = None,
        require_ground_truth: bool = False,
        segments: bool = True,
        probe_size: int = 1024,
        batch_size: int | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        measure_at_start: bool = True,
        loss_fn: LossFn | None = None,
        params: ParamSelection = None,
        unpack: Unpack | None = None,
        seed: int = 0,
        chunk_size: int | None = None,
        method: str = "auto",
    ) -> None:
        super().__init__(
            probe_size=probe_size,
            batch_size=batch_size,
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            measure_at_start=measure_at_start,
            loss_fn=loss_fn,
            params=params,
            unpack=unpack,
            seed=seed,
            chunk_size=chunk_size,
            method=method,
        )
        if noisy_mask is not None:
            noisy_mask = torch.as_tensor(noisy_mask)
            if noisy_mask.ndim != 1:
                raise LightningPhasesError(
                    f"noisy_mask must be a 1-D bool tensor over the training set; got shape {tuple(noisy_mask.shape)}."
                )
            noisy_mask = noisy_mask.bool()
        if true_targets is not None:
            if noisy_mask is None:
                raise LightningPhasesError("true_targets was given without noisy_mask; pass both (or neither).")
            true_targets = torch.as_tensor(true_targets).long().reshape(-1)
            if true_targets.shape != noisy_mask.shape:
                raise LightningPhasesError(
                    f"true_targets has {true_targets.numel()} entries but noisy_mask has {noisy_mask.numel()}."
                )
        self.noisy_mask = noisy_mask
        self.true_targets = true_targets
        self.require_ground_truth = bool(require_ground_truth)
        self.segments = bool(segments)
        self._truth: tuple[Tensor, Tensor | None] | None = None
        self._segment_groups: tuple[Tensor, Tensor] | None = None
        self.mask_source: str = "unknown"
        self.last: dict[str, float] = {}

    def _on_probe_ready(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.probe_indices is not None and self._dataset is not None
        idx = self.probe_indices
        if self.noisy_mask is not None:
            if self.noisy_mask.numel() != len(self._dataset):
                raise LightningPhasesError(
                    f"noisy_mask has {self.noisy_mask.numel()} entries but the training set has {len(self._dataset)} samples."
                )
            self._truth = (self.noisy_mask[idx], None if self.true_targets is None else self.true_targets[idx])
            self.mask_source = "user"
        else:
            found = find_probe_ground_truth(self._dataset, idx, getattr(trainer, "datamodule", None))
            if found is None:
                if self.require_ground_truth:
                    raise LightningPhasesError(
                        "NoiseSplitTracker(require_ground_truth=True) found no ground truth: the training dataset "
                        "(and its Subset wrappers and the datamodule) has no 'is_noisy'/'true_targets' attributes. "
                        "Use a noisy dataset of lightning_phases.data, pass noisy_mask=..., or set "
                        "require_ground_truth=False to estimate the mask from the loss mixture."
                    )
                self._truth = None
                self.mask_source = "estimated"
            else:
                self._truth = found
                self.mask_source = "ground_truth"
        self._segment_groups = None
        if self._truth is not None and self._truth[1] is not None:
            self._segment_groups = segment_groups(self._truth[1], self._truth[0])
        write_phase_layout(self._tensorboard(trainer))

    def _local_statistics(self, trainer, pl_module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        losses, correct, width = self._losses_and_correct(trainer, pl_module, x, y)
        stats = {
            "gram": self._partial_gram(trainer, pl_module, x, y, self.loss_fn),
            "losses": losses,
            "correct": correct,
        }
        if self.segments and self._segment_groups is not None:
            groups, classes = self._segment_groups
            k = 2 * classes.numel()
            if width == 1 and self.loss_fn in (None, default_loss):
                # the logistic-loss gradients are the ones of the main Gram: sum its blocks
                stats["segment_gram"] = reduce_gram_to_groups(stats["gram"], groups, k)
            elif width == 1:
                stats["segment_gram"] = self._partial_grouped_gram(trainer, pl_module, x, y, default_loss, groups, k)
            else:
                pair = torch.stack([y.long().reshape(-1), self._truth[1].to(y.device)], dim=1)  # type: ignore[index]
                stats["segment_gram"] = self._partial_grouped_gram(
                    trainer, pl_module, x, pair, single_logit_loss, groups, k
                )
        return stats

    def _empty_statistics(self, n: int, device: torch.device) -> dict[str, Tensor]:
        nan = torch.full((n,), math.nan, dtype=torch.float64, device=device)
        stats = {
            "gram": torch.full((n, n), math.nan, dtype=torch.float64, device=device),
            "losses": nan,
            "correct": nan.clone(),
        }
        if self.segments and self._segment_groups is not None:
            k = 2 * self._segment_groups[1].numel()
            stats["segment_gram"] = torch.full((k, k), math.nan, dtype=torch.float64, device=device)
        return stats

    def _metrics(self, trainer, pl_module, stats: dict[str, Tensor]) -> dict[str, float]:
        b = self.effective_batch_size
        assert b is not None
        losses, correct = stats["losses"].cpu(), stats["correct"].cpu()
        if self._truth is not None:
            mask = self._truth[0].cpu()
        else:
            mix = fit_loss_mixture(losses, seed=self.seed)
            mask = mix.posterior.cpu() > 0.5
        metrics: dict[str, float] = {"split/mask_estimated": float(self._truth is None)}
        try:
            split = split_order_parameters(stats["gram"], mask, b)
        except DegenerateInputError as err:
            self._warn_once(
                "split", f"NoiseSplitTracker cannot split the probe set at step {trainer.global_step}: {err}"
            )
            return metrics
        metrics.update({f"split/{k}": v for k, v in split.as_dict().items()})
        metrics["split/L_c"] = float(losses[~mask].mean())
        metrics["split/L_w"] = float(losses[mask].mean())
        metrics["split/err_c"] = 1.0 - float(correct[~mask].mean())
        metrics["split/err_w"] = 1.0 - float(correct[mask].mean())
        if "segment_gram" in stats and self._truth is not None and self._truth[1] is not None:
            assert self._segment_groups is not None
            seg = segment_statistics_from_groups(
                stats["segment_gram"], self._truth[1].cpu(), mask, classes=self._segment_groups[1]
            )
            for k, c in enumerate(seg.classes.tolist()):
                if math.isfinite(float(seg.ratio[k])):
                    metrics[f"segment/ratio/{c}"] = float(seg.ratio[k])
                    metrics[f"segment/cos/{c}"] = float(seg.cos[k])
            metrics["segment/ratio"] = seg.mean_ratio
            metrics["segment/cos"] = seg.mean_cos
        self.last = dict(metrics)
        writer = self._tensorboard(trainer)
        if writer is not None:
            writer.add_histogram("split/loss_clean", losses[~mask].numpy(), trainer.global_step)
            writer.add_histogram("split/loss_noisy", losses[mask].numpy(), trainer.global_step)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({"mask_source": self.mask_source, "last": dict(self.last)})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.mask_source = str(state_dict.get("mask_source", "unknown"))
        self.last = dict(state_dict.get("last", {}))
