"""The zoo: small real architectures and training setups, one row each.

Every row is a named factory that builds a :class:`ZooCase` -- the
LightningModule (its ``backbone`` is the real architecture), the training
dataset and DataLoader arguments, the per-sample loss, and the adapter
arguments the model needs (``forward`` for :func:`gradient_gram`, and
``unpack`` / ``forward`` / ``output`` / ``task`` for the callbacks) -- plus
what the zoo expects of each check:

* ``"exact"``: the Gram matrix (and the statistics derived from it) matches
  the slow per-sample autograd loop of :mod:`tests.reference.zoo_reference`;
  in ``Trainer.fit`` every measurement is taken and the first ``order/A``
  equals the reference value;
* ``"refused: <substring>"``: :class:`~lightning_phases.errors.UnsupportedModelError`
  with that substring in its message; in ``Trainer.fit`` the measurement is
  skipped (``order/skipped``) with exactly one warning.

``needs`` marks checks that depend on work not yet merged into this branch
(``check -> "<feature> from <branch>"``); the tests run them as
``xfail(strict=True)``, so the mark must be removed as soon as the feature
lands. ``scripts/zoo_table.py`` prints the README table from these rows, and
``tests/zoo/test_zoo_table.py`` keeps the README in step with them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, SubsetRandomSampler, TensorDataset, default_collate

__all__ = [
    "CHECKS",
    "METHODS",
    "ROWS",
    "RTOL",
    "ZooCase",
    "ZooRow",
    "cast_like_precision",
    "expected_refusal",
    "probe_batch",
    "row",
]

METHODS = ("auto", "vmap", "loop")
CHECKS = (*METHODS, "fit")

NUM_TRAIN = 16  # training samples of every row
BATCH = 4  # DataLoader batch size B
NUM_CLASSES = 3


# ---------------------------------------------------------------------------------------------- losses
def ce_loss(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of one sample: logits ``[C]``, class index ``[]``."""
    return F.cross_entropy(out.reshape(1, -1), y.reshape(1).long())


def mse_loss(out: Tensor, y: Tensor) -> Tensor:
    """Squared error of one sample: output ``[1]``, target ``[]``."""
    return F.mse_loss(out.reshape(()), y.reshape(()).to(out.dtype))


def bce_loss(out: Tensor, y: Tensor) -> Tensor:
    """Multi-label BCE of one sample: logits ``[C]``, float targets ``[C]`` (summed over labels, as ``task="multilabel"``)."""
    return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="sum")


def _batch_loss(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """Mean of the per-sample loss over a batch (the training loss)."""
    return lambda out, y: torch.stack([loss_fn(o, t) for o, t in zip(out, y)]).mean()


# ---------------------------------------------------------------------------------------------- modules
class _ZooBase(pl.LightningModule):
    """Trains ``backbone`` on the row's batches; no ``forward`` of its own (see :class:`ZooModule`)."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        unpack: Callable[[Any], tuple[Any, Tensor]],
        forward: Callable[[nn.Module, Any], Tensor],
        manual: bool = False,
        lr: float = 0.05,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self._loss = _batch_loss(loss_fn)
        self._unpack = unpack
        self._forward = forward
        self.automatic_optimization = not manual
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        inputs, y = self._unpack(batch)
        loss = self._loss(self._forward(self, inputs), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ZooModule(_ZooBase):
    """:class:`_ZooBase` with ``forward = backbone`` (positional inputs passed through)."""

    def forward(self, *inputs: Any) -> Any:
        return self.backbone(*inputs)


class NoForwardModule(_ZooBase):
    """A LightningModule without ``forward``: ``training_step`` calls ``self.backbone``."""


def _call(module: nn.Module, inputs: Any) -> Any:
    return module(inputs)


def _first(batch: Any) -> tuple[Any, Tensor]:
    return batch[0], batch[1]


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class ZooCase:
    """Everything one zoo row needs, built fresh by :attr:`ZooRow.build`."""

    module: pl.LightningModule
    dataset: Dataset
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    #: ``forward(model, inputs) -> logits`` for gradient_gram and the reference; ``None``: ``model(inputs)``.
    forward: Callable[[nn.Module, Any], Tensor] | None = None
    unpack: Callable[[Any], tuple[Any, Tensor]] = _first
    collate_fn: Callable[[list], Any] | None = None
    sampler: Any = None
    #: adapter arguments of the probing callbacks (unpack / forward / output / task / loss_fn)
    callback_kwargs: dict[str, Any] = field(default_factory=dict)
    precision: str = "32-true"
    dtype: torch.dtype = torch.float32
    probe_size: int = 8
    #: sample indices the DataLoader serves (the probe must draw from these)
    served: list[int] | None = None


@dataclass(frozen=True)
class ZooRow:
    """One architecture or setup of the zoo and what each check expects."""

    name: str
    setup: str
    build: Callable[[], ZooCase]
    #: per check ("auto", "vmap", "loop", "fit"): "exact" or "refused: <message substring>"
    expect: Mapping[str, str]
    #: checks that need unmerged work: check -> "<feature> from <branch>"
    needs: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""
    slow: bool = False
    #: per-method relative Frobenius tolerance of the Gram matrix where the dtype's default does not hold
    #: (the reason goes into ``notes``)
    rtol: Mapping[str, float] = field(default_factory=dict)
    #: per method: a substring of every PhaseStatisticsWarning gradient_gram emits (at least one, one per layer
    #: at most); no such warning for the other methods
    warns: Mapping[str, str] = field(default_factory=dict)


def _seeded(fn: Callable[[], ZooCase]) -> Callable[[], ZooCase]:
    """Build under a fixed seed without touching the caller's global random state."""

    def build() -> ZooCase:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return fn()

    build.__name__ = fn.__name__
    return build


def _labels(n: int = NUM_TRAIN, classes: int = NUM_CLASSES) -> Tensor:
    return torch.arange(n) % classes


def _mlp(d_in: int = 6, d_out: int = NUM_CLASSES) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, d_out))


def _module(backbone: nn.Module, loss_fn, *, unpack=_first, forward=_call, manual: bool = False, cls=ZooModule):
    return cls(backbone, loss_fn=loss_fn, unpack=unpack, forward=forward, manual=manual)


def _tensor_case(backbone: nn.Module, x: Tensor, y: Tensor, loss_fn=ce_loss, **kwargs: Any) -> ZooCase:
    return ZooCase(module=_module(backbone, loss_fn), dataset=TensorDataset(x, y), loss_fn=loss_fn, **kwargs)


# -- architectures
@_seeded
def resnet18() -> ZooCase:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(NUM_TRAIN, 3, 16, 16)
    return _tensor_case(model, x, torch.arange(NUM_TRAIN) % 10, probe_size=6)


class _Transformer(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(8, NUM_CLASSES)
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:  # x [N, T, d]
        if self.batch_first:
            return self.head(self.encoder(x).mean(1))
        return self.head(self.encoder(x.transpose(0, 1)).mean(0))  # time-major [T, N, d] inside


@_seeded
def transformer_seq_first() -> ZooCase:
    return _tensor_case(_Transformer(False), torch.randn(NUM_TRAIN, 4, 8), _labels())


@_seeded
def transformer_batch_first() -> ZooCase:
    return _tensor_case(_Transformer(True), torch.randn(NUM_TRAIN, 4, 8), _labels())


class _Recurrent(nn.Module):
    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = kind(3, 6, batch_first=True)
        self.head = nn.Linear(6, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:  # x [N, T, 3]
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _recurrent(kind: type[nn.Module]) -> Callable[[], ZooCase]:
    @_seeded
    def build() -> ZooCase:
        return _tensor_case(_Recurrent(kind), torch.randn(NUM_TRAIN, 5, 3), _labels())

    return build


class _TiedEmbedding(nn.Module):
    def __init__(self, vocab: int = 12, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:  # tokens [N, T] -> logits over the vocabulary [N, V]
        h = torch.tanh(self.mix(self.embed(tokens).mean(1)))
        return h @ self.embed.weight.T  # output layer tied to the embedding


@_seeded
def embedding_tied() -> ZooCase:
    tokens = torch.randint(0, 12, (NUM_TRAIN, 5))
    return _tensor_case(_TiedEmbedding(), tokens, torch.arange(NUM_TRAIN) % 12)


@_seeded
def conv1d() -> ZooCase:
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, NUM_CLASSES))
    return _tensor_case(model, torch.randn(NUM_TRAIN, 2, 10), _labels())


@_seeded
def depthwise_conv2d() -> ZooCase:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 1),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise: groups = channels
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, NUM_CLASSES),
    )
    return _tensor_case(model, torch.randn(NUM_TRAIN, 3, 6, 6), _labels())


@_seeded
def groupnorm_layernorm() -> ZooCase:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 8),
        nn.LayerNorm(8),
        nn.ReLU(),
        nn.Linear(8, NUM_CLASSES),
    )
    return _tensor_case(model, torch.randn(NUM_TRAIN, 3, 6, 6), _labels())


@_seeded
def batchnorm_no_running_stats() -> ZooCase:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, NUM_CLASSES),
    )
    return _tensor_case(model, torch.randn(NUM_TRAIN, 3, 6, 6), _labels())


# -- interfaces
class _DictDataset(Dataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"features": self.x[i], "label": self.y[i]}


def _dict_unpack(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return batch["features"], batch["label"]


@_seeded
def dict_batch() -> ZooCase:
    module = _module(_mlp(), ce_loss, unpack=_dict_unpack)
    return ZooCase(
        module=module,
        dataset=_DictDataset(torch.randn(NUM_TRAIN, 6), _labels()),
        loss_fn=ce_loss,
        unpack=_dict_unpack,
        callback_kwargs={"unpack": _dict_unpack},
    )


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fa = nn.Linear(4, 8)
        self.fb = nn.Linear(5, 8)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fa(a) + self.fb(b)))


def _two_unpack(batch: Any) -> tuple[tuple[Tensor, Tensor], Tensor]:
    return (batch[0], batch[1]), batch[2]


def _star(module: nn.Module, inputs: tuple[Tensor, Tensor]) -> Tensor:
    return module(*inputs)


@_seeded
def several_inputs() -> ZooCase:
    module = _module(_TwoInputs(), ce_loss, unpack=_two_unpack, forward=_star)
    data = TensorDataset(torch.randn(NUM_TRAIN, 4), torch.randn(NUM_TRAIN, 5), _labels())
    return ZooCase(
        module=module,
        dataset=data,
        loss_fn=ce_loss,
        forward=_star,
        unpack=_two_unpack,
        callback_kwargs={"unpack": _two_unpack, "forward": _star},
    )


class _TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.body(x))
        return self.head(h), h  # (logits, features)


def _logits_of_tuple(module: nn.Module, x: Tensor) -> Tensor:
    return module(x)[0]


@_seeded
def tuple_output() -> ZooCase:
    module = _module(_TupleOutput(), ce_loss, forward=_logits_of_tuple)
    return ZooCase(
        module=module,
        dataset=TensorDataset(torch.randn(NUM_TRAIN, 6), _labels()),
        loss_fn=ce_loss,
        forward=_logits_of_tuple,
        callback_kwargs={"output": 0},
    )


def _backbone_forward(module: nn.Module, x: Tensor) -> Tensor:
    return module.backbone(x)


@_seeded
def no_forward() -> ZooCase:
    module = _module(_mlp(), ce_loss, forward=_backbone_forward, cls=NoForwardModule)
    return ZooCase(
        module=module,
        dataset=TensorDataset(torch.randn(NUM_TRAIN, 6), _labels()),
        loss_fn=ce_loss,
        forward=_backbone_forward,
        callback_kwargs={"forward": _backbone_forward},
    )


class _MaskedBag(nn.Module):
    def __init__(self, vocab: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:  # tokens [N, T], 0 = padding
        mask = (tokens != 0).unsqueeze(-1).to(self.head.weight.dtype)
        pooled = (self.embed(tokens) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.head(torch.tanh(pooled))


class _Sequences(Dataset):
    def __init__(self, n: int = NUM_TRAIN) -> None:
        gen = torch.Generator().manual_seed(1)
        self.seqs = [torch.randint(1, 10, (2 + i % 5,), generator=gen) for i in range(n)]
        self.y = _labels(n)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.seqs[i], self.y[i]


def pad_collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Pad variable-length token sequences with 0 to the longest in the batch."""
    seqs = nn.utils.rnn.pad_sequence([s for s, _ in items], batch_first=True, padding_value=0)
    return seqs, torch.stack([y for _, y in items])


@_seeded
def padding_collate() -> ZooCase:
    return ZooCase(module=_module(_MaskedBag(), ce_loss), dataset=_Sequences(), loss_fn=ce_loss, collate_fn=pad_collate)


@_seeded
def subset_sampler() -> ZooCase:
    served = list(range(0, NUM_TRAIN, 2))
    case = _tensor_case(_mlp(), torch.randn(NUM_TRAIN, 6), _labels())
    case.sampler = SubsetRandomSampler(served, generator=torch.Generator().manual_seed(0))
    case.served = served
    return case


# -- tasks
@_seeded
def regression() -> ZooCase:
    x = torch.randn(NUM_TRAIN, 6)
    y = x[:, 0] - 0.5 * x[:, 1] + 5.0  # targets near 5
    return _tensor_case(_mlp(d_out=1), x, y, loss_fn=mse_loss, callback_kwargs={"task": "regression"})


@_seeded
def multilabel() -> ZooCase:
    x = torch.randn(NUM_TRAIN, 6)
    y = (torch.randn(NUM_TRAIN, 4) > 0).float()
    return _tensor_case(_mlp(d_out=4), x, y, loss_fn=bce_loss, callback_kwargs={"task": "multilabel"})


# -- training setups
@_seeded
def bf16_true() -> ZooCase:
    return _tensor_case(_mlp(), torch.randn(NUM_TRAIN, 6), _labels(), precision="bf16-true", dtype=torch.bfloat16)


@_seeded
def f64_true() -> ZooCase:
    return _tensor_case(_mlp(), torch.randn(NUM_TRAIN, 6), _labels(), precision="64-true", dtype=torch.float64)


@_seeded
def manual_optimization() -> ZooCase:
    module = _module(_mlp(), ce_loss, manual=True)
    return ZooCase(module=module, dataset=TensorDataset(torch.randn(NUM_TRAIN, 6), _labels()), loss_fn=ce_loss)


EXACT = {check: "exact" for check in CHECKS}


def _loop_fallback(kind: str) -> dict[str, str]:
    """The one warning of ``auto`` and ``vmap`` when they hand a recurrent layer to the loop engine."""
    return {m: f"cannot compute per-sample gradients through module 'backbone.rnn' ({kind})" for m in ("auto", "vmap")}


ROWS: tuple[ZooRow, ...] = (
    ZooRow("resnet18", "torchvision `resnet18` (num_classes=10), 3×16×16 inputs", resnet18, EXACT,
           slow=True,
           notes="BatchNorm in eval mode uses its running statistics; `vmap` and `loop` form J Jᵀ of the 11 M-entry "
           "gradients in float64 slices (7e-8 relative measured with 2 threads; in float32 it was 2.8e-5 to 1.5e-4, "
           "depending on the threads)"),
    ZooRow("transformer_seq_first", "`nn.TransformerEncoder`, `batch_first=False` (time-major inside)",
           transformer_seq_first, EXACT,
           warns={"auto": "which do not hold the 8 samples at dim 0 (a time-major or flattened layout)"},
           notes="`auto` finds the time-major Linear layers (sample axis at dim 1) and takes them exactly, one "
           "warning per layer"),
    ZooRow("transformer_batch_first", "`nn.TransformerEncoder`, `batch_first=True`", transformer_batch_first,
           EXACT),
    ZooRow("lstm", "`nn.LSTM` + linear head", _recurrent(nn.LSTM), EXACT),
    ZooRow("gru", "`nn.GRU` + linear head", _recurrent(nn.GRU), EXACT, warns=_loop_fallback("GRU"),
           notes="torch.func cannot vmap GRU/RNN: `auto` and `vmap` fall back to the exact loop (one warning)"),
    ZooRow("rnn", "`nn.RNN` + linear head", _recurrent(nn.RNN), EXACT, warns=_loop_fallback("RNN"),
           notes="as GRU"),
    ZooRow("embedding_tied", "`nn.Embedding` with the output layer tied to it", embedding_tied, EXACT),
    ZooRow("conv1d", "`nn.Conv1d`", conv1d, EXACT),
    ZooRow("depthwise_conv2d", "depthwise `nn.Conv2d` (groups = channels)", depthwise_conv2d, EXACT),
    ZooRow("groupnorm_layernorm", "`nn.GroupNorm` and `nn.LayerNorm`", groupnorm_layernorm, EXACT),
    ZooRow("batchnorm_no_running_stats", "`nn.BatchNorm2d(track_running_stats=False)`", batchnorm_no_running_stats,
           {check: "refused: module 'backbone.1' (BatchNorm2d) has no running statistics" for check in CHECKS},
           notes="batch statistics in eval mode: per-sample gradients undefined; the message gives the fix "
           "(`track_running_stats=True`, or GroupNorm/LayerNorm)"),
    ZooRow("dict_batch", "dict batches with custom keys (`unpack=`)", dict_batch, EXACT),
    ZooRow("several_inputs", "`forward(a, b)`: several inputs (`forward=`)", several_inputs, EXACT),
    ZooRow("tuple_output", "`forward` returns `(logits, features)` (`output=0`)", tuple_output, EXACT),
    ZooRow("no_forward", "LightningModule without `forward` (`forward=`)", no_forward, EXACT),
    ZooRow("padding_collate", "padding `collate_fn` for variable-length sequences", padding_collate, EXACT),
    ZooRow("subset_sampler", "`SubsetRandomSampler` in the DataLoader", subset_sampler, EXACT,
           notes="the probe draws only served samples; GMMCleanser, which flags samples of the whole dataset, "
           "refuses a subset sampler (one warning, counted in `gmm/skipped`): give the DataLoader a `Subset`"),
    ZooRow("regression", "regression, MSE (`task=\"regression\"`)", regression, EXACT),
    ZooRow("multilabel", "multi-label, BCE (`task=\"multilabel\"`)", multilabel, EXACT),
    ZooRow("bf16_true", "`precision=\"bf16-true\"`", bf16_true, EXACT,
           notes="Gram checked against the exact (float64) value to 2⁻⁵ = 8 bf16 roundings; `auto` leaves bf16 "
           "layers to the exact engines"),
    ZooRow("f64_true", "`precision=\"64-true\"`", f64_true, EXACT),
    ZooRow("manual_optimization", "`automatic_optimization=False`", manual_optimization, EXACT),
)  # fmt: skip


def row(name: str) -> ZooRow:
    """The row called ``name``."""
    for r in ROWS:
        if r.name == name:
            return r
    raise KeyError(name)


def probe_batch(case: ZooCase, indices: list[int] | Tensor) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` of the given training samples, collated and unpacked as the row's DataLoader does."""
    items = [case.dataset[int(i)] for i in indices]
    collate = case.collate_fn or default_collate
    return case.unpack(collate(items))


#: Relative tolerance of a Gram matrix (Frobenius norm) and of the statistics linear in it, by model dtype;
#: the reasons are in tests/zoo/test_zoo_gram.py's docstring.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2.0**-5}


def cast_like_precision(inputs: Any, targets: Tensor, dtype: torch.dtype) -> tuple[Any, Tensor]:
    """Floating inputs and targets cast to ``dtype``, as a true-precision plugin casts a batch (integers unchanged)."""

    def cast(tree: Any) -> Any:
        if isinstance(tree, Tensor):
            return tree.to(dtype) if tree.is_floating_point() else tree
        if isinstance(tree, dict):
            return {k: cast(v) for k, v in tree.items()}
        return type(tree)(cast(v) for v in tree)

    return cast(inputs), cast(targets)


def expected_refusal(expectation: str) -> str | None:
    """The message substring of a ``"refused: ..."`` expectation, ``None`` for ``"exact"``."""
    if expectation == "exact":
        return None
    if not expectation.startswith("refused: "):
        raise ValueError(f"bad expectation {expectation!r}")
    return expectation[len("refused: ") :]
