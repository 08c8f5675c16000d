"""Noisy MNIST, FashionMNIST and CIFAR-10 datamodules through torchvision's dataset classes."""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import Dataset

from lightning_phases.data._base import _NoisyClassificationDataModule
from lightning_phases.data.noise import CIFAR10_PAIRFLIP, MNIST_PAIRFLIP

__all__ = ["NoisyMNISTDataModule", "NoisyFashionMNISTDataModule", "NoisyCIFAR10DataModule"]


class _TorchvisionDataModule(_NoisyClassificationDataModule):
    dataset_name = ""
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(
        self, data_dir: str = os.path.join("data"), *, download: bool = False, augment: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.data_dir = str(data_dir)
        self.download = bool(download)
        self.augment = bool(augment)

    def _cls(self):
        import torchvision

        return getattr(torchvision.datasets, self.dataset_name)

    def prepare_data(self) -> None:
        if self.download:
            cls = self._cls()
            cls(self.data_dir, train=True, download=True)
            cls(self.data_dir, train=False, download=True)

    def _transform(self, train: bool):
        from torchvision import transforms

        steps: list[Any] = []
        if train and self.augment:
            steps += self._augmentations()
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def _augmentations(self) -> list[Any]:
        return []

    def _load_for_validation(self, full: Dataset) -> Dataset:
        return self._load(train=True, augment=False) if self.augment else full

    def _load(self, train: bool, augment: bool | None = None) -> Dataset:
        cls = self._cls()
        try:
            return cls(
                self.data_dir, train=train, download=False, transform=self._transform(train and augment is not False)
            )
        except RuntimeError as err:
            from lightning_phases.errors import LightningPhasesError

            raise LightningPhasesError(
                f"{self.dataset_name} was not found under {self.data_dir!r} ({err}). Pass download=True "
                f"(needs network) or data_dir= pointing at an existing copy."
            ) from err


class NoisyMNISTDataModule(_TorchvisionDataModule):
    """MNIST (``torchvision.datasets.MNIST``) with label noise; inputs ``[1, 28, 28]`` normalised with MNIST's mean/std.

    Args:
        data_dir: Root directory of torchvision's MNIST files.
        download: Download the files in ``prepare_data`` if missing.
        noise_type, noise_rate, seed, batch_size, num_workers, val_size, clean_val,
        class_map (default MNIST's 2→7, 3→8, 5↔6, 7→1 for ``"pairflip"``), eval_batch_size:
            see :class:`~lightning_phases.data.NoisyDigitsDataModule`.
        classes: Keep only these classes, relabelled ``0..k-1`` in the given
            order (e.g. ``[7, 9]`` for the clean-priority paper's binary task).
    """

    dataset_name = "MNIST"
    num_classes = 10
    default_class_map = MNIST_PAIRFLIP
    mean, std = (0.1307,), (0.3081,)


class NoisyFashionMNISTDataModule(_TorchvisionDataModule):
    """FashionMNIST (``torchvision.datasets.FashionMNIST``) with label noise; inputs ``[1, 28, 28]`` normalised.

    Arguments as for :class:`NoisyMNISTDataModule` (``"pairflip"`` needs a ``class_map``).
    """

    dataset_name = "FashionMNIST"
    num_classes = 10
    mean, std = (0.2860,), (0.3530,)


class NoisyCIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 (``torchvision.datasets.CIFAR10``) with label noise; inputs ``[3, 32, 32]`` normalised per channel.

    ``augment=True`` adds the usual random crop (padding 4) and horizontal flip
    to the training split. ``"pairflip"`` defaults to the standard map
    truck→automobile, bird→airplane, deer→horse, cat↔dog.
    """

    dataset_name = "CIFAR10"
    num_classes = 10
    default_class_map = CIFAR10_PAIRFLIP
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def _augmentations(self) -> list[Any]:
        from torchvision import transforms

        return [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
