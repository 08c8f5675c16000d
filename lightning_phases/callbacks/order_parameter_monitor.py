"""OrderParameterMonitor: the order parameters of SPEC.md §1, logged while training."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_phases import _lightning as pl
from lightning_phases.callbacks._probe import Unpack, _check_positive_int, _ProbeCallback
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional.ensemble import effective_dimension, make_generator, noise_spectrum, order_parameters
from lightning_phases.functional.per_sample import LossFn, ParamSelection
from lightning_phases.report.tensorboard import spectrum_figure, write_phase_layout

__all__ = ["OrderParameterMonitor"]


class OrderParameterMonitor(_ProbeCallback):
    """Log the order parameters of the minibatch-gradient ensemble (Feng & Tu 2021, section 2).

    On a fixed probe set of ``probe_size`` training samples (drawn once with
    ``seed``, the same on every rank) it computes the per-sample-gradient Gram
    matrix with :func:`lightning_phases.functional.gradient_gram` and from it
    the statistics of SPEC.md §1 for minibatches of the training batch size
    ``B``. It measures at the start of training and then every
    ``every_n_epochs`` epochs or every ``every_n_steps`` optimizer steps.

    The model is measured in eval mode; its parameters, buffers, ``.grad``
    fields, train/eval flags, the optimizer and every random generator are
    left as they were, so training with the callback is bit-identical to
    training without it. A failed measurement (NaN gradients, an unsupported
    layer) warns once, is counted in ``order/skipped`` and training goes on.

    Under DDP every rank computes the Gram contribution of its share of the
    parameters for the whole probe set; the ``n×n`` contributions are summed
    across ranks (one ``all_reduce`` of ``n²`` float64) and every rank derives
    the same statistics. Only rank 0 writes to the loggers.

    Cost per measurement: one batched forward and backward over the probe set
    plus ``O(n²(d_in + d_out))`` per Linear layer for the Gram matrix, and an
    ``O(n³)`` float64 symmetric eigendecomposition for the spectrum (one CPU
    core: ≈ 11 ms at n = 512, ≈ 65 ms at n = 1024). On the digits example
    (MLP 64-128-128-10) a whole measurement of this monitor and
    :class:`~lightning_phases.callbacks.NoiseSplitTracker` together takes
    ≈ 45 ms at n = 512 and ≈ 135 ms at n = 1024 (``benchmarks/overhead.py``).
    When both monitors probe the same samples at the same step they share one
    Gram matrix and one forward pass. Lower ``probe_size`` or raise the
    interval if that matters.

    Args:
        probe_size: Number ``n`` of probe samples (the whole training set if smaller).
        batch_size: Minibatch size ``B``; default the training DataLoader's
            batch size times the number of processes times
            ``accumulate_grad_batches`` (the samples behind one optimizer step).
        every_n_epochs: Measure after every this many epochs (default 1 when
            ``every_n_steps`` is not set).
        every_n_steps: Measure every this many optimizer steps instead.
        measure_at_start: Also measure before the first step.
        loss_fn: Per-sample loss ``(output_of_one_sample, target) -> scalar``;
            default cross-entropy (logistic loss for one output).
        params: Probe only these parameters (names, module prefixes or a predicate).
        unpack: ``batch -> (inputs, targets)`` for a collated batch of dataset
            items; default the first two entries.
        seed: Seed of the probe set and of ``R``'s sampled minibatches.
        chunk_size: Samples per block of the Gram computation (bounds memory).
        method: Gram engine, ``"auto"`` (default), ``"vmap"``, ``"ghost"`` or ``"materialize"``.
        num_minibatches: Sampled minibatches for ``R``.
        spectrum_fraction: Variance fraction ``f`` of the effective dimension ``D_s(f)``.
        figure_every_n: Draw the spectrum figure every this many measurements
            (``None``: never); needs a TensorBoard logger.

    Logged metrics:
        - ``order/A``: total activity ``⟨‖g^μ‖²⟩``.
        - ``order/A0``: directed activity ``‖g‖²``.
        - ``order/A_parallel``, ``order/A_perp``: activity along and across ``g``.
        - ``order/D``: total noise ``Tr C`` (the total variance of the spectrum).
        - ``order/D_parallel``: noise along ``g``.
        - ``order/R``: mean cosine between distinct minibatch gradients.
        - ``order/sigma2_lambda``: variance of the projection ``λ_μ``.
        - ``order/D_s``: effective dimension ``D_s(spectrum_fraction)``.
        - ``order/loss``: mean probe loss; ``order/error``: probe error rate
          against the given labels.
        - ``order/measured_step``: global step of the latest measurement.
        - ``order/skipped``: number of skipped measurements (only after a failure).
        - TensorBoard only: histogram ``order/spectrum`` of ``log10`` eigenvalues
          and, every ``figure_every_n`` measurements, the figure
          ``order/spectrum_figure`` (rank-ordered eigenvalues and normalised
          cumulative variance, as Feng & Tu's Figure 2).
    """

    prefix = "order"
    phase_metrics = (
        "order/A",
        "order/A0",
        "order/A_parallel",
        "order/A_perp",
        "order/D",
        "order/D_parallel",
        "order/R",
        "order/sigma2_lambda",
        "order/D_s",
        "order/loss",
        "order/error",
        "order/measured_step",
    )

    def __init__(
        self,
        *,
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
        num_minibatches: int = 256,
        spectrum_fraction: float = 0.9,
        figure_every_n: int | None = 25,
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
            num_minibatches=num_minibatches,
        )
        if (
            isinstance(spectrum_fraction, bool)
            or not isinstance(spectrum_fraction, (int, float))
            or not 0 < spectrum_fraction <= 1
        ):
            raise LightningPhasesError(f"spectrum_fraction must be in (0, 1]; got {spectrum_fraction!r}.")
        _check_positive_int("figure_every_n", figure_every_n, allow_none=True)
        self.spectrum_fraction = float(spectrum_fraction)
        self.figure_every_n = figure_every_n
        self.last: dict[str, float] = {}

    def _on_probe_ready(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        write_phase_layout(self._tensorboard(trainer))

    def _local_statistics(self, trainer, pl_module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        losses, correct, _ = self._losses_and_correct(trainer, pl_module, x, y)
        return {
            "gram": self._partial_gram(trainer, pl_module, x, y, self.loss_fn),
            "losses": losses,  # identical on every rank (same weights): not reduced
            "correct": correct,
        }

    def _empty_statistics(self, n: int, device: torch.device) -> dict[str, Tensor]:
        nan = torch.full((n,), math.nan, dtype=torch.float64, device=device)
        return {
            "gram": torch.full((n, n), math.nan, dtype=torch.float64, device=device),
            "losses": nan,
            "correct": nan.clone(),
        }

    def _metrics(self, trainer, pl_module, stats: dict[str, Tensor]) -> dict[str, float]:
        gram = stats["gram"]
        b = self.effective_batch_size
        assert b is not None
        gen = make_generator(self.seed * 1_000_003 + trainer.global_step)
        op = order_parameters(gram, b, num_minibatches=self.num_minibatches, generator=gen)
        spectrum = noise_spectrum(gram, b)
        metrics = {f"order/{k}": v for k, v in op.as_dict().items()}
        metrics["order/D_s"] = float(effective_dimension(spectrum, self.spectrum_fraction))
        metrics["order/loss"] = float(stats["losses"].mean())
        metrics["order/error"] = 1.0 - float(stats["correct"].mean())
        self.last = dict(metrics)
        writer = self._tensorboard(trainer)
        if writer is not None:
            positive = spectrum[spectrum > 0]
            if positive.numel():
                writer.add_histogram("order/spectrum", positive.log10().cpu().numpy(), trainer.global_step)
            if self.figure_every_n is not None and (self.num_measurements % self.figure_every_n == 0):
                writer.add_figure(
                    "order/spectrum_figure",
                    spectrum_figure(spectrum.cpu(), step=trainer.global_step),
                    trainer.global_step,
                )
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["last"] = dict(self.last)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.last = dict(state_dict.get("last", {}))
