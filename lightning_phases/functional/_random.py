"""Explicit randomness: generators from seeds and independent seeds derived per purpose.

Nothing here touches the global random state. Any non-negative int is a valid
user seed; the derived seeds are bounded (``< 2**60``, or ``< 2**32`` for
libraries such as scikit-learn that need a 32-bit ``random_state``).
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["make_generator", "derived_seed", "derived_seed32"]


def make_generator(generator: torch.Generator | int | None, default_seed: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` from a generator, a seed, or ``None`` (``default_seed``).

    Never touches the global random state.
    """
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = default_seed
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None; got {generator!r}.")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(generator)
    return gen


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for one ``purpose`` derived from a user seed, so that streams drawn for
    different purposes (the noise, the probe set, the data split) are independent even
    when the user passes the same seed everywhere. Deterministic on every process
    (SHA-256, not Python's randomised ``hash``); any int ``seed`` works and the result
    is in ``[0, 2**60)``.
    """
    digest = hashlib.sha256(f"lightning_phases:{purpose}:{int(seed)}".encode()).hexdigest()
    return int(digest[:15], 16)


def derived_seed32(seed: int, purpose: str) -> int:
    """:func:`derived_seed` folded into ``[0, 2**32)`` (a ``random_state`` for NumPy and scikit-learn)."""
    return derived_seed(seed, purpose) % (2**32)
