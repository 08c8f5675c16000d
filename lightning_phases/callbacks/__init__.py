"""Lightning callbacks: thin adapters that schedule, probe, reduce across ranks, and log."""

from lightning_phases.callbacks.gmm_cleanser import GMMCleanser
from lightning_phases.callbacks.model_adapter import ModelAdapter
from lightning_phases.callbacks.noise_split_tracker import NoiseSplitTracker
from lightning_phases.callbacks.order_parameter_monitor import OrderParameterMonitor
from lightning_phases.callbacks.phase_detector import PhaseDetector
from lightning_phases.callbacks.probe import Probe

__all__ = ["OrderParameterMonitor", "NoiseSplitTracker", "PhaseDetector", "GMMCleanser", "Probe", "ModelAdapter"]
