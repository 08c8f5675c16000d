"""The papers' synthetic setups: noisy Gaussian clusters and sparse linear regression."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_phases import _lightning as pl
from lightning_phases.data._checks import (
    check_bool,
    check_eval_batch_size,
    check_int,
    check_noise,
    check_real,
    check_seed,
    generator,
)
from lightning_phases.data.dataset import NoisyLabelDataset
from lightning_phases.data.noise import NoiseSpec
from lightning_phases.errors import LabelNoiseError

__all__ = ["GaussianClustersDataModule", "SparseLinearRegressionDataModule"]


class GaussianClustersDataModule(pl.LightningDataModule):
    """Separated Gaussian clusters in ``d`` dimensions with label noise (the clean-priority paper's setup).

    Class ``c`` has centre ``μ_c`` (``separation`` apart on average, random
    directions) and samples ``x = μ_c + σ ξ``, ``ξ ~ N(0, I_d/d)``. With
    ``num_classes=2`` the data is the binary task of the paper (train a
    one-logit model with the logistic loss; targets are ``0``/``1``).
    Training labels get ``noise_rate`` noise; validation is noisy unless
    ``clean_val``; the test split is clean.

    Args:
        num_classes: ``C >= 2``.
        dim: Input dimension ``d >= 1``.
        num_train: Training samples (``>= 2``).
        num_val: Validation samples (``>= 0``).
        num_test: Test samples (``>= 1``).
        separation: Distance scale between cluster centres, finite and ``> 0``.
        spread: Within-cluster standard deviation ``σ`` (per unit-norm direction), finite and ``> 0``.
        noise_type: ``"symmetric"``, ``"uniform"``, ``"pairflip"`` (needs ``class_map``)
            or a ``C×C`` transition matrix.
        noise_rate: Nominal noise rate ``ρ`` in ``[0, 1)`` of the training (and validation) labels.
        clean_val: Keep the validation labels clean.
        seed: Seed of centres, samples and noise; any non-negative int.
        batch_size: Training batch size.
        num_workers: DataLoader worker processes.
        class_map: ``{source: target}`` flips of ``"pairflip"``.
        eval_batch_size: Batch size of the validation and test loaders (default ``max(batch_size, 256)``).

    Attributes:
        centres: Cluster centres ``[C, d]``.
        noisy_train: The noisy training split (implements the ground-truth protocol).
    """

    def __init__(
        self,
        *,
        num_classes: int = 2,
        dim: int = 20,
        num_train: int = 1000,
        num_val: int = 200,
        num_test: int = 1000,
        separation: float = 3.0,
        spread: float = 1.0,
        noise_type: NoiseSpec = "symmetric",
        noise_rate: float = 0.0,
        clean_val: bool = False,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        class_map: Mapping[int, int] | None = None,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, 2)
        self.dim = check_int("dim", dim, 1)
        self.sizes = (
            check_int("num_train", num_train, 2),
            check_int("num_val", num_val, 0),
            check_int("num_test", num_test, 1),
        )
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.eval_batch_size = check_eval_batch_size(eval_batch_size, self.batch_size)
        self.noise_type, self.noise_rate = check_noise(noise_type, noise_rate)
        self.separation = check_real("separation", separation, minimum=0.0, strict_minimum=True)
        self.spread = check_real("spread", spread, minimum=0.0, strict_minimum=True)
        self.clean_val = check_bool("clean_val", clean_val)
        self.seed = check_seed("seed", seed)
        if noise_type == "pairflip" and class_map is None:
            raise LabelNoiseError(
                "noise_type='pairflip' needs class_map= for GaussianClustersDataModule (a {source: target} "
                f"mapping, e.g. {{c: (c + 1) % {num_classes} for c in range({num_classes})}})."
            )
        self.class_map = class_map
        gen = generator(self.seed, "gaussian_clusters")
        self.centres = self.separation * torch.randn(num_classes, dim, generator=gen) / math.sqrt(dim)
        self._gen_state = gen.get_state()
        self.noisy_train: NoisyLabelDataset | None = None
        self.val_dataset: NoisyLabelDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def _sample(self, n: int, gen: torch.Generator) -> TensorDataset:
        y = torch.arange(n) % self.num_classes
        y = y[torch.randperm(n, generator=gen)]
        x = self.centres[y] + self.spread * torch.randn(n, self.dim, generator=gen) / math.sqrt(self.dim)
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        if self.noisy_train is not None:
            return
        gen = torch.Generator()
        gen.set_state(self._gen_state)
        train, val, test = (self._sample(n, gen) for n in self.sizes)
        self.noisy_train = NoisyLabelDataset(
            train,
            noise=self.noise_type,
            noise_rate=self.noise_rate,
            num_classes=self.num_classes,
            seed=self.seed,
            class_map=self.class_map,
        )
        self.val_dataset = NoisyLabelDataset(
            val,
            noise=self.noise_type,
            noise_rate=0.0 if self.clean_val else self.noise_rate,
            num_classes=self.num_classes,
            seed=self.seed + 1,
            class_map=self.class_map,
        )
        self.test_dataset = test

    @property
    def train_dataset(self) -> NoisyLabelDataset:
        self.setup()
        assert self.noisy_train is not None
        return self.noisy_train

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self.val_dataset is not None  # set by setup
        return DataLoader(self.val_dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        assert self.test_dataset is not None  # set by setup
        return DataLoader(self.test_dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers)


class SparseLinearRegressionDataModule(pl.LightningDataModule):
    """Gaussian inputs and a sparse ground truth: ``y = θ*ᵀx`` (the label-noise SGD paper's setup).

    Args:
        dim: Input dimension ``>= 1``.
        sparsity: Number of non-zero entries of ``θ*`` (unit norm overall), ``1..dim``.
        num_train: Training samples (``>= 1``).
        num_val: Validation samples (``>= 0``; clean).
        num_test: Test samples (``>= 0``; clean).
        noise_std: Standard deviation of additive label noise on the training split, finite and ``>= 0``.
        batch_size: Batch size of every loader unless ``eval_batch_size`` is given.
        seed: Seed of ``θ*`` and of the samples; any non-negative int.
        num_workers: DataLoader worker processes.
        eval_batch_size: Batch size of the validation and test loaders (default ``batch_size``).

    Attributes:
        theta_star: The ground truth ``θ*``, float32 ``[dim]``, available right after construction.
    """

    def __init__(
        self,
        *,
        dim: int = 100,
        sparsity: int = 5,
        num_train: int = 200,
        num_val: int = 0,
        num_test: int = 1000,
        noise_std: float = 0.0,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.sparsity = check_int("sparsity", sparsity, 1)
        if sparsity > dim:
            raise LabelNoiseError(f"sparsity={sparsity} exceeds dim={dim}; pass sparsity <= dim.")
        self.sizes = (
            check_int("num_train", num_train, 1),
            check_int("num_val", num_val, 0),
            check_int("num_test", num_test, 0),
        )
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.eval_batch_size = check_eval_batch_size(eval_batch_size, self.batch_size, default_minimum=0)
        self.noise_std = check_real("noise_std", noise_std, minimum=0.0)
        self.seed = check_seed("seed", seed)
        self.num_workers = check_int("num_workers", num_workers, 0)
        gen = generator(self.seed, "sparse_linear_regression")
        support = torch.randperm(dim, generator=gen)[:sparsity]
        theta = torch.zeros(dim)
        theta[support] = torch.randn(sparsity, generator=gen)
        self.theta_star = theta / theta.norm()
        self._gen_state = gen.get_state()
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def _sample(self, n: int, gen: torch.Generator, noise: float) -> TensorDataset:
        x = torch.randn(n, self.dim, generator=gen)
        y = x @ self.theta_star
        if noise > 0:
            y = y + noise * torch.randn(n, generator=gen)
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        gen = torch.Generator()
        gen.set_state(self._gen_state)
        n_train, n_val, n_test = self.sizes
        self.train_dataset = self._sample(n_train, gen, self.noise_std)
        self.val_dataset = self._sample(n_val, gen, 0.0)
        self.test_dataset = self._sample(n_test, gen, 0.0)

    def _loader(self, ds, shuffle: bool, batch_size: int) -> DataLoader:
        self.setup()
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_dataset, False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_dataset, False, self.eval_batch_size)
