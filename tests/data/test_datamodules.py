"""The noise-aware wrapper and every datamodule, including torchvision's real loaders on files written here."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_phases.data import (
    GaussianClustersDataModule,
    GroundTruth,
    NoisyCIFAR10DataModule,
    NoisyDigitsDataModule,
    NoisyFashionMNISTDataModule,
    NoisyLabelDataset,
    NoisyMNISTDataModule,
    SparseLinearRegressionDataModule,
    find_ground_truth,
)
from lightning_phases.errors import LabelNoiseError, LightningPhasesError
from tests.fake_torchvision import write_cifar10, write_idx


class _Clf(pl.LightningModule):
    def __init__(self, in_dim: int, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _train(dm, in_dim, tmp_path, steps=5, classes=10):
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Clf(in_dim, classes), datamodule=dm)
    assert trainer.global_step == steps


# ------------------------------------------------------------------ the wrapper


def test_wrapper_serves_noisy_labels_and_keeps_the_truth():
    x = torch.randn(200, 3)
    y = torch.arange(200) % 4
    base = TensorDataset(x, y)
    ds = NoisyLabelDataset(base, noise_rate=0.3, num_classes=4, seed=1)
    assert isinstance(ds, GroundTruth)
    assert torch.equal(ds.true_targets, y) and int(ds.is_noisy.sum()) == 60
    assert torch.equal(ds.is_noisy, ds.noisy_targets != ds.true_targets)
    assert ds.realised_noise_rate == pytest.approx(0.3) and ds.noise_rate == 0.3
    assert torch.equal(ds.noisy_indices, torch.nonzero(ds.is_noisy).flatten())
    xi, yi = ds[5]
    assert torch.equal(xi, x[5]) and yi == ds.noisy_targets[5]
    assert torch.equal(base.tensors[1], torch.arange(200) % 4)  # the wrapped data is untouched


def test_without_builds_the_cleansed_subset_without_copying():
    base = TensorDataset(torch.randn(50, 2), torch.arange(50) % 5)
    ds = NoisyLabelDataset(base, noise_rate=0.4, num_classes=5, seed=0)
    clean = ds.without(ds.noisy_indices)
    assert len(clean) == 30 and not bool(clean.is_noisy.any())
    assert isinstance(clean, GroundTruth)
    k = int(clean.kept_indices[3])
    assert torch.equal(clean[3][0], base[k][0]) and clean[3][1] == ds.noisy_targets[k]
    assert clean.dataset.dataset is base  # a view, no copy
    with pytest.raises(LabelNoiseError, match="indices"):
        ds.without([50])


def test_find_ground_truth():
    base = TensorDataset(torch.randn(10, 2), torch.arange(10) % 2)
    ds = NoisyLabelDataset(base, noise_rate=0.2, seed=0)
    assert find_ground_truth(ds) is ds
    assert find_ground_truth(torch.utils.data.DataLoader(ds)) is ds
    assert find_ground_truth(base) is None
    dm = NoisyDigitsDataModule(noise_rate=0.2)
    dm.setup("fit")
    assert find_ground_truth(dm) is dm.noisy_train


# ------------------------------------------------------------------ digits


def test_digits_splits_noise_and_determinism(tmp_path):
    dm = NoisyDigitsDataModule(noise_rate=0.4, seed=3)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = dm.noisy_train, dm.val_dataset, dm.test_dataset
    assert len(train) + len(val) + len(test) == 1797
    assert int(train.is_noisy.sum()) == round(0.4 * len(train))
    assert val.realised_noise_rate > 0.3  # noisy by default, as in real life
    x, y = test[0]
    assert x.shape == (64,) and x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1
    again = NoisyDigitsDataModule(noise_rate=0.4, seed=3)
    again.setup("fit")
    assert torch.equal(again.noisy_train.noisy_targets, train.noisy_targets)
    clean_val = NoisyDigitsDataModule(noise_rate=0.4, seed=3, clean_val=True)
    clean_val.setup("fit")
    assert clean_val.val_dataset.realised_noise_rate == 0.0
    assert torch.equal(clean_val.noisy_train.noisy_targets, train.noisy_targets)
    _train(dm, 64, tmp_path)


def test_test_split_is_clean_and_labels_are_the_true_ones():
    from sklearn.datasets import load_digits

    dm = NoisyDigitsDataModule(noise_rate=0.6)
    dm.setup("test")
    digits = load_digits()
    lookup = {tuple((digits.data[i] / 16.0).round(6)): int(digits.target[i]) for i in range(len(digits.target))}
    for i in range(0, len(dm.test_dataset), 17):
        x, y = dm.test_dataset[i]
        assert lookup[tuple(np.round(x.numpy().astype(np.float64), 6))] == int(y)


def test_remove_train_samples_and_workers(tmp_path):
    dm = NoisyDigitsDataModule(noise_rate=0.3, num_workers=2, batch_size=64)
    dm.setup("fit")
    noisy = dm.noisy_train.noisy_indices
    dm.remove_train_samples(noisy)
    assert len(dm.train_dataset) == len(dm.noisy_train) - len(noisy)
    assert not bool(dm.train_dataset.is_noisy.any())
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    assert sorted(labels.tolist()) == sorted(dm.train_dataset.noisy_targets.tolist())  # same labels from 2 workers
    assert len(dm.noisy_train) == len(dm.noisy_train.true_targets)  # nothing removed from the full split
    with pytest.raises(LabelNoiseError, match="indices"):
        dm.remove_train_samples([10**6])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noise_rate=1.0), "noise_rate"),
        (dict(noise_type="gaussian"), "unknown noise_type"),
        (dict(noise_type="pairflip", noise_rate=0.2), "class_map"),
        (dict(batch_size=0), "batch_size"),
        (dict(val_size=1.5), "val_size"),
    ],
)
def test_bad_datamodule_arguments(kwargs, match):
    with pytest.raises(LabelNoiseError, match=match):
        NoisyDigitsDataModule(**kwargs)


def test_transition_matrix_and_pairflip_in_a_datamodule():
    t = torch.full((10, 10), 0.02)
    t.fill_diagonal_(0.82)
    dm = NoisyDigitsDataModule(noise_type=t)
    dm.setup("fit")
    assert 0.1 < dm.noisy_train.realised_noise_rate < 0.26
    pf = NoisyDigitsDataModule(noise_type="pairflip", noise_rate=0.4, class_map={1: 7})
    pf.setup("fit")
    flipped = pf.noisy_train.is_noisy
    assert torch.all(pf.noisy_train.true_targets[flipped] == 1) and torch.all(
        pf.noisy_train.noisy_targets[flipped] == 7
    )


# ------------------------------------------------------------------ torchvision formats written by the test


@pytest.mark.parametrize("cls,name", [(NoisyMNISTDataModule, "MNIST"), (NoisyFashionMNISTDataModule, "FashionMNIST")])
def test_mnist_like_from_idx_files(tmp_path, cls, name):
    write_idx(tmp_path, name)
    dm = cls(str(tmp_path), noise_rate=0.25, batch_size=8, val_size=8)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.noisy_train) == 56 and len(dm.val_dataset) == 8 and len(dm.test_dataset) == 32
    assert int(dm.noisy_train.is_noisy.sum()) == round(0.25 * 56)
    x, y = dm.noisy_train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(dm.noisy_train.true_targets, torch.tensor([int(i) % 10 for i in dm.noisy_train.dataset.indices]))
    _train(dm, 28 * 28, tmp_path)


def test_mnist_missing_files_error(tmp_path):
    dm = NoisyMNISTDataModule(str(tmp_path / "nothing"))
    with pytest.raises(LightningPhasesError, match="download=True"):
        dm.setup("fit")


def test_cifar10_from_pickled_batches(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    dm = NoisyCIFAR10DataModule(
        str(tmp_path), noise_type="pairflip", noise_rate=0.5, batch_size=8, val_size=10, augment=True
    )
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.noisy_train) == 50 and len(dm.test_dataset) == 12
    flipped = dm.noisy_train.is_noisy
    assert flipped.any()
    for src, dst in {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}.items():
        sel = flipped & (dm.noisy_train.true_targets == src)
        assert torch.all(dm.noisy_train.noisy_targets[sel] == dst)
    x, _ = dm.noisy_train[0]
    assert x.shape == (3, 32, 32)
    _train(dm, 3 * 32 * 32, tmp_path)


# ------------------------------------------------------------------ synthetic


def test_gaussian_clusters(tmp_path):
    dm = GaussianClustersDataModule(num_classes=3, dim=5, num_train=300, noise_rate=0.2, seed=4)
    dm.setup()
    assert int(dm.noisy_train.is_noisy.sum()) == 60
    x, y = dm.test_dataset.tensors
    nearest = torch.cdist(x, dm.centres).argmin(1)
    assert float((nearest == y).float().mean()) > 0.95  # separated clusters, clean test labels
    _train(dm, 5, tmp_path, classes=3)
    binary = GaussianClustersDataModule(num_classes=2, noise_rate=0.3)
    binary.setup()
    assert set(binary.noisy_train.noisy_targets.tolist()) == {0, 1}


def test_sparse_linear_regression():
    dm = SparseLinearRegressionDataModule(dim=30, sparsity=4, num_train=50, num_test=20, seed=2)
    theta = dm.theta_star
    assert theta.shape == (30,) and int((theta != 0).sum()) == 4 and abs(float(theta.norm()) - 1) < 1e-6
    dm.setup()
    x, y = dm.train_dataset.tensors
    torch.testing.assert_close(y, x @ theta)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (32, 30) and yb.shape == (32,) and yb.dtype == torch.float32
    noisy = SparseLinearRegressionDataModule(dim=30, sparsity=4, num_train=5000, noise_std=0.5, seed=2)
    noisy.setup()
    xn, yn = noisy.train_dataset.tensors
    assert abs(float((yn - xn @ noisy.theta_star).std()) - 0.5) < 0.03
    with pytest.raises(LabelNoiseError, match="sparsity"):
        SparseLinearRegressionDataModule(dim=3, sparsity=5)


def test_classes_keeps_a_subset_and_relabels(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    n_kept = int(np.isin(digits.target, [7, 9]).sum())
    dm = NoisyDigitsDataModule(noise_rate=0.2, classes=[7, 9], seed=1, val_size=0.1)
    dm.setup("fit")
    dm.setup("test")
    assert dm.num_classes == 2
    assert len(dm.noisy_train) + len(dm.val_dataset) + len(dm.test_dataset) == n_kept
    assert set(dm.noisy_train.true_targets.tolist()) == {0, 1}
    assert int(dm.noisy_train.is_noisy.sum()) == round(0.2 * len(dm.noisy_train))
    # relabelled in the given order: 7 -> 0, 9 -> 1 (checked against the raw sklearn data)
    lookup = {tuple((digits.data[i] / 16.0).round(6)): int(digits.target[i]) for i in range(len(digits.target))}
    for i in range(0, len(dm.test_dataset), 7):
        x, y = dm.test_dataset[i]
        assert {0: 7, 1: 9}[int(y)] == lookup[tuple(np.round(x.numpy().astype(np.float64), 6))]
    for i in range(0, len(dm.noisy_train), 11):
        x, _ = dm.noisy_train[i]
        assert {0: 7, 1: 9}[int(dm.noisy_train.true_targets[i])] == lookup[
            tuple(np.round(x.numpy().astype(np.float64), 6))
        ]
    _train(dm, 64, tmp_path, classes=2)
    for bad in ([3], [1, 1], [0, 10]):
        with pytest.raises(LabelNoiseError, match="classes"):
            NoisyDigitsDataModule(classes=bad)
