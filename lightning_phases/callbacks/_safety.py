"""The warn-once-and-skip net of the deciding callbacks (GMMCleanser, PhaseDetector).

Private. A piece of work that fails is counted in ``<prefix>/skipped``, warned
about once per kind of work (rank zero), and training goes on; a failure flag
is reduced across ranks before anything is decided, so that ranks never hang
or decide differently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from lightning_phases import _lightning as pl
from lightning_phases._lightning import rank_zero_warn

__all__ = ["SafetyNet"]


class SafetyNet:
    """Mixin: ``_skip``, ``_attempt`` and ``_any_rank``; the class sets ``_net_name`` and ``_skipped_key``.

    The instance keeps ``skipped`` (count) and ``_failed`` (kinds already warned about) and publishes with
    ``_publish(trainer, metrics)``.
    """

    _net_name: str = ""
    _skipped_key: str = ""
    skipped: int
    _failed: set[str]

    def _publish(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def _skip(self, trainer: pl.Trainer, what: str, error: BaseException | str, epoch: int | None = None) -> None:
        """Count a failed piece of work in the skipped key, warn once per kind (rank zero); training goes on."""
        self.skipped += 1
        if what not in self._failed:
            self._failed.add(what)
            why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            when = "" if epoch is None else f" at epoch {epoch}"
            rank_zero_warn(
                f"{self._net_name}: {what}{when} failed and was skipped ({why}); training goes on. Further "
                f"failures are counted in {self._skipped_key} without another warning."
            )
        with contextlib.suppress(Exception):
            self._publish(trainer, {self._skipped_key: float(self.skipped)})

    def _attempt(self, trainer: pl.Trainer, what: str, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)``; on an exception skip it (see :meth:`_skip`). Returns whether it failed."""
        try:
            fn(*args)
        except Exception as error:
            self._skip(trainer, what, error)
            return True
        return False

    @staticmethod
    def _any_rank(trainer: pl.Trainer, pl_module: pl.LightningModule, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a collective under DDP: every rank calls it at the same point)."""
        if trainer.world_size <= 1:
            return flag
        total = trainer.strategy.reduce(
            torch.tensor(float(flag), dtype=torch.float64, device=pl_module.device), reduce_op="sum"
        )
        return bool(float(total) > 0)
