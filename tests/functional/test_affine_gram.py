"""The fast path of normalisation layers' affine parameters against a slow per-sample autograd loop."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_phases.errors import PhaseStatisticsWarning
from lightning_phases.functional import default_loss, eval_mode, gradient_gram, grouped_gradient_gram, select_parameters
from lightning_phases.functional.layer_gram import fast_layer_gram
from tests.reference.autograd import loop_per_sample_grads


class _ConvBN(nn.Module):
    """Conv → BatchNorm2d → GroupNorm, then BatchNorm1d and a Linear: a small ResNet-like stack."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, bias=False)
        self.gn = nn.GroupNorm(3, 6)
        self.fc1 = nn.Linear(6 * 2 * 2, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = F.relu(self.gn(self.conv2(h)))
        return self.fc2(torch.tanh(self.bn1(self.fc1(h.flatten(1)))))


class _SequenceLN(nn.Module):
    """A LayerNorm over the last dim of a [n, T, d] sequence and one over the last two dims."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.ln2 = nn.LayerNorm((3, 6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.ln2(torch.tanh(self.ln(self.fc(x))))
        return self.out(h.mean(1))


class _MixedRows(nn.Module):
    """The LayerNorm sees the batch in reverse order: its row i is not sample i."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.ln(self.fc(x).flip(0) * 1.0)
        return self.out(torch.tanh(h.flip(0)))


def _case(name: str):
    torch.manual_seed(0)
    if name == "conv_bn":
        model = _ConvBN()
        for bn in (model.bn, model.bn1):  # non-trivial running statistics and affine parameters
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.3)
        x = torch.randn(7, 2, 6, 6)
    elif name == "sequence_ln":
        model = _SequenceLN()
        x = torch.randn(7, 3, 4)
    else:
        model = _MixedRows()
        x = torch.randn(7, 4)
    model.eval()
    return model, x, torch.randint(0, 3, (x.shape[0],))


def _covered(model, x, y):
    with eval_mode(model):
        _, _, covered, _ = fast_layer_gram(model, x, y, select_parameters(model, None), default_loss, chunk_size=None)
    return covered


@pytest.mark.parametrize("name", ["conv_bn", "sequence_ln"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_norm_affine_fast_path_equals_the_autograd_loop(name, chunk):
    model, x, y = _case(name)
    jac, ref_losses = loop_per_sample_grads(model, x, y, default_loss)
    jac = jac.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PhaseStatisticsWarning)  # no layer falls back
        gram, losses = gradient_gram(model, x, y, method="auto", chunk_size=chunk)
    torch.testing.assert_close(gram, jac @ jac.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses.to(losses.dtype), rtol=1e-5, atol=1e-6)
    assert torch.equal(gram, gram.T)
    # every parameter is on the fast path: the norm layers' affine parameters no longer need vmap
    assert _covered(model, x, y) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("name", ["conv_bn", "sequence_ln"])
def test_grouped_gram_of_norm_layers_equals_sums_of_autograd_gradients(name):
    model, x, y = _case(name)
    groups = torch.tensor([0, 1, -1, 0, 2, 1, 0])
    jac, _ = loop_per_sample_grads(model, x, y, default_loss)
    sums = torch.stack([jac[groups == g].double().sum(0) for g in range(4)])
    got, _ = grouped_gradient_gram(model, x, y, groups, num_groups=4, method="auto")
    torch.testing.assert_close(got, sums @ sums.T, rtol=1e-5, atol=1e-6)


def test_norm_layer_with_mixed_rows_fails_the_per_sample_check_and_falls_back():
    model, x, y = _case("mixed_rows")
    jac, _ = loop_per_sample_grads(model, x, y, default_loss)
    jac = jac.double()
    with pytest.warns(PhaseStatisticsWarning, match="'ln'"):
        gram, _ = gradient_gram(model, x, y, method="auto")
    torch.testing.assert_close(gram, jac @ jac.T, rtol=1e-5, atol=1e-6)


def test_batchnorm_in_training_mode_is_not_on_the_fast_path():
    from lightning_phases.functional._affine_gram import supported_affine

    bn = nn.BatchNorm2d(3)
    assert not supported_affine(bn.train())
    assert supported_affine(bn.eval())
    assert not supported_affine(nn.BatchNorm2d(3, affine=False).eval())
    assert not supported_affine(nn.LayerNorm(4, elementwise_affine=False))
    assert supported_affine(nn.GroupNorm(2, 4))
