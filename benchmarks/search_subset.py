"""GMMCleanser's search on a subset (``search_samples=4096``, the default) against every sample, side by side.

Each cell is ONE noisy training run of a ``benchmarks/generalization.py`` setting with two flag-only
cleansers fitted after every epoch (``every_n_epochs=1``, so the schedule is the same for both): one
evaluates every training sample at every measurement (``search_samples=None``), the other searches on
the default fixed subset of 4096 and evaluates every sample once at t_c, at the peak's state. Both see
the same training, so every difference in t_c and in the flags comes from the subset. Printed per
cell: t_c, the number flagged, precision/recall/F1/AUROC of the flags against the known noise mask
(AUROC of the peak fit's posterior over every training sample, the scores the flags come from), each
cleanser's seconds measuring (loss passes and fits, the subset's final full pass included) and their
ratio. Results and the machine: ``benchmarks/README.md``, "GMMCleanser's search on a subset".

    python benchmarks/search_subset.py [--datasets mnist1d_mlp mnist1d_cnn] [--rates 0.2 0.4 0.6]
                                       [--seeds 6] [--mnist1d-samples 20000] [--epochs 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["mnist1d_mlp", "mnist1d_cnn"])
    parser.add_argument("--noise", default="symmetric", choices=["symmetric", "pairflip"])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--seeds", type=int, nargs="+", default=[6])
    parser.add_argument("--mnist1d-samples", type=int, default=20000, help="generated MNIST-1D samples (72%% train)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    import logging
    import warnings

    import pytorch_lightning  # noqa: F401 - sets its loggers' levels on import; override them below
    import torch
    from _common import seeded_fit
    from generalization import make

    from lightning_phases import GMMCleanser
    from lightning_phases.functional import detection_metrics

    class FullSearch(GMMCleanser):
        """A second GMMCleanser in one Trainer needs its own ``state_key`` (Lightning refuses two alike)."""

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average at start {os.getloadavg()[0]:.1f}")
    header = f"{'cell':34s} {'search':>7s} {'t_c':>4s} {'flagged':>7s} {'P':>6s} {'R':>6s} {'F1':>6s} {'AUROC':>6s} {'pass s':>7s}"
    print(header)
    for dataset in args.datasets:
        for rate in args.rates:
            for seed in args.seeds:
                setting = make(dataset, args.noise, rate, seed, args)
                dm = setting.datamodule
                dm.setup("fit")
                truth = dm.noisy_train.is_noisy
                n = len(truth)
                full = FullSearch(every_n_epochs=1, search_samples=None)
                subset = GMMCleanser(every_n_epochs=1)
                start = time.perf_counter()
                seeded_fit(setting.model_fn, seed, args.epochs, datamodule=dm, callbacks=[full, subset])
                wall = time.perf_counter() - start
                cell = f"{dataset} {args.noise} {rate:g} s{seed} (n={n})"
                for label, c in (("all", full), ("subset", subset)):
                    flags = torch.zeros(n, dtype=torch.bool)
                    if c.flagged_indices.numel():
                        flags[c.flagged_indices] = True
                    met = detection_metrics(flags, truth)
                    # the peak fit's posterior over every training sample (the flags' scores), for both alike
                    candidate = getattr(c, "_candidate", None) if c.t_c_epoch is not None else None
                    auroc = float("nan")
                    if candidate is not None:
                        auroc = detection_metrics(candidate["posterior"].to(torch.float64), truth).auroc
                    t_c = "-" if c.t_c_epoch is None else str(c.t_c_epoch)
                    print(
                        f"{cell:34s} {label:>7s} {t_c:>4s} {int(flags.sum()):7d} {met.precision:6.3f} "
                        f"{met.recall:6.3f} {met.f1:6.3f} {auroc:6.3f} {c.budget.spent:7.2f}"
                    )
                ratio = subset.budget.spent / full.budget.spent if full.budget.spent else float("nan")
                print(f"{'':34s} passes: subset/all {ratio:.2f}; fit {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
