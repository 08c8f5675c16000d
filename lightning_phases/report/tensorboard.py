"""TensorBoard Custom Scalars layout and figures for the phase metrics."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_phases import keys

__all__ = [
    "PHASE_LAYOUT",
    "add_figure",
    "add_histogram",
    "add_text",
    "chart_regex",
    "mixture_figure",
    "spectrum_figure",
    "summary_writers",
    "write_phase_layout",
]

# Related curves on one chart, as in Feng & Tu's figures. Tags are regular expressions: TensorBoard joins
# a chart's patterns with "|" into ONE regular expression and applies it with ``re.match`` (anchored at
# the start of the tag), so no pattern may carry inline global flags such as ``(?i)`` (they are only
# valid at the start of the whole expression); case variants are spelled out with character classes.


def _tag(key: str) -> str:
    """A pattern matching the registry key ``key`` exactly (at the end of a tag)."""
    return re.escape(key) + "$"


PHASE_LAYOUT: dict[str, dict[str, list[Any]]] = {
    "Phases of learning": {
        "total activities (A, A_c, A_w)": [
            "Multiline",
            [_tag(keys.order("A")), _tag(keys.split("A_c")), _tag(keys.split("A_w"))],
        ],
        "directed activities (A0, A0_c, A0_w)": [
            "Multiline",
            [_tag(keys.order("A0")), _tag(keys.split("A0")), _tag(keys.split("A0_c")), _tag(keys.split("A0_w"))],
        ],
        "alignments (R, R_cw, R_ac, R_aw)": [
            "Multiline",
            [_tag(keys.order("R")), _tag(keys.split("R_cw")), _tag(keys.split("R_ac")), _tag(keys.split("R_aw"))],
        ],
        "sigma2_lambda": ["Multiline", [_tag(keys.order("sigma2_lambda"))]],
        "noise (D, D_parallel, A_perp)": [
            "Multiline",
            [_tag(keys.order("D")), _tag(keys.order("D_parallel")), _tag(keys.order("A_perp"))],
        ],
        "segment losses (L_c, L_w)": [
            "Multiline",
            [_tag(keys.split("L_c")), _tag(keys.split("L_w")), _tag(keys.order("loss"))],
        ],
        "errors (clean, mislabeled, probe, validation, test)": [
            "Multiline",
            [
                _tag(keys.split("err_c")),
                _tag(keys.split("err_w")),
                _tag(keys.order("error")),
                r"[vV]al.*([eE]rr|[aA]cc)",
                r"[tT]est.*([eE]rr|[aA]cc)",
            ],
        ],
        "segment gradients (ratio, cos)": ["Multiline", [_tag(keys.segment("ratio")), _tag(keys.segment("cos"))]],
    }
}

#: Attribute set on a ``SummaryWriter`` once the layout is written to it (state on the writer, not in the module).
_LAYOUT_WRITTEN = "_lightning_phases_layout_written"


def chart_regex(patterns: Sequence[str]) -> str:
    """The one regular expression TensorBoard's Custom Scalars plugin builds from a chart's tag patterns.

    The dashboard joins the patterns of a chart with ``"|"`` and the server
    compiles the result with Python's ``re`` and keeps the tags it
    ``match``-es; a chart whose joined expression does not compile shows
    nothing ("regex_valid: false").
    """
    return "|".join(patterns)


def summary_writers(target: Any) -> list[Any]:
    """The SummaryWriters that ``target`` stands for.

    Args:
        target: A ``Trainer`` (every TensorBoard logger of either Lightning
            namespace, on global rank 0 only; none elsewhere), one
            ``SummaryWriter``, a list of them, or ``None`` (none).

    Returns:
        A list of writers, possibly empty.
    """
    if target is None:
        return []
    if hasattr(target, "add_scalar"):  # one SummaryWriter
        return [target]
    if isinstance(target, (list, tuple)):
        return [w for w in target if w is not None]
    from lightning_phases._lightning import tensorboard_writers

    return tensorboard_writers(target)


def write_phase_layout(target: Any) -> None:
    """Write :data:`PHASE_LAYOUT` once to every writer of ``target`` (see :func:`summary_writers`).

    Whether a writer has the layout is recorded on the writer object itself,
    so every TensorBoard logger of a Trainer gets it exactly once, however
    many callbacks call this.
    """
    for writer in summary_writers(target):
        if getattr(writer, _LAYOUT_WRITTEN, False):
            continue
        writer.add_custom_scalars(PHASE_LAYOUT)
        setattr(writer, _LAYOUT_WRITTEN, True)


def add_histogram(target: Any, tag: str, values: Any, step: int) -> None:
    """``add_histogram(tag, values, step)`` on every writer of ``target`` (see :func:`summary_writers`)."""
    for writer in summary_writers(target):
        writer.add_histogram(tag, values, step)


def add_text(target: Any, tag: str, text: str, step: int) -> None:
    """``add_text(tag, text, step)`` on every writer of ``target`` (see :func:`summary_writers`)."""
    for writer in summary_writers(target):
        writer.add_text(tag, text, step)


def add_figure(target: Any, tag: str, figure: Any, step: int) -> None:
    """A matplotlib figure as an image on every writer of ``target`` (see :func:`summary_writers`).

    The figure is rendered once (Agg) and the same pixels go to every writer;
    the figure is not closed or modified otherwise.
    """
    writers = summary_writers(target)
    if not writers:
        return
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()  # [H, W, 3] uint8
    for writer in writers:
        writer.add_image(tag, image, step, dataformats="HWC")


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
        inset = ax.inset_axes((0.55, 0.55, 0.4, 0.38))
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
