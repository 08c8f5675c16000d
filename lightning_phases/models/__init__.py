"""LightningModules of the papers' model setups."""

from lightning_phases.models.two_layer_linear import TwoLayerLinearNetwork

__all__ = ["TwoLayerLinearNetwork"]
