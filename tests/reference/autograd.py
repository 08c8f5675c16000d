"""Slow references for per-sample gradients: one ordinary autograd backward per sample."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def loop_per_sample_grads(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    names: list[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(J [n, P], losses [n])`` from a Python loop with ``loss.backward()`` per sample.

    Works on a deep copy in eval mode, so the caller's model is not touched.
    ``loss_fn`` gets the output of one sample (batch dim removed) and its target.
    """
    import copy

    clone = copy.deepcopy(model).eval()
    params = [(n, p) for n, p in clone.named_parameters() if p.requires_grad and (names is None or n in names)]
    rows, losses = [], []
    for i in range(inputs.shape[0]):
        for _, p in clone.named_parameters():
            p.grad = None
        out = clone(inputs[i : i + 1])[0]
        loss = loss_fn(out, targets[i])
        loss.backward()
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for _, p in params]))
        losses.append(loss.detach())
    return torch.stack(rows), torch.stack(losses)
