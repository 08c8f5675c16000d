"""Label-noise SGD, SAM and plain SGD on the two-layer linear network of Zhang et al. (2025).

Trains ``f(x) = Σ_i a_i w_iᵀx`` on sparse linear regression three times from the
same initialisation and writes all runs under one TensorBoard root, so the
curves share a chart::

    python examples/two_layer_linear.py --logdir runs
    tensorboard --logdir runs/two_layer_linear     # runs: version_N/sgd, version_N/label_noise_sgd, version_N/sam

Each call writes a new ``runs/two_layer_linear/version_N`` (the next free N), so reruns never mix.

Watch ``two_layer/mean_norm`` (Phase I: falls with label noise and SAM, flat
with plain SGD) and ``two_layer/mean_abs_cosine`` (Phase II: rises toward 1).
``--smoke`` runs a few steps of each, for tests.

One run at a time through ``LightningCLI`` and a YAML config (synthetic data,
offline), e.g. to change any setting of the model, data or trainer::

    python examples/two_layer_linear.py fit --config examples/configs/two_layer_linear_label_noise_sgd.yaml
    python examples/two_layer_linear.py fit --config examples/configs/two_layer_linear_sam.yaml --model.rho 0.2
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

try:  # the unified package, or the standalone one
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl  # type: ignore[no-redef]

from lightning_phases import LabelNoise, SparseLinearRegressionDataModule, TwoLayerLinearNetwork

RUNS = ("sgd", "label_noise_sgd", "sam")


def next_version(root: str) -> str:
    """``version_N`` with the next free ``N`` under ``root``: each call of the script writes a new set of runs."""
    taken = [
        int(name.split("_", 1)[1])
        for name in (os.listdir(root) if os.path.isdir(root) else [])
        if name.startswith("version_") and name.split("_", 1)[1].isdigit()
    ]
    return f"version_{max(taken, default=-1) + 1}"


def train(run: str, args: argparse.Namespace, version: str) -> dict[str, float]:
    """Train one run (``sgd``, ``label_noise_sgd`` or ``sam``) and return its final neuron statistics."""
    pl.seed_everything(args.seed, verbose=False)  # the DataLoader's shuffling
    dm = SparseLinearRegressionDataModule(
        dim=args.dim,
        sparsity=args.sparsity,
        num_train=args.num_train,
        num_val=args.num_test,
        num_test=args.num_test,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    model = TwoLayerLinearNetwork(
        dim=args.dim,
        width=args.width,
        init_scale=args.init_scale,
        lr=args.lr,
        optimizer="sam" if run == "sam" else "sgd",
        rho=args.rho,
        seed=args.seed,
    )
    callbacks = [LabelNoise(sigma=args.sigma, seed=args.seed)] if run == "label_noise_sgd" else []
    steps_per_epoch = -(-args.num_train // args.batch_size)
    trainer = pl.Trainer(
        default_root_dir=args.logdir,
        accelerator="cpu",
        max_steps=args.steps,
        callbacks=callbacks,
        logger=pl.loggers.TensorBoardLogger(
            os.path.join(args.logdir, "two_layer_linear"), name=version, version=run
        ),  # runs/two_layer_linear/version_N/{sgd,label_noise_sgd,sam}: reruns never mix
        log_every_n_steps=max(1, args.steps // 200),
        check_val_every_n_epoch=max(1, args.steps // 20 // steps_per_epoch),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    test_loss = trainer.test(model, datamodule=dm, verbose=False)[0]["test_loss"]
    return {**model.statistics(), "test_loss": test_loss}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("fit", "validate", "test", "predict"):  # one run through LightningCLI
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _cli import run as run_cli

        run_cli(TwoLayerLinearNetwork, __doc__, argv)
        return None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--sparsity", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=40)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--width", type=int, default=20)
    parser.add_argument("--init-scale", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--sigma", type=float, default=2.0, help="label noise std of label-noise SGD")
    parser.add_argument("--rho", type=float, default=0.1, help="SAM radius")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps per run (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.num_test = 20, 50
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    results = {}
    version = next_version(os.path.join(args.logdir, "two_layer_linear"))
    for run in RUNS:
        results[run] = train(run, args, version)
        stats = results[run]
        print(
            f"{run:>16s}: mean_norm {stats['mean_norm']:.3f}  mean_abs_cosine {stats['mean_abs_cosine']:.3f}  "
            f"test_loss {stats['test_loss']:.4f}"
        )
    return results


if __name__ == "__main__":
    main()
