"""Shared pieces of the benchmarks: a small MLP module and a per-epoch test-accuracy recorder."""

from __future__ import annotations

import os
import platform
import warnings

import pytorch_lightning as pl
import torch
from torch import nn


class Classifier(pl.LightningModule):
    """Cross-entropy training of any ``net`` with plain SGD; logs train_loss, and val_loss/val_err when validating."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val_loss", nn.functional.cross_entropy(out, y), prog_bar=False)
        self.log("val_err", (out.argmax(1) != y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class MLPClassifier(Classifier):
    """A plain ReLU MLP ``in_dim → hidden (× depth) → num_classes`` (the digits demo's network by default)."""

    def __init__(
        self, in_dim: int = 64, hidden: int = 128, num_classes: int = 10, lr: float = 0.05, depth: int = 2
    ) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        super().__init__(nn.Sequential(nn.Flatten(), *layers), lr)
        self.save_hyperparameters()


def accuracy(model: nn.Module, loader) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train(was)
    return correct / max(1, total)


class TestAccuracyRecorder(pl.Callback):
    """The oracle's view: test accuracy after every epoch (reads the clean test labels)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.by_epoch: dict[int, float] = {}
        self.by_step: dict[int, float] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        acc = accuracy(pl_module, self.loader)
        self.by_epoch[trainer.current_epoch] = acc
        self.by_step[trainer.global_step] = acc


def quiet_trainer(**kwargs) -> pl.Trainer:
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_phases").setLevel(logging.ERROR)
    defaults = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def machine() -> str:
    try:
        import subprocess

        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
            platform.processor(),
        )
    except OSError:
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
