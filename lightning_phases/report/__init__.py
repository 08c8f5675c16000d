"""TensorBoard layouts and figures of lightning_phases."""

from lightning_phases.report.tensorboard import PHASE_LAYOUT, mixture_figure, spectrum_figure, write_phase_layout

__all__ = ["PHASE_LAYOUT", "mixture_figure", "spectrum_figure", "write_phase_layout"]
