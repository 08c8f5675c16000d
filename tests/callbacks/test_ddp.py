"""Under DDP (2 CPU processes, gloo) the callbacks log what one process logs, from rank 0 only, without hanging."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch

from lightning_phases import NoiseSplitTracker, OrderParameterMonitor
from tests.callbacks.helpers import (
    DestroyProcessGroupAtExit,
    NoisyTensorDataset,
    RecordingLogger,
    TinyClassifier,
    loader,
    read_records,
)

pytestmark = pytest.mark.slow  # spawns processes: the fast lane (-m 'not slow') skips them


class _DumpCallbackMetrics(pl.Callback):
    """Every rank writes its callback_metrics at the end of training."""

    def __init__(self, directory) -> None:
        self.directory = str(directory)

    def on_train_end(self, trainer, pl_module) -> None:
        values = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("order/", "split/", "segment/"))
        }
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump(values, fh)


def _run(tmp_path, devices: int, lr: float):
    tmp_path.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    model = TinyClassifier(lr=lr)
    callbacks = [
        OrderParameterMonitor(every_n_epochs=1, probe_size=48, batch_size=16, seed=2),
        NoiseSplitTracker(every_n_epochs=1, probe_size=48, batch_size=16, seed=2),
        _DumpCallbackMetrics(tmp_path),
        DestroyProcessGroupAtExit(),
    ]
    kwargs = dict(strategy="ddp_spawn") if devices > 1 else {}
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        devices=devices,
        logger=RecordingLogger(tmp_path / "log.jsonl"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(NoisyTensorDataset(), batch_size=16 // devices))
    return read_records(tmp_path / "log.jsonl")


def _by_step(records):
    merged: dict[int, dict] = {}
    for step, metrics in records:
        merged.setdefault(step, {}).update(metrics)
    return merged


def test_ddp_spawn_matches_single_process(tmp_path):
    # lr=0: the weights stay at their (seeded) initial values in both runs, so every
    # measurement is on the same probe set and the same weights.
    single = _by_step(_run(tmp_path / "single", 1, lr=0.0))
    ddp_records = _run(tmp_path / "ddp", 2, lr=0.0)
    ddp = _by_step(ddp_records)
    assert sorted(single) == sorted(ddp) == [0, 6, 12]
    for step in single:
        # every statistic; not the realised overhead, a wall-clock ratio of each process
        keys = [
            k for k in single[step] if k.startswith(("order/", "split/", "segment/")) and not k.endswith("/overhead")
        ]
        assert len(keys) > 30
        for key in keys:
            assert ddp[step][key] == pytest.approx(single[step][key], rel=1e-4, abs=1e-7), (step, key)
    # only rank 0 wrote: each step's metrics appear exactly once per callback
    assert sum(1 for step, m in ddp_records if "order/A" in m) == 3
    # every rank holds the same values in callback_metrics
    with open(tmp_path / "ddp" / "rank0.json") as f0, open(tmp_path / "ddp" / "rank1.json") as f1:
        r0, r1 = json.load(f0), json.load(f1)

    def statistics(values):
        return {k: v for k, v in values.items() if not k.endswith("/overhead")}  # a clock ratio per process

    assert statistics(r0) == statistics(r1) and "order/R" in r0 and "split/R_cw" in r0


def test_ddp_spawn_training_with_callbacks_does_not_hang(tmp_path):
    records = _by_step(_run(tmp_path, 2, lr=0.2))
    assert sorted(records) == [0, 6, 12]
    assert all(torch.isfinite(torch.tensor(m["order/A"])) for m in records.values())
