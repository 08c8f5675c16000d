"""LabelNoise in a real Trainer: per-step flip rates, fresh noise, stored labels untouched, seeds, resume."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_phases import LabelNoise, LabelNoiseError


class _Recorder(pl.LightningModule):
    """Records the (index, target) pairs training_step sees; items carry their index as inputs[:, 0]."""

    def __init__(self, regression: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1 if regression else 3)
        self.regression = regression
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x[:, 0].long().clone(), y.clone()))
        out = self.lin(x)
        if self.regression:
            return nn.functional.mse_loss(out.squeeze(-1), y)
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _dataset(n=512, regression=False):
    x = torch.stack([torch.arange(n).float(), torch.ones(n)], 1)
    y = torch.linspace(-1, 1, n) if regression else torch.arange(n) % 3
    return TensorDataset(x, y)


def _fit(tmp_path, callback, ds, *, epochs=2, batch_size=128, workers=0, regression=False, ckpt=None, module=None):
    module = module or _Recorder(regression)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
    )
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, persistent_workers=workers > 0)
    trainer.fit(module, loader, ckpt_path=ckpt)
    return module, trainer


def test_per_step_flip_rate_fresh_noise_and_stored_labels(tmp_path):
    ds = _dataset()
    stored = ds.tensors[1].clone()
    tau, b = 0.3, 128
    module, _ = _fit(tmp_path, LabelNoise(tau=tau, num_classes=3, seed=0), ds, epochs=2, batch_size=b)
    assert torch.equal(ds.tensors[1], stored)
    masks = []
    for idx, y in module.seen:
        flipped = y != stored[idx]
        assert abs(flipped.float().mean().item() - tau) <= 4 * math.sqrt(tau * (1 - tau) / b)
        assert ((y >= 0) & (y < 3)).all()
        masks.append(flipped)
    n_steps = len(masks)
    assert n_steps == 8
    # the same samples in epoch 1 and epoch 2 get different noise
    for k in range(n_steps // 2):
        assert not torch.equal(masks[k], masks[k + n_steps // 2])


def test_regression_sigma(tmp_path):
    ds = _dataset(regression=True)
    stored = ds.tensors[1].clone()
    module, _ = _fit(tmp_path, LabelNoise(sigma=0.5, seed=1), ds, epochs=4, regression=True)
    assert torch.equal(ds.tensors[1], stored)
    eps = torch.cat([y - stored[idx] for idx, y in module.seen])
    n = len(eps)
    assert abs(eps.std().item() - 0.5) < 5 * 0.5 / math.sqrt(2 * n)
    assert abs(eps.mean().item()) < 5 * 0.5 / math.sqrt(n)


def _targets(module):
    return torch.cat([y for _, y in module.seen])


def test_reproducible_with_seed_and_independent_of_workers(tmp_path):
    ds = _dataset()
    a, _ = _fit(tmp_path / "a", LabelNoise(tau=0.4, num_classes=3, seed=7), ds)
    b, _ = _fit(tmp_path / "b", LabelNoise(tau=0.4, num_classes=3, seed=7), ds, workers=2)
    c, _ = _fit(tmp_path / "c", LabelNoise(tau=0.4, num_classes=3, seed=8), ds)
    assert torch.equal(_targets(a), _targets(b))
    assert not torch.equal(_targets(a), _targets(c))


def test_ranks_draw_different_noise():
    cb = LabelNoise(tau=0.5, num_classes=3, seed=0)
    y = torch.arange(300) % 3
    assert not torch.equal(cb.noisy(y, cb.generator(0, 0)), cb.noisy(y, cb.generator(1, 0)))
    assert torch.equal(cb.noisy(y, cb.generator(1, 5)), cb.noisy(y, cb.generator(1, 5)))


def test_resume_continues_the_noise_stream(tmp_path):
    ds = _dataset()
    full, _ = _fit(tmp_path / "full", LabelNoise(tau=0.4, num_classes=3, seed=3), ds, epochs=3)
    _, first = _fit(tmp_path / "first", LabelNoise(tau=0.4, num_classes=3, seed=3), ds, epochs=1)
    ckpt = tmp_path / "one.ckpt"
    first.save_checkpoint(ckpt)
    resumed, _ = _fit(tmp_path / "resumed", LabelNoise(tau=0.4, num_classes=3, seed=3), ds, epochs=3, ckpt=ckpt)
    assert torch.equal(_targets(full)[-len(_targets(resumed)) :], _targets(resumed))
    assert len(_targets(resumed)) == 2 * len(ds)


def test_errors(tmp_path):
    with pytest.raises(LabelNoiseError, match="exactly one"):
        LabelNoise()
    with pytest.raises(LabelNoiseError, match="exactly one"):
        LabelNoise(tau=0.1, sigma=0.1)
    with pytest.raises(LabelNoiseError, match="tau"):
        LabelNoise(tau=-0.1)
    with pytest.raises(LabelNoiseError, match="num_classes"):
        _fit(tmp_path, LabelNoise(tau=0.1), _dataset(), epochs=1)
    cb = LabelNoise(tau=0.1, num_classes=3)
    with pytest.raises(LabelNoiseError, match="tuple"):
        cb._perturb((torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)), 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sigma=float("inf")), "sigma is the standard deviation"),
        (dict(sigma=float("nan")), "sigma is the standard deviation"),
        (dict(sigma=-0.1), "sigma is the standard deviation"),
        (dict(tau=1.5, num_classes=3), "tau is the probability"),
        (dict(tau=-0.1, num_classes=3), "tau is the probability"),
        (dict(tau=float("nan"), num_classes=3), "tau is the probability"),
        (dict(tau="0.2", num_classes=3), "tau is the probability"),
        (dict(tau=0.2, num_classes=3, seed=-1), "seed must be a non-negative int"),
        (dict(tau=0.2, num_classes=3, seed=True), "seed must be a non-negative int"),
        (dict(tau=0.2, num_classes=3, seed=1.0), "seed must be a non-negative int"),
        (dict(tau=0.2, num_classes=3, target_key=True), "target_key"),
    ],
)
def test_arguments_that_would_corrupt_training_are_refused(kwargs, match):
    with pytest.raises(LabelNoiseError, match=match) as info:
        LabelNoise(**kwargs)
    bad = {k: v for k, v in kwargs.items() if k != "num_classes" and not (k == "tau" and v == 0.2)}
    assert repr(next(iter(bad.values()))) in str(info.value)


@pytest.mark.parametrize("seed", [0, 2**32, 2**64 + 3, 10**30])
def test_any_non_negative_seed_works(seed):
    noise = LabelNoise(tau=0.5, num_classes=3, seed=seed)
    targets = torch.zeros(64, dtype=torch.long)
    flipped = noise.noisy(targets, noise.generator(0, 0))
    assert 10 < int((flipped != targets).sum()) < 54 and torch.equal(
        flipped, noise.noisy(targets, noise.generator(0, 0))
    )
