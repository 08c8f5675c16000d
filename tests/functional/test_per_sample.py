"""Per-sample gradients and the Gram matrix against a slow autograd loop (SPEC.md notation)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_phases.errors import (
    LightningPhasesError,
    ParameterSelectionError,
    PhaseStatisticsWarning,
    UnsupportedModelError,
)
from lightning_phases.functional import (
    default_loss,
    gradient_gram,
    per_sample_grads,
    per_sample_grads_and_losses,
    select_parameters,
)
from tests.reference.autograd import loop_per_sample_grads


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(self.drop(x.flatten(1)))


def _binary(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 1))


def _cases():
    torch.manual_seed(1)
    cnn = _SmallCNN()
    # give BatchNorm non-trivial running statistics so eval mode matters
    cnn.bn.running_mean.uniform_(-0.5, 0.5)
    cnn.bn.running_var.uniform_(0.5, 2.0)
    return [
        ("mlp", _mlp(), torch.randn(11, 6), torch.randint(0, 4, (11,))),
        ("cnn", cnn, torch.randn(7, 1, 8, 8), torch.randint(0, 3, (7,))),
        ("binary", _binary(), torch.randn(9, 5), torch.randint(0, 2, (9,)).float()),
    ]


@pytest.mark.parametrize("name,model,x,y", _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_per_sample_grads_match_autograd_loop(name, model, x, y):
    jac, losses = per_sample_grads_and_losses(model, x, y)
    ref_jac, ref_losses = loop_per_sample_grads(model, x, y, default_loss)
    assert jac.shape == (x.shape[0], sum(p.numel() for p in model.parameters()))
    torch.testing.assert_close(jac, ref_jac, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    gram, g_losses = gradient_gram(model, x, y)
    assert gram.dtype == torch.float64 and gram.shape == (x.shape[0], x.shape[0])
    ref_gram = ref_jac.double() @ ref_jac.double().T
    torch.testing.assert_close(gram, ref_gram, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_losses, ref_losses, rtol=1e-5, atol=1e-6)


def test_default_loss_is_cross_entropy_and_logistic():
    logits = torch.tensor([0.3, -1.2, 2.0])
    assert torch.isclose(default_loss(logits, torch.tensor(2)), -torch.log_softmax(logits, 0)[2])
    one = torch.tensor([0.7])
    assert torch.isclose(default_loss(one, torch.tensor(1.0)), -torch.log(torch.sigmoid(torch.tensor(0.7))))
    assert torch.isclose(default_loss(one, torch.tensor(0.0)), -torch.log(1 - torch.sigmoid(torch.tensor(0.7))))


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 50])
def test_chunked_equals_unchunked(chunk):
    model, x, y = _mlp(), torch.randn(11, 6), torch.randint(0, 4, (11,))
    full = per_sample_grads(model, x, y)
    torch.testing.assert_close(per_sample_grads(model, x, y, chunk_size=chunk), full, rtol=1e-6, atol=1e-7)
    gram_full, loss_full = gradient_gram(model, x, y)
    gram_chunk, loss_chunk = gradient_gram(model, x, y, chunk_size=chunk)
    torch.testing.assert_close(gram_chunk, gram_full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss_chunk, loss_full)
    assert torch.equal(gram_chunk, gram_chunk.T)


def test_model_is_left_untouched():
    torch.manual_seed(0)
    model = _SmallCNN()
    model.train()
    model.drop.eval()  # a mixed state must be restored module by module
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    model(x).sum().backward()  # the user's own .grad fields
    before_state = copy.deepcopy(model.state_dict())
    before_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before_flags = {n: m.training for n, m in model.named_modules()}
    gradient_gram(model, x, y, chunk_size=4)
    per_sample_grads(model, x, y, params=["fc"])
    after_state = model.state_dict()
    for key, value in before_state.items():
        assert torch.equal(after_state[key], value), key
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before_grads[n]), n
    assert {n: m.training for n, m in model.named_modules()} == before_flags


def test_batchnorm_and_dropout_use_eval_mode():
    torch.manual_seed(3)
    model = _SmallCNN().train()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    a = per_sample_grads(model, x, y)
    b = per_sample_grads(model, x, y)
    assert torch.equal(a, b)  # no dropout randomness
    ref, _ = loop_per_sample_grads(model, x, y, default_loss)  # the reference runs in eval mode
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)


def test_param_selection_by_name_prefix_and_predicate():
    model, x, y = _mlp(), torch.randn(8, 6), torch.randint(0, 4, (8,))
    full = per_sample_grads(model, x, y)
    sizes = [p.numel() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    offsets = dict(zip(names, torch.tensor([0] + sizes).cumsum(0).tolist()))
    last = per_sample_grads(model, x, y, params="4")  # module prefix: 4.weight and 4.bias
    start = offsets["4.weight"]
    torch.testing.assert_close(last, full[:, start : start + sizes[-2] + sizes[-1]])
    only_bias = per_sample_grads(model, x, y, params=lambda n, p: n.endswith("bias"))
    cols = torch.cat(
        [torch.arange(offsets[n], offsets[n] + p.numel()) for n, p in model.named_parameters() if n.endswith("bias")]
    )
    torch.testing.assert_close(only_bias, full[:, cols])
    assert list(select_parameters(model, ["0.weight", "4"])) == ["0.weight", "4.weight", "4.bias"]


def test_frozen_parameters_are_excluded():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    selected = select_parameters(model)
    assert "0.weight" not in selected and "0.bias" in selected
    with pytest.raises(ParameterSelectionError, match="0.weight"):
        select_parameters(model, ["0.weight"])


def test_param_selection_errors():
    model = _mlp()
    with pytest.raises(ParameterSelectionError, match="'fc9' matches no trainable parameter"):
        select_parameters(model, ["fc9"])
    with pytest.raises(ParameterSelectionError, match="selected no trainable parameter"):
        select_parameters(model, lambda n, p: False)
    with pytest.raises(ParameterSelectionError):
        select_parameters(model, [])
    assert issubclass(ParameterSelectionError, ValueError)


def test_custom_loss_regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(5, 3), torch.randn(5)

    def mse(out, target):
        return (out.reshape(()) - target) ** 2

    jac = per_sample_grads(model, x, y, loss_fn=mse)
    # closed form: d/dw (w·x + b − y)² = 2 r x, d/db = 2 r
    resid = (model(x).reshape(-1) - y).detach()
    expected = torch.cat([2 * resid[:, None] * x, 2 * resid[:, None]], dim=1)
    torch.testing.assert_close(jac, expected, rtol=1e-5, atol=1e-6)


class _ItemModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 0:  # data-dependent control flow: not vmap-able
            return self.lin(x)
        return -self.lin(x)


def test_data_dependent_control_flow_falls_back_to_the_loop_engine_naming_the_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), _ItemModule())
    x, y = torch.randn(6, 6), torch.randint(0, 4, (6,))
    with pytest.warns(PhaseStatisticsWarning, match=r"module '1' \(_ItemModule\).*\.item\(\).*loop engine.*6 single"):
        jac, losses = per_sample_grads_and_losses(model, x, y)
    ref_jac, ref_losses = loop_per_sample_grads(model, x, y, default_loss)  # per-sample branch taken
    torch.testing.assert_close(jac, ref_jac, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)


def test_input_validation():
    model = _mlp()
    with pytest.raises(ValueError, match="targets has 3"):
        per_sample_grads(model, torch.randn(4, 6), torch.randint(0, 4, (3,)))
    with pytest.raises(ValueError, match="chunk_size"):
        gradient_gram(model, torch.randn(4, 6), torch.randint(0, 4, (4,)), chunk_size=0)
    with pytest.raises(ValueError, match="empty"):
        per_sample_grads(model, torch.randn(0, 6), torch.randint(0, 4, (0,)))


def test_nan_gradients_flow_through_without_crash():
    model = _mlp()
    x = torch.randn(4, 6)
    x[1, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the engine itself does not warn; statistics do
        gram, losses = gradient_gram(model, x, torch.randint(0, 4, (4,)))
    assert torch.isnan(losses[1]) and torch.isnan(gram[1]).all() and torch.isfinite(gram[0, 0])


def test_errors_are_value_errors():
    assert issubclass(UnsupportedModelError, LightningPhasesError)
    assert issubclass(LightningPhasesError, ValueError)
