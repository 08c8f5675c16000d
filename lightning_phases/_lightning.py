"""Both Lightning namespaces: ``lightning.pytorch`` (the unified package) and ``pytorch_lightning``.

Whichever of the two is installed is used; when both are, the package's
callbacks and datamodules derive from *both* packages' base classes, so a
``lightning.pytorch.Trainer`` and a ``pytorch_lightning.Trainer`` (and both
packages' ``LightningCLI``) accept them. The two hierarchies are parallel
copies of the same code, so the combined class behaves as either.

A ``LightningModule`` cannot derive from both (Lightning inspects which hooks
a module overrides); :data:`LightningModule` is the preferred namespace's
class (``lightning.pytorch`` when installed), and
:func:`lightning_module_base` returns the one of a named namespace.

Private: import the names from here, never ``pytorch_lightning`` or
``lightning.pytorch`` directly, inside the package.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

__all__ = [
    "NAMESPACES",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "TensorBoardLogger",
    "Trainer",
    "lightning_module_base",
    "preferred",
    "rank_zero_info",
    "rank_zero_warn",
    "seed_everything",
    "tensorboard_loggers",
    "tensorboard_writers",
]


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


#: The Lightning packages found, preferred first: ``{"lightning.pytorch": module, "pytorch_lightning": module}``.
NAMESPACES: dict[str, ModuleType] = {
    name: module for name in ("lightning.pytorch", "pytorch_lightning") if (module := _load(name)) is not None
}
if not NAMESPACES:  # pragma: no cover - the package depends on one of them
    raise ImportError(
        "lightning_phases needs PyTorch Lightning: pip install lightning (or pytorch-lightning). "
        "lightning_phases.functional works without it."
    )

#: The preferred namespace's module (``lightning.pytorch`` when installed).
preferred: ModuleType = next(iter(NAMESPACES.values()))


def _combined(attr: str, name: str) -> type:
    bases = tuple(getattr(module, attr) for module in NAMESPACES.values())
    if len(bases) == 1:
        return bases[0]
    return type(name, bases, {"__module__": __name__, "__doc__": f"``{attr}`` of every installed Lightning namespace."})


if TYPE_CHECKING:  # either namespace's classes: annotations accept both
    Callback = Any
    LightningDataModule = Any
    LightningModule = Any
    Trainer = Any
else:
    Callback = _combined("Callback", "Callback")
    LightningDataModule = _combined("LightningDataModule", "LightningDataModule")
    LightningModule = preferred.LightningModule
    Trainer = preferred.Trainer

seed_everything = preferred.seed_everything
#: The preferred namespace's ``TensorBoardLogger`` (for the package's own runs: the demo).
TensorBoardLogger = importlib.import_module(preferred.__name__ + ".loggers").TensorBoardLogger
_utilities = importlib.import_module(preferred.__name__ + ".utilities")
rank_zero_info = _utilities.rank_zero_info
rank_zero_warn = _utilities.rank_zero_warn


def lightning_module_base(namespace: str | None = None) -> type:
    """The ``LightningModule`` class of ``namespace`` (``"lightning.pytorch"`` or ``"pytorch_lightning"``).

    ``None`` gives the preferred namespace's class.

    Raises:
        ImportError: the namespace is not installed.
    """
    if namespace is None:
        return preferred.LightningModule
    if namespace not in NAMESPACES:
        raise ImportError(f"{namespace} is not installed; installed: {sorted(NAMESPACES)}.")
    return NAMESPACES[namespace].LightningModule


def tensorboard_loggers(trainer: Any) -> list[Any]:
    """Every TensorBoard logger of ``trainer``, of either namespace, in the Trainer's order."""
    classes = tuple(
        cls
        for module in NAMESPACES.values()
        if (cls := getattr(importlib.import_module(module.__name__ + ".loggers"), "TensorBoardLogger", None))
        is not None
    )
    return [logger for logger in getattr(trainer, "loggers", []) if isinstance(logger, classes)]


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger, on global rank 0 only (empty elsewhere)."""
    if not getattr(trainer, "is_global_zero", True):
        return []
    return [logger.experiment for logger in tensorboard_loggers(trainer)]
