"""Every datamodule: an explicit signature, and arguments that would corrupt data or training refused up front."""

from __future__ import annotations

import inspect
import math
import typing

import pytest
import torch

from lightning_phases.data import (
    GaussianClustersDataModule,
    NoisyCIFAR10DataModule,
    NoisyDigitsDataModule,
    NoisyFashionMNISTDataModule,
    NoisyMNISTDataModule,
    SparseLinearRegressionDataModule,
)
from lightning_phases.errors import LabelNoiseError, LightningPhasesError

CLASSIFICATION = [
    NoisyDigitsDataModule,
    NoisyMNISTDataModule,
    NoisyFashionMNISTDataModule,
    NoisyCIFAR10DataModule,
    GaussianClustersDataModule,
]
try:  # the optional extra
    from lightning_phases.data import NoisyMNIST1DDataModule

    CLASSIFICATION.append(NoisyMNIST1DDataModule)
except ImportError:  # pragma: no cover - exported lazily; the import itself never needs mnist1d
    pass


@pytest.mark.parametrize("cls", [*CLASSIFICATION, SparseLinearRegressionDataModule], ids=lambda c: c.__name__)
def test_signature_is_explicit(cls):
    params = inspect.signature(cls).parameters
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values())
    expected = {"seed", "batch_size", "num_workers", "eval_batch_size"}
    if cls is not SparseLinearRegressionDataModule:
        expected |= {"noise_type", "noise_rate", "clean_val", "class_map"}
        hint = typing.get_type_hints(cls.__init__)["noise_type"]
        literals = [a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal]
        assert literals and set(typing.get_args(literals[0])) == {"symmetric", "uniform", "pairflip"}
    else:
        expected |= {"noise_std"}
    assert expected <= set(params), expected - set(params)
    doc = inspect.getdoc(cls) or ""
    for name in params:  # Google-style: every argument documented by name
        assert f"{name}:" in doc, f"{cls.__name__} does not document {name}"


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 0.0, "3"])
def test_gaussian_separation_and_spread_must_be_finite_positive(value):
    with pytest.raises(LabelNoiseError, match=r"separation must be a finite number.*separation="):
        GaussianClustersDataModule(separation=value)
    with pytest.raises(LabelNoiseError, match="spread"):
        GaussianClustersDataModule(spread=value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.1])
def test_sparse_noise_std_must_be_finite_non_negative(value):
    with pytest.raises(LabelNoiseError, match=r"noise_std.*noise_std="):
        SparseLinearRegressionDataModule(noise_std=value)


@pytest.mark.parametrize("cls", [NoisyDigitsDataModule, GaussianClustersDataModule], ids=lambda c: c.__name__)
@pytest.mark.parametrize("value", [math.nan, 1.0, -0.1, "0.2", True])
def test_noise_rate_refused(cls, value):
    with pytest.raises(LabelNoiseError, match="noise_rate"):
        cls(noise_rate=value)


def test_val_size_larger_than_the_data_is_refused_at_setup():
    dm = NoisyDigitsDataModule(val_size=10**9)  # the size of the data is known only at setup
    with pytest.raises(LabelNoiseError, match=r"val_size=1000000000 .* leaves -?\d+ for training"):
        dm.setup("fit")
    n = 1797 - round(0.2 * 1797)
    with pytest.raises(LabelNoiseError, match="val_size"):
        NoisyDigitsDataModule(val_size=n - 1).setup("fit")  # one training sample left
    ok = NoisyDigitsDataModule(val_size=n - 2)
    ok.setup("fit")
    assert len(ok.noisy_train) == 2 and len(ok.val_dataset) == n - 2
    with pytest.raises(LabelNoiseError, match="val_size"):
        NoisyDigitsDataModule(val_size=0.9999).setup("fit")
    for bad in (-1, 1.0, math.nan, "0.1", True):
        with pytest.raises(LabelNoiseError, match="val_size"):
            NoisyDigitsDataModule(val_size=bad)


@pytest.mark.parametrize("cls", [NoisyDigitsDataModule, GaussianClustersDataModule, SparseLinearRegressionDataModule])
def test_eval_batch_size(cls):
    for bad in (0, -3, 2.0, True):
        with pytest.raises(LabelNoiseError, match=r"eval_batch_size.*eval_batch_size="):
            cls(eval_batch_size=bad)
    kwargs = {"num_val": 20} if cls is not NoisyDigitsDataModule else {}
    dm = cls(eval_batch_size=7, **kwargs)
    dm.setup("fit")
    assert dm.val_dataloader().batch_size == 7 and dm.test_dataloader().batch_size == 7
    assert cls(batch_size=8).eval_batch_size == (8 if cls is SparseLinearRegressionDataModule else 256)


def test_boolean_flags_refuse_strings(tmp_path):
    for cls in (NoisyDigitsDataModule, GaussianClustersDataModule):
        for bad in ("no", "False", 0, None):
            with pytest.raises(LabelNoiseError, match=r"clean_val must be True or False"):
                cls(clean_val=bad)
    with pytest.raises(LabelNoiseError, match="download"):
        NoisyMNISTDataModule(str(tmp_path), download="no")
    with pytest.raises(LabelNoiseError, match="augment"):
        NoisyCIFAR10DataModule(str(tmp_path), augment="yes")
    assert "augment" not in inspect.signature(NoisyMNISTDataModule).parameters  # no accepted-but-unused flag


@pytest.mark.parametrize("bad", [True, -1, 1.5, "0", None])
def test_seeds_refused(bad):
    for cls in (NoisyDigitsDataModule, GaussianClustersDataModule, SparseLinearRegressionDataModule):
        with pytest.raises(LabelNoiseError, match=r"seed must be a non-negative int.*seed="):
            cls(seed=bad)
    with pytest.raises(LabelNoiseError, match="split_seed"):
        NoisyDigitsDataModule(split_seed=bad)


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1, 2**64, 2**200 + 7, 2 * 10**30])
def test_any_non_negative_seed_works(seed):
    a = NoisyDigitsDataModule(noise_rate=0.3, seed=seed, split_seed=seed)
    a.setup("fit")
    assert int(a.noisy_train.is_noisy.sum()) == round(0.3 * len(a.noisy_train))
    b = NoisyDigitsDataModule(noise_rate=0.3, seed=seed, split_seed=seed)
    b.setup("fit")
    assert torch.equal(a.noisy_train.noisy_targets, b.noisy_train.noisy_targets)
    g = GaussianClustersDataModule(num_train=50, noise_rate=0.2, seed=seed)
    g.setup()
    assert int(g.noisy_train.is_noisy.sum()) == 10
    s = SparseLinearRegressionDataModule(dim=10, sparsity=2, num_train=5, seed=seed)
    assert int((s.theta_star != 0).sum()) == 2


def test_seeds_below_two_to_the_64_keep_their_labels():
    """The seed is used as-is in torch's range: the labels of existing runs do not change."""
    from lightning_phases.data import symmetric_noise

    dm = NoisyDigitsDataModule(noise_rate=0.3, seed=2**64 - 1)
    dm.setup("fit")
    expected = symmetric_noise(dm.noisy_train.true_targets, 0.3, 10, seed=torch.Generator().manual_seed(2**64 - 1))
    assert torch.equal(dm.noisy_train.noisy_targets, expected)
    y = dm.noisy_train.true_targets
    big, zero = symmetric_noise(y, 0.3, 10, seed=2**64), symmetric_noise(y, 0.3, 10, seed=0)
    assert int((big != y).sum()) == round(0.3 * len(y))
    assert not torch.equal(big, zero)  # not wrapped modulo 2**64 onto another seed


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(test_fraction=math.nan), "test_fraction"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(classes="79"), "classes"),
        (dict(noise_type=torch.eye(3)[:2]), "C×C"),
    ],
)
def test_other_bad_arguments(kwargs, match):
    with pytest.raises(LightningPhasesError, match=match):
        NoisyDigitsDataModule(**kwargs)


def test_gaussian_pairflip_needs_and_uses_a_class_map():
    with pytest.raises(LabelNoiseError, match="class_map"):
        GaussianClustersDataModule(num_classes=3, noise_type="pairflip", noise_rate=0.2)
    dm = GaussianClustersDataModule(
        num_classes=3, num_train=300, noise_type="pairflip", noise_rate=0.2, class_map={0: 1, 1: 2, 2: 0}
    )
    dm.setup()
    t, y = dm.noisy_train.true_targets, dm.noisy_train.noisy_targets
    flipped = dm.noisy_train.is_noisy
    assert torch.equal(y[flipped], (t[flipped] + 1) % 3)
    assert int(flipped.sum()) == sum(round(0.2 * int((t == c).sum())) for c in range(3))


@pytest.mark.parametrize("cls", [*CLASSIFICATION, SparseLinearRegressionDataModule], ids=lambda c: c.__name__)
def test_lightning_cli_parser_sees_every_argument(cls):
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_args(["--data.seed", "7", "--data.batch_size", "16"])
    assert set(vars(cfg.data)) == set(inspect.signature(cls).parameters)
    if cls is not SparseLinearRegressionDataModule:
        with pytest.raises((jsonargparse.ArgumentError, SystemExit)):
            parser.parse_args(["--data.noise_type", "gaussian"])  # the Literal is enforced by the parser


def test_classes_accept_numpy_and_tensor_ints_and_refuse_floats():
    import numpy as np

    for given in (np.array([7, 9]), torch.tensor([7, 9]), (7, 9)):
        assert NoisyDigitsDataModule(classes=given).classes == [7, 9]
    for bad in ([7.0, 9.0], [True, 9], "79", 7):
        with pytest.raises(LabelNoiseError, match="classes"):
            NoisyDigitsDataModule(classes=bad)
