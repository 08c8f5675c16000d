"""Training-time overhead of the callbacks at their default schedules.

``Trainer.fit`` wall time with

  none      no lightning_phases callback
  monitors  OrderParameterMonitor + NoiseSplitTracker
  all       OrderParameterMonitor + NoiseSplitTracker + PhaseDetector + GMMCleanser

(probe set of 1024 samples unless the task's example sets another), on

  digits    the ``lightning-phases demo`` setup: MLP 64-128-128-10 on
            scikit-learn's digits with 50% symmetric label noise, batch 32, SGD
  cnn       a small CIFAR-sized CNN (3x32x32 -> conv 16 -> pool -> conv 32 ->
            pool -> linear 10) on ``GaussianClustersDataModule`` (10 classes,
            dim 3072 reshaped to 3x32x32, 20% label noise), batch 64, SGD,
            default arguments (probe set of 1024)
  resnet18  torchvision ``resnet18(num_classes=10)`` on the same CIFAR-sized
            synthetic task (``--resnet-train`` samples, batch 64, SGD)

The default configurations run every callback with its default arguments,
so on its default schedule: the overhead budgets (the two monitors share one
of ``overhead=0.1``, measuring at the start and then as the budget and the
geometric spacing allow; GMMCleanser its own of 0.2 for the loss pass and fit,
at epoch ends, searching on 4096 of the training samples). ``all@fullpass`` is ``all`` with
``GMMCleanser(search_samples=None)``: every training sample at every loss pass. ``monitors@epoch`` and ``all@epoch`` are the same callbacks on
the fixed schedule ``every_n_epochs=1`` (the monitors also measure at the
start); ``all@loss@epoch`` (only by ``--configs``) is ``all@epoch`` with
``GMMCleanser(flag_score="loss")``, whose loss pass computes no logit margins.
``--budget OVERHEAD`` sets the monitors' budget instead of 0.1. After
each table the budgets' own accounting of each configuration's last run is printed
(measurement seconds over training seconds, per budget).

All configurations log to a TensorBoard logger in a temporary directory (the
monitors require a logger); checkpointing, progress bar and model summary are
off. Each configuration runs ``--repeats`` times, interleaved; the best wall
time is kept (the cores may be shared).

Run:  python benchmarks/overhead.py [--threads 1] [--repeats 2] [--digits-epochs 20] [--cnn-epochs 3]
                                   [--resnet-epochs 2] [--budget 0.1] [--tasks digits cnn resnet18]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIGS = ("none", "monitors", "all", "all@fullpass", "monitors@epoch", "all@epoch")
EXTRA_CONFIGS = ("all@loss@epoch",)  # by --configs only
DEFAULT_PROBE = 1024  # the callbacks' default probe_size
EXAMPLE_PROBE = {"digits": 512, "cnn": None, "resnet18": None}  # what each task's example sets (None: the default)


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

    def resnet18():
        import torchvision

        return Classifier(
            nn.Sequential(nn.Unflatten(1, (3, 32, 32)), torchvision.models.resnet18(num_classes=10)), 0.02
        )

    return {"digits": digits, "cnn": cnn, "resnet18": resnet18}


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


def _callbacks(config: str, probe_size: int | None = None, overhead: float | None = None):
    """The callbacks of one configuration: their defaults (the overhead budgets), or every epoch (``@epoch``).

    ``overhead`` (``--budget``) replaces the monitors' default budget (0.1) in the budgeted configurations.
    """
    from lightning_phases.callbacks import GMMCleanser, NoiseSplitTracker, OrderParameterMonitor, PhaseDetector

    if config == "none":
        return []
    kw: dict = {} if probe_size is None else {"probe_size": probe_size}
    every_epoch = config.endswith("@epoch")
    if every_epoch:
        kw["every_n_epochs"] = 1
    elif overhead is not None:
        kw["overhead"] = overhead
    monitors = [OrderParameterMonitor(**kw), NoiseSplitTracker(**kw)]
    if config.startswith("monitors"):
        return monitors
    if every_epoch:
        # ``all@loss@epoch``: flags from the loss (no logit margins in the loss pass), to price the margins
        cleanser = GMMCleanser(overhead=None, every_n_epochs=1, flag_score="loss" if "@loss" in config else "auto")
    elif config == "all@fullpass":  # the search over every training sample (before search_samples)
        cleanser = GMMCleanser(search_samples=None)
    else:
        cleanser = GMMCleanser()
    return monitors + [PhaseDetector(verbose=False), cleanser]


def fit_once(
    task: str,
    config: str,
    epochs: int,
    num_train: int,
    probe_size: int | None = None,
    overhead: float | None = None,
) -> float:
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
            callbacks=_callbacks(config, probe_size, overhead),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=10,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        wall = time.perf_counter() - start
        budgets: dict[int, tuple[str, object]] = {}
        for cb in trainer.callbacks:
            if hasattr(cb, "budget"):  # a budget shared by the two monitors is named after both
                name, budget = budgets.get(id(cb.budget), ("", cb.budget))
                budgets[id(cb.budget)] = (f"{name} + {type(cb).__name__}" if name else type(cb).__name__, budget)
        return wall, [budget.summary(name) for name, budget in budgets.values()]


def cleansing_quality(rate: float, seed: int, epochs: int, overhead: float, only_budget: bool = False) -> None:
    """GMMCleanser's detection quality when its loss pass runs less often (one ρ, one seed).

    The loss pass evaluates every training sample; it runs after every epoch
    (``every_n_epochs=1``, the default), every 2nd or 4th epoch, or at the epoch
    ends its budget ``GMMCleanser(overhead=OVERHEAD)`` allows (``--budget``, default 0.1). Uses
    ``benchmarks/cleansing.py``'s runs (noisy digits, the MLP, ``action="remove"``, patience 3).
    """
    import cleansing
    import torch

    from lightning_phases.callbacks import GMMCleanser
    from lightning_phases.data import NoisyDigitsDataModule
    from lightning_phases.functional import detection_metrics

    kw = dict(noise_rate=rate, seed=seed, batch_size=32)
    _, a_n = cleansing._fit(NoisyDigitsDataModule(**kw), epochs, seed, 0.05)
    _, a_p = cleansing._fit(cleansing._CleanOnly(**kw), epochs, seed, 0.05)
    print(
        f"\n## cleansing quality, rho {rate}, seed {seed}, {epochs} epochs: a_n {100 * a_n:.1f}%, a_p {100 * a_p:.1f}%"
    )
    print(f"{'loss pass':16s} {'passes':>6s} {'pass s':>7s} {'t_c':>4s} {'a_c':>6s} {'Q':>6s}  P/R/F1/AUROC")
    variants = [(f"every {k} epoch(s)", k) for k in (1, 2, 4)] + [(f"budget {overhead:g}", None)]
    if only_budget:
        variants = variants[3:]
    for label, every in variants:
        common = dict(action="remove", patience=3, max_fraction=0.95)
        if every is None:
            cleanser = GMMCleanser(overhead=overhead, **common)
        else:
            cleanser = GMMCleanser(overhead=None, every_n_epochs=every, **common)
        dm = NoisyDigitsDataModule(**kw)
        _, a_c = cleansing._fit(dm, epochs, seed, 0.05, [cleanser])
        truth = dm.noisy_train.is_noisy
        flags = torch.zeros(len(truth), dtype=torch.bool)
        flags[cleanser.flagged_indices] = True
        gm = detection_metrics(flags, truth)
        q = (a_c - a_n) / (a_p - a_n) if a_p != a_n else float("nan")
        spent = cleanser.budget.spent  # the fixed schedule is timed too
        count = cleanser.budget.schedule.num_measurements
        t_c = "-" if cleanser.t_c_epoch is None else str(cleanser.t_c_epoch)
        auroc = cleanser.last.get("gmm/auroc", float("nan"))
        print(
            f"{label:16s} {count:6d} {spent:7.2f} {t_c:>4s} {100 * a_c:5.1f}% {q:6.2f}  "
            f"{gm.precision:.3f}/{gm.recall:.3f}/{gm.f1:.3f}/{auroc:.3f}",
            flush=True,
        )


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
    parser.add_argument("--resnet-epochs", type=int, default=2)
    parser.add_argument("--resnet-train", type=int, default=1024, help="training samples of the resnet18 task")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="OVERHEAD",
        help="the monitors' budget in the default configurations (default: theirs, 0.1); with --cleansing, the "
        "cleanser's",
    )
    parser.add_argument(
        "--cleansing",
        type=float,
        default=None,
        metavar="RHO",
        help="instead: GMMCleanser's detection quality at noise rate RHO with fewer loss passes (see --budget)",
    )
    parser.add_argument("--cleansing-epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="+", default=None, help="only these configurations (and 'none')")
    parser.add_argument(
        "--tasks", nargs="+", default=["digits", "cnn", "resnet18"], choices=["digits", "cnn", "resnet18"]
    )
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
    if args.cleansing is not None:
        cleansing_quality(
            args.cleansing, args.seed, args.cleansing_epochs, args.budget or 0.1, args.configs == ["budget"]
        )
        return
    for task in args.tasks:
        epochs = {"digits": args.digits_epochs, "cnn": args.cnn_epochs, "resnet18": args.resnet_epochs}[task]
        num_train = args.resnet_train if task == "resnet18" else args.cnn_train
        probe = args.probe_size if args.probe_size is not None else EXAMPLE_PROBE[task]
        configs = CONFIGS
        if args.configs:
            configs = tuple(c for c in configs + EXTRA_CONFIGS if c == "none" or c in args.configs)
        runs = [(c, c, probe) for c in configs]
        if probe not in (None, DEFAULT_PROBE) and (not args.configs or "monitors@1024" in args.configs):
            runs.append((f"monitors@{DEFAULT_PROBE}", "monitors", DEFAULT_PROBE))
        best = {label: float("inf") for label, _, _ in runs}
        accounting: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            for label, config, size in runs:
                wall, accounting[label] = fit_once(task, config, epochs, num_train, size, args.budget)
                best[label] = min(best[label], wall)
        size = "digits train split" if task == "digits" else f"{num_train} training samples"
        probe_text = f"probe_size {probe or DEFAULT_PROBE}"
        print(f"\n## {task} ({epochs} epochs, {size}, {probe_text}; best of {args.repeats})")
        print(f"{'callbacks':14s} {'fit s':>8s} {'ratio':>7s} {'overhead':>9s}")
        for label, _, _ in runs:
            ratio = best[label] / best["none"]
            print(f"{label:14s} {best[label]:8.2f} {ratio:6.2f}x {100 * (ratio - 1):8.0f}%")
        for label, lines in accounting.items():
            for line in lines:
                print(f"  {label}: {line}")


if __name__ == "__main__":
    main()
