"""The README's Quickstart is what CI runs, and its first command works."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README Quickstart has no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands():
    commands = _quickstart_commands()
    assert len(commands) == 2, commands
    assert commands[0].startswith("pip install")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _quickstart_commands()[1] in [line.strip() for line in ci]


def test_quickstart_main_job_runs(tmp_path):
    """The first command's main job (after `pip install .`) is the installed `lightning-phases demo`; run it shortened."""
    main_job = _quickstart_commands()[0].split("&&", 1)[1].strip().split()
    assert main_job == ["lightning-phases", "demo"]
    script = shutil.which("lightning-phases")
    command = [script] if script else [sys.executable, "-m", "lightning_phases.cli"]  # not on PATH: same entry point
    result = subprocess.run(
        [*command, "demo", "--epochs", "2", "--probe-size", "64", "--no-progress-bar", "--output-dir", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Phase timeline" in result.stdout and f"tensorboard --logdir {tmp_path}" in result.stdout
    assert (tmp_path / "version_0" / "report.png").exists()


def test_readme_figure_and_links_exist():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to a missing file: {target}"
