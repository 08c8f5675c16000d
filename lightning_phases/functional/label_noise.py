"""Fresh label noise for one minibatch (SPEC.md §5, label-noise SGD; Zhang et al. 2025).

Pure torch: the callback :class:`lightning_phases.optim.LabelNoise` calls these on
every training batch. Both functions return a new tensor and never modify their input.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_phases.errors import LabelNoiseError

__all__ = ["flip_labels", "add_target_noise"]

DrawFrom = Literal["other", "all"]


def flip_labels(
    targets: Tensor,
    tau: float,
    num_classes: int,
    *,
    generator: torch.Generator,
    draw_from: DrawFrom = "other",
) -> Tensor:
    """Replace each label, independently with probability ``tau``, by a uniformly random class.

    With ``draw_from="other"`` (SPEC §5) the new label is uniform over the ``C − 1`` other
    classes, so exactly the replaced labels change; with ``"all"`` it is uniform over all
    ``C`` classes (a replaced label stays the same with probability ``1/C``).

    Args:
        targets: Integer class labels ``[B]`` (any shape) in ``0..C-1``, on any device.
        tau: Replacement probability in ``[0, 1]``.
        num_classes: ``C >= 2``.
        generator: CPU generator the noise is drawn from (the global RNG is not touched).
        draw_from: ``"other"`` or ``"all"``.

    Returns:
        A new tensor like ``targets`` with the noisy labels.
    """
    if not 0.0 <= tau <= 1.0:
        raise LabelNoiseError(f"tau must be in [0, 1]; got {tau!r}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise LabelNoiseError(f"num_classes must be an int >= 2; got {num_classes!r}.")
    if draw_from not in ("other", "all"):
        raise LabelNoiseError(f"draw_from must be 'other' or 'all'; got {draw_from!r}.")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise LabelNoiseError(f"flip_labels needs integer class labels; got dtype {targets.dtype}.")
    shape = targets.shape
    replace = torch.rand(shape, generator=generator) < tau
    if draw_from == "other":
        shift = torch.randint(1, num_classes, shape, generator=generator)
        new = (targets.cpu().long() + shift) % num_classes
    else:
        new = torch.randint(0, num_classes, shape, generator=generator)
    out = torch.where(replace, new, targets.cpu().long())
    return out.to(device=targets.device, dtype=targets.dtype)


def add_target_noise(targets: Tensor, sigma: float, *, generator: torch.Generator) -> Tensor:
    """Regression label noise ``y + ε``, ``ε ~ N(0, σ²)`` independently per entry.

    Args:
        targets: Float targets of any shape, on any device.
        sigma: Standard deviation ``σ >= 0``.
        generator: CPU generator the noise is drawn from.

    Returns:
        A new tensor ``targets + ε`` (same dtype and device).
    """
    if not sigma >= 0:
        raise LabelNoiseError(f"sigma must be >= 0; got {sigma!r}.")
    if not targets.is_floating_point():
        raise LabelNoiseError(f"add_target_noise needs float targets; got dtype {targets.dtype}.")
    eps = torch.randn(targets.shape, generator=generator, dtype=torch.float64) * sigma
    return targets + eps.to(device=targets.device, dtype=targets.dtype)
