"""Training-time overhead of the callbacks at their default schedules.

``Trainer.fit`` wall time with

  none      no lightning_phases callback
  monitors  OrderParameterMonitor + NoiseSplitTracker
  all       OrderParameterMonitor + NoiseSplitTracker + PhaseDetector + GMMCleanser

every callback with its default arguments (probe set of 1024 samples, measured
at the start and after every epoch; GMMCleanser fits its mixture after every
epoch), on

  digits    the ``lightning-phases demo`` setup: MLP 64-128-128-10 on
            scikit-learn's digits with 50% symmetric label noise, batch 32, SGD
  cnn       a small CIFAR-sized CNN (3x32x32 -> conv 16 -> pool -> conv 32 ->
            pool -> linear 10) on ``GaussianClustersDataModule`` (10 classes,
            dim 3072 reshaped to 3x32x32, 20% label noise), batch 64, SGD,
            default arguments (probe set of 1024)

All configurations log to a TensorBoard logger in a temporary directory (the
monitors require a logger); checkpointing, progress bar and model summary are
off. Each configuration runs ``--repeats`` times, interleaved; the best wall
time is kept (the cores may be shared).

Run:  python benchmarks/overhead.py [--threads 1] [--repeats 2] [--digits-epochs 20] [--cnn-epochs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIGS = ("none", "monitors", "all")
DEFAULT_PROBE = 1024  # the callbacks' default probe_size
EXAMPLE_PROBE = {"digits": 512, "cnn": None}  # what each task's example sets (None: the default)


def _modules():
    from _common import Classifier, MLPClassifier
    from torch import nn

    def digits():
        return MLPClassifier(64, 128, 10, lr=0.05)  # the `lightning-phases demo` network

    def cnn():
        net = nn.Sequential(
            nn.Unflatten(1, (3, 32, 32)),
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 10),
        )
        return Classifier(net, lr=0.02)

    return {"digits": digits, "cnn": cnn}


def _datamodule(task: str, num_train: int):
    from lightning_phases.data import GaussianClustersDataModule, NoisyDigitsDataModule

    if task == "digits":
        return NoisyDigitsDataModule(noise_rate=0.5, seed=0, batch_size=32)
    return GaussianClustersDataModule(
        num_classes=10,
        dim=3 * 32 * 32,
        num_train=num_train,
        num_val=0,
        num_test=64,
        noise_rate=0.2,
        seed=0,
        batch_size=64,
    )


def _callbacks(config: str, probe_size: int | None = None):
    from lightning_phases.callbacks import GMMCleanser, NoiseSplitTracker, OrderParameterMonitor, PhaseDetector

    if config == "none":
        return []
    kw = {} if probe_size is None else {"probe_size": probe_size}
    monitors = [OrderParameterMonitor(**kw), NoiseSplitTracker(**kw)]
    if config == "monitors":
        return monitors
    return monitors + [PhaseDetector(verbose=False), GMMCleanser()]


def fit_once(task: str, config: str, epochs: int, num_train: int, probe_size: int | None = None) -> float:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    pl.seed_everything(0, verbose=False)
    model = _modules()[task]()
    dm = _datamodule(task, num_train)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=TensorBoardLogger(tmp, name="", version=""),
            callbacks=_callbacks(config, probe_size),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=10,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration; the best is kept")
    parser.add_argument("--digits-epochs", type=int, default=20)
    parser.add_argument("--cnn-epochs", type=int, default=3)
    parser.add_argument("--cnn-train", type=int, default=8192, help="training samples of the CNN task")
    parser.add_argument(
        "--probe-size",
        type=int,
        default=None,
        help="probe_size of the monitors (default: the task's example, 512 on digits, 1024 on cnn)",
    )
    parser.add_argument("--tasks", nargs="+", default=["digits", "cnn"], choices=["digits", "cnn"])
    args = parser.parse_args(argv)
    # the BLAS pools (numpy's LAPACK computes the noise spectrum) get the same thread count as torch;
    # this must happen before numpy is first imported
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    import logging

    import pytorch_lightning  # noqa: F401 - sets its loggers' levels on import; override them below
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} logical CPUs, "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    for task in args.tasks:
        epochs = args.digits_epochs if task == "digits" else args.cnn_epochs
        probe = args.probe_size if args.probe_size is not None else EXAMPLE_PROBE[task]
        runs = [(c, c, probe) for c in CONFIGS]
        if probe not in (None, DEFAULT_PROBE):
            runs.append((f"monitors@{DEFAULT_PROBE}", "monitors", DEFAULT_PROBE))
        best = {label: float("inf") for label, _, _ in runs}
        for _ in range(args.repeats):
            for label, config, size in runs:
                best[label] = min(best[label], fit_once(task, config, epochs, args.cnn_train, size))
        size = "digits train split" if task == "digits" else f"{args.cnn_train} training samples"
        probe_text = f"probe_size {probe or DEFAULT_PROBE}"
        print(f"\n## {task} ({epochs} epochs, {size}, {probe_text}; best of {args.repeats})")
        print(f"{'callbacks':14s} {'fit s':>8s} {'ratio':>7s} {'overhead':>9s}")
        for label, _, _ in runs:
            ratio = best[label] / best["none"]
            print(f"{label:14s} {best[label]:8.2f} {ratio:6.2f}x {100 * (ratio - 1):8.0f}%")


if __name__ == "__main__":
    main()
