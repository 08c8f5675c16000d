"""Slow references for SPEC.md §1-§3: enumerate the whole minibatch ensemble explicitly.

Every function takes the per-sample gradient matrix ``J`` ([n, P], float64) and
computes the statistic straight from its definition, looping over all
C(n, B) minibatches; no closed form is used.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor


def minibatch_gradients(jac: Tensor, batch_size: int) -> Tensor:
    """``g^μ`` for every subset μ of ``batch_size`` distinct rows: ``[C(n,B), P]``."""
    n = jac.shape[0]
    return torch.stack([jac[list(mu)].mean(0) for mu in itertools.combinations(range(n), batch_size)])


def enumerate_order_parameters(jac: Tensor, batch_size: int) -> dict[str, float]:
    """Every SPEC §1 field by enumeration (``R`` exact over ordered pairs of distinct minibatches)."""
    gmu = minibatch_gradients(jac, batch_size)
    g = gmu.mean(0)  # the ensemble mean equals mean_i g_i
    a0 = float(g @ g)
    a = float((gmu * gmu).sum(1).mean())
    dev = gmu - g
    cov = dev.T @ dev / gmu.shape[0]
    d = float(torch.trace(cov))
    lam = gmu @ g / a0
    sigma2 = float(((lam - lam.mean()) ** 2).mean())
    a_par = float((lam**2).mean()) * a0
    perp = gmu - lam[:, None] * g[None, :]
    a_perp = float((perp * perp).sum(1).mean())
    unit = gmu / gmu.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    m = cos.shape[0]
    r = float((cos.sum() - cos.diagonal().sum()) / (m * (m - 1)))
    return {
        "A": a,
        "A0": a0,
        "A_parallel": a_par,
        "A_perp": a_perp,
        "D": d,
        "D_parallel": sigma2 * a0,
        "R": r,
        "sigma2_lambda": sigma2,
        "mean_lambda": float(lam.mean()),
    }


def explicit_noise_covariance(jac: Tensor, batch_size: int) -> Tensor:
    """The P×P covariance ``C`` of the minibatch gradients, by enumeration."""
    gmu = minibatch_gradients(jac, batch_size)
    dev = gmu - gmu.mean(0)
    return dev.T @ dev / gmu.shape[0]


def enumerate_split(jac: Tensor, noisy: Tensor, batch_size: int) -> dict[str, float]:
    """SPEC §2 fields from explicit clean/mislabeled minibatch enumeration."""
    n = jac.shape[0]
    n_w = int(noisy.sum())
    rho = n_w / n
    b_c = max(1, round((1 - rho) * batch_size))
    b_w = max(1, round(rho * batch_size))
    jc, jw = jac[~noisy], jac[noisy]
    gc, gw = jc.mean(0), jw.mean(0)
    a_c = float((minibatch_gradients(jc, b_c) ** 2).sum(1).mean())
    a_w = float((minibatch_gradients(jw, b_w) ** 2).sum(1).mean())
    g = (1 - rho) * gc + rho * gw

    def cos(u: Tensor, v: Tensor) -> float:
        return float(u @ v / (u.norm() * v.norm()))

    return {
        "rho": rho,
        "A_c": a_c,
        "A_w": a_w,
        "A0_c": (1 - rho) ** 2 * float(gc @ gc),
        "A0_w": rho**2 * float(gw @ gw),
        "A0": float(g @ g),
        "R_cw": cos(gc, gw),
        "R_ac": cos(g, gc),
        "R_aw": cos(g, gw),
    }


def effective_dimension_loop(eigenvalues: list[float], fraction: float) -> int:
    """Smallest k with e_1 + ... + e_k >= fraction * sum, by a plain loop."""
    e = sorted(eigenvalues, reverse=True)
    total = sum(e)
    acc = 0.0
    for k, value in enumerate(e, start=1):
        acc += value
        if acc >= fraction * total - 1e-12 * abs(total):
            return k
    return len(e)


def mann_whitney_auroc(scores: list[float], positive: list[bool]) -> float:
    """AUROC as the probability that a positive outranks a negative (ties count 1/2)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg)) if pos and neg else math.nan
