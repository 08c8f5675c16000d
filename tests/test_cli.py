"""`lightning-phases demo` (reduced) and `lightning-phases report` on the run it produced, checked against
the data's known noise and the event files; errors give non-zero exit codes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_phases.cli import main
from lightning_phases.data import NoisyDigitsDataModule
from lightning_phases.functional import detection_metrics


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            [
                "demo",
                "--epochs",
                "60",
                "--probe-size",
                "256",
                "--noise-rate",
                "0.5",
                "--seed",
                "0",
                "--output-dir",
                str(out),
                "--no-progress-bar",
            ]
        )
    return code, buf.getvalue(), out


def test_demo_prints_what_it_promises(demo_run):
    code, stdout, out = demo_run
    assert code == 0
    assert "Phase timeline" in stdout and "epochs" in stdout
    assert f"tensorboard --logdir {out}" in stdout
    assert "Report figure:" in stdout and (out / "report.png").stat().st_size > 10_000
    assert "Final test error:" in stdout and "kept weights" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phases"] and summary["phases"][0]["first_step"] == 0


def test_demo_cleansing_numbers_match_the_flags_and_the_known_noise(demo_run):
    _, stdout, out = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["t_c_step"] is not None
    flagged = [int(row["index"]) for row in csv.DictReader((out / "gmm_flagged.csv").read_text().splitlines())]
    dm = NoisyDigitsDataModule(noise_rate=0.5, seed=0)
    dm.setup("fit")
    truth = dm.noisy_train.is_noisy
    flags = torch.zeros(len(truth), dtype=torch.bool)
    flags[flagged] = True
    m = detection_metrics(flags, truth)
    assert summary["cleansing"]["num_flagged"] == len(flagged)
    assert summary["cleansing"]["precision"] == pytest.approx(float(m.precision), abs=1e-6)
    assert summary["cleansing"]["recall"] == pytest.approx(float(m.recall), abs=1e-6)
    assert f"flagged {len(flagged)} samples" in stdout


def test_demo_reaches_t_c_and_phase_two(demo_run):
    _, _, out = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["t_c_step"] is not None
    assert [p["phase"] for p in summary["phases"]][:2] == ["I", "II"]


def test_report_reads_the_run_back(demo_run, tmp_path, capsys):
    _, _, out = demo_run
    figure = tmp_path / "again.png"
    assert main(["report", str(out), "-o", str(figure)]) == 0
    assert figure.stat().st_size > 10_000
    summary = json.loads((tmp_path / "summary.json").read_text())
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    # the summary's final values are the last logged scalars, read independently here
    for tag in ("order/A", "order/R", "split/L_c", "split/L_w"):
        assert summary["final"][tag] == pytest.approx(acc.Scalars(tag)[-1].value)
    assert summary["t_c_step"] == int(acc.Scalars("gmm/t_c_step")[-1].value)


def test_report_leaves_out_panels_without_data(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    for step in range(5):
        writer.add_scalar("order/A", 1.0 / (step + 1), step)
        writer.add_scalar("order/R", 0.5 - 0.1 * step, step)
    writer.close()
    assert main(["report", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "note:" in printed and (tmp_path / "run" / "report.png").exists()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_report_errors(tmp_path, capsys, make):
    path = tmp_path / "logs"
    if make == "empty":
        path.mkdir()
    assert main(["report", str(path)]) == 1
    err = capsys.readouterr().err
    assert "error" in err and str(path) in err


def test_demo_bad_arguments(capsys):
    assert main(["demo", "--noise-rate", "1.5"]) == 1
    assert "--noise-rate" in capsys.readouterr().err


def test_help_and_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "lightning_phases.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "demo" in result.stdout and "report" in result.stdout
    assert main([]) == 2
