"""TensorBoard layouts, figures and the run report of lightning_phases."""

from lightning_phases.report.summary import RunData, draw_report, find_runs, make_report, read_run, run_name
from lightning_phases.report.tensorboard import (
    PHASE_LAYOUT,
    add_figure,
    add_histogram,
    add_text,
    chart_regex,
    mixture_figure,
    spectrum_figure,
    summary_writers,
    write_phase_layout,
)

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
    "RunData",
    "draw_report",
    "find_runs",
    "make_report",
    "read_run",
    "run_name",
]
