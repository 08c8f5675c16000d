"""Tiny LightningModules and datasets for the callback tests."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class NoisyTensorDataset(Dataset):
    """Gaussian clusters with symmetric label noise, implementing the ground-truth protocol."""

    def __init__(self, n: int = 96, dim: int = 6, num_classes: int = 3, rate: float = 0.3, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        centres = 2.0 * torch.randn(num_classes, dim, generator=gen)
        self.true_targets = torch.arange(n) % num_classes
        self.x = centres[self.true_targets] + 0.7 * torch.randn(n, dim, generator=gen)
        flip = torch.randperm(n, generator=gen)[: round(rate * n)]
        self.noisy_targets = self.true_targets.clone()
        self.noisy_targets[flip] = (
            self.true_targets[flip] + torch.randint(1, num_classes, (len(flip),), generator=gen)
        ) % num_classes
        self.is_noisy = self.noisy_targets != self.true_targets

    def __len__(self) -> int:
        return len(self.true_targets)

    def __getitem__(self, i: int):
        return self.x[i], self.noisy_targets[i]


class PlainDataset(Dataset):
    """The same data without the ground-truth attributes."""

    def __init__(self, inner: NoisyTensorDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


class TinyClassifier(pl.LightningModule):
    def __init__(
        self, dim: int = 6, num_classes: int = 3, hidden: int = 16, lr: float = 0.2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader(dataset: Dataset, batch_size: int = 8, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


class RecordingLogger(pl.loggers.Logger):
    """Keeps every ``log_metrics`` call in memory and appends it to a JSON-lines file (works across spawn)."""

    def __init__(self, path) -> None:
        super().__init__()
        self.path = str(path)
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    @pl.utilities.rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @pl.utilities.rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        import json

        clean = {k: float(v) for k, v in metrics.items()}
        self.records.append((step, clean))
        import os

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, "metrics": clean}) + "\n")


def read_records(path) -> list[tuple[int, dict]]:
    import json

    with open(path) as fh:
        return [(r["step"], r["metrics"]) for r in map(json.loads, fh)]


def series(records, key: str) -> list[tuple[int, float]]:
    return [(step, m[key]) for step, m in records if key in m]


def trainer(tmp_path, callbacks, *, logger=None, max_epochs: int = 2, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=kwargs.pop("devices", 1),
        logger=logger if logger is not None else RecordingLogger(tmp_path / "log.jsonl"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        **kwargs,
    )


class DestroyProcessGroupAtExit(pl.Callback):
    """In each spawned rank, destroy the gloo process group in an ``atexit`` handler.

    Lightning registers this handler itself only for NCCL. With gloo, a rank
    whose process group is still alive at interpreter shutdown occasionally
    aborts in the C++ destructors ("terminate called without an active
    exception", SIGABRT) after all the work is done -- seen about once in ten
    full-suite runs here, never in isolation. Destroying the group first, as
    Lightning does for NCCL, takes the race away.
    """

    def setup(self, trainer, pl_module, stage) -> None:
        import atexit

        import torch.distributed as dist

        def destroy() -> None:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

        if trainer.world_size > 1:
            atexit.register(destroy)


# ---------------------------------------------------------------- model interfaces for the probe adapter tests


class TwoInputClassifier(TinyClassifier):
    """``forward(a, b)``: two input tensors (a tuple batch entry passed positionally)."""

    def __init__(self, dim_a: int = 4, dim_b: int = 2, num_classes: int = 3) -> None:
        super().__init__(dim=dim_a + dim_b, num_classes=num_classes)

    def forward(self, a, b):
        return self.net(torch.cat([a, b], dim=1))

    def training_step(self, batch, batch_idx):
        (a, b), y = batch
        return nn.functional.cross_entropy(self(a, b), y)


class DictInputDictOutputClassifier(TinyClassifier):
    """``forward(*, features, extra)`` returning ``{"logits": ..., "hidden": ...}`` (dict batches ``{"inputs": {...}, "label": y}``)."""

    def forward(self, features, extra):
        hidden = self.net[0](features) * extra
        return {"hidden": hidden, "logits": self.net[3](self.net[2](self.net[1](hidden)))}

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(**batch["inputs"])["logits"], batch["label"])


class BackboneOnly(pl.LightningModule):
    """A LightningModule without ``forward()``: ``training_step`` calls ``self.backbone``."""

    def __init__(self, dim: int = 6, num_classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, num_classes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.backbone(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class SequenceDataset(Dataset):
    """Variable-length sequences ``[T_i, dim]`` with a class label; needs :func:`pad_collate`."""

    def __init__(self, n: int = 64, dim: int = 4, num_classes: int = 3, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % num_classes
        centres = torch.randn(num_classes, dim, generator=gen)
        lengths = torch.randint(2, 7, (n,), generator=gen)
        self.seqs = [centres[self.y[i]] + 0.5 * torch.randn(int(lengths[i]), dim, generator=gen) for i in range(n)]

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int):
        return self.seqs[i], self.y[i]


def pad_collate(items):
    """``((padded [n, T, d], mask [n, T]), y)`` from variable-length items."""
    seqs, ys = zip(*items)
    padded = nn.utils.rnn.pad_sequence(list(seqs), batch_first=True)
    mask = torch.zeros(padded.shape[:2])
    for i, s in enumerate(seqs):
        mask[i, : len(s)] = 1.0
    return (padded, mask), torch.stack(list(ys))


class MaskedMeanClassifier(TinyClassifier):
    """Masked mean over time of padded sequences, then an MLP: ``forward(padded, mask)``."""

    def __init__(self, dim: int = 4, num_classes: int = 3) -> None:
        super().__init__(dim=dim, num_classes=num_classes)

    def forward(self, padded, mask):
        pooled = (padded * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.net(pooled)

    def training_step(self, batch, batch_idx):
        (padded, mask), y = batch
        return nn.functional.cross_entropy(self(padded, mask), y)


class RegressionDataset(Dataset):
    """Float targets near 5: ``y = 5 + w·x + noise`` (shape ``[]`` per sample, or ``[k]`` with ``outputs=k``)."""

    def __init__(self, n: int = 64, dim: int = 6, outputs: int | None = None, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=gen)
        w = torch.randn(dim, outputs or 1, generator=gen)
        y = 5.0 + self.x @ w + 0.1 * torch.randn(n, outputs or 1, generator=gen)
        self.y = y if outputs else y.reshape(-1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Regressor(TinyClassifier):
    """MLP regressor trained with MSE; ``outputs`` outputs (targets ``[]`` for one output)."""

    def __init__(self, dim: int = 6, outputs: int = 1, lr: float = 0.02) -> None:
        super().__init__(dim=dim, num_classes=outputs, lr=lr)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x).reshape(y.shape), y)


class MultiLabelDataset(Dataset):
    """Float 0/1 targets over ``labels`` labels."""

    def __init__(self, n: int = 64, dim: int = 6, labels: int = 4, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=gen)
        self.y = (self.x @ torch.randn(dim, labels, generator=gen) > 0).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class MultiLabelClassifier(TinyClassifier):
    def __init__(self, dim: int = 6, labels: int = 4) -> None:
        super().__init__(dim=dim, num_classes=labels)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x), y)
