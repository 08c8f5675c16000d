"""Probe and its model adapter inside a real Trainer: each logged value against the functional API on an explicit batch."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Sampler, SubsetRandomSampler, TensorDataset

from lightning_phases import NoiseSplitTracker, OrderParameterMonitor, Probe
from lightning_phases.callbacks.model_adapter import ModelAdapter, multilabel_loss, regression_loss
from lightning_phases.data import NoisyLabelDataset
from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional import (
    derived_seed,
    gradient_gram,
    make_generator,
    order_parameters,
)
from tests.callbacks.helpers import (
    BackboneOnly,
    DictInputDictOutputClassifier,
    MaskedMeanClassifier,
    MultiLabelClassifier,
    MultiLabelDataset,
    NoisyTensorDataset,
    RegressionDataset,
    Regressor,
    SequenceDataset,
    TinyClassifier,
    TwoInputClassifier,
    loader,
    pad_collate,
    trainer,
)

B = 8


def _fit(tmp_path, callbacks, model, train_loader, *, max_epochs=1, **kwargs):
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path, callbacks, max_epochs=max_epochs, **kwargs)
    tr.fit(model, train_loader)
    return tr


def _reference(mon, tr, model, x, y, *, loss_fn=None, forward=None, params=None, rel=1e-4):
    """The monitor's last statistics against gradient_gram (vmap engine) on the explicit batch."""
    gram, losses = gradient_gram(model, x, y, loss_fn=loss_fn, forward=forward, params=params, method="vmap")
    gen = make_generator(derived_seed(mon.seed, f"R_minibatches/{tr.global_step}"))
    op = order_parameters(gram, B, generator=gen)
    for key, value in op.as_dict().items():
        assert mon.last[mon.key(key)] == pytest.approx(value, rel=rel, abs=1e-8), key
    assert mon.last[mon.key("loss")] == pytest.approx(float(losses.mean()), rel=rel)
    return gram, losses


def test_tuple_inputs_are_passed_positionally(tmp_path):
    gen = torch.Generator().manual_seed(0)
    a, b, y = torch.randn(48, 4, generator=gen), torch.randn(48, 2, generator=gen), torch.arange(48) % 3
    ds = [((a[i], b[i]), y[i]) for i in range(48)]
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=32)
    model = TwoInputClassifier()
    tr = _fit(tmp_path, [mon], model, DataLoader(ds, batch_size=B, shuffle=True))
    idx = mon.probe_indices
    _reference(mon, tr, model, (a[idx], b[idx]), y[idx])
    err = float((model(a[idx], b[idx]).argmax(1) != y[idx]).float().mean())
    assert mon.last["order/error"] == pytest.approx(err)


def test_dict_batches_keyword_inputs_and_an_output_key(tmp_path):
    gen = torch.Generator().manual_seed(1)
    f, e, y = torch.randn(48, 6, generator=gen), torch.rand(48, 16, generator=gen), torch.arange(48) % 3
    ds = [{"inputs": {"features": f[i], "extra": e[i]}, "label": y[i]} for i in range(48)]
    mon = OrderParameterMonitor(
        every_n_epochs=1, probe_size=32, unpack=lambda batch: (batch["inputs"], batch["label"]), output="logits"
    )
    model = DictInputDictOutputClassifier()
    tr = _fit(tmp_path, [mon], model, DataLoader(ds, batch_size=B, shuffle=True))
    idx = mon.probe_indices
    _reference(mon, tr, model, {"features": f[idx], "extra": e[idx]}, y[idx], forward=lambda m, x: m(**x)["logits"])
    # without the selector the dict output is refused (warn once, skipped), training goes on
    bad = OrderParameterMonitor(every_n_epochs=1, probe_size=32, unpack=lambda batch: (batch["inputs"], batch["label"]))
    with pytest.warns(RuntimeWarning, match="output="):
        _fit(tmp_path / "bad", [bad], DictInputDictOutputClassifier(), DataLoader(ds, batch_size=B))
    assert bad.num_failures == 2 and bad.last == {}


def test_custom_forward_for_a_module_without_forward_and_a_callable_output(tmp_path):
    ds = NoisyTensorDataset(n=48)
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=32, forward=lambda m, x: m.backbone(x))
    model = BackboneOnly()
    tr = _fit(tmp_path, [mon], model, loader(ds))
    idx = mon.probe_indices
    _reference(mon, tr, model, ds.x[idx], ds.noisy_targets[idx], forward=lambda m, x: m.backbone(x))
    # a submodule's output picked by a callable: the hidden layer's first three units as "logits"
    sub = OrderParameterMonitor(
        every_n_epochs=1, probe_size=32, forward=lambda m, x: (m.backbone(x), x), output=lambda out: out[0]
    )
    tr = _fit(tmp_path / "sub", [sub], BackboneOnly(), loader(ds))
    assert sub.last["order/A"] > 0 and sub.num_failures == 0


def test_padding_collate_fn_of_the_training_loader(tmp_path):
    ds = SequenceDataset(n=48)
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=32)
    model = MaskedMeanClassifier()
    tr = _fit(tmp_path, [mon], model, DataLoader(ds, batch_size=B, shuffle=True, collate_fn=pad_collate))
    assert mon.num_failures == 0
    (padded, mask), y = pad_collate([ds[int(i)] for i in mon.probe_indices])
    _reference(mon, tr, model, (padded, mask), y)


class _EveryThird(Sampler):
    """A sampler without ``indices``: serves 0, 3, 6, ... (iterated once by the probe)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(0, self.n, 3))

    def __len__(self) -> int:
        return len(range(0, self.n, 3))


def test_only_samples_the_sampler_serves_are_probed(tmp_path):
    ds = NoisyTensorDataset(n=96)
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=64)
    model = TinyClassifier()
    tr = _fit(tmp_path, [mon], model, DataLoader(ds, batch_size=B, sampler=SubsetRandomSampler(range(10, 50))))
    assert mon.probe_indices.tolist() == list(range(10, 50))  # only 40 are served: all of them, nothing else
    _reference(mon, tr, model, ds.x[mon.probe_indices], ds.noisy_targets[mon.probe_indices])
    third = OrderParameterMonitor(every_n_epochs=1, probe_size=16)
    _fit(tmp_path / "third", [third], TinyClassifier(), DataLoader(ds, batch_size=B, sampler=_EveryThird(96)))
    assert third.probe_indices.numel() == 16 and all(int(i) % 3 == 0 for i in third.probe_indices)
    batches = [list(range(k, k + B)) for k in range(40, 88, B)]  # a batch_sampler over 40..87
    bs = OrderParameterMonitor(every_n_epochs=1, probe_size=64, batch_size=B)  # a list of batches has no batch_size
    _fit(tmp_path / "bs", [bs], TinyClassifier(), DataLoader(ds, batch_sampler=batches))
    assert bs.probe_indices.tolist() == list(range(40, 88))


def test_regression_uses_the_squared_error_and_logs_no_error_rate(tmp_path):
    ds = RegressionDataset(n=48)
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=32)
    split = NoiseSplitTracker(every_n_epochs=1, probe_size=32)
    model = Regressor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = _fit(tmp_path, [mon, split], model, loader(ds))
    assert mon.probe.task == "regression" and split.probe.task == "regression"
    idx = mon.probe_indices
    x, y = ds.x[idx], ds.y[idx]
    _, losses = _reference(mon, tr, model, x, y, loss_fn=regression_loss)
    mse = ((model(x).reshape(-1) - y) ** 2).detach()  # the squared error, computed directly
    assert mon.last["order/loss"] == pytest.approx(float(mse.mean()), rel=1e-5) and mon.last["order/loss"] >= 0
    assert "order/error" not in mon.last and "order/error" not in tr.callback_metrics
    assert not any(k.startswith("split/err") for k in split.last)
    assert "split/L_c" in split.last  # the split statistics exist for every task (mask from the loss mixture)
    assert not any(k.startswith("segment/") for k in split.last)


def test_multilabel_sums_bce_over_labels_and_logs_the_per_label_error(tmp_path):
    ds = MultiLabelDataset(n=48)
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=32)
    model = MultiLabelClassifier()
    tr = _fit(tmp_path, [mon], model, loader(ds))
    assert mon.probe.task == "multilabel"
    idx = mon.probe_indices
    x, y = ds.x[idx], ds.y[idx]
    _reference(mon, tr, model, x, y, loss_fn=multilabel_loss)
    out = model(x).detach()
    bce = nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none").sum(1)
    assert mon.last["order/loss"] == pytest.approx(float(bce.mean()), rel=1e-5)
    assert mon.last["order/error"] == pytest.approx(float(((out > 0).float() != y).float().mean()))


@pytest.mark.parametrize("precision,dtype", [("64-true", torch.float64), ("bf16-true", torch.bfloat16)])
def test_true_precision_casts_floating_inputs(tmp_path, precision, dtype):
    ds = NoisyTensorDataset(n=48)
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=32, method="vmap")
    model = TinyClassifier()
    tr = _fit(tmp_path, [mon], model, loader(ds), precision=precision)
    assert mon.num_failures == 0 and next(model.parameters()).dtype == dtype
    idx = mon.probe_indices
    x, y = ds.x[idx].to(dtype), ds.noisy_targets[idx]  # the targets stay integers
    _reference(mon, tr, model, x, y, rel=1e-4 if dtype == torch.float64 else 2e-2)


def test_two_monitors_on_other_parameters_and_prefixes(tmp_path):
    ds = NoisyTensorDataset(n=48)
    first = OrderParameterMonitor(every_n_epochs=1, probe_size=32, params="net.0")
    head = OrderParameterMonitor(every_n_epochs=1, probe_size=32, params="net.3", prefix="order_head")
    assert first.state_key != head.state_key
    model = TinyClassifier()
    tr = _fit(tmp_path, [first, head], model, loader(ds))  # no "more than one stateful callback"
    idx = first.probe_indices
    x, y = ds.x[idx], ds.noisy_targets[idx]
    _reference(first, tr, model, x, y, params="net.0")
    _reference(head, tr, model, x, y, params="net.3")
    assert "order_head/R" in tr.callback_metrics and first.last["order/A"] != head.last["order_head/A"]
    with pytest.raises(LightningPhasesError, match="prefix"):
        OrderParameterMonitor(every_n_epochs=1, prefix="a/b")


def test_shared_probe_refuses_its_settings_twice():
    probe = Probe(probe_size=64)
    with pytest.raises(LightningPhasesError, match="probe_size=32"):
        OrderParameterMonitor(every_n_epochs=1, probe=probe, probe_size=32)
    mon = OrderParameterMonitor(every_n_epochs=1, probe=probe)
    assert mon.probe is probe and mon.probe_size == 64


def test_a_second_fit_on_other_data_starts_fresh(tmp_path):
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=32)
    _fit(tmp_path / "a", [mon], TinyClassifier(), loader(NoisyTensorDataset(n=96, seed=0)), max_epochs=2)
    assert mon.num_measurements == 3
    other = NoisyTensorDataset(n=40, seed=1)
    model = TinyClassifier()
    tr = _fit(tmp_path / "b", [mon], model, loader(other))
    assert mon.num_measurements == 2 and int(mon.probe_indices.max()) < 40
    fresh = OrderParameterMonitor(every_n_epochs=1, probe_size=32)
    _fit(tmp_path / "c", [fresh], TinyClassifier(), loader(other))
    assert torch.equal(fresh.probe_indices, mon.probe_indices)
    _reference(mon, tr, model, other.x[mon.probe_indices], other.noisy_targets[mon.probe_indices])


class _RemovableDataModule(pl.LightningDataModule):
    """Serves ``noisy_train.without(removed)``, as the package's datamodules do."""

    def __init__(self, n: int = 96, seed: int = 0) -> None:
        super().__init__()
        inner = NoisyTensorDataset(n=n, seed=seed)
        self.noisy_train = NoisyLabelDataset(
            TensorDataset(inner.x, inner.true_targets), noise_rate=0.0, noisy_targets=inner.noisy_targets
        )
        self.removed = torch.zeros(0, dtype=torch.long)

    def remove_train_samples(self, indices) -> None:
        self.removed = torch.as_tensor(indices, dtype=torch.long)

    def train_dataloader(self):
        ds = self.noisy_train.without(self.removed) if self.removed.numel() else self.noisy_train
        return DataLoader(ds, batch_size=B, shuffle=True)

    def state_dict(self):
        return {"removed": self.removed.tolist()}

    def load_state_dict(self, state):
        self.removed = torch.tensor(state.get("removed", []), dtype=torch.long)


class _RemoveAfterFirstEpoch(pl.Callback):
    def __init__(self, indices) -> None:
        self.indices = indices

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            trainer.datamodule.remove_train_samples(self.indices)
            trainer.reload_dataloaders_every_n_epochs = 1  # as GMMCleanser(action="remove") does


def test_after_removal_and_across_resume_the_same_samples_are_probed(tmp_path):
    draw = OrderParameterMonitor(every_n_epochs=1, probe_size=40, seed=2)
    _fit(tmp_path / "draw", [draw], TinyClassifier(), _RemovableDataModule().train_dataloader())
    probe = draw.probe_indices.clone()  # the probe set this seed draws on this data
    others = [i for i in range(96) if i not in set(probe.tolist())]
    removed = torch.cat([probe[:3], torch.tensor(others[:20])])  # 3 probe samples and 20 others
    dm = _RemovableDataModule()
    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=40, seed=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pl.seed_everything(0, verbose=False)
    with pytest.warns(RuntimeWarning, match="3 probe sample") as record:
        trainer(
            tmp_path / "a", [_RemoveAfterFirstEpoch(removed), mon, ckpt], max_epochs=2, enable_checkpointing=True
        ).fit(TinyClassifier(), dm)
    assert sum("probe sample" in str(w.message) for w in record) == 1
    assert mon.probe_indices.tolist() == probe[3:].tolist()  # dropped, never replaced by another sample
    resumed = OrderParameterMonitor(every_n_epochs=1, probe_size=40, seed=2)
    model = TinyClassifier()
    pl.seed_everything(0, verbose=False)
    tr = trainer(tmp_path / "b", [resumed], max_epochs=3)
    tr.fit(model, dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert len(tr.train_dataloader.dataset) == 96 - 23
    assert resumed.probe_indices.tolist() == probe[3:].tolist()  # indices into the original dataset
    assert resumed.num_measurements == 4
    idx = resumed.probe_indices
    _reference(resumed, tr, model, dm.noisy_train.dataset.tensors[0][idx], dm.noisy_train.noisy_targets[idx])
    # resuming on other data: a clear error, not a silent new probe set
    other = _RemovableDataModule(n=96, seed=7)
    other.remove_train_samples(removed)
    with pytest.raises(LightningPhasesError, match="other data"):
        trainer(tmp_path / "c", [OrderParameterMonitor(every_n_epochs=1, probe_size=40, seed=2)], max_epochs=3).fit(
            TinyClassifier(), other, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    smaller = _RemovableDataModule(n=80, seed=0)
    with pytest.raises(LightningPhasesError, match="other data"):
        trainer(tmp_path / "d", [OrderParameterMonitor(every_n_epochs=1, probe_size=40, seed=2)], max_epochs=3).fit(
            TinyClassifier(), smaller, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )


def test_failures_in_probe_building_are_skipped_and_counted(tmp_path):
    def broken_unpack(batch):
        raise KeyError("no such field")

    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=32, unpack=broken_unpack)
    with pytest.warns(RuntimeWarning, match="skipped the measurement"):
        tr = _fit(tmp_path, [mon], TinyClassifier(), loader(NoisyTensorDataset(n=48)), max_epochs=2)
    assert mon.num_failures == 3 and float(tr.callback_metrics["order/skipped"]) == 3.0


def test_adapter_task_inference_and_refusals():
    adapter = ModelAdapter()
    assert adapter.resolve_task(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])) == "multiclass"
    for out, y, task in [
        (torch.zeros(4, 1), torch.tensor([0, 1, 1, 0]), "binary"),
        (torch.zeros(4, 1), torch.tensor([[0.0], [1.0], [1.0], [0.0]]), "binary"),
        (torch.zeros(4, 3), torch.tensor([[0.0, 1, 1]] * 4), "multilabel"),
        (torch.zeros(4), torch.tensor([4.9, 5.2, 5.0, 4.7]), "regression"),
        (torch.zeros(4, 2), torch.randn(4, 2), "regression"),
    ]:
        assert ModelAdapter().resolve_task(out, y) == task
    with pytest.raises(LightningPhasesError, match="task="):
        ModelAdapter().resolve_task(torch.zeros(4, 3), torch.tensor([0.0, 1.0, 2.0, 0.5]))
    assert ModelAdapter(loss_fn=regression_loss).resolve_task(torch.zeros(4, 3), torch.rand(4)) == "custom"
    with pytest.raises(LightningPhasesError, match="task='binary'"):
        ModelAdapter(task="binary").resolve_task(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(LightningPhasesError, match="task must be one of"):
        ModelAdapter(task="classification")  # type: ignore[arg-type]
    # integer tensors keep their dtype, floating tensors take the cast dtype
    adapter.bind(collate_fn=None, cast_dtype=torch.float64)
    moved = adapter.to_module({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.long)}, nn.Linear(1, 1))
    assert moved["a"].dtype == torch.float64 and moved["b"].dtype == torch.long


def test_training_dataloader_resolution():
    from types import SimpleNamespace

    from lightning_phases.callbacks.probe import training_dataloader

    dl = DataLoader(NoisyTensorDataset(n=16), batch_size=4)
    for served in (dl, [dl], (dl,), {"a": dl}):
        assert training_dataloader(SimpleNamespace(train_dataloader=served), "X") is dl
    for bad in (None, [], {}, "loader"):
        with pytest.raises(LightningPhasesError, match="X needs a single map-style training DataLoader"):
            training_dataloader(SimpleNamespace(train_dataloader=bad), "X")


def test_a_failing_logger_does_not_end_the_run(tmp_path):
    from tests.callbacks.helpers import RecordingLogger

    class FullDisk(RecordingLogger):
        def log_metrics(self, metrics, step=None) -> None:
            raise OSError("No space left on device")

    mon = OrderParameterMonitor(every_n_epochs=1, probe_size=32)
    model = TinyClassifier()
    with pytest.warns(RuntimeWarning, match="No space left"):
        _fit(tmp_path, [mon], model, loader(NoisyTensorDataset(n=48)), max_epochs=2, logger=FullDisk(tmp_path / "x"))
    assert mon.num_measurements == 3 and mon.num_failures == 3
