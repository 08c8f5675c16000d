"""TensorBoard Custom Scalars layout and figures for the phase metrics."""

from __future__ import annotations

import re
import weakref
from typing import Any

import torch
from torch import Tensor

from lightning_phases import keys

__all__ = ["PHASE_LAYOUT", "mixture_figure", "spectrum_figure", "write_phase_layout"]


def _tags(*names: tuple[str, str]) -> list[str]:
    """Regular expressions matching the registry keys ``(prefix, statistic)`` exactly (at the end of a tag)."""
    return [re.escape(keys.name(prefix, stat)) + "$" for prefix, stat in names]


_O, _S, _G = keys.ORDER_PREFIX, keys.SPLIT_PREFIX, keys.SEGMENT_PREFIX

# Related curves on one chart, as in Feng & Tu's figures. Tags are regular expressions.
PHASE_LAYOUT: dict[str, dict[str, list[Any]]] = {
    "Phases of learning": {
        "total activities (A, A_c, A_w)": ["Multiline", _tags((_O, "A"), (_S, "A_c"), (_S, "A_w"))],
        "directed activities (A0, A0_c, A0_w)": [
            "Multiline",
            _tags((_O, "A0"), (_S, "A0"), (_S, "A0_c"), (_S, "A0_w")),
        ],
        "alignments (R, R_cw, R_ac, R_aw)": [
            "Multiline",
            _tags((_O, "R"), (_S, "R_cw"), (_S, "R_ac"), (_S, "R_aw")),
        ],
        "sigma2_lambda": ["Multiline", _tags((_O, "sigma2_lambda"))],
        "noise (D, D_parallel, A_perp)": ["Multiline", _tags((_O, "D"), (_O, "D_parallel"), (_O, "A_perp"))],
        "segment losses (L_c, L_w)": ["Multiline", _tags((_S, "L_c"), (_S, "L_w"), (_O, "loss"))],
        "errors (clean, mislabeled, probe, validation, test)": [
            "Multiline",
            [*_tags((_S, "err_c"), (_S, "err_w"), (_O, "error")), r"(?i)val.*(err|acc)", r"(?i)test.*(err|acc)"],
        ],
        "segment gradients (ratio, cos)": ["Multiline", _tags((_G, "ratio"), (_G, "cos"))],
    }
}

_written: weakref.WeakSet[Any] = weakref.WeakSet()


def write_phase_layout(writer: Any) -> None:
    """Write :data:`PHASE_LAYOUT` once to a ``SummaryWriter`` (no-op for ``None``)."""
    if writer is None or writer in _written:
        return
    writer.add_custom_scalars(PHASE_LAYOUT)
    _written.add(writer)


def spectrum_figure(spectrum: Tensor, *, step: int | None = None):
    """Rank-ordered noise eigenvalues and the normalised cumulative variance (Feng & Tu, Figure 2).

    Drawn on ``log10`` axes with plain tick labels (no mathtext, at most 256
    points), so a figure costs a few tens of milliseconds.

    Args:
        spectrum: Eigenvalues of the noise covariance, descending, shape ``[m]``.
        step: Global step, for the title.

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    from matplotlib.figure import Figure

    e = spectrum.detach().to("cpu", torch.float64)
    e = e[e > 0]
    fig = Figure(figsize=(5.0, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if e.numel():
        rank = torch.arange(1, e.numel() + 1, dtype=torch.float64)
        cumulative = e.cumsum(0) / e.sum()
        # at most 256 points, evenly spaced in log(rank): what a log-log plot shows
        keep = torch.unique(
            torch.logspace(0, float(torch.log10(rank[-1])), 256, dtype=torch.float64).round().long() - 1
        )
        x = torch.log10(rank[keep]).numpy()
        ax.plot(x, torch.log10(e[keep]).numpy(), ".-", ms=3)
        inset = ax.inset_axes([0.55, 0.55, 0.4, 0.38])
        inset.plot(x, cumulative[keep].numpy())
        inset.set_ylim(0, 1.02)
        inset.set_title("cumulative / D", fontsize=8)
        inset.tick_params(labelsize=7)
    ax.set_xlabel("log10 rank l")
    ax.set_ylabel("log10 eigenvalue e_l")
    ax.set_title("noise spectrum" + (f" (step {step})" if step is not None else ""))
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.14, top=0.91)  # fixed margins: tight_layout is slow
    return fig


def mixture_figure(losses: Tensor, fit: Any, *, title: str = "per-sample losses"):
    """Histogram of losses with the two fitted weighted Gaussians and the threshold (Feng & Tu, Figure 6B).

    Args:
        losses: Per-sample losses ``[n]``.
        fit: A :class:`~lightning_phases.functional.LossMixture`.
        title: Axes title.

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    import math

    import numpy as np
    from matplotlib.figure import Figure

    x = losses.detach().to("cpu", torch.float64).numpy()
    fig = Figure(figsize=(5.0, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(x, bins=60, density=True, alpha=0.45, color="0.4", label="losses")
    if math.isfinite(fit.mean_clean) and fit.std_clean > 0 and fit.std_noisy > 0:
        grid = np.linspace(float(x.min()), float(x.max()), 400)

        def pdf(m: float, s: float) -> np.ndarray:
            return np.exp(-0.5 * ((grid - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

        ax.plot(
            grid, (1 - fit.weight_noisy) * pdf(fit.mean_clean, fit.std_clean), color="tab:blue", label="clean component"
        )
        ax.plot(
            grid, fit.weight_noisy * pdf(fit.mean_noisy, fit.std_noisy), color="tab:red", label="mislabeled component"
        )
        ax.axvline(fit.threshold, color="k", ls="--", lw=1, label=f"threshold {fit.threshold:.3g}")
    ax.set_xlabel("loss")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.91)  # fixed margins (tight_layout is slow)
    return fig
