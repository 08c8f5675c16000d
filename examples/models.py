"""LightningModules used by the examples: plain models with no knowledge of lightning_phases.

The callbacks, datamodules and optimizers come from the package through the
YAML configs; these modules are what a user would already have.
"""

from __future__ import annotations

import math

try:  # the unified package, or the standalone one
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl  # type: ignore[no-redef]
import torch
from torch import nn


class _Classifier(pl.LightningModule):
    """Cross-entropy training with SGD; logs validation and test error (against their labels)."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def loss(self, out, y):
        return nn.functional.cross_entropy(out, y)

    def predict_labels(self, out):
        return out.argmax(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def _eval(self, batch, stage: str) -> None:
        x, y = batch
        out = self(x)
        self.log(f"{stage}_loss", self.loss(out, y))
        self.log(f"{stage}_err", (self.predict_labels(out) != y).float().mean())

    def validation_step(self, batch, batch_idx):
        self._eval(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class MLPClassifier(_Classifier):
    """A fully connected ReLU network ``in_dim → hidden… → num_classes`` (Feng & Tu's MLPs).

    Args:
        in_dim: Flattened input size (784 for MNIST, 64 for digits).
        hidden: Widths of the hidden layers.
        num_classes: Output logits.
        lr, momentum, weight_decay: SGD settings.
    """

    def __init__(
        self,
        in_dim: int = 784,
        hidden: list[int] = [50, 50],  # noqa: B006 - a LightningCLI default, never mutated
        num_classes: int = 10,
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, momentum, weight_decay)
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(_Classifier):
    """Two conv blocks and a linear head; flat inputs are reshaped to ``[C, S, S]``.

    Args:
        in_channels: 3 for CIFAR-10, 1 for digits/MNIST.
        image_size: Side length ``S`` (32 for CIFAR-10, 8 for digits).
        channels: Channels of the two conv blocks.
        num_classes: Output logits.
        lr, momentum, weight_decay: SGD settings.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        channels: list[int] = [32, 64],  # noqa: B006
        num_classes: int = 10,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        super().__init__(lr, momentum, weight_decay)
        self.save_hyperparameters()
        c1, c2 = channels
        self.in_channels, self.image_size = in_channels, image_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        x = x.reshape(x.shape[0], self.in_channels, self.image_size, self.image_size)
        return self.head(self.features(x))


class WideBinaryNet(_Classifier):
    """A wide two-layer ReLU network with one logit and the logistic loss (clean-priority learning).

    The output layer is scaled by ``1/sqrt(width)`` (NTK parameterisation), so
    the network's output is near 0 at initialisation as in the paper.

    Args:
        in_dim: Flattened input size.
        width: Hidden width.
        lr: SGD learning rate.
    """

    def __init__(self, in_dim: int = 784, width: int = 2048, lr: float = 0.5) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        self.hidden = nn.Linear(in_dim, width)
        self.out = nn.Linear(width, 1, bias=False)
        self.scale = 1.0 / math.sqrt(width)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x.flatten(1)))) * self.scale

    def loss(self, out, y):
        return nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y.float())

    def predict_labels(self, out):
        return (out.reshape(-1) > 0).long()


class Conv1DClassifier(_Classifier):
    """MNIST-1D's reference CNN: three strided ``Conv1d`` layers with ReLU and a linear head.

    As ``ConvBase`` of the MNIST-1D repository (25 channels, kernels 5, 3, 3,
    stride 2, padding 1); flat inputs ``[B, L]`` are read as one channel
    ``[B, 1, L]``. On MNIST-1D it reaches a far higher test accuracy than an MLP
    of similar size.

    Args:
        in_length: Signal length ``L`` (40 for MNIST-1D).
        channels: Channels of the three conv layers.
        num_classes: Output logits.
        lr, momentum, weight_decay: SGD settings.
    """

    def __init__(
        self,
        in_length: int = 40,
        channels: int = 25,
        num_classes: int = 10,
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, momentum, weight_decay)
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        length = in_length
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x):
        h = self.features(x.reshape(x.shape[0], 1, -1))
        return self.head(h.flatten(1))
