"""Slow references for per-sample gradients: one ordinary autograd backward per sample.

Independent of the package on purpose: a plain Python loop over single samples
with ``torch.autograd.grad``, on a deep copy of the model in eval mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _one_sample(inputs: Any, i: int) -> Any:
    """Sample ``i`` of ``inputs`` (kept as a batch of one): every tensor sliced ``[i : i + 1]``, recursively."""
    if isinstance(inputs, Tensor):
        return inputs[i : i + 1]
    if isinstance(inputs, dict):
        return {k: _one_sample(v, i) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_one_sample(v, i) for v in inputs)
    return inputs


def _count(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    values = inputs.values() if isinstance(inputs, dict) else inputs
    return next(_count(v) for v in values if isinstance(v, (Tensor, dict, tuple, list)))


def _call(model: nn.Module, inputs: Any) -> Tensor:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def loop_per_sample_grads(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    names: list[str] | None = None,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(J [n, P], losses [n])`` from a Python loop with ``torch.autograd.grad`` per sample.

    Works on a deep copy in eval mode, so the caller's model is not touched.
    ``inputs`` is a tensor or a (nested) tuple/list/dict of tensors with the
    sample dim at 0; ``forward(model, one_sample_inputs)`` (default: ``model(x)``,
    ``model(*x)`` or ``model(**x)``) gets a batch of one. ``loss_fn`` gets the
    output of one sample (batch dim removed) and its target.
    """
    clone = copy.deepcopy(model).eval()
    run = forward if forward is not None else _call
    params = [p for n, p in clone.named_parameters() if p.requires_grad and (names is None or n in names)]
    rows, losses = [], []
    for i in range(_count(inputs)):
        out = run(clone, _one_sample(inputs, i))[0]
        loss = loss_fn(out, targets[i])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        )
        losses.append(loss.detach())
    return torch.stack(rows), torch.stack(losses)


def loop_gram(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    names: list[str] | None = None,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(G [n, n] float64, losses [n])``: the Gram matrix of :func:`loop_per_sample_grads`."""
    jac, losses = loop_per_sample_grads(model, inputs, targets, loss_fn, names, forward)
    jac = jac.double()
    return jac @ jac.T, losses
