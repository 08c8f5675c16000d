"""Label-noise SGD for any LightningModule whose training batches carry their targets (SPEC.md §5)."""

from __future__ import annotations

import math
from collections.abc import MutableMapping, MutableSequence
from typing import Any

import torch
from torch import Tensor

from lightning_phases import _lightning as pl
from lightning_phases.errors import LabelNoiseError
from lightning_phases.functional.ensemble import derived_seed
from lightning_phases.functional.label_noise import DrawFrom, add_target_noise, flip_labels

__all__ = ["LabelNoise"]


class LabelNoise(pl.Callback):
    """Label-noise SGD as a callback: fresh noise on the targets of every training batch.

    Add it to the Trainer and keep your optimizer (plain SGD gives label-noise SGD,
    Zhang et al. 2025)::

        trainer = pl.Trainer(callbacks=[LabelNoise(tau=0.2, num_classes=10, seed=0)])

    In ``on_train_batch_start`` the targets entry of the batch (``batch[1]`` for the default
    ``(inputs, targets)`` layout) is *replaced* by a new noisy tensor; Lightning passes that
    same batch object to ``training_step``. Nothing is written into the batch's old tensor or
    the dataset, so the stored labels never change; validation and test batches are untouched.

    * Classification (``tau``): each label is replaced with probability ``τ`` by a uniformly
      random *other* class (``draw_from="all"``: any class, possibly the same one).
    * Regression (``sigma``): ``y + ε``, ``ε ~ N(0, σ²)`` per entry.

    Randomness: the noise of the ``k``-th training batch on rank ``r`` is drawn from a
    generator seeded with ``derived_seed(seed, f"label_noise/{r}/{k}")``. It is therefore
    drawn in the main process (independent of DataLoader workers), different on every DDP
    rank, and fully described by the batch counter ``k``, which is the whole
    ``state_dict``: rank 0's checkpoint resumes every rank exactly. The global RNG is not used.

    Args:
        tau: Replacement probability in ``[0, 1]`` (classification).
        sigma: Noise standard deviation, finite and ``>= 0`` (regression). Give exactly one of ``tau``, ``sigma``.
        num_classes: ``C >= 2`` for ``tau``; if ``None``, read from ``trainer.datamodule.num_classes``.
        draw_from: ``"other"`` (SPEC §5, default) or ``"all"``.
        seed: Seed of the noise stream, any non-negative int.
        target_key: Where the targets are in a batch: an index into a list batch (default ``1``)
            or a key of a dict batch.

    Raises:
        LabelNoiseError: For bad arguments, for a batch it cannot substitute the targets of
            (e.g. a tuple: collate to a list or dict), or for targets of the wrong dtype.
    """

    def __init__(
        self,
        *,
        tau: float | None = None,
        sigma: float | None = None,
        num_classes: int | None = None,
        draw_from: DrawFrom = "other",
        seed: int = 0,
        target_key: int | str = 1,
    ) -> None:
        if (tau is None) == (sigma is None):
            raise LabelNoiseError(
                f"Give exactly one of tau (classification) or sigma (regression); got tau={tau!r}, sigma={sigma!r}."
            )
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1):
            raise LabelNoiseError(
                f"tau is the probability of replacing a label: pass a float in [0, 1] such as 0.2; got {tau!r}."
            )
        if sigma is not None and (
            isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < math.inf
        ):
            raise LabelNoiseError(
                f"sigma is the standard deviation of the target noise: pass a finite float >= 0; got {sigma!r}."
            )
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise LabelNoiseError(f"num_classes must be an int >= 2 or None; got {num_classes!r}.")
        if draw_from not in ("other", "all"):
            raise LabelNoiseError(f"draw_from must be 'other' or 'all'; got {draw_from!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise LabelNoiseError(f"seed must be a non-negative int (any size works), such as 0; got {seed!r}.")
        if isinstance(target_key, bool) or not isinstance(target_key, (int, str)):
            raise LabelNoiseError(
                f"target_key is where the targets are in a batch: an int index or a str key; got {target_key!r}."
            )
        self.tau = None if tau is None else float(tau)
        self.sigma = None if sigma is None else float(sigma)
        self.num_classes, self.draw_from, self.seed, self.target_key = num_classes, draw_from, seed, target_key
        self.batches_seen = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tau=self.tau, sigma=self.sigma, seed=self.seed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.tau is not None and self.num_classes is None:
            found = getattr(getattr(trainer, "datamodule", None), "num_classes", None)
            if not isinstance(found, int) or found < 2:
                raise LabelNoiseError(
                    "LabelNoise(tau=...) needs the number of classes: pass num_classes=C, or use a datamodule "
                    f"with a `num_classes` attribute (found {found!r})."
                )
            self.num_classes = found

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._perturb(batch, trainer.global_rank)

    def generator(self, rank: int, batch_number: int) -> torch.Generator:
        """The CPU generator of the ``batch_number``-th training batch on ``rank``."""
        return torch.Generator().manual_seed(derived_seed(self.seed, f"label_noise/{rank}/{batch_number}"))

    def noisy(self, targets: Tensor, generator: torch.Generator) -> Tensor:
        """A new tensor of noisy ``targets`` (shape ``[B, ...]``) drawn from ``generator``."""
        if self.tau is not None:
            assert self.num_classes is not None
            return flip_labels(targets, self.tau, self.num_classes, generator=generator, draw_from=self.draw_from)
        assert self.sigma is not None
        return add_target_noise(targets, self.sigma, generator=generator)

    def _perturb(self, batch: Any, rank: int) -> None:
        key = self.target_key
        if (
            isinstance(batch, MutableSequence)
            and isinstance(key, int)
            and -len(batch) <= key < len(batch)
            or isinstance(batch, MutableMapping)
            and key in batch
        ):
            pass
        else:
            raise LabelNoiseError(
                f"LabelNoise cannot replace the targets (target_key={key!r}) of a {type(batch).__name__} batch: "
                "it needs a list batch (the default collate of (inputs, targets) items) or a dict with that key. "
                "Tuples cannot be changed in place; return a list from your collate_fn, or set target_key."
            )
        targets = batch[key]  # type: ignore[index]  # a list batch takes an int key, a dict any key (checked above)
        if not isinstance(targets, Tensor):
            raise LabelNoiseError(f"batch[{key!r}] must be a tensor of targets; got {type(targets).__name__}.")
        batch[key] = self.noisy(targets, self.generator(rank, self.batches_seen))  # type: ignore[index]
        self.batches_seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict.get("batches_seen", 0))
