"""The ``lightning-phases`` command: an offline demo and a report of any logged run.

Usage::

    lightning-phases demo [--noise-rate 0.5] [--epochs 80] [--seed 0] [--output-dir runs/demo]
    lightning-phases report LOGDIR [-o FILE]

``demo`` writes each run into a new ``OUTPUT_DIR/version_N`` (runs never mix);
``report`` draws one figure per run found under ``LOGDIR``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence

from lightning_phases.errors import LightningPhasesError

__all__ = ["main", "build_parser"]


_DEFAULT_OUTPUT = os.path.join("runs", "demo")

#: What each phase means, for the demo's timeline.
_PHASE_WORDS = {
    "I": "phase I: the network learns the correctly labelled samples",
    "II": "phase II: clean samples learned, the mislabeled ones not yet",
    "III": "phase III: the network starts memorising the wrong labels",
    "IV": "phase IV: everything memorised",
    "fast_learning": "fast learning",
    "exploration": "exploration",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-phases``."""
    parser = argparse.ArgumentParser(
        prog="lightning-phases",
        description="Watch the phases of SGD learning with mislabeled data (PyTorch Lightning callbacks).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a small network on noisy digits with all four callbacks (offline, well under a minute on a CPU)",
        description=(
            "Train a small fully connected network on scikit-learn's bundled handwritten digits, with part of the "
            "training labels deliberately wrong, under OrderParameterMonitor, NoiseSplitTracker, PhaseDetector and "
            "GMMCleanser and a TensorBoard logger. Each call writes a new run, OUTPUT_DIR/version_N (the next free "
            "N), so runs never mix; then it prints the phases it saw, the cleansing result and where every file is."
        ),
    )
    demo.add_argument(
        "--noise-rate", type=float, default=0.5, help="fraction of mislabeled training samples (default 0.5)"
    )
    demo.add_argument("--epochs", type=int, default=80, help="training epochs (default 80)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the noise, the split and the model (default 0)")
    demo.add_argument(
        "--output-dir",
        default=_DEFAULT_OUTPUT,
        help=f"where the runs go; each demo writes a new OUTPUT_DIR/version_N (default {_DEFAULT_OUTPUT})",
    )
    demo.add_argument("--probe-size", type=int, default=512, help="probe samples of the monitors (default 512)")
    demo.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    demo.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's progress bar")
    report = sub.add_parser(
        "report",
        help="draw the report figure and summary.json of logged runs",
        description=(
            "Read the TensorBoard event files of runs logged by the callbacks and draw one figure per run. A run is "
            "a directory with event files (e.g. runs/demo/version_0); given a directory with several runs below it, "
            "each run is reported on its own, into its own directory (runs are never merged)."
        ),
    )
    report.add_argument("logdir", help="a run's directory, or a directory with runs below it")
    report.add_argument(
        "-o", "--output", default=None, help="figure path (PNG/PDF) for a single run; default RUN/report.png"
    )
    return parser


def _atomic_torch_save(obj, path: str) -> None:
    import tempfile

    import torch

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _timeline(history: list[dict]) -> list[tuple[str, int, int]]:
    """``(phase, first_epoch, last_epoch)`` runs of a PhaseDetector's history."""
    spans: list[tuple[str, int, int]] = []
    for entry in history:
        phase, epoch = str(entry["phase"]), int(entry["epoch"])
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], epoch)
        else:
            spans.append((phase, epoch, epoch))
    return spans


def _demo(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from lightning_phases import _lightning as pl
    from lightning_phases._lightning import TensorBoardLogger
    from lightning_phases.callbacks import GMMCleanser, NoiseSplitTracker, OrderParameterMonitor, PhaseDetector
    from lightning_phases.data import NoisyDigitsDataModule
    from lightning_phases.report.summary import make_report

    if not 0 <= args.noise_rate < 1:
        raise LightningPhasesError(f"--noise-rate must be in [0, 1); got {args.noise_rate}.")
    if args.epochs < 1:
        raise LightningPhasesError(f"--epochs must be >= 1; got {args.epochs}.")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise LightningPhasesError(f"--output-dir {args.output_dir!r} is a file; give a directory.")

    class DigitsMLP(pl.LightningModule):
        """64 → 128 → 128 → 10 ReLU network; logs its test error under ``test_key``."""

        def __init__(self, lr: float, test_key: str = "test_err") -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log(self.hparams.test_key, (self(x).argmax(1) != y).float().mean())

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_err", (self(x).argmax(1) != y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    pl.seed_everything(args.seed, verbose=False)
    dm = NoisyDigitsDataModule(noise_rate=args.noise_rate, seed=args.seed, batch_size=32)
    logger = TensorBoardLogger(args.output_dir, name="", default_hp_metric=False)  # a new version_N each call
    cleanser = GMMCleanser(every_n_epochs=1, patience=3)
    detector = PhaseDetector(verbose=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=logger,
        callbacks=[
            OrderParameterMonitor(every_n_epochs=1, probe_size=args.probe_size),
            NoiseSplitTracker(every_n_epochs=1, probe_size=args.probe_size),
            detector,
            cleanser,
        ],
        enable_checkpointing=False,
        enable_progress_bar=not args.no_progress_bar,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    start = time.time()
    model = DigitsMLP(args.lr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        trainer.fit(model, datamodule=dm)
        test = trainer.test(model, datamodule=dm, verbose=False)
        kept_test = None
        if detector.recommended_state_dict is not None:
            kept = DigitsMLP(args.lr, test_key="test_err_kept")
            kept.load_state_dict(detector.recommended_state_dict)
            kept_test = trainer.test(kept, datamodule=dm, verbose=False)
    elapsed = time.time() - start
    run_dir = logger.log_dir
    weights_path = None
    if detector.recommended_state_dict is not None:
        weights_path = os.path.join(run_dir, "kept_weights.pt")
        _atomic_torch_save(detector.recommended_state_dict, weights_path)
    summary = make_report(run_dir, os.path.join(run_dir, "report.png"))

    say = print
    say()
    say(
        f"Trained for {args.epochs} epochs on handwritten digits in which {args.noise_rate:.0%} of the training "
        f"labels were deliberately made wrong ({elapsed:.0f} s)."
    )
    say(f"Phase timeline (Feng & Tu's phases of learning, {len(detector.history)} measurements):")
    for phase, first, last in _timeline(detector.history):
        say(f"  epochs {first}-{last}: {_PHASE_WORDS.get(phase, phase)}")
    rec = detector.recommended
    if rec is not None:
        why = (
            "the network began to learn the wrong labels"
            if rec.kind == "memorisation_onset"
            else "the start of phase III, memorisation"
        )
        say(f"  recommended stop: epoch {rec.epoch} (step {rec.step}): {why}")
    else:
        say("  recommended stop: not reached in this run (the wrong labels were not yet being learned)")
    if cleanser.t_c_step is not None:
        c = summary["cleansing"]
        say(
            f"Cleansing time t_c (the clean and mislabeled losses were furthest apart): epoch {cleanser.t_c_epoch} "
            f"(step {cleanser.t_c_step}); flagged {cleanser.flagged_indices.numel()} samples as mislabeled; "
            f"precision {c.get('precision') or float('nan'):.3f} (share of flagged that really were mislabeled), "
            f"recall {c.get('recall') or float('nan'):.3f} (share of mislabeled that were flagged)."
        )
    else:
        say(
            "Cleansing time t_c: not reached (the losses of clean and mislabeled samples did not separate clearly "
            "enough, or were still separating when training ended)."
        )
    if test:
        say(f"Test error of the final weights: {test[0].get('test_err', float('nan')):.3f}")
    if kept_test:
        say(
            "Test error of the weights PhaseDetector kept (averaged over phase II, chosen without any clean data): "
            f"{kept_test[0].get('test_err_kept', float('nan')):.3f}"
        )
    say()
    say(f"Everything of this run is in {run_dir}:")
    say(f"  report figure:         {summary['figure']}")
    say(f"  summary (JSON):        {summary['summary']}")
    if cleanser.csv_path is not None:
        say(f"  flagged samples (CSV): {os.path.abspath(cleanser.csv_path)}")
    else:
        say("  flagged samples (CSV): none written (t_c not reached)")
    if weights_path is not None:
        say(f"  kept weights:          {os.path.abspath(weights_path)}  (model.load_state_dict(torch.load(path)))")
    else:
        say("  kept weights:          none (PhaseDetector kept no weights)")
    run_name = os.path.basename(os.path.normpath(run_dir))
    say(f"Open TensorBoard: tensorboard --logdir {args.output_dir}  (this run is '{run_name}' there)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lightning_phases.report.summary import find_runs, make_report

    runs = find_runs(args.logdir)
    if not runs:
        make_report(args.logdir, args.output)  # raises the "no event files" error
    if len(runs) > 1 and args.output is not None:
        listing = "\n  ".join(runs)
        raise LightningPhasesError(
            f"-o/--output names one figure, but {args.logdir!r} holds {len(runs)} runs; drop -o (each run's "
            f"report goes into its own directory) or point at one run:\n  {listing}"
        )
    if len(runs) > 1:
        print(f"{args.logdir} holds {len(runs)} runs; reporting each on its own.")
    for run in runs:
        summary = make_report(run, args.output)
        if len(runs) > 1:
            print(f"Run {run}:")
        print(f"Report figure: {summary['figure']}")
        print(f"Summary: {summary['summary']}")
        for note in summary["notes"]:
            print(f"note: {note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-phases``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _demo(args) if args.command == "demo" else _report(args)
    except LightningPhasesError as err:
        print(f"lightning-phases {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
