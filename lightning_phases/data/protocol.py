"""The ground-truth protocol: how callbacks find which training samples are mislabeled.

A dataset (or datamodule) *has ground truth* when it exposes, indexed like the
dataset itself:

* ``noisy_targets``: the labels the model is trained on (long ``[N]``),
* ``true_targets``: the clean labels (long ``[N]``),
* ``is_noisy``: ``noisy_targets != true_targets`` (bool ``[N]``).

:class:`~lightning_phases.data.NoisyLabelDataset` implements it, and so can a
user's own dataset: three attributes are all it takes.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["GroundTruth", "find_ground_truth"]


@runtime_checkable
class GroundTruth(Protocol):
    """A dataset whose clean labels and noise mask are known."""

    noisy_targets: Tensor
    true_targets: Tensor
    is_noisy: Tensor

    def __len__(self) -> int: ...


def _has_truth(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("noisy_targets", "true_targets", "is_noisy"))


def find_ground_truth(obj: Any) -> Any | None:
    """The object implementing :class:`GroundTruth` behind ``obj``, or ``None``.

    ``obj`` may be a dataset implementing the protocol, a
    ``torch.utils.data.DataLoader`` (its ``dataset`` is inspected), or a
    datamodule (its ``noisy_train`` attribute, then ``train_dataset``).
    ``Subset`` wrappers are *not* unwrapped here, because their indices differ
    from the wrapped dataset's; the callbacks map indices through them.
    """
    from torch.utils.data import DataLoader

    if obj is None:
        return None
    if isinstance(obj, DataLoader):
        obj = obj.dataset
    if _has_truth(obj):
        return obj
    for attr in ("noisy_train", "train_dataset"):
        inner = getattr(obj, attr, None)
        if inner is not None and _has_truth(inner):
            return inner
    return None
