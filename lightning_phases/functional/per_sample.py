"""Per-sample gradients and their Gram matrix, computed with ``torch.func``.

Every statistic of SPEC.md §1–§3 is a function of the n×n Gram matrix
``G_ij = g_i · g_j`` of the per-sample gradients ``g_i = ∇_w l_i`` of a probe set
(Feng & Tu 2021, section 2). This module computes ``g_i`` with
``torch.func.vmap`` over ``torch.func.grad`` of a ``functional_call`` of the
model: one batched call, no Python loop over samples.

Conventions:

* ``g_i`` is the gradient of sample *i*'s own loss ``l_i``, not scaled by
  ``1/n`` (a mean-reduced batch loss would scale it by ``1/n``).
* Per-sample gradients are meaningless for layers that mix samples in training
  mode (BatchNorm) and random for Dropout, so the model is evaluated in eval
  mode; each module's ``training`` flag is restored afterwards.
* Nothing here changes the model's parameters, buffers or ``.grad`` fields.

The per-sample loss ``loss_fn(output, target)`` receives the model output of
*one* sample (batch dimension removed, e.g. shape ``[C]``) and that sample's
target, and returns a scalar. The default is cross-entropy for ``C >= 2``
logits and the logistic loss for a single logit (targets in ``{0, 1}``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils import _pytree as pytree

from lightning_phases.errors import LightningPhasesError, ParameterSelectionError, UnsupportedModelError

__all__ = [
    "LossFn",
    "ForwardFn",
    "ParamSelection",
    "default_loss",
    "default_forward",
    "select_parameters",
    "per_sample_grads",
    "per_sample_grads_and_losses",
    "gradient_gram",
    "grouped_gradient_gram",
    "reduce_gram_to_groups",
    "eval_mode",
    "GRAM_METHODS",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(output_of_one_sample, target_of_one_sample) -> scalar loss``."""

ForwardFn = Callable[[nn.Module, Any], Tensor]
"""``forward(model, inputs) -> output [n, ...]``: how a batch of (pytree) inputs is fed to the model.

Called with the model and a chunk of the inputs (every tensor leaf sliced
along dim 0), e.g. ``lambda m, x: m(**x)["logits"]``. Default:
:func:`default_forward`."""

ParamSelection = Union[None, str, Iterable[str], Callable[[str, nn.Parameter], bool]]  # noqa: UP007 - a runtime alias
"""Which trainable parameters to differentiate: ``None`` (all), names or module
prefixes (``"fc1"`` selects ``fc1.weight`` and ``fc1.bias``), or a predicate
``(name, parameter) -> bool``."""


def default_loss(output: Tensor, target: Tensor) -> Tensor:
    """Loss of one sample: cross-entropy on ``C >= 2`` logits, logistic loss on one logit.

    Args:
        output: Model output of one sample, shape ``[C]`` (``C >= 2`` logits),
            ``[1]`` or ``[]`` (one logit).
        target: Class index (``C >= 2``) or a label in ``{0, 1}`` (one logit).

    Returns:
        The scalar loss ``l_i``.
    """
    if output.ndim == 0 or output.shape[-1] == 1:
        logit = output.reshape(())
        return F.binary_cross_entropy_with_logits(logit, target.reshape(()).to(logit.dtype))
    return F.cross_entropy(output.reshape(1, -1), target.reshape(1).long())


def default_forward(model: nn.Module, inputs: Any) -> Tensor:
    """Feed ``inputs`` to ``model``: ``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple or list,
    ``model(**inputs)`` for a dict.

    Args:
        model: The model.
        inputs: A tensor ``[n, ...]``, or a tuple/list/dict of them (nested containers are passed as they are).

    Returns:
        Whatever the model returns; the engines need a tensor ``[n, ...]``.
    """
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _tensor_leaves(inputs: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, Tensor)]


def _slice(inputs: Any, start: int, stop: int) -> Any:
    """``inputs`` with every tensor leaf sliced to samples ``start:stop`` along dim 0."""
    if isinstance(inputs, Tensor):
        return inputs[start:stop]
    return pytree.tree_map(lambda leaf: leaf[start:stop] if isinstance(leaf, Tensor) else leaf, inputs)


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    return pytree.tree_map(lambda leaf: leaf.to(device) if isinstance(leaf, Tensor) else leaf, inputs)


def _num_samples(inputs: Any) -> int:
    """``n``, the common dim-0 size of every tensor leaf of ``inputs``; a clear error otherwise."""
    if isinstance(inputs, Tensor):
        if inputs.ndim == 0:
            raise ValueError("inputs needs a leading sample dimension; got a 0-d tensor.")
        return inputs.shape[0]
    leaves, _ = pytree.tree_flatten_with_path(inputs)
    sizes: dict[str, int] = {}
    for path, leaf in leaves:
        if not isinstance(leaf, Tensor):
            continue
        where = "inputs" + pytree.keystr(path)
        if leaf.ndim == 0:
            raise ValueError(f"{where} is a 0-d tensor; every tensor in inputs needs the sample dimension at dim 0.")
        sizes[where] = leaf.shape[0]
    if not sizes:
        raise TypeError(
            f"inputs must be a tensor or a tuple/list/dict holding tensors; got {type(inputs).__name__} without any."
        )
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"every tensor in inputs must have the same number of samples at dim 0; got {listed}.")
    return next(iter(sizes.values()))


class _Forward(nn.Module):
    """Holds the model (as submodule ``model``) and calls ``forward(model, inputs)``.

    ``torch.func.functional_call`` only calls a module's own ``forward``; this
    wrapper lets it run a custom forward. Parameter names gain the prefix
    ``model.``.
    """

    def __init__(self, model: nn.Module, forward: ForwardFn) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_fn", forward)

    def forward(self, inputs: Any) -> Tensor:
        return self._fn(self.model, inputs)


def _output_tensor(out: Any, n: int) -> Tensor:
    """Check that a forward returned a tensor ``[n, ...]``; a clear error otherwise."""
    if not isinstance(out, Tensor):
        raise LightningPhasesError(
            f"the model (or forward=) returned a {type(out).__name__}, not a tensor of outputs [n, ...]. Pass "
            "forward= that picks the logits, e.g. forward=lambda m, x: m(x)[0] for a tuple or "
            'forward=lambda m, x: m(x)["logits"] for a dict.'
        )
    if out.ndim == 0 or out.shape[0] != n:
        raise LightningPhasesError(
            f"the model output has shape {tuple(out.shape)} but the inputs hold {n} samples; the output must have "
            "the sample dimension at dim 0 (pass forward= that returns [n, ...], e.g. transposes a time-major output)."
        )
    return out


def select_parameters(model: nn.Module, params: ParamSelection = None) -> dict[str, nn.Parameter]:
    """Pick the trainable parameters to differentiate.

    Args:
        model: The model.
        params: ``None`` for every parameter with ``requires_grad``; a name or
            module prefix, or an iterable of them; or a predicate
            ``(name, parameter) -> bool``.

    Returns:
        ``{name: parameter}`` in ``model.named_parameters()`` order.

    Raises:
        ParameterSelectionError: if the selection matches nothing, or a given
            name matches no trainable parameter.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ParameterSelectionError(
            f"{type(model).__name__} has no parameter with requires_grad=True; there is nothing to take gradients of."
        )
    available = ", ".join(name for name, _ in trainable[:20]) + (" ..." if len(trainable) > 20 else "")
    if params is None:
        return dict(trainable)
    if callable(params):
        selected = {name: p for name, p in trainable if params(name, p)}
        if not selected:
            raise ParameterSelectionError(f"params={params!r} selected no trainable parameter. Available: {available}.")
        return selected
    names = [params] if isinstance(params, str) else list(params)
    if not names or not all(isinstance(n, str) for n in names):
        raise ParameterSelectionError(
            f"params must be None, a name, an iterable of names, or a predicate; got {params!r}."
        )
    chosen: set[str] = set()
    for wanted in names:
        hits = [name for name, _ in trainable if name == wanted or name.startswith(wanted + ".")]
        if not hits:
            raise ParameterSelectionError(
                f"params entry {wanted!r} matches no trainable parameter of "
                f"{type(model).__name__}. Available: {available}."
            )
        chosen.update(hits)
    return {name: p for name, p in trainable if name in chosen}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def _locate_failing_module(model: nn.Module, run: Callable[[], object]) -> str:
    """Run ``run`` with hooks that record which module was executing when it raised."""
    stack: list[str] = []
    last: list[str] = []
    names = {m: (n or type(model).__name__) for n, m in model.named_modules()}
    handles = []

    def pre(module: nn.Module, args: object) -> None:
        stack.append(names.get(module, type(module).__name__))

    def post(module: nn.Module, args: object, output: object) -> None:
        if stack:
            stack.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        run()
    except Exception:  # noqa: BLE001 - we only want to know where it failed
        last = list(stack)
    finally:
        for h in handles:
            h.remove()
    if not last:
        return "<outside any submodule: the loss function or a functional op in forward()>"
    return last[-1]


def _validate_batch(inputs: Any, targets: Tensor, chunk_size: int | None) -> int:
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor [n, ...]; got {type(targets).__name__}.")
    if targets.ndim == 0:
        raise ValueError("inputs and targets need a leading sample dimension.")
    n = _num_samples(inputs)
    if targets.shape[0] != n:
        raise ValueError(f"inputs has {n} samples but targets has {targets.shape[0]}; they must match along dim 0.")
    if n == 0:
        raise ValueError("inputs is empty: per-sample gradients need at least one sample.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}.")
    return n


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


class _Engine:
    """Per-sample gradients of one model, forward, loss and parameter selection (``vmap`` over ``grad``)."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn | None, params: ParamSelection, forward: ForwardFn | None = None
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else default_loss
        self.forward = forward if forward is not None else default_forward
        self.selected = {name: p.detach() for name, p in select_parameters(model, params).items()}
        self.device = _model_device(model)
        self._wrapper = _Forward(model, self.forward)

        def sample_loss(
            weights: dict[str, Tensor], leaves: list[Tensor], spec: Any, others: list[Any], y: Tensor
        ) -> tuple[Tensor, Tensor]:
            # one sample: every tensor leaf gets its batch dim of 1 back, non-tensor leaves pass unchanged
            it = iter(leaves)
            flat = [next(it).unsqueeze(0) if o is _TENSOR else o for o in others]
            sample = pytree.tree_unflatten(flat, spec)
            out = functional_call(self._wrapper, {"model." + k: w for k, w in weights.items()}, (sample,))
            if not isinstance(out, Tensor):
                _output_tensor(out, 1)
            loss = self.loss_fn(out[0], y)
            if loss.ndim != 0:
                loss = loss.reshape(())
            return loss, loss.detach()

        self._vmapped = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, None, None, 0))

    def _call(self, inputs: Any, targets: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        flat, spec = pytree.tree_flatten(inputs)
        leaves = [leaf for leaf in flat if isinstance(leaf, Tensor)]
        others = [_TENSOR if isinstance(leaf, Tensor) else leaf for leaf in flat]
        return self._vmapped(self.selected, leaves, spec, others, targets)

    def __call__(self, inputs: Any, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(J [n, P], losses [n])`` for one chunk."""
        inputs = _to_device(inputs, self.device)
        targets = targets.to(self.device)
        n = targets.shape[0]
        try:
            with torch.no_grad():
                grads, losses = self._call(inputs, targets)
        except LightningPhasesError:
            raise
        except Exception as err:  # torch.func raises plain RuntimeErrors
            where = _locate_failing_module(self.model, lambda: self._call(_slice(inputs, 0, 1), targets[:1]))
            raise UnsupportedModelError(
                f"torch.func could not compute per-sample gradients (failed in module '{where}'): "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
                "Fixes: make that module's forward vmap-compatible (no .item(), no in-place "
                "updates of buffers, no data-dependent Python control flow), replace BatchNorm "
                "with GroupNorm/LayerNorm if it must run in training mode, or pass a loss_fn "
                "that works on one sample's output."
            ) from err
        flat = torch.cat([grads[name].reshape(n, -1) for name in self.selected], dim=1)
        return flat, losses


_TENSOR = object()  # placeholder for a tensor leaf in the flattened inputs


def per_sample_grads_and_losses(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    loss_fn: LossFn | None = None,
    params: ParamSelection = None,
    chunk_size: int | None = None,
    forward: ForwardFn | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample gradients and per-sample losses.

    Same arguments as :func:`per_sample_grads`.

    Returns:
        ``(grads, losses)``: ``grads`` of shape ``[n, P]`` and ``losses`` of shape ``[n]``.
    """
    n = _validate_batch(inputs, targets, chunk_size)
    engine = _Engine(model, loss_fn, params, forward)
    step = n if chunk_size is None else chunk_size
    with eval_mode(model):
        parts = [engine(_slice(inputs, s, s + step), targets[s : s + step]) for s in range(0, n, step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def per_sample_grads(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    loss_fn: LossFn | None = None,
    params: ParamSelection = None,
    chunk_size: int | None = None,
    forward: ForwardFn | None = None,
) -> Tensor:
    """Per-sample gradients ``g_i = ∇_w l_i`` of a probe set, flattened.

    Uses ``torch.func.vmap(torch.func.grad(...))`` over a ``functional_call`` of
    the model, in eval mode, without touching the model's state or ``.grad``.

    Args:
        model: Any ``nn.Module`` mapping a batch ``[n, ...]`` to outputs ``[n, ...]``.
        inputs: Probe inputs: a tensor ``[n, ...]``, or a tuple/list/dict (nested
            allowed) whose tensor leaves all have the sample dimension ``n`` at
            dim 0; non-tensor leaves are passed unchanged.
        targets: Probe targets, shape ``[n, ...]``.
        loss_fn: Per-sample loss ``(output [C], target) -> scalar``; default
            :func:`default_loss`.
        params: Which trainable parameters to differentiate (see
            :func:`select_parameters`); default all.
        chunk_size: If set, process at most this many samples at once (bounds
            memory; the result is identical).
        forward: ``forward(model, inputs_chunk) -> output [n, ...]``; default
            :func:`default_forward` (``model(x)``, ``model(*x)``, ``model(**x)``).

    Returns:
        Tensor of shape ``[n, P]``: row ``i`` is ``g_i``, the selected
        parameters' gradients concatenated in ``named_parameters()`` order.

    Raises:
        ParameterSelectionError: ``params`` matches nothing.
        UnsupportedModelError: ``torch.func`` cannot run through a module; the
            message names the module and a fix.
    """
    return per_sample_grads_and_losses(
        model, inputs, targets, loss_fn=loss_fn, params=params, chunk_size=chunk_size, forward=forward
    )[0]


def _symmetric(block: Tensor) -> Tensor:
    """A square product ``J Jᵀ`` in float64, made exactly symmetric."""
    block = block.to(torch.float64)
    return (block + block.T) / 2


GRAM_METHODS = ("auto", "vmap", "ghost", "materialize")


def gradient_gram(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    loss_fn: LossFn | None = None,
    params: ParamSelection = None,
    chunk_size: int | None = None,
    method: str = "auto",
    forward: ForwardFn | None = None,
) -> tuple[Tensor, Tensor]:
    """Gram matrix ``G_ij = g_i · g_j`` of the per-sample gradients, and the losses.

    ``method="auto"`` (default) takes the per-layer fast path of
    :mod:`lightning_phases.functional.layer_gram` for ``nn.Linear`` and
    ``nn.Conv2d`` parameters -- the Gram contribution from the layer's inputs
    and output gradients of one batched forward and backward, choosing per
    layer the cheaper of the "ghost" product ``(a_i·a_j)(δ_i·δ_j)`` and
    materialising that layer's per-sample gradients -- and the ``vmap``
    engine for every other parameter. ``"vmap"`` sends everything through
    ``vmap(grad(functional_call))``; ``"ghost"`` and ``"materialize"`` force
    one fast method for every supported layer. All methods agree to rounding.

    With the ``vmap`` engine and no ``chunk_size`` the ``[n, P]`` per-sample
    gradient matrix ``J`` is formed once and ``G = J Jᵀ``. With
    ``chunk_size = k`` the Gram matrix is accumulated block by block, so at
    most ``2·k·P`` gradient entries are held at once, at the price of about
    ``(n/k + 1)/2`` times the gradient computations. Peak memory is roughly
    ``8n²`` bytes for ``G``, plus ``2·k·P`` gradient entries (``vmap``
    parameters) or the inputs and output gradients of the fast layers for all
    ``n`` samples, plus the activations of ``k`` samples.

    Args:
        model: Any ``nn.Module`` mapping ``[n, ...]`` to ``[n, ...]``.
        inputs: Probe inputs: a tensor ``[n, ...]`` or a tuple/list/dict of
            tensors with the sample dimension at dim 0 (see :func:`per_sample_grads`).
        targets: Probe targets ``[n, ...]``.
        loss_fn: Per-sample loss; default :func:`default_loss`.
        params: Parameter selection (see :func:`select_parameters`).
        chunk_size: Block size ``k`` (see above); ``None`` processes all at once.
        method: ``"auto"``, ``"vmap"``, ``"ghost"`` or ``"materialize"``.
        forward: ``forward(model, inputs_chunk) -> output [n, ...]``; default
            :func:`default_forward`.

    Returns:
        ``(G, losses)``: ``G`` of shape ``[n, n]`` in float64, exactly
        symmetric (products accumulated in the gradients' dtype, then
        widened), ``losses`` of shape ``[n]`` in the model's dtype.

    Raises:
        ValueError: unknown ``method`` or mismatched inputs.
        ParameterSelectionError: ``params`` matches nothing.
        UnsupportedModelError: ``torch.func`` cannot run through a module.
    """
    return _gram(model, inputs, targets, loss_fn, params, chunk_size, method, None, 0, forward)


def grouped_gradient_gram(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    groups: Tensor,
    *,
    num_groups: int | None = None,
    loss_fn: LossFn | None = None,
    params: ParamSelection = None,
    chunk_size: int | None = None,
    method: str = "auto",
    forward: ForwardFn | None = None,
) -> tuple[Tensor, Tensor]:
    """Gram matrix of group-summed per-sample gradients, ``H_kl = G_k · G_l`` with ``G_k = Σ_{i: groups_i = k} g_i``.

    Equal to ``S G Sᵀ`` for the ``[K, n]`` membership matrix ``S`` and the
    Gram matrix ``G`` of :func:`gradient_gram`, but on the per-layer fast
    path the ``n×n`` products are never formed: each group's summed weight
    gradient comes from the recorded layer inputs and output gradients
    (``n·T·d_in·d_out`` per layer, about one backward pass) and only the
    ``K×K`` products of the sums are taken. Parameters outside the fast path
    go through :func:`gradient_gram`'s ``vmap`` engine and are reduced with
    ``S``. Used for the per-class segment gradients of SPEC.md §3.

    Args:
        model, inputs, targets, loss_fn, params, chunk_size, method, forward: as
            for :func:`gradient_gram`.
        groups: Group index of each sample ``[n]`` (integers in ``[0, K)``;
            ``-1`` leaves a sample out of every group).
        num_groups: ``K``; default ``groups.max() + 1``.

    Returns:
        ``(H, losses)``: ``H`` of shape ``[K, K]`` in float64, exactly
        symmetric; ``losses`` of shape ``[n]``. An empty group has a zero row.

    Raises:
        ValueError: bad ``groups``, ``num_groups`` or ``method``, mismatched inputs.
        ParameterSelectionError: ``params`` matches nothing.
        UnsupportedModelError: ``torch.func`` cannot run through a module.
    """
    n = _validate_batch(inputs, targets, chunk_size)
    groups = torch.as_tensor(groups)
    if groups.ndim != 1 or groups.shape[0] != n or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(
            f"groups must be an integer tensor of shape [{n}]; got {groups.dtype} of shape {tuple(groups.shape)}."
        )
    groups = groups.long()
    if n and int(groups.min()) < -1:
        raise ValueError("groups must be >= -1 (-1 leaves a sample out).")
    k = (int(groups.max()) + 1 if n else 0) if num_groups is None else num_groups
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or (n and int(groups.max()) >= k):
        raise ValueError(f"num_groups must be an int >= 1 larger than every group index; got {num_groups!r}.")
    return _gram(model, inputs, targets, loss_fn, params, chunk_size, method, groups, k, forward)


def reduce_gram_to_groups(gram: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """``S G Sᵀ`` (exactly symmetric, float64): the Gram matrix of group sums from the ``n×n`` one.

    Args:
        gram: Per-sample-gradient Gram matrix ``[n, n]``.
        groups: Group index of each sample ``[n]`` (``-1``: in no group).
        num_groups: ``K``.

    Returns:
        ``[K, K]`` float64, ``H_kl = Σ_{i in k, j in l} G_ij``; what
        :func:`grouped_gradient_gram` computes without the ``n×n`` matrix.
    """
    member = torch.zeros(num_groups, groups.shape[0], dtype=torch.float64, device=gram.device)
    groups = groups.to(gram.device)
    keep = groups >= 0
    member[groups[keep], keep.nonzero().squeeze(1)] = 1.0
    out = member @ gram.to(torch.float64) @ member.T
    return (out + out.T) / 2


def _gram(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: LossFn | None,
    params: ParamSelection,
    chunk_size: int | None,
    method: str,
    groups: Tensor | None,
    num_groups: int,
    forward: ForwardFn | None,
) -> tuple[Tensor, Tensor]:
    if method not in GRAM_METHODS:
        raise ValueError(f"method must be one of {GRAM_METHODS}; got {method!r}.")
    n = _validate_batch(inputs, targets, chunk_size)

    def reduce(gram: Tensor) -> Tensor:
        return gram if groups is None else reduce_gram_to_groups(gram, groups, num_groups)

    if method == "vmap":
        gram, losses = _vmap_gram(model, inputs, targets, loss_fn, params, chunk_size, n, forward)
        return reduce(gram), losses
    from lightning_phases.functional.layer_gram import fast_layer_gram

    selected = select_parameters(model, params)
    device = _model_device(model)
    x, y = _to_device(inputs, device), targets.to(device)
    with eval_mode(model):
        try:
            fast, losses, covered, _ = fast_layer_gram(
                model,
                x,
                y,
                selected,
                loss_fn if loss_fn is not None else default_loss,
                chunk_size=chunk_size,
                force=None if method == "auto" else method,
                groups=groups,
                num_groups=num_groups,
                forward=forward,
            )
        except LightningPhasesError:
            raise
        except Exception as err:  # noqa: BLE001 - the vmap engine reports unsupported models clearly
            warnings.warn(
                f"The per-layer fast Gram path failed ({type(err).__name__}: {err}); "
                "using the vmap engine for every parameter.",
                RuntimeWarning,
                stacklevel=3,
            )
            fast, covered = None, set()
    rest = [name for name in selected if name not in covered]
    if fast is None:
        gram, losses = _vmap_gram(model, inputs, targets, loss_fn, rest, chunk_size, n, forward)
        return reduce(gram), losses
    if rest:
        other, _ = _vmap_gram(model, inputs, targets, loss_fn, rest, chunk_size, n, forward)
        fast = fast + reduce(other).to(fast.device)
    return fast, losses


def _vmap_gram(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: LossFn | None,
    params: ParamSelection,
    chunk_size: int | None,
    n: int,
    forward: ForwardFn | None = None,
) -> tuple[Tensor, Tensor]:
    engine = _Engine(model, loss_fn, params, forward)
    with eval_mode(model):
        if chunk_size is None or chunk_size >= n:
            jac, losses = engine(inputs, targets)
            return _symmetric(jac @ jac.T), losses
        blocks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
        gram: Tensor | None = None
        loss_parts: list[Tensor] = []
        for bi, (s, e) in enumerate(blocks):
            jac_i, loss_i = engine(_slice(inputs, s, e), targets[s:e])
            loss_parts.append(loss_i)
            if gram is None:
                gram = torch.empty(n, n, dtype=torch.float64, device=jac_i.device)
            gram[s:e, s:e] = _symmetric(jac_i @ jac_i.T)
            for s2, e2 in blocks[:bi]:
                jac_j, _ = engine(_slice(inputs, s2, e2), targets[s2:e2])
                block = (jac_i @ jac_j.T).to(torch.float64)
                gram[s:e, s2:e2] = block
                gram[s2:e2, s:e] = block.T
        assert gram is not None  # n >= 1 guarantees one block
        return gram, torch.cat(loss_parts)
