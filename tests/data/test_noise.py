"""Label-noise models: exact counts, never the true class, maps, matrices, determinism, errors."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import torch

from lightning_phases.data import (
    CIFAR10_PAIRFLIP,
    MNIST_PAIRFLIP,
    apply_label_noise,
    pairflip_noise,
    symmetric_noise,
    transition_noise,
    uniform_noise,
)
from lightning_phases.errors import LabelNoiseError


def _labels(n=1000, c=10, seed=0):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5, 0.8, 0.999])
def test_symmetric_exact_count_and_never_true_class(rate):
    y = _labels(1001)
    noisy = symmetric_noise(y, rate, 10, seed=3)
    assert int((noisy != y).sum()) == round(rate * 1001)
    assert noisy.dtype == torch.long and noisy.min() >= 0 and noisy.max() < 10


def test_symmetric_targets_are_uniform_over_the_other_classes():
    y = torch.zeros(30000, dtype=torch.long)
    noisy = symmetric_noise(y, 0.9, 4, seed=0)
    counts = Counter(noisy[noisy != 0].tolist())
    assert set(counts) == {1, 2, 3}
    for c in (1, 2, 3):
        assert abs(counts[c] / 27000 - 1 / 3) < 0.015


def test_uniform_may_keep_the_true_class():
    y = _labels(20000, 5)
    noisy = uniform_noise(y, 0.5, 5, seed=1)
    realised = float((noisy != y).float().mean())
    assert abs(realised - 0.5 * 4 / 5) < 0.015  # a resample lands on the true class 1/C of the time


@pytest.mark.parametrize("rate", [0.2, 0.45])
def test_pairflip_applies_the_map_with_exact_counts(rate):
    y = _labels(2000)
    noisy = pairflip_noise(y, rate, 10, CIFAR10_PAIRFLIP, seed=0)
    for src, dst in CIFAR10_PAIRFLIP.items():
        members = y == src
        flipped = members & (noisy != y)
        assert int(flipped.sum()) == round(rate * int(members.sum()))
        assert torch.all(noisy[flipped] == dst)
    unmapped = ~torch.isin(y, torch.tensor(list(CIFAR10_PAIRFLIP)))
    assert torch.equal(noisy[unmapped], y[unmapped])
    assert MNIST_PAIRFLIP == {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}
    assert CIFAR10_PAIRFLIP == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def test_transition_matrix_rows():
    t = torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8]])
    y = torch.tensor([0] * 20000 + [1] * 1000 + [2] * 20000)
    noisy = transition_noise(y, t, seed=0)
    assert torch.all(noisy[y == 1] == 1)
    assert abs(float((noisy[y == 0] == 1).float().mean()) - 0.3) < 0.015
    assert not bool((noisy[y == 0] == 2).any())
    assert abs(float((noisy[y == 2] == 2).float().mean()) - 0.8) < 0.015


def test_determinism_and_global_rng_untouched():
    y = _labels()
    state = torch.random.get_rng_state()
    a = symmetric_noise(y, 0.4, 10, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, symmetric_noise(y, 0.4, 10, seed=7))
    assert torch.equal(a, symmetric_noise(y, 0.4, 10, seed=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, symmetric_noise(y, 0.4, 10, seed=8))


def test_same_labels_in_another_process():
    code = (
        "import torch; from lightning_phases.data import symmetric_noise;"
        "y = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0));"
        "print(symmetric_noise(y, 0.4, 10, seed=7).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    assert eval(out) == symmetric_noise(_labels(), 0.4, 10, seed=7).tolist()  # noqa: S307 - our own output


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda y: symmetric_noise(y, 1.0, 10), r"noise rate must be in \[0, 1\); got 1.0"),
        (lambda y: symmetric_noise(y, -0.1, 10), "noise rate"),
        (lambda y: apply_label_noise(y, "gaussian", 0.2, 10), "unknown noise 'gaussian'"),
        (lambda y: pairflip_noise(y, 0.2, 10, {3: 12}), "class_map target class 12 does not exist"),
        (lambda y: pairflip_noise(y, 0.2, 10, {-1: 2}), "source class -1 does not exist"),
        (lambda y: pairflip_noise(y, 0.2, 10, {3: 3}), "to itself"),
        (lambda y: apply_label_noise(y, "pairflip", 0.2, 10), "needs a class_map"),
        (lambda y: transition_noise(y, torch.full((10, 10), 0.2)), "sums to 2"),
        (lambda y: transition_noise(y, torch.ones(10, 9) / 9), "C×C"),
        (lambda y: apply_label_noise(y, torch.eye(3), 0.0, 10), "must be 10×10"),
        (lambda y: symmetric_noise(y, 0.2, 5), r"targets must lie in \[0, 4\]"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(LabelNoiseError, match=match):
        call(_labels())
