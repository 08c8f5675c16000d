"""The papers' synthetic setups: noisy Gaussian clusters and sparse linear regression."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_phases import _lightning as pl
from lightning_phases.data.dataset import NoisyLabelDataset
from lightning_phases.data.noise import NoiseSpec
from lightning_phases.errors import LabelNoiseError

__all__ = ["GaussianClustersDataModule", "SparseLinearRegressionDataModule"]


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LabelNoiseError(f"{name} must be an int >= {minimum}; got {value!r}.")


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
        dim: Input dimension ``d``.
        num_train, num_val, num_test: Split sizes.
        separation: Distance scale between cluster centres.
        spread: Within-cluster standard deviation ``σ`` (per unit-norm direction).
        noise_type, noise_rate: Label noise of the training (and validation) split.
        clean_val: Keep the validation labels clean.
        seed: Seed of centres, samples and noise.
        batch_size, num_workers: DataLoader settings.

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
    ) -> None:
        super().__init__()
        _positive("num_classes", num_classes, 2)
        _positive("dim", dim)
        _positive("num_train", num_train, 2)
        _positive("num_val", num_val, 0)
        _positive("num_test", num_test, 1)
        _positive("batch_size", batch_size)
        if not 0 <= noise_rate < 1:
            raise LabelNoiseError(f"noise_rate must be in [0, 1); got {noise_rate!r}.")
        if separation <= 0 or spread <= 0:
            raise LabelNoiseError(f"separation and spread must be > 0; got {separation!r}, {spread!r}.")
        self.num_classes, self.dim = num_classes, dim
        self.sizes = (num_train, num_val, num_test)
        self.separation, self.spread = float(separation), float(spread)
        self.noise_type, self.noise_rate, self.clean_val = noise_type, float(noise_rate), bool(clean_val)
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers
        gen = torch.Generator().manual_seed(seed)
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
            train, noise=self.noise_type, noise_rate=self.noise_rate, num_classes=self.num_classes, seed=self.seed
        )
        self.val_dataset = NoisyLabelDataset(
            val,
            noise=self.noise_type,
            noise_rate=0.0 if self.clean_val else self.noise_rate,
            num_classes=self.num_classes,
            seed=self.seed + 1,
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
        return DataLoader(self.val_dataset, batch_size=max(256, self.batch_size), num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.test_dataset, batch_size=max(256, self.batch_size), num_workers=self.num_workers)


class SparseLinearRegressionDataModule(pl.LightningDataModule):
    """Gaussian inputs and a sparse ground truth: ``y = θ*ᵀx`` (the label-noise SGD paper's setup).

    Args:
        dim: Input dimension.
        sparsity: Number of non-zero entries of ``θ*`` (unit norm overall).
        num_train, num_val, num_test: Split sizes.
        noise_std: Standard deviation of additive label noise on the training split.
        batch_size, num_workers: DataLoader settings.
        seed: Seed of ``θ*`` and of the samples.

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
    ) -> None:
        super().__init__()
        _positive("dim", dim)
        _positive("sparsity", sparsity)
        if sparsity > dim:
            raise LabelNoiseError(f"sparsity={sparsity} exceeds dim={dim}.")
        _positive("num_train", num_train)
        _positive("num_val", num_val, 0)
        _positive("num_test", num_test, 0)
        _positive("batch_size", batch_size)
        if noise_std < 0:
            raise LabelNoiseError(f"noise_std must be >= 0; got {noise_std!r}.")
        self.dim, self.sparsity = dim, sparsity
        self.sizes = (num_train, num_val, num_test)
        self.noise_std, self.batch_size, self.seed, self.num_workers = float(noise_std), batch_size, seed, num_workers
        gen = torch.Generator().manual_seed(seed)
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

    def _loader(self, ds, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_dataset, False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_dataset, False)
