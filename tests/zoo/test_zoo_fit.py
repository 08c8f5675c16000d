"""Zoo, training: every row through a short ``Trainer.fit`` with all four callbacks.

OrderParameterMonitor, NoiseSplitTracker (with a ``noisy_mask``),
PhaseDetector and GMMCleanser get the adapter arguments the row needs. For a
row expected ``"exact"`` the run completes, no ``*/skipped`` key is logged, and
the first logged ``order/A`` (measured at the start, on the initial weights)
equals the value computed from the reference Gram of
:mod:`tests.reference.zoo_reference` on the same probe samples (read from the
monitor after the fit) with the same minibatch size. For a row expected
``"refused: ..."`` the run completes too, ``order/skipped`` is logged, and the
monitor's refusal warning is emitted exactly once; nothing is measured and
PhaseDetector has nothing to follow. Every run: a measurement at the start
and after each of the two epochs (steps 0, 2, 4) by both monitors and
PhaseDetector, and a loss-mixture fit by GMMCleanser after each epoch.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_phases import GMMCleanser, NoiseSplitTracker, OrderParameterMonitor, PhaseDetector
from lightning_phases.functional import order_parameters
from tests.callbacks.helpers import RecordingLogger, series
from tests.reference.zoo_reference import reference_gram
from tests.zoo.models import (
    BATCH,
    NUM_TRAIN,
    ROWS,
    RTOL,
    ZooCase,
    ZooRow,
    cast_like_precision,
    expected_refusal,
    probe_batch,
)


def _params():
    out = []
    for r in ROWS:
        marks = [pytest.mark.slow] if r.slow else []
        if "fit" in r.needs:
            marks.append(pytest.mark.xfail(strict=True, reason=f"needs {r.needs['fit']}"))
        out.append(pytest.param(r, marks=marks, id=r.name))
    return out


def _loader(case: ZooCase) -> DataLoader:
    return DataLoader(
        case.dataset,
        batch_size=BATCH,
        shuffle=case.sampler is None,
        sampler=case.sampler,
        collate_fn=case.collate_fn,
        generator=torch.Generator().manual_seed(0) if case.sampler is None else None,
    )


def _fit(case: ZooCase, tmp_path):
    kwargs = dict(case.callback_kwargs)
    noisy = torch.arange(NUM_TRAIN) % 4 == 0
    monitor = OrderParameterMonitor(every_n_epochs=1, probe_size=case.probe_size, seed=0, figure_every_n=None, **kwargs)
    split = NoiseSplitTracker(every_n_epochs=1, probe_size=case.probe_size, seed=0, noisy_mask=noisy, **kwargs)
    callbacks = [monitor, split, PhaseDetector(), GMMCleanser(every_n_epochs=1, batch_size=BATCH, **kwargs)]
    logger = RecordingLogger(tmp_path / "log.jsonl")
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=2,
        accelerator="cpu",
        devices=1,
        precision=case.precision,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(case.module, _loader(case))
    return trainer, monitor, logger.records, [str(w.message) for w in caught]


@pytest.mark.parametrize("zoo_row", _params())
def test_fit_with_all_callbacks(zoo_row: ZooRow, tmp_path) -> None:
    case = zoo_row.build()
    initial = copy.deepcopy(case.module)
    trainer, monitor, records, messages = _fit(case, tmp_path)
    assert trainer.state.finished and trainer.global_step == 4
    refusal = expected_refusal(zoo_row.expect["fit"])
    # a skip counter may be logged at 0 (GMMCleanser logs gmm/skipped with every fit): a skip is a count > 0
    skipped = sorted({k for _, m in records for k, v in m.items() if k.endswith("/skipped") and v > 0})
    if refusal is not None:
        assert series(records, "order/skipped"), "the refused model was not counted in order/skipped"
        warned = [m for m in messages if m.startswith("OrderParameterMonitor") and refusal in m]
        assert len(warned) == 1, warned
        assert series(records, "split/skipped"), "NoiseSplitTracker measured a refused model"
        assert not series(records, "order/A") and not series(records, "phase/index")
        return
    gmm_refuses = case.sampler is not None  # a subset sampler: GMMCleanser would flag never-trained samples
    if gmm_refuses:
        assert skipped == ["gmm/skipped"], f"skipped measurements: {skipped}; warnings: {messages}"
        assert len([m for m in messages if m.startswith("GMMCleanser") and "sampler serves" in m]) == 1, messages
    else:
        assert skipped == [], f"skipped measurements: {skipped}; warnings: {messages}"
    assert [step for step, _ in series(records, "order/A")] == [0, 2, 4], "a measurement is missing"
    assert [step for step, _ in series(records, "split/A0")] == [0, 2, 4], "a split measurement is missing"
    assert [step for step, _ in series(records, "phase/index")] == [0, 2, 4], "PhaseDetector did not follow"
    fits = [step for step, _ in series(records, "gmm/separation")]
    assert fits == ([] if gmm_refuses else [2, 4]), "GMMCleanser did not fit each epoch"
    indices = monitor.probe_indices
    assert indices is not None and len(indices) == case.probe_size
    if case.served is not None:
        assert set(indices.tolist()) <= set(case.served), "the probe holds samples the sampler never serves"
    x, y = cast_like_precision(*probe_batch(case, indices), case.dtype)
    model = initial.to(case.dtype)
    exact = torch.float64 if case.dtype == torch.bfloat16 else None
    gram, _ = reference_gram(model, x, y, case.loss_fn, forward=case.forward, compute_dtype=exact)
    want = order_parameters(gram, BATCH)
    # A, A0 and D are linear in G: the Gram's tolerance (relative to A, as A0 or D may be small)
    for key in ("A", "A0", "D"):
        got = series(records, f"order/{key}")[0]
        assert got[0] == 0
        tol = RTOL[case.dtype] * want.A
        assert math.isclose(got[1], getattr(want, key), rel_tol=0, abs_tol=tol), (key, got[1], getattr(want, key))
    # NoiseSplitTracker's A0 = ‖(1−ρ)g_c + ρ g_w‖² is the same ‖g‖² of the whole probe set
    split_a0 = series(records, "split/A0")[0][1]
    assert math.isclose(split_a0, want.A0, rel_tol=0, abs_tol=RTOL[case.dtype] * want.A), (split_a0, want.A0)
