"""Do PhaseDetector's and GMMCleanser's decisions hold on data they were not tuned on? (issue 15)

A grid of datasets and models × noise type × noise rate ρ × seed. Per cell:

1. **The noisy run** (``a_n``: final clean-test accuracy), instrumented with
   ``OrderParameterMonitor`` + ``NoiseSplitTracker`` (probe 512) +
   ``PhaseDetector`` (records its recommendation, never stops) +
   ``GMMCleanser(action="flag")`` (t_c and the flags at t_c) + oracle
   recorders: clean-test accuracy after every epoch (the test-error curve the
   phase timeline is printed against; its maximum is the oracle stop) and the
   per-sample training losses (loss AUROC of the mislabeled samples and the
   true gap ``L_w − L_c`` per epoch). Lightning's ``EarlyStopping`` on the
   *noisy* validation loss (patience 10) rides along in record-only mode: the
   epoch where it would stop, and the test accuracy of its best checkpoint
   (the epoch of least validation loss up to there), read from the per-epoch
   test accuracies of the same run (same weights, so no second run).
2. **The cleansed retrain** (``a_c``): the same model and seed trained from
   scratch on the training set without GMMCleanser's flags (``a_c = a_n``
   when it flagged nothing).
3. **The clean-label run** (``a_p``): trained on the truly clean training
   samples only (the perfect cleanser).
4. **cleanlab** (unless ``--no-cleanlab``): ``find_label_issues`` on 5-fold
   cross-validated probabilities of the same model (5 trainings of
   ``--cv-epochs``), its precision/recall/F1 and the AUROC of
   ``1 − get_label_quality_scores``.

Recorded: ``Q = (a_c − a_n)/(a_p − a_n)`` (SPEC.md §4), its oracle bound
``(max_t a_n(t) − a_n)/(a_p − a_n)``, GMMCleanser's detection at t_c against
the noise mask, PhaseDetector's kept weights' test accuracy vs the oracle and
vs EarlyStopping, the phase timeline, and at ρ = 0 the flagged fraction and the
phase model. One JSON line per cell (``--out``) and a printed table.

Held-out protocol (issue 15 item 3), by dataset AND by seed:

* tuning half: datasets ``digits_mlp``, ``mnist1d_mlp``, ``clusters_mlp`` with seeds 0, 1;
* held-out half: seeds 6, 7 on every dataset, i.e. the tuning datasets on new
  seeds and the held-out datasets ``mnist1d_cnn``, ``teacher_mlp``, which are
  never run with a tuning seed. Seeds 2-5 are left out: ``early_stopping.py``
  chose PhaseDetector's stop on digits and clusters with seeds 0-2 and
  reported 3-5, so they are neither fresh nor part of this tuning half.

Rules and defaults may be chosen on the tuning half only; both halves are
reported separately (benchmarks/README.md, "Generalization").

    pip install 'lightning-phases[bench,mnist1d]'
    python benchmarks/generalization.py --split tuning                   # the tuning half
    python benchmarks/generalization.py --only digits_mlp:symmetric:0.2:0  # one cell
    python benchmarks/generalization.py --only mnist1d_cnn --epochs 40 --no-cleanlab

    python benchmarks/generalization.py --split tuning --noisy-only --record rec   # record noisy runs for replay.py
    python benchmarks/generalization.py --rescore tuning.jsonl --record rec --out tuning_v2.jsonl  # current defaults
    python benchmarks/generalization.py --report tuning_v2.jsonl heldout_v2.jsonl  # both halves and the targets
    python benchmarks/generalization.py --q-bounds heldout.jsonl --record rec --out qb.jsonl  # what bounds Q

``--q-bounds`` retrains each noisy cell of a ``--noisy-only --record`` file
without oracle flags (the per-class margin thresholds of best F1, at t_c and at
any epoch) and with other retrain seeds, and names what bounds its Q.

``--monitor-budget`` runs the monitors at their default overhead budget
instead of every epoch, ``--every-epoch`` GMMCleanser after every epoch
instead of its budget.

``--only`` takes ``dataset[:noise[:rho[:seed]]]`` patterns (``*`` or a missing
field matches all) and runs those cells of the chosen ``--split``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402
    Classifier,
    MLPClassifier,
    PerSampleLossRecorder,
    TestAccuracyRecorder,
    accuracy,
    accuracy_of_state,
    cleanlab_issues,
    cross_validated_probabilities,
    machine,
    seeded_fit,
)
from pytorch_lightning.callbacks import EarlyStopping  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_phases import GMMCleanser, NoiseSplitTracker, OrderParameterMonitor, PhaseDetector  # noqa: E402
from lightning_phases.data import (  # noqa: E402
    GaussianClustersDataModule,
    NoisyDigitsDataModule,
    NoisyMNIST1DDataModule,
)
from lightning_phases.data._base import _NoisyClassificationDataModule  # noqa: E402 - the teacher task below
from lightning_phases.functional import detection_metrics  # noqa: E402

NOISE_TYPES = ("symmetric", "pairflip")
RATES = (0.0, 0.2, 0.4, 0.6, 0.8)
TUNING_DATASETS = ("digits_mlp", "mnist1d_mlp", "clusters_mlp")
HELDOUT_DATASETS = ("mnist1d_cnn", "teacher_mlp")
TUNING_SEEDS = (0, 1)
HELDOUT_SEEDS = (6, 7)  # seeds 0-5 were used to choose the rules of early_stopping.py/cleansing.py


def split_cells(split: str) -> list[tuple[str, int]]:
    """The (dataset, seed) pairs of a half: ``tuning``, ``heldout`` or ``all`` (both halves)."""
    tuning = [(d, s) for d in TUNING_DATASETS for s in TUNING_SEEDS]
    heldout = [(d, s) for d in (*TUNING_DATASETS, *HELDOUT_DATASETS) for s in HELDOUT_SEEDS]
    return {"tuning": tuning, "heldout": heldout, "all": tuning + heldout}[split]


def half_of(dataset: str, seed: int) -> str:
    return "tuning" if dataset in TUNING_DATASETS and seed in TUNING_SEEDS else "heldout"


# ---------------------------------------------------------------- the teacher-network task


class TeacherDataModule(_NoisyClassificationDataModule):
    """A random teacher MLP labels Gaussian inputs: ``y = argmax T(x)``, ``x ~ N(0, I_d)`` (generated here).

    The teacher is ``d → 64 (tanh) → C`` with Gaussian weights drawn from
    ``teacher_seed``; samples whose top two teacher logits are closer than
    ``margin`` are redrawn, so the clean task is learnable but not linear.
    """

    def __init__(
        self,
        *,
        num_classes: int = 5,
        dim: int = 20,
        num_train: int = 3300,
        num_test: int = 2000,
        margin: float = 0.2,
        teacher_seed: int = 0,
        noise_type: str = "symmetric",
        noise_rate: float = 0.0,
        seed: int = 0,
        batch_size: int = 32,
        val_size: float | int = 300,
        class_map: dict[int, int] | None = None,
    ) -> None:
        self.num_classes = num_classes
        super().__init__(
            noise_type=noise_type,
            noise_rate=noise_rate,
            seed=seed,
            batch_size=batch_size,
            val_size=val_size,
            class_map=class_map,
        )
        self.dim, self.sizes, self.margin, self.teacher_seed = dim, (num_train, num_test), margin, teacher_seed
        self._data: tuple[TensorDataset, TensorDataset] | None = None

    def _generate(self) -> tuple[TensorDataset, TensorDataset]:
        if self._data is None:
            gen = torch.Generator().manual_seed(self.teacher_seed)
            w1 = torch.randn(self.dim, 64, generator=gen) / math.sqrt(self.dim)
            w2 = torch.randn(64, self.num_classes, generator=gen) * 2.0 / math.sqrt(64)
            need = sum(self.sizes)
            xs, ys = [], []
            while sum(len(x) for x in xs) < need:
                x = torch.randn(4 * need, self.dim, generator=gen)
                logits = torch.tanh(x @ w1 * 2.0) @ w2
                top = logits.topk(2, dim=1).values
                keep = (top[:, 0] - top[:, 1]) > self.margin
                xs.append(x[keep])
                ys.append(logits[keep].argmax(1))
            x, y = torch.cat(xs)[:need], torch.cat(ys)[:need]
            n = self.sizes[0]
            self._data = (TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]))
        return self._data

    def _load(self, train: bool):
        return self._generate()[0 if train else 1]


# ---------------------------------------------------------------- datasets and models


def conv1d_net(length: int = 40, channels: int = 25, num_classes: int = 10) -> nn.Module:
    """MNIST-1D's reference CNN (as examples/models.py's Conv1DClassifier)."""
    out = length
    for kernel in (5, 3, 3):
        out = (out + 2 - kernel) // 2 + 1
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, channels, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * out, num_classes),
    )


@dataclass
class Setting:
    datamodule: pl.LightningDataModule
    model_fn: object
    num_classes: int
    epochs: int


def cyclic_map(num_classes: int) -> dict[int, int]:
    """Pair-flip of every class to the next one, ``c → c + 1 mod C`` (Han et al. 2018)."""
    return {c: (c + 1) % num_classes for c in range(num_classes)}


def make(dataset: str, noise: str, rate: float, seed: int, args) -> Setting:
    common = dict(noise_type=noise, noise_rate=rate, seed=seed, batch_size=32)
    if dataset == "digits_mlp":
        dm = NoisyDigitsDataModule(**common, class_map=cyclic_map(10) if noise == "pairflip" else None)
        return Setting(dm, lambda: MLPClassifier(64, 128, 10, lr=0.05), 10, args.epochs or 100)
    if dataset in ("mnist1d_mlp", "mnist1d_cnn"):
        # 10k generated: 7200 train / 800 noisy validation / 2000 clean test
        dm = NoisyMNIST1DDataModule(
            **common, num_samples=args.mnist1d_samples, class_map=cyclic_map(10) if noise == "pairflip" else None
        )
        if dataset == "mnist1d_mlp":
            return Setting(dm, lambda: MLPClassifier(40, 256, 10, lr=0.1), 10, args.epochs or 60)
        return Setting(dm, lambda: Classifier(conv1d_net(), lr=0.1), 10, args.epochs or 60)
    if dataset == "clusters_mlp":
        dm = GaussianClustersDataModule(
            num_classes=4,
            dim=20,
            num_train=1500,
            num_val=300,
            num_test=2000,
            separation=1.0,
            spread=1.6,
            class_map=cyclic_map(4) if noise == "pairflip" else None,
            **common,
        )
        return Setting(dm, lambda: MLPClassifier(20, 256, 4, lr=0.05), 4, args.epochs or 60)
    if dataset == "teacher_mlp":
        dm = TeacherDataModule(**common, class_map=cyclic_map(5) if noise == "pairflip" else None)
        return Setting(dm, lambda: MLPClassifier(20, 256, 5, lr=0.05), 5, args.epochs or 60)
    raise SystemExit(f"unknown dataset {dataset!r}; use one of {TUNING_DATASETS + HELDOUT_DATASETS}")


# ---------------------------------------------------------------- one cell


class RecordingEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping, deciding as usual but only recording the epoch where it would stop.

    Checked at the end of validation (``check_on_train_epoch_end=False``): the
    same decision as the default check at the end of the training epoch, on the
    same validation loss.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(check_on_train_epoch_end=False, **kwargs)
        self.would_stop_epoch: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        before = trainer.should_stop
        super().on_validation_end(trainer, pl_module)
        if trainer.should_stop and not before:
            if self.would_stop_epoch is None:
                self.would_stop_epoch = trainer.current_epoch
            trainer.should_stop = False  # record only: the noisy run goes on


class ValLossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.by_epoch: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            self.by_epoch[trainer.current_epoch] = float(trainer.callback_metrics["val_loss"])


class LoggedRecorder(pl.Callback):
    """The monitors' logged statistics (``split/*``, ``order/*``) as they stand at the end of every epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, float]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.by_epoch[trainer.current_epoch] = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("split/", "order/")) and torch.as_tensor(v).numel() == 1
        }


class ParameterRecorder(pl.Callback):
    """The flattened parameters after every training epoch (for replaying weight averages offline)."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.by_epoch[trainer.current_epoch] = (
            torch.nn.utils.parameters_to_vector(pl_module.parameters()).detach().clone()
        )


def record_tracker_inputs(detector: PhaseDetector) -> list[dict]:
    """Wrap ``detector.tracker.update`` so that every statistics dict it is fed is appended to the returned list."""
    series: list[dict] = []
    update = detector.tracker.update

    def recording(stats, *, step, epoch=0):
        series.append({"step": int(step), "epoch": int(epoch), "stats": {k: float(v) for k, v in stats.items()}})
        return update(stats, step=step, epoch=epoch)

    detector.tracker.update = recording  # type: ignore[method-assign]
    return series


def record_path(directory: str, dataset: str, noise: str, rate: float, seed: int) -> str:
    return os.path.join(directory, f"{dataset}_{noise}_{rate:g}_{seed}.pt")


def retrained_accuracy(setting: Setting, train, drop, seed: int, test_loader) -> float:
    """Clean-test accuracy of the cell's model trained from scratch on ``train`` without the indices ``drop``."""
    loader = DataLoader(train.without(drop), batch_size=32, shuffle=True)
    model, _ = seeded_fit(setting.model_fn, seed, setting.epochs, train_loader=loader)
    return accuracy(model, test_loader)


def _q(a_c: float, a_n: float, a_p: float) -> float:
    return (a_c - a_n) / (a_p - a_n) if abs(a_p - a_n) > 1e-12 else math.nan


def run_cell(dataset: str, noise: str, rate: float, seed: int, args) -> dict:
    start = time.time()
    s = make(dataset, noise, rate, seed, args)
    dm = s.datamodule
    dm.setup("fit")
    dm.setup("test")
    test_loader = dm.test_dataloader()
    train = dm.noisy_train
    truth = train.is_noisy
    # 1) the instrumented noisy run
    record = args.record is not None
    recorder, val_losses = TestAccuracyRecorder(test_loader), ValLossRecorder()
    losses = PerSampleLossRecorder(train, keep=record)
    params, logged = ParameterRecorder(), LoggedRecorder()
    detector = PhaseDetector(verbose=False)
    tracker_inputs = record_tracker_inputs(detector)
    cleanser = GMMCleanser(action="flag", **({"every_n_epochs": 1} if args.every_epoch else {}))
    es = RecordingEarlyStopping(monitor="val_loss", mode="min", patience=10)
    schedule = {} if args.monitor_budget else {"every_n_epochs": 1}  # default: the overhead budget
    monitors = [
        OrderParameterMonitor(probe_size=args.probe_size, **schedule),
        NoiseSplitTracker(probe_size=args.probe_size, **schedule),
    ]
    model, _ = seeded_fit(
        s.model_fn,
        seed,
        s.epochs,
        datamodule=dm,
        callbacks=[
            *monitors,
            detector,
            cleanser,
            es,
            val_losses,
            recorder,
            losses,
            *([params, logged] if record else []),
        ],
        limit_val_batches=1.0,
        logger=pl.loggers.CSVLogger(args.log_dir or os.path.join(os.getcwd(), "lightning_logs_generalization")),
    )
    curve = [recorder.by_epoch[e] for e in sorted(recorder.by_epoch)]
    a_n = curve[-1]
    oracle_epoch = max(range(len(curve)), key=curve.__getitem__)
    oracle = curve[oracle_epoch]
    rec_epoch = detector.recommended.epoch if detector.recommended is not None else None
    pd_acc = accuracy_of_state(s.model_fn, detector.recommended_state_dict, test_loader, a_n)
    es_stop = es.would_stop_epoch if es.would_stop_epoch is not None else len(curve) - 1
    es_best = min((e for e in val_losses.by_epoch if e <= es_stop), key=val_losses.by_epoch.get, default=None)
    es_acc = recorder.by_epoch[es_best] if es_best is not None else a_n
    flags = torch.zeros(len(train), dtype=torch.bool)
    flags[cleanser.flagged_indices] = True
    t_c = cleanser.t_c_epoch
    gmm = detection_metrics(flags, truth) if t_c is not None and bool(truth.any()) else None
    if record:
        os.makedirs(args.record, exist_ok=True)
        torch.save(
            dict(
                cell=(dataset, noise, rate, seed),
                losses=torch.stack([losses.losses[e] for e in sorted(losses.losses)]),
                correct=torch.stack([losses.correct[e] for e in sorted(losses.correct)]),
                margins=torch.stack([losses.margins[e] for e in sorted(losses.margins)]),
                logged=[logged.by_epoch[e] for e in sorted(logged.by_epoch)],
                truth=truth.clone(),
                labels=train.noisy_targets.clone(),
                test_acc=torch.tensor(curve),
                val_loss={int(k): float(v) for k, v in val_losses.by_epoch.items()},
                tracker_inputs=tracker_inputs,
                params=torch.stack([params.by_epoch[e] for e in sorted(params.by_epoch)]),
                num_classes=s.num_classes,
            ),
            record_path(args.record, dataset, noise, rate, seed),
        )
    # 2) cleansed retrain, 3) clean-label run
    if args.noisy_only:
        a_c = a_p = math.nan
    else:
        a_c = retrained_accuracy(s, train, cleanser.flagged_indices, seed, test_loader) if int(flags.sum()) else a_n
        a_p = retrained_accuracy(s, train, train.noisy_indices, seed, test_loader) if bool(truth.any()) else a_n
    # 4) cleanlab
    cl = None
    if not args.no_cleanlab and not args.noisy_only and bool(truth.any()):
        probs = cross_validated_probabilities(train, s.model_fn, s.num_classes, args.cv_epochs, seed)
        issues, scores = cleanlab_issues(train, probs)
        det = detection_metrics(issues, truth)
        cl = dict(
            precision=det.precision,
            recall=det.recall,
            f1=det.f1,
            auroc=detection_metrics(scores, truth).auroc,
            flagged=int(issues.sum()),
        )
    auroc_peak = max(losses.auroc, key=losses.auroc.get) if losses.auroc else None
    gap_peak = max(losses.gap, key=losses.gap.get) if losses.gap else None
    return dict(
        dataset=dataset,
        noise=noise,
        rho=rate,
        seed=seed,
        half=half_of(dataset, seed),
        epochs=s.epochs,
        n_train=len(train),
        n_noisy=int(truth.sum()),
        a_n=a_n,
        a_c=a_c,
        a_p=a_p,
        Q=_q(a_c, a_n, a_p),
        Q_oracle_bound=_q(oracle, a_n, a_p),
        test_acc_curve=curve,
        oracle=oracle,
        oracle_epoch=oracle_epoch,
        phase_model=detector.tracker.model,
        phase_measurements=detector.tracker.num_measurements,
        monitor_budget=bool(args.monitor_budget),
        phases=[list(p) for p in detector.tracker.timeline()],
        recommended_epoch=rec_epoch,
        recommended_acc=pd_acc,
        early_stopping_acc=es_acc,
        early_stopping_best_epoch=es_best,
        early_stopping_stop_epoch=es.would_stop_epoch,
        t_c_epoch=t_c,
        flagged=int(flags.sum()),
        flagged_fraction=float(flags.float().mean()),
        gmm=None if gmm is None else dict(precision=gmm.precision, recall=gmm.recall, f1=gmm.f1),
        loss_auroc_at_t_c=losses.auroc.get(t_c) if t_c is not None else None,
        loss_auroc_peak=None if auroc_peak is None else [auroc_peak, losses.auroc[auroc_peak]],
        true_gap_peak_epoch=gap_peak,
        cleanlab=cl,
        seconds=time.time() - start,
    )


# ---------------------------------------------------------------- table


def _f(x, fmt="{:5.1f}", scale=100.0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-".rjust(len(fmt.format(0.0)))
    return fmt.format(scale * x)


HEADER = (
    f"{'half':<7s} {'dataset':<11s} {'noise':<9s} {'rho':>3s} {'s':>1s} | {'a_n':>5s} {'a_c':>5s} {'a_p':>5s} "
    f"{'Q':>5s} {'Qorc':>5s} | {'t_c':>3s} {'GMM P/R/F1':>14s} {'AUC':>4s} | {'cleanlab P/R/F1':>15s} {'AUC':>4s} | "
    f"{'orac(ep)':>9s} {'PD(ep)':>9s} {'ES(ep)':>9s} | phases"
)


def row(r: dict) -> str:
    gmm, cl = r["gmm"], r["cleanlab"]
    g = "-" if gmm is None else f"{gmm['precision']:.2f}/{gmm['recall']:.2f}/{gmm['f1']:.2f}"
    c = "-" if cl is None else "/".join(_f(cl.get(k), "{:.2f}", 1) for k in ("precision", "recall", "f1"))
    phases = " ".join(f"{p}:{a}-{b}" for p, a, b in r["phases"]) or "-"
    if r["rho"] == 0:
        phases += f" [{r['phase_model']}; flagged {100 * r['flagged_fraction']:.1f}%]"
    rec = "-" if r["recommended_epoch"] is None else r["recommended_epoch"]
    return (
        f"{r['half']:<7s} {r['dataset']:<11s} {r['noise']:<9s} {r['rho']:3.1f} {r['seed']:1d} | "
        f"{_f(r['a_n'])} {_f(r['a_c'])} {_f(r['a_p'])} {_f(r['Q'], '{:5.2f}', 1)} {_f(r['Q_oracle_bound'], '{:5.2f}', 1)} | "
        f"{r['t_c_epoch'] if r['t_c_epoch'] is not None else '-':>3} {g:>14s} {_f(r['loss_auroc_at_t_c'], '{:4.2f}', 1):>4s} | "
        f"{c:>15s} {_f(cl and cl.get('auroc'), '{:4.2f}', 1):>4s} | "
        f"{_f(r['oracle'])}({r['oracle_epoch']:>2}) {_f(r['recommended_acc'])}({rec:>2}) "
        f"{_f(r['early_stopping_acc'])}({r['early_stopping_best_epoch'] if r['early_stopping_best_epoch'] is not None else '-':>2}) | "
        f"{phases}  [{r['seconds']:.0f}s]"
    )


def rescore_cell(r: dict, args) -> dict:
    """``r`` (a cell run with ``--record``) with GMMCleanser's *current* defaults replayed on its recorded
    noisy run (every epoch, the recorded per-sample losses) and ``a_c`` retrained where the flags changed.

    Everything else of the cell (the noisy run, ``a_p``, cleanlab, the stop) does not depend on the
    cleansing rule (the cleanser only flags in the noisy run), so it is kept. A cell run with
    ``--noisy-only`` has no ``a_p`` or ``a_c``: both are trained here (cleanlab stays absent).
    """
    from replay import replay_cleansing  # noqa: PLC0415 - replay.py imports this module

    start = time.time()
    rec = torch.load(record_path(args.record, r["dataset"], r["noise"], r["rho"], r["seed"]))
    rec["name"] = f"{r['dataset']}:{r['noise']}:{r['rho']:g}:{r['seed']}"
    recorded = rec["test_acc"].double()
    if (
        recorded.numel() != len(r["test_acc_curve"])
        or float((recorded - torch.tensor(r["test_acc_curve"])).abs().max()) > 1e-6
    ):
        # the record is of another run: run the cell afresh
        return dict(run_cell(r["dataset"], r["noise"], r["rho"], r["seed"], args), rescored=False)
    new = replay_cleansing(rec, return_flags=True)
    flags = new["flags"]
    out = dict(r, rescored=True, gmm_schedule="every epoch, replayed on the recorded losses")
    truth = rec["truth"]
    same = new["t_c"] == r["t_c_epoch"] and int(flags.sum()) == r["flagged"] and not math.isnan(r["a_c"])
    need_a_p = math.isnan(r["a_p"]) and bool(truth.any())
    if (not same and int(flags.sum())) or need_a_p:
        s = make(r["dataset"], r["noise"], r["rho"], r["seed"], args)
        s.datamodule.setup("fit")
        s.datamodule.setup("test")
        train, test_loader = s.datamodule.noisy_train, s.datamodule.test_dataloader()
        if not bool((train.is_noisy == truth.bool()).all()):
            raise SystemExit(f"{rec['name']}: the rebuilt training set's noise is not the record's")
        if not same and int(flags.sum()):
            out["a_c"] = retrained_accuracy(s, train, torch.nonzero(flags).flatten(), r["seed"], test_loader)
        if need_a_p:
            out["a_p"] = retrained_accuracy(s, train, train.noisy_indices, r["seed"], test_loader)
    if not int(flags.sum()):
        out["a_c"] = r["a_n"]
    if not bool(truth.any()):
        out["a_p"] = r["a_n"]
    out["Q"] = _q(out["a_c"], r["a_n"], out["a_p"])
    out["Q_oracle_bound"] = _q(r["oracle"], r["a_n"], out["a_p"])
    out["t_c_epoch"] = new["t_c"]
    out["flagged"] = int(flags.sum())
    out["flagged_fraction"] = float(flags.float().mean())
    if new["t_c"] is not None and bool(truth.any()):
        det = detection_metrics(flags, truth)
        out["gmm"] = dict(precision=det.precision, recall=det.recall, f1=det.f1)
        out["loss_auroc_at_t_c"] = detection_metrics(rec["losses"][new["t_c"]].double(), truth).auroc
    else:
        out["gmm"], out["loss_auroc_at_t_c"] = None, None
    out["seconds"] = r["seconds"] + time.time() - start
    return out


def q_bound_cell(r: dict, args) -> dict:
    """What bounds Q in one cell ``r`` (a line of a ``--noisy-only --record`` run): retrains from scratch.

    At the run's own t_c it retrains without three flag sets: GMMCleanser's (``Q``), the per-class
    logit-margin thresholds with the best F1 at t_c (``Q_best_t_c``: the best any threshold placement on
    the shipped score could do at that time), and the best such thresholds of any epoch
    (``Q_best_any``: the best the score could do at any time). ``a_p`` is trained as in :func:`run_cell`.
    Each ``--retrain-seeds`` seed retrains ``a_c`` (GMMCleanser's flags) and ``a_p`` again, so ``Q_seeds``
    shows how far retraining noise alone moves Q (``a_n`` stays the noisy run's).

    The verdict names the first that holds: met, the score (``Q_best_any`` < 0.5: no per-class
    threshold on the margin of any epoch reaches it), the time (``Q_best_t_c`` < 0.5 ≤ ``Q_best_any``),
    the threshold placement (``Q`` < 0.5 ≤ ``Q_best_t_c``). It adds where the best stop is short too
    (``Qorc`` < 0.5: not a bound on a retrain, which the best flags beat in several cells) and where
    another retrain seed crosses 0.5 ("retrain noise").
    """
    from replay import best_class_wise_flags, flags_at, margins_at  # noqa: PLC0415 - replay.py imports this module

    start = time.time()
    name = f"{r['dataset']}:{r['noise']}:{r['rho']:g}:{r['seed']}"
    rec = torch.load(record_path(args.record, r["dataset"], r["noise"], r["rho"], r["seed"]))
    rec["name"] = name
    if float((rec["test_acc"].double() - torch.tensor(r["test_acc_curve"], dtype=torch.float64)).abs().max()) > 1e-6:
        raise SystemExit(f"{name}: the record is of another run than the --q-bounds line")
    s = make(r["dataset"], r["noise"], r["rho"], r["seed"], args)
    s.datamodule.setup("fit")
    s.datamodule.setup("test")
    train, test_loader = s.datamodule.noisy_train, s.datamodule.test_dataloader()
    truth, labels = rec["truth"].bool(), rec["labels"]
    if not bool((train.is_noisy == truth).all()):
        raise SystemExit(f"{name}: the rebuilt training set's noise is not the record's")
    a_n, t_c = r["a_n"], r["t_c_epoch"]
    best_any = [best_class_wise_flags(margins_at(rec, e), truth, labels) for e in range(rec["losses"].shape[0])]
    epoch_any = max(range(len(best_any)), key=lambda e: best_any[e][0])
    none = torch.zeros(len(train), dtype=torch.bool)
    flag_sets = {
        "shipped": flags_at(rec, t_c) if t_c is not None else none,
        "best_t_c": best_class_wise_flags(margins_at(rec, t_c), truth, labels)[1] if t_c is not None else none,
        "best_any": best_any[epoch_any][1],
    }

    def a_c(flags: torch.Tensor, seed: int) -> float:
        drop = torch.nonzero(flags).flatten()
        if drop.numel() == len(train):  # nothing left to train on (the best F1 can flag every sample)
            return math.nan
        return retrained_accuracy(s, train, drop, seed, test_loader) if drop.numel() else a_n

    a_p = retrained_accuracy(s, train, train.noisy_indices, r["seed"], test_loader)
    out = dict(
        dataset=r["dataset"],
        noise=r["noise"],
        rho=r["rho"],
        seed=r["seed"],
        half=r["half"],
        t_c_epoch=t_c,
        a_n=a_n,
        a_p=a_p,
        oracle=r["oracle"],
        Q_oracle_bound=_q(r["oracle"], a_n, a_p),
        best_any_epoch=epoch_any,
    )
    for key, flags in flag_sets.items():
        acc = a_c(flags, r["seed"])
        out[f"a_c_{key}"], out[f"Q_{key}"] = acc, _q(acc, a_n, a_p)
        out[f"F1_{key}"] = detection_metrics(flags, truth).f1 if bool(flags.any()) else 0.0
    out["Q_seeds"] = [out["Q_shipped"]]
    for seed in args.retrain_seeds:
        out["Q_seeds"].append(
            _q(
                a_c(flag_sets["shipped"], seed),
                a_n,
                retrained_accuracy(s, train, train.noisy_indices, seed, test_loader),
            )
        )
    out["verdict"] = q_verdict(out)
    out["seconds"] = time.time() - start
    return out


def q_verdict(b: dict, target: float = 0.5) -> str:
    """The bound :func:`q_bound_cell` found for one cell (see there)."""

    def reaches(q: float) -> bool:  # NaN (no retrain possible) does not
        return q >= target

    if reaches(b["Q_shipped"]):
        verdict = "met"
    elif not reaches(b["Q_best_any"]):
        verdict = "the score (no per-class margin threshold of any epoch)"
    elif not reaches(b["Q_best_t_c"]):
        verdict = f"the time (the best thresholds of epoch {b['best_any_epoch']} reach it)"
    else:
        verdict = "the threshold placement at t_c"
    if not reaches(b["Q_oracle_bound"]):
        verdict += "; Qorc < 0.5 too"
    crossing = any(reaches(q) != reaches(b["Q_shipped"]) for q in b["Q_seeds"][1:])
    return verdict + ("; retrain noise (another retrain seed crosses it)" if crossing else "")


Q_BOUND_HEADER = (
    f"{'cell':<28s} {'t_c':>3s} {'a_n':>5s} {'a_p':>5s} | {'Q':>5s} {'F1':>5s} | {'Q*t_c':>5s} {'F1':>5s} | "
    f"{'Q*any':>5s} {'F1':>5s} {'ep':>3s} | {'Qorc':>5s} | Q over retrain seeds | bound"
)


def q_bound_row(b: dict) -> str:
    name = f"{b['dataset']}:{b['noise']}:{b['rho']:g}:{b['seed']}"
    return (
        f"{name:<28s} {str(b['t_c_epoch']):>3s} {_f(b['a_n'])} {_f(b['a_p'])} | {_f(b['Q_shipped'], '{:5.2f}', 1)} "
        f"{_f(b['F1_shipped'], '{:5.3f}', 1)} | {_f(b['Q_best_t_c'], '{:5.2f}', 1)} {_f(b['F1_best_t_c'], '{:5.3f}', 1)} | "
        f"{_f(b['Q_best_any'], '{:5.2f}', 1)} {_f(b['F1_best_any'], '{:5.3f}', 1)} {b['best_any_epoch']:>3d} | "
        f"{_f(b['Q_oracle_bound'], '{:5.2f}', 1)} | {' '.join(f'{q:.2f}' for q in b['Q_seeds']):<20s} | {q_verdict(b)}"
    )


def q_target_cells(rows: list[dict]) -> list[dict]:
    """The cells issue 15's Q target is judged on: ρ ≤ 0.6 where a_p − a_n ≥ 5 points, and ρ = 0.8 on the
    MNIST-1D CNN."""
    cells = [r for r in rows if 0 < r["rho"] <= 0.6 and r["a_p"] - r["a_n"] >= 0.05]
    return cells + [r for r in rows if r["rho"] == 0.8 and r["dataset"] == "mnist1d_cnn"]


def q_bound_report(rows: list[dict]) -> None:
    """Print :func:`q_bound_cell`'s lines and, per half, the Q target and the bound of each miss."""
    for half in ("tuning", "heldout"):
        part = sorted(
            (b for b in rows if b["half"] == half), key=lambda b: (b["dataset"], b["noise"], b["rho"], b["seed"])
        )
        if not part:
            continue
        print(f"\n=== what bounds Q, {half} half: {len(part)} cells ===")
        print(Q_BOUND_HEADER)
        for b in part:
            print(q_bound_row(b))
        cells = [dict(b, Q=b["Q_shipped"]) for b in q_target_cells(part)]
        misses = [b for b in cells if not b["Q"] >= 0.5]
        print(f"Q >= 0.5: {len(cells) - len(misses)}/{len(cells)} target cells; the misses are bounded by")
        counts: dict[str, int] = {}
        for b in misses:
            verdict = q_verdict(b)
            key = verdict.split(" (")[0].split(";")[0] + (", Qorc < 0.5 too" if "Qorc" in verdict else "")
            counts[key] = counts.get(key, 0) + 1
        for key, count in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"   {key}: {count}")
        noisy = sum("retrain noise" in q_verdict(b) for b in misses)
        print(f"   of these, another retrain seed crosses 0.5 in {noisy}")
        deltas = sorted(abs(b["Q_seeds"][0] - q) for b in part for q in b["Q_seeds"][1:] if math.isfinite(q))
        if deltas:
            print(
                f"   |Q(seed) - Q(other retrain seed)| over all {len(part)} cells: median {deltas[len(deltas) // 2]:.3f}, "
                f"mean {sum(deltas) / len(deltas):.3f}, max {deltas[-1]:.3f}"
            )
        best = sum(b["Q_best_any"] >= 0.5 for b in cells)
        print(
            f"   the best flags of any epoch reach 0.5 in {best}/{len(cells)}, the best stop (Qorc) in "
            f"{sum(b['Q_oracle_bound'] >= 0.5 for b in cells)}/{len(cells)}"
        )


def meets_stop_target(acc: float, oracle: float, early_stopping_acc: float) -> bool:
    """Issue 15's stop target: within 1.5 points of the oracle and at least EarlyStopping's accuracy."""
    return oracle - acc <= 0.015 and acc >= early_stopping_acc


def stop_bound(curve: list[float], oracle: float, early_stopping_acc: float, window: int = 5) -> tuple[int, float]:
    """What bounds the stop target in one cell: the number of epochs that meet it
    (:func:`meets_stop_target`) and the best ``window``-epoch mean accuracy."""
    met = sum(meets_stop_target(a, oracle, early_stopping_acc) for a in curve)
    w = min(window, len(curve))
    best = max(sum(curve[i : i + w]) / w for i in range(len(curve) - w + 1))
    return met, best


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else math.nan


def report(rows: list[dict]) -> None:
    """Print the table and issue 15's targets, for each half separately (from ``--out`` JSON lines)."""
    for half in ("tuning", "heldout"):
        part = [r for r in rows if r["half"] == half]
        if not part:
            continue
        part.sort(key=lambda r: (r["dataset"], r["noise"], r["rho"], r["seed"]))
        print(f"\n=== {half} half: {len(part)} cells ===")
        print(HEADER)
        for r in part:
            print(row(r))
        # Q >= 0.5 at rho <= 0.6 where a_p - a_n >= 5 points (and at 0.8 on the MNIST-1D CNN)
        q_cells = q_target_cells(part)
        met = [r for r in q_cells if r["Q"] >= 0.5]
        print(
            f"Q >= 0.5 (rho <= 0.6 with a_p - a_n >= 5 points; rho 0.8 on mnist1d_cnn): {len(met)}/{len(q_cells)} cells"
        )
        for r in q_cells:
            if r["Q"] < 0.5:
                print(
                    f"   miss {r['dataset']}:{r['noise']}:{r['rho']:g}:{r['seed']}  Q {r['Q']:.2f}  bound: best stop "
                    f"anywhere Qorc {r['Q_oracle_bound']:.2f}, loss AUROC peak "
                    f"{(r['loss_auroc_peak'] or [None, math.nan])[1]:.2f}, t_c {r['t_c_epoch']}"
                )
        # detection F1 at rho 0.2, 0.4, mean over seeds, against cleanlab's
        groups: dict[tuple, list[dict]] = {}
        for r in part:
            if r["rho"] in (0.2, 0.4) and r["cleanlab"] is not None:
                groups.setdefault((r["dataset"], r["noise"], r["rho"]), []).append(r)
        wins = 0
        print("detection F1 at rho 0.2 / 0.4 (mean over seeds; 0 where no t_c): GMMCleanser vs cleanlab")
        for key, rs in sorted(groups.items()):
            ours = _mean([(r["gmm"] or {}).get("f1", 0.0) for r in rs])
            theirs = _mean([r["cleanlab"]["f1"] for r in rs])
            wins += ours >= theirs
            print(
                f"   {key[0]:<12s} {key[1]:<9s} {key[2]:.1f}  {ours:.3f} vs {theirs:.3f}  {'ok' if ours >= theirs else 'behind'}"
            )
        print(f"   at least cleanlab's: {wins}/{len(groups)}")
        # the recommended stop: within 1.5 points of the oracle and ahead of EarlyStopping
        stops = [r for r in part if r["rho"] > 0]
        close = [r for r in stops if r["oracle"] - r["recommended_acc"] <= 0.015]
        ahead = [r for r in stops if r["recommended_acc"] >= r["early_stopping_acc"]]
        both = [r for r in stops if meets_stop_target(r["recommended_acc"], r["oracle"], r["early_stopping_acc"])]
        print(
            f"stop within 1.5 of the oracle {len(close)}/{len(stops)}, at least EarlyStopping {len(ahead)}/{len(stops)}, "
            f"both {len(both)}/{len(stops)}; mean oracle - kept "
            f"{100 * _mean([r['oracle'] - r['recommended_acc'] for r in stops]):.2f}, mean ES - kept "
            f"{100 * _mean([r['early_stopping_acc'] - r['recommended_acc'] for r in stops]):.2f} points"
        )
        # the reference itself: how often a stop on the noisy validation loss is within 1.5 points
        es_close = [r for r in stops if r["oracle"] - r["early_stopping_acc"] <= 0.015]
        print(
            f"   EarlyStopping itself within 1.5 of the oracle {len(es_close)}/{len(stops)}; mean oracle - ES "
            f"{100 * _mean([r['oracle'] - r['early_stopping_acc'] for r in stops]):.2f} points"
        )
        # what bounds it: how many epochs of the run would meet the target at all, and the best
        # 5-epoch mean of the test accuracy (a stop that cannot see the test set lands on a window)
        fractions = []
        for r in stops:
            if meets_stop_target(r["recommended_acc"], r["oracle"], r["early_stopping_acc"]):
                continue
            met, window = stop_bound(r["test_acc_curve"], r["oracle"], r["early_stopping_acc"])
            fractions.append(met / len(r["test_acc_curve"]))
            print(
                f"   miss {r['dataset']}:{r['noise']}:{r['rho']:g}:{r['seed']}  kept {100 * r['recommended_acc']:.1f} "
                f"oracle {100 * r['oracle']:.1f} ES {100 * r['early_stopping_acc']:.1f}  bound: {met}/"
                f"{len(r['test_acc_curve'])} epochs meet it, best 5-epoch mean {100 * window:.1f}"
            )
        if fractions:
            fractions.sort()
            print(
                f"   misses: median fraction of epochs that meet the target {fractions[len(fractions) // 2]:.3f}; "
                f"under 10 % in {sum(f < 0.1 for f in fractions)}/{len(fractions)}"
            )
        clean = [r for r in part if r["rho"] == 0]
        ok = [r for r in clean if r["flagged_fraction"] < 0.01 and r["phase_model"] == "two"]
        print(
            f"rho = 0: under 1 % flagged and the two-phase model {len(ok)}/{len(clean)} "
            f"(max flagged {max((r['flagged_fraction'] for r in clean), default=0):.3f})"
        )


def _matches(pattern: str, cell: tuple[str, str, float, int]) -> bool:
    fields = pattern.split(":")
    values = [cell[0], cell[1], f"{cell[2]:g}", str(cell[3])]
    return all(
        f in ("", "*") or (f"{float(f):g}" == v if i == 2 else f == v) for i, (f, v) in enumerate(zip(fields, values))
    )


def _over_lines(path: str, args, work, header: str, fmt, noisy_only: bool = False) -> None:
    """Run ``work(line, args)`` on each ``--out`` line of ``path`` that ``--only`` selects (the noisy cells
    only with ``noisy_only``), append each result to ``--out`` and print it with ``fmt``."""
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = [r for r in rows if r["rho"] > 0 or not noisy_only]
    if args.only:
        rows = [r for r in rows if any(_matches(p, (r["dataset"], r["noise"], r["rho"], r["seed"])) for p in args.only)]
    print(header, flush=True)
    for r in rows:
        out = work(r, args)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(out) + "\n")
        print(fmt(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("tuning", "heldout", "all"), default="all")
    parser.add_argument("--only", nargs="+", default=None, help="dataset[:noise[:rho[:seed]]] patterns")
    parser.add_argument("--noise", nargs="+", default=list(NOISE_TYPES), choices=NOISE_TYPES)
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default per dataset)")
    parser.add_argument("--cv-epochs", type=int, default=30, help="epochs of each cleanlab cross-validation model")
    parser.add_argument("--no-cleanlab", action="store_true")
    parser.add_argument("--probe-size", type=int, default=512)
    parser.add_argument("--mnist1d-samples", type=int, default=10000)
    parser.add_argument("--out", default="generalization.jsonl", help="JSON lines, one per cell (appended)")
    parser.add_argument("--log-dir", default=None, help="CSVLogger directory of the noisy runs")
    parser.add_argument(
        "--record",
        default=None,
        help="directory: save each noisy run's series (losses, statistics, weights) for replays",
    )
    parser.add_argument("--noisy-only", action="store_true", help="only the noisy run (no retrains, no cleanlab)")
    parser.add_argument(
        "--every-epoch", action="store_true", help="GMMCleanser every epoch instead of its default budget"
    )
    parser.add_argument(
        "--monitor-budget", action="store_true", help="monitors at their default overhead budget (not every epoch)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1 on shared cores)")
    parser.add_argument(
        "--rescore",
        default=None,
        help="--out file of cells run with --record: replay GMMCleanser's current defaults, retrain a_c where needed",
    )
    parser.add_argument(
        "--report", nargs="+", default=None, help="only print the tables and targets of these --out files"
    )
    parser.add_argument(
        "--q-bounds",
        default=None,
        help="--out file of cells run with --noisy-only --record: what bounds Q (retrains with oracle flags)",
    )
    parser.add_argument(
        "--retrain-seeds", type=int, nargs="*", default=[1000], help="with --q-bounds: more retrain seeds"
    )
    args = parser.parse_args()
    if args.report:
        rows = []
        for path in args.report:
            with open(path) as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
        report([r for r in rows if "verdict" not in r])
        q_bound_report([r for r in rows if "verdict" in r])
        return
    torch.set_num_threads(args.threads)
    if args.q_bounds:
        _over_lines(args.q_bounds, args, q_bound_cell, Q_BOUND_HEADER, q_bound_row, noisy_only=True)
        return
    if args.rescore:
        _over_lines(args.rescore, args, rescore_cell, HEADER, row)
        return
    cells = [
        (d, noise, rate, seed)
        for d, seed in split_cells(args.split)
        for noise in args.noise
        for rate in args.rates
        if not (rate == 0 and noise != args.noise[0])  # ρ = 0 is the same cell for every noise type
    ]
    if args.only:
        cells = [c for c in cells if any(_matches(p, c) for p in args.only)]
    print(
        f"machine: {machine()}; split {args.split}; {len(cells)} cells; cleanlab {'off' if args.no_cleanlab else 'on'}"
    )
    print(HEADER, flush=True)
    for cell in cells:
        r = run_cell(*cell, args)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        print(row(r), flush=True)


if __name__ == "__main__":
    main()
