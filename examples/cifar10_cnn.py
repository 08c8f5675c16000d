"""A CNN on noisy CIFAR-10 with all four callbacks.

``SmallCNN`` (two conv blocks and a linear head) trained with SGD + momentum
on CIFAR-10 with 40% symmetric label noise. The monitors use the per-layer
fast path for the Gram matrix (Conv2d and Linear layers from one batched
forward/backward), ``PhaseDetector`` records the recommended stopping point
and ``GMMCleanser`` flags the mislabeled samples (written to
``gmm_flagged.csv`` in the log directory).

Configs (``examples/configs/``):

* ``cifar10_cnn.yaml``: CIFAR-10 (downloads it to ``data/`` the first time).
* ``cifar10_cnn_digits.yaml``: the same network (1×8×8 inputs) on the bundled
  digits, offline.

Run::

    python examples/cifar10_cnn.py fit --config examples/configs/cifar10_cnn.yaml
    tensorboard --logdir runs

On a GPU add ``--trainer.accelerator gpu``; with several, ``--trainer.devices 4
--trainer.strategy ddp`` (the callbacks give the same numbers as on one device).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import run  # noqa: E402
from models import SmallCNN  # noqa: E402


def main(args=None) -> None:
    run(SmallCNN, __doc__, args)


if __name__ == "__main__":
    main()
