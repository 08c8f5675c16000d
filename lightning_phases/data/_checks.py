"""Argument validators of the datamodules (private): one place, one message style.

Every check raises :class:`~lightning_phases.errors.LabelNoiseError` (a
:class:`~lightning_phases.errors.LightningPhasesError`) whose message names
the argument, echoes the value and says what to pass instead.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_phases.data.noise import NOISE_TYPES
from lightning_phases.errors import LabelNoiseError
from lightning_phases.functional.ensemble import derived_seed

__all__: list[str] = []

_TORCH_SEED_LIMIT = 2**64  # torch.Generator.manual_seed accepts [0, 2**64)


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]`` (bools and floats refused)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise LabelNoiseError(f"{name} must be an int >= {minimum}{upper}; got {name}={value!r}.")
    return int(value)


def check_seed(name: str, value: Any) -> int:
    """A seed: any non-negative int (bools, floats and negative numbers refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LabelNoiseError(f"{name} must be a non-negative int (any size); got {name}={value!r}.")
    return int(value)


def torch_seed(seed: int, purpose: str) -> int:
    """A seed ``torch.Generator.manual_seed`` accepts: ``seed`` itself below ``2**64``, else a hash of it.

    Seeds below ``2**64`` keep their streams (the labels they gave before);
    larger ones are mapped through :func:`~lightning_phases.functional.ensemble.derived_seed`.
    """
    return seed if seed < _TORCH_SEED_LIMIT else derived_seed(seed, purpose)


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
    strict_maximum: bool = False,
) -> float:
    """``value`` as a finite float within the bounds (bools, strings and NaN/inf refused)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if strict_maximum else value <= maximum
    if not ok:
        lo = "" if minimum is None else ("(" if strict_minimum else "[") + f"{minimum:g}"
        hi = "" if maximum is None else f"{maximum:g}" + (")" if strict_maximum else "]")
        where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (lo or hi) else ""
        raise LabelNoiseError(f"{name} must be a finite number{where}; got {name}={value!r}.")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """A flag: ``True`` or ``False`` only (a string such as ``"no"`` would otherwise count as true)."""
    if not isinstance(value, bool):
        raise LabelNoiseError(f"{name} must be True or False; got {name}={value!r} ({type(value).__name__}).")
    return value


def check_noise(noise_type: Any, noise_rate: Any) -> tuple[Any, float]:
    """The noise model (a name in ``NOISE_TYPES`` or a square tensor) and a rate in ``[0, 1)``."""
    if isinstance(noise_type, Tensor):
        if noise_type.ndim != 2 or noise_type.shape[0] != noise_type.shape[1]:
            raise LabelNoiseError(
                f"noise_type as a transition matrix must be C×C; got shape {tuple(noise_type.shape)}."
            )
    elif not isinstance(noise_type, str) or noise_type not in NOISE_TYPES:
        raise LabelNoiseError(
            f"unknown noise_type {noise_type!r}; use one of {NOISE_TYPES} or a C×C transition matrix."
        )
    rate = check_real("noise_rate", noise_rate, minimum=0.0, maximum=1.0, strict_maximum=True)
    return noise_type, rate


def check_val_size(value: Any) -> float | int:
    """``val_size``: a fraction in ``[0, 1)`` or a count ``>= 0`` (its upper bound is checked in setup)."""
    if isinstance(value, float):
        return check_real("val_size", value, minimum=0.0, maximum=1.0, strict_maximum=True)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LabelNoiseError(
            f"val_size must be a fraction in [0, 1) (float) or a sample count >= 0 (int); got val_size={value!r}."
        )
    return int(value)


def num_val(val_size: float | int, n: int) -> int:
    """The validation count for ``n`` samples; refuses a split that leaves fewer than 2 training samples."""
    count = int(round(val_size * n)) if isinstance(val_size, float) else int(val_size)
    if n - count < 2:
        raise LabelNoiseError(
            f"val_size={val_size!r} takes {count} of the {n} samples for validation and leaves {n - count} for "
            f"training; pass a smaller val_size (a count <= {n - 2} or a fraction such as 0.1)."
        )
    return count


def check_eval_batch_size(value: Any, batch_size: int, default_minimum: int = 256) -> int:
    """``eval_batch_size``: an int ``>= 1``, or ``None`` for ``max(batch_size, 256)``."""
    if value is None:
        return max(batch_size, default_minimum)
    return check_int("eval_batch_size", value, 1)


def check_classes(classes: Sequence[int] | None, num_classes: int) -> list[int] | None:
    """``classes``: ``None`` or at least 2 distinct labels in ``[0, num_classes)`` (ints, NumPy or tensor ints)."""
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise LabelNoiseError(f"classes must be a sequence of class labels; got classes={classes!r}.")
    try:
        out = [operator.index(c) for c in classes if not isinstance(c, bool)]
    except TypeError:
        out = None
    if out is None or len(out) != len(list(classes)):
        raise LabelNoiseError(f"classes must hold int labels; got classes={classes!r}.")
    if len(out) < 2 or len(set(out)) != len(out) or min(out) < 0 or max(out) >= num_classes:
        raise LabelNoiseError(f"classes must be >= 2 distinct labels in [0, {num_classes - 1}]; got classes={out!r}.")
    return out


def generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator seeded with :func:`torch_seed` (never the global random state)."""
    return torch.Generator().manual_seed(torch_seed(seed, purpose))
