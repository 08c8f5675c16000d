"""Is the probe large enough for the noise spectrum? ``D_s`` from a random half of the probe set.

An ``n``-sample probe resolves at most ``n − 1`` noise directions, so its
effective dimension ``D_s`` (SPEC.md §1) is capped at ``n − 1``. Recomputing
``D_s`` on a seeded random half of the probe (``m = ⌊n/2⌋`` samples, cap
``m − 1``), from the rows and columns of the same Gram matrix (no new
gradients), tells the two regimes apart:

* **resolved**: the spectrum's mass lies in fewer directions than the probe
  can see; the half-probe value is close to the full one.
* **probe-limited**: ``D_s`` grows with the probe (it sits near ``f·(n − 1)``
  and the half-probe value near ``f·(m − 1)``, about half of it): ``D_s`` is
  then a lower bound set by the probe size, not a property of the model.

Pure torch; never imports Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_phases.errors import DegenerateInputError
from lightning_phases.functional.ensemble import effective_dimension, make_generator, noise_spectrum

__all__ = ["half_probe_indices", "half_probe_effective_dimension"]


def half_probe_indices(n: int, generator: torch.Generator | int | None = None) -> Tensor:
    """A seeded random half of ``n`` probe samples: ``⌊n/2⌋`` distinct indices, ascending (long ``[⌊n/2⌋]``).

    Args:
        n: Probe size, ``>= 4`` (so that the half has at least 2 samples).
        generator: A CPU ``torch.Generator``, an int seed, or ``None`` (seed 0);
            the global random state is never used.

    Raises:
        DegenerateInputError: ``n`` is not an int ``>= 4``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 4:
        raise DegenerateInputError(f"the probe needs n >= 4 samples for a half-probe estimate; got n={n!r}.")
    gen = make_generator(generator)
    return torch.randperm(n, generator=gen)[: n // 2].sort().values


def half_probe_effective_dimension(
    gram: Tensor, fraction: float = 0.9, generator: torch.Generator | int | None = None
) -> int:
    """``D_s(f)`` of a seeded random half of the probe set, from the sub-Gram matrix.

    The half is :func:`half_probe_indices` ``(n, generator)``; its spectrum is
    that of ``gram[idx][:, idx]`` (:func:`~lightning_phases.functional.ensemble.noise_spectrum`).
    ``D_s`` does not depend on the minibatch factor ``c_B`` (a positive scale
    of the spectrum), so no batch size is needed. Compare with ``D_s`` of the
    full probe: close values mean the spectrum is resolved; a half-probe value
    near ``f·(⌊n/2⌋ − 1)``, about half the full one, means the probe is too
    small (see the module docstring).

    Args:
        gram: Per-sample-gradient Gram matrix of the full probe, shape ``[n, n]``, ``n >= 4``.
        fraction: ``f`` in ``(0, 1]``.
        generator: Chooses the half: a CPU ``torch.Generator``, an int seed, or ``None`` (seed 0).

    Returns:
        ``D_s(f)`` of the half, at most ``⌊n/2⌋ − 1``.

    Raises:
        DegenerateInputError: ``gram`` not square, ``n < 4``, ``fraction`` outside ``(0, 1]``,
            or a non-finite Gram matrix (its spectrum would be NaN).
    """
    g = torch.as_tensor(gram)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise DegenerateInputError(f"gram must be a square [n, n] matrix; got shape {tuple(g.shape)}.")
    idx = half_probe_indices(int(g.shape[0]), generator).to(g.device)
    sub = g.index_select(0, idx).index_select(1, idx)
    if not bool(torch.isfinite(sub).all()):
        raise DegenerateInputError("the Gram matrix of the half probe contains NaN or inf; D_s is undefined.")
    return effective_dimension(noise_spectrum(sub, 1), fraction)
