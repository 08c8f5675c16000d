"""The key registry: the one place metric names are spelled, and what the monitors log against it."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import pytorch_lightning as pl

from lightning_phases import NoiseSplitTracker, OrderParameterMonitor, keys
from lightning_phases.errors import LightningPhasesError
from tests.callbacks.helpers import NoisyTensorDataset, TinyClassifier, loader, trainer

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lightning_phases"
# Files another branch rewrites that still spell their own keys; the integrator switches them to the registry.
PENDING: dict[str, str] = {}  # files allowed to spell a prefix's keys literally (none)


def _string_constants(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node


def test_no_package_file_but_keys_py_spells_a_registered_key():
    names = set(keys.registry_names())
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "keys.py":
            continue
        for node in _string_constants(ast.parse(path.read_text())):
            if node.value in names and not (rel in PENDING and node.value.startswith(PENDING[rel] + "/")):
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not found, "spell these through lightning_phases.keys:\n" + "\n".join(found)


def test_the_scan_sees_a_literal_key():
    tree = ast.parse('x = {"order/R": 1}\n"""a docstring mentioning order/R is fine"""')
    assert [n.value for n in _string_constants(tree) if n.value in keys.registry_names()] == ["order/R"]


def _logged_metrics_section(cls) -> str:
    doc = cls.__doc__ or ""
    assert "Logged metrics:" in doc, cls
    return doc.split("Logged metrics:", 1)[1]


@pytest.mark.parametrize(
    "cls,tables",
    [
        (OrderParameterMonitor, [(keys.ORDER_PREFIX, keys.ORDER)]),
        (NoiseSplitTracker, [(keys.SPLIT_PREFIX, keys.SPLIT), (keys.SEGMENT_PREFIX, keys.SEGMENT)]),
    ],
)
def test_every_registered_key_of_a_monitor_is_in_its_docstring(cls, tables):
    section = _logged_metrics_section(cls)
    for prefix, table in tables:
        for stat in table:
            assert f"``{prefix}/{stat}``" in section, f"{cls.__name__}: {prefix}/{stat}"


def test_every_key_logged_in_a_run_is_registered_and_documented(tmp_path):
    pl.seed_everything(0, verbose=False)
    tb = pl.loggers.TensorBoardLogger(tmp_path / "tb")
    rec = trainer(tmp_path, [], max_epochs=1).loggers[0]
    callbacks = [OrderParameterMonitor(probe_size=48, figure_every_n=1), NoiseSplitTracker(probe_size=48)]
    trainer(tmp_path, callbacks, max_epochs=1, logger=[rec, tb]).fit(TinyClassifier(), loader(NoisyTensorDataset()))
    logged = {k for _, m in rec.records for k in m if "/" in k}
    assert {"order/R", "split/R_cw", "segment/ratio", "segment/ratio/0"} <= logged
    docs = _logged_metrics_section(OrderParameterMonitor) + _logged_metrics_section(NoiseSplitTracker)
    for key in logged:
        prefix, stat = key.split("/", 1)
        per_class = re.fullmatch(r"(ratio|cos)/\d+", stat)
        table = keys.REGISTRY[prefix]
        assert (stat.split("/")[0] if per_class else stat) in table, key
        assert (f"``{prefix}/{stat.split('/')[0]}/<c>``" in docs) if per_class else (f"``{key}``" in docs), key


def test_names_and_prefixes():
    assert keys.name("order_head", "R", table=keys.ORDER) == "order_head/R"
    assert keys.split("R_cw") == "split/R_cw" and keys.segment("ratio/3") == "segment/ratio/3"
    assert keys.segment_prefix("split") == "segment" and keys.segment_prefix("split_head") == "segment_head"
    assert keys.segment_prefix("noise") == "noise_segment"
    with pytest.raises(KeyError, match="nope"):
        keys.order("nope")
    for bad in ("", "a/b", " order", 3):
        with pytest.raises(LightningPhasesError, match="prefix"):
            keys.check_prefix(bad)
    # every statistic PhaseTracker reads is a registered key
    assert set(keys.TRACKER_STATISTICS.values()) <= set(keys.registry_names())
