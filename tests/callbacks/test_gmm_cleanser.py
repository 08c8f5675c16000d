"""GMMCleanser: t_c detection with patience, actions end to end, outputs, resume, DDP, errors."""

from __future__ import annotations

import csv
import json
import math
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_phases import GMMCleanser
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional import (
    CleansingTracker,
    class_dependence,
    class_wise_flags,
    detection_metrics,
    fit_loss_mixture,
    symmetric_noise_class_dependence,
)
from tests.callbacks.helpers import (
    DestroyProcessGroupAtExit,
    NoisyTensorDataset,
    PlainDataset,
    RecordingLogger,
    TinyClassifier,
    loader,
    series,
    trainer,
)


def _no_margins(losses: torch.Tensor) -> torch.Tensor:
    """The loss pass's logit margins where there are none (scripted losses): NaN, so flags come from the losses."""
    return torch.full_like(losses, math.nan)


DELTAS = [0.5, 1.0, 1.5, 2.0, 1.9, 1.95, 1.8, 1.7, 1.6, 1.5, 1.4, 1.3]  # peak at epoch 3


class ScriptedCleanser(GMMCleanser):
    """Losses constructed per epoch: clean ~ N(0.2, 0.1²), mislabeled ~ N(0.2 + ΔL_epoch, 0.1²).

    Peak search on the raw ΔL unless a test asks for smoothing.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("smoothing", 1.0)
        kwargs.setdefault("every_n_epochs", 1)  # the scripted series is fitted after every epoch
        super().__init__(*args, **kwargs)

    def _all_losses(self, trainer, pl_module, positions=None):
        ds = self._train_dataset(trainer)
        n = len(ds)
        gen = torch.Generator().manual_seed(trainer.current_epoch)
        noisy = torch.as_tensor(ds.is_noisy) if hasattr(ds, "is_noisy") else torch.arange(n) % 3 == 0
        losses = 0.2 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
        losses[noisy] += DELTAS[trainer.current_epoch]
        given = torch.zeros(n, dtype=torch.long)
        return losses, given, given.clone(), _no_margins(losses)


def _fit(tmp_path, cleanser, *, dataset=None, epochs=12, extra=(), **kwargs):
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier()
    train_loader = kwargs.pop("train_loader", None) or loader(dataset or NoisyTensorDataset(n=300))
    tr = trainer(tmp_path, [cleanser, *extra], max_epochs=epochs, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(model, train_loader)
    return tr, model


@pytest.mark.parametrize("patience,confirm_epoch", [(1, 4), (3, 6), (5, 8)])
def test_t_c_is_the_delta_L_peak_confirmed_after_patience(tmp_path, patience, confirm_epoch):
    cleanser = ScriptedCleanser(patience=patience)
    tr, _ = _fit(tmp_path, cleanser)
    assert cleanser.t_c_epoch == 3 and cleanser.t_c_step == 4 * 38
    logged = series(tr.loggers[0].records, "gmm/delta_L")
    assert len(logged) == confirm_epoch + 1  # stops measuring once t_c is confirmed
    assert series(tr.loggers[0].records, "gmm/t_c_step") == [((confirm_epoch + 1) * 38, 4.0 * 38)]
    # the flags are those of the fit at the peak: the mislabeled samples
    truth = NoisyTensorDataset(n=300).is_noisy
    met = detection_metrics(torch.zeros(300, dtype=torch.bool).index_fill_(0, cleanser.flagged_indices, True), truth)
    assert met.precision > 0.97 and met.recall > 0.97


@pytest.mark.parametrize("every,fitted", [(2, [1, 3, 5, 7]), (3, [2, 5, 8, 11])])
def test_fixed_every_n_epochs_fits_after_every_kth_epoch(tmp_path, every, fitted):
    cleanser = ScriptedCleanser(patience=10, every_n_epochs=every)  # no t_c: every scheduled epoch is fitted
    tr, _ = _fit(tmp_path, cleanser, epochs=9)
    assert [step for step, _ in series(tr.loggers[0].records, "gmm/delta_L")] == [38 * (e + 1) for e in fitted if e < 9]
    assert [e for _, e, _ in cleanser.delta_L_history] == [e for e in fitted if e < 9]


class _FakeClock:
    """``time.perf_counter`` of the budget: 1 s per training batch, ``cost`` s per loss pass, nothing else."""

    def __init__(self, cost: float) -> None:
        self.now, self.cost = 0.0, cost

    def perf_counter(self) -> float:
        return self.now


class _Tick(pl.Callback):
    def __init__(self, clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.now += 1.0


class ClockedCleanser(ScriptedCleanser):
    """The scripted losses; each loss pass costs ``clock.cost`` seconds of the fake clock."""

    def __init__(self, clock, **kwargs) -> None:
        kwargs.setdefault("every_n_epochs", None)  # the budget
        super().__init__(**kwargs)
        self.clock = clock

    def _all_losses(self, trainer, pl_module, positions=None):
        self.clock.now += self.clock.cost
        return super()._all_losses(trainer, pl_module, positions)


def _budget_reference(overhead, cost, steps_per_epoch, epochs, start=0):
    """The budget rule written out: fit at the first epoch end, then whenever spent + cost <= overhead * T.

    Returns the fitted epochs and, for each, the realised overhead before it (spent / T, the logged value).
    """
    fitted, before, spent = [], [], 0.0
    for epoch in range(start, epochs):
        train = steps_per_epoch * (epoch + 1)
        if not fitted or spent + cost <= overhead * train:
            fitted.append(epoch)
            before.append(spent / train)
            spent += cost
    return fitted, before


@pytest.fixture
def clock(monkeypatch):
    from lightning_phases.callbacks import _budget

    fake = _FakeClock(cost=10.0)
    monkeypatch.setattr(_budget, "time", fake)
    return fake


def test_the_budget_spaces_the_fits(tmp_path, clock):
    cleanser = ClockedCleanser(clock, patience=2, overhead=0.1)
    tr, _ = _fit(tmp_path, cleanser, extra=[_Tick(clock)])
    fitted, before = _budget_reference(0.1, 10.0, 38, 12)
    assert fitted == [0, 5, 7, 10]  # 38 s per epoch, 10 s per pass: the budget allows these four
    assert [step for step, _ in series(tr.loggers[0].records, "gmm/delta_L")] == [38 * (e + 1) for e in fitted]
    # ΔL 0.5, 1.95, 1.7, 1.4 at the fitted epochs: the peak is epoch 5, confirmed by the fits at 7 and 10
    assert cleanser.t_c_epoch == 5 and cleanser.t_c_step == 6 * 38
    logged = [v for _, v in series(tr.loggers[0].records, "gmm/overhead")]
    assert logged == pytest.approx(before)
    assert cleanser.budget.overhead == pytest.approx(40.0 / (12 * 38))  # four passes over twelve epochs


def test_a_tiny_overhead_fits_only_the_first_epoch(tmp_path, clock, caplog):
    cleanser = ClockedCleanser(clock, patience=2, overhead=1e-6)
    with caplog.at_level("INFO", logger="lightning_phases"):
        tr, _ = _fit(tmp_path, cleanser, extra=[_Tick(clock)])
    assert [step for step, _ in series(tr.loggers[0].records, "gmm/delta_L")] == [38]
    assert [e for _, e, _ in cleanser.delta_L_history] == [0] and cleanser.t_c_epoch is None
    assert series(tr.loggers[0].records, "gmm/overhead") == [(38, 0.0)]  # nothing spent before the first pass
    assert "GMMCleanser: 1 measurement(s), 10.00 s measuring over 456.00 s of training" in caplog.text


def test_the_default_is_the_budget_and_every_n_epochs_a_fixed_schedule():
    default = GMMCleanser()
    assert default.budget.budgeted and default.budget.schedule.overhead == 0.2 and default.every_n_epochs is None
    fixed = GMMCleanser(every_n_epochs=2, overhead=None)
    assert not fixed.budget.budgeted and fixed.budget.every_n_epochs == 2
    with pytest.raises(LightningPhasesError, match="overhead=None and every_n_epochs=None"):
        GMMCleanser(overhead=None)


def test_resume_restores_the_budget(tmp_path, clock):
    whole = ClockedCleanser(clock, patience=5, overhead=0.1)  # no t_c in 12 epochs: only the schedule matters
    _fit(tmp_path / "w", whole, extra=[_Tick(clock)])
    fitted = [e for _, e, _ in whole.delta_L_history]
    assert fitted == _budget_reference(0.1, 10.0, 38, 12)[0]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_epochs=1)
    first = ClockedCleanser(clock, patience=5, overhead=0.1)
    clock.now = 0.0
    _fit(tmp_path / "a", first, epochs=6, extra=[_Tick(clock), ckpt], enable_checkpointing=True)
    assert [e for _, e, _ in first.delta_L_history] == [0, 5]
    second = ClockedCleanser(clock, patience=5, overhead=0.1)
    clock.now = 1000.0  # another process: its clock reads something else
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path / "b", [second, _Tick(clock)], max_epochs=12, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset(n=300)), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    # the restored budget (spent, last cost, training time) schedules the rest as in the uninterrupted run
    assert [e for _, e, _ in second.delta_L_history] == fitted
    assert second.budget.spent == pytest.approx(whole.budget.spent)
    assert second.budget.train_time() == pytest.approx(12 * 38)  # the restored training time + 6 epochs


def test_a_checkpoint_without_budget_state_loads(tmp_path):
    cleanser = GMMCleanser()
    state = cleanser.state_dict()
    del state["budget"]
    cleanser.load_state_dict(state)
    assert cleanser.budget.schedule.num_measurements == 0 and cleanser.budget.spent == 0.0


def _ema_peak_reference(deltas, smoothing, patience):
    """The smoothed-peak rule written out: EMA over the fits, argmax, confirmed after `patience` lower values."""
    ema, best, best_epoch, since = None, -float("inf"), None, 0
    for epoch, delta in enumerate(deltas):
        ema = delta if ema is None else smoothing * delta + (1 - smoothing) * ema
        if ema > best:
            best, best_epoch, since = ema, epoch, 0
        else:
            since += 1
        if since >= patience:
            return best_epoch, epoch
    return None, None


@pytest.mark.parametrize("smoothing", [0.5, 0.3])
def test_t_c_is_the_peak_of_the_smoothed_delta_L(tmp_path, smoothing):
    cleanser = ScriptedCleanser(patience=2, smoothing=smoothing)
    tr, _ = _fit(tmp_path, cleanser)
    fitted = [v for _, v in series(tr.loggers[0].records, "gmm/delta_L")]  # the raw ΔL of each fit
    peak, confirm = _ema_peak_reference(fitted, smoothing, 2)
    assert peak is not None and peak > 3  # later than the raw peak (epoch 3): the EMA lags it
    assert cleanser.t_c_epoch == peak and len(fitted) == confirm + 1
    smoothed = [v for _, v in series(tr.loggers[0].records, "gmm/delta_L_smoothed")]
    assert smoothed[0] == pytest.approx(fitted[0])
    assert smoothed[1] == pytest.approx(smoothing * fitted[1] + (1 - smoothing) * fitted[0])


def test_warmup_ignores_early_epochs(tmp_path):
    cleanser = ScriptedCleanser(patience=2, warmup_epochs=5)
    _fit(tmp_path, cleanser)
    assert cleanser.t_c_epoch == 5  # the first measured epoch (ΔL = 1.95) is the peak after warm-up


def test_flag_action_writes_csv_metrics_and_figure(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    cleanser = ScriptedCleanser(patience=2)
    tr, _ = _fit(tmp_path, cleanser, logger=TensorBoardLogger(tmp_path, name="tb"))
    path = os.path.join(tr.log_dir, "gmm_flagged.csv")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["index"]) for r in rows] == cleanser.flagged_indices.tolist()
    assert set(rows[0]) == {"index", "loss", "posterior", "given_label", "predicted_label", "margin"}
    assert all(float(r["posterior"]) > 0.5 for r in rows)
    assert cleanser.last["gmm/precision"] > 0.97 and cleanser.last["gmm/num_flagged"] == len(rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tr.log_dir)
    acc.Reload()
    assert "gmm/loss_histogram" in acc.Tags()["images"]


def test_stop_action_stops_at_confirmation(tmp_path):
    cleanser = ScriptedCleanser(action="stop", patience=2)
    tr, _ = _fit(tmp_path, cleanser)
    assert tr.current_epoch == 6  # confirmed at the end of epoch 5


def test_max_fraction_caps_the_flags(tmp_path):
    cleanser = ScriptedCleanser(patience=1, max_fraction=0.1)
    _fit(tmp_path, cleanser)
    assert cleanser.flagged_indices.numel() == 30
    posterior = cleanser._candidate["posterior"]  # the fit at t_c flagged 90 samples: the 30 most likely are kept
    assert int(cleanser._candidate_fit.flags.sum()) == 90  # the 90 mislabeled of NoisyTensorDataset(n=300)
    losses = cleanser._candidate["losses"]  # posteriors saturate at 1 here: ties go to the higher loss
    top = sorted(range(300), key=lambda i: (-float(posterior[i]), -float(losses[i])))[:30]
    assert sorted(cleanser.flagged_indices.tolist()) == sorted(top)


class MajorityCleanser(ScriptedCleanser):
    """70 % of the samples mislabeled (every class alike), given labels of ``num_classes`` classes."""

    def __init__(self, *args, num_classes: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes

    def _all_losses(self, trainer, pl_module, positions=None):
        n = len(self._train_dataset(trainer))
        gen = torch.Generator().manual_seed(trainer.current_epoch)
        losses = 0.2 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
        noisy = torch.randperm(n, generator=torch.Generator().manual_seed(123))[: 7 * n // 10]  # not by class
        losses[noisy] += DELTAS[trainer.current_epoch]
        given = torch.arange(n) % self.num_classes
        return losses, given, given.clone(), _no_margins(losses)


@pytest.mark.parametrize("num_classes,cap", [(10, 0.9), (4, 0.75), (3, 2 / 3)])
def test_the_default_cap_is_the_symmetric_noise_limit_of_the_classes(tmp_path, num_classes, cap):
    cleanser = MajorityCleanser(patience=1, num_classes=num_classes)
    _fit(tmp_path, cleanser)
    assert cleanser.t_c_epoch == 3 and int(cleanser._candidate_fit.flags.sum()) == 210  # 70 % of 300
    assert cleanser.flagged_indices.numel() == min(210, math.floor(cap * 300))


class RemovableDataModule(pl.LightningDataModule):
    def __init__(self, dataset) -> None:
        super().__init__()
        self.full = dataset
        self.removed = torch.zeros(0, dtype=torch.long)
        self.loader_sizes: list[int] = []

    def remove_train_samples(self, indices) -> None:
        self.removed = torch.as_tensor(indices)

    def train_dataloader(self):
        keep = [i for i in range(len(self.full)) if i not in set(self.removed.tolist())]
        self.loader_sizes.append(len(keep))
        return DataLoader(Subset(self.full, keep), batch_size=8, shuffle=True)


def test_remove_action_continues_on_the_cleansed_set(tmp_path):
    ds = NoisyTensorDataset(n=300)
    before = ds.noisy_targets.clone()
    dm = RemovableDataModule(ds)
    cleanser = ScriptedCleanser(action="remove", patience=2)
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [cleanser], max_epochs=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(), datamodule=dm)
    assert cleanser.removed and torch.equal(dm.removed, cleanser.flagged_indices)
    n_flag = cleanser.flagged_indices.numel()
    assert dm.loader_sizes[0] == 300 and dm.loader_sizes[-1] == 300 - n_flag
    assert torch.equal(ds.noisy_targets, before) and len(ds) == 300  # the user's data is untouched


def test_remove_requires_a_capable_datamodule(tmp_path):
    with pytest.raises(LightningPhasesError, match="remove_train_samples"):
        _fit(tmp_path, GMMCleanser(action="remove"))


def test_resume_keeps_history_and_flags(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_epochs=1)
    first = ScriptedCleanser(patience=3)
    _fit(tmp_path / "a", first, epochs=5, extra=[ckpt], enable_checkpointing=True)
    assert first.t_c_epoch is None and first.best_epoch == 3
    assert first.flagged_indices.numel() == 0  # nothing is flagged before t_c is confirmed
    second = ScriptedCleanser(patience=3)
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path / "b", [second], max_epochs=12, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset(n=300)), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert second.t_c_epoch == 3 and len(second.delta_L_history) == 7
    assert torch.equal(second.flagged_indices, first._candidate_flags) and torch.equal(
        second.flagged_indices, torch.nonzero(torch.as_tensor(NoisyTensorDataset(n=300).is_noisy)).flatten()
    )
    # the peak was found before the restart: the CSV written at t_c is the one of an uninterrupted run
    whole = ScriptedCleanser(patience=3)
    _fit(tmp_path / "c", whole)
    assert second.csv_path is not None and whole.csv_path is not None
    with open(second.csv_path) as fh, open(whole.csv_path) as gh:
        assert list(csv.reader(fh)) == list(csv.reader(gh))
    restored, reference = second._candidate_fit, whole._candidate_fit  # the fit the histogram at t_c is drawn from
    assert restored.threshold == reference.threshold and torch.equal(restored.flags, reference.flags)
    assert torch.equal(restored.posterior, reference.posterior)


def test_resume_continues_the_smoothed_delta_L(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_epochs=1)
    whole = ScriptedCleanser(patience=2, smoothing=0.5)
    _fit(tmp_path / "w", whole)
    first = ScriptedCleanser(patience=2, smoothing=0.5)
    _fit(tmp_path / "a", first, epochs=4, extra=[ckpt], enable_checkpointing=True)
    second = ScriptedCleanser(patience=2, smoothing=0.5)
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path / "b", [second], max_epochs=12, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset(n=300)), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert second.t_c_epoch == whole.t_c_epoch and second.best_delta_L == pytest.approx(whole.best_delta_L)


class SporadicCleanser(ScriptedCleanser):
    """Bimodal losses only at epochs 2, 4, 6, ... 10 (a clean run where a fit is bimodal now and then)."""

    def _all_losses(self, trainer, pl_module, positions=None):
        losses, given, pred, margins = super()._all_losses(trainer, pl_module, positions)
        if trainer.current_epoch % 2:
            n = losses.numel()  # an exactly normal-shaped (unimodal) sample of losses
            losses = 0.2 + 0.1 * torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
        return losses, given, pred, margins


def test_sporadic_bimodal_fits_confirm_nothing_and_flag_nothing(tmp_path, caplog):
    cleanser = SporadicCleanser(patience=2)
    with caplog.at_level("INFO", logger="lightning_phases"):
        _fit(tmp_path, cleanser)
    assert caplog.text.count("not bimodal (separation") == 1  # six unimodal fits, one message
    assert len(cleanser.delta_L_history) == 6  # the bimodal fits were seen (epochs 0, 2, ..., 10) ...
    assert cleanser.t_c_step is None and cleanser.flagged_indices.numel() == 0  # ... but never two in a row
    steady = ScriptedCleanser(patience=2)  # the same peak with consecutive bimodal fits is confirmed
    _fit(tmp_path / "steady", steady)
    truth = torch.nonzero(torch.as_tensor(NoisyTensorDataset(n=300).is_noisy)).flatten()
    assert steady.t_c_epoch == 3 and torch.equal(steady.flagged_indices, truth)


class ClassSplitCleanser(ScriptedCleanser):
    """The same losses, with given labels that make the split follow the class (or not)."""

    def __init__(self, *args, labels: str = "noisy", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.labels = labels

    def _all_losses(self, trainer, pl_module, positions=None):
        losses, given, pred, margins = super()._all_losses(trainer, pl_module, positions)
        n = losses.numel()
        noisy = torch.as_tensor(NoisyTensorDataset(n=n).is_noisy)
        i = torch.arange(n)
        if self.labels == "noisy":  # classes 3, 4 = exactly the high-loss samples: a collapsed or half-trained network
            given = torch.where(noisy, 3 + i % 2, i % 3)
        elif self.labels == "imbalanced":  # binary 80/20, labels flipped on the mislabeled samples: exact flags
            given = (i % 5 == 0).long() ^ noisy.long()  # depend on the class through the class sizes only
        else:  # five classes, each with its share of high-loss samples
            given = i % 5
        return (
            losses,
            given,
            (7 * i) % 5,
            margins,
        )  # predictions unrelated to the given labels: the check uses the latter


def test_a_split_that_follows_the_given_class_is_not_bimodal(tmp_path, caplog):
    cleanser = ClassSplitCleanser(patience=3)
    with caplog.at_level("INFO", logger="lightning_phases"):
        tr, _ = _fit(tmp_path, cleanser)
    assert cleanser.t_c_step is None and cleanser.flagged_indices.numel() == 0 and not cleanser.delta_L_history
    dependence = [v for _, v in series(tr.loggers[0].records, "gmm/class_dependence")]
    assert len(dependence) == 12 and min(dependence) > 0.8
    assert max(v for _, v in series(tr.loggers[0].records, "gmm/num_flagged")) == 0
    assert caplog.text.count("follows the given class") == 1  # said once, not at each of the 12 fits
    unchecked = ClassSplitCleanser(patience=3, max_class_dependence=1.0)  # the check off: the plain peak rule
    _fit(tmp_path / "off", unchecked)
    assert unchecked.t_c_epoch == 3


def test_unequal_class_sizes_alone_do_not_stop_the_cleanser(tmp_path):
    cleanser = ClassSplitCleanser(patience=3, labels="imbalanced")
    tr, _ = _fit(tmp_path, cleanser)
    assert cleanser.t_c_epoch == 3
    truth = torch.as_tensor(NoisyTensorDataset(n=300).is_noisy)
    flags = cleanser._candidate["flags"]
    assert torch.equal(flags, truth)  # the exact noise mask ...
    given = cleanser._candidate["given"].long()
    raw = class_dependence(flags, given)
    assert raw > 0.2  # ... depends on the class more than max_class_dependence, through the class sizes
    expected = raw - symmetric_noise_class_dependence(given, cleanser._candidate_fit.weight_noisy)
    assert dict(series(tr.loggers[0].records, "gmm/class_dependence"))[4 * 38] == pytest.approx(expected, abs=1e-12)


def test_class_dependence_is_logged_and_spread_flags_pass(tmp_path):
    cleanser = ClassSplitCleanser(patience=3, labels="spread")
    tr, _ = _fit(tmp_path, cleanser)
    assert cleanser.t_c_epoch == 3
    flags = cleanser._candidate["flags"]
    labels = torch.arange(300) % 5
    mean = flags.double().mean()  # η² written out: between-class over total sum of squares
    between = sum(int((labels == k).sum()) * (flags[labels == k].double().mean() - mean) ** 2 for k in range(5))
    expected = float(between / ((flags.double() - mean) ** 2).sum())
    logged = dict(series(tr.loggers[0].records, "gmm/class_dependence"))
    assert logged[4 * 38] == pytest.approx(expected, abs=1e-12) and expected < 0.2


HEAVY_SCALE = 0.1  # mislabeled losses 0.1·ΔL_epoch above the clean ones, n = 3000: fitted D 1.4-1.8, weight ≈ 0.5
HEAVY_N = 3000


class HeavyNoiseCleanser(ScriptedCleanser):
    """Two thirds mislabeled with the populations close: a distinct but not two-humped mixture."""

    def _all_losses(self, trainer, pl_module, positions=None):
        losses = _heavy_losses(trainer.current_epoch, len(self._train_dataset(trainer)))
        given = torch.zeros(losses.numel(), dtype=torch.long)
        return losses, given, given.clone(), _no_margins(losses)


@pytest.mark.parametrize(
    "kwargs,t_c",
    [
        (dict(heavy_noise_separation=None), None),  # off: no fit reaches D = 2
        # default 1.2 from weight 0.2 where two components beat one Gaussian (epochs 3-7: D 1.73-1.79,
        # BIC gain 9-32; the others are one Gaussian by BIC): peak at 3, confirmed at 6
        (dict(), 3),
        (dict(heavy_noise_weight=0.7), None),  # fitted weights are below 0.7
        (dict(heavy_noise_separation=1.75), None),  # epoch 5 (D 1.73) fails and restarts the count
        (dict(heavy_noise_separation=2.5, min_separation=2.0), None),  # above min_separation: min_separation
    ],
)
def test_heavy_noise_separation(tmp_path, kwargs, t_c):
    cleanser = HeavyNoiseCleanser(patience=3, **kwargs)
    # the losses are scripted per epoch: batches of 100 keep the 12 epochs short
    tr, _ = _fit(tmp_path, cleanser, train_loader=loader(NoisyTensorDataset(n=HEAVY_N), batch_size=100))
    assert cleanser.t_c_epoch == t_c
    fits = [fit_loss_mixture(_heavy_losses(e)) for e in range(12)]
    sep, weight = kwargs.get("heavy_noise_separation", 1.2), kwargs.get("heavy_noise_weight", 0.2)
    sep = None if sep is None else min(sep, kwargs.get("min_separation", 2.0))
    accepted = [
        f.separation >= 2 or (sep is not None and f.separation >= sep and f.weight_noisy >= weight and f.bic_gain > 0)
        for f in fits
    ]
    if not kwargs:
        assert accepted == [False] * 3 + [True] * 5 + [False] * 4  # the default accepts epochs 3-7
    logged = series(tr.loggers[0].records, "gmm/num_flagged")
    assert [v > 0 for _, v in logged] == accepted[: len(logged)]  # flags exactly on the accepted fits


def _heavy_losses(epoch, n=HEAVY_N):
    gen = torch.Generator().manual_seed(epoch)
    losses = 0.2 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    losses[torch.arange(n) % 3 != 0] += HEAVY_SCALE * DELTAS[epoch]
    return losses


def test_real_training_finds_the_mislabeled_samples(tmp_path):
    ds = NoisyTensorDataset(n=600, dim=8, num_classes=4, rate=0.4, seed=1)
    cleanser = GMMCleanser(every_n_epochs=1, patience=2)
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [cleanser], max_epochs=25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(dim=8, num_classes=4, hidden=32, lr=0.05), loader(ds, batch_size=32))
    assert cleanser.t_c_epoch is not None
    flags = torch.zeros(600, dtype=torch.bool).index_fill_(0, cleanser.flagged_indices, True)
    met = detection_metrics(flags, ds.is_noisy)
    assert met.f1 > 0.8, met
    assert cleanser._num_outputs == 4  # seen in the loss pass: the class check knows these are class labels


def test_class_wise_flags_at_t_c_in_a_real_run(tmp_path):
    """Three cleansers watch one run: the class-wise ones flag what one mixture per class of the peak's
    losses, or of its logit margins (the default), flags (functional.class_wise_flags), the third the
    global fit's flags; the t_c is the same."""
    ds = NoisyTensorDataset(n=600, dim=8, num_classes=4, rate=0.3, seed=2)
    ds.noisy_targets = torch.where(ds.is_noisy, (ds.true_targets + 1) % 4, ds.true_targets)  # pair flips
    by_margin = GMMCleanser(every_n_epochs=1, patience=2)  # class_wise=True, flag_score="auto": the margins
    by_loss = GMMCleanser(every_n_epochs=1, patience=2, flag_score="loss")
    global_ = GMMCleanser(every_n_epochs=1, patience=2, class_wise=False)
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [by_margin, by_loss, global_], max_epochs=25)
    model = TinyClassifier(dim=8, num_classes=4, hidden=32, lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(model, loader(ds, batch_size=32))
    assert by_loss.t_c_epoch is not None and by_loss.t_c_epoch == global_.t_c_epoch == by_margin.t_c_epoch
    cand, fit = global_._candidate, global_._candidate_fit
    assert torch.equal(global_._candidate["losses"], by_loss._candidate["losses"])
    assert sorted(global_.flagged_indices.tolist()) == torch.nonzero(fit.flags).flatten().tolist()  # under the cap
    expected, posterior = class_wise_flags(cand["losses"], cand["given"].long(), fit, max_fraction=0.75)
    assert sorted(by_loss.flagged_indices.tolist()) == torch.nonzero(expected).flatten().tolist()
    assert not torch.equal(expected, fit.flags)  # the classes' thresholds differ from the global one here
    assert torch.allclose(by_loss._candidate["posterior"], posterior)  # the CSV's posterior column
    flags = torch.zeros(600, dtype=torch.bool).index_fill_(0, by_loss.flagged_indices, True)
    # logged at t_c (the cleansers log under the same keys: each one's own values are in .last)
    assert math.isclose(by_loss.last["gmm/f1"], detection_metrics(flags, ds.is_noisy).f1, rel_tol=1e-6)
    assert by_loss.last["gmm/f1"] > global_.last["gmm/f1"]
    # the margins of the peak: positive exactly where the peak's prediction is another class than the given
    margin, given = by_margin._candidate["margin"], by_margin._candidate["given"].long()
    assert torch.isfinite(margin).all() and torch.equal(margin > 0, by_margin._candidate["pred"] != given)
    expected, posterior = class_wise_flags(margin, given, by_margin._candidate_fit, max_fraction=0.75)
    assert sorted(by_margin.flagged_indices.tolist()) == torch.nonzero(expected).flatten().tolist()
    assert not torch.equal(expected, flags)
    assert torch.allclose(by_margin._candidate["posterior"], posterior)
    flags = torch.zeros(600, dtype=torch.bool).index_fill_(0, by_margin.flagged_indices, True)
    assert math.isclose(by_margin.last["gmm/f1"], detection_metrics(flags, ds.is_noisy).f1, rel_tol=1e-6)


def test_the_loss_pass_margins_are_the_best_other_labels_loss_advantage(tmp_path):
    """The loss pass's margins against a per-sample loop: the given label's cross-entropy minus the least
    cross-entropy of any other label; NaN under a custom loss_fn (its outputs need not be logits)."""
    ds = NoisyTensorDataset(n=200, dim=8, num_classes=4, rate=0.3, seed=2)
    cleanser = GMMCleanser(every_n_epochs=1)
    custom = GMMCleanser(
        every_n_epochs=1, flag_score="loss", loss_fn=lambda out, y: nn.functional.cross_entropy(out, y)
    )
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [cleanser, custom], max_epochs=2)
    model = TinyClassifier(dim=8, num_classes=4, hidden=16, lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(model, loader(ds, batch_size=32))
        losses, given, _, margins = cleanser._all_losses(tr, model)
        margins_custom = custom._all_losses(tr, model)[3]
    model.eval()
    expected = []
    with torch.no_grad():
        for i in range(len(ds)):
            x, y = ds[i]
            z = model(x[None])[0]
            ce = [float(nn.functional.cross_entropy(z, torch.tensor(j))) for j in range(4)]
            expected.append(ce[int(y)] - min(c for j, c in enumerate(ce) if j != int(y)))
    assert torch.allclose(margins, torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    assert torch.isnan(margins_custom).all()


def test_clean_data_flags_almost_nothing(tmp_path):
    ds = NoisyTensorDataset(n=600, dim=8, num_classes=4, rate=0.0, seed=1)
    cleanser = GMMCleanser(every_n_epochs=1, patience=2)
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [cleanser], max_epochs=15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(dim=8, num_classes=4, hidden=32, lr=0.05), loader(ds, batch_size=32))
    assert cleanser.flagged_indices.numel() < 0.02 * 600
    flagged = [v for _, v in series(tr.loggers[0].records, "gmm/num_flagged")]
    assert max(flagged) < 0.02 * 600


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(patience=0), "patience"),
        (dict(max_fraction=0.0), "max_fraction"),
        (dict(max_fraction=1.5), "max_fraction"),
        (dict(action="delete"), "action must be one of"),
        (dict(flag_score="margin"), "flag_score must be one of"),
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(smoothing=0.0), "smoothing"),
        (dict(smoothing=1.5), "smoothing"),
        (dict(max_class_dependence=0.0), "max_class_dependence"),
        (dict(max_class_dependence=1.5), "max_class_dependence"),
        (dict(heavy_noise_weight=1.0), "heavy_noise_weight"),
        (dict(heavy_noise_separation=-1.0), "heavy_noise_separation"),
        (dict(heavy_noise_separation=0.0), "heavy_noise_separation"),
        (dict(min_separation=float("nan")), "min_separation"),
        (dict(min_separation=-1.0), "min_separation"),
        (dict(clip_percentiles=(95, 5)), "clip_percentiles"),
        (dict(clip_percentiles=5), "clip_percentiles"),
        (dict(seed=-1), "seed"),
        (dict(loss_fn="ce"), "loss_fn"),
        (dict(normalize="yes"), "normalize"),
        (dict(class_wise="yes"), "class_wise"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(LightningPhasesError, match=match):
        GMMCleanser(**kwargs)


class _Dump(pl.Callback):
    def __init__(self, directory, cleanser) -> None:
        self.directory, self.cleanser = str(directory), cleanser

    def on_train_end(self, trainer, pl_module) -> None:
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump(
                {
                    "flags": self.cleanser.flagged_indices.tolist(),
                    "t_c": self.cleanser.t_c_step,
                    "epoch": trainer.current_epoch,
                    "fitted": self.cleanser.budget.schedule.num_measurements,
                    "fitted_epochs": [epoch for _, epoch, _ in self.cleanser.delta_L_history],
                },
                fh,
            )


@pytest.mark.parametrize(
    "schedule",
    [
        dict(every_n_epochs=1),
        pytest.param(dict(overhead=0.05), marks=pytest.mark.slow, id="budget"),
        pytest.param(dict(every_n_epochs=1, search_samples=100), marks=pytest.mark.slow, id="subset"),
    ],
)
def test_ddp_ranks_agree_on_flags_and_decision(tmp_path, monkeypatch, schedule):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")  # spawned ranks: single-threaded BLAS pools (torch's and scikit-learn's)
    ds = NoisyTensorDataset(n=400, dim=8, num_classes=4, rate=0.4, seed=1)
    cleanser = GMMCleanser(action="stop", patience=2, **schedule)
    pl.seed_everything(0, verbose=False)
    tr = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=30,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cleanser, _Dump(tmp_path, cleanser), DestroyProcessGroupAtExit()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(dim=8, num_classes=4, hidden=32, lr=0.05), loader(ds, batch_size=16))
    with open(tmp_path / "rank0.json") as a, open(tmp_path / "rank1.json") as b:
        r0, r1 = json.load(a), json.load(b)
    assert r0 == r1  # the budget is decided on rank 0 and broadcast: the same epochs are fitted on both ranks
    if "search_samples" in schedule:  # searched on 100 of the 400, flagged from all 400 at the peak
        assert r0["t_c"] is not None and any(
            i not in set(cleanser._search_positions(400).tolist()) for i in r0["flags"]
        )
    if "every_n_epochs" in schedule:
        assert r0["t_c"] is not None and len(r0["flags"]) > 50 and r0["epoch"] < 29
    else:
        assert 1 <= r0["fitted"] < 30


def test_class_check_applies_to_class_targets_only():
    labels = GMMCleanser._class_labels
    assert torch.equal(labels(torch.tensor([0.0, 2.0, 1.0, 2.0, 0.0, 1.0])), torch.tensor([0, 2, 1, 2, 0, 1]))
    assert torch.equal(labels(torch.tensor([3, 1, 3, 1])), torch.tensor([3, 1, 3, 1]))  # integer tensors too
    assert labels(torch.tensor([0.5, 1.2, 0.3, 2.0])) is None  # regression targets
    assert labels(torch.arange(10.0)) is None  # one sample per value: not classes
    assert labels(torch.tensor([0.0, float("nan"), 1.0, 1.0])) is None
    counts = torch.tensor([0.0, 3.0, 5.0, 3.0, 0.0, 5.0])  # integer regression targets of a one-output model
    assert labels(counts) is not None and labels(counts, num_outputs=1) is None
    assert torch.equal(
        labels(torch.tensor([0.0, 1.0, 1.0, 0.0]), num_outputs=1), torch.tensor([0, 1, 1, 0])
    )  # one logit
    assert labels(torch.tensor([0.0, 7.0, 7.0, 0.0]), num_outputs=5) is None  # not an output index


# ---------------------------------------------------------------------- never ending the run


def _fit_warned(tmp_path, cleanser, *, dataset=None, epochs=3, model=None, train_loader=None, **kwargs):
    """Fit and return (trainer, the warnings GMMCleanser issued)."""
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [cleanser], max_epochs=epochs, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(
            model or TinyClassifier(), loader(dataset or NoisyTensorDataset()) if train_loader is None else train_loader
        )
    return tr, [str(w.message) for w in caught if "GMMCleanser" in str(w.message)]


class EvalFailingClassifier(TinyClassifier):
    """Trains normally; its forward raises in eval mode (where the loss pass runs) until ``until_epoch``."""

    def __init__(self, *args, until_epoch: int = 10**9, rank: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.until_epoch, self.rank = until_epoch, rank

    def forward(self, x):
        failing = self.rank is None or self.trainer.global_rank == self.rank
        if not self.training and failing and self.trainer.current_epoch < self.until_epoch:
            raise RuntimeError("a model error in eval mode")
        return super().forward(x)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        ds = NoisyTensorDataset()
        return iter([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize(
    "kind,match",
    [
        ("nan_loss", "the loss of training sample"),
        ("labels_out_of_range", "the loss pass"),
        ("iterable_dataset", "map-style"),
        ("model_error", "a model error in eval mode"),
    ],
)
def test_a_failing_measurement_warns_once_and_training_goes_on(tmp_path, kind, match):
    kwargs: dict = {}
    cleanser_kw: dict = {}
    if kind == "nan_loss":
        cleanser_kw["loss_fn"] = lambda out, y: out.sum() * float("nan")
    elif kind == "labels_out_of_range":
        cleanser_kw["unpack"] = lambda batch: (batch[0], batch[1] + 10)  # class 10+ of a 3-class model
    elif kind == "iterable_dataset":
        kwargs["train_loader"] = DataLoader(_Stream(), batch_size=8)
    else:
        kwargs["model"] = EvalFailingClassifier()
    cleanser = GMMCleanser(every_n_epochs=1, patience=2, **cleanser_kw)
    tr, warned = _fit_warned(tmp_path, cleanser, epochs=3, **kwargs)
    assert tr.current_epoch == 3 and not tr.interrupted  # all three epochs ran
    assert len(warned) == 1 and match in warned[0] and "training goes on" in warned[0]  # once, not per epoch
    assert cleanser.skipped == 3 and [v for _, v in series(tr.loggers[0].records, "gmm/skipped")] == [1.0, 2.0, 3.0]
    assert cleanser.t_c_step is None and not series(tr.loggers[0].records, "gmm/delta_L")


def test_measurements_resume_once_the_failure_stops(tmp_path):
    ds = NoisyTensorDataset(n=600, dim=8, num_classes=4, rate=0.4, seed=1)
    model = EvalFailingClassifier(dim=8, num_classes=4, hidden=32, lr=0.05, until_epoch=2)
    cleanser = GMMCleanser(every_n_epochs=1, patience=10)  # no t_c within the run: every epoch is measured
    tr, warned = _fit_warned(tmp_path, cleanser, epochs=6, model=model, train_loader=loader(ds, batch_size=32))
    assert len(warned) == 1 and cleanser.skipped == 2
    assert [s for s, _ in series(tr.loggers[0].records, "gmm/delta_L")] == [19 * e for e in range(3, 7)]


def test_a_failed_csv_write_warns_and_leaves_the_old_file_whole(tmp_path, monkeypatch):
    import lightning_phases._io as io_module

    old = "".join(f"{i},old\n" for i in range(603))
    (tmp_path / "gmm_flagged.csv").write_text(old)  # the log directory of this Trainer is tmp_path

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_module.os, "replace", refuse)
    cleanser = ScriptedCleanser(patience=2)
    tr, warned = _fit_warned(tmp_path, cleanser, dataset=NoisyTensorDataset(n=300), epochs=8)
    assert cleanser.t_c_epoch == 3 and tr.current_epoch == 8  # t_c confirmed at epoch 5, training went on
    assert len(warned) == 1 and "gmm_flagged.csv" in warned[0] and "No space left" in warned[0]
    assert (tmp_path / "gmm_flagged.csv").read_text() == old and cleanser.csv_path is None
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert cleanser.skipped == 1 and series(tr.loggers[0].records, "gmm/skipped")[-1][1] == 1.0


def test_a_log_dir_below_a_regular_file_warns_and_training_goes_on(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    cleanser = ScriptedCleanser(action="flag", patience=2)
    pl.seed_everything(0, verbose=False)
    tr = pl.Trainer(
        default_root_dir=blocker / "logs",
        max_epochs=8,
        accelerator="cpu",
        logger=RecordingLogger(tmp_path / "log.jsonl"),  # no log_dir of its own: default_root_dir is used
        callbacks=[cleanser],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset(n=300)))
    warned = [str(w.message) for w in caught if "GMMCleanser" in str(w.message)]
    assert cleanser.t_c_epoch == 3 and tr.current_epoch == 8 and cleanser.flagged_indices.numel() == 90
    assert len(warned) == 1 and "gmm_flagged.csv" in warned[0] and cleanser.csv_path is None
    assert blocker.read_text() == "not a directory"


def test_the_csv_is_written_whole_and_replaces_an_old_one(tmp_path):
    (tmp_path / "gmm_flagged.csv").write_text("stale\n")
    cleanser = ScriptedCleanser(patience=2)
    _fit_warned(tmp_path, cleanser, dataset=NoisyTensorDataset(n=300), epochs=7)
    with open(tmp_path / "gmm_flagged.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["index"]) for r in rows] == cleanser.flagged_indices.tolist() and len(rows) == 90


def test_a_failing_removal_warns_and_training_continues_on_the_full_set(tmp_path):
    class Refusing(RemovableDataModule):
        def remove_train_samples(self, indices) -> None:
            raise PermissionError("read-only dataset")

    dm = Refusing(NoisyTensorDataset(n=300))
    cleanser = ScriptedCleanser(action="remove", patience=2)
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [cleanser], max_epochs=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(TinyClassifier(), datamodule=dm)
    warned = [str(w.message) for w in caught if "GMMCleanser" in str(w.message)]
    assert len(warned) == 1 and "removing the flagged samples" in warned[0] and "read-only" in warned[0]
    assert not cleanser.removed and tr.current_epoch == 8 and dm.loader_sizes == [300]


# ---------------------------------------------------------------------- lifecycle


def test_a_reused_cleanser_starts_fresh_on_new_data(tmp_path):
    cleanser = ScriptedCleanser(patience=2)
    _fit(tmp_path / "a", cleanser, epochs=8)
    assert cleanser.t_c_epoch == 3 and cleanser.flagged_indices.numel() == 90 and cleanser.csv_path
    other = PlainDataset(NoisyTensorDataset(n=300, seed=5))  # other data, no ground truth
    tr, _ = _fit(tmp_path / "b", cleanser, dataset=other, epochs=3)
    assert cleanser.t_c_step is None and cleanser.flagged_indices.numel() == 0 and cleanser.csv_path is None
    assert [e for _, e, _ in cleanser.delta_L_history] == [0, 1, 2] and cleanser.best_epoch == 2
    assert "gmm/t_c_step" not in cleanser.last and "gmm/precision" not in cleanser.last
    fresh = ScriptedCleanser(patience=2)
    _fit(tmp_path / "c", fresh, dataset=other, epochs=3)
    assert fresh.state_dict()["delta_L_history"] == cleanser.state_dict()["delta_L_history"]


def test_the_same_cleanser_resumed_from_a_checkpoint_continues(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_epochs=1)
    cleanser = ScriptedCleanser(patience=3)
    _fit(tmp_path / "a", cleanser, epochs=5, extra=[ckpt], enable_checkpointing=True)
    assert cleanser.t_c_epoch is None and cleanser.best_epoch == 3
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path / "b", [cleanser], max_epochs=12, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset(n=300)), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert cleanser.t_c_epoch == 3 and len(cleanser.delta_L_history) == 7  # 5 before the restart, 2 after


# ---------------------------------------------------------------------- arguments and namespaces


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(normalize="no"), "normalize must be True or False"),
        (dict(seed=True), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=-3), "non-negative int"),
        (dict(max_fraction=float("inf")), "max_fraction"),
        (dict(action=None), "action must be one of"),
        (dict(overhead=0.0), "overhead"),
        (dict(overhead=-0.1), "overhead"),
        (dict(overhead=float("nan")), "overhead"),
        (dict(overhead="10%"), "overhead"),
        (dict(overhead=True), "overhead"),
        (dict(every_n_epochs=1.5), "every_n_epochs"),
        (dict(every_n_epochs=True), "every_n_epochs"),
    ],
)
def test_more_bad_arguments(kwargs, match):
    with pytest.raises(LightningPhasesError, match=match) as info:
        GMMCleanser(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)  # the value is echoed


def test_any_non_negative_seed_works():
    losses = torch.cat([0.2 + 0.05 * torch.randn(200, dtype=torch.float64), 1.0 + 0.05 * torch.randn(100)])
    for seed in (0, 2**32 - 1, 2**32, 2**64 + 7):
        fit, _, _, _ = GMMCleanser(seed=seed)._fit(_NoTrainer(), losses.double(), torch.zeros(300))
        assert fit.mean_noisy - fit.mean_clean == pytest.approx(0.8, abs=0.05)


class _NoTrainer:
    """Enough of a Trainer for GMMCleanser._fit: a training dataset without ground truth."""

    datamodule = None
    train_dataloader = DataLoader(torch.utils.data.TensorDataset(torch.zeros(300, 1)))


def test_action_is_a_literal():
    import inspect
    import typing

    hints = typing.get_type_hints(GMMCleanser.__init__)
    assert typing.get_args(hints["action"]) == ("flag", "remove", "stop")
    assert inspect.signature(GMMCleanser).parameters["action"].default == "flag"


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_both_lightning_namespaces(tmp_path, namespace):
    import importlib

    ns = importlib.import_module(namespace)

    class Tiny(ns.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    cleanser = ScriptedCleanser(patience=2)
    ns.seed_everything(0, verbose=False)
    tr = ns.Trainer(
        default_root_dir=tmp_path,
        max_epochs=7,
        accelerator="cpu",
        logger=False,
        callbacks=[cleanser],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(Tiny(), loader(NoisyTensorDataset(n=300)))
    assert cleanser.t_c_epoch == 3 and tr.current_epoch == 7  # confirmed at epoch 5, flag: training went on
    assert torch.equal(
        cleanser.flagged_indices, torch.nonzero(torch.as_tensor(NoisyTensorDataset(n=300).is_noisy)).flatten()
    )
    assert os.path.exists(os.path.join(tmp_path, "gmm_flagged.csv"))


class _DumpSkips(pl.Callback):
    def __init__(self, directory, cleanser) -> None:
        self.directory, self.cleanser = str(directory), cleanser

    def on_train_end(self, trainer, pl_module) -> None:
        with open(os.path.join(self.directory, f"skips{trainer.global_rank}.json"), "w") as fh:
            c = self.cleanser
            json.dump(
                {
                    "skipped": c.skipped,
                    "t_c": c.t_c_step,
                    "flags": c.flagged_indices.tolist(),
                    "history": c.delta_L_history,
                },
                fh,
            )


@pytest.mark.slow
def test_ddp_a_failure_on_one_rank_neither_hangs_nor_splits_the_decision(tmp_path, monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    ds = NoisyTensorDataset(n=400, dim=8, num_classes=4, rate=0.4, seed=1)
    cleanser = GMMCleanser(action="stop", every_n_epochs=1, patience=2)
    model = EvalFailingClassifier(dim=8, num_classes=4, hidden=32, lr=0.05, until_epoch=3, rank=1)
    pl.seed_everything(0, verbose=False)
    tr = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=30,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cleanser, _DumpSkips(tmp_path, cleanser), DestroyProcessGroupAtExit()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(model, loader(ds, batch_size=16))
    with open(tmp_path / "skips0.json") as a, open(tmp_path / "skips1.json") as b:
        r0, r1 = json.load(a), json.load(b)
    assert r0 == r1  # the healthy rank skipped the same epochs as the failing one and took the same decision
    assert r0["skipped"] == 3 and r0["t_c"] is not None and len(r0["flags"]) > 50
    assert min(epoch for _, epoch, _ in r0["history"]) == 3


# ---------------------------------------------------------------------- the search on a subset


class _StateRecorder(pl.Callback):
    """A CPU copy of the module's state after every epoch (before the cleanser's measurement of that epoch)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.states[trainer.current_epoch] = {
            k: v.detach().clone() for k, v in pl_module.state_dict().items() if isinstance(v, torch.Tensor)
        }


def _losses_at(state, ds, indices):
    """Per-sample cross-entropy of ``ds[indices]`` under ``state``, one sample at a time (the slow reference)."""
    model = TinyClassifier(dim=8, num_classes=4, hidden=32, lr=0.05)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return torch.stack(
            [
                torch.nn.functional.cross_entropy(model(ds.x[i : i + 1]), ds.noisy_targets[i : i + 1]).double()
                for i in indices.tolist()
            ]
        )


def _subset_run(tmp_path, *, epochs=25, ckpt=None, ckpt_path=None, search_samples=200, model=None, extra=()):
    ds = NoisyTensorDataset(n=600, dim=8, num_classes=4, rate=0.4, seed=1)
    cleanser = GMMCleanser(every_n_epochs=1, patience=2, search_samples=search_samples)
    recorder = _StateRecorder()
    pl.seed_everything(0, verbose=False)
    extra = [*extra, ckpt] if ckpt is not None else list(extra)
    if model is None:
        model = TinyClassifier(dim=8, num_classes=4, hidden=32, lr=0.005)  # slow: the smoothed ΔL peaks at epoch 6
    tr = trainer(tmp_path, [recorder, cleanser, *extra], max_epochs=epochs, enable_checkpointing=ckpt is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(model, loader(ds, batch_size=32, shuffle=False), ckpt_path=ckpt_path)
    return ds, cleanser, recorder, model, tr


def test_the_search_runs_on_a_subset_and_the_flags_come_from_every_sample_at_the_peak(tmp_path):
    from lightning_phases.functional import CleansingTracker, excess_class_dependence

    ds, cleanser, recorder, model, tr = _subset_run(tmp_path)
    subset = cleanser._search_positions(600)
    assert subset is not None and subset.numel() == 200 and torch.equal(subset, torch.unique(subset))
    assert torch.equal(subset, cleanser._search_positions(600))  # fixed: the same samples at every measurement
    assert cleanser._search_positions(200) is None  # no larger than search_samples: every sample
    # replay the search on the subset's losses, computed independently from each epoch's state
    replay = CleansingTracker(patience=2)
    labels = ds.noisy_targets[subset]
    for epoch in sorted(recorder.states):
        losses = _losses_at(recorder.states[epoch], ds, subset)
        fit = fit_loss_mixture(losses, seed=0)
        replay.update(
            fit, losses, dependence=excess_class_dependence(fit, labels), step=epoch, epoch=epoch, num_classes=4
        )
        if replay.confirmed:
            break
    assert replay.confirmed and cleanser.t_c_epoch == replay.t_c_epoch
    assert replay.t_c_epoch >= 3  # a peak inside the run, not its first fit
    assert [d for _, _, d in cleanser.delta_L_history] == pytest.approx(
        [d for _, _, d in replay.delta_L_history], rel=1e-6
    )
    # the flags: a fit to every sample's loss at the peak's state, capped as the tracker caps
    every = torch.arange(600)
    losses = _losses_at(recorder.states[replay.t_c_epoch], ds, every)
    full = fit_loss_mixture(losses, seed=0)
    assert cleanser._candidate["losses"] == pytest.approx(losses, rel=1e-5)  # the CSV's losses: at the peak
    confirming = _losses_at(recorder.states[replay.t_c_epoch + 2], ds, every)  # patience 2: confirmed 2 fits on
    assert cleanser._candidate["losses"] != pytest.approx(confirming, rel=1e-5)
    expected = torch.nonzero(replay.capped_flags(full, losses, 4)).flatten()
    assert expected.numel() > 100 and (expected < 600).all()
    disagree = set(expected.tolist()) ^ set(cleanser.flagged_indices.tolist())
    assert len(disagree) <= 1, disagree  # float32 batched vs one-at-a-time losses: a tie at the threshold at most
    assert not (set(cleanser.flagged_indices.tolist()) <= set(subset.tolist()))  # flags outside the subset too
    logged = dict(series(tr.loggers[0].records, "gmm/num_flagged"))
    assert logged[max(logged)] == cleanser.flagged_indices.numel()  # the confirming measurement logs the full flags
    # the pass at the peak's state put the current state back: training went on untouched
    assert all(torch.equal(v, recorder.states[max(recorder.states)][k]) for k, v in model.state_dict().items())
    assert cleanser._peak_weights is None and "peak_weights" not in {
        k for k, v in cleanser.state_dict().items() if v is not None
    }


def test_the_subset_search_trains_exactly_as_without_a_cleanser(tmp_path):
    _, cleanser, _, with_cleanser, _ = _subset_run(tmp_path / "a", epochs=12)
    assert cleanser.t_c_epoch is not None  # the full pass at the peak's state ran during training
    ds = NoisyTensorDataset(n=600, dim=8, num_classes=4, rate=0.4, seed=1)
    pl.seed_everything(0, verbose=False)
    plain = TinyClassifier(dim=8, num_classes=4, hidden=32, lr=0.005)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path / "b", [], max_epochs=12).fit(plain, loader(ds, batch_size=32, shuffle=False))
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in with_cleanser.state_dict().items())


def test_a_run_resumed_between_the_peak_and_t_c_flags_as_the_uninterrupted_one(tmp_path):
    _, whole, _, _, _ = _subset_run(tmp_path / "whole")
    assert whole.t_c_epoch is not None
    cut = whole.t_c_epoch + 1  # the peak seen, one fit after it, not yet confirmed (patience 2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_epochs=1)
    _, first, recorder, _, _ = _subset_run(tmp_path / "a", epochs=cut + 1, ckpt=ckpt)
    assert first.t_c_epoch is None and first.best_epoch == whole.t_c_epoch
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["callbacks"][first.state_key]["peak_weights"]
    assert all(torch.equal(v, recorder.states[whole.t_c_epoch][k]) for k, v in saved.items())
    _, resumed, _, _, _ = _subset_run(tmp_path / "b", ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert resumed.t_c_epoch == whole.t_c_epoch
    assert torch.equal(resumed.flagged_indices, whole.flagged_indices)


def test_search_samples_is_checked():
    with pytest.raises(LightningPhasesError, match="search_samples"):
        GMMCleanser(search_samples=10)
    assert GMMCleanser(search_samples=None)._search_positions(10**6) is None


@pytest.mark.parametrize("before,after", [(None, 200), (200, None)])
def test_a_resume_that_changes_search_samples_flags_the_right_samples(tmp_path, before, after):
    """The peak's flags are dataset indices whichever sample set the search ran on: a checkpoint of a search on
    every sample (as every checkpoint before the subset search) resumed with the subset, and the reverse, flag
    exactly as the uninterrupted run (the peak and t_c fall on the same epochs here)."""
    _, whole, _, _, _ = _subset_run(tmp_path / "whole", search_samples=before)
    assert whole.t_c_epoch is not None and whole.flagged_indices.numel() > 100
    cut = whole.t_c_epoch + 1
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_epochs=1)
    _, first, _, _, _ = _subset_run(tmp_path / "a", epochs=cut + 1, ckpt=ckpt, search_samples=before)
    assert first.t_c_epoch is None and first.best_epoch == whole.t_c_epoch
    _, resumed, _, _, _ = _subset_run(
        tmp_path / "b", ckpt_path=str(tmp_path / "ck" / "last.ckpt"), search_samples=after
    )
    assert resumed.t_c_epoch == whole.t_c_epoch
    assert torch.equal(resumed.flagged_indices, whole.flagged_indices)
    with open(resumed.csv_path) as fh:
        assert [int(row.split(",")[0]) for row in fh.read().splitlines()[1:]] == whole.flagged_indices.tolist()


class _Tagged(nn.Module):
    """A module whose ``get_extra_state`` is a plain dict (PyTorch allows any object)."""

    def __init__(self) -> None:
        super().__init__()
        self.meta = {"version": 1}

    def forward(self, x):
        return x

    def get_extra_state(self):
        return self.meta

    def set_extra_state(self, state) -> None:
        self.meta = state


class _TaggedClassifier(TinyClassifier):
    def __init__(self) -> None:
        super().__init__(dim=8, num_classes=4, hidden=32, lr=0.005)
        self.tag = _Tagged()


def test_a_module_with_non_tensor_extra_state_is_searched_on_a_subset(tmp_path):
    _, plain, _, _, _ = _subset_run(tmp_path / "plain")
    pl.seed_everything(0, verbose=False)  # the same initial weights as the plain run's network
    model = _TaggedClassifier()
    assert any(k.endswith("_extra_state") for k in model.state_dict())
    _, cleanser, _, _, _ = _subset_run(tmp_path / "tagged", model=model)
    assert cleanser.skipped == 0 and cleanser.t_c_epoch == plain.t_c_epoch
    assert torch.equal(cleanser.flagged_indices, plain.flagged_indices)  # the same network, the same flags
    assert model.tag.meta == {"version": 1}


class _GrowsABuffer(pl.Callback):
    """Registers a new buffer after ``epoch``: the module's state no longer fits the one kept at the peak."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            pl_module.register_buffer("grown", torch.ones(3))


def test_a_module_changed_since_the_peak_keeps_training_and_flags_the_searched_samples(tmp_path):
    _, whole, _, _, _ = _subset_run(tmp_path / "whole")
    peak = whole.t_c_epoch
    after = _StateRecorder()  # runs after the cleanser's measurement at each epoch end (the recorder before it)
    ds, cleanser, recorder, model, _ = _subset_run(tmp_path / "grown", extra=[_GrowsABuffer(peak + 1), after])
    assert cleanser.t_c_epoch == peak and cleanser.skipped == 1  # the pass at the peak's state: warned, skipped
    # the flags fall back to those of the searched samples at the peak: a fit to their losses there
    subset = cleanser._search_positions(600)
    losses = _losses_at({k: v for k, v in recorder.states[peak].items() if k != "grown"}, ds, subset)
    expected = subset[CleansingTracker(patience=2).capped_flags(fit_loss_mixture(losses, seed=0), losses, 4)]
    assert len(set(expected.tolist()) ^ set(cleanser.flagged_indices.tolist())) <= 1
    assert set(cleanser.flagged_indices.tolist()) <= set(subset.tolist())
    # no measurement changed the module (the failed one at t_c included), and the CSV lists the searched
    # samples' values at the peak
    assert "grown" in after.states[peak + 2] and sorted(after.states) == sorted(recorder.states)
    for epoch, state in after.states.items():
        assert all(torch.equal(v, recorder.states[epoch][k]) for k, v in state.items()), epoch
    with open(cleanser.csv_path) as fh:
        rows = [row.split(",") for row in fh.read().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == cleanser.flagged_indices.tolist()
    by_index = dict(zip(subset.tolist(), losses.tolist()))
    assert all(float(r[1]) == pytest.approx(by_index[int(r[0])], rel=1e-4) for r in rows)


class _BimodalOnlyOnTheSubset(ScriptedCleanser):
    """The scripted two populations on the searched samples; one Gaussian over every sample (the pass at t_c)."""

    def _all_losses(self, trainer, pl_module, positions=None):
        losses, given, pred, margins = super()._all_losses(trainer, pl_module)
        if positions is None:
            gen = torch.Generator().manual_seed(99)
            return 0.2 + 0.1 * torch.randn(losses.numel(), generator=gen, dtype=torch.float64), given, pred, margins
        return losses[positions], given[positions], pred[positions], margins[positions]


def test_a_fit_to_every_sample_that_is_not_bimodal_keeps_the_searched_samples_flags(tmp_path, caplog):
    cleanser = _BimodalOnlyOnTheSubset(patience=3, search_samples=100)
    with caplog.at_level("INFO"):
        _fit(tmp_path, cleanser)
    assert cleanser.t_c_epoch == 3 and cleanser.skipped == 0
    subset = cleanser._search_positions(300)
    noisy = NoisyTensorDataset(n=300).is_noisy
    assert torch.equal(cleanser.flagged_indices, subset[noisy[subset]])  # the searched mislabeled samples
    assert "the fit to every training sample at the peak is not bimodal" in caplog.text
