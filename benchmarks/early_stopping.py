"""Early stopping without clean validation data: PhaseDetector's recommended stop vs the oracle vs EarlyStopping.

For each dataset and noise rate, one run trains with OrderParameterMonitor,
NoiseSplitTracker and two PhaseDetectors (which only record their
recommendation): the default one, which keeps the weights averaged over phase
II up to the recommended stop, and one with ``average_weights=False``, which
keeps the weights at the stop. A recorder measures the clean test accuracy
after every epoch (the oracle, which reads test labels). A second run with the
same seed uses Lightning's ``EarlyStopping`` on the *noisy* validation loss
plus ``ModelCheckpoint`` (the usual recipe); its test accuracy is that of the
best checkpoint. Prints, per setting: the oracle's best test accuracy, the
test accuracy of PhaseDetector's kept weights (averaged, and at the stop), and
EarlyStopping's; the gaps in points; and the mean gap per setting.

    python benchmarks/early_stopping.py [--quick]
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
    TestAccuracyRecorder,
    accuracy,
    accuracy_of_state,
    machine,
    quiet_trainer,
)
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402

from lightning_phases import NoiseSplitTracker, OrderParameterMonitor, PhaseDetector  # noqa: E402
from lightning_phases.data import GaussianClustersDataModule, NoisyDigitsDataModule  # noqa: E402


def make(dataset: str, rate: float, seed: int):
    if dataset == "digits":
        dm = NoisyDigitsDataModule(noise_rate=rate, seed=seed, batch_size=32)
        model = lambda: MLPClassifier(64, 128, 10, lr=0.05)  # noqa: E731
    else:
        dm = GaussianClustersDataModule(
            num_classes=4,
            dim=20,
            num_train=1500,
            num_val=300,
            num_test=2000,
            separation=1.0,
            spread=1.6,
            noise_rate=rate,
            seed=seed,
            batch_size=32,
        )
        model = lambda: MLPClassifier(20, 256, 4, lr=0.05)  # noqa: E731
    dm.setup("fit")
    dm.setup("test")
    return dm, model


def run(dataset: str, rate: float, epochs: int, seed: int) -> dict:
    dm, model_fn = make(dataset, rate, seed)
    test_loader = dm.test_dataloader()
    # 1) PhaseDetector + oracle recorder
    pl.seed_everything(seed, verbose=False)
    model = model_fn()
    recorder = TestAccuracyRecorder(test_loader)
    detector = PhaseDetector(verbose=False)
    at_stop = PhaseDetector(verbose=False, average_weights=False)
    trainer = quiet_trainer(
        max_epochs=epochs,
        limit_val_batches=0,
        callbacks=[
            OrderParameterMonitor(every_n_epochs=1, probe_size=512),
            NoiseSplitTracker(every_n_epochs=1, probe_size=512),
            detector,
            at_stop,
            recorder,
        ],
        logger=pl.loggers.CSVLogger(tempfile.mkdtemp()),
    )
    trainer.fit(model, datamodule=dm)
    oracle_epoch = max(recorder.by_epoch, key=recorder.by_epoch.get)
    oracle = recorder.by_epoch[oracle_epoch]
    final = recorder.by_epoch[max(recorder.by_epoch)]
    pd_epoch = detector.recommended.epoch if detector.recommended is not None else None
    # kept weights; without any (never reached phase II) the final model
    pd_acc = accuracy_of_state(model_fn, detector.recommended_state_dict, test_loader, final)
    point_acc = accuracy_of_state(model_fn, at_stop.recommended_state_dict, test_loader, final)
    # 2) EarlyStopping on the noisy validation loss, same seed
    pl.seed_everything(seed, verbose=False)
    es_model = model_fn()
    ckpt_dir = tempfile.mkdtemp()
    es = EarlyStopping(monitor="val_loss", mode="min", patience=10)
    ck = ModelCheckpoint(dirpath=ckpt_dir, monitor="val_loss", mode="min", save_top_k=1)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[es, ck], enable_checkpointing=True)
    trainer.fit(es_model, datamodule=dm)
    best = MLPClassifier.load_from_checkpoint(ck.best_model_path)
    es_acc = accuracy(best, test_loader)
    es_epoch = torch.load(ck.best_model_path, weights_only=False)["epoch"]
    return dict(
        oracle=oracle,
        oracle_epoch=oracle_epoch,
        pd=pd_acc,
        point=point_acc,
        pd_epoch=pd_epoch,
        es=es_acc,
        es_epoch=es_epoch,
        phases=[(p, a, b) for p, a, b in detector.tracker.timeline()],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and settings")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--only", nargs="+", default=None, help='settings to run, e.g. "digits:0.4" "clusters:0.2"')
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on shared cores OpenMP threads spin-wait on each other)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = [("digits", r) for r in (0.2, 0.4, 0.6)] + [("clusters", r) for r in (0.2, 0.4, 0.6)]
    epochs = 40 if args.quick else 120
    if args.quick:
        settings = settings[:2]
    if args.only:
        settings = [(d, float(r)) for d, r in (item.split(":") for item in args.only)]
    print(f"machine: {machine()}")
    print(
        f"{'data':<9s} {'rho':>4s} {'seed':>4s} | {'oracle':>7s} (ep) | {'PhaseDet':>8s} (ep) {'gap':>6s} | "
        f"{'at stop':>8s} {'gap':>6s} | {'EarlyStop':>9s} (ep) {'gap':>6s} | phases"
    )
    rows = []
    for dataset, rate in settings:
        for seed in range(args.seeds):
            start = time.time()
            r = run(dataset, rate, epochs, seed)
            rows.append((dataset, rate, r))
            phases = " ".join(f"{p}:{a}-{b}" for p, a, b in r["phases"])
            print(
                f"{dataset:<9s} {rate:4.1f} {seed:4d} | {100 * r['oracle']:6.2f}% ({r['oracle_epoch']:3d}) | "
                f"{100 * r['pd']:7.2f}% ({r['pd_epoch'] if r['pd_epoch'] is not None else '-':>3}) {100 * (r['pd'] - r['oracle']):+6.2f} | "
                f"{100 * r['point']:7.2f}% {100 * (r['point'] - r['oracle']):+6.2f} | "
                f"{100 * r['es']:8.2f}% ({r['es_epoch']:3d}) {100 * (r['es'] - r['oracle']):+6.2f} | {phases}  [{time.time() - start:.0f}s]",
                flush=True,
            )
    within = sum(100 * (r["oracle"] - r["pd"]) <= 1.5 for _, _, r in rows)
    not_worse = sum(r["pd"] >= r["es"] for _, _, r in rows)
    print(
        f"runs: PhaseDetector within 1.5 points of the oracle: {within}/{len(rows)}; no worse than EarlyStopping: {not_worse}/{len(rows)}"
    )
    print("mean gap to the oracle per setting (points): PhaseDetector averaged / at the stop / EarlyStopping")
    for dataset, rate in dict.fromkeys((d, r) for d, r, _ in rows):
        rs = [r for d, q, r in rows if (d, q) == (dataset, rate)]
        gap = lambda key: sum(100 * (r[key] - r["oracle"]) for r in rs) / len(rs)  # noqa: E731, B023 - used inside the loop body
        verdict = "within 1.5" if gap("pd") >= -1.5 else "not within 1.5"
        verdict += ", no worse than ES" if gap("pd") >= gap("es") else ", worse than ES"
        print(f"  {dataset:<9s} {rate:.1f}: {gap('pd'):+6.2f} / {gap('point'):+6.2f} / {gap('es'):+6.2f}   ({verdict})")


if __name__ == "__main__":
    main()
