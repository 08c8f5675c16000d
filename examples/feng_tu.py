"""Feng & Tu 2021: the phases of SGD learning of an MLP, with and without mislabeled data.

An MLP trained with plain SGD while ``OrderParameterMonitor`` logs the order
parameters of the minibatch-gradient ensemble (A, A0, R, σ²_λ, the noise
spectrum and its effective dimension), ``NoiseSplitTracker`` splits them into
clean and mislabeled parts, ``PhaseDetector`` names the phase online and
``GMMCleanser`` removes the samples its loss mixture flags at t_c.

Configs (``examples/configs/``):

* ``feng_tu_mnist_clean.yaml``: clean MNIST, the two phases (fast learning,
  then exploration).
* ``feng_tu_mnist_noisy.yaml``: MNIST with ρ = 0.5 symmetric noise, the four
  phases, cleansing at t_c (``GMMCleanser(action="remove")``).
* ``feng_tu_digits.yaml``: the noisy run on the bundled digits (offline, a
  minute on a CPU).

Run::

    python examples/feng_tu.py fit --config examples/configs/feng_tu_digits.yaml
    tensorboard --logdir runs

Any setting can be overridden on the command line, e.g.
``--data.noise_rate 0.3`` or ``--trainer.max_epochs 20``; ``--help`` lists them.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import run  # noqa: E402
from models import MLPClassifier  # noqa: E402


def main(args=None) -> None:
    run(MLPClassifier, __doc__, args)


if __name__ == "__main__":
    main()
