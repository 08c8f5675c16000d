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

import torch
from torch import Tensor
from torch.utils.data import Subset

__all__ = ["GroundTruth", "find_ground_truth", "find_probe_ground_truth"]


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


_TRUTH_ATTRS = ("is_noisy", "true_targets")


def _truth_of(obj: Any) -> tuple[Tensor, Tensor] | None:
    """``(is_noisy, true_targets)`` if ``obj`` implements the ground-truth protocol."""
    if obj is None or not all(hasattr(obj, a) for a in _TRUTH_ATTRS):
        return None
    mask = torch.as_tensor(obj.is_noisy).bool().reshape(-1).cpu()
    true = torch.as_tensor(obj.true_targets).long().reshape(-1).cpu()
    return mask, true


def find_probe_ground_truth(dataset: Any, indices: Tensor, datamodule: Any = None) -> tuple[Tensor, Tensor] | None:
    """Ground truth ``(is_noisy[idx], true_targets[idx])`` of probe samples, or ``None``.

    Looks, in order, at the training dataset itself, through any
    ``torch.utils.data.Subset`` wrappers (mapping indices), and at the
    datamodule's noisy training dataset. An object implements the protocol
    when it has ``is_noisy`` (bool, one entry per sample) and
    ``true_targets`` (long, one entry per sample) attributes indexed like the
    dataset.
    """
    idx = indices.long()
    current = dataset
    while current is not None:
        truth = _truth_of(current)
        if truth is not None and truth[0].numel() == len(current):
            return truth[0][idx], truth[1][idx]
        if isinstance(current, Subset):
            idx = torch.as_tensor(list(current.indices), dtype=torch.long)[idx]
            current = current.dataset
        else:
            break
    if datamodule is not None:
        truth = _truth_of(find_ground_truth(datamodule))
        if truth is not None and truth[0].numel() == len(dataset):
            return truth[0][indices.long()], truth[1][indices.long()]
    return None
