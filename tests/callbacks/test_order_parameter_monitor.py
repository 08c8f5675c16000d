"""OrderParameterMonitor and NoiseSplitTracker inside a real Trainer: values, schedule, safety, resume, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_phases import NoiseSplitTracker, OrderParameterMonitor
from lightning_phases.callbacks._monitor import should_measure
from lightning_phases.callbacks.probe import partition_parameters
from lightning_phases.errors import LightningPhasesError, ParameterSelectionError
from lightning_phases.functional import (
    derived_seed,
    effective_dimension,
    gradient_gram,
    make_generator,
    noise_spectrum,
    order_parameters,
    segment_statistics,
    single_logit_loss,
    split_order_parameters,
)
from tests.callbacks.helpers import (
    NoisyTensorDataset,
    PlainDataset,
    TinyClassifier,
    loader,
    series,
    trainer,
)


def _fit(tmp_path, callbacks, *, dataset=None, max_epochs=2, seed=0, model=None, **kwargs):
    pl.seed_everything(seed, verbose=False)
    model = model or TinyClassifier(dropout=kwargs.pop("dropout", 0.0))
    tr = trainer(tmp_path, callbacks, max_epochs=max_epochs, **kwargs)
    tr.fit(model, loader(dataset or NoisyTensorDataset()))
    return tr, model


def test_the_two_monitors_share_one_gram_per_measurement(tmp_path):
    from lightning_phases import Probe

    ds = NoisyTensorDataset()
    alone = NoiseSplitTracker(every_n_epochs=1, probe_size=64, seed=3)
    _fit(tmp_path / "alone", [alone], dataset=ds)
    assert alone.probe.num_gram_computations == 3  # start + 2 epochs
    probe = Probe(probe_size=64, seed=3)
    both = [OrderParameterMonitor(every_n_epochs=1, probe=probe), NoiseSplitTracker(every_n_epochs=1, probe=probe)]
    _fit(tmp_path / "both", both, dataset=ds)
    assert both[0].num_measurements == both[1].num_measurements == 3
    assert probe.num_gram_computations == 3 and probe.num_loss_computations == 3  # one per step for both
    assert both[1].last == alone.last  # bit-identical statistics
    separate = [
        OrderParameterMonitor(every_n_epochs=1, probe_size=64, seed=3),
        NoiseSplitTracker(every_n_epochs=1, probe_size=64, seed=3),
    ]
    _fit(tmp_path / "separate", separate, dataset=ds)
    # without probe=, monitors with equal probe settings adopt one probe for the fit: one Gram per step
    assert separate[0].probe is separate[1].probe and separate[0].budget is separate[1].budget
    assert separate[0].probe.num_gram_computations == 3
    assert separate[1].last == alone.last and separate[0].last == both[0].last
    # other probe settings (here the seed): each monitor keeps its own probe and schedule
    other = [
        OrderParameterMonitor(every_n_epochs=1, probe_size=64, seed=3),
        NoiseSplitTracker(every_n_epochs=1, probe_size=64, seed=4),
    ]
    _fit(tmp_path / "other", other, dataset=ds)
    assert other[0].probe is not other[1].probe and other[0].budget is not other[1].budget
    assert other[0].probe.num_gram_computations == other[1].probe.num_gram_computations == 3
    assert other[0].last == both[0].last


def test_logged_values_equal_the_functional_computation(tmp_path):
    ds = NoisyTensorDataset()
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=64, seed=3)
    split = NoiseSplitTracker(every_n_epochs=1, probe_size=64, seed=3)
    tr, model = _fit(tmp_path, [mon, split], dataset=ds)
    idx = mon.probe_indices
    assert torch.equal(idx, split.probe_indices) and idx.numel() == 64 and len(set(idx.tolist())) == 64
    x, y = ds.x[idx], ds.noisy_targets[idx]
    gram, losses = gradient_gram(model, x, y, method="vmap")  # independent engine
    op = order_parameters(gram, 8, generator=make_generator(derived_seed(3, f"R_minibatches/{tr.global_step}")))
    for key, value in op.as_dict().items():
        assert mon.last[f"order/{key}"] == pytest.approx(value, rel=1e-4, abs=1e-8), key
    spectrum = noise_spectrum(gram, 8)
    assert mon.last["order/D_s"] == effective_dimension(spectrum, 0.9)
    assert mon.last["order/loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
    err = float((model(x).argmax(1) != y).float().mean())
    assert mon.last["order/error"] == pytest.approx(err)
    mask = ds.is_noisy[idx]
    ref = split_order_parameters(gram, mask, 8)
    for key, value in ref.as_dict().items():
        assert split.last[f"split/{key}"] == pytest.approx(value, rel=1e-4, abs=1e-8), key
    assert split.last["split/L_w"] == pytest.approx(float(losses[mask].mean()), rel=1e-5)
    assert split.last["split/mask_estimated"] == 0.0 and split.mask_source == "ground_truth"
    # segments: the n×n single-logit Gram of the independent vmap engine, summed block by block
    pair = torch.stack([y, ds.true_targets[idx]], 1)
    seg_gram, _ = gradient_gram(model, x, pair, loss_fn=single_logit_loss, method="vmap")
    seg = segment_statistics(seg_gram, ds.true_targets[idx], mask)
    for k, c in enumerate(seg.classes.tolist()):
        assert split.last[f"segment/ratio/{c}"] == pytest.approx(float(seg.ratio[k]), rel=1e-4)
        assert split.last[f"segment/cos/{c}"] == pytest.approx(float(seg.cos[k]), rel=1e-4, abs=1e-6)
    # the same numbers went to the logger and into callback_metrics
    logged = dict(tr.loggers[0].records[-1][1]) | dict(tr.loggers[0].records[-2][1])
    assert logged["order/A"] == pytest.approx(mon.last["order/A"])
    assert float(tr.callback_metrics["split/R_cw"]) == pytest.approx(split.last["split/R_cw"], rel=1e-6)


def test_training_is_bit_identical_with_and_without_the_callbacks(tmp_path):
    kwargs = dict(dataset=NoisyTensorDataset(), max_epochs=3, dropout=0.3)
    _, plain = _fit(tmp_path / "a", [], **kwargs)
    callbacks = [
        OrderParameterMonitor(every_n_epochs=1, probe_size=40),
        NoiseSplitTracker(probe_size=40, every_n_steps=5),
    ]
    _, probed = _fit(tmp_path / "b", callbacks, **kwargs)
    for (name, p), q in zip(plain.named_parameters(), probed.parameters()):
        assert torch.equal(p, q), name
    assert callbacks[0].num_measurements == 4 and callbacks[1].num_measurements == 1 + 36 // 5


def test_schedule_every_n_steps_and_epochs(tmp_path):
    ds = NoisyTensorDataset()  # 96 samples, batch 8: 12 steps per epoch
    steps = OrderParameterMonitor(probe_size=32, every_n_steps=5, measure_at_start=False)
    epochs = OrderParameterMonitor(probe_size=32, every_n_epochs=2, seed=1)
    tr, _ = _fit(tmp_path, [steps, epochs], dataset=ds, max_epochs=4)
    recs = tr.loggers[0].records
    measured = sorted({step for step, m in recs if "order/A" in m})
    assert measured == sorted({5, 10, 15, 20, 25, 30, 35, 40, 45} | {0, 24, 48})
    assert should_measure(global_step=10, epoch_end=None, every_n_steps=5, every_n_epochs=None)
    assert not should_measure(global_step=0, epoch_end=None, every_n_steps=5, every_n_epochs=None)
    assert should_measure(global_step=7, epoch_end=1, every_n_steps=None, every_n_epochs=2)
    assert not should_measure(global_step=7, epoch_end=0, every_n_steps=None, every_n_epochs=2)


def test_failure_warns_once_skips_and_training_continues(tmp_path):
    def broken_loss(out, target):
        raise RuntimeError("boom")

    kwargs = dict(dataset=NoisyTensorDataset(), max_epochs=3)
    _, plain = _fit(tmp_path / "a", [], **kwargs)
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=32, loss_fn=broken_loss)
    with pytest.warns(RuntimeWarning, match="skipped the measurement") as record:
        tr, model = _fit(tmp_path / "b", [mon], **kwargs)
    assert sum("skipped the measurement" in str(w.message) for w in record) == 1
    assert mon.num_failures == 4
    assert series(tr.loggers[0].records, "order/skipped")[-1][1] == 4.0
    assert not any("order/A" in m for _, m in tr.loggers[0].records)
    for p, q in zip(plain.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_nan_gradients_are_skipped(tmp_path):
    def nan_loss(out, target):
        return torch.nn.functional.cross_entropy(out.unsqueeze(0), target.unsqueeze(0)) * float("nan")

    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=32, loss_fn=nan_loss)
    with pytest.warns(RuntimeWarning, match="NaN"):
        _fit(tmp_path, [mon], max_epochs=1)
    assert mon.num_failures == 2 and mon.last == {}


def test_estimated_mask_without_ground_truth(tmp_path):
    inner = NoisyTensorDataset(rate=0.4)
    split = NoiseSplitTracker(every_n_epochs=1, probe_size=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr, _ = _fit(tmp_path, [split], dataset=PlainDataset(inner), max_epochs=6)
    assert split.mask_source == "estimated"
    assert split.last["split/mask_estimated"] == 1.0
    assert not any(k.startswith("segment/") for k in split.last)
    assert 0 < split.last["split/rho"] < 1


def test_user_given_mask(tmp_path):
    ds = NoisyTensorDataset()
    split = NoiseSplitTracker(every_n_epochs=1, probe_size=50, noisy_mask=ds.is_noisy, true_targets=ds.true_targets)
    _fit(tmp_path, [split], dataset=PlainDataset(ds), max_epochs=1)
    assert split.mask_source == "user" and "segment/ratio" in split.last
    assert split.last["split/rho"] == pytest.approx(float(ds.is_noisy[split.probe_indices].float().mean()))


def test_resume_continues_without_gap_or_duplicate(tmp_path):
    ds = NoisyTensorDataset()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=40, seed=5)
    _fit(tmp_path / "first", [mon, ckpt], dataset=ds, max_epochs=2, enable_checkpointing=True)
    first_probe = mon.probe_indices.clone()
    resumed = OrderParameterMonitor(every_n_epochs=1, probe_size=40, seed=5)
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path / "second", [resumed], max_epochs=4, enable_checkpointing=True)
    tr.fit(TinyClassifier(), loader(ds), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(resumed.probe_indices, first_probe)
    assert resumed.num_measurements == 5  # 3 before the checkpoint + 2 after
    steps = [step for step, m in tr.loggers[0].records if "order/A" in m]
    assert steps == [36, 48]  # epochs 3 and 4; no start measurement, no duplicate of step 24


def test_state_dict_round_trip_and_defaults():
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=10)
    mon.probe_indices = torch.tensor([1, 4, 7])
    mon.last_measured_step = 12
    mon.num_measurements = 3
    other = OrderParameterMonitor(every_n_epochs=1, probe_size=10)
    other.load_state_dict(mon.state_dict())
    assert torch.equal(other.probe_indices, mon.probe_indices) and other.last_measured_step == 12
    fresh = OrderParameterMonitor(every_n_epochs=1, probe_size=10)
    fresh.load_state_dict({})  # an old checkpoint without our keys still loads
    assert fresh.probe_indices is None and fresh.last_measured_step == -1
    assert (
        OrderParameterMonitor(every_n_epochs=1, probe_size=10).state_key
        != OrderParameterMonitor(every_n_epochs=1, probe_size=11).state_key
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(probe_size=1), "probe_size must be an int >= 2"),
        (dict(probe_size=16, batch_size=32), "batch_size=32 is larger than probe_size=16"),
        (dict(every_n_epochs=1, every_n_steps=3), "only one of"),
        (dict(every_n_epochs=0), "every_n_epochs must be"),
        (dict(method="fast"), "method must be one of"),
        (dict(spectrum_fraction=0.0), "spectrum_fraction"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(LightningPhasesError, match=match):
        OrderParameterMonitor(**kwargs)


def test_errors_in_setup_and_at_start(tmp_path):
    with pytest.raises(LightningPhasesError, match="has none"):
        _fit(tmp_path, [OrderParameterMonitor(every_n_epochs=1)], logger=False)
    with pytest.raises(ParameterSelectionError, match="nope"):
        _fit(tmp_path, [OrderParameterMonitor(every_n_epochs=1, params=["nope"])])
    with pytest.raises(LightningPhasesError, match="no ground truth"):
        _fit(
            tmp_path,
            [NoiseSplitTracker(every_n_epochs=1, require_ground_truth=True)],
            dataset=PlainDataset(NoisyTensorDataset()),
        )
    with pytest.raises(LightningPhasesError, match="B=8 is larger than the probe set"):
        _fit(tmp_path, [OrderParameterMonitor(every_n_epochs=1, probe_size=4)])
    with pytest.raises(LightningPhasesError, match="noisy_mask has 5 entries"):
        _fit(tmp_path, [NoiseSplitTracker(every_n_epochs=1, noisy_mask=torch.zeros(5, dtype=torch.bool))])
    with pytest.raises(LightningPhasesError, match="without noisy_mask"):
        NoiseSplitTracker(every_n_epochs=1, true_targets=torch.zeros(5))


def test_partition_parameters_is_balanced_and_complete():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 1}
    groups = partition_parameters(sizes, 2)
    assert sorted(sum(groups, [])) == sorted(sizes)
    loads = [sum(sizes[n] for n in g) for g in groups]
    assert max(loads) - min(loads) <= 11
    assert partition_parameters(sizes, 8)[5:] == [[], [], []]


class _OneLogit(TinyClassifier):
    """A one-output (logistic) classifier: the tracker's segments reuse its main Gram matrix."""

    def __init__(self) -> None:
        super().__init__(num_classes=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(self(x).squeeze(1), y.float())


def test_one_output_segments_equal_the_block_sums_of_an_independent_gram(tmp_path):
    ds = NoisyTensorDataset(num_classes=2, rate=0.3)
    split = NoiseSplitTracker(every_n_epochs=1, probe_size=64, seed=3)
    _, model = _fit(tmp_path, [split], dataset=ds, model=_OneLogit())
    assert split.probe.task == "binary"
    idx = split.probe_indices
    x, y, true, mask = ds.x[idx], ds.noisy_targets[idx], ds.true_targets[idx], ds.is_noisy[idx]
    gram, _ = gradient_gram(model, x, y, method="vmap")  # logistic-loss per-sample gradients
    seg = segment_statistics(gram, true, mask)
    assert seg.classes.tolist() == [0, 1]
    for k, c in enumerate(seg.classes.tolist()):
        assert split.last[f"segment/ratio/{c}"] == pytest.approx(float(seg.ratio[k]), rel=1e-4)
        assert split.last[f"segment/cos/{c}"] == pytest.approx(float(seg.cos[k]), rel=1e-4, abs=1e-6)


def test_the_default_schedule_is_the_overhead_budget(tmp_path):
    """No schedule given: measure at the start, then only as often as the budget allows; the overhead is logged."""
    ds = NoisyTensorDataset()
    tight = OrderParameterMonitor(probe_size=64, seed=3, overhead=1e-6)  # nothing after the start is affordable
    _fit(tmp_path / "tight", [tight], dataset=ds, max_epochs=3)
    assert tight.budget.budgeted and tight.num_measurements == 1 and tight.last_measured_step == 0
    loose = OrderParameterMonitor(probe_size=64, seed=3, overhead=1e6)  # any spacing is affordable
    tr, _ = _fit(tmp_path / "loose", [loose], dataset=ds, max_epochs=3)
    # 12 steps per epoch: the start, then geometric spacing (next at >= 1.1 x last, at least one step later)
    steps = [0]
    while True:
        nxt = max(steps[-1] + 1, math.ceil(1.1 * steps[-1]))
        if nxt > 36:
            break
        steps.append(nxt)
    assert loose.num_measurements == len(steps) and loose.last_measured_step == steps[-1]
    overhead = float(tr.callback_metrics["order/overhead"])
    assert overhead > 0 and math.isclose(overhead, loose.budget.overhead, rel_tol=0.5)
    fixed = OrderParameterMonitor(probe_size=64, seed=3, every_n_epochs=1)
    _fit(tmp_path / "fixed", [fixed], dataset=ds, max_epochs=3)
    assert not fixed.budget.budgeted and fixed.num_measurements == 4  # start + 3 epochs
