"""The report figure draws what a run logged: labelled axes, errors and losses on separate axes, phases named in
a legend that covers no data, t_c and the recommended stop marked, the loss populations as real axes."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_phases.report import draw_report, make_report, read_run
from lightning_phases.report.summary import PHASE_DESCRIPTIONS

T_C, STOP, THRESHOLD = 40, 70, 1.25


@pytest.fixture()
def run(tmp_path):
    """A synthetic four-phase run, logged with TensorBoard's own writer."""
    directory = tmp_path / "noisy_mlp" / "version_3"
    writer = SummaryWriter(str(directory))
    for step in range(0, 101, 10):
        writer.add_scalar("split/err_c", 0.9 * np.exp(-step / 20), step)
        writer.add_scalar("split/err_w", 1.0 - 0.002 * step, step)
        writer.add_scalar("split/L_c", 2.3 * np.exp(-step / 25), step)
        writer.add_scalar("split/L_w", 2.3 + 0.01 * step, step)
        writer.add_scalar("split/R_cw", -0.5, step)
        writer.add_scalar("order/A", 1.0 + step, step)
        writer.add_scalar("order/R", 0.1, step)
        writer.add_scalar("phase/index", 0 if step < 30 else (1 if step < 80 else 2), step)
        writer.add_scalar("gmm/delta_L", step / 50, step)
        writer.add_scalar("test_err", 0.5 - step / 400, step)  # logged many times: a line
    for step in (30, 40, 50):
        writer.add_scalar("gmm/threshold", THRESHOLD if step == T_C else 9.0, step)
        writer.add_scalar("gmm/mean_clean", 0.5, step)
        writer.add_scalar("gmm/mean_noisy", 2.5, step)
        writer.add_histogram("split/loss_clean", np.linspace(0.1, 1.0, 60), step)
        writer.add_histogram("split/loss_noisy", np.linspace(1.5, 3.5, 40), step)
    writer.add_scalar("gmm/t_c_step", T_C, 60)
    writer.add_scalar("phase/recommended_step", STOP, STOP)
    writer.add_scalar("test_err_kept", 0.2, 100)
    writer.close()
    return directory


def _axes_by_title(fig):
    return {ax.get_title(): ax for ax in fig.axes}


def test_axes_are_labelled_and_errors_and_losses_are_apart(run):
    fig, _ = draw_report(read_run(str(run)))
    axes = _axes_by_title(fig)
    errors, losses = axes["error rates"], axes["losses"]
    assert errors.get_ylabel() == "error rate" and losses.get_ylabel() == "cross-entropy loss"
    for ax in fig.axes:
        if ax.lines:
            assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
    err_labels = {line.get_label() for line in errors.lines if not line.get_label().startswith("_")}
    loss_labels = {line.get_label() for line in losses.lines if not line.get_label().startswith("_")}
    assert err_labels == {
        "clean samples (given labels)",
        "mislabeled samples (given labels)",
        "test, final weights",
        "test, kept weights",
    }
    assert loss_labels == {"clean samples", "mislabeled samples"}
    # every plotted error value lies in [0, 1]; the losses (up to 3.3) are on their own axes
    for line in errors.lines:
        y = np.asarray(line.get_ydata(), dtype=float)
        assert np.all((y >= 0) & (y <= 1)), line.get_label()
    (test_line,) = [line for line in errors.lines if line.get_label() == "test, final weights"]
    assert len(test_line.get_xdata()) == 11 and test_line.get_linestyle() == "-"  # a line, not a dot
    (kept,) = [line for line in errors.lines if line.get_label() == "test, kept weights"]
    assert list(kept.get_xdata()) == [100] and kept.get_marker() == "*"


def test_phases_named_in_a_legend_and_t_c_and_stop_marked(run):
    fig, summary = draw_report(read_run(str(run)))
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:3] == list(PHASE_DESCRIPTIONS["four"][:3])
    assert f"t_c: cleansing time (step {T_C})" in labels and f"recommended stop (step {STOP})" in labels
    time_axes = [ax for ax in fig.axes if ax.get_xlabel() == "training step"]
    assert len(time_axes) >= 5
    for ax in time_axes:
        marks = {line.get_gid(): line.get_xdata() for line in ax.lines if line.get_gid()}
        assert list(marks["t_c"]) == [T_C, T_C] and list(marks["recommended_stop"]) == [STOP, STOP], ax.get_title()
        spans = [p for p in ax.patches]
        assert len(spans) == 3  # three phases shaded
    assert summary["t_c_step"] == T_C and summary["recommended_step"] == STOP


def test_legends_cover_no_data(run):
    fig, _ = draw_report(read_run(str(run)))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.y1 <= area.y0 + 1, ax.get_title()  # entirely below the plotting area
    figure_legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not figure_legend.overlaps(ax.get_window_extent(renderer)), ax.get_title()


def test_loss_populations_are_real_axes_at_t_c(run):
    fig, _ = draw_report(read_run(str(run)))
    ax = next(ax for ax in fig.axes if ax.get_title().startswith("loss populations"))
    assert ax.get_title() == "loss populations at t_c"
    assert not ax.images  # drawn, not a pasted raster
    assert ax.get_xlabel() == "per-sample loss"
    (threshold,) = [line for line in ax.lines if line.get_gid() == "threshold"]
    assert list(threshold.get_xdata()) == [THRESHOLD, THRESHOLD]  # the fit at t_c, not at the other steps
    areas = []
    for patch in ax.patches:  # the filled stairs: area = samples (counts per unit of loss x bucket width)
        if patch.get_fill():
            x, y = patch.get_path().vertices.T
            areas.append(0.5 * abs(float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))))  # shoelace
    assert sorted(round(a) for a in areas) == [40, 60]
    for text in [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels()]:
        assert text.get_fontsize() >= 9


def test_title_is_the_runs_name_not_a_path(run, tmp_path):
    summary = make_report(str(run))
    assert (run / "report.png").stat().st_size > 10_000 and (run / "summary.json").exists()
    fig, _ = draw_report(read_run(str(run)))
    title = fig.get_suptitle()
    assert title.startswith("noisy_mlp/version_3: phases of learning")
    assert str(tmp_path) not in title
    assert summary["run"] == "noisy_mlp/version_3"


def test_a_resumed_run_in_one_directory_is_one_run(tmp_path):
    """A resumed run adds an event file to the same directory: one run, its steps once each, the later value
    of a re-logged step kept."""
    import time

    for values in ({0: 1.0, 1: 2.0, 2: 3.0}, {2: 30.0, 3: 40.0}):  # the second writer resumes at step 2
        writer = SummaryWriter(str(tmp_path))
        for step, value in values.items():
            writer.add_scalar("order/A", value, step)
        writer.close()
        time.sleep(1.1)  # event file names carry the time in seconds
    data = read_run(str(tmp_path))
    assert data.scalars["order/A"] == [(0, 1.0), (1, 2.0), (2, 30.0), (3, 40.0)]
