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


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_demo_writes_a_versioned_run_and_says_where_everything_is(demo_run):
    code, stdout, out = demo_run
    assert code == 0
    run = out / "version_0"
    assert sorted(p.name for p in out.iterdir()) == ["version_0"]
    assert "Phase timeline" in stdout and "epochs" in stdout
    assert "four model" not in stdout and "recommended_state_dict" not in stdout  # no jargon, no attribute names
    assert f"tensorboard --logdir {out}  (this run is 'version_0' there)" in stdout
    for name in ("report.png", "summary.json", "gmm_flagged.csv", "kept_weights.pt"):
        assert (run / name).exists(), name
        assert str((run / name).resolve()) in stdout, name  # printed with its full path
    assert (run / "report.png").stat().st_size > 10_000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["phases"] and summary["phases"][0]["first_step"] == 0
    assert summary["run"] == f"{out.name}/version_0"  # the run's own name, not an absolute path


@pytest.mark.slow
def test_demo_logs_the_kept_weights_test_error_under_its_own_key(demo_run):
    """test_err (final weights) and test_err_kept (the saved kept weights) are distinct tags, one value each; the
    saved checkpoint gives exactly the logged test_err_kept on the clean test split, computed here by hand."""
    _, stdout, out = demo_run
    run = out / "version_0"
    scalars = _scalars(run)
    assert len(scalars["test_err"]) == 1 and len(scalars["test_err_kept"]) == 1
    state = torch.load(run / "kept_weights.pt")
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    dm = NoisyDigitsDataModule(noise_rate=0.5, seed=0)
    dm.setup("test")
    wrong = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            wrong += int((net(x).argmax(1) != y).sum())
            total += len(y)
    assert scalars["test_err_kept"][0][1] == pytest.approx(wrong / total, abs=1e-6)
    assert f"{wrong / total:.3f}" in stdout
    assert scalars["test_err"][0][1] != pytest.approx(wrong / total)  # not the same number twice


@pytest.mark.slow
def test_demo_cleansing_numbers_match_the_flags_and_the_known_noise(demo_run):
    _, stdout, out = demo_run
    run = out / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["t_c_step"] is not None
    flagged = [int(row["index"]) for row in csv.DictReader((run / "gmm_flagged.csv").read_text().splitlines())]
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


@pytest.mark.slow
def test_demo_reaches_t_c_and_phase_two(demo_run):
    _, _, out = demo_run
    summary = json.loads((out / "version_0" / "summary.json").read_text())
    assert summary["t_c_step"] is not None
    assert [p["phase"] for p in summary["phases"]][:2] == ["I", "II"]


@pytest.mark.slow
def test_report_reads_the_run_back(demo_run, tmp_path, capsys):
    _, _, out = demo_run
    run = out / "version_0"
    figure = tmp_path / "again.png"
    assert main(["report", str(run), "-o", str(figure)]) == 0
    assert figure.stat().st_size > 10_000
    summary = json.loads((tmp_path / "summary.json").read_text())
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    # the summary's final values are the last logged scalars, read independently here
    for tag in ("order/A", "order/R", "split/L_c", "split/L_w"):
        assert summary["final"][tag] == pytest.approx(acc.Scalars(tag)[-1].value)
    assert summary["t_c_step"] == int(acc.Scalars("gmm/t_c_step")[-1].value)
    assert summary["test"]["test_err_kept"] == pytest.approx(acc.Scalars("test_err_kept")[-1].value)


@pytest.mark.slow
def test_a_second_demo_never_mixes_with_the_first(tmp_path, capsys):
    """Two demos into one directory: two runs; `report` on the parent reports each run on its own."""
    out = tmp_path / "demo"
    flags = ["--probe-size", "64", "--no-progress-bar", "--output-dir", str(out)]
    assert main(["demo", "--epochs", "2", "--noise-rate", "0.5", *flags]) == 0
    first = (out / "version_0" / "summary.json").read_text()
    assert main(["demo", "--epochs", "3", "--noise-rate", "0.3", *flags]) == 0
    printed = capsys.readouterr().out
    assert "(this run is 'version_1' there)" in printed
    assert sorted(p.name for p in out.iterdir()) == ["version_0", "version_1"]
    assert (out / "version_0" / "summary.json").read_text() == first  # the first run is untouched
    # each run holds only its own steps: 2 and 3 epochs of 41 steps, measured at the start and after each epoch
    for version, epochs in (("version_0", 2), ("version_1", 3)):
        assert len(_scalars(out / version)["order/A"]) == epochs + 1
        assert len(_scalars(out / version)["test_err"]) == 1

    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "holds 2 runs; reporting each on its own" in printed
    for version, epochs in (("version_0", 2), ("version_1", 3)):
        summary = json.loads((out / version / "summary.json").read_text())
        assert summary["logdir"] == str((out / version).resolve())
        assert summary["phases"][-1]["last_step"] == epochs * 41
        assert str((out / version / "report.png").resolve()) in printed

    assert main(["report", str(out), "-o", str(tmp_path / "one.png")]) == 1
    err = capsys.readouterr().err
    assert "holds 2 runs" in err and str(out / "version_0") in err and str(out / "version_1") in err
    assert not (tmp_path / "one.png").exists()


def test_read_run_refuses_a_directory_with_several_runs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from lightning_phases.errors import LightningPhasesError
    from lightning_phases.report import find_runs, read_run

    for name in ("a", "b/version_0"):
        writer = SummaryWriter(str(tmp_path / name))
        writer.add_scalar("order/A", 1.0, 0)
        writer.close()
    assert find_runs(str(tmp_path)) == [str(tmp_path / "a"), str(tmp_path / "b" / "version_0")]
    with pytest.raises(LightningPhasesError, match="holds 2 runs"):
        read_run(str(tmp_path))
    assert read_run(str(tmp_path / "b")).logdir == str(tmp_path / "b" / "version_0")  # one run below: that one


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
    if make == "empty":
        assert "No TensorBoard event files" in err and "parent" not in err  # no advice to point at a parent


def test_demo_bad_arguments(capsys):
    assert main(["demo", "--noise-rate", "1.5"]) == 1
    assert "--noise-rate" in capsys.readouterr().err


def test_help_and_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "lightning_phases.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "demo" in result.stdout and "report" in result.stdout
    assert main([]) == 2
