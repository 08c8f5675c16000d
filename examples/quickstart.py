"""Quickstart: order parameters of an MLP on the bundled digits data, before and after training.

Runs offline in a few seconds on a CPU::

    python examples/quickstart.py

It draws a probe set from scikit-learn's bundled 8x8 handwritten digits,
computes the per-sample-gradient Gram matrix with ``torch.func`` and prints
the order parameters of SPEC.md §1 (Feng & Tu 2021) for a freshly initialised
MLP and for the same MLP after a few epochs of SGD: the fast-learning phase
has a large activity ``A`` and clearly positive alignment ``R``; training moves
towards the exploration phase (smaller ``A``, ``R`` near 0, larger ``sigma2_lambda``).
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_phases.functional import (
    effective_dimension,
    gradient_gram,
    noise_spectrum,
    order_parameters,
)


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float inputs scaled to [0, 1] and integer labels, shuffled with ``seed``."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm], y[perm]


def report(tag: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    """Print the order parameters, the effective dimension and the probe loss."""
    gram, losses = gradient_gram(model, x, y)
    op = order_parameters(gram, batch_size, generator=0)
    spectrum = noise_spectrum(gram, batch_size)
    with torch.no_grad():
        err = (model(x).argmax(1) != y).float().mean().item()
    print(f"\n{tag}: probe loss {losses.mean():.4f}, probe error {err:.3f}")
    for name, value in op.as_dict().items():
        print(f"  {name:<14s} {value: .6g}")
    print(f"  {'D_s(0.9)':<14s} {effective_dimension(spectrum, 0.9)} of {spectrum.numel()} directions")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--probe-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x, y = load_data(args.seed)
    probe_x, probe_y = x[: args.probe_size], y[: args.probe_size]
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    print(
        f"MLP with {sum(p.numel() for p in model.parameters())} parameters, "
        f"probe set n={len(probe_y)}, minibatch B={args.batch_size}"
    )
    report("At initialisation", model, probe_x, probe_y, args.batch_size)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(y), generator=gen).split(args.batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    report(f"After {args.epochs} epochs of SGD", model, probe_x, probe_y, args.batch_size)


if __name__ == "__main__":
    main()
