"""Sharpness-Aware Minimization (Foret et al. 2021) for Lightning's automatic optimization."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_phases.errors import LightningPhasesError

__all__ = ["SAM"]

_NO_CLOSURE = (
    "SAM.step() needs a closure: SAM evaluates the gradient twice (at w, then at w + e(w)), so it must be "
    "able to recompute the loss. Call `sam.step(closure)` with a closure that zeroes the gradients (via "
    "`sam.zero_grad()`), computes the loss, calls `backward()` and returns the loss. In Lightning use automatic "
    "optimization and return SAM from `configure_optimizers`; note that precision='16-mixed' on GPU is not "
    "supported, because Lightning's GradScaler runs the closure itself and calls step() without one: use "
    "precision='bf16-mixed' or '32-true'."
)

_NO_ZERO_GRAD = (
    "The closure passed to SAM.step() did not call `sam.zero_grad()`, so the second gradient (at w + e(w)) "
    "would be added to the first. With Lightning this happens under gradient accumulation "
    "(`accumulate_grad_batches > 1`), which SAM does not support: set accumulate_grad_batches=1 and use a "
    "larger batch. In your own loop, call `sam.zero_grad()` at the start of the closure."
)


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization around any base optimizer (Foret et al. 2021; ASAM: Kwon et al. 2021).

    One step with gradient ``g(w) = ∇L(w)``:

    1. ``e(w) = ρ · T² g / ‖T g‖₂`` with ``T = I`` (SAM) or ``T = diag(|w|)`` (``adaptive=True``, ASAM);
       the norm runs over every parameter of every group.
    2. ``w ← w + e(w)``, recompute the gradient there, ``w ← w − e(w)`` (restored exactly).
    3. The base optimizer steps from ``w`` with the gradient taken at ``w + e(w)``.

    ``step(closure)`` runs the closure twice, so it works unchanged in Lightning's automatic
    optimization: return ``SAM(self.parameters(), lr=0.1)`` from ``configure_optimizers``.

    * **BatchNorm.** During the second closure call the running statistics (``running_mean``,
      ``running_var``, ``num_batches_tracked``) of every BatchNorm layer that runs are restored after
      its forward, so they are updated once per step, by the forward at ``w``.
    * **Schedulers.** ``param_groups`` *is* the base optimizer's list (same object), so
      ``torch.optim.lr_scheduler.StepLR(sam, ...)`` and Lightning's scheduler configs act on the base
      optimizer's learning rate.
    * **Checkpoints.** ``state_dict()`` is the base optimizer's (momentum buffers and all) plus SAM's
      own settings; ``state`` is the base optimizer's ``state`` dict.
    * **Gradient clipping.** Lightning clips after every closure call. Clipping by norm leaves ``e(w)``
      unchanged (it only rescales ``g``); the base step then uses the clipped gradient at
      ``w + e(w)``. Clipping by value also changes the direction of ``e(w)``.
    * **Precision.** ``32-true`` and ``bf16-mixed`` work (the closure runs inside autocast).
      ``16-mixed`` on a GPU uses a GradScaler, which calls ``step()`` without a closure: SAM raises
      :class:`LightningPhasesError` saying so. On CPU Lightning turns ``16-mixed`` into ``bf16-mixed``.
    * **Gradient accumulation** is not supported: the closure must zero the gradients (Lightning's
      does unless ``accumulate_grad_batches > 1``); SAM raises if it does not.
    * **Callbacks and logging.** ``training_step``, ``on_after_backward`` and
      ``on_before_optimizer_step`` run twice per step; what ``training_step`` logs last is at ``w + e(w)``.
      ``step`` returns the loss at ``w``.

    Args:
        params: Parameters or parameter groups, as for any optimizer.
        base_optimizer: The optimizer class that takes the actual step (default ``torch.optim.SGD``).
        rho: Neighbourhood radius ``ρ > 0``.
        adaptive: Use ASAM's scale-invariant neighbourhood ``T = diag(|w|)``.
        **base_kwargs: Passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay``, ...).

    Raises:
        LightningPhasesError: For ``rho`` not a finite number ``> 0``, ``adaptive`` not a bool, or a
            ``base_optimizer`` that is not an optimizer class.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < math.inf:
            raise LightningPhasesError(
                f"rho is the neighbourhood radius: pass a finite float > 0 (0.05 is the usual value); got {rho!r}."
            )
        if not isinstance(adaptive, bool):
            raise LightningPhasesError(f"adaptive must be True or False (a bool, not a string); got {adaptive!r}.")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise LightningPhasesError(
                f"base_optimizer must be a torch.optim.Optimizer class such as torch.optim.SGD; got {base_optimizer!r}."
            )
        if base_optimizer is SAM:
            raise LightningPhasesError("base_optimizer=SAM: SAM cannot wrap itself.")
        super().__init__(params, dict(rho=float(rho), adaptive=bool(adaptive)))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One list and one state dict for both: schedulers, checkpoints and Lightning see the base optimizer.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.rho, self.adaptive = float(rho), bool(adaptive)
        self._zero_grad_called = False

    # -- the two gradient evaluations ------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients (and note that the closure did, see :meth:`step`)."""
        self._zero_grad_called = True
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def _params_with_grad(self) -> list[tuple[Tensor, dict[str, Any]]]:
        return [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def _perturbation(self) -> list[tuple[Tensor, Tensor]]:
        """``[(p, e_p)]`` with ``e = ρ T² g / ‖T g‖`` over all parameters that have a gradient."""
        pairs = self._params_with_grad()
        if not pairs:
            return []
        grads = [cast(Tensor, p.grad) for p, _ in pairs]  # _params_with_grad keeps parameters with a gradient
        scaled = [(p.abs() * gp if g["adaptive"] else gp) for (p, g), gp in zip(pairs, grads)]
        norms = [torch.linalg.vector_norm(s.to(torch.promote_types(s.dtype, torch.float32))).double() for s in scaled]
        norm = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
        out = []
        for (p, g), s in zip(pairs, scaled):
            scale = (g["rho"] / (norm + 1e-12)).to(device=p.device, dtype=p.dtype)
            out.append((p, s * (p.abs() if g["adaptive"] else 1.0) * scale))
        return out

    def _call(self, closure: Callable[[], Any]) -> Any:
        self._zero_grad_called = False
        with torch.enable_grad():
            loss = closure()
        if not self._zero_grad_called:
            raise LightningPhasesError(_NO_ZERO_GRAD)
        return loss

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM step; returns the closure's loss at ``w``.

        Args:
            closure: Zeroes the gradients with ``self.zero_grad()``, computes the loss, calls
                ``backward()`` and returns the loss. Lightning's automatic optimization passes one.

        Raises:
            LightningPhasesError: Without a closure, or when the closure does not zero the gradients.
        """
        if closure is None:
            raise LightningPhasesError(_NO_CLOSURE)
        loss = self._call(closure)
        perturbation = self._perturbation()
        saved: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for p, e in perturbation:
                saved.append((p, p.detach().clone()))
                p.add_(e)
        try:
            with _frozen_batchnorm_stats():
                self._call(closure)
        finally:
            with torch.no_grad():
                for p, old in saved:
                    p.copy_(old)
        self.base_optimizer.step()
        return loss

    # -- checkpoints -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict`` (param groups include ``rho`` and ``adaptive``)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; ``rho``/``adaptive`` missing from old checkpoints keep their values."""
        for group in state_dict.get("param_groups", []):
            group.setdefault("rho", self.rho)
            group.setdefault("adaptive", self.adaptive)
        self.base_optimizer.load_state_dict(state_dict)
        # load_state_dict rebuilds the groups and the state in place of the old ones: share them again.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __repr__(self) -> str:
        return f"SAM(rho={self.rho}, adaptive={self.adaptive}, base_optimizer={self.base_optimizer!r})"


class _frozen_batchnorm_stats:
    """While active, every training-mode BatchNorm forward updates throw-away copies of its running statistics.

    The buffers are swapped for clones before the forward and swapped back after it, so the
    originals keep their values (and autograd, which may save the buffers, is not disturbed).
    """

    _NAMES = ("running_mean", "running_var", "num_batches_tracked")

    def __enter__(self) -> _frozen_batchnorm_stats:
        self._saved: dict[int, list[dict[str, Tensor]]] = {}
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._pre),
            nn.modules.module.register_module_forward_hook(self._post),
        ]
        return self

    def _pre(self, module: nn.Module, args: Any) -> None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            originals = {n: getattr(module, n) for n in self._NAMES if getattr(module, n, None) is not None}
            for name, buf in originals.items():
                setattr(module, name, buf.detach().clone())
            self._saved.setdefault(id(module), []).append(originals)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = self._saved.get(id(module))
        if stack:
            for name, buf in stack.pop().items():
                setattr(module, name, buf)

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
