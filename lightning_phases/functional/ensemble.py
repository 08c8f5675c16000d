"""Order parameters of the minibatch-gradient ensemble (SPEC.md §1; Feng & Tu 2021, section 2).

Everything here is a pure function of the n×n per-sample-gradient Gram matrix
``G_ij = g_i · g_j`` of a probe set (see
:func:`lightning_phases.functional.gradient_gram`). The *minibatch ensemble*
is every subset of ``B`` distinct probe samples, each equally likely; its
gradient is ``g^μ = (1/B) Σ_{i∈μ} g_i``. With ``g = mean_i g_i``,
``S = mean_i ‖g_i − g‖²`` and ``c_B = (n − B) / (B (n − 1))`` (sampling without
replacement) the ensemble averages have closed forms:

* ``A0 = ‖g‖²``, ``D = Tr C = c_B · S``, ``A = ⟨‖g^μ‖²⟩ = A0 + D``;
* ``λ_μ = g^μ·g/‖g‖²``, ``sigma2_lambda = Var(λ_μ) = c_B · mean_i((g_i − g)·g)² / ‖g‖⁴``;
* ``A_parallel = (1 + sigma2_lambda)·A0``, ``A_perp = A − A_parallel``,
  ``D_parallel = sigma2_lambda·A0``;
* ``R = ⟨ĝ^μ·ĝ^ν⟩`` over distinct minibatches has no closed form and is
  estimated from sampled minibatches.

All arithmetic is done in float64. Structural problems (``n < 2``,
``B > n``, a non-square Gram matrix) raise :class:`DegenerateInputError`;
numerical ones (NaN/inf entries, a zero mean gradient) give NaN fields and one
:class:`PhaseStatisticsWarning`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_phases.errors import DegenerateInputError, PhaseStatisticsWarning
from lightning_phases.functional._random import derived_seed, make_generator  # re-exported (data/ imports them here)
from lightning_phases.functional._threads import torch_threads

__all__ = [
    "OrderParameters",
    "order_parameters",
    "noise_spectrum",
    "effective_dimension",
    "minibatch_variance_factor",
    "make_generator",
    "derived_seed",
]


@dataclass(frozen=True)
class OrderParameters:
    """Order parameters of the minibatch-gradient ensemble (SPEC.md §1).

    Attributes:
        A: Total activity ``⟨‖g^μ‖²⟩``.
        A0: Directed activity ``‖g‖²``.
        A_parallel: ``⟨λ_μ²⟩‖g‖² = (1 + sigma2_lambda)·A0``.
        A_perp: ``⟨‖g^μ − λ_μ g‖²⟩ = A − A_parallel``.
        D: Total noise ``Tr C = A − A0``.
        D_parallel: Noise along ``g``: ``sigma2_lambda·A0``.
        R: Mean cosine between distinct minibatch gradients (Monte-Carlo).
        sigma2_lambda: Variance of the projection ``λ_μ = g^μ·g/‖g‖²``.
    """

    A: float
    A0: float
    A_parallel: float
    A_perp: float
    D: float
    D_parallel: float
    R: float
    sigma2_lambda: float

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain ``{name: value}`` dict (names as in SPEC.md)."""
        return asdict(self)


def minibatch_variance_factor(n: int, batch_size: int) -> float:
    """``c_B = (n − B) / (B (n − 1))``: variance of a without-replacement mean of ``B`` of ``n`` items.

    ``Var(mean over a minibatch) = c_B · (population variance)``; zero when ``B = n``.
    """
    if n < 2:
        return 0.0
    return (n - batch_size) / (batch_size * (n - 1))


def _check_batch_size(batch_size: int, n: int, what: str = "probe set") -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise DegenerateInputError(f"batch_size must be an int; got {batch_size!r}.")
    if batch_size < 1:
        raise DegenerateInputError(f"batch_size must be >= 1; got {batch_size}.")
    if batch_size > n:
        raise DegenerateInputError(
            f"batch_size={batch_size} is larger than the {what} (n={n}): a minibatch of distinct "
            "samples cannot be drawn. Use a larger probe set or a smaller batch_size."
        )


def _as_gram(gram: Tensor) -> Tensor:
    """Validate a Gram matrix and return it as float64 (on CPU if the device lacks float64)."""
    if not isinstance(gram, Tensor):
        raise DegenerateInputError(f"gram must be a torch.Tensor; got {type(gram).__name__}.")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise DegenerateInputError(f"gram must be a square [n, n] matrix; got shape {tuple(gram.shape)}.")
    n = gram.shape[0]
    if n < 2:
        raise DegenerateInputError(f"The probe set has n={n} sample(s); ensemble statistics need at least 2.")
    if gram.device.type == "mps":
        gram = gram.cpu()
    return gram.to(torch.float64)


def _all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite, from one float64 sum (a NaN or ±inf anywhere makes it non-finite).

    A sum of finite entries that overflows also reads as non-finite; the
    statistics computed from such a matrix would overflow as well.
    """
    return not tensor.is_floating_point() or math.isfinite(float(tensor.sum(dtype=torch.float64)))


def _warn(message: str) -> None:
    warnings.warn(message, PhaseStatisticsWarning, stacklevel=3)


def _nan_order_parameters() -> OrderParameters:
    nan = math.nan
    return OrderParameters(nan, nan, nan, nan, nan, nan, nan, nan)


def _sample_minibatches(n: int, batch_size: int, num: int, generator: torch.Generator) -> Tensor:
    """``num`` uniformly random minibatches of ``batch_size`` distinct indices: ``[num, B]``."""
    # the B smallest of n uniform keys per row: a uniformly random subset (order irrelevant)
    keys = torch.rand(num, n, generator=generator)
    return keys.topk(batch_size, dim=1, largest=False, sorted=False).indices


def _minibatch_gram(gram: Tensor, idx: Tensor) -> Tensor:
    """``B² g^μ·g^ν`` for the minibatches ``idx [M, B]``, shape ``[M, M]``.

    With ``1_μ`` the membership vector of minibatch μ, ``B² g^μ·g^ν = 1_μᵀ G 1_ν``.
    For ``B ≤ n/8`` the rows of ``G`` are summed with ``embedding_bag``
    (``M·B·(n + M)`` additions, nothing gathered into memory) instead of
    multiplying by the dense ``[M, n]`` membership matrix (``M·n²``).
    """
    num, b = idx.shape
    n = gram.shape[0]
    if 8 * b > n:
        member = torch.zeros(num, n, dtype=torch.float64, device=gram.device)
        member.scatter_(1, idx, 1.0)
        return member @ gram @ member.T
    rows = F.embedding_bag(idx, gram, mode="sum")  # [M, n] = member @ gram
    return F.embedding_bag(idx, rows.T.contiguous(), mode="sum").T  # [μ, ν] = rows[μ, idx[ν]].sum()


def _same_subset(idx: Tensor) -> Tensor:
    """``[M, M]`` bool: minibatches ``μ`` and ``ν`` hold the same samples (always true on the diagonal)."""
    _, label = torch.unique(idx.sort(dim=1).values, dim=0, return_inverse=True)
    return label[:, None] == label[None, :]


def _alignment_R(gram: Tensor, batch_size: int, num_minibatches: int, generator: torch.Generator) -> float:
    """Monte-Carlo ``R``: mean cosine over ordered pairs of distinct sampled minibatches."""
    idx = _sample_minibatches(gram.shape[0], batch_size, num_minibatches, generator).to(gram.device)
    mb_gram = _minibatch_gram(gram, idx) / batch_size**2  # g^μ · g^ν
    norms = mb_gram.diagonal().clamp_min(0).sqrt()
    valid = ~_same_subset(idx)  # distinct subsets only (also drops μ = ν)
    valid &= (norms > 0)[:, None] & (norms > 0)[None, :]
    if not bool(valid.any()):
        return math.nan
    cos = mb_gram / (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    return float(cos[valid].mean())


def order_parameters(
    gram: Tensor,
    batch_size: int,
    *,
    num_minibatches: int = 256,
    generator: torch.Generator | int | None = None,
) -> OrderParameters:
    """Order parameters ``A, A0, A_parallel, A_perp, D, D_parallel, R, sigma2_lambda``.

    All fields but ``R`` are exact for the minibatch ensemble (SPEC.md §1 closed
    forms, float64). ``R`` is the mean of ``ĝ^μ·ĝ^ν`` over the ordered pairs of
    distinct minibatches among ``num_minibatches`` sampled ones (pairs that
    happen to draw the same subset are excluded).

    Args:
        gram: Per-sample-gradient Gram matrix, shape ``[n, n]``.
        batch_size: Training minibatch size ``B`` (``1 <= B <= n``).
        num_minibatches: Number ``M >= 2`` of sampled minibatches for ``R``.
        generator: ``torch.Generator`` or int seed for sampling ``R``'s
            minibatches; ``None`` means seed 0. Global RNG state is untouched.

    Returns:
        :class:`OrderParameters`. With NaN/inf in ``gram`` every field is NaN;
        with a zero mean gradient ``sigma2_lambda``, ``A_parallel``, ``A_perp``
        and ``D_parallel`` are NaN; ``R`` is NaN when no two distinct
        minibatches exist (``B = n``). Each case warns once.

    Raises:
        DegenerateInputError: ``n < 2``, ``B`` outside ``[1, n]``, a non-square
            ``gram``, or ``num_minibatches < 2``.
    """
    g = _as_gram(gram)
    n = g.shape[0]
    _check_batch_size(batch_size, n)
    if isinstance(num_minibatches, bool) or not isinstance(num_minibatches, int) or num_minibatches < 2:
        raise DegenerateInputError(f"num_minibatches must be an int >= 2; got {num_minibatches!r}.")
    if not _all_finite(g):
        _warn("The gradient Gram matrix contains NaN or inf (NaN loss or gradient?); order parameters are NaN.")
        return _nan_order_parameters()
    c_b = minibatch_variance_factor(n, batch_size)
    row_mean = g.mean(dim=1)  # g_i · g
    a0 = float(row_mean.mean())  # ‖g‖²
    spread = float(g.diagonal().mean()) - a0  # S = mean ‖g_i − g‖²
    d = c_b * max(spread, 0.0)
    a = a0 + d
    if a0 > 0:
        sigma2 = c_b * float(((row_mean - a0) ** 2).mean()) / a0**2
        a_par = (1.0 + sigma2) * a0
        a_perp = a - a_par
        d_par = sigma2 * a0
    else:
        _warn("The mean gradient is zero; sigma2_lambda, A_parallel, A_perp and D_parallel are NaN.")
        sigma2 = a_par = a_perp = d_par = math.nan
    r = _alignment_R(g, batch_size, num_minibatches, make_generator(generator))
    if math.isnan(r):
        _warn(f"R is undefined: no two distinct non-zero minibatch gradients (n={n}, B={batch_size}); R is NaN.")
    return OrderParameters(
        A=a, A0=a0, A_parallel=a_par, A_perp=a_perp, D=d, D_parallel=d_par, R=r, sigma2_lambda=sigma2
    )


#: Below this probe size the exact decomposition is used even for a leading spectrum: on the real Gram
#: matrices of benchmarks/gram.py (clustered leading eigenvalues, slow Lanczos convergence) the Lanczos solve
#: measured 0.8-1.1x the exact one at n = 512 and 1.1-1.4x faster at n = 1024 (one thread, loaded machine).
_LANCZOS_MIN_N = 1024
#: Leading eigenvalues a Lanczos solve asks for; if they do not reach the fraction, the exact path runs.
_LANCZOS_K = 32
#: Relative distance of a partial sum from ``fraction·D`` below which ``D_s`` is decided by the exact path.
_TIE_RTOL = 1e-9

SpectrumMethod = Literal["auto", "exact", "lanczos"]


def _exact_eigenvalues(centred: Tensor) -> Tensor:
    """All eigenvalues of the symmetric ``centred`` (lower triangle read), descending."""
    # On the CPU numpy's LAPACK is used: benchmarks/gram.py measures it 1.5-2x faster than torch's there;
    # its BLAS pool is bounded to torch's thread count.
    if centred.device.type == "cpu":
        with torch_threads():
            eig = torch.from_numpy(np.linalg.eigvalsh(centred.numpy(), UPLO="L"))  # ascending
    else:
        eig = torch.linalg.eigvalsh(centred)
    return eig.flip(0)


def _leading_eigenvalues(centred: Tensor, k: int) -> Tensor | None:
    """The ``k`` largest eigenvalues of the PSD ``centred`` by Lanczos (ARPACK), descending; None if it fails.

    The start vector is a fixed pseudo-random one (seeded, never the global
    RNG), so every process gets the same numbers from the same matrix.
    """
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigsh  # type: ignore[import-untyped]

    matrix = centred.cpu().numpy()
    n = matrix.shape[0]
    v0 = np.random.default_rng(0).standard_normal(n)
    try:
        with torch_threads():
            values = eigsh(matrix, k=k, which="LA", v0=v0, tol=0, return_eigenvectors=False)
    except (ArpackError, ArpackNoConvergence):
        return None
    return torch.from_numpy(np.sort(values)[::-1].copy()).to(centred.device)


def _reaches(cum: Tensor, target: float, total: float) -> int | None:
    """Index ``k`` (1-based) of the first partial sum ``≥ target``, or None if none does or one is too close to call."""
    if float(cum[-1]) < target + _TIE_RTOL * total:
        return None
    k = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype, device=cum.device)).item()) + 1
    close = (cum[max(0, k - 2) : k] - target).abs() <= _TIE_RTOL * total
    return None if bool(close.any()) else k


def noise_spectrum(
    gram: Tensor, batch_size: int, *, fraction: float | None = None, method: SpectrumMethod = "auto"
) -> Tensor:
    """Eigenvalues of the minibatch-noise covariance ``C``, in descending order (all, or the leading ones).

    ``C = c_B · Σ`` with ``Σ = mean_i (g_i − g)(g_i − g)ᵀ``; the non-zero
    eigenvalues of ``Σ`` are those of the centred Gram matrix
    ``K = (1/n) H G H`` (``H = I − 11ᵀ/n``), so no ``P×P`` matrix is formed.
    ``K`` always has the eigenvector ``1`` with eigenvalue 0, which is dropped.

    With ``fraction=None`` (default) every eigenvalue is computed (a float64
    ``O(n³)`` decomposition): use it for a histogram or figure of the whole
    spectrum. With ``fraction=f`` only the leading eigenvalues whose sum
    reaches ``f·D`` are guaranteed: for ``n ≥ 1024`` a Lanczos solve
    (``scipy.sparse.linalg.eigsh``) of the 32 largest is tried first; it is
    kept when their sum reaches ``f·D`` (the total ``D = Tr C`` is known
    exactly from the trace) and not within ``1e-9·D`` of it at the crossing,
    otherwise the exact path runs. Then
    ``effective_dimension(spectrum, f, total=D)`` equals ``D_s(f)`` of the
    full spectrum, and the leading eigenvalues agree with the full ones to
    rounding. It pays where the spectrum decays fast; on real gradient Gram
    matrices, whose leading eigenvalues are clustered, the gain is small
    (measured in ``benchmarks/gram.py``, numbers in ``benchmarks/README.md``),
    and it costs a Lanczos solve more when it falls back (``D_s > 32``).

    Args:
        gram: Per-sample-gradient Gram matrix, shape ``[n, n]``.
        batch_size: Training minibatch size ``B``.
        fraction: ``None`` for the whole spectrum, or ``f`` in ``(0, 1]``: only
            the leading eigenvalues up to the fraction ``f`` of ``D`` are needed.
        method: ``"auto"`` (default: as above), ``"exact"`` (always the full
            decomposition) or ``"lanczos"`` (try Lanczos at any ``n ≥ 3``; falls
            back to exact when it cannot decide). Ignored when ``fraction`` is None.

    Returns:
        float64 tensor, descending, clamped at 0: shape ``[n − 1]`` for the
        whole spectrum (its sum is ``D``), or ``[k]`` with ``D_s(f) ≤ k < n − 1``
        leading eigenvalues from the Lanczos path (a tensor of length
        ``n − 1`` is always the whole spectrum). NaN-filled (with a warning) if
        ``gram`` is not finite.

    Raises:
        DegenerateInputError: ``n < 2``, ``B`` outside ``[1, n]``, non-square
            ``gram``, ``fraction`` outside ``(0, 1]`` or an unknown ``method``.
    """
    g = _as_gram(gram)
    n = g.shape[0]
    _check_batch_size(batch_size, n)
    if fraction is not None:
        _check_fraction(fraction)
    if method not in ("auto", "exact", "lanczos"):
        raise DegenerateInputError(f"method must be 'auto', 'exact' or 'lanczos'; got {method!r}.")
    if not _all_finite(g):
        _warn("The gradient Gram matrix contains NaN or inf; the noise spectrum is NaN.")
        return torch.full((n - 1,), math.nan, dtype=torch.float64, device=g.device)
    row = g.mean(dim=1, keepdim=True)
    centred = (g - row).sub_(row.T).add_(row.mean())  # H G H; one n×n temporary
    scale = minibatch_variance_factor(n, batch_size) / n
    k = min(_LANCZOS_K, n - 2)
    use_lanczos = (
        fraction is not None and k >= 1 and (method == "lanczos" or (method == "auto" and n >= _LANCZOS_MIN_N))
    )
    if use_lanczos:
        assert fraction is not None
        # Lanczos reads the whole matrix: symmetrise from the lower triangle, as the exact path reads it
        sym = centred.tril() + centred.tril(-1).T
        total = float(sym.diagonal().sum())  # Tr K = sum of all eigenvalues (the dropped one is 0)
        leading = _leading_eigenvalues(sym, k)
        if leading is not None and total > 0:
            leading = leading.clamp_min(0.0)
            if _reaches(leading.cumsum(0), fraction * total, total) is not None:
                return leading * scale
    eig = _exact_eigenvalues(centred)[: n - 1].clamp_min(0.0)
    return eig * scale


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise DegenerateInputError(f"fraction must be in (0, 1]; got {fraction!r}.")


def effective_dimension(eigenvalues: Tensor, fraction: float = 0.9, *, total: float | None = None) -> int:
    """Effective dimension ``D_s(f)``: the smallest ``k`` with ``e_1 + … + e_k ≥ f·D``.

    Args:
        eigenvalues: Noise spectrum (any order; sorted descending here), shape
            ``[m]``: the whole spectrum, or its leading eigenvalues from
            ``noise_spectrum(gram, B, fraction=f)`` together with ``total``.
        fraction: ``f`` in ``(0, 1]``; default 0.9 as in Feng & Tu 2021.
        total: The total variance ``D = Tr C`` when ``eigenvalues`` holds only
            the leading eigenvalues (e.g. ``order_parameters(...).D``); default
            (and whenever it agrees with their sum to ``1e-9``) their sum.

    Returns:
        ``k`` (0 when the spectrum is all zeros).

    Raises:
        DegenerateInputError: ``fraction`` outside ``(0, 1]``; non-finite or
            negative eigenvalues or ``total``; leading eigenvalues that do not
            reach ``f·total``.
    """
    _check_fraction(fraction)
    e = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1)
    if e.numel() == 0:
        return 0
    if not bool(torch.isfinite(e).all()):
        raise DegenerateInputError("eigenvalues contain NaN or inf; the effective dimension is undefined.")
    if bool((e < 0).any()):
        raise DegenerateInputError("eigenvalues of a covariance cannot be negative; got a negative value.")
    cum = torch.sort(e, descending=True).values.cumsum(0)
    whole = float(cum[-1])
    if total is None or abs(float(total) - whole) <= _TIE_RTOL * max(abs(whole), abs(float(total))):
        total = whole
    elif not math.isfinite(total) or total < 0:
        raise DegenerateInputError(f"total must be a finite non-negative variance; got {total!r}.")
    if total <= 0:
        return 0
    target = fraction * total
    if whole < target * (1 - _TIE_RTOL):
        raise DegenerateInputError(
            f"The {e.numel()} eigenvalues sum to {whole:.6g}, less than fraction·total = {target:.6g}: pass the "
            "whole spectrum, or the leading eigenvalues from noise_spectrum(gram, B, fraction=fraction)."
        )
    return min(e.numel(), int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item()) + 1)
