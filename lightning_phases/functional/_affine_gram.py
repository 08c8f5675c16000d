"""Fast per-sample gradients of the affine parameters of normalisation layers.

``BatchNorm1d/2d/3d`` in eval mode (running statistics), ``LayerNorm`` and
``GroupNorm`` compute ``y = x̂ ⊙ γ + β`` with a normalised input ``x̂`` that
depends on sample ``i`` alone (running statistics in eval mode; the sample's
own statistics for LayerNorm and GroupNorm). With ``δ_i = ∂l_i/∂y_i`` the
per-sample gradients are elementwise sums over the positions that share a
parameter:

    ∂l_i/∂γ = Σ_positions δ_i ⊙ x̂_i,      ∂l_i/∂β = Σ_positions δ_i,

so they are materialised from the layer's recorded input and output gradient
(``O(n · numel(x_i))``) and multiplied (``O(n² · 2C)``), instead of going
through the ``vmap`` engine (a second, vectorised forward and backward of the
whole model). In a torchvision ``resnet18`` these are the 20 BatchNorm layers.

The hooks in :mod:`lightning_phases.functional.layer_gram` route these layers
through the same per-layer checks as Linear and Conv2d: the implied per-sample
gradients must sum to the autograd gradient of ``Σ_i l_i`` and, weighted by
fixed ``c_i``, to that of ``Σ_i c_i l_i`` (a layer whose rows are not one
sample each, or whose statistics couple samples, fails and goes back to the
exact engine). BatchNorm in training mode is never used here (the Gram is
taken in eval mode), nor BatchNorm without running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["affine_bias_check", "affine_per_sample", "affine_sample_major", "affine_weight_check", "supported_affine"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def supported_affine(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer whose affine parameters have the fast path."""
    if type(module) in _BATCH_NORMS:
        bn = module
        return bool(bn.affine and bn.track_running_stats and bn.running_mean is not None and not bn.training)  # type: ignore[union-attr]
    if type(module) is nn.LayerNorm:
        return bool(module.elementwise_affine)
    if type(module) is nn.GroupNorm:
        return bool(module.affine)
    return False


def _normalised(module: nn.Module, x: Tensor) -> Tensor:
    """``x̂``: the input normalised as the layer does, before its affine map (same shape as ``x``)."""
    if isinstance(module, _BATCH_NORMS):
        shape = [1, -1] + [1] * (x.ndim - 2)
        mean = module.running_mean.reshape(shape)  # type: ignore[union-attr]
        var = module.running_var.reshape(shape)  # type: ignore[union-attr]
        return (x - mean) * torch.rsqrt(var + module.eps)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    assert isinstance(module, nn.GroupNorm)
    return F.group_norm(x, module.num_groups, None, None, module.eps)


def _to_param_layout(module: nn.Module, t: Tensor) -> Tensor:
    """Sum a per-sample ``[n, *sample_shape]`` tensor over the positions sharing a parameter: ``[n, P]``."""
    n = t.shape[0]
    if isinstance(module, nn.LayerNorm):
        p = module.weight.numel()
        return t.reshape(n, -1, p).sum(1)
    # BatchNorm / GroupNorm: one parameter per channel (dim 1)
    return t.reshape(n, t.shape[1], -1).sum(2)


def affine_sample_major(module: nn.Module, inp: Tensor, out_shape: torch.Size, k: int) -> bool:
    """Whether input and output hold the chunk's ``k`` samples at dim 0, in the layout the layer expects."""
    if inp.shape != out_shape or inp.ndim < 2 or inp.shape[0] != k:
        return False
    if isinstance(module, nn.LayerNorm):
        tail = tuple(module.normalized_shape)
        return inp.ndim > len(tail) and tuple(inp.shape[inp.ndim - len(tail) :]) == tail
    if isinstance(module, nn.BatchNorm1d) and inp.ndim not in (2, 3):
        return False
    channels = module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
    return inp.shape[1] == channels


def affine_per_sample(module: nn.Module, inp: Tensor, out_grad: Tensor, weight: bool, bias: bool) -> Tensor:
    """Per-sample gradients ``[n, P_layer]`` of the selected affine parameters (weight then bias)."""
    parts = []
    if weight:
        parts.append(_to_param_layout(module, out_grad * _normalised(module, inp)))
    if bias:
        parts.append(_to_param_layout(module, out_grad))
    return torch.cat(parts, dim=1)


def _check(per_sample: Tensor, abs_terms: Tensor, ref: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    w = torch.ones(per_sample.shape[0], dtype=per_sample.dtype, device=per_sample.device) if c is None else c
    return w @ per_sample, ref.reshape(-1), w.abs() @ abs_terms


def affine_weight_check(
    module: nn.Module, inp: Tensor, out_grad: Tensor, weight_grad: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ_i c_i ∂l_i/∂γ, ∇γ, Σ_i |c_i| Σ_pos |δ_i x̂_i|)``, as ``layer_gram``'s weight check."""
    terms = out_grad * _normalised(module, inp)
    return _check(_to_param_layout(module, terms), _to_param_layout(module, terms.abs()), weight_grad, c)


def affine_bias_check(
    module: nn.Module, out_grad: Tensor, bias_grad: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ_i c_i ∂l_i/∂β, ∇β, Σ_i |c_i| Σ_pos |δ_i|)``, as ``layer_gram``'s bias check."""
    return _check(_to_param_layout(module, out_grad), _to_param_layout(module, out_grad.abs()), bias_grad, c)
