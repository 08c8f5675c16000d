"""Label-noise models (SPEC.md §6): pure functions of the clean labels and an explicit seed.

* ``symmetric``: exactly ``round(ρ·N)`` samples, chosen uniformly, get a label
  drawn uniformly from the **other** ``C − 1`` classes (never their own).
* ``uniform``: exactly ``round(ρ·N)`` samples get a label drawn uniformly from
  all ``C`` classes; those that land on their true class are not mislabeled,
  so the realised rate is about ``ρ(C − 1)/C``.
* ``pairflip``: a fixed class map ``k → map[k]``; exactly ``round(ρ·N_k)``
  samples of each mapped class ``k`` are flipped (``N_k`` its count).
* A ``C×C`` transition matrix ``T`` (rows sum to 1): each sample's label is
  drawn from row ``T[y]`` (the rate argument is not used).

Every function takes a seed or a ``torch.Generator`` and never touches the
global random state, so the same seed gives the same labels on every process
and every run. ``round`` is Python's built-in (round half to even).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Union

import torch
from torch import Tensor

from lightning_phases.errors import LabelNoiseError

__all__ = [
    "NOISE_TYPES",
    "CIFAR10_PAIRFLIP",
    "MNIST_PAIRFLIP",
    "NoiseName",
    "NoiseSpec",
    "symmetric_noise",
    "uniform_noise",
    "pairflip_noise",
    "transition_noise",
    "apply_label_noise",
]

NOISE_TYPES = ("symmetric", "uniform", "pairflip")

#: CIFAR-10's standard asymmetric map: truck→automobile, bird→airplane, deer→horse, cat↔dog.
CIFAR10_PAIRFLIP: dict[int, int] = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
#: MNIST's standard asymmetric map: 2→7, 3→8, 5↔6, 7→1.
MNIST_PAIRFLIP: dict[int, int] = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}

NoiseName = Literal["symmetric", "uniform", "pairflip"]
"""The named noise models."""

NoiseSpec = Union[NoiseName, Tensor]  # noqa: UP007 - a runtime alias
"""A noise name (``"symmetric"``, ``"uniform"``, ``"pairflip"``) or a ``C×C`` transition matrix."""


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise LabelNoiseError(f"seed must be a non-negative int or a torch.Generator; got seed={seed!r}.")
    if seed >= 2**64:  # beyond torch's range: any non-negative int is a valid seed
        from lightning_phases.functional.ensemble import derived_seed

        seed = derived_seed(seed, "label_noise")
    return torch.Generator().manual_seed(seed)


def _check(targets: Tensor, rate: float, num_classes: int) -> Tensor:
    y = torch.as_tensor(targets)
    if y.ndim != 1:
        raise LabelNoiseError(f"targets must be a 1-D tensor of class indices; got shape {tuple(y.shape)}.")
    y = y.long().cpu()
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise LabelNoiseError(f"num_classes must be an int >= 2; got {num_classes!r}.")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise LabelNoiseError(
            f"targets must lie in [0, {num_classes - 1}]; got values in [{int(y.min())}, {int(y.max())}]."
        )
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise LabelNoiseError(f"noise rate must be in [0, 1); got {rate!r}. A rate of 1 would leave no clean sample.")
    return y


def symmetric_noise(targets: Tensor, rate: float, num_classes: int, *, seed: int | torch.Generator = 0) -> Tensor:
    """Flip exactly ``round(rate·N)`` labels to a uniformly random *other* class.

    Args:
        targets: Clean labels ``[N]``.
        rate: Noise rate ``ρ`` in ``[0, 1)``.
        num_classes: ``C >= 2``.
        seed: Seed or generator.

    Returns:
        Noisy labels ``[N]`` (long); exactly ``round(ρN)`` differ from ``targets``.
    """
    y = _check(targets, rate, num_classes)
    gen = _generator(seed)
    noisy = y.clone()
    k = round(rate * y.numel())
    idx = torch.randperm(y.numel(), generator=gen)[:k]
    offset = torch.randint(1, num_classes, (k,), generator=gen)
    noisy[idx] = (y[idx] + offset) % num_classes
    return noisy


def uniform_noise(targets: Tensor, rate: float, num_classes: int, *, seed: int | torch.Generator = 0) -> Tensor:
    """Resample exactly ``round(rate·N)`` labels uniformly over all ``C`` classes (may keep the true class)."""
    y = _check(targets, rate, num_classes)
    gen = _generator(seed)
    noisy = y.clone()
    k = round(rate * y.numel())
    idx = torch.randperm(y.numel(), generator=gen)[:k]
    noisy[idx] = torch.randint(0, num_classes, (k,), generator=gen)
    return noisy


def _check_map(class_map: Mapping[int, int], num_classes: int) -> dict[int, int]:
    if not isinstance(class_map, Mapping) or not class_map:
        raise LabelNoiseError(f"class_map must be a non-empty {{source: target}} mapping; got {class_map!r}.")
    out = {}
    for src, dst in class_map.items():
        for name, c in (("source", src), ("target", dst)):
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                raise LabelNoiseError(f"class_map {name} class {c!r} does not exist: classes are 0..{num_classes - 1}.")
        if src == dst:
            raise LabelNoiseError(f"class_map maps class {src} to itself; a flip must change the label.")
        out[int(src)] = int(dst)
    return out


def pairflip_noise(
    targets: Tensor, rate: float, num_classes: int, class_map: Mapping[int, int], *, seed: int | torch.Generator = 0
) -> Tensor:
    """Flip exactly ``round(rate·N_k)`` samples of each mapped class ``k`` to ``class_map[k]``."""
    y = _check(targets, rate, num_classes)
    mapping = _check_map(class_map, num_classes)
    gen = _generator(seed)
    noisy = y.clone()
    for src in sorted(mapping):
        members = torch.nonzero(y == src).flatten()
        k = round(rate * members.numel())
        chosen = members[torch.randperm(members.numel(), generator=gen)[:k]]
        noisy[chosen] = mapping[src]
    return noisy


def transition_noise(targets: Tensor, matrix: Tensor, *, seed: int | torch.Generator = 0) -> Tensor:
    """Draw each sample's label from row ``matrix[y]`` of a ``C×C`` transition matrix.

    Raises:
        LabelNoiseError: the matrix is not square, has negative entries, or a row does not sum to 1.
    """
    t = torch.as_tensor(matrix, dtype=torch.float64)
    if t.ndim != 2 or t.shape[0] != t.shape[1] or t.shape[0] < 2:
        raise LabelNoiseError(f"the transition matrix must be C×C with C >= 2; got shape {tuple(t.shape)}.")
    if bool((t < 0).any()):
        raise LabelNoiseError("the transition matrix has negative entries; rows must be probability vectors.")
    sums = t.sum(1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
        bad = int(torch.nonzero((sums - 1).abs() > 1e-6)[0])
        raise LabelNoiseError(f"row {bad} of the transition matrix sums to {float(sums[bad]):.6g}, not 1.")
    y = _check(targets, 0.0, t.shape[0])
    gen = _generator(seed)
    return torch.multinomial(t[y], 1, generator=gen).flatten()


def apply_label_noise(
    targets: Tensor,
    noise: NoiseSpec,
    rate: float,
    num_classes: int,
    *,
    seed: int | torch.Generator = 0,
    class_map: Mapping[int, int] | None = None,
) -> Tensor:
    """Dispatch to a noise model by name (or apply a transition matrix).

    Args:
        targets: Clean labels ``[N]``.
        noise: ``"symmetric"``, ``"uniform"``, ``"pairflip"``, or a ``C×C`` matrix.
        rate: Noise rate in ``[0, 1)`` (ignored for a matrix).
        num_classes: ``C``.
        seed: Seed or generator.
        class_map: The map of ``"pairflip"``.

    Raises:
        LabelNoiseError: unknown noise name, ``pairflip`` without a map, bad rate or matrix.
    """
    if isinstance(noise, Tensor):
        if noise.shape != (num_classes, num_classes):
            raise LabelNoiseError(
                f"the transition matrix must be {num_classes}×{num_classes}; got {tuple(noise.shape)}."
            )
        return transition_noise(targets, noise, seed=seed)
    if noise == "symmetric":
        return symmetric_noise(targets, rate, num_classes, seed=seed)
    if noise == "uniform":
        return uniform_noise(targets, rate, num_classes, seed=seed)
    if noise == "pairflip":
        if class_map is None:
            raise LabelNoiseError("noise 'pairflip' needs a class_map, e.g. CIFAR10_PAIRFLIP or MNIST_PAIRFLIP.")
        return pairflip_noise(targets, rate, num_classes, class_map, seed=seed)
    raise LabelNoiseError(f"unknown noise {noise!r}; use one of {NOISE_TYPES} or a C×C transition matrix.")
