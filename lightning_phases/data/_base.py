"""Shared machinery of the noisy classification datamodules (private)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_phases import _lightning as pl
from lightning_phases.data.dataset import NoisyLabelDataset, dataset_targets
from lightning_phases.data.noise import NOISE_TYPES, NoiseSpec
from lightning_phases.errors import LabelNoiseError
from lightning_phases.functional.ensemble import derived_seed

__all__: list[str] = []


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LabelNoiseError(f"{name} must be an int >= {minimum}; got {value!r}.")


class _NoisyClassificationDataModule(pl.LightningDataModule):
    """Noisy train split, noisy (or clean) validation split, clean test split.

    Subclasses implement ``_load(train: bool) -> Dataset`` and set ``num_classes``.
    """

    num_classes: int = 10
    default_class_map: Mapping[int, int] | None = None

    def __init__(
        self,
        *,
        noise_type: NoiseSpec = "symmetric",
        noise_rate: float = 0.0,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: float | int = 0.1,
        clean_val: bool = False,
        class_map: Mapping[int, int] | None = None,
        eval_batch_size: int | None = None,
        classes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(noise_type, str) and noise_type not in NOISE_TYPES:
            raise LabelNoiseError(
                f"unknown noise_type {noise_type!r}; use one of {NOISE_TYPES} or a C×C transition matrix."
            )
        if isinstance(noise_rate, bool) or not isinstance(noise_rate, (int, float)) or not 0 <= noise_rate < 1:
            raise LabelNoiseError(f"noise_rate must be in [0, 1); got {noise_rate!r}.")
        _check_int("seed", seed, 0)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        if isinstance(val_size, float) and not 0 <= val_size < 1:
            raise LabelNoiseError(f"val_size as a fraction must be in [0, 1); got {val_size!r}.")
        if isinstance(val_size, int) and not isinstance(val_size, bool) and val_size < 0:
            raise LabelNoiseError(f"val_size must be >= 0; got {val_size!r}.")
        if noise_type == "pairflip" and class_map is None and self.default_class_map is None:
            raise LabelNoiseError(f"noise_type='pairflip' needs class_map= for {type(self).__name__}.")
        self.noise_type = noise_type
        self.noise_rate = float(noise_rate)
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or max(batch_size, 256)
        self.num_workers = num_workers
        self.val_size = val_size
        self.clean_val = bool(clean_val)
        self.class_map = class_map if class_map is not None else self.default_class_map
        self.noisy_train: NoisyLabelDataset | None = None
        self.val_dataset: NoisyLabelDataset | None = None
        self.test_dataset: Dataset | None = None
        self.removed_indices: Tensor = torch.zeros(0, dtype=torch.long)
        if classes is not None:
            classes = [int(c) for c in classes]
            if (
                len(classes) < 2
                or len(set(classes)) != len(classes)
                or min(classes) < 0
                or max(classes) >= self.num_classes
            ):
                raise LabelNoiseError(
                    f"classes must be >= 2 distinct labels in [0, {self.num_classes - 1}]; got {classes!r}."
                )
            self.num_classes = len(classes)  # labels are relabelled 0..k-1 in the given order
        self.classes = classes

    def _select(self, dataset: Dataset) -> tuple[Dataset, Tensor, list[int] | None]:
        """Keep only ``classes`` (relabelled ``0..k-1``): the dataset, its labels and the kept indices
        (``None`` when every sample is kept), so a parallel dataset can take the same subset."""
        targets = dataset_targets(dataset)
        if self.classes is None:
            return dataset, targets, None
        lookup = torch.full((int(targets.max()) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        keep = torch.nonzero(torch.isin(targets, torch.tensor(self.classes))).flatten()
        return Subset(dataset, keep.tolist()), lookup[targets[keep]], keep.tolist()

    # -------------------------------------------------------------- subclass API
    def _load(self, train: bool) -> Dataset:
        raise NotImplementedError

    def _load_for_validation(self, full: Dataset) -> Dataset:
        """The training-source dataset as the validation split sees it (no augmentation)."""
        return full

    # -------------------------------------------------------------- splits
    def _num_val(self, n: int) -> int:
        return int(round(self.val_size * n)) if isinstance(self.val_size, float) else min(int(self.val_size), n - 1)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.noisy_train is None:
            source = self._load(train=True)
            full, targets, kept = self._select(source)
            n = len(targets)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(self.seed, "val_split")))
            n_val = self._num_val(n)
            val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
            common = dict(noise=self.noise_type, num_classes=self.num_classes, class_map=self.class_map)
            self.noisy_train = NoisyLabelDataset(
                Subset(full, train_idx.tolist()),
                noise_rate=self.noise_rate,
                seed=self.seed,
                targets=targets[train_idx],
                **common,
            )
            val_source = self._load_for_validation(source)  # same samples as `source`, evaluation transform
            if kept is not None:
                val_source = Subset(val_source, kept)
            self.val_dataset = NoisyLabelDataset(
                Subset(val_source, val_idx.tolist()),
                noise_rate=0.0 if self.clean_val else self.noise_rate,
                seed=self.seed + 1,
                targets=targets[val_idx],
                **(common if not self.clean_val else dict(noise="symmetric", num_classes=self.num_classes)),
            )
        if stage in (None, "test") and self.test_dataset is None:
            test, test_targets, _ = self._select(self._load(train=False))
            # clean labels (relabelled when `classes` is set), served through the wrapper
            self.test_dataset = NoisyLabelDataset(
                test, noise_rate=0.0, num_classes=self.num_classes, targets=test_targets
            )

    @property
    def train_dataset(self) -> NoisyLabelDataset:
        """The training set served now: the noisy training split without any removed samples."""
        if self.noisy_train is None:
            raise LabelNoiseError(f"{type(self).__name__}.setup('fit') has not run yet.")
        return self.noisy_train.without(self.removed_indices) if self.removed_indices.numel() else self.noisy_train

    def remove_train_samples(self, indices: Tensor) -> None:
        """Serve the training split without these samples from the next ``train_dataloader()`` on.

        Indices refer to :attr:`noisy_train` (the full noisy training split);
        calling again replaces the previous removal. No data is copied or
        modified.
        """
        if self.noisy_train is None:
            self.setup("fit")
        assert self.noisy_train is not None
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).unique()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self.noisy_train)):
            raise LabelNoiseError(f"indices to remove must lie in [0, {len(self.noisy_train) - 1}].")
        self.removed_indices = idx

    # -------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("fit")
        assert self.val_dataset is not None
        return self._loader(self.val_dataset, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        assert self.test_dataset is not None
        return self._loader(self.test_dataset, False, self.eval_batch_size)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"removed_indices": self.removed_indices.tolist()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.removed_indices = torch.tensor(state_dict.get("removed_indices", []), dtype=torch.long)
