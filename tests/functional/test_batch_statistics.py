"""BatchNorm without running statistics: every method refuses it the same way, naming the module and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_phases.errors import UnsupportedModelError
from lightning_phases.functional import (
    default_loss,
    gradient_gram,
    grouped_gradient_gram,
    per_sample_grads,
    per_sample_grads_and_losses,
)
from tests.reference.autograd import loop_gram

METHODS = ["auto", "vmap", "loop", "ghost", "materialize"]


def _models():
    torch.manual_seed(0)
    return {
        "bn2d": (
            nn.Sequential(
                nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.Flatten(), nn.Linear(27, 3)
            ),
            torch.randn(6, 1, 5, 5),
            "1",
            "BatchNorm2d",
        ),
        "bn1d": (
            nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)),
            torch.randn(6, 4),
            "1",
            "BatchNorm1d",
        ),
        "sync": (
            nn.Sequential(nn.Linear(4, 5), nn.SyncBatchNorm(5, track_running_stats=False), nn.Linear(5, 3)),
            torch.randn(6, 4),
            "1",
            "SyncBatchNorm",
        ),
    }


@pytest.mark.parametrize("name", ["bn2d", "bn1d", "sync"])
def test_every_method_refuses_the_same_way(name):
    model, x, label, kind = _models()[name]
    y = torch.randint(0, 3, (x.shape[0],))
    messages = set()
    for method in METHODS:
        with pytest.raises(UnsupportedModelError) as info:
            gradient_gram(model, x, y, method=method)
        messages.add(str(info.value))
        with pytest.raises(UnsupportedModelError) as info:
            grouped_gradient_gram(model, x, y, torch.zeros(x.shape[0], dtype=torch.long), method=method)
        messages.add(str(info.value))
    for method in ("vmap", "loop"):
        with pytest.raises(UnsupportedModelError) as info:
            per_sample_grads_and_losses(model, x, y, method=method)
        messages.add(str(info.value))
    (message,) = messages  # one rule, one message
    assert f"module '{label}' ({kind})" in message
    assert "track_running_stats=True" in message and "GroupNorm" in message and "LayerNorm" in message


def test_batchnorm_with_running_statistics_is_measured_in_eval_mode():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    ref, _ = loop_gram(model, x, y, default_loss)
    for method in METHODS:
        gram, _ = gradient_gram(model, x, y, method=method)
        torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)
    assert model.training  # restored


def test_a_batchnorm_outside_the_selected_parameters_is_still_refused():
    model, x, _, _ = _models()["bn1d"]
    with pytest.raises(UnsupportedModelError, match="module '1'"):
        per_sample_grads(model, x, torch.randint(0, 3, (x.shape[0],)), params="2")
