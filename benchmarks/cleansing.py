"""Cleansing quality Q of GMMCleanser on noisy digits, and detection F1 against cleanlab.

For each noise rate ρ, three real training runs of the same MLP, seed and
number of epochs:

* ``a_n``: trained on all the noisy training data;
* ``a_c``: trained with ``GMMCleanser(action="remove")``, which flags samples
  at the cleansing time t_c and continues the same ``fit`` without them;
* ``a_p``: trained on the truly clean training samples only;

and Q = (a_c − a_n)/(a_p − a_n) (SPEC.md §4; Feng & Tu report Q > 50% up to
80% noise on MNIST). Accuracies are final test accuracies on the clean test
split. Detection (precision, recall, F1, AUROC against the known noise mask)
of GMMCleanser's flags at t_c is compared with cleanlab's
``find_label_issues`` given 5-fold cross-validated predicted probabilities
from the same MLP (five extra trainings).

    pip install cleanlab   # benchmark-only (the `bench` extra)
    python benchmarks/cleansing.py [--quick]

``--schedules`` compares GMMCleanser's loss-pass schedules instead, side by
side per noise rate: a fit after every epoch (``every_n_epochs=1``, the old
default) and the overhead budget (the default, ``overhead=0.2``, or
``--overhead``): loss passes, seconds spent in them, the realised overhead,
t_c and the detection quality of the flags (no cleanlab, no ρ = 0 run).

    python benchmarks/cleansing.py --schedules --rates 0.2 0.4 0.6 [--epochs 150] [--overhead 0.2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402
    MLPClassifier,
    accuracy,
    cleanlab_issues,
    cross_validated_probabilities,
    machine,
    quiet_trainer,
)

from lightning_phases import GMMCleanser  # noqa: E402
from lightning_phases.data import NoisyDigitsDataModule  # noqa: E402
from lightning_phases.functional import detection_metrics  # noqa: E402


class _CleanOnly(NoisyDigitsDataModule):
    """The same splits, training only on the truly clean samples (the a_p reference)."""

    def setup(self, stage=None):
        super().setup(stage)
        if self.noisy_train is not None and not self.removed_indices.numel():
            self.removed_indices = self.noisy_train.noisy_indices


def _fit(dm, epochs: int, seed: int, lr: float, callbacks=()) -> tuple[MLPClassifier, float]:
    pl.seed_everything(seed, verbose=False)
    model = MLPClassifier(64, 128, 10, lr=lr)
    trainer = quiet_trainer(
        max_epochs=epochs, limit_val_batches=0, callbacks=list(callbacks), default_root_dir=tempfile.mkdtemp()
    )
    trainer.fit(model, datamodule=dm)
    dm.setup("test")
    return model, accuracy(model, dm.test_dataloader())


def cleanlab_flags(dm: NoisyDigitsDataModule, epochs: int, seed: int, lr: float, folds: int = 5) -> torch.Tensor:
    """cleanlab's ``find_label_issues`` on ``folds``-fold cross-validated probabilities of the same MLP."""
    train = dm.noisy_train
    probs = cross_validated_probabilities(train, lambda: MLPClassifier(64, 128, 10, lr=lr), 10, epochs, seed, folds)
    return cleanlab_issues(train, probs)[0]


def clean_check(epochs: int, seed: int, lr: float, heavy: float | None = None) -> str:
    """ρ = 0: the phase model PhaseDetector reports and the fraction GMMCleanser flags (target < 2%)."""
    from pytorch_lightning.loggers import CSVLogger

    from lightning_phases import OrderParameterMonitor, PhaseDetector

    dm = NoisyDigitsDataModule(noise_rate=0.0, seed=seed, batch_size=32)
    cleanser, detector = GMMCleanser(action="flag", heavy_noise_separation=heavy), PhaseDetector(verbose=False)
    pl.seed_everything(seed, verbose=False)
    model = MLPClassifier(64, 128, 10, lr=lr)
    import tempfile

    trainer = quiet_trainer(
        max_epochs=epochs,
        limit_val_batches=0,
        logger=CSVLogger(tempfile.mkdtemp()),
        callbacks=[OrderParameterMonitor(every_n_epochs=1, probe_size=512), detector, cleanser],
    )
    trainer.fit(model, datamodule=dm)
    n = len(dm.noisy_train)
    flagged = cleanser.flagged_indices.numel()
    phases = " ".join(f"{p}:{a}-{b}" for p, a, b in detector.tracker.timeline())
    extra = f"; bimodal fits {len(cleanser.delta_L_history)}/{epochs}"
    return (
        f"rho 0.0: phase model {detector.tracker.model!r} ({phases}); t_c {cleanser.t_c_epoch}; "
        f"flagged {flagged}/{n} = {100 * flagged / n:.2f}%{extra}"
    )


def compare_schedules(rates, epochs: int, seed: int, lr: float, overhead: float | None = None) -> None:
    """GMMCleanser(action="remove") with a loss pass after every epoch vs within the overhead budget."""
    print(
        f"{'rho':>4s} {'schedule':14s} | {'passes':>6s} {'pass s':>6s} {'fit s':>6s} {'ovh':>6s} | "
        f"{'t_c':>4s} | {'a_n':>6s} {'a_c':>6s} {'a_p':>6s} {'Q':>6s} | GMM P/R/F1/AUROC"
    )
    budgeted = {} if overhead is None else dict(overhead=overhead)  # None: GMMCleanser's default
    overhead = GMMCleanser().overhead if overhead is None else overhead
    for rate in rates:
        kw = dict(noise_rate=rate, seed=seed, batch_size=32)
        _, a_n = _fit(NoisyDigitsDataModule(**kw), epochs, seed, lr)
        _, a_p = _fit(_CleanOnly(**kw), epochs, seed, lr)
        for label, schedule in (("every epoch", dict(every_n_epochs=1)), (f"budget {overhead:g}", budgeted)):
            dm = NoisyDigitsDataModule(**kw)
            cleanser = GMMCleanser(action="remove", patience=3, max_fraction=0.95, **schedule)
            start = time.perf_counter()
            _, a_c = _fit(dm, epochs, seed, lr, [cleanser])
            wall = time.perf_counter() - start
            truth = dm.noisy_train.is_noisy
            flags = torch.zeros(len(truth), dtype=torch.bool)
            flags[cleanser.flagged_indices] = True
            gm = detection_metrics(flags, truth)
            q = (a_c - a_n) / (a_p - a_n) if a_p != a_n else float("nan")
            budget = cleanser.budget
            t_c = "-" if cleanser.t_c_epoch is None else str(cleanser.t_c_epoch)
            print(
                f"{rate:4.1f} {label:14s} | {budget.schedule.num_measurements:6d} {budget.spent:6.2f} {wall:6.1f} "
                f"{100 * budget.overhead:5.1f}% | {t_c:>4s} | {100 * a_n:5.1f}% {100 * a_c:5.1f}% "
                f"{100 * a_p:5.1f}% {q:6.2f} | {gm.precision:.3f}/{gm.recall:.3f}/{gm.f1:.3f}/"
                f"{cleanser.last.get('gmm/auroc', float('nan')):.3f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ρ ∈ {0.4} and fewer epochs")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--cv-epochs", type=int, default=30, help="epochs of each cleanlab cross-validation model")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cleanlab", action="store_true")
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="noise rates (default 0.2 0.4 0.6 0.8)")
    parser.add_argument("--no-clean-check", action="store_true", help="skip the rho = 0 run")
    parser.add_argument(
        "--heavy-noise-separation",
        type=float,
        default=None,
        help="GMMCleanser(heavy_noise_separation=...) (default: off, the class default)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on shared cores OpenMP threads spin-wait on each other)",
    )
    parser.add_argument(
        "--schedules",
        action="store_true",
        help="instead: GMMCleanser's loss pass after every epoch vs within the overhead budget (see above)",
    )
    parser.add_argument(
        "--overhead", type=float, default=None, help="GMMCleanser(overhead=...) of --schedules (default: its default)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rates = args.rates or ((0.4,) if args.quick else (0.2, 0.4, 0.6, 0.8))
    epochs = 60 if args.quick else args.epochs
    if args.schedules:
        print(f"machine: {machine()}; {epochs} epochs, lr {args.lr}, seed {args.seed}")
        compare_schedules(rates, epochs, args.seed, args.lr, args.overhead)
        return
    heavy = args.heavy_noise_separation
    print(
        f"machine: {machine()}; {epochs} epochs, lr {args.lr}, seed {args.seed}"
        + (f"; heavy_noise_separation {heavy}" if heavy is not None else "")
    )
    if not (args.quick or args.no_clean_check):
        print(clean_check(epochs, args.seed, args.lr, heavy), flush=True)
    print(
        f"{'rho':>4s} | {'a_n':>6s} {'a_c':>6s} {'a_p':>6s} {'Q':>6s} | t_c  | GMM P/R/F1/AUROC          | cleanlab P/R/F1"
    )
    for rate in rates:
        start = time.time()
        kw = dict(noise_rate=rate, seed=args.seed, batch_size=32)
        _, a_n = _fit(NoisyDigitsDataModule(**kw), epochs, args.seed, args.lr)
        _, a_p = _fit(_CleanOnly(**kw), epochs, args.seed, args.lr)
        dm = NoisyDigitsDataModule(**kw)
        cleanser = GMMCleanser(action="remove", patience=3, max_fraction=0.95, heavy_noise_separation=heavy)
        _, a_c = _fit(dm, epochs, args.seed, args.lr, [cleanser])
        truth = dm.noisy_train.is_noisy
        flags = torch.zeros(len(truth), dtype=torch.bool)
        flags[cleanser.flagged_indices] = True
        gm = detection_metrics(flags, truth)
        q = (a_c - a_n) / (a_p - a_n) if a_p != a_n else float("nan")
        line = (
            f"{rate:4.1f} | {100 * a_n:5.1f}% {100 * a_c:5.1f}% {100 * a_p:5.1f}% {q:6.2f} | {cleanser.t_c_epoch if cleanser.t_c_epoch is not None else '-':>4} | "
            f"{gm.precision:.3f}/{gm.recall:.3f}/{gm.f1:.3f}/{cleanser.last.get('gmm/auroc', float('nan')):.3f} |"
        )
        if not args.no_cleanlab:
            cl = detection_metrics(cleanlab_flags(dm, args.cv_epochs, args.seed, args.lr), truth)
            line += f" {cl.precision:.3f}/{cl.recall:.3f}/{cl.f1:.3f}"
        print(line + f"  [{time.time() - start:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
