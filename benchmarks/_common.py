"""Shared pieces of the benchmarks: a small MLP module and a per-epoch test-accuracy recorder."""

from __future__ import annotations

import os
import platform
import warnings

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_phases.functional import logit_margin


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

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
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


# ---------------------------------------------------------------- shared by cleansing / early_stopping / generalization


def seeded_fit(
    model_fn,
    seed: int,
    epochs: int,
    *,
    datamodule=None,
    train_loader=None,
    val_loader=None,
    callbacks=(),
    limit_val_batches: float | int = 0,
    logger=False,
) -> tuple[pl.LightningModule, pl.Trainer]:
    """Seed everything, build ``model_fn()`` and fit it for ``epochs`` (on a datamodule or on loaders)."""
    import tempfile

    pl.seed_everything(seed, verbose=False)
    model = model_fn()
    trainer = quiet_trainer(
        max_epochs=epochs,
        limit_val_batches=limit_val_batches,
        callbacks=list(callbacks),
        default_root_dir=tempfile.mkdtemp(),
        logger=logger,
    )
    if datamodule is not None:
        trainer.fit(model, datamodule=datamodule)
    else:
        trainer.fit(model, train_loader, val_loader)
    return model, trainer


def accuracy_of_state(model_fn, state_dict, loader, fallback: float) -> float:
    """Test accuracy of ``model_fn()`` with ``state_dict`` loaded; ``fallback`` when there is none."""
    if state_dict is None:
        return fallback
    model = model_fn()
    model.load_state_dict(state_dict)
    return accuracy(model, loader)


def cross_validated_probabilities(
    train, model_fn, num_classes: int, epochs: int, seed: int, folds: int = 5, batch_size: int = 32
) -> torch.Tensor:
    """Out-of-fold predicted probabilities ``[N, C]`` of ``train`` (its served, noisy labels): ``folds`` trainings."""
    from torch.utils.data import DataLoader, Subset

    n = len(train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 100))
    probs = torch.zeros(n, num_classes)
    for k in range(folds):
        held = perm[k::folds]
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        loader = DataLoader(Subset(train, torch.nonzero(keep).flatten().tolist()), batch_size=batch_size, shuffle=True)
        model, _ = seeded_fit(model_fn, seed + k, epochs, train_loader=loader)
        model.eval()
        with torch.no_grad():
            x = torch.stack([train[int(i)][0] for i in held])
            probs[held] = torch.softmax(model(x), 1)
    return probs


def cleanlab_issues(train, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cleanlab's ``find_label_issues`` (bool ``[N]``) and ``1 − get_label_quality_scores`` (``[N]``)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = train.noisy_targets.numpy()
    issues = torch.as_tensor(find_label_issues(labels, probs.numpy()))
    scores = 1.0 - torch.as_tensor(get_label_quality_scores(labels, probs.numpy()), dtype=torch.float64)
    return issues, scores


class PerSampleLossRecorder(pl.Callback):
    """The oracle's view of the training set after every epoch: the loss AUROC of the mislabeled samples
    and the true gap ``L_w − L_c`` (reads the ground truth; eval mode, the served noisy labels)."""

    def __init__(self, dataset, batch_size: int = 1024, keep: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.keep = keep
        self.auroc: dict[int, float] = {}
        self.gap: dict[int, float] = {}
        self.losses: dict[int, torch.Tensor] = {}  # with keep=True: the per-sample losses [n] of every epoch
        self.correct: dict[int, torch.Tensor] = {}  # with keep=True: argmax == served label [n] of every epoch
        self.margins: dict[int, torch.Tensor] = {}  # with keep=True: functional.logit_margin [n] of every epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        from sklearn.metrics import roc_auc_score
        from torch.utils.data import DataLoader

        truth = self.dataset.is_noisy
        if not self.keep and (not bool(truth.any()) or bool(truth.all())):
            return
        was = pl_module.training
        pl_module.eval()
        losses, correct, margins = [], [], []
        with torch.no_grad():
            for x, y in DataLoader(self.dataset, batch_size=self.batch_size):
                logits = pl_module(x)
                losses.append(nn.functional.cross_entropy(logits, y, reduction="none"))
                correct.append(logits.argmax(-1) == y)
                if self.keep:
                    margins.append(logit_margin(logits, y))
        pl_module.train(was)
        loss = torch.cat(losses).double()
        epoch = trainer.current_epoch
        if self.keep:
            self.losses[epoch] = loss.float()
            self.correct[epoch] = torch.cat(correct)
            self.margins[epoch] = torch.cat(margins).float()
        if not bool(truth.any()) or bool(truth.all()):
            return
        self.auroc[epoch] = float(roc_auc_score(truth.numpy(), loss.numpy()))
        self.gap[epoch] = float(loss[truth].mean() - loss[~truth].mean())
