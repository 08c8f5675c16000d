"""NoisyDigitsDataModule: scikit-learn's bundled 8×8 handwritten digits with label noise (no download)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_phases.data._base import _NoisyClassificationDataModule
from lightning_phases.data._checks import check_real, check_seed
from lightning_phases.data.noise import NoiseSpec
from lightning_phases.functional.ensemble import derived_seed

__all__ = ["NoisyDigitsDataModule"]


class NoisyDigitsDataModule(_NoisyClassificationDataModule):
    """The 1,797 8×8 digits of ``sklearn.datasets.load_digits`` with label noise: the embedded default.

    Inputs are the 64 pixel values scaled to ``[0, 1]`` (``x / 16``), float32
    ``[64]``; labels are ``0..9``. A fixed ``test_fraction`` of the data
    (chosen with ``split_seed``) is the clean test split; the rest is split into
    training (noisy) and validation (noisy unless ``clean_val=True``) parts.

    Args:
        noise_type: ``"symmetric"`` (a label drawn from the other classes),
            ``"uniform"`` (from all classes), ``"pairflip"`` (``class_map``'s
            flips), or a 10×10 transition matrix (rows sum to 1).
        noise_rate: Nominal noise rate ``ρ`` in ``[0, 1)`` of the training (and
            validation) labels.
        seed: Seed of the noise and of the train/validation split; any
            non-negative int.
        batch_size: Training batch size.
        num_workers: DataLoader worker processes.
        val_size: Validation part of the non-test data: a fraction in ``[0, 1)``
            or a sample count; it must leave at least 2 training samples.
        clean_val: Keep the validation labels clean (default: noisy, as in real life).
        class_map: ``{source: target}`` flips of ``"pairflip"`` (required for it).
        eval_batch_size: Batch size of the validation and test loaders
            (default ``max(batch_size, 256)``).
        classes: Keep only these classes, relabelled ``0..k-1`` in the given order.
        test_fraction: Fraction in ``(0, 1)`` of the 1,797 samples held out as the clean test set.
        split_seed: Seed of the train/test split (independent of the noise ``seed``).

    Attributes:
        noisy_train: The noisy training split (a :class:`~lightning_phases.data.NoisyLabelDataset`).
        val_dataset: The validation split (noisy unless ``clean_val``).
        test_dataset: The clean test split.
        num_classes: 10 (or ``len(classes)``).
    """

    num_classes = 10

    def __init__(
        self,
        *,
        noise_type: NoiseSpec = "symmetric",
        noise_rate: float = 0.0,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        val_size: float | int = 0.1,
        clean_val: bool = False,
        class_map: Mapping[int, int] | None = None,
        eval_batch_size: int | None = None,
        classes: Sequence[int] | None = None,
        test_fraction: float = 0.2,
        split_seed: int = 0,
    ) -> None:
        super().__init__(
            noise_type=noise_type,
            noise_rate=noise_rate,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            val_size=val_size,
            clean_val=clean_val,
            class_map=class_map,
            eval_batch_size=eval_batch_size,
            classes=classes,
        )
        self.test_fraction = check_real(
            "test_fraction", test_fraction, minimum=0.0, maximum=1.0, strict_minimum=True, strict_maximum=True
        )
        self.split_seed = check_seed("split_seed", split_seed)
        self._split: tuple[TensorDataset, TensorDataset] | None = None

    def _splits(self) -> tuple[TensorDataset, TensorDataset]:
        if self._split is None:
            from sklearn.datasets import load_digits  # type: ignore[import-untyped]

            digits = load_digits()
            x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
            y = torch.tensor(digits.target, dtype=torch.long)
            perm = torch.randperm(
                len(y), generator=torch.Generator().manual_seed(derived_seed(self.split_seed, "test_split"))
            )
            n_test = int(round(self.test_fraction * len(y)))
            test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
            self._split = (TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]))
        return self._split

    def _load(self, train: bool) -> Dataset:
        return self._splits()[0 if train else 1]
