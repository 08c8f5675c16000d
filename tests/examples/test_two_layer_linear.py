"""examples/two_layer_linear.py runs in smoke mode and writes three comparable TensorBoard runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
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


@pytest.mark.slow
def test_the_three_runs_show_what_the_readme_claims(tmp_path):
    """README: with label noise (and SAM) the mean neuron norm falls, then the cosine with θ* rises; plain SGD
    stays lazy (its norm and cosine barely move). The script's default settings, 3000 steps per run."""
    results = _example().main(["--logdir", str(tmp_path)])

    def series(run: str, tag: str) -> list[float]:
        acc = EventAccumulator(str(tmp_path / "two_layer_linear" / "version_0" / run), size_guidance={"scalars": 0})
        acc.Reload()
        return [e.value for e in acc.Scalars(tag)]

    norm = {r: series(r, "two_layer/mean_norm") for r in results}
    cos = {r: series(r, "two_layer/mean_abs_cosine") for r in results}
    # plain SGD is lazy: within 2% of where it started
    assert abs(norm["sgd"][-1] - norm["sgd"][0]) < 0.02 * norm["sgd"][0]
    assert abs(cos["sgd"][-1] - cos["sgd"][0]) < 0.05
    for run in ("label_noise_sgd", "sam"):
        assert norm[run][-1] < 0.8 * norm[run][0], run  # the norm falls
        assert cos[run][-1] > cos["sgd"][-1] + 0.1, run  # the alignment with θ* rises above plain SGD's
    assert cos["label_noise_sgd"][-1] > 0.85
    # "then": label-noise SGD's norm has done half its fall before its cosine has done half its rise
    n, c = norm["label_noise_sgd"], cos["label_noise_sgd"]
    half_fall = next(i for i, v in enumerate(n) if v <= (n[0] + n[-1]) / 2)
    half_rise = next(i for i, v in enumerate(c) if v >= (c[0] + c[-1]) / 2)
    assert half_fall < half_rise
