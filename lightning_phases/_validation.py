"""Argument validation shared by the package's classes (private).

Every check raises :class:`~lightning_phases.errors.LightningPhasesError` (a
``ValueError``) whose message names the argument, echoes the value and says
what is accepted. Never ``assert`` on user input.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_phases.errors import LightningPhasesError

__all__ = ["check_bool", "check_choice", "check_int", "check_real", "check_seed"]


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, allow_none: bool = False
) -> None:
    """``value`` must be an int (not a bool) in ``[minimum, maximum]``, or ``None`` when ``allow_none``."""
    if value is None and allow_none:
        return
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    wanted = "an int" + (" " + " and ".join(bounds) if bounds else "") + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise LightningPhasesError(f"{name} must be {wanted}; got {value!r}.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise LightningPhasesError(f"{name} must be {wanted}; got {value!r}.")


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
    open_maximum: bool = False,
    allow_none: bool = False,
) -> None:
    """``value`` must be a finite int or float (not a bool) in the given (closed or open) range."""
    if value is None and allow_none:
        return
    lo = "" if minimum is None else ("(" if open_minimum else "[") + f"{minimum}"
    hi = "" if maximum is None else f"{maximum}" + (")" if open_maximum else "]")
    where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (minimum is not None or maximum is not None) else ""
    wanted = f"a finite number{where}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LightningPhasesError(f"{name} must be {wanted}; got {value!r}.")
    if minimum is not None and (value <= minimum if open_minimum else value < minimum):
        raise LightningPhasesError(f"{name} must be {wanted}; got {value!r}.")
    if maximum is not None and (value >= maximum if open_maximum else value > maximum):
        raise LightningPhasesError(f"{name} must be {wanted}; got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """``value`` must be ``True`` or ``False`` (strings such as ``"no"`` are refused, not read as true)."""
    if not isinstance(value, bool):
        raise LightningPhasesError(f"{name} must be True or False; got {value!r}.")


def check_seed(name: str, value: Any) -> None:
    """``value`` must be a non-negative int; any size works (internal seeds are derived from it)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LightningPhasesError(f"{name} must be a non-negative int; got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """``value`` must be one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise LightningPhasesError(f"{name} must be one of {choices}; got {value!r}.")
