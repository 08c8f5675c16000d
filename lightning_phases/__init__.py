"""lightning_phases: the phases of SGD learning with mislabeled data, as Lightning callbacks.

The pure tensor math lives in :mod:`lightning_phases.functional` and never
imports Lightning; importing this top-level package does not import Lightning
either (sub-packages that need it are loaded on first attribute access).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_phases.errors import (
    DegenerateInputError,
    LabelNoiseError,
    LightningPhasesError,
    ParameterSelectionError,
    PhaseStatisticsWarning,
    ProbeMemoryError,
    UnsupportedModelError,
)

__version__ = "0.1.0.dev0"

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs (nothing is imported at run time)
    from lightning_phases import functional
    from lightning_phases.callbacks import (
        GMMCleanser,
        ModelAdapter,
        NoiseSplitTracker,
        OrderParameterMonitor,
        PhaseDetector,
        Probe,
    )
    from lightning_phases.data import (
        GaussianClustersDataModule,
        NoisyCIFAR10DataModule,
        NoisyDigitsDataModule,
        NoisyFashionMNISTDataModule,
        NoisyLabelDataset,
        NoisyMNIST1DDataModule,
        NoisyMNISTDataModule,
        SparseLinearRegressionDataModule,
    )
    from lightning_phases.models import TwoLayerLinearNetwork
    from lightning_phases.optim import SAM, LabelNoise

__all__ = [
    "__version__",
    "functional",
    "OrderParameterMonitor",
    "NoiseSplitTracker",
    "PhaseDetector",
    "GMMCleanser",
    "Probe",
    "ModelAdapter",
    "NoisyLabelDataset",
    "NoisyDigitsDataModule",
    "NoisyMNIST1DDataModule",
    "NoisyMNISTDataModule",
    "NoisyFashionMNISTDataModule",
    "NoisyCIFAR10DataModule",
    "GaussianClustersDataModule",
    "SparseLinearRegressionDataModule",
    "SAM",
    "LabelNoise",
    "TwoLayerLinearNetwork",
    "LightningPhasesError",
    "ParameterSelectionError",
    "UnsupportedModelError",
    "ProbeMemoryError",
    "DegenerateInputError",
    "LabelNoiseError",
    "PhaseStatisticsWarning",
]

# Public names served lazily: {name: module that defines it}. Sub-packages that
# import Lightning register here so that `import lightning_phases.functional`
# works without Lightning installed.
_LAZY: dict[str, str] = {
    "functional": "lightning_phases.functional",
    "OrderParameterMonitor": "lightning_phases.callbacks",
    "NoiseSplitTracker": "lightning_phases.callbacks",
    "PhaseDetector": "lightning_phases.callbacks",
    "GMMCleanser": "lightning_phases.callbacks",
    "Probe": "lightning_phases.callbacks",
    "ModelAdapter": "lightning_phases.callbacks",
    "NoisyLabelDataset": "lightning_phases.data",
    "NoisyDigitsDataModule": "lightning_phases.data",
    "NoisyMNIST1DDataModule": "lightning_phases.data",
    "NoisyMNISTDataModule": "lightning_phases.data",
    "NoisyFashionMNISTDataModule": "lightning_phases.data",
    "NoisyCIFAR10DataModule": "lightning_phases.data",
    "GaussianClustersDataModule": "lightning_phases.data",
    "SparseLinearRegressionDataModule": "lightning_phases.data",
    "SAM": "lightning_phases.optim",
    "LabelNoise": "lightning_phases.optim",
    "TwoLayerLinearNetwork": "lightning_phases.models",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lightning_phases' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
