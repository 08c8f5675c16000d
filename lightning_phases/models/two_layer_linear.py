"""The two-layer linear network of the label-noise SGD paper (Zhang et al. 2025) as a LightningModule."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_phases import _lightning as pl
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional.two_layer import neuron_statistics
from lightning_phases.optim.sam import SAM

__all__ = ["TwoLayerLinearNetwork"]


class TwoLayerLinearNetwork(pl.LightningModule):
    """``f(x) = Σ_i a_i w_iᵀx`` with ``m`` neurons, both layers trained, squared loss ``½(f(x) − y)²``.

    Initialisation (seeded, global RNG untouched): ``w_i ~ N(0, init_scale² I_d / d)`` (so
    ``‖w_i‖ ≈ init_scale``, the lazy regime for large ``init_scale``) and ``a_i ~ N(0, 1/m)``.
    Trained with plain SGD (``optimizer="sgd"``) or :class:`~lightning_phases.optim.SAM`; add
    :class:`~lightning_phases.optim.LabelNoise` ``(sigma=...)`` to the Trainer for label-noise SGD.

    ``θ*`` is ``theta_star`` or, if ``None``, ``trainer.datamodule.theta_star`` (as
    :class:`~lightning_phases.data.SparseLinearRegressionDataModule` provides), read at fit start.

    Logged metrics:
        ``train_loss``: minibatch loss (on the targets the step saw, noisy or not).
        ``two_layer/mean_norm``, ``two_layer/mean_alignment``, ``two_layer/mean_abs_cosine``,
        ``two_layer/distance``: :func:`~lightning_phases.functional.neuron_statistics` of the weights
        at the start of the training steps the Trainer writes to its loggers (every
        ``log_every_n_steps``; computed and logged only then).
        ``val_loss`` / ``test_loss``: loss on the validation / test split (clean for the datamodule,
        so ``val_loss`` tracks the test loss during training).

    Args:
        dim: Input dimension ``d``.
        width: Number of neurons ``m``.
        init_scale: Norm scale of the first-layer neurons at initialisation.
        lr: Learning rate.
        optimizer: ``"sgd"`` (no momentum, no weight decay, as in the paper) or ``"sam"``.
        rho: SAM's radius (``optimizer="sam"`` only).
        seed: Seed of the initialisation.
        theta_star: Ground truth ``[d]``; default from the datamodule.
    """

    def __init__(
        self,
        dim: int = 10,
        width: int = 20,
        init_scale: float = 1.0,
        lr: float = 0.1,
        optimizer: Literal["sgd", "sam"] = "sgd",
        rho: float = 0.05,
        seed: int = 0,
        theta_star: Tensor | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LightningPhasesError(f"{name} must be an int >= 1; got {value!r}.")
        if not init_scale > 0 or not lr > 0:
            raise LightningPhasesError(f"init_scale and lr must be > 0; got {init_scale!r}, {lr!r}.")
        if optimizer not in ("sgd", "sam"):
            raise LightningPhasesError(f"optimizer must be 'sgd' or 'sam'; got {optimizer!r}.")
        if theta_star is not None and tuple(theta_star.shape) != (dim,):
            raise LightningPhasesError(f"theta_star must have shape ({dim},); got {tuple(theta_star.shape)}.")
        self.save_hyperparameters(ignore=["theta_star"])
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(init_scale * torch.randn(width, dim, generator=gen) / math.sqrt(dim))
        self.output_weight = nn.Parameter(torch.randn(width, generator=gen) / math.sqrt(width))
        self.theta_star: Tensor | None
        self.register_buffer("theta_star", None if theta_star is None else theta_star.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        """``f(x)`` for inputs ``[B, d]``: ``[B]``."""
        return x @ (self.output_weight @ self.weight)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """``mean ½(f(x) − y)²`` over the batch."""
        return 0.5 * (self(x) - y).pow(2).mean()

    def on_fit_start(self) -> None:
        if self.theta_star is None:
            found = getattr(getattr(self.trainer, "datamodule", None), "theta_star", None)
            if not isinstance(found, Tensor) or tuple(found.shape) != (self.hparams.dim,):
                raise LightningPhasesError(
                    "TwoLayerLinearNetwork needs θ*: pass theta_star= or train with a datamodule that has a "
                    f"`theta_star` of shape ({self.hparams.dim},) (SparseLinearRegressionDataModule); found {found!r}."
                )
            self.theta_star = found.detach().float().to(self.device).clone()

    def statistics(self) -> dict[str, float]:
        """The SPEC §5 neuron statistics of the current weights."""
        if self.theta_star is None:
            raise LightningPhasesError("theta_star is not known yet; pass theta_star= or call after fit start.")
        return neuron_statistics(self.weight, self.theta_star, self.output_weight).as_dict()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        # only at the steps the Trainer writes to its loggers (``log_every_n_steps``), as Lightning's own
        # LearningRateMonitor does: a ``self.log`` call costs about as much as this small network's step
        connector = getattr(self.trainer, "_logger_connector", None)
        if getattr(connector, "should_update_logs", True):
            for name, value in self.statistics().items():
                self.log(f"two_layer/{name}", value, on_step=True, on_epoch=False)
        loss = self.loss(x, y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(*batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.loss(*batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "sam":
            return SAM(self.parameters(), torch.optim.SGD, rho=self.hparams.rho, lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
