"""NoisyDigitsDataModule: scikit-learn's bundled 8×8 handwritten digits with label noise (no download)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_phases.data._base import _NoisyClassificationDataModule
from lightning_phases.functional.ensemble import derived_seed

__all__ = ["NoisyDigitsDataModule"]


class NoisyDigitsDataModule(_NoisyClassificationDataModule):
    """The 1,797 8×8 digits of ``sklearn.datasets.load_digits`` with label noise: the embedded default.

    Inputs are the 64 pixel values scaled to ``[0, 1]`` (``x / 16``), float32
    ``[64]``; labels are ``0..9``. A fixed ``test_fraction`` of the data
    (chosen with ``split_seed``) is the clean test split; the rest is split into
    training (noisy) and validation (noisy unless ``clean_val=True``) parts.

    Args:
        test_fraction: Fraction of the 1,797 samples held out as the clean test set.
        split_seed: Seed of the train/test split (independent of the noise ``seed``).
        noise_type, noise_rate, seed, batch_size, num_workers, val_size,
        clean_val, class_map, eval_batch_size, classes: see the package's datamodules
            (``noise_type`` ``"symmetric"``, ``"uniform"``, ``"pairflip"`` with a
            ``class_map``, or a 10×10 transition matrix).

    Attributes:
        noisy_train: The noisy training split (a :class:`~lightning_phases.data.NoisyLabelDataset`).
        num_classes: 10.
    """

    num_classes = 10

    def __init__(self, *, test_fraction: float = 0.2, split_seed: int = 0, batch_size: int = 32, **kwargs) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if not 0 < test_fraction < 1:
            from lightning_phases.errors import LabelNoiseError

            raise LabelNoiseError(f"test_fraction must be in (0, 1); got {test_fraction!r}.")
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self._split: tuple[TensorDataset, TensorDataset] | None = None

    def _splits(self) -> tuple[TensorDataset, TensorDataset]:
        if self._split is None:
            from sklearn.datasets import load_digits

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
