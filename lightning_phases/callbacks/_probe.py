"""Shared machinery of the probing callbacks: probe set, schedule, safe measurement, DDP reduction, logging.

Private: the public callbacks are thin subclasses that say what to compute
from the reduced sufficient statistics and what to log.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_phases import _lightning as pl
from lightning_phases._lightning import Callback, tensorboard_writers
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional.ensemble import _all_finite, derived_seed
from lightning_phases.functional.per_sample import (
    GRAM_METHODS,
    LossFn,
    ParamSelection,
    default_loss,
    eval_mode,
    gradient_gram,
    grouped_gradient_gram,
    select_parameters,
)

log = logging.getLogger("lightning_phases")

Unpack = Callable[[Any], tuple[Tensor, Tensor]]


def default_unpack(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` from a collated batch: its first two entries."""
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


def should_measure(
    *, global_step: int, epoch_end: int | None, every_n_steps: int | None, every_n_epochs: int | None
) -> bool:
    """The schedule as a pure function, so that every rank agrees.

    ``epoch_end`` is the index of the epoch that just ended (``None`` when
    called after a training step). Steps are counted by ``global_step``
    (optimizer steps taken so far).
    """
    if epoch_end is None:
        return every_n_steps is not None and global_step > 0 and global_step % every_n_steps == 0
    return every_n_epochs is not None and (epoch_end + 1) % every_n_epochs == 0


def _check_positive_int(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LightningPhasesError(
            f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}; got {value!r}."
        )


def _check_real(name: str, value: Any) -> None:
    """``value`` must be a finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LightningPhasesError(f"{name} must be a finite number; got {value!r}.")


def partition_parameters(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Split parameter names into ``world_size`` groups of similar total size (deterministic)."""
    groups: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        k = loads.index(min(loads))
        groups[k].append(name)
        loads[k] += sizes[name]
    order = {name: i for i, name in enumerate(sizes)}
    return [sorted(g, key=order.__getitem__) for g in groups]


# The last Gram matrix computed for each module, shared by the callbacks that probe it at the same
# step (OrderParameterMonitor and NoiseSplitTracker compute the same G on the default probe set).
# An entry is reused only if the step, the parameters (storage and in-place version counters), the
# probe tensors, the loss and the engine settings are all the same, so a hit returns exactly what
# a fresh computation would (measurements run in eval mode and change nothing).
_GRAM_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


# The last probe losses and predictions per module, shared in the same way.
_LOSS_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def _gram_key(pl_module: torch.nn.Module, step: int, names: list[str], chunk_size: int | None, method: str) -> tuple:
    params = dict(pl_module.named_parameters())
    versions = tuple((n, params[n].data_ptr(), params[n]._version) for n in names)
    buffers = tuple((n, b.data_ptr(), b._version) for n, b in pl_module.named_buffers())  # e.g. BatchNorm statistics
    return (step, versions, buffers, chunk_size, method)


class _ProbeCallback(Callback):
    """Probe set, schedule, safe measurement and reduction shared by the monitors."""

    prefix: str = ""
    #: Metric keys this callback puts into ``trainer.callback_metrics`` (a protocol other callbacks may read).
    phase_metrics: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        probe_size: int = 1024,
        batch_size: int | None = None,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        measure_at_start: bool = True,
        loss_fn: LossFn | None = None,
        params: ParamSelection = None,
        unpack: Unpack | None = None,
        seed: int = 0,
        chunk_size: int | None = None,
        method: str = "auto",
        num_minibatches: int = 256,
    ) -> None:
        super().__init__()
        _check_positive_int("probe_size", probe_size, minimum=2)
        _check_positive_int("batch_size", batch_size, allow_none=True)
        _check_positive_int("every_n_epochs", every_n_epochs, allow_none=True)
        _check_positive_int("every_n_steps", every_n_steps, allow_none=True)
        _check_positive_int("chunk_size", chunk_size, allow_none=True)
        _check_positive_int("num_minibatches", num_minibatches, minimum=2)
        _check_positive_int("seed", seed, minimum=0)
        if every_n_epochs is None and every_n_steps is None:
            every_n_epochs = 1
        if every_n_epochs is not None and every_n_steps is not None:
            raise LightningPhasesError(
                f"Set only one of every_n_epochs={every_n_epochs} and every_n_steps={every_n_steps}."
            )
        if method not in GRAM_METHODS:
            raise LightningPhasesError(f"method must be one of {GRAM_METHODS}; got {method!r}.")
        if batch_size is not None and batch_size > probe_size:
            raise LightningPhasesError(
                f"batch_size={batch_size} is larger than probe_size={probe_size}; the minibatch ensemble "
                "draws distinct probe samples. Increase probe_size or lower batch_size."
            )
        self.probe_size = probe_size
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.measure_at_start = measure_at_start
        self.loss_fn = loss_fn
        self.params = params
        self.unpack = unpack or default_unpack
        self.seed = seed
        self.chunk_size = chunk_size
        self.method = method
        self.num_minibatches = num_minibatches
        # state
        self.probe_indices: Tensor | None = None
        self.last_measured_step: int = -1
        self.num_measurements: int = 0
        self.num_failures: int = 0
        self._warned: set[str] = set()
        self._probe: tuple[Tensor, Tensor] | None = None
        self._dataset: Dataset | None = None
        self._batch_size: int | None = batch_size

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        # Lightning reads this on every hook call (profiler names): build the string once per identity
        ident = (
            self.probe_size,
            self.seed,
            self.prefix,
        )
        if getattr(self, "_state_key_cache", (None, ""))[0] != ident:
            self._state_key_cache = (
                ident,
                self._generate_state_key(probe_size=self.probe_size, seed=self.seed, prefix=self.prefix),
            )
        return self._state_key_cache[1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "probe_indices": None if self.probe_indices is None else self.probe_indices.tolist(),
            "last_measured_step": self.last_measured_step,
            "num_measurements": self.num_measurements,
            "num_failures": self.num_failures,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        idx = state_dict.get("probe_indices")
        self.probe_indices = None if idx is None else torch.tensor(idx, dtype=torch.long)
        self.last_measured_step = int(state_dict.get("last_measured_step", -1))
        self.num_measurements = int(state_dict.get("num_measurements", 0))
        self.num_failures = int(state_dict.get("num_failures", 0))
        self._probe = None

    # ------------------------------------------------------------------ setup and validation
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise LightningPhasesError(
                f"{type(self).__name__} writes its statistics to the Trainer's loggers, but the Trainer has "
                "none (logger=False). Pass logger=True or a TensorBoardLogger."
            )
        select_parameters(pl_module, self.params)  # raises ParameterSelectionError early

    def _resolve_data(self, trainer: pl.Trainer) -> None:
        """Find the training dataset and B, draw the probe indices, and validate sizes."""
        loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if isinstance(loader, Mapping):
            loader = next(iter(loader.values()), None)
        if not isinstance(loader, DataLoader):
            raise LightningPhasesError(
                f"{type(self).__name__} needs a single map-style training DataLoader; got {type(loader).__name__}."
            )
        dataset = loader.dataset
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError as err:
            raise LightningPhasesError(
                f"{type(self).__name__} needs a map-style training dataset with a length (got an iterable dataset)."
            ) from err
        if self._batch_size is None:
            per_device = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
            if per_device is None:
                raise LightningPhasesError(
                    "Cannot infer the minibatch size from the training DataLoader; pass batch_size=..."
                )
            # the SGD minibatch: per-device batches of every rank, accumulated
            self._batch_size = int(per_device) * max(1, trainer.world_size) * max(1, trainer.accumulate_grad_batches)
        n = min(self.probe_size, size)
        if n < 2:
            raise LightningPhasesError(f"The training set has {size} sample(s); the probe set needs at least 2.")
        if self._batch_size > n:
            raise LightningPhasesError(
                f"The minibatch size B={self._batch_size} is larger than the probe set (n={n}). "
                "Increase probe_size, or pass a smaller batch_size=."
            )
        if self.probe_indices is None:
            # a stream of its own: the same user seed must not pick the same samples as the label noise
            gen = torch.Generator().manual_seed(derived_seed(self.seed, "probe"))
            self.probe_indices = torch.randperm(size, generator=gen)[:n].sort().values
        elif int(self.probe_indices.max()) >= size:
            raise LightningPhasesError(
                f"The restored probe set indexes sample {int(self.probe_indices.max())} but the training set has "
                f"{size} samples: the checkpoint was made on other data."
            )
        self._dataset = dataset
        self._probe = None

    def _probe_batch(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._probe is None:
            assert self._dataset is not None and self.probe_indices is not None
            with torch.random.fork_rng(devices=[]):
                items = [self._dataset[int(i)] for i in self.probe_indices]
            x, y = self.unpack(default_collate(items))
            self._probe = (x, y)
        x, y = self._probe
        return x.to(device), y.to(device)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_data(trainer)
        self._on_probe_ready(trainer, pl_module)
        if self.measure_at_start and trainer.global_step == 0 and self.last_measured_step < 0:
            self._run(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if should_measure(
            global_step=trainer.global_step, epoch_end=None, every_n_steps=self.every_n_steps, every_n_epochs=None
        ):
            self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if should_measure(
            global_step=trainer.global_step,
            epoch_end=trainer.current_epoch,
            every_n_steps=None,
            every_n_epochs=self.every_n_epochs,
        ):
            self._run(trainer, pl_module)

    # ------------------------------------------------------------------ measurement
    def _on_probe_ready(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Subclass hook: the probe indices and dataset are known."""

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self.last_measured_step:
            return
        devices = [torch.cuda.current_device()] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            metrics = self._measure_safely(trainer, pl_module)
        self.last_measured_step = step
        self.num_measurements += 1
        if metrics is not None:
            metrics[f"{self.prefix}/measured_step"] = float(step)
            self._publish(trainer, metrics)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log.warning(message)

    def _measure_safely(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """Compute local sufficient statistics, reduce across ranks, and turn them into metrics.

        A failure on any rank (an exception, NaN) is turned into NaN statistics
        of the agreed shapes, so the collective calls still match on every rank
        and nobody hangs; the measurement is then skipped everywhere.
        """
        x, y = self._probe_batch(pl_module.device)
        n = x.shape[0]
        try:
            local = self._local_statistics(trainer, pl_module, x, y)
            failure = None
        except Exception as err:  # noqa: BLE001 - a monitor must never crash training
            local = self._empty_statistics(n, pl_module.device)
            failure = f"{type(err).__name__}: {err}"
        reduced = {k: (self._reduce(trainer, v) if k in self._reduce_keys else v) for k, v in local.items()}
        if failure is not None or not all(_all_finite(v) for k, v in reduced.items() if k in self._finite_keys):
            self.num_failures += 1
            reason = failure or "NaN or inf in the per-sample gradients or losses"
            self._warn_once(
                "measure",
                f"{type(self).__name__} skipped the measurement at step {trainer.global_step} ({reason}); "
                "training continues unchanged. Further skips are counted in "
                f"'{self.prefix}/skipped' without another warning.",
            )
            self._publish(trainer, {f"{self.prefix}/skipped": float(self.num_failures)})
            return None
        return self._metrics(trainer, pl_module, reduced)

    _finite_keys: tuple[str, ...] = ("gram",)
    # statistics that are partial sums over this rank's parameters; the rest are identical on every rank
    _reduce_keys: tuple[str, ...] = ("gram",)

    @staticmethod
    def _reduce(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
        if trainer.world_size <= 1:
            return tensor
        return trainer.strategy.reduce(tensor, reduce_op="sum")

    def _my_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """This rank's share of the selected parameters (the Gram is a sum over parameters)."""
        selected = select_parameters(pl_module, self.params)
        sizes = {name: p.numel() for name, p in selected.items()}
        return partition_parameters(sizes, max(1, trainer.world_size))[
            trainer.global_rank if trainer.world_size > 1 else 0
        ]

    def _partial_gram(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor, loss_fn: LossFn | None
    ) -> Tensor:
        mine = self._my_parameters(trainer, pl_module)
        n = x.shape[0]
        if not mine:
            return torch.zeros(n, n, dtype=torch.float64, device=x.device)
        key = _gram_key(pl_module, trainer.global_step, mine, self.chunk_size, self.method)
        hit = _GRAM_CACHE.get(pl_module)
        if (
            hit is not None
            and hit["key"] == key
            and hit["loss_fn"] is loss_fn
            and torch.equal(hit["x"], x)
            and torch.equal(hit["y"], y)
        ):
            return hit["gram"].clone()
        gram, _ = gradient_gram(
            pl_module, x, y, loss_fn=loss_fn, params=mine, chunk_size=self.chunk_size, method=self.method
        )
        gram = gram.to(x.device)
        _GRAM_CACHE[pl_module] = {"key": key, "loss_fn": loss_fn, "x": x, "y": y, "gram": gram.clone()}
        return gram

    def _partial_grouped_gram(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn | None,
        groups: Tensor,
        num_groups: int,
    ) -> Tensor:
        """This rank's share of the ``[K, K]`` Gram matrix of group-summed gradients."""
        mine = self._my_parameters(trainer, pl_module)
        if not mine:
            return torch.zeros(num_groups, num_groups, dtype=torch.float64, device=x.device)
        gram, _ = grouped_gradient_gram(
            pl_module,
            x,
            y,
            groups,
            num_groups=num_groups,
            loss_fn=loss_fn,
            params=mine,
            chunk_size=self.chunk_size,
            method=self.method,
        )
        return gram.to(x.device)

    def _losses_and_correct(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor, int]:
        """Per-sample losses, correctness (against the given labels) and output width; eval mode, no gradients.

        Shared, like the Gram matrix, between callbacks that evaluate the same
        probe set with the same loss on the same weights.
        """
        loss_fn = self.loss_fn or default_loss
        key = _gram_key(pl_module, trainer.global_step, [n for n, _ in pl_module.named_parameters()], None, "losses")
        hit = _LOSS_CACHE.get(pl_module)
        if (
            hit is not None
            and hit["key"] == key
            and hit["loss_fn"] is loss_fn
            and torch.equal(hit["x"], x)
            and torch.equal(hit["y"], y)
        ):
            return hit["losses"].clone(), hit["correct"].clone(), hit["width"]
        with torch.no_grad(), eval_mode(pl_module):
            out = pl_module(x)
            losses = torch.vmap(loss_fn)(out, y).reshape(-1)
            if out.ndim == 1 or out.shape[-1] == 1:
                pred = (out.reshape(-1) > 0).long()
            else:
                pred = out.argmax(-1)
            correct = pred == y.reshape(-1).long()
        width = 1 if out.ndim == 1 else int(out.reshape(out.shape[0], -1).shape[1])
        losses, correct = losses.to(torch.float64), correct.to(torch.float64)
        _LOSS_CACHE[pl_module] = {
            "key": key,
            "loss_fn": loss_fn,
            "x": x,
            "y": y,
            "losses": losses.clone(),
            "correct": correct.clone(),
            "width": width,
        }
        return losses, correct, width

    # subclass API
    def _local_statistics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def _empty_statistics(self, n: int, device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def _metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: dict[str, Tensor]
    ) -> dict[str, float]:
        raise NotImplementedError

    # ------------------------------------------------------------------ logging
    @property
    def effective_batch_size(self) -> int | None:
        """``B`` used for the minibatch ensemble (known once training has started)."""
        return self._batch_size

    def _publish(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Log scalars to every logger (rank 0) and put them in ``trainer.callback_metrics`` (all ranks)."""
        finite = {k: float(v) for k, v in metrics.items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(finite, step=trainer.global_step)
        trainer.callback_metrics.update(
            {k: torch.tensor(v, dtype=torch.float32) for k, v in finite.items() if not math.isnan(v)}
        )

    @staticmethod
    def _tensorboard(trainer: pl.Trainer):
        """The TensorBoard ``SummaryWriter`` of the first TensorBoard logger, on rank 0 only."""
        writers = tensorboard_writers(trainer)
        return writers[0] if writers else None
