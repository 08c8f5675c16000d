"""NoiseSplitTracker: seeds of any size, tasks without class targets, flags, prefixes, a shared Probe."""

from __future__ import annotations

import time
import warnings

import pytest
import pytorch_lightning as pl
import torch

from lightning_phases import NoiseSplitTracker, OrderParameterMonitor, Probe
from lightning_phases.callbacks.model_adapter import regression_loss
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional import gradient_gram, split_order_parameters
from tests.callbacks.helpers import (
    MultiLabelClassifier,
    MultiLabelDataset,
    NoisyTensorDataset,
    PlainDataset,
    RegressionDataset,
    Regressor,
    TinyClassifier,
    loader,
    trainer,
)


def _fit(tmp_path, callbacks, model, dataset, *, max_epochs=1):
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, callbacks, max_epochs=max_epochs)
    tr.fit(model, loader(dataset))
    return tr


def test_seeds_of_any_size_work(tmp_path):
    big = 2**32
    split = NoiseSplitTracker(
        every_n_epochs=1, probe_size=48, seed=big
    )  # no ground truth: the loss mixture needs a 32-bit seed
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=48, seed=time.time_ns())  # R's minibatches: a derived seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(tmp_path, [split, mon], TinyClassifier(), PlainDataset(NoisyTensorDataset()))
    assert split.num_failures == 0 and mon.num_failures == 0
    assert split.last["split/mask_estimated"] == 1.0 and 0 < split.last["split/rho"] < 1
    assert "order/R" in mon.last
    with pytest.raises(LightningPhasesError, match="seed must be a non-negative int; got -1"):
        NoiseSplitTracker(every_n_epochs=1, seed=-1)


@pytest.mark.parametrize("flag", ["segments", "require_ground_truth", "measure_at_start"])
def test_boolean_flags_refuse_strings(flag):
    with pytest.raises(LightningPhasesError, match=f"{flag} must be True or False; got 'no'"):
        NoiseSplitTracker(**{flag: "no"})


def test_regression_split_with_a_user_mask_skips_the_segments_with_one_note(tmp_path):
    ds = RegressionDataset(n=64)
    noisy = torch.zeros(64, dtype=torch.bool)
    noisy[::4] = True
    split = NoiseSplitTracker(every_n_epochs=1, probe_size=48, noisy_mask=noisy, true_targets=torch.zeros(64))
    model = Regressor()
    with pytest.warns(RuntimeWarning, match="no segment gradients for task 'regression'") as record:
        tr = _fit(tmp_path, [split], model, ds, max_epochs=2)
    assert sum("segment gradients" in str(w.message) for w in record) == 1
    assert split.num_failures == 0 and split.num_measurements == 3
    idx = split.probe_indices
    gram, losses = gradient_gram(model, ds.x[idx], ds.y[idx], loss_fn=regression_loss, method="vmap")
    mask = noisy[idx]
    ref = split_order_parameters(gram, mask, 8)
    for key, value in ref.as_dict().items():
        assert split.last[f"split/{key}"] == pytest.approx(value, rel=1e-4, abs=1e-8), key
    assert split.last["split/L_w"] == pytest.approx(float(losses[mask].mean()), rel=1e-5)
    assert not any(k.startswith(("segment", "split/err")) for k in split.last)
    assert "split/err_w" not in tr.callback_metrics


def test_multilabel_error_rates_are_per_label(tmp_path):
    ds = MultiLabelDataset(n=64)
    noisy = torch.zeros(64, dtype=torch.bool)
    noisy[1::3] = True
    split = NoiseSplitTracker(every_n_epochs=1, probe_size=48, noisy_mask=noisy)
    model = MultiLabelClassifier()
    _fit(tmp_path, [split], model, ds)
    idx = split.probe_indices
    wrong = ((model(ds.x[idx]) > 0).float() != ds.y[idx]).float().mean(1)
    mask = noisy[idx]
    assert split.last["split/err_w"] == pytest.approx(float(wrong[mask].mean()))
    assert split.last["split/err_c"] == pytest.approx(float(wrong[~mask].mean()))


def test_prefix_and_the_segment_keys_that_follow_it(tmp_path):
    ds = NoisyTensorDataset()
    probe = Probe(probe_size=48, seed=1)
    default = NoiseSplitTracker(every_n_epochs=1, probe=probe)
    other = NoiseSplitTracker(every_n_epochs=1, probe=probe, prefix="split_b")
    assert default.state_key != other.state_key
    tr = _fit(tmp_path, [default, other], TinyClassifier(), ds)
    assert probe.num_gram_computations == 2  # start and one epoch, shared by both trackers
    renamed = {k.replace("split_b/", "split/").replace("segment_b/", "segment/"): v for k, v in other.last.items()}
    assert renamed == default.last and "segment_b/ratio" in other.last
    assert "segment_b/ratio" in tr.callback_metrics
