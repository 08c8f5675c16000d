"""Read a run's TensorBoard event files and draw the multi-panel report figure.

Events are read with TensorBoard's own ``EventAccumulator``; no hand-written
parser. Panels whose data is missing are left out with a note in the figure
and in ``summary.json``.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from lightning_phases import keys
from lightning_phases.errors import LightningPhasesError

__all__ = ["RunData", "read_run", "make_report"]

PHASE_COLOURS = ["#dbe9f6", "#fde2c8", "#e0f0d9", "#ecdff0"]
PHASE_LABELS = {"two": ("fast learning", "exploration"), "four": ("I", "II", "III", "IV")}


@dataclass
class RunData:
    """Scalars and images of one run: ``scalars[tag] = [(step, value), ...]`` sorted by step."""

    logdir: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    texts: list[tuple[int, str]] = field(default_factory=list)

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        pts = self.scalars.get(tag, [])
        return [p[0] for p in pts], [p[1] for p in pts]

    def last(self, tag: str) -> float | None:
        pts = self.scalars.get(tag)
        return pts[-1][1] if pts else None


def read_run(logdir: str) -> RunData:
    """Load every scalar, image and text of the event files under ``logdir`` (recursively).

    Raises:
        LightningPhasesError: ``logdir`` does not exist or holds no event file.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(logdir):
        raise LightningPhasesError(f"Log directory {logdir!r} does not exist.")
    files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))
    if not files:
        raise LightningPhasesError(
            f"No TensorBoard event files under {logdir!r}. Point at the directory a TensorBoardLogger wrote "
            "(e.g. lightning_logs/version_0), or at a parent of it."
        )
    data = RunData(logdir=logdir)
    for directory in sorted({os.path.dirname(f) for f in files}):
        acc = EventAccumulator(directory, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            data.scalars.setdefault(tag, []).extend((e.step, float(e.value)) for e in acc.Scalars(tag))
        for tag in tags.get("images", []):
            data.images.setdefault(tag, []).extend((e.step, e.encoded_image_string) for e in acc.Images(tag))
        for tag in tags.get("tensors", []):
            if tag.startswith(keys.phase("transitions")):
                for e in acc.Tensors(tag):
                    try:
                        text = e.tensor_proto.string_val[0].decode()
                    except (IndexError, AttributeError):
                        continue
                    data.texts.append((e.step, text))
    for tag in data.scalars:
        dedup = dict(sorted(data.scalars[tag]))
        data.scalars[tag] = sorted(dedup.items())
    if not data.scalars:
        raise LightningPhasesError(f"The event files under {logdir!r} contain no scalars.")
    return data


def _phase_spans(data: RunData) -> list[tuple[int, float, float]]:
    steps, values = data.series(keys.phase("index"))
    spans: list[tuple[int, float, float]] = []
    for i, (s, v) in enumerate(zip(steps, values)):
        end = steps[i + 1] if i + 1 < len(steps) else s
        if spans and spans[-1][0] == int(v):
            spans[-1] = (spans[-1][0], spans[-1][1], end)
        else:
            spans.append((int(v), s, end))
    return spans


def _phase_model(data: RunData) -> str:
    return "four" if keys.split("R_cw") in data.scalars else "two"


def _shade(ax, spans, model: str) -> None:
    labels = PHASE_LABELS[model]
    for idx, start, end in spans:
        ax.axvspan(start, end, color=PHASE_COLOURS[idx % len(PHASE_COLOURS)], alpha=0.6, lw=0, zorder=0)
        ax.text(
            (start + end) / 2,
            0.02,
            labels[idx] if idx < len(labels) else str(idx),
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.35",
        )


def _plot(ax, data: RunData, tags: list[str], *, log: bool = False) -> bool:
    drawn = False
    for tag in tags:
        steps, values = data.series(tag)
        if steps:
            vals = [v if (not log or v > 0) else math.nan for v in values]
            ax.plot(steps, vals, ".-", ms=2, lw=1, label=tag.split("/", 1)[-1])
            drawn = True
    if drawn:
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
    return drawn


def make_report(logdir: str, output: str | None = None) -> dict[str, Any]:
    """Draw the report figure of a run and write ``summary.json`` next to it.

    Args:
        logdir: Directory containing the run's TensorBoard event files.
        output: Path of the figure (PNG or PDF); default ``<logdir>/report.png``.

    Returns:
        The summary dict that was written to ``summary.json``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    data = read_run(logdir)
    output = output or os.path.join(logdir, "report.png")
    model = _phase_model(data)
    spans = _phase_spans(data)
    panels = [
        (
            "errors and losses (clean vs mislabeled)",
            [keys.split("err_c"), keys.split("err_w"), keys.split("L_c"), keys.split("L_w"), "val_err", "test_err"],
            False,
        ),
        ("total activities", [keys.order("A"), keys.split("A_c"), keys.split("A_w")], True),
        ("directed activities", [keys.order("A0"), keys.split("A0_c"), keys.split("A0_w")], True),
        ("alignments", [keys.order("R"), keys.split("R_cw"), keys.split("R_ac"), keys.split("R_aw")], False),
        ("sigma2_lambda", [keys.order("sigma2_lambda")], True),
        ("loss gap ΔL", [keys.gmm("delta_L")], False),
    ]
    fig = Figure(figsize=(13, 8.5), dpi=110)
    axes = fig.subplots(3, 3).ravel()
    notes: list[str] = []
    for ax, (title, tags, log) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        if _plot(ax, data, tags, log=log):
            _shade(ax, spans, model)
            ax.set_xlabel("step", fontsize=8)
            if title.startswith("alignments"):
                ax.axhline(0, color="k", lw=0.6, ls=":")
            if title.startswith("loss gap") and data.last(keys.gmm("t_c_step")) is not None:
                ax.axvline(data.last(keys.gmm("t_c_step")), color="r", ls="--", lw=1, label="t_c")
                ax.legend(fontsize=7)
        else:
            notes.append(f"{title}: no data ({', '.join(tags)})")
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
    # loss histogram with the fitted mixture at t_c (the image GMMCleanser logged)
    hist_ax = axes[6]
    hist_ax.set_title("losses and fitted mixture at t_c", fontsize=10)
    hist_ax.axis("off")
    if data.images.get(keys.gmm("loss_histogram")):
        import matplotlib.image as mpimg

        img = mpimg.imread(io.BytesIO(data.images[keys.gmm("loss_histogram")][-1][1]), format="png")
        hist_ax.imshow(img)
    else:
        notes.append(
            "losses and fitted mixture at t_c: no gmm/loss_histogram image (GMMCleanser absent or t_c not reached)"
        )
        hist_ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=hist_ax.transAxes, color="0.5")
    seg_ax = axes[7]
    seg_ax.set_title("segment gradients (ratio, cos)", fontsize=10)
    if _plot(seg_ax, data, [keys.segment("ratio"), keys.segment("cos")]):
        seg_ax.axhline(1.0, color="k", lw=0.6, ls=":")
        _shade(seg_ax, spans, model)
    else:
        notes.append("segment gradients: no data (needs NoiseSplitTracker with ground truth)")
        seg_ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=seg_ax.transAxes, color="0.5")
    note_ax = axes[8]
    note_ax.axis("off")
    summary = _summary(data, spans, model, notes)
    lines = [f"phase model: {model}"]
    for p in summary["phases"]:
        lines.append(f"  {p['phase']}: steps {p['first_step']}-{p['last_step']}")
    if summary.get("t_c_step") is not None:
        lines.append(f"t_c: step {summary['t_c_step']}")
    if summary.get("recommended_step") is not None:
        lines.append(f"recommended stop: step {summary['recommended_step']}")
    for key in ("precision", "recall", "f1"):
        if summary["cleansing"].get(key) is not None:
            lines.append(f"cleansing {key}: {summary['cleansing'][key]:.3f}")
    lines += [f"note: {n}" for n in notes]
    note_ax.text(0.0, 1.0, "\n".join(lines), va="top", fontsize=8, family="monospace", wrap=True)
    fig.suptitle(f"lightning_phases report: {os.path.abspath(logdir)}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output)
    summary["figure"] = os.path.abspath(output)
    with open(os.path.join(os.path.dirname(os.path.abspath(output)), "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def _summary(data: RunData, spans, model: str, notes: list[str]) -> dict[str, Any]:
    labels = PHASE_LABELS[model]
    phases = [
        {"phase": labels[i] if i < len(labels) else str(i), "index": i, "first_step": int(a), "last_step": int(b)}
        for i, a, b in spans
    ]
    t_c = data.last(keys.gmm("t_c_step"))
    rec = data.last(keys.phase("recommended_step"))
    cleansing: dict[str, Any] = {}
    if t_c is not None:
        for key in ("num_flagged", "precision", "recall", "f1", "auroc", "delta_L", "threshold"):
            pts = dict(data.scalars.get(keys.gmm(key), []))
            # the values of the fit at t_c
            cleansing[key] = pts.get(int(t_c))
    final = {
        tag: pts[-1][1]
        for tag, pts in data.scalars.items()
        if tag.startswith(tuple(p + "/" for p in (keys.ORDER_PREFIX, keys.SPLIT_PREFIX, keys.SEGMENT_PREFIX))) and pts
    }
    return {
        "logdir": os.path.abspath(data.logdir),
        "phase_model": model,
        "phases": phases,
        "t_c_step": None if t_c is None else int(t_c),
        "recommended_step": None if rec is None else int(rec),
        "cleansing": cleansing,
        "final": final,
        "transitions": [{"step": s, "text": t} for s, t in sorted(data.texts)],
        "notes": notes,
    }
