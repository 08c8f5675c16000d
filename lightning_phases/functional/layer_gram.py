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
``vmap`` engine of :mod:`lightning_phases.functional.per_sample`.

Safety checks, each of which sends the layer back to the ``vmap`` engine:
the module must be called exactly once per forward, its input must not be
modified in place after the call, and the per-sample gradients implied by
``(a, δ)`` must sum to the autograd gradient of ``Σ_i l_i`` for its weight
(this catches weights used outside the module's own forward, e.g. tying).

Memory: the layer inputs and output gradients of all ``n`` probe samples are
kept (one batch's activations for the fast layers); Gram blocks are formed
``chunk_size`` samples at a time, so materialised per-sample gradients never
exceed ``2·chunk_size·d_in·d_out`` entries per layer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from lightning_phases.errors import PhaseStatisticsWarning

__all__ = ["LayerPlan", "fast_layer_gram", "supported_layer"]

_DEFAULT_BLOCK = 256
_GHOST_BLOCK_ENTRIES = 1 << 24  # max entries of one [kT, kT] ghost product


def supported_layer(module: nn.Module) -> bool:
    """Whether ``module`` has a fast Gram path (Linear, or Conv2d with groups=1 and zero padding)."""
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros" and not (
            isinstance(module.padding, str) and module.padding != "valid"
        )
    return False


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
    """Forward hooks that record each candidate layer's input and a leaf added to its output."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.calls: dict[str, int] = {}
        self.inputs: dict[str, Tensor] = {}
        self.versions: dict[str, int] = {}
        self.leaves: dict[str, Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1 or not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
                return output
            self.inputs[name] = args[0].detach()
            self.versions[name] = args[0]._version
            leaf = torch.zeros_like(output, requires_grad=True)
            self.leaves[name] = leaf
            return output + leaf

        return hook

    def reset(self) -> None:
        self.calls.clear()
        self.inputs.clear()
        self.versions.clear()
        self.leaves.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _pname(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def _unfold(module: nn.Conv2d, x: Tensor) -> Tensor:
    padding = 0 if module.padding == "valid" else module.padding
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)


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
    return torch.cat(parts, dim=1)


def _ghost_block(ai: Tensor, di: Tensor, aj: Tensor, dj: Tensor, weight: bool, bias: bool) -> Tensor:
    """Ghost Gram block ``Σ_{t,s} [(a_it·a_js) + bias](δ_it·δ_js)`` for two sample blocks."""
    ni, t = ai.shape[0], ai.shape[1]
    nj = aj.shape[0]
    if t == 1:
        dd = di[:, 0] @ dj[:, 0].T
        aa = ai[:, 0] @ aj[:, 0].T if weight else torch.zeros_like(dd)
        return dd * (aa * float(weight) + float(bias))
    dd = di.reshape(ni * t, -1) @ dj.reshape(nj * t, -1).T
    coef = ai.reshape(ni * t, -1) @ aj.reshape(nj * t, -1).T if weight else torch.zeros_like(dd)
    if bias:
        coef = coef + 1.0
    return (dd * coef).reshape(ni, t, nj, t).sum(dim=(1, 3))


def _costs(n: int, t: int, d_in: int, d_out: int, weight: bool, bias: bool) -> tuple[float, float]:
    ghost = float(n) ** 2 * t**2 * ((d_in if weight else 0) + d_out)
    p = (d_in * d_out if weight else 0) + (d_out if bias else 0)
    materialize = float(n) * t * p + float(n) ** 2 * p
    return ghost, materialize


def _layer_dims(module: nn.Module, inp_shape: torch.Size, out_shape: torch.Size) -> tuple[int, int, int]:
    """``(T, d_in, d_out)`` from one sample's input and output shapes."""
    if isinstance(module, nn.Conv2d):
        k = math.prod(module.kernel_size)
        return math.prod(out_shape[2:]), module.in_channels * k, module.out_channels
    return math.prod(inp_shape[1:-1]) if len(inp_shape) > 2 else 1, module.in_features, module.out_features


def fast_layer_gram(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    selected: dict[str, nn.Parameter],
    loss_fn,
    *,
    chunk_size: int | None,
    force: str | None = None,
) -> tuple[Tensor | None, Tensor, set[str], list[LayerPlan]]:
    """Gram contribution of the supported layers among ``selected`` parameters.

    The model must already be in eval mode. Runs batched forward and backward
    passes ``chunk_size`` samples at a time; nothing is written to ``.grad``.

    Args:
        model: The model.
        inputs: ``[n, ...]`` on the model's device.
        targets: ``[n, ...]`` on the model's device.
        selected: The selected parameters ``{name: parameter}``.
        loss_fn: Per-sample loss of one sample's output and target.
        chunk_size: Samples per forward/backward and per Gram block.
        force: ``"ghost"`` or ``"materialize"`` to override the per-layer choice.

    Returns:
        ``(G or None, losses [n], covered parameter names, plans)``: ``G`` is the
        float64 Gram contribution of the covered parameters (``None`` if no
        layer is covered); the remaining selected parameters need the ``vmap``
        engine.
    """
    n = inputs.shape[0]
    modules = {}
    for name, module in model.named_modules():
        if not supported_layer(module):
            continue
        names = [_pname(name, p) for p, _ in module.named_parameters(recurse=False)]
        if any(pn in selected for pn in names):
            modules[name] = module
    step = chunk_size or n
    recorder = _Recorder(modules)
    vloss = vmap(loss_fn)
    plans: dict[str, LayerPlan] = {}
    rejected: set[str] = set()
    losses: list[Tensor] = []
    # Accumulate Σ_i g_i per covered weight to verify against autograd.
    sums: dict[str, Tensor] = {}
    auto: dict[str, Tensor] = {}
    try:
        for s in range(0, n, step):
            recorder.reset()
            x, y = inputs[s : s + step], targets[s : s + step]
            with torch.enable_grad():
                out = model(x)
                chunk_losses = vloss(out, y).reshape(-1)
                live = [m for m in modules if recorder.calls.get(m) == 1 and m in recorder.leaves and m not in rejected]
                for m in modules:
                    if m not in live:
                        rejected.add(m)
                live = [m for m in live if m not in rejected]
                weights = {m: modules[m].weight for m in live if _pname(m, "weight") in selected}
                wanted = [recorder.leaves[m] for m in live] + list(weights.values())
                grads = (
                    torch.autograd.grad(chunk_losses.sum(), wanted, allow_unused=True) if wanted else []
                )
            losses.append(chunk_losses.detach())
            for k, m in enumerate(live):
                if recorder.inputs[m]._version != recorder.versions[m]:
                    rejected.add(m)  # input modified in place after the layer ran
                    continue
                g_out = grads[k]
                if g_out is None:
                    g_out = torch.zeros_like(recorder.leaves[m])
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
                plan.out_grads.append(g_out.detach())
                if has_w:
                    a, d = _as_positions(module, recorder.inputs[m], g_out.detach())
                    partial = torch.einsum("nto,nti->oi", d, a)
                    sums[m] = partial if m not in sums else sums[m] + partial
                    wg = grads[len(live) + list(weights).index(m)]
                    wg = torch.zeros_like(module.weight) if wg is None else wg.reshape(module.weight.shape[0], -1)
                    auto[m] = wg if m not in auto else auto[m] + wg
    finally:
        recorder.remove()
    for m in list(plans):
        if m in sums:
            ref, got = auto[m], sums[m]
            finite = bool(torch.isfinite(ref).all() and torch.isfinite(got).all())
            if finite and not torch.allclose(got, ref, rtol=1e-3, atol=1e-6 * max(1.0, float(ref.abs().max()))):
                rejected.add(m)
                warnings.warn(
                    f"Layer '{m}': its weight receives gradient from outside its own forward (weight "
                    "tying or functional use); its per-sample gradients are taken with vmap instead.",
                    PhaseStatisticsWarning,
                    stacklevel=3,
                )
        if m in rejected:
            del plans[m]
    loss_vec = torch.cat(losses)
    if not plans:
        return None, loss_vec, set(), []
    gram = torch.zeros(n, n, dtype=torch.float64, device=inputs.device)
    for plan in plans.values():
        _accumulate(gram, modules[plan.name], plan, step)
        plan.inputs.clear()
        plan.out_grads.clear()
    covered = {pn for plan in plans.values() for pn in plan.param_names}
    return gram, loss_vec, covered, list(plans.values())


def _accumulate(gram: Tensor, module: nn.Module, plan: LayerPlan, step: int) -> None:
    """Add one layer's Gram contribution, block by block over samples."""
    has_w = any(pn.endswith("weight") for pn in plan.param_names)
    has_b = any(pn.endswith("bias") for pn in plan.param_names)
    inp = torch.cat(plan.inputs)
    out_grad = torch.cat(plan.out_grads)
    n = inp.shape[0]
    if plan.method == "ghost":
        t = plan.positions
        block = max(1, min(step, int(math.sqrt(_GHOST_BLOCK_ENTRIES) // max(t, 1))))
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
                blk = (ji @ jj.T).to(torch.float64)
            else:
                blk = _ghost_block(ai, di, aj, dj, has_w, has_b).to(torch.float64)
            if j == i:
                gram[si:ei, si:ei] += (blk + blk.T) / 2
            else:
                gram[si:ei, sj:ej] += blk
                gram[sj:ej, si:ei] += blk.T
