"""Noisy-label data: label-noise models, a noise-aware dataset wrapper and datamodules.

The ground truth (clean labels and the noise mask) is never lost: see
:mod:`lightning_phases.data.protocol` for the attributes callbacks read.
"""

from lightning_phases.data.dataset import NoisyLabelDataset, dataset_targets
from lightning_phases.data.digits import NoisyDigitsDataModule
from lightning_phases.data.mnist1d import NoisyMNIST1DDataModule
from lightning_phases.data.noise import (
    CIFAR10_PAIRFLIP,
    MNIST_PAIRFLIP,
    NOISE_TYPES,
    apply_label_noise,
    pairflip_noise,
    symmetric_noise,
    transition_noise,
    uniform_noise,
)
from lightning_phases.data.protocol import GroundTruth, find_ground_truth
from lightning_phases.data.synthetic import GaussianClustersDataModule, SparseLinearRegressionDataModule
from lightning_phases.data.torchvision_datasets import (
    NoisyCIFAR10DataModule,
    NoisyFashionMNISTDataModule,
    NoisyMNISTDataModule,
)

__all__ = [
    "NOISE_TYPES",
    "CIFAR10_PAIRFLIP",
    "MNIST_PAIRFLIP",
    "symmetric_noise",
    "uniform_noise",
    "pairflip_noise",
    "transition_noise",
    "apply_label_noise",
    "NoisyLabelDataset",
    "dataset_targets",
    "GroundTruth",
    "find_ground_truth",
    "NoisyDigitsDataModule",
    "NoisyMNIST1DDataModule",
    "NoisyMNISTDataModule",
    "NoisyFashionMNISTDataModule",
    "NoisyCIFAR10DataModule",
    "GaussianClustersDataModule",
    "SparseLinearRegressionDataModule",
]
