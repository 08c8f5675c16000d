"""NoisyLabelDataset: a map-style classification dataset with reproducible label noise and its ground truth."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_phases.data.noise import NoiseSpec, apply_label_noise
from lightning_phases.errors import LabelNoiseError

__all__ = ["NoisyLabelDataset", "dataset_targets"]


def dataset_targets(dataset: Dataset) -> Tensor:
    """The labels of a classification dataset without loading its inputs when possible.

    Uses ``dataset.targets`` / ``dataset.labels`` (torchvision), the second
    tensor of a ``TensorDataset``, ``Subset`` index mapping, and otherwise
    iterates over the items (``item[1]``).
    """
    from torch.utils.data import Subset, TensorDataset

    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].long().reshape(-1)
    for attr in ("targets", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return torch.as_tensor(value).long().reshape(-1)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


class NoisyLabelDataset(Dataset):
    """Wrap a classification dataset; serve ``(input, noisy_target)`` and keep the ground truth.

    The wrapped dataset and its files are never modified: the noisy labels
    live in this wrapper. Items stay ``(input, noisy_target)``, so an existing
    ``training_step`` works unchanged.

    Implements the ground-truth protocol
    (:class:`~lightning_phases.data.protocol.GroundTruth`): ``noisy_targets``,
    ``true_targets`` and ``is_noisy``, all indexed like the dataset.

    Args:
        dataset: Any map-style dataset whose items are ``(input, label, ...)``.
        noise: ``"symmetric"``, ``"uniform"``, ``"pairflip"`` or a ``C×C`` transition matrix.
        noise_rate: Nominal rate ``ρ`` in ``[0, 1)``.
        num_classes: ``C``; default ``max(label) + 1``.
        seed: Seed of the noise (the same seed gives the same labels everywhere).
        class_map: The class map of ``"pairflip"``.
        targets: The clean labels, if known (avoids reading them from ``dataset``).
        noisy_targets: Use these noisy labels instead of drawing them (e.g. a
            real noisy-label benchmark's labels).

    Attributes:
        noisy_targets: Labels served, long ``[N]``.
        true_targets: Clean labels, long ``[N]``.
        is_noisy: ``noisy_targets != true_targets``, bool ``[N]``.
        noise_rate: The nominal rate.
        realised_noise_rate: ``is_noisy.mean()``.
        noisy_indices: Indices of the mislabeled samples, long ``[N_w]``.
        kept_indices: On a dataset made by :meth:`without` only: the indices it kept, long ``[N]``.
    """

    kept_indices: Tensor  # set by `without` only

    def __init__(
        self,
        dataset: Dataset,
        *,
        noise: NoiseSpec = "symmetric",
        noise_rate: float = 0.0,
        num_classes: int | None = None,
        seed: int = 0,
        class_map: Mapping[int, int] | None = None,
        targets: Tensor | None = None,
        noisy_targets: Tensor | None = None,
    ) -> None:
        self.dataset = dataset
        true = dataset_targets(dataset) if targets is None else torch.as_tensor(targets).long().reshape(-1)
        if true.numel() != len(dataset):  # type: ignore[arg-type]
            raise LabelNoiseError(f"targets has {true.numel()} labels but the dataset has {len(dataset)} samples.")  # type: ignore[arg-type]
        if num_classes is None:
            num_classes = int(true.max()) + 1 if true.numel() else 2
        self.num_classes = int(num_classes)
        self.noise = noise
        self.noise_rate = float(noise_rate)
        self.seed = seed
        self.true_targets = true
        if noisy_targets is not None:
            noisy = torch.as_tensor(noisy_targets).long().reshape(-1)
            if noisy.shape != true.shape:
                raise LabelNoiseError(
                    f"noisy_targets has {noisy.numel()} labels but the dataset has {true.numel()} samples."
                )
        else:
            noisy = apply_label_noise(true, noise, self.noise_rate, self.num_classes, seed=seed, class_map=class_map)
        self.noisy_targets = noisy
        self.is_noisy = noisy != true

    @property
    def realised_noise_rate(self) -> float:
        """Fraction of samples whose served label differs from the true label."""
        return float(self.is_noisy.float().mean()) if self.is_noisy.numel() else 0.0

    @property
    def noisy_indices(self) -> Tensor:
        """Indices of the mislabeled samples."""
        return torch.nonzero(self.is_noisy).flatten()

    def __len__(self) -> int:
        return int(self.true_targets.numel())

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        item = self.dataset[index]
        x = item[0] if isinstance(item, (tuple, list)) else item
        return x, self.noisy_targets[index]

    def without(self, indices: Sequence[int] | Tensor) -> NoisyLabelDataset:
        """The cleansed dataset: every sample except ``indices``, without copying any input.

        The result is a :class:`NoisyLabelDataset` over a ``Subset`` of the
        wrapped dataset, with the matching slices of the labels and mask, so
        it still implements the ground-truth protocol.
        """
        from torch.utils.data import Subset

        drop = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if drop.numel() and (int(drop.min()) < 0 or int(drop.max()) >= len(self)):
            raise LabelNoiseError(f"indices to remove must lie in [0, {len(self) - 1}].")
        keep_mask = torch.ones(len(self), dtype=torch.bool)
        keep_mask[drop] = False
        keep = torch.nonzero(keep_mask).flatten()
        out = NoisyLabelDataset.__new__(NoisyLabelDataset)
        out.dataset = Subset(self.dataset, keep.tolist())
        out.num_classes = self.num_classes
        out.noise, out.noise_rate, out.seed = self.noise, self.noise_rate, self.seed
        out.true_targets = self.true_targets[keep]
        out.noisy_targets = self.noisy_targets[keep]
        out.is_noisy = self.is_noisy[keep]
        out.kept_indices = keep
        return out

    def __repr__(self) -> str:
        return (
            f"NoisyLabelDataset(n={len(self)}, classes={self.num_classes}, noise={self.noise if isinstance(self.noise, str) else 'matrix'!s}, "
            f"rate={self.noise_rate}, realised={self.realised_noise_rate:.4f}, seed={self.seed})"
        )
