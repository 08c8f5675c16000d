"""Clean/mislabeled split of the order parameters and per-class segment gradients.

SPEC.md §2 (Feng & Tu 2021, section 4) and §3 (clean-priority learning).

The probe set splits into ``n_c`` clean and ``n_w`` mislabeled samples,
``ρ = n_w/n``; ``g_c`` and ``g_w`` are the mean per-sample gradients of each
part. All quantities are pure functions of the Gram matrix.

``A_c`` and ``A_w`` follow SPEC.md's "closed form as for A, within each part":
the clean minibatch gradient is the *mean* of ``B_c = max(1, round((1−ρ)B))``
distinct clean per-sample gradients, so ``A_c = ‖g_c‖² + c_{B_c} S_c`` with
``S_c = mean_{i∈clean} ‖g_i − g_c‖²`` and ``c_{B_c} = (n_c − B_c)/(B_c(n_c − 1))``
(likewise for the mislabeled part). The directed activities are weighted by
the part's share, ``A0_c = (1−ρ)²‖g_c‖²`` and ``A0_w = ρ²‖g_w‖²``, as SPEC.md
defines them, so that ``g = (1−ρ)g_c + ρ g_w`` and ``A0 = ‖g‖²``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from lightning_phases.errors import DegenerateInputError
from lightning_phases.functional.ensemble import (
    _all_finite,
    _as_gram,
    _check_batch_size,
    _warn,
    minibatch_variance_factor,
)
from lightning_phases.functional.per_sample import (
    ParamSelection,
    _model_device,
    eval_mode,
    grouped_gradient_gram,
    reduce_gram_to_groups,
)

__all__ = [
    "SplitOrderParameters",
    "split_order_parameters",
    "SegmentGradients",
    "segment_statistics",
    "segment_statistics_from_groups",
    "segment_groups",
    "segment_gradients",
    "single_logit_loss",
]


@dataclass(frozen=True)
class SplitOrderParameters:
    """Order parameters of the clean/mislabeled split (SPEC.md §2).

    Attributes:
        rho: Fraction of mislabeled probe samples ``n_w / n``.
        A_c: ``⟨‖g^{μ_c}‖²⟩`` over clean minibatches of size ``B_c``.
        A_w: Same over mislabeled minibatches of size ``B_w``.
        A0_c: ``(1−ρ)²‖g_c‖²``.
        A0_w: ``ρ²‖g_w‖²``.
        A0: ``‖(1−ρ)g_c + ρ g_w‖²``.
        R_cw: ``cos(g_c, g_w)``.
        R_ac: ``cos(g, g_c)``.
        R_aw: ``cos(g, g_w)``.
    """

    rho: float
    A_c: float
    A_w: float
    A0_c: float
    A0_w: float
    A0: float
    R_cw: float
    R_ac: float
    R_aw: float

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain ``{name: value}`` dict (names as in SPEC.md)."""
        return asdict(self)


def _as_mask(mask: Tensor, n: int, name: str = "noisy_mask") -> Tensor:
    mask = torch.as_tensor(mask)
    if mask.ndim != 1 or mask.shape[0] != n:
        raise DegenerateInputError(f"{name} must have shape [{n}] to match the Gram matrix; got {tuple(mask.shape)}.")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise DegenerateInputError(f"{name} must be boolean (or 0/1).")
        mask = mask.bool()
    return mask


def _cos(dot: float, sq_a: float, sq_b: float) -> float:
    if sq_a <= 0 or sq_b <= 0:
        return math.nan
    return dot / math.sqrt(sq_a * sq_b)


def split_order_parameters(gram: Tensor, noisy_mask: Tensor, batch_size: int) -> SplitOrderParameters:
    """Split order parameters ``rho, A_c, A_w, A0_c, A0_w, A0, R_cw, R_ac, R_aw``.

    Args:
        gram: Per-sample-gradient Gram matrix ``[n, n]``.
        noisy_mask: Boolean ``[n]``, True for mislabeled samples.
        batch_size: Training minibatch size ``B`` (``1 <= B <= n``).

    Returns:
        :class:`SplitOrderParameters` (float64 arithmetic). All fields are NaN
        if ``gram`` has NaN/inf; a cosine is NaN if one of its vectors is zero.
        Each case warns once.

    Raises:
        DegenerateInputError: ``n < 2``, ``B`` outside ``[1, n]``, a mask of the
            wrong shape, or an empty clean or mislabeled part.
    """
    g = _as_gram(gram)
    n = g.shape[0]
    _check_batch_size(batch_size, n)
    w = _as_mask(noisy_mask, n).to(g.device)
    n_w = int(w.sum())
    n_c = n - n_w
    if n_w == 0 or n_c == 0:
        part = "mislabeled" if n_w == 0 else "clean"
        raise DegenerateInputError(
            f"The probe set has no {part} sample (n_c={n_c}, n_w={n_w}); the clean/mislabeled split "
            "needs both parts. Use a larger probe set or check the noise mask."
        )
    rho = n_w / n
    if not _all_finite(g):
        _warn("The gradient Gram matrix contains NaN or inf; split order parameters are NaN.")
        nan = math.nan
        return SplitOrderParameters(rho, nan, nan, nan, nan, nan, nan, nan, nan)
    c = ~w
    gcc = float(g[c][:, c].mean())  # ‖g_c‖²
    gww = float(g[w][:, w].mean())  # ‖g_w‖²
    gcw = float(g[c][:, w].mean())  # g_c · g_w
    s_c = float(g.diagonal()[c].mean()) - gcc
    s_w = float(g.diagonal()[w].mean()) - gww
    b_c = max(1, round((1 - rho) * batch_size))
    b_w = max(1, round(rho * batch_size))
    a_c = gcc + minibatch_variance_factor(n_c, b_c) * max(s_c, 0.0)
    a_w = gww + minibatch_variance_factor(n_w, b_w) * max(s_w, 0.0)
    # g = (1−ρ)g_c + ρ g_w
    gg = (1 - rho) ** 2 * gcc + 2 * rho * (1 - rho) * gcw + rho**2 * gww
    g_gc = (1 - rho) * gcc + rho * gcw
    g_gw = (1 - rho) * gcw + rho * gww
    r_cw, r_ac, r_aw = _cos(gcw, gcc, gww), _cos(g_gc, gg, gcc), _cos(g_gw, gg, gww)
    if math.isnan(r_cw) or math.isnan(r_ac) or math.isnan(r_aw):
        _warn("A mean gradient (g, g_c or g_w) is zero; the cosines involving it are NaN.")
    return SplitOrderParameters(
        rho=rho,
        A_c=a_c,
        A_w=a_w,
        A0_c=(1 - rho) ** 2 * gcc,
        A0_w=rho**2 * gww,
        A0=gg,
        R_cw=r_cw,
        R_ac=r_ac,
        R_aw=r_aw,
    )


@dataclass(frozen=True)
class SegmentGradients:
    """Per-class clean and noisy segment gradients (SPEC.md §3).

    All tensors have shape ``[K]``, one entry per class in ``classes``.

    Attributes:
        classes: Ground-truth class labels.
        num_clean: Number of clean samples of each true class.
        num_noisy: Number of mislabeled samples of each true class.
        clean_norm: ``‖g_clean^(c)‖`` (a *sum* of per-sample gradients).
        noisy_norm: ``‖g_noise^(c)‖``.
        ratio: ``clean_norm / noisy_norm`` (NaN when a segment is empty or zero).
        cos: ``cos(g_clean^(c), g_noise^(c))`` (NaN when a segment is empty or zero).
    """

    classes: Tensor
    num_clean: Tensor
    num_noisy: Tensor
    clean_norm: Tensor
    noisy_norm: Tensor
    ratio: Tensor
    cos: Tensor

    @property
    def mean_ratio(self) -> float:
        """Mean ratio over the classes where it is defined (NaN if none)."""
        return float(self.ratio.nanmean()) if bool(torch.isfinite(self.ratio).any()) else math.nan

    @property
    def mean_cos(self) -> float:
        """Mean cosine over the classes where it is defined (NaN if none)."""
        return float(self.cos.nanmean()) if bool(torch.isfinite(self.cos).any()) else math.nan


def segment_groups(true_targets: Tensor, noisy_mask: Tensor, classes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Segment of each sample: group ``2k`` (clean) or ``2k + 1`` (mislabeled) of true class ``classes[k]``.

    The groups of :func:`grouped_gradient_gram` whose sums are the segment
    gradients ``g_clean^(c)`` and ``g_noise^(c)`` of SPEC.md §3.

    Args:
        true_targets: Ground-truth class of each sample ``[n]``.
        noisy_mask: Boolean ``[n]``, True for mislabeled samples.
        classes: Classes to report (default: the sorted unique true classes).

    Returns:
        ``(groups [n] long, classes [K])``; samples of other classes get ``-1``.

    Raises:
        DegenerateInputError: shapes do not match.
    """
    y = torch.as_tensor(true_targets).reshape(-1).long()
    n = y.shape[0]
    w = _as_mask(noisy_mask, n).to(y.device)
    classes = torch.unique(y) if classes is None else torch.as_tensor(classes).to(y.device).reshape(-1).long()
    groups = torch.full((n,), -1, dtype=torch.long, device=y.device)
    for k, c in enumerate(classes.tolist()):
        in_c = y == c
        groups[in_c] = 2 * k + w[in_c].long()
    return groups, classes


def segment_statistics_from_groups(
    group_gram: Tensor, true_targets: Tensor, noisy_mask: Tensor, *, classes: Tensor | None = None
) -> SegmentGradients:
    """Per-class segment statistics from the Gram matrix of the segment sums.

    Args:
        group_gram: ``[2K, 2K]`` Gram matrix of the group-summed segment
            gradients for the groups of :func:`segment_groups` (e.g. from
            :func:`grouped_gradient_gram` with :func:`single_logit_loss`).
        true_targets, noisy_mask, classes: as for :func:`segment_groups`.

    Returns:
        :class:`SegmentGradients` with float64 tensors.

    Raises:
        DegenerateInputError: shapes do not match.
    """
    groups, classes = segment_groups(true_targets, noisy_mask, classes)
    h = torch.as_tensor(group_gram).to(torch.float64).cpu()
    k = classes.numel()
    if h.shape != (2 * k, 2 * k):
        raise DegenerateInputError(
            f"group_gram must have shape [{2 * k}, {2 * k}] for {k} classes; got {tuple(h.shape)}."
        )
    if not _all_finite(h):
        _warn("The segment-gradient Gram matrix contains NaN or inf; segment statistics are NaN.")
    counts = torch.bincount(groups[groups >= 0].cpu(), minlength=2 * k)
    fields: dict[str, list[float]] = {k_: [] for k_ in ("clean_norm", "noisy_norm", "ratio", "cos")}
    for j in range(k):
        sq_s, sq_t, dot = float(h[2 * j, 2 * j]), float(h[2 * j + 1, 2 * j + 1]), float(h[2 * j, 2 * j + 1])
        norm_s = math.sqrt(max(sq_s, 0.0)) if math.isfinite(sq_s) else math.nan
        norm_t = math.sqrt(max(sq_t, 0.0)) if math.isfinite(sq_t) else math.nan
        fields["clean_norm"].append(norm_s)
        fields["noisy_norm"].append(norm_t)
        fields["ratio"].append(norm_s / norm_t if norm_t > 0 and math.isfinite(norm_s) else math.nan)
        fields["cos"].append(_cos(dot, sq_s, sq_t))
    as_t = {k_: torch.tensor(v, dtype=torch.float64) for k_, v in fields.items()}
    return SegmentGradients(
        classes=classes.cpu(),
        num_clean=counts[0::2].long(),
        num_noisy=counts[1::2].long(),
        clean_norm=as_t["clean_norm"],
        noisy_norm=as_t["noisy_norm"],
        ratio=as_t["ratio"],
        cos=as_t["cos"],
    )


def segment_statistics(
    gram: Tensor, true_targets: Tensor, noisy_mask: Tensor, *, classes: Tensor | None = None
) -> SegmentGradients:
    """Per-class segment-gradient norms, ratio and cosine from a Gram matrix.

    ``gram`` must be the Gram matrix of the *segment* per-sample gradients:
    the logistic-loss gradient for a one-logit binary model, the single-logit
    gradient ``(f_c − y_c)∇h_c`` of each sample's true class ``c`` for a
    multi-class model (:func:`single_logit_loss`). For class ``c`` with clean
    set ``S`` and mislabeled set ``T`` (by *true* class),
    ``‖g_clean^(c)‖² = Σ_{i,j∈S} G_ij`` and ``g_clean^(c)·g_noise^(c) = Σ_{i∈S,j∈T} G_ij``.
    (:func:`segment_statistics_from_groups` takes these sums directly, from
    :func:`grouped_gradient_gram`, without the ``n×n`` matrix.)

    Args:
        gram: Segment-gradient Gram matrix ``[n, n]``.
        true_targets: Ground-truth class of each sample ``[n]``.
        noisy_mask: Boolean ``[n]``, True for mislabeled samples.
        classes: Classes to report (default: the sorted unique true classes).

    Returns:
        :class:`SegmentGradients` with float64 tensors.

    Raises:
        DegenerateInputError: shapes do not match, or ``n < 2``.
    """
    g = _as_gram(gram)
    n = g.shape[0]
    y = torch.as_tensor(true_targets).to(g.device).reshape(-1)
    if y.shape[0] != n:
        raise DegenerateInputError(f"true_targets must have shape [{n}]; got {tuple(y.shape)}.")
    groups, classes = segment_groups(y, _as_mask(noisy_mask, n).to(g.device), classes)
    return segment_statistics_from_groups(
        reduce_gram_to_groups(g, groups, 2 * classes.numel()), y, noisy_mask, classes=classes
    )


def single_logit_loss(output: Tensor, target: Tensor) -> Tensor:
    """Per-sample loss whose gradient is the single-logit gradient ``(f_c − y_c)∇_w h_c`` (SPEC.md §3).

    Args:
        output: Logits of one sample, shape ``[C]``.
        target: ``[given_label, true_label]`` of that sample (shape ``[2]``).

    Returns:
        ``(f_c − y_c) · h_c`` with ``c`` the true class, ``f = softmax(h)`` and
        ``y`` the one-hot *given* label, the coefficient treated as a constant.
    """
    given, true = target[0], target[1]
    coef = torch.softmax(output.detach(), dim=-1).gather(0, true.reshape(1).long())[0]
    coef = coef - (given == true).to(output.dtype)
    return coef * output.gather(0, true.reshape(1).long())[0]


def segment_gradients(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    true_targets: Tensor,
    *,
    noisy_mask: Tensor | None = None,
    params: ParamSelection = None,
    chunk_size: int | None = None,
) -> SegmentGradients:
    """Per-class clean and noisy segment gradients of a model (SPEC.md §3).

    For a one-logit (binary, logistic loss) model the per-sample gradient is
    that of the logistic loss against the given label. For a ``C``-logit model
    it is the single-logit gradient ``(f_c − y_c)∇_w h_c`` of the sample's
    *true* class ``c``. Segment gradients are their sums over the clean and the
    mislabeled samples of each true class. At initialisation the ratio is about
    ``(1−δ)/δ`` (binary) or ``(C−1)(1−δ)/δ`` (multi-class) and the cosine about −1.

    Args:
        model: The model (evaluated in eval mode; left untouched).
        inputs: Probe inputs ``[n, ...]``.
        targets: Given (possibly wrong) labels ``[n]``.
        true_targets: Ground-truth labels ``[n]``.
        noisy_mask: Boolean ``[n]``; default ``targets != true_targets``.
        params: Parameter selection (see :func:`select_parameters`).
        chunk_size: Chunk size of the Gram accumulation.

    Returns:
        :class:`SegmentGradients`, one entry per true class present.
    """
    targets = torch.as_tensor(targets)
    true_targets = torch.as_tensor(true_targets)
    if targets.shape != true_targets.shape or targets.ndim != 1:
        raise DegenerateInputError(
            f"targets and true_targets must both have shape [n]; got {tuple(targets.shape)} and "
            f"{tuple(true_targets.shape)}."
        )
    if noisy_mask is None:
        noisy_mask = targets != true_targets
    groups, classes = segment_groups(true_targets, noisy_mask)
    out_dim = _output_width(model, inputs)
    if out_dim == 1:
        group_gram, _ = grouped_gradient_gram(
            model, inputs, targets, groups, num_groups=2 * classes.numel(), params=params, chunk_size=chunk_size
        )
    else:
        pair = torch.stack([targets.long(), true_targets.long()], dim=1)
        group_gram, _ = grouped_gradient_gram(
            model,
            inputs,
            pair,
            groups,
            num_groups=2 * classes.numel(),
            loss_fn=single_logit_loss,
            params=params,
            chunk_size=chunk_size,
        )
    return segment_statistics_from_groups(group_gram, true_targets, noisy_mask, classes=classes)


def _output_width(model: nn.Module, inputs: Tensor) -> int:
    """Number of outputs per sample (1 for a one-logit model), from one eval-mode forward."""
    with torch.no_grad(), eval_mode(model):
        out = model(inputs[:1].to(_model_device(model)))
    return 1 if out.ndim <= 1 else int(out.reshape(out.shape[0], -1).shape[1])
