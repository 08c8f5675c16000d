"""OrderParameterMonitor: the order parameters of SPEC.md §1, logged while training."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_phases import _lightning as pl
from lightning_phases import keys
from lightning_phases._validation import check_int, check_real
from lightning_phases.callbacks._monitor import _ProbeMonitor, probe_args
from lightning_phases.callbacks.model_adapter import OutputSelector, Task, Unpack
from lightning_phases.callbacks.probe import Probe
from lightning_phases.functional._random import derived_seed, make_generator
from lightning_phases.functional.convergence import half_probe_effective_dimension
from lightning_phases.functional.ensemble import effective_dimension, noise_spectrum, order_parameters
from lightning_phases.functional.per_sample import GramMethod, LossFn, ParamSelection
from lightning_phases.report.tensorboard import add_figure, add_histogram, spectrum_figure, summary_writers

__all__ = ["OrderParameterMonitor"]


class OrderParameterMonitor(_ProbeMonitor):
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

    **The probe.** The probe set and the model adapter (collate, unpack,
    forward, output selection, dtype, task and loss) belong to a
    :class:`~lightning_phases.callbacks.Probe`. Without ``probe=`` the
    monitor builds its own from ``probe_size``, ``seed``, ``loss_fn``,
    ``params``, ``unpack``, ``forward``, ``output``, ``task``, ``chunk_size``
    and ``method``; pass one ``Probe`` to several monitors to share the probe
    set, the Gram matrix and the loss pass of each measured step.

    **Tasks.** The SPEC statistics are logged for every task (multi-class,
    binary, multi-label, regression); ``order/error`` only for
    classification (per-label for multi-label).

    **Lifecycle.** A monitor reused in a second ``trainer.fit`` starts fresh
    (a new probe set on the new data, the counters at zero) unless that fit
    resumes from a checkpoint.

    Cost per measurement: one batched forward and backward over the probe set
    plus ``O(n²(d_in + d_out))`` per Linear layer for the Gram matrix, and an
    ``O(n³)`` float64 symmetric eigendecomposition for the spectrum
    (``benchmarks/overhead.py`` measures it). Lower ``probe_size`` or raise
    the interval if that matters.

    Args:
        probe: A shared :class:`~lightning_phases.callbacks.Probe`; then the probe
            arguments below must stay at their defaults.
        prefix: Prefix of the logged keys (default ``"order"``): a second
            monitor, e.g. on other ``params``, logs under its own prefix.
        probe_size: Number ``n`` of probe samples (the served training samples if fewer).
        batch_size: Minibatch size ``B``; default the training DataLoader's
            batch size times the number of processes times
            ``accumulate_grad_batches`` (the samples behind one optimizer step).
        every_n_epochs: Fixed schedule: measure after every this many epochs.
        every_n_steps: Fixed schedule: measure every this many optimizer steps.
        overhead: Without a fixed schedule (the default), measure at the start
            and then as often as keeps the measurement time at most this
            fraction of the training time (default 0.1), at geometrically
            spaced steps so that measurements are densest early. Monitors
            that share a probe (``probe=``, or equal probe settings) share the
            budget and measure at the same steps.
        measure_at_start: Also measure before the first step.
        loss_fn: Per-sample loss ``(output_of_one_sample, target) -> scalar``;
            default the task's loss (cross-entropy, logistic, summed BCE, MSE).
        params: Probe only these parameters (names, module prefixes or a predicate).
        unpack: ``batch -> (inputs, targets)`` for a collated batch of dataset
            items; default the first two entries.
        forward: ``(pl_module, inputs) -> output`` instead of ``pl_module(inputs)``,
            e.g. ``lambda m, x: m.backbone(x)``.
        output: The logits in a tuple/dict output: int index, str key or callable.
        task: ``"auto"`` (inferred from the first probe batch), ``"multiclass"``,
            ``"binary"``, ``"multilabel"`` or ``"regression"``.
        seed: Seed of the probe set and of ``R``'s sampled minibatches (any non-negative int).
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
        - ``order/D_s_half``: ``D_s`` of a seeded random half of the probe set. ``D_s`` of an
          ``n``-sample probe is at most ``n − 1``; when ``D_s_half`` is close to ``D_s`` the spectrum
          is resolved, when it is about half of it the probe is too small for the spectrum.
        - ``order/loss``: mean probe loss.
        - ``order/error``: probe error rate against the given labels
          (classification only; the per-label error rate for multi-label).
        - ``order/measured_step``: global step of the latest measurement.
        - ``order/skipped``: number of skipped measurements (only after a failure).
        - ``order/overhead``: realised overhead, measurement time / training time so far
          (printed at the end of fitting too).
        - TensorBoard only: histogram ``order/spectrum`` of ``log10`` eigenvalues
          and, every ``figure_every_n`` measurements, the figure
          ``order/spectrum_figure`` (rank-ordered eigenvalues and normalised
          cumulative variance, as Feng & Tu's Figure 2).
    """

    default_prefix = keys.ORDER_PREFIX
    table = keys.ORDER

    def __init__(
        self,
        *,
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
        num_minibatches: int = 256,
        spectrum_fraction: float = 0.9,
        figure_every_n: int | None = 25,
    ) -> None:
        super().__init__(
            probe=probe,
            prefix=prefix,
            batch_size=batch_size,
            every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            overhead=overhead,
            measure_at_start=measure_at_start,
            num_minibatches=num_minibatches,
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
        check_real("spectrum_fraction", spectrum_fraction, minimum=0, maximum=1, open_minimum=True)
        check_int("figure_every_n", figure_every_n, minimum=1, allow_none=True)
        self.spectrum_fraction = float(spectrum_fraction)
        self.figure_every_n = figure_every_n

    @property
    def phase_metrics(self) -> tuple[str, ...]:
        """The keys this monitor puts into ``trainer.callback_metrics`` (a protocol other callbacks may read)."""
        return tuple(self.key(s) for s, k in self.table.items() if not k.tensorboard_only and s != "skipped")

    def _local_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        losses, errors = self.probe.losses(trainer, pl_module)
        stats = {
            "gram": self.probe.gram(trainer, pl_module),
            "losses": losses,  # identical on every rank (same weights): not reduced
        }
        if errors is not None:
            stats["errors"] = errors
        return stats

    def _empty_statistics(self, n: int, device: torch.device) -> dict[str, Tensor]:
        nan = torch.full((n,), math.nan, dtype=torch.float64, device=device)
        return {"gram": torch.full((n, n), math.nan, dtype=torch.float64, device=device), "losses": nan}

    def _metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: dict[str, Tensor]
    ) -> dict[str, float]:
        gram = stats["gram"]
        b = self.effective_batch_size
        if b is None:
            raise RuntimeError("the minibatch size is not known yet")
        gen = make_generator(derived_seed(self.seed, f"R_minibatches/{trainer.global_step}"))
        op = order_parameters(gram, b, num_minibatches=self.num_minibatches, generator=gen)
        # the whole spectrum where TensorBoard shows it; otherwise only its leading eigenvalues up to f·D
        whole = bool(summary_writers(trainer))
        spectrum = noise_spectrum(gram, b, fraction=None if whole else self.spectrum_fraction)
        self._spectrum = spectrum
        metrics = {self.key(k): v for k, v in op.as_dict().items()}
        metrics[self.key("D_s")] = float(effective_dimension(spectrum, self.spectrum_fraction, total=op.D))
        if gram.shape[0] >= 4:
            half = half_probe_effective_dimension(
                gram, self.spectrum_fraction, generator=derived_seed(self.seed, "D_s_half")
            )
            metrics[self.key("D_s_half")] = float(half)
        metrics[self.key("loss")] = float(stats["losses"].mean())
        if "errors" in stats:
            metrics[self.key("error")] = float(stats["errors"].mean())
        return metrics

    def _tensorboard(
        self, writers: list[Any], trainer: pl.Trainer, stats: dict[str, Tensor], metrics: dict[str, float]
    ) -> None:
        spectrum = self._spectrum
        positive = spectrum[spectrum > 0]
        if positive.numel():
            add_histogram(writers, self.key("spectrum"), positive.log10().cpu().numpy(), trainer.global_step)
        if self.figure_every_n is not None and (self.num_measurements % self.figure_every_n == 0):
            add_figure(
                writers,
                self.key("spectrum_figure"),
                spectrum_figure(spectrum.cpu(), step=trainer.global_step),
                trainer.global_step,
            )
