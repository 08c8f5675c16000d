"""neuron_statistics against per-neuron Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_phases.errors import DegenerateInputError
from lightning_phases.functional import neuron_statistics


def test_matches_loops_over_neurons():
    gen = torch.Generator().manual_seed(0)
    w, theta, a = torch.randn(7, 5, generator=gen), torch.randn(5, generator=gen), torch.randn(7, generator=gen)
    w[3] = 0.0
    stats = neuron_statistics(w, theta, a)
    rows = [[float(v) for v in row] for row in w]
    t = [float(v) for v in theta]
    tn = math.sqrt(sum(v * v for v in t))
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    dots = [sum(u * v for u, v in zip(r, t)) for r in rows]
    assert stats.mean_norm == pytest.approx(sum(norms) / 7, rel=1e-6)
    assert stats.mean_alignment == pytest.approx(sum(d / tn for d in dots) / 7, rel=1e-6)
    cos = [abs(d) / (n * tn) if n > 0 else 0.0 for d, n in zip(dots, norms)]
    assert stats.mean_abs_cosine == pytest.approx(sum(cos) / 7, rel=1e-6)
    beta = [sum(float(a[i]) * rows[i][j] for i in range(7)) for j in range(5)]
    assert stats.distance == pytest.approx(math.sqrt(sum((b - v) ** 2 for b, v in zip(beta, t))), rel=1e-6)
    assert math.isnan(neuron_statistics(w, theta).distance)


def test_errors():
    with pytest.raises(DegenerateInputError, match="shape|\\[m, d\\]"):
        neuron_statistics(torch.zeros(3, 4), torch.ones(5))
    with pytest.raises(DegenerateInputError, match="zero"):
        neuron_statistics(torch.ones(3, 4), torch.zeros(4))
