"""The per-layer fast Gram path agrees with the vmap engine and leaves the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_phases.errors import PhaseStatisticsWarning
from lightning_phases.functional import (
    default_loss,
    eval_mode,
    gradient_gram,
    grouped_gradient_gram,
    select_parameters,
    single_logit_loss,
)
from lightning_phases.functional.layer_gram import fast_layer_gram
from tests.reference.autograd import loop_per_sample_grads

METHODS = ["auto", "ghost", "materialize"]


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, dilation=1, bias=False)
        self.conv3 = nn.Conv2d(5, 6, 2, padding="valid")
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x), inplace=True)
        x = F.relu(self.conv2(x))
        x = torch.tanh(self.conv3(x))
        return self.fc(x.flatten(1))


class _Mixed(nn.Module):
    """Supported layers next to LayerNorm, a grouped conv and a free parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, groups=2)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        return self.fc2(self.scale * self.norm(torch.tanh(self.fc1(h))))


class _Sequence(nn.Module):
    """A Linear layer applied at every position of a sequence, then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(1))


class _Shared(nn.Module):
    """One Linear module called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class _Tied(nn.Module):
    """The first layer's weight is also used functionally, outside its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        return self.out(F.linear(h, self.enc.weight.T))


def _case(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return (
            nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)),
            torch.randn(13, 6),
            torch.randint(0, 4, (13,)),
        )
    if name == "mlp_nobias":
        return (
            nn.Sequential(nn.Linear(6, 9, bias=False), nn.ReLU(), nn.Linear(9, 4)),
            torch.randn(10, 6),
            torch.randint(0, 4, (10,)),
        )
    if name == "cnn":
        return _CNN(), torch.randn(9, 2, 8, 8), torch.randint(0, 3, (9,))
    if name == "mixed":
        return _Mixed(), torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))
    if name == "sequence":
        return _Sequence(), torch.randn(8, 4, 5), torch.randint(0, 3, (8,))
    if name == "binary":
        return (
            nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 1)),
            torch.randn(9, 5),
            torch.randint(0, 2, (9,)).float(),
        )
    if name == "shared":
        return _Shared(), torch.randn(7, 6), torch.randint(0, 3, (7,))
    raise KeyError(name)


CASES = ["mlp", "mlp_nobias", "cnn", "mixed", "sequence", "binary", "shared"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", [None, 4])
def test_fast_path_equals_vmap_engine_and_autograd_loop(name, method, chunk):
    model, x, y = _case(name)
    ref_gram, ref_losses = gradient_gram(model, x, y, method="vmap")
    jac, _ = loop_per_sample_grads(model, x, y, default_loss)
    torch.testing.assert_close(ref_gram, jac.double() @ jac.double().T, rtol=1e-5, atol=1e-6)
    gram, losses = gradient_gram(model, x, y, method=method, chunk_size=chunk)
    torch.testing.assert_close(gram, ref_gram, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(gram, gram.T)


def _groups(n: int, unequal: bool = False) -> tuple[Tensor, int]:
    """Groups 0..3 with -1 (left out) samples and an empty group 4.

    ``unequal``: one large group and three singletons, so that padding the
    groups to equal size would more than double the work (the per-group path).
    """
    if unequal:
        return torch.tensor([0] * (n - 4) + [1, -1, 3, 2]), 5
    groups = torch.tensor([(3 * i) % 5 - 1 for i in range(n)])
    groups[groups == 3] = 2
    return groups, 5


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("method", METHODS + ["vmap"])
@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("unequal", [False, True])
def test_grouped_gram_equals_sums_of_autograd_gradients(name, method, chunk, unequal):
    model, x, y = _case(name)
    groups, k = _groups(x.shape[0], unequal)
    jac, ref_losses = loop_per_sample_grads(model, x, y, default_loss)
    sums = torch.stack([jac[groups == g].double().sum(0) for g in range(k)])  # the slow reference
    got, losses = grouped_gradient_gram(model, x, y, groups, num_groups=k, method=method, chunk_size=chunk)
    assert got.shape == (k, k) and got.dtype == torch.float64
    torch.testing.assert_close(got, sums @ sums.T, rtol=1e-5, atol=1e-6)
    assert torch.equal(got, got.T)
    assert not got[4].any()  # the empty group
    torch.testing.assert_close(losses, ref_losses.to(losses.dtype), rtol=1e-5, atol=1e-6)


def test_grouped_gram_parameter_subsets_and_single_logit_loss():
    model, x, y = _case("cnn")
    groups, k = _groups(x.shape[0])
    member = torch.stack([(groups == g).double() for g in range(k)])
    pair = torch.stack([y, (y + 1) % 3], 1)
    for params, targets, loss_fn in ((["conv2", "fc.bias"], y, default_loss), (None, pair, single_logit_loss)):
        ref, _ = gradient_gram(model, x, targets, params=params, loss_fn=loss_fn, method="vmap")
        got, _ = grouped_gradient_gram(model, x, targets, groups, num_groups=k, params=params, loss_fn=loss_fn)
        torch.testing.assert_close(got, member @ ref @ member.T, rtol=1e-5, atol=1e-6)


def test_grouped_gram_rejects_bad_groups():
    model, x, y = _case("mlp")
    n = x.shape[0]
    with pytest.raises(ValueError, match="shape"):
        grouped_gradient_gram(model, x, y, torch.zeros(n - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        grouped_gradient_gram(model, x, y, torch.zeros(n))
    with pytest.raises(ValueError, match=">= -1"):
        grouped_gradient_gram(model, x, y, torch.full((n,), -2))
    with pytest.raises(ValueError, match="num_groups"):
        grouped_gradient_gram(model, x, y, torch.arange(n), num_groups=3)


def test_float64_model_is_exact():
    model, x, y = _case("cnn")
    model = model.double()
    x = x.double()
    ref, _ = gradient_gram(model, x, y, method="vmap")
    for method in METHODS:
        torch.testing.assert_close(gradient_gram(model, x, y, method=method)[0], ref, rtol=1e-10, atol=1e-12)


def _plans(model, x, y, params=None, loss_fn=default_loss, force=None, chunk_size=None):
    with eval_mode(model):
        return fast_layer_gram(
            model, x, y, select_parameters(model, params), loss_fn, chunk_size=chunk_size, force=force
        )


def test_fast_path_covers_the_supported_layers():
    model, x, y = _case("mixed")
    _, _, covered, plans = _plans(model, x, y)
    # the LayerNorm's affine parameters take the elementwise fast path (_affine_gram); grouped conv, scale: vmap
    assert covered == {"fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias"}
    model, x, y = _case("cnn")
    _, _, covered, plans = _plans(model, x, y)
    assert covered == {n for n, _ in model.named_parameters()}
    by_name = {p.name: p for p in plans}
    assert by_name["conv1"].positions == 64 and by_name["conv1"].method == "materialize"  # many patches
    assert by_name["fc"].positions == 1 and by_name["fc"].method == "ghost"  # 2-D input: ghost is cheaper
    model, x, y = _case("shared")
    _, _, covered, _ = _plans(model, x, y)
    assert covered == {"out.weight", "out.bias"}  # a module called twice is left to vmap


def test_auto_picks_the_cheaper_method_by_operation_count():
    model, x, y = _case("sequence")
    plans = {p.name: p for p in _plans(model, x, y)[3]}
    for plan in plans.values():
        expected = "ghost" if plan.ghost_cost <= plan.materialize_cost else "materialize"
        assert plan.method == expected
    forced = {p.name: p.method for p in _plans(model, x, y, force="materialize")[3]}
    assert set(forced.values()) == {"materialize"}


def test_weight_tying_falls_back_with_a_warning():
    torch.manual_seed(1)
    model, x, y = _Tied(), torch.randn(6, 6), torch.randint(0, 3, (6,))
    ref, _ = gradient_gram(model, x, y, method="vmap")
    with pytest.warns(PhaseStatisticsWarning, match="enc"):
        gram, _ = gradient_gram(model, x, y)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)


def test_parameter_subsets_and_single_logit_loss():
    model, x, y = _case("cnn")
    for params in (["fc.bias"], ["conv2"], ["conv1.weight", "fc"], lambda n, p: "bias" in n):
        ref, _ = gradient_gram(model, x, y, params=params, method="vmap")
        torch.testing.assert_close(gradient_gram(model, x, y, params=params)[0], ref, rtol=1e-5, atol=1e-6)
    pair = torch.stack([y, (y + 1) % 3], 1)
    ref, _ = gradient_gram(model, x, pair, loss_fn=single_logit_loss, method="vmap")
    got, _ = gradient_gram(model, x, pair, loss_fn=single_logit_loss)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_model_untouched_by_fast_path():
    model, x, y = _case("cnn")
    model.train()
    model.conv2.eval()
    model(x).sum().backward()
    state = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags = {n: m.training for n, m in model.named_modules()}
    gradient_gram(model, x, y, chunk_size=4)
    for n, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks, n
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])


def test_unknown_method():
    model, x, y = _case("mlp")
    with pytest.raises(ValueError, match="method must be one of"):
        gradient_gram(model, x, y, method="fast")


class _TiedConv(nn.Module):
    """A convolution whose weight is also used functionally, outside its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 5 * 5, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = F.conv2d(h, self.conv.weight, padding=1)
        return self.fc(h.flatten(1))


def test_conv_weight_tying_falls_back_with_a_warning():
    torch.manual_seed(2)
    model, x, y = _TiedConv(), torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,))
    ref, _ = gradient_gram(model, x, y, method="vmap")
    with pytest.warns(PhaseStatisticsWarning, match="conv"):
        gram, _ = gradient_gram(model, x, y)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)


def test_no_false_tying_alarm_from_float32_rounding():
    """Many samples and positions: the summed-gradient check must tolerate float32 rounding.

    This exact random state made the earlier element-wise check reject the first
    convolution (a difference of 6e-5 on a sum over 10⁶ products) and send it to vmap.
    """
    import warnings

    torch.manual_seed(0)
    nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    torch.randn(1024, 784), torch.randint(0, 10, (1024,))
    x, y = torch.randn(1024, 3, 32, 32), torch.randint(0, 10, (1024,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PhaseStatisticsWarning)
        _, _, covered, _ = _plans(model, x, y)
    assert covered == {n for n, _ in model.named_parameters()}
