"""The one registry of metric names: every key the callbacks log, with its SPEC section and meaning.

A key is ``<prefix>/<statistic>``: the statistic's SPEC.md name after the
callback's prefix. The monitors take a ``prefix=`` argument (default
``"order"`` for :class:`~lightning_phases.callbacks.OrderParameterMonitor`,
``"split"`` for :class:`~lightning_phases.callbacks.NoiseSplitTracker`); the
segment keys (SPEC §3) follow the split prefix: ``"split"`` gives
``"segment/..."``, ``"split<tail>"`` gives ``"segment<tail>/..."`` (e.g.
``"split_head"`` → ``"segment_head/ratio"``) and any other prefix ``p`` gives
``"p_segment/..."``.

Everything else in the package takes the names from here (callbacks,
:class:`~lightning_phases.callbacks.PhaseDetector`, the TensorBoard layout,
the report); ``tests/test_keys.py`` checks that no other package file spells a
key literally.

Example:
    >>> from lightning_phases import keys
    >>> keys.name("order", "R")
    'order/R'
    >>> keys.segment_prefix("split_head")
    'segment_head'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MetricKey",
    "ORDER",
    "SPLIT",
    "SEGMENT",
    "GMM",
    "PHASE",
    "REGISTRY",
    "ORDER_PREFIX",
    "SPLIT_PREFIX",
    "SEGMENT_PREFIX",
    "GMM_PREFIX",
    "PHASE_PREFIX",
    "name",
    "order",
    "split",
    "segment",
    "gmm",
    "phase",
    "TRACKER_STATISTICS",
    "tracker_statistics",
    "segment_prefix",
    "statistic",
    "registry_names",
    "check_prefix",
]

ORDER_PREFIX = "order"
SPLIT_PREFIX = "split"
SEGMENT_PREFIX = "segment"
GMM_PREFIX = "gmm"
PHASE_PREFIX = "phase"


@dataclass(frozen=True)
class MetricKey:
    """One logged statistic.

    Attributes:
        statistic: The name after the prefix (the SPEC.md name where SPEC defines it), e.g. ``"R_cw"``.
        section: The SPEC.md section that defines it (``"§1"``, ...) or ``"-"`` for bookkeeping keys.
        meaning: One line.
        tensorboard_only: Written to TensorBoard only (histograms, figures, text), not to every logger.
        classification_only: Logged only for classification tasks (error rates).
    """

    statistic: str
    section: str
    meaning: str
    tensorboard_only: bool = False
    classification_only: bool = False


def _table(*rows: MetricKey) -> dict[str, MetricKey]:
    return {row.statistic: row for row in rows}


#: OrderParameterMonitor (SPEC §1), under prefix ``"order"`` by default.
ORDER: dict[str, MetricKey] = _table(
    MetricKey("A", "§1", "total activity ⟨‖g^μ‖²⟩"),
    MetricKey("A0", "§1", "directed activity ‖g‖²"),
    MetricKey("A_parallel", "§1", "activity along g: (1 + sigma2_lambda)·A0"),
    MetricKey("A_perp", "§1", "activity across g: A − A_parallel"),
    MetricKey("D", "§1", "total noise Tr C"),
    MetricKey("D_parallel", "§1", "noise along g: sigma2_lambda·A0"),
    MetricKey("R", "§1", "mean cosine between distinct minibatch gradients"),
    MetricKey("sigma2_lambda", "§1", "variance of the projection λ_μ = g^μ·g/‖g‖²"),
    MetricKey("D_s", "§1", "effective dimension D_s(f) of the noise spectrum"),
    MetricKey(
        "D_s_half", "§1", "D_s(f) of a seeded random half of the probe set (close to D_s: the spectrum is resolved)"
    ),
    MetricKey("loss", "§1", "mean probe loss"),
    MetricKey(
        "error", "§1", "probe error rate against the given labels (per-label for multi-label)", classification_only=True
    ),
    MetricKey("measured_step", "-", "global step of the latest measurement"),
    MetricKey("skipped", "-", "number of skipped measurements (only after a failure)"),
    MetricKey("overhead", "-", "realised overhead: measurement time / training time so far"),
    MetricKey("spectrum", "§1", "histogram of log10 eigenvalues of the noise spectrum", tensorboard_only=True),
    MetricKey("spectrum_figure", "§1", "rank-ordered eigenvalues and cumulative variance", tensorboard_only=True),
)

#: NoiseSplitTracker (SPEC §2), under prefix ``"split"`` by default.
SPLIT: dict[str, MetricKey] = _table(
    MetricKey("rho", "§2", "fraction of mislabeled probe samples n_w/n"),
    MetricKey("A_c", "§2", "total activity of clean minibatches"),
    MetricKey("A_w", "§2", "total activity of mislabeled minibatches"),
    MetricKey("A0_c", "§2", "directed activity (1−ρ)²‖g_c‖²"),
    MetricKey("A0_w", "§2", "directed activity ρ²‖g_w‖²"),
    MetricKey("A0", "§2", "directed activity ‖(1−ρ)g_c + ρ g_w‖²"),
    MetricKey("R_cw", "§2", "cos(g_c, g_w)"),
    MetricKey("R_ac", "§2", "cos(g, g_c)"),
    MetricKey("R_aw", "§2", "cos(g, g_w)"),
    MetricKey("L_c", "§2", "mean loss of the clean probe samples"),
    MetricKey("L_w", "§2", "mean loss of the mislabeled probe samples"),
    MetricKey("err_c", "§2", "error rate of the clean probe samples (given labels)", classification_only=True),
    MetricKey("err_w", "§2", "error rate of the mislabeled probe samples (given labels)", classification_only=True),
    MetricKey("mask_estimated", "§4", "1 if the mask came from the loss mixture, 0 if from ground truth"),
    MetricKey("measured_step", "-", "global step of the latest measurement"),
    MetricKey("skipped", "-", "number of skipped measurements (only after a failure)"),
    MetricKey("overhead", "-", "realised overhead: measurement time / training time so far"),
    MetricKey("loss_clean", "§2", "histogram of the clean probe losses", tensorboard_only=True),
    MetricKey("loss_noisy", "§2", "histogram of the mislabeled probe losses", tensorboard_only=True),
)

#: NoiseSplitTracker's segment gradients (SPEC §3), under :func:`segment_prefix` of the split prefix.
#: Per true class ``c`` the keys ``ratio/<c>`` and ``cos/<c>`` are logged as well.
SEGMENT: dict[str, MetricKey] = _table(
    MetricKey("ratio", "§3", "mean over true classes of ‖g_clean^(c)‖/‖g_noise^(c)‖"),
    MetricKey("cos", "§3", "mean over true classes of cos(g_clean^(c), g_noise^(c))"),
)

#: GMMCleanser (SPEC §4), prefix ``"gmm"``.
GMM: dict[str, MetricKey] = _table(
    MetricKey("delta_L", "§4", "gap between the mixture's component means"),
    MetricKey("delta_L_smoothed", "§4", "smoothed delta_L"),
    MetricKey("threshold", "§4", "loss threshold between the components"),
    MetricKey("mean_clean", "§4", "mean of the clean component"),
    MetricKey("mean_noisy", "§4", "mean of the mislabeled component"),
    MetricKey("weight_noisy", "§4", "weight of the mislabeled component"),
    MetricKey("separation", "§4", "Ashman's D of the fit"),
    MetricKey("num_flagged", "§4", "samples flagged as mislabeled"),
    MetricKey("class_dependence", "§4", "η² of the loss split against the given class"),
    MetricKey("precision", "§4", "flag precision against ground truth"),
    MetricKey("recall", "§4", "flag recall against ground truth"),
    MetricKey("f1", "§4", "flag F1 against ground truth"),
    MetricKey("auroc", "§4", "AUROC of the posterior against ground truth"),
    MetricKey("t_c_step", "§4", "global step of the cleansing time t_c"),
    MetricKey("loss_histogram", "§4", "loss histogram with the fit", tensorboard_only=True),
    MetricKey("skipped", "-", "number of skipped fits (only after a failure)"),
    MetricKey("overhead", "-", "realised overhead of the loss pass: its time / training time so far"),
)

#: PhaseDetector, prefix ``"phase"``.
PHASE: dict[str, MetricKey] = _table(
    MetricKey("index", "§2", "index of the current phase (0-based)"),
    MetricKey("recommended", "§2", "1.0 at the measurement of the recommended stop"),
    MetricKey("recommended_step", "§2", "global step of the recommended stop"),
    MetricKey("transitions", "§2", "text entry per transition", tensorboard_only=True),
    MetricKey("skipped", "-", "number of skipped measurements (only after a failure)"),
)

#: ``{default prefix: table}``.
REGISTRY: dict[str, dict[str, MetricKey]] = {
    ORDER_PREFIX: ORDER,
    SPLIT_PREFIX: SPLIT,
    SEGMENT_PREFIX: SEGMENT,
    GMM_PREFIX: GMM,
    PHASE_PREFIX: PHASE,
}


def check_prefix(prefix: object, argument: str = "prefix") -> str:
    """``prefix`` must be a non-empty string without ``/``; returns it."""
    from lightning_phases.errors import LightningPhasesError

    if not isinstance(prefix, str) or not prefix or "/" in prefix or prefix != prefix.strip():
        raise LightningPhasesError(
            f"{argument} must be a non-empty string without '/' or surrounding spaces (e.g. 'order_head'); "
            f"got {prefix!r}."
        )
    return prefix


def _table_of(prefix: str) -> dict[str, MetricKey]:
    return REGISTRY.get(prefix, {})


def name(prefix: str, statistic: str, *, table: dict[str, MetricKey] | None = None) -> str:
    """The logged key ``"<prefix>/<statistic>"``; ``statistic`` must be registered in ``table``.

    ``table`` defaults to the table of the default prefix ``prefix``; pass it
    for a custom prefix (``name("order_head", "R", table=keys.ORDER)``).
    Per-class segment keys: ``name(p, "ratio/3", table=keys.SEGMENT)``.
    """
    rows = table if table is not None else _table_of(prefix)
    base = statistic.split("/", 1)[0]
    if base not in rows:
        raise KeyError(f"{statistic!r} is not a registered statistic of the {prefix!r} keys: {sorted(rows)}")
    return f"{prefix}/{statistic}"


def segment_prefix(split_prefix: str) -> str:
    """The prefix of the segment keys that go with a split prefix (see the module docstring)."""
    if split_prefix.startswith(SPLIT_PREFIX):
        return SEGMENT_PREFIX + split_prefix[len(SPLIT_PREFIX) :]
    return f"{split_prefix}_{SEGMENT_PREFIX}"


def statistic(key: str) -> str:
    """The part after the first ``/``: ``statistic("split/R_cw") == "R_cw"``."""
    return key.split("/", 1)[1] if "/" in key else key


def registry_names(prefix: str | None = None) -> list[str]:
    """Every registered key under its default prefix (or the one table of ``prefix``)."""
    tables = REGISTRY.items() if prefix is None else [(prefix, REGISTRY[prefix])]
    return [f"{p}/{s}" for p, rows in tables for s in rows]


def order(statistic: str) -> str:
    """An OrderParameterMonitor key under the default prefix: ``order("R") == "order/R"``."""
    return name(ORDER_PREFIX, statistic)


def split(statistic: str) -> str:
    """A NoiseSplitTracker key under the default prefix: ``split("R_cw") == "split/R_cw"``."""
    return name(SPLIT_PREFIX, statistic)


def segment(statistic: str) -> str:
    """A segment key under the default prefix: ``segment("ratio") == "segment/ratio"``."""
    return name(SEGMENT_PREFIX, statistic)


def gmm(statistic: str) -> str:
    """A GMMCleanser key: ``gmm("t_c_step") == "gmm/t_c_step"``."""
    return name(GMM_PREFIX, statistic)


def phase(statistic: str) -> str:
    """A PhaseDetector key: ``phase("index") == "phase/index"``."""
    return name(PHASE_PREFIX, statistic)


#: The statistics :class:`~lightning_phases.functional.phases.PhaseTracker` reads, by its (SPEC) name,
#: and the key each is logged under (default prefixes). The tracker never sees the keys.
TRACKER_STATISTICS: dict[str, str] = {
    "R": order("R"),
    "sigma2_lambda": order("sigma2_lambda"),
    "A": order("A"),
    "A_c": split("A_c"),
    "A0_c": split("A0_c"),
    "A0_w": split("A0_w"),
    "R_cw": split("R_cw"),
    "err_w": split("err_w"),
    "L_c": split("L_c"),
    "L_w": split("L_w"),
    "segment_ratio": segment("ratio"),
}


def tracker_statistics(metrics: object) -> dict[str, float]:
    """``{tracker name: value}`` of the :data:`TRACKER_STATISTICS` present in ``metrics`` (a mapping of keys)."""
    get = metrics.get  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for stat, key in TRACKER_STATISTICS.items():
        value = get(key)
        if value is not None:
            out[stat] = float(value)
    return out
