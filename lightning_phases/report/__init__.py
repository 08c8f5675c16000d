"""TensorBoard layouts, figures and the run report of lightning_phases."""

from lightning_phases.report.summary import RunData, make_report, read_run
from lightning_phases.report.tensorboard import PHASE_LAYOUT, mixture_figure, spectrum_figure, write_phase_layout

__all__ = [
    "PHASE_LAYOUT",
    "mixture_figure",
    "spectrum_figure",
    "write_phase_layout",
    "RunData",
    "make_report",
    "read_run",
]
