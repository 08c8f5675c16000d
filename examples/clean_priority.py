"""Clean-priority learning: the clean segment gradient dominates, then the ratio falls to 1.

With a fraction δ of mislabeled samples, each class's clean and noisy segment
gradients point in opposite directions; at initialisation their norms stand
in the ratio (1 − δ)/δ, and the ratio falls towards 1 as the clean samples are
learned, near the best early-stopping point. ``NoiseSplitTracker`` logs
``segment/ratio/<c>`` and ``segment/cos/<c>`` per class (and their means)
next to the clean and mislabeled losses and errors.

Configs (``examples/configs/``):

* ``clean_priority_mnist_binary.yaml``: a wide two-layer ReLU network with one
  logit on MNIST 7 vs 9, δ = 0.4 (start ratio 1.5).
* ``clean_priority_mnist_multiclass.yaml``: an MLP on all ten MNIST classes,
  δ = 0.4.
* ``clean_priority_digits_binary.yaml`` and
  ``clean_priority_digits_multiclass.yaml``: the same on the bundled digits,
  offline.

Run::

    python examples/clean_priority.py fit --config examples/configs/clean_priority_digits_binary.yaml
    tensorboard --logdir runs

The model is chosen in the config (``model.class_path``), so one module runs
both the binary and the multi-class study.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import run  # noqa: E402


def main(args=None) -> None:
    run(None, __doc__, args)


if __name__ == "__main__":
    main()
