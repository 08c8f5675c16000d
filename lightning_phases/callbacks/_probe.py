"""Compatibility shim (private): the names other modules imported from here before the Probe existed.

The probe machinery now lives in :mod:`lightning_phases.callbacks.probe`,
:mod:`lightning_phases.callbacks.model_adapter` and
:mod:`lightning_phases.callbacks._monitor`; validation in
:mod:`lightning_phases._validation`. ``gmm_cleanser.py`` still imports these
names; delete this module once it imports from the new places.
"""

from __future__ import annotations

from typing import Any

from lightning_phases._validation import check_int, check_real
from lightning_phases.callbacks._monitor import should_measure
from lightning_phases.callbacks.model_adapter import Unpack, default_unpack
from lightning_phases.callbacks.probe import partition_parameters

__all__ = ["Unpack", "default_unpack", "partition_parameters", "should_measure"]


def _check_positive_int(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    check_int(name, value, minimum=minimum, allow_none=allow_none)


def _check_real(name: str, value: Any) -> None:
    check_real(name, value)
