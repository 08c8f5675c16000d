"""The README's Quickstart is what CI runs, and its first command works."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_extras_install_what_the_examples_need():
    """The examples extra (which the first Quickstart command installs) brings `lightning` and a jsonargparse
    whose lower bound is the one the installed Lightning declares for its CLI; the README tells CPU-only users
    how to get the CPU build of torch."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "[examples]" in _quickstart_commands()[0]
    lightning_needs = [
        Requirement(r) for r in importlib.metadata.requires("lightning") or [] if r.startswith("jsonargparse")
    ]
    assert lightning_needs, "lightning declares no jsonargparse requirement"
    lower = {Version(s.version) for r in lightning_needs for s in r.specifier if s.operator == ">="}
    assert len(lower) == 1
    for extra in ("examples", "dev"):
        reqs = {Requirement(r).name: Requirement(r) for r in extras[extra]}
        assert "lightning" in reqs, extra
        ours = {Version(s.version) for s in reqs["jsonargparse"].specifier if s.operator == ">="}
        assert ours == lower, (extra, ours, lower)
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in readme
