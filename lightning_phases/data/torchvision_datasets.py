"""Noisy MNIST, FashionMNIST and CIFAR-10 datamodules through torchvision's dataset classes."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from lightning_phases.data._base import _NoisyClassificationDataModule
from lightning_phases.data._checks import check_bool
from lightning_phases.data.noise import CIFAR10_PAIRFLIP, MNIST_PAIRFLIP, NoiseSpec
from lightning_phases.errors import LabelNoiseError

__all__ = ["NoisyMNISTDataModule", "NoisyFashionMNISTDataModule", "NoisyCIFAR10DataModule"]


class _TorchvisionDataModule(_NoisyClassificationDataModule):
    dataset_name = ""
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(
        self,
        data_dir: str = os.path.join("data"),
        *,
        download: bool = False,
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
        if not isinstance(data_dir, (str, os.PathLike)):
            raise LabelNoiseError(f"data_dir must be a path (str or os.PathLike); got data_dir={data_dir!r}.")
        self.data_dir = os.fspath(data_dir)
        self.download = check_bool("download", download)
        self.augment = False

    def _cls(self):
        import torchvision  # type: ignore[import-untyped]

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
        download: Download the files in ``prepare_data`` if missing (needs network).
        noise_type: ``"symmetric"``, ``"uniform"``, ``"pairflip"`` or a 10×10 transition matrix.
        noise_rate: Nominal noise rate ``ρ`` in ``[0, 1)`` of the training (and validation) labels.
        seed: Seed of the noise and of the train/validation split; any non-negative int.
        batch_size: Training batch size.
        num_workers: DataLoader worker processes.
        val_size: Validation part of the training files: a fraction in ``[0, 1)`` or a
            sample count; it must leave at least 2 training samples.
        clean_val: Keep the validation labels clean (default: noisy).
        class_map: ``{source: target}`` flips of ``"pairflip"``. Default MNIST's 2→7, 3→8, 5↔6, 7→1.
        eval_batch_size: Batch size of the validation and test loaders (default ``max(batch_size, 256)``).
        classes: Keep only these classes, relabelled ``0..k-1`` in the given
            order (e.g. ``[7, 9]`` for the clean-priority paper's binary task).
    """

    dataset_name = "MNIST"
    num_classes = 10
    default_class_map = MNIST_PAIRFLIP
    mean, std = (0.1307,), (0.3081,)


class NoisyFashionMNISTDataModule(_TorchvisionDataModule):
    """FashionMNIST (``torchvision.datasets.FashionMNIST``) with label noise; inputs ``[1, 28, 28]`` normalised.

    Args:
        data_dir: Root directory of torchvision's FashionMNIST files.
        download: Download the files in ``prepare_data`` if missing (needs network).
        noise_type: ``"symmetric"``, ``"uniform"``, ``"pairflip"`` or a 10×10 transition matrix.
        noise_rate: Nominal noise rate ``ρ`` in ``[0, 1)`` of the training (and validation) labels.
        seed: Seed of the noise and of the train/validation split; any non-negative int.
        batch_size: Training batch size.
        num_workers: DataLoader worker processes.
        val_size: Validation part of the training files: a fraction in ``[0, 1)`` or a
            sample count; it must leave at least 2 training samples.
        clean_val: Keep the validation labels clean (default: noisy).
        class_map: ``{source: target}`` flips of ``"pairflip"``. Required for ``"pairflip"``.
        eval_batch_size: Batch size of the validation and test loaders (default ``max(batch_size, 256)``).
        classes: Keep only these classes, relabelled ``0..k-1`` in the given
            order (e.g. ``[7, 9]`` for the clean-priority paper's binary task).
    """

    dataset_name = "FashionMNIST"
    num_classes = 10
    mean, std = (0.2860,), (0.3530,)


class NoisyCIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 (``torchvision.datasets.CIFAR10``) with label noise; inputs ``[3, 32, 32]`` normalised per channel.

    Args:
        data_dir: Root directory of torchvision's CIFAR-10 files.
        download: Download the files in ``prepare_data`` if missing (needs network).
        augment: Add the usual random crop (padding 4) and horizontal flip to the
            training split (validation and test are never augmented).
        noise_type: ``"symmetric"``, ``"uniform"``, ``"pairflip"`` or a 10×10 transition matrix.
        noise_rate: Nominal noise rate ``ρ`` in ``[0, 1)`` of the training (and validation) labels.
        seed: Seed of the noise and of the train/validation split; any non-negative int.
        batch_size: Training batch size.
        num_workers: DataLoader worker processes.
        val_size: Validation part of the training files: a fraction in ``[0, 1)`` or a
            sample count; it must leave at least 2 training samples.
        clean_val: Keep the validation labels clean (default: noisy).
        class_map: ``{source: target}`` flips of ``"pairflip"``. Default the standard
            truck→automobile, bird→airplane, deer→horse, cat↔dog.
        eval_batch_size: Batch size of the validation and test loaders (default ``max(batch_size, 256)``).
        classes: Keep only these classes, relabelled ``0..k-1`` in the given
            order (e.g. ``[7, 9]`` for the clean-priority paper's binary task).
    """

    dataset_name = "CIFAR10"
    num_classes = 10
    default_class_map = CIFAR10_PAIRFLIP
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        data_dir: str = os.path.join("data"),
        *,
        download: bool = False,
        augment: bool = False,
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
        super().__init__(
            data_dir,
            download=download,
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
        self.augment = check_bool("augment", augment)

    def _augmentations(self) -> list[Any]:
        from torchvision import transforms

        return [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
