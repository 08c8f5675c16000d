"""A real TensorBoard server serves the callbacks' scalar tags and the custom layout."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_phases import NoiseSplitTracker, OrderParameterMonitor
from lightning_phases.report import PHASE_LAYOUT
from tests.callbacks.helpers import NoisyTensorDataset, TinyClassifier, loader


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - localhost only
        return json.loads(resp.read().decode())


@pytest.fixture
def logdir(tmp_path):
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        callbacks=[
            OrderParameterMonitor(every_n_epochs=1, probe_size=48, figure_every_n=1),
            NoiseSplitTracker(every_n_epochs=1, probe_size=48),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyClassifier(), loader(NoisyTensorDataset()))
    logger.experiment.flush()
    return tmp_path


def test_tensorboard_serves_tags_and_layout(logdir):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        tags = None
        while time.time() < deadline:
            try:
                tags = _get(f"{base}/data/plugin/scalars/tags")
                if tags and any("order/A" in t for run in tags.values() for t in run):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert tags, "TensorBoard did not answer"
        run_tags = set().union(*[set(t) for t in tags.values()])
        for key in (
            "order/A",
            "order/A0",
            "order/R",
            "order/sigma2_lambda",
            "order/D_s",
            "split/R_cw",
            "split/A0_c",
            "segment/ratio",
        ):
            assert key in run_tags, key
        layout = _get(f"{base}/data/plugin/custom_scalars/layout")
        titles = [chart["title"] for cat in layout["category"] for chart in cat["chart"]]
        assert titles == list(PHASE_LAYOUT["Phases of learning"])
        # every regex of the alignments chart matches a served tag
        chart = next(c for cat in layout["category"] for c in cat["chart"] if c["title"].startswith("alignments"))
        for regex in chart["multiline"]["tag"]:
            assert any(re.search(regex, t) for t in run_tags), regex
        hist = _get(f"{base}/data/plugin/histograms/tags")
        hist_tags = set().union(*[set(t) for t in hist.values()])
        assert {"order/spectrum", "split/loss_clean", "split/loss_noisy"} <= hist_tags
        images = _get(f"{base}/data/plugin/images/tags")
        assert "order/spectrum_figure" in set().union(*[set(t) for t in images.values()])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_tensorboard_logger_gets_the_histograms_figures_and_layout(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0, verbose=False)
    loggers = [TensorBoardLogger(tmp_path, name="first"), TensorBoardLogger(tmp_path, name="second")]
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        logger=loggers,
        callbacks=[
            OrderParameterMonitor(every_n_epochs=1, probe_size=48, figure_every_n=1),
            NoiseSplitTracker(every_n_epochs=1, probe_size=48),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyClassifier(), loader(NoisyTensorDataset()))
    for logger in loggers:
        logger.experiment.flush()
        acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0})
        acc.Reload()
        tags = acc.Tags()
        assert {"order/spectrum", "split/loss_clean", "split/loss_noisy"} <= set(tags["histograms"]), logger.name
        assert "order/spectrum_figure" in tags["images"], logger.name
        assert "order/A" in tags["scalars"]
