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
  resnet18  torchvision ``resnet18(num_classes=10)`` on the same CIFAR-sized
            synthetic task (``--resnet-train`` samples, batch 64, SGD)

``--budget OVERHEAD`` adds the configurations ``monitors+budget`` and
``all+budget``: the same callbacks scheduled by
``lightning_phases.callbacks._budget.MeasurementBudget(overhead=OVERHEAD)``
(one budget shared by the two monitors, so they measure at the same steps and
share the Gram matrix, and one for GMMCleanser's loss pass), applied by thin
benchmark-local subclasses until the callbacks take the budget themselves.

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

CONFIGS = ("none", "monitors", "all")
BUDGET_CONFIGS = ("monitors+budget", "all+budget")
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


def _budgeted_probe(cls):
    """``cls`` (a probing monitor) scheduled by a MeasurementBudget instead of its fixed schedule."""

    class Budgeted(cls):
        def __init__(self, budget, **kwargs) -> None:
            super().__init__(**kwargs)
            self.budget = budget

        def _maybe(self, trainer, pl_module, epoch_end: bool) -> None:
            if (
                self.budget.should_measure(trainer, epoch_end=epoch_end)
                and trainer.global_step != self.last_measured_step
            ):
                with self.budget.timed(trainer):
                    self._run(trainer, pl_module)

        def on_train_start(self, trainer, pl_module) -> None:
            self._resolve_data(trainer)
            self._on_probe_ready(trainer, pl_module)
            self._maybe(trainer, pl_module, False)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._maybe(trainer, pl_module, False)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self._maybe(trainer, pl_module, True)

        def on_train_end(self, trainer, pl_module) -> None:
            self.budget.report(trainer, type(self).__name__)

    Budgeted.__name__ = cls.__name__
    return Budgeted


def _budgeted_cleanser():
    from lightning_phases.callbacks import GMMCleanser

    class BudgetedCleanser(GMMCleanser):
        """GMMCleanser whose loss pass + fit runs at the epoch ends its MeasurementBudget allows."""

        def __init__(self, budget, **kwargs) -> None:
            super().__init__(**kwargs)
            self.budget = budget

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if self.t_c_step is not None or trainer.current_epoch < self.warmup_epochs:
                return
            if self.budget.should_measure(trainer, epoch_end=True):
                with self.budget.timed(trainer):
                    self._measure(trainer, pl_module)

        def on_train_end(self, trainer, pl_module) -> None:
            self.budget.report(trainer, "GMMCleanser")

    return BudgetedCleanser


def _callbacks(config: str, probe_size: int | None = None, overhead: float | None = None):
    from lightning_phases.callbacks import GMMCleanser, NoiseSplitTracker, OrderParameterMonitor, PhaseDetector
    from lightning_phases.callbacks._budget import MeasurementBudget

    if config == "none":
        return []
    kw = {} if probe_size is None else {"probe_size": probe_size}
    if config.endswith("+budget"):
        assert overhead is not None
        shared = MeasurementBudget(overhead=overhead)
        monitors = [
            _budgeted_probe(OrderParameterMonitor)(shared, **kw),
            _budgeted_probe(NoiseSplitTracker)(shared, **kw),
        ]
        if config == "monitors+budget":
            return monitors
        return monitors + [PhaseDetector(verbose=False), _budgeted_cleanser()(MeasurementBudget(overhead=overhead))]
    monitors = [OrderParameterMonitor(**kw), NoiseSplitTracker(**kw)]
    if config == "monitors":
        return monitors
    return monitors + [PhaseDetector(verbose=False), GMMCleanser()]


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
        return time.perf_counter() - start


def cleansing_quality(rate: float, seed: int, epochs: int, overhead: float, only_budget: bool = False) -> None:
    """GMMCleanser's detection quality when its loss pass runs less often (one ρ, one seed).

    The loss pass evaluates every training sample; it runs after every epoch
    (``every_n_epochs=1``, the default), every 2nd or 4th epoch, or at the epoch
    ends a ``MeasurementBudget(overhead)`` allows, with the default geometric
    spacing (growth q = 0.1) or without it (q ≈ 0: as often as the budget allows). Uses ``benchmarks/cleansing.py``'s
    runs (noisy digits, the MLP, ``action="remove"``, patience 3).
    """
    import cleansing
    import torch

    from lightning_phases.callbacks._budget import MeasurementBudget
    from lightning_phases.data import NoisyDigitsDataModule
    from lightning_phases.functional import detection_metrics

    kw = dict(noise_rate=rate, seed=seed, batch_size=32)
    _, a_n = cleansing._fit(NoisyDigitsDataModule(**kw), epochs, seed, 0.05)
    _, a_p = cleansing._fit(cleansing._CleanOnly(**kw), epochs, seed, 0.05)
    print(
        f"\n## cleansing quality, rho {rate}, seed {seed}, {epochs} epochs: a_n {100 * a_n:.1f}%, a_p {100 * a_p:.1f}%"
    )
    print(f"{'loss pass':16s} {'passes':>6s} {'pass s':>7s} {'t_c':>4s} {'a_c':>6s} {'Q':>6s}  P/R/F1/AUROC")
    variants = [(f"every {k} epoch(s)", k, None) for k in (1, 2, 4)]
    variants += [(f"budget {overhead:g}", None, 0.1), (f"budget {overhead:g} q=0", None, 1e-9)]
    if only_budget:
        variants = variants[3:]
    for label, every, growth in variants:
        common = dict(action="remove", patience=3, max_fraction=0.95)
        if every is None:
            budget = MeasurementBudget(overhead=overhead, growth=growth)
            cleanser = _budgeted_cleanser()(budget, **common)
        else:
            cleanser = _timed_cleanser()(every_n_epochs=every, **common)
        dm = NoisyDigitsDataModule(**kw)
        _, a_c = cleansing._fit(dm, epochs, seed, 0.05, [cleanser])
        truth = dm.noisy_train.is_noisy
        flags = torch.zeros(len(truth), dtype=torch.bool)
        flags[cleanser.flagged_indices] = True
        gm = detection_metrics(flags, truth)
        q = (a_c - a_n) / (a_p - a_n) if a_p != a_n else float("nan")
        spent = cleanser.budget.spent if every is None else cleanser.spent
        count = cleanser.budget.schedule.num_measurements if every is None else cleanser.count
        t_c = "-" if cleanser.t_c_epoch is None else str(cleanser.t_c_epoch)
        auroc = cleanser.last.get("gmm/auroc", float("nan"))
        print(
            f"{label:16s} {count:6d} {spent:7.2f} {t_c:>4s} {100 * a_c:5.1f}% {q:6.2f}  "
            f"{gm.precision:.3f}/{gm.recall:.3f}/{gm.f1:.3f}/{auroc:.3f}",
            flush=True,
        )


def _timed_cleanser():
    """GMMCleanser on its fixed schedule, counting its passes and their time."""
    from lightning_phases.callbacks import GMMCleanser

    class TimedCleanser(GMMCleanser):
        spent = 0.0
        count = 0

        def _measure(self, trainer, pl_module) -> None:
            start = time.perf_counter()
            super()._measure(trainer, pl_module)
            self.spent += time.perf_counter() - start
            self.count += 1

    return TimedCleanser


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
        help="also run the callbacks scheduled by MeasurementBudget(overhead=OVERHEAD)",
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
        configs = CONFIGS + (BUDGET_CONFIGS if args.budget is not None else ())
        if args.configs:
            configs = tuple(c for c in configs if c == "none" or c in args.configs)
        runs = [(c, c, probe) for c in configs]
        if probe not in (None, DEFAULT_PROBE) and (not args.configs or "monitors@1024" in args.configs):
            runs.append((f"monitors@{DEFAULT_PROBE}", "monitors", DEFAULT_PROBE))
        best = {label: float("inf") for label, _, _ in runs}
        for _ in range(args.repeats):
            for label, config, size in runs:
                best[label] = min(best[label], fit_once(task, config, epochs, num_train, size, args.budget))
        size = "digits train split" if task == "digits" else f"{num_train} training samples"
        probe_text = f"probe_size {probe or DEFAULT_PROBE}"
        print(f"\n## {task} ({epochs} epochs, {size}, {probe_text}; best of {args.repeats})")
        print(f"{'callbacks':14s} {'fit s':>8s} {'ratio':>7s} {'overhead':>9s}")
        for label, _, _ in runs:
            ratio = best[label] / best["none"]
            print(f"{label:14s} {best[label]:8.2f} {ratio:6.2f}x {100 * (ratio - 1):8.0f}%")


if __name__ == "__main__":
    main()
