"""The TensorBoard helpers reach every TensorBoard logger of a Trainer, write the layout once per writer, and
keep no module-level state; every chart's joined tag expression compiles the way TensorBoard builds it."""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_phases import _lightning
from lightning_phases.report import tensorboard as tb

NAMESPACES = sorted(_lightning.NAMESPACES)


def _read(directory) -> EventAccumulator:
    acc = EventAccumulator(str(directory), size_guidance={"images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def _layout_events(acc: EventAccumulator) -> list[layout_pb2.Layout]:
    if "custom_scalars__config__" not in acc.Tags()["tensors"]:
        return []
    return [layout_pb2.Layout.FromString(e.tensor_proto.string_val[0]) for e in acc.Tensors("custom_scalars__config__")]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_two_tensorboard_loggers_both_get_every_extra(namespace, tmp_path):
    from matplotlib.figure import Figure

    module = _lightning.NAMESPACES[namespace]
    loggers_module = importlib.import_module(namespace + ".loggers")
    first = loggers_module.TensorBoardLogger(tmp_path, name="first")
    second = loggers_module.TensorBoardLogger(tmp_path, name="second")
    csv = loggers_module.CSVLogger(tmp_path, name="csv")  # not TensorBoard: left alone
    trainer = module.Trainer(logger=[first, csv, second], default_root_dir=tmp_path, enable_progress_bar=False)
    assert tb.summary_writers(trainer) == [first.experiment, second.experiment]

    tb.write_phase_layout(trainer)
    tb.write_phase_layout(trainer)  # a second callback asking again: still once per writer
    tb.write_phase_layout(first.experiment)
    tb.add_histogram(trainer, "split/loss_clean", np.array([0.1, 0.2, 0.2, 1.5]), 3)
    tb.add_text(trainer, "phase/transitions", "step 3: I -> II", 3)
    fig = Figure(figsize=(2.0, 1.5), dpi=50)  # 100 x 75 pixels
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    tb.add_figure(trainer, "gmm/loss_histogram", fig, 4)
    for logger in (first, second):
        logger.experiment.flush()

    for logger in (first, second):
        acc = _read(logger.log_dir)
        layouts = _layout_events(acc)
        assert len(layouts) == 1
        charts = {chart.title for category in layouts[0].category for chart in category.chart}
        assert charts == set(next(iter(tb.PHASE_LAYOUT.values())))
        hist = acc.Histograms("split/loss_clean")
        assert [h.step for h in hist] == [3] and hist[0].histogram_value.num == 4
        assert hist[0].histogram_value.sum == pytest.approx(2.0)
        text = acc.Tensors("phase/transitions/text_summary")
        assert [t.step for t in text] == [3] and text[0].tensor_proto.string_val[0].decode() == "step 3: I -> II"
        images = acc.Images("gmm/loss_histogram")
        assert [(i.step, i.width, i.height) for i in images] == [(4, 100, 75)]


def test_layout_state_lives_on_the_writer_not_in_the_module(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    # no module-level container remembers writers
    assert not any(isinstance(v, (set, list, dict)) and not k.isupper() for k, v in vars(tb).items() if k[0] != "_")
    assert not any(type(v).__name__ in ("WeakSet", "WeakKeyDictionary") for v in vars(tb).values())
    a, b = SummaryWriter(str(tmp_path / "a")), SummaryWriter(str(tmp_path / "b"))
    tb.write_phase_layout([a, None, b])
    tb.write_phase_layout(a)
    tb.write_phase_layout(None)  # nothing to write to
    for w in (a, b):
        w.close()
    assert [len(_layout_events(_read(tmp_path / d))) for d in "ab"] == [1, 1]


def test_figure_pixels_are_the_figure(tmp_path):
    """The image written is the rendered figure: a black figure gives black pixels."""
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    fig = Figure(figsize=(1.0, 1.0), dpi=20, facecolor="black")
    tb.add_figure(writer, "black", fig, 0)
    writer.close()
    import io

    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(_read(tmp_path).Images("black")[0].encoded_image_string)))
    assert image.shape[:2] == (20, 20) and image[..., :3].max() == 0


def test_every_chart_expression_compiles_as_tensorboard_joins_it():
    for category in tb.PHASE_LAYOUT.values():
        for kind, patterns in category.values():
            assert kind == "Multiline"
            re.compile(tb.chart_regex(patterns))  # raises re.error for e.g. an inline (?i) after "|"
    with pytest.raises(re.error, match="global flags not at the start"):
        re.compile(tb.chart_regex([r"order/A$", r"(?i)val.*(err|acc)"]))  # what the old layout did
