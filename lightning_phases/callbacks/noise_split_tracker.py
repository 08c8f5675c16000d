"""NoiseSplitTracker: the clean/mislabeled split of SPEC.md §2 and the segment gradients of §3."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_phases import _lightning as pl
from lightning_phases import keys
from lightning_phases._validation import check_bool
from lightning_phases.callbacks._monitor import _ProbeMonitor, probe_args
from lightning_phases.callbacks.model_adapter import OutputSelector, Task, Unpack
from lightning_phases.callbacks.probe import Probe
from lightning_phases.data.protocol import find_probe_ground_truth  # re-exported: it used to live here
from lightning_phases.errors import DegenerateInputError, LightningPhasesError
from lightning_phases.functional._random import derived_seed32
from lightning_phases.functional.mixture import fit_loss_mixture
from lightning_phases.functional.noise_split import (
    segment_groups,
    segment_statistics_from_groups,
    single_logit_loss,
    split_order_parameters,
)
from lightning_phases.functional.per_sample import (
    GramMethod,
    LossFn,
    ParamSelection,
    default_loss,
    reduce_gram_to_groups,
)
from lightning_phases.report.tensorboard import add_histogram

__all__ = ["NoiseSplitTracker", "find_probe_ground_truth"]


class NoiseSplitTracker(_ProbeMonitor):
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

    **Segment gradients** need class targets (multi-class or binary; for
    other tasks they are skipped with a one-time note) and the true classes,
    so they are logged only with ground truth: per true class ``c`` the norms of the summed clean and
    mislabeled segment gradients, their ratio and cosine, using the logistic
    loss gradient for one-output models and the single-logit gradient
    ``(f_c − y_c)∇h_c`` for ``C``-output models. For ``C`` outputs this costs a
    second forward and backward over the probe set and ``2C`` summed weight
    gradients per layer (no second ``n×n`` Gram matrix; see
    :func:`~lightning_phases.functional.grouped_gradient_gram`); one-output
    models reuse the main Gram matrix. ``segments=False`` turns it off.

    **Tasks.** The split statistics are logged for every task; the error
    rates ``split/err_c`` and ``split/err_w`` only for classification
    (per-label for multi-label).

    **Keys.** Under ``prefix="split"`` (default) the segment keys are
    ``segment/...``; under ``prefix="split<tail>"`` they are
    ``segment<tail>/...`` and under any other prefix ``p`` they are
    ``p_segment/...`` (:func:`lightning_phases.keys.segment_prefix`).

    **Cost per measurement**: the probe set's ``n×n`` Gram matrix (as for
    :class:`~lightning_phases.callbacks.OrderParameterMonitor`, and computed
    once for both when they share a :class:`~lightning_phases.callbacks.Probe`),
    ``O(n²)`` for the split statistics, and the segment sums above; no
    eigendecomposition.

    Args:
        noisy_mask: Optional bool tensor over the training dataset.
        true_targets: Optional true labels over the training dataset.
        require_ground_truth: Raise if no ground truth can be found.
        segments: Also log the per-class segment gradients.
        prefix: Prefix of the logged split keys (default ``"split"``).
        probe, probe_size, batch_size, every_n_epochs, every_n_steps, measure_at_start,
        loss_fn, params, unpack, forward, output, task, seed, chunk_size, method: as for
            :class:`~lightning_phases.callbacks.OrderParameterMonitor`.

    Logged metrics:
        - ``split/rho``: fraction of mislabeled probe samples.
        - ``split/A_c``, ``split/A_w``: total activity of clean and mislabeled minibatches.
        - ``split/A0_c``, ``split/A0_w``, ``split/A0``: directed activities.
        - ``split/R_cw``, ``split/R_ac``, ``split/R_aw``: cosines of ``g_c``, ``g_w`` and ``g``.
        - ``split/L_c``, ``split/L_w``: mean loss of clean and mislabeled probe samples.
        - ``split/err_c``, ``split/err_w``: their error rates against the given labels
          (classification only).
        - ``split/mask_estimated``: 1 if the mask came from the loss mixture, 0 if from ground truth.
        - ``segment/ratio/<c>``, ``segment/cos/<c>``: per true class ``c``;
          ``segment/ratio``, ``segment/cos``: their means over classes.
        - ``split/measured_step``: global step of the latest measurement.
        - ``split/skipped``: number of skipped measurements (only after a failure).
        - ``split/overhead``: realised overhead, measurement time / training time so far.
        - TensorBoard only: histograms ``split/loss_clean`` and ``split/loss_noisy``.
    """

    default_prefix = keys.SPLIT_PREFIX
    table = keys.SPLIT
    _finite_keys = ("gram", "segment_gram")
    _reduce_keys = ("gram", "segment_gram")

    def __init__(
        self,
        *,
        noisy_mask: Tensor | None = None,
        true_targets: Tensor | None = None,
        require_ground_truth: bool = False,
        segments: bool = True,
        probe: Probe | None = None,
        prefix: str | None = None,
        probe_size: int = 1024,
        batch_size: int | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        overhead: float = 0.1,
        measure_at_start: bool = True,
        loss_fn: LossFn | None = None,
        params: ParamSelection = None,
        unpack: Unpack | None = None,
        forward: Any = None,
        output: OutputSelector = None,
        task: Task = "auto",
        seed: int = 0,
        chunk_size: int | None = None,
        method: GramMethod = "auto",
    ) -> None:
        super().__init__(
            probe=probe,
            prefix=prefix,
            batch_size=batch_size,
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            overhead=overhead,
            measure_at_start=measure_at_start,
            num_minibatches=256,
            probe_args=probe_args(
                probe_size=probe_size,
                seed=seed,
                loss_fn=loss_fn,
                params=params,
                unpack=unpack,
                forward=forward,
                output=output,
                task=task,
                chunk_size=chunk_size,
                method=method,
            ),
        )
        check_bool("require_ground_truth", require_ground_truth)
        check_bool("segments", segments)
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
        self.require_ground_truth = require_ground_truth
        self.segments = segments
        self.segment_prefix = keys.segment_prefix(self.prefix)
        self._truth: tuple[Tensor, Tensor | None] | None = None
        self._segment_groups: tuple[Tensor, Tensor] | None = None
        self.mask_source: str = "unknown"

    def segment_key(self, statistic: str) -> str:
        """The logged name of a segment statistic (``"ratio"``, ``"cos"``, ``"ratio/<c>"``, ``"cos/<c>"``)."""
        return keys.name(self.segment_prefix, statistic, table=keys.SEGMENT)

    @property
    def phase_metrics(self) -> tuple[str, ...]:
        """The keys this tracker puts into ``trainer.callback_metrics`` (a protocol other callbacks may read)."""
        split = tuple(self.key(s) for s, k in self.table.items() if not k.tensorboard_only and s != "skipped")
        return split + tuple(self.segment_key(s) for s in keys.SEGMENT)

    def _fresh(self) -> None:
        super()._fresh()
        self.mask_source = "unknown"

    def _on_probe_ready(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset, idx = self.probe.dataset, self.probe.positions
        if dataset is None or idx is None:
            raise LightningPhasesError("NoiseSplitTracker: the probe has no training data.")
        if self.noisy_mask is not None:
            if self.noisy_mask.numel() != len(dataset):  # type: ignore[arg-type]
                raise LightningPhasesError(
                    f"noisy_mask has {self.noisy_mask.numel()} entries but the training set has {len(dataset)} samples."  # type: ignore[arg-type]
                )
            self._truth = (self.noisy_mask[idx], None if self.true_targets is None else self.true_targets[idx])
            self.mask_source = "user"
        else:
            found = find_probe_ground_truth(dataset, idx, getattr(trainer, "datamodule", None))
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
        self._truth_positions = idx.clone()
        self._segment_groups = None
        if self._truth is not None and self._truth[1] is not None:
            self._segment_groups = segment_groups(self._truth[1], self._truth[0])

    def _local_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        losses, errors = self.probe.losses(trainer, pl_module)
        if self.probe.positions is not None and not torch.equal(self.probe.positions, self._truth_positions):
            self._on_probe_ready(trainer, pl_module)  # the probe set was re-mapped (samples removed)
        stats = {"gram": self.probe.gram(trainer, pl_module), "losses": losses}
        if errors is not None:
            stats["errors"] = errors
        if self.segments and self._segment_groups is not None:
            if not self.probe.has_class_targets:
                self._warn_once(
                    "segments",
                    f"NoiseSplitTracker logs no segment gradients for task {self.probe.task!r}: they need class "
                    "targets (multi-class or binary).",
                )
                return stats
            groups, classes = self._segment_groups
            k = 2 * classes.numel()
            _, y = self.probe.batch(trainer, pl_module)
            if self.probe.task == "binary" and self.probe.loss_fn is None:
                # the logistic-loss gradients are the ones of the main Gram: sum its blocks
                stats["segment_gram"] = reduce_gram_to_groups(stats["gram"], groups.to(stats["gram"].device), k)
            elif self.probe.task == "binary":
                stats["segment_gram"] = self.probe.grouped_gram(trainer, pl_module, y, default_loss, groups, k)
            else:
                true = self._truth[1] if self._truth is not None else None
                if true is None:
                    raise RuntimeError("segment gradients need the true classes")
                pair = torch.stack([y.long().reshape(-1), true.to(y.device)], dim=1)
                stats["segment_gram"] = self.probe.grouped_gram(trainer, pl_module, pair, single_logit_loss, groups, k)
        return stats

    def _empty_statistics(self, n: int, device: torch.device) -> dict[str, Tensor]:
        nan = torch.full((n,), math.nan, dtype=torch.float64, device=device)
        stats = {"gram": torch.full((n, n), math.nan, dtype=torch.float64, device=device), "losses": nan}
        if self.segments and self._segment_groups is not None and self.probe.has_class_targets:
            k = 2 * self._segment_groups[1].numel()
            stats["segment_gram"] = torch.full((k, k), math.nan, dtype=torch.float64, device=device)
        return stats

    def _metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: dict[str, Tensor]
    ) -> dict[str, float]:
        b = self.effective_batch_size
        if b is None:
            raise RuntimeError("the minibatch size is not known yet")
        losses = stats["losses"].cpu()
        if self._truth is not None:
            mask = self._truth[0].cpu()
        else:
            mix = fit_loss_mixture(losses, seed=derived_seed32(self.seed, "split/mixture"))
            mask = mix.posterior.cpu() > 0.5
        self._mask, self._losses = mask, losses
        metrics: dict[str, float] = {self.key("mask_estimated"): float(self._truth is None)}
        try:
            split = split_order_parameters(stats["gram"], mask, b)
        except DegenerateInputError as err:
            self._warn_once(
                "split", f"NoiseSplitTracker cannot split the probe set at step {trainer.global_step}: {err}"
            )
            return metrics
        metrics.update({self.key(k): v for k, v in split.as_dict().items()})
        metrics[self.key("L_c")] = float(losses[~mask].mean())
        metrics[self.key("L_w")] = float(losses[mask].mean())
        if "errors" in stats:
            errors = stats["errors"].cpu()
            metrics[self.key("err_c")] = float(errors[~mask].mean())
            metrics[self.key("err_w")] = float(errors[mask].mean())
        if "segment_gram" in stats and self._truth is not None and self._truth[1] is not None:
            if self._segment_groups is None:
                raise RuntimeError("segment groups are missing")
            seg = segment_statistics_from_groups(
                stats["segment_gram"], self._truth[1].cpu(), mask, classes=self._segment_groups[1]
            )
            for k, c in enumerate(seg.classes.tolist()):
                metrics[self.segment_key(f"ratio/{c}")] = float(seg.ratio[k])
                metrics[self.segment_key(f"cos/{c}")] = float(seg.cos[k])
            metrics[self.segment_key("ratio")] = seg.mean_ratio
            metrics[self.segment_key("cos")] = seg.mean_cos
        return metrics

    def _tensorboard(
        self, writers: list[Any], trainer: pl.Trainer, stats: dict[str, Tensor], metrics: dict[str, float]
    ) -> None:
        if not hasattr(self, "_mask"):
            return
        mask, losses = self._mask, self._losses
        if bool((~mask).any()):
            add_histogram(writers, self.key("loss_clean"), losses[~mask].numpy(), trainer.global_step)
        if bool(mask.any()):
            add_histogram(writers, self.key("loss_noisy"), losses[mask].numpy(), trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["mask_source"] = self.mask_source
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.mask_source = str(state_dict.get("mask_source", "unknown"))
