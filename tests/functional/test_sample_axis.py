"""The fast path proves each layer's per-sample quantity: wrong sample axes, tying and coupling go to exact engines.

Every case is checked against the slow per-sample autograd loop of
``tests/reference/autograd.py``; before this check existed, the fast path compared
only the summed gradient, which is right even when the sample axis is wrong.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_phases.errors import PhaseStatisticsWarning
from lightning_phases.functional import default_loss, eval_mode, gradient_gram, grouped_gradient_gram, select_parameters
from lightning_phases.functional.layer_gram import fast_layer_gram
from tests.reference.autograd import loop_gram, loop_per_sample_grads

METHODS = ["auto", "vmap", "loop", "ghost", "materialize"]
FAST = ["auto", "ghost", "materialize"]


class _TimeMajor(nn.Module):
    """``head(tanh(proj(x.transpose(0, 1))).mean(0))``: ``proj`` sees ``[T, n, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x.transpose(0, 1))).mean(0))


class _Encoder(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: [n, T, 8] either way
        if self.batch_first:
            return self.head(self.enc(x).mean(1))
        return self.head(self.enc(x.transpose(0, 1)).mean(0))


class _TiedEmbedding(nn.Module):
    """An Embedding whose weight is the output layer's weight (tied)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.emb(tokens).mean(1))))


class _CoupledAfter(nn.Module):
    """Samples coupled after the layer: each output is shifted by the batch mean of ``fc``'s output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h + h.mean(0, keepdim=True) ** 2)


def _gram_case(model, x, y, method, chunk=None):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        gram, losses = gradient_gram(model, x, y, method=method, chunk_size=chunk)
    return gram, losses, [str(w.message) for w in record if issubclass(w.category, PhaseStatisticsWarning)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,t", [(32, 5), (6, 6)])  # T == n: the layer's dim 0 has the right size
def test_time_major_linear(method, n, t):
    torch.manual_seed(0)
    model, x, y = _TimeMajor(), torch.randn(n, t, 12), torch.randint(0, 4, (n,))
    ref, ref_losses = loop_gram(model, x, y, default_loss)
    gram, losses, warned = _gram_case(model, x, y, method)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    if method in FAST:
        assert len(warned) == 1 and "'proj'" in warned[0], warned
        assert ("dim 0" in warned[0]) if n != t else ("weighted check" in warned[0])
    else:
        assert not warned


def test_time_major_issue_case_n64():
    """The issue's minimal case: relative Gram error 0.24-0.32 before, rounding now."""
    torch.manual_seed(0)
    model, x, y = _TimeMajor(), torch.randn(64, 5, 12), torch.randint(0, 4, (64,))
    ref, _ = loop_gram(model, x, y, default_loss)
    gram, _, warned = _gram_case(model, x, y, "auto")
    assert float((gram - ref).norm() / ref.norm()) < 1e-5
    assert any("'proj'" in w for w in warned)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [10, 5])  # n = 5 = seq: time-major with T == n
def test_transformer_encoder(batch_first, method, n):
    torch.manual_seed(1)
    model, x, y = _Encoder(batch_first), torch.randn(n, 5, 8), torch.randint(0, 3, (n,))
    ref, ref_losses = loop_gram(model, x, y, default_loss)
    gram, losses, warned = _gram_case(model, x, y, method, chunk=None if n == 5 else 4)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    flagged = {name for name in ("linear1", "linear2") if any(f"layers.0.{name}'" in w for w in warned)}
    assert flagged == ({"linear1", "linear2"} if method in FAST and not batch_first else set()), warned


@pytest.mark.parametrize("method", METHODS)
def test_tied_embedding_and_output_layer(method):
    torch.manual_seed(2)
    model, tokens, y = _TiedEmbedding(), torch.randint(0, 11, (12, 4)), torch.randint(0, 11, (12,))
    ref, _ = loop_gram(model, tokens, y, default_loss)
    gram, _, warned = _gram_case(model, tokens, y, method)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)
    assert not warned
    if method in FAST:  # the tied weight has one name, emb.weight, outside every fast layer: exact engines
        with eval_mode(model):
            _, _, covered, _ = fast_layer_gram(
                model, tokens, y, select_parameters(model), default_loss, chunk_size=None
            )
        assert covered == {"mix.weight", "mix.bias"}


@pytest.mark.parametrize("method", FAST)
def test_samples_coupled_after_a_layer_are_caught_by_the_weighted_check(method):
    """Cross-sample coupling: the per-sample gradient is the one of the loop over single samples; the fast
    path must not report a batch quantity. ``fc``'s outputs are coupled after it (the weighted check fails),
    ``head``'s inputs before it (the single-sample loss check fails)."""
    torch.manual_seed(3)
    model, x, y = _CoupledAfter(), torch.randn(9, 5), torch.randint(0, 3, (9,))
    ref, _ = loop_gram(model, x, y, default_loss)
    gram, _, warned = _gram_case(model, x, y, method)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)
    assert any("'fc'" in w and "weighted check" in w for w in warned), warned
    assert any("'head'" in w and "cross-sample coupling" in w for w in warned), warned


def test_grouped_gram_of_a_time_major_model():
    torch.manual_seed(4)
    model, x, y = _TimeMajor(), torch.randn(7, 7, 12), torch.randint(0, 4, (7,))
    groups = torch.tensor([0, 1, 0, 2, 1, -1, 2])
    jac, _ = loop_per_sample_grads(model, x, y, default_loss)
    sums = torch.stack([jac[groups == g].double().sum(0) for g in range(3)])
    with pytest.warns(PhaseStatisticsWarning, match="'proj'"):
        got, _ = grouped_gradient_gram(model, x, y, groups, num_groups=3)
    torch.testing.assert_close(got, sums @ sums.T, rtol=1e-5, atol=1e-6)


def test_a_correct_model_passes_every_check_and_keeps_its_layers():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(20, 6), torch.randint(0, 4, (20,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PhaseStatisticsWarning)
        with eval_mode(model):
            _, _, covered, _ = fast_layer_gram(model, x, y, select_parameters(model), default_loss, chunk_size=7)
    assert covered == {n for n, _ in model.named_parameters()}


def test_the_check_leaves_the_global_random_state_alone():
    torch.manual_seed(6)
    model, x, y = _TimeMajor(), torch.randn(6, 6, 12), torch.randint(0, 4, (6,))
    state = torch.get_rng_state()
    with pytest.warns(PhaseStatisticsWarning):
        gradient_gram(model, x, y)
    assert torch.equal(torch.get_rng_state(), state)


class _CoupledBefore(nn.Module):
    """Samples coupled before the layer (batch-centred inputs): invisible to the gradient checks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x - 0.5 * x.mean(0, keepdim=True))))


@pytest.mark.parametrize("method", FAST)
def test_samples_coupled_before_a_layer_are_caught_by_the_single_sample_check(method):
    torch.manual_seed(7)
    model, x, y = _CoupledBefore(), torch.randn(9, 5), torch.randint(0, 3, (9,))
    ref, _ = loop_gram(model, x, y, default_loss)
    gram, _, warned = _gram_case(model, x, y, method, chunk=4)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)
    assert any("'fc'" in w and "cross-sample coupling" in w for w in warned), warned
    assert any("'head'" in w for w in warned), warned


def test_half_precision_layers_go_to_the_exact_engines():
    """bfloat16 rounding is too coarse for the per-sample checks: no fast layer, the exact engines instead."""
    torch.manual_seed(8)
    model = _TimeMajor().to(torch.bfloat16)
    x, y = torch.randn(6, 6, 12, dtype=torch.bfloat16), torch.randint(0, 4, (6,))
    with eval_mode(model):
        gram, _, covered, _ = fast_layer_gram(model, x, y, select_parameters(model), default_loss, chunk_size=None)
    assert gram is None and not covered
    gram, _ = gradient_gram(model, x, y)
    torch.testing.assert_close(gram, gradient_gram(model, x, y, method="vmap")[0], rtol=0, atol=0)
    ref, _ = loop_gram(model.double(), x.double(), y, default_loss)  # per-sample truth, bfloat16 rounding apart
    torch.testing.assert_close(gram, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
