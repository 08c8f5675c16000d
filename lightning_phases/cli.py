"""The ``lightning-phases`` command: an offline demo and a report of any logged run.

Usage::

    lightning-phases demo [--noise-rate 0.5] [--epochs 80] [--seed 0] [--output-dir runs/demo]
    lightning-phases report LOGDIR [-o FILE]
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-phases``."""
    parser = argparse.ArgumentParser(
        prog="lightning-phases",
        description="Watch the phases of SGD learning with mislabeled data (PyTorch Lightning callbacks).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train an MLP on noisy digits with all four callbacks (offline, a few minutes on a CPU)",
        description=(
            "Train an MLP on scikit-learn's bundled handwritten digits with symmetric label noise, with "
            "OrderParameterMonitor, NoiseSplitTracker, PhaseDetector and GMMCleanser and a TensorBoard logger; "
            "then print the phase timeline, t_c, the cleansing summary and the report figure."
        ),
    )
    demo.add_argument(
        "--noise-rate", type=float, default=0.5, help="fraction of mislabeled training samples (default 0.5)"
    )
    demo.add_argument("--epochs", type=int, default=80, help="training epochs (default 80)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the noise, the split and the model (default 0)")
    demo.add_argument(
        "--output-dir", default=os.path.join("runs", "demo"), help="where logs and the report go (default runs/demo)"
    )
    demo.add_argument("--probe-size", type=int, default=512, help="probe samples of the monitors (default 512)")
    demo.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    demo.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's progress bar")
    report = sub.add_parser(
        "report",
        help="draw the report figure and summary.json of a logged run",
        description="Read the TensorBoard event files of a run logged by the callbacks and draw one multi-panel figure.",
    )
    report.add_argument("logdir", help="directory with the run's TensorBoard event files")
    report.add_argument("-o", "--output", default=None, help="figure path (PNG/PDF); default LOGDIR/report.png")
    return parser


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

    class DigitsMLP(pl.LightningModule):
        def __init__(self, lr: float) -> None:
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
            self.log("test_err", (self(x).argmax(1) != y).float().mean())

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_err", (self(x).argmax(1) != y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    pl.seed_everything(args.seed, verbose=False)
    dm = NoisyDigitsDataModule(noise_rate=args.noise_rate, seed=args.seed, batch_size=32)
    logger = TensorBoardLogger(args.output_dir, name="", version="")
    cleanser = GMMCleanser(patience=3, max_fraction=0.95)
    detector = PhaseDetector(verbose=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=logger,
        callbacks=[
            OrderParameterMonitor(probe_size=args.probe_size),
            NoiseSplitTracker(probe_size=args.probe_size),
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
            kept = DigitsMLP(args.lr)
            kept.load_state_dict(detector.recommended_state_dict)
            kept_test = trainer.test(kept, datamodule=dm, verbose=False)
    elapsed = time.time() - start
    logdir = logger.log_dir
    summary = make_report(logdir, os.path.join(logdir, "report.png"))
    print()
    print(
        f"Trained {args.epochs} epochs on digits with {args.noise_rate:.0%} mislabeled training labels in {elapsed:.0f} s."
    )
    print(detector.summary())
    if cleanser.t_c_step is not None:
        c = summary["cleansing"]
        print(
            f"Cleansing time t_c: step {cleanser.t_c_step} (epoch {cleanser.t_c_epoch}); "
            f"flagged {cleanser.flagged_indices.numel()} samples; precision {c.get('precision') or float('nan'):.3f}, "
            f"recall {c.get('recall') or float('nan'):.3f} against the known noise."
        )
    else:
        print(
            "Cleansing time t_c: not reached (the loss populations were still separating, or the losses are not bimodal)."
        )
    if test:
        print(f"Final test error: {test[0].get('test_err', float('nan')):.3f}")
    if kept_test:
        print(
            f"Test error with PhaseDetector's kept weights (no clean data used to choose them): "
            f"{kept_test[0].get('test_err', float('nan')):.3f}"
        )
    print(f"Report figure: {summary['figure']}")
    print(f"Summary: {os.path.join(os.path.dirname(summary['figure']), 'summary.json')}")
    print(f"Open TensorBoard: tensorboard --logdir {logdir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lightning_phases.report.summary import make_report

    summary = make_report(args.logdir, args.output)
    print(f"Report figure: {summary['figure']}")
    print(f"Summary: {os.path.join(os.path.dirname(summary['figure']), 'summary.json')}")
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
