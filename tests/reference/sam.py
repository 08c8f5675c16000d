"""A slow, explicit SAM loop (Foret et al. 2021) to compare the optimizer against.

Gradients come from ``torch.autograd.grad`` on a functional copy of the
parameters; the perturbation, the restore and the momentum-SGD update are
written out by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def _grads(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> list[Tensor]:
    params = [p for p in model.parameters()]
    loss = loss_fn(model)
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def _clip(grads: list[Tensor], max_norm: float | None) -> list[Tensor]:
    if max_norm is None:
        return grads
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    factor = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * factor for g in grads]


def sam_reference_loop(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss: Callable[[Tensor, Tensor], Tensor],
    *,
    lr: float,
    rho: float,
    momentum: float = 0.0,
    adaptive: bool = False,
    clip_norm: float | None = None,
) -> None:
    """Train ``model`` in place with SAM over ``batches`` (one step each), momentum SGD as base."""
    params = list(model.parameters())
    bufs: list[Tensor | None] = [None] * len(params)
    for x, y in batches:

        def loss_fn(m: nn.Module) -> Tensor:
            return loss(m(x), y)  # noqa: B023 - called within this iteration

        g = _clip(_grads(model, loss_fn), clip_norm)
        scaled = [(p.detach().abs() * gi if adaptive else gi) for p, gi in zip(params, g)]
        norm = torch.sqrt(sum((s**2).sum() for s in scaled))
        old = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, scaled):
                p.add_(s * (p.abs() if adaptive else 1.0) * rho / (norm + 1e-12))
        g_adv = _clip(_grads(model, loss_fn), clip_norm)
        with torch.no_grad():
            for i, (p, o, gi) in enumerate(zip(params, old, g_adv)):
                p.copy_(o)
                if momentum:
                    bufs[i] = gi.clone() if bufs[i] is None else bufs[i] * momentum + gi
                    gi = bufs[i]
                p.sub_(lr * gi)
