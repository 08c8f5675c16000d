"""Read a run's TensorBoard event files and draw the report figure.

Events are read with TensorBoard's own ``EventAccumulator``; no hand-written
parser. A *run* is one directory that holds event files (what one
``TensorBoardLogger`` version writes; a resumed run adds files to the same
directory). Runs are never merged: :func:`find_runs` lists the runs under a
directory, and :func:`read_run` refuses a directory that holds several.
Panels whose data is missing say so in the figure and in ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from lightning_phases import keys
from lightning_phases.errors import LightningPhasesError

__all__ = ["PHASE_DESCRIPTIONS", "RunData", "draw_report", "find_runs", "make_report", "read_run", "run_name"]

PHASE_COLOURS = ["#dbe9f6", "#fde2c8", "#e0f0d9", "#ecdff0"]
PHASE_LABELS = {"two": ("fast learning", "exploration"), "four": ("I", "II", "III", "IV")}
#: What each phase means, in words for the legend.
PHASE_DESCRIPTIONS = {
    "two": ("fast learning: gradients agree", "exploration: gradients dominated by noise"),
    "four": (
        "phase I: clean samples being learned",
        "phase II: clean learned, mislabeled not yet",
        "phase III: mislabeled samples being memorised",
        "phase IV: everything memorised",
    ),
}
T_C_STYLE: dict[str, Any] = {"color": "tab:red", "ls": "--", "lw": 1.2}
STOP_STYLE: dict[str, Any] = {"color": "tab:green", "ls": "-.", "lw": 1.4}
#: Figure fonts (points): readable when the figure is scaled onto a slide.
FONT: dict[str, float] = {"title": 11, "label": 10, "tick": 9, "legend": 8.5}


@dataclass
class RunData:
    """Scalars, histograms, images and texts of one run.

    ``scalars[tag] = [(step, value), ...]`` sorted by step;
    ``histograms[tag] = [(step, edges, counts), ...]`` (``len(edges) == len(counts) + 1``).
    """

    logdir: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    histograms: dict[str, list[tuple[int, list[float], list[float]]]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    texts: list[tuple[int, str]] = field(default_factory=list)

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        pts = self.scalars.get(tag, [])
        return [p[0] for p in pts], [p[1] for p in pts]

    def last(self, tag: str) -> float | None:
        pts = self.scalars.get(tag)
        return pts[-1][1] if pts else None

    def at(self, tag: str, step: int) -> float | None:
        """The value of ``tag`` logged at ``step`` (``None`` if none)."""
        return dict(self.scalars.get(tag, [])).get(step)


def _is_event_file(name: str) -> bool:
    return name.startswith("events.out.tfevents.")


def find_runs(logdir: str) -> list[str]:
    """Every run under ``logdir``: the directories (``logdir`` itself included) that directly hold event files.

    Raises:
        LightningPhasesError: ``logdir`` does not exist.
    """
    if not os.path.isdir(logdir):
        raise LightningPhasesError(f"Log directory {logdir!r} does not exist.")
    runs = [root for root, _, files in os.walk(logdir) if any(_is_event_file(f) for f in files)]
    return sorted(runs)


def run_name(logdir: str) -> str:
    """A short name of a run for titles: its directory name, with the parent for ``version_N`` directories."""
    path = os.path.normpath(os.path.abspath(logdir))
    base = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(path))
    if base.startswith("version_") and parent:
        return f"{parent}/{base}"
    return base or path


def read_run(logdir: str) -> RunData:
    """Load the scalars, histograms, images and texts of the one run in ``logdir``.

    ``logdir`` is the run's own directory (e.g. ``runs/demo/version_0``), or a
    directory with exactly one run below it.

    Raises:
        LightningPhasesError: ``logdir`` does not exist, holds no event file,
            holds several runs (they are listed; report each on its own), or
            holds no scalars.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = find_runs(logdir)
    if not runs:
        raise LightningPhasesError(
            f"No TensorBoard event files (events.out.tfevents.*) in {logdir!r} or below it. Point at the "
            "directory a TensorBoardLogger wrote for one run (e.g. runs/demo/version_0), and check that the "
            "Trainer had a TensorBoardLogger."
        )
    if len(runs) > 1:
        listing = "\n  ".join(runs)
        raise LightningPhasesError(
            f"{logdir!r} holds {len(runs)} runs; report each on its own (runs are never merged):\n  {listing}"
        )
    directory = runs[0]
    acc = EventAccumulator(directory, size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    data = RunData(logdir=directory)
    for tag in tags.get("scalars", []):
        by_step = {e.step: float(e.value) for e in acc.Scalars(tag)}  # file order: a later value of a step wins
        data.scalars[tag] = sorted(by_step.items())
    for tag in tags.get("histograms", []):
        for e in acc.Histograms(tag):
            h = e.histogram_value
            limits = [min(max(float(b), h.min), h.max) for b in h.bucket_limit]
            data.histograms.setdefault(tag, []).append((e.step, [float(h.min), *limits], [float(c) for c in h.bucket]))
    for tag in tags.get("images", []):
        data.images[tag] = [(e.step, e.encoded_image_string) for e in acc.Images(tag)]
    for tag in tags.get("tensors", []):
        if tag.startswith(keys.phase("transitions")):
            for e in acc.Tensors(tag):
                try:
                    text = e.tensor_proto.string_val[0].decode()
                except (IndexError, AttributeError):
                    continue
                data.texts.append((e.step, text))
    if not data.scalars:
        raise LightningPhasesError(f"The event files in {directory!r} contain no scalars.")
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


def _int_or_none(value: float | None) -> int | None:
    return None if value is None or not math.isfinite(value) else int(value)


def _shade(ax, spans, markers: dict[str, int | None]) -> None:
    for idx, start, end in spans:
        ax.axvspan(start, end, color=PHASE_COLOURS[idx % len(PHASE_COLOURS)], lw=0, zorder=0)
    if markers.get("t_c") is not None:
        ax.axvline(markers["t_c"], gid="t_c", zorder=3, **T_C_STYLE)
    if markers.get("stop") is not None:
        ax.axvline(markers["stop"], gid="recommended_stop", zorder=3, **STOP_STYLE)


_NAMES = {
    keys.split("err_c"): "clean samples (given labels)",
    keys.split("err_w"): "mislabeled samples (given labels)",
    "val_err": "validation (noisy labels)",
    "test_err": "test, final weights",
    "test_err_kept": "test, kept weights",
    keys.split("L_c"): "clean samples",
    keys.split("L_w"): "mislabeled samples",
    keys.order("loss"): "probe (all samples)",
    keys.order("A"): "A (all samples)",
    keys.split("A_c"): "A_c (clean only)",
    keys.split("A_w"): "A_w (mislabeled only)",
    keys.order("A0"): "A0 (all samples)",
    keys.split("A0_c"): "A0_c (clean)",
    keys.split("A0_w"): "A0_w (mislabeled)",
    keys.order("R"): "R (minibatch gradients)",
    keys.split("R_cw"): "R_cw (clean vs mislabeled)",
    keys.split("R_ac"): "R_ac (all vs clean)",
    keys.split("R_aw"): "R_aw (all vs mislabeled)",
    keys.order("sigma2_lambda"): "σ²_λ",
    keys.gmm("delta_L"): "ΔL of each fit",
    keys.gmm("delta_L_smoothed"): "ΔL smoothed (its peak is t_c)",
    keys.segment("ratio"): "‖g_clean‖ / ‖g_noise‖ (mean over classes)",
    keys.segment("cos"): "cos(g_clean, g_noise) (mean)",
}


def _plot(ax, data: RunData, tags: list[str], *, log: bool = False) -> bool:
    drawn = False
    for tag in tags:
        steps, values = data.series(tag)
        if not steps:
            continue
        vals = [v if (not log or v > 0) else math.nan for v in values]
        label = _NAMES.get(tag, tag)
        if len(steps) == 1:  # one value (e.g. a test error at the end): a marker, not an invisible line
            ax.plot(steps, vals, ls="none", marker="*" if "kept" in tag else "D", ms=9, label=label, zorder=4)
        else:
            ax.plot(steps, vals, "-", lw=1.4, label=label, zorder=2)
        drawn = True
    if drawn and log:
        ax.set_yscale("log")
    return drawn


def _legend(ax) -> None:
    """The lines' legend below the axes, so that it never covers data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles,
            labels,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncol=2,
            fontsize=FONT["legend"],
            frameon=False,
        )


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no data\n({what})", ha="center", va="center", transform=ax.transAxes, color="0.45", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _nearest(entries: list[tuple[int, list[float], list[float]]], step: int | None):
    if not entries:
        return None
    if step is None:
        return entries[-1]
    return min(entries, key=lambda e: (abs(e[0] - step), -e[0]))


def _rebin(edges: list[float], counts: list[float], grid: list[float]) -> list[float]:
    """Counts of buckets ``[edges[i], edges[i+1]]`` on the bins of ``grid``, each spread uniformly over its bucket."""
    out = [0.0] * (len(grid) - 1)
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        if c == 0:
            continue
        if b <= a:  # a bucket of zero width: all in the bin holding it
            k = min(max(next((i for i in range(len(out)) if grid[i + 1] >= a), len(out) - 1), 0), len(out) - 1)
            out[k] += c
            continue
        for k in range(len(out)):
            overlap = min(b, grid[k + 1]) - max(a, grid[k])
            if overlap > 0:
                out[k] += c * overlap / (b - a)
    return out


def _mixture_axes(ax, data: RunData, t_c: int | None) -> str | None:
    """Clean and mislabeled probe losses at the measurement nearest t_c, with the mixture's threshold and means."""
    clean = _nearest(data.histograms.get(keys.split("loss_clean"), []), t_c)
    noisy = _nearest(data.histograms.get(keys.split("loss_noisy"), []), t_c)
    ax.set_xlabel("per-sample loss", fontsize=FONT["label"])
    ax.set_ylabel("probe samples per unit of loss", fontsize=FONT["label"])
    if clean is None and noisy is None:
        _no_data(
            ax,
            f"{keys.split('loss_clean')}, {keys.split('loss_noisy')} histograms: NoiseSplitTracker with a TensorBoardLogger",
        )
        return "loss populations: no split/loss_clean, split/loss_noisy histograms (NoiseSplitTracker)"
    step = (clean or noisy)[0]
    present = [e for e in (clean, noisy) if e is not None]
    lo, hi = min(e[1][0] for e in present), max(e[1][-1] for e in present)
    grid = [lo + (hi - lo) * k / 40 for k in range(41)] if hi > lo else [lo - 0.5, lo + 0.5]
    for entry, colour, name in ((clean, "tab:blue", "clean"), (noisy, "tab:red", "mislabeled")):
        if entry is None:
            continue
        _, edges, counts = entry
        # TensorBoard's buckets have unequal widths (and empty ones are left out): spread each bucket's count
        # uniformly over its range onto one even grid shared by both populations, then draw counts per unit of
        # loss, so that areas are sample counts
        binned = _rebin(edges, counts, grid)
        density = [c / (b - a) for c, a, b in zip(binned, grid[:-1], grid[1:])]
        ax.stairs(density, grid, fill=True, alpha=0.35, color=colour)
        ax.stairs(density, grid, color=colour, lw=1.2, label=f"{name} samples (n = {sum(counts):.0f})")
    note = None
    if t_c is not None:
        threshold = data.at(keys.gmm("threshold"), t_c)
        if threshold is not None:
            ax.axvline(threshold, color="k", ls="--", lw=1.2, label=f"threshold l_c = {threshold:.2f}", gid="threshold")
        for tag, colour, name in (
            (keys.gmm("mean_clean"), "tab:blue", "m_c"),
            (keys.gmm("mean_noisy"), "tab:red", "m_w"),
        ):
            mean = data.at(tag, t_c)
            if mean is not None:
                ax.axvline(mean, color=colour, ls=":", lw=1.2, label=f"mixture mean {name} = {mean:.2f}")
        where = "at t_c" if step == t_c else f"at step {step}, nearest t_c"
    else:
        where = f"at the last measurement (step {step}); t_c not reached"
        note = "loss populations: t_c not reached, the last measurement is shown without a threshold"
    ax.set_title(f"loss populations {where}", fontsize=FONT["title"])
    return note


def draw_report(data: RunData, *, title: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Draw the report figure of one run.

    Panels (time axes share the global step, phases shaded, ``t_c`` and the
    recommended stop marked on each): error rates; losses; total and
    directed activities; alignments; ``σ²_λ``; the loss gap ΔL; the
    segment gradients; the clean and mislabeled loss populations at ``t_c``
    with the mixture's threshold and means; and a text summary.

    Args:
        data: The run, from :func:`read_run`.
        title: Figure title; default from :func:`run_name`.

    Returns:
        ``(figure, summary)``: a ``matplotlib.figure.Figure`` and the summary dict.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    model = _phase_model(data)
    spans = _phase_spans(data)
    t_c = _int_or_none(data.last(keys.gmm("t_c_step")))
    stop = _int_or_none(data.last(keys.phase("recommended_step")))
    markers = {"t_c": t_c, "stop": stop}
    notes: list[str] = []

    fig = Figure(figsize=(15, 12.5), dpi=100, layout="constrained")
    axes = fig.subplots(3, 3).ravel()
    panels = [
        (
            "error rates",
            "error rate",
            [keys.split("err_c"), keys.split("err_w"), "val_err", "test_err", "test_err_kept"],
            False,
        ),
        ("losses", "cross-entropy loss", [keys.split("L_c"), keys.split("L_w"), keys.order("loss")], False),
        (
            "loss gap between the mixture's components",
            "ΔL = m_w − m_c",
            [keys.gmm("delta_L"), keys.gmm("delta_L_smoothed")],
            False,
        ),
        (
            "total activity of minibatch gradients",
            "A (log scale)",
            [keys.order("A"), keys.split("A_c"), keys.split("A_w")],
            True,
        ),
        (
            "directed activity (mean gradient)",
            "A0 (log scale)",
            [keys.order("A0"), keys.split("A0_c"), keys.split("A0_w")],
            True,
        ),
        (
            "alignments (cosines)",
            "cosine",
            [keys.order("R"), keys.split("R_cw"), keys.split("R_ac"), keys.split("R_aw")],
            False,
        ),
        ("projection variance", "σ²_λ (log scale)", [keys.order("sigma2_lambda")], True),
        ("clean vs noisy segment gradients", "ratio / cosine", [keys.segment("ratio"), keys.segment("cos")], False),
    ]
    for ax, (name, ylabel, tags, log) in zip(axes, panels):
        ax.set_title(name, fontsize=FONT["title"])
        ax.tick_params(labelsize=FONT["tick"])
        if _plot(ax, data, tags, log=log):
            _shade(ax, spans, markers)
            ax.set_xlabel("training step", fontsize=FONT["label"])
            ax.set_ylabel(ylabel, fontsize=FONT["label"])
            if name.startswith(("alignments", "clean vs noisy")):
                ax.axhline(0, color="k", lw=0.6, ls=":")
            if name == "error rates":
                ax.set_ylim(-0.02, 1.02)
            _legend(ax)
        else:
            notes.append(f"{name}: no data ({', '.join(tags)})")
            _no_data(ax, ", ".join(tags))
    # replace the 9th time panel by the loss populations (real axes)
    mix_ax = axes[8]
    mix_ax.tick_params(labelsize=FONT["tick"])
    note = _mixture_axes(mix_ax, data, t_c)
    if note:
        notes.append(note)
    _legend(mix_ax)

    summary = _summary(data, spans, model, notes)
    # one figure-level legend for what every time panel shares: the phases and the two markers
    handles: list[Any] = [
        Patch(color=PHASE_COLOURS[i % len(PHASE_COLOURS)], label=PHASE_DESCRIPTIONS[model][i])
        if i < len(PHASE_DESCRIPTIONS[model])
        else Patch(color=PHASE_COLOURS[i % len(PHASE_COLOURS)], label=f"phase {i}")
        for i in sorted({idx for idx, _, _ in spans})
    ]
    handles.append(
        Line2D(
            [],
            [],
            label="t_c: cleansing time" + (f" (step {t_c})" if t_c is not None else " (not reached)"),
            **T_C_STYLE,
        )
    )
    handles.append(
        Line2D(
            [],
            [],
            label="recommended stop" + (f" (step {stop})" if stop is not None else " (not reached)"),
            **STOP_STYLE,
        )
    )
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=FONT["legend"] + 1, frameon=False)
    headline = ["four phases (with mislabeled data)" if model == "four" else "two phases (clean data)"]
    if t_c is not None:
        c = summary["cleansing"]
        line = f"t_c at step {t_c}"
        if c.get("num_flagged") is not None:
            line += f": {c['num_flagged']:.0f} samples flagged"
        if c.get("precision") is not None and c.get("recall") is not None:
            line += f" (precision {c['precision']:.2f}, recall {c['recall']:.2f})"
        headline.append(line)
    if stop is not None:
        headline.append(f"recommended stop at step {stop}")
    for key, label in (("test_err", "final test error"), ("test_err_kept", "kept weights' test error")):
        if data.last(key) is not None:
            headline.append(f"{label} {data.last(key):.3f}")
    fig.suptitle(
        f"{title or run_name(data.logdir)}: phases of learning\n"
        + "; ".join(headline[:2])
        + ("\n" + "; ".join(headline[2:]) if headline[2:] else ""),
        fontsize=FONT["title"] + 2,
    )
    return fig, summary


def make_report(logdir: str, output: str | None = None) -> dict[str, Any]:
    """Draw the report figure of one run and write ``summary.json`` next to it (atomically).

    Args:
        logdir: The run's directory (see :func:`read_run`).
        output: Path of the figure (PNG or PDF); default ``report.png`` in the run's directory.

    Returns:
        The summary dict that was written to ``summary.json``, with ``figure``
        and ``summary`` (the two paths).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)

    data = read_run(logdir)
    output = output or os.path.join(data.logdir, "report.png")
    fig, summary = draw_report(data)
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    root, ext = os.path.splitext(output)
    _atomic_write(output, lambda path: fig.savefig(path, format=(ext.lstrip(".") or "png")))
    summary["figure"] = os.path.abspath(output)
    summary["summary"] = os.path.join(directory, "summary.json")

    def write_json(path: str) -> None:
        with open(path, "w") as fh:
            json.dump(summary, fh, indent=2)

    _atomic_write(summary["summary"], write_json)
    return summary


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _summary(data: RunData, spans, model: str, notes: list[str]) -> dict[str, Any]:
    labels = PHASE_LABELS[model]
    phases = [
        {"phase": labels[i] if i < len(labels) else str(i), "index": i, "first_step": int(a), "last_step": int(b)}
        for i, a, b in spans
    ]
    t_c = _int_or_none(data.last(keys.gmm("t_c_step")))
    rec = _int_or_none(data.last(keys.phase("recommended_step")))
    cleansing: dict[str, Any] = {}
    if t_c is not None:
        for key in ("delta_L", "threshold"):
            cleansing[key] = data.at(keys.gmm(key), t_c)  # the values of the fit at t_c
        # the flags are final only at the confirmation, the cleanser's last measurement (per class, or from
        # every sample after a subset search): their count and quality are the last logged values
        for key in ("num_flagged", "precision", "recall", "f1", "auroc"):
            cleansing[key] = data.last(keys.gmm(key))
    final = {
        tag: pts[-1][1]
        for tag, pts in data.scalars.items()
        if tag.startswith(tuple(p + "/" for p in (keys.ORDER_PREFIX, keys.SPLIT_PREFIX, keys.SEGMENT_PREFIX))) and pts
    }
    tests = {key: data.last(key) for key in ("test_err", "test_err_kept") if data.last(key) is not None}
    return {
        "logdir": os.path.abspath(data.logdir),
        "run": run_name(data.logdir),
        "phase_model": model,
        "phases": phases,
        "t_c_step": t_c,
        "recommended_step": rec,
        "cleansing": cleansing,
        "test": tests,
        "final": final,
        "transitions": [{"step": s, "text": t} for s, t in sorted(data.texts)],
        "notes": notes,
    }
