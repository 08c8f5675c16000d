"""Optimizers and training-time noise: SAM and label-noise SGD (SPEC.md §5)."""

from lightning_phases.optim.label_noise import LabelNoise
from lightning_phases.optim.sam import SAM

__all__ = ["SAM", "LabelNoise"]
