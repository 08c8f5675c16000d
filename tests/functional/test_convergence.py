"""D_s on half of the probe: against an explicit P×P covariance of the chosen half, and the two regimes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_phases.errors import DegenerateInputError
from lightning_phases.functional.convergence import half_probe_effective_dimension, half_probe_indices
from lightning_phases.functional.ensemble import effective_dimension, noise_spectrum


def _explicit_d_s(grads: np.ndarray, fraction: float) -> int:
    """Smallest k whose top-k eigenvalues of Σ = mean (g_i − ḡ)(g_i − ḡ)ᵀ (P×P, formed) reach f·trace Σ."""
    centred = grads - grads.mean(0, keepdims=True)
    sigma = centred.T @ centred / len(grads)
    e = np.sort(np.clip(np.linalg.eigvalsh(sigma), 0, None))[::-1]
    cum = np.cumsum(e)
    return int(np.searchsorted(cum, fraction * cum[-1] * (1 - 1e-12)) + 1)


def test_indices_are_a_seeded_half():
    idx = half_probe_indices(11, 3)
    assert idx.dtype == torch.long and idx.numel() == 5 and len(set(idx.tolist())) == 5
    assert torch.equal(idx, idx.sort().values) and int(idx.min()) >= 0 and int(idx.max()) < 11
    assert torch.equal(idx, half_probe_indices(11, torch.Generator().manual_seed(3)))
    draws = {tuple(half_probe_indices(40, s).tolist()) for s in range(5)}
    assert len(draws) == 5  # the seed chooses the half
    state = torch.random.get_rng_state()
    half_probe_indices(40, None)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])  # f = 1 counts round-off eigenvalues
@pytest.mark.parametrize("rank", [3, 60])
def test_matches_the_explicit_covariance_of_the_sliced_half(fraction, rank):
    rng = np.random.default_rng(rank)
    n, p = 48, 70
    grads = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, p)) * np.linspace(1, 3, p)
    gram = torch.from_numpy(grads @ grads.T)
    idx = half_probe_indices(n, 7).numpy()
    expected = _explicit_d_s(grads[idx], fraction)
    got = half_probe_effective_dimension(gram, fraction, generator=7)
    assert got == expected
    sliced = gram[idx][:, idx]  # the same through the package's own spectrum of the explicitly sliced Gram
    assert got == effective_dimension(noise_spectrum(sliced, 4), fraction)
    assert got <= n // 2 - 1


def test_resolved_and_probe_limited_regimes():
    rng = np.random.default_rng(0)
    n = 64
    low_rank = rng.standard_normal((n, 4)) @ rng.standard_normal((4, 500))  # 4 noise directions
    g_low = torch.from_numpy(low_rank @ low_rank.T)
    full_low = effective_dimension(noise_spectrum(g_low, 8))
    assert full_low <= 4 and half_probe_effective_dimension(g_low, generator=1) == full_low  # resolved
    iso = rng.standard_normal((n, 5000))  # far more directions than the probe sees
    g_iso = torch.from_numpy(iso @ iso.T)
    full_iso = effective_dimension(noise_spectrum(g_iso, 8))
    half_iso = half_probe_effective_dimension(g_iso, generator=1)
    assert full_iso >= 0.8 * (n - 1) and half_iso <= n // 2 - 1  # both pinned near their ceilings
    assert 0.4 < half_iso / full_iso < 0.6  # D_s halves with the probe: probe-limited


def test_refusals():
    with pytest.raises(DegenerateInputError, match="square"):
        half_probe_effective_dimension(torch.eye(4)[:3])
    with pytest.raises(DegenerateInputError, match="n >= 4"):
        half_probe_effective_dimension(torch.eye(3))
    with pytest.raises(DegenerateInputError, match="fraction"):
        half_probe_effective_dimension(torch.eye(6), fraction=0.0)
    bad = torch.eye(6, dtype=torch.float64)
    bad[:, :] = float("nan")
    with pytest.raises(DegenerateInputError, match="NaN"):
        half_probe_effective_dimension(bad)
