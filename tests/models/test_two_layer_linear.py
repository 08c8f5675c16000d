"""The two phases of label-noise SGD on a two-layer linear network (Zhang et al. 2025), reproduced small."""

from __future__ import annotations

import lightning.pytorch as pl  # TwoLayerLinearNetwork is a LightningModule of the preferred namespace
import pytest
import torch

from lightning_phases import LabelNoise, LightningPhasesError, SparseLinearRegressionDataModule, TwoLayerLinearNetwork
from lightning_phases.functional import neuron_statistics
from tests.callbacks.helpers import RecordingLogger, series

STEPS, EVERY = 600, 25


def _run(tmp_path, name, callbacks, steps=STEPS):
    torch.manual_seed(0)  # the DataLoader's shuffling
    dm = SparseLinearRegressionDataModule(
        dim=10, sparsity=3, num_train=40, num_val=0, num_test=200, batch_size=10, seed=0
    )
    model = TwoLayerLinearNetwork(dim=10, width=20, init_scale=1.0, lr=0.1, seed=0)
    init = neuron_statistics(model.weight, dm.theta_star, model.output_weight)
    logger = RecordingLogger(tmp_path / name / "log.jsonl")
    trainer = pl.Trainer(
        default_root_dir=tmp_path / name,
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        log_every_n_steps=EVERY,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    return model, dm, init, logger.records


def test_label_noise_sgd_has_two_phases_and_plain_sgd_stays_lazy(tmp_path):
    model, dm, init, records = _run(tmp_path, "noise", [LabelNoise(sigma=2.0, seed=0)])
    norm = [init.mean_norm] + [v for _, v in series(records, "two_layer/mean_norm")]
    cos = [init.mean_abs_cosine] + [v for _, v in series(records, "two_layer/mean_abs_cosine")]
    assert len(norm) == STEPS // EVERY + 1
    q = len(norm) // 4
    # Phase I: the norms fall clearly, early on
    assert norm[q] < 0.9 * norm[0] and norm[-1] < 0.75 * norm[0]
    # Phase II: the neurons turn toward θ*, well above where they started
    assert cos[-1] > cos[0] + 0.15 and cos[-1] > cos[q]
    final = neuron_statistics(model.weight, dm.theta_star, model.output_weight)
    assert final.mean_norm < norm[0] and final.mean_abs_cosine > cos[0]

    _, _, sgd_init, sgd_records = _run(tmp_path, "sgd", [], steps=STEPS // 3)
    assert sgd_init == init  # the same initialisation
    sgd_norm = [sgd_init.mean_norm] + [v for _, v in series(sgd_records, "two_layer/mean_norm")]
    assert max(abs(v - sgd_norm[0]) for v in sgd_norm) < 0.05 * sgd_norm[0]  # lazy: norms barely move
    assert max(abs(v - sgd_norm[0]) for v in sgd_norm) < 0.2 * (norm[0] - norm[-1])
    # and plain SGD interpolates the (clean) training data
    assert series(sgd_records, "train_loss")[-1][1] < 1e-3


def test_logged_statistics_are_those_of_the_weights(tmp_path):
    dm = SparseLinearRegressionDataModule(dim=10, sparsity=3, num_train=40, num_test=20, batch_size=10, seed=0)
    model = TwoLayerLinearNetwork(dim=10, width=20, seed=0)
    before = neuron_statistics(model.weight, dm.theta_star, model.output_weight)
    logger = RecordingLogger(tmp_path / "log.jsonl")
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=1,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=dm)
    logged = logger.records[0][1]
    for key, value in before.as_dict().items():
        assert logged[f"two_layer/{key}"] == pytest.approx(value, rel=1e-6)
    with pytest.raises(LightningPhasesError, match="optimizer"):
        TwoLayerLinearNetwork(optimizer="adam")
    with pytest.raises(LightningPhasesError, match="theta_star"):
        TwoLayerLinearNetwork(dim=3, theta_star=torch.ones(4))


def test_statistics_are_logged_only_at_written_steps_and_are_those_of_that_step(tmp_path):
    """With ``log_every_n_steps=5`` every written value is the statistics of the weights at the start of the
    very step it is written for (never a stale one from an earlier step), and every written step has them."""
    dm = SparseLinearRegressionDataModule(dim=10, sparsity=3, num_train=40, num_test=20, batch_size=10, seed=0)
    model = TwoLayerLinearNetwork(dim=10, width=20, seed=0, lr=0.2)
    at_start: dict[int, dict[str, float]] = {}

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            at_start[trainer.global_step] = pl_module.statistics()

    logger = RecordingLogger(tmp_path / "log.jsonl")
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=23,
        logger=logger,
        log_every_n_steps=5,
        callbacks=[Record()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    written = [(step, m) for step, m in logger.records if "train_loss" in m]
    assert [step for step, _ in written] == [4, 9, 14, 19]  # Lightning writes after steps 5, 10, 15, 20
    for step, metrics in written:
        for key, value in at_start[step].items():
            assert metrics[f"two_layer/{key}"] == pytest.approx(value, rel=1e-6), (step, key)
        assert metrics["two_layer/mean_norm"] != pytest.approx(at_start[step - 1]["mean_norm"], rel=1e-6)
