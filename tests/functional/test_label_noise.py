"""Fresh label noise: rates within binomial tolerance, the right distributions, inputs untouched."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_phases.errors import LabelNoiseError
from lightning_phases.functional import add_target_noise, flip_labels


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("tau", [0.0, 0.1, 0.4, 1.0])
def test_flip_rate_and_other_class(tau):
    n, c = 20000, 5
    y = torch.arange(n) % c
    before = y.clone()
    out = flip_labels(y, tau, c, generator=_gen())
    assert torch.equal(y, before) and out.dtype == y.dtype and out is not y
    changed = (out != y).float().mean().item()
    assert abs(changed - tau) <= 5 * math.sqrt(tau * (1 - tau) / n) + 1e-12
    # "other": the new label is uniform over the C-1 other classes
    shift = ((out - y) % c)[out != y]
    if len(shift) > 1000:
        freq = torch.bincount(shift, minlength=c)[1:].float() / len(shift)
        assert (freq - 1 / (c - 1)).abs().max() < 5 * math.sqrt(1 / (c - 1) * (1 - 1 / (c - 1)) / len(shift))


def test_draw_from_all_changes_tau_times_c_minus_1_over_c():
    n, c, tau = 20000, 4, 0.6
    y = torch.zeros(n, dtype=torch.long)
    out = flip_labels(y, tau, c, generator=_gen(1), draw_from="all")
    p = tau * (c - 1) / c
    assert abs((out != y).float().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_regression_noise_has_sigma_and_keeps_input():
    y = torch.linspace(-1, 1, 20000)
    before = y.clone()
    out = add_target_noise(y, 0.3, generator=_gen())
    assert torch.equal(y, before)
    eps = out - y
    n = len(y)
    assert abs(eps.mean().item()) < 5 * 0.3 / math.sqrt(n)
    assert abs(eps.std().item() - 0.3) < 5 * 0.3 / math.sqrt(2 * n)


def test_same_generator_seed_same_noise_and_errors():
    y = torch.arange(100) % 3
    assert torch.equal(flip_labels(y, 0.5, 3, generator=_gen(3)), flip_labels(y, 0.5, 3, generator=_gen(3)))
    assert not torch.equal(flip_labels(y, 0.5, 3, generator=_gen(3)), flip_labels(y, 0.5, 3, generator=_gen(4)))
    with pytest.raises(LabelNoiseError, match="tau"):
        flip_labels(y, 1.5, 3, generator=_gen())
    with pytest.raises(LabelNoiseError, match="integer"):
        flip_labels(y.float(), 0.5, 3, generator=_gen())
    with pytest.raises(LabelNoiseError, match="float"):
        add_target_noise(y, 0.5, generator=_gen())
