"""Pytree inputs and a custom ``forward=``: every engine against the slow per-sample autograd loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_phases.errors import LightningPhasesError
from lightning_phases.functional import (
    default_forward,
    default_loss,
    gradient_gram,
    grouped_gradient_gram,
    per_sample_grads_and_losses,
)
from tests.reference.autograd import loop_gram, loop_per_sample_grads

METHODS = ["auto", "vmap", "ghost", "materialize"]


class _TwoInputs(nn.Module):
    """``forward(a, b)``: two inputs of different shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(4, 6)
        self.fb = nn.Linear(3, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, a, b):
        return self.head(torch.tanh(self.fa(a) + self.fb(b).mean(1)))


class _Keywords(nn.Module):
    """``forward(tokens=..., mask=..., scale=...)`` returning a dict, with a non-tensor keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, tokens, mask, scale=1.0):
        h = torch.tanh(self.proj(tokens)) * mask[..., None]
        pooled = h.sum(1) / mask.sum(1, keepdim=True)
        return {"logits": scale * self.head(pooled), "hidden": h}


def _two_inputs(n=9):
    torch.manual_seed(0)
    return _TwoInputs(), (torch.randn(n, 4), torch.randn(n, 5, 3)), torch.randint(0, 3, (n,))


def _keywords(n=8):
    torch.manual_seed(1)
    mask = (torch.rand(n, 6) > 0.3).float()
    mask[:, 0] = 1.0
    return _Keywords(), {"tokens": torch.randn(n, 6, 5), "mask": mask, "scale": 0.5}, torch.randint(0, 3, (n,))


def _logits(model, x):
    return model(**x)["logits"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", [None, 3])
def test_tuple_inputs_are_positional_arguments(method, chunk):
    model, x, y = _two_inputs()
    ref, ref_losses = loop_gram(model, x, y, default_loss)
    gram, losses = gradient_gram(model, x, y, method=method, chunk_size=chunk)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    as_list, _ = gradient_gram(model, list(x), y, method=method, chunk_size=chunk)
    torch.testing.assert_close(as_list, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", [None, 3])
def test_dict_inputs_with_a_custom_forward_picking_the_logits(method, chunk):
    model, x, y = _keywords()
    ref, ref_losses = loop_gram(model, x, y, default_loss, forward=_logits)
    gram, losses = gradient_gram(model, x, y, method=method, chunk_size=chunk, forward=_logits)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)


def test_per_sample_grads_of_dict_and_nested_inputs():
    model, x, y = _keywords()
    jac, losses = per_sample_grads_and_losses(model, x, y, forward=_logits, chunk_size=3)
    ref_jac, ref_losses = loop_per_sample_grads(model, x, y, default_loss, forward=_logits)
    torch.testing.assert_close(jac, ref_jac, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    # a nested container: ((a, b), label-free extras) passed through a forward that unpacks it
    model2, (a, b), y2 = _two_inputs()
    nested = {"pair": (a, b), "note": "unused"}

    def fwd(m, inp):
        return m(*inp["pair"])

    jac2, _ = per_sample_grads_and_losses(model2, nested, y2, forward=fwd)
    ref2, _ = loop_per_sample_grads(model2, (a, b), y2, default_loss)
    torch.testing.assert_close(jac2, ref2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_grouped_gram_with_pytree_inputs(method):
    model, x, y = _keywords()
    groups = torch.tensor([0, 1, 2, 0, 1, -1, 2, 0])
    jac, _ = loop_per_sample_grads(model, x, y, default_loss, forward=_logits)
    sums = torch.stack([jac[groups == g].double().sum(0) for g in range(3)])
    got, _ = grouped_gradient_gram(model, x, y, groups, num_groups=3, method=method, forward=_logits)
    torch.testing.assert_close(got, sums @ sums.T, rtol=1e-5, atol=1e-6)


def test_default_forward_convention():
    model, (a, b), _ = _two_inputs()
    torch.testing.assert_close(default_forward(model, (a, b)), model(a, b))
    lin = nn.Linear(4, 2)
    torch.testing.assert_close(default_forward(lin, a), lin(a))
    kw, x, _ = _keywords()
    torch.testing.assert_close(default_forward(kw, x)["logits"], kw(**x)["logits"])


def test_bad_pytree_inputs_are_explained():
    model, (a, b), y = _two_inputs()
    with pytest.raises(ValueError, match=r"same number of samples.*\[1\]: 4"):
        gradient_gram(model, (a, b[:4]), y)
    with pytest.raises(TypeError, match="holding tensors"):
        gradient_gram(model, {"a": 1.0}, y)
    kw, x, y = _keywords()
    with pytest.raises(LightningPhasesError, match=r'forward=lambda m, x: m\(x\)\["logits"\]'):
        gradient_gram(kw, x, y, method="vmap")
    with pytest.raises(LightningPhasesError, match="returned a dict"):
        gradient_gram(kw, x, y, method="auto")
