"""Probe: the probe set, the model adapter and the per-step probe computations, shared explicitly by monitors."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)

from lightning_phases import _lightning as pl
from lightning_phases._lightning import rank_zero_warn
from lightning_phases._validation import check_choice, check_int, check_seed
from lightning_phases.callbacks.model_adapter import CLASS_TASKS, ModelAdapter, OutputSelector, Task, Unpack
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional._random import derived_seed
from lightning_phases.functional.per_sample import (
    GRAM_METHODS,
    GramMethod,
    LossFn,
    ParamSelection,
    gradient_gram,
    grouped_gradient_gram,
    select_parameters,
)

__all__ = ["Probe"]

#: Precision settings under which Lightning casts floating inputs to the parameters' dtype.
_TRUE_PRECISIONS = ("bf16-true", "16-true", "64-true", "64", 64, "transformer-engine", "transformer-engine-float16")


def training_dataloader(trainer: pl.Trainer, who: str) -> DataLoader:
    """The training DataLoader of ``trainer`` (the first of a list or dict of them); a clear error otherwise."""
    loader: Any = trainer.train_dataloader
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    if loader is not None and not isinstance(loader, DataLoader):
        # Lightning's CombinedLoader
        flat = getattr(loader, "flattened", None)
        if flat:
            loader = flat[0]
    if not isinstance(loader, DataLoader):
        raise LightningPhasesError(f"{who} needs a single map-style training DataLoader; got {type(loader).__name__}.")
    return loader


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


def input_dtype(trainer: pl.Trainer, pl_module: nn.Module) -> torch.dtype | None:
    """The dtype floating inputs are cast to: the parameters' under a true-precision plugin, else ``None``."""
    if getattr(trainer, "precision", "32-true") not in _TRUE_PRECISIONS:
        return None
    param = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
    return None if param is None else param.dtype


def served_positions(loader: DataLoader) -> Tensor | None:
    """Positions in ``loader.dataset`` that the loader's sampler serves (sorted), or ``None`` for all of them."""
    return _served_positions(loader)


def _served_positions(loader: DataLoader) -> Tensor | None:
    """Positions in ``loader.dataset`` that the loader's sampler serves (sorted), or ``None`` for all of them.

    Reads a ``batch_sampler`` first (a custom one), then the sampler: samplers
    with an ``indices`` attribute (``SubsetRandomSampler``, ...), the
    sequential and random samplers (all samples), Lightning's distributed
    wrappers (the union over ranks: the wrapped sampler's samples). Any other
    sampler is iterated once (under a forked random state).
    """
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and not isinstance(batch_sampler, BatchSampler):
        return _sampler_positions(batch_sampler, batches=True)
    return _sampler_positions(loader.sampler, batches=False)


def _sampler_positions(sampler: Any, *, batches: bool) -> Tensor | None:
    if isinstance(sampler, BatchSampler):
        return _sampler_positions(sampler.sampler, batches=False)
    if isinstance(sampler, DistributedSampler):
        inner = getattr(sampler.dataset, "_sampler", None)  # Lightning's DistributedSamplerWrapper
        return None if inner is None else _sampler_positions(inner, batches=batches)
    if isinstance(sampler, SequentialSampler):
        return None
    if (
        isinstance(sampler, RandomSampler)
        and not sampler.replacement
        and sampler.num_samples >= len(sampler.data_source)
    ):
        return None
    indices = getattr(sampler, "indices", None)
    if indices is not None:
        return torch.as_tensor(list(indices), dtype=torch.long).unique()
    inner = getattr(sampler, "sampler", None)
    if inner is not None and inner is not sampler:
        return _sampler_positions(inner, batches=False)
    with torch.random.fork_rng(devices=[]):
        served = list(iter(sampler))
    if batches:
        served = [int(i) for batch in served for i in batch]
    return torch.as_tensor(served, dtype=torch.long).unique()


def _original_positions(dataset: Dataset) -> Tensor | None:
    """For a view served after removing samples (``NoisyLabelDataset.without``): the original index of each item."""
    kept = getattr(dataset, "kept_indices", None)
    return None if kept is None else torch.as_tensor(kept, dtype=torch.long).reshape(-1)


def _fingerprints(targets: Tensor) -> list[str]:
    """One short hash per sample of its target (to recognise a probe set on other data)."""
    rows = targets.detach().cpu().reshape(targets.shape[0], -1).contiguous()
    return [hashlib.sha1(row.numpy().tobytes() + str(row.dtype).encode()).hexdigest()[:12] for row in rows]


class Probe:
    """A fixed probe set of training samples, the model adapter and the per-step probe computations.

    The monitors (:class:`~lightning_phases.callbacks.OrderParameterMonitor`,
    :class:`~lightning_phases.callbacks.NoiseSplitTracker`) measure on a
    probe. Pass one ``Probe`` to several monitors to share it: they then
    measure the same samples, and at each measured step the Gram matrix and
    the probe losses are computed once and served to all of them (an explicit
    memo of this object, valid for one step and the weights of that step)::

        probe = Probe(probe_size=512, seed=0)
        callbacks = [OrderParameterMonitor(probe=probe), NoiseSplitTracker(probe=probe)]

    Without ``probe=`` each monitor builds its own from the same arguments.

    **Which samples.** The probe set is ``min(probe_size, m)`` samples drawn
    once (with ``derived_seed(seed, "probe")``, the same on every rank) from
    the ``m`` samples the training DataLoader's sampler serves: a
    ``SubsetRandomSampler`` or any sampler with ``indices`` gives those
    indices, a custom ``batch_sampler`` or sampler without indices is
    iterated once; held-out samples are never probed. The indices refer to
    the *original* training dataset: after
    ``datamodule.remove_train_samples`` (``NoisyLabelDataset.without``, as
    :class:`~lightning_phases.callbacks.GMMCleanser` with ``action="remove"``
    does) the same samples are probed, mapped through the view; a probe
    sample that was removed is dropped from the probe set with one warning
    (never replaced by another). The indices and a fingerprint of their
    targets are checkpoint state of the monitors; resuming on other data
    raises an error.

    **Lifecycle.** Each ``trainer.fit`` starts fresh (a new draw on the new
    data), unless it resumes from a checkpoint.

    Args:
        probe_size: Number ``n`` of probe samples (the served training samples if fewer), >= 2.
        seed: Seed of the probe set (any non-negative int).
        loss_fn: Per-sample loss ``(output_of_one_sample, target) -> scalar``;
            default the task's loss.
        params: Probe only these parameters (names, module prefixes or a predicate).
        unpack: ``batch -> (inputs, targets)`` for a collated batch.
        forward: ``(pl_module, inputs) -> output`` instead of calling the module.
        output: Pick the logits in a tuple/dict output: int index, str key or callable.
        task: ``"auto"``, ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``
            (see :class:`~lightning_phases.callbacks.ModelAdapter`).
        chunk_size: Samples per block of the Gram computation (bounds memory).
        method: Gram engine, ``"auto"`` (default), ``"vmap"``, ``"ghost"`` or ``"materialize"``.

    Attributes:
        adapter: The :class:`~lightning_phases.callbacks.ModelAdapter` every probe computation goes through.
        indices: Probe samples as indices into the original training dataset (long ``[n]``, sorted), once drawn.
        num_gram_computations: Gram matrices computed by this probe (shared requests are served from the memo).
        num_loss_computations: Probe loss passes computed by this probe.
    """

    def __init__(
        self,
        *,
        probe_size: int = 1024,
        seed: int = 0,
        loss_fn: LossFn | None = None,
        params: ParamSelection = None,
        unpack: Unpack | None = None,
        forward: Any = None,
        output: OutputSelector = None,
        task: Task = "auto",
        chunk_size: int | None = None,
        method: GramMethod = "auto",
    ) -> None:
        check_int("probe_size", probe_size, minimum=2)
        check_seed("seed", seed)
        check_int("chunk_size", chunk_size, minimum=1, allow_none=True)
        check_choice("method", method, GRAM_METHODS)
        self.adapter = ModelAdapter(unpack=unpack, forward=forward, output=output, task=task, loss_fn=loss_fn)
        self.probe_size = probe_size
        self.seed = seed
        self.loss_fn = loss_fn
        self.params = params
        self.chunk_size = chunk_size
        self.method: GramMethod = method
        self.num_gram_computations = 0
        self.num_loss_computations = 0
        self.indices: Tensor | None = None
        self._fingerprints: list[str] | None = None
        self._original_size: int | None = None
        self.reset()

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict[str, Any]:
        """The settings that tell two probes apart beyond ``probe_size`` and ``seed`` (only those not at their default)."""
        ident: dict[str, Any] = {}
        if self.params is not None:
            p = self.params
            ident["params"] = (
                p
                if isinstance(p, str)
                else sorted(p)
                if isinstance(p, (list, tuple, set, frozenset))
                else getattr(p, "__qualname__", type(p).__name__)
            )
        if self.method != "auto":
            ident["method"] = self.method
        if self.adapter.task != "auto":
            ident["task"] = self.adapter.task
        return ident

    @property
    def size(self) -> int:
        """``n``: the number of probe samples (0 before the first fit started)."""
        return 0 if self._positions is None else int(self._positions.numel())

    @property
    def positions(self) -> Tensor | None:
        """The probe samples as positions in the training dataset served now (long ``[n]``), once prepared."""
        return self._positions

    @property
    def dataset(self) -> Dataset | None:
        """The training dataset served now (once prepared)."""
        return self._dataset

    @property
    def task(self) -> str | None:
        """The task, once known (``"custom"`` for a ``loss_fn`` whose task the targets do not tell)."""
        return self.adapter.resolved_task

    @property
    def has_class_targets(self) -> bool:
        """Whether the targets are classes (multi-class or binary)."""
        return self.adapter.resolved_task in CLASS_TASKS

    # ------------------------------------------------------------------ lifecycle and state
    def reset(self) -> None:
        """Start fresh: forget the probe set, the batch, the task and the memo (a new fit)."""
        self.indices = None
        self._fingerprints = None
        self._original_size = None
        self._restored = False
        self._prepared_for: Any = None
        self._loader: DataLoader | None = None
        self._dataset: Dataset | None = None
        self._positions: Tensor | None = None
        self._cpu_batch: tuple[Any, Tensor] | None = None
        self._memo: dict[str, Any] = {}
        self._warned: set[str] = set()
        self.adapter.reset()

    def state_dict(self) -> dict[str, Any]:
        return {
            "probe_indices": None if self.indices is None else self.indices.tolist(),
            "fingerprints": self._fingerprints,
            "original_size": self._original_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        idx = state.get("probe_indices")
        self.indices = None if idx is None else torch.tensor(idx, dtype=torch.long)
        self._fingerprints = state.get("fingerprints")
        self._original_size = state.get("original_size")
        self._restored = self.indices is not None
        self._prepared_for = None
        self._cpu_batch = None
        self._memo = {}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)

    # ------------------------------------------------------------------ the probe set
    def prepare(self, trainer: pl.Trainer, pl_module: nn.Module, *, who: str = "Probe") -> None:
        """Find the training data, draw (or map the restored) probe set and bind the adapter; once per fit.

        Raises:
            LightningPhasesError: no map-style training set, too few samples, or
                a restored probe set that does not belong to this training set.
        """
        loader = training_dataloader(trainer, who)
        if self._prepared_for is not None and self._loader is loader:
            return
        dataset = loader.dataset
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError as err:
            raise LightningPhasesError(
                f"{who} needs a map-style training dataset with a length (got an iterable dataset)."
            ) from err
        self.adapter.bind(collate_fn=loader.collate_fn, cast_dtype=input_dtype(trainer, pl_module))
        original = _original_positions(dataset)  # position -> original index (None: identity)
        datamodule = getattr(trainer, "datamodule", None)
        if original is None:
            original_size: int | None = size
        else:
            parent = getattr(datamodule, "noisy_train", None)
            original_size = len(parent) if parent is not None else None
        served = _served_positions(loader)
        if self.indices is None:
            positions = torch.arange(size) if served is None else served
            candidates = positions if original is None else original[positions]
            n = min(self.probe_size, int(candidates.numel()))
            if n < 2:
                raise LightningPhasesError(
                    f"The training set serves {candidates.numel()} sample(s); the probe set needs at least 2."
                )
            # a stream of its own: the same user seed must not pick the same samples as the label noise
            gen = torch.Generator().manual_seed(derived_seed(self.seed, "probe"))
            self.indices = candidates[torch.randperm(int(candidates.numel()), generator=gen)[:n]].sort().values
            if trainer.world_size > 1:  # a sampler iterated once may differ by rank: rank 0 decides
                self.indices = torch.as_tensor(
                    trainer.strategy.broadcast(self.indices.tolist(), src=0), dtype=torch.long
                )
            self._original_size = original_size
            self._fingerprints = None
        else:
            if (
                self._original_size is not None
                and original_size is not None
                and int(self._original_size) != int(original_size)
            ):
                raise LightningPhasesError(
                    f"The restored probe set belongs to a training set of {self._original_size} samples, but this "
                    f"one has {original_size}: the checkpoint was made on other data. Resume on the same data, or "
                    "start a new run without ckpt_path."
                )
            if original is None and int(self.indices.max()) >= size:
                raise LightningPhasesError(
                    f"The restored probe set indexes sample {int(self.indices.max())} but the training set has "
                    f"{size} samples: the checkpoint was made on other data."
                )
        self._map(dataset, original, served)
        self._loader = loader
        self._dataset = dataset
        self._cpu_batch = None
        self._memo = {}
        self._prepared_for = loader
        self._check_fingerprints()

    def _map(self, dataset: Dataset, original: Tensor | None, served: Tensor | None) -> None:
        """Positions of the probe samples in the served dataset; drop (once, with a warning) removed ones."""
        assert self.indices is not None
        if original is None:
            present = torch.ones(self.indices.numel(), dtype=torch.bool)
            positions = self.indices.clone()
        else:
            lookup = {int(o): p for p, o in enumerate(original.tolist())}
            present = torch.tensor([int(i) in lookup for i in self.indices.tolist()], dtype=torch.bool)
            positions = torch.tensor([lookup.get(int(i), -1) for i in self.indices.tolist()], dtype=torch.long)
        if served is not None:
            present &= torch.isin(positions, served)
        if not bool(present.all()):
            dropped = self.indices[~present]
            self._warn_once(
                "dropped",
                f"{int(dropped.numel())} probe sample(s) are no longer served by the training DataLoader (removed from "
                f"the training set, e.g. by GMMCleanser(action='remove'), or outside its sampler): original indices "
                f"{dropped.tolist()[:10]}{' ...' if dropped.numel() > 10 else ''}. They are dropped from the probe "
                f"set, which now has {int(present.sum())} samples; no other sample replaces them.",
            )
            if self._fingerprints is not None:
                self._fingerprints = [f for f, keep in zip(self._fingerprints, present.tolist()) if keep]
            self.indices = self.indices[present]
            positions = positions[present]
        if positions.numel() < 2:
            raise LightningPhasesError(
                f"Only {positions.numel()} probe sample(s) are still served by the training set; the probe set needs "
                "at least 2. Start a new run (without ckpt_path) to draw a new probe set."
            )
        self._positions = positions

    def _check_fingerprints(self) -> None:
        """Compare the restored probe targets with this training set's (a clear error on other data)."""
        if self._fingerprints is None:
            return
        try:
            _, targets = self._collated()
        except Exception:  # noqa: BLE001 - a failing batch is reported (and skipped) at the first measurement
            return
        now = _fingerprints(targets)
        if len(now) != len(self._fingerprints) or now != self._fingerprints:
            differ = sum(a != b for a, b in zip(now, self._fingerprints)) + abs(len(now) - len(self._fingerprints))
            raise LightningPhasesError(
                f"The restored probe set does not match this training set: {differ} of {len(now)} probe samples have "
                "other targets than when the checkpoint was written, so the checkpoint was made on other data. "
                "Resume on the same data, or start a new run without ckpt_path."
            )

    def _collated(self) -> tuple[Any, Tensor]:
        if self._cpu_batch is None:
            if self._dataset is None or self._positions is None:
                raise LightningPhasesError(
                    "The probe has no training data yet: Probe.prepare() runs at the start of fit."
                )
            with torch.random.fork_rng(devices=[]):
                items = [self._dataset[int(i)] for i in self._positions]
            inputs, targets = self.adapter.model_inputs(self.adapter.collate(items))
            if targets.shape[0] != len(items):
                raise LightningPhasesError(
                    f"unpack gave targets with {targets.shape[0]} rows for {len(items)} probe samples; the sample "
                    "dimension must come first."
                )
            self._cpu_batch = (inputs, targets)
            if self._fingerprints is None:
                self._fingerprints = _fingerprints(targets)
        return self._cpu_batch

    def batch(self, trainer: pl.Trainer, pl_module: nn.Module) -> tuple[Any, Tensor]:
        """``(inputs, targets)`` of the probe set on the module's device (inputs cast under true precision).

        Re-maps the probe set when the Trainer serves a new training DataLoader
        (e.g. after samples were removed).
        """
        if self._prepared_for is not None and self._loader is not None:
            try:
                current = training_dataloader(trainer, "Probe")
            except LightningPhasesError:
                current = self._loader
            if current is not self._loader:
                self._prepared_for = None
                self.prepare(trainer, pl_module)
        inputs, targets = self._collated()
        return self.adapter.to_module(inputs, pl_module), self.adapter.to_module(targets, pl_module, cast=False)

    # ------------------------------------------------------------------ per-step computations (memoised)
    def _memo_key(self, trainer: pl.Trainer, pl_module: nn.Module) -> tuple:
        """The step and the storage and in-place version of every parameter and buffer: a new key means new weights."""
        params = tuple((n, p.data_ptr(), p._version) for n, p in pl_module.named_parameters())
        buffers = tuple((n, b.data_ptr(), b._version) for n, b in pl_module.named_buffers())
        return (trainer.global_step, params, buffers, id(self._cpu_batch))

    def _memo_get(self, key: tuple, what: str) -> Any:
        if self._memo.get("key") != key:
            self._memo = {"key": key}
        return self._memo.get(what)

    def losses(self, trainer: pl.Trainer, pl_module: nn.Module) -> tuple[Tensor, Tensor | None]:
        """Per-sample losses ``[n]`` and errors ``[n]`` (``None`` where errors mean nothing), float64, memoised."""
        x, y = self.batch(trainer, pl_module)
        key = self._memo_key(trainer, pl_module)
        hit = self._memo_get(key, "losses")
        if hit is None:
            hit = self.adapter.per_sample_losses(pl_module, x, y)
            self.num_loss_computations += 1
            self._memo["losses"] = hit
        losses, errors = hit
        return losses.clone(), None if errors is None else errors.clone()

    def my_parameters(self, trainer: pl.Trainer, pl_module: nn.Module) -> list[str]:
        """This rank's share of the selected parameters (a Gram matrix is a sum over parameters)."""
        selected = select_parameters(pl_module, self.params)
        sizes = {name: p.numel() for name, p in selected.items()}
        world = max(1, trainer.world_size)
        return partition_parameters(sizes, world)[trainer.global_rank if world > 1 else 0]

    def gram(self, trainer: pl.Trainer, pl_module: nn.Module) -> Tensor:
        """This rank's share of the ``[n, n]`` per-sample-gradient Gram matrix (float64), memoised for the step.

        Under DDP the shares of all ranks sum to the Gram matrix of all selected parameters.
        """
        x, y = self.batch(trainer, pl_module)
        self.losses(trainer, pl_module)  # resolves the task, hence the loss
        key = self._memo_key(trainer, pl_module)
        hit = self._memo_get(key, "gram")
        if hit is None:
            mine = self.my_parameters(trainer, pl_module)
            n = self.size
            device = next(pl_module.parameters()).device
            if not mine:
                hit = torch.zeros(n, n, dtype=torch.float64, device=device)
            else:
                gram, _ = gradient_gram(
                    pl_module,
                    x,
                    y,
                    loss_fn=self.adapter.loss(),
                    params=mine,
                    chunk_size=self.chunk_size,
                    method=self.method,
                    forward=self.adapter.engine_forward,
                )
                hit = gram.to(device)
                self.num_gram_computations += 1
            self._memo["gram"] = hit
        return hit.clone()

    def grouped_gram(
        self,
        trainer: pl.Trainer,
        pl_module: nn.Module,
        targets: Tensor,
        loss_fn: LossFn,
        groups: Tensor,
        num_groups: int,
    ) -> Tensor:
        """This rank's share of the ``[K, K]`` Gram matrix of group-summed gradients (not memoised)."""
        x, _ = self.batch(trainer, pl_module)
        mine = self.my_parameters(trainer, pl_module)
        device = next(pl_module.parameters()).device
        if not mine:
            return torch.zeros(num_groups, num_groups, dtype=torch.float64, device=device)
        gram, _ = grouped_gradient_gram(
            pl_module,
            x,
            targets.to(device),
            groups.to(device),
            num_groups=num_groups,
            loss_fn=loss_fn,
            params=mine,
            chunk_size=self.chunk_size,
            method=self.method,
            forward=self.adapter.engine_forward,
        )
        return gram.to(device)
