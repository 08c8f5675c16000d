"""The exact per-sample loop engine, and the fallback to it where torch.func cannot run the model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_phases.errors import (
    LightningPhasesError,
    PhaseStatisticsWarning,
    ProbeMemoryError,
    UnsupportedModelError,
)
from lightning_phases.functional import (
    default_loss,
    gradient_gram,
    grouped_gradient_gram,
    per_sample_grads,
    per_sample_grads_and_losses,
)
from lightning_phases.functional.per_sample import GRAM_METHODS
from tests.reference.autograd import loop_gram, loop_per_sample_grads

METHODS = ["auto", "vmap", "loop", "ghost", "materialize"]


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(4, 6, batch_first=batch_first)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x: [n, T, 4]
        h, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head(h[:, -1] if self.batch_first else h[-1])


class _InPlace(nn.Module):
    """Data-dependent Python control flow and an in-place update inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))  # outside the fast path: an exact engine
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc(x) * self.scale
        if float(h.detach().abs().max()) > 0.0:  # data-dependent Python control flow
            h = h.clone()
            h[:, 0] = h[:, 0] * 2.0
        return self.out(torch.tanh(h))


class _FixedBatch(nn.Module):
    """Works only on batches of exactly 8 samples: no per-sample engine can run it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.reshape = _Reshape8()

    def forward(self, x):
        return self.fc(self.reshape(x))


class _Reshape8(nn.Module):
    def forward(self, x):
        return x.view(8, -1)


class _OutOfMemory(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")


def _case(name: str, n: int = 10):
    torch.manual_seed(0)
    if name in ("gru", "rnn", "lstm"):
        cell = {"gru": nn.GRU, "rnn": nn.RNN, "lstm": nn.LSTM}[name]
        return _Recurrent(cell), torch.randn(n, 3, 4), torch.randint(0, 3, (n,))
    if name == "gru_time_major":
        return _Recurrent(nn.GRU, batch_first=False), torch.randn(n, 5, 4), torch.randint(0, 3, (n,))
    if name == "inplace":
        return _InPlace(), torch.randn(n, 5), torch.randint(0, 3, (n,))
    if name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        return model, torch.randn(n, 1, 6, 6), torch.randint(0, 3, (n,))
    raise KeyError(name)


def test_loop_is_a_gram_method():
    assert "loop" in GRAM_METHODS


@pytest.mark.parametrize("name", ["gru", "rnn", "lstm", "gru_time_major", "inplace", "cnn"])
@pytest.mark.parametrize(
    "method,chunk", [(m, None) for m in METHODS] + [("auto", 4), ("loop", 4), ("vmap", 3)], ids=str
)
def test_every_method_equals_the_autograd_loop(name, method, chunk):
    model, x, y = _case(name)
    ref, ref_losses = loop_gram(model, x, y, default_loss)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        gram, losses = gradient_gram(model, x, y, method=method, chunk_size=chunk)
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(gram, gram.T)
    ours = [str(w.message) for w in record if issubclass(w.category, PhaseStatisticsWarning)]
    if name in ("gru", "rnn", "gru_time_major", "inplace") and method != "loop":
        # one warning per call, naming the module and the cost
        assert len(ours) == 1, ours
        where = "'_InPlace' (_InPlace)" if name == "inplace" else "'rnn' (GRU)" if "gru" in name else "'rnn' (RNN)"
        assert where in ours[0] and "loop engine" in ours[0] and "single-sample" in ours[0], ours
        assert ".item()" not in ours[0].split("); using")[-1] and "BatchNorm" not in ours[0]
    else:
        assert not ours, ours


@pytest.mark.parametrize("name", ["gru", "cnn"])
def test_grouped_gram_with_the_loop_engine(name):
    model, x, y = _case(name)
    groups = torch.tensor([0, 1, 2, 0, 1, -1, 2, 0, 1, 1])
    jac, _ = loop_per_sample_grads(model, x, y, default_loss)
    sums = torch.stack([jac[groups == g].double().sum(0) for g in range(3)])
    for method in ("loop", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PhaseStatisticsWarning)
            got, _ = grouped_gradient_gram(model, x, y, groups, num_groups=3, method=method, chunk_size=3)
        torch.testing.assert_close(got, sums @ sums.T, rtol=1e-5, atol=1e-6)


def test_per_sample_grads_loop_method_and_fallback():
    model, x, y = _case("gru")
    ref, ref_losses = loop_per_sample_grads(model, x, y, default_loss)
    jac, losses = per_sample_grads_and_losses(model, x, y, method="loop", chunk_size=3)
    torch.testing.assert_close(jac, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    with pytest.warns(PhaseStatisticsWarning, match="'rnn' \\(GRU\\)"):
        torch.testing.assert_close(per_sample_grads(model, x, y), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(LightningPhasesError, match="method must be 'vmap' or 'loop'"):
        per_sample_grads(model, x, y, method="auto")


def test_loop_engine_leaves_model_grads_modes_and_rng_untouched():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model[1].eval()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    state = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    flags = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    gram, _ = gradient_gram(model, x, y, method="loop", chunk_size=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    ref, _ = loop_gram(model, x, y, default_loss)  # eval mode: dropout off
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)


def test_loop_with_pytree_inputs_and_custom_forward():
    torch.manual_seed(2)
    model = _Recurrent(nn.GRU)
    x = {"seq": torch.randn(7, 5, 4), "unused": torch.zeros(7)}
    y = torch.randint(0, 3, (7,))

    def fwd(m, inp):
        return m(inp["seq"])

    ref, _ = loop_gram(model, x, y, default_loss, forward=fwd)
    for method in ("loop", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PhaseStatisticsWarning)
            gram, _ = gradient_gram(model, x, y, method=method, forward=fwd, chunk_size=3)
        torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_a_model_that_fails_on_one_sample_is_refused_naming_the_module(method):
    model, x, y = _FixedBatch(), torch.randn(8, 4), torch.randint(0, 3, (8,))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(UnsupportedModelError, match=r"module 'reshape' \(_Reshape8\).*one sample") as info:
            gradient_gram(model, x, y, method=method)
    assert "BatchNorm" not in str(info.value) and ".item()" not in str(info.value)
    assert not any("loop engine instead" in str(w.message) for w in record)  # refused, not retried


@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
def test_a_loss_of_the_wrong_shape_is_an_error_not_a_fallback(method):
    model, x, y = _case("cnn")

    def per_class(out, target):  # returns [C], not a scalar
        return -torch.log_softmax(out, -1)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(LightningPhasesError, match="one scalar loss"):
            gradient_gram(model, x, y, method=method, loss_fn=per_class)
    assert not [w for w in record if issubclass(w.category, PhaseStatisticsWarning)]


@pytest.mark.parametrize("method", METHODS)
def test_out_of_memory_says_so_and_suggests_chunk_size(method):
    model, x, y = _OutOfMemory(), torch.randn(4, 4), torch.randint(0, 3, (4,))
    with pytest.raises(ProbeMemoryError, match=r"out of memory.*chunk_size.*probe_size"):
        gradient_gram(model, x, y, method=method)
    assert issubclass(ProbeMemoryError, UnsupportedModelError)


def test_the_exact_engines_multiply_in_float64_slices(monkeypatch):
    """``J Jᵀ`` of the exact engines is accumulated in float64 over parameter slices (any slice width)."""
    from lightning_phases.functional import per_sample

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 1000, generator=gen)
    b = torch.randn(3, 1000, generator=gen)
    want = a.double() @ b.double().T
    for width in (1000, 256, 7):
        monkeypatch.setattr(per_sample, "_PRODUCT_COLUMNS", width)
        got = per_sample._product64(a, b)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
