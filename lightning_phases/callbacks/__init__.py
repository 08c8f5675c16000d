"""Lightning callbacks: thin adapters that schedule, probe, reduce across ranks, and log."""

from lightning_phases.callbacks.noise_split_tracker import NoiseSplitTracker
from lightning_phases.callbacks.order_parameter_monitor import OrderParameterMonitor

__all__ = ["OrderParameterMonitor", "NoiseSplitTracker"]
