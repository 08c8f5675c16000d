"""Slow, independent reference for the zoo: one ``torch.autograd.grad`` per sample.

Nothing from ``lightning_phases`` is used here. For every sample ``i`` the
probe inputs (a tensor, or a tuple/list/dict of tensors with the sample
dimension at 0) are sliced to ``[i : i + 1]``, the model is run in eval mode
on a deep copy (through ``forward(model, inputs)`` when given, else
``model(inputs)``), ``loss_fn`` gets the output of that one sample (batch dim
removed) and its target, and ``torch.autograd.grad`` gives ``g_i``. The
per-sample gradient matrix ``J`` (rows ``g_i``, parameters in
``named_parameters()`` order) and ``G = J Jᵀ`` are returned in float64.

``compute_dtype=torch.float64`` runs the loop on a float64 copy of the model
and inputs (bf16 or float32 weights widen exactly), giving the exact value the
low-precision computation approximates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _slice(inputs: Any, i: int) -> Any:
    if isinstance(inputs, Tensor):
        return inputs[i : i + 1]
    if isinstance(inputs, dict):
        return {k: _slice(v, i) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_slice(v, i) for v in inputs)
    raise TypeError(f"unsupported probe input of type {type(inputs).__name__}")


def _cast(inputs: Any, dtype: torch.dtype) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _cast(v, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_cast(v, dtype) for v in inputs)
    return inputs


def _num_samples(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    return _num_samples(values[0])


def reference_jacobian(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(J [n, P], losses [n])`` in float64 from a loop over single samples.

    Args:
        model: The model (left untouched: a deep copy is put in eval mode).
        inputs: Probe inputs, a tensor or a tuple/list/dict of tensors ``[n, ...]``.
        targets: Probe targets ``[n, ...]``.
        loss_fn: ``(output of one sample, its target) -> scalar``.
        forward: ``forward(model, inputs) -> output [n, ...]``; default ``model(inputs)``.
        compute_dtype: Run in this dtype (model, float inputs and float targets
            cast); default the model's own dtype.
    """
    clone = copy.deepcopy(model).eval()
    if compute_dtype is not None:
        clone = clone.to(compute_dtype)
        inputs = _cast(inputs, compute_dtype)
        targets = _cast(targets, compute_dtype)
    params = [p for p in clone.parameters() if p.requires_grad]
    run = forward if forward is not None else (lambda m, x: m(x))
    rows, losses = [], []
    for i in range(_num_samples(inputs)):
        out = run(clone, _slice(inputs, i))[0]
        loss = loss_fn(out, targets[i])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        )
        losses.append(loss.detach())
    return torch.stack(rows).to(torch.float64), torch.stack(losses).to(torch.float64)


def reference_gram(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(G = J Jᵀ [n, n], losses [n])`` in float64; arguments as for :func:`reference_jacobian`."""
    jac, losses = reference_jacobian(model, inputs, targets, loss_fn, forward=forward, compute_dtype=compute_dtype)
    return jac @ jac.T, losses
