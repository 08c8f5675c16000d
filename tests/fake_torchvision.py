"""Write small datasets in torchvision's on-disk formats (MNIST IDX files, CIFAR-10 pickles) for offline tests."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct

import numpy as np

CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_idx(root, cls_name: str, n_train: int = 64, n_test: int = 32) -> np.ndarray:
    """Write ``<root>/<cls_name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``; labels cycle 0..9."""
    raw = os.path.join(root, cls_name, "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = None
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as fh:
            fh.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as fh:
            fh.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return labels


def write_cifar10(root, monkeypatch, n_per_batch: int = 12) -> None:
    """Write ``<root>/cifar-10-batches-py`` and point torchvision's md5 checks at the written files."""
    import torchvision

    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    md5 = {}
    for name in names:
        entry = {
            "data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
            "labels": [int(v) for v in np.arange(n_per_batch) % 10],
        }
        path = os.path.join(folder, name)
        with open(path, "wb") as fh:
            pickle.dump(entry, fh)
        with open(path, "rb") as fh:
            md5[name] = hashlib.md5(fh.read()).hexdigest()
    meta = os.path.join(folder, "batches.meta")
    with open(meta, "wb") as fh:
        pickle.dump({"label_names": CIFAR10_LABEL_NAMES}, fh)
    with open(meta, "rb") as fh:
        meta_md5 = hashlib.md5(fh.read()).hexdigest()
    # torchvision verifies the md5 sums of the real files; point it at the sums of the files written here
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "train_list", [[n, md5[n]] for n in names[:5]])
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(
        torchvision.datasets.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": meta_md5}
    )
