"""ModelAdapter: how the probing callbacks feed a batch to the user's model and read its output.

One adapter serves every probe computation (the Gram matrices, the per-sample
losses, the error rates), so the numbers of all callbacks come from the same
inputs, forward and loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import default_collate

from lightning_phases._validation import check_choice
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional.cleansing import logit_margin
from lightning_phases.functional.per_sample import LossFn, default_forward, default_loss, eval_mode

__all__ = ["ModelAdapter", "Task", "Unpack", "OutputSelector", "default_unpack"]

Task = Literal["auto", "multiclass", "binary", "multilabel", "regression"]
TASKS: tuple[str, ...] = get_args(Task)
#: The tasks whose targets are classes: error rates and segment gradients exist for these.
CLASS_TASKS = ("multiclass", "binary")

Unpack = Callable[[Any], tuple[Any, Tensor]]
OutputSelector = int | str | Callable[[Any], Tensor] | None
Forward = Callable[[nn.Module, Any], Any]


def default_unpack(batch: Any) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` from a collated batch: its first two entries, or the ``x``/``y``-like keys of a dict."""
    if isinstance(batch, Mapping):
        for xk, yk in (("x", "y"), ("input", "target"), ("inputs", "targets")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
        raise LightningPhasesError(
            f"Cannot find inputs and targets in a dict batch with keys {sorted(batch)}; pass "
            "unpack=lambda batch: (batch[...], batch[...])."
        )
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise LightningPhasesError(
        f"Cannot split a batch of type {type(batch).__name__} into (inputs, targets); pass unpack=..."
    )


def _tree_map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of a tensor / tuple / list / dict tree."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(_tree_map(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_tree_map(fn, v) for v in tree)
    return tree


def multilabel_loss(output: Tensor, target: Tensor) -> Tensor:
    """Loss of one sample for multi-label targets: binary cross-entropy with logits, summed over labels."""
    return F.binary_cross_entropy_with_logits(output.reshape(-1), target.reshape(-1).to(output.dtype), reduction="sum")


def regression_loss(output: Tensor, target: Tensor) -> Tensor:
    """Loss of one sample for regression: the mean squared error over its outputs (``MSELoss`` of one sample)."""
    return F.mse_loss(output.reshape(-1), target.reshape(-1).to(output.dtype))


def _is_binary_valued(t: Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


class ModelAdapter:
    """The model interface of the probe: batch → ``(inputs, targets)`` → model output → per-sample loss.

    Nothing in the user's ``LightningModule`` has to change:

    * **Collate**: probe items are collated with the training DataLoader's
      own ``collate_fn`` (set by :class:`~lightning_phases.callbacks.Probe`;
      ``default_collate`` otherwise), so a padding collate for
      variable-length sequences works.
    * **Unpack**: ``unpack(batch) -> (inputs, targets)``; default the first
      two entries of a tuple/list batch or the ``x``/``y`` (``input``/``target``,
      ``inputs``/``targets``) keys of a dict batch.
    * **Inputs** may be a tensor, a tuple/list or a dict of tensors (sample
      dim first); by default a tuple is passed positionally (``model(*inputs)``)
      and a dict as keywords (``model(**inputs)``).
    * **Forward**: ``forward(pl_module, inputs) -> output`` replaces the call
      of the module, e.g. ``forward=lambda m, x: m.backbone(x)`` for a
      LightningModule without ``forward()`` or to probe a submodule.
    * **Output**: pick the logits out of a tuple or dict output: an int
      index, a str key, or a callable ``output -> Tensor``.
    * **Dtype**: under a true-precision plugin (``"bf16-true"``,
      ``"16-true"``, ``"64-true"``) floating input tensors are cast to the
      parameters' dtype; integer tensors are left as they are.
    * **Task** and loss: ``"multiclass"`` (``C ≥ 2`` logits, integer targets,
      cross-entropy), ``"binary"`` (one logit, 0/1 targets, logistic loss),
      ``"multilabel"`` (float 0/1 targets shaped like the logits, BCE with
      logits summed over labels), ``"regression"`` (float targets, mean
      squared error). ``"auto"`` infers it from the first probe batch where
      that is unambiguous and otherwise raises an error asking for
      ``task=`` or ``loss_fn=``. A ``loss_fn`` replaces the task's loss.

    Public methods for other callbacks' loss passes (e.g. a cleanser):
    :meth:`model_inputs`, :meth:`to_module`, :meth:`outputs`,
    :meth:`per_sample_losses`.

    Args:
        unpack: ``batch -> (inputs, targets)``.
        forward: ``(pl_module, inputs) -> output``.
        output: Selector of the logits in the output (int, str or callable).
        task: See above.
        loss_fn: Per-sample loss ``(output_of_one_sample, target) -> scalar``.
    """

    def __init__(
        self,
        *,
        unpack: Unpack | None = None,
        forward: Forward | None = None,
        output: OutputSelector = None,
        task: Task = "auto",
        loss_fn: LossFn | None = None,
    ) -> None:
        for name, fn in (("unpack", unpack), ("forward", forward), ("loss_fn", loss_fn)):
            if fn is not None and not callable(fn):
                raise LightningPhasesError(f"{name} must be a callable or None; got {fn!r}.")
        if output is not None and (
            isinstance(output, bool) or not isinstance(output, (int, str)) and not callable(output)
        ):
            raise LightningPhasesError(
                f"output must be None, an int index, a str key or a callable output -> Tensor; got {output!r}."
            )
        check_choice("task", task, TASKS)
        self.unpack = unpack or default_unpack
        self.forward = forward
        self.output = output
        self.task: str = task
        self.loss_fn = loss_fn
        self.collate_fn: Callable[[list[Any]], Any] = default_collate
        self.cast_dtype: torch.dtype | None = None
        self.resolved_task: str | None = None  # set (and checked against the data) by the first resolve_task

    # ------------------------------------------------------------------ binding to a run
    def bind(self, *, collate_fn: Callable[[list[Any]], Any] | None, cast_dtype: torch.dtype | None) -> None:
        """Use this collate function and input dtype (the Probe calls it at the start of each fit)."""
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self.cast_dtype = cast_dtype

    def reset(self) -> None:
        """Forget the resolved task (a new fit may train on other data)."""
        self.resolved_task = None

    # ------------------------------------------------------------------ batch → inputs
    def collate(self, items: list[Any]) -> Any:
        """A batch from dataset items, with the training DataLoader's ``collate_fn``."""
        return self.collate_fn(items)

    def model_inputs(self, batch: Any) -> tuple[Any, Tensor]:
        """``(inputs, targets)`` of a collated batch (``unpack``); targets must be a tensor ``[n, ...]``."""
        inputs, targets = self.unpack(batch)
        if not isinstance(targets, Tensor):
            targets = torch.as_tensor(targets)
        return inputs, targets

    def to_module(self, tree: Any, module: nn.Module, *, cast: bool = True) -> Any:
        """Move every tensor of ``tree`` to the module's device; with ``cast``, floating tensors to the input dtype."""
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = self.cast_dtype if cast else None

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return _tree_map(move, tree)

    # ------------------------------------------------------------------ inputs → outputs
    def outputs(self, module: nn.Module, inputs: Any) -> Tensor:
        """The logits ``[n, ...]`` of ``inputs``: ``forward`` (or the module's call) and the ``output`` selector."""
        out = self.forward(module, inputs) if self.forward is not None else default_forward(module, inputs)
        return self.select(out)

    def select(self, out: Any) -> Tensor:
        """Apply the ``output`` selector to a model output."""
        sel = self.output
        if sel is None:
            if isinstance(out, Tensor):
                return out
            what = f"a dict with keys {sorted(out)}" if isinstance(out, Mapping) else f"a {type(out).__name__}"
            raise LightningPhasesError(
                f"The model returned {what}, not a tensor of logits; pass output=<index or key> (e.g. output=0 or "
                "output='logits') or output=callable to pick the logits."
            )
        if callable(sel):
            picked = sel(out)
        else:
            try:
                picked = out[sel]
            except (KeyError, IndexError, TypeError) as err:
                raise LightningPhasesError(
                    f"output={sel!r} does not select anything in the model output of type {type(out).__name__}."
                ) from err
        if not isinstance(picked, Tensor):
            raise LightningPhasesError(f"output={sel!r} selected a {type(picked).__name__}, not a tensor of logits.")
        return picked

    def engine_forward(self, module: nn.Module, inputs: Any) -> Tensor:
        """The ``forward=`` of the functional engines: :meth:`outputs`."""
        return self.outputs(module, inputs)

    # ------------------------------------------------------------------ task and loss
    def resolve_task(self, output: Tensor, targets: Tensor) -> str:
        """The task of this output and these targets (inferred once, then fixed for the fit).

        Returns ``"custom"`` when ``task="auto"``, a ``loss_fn`` is given and
        the targets do not tell the task (then no error rates are logged).

        Raises:
            LightningPhasesError: the task is ambiguous and no ``loss_fn`` is
                given, or the targets do not fit the given task.
        """
        if self.resolved_task is not None:
            return self.resolved_task
        n = output.shape[0]
        width = output[0].numel() if n else 0
        shaped_like = targets.numel() == output.numel()
        integer = not targets.is_floating_point() and not targets.is_complex()
        task: str | None = None
        if self.task != "auto":
            task = self.task
            problem = None
            if task == "multiclass" and (width < 2 or targets.numel() != n):
                problem = f"needs C >= 2 logits and one integer target per sample (outputs {tuple(output.shape)})"
            elif task == "binary" and (width != 1 or targets.numel() != n):
                problem = "needs one logit and one 0/1 target per sample"
            elif task in ("multilabel", "regression") and not shaped_like:
                problem = "needs targets shaped like the outputs"
            if problem is not None:
                raise LightningPhasesError(
                    f"task={task!r} {problem}; got outputs of shape {tuple(output.shape)} and targets of shape "
                    f"{tuple(targets.shape)}. Pass the right task= or a loss_fn=."
                )
        elif integer:
            if width >= 2 and targets.numel() == n:
                task = "multiclass"
            elif width == 1 and targets.numel() == n and _is_binary_valued(targets):
                task = "binary"
            elif width >= 2 and shaped_like and _is_binary_valued(targets):
                task = "multilabel"
        elif shaped_like:
            if _is_binary_valued(targets):
                task = "binary" if width == 1 else "multilabel"
            else:
                task = "regression"
        if task is None:
            if self.loss_fn is not None:
                task = "custom"
            else:
                raise LightningPhasesError(
                    f"Cannot tell the task from outputs of shape {tuple(output.shape)} and {targets.dtype} targets "
                    f"of shape {tuple(targets.shape)}; pass task='multiclass'|'binary'|'multilabel'|'regression' "
                    "or a per-sample loss_fn=."
                )
        self.resolved_task = task
        return task

    def loss(self) -> LossFn:
        """The per-sample loss: ``loss_fn`` if given, else the resolved task's."""
        if self.loss_fn is not None:
            return self.loss_fn
        if self.resolved_task == "multilabel":
            return multilabel_loss
        if self.resolved_task == "regression":
            return regression_loss
        return default_loss

    def margins(self, output: Tensor, targets: Tensor) -> Tensor | None:
        """Per-sample logit margins ``[n]`` (float64, :func:`~lightning_phases.functional.logit_margin`), or ``None``.

        Only where the outputs are the logits of the loss: the resolved task is multi-class or binary
        and no ``loss_fn`` is given (a custom loss may read its outputs as anything).
        """
        if self.loss_fn is not None or self.resolved_task not in ("multiclass", "binary"):
            return None
        return logit_margin(output.reshape(output.shape[0], -1), targets.reshape(-1))

    def errors(self, output: Tensor, targets: Tensor) -> Tensor | None:
        """Per-sample error ``[n]`` (float64) against the given targets, or ``None`` where it has no meaning.

        Multi-class: ``argmax ≠ y``; binary: ``(logit > 0) ≠ y``; multi-label:
        the fraction of wrong labels of each sample; regression: ``None``.
        """
        task = self.resolved_task
        n = output.shape[0]
        if task == "multiclass":
            wrong = output.reshape(n, -1).argmax(-1) != targets.reshape(-1).long()
        elif task == "binary":
            wrong = (output.reshape(-1) > 0).long() != targets.reshape(-1).long()
        elif task == "multilabel":
            wrong = ((output.reshape(n, -1) > 0) != (targets.reshape(n, -1) > 0.5)).to(torch.float64).mean(1)
        else:
            return None
        return wrong.to(torch.float64)

    def per_sample_losses(self, module: nn.Module, inputs: Any, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-sample losses ``[n]`` and errors ``[n]`` (or ``None``), float64; eval mode, no gradients.

        ``inputs`` and ``targets`` must already be on the module's device (:meth:`to_module`).
        Resolves the task on first use.
        """
        with torch.no_grad(), eval_mode(module):
            out = self.outputs(module, inputs)
            self.resolve_task(out, targets)
            losses = torch.vmap(self.loss())(out, targets).reshape(-1)
            errors = self.errors(out, targets)
        return losses.to(torch.float64), errors
