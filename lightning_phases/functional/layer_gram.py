"""Per-layer fast path for the per-sample-gradient Gram matrix.

For a layer whose per-sample weight gradient is an outer product of the
layer's input and the gradient at its output -- ``nn.Linear`` and
``nn.Conv2d`` (after unfolding) -- the Gram contribution can be computed from
one ordinary batched forward and backward, without forming per-sample
gradients. With ``a_i`` the layer input of sample ``i`` and
``δ_i = ∂l_i/∂(layer output)``, a Linear layer on 2-D input contributes

    G_ij += (a_i·a_j)(δ_i·δ_j)   (weight)   +   δ_i·δ_j   (bias),

and with positions ``t`` (sequence positions, or the ``L`` patches of an
unfolded convolution) ``G_ij += Σ_{t,s} (a_it·a_js)(δ_it·δ_js)``. This is the
"ghost" Gram (as in ghost clipping). It costs ``n²T²(d_in + d_out)``; forming
the per-sample gradients ``Σ_t δ_it a_itᵀ`` and multiplying them costs
``n·T·d_in·d_out + n²·d_in·d_out``. For each layer the cheaper of the two is
taken by operation count. Parameters of every other layer go through the
exact engines of :mod:`lightning_phases.functional.per_sample` (``vmap``, or
the per-sample loop where ``torch.func`` cannot run the model).

Safety checks, each of which sends the layer to the exact engines
(``vmap``, or the per-sample loop where ``torch.func`` cannot run the model):
the module must be called exactly once per forward and its input must not be
modified in place after the call (both silently); and, with a
:class:`~lightning_phases.errors.PhaseStatisticsWarning` naming the layer,
every layer must prove that its recorded ``(a, δ)`` give the *per-sample*
gradients, not only their sum:

1. the layer's input and output hold the chunk's samples at dim 0 (Linear
   ``[n, ..., d]``, Conv2d ``[n, C, H, W]``); a time-major ``[T, n, d]``
   layout (``nn.TransformerEncoder(batch_first=False)``) fails here;
2. the summed check: ``Σ_i g_i`` from ``(a, δ)`` equals the autograd gradient
   of ``Σ_i l_i`` (catches weights used outside the module's forward, e.g.
   tying);
3. the weighted check: with fixed pseudo-random per-sample weights ``c_i``
   (a private generator; the global random state is untouched), one extra
   backward of ``Σ_i c_i l_i`` must give ``Σ_i c_i g_i``. This holds only if
   row ``i`` of the layer's input and output belongs to sample ``i`` alone, so
   it catches a wrong sample axis even when ``T == n`` and samples coupled
   after the layer;
4. samples coupled *before* a layer are invisible to gradients, so the losses
   of the first and last sample of the first chunk, each run alone, must
   equal their batched losses.

Layers in float16 or bfloat16 are left to the exact engines: their rounding is
too coarse for these checks to prove anything. Checks 2 and 3 compare along two fixed random directions, which costs
``O(n·T·(d_in + d_out))`` rather than a second weight-gradient product, with
a float32 rounding bound as tolerance. Together the checks cost one extra
backward pass per chunk and two single-sample forwards.

Cost: the batched forward and backward (the output gradients ``δ`` are caught
by tensor hooks; nothing is added to the forward pass) plus, per layer, the
lower triangle of the ``n×n`` products, taken in row blocks of 256 samples:
about ``(n² + 256·n)/2 · (d_in + d_out)`` multiply-adds for a ghost Linear
layer, ``n·T·d_in·d_out + (n² + 256·n)/2 · P_layer`` for a materialised one.
Products are computed in the layer's dtype (float32 for a float32 model) and
added into a float64 accumulator; diagonal blocks are symmetrised before they
are added and off-diagonal blocks are mirrored, so ``G`` is exactly symmetric.

Memory (bytes, float32 model, ``k = chunk_size or n``): peak is roughly

    8·n²                                  the float64 accumulator G
  + 4·n·Σ_layers (|a_i| + |δ_i|)          recorded layer inputs and output
                                          gradients for all n probe samples
  + activations of one forward/backward over k samples
  + the largest of, per layer:
      ghost, T = 1:      4·b·n·2          two [b, n] row products, b = min(k, 256)
      ghost, T > 1:      4·2·(b·T)²       two [bT, bT] products, bT·bT ≤ 2²⁴
      materialise:       4·n·(T·d_in + P_layer) + 4·b·n
                         (unfolded inputs and J of the layer; with a chunk_size
                         below n only 2·k rows of each at a time)

E.g. the 784-256-256-10 MLP at n = 1024: 8 MiB for ``G``, 4·1024·(784 + 256
+ 256 + 256 + 256 + 10) B ≈ 7.1 MiB recorded, 2 MiB of row products. A CNN
whose 16→32-channel 3×3 conv sees 16×16 maps (T = 256, d_in = 144, P = 4640)
needs 4·1024·(256·144 + 4640) B ≈ 163 MiB to materialise that layer at n =
1024; pass ``chunk_size`` to bound it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from lightning_phases.errors import LightningPhasesError, PhaseStatisticsWarning
from lightning_phases.functional import _affine_gram as affine
from lightning_phases.functional.per_sample import ForwardFn, _num_samples, _output_tensor, _slice, default_forward

__all__ = ["LayerPlan", "fast_layer_gram", "supported_layer"]

_GHOST_BLOCK_ENTRIES = 1 << 24  # max entries of one [kT, kT] ghost product
# Gram products are taken block by block over the lower triangle only; with
# blocks of this many samples an n×n product costs (n/b + 1)/(2n/b) of the full one.
_TRI_BLOCK = 256


def supported_layer(module: nn.Module) -> bool:
    """Whether ``module`` has a fast Gram path (Linear, Conv2d with groups=1 and zero padding, or the affine
    parameters of an eval-mode BatchNorm, a LayerNorm or a GroupNorm: :mod:`._affine_gram`)."""
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not (isinstance(module.padding, str) and module.padding != "valid")
        )
    return affine.supported_affine(module)


@dataclass
class LayerPlan:
    """What the fast path does with one layer.

    Attributes:
        name: Module name.
        param_names: Full names of its selected parameters (``weight`` and/or ``bias``).
        method: ``"ghost"`` or ``"materialize"``.
        positions: ``T``, positions per sample (1 for a Linear layer on 2-D input).
        ghost_cost: Operation count of the ghost Gram.
        materialize_cost: Operation count of materialising per-sample gradients.
    """

    name: str
    param_names: list[str]
    method: str
    positions: int
    ghost_cost: float
    materialize_cost: float
    inputs: list[Tensor] = field(default_factory=list, repr=False)
    out_grads: list[Tensor] = field(default_factory=list, repr=False)


class _Recorder:
    """Forward hooks that record each candidate layer's input and the gradient at its output.

    The output gradient is caught by a tensor hook on the module's output. A
    hook registered before an in-place change of that tensor (``ReLU(inplace=True)``)
    still receives the gradient with respect to the value the module returned,
    so nothing is added to or copied in the forward pass.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.calls: dict[str, int] = {}
        self.inputs: dict[str, Tensor] = {}
        self.versions: dict[str, int] = {}
        self.outputs: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self.grads: dict[str, Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1 or not isinstance(output, Tensor) or not output.requires_grad:
                return
            if not args or not isinstance(args[0], Tensor):
                return
            self.inputs[name] = args[0].detach()
            self.versions[name] = args[0]._version
            self.outputs[name] = (output.shape, output.dtype, output.device)
            # the first backward of a chunk (of Σ_i l_i) gives δ; the check's weighted backward must not overwrite it
            output.register_hook(lambda grad: self._first_grad(name, grad))

        return hook

    def _first_grad(self, name: str, grad: Tensor) -> None:
        if name not in self.grads:
            self.grads[name] = grad

    def output_grad(self, name: str) -> Tensor:
        """The gradient at the module's output (zeros if the loss does not depend on it)."""
        grad = self.grads.get(name)
        if grad is None:
            shape, dtype, device = self.outputs[name]
            return torch.zeros(shape, dtype=dtype, device=device)
        return grad.detach()

    def reset(self) -> None:
        self.calls.clear()
        self.inputs.clear()
        self.versions.clear()
        self.outputs.clear()
        self.grads.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _pname(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def _unfold(module: nn.Conv2d, x: Tensor) -> Tensor:
    padding = 0 if module.padding == "valid" else module.padding
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)  # type: ignore[arg-type]  # "same" padding is not a fast layer


def _as_positions(module: nn.Module, inp: Tensor, out_grad: Tensor) -> tuple[Tensor, Tensor]:
    """``(a [n, T, d_in], δ [n, T, d_out])`` for a Linear or Conv2d layer."""
    n = inp.shape[0]
    if isinstance(module, nn.Conv2d):
        a = _unfold(module, inp).transpose(1, 2)  # [n, L, C_in k k]
        d = out_grad.reshape(n, out_grad.shape[1], -1).transpose(1, 2)  # [n, L, C_out]
        return a, d
    return inp.reshape(n, -1, inp.shape[-1]), out_grad.reshape(n, -1, out_grad.shape[-1])


def _per_sample(a: Tensor, d: Tensor, weight: bool, bias: bool) -> Tensor:
    """Materialised per-sample gradients ``[n, P_layer]`` (weight then bias, flattened)."""
    parts = []
    if weight:
        parts.append(torch.einsum("nto,nti->noi", d, a).reshape(a.shape[0], -1))
    if bias:
        parts.append(d.sum(1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # no copy of a weight-only layer


def _ghost_block(ai: Tensor, di: Tensor, aj: Tensor, dj: Tensor, weight: bool, bias: bool) -> Tensor:
    """Ghost Gram block ``Σ_{t,s} [(a_it·a_js) + bias](δ_it·δ_js)`` for two sample blocks."""
    ni, t = ai.shape[0], ai.shape[1]
    nj = aj.shape[0]
    if t == 1:
        dd = di[:, 0] @ dj[:, 0].T
        if weight:
            aa = ai[:, 0] @ aj[:, 0].T
            if bias:
                aa += 1.0
            return dd.mul_(aa)
        return dd if bias else dd.zero_()
    dd = di.reshape(ni * t, -1) @ dj.reshape(nj * t, -1).T
    if weight:
        coef = ai.reshape(ni * t, -1) @ aj.reshape(nj * t, -1).T
        if bias:
            coef += 1.0
        dd.mul_(coef)
    elif not bias:
        dd.zero_()
    return dd.reshape(ni, t, nj, t).sum(dim=(1, 3))


def _costs(n: int, t: int, d_in: int, d_out: int, weight: bool, bias: bool) -> tuple[float, float]:
    ghost = float(n) ** 2 * t**2 * ((d_in if weight else 0) + d_out)
    p = (d_in * d_out if weight else 0) + (d_out if bias else 0)
    materialize = float(n) * t * p + float(n) ** 2 * p
    return ghost, materialize


def _layer_dims(module: nn.Module, inp_shape: torch.Size, out_shape: torch.Size) -> tuple[int, int, int]:
    """``(T, d_in, d_out)`` from one sample's input and output shapes."""
    if affine.supported_affine(module):
        return 1, 1, module.weight.numel()  # type: ignore[operator]  # elementwise: costs as a bias of that size (always materialised)
    if isinstance(module, nn.Conv2d):
        k = math.prod(module.kernel_size)
        return math.prod(out_shape[2:]), module.in_channels * k, module.out_channels
    return math.prod(inp_shape[1:-1]) if len(inp_shape) > 2 else 1, int(module.in_features), int(module.out_features)  # type: ignore[arg-type]


# Layers in float16/bfloat16 go to the exact engines: their rounding (2^-8 for bfloat16) is too coarse for the
# checks below to prove that the recorded inputs and output gradients give per-sample gradients.
_CHECKABLE_DTYPES = (torch.float32, torch.float64)
_CHECK_VECTORS = 2  # random directions for the projected weight checks
_CHECK_SEED = 20210612
_WEIGHT_SEED = 19890417  # per-sample weights c_i of the weighted check


def _check_directions(module: nn.Module, like: Tensor) -> Tensor:
    """Fixed pseudo-random directions ``V`` shaped like the weight's input side, ``[k, *weight.shape[1:]]``.

    Drawn from a private generator, so the global random state is untouched.
    """
    gen = torch.Generator(device="cpu").manual_seed(_CHECK_SEED)
    shape = (_CHECK_VECTORS, *module.weight.shape[1:])  # type: ignore[index]  # a Linear or Conv2d weight
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def _sample_weights(n: int) -> Tensor:
    """Fixed pseudo-random per-sample weights ``c [n]`` (float64, CPU) from a private generator."""
    gen = torch.Generator(device="cpu").manual_seed(_WEIGHT_SEED)
    return torch.randn(n, generator=gen, dtype=torch.float64)


def _projected_check(
    module: nn.Module, inp: Tensor, out_grad: Tensor, weight_grad: Tensor, c: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ_i c_i g_i V, ∇W V, bound)`` along a few fixed directions ``V`` (each ``[d_out, k]``).

    ``g_i = Σ_t δ_it a_itᵀ`` is the per-sample weight gradient implied by the
    recorded input and output gradient of sample ``i``. With ``c = None``
    (all ``c_i = 1``) the sum must equal the autograd gradient ``∇W`` of
    ``Σ_i l_i`` unless the weight is also used outside the module's forward;
    with per-sample weights ``c`` it must equal the gradient of ``Σ_i c_i l_i``,
    which holds only if row ``i`` of the layer's input and output belongs to
    sample ``i`` alone. Projecting on ``k`` directions costs
    ``O(n·T·(d_in + d_out)·k)`` instead of ``O(n·T·d_in·d_out)`` for the full
    sum: ``a_it·v`` is one convolution (or matrix product) of the input with
    ``v``, and nothing of size ``n·T·d_out`` is copied. ``bound[o, k] =
    ‖δ_·o‖·‖c·a·v_k‖`` (Cauchy–Schwarz) bounds ``Σ_{i,t} |δ_ito| |c_i a_it·v_k|``,
    the scale of the float32 rounding of both sums.
    """
    if affine.supported_affine(module):
        return affine.affine_weight_check(module, inp, out_grad, weight_grad, c)
    v = _check_directions(module, inp)
    n = inp.shape[0]
    if isinstance(module, nn.Conv2d):
        padding = 0 if module.padding == "valid" else module.padding
        av = F.conv2d(inp, v, stride=module.stride, padding=padding, dilation=module.dilation)
        av = av.reshape(n, _CHECK_VECTORS, -1)  # [n, k, L]
        if c is not None:
            av = av * c[:, None, None]
        d = out_grad.reshape(n, out_grad.shape[1], -1)  # [n, d_out, L], the natural layout
        got = torch.bmm(d, av.transpose(1, 2)).sum(0)  # [d_out, k]
        d_norm = torch.linalg.vector_norm(d, dim=(0, 2))
        av_norm = torch.linalg.vector_norm(av, dim=(0, 2))
    else:
        av = F.linear(inp, v)  # [n, ..., k]
        if c is not None:
            av = av * c.reshape(n, *([1] * (av.ndim - 1)))
        av = av.reshape(-1, _CHECK_VECTORS)  # [n·T, k]
        d = out_grad.reshape(-1, out_grad.shape[-1])  # [n·T, d_out]
        got = d.T @ av
        d_norm = torch.linalg.vector_norm(d, dim=0)
        av_norm = torch.linalg.vector_norm(av, dim=0)
    bound = d_norm[:, None] * av_norm[None, :]
    ref = weight_grad.reshape(weight_grad.shape[0], -1) @ v.reshape(_CHECK_VECTORS, -1).T
    return got, ref, bound


def _bias_check(
    module: nn.Module, out_grad: Tensor, bias_grad: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ_i c_i Σ_t δ_it, ∇b, Σ_i |c_i| Σ_t |δ_it|)``: the bias analogue of :func:`_projected_check`."""
    if affine.supported_affine(module):
        return affine.affine_bias_check(module, out_grad, bias_grad, c)
    n = out_grad.shape[0]
    if isinstance(module, nn.Conv2d):
        d = out_grad.reshape(n, out_grad.shape[1], -1).sum(2)  # [n, d_out]
        d_abs = out_grad.abs().reshape(n, out_grad.shape[1], -1).sum(2)
    else:
        d = out_grad.reshape(n, -1, out_grad.shape[-1]).sum(1)
        d_abs = out_grad.abs().reshape(n, -1, out_grad.shape[-1]).sum(1)
    w = torch.ones(n, dtype=d.dtype, device=d.device) if c is None else c
    return w @ d, bias_grad, w.abs() @ d_abs


def _check_fails(got: Tensor, ref: Tensor, bound: Tensor) -> bool:
    """Whether ``got`` and ``ref`` differ by more than the rounding of sums bounded by ``bound`` allows."""
    if not bool(torch.isfinite(ref).all() and torch.isfinite(got).all()):
        return False  # NaN/inf gradients flow through; the statistics report them
    # float32 rounding of both sums is at most ~eps·Σ|terms| ≤ eps·bound; measured
    # differences stay below 4e-7·bound, so 1e-5·bound leaves a margin of 25
    tol = 1e-5 * bound + 1e-3 * ref.abs() + 1e-30
    return bool(((got - ref).abs() > tol).any())


def _sample_major(module: nn.Module, inp: Tensor, out_shape: torch.Size, k: int) -> bool:
    """Whether the layer's input and output carry the chunk's ``k`` samples at dim 0 (Linear ``[k, ..., d]``)."""
    if affine.supported_affine(module):
        return affine.affine_sample_major(module, inp, out_shape, k)
    if isinstance(module, nn.Conv2d):
        return inp.ndim == 4 and inp.shape[0] == k and len(out_shape) == 4 and out_shape[0] == k
    return inp.ndim >= 2 and inp.shape[0] == k and len(out_shape) >= 2 and out_shape[0] == k


def _add_check(sums: dict[str, list[Tensor]], key: str, parts: tuple[Tensor, Tensor, Tensor]) -> None:
    if key in sums:
        sums[key] = [a + b for a, b in zip(sums[key], parts)]
    else:
        sums[key] = list(parts)


def fast_layer_gram(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    selected: dict[str, nn.Parameter],
    loss_fn,
    *,
    chunk_size: int | None,
    force: str | None = None,
    groups: Tensor | None = None,
    num_groups: int = 0,
    forward: ForwardFn | None = None,
) -> tuple[Tensor | None, Tensor, set[str], list[LayerPlan]]:
    """Gram contribution of the supported layers among ``selected`` parameters.

    The model must already be in eval mode. Runs batched forward and backward
    passes ``chunk_size`` samples at a time; nothing is written to ``.grad``.

    Args:
        model: The model.
        inputs: ``[n, ...]``, or a tuple/list/dict of tensors with the sample
            dimension at dim 0, on the model's device.
        targets: ``[n, ...]`` on the model's device.
        selected: The selected parameters ``{name: parameter}``.
        loss_fn: Per-sample loss of one sample's output and target.
        chunk_size: Samples per forward/backward and per Gram block.
        force: ``"ghost"`` or ``"materialize"`` to override the per-layer choice.
        groups: Optional group index of each sample ``[n]`` (long, ``-1`` for
            none). With it, ``G`` is the ``[num_groups, num_groups]`` Gram matrix
            of the group sums ``Σ_{i in k} g_i``, taken from per-group weight
            gradients (``n·T·d_in·d_out`` per layer, like one backward) instead
            of the ``n×n`` products.
        num_groups: Number of groups ``K`` (with ``groups``).
        forward: ``forward(model, inputs_chunk) -> output [n, ...]``; default
            :func:`~lightning_phases.functional.per_sample.default_forward`.

    Returns:
        ``(G or None, losses [n], covered parameter names, plans)``: ``G`` is the
        float64 Gram contribution of the covered parameters (``None`` if no
        layer is covered); the remaining selected parameters need the exact
        engines (``vmap``, or the per-sample loop).

    Raises:
        LightningPhasesError: the forward does not return a tensor ``[n, ...]``, or
            ``loss_fn`` does not return one scalar per sample.
    """
    n = _num_samples(inputs)
    run_forward = forward if forward is not None else default_forward
    modules = {}
    for name, module in model.named_modules():
        if not supported_layer(module) or module.weight.dtype not in _CHECKABLE_DTYPES:
            continue
        names = [_pname(name, p) for p, _ in module.named_parameters(recurse=False)]
        if any(pn in selected for pn in names):
            modules[name] = module
    step = chunk_size or n
    recorder = _Recorder(modules)
    vloss = vmap(loss_fn)
    plans: dict[str, LayerPlan] = {}
    rejected: set[str] = set()
    reasons: dict[str, str] = {}  # a rejected layer's check failure, for the warning
    losses: list[Tensor] = []
    weights = _sample_weights(n)
    # Σ_i g_i (summed check) and Σ_i c_i g_i (weighted check) per layer, against autograd
    sums: dict[str, list[Tensor]] = {}
    try:
        for s in range(0, n, step):
            recorder.reset()
            x, y = _slice(inputs, s, s + step), targets[s : s + step]
            k = y.shape[0]
            with torch.enable_grad():
                out = _output_tensor(run_forward(model, x), k)
                chunk_losses = _batch_losses(vloss, loss_fn, out, y)
                live = [
                    m for m in modules if recorder.calls.get(m) == 1 and m in recorder.outputs and m not in rejected
                ]
                for m in modules:
                    if m not in live:
                        rejected.add(m)
                for m in list(live):
                    if not _sample_major(modules[m], recorder.inputs[m], recorder.outputs[m][0], k):
                        live.remove(m)
                        rejected.add(m)
                        reasons[m] = (
                            f"its input has shape {tuple(recorder.inputs[m].shape)} and its output "
                            f"{tuple(recorder.outputs[m][0])}, which do not hold the {k} samples at dim 0 "
                            "(a time-major or flattened layout)"
                        )
                checked = {
                    (m, kind): p
                    for m in live
                    for kind, p in (("weight", modules[m].weight), ("bias", modules[m].bias))
                    if p is not None and p.requires_grad
                }
                plain: tuple = ()
                weighted: tuple = ()
                if checked:
                    params = list(checked.values())
                    plain = torch.autograd.grad(chunk_losses.sum(), params, allow_unused=True, retain_graph=True)
                    c = weights[s : s + k].to(device=chunk_losses.device, dtype=chunk_losses.dtype)
                    weighted = torch.autograd.grad((chunk_losses * c).sum(), params, allow_unused=True)
                plain_grads = dict(zip(checked, plain))
                weighted_grads = dict(zip(checked, weighted))
            losses.append(chunk_losses.detach())
            for m in live:
                if recorder.inputs[m]._version != recorder.versions[m]:
                    rejected.add(m)  # input modified in place after the layer ran
                    continue
                g_out = recorder.output_grad(m)
                plan = plans.get(m)
                module = modules[m]
                has_w = _pname(m, "weight") in selected
                has_b = module.bias is not None and _pname(m, "bias") in selected
                if plan is None:
                    t, d_in, d_out = _layer_dims(module, recorder.inputs[m].shape, g_out.shape)
                    ghost, mat = _costs(n, t, d_in, d_out, has_w, has_b)
                    method = force or ("ghost" if ghost <= mat else "materialize")
                    plan = LayerPlan(
                        name=m,
                        param_names=[pn for pn in (_pname(m, "weight"), _pname(m, "bias")) if pn in selected],
                        method=method,
                        positions=t,
                        ghost_cost=ghost,
                        materialize_cost=mat,
                    )
                    plans[m] = plan
                plan.inputs.append(recorder.inputs[m])
                plan.out_grads.append(g_out)
                c = weights[s : s + k].to(device=g_out.device, dtype=g_out.dtype)
                for kind, grads_of, cw in (("sum", plain_grads, None), ("weighted", weighted_grads, c)):
                    if (m, "weight") in grads_of:
                        wg = grads_of[(m, "weight")]
                        wg = torch.zeros_like(module.weight) if wg is None else wg
                        _add_check(
                            sums, f"{m}/weight/{kind}", _projected_check(module, recorder.inputs[m], g_out, wg, cw)
                        )
                    if (m, "bias") in grads_of:
                        bg = grads_of[(m, "bias")]
                        bg = torch.zeros_like(module.bias) if bg is None else bg
                        _add_check(sums, f"{m}/bias/{kind}", _bias_check(module, g_out, bg, cw))
    finally:
        recorder.remove()
    for m in list(plans):
        if m in rejected:
            continue
        if any(_check_fails(*sums[f"{m}/{p}/sum"]) for p in ("weight", "bias") if f"{m}/{p}/sum" in sums):
            rejected.add(m)
            reasons[m] = (
                "its weight receives gradient from outside its own forward (weight tying or functional use): "
                "the recorded inputs and output gradients do not sum to its gradient"
            )
        elif any(_check_fails(*sums[f"{m}/{p}/weighted"]) for p in ("weight", "bias") if f"{m}/{p}/weighted" in sums):
            rejected.add(m)
            reasons[m] = (
                "its recorded inputs and output gradients do not give the per-sample gradients (the weighted "
                "check Σ_i c_i g_i failed): row i of its input or output is not sample i alone (sample axis not "
                "at dim 0, or samples coupled after the layer)"
            )
    if len(losses) and n > 1 and any(m not in rejected for m in plans):
        coupled = _coupled_samples(model, inputs, targets, run_forward, loss_fn, torch.cat(losses), step)
        if coupled is not None:
            for m in plans:
                if m not in rejected:
                    rejected.add(m)
                    reasons[m] = coupled
    for m in list(plans):
        if m in rejected:
            del plans[m]
    for m, why in reasons.items():
        warnings.warn(
            f"Layer '{m}' ({type(modules[m]).__name__}): {why}; its per-sample gradients are taken with the "
            "exact engine (vmap, or the per-sample loop) instead.",
            PhaseStatisticsWarning,
            stacklevel=3,
        )
    loss_vec = torch.cat(losses)
    if not plans:
        return None, loss_vec, set(), []
    size = n if groups is None else num_groups
    device = loss_vec.device
    gram = torch.zeros(size, size, dtype=torch.float64, device=device)
    for plan in plans.values():
        if groups is None:
            _accumulate(gram, modules[plan.name], plan, step)
        else:
            _accumulate_groups(gram, modules[plan.name], plan, groups.to(device), num_groups)
        plan.inputs.clear()
        plan.out_grads.clear()
    covered = {pn for plan in plans.values() for pn in plan.param_names}
    return gram, loss_vec, covered, list(plans.values())


def _batch_losses(vloss, loss_fn, out: Tensor, y: Tensor) -> Tensor:
    """Per-sample losses ``[k]`` of a batched output: ``vmap(loss_fn)``, or a loop if ``loss_fn`` cannot be vmapped."""
    message = (
        "loss_fn must return one scalar loss per sample (it receives the output of one sample, batch "
        "dimension removed, and that sample's target)"
    )
    try:
        batched = vloss(out, y)
    except Exception:  # noqa: BLE001 - e.g. .item() or data-dependent control flow in loss_fn
        losses = [loss_fn(out[i], y[i]) for i in range(out.shape[0])]
        if any(not isinstance(v, Tensor) or v.numel() != 1 for v in losses):
            raise LightningPhasesError(message + ".") from None
        return torch.stack([v.reshape(()) for v in losses])
    if not isinstance(batched, Tensor) or batched.numel() != out.shape[0]:
        shape = tuple(batched.shape[1:]) if isinstance(batched, Tensor) else type(batched).__name__
        raise LightningPhasesError(f"{message}; it returned {shape} per sample.")
    return batched.reshape(-1)


def _coupled_samples(
    model: nn.Module, inputs: Any, targets: Tensor, run_forward: ForwardFn, loss_fn, batched: Tensor, step: int
) -> str | None:
    """Why the batched losses of the first and last sample of the first chunk differ from one-sample runs, or None.

    The fast path reads per-sample gradients off one batched forward; that is
    only the per-sample gradient of the model if a sample's output does not
    depend on the other samples of the batch (cross-sample coupling before a
    layer is invisible to the gradient checks). Two single-sample forwards.
    """
    k = min(step, batched.shape[0])
    eps = torch.finfo(batched.dtype).eps if batched.dtype.is_floating_point else 1e-7
    with torch.no_grad():
        for i in sorted({0, k - 1}):
            out = _output_tensor(run_forward(model, _slice(inputs, i, i + 1)), 1)
            alone = loss_fn(out[0], targets[i]).reshape(())
            together = batched[i]
            if not (torch.isfinite(alone) and torch.isfinite(together)):
                continue
            if abs(float(alone) - float(together)) > 1000 * eps * (1.0 + abs(float(together))):
                return (
                    f"the loss of sample {i} is {float(together):.6g} in the batch but {float(alone):.6g} alone: "
                    "the model's output for one sample depends on the other samples (cross-sample coupling)"
                )
    return None


def _add_rows(gram: Tensor, rows: Tensor, si: int, ei: int) -> None:
    """Add a row block ``rows = [blocks (i, 0..i)]`` of a symmetric product to ``gram``.

    ``rows`` has shape ``[ei − si, ei]``: the products of samples ``si:ei``
    with samples ``0:ei``. The diagonal block is symmetrised (in the block's
    dtype) before it is added and the off-diagonal blocks are added at
    ``[i, j]`` and, transposed, at ``[j, i]``, so ``gram`` stays exactly
    symmetric whatever the rounding of the products.
    """
    diag = rows[:, si:ei]
    gram[si:ei, si:ei] += (diag + diag.T) / 2
    if si:
        off = rows[:, :si]
        gram[si:ei, :si] += off
        gram[:si, si:ei] += off.T


def _group_weight_grad(module: nn.Module, inp: Tensor, out_grad: Tensor) -> Tensor:
    """``Σ_i Σ_t δ_it a_itᵀ`` over the samples of ``inp``: the weight gradient of their summed loss."""
    if isinstance(module, nn.Conv2d):
        padding = 0 if module.padding == "valid" else module.padding
        return torch.nn.grad.conv2d_weight(  # type: ignore[attr-defined]
            inp, module.weight.shape, out_grad, stride=module.stride, padding=padding, dilation=module.dilation
        )
    d_in = inp.shape[-1]
    return out_grad.reshape(-1, out_grad.shape[-1]).T @ inp.reshape(-1, d_in)


def _accumulate_groups(gram: Tensor, module: nn.Module, plan: LayerPlan, groups: Tensor, num_groups: int) -> None:
    """Add one layer's contribution to the ``[K, K]`` Gram matrix of group-summed gradients.

    For each group the layer's weight (and bias) gradient of the group's
    summed loss is formed from the recorded inputs and output gradients --
    weight-gradient products costing about ``n·T·d_in·d_out`` together -- and
    the ``K`` flattened sums are multiplied in the layer's dtype and added
    (symmetrised) into the float64 accumulator. Linear layers gather
    the groups into one zero-padded batched product when the padding at most
    doubles the work; convolutions (and very unequal groups) take one
    weight-gradient product per group.
    """
    has_w = any(pn.endswith("weight") for pn in plan.param_names)
    has_b = any(pn.endswith("bias") for pn in plan.param_names)
    inp = plan.inputs[0] if len(plan.inputs) == 1 else torch.cat(plan.inputs)
    out_grad = plan.out_grads[0] if len(plan.out_grads) == 1 else torch.cat(plan.out_grads)
    keep = groups >= 0
    counts = torch.bincount(groups[keep], minlength=num_groups)
    present = counts.nonzero().squeeze(1)
    if present.numel() == 0:
        return
    n = inp.shape[0]
    largest = int(counts.max())
    conv = isinstance(module, nn.Conv2d)
    parts: list[Tensor] = []
    if affine.supported_affine(module):
        # per-sample gradients are cheap here (n·numel(x_i)); sum them per group
        jac = affine.affine_per_sample(module, inp, out_grad, has_w, has_b)
        sums = jac.new_zeros(num_groups, jac.shape[1]).index_add_(0, groups[keep], jac[keep])
        parts.append(sums[present])
    elif not conv and present.numel() * largest <= 2 * n:
        # one batched product over zero-padded groups: rows [k, slot] -> sample index (n = the zero row)
        order = torch.argsort(groups[keep], stable=True)
        members = keep.nonzero().squeeze(1)[order]
        kept_groups = groups[keep][order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(members.numel(), device=groups.device) - starts[kept_groups]
        rank = torch.full((num_groups,), -1, dtype=torch.long, device=groups.device)
        rank[present] = torch.arange(present.numel(), device=groups.device)
        index = torch.full((present.numel(), largest), n, dtype=torch.long, device=groups.device)
        index[rank[kept_groups], slot] = members
        a = torch.cat([inp.reshape(n, -1), inp.new_zeros(1, inp[0].numel())])[index]  # [K', m, T·d_in]
        d = torch.cat([out_grad.reshape(n, -1), out_grad.new_zeros(1, out_grad[0].numel())])[index]
        d_in, d_out = inp.shape[-1], out_grad.shape[-1]
        a = a.reshape(present.numel(), -1, d_in)
        d = d.reshape(present.numel(), -1, d_out)
        if has_w:
            parts.append(torch.bmm(d.transpose(1, 2), a).reshape(present.numel(), -1))
        if has_b:
            parts.append(d.sum(1))
    else:
        rows = []  # one flattened (weight, bias) gradient sum per present group
        for k in present.tolist():
            sel = (groups == k).nonzero().squeeze(1)
            inp_k, grad_k = inp.index_select(0, sel), out_grad.index_select(0, sel)
            row = []
            if has_w:
                row.append(_group_weight_grad(module, inp_k, grad_k).reshape(-1))
            if has_b:
                row.append(grad_k.sum([0, 2, 3]) if conv else grad_k.reshape(-1, grad_k.shape[-1]).sum(0))
            rows.append(torch.cat(row))
        parts.append(torch.stack(rows))
    mat = torch.cat(parts, dim=1)
    block = (mat @ mat.T).to(torch.float64)  # in the layer's dtype, like the n×n products
    gram[present[:, None], present[None, :]] += (block + block.T) / 2


def _accumulate(gram: Tensor, module: nn.Module, plan: LayerPlan, step: int) -> None:
    """Add one layer's Gram contribution to the float64 accumulator ``gram``.

    Products are computed in the layer's dtype, row block by row block over
    the lower triangle only (blocks of at most ``min(chunk_size, 256)``
    samples), and widened when added (see :func:`_add_rows`).
    """
    has_w = any(pn.endswith("weight") for pn in plan.param_names)
    has_b = any(pn.endswith("bias") for pn in plan.param_names)
    inp = plan.inputs[0] if len(plan.inputs) == 1 else torch.cat(plan.inputs)
    out_grad = plan.out_grads[0] if len(plan.out_grads) == 1 else torch.cat(plan.out_grads)
    n = inp.shape[0]
    if affine.supported_affine(module):
        # elementwise per-sample gradients [n, ≤ 2C], then the lower triangle of J Jᵀ (any chunk size)
        jac = affine.affine_per_sample(module, inp, out_grad, has_w, has_b)
        for si in range(0, n, _TRI_BLOCK):
            ei = min(si + _TRI_BLOCK, n)
            _add_rows(gram, jac[si:ei] @ jac[:ei].T, si, ei)
        return
    if plan.method == "materialize" and step >= n:
        # all per-sample gradients of this layer at once, then the lower triangle of J Jᵀ
        a, d = _as_positions(module, inp, out_grad)
        jac = _per_sample(a, d, has_w, has_b)
        del a, d
        for si in range(0, n, _TRI_BLOCK):
            ei = min(si + _TRI_BLOCK, n)
            _add_rows(gram, jac[si:ei] @ jac[:ei].T, si, ei)
        return
    if plan.method == "ghost" and plan.positions == 1:
        # (a_i·a_j + 1)(δ_i·δ_j), one row block at a time against all earlier samples
        a, d = _as_positions(module, inp, out_grad)
        a, d = a[:, 0], d[:, 0]
        block = max(1, min(step, _TRI_BLOCK))
        for si in range(0, n, block):
            ei = min(si + block, n)
            rows = d[si:ei] @ d[:ei].T
            if has_w:
                coef = a[si:ei] @ a[:ei].T
                if has_b:
                    coef += 1.0
                rows.mul_(coef)
            elif not has_b:
                rows.zero_()
            _add_rows(gram, rows, si, ei)
        return
    if plan.method == "ghost":
        block = max(1, min(step, _TRI_BLOCK, int(math.sqrt(_GHOST_BLOCK_ENTRIES) // max(plan.positions, 1))))
    else:
        block = step
    bounds = [(s, min(s + block, n)) for s in range(0, n, block)]
    for i, (si, ei) in enumerate(bounds):
        ai, di = _as_positions(module, inp[si:ei], out_grad[si:ei])
        ji = _per_sample(ai, di, has_w, has_b) if plan.method == "materialize" else None
        for j, (sj, ej) in enumerate(bounds[: i + 1]):
            if j == i:
                aj, dj, jj = ai, di, ji
            else:
                aj, dj = _as_positions(module, inp[sj:ej], out_grad[sj:ej])
                jj = _per_sample(aj, dj, has_w, has_b) if plan.method == "materialize" else None
            if plan.method == "materialize":
                blk = ji @ jj.T  # type: ignore[operator,union-attr]  # materialised: both set above
            else:
                blk = _ghost_block(ai, di, aj, dj, has_w, has_b)
            if j == i:
                gram[si:ei, si:ei] += (blk + blk.T) / 2
            else:
                gram[si:ei, sj:ej] += blk
                gram[sj:ej, si:ei] += blk.T
