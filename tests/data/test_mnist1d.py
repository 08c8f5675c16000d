"""NoisyMNIST1DDataModule on small generated data: the package's own generator, splits, noise, ground truth."""

from __future__ import annotations

import importlib.util
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_phases.data import GroundTruth, NoisyMNIST1DDataModule, find_ground_truth
from lightning_phases.errors import LightningPhasesError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="the mnist1d extra")

N = 200  # 20 per class: fast to generate


def _reference(num_samples: int, seed: int = 42):
    """MNIST-1D as the package itself splits it: make_dataset with its defaults (train_split 0.8)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    return make_dataset(args)


def test_the_package_generator_and_its_standard_split():
    ref = _reference(N)
    dm = NoisyMNIST1DDataModule(num_samples=N, val_size=0)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.noisy_train) == 160 and len(dm.test_dataset) == 40  # 4000/1000 at the default 5000
    x_train, y_train = dm.noisy_train.dataset.dataset.tensors
    np.testing.assert_allclose(x_train.numpy(), ref["x"], rtol=0, atol=1e-6)
    assert np.array_equal(y_train.numpy(), ref["y"])
    x0, y0 = dm.test_dataset[0]
    assert x0.shape == (40,) and x0.dtype == torch.float32 and y0.dtype == torch.long
    x_test = torch.stack([dm.test_dataset[i][0] for i in range(len(dm.test_dataset))])
    y_test = torch.stack([dm.test_dataset[i][1] for i in range(len(dm.test_dataset))])
    np.testing.assert_allclose(x_test.numpy(), ref["x_test"], rtol=0, atol=1e-6)
    assert np.array_equal(y_test.numpy(), ref["y_test"])  # the test labels are the clean ones


def test_noise_counts_ground_truth_and_validation_split():
    dm = NoisyMNIST1DDataModule(num_samples=N, noise_rate=0.4, seed=3, val_size=20)
    dm.setup("fit")
    train, val = dm.noisy_train, dm.val_dataset
    assert len(train) == 140 and len(val) == 20
    assert isinstance(train, GroundTruth) and find_ground_truth(dm) is train
    assert int(train.is_noisy.sum()) == round(0.4 * 140)
    assert int(val.is_noisy.sum()) == round(0.4 * 20)  # noisy validation, as in real life
    assert torch.equal(train.is_noisy, train.noisy_targets != train.true_targets)
    ref = _reference(N)
    kept = torch.tensor(train.dataset.indices)
    assert torch.equal(train.true_targets, torch.as_tensor(ref["y"])[kept])  # true labels are the generated ones
    served = torch.stack([train[i][1] for i in range(len(train))])
    assert torch.equal(served, train.noisy_targets)
    clean = NoisyMNIST1DDataModule(num_samples=N, noise_rate=0.4, seed=3, val_size=20, clean_val=True)
    clean.setup("fit")
    assert clean.val_dataset.realised_noise_rate == 0.0
    assert torch.equal(clean.noisy_train.noisy_targets, train.noisy_targets)
    pf = NoisyMNIST1DDataModule(num_samples=N, noise_type="pairflip", noise_rate=0.5, class_map={1: 7, 3: 8})
    pf.setup("fit")
    t, y, m = pf.noisy_train.true_targets, pf.noisy_train.noisy_targets, pf.noisy_train.is_noisy
    assert set(t[m].tolist()) <= {1, 3} and torch.equal(y[m], torch.where(t[m] == 1, 7, 8))
    assert int(m.sum()) == round(0.5 * int((t == 1).sum())) + round(0.5 * int((t == 3).sum()))


def test_determinism_and_the_global_random_state_untouched():
    random.seed(5)
    np.random.seed(5)
    before = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    a = NoisyMNIST1DDataModule(num_samples=N, noise_rate=0.3, seed=1)
    a.setup("fit")
    assert (random.random(), np.random.rand()) == before  # make_dataset's global seeding undone
    b = NoisyMNIST1DDataModule(num_samples=N, noise_rate=0.3, seed=1)
    b.setup("fit")
    assert torch.equal(a.noisy_train.dataset.dataset.tensors[0], b.noisy_train.dataset.dataset.tensors[0])
    assert torch.equal(a.noisy_train.noisy_targets, b.noisy_train.noisy_targets)
    c = NoisyMNIST1DDataModule(num_samples=N, noise_rate=0.3, seed=1, data_seed=7)
    c.setup("fit")
    assert not torch.equal(a.noisy_train.dataset.dataset.tensors[0], c.noisy_train.dataset.dataset.tensors[0])


def test_never_downloads_or_writes(tmp_path, monkeypatch):
    import mnist1d.data

    def refuse(*args, **kwargs):
        raise AssertionError("get_dataset would download or write a pickle")

    monkeypatch.setattr(mnist1d.data, "get_dataset", refuse)
    monkeypatch.setattr(mnist1d.data.requests, "get", refuse)
    monkeypatch.chdir(tmp_path)
    dm = NoisyMNIST1DDataModule(num_samples=N)
    dm.setup("fit")
    dm.setup("test")
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    dm = NoisyMNIST1DDataModule(num_samples=N)  # constructing never needs the package
    with pytest.raises(LightningPhasesError, match=r"lightning-phases\[mnist1d\]"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_samples=205), "multiple of 10"),
        (dict(num_samples=10), "num_samples"),
        (dict(num_samples=200.0), "num_samples"),
        (dict(test_fraction=0.0), "test_fraction"),
        (dict(test_fraction=float("nan")), "test_fraction"),
        (dict(data_seed=-1), "data_seed"),
        (dict(data_seed=2**32), "data_seed"),
        (dict(noise_type="pairflip", noise_rate=0.2), "class_map"),
        (dict(clean_val="no"), "clean_val"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(LightningPhasesError, match=match):
        NoisyMNIST1DDataModule(**kwargs)


@pytest.mark.slow
def test_a_few_training_steps_with_the_example_cnn(tmp_path):
    import lightning.pytorch as lpl  # the namespace examples/models.py uses

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("example_models", root / "examples" / "models.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    model = models.Conv1DClassifier(lr=0.1)
    assert model(torch.zeros(3, 40)).shape == (3, 10)
    dm = NoisyMNIST1DDataModule(num_samples=N, noise_rate=0.2, batch_size=16)
    trainer = lpl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=6,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
        (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert trainer.global_step == 6 and 0.0 <= result["test_err"] <= 1.0
    assert isinstance(model.features[0], nn.Conv1d)
