"""The README's "Which models work" table is the one generated from the zoo's rows.

``scripts/zoo_table.py`` turns the row definitions of ``tests/zoo/models.py``
(whose expectations the other zoo tests verify) into Markdown. README.md holds
the table between the ``zoo-table`` markers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.zoo.models import CHECKS, ROWS, expected_refusal

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("zoo_table", ROOT / "scripts" / "zoo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documented_table(start: str, end: str) -> tuple[Path, str]:
    for path in (ROOT / "README.md",):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if start in text:
            body = text.split(start, 1)[1]
            assert end in body, f"{path.name}: the zoo table has no end marker"
            return path, body.split(end, 1)[0].strip()
    pytest.fail("README.md does not hold the zoo table (run scripts/zoo_table.py and paste it)")


def test_documented_table_is_the_generated_one() -> None:
    script = _script()
    path, documented = _documented_table(script.START, script.END)
    assert documented == script.zoo_table(), (
        f"the zoo table in {path.name} differs from the rows; paste the output of python scripts/zoo_table.py"
    )


def test_table_has_one_line_per_row_with_its_expectations() -> None:
    lines = _script().zoo_table().splitlines()[2:]
    assert len(lines) == len(ROWS)
    for line, row in zip(lines, ROWS):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row.setup
        for cell, check in zip(cells[1:5], ("auto", "vmap", "loop", "fit")):
            if check in row.needs:
                assert cell == "✗ not yet"
            else:
                assert cell == ("refused" if expected_refusal(row.expect[check]) else "✓ exact")


def test_adapter_examples_run() -> None:
    """The "Adapting the probe to your model" examples construct what they say (no training needed)."""
    import re

    for path in (ROOT / "README.md",):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if "### Adapting the probe to your model" in text:
            section = text.split("### Adapting the probe to your model", 1)[1].split("\n## ", 1)[0]
            blocks = re.findall(r"```python\n(.*?)```", section, re.S)
            assert blocks, f"{path.name}: the adapter section has no python example"
            namespace: dict = {}
            exec(compile(blocks[0], f"{path.name}:adapter-examples", "exec"), namespace)
            assert len(namespace["callbacks"]) == 3
            return
    pytest.fail("README.md has no adapter section")


def test_rows_are_well_formed() -> None:
    names = [r.name for r in ROWS]
    assert len(set(names)) == len(names)
    for r in ROWS:
        assert set(r.expect) == set(CHECKS), r.name
        assert set(r.needs) <= set(CHECKS), r.name
        for expectation in r.expect.values():
            expected_refusal(expectation)  # raises on a malformed expectation
