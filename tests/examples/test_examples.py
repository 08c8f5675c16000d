"""Every example config runs in a fast smoke mode: offline configs on the bundled data, the MNIST and
CIFAR-10 configs on small files written in torchvision's on-disk format (no download)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.fake_torchvision import write_cifar10, write_idx

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"

# (example module, config, needs) -- every YAML file in examples/configs must appear here
CASES = [
    ("feng_tu", "feng_tu_digits.yaml", None),
    ("feng_tu", "feng_tu_mnist_clean.yaml", "mnist"),
    ("feng_tu", "feng_tu_mnist_noisy.yaml", "mnist"),
    ("cifar10_cnn", "cifar10_cnn_digits.yaml", None),
    ("cifar10_cnn", "cifar10_cnn.yaml", "cifar10"),
    ("clean_priority", "clean_priority_digits_binary.yaml", None),
    ("clean_priority", "clean_priority_digits_multiclass.yaml", None),
    ("clean_priority", "clean_priority_mnist_binary.yaml", "mnist"),
    ("clean_priority", "clean_priority_mnist_multiclass.yaml", "mnist"),
]

TWO_LAYER = ["two_layer_linear_sgd.yaml", "two_layer_linear_label_noise_sgd.yaml", "two_layer_linear_sam.yaml"]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_is_covered():
    covered = {c for _, c, _ in CASES} | set(TWO_LAYER)
    assert covered == {c.name for c in CONFIGS.glob("*.yaml")}


@pytest.mark.parametrize("module,config,needs", CASES, ids=[c for _, c, _ in CASES])
def test_example_smoke(module, config, needs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory stays here
    monkeypatch.setattr(sys, "argv", [f"{module}.py"])
    args = [
        "fit",
        "--config",
        str(CONFIGS / config),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.limit_test_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    if needs == "mnist":
        write_idx(tmp_path / "data", "MNIST", n_train=240, n_test=40)
    elif needs == "cifar10":
        write_cifar10(tmp_path / "data", monkeypatch, n_per_batch=24)
        args += ["--data.init_args.num_workers", "0", "--data.init_args.batch_size", "16"]
    if needs:
        args += ["--data.init_args.data_dir", str(tmp_path / "data"), "--data.init_args.download", "false"]
    _example(module).main(args)

    name = yaml.safe_load((CONFIGS / config).read_text())["trainer"]["logger"]["init_args"]["name"]
    run = tmp_path / "runs" / name / "version_0"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    callbacks = {
        c["class_path"].rsplit(".", 1)[-1]
        for c in yaml.safe_load((CONFIGS / config).read_text())["trainer"]["callbacks"]
    }
    expected = {"test_err"}
    if "OrderParameterMonitor" in callbacks:
        expected |= {"order/A", "order/R", "order/sigma2_lambda"}
    if "NoiseSplitTracker" in callbacks:
        expected |= {"split/L_c", "split/L_w", "segment/ratio"}
    if "PhaseDetector" in callbacks:
        expected |= {"phase/index"}
    if "GMMCleanser" in callbacks:
        expected |= {"gmm/delta_L"}
    missing = expected - tags
    assert not missing, f"{config}: not logged: {sorted(missing)}"
    assert (run / "config.yaml").exists() or (run.parent / "config.yaml").exists() or any(run.rglob("config.yaml"))


@pytest.mark.parametrize("config", TWO_LAYER)
def test_two_layer_linear_cli_configs(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["two_layer_linear.py"])
    _example("two_layer_linear").main(
        [
            "fit",
            "--config",
            str(CONFIGS / config),
            "--trainer.max_steps",
            "8",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
        ]
    )
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    acc = EventAccumulator(
        str(tmp_path / "runs" / cfg["trainer"]["logger"]["init_args"]["name"] / "version_0"),
        size_guidance={"scalars": 0},
    )
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"two_layer/mean_norm", "two_layer/mean_abs_cosine", "train_loss", "test_loss"} <= tags
    assert len(acc.Scalars("two_layer/mean_norm")) == 8


@pytest.mark.slow
def test_feng_tu_digits_reaches_t_c_and_a_recommended_stop(tmp_path, monkeypatch):
    """The README's Feng & Tu row: phases, t_c with flagged samples, and a recommended stop, in the config as
    shipped (only the progress bar off and the output directory moved)."""
    import csv

    import torch

    from lightning_phases.data import NoisyDigitsDataModule
    from lightning_phases.functional import detection_metrics

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["feng_tu.py"])
    config = CONFIGS / "feng_tu_digits.yaml"
    _example("feng_tu").main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
        ]
    )
    cfg = yaml.safe_load(config.read_text())
    run = tmp_path / "runs" / cfg["trainer"]["logger"]["init_args"]["name"] / "version_0"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    phases = [int(e.value) for e in acc.Scalars("phase/index")]
    assert phases[0] == 0 and 1 in phases  # phase I, then phase II
    t_c = acc.Scalars("gmm/t_c_step")[-1].value
    stop = acc.Scalars("phase/recommended_step")[-1].value
    assert t_c > 0 and 0 < stop <= acc.Scalars("order/measured_step")[-1].value
    assert (
        next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("GMMCleanser"))["init_args"]["action"]
        == "flag"
    )
    flagged = [int(r["index"]) for r in csv.DictReader((run / "gmm_flagged.csv").read_text().splitlines())]
    dm = NoisyDigitsDataModule(**cfg["data"]["init_args"])
    dm.setup("fit")
    flags = torch.zeros(len(dm.noisy_train), dtype=torch.bool)
    flags[flagged] = True
    quality = detection_metrics(flags, dm.noisy_train.is_noisy)
    assert float(quality.precision) > 0.8 and float(quality.recall) > 0.8, quality


@pytest.mark.slow
def test_clean_priority_digits_binary_ratio_starts_at_one_minus_delta_over_delta_and_falls(tmp_path, monkeypatch):
    """The README's clean-priority row and the config's comment: with δ = 0.4 the clean/noisy segment-gradient
    ratio starts near (1 − δ)/δ = 1.5, the two segments point in opposite directions, and the ratio falls
    towards 1 (the config as shipped: 120 epochs)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["clean_priority.py"])
    config = CONFIGS / "clean_priority_digits_binary.yaml"
    _example("clean_priority").main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"),
        ]
    )
    cfg = yaml.safe_load(config.read_text())
    delta = cfg["data"]["init_args"]["noise_rate"]
    run = tmp_path / "runs" / cfg["trainer"]["logger"]["init_args"]["name"] / "version_0"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    ratio = [e.value for e in acc.Scalars("segment/ratio")]
    cos = [e.value for e in acc.Scalars("segment/cos")]
    assert ratio[0] == pytest.approx((1 - delta) / delta, abs=0.1)
    assert max(cos) < -0.9  # opposite directions throughout
    assert min(ratio[-5:]) < 1.15 and ratio[0] - min(ratio) > 0.3  # falls towards 1
