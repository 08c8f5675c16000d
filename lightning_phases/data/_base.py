"""Shared machinery of the noisy classification datamodules (private)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_phases import _lightning as pl
from lightning_phases.data._checks import (
    check_bool,
    check_classes,
    check_eval_batch_size,
    check_int,
    check_noise,
    check_seed,
    check_val_size,
    num_val,
)
from lightning_phases.data.dataset import NoisyLabelDataset, dataset_targets
from lightning_phases.data.noise import NoiseSpec
from lightning_phases.errors import LabelNoiseError
from lightning_phases.functional.ensemble import derived_seed

__all__: list[str] = []


class _NoisyClassificationDataModule(pl.LightningDataModule):
    """Noisy train split, noisy (or clean) validation split, clean test split.

    Subclasses implement ``_load(train: bool) -> Dataset`` and set ``num_classes``;
    their ``__init__`` lists every argument explicitly and passes them here.
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
        noise_type, noise_rate = check_noise(noise_type, noise_rate)
        self.seed = check_seed("seed", seed)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.val_size = check_val_size(val_size)
        self.clean_val = check_bool("clean_val", clean_val)
        self.eval_batch_size = check_eval_batch_size(eval_batch_size, self.batch_size)
        if noise_type == "pairflip" and class_map is None and self.default_class_map is None:
            raise LabelNoiseError(
                f"noise_type='pairflip' needs class_map= for {type(self).__name__} (a {{source: target}} "
                f"mapping, e.g. {{c: (c + 1) % {self.num_classes} for c in range({self.num_classes})}})."
            )
        self.noise_type = noise_type
        self.noise_rate = noise_rate
        self.class_map = class_map if class_map is not None else self.default_class_map
        self.noisy_train: NoisyLabelDataset | None = None
        self.val_dataset: NoisyLabelDataset | None = None
        self.test_dataset: Dataset | None = None
        self.removed_indices: Tensor = torch.zeros(0, dtype=torch.long)
        self.classes = check_classes(classes, self.num_classes)
        if self.classes is not None:
            self.num_classes = len(self.classes)  # labels are relabelled 0..k-1 in the given order

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
        return num_val(self.val_size, n)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.noisy_train is None:
            source = self._load(train=True)
            full, targets, kept = self._select(source)
            n = len(targets)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(self.seed, "val_split")))
            n_val = self._num_val(n)
            val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
            common: dict[str, Any] = dict(noise=self.noise_type, num_classes=self.num_classes, class_map=self.class_map)
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
