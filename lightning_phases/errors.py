"""Exceptions and warnings raised by lightning_phases.

Every error the library raises on bad input is a :class:`LightningPhasesError`,
a :class:`ValueError` subclass, so ``except ValueError`` keeps working for
callers that do not know this package. Numerical degeneracies that can occur in
the middle of a healthy training run (a NaN gradient, a zero mean gradient,
constant losses) do not raise: the statistic comes back as NaN and one
:class:`PhaseStatisticsWarning` says why.

This module imports nothing from Lightning or torch, so it is safe everywhere.
"""

from __future__ import annotations

__all__ = [
    "LightningPhasesError",
    "ParameterSelectionError",
    "UnsupportedModelError",
    "ProbeMemoryError",
    "DegenerateInputError",
    "LabelNoiseError",
    "PhaseStatisticsWarning",
]


class LightningPhasesError(ValueError):
    """Base class of every error raised by lightning_phases on bad input."""


class ParameterSelectionError(LightningPhasesError):
    """A ``params`` selection matched no trainable parameter, or named one that does not exist."""


class UnsupportedModelError(LightningPhasesError):
    """No engine can compute per-sample gradients of the model; the message names the module and a fix.

    Raised for modules whose per-sample gradient is undefined (BatchNorm
    without running statistics) and for models that fail when run on a
    single sample.
    """


class ProbeMemoryError(UnsupportedModelError):
    """The per-sample-gradient computation ran out of memory; a smaller ``chunk_size`` or ``probe_size`` helps."""


class DegenerateInputError(LightningPhasesError):
    """The input cannot define the statistic (too few samples, an empty part, wrong shapes)."""


class LabelNoiseError(LightningPhasesError):
    """Bad arguments for a label-noise model or a noisy dataset."""


class PhaseStatisticsWarning(UserWarning):
    """A statistic was numerically undefined (NaN/inf input, zero norm) and is returned as NaN."""
