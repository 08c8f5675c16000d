"""Per-sample gradients and their Gram matrix: ``torch.func``, a per-layer fast path, and an exact loop.

Every statistic of SPEC.md §1–§3 is a function of the n×n Gram matrix
``G_ij = g_i · g_j`` of the per-sample gradients ``g_i = ∇_w l_i`` of a probe set
(Feng & Tu 2021, section 2). Three engines compute them, all exact:

* ``vmap``: ``torch.func.vmap`` over ``torch.func.grad`` of a ``functional_call``
  of the model (through the ``forward`` callable): one batched call, no Python
  loop over samples.
* the per-layer fast path of :mod:`lightning_phases.functional.layer_gram`
  (``method="auto"``, the default), for ``nn.Linear`` and ``nn.Conv2d``; every
  layer proves that it computes the per-sample quantity, otherwise its
  parameters go to the exact engines with a warning.
* ``loop``: one single-sample forward and ``torch.autograd.grad`` per sample.
  It runs whatever the model runs on a batch of one (GRU/RNN, in-place ops,
  data-dependent control flow). ``"auto"`` and ``"vmap"`` fall back to it, with
  one :class:`~lightning_phases.errors.PhaseStatisticsWarning` naming the
  module, when ``torch.func`` cannot run the model; it costs about ``n``
  single-sample forward and backward passes.

Conventions:

* ``g_i`` is the gradient of sample *i*'s own loss ``l_i``, not scaled by
  ``1/n`` (a mean-reduced batch loss would scale it by ``1/n``).
* Per-sample gradients are meaningless for layers that mix samples in training
  mode (BatchNorm) and random for Dropout, so the model is evaluated in eval
  mode; each module's ``training`` flag is restored afterwards.
* **The BatchNorm rule.** A BatchNorm without running statistics
  (``track_running_stats=False``; any ``torch.nn.modules.batchnorm._BatchNorm``,
  ``SyncBatchNorm`` included, whose ``running_mean``/``running_var`` is
  ``None``) normalises with the batch's statistics even in eval mode, so a
  sample's per-sample gradient is not defined. Every method (``auto``,
  ``vmap``, ``ghost``, ``materialize``, ``loop``) and :func:`per_sample_grads`
  refuse such a model up front with
  :class:`~lightning_phases.errors.UnsupportedModelError` naming the module;
  the fix is ``track_running_stats=True`` (eval mode then uses the running
  statistics) or ``nn.GroupNorm``/``nn.LayerNorm``.
* Inputs are a tensor ``[n, ...]`` or a (nested) tuple/list/dict of tensors
  that all hold the ``n`` samples at dim 0 (non-tensor leaves are passed
  unchanged); ``forward(model, inputs_chunk)`` (default :func:`default_forward`:
  ``model(x)``, ``model(*x)``, ``model(**x)``) returns the output ``[n, ...]``.
* Nothing here changes the model's parameters, buffers, ``.grad`` fields or
  modes; the loop engine restores the global random state.
* An out-of-memory error becomes :class:`~lightning_phases.errors.ProbeMemoryError`,
  which suggests a smaller ``chunk_size`` or probe size.

The per-sample loss ``loss_fn(output, target)`` receives the model output of
*one* sample (batch dimension removed, e.g. shape ``[C]``) and that sample's
target, and returns a scalar. The default is cross-entropy for ``C >= 2``
logits and the logistic loss for a single logit (targets in ``{0, 1}``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from lightning_phases.errors import (
    LightningPhasesError,
    ParameterSelectionError,
    PhaseStatisticsWarning,
    ProbeMemoryError,
    UnsupportedModelError,
)

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

    _fn: ForwardFn

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
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _check_batch_statistics(model: nn.Module) -> None:
    """Refuse a model with a BatchNorm that normalises with batch statistics even in eval mode.

    A ``_BatchNorm`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy variants)
    whose running statistics are ``None`` (``track_running_stats=False``) uses
    the statistics of the batch it is given in eval mode too, so a sample's
    output depends on the other samples and its per-sample gradient is not
    defined: batched engines would measure a cross-sample quantity, per-sample
    engines one of batches of one. Every method refuses it the same way.

    Raises:
        UnsupportedModelError: naming the module and the fix.
    """
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and (module.running_mean is None or module.running_var is None):
            label = name or type(model).__name__
            raise UnsupportedModelError(
                f"module '{label}' ({type(module).__name__}) has no running statistics (track_running_stats=False): "
                "it normalises with the statistics of the batch even in eval mode, so one sample's output depends "
                "on the other samples and per-sample gradients are not defined. Fix: construct it with "
                "track_running_stats=True (eval mode then uses the running statistics), or replace it with "
                "nn.GroupNorm / nn.LayerNorm, which normalise each sample on its own."
            )


def _is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (CUDA/MPS ``torch.OutOfMemoryError`` or a CPU allocation failure)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if (oom is not None and isinstance(err, oom)) or isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _memory_error(err: BaseException, what: str, n: int, chunk_size: int | None) -> ProbeMemoryError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ProbeMemoryError(
        f"out of memory in the {what} (n = {n} samples, chunk_size = {chunk_size}): {first}. "
        "Pass a smaller chunk_size (it bounds the samples whose gradients and activations are held at once; "
        "the result is the same) or use a smaller probe_size."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _describe(model: nn.Module, where: str) -> str:
    """``'name' (Type)`` for a module name returned by :func:`_locate_failing_module`."""
    if where.startswith("<"):
        return where
    try:
        module = model.get_submodule(where) if where != type(model).__name__ else model
    except AttributeError:
        return f"'{where}'"
    return f"'{where}' ({type(module).__name__})"


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
        """Return ``(J [n, P], losses [n])`` for one chunk (inputs and targets on the model's device)."""
        with torch.no_grad():
            grads, losses = self._call(inputs, targets)
        n = targets.shape[0]
        return torch.cat([grads[name].reshape(n, -1) for name in self.selected], dim=1), losses


_TENSOR = object()  # placeholder for a tensor leaf in the flattened inputs


class _LoopEngine:
    """Exact per-sample gradients by a Python loop: one single-sample forward and ``torch.autograd.grad`` each.

    Runs anything the model runs on a batch of one (GRU/RNN, in-place ops,
    data-dependent control flow); nothing is written to ``.grad``, and the
    global random state is restored afterwards.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn | None, params: ParamSelection, forward: ForwardFn | None = None
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else default_loss
        self.forward = forward if forward is not None else default_forward
        self.selected = select_parameters(model, params)
        self.device = _model_device(model)

    def sample(self, inputs: Any, targets: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """``(g_i [P], l_i)`` of sample ``i`` of a chunk."""
        params = list(self.selected.values())
        with torch.enable_grad():
            out = _output_tensor(self.forward(self.model, _slice(inputs, i, i + 1)), 1)
            loss = self.loss_fn(out[0], targets[i])
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise LightningPhasesError(
                    f"loss_fn returned {shape} for one sample; it must return one scalar loss l_i per sample "
                    "(it receives the output of one sample, batch dimension removed, and that sample's target)."
                )
            loss = loss.reshape(())
            grads: tuple[Tensor | None, ...]
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            else:  # the loss does not depend on any selected parameter
                grads = tuple(None for _ in params)
        row = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]).detach()
        return row, loss.detach()

    def __call__(self, inputs: Any, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(J [k, P], losses [k])`` for one chunk (inputs and targets on the model's device)."""
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            parts = [self.sample(inputs, targets, i) for i in range(targets.shape[0])]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


class _ExactEngine:
    """The exact per-sample engines: ``vmap`` first, the per-sample loop when ``torch.func`` cannot run the model.

    Falls back from ``vmap`` to the loop only when the loop can compute the
    first sample of the failing chunk (so a ``loss_fn`` of the wrong shape or a
    model that fails on one sample is refused, not retried), with one
    :class:`PhaseStatisticsWarning` naming the module and the cost. Errors:
    out of memory becomes :class:`ProbeMemoryError`; a model that fails on one
    sample becomes :class:`UnsupportedModelError` naming the module.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        params: ParamSelection,
        forward: ForwardFn | None,
        method: str,
        n: int,
        chunk_size: int | None,
    ) -> None:
        self.model = model
        self.n = n
        self.chunk_size = chunk_size
        self.loop = _LoopEngine(model, loss_fn, params, forward)
        self.vmap = _Engine(model, loss_fn, params, forward) if method != "loop" else None
        self.device = self.loop.device

    def __call__(self, inputs: Any, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(J [k, P], losses [k])`` for one chunk."""
        inputs = _to_device(inputs, self.device)
        targets = targets.to(self.device)
        if self.vmap is not None:
            try:
                return self.vmap(inputs, targets)
            except LightningPhasesError:
                raise
            except Exception as err:  # noqa: BLE001 - torch.func raises plain RuntimeErrors; decided below
                if _is_out_of_memory(err):
                    raise _memory_error(err, "vmap engine", self.n, self.chunk_size) from err
                self._fall_back(err, inputs, targets)
        try:
            return self.loop(inputs, targets)
        except LightningPhasesError:
            raise
        except Exception as err:  # noqa: BLE001 - reported with the failing module
            if _is_out_of_memory(err):
                raise _memory_error(err, "per-sample loop engine", self.n, self.chunk_size) from err
            raise self._refusal(err, inputs, targets) from err

    def _fall_back(self, err: Exception, inputs: Any, targets: Tensor) -> None:
        """Switch to the loop engine if it can run the model, with one warning; else refuse."""
        try:
            self.loop.sample(inputs, targets, 0)
        except LightningPhasesError:
            raise
        except Exception as loop_err:  # noqa: BLE001 - the model fails on one sample: not vmap's fault
            if _is_out_of_memory(loop_err):
                raise _memory_error(loop_err, "per-sample loop engine", self.n, self.chunk_size) from loop_err
            raise self._refusal(loop_err, inputs, targets) from loop_err
        vmapped = self.vmap
        assert vmapped is not None
        where = _locate_failing_module(self.model, lambda: vmapped._call(_slice(inputs, 0, 1), targets[:1]))
        k = self.n if self.chunk_size is None else min(self.chunk_size, self.n)
        blocks = -(-self.n // k)
        passes = self.n * (blocks + 1) // 2 if blocks > 1 else self.n
        warnings.warn(
            f"torch.func cannot compute per-sample gradients through module {_describe(self.model, where)} "
            f"({_first_line(err)}); using the exact per-sample loop engine instead: about {passes} single-sample "
            f"forward and backward passes for n = {self.n} samples, expect it to be many times slower than vmap "
            "(GRU/RNN, in-place ops and data-dependent control flow cannot be vmapped).",
            PhaseStatisticsWarning,
            stacklevel=4,
        )
        self.vmap = None

    def _refusal(self, err: Exception, inputs: Any, targets: Tensor) -> UnsupportedModelError:
        where = _locate_failing_module(self.model, lambda: self.loop.sample(inputs, targets, 0))
        return UnsupportedModelError(
            f"per-sample gradients failed in module {_describe(self.model, where)} ({_first_line(err)}): the model "
            "raised when run on one sample, as every per-sample engine runs it (forward(model, inputs[i:i+1]), "
            "then loss_fn(output[0], targets[i])). Fix: make that module accept a batch of one sample, or pass a "
            "forward= (e.g. one that adds what the model needs, or picks the logits) and a loss_fn= that work on "
            "one sample."
        )


def per_sample_grads_and_losses(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    loss_fn: LossFn | None = None,
    params: ParamSelection = None,
    chunk_size: int | None = None,
    forward: ForwardFn | None = None,
    method: Literal["vmap", "loop"] = "vmap",
) -> tuple[Tensor, Tensor]:
    """Per-sample gradients and per-sample losses.

    Same arguments as :func:`per_sample_grads`.

    Returns:
        ``(grads, losses)``: ``grads`` of shape ``[n, P]`` and ``losses`` of shape ``[n]``.
    """
    if method not in ("vmap", "loop"):
        raise LightningPhasesError(f"method must be 'vmap' or 'loop'; got {method!r}.")
    n = _validate_batch(inputs, targets, chunk_size)
    _check_batch_statistics(model)
    engine = _ExactEngine(model, loss_fn, params, forward, method, n, chunk_size)
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
    method: Literal["vmap", "loop"] = "vmap",
) -> Tensor:
    """Per-sample gradients ``g_i = ∇_w l_i`` of a probe set, flattened.

    Uses ``torch.func.vmap(torch.func.grad(...))`` over a ``functional_call`` of
    the model, in eval mode, without touching the model's state or ``.grad``.
    Where ``torch.func`` cannot run the model (GRU/RNN, in-place ops,
    data-dependent control flow) the exact per-sample loop engine takes over
    with one :class:`~lightning_phases.errors.PhaseStatisticsWarning`.

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
        method: ``"vmap"`` (falls back to the loop where it cannot run) or
            ``"loop"`` (one single-sample forward and backward per sample).

    Returns:
        Tensor of shape ``[n, P]``: row ``i`` is ``g_i``, the selected
        parameters' gradients concatenated in ``named_parameters()`` order.

    Raises:
        ParameterSelectionError: ``params`` matches nothing.
        UnsupportedModelError: a BatchNorm without running statistics, or the
            model fails on one sample; the message names the module and a fix.
        ProbeMemoryError: out of memory (pass a smaller ``chunk_size``).
    """
    return per_sample_grads_and_losses(
        model, inputs, targets, loss_fn=loss_fn, params=params, chunk_size=chunk_size, forward=forward, method=method
    )[0]


def _symmetric(block: Tensor) -> Tensor:
    """A square product ``J Jᵀ`` in float64, made exactly symmetric."""
    block = block.to(torch.float64)
    return (block + block.T) / 2


_PRODUCT_COLUMNS = 1 << 18  # parameters per float64 slice of the J Jᵀ product (bounds its extra memory)


def _product64(a: Tensor, b: Tensor) -> Tensor:
    """``a bᵀ`` accumulated in float64 over slices of the parameter axis.

    ``a``, ``b``: ``[n_a, P]``, ``[n_b, P]`` (any floating dtype). A float32 product of 11 M-entry
    gradients (resnet18) is off by up to 1.5e-4 relative, depending on the BLAS threads; in float64 the
    extra memory is ``(n_a + n_b) · 2^18`` doubles per slice.
    """
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for k in range(0, a.shape[1], _PRODUCT_COLUMNS):
        out += a[:, k : k + _PRODUCT_COLUMNS].to(torch.float64) @ b[:, k : k + _PRODUCT_COLUMNS].to(torch.float64).T
    return out


GramMethod = Literal["auto", "vmap", "ghost", "materialize", "loop"]
GRAM_METHODS: tuple[str, ...] = ("auto", "vmap", "ghost", "materialize", "loop")


def gradient_gram(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    loss_fn: LossFn | None = None,
    params: ParamSelection = None,
    chunk_size: int | None = None,
    method: GramMethod = "auto",
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
    one fast method for every supported layer; ``"loop"`` runs one
    single-sample forward and ``torch.autograd.grad`` per sample (exact for
    anything the model runs on one sample; about ``n`` passes). All methods
    agree to rounding.

    Every fast layer proves that its recorded inputs and output gradients give
    the per-sample gradients (sample axis at dim 0, and a weighted check
    ``Σ_i c_i g_i = ∇(Σ_i c_i l_i)`` with fixed pseudo-random ``c``); a layer
    that fails goes to the exact engines with a warning naming it. Where
    ``torch.func`` cannot run the model (GRU/RNN, in-place ops,
    data-dependent control flow), ``"auto"`` and ``"vmap"`` fall back to the
    loop engine with one warning. A BatchNorm without running statistics is
    refused by every method (see the module docstring).

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
        method: ``"auto"``, ``"vmap"``, ``"ghost"``, ``"materialize"`` or ``"loop"``.
        forward: ``forward(model, inputs_chunk) -> output [n, ...]``; default
            :func:`default_forward`.

    Returns:
        ``(G, losses)``: ``G`` of shape ``[n, n]`` in float64, exactly
        symmetric (products accumulated in the gradients' dtype, then
        widened), ``losses`` of shape ``[n]`` in the model's dtype.

    Raises:
        ValueError: unknown ``method`` or mismatched inputs.
        ParameterSelectionError: ``params`` matches nothing.
        UnsupportedModelError: a BatchNorm without running statistics, or the
            model fails on one sample; the message names the module and a fix.
        ProbeMemoryError: out of memory (pass a smaller ``chunk_size``).
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
    method: GramMethod = "auto",
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
        UnsupportedModelError: as for :func:`gradient_gram`.
        ProbeMemoryError: out of memory (pass a smaller ``chunk_size``).
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
    _check_batch_statistics(model)

    def reduce(gram: Tensor) -> Tensor:
        return gram if groups is None else reduce_gram_to_groups(gram, groups, num_groups)

    if method in ("vmap", "loop"):
        gram, losses = _exact_gram(model, inputs, targets, loss_fn, params, chunk_size, n, forward, method)
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
            raise  # a bad output or loss: no engine can fix it
        except Exception as err:  # noqa: BLE001 - narrowed below
            if _is_out_of_memory(err):
                raise _memory_error(err, "per-layer fast path", n, chunk_size) from err
            # The batched forward/backward of the fast path failed where single samples may not (e.g. a
            # loss_fn that torch.func cannot vmap over the batch): the exact engines run every parameter, and
            # raise an error naming the module if they cannot either.
            warnings.warn(
                f"The per-layer fast Gram path could not run the batched forward and backward "
                f"({_first_line(err)}); using the exact per-sample engines for every parameter.",
                PhaseStatisticsWarning,
                stacklevel=3,
            )
            fast, covered = None, set()
    rest = [name for name in selected if name not in covered]
    if fast is None:
        gram, losses = _exact_gram(model, inputs, targets, loss_fn, rest, chunk_size, n, forward, "vmap")
        return reduce(gram), losses
    if rest:
        other, _ = _exact_gram(model, inputs, targets, loss_fn, rest, chunk_size, n, forward, "vmap")
        fast = fast + reduce(other).to(fast.device)
    return fast, losses


def _exact_gram(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    loss_fn: LossFn | None,
    params: ParamSelection,
    chunk_size: int | None,
    n: int,
    forward: ForwardFn | None,
    method: str,
) -> tuple[Tensor, Tensor]:
    """``G = J Jᵀ`` (float64) from an exact engine, block by block when ``chunk_size < n``."""
    engine = _ExactEngine(model, loss_fn, params, forward, method, n, chunk_size)
    with eval_mode(model):
        if chunk_size is None or chunk_size >= n:
            jac, losses = engine(inputs, targets)
            return _symmetric(_product64(jac, jac)), losses
        blocks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
        gram: Tensor | None = None
        loss_parts: list[Tensor] = []
        for bi, (s, e) in enumerate(blocks):
            jac_i, loss_i = engine(_slice(inputs, s, e), targets[s:e])
            loss_parts.append(loss_i)
            if gram is None:
                gram = torch.empty(n, n, dtype=torch.float64, device=jac_i.device)
            gram[s:e, s:e] = _symmetric(_product64(jac_i, jac_i))
            for s2, e2 in blocks[:bi]:
                jac_j, _ = engine(_slice(inputs, s2, e2), targets[s2:e2])
                block = _product64(jac_i, jac_j)
                gram[s:e, s2:e2] = block
                gram[s2:e2, s:e] = block.T
        assert gram is not None  # n >= 1 guarantees one block
        return gram, torch.cat(loss_parts)
