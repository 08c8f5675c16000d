"""Neuron statistics of a two-layer linear network ``f(x) = Σ_i a_i w_iᵀx`` (SPEC.md §5; Zhang et al. 2025)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lightning_phases.errors import DegenerateInputError

__all__ = ["NeuronStatistics", "neuron_statistics"]


@dataclass(frozen=True)
class NeuronStatistics:
    """Phase-I/Phase-II statistics of the first-layer neurons.

    Attributes:
        mean_norm: ``mean_i ‖w_i‖`` (falls in Phase I, leaving the lazy regime).
        mean_alignment: ``mean_i ⟨w_i, θ*⟩ / ‖θ*‖`` (signed, as the paper plots it).
        mean_abs_cosine: ``mean_i |cos(w_i, θ*)|`` (sign-free; rises in Phase II).
        distance: ``‖β − θ*‖`` with the end-to-end predictor ``β = Σ_i a_i w_i`` (NaN without ``a``).
    """

    mean_norm: float
    mean_alignment: float
    mean_abs_cosine: float
    distance: float

    def as_dict(self) -> dict[str, float]:
        """The fields as ``{name: value}``."""
        return asdict(self)


def neuron_statistics(weight: Tensor, theta_star: Tensor, output_weight: Tensor | None = None) -> NeuronStatistics:
    """Mean neuron norm, mean alignment and mean absolute cosine with ``θ*`` (SPEC §5).

    Args:
        weight: First-layer weights ``W`` ``[m, d]``, row ``i`` is neuron ``w_i``.
        theta_star: Ground truth ``θ*`` ``[d]`` (non-zero).
        output_weight: Second-layer weights ``a`` ``[m]``, for ``distance`` (optional).

    Returns:
        :class:`NeuronStatistics` computed in float64. A zero neuron has cosine 0.

    Raises:
        DegenerateInputError: For mismatched shapes or ``θ* = 0``.
    """
    if weight.ndim != 2 or theta_star.ndim != 1 or weight.shape[1] != theta_star.shape[0]:
        raise DegenerateInputError(
            f"weight must be [m, d] and theta_star [d]; got {tuple(weight.shape)} and {tuple(theta_star.shape)}."
        )
    if output_weight is not None and output_weight.reshape(-1).shape[0] != weight.shape[0]:
        raise DegenerateInputError(
            f"output_weight must have m={weight.shape[0]} entries; got {tuple(output_weight.shape)}."
        )
    w = weight.detach().double()
    theta = theta_star.detach().to(w.device).double()
    theta_norm = theta.norm()
    if theta_norm == 0:
        raise DegenerateInputError("theta_star is zero: the alignment with it is undefined.")
    norms = w.norm(dim=1)
    proj = w @ theta / theta_norm
    cos = torch.where(norms > 0, proj.abs() / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(norms))
    distance = float("nan")
    if output_weight is not None:
        beta = (output_weight.detach().double().reshape(-1, 1).to(w.device) * w).sum(0)
        distance = float((beta - theta).norm())
    return NeuronStatistics(float(norms.mean()), float(proj.mean()), float(cos.mean()), distance)
