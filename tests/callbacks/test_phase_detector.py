"""PhaseDetector inside a Trainer, fed by a provider that publishes a constructed series."""

from __future__ import annotations

import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_phases import NoiseSplitTracker, OrderParameterMonitor, PhaseDetector
from lightning_phases.errors import LightningPhasesError
from tests.callbacks.helpers import NoisyTensorDataset, TinyClassifier, loader, series, trainer
from tests.functional.test_phases import _four_phase_series


class SeriesProvider(pl.Callback):
    """Publishes one entry of a recorded series into callback_metrics at each epoch end (like the monitors)."""

    phase_metrics = ("order/R", "order/sigma2_lambda", "order/A", "split/A0_c", "split/A0_w", "split/R_cw", "split/err_w", "order/measured_step")

    def __init__(self, recorded) -> None:
        self.recorded = recorded

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        stats = dict(self.recorded[trainer.current_epoch])
        stats["order/measured_step"] = float(trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in stats.items()})


def _fit(tmp_path, detector, *, epochs, extra=(), **kwargs):
    recorded, truth = _four_phase_series(lengths=(6, 6, 6, 6))
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier()
    tr = trainer(tmp_path, [SeriesProvider(recorded), detector, *extra], max_epochs=epochs, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(model, loader(NoisyTensorDataset()))
    return tr, model, truth


def test_detects_the_constructed_phases_and_logs_them(tmp_path):
    detector = PhaseDetector(smoothing=1.0, patience=1)
    tr, _, truth = _fit(tmp_path, detector, epochs=24)
    assert [h["phase"] for h in detector.history] == truth
    phase_steps = [(t.to_phase, t.epoch) for t in detector.transitions]
    assert phase_steps == [("II", 6), ("III", 12), ("IV", 18)]
    assert detector.recommended.epoch == 6 and detector.recommended.step == 7 * 12
    logged = series(tr.loggers[0].records, "phase/index")
    assert [v for _, v in logged] == [float(["I", "II", "III", "IV"].index(p)) for p in truth]
    assert series(tr.loggers[0].records, "phase/recommended_step")[-1][1] == 84.0
    summary = detector.summary()
    assert "II" in summary and "epochs 6-11" in summary and "recommended stop: step 84, epoch 6" in summary


def test_stop_and_keep_the_weights_of_the_recommended_point(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="phase/recommended", mode="max", save_top_k=1, save_on_train_epoch_end=True, filename="best")
    detector = PhaseDetector(smoothing=1.0, patience=1, stop=True, save_checkpoint=True)
    tr, model, _ = _fit(tmp_path, detector, epochs=24, extra=[ckpt], enable_checkpointing=True)
    assert tr.current_epoch == 7  # stopped right after epoch 6's measurement
    assert detector.recommended_checkpoint and os.path.exists(detector.recommended_checkpoint)
    kept = torch.load(detector.recommended_checkpoint, weights_only=False)["state_dict"]
    saved = torch.load(ckpt.best_model_path, weights_only=False)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(kept[k], v) and torch.equal(saved[k], v)
        assert torch.equal(detector.recommended_state_dict[k], v)
    other = TinyClassifier()
    detector.restore_recommended(other)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


def test_resume_continues_the_phase_sequence(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_epochs=1)
    first = PhaseDetector(smoothing=1.0, patience=1)
    _fit(tmp_path / "a", first, epochs=9, extra=[ckpt], enable_checkpointing=True)
    assert first.phase == "II"
    second = PhaseDetector(smoothing=1.0, patience=1)
    recorded, truth = _four_phase_series(lengths=(6, 6, 6, 6))
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path / "b", [SeriesProvider(recorded), second], max_epochs=24, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset()), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert [h["phase"] for h in second.history] == truth
    assert [t.epoch for t in second.transitions] == [6, 12, 18]


def test_works_with_the_real_monitors(tmp_path):
    detector = PhaseDetector()
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [OrderParameterMonitor(probe_size=48), NoiseSplitTracker(probe_size=48), detector], max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset()))
    assert detector.tracker.model == "four" and len(detector.history) == 4  # start + 3 epochs
    assert "phase/index" in tr.callback_metrics


def test_setup_names_the_missing_callback(tmp_path):
    with pytest.raises(LightningPhasesError, match="Add OrderParameterMonitor"):
        tr = trainer(tmp_path, [PhaseDetector()], max_epochs=1)
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset()))
    with pytest.raises(LightningPhasesError, match="NoiseSplitTracker"):
        tr = trainer(tmp_path, [OrderParameterMonitor(probe_size=32), PhaseDetector("four")], max_epochs=1)
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset()))


@pytest.mark.parametrize("kwargs,match", [(dict(model="six"), "model must be one of"), (dict(patience=0), "patience"), (dict(smoothing=2.0), "smoothing")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(LightningPhasesError, match=match):
        PhaseDetector(**kwargs)
