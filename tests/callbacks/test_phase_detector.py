"""PhaseDetector inside a Trainer, fed by a provider that publishes a constructed series."""

from __future__ import annotations

import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_phases import NoiseSplitTracker, OrderParameterMonitor, PhaseDetector, keys
from lightning_phases.errors import LightningPhasesError
from tests.callbacks.helpers import NoisyTensorDataset, TinyClassifier, loader, series, trainer
from tests.functional.test_phases import _four_phase_series


class SeriesProvider(pl.Callback):
    """Publishes one entry of a recorded series into callback_metrics at each epoch end (like the monitors)."""

    phase_metrics = (
        "order/R",
        "order/sigma2_lambda",
        "order/A",
        "split/A0_c",
        "split/A0_w",
        "split/R_cw",
        "split/err_w",
        "order/measured_step",
    )

    def __init__(self, recorded) -> None:
        self.recorded = recorded

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # the recorded series is by PhaseTracker (SPEC) name; the monitors publish the registry keys
        stats = {keys.TRACKER_STATISTICS.get(k, k): v for k, v in self.recorded[trainer.current_epoch].items()}
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


class WeightRecorder(pl.Callback):
    """The weights after every epoch, for an independent average."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.by_epoch[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _mean_weights(recorder: WeightRecorder, epochs) -> dict[str, torch.Tensor]:
    states = [recorder.by_epoch[e] for e in epochs]
    return {k: torch.stack([s[k].double() for s in states]).mean(0).to(states[0][k].dtype) for k in states[0]}


def test_detects_the_constructed_phases_and_logs_them(tmp_path):
    detector = PhaseDetector(smoothing=1.0, patience=1)
    tr, _, truth = _fit(tmp_path, detector, epochs=24)
    assert [h["phase"] for h in detector.history] == truth
    phase_steps = [(t.to_phase, t.epoch) for t in detector.transitions if t.kind == "phase"]
    assert phase_steps == [("II", 6), ("III", 12), ("IV", 18)]
    # err_w is flat in phase II and falls in phase III: phase II ends at epoch 12
    assert detector.recommended.epoch == 12 and detector.recommended.step == 13 * 12
    logged = series(tr.loggers[0].records, "phase/index")
    assert [v for _, v in logged] == [float(["I", "II", "III", "IV"].index(p)) for p in truth]
    assert series(tr.loggers[0].records, "phase/recommended_step")[-1][1] == 156.0
    summary = detector.summary()
    assert "II" in summary and "epochs 6-11" in summary and "recommended stop: step 156, epoch 12" in summary
    assert "averaged over 7 phase-II measurements" in summary


def test_stop_and_keep_the_phase_two_average(tmp_path):
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ck",
        monitor="phase/recommended",
        mode="max",
        save_top_k=1,
        save_on_train_epoch_end=True,
        filename="best",
    )
    weights = WeightRecorder()
    detector = PhaseDetector(smoothing=1.0, patience=1, stop=True, save_checkpoint=True)
    tr, model, _ = _fit(tmp_path, detector, epochs=24, extra=[ckpt, weights], enable_checkpointing=True)
    assert tr.current_epoch == 13  # stopped right after epoch 12's measurement
    expected = _mean_weights(weights, range(6, 13))  # phase II (epochs 6-11) and the stopping measurement
    assert detector.recommended_checkpoint and os.path.exists(detector.recommended_checkpoint)
    kept = torch.load(detector.recommended_checkpoint, weights_only=False)["state_dict"]
    saved = torch.load(ckpt.best_model_path, weights_only=False)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights.by_epoch[12][k])  # the live weights were put back after the checkpoint
        assert torch.equal(saved[k], v)  # ModelCheckpoint on phase/recommended: the weights at the stop
        torch.testing.assert_close(detector.recommended_state_dict[k], expected[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(kept[k], detector.recommended_state_dict[k])
    assert not torch.equal(detector.recommended_state_dict["net.0.weight"], model.state_dict()["net.0.weight"])
    other = TinyClassifier()
    detector.restore_recommended(other)
    assert all(torch.equal(a, detector.recommended_state_dict[k]) for k, a in other.state_dict().items())


def test_keep_the_weights_at_the_stop_without_averaging(tmp_path):
    detector = PhaseDetector(smoothing=1.0, patience=1, stop=True, average_weights=False)
    tr, model, _ = _fit(tmp_path, detector, epochs=24)
    assert tr.current_epoch == 13
    for k, v in model.state_dict().items():
        assert torch.equal(detector.recommended_state_dict[k], v)
    assert "at the recommended stop" in detector.summary()


def test_averaged_and_point_detectors_side_by_side(tmp_path):
    """Two detectors in one Trainer (distinct state keys) take the same decision and keep different weights."""
    averaged, at_stop = (
        PhaseDetector(smoothing=1.0, patience=1),
        PhaseDetector(smoothing=1.0, patience=1, average_weights=False),
    )
    _, model, _ = _fit(tmp_path, averaged, epochs=24, extra=[at_stop])
    assert averaged.state_key != at_stop.state_key
    assert averaged.recommended == at_stop.recommended
    assert not torch.equal(
        averaged.recommended_state_dict["net.0.weight"], at_stop.recommended_state_dict["net.0.weight"]
    )


def test_training_that_ends_in_phase_two_keeps_the_average_so_far(tmp_path):
    weights = WeightRecorder()
    detector = PhaseDetector(smoothing=1.0, patience=1)
    _, model, _ = _fit(tmp_path, detector, epochs=10, extra=[weights])
    assert detector.recommended is None and detector.phase == "II"
    expected = _mean_weights(weights, range(6, 10))
    for k in expected:
        torch.testing.assert_close(detector.recommended_state_dict[k], expected[k], rtol=1e-6, atol=1e-7)


def test_resume_continues_the_phase_sequence(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_epochs=1)
    first_weights, second_weights = WeightRecorder(), WeightRecorder()
    first = PhaseDetector(smoothing=1.0, patience=1)
    _fit(tmp_path / "a", first, epochs=9, extra=[ckpt, first_weights], enable_checkpointing=True)
    assert first.phase == "II"
    second = PhaseDetector(smoothing=1.0, patience=1)
    recorded, truth = _four_phase_series(lengths=(6, 6, 6, 6))
    pl.seed_everything(0, verbose=False)
    tr = trainer(
        tmp_path / "b", [SeriesProvider(recorded), second, second_weights], max_epochs=24, enable_checkpointing=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset()), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert [h["phase"] for h in second.history] == truth
    assert [t.epoch for t in second.transitions if t.kind == "phase"] == [6, 12, 18]
    # the phase-II running sum survived the restart: epochs 6-8 from the first run, 9-12 from the second
    states = [first_weights.by_epoch[e] for e in (6, 7, 8)] + [second_weights.by_epoch[e] for e in (9, 10, 11, 12)]
    for k, v in second.recommended_state_dict.items():
        expected = torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
        torch.testing.assert_close(v, expected, rtol=1e-6, atol=1e-7)


def _fit_with_the_real_monitors(root, detector, *, epochs, rate=0.3):
    """Fit TinyClassifier with OrderParameterMonitor + NoiseSplitTracker (every epoch, probe 48) and ``detector``."""
    pl.seed_everything(0, verbose=False)
    monitors = [
        OrderParameterMonitor(every_n_epochs=1, probe_size=48),
        NoiseSplitTracker(every_n_epochs=1, probe_size=48),
    ]
    tr = trainer(root, [*monitors, detector], max_epochs=epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset(rate=rate)))
    return tr


def test_works_with_the_real_monitors(tmp_path):
    detector = PhaseDetector()
    tr = _fit_with_the_real_monitors(tmp_path, detector, epochs=3)
    assert detector.tracker.model == "four" and len(detector.history) == 4  # start + 3 epochs
    assert "phase/index" in tr.callback_metrics


def test_clean_data_gets_the_two_phase_model(tmp_path):
    """ρ = 0: the split tracker publishes nothing (no mislabeled probe samples), so the detector reports
    the two-phase model of clean data instead of waiting in phase I of the four-phase one."""
    detector = PhaseDetector()
    _fit_with_the_real_monitors(tmp_path, detector, epochs=2, rate=0.0)
    assert detector.tracker.model == "two" and detector.phase in ("fast_learning", "exploration")
    assert len(detector.history) == 3 and detector.recommended is None
    # a forced four-phase model is kept as asked
    forced = PhaseDetector(model="four")
    _fit_with_the_real_monitors(tmp_path / "four", forced, epochs=1, rate=0.0)
    assert forced.tracker.model == "four"


def _fixed_schedule(kw):
    """``kw`` with a fixed schedule: every epoch unless it names ``every_n_steps`` (the default is a time budget)."""
    kw = dict(kw or {})
    if "every_n_steps" not in kw:
        kw.setdefault("every_n_epochs", 1)
    return kw


def _detector_with_monitors(
    tmp_path, position, split_every=None, epochs=3, order_kw=None, split_kw=None, extra=(), fit_kw=None, **kwargs
):
    detector = PhaseDetector(verbose=False)
    providers = [
        OrderParameterMonitor(probe_size=48, **_fixed_schedule(order_kw)),
        NoiseSplitTracker(probe_size=48, every_n_epochs=split_every or 1, **(split_kw or {})),
    ]
    callbacks = providers[:position] + [detector] + providers[position:] + list(extra)
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path / str(position), callbacks, max_epochs=epochs, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset()), **(fit_kw or {}))
    return detector, tr


def test_the_place_in_the_callback_list_does_not_matter(tmp_path):
    # providers after the detector publish later in the same hook round; each measurement is taken once,
    # with every provider's values of that step and the epoch in which the step ran
    runs = [_detector_with_monitors(tmp_path, position)[0] for position in (2, 1, 0)]
    steps_per_epoch = len(loader(NoisyTensorDataset()))
    expected = [(0, 0)] + [((e + 1) * steps_per_epoch, e) for e in range(3)]
    for detector in runs:
        assert [(h["step"], h["epoch"]) for h in detector.history] == expected
        assert detector.tracker.state_dict() == runs[0].tracker.state_dict()  # same smoothed statistics


def test_providers_on_different_schedules_are_each_taken_once(tmp_path):
    detector, tr = _detector_with_monitors(tmp_path, 2, split_every=2, epochs=4)
    steps_per_epoch = len(loader(NoisyTensorDataset()))
    # order/* every epoch, split/* at the start and every second epoch: one measurement per order step
    assert [(h["step"], h["epoch"]) for h in detector.history] == [(0, 0)] + [
        ((e + 1) * steps_per_epoch, e) for e in range(4)
    ]


def test_the_last_measurement_is_taken_at_the_end_of_training(tmp_path):
    detector, _ = _detector_with_monitors(tmp_path, 0, split_every=2, epochs=3)  # split/* lags at the last epoch
    steps_per_epoch = len(loader(NoisyTensorDataset()))
    assert [(h["step"], h["epoch"]) for h in detector.history] == [(0, 0)] + [
        ((e + 1) * steps_per_epoch, e) for e in range(3)
    ]


@pytest.mark.parametrize(
    "position,order_kw,checkpoint_kw,first_kw",
    [
        (
            0,
            {},
            dict(every_n_epochs=1, save_on_train_epoch_end=True),
            dict(epochs=2),
        ),  # saved before the detector took it
        (0, dict(every_n_steps=5), dict(every_n_train_steps=5), dict(max_steps=15)),
        (
            2,
            dict(every_n_steps=5),
            dict(every_n_train_steps=5),
            dict(max_steps=15),
        ),  # split/* on another schedule: waiting
    ],
)
def test_resume_takes_a_measurement_that_was_waiting(tmp_path, position, order_kw, checkpoint_kw, first_kw):
    whole, _ = _detector_with_monitors(tmp_path / "whole", position, order_kw=order_kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, save_top_k=-1, **checkpoint_kw)
    first_kw = dict(first_kw)
    _detector_with_monitors(
        tmp_path / "first",
        position,
        order_kw=order_kw,
        extra=[ckpt],
        enable_checkpointing=True,
        epochs=first_kw.pop("epochs", 3),
        **first_kw,
    )
    resumed, _ = _detector_with_monitors(
        tmp_path / "resumed", position, order_kw=order_kw, fit_kw=dict(ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    )
    # every measurement once, at its step and epoch (the statistics after a resume differ: the data order does)
    assert [(h["step"], h["epoch"]) for h in resumed.history] == [(h["step"], h["epoch"]) for h in whole.history]


def test_checkpoints_without_the_taken_step_still_resume():
    detector = PhaseDetector(verbose=False)
    detector.load_state_dict({"tracker": {}, "seen": {"order/measured_step": 24.0, "split/measured_step": 12.0}})
    assert (
        detector._new_measurement(
            {"order/measured_step": torch.tensor(24.0), "split/measured_step": torch.tensor(24.0)}, False
        )
        is None
    )
    assert (
        detector._new_measurement(
            {"order/measured_step": torch.tensor(36.0), "split/measured_step": torch.tensor(36.0)}, False
        )
        == 36
    )


class _CountedStep:
    """A published ``measured_step`` that counts how often it is read (``float``)."""

    def __init__(self, value: float) -> None:
        self.value, self.reads = value, 0

    def __float__(self) -> float:
        self.reads += 1
        return self.value


def test_polls_read_the_published_steps_only_after_a_new_publication():
    detector = PhaseDetector(verbose=False)
    order, split = _CountedStep(24.0), _CountedStep(24.0)
    metrics = {"order/measured_step": order, "split/measured_step": split}
    assert detector._new_measurement(metrics, False) == 24
    assert detector._new_measurement(metrics, False) is None  # taken: read once more, found nothing new
    reads = (order.reads, split.reads)
    for _ in range(5):  # the hooks between measurements: nothing is read
        assert detector._new_measurement(metrics, False) is None
    assert (order.reads, split.reads) == reads
    # a new publication (new objects, as `publish` makes) is read and taken, once the slower provider caught up
    metrics["order/measured_step"] = _CountedStep(36.0)
    assert detector._new_measurement(metrics, False) is None  # the split tracker is behind: wait one hook
    assert detector._new_measurement(metrics, False) == 36  # taken with what has been published
    assert detector._new_measurement(metrics, False) is None
    # the same value published again (new objects) is not taken twice
    metrics = {"order/measured_step": _CountedStep(36.0), "split/measured_step": _CountedStep(36.0)}
    assert detector._new_measurement(metrics, False) is None
    detector.load_state_dict(detector.state_dict())  # a resume forgets the objects, not the taken step
    assert detector._new_measurement(metrics, False) is None
    metrics["split/measured_step"] = _CountedStep(48.0)
    metrics["order/measured_step"] = _CountedStep(48.0)
    assert detector._new_measurement(metrics, False) == 48


def test_setup_names_the_missing_callback(tmp_path):
    with pytest.raises(LightningPhasesError, match="Add OrderParameterMonitor"):
        tr = trainer(tmp_path, [PhaseDetector()], max_epochs=1)
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset()))
    with pytest.raises(LightningPhasesError, match="NoiseSplitTracker"):
        tr = trainer(
            tmp_path, [OrderParameterMonitor(every_n_epochs=1, probe_size=32), PhaseDetector("four")], max_epochs=1
        )
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset()))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(model="six"), "model must be one of"),
        (dict(patience=0), "patience"),
        (dict(smoothing=2.0), "smoothing"),
        (dict(stop="no"), "stop must be True or False"),
        (dict(average_weights=1), "average_weights"),
        (dict(activity_drop=5.0), "activity_drop"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(LightningPhasesError, match=match):
        PhaseDetector(**kwargs)


def test_a_misspelt_threshold_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="memorized"):  # explicit keyword arguments: Python names the stray one
        PhaseDetector(memorized=0.1)


# ---------------------------------------------------------------------- explicit signature

THRESHOLDS = (
    "r_explore",
    "sigma2_explore",
    "balance",
    "r_cw_oppose",
    "r_cw_align",
    "memorised",
    "activity_drop",
    "segment_end",
    "gap_plateau",
    "memorisation_drop",
)


def test_the_thresholds_are_explicit_keywords_with_the_trackers_defaults():
    import inspect
    import typing

    from lightning_phases.functional import PhaseTracker

    params = inspect.signature(PhaseDetector).parameters
    tracker = inspect.signature(PhaseTracker).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in (*THRESHOLDS, "smoothing", "patience"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == tracker[name].default
    assert typing.get_args(typing.get_type_hints(PhaseDetector.__init__)["model"]) == ("auto", "two", "four")
    detector = PhaseDetector(memorised=0.1, gap_plateau=0.05)
    assert detector.tracker.thresholds.memorised == 0.1 and detector.tracker.gap_plateau == 0.05


def test_jsonargparse_sets_a_threshold_from_the_command_line_and_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PhaseDetector, "detector")
    init = parser.instantiate_classes(parser.parse_args(["--detector.memorised=0.1", "--detector.model=four"]))
    assert init.detector.tracker.thresholds.memorised == 0.1 and init.detector.model == "four"
    init = parser.instantiate_classes(parser.parse_string("detector:\n  r_explore: 0.2\n  stop: true\n"))
    assert init.detector.tracker.thresholds.r_explore == 0.2 and init.detector.stop is True
    with pytest.raises(Exception, match="model"):
        parser.parse_args(["--detector.model=six"])  # the Literal is checked by the parser


def test_lightning_cli_configures_the_detector(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    cli = LightningCLI(
        TinyClassifier,
        run=False,
        save_config_callback=None,
        args=[
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=lightning_phases.PhaseDetector",
            "--trainer.callbacks.balance=3.0",
            "--trainer.callbacks.verbose=false",
        ],
    )
    (detector,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, PhaseDetector)]
    assert detector.tracker.thresholds.balance == 3.0 and detector.verbose is False


@pytest.mark.parametrize(
    "kwargs", [dict(strict="yes"), dict(verbose="no"), dict(save_checkpoint="no"), dict(average_weights="false")]
)
def test_strings_for_flags_are_refused(kwargs):
    with pytest.raises(LightningPhasesError, match="must be True or False") as info:
        PhaseDetector(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


# ---------------------------------------------------------------------- never ending the run


def _fit_warned(tmp_path, detector, *, epochs, recorded=None, **kwargs):
    series_, _ = _four_phase_series(lengths=(6, 6, 6, 6))
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, [SeriesProvider(recorded or series_), detector], max_epochs=epochs, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset()))
    return tr, [str(w.message) for w in caught if "PhaseDetector" in str(w.message)]


def test_a_failed_checkpoint_write_warns_keeps_the_old_file_and_still_stops(tmp_path, monkeypatch):
    import lightning_phases._io as io_module

    (tmp_path / "phase_recommended.ckpt").write_bytes(b"old checkpoint")

    def refuse(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(io_module.os, "replace", refuse)
    detector = PhaseDetector(smoothing=1.0, patience=1, stop=True, save_checkpoint=True, verbose=False)
    tr, warned = _fit_warned(tmp_path, detector, epochs=24)
    assert tr.current_epoch == 13 and detector.recommended.epoch == 12  # the decision was taken all the same
    assert len(warned) == 1 and "phase_recommended.ckpt" in warned[0] and "Read-only" in warned[0]
    assert (tmp_path / "phase_recommended.ckpt").read_bytes() == b"old checkpoint"
    assert detector.recommended_checkpoint is None and detector.recommended_state_dict is not None
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert detector.skipped == 1 and series(tr.loggers[0].records, "phase/skipped") == [(13 * 12, 1.0)]


def test_the_checkpoint_replaces_an_old_one_whole(tmp_path):
    (tmp_path / "phase_recommended.ckpt").write_bytes(b"stale")
    detector = PhaseDetector(smoothing=1.0, patience=1, stop=True, save_checkpoint=True, verbose=False)
    _, warned = _fit_warned(tmp_path, detector, epochs=24)
    assert not warned and detector.recommended_checkpoint == str(tmp_path / "phase_recommended.ckpt")
    kept = torch.load(detector.recommended_checkpoint, weights_only=False)["state_dict"]
    assert all(torch.equal(v, detector.recommended_state_dict[k]) for k, v in kept.items())


def test_a_log_dir_below_a_regular_file_warns_and_training_goes_on(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    detector = PhaseDetector(smoothing=1.0, patience=1, save_checkpoint=True, verbose=False)
    series_, _ = _four_phase_series(lengths=(6, 6, 6, 6))
    pl.seed_everything(0, verbose=False)
    tr = pl.Trainer(
        default_root_dir=blocker / "logs",
        max_epochs=16,
        accelerator="cpu",
        logger=False,
        callbacks=[SeriesProvider(series_), detector],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset()))
    warned = [str(w.message) for w in caught if "PhaseDetector" in str(w.message)]
    assert tr.current_epoch == 16 and detector.recommended.epoch == 12 and detector.recommended_checkpoint is None
    assert len(warned) == 1 and "phase_recommended.ckpt" in warned[0] and blocker.read_text() == "not a directory"


def test_unreadable_statistics_warn_once_and_training_goes_on(tmp_path):
    recorded, _ = _four_phase_series(lengths=(6, 6, 6, 6))
    recorded = [dict(r) for r in recorded]
    for r in recorded[3:6]:
        r["order/R"] = [0.1, 0.2]  # a provider publishing a vector where a number is expected
    detector = PhaseDetector(smoothing=1.0, patience=1, verbose=False)
    tr, warned = _fit_warned(tmp_path, detector, epochs=24, recorded=recorded)
    assert tr.current_epoch == 24 and detector.skipped == 3 and len(warned) == 1
    assert "published statistics" in warned[0] and "training goes on" in warned[0]
    assert detector.tracker.num_measurements == 21 and detector.recommended is not None


# ---------------------------------------------------------------------- lifecycle


def test_a_reused_detector_starts_fresh(tmp_path):
    detector = PhaseDetector(smoothing=1.0, patience=1, verbose=False)
    _fit(tmp_path / "a", detector, epochs=24)
    assert detector.recommended is not None and detector.recommended_state_dict is not None
    tr, _, _ = _fit(tmp_path / "b", detector, epochs=4)  # another run: only its own four measurements
    assert [h["epoch"] for h in detector.history] == [0, 1, 2, 3] and detector.phase == "I"
    assert detector.recommended is None and detector.recommended_state_dict is None and not detector.transitions
    fresh = PhaseDetector(smoothing=1.0, patience=1, verbose=False)
    _fit(tmp_path / "c", fresh, epochs=4)
    assert fresh.tracker.state_dict() == detector.tracker.state_dict()


def test_the_same_detector_resumed_from_a_checkpoint_continues(tmp_path):
    whole = PhaseDetector(smoothing=1.0, patience=1, verbose=False)
    _fit(tmp_path / "w", whole, epochs=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_epochs=1, save_on_train_epoch_end=True)
    detector = PhaseDetector(smoothing=1.0, patience=1, verbose=False)
    _fit(tmp_path / "a", detector, epochs=8, extra=[ckpt], enable_checkpointing=True)
    recorded, _ = _four_phase_series(lengths=(6, 6, 6, 6))
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path / "b", [SeriesProvider(recorded), detector], max_epochs=16, enable_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(TinyClassifier(), loader(NoisyTensorDataset()), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert detector.history == whole.history and detector.transitions == whole.transitions


# ---------------------------------------------------------------------- both namespaces


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_both_lightning_namespaces(tmp_path, namespace):
    import importlib

    from lightning_phases._lightning import Callback

    ns = importlib.import_module(namespace)
    recorded, truth = _four_phase_series(lengths=(6, 6, 6, 6))

    class Provider(Callback):  # the package's Callback base: accepted by either Trainer
        phase_metrics = SeriesProvider.phase_metrics

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            # the recorded series is by PhaseTracker (SPEC) name; the monitors publish the registry keys
            stats = {keys.TRACKER_STATISTICS.get(k, k): v for k, v in recorded[trainer.current_epoch].items()}
            stats["order/measured_step"] = float(trainer.global_step)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in stats.items()})

    class Tiny(ns.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(6, 3)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    detector = PhaseDetector(smoothing=1.0, patience=1, stop=True, save_checkpoint=True, verbose=False)
    tr = ns.Trainer(
        default_root_dir=tmp_path,
        max_epochs=24,
        accelerator="cpu",
        logger=False,
        callbacks=[Provider(), detector],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(Tiny(), loader(NoisyTensorDataset()))
    assert [h["phase"] for h in detector.history] == truth[:13] and tr.current_epoch == 13
    assert detector.recommended.epoch == 12 and os.path.exists(detector.recommended_checkpoint)


@pytest.mark.parametrize("epochs,noted", [(3, True), (4, False)])
def test_a_run_with_too_few_measurements_says_so_at_the_end(tmp_path, caplog, epochs, noted):
    """patience 2: fewer than 4 measurements cannot hold phase II's start and end; the note names the fix."""
    detector = PhaseDetector(patience=2, verbose=False)
    with caplog.at_level("INFO"):
        _fit(tmp_path, detector, epochs=epochs)
    assert detector.tracker.num_measurements == epochs and detector.recommended is None
    notes = [r.getMessage() for r in caplog.records if "fewer than the 4 (2 x patience)" in r.getMessage()]
    assert len(notes) == (1 if noted else 0)
    if noted:
        assert f"PhaseDetector: {epochs} measurement(s) in this run" in notes[0]
        assert "every_n_epochs=1" in notes[0] and "overhead=" in notes[0]
