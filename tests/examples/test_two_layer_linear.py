"""examples/two_layer_linear.py runs in smoke mode and writes three comparable TensorBoard runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("two_layer_linear_example", ROOT / "examples" / "two_layer_linear.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_three_runs_under_one_root(tmp_path):
    results = _example().main(["--smoke", "--logdir", str(tmp_path)])
    assert set(results) == {"sgd", "label_noise_sgd", "sam"}
    for run in results:
        acc = EventAccumulator(str(tmp_path / "two_layer_linear" / "version_0" / run))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"two_layer/mean_norm", "two_layer/mean_alignment", "two_layer/mean_abs_cosine", "train_loss"} <= tags
        assert acc.Scalars("two_layer/mean_norm")[0].value == acc.Scalars("two_layer/mean_norm")[0].value  # not NaN


def test_a_rerun_writes_a_new_version(tmp_path):
    root = tmp_path / "two_layer_linear"
    _example().main(["--smoke", "--logdir", str(tmp_path)])
    first = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    _example().main(["--smoke", "--logdir", str(tmp_path)])
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]
    assert {p: p.read_bytes() for p in (root / "version_0").rglob("*") if p.is_file()} == first  # untouched
    for run in ("sgd", "label_noise_sgd", "sam"):
        acc = EventAccumulator(str(root / "version_1" / run), size_guidance={"scalars": 0})
        acc.Reload()
        assert len(acc.Scalars("two_layer/mean_norm")) > 0
