"""Feng & Tu 2021: the phases of SGD learning of an MLP, with and without mislabeled data.

An MLP trained with plain SGD while ``OrderParameterMonitor`` logs the order
parameters of the minibatch-gradient ensemble (A, A0, R, σ²_λ, the noise
spectrum and its effective dimension), ``NoiseSplitTracker`` splits them into
clean and mislabeled parts, ``PhaseDetector`` names the phase online and
recommends where to stop (the end of phase II), and ``GMMCleanser`` finds the
cleansing time t_c and flags the samples its loss mixture calls mislabeled
there. What happens to the flagged samples depends on the config: the digits
config only *flags* them (``action: flag``: they are written to
``gmm_flagged.csv`` in the run directory and training goes on unchanged);
``feng_tu_mnist_noisy.yaml`` *removes* them from the rest of training
(``action: remove``).

Configs (``examples/configs/``):

* ``feng_tu_mnist_clean.yaml``: clean MNIST, the two phases (fast learning,
  then exploration).
* ``feng_tu_mnist_noisy.yaml``: MNIST with ρ = 0.5 symmetric noise, the four
  phases, cleansing at t_c (``GMMCleanser(action="remove")``).
* ``feng_tu_digits.yaml``: the noisy run on the bundled digits (ρ = 0.5,
  offline, about a minute on a CPU): phases I and II, t_c with the flagged
  samples, and a recommended stop (checked by ``tests/examples``).

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
