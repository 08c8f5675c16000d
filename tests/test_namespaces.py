"""Both Lightning namespaces, ``lightning.pytorch`` and ``pytorch_lightning``: the callbacks, datamodules,
LabelNoise and SAM under each package's Trainer, every TensorBoard extra with that package's TensorBoardLogger
(read back from the event files), and each package's LightningCLI accepting the package's classes."""

from __future__ import annotations

import copy
import importlib
import math
import re

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_phases import (
    GMMCleanser,
    LabelNoise,
    NoiseSplitTracker,
    OrderParameterMonitor,
    PhaseDetector,
    TwoLayerLinearNetwork,
)
from lightning_phases import _lightning as L
from lightning_phases.data import NoisyDigitsDataModule
from lightning_phases.optim import SAM
from tests.reference.sam import sam_reference_loop

ALL = ["lightning.pytorch", "pytorch_lightning"]


def _namespace(name: str):
    if name not in L.NAMESPACES:
        pytest.skip(f"{name} is not installed")
    return L.NAMESPACES[name]


def _digits_module(namespace: str, lr: float = 0.5):
    """A small MLP LightningModule of ``namespace`` that logs val_err and test_err."""

    class DigitsNet(L.lightning_module_base(namespace)):
        def __init__(self, lr: float = lr) -> None:
            super().__init__()
            self.lr = lr
            self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_err", (self(x).argmax(1) != y).float().mean())

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_err", (self(x).argmax(1) != y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return DigitsNet


@pytest.fixture(scope="module", params=ALL)
def tiny_run(request, tmp_path_factory):
    """15 epochs on noisy digits under ``namespace``'s Trainer and TensorBoardLogger with all four callbacks."""
    namespace = request.param
    module = _namespace(namespace)
    root = tmp_path_factory.mktemp(namespace.replace(".", "_"))
    logger = importlib.import_module(namespace + ".loggers").TensorBoardLogger(str(root), name="tiny")
    callbacks = [
        OrderParameterMonitor(every_n_epochs=1, probe_size=128, figure_every_n=1),
        NoiseSplitTracker(every_n_epochs=1, probe_size=128),
        PhaseDetector(verbose=False),
        GMMCleanser(every_n_epochs=1, patience=1, max_fraction=0.95),  # fixed schedule: t_c on every machine
    ]
    module.seed_everything(0, verbose=False)
    trainer = module.Trainer(
        max_epochs=15,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    dm = NoisyDigitsDataModule(noise_rate=0.4, seed=0, batch_size=64)
    model = _digits_module(namespace)()
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return namespace, trainer, callbacks, dm, model, acc


@pytest.mark.slow
def test_classes_are_the_namespaces_own(tiny_run):
    namespace, trainer, callbacks, dm, model, _ = tiny_run
    module = L.NAMESPACES[namespace]
    assert isinstance(trainer, module.Trainer) and isinstance(model, module.LightningModule)
    assert all(isinstance(c, module.Callback) for c in callbacks)
    assert isinstance(dm, module.LightningDataModule)
    assert isinstance(LabelNoise(tau=0.1, num_classes=2), module.Callback)
    for cb in callbacks:  # the Trainer ran them: every callback's work is there
        assert cb in trainer.callbacks


@pytest.mark.slow
def test_every_tensorboard_extra_is_written(tiny_run):
    _, _, callbacks, _, _, acc = tiny_run
    tags = acc.Tags()
    assert {"order/A", "split/L_c", "phase/index", "gmm/delta_L", "gmm/t_c_step", "val_err", "test_err"} <= set(
        tags["scalars"]
    )
    assert {"order/spectrum", "split/loss_clean", "split/loss_noisy"} <= set(tags["histograms"])  # histograms
    assert {"order/spectrum_figure", "gmm/loss_histogram"} <= set(tags["images"])  # spectrum and mixture figures
    assert "custom_scalars__config__" in tags["tensors"]  # the Custom Scalars layout
    # the phase-transition text: one entry per transition the detector reported
    text = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("phase/transitions/text_summary")]
    detector = callbacks[2]
    phase_changes = list(detector.transitions)
    assert len(text) == len(phase_changes) >= 1
    assert all(f"step {t.step} " in s for t, s in zip(phase_changes, text))
    # the mixture figure is written at t_c
    cleanser = callbacks[3]
    assert cleanser.t_c_step is not None
    assert [e.step for e in acc.Images("gmm/loss_histogram")] == [cleanser.t_c_step]
    # one spectrum histogram per measurement, at the measured steps
    measured = [int(e.value) for e in acc.Scalars("order/measured_step")]
    assert [e.step for e in acc.Histograms("order/spectrum")] == measured


@pytest.mark.slow
def test_every_custom_scalars_chart_matches_a_logged_tag(tiny_run):
    """TensorBoard joins a chart's patterns with "|", compiles the result with Python's re and keeps the tags it
    re.match-es (tensorboard/plugins/custom_scalar/custom_scalars_plugin.py); do exactly that with the layout
    read back from the event file, against the tags this run logged."""
    _, _, _, _, _, acc = tiny_run
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    logged = acc.Tags()["scalars"]
    charts = [chart for category in layout.category for chart in category.chart]
    assert len(charts) == 8
    for chart in charts:
        regex = re.compile("|".join(chart.multiline.tag))
        matched = [tag for tag in logged if regex.match(tag)]
        assert matched, f"chart {chart.title!r} matches no logged tag"
    errors = next(c for c in charts if c.title.startswith("errors"))
    regex = re.compile("|".join(errors.multiline.tag))
    assert {"split/err_c", "split/err_w", "order/error", "val_err", "test_err"} <= {t for t in logged if regex.match(t)}


def _recording_sam_module(namespace: str):
    class Net(L.lightning_module_base(namespace)):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
            self.batches: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            # SAM runs the closure (so this step) twice per batch, on the same batch: keep one entry per batch
            self.batches[(self.current_epoch, batch_idx)] = (x.clone(), y.clone())
            return nn.functional.cross_entropy(self(x), y)

        @property
        def seen(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [self.batches[k] for k in sorted(self.batches)]

        def configure_optimizers(self):
            return SAM(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    return Net


@pytest.mark.parametrize("namespace", ALL)
def test_label_noise_and_sam_under_the_namespaces_trainer(namespace, tmp_path):
    """LabelNoise replaces the targets the step sees (stored labels untouched) and SAM's update equals a plain
    reference loop on exactly those batches."""
    module = _namespace(namespace)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    stored = y.clone()
    ds = TensorDataset(x, y)
    torch.manual_seed(0)
    net = _recording_sam_module(namespace)()
    ref = copy.deepcopy(net.net)
    trainer = module.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[LabelNoise(tau=0.3, num_classes=3, seed=0)],
    )
    trainer.fit(net, DataLoader(ds, batch_size=16))
    assert torch.equal(ds.tensors[1], stored)
    targets = torch.cat([seen_y for _, seen_y in net.seen])  # what training_step saw, 2 epochs in order
    given = torch.cat([stored] * 2)
    rate = float((targets != given).float().mean())
    assert abs(rate - 0.3) <= 4 * math.sqrt(0.3 * 0.7 / len(given))
    assert ((targets >= 0) & (targets < 3)).all()
    sam_reference_loop(ref, net.seen, nn.functional.cross_entropy, lr=0.1, rho=0.1, momentum=0.9, clip_norm=None)
    for p, q in zip(net.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_both_namespaces_see_the_same_label_noise(tmp_path):
    for name in ALL:
        _namespace(name)
    seen = {}
    for name in ALL:
        module = L.NAMESPACES[name]
        net = _recording_sam_module(name)()
        ds = TensorDataset(torch.randn(32, 5), torch.arange(32) % 3)
        module.Trainer(
            default_root_dir=tmp_path / name,
            accelerator="cpu",
            max_epochs=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[LabelNoise(tau=0.5, num_classes=3, seed=7)],
        ).fit(net, DataLoader(ds, batch_size=8))
        seen[name] = torch.cat([y for _, y in net.seen])
    assert torch.equal(seen["lightning.pytorch"], seen["pytorch_lightning"])


@pytest.mark.parametrize("namespace", ALL)
def test_lightning_cli_accepts_the_callbacks_and_datamodules(namespace, tmp_path, monkeypatch):
    """Each package's LightningCLI parses a config naming the package's callbacks and datamodule (and a
    namespace-neutral TensorBoardLogger, as the example configs do), then fits."""
    module = _namespace(namespace)
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 3,
            "limit_val_batches": 1,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "logger": {"class_path": "TensorBoardLogger", "init_args": {"save_dir": str(tmp_path), "name": "cli"}},
            "callbacks": [
                {"class_path": "lightning_phases.OrderParameterMonitor", "init_args": {"probe_size": 64}},
                {"class_path": "lightning_phases.NoiseSplitTracker", "init_args": {"probe_size": 64}},
                {"class_path": "lightning_phases.PhaseDetector", "init_args": {"verbose": False}},
                {"class_path": "lightning_phases.GMMCleanser", "init_args": {"action": "flag"}},
                {"class_path": "lightning_phases.LabelNoise", "init_args": {"tau": 0.1, "num_classes": 10}},
            ],
        },
        "data": {
            "class_path": "lightning_phases.data.NoisyDigitsDataModule",
            "init_args": {"noise_rate": 0.3, "seed": 0, "batch_size": 32},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    LightningCLI = importlib.import_module(namespace + ".cli").LightningCLI
    cli = LightningCLI(
        _digits_module(namespace),
        subclass_mode_data=True,
        args=["--config", str(path)],
        run=False,
        save_config_kwargs={"overwrite": True},
    )
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names[:5] == ["OrderParameterMonitor", "NoiseSplitTracker", "PhaseDetector", "GMMCleanser", "LabelNoise"]
    assert isinstance(cli.datamodule, NoisyDigitsDataModule) and cli.datamodule.noise_rate == 0.3
    assert type(cli.trainer.logger).__module__.startswith(namespace + ".loggers")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert {"order/A", "split/L_c", "phase/index", "gmm/delta_L"} <= set(cli.trainer.callback_metrics)
    assert isinstance(cli.trainer, module.Trainer)


def test_package_modules_are_of_the_preferred_namespace():
    """TwoLayerLinearNetwork (and the demo's module) use the preferred namespace: lightning.pytorch when installed."""
    preferred = "lightning.pytorch" if "lightning.pytorch" in L.NAMESPACES else "pytorch_lightning"
    assert L.preferred is L.NAMESPACES[preferred]
    assert issubclass(TwoLayerLinearNetwork, L.NAMESPACES[preferred].LightningModule)
    for name in L.NAMESPACES:
        assert issubclass(L.lightning_module_base(name), L.NAMESPACES[name].LightningModule)
