"""Clean/mislabeled split (SPEC §2) and per-class segment gradients (SPEC §3)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_phases.errors import DegenerateInputError, PhaseStatisticsWarning
from lightning_phases.functional import (
    gradient_gram,
    per_sample_grads,
    segment_gradients,
    segment_groups,
    segment_statistics,
    segment_statistics_from_groups,
    single_logit_loss,
    split_order_parameters,
)
from tests.reference.ensemble import enumerate_split

FIELDS = ("rho", "A_c", "A_w", "A0_c", "A0_w", "A0", "R_cw", "R_ac", "R_aw")


def _jac(n: int, p: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        1, p, generator=gen, dtype=torch.float64
    )


@pytest.mark.parametrize(
    "n,noisy_idx,b,p",
    [(9, [0, 4, 7], 3, 6), (10, [1, 2, 3, 9], 4, 15), (8, [5], 4, 3), (7, [0, 1, 2, 3, 4, 5], 2, 8)],
)
def test_split_equals_enumeration(n, noisy_idx, b, p):
    jac = _jac(n, p, n + b)
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[noisy_idx] = True
    ref = enumerate_split(jac, noisy, b)
    split = split_order_parameters(jac @ jac.T, noisy, b)
    for field in FIELDS:
        assert math.isclose(getattr(split, field), ref[field], rel_tol=1e-6, abs_tol=1e-12), field
    # A0 of the split equals the unsplit A0 = ‖mean_i g_i‖²
    g = jac.mean(0)
    assert math.isclose(split.A0, float(g @ g), rel_tol=1e-9)
    assert split.as_dict()["rho"] == len(noisy_idx) / n


def test_split_accepts_int_masks_and_opposite_gradients():
    v = torch.randn(1, 4, dtype=torch.float64)
    jac = torch.cat([v.repeat(6, 1), -v.repeat(3, 1)])
    split = split_order_parameters(jac @ jac.T, torch.tensor([0] * 6 + [1] * 3), 3)
    assert math.isclose(split.R_cw, -1.0, abs_tol=1e-12)
    assert math.isclose(split.A0_c, (2 / 3) ** 2 * float(v @ v.T), rel_tol=1e-12)


def test_split_errors():
    gram = torch.eye(5, dtype=torch.float64)
    with pytest.raises(DegenerateInputError, match="no mislabeled sample"):
        split_order_parameters(gram, torch.zeros(5, dtype=torch.bool), 2)
    with pytest.raises(DegenerateInputError, match="no clean sample"):
        split_order_parameters(gram, torch.ones(5, dtype=torch.bool), 2)
    with pytest.raises(DegenerateInputError, match="shape"):
        split_order_parameters(gram, torch.zeros(4, dtype=torch.bool), 2)
    with pytest.raises(DegenerateInputError, match="larger"):
        split_order_parameters(gram, torch.tensor([1, 0, 0, 0, 0]), 6)
    with pytest.raises(DegenerateInputError, match="boolean"):
        split_order_parameters(gram, torch.tensor([2, 0, 0, 0, 0]), 2)


def test_split_nan_and_zero_gradients_warn():
    jac = _jac(6, 3, 0)
    gram = jac @ jac.T
    mask = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)
    bad = gram.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(PhaseStatisticsWarning) as record:
        split = split_order_parameters(bad, mask, 2)
    assert len(record) == 1 and math.isnan(split.A_c) and split.rho == 2 / 6
    jac[mask] = 0.0
    with pytest.warns(PhaseStatisticsWarning, match="zero"):
        split = split_order_parameters(jac @ jac.T, mask, 2)
    assert math.isnan(split.R_cw) and split.A0_w == 0


def test_segment_statistics_equal_explicit_sums():
    n, p = 12, 7
    jac = _jac(n, p, 3)
    true = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 0, 1])
    noisy = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    seg = segment_statistics(jac @ jac.T, true, noisy)
    assert seg.classes.tolist() == [0, 1, 2]
    for k, c in enumerate([0, 1, 2]):
        clean_sum = jac[(true == c) & ~noisy].sum(0)
        noisy_sum = jac[(true == c) & noisy].sum(0)
        assert seg.num_clean[k] == int(((true == c) & ~noisy).sum())
        assert math.isclose(seg.clean_norm[k], float(clean_sum.norm()), rel_tol=1e-9)
        assert math.isclose(seg.noisy_norm[k], float(noisy_sum.norm()), rel_tol=1e-9, abs_tol=1e-12)
        if c == 2:  # no mislabeled sample of class 2
            assert math.isnan(seg.ratio[k]) and math.isnan(seg.cos[k])
        else:
            assert math.isclose(seg.ratio[k], float(clean_sum.norm() / noisy_sum.norm()), rel_tol=1e-9)
            cos = float(clean_sum @ noisy_sum / (clean_sum.norm() * noisy_sum.norm()))
            assert math.isclose(seg.cos[k], cos, rel_tol=1e-9)
    assert math.isclose(seg.mean_ratio, float(seg.ratio[:2].mean()), rel_tol=1e-12)


def test_segment_statistics_from_group_sums():
    n, p = 12, 7
    jac = _jac(n, p, 4).double()
    true = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 0, 1])
    noisy = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    groups, classes = segment_groups(true, noisy, classes=torch.tensor([2, 0]))
    assert classes.tolist() == [2, 0]
    for i in range(n):  # class 2 is segment pair 0/1, class 0 is 2/3, class 1 is left out
        expected = -1 if true[i] == 1 else 2 * [2, 0].index(int(true[i])) + int(noisy[i])
        assert groups[i] == expected
    sums = torch.stack([jac[groups == g].sum(0) for g in range(4)])
    seg = segment_statistics_from_groups(sums @ sums.T, true, noisy, classes=classes)
    ref = segment_statistics(jac @ jac.T, true, noisy, classes=classes)
    for field in ("num_clean", "num_noisy", "clean_norm", "noisy_norm", "ratio", "cos"):
        torch.testing.assert_close(getattr(seg, field), getattr(ref, field), rtol=1e-12, atol=1e-12, equal_nan=True)
    assert seg.num_noisy.tolist() == [0, 2] and math.isnan(seg.ratio[0])
    with pytest.raises(DegenerateInputError, match="shape"):
        segment_statistics_from_groups(sums[:3, :3] @ sums[:3, :3].T, true, noisy, classes=classes)


def test_single_logit_gradient_matches_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(6, 5)
    given = torch.tensor([0, 1, 2, 0, 2, 1])
    true = torch.tensor([0, 2, 2, 1, 2, 0])
    jac = per_sample_grads(model, x, torch.stack([given, true], 1), loss_fn=single_logit_loss)
    for i in range(6):
        model.zero_grad()
        h = model(x[i : i + 1])[0]
        c = int(true[i])
        coef = torch.softmax(h, 0)[c].item() - float(given[i] == c)
        h[c].backward()
        ref = coef * torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(jac[i], ref, rtol=1e-5, atol=1e-6)


def _clusters(n_per_class: int, num_classes: int, delta: float, dim: int, seed: int):
    """Separated Gaussian clusters with exactly round(delta * n) mislabeled samples per class."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(num_classes, dim, generator=gen) / math.sqrt(dim)
    true = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[true] + 0.3 * torch.randn(len(true), dim, generator=gen) / math.sqrt(dim)
    given = true.clone()
    n_flip = round(delta * n_per_class)
    for c in range(num_classes):
        idx = torch.nonzero(true == c).flatten()[:n_flip]
        offset = torch.randint(1, num_classes, (n_flip,), generator=gen)
        given[idx] = (c + offset) % num_classes
    return x, given, true


def _wide_relu(dim: int, width: int, out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, out))
    with torch.no_grad():
        model[2].weight.mul_(0.01)  # output near 0 at initialisation, as in the infinite-width limit
        model[2].bias.zero_()
    return model


@pytest.mark.parametrize("delta", [0.2, 0.35])
def test_binary_segment_ratio_at_init_is_clean_priority_prediction(delta):
    x, given, true = _clusters(60, 2, delta, dim=10, seed=1)
    model = _wide_relu(10, 2048, 1, seed=2)
    seg = segment_gradients(model, x, given.float(), true)
    expected = (1 - delta) / delta
    for k in range(2):
        assert seg.ratio[k] == pytest.approx(expected, rel=0.1)
        assert seg.cos[k] < -0.95


def test_multiclass_segment_ratio_at_init_is_clean_priority_prediction():
    delta, num_classes = 0.3, 4
    x, given, true = _clusters(50, num_classes, delta, dim=12, seed=3)
    model = _wide_relu(12, 2048, num_classes, seed=4)
    seg = segment_gradients(model, x, given, true, chunk_size=64)
    expected = (num_classes - 1) * (1 - delta) / delta
    for k in range(num_classes):
        assert seg.ratio[k] == pytest.approx(expected, rel=0.1)
        assert seg.cos[k] < -0.95
    # the same numbers from the public Gram + statistics path
    pair = torch.stack([given, true], 1)
    gram, _ = gradient_gram(model, x, pair, loss_fn=single_logit_loss)
    torch.testing.assert_close(segment_statistics(gram, true, given != true).ratio, seg.ratio, rtol=1e-5, atol=0)


def test_segment_ratio_falls_with_training():
    """Clean-priority learning: the ratio starts near (1−δ)/δ and falls as the clean data is learned."""
    delta = 0.25
    x, given, true = _clusters(60, 2, delta, dim=10, seed=5)
    model = _wide_relu(10, 512, 1, seed=6)
    start = segment_gradients(model, x, given.float(), true).mean_ratio
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(x).reshape(-1), given.float()).backward()
        opt.step()
    later = segment_gradients(model, x, given.float(), true).mean_ratio
    assert start == pytest.approx((1 - delta) / delta, rel=0.15)
    assert later < 0.6 * start


def test_segment_gradients_errors():
    model = _wide_relu(3, 8, 2, 0)
    with pytest.raises(DegenerateInputError, match="shape"):
        segment_gradients(model, torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0]))
