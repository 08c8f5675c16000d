"""SAM against hand-computed updates, a reference loop, and inside Lightning's automatic optimization."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_phases import LightningPhasesError
from lightning_phases.optim import SAM
from tests.reference.sam import sam_reference_loop

# -- a quadratic by hand ---------------------------------------------------------------------------

A = np.array([[3.0, 0.5], [0.5, 1.0]])
B = np.array([1.0, -2.0])


def _hand_sam(w: np.ndarray, lr: float, rho: float, momentum: float, steps: int, adaptive: bool) -> np.ndarray:
    buf = None
    for _ in range(steps):
        g = A @ w - B
        t = np.abs(w) if adaptive else np.ones_like(w)
        e = rho * t * t * g / np.linalg.norm(t * g)
        g_adv = A @ (w + e) - B
        buf = g_adv if buf is None else momentum * buf + g_adv
        w = w - lr * buf
    return w


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_two_steps_on_a_quadratic_match_the_hand_computed_update(adaptive, momentum):
    w0 = np.array([0.7, -1.3])
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.05, momentum=momentum)
    At, Bt = torch.tensor(A), torch.tensor(B)
    losses = []

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ At @ w - Bt @ w
        loss.backward()
        return loss

    for _ in range(2):
        losses.append(float(opt.step(closure).detach()))
    expected = _hand_sam(w0, 0.05, 0.1, momentum, 2, adaptive)
    np.testing.assert_allclose(w.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    # step returns the loss at w (before the step), not at w + e(w)
    w1 = _hand_sam(w0, 0.05, 0.1, momentum, 1, adaptive)
    assert losses[1] == pytest.approx(0.5 * w1 @ A @ w1 - B @ w1, rel=1e-12)


def test_errors():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(LightningPhasesError, match="rho"):
        SAM([w], rho=0.0, lr=0.1)
    with pytest.raises(LightningPhasesError, match="base_optimizer"):
        SAM([w], torch.optim.SGD(params=[w], lr=0.1), lr=0.1)
    opt = SAM([w], lr=0.1)
    with pytest.raises(LightningPhasesError, match="closure.*16-mixed"):
        opt.step()

    def no_zero_grad():
        loss = (w - 1).pow(2).sum()
        loss.backward()
        return loss

    with pytest.raises(LightningPhasesError, match="zero_grad.*accumulate_grad_batches"):
        opt.step(no_zero_grad)


def test_scheduler_sees_the_base_param_groups():
    w = torch.zeros(2, requires_grad=True)
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=0.4, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = (w - 1).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


def test_batchnorm_running_stats_updated_once_per_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    single = copy.deepcopy(model)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt = SAM(model.parameters(), rho=0.5, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    single(x)  # one training-mode forward at the same starting weights
    for (name, b), (_, ref) in zip(model.named_buffers(), single.named_buffers()):
        torch.testing.assert_close(b, ref, rtol=0, atol=0, msg=name)


# -- Lightning -------------------------------------------------------------------------------------


class _Net(pl.LightningModule):
    def __init__(self, rho=0.1, lr=0.1, momentum=0.9, scheduler=False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
        self.rho, self.lr, self.momentum, self.scheduler = rho, lr, momentum, scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = SAM(self.parameters(), torch.optim.SGD, rho=self.rho, lr=self.lr, momentum=self.momentum)
        if self.scheduler:
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}
        return opt


def _data(n=48):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def _trainer(tmp_path, **kw):
    return pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        **kw,
    )


@pytest.mark.parametrize("clip", [None, 0.05])
def test_lightning_automatic_optimization_matches_reference_loop(tmp_path, clip):
    torch.manual_seed(0)
    module = _Net()
    ref = copy.deepcopy(module.net)
    ds = _data()
    kw = {} if clip is None else {"gradient_clip_val": clip}
    _trainer(tmp_path, max_epochs=2, **kw).fit(module, DataLoader(ds, batch_size=8))
    batches = list(DataLoader(ds, batch_size=8)) * 2
    sam_reference_loop(ref, batches, nn.functional.cross_entropy, lr=0.1, rho=0.1, momentum=0.9, clip_norm=clip)
    for p, q in zip(module.net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lightning_scheduler_and_checkpoint_resume(tmp_path):
    torch.manual_seed(0)
    init = _Net(scheduler=True)
    ds = _data()
    full = copy.deepcopy(init)
    _trainer(tmp_path / "full", max_epochs=3).fit(full, DataLoader(ds, batch_size=8))
    assert full.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)

    first = copy.deepcopy(init)
    t1 = _trainer(tmp_path / "a", max_epochs=2, enable_checkpointing=True)
    t1.fit(first, DataLoader(ds, batch_size=8))
    ckpt = tmp_path / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert saved["state"] and all("momentum_buffer" in s for s in saved["state"].values())
    resumed = copy.deepcopy(init)
    _trainer(tmp_path / "b", max_epochs=3).fit(resumed, DataLoader(ds, batch_size=8), ckpt_path=ckpt)
    for p, q in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_lightning_bf16_mixed_runs(tmp_path):
    torch.manual_seed(0)
    module = _Net()
    before = [p.detach().clone() for p in module.parameters()]
    _trainer(tmp_path, max_epochs=1, precision="bf16-mixed").fit(module, DataLoader(_data(), batch_size=8))
    for p, b in zip(module.parameters(), before):
        assert torch.isfinite(p).all() and not torch.equal(p, b)


def test_lightning_gradient_accumulation_raises(tmp_path):
    with pytest.raises(LightningPhasesError, match="accumulate_grad_batches"):
        _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2).fit(_Net(), DataLoader(_data(), batch_size=8))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rho=float("inf")), "rho is the neighbourhood radius"),
        (dict(rho=float("nan")), "rho is the neighbourhood radius"),
        (dict(rho=-0.05), "rho is the neighbourhood radius"),
        (dict(rho=True), "rho is the neighbourhood radius"),
        (dict(rho="0.05"), "rho is the neighbourhood radius"),
        (dict(adaptive="no"), "adaptive must be True or False"),
        (dict(adaptive=1), "adaptive must be True or False"),
    ],
)
def test_arguments_that_would_corrupt_training_are_refused(kwargs, match):
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(LightningPhasesError, match=match) as info:
        SAM([w], lr=0.1, **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


def test_a_large_finite_rho_keeps_the_weights_finite():
    # what rho=inf used to do (e = inf·g/‖g‖: NaN weights after the step) cannot happen with any accepted rho
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = SAM([w], lr=0.1, rho=1e6)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert bool(torch.isfinite(w).all())
