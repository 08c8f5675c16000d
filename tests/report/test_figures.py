"""The spectrum figure plots the eigenvalues it is given (log10 axes, bounded number of points)."""

from __future__ import annotations

import math

import torch

from lightning_phases.report.tensorboard import spectrum_figure


def test_spectrum_figure_plots_the_eigenvalues():
    e = torch.logspace(1, -6, 1000, dtype=torch.float64)
    fig = spectrum_figure(torch.cat([e, torch.zeros(3)]), step=7)  # zeros (null directions) are left out
    ax = fig.axes[0]
    x, y = ax.lines[0].get_data()
    assert 10 < len(x) <= 256
    assert x[0] == 0.0 and math.isclose(x[-1], math.log10(1000))
    for xi, yi in zip(x, y):
        rank = round(10**xi)
        assert math.isclose(yi, math.log10(float(e[rank - 1])), rel_tol=1e-9, abs_tol=1e-9)
    inset = ax.child_axes[0]
    cx, cy = inset.lines[0].get_data()
    assert math.isclose(cy[-1], 1.0) and all(b >= a for a, b in zip(cy, cy[1:]))
    assert math.isclose(cy[0], float(e[0] / e.sum()))
    assert "step 7" in ax.get_title()


def test_spectrum_figure_with_no_positive_eigenvalue():
    fig = spectrum_figure(torch.zeros(5))
    assert not fig.axes[0].lines
